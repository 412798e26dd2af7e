"Learners exported by the package before the one-idea-per-file move (4b5561f) load and predict the same today"
import gzip, shutil, warnings
from pathlib import Path
import numpy as np
import pytest
import torch

LEGACY = Path(__file__).parent/'fixtures'/'legacy'
CASES = sorted(p.name.removesuffix('.pkl.gz') for p in LEGACY.glob('*.pkl.gz'))

def test_every_task_has_a_fixture():
    assert CASES == ['classify_cutmix_albu', 'detect_rcnn', 'instance_cascade', 'segment_fpn']

@pytest.mark.parametrize('case', CASES)
def test_legacy_export_loads_and_predicts_the_same(case, tmp_path):
    from fastai.learner import load_learner
    from fastai.vision.core import PILImage
    with gzip.open(LEGACY/f'{case}.pkl.gz', 'rb') as src, open(tmp_path/'export.pkl', 'wb') as dst:
        shutil.copyfileobj(src, dst)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn = load_learner(tmp_path/'export.pkl')
    expected = np.load(LEGACY/f'{case}.npz')
    n_images = sum(k.startswith('image') for k in expected)
    assert n_images >= 2
    for i in range(n_images):
        img = PILImage.create(expected[f'image{i}'])
        if case.startswith(('classify', 'segment')):
            got = learn.predict(img)[2]
            torch.testing.assert_close(got, torch.as_tensor(expected[f'pred{i}']), atol=1e-5, rtol=1e-4)
            continue
        det = learn.predict(img, thresh=0.)
        keys = [k.split('_', 1)[1] for k in expected if k.startswith(f'pred{i}_')]
        assert {'boxes', 'scores', 'labels'} <= set(keys) and len(expected[f'pred{i}_boxes']) > 0
        for k in keys:
            want = expected[f'pred{i}_{k}']
            if want.dtype.kind == 'U': assert list(det[k]) == list(want), k
            elif want.dtype == bool: assert (np.asarray(det[k]) != want).mean() < 1e-3, k
            else: np.testing.assert_allclose(np.asarray(det[k]), want, atol=1e-3, rtol=1e-4, err_msg=k)
