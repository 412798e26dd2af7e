// Fused Mish + BatchNorm kernels for res2netplus (layers.py): float32 CPU tensors, dense NCHW or channels_last.
// Plain C ABI, called through ctypes: no torch headers, so it builds in about a second on first use. GCC/Clang vector
// extensions (16 floats) compile to AVX-512, AVX2 or NEON. A tail is computed in a padded vector, so every element goes
// through the same instructions and a value rebuilt in the backward pass is bit for bit the forward one.
#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
static inline int omp_get_thread_num() { return 0; }
static inline int omp_get_num_threads() { return 1; }
#endif
typedef int64_t i64;
constexpr int L = 16;
typedef float V __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));

static inline V splat(float x) { return V{} + x; }
static inline V load(const float *p, int n = L) {
  V v{};
  if (n == L) std::memcpy(&v, p, sizeof(V)); else for (int l = 0; l < n; l++) v[l] = p[l];
  return v;
}
static inline void store(float *p, V v, int n = L) {
  if (n == L) std::memcpy(p, &v, sizeof(V)); else for (int l = 0; l < n; l++) p[l] = v[l];
}

// a·b + c in one rounding where the machine has FMA (the same instructions wherever a value is computed again)
static inline V fmadd(V a, V b, V c) {
#if defined(__AVX512F__)
  return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  __m256 ha[2], hb[2], hc[2]; std::memcpy(ha, &a, sizeof(V)); std::memcpy(hb, &b, sizeof(V)); std::memcpy(hc, &c, sizeof(V));
  ha[0] = _mm256_fmadd_ps(ha[0], hb[0], hc[0]); ha[1] = _mm256_fmadd_ps(ha[1], hb[1], hc[1]);
  V r; std::memcpy(&r, ha, sizeof(V)); return r;
#else
  return a * b + c;
#endif
}

// exp(x), x clamped to [-87, 20]: Cephes' range reduction and polynomial
static inline V vexp(V x) {
  x = x < -87.f ? splat(-87.f) : x;
  x = x > 20.f ? splat(20.f) : x;
  V k = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  V r = fmadd(k, splat(-0.693359375f), x);
  r = fmadd(k, splat(2.12194440e-4f), r);
  V p = splat(1.9875691500e-4f);
  p = fmadd(p, r, splat(1.3981999507e-3f));
  p = fmadd(p, r, splat(8.3334519073e-3f));
  p = fmadd(p, r, splat(4.1665795894e-2f));
  p = fmadd(p, r, splat(1.6666665459e-1f));
  p = fmadd(p, r, splat(5.0000001201e-1f));
  p = fmadd(p, r * r, r + 1.f);
  VI bits = (__builtin_convertvector(k, VI) + 127) << 23;
  V scale; std::memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}
// 1/d for d in [1, 1e27]: the hardware estimate and one Newton step (about 1 ulp), several times faster than a division
static inline V recip(V d) {
#if defined(__AVX512F__)
  V r = (V)_mm512_rcp14_ps((__m512)d);
  return r * (2.f - d * r);
#elif defined(__AVX__)
  __m256 h[2]; std::memcpy(h, &d, sizeof(V));
  h[0] = _mm256_rcp_ps(h[0]); h[1] = _mm256_rcp_ps(h[1]);
  V r; std::memcpy(&r, h, sizeof(V));
  r = r * (2.f - d * r);  // AVX's estimate has 12 bits, AVX-512's 14: one more step
  return r * (2.f - d * r);
#else
  return 1.f / d;
#endif
}
// Mish from one exp: tanh(softplus(y)) = n/(n+2), n = e(e+2)
static inline V mish(V y) { V e = vexp(y), n = e * (e + 2.f); return y * (n * recip(n + 2.f)); }
static inline V mish_grad(V y, V &m) {  // Mish (in m, bit for bit mish(y)) and its derivative t + y·σ(y)·(1 − t²)
  V e = vexp(y), n = e * (e + 2.f), t = n * recip(n + 2.f), sig = e * recip(e + 1.f);
  m = y * t;
  return t + y * sig * (1.f - t * t);
}

struct Shape { i64 N, C, S; int cl, nt; };

