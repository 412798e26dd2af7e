"The command line end to end, on a tiny folder tree"
import json, subprocess, sys
import pytest
from PIL import Image

def cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-c', 'import sys; from res2netplus.cli import main; sys.exit(main())', *args],
                          capture_output=True, text=True, cwd=cwd, timeout=900)

def test_train_then_predict(image_folder, tmp_path):
    out = tmp_path/'run'
    r = cli('train', '--data', str(image_folder), '--size', '32', '--bs', '8', '--epochs', '2', '--out', str(out), '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'valid accuracy' in r.stdout
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json'):
        assert (out/f).is_file(), f
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['classes'] == ['disc', 'square'] and 0 <= metrics['accuracy'] <= 1
    assert len((out/'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs
    img = next((image_folder/'valid'/'disc').iterdir())
    r = cli('predict', '--model', str(out/'export.pkl'), '-k', '2', str(img))
    assert r.returncode == 0, r.stderr[-3000:]
    pred = json.loads(r.stdout)
    assert [t['label'] for t in pred[0]['top']] and abs(sum(t['prob'] for t in pred[0]['top']) - 1) < 1e-3
    (tmp_path/'bad.png').write_text('not an image')
    r = cli('predict', '--model', str(out/'export.pkl'), str(tmp_path/'bad.png'))
    assert r.returncode == 2 and 'Cannot read image' in r.stderr and 'Traceback' not in r.stderr

def test_class_missing_from_valid(image_folder, tmp_path):
    import shutil
    data = tmp_path/'data'; shutil.copytree(image_folder, data); shutil.rmtree(data/'valid'/'square')
    r = cli('train', '--data', str(data), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'Classes missing from valid/: square' in r.stderr and 'Traceback' not in r.stderr
