"The fused Mish + BatchNorm paths (`'compiled'`, `'aten'`) against the straightforward modules (`'reference'`)"
import copy, gc, os, subprocess, sys, warnings, weakref
import pytest, torch
from torch import nn
from res2netplus.layers import Bottle2neck
from res2netplus.fast import kernels, gpu, dispatch, recompute, functions, blocks
from res2netplus.fast import fast_path, FastBottle2neck
from res2netplus.models import res2netplus50, res2net50d
from conftest import randomize_bn

def run(model, x, path, train=True, seed=0):
    "Output, input gradient, parameter gradients and buffers of a copy of `model` after one step on `path`"
    m = copy.deepcopy(model).train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    with fast_path(path): out = m(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return dict(out=out.detach(), grad_x=x.grad, **{f'grad {n}': p.grad for n, p in m.named_parameters()},
                **{f'buffer {n}': b.float() for n, b in m.named_buffers()})

def assert_same(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        scale = max(b[k].abs().max().item(), 1e-3)
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= rtol * scale + atol, f'{k}: {diff:.2e} (scale {scale:.2e})'

def to_channels_last(x, model):
    "`x` and a copy of `model` in channels_last"
    return x.to(memory_format=torch.channels_last), copy.deepcopy(model).to(memory_format=torch.channels_last)

@pytest.fixture(scope='module')
def plus():
    torch.manual_seed(0)
    return randomize_bn(res2netplus50(n_out=7))  # bn3 gammas > 0: the residual branches matter

def plain_twin(model):
    "The same network built from the plain modules of `res2netplus.layers` (`fast=False`), with `model`'s weights"
    arch = res2netplus50 if hasattr(model, 'stem1') else res2net50d
    twin = arch(n_out=model.num_classes, fast=False)
    twin.load_state_dict(model.state_dict())
    return twin

@pytest.mark.parametrize('arch', [res2netplus50, res2net50d])
def test_fast_and_plain_models_hold_the_same_modules(arch):
    "Built fast (the default) or plain: the same state_dict keys, and blocks that are `Bottle2neck`s either way"
    fast, plain = arch(n_out=3), arch(n_out=3, fast=False)
    assert list(fast.state_dict()) == list(plain.state_dict())
    blocks_of = lambda m: [type(b) for b in m.modules() if isinstance(b, Bottle2neck)]
    assert set(blocks_of(fast)) == {FastBottle2neck} and set(blocks_of(plain)) == {Bottle2neck}
    assert len(blocks_of(fast)) == len(blocks_of(plain)) == 16
    if arch is res2netplus50:
        assert (type(fast.stem1).__name__, type(plain.stem1).__name__) == ('ConvActNorm', 'ConvLayer')

@pytest.mark.parametrize('arch', ['plus', 'plain'])
@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('train', [True, False])
def test_fast_modules_give_the_plain_modules_results(plus, arch, channels_last, train):
    """The contract between the two paths: the fast modules and the plain ones on the same weights give the same
    outputs, gradients and BatchNorm buffers (training, and eval mode with gradients), Plus and classic ordering"""
    torch.manual_seed(0)
    m = plus if arch == 'plus' else randomize_bn(res2net50d(n_out=7))
    x = torch.randn(2, 3, 64, 64)
    if channels_last: x, m = to_channels_last(x, m)
    plain = plain_twin(m).to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    want = run(plain, x, 'compiled', train=train)
    for path in ('aten', 'compiled'): assert_same(run(m, x, path, train=train), want)
    got = run(m, x, 'reference', train=train)  # the reference path is the plain modules, bit for bit
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])][:5]
    with torch.no_grad(): out, ref = copy.deepcopy(m).eval()(x), plain.eval()(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()

def test_pickles_that_name_the_old_layers_paths_load_with_the_same_outputs():
    """A pickle made before the speed path moved names `res2netplus.layers.Bottle2neck`, `.ConvActNorm` and
    `.MaxPool2d`: it loads (the blocks as plain `Bottle2neck`s, the stem as the fast modules) with the same outputs"""
    import pickle
    m = randomize_bn(res2netplus50(n_out=3, layers=(1, 1, 1, 1))).eval()
    old = pickle.dumps(m, protocol=0)  # protocol 0 names classes as text lines, which can be renamed in place
    for new_path, old_path in ((b'res2netplus.fast.blocks\nFastBottle2neck', b'res2netplus.layers\nBottle2neck'),
                               (b'res2netplus.fast.blocks\nConvActNorm', b'res2netplus.layers\nConvActNorm'),
                               (b'res2netplus.fast.blocks\nMaxPool2d', b'res2netplus.layers\nMaxPool2d')):
        assert new_path in old
        old = old.replace(new_path, old_path)
    loaded = pickle.loads(old)
    assert type(loaded.layer1[0]) is Bottle2neck and type(loaded.stem1) is blocks.ConvActNorm
    assert type(loaded.maxpool) is blocks.MaxPool2d
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert (loaded(x) - m(x)).abs().max() <= 1e-5

@pytest.mark.parametrize('path', ['aten', 'compiled'])
@pytest.mark.parametrize('channels_last', [False, True])
def test_training_step_equals_reference(plus, path, channels_last):
    x = torch.randn(2, 3, 64, 64)
    m = plus
    if channels_last: x, m = to_channels_last(x, plus)
    assert_same(run(m, x, path), run(m, x, 'reference'))

def test_running_stats_over_steps_and_momentum_none(plus):
    "Several steps (running averages compound), and BatchNorm's cumulative average (momentum=None)"
    m = copy.deepcopy(plus)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d) and b.num_features % 2: b.momentum = None
    states = {}
    for path in ('reference', 'compiled'):
        mm = copy.deepcopy(m).train()
        with fast_path(path):
            for i in range(3): mm(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)))
        states[path] = {k: v.float() for k, v in mm.state_dict().items()}
    assert_same(states['compiled'], states['reference'])

