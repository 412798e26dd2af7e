"The recipe's learner: fit_recipe on a pretrained (frozen) body, and the recipe's parts in place."
import pytest, torch
import safetensors.torch
from res2netplus.models import res2net50d
from conftest import tiny_plus
from res2netplus.learner import res2netplus_learner, RECIPE, SHORT_RECIPE, BUDGET
from res2netplus.augment import CutMix, MixUp, Mixer

def test_fit_recipe_unfreezes_a_pretrained_body_like_fine_tune(dls, tmp_path):
    safetensors.torch.save_file(res2net50d().state_dict(), tmp_path/'in1k.safetensors')
    learn = res2netplus_learner(dls, 'res2netplus50', weights=tmp_path/'in1k.safetensors', pretrained=True)
    body = [p for p in learn.splitter(learn.model)[1] if p.ndim > 1]
    assert not any(p.requires_grad for p in body)  # frozen by vision_learner, as for fine_tune
    assert any(isinstance(cb, CutMix) for cb in learn.cbs) and learn.opt_func is RECIPE['opt_func']
    start = [p.detach().clone() for p in body[:3]]
    learn.fit_recipe(1, freeze_epochs=1)
    assert len(learn.recorder.values) == 1 and all(p.requires_grad for p in body)  # the last fit trained everything
    assert learn.opt.param_groups[0]['lr'] < learn.opt.param_groups[-1]['lr']  # discriminative rates, body lower
    assert any(not torch.equal(a, b) for a, b in zip(start, body[:3]))
    assert learn.loss_func.__class__.__name__ == 'LabelSmoothingCrossEntropyFlat'

