"""Faster R-CNN, Mask R-CNN, Cascade R-CNN, Cascade Mask R-CNN and HTC on real annotated images, same start, same steps.

    python benchmarks/detection_real.py                      # the five detectors, then the table
    python benchmarks/detection_real.py --epochs 2 --detectors faster   # one detector's speed first
    python benchmarks/detection_real.py --table              # the table of benchmarks/results/detection_real.json

Data: the stardist nuclei of `real_data.py` (one 512×512 fluorescence image of the 2018 Kaggle Data Science Bowl,
BBBC038, with 125 labelled nuclei; fetched from PyPI's stardist 0.9.2 wheel when missing, sha256-checked). Rows 0–383
are cut into 35 training tiles of 128 px (stride 64), rows 384–511 into 4 held-out tiles; each nucleus of a tile is one
instance (its box and mask from the label image). The tiles are written as a COCO folder (PNG + RLE) and read with
`coco_dataloaders`, so the run goes through the package's own data, learner and pycocotools evaluation.

Every detector: res2netplus50-FPN from the same random init (one backbone state dict, loaded into each), the same
seed, DataLoaders (bs 4, the default augmentation), image size, RPN/RoI sample sizes, SGD lr and `fit_one_cycle`
schedule (its first quarter a warm-up from lr/25), and the same number of optimizer steps. The lr is the package's
default, `detection_lr(bs)`: mmdetection's 0.02 for 16 images scaled linearly, 0.005 for 4 (at 0.02, 4× that, Mask
R-CNN and Cascade Mask R-CNN diverged within 16 steps). Box and mask AP are pycocotools' on the 4 held-out tiles.
One thread (`torch.set_num_threads(1)`). Results are appended to benchmarks/results/detection_real.json one detector
(and seed) at a time.
"""
import argparse, json, sys, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
sys.path.insert(0, str(Path(__file__).parent))
import numpy as np, torch
from PIL import Image
from fastai.vision.all import set_seed, Callback, CancelValidException
from res2netplus.detection import coco_dataloaders, res2netplus_det_learner, evaluate_detector
from res2netplus.detection.train import detection_lr
from real_data import nuclei_instances, data_dir

RESULTS = Path(__file__).parent/'results'/'detection_real.json'
DETECTORS = {  # name: (task, detector)
    'faster': ('detect', 'rcnn'), 'mask': ('instance', 'rcnn'), 'cascade': ('detect', 'cascade'),
    'cascade_mask': ('instance', 'cascade'), 'htc': ('instance', 'htc')}
NAMES = {'faster': 'Faster R-CNN', 'mask': 'Mask R-CNN', 'cascade': 'Cascade R-CNN',
         'cascade_mask': 'Cascade Mask R-CNN', 'htc': 'HTC'}

def nuclei_coco(root:Path) -> Path:
    "The nuclei tiles as a COCO folder: {train,valid}/images/*.png and {train,valid}.json (RLE masks)"
    from pycocotools import mask as mask_utils
    if (root/'valid.json').exists(): return root
    for split, recs in nuclei_instances().items():
        (root/split/'images').mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for r in recs:
            name = f"{r['image_id']:03d}.png"
            Image.fromarray(np.repeat((r['image'] * 255).clip(0, 255).astype(np.uint8)[..., None], 3, -1)).save(
                root/split/'images'/name)
            images.append(dict(id=r['image_id'], file_name=name, height=r['height'], width=r['width']))
            for a in r['annotations']:
                rle = mask_utils.encode(np.asfortranarray(a['mask'].astype(np.uint8)))
                anns.append(dict(id=len(anns) + 1, image_id=r['image_id'], category_id=1, iscrowd=0, area=a['area'],
                                 bbox=a['bbox'], segmentation=dict(size=rle['size'], counts=rle['counts'].decode())))
        coco = dict(images=images, annotations=anns, categories=[dict(id=1, name='nucleus')])
        (root/f'{split}.json').write_text(json.dumps(coco))
    return root

def dataloaders(root:Path, masks:bool, bs:int, seed:int):
    set_seed(seed)
    return coco_dataloaders(root/'train'/'images', root/'train.json', root/'valid'/'images', root/'valid.json',
                            masks=masks, bs=bs, seed=seed)

class SkipValidation(Callback):
    "No validation pass during the fit: the held-out tiles are evaluated once, at the end"
    def before_validate(self): raise CancelValidException()

