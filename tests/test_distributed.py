"Data-parallel training in 2 CPU processes (gloo): each task ends with identical weights on both ranks; rank 0 writes"
import json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch

WORKER = Path(__file__).parent/'distributed_worker.py'

def torchrun(*args, timeout=900):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    # a rank left waiting in a collective would hang: the timeout fails it
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    r = subprocess.run([*launch, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r

def run_task(task, data, out):
    torchrun(WORKER, task, data, out)
    return [torch.load(out/f'rank{r}.pt', weights_only=False) for r in (0, 1)]

def assert_same_model(r0, r1):
    assert r0['state'].keys() == r1['state'].keys()
    for k, v in r0['state'].items(): assert torch.equal(v, r1['state'][k]), k  # parameters and BatchNorm statistics

def assert_split_work(r0, r1, bs):
    "Each rank trained on its own half of every epoch"
    assert len(r0['batches']) == len(r1['batches']) > 0
    assert [b for _, b in r0['batches']] == [b for _, b in r1['batches']] and all(b == bs for _, b in r0['batches'])
    assert [f for f, _ in r0['batches']] != [f for f, _ in r1['batches']]
    per_epoch = r0['n_train'] // 2 // bs  # fastai drops the last partial training batch
    assert len(r0['batches']) % per_epoch == 0

def assert_only_rank0_wrote(out, expected):
    assert {p.name for p in (out/'run0').iterdir()} >= set(expected)
    assert not (out/'run1').exists() or not any((out/'run1').rglob('*'))
    lines = (out/'run0'/'history.csv').read_text().splitlines()
    assert sum(l.startswith('epoch') for l in lines) == 1  # one header: rank 1 did not log

def test_classification(image_folder, tmp_path):
    r0, r1 = run_task('classify', image_folder, tmp_path)
    assert_same_model(r0, r1)
    assert_split_work(r0, r1, bs=4)
    assert len(r0['batches']) == 2 * (24 // 2 // 4)  # 2 epochs of 3 batches per rank (24 training images, batches of 4)
    # metrics gathered over both shares
    assert r0['values'] == r1['values'] and all(math.isfinite(v) for v in r0['values'][-1])
    assert_only_rank0_wrote(tmp_path, ['checkpoint.pth', 'best.safetensors', 'history.csv'])
    ckpt = torch.load(tmp_path/'run0'/'checkpoint.pth', weights_only=True)
    assert not any(k.startswith('module.') for k in ckpt['model'])  # the bare model's keys, loadable without DDP
    for k, v in ckpt['model'].items(): assert torch.equal(v, r0['state'][k]), k

def test_nan_on_one_rank_stops_both(image_folder, tmp_path):
    r0, r1 = run_task('nan', image_folder, tmp_path)
    assert r0['nan_at'] == r1['nan_at'] == (0, 1)
    assert len(r0['batches']) == len(r1['batches']) == 1  # the first batch; the second stopped both before its end

def test_segmentation(tmp_path):
    r0, r1 = run_task('segment', tmp_path, tmp_path)
    assert_same_model(r0, r1)
    assert_split_work(r0, r1, bs=3)
    assert r0['values'] == r1['values']
    assert r0['n_valid'] == 3  # odd: fastai's DistributedDL pads rank 1's share with a repeat of the first image
    assert r0['last_epoch'][-2:] == pytest.approx(r0['alone'][-2:], abs=1e-9)  # Dice and IoU count every image once
    assert_only_rank0_wrote(tmp_path, ['checkpoint.pth', 'best.safetensors', 'history.csv'])

def test_detection(tmp_path):
    r0, r1 = run_task('detect', tmp_path, tmp_path)
    assert_same_model(r0, r1)
    assert_split_work(r0, r1, bs=2)
    assert r0['values'] == r1['values']  # COCO AP and loss parts over both shares of the validation set
    assert_only_rank0_wrote(tmp_path, ['best.safetensors', 'history.csv'])

def test_htc(tmp_path):
    "HTC's three box and three mask heads data-parallel: the same weights and COCO figures on both ranks"
    r0, r1 = run_task('htc', tmp_path, tmp_path)
    assert_same_model(r0, r1)
    assert any(k.startswith('roi_heads.mask_heads.2.') for k in r0['state'])  # the last stage's mask head is there
    assert_split_work(r0, r1, bs=2)
    assert r0['values'] == r1['values'] and all(math.isfinite(v) for v in r0['values'][-1][:1])  # the loss
    assert_only_rank0_wrote(tmp_path, ['best.safetensors', 'history.csv'])

def test_command_line_distributed(image_folder, tmp_path):
    out = tmp_path/'run'
    args = ['train', '--distributed', '2', '--data', str(image_folder), '--epochs', '1', '--size', '64', '--bs', '4',
            '--mix', 'none', '--out', str(out), '--keep_checkpoint']
    r = subprocess.run([sys.executable, '-m', 'res2netplus.cli', *args], capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert r.stdout.count('valid accuracy') == 1  # rank 0 reports
    res = json.loads((out/'metrics.json').read_text())
    assert 0 <= res['accuracy'] <= 1
    written = {p.name for p in out.iterdir()}
    assert {'export.pkl', 'model.safetensors', 'config.json', 'checkpoint.pth', 'best.safetensors'} <= written
    assert torch.load(out/'checkpoint.pth', weights_only=True)['world_size'] == 2
    assert (out/'metrics.csv').read_text().count('epoch,') == 1

def test_resume_relaunches_with_the_interrupted_runs_process_count(tmp_path, monkeypatch, capsys):
    """--resume reads the process count from checkpoint.pth; --distributed must be a count; under a launcher nothing
    relaunches"""
    import res2netplus.cli as cli
    launched = []
    monkeypatch.setattr(cli, 'launch', lambda n, argv: launched.append((n, argv)) or 0)
    out = tmp_path/'run'; out.mkdir()
    torch.save(dict(world_size=2, epoch=0, phase=0, args={}), out/'checkpoint.pth')
    assert cli.main(['train', '--resume', '--out', str(out)]) == 0
    assert launched == [(2, ['train', '--resume', '--out', str(out)])]
    assert cli.main(['train', '--distributed', '3', '--epochs', '1']) == 0 and launched[-1][0] == 3
    argv = ['train', '--distributed', '3', '--epochs', '1', '--distributed=2']
    assert cli._without_distributed(argv) == ['train', '--epochs', '1']
    assert cli.main(['train', '--distributed', '0']) == 2 and 'number of processes' in capsys.readouterr().err
    import functools
    @functools.wraps(cli.train)  # the parser reads train's signature
    def train_here(**kw): raise ValueError('trained in this process')
    monkeypatch.setattr(cli, 'train', train_here)
    monkeypatch.setenv('WORLD_SIZE', '2')  # already under a launcher: this process trains, nothing relaunches
    assert cli.main(['train', '--distributed', '2']) == 2 and len(launched) == 2
    assert 'trained in this process' in capsys.readouterr().err
