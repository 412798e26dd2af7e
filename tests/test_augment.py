"Mixing callbacks (maths, targets, training only, loss restored, training works) and the albumentations bridge."
import pickle
import numpy as np, pytest, torch
import albumentations as A, cv2
import torch.nn.functional as F
from hypothesis import given, settings, HealthCheck, strategies as st
from torch import nn
from PIL import Image
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.callback.core import Callback, CancelFitException
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat, BCEWithLogitsLossFlat
from fastai.vision.core import PILImage, PILMask, TensorBBox
from fastai.torch_core import TensorMultiCategory
from res2netplus.augment import (MixUp, CutMix, MixUpCutMix, AlbumentationsTransform, res2netplus_augs, BOX_PARAMS,
                                 mix_callback)

class Grab(Callback):
    "Keep the first training batch as the model sees it (after mixing), then stop"
    order = 50
    def before_batch(self):
        if self.training: self.xb_, self.yb_ = self.xb, self.yb
    def after_loss(self):
        if self.training: self.loss_ = self.learn.loss.detach(); raise CancelFitException()

def tiny_learner(xs, ys, loss_func, n_out, dense=False, bs=8):
    "A learner over tensors `xs`, `ys` with a small conv net (per-pixel output when `dense`)"
    ds = list(zip(xs, ys))
    dls = DataLoaders.from_dsets(ds, ds, bs=bs, shuffle=False, num_workers=0)
    if dense: model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, n_out, 3, padding=1))
    else: model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                nn.Linear(256, n_out))
    return Learner(dls, model, loss_func=loss_func, lr=3e-3)

def index_images(n=8, h=12, w=10):
    "Images whose every pixel holds the sample's index, so a mixed pixel tells where it came from"
    return torch.arange(float(n)).view(n, 1, 1, 1).expand(n, 3, h, w).clone()

def grab(learn, cb):
    g = Grab(); learn.fit(1, cbs=[cb, g]); return g

class Peek(Callback):
    "Copy the mixer's λ and partner targets of the first training batch"
    order = 10
    def __init__(self, mixer): self.mixer, self.seen = mixer, {}
    def before_batch(self):
        if self.training and not self.seen:
            self.seen.update(lam=self.mixer.lam.clone(), yp=self.mixer.perm_yb[0].clone())

def fit_one_batch(learn, mixer):
    peek, g = Peek(mixer), Grab()
    learn.fit(1, cbs=[mixer, peek, g])
    return g.xb_[0], g.yb_[0], g.loss_, peek.seen['lam'], peek.seen['yp']

def test_index_targets_loss_is_lambda_weighted():
    torch.manual_seed(0)
    xs, ys = index_images(), torch.arange(8) % 3
    idx = torch.arange(8.)
    for mixer in (MixUp, CutMix):
        for lf, lf_none in ((CrossEntropyLossFlat(), CrossEntropyLossFlat(reduction='none')),
                            (LabelSmoothingCrossEntropyFlat(eps=0.1),
                             LabelSmoothingCrossEntropyFlat(eps=0.1, reduction='none'))):
            learn = tiny_learner(xs, ys, lf, 3)
            x, y, loss, lam, yp = fit_one_batch(learn, mixer())
            assert torch.equal(y, ys)  # class indices are not edited
            # CutMix: λ is the share of pixels still showing the sample's own index (unless paired with itself)
            if mixer is CutMix:
                own = (x[:, 0] == idx.view(8, 1, 1)).float().flatten(1).mean(1)
                torch.testing.assert_close(own[own < 1], lam[own < 1])
                assert (own < 1).sum() >= 4
            else:  # every pixel is λ·i + (1−λ)·j, with j the partner whose label is yp
                ok = (1 - lam) > 0.05
                j = ((x[:, 0, 0, 0] - lam*idx)/(1 - lam))[ok]
                torch.testing.assert_close(j, j.round(), atol=1e-3, rtol=0)
                assert torch.equal(ys[j.round().long()], yp[ok])
            with torch.no_grad(): pred = learn.model(x)
            expected = (lam*lf_none(pred, ys) + (1 - lam)*lf_none(pred, yp)).mean()
            torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
            assert learn.loss_func is lf  # the user's loss is back