def run(name:str, root:Path, args, backbone_state:dict|None) -> tuple:
    task, detector = DETECTORS[name]
    dls = dataloaders(root, task == 'instance', args.bs, args.seed)
    set_seed(args.seed)
    learn = res2netplus_det_learner(dls, 'res2netplus50', task=task, detector=detector, min_size=args.size,
                                    max_size=args.size, rpn_post_nms_top_n_train=args.proposals,
                                    rpn_post_nms_top_n_test=args.proposals, box_batch_size_per_image=args.rois)
    body, init = learn.model.backbone.body, data_dir()/f'res2netplus50_init_seed{args.seed}.pt'
    if backbone_state is None and init.exists(): backbone_state = torch.load(init)
    if backbone_state is None:  # the first detector's random backbone, kept so later runs start from it too
        backbone_state = {k: v.clone() for k, v in body.state_dict().items()}
        torch.save(backbone_state, init)
    body.load_state_dict(backbone_state)
    set_seed(args.seed)
    steps = args.epochs * len(dls.train)
    start = time.perf_counter()
    learn.fit_one_cycle(args.epochs, args.lr, cbs=SkipValidation())
    wall = time.perf_counter() - start
    stats = evaluate_detector(learn, dls)
    box, segm = stats['bbox'], stats.get('segm')
    row = dict(detector=NAMES[name], key=name, steps=steps, epochs=args.epochs, wall_s=round(wall, 1),
               box_AP=box['AP'], box_AP50=box['AP50'], mask_AP=segm['AP'] if segm else None,
               mask_AP50=segm['AP50'] if segm else None, seed=args.seed, size=args.size, bs=args.bs, lr=args.lr,
               train_loss=float(learn.recorder.losses[-1]), threads=torch.get_num_threads())
    return row, backbone_state

def fmt(v): return '–' if v is None or v != v else f'{100 * v:.1f}'

def mean(values:list):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None

def table(rows:list) -> str:
    "One line per detector: AP in % of each seed (seed 0 / seed 1 / …) and their mean; wall s is the mean"
    order = [k for k in DETECTORS if any(r['key'] == k for r in rows)]
    lines = ['| detector | steps | seeds | wall s | box AP | box AP50 | mask AP | mask AP50 |',
             '|---|---|---|---|---|---|---|---|']
    for key in order:
        rs = sorted((r for r in rows if r['key'] == key), key=lambda r: r['seed'])
        def cell(name):
            if len(rs) == 1 or all(r[name] is None for r in rs): return fmt(rs[0][name])
            return ' / '.join(fmt(r[name]) for r in rs) + f" (mean {fmt(mean([r[name] for r in rs]))})"
        lines.append(f"| {rs[0]['detector']} | {rs[0]['steps']} | {len(rs)} | {mean([r['wall_s'] for r in rs]):.0f} | "
                     f"{cell('box_AP')} | {cell('box_AP50')} | {cell('mask_AP')} | {cell('mask_AP50')} |")
    return '\n'.join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--detectors', nargs='+', default=list(DETECTORS), choices=list(DETECTORS))
    p.add_argument('--epochs', type=int, default=2, help='epochs of 8 steps (35 tiles, bs 4, last batch dropped)')
    p.add_argument('--lr', type=float, default=None, help="default: the package's detection_lr(bs)")
    p.add_argument('--bs', type=int, default=4)
    p.add_argument('--size', type=int, default=128, help='image size the detector resizes to (the tiles are 128 px)')
    p.add_argument('--proposals', type=int, default=300, help='RPN proposals kept per image, training and test')
    p.add_argument('--rois', type=int, default=128, help='RoIs sampled per image for each box head')
    p.add_argument('--seeds', type=int, nargs='+', default=[0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--out', type=Path, default=RESULTS)
    p.add_argument('--table', action='store_true', help='print the table of --out and stop')
    args = p.parse_args()
    if args.lr is None: args.lr = detection_lr(args.bs)
    torch.set_num_threads(args.threads)
    if args.table:
        print(table(json.loads(args.out.read_text())['runs'])); return
    root = nuclei_coco(data_dir()/'nuclei_coco')
    results = json.loads(args.out.read_text()) if args.out.exists() else dict(runs=[])
    results.update(data='stardist 0.9.2 img2d/mask2d (Kaggle DSB 2018, BBBC038): 35 train / 4 held-out 128 px tiles',
                   backbone='res2netplus50-FPN, random init (one state dict for every detector)')
    for args.seed in args.seeds:
        state = None
        for name in args.detectors:
            row, state = run(name, root, args, state)
            print(json.dumps(row), flush=True)
            results['runs'] = [r for r in results['runs'] if (r['key'], r['seed']) != (name, args.seed)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    print(table(results['runs']))

if __name__ == '__main__':
    main()
