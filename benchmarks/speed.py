"""Speed and memory of Res2NetPlus-50 against Res2Net-50d (ours and timm's), fastai's xresnet50 with Mish and
torchvision's resnet50, in one interleaved run. Every figure is also given as a ratio against resnet50 from the same
round, so that load on the machine affects all models alike; medians with min–max over the rounds.

    python benchmarks/speed.py                       # CPU: inference (batch 8, and batch 1: latency), training
                                                     # (NCHW and channels_last), memory, torch.compile
                                                     # (~45 min on 2 idle cores)
    python benchmarks/speed.py --quick               # smoke run: small sizes, 2 rounds, no compile (< 2 min)
    python benchmarks/speed.py --only train memory   # some sections: infer, latency, train, memory, compile,
                                                     # train_compiled
    python benchmarks/speed.py --device cuda         # GPU: AMP (bf16, else fp16), channels_last, bigger batches, img/s,
                                                     # and compiled training steps (train_compiled)

Rows: `res2netplus50` runs the fused Mish + BatchNorm kernels (the default), `res2netplus50 (reference)` the same
network on the straightforward modules (`fast_path('reference')`, the "before"), `res2netplus50 (no conv bias)`
(GPU training only) the same network with the conv biases that activation-before-BatchNorm brings removed, a
measurement of what they cost there (cuDNN adds a bias in a kernel of its own, and its gradient in another; the
package keeps them, the exact ImageNet weight transfer needs them), `res2netplus50 (deploy)` the
output of `fuse_for_inference` (inference only; it stays channels_last, so its NCHW row is NCHW input). Peak training
memory is measured in a fresh process per model: growth of the resident set (VmHWM after resetting it, glibc with a
fixed mmap threshold) on a CPU, `torch.cuda.max_memory_allocated` on a GPU, during the model's first training step
(gradients and optimizer state are allocated in it, the CPU baseline's method) and during a later step (activations
and gradients only, the stricter figure). The kernels are compiled beforehand on a copy, so compiling is not counted.
The compile section freezes the weights (`options={'freezing': True}`) as a deployed model would, and also gives its
figures against eager resnet50. Prints markdown tables and writes JSON to benchmarks/results/ (with --only, the
sections run replace theirs in the file and the others stay, each column with the command and date it came from).
"""
import argparse, json, os, platform, statistics, subprocess, sys, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')

BASE = 'resnet50'
TRAIN_MODELS = ['resnet50', 'res2netplus50', 'res2netplus50 (reference)', 'res2net50d (ours)', 'res2net50d (timm)',
                'xresnet50 Mish']
GPU_TRAIN_MODELS = TRAIN_MODELS + ['res2netplus50 (no conv bias)']
INFER_MODELS = TRAIN_MODELS + ['res2netplus50 (deploy)']
LATENCY_MODELS = ['resnet50', 'res2netplus50', 'res2netplus50 (reference)', 'res2netplus50 (deploy)',
                  'res2net50d (timm)']

def build(name):
    "Model `name` (random init, 1000 classes) and the fast path it runs on"
    import torch, timm, torchvision
    from res2netplus.models import res2netplus50, res2net50d
    if name == 'resnet50': return torchvision.models.resnet50(), 'compiled'
    if name.startswith('res2netplus50'):
        model = res2netplus50()
        if name.endswith('(no conv bias)'):
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d): m.bias = None
        return model, 'reference' if 'reference' in name else 'compiled'
    if name == 'res2net50d (ours)': return res2net50d(), 'compiled'
    if name == 'res2net50d (timm)': return timm.create_model('res2net50d'), 'compiled'
    if name == 'xresnet50 Mish':
        from fastai.vision.models.xresnet import xresnet50
        return xresnet50(act_cls=torch.nn.Mish), 'compiled'
    raise ValueError(f'unknown model {name!r}')

