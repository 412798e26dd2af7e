"""mmdetection's R2-101-FPN checkpoints in our detectors (`res2netplus.detection.mmdet`).

How deep the verification goes. mmdetection's own modules cannot run here (they need mmcv's compiled ops, and no mmcv
wheel installs offline), and the published files cannot be downloaded. So:
1. Layouts: `mmdet_layouts.py` writes the five files' keys and shapes from mmdetection's source (checked: the
   backbone has the 45.23 M - 2.05 M (classifier) parameters of Res2Net-101-v1b). The converter must map every key of
   the five layouts onto our `res2net101d` detectors (HTC with `semantic_classes=183`) with nothing missing or left
   over (a strict load), in 2.x and 3.x files and bare state dicts.
2. Values: `mmdet_reference.py` re-implements mmdetection's test-time forward from its source over the checkpoint's
   own (mmdetection-named) weights: the Res2Net backbone (with its layer1 quirk), FPN, anchors, RPN (sigmoid scores and
   decoded proposals, anchor by anchor), RoI extraction (level mapping, aligned adaptive RoIAlign), the Faster R-CNN box
   head (scores and class-specific boxes), the mask head, the three cascade stages (refined boxes, averaged scores),
   Cascade Mask R-CNN's per-stage mask heads (sigmoids averaged on the final boxes) and HTC's stages with the semantic
   branch (FusedSemanticHead, semantic RoI features added to the box and mask RoI features) and its mask heads
   chained by the information flow (`conv_res`).
   Our converted detectors, after `mmdet_test_cfg`, must give the same numbers. mmcv's RoIAlign is stood in for by
   torchvision's `roi_align(aligned=True, sampling_ratio=0)`, itself checked bin by bin against mmcv's formula.
   Not covered: image resizing (OpenCV vs torch), mask pasting, the final NMS (torchvision's `batched_nms` in both).
3. mmdetection itself, when `R2P_MMDET_SITE` names a folder holding mmdet 3.3.0, mmengine and mmcv-lite 2.1.0
   (+ yapf, addict, termcolor) unpacked from their wheels (`pip download --no-deps`, then unzip): its own modules, built
   from its own R2-101 configs, with `mmcv.ops` stubbed by torchvision's RoIAlign/NMS (`mmcv_ops_stub.py`). The five
   layouts must equal its models' state dicts key for key and shape for shape, and Faster, Mask and Cascade R-CNN must
   give our converted detectors' detections (boxes, scores, labels); Cascade Mask R-CNN and HTC are in the test too
   but were not run against mmdetection itself yet. Run on 2026-12-07 (three): all equal; scores to 4e-8,
   boxes to 6e-5 pixels on a 320 × 480 input (masks differ where pasted: mmdetection's `_do_paste_mask` vs
   torchvision's `paste_masks_in_image`).
4. A real file: `R2P_MMDET_CHECKPOINT=/path/to/<one of the five>.pth` loads it (sha256 prefix checked) and runs it.
"""
import os
from functools import partial
from pathlib import Path
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import roi_align, MultiScaleRoIAlign
from res2netplus.detection.mmdet import *
from res2netplus.detection.mmdet import _fit_report
from res2netplus.detection import (fasterrcnn_res2net101d_fpn, maskrcnn_res2net101d_fpn, cascade_rcnn_res2net101d_fpn,
                                   cascade_mask_rcnn_res2net101d_fpn)
from res2netplus.detection.htc import htc_res2net101d_fpn
import mmdet_layouts as layouts
import mmdet_reference as ref

BUILDERS = {'faster': fasterrcnn_res2net101d_fpn, 'mask': maskrcnn_res2net101d_fpn,
            'cascade': cascade_rcnn_res2net101d_fpn, 'cascade_mask': cascade_mask_rcnn_res2net101d_fpn,
            'htc': partial(htc_res2net101d_fpn, semantic_classes=183)}  # mmdetection's HTC: COCO-stuff's 183
IMAGE_SHAPE = (96, 160)  # not a multiple of 64: P6's stride is 64 in mmdetection, 96 // 2 = 48 in torchvision's anchors


