"""Quality at equal training budgets on real data: Res2NetPlus against its peers, all from random init, several seeds.

    python benchmarks/quality.py                          # everything: classification, segmentation, detection
    python benchmarks/quality.py --tasks cls --budgets 60 180 --seeds 0 1 2
    python benchmarks/quality.py --tasks seg det --seg-budget 90 --det-budget 90
    python benchmarks/quality.py --worker & python benchmarks/quality.py --worker   # two processes share the jobs
    python benchmarks/quality.py --table                  # the markdown tables of benchmarks/results/quality.json
    python benchmarks/quality.py --tasks cls --budgets 5 --seeds 0 --out /tmp/q.json   # a smoke test (minutes)

**Budget.** Each run gets the same *process CPU time* (`time.process_time()`), not the same epochs: Res2NetPlus costs
more per step, so at an equal budget it takes fewer steps. torch runs on one thread (`torch.set_num_threads(1)`), so
CPU seconds equal wall seconds on a dedicated core, and machine load (other processes) does not shorten a run's
budget. Each run first times a few warm-up batches (after two untimed ones) in fastai's own loop, restores the
initial weights, then plans `fit_one_cycle` for the number of steps the budget buys (budget / seconds per step) over
a random stream of training items; a callback stops the fit after the batch where the budget runs out (a safety stop:
it fires only if the steps turn out slower than timed). Validation is outside the budget. Finished runs are skipped
(results are appended to `--out` one run at a time, under a file lock), so the script resumes after an interruption;
with `--worker`, several processes claim jobs from one list (each job once).

**Classification** (`cls`): Fashion-MNIST from the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist`, read by `res2netplus.data.load_fashion_mnist`; Zalando Research, MIT licence,
Xiao et al. 2017). Training: a random stream over all 60,000 training images (a run at a small budget sees part of one
epoch). Validation: a fixed class-balanced subset of 2,000 of the 10,000 test images (200 per class, numpy seed 0).
32 px (the 28 px images are resized), grey as 3 channels, batch 64, the package's augmentation
(`AlbumentationsTransform(res2netplus_augs(32))`, then `Resize(32)`), label-smoothed cross-entropy (eps 0.1, as
`res2netplus_learner` uses), Adam with `fit_one_cycle` at lr 3e-3 (the package's short-run recipe, `SHORT_RECIPE`),
no mixing. Models: `res2netplus_learner(dls, res2netplus50, mix=None)` (the package's path; it adds channels_last on
CPU), fastai's `xresnet50`, timm's `res2net50d` through fastai's timm route (`vision_learner(dls, 'res2net50d')`) and
torchvision's `resnet50` (fastai's `resnet50`), all `pretrained=False`. Scores: validation loss (label-smoothed, the
training loss), plain cross-entropy (NLL) and accuracy.

**Segmentation** (`seg`): the stardist nuclei of `benchmarks/real_data.py` (one 512×512 fluorescence image with 125
labelled nuclei from the stardist 0.9.2 wheel on PyPI, from the 2018 Kaggle Data Science Bowl, BBBC038; stardist's
code is BSD-3-Clause, BBBC038 CC0 as far as we know, not checked offline): 35 training tiles of 128 px, 4 held-out
tiles, batch 8, no augmentation, cross-entropy, Adam with `fit_one_cycle` at lr 1e-3. Models:
`res2netplus_seg_learner(dls, res2netplus50, head='unet', mix=None)`, fastai's `unet_learner(dls, resnet50)` and
segmentation_models_pytorch's `Unet('resnet50')`, from random init. Scores: nucleus Dice and IoU over all held-out
pixels.

**Detection** (`det`): the same nuclei as boxes (one box per nucleus, the COCO folder of
`benchmarks/detection_real.py`: 35 training tiles, 4 held-out tiles with about 40 nuclei), images at 128 px, batch 4,
the package's default detection augmentation, SGD (momentum 0.9, wd 1e-4) with `fit_one_cycle` at lr 0.02, 300 RPN
proposals, 128 RoIs per image. Models: `res2netplus_det_learner(dls, 'res2netplus50')` (Faster R-CNN on a
res2netplus50-FPN) and torchvision's `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)` in the package's
`detection_learner`. Score: pycocotools box AP and AP50 on the held-out tiles. (The deepforest tree crowns of
`real_data.py` were not used: at their 400 px a from-scratch detector takes only a handful of steps in this budget.)

Prints markdown tables (mean ± sd over seeds) and writes JSON.
"""
import argparse, fcntl, json, math, statistics, sys, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).parent))