def test_eval_kernels_equal_reference(plus):
    x = torch.randn(2, 3, 64, 64)
    m = copy.deepcopy(plus).eval()
    with torch.no_grad():
        with fast_path('reference'): ref = m(x)
        with fast_path('compiled'): out = m(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    # eval mode with gradients (frozen BatchNorm fine-tuning) keeps the reference modules
    assert_same(run(m, x, 'compiled', train=False), run(m, x, 'reference', train=False))

def test_drop_path_is_reference_and_seeded():
    torch.manual_seed(0)
    m = randomize_bn(res2netplus50(n_out=3, drop_path_rate=0.3))
    x = torch.randn(2, 3, 64, 64)
    assert_same(run(m, x, 'compiled', seed=1), run(m, x, 'reference', seed=1))

def test_plain_variants_do_not_change():
    torch.manual_seed(0)
    m = randomize_bn(res2net50d(n_out=3))
    x = torch.randn(2, 3, 64, 64)
    a, b = run(m, x, 'compiled'), run(m, x, 'reference')
    assert all(torch.equal(a[k], b[k]) for k in a)

def saved_bytes(fn):
    "Bytes of distinct tensor storages autograd saves for the backward pass while running `fn`"
    seen = {}
    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t): out = fn()
    return sum(seen.values()), out

def test_fused_path_saves_less_for_backward():
    torch.manual_seed(0)
    block = FastBottle2neck(256, 64, act_cls=nn.Mish, bn_1st=False).train()
    x = torch.randn(4, 256, 16, 16, requires_grad=True)
    sizes = {}
    for path in ('reference', 'aten', 'compiled'):
        with fast_path(path): sizes[path], _ = saved_bytes(lambda: block(x))
    # reference: per act→BN the conv output, the Mish output and the BN output; fused: no Mish output, no sum at the
    # end
    assert sizes['aten'] == sizes['compiled'] <= 0.8 * sizes['reference']

def test_hooks_see_every_module():
    m = FastBottle2neck(256, 64, act_cls=nn.Mish, bn_1st=False)
    seen = []
    m.bn1.register_forward_hook(lambda *a: seen.append('bn1'))
    m(torch.randn(2, 256, 8, 8))
    assert seen == ['bn1']

def test_falls_back_when_the_kernels_cannot_be_built(monkeypatch, plus):
    def broken(*a): raise RuntimeError('no compiler here')
    monkeypatch.setattr(kernels, 'build_kernels', broken)
    monkeypatch.setitem(kernels._fast, 'failed', None)
    monkeypatch.setitem(kernels._fast, 'lib', None)
    x = torch.randn(2, 3, 64, 64)
    with pytest.warns(UserWarning, match='could not build'): out = run(plus, x, 'compiled')
    assert isinstance(kernels._fast['failed'], RuntimeError)
    assert_same(out, run(plus, x, 'reference'))

def test_bad_path_says_what_is_allowed():
    with pytest.raises(ValueError, match="one of"): kernels.set_fast_path('fastest')

@pytest.mark.parametrize('path', ['compiled', 'aten'])
def test_fastai_tensor_subclasses_give_the_reference_result(plus, path):
    "fastai hands the model TensorImage batches: training and inference on them equal the reference on plain tensors"
    from fastai.torch_core import TensorImage
    x = torch.randn(2, 3, 64, 64)
    assert_same(run(plus, TensorImage(x), path), run(plus, x, 'reference'))
    m = copy.deepcopy(plus).eval()
    with torch.no_grad(), fast_path(path): got = m(TensorImage(x))
    with torch.no_grad(), fast_path('reference'): want = m(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

@pytest.mark.parametrize('train', [True, False])
def test_under_torch_compile_mish_is_the_one_exp_formula(train):
    "torch.compile traces Mish as one exp (its own F.mish lowers to exp, log1p and tanh), with the reference's results"
    torch.manual_seed(0)
    block = randomize_bn(nn.Sequential(*[FastBottle2neck(256, 64, act_cls=nn.Mish, bn_1st=False) for _ in range(2)]))
    x = torch.randn(2, 256, 8, 8)
    with fast_path('compiled'): graph = torch._dynamo.explain(copy.deepcopy(block).train(train))(x).graphs[0]
    code = graph.code
    assert 'mish' not in code and 'exp' in code, code[:2000]
    torch._dynamo.reset()
    model = copy.deepcopy(block).train(train)
    xx = x.clone().requires_grad_()
    with fast_path('compiled'): out = torch.compile(model)(xx)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    got = dict(out=out.detach(), grad_x=xx.grad, **{f'grad {n}': p.grad for n, p in model.named_parameters()},
               **{f'buffer {n}': b.float() for n, b in model.named_buffers()})
    # inductor reorders the sums: gradients near 0 are rounding noise
    assert_same(got, run(block, x, 'reference', train=train), atol=2e-5)

def test_a_folded_batchnorms_identity_runs_fused_in_either_mode(monkeypatch):
    "A BatchNorm folded away by hand leaves an Identity in whatever mode: without gradients Mish still runs fused"
    calls = []
    monkeypatch.setattr(nn.Mish, 'forward', lambda self, x: calls.append(1) or torch.nn.functional.mish(x))
    y = torch.randn(2, 8, 5, 5)
    for training in (True, False):
        with torch.no_grad(), fast_path('compiled'): out = blocks.act_norm(nn.Mish(), nn.Identity().train(training), y)
        if kernels._fast['failed'] is not None:
            pytest.skip(f"this machine cannot compile the fused kernels: {kernels._fast['failed']}")
        assert calls == [] and (out - torch.nn.functional.mish(y)).abs().max() <= 1e-6

def keep_all():
    "Saved-tensor hooks of a user's own (identity ones): the package then leaves autograd to keep every saved tensor"
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

def activation_bytes(model, fn, monkeypatch=None):
    """Bytes of distinct activation storages (parameters left out) autograd keeps while `fn` runs, and how many saved
    tensors were seen: with `monkeypatch`, through the package's own hooks (a recipe costs nothing); without, everything
    (a user's hooks switch the package's off)"""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, calls = {}, []
    def note(t):
        calls.append(1)
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    if monkeypatch is None:
        with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t): fn()
    else:
        pack = recompute._pack
        monkeypatch.setattr(recompute, '_pack', lambda t: note(pack(t)))
        fn()
    return sum(seen.values()), len(calls)

