"""Long runs from the command line: per-epoch checkpoints, --resume to the same final weights, the best weights, NaN
stops, damaged checkpoints"""
import json, subprocess, sys
import pytest, torch
from safetensors.torch import load_file
from res2netplus.learner import read_checkpoint

RUN = ['--size', '32', '--bs', '8', '--epochs', '3', '--workers', '0']

def cli_with(patch:str, *args):
    "The command line in a new process, after `patch` (Python) has replaced a piece of res2netplus.learner"
    code = (f"import sys, torch\nimport res2netplus.learner as L\n{patch}\n"
            "from res2netplus.cli import main\nsys.exit(main())")
    return subprocess.run([sys.executable, '-c', code, *args], capture_output=True, text=True, timeout=900)

def cli(*args): return cli_with('', *args)

FAIL_IN_EPOCH_2 = '''
class FailInEpoch2(L.StopOnNaN):
    def before_epoch(self):
        if self.epoch == 2: raise RuntimeError('injected failure')
L.StopOnNaN = FailInEpoch2'''

def epochs_logged(csv) -> list:
    return [int(l.split(',')[0]) for l in csv.read_text().splitlines() if l and not l.startswith('epoch')]

def test_resume_ends_with_the_weights_of_an_uninterrupted_run(image_folder, tmp_path):
    whole, cut = tmp_path/'whole', tmp_path/'cut'
    r = cli('train', '--data', str(image_folder), *RUN, '--out', str(whole), '--keep_checkpoint')
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli_with(FAIL_IN_EPOCH_2, 'train', '--data', str(image_folder), *RUN, '--out', str(cut))
    assert r.returncode != 0 and 'injected failure' in r.stderr
    ckpt = torch.load(cut/'checkpoint.pth', weights_only=True)
    assert (ckpt['phase'], ckpt['epoch']) == (0, 1) and not (cut/'model.safetensors').exists()
    r = cli('train', '--resume', '--out', str(cut), '--workers', '0')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming' in r.stdout
    a, b = load_file(whole/'model.safetensors'), load_file(cut/'model.safetensors')
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= 1e-6, diff
    assert epochs_logged(cut/'metrics.csv') == epochs_logged(whole/'metrics.csv') == [0, 1, 2]
    mw, mc = json.loads((whole/'metrics.json').read_text()), json.loads((cut/'metrics.json').read_text())
    assert mw['valid_loss'] == pytest.approx(mc['valid_loss'], abs=1e-5) and mw['best_epoch'] == mc['best_epoch']
    assert load_file(whole/'best.safetensors').keys() == a.keys()  # kept, as asked
    assert read_checkpoint(whole/'checkpoint.pth')['epoch'] == 2
    assert not (cut/'checkpoint.pth').exists() and not (cut/'best.safetensors').exists()  # finished: the model only

def test_same_seed_same_run_on_cpu(image_folder, tmp_path):
    runs = []
    for name in ('a', 'b'):
        r = cli('train', '--data', str(image_folder), '--size', '32', '--bs', '8', '--epochs', '1', '--workers', '0',
                '--out', str(tmp_path/name))
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(load_file(tmp_path/name/'model.safetensors'))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

NAN_IN_EPOCH_1 = '''
class NaNInEpoch1(L.StopOnNaN):
    def after_batch(self):
        if self.epoch == 1 and self.iter == 1: self.learn.loss = torch.tensor(float('nan'))
        super().after_batch()
L.StopOnNaN = NaNInEpoch1'''

def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(image_folder, tmp_path):
    out = tmp_path/'run'
    r = cli_with(NAN_IN_EPOCH_1, 'train', '--data', str(image_folder), *RUN, '--out', str(out))
    assert r.returncode == 3, r.stderr[-3000:]
    assert 'NaN or infinite at epoch 1, batch 1' in r.stderr and 'checkpoint.pth' in r.stderr
    assert 'Traceback' not in r.stderr
    ckpt = torch.load(out/'checkpoint.pth', weights_only=True)
    assert ckpt['epoch'] == 0 and (out/'best.safetensors').is_file() and not (out/'export.pkl').exists()

