"""Synthetic mmdetection checkpoints: the exact keys and shapes of the five R2-101-FPN files of mmdetection's model zoo,
written from mmdetection's source (not from the converter's rules), with random values.

Sources (open-mmlab/mmdetection, 2.x; the 3.x modules keep these names): `backbones/res2net.py` (`Bottle2neck`:
conv1/bn1, convs.i/bns.i for scales-1 splits, conv3/bn3; `Res2Layer`: downsample = AvgPool, conv, BN, so the conv is
`downsample.1`), `backbones/resnet.py` (deep stem `stem.0..8`: conv, BN, ReLU × 3; layers `layer1..4`; stem channels
32-32-64), `necks/fpn.py` (`lateral_convs.i.conv`, `fpn_convs.i.conv`, 4 of each for `num_outs=5` without extra convs),
`dense_heads/rpn_head.py` (`rpn_conv`, `rpn_cls` with 3 anchors × 1 sigmoid channel, `rpn_reg` 3 × 4),
`bbox_heads/convfc_bbox_head.py` (`Shared2FCBBoxHead`: `shared_fcs.0/1`, `fc_cls` num_classes + 1, `fc_reg` 4 ×
num_classes or 4 if `reg_class_agnostic`), `mask_heads/fcn_mask_head.py` (`convs.0..3.conv`, `upsample` deconv,
`conv_logits` num_classes), `htc_mask_head.py` (`conv_res.conv`, absent in stage 0: `with_conv_res=False`),
`fused_semantic_head.py` (`lateral_convs.0..4.conv`, `convs.0..3.conv`, `conv_embedding.conv`, `conv_logits` 183),
configs `_base_/models/*_r50_fpn.py`, `htc/htc_r50_fpn_1x_coco.py`, `res2net/*_r2_101_fpn_*.py`.
"""
from __future__ import annotations
import math
import torch

LAYOUTS = ('faster', 'mask', 'cascade', 'cascade_mask', 'htc')
FILES = {'faster': 'faster_rcnn_r2_101_fpn_2x_coco-175f1da6.pth', 'mask': 'mask_rcnn_r2_101_fpn_2x_coco-17f061e8.pth',
         'cascade': 'cascade_rcnn_r2_101_fpn_20e_coco-f4b7b7db.pth',
         'cascade_mask': 'cascade_mask_rcnn_r2_101_fpn_20e_coco-8a7b41e1.pth',
         'htc': 'htc_r2_101_fpn_20e_coco-3a8d2112.pth'}


def _bn(prefix:str, c:int) -> dict:
    return {f'{prefix}.weight': (c,), f'{prefix}.bias': (c,), f'{prefix}.running_mean': (c,),
            f'{prefix}.running_var': (c,), f'{prefix}.num_batches_tracked': ()}


def _conv(prefix:str, c_out:int, c_in:int, k:int, bias:bool=True) -> dict:
    return {f'{prefix}.weight': (c_out, c_in, k, k), **({f'{prefix}.bias': (c_out,)} if bias else {})}


def res2net_shapes(depth:int=101, scales:int=4, base_width:int=26) -> dict:
    "mmdetection's `Res2Net` backbone keys (`backbone.` prefix) and shapes"
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    s = {**_conv('backbone.stem.0', 32, 3, 3, False), **_bn('backbone.stem.1', 32),
         **_conv('backbone.stem.3', 32, 32, 3, False), **_bn('backbone.stem.4', 32),
         **_conv('backbone.stem.6', 64, 32, 3, False), **_bn('backbone.stem.7', 64)}
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
        width = int(math.floor(planes * (base_width / 64)))
        for b in range(n):
            p = f'backbone.layer{i + 1}.{b}'
            s.update({**_conv(f'{p}.conv1', width * scales, inplanes, 1, False), **_bn(f'{p}.bn1', width * scales),
                      **_conv(f'{p}.conv3', planes * 4, width * scales, 1, False), **_bn(f'{p}.bn3', planes * 4)})
            for k in range(scales - 1):
                s.update({**_conv(f'{p}.convs.{k}', width, width, 3, False), **_bn(f'{p}.bns.{k}', width)})
            if b == 0:  # stride != 1 or inplanes != 4 * planes: every stage's first block
                s.update({**_conv(f'{p}.downsample.1', planes * 4, inplanes, 1, False),
                          **_bn(f'{p}.downsample.2', planes * 4)})
            inplanes = planes * 4
    return s


