"""What swapping ReLU for Mish costs pretrained weights, and whether a gradual ReLU -> Mish schedule removes the cost.

    nice -n 5 python benchmarks/mish_transfer.py                    # pretrain once (cached), then 4 arms x 3 seeds
    nice -n 5 python benchmarks/mish_transfer.py --seeds 0 1 2 3 4 --epochs 5 --pretrain-cpu 480

Res2NetPlus's ImageNet weights are Res2Net-v1b's (`res2net50d`), trained with ReLU, transferred exactly
(`transfer_v1b_to_plus`) into a network that runs Mish. No ImageNet weights can be fetched here, so the study builds
its own transfer on one CPU thread (`torch.set_num_threads(1)`; budgets are process CPU seconds):

* **Source**: `res2net50d` (ReLU) trained from random init on Fashion-MNIST (60,000 training images; Zalando
  Research, MIT licence; read from the Debian package `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist,
  installed when missing and allowed) at 32 px, grey repeated to 3 channels, ImageNet normalisation, batch 64, AdamW
  with a one-cycle schedule, for `--pretrain-cpu` CPU seconds (default 240). Its accuracy on 2,000 Fashion-MNIST
  test images is recorded. The state dict is cached (`$RES2NETPLUS_HOME/mish_transfer/`) so reruns skip this;
  `res2netplus_learner(weights=)` replaces its 10-class classifier by a fresh head.
* **Target**: scikit-learn's bundled `load_digits`: 1,797 real handwritten digits, 8x8 px, 16 grey levels (the UCI
  "Optical Recognition of Handwritten Digits" test set, E. Alpaydin and C. Kaynak 1998; CC BY 4.0 at UCI; shipped
  inside scikit-learn, BSD-3-Clause), upscaled to 32 px (bilinear), 3 channels. Split once (seed 0, class-balanced):
  `--n-train` images per class for training (default 50), `--n-valid` others per class held out (default 60).
* **Arms**, fine-tuned alike with the package recipe for short runs, `res2netplus_learner(dls, 'res2netplus50',
  weights=<source>, epochs=E)` then `learn.fit_recipe(E, seed=s)`: one head-only epoch on the frozen body, then E
  epochs of the whole network (Adam, one-cycle, discriminative lr 1.5e-5 to 1.5e-3, label smoothing 0.1):
  `relu`: every `nn.Mish` of the Plus body replaced by `nn.ReLU` (the transfer is then exact);
  `mish`: Plus as it is (Mish at once: `pretrained=True`'s behaviour before and, from this study, its default);
  `schedule`: `MishSchedule(pct)`: ReLU during the frozen epoch, then ReLU -> Mish (cosine) over the first `pct` of
  the unfrozen fit, plain Mish afterwards;
  `scratch`: Plus with Mish from random init, E epochs of the recipe without the frozen epoch (what pretraining buys).

Measured per run: held-out accuracy and validation loss after training, the same after the frozen epoch (how well
the transferred features serve a new head as they are), and the CPU seconds. Runs of one seed are interleaved across
arms. Prints a markdown table (mean +- sd over seeds) and writes benchmarks/results/mish_transfer.json.
"""
import argparse, json, statistics, sys, time, warnings
from pathlib import Path
from fastai.callback.core import Callback
warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import ensure_fashion_mnist  # noqa: E402
from stats import mean_sd  # noqa: E402

ARMS = ('relu', 'mish', 'schedule', 'scratch')

def fashion_tensors(images, size:int):
    "uint8 (n, 28, 28) images as normalised (n, 3, size, size) float tensors"
    import torch
    import torch.nn.functional as F
    from fastai.vision.all import imagenet_stats
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).expand(-1, 3, -1, -1)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in imagenet_stats)
    return ((x - mean) / std).contiguous()

