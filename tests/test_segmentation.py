"Segmentation heads and the segmentation learner: shapes, training on generated shapes, export, weights, mixing"
import gc, pytest, torch
from fastai.optimizer import ranger
import torch.nn.functional as F
from torch import nn
from fastai.vision.all import (Adam, DataBlock, ImageBlock, MaskBlock, RandomSplitter, load_learner, set_seed,
                               unet_learner)
from res2netplus.segmentation import (SEG_HEADS, create_seg_model, res2netplus_seg_learner, SegmentationLoss, MeanIoU,
                                      MeanDice, FPNSegmentation, DeepLabV3Plus, seg_classifier, class_frequencies,
                                      init_class_prior)
from res2netplus.data import make_shapes, MaskFromImage, read_codes, image_files
from res2netplus.augment import MixUp, Mixer
from res2netplus.models import res2netplus50
from conftest import tiny_plus

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes')/'s', n_images=16, size=64, seed=1)

def shape_dls(path, bs=4, size=None):
    from fastai.vision.all import Resize
    block = DataBlock((ImageBlock, MaskBlock(read_codes(path/'codes.txt'))), get_items=image_files,
                      get_y=MaskFromImage(path/'masks'), splitter=RandomSplitter(0.25, seed=0),
                      item_tfms=Resize(size) if size else None)
    return block.dataloaders(path/'images', bs=bs, num_workers=0)

@pytest.mark.parametrize('head', list(SEG_HEADS))
@pytest.mark.parametrize('output_stride', [32, 16, 8])
def test_head_output_at_input_size(head, output_stride):
    m = create_seg_model('res2netplus50', 5, head, img_size=(64, 64), output_stride=output_stride).eval()
    for size in ((64, 64), (45, 67), (96, 33)):
        with torch.no_grad(): assert m(torch.randn(2, 3, *size)).shape == (2, 5, *size)

@pytest.mark.parametrize('head', list(SEG_HEADS))
def test_loss_drops_and_iou_rises_on_shapes(shapes, head):
    set_seed(0)
    # the U-Net on its old settings: with the prior init its loss starts at the masks' entropy (0.59), and Adam at
    # 2e-3 rose to 1.8 before falling to 0.76 in these 18 steps (issue 25: the U-Net's default is still open)
    old = dict(init_prior=None, opt_func=ranger) if head == 'unet' else {}
    learn = res2netplus_seg_learner(shape_dls(shapes), 'res2netplus50', head=head, mix=None, **old)
    before = learn.validate()
    learn.fit_recipe(6, 2e-3)
    losses = [float(l) for l in learn.recorder.losses]
    assert losses[-1] < 0.75 * losses[0], losses  # smoothed training loss
    # [train_loss, valid_loss, dice, mean_iou] after; [valid_loss, dice, mean_iou] before
    after = learn.recorder.values[-1]
    # Held out, 18 steps teach the background first: mean IoU must not fall (fpn: 0.146 -> 0.187, deeplabv3plus: level).
    # The shapes themselves take longer than a CPU test affords: the command-line tests train on them end to end.
    assert after[3] >= before[2] - 1e-6, (before, after)

