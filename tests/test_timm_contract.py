"""timm's model contract on every Res2NetPlus variant: timm's own model tests (tests/test_models.py of the timm 1.0.31
sdist, vendored in tests/timm_upstream), the save_for_hf → local-dir: round trip, device/dtype, checkpointing"""
import copy, importlib.util, json, warnings
from pathlib import Path
import pytest, torch, timm
from timm.models import register_model
from res2netplus.models import RES2NET_VARIANTS, create_res2net, _cfg

_spec = importlib.util.spec_from_file_location('timm_upstream_test_models',
                                               Path(__file__).parent/'timm_upstream'/'timm_test_models.py')
T = importlib.util.module_from_spec(_spec)  # not `from … import test_*`: pytest would collect timm's parametrisation
with warnings.catch_warnings():
    warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)  # its markers are registered in timm's pyproject
    _spec.loader.exec_module(T)

PLUS = [n for n in RES2NET_VARIANTS if 'plus' in n]

# Tiny registered twins, one per Plus family (one block per stage, the family's width, scale and cardinality), as timm
# keeps tiny `test_*` models for its own tests: timm's battery then runs in seconds a model on two CPU cores.
def _family(variant): return sorted((k, str(v)) for k, v in RES2NET_VARIANTS[variant]['arch'].items() if k != 'layers')
FAMILIES = list({str(_family(n)): n for n in reversed(PLUS)}.values())[::-1]  # res2netplus50 for 101/152's family
TINY = {f'tiny_{n}': n for n in FAMILIES}
default_cfgs = {t: {**_cfg(n), 'architecture': t, 'input_size': (3, 64, 64), 'pool_size': (2, 2)}
                for t, n in TINY.items()}

