from __future__ import annotations
import json, shutil, tempfile
from functools import partial
from pathlib import Path
import numpy as np
import torch
from torch import nn
import safetensors.torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from fastai.vision.all import (Learner, DataBlock, ImageBlock, CategoryBlock, MultiCategoryBlock, MaskBlock, Resize,
                               RandomResizedCrop, Normalize, CrossEntropyLossFlat, BCEWithLogitsLossFlat,
                               AdaptiveConcatPool2d, SelfAttention, model_meta, create_vision_model)
from fastai.vision.models.unet import DynamicUnet
from . import __version__
from .models import RES2NET_FACTORIES, variant_row
from .segmentation import Res2NetSegmenter, FPNSegmentation, DeepLabV3Plus, SegmentationLoss, create_seg_model
from .detection.learner import DetectionLearner, detection_learner, detector_factory
from .detection.rcnn import has_mask_head
from .detection.cascade import CascadeRCNN
from .runs import last_metrics
from .plots import save_loss_plot

HUB_FORMAT = 'res2netplus-hub/1'
HUB_FILES = ['config.json', 'model.safetensors', 'README.md', '*.png']
STALE_FILES = ['*.pkl', '*.bin', '*.pth', '*.pt']  # an earlier pickled upload must not linger beside the new weights
TASKS = ('classify', 'segment', 'detect', 'instance')

# %% cell arch
def _variant(arch) -> tuple:
    "The variant name of a Res2Net factory (a name, a factory, or a `functools.partial` of one) and the partial's kwargs"
    if isinstance(arch, str): return arch, {}
    if isinstance(arch, partial) and not arch.args:
        name, kwargs = _variant(arch.func)
        return name, {**kwargs, **arch.keywords}
    return getattr(arch, '__name__', None), {}

def _jsonable(o):
    "Tuples as lists, numpy and torch scalars as numbers: what `json.dumps` writes and reads back"
    if isinstance(o, dict): return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)): return [_jsonable(v) for v in o]
    if isinstance(o, (np.generic, torch.Tensor)): return o.tolist()
    return o

def _arch_spec(arch, body:nn.Module, arch_args:dict|None) -> tuple:
    "(variant name, its JSON arguments): a partial's kwargs, the blocks per stage read from `body`, then `arch_args`"
    name, kwargs = _variant(arch)
    if name not in RES2NET_FACTORIES:
        raise ValueError(f"arch={name or arch!r} is not a Res2Net variant that config.json can name: pass arch= one "
                         f"of {', '.join(RES2NET_FACTORIES)} (and arch_args= its other settings, e.g. base_width).")
    layers = [len(m) for m in list(body.children())[-4:]]
    if 'layers' not in kwargs and layers != list(variant_row(name)['arch']['layers']): kwargs['layers'] = layers
    kwargs = _jsonable({**kwargs, **(arch_args or {})})
    try: json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"The arch's settings {kwargs} are not JSON ({e}): pass arch_args= with plain values.") from None
    return name, kwargs

# %% cell task
def learner_task(learn:Learner) -> str:
    "'classify', 'segment', 'detect' or 'instance': what `learn` was built for"
    if isinstance(learn, DetectionLearner): return 'instance' if has_mask_head(learn.model) else 'detect'
    if isinstance(learn.model, (DynamicUnet, Res2NetSegmenter)): return 'segment'
    if isinstance(learn.model, nn.Sequential) and len(learn.model) == 2: return 'classify'
    raise ValueError(f"A learner of {type(learn.model).__name__} cannot be shared: pass one made by "
                     "res2netplus_learner, vision_learner, res2netplus_seg_learner or res2netplus_det_learner.")

def _first_conv(m:nn.Module) -> nn.Conv2d: return next(c for c in m.modules() if isinstance(c, nn.Conv2d))