def settings(args):
    import torch
    cuda = args.device == 'cuda'
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    if args.quick:
        return dict(infer=(2, 64), latency=[(1, 64)], train=[(2, 64)], memory=(2, 64), rounds=2, iters=1, amp=amp)
    if cuda: return dict(infer=(256, 224), latency=[(1, 224), (16, 224)], train=[(128, 224), (256, 128)],
                         memory=(128, 224), rounds=args.rounds, iters=10, amp=amp)
    return dict(infer=(8, 224), latency=[(1, 224)], train=[(8, 224), (32, 128)], memory=(8, 224), rounds=args.rounds,
                iters=3, amp=None)

def sync(device):
    import torch
    if device == 'cuda': torch.cuda.synchronize()

class Runner:
    "One model prepared for one kind of measurement; `step()` runs it once"
    def __init__(self, name, kind, bs, size, device, channels_last, amp):
        import torch
        from res2netplus.fast import fast_path
        from res2netplus.deploy import fuse_for_inference
        self.name, self.device, self.amp = name, device, amp
        model, self.path = build(name)
        self.fast_path = fast_path
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (bs,), device=device)
        if name.endswith('(deploy)'):  # the deployment form stays channels_last, whatever layout its input has
            model = fuse_for_inference(model.to(device), channels_last=True, check_size=None)
        else: model = model.to(device).to(memory_format=fmt)
        self.model, self.kind = model, kind
        if kind == 'train':
            model.train()
            self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            self.scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
        else: model.eval()

    def _autocast(self):
        import torch
        return torch.autocast(self.device, dtype=self.amp, enabled=self.amp is not None)

    def step(self):
        import torch
        with self.fast_path(self.path):
            if self.kind == 'train':
                with self._autocast(): loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
                self.opt.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward(); self.scaler.step(self.opt); self.scaler.update()
            else:
                with torch.no_grad(), self._autocast(): self.model(self.x)

    def time(self, iters):
        "Median seconds per step over `iters` steps"
        times = []
        for _ in range(iters):
            sync(self.device); t = time.perf_counter(); self.step(); sync(self.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

def interleaved(runners, rounds, iters, warmup=2):
    "Per-round median step time of each runner, runners interleaved within every round"
    for r in runners:
        for _ in range(warmup): r.step()
    times = {r.name: [] for r in runners}
    for k in range(rounds):
        order = runners if k % 2 == 0 else runners[::-1]  # alternate so that no model always runs first
        for r in order: times[r.name].append(r.time(iters))
        print(f'  round {k+1}/{rounds} done', file=sys.stderr, flush=True)
    return times

def summarize(times, bs):
    "Median and min–max of times and of the per-round ratio against resnet50"
    base = times[BASE]
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        out[name] = dict(ms=statistics.median(ts) * 1e3, ms_min=min(ts) * 1e3, ms_max=max(ts) * 1e3,
                         ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         img_s=bs / statistics.median(ts))
    return out

def fmt_ratio(s): return f"**{s['ratio']:.2f}×** ({s['ratio_min']:.2f}–{s['ratio_max']:.2f})"
def fmt_ms(s): return f"{s['ms']:.0f} ({s['ms_min']:.0f}–{s['ms_max']:.0f})"

def table(title, columns, results, models, img_s=False):
    "Markdown table: one row per model, for each column the ratio vs resnet50 first, then ms (and img/s)"
    head = (['model'] + [f'{c} ratio' for c in columns] + [f"{c} {'MB' if 'memory' in c else 'ms'}" for c in columns]
            + ([f'{c} img/s' for c in columns] if img_s else []))
    lines = [f'\n### {title}\n', '| ' + ' | '.join(head) + ' |', '|---|' + '---:|' * (len(head) - 1)]
    for m in models:
        cells = [m]
        for part in ([fmt_ratio], [fmt_ms]) + (([lambda s: f"{s['img_s']:.1f}"],) if img_s else ()):
            cells += [part[0](results[c][m]) if m in results[c] else '—' for c in columns]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)

