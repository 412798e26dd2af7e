"Classification data: the Fashion-MNIST readers on IDX files the tests write, the cache folders, the image-folder check"
import gzip, json, shutil
import numpy as np, pytest
from PIL import Image
from res2netplus.data import (read_idx, load_fashion_mnist, fashion_mnist_subset, fashion_mnist_sample,
                              check_image_folder, default_cache_dir)

def write_idx(path, array:np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    (gzip.open if str(path).endswith('.gz') else open)(path, 'wb').write(header + array.astype(np.uint8).tobytes())

@pytest.fixture
def idx_root(tmp_path):
    "A Fashion-MNIST layout with 3 training and 2 test images per class"
    root, rng = tmp_path/'fmnist', np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (('train', 3), ('t10k', 2)):
        labels = np.repeat(np.arange(10), n)
        write_idx(root/f'{prefix}-images-idx3-ubyte.gz', rng.integers(0, 256, (len(labels), 28, 28)))
        write_idx(root/f'{prefix}-labels-idx1-ubyte.gz', labels)
    return root

def n_images(tree): return len(list(tree.rglob('*.png')))

def test_subset_is_made_once_per_parameters(idx_root, tmp_path):
    "A finished folder was returned for any n_train, n_valid, seed: stale data, silently"
    out = tmp_path/'subset'
    assert n_images(fashion_mnist_subset(out, n_train=2, n_valid=1, root=idx_root)) == 30
    assert n_images(fashion_mnist_subset(out, n_train=2, n_valid=1, root=idx_root)) == 30
    with pytest.raises(ValueError, match=r"made with \{'n_train': 2, 'n_valid': 1, 'seed': 0\}.*delete it"):
        fashion_mnist_subset(out, n_train=3, n_valid=1, root=idx_root)
    for n_train, n_valid in ((0, 1), (1, 0), (6001, 1), (1, 1001)):
        with pytest.raises(ValueError, match=r'n_train must be in 1…6000 and n_valid in 1…1000'):
            fashion_mnist_subset(tmp_path/'bad', n_train=n_train, n_valid=n_valid, root=idx_root)
    assert not (tmp_path/'bad').exists()

def test_damaged_idx_files_are_named(idx_root):
    "A truncated gzip gave EOFError, a short file a reshape error, mismatched counts an IndexError later"
    images = idx_root/'train-images-idx3-ubyte.gz'
    raw = images.read_bytes()
    images.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=r'train-images-idx3-ubyte.gz is damaged .*install or download it again'):
        load_fashion_mnist(idx_root)
    plain = idx_root/'short-idx3-ubyte'
    write_idx(plain, np.zeros((3, 28, 28)))
    plain.write_bytes(plain.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r'header says \(3, 28, 28\), it holds 2347 bytes'): read_idx(plain)
    write_idx(images, np.zeros((29, 28, 28)))
    with pytest.raises(ValueError, match=r'holds 29 images but .*train-labels-idx1-ubyte.gz 30 labels'):
        load_fashion_mnist(idx_root)

def test_cache_paths_expand_the_home_folder(tmp_path, monkeypatch):
    "RES2NETPLUS_HOME='~/…' wrote a literal '~' folder into the working directory"
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('RES2NETPLUS_HOME', '~/r2')
    monkeypatch.chdir(tmp_path)
    assert default_cache_dir() == tmp_path/'r2'
    assert fashion_mnist_sample('~/sample') == tmp_path/'sample' and n_images(tmp_path/'sample') == 2500
    assert not (tmp_path/'~').exists()

def test_image_folder_check_skips_hidden_files_and_folders(image_folder, tmp_path):
    "As fastai's get_image_files; the check refused .ipynb_checkpoints as an empty class, a macOS ._ file as damaged"
    data = tmp_path/'data'
    shutil.copytree(image_folder, data)
    classes = check_image_folder(data)
    (data/'train'/'.ipynb_checkpoints').mkdir()
    (data/'train'/classes[0]/'._0.png').write_bytes(b'\0\5\x16\7AppleDouble')
    hidden = data/'valid'/classes[0]/'.thumbs'; hidden.mkdir()
    Image.new('RGB', (8, 8)).save(hidden/'t.png')  # fastai would not label this one either
    assert check_image_folder(data) == classes