// One NCHW row (S elements of one channel) in vectors: f(x[NI], y[NO], p[NP], u, v) reads the inputs' vectors and the
// channel's parameters, writes the outputs' and the terms u, v whose sums the reductions want (added to ua, va)
template <int NI, int NO, class F>
static inline void row(const float *const *in, float *const *out, i64 base, i64 S, V *p, F &f, V &ua, V &va) {
  V x[NI ? NI : 1], y[NO ? NO : 1];
  i64 full = S - S % L;
  for (i64 i = 0; i < full; i += L) {  // whole vectors: no tail test in the loop, so x, y stay in registers
    for (int j = 0; j < NI; j++) x[j] = load(in[j] + base + i);
    V u{}, v{};
    f(x, y, p, u, v);
    for (int j = 0; j < NO; j++) store(out[j] + base + i, y[j]);
    ua += u; va += v;
  }
  if (full == S) return;
  int m = (int)(S - full);
  for (int j = 0; j < NI; j++) x[j] = load(in[j] + base + full, m);
  V u{}, v{};
  f(x, y, p, u, v);
  for (int j = 0; j < NO; j++) store(out[j] + base + full, y[j], m);
  VI lane = VI{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15};
  ua += lane < m ? u : V{}; va += lane < m ? v : V{};
}

static inline double hsum(V v) { double a = 0.; for (int l = 0; l < L; l++) a += v[l]; return a; }

// channels_last: a flat array whose element e has channel e % C. Parameters are repeated over P = lcm(C, 16) elements,
// so every vector but the last is whole and finds its parameters at a fixed offset. With `su`, per-channel sums.
template <int NI, int NO, int NP, class F>
static void flat_pass(const Shape &s, const float *const *in, float *const *out, const float *const *par, double *su, double *sv, F f) {
  i64 C = s.C, P = C, total = s.N * s.S * C;
  while (P % L) P += C;
  std::vector<float> pe((size_t)(NP ? NP : 1) * P);
  for (int j = 0; j < NP; j++) for (i64 q = 0; q < P; q++) pe[(size_t)j * P + q] = par[j][q % C];
  i64 periods = (total + P - 1) / P;
  std::vector<double> part(su ? (size_t)s.nt * 2 * P : 0, 0.);
#pragma omp parallel num_threads(s.nt)
  {
    V x[NI ? NI : 1], y[NO ? NO : 1], p[NP ? NP : 1];
    int t = omp_get_thread_num(), tn = omp_get_num_threads();
    double *du = su ? part.data() + (size_t)t * 2 * P : nullptr, *dv = du ? du + P : nullptr;
    std::vector<V> acc(su ? 2 * P / L : 0);
    i64 lo = periods * t / tn * P, hi = periods * (t + 1) / tn * P;
    if (hi > total) hi = total;
    int since_flush = 0;
    for (i64 e0 = lo; e0 < hi; e0 += P) {
      if (e0 + P <= hi) {  // a whole period: whole vectors, no tail test in the loop
        for (i64 q = 0; q < P; q += L) {
          for (int j = 0; j < NP; j++) p[j] = load(pe.data() + (size_t)j * P + q);
          for (int j = 0; j < NI; j++) x[j] = load(in[j] + e0 + q);
          V u{}, v{};
          f(x, y, p, u, v);
          for (int j = 0; j < NO; j++) store(out[j] + e0 + q, y[j]);
          if (su) { acc[q / L] += u; acc[P / L + q / L] += v; }
        }
      } else for (i64 q = 0; e0 + q < hi; q += L) {
        i64 e = e0 + q;
        int m = hi - e < L ? (int)(hi - e) : L;
        for (int j = 0; j < NP; j++) p[j] = load(pe.data() + (size_t)j * P + q);
        for (int j = 0; j < NI; j++) x[j] = load(in[j] + e, m);
        V u{}, v{};
        f(x, y, p, u, v);
        for (int j = 0; j < NO; j++) store(out[j] + e, y[j], m);
        if (su) {
          if (m < L) { VI lane = VI{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}; u = lane < m ? u : V{}; v = lane < m ? v : V{}; }
          acc[q / L] += u; acc[P / L + q / L] += v;
        }
      }
      if (su && (++since_flush == 64 || e0 + P >= hi)) {  // float sums over 64 periods at most, then double
        for (i64 q = 0; q < P; q += L)
          for (int l = 0; l < L; l++) { du[q + l] += acc[q / L][l]; dv[q + l] += acc[P / L + q / L][l]; }
        for (auto &a : acc) a = V{};
        since_flush = 0;
      }
    }
  }
  if (su) {
    for (i64 c = 0; c < C; c++) { su[c] = 0.; sv[c] = 0.; }
    for (int t = 0; t < s.nt; t++)
      for (i64 q = 0; q < P; q++) { su[q % C] += part[(size_t)t * 2 * P + q]; sv[q % C] += part[(size_t)t * 2 * P + P + q]; }
  }
}