RESULTS = Path(__file__).parent/'results'/'quality.json'
CLS_MODELS = ['res2netplus50', 'xresnet50', 'res2net50d', 'resnet50']
SEG_MODELS = ['res2netplus50_unet', 'fastai_resnet50_unet', 'smp_resnet50_unet']
DET_MODELS = ['res2netplus50_frcnn', 'torchvision_resnet50_frcnn']
SETTINGS = dict(cls=dict(bs=64, lr=3e-3, size=32, n_valid_per_class=200, label_smoothing=0.1),
                seg=dict(bs=8, lr=1e-3), det=dict(bs=4, lr=0.02, size=128, proposals=300, rois=128))
WARMUP, TIMED = 1, 3  # untimed, then timed batches before each run

# ---------------------------------------------------------------- budget machinery
from fastai.vision.all import Callback, CancelFitException, CancelValidException  # noqa: E402
from stats import mean_sd  # noqa: E402

class CPUBudget(Callback):
    "Stop the fit after the batch where `budget` process CPU seconds (counted from the first batch) are spent"
    order = 99
    def __init__(self, budget:float): self.budget, self.steps, self.cpu = budget, 0, 0.
    def before_fit(self): self.start = time.process_time()
    def after_batch(self):
        if not self.training: return
        self.steps += 1
        self.cpu = time.process_time() - self.start
        if self.cpu >= self.budget: raise CancelFitException()

class StepTimer(Callback):
    "Process CPU seconds of each training step (data loading included), over a short fit"
    order = 99
    def before_fit(self): self.marks = [time.process_time()]
    def after_batch(self): self.marks.append(time.process_time())

class SkipValidation(Callback):
    "No validation inside the fit: the held-out set is scored once, after it"
    def before_validate(self): raise CancelValidException()

class Stream(object):
    "The items `idxs` (repeats allowed) of a dataset, in that order; other attributes are the dataset's"
    def __init__(self, base, idxs): self.base, self.idxs = base, list(idxs)
    def __len__(self): return len(self.idxs)
    def __getitem__(self, i): return self.base[self.idxs[i]]
    def __getattr__(self, k):
        if k in ('base', 'idxs'): raise AttributeError(k)
        return getattr(self.base, k)

def random_stream(n_items:int, length:int, seed:int) -> list:
    "`length` indices in 0…n_items-1: consecutive random permutations (every item once before any repeats)"
    import numpy as np
    rng, out = np.random.default_rng([seed, 1]), []
    while len(out) < length: out += rng.permutation(n_items).tolist()
    return out[:length]

def set_train_stream(learn, base_train, n_steps:int, bs:int, seed:int, task:str):
    "Make `learn`'s training loader a random stream of `n_steps` full batches"
    idxs = random_stream(len(base_train), n_steps * bs, seed)
    if task == 'det': ds = base_train.subset(idxs, base_train.augment)
    else: ds = Stream(base_train, idxs)
    learn.dls.train = learn.dls.train.new(dataset=ds, shuffle=False, drop_last=True)

def seconds_per_step(learn, base_train, bs:int, seed:int, task:str, lr:float) -> float:
    "CPU seconds per training step in fastai's loop, from a short fit; the weights are restored afterwards"
    import copy
    state = copy.deepcopy(learn.model.state_dict())
    set_train_stream(learn, base_train, WARMUP + TIMED, bs, seed + 10_000, task)
    timer = StepTimer()
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr, cbs=[timer, SkipValidation()])
    learn.model.load_state_dict(state)
    learn.opt = None  # a fresh optimizer for the real fit
    marks = timer.marks[1 + WARMUP:]
    return (marks[-1] - timer.marks[WARMUP]) / len(marks)