def test_mixup_lambda_and_soft_targets():
    torch.manual_seed(1)
    xs = torch.rand(8, 3, 8, 8)
    onehot = F.one_hot(torch.arange(8) % 4, 4).float()
    learn = tiny_learner(xs, onehot, BCEWithLogitsLossFlat(), 4)
    x, y, loss, lam, yp = fit_one_batch(learn, MixUp(alpha=1.))
    assert lam.std() > 0  # one λ per sample
    torch.testing.assert_close(y.sum(1), torch.ones(8))  # mixed label weights sum to one
    torch.testing.assert_close(y, lam[:, None]*onehot + (1 - lam[:, None])*yp)
    with torch.no_grad(): torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(learn.model(x), y))

def test_integer_multi_hot_targets_are_blended():
    "BCEWithLogitsLossFlat takes 0/1 integer targets; mixing weighed them as class indices, refused with a wrong fix"
    torch.manual_seed(3)
    xs, multi_hot = torch.rand(8, 3, 8, 8), (torch.rand(8, 5) > .5).long()
    learn = tiny_learner(xs, multi_hot, BCEWithLogitsLossFlat(), 5)
    x, y, loss, lam, yp = fit_one_batch(learn, MixUp(alpha=1.))
    torch.testing.assert_close(y, lam[:, None]*multi_hot + (1 - lam[:, None])*yp)
    with torch.no_grad(): torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(learn.model(x), y))

def test_cutmix_masks_pasted_like_the_images():
    torch.manual_seed(2)
    xs = index_images(8, 16, 12)
    masks = torch.arange(8).view(8, 1, 1).expand(8, 16, 12).clone()
    learn = tiny_learner(xs, masks, CrossEntropyLossFlat(axis=1), 8, dense=True)
    cb = CutMix(); g = grab(learn, cb)
    x, m = g.xb_[0], g.yb_[0]
    assert torch.equal(x[:, 0].long(), m)  # the same box is pasted in image and mask
    assert (m != masks).any()
    with torch.no_grad(): expected = F.cross_entropy(learn.model(x), m)
    torch.testing.assert_close(g.loss_, expected, atol=1e-5, rtol=1e-5)

@pytest.mark.parametrize('h,w', [(10, 10), (9, 13)])
def test_mixup_masks_per_pixel_loss_with_ignore_index(h, w):
    torch.manual_seed(3)
    xs = torch.rand(4, 3, h, w)
    masks = torch.randint(0, 3, (4, h, w)); masks[:, 0, :] = 255  # ignored first row
    masks[0, :, 0] = 255
    lf = CrossEntropyLossFlat(axis=1, ignore_index=255)
    learn = tiny_learner(xs, masks, lf, 3, dense=True, bs=4)
    x, y, loss, lam, yp = fit_one_batch(learn, MixUp(alpha=1.))
    assert torch.equal(y, masks)
    for i in range(4):  # the partner mask belongs to the image blended in: x = λ·xs[i] + (1−λ)·xs[j]
        err = torch.stack([(x[i] - lam[i]*xs[i] - (1 - lam[i])*xs[j]).abs().max() for j in range(4)])
        assert torch.equal(yp[i], masks[int(err.argmin())])
    with torch.no_grad():
        pred = learn.model(x)
        l1 = F.cross_entropy(pred, y, ignore_index=255, reduction='none')
        l2 = F.cross_entropy(pred, yp, ignore_index=255, reduction='none')
        w = lam.view(-1, 1, 1)
        expected = (w*l1 + (1-w)*l2).sum() / (w*(y != 255) + (1-w)*(yp != 255)).sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)

def test_validation_and_get_preds_untouched():
    torch.manual_seed(4)
    xs, ys = torch.rand(8, 3, 8, 8), torch.arange(8) % 2
    learn = tiny_learner(xs, ys, CrossEntropyLossFlat(), 2)
    seen = []
    class Watch(Callback):
        order = 50
        def before_batch(self):
            if not self.training: seen.append(self.x.clone())
    learn.fit(1, cbs=[MixUpCutMix(), Watch()])
    torch.testing.assert_close(torch.cat(seen), xs)
    preds_plain = learn.get_preds()[0]
    learn.add_cb(CutMix())
    torch.testing.assert_close(learn.get_preds()[0], preds_plain)
    assert learn.validate()[0] == pytest.approx(float(CrossEntropyLossFlat()(learn.model(xs), ys)), rel=1e-5)

def test_loss_restored_when_training_is_cancelled():
    xs, ys = torch.rand(8, 3, 8, 8), torch.arange(8) % 2
    lf = CrossEntropyLossFlat()
    learn = tiny_learner(xs, ys, lf, 2)
    class Stop(Callback):
        def after_batch(self): raise CancelFitException()
    learn.fit(1, cbs=[CutMix(), Stop()])
    assert learn.loss_func is lf
    cb = CutMix(); learn.fit(1, cbs=[cb])
    assert learn.loss_func is lf and cb.weights is None and cb.lam is None  # nothing of the last batch kept for export