def test_rebuilt_activations_cut_what_training_keeps(plus, monkeypatch):
    """Mish + BatchNorm outputs, the splits and their sums are rebuilt in the backward pass, not kept (each block's
    concatenation is)"""
    m = copy.deepcopy(plus).train()
    x = torch.randn(2, 3, 64, 64)
    kept_all, n_all = activation_bytes(m, lambda: m(x))
    kept, n = activation_bytes(m, lambda: m(x), monkeypatch)
    assert n >= 0.9 * n_all  # the package's hooks saw (nearly) every saved tensor: all but the classifier head's
    assert kept <= 0.83 * kept_all, (kept, kept_all)  # 0.81 here; 0.74 when the concatenation was rebuilt too

@pytest.mark.parametrize('channels_last', [False, True])
def test_rebuilt_activations_give_the_kept_ones_gradients(plus, channels_last):
    x = torch.randn(2, 3, 64, 64)
    m = plus
    if channels_last: x, m = to_channels_last(x, plus)
    lean = run(m, x, 'compiled')
    with keep_all(): kept = run(m, x, 'compiled')
    assert all(torch.equal(lean[k], kept[k]) for k in kept), [k for k in kept if not torch.equal(lean[k], kept[k])][:5]
    lean = run(m, x, 'aten')
    with keep_all(): assert_same(lean, run(m, x, 'aten'))

def test_rebuilt_activations_serve_a_retained_graph_twice(plus):
    m = copy.deepcopy(plus).train()
    x = torch.randn(2, 3, 64, 64)
    out = m(x).square().sum()
    first = torch.autograd.grad(out, list(m.parameters()), retain_graph=True)
    second = torch.autograd.grad(out, list(m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))

@pytest.mark.parametrize('path', ['aten', 'compiled'])
@pytest.mark.parametrize('backward', ['none', 'head only'])
@pytest.mark.parametrize('arch', ['plus', 'plain'])
def test_a_graph_with_no_full_backward_pass_is_freed(plus, path, backward, arch):
    """Training-mode outputs dropped without a backward pass through the blocks (a skipped step, an error, a gradient of
    the head only) free the graph"""
    # plain: ReLU, whose saved output once held its node
    m = copy.deepcopy(plus).train() if arch == 'plus' else res2net50d(n_out=7).train()
    kept = []
    class Witness: pass
    def watch(mod, inp, out):  # an object that lives exactly as long as conv3's graph node
        w = Witness()
        kept.append(weakref.ref(w))
        out.grad_fn.register_hook(lambda *grads, w=w: None)
    for block in (m.layer1[0], m.layer1[1]):  # a first block (pooled last split) and a plain one (split sums)
        block.conv3.register_forward_hook(watch)
    with fast_path(path):
        out = m(torch.randn(2, 3, 64, 64)).sum()
        if backward == 'head only': torch.autograd.grad(out, list(m.fc.parameters()))
    assert len(kept) == 2 and all(r() is not None for r in kept)
    del out
    gc.collect()
    assert all(r() is None for r in kept), 'the graph (and every activation it keeps) outlived its output'

@pytest.mark.parametrize('path', ['aten', 'compiled'])
def test_second_derivatives_raise_an_error_that_names_the_fix(plus, path):
    """create_graph=True gives the usual first derivatives; differentiating them again says to use the reference path,
    which works"""
    m, x = copy.deepcopy(plus).train(), torch.randn(2, 3, 64, 64)
    def input_grad(create_graph):
        xi = x.clone().requires_grad_()
        return torch.autograd.grad(m(xi).square().sum(), xi, create_graph=create_graph)[0]
    fix = r"first derivatives only.*fast_path\('reference'\)"
    with fast_path(path):
        g = input_grad(True)
        torch.testing.assert_close(g, input_grad(False), rtol=1e-5, atol=1e-8)
        with pytest.raises(RuntimeError, match=fix): g.square().sum().backward()  # a gradient penalty
        grads = torch.autograd.grad(m(x).square().sum(), list(m.parameters()), create_graph=True)
        with pytest.raises(RuntimeError, match=fix):  # MAML's outer step
            sum(gw.square().sum() for gw in grads).backward()
    with fast_path('reference'):
        m.zero_grad()
        input_grad(True).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.layer1.parameters())

