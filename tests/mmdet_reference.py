"""mmdetection's test-time forward pass re-implemented from its source as plain functions over a checkpoint's own
(mmdetection-named) state dict: the oracle `test_mmdet.py` holds the converted detectors against.

Written from open-mmlab/mmdetection 2.x: `backbones/res2net.py` (`Bottle2neck.forward`, `Res2Layer`), `resnet.py`
(deep stem, max pool), `necks/fpn.py`, `core/anchor/anchor_generator.py` (`gen_single_level_base_anchors`,
`single_level_grid_priors`, `_meshgrid`), `dense_heads/rpn_head.py` (`_get_bboxes`: permute(1, 2, 0), sigmoid),
`core/bbox/coder/delta_xywh_bbox_coder.py` (`delta2bbox`), `roi_extractors/single_level_roi_extractor.py`
(`map_roi_levels`), `bbox_heads/convfc_bbox_head.py`, `mask_heads/fcn_mask_head.py`, `cascade_roi_head.py`
(`simple_test`, `merge_aug_masks`), `mask_heads/htc_mask_head.py`, `mask_heads/fused_semantic_head.py`,
`htc_roi_head.py` (`simple_test`, `_bbox_forward`: semantic RoI features, `adaptive_avg_pool2d` to 7 × 7).
mmcv's `RoIAlign(aligned=True, sampling_ratio=0)` is stood in for by torchvision's `roi_align` with the same
arguments (both are Detectron2's RoIAlign; `aligned_roi_align` below re-derives one bin by hand to check it).
"""
from __future__ import annotations
import math
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def _bn(sd:dict, p:str, x):
    return F.batch_norm(x, sd[f'{p}.running_mean'], sd[f'{p}.running_var'], sd[f'{p}.weight'], sd[f'{p}.bias'],
                        False, 0., 1e-5)


def bottle2neck(sd:dict, p:str, x, stride:int, stage:bool, scales:int=4):
    "mmdetection's `Bottle2neck.forward` (style 'pytorch': the 3×3 convs stride), eval mode"
    out = F.relu(_bn(sd, f'{p}.bn1', F.conv2d(x, sd[f'{p}.conv1.weight'])))
    spx = torch.split(out, out.shape[1] // scales, 1)
    sp = F.relu(_bn(sd, f'{p}.bns.0', F.conv2d(spx[0], sd[f'{p}.convs.0.weight'], stride=stride, padding=1)))
    out = sp
    for i in range(1, scales - 1):
        sp = spx[i] if stage else sp + spx[i]
        sp = F.relu(_bn(sd, f'{p}.bns.{i}', F.conv2d(sp, sd[f'{p}.convs.{i}.weight'], stride=stride, padding=1)))
        out = torch.cat((out, sp), 1)
    last = spx[scales - 1] if not stage or stride == 1 else F.avg_pool2d(spx[scales - 1], 3, stride, 1)
    out = _bn(sd, f'{p}.bn3', F.conv2d(torch.cat((out, last), 1), sd[f'{p}.conv3.weight']))
    identity = x
    if f'{p}.downsample.1.weight' in sd:
        identity = F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)
        identity = _bn(sd, f'{p}.downsample.2', F.conv2d(identity, sd[f'{p}.downsample.1.weight']))
    return F.relu(out + identity)


def res2net(sd:dict, x) -> list:
    "mmdetection's `Res2Net` (deep stem, avg-down shortcuts): the outputs of layer1…layer4"
    for i, (conv, bn) in enumerate(((0, 1), (3, 4), (6, 7))):
        x = F.conv2d(x, sd[f'backbone.stem.{conv}.weight'], stride=2 if i == 0 else 1, padding=1)
        x = F.relu(_bn(sd, f'backbone.stem.{bn}', x))
    x, outs = F.max_pool2d(x, 3, 2, 1), []
    for i in range(4):
        n = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith(f'backbone.layer{i + 1}.'))
        for b in range(n):
            x = bottle2neck(sd, f'backbone.layer{i + 1}.{b}', x, (1 if i == 0 else 2) if b == 0 else 1, b == 0)
        outs.append(x)
    return outs