@pytest.fixture(scope='module')
def checkpoints():
    return {k: layouts.mmdet_checkpoint(k, seed=i) for i, k in enumerate(layouts.LAYOUTS)}


@pytest.fixture(scope='module')
def models(checkpoints):
    "The five detectors on res2net101d with the synthetic checkpoints loaded (strictly), in eval mode"
    torch.manual_seed(0)
    return {k: load_mmdet_checkpoint(BUILDERS[k](num_classes=81), ckpt).eval() for k, ckpt in checkpoints.items()}


def test_layouts_are_res2net101_v1b():
    "The layout generator, checked on its own: the backbone has Res2Net-101-v1b's parameters (45.23 M with its fc)"
    shapes = layouts.res2net_shapes(101)
    n = sum(torch.Size(s).numel() for k, s in shapes.items() if k.endswith(('weight', 'bias')))
    assert abs(n + 2048 * 1000 + 1000 - 45.23e6) < 0.01e6
    for layout in layouts.LAYOUTS: assert mmdet_layout(layouts.layout_shapes(layout)) == layout


@pytest.mark.parametrize('layout', layouts.LAYOUTS)
def test_every_key_maps(layout, models, checkpoints):
    "Every mmdetection key has exactly one target, every parameter and buffer of ours gets one (load is strict)"
    sd, target = checkpoints[layout]['state_dict'], models[layout].state_dict()
    converted, unmapped = convert_mmdet_state_dict(sd, layout, target)
    assert unmapped == [] and set(converted) == set(target) and len(converted) == len(sd)
    assert all(converted[k].shape == target[k].shape for k in target)


@pytest.mark.parametrize('layout', ['faster', 'mask', 'cascade'])
def test_values_land_where_they_belong(layout, models, checkpoints):
    sd, m = checkpoints[layout]['state_dict'], models[layout]
    body, fpn = m.backbone.body, m.backbone.fpn
    pairs = [('backbone.stem.0.weight', body.conv1[0].weight),
             ('backbone.stem.4.running_var', body.conv1[4].running_var), ('backbone.stem.7.bias', body.bn1.bias),
             ('backbone.layer3.22.convs.2.weight', body.layer3[22].convs[2].weight),
             ('backbone.layer2.0.downsample.1.weight', body.layer2[0].downsample[1].weight),
             ('backbone.layer4.0.downsample.2.running_mean', body.layer4[0].downsample[2].running_mean),
             ('neck.lateral_convs.3.conv.weight', fpn.inner_blocks[3][0].weight),
             ('neck.fpn_convs.1.conv.bias', fpn.layer_blocks[1][0].bias),
             ('rpn_head.rpn_conv.weight', m.rpn.head.conv[0][0].weight),
             ('rpn_head.rpn_cls.weight', m.rpn.head.cls_logits.weight),
             ('rpn_head.rpn_reg.bias', m.rpn.head.bbox_pred.bias)]
    heads = m.roi_heads
    stages = [(f'roi_head.bbox_head.{s}', st.box_head, st.box_predictor) for s, st in enumerate(heads.stages)] \
        if layout == 'cascade' else [('roi_head.bbox_head', heads.box_head, heads.box_predictor)]
    for p, head, pred in stages:
        pairs += [(f'{p}.shared_fcs.0.weight', head.fc6.weight), (f'{p}.shared_fcs.1.bias', head.fc7.bias)]
        cls_w, reg_w = sd[f'{p}.fc_cls.weight'], sd[f'{p}.fc_reg.weight']
        assert torch.equal(pred.cls_score.weight[0], cls_w[80]) and torch.equal(pred.cls_score.weight[1:], cls_w[:80])
        if layout == 'cascade': assert torch.equal(pred.bbox_pred.weight, reg_w)  # class-agnostic: 4 rows
        else: assert not pred.bbox_pred.weight[:4].any() and torch.equal(pred.bbox_pred.weight[4:], reg_w)
    if layout == 'mask':
        pairs += [('roi_head.mask_head.convs.3.conv.weight', heads.mask_head[3][0].weight),
                  ('roi_head.mask_head.upsample.weight', heads.mask_predictor.conv5_mask.weight)]
        logits = heads.mask_predictor.mask_fcn_logits
        assert not logits.weight[0].any()
        assert torch.equal(logits.weight[1:], sd['roi_head.mask_head.conv_logits.weight'])
    for key, ours in pairs: assert torch.equal(ours, sd[key]), key