def test_in_place_changes_give_the_reference_gradients_or_its_error(plus):
    "autograd skips its in-place check under saved-tensor hooks: the package's hooks check versions themselves"
    x = torch.randn(2, 3, 64, 64)
    def grads_with(path, setup=None, between=None):
        m = copy.deepcopy(plus).train()
        if setup: setup(m)
        with fast_path(path):
            out = m(x)
            if between: between(m)  # between the forward and the backward pass
            out.square().sum().backward()
        return {n: p.grad for n, p in m.named_parameters()}
    # a pre-hook on conv3 scales the kept concatenation that the split outputs are rebuilt from
    def scale_cat(m):
        def hook(mod, inp): inp[0].mul_(1.5)
        m.layer2[1].conv3.register_forward_pre_hook(hook)
    assert_same(grads_with('compiled', setup=scale_cat), grads_with('reference', setup=scale_cat))
    # BatchNorm's backward pass does not read the bias, so changing it before backward is legal
    def new_bias(m):  # as an optimizer step does
        with torch.no_grad():
            for bn in (m.layer2[1].bns[0], m.layer2[1].bn3, m.stem1[2]): bn.bias.add_(0.3)
    assert_same(grads_with('compiled', between=new_bias), grads_with('reference', between=new_bias))
    # it reads the weight, and a block's last BatchNorm + Mish keeps the block's input: autograd's error, as in the
    # reference
    def new_weight(m):
        with torch.no_grad(): m.layer2[1].bns[0].weight.mul_(2)
    def input_changed(m):
        def hook(mod, inp, out): inp[0].mul_(2)
        m.layer2[1].register_forward_hook(hook)
    for path in ('reference', 'compiled'):
        with pytest.raises(RuntimeError, match='modified by an inplace operation'): grads_with(path, between=new_weight)
        with pytest.raises(RuntimeError, match='modified by an inplace operation'):
            grads_with(path, setup=input_changed)

def test_running_stats_are_left_alone_when_not_tracked(plus):
    "track_running_stats=False with the buffers kept (freezing them): no path updates them"
    m = copy.deepcopy(plus).train()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d): bn.track_running_stats = False
    before = {n: b.clone() for n, b in m.named_buffers()}
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(torch.equal(b, before[n]) for n, b in m.named_buffers())

def test_modules_that_compute_something_else_or_are_hooked_are_run_as_they_are(plus):
    "A Mish or BatchNorm2d subclass with its own forward, and backward or global module hooks, get the reference path"
    class ClampedMish(nn.Mish):
        def forward(self, x): return super().forward(x).clamp(max=1.)
    m = copy.deepcopy(plus)
    for block in m.layer1: block.act = ClampedMish()
    x = torch.randn(2, 3, 64, 64)
    assert_same(run(m, x, 'compiled'), run(m, x, 'reference'))
    fired = []
    m = copy.deepcopy(plus).train()
    m.layer2[1].bns[0].register_full_backward_hook(lambda mod, gin, gout: fired.append('bn'))
    m(x).sum().backward()
    assert fired == ['bn']
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: seen.add(type(mod).__name__))
    try: m(x)
    finally: handle.remove()
    assert {'Mish', 'BatchNorm2d'} <= seen