// An elementwise pass: f as in `row`
template <int NI, int NO, int NP, class F>
static void map(const Shape &s, const float *const *in, float *const *out, const float *const *par, F f) {
  if (s.cl) return flat_pass<NI, NO, NP>(s, in, out, par, nullptr, nullptr, f);
#pragma omp parallel for num_threads(s.nt) schedule(static)
  for (i64 c = 0; c < s.C; c++) {
    V p[NP ? NP : 1], ua{}, va{};
    for (int j = 0; j < NP; j++) p[j] = splat(par[j][c]);
    for (i64 n = 0; n < s.N; n++) row<NI, NO>(in, out, (n * s.C + c) * s.S, s.S, p, f, ua, va);
  }
}

// A reduction pass f1 (per-channel sums of its u, v), then coef(c, Σu, Σv), which sets the channel's parameters for
// the elementwise pass f2. NCHW runs both passes channel by channel, while the channel's rows are still in cache. With
// `chan`, a work array of nt × N·S floats, NCHW passes the channel between the passes in the thread's own N·S: pass 1's
// last output and pass 2's last input are that (a tensor-sized array is needed only in channels_last, out1/in2 there)
template <int NI1, int NO1, int NP1, int NI2, int NO2, int NP2, class F1, class G, class F2>
static void reduce_map(const Shape &s, const float *const *in1, float *const *out1, const float *const *par1, F1 f1, G coef,
                       const float *const *in2, float *const *out2, const float *const *par2, F2 f2, float *chan = nullptr) {
  if (s.cl) {
    std::vector<double> su(s.C), sv(s.C);
    flat_pass<NI1, NO1, NP1>(s, in1, out1, par1, su.data(), sv.data(), f1);
    for (i64 c = 0; c < s.C; c++) coef(c, su[c], sv[c]);
    return flat_pass<NI2, NO2, NP2>(s, in2, out2, par2, nullptr, nullptr, f2);
  }
#pragma omp parallel num_threads(s.nt)
  {
    float *buf = chan ? chan + (size_t)omp_get_thread_num() * s.N * s.S : nullptr;
    const float *i1[NI1 ? NI1 : 1], *i2[NI2 ? NI2 : 1];
    float *o1[NO1 ? NO1 : 1], *o2[NO2 ? NO2 : 1];
#pragma omp for schedule(static)
    for (i64 c = 0; c < s.C; c++) {
      V p[(NP1 > NP2 ? NP1 : NP2) + 1];
      double a = 0., b = 0.;
      for (int j = 0; j < NP1; j++) p[j] = splat(par1[j][c]);
      V ua{}, va{};
      i64 since_flush = 0;
      for (i64 n = 0; n < s.N; n++) {  // float sums over 1024 elements or more, then double: short rows share a flush
        i64 base = (n * s.C + c) * s.S;
        for (int j = 0; j < NI1; j++) i1[j] = in1[j] + base;
        for (int j = 0; j < NO1; j++) o1[j] = out1[j] + base;
        if (buf) o1[NO1 - 1] = buf + n * s.S;
        row<NI1, NO1>(i1, o1, 0, s.S, p, f1, ua, va);
        if ((since_flush += s.S) >= 1024 || n == s.N - 1) { a += hsum(ua); b += hsum(va); ua = V{}; va = V{}; since_flush = 0; }
      }
      coef(c, a, b);
      for (int j = 0; j < NP2; j++) p[j] = splat(par2[j][c]);
      for (i64 n = 0; n < s.N; n++) {
        i64 base = (n * s.C + c) * s.S;
        for (int j = 0; j < NI2; j++) i2[j] = in2[j] + base;
        for (int j = 0; j < NO2; j++) o2[j] = out2[j] + base;
        if (buf) i2[NI2 - 1] = buf + n * s.S;
        row<NI2, NO2>(i2, o2, 0, s.S, p, f2, ua, va);
      }
    }
  }
}

// BatchNorm's training-mode statistics from per-channel sums of d = x − pivot and d²; k = invstd·weight. The pivot is one
// of the channel's own values, so E[d²] − E[d]² does not cancel where the mean is large against the spread (the float
// partial sums lose ~1e-7 of E[x²], which E[x]² − E[x²] would scale by (mean/std)²)
static inline void bn_stats(i64 c, double n, double sx, double sxx, float pivot, const float *w, float eps, float *mean,
                            float *var, float *invstd, float *k) {
  double m = sx / n, v = sxx / n - m * m;
  if (v < 0.) v = 0.;
  mean[c] = (float)(pivot + m); var[c] = (float)v; invstd[c] = (float)(1. / std::sqrt(v + eps));
  k[c] = invstd[c] * w[c];
}