def train_on_budget(learn, base_train, budget:float, bs:int, seed:int, task:str, lr:float) -> dict:
    from fastai.vision.all import set_seed
    sps = seconds_per_step(learn, base_train, bs, seed, task, lr)
    planned = max(1, int(budget / sps))
    set_seed(seed, reproducible=True)
    set_train_stream(learn, base_train, planned, bs, seed, task)
    stop = CPUBudget(budget)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, lr, cbs=[stop, SkipValidation()])
    return dict(timed_s_per_step=sps, planned_steps=planned, steps=stop.steps, train_cpu_s=stop.cpu,
                images_seen=stop.steps * bs, stopped_early=stop.steps < planned)

# ---------------------------------------------------------------- classification
_FMNIST = {}

def fashion_mnist():
    import numpy as np
    from res2netplus.data import load_fashion_mnist
    if not _FMNIST:
        data = load_fashion_mnist()
        rng = np.random.default_rng(0)
        n = SETTINGS['cls']['n_valid_per_class']
        valid = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data['test_labels'] == c))[:n]
                                        for c in range(10)]))
        _FMNIST.update(data, valid=valid)
    return _FMNIST

def cls_dls(seed:int):
    import numpy as np
    import fastai.vision.all as fv
    from res2netplus.augment import AlbumentationsTransform, res2netplus_augs
    from res2netplus.data import FASHION_MNIST_CLASSES
    d, s = fashion_mnist(), SETTINGS['cls']
    n_train = len(d['train'])
    items = list(range(n_train)) + [n_train + int(i) for i in d['valid']]
    def image(i):
        a = d['train'][i] if i < n_train else d['test'][i - n_train]
        return fv.PILImage.create(np.repeat(a[..., None], 3, -1))
    def label(i): return FASHION_MNIST_CLASSES[d['train_labels'][i] if i < n_train else d['test_labels'][i - n_train]]
    block = fv.DataBlock((fv.ImageBlock, fv.CategoryBlock(vocab=FASHION_MNIST_CLASSES)), get_x=image, get_y=label,
                         splitter=fv.IndexSplitter(range(n_train, len(items))),
                         item_tfms=[AlbumentationsTransform(res2netplus_augs(s['size'])), fv.Resize(s['size'])])
    return block.dataloaders(items, bs=s['bs'], num_workers=0, seed=seed)

def cls_learner(dls, model:str):
    import fastai.vision.all as fv
    from res2netplus.learner import res2netplus_learner
    from res2netplus.models import res2netplus50
    if model == 'res2netplus50':  # float32, as the peers: the comparison is of networks, not precisions
        return res2netplus_learner(dls, res2netplus50, mix=None, opt_func=fv.Adam, precision='fp32')
    arch = {'xresnet50': fv.xresnet50, 'res2net50d': 'res2net50d', 'resnet50': fv.resnet50}[model]
    return fv.vision_learner(dls, arch, pretrained=False, opt_func=fv.Adam, metrics=fv.accuracy,
                             loss_func=fv.LabelSmoothingCrossEntropyFlat(eps=SETTINGS['cls']['label_smoothing']))

def cls_scores(learn) -> dict:
    import torch
    eps = SETTINGS['cls']['label_smoothing']
    probs, targs = learn.get_preds()
    logp = probs.clamp_min(1e-12).log()
    nll = float(torch.nn.functional.nll_loss(logp, targs))
    return dict(valid_loss=(1 - eps) * nll + eps * float(-logp.mean(1).mean()), valid_nll=nll,
                accuracy=float((probs.argmax(1) == targs).float().mean()), n_valid=len(targs))