def test_a_float64_default_dtype_and_torch_func_give_the_reference_result(plus):
    m, x = copy.deepcopy(plus), torch.randn(2, 3, 64, 64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try: fused, ref = run(m, x, 'compiled'), run(m, x, 'reference')
    finally: torch.set_default_dtype(old)
    assert_same(fused, ref)
    m.eval()
    f = lambda xi: m(xi[None]).square().sum()
    saliency = torch.func.vmap(torch.func.grad(f))(x)
    with fast_path('reference'): ref = torch.func.vmap(torch.func.grad(f))(x)
    torch.testing.assert_close(saliency, ref)

def test_users_saved_tensor_hooks_and_checkpointing_are_left_alone(plus, monkeypatch):
    from torch.utils.checkpoint import checkpoint
    m, x = copy.deepcopy(plus), torch.randn(2, 3, 64, 64)
    ref = run(m, x, 'compiled')
    calls = []
    pack = recompute._pack
    monkeypatch.setattr(recompute, '_pack', lambda t: calls.append(1) or pack(t))
    with torch.autograd.graph.save_on_cpu(): offloaded = run(m, x, 'compiled')
    assert not calls and all(torch.equal(offloaded[k], ref[k]) for k in ref)

    class Checkpointed(nn.Module):  # layer1 under torch.utils.checkpoint: its forward runs again in the backward pass
        def __init__(self, net):
            super().__init__(); self.net = net
        def forward(self, x):
            for name, child in self.net.named_children():
                x = checkpoint(child, x, use_reentrant=False) if name == 'layer1' else child(x)
            return x
    got = run(Checkpointed(m), x, 'compiled')  # (BatchNorm buffers differ: a checkpointed forward updates them twice)
    assert_same({k: v for k, v in got.items() if not k.startswith('buffer')},
                {k.replace('grad ', 'grad net.'): v for k, v in ref.items() if not k.startswith('buffer')})

def _reference_kernel(name, *a):
    "Each fused kernel written with PyTorch's own ops (float64), to compare against"
    a = [t.double() if isinstance(t, torch.Tensor) else t for t in a]
    v = functions._vec
    def mish(y): return torch.nn.functional.mish(y)
    def stats(x):
        var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
        return mean, var
    if name == 'mish_bn_fwd':
        y, w, b, eps = a
        m = mish(y); mean, var = stats(m); inv = torch.rsqrt(var + eps)
        return (m - v(mean)) * v(inv * w) + v(b), mean, var, inv
    if name == 'mish_bn_apply':
        y, w, b, mean, inv = a
        return (mish(y) - v(mean)) * v(inv * w) + v(b)
    if name == 'bn_add_mish_fwd':
        x, r, w, b, eps = a
        mean, var = stats(x); inv = torch.rsqrt(var + eps)
        return mish((x - v(mean)) * v(inv * w) + v(b) + r), mean, var, inv
    if name == 'mish_affine':
        y, scale, shift = a
        return mish(y) * v(scale) + v(shift)
    if name == 'affine_add_mish':
        x, scale, shift, r = a
        return mish(x * v(scale) + v(shift) + r)
    if name in ('mish_bn_eval', 'bn_eval_add_mish'):  # an eval-mode BatchNorm: running statistics
        x, w, b, rm, rv, eps = a[:6]
        x = (mish(x) - v(rm)) if name == 'mish_bn_eval' else (x - v(rm))
        out = x * v(torch.rsqrt(rv + eps) * w) + v(b)
        return out if name == 'mish_bn_eval' else mish(out + a[6])
    # backward kernels: autograd through the forward expression, batch statistics included (training-mode BatchNorm);
    # the statistics the kernels are given are the forward pass's, so these recompute the same ones
    if name == 'mish_bn_bwd':
        g, y, w, _, _ = a
        y, w, b = y.clone().requires_grad_(), w.clone().requires_grad_(), torch.zeros_like(w, requires_grad=True)
        m = mish(y); mu, var = stats(m)
        z = (m - v(mu)) * v(torch.rsqrt(var + 1e-5) * w) + v(b)
        return torch.autograd.grad(z, (y, w, b), g)
    if name == 'bn_add_mish_bwd':
        g, x, r, w, b, _, _ = a
        x, r, w, b = [t.clone().requires_grad_() for t in (x, r, w, b)]
        mu, var = stats(x)
        out = mish((x - v(mu)) * v(torch.rsqrt(var + 1e-5) * w) + v(b) + r)
        gx, gr, gw, gb = torch.autograd.grad(out, (x, r, w, b), g)
        return gx, gr, gw, gb
    raise KeyError(name)

def needs_kernels():
    "Skip a test of the C++ kernels where this machine cannot build them"
    if kernels._kernels() is None:
        pytest.skip(f"this machine cannot build the fused kernels: {kernels._fast['failed']}")

@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('shape', [(2, 7, 5, 3), (3, 26, 4, 4), (2, 40, 9, 9), (2, 3, 1, 1), (2, 16, 8, 8)])
def test_each_kernel_equals_pytorch(shape, channels_last):
    "Every fused kernel against PyTorch's ops in float64, on sizes with partial vectors (channels, rows), both layouts"
    needs_kernels()
    check_each_kernel(shape, channels_last)

@pytest.mark.parametrize('channels_last', [False, True])
def test_batch_statistics_stay_exact_when_the_mean_dwarfs_the_spread(channels_last):
    """E[x²] − E[x]² from float sums loses the variance where |mean|/std is large (a conv bias of 1000, raw pixels):
    the kernels shift by a pivot"""
    needs_kernels()
    g = torch.Generator().manual_seed(0)
    shift = torch.tensor([1000., 300., 30., 0.])[None, :, None, None]
    x = torch.randn(4, 4, 24, 24, generator=g) * torch.tensor([1., 0.1, 0.01, 1.])[None, :, None, None] + shift
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    if channels_last: x = x.contiguous(memory_format=torch.channels_last)
    for name in ('mish_bn_fwd', 'bn_add_mish_fwd'):
        args = (x, w, b, 1e-5) if name == 'mish_bn_fwd' else (x, torch.zeros_like(x), w, b, 1e-5)
        out, mean, var, _ = kernels._run_kernel(name, *args)
        ref_out, ref_mean, ref_var, _ = _reference_kernel(name, *args)
        torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0)  # it was 23 % off at |mean|/std = 3000
        torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)

def _cpu_flags() -> set:
    try:
        with open('/proc/cpuinfo') as f: return set(next((l for l in f if l.startswith('flags')), '').split())
    except OSError: return set()

# the kernels' code paths besides AVX-512: plain vector code (division, no FMA) and AVX2's reciprocal estimate with FMA
OTHER_ISAS = {'x86-64 (no AVX)': (['-O3', '-march=x86-64'], set()),
              'AVX2 + FMA': (['-O3', '-march=haswell'], {'avx2', 'fma'})}

@pytest.mark.parametrize('isa', OTHER_ISAS)
def test_kernels_built_for_other_instruction_sets_equal_pytorch(isa, tmp_path, monkeypatch):
    import platform
    flags, needs = OTHER_ISAS[isa]
    if platform.machine() not in ('x86_64', 'AMD64'): pytest.skip('an x86 build')
    if not needs <= _cpu_flags(): pytest.skip(f'this CPU lacks {needs - _cpu_flags()}')
    needs_kernels()
    monkeypatch.setenv('RES2NETPLUS_HOME', str(tmp_path))
    monkeypatch.setattr(kernels, '_BUILD_FLAGS', (flags,))
    monkeypatch.setitem(kernels._fast, 'lib', kernels.build_kernels())
    for shape in [(2, 7, 5, 3), (3, 26, 4, 4), (2, 16, 8, 8)]:
        for channels_last in (False, True): check_each_kernel(shape, channels_last)

