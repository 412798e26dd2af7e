"""Fault injection: a damaged image in the data, a crash while a checkpoint is written, a data loader worker killed
mid-epoch. Each run must stop with a message that names the fix, or skip cleanly, and lose nothing it had already
saved."""
import os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from res2netplus.cli import main
from res2netplus.data import check_image_folder
from res2netplus.learner import read_checkpoint, res2netplus_learner

def damaged_copy(image_folder, tmp_path) -> tuple:
    "A copy of the data whose one training PNG keeps its header but loses the second half of its body"
    data = tmp_path/'data'
    shutil.copytree(image_folder, data)
    victim = data/'train'/'disc'/'3.png'
    raw = victim.read_bytes()
    victim.write_bytes(raw[:len(raw)//2])
    return data, victim

def test_damaged_image_stops_the_run_before_training(image_folder, tmp_path, capsys):
    data, victim = damaged_copy(image_folder, tmp_path)
    assert check_image_folder(data) == ['disc', 'square']  # its header is fine: only decoding finds it
    out = tmp_path/'run'
    assert main(['train', '--data', str(data), '--epochs', '1', '--size', '64', '--bs', '4', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert str(victim) in err and 'Remove or replace' in err and 'Traceback' not in err
    assert not (out/'checkpoint.pth').exists()  # stopped before any training

def test_crash_while_saving_a_checkpoint_keeps_the_last_one(dls, tmp_path, monkeypatch):
    """The second epoch's save dies half-way (disk full): the first epoch's checkpoint is intact and the run resumes
    from it"""
    real_save, calls = torch.save, []
    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b'\x80\x02half a checkpoint')
            raise OSError(28, 'No space left on device')
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', failing_save)
    learn = res2netplus_learner(dls, mix=None, path=tmp_path, model_dir='.')
    with pytest.raises(OSError, match='No space left'): learn.fit_recipe(3, 1e-3, seed=0, checkpoint='checkpoint.pth')
    monkeypatch.setattr(torch, 'save', real_save)
    ckpt = read_checkpoint(tmp_path/'checkpoint.pth')  # the first epoch's, whole
    assert ckpt['epoch'] == 0 and (tmp_path/'checkpoint.pth.part').exists()
    again = res2netplus_learner(dls, mix=None, path=tmp_path, model_dir='.')
    start = again.load_run_checkpoint(ckpt)
    assert start == (0, 1)
    again.fit_recipe(3, 1e-3, seed=0, checkpoint='checkpoint.pth', start=start)
    assert read_checkpoint(tmp_path/'checkpoint.pth')['epoch'] == 2 and len(again.recorder.values) == 2

KILL_WORKERS = textwrap.dedent("""
    import os, signal, sys, psutil
    import res2netplus.learner as learner
    class KillWorkersOnce(learner.StopOnNaN):
        "Fault injection: SIGKILL this process's data loader workers at the second batch of the second epoch"
        def before_batch(self):
            if self.training and self.epoch == 1 and self.iter == 1:
                for p in psutil.Process().children(recursive=True): os.kill(p.pid, signal.SIGKILL)
    learner.StopOnNaN = KillWorkersOnce
    from res2netplus.cli import main
    sys.exit(main(sys.argv[1:]))
""")

def test_killed_data_loader_worker_stops_cleanly_and_resumes(image_folder, tmp_path):
    out = tmp_path/'run'
    args = ['train', '--data', str(image_folder), '--epochs', '2', '--size', '64', '--bs', '4', '--mix', 'none',
            '--workers', '1', '--out', str(out), '--keep_checkpoint']
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run([sys.executable, '-c', KILL_WORKERS, *args], capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-4000:]
    assert 'data loader worker died' in r.stderr and '--resume' in r.stderr and 'Traceback' not in r.stderr
    assert read_checkpoint(out/'checkpoint.pth')['epoch'] == 0 and (out/'best.safetensors').exists()
    r = subprocess.run([sys.executable, '-m', 'res2netplus.cli', 'train', '--resume', '--out', str(out)],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert 'resuming' in r.stdout and read_checkpoint(out/'checkpoint.pth')['epoch'] == 1
    assert (out/'metrics.json').exists()