def test_checkpoint_forms(models, checkpoints, tmp_path):
    "2.x and 3.x files, bare state dicts and `module.` prefixes load; a file's sha256 prefix is checked"
    import hashlib
    model, ckpt = models['faster'], checkpoints['faster']
    sd = ckpt['state_dict']
    v3 = layouts.mmdet_checkpoint('faster', version=3, state_dict={**sd, 'rpn_head.rpn_cls.bias': torch.ones(3)})
    load_mmdet_checkpoint(model, v3)
    assert torch.equal(model.rpn.head.cls_logits.bias, v3['state_dict']['rpn_head.rpn_cls.bias'])
    load_mmdet_checkpoint(model, {'module.' + k: v for k, v in sd.items()}, mmdet_inference=False)
    assert torch.equal(model.rpn.head.cls_logits.bias, sd['rpn_head.rpn_cls.bias'])
    small = tmp_path / 'small.pth'
    torch.save({'meta': {}, 'state_dict': {'rpn_head.rpn_cls.bias': torch.ones(3)}}, small)
    digest = hashlib.sha256(small.read_bytes()).hexdigest()
    good, bad = tmp_path / f'x-{digest[:8]}.pth', tmp_path / f'x-{"0" if digest[0] != "0" else "1"}{digest[1:8]}.pth'
    good.write_bytes(small.read_bytes()); bad.write_bytes(small.read_bytes())
    check_sha256_prefix(good); check_sha256_prefix(small)  # a name without a hash is not checked
    with pytest.raises(ValueError, match='sha256'): check_sha256_prefix(bad)
    with pytest.raises(ValueError, match='sha256'): load_mmdet_checkpoint(model, bad)
    with pytest.raises(ValueError, match='missing'): load_mmdet_checkpoint(model, good)


def test_misfits_name_missing_unexpected_and_shapes(models, checkpoints):
    with pytest.raises(ValueError, match=r'missing: roi_heads\.mask_head\.0\.0\.bias'):
        load_mmdet_checkpoint(models['mask'], checkpoints['faster'])
    with pytest.raises(ValueError, match=r'unexpected: .*roi_heads\.mask_head'):
        load_mmdet_checkpoint(models['faster'], checkpoints['mask'])
    extra = {**checkpoints['faster']['state_dict'], 'roi_head.extra.weight': torch.ones(1)}
    with pytest.raises(ValueError, match=r'1 unexpected: roi_head\.extra\.weight'):
        load_mmdet_checkpoint(models['faster'], extra)
    sd = checkpoints['faster']['state_dict']
    fewer = {**sd, 'roi_head.bbox_head.fc_cls.weight': sd['roi_head.bbox_head.fc_cls.weight'][:21],
             'roi_head.bbox_head.fc_cls.bias': sd['roi_head.bbox_head.fc_cls.bias'][:21]}
    with pytest.raises(ValueError, match=r'of another shape: .*cls_score.bias \(21,\) vs ours \(81,\).*num_classes=81'):
        load_mmdet_checkpoint(models['faster'], fewer)
    with pytest.raises(ValueError, match='layout must be one of'): load_mmdet_checkpoint(models['faster'], sd, 'retina')
    with pytest.raises(ValueError, match='state dict'): load_mmdet_checkpoint(models['faster'], [1, 2])