def test_fit_recipe_fits_the_schedule_to_the_run(dls, monkeypatch):
    "A short run: Adam, one cycle, no mixing; a long one (in steps and epochs): ranger, flat then cosine, CutMix"
    learn = res2netplus_learner(dls, 'res2netplus50')
    calls = []
    for name in ('fit_one_cycle', 'fit_flat_cos'):
        monkeypatch.setattr(type(learn), name, lambda self, n, lr, name=name, **kw: calls.append((name, n, lr)))
    learn.fit_recipe(3)
    assert learn.opt_func is SHORT_RECIPE['opt_func'] and not any(isinstance(cb, Mixer) for cb in learn.cbs)
    long = max(BUDGET['mix_epochs'], -(-BUDGET['ranger_steps'] // len(dls.train)))
    learn.fit_recipe(long)
    assert learn.opt_func is RECIPE['opt_func'] and [type(cb) for cb in learn.cbs if isinstance(cb, Mixer)] == [CutMix]
    assert calls == [('fit_one_cycle', 3, SHORT_RECIPE['lr']), ('fit_flat_cos', long, RECIPE['lr'])]

@pytest.mark.parametrize('channels_last', [None, False])
def test_trains_channels_last_unless_told_not_to(dls, channels_last):
    "channels_last by default (faster on CPUs too: oneDNN's NCHW convs are slow on 26-channel splits); False keeps NCHW"
    learn = res2netplus_learner(dls, 'res2netplus50', mix=None, channels_last=channels_last)
    learn.fit(1, 1e-3)
    # a 1×1 kernel is dense in both layouts
    weights = [p for p in learn.model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    cl = [w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights]
    assert all(cl) if channels_last is None else not any(cl)
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
    out = learn.model.eval()(dls.one_batch()[0].cpu())
    assert out.shape == (8, 2)

def test_a_weights_file_is_fine_tuned_like_pretrained_weights(dls, tmp_path):
    "weights= without pretrained=True: ImageNet statistics and a frozen body, as pretrained=True (not a random start)"
    safetensors.torch.save_file(res2net50d().state_dict(), tmp_path/'in1k.safetensors')
    learn = res2netplus_learner(dls, 'res2netplus50', weights=tmp_path/'in1k.safetensors')
    assert not any(p.requires_grad for p in learn.splitter(learn.model)[1] if p.ndim > 1)
    assert any(type(t).__name__ == 'Normalize' for t in learn.dls.after_batch.fs)

def test_a_file_fine_tuned_on_another_task_starts_a_learner_read_once(dls, seg_dls, tmp_path, monkeypatch):
    "A v1b file with 7 classes: the learners cut its classifier off, so any size loads; the bare model still refuses"
    import res2netplus.weights
    from res2netplus.models import res2netplus50
    from res2netplus.segmentation import res2netplus_seg_learner
    from res2netplus.weights import transfer_v1b_to_plus
    source = res2net50d(n_out=7)
    safetensors.torch.save_file(source.state_dict(), tmp_path/'task7.safetensors')
    reads = []
    read = res2netplus.weights.read_weights
    monkeypatch.setattr(res2netplus.weights, 'read_weights', lambda *a, **kw: reads.append(a) or read(*a, **kw))
    learn = res2netplus_learner(dls, 'res2netplus50', weights=tmp_path/'task7.safetensors', pretrained_act='relu')
    assert len(reads) == 1 and learn.model[1][-1].out_features == 2  # pretrained_act read the same copy
    plus = res2netplus50()
    expected = transfer_v1b_to_plus(source.state_dict(), plus)
    torch.testing.assert_close(learn.model[0][0][0].weight, expected['stem1.0.weight'])  # the body is the file's
    seg = res2netplus_seg_learner(seg_dls, 'res2netplus50', head='fpn', weights=tmp_path/'task7.safetensors')
    torch.testing.assert_close(seg.model.body[0][0].weight, expected['stem1.0.weight'])
    with pytest.raises(ValueError, match=r'(?s)fc.weight \(7, 2048\) vs \(1000, 2048\).*n_out= its number of classes'):
        res2netplus50(weights=tmp_path/'task7.safetensors')  # here the classifier is kept: its size must fit

def test_a_mixer_in_cbs_and_another_named_by_mix_are_refused(dls):
    "mix='mixup' beside cbs=[CutMix()] trained with CutMix alone, silently; the default mix gives way to the user's"
    with pytest.raises(ValueError, match=r"mix='mixup' asks for MixUp, but cbs already hold CutMix"):
        res2netplus_learner(dls, 'res2netplus50', mix='mixup', cbs=[CutMix()])
    mine = CutMix(p=0.5)
    for mix in (RECIPE['mix'], None):  # the default (CutMix) and no mixer give way to the user's
        learn = res2netplus_learner(dls, 'res2netplus50', mix=mix, cbs=mine)
        assert [cb for cb in learn.cbs if isinstance(cb, Mixer)] == [mine]
    learn = res2netplus_learner(dls, 'res2netplus50', cbs=[MixUp()])
    assert [type(cb) for cb in learn.cbs if isinstance(cb, Mixer)] == [MixUp]

@pytest.mark.slow
def test_compile_trains_the_compiled_model_and_exports_the_eager_one(dls, tmp_path):
    """compile=True: torch.compile in place (fastai's callbacks, splitter and keys unchanged); the compiled model
    trains, predicts as the eager one does, and learn.export() pickles it uncompiled"""
    from torch._dynamo.utils import counters
    from fastai.learner import load_learner
    eager = res2netplus_learner(dls, tiny_plus, mix=None)
    learn = res2netplus_learner(dls, tiny_plus, mix=None, compile=True, path=tmp_path)
    assert learn.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    assert type(learn.model) is type(eager.model) and learn.model.state_dict().keys() == eager.model.state_dict().keys()
    graphs = counters['stats']['unique_graphs']
    learn.fit(1, 1e-3)
    assert counters['stats']['unique_graphs'] > graphs  # the training and validation passes ran compiled
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
    x = dls.one_batch()[0].cpu().contiguous(memory_format=torch.channels_last)  # a TensorImage, as fastai batches are
    model = learn.model.eval()
    with torch.no_grad(): compiled, plain = model(x), model._call_impl(x)
    assert torch.allclose(compiled, plain, rtol=1e-4, atol=1e-4)
    learn.export('export.pkl')
    loaded = load_learner(tmp_path/'export.pkl')
    assert getattr(loaded.model, '_compiled_call_impl', None) is None
    with torch.no_grad(): assert torch.allclose(loaded.model.eval()(x), plain, rtol=1e-4, atol=1e-4)

def test_save_best_weights_skips_an_epoch_without_its_metric(tmp_path):
    "A metric that could not be measured (box AP of a validation split without objects) saves nothing, and warns"
    from fastai.vision.all import Learner, DataLoaders, Metric
    from res2netplus.learner import SaveBestWeights
    class Unmeasured(Metric):
        name = 'box_AP'
        def reset(self): pass
        def accumulate(self, learn): pass
        @property
        def value(self): return None
    xs = torch.randn(16, 2)
    data = list(zip(xs, xs.sum(1, keepdim=True)))
    dls = DataLoaders.from_dsets(data, data, bs=8)
    learn = Learner(dls, torch.nn.Linear(2, 1), loss_func=torch.nn.MSELoss(), metrics=Unmeasured(), path=tmp_path)
    with pytest.warns(UserWarning, match='no box_AP this epoch'), learn.no_bar(), learn.no_logging():
        learn.fit(2, 0.01, cbs=SaveBestWeights(monitor='box_AP'))
    assert not (tmp_path/'best.safetensors').exists()

def test_cpu_auto_precision_is_bf16_for_classification_only_where_native(dls, seg_dls):
    "precision='auto' on a CPU: bf16 for res2netplus_learner where native, float32 for segmentation (unmeasured)"
    from res2netplus.learner import CPUAutocast, native_bf16
    from res2netplus.segmentation import res2netplus_seg_learner
    if torch.cuda.is_available(): pytest.skip('the CPU default')
    def autocasts(learn): return sum(isinstance(cb, CPUAutocast) for cb in learn.cbs)
    assert autocasts(res2netplus_learner(dls, 'res2netplus50', mix=None)) == int(native_bf16())
    assert autocasts(res2netplus_seg_learner(seg_dls, 'res2netplus50', head='fpn')) == 0
    assert autocasts(res2netplus_seg_learner(seg_dls, 'res2netplus50', head='fpn', precision='bf16')) == 1