// The backward pass's per-channel terms from Σg and Σg·x̂: the weight and bias gradients and their means
static inline void bn_grad_terms(i64 c, double n, double sg, double sgx, float *gw, float *gb, float *gm, float *gxm) {
  gb[c] = (float)sg; gw[c] = (float)sgx; gm[c] = (float)(sg / n); gxm[c] = (float)(sgx / n);
}

extern "C" {

// Each channel's first value (n = 0, first pixel), the pivot of its statistics
static std::vector<float> first_values(const float *x, const Shape &s) {
  std::vector<float> v(s.C);
  for (i64 c = 0; c < s.C; c++) v[c] = x[s.cl ? c : c * s.S];
  return v;
}

// z = bn(mish(y)) with batch statistics
void mish_bn_fwd(const float *y, const float *w, const float *b, float eps, float *z, float *mean, float *var,
                 float *invstd, i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  std::vector<float> k(C), pivot = first_values(y, s);
  for (auto &q : pivot) q = mish(splat(q))[0];
  float *kk = k.data(), *pv = pivot.data(); double n = (double)N * S;
  const float *in1[] = {y}, *par1[] = {pv}, *in2[] = {z}, *par2[] = {mean, kk, b}; float *out[] = {z};
  reduce_map<1, 1, 1, 1, 1, 3>(s, in1, out, par1, [](V *x, V *o, V *p, V &u, V &v) {
      V a = mish(x[0]), d = a - p[0]; o[0] = a; u = d; v = d * d; },
    [&](i64 c, double sx, double sxx) { bn_stats(c, n, sx, sxx, pv[c], w, eps, mean, var, invstd, kk); },
    in2, out, par2, [](V *x, V *o, V *p, V &, V &) { o[0] = (x[0] - p[0]) * p[1] + p[2]; });
}

// mish_bn_fwd's output again from its statistics: the same expression, so the same values
void mish_bn_apply(const float *y, const float *w, const float *b, const float *mean, const float *invstd, float *z,
                   i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  std::vector<float> k(C);
  for (i64 c = 0; c < C; c++) k[c] = invstd[c] * w[c];
  const float *in[] = {y}, *par[] = {mean, k.data(), b}; float *out[] = {z};
  map<1, 1, 3>(s, in, out, par, [](V *x, V *o, V *p, V &, V &) { o[0] = (mish(x[0]) - p[0]) * p[1] + p[2]; });
}

// Mish's derivative is computed once, in the first pass, and kept in gy (which the second pass overwrites) with x̂
// in `xhat`, a work array (channels_last: y's size; NCHW: nt × N·S floats): the second pass then needs no exp
void mish_bn_bwd(const float *g, const float *y, const float *w, const float *mean, const float *invstd, float *gy,
                 float *xhat, float *gw, float *gb, i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  std::vector<float> gm(C), gxm(C), k(C);
  for (i64 c = 0; c < C; c++) k[c] = invstd[c] * w[c];
  float *pm = gm.data(), *px = gxm.data(); double n = (double)N * S;
  const float *in1[] = {g, y}, *par1[] = {mean, invstd}, *in2[] = {g, gy, xhat}, *par2[] = {pm, px, k.data()};
  float *out1[] = {gy, xhat}, *out2[] = {gy};
  reduce_map<2, 2, 2, 3, 1, 3>(s, in1, out1, par1, [](V *x, V *o, V *p, V &u, V &v) {
      V m, d = mish_grad(x[1], m);
      V xh = (m - p[0]) * p[1];
      o[0] = d; o[1] = xh; u = x[0]; v = x[0] * xh; },
    [&](i64 c, double sg, double sgx) { bn_grad_terms(c, n, sg, sgx, gw, gb, pm, px); },
    in2, out2, par2, [](V *x, V *o, V *p, V &, V &) { o[0] = (x[0] - p[0] - x[2] * p[1]) * p[2] * x[1]; }, cl ? nullptr : xhat);
}

// out = mish(bn(x) + r) with batch statistics
void bn_add_mish_fwd(const float *x, const float *r, const float *w, const float *b, float eps, float *out, float *mean,
                     float *var, float *invstd, i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  std::vector<float> k(C), pivot = first_values(x, s);
  float *kk = k.data(), *pv = pivot.data(); double n = (double)N * S;
  const float *in1[] = {x}, *par1[] = {pv}, *in2[] = {x, r}, *par2[] = {mean, kk, b}; float *o[] = {out};
  reduce_map<1, 0, 1, 2, 1, 3>(s, in1, nullptr, par1, [](V *x, V *, V *p, V &u, V &v) { V d = x[0] - p[0]; u = d; v = d * d; },
    [&](i64 c, double sx, double sxx) { bn_stats(c, n, sx, sxx, pv[c], w, eps, mean, var, invstd, kk); },
    in2, o, par2, [](V *x, V *o, V *p, V &, V &) { o[0] = mish((x[0] - p[0]) * p[1] + p[2] + x[1]); });
}

void bn_add_mish_bwd(const float *g, const float *x, const float *r, const float *w, const float *b, const float *mean,
                     const float *invstd, float *gx, float *gs, float *gw, float *gb, i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  std::vector<float> gm(C), gxm(C), k(C);
  for (i64 c = 0; c < C; c++) k[c] = invstd[c] * w[c];
  float *pm = gm.data(), *px = gxm.data(); double n = (double)N * S;
  const float *in1[] = {g, x, r}, *par1[] = {mean, invstd, w, b}, *in2[] = {gs, x}, *par2[] = {mean, invstd, pm, px, k.data()};
  float *o1[] = {gs}, *o2[] = {gx};
  reduce_map<3, 1, 4, 2, 1, 5>(s, in1, o1, par1, [](V *x, V *o, V *p, V &u, V &v) {
      V xhat = (x[1] - p[0]) * p[1], m;
      V d = x[0] * mish_grad(xhat * p[2] + p[3] + x[2], m);
      o[0] = d; u = d; v = d * xhat; },
    [&](i64 c, double sg, double sgx) { bn_grad_terms(c, n, sg, sgx, gw, gb, pm, px); },
    in2, o2, par2, [](V *x, V *o, V *p, V &, V &) {
      V xhat = (x[1] - p[0]) * p[1];
      o[0] = (x[0] - p[2] - xhat * p[3]) * p[4]; });
}

// inference: mish(y)·scale + shift, and mish(x·scale + shift + r)
void mish_affine(const float *y, const float *scale, const float *shift, float *z, i64 N, i64 C, i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  const float *in[] = {y}, *par[] = {scale, shift}; float *out[] = {z};
  map<1, 1, 2>(s, in, out, par, [](V *x, V *o, V *p, V &, V &) { o[0] = mish(x[0]) * p[0] + p[1]; });
}

void affine_add_mish(const float *x, const float *scale, const float *shift, const float *r, float *out, i64 N, i64 C,
                     i64 S, int cl, int nt) {
  Shape s{N, C, S, cl, nt};
  const float *in[] = {x, r}, *par[] = {scale, shift}; float *o[] = {out};
  map<2, 1, 2>(s, in, o, par, [](V *x, V *o, V *p, V &, V &) { o[0] = mish(x[0] * p[0] + p[1] + x[1]); });
}


// inference through an eval-mode BatchNorm: its scale and shift from the running statistics, rounded as PyTorch's ops
// round them (1/√(var + eps), w·invstd, b − mean·scale: layers.py's _eval_affine), so one call does what five did
static void bn_eval_affine(const float *w, const float *b, const float *rm, const float *rv, float eps, i64 C,
                           std::vector<float> &scale, std::vector<float> &shift) {
  for (i64 c = 0; c < C; c++) {
    float invstd = 1.f / std::sqrt(rv[c] + eps);
    scale[c] = w[c] * invstd;
    shift[c] = b[c] - rm[c] * scale[c];
  }
}

void mish_bn_eval(const float *y, const float *w, const float *b, const float *rm, const float *rv, float eps, float *z,
                  i64 N, i64 C, i64 S, int cl, int nt) {
  std::vector<float> scale(C), shift(C);
  bn_eval_affine(w, b, rm, rv, eps, C, scale, shift);
  mish_affine(y, scale.data(), shift.data(), z, N, C, S, cl, nt);
}

void bn_eval_add_mish(const float *x, const float *w, const float *b, const float *rm, const float *rv, float eps,
                      const float *r, float *out, i64 N, i64 C, i64 S, int cl, int nt) {
  std::vector<float> scale(C), shift(C);
  bn_eval_affine(w, b, rm, rv, eps, C, scale, shift);
  affine_add_mish(x, scale.data(), shift.data(), r, out, N, C, S, cl, nt);
}

}