@pytest.mark.parametrize('layout', ['cascade_mask', 'htc'])
def test_per_stage_values_land_where_they_belong(layout, models, checkpoints):
    "Each stage's mask head (logits: zero background channel first), HTC's conv_res and semantic head"
    sd, heads = checkpoints[layout]['state_dict'], models[layout].roi_heads
    for s, head in enumerate(heads.mask_heads):
        p = f'roi_head.mask_head.{s}'
        assert torch.equal(head.convs[2].conv.weight, sd[f'{p}.convs.2.conv.weight'])
        assert torch.equal(head.upsample.bias, sd[f'{p}.upsample.bias'])
        assert not head.conv_logits.weight[0].any() and not head.conv_logits.bias[0]
        assert torch.equal(head.conv_logits.weight[1:], sd[f'{p}.conv_logits.weight'])
        if layout == 'htc' and s > 0: assert torch.equal(head.conv_res.conv.weight, sd[f'{p}.conv_res.conv.weight'])
    assert (heads.mask_heads[0].conv_res is None) if layout == 'htc' else not hasattr(heads.mask_heads[0], 'conv_res')
    if layout == 'htc':
        sem = heads.semantic_head
        assert torch.equal(sem.lateral_convs[4].conv.weight, sd['roi_head.semantic_head.lateral_convs.4.conv.weight'])
        assert torch.equal(sem.conv_embedding.conv.bias, sd['roi_head.semantic_head.conv_embedding.conv.bias'])
        assert torch.equal(sem.conv_logits.weight, sd['roi_head.semantic_head.conv_logits.weight'])  # 183, as is


def test_htc_without_semantic_branch_is_named(models, checkpoints):
    "An HTC built without the semantic branch (semantic_classes=None) gets the error that names semantic_classes=183"
    heads = models['htc'].roi_heads
    semantic = heads.semantic_head
    heads.semantic_head = None  # what htc_res2net101d_fpn(num_classes=81) builds, without a second R2-101
    try:
        with pytest.raises(ValueError, match=r'22 unexpected: roi_heads\.semantic_head.*semantic_classes=183'):
            load_mmdet_checkpoint(models['htc'], checkpoints['htc'])
    finally: heads.semantic_head = semantic


# --- mmdetection's forward pass on the same weights ------------------------------------------------------------------
def _close(ours, theirs, tol=2e-4):
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol * float(theirs.abs().max().clamp(min=1e-6)))


@pytest.fixture(scope='module')
def image():
    return torch.randn(1, 3, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope='module')
def features(models, checkpoints, image):
    "Our and mmdetection's backbone + FPN outputs (Faster R-CNN's; the three share the code)"
    out = {}
    with torch.no_grad():
        for k, m in [('faster', models['faster'])]:
            sd = checkpoints[k]['state_dict']
            body = m.backbone.body(image)
            out[k] = dict(body=list(body.values()), fpn=m.backbone.fpn(body), ref_body=ref.res2net(sd, image))
            out[k]['ref_fpn'] = ref.fpn(sd, out[k]['ref_body'])
    return out


def test_backbone_and_fpn_match_mmdetection(features, models, image):
    for k, f in features.items():
        for ours, theirs in zip(f['body'], f['ref_body']): _close(ours, theirs)
        for ours, theirs in zip(f['fpn'].values(), f['ref_fpn']): _close(ours, theirs)
    body = models['faster'].backbone.body  # timm's and the official Res2Net pool layer1's passed-through split
    body.layer1[0].pool = torch.nn.AvgPool2d(3, 1, 1)
    try:
        with torch.no_grad(): assert not torch.allclose(body(image)['0'], features['faster']['ref_body'][0], atol=1e-3)
    finally: body.layer1[0].pool = None


def test_anchors_match_mmdetection():
    sizes = [(24, 40), (12, 20), (6, 10), (3, 5), (2, 3)]
    feats = [torch.zeros(1, 1, *s) for s in sizes]
    images = ImageList(torch.zeros(1, 3, *IMAGE_SHAPE), [IMAGE_SHAPE])
    gen_args = (((32,), (64,), (128,), (256,), (512,)), ((0.5, 1., 2.),) * 5)
    ours = MMDetAnchorGenerator(*gen_args, (4, 8, 16, 32, 64))(images, feats)[0]
    theirs = torch.cat(ref.anchors(sizes))
    assert torch.equal(ours, theirs)  # same order: location-major, then ratios 0.5, 1, 2: no channel permutation
    tv = AnchorGenerator(*gen_args)(images, feats)[0]
    assert tv.shape == theirs.shape and not torch.allclose(tv, theirs)  # rounded, and P6 at stride 48