def pretrain(args) -> Path:
    "Train res2net50d (ReLU) on Fashion-MNIST for `args.pretrain_cpu` CPU seconds; cache and return the state dict"
    import torch
    import torch.nn.functional as F
    from res2netplus.data import default_cache_dir, load_fashion_mnist
    from res2netplus.models import res2net50d
    out = default_cache_dir()/'mish_transfer'/f'res2net50d_fmnist_{args.size}px_{args.pretrain_cpu}cpus.pth'
    info = out.with_suffix('.json')
    if out.exists() and info.exists(): return out
    ensure_fashion_mnist()
    data, g = load_fashion_mnist(), torch.Generator().manual_seed(0)
    x, y = fashion_tensors(data['train'], args.size), torch.from_numpy(data['train_labels']).long()
    torch.manual_seed(0)
    model = res2net50d(num_classes=10).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    def step(idx):
        loss = F.cross_entropy(model(x[idx].to(memory_format=torch.channels_last)), y[idx])
        loss.backward(); opt.step(); opt.zero_grad()
        return loss.item()
    order, bs = torch.randperm(len(x), generator=g), 64
    batches = (order[i:i+bs] for i in range(0, len(order) - bs + 1, bs))
    start = time.process_time()
    for _ in range(3): step(next(batches))  # times a step: the one-cycle schedule needs its length
    per_step = (time.process_time() - start) / 3
    n_steps = max(int((args.pretrain_cpu - (time.process_time() - start)) / per_step), 10)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=n_steps)
    for i in range(n_steps):
        try: idx = next(batches)
        except StopIteration:
            order = torch.randperm(len(x), generator=g)
            batches = (order[j:j+bs] for j in range(0, len(order) - bs + 1, bs)); idx = next(batches)
        loss = step(idx); sched.step()
        if i % 100 == 0: print(f'  pretrain step {i}/{n_steps}: loss {loss:.3f}', flush=True)
    cpu = time.process_time() - start
    model.eval()
    xt, yt = fashion_tensors(data['test'][:2000], args.size), torch.from_numpy(data['test_labels'][:2000]).long()
    with torch.no_grad(): acc = sum((model(xt[i:i+250]).argmax(1) == yt[i:i+250]).sum().item()
                                    for i in range(0, 2000, 250)) / 2000
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    info.write_text(json.dumps(dict(steps=n_steps + 3, batch=bs, images=(n_steps + 3)*bs, cpu_seconds=cpu,
                                    fmnist_test_accuracy=acc, size=args.size)))
    print(f'pretrained res2net50d: {n_steps + 3} steps in {cpu:.0f} CPU s, Fashion-MNIST test accuracy {acc:.4f}')
    return out

def digits_folder(args) -> Path:
    "scikit-learn's digits at `args.size` px as an image tree: `args.n_train` and `args.n_valid` per class"
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from res2netplus.data import default_cache_dir
    dest = default_cache_dir()/'mish_transfer'/f'digits_{args.size}px_{args.n_train}_{args.n_valid}'
    if (dest/'.complete').exists(): return dest
    d, rng = load_digits(), np.random.default_rng(0)
    split = {}
    for c in range(10):
        order = rng.permutation(np.flatnonzero(d.target == c))
        split |= {i: 'train' for i in order[:args.n_train]}
        split |= {i: 'valid' for i in order[args.n_train:args.n_train + args.n_valid]}
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        if i not in split: continue
        folder = dest/split[i]/str(label); folder.mkdir(parents=True, exist_ok=True)
        pil = Image.fromarray((img*255/16).round().astype(np.uint8)).resize((args.size,)*2, Image.BILINEAR)
        pil.convert('RGB').save(folder/f'{i:04d}.png')
    (dest/'.complete').write_text('')
    return dest

class FitLog(Callback):
    "The recorder's rows of every fit (fastai's recorder keeps the last fit's only)"
    order = 60
    def __init__(self): self.fits = []
    def after_fit(self): self.fits.append([[float(v) for v in row] for row in self.recorder.values])

