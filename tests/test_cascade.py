"Cascade (Mask) R-CNN: factories and their options, a short fit, pickling, empty images, longer cascades"
import io, pickle
import pytest
import torch
from torch import nn
from res2netplus.detection.cascade import *
from res2netplus.detection.heads import FCNMaskHead

TINY = dict(layers=(1, 1, 1, 1), out_channels=64, min_size=96, max_size=128, representation_size=64, mask_channels=32,
            box_batch_size_per_image=64, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=20)

def shapes_batch(n=2, size=96, seed=0):
    "Images with one or two coloured rectangles (class 1 red, class 2 blue) on dark noise, with boxes and masks"
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.2
        k = int(torch.randint(1, 3, (1,), generator=g))
        boxes, labels, masks = [], [], []
        for j in range(k):
            w, h = torch.randint(24, 48, (2,), generator=g).tolist()
            x0 = int(torch.randint(0, size - w, (1,), generator=g))
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            cls = int(torch.randint(1, 3, (1,), generator=g))
            img[:, y0:y0+h, x0:x0+w] = torch.tensor([0.9, 0.2, 0.1] if cls == 1 else [0.1, 0.3, 0.9])[:, None, None]
            m = torch.zeros(size, size); m[y0:y0+h, x0:x0+w] = 1
            boxes.append([x0, y0, x0 + w, y0 + h]); labels.append(cls); masks.append(m)
        images.append(img)
        targets.append({'boxes': torch.tensor(boxes, dtype=torch.float32), 'labels': torch.tensor(labels),
                        'masks': torch.stack(masks)})
    return images, targets

def test_factories_and_their_options():
    factories = [(cascade_rcnn_res2net_fpn, 'res2netplus50', False),
                 (cascade_mask_rcnn_res2net_fpn, 'res2netplus50', True),
                 (cascade_rcnn_res2netplus50_fpn, 'res2netplus50', False),
                 (cascade_mask_rcnn_res2netplus50_fpn, 'res2netplus50', True),
                 (cascade_rcnn_res2net101d_fpn, 'res2net101d', False),
                 (cascade_mask_rcnn_res2net101d_fpn, 'res2net101d', True),
                 (cascade_rcnn_res2netplus101_fpn, 'res2netplus101', False),
                 (cascade_mask_rcnn_res2netplus101_fpn, 'res2netplus101', True)]
    for factory, arch, mask in factories:
        m = factory(num_classes=5, layers=(1, 1, 1, 1), out_channels=32, representation_size=32)
        assert isinstance(m, CascadeRCNN) and m.arch == arch and m.roi_heads.has_mask() == mask
        assert m.backbone.out_channels == 32 and m.roi_heads.stages[0].box_head.fc7.out_features == 32
        assert [s.box_predictor.cls_score.out_features for s in m.roi_heads.stages] == [5, 5, 5]
        assert [s.box_predictor.bbox_pred.out_features for s in m.roi_heads.stages] == [4, 4, 4]  # class-agnostic
    # the reference config by default: 800/1333 images, 2000 proposals after NMS in training, 1000 at test, anchors
    # 32…512
    assert (m.transform.min_size, m.transform.max_size) == ((800,), 1333)
    assert m.rpn._post_nms_top_n == {'training': 2000, 'testing': 1000}
    assert m.rpn._pre_nms_top_n == {'training': 2000, 'testing': 1000}
    assert m.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert [s.iou_thresh for s in m.roi_heads.stages] == [0.5, 0.6, 0.7]
    assert [s.loss_weight for s in m.roi_heads.stages] == [1, 0.5, 0.25]
    assert m.roi_heads.stages[0].fg_bg_sampler.batch_size_per_image == 512 and m.roi_heads.stages[0].box_loss_beta == 1.
    assert (m.roi_heads.score_thresh, m.roi_heads.nms_thresh, m.roi_heads.detections_per_img) == (0.05, 0.5, 100)
    # keyword arguments reach the detector, the cascade and the backbone
    tiny = {k: v for k, v in TINY.items() if k not in ('rpn_post_nms_top_n_train', 'box_detections_per_img')}
    m = cascade_rcnn_res2net_fpn('res2net50d', 3, rpn_post_nms_top_n_train=300, box_detections_per_img=7,
                                 score_average='logits', trainable_layers=5, norm='bn', **tiny)
    assert m.rpn._post_nms_top_n['training'] == 300 and m.roi_heads.detections_per_img == 7
    assert m.roi_heads.score_average == 'logits'
    assert all(p.requires_grad for p in m.backbone.body.parameters())

