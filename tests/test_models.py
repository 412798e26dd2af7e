"The network against the paper and against timm"
import subprocess, sys
import pytest, torch, timm
from torch import nn
from res2netplus.models import RES2NET_VARIANTS, RES2NET_FACTORIES, create_res2net, Res2Net, res2netplus50
from conftest import randomize_bn

PLAIN = [n for n in RES2NET_VARIANTS if 'plus' not in n]
PLUS = [n for n in RES2NET_VARIANTS if 'plus' in n]

def n_params(m): return sum(p.numel() for p in m.parameters())

@pytest.mark.parametrize('name', PLAIN)
def test_param_count_matches_paper(name):
    assert abs(n_params(RES2NET_FACTORIES[name]()) / 1e6 - RES2NET_VARIANTS[name]['params_m']) <= 0.01

@pytest.mark.parametrize('name', PLAIN)
def test_same_keys_shapes_and_logits_as_timm(name):
    ref = randomize_bn(timm.create_model(name)).eval()
    ours = RES2NET_FACTORIES[name]().eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert (ours(x) - ref(x)).abs().max() <= 1e-4

@pytest.mark.parametrize('name', PLUS)
def test_plus_variants_are_plus(name):
    m = RES2NET_FACTORIES[name](n_out=3)
    assert list(m._modules)[:4] == ['stem1', 'stem2', 'stem3', 'maxpool']
    assert [m[i][0].out_channels for i in range(3)] == [32, 32, 64]
    assert any(isinstance(x, nn.Mish) for x in m.modules()) and not any(isinstance(x, nn.ReLU) for x in m.modules())
    assert isinstance(m.layer2[0].downsample[0], nn.AvgPool2d)  # v1b shortcut
    # the Plus net differs from its plain twin only by the stem, the conv biases and the ordering
    block = m.layer1[0]
    assert block.bn_1st is False and block.conv1.bias is not None and block.conv3.bias is None
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 3)