def fpn(sd:dict, feats:list) -> list:
    "mmdetection's `FPN(num_outs=5)`: lateral 1×1, nearest top-down, 3×3; the 5th level by `max_pool2d(1, stride=2)`"
    lat = [F.conv2d(f, sd[f'neck.lateral_convs.{i}.conv.weight'], sd[f'neck.lateral_convs.{i}.conv.bias'])
           for i, f in enumerate(feats)]
    for i in range(len(lat) - 1, 0, -1):
        lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], size=lat[i - 1].shape[2:], mode='nearest')
    outs = [F.conv2d(l, sd[f'neck.fpn_convs.{i}.conv.weight'], sd[f'neck.fpn_convs.{i}.conv.bias'], padding=1)
            for i, l in enumerate(lat)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def anchors(featmap_sizes, strides=(4, 8, 16, 32, 64), scales=(8.,), ratios=(0.5, 1., 2.)) -> list:
    "mmdetection's `AnchorGenerator` (center_offset 0, scale_major): per level, (H·W·A, 4), location-major"
    out = []
    for (h, w), stride in zip(featmap_sizes, strides):
        h_ratios = torch.tensor(ratios).sqrt()
        w_ratios = 1 / h_ratios
        ws = (stride * w_ratios[:, None] * torch.tensor(scales)[None, :]).view(-1)
        hs = (stride * h_ratios[:, None] * torch.tensor(scales)[None, :]).view(-1)
        base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
        shift_x, shift_y = torch.arange(0, w) * stride, torch.arange(0, h) * stride
        xx, yy = shift_x.repeat(len(shift_y)), shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).float()
        out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
    return out


def delta2bbox(rois, deltas, stds=(1., 1., 1., 1.), max_shape=None, wh_ratio_clip=16 / 1000):
    "mmdetection's `DeltaXYWHBBoxCoder.decode` (means 0)"
    d = deltas * deltas.new_tensor(stds)
    dx, dy, dw, dh = d.unbind(-1)
    max_ratio = abs(math.log(wh_ratio_clip))
    dw, dh = dw.clamp(min=-max_ratio, max=max_ratio), dh.clamp(min=-max_ratio, max=max_ratio)
    px, py = (rois[:, 0] + rois[:, 2]) * 0.5, (rois[:, 1] + rois[:, 3]) * 0.5
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if max_shape is not None:
        x1, x2 = x1.clamp(0, max_shape[1]), x2.clamp(0, max_shape[1])
        y1, y2 = y1.clamp(0, max_shape[0]), y2.clamp(0, max_shape[0])
    return torch.stack([x1, y1, x2, y2], dim=-1)


def rpn(sd:dict, feats:list, image_shape) -> tuple:
    "mmdetection's `RPNHead` on one image: per anchor (levels, then locations, then anchors) score and proposal"
    scores, boxes = [], []
    sizes = [f.shape[-2:] for f in feats]
    for f, a in zip(feats, anchors(sizes)):
        t = F.relu(F.conv2d(f, sd['rpn_head.rpn_conv.weight'], sd['rpn_head.rpn_conv.bias'], padding=1))
        cls = F.conv2d(t, sd['rpn_head.rpn_cls.weight'], sd['rpn_head.rpn_cls.bias'])[0]
        reg = F.conv2d(t, sd['rpn_head.rpn_reg.weight'], sd['rpn_head.rpn_reg.bias'])[0]
        scores.append(cls.permute(1, 2, 0).reshape(-1).sigmoid())
        boxes.append(delta2bbox(a, reg.permute(1, 2, 0).reshape(-1, 4), max_shape=image_shape))
    return torch.cat(scores), torch.cat(boxes)


def roi_extract(feats:list, rois, output_size:int, strides=(4, 8, 16, 32), finest_scale:int=56):
    "mmdetection's `SingleRoIExtractor` on one image's `rois` (N, 4): level ⌊log2(√area / 56 + 1e-6)⌋, aligned RoIAlign"
    scale = ((rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])).sqrt()
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=len(strides) - 1).long()
    rois5 = torch.cat([rois.new_zeros(len(rois), 1), rois], 1)
    out = feats[0].new_zeros(len(rois), feats[0].shape[1], output_size, output_size)
    for lvl, stride in enumerate(strides):
        idx = torch.where(levels == lvl)[0]
        out[idx] = roi_align(feats[lvl], rois5[idx], output_size, 1 / stride, 0, True)
    return out


def aligned_roi_align_bin(feat, roi, spatial_scale:float, output_size:int, py:int, px:int):
    "mmcv's RoIAlign (aligned, adaptive sampling) for one output bin, written out: the average of bilinear samples"
    x1, y1, x2, y2 = [float(v) * spatial_scale - 0.5 for v in roi]
    bin_w, bin_h = (x2 - x1) / output_size, (y2 - y1) / output_size
    gw, gh = math.ceil((x2 - x1) / output_size), math.ceil((y2 - y1) / output_size)
    h, w = feat.shape[-2:]
    total = feat.new_zeros(feat.shape[0])
    for iy in range(gh):
        for ix in range(gw):
            y = y1 + py * bin_h + (iy + 0.5) * bin_h / gh
            x = x1 + px * bin_w + (ix + 0.5) * bin_w / gw
            if y < -1 or y > h or x < -1 or x > w: continue
            y, x = max(y, 0.), max(x, 0.)
            y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
            y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            y, x = (float(y0) if y0 == h - 1 else y), (float(x0) if x0 == w - 1 else x)
            ly, lx = y - y0, x - x0
            total += ((1 - ly) * (1 - lx) * feat[:, y0, x0] + (1 - ly) * lx * feat[:, y0, x1_]
                      + ly * (1 - lx) * feat[:, y1_, x0] + ly * lx * feat[:, y1_, x1_])
    return total / max(gw * gh, 1)


