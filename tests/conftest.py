import ctypes, gc, os, warnings
import numpy as np
import pytest
import torch
from torch import nn
from PIL import Image

warnings.filterwarnings('ignore', message='.*torch.jit.script.*')

try: _libc = ctypes.CDLL('libc.so.6')
except OSError: _libc = None

@pytest.fixture(autouse=True)
def release_memory():
    """A Learner is a reference cycle (its callbacks point back at it): collect it after each test and hand freed
    pages back, or a file of U-Net tests holds several 339 M-parameter models with their optimiser state at once"""
    yield
    gc.collect()
    if _libc is not None: _libc.malloc_trim(0)

def tiny_plus(pretrained=False, **kwargs):
    "Res2NetPlus with one block per stage and 8-channel splits: torch.compile finishes it in about a minute on a CPU"
    from res2netplus.models import res2netplus50
    return res2netplus50(pretrained, layers=(1, 1, 1, 1), base_width=8, **kwargs)

def randomize_bn(model, seed=0):
    "Give every BatchNorm non-trivial statistics and affine terms, keeping residual branches small"
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            hi = 0.3 if name.endswith('bn3') else 1.5
            m.weight.data = torch.rand(n, generator=g) * (hi - 0.1) + 0.1
            m.bias.data = (torch.rand(n, generator=g) - 0.5) * 0.2
            m.running_mean = (torch.rand(n, generator=g) - 0.5) * 0.4
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model

@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    "A tiny ImageNet-style tree: 2 classes (dark disc / bright square), 12 train and 4 valid images each, 64 px"
    root = tmp_path_factory.mktemp('imgs')
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for split, n in (('train', 12), ('valid', 4)):
        for cls in ('disc', 'square'):
            d = root/split/cls; d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
                cx, cy, r = rng.integers(20, 44, 2).tolist() + [int(rng.integers(8, 14))]
                mask = ((xx-cx)**2 + (yy-cy)**2 < r*r) if cls == 'disc' else ((abs(xx-cx) < r) & (abs(yy-cy) < r))
                img[mask] = [230, 200, 40] if cls == 'disc' else [40, 120, 230]
                Image.fromarray(img).save(d/f'{i}.png')
    return root

@pytest.fixture(scope='session')
def dls(image_folder):
    from fastai.vision.all import ImageDataLoaders
    return ImageDataLoaders.from_folder(image_folder, valid='valid', bs=8, num_workers=0, seed=0)

@pytest.fixture(scope='session')
def seg_dls(tmp_path_factory):
    "A tiny segmentation set: 8 images of 64 px with a bright square, masks of the square, batches of 2"
    from fastai.vision.all import SegmentationDataLoaders, get_image_files
    path = tmp_path_factory.mktemp('seg'); (path/'images').mkdir(); (path/'labels').mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        img = rng.integers(0, 80, (64, 64, 3)).astype(np.uint8); mask = np.zeros((64, 64), np.uint8)
        x0, y0 = rng.integers(0, 40, 2); img[y0:y0+20, x0:x0+20] = 220; mask[y0:y0+20, x0:x0+20] = 1
        Image.fromarray(img).save(path/'images'/f'{i}.png'); Image.fromarray(mask).save(path/'labels'/f'{i}.png')
    return SegmentationDataLoaders.from_label_func(path, get_image_files(path/'images'), lambda o: path/'labels'/o.name,
                                                   codes=['bg', 'fg'], bs=2, num_workers=0, valid_pct=0.25, seed=0)