def _tiny_entrypoint(tiny, variant):
    def entrypoint(pretrained=False, **kwargs):
        kwargs['pretrained_cfg'] = kwargs.get('pretrained_cfg') or default_cfgs[tiny]
        kwargs.setdefault('layers', (1, 1, 1, 1))
        return create_res2net(variant, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = tiny
    entrypoint.__module__ = __name__  # register_model reads this module's default_cfgs
    return entrypoint

for _tiny, _variant in TINY.items():
    if _tiny not in timm.list_models(_tiny): register_model(_tiny_entrypoint(_tiny, _variant))

# timm's tests (with their extra arguments) on every family: the model contract, the features API, pruning
CONTRACT = {
    'test_model_default_cfgs': (1, 'meta'), 'test_model_forward_features': (1,),
    'test_model_forward_intermediates_features': (1,), 'test_model_forward_intermediates': (1,),
    'test_prune_to_stem_feature': (), 'test_model_features_output_stride': (8,),
}
# … and the heavier rest on one: forward/backward, TorchScript, FX, checkpointing, heads
ONE = {
    'test_model_forward': (1,), 'test_model_backward': (2,), 'test_model_forward_torchscript': (1,),
    'test_model_forward_fx': (1,), 'test_model_backward_fx': (2,), 'test_model_forward_fx_torchscript': (1,),
    'test_features_only_grad_checkpointing_backward': (), 'test_reset_classifier_keeps_pool': (),
    'test_head_hidden_size': ({},), 'test_prune_intermediate_layers_params_used': (),
    'test_prune_intermediate_layers_last_feature': (True,), 'test_features_only_feature_cls_class': (),
    'test_resnetv2_stem_feature_odd_size': ({},), 'test_forward_intermediates_stop_early_final_norm': ({},),
    'test_model_features_output_stride': (16,), 'test_forward_after_prune_intermediate_layers': (),
    'test_prune_intermediate_layers_contract': (),  # the slowest (prunes at every index, trains): the same stages
}
# timm's tests that cannot apply: scripting FeatureGetterNet compiles forward_intermediates (not TorchScript-able;
# feature_cls='fx' scripts), and the ones tied to other architectures (ViT tokens, EfficientNet blocks, Swin windows)

@pytest.mark.parametrize('test', sorted(CONTRACT))
@pytest.mark.parametrize('model_name', TINY)
def test_timm_model_contract(test, model_name):
    getattr(T, test)(model_name, *CONTRACT[test])

@pytest.mark.parametrize('test', sorted(ONE))
def test_timm_model_tests(test):
    getattr(T, test)('tiny_res2netplus50', *ONE[test])

@pytest.mark.parametrize('model_name', PLUS)
def test_timm_default_cfgs_of_every_plus_variant(model_name):
    "The real variants' configs (224 px, 7×7 features, first conv, classifier), built on the meta device"
    T.test_model_default_cfgs(model_name, 1, 'meta')

# --- the rest of timm's contract, as a user meets it --------------------------------------------------------------
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

def _tiny(variant='res2netplus50', **kwargs):
    return timm.create_model(variant, layers=(1, 1, 1, 1), **kwargs)

@pytest.mark.parametrize('variant', FAMILIES)
def test_save_for_hf_then_local_dir_gives_back_the_same_model(variant, tmp_path):
    "A shared model came back with ImageNet (or no) weights: timm's pretrained_cfg now names the saved file"
    kw = dict(num_classes=7, in_chans=1)
    model = _tiny(variant, **kw).eval()
    x = X[:, :1]
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    assert json.loads((tmp_path/'config.json').read_text())['model_args']['in_chans'] == 1
    back = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    assert (type(back), back.num_classes, back.in_chans) == (type(model), 7, 1)
    with torch.no_grad(): assert torch.equal(back(x), model(x))
    fresh = timm.create_model(f'local-dir:{tmp_path}', pretrained=False)  # the check above can fail
    assert not torch.equal(fresh.layer1[0].conv1.weight, model.layer1[0].conv1.weight)

def test_a_shared_model_loads_as_a_backbone_or_with_a_new_head(tmp_path):
    model = _tiny(num_classes=7, in_chans=1).eval()
    x = X[:, :1]
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    feats = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, features_only=True, out_indices=(2, 4)).eval()
    with torch.no_grad(): expected = model.forward_intermediates(x, [2, 4], intermediates_only=True)
    with torch.no_grad(): assert all(torch.equal(a, b) for a, b in zip(feats(x), expected))
    new_head = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=3)  # timm's fine-tuning route
    assert torch.equal(new_head.layer4[0].conv3.weight, model.layer4[0].conv3.weight) and new_head.fc.out_features == 3

def test_a_full_size_variant_round_trips_its_state_dict(tmp_path):
    "Every family round-trips above at one block per stage; a full-size net's state dict (its 101 layers) too"
    model = timm.create_model('res2netplus101', num_classes=5, in_chans=2)
    timm.models.save_for_hf(model, tmp_path, safe_serialization=True)
    back = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    want, got = model.state_dict(), back.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(v, want[k]) for k, v in got.items())

def test_pretrained_cfg_overlay_state_dict_and_file_win_over_imagenet(tmp_path):
    import safetensors.torch
    src = _tiny(num_classes=7).eval()
    safetensors.torch.save_file(src.state_dict(), tmp_path/'w.safetensors')
    for overlay in (dict(state_dict=src.state_dict()), dict(file=str(tmp_path/'w.safetensors'), num_classes=7)):
        m = _tiny(num_classes=7, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        with torch.no_grad(): assert torch.equal(m(X), src(X))
    # timm's rule: the registry config says 1000 classes, so a 7-class file's head is left out (a fresh head)
    m = _tiny(num_classes=7, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path/'w.safetensors')))
    assert torch.equal(m.layer4[0].conv3.weight, src.layer4[0].conv3.weight)