def _input_pipeline(dls) -> dict:
    "The inference part of `dls`' item and batch transforms: the resize and the normalisation"
    resize = next((t for t in dls.after_item.fs if isinstance(t, (Resize, RandomResizedCrop))), None)
    norm = next((t for t in dls.after_batch.fs if isinstance(t, Normalize)), None)
    out = {}
    if resize is not None:  # fastai keeps sizes as (w, h)
        out.update(size=[int(resize.size[1]), int(resize.size[0])], pad_mode='reflection', resize_method='crop')
        if isinstance(resize, Resize): out.update(resize_method=str(resize.method), pad_mode=str(resize.pad_mode))
    if norm is not None: out.update(mean=norm.mean.flatten().tolist(), std=norm.std.flatten().tolist())
    return out

def _classes(learn, task:str) -> list:
    if task in ('detect', 'instance'): return [str(c) for c in learn.dls.train.dataset.classes]
    if task == 'segment':
        codes = next((t.codes for t in learn.dls.after_item.fs if hasattr(t, 'codes')), None)
        return [str(c) for c in codes] if codes is not None else [str(i) for i in range(learn.dls.c)]
    return [str(c) for c in learn.dls.vocab]

# %% cell model args
def _classifier_args(head:nn.Module) -> dict:
    "The `create_head` settings that shape fastai's head: its pooling and hidden widths"
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    args = {} if isinstance(head[0], AdaptiveConcatPool2d) else dict(concat_pool=False)
    if [l.out_features for l in linears[:-1]] != [512]: args['lin_ftrs'] = [l.out_features for l in linears[:-1]]
    return args

def _segmenter_args(model:nn.Module) -> dict:
    "The head settings that shape a segmentation model"
    if isinstance(model, DynamicUnet):
        decoder = [m for layer in list(model.layers)[1:] for m in layer.modules()]  # the body has AvgPool2d too
        return dict(self_attention=any(isinstance(m, SelfAttention) for m in decoder),
                    blur=any(isinstance(m, nn.AvgPool2d) for m in decoder))
    if isinstance(model, FPNSegmentation):
        return dict(fpn_channels=model.head.fpn.layer_blocks[0][0].out_channels,
                    seg_channels=model.head.classifier[1].in_channels)
    return dict(aspp_channels=model.head.aspp.project[0].out_channels,
                skip_channels=model.head.skip[0].out_channels)

def _detector_args(model:nn.Module) -> dict:
    "The settings of a detector that shape it or its predictions"
    t, roi, bb = model.transform, model.roi_heads, model.backbone
    args = dict(min_size=list(t.min_size), max_size=t.max_size, image_mean=list(t.image_mean),
                image_std=list(t.image_std), out_channels=bb.out_channels, returned_layers=list(bb.returned_layers),
                box_score_thresh=roi.score_thresh, box_nms_thresh=roi.nms_thresh,
                box_detections_per_img=roi.detections_per_img)
    head = roi.stages[0].box_head if isinstance(model, CascadeRCNN) else roi.box_head
    fc6 = getattr(head, 'fc6', None)
    if fc6 is not None: args['representation_size'] = fc6.out_features
    return args

# %% cell config
def _bare(model): return getattr(model, 'module', model)  # a DistributedDataParallel's model