def bbox_head(sd:dict, p:str, roi_feats) -> tuple:
    "mmdetection's `Shared2FCBBoxHead`: class logits (background last) and box deltas"
    x = roi_feats.flatten(1)
    x = F.relu(F.linear(x, sd[f'{p}.shared_fcs.0.weight'], sd[f'{p}.shared_fcs.0.bias']))
    x = F.relu(F.linear(x, sd[f'{p}.shared_fcs.1.weight'], sd[f'{p}.shared_fcs.1.bias']))
    return (F.linear(x, sd[f'{p}.fc_cls.weight'], sd[f'{p}.fc_cls.bias']),
            F.linear(x, sd[f'{p}.fc_reg.weight'], sd[f'{p}.fc_reg.bias']))


def _conv_relu(sd:dict, p:str, x, padding:int=0):
    "mmcv's `ConvModule` (conv + ReLU, no norm) at `p`"
    return F.relu(F.conv2d(x, sd[f'{p}.conv.weight'], sd[f'{p}.conv.bias'], padding=padding))


def htc_mask_head(sd:dict, p:str, roi_feats, res_feat=None) -> tuple:
    "mmdetection's `HTCMaskHead.forward`: `res_feat` through `conv_res` (1×1 + ReLU) added; logits, conv features"
    x = roi_feats if res_feat is None else roi_feats + _conv_relu(sd, f'{p}.conv_res', res_feat)
    for i in range(4): x = _conv_relu(sd, f'{p}.convs.{i}', x, 1)
    feat = x
    x = F.relu(F.conv_transpose2d(x, sd[f'{p}.upsample.weight'], sd[f'{p}.upsample.bias'], stride=2))
    return F.conv2d(x, sd[f'{p}.conv_logits.weight'], sd[f'{p}.conv_logits.bias']), feat


def mask_head(sd:dict, p:str, roi_feats):
    "mmdetection's `FCNMaskHead`: 4 convs, deconv upsample, ReLU, per-class mask logits (no background)"
    return htc_mask_head(sd, p, roi_feats)[0]


def stage_masks(sd:dict, mask_feats, labels, info_flow:bool=False, stages:int=3):
    """mmdetection's Cascade Mask R-CNN / HTC test masks: every stage's head on the final boxes' RoI features (HTC:
    each head fed the previous one's conv features, `info_flow`), the sigmoids averaged (`merge_aug_masks`), then
    each box's class (`labels`: mmdetection's, 0…79): (N, 28, 28) probabilities"""
    probs, last = [], None
    for s in range(stages):
        logits, feat = htc_mask_head(sd, f'roi_head.mask_head.{s}', mask_feats, last)
        probs.append(logits.sigmoid())
        last = feat if info_flow else None
    return torch.stack(probs).mean(0)[torch.arange(len(labels)), labels]


def fused_semantic_head(sd:dict, feats:list, fusion_level:int=1, p:str='roi_head.semantic_head') -> tuple:
    "mmdetection's `FusedSemanticHead.forward` on the 5 FPN levels: semantic logits and the embedding (stride 8)"
    x = _conv_relu(sd, f'{p}.lateral_convs.{fusion_level}', feats[fusion_level])
    for i, f in enumerate(feats):
        if i != fusion_level:
            f = F.interpolate(f, size=x.shape[-2:], mode='bilinear', align_corners=True)
            x = x + _conv_relu(sd, f'{p}.lateral_convs.{i}', f)
    for i in range(4): x = _conv_relu(sd, f'{p}.convs.{i}', x, 1)
    logits = F.conv2d(x, sd[f'{p}.conv_logits.weight'], sd[f'{p}.conv_logits.bias'])
    return logits, _conv_relu(sd, f'{p}.conv_embedding', x)


def semantic_roi_feats(semantic_feat, rois, output_size:int):
    "HTC's `semantic_roi_extractor` (one level, stride 8, 14 × 14), average-pooled to `output_size` if it differs"
    x = roi_extract([semantic_feat], rois, 14, strides=(8,))
    return x if output_size == 14 else F.adaptive_avg_pool2d(x, output_size)


def cascade(sd:dict, feats:list, rois, image_shape,
            stds=((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)), semantic_feat=None):
    "mmdetection's `CascadeRoIHead.simple_test` boxes (HTC's with `semantic_feat`): final boxes, mean-logit softmax"
    logits = []
    for s, std in enumerate(stds):
        x = roi_extract(feats, rois, 7)
        if semantic_feat is not None: x = x + semantic_roi_feats(semantic_feat, rois, 7)
        cls, reg = bbox_head(sd, f'roi_head.bbox_head.{s}', x)
        logits.append(cls)
        rois = delta2bbox(rois, reg, std, image_shape)  # class-agnostic: regress_by_class decodes the one box
    return rois, F.softmax(sum(logits) / len(logits), -1)