def infer_column(args, cfg, models, bs, size, channels_last):
    "One inference column: `models` at batch `bs`, `size` px, interleaved; its name and summary"
    col = f"infer b{bs}@{size} {'channels_last' if channels_last else 'NCHW'}"
    print(f'{col} …', file=sys.stderr, flush=True)
    runners = [Runner(m, 'infer', bs, size, args.device, channels_last, cfg['amp']) for m in models]
    return col, summarize(interleaved(runners, cfg['rounds'], cfg['iters'] + 2, warmup=1 if args.quick else 2), bs)

def run_infer(args, cfg):
    return dict(infer_column(args, cfg, INFER_MODELS, *cfg['infer'], cl) for cl in (False, True))

def run_latency(args, cfg):
    "Inference at small batches, channels_last: a GPU's time there goes to launching kernels more than to running them"
    return dict(infer_column(args, cfg, LATENCY_MODELS, bs, size, True) for bs, size in cfg['latency'])

def run_train(args, cfg):
    """Training steps, NCHW and channels_last on a CPU (channels_last only on a GPU). A channels_last column also times
    resnet50 in NCHW, the layout a user gets by default, and gives every model's ratio against it"""
    res = {}
    for bs, size in cfg['train']:
        for cl in ((True,) if args.device == 'cuda' else (False, True)):
            col = f"train b{bs}@{size}{' channels_last' if cl else ''}"
            print(f'{col} …', file=sys.stderr, flush=True)
            models = GPU_TRAIN_MODELS if args.device == 'cuda' else TRAIN_MODELS
            runners = [Runner(m, 'train', bs, size, args.device, cl, cfg['amp']) for m in models]
            if cl and args.device != 'cuda':
                nchw = Runner(BASE, 'train', bs, size, args.device, False, cfg['amp'])
                nchw.name = f'{BASE} NCHW'
                runners.append(nchw)
            times = interleaved(runners, cfg['rounds'], cfg['iters'], warmup=1 if args.quick else 2)
            res[col] = summarize(times, bs)
            if f'{BASE} NCHW' in times:
                for m, s in res[col].items():
                    base = times[f'{BASE} NCHW']
                    s[f'ratio vs {BASE} NCHW'] = statistics.median(t / b for t, b in zip(times[m], base))
            del runners
    return res

def _rss_kb():
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024

def _hwm_kb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmHWM'))

def _peak_growth_mb(device, step):
    "Peak memory growth (MB) while `step()` runs: resident set on a CPU (VmHWM reset first), allocator peak on a GPU"
    import torch
    if device == 'cuda':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        step(); torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kb()
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset VmHWM to the current RSS
        step(); return (_hwm_kb() - before) / 1024
    except OSError:
        import resource
        step(); return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024

def memory_child(args):
    """Run in a fresh process: peak memory growth (MB) of one model's first training step (gradients and optimizer
    state are allocated in it, as in the CPU baseline's method) and of a later step (activations only: the stricter)"""
    import copy, gc, torch
    torch.set_num_threads(args.threads)
    bs, size = map(int, args.memory_child[1:])
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    r = Runner(args.memory_child[0], 'train', bs, size, args.device, args.device == 'cuda', amp)
    warm = copy.copy(r)  # compile the kernels and warm the allocator on a copy at a small size: not part of the step
    warm.model = copy.deepcopy(r.model)
    warm.opt = torch.optim.SGD(warm.model.parameters(), lr=1e-3, momentum=0.9)
    warm.x, warm.y = r.x[:2, :, :64, :64].clone(), r.y[:2]
    warm.step(); warm.step()
    del warm; gc.collect()
    first = _peak_growth_mb(args.device, r.step)
    r.step()
    r.opt.zero_grad(set_to_none=True); gc.collect()
    later = _peak_growth_mb(args.device, r.step)
    print(json.dumps(dict(model=r.name, peak_mb=later, first_step_mb=first)))

