"The deployment form: exact BatchNorm folding, channels_last, ONNX with onnxruntime, torch.export, torch.compile"
import copy
import pytest, torch
from torch import nn
from res2netplus.deploy import fuse_for_inference, export_onnx, check_torch_export, fold_bn_into_next
from res2netplus.models import res2netplus50, res2net50_26w_4s, res2net50d
from conftest import randomize_bn

def n_bn(m): return sum(isinstance(b, nn.modules.batchnorm._BatchNorm) for b in m.modules())

@pytest.fixture(scope='module')
def plus(): return randomize_bn(res2netplus50(n_out=5)).eval()

@pytest.mark.parametrize('factory', [res2netplus50, res2net50_26w_4s, res2net50d])
def test_fused_equals_original(factory):
    m = randomize_bn(factory(n_out=5)).eval()
    before = copy.deepcopy(m.state_dict())
    f = fuse_for_inference(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        assert (f(x.to(memory_format=torch.channels_last)) - ref).abs().max() <= 1e-4
        assert (f(x) - ref).abs().max() <= 1e-4
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert all(not p.requires_grad for p in f.parameters())
    assert f.stem1[0].weight.is_contiguous(memory_format=torch.channels_last) if hasattr(f, 'stem1') else True
    assert n_bn(m) - n_bn(f) == f.n_folded_bn
    if factory is res2netplus50:  # 16 bn3 + 4 shortcut BNs + 16 last-split BNs
        assert f.n_folded_bn == 36
    else: assert n_bn(f) == 0  # conv → BN everywhere: all folded

def test_every_mish_runs_inside_a_fused_kernel(plus, monkeypatch):
    "On a CPU the deployment form runs no Mish module alone: each is in a fused Mish + scale/shift (+ residual) kernel"
    from res2netplus.fast import kernels
    f = fuse_for_inference(plus)
    assert not any(m.training for m in f.modules())  # the Identities left by folding were once in training mode, and
    calls = []                                        # sent 32 Mish calls a forward down the slow unfused path
    monkeypatch.setattr(nn.Mish, 'forward', lambda self, x: calls.append(tuple(x.shape)) or torch.nn.functional.mish(x))
    with torch.no_grad(), kernels.fast_path('compiled'): f(torch.randn(2, 3, 64, 64))
    if kernels._fast['failed'] is not None:
        pytest.skip(f"this machine cannot compile the fused kernels: {kernels._fast['failed']}")
    assert calls == []
    with torch.no_grad(), kernels.fast_path('reference'): f(torch.randn(2, 3, 64, 64))
    assert len(calls) == 3 + 16 * 5  # the reference path: the stem's three, and five a block

def test_fold_into_next_is_exact_for_1x1_and_refuses_padding():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6))).eval()[0]
    conv = nn.Conv2d(10, 4, 1)
    with torch.no_grad():
        y = torch.randn(2, 10, 5, 5)
        ref = conv(torch.cat([y[:, :2], bn(y[:, 2:8]), y[:, 8:]], 1))
        fold_bn_into_next(bn, conv, start=2)
        assert (conv(y) - ref).abs().max() <= 1e-5
    with pytest.raises(ValueError, match='1×1 ungrouped conv without padding'):
        fold_bn_into_next(bn, nn.Conv2d(6, 4, 3, padding=1))

@pytest.fixture(scope='module')
def learn(dls):
    from fastai.vision.all import vision_learner
    learn = vision_learner(dls, res2netplus50, pretrained=False)
    randomize_bn(learn.model)
    for m in learn.model[1].modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 1.5); m.weight.data.uniform_(0.5, 1.5)
    return learn

def test_fuses_a_learners_model(learn):
    f = fuse_for_inference(learn)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in f.modules())  # the head's BatchNorm1d went into the Linears
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert (f(x) - learn.model.eval()(x)).abs().max() <= 1e-4

def test_a_learners_body_folds_like_the_network(dls):
    "The learners' Res2NetBody (own forward: an input check) runs its children in order: the deep stem's BN still folds"
    from fastai.vision.all import vision_learner
    from res2netplus.models import res2net50d
    head_bns = 2  # fastai's head: BatchNorm1d → Dropout → Linear, twice
    for factory in (res2net50d, res2netplus50):
        learner_folds = fuse_for_inference(vision_learner(dls, factory, pretrained=False)).n_folded_bn
        assert learner_folds == fuse_for_inference(factory()).n_folded_bn + head_bns

