"""segmentation_models_pytorch's decoders on `tu-res2netplus50` (a timm `features_only` encoder): the decoders this
package does not ship, dilated where they ask, and one of them trained in a fastai Learner with the package's
albumentations bridge and mask-aware CutMix"""
import pytest, torch
from fastai.vision.all import (DataBlock, ImageBlock, MaskBlock, RandomSplitter, Resize, Learner, Adam, Callback,
                               set_seed)
import res2netplus  # registers res2netplus50 with timm
from res2netplus.data import make_shapes, read_codes, image_files, MaskFromImage
from res2netplus.augment import AlbumentationsTransform, res2netplus_augs, CutMix
from res2netplus.segmentation import SegmentationLoss, MeanIoU

smp = pytest.importorskip('segmentation_models_pytorch')
TINY = dict(layers=(1, 1, 1, 1), base_width=8)  # passed on to timm.create_model, so to create_res2net

@pytest.mark.parametrize('decoder,kwargs,stride', [
    ('Unet', {}, 32), ('UnetPlusPlus', {}, 32), ('FPN', {}, 32), ('UPerNet', {}, 32),
    ('DeepLabV3Plus', dict(encoder_output_stride=16), 16)])  # DeepLabV3+ asks for a dilated C5 (its default)
def test_decoder_output_shape_and_backward(decoder, kwargs, stride):
    torch.manual_seed(0)
    model = getattr(smp, decoder)(encoder_name='tu-res2netplus50', encoder_weights=None, classes=3, **kwargs, **TINY)
    x = torch.randn(2, 3, 64, 64)
    feats = model.encoder(x)
    assert feats[-1].shape[-1] == 64 // stride and feats[-1].shape[1] == 2048  # dilated: C5 at stride 16, not 32
    assert [len(model.encoder.model.get_submodule(f'layer{k}')) for k in range(1, 5)] == [1, 1, 1, 1]
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad and all(torch.isfinite(p.grad).all() for p in model.parameters())

class _PastedMasks(Callback):
    "Count the training masks CutMix pasted from another image (after the mixer, before the loss)"
    order = CutMix.order + 1
    def before_fit(self): self.pasted = 0
    def before_batch(self):
        cutmix = next(cb for cb in self.learn.cbs if isinstance(cb, CutMix))
        if self.training and cutmix.lam is not None: self.pasted += int((cutmix.lam < 1).sum())

def test_smp_fpn_trains_in_a_fastai_learner_with_albumentations_and_cutmix(tmp_path):
    set_seed(0)
    path = make_shapes(tmp_path/'shapes', n_images=15, size=64, seed=0)
    codes = read_codes(path/'codes.txt')
    dls = DataBlock(blocks=(ImageBlock, MaskBlock(codes)), get_items=image_files,
                    get_y=MaskFromImage(path/'masks'), splitter=RandomSplitter(0.2, seed=0),
                    item_tfms=[AlbumentationsTransform(res2netplus_augs(64, fill_mask=255)), Resize(64)]
                    ).dataloaders(path/'images', bs=4, num_workers=0)
    torch.manual_seed(0)
    model = smp.FPN(encoder_name='tu-res2netplus50', encoder_weights=None, classes=len(codes), **TINY)
    pasted = _PastedMasks()
    learn = Learner(dls, model, loss_func=SegmentationLoss(ignore_index=255), opt_func=Adam,
                    metrics=MeanIoU(255), cbs=[CutMix(), pasted])
    learn.fit_one_cycle(8, 3e-3)
    losses = [float(l) for l in learn.recorder.losses]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses  # 24 one-cycle steps: a fifth lower
    assert pasted.pasted > 0
    pred = learn.predict(dls.valid_ds.items[0])[0]
    assert pred.shape == (64, 64)
