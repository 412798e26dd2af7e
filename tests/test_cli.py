"The command line end to end, on a tiny folder tree"
import json, os, subprocess, sys
from pathlib import Path
import pytest
from PIL import Image

def cli(*args, cwd=None):
    code = 'import sys; from res2netplus.cli import main; sys.exit(main())'
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, cwd=cwd, timeout=900)

def test_train_then_predict(image_folder, tmp_path):
    out = tmp_path/'run'
    r = cli('train', '--data', str(image_folder), '--size', '32', '--bs', '8', '--epochs', '2', '--out', str(out),
            '--workers', '0', '--mix', 'cutmix')  # forced: 2 epochs alone would train without mixing
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'valid accuracy' in r.stdout and 'train_loss' in r.stdout  # fastai's per-epoch table
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json'):
        assert (out/f).is_file(), f
    for f in ('checkpoint.pth', 'checkpoint.pth.part', 'best.safetensors'):  # a finished run keeps the model only
        assert not (out/f).exists(), f
    for f in ('loss.png', 'confusion_matrix.png', 'top_losses.png'):
        assert Image.open(out/f).size[0] > 100, f
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['classes'] == ['disc', 'square'] and 0 <= metrics['accuracy'] <= 1 and metrics['mix'] == 'cutmix'
    assert (metrics['opt'], metrics['schedule']) == ('Adam', 'fit_one_cycle')  # 2 epochs: too short for ranger
    assert len((out/'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs
    img = next((image_folder/'valid'/'disc').iterdir())
    from fastai.learner import load_learner
    learn = load_learner(out/'export.pkl')
    mixers = [type(cb).__name__ for cb in learn.cbs if type(cb).__name__ in ('CutMix', 'MixUp', 'MixUpCutMix')]
    assert mixers == ['CutMix']
    probs = learn.predict(img)[2]
    r = cli('predict', '--model', str(out/'export.pkl'), '-k', '1', str(img))
    assert r.returncode == 0, r.stderr[-3000:]
    top = json.loads(r.stdout)[0]['top']
    assert len(top) == 1 and top[0]['label'] == learn.dls.vocab[int(probs.argmax())]
    assert abs(top[0]['prob'] - float(probs.max())) < 1e-4
    # the same from model.safetensors + config.json, without unpickling anything
    cfg = json.loads((out/'config.json').read_text())
    assert cfg['arch'] == 'res2netplus50' and cfg['classes'] == ['disc', 'square'] and cfg['size'] == [32, 32]
    r = cli('predict', '--model', str(out/'model.safetensors'), '-k', '2', str(img))
    assert r.returncode == 0, r.stderr[-3000:]
    safe = {t['label']: t['prob'] for t in json.loads(r.stdout)[0]['top']}
    assert all(abs(safe[c] - float(p)) < 1e-4 for c, p in zip(learn.dls.vocab, probs)), (safe, probs)
    (tmp_path/'lonely').mkdir()
    (tmp_path/'lonely'/'model.safetensors').write_bytes((out/'model.safetensors').read_bytes())
    r = cli('predict', '--model', str(tmp_path/'lonely'/'model.safetensors'), str(img))
    assert r.returncode == 2 and 'No config.json' in r.stderr and 'Traceback' not in r.stderr
    # an earlier run's model.safetensors continues training; another --arch is refused with the fix named
    r = cli('train', '--data', str(image_folder), '--size', '32', '--bs', '8', '--epochs', '1',
            '--weights', str(out/'model.safetensors'), '--out', str(tmp_path/'again'), '--workers', '0',
            '--mix', 'none')
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path/'again'/'metrics.json').read_text())
    assert again['frozen_epochs'] == 0 and again['valid_loss'] < metrics['valid_loss'] + 0.5
    r = cli('train', '--data', str(image_folder), '--bs', '8', '--arch', 'res2net50d', '--weights',
            str(out/'model.safetensors'), '--out', str(tmp_path/'x'))
    assert r.returncode == 2 and 'another architecture' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    (tmp_path/'bad.png').write_text('not an image')
    r = cli('predict', '--model', str(out/'export.pkl'), str(tmp_path/'bad.png'))
    assert r.returncode == 2 and 'Cannot read image' in r.stderr and 'Traceback' not in r.stderr
    r = cli('predict', '--model', str(out/'export.pkl'), '-k', '0', str(img))
    assert r.returncode == 2 and '-k 0' in r.stderr and 'Traceback' not in r.stderr