def finetune(arm:str, seed:int, path:Path, source:Path, args) -> dict:
    import torch
    from torch import nn
    import fastai.vision.all as fv
    from res2netplus.learner import res2netplus_learner
    from res2netplus.act_schedule import MishSchedule, MishBlend
    fv.set_seed(seed, reproducible=True)
    dls = fv.ImageDataLoaders.from_folder(path, valid='valid', bs=args.bs, num_workers=0, seed=seed)
    pretrained = arm != 'scratch'
    log = FitLog()
    cbs = [log] + ([MishSchedule(args.pct, args.curve)] if arm == 'schedule' else [])
    # relu: every Mish of the body replaced by ReLU; schedule: the MishSchedule in cbs (the learner adds no other)
    learn = res2netplus_learner(dls, 'res2netplus50', weights=source if pretrained else None, epochs=args.epochs,
                                precision=None, cbs=cbs, pretrained_act='mish' if arm == 'scratch' else arm)
    start = time.process_time()
    with learn.no_bar(), learn.no_logging(): learn.fit_recipe(args.epochs, seed=seed)
    cpu = time.process_time() - start
    values = [row for fit in log.fits for row in fit]  # train loss, valid loss, accuracy per epoch
    acts = {type(m).__name__ for m in learn.model.modules() if type(m) in (nn.ReLU, nn.Mish, MishBlend)}
    r = dict(arm=arm, seed=seed, valid_loss=values[-1][1], accuracy=values[-1][2], epochs_log=values,
             cpu_seconds=cpu, activations_after=sorted(acts))
    if pretrained: r |= dict(frozen_valid_loss=values[0][1], frozen_accuracy=values[0][2])
    del learn; torch.set_num_threads(1)
    return r

def table(results) -> str:
    lines = ['| arm | accuracy (%) | valid loss | frozen epoch: accuracy (%) | valid loss | seeds | CPU s / run |',
             '|---|---|---|---|---|---|---|']
    for arm in ARMS:
        rs = [r for r in results if r['arm'] == arm]
        if not rs: continue
        frozen = [r for r in rs if 'frozen_accuracy' in r]
        fa = mean_sd([r['frozen_accuracy'] for r in frozen], 100) if frozen else '—'
        fl = mean_sd([r['frozen_valid_loss'] for r in frozen]) if frozen else '—'
        acc, loss = mean_sd([r['accuracy'] for r in rs], 100), mean_sd([r['valid_loss'] for r in rs])
        lines.append(f"| {arm} | {acc} | {loss} | "
                     f"{fa} | {fl} | {len(rs)} | {statistics.mean(r['cpu_seconds'] for r in rs):.0f} |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--arms', nargs='+', choices=ARMS, default=list(ARMS))
    p.add_argument('--epochs', type=int, default=3, help='unfrozen epochs (pretrained arms add one frozen epoch)')
    p.add_argument('--pct', type=float, default=0.3, help='part of the unfrozen fit the ReLU -> Mish ramp takes')
    p.add_argument('--curve', default='cos', choices=['cos', 'linear'])
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--n-train', type=int, default=50, help='training digits per class')
    p.add_argument('--n-valid', type=int, default=60, help='held-out digits per class (at most 124 with 50 training)')
    p.add_argument('--pretrain-cpu', type=int, default=240, help='CPU seconds of source pretraining')
    p.add_argument('--out', default='benchmarks/results/mish_transfer.json')
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    source = pretrain(args)
    path = digits_folder(args)
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(out.read_text()) if out.exists() else {}
    setup = dict(epochs=args.epochs, pct=args.pct, curve=args.curve, size=args.size, bs=args.bs, n_train=args.n_train,
                 n_valid=args.n_valid,
                 pretrain_cpu=args.pretrain_cpu, torch=torch.__version__, threads=torch.get_num_threads())
    results = saved.get('runs', []) if saved.get('setup') == setup else []
    source_info = json.loads(source.with_suffix('.json').read_text())
    print(f"source: {source_info}\ntarget: digits, {10*args.n_train} training and {10*args.n_valid} held-out images "
          f"at {args.size} px", flush=True)
    # the pretrained arms of each seed first (interleaved, so that machine load affects them alike), scratch last
    order = [(s, a) for s in args.seeds for a in args.arms if a != 'scratch'] + [(s, 'scratch') for s in args.seeds
                                                                                if 'scratch' in args.arms]
    for seed, arm in order:
        if any(r['arm'] == arm and r['seed'] == seed for r in results): continue
        r = finetune(arm, seed, path, source, args)
        results.append(r)
        out.write_text(json.dumps(dict(setup=setup, source=source_info, runs=results), indent=1))
        print(f"  {arm:9s} seed {seed}: {100*r['accuracy']:.2f} %, valid loss {r['valid_loss']:.3f} "
              f"({r['cpu_seconds']:.0f} CPU s)", flush=True)
    print(table(results))

if __name__ == '__main__': main()