def test_any_backbone_and_clear_errors():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    bb = resnet_fpn_backbone(backbone_name='resnet18', weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d)
    m = cascade_rcnn_res2net_fpn(num_classes=3, backbone=bb, min_size=96, max_size=128, representation_size=32)
    images, targets = shapes_batch(1)
    losses = m.train()(images, targets)
    assert {f'loss_box_reg_s{i}' for i in (1, 2, 3)} <= set(losses) and 'loss_mask' not in losses
    with pytest.raises(ValueError, match='no effect'):
        cascade_rcnn_res2net_fpn(num_classes=3, backbone=bb, layers=(1, 1, 1, 1))
    with pytest.raises(ValueError, match='out_channels'): CascadeRCNN(nn.Identity(), 3)
    with pytest.raises(ValueError, match="int64"):
        m(images, [{'boxes': targets[0]['boxes'], 'labels': targets[0]['labels'].int()}])

def test_four_stage_cascade():
    ious, stds, weights = (0.5, 0.6, 0.7, 0.75), CASCADE_STDS + ((0.02, 0.02, 0.05, 0.05),), (1, 0.5, 0.25, 0.125)
    m = cascade_rcnn_res2net_fpn('res2net50d', 3, ious=ious, stds=stds, loss_weights=weights, **TINY)
    images, targets = shapes_batch(1)
    losses = m.train()(images, targets)
    assert {f'loss_classifier_s{i}' for i in range(1, 5)} <= set(losses)
    assert m.roi_heads.stages[3].box_coder.weights == pytest.approx((50, 50, 20, 20))

def test_images_without_objects_train():
    torch.manual_seed(0)
    m = cascade_rcnn_res2net_fpn('res2net50d', 3, mask=True, **TINY).train()
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    empty = [{'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64),
              'masks': torch.zeros(0, *img.shape[1:])} for img in images]
    losses = m(images, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[f'loss_box_reg_s{i}'] == 0 and losses[f'loss_mask_s{i}'] == 0 for i in (1, 2, 3))
    assert all(losses[f'loss_classifier_s{i}'] > 0 for i in (1, 2, 3))
    sum(losses.values()).backward()

def test_short_fit_lowers_the_loss_and_the_model_pickles():
    torch.manual_seed(0)
    m = cascade_rcnn_res2net_fpn('res2net50d', 3, mask=True, **TINY)
    images, targets = shapes_batch(2)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    m.train(); totals = []
    for step in range(8):
        losses = m(images, targets)
        loss = sum(losses.values()); opt.zero_grad(); loss.backward(); opt.step()
        totals.append(loss.item())
    first, last = sum(totals[:3]) / 3, sum(totals[-3:]) / 3
    assert last < 0.7 * first, totals
    m.eval()
    with torch.no_grad(): out = m(images)
    again = pickle.loads(pickle.dumps(m))
    buf = io.BytesIO(); torch.save(m, buf); buf.seek(0); loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        for other in (again, loaded):
            for a, b in zip(out, other(images)):
                assert all(torch.equal(a[k], b[k]) for k in ('boxes', 'scores', 'masks'))