def test_a_saved_weights_path_in_the_config_does_not_replace_the_saved_weights(tmp_path):
    import safetensors.torch
    first = _tiny(num_classes=3)
    safetensors.torch.save_file(first.state_dict(), tmp_path/'first.safetensors')
    tuned = _tiny(num_classes=3, weights=str(tmp_path/'first.safetensors')).eval()
    with torch.no_grad(): tuned.fc.weight.add_(1.)  # "fine-tuned" after loading the file
    timm.models.save_for_hf(tuned, tmp_path/'shared', safe_serialization=True)
    back = timm.create_model(f'local-dir:{tmp_path/"shared"}', pretrained=True).eval()
    with torch.no_grad(): assert torch.equal(back(X), tuned(X))

def test_device_and_dtype_reach_every_tensor():
    meta = timm.create_model('res2netplus101', device='meta', dtype=torch.bfloat16)
    assert {(t.device.type, t.dtype) for t in meta.parameters()} == {('meta', torch.bfloat16)}
    assert {t.device.type for t in meta.buffers()} == {'meta'}
    half = _tiny(dtype=torch.bfloat16, num_classes=4).eval()
    with torch.no_grad(): assert half(X.bfloat16()).dtype == torch.bfloat16

def test_reset_classifier_keeps_device_dtype_and_mode_and_takes_timms_pools():
    m = _tiny(num_classes=0, global_pool='').to(torch.float64).train()
    m.reset_classifier(4)  # a classifier on an unpooled model pools by average
    assert (m.fc.weight.dtype, m.fc.training, m.global_pool.pool_type) == (torch.float64, True, 'avg')
    for pool, width in (('max', 2048), ('avgmax', 2048), ('catavgmax', 4096), ('fastavg', 2048)):
        m.reset_classifier(3, pool)
        assert m.head_hidden_size == width and m(X.double()).shape == (2, 3)
    with pytest.raises(AssertionError, match="got 'token'"): m.reset_classifier(3, 'token')
    assert _tiny(global_pool='catavgmax', num_classes=2).fc.in_features == 4096

def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    model = _tiny(num_classes=5, drop_path_rate=0.2, drop_rate=0.2)
    runs = []
    for on in (False, True):
        m = copy.deepcopy(model).train(); m.set_grad_checkpointing(on)
        torch.manual_seed(0); out = m(X); out.square().mean().backward()
        runs.append((out.detach(), [p.grad for p in m.parameters()]))
    (a, ga), (b, gb) = runs
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for g, h in zip(gb, ga): torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)

def test_layer_decay_optimizer_builds_from_group_matcher():
    "The stem pattern's capture group read as a number: ValueError: could not convert string to float: 'stem1'"
    import timm.optim
    opt = timm.optim.create_optimizer_v2(_tiny(), lr=1e-3, layer_decay=0.7)
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert len(scales) == 6 and scales[-1] == 1.  # stem, 4 stages (coarse blocks), head

def test_torchscript_compiles_the_fx_graph():
    m = _tiny(num_classes=3).eval()
    scripted = torch.jit.script(m)
    with torch.no_grad(): torch.testing.assert_close(scripted(X), m(X), rtol=1e-4, atol=1e-5)
    fx = timm.create_model('res2netplus50', layers=(1, 1, 1, 1), features_only=True, feature_cls='fx').eval()
    with torch.no_grad(): assert [o.shape[1] for o in torch.jit.script(fx)(X)] == [64, 256, 512, 1024, 2048]

@pytest.mark.parametrize('feature_cls', ['list', 'dict', 'hook', 'getter', 'fx'])
def test_every_features_only_wrapper_gives_the_same_features(feature_cls):
    model = _tiny().eval()
    with torch.no_grad(): expected = model.forward_intermediates(X, intermediates_only=True)
    f = _tiny(features_only=True, feature_cls=feature_cls, pretrained=True,  # weights loaded before the wrapping
              pretrained_cfg_overlay=dict(state_dict=model.state_dict())).eval()
    with torch.no_grad(): got = f(X)
    got = list(got.values()) if isinstance(got, dict) else got
    assert len(got) == 5 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))
