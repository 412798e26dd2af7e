"ImageNet weights: timm's cache, local files, the exact v1b → Plus transfer, and errors that name the fix"
import hashlib, pytest, torch, timm, safetensors.torch
from torch import nn
from res2netplus.models import res2netplus50, res2netplus101, res2net50d, res2net101d, res2net50_26w_4s
from res2netplus.weights import load_weights, read_weights, WeightsUnavailableError
from conftest import randomize_bn

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

@pytest.mark.parametrize('plus, source', [(res2netplus50, 'res2net50d'), (res2netplus101, 'res2net101d')])
def test_transfer_from_v1b_is_exact_with_relu(plus, source):
    src = randomize_bn(timm.create_model(source)).eval()
    dst = plus(act_cls=nn.ReLU).eval()
    load_weights(dst, src.state_dict())
    with torch.no_grad():
        ref, out, untransferred = src(X), dst(X), plus(act_cls=nn.ReLU).eval()(X)
    assert (ref - untransferred).abs().max() > 1e-2  # the comparison can fail
    assert (ref - out).abs().max() <= 1e-4

def test_transfer_with_mish_is_a_warm_start_and_bn_1st_copies():
    src = randomize_bn(timm.create_model('res2net50d')).eval()
    dst = res2netplus50().eval(); load_weights(dst, src.state_dict())
    assert torch.equal(dst.layer3[2].conv3.weight, src.layer3[2].conv3.weight)
    assert torch.allclose(dst.layer2[0].bn1.running_var, torch.full_like(dst.layer2[0].bn1.running_var, 1 - 1e-5))
    classic = res2netplus50(bn_1st=True, act_cls=nn.ReLU).eval(); load_weights(classic, src.state_dict())
    assert torch.equal(classic.stem1[1].weight, src.conv1[1].weight)  # BN copied, nothing folded
    with torch.no_grad(): assert (classic(X) - src(X)).abs().max() <= 1e-4

def test_weights_file_both_formats_roundtrip(tmp_path):
    src = randomize_bn(res2netplus50(n_out=7)).eval()
    safetensors.torch.save_file(src.state_dict(), tmp_path/'w.safetensors')
    torch.save({'state_dict': src.state_dict()}, tmp_path/'w.pth')
    for f in ('w.safetensors', 'w.pth'):
        m = res2netplus50(n_out=7, weights=tmp_path/f).eval()
        with torch.no_grad(): assert torch.equal(m(X), src(X))

def test_v1b_file_into_plus_and_imagenet_head_reinit(tmp_path):
    src = randomize_bn(timm.create_model('res2net50d')).eval()
    torch.save(src.state_dict(), tmp_path/'res2net50d_v1b.pth')
    m = res2netplus50(weights=tmp_path/'res2net50d_v1b.pth', n_out=10, act_cls=nn.ReLU).eval()
    assert m.fc.out_features == 10
    with torch.no_grad(): assert (m.forward_features(X) - src.forward_features(X)).abs().max() <= 1e-4

def test_in_chans_adapted_from_rgb_weights(tmp_path):
    src = randomize_bn(res2net50d()).eval()
    safetensors.torch.save_file(src.state_dict(), tmp_path/'w.safetensors')
    m = res2net50d(weights=tmp_path/'w.safetensors', in_chans=1).eval()
    gray = X.mean(1, keepdim=True)
    with torch.no_grad():  # timm's adapt_input_conv sums the RGB filters: a grey image gives the same features
        assert (m(gray) - src(gray.expand(-1, 3, -1, -1))).abs().max() <= 1e-3

@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    "An offline Hugging Face cache with a checkpoint under timm's hub id `timm/res2net50d.in1k`: (folder, source net)"
    src = randomize_bn(timm.create_model('res2net50d')).eval()
    repo = tmp_path/'hub'/'models--timm--res2net50d.in1k'
    (repo/'snapshots'/('0'*40)).mkdir(parents=True); (repo/'refs').mkdir()
    safetensors.torch.save_file(src.state_dict(), repo/'snapshots'/('0'*40)/'model.safetensors')
    (repo/'refs'/'main').write_text('0'*40)
    monkeypatch.setattr('res2netplus.weights.hub_reachable', lambda *a, **k: False)
    return tmp_path/'hub', src