@pytest.mark.parametrize('head', ['fpn', 'deeplabv3plus'])
def test_export_round_trip_and_show_results(shapes, head, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    learn = res2netplus_seg_learner(shape_dls(shapes), 'res2net50d', head=head, mix='mixup', dice_weight=0.5,
                                    path=tmp_path)
    learn.fit(1, 1e-3)
    assert learn.loss_func.dice_weight == 0.5 and torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    learn.show_results(max_n=2)
    learn.export('m.pkl')
    again = load_learner(tmp_path/'m.pkl')
    img = image_files(shapes/'images')[0]
    p0, p1 = learn.predict(img), again.predict(img)
    assert (p0[0] == p1[0]).all() and torch.allclose(p0[2], p1[2], atol=1e-5) and p0[0].shape == (64, 64)
    assert not any(isinstance(cb, Mixer) and cb.training for cb in again.cbs)

def test_odd_sizes_return_masks_at_the_input_size(shapes):
    "Not a multiple of 32: the heads pad and crop, DynamicUnet resizes; predictions match the input"
    dls = shape_dls(shapes, bs=2, size=(45, 71))
    for head in SEG_HEADS:
        learn = res2netplus_seg_learner(dls, 'res2net50d', head=head, mix='cutmix')
        learn.fit(1, 1e-3)
        preds, targs = learn.get_preds()
        assert preds.shape[-2:] == targs.shape[-2:] == (45, 71), head

def test_segmentation_dataloaders_and_unet_options(seg_dls):
    "fastai's SegmentationDataLoaders; U-Net with self-attention and blur; one-channel input"
    learn = res2netplus_seg_learner(seg_dls, res2netplus50, head='unet', self_attention=True, blur=True, mix=None)
    assert any('SelfAttention' in type(m).__name__ for m in learn.model.modules())
    # on a CPU a U-Net step ran slower channels_last
    assert not any(type(cb).__name__ == 'ChannelsLast' for cb in learn.cbs)
    learn.fit(1, 1e-3)
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    del learn; gc.collect()  # one 339 M-parameter U-Net with its optimiser state at a time
    with torch.no_grad():
        m = create_seg_model(res2netplus50, 2, 'unet', img_size=(64, 64), n_in=1).eval()
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
        m = create_seg_model(res2netplus50, 2, 'deeplabv3plus', n_in=1).eval()
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
        del m; gc.collect()
        learn = unet_learner(seg_dls, res2netplus50, pretrained=False)  # fastai's own entry point keeps working
        assert learn.model(seg_dls.one_batch()[0]).shape[1] == 2

def test_weights_file_freezes_the_body_and_loads_it(seg_dls, tmp_path):
    import safetensors.torch
    src = res2netplus50()
    safetensors.torch.save_file(src.state_dict(), tmp_path/'w.safetensors')
    learn = res2netplus_seg_learner(seg_dls, 'res2netplus50', head='deeplabv3plus', weights=tmp_path/'w.safetensors',
                                    output_stride=8)
    body = learn.model.body
    # frozen like fastai's freeze: conv weights fixed, BatchNorm still trained (train_bn)
    assert not any(p.requires_grad for p in body[-1].parameters() if p.ndim > 1)
    assert all(p.requires_grad for p in learn.model.head.parameters())
    torch.testing.assert_close(body[4][0].conv1.weight, src.layer1[0].conv1.weight)
    assert body[-1][1].convs[0].dilation == (4, 4)

def test_mixup_weighs_the_pixel_loss_of_both_masks():
    "MixUp on masks with SegmentationLoss: λ-weighted per-pixel loss over labelled pixels, by hand"
    torch.manual_seed(0)
    pred, y = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    y[0, 0] = 255
    perm, lam = torch.tensor([1, 0]), torch.tensor([0.7, 0.2])
    mixer = MixUp(); mixer.user_loss = SegmentationLoss(dice_weight=0.3)
    mixer.learn = type('L', (), {'training': True})()
    w = lam.view(2, 1, 1).expand(2, 4, 4)
    mixer.weights, mixer.perm_yb = [w], [y[perm]]
    got = mixer.loss(pred, y)
    per_pixel = SegmentationLoss(dice_weight=0.3, reduction='none')
    l1, l2 = per_pixel(pred, y), per_pixel(pred, y[perm])
    v1, v2 = (y != 255).float(), (y[perm] != 255).float()
    torch.testing.assert_close(got, (w*l1 + (1-w)*l2).sum() / (w*v1 + (1-w)*v2).sum())

def test_bad_input_says_how_to_fix(seg_dls):
    with pytest.raises(ValueError, match='Unknown head'): res2netplus_seg_learner(seg_dls, head='pspnet')
    with pytest.raises(ValueError, match='output_stride must be 8, 16 or 32'):
        res2netplus_seg_learner(seg_dls, head='fpn', output_stride=4)
    with pytest.raises(ValueError, match='Did you mean'): res2netplus_seg_learner(seg_dls, 'res2netplus5')
    with pytest.raises(ValueError, match='n_in=4'):
        create_seg_model(res2netplus50, 2, 'fpn').eval()(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='do not match'):
        SegmentationLoss()(torch.randn(2, 3, 8, 8), torch.zeros(2, 4, 4, dtype=torch.long))

def test_a_non_res2net_factory_is_refused_with_the_fix():
    "fastai's habit unet_learner(dls, resnet34) ended in a TypeError from inside torchvision"
    from torchvision.models import resnet34
    from res2netplus.detection import res2net_fpn_backbone
    for build in (lambda: create_seg_model(resnet34, 2, 'fpn'), lambda: res2net_fpn_backbone(resnet34)):
        fix = r"arch=resnet34 is not a Res2Net factory \(.*pretrained.*\): pass one such as res2netplus50"
        with pytest.raises(ValueError, match=fix): build()

@pytest.mark.slow
@pytest.mark.parametrize('head', ['fpn', 'deeplabv3plus'])
def test_compile_trains_our_heads_and_refuses_the_unet(seg_dls, head):
    """compile=True: the FPN and DeepLabV3+ heads train compiled (and predict as uncompiled); fastai's U-Net, which the
    compiler cannot trace, is refused with the fix"""
    from torch._dynamo.utils import counters
    with pytest.raises(ValueError, match="Use the 'fpn' or 'deeplabv3plus' head"):
        res2netplus_seg_learner(seg_dls, tiny_plus, compile=True)
    from res2netplus.learner import compile_learner
    # compiled afterwards, as any Learner can be: refused too, not a RecursionError at the first batch
    unet = res2netplus_seg_learner(seg_dls, tiny_plus)
    with pytest.raises(ValueError, match="fastai's U-Net does not compile"): compile_learner(unet)
    assert unet.model._compiled_call_impl is None
    learn = res2netplus_seg_learner(seg_dls, tiny_plus, head=head, mix=None, compile=True)
    graphs = counters['stats']['unique_graphs']
    learn.fit(1, 1e-3)
    assert counters['stats']['unique_graphs'] > graphs
    assert torch.isfinite(torch.tensor(learn.recorder.values[-1][:2])).all()
    x = seg_dls.one_batch()[0].cpu()
    model = learn.model.eval()
    with torch.no_grad(): assert torch.allclose(model(x), model._call_impl(x), rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize('head', list(SEG_HEADS))
def test_init_prior_starts_the_softmax_at_the_class_frequencies(head):
    "The classifier's bias is log(prior): with its weights at zero every pixel predicts exactly the prior"
    model = create_seg_model(tiny_plus, 3, head, img_size=(64, 64))
    init_class_prior(model, [0.7, 0.2, 0.1])
    conv = seg_classifier(model)
    assert conv.out_channels == 3
    torch.testing.assert_close(conv.bias.softmax(0), torch.tensor([0.7, 0.2, 0.1]))
    with torch.no_grad():
        conv.weight.zero_()
        probs = model.eval()(torch.randn(2, 3, 64, 64)).softmax(1)
    torch.testing.assert_close(probs, torch.tensor([0.7, 0.2, 0.1]).view(1, 3, 1, 1).expand_as(probs))

def test_learner_sets_the_prior_from_the_training_masks(seg_dls):
    "init_prior='auto' (the default): the foreground share of the training masks; None: the head's own (near 0.5)"
    ys = torch.cat([torch.as_tensor(y).flatten() for _, y in seg_dls.train])
    fg = float((ys == 1).float().mean())
    assert 0.05 < fg < 0.3
    torch.testing.assert_close(class_frequencies(seg_dls, 2), torch.tensor([1 - fg, fg]))
    learn = res2netplus_seg_learner(seg_dls, tiny_plus, head='fpn', mix=None)
    assert learn.opt_func is Adam  # not ranger: see the notebook's learner section
    torch.testing.assert_close(seg_classifier(learn.model).bias.softmax(0), torch.tensor([1 - fg, fg]))
    learn = res2netplus_seg_learner(seg_dls, tiny_plus, head='fpn', mix=None, init_prior=None)
    bias = seg_classifier(learn.model).bias
    assert bias.abs().max() <= 128 ** -0.5 and not torch.allclose(bias.softmax(0), torch.tensor([1 - fg, fg]), atol=0.1)
    with pytest.raises(ValueError, match=r'one positive frequency per class \(2\), got \[0\.5, 0\.3'):
        res2netplus_seg_learner(seg_dls, tiny_plus, head='fpn', init_prior=[0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match="init_prior must be 'auto', None"):
        res2netplus_seg_learner(seg_dls, tiny_plus, head='fpn', init_prior='data')
