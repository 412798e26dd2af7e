"""Segmentation heads at small budgets on real images: ours (U-Net, FPN, DeepLabV3+) against smp's on the same encoder.

    python benchmarks/seg_heads.py          # the full grid: 120 runs of 1-12 min each on 2 CPU cores (hours)
    python benchmarks/seg_heads.py --arch res2netplus_1111 --heads fpn --opts ranger adam --schedules one_cycle \
        --epochs 5 --seeds 0 --variants before after smp   # the rows of docs/quality.md, a few at a time

Data: the stardist nuclei tiles of `real_data.py` (35 training tiles of 128 px, 4 held-out, 20 % foreground; fetched
from PyPI when missing). Every run starts from random init with the same DataLoaders (bs 8, no augmentation), loss
(`SegmentationLoss`, cross-entropy), lr and schedule; what changes is named in the row. Held-out foreground Dice:
2·TP / (2·TP + FP + FN) of the nucleus class over all held-out pixels. Variants:
- `before`: `res2netplus_seg_learner(dls, head=..., mix=None, opt_func=opt, init_prior=None)`: the heads as they were
  (classifier bias 0, i.e. both classes 0.5 at the start).
- `after`: today's defaults (`init_prior='auto'`: the classifier's bias starts at the class frequencies of the
  training masks).
- `smp`: segmentation_models_pytorch's Unet / FPN / DeepLabV3Plus on `tu-res2netplus50` (skipped if smp is missing).
Encoders: `res2netplus50`, or `res2netplus_1111` (res2netplus50 with one block per stage, for a loaded machine).
Optimizers: `ranger` (the recipe's: RAdam + Lookahead), `adam` (fastai's Adam), `radam` (ranger without Lookahead).
Schedules: `one_cycle` (`fit_one_cycle(epochs, lr)`) and `recipe` (`fit_recipe(epochs, lr)`; for smp, `fit_flat_cos`).
Results are appended to benchmarks/results/seg_heads.json one run at a time; `--table` prints the table from it.
"""
import argparse, json, statistics, sys, time, warnings
from functools import partial
from pathlib import Path
warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).parent))
import torch
from fastai.vision.all import Learner, Adam, RAdam, ranger, set_seed
from res2netplus.models import res2netplus50
from res2netplus.segmentation import res2netplus_seg_learner, SegmentationLoss
from real_data import nuclei_seg_dls
from stats import mean_sd

RESULTS = Path(__file__).parent/'results'/'seg_heads.json'
OPTS = {'ranger': ranger, 'adam': Adam, 'radam': RAdam}
SMP_HEADS = {'unet': 'Unet', 'fpn': 'FPN', 'deeplabv3plus': 'DeepLabV3Plus'}

def foreground_dice(learn) -> float:
    "Nucleus-class Dice over all held-out pixels"
    preds, targs = learn.get_preds()
    pred, targ = preds.argmax(1) == 1, targs == 1
    return float(2 * (pred & targ).sum() / (pred.sum() + targ.sum()).clamp_min(1))

ARCHS = {'res2netplus50': {}, 'res2netplus_1111': dict(layers=(1, 1, 1, 1))}  # the second: one block per stage

def make_learner(dls, variant:str, head:str, opt:str, arch:str='res2netplus50'):
    if variant == 'smp':
        import segmentation_models_pytorch as smp
        import res2netplus.models  # noqa: F401  registers res2netplus50 with timm
        model = getattr(smp, SMP_HEADS[head])('tu-res2netplus50', encoder_weights=None, classes=2, **ARCHS[arch])
        return Learner(dls, model, loss_func=SegmentationLoss(), opt_func=OPTS[opt])
    prior = {'before': None, 'after': 'auto'}[variant]
    return res2netplus_seg_learner(dls, partial(res2netplus50, **ARCHS[arch]), head=head, mix=None,
                                   opt_func=OPTS[opt], init_prior=prior)

def run(variant:str, head:str, opt:str, schedule:str, epochs:int, seed:int, lr:float, arch:str) -> dict:
    set_seed(seed, reproducible=True)
    dls = nuclei_seg_dls(bs=8, seed=seed)
    learn = make_learner(dls, variant, head, opt, arch)
    start = time.time()
    with learn.no_bar(), learn.no_logging():
        if schedule == 'one_cycle': learn.fit_one_cycle(epochs, lr)
        elif variant == 'smp': learn.fit_flat_cos(epochs, lr)
        else: learn.fit_recipe(epochs, lr)
    seconds = time.time() - start
    return dict(arch=arch, variant=variant, head=head, opt=opt, schedule=schedule, epochs=epochs, seed=seed, lr=lr,
                dice=round(foreground_dice(learn), 4), valid_loss=round(float(learn.validate()[0]), 4),
                seconds=round(seconds, 1))

def load() -> list: return json.loads(RESULTS.read_text()) if RESULTS.exists() else []

def table(rows:list) -> str:
    "Markdown table: foreground Dice mean ± sd over seeds, per configuration"
    groups = {}
    for r in rows:
        key = (r.get('arch', 'res2netplus50'), r['head'], r['variant'], r['opt'], r['schedule'], r['epochs'], r['lr'])
        groups.setdefault(key, []).append(r)
    lines = ['| encoder | head | variant | optimizer | schedule | epochs | lr | Dice mean ± sd | seeds | s/run |',
             '|---|---|---|---|---|---:|---:|---|---:|---:|']
    for (arch, head, variant, opt, sched, ep, lr), rs in sorted(groups.items()):
        d = [r['dice'] for r in rs]
        lines.append(f"| {arch} | {head} | {variant} | {opt} | {sched} | {ep} | {lr:g} | {mean_sd(d)} "
                     f"| {len(d)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--heads', nargs='+', default=['unet', 'fpn', 'deeplabv3plus'])
    p.add_argument('--variants', nargs='+', default=['before', 'after', 'smp'])
    p.add_argument('--opts', nargs='+', default=['ranger', 'adam'])
    p.add_argument('--schedules', nargs='+', default=['one_cycle', 'recipe'])
    p.add_argument('--epochs', nargs='+', type=int, default=[5, 15])
    p.add_argument('--seeds', nargs='+', type=int, default=[0, 1])
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--arch', default='res2netplus50', choices=list(ARCHS))
    p.add_argument('--table', action='store_true', help='print the table of the saved results and stop')
    a = p.parse_args()
    torch.set_num_threads(2)
    rows = load()
    if not a.table:
        for seed in a.seeds:
            for epochs in a.epochs:
                for schedule in a.schedules:
                    for opt in a.opts:
                        for head in a.heads:
                            for variant in a.variants:
                                if variant == 'smp' and schedule == 'recipe': continue  # fit_recipe is ours
                                r = run(variant, head, opt, schedule, epochs, seed, a.lr, a.arch)
                                print(json.dumps(r), flush=True)
                                rows.append(r)
                                RESULTS.parent.mkdir(exist_ok=True)
                                RESULTS.write_text(json.dumps(rows, indent=1))
    print(table(rows))

if __name__ == '__main__':
    main()