def check_each_kernel(shape, channels_last):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    t = lambda *s, scale=2.: (torch.randn(*s, generator=g) * scale).contiguous(memory_format=fmt)
    c = shape[1]
    y, r, grad = t(*shape, scale=3.), t(*shape), t(*shape)
    wt, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    z, mean, var, inv = kernels._run_kernel('mish_bn_fwd', y, wt, b, 1e-5)
    assert z.is_contiguous(memory_format=fmt)
    ref = _reference_kernel('mish_bn_fwd', y, wt, b, 1e-5)
    for got, want in zip((z, mean, var, inv), ref): assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    # the rebuilt output is the forward output bit for bit
    assert torch.equal(kernels._run_kernel('mish_bn_apply', y, wt, b, mean, inv), z)
    # eval mode: the BatchNorm's scale and shift, which the kernels compute themselves, are _eval_affine's bit for bit
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad(): bn.weight.copy_(wt); bn.bias.copy_(b); bn.running_mean.copy_(mean); bn.running_var.copy_(var)
    scale, shift = [t.detach() for t in functions._eval_affine(bn, y)]
    assert torch.equal(kernels._run_kernel('mish_bn_eval', y, wt, b, mean, var, 1e-5),
                       kernels._run_kernel('mish_affine', y, scale, shift))
    assert torch.equal(kernels._run_kernel('bn_eval_add_mish', y, wt, b, mean, var, 1e-5, r),
                       kernels._run_kernel('affine_add_mish', y, scale, shift, r))
    cases = [('mish_bn_apply', (y, wt, b, mean, inv)), ('mish_affine', (y, wt, b)), ('affine_add_mish', (y, wt, b, r)),
             ('bn_add_mish_fwd', (y, r, wt, b, 1e-5)), ('mish_bn_bwd', (grad, y, wt, mean, inv)),
             ('mish_bn_eval', (y, wt, b, mean, var, 1e-5)), ('bn_eval_add_mish', (y, wt, b, mean, var, 1e-5, r))]
    _, mu, _, iv = kernels._run_kernel('bn_add_mish_fwd', y, r, wt, b, 1e-5)
    cases.append(('bn_add_mish_bwd', (grad, y, r, wt, b, mu, iv)))
    for name, args in cases:
        got, want = kernels._run_kernel(name, *args), _reference_kernel(name, *args)
        as_tuple = lambda t: (t,) if isinstance(t, torch.Tensor) else t
        got, want = as_tuple(got), as_tuple(want)
        for i, (gt, wn) in enumerate(zip(got, want)):
            scale = max(wn.abs().max().item(), 1.)
            diff = (gt.double() - wn).abs().max().item()
            assert diff <= 2e-5 * scale, (name, i, diff)

def test_kernels_are_built_once_into_the_cache(tmp_path, monkeypatch):
    needs_kernels()
    monkeypatch.setenv('RES2NETPLUS_HOME', str(tmp_path))
    kernels.build_kernels()
    built = list(tmp_path.glob('kernels/fused_mish_bn-*.so'))
    assert len(built) == 1 and not list(tmp_path.glob('kernels/*.tmp'))
    mtime = built[0].stat().st_mtime_ns
    kernels.build_kernels()
    assert [p.stat().st_mtime_ns for p in tmp_path.glob('kernels/fused_mish_bn-*.so')] == [mtime]

def test_threads_that_start_at_once_build_the_kernels_once(tmp_path, monkeypatch):
    needs_kernels()
    import threading
    monkeypatch.setenv('RES2NETPLUS_HOME', str(tmp_path))
    monkeypatch.setattr(kernels, '_fast', dict(kernels._fast, lib=None, failed=None))
    threads = [threading.Thread(target=kernels._kernels) for _ in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert kernels._fast['failed'] is None and kernels._fast['lib'] is not None
    assert len(list(tmp_path.glob('kernels/fused_mish_bn-*.so'))) == 1 and not list(tmp_path.glob('kernels/*.tmp'))

def test_a_broken_compiler_is_named(tmp_path, monkeypatch):
    fake = tmp_path/'g++'
    fake.write_text('#!/bin/sh\necho "fake compiler: no such flag" >&2\nexit 1\n'); fake.chmod(0o755)
    monkeypatch.setenv('CXX', str(fake)); monkeypatch.setenv('RES2NETPLUS_HOME', str(tmp_path/'cache'))
    with pytest.raises(RuntimeError, match='could not build the kernels.*fake compiler'): kernels.build_kernels()

@pytest.mark.parametrize('channels_last', [False, True])
def test_kernels_take_views_and_any_thread_count(channels_last):
    "A narrowed (non-dense) input gives what its dense copy gives; one thread gives what two give"
    needs_kernels()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    big = torch.randn(3, 40, 6, 7, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=fmt)
    y, w, b = big[:, 5:31], torch.rand(26) + 0.5, torch.randn(26)
    assert not y.is_contiguous() and not y.is_contiguous(memory_format=torch.channels_last)
    dense = y.contiguous(memory_format=fmt)
    for got, want in zip(kernels._run_kernel('mish_bn_fwd', y, w, b, 1e-5),
                         kernels._run_kernel('mish_bn_fwd', dense, w, b, 1e-5)):
        assert torch.equal(got, want)
    # strided per-channel vectors (every other element of a longer one) and a second input in the other layout
    other = torch.channels_last if fmt == torch.contiguous_format else torch.contiguous_format
    r = torch.randn(3, 26, 6, 7).contiguous(memory_format=other)
    vecs = [(torch.rand(52) + 0.5)[::2], torch.randn(52)[::2], torch.randn(52)[::2], (torch.rand(52) + 0.1)[::2]]
    assert not any(v.is_contiguous() for v in vecs)
    got = kernels._run_kernel('bn_eval_add_mish', y, *vecs, 1e-5, r)
    assert got.is_contiguous(memory_format=fmt)
    dense_args = [v.contiguous() for v in vecs] + [1e-5, r.contiguous(memory_format=fmt)]
    assert torch.equal(got, kernels._run_kernel('bn_eval_add_mish', dense, *dense_args))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels._run_kernel('mish_bn_fwd', dense, w, b, 1e-5)
    finally: torch.set_num_threads(threads)
    for got, want in zip(one, kernels._run_kernel('mish_bn_fwd', dense, w, b, 1e-5)):
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)