def test_rpn_matches_mmdetection(features, models, checkpoints):
    m, f = models['faster'], features['faster']
    with torch.no_grad():
        feats = list(f['fpn'].values())
        objectness, deltas = m.rpn.head(feats)
        anchors = m.rpn.anchor_generator(ImageList(torch.zeros(1, 3, *IMAGE_SHAPE), [IMAGE_SHAPE]), feats)
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = m.rpn.box_coder.decode(deltas, anchors).view(-1, 4)
        boxes = torch.stack([boxes[:, 0].clamp(0, IMAGE_SHAPE[1]), boxes[:, 1].clamp(0, IMAGE_SHAPE[0]),
                             boxes[:, 2].clamp(0, IMAGE_SHAPE[1]), boxes[:, 3].clamp(0, IMAGE_SHAPE[0])], 1)
        scores, theirs = ref.rpn(checkpoints['faster']['state_dict'], f['ref_fpn'], IMAGE_SHAPE)
    _close(objectness.sigmoid().view(-1), scores)
    assert scores.std() > 0.01 and len(scores) == 3 * sum(f.shape[-2] * f.shape[-1] for f in feats)
    _close(boxes, theirs)


ROI_SHAPE = (640, 640)  # RoIs up to 600 pixels wide reach P5 (√area ≥ 448)


@pytest.fixture(scope='module')
def pyramid():
    "Random P2–P5 features of a 640 × 640 image, and the RPN's P6: the RoI heads' input, every level gets RoIs"
    g = torch.Generator().manual_seed(5)
    feats = {str(i): torch.randn(1, 256, 640 // 2**(i + 2), 640 // 2**(i + 2), generator=g) for i in range(4)}
    return {**feats, 'pool': torch.nn.functional.max_pool2d(feats['3'], 1, 2)}


def _rois(n=60, seed=2):
    "Boxes from 7 to 600 pixels wide and high inside the image"
    g = torch.Generator().manual_seed(seed)
    wh = torch.exp(torch.empty(n, 2).uniform_(2., 6.4, generator=g))
    xy = torch.rand(n, 2, generator=g) * (torch.tensor(ROI_SHAPE) - wh).clamp(min=1)
    big = torch.tensor([[10., 10., 600., 620.], [100., 50., 590., 560.]])  # P5 (level 3) for sure
    return torch.cat([torch.cat([xy, xy + wh], 1), big])


def test_roi_align_matches_mmcv_formula():
    "torchvision's aligned adaptive RoIAlign (the stand-in for mmcv's) against mmcv's bilinear formula, bin by bin"
    feat = torch.randn(1, 3, 12, 20, generator=torch.Generator().manual_seed(3))
    rois = torch.tensor([[0., 2.5, 3., 60.2, 40.], [0., 10., 4., 30., 18.], [0., 70., 30., 90., 47.]])
    out = roi_align(feat, rois, 7, 0.25, 0, True)
    for r in range(len(rois)):
        for py, px in ((0, 0), (3, 4), (6, 6), (2, 5)):
            _close(out[r, :, py, px], ref.aligned_roi_align_bin(feat[0], rois[r, 1:], 0.25, 7, py, px), 1e-5)


def test_box_and_mask_heads_match_mmdetection(pyramid, models, checkpoints):
    rois, feats = _rois(), pyramid
    sd, heads = checkpoints['mask']['state_dict'], models['mask'].roi_heads
    with torch.no_grad():
        pooled = heads.box_roi_pool(feats, [rois], [ROI_SHAPE])
        theirs_pooled = ref.roi_extract(list(feats.values())[:4], rois, 7)
        _close(pooled, theirs_pooled)
        logits, deltas = heads.box_predictor(heads.box_head(pooled))
        cls, reg = ref.bbox_head(sd, 'roi_head.bbox_head', theirs_pooled)
        ours_boxes = heads.box_coder.decode(deltas, [rois]).view(len(rois), -1, 4)[:, 1:]
        theirs_boxes = ref.delta2bbox(rois.repeat_interleave(80, 0), reg.view(-1, 4), (0.1, 0.1, 0.2, 0.2))
        mask_logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(feats, [rois], [ROI_SHAPE])))
        theirs_masks = ref.mask_head(sd, 'roi_head.mask_head', ref.roi_extract(list(feats.values())[:4], rois, 14))
    probs, theirs_probs = logits.softmax(-1), cls.softmax(-1)
    _close(probs[:, 1:], theirs_probs[:, :80]); _close(probs[:, 0], theirs_probs[:, 80])
    _close(ours_boxes.reshape(-1, 4), theirs_boxes)
    _close(mask_logits[:, 1:].sigmoid(), theirs_masks.sigmoid())
    assert len(heads.box_roi_pool.mmdet_levels(rois, 4).unique()) == 4  # the RoIs reach every level
    with torch.no_grad():  # torchvision's RoIAlign (not aligned, 2 samples) pools otherwise: the option matters
        assert not torch.allclose(MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 2)(feats, [rois], [ROI_SHAPE]), pooled,
                                  atol=1e-3)