def hub_config(learn:Learner, arch=None, arch_args:dict|None=None, model_args:dict|None=None) -> dict:
    """What rebuilds `learn`'s model and its input pipeline: `config.json`. `arch`, `arch_args`, `model_args`: the
    settings it was built with that cannot be read off the learner (e.g. `base_width`, a head's `y_range`)"""
    task, model = learner_task(learn), _bare(learn.model)
    cfg = dict(format=HUB_FORMAT, library_version=__version__, task=task, classes=_classes(learn, task))
    if task in ('detect', 'instance'):
        body, inferred = model.backbone.body, _detector_args(model)
        cfg.update(detector='cascade' if isinstance(model, CascadeRCNN) else 'rcnn', input={})
        arch = arch or model.arch
    elif task == 'segment':
        body = model[0] if isinstance(model, DynamicUnet) else model.body
        inferred = _segmenter_args(model)
        cfg.update(head=learn.head, output_stride=learn.output_stride, input=_input_pipeline(learn.dls))
        arch = arch or learn.arch
    else:
        body, inferred = model[0], _classifier_args(model[1])
        cfg.update(multi_label=isinstance(learn.loss_func, BCEWithLogitsLossFlat), input=_input_pipeline(learn.dls))
        arch = arch or getattr(learn, 'arch', None)
    cfg['arch'], cfg['arch_args'] = _arch_spec(arch, body, arch_args)
    cfg.update(n_in=_first_conv(body).in_channels, model_args=_jsonable({**inferred, **(model_args or {})}))
    return cfg

# %% cell build
def _factory(cfg:dict):
    f = RES2NET_FACTORIES[cfg['arch']]
    return partial(f, **cfg['arch_args']) if cfg['arch_args'] else f

def build_model(cfg:dict) -> nn.Module:
    "The model `cfg` (a `hub_config`) describes, with random weights: nothing is downloaded"
    task, n, args = cfg['task'], len(cfg['classes']), cfg['model_args']
    if task in ('detect', 'instance'):
        return detector_factory(task, cfg['detector'])(cfg['arch'], num_classes=n, **cfg['arch_args'], **args)
    if task == 'segment':
        return create_seg_model(_factory(cfg), n, cfg['head'], cfg['input'].get('size', (64, 64)),
                                output_stride=cfg['output_stride'], n_in=cfg['n_in'], **args)
    cut = model_meta[RES2NET_FACTORIES[cfg['arch']]]['cut']
    return create_vision_model(_factory(cfg), n, pretrained=False, cut=cut, n_in=cfg['n_in'], **args)

# %% cell state
def model_state(model:nn.Module) -> dict:
    "`model`'s weights and statistics on the CPU, without BatchNorm's step counters (frozen or not, same predictions)"
    return {k: v.detach().cpu().contiguous() for k, v in _bare(model).state_dict().items()
            if not k.endswith('num_batches_tracked')}

def load_model_state(model:nn.Module, state:dict, source:str, fix:str):
    "Load `state` into `model` strictly (BatchNorm step counters aside); a mismatch raises naming `source` and `fix`"
    own = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"other shapes at {shapes[:3]}")
        raise ValueError(f"{source} does not fit the model ({what}): {fix}")
    model.load_state_dict(state, strict=False)
    return model

# %% cell check
_FIX = ("pass the settings the learner was built with that change its weights' shapes: arch_args= (e.g. base_width) "
        "or model_args= (the head's or detector's).")

@torch.no_grad()
def _outputs(model:nn.Module, cfg:dict) -> list:
    "`model`'s eval-mode outputs on a fixed random batch (its modes restored after)"
    modes, device = {m: m.training for m in model.modules()}, next(model.parameters()).device
    x = torch.rand(2, cfg['n_in'], *cfg['input'].get('size', (64, 64)), generator=torch.Generator().manual_seed(0))
    try:
        if cfg['task'] not in ('detect', 'instance'): return [model.eval()(x.to(device)).float().cpu()]
        out = model.eval()(list(x.to(device)))
        return [v.float().cpu() for o in out for k, v in sorted(o.items())]
    finally:
        for m, mode in modes.items(): m.training = mode

def check_rebuilds(learn:Learner, cfg:dict, state:dict):
    "Raise naming the fix unless `cfg` rebuilds a model that takes `state` and predicts as `learn.model` does"
    model = _bare(learn.model)
    rebuilt = load_model_state(build_model(cfg), state, f"learn.model's weights, as config.json rebuilds it,", _FIX)
    rebuilt.to(next(model.parameters()).device)
    got, want = _outputs(rebuilt, cfg), _outputs(model, cfg)
    if len(got) != len(want) or any(g.shape != w.shape or not torch.allclose(g, w, rtol=1e-4, atol=1e-5)
                                    for g, w in zip(got, want)):
        raise ValueError("The model config.json rebuilds predicts otherwise than learn.model: a setting that shapes no "
                         "weight differs (e.g. a head's y_range, blur or act_cls). Pass it in model_args=.")