def test_class_missing_from_valid(image_folder, tmp_path):
    import shutil
    data = tmp_path/'data'; shutil.copytree(image_folder, data); shutil.rmtree(data/'valid'/'square')
    r = cli('train', '--data', str(data), '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and 'Classes missing from valid/: square' in r.stderr and 'Traceback' not in r.stderr

def test_train_from_csv_with_lr_find(image_folder, tmp_path):
    "A CSV of file names and labels with an is_valid column; --lr 0 runs lr_find; --mix auto: none for 1 epoch"
    rows = ['fname,label,is_valid'] + [f'{p.relative_to(image_folder)},{p.parent.name},{p.parts[-3] == "valid"}'
                                       for p in sorted(image_folder.rglob('*.png'))]
    (image_folder/'labels.csv').write_text('\n'.join(rows))
    out = tmp_path/'run'
    r = cli('train', '--data', str(image_folder/'labels.csv'), '--size', '32', '--bs', '8', '--epochs', '1',
            '--lr', '0', '--out', str(out), '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    found = float(r.stdout.split('lr_find:')[1].split()[0])
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['classes'] == ['disc', 'square'] and metrics['mix'] == 'none'
    assert metrics['lr'] == pytest.approx(found, rel=0.01)
    from fastai.learner import load_learner
    learn = load_learner(out/'export.pkl')
    assert not [cb for cb in learn.cbs if type(cb).__name__ in ('CutMix', 'MixUp', 'MixUpCutMix')]

def test_the_main_job_settings(monkeypatch, tmp_path):
    "`res2netplus train` alone: all bundled data at 32 px, 3 epochs, the recipe fitted to them (trained in the README)"
    import res2netplus.cli
    seen = {}
    def run_task(task, settings, checkpoint=None, args=None):
        seen.update(settings, task=task.name)
        return dict(task='classify', accuracy=0.9, valid_loss=0.5, epochs=settings['epochs'], train_seconds=1.)
    monkeypatch.setattr(res2netplus.cli, 'run_task', run_task)
    assert res2netplus.cli.main(['train', '--out', str(tmp_path/'run')]) == 0
    assert (seen['task'], seen['data'], seen['size'], seen['bs'], seen['epochs']) == ('classify', None, 32, 64, 3)
    assert (seen['mix'], seen['lr'], seen['keep_checkpoint']) == ('auto', None, False)
    from fastai.vision.all import Adam
    from res2netplus.learner import budget_recipe
    from res2netplus.data import BUNDLED_FASHION_MNIST
    plan = budget_recipe(3, BUNDLED_FASHION_MNIST['n_train']//64)
    assert (plan['mix'], plan['opt_func'], plan['schedule'], plan['augment']) == (None, Adam, 'fit_one_cycle', 'flip')

@pytest.mark.parametrize('problem,message', [('unreadable', 'unreadable or damaged image(s)'),
                                             ('csv_missing_file', 'do not exist'), ('bad_mix', 'Unknown mix'),
                                             ('empty', 'has no class folders')])
def test_bad_data_ends_with_a_message(image_folder, tmp_path, problem, message):
    import shutil
    data = tmp_path/'data'; shutil.copytree(image_folder, data)
    args = ['--data', str(data)]
    if problem == 'unreadable': (data/'train'/'disc'/'x.jpg').write_bytes(b'\xff\xd8 truncated')
    if problem == 'csv_missing_file':
        (data/'l.csv').write_text('fname,label\ntrain/disc/0.png,disc\nnope.png,disc\n')
        args = ['--data', str(data/'l.csv')]
    if problem == 'bad_mix': args += ['--mix', 'cutout']
    if problem == 'empty': shutil.rmtree(data/'valid'); (data/'valid').mkdir()
    r = cli('train', *args, '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

@pytest.fixture(scope='module')
def shapes_folder(tmp_path_factory):
    "A generated segmentation set: 16 images of 40×48 px (odd, not square)"
    from res2netplus.data import make_shapes
    return make_shapes(tmp_path_factory.mktemp('shapes'), n_images=16, size=(40, 48), seed=1)

def test_segment_train_then_predict(shapes_folder, tmp_path):
    import numpy as np
    from res2netplus.data import SHAPES_CODES
    out = tmp_path/'run'
    r = cli('train', '--task', 'segment', '--head', 'fpn', '--data', str(shapes_folder), '--size', '32', '--bs', '4',
            '--epochs', '2', '--out', str(out), '--workers', '0')  # fpn: a tenth of the U-Net's parameters, CPU-fast
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'valid dice' in r.stdout and 'mean IoU' in r.stdout and 'train_loss' in r.stdout
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json'):
        assert (out/f).is_file(), f
    for f in ('loss.png', 'predictions.png'):
        assert Image.open(out/f).size[0] > 100, f
    width, height = Image.open(out/'predictions.png').size
    assert height > width  # 3 validation images, one a row
    metrics = json.loads((out/'metrics.json').read_text())
    assert metrics['task'] == 'segment' and metrics['codes'] == SHAPES_CODES
    assert metrics['head'] == 'fpn' and metrics['output_stride'] == 32
    assert 0 <= metrics['dice'] <= 1 and 0 <= metrics['mean_iou'] <= 1 and metrics['valid_loss'] > 0
    assert len((out/'metrics.csv').read_text().strip().splitlines()) == 3  # header + 2 epochs
    # predict: a mask per image at the image's own size; at the model's size, the ids learn.predict gives
    square = tmp_path/'square.png'; Image.open(shapes_folder/'images'/'0001.png').crop((0, 0, 32, 32)).save(square)
    odd = shapes_folder/'images'/'0002.png'
    r = cli('predict', '--model', str(out/'export.pkl'), '--out', str(tmp_path/'masks'), str(square), str(odd))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert [Path(o['mask']) for o in res] == [tmp_path/'masks'/'square_mask.png', tmp_path/'masks'/'0002_mask.png']
    assert list(res[0]['fractions']) == SHAPES_CODES and abs(sum(res[1]['fractions'].values()) - 1) < 1e-3
    masks = [Image.open(o['mask']) for o in res]
    assert [m.mode for m in masks] == ['L', 'L'] and masks[0].size == (32, 32) and masks[1].size == (48, 40)
    from fastai.learner import load_learner
    learn = load_learner(out/'export.pkl')
    assert (np.asarray(masks[0]) == learn.predict(square)[0].numpy()).all()
    r = cli('predict', '--model', str(out/'model.safetensors'), '--out', str(tmp_path/'safe'), str(square), str(odd))
    assert r.returncode == 0, r.stderr[-3000:]
    twin = tmp_path/'other'/'square.png'  # the same file name, another image
    twin.parent.mkdir(); Image.open(odd).save(twin)
    r2 = cli('predict', '--model', str(out/'export.pkl'), '--out', str(tmp_path/'twins'), str(square), str(twin))
    names = [Path(o['mask']).name for o in json.loads(r2.stdout)]
    assert names == ['square_mask.png', 'square_2_mask.png'], r2.stderr[-2000:]
    assert Image.open(tmp_path/'twins'/'square_2_mask.png').size == (48, 40)  # the twin's own mask, beside the first
    for o in json.loads(r.stdout):  # no pickle, same masks
        pickled = np.asarray(Image.open(tmp_path/'masks'/Path(o['mask']).name))
        assert (np.asarray(Image.open(o['mask'])) == pickled).all()
    # an earlier run's model.safetensors continues training
    r = cli('train', '--task', 'segment', '--head', 'fpn', '--data', str(shapes_folder), '--size', '32', '--bs', '4',
            '--epochs', '1', '--mix', 'none', '--weights', str(out/'model.safetensors'), '--out', str(tmp_path/'again'),
            '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path/'again'/'metrics.json').read_text())['frozen_epochs'] == 0

@pytest.mark.parametrize('problem,message', [('no_mask', '1 of 16 image(s) have no mask'), ('bad_id', '0004.png has 9'),
                                             ('bad_valid', 'are not images in'), ('bad_head', 'Unknown --head')])
def test_segment_bad_data_ends_with_a_message(shapes_folder, tmp_path, problem, message):
    import shutil
    import numpy as np
    data = tmp_path/'data'; shutil.copytree(shapes_folder, data)
    args = ['--data', str(data)]
    if problem == 'no_mask': (data/'masks'/'0003.png').unlink()
    if problem == 'bad_id': Image.fromarray(np.full((40, 48), 9, np.uint8)).save(data/'masks'/'0004.png')
    if problem == 'bad_valid': (data/'valid.txt').write_text('0001\n0099\n')
    if problem == 'bad_head': args += ['--head', 'pspnet']
    r = cli('train', '--task', 'segment', *args, '--out', str(tmp_path/'o'))
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

def test_detect_train_then_predict(tmp_path):
    "--task instance --detector cascade: Cascade Mask R-CNN on generated COCO shapes, its outputs, predict's JSON boxes"
    from res2netplus.detection import make_detection_shapes
    data, out = make_detection_shapes(tmp_path/'shapes', n_images=10, size=96, seed=0), tmp_path/'run'
    r = cli('train', '--task', 'instance', '--detector', 'cascade', '--data', str(data), '--arch', 'res2net50d',
            '--size', '96', '--epochs', '1', '--out', str(out), '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'valid box AP' in r.stdout and 'mask AP' in r.stdout
    for f in ('export.pkl', 'model.safetensors', 'metrics.csv', 'metrics.json', 'loss.png', 'predictions.png'):
        assert (out/f).is_file(), f
    m = json.loads((out/'metrics.json').read_text())
    shapes = ['circle', 'square', 'triangle']
    assert (m['task'], m['detector'], m['classes'], m['bs'], m['size']) == ('instance', 'cascade', shapes, 4, 96)
    assert set(m['box']) == set(m['mask']) == {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}
    assert 'loss_classifier_s3' in (out/'metrics.csv').read_text().splitlines()[0]
    img = sorted((data/'images').iterdir())[0]
    r = cli('predict', '--model', str(out/'export.pkl'), '--thresh', '0', str(img))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)[0]
    assert (res['height'], res['width']) == (96, 96) and res['detections']
    d = res['detections'][0]
    assert d['name'] in m['classes'] and len(d['box']) == 4 and 0 <= d['box'][0] <= d['box'][2] <= 96
    assert 'mask_rle' in d

@pytest.mark.parametrize('args,message', [(['--bs', '40'], 'more than the 24 training images'),
                                          (['--bs', '0'], 'batch size of 1 or more'),
                                          (['--lr', '-1'], 'positive learning rate'),
                                          (['--epochs', '0'], 'pass 1 or more')])
def test_bad_training_settings_end_with_a_message(image_folder, tmp_path, args, message):
    "Settings that would train nothing (a batch larger than the training set) or go uphill: one line, exit status 2"
    r = cli('train', '--data', str(image_folder), '--size', '32', '--out', str(tmp_path/'run'), '--workers', '0', *args)
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

def test_compile_is_refused_where_it_does_not_compile_and_reaches_the_learners(image_folder, shapes_folder, tmp_path,
                                                                               monkeypatch):
    """--compile: one line naming the fix where it cannot work (detectors, fastai's U-Net, the default segmentation
    head); else the learner gets it"""
    for args, message in ((['--task', 'detect'], '--compile is for --task classify and segment'),
                          (['--task', 'segment'], '--head fpn'),
                          (['--task', 'segment', '--head', 'unet'], "Use the 'fpn' or 'deeplabv3plus' head")):
        r = cli('train', *args, '--compile', '--out', str(tmp_path/'refused'))
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
    import res2netplus.tasks
    from res2netplus.cli import train
    class Built(Exception): pass
    def learner(dls, arch, **kw): raise Built(kw)
    monkeypatch.setattr(res2netplus.tasks, 'res2netplus_learner', learner)  # the names the tasks build learners with
    monkeypatch.setattr(res2netplus.tasks, 'res2netplus_seg_learner', learner)
    for flag in (True, False):
        for task, data, head in (('classify', image_folder, 'unet'), ('segment', shapes_folder, 'fpn')):
            with pytest.raises(Built) as built:
                train(data=data, task=task, head=head, size=32, bs=4, out=tmp_path/'run', workers=0, compile=flag)
            assert built.value.args[0]['compile'] is flag, task

def test_the_command_line_prints_no_torch_jit_warning(tmp_path):
    "fastai's import scripts its activations with the deprecated torch.jit.script: its FutureWarning is not the user's"
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONWARNINGS'}  # warnings shown as by default
    for args in (['train', '--epochs', '0'], ['predict', '--model', str(tmp_path/'none.pkl'), 'x.png']):
        r = subprocess.run([sys.executable, '-m', 'res2netplus.cli', *args], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 2 and 'res2netplus: error:' in r.stderr, r.stderr[-2000:]
        assert 'torch.jit.script' not in r.stderr and 'FutureWarning' not in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, '-c', 'import fastai.layers'], capture_output=True, text=True, env=env,
                       timeout=300)
    assert 'torch.jit.script' in r.stderr  # without res2netplus fastai's import still warns: the check above can fail

def test_names_moved_out_of_the_cli_still_import_from_it():
    "The run pipeline, the tasks, the plots and predict left cli.py: their old names there still work"
    import res2netplus.cli as cli, res2netplus.plots, res2netplus.predict, res2netplus.runs, res2netplus.tasks
    assert cli.overlay is res2netplus.plots.overlay and cli.predict is res2netplus.predict.predict
    assert cli.run_config is res2netplus.tasks.run_config and cli.SHAPES is res2netplus.tasks.SHAPES
    assert cli.TrainingDiverged is res2netplus.runs.TrainingDiverged and cli._stem_in is res2netplus.tasks._stem_in
    assert cli.TASKS == ('classify', 'segment', 'detect', 'instance')

@pytest.mark.parametrize('epochs,kinds', [(3, ['HorizontalFlip']), (40, ['RandomResizedCrop', 'HorizontalFlip',
                                                                          'Affine', 'RandomBrightnessContrast'])])
def test_classify_augmentation_follows_the_run_length(image_folder, epochs, kinds):
    "`res2netplus train`'s loaders flip alone in short runs and augment fully from BUDGET['augment_epochs']"
    from types import SimpleNamespace
    from res2netplus.augment import AlbumentationsTransform
    from res2netplus.learner import BUDGET
    from res2netplus.tasks import image_dataloaders
    assert BUDGET['augment_epochs'] == 40
    s = SimpleNamespace(size=32, bs=4, seed=0, workers=0, epochs=epochs)
    dls, _ = image_dataloaders(image_folder, s)
    augs = next(t for t in dls.train.after_item.fs if isinstance(t, AlbumentationsTransform)).augs
    assert [type(t).__name__ for t in augs.transforms] == kinds
    assert dls.one_batch()[0].shape == (4, 3, 32, 32)