def _labels(n, seed):
    return torch.randint(1, 81, (n,), generator=torch.Generator().manual_seed(seed))


def test_cascade_mask_heads_match_mmdetection(pyramid, models, checkpoints):
    "Every stage's mask head on the final boxes, the sigmoids averaged, each box's class: mmdetection's masks"
    heads, sd, rois = models['cascade_mask'].roi_heads, checkpoints['cascade_mask']['state_dict'], _rois(20, seed=6)
    labels = _labels(len(rois), 7)
    with torch.no_grad():
        probs = heads.mask_probs(pyramid, [rois], [labels], [ROI_SHAPE])[0][:, 0]
        pooled = ref.roi_extract(list(pyramid.values())[:4], rois, 14)
        theirs = ref.stage_masks(sd, pooled, labels - 1)
        last = ref.mask_head(sd, 'roi_head.mask_head.2', pooled).sigmoid()[torch.arange(len(rois)), labels - 1]
    _close(probs, theirs)
    assert probs.shape == (len(rois), 28, 28) and (theirs - last).abs().max() > 0.01  # the average is not one stage's


def test_htc_matches_mmdetection(pyramid, models, checkpoints):
    "HTC: semantic head, stages with semantic RoI features, chained mask heads (information flow) on the final boxes"
    heads, sd, rois = models['htc'].roi_heads, checkpoints['htc']['state_dict'], _rois(20, seed=8)
    labels, feats = _labels(len(rois), 9), list(pyramid.values())
    with torch.no_grad():
        semantic_logits, embedding = heads.semantic_head(feats)
        theirs_logits, theirs_embedding = ref.fused_semantic_head(sd, feats)
        features = {**pyramid, 'semantic': embedding}
        boxes, stage_logits = heads.forward_stages_test(features, [rois], [ROI_SHAPE])
        scores = heads.average_scores(stage_logits)
        probs = heads.mask_probs(features, boxes, [labels], [ROI_SHAPE])[0][:, 0]
        theirs_boxes, theirs_scores = ref.cascade(sd, feats[:4], rois, ROI_SHAPE, semantic_feat=theirs_embedding)
        mask_feats = ref.roi_extract(feats[:4], theirs_boxes, 14) + ref.semantic_roi_feats(theirs_embedding,
                                                                                            theirs_boxes, 14)
        theirs_probs = ref.stage_masks(sd, mask_feats, labels - 1, info_flow=True)
        no_flow = ref.stage_masks(sd, mask_feats, labels - 1, info_flow=False)
    _close(semantic_logits, theirs_logits); _close(embedding, theirs_embedding)
    assert semantic_logits.shape == (1, 183, 80, 80)  # stride 8
    _close(boxes[0], theirs_boxes, 1e-3)
    _close(scores[:, 1:], theirs_scores[:, :80]); _close(scores[:, 0], theirs_scores[:, 80])
    _close(probs, theirs_probs, 1e-3)
    assert not torch.allclose(probs, no_flow, atol=1e-4)  # without the information flow the masks differ