# ---------------------------------------------------------------- segmentation
def seg_learner(dls, model:str):
    import fastai.vision.all as fv
    if model == 'res2netplus50_unet':
        from res2netplus.models import res2netplus50
        from res2netplus.segmentation import res2netplus_seg_learner
        return res2netplus_seg_learner(dls, res2netplus50, head='unet', mix=None, opt_func=fv.Adam)
    if model == 'fastai_resnet50_unet':
        return fv.unet_learner(dls, fv.resnet50, pretrained=False, opt_func=fv.Adam,
                               loss_func=fv.CrossEntropyLossFlat(axis=1))
    import segmentation_models_pytorch as smp
    return fv.Learner(dls, smp.Unet('resnet50', encoder_weights=None, classes=2), opt_func=fv.Adam,
                      loss_func=fv.CrossEntropyLossFlat(axis=1))

def seg_scores(learn) -> dict:
    preds, targs = learn.get_preds()
    pred, targ = preds.argmax(1) == 1, targs == 1
    tp, fp, fn = float((pred & targ).sum()), float((pred & ~targ).sum()), float((~pred & targ).sum())
    return dict(dice=2 * tp / max(2 * tp + fp + fn, 1), iou=tp / max(tp + fp + fn, 1))

# ---------------------------------------------------------------- detection
def det_dls(seed:int):
    from detection_real import nuclei_coco, dataloaders
    from real_data import data_dir
    return dataloaders(nuclei_coco(data_dir()/'nuclei_coco'), False, SETTINGS['det']['bs'], seed)

def det_learner(dls, model:str):
    s = SETTINGS['det']
    kw = dict(min_size=s['size'], max_size=s['size'], rpn_post_nms_top_n_train=s['proposals'],
              rpn_post_nms_top_n_test=s['proposals'], box_batch_size_per_image=s['rois'])
    if model == 'res2netplus50_frcnn':
        from res2netplus.detection import res2netplus_det_learner
        return res2netplus_det_learner(dls, 'res2netplus50', task='detect', **kw)
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from res2netplus.detection.learner import detection_learner
    return detection_learner(dls, fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
                                                          num_classes=len(dls.train.dataset.classes), **kw))

def det_scores(learn) -> dict:
    from res2netplus.detection import evaluate_detector
    box = evaluate_detector(learn, learn.dls)['bbox']
    return dict(box_AP=float(box['AP']), box_AP50=float(box['AP50']))

# ---------------------------------------------------------------- runs, results
TASKS = dict(cls=(cls_dls, cls_learner, cls_scores), seg=(None, seg_learner, seg_scores),
             det=(det_dls, det_learner, det_scores))

def run(task:str, model:str, budget:float, seed:int) -> dict:
    import torch
    from fastai.vision.all import set_seed
    if task == 'seg':
        from real_data import nuclei_seg_dls
        make_dls = lambda seed: nuclei_seg_dls(bs=SETTINGS['seg']['bs'], seed=seed)  # noqa: E731
    else: make_dls = TASKS[task][0]
    _, make_learner, scores = TASKS[task]
    s = SETTINGS[task]
    set_seed(seed, reproducible=True)
    dls = make_dls(seed)
    set_seed(seed, reproducible=True)
    learn = make_learner(dls, model)
    base_train = dls.train.dataset
    start = time.perf_counter()
    row = train_on_budget(learn, base_train, budget, s['bs'], seed, task, s['lr'])
    row['train_wall_s'] = time.perf_counter() - start
    start = time.process_time()
    with learn.no_bar(): row |= scores(learn)
    row['valid_cpu_s'] = time.process_time() - start
    return dict(task=task, model=model, budget_cpu_s=budget, seed=seed, threads=torch.get_num_threads(), **row)

def key(r) -> tuple: return (r['task'], r['model'], float(r['budget_cpu_s']), r['seed'])

class Locked:
    "Read-modify-write of a JSON list under an exclusive lock (several workers share the file)"
    def __init__(self, path:Path): self.path = path
    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = open(str(self.path) + '.lock', 'w'); fcntl.flock(self.lock, fcntl.LOCK_EX)
        return json.loads(self.path.read_text()) if self.path.exists() else []
    def save(self, data): self.path.write_text(json.dumps(data, indent=1))
    def __exit__(self, *exc): fcntl.flock(self.lock, fcntl.LOCK_UN); self.lock.close()