@pytest.mark.parametrize('training', [False, True])
def test_a_batchnorm_that_does_not_fit_gets_pytorchs_error(training):
    """A BatchNorm for another channel count, or with a parameter of another size: PyTorch's error, not values read past
    its buffers"""
    y = torch.randn(2, 4, 5, 5)
    swapped = nn.BatchNorm2d(4)
    swapped.weight = nn.Parameter(torch.ones(2))
    for bn in (nn.BatchNorm2d(2), swapped):
        bn.train(training)
        calls = (lambda: blocks.act_norm(nn.Mish(), bn, y),
                 lambda: blocks.norm_add_act(bn, nn.Mish(), y, torch.randn_like(y)))
        for call in calls:
            for path in ('compiled', 'aten'):
                with torch.no_grad(), fast_path(path), pytest.raises(RuntimeError, match='should contain 4 elements'):
                    call()
                with fast_path(path), pytest.raises(RuntimeError, match='should contain 4 elements'): call()

def test_a_batchnorm_on_another_device_gets_pytorchs_error():
    """Parameters the kernels cannot read (on the meta device here) go to PyTorch's ops, which raise: the kernels
    crashed the process"""
    code = (
        "import torch\nfrom torch import nn\nfrom res2netplus.fast import blocks\ny = torch.randn(2, 4, 5, 5)\n"
        "for training in (False, True):\n"
        "    bn = nn.BatchNorm2d(4, device='meta').train(training)\n"
        "    for call in (lambda: blocks.act_norm(nn.Mish(), bn, y),\n"
        "                 lambda: blocks.norm_add_act(bn, nn.Mish(), y, torch.randn_like(y))):\n"
        "        try:\n"
        "            with torch.no_grad(): call()\n"
        "        except RuntimeError as e: print('raised:', str(e).splitlines()[0])\n")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count('raised:') == 4 and 'meta' in out.stdout, out.stdout

def test_more_threads_than_channels():
    "NCHW kernels share out channels: with more threads than channels the results are those of one thread, bit for bit"
    needs_kernels()
    g = torch.Generator().manual_seed(2)
    y, grad = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 3, 5, 7, generator=g)
    w = torch.rand(3, generator=g) + 0.5
    threads, outs = torch.get_num_threads(), {}
    try:
        for nt in (1, 8):
            torch.set_num_threads(nt)
            _, mean, _, inv = kernels._run_kernel('mish_bn_fwd', y, w, w, 1e-5)
            outs[nt] = kernels._run_kernel('mish_bn_bwd', grad, y, w, mean, inv)
    finally: torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[8]))

_TRITON_CHECK = r'''
import torch, torch.nn.functional as F
from res2netplus.fast import gpu
torch.manual_seed(0)
worst = 0.
for dt in (torch.float32, torch.float16, torch.bfloat16):
    for cl in (False, True):
        x = torch.randn(2, 5, 7, 9) * 6
        x.view(-1)[:6] = torch.tensor([-100., -20., 19.9, 20.1, 25., 6e4])
        x = x.to(dt).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        r = torch.randn(2, 5, 7, 9).to(dt)  # NCHW: strided unlike x in channels_last
        ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dt]
        cases = [('mish', gpu.gpu_mish(x), F.mish(x.double()))]
        # the interpreter rounds a bf16 sum toward zero (a GPU rounds to nearest: tests/test_gpu.py)
        if dt != torch.bfloat16:  # PyTorch's sum, rounded to the dtype
            cases.append(('add_mish', gpu.gpu_mish(x, r), F.mish((x + r).double())))
        for name, got, want in cases:
            assert got.dtype == dt and got.stride() == x.stride(), name
            # in units of the dtype's last place
            err = ((got.double() - want).abs() / (want.abs() + 1)).max().item() / ulp
            worst = max(worst, err)
            assert err < (8 if dt == torch.float32 else 1.01), (dt, cl, name, err)
v = torch.randn(2, 8, 5, 5)[:, ::2]  # a strided view: copied to a dense block first
assert torch.allclose(gpu.gpu_mish(v, v), F.mish(v + v), atol=1e-6)
w = torch.randn(3, 40)  # not 4-D
assert torch.allclose(gpu.gpu_mish(w.t()), F.mish(w.t()), atol=1e-6)
# broadcast, another dtype: refused, not misread
for bad in (torch.randn(1, 4, 5, 5), torch.randn(2, 4, 5, 5, dtype=torch.float64)):
    try: gpu.gpu_mish(v, bad); raise SystemExit('gpu_mish took a mismatched r')
    except ValueError as e: assert 'expand_as' in str(e), e
print('ok', worst)
'''

def test_gpu_mish_kernel_equals_pytorch_in_triton_interpreter():
    """The Triton kernel that runs Mish on a GPU, run by Triton's interpreter on the CPU: every dtype and layout,
    extreme values, the residual addition, strided views"""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', _TRITON_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.startswith('ok'), res.stderr[-3000:]