@pytest.mark.parametrize('problem,message', [('missing', 'No checkpoint at'), ('truncated', 'is damaged')])
def test_resume_needs_a_whole_checkpoint(tmp_path, problem, message):
    if problem == 'truncated':
        torch.save({'model': {'w': torch.zeros(1000)}}, tmp_path/'checkpoint.pth')
        data = (tmp_path/'checkpoint.pth').read_bytes()
        (tmp_path/'checkpoint.pth').write_bytes(data[:len(data)//2])
    r = cli('train', '--resume', '--out', str(tmp_path))
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

def test_detection_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    "--task detect checkpoints every epoch too, and --resume ends where the uninterrupted run ends"
    from res2netplus.detection import make_detection_shapes
    data = make_detection_shapes(tmp_path/'shapes', n_images=8, size=64, seed=0)
    run = ['--task', 'detect', '--data', str(data), '--size', '64', '--bs', '2', '--epochs', '3', '--workers', '0']
    whole, cut = tmp_path/'whole', tmp_path/'cut'
    r = cli('train', *run, '--out', str(whole))
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli_with(FAIL_IN_EPOCH_2, 'train', *run, '--out', str(cut))
    assert r.returncode != 0 and 'injected failure' in r.stderr
    assert torch.load(cut/'checkpoint.pth', weights_only=True)['epoch'] == 1 and (cut/'best.safetensors').exists()
    r = cli('train', '--resume', '--out', str(cut))
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stderr[-3000:]
    a, b = load_file(whole/'model.safetensors'), load_file(cut/'model.safetensors')
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= 1e-6, diff
    assert epochs_logged(cut/'metrics.csv') == epochs_logged(whole/'metrics.csv') == [0, 1, 2]
    mw, mc = json.loads((whole/'metrics.json').read_text()), json.loads((cut/'metrics.json').read_text())
    assert mw['box'] == mc['box']

# a tiny HTC: one block per stage, narrow heads, few proposals
TINY_HTC = dict(layers=(1, 1, 1, 1), out_channels=32, representation_size=32, mask_channels=16,
                box_batch_size_per_image=32, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=25, box_detections_per_img=10)
HTC_RUN = dict(task='instance', detector='htc', arch='res2net50d', size=32, bs=2, epochs=2, workers=0, **TINY_HTC)

FAIL_IN_EPOCH_1 = FAIL_IN_EPOCH_2.replace('epoch == 2', 'epoch == 1')

def train_htc_with(patch:str, data, out, resume:bool=False):
    "`train_detection` of a tiny HTC in a new process, after `patch`; `resume`: from `out`'s checkpoint"
    code = (f"import sys, torch\nimport res2netplus.learner as L\n{patch}\n"
            "from res2netplus.detection.train import train_detection\n"
            f"ckpt = L.read_checkpoint({str(out/'checkpoint.pth')!r}) if {resume} else None\n"
            f"train_detection({str(data)!r}, out={str(out)!r}, resume_from=ckpt, **{HTC_RUN!r})")
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=900)

def test_htc_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    "HTC (masks at every stage, their information flow) checkpoints every epoch and resumes to the same weights"
    from res2netplus.detection import make_detection_shapes, train_detection
    data = make_detection_shapes(tmp_path/'shapes', n_images=6, size=64, seed=0)
    whole, cut = tmp_path/'whole', tmp_path/'cut'
    mw = train_detection(data, out=whole, **HTC_RUN)  # in this process: one import fewer
    r = train_htc_with(FAIL_IN_EPOCH_1, data, cut)
    assert r.returncode != 0 and 'injected failure' in r.stderr, r.stderr[-3000:]
    assert torch.load(cut/'checkpoint.pth', weights_only=True)['epoch'] == 0
    r = train_htc_with('', data, cut, resume=True)
    assert r.returncode == 0 and 'resuming' in r.stdout, r.stderr[-3000:]
    a, b = load_file(whole/'model.safetensors'), load_file(cut/'model.safetensors')
    assert any('mask_heads.2' in k for k in a)  # the third stage's mask head was trained and saved
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
    assert diff <= 1e-6, diff
    assert epochs_logged(cut/'metrics.csv') == epochs_logged(whole/'metrics.csv') == [0, 1]
    mc = json.loads((cut/'metrics.json').read_text())
    assert mw['detector'] == mc['detector'] == 'htc' and (mw['box'], mw['mask']) == (mc['box'], mc['mask'])
    assert mw['lr'] == mc['lr'] == 0.02 * 2 / 16  # no --lr: mmdetection's 0.02 per 16 images, for batches of 2