def test_detection_learner_trains_exports_and_predicts(tmp_path):
    "The cascade in `detection`'s learner unchanged: loss columns per stage, COCO box and mask AP, predict, export"
    import numpy as np
    from fastai.learner import load_learner
    from res2netplus.detection import make_detection_shapes, coco_dataloaders, detection_learner
    torch.manual_seed(0)
    path = make_detection_shapes(tmp_path/'shapes', n_images=12, size=96, seed=0, max_objects=2, min_radius=0.15,
                                 max_radius=0.3)
    dls = coco_dataloaders(path/'images', path/'annotations.json', masks=True, augs=None, bs=4, valid_pct=0.25)
    model = cascade_rcnn_res2net_fpn('res2net50d', len(dls.train.dataset.classes), mask=True,
                                     **{**TINY, 'max_size': 96, 'rpn_batch_size_per_image': 128})
    learn = detection_learner(dls, model, path=tmp_path)
    learn.fit_one_cycle(3, 0.01)
    names = learn.recorder.metric_names
    assert {'box_AP', 'mask_AP', 'loss_classifier_s3', 'loss_box_reg_s1', 'loss_mask_s1', 'loss_mask_s3'} <= set(names)
    losses = [sum(p.values()) for p in learn.det_cb.train_parts]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    det = learn.predict(path/'images'/'0000.png', thresh=0.)
    assert {'boxes', 'labels', 'scores', 'masks'} <= set(det) and det['masks'].shape[1:] == (96, 96)
    learn.export('cascade.pkl')
    det2 = load_learner(tmp_path/'cascade.pkl').predict(path/'images'/'0000.png', thresh=0.)
    assert torch.allclose(det2['boxes'], det['boxes'], atol=1e-4)

def test_mask_stages_every_or_last():
    "A mask head per stage by default (mmdetection's Cascade Mask R-CNN); 'last' is the earlier one-head layout"
    torch.manual_seed(0)
    every = cascade_rcnn_res2net_fpn('res2net50d', 3, mask=True, **TINY)
    last = cascade_rcnn_res2net_fpn('res2net50d', 3, mask=True, mask_stages='last', **TINY)
    assert every.roi_heads.mask_stages == 'every' and len(every.roi_heads.mask_heads) == 3
    assert last.roi_heads.mask_stages == 'last' and last.roi_heads.mask_heads is None
    assert all(isinstance(h, FCNMaskHead) for h in every.roi_heads.mask_heads)
    images, targets = shapes_batch(2)
    l_every, l_last = every.train()(images, targets), last.train()(images, targets)
    assert {f'loss_mask_s{i}' for i in (1, 2, 3)} <= set(l_every) and 'loss_mask' not in l_every
    assert 'loss_mask' in l_last and not any(k.startswith('loss_mask_s') for k in l_last)
    # the mask heads' extra parameters: two more heads
    n_every = sum(p.numel() for p in every.roi_heads.parameters())
    n_last = sum(p.numel() for p in last.roi_heads.parameters())
    one_head = sum(p.numel() for p in every.roi_heads.mask_heads[0].parameters())
    assert n_every - n_last == 2 * one_head
    # an old pickle's CascadeRoIHeads has no mask_stages attribute: the class default says 'last'
    state = last.roi_heads.__dict__.copy(); state.pop('mask_stages'); state.pop('mask_heads', None)
    old = CascadeRoIHeads.__new__(CascadeRoIHeads); old.__dict__.update(state)
    assert old.mask_stages == 'last' and old.has_mask() and 'loss_mask' in old.loss_names
    with torch.no_grad():
        feats = last.backbone(torch.rand(1, 3, 96, 96))
        assert torch.equal(old.eval()(feats, [torch.tensor([[10., 10, 60, 60]])], [(96, 96)])[0][0]['boxes'],
                           last.roi_heads.eval()(feats, [torch.tensor([[10., 10, 60, 60]])], [(96, 96)])[0][0]['boxes'])
    with pytest.raises(ValueError, match="'every'"): cascade_rcnn_res2net_fpn('res2net50d', 3, mask=True,
                                                                            mask_stages='all', **TINY)