def test_onnx_round_trip_of_learner_and_deploy_form(learn, plus, tmp_path):
    pytest.importorskip('onnxruntime')
    res = export_onnx(learn, tmp_path/'learner.onnx', size=64, fuse=False)
    assert res['max_abs_diff'] <= 1e-4 and (tmp_path/'learner.onnx').exists()
    res = export_onnx(plus, tmp_path/'deploy.onnx', size=64)
    assert res['max_abs_diff'] <= 1e-4 and res['exporter'] == 'dynamo'

def test_torch_export(plus):
    ep = check_torch_export(plus, size=64)
    x = torch.randn(3, 3, 64, 64)  # another batch size: the batch dimension is dynamic
    with torch.no_grad(): assert (ep.module()(x) - plus(x)).abs().max() <= 1e-4

def test_compile_has_no_graph_breaks(plus):
    f = fuse_for_inference(plus)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch._dynamo.explain(f)(x).graph_break_count == 0
        assert torch._dynamo.explain(plus)(x).graph_break_count == 0

def test_compiled_deployment_form_with_frozen_weights(plus):
    "The README's fastest CPU inference, torch.compile(fuse_for_inference(m), options={'freezing': True}), is the model"
    torch._dynamo.reset()
    fast = torch.compile(fuse_for_inference(plus), options={'freezing': True})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert (fast(x) - plus(x)).abs().max() <= 1e-4

def test_bad_input_says_what_is_expected():
    with pytest.raises(ValueError, match='nn.Module or a fastai Learner'): fuse_for_inference('res2netplus50')

class DoubledBN(nn.BatchNorm2d):  # a BatchNorm subclass that computes something else
    def forward(self, x): return 2 * super().forward(x)

def _layers_that_must_not_fold():
    "Each: (name, model) whose BatchNorm folding would change the output"
    from torch.nn.utils.parametrizations import weight_norm
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1)
    hooked = nn.BatchNorm2d(4)
    hooked.register_forward_hook(lambda mod, inp, out: out * 3)
    return dict(subclass=nn.Sequential(nn.Conv2d(3, 4, 3), DoubledBN(4)),
                weight_norm=nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)),
                shared_conv=nn.Sequential(nn.Conv2d(3, 4, 3), shared, nn.BatchNorm2d(4), shared, nn.BatchNorm2d(4)),
                hooked=nn.Sequential(nn.Conv2d(3, 4, 3), hooked))

@pytest.mark.parametrize('name', ['subclass', 'weight_norm', 'shared_conv', 'hooked'])
def test_only_what_folds_exactly_is_folded(name, tmp_path):
    "A BN subclass with its own forward, a weight-normed or shared conv, a hooked BN: left as they are, outputs equal"
    m = randomize_bn(_layers_that_must_not_fold()[name]).eval()
    x = torch.randn(2, 3, 16, 16)
    f = fuse_for_inference(m, check_size=16)
    with torch.no_grad(): assert (f(x) - m(x)).abs().max() <= 1e-5
    assert export_onnx(m, tmp_path/'m.onnx', size=16)['max_abs_diff'] <= 1e-4  # checked against the original itself

def test_the_fused_copy_is_for_inference_only(plus, tmp_path):
    f = fuse_for_inference(plus)
    with pytest.raises(RuntimeError, match='inference-only copy.*train the original model'): f.train()
    f.eval()
    torch.save(f, tmp_path/'f.pt')
    g = torch.load(tmp_path/'f.pt', weights_only=False)
    with pytest.raises(RuntimeError, match='inference-only'): g.train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(g(x), f(x))

def test_the_originals_modes_are_left_as_they_were(plus):
    "Fine-tuning with frozen BatchNorms, or Monte Carlo dropout: the check must not reset any submodule's mode"
    m = copy.deepcopy(plus).train()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d): bn.eval()
    modes = [mod.training for mod in m.modules()]
    fuse_for_inference(m)
    assert [mod.training for mod in m.modules()] == modes

def test_the_check_is_relative_to_the_outputs_size_and_takes_feature_lists():
    m = randomize_bn(res2net50d(n_out=5)).eval()
    with torch.no_grad(): m.fc.weight.mul_(1e4)  # logits ~1e5: float32 rounding alone is ~1e-2 there
    fuse_for_inference(m)
    import timm, res2netplus.models  # noqa: F401 (registers the models with timm)
    features = randomize_bn(timm.create_model('res2netplus50', features_only=True)).eval()
    f = fuse_for_inference(features)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert all((a - b).abs().max() <= 1e-3 * b.abs().max() for a, b in zip(f(x), features(x)))

def test_export_onnx_of_a_model_without_convs_says_so(tmp_path):
    with pytest.raises(ValueError, match='no Conv2d'): export_onnx(nn.Identity(), tmp_path/'x.onnx')