def neck_rpn_shapes() -> dict:
    s = {}
    for i, c in enumerate((256, 512, 1024, 2048)):
        s.update({**_conv(f'neck.lateral_convs.{i}.conv', 256, c, 1), **_conv(f'neck.fpn_convs.{i}.conv', 256, 256, 3)})
    return {**s, **_conv('rpn_head.rpn_conv', 256, 256, 3), **_conv('rpn_head.rpn_cls', 3, 256, 1),
            **_conv('rpn_head.rpn_reg', 12, 256, 1)}


def bbox_head_shapes(prefix:str, num_classes:int=80, class_agnostic:bool=False) -> dict:
    return {f'{prefix}.shared_fcs.0.weight': (1024, 256 * 7 * 7), f'{prefix}.shared_fcs.0.bias': (1024,),
            f'{prefix}.shared_fcs.1.weight': (1024, 1024), f'{prefix}.shared_fcs.1.bias': (1024,),
            f'{prefix}.fc_cls.weight': (num_classes + 1, 1024), f'{prefix}.fc_cls.bias': (num_classes + 1,),
            f'{prefix}.fc_reg.weight': (4 if class_agnostic else 4 * num_classes, 1024),
            f'{prefix}.fc_reg.bias': (4 if class_agnostic else 4 * num_classes,)}


def mask_head_shapes(prefix:str, num_classes:int=80, conv_res:bool=False) -> dict:
    s = {k: v for i in range(4) for k, v in _conv(f'{prefix}.convs.{i}.conv', 256, 256, 3).items()}
    s.update({f'{prefix}.upsample.weight': (256, 256, 2, 2), f'{prefix}.upsample.bias': (256,),
              **_conv(f'{prefix}.conv_logits', num_classes, 256, 1)})
    if conv_res: s.update(_conv(f'{prefix}.conv_res.conv', 256, 256, 1))
    return s


def semantic_head_shapes(prefix:str='roi_head.semantic_head') -> dict:
    s = {k: v for i in range(5) for k, v in _conv(f'{prefix}.lateral_convs.{i}.conv', 256, 256, 1).items()}
    s.update({k: v for i in range(4) for k, v in _conv(f'{prefix}.convs.{i}.conv', 256, 256, 3).items()})
    return {**s, **_conv(f'{prefix}.conv_embedding.conv', 256, 256, 1), **_conv(f'{prefix}.conv_logits', 183, 256, 1)}


def layout_shapes(layout:str, depth:int=101) -> dict:
    "Every key of mmdetection's `layout` checkpoint and its shape"
    s = {**res2net_shapes(depth), **neck_rpn_shapes()}
    if layout in ('faster', 'mask'): s.update(bbox_head_shapes('roi_head.bbox_head'))
    if layout == 'mask': s.update(mask_head_shapes('roi_head.mask_head'))
    if layout in ('cascade', 'cascade_mask', 'htc'):
        for i in range(3): s.update(bbox_head_shapes(f'roi_head.bbox_head.{i}', class_agnostic=True))
    if layout in ('cascade_mask', 'htc'):
        for i in range(3): s.update(mask_head_shapes(f'roi_head.mask_head.{i}', conv_res=layout == 'htc' and i > 0))
    if layout == 'htc': s.update(semantic_head_shapes())
    return s


def _value(key:str, shape:tuple, g:torch.Generator) -> torch.Tensor:
    "Random values a trained net could hold: He-scaled weights, BatchNorms near identity, small biases"
    if key.endswith('num_batches_tracked'): return torch.tensor(1000, dtype=torch.int64)
    if key.endswith('running_var'): return torch.rand(shape, generator=g) + 0.5
    if key.endswith('running_mean') or key.endswith('bias'): return torch.randn(shape, generator=g) * 0.1
    if len(shape) == 1: return torch.rand(shape, generator=g) * 0.5 + 0.5  # a BatchNorm's gamma
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) * math.sqrt(1. / fan_in)


def mmdet_state_dict(layout:str, depth:int=101, seed:int=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: _value(k, v, g) for k, v in layout_shapes(layout, depth).items()}


def mmdet_checkpoint(layout:str, version:int=2, depth:int=101, seed:int=0, state_dict:dict|None=None) -> dict:
    "A checkpoint as mmdetection saves it: 2.x `{'meta', 'state_dict'}`; 3.x adds the runner's state"
    meta = {'mmdet_version': '2.0.0', 'CLASSES': tuple(f'class{i}' for i in range(80)), 'epoch': 24, 'iter': 0}
    ckpt = {'meta': meta, 'state_dict': mmdet_state_dict(layout, depth, seed) if state_dict is None else state_dict}
    if version == 3:
        meta.update(mmdet_version='3.3.0', dataset_meta={'classes': meta.pop('CLASSES')})
        ckpt.update(message_hub={'log_scalars': {}}, optimizer={'state': {}, 'param_groups': []},
                    param_schedulers=[])
    return ckpt