# %% cell card
PIPELINE_TAGS = dict(classify='image-classification', segment='image-segmentation', detect='object-detection',
                     instance='image-segmentation')

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A {{ task_text }} model trained with [res2netplus](https://github.com/res2netplus/res2netplus) (fastai, timm).

## Use it

```python
from res2netplus.hub import from_pretrained
learn = from_pretrained('{{ repo_id }}')   # a fastai Learner for inference
learn.predict('image.jpg')
```

No pickle is involved: `config.json` rebuilds the model and its input pipeline, `model.safetensors` holds the weights.

## Model

{{ model_table }}

## Metrics

{{ metrics_table }}

## Training

{{ training_table }}
{% if plots %}
## Plots
{% for p in plots %}
![{{ p }}]({{ p }})
{% endfor %}{% endif %}
"""

def _table(d:dict) -> str:
    if not d: return 'Not recorded.'
    return '\n'.join(['| | |', '|---|---|'] + [f"| {k} | {v} |" for k, v in d.items()])

_RUN_METRICS = ('valid_loss', 'best_valid_loss', 'accuracy', 'dice', 'mean_iou', 'box', 'mask')

def run_summary(learn:Learner) -> tuple:
    "(metrics, training settings) of `learn`: its run folder's `metrics.json` if it has one, else its recorder"
    run = Path(learn.path)/'metrics.json'
    if run.is_file():
        res = json.loads(run.read_text())
        flat = {f"{k} {s}": v for k, d in res.items() if isinstance(d, dict) for s, v in d.items()}
        metrics = {k: v for k, v in {**res, **flat}.items() if k.split()[0] in _RUN_METRICS and not isinstance(v, dict)}
        return metrics, {k: v for k, v in res.items() if k not in metrics and k not in _RUN_METRICS
                         and not isinstance(v, (dict, list)) and k != 'data'}
    # a recorder that never fitted has no values: fastcore would look them up on the learner and its model
    rec = getattr(learn, 'recorder', None)
    fitted = rec is not None and bool(rec.__dict__.get('values'))
    opt = getattr(learn.opt_func, 'func', learn.opt_func)
    cbs = [type(cb).__name__ for cb in learn.cbs if type(cb).__name__ not in ('TrainEvalCallback', 'Recorder',
                                                                           'CastToTensor', 'ProgressCallback')]
    training = dict(epochs=len(rec.values) if fitted else 0, optimizer=getattr(opt, '__name__', str(opt)),
                    loss=type(learn.loss_func).__name__, callbacks=', '.join(cbs) or 'none')
    # fastai's predict and get_preds reset the recorder: then nothing is left to report
    metrics = {k: v for k, v in (last_metrics(learn) if fitted else {}).items() if v is not None}
    return metrics, training

def model_card(cfg:dict, metrics:dict, training:dict, plots:list, repo_id:str|None=None, **card_data) -> ModelCard:
    "The README.md of a shared learner: how to load it, the model, its metrics, training settings and plots"
    task = cfg['task']
    data = ModelCardData(library_name='res2netplus', pipeline_tag=PIPELINE_TAGS[task],
                         tags=['res2netplus', 'fastai', 'timm', 'safetensors', cfg['arch']], **card_data)
    model = dict(task=task, arch=cfg['arch'], **{k: cfg[k] for k in ('head', 'output_stride', 'detector') if k in cfg},
                 classes=', '.join(cfg['classes']), input=cfg['input'] or 'the detector resizes and normalises')
    text = dict(classify='image classification', segment='semantic segmentation', detect='object detection',
                instance='instance segmentation')[task]
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, title=repo_id or f"{cfg['arch']} {text}",
                                   task_text=text, repo_id=repo_id or 'path/to/this/folder', model_table=_table(model),
                                   metrics_table=_table(metrics), training_table=_table(training), plots=plots)

# %% cell save
def _plots(learn:Learner, path:Path) -> list:
    "The run folder's pictures copied to `path` (a loss plot drawn from the recorder when there is none)"
    run = Path(learn.path)
    if (run/'metrics.json').is_file():
        for png in sorted(run.glob('*.png')): shutil.copy(png, path/png.name)
    rec = getattr(learn, 'recorder', None)
    if not (path/'loss.png').exists() and rec is not None and len(rec.__dict__.get('losses', [])) > 1:
        save_loss_plot(learn, path)
    return sorted(p.name for p in path.glob('*.png'))

def save_pretrained(learn:Learner, path, arch=None, arch_args:dict|None=None, model_args:dict|None=None,
                    repo_id:str|None=None, check:bool=True, **card_data) -> Path:
    """Write `learn` to the folder `path` without pickle: `model.safetensors`, `config.json` (see `hub_config`),
    `README.md` (a model card; `card_data`: e.g. license, datasets, base_model) and the run's plots"""
    cfg, state = hub_config(learn, arch, arch_args, model_args), model_state(learn.model)
    if check: check_rebuilds(learn, cfg, state)
    path = Path(path); path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, path/'model.safetensors', metadata=dict(format='pt', res2netplus=__version__))
    (path/'config.json').write_text(json.dumps(cfg, indent=2))
    model_card(cfg, *run_summary(learn), _plots(learn, path), repo_id, **card_data).save(path/'README.md')
    return path

