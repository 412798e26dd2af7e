"""Rebuild `res2netplus/data/fashion_mnist_11000.npz`, the Fashion-MNIST images the package ships.

    python scripts/make_bundled_data.py     # needs the Debian package dataset-fashion-mnist

The file holds 1,000 training images per class (from Fashion-MNIST's training set) and 100 validation images per
class (from its test set), 28×28 grey, with their labels and the class names. Its first 200 training and 50
validation images per class are the 2,500 images that earlier versions shipped (`fashion_mnist_2500.npz`), in the
same order, so `fashion_mnist_sample()` (2,000 + 500) still writes exactly those files; the rest are drawn at random
(seed 0) from the images not already taken. It reads those 2,500 from the current bundle (or from the old file when
that is all there is), so a rebuild gives the same file. Fashion-MNIST is © Zalando SE, MIT licence.
"""
import sys
from pathlib import Path
import numpy as np
from res2netplus.data import FASHION_MNIST_CLASSES, load_fashion_mnist

N_TRAIN, N_VALID, DATA = 1000, 100, Path(__file__).parents[1]/'res2netplus'/'data'

def old_sample() -> dict:
    "The 200 training and 50 validation images per class shipped before, in their order"
    if not (DATA/'fashion_mnist_11000.npz').exists(): return dict(np.load(DATA/'fashion_mnist_2500.npz'))
    data = dict(np.load(DATA/'fashion_mnist_11000.npz'))
    for split, n in (('train', 200), ('valid', 50)):
        first = np.sort(np.concatenate([np.flatnonzero(data[f'{split}_labels'] == c)[:n] for c in range(10)]))
        for key in (f'{split}_images', f'{split}_labels'): data[key] = data[key][first]
    return data

def extend(old_images, old_labels, images, labels, per_class, rng):
    "The old images first, then per class the missing ones drawn from `images` that are not among the old"
    taken = {img.tobytes() for img in old_images}
    fresh = np.array([img.tobytes() not in taken for img in images])
    extra = [rng.permutation(np.flatnonzero((labels == c) & fresh))[:per_class - (old_labels == c).sum()]
             for c in range(10)]
    extra = rng.permutation(np.concatenate(extra))
    return np.concatenate([old_images, images[extra]]), np.concatenate([old_labels, labels[extra]])

def main(dest=DATA/'fashion_mnist_11000.npz'):
    old, full, rng = old_sample(), load_fashion_mnist(), np.random.default_rng(0)
    train = extend(old['train_images'], old['train_labels'], full['train'], full['train_labels'], N_TRAIN, rng)
    valid = extend(old['valid_images'], old['valid_labels'], full['test'], full['test_labels'], N_VALID, rng)
    np.savez_compressed(dest, train_images=train[0], train_labels=train[1], valid_images=valid[0],
                        valid_labels=valid[1], classes=np.array(FASHION_MNIST_CLASSES))
    print(f"{dest}: {len(train[0])} training and {len(valid[0])} validation images, {dest.stat().st_size/1e6:.1f} MB")

if __name__ == '__main__': sys.exit(main())