def test_two_mixers_are_refused():
    learn = tiny_learner(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, CrossEntropyLossFlat(), 2)
    with pytest.raises(ValueError, match='keep one'): learn.fit(1, cbs=[MixUp(), CutMix()])

def test_loss_without_per_sample_values_is_refused():
    xs, ys = torch.rand(8, 3, 8, 8), torch.arange(8) % 2
    learn = tiny_learner(xs, ys, lambda p, y: F.cross_entropy(p, y), 2)
    with pytest.raises(ValueError, match="reduction='none'"): learn.fit(1, cbs=[CutMix()])

@pytest.mark.parametrize('mix', ['mixup', 'cutmix', 'both'])
def test_training_with_mixing_lowers_the_loss(mix):
    "A learnable problem (the class is the bright quadrant) still trains under mixing"
    torch.manual_seed(5)
    n = 64
    ys = torch.arange(n) % 4
    xs = torch.rand(n, 3, 16, 16)*0.2
    for i, c in enumerate(ys.tolist()): xs[i, :, (c//2)*8:(c//2)*8+8, (c%2)*8:(c%2)*8+8] += 0.8
    learn = tiny_learner(xs, ys, CrossEntropyLossFlat(), 4, bs=16)
    before = learn.validate()[0]
    learn.fit(12, 1e-2, cbs=mix_callback(mix))
    assert learn.validate()[0] < 0.6*before

def test_mixer_alpha_must_be_positive():
    for make in (lambda: MixUp(alpha=0), lambda: CutMix(alpha=-1), lambda: MixUpCutMix(mixup_alpha=0)):
        with pytest.raises(ValueError, match='alpha > 0'): make()  # at construction, not at the first batch
    learn, mixer = tiny_learner(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, CrossEntropyLossFlat(), 2), MixUp()
    mixer.alpha = 0
    with pytest.raises(ValueError, match='alpha > 0'): learn.fit(1, cbs=[mixer])

def test_an_interrupted_fit_leaves_a_loss_that_predicts():
    "Ctrl-C (not a fastai cancel) skips the mixer's restore: the loss left in place still gives the user's decodes"
    xs, ys = torch.rand(8, 3, 8, 8), torch.arange(8) % 2
    lf = CrossEntropyLossFlat()
    learn = tiny_learner(xs, ys, lf, 2)
    class Interrupt(Callback):
        def after_batch(self): raise KeyboardInterrupt
    learn.add_cb(CutMix())  # as res2netplus_learner adds it
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=[Interrupt()])
    assert learn.loss_func is not lf  # still the mixer's
    probs = learn.get_preds(dl=learn.dls.valid)[0]
    torch.testing.assert_close(probs.sum(1), torch.ones(8))  # probabilities (the user's softmax), not logits
    assert learn.loss_func.decodes(probs).tolist() == probs.argmax(1).tolist()

def test_fastai_mixers_and_ours_together_are_refused():
    from fastai.callback.mixup import MixUp as FastaiMixUp
    learn = tiny_learner(torch.rand(8, 3, 8, 8), torch.arange(8) % 2, CrossEntropyLossFlat(), 2)
    with pytest.raises(ValueError, match="fastai's MixUp and res2netplus's CutMix.*mix=None"):
        learn.fit(1, cbs=[FastaiMixUp(), CutMix()])

# --- albumentations bridge ---------------------------------------------------------------------------------------

GEOMETRY = [A.HorizontalFlip(p=1), A.VerticalFlip(p=1), A.RandomRotate90(p=1), A.Transpose(p=1),
            A.RandomResizedCrop((24, 24), scale=(0.3, 1), interpolation=cv2.INTER_NEAREST, p=1),
            A.Affine(scale=(0.7, 1.3), translate_percent=(-0.2, 0.2), interpolation=cv2.INTER_NEAREST, p=1),
            A.Affine(rotate=(-45, 45), interpolation=cv2.INTER_NEAREST, p=1),
            A.PadIfNeeded(48, 48, border_mode=cv2.BORDER_CONSTANT, p=1), A.CenterCrop(12, 12, pad_if_needed=True, p=1)]

rect_items = st.tuples(st.integers(16, 40), st.integers(16, 40)).flatmap(lambda hw: st.tuples(
    st.just(hw), st.integers(0, hw[0] - 4), st.integers(0, hw[1] - 4), st.integers(3, hw[0]), st.integers(3, hw[1])))

def rect_image(hw, y0, x0, rh, rw):
    h, w = hw; y1, x1 = min(h, y0 + rh), min(w, x0 + rw)
    img = np.zeros((h, w, 3), np.uint8); img[y0:y1, x0:x1] = 255
    return img, (x0, y0, x1, y1)

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rect=rect_items, augs=st.lists(st.sampled_from(range(len(GEOMETRY))), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_masks_stay_aligned_under_random_geometry(rect, augs, seed):
    img, _ = rect_image(*rect)
    mask = (img[..., 0] > 0).astype(np.uint8)
    tfm = AlbumentationsTransform(A.Compose([GEOMETRY[i] for i in augs], seed=seed))
    out_img, out_mask = tfm((PILImage.create(img), PILMask.create(mask)), split_idx=0)
    assert isinstance(out_img, PILImage) and isinstance(out_mask, PILMask)
    a, m = np.asarray(out_img)[..., 0] > 127, np.asarray(out_mask) > 0
    assert a.shape == m.shape and np.array_equal(a, m)

BOX_GEOMETRY = GEOMETRY[:6] + [GEOMETRY[7]]  # rotations by other angles loosen a box, by design

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rect=rect_items, augs=st.lists(st.sampled_from(range(len(BOX_GEOMETRY))), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_boxes_stay_on_their_object_under_random_geometry(rect, augs, seed):
    img, box = rect_image(*rect)
    tfm = AlbumentationsTransform(A.Compose([BOX_GEOMETRY[i] for i in augs], seed=seed,
                                            bbox_params=A.BboxParams(**BOX_PARAMS)))
    item = (PILImage.create(img), TensorBBox(torch.tensor([box], dtype=torch.float32)),
            TensorMultiCategory(torch.tensor([7])))
    out_img, boxes, labels = tfm(item, split_idx=0)
    a = np.asarray(out_img)[..., 0] > 127
    assert len(boxes) == len(labels)
    if len(boxes) == 0:
        assert a.sum() <= 1  # dropped only when the object left the image
        return
    assert labels.tolist() == [7]
    ys, xs = np.nonzero(a)
    if len(ys) == 0:  # nearest-neighbour downscaling can skip a sliver entirely; its box must then be a sliver too
        assert min(boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) < 2
        return
    # nearest-neighbour resampling rounds the object's edges to whole pixels, the box keeps them exact: allow a pixel
    # of the input magnified by the resize (crops enlarge up to ~5x here); a box left unmoved by a flip would be off by
    # far more
    np.testing.assert_allclose(boxes[0].numpy(), [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                               atol=1.01 + 0.1*max(a.shape))

def test_transform_runs_on_training_split_only_by_default():
    img = PILImage.create(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    flip = AlbumentationsTransform([A.HorizontalFlip(p=1)])
    assert np.array_equal(np.asarray(flip((img,), split_idx=1)[0]), np.asarray(img))
    assert np.array_equal(np.asarray(flip((img,), split_idx=0)[0]), np.asarray(img)[:, ::-1])
    both = AlbumentationsTransform([A.HorizontalFlip(p=1)], split_idx=None)
    assert np.array_equal(np.asarray(both((img,), split_idx=1)[0]), np.asarray(img)[:, ::-1])
    pickle.loads(pickle.dumps(flip))
    with pytest.raises(ValueError, match='bbox_params'):
        boxed = (img, TensorBBox(torch.zeros(1, 4)), TensorMultiCategory(torch.tensor([1])))
        AlbumentationsTransform(A.Compose([A.HorizontalFlip(p=1)]))(boxed, split_idx=0)
    with pytest.raises(TypeError, match='albumentations'): AlbumentationsTransform(lambda x: x)

def _to_float(image, **kwargs): return image.astype(np.float32) / 255

def test_pipelines_that_hand_on_floats_are_refused():
    """A.Normalize in an item pipeline failed deep inside PIL (fastai) or was divided by 255 a second time (detection,
    silent damage): refused when built, naming fastai's Normalize; a float image from any other transform when made"""
    from res2netplus.detection import DetectionAugment
    fix = r'Remove (Normalize|ToFloat|ToTensorV2) .*uint8.*Normalize\.from_stats'
    for bad in ([A.Normalize()], A.Compose([A.OneOf([A.HorizontalFlip(), A.ToFloat()])]),
                [A.HorizontalFlip(), A.ToTensorV2()]):
        for cls in (AlbumentationsTransform, DetectionAugment):
            with pytest.raises(ValueError, match=fix): cls(bad)
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match='turned a uint8 image into float32'):
        AlbumentationsTransform([A.Lambda(image=_to_float)])((PILImage.create(img),), split_idx=0)
    no_boxes = np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    with pytest.raises(ValueError, match='turned a uint8 image into float32'):
        DetectionAugment([A.Lambda(image=_to_float)])(img, *no_boxes)
    assert DetectionAugment([A.HorizontalFlip(p=1)])(img, *no_boxes)[0].dtype == np.uint8

def test_detection_datablock_keeps_boxes_on_objects(tmp_path):
    "Through a fastai DataBlock (boxes rescaled by PointScaler after the bridge), with show_batch"
    import matplotlib; matplotlib.use('Agg')
    from fastai.vision.all import DataBlock, ImageBlock, BBoxBlock, BBoxLblBlock, Resize
    rng = np.random.default_rng(0); boxes = []
    for i in range(8):
        img, box = rect_image((48, 40), *rng.integers(0, 28, 2).tolist(), 14, 12)
        Image.fromarray(img).save(tmp_path/f'{i}.png'); boxes.append(list(box))
    block = DataBlock(blocks=(ImageBlock, BBoxBlock, BBoxLblBlock), get_x=lambda i: tmp_path/f'{i}.png',
                      get_y=[lambda i: [boxes[i]], lambda i: ['thing']], n_inp=1,
                      item_tfms=[AlbumentationsTransform(res2netplus_augs(32)), Resize(32, method='squish')])
    dls = block.dataloaders(list(range(8)), bs=4, num_workers=0)
    x, batch_boxes, batch_labels = dls.one_batch()
    assert x.shape == (4, 3, 32, 32)
    plain = lambda t: t.as_subclass(torch.Tensor)
    checked = 0
    for img, b, l in zip(plain(x), plain(batch_boxes), plain(batch_labels)):
        keep = l > 0
        if not keep.any(): continue
        px = ((b[keep][0] + 1)*16).tolist()  # −1…1 back to pixels
        on = (img.mean(0) > 0.5).nonzero()
        if len(on) == 0: continue
        ys, xs = on[:, 0].numpy(), on[:, 1].numpy()
        np.testing.assert_allclose(px, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.5)
        checked += 1
    assert checked >= 2
    dls.show_batch(max_n=2)

def test_segmentation_datablock_and_export(seg_dls, tmp_path):
    "Masks follow the image through a DataBlock; the bridge and CutMix survive export and load_learner"
    import matplotlib; matplotlib.use('Agg')
    from fastai.vision.all import SegmentationDataLoaders, get_image_files, unet_learner, load_learner, Resize
    path = seg_dls.path
    dls = SegmentationDataLoaders.from_label_func(path, get_image_files(path/'images'), lambda o: path/'labels'/o.name,
                                                  codes=['bg', 'fg'], bs=2, num_workers=0, valid_pct=0.25, seed=0,
                                                  item_tfms=[AlbumentationsTransform(res2netplus_augs(32)), Resize(32)])
    x, m = dls.one_batch()
    assert x.shape[-2:] == m.shape[-2:] == (32, 32)
    bright = x.mean(1) > 0.5  # the square is bright in the image and 1 in the mask
    square = (m == 1).float()[:, None]
    # Away from the square's edge (where linear image and nearest mask resampling differ by a pixel) they agree
    interior = (F.max_pool2d(square, 3, 1, 1) == -F.max_pool2d(-square, 3, 1, 1))[:, 0]
    assert interior.float().mean() > 0.8
    assert (bright == (m == 1))[interior].float().mean() > 0.98  # worst of 300 batches: 0.992
    dls.show_batch(max_n=2)
    from res2netplus.models import res2netplus50
    learn = unet_learner(dls, res2netplus50, pretrained=False, n_out=2, cbs=CutMix(), path=tmp_path)
    learn.fit(1)
    learn.export('export.pkl')
    loaded = load_learner(tmp_path/'export.pkl')
    assert any(isinstance(cb, CutMix) for cb in loaded.cbs)
    assert any(isinstance(t, AlbumentationsTransform) for t in loaded.dls.after_item.fs)
    img = PILImage.create(path/'images'/'0.png')
    torch.testing.assert_close(loaded.predict(img)[2], learn.predict(img)[2])