def test_cascade_matches_mmdetection(pyramid, models, checkpoints):
    m, rois = models['cascade'], _rois(seed=4)
    with torch.no_grad():
        boxes, stage_logits = m.roi_heads.forward_stages_test(pyramid, [rois], [ROI_SHAPE])
        scores = m.roi_heads.average_scores(stage_logits)
        theirs_boxes, theirs_scores = ref.cascade(checkpoints['cascade']['state_dict'], list(pyramid.values())[:4],
                                                  rois, ROI_SHAPE)
    _close(boxes[0], theirs_boxes, 1e-3)
    _close(scores[:, 1:], theirs_scores[:, :80]); _close(scores[:, 0], theirs_scores[:, 80])
    assert (boxes[0] - rois).abs().max() > 0.5  # the stages moved the boxes
    m.roi_heads.score_average = 'probs'  # our default, the mean of the stages' softmaxes, scores otherwise
    try: assert not torch.allclose(m.roi_heads.average_scores(stage_logits), scores, atol=1e-4)
    finally: m.roi_heads.score_average = 'logits'


def test_mmdet_test_cfg_settings(models):
    for k, m in models.items():
        thresh = 0.001 if k == 'htc' else 0.05
        assert m.mmdet_inference and m.backbone.body.layer1[0].pool is None
        assert isinstance(m.rpn.anchor_generator, MMDetAnchorGenerator)
        assert isinstance(m.roi_heads.box_roi_pool, MMDetRoIAlign) and m.roi_heads.box_roi_pool.aligned
        assert m.roi_heads.box_roi_pool.sampling_ratio == 0
        assert (m.roi_heads.score_thresh, m.roi_heads.nms_thresh, m.roi_heads.detections_per_img) == (thresh, .5, 100)
        assert (m.rpn._pre_nms_top_n['testing'], m.rpn._post_nms_top_n['testing'], m.rpn.nms_thresh) == (1000, 1000, .7)
    for k in ('mask', 'cascade_mask', 'htc'): assert isinstance(models[k].roi_heads.mask_roi_pool, MMDetRoIAlign)
    semantic_pool = models['htc'].roi_heads.semantic_roi_pool
    assert isinstance(semantic_pool, MMDetRoIAlign) and semantic_pool.featmap_names == ['semantic']
    assert semantic_pool.output_size == (14, 14) and semantic_pool.sampling_ratio == 0 and semantic_pool.aligned
    assert mmdet_test_cfg(models['htc']).roi_heads.score_thresh == 0.001  # an HTC is recognised without being told
    assert models['faster'].roi_heads.box_coder.weights == (10., 10., 5., 5.)
    for k in ('cascade', 'cascade_mask', 'htc'):
        weights = [s.box_coder.weights for s in models[k].roi_heads.stages]
        assert [round(w[0], 1) for w in weights] == [10., 20., 30.3]
        assert models[k].roi_heads.score_average == 'logits'
    with pytest.raises(ValueError, match='R-CNN detectors'): mmdet_test_cfg(torch.nn.Linear(1, 1))


@pytest.mark.parametrize('layout', ['mask', 'htc'])
def test_converted_detector_runs_end_to_end(layout, models, image):
    "The whole converted Mask R-CNN and HTC predict in eval mode with mmdetection's settings"
    m, heads = models[layout], models[layout].roi_heads
    saved = m.transform.min_size, m.transform.max_size, m.rpn._post_nms_top_n['testing'], heads.detections_per_img
    m.transform.min_size, m.transform.max_size = (IMAGE_SHAPE[0],), IMAGE_SHAPE[1]  # 800 × 1333 takes a minute
    # not 1000 RoIs through three box stages, nor 100 detections through three mask heads: half a minute each
    m.rpn._post_nms_top_n['testing'], heads.detections_per_img = 100, 5
    try:
        with torch.no_grad(): out = m([image[0].sigmoid()])[0]
    finally:
        m.transform.min_size, m.transform.max_size, m.rpn._post_nms_top_n['testing'], heads.detections_per_img = saved
    assert set(out) == {'boxes', 'labels', 'scores', 'masks'} and (out['scores'] > m.roi_heads.score_thresh).all()
    assert 0 < len(out['scores']) <= 5 and out['masks'].shape[-2:] == IMAGE_SHAPE
    assert ((out['labels'] >= 1) & (out['labels'] <= 80)).all()