def jobs(args) -> list:
    """Seed-major (every budget of a seed before the next seed), models interleaved within a seed and budget, so that
    machine load affects them alike and a partial run has whole seeds; then segmentation and detection"""
    out = []
    if 'cls' in args.tasks: out += [('cls', m, b, s) for s in args.seeds for b in args.budgets for m in CLS_MODELS]
    for s in args.seg_seeds:
        if 'seg' in args.tasks: out += [('seg', m, args.seg_budget, s) for m in args.seg_models]
        if 'det' in args.tasks: out += [('det', m, args.det_budget, s) for m in DET_MODELS]
    return [(t, m, float(b), s) for t, m, b, s in out]

def claim(args, job) -> bool:
    "True when nobody has finished or claimed `job` (the claim is recorded)"
    claims = Locked(Path(str(args.out) + '.claims'))
    with claims as taken:
        with Locked(args.out) as results:
            if job in {key(r) for r in results}: return False
        if args.worker and list(job) in taken: return False
        if args.worker: claims.save(taken + [list(job)])
    return True

def tables(results:list) -> str:
    groups = {}
    for r in results: groups.setdefault((r['task'], float(r['budget_cpu_s']), r['model']), []).append(r)
    cols = dict(cls=[('valid loss (LS)', 'valid_loss', 1, 3), ('valid NLL', 'valid_nll', 1, 3),
                     ('accuracy %', 'accuracy', 100, 2)],
                seg=[('Dice', 'dice', 1, 3), ('IoU', 'iou', 1, 3)],
                det=[('box AP %', 'box_AP', 100, 1), ('box AP50 %', 'box_AP50', 100, 1)])
    order = dict(cls=CLS_MODELS, seg=SEG_MODELS, det=DET_MODELS)
    out = []
    for task in ('cls', 'seg', 'det'):
        rows = sorted((k for k in groups if k[0] == task), key=lambda k: (k[1], order[task].index(k[2])))
        if not rows: continue
        out += [f'\n### {task}\n', '| budget (CPU s) | model | ' + ' | '.join(c[0] for c in cols[task]) +
                ' | steps | s / step | train CPU s | seeds |', '|---:|---|' + '---|' * len(cols[task]) + '---:|' * 4]
        for k in rows:
            rs = groups[k]
            vals = ' | '.join(mean_sd([r[f] for r in rs], sc, dg) for _, f, sc, dg in cols[task])
            steps = statistics.mean(r['steps'] for r in rs)
            sps = statistics.mean(r['timed_s_per_step'] for r in rs)
            cpu = statistics.mean(r['train_cpu_s'] for r in rs)
            out.append(f'| {k[1]:.0f} | {k[2]} | {vals} | {steps:.0f} | {sps:.2f} | {cpu:.1f} | {len(rs)} |')
    return '\n'.join(out)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', nargs='+', choices=list(TASKS), default=list(TASKS))
    p.add_argument('--budgets', type=float, nargs='+', default=[60, 180], help='classification, CPU s per run')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--seg-budget', type=float, default=90)
    p.add_argument('--det-budget', type=float, default=90)
    p.add_argument('--seg-seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds of segmentation and detection')
    p.add_argument('--seg-models', nargs='+', choices=SEG_MODELS, default=SEG_MODELS)
    p.add_argument('--worker', action='store_true', help='claim jobs from a list shared with other workers')
    p.add_argument('--out', type=Path, default=RESULTS)
    p.add_argument('--table', action='store_true', help='print the tables of --out and stop')
    args = p.parse_args()
    if args.table:
        print(tables(json.loads(args.out.read_text()))); return
    import torch
    torch.set_num_threads(1)
    for job in jobs(args):
        if not claim(args, job): continue
        print(f'{job} …', flush=True)
        row = run(*job)
        with (store := Locked(args.out)) as results:
            store.save([r for r in results if key(r) != job] + [row])
        print(json.dumps(row), flush=True)
    with Locked(args.out) as results: print(tables(results))

if __name__ == '__main__': main()
