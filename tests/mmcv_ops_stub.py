"""Imported before mmdetection, stands in for `mmcv.ops` (compiled; mmcv-lite lacks it): `RoIAlign`, `nms` and
`batched_nms` from torchvision with mmcv's signatures; any other op raises when built. Also stubs `shapely` and
`terminaltables`, which mmdetection imports at module level but the R-CNN test path never uses."""
import sys, types, importlib.abc, importlib.machinery
import torch
from torch import nn
import torchvision


class RoIAlign(nn.Module):
    def __init__(self, output_size, spatial_scale=1.0, sampling_ratio=0, pool_mode='avg', aligned=True,
                 use_torchvision=False):
        super().__init__()
        self.output_size = output_size if isinstance(output_size, tuple) else (output_size, output_size)
        self.spatial_scale, self.sampling_ratio, self.aligned = float(spatial_scale), int(sampling_ratio), aligned
        assert pool_mode == 'avg'

    def forward(self, input, rois):
        return torchvision.ops.roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio,
                                         self.aligned)


def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
    keep = torchvision.ops.nms(boxes, scores, float(iou_threshold))
    if max_num > 0: keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep


def batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    # mmcv's: NMS per idx, results sorted by score; `max_num` keeps the best
    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        return torch.cat([boxes[inds], scores[:, None]], -1), inds
    cfg = dict(nms_cfg)
    iou = cfg.get('iou_threshold', cfg.get('iou_thr'))
    keep = torchvision.ops.batched_nms(boxes, scores, torch.zeros_like(idxs) if class_agnostic else idxs, float(iou))
    max_num = cfg.get('max_num', -1)
    if max_num > 0: keep = keep[:max_num]
    return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep


class _Dummy:
    def __init__(self, *a, **k): raise RuntimeError('mmcv op not available in this stub')


def _any_attr(attr):
    if attr.startswith('__'): raise AttributeError(attr)
    return _Dummy


def _module(name):
    m = types.ModuleType(name)
    m.RoIAlign, m.nms, m.batched_nms = RoIAlign, nms, batched_nms
    m.__getattr__ = _any_attr
    m.__path__ = []
    return m


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == 'mmcv.ops' or fullname.startswith('mmcv.ops.'):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    def create_module(self, spec): return _module(spec.name)
    def exec_module(self, module): pass


sys.meta_path.insert(0, _Finder())

for _name in ('shapely', 'shapely.geometry', 'terminaltables'):
    if _name not in sys.modules:
        _m = types.ModuleType(_name); _m.__path__ = []
        _m.__getattr__ = _any_attr
        sys.modules[_name] = _m
sys.modules['shapely'].geometry = sys.modules['shapely.geometry']