# %% cell push
def push_to_hub(learn:Learner, repo_id:str, private:bool|None=None, token:str|None=None, create_pr:bool=False,
                revision:str|None=None, commit_message:str='Upload res2netplus model', endpoint:str|None=None,
                **save_kwargs):
    """`save_pretrained` into a temporary folder, then create the Hub repo `repo_id` (if new) and upload the folder
    in one commit, which deletes any pickle an earlier upload left (`STALE_FILES`); returns huggingface_hub's
    `CommitInfo`"""
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(learn, tmp, repo_id=repo_id, **save_kwargs)  # a learner that cannot be shared fails offline
        api = HfApi(endpoint=endpoint, token=token, library_name='res2netplus', library_version=__version__)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision,
                                 create_pr=create_pr, allow_patterns=HUB_FILES, delete_patterns=STALE_FILES)

# %% cell read
def read_hub_config(path) -> dict:
    "The `config.json` in the folder `path`, checked: a folder without one, or of another format or arch, raises the fix"
    file = Path(path)/'config.json'
    if not file.is_file():
        raise ValueError(f"No config.json in {path}: pass a folder or Hub repo written by save_pretrained or "
                         "push_to_hub (a fastai export.pkl loads with load_learner, only if you trust it).")
    cfg = json.loads(file.read_text())
    if cfg.get('format') != HUB_FORMAT:
        raise ValueError(f"{file} is not a res2netplus learner config (format {cfg.get('format')!r}, expected "
                         f"{HUB_FORMAT!r}): a timm model loads with timm.create_model('local-dir:...').")
    if cfg.get('task') not in TASKS:
        raise ValueError(f"{file} names the task {cfg.get('task')!r}: it must be one of {', '.join(TASKS)}.")
    if cfg.get('arch') not in RES2NET_FACTORIES:
        raise ValueError(f"{file} names the arch {cfg.get('arch')!r}, which this res2netplus {__version__} does not "
                         f"have: upgrade res2netplus, or fix the name (one of {', '.join(RES2NET_FACTORIES)}).")
    return cfg

