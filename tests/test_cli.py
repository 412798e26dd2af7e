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
    assert 'valid accuracy' in r.stdout and 'train_loss' in r.stdout  # fastai's per-epoch table
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json'):
        assert (out/f).is_file(), f
    for f in ('loss.png', 'confusion_matrix.png', 'top_losses.png'):
        assert Image.open(out/f).size[0] > 100, f
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['classes'] == ['disc', 'square'] and 0 <= metrics['accuracy'] <= 1 and metrics['mix'] == 'cutmix'
    assert len((out/'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs
    img = next((image_folder/'valid'/'disc').iterdir())
    from fastai.learner import load_learner
    learn = load_learner(out/'export.pkl')
    assert [type(cb).__name__ for cb in learn.cbs if type(cb).__name__ in ('CutMix', 'MixUp', 'MixUpCutMix')] == ['CutMix']
    probs = learn.predict(img)[2]
    r = cli('predict', '--model', str(out/'export.pkl'), '-k', '1', str(img))
    assert r.returncode == 0, r.stderr[-3000:]
    top = json.loads(r.stdout)[0]['top']
    assert len(top) == 1 and top[0]['label'] == learn.dls.vocab[int(probs.argmax())] and abs(top[0]['prob'] - float(probs.max())) < 1e-4
    # an earlier run's model.safetensors continues training; another --arch is refused with the fix named
    r = cli('train', '--data', str(image_folder), '--size', '32', '--bs', '8', '--epochs', '1', '--weights', str(out/'model.safetensors'),
            '--out', str(tmp_path/'again'), '--workers', '0', '--mix', 'none')
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path/'again'/'metrics.json').read_text())
    assert again['frozen_epochs'] == 0 and again['valid_loss'] < metrics['valid_loss'] + 0.5
    r = cli('train', '--data', str(image_folder), '--arch', 'res2net50d', '--weights', str(out/'model.safetensors'), '--out', str(tmp_path/'x'))
    assert r.returncode == 2 and 'another architecture' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    (tmp_path/'bad.png').write_text('not an image')
    r = cli('predict', '--model', str(out/'export.pkl'), str(tmp_path/'bad.png'))
    assert r.returncode == 2 and 'Cannot read image' in r.stderr and 'Traceback' not in r.stderr

def test_class_missing_from_valid(image_folder, tmp_path):
    import shutil
    data = tmp_path/'data'; shutil.copytree(image_folder, data); shutil.rmtree(data/'valid'/'square')
    r = cli('train', '--data', str(data), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'Classes missing from valid/: square' in r.stderr and 'Traceback' not in r.stderr

def test_train_from_csv_with_lr_find(image_folder, tmp_path):
    "A CSV of file names and labels with an is_valid column; --lr 0 runs lr_find; --mix none"
    rows = ['fname,label,is_valid'] + [f'{p.relative_to(image_folder)},{p.parent.name},{p.parts[-3] == "valid"}'
                                       for p in sorted(image_folder.rglob('*.png'))]
    (image_folder/'labels.csv').write_text('\n'.join(rows))
    out = tmp_path/'run'
    r = cli('train', '--data', str(image_folder/'labels.csv'), '--size', '32', '--bs', '8', '--epochs', '1', '--lr', '0',
            '--mix', 'none', '--out', str(out), '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    found = float(r.stdout.split('lr_find:')[1].split()[0])
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['classes'] == ['disc', 'square'] and metrics['mix'] == 'none' and metrics['lr'] == pytest.approx(found, rel=0.01)

@pytest.mark.parametrize('problem,message', [('unreadable', 'unreadable image(s)'), ('csv_missing_file', 'do not exist'),
                                             ('bad_mix', 'Unknown mix'), ('empty', 'has no class folders')])
def test_bad_data_ends_with_a_message(image_folder, tmp_path, problem, message):
    import shutil
    data = tmp_path/'data'; shutil.copytree(image_folder, data)
    args = ['--data', str(data)]
    if problem == 'unreadable': (data/'train'/'disc'/'x.jpg').write_bytes(b'\xff\xd8 truncated')
    if problem == 'csv_missing_file':
        (data/'l.csv').write_text('fname,label\ntrain/disc/0.png,disc\nnope.png,disc\n'); args = ['--data', str(data/'l.csv')]
    if problem == 'bad_mix': args += ['--mix', 'cutout']
    if problem == 'empty': shutil.rmtree(data/'valid'); (data/'valid').mkdir()
    r = cli('train', *args, '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