def test_plus_param_count_is_v1b_plus_biases():
    "Res2NetPlus-50 = res2net50d + one bias per conv that feeds an activation"
    plus, d = RES2NET_FACTORIES['res2netplus50'](), RES2NET_FACTORIES['res2net50d']()
    biases = sum(m.bias.numel() for m in plus.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
    assert n_params(plus) == n_params(d) + biases

def test_depths():
    for name, blocks in (('res2netplus101', [3, 4, 23, 3]), ('res2netplus152', [3, 8, 36, 3])):
        m = RES2NET_FACTORIES[name]()
        assert [len(getattr(m, f'layer{i}')) for i in range(1, 5)] == blocks

def test_kwargs_reach_the_network():
    m = create_res2net('res2netplus50', n_out=4, act_cls=nn.SiLU, stem_szs=(16, 32, 48), in_chans=5, drop_rate=0.3)
    assert m.stem1[0].in_channels == 5 and m.stem3[0].out_channels == 48 and m.head_drop.p == 0.3
    assert any(isinstance(x, nn.SiLU) for x in m.modules())
    assert m(torch.randn(1, 5, 64, 64)).shape == (1, 4)

@pytest.mark.parametrize('bad, msg', [
    (dict(scale=0), 'scale must be'), (dict(base_width=0), 'base_width'), (dict(cardinality=0), 'cardinality'),
    (dict(layers=(3, 4, 6)), 'layers'), (dict(stem_type='huge'), 'stem_type'),
    (dict(drop_path_rate=1.5), 'drop_path_rate'), (dict(n_out=-1), 'num_classes'),
    (dict(global_pool='median'), 'global_pool')])
def test_bad_config_says_how_to_fix(bad, msg):
    with pytest.raises(ValueError, match=msg): RES2NET_FACTORIES['res2netplus50'](**bad)

def test_unknown_variant_suggests():
    with pytest.raises(ValueError, match="Did you mean 'res2netplus50'"): create_res2net('res2netplus_50')

def test_drop_path_trains_stochastically_and_evals_deterministically():
    m = RES2NET_FACTORIES['res2netplus50'](n_out=2, drop_path_rate=0.5)
    for b in m.modules():
        if hasattr(b, 'zero_init_last'): nn.init.ones_(b.bn3.weight)
    x = torch.randn(2, 3, 64, 64)
    m.train(); torch.manual_seed(0); a = m(x); torch.manual_seed(1); b = m(x)
    assert not torch.allclose(a, b)
    m.eval()
    with torch.no_grad(): assert torch.equal(m(x), m(x))

def test_timm_entrypoints():
    m = timm.create_model('res2netplus50', num_classes=5, in_chans=1, drop_path_rate=0.1)
    assert isinstance(m, Res2Net) and m(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    assert m.pretrained_cfg['first_conv'] == 'stem1.0' and m.pretrained_cfg['classifier'] == 'fc'
    assert m.layer4[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert set(RES2NET_VARIANTS) - set(PLAIN) <= set(timm.list_models('res2ne*plus*'))
    x = torch.randn(2, 3, 64, 64)
    assert m.get_classifier() is m.fc
    m0 = timm.create_model('res2nextplus50', num_classes=0)
    assert m0(x).shape == (2, 2048) and m0.forward_head(m0.forward_features(x), pre_logits=True).shape == (2, 2048)
    m0.reset_classifier(3); assert m0(x).shape == (2, 3)

@pytest.mark.parametrize('name', ['res2netplus50', 'res2netplus101', 'res2nextplus50'])
def test_features_only(name):
    f = timm.create_model(name, features_only=True)
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert f.feature_info.channels() == [64, 256, 512, 1024, 2048]
    outs = f(torch.randn(1, 3, 96, 96))
    assert [o.shape[1:] for o in outs] == [(64, 48, 48), (256, 24, 24), (512, 12, 12), (1024, 6, 6), (2048, 3, 3)]
    f = timm.create_model(name, features_only=True, out_indices=(1, 4))
    assert [o.shape[1] for o in f(torch.randn(1, 3, 64, 64))] == [256, 2048]

def test_features_of_plain_variant_through_our_factory():
    f = RES2NET_FACTORIES['res2net50d'](features_only=True)
    assert f.feature_info.module_name() == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']

def _stage_outputs(m, x):
    outs = []
    for name, mod in m.named_children():
        if name == 'global_pool': break
        x = mod(x)
        if name.startswith('layer'): outs.append(x)
    return outs

@pytest.mark.parametrize('name', [n for n in RES2NET_VARIANTS if '152' not in n])
def test_dilated_is_the_network_sampled_densely(name):
    "At output stride 16 and 8, each stage's output, subsampled by the stride it dropped, is the undilated one's"
    ref = randomize_bn(RES2NET_FACTORIES[name]()).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(): expected = _stage_outputs(ref, x)
    for os_ in (16, 8):
        m = RES2NET_FACTORIES[name](output_stride=os_).eval()
        m.load_state_dict(ref.state_dict(), strict=True)
        with torch.no_grad(): got = _stage_outputs(m, x)
        for a, b, reduction in zip(got, expected, (4, 8, 16, 32)):
            step = reduction // min(reduction, os_)
            assert a.shape[-1] == 64 // min(reduction, os_)
            assert (a[..., ::step, ::step] - b).abs().max() <= 1e-4, (os_, reduction)

@pytest.mark.parametrize('os_', [8, 16])
def test_features_only_at_output_stride(os_):
    f = timm.create_model('res2netplus50', features_only=True, output_stride=os_)
    assert f.feature_info.reduction() == [2, 4, 8, min(16, os_), os_]
    outs = f(torch.randn(1, 3, 96, 96))
    assert [o.shape[-1] for o in outs] == [48, 24, 12, 96 // min(16, os_), 96 // os_]
    with pytest.raises(ValueError, match='output_stride must be 8, 16 or 32'):
        timm.create_model('res2netplus50', output_stride=12)

def test_nan_or_inf_input_is_refused_when_asked():
    "Off by default (a full pass over each batch); on, the bad images are named; timm's factory and the segmenters too"
    x = torch.randn(3, 3, 64, 64)
    x[1, 0, 5, 5], x[2, 2, 0, 0] = float('nan'), float('inf')
    plain = create_res2net('res2netplus50', num_classes=4).eval()
    with torch.no_grad(): assert not torch.isfinite(plain(x)).all()  # unchecked: NaN flows through
    checked = timm.create_model('res2netplus50', num_classes=4, check_finite=True).eval()
    with pytest.raises(ValueError, match=r'1 NaN and 1 infinite input values \(images \[1, 2\]'): checked(x)
    with torch.no_grad(): assert torch.isfinite(checked(x[:1])).all()
    from res2netplus.segmentation import create_seg_model
    seg = create_seg_model('res2netplus50', 2, 'fpn').eval()
    seg.check_finite = True
    with pytest.raises(ValueError, match='fix the data'): seg(x)

def test_check_finite_input_callback_stops_training_on_a_bad_batch(dls):
    from fastai.vision.all import Learner, CrossEntropyLossFlat
    from res2netplus.learner import CheckFiniteInput
    learn = Learner(dls, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
                    loss_func=CrossEntropyLossFlat(), cbs=CheckFiniteInput())
    learn.fit(1, 1e-3)  # clean data passes
    from fastai.callback.core import Callback
    class Corrupt(Callback):
        order = -30
        def before_batch(self):
            if not (self.training and self.iter == 1): return
            x = self.xb[0].clone(); x[0, 0, 0, 0] = float('inf'); self.learn.xb = (x,)
    with pytest.raises(ValueError, match=r'Training batch 1 of epoch 0 got 0 NaN and 1 infinite'):
        learn.fit(1, 1e-3, cbs=Corrupt())

@pytest.mark.parametrize('name', ['res2netplus50', 'res2net50d'])
def test_a_learner_body_names_n_in_for_the_wrong_channel_count(name):
    "fastai's learners cut the model with model_meta's cut: a Res2NetBody, which keeps the network's input check"
    from fastai.vision.learner import create_body, model_meta
    factory = RES2NET_FACTORIES[name]
    body = create_body(factory(), n_in=3, pretrained=False, cut=model_meta[factory]['cut'])
    with pytest.raises(ValueError, match=r'built for 3-channel images but got 1 channels.*n_in=1'):
        body(torch.randn(2, 1, 64, 64))

def test_importing_the_package_registers_the_plus_variants_with_timm():
    "The README's `import timm, res2netplus` route: registration happened only when res2netplus.models was imported"
    code = ("import timm, res2netplus; m = timm.create_model('res2netplus50', num_classes=3, layers=(1, 1, 1, 1)); "
            "print(type(m).__name__)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == 'Res2Net', out.stderr[-2000:]

def test_the_timm_routes_refuse_images_smaller_than_the_output_stride():
    "timm's and fastai's timm routes call forward_features alone, which skipped the size check"
    import timm
    m = timm.create_model('res2netplus50', layers=(1, 1, 1, 1)).eval()
    for f in (m.forward_features, m):
        with pytest.raises(ValueError, match=r'at least 32×32 px'): f(torch.randn(2, 3, 16, 16))

def test_reset_classifier_sets_the_pooling_like_timm():
    "global_pool was ignored: reset_classifier(0, '') still pooled, (5, 'max') kept the average pool"
    import timm
    x = torch.randn(2, 3, 64, 64)
    m = res2netplus50(layers=(1, 1, 1, 1)).eval()
    features = m.forward_features(x)
    m.reset_classifier(0, '')
    assert torch.equal(m(x), features)
    m.reset_classifier(5, 'max')
    assert m.global_pool.pool_type == 'max'
    assert torch.equal(m.forward_head(features, pre_logits=True), features.amax((2, 3)))
    unpooled = timm.create_model('res2netplus50', layers=(1, 1, 1, 1), num_classes=0, global_pool='')
    assert unpooled(x).shape == (2, 2048, 2, 2)
    m.reset_classifier(0, '')
    m.reset_classifier(3)  # a classifier needs pooled features: the default pool, as timm's contract tests expect
    assert m.global_pool.pool_type == 'avg' and m(x).shape == (2, 3)
    with pytest.raises(ValueError, match="'' \\(no pooling\\) is for num_classes=0"): res2netplus50(global_pool='')
    with pytest.raises(ValueError, match="got 'median'"): m.reset_classifier(3, 'median')

def test_networks_pickled_with_torchs_pools_still_run_and_reset():
    "Networks saved before the head used timm's pools hold nn.AdaptiveAvgPool2d and nn.Flatten"
    import pickle
    m = res2netplus50(layers=(1, 1, 1, 1), n_out=3).eval()
    m.global_pool, m.flatten = nn.AdaptiveAvgPool2d(1), nn.Flatten()
    del m.head_hidden_size
    old = pickle.loads(pickle.dumps(m))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(old(x), m(x))
    assert old._pool_type() == 'avg' and not old.grad_checkpointing
    old.reset_classifier(4); assert old(x).shape == (2, 4) and old.head_hidden_size == 2048