class _Constant:
    "A `get_y` that gives `value` for any item: the one placeholder item of an inference-only `DataLoaders`"
    def __init__(self, value): self.value = value
    def __call__(self, item): return self.value

def _no_split(items): return [0], [0]

# %% cell learner
def inference_dataloaders(cfg:dict, device=None):
    "`DataLoaders` holding only what prediction needs: `cfg`'s classes, resize and normalisation (one blank item)"
    from fastai.data.core import DataLoaders
    from .detection.data import DetectionDataset, DetectionDataLoader
    if cfg['task'] in ('detect', 'instance'):
        ds = DetectionDataset([], cfg['classes'], with_masks=cfg['task'] == 'instance')
        return DataLoaders(DetectionDataLoader(ds, bs=1), DetectionDataLoader(ds, bs=1), device=device)
    inp, classes = cfg['input'], cfg['classes']
    h, w = inp.get('size', (64, 64))
    if cfg['task'] == 'segment': y = MaskBlock(classes), _Constant(np.zeros((h, w), np.uint8))
    elif cfg.get('multi_label'): y = MultiCategoryBlock(vocab=classes), _Constant([classes[0]])
    else: y = CategoryBlock(vocab=classes, sort=False), _Constant(classes[0])
    item = [Resize(inp['size'], method=inp['resize_method'], pad_mode=inp['pad_mode'])] if 'size' in inp else []
    batch = [Normalize.from_stats(inp['mean'], inp['std'])] if 'mean' in inp else []
    dblock = DataBlock((ImageBlock, y[0]), get_y=y[1], splitter=_no_split, item_tfms=item, batch_tfms=batch)
    return dblock.dataloaders([np.zeros((h, w, cfg['n_in']), np.uint8)], bs=1, num_workers=0, device=device)

def inference_learner(cfg:dict, model:nn.Module, device=None) -> Learner:
    "A `Learner` of `model` over `inference_dataloaders(cfg)`: `learn.predict(image)` as after `load_learner`"
    dls = inference_dataloaders(cfg, device)
    if cfg['task'] in ('detect', 'instance'):
        return detection_learner(dls, model, metrics=[], valid_loss=False, log_loss_parts=False)
    loss = (SegmentationLoss(None) if cfg['task'] == 'segment' else
            BCEWithLogitsLossFlat() if cfg.get('multi_label') else CrossEntropyLossFlat())
    return Learner(dls, model, loss_func=loss)

# %% cell from_pretrained
def _local_folder(repo_or_dir, **download) -> Path:
    path = Path(str(repo_or_dir)).expanduser()
    if path.is_dir(): return path
    if path.exists() or str(repo_or_dir).startswith(('.', '/', '~')) or str(repo_or_dir).count('/') > 1:
        raise ValueError(f"{repo_or_dir} is not a folder: pass the folder save_pretrained wrote, or a Hub repo id "
                         "such as 'user/name'.")
    return Path(snapshot_download(str(repo_or_dir), allow_patterns=HUB_FILES, library_name='res2netplus',
                                  library_version=__version__, **download))

def from_pretrained(repo_or_dir, revision:str|None=None, cache_dir=None, local_dir=None, local_files_only:bool=False,
                    token:str|None=None, device=None) -> Learner:
    """A `Learner` for prediction from a folder written by `save_pretrained`, or a Hub repo (downloaded with
    `snapshot_download`; only its config, weights, card and plots): no pickle is read"""
    path = _local_folder(repo_or_dir, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                         local_files_only=local_files_only, token=token)
    cfg = read_hub_config(path)
    weights = path/'model.safetensors'
    if not weights.is_file(): raise ValueError(f"No model.safetensors in {path}: upload it beside config.json.")
    model = load_model_state(build_model(cfg), safetensors.torch.load_file(weights), str(weights),
                             "it belongs to another model than config.json describes: keep the two files together.")
    return inference_learner(cfg, model.eval(), device)
