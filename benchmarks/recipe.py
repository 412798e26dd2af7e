"""The training recipe on real data: Fashion-MNIST, equal budget, three seeds (about 45 min on 2 idle CPU cores).

    python benchmarks/recipe.py                 # optimizer study, then the architecture x mixing comparison
    python benchmarks/recipe.py --study optimizer
    python benchmarks/recipe.py --study compare --seeds 0 1 2
    python benchmarks/recipe.py --study budget   # the budget rule: epochs x mixing x optimizer on the bundled data

The budget study trains `res2netplus50` on the package's own Fashion-MNIST subset (2,000 training and 500 held-out
images, as `res2netplus train` does) at 32 px, batch 64, for several training lengths, with and without CutMix and
with each optimizer, and records accuracy, validation loss, images per second and process CPU time (with torch on 2
threads, CPU seconds / 2 estimates the wall time on an idle machine). Its table chooses `BUDGET` in
res2netplus.learner: the shortest length from which CutMix, and ranger, are no worse than without.

Needs the Debian package `dataset-fashion-mnist` (installed here when missing and allowed). Each run trains from
random init on a class-balanced subset (training images from the training set, validation images from the test
set) with the same data, augmentation, epochs, batch size, loss and schedule; only the architecture, the mixing
callback (and, in the optimizer study, the optimizer with its schedule) change. Runs of one seed are interleaved
across configurations so that machine load affects them alike. Prints a markdown table and writes JSON.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, time, warnings
from pathlib import Path
from stats import mean_sd
warnings.filterwarnings('ignore')

def ensure_fashion_mnist():
    from res2netplus.data import FASHION_MNIST_DIR
    if (FASHION_MNIST_DIR/'train-images-idx3-ubyte.gz').exists(): return
    if os.geteuid() == 0 and shutil.which('apt-get'):
        print('installing dataset-fashion-mnist …', flush=True)
        subprocess.run(['apt-get', 'install', '-y', '-q', 'dataset-fashion-mnist'], check=False,
                       stdout=subprocess.DEVNULL)
    if not (FASHION_MNIST_DIR/'train-images-idx3-ubyte.gz').exists():
        sys.exit('Fashion-MNIST is missing: run `sudo apt-get install -y dataset-fashion-mnist` and try again.')

OPTIMIZERS = {  # name: (opt_func name, schedule, lr)
    'adam_one_cycle': ('Adam', 'fit_one_cycle', 2e-3),
    'ranger_flat_cos': ('ranger', 'fit_flat_cos', 4e-3),
}

def run(path, arch, mix, opt, seed, args, epochs=None):
    import fastai.vision.all as fv
    from res2netplus import learner as rl
    from res2netplus.augment import AlbumentationsTransform, res2netplus_augs
    from res2netplus.models import RES2NET_FACTORIES
    fv.set_seed(seed, reproducible=True)
    item_tfms = [AlbumentationsTransform(res2netplus_augs(args.size)), fv.Resize(args.size)]
    dls = fv.ImageDataLoaders.from_folder(path, valid='valid', bs=args.bs, num_workers=0, seed=seed,
                                          item_tfms=item_tfms)
    opt_name, schedule, lr = OPTIMIZERS[opt]
    factory = RES2NET_FACTORIES.get(arch) or getattr(fv, arch)
    learn = rl.res2netplus_learner(dls, factory, mix=None if mix == 'none' else mix, opt_func=getattr(fv, opt_name),
                                   precision='fp32')  # every network alike, whatever the CPU
    epochs = epochs or args.epochs
    start, cpu = time.perf_counter(), time.process_time()
    with learn.no_bar(), learn.no_logging():
        getattr(learn, schedule)(epochs, lr)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        valid_loss, acc = learn.validate()
    n_images = epochs*len(learn.dls.train)*args.bs
    return dict(arch=arch, mix=mix, opt=opt, seed=seed, accuracy=float(acc), valid_loss=float(valid_loss),
                train_seconds=seconds, cpu_seconds=cpu, images_per_cpu_second=n_images/cpu)

def table(results, keys, ref):
    groups = {}
    for r in results: groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    ref_time = {r['seed']: r['train_seconds'] for r in results if all(r[k] == v for k, v in ref.items())}
    head = ' | '.join(keys)
    lines = [f'| {head} | accuracy (mean ± sd) | seeds | time / run (s) | time ratio vs {"/".join(ref.values())} |',
             '|' + '---|'*(len(keys) + 4)]
    for key, rs in groups.items():
        accs = [r['accuracy'] for r in rs]
        ratios = [r['train_seconds']/ref_time[r['seed']] for r in rs if r['seed'] in ref_time]
        ratio = f'{statistics.mean(ratios):.2f}×' if ratios else '—'
        lines.append(f"| {' | '.join(key)} | {mean_sd(accs, 100)} % | {len(rs)} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} | {ratio} |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--study', choices=['all', 'optimizer', 'compare', 'budget'], default='all')
    p.add_argument('--budget-epochs', type=int, nargs='+', default=[3, 6, 12, 24], help='lengths of the budget study')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--opt-seeds', type=int, nargs='+', default=[0, 1], help='seeds of the optimizer study')
    p.add_argument('--archs', nargs='+', default=['res2netplus50', 'xresnet50', 'res2net50d'])
    p.add_argument('--mixes', nargs='+', default=['none', 'cutmix'])
    p.add_argument('--opt', choices=list(OPTIMIZERS), default=None,
                   help="optimizer for the comparison (default: the study's winner, else the recipe's)")
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--n-train', type=int, default=100, help='training images per class')
    p.add_argument('--n-valid', type=int, default=50, help='validation images per class (from the test set)')
    p.add_argument('--out', default='benchmarks/results/recipe.json')
    args = p.parse_args()
    if args.study == 'budget': return budget_study(args)
    ensure_fashion_mnist()
    import torch
    from res2netplus.data import fashion_mnist_subset, default_cache_dir
    from res2netplus.learner import RECIPE
    path = fashion_mnist_subset(default_cache_dir()/f'fashion_mnist_{args.n_train}_{args.n_valid}', args.n_train,
                                args.n_valid)
    print(f'Fashion-MNIST {10*args.n_train} train / {10*args.n_valid} valid images at {args.size} px, '
          f'{args.epochs} epochs, batch {args.bs}, torch {torch.__version__}, {torch.get_num_threads()} threads',
          flush=True)
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else []
    def go(arch, mix, opt, seed):
        key = (arch, mix, opt, seed, args.epochs, args.size, args.bs, args.n_train)
        fields = ('arch', 'mix', 'opt', 'seed', 'epochs', 'size', 'bs', 'n_train')
        done = [r for r in results if tuple(r[f] for f in fields) == key]
        if done: return done[0]
        r = run(path, arch, mix, opt, seed, args)
        r |= dict(epochs=args.epochs, size=args.size, bs=args.bs, n_train=args.n_train)
        results.append(r); out.write_text(json.dumps(results, indent=1))
        print(f"  {arch:14s} mix={mix:7s} opt={opt:16s} seed={seed}: {100*r['accuracy']:.2f} % "
              f"in {r['train_seconds']:.0f} s", flush=True)
        return r
    opt = args.opt or next(k for k, v in OPTIMIZERS.items() if v[1] == RECIPE['schedule'])
    if args.study in ('all', 'optimizer'):
        print('\n## Optimizer and schedule (res2netplus50, CutMix)', flush=True)
        study = [go('res2netplus50', 'cutmix', o, s) for s in args.opt_seeds for o in OPTIMIZERS]
        print(table(study, ['opt'], dict(opt='adam_one_cycle')))
        if not args.opt:
            opt = max(OPTIMIZERS, key=lambda o: statistics.mean(r['accuracy'] for r in study if r['opt'] == o))
        print(f'best: {opt}', flush=True)
    if args.study in ('all', 'compare'):
        print(f'\n## Architectures x mixing ({opt})', flush=True)
        comp = [go(a, m, opt, s) for s in args.seeds for m in args.mixes for a in args.archs]
        print(table(comp, ['arch', 'mix'], dict(arch='xresnet50', mix='none')))

def budget_study(args):
    "Epochs x mixing x optimizer on the bundled subset at 32 px, batch 64: the evidence for `BUDGET`"
    import torch
    from res2netplus.data import fashion_mnist_sample
    torch.set_num_threads(2)
    args.size, args.bs = 32, 64
    path, out = fashion_mnist_sample(), Path('benchmarks/results/recipe-budget.json')
    results = json.loads(out.read_text()) if out.exists() else []
    for seed in args.seeds:
        for epochs in args.budget_epochs:
            for mix in ('none', 'cutmix'):
                for opt in OPTIMIZERS:
                    key = dict(mix=mix, opt=opt, seed=seed, epochs=epochs)
                    if any(all(r.get(k) == v for k, v in key.items()) for r in results): continue
                    r = run(path, 'res2netplus50', mix, opt, seed, args, epochs) | key
                    results.append(r); out.write_text(json.dumps(results, indent=1))
                    print(f"  {epochs:3d} epochs mix={mix:6s} {opt:16s} seed={seed}: {100*r['accuracy']:.1f} %, "
                          f"{r['images_per_cpu_second']:.0f} img/CPU-s", flush=True)
    groups = {}
    for r in results: groups.setdefault((r['epochs'], r['mix'], r['opt']), []).append(r)
    print('| epochs | mix | optimizer | accuracy (mean ± sd) | valid loss | seeds | CPU s / 2 (≈ idle wall) |')
    print('|---:|---|---|---|---|---:|---:|')
    for (epochs, mix, opt), rs in sorted(groups.items()):
        acc, loss = [100*r['accuracy'] for r in rs], [r['valid_loss'] for r in rs]
        print(f"| {epochs} | {mix} | {opt} | {mean_sd(acc, digits=1)} % | {statistics.mean(loss):.3f} | "
              f"{len(rs)} | {statistics.mean(r['cpu_seconds'] for r in rs)/2:.0f} |")

if __name__ == '__main__': main()