def test_pretrained_true_goes_through_timms_hub_cache(hub_cache, monkeypatch):
    import huggingface_hub.constants as C
    folder, src = hub_cache
    monkeypatch.setattr(C, 'HF_HUB_CACHE', str(folder))
    plain = res2net50d(pretrained=True).eval()
    plus = res2netplus50(weights='DEFAULT', act_cls=nn.ReLU).eval()
    with torch.no_grad():
        assert torch.equal(plain(X), src(X))
        assert (plus(X) - src(X)).abs().max() <= 1e-4

def test_cache_dir_is_passed_to_timm(hub_cache):
    folder, src = hub_cache
    m = timm.create_model('res2netplus50', pretrained=True, cache_dir=folder, act_cls=nn.ReLU).eval()
    with torch.no_grad(): assert (m(X) - src(X)).abs().max() <= 1e-4

def test_timm_pretrained_cfg_overlay_file(tmp_path):
    src = randomize_bn(timm.create_model('res2net50d')).eval()
    safetensors.torch.save_file(src.state_dict(), tmp_path/'v1b.safetensors')
    m = timm.create_model('res2netplus50', pretrained=True, act_cls=nn.ReLU,
                          pretrained_cfg_overlay=dict(file=str(tmp_path/'v1b.safetensors'))).eval()
    with torch.no_grad(): assert (m(X) - src(X)).abs().max() <= 1e-4
    fresh = timm.create_model('res2netplus50', pretrained=False,
                              pretrained_cfg_overlay=dict(file=str(tmp_path/'v1b.safetensors')))
    # as in timm: no file without pretrained
    assert not torch.equal(fresh.layer1[0].conv3.weight, m.layer1[0].conv3.weight)

def test_offline_without_cache_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, 'HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setattr('res2netplus.weights.hub_reachable', lambda *a, **k: False)
    fix = r"weights='path/to/res2net50_26w_4s.safetensors'.*pretrained=False"
    with pytest.raises(WeightsUnavailableError, match=fix):
        res2net50_26w_4s(pretrained=True)

def test_mismatched_files_list_the_keys(tmp_path):
    safetensors.torch.save_file(res2net50_26w_4s().state_dict(), tmp_path/'other_arch.safetensors')
    keys = r'(?s)missing keys: .*in all.*unexpected keys: .*conv1.weight.*shape mismatches: .*Fix:'
    with pytest.raises(ValueError, match=keys):
        res2netplus50(weights=tmp_path/'other_arch.safetensors')
    safetensors.torch.save_file(res2netplus50(n_out=10).state_dict(), tmp_path/'ten.safetensors')
    with pytest.raises(ValueError, match=r'shape mismatches: fc.bias \(10,\) vs \(5,\)'):
        res2netplus50(weights=tmp_path/'ten.safetensors', n_out=5)
    safetensors.torch.save_file(res2net50d(in_chans=1).state_dict(), tmp_path/'gray.safetensors')
    with pytest.raises(ValueError, match=r'in_chans=1'): res2net50d(weights=tmp_path/'gray.safetensors')