def run_memory(args, cfg):
    bs, size = cfg['memory']
    cols = {'peak_mb': f'train memory b{bs}@{size}', 'first_step_mb': f'train memory b{bs}@{size}, first step'}
    print(f"{cols['peak_mb']} …", file=sys.stderr, flush=True)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    amp = {None: 'none'}.get(cfg['amp'], 'bf16' if 'bfloat' in str(cfg['amp']) else 'fp16')
    peaks = {k: {m: [] for m in TRAIN_MODELS} for k in cols}
    for _ in range(1 if args.quick or args.device == 'cuda' else 3):  # the CUDA allocator's peak does not vary
        for m in TRAIN_MODELS:
            cmd = [sys.executable, __file__, '--device', args.device, '--threads', str(args.threads), '--amp', amp,
                   '--memory-child', m, str(bs), str(size)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode: sys.exit(f'memory run of {m} failed:\n{out.stderr[-2000:]}')
            got = json.loads(out.stdout.strip().splitlines()[-1])
            for k in cols: peaks[k][m].append(got[k])
    res = {}
    for k, col in cols.items():
        res[col] = {}
        for m, ps in peaks[k].items():
            ratios = [p / b for p, b in zip(ps, peaks[k][BASE])]
            res[col][m] = dict(ms=statistics.median(ps), ms_min=min(ps), ms_max=max(ps),
                               ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                               img_s=float('nan'))
    return res

def run_compile(args, cfg):
    """torch.compile (inductor, with `freezing`: weights are constants, as a deployed model's are) of the inference
    models, channels_last, their graph breaks, and every figure also against eager resnet50 (NCHW and channels_last)"""
    import torch
    bs, size = cfg['infer']
    col = f'compiled infer b{bs}@{size} channels_last'
    print(f'{col} (compiling takes minutes) …', file=sys.stderr, flush=True)
    names = ['resnet50', 'res2net50d (ours)', 'res2netplus50', 'res2netplus50 (deploy)']
    runners, breaks = [], {}
    for m in names:
        r = Runner(m, 'infer', bs, size, args.device, True, cfg['amp'])
        with torch.no_grad(): breaks[m] = torch._dynamo.explain(r.model)(r.x).graph_break_count
        torch._dynamo.reset()
        r.model = torch.compile(r.model, options={'freezing': True})
        runners.append(r)
    eagers = []
    for cl in (False, True):
        r = Runner('resnet50', 'infer', bs, size, args.device, cl, cfg['amp'])
        r.name = f"resnet50 eager {'channels_last' if cl else 'NCHW'}"
        eagers.append(r)
    times = interleaved(runners + eagers, cfg['rounds'], cfg['iters'] + 2, warmup=1)
    res = summarize(times, bs)
    for m in names:
        res[m]['graph_breaks'] = breaks[m]
        for e in eagers:
            res[m][f'ratio vs {e.name}'] = statistics.median(t / b for t, b in zip(times[m], times[e.name]))
    return {col: res}

def run_train_compiled(args, cfg):
    """torch.compile (inductor) of whole training steps' models, as a GPU user would train; ratios against compiled
    resnet50"""
    import torch
    bs, size = cfg['train'][0]
    cl = args.device == 'cuda'
    col = f"compiled train b{bs}@{size}{' channels_last' if cl else ''}"
    print(f'{col} (compiling takes minutes) …', file=sys.stderr, flush=True)
    runners = []
    for m in ['resnet50', 'res2net50d (timm)', 'res2net50d (ours)', 'res2netplus50']:
        r = Runner(m, 'train', bs, size, args.device, cl, cfg['amp'])
        torch._dynamo.reset()
        r.model = torch.compile(r.model)
        runners.append(r)
    return {col: summarize(interleaved(runners, cfg['rounds'], cfg['iters'], warmup=2), bs)}

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--quick', action='store_true', help='small sizes, 2 rounds, no compile: a smoke run')
    p.add_argument('--only', nargs='+', choices=['infer', 'latency', 'train', 'memory', 'compile', 'train_compiled'])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--threads', type=int, default=2, help='torch threads on a CPU (default 2)')
    p.add_argument('--memory-child', nargs=3, help=argparse.SUPPRESS)
    p.add_argument('--amp', default='none', help=argparse.SUPPRESS)
    p.add_argument('--out', default=str(Path(__file__).parent/'results'))
    args = p.parse_args()
    if args.memory_child: return memory_child(args)
    import torch, timm, torchvision, fastai
    torch.set_num_threads(args.threads)
    if args.device == 'cuda': torch.backends.cudnn.benchmark = True
    cfg = settings(args)
    sections = args.only or (['infer', 'latency', 'train', 'memory'] + ([] if args.quick else ['compile'])
                             + (['train_compiled'] if args.device == 'cuda' and not args.quick else []))
    start = time.time()
    results = {}
    for s in sections: results.update(globals()[f'run_{s}'](args, cfg))
    cpu = f'{platform.processor() or platform.machine()}, {args.threads} threads'
    dev = torch.cuda.get_device_name() if args.device == 'cuda' else cpu
    precision = 'AMP ' + str(cfg['amp']).split('.')[-1] if cfg['amp'] else 'float32'
    print(f"# Speed and memory vs torchvision resnet50 (ratios: lower is better)\n\n{dev}; torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, timm {timm.__version__}, fastai {fastai.__version__}; "
          f"{precision}; {cfg['rounds']} interleaved rounds; "
          f"{time.time() - start:.0f} s; command: python benchmarks/speed.py {' '.join(sys.argv[1:])}")
    img_s = args.device == 'cuda'
    for title, pick in (('Inference (eval)', 'infer b'), ('Training step (forward + backward + SGD)', 'train b'),
                        ('Peak memory of a training step (MB)', 'train memory'), ('torch.compile', 'compiled infer'),
                        ('torch.compile, training step', 'compiled train')):
        cols = [c for c in results if c.startswith(pick)]
        if not cols: continue
        models = list(dict.fromkeys(m for c in cols for m in results[c]))
        print(table(title, cols, results, models, img_s=img_s and 'memory' not in pick))
        for c in cols:
            against = {m: st[f'ratio vs {BASE} NCHW'] for m, st in results[c].items() if f'ratio vs {BASE} NCHW' in st}
            if against and pick == 'train b':
                print(f'\n{c}, against {BASE} NCHW: ' + ', '.join(f'{m} {r:.2f}×' for m, r in against.items()))
        if pick == 'compiled infer':
            for c in cols:
                compiled = {m: s for m, s in results[c].items() if 'graph_breaks' in s}
                print('\ngraph breaks: ' + ', '.join(f"{m} {s['graph_breaks']}" for m, s in compiled.items()))
                for e in ('NCHW', 'channels_last'):
                    ratios = ', '.join(f"{m} {s[f'ratio vs resnet50 eager {e}']:.2f}×" for m, s in compiled.items())
                    print(f'compiled, against eager resnet50 {e}: ' + ratios)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    path = out/f"speed-{args.device}{'-quick' if args.quick else ''}.json"
    command = f"python benchmarks/speed.py {' '.join(sys.argv[1:])}".strip()
    # --only: replace those sections, keep the rest
    saved = json.loads(path.read_text()) if args.only and path.exists() else {}
    if saved.get('device') != dev: saved = {}
    merged = {**saved.get('results', {}), **results}
    ran = {col: dict(command=command, date=time.strftime('%Y-%m-%d')) for col in results}
    sources = {**saved.get('sources', {}), **ran}
    path.write_text(json.dumps(dict(device=dev, torch=torch.__version__, results=merged, sources=sources), indent=1))

if __name__ == '__main__': main()
