"""Resume loses nothing: --resume <output_dir>/checkpoint.pth continues at the next epoch with
model, optimizer, scheduler, EMA and best accuracy restored; log.txt holds every finished epoch exactly once;
checkpoints are written atomically, so a job killed while saving keeps the previous one."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import engine
import finetune
from conftest import DIGITS_ARGS, ROOT, make_image_folder, official_checkpoint, subprocess_env
from utils import UserError, load_checkpoint_file, save_atomic


def log_epochs(path):
    with open(path) as f:
        return [json.loads(line)['epoch'] for line in f if line.strip()]


def log_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def leftovers(directory):
    return [name for name in os.listdir(directory) if '.tmp' in name]


pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------------------------------------
# save_atomic

def test_save_atomic_replaces_the_file(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1, 'w': torch.ones(3)}, str(path))
    save_atomic({'epoch': 2, 'w': torch.zeros(3)}, str(path))
    assert load_checkpoint_file(str(path))['epoch'] == 2
    assert leftovers(tmp_path) == []


def test_failure_while_saving_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1, 'w': torch.ones(1000)}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise RuntimeError('simulated crash in the middle of torch.save')

    monkeypatch.setattr(torch, 'save', half_then_fail)
    with pytest.raises(RuntimeError, match='simulated crash'):
        save_atomic({'epoch': 2, 'w': torch.zeros(1000)}, str(path))
    assert path.read_bytes() == before
    assert load_checkpoint_file(str(path))['epoch'] == 1
    assert leftovers(tmp_path) == []


def test_disk_full_while_saving_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1}, str(path))
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', disk_full)
    with pytest.raises(UserError) as info:
        save_atomic({'epoch': 2}, str(path))
    assert str(info.value) == f'cannot write {path}: No space left on device (the previous file is untouched)'
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


CHILD_SAVE = textwrap.dedent('''
    import io, sys, time
    import torch
    sys.path.insert(0, {root!r})
    import utils
    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):  # half of the bytes, then hang until killed
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        print('half written', flush=True)
        time.sleep(120)
        f.write(data[len(data) // 2:])

    torch.save = slow_save
    utils.save_atomic({{'epoch': 2, 'w': torch.zeros(100000)}}, sys.argv[1])
''')


@pytest.mark.slow
def test_job_killed_while_saving_leaves_the_old_checkpoint_loadable(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1, 'w': torch.ones(100000)}, str(path))
    before = path.read_bytes()
    script = tmp_path / 'child.py'
    script.write_text(CHILD_SAVE.format(root=ROOT))
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                             env=subprocess_env())
    try:
        assert child.stdout.readline().strip() == 'half written'
        partial = leftovers(tmp_path)
        assert len(partial) == 1 and os.path.getsize(tmp_path / partial[0]) > 0
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    ckpt = load_checkpoint_file(str(path))
    assert ckpt['epoch'] == 1 and torch.equal(ckpt['w'], torch.ones(100000))
    # the next save still works next to the stale temporary file of the killed job
    save_atomic({'epoch': 2}, str(path))
    assert load_checkpoint_file(str(path))['epoch'] == 2


# ----------------------------------------------------------------------------------------------------------
# reconcile_log

def _write_log(path, lines):
    path.write_text(''.join(lines))


def _record(epoch, **extra):
    return json.dumps({'epoch': epoch, 'test_acc1': float(epoch), **extra}) + '\n'


def test_reconcile_log_keeps_each_finished_epoch_once(tmp_path):
    log = tmp_path / 'log.txt'
    # epoch 1 twice (an earlier resume appended it again), a line cut by a kill, an epoch the checkpoint does
    # not have yet (it will be run again)
    _write_log(log, [_record(0), _record(1, run='first'), _record(1, run='second'), _record(2), '{"epoch": 3, "te',
                     '\n', _record(4)])
    finetune.reconcile_log(str(log), 2, {'epoch': 2, 'test_acc1': 2.0, 'from': 'checkpoint'})
    records = log_records(log)
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert records[1]['run'] == 'second'  # the later line of a repeated epoch wins
    assert 'from' not in records[2]  # a complete line is kept as it is


def test_reconcile_log_restores_the_epoch_whose_line_was_not_written(tmp_path):
    log = tmp_path / 'log.txt'
    # killed after checkpoint.pth of epoch 2 was saved but before (or while) its line was appended
    _write_log(log, [_record(0), _record(1), '{"epoch": 2, "test_a'])
    finetune.reconcile_log(str(log), 2, {'epoch': 2, 'test_acc1': 2.0, 'from': 'checkpoint'})
    records = log_records(log)
    assert [r['epoch'] for r in records] == [0, 1, 2]
    assert records[2]['from'] == 'checkpoint'
    assert leftovers(tmp_path) == []


def test_reconcile_log_without_a_log(tmp_path):
    log = tmp_path / 'log.txt'
    finetune.reconcile_log(str(log), 0, {'epoch': 0})
    assert log_epochs(log) == [0]


# ----------------------------------------------------------------------------------------------------------
# resume restores everything

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp('resume')
    data = make_image_folder(base / 'data', classes=tuple('abcd'), per_class=(8, 4), size=(32, 32))
    dense = official_checkpoint(base / 'dense.pth', 'cc_deit_digits_patch4_32')
    return {'base': base, 'data': data, 'dense': dense}


def _finetune(out, data, *extra):
    return finetune.main([*DIGITS_ARGS, '--data-path', str(data), '--output_dir', str(out), '--model-ema',
                          '--model-ema-decay', '1.0', '--warmup-epochs', '2', *map(str, extra)])


def test_resume_continues_with_optimizer_scheduler_ema_and_best_accuracy(capsys, monkeypatch, small, tmp_path):
    # Reference: three epochs in one go.
    ref = tmp_path / 'ref'
    assert _finetune(ref, small['data'], '--resume', small['dense'], '--final_finetune', 3) == 0
    # The same run interrupted (Ctrl-C) at the start of epoch 1, then resumed.
    out = tmp_path / 'out'
    real_train = engine.train_one_epoch

    def interrupted_at_epoch_1(*args, **kwargs):
        if kwargs.get('epoch', args[5] if len(args) > 5 else None) == 1:  # (model, criterion, loader, opt, dev, epoch
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, 'train_one_epoch', interrupted_at_epoch_1)
        capsys.readouterr()
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 3) == 130
    ckpt = out / 'checkpoint.pth'
    assert capsys.readouterr().err.strip() == f'interrupted; the last complete checkpoint is {ckpt} (epoch 0); ' \
                                              f'continue with --resume {ckpt}'
    first = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert first['epoch'] == 0 and log_epochs(out / 'log.txt') == [0]
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 3) == 0
    stdout = capsys.readouterr().out
    assert f'Resumed from {out / "checkpoint.pth"}: continuing at epoch 1 ' \
           f'(best Acc@1 so far {first["max_accuracy"]:.2f}%)' in stdout
    assert 'Finetuning for epochs 1..2' in stdout
    assert not re.search(r'Epoch: \[0\]', stdout)

    final, reference = (load_checkpoint_file(str(d / 'checkpoint.pth')) for d in (out, ref))
    assert final['epoch'] == 2
    records, ref_records = log_records(out / 'log.txt'), log_records(ref / 'log.txt')
    assert [r['epoch'] for r in records] == [0, 1, 2]
    # the learning rate follows the same schedule as the uninterrupted run
    assert [r['train_lr'] for r in records] == [r['train_lr'] for r in ref_records]
    assert final['lr_scheduler'] == reference['lr_scheduler']
    # the optimizer went on counting: AdamW's step is that of three epochs
    steps = [s['step'] for s in final['optimizer']['state'].values()]
    assert steps and all(float(s) == float(reference['optimizer']['state'][0]['step']) for s in steps)
    # EMA with decay 1.0 never moves: it is still the EMA of the first run (the dense weights), not the model
    # the resumed run started from
    dense = torch.load(small['dense'], weights_only=True)['model']
    for k in ('head.weight', 'blocks.0.attn.qkv.weight'):
        assert torch.equal(final['model_ema'][k], dense[k])
        assert not torch.equal(first['model'][k], dense[k])
    # best accuracy carried over; best.pth is the first epoch that reached it
    accs = [r['test_acc1'] for r in records]
    assert final['max_accuracy'] == max(accs)
    assert [r['max_accuracy'] for r in records] == [max(accs[:i + 1]) for i in range(3)]
    assert load_checkpoint_file(str(out / 'best.pth'))['epoch'] == accs.index(max(accs))


def test_resume_of_a_finished_run_does_nothing(capsys, small, tmp_path):
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    before = {name: (out / name).read_bytes() for name in ('checkpoint.pth', 'best.pth', 'log.txt')}
    (out / '.checkpoint.pth.tmp-999999').write_bytes(b'half of a checkpoint')  # a job killed while saving
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 1) == 0
    assert 'Nothing to do: 1 epochs already finished' in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in before} == before
    assert leftovers(out) == []  # the resume cleaned up the stale temporary file



def test_resume_with_more_epochs_says_the_old_schedule_continues(capsys, small, tmp_path):
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    schedule = load_checkpoint_file(str(out / 'checkpoint.pth'))['lr_scheduler']
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f'warning: {out / "checkpoint.pth"} was written by a run of --final_finetune 1; its learning-rate ' \
           f'schedule over 1 epochs continues unchanged' in lines
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['lr_scheduler']['t_initial'] == schedule['t_initial']
    assert log_epochs(out / 'log.txt') == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# kill during an epoch, then resume

def signal_during_an_epoch(tmp_path, final_finetune: int, epoch: int, sig):
    """Run a finetune of about 30 steps per epoch in a subprocess and send it ``sig`` on the first progress
    line of ``epoch``, which comes after that epoch's first step: inside it, before its checkpoint.
    Returns (argv, output dir, return code, stdout, stderr)."""
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcd'), per_class=(60, 4), size=(32, 32))
    dense = official_checkpoint(tmp_path / 'dense.pth', 'cc_deit_digits_patch4_32')
    out = tmp_path / 'out'
    argv = [*DIGITS_ARGS, '--data-path', data, '--output_dir', str(out), '--final_finetune', str(final_finetune)]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'finetune.py'), *argv, '--resume', dense],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=tmp_path)
    watchdog = threading.Timer(240, proc.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f'Epoch: [{epoch}]'):
                proc.send_signal(sig)
                break
        seen.append(proc.stdout.read())
        stderr = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return argv, out, proc.returncode, ''.join(seen), stderr


@pytest.mark.slow
def test_killed_during_an_epoch_resumes_where_it_stopped(capsys, tmp_path):
    argv, out, code, stdout, stderr = signal_during_an_epoch(tmp_path, 4, 2, signal.SIGKILL)
    assert code == -signal.SIGKILL, 'the run ended before it could be killed:\n' + stdout[-2000:] + stderr
    log = out / 'log.txt'
    killed_at = load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch']
    assert killed_at == 1 and log_epochs(log) == [0, 1]

    assert finetune.main([*argv, '--resume', str(out / 'checkpoint.pth')]) == 0
    stdout = capsys.readouterr().out
    assert f'continuing at epoch {killed_at + 1} ' in stdout
    assert f'Epoch: [{killed_at}]' not in stdout and f'Epoch: [{killed_at + 1}]' in stdout
    assert log_epochs(log) == [0, 1, 2, 3]  # no finished epoch lost, none repeated
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 3
    assert leftovers(out) == []


@pytest.mark.slow
def test_sigterm_during_an_epoch_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    # A cluster scheduler preempting the job sends SIGTERM: one line, exit 143, and the job resumes from the
    # last complete checkpoint (epoch 0 is saved when epoch 1 has taken its first step).
    _, out, code, _, stderr = signal_during_an_epoch(tmp_path, 3, 1, signal.SIGTERM)
    assert code == 143, stderr
    ckpt = out / 'checkpoint.pth'
    assert stderr.strip() == f'terminated (SIGTERM); the last complete checkpoint is {ckpt} (epoch 0); ' \
                             f'continue with --resume {ckpt}'
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 0
    assert log_epochs(out / 'log.txt') == [0] and leftovers(out) == []

def test_main_puts_the_previous_sigterm_handler_back(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert finetune.main(['--eval', '--device', 'cpu', '--resume', str(tmp_path / 'missing.pth')]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