def test_truncated_and_foreign_files(tmp_path):
    torch.save(res2netplus50().state_dict(), tmp_path/'w.pth')
    data = (tmp_path/'w.pth').read_bytes()
    (tmp_path/'cut.pth').write_bytes(data[:len(data)//3])
    with pytest.raises(ValueError, match='truncated'): res2netplus50(weights=tmp_path/'cut.pth')
    (tmp_path/'note.pth').write_text('not a checkpoint')
    with pytest.raises(ValueError, match='download it again'): res2netplus50(weights=tmp_path/'note.pth')
    with pytest.raises(FileNotFoundError, match='pretrained=False'): res2netplus50(weights=tmp_path/'missing.pth')

def test_pickles_are_not_executed(tmp_path):
    "weights_only loading refuses arbitrary objects"
    class Evil:
        def __reduce__(self): return (print, ('pwned',))
    torch.save({'model': Evil()}, tmp_path/'evil.pth')
    with pytest.raises(ValueError, match='Could not read'): read_weights(tmp_path/'evil.pth')

def test_sha256_check(tmp_path):
    safetensors.torch.save_file(res2net50d().state_dict(), tmp_path/'w.safetensors')
    digest = hashlib.sha256((tmp_path/'w.safetensors').read_bytes()).hexdigest()
    assert read_weights(tmp_path/'w.safetensors', sha256=digest[:16])
    with pytest.raises(ValueError, match='sha256'): read_weights(tmp_path/'w.safetensors', sha256='deadbeef')

def test_v1b_weights_into_a_deeper_or_wider_plus_variant_name_the_keys():
    "transfer_v1b_to_plus read blocks the file does not have: a bare KeyError instead of the message naming the fix"
    from res2netplus.models import res2netplus50_26w_8s
    sd = res2net50d(layers=(1, 1, 1, 1)).state_dict()
    for model in (res2netplus50(layers=(1, 1, 2, 1)), res2netplus50_26w_8s(layers=(1, 1, 1, 1))):
        with pytest.raises(ValueError, match=r'(?s)does not fit.*missing keys: layer.*Fix: pick the variant'):
            load_weights(model, sd)
    with pytest.raises(ValueError, match=r'missing keys: .*act.weight'):
        load_weights(res2netplus50(layers=(1, 1, 1, 1), act_cls=nn.PReLU), sd)

def test_a_file_of_another_variant_names_the_variant_it_was_given_to(tmp_path):
    "issue 26: the message said 'does not fit Res2Net', not which of the 20 variants"
    safetensors.torch.save_file(res2net50d().state_dict(), tmp_path/'res2net50d.safetensors')
    names_the_variant = r'(?s)res2net50d.safetensors does not fit res2net101d \(.*missing keys: layer3'
    with pytest.raises(ValueError, match=names_the_variant):
        res2net101d(weights=tmp_path/'res2net50d.safetensors')
    # a model made by the factories (or timm.create_model) carries its name for later load_weights calls
    with pytest.raises(ValueError, match=r'^the checkpoint does not fit res2net101d \('):
        load_weights(res2net101d(), res2net50d().state_dict())

def test_checkpoints_without_batchnorm_step_counters_load():
    "torch's own load_state_dict accepts them (converted and older checkpoints); the key check refused them"
    source = randomize_bn(res2net50d(layers=(1, 1, 1, 1))).eval()
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith('num_batches_tracked')}
    model = load_weights(res2net50d(layers=(1, 1, 1, 1)), sd).eval()
    torch.testing.assert_close(model(X), source(X))

def test_weights_of_the_wrong_type_name_the_fix(tmp_path):
    for wrong in (True, res2net50d().state_dict()):
        with pytest.raises(TypeError, match=r'path of a .safetensors or .pth file.*pretrained=True.*load_weights'):
            res2netplus50(weights=wrong)
    safetensors.torch.save_file(res2net50d(layers=(1, 1, 1, 1)).state_dict(), tmp_path/'w.safetensors')
    with pytest.raises(ValueError, match='hex digest'): read_weights(tmp_path/'w.safetensors', sha256='')

def test_default_names_the_imagenet_weights_in_any_case_and_a_path_never():
    "torchvision's weights='DEFAULT': the model factories, the learners and a continued run read it alike"
    from pathlib import Path
    from res2netplus.weights import names_imagenet, backbone_weights
    assert [names_imagenet(w) for w in ('DEFAULT', 'default', Path('DEFAULT'), 'w.safetensors', None)] == [
        True, True, False, False, False]
    assert backbone_weights('default') == 'default' and backbone_weights(None) is None