@pytest.mark.skipif(not os.environ.get('R2P_MMDET_CHECKPOINT'),
                    reason='set R2P_MMDET_CHECKPOINT to one of the five published R2-101-FPN files to run it')
def test_real_checkpoint():
    path = Path(os.environ['R2P_MMDET_CHECKPOINT'])
    layout = MMDET_CHECKPOINTS.get(path.name) or mmdet_layout(mmdet_state_dict(torch.load(path, map_location='cpu')))
    model = load_mmdet_checkpoint(BUILDERS[layout](num_classes=81), path).eval()
    image = torch.zeros(3, 480, 640)
    image[:, 100:380, 200:440] = torch.tensor([0.8, 0.1, 0.1])[:, None, None]
    with torch.no_grad(): out = model([image])[0]
    assert out['boxes'].shape[1] == 4 and ((out['labels'] >= 1) & (out['labels'] <= 80)).all()


MMDET_CONFIGS = {'faster': 'faster-rcnn_res2net-101_fpn_2x_coco', 'mask': 'mask-rcnn_res2net-101_fpn_2x_coco',
                 'cascade': 'cascade-rcnn_res2net-101_fpn_20e_coco',
                 'cascade_mask': 'cascade-mask-rcnn_res2net-101_fpn_20e_coco', 'htc': 'htc_res2net-101_fpn_20e_coco'}


@pytest.mark.skipif(not os.environ.get('R2P_MMDET_SITE'),
                    reason='set R2P_MMDET_SITE to a folder with mmdet 3.3.0, mmengine and mmcv-lite 2.1.0 unpacked')
@pytest.mark.parametrize('layout', layouts.LAYOUTS)
def test_against_mmdetection_itself(layout):
    "mmdetection's own modules, built from its R2-101 configs, on the same synthetic checkpoint as our detector"
    import sys
    site = os.environ['R2P_MMDET_SITE']
    if site not in sys.path: sys.path.insert(0, site)
    import mmcv_ops_stub  # noqa: F401  (before mmdet)
    from mmengine.config import Config
    from mmdet.utils import register_all_modules
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    register_all_modules()
    cfg = Config.fromfile(f'{site}/mmdet/.mim/configs/res2net/{MMDET_CONFIGS[layout]}.py')
    cfg.model.backbone.init_cfg = None
    theirs = MODELS.build(cfg.model).eval()
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == layouts.layout_shapes(layout)
    ckpt = layouts.mmdet_checkpoint(layout, seed=7)
    theirs.load_state_dict(ckpt['state_dict'], strict=True)
    ours = load_mmdet_checkpoint(BUILDERS[layout](num_classes=81), ckpt).eval()
    h, w = 320, 480  # no resizing, and normalised input given to both
    ours.transform.image_mean, ours.transform.image_std = [0., 0., 0.], [1., 1., 1.]
    ours.transform.min_size, ours.transform.max_size = (h,), w
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1., 1.), batch_input_shape=(h, w), pad_shape=(h, w))
    with torch.no_grad():
        t = theirs.predict(x, [DetDataSample(metainfo=meta)], rescale=False)[0].pred_instances
        o = ours(list(x))[0]
    assert len(t.scores) == len(o['scores']) > 0
    ti, oi = t.scores.argsort(descending=True), o['scores'].argsort(descending=True)
    _close(o['scores'][oi], t.scores[ti], 1e-5)
    assert torch.equal(o['labels'][oi], t.labels[ti] + 1)
    _close(o['boxes'][oi], t.bboxes[ti], 1e-5)