_TRITON_DISPATCH = r'''
import copy, torch
from torch import nn
from res2netplus.fast import kernels, gpu, dispatch, blocks
from res2netplus.models import res2netplus50

class AsCuda:
    "A CPU tensor that `_path` takes for a GPU's: its GPU branch runs, and Triton's interpreter runs the kernel"
    device = torch.device('cuda', 0)
    __torch_dispatch__ = torch.Tensor.__torch_dispatch__
    def __init__(self, t): self.t = t
    def __getattr__(self, name): return getattr(self.t, name)

gpu._gpu_key = lambda device, dtype: ('cuda', 0, dtype)  # the CPU tensors' kernel state is kept as cuda:0's
kernels._fast['gpus'][('cuda', 0, torch.float32)] = True
dispatch._GPU_MIN_NUMEL = 0
path = blocks._path  # what act_norm and norm_add_act call
blocks._path = lambda y, act, norm: path(AsCuda(y), act, norm)
calls, kernel = [], gpu.gpu_mish
gpu.gpu_mish = lambda x, r=None: calls.append(r is not None) or kernel(x, r)
torch.manual_seed(0)
m = res2netplus50(num_classes=4)
for bn in m.modules():
    if isinstance(bn, nn.BatchNorm2d):
        bn.running_mean.uniform_(-0.2, 0.2); bn.running_var.uniform_(0.5, 1.5); bn.weight.data.uniform_(0.1, 1.)
x = torch.randn(4, 3, 64, 64)
with torch.no_grad():
    out = m.eval()(x)
    assert calls.count(False) == 3 + 16 * 4 and calls.count(True) == 16, calls
    with kernels.fast_path('reference'): ref = m(x)
assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
calls.clear()
m(x).sum().backward()  # parameters need gradients: PyTorch's modules
assert calls == [] and m.stem1[0].weight.grad is not None

def bn_grads(model, path):
    model = copy.deepcopy(model).train()
    with kernels.fast_path(path): model(x).logsumexp(1).sum().backward()
    return [p.grad for p in model.parameters() if p.requires_grad]

for trainable in ('bn', 'bn3'):  # fastai's freeze (every BatchNorm trains), or only the blocks' last ones
    for name, p in m.named_parameters():
        p.requires_grad_(name.split('.')[-2].startswith(trainable) and 'fc' not in name)
    calls.clear()
    got, want = bn_grads(m, 'compiled'), bn_grads(m, 'reference')
    assert calls, trainable  # where nothing before it needs a gradient, the kernel ran
    assert len(got) == len(want) > 0 and all(g is not None for g in got), trainable
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-6, (trainable, (g - w).abs().max(), w.abs().max())

import torch.autograd.forward_ad as fwAD  # forward-mode AD ignores no_grad: its tangents need PyTorch's ops
calls.clear()
t = torch.randn_like(x)
def tangent(path):
    with kernels.fast_path(path), torch.no_grad(), fwAD.dual_level():
        return fwAD.unpack_dual(m.eval()(fwAD.make_dual(x, t))).tangent
got, want = tangent('compiled'), tangent('reference')
assert calls == [] and got is not None and torch.allclose(got, want, rtol=1e-4, atol=1e-5)

import warnings  # a variant that Triton cannot build at its first launch: one warning, PyTorch's Mish from then on
def fails(x, r=None): calls.append('failed'); raise RuntimeError('ptxas: this variant does not build')
gpu.gpu_mish = fails
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter('always')
    out = m.eval()(x)
    again = m(x)
assert calls == ['failed'] and len([w for w in caught if "PyTorch's Mish runs instead" in str(w.message)]) == 1, caught
assert kernels._fast['gpus'][('cuda', 0, torch.float32)] is False
assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5) and torch.equal(out, again)
print('ok')
'''

def test_gpu_dispatch_takes_the_kernel_only_where_no_gradient_is_lost():
    """The GPU branch of the dispatch, on the CPU (Triton's interpreter): evaluation without gradients runs every Mish
    through the kernel with PyTorch's outputs; training runs PyTorch's Mish; a trainable BatchNorm after frozen convs
    (fastai's `freeze`) gets PyTorch's gradients; forward-mode AD gets PyTorch's tangents"""
    pytest.importorskip('triton')
    env = dict(os.environ, TRITON_INTERPRET='1')
    res = subprocess.run([sys.executable, '-c', _TRITON_DISPATCH], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0 and res.stdout.startswith('ok'), res.stderr[-3000:]

@pytest.mark.parametrize('train', [False, True])
def test_forward_mode_ad_gives_the_reference_tangents(plus, train):
    "Forward-mode AD (`torch.func.jvp`'s engine, `forward_ad.dual_level`) ignores `no_grad`: the fused paths step aside"
    import torch.autograd.forward_ad as fwAD
    m = copy.deepcopy(plus).train(train)
    x, t = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    def tangent(path):
        with fast_path(path), torch.no_grad(), fwAD.dual_level():
            return fwAD.unpack_dual(copy.deepcopy(m)(fwAD.make_dual(x, t))).tangent
    got, want = tangent('compiled'), tangent('reference')
    assert got is not None and torch.allclose(got, want, rtol=1e-4, atol=1e-5)

def test_gpu_kernel_check_is_retried_after_out_of_memory_and_a_failure_is_remembered(monkeypatch):
    """The once-per-GPU-and-dtype check: a GPU full at that moment is checked again later; a failing check warns once,
    for good"""
    monkeypatch.setitem(kernels._fast, 'gpus', {})
    if gpu.triton is None: monkeypatch.setattr(gpu, 'triton', object())
    monkeypatch.setattr(torch.cuda, 'is_current_stream_capturing', lambda: False)
    outcomes = [torch.cuda.OutOfMemoryError('CUDA out of memory'), None]
    def check(device, dtype):
        outcome = outcomes.pop(0)
        if outcome is not None: raise outcome
    monkeypatch.setattr(gpu, '_check_gpu_kernels', check)
    device = torch.device('cuda', 0)
    assert not gpu._gpu_kernels_ready(device, torch.float16) and kernels._fast['gpus'] == {}
    assert gpu._gpu_kernels_ready(device, torch.float16) and kernels._fast['gpus'] == {('cuda', 0, torch.float16): True}
    def broken(device, dtype): raise RuntimeError('ptxas: cvt.bf16.f32 requires sm_80')
    monkeypatch.setattr(gpu, '_check_gpu_kernels', broken)
    with pytest.warns(UserWarning, match="PyTorch's Mish runs instead"):
        assert not gpu._gpu_kernels_ready(device, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not gpu._gpu_kernels_ready(device, torch.bfloat16) and gpu._gpu_kernels_ready(device, torch.float16)
