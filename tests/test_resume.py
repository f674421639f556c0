"""Resume loses nothing: --resume <output_dir>/checkpoint.pth continues at the next epoch with model, optimizer,
scheduler, EMA, best accuracy and every random stream restored, and ends where the uninterrupted run ends, bit for
bit; log.txt holds every finished epoch exactly once; best.pth is the first epoch reaching the best accuracy;
checkpoints are fsynced and renamed into place, so a job killed while saving keeps the previous one."""
import errno
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import engine
import finetune
from conftest import DIGITS_ARGS, ROOT, digits_world, make_image_folder, official_checkpoint, subprocess_env
from utils import (UserError, append_line, load_checkpoint_file, remove_stale_temporaries, save_atomic, write_atomic,
                   write_text_atomic)
from utils.signals import sigterm_held, sigterm_unwinds, worker_stops_quietly_on_sigterm


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


def test_save_atomic_writes_gpu_tensors_as_cpu_ones(tmp_path, monkeypatch):
    """A run on a GPU holds its state on it; the file it writes must load with plain torch.load on a machine without
    one (a CUDA storage records its device).  Fake CUDA tensors (torch's FakeTensorMode, no GPU needed) stand in
    for real ones: what reaches torch.save is on the CPU, in the same containers, a state dict's version record
    kept; CPU tensors are saved as they are, not copied."""
    import collections
    from torch._subclasses.fake_tensor import FakeTensorMode
    saved = {}
    monkeypatch.setattr(torch, 'save', lambda obj, f: saved.update(obj=obj))
    weights = torch.ones(2)
    with FakeTensorMode():
        on_gpu = torch.empty(3, device='cuda')
        state_dict = collections.OrderedDict(w=on_gpu)
        state_dict._metadata = {'': {'version': 2}}
        save_atomic({'model': state_dict, 'optimizer': {'state': {0: {'exp_avg': on_gpu}}, 'groups': [(on_gpu, 1)]},
                     'epoch': 3, 'cpu': weights}, str(tmp_path / 'checkpoint.pth'))
    obj = saved['obj']
    assert on_gpu.device.type == 'cuda' and obj['epoch'] == 3 and obj['cpu'] is weights
    assert type(obj['model']) is collections.OrderedDict and obj['model']._metadata == {'': {'version': 2}}
    assert [obj['model']['w'].device.type, obj['optimizer']['state'][0]['exp_avg'].device.type,
            obj['optimizer']['groups'][0][0].device.type] == ['cpu'] * 3
    assert obj['optimizer']['groups'][0][1] == 1 and isinstance(obj['optimizer']['groups'][0], tuple)


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


def test_a_failed_write_removes_the_folder_it_created(tmp_path, monkeypatch):
    """A run stopped while writing its first file leaves no empty output folder behind (the README: the folder is
    made with its first file); a folder that was there stays."""
    def stopped(f):
        f.write(b'partial')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / 'new' / 'pruned_0.3.pth'), stopped)
    assert os.listdir(tmp_path) == []
    (tmp_path / 'kept').mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / 'kept' / 'pruned_0.3.pth'), stopped)
    assert os.listdir(tmp_path) == ['kept'] and os.listdir(tmp_path / 'kept') == []


def torch_save_cut_by(monkeypatch, stop, after_bytes=4096, on_call=1):
    """torch.save whose ``on_call``-th call has ``stop`` raised in one of its writes once ``after_bytes`` are
    written, as a signal handler raises it where the write is (the real torch.save, through a file object)."""
    real_save, calls = torch.save, []

    class Cut:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > after_bytes:
                raise stop()
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def save(obj, f, *args, **kwargs):
        calls.append(f)
        return real_save(obj, Cut(f) if len(calls) == on_call else f, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', save)


@pytest.mark.parametrize('stop', [KeyboardInterrupt, finetune.Terminated])
def test_an_interruption_inside_torch_save_is_raised_as_it_is(tmp_path, monkeypatch, stop):
    """torch.save cut in the middle of a write raises a RuntimeError of its zip writer (unexpected pos) while
    handling the interruption: the writer raises the interruption itself, so a run reports its stop."""
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1, 'w': torch.ones(10000)}, str(path))
    before = path.read_bytes()
    torch_save_cut_by(monkeypatch, stop)
    with pytest.raises(stop):
        save_atomic({'epoch': 2, 'w': torch.zeros(10000)}, str(path))
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_sigterm_while_a_checkpoint_is_written_ends_with_one_line(tmp_path, monkeypatch, capsys):
    """SIGTERM inside torch.save of epoch 1's checkpoint: exit 143 and the line naming epoch 0's, not a
    traceback of torch's zip writer."""
    world = digits_world(tmp_path)
    out = tmp_path / 'out'
    torch_save_cut_by(monkeypatch, finetune.Terminated, on_call=3)  # epoch 0: checkpoint.pth, best.pth; epoch 1
    code = finetune.main([*DIGITS_ARGS, '--resume', world['dense'], '--data-path', world['data'], '--output_dir',
                          str(out), '--final_finetune', '2'])
    ckpt = out / 'checkpoint.pth'
    assert (code, capsys.readouterr().err) == (143, f'terminated (SIGTERM); the last complete checkpoint is {ckpt} '
                                                    f'(epoch 0); continue with --resume {ckpt}\n')
    assert load_checkpoint_file(str(ckpt))['epoch'] == 0 and leftovers(out) == []


def test_a_full_disk_while_an_epoch_is_logged_or_saved_says_which_checkpoint_is_complete(tmp_path, monkeypatch,
                                                                                       capsys):
    """No space left for epoch 1's log.txt line (its checkpoint written) or for epoch 1's checkpoint: one error
    line (exit 2) naming the last complete checkpoint and how to continue, not a traceback; continuing from it
    gives the epoch's log line exactly once."""
    world = digits_world(tmp_path)
    argv = [*DIGITS_ARGS, '--resume', world['dense'], '--data-path', world['data'], '--final_finetune', '2']
    real_open = open

    def full_at_epoch_1(path, mode='r', *args, **kwargs):
        if str(path).endswith('log.txt') and 'a' in mode and os.path.exists(path):  # epoch 1's line
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real_open(path, mode, *args, **kwargs)

    out = tmp_path / 'log'
    with monkeypatch.context() as m:
        m.setattr('builtins.open', full_at_epoch_1)
        code = finetune.main([*argv, '--output_dir', str(out)])
    ckpt = out / 'checkpoint.pth'
    assert (code, capsys.readouterr().err) == (2, f'error: cannot append to {out / "log.txt"}: No space left on '
                                                  f'device; the last complete checkpoint is {ckpt} (epoch 1); '
                                                  f'continue with --resume {ckpt}\n')
    assert finetune.main([*argv, '--output_dir', str(out), '--resume', str(ckpt)]) == 0
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0, 1]

    out = tmp_path / 'save'
    torch_save_cut_by(monkeypatch, lambda: OSError(errno.ENOSPC, 'No space left on device'), on_call=3)
    code = finetune.main([*argv, '--output_dir', str(out)])
    ckpt = out / 'checkpoint.pth'
    assert (code, capsys.readouterr().err) == (2, f'error: cannot write {ckpt}: No space left on device (the '
                                                  f'previous file is untouched); the last complete checkpoint is '
                                                  f'{ckpt} (epoch 0); continue with --resume {ckpt}\n')
    assert load_checkpoint_file(str(ckpt))['epoch'] == 0 and leftovers(out) == []


def test_a_failed_write_removes_every_folder_it_created(tmp_path):
    """An --output_dir several levels below the last existing folder: os.makedirs creates each level, and a write
    stopped midway removes all of them, up to the folder that was there (which stays, with what else it holds)."""
    def stopped(f):
        f.write(b'partial')
        raise KeyboardInterrupt

    (tmp_path / 'kept').mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / 'kept' / 'runs' / 'deep' / 'out' / 'checkpoint.pth'), stopped)
    assert os.listdir(tmp_path) == ['kept'] and os.listdir(tmp_path / 'kept') == []
    (tmp_path / 'kept' / 'runs' / 'other').mkdir(parents=True)  # a folder that is not empty is left alone
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(tmp_path / 'kept' / 'runs' / 'deep' / 'out' / 'checkpoint.pth'), stopped)
    assert os.listdir(tmp_path / 'kept' / 'runs') == ['other']


def test_the_temporary_file_of_a_write_through_a_link_is_found_after_a_kill(tmp_path):
    """write_atomic writes beside the file a link names, under that file's name; the clean-up of a resume looked
    beside the link, under the link's name, and left the killed job's temporary file (a whole checkpoint) there."""
    store = tmp_path / 'store'
    store.mkdir()
    (store / 'run1.pth').write_bytes(b'old')
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'checkpoint.pth').symlink_to(store / 'run1.pth')

    def killed(f):
        f.write(b'partial')
        os._exit(0)  # (in a child process: a kill leaves the temporary file behind)

    pid = os.fork()
    if pid == 0:
        try:
            write_atomic(str(run / 'checkpoint.pth'), killed)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert leftovers(store) == [f'.run1.pth.tmp-{pid}']
    assert remove_stale_temporaries([str(run / 'checkpoint.pth')]) == [f'.run1.pth.tmp-{pid}']
    assert leftovers(store) == [] and (store / 'run1.pth').read_bytes() == b'old'


def killed_while_writing(path):
    """The temporary file a job killed inside write_atomic leaves beside ``path`` (its name)."""
    def killed(f):
        f.write(b'partial')
        os._exit(0)

    pid = os.fork()
    if pid == 0:
        try:
            write_atomic(str(path), killed)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    return f'.{os.path.basename(path)}.tmp-{pid}'


@pytest.mark.parametrize('prune', [False, True])
def test_a_fresh_run_removes_what_a_job_killed_while_saving_its_first_file_left(small, tmp_path, prune):
    """A job killed (SIGKILL, the OOM killer) while writing its first checkpoint, or its pruned file, leaves a
    temporary file as large as a checkpoint; only a resume of a checkpoint.pth cleaned up, so the fresh run started
    again in that folder left it there for good."""
    out = tmp_path / 'out'
    out.mkdir()
    names = ['pruned_random_0.3.pth'] if prune else ['checkpoint.pth', 'best.pth']
    stale = sorted(killed_while_writing(out / name) for name in names)
    assert sorted(leftovers(out)) == stale
    if prune:
        code = finetune.main([*DIGITS_ARGS, '--prune', '--prune_mode', 'random', '--prune_rate', '0.3',
                              '--resume', small['dense'], '--data-path', str(small['data']), '--output_dir', str(out)])
    else:
        code = _finetune(out, small['data'], '--final_finetune', 1)
    assert code == 0
    assert leftovers(out) == []
    assert all((out / name).is_file() for name in names)


@pytest.mark.parametrize('final', [2, 1], ids=['continued', 'already-finished'])
def test_a_resumed_run_removes_the_temporary_files_of_a_killed_job_once(monkeypatch, small, tmp_path, final):
    """The temporary files a job killed while saving left are removed by one pass over the run's outputs, whether
    the resumed run trains or has nothing to do (a continued run made two: its repair and its start)."""
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    stale = killed_while_writing(out / 'checkpoint.pth')
    assert leftovers(out) == [stale]
    passes = []
    real = finetune.remove_stale_temporaries

    def counted(paths):
        passes.append(sorted(os.path.basename(p) for p in paths))
        return real(paths)

    monkeypatch.setattr(finetune, 'remove_stale_temporaries', counted)
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', final) == 0
    assert passes == [['best.pth', 'checkpoint.pth', 'log.txt']]
    assert leftovers(out) == []
    assert log_epochs(out / 'log.txt') == list(range(final))


@pytest.mark.parametrize('final', [2, 1])
def test_a_refused_run_leaves_the_temporary_files_of_a_killed_job(small, tmp_path, final, capsys):
    """The killed job's temporary files are removed only once every check that can refuse the run has passed: a
    continued run (final 2) refused for a data folder without images, or a finished one (final 1) refused for another
    --model than its own, leaves the folder as it was."""
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    stale = killed_while_writing(out / 'checkpoint.pth')
    before = sorted(os.listdir(out))
    empty = tmp_path / 'empty'
    for split in ('train', 'val'):
        (empty / split / 'a').mkdir(parents=True)
    data, extra = (empty, ()) if final == 2 else (small['data'], ('--model', 'deit_small_patch16_224'))
    assert _finetune(out, data, '--resume', out / 'checkpoint.pth', '--final_finetune', final, *extra) == 2
    err = capsys.readouterr().err
    assert ('no images in' if final == 2 else 'deit_small_patch16_224') in err, err
    assert sorted(os.listdir(out)) == before and leftovers(out) == [stale]


def test_the_output_folder_check_is_not_stopped_by_a_probe_a_killed_run_left(tmp_path):
    """check_output_dir writes and removes a probe file; one left by a run killed in between, under the name this
    process would have picked (same pid: common in containers), does not make the folder look unwritable, and a
    folder that is not one is still refused."""
    from utils import check_output_dir
    (tmp_path / f'.write-test-{os.getpid()}').write_bytes(b'ok')
    check_output_dir(str(tmp_path))
    assert os.listdir(tmp_path) == [f'.write-test-{os.getpid()}']
    (tmp_path / 'file').write_text('x')
    with pytest.raises(UserError, match='cannot write to --output_dir'):
        check_output_dir(str(tmp_path / 'file' / 'out'))


def test_a_symbolic_link_is_written_through(tmp_path):
    """The file a link names gets the new contents and the link stays a link (the rename replaced the link with
    a plain file, and the file it named kept its old contents)."""
    target = tmp_path / 'results' / 'cpu.md'
    target.parent.mkdir()
    target.write_text('old\n')
    link = tmp_path / 'cpu.md'
    link.symlink_to(target)
    write_text_atomic(str(link), 'new\n')
    assert link.is_symlink() and target.read_text() == 'new\n'
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


@pytest.mark.parametrize('what', ['checkpoint', 'log'])
def test_the_temporary_file_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch, what):
    """Without fsync before the rename, a power cut can leave checkpoint.pth renamed but empty; without a flush
    before the fsync, the last bytes of a file (all of a short log.txt) are still in Python's buffer."""
    events = record_fsyncs_and_renames(monkeypatch)
    path = tmp_path / ('checkpoint.pth' if what == 'checkpoint' else 'log.txt')
    if what == 'checkpoint':
        save_atomic({'epoch': 1, 'w': torch.ones(10000)}, str(path))
    else:
        write_text_atomic(str(path), '{"epoch": 0, "train_loss": 2.3}\n')
    renames = [i for i, e in enumerate(events) if e[0] == 'replace']
    assert len(renames) == 1 and os.path.basename(events[renames[0]][2]) == path.name
    renamed, size = events[renames[0]][1], os.path.getsize(path)
    # the renamed file itself was fsynced before the rename, complete (flushed: all its bytes were there) ...
    assert ('fsync', 'file', renamed, size) in events[:renames[0]]
    # ... and the directory after it, so the rename survives a crash too
    assert any(e[:2] == ('fsync', 'directory') for e in events[renames[0] + 1:])


def record_fsyncs_and_renames(monkeypatch):
    """The list of os.fsync and os.replace calls, in order, as they happen: ('fsync', 'file' or 'directory',
    (st_dev, st_ino), size) and ('replace', (st_dev, st_ino) of the source, the destination as given)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        kind = 'file' if stat.S_ISREG(st.st_mode) else 'directory' if stat.S_ISDIR(st.st_mode) else 'other'
        events.append(('fsync', kind, (st.st_dev, st.st_ino), st.st_size))
        return real_fsync(fd)

    def replace(src, dst):
        st = os.stat(src)
        events.append(('replace', (st.st_dev, st.st_ino), dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'replace', replace)
    return events


def test_the_rename_is_made_durable_in_the_folder_that_holds_the_file(tmp_path, monkeypatch):
    """The directory fsynced after the rename is the one the rename changed: the folder of the file a link names,
    where the new file is renamed into place, not the folder of the link, nor the folder above."""
    store = tmp_path / 'store' / 'runs'
    store.mkdir(parents=True)
    (store / 'run1.pth').write_bytes(b'old')
    (tmp_path / 'out').mkdir()
    link = tmp_path / 'out' / 'checkpoint.pth'
    link.symlink_to(store / 'run1.pth')
    events = record_fsyncs_and_renames(monkeypatch)
    save_atomic({'epoch': 1}, str(link))
    assert link.is_symlink() and torch.load(store / 'run1.pth')['epoch'] == 1
    renames = [i for i, e in enumerate(events) if e[0] == 'replace']
    assert len(renames) == 1 and os.path.samefile(os.path.dirname(events[renames[0]][2]), store)
    synced = [e[2] for e in events[renames[0] + 1:] if e[:2] == ('fsync', 'directory')]
    folder = os.stat(store)
    assert (folder.st_dev, folder.st_ino) in synced, synced


def test_a_rename_that_fails_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """The rename itself can fail (an I/O error, a disk gone read-only): the previous file stays as it was, the
    complete temporary file is removed, and the failure is the one-line error of any other failed write."""
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 1}, str(path))
    before = path.read_bytes()

    def io_error(src, dst):
        raise OSError(errno.EIO, 'Input/output error')

    monkeypatch.setattr(os, 'replace', io_error)
    with pytest.raises(UserError) as info:
        save_atomic({'epoch': 2}, str(path))
    assert str(info.value) == f'cannot write {path}: Input/output error (the previous file is untouched)'
    assert path.read_bytes() == before and leftovers(tmp_path) == []


def test_a_private_file_is_private_from_its_first_byte(tmp_path):
    """A checkpoint made private (chmod 600) is replaced by a temporary file that has that mode before any byte is
    written to it: a file readable by all for the time of the write would show the weights to other users."""
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 0}, str(path))
    os.chmod(path, 0o600)
    modes = []

    def write(f):
        modes.append(stat.S_IMODE(os.fstat(f.fileno()).st_mode))
        torch.save({'epoch': 1}, f)

    write_atomic(str(path), write)
    assert modes == [0o600]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and torch.load(path)['epoch'] == 1


def test_the_clean_up_removes_only_the_temporary_files_of_the_files_it_is_given(tmp_path):
    """A finetuning run clears what killed jobs left while writing its own outputs; the temporary files of other
    files in the folder (a --prune writing its pruned file there meanwhile, a user's own file) are not its to
    remove."""
    out = tmp_path / 'out'
    out.mkdir()
    stale = killed_while_writing(out / 'checkpoint.pth')
    others = [killed_while_writing(out / 'pruned_0.3.pth'), '.notes.txt.tmp-1', 'checkpoint.pth.tmp-1']
    for name in others[1:]:
        (out / name).write_text('not a checkpoint\n')
    assert remove_stale_temporaries([str(out / 'checkpoint.pth'), str(out / 'best.pth')]) == [stale]
    assert sorted(os.listdir(out)) == sorted(others)


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


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    """write_atomic writes a new file and renames it over the old one: the new file took the default mode, so a
    checkpoint made private (chmod 600) became readable by all at the next epoch; it keeps the old file's mode (a
    new file gets the default one)."""
    path = tmp_path / 'checkpoint.pth'
    save_atomic({'epoch': 0}, str(path))
    default = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, 0o600)
    save_atomic({'epoch': 1}, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and torch.load(path)['epoch'] == 1
    os.chmod(path, 0o640)
    write_atomic(str(path), lambda f: f.write(b'x'))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and path.read_bytes() == b'x'
    save_atomic({'epoch': 2}, str(tmp_path / 'new.pth'))
    assert stat.S_IMODE(os.stat(tmp_path / 'new.pth').st_mode) == default


def test_a_line_appended_after_one_cut_short_starts_a_line_of_its_own(tmp_path):
    """A kill or a full disk can leave prune_log.txt (which no run repairs) ending in part of a record: the next
    record goes on a line of its own, where json.loads reads it; the cut one is left as it is."""
    log = tmp_path / 'prune_log.txt'
    log.write_text('{"prune_mode": "attn"}\n{"prune_mo')
    append_line(str(log), json.dumps({'prune_rate': 0.3}))
    append_line(str(log), json.dumps({'prune_rate': 0.4}))
    lines = log.read_text().splitlines()
    assert lines[:2] == ['{"prune_mode": "attn"}', '{"prune_mo']
    assert [json.loads(line) for line in lines[2:]] == [{'prune_rate': 0.3}, {'prune_rate': 0.4}]
    fresh = tmp_path / 'new.txt'
    append_line(str(fresh), 'x')
    assert fresh.read_text() == 'x\n'


@pytest.mark.parametrize('content, line', [
    ('this is my notes file\nnot json at all\n', "line 1 is not a record of a run (a JSON object with its epoch): "
                                                 "'this is my notes file'"),
    (_record(0) + '[1, 2]\n', "line 2 is not a record of a run (a JSON object with its epoch): '[1, 2]'"),
    (_record(0) + 'null\n', 'line 2 is not a record'),
    (_record(0) + 'NaN\n', 'line 2 is not a record'),
    (_record(0) + '{"note": "no epoch"}\n', 'line 2 is not a record'),
    (_record(0) + '{"epoch": true}\n', 'line 2 is not a record'),
    (_record(0) + 'a last line without its newline', 'line 2 is not a record'),
])
def test_a_log_that_is_not_a_runs_log_is_refused_and_left_as_it_is(tmp_path, content, line):
    """Only blank lines and records cut by a kill are passed over: any other line means the file is not a run's
    log, which the rewrite would lose (notes were dropped without a word; a list or null was a traceback)."""
    log = tmp_path / 'log.txt'
    log.write_text(content)
    with pytest.raises(UserError) as e:
        finetune.reconcile_log(str(log), 2, {'epoch': 2})
    assert str(e.value).startswith(f'{log} {line}') and str(e.value).endswith(
        'the run rewrites its log when it continues, so move the file away'), str(e.value)
    assert log.read_text() == content
    log.write_bytes(b'\x80\x81 not utf-8\n')
    with pytest.raises(UserError, match=r'is not a text file, not the log of a run \(move it away\)$'):
        finetune.read_log(str(log))


def test_reconcile_log_without_a_log(tmp_path):
    log = tmp_path / 'log.txt'
    finetune.reconcile_log(str(log), 0, {'epoch': 0})
    assert log_epochs(log) == [0]


# ----------------------------------------------------------------------------------------------------------
# resume restores everything

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    return digits_world(tmp_path_factory.mktemp('resume'))


# Explicit schedule: base lr 0.0512 * batch 8 / 512 = 8e-4, two warm-up epochs from 1e-4, cosine to 1e-5 over
# three epochs; weight decay 0 gives one parameter group.
SCHEDULE = ['--lr', '0.0512', '--warmup-lr', '1e-4', '--min-lr', '1e-5', '--warmup-epochs', '2', '--sched', 'cosine',
            '--weight-decay', '0']


def lr_during_epoch(epoch, base=8e-4, warmup_lr=1e-4, min_lr=1e-5, warmup=2, epochs=3):
    """The learning rate of each epoch, written out: linear warm-up from warmup_lr over ``warmup`` epochs, then
    cosine from ``base`` to ``min_lr`` over ``epochs`` (timm's CosineLRScheduler).  As in the original code and
    DeiT the schedule is stepped to ``t = epoch`` after each epoch, so epoch e runs at t = max(e - 1, 0)."""
    t = max(epoch - 1, 0)
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def _finetune(out, data, *extra):
    return finetune.main([*DIGITS_ARGS, '--data-path', str(data), '--output_dir', str(out), '--model-ema',
                          '--model-ema-decay', '0.9', *SCHEDULE, *map(str, extra)])


def accuracies(monkeypatch, values):
    """engine.evaluate reports these Acc@1 values, one per call, so which epoch is best is known in advance."""
    values = list(values)

    def evaluate(*args, **kwargs):
        return {'acc1': values.pop(0), 'acc5': 100.0, 'loss': 1.0}

    monkeypatch.setattr(engine, 'evaluate', evaluate)


# DeiT's training augmentations: RandAugment and random erasing draw from Python's random, RandAugment's choice of
# operations and mixup/cutmix from numpy, crop, flip and drop-path from torch (DIGITS_ARGS turns them off)
DRAWING = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
           '--drop-path', '0.1']


def test_resume_continues_with_optimizer_scheduler_ema_and_best_accuracy(capsys, monkeypatch, small, tmp_path):
    # Acc@1 50, 25, 50: the best is reached at epoch 0 and tied at epoch 2, which must not replace best.pth
    # Every random stream is drawn from, so each one left where it was by the resume changes the weights.
    # Reference: three epochs in one go.
    ref = tmp_path / 'ref'
    with monkeypatch.context() as patch:
        accuracies(patch, [50.0, 25.0, 50.0])
        assert _finetune(ref, small['data'], '--resume', small['dense'], '--final_finetune', 3, *DRAWING) == 0
    # The same run interrupted (Ctrl-C) at the start of epoch 1, then resumed.
    out = tmp_path / 'out'
    real_train = engine.train_one_epoch

    def interrupted_at_epoch_1(*args, **kwargs):
        if kwargs.get('epoch', args[5] if len(args) > 5 else None) == 1:  # (model, criterion, loader, opt, dev, epoch
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, 'train_one_epoch', interrupted_at_epoch_1)
        accuracies(patch, [50.0])
        capsys.readouterr()
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 3, *DRAWING) == 130
    ckpt = out / 'checkpoint.pth'
    assert capsys.readouterr().err.strip() == f'interrupted; the last complete checkpoint is {ckpt} (epoch 0); ' \
                                              f'continue with --resume {ckpt}'
    first = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert first['epoch'] == 0 and log_epochs(out / 'log.txt') == [0]
    # a job killed while appending to log.txt leaves epoch 0 twice and a cut line behind: the resume repairs it
    with open(out / 'log.txt', 'a') as f:
        f.write((out / 'log.txt').read_text() + '{"epoch": 1, "train_lo')
    with monkeypatch.context() as patch:
        accuracies(patch, [25.0, 50.0])
        assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 3,
                         *DRAWING) == 0
    stdout = capsys.readouterr().out
    assert f'Resumed from {out / "checkpoint.pth"}: continuing at epoch 1 (best Acc@1 so far 50.00%)' in stdout
    assert 'Finetuning for epochs 1..2' in stdout
    assert not re.search(r'Epoch: \[0\]', stdout)

    final, reference = (load_checkpoint_file(str(d / 'checkpoint.pth')) for d in (out, ref))
    assert final['epoch'] == 2
    records = log_records(out / 'log.txt')  # every line parses
    assert [r['epoch'] for r in records] == [0, 1, 2]
    # the learning rate follows the schedule, written out independently
    assert [r['train_lr'] for r in records] == pytest.approx([lr_during_epoch(e) for e in range(3)], rel=1e-9)
    # the optimizer went on counting: AdamW's step is that of three epochs of 4 steps
    steps = [float(s['step']) for s in final['optimizer']['state'].values()]
    assert steps and all(s == 12.0 for s in steps)
    # model and EMA: bit for bit those of the uninterrupted run (the EMA went on from the checkpoint's)
    for key in ('model', 'model_ema'):
        assert all(torch.equal(final[key][k], reference[key][k]) for k in reference[key]), key
    assert not torch.equal(final['model_ema']['head.weight'], final['model']['head.weight'])
    # best accuracy carried over; best.pth is the first epoch that reached it
    assert final['max_accuracy'] == 50.0
    assert [r['max_accuracy'] for r in records] == [50.0, 50.0, 50.0]
    assert load_checkpoint_file(str(out / 'best.pth'))['epoch'] == 0


def tensorboard_steps(directory, tag):
    """{step: value} of a scalar over every TensorBoard events file in ``directory``, read by TensorBoard's own
    reader (a step written twice keeps its last value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    points = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith('events.out.tfevents'):
            events = EventAccumulator(str(directory / name))
            events.Reload()
            if tag in events.Tags()['scalars']:
                points.update({e.step: e.value for e in events.Scalars(tag)})
    return points


@pytest.mark.parametrize('final', [2, 1], ids=['continued', 'already-finished'])
def test_a_run_stopped_after_its_checkpoint_before_its_logs_gets_them_on_resume(capsys, monkeypatch, small, tmp_path,
                                                                                 final):
    """Stopped once epoch 0's checkpoint.pth is saved but before its TensorBoard scalars and log.txt line are
    written: the resume writes both from the checkpoint, so TensorBoard, as log.txt, holds every epoch; also when
    epoch 0 was the last and the resume has nothing else to do."""
    out = tmp_path / 'out'
    real = finetune.epoch_scalars

    def killed_at_epoch_0(tb, log_stats, epoch):
        if epoch == 0:
            raise KeyboardInterrupt
        real(tb, log_stats, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(finetune, 'epoch_scalars', killed_at_epoch_0)
        accuracies(patch, [40.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', final) == 130
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 0
    assert not (out / 'log.txt').exists() or log_epochs(out / 'log.txt') == []
    assert tensorboard_steps(out, 'test/acc1') == {}
    with monkeypatch.context() as patch:
        accuracies(patch, [60.0])
        assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', final) == 0
    assert ('Nothing to do' in capsys.readouterr().out) == (final == 1)
    assert log_epochs(out / 'log.txt') == list(range(final))
    assert tensorboard_steps(out, 'test/acc1') == ({0: 40.0, 1: 60.0} if final == 2 else {0: 40.0})
    records = log_records(out / 'log.txt')
    assert tensorboard_steps(out, 'train/lr') == pytest.approx({r['epoch']: r['train_lr'] for r in records})


def tensorboard_points(directory, tag):
    """The steps of every point of a scalar, over every TensorBoard events file in ``directory``, repeats kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = []
    for name in sorted(os.listdir(directory)):
        if name.startswith('events.out.tfevents'):
            events = EventAccumulator(str(directory / name))
            events.Reload()
            if tag in events.Tags()['scalars']:
                steps += [e.step for e in events.Scalars(tag)]
    return sorted(steps)


@pytest.mark.parametrize('final', [3, 2], ids=['continued', 'already-finished'])
def test_a_run_killed_while_writing_its_log_line_gets_no_second_tensorboard_point(capsys, monkeypatch, small,
                                                                                   tmp_path, final):
    """Killed while appending epoch 1's line to log.txt, after its TensorBoard scalars: the resume restores the line
    and leaves TensorBoard as it was, each epoch's point once."""
    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        accuracies(patch, [40.0, 60.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 2) == 0
    lines = (out / 'log.txt').read_text().splitlines()
    (out / 'log.txt').write_text(lines[0] + '\n' + lines[1][:30])  # the line cut by the kill
    with monkeypatch.context() as patch:
        accuracies(patch, [80.0])
        assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', final) == 0
    capsys.readouterr()
    assert log_epochs(out / 'log.txt') == list(range(final))
    for tag in ('train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss'):
        assert tensorboard_points(out, tag) == list(range(final)), tag
    # without a teacher the loss is the base loss alone: no terms of a distillation loss are logged
    assert tensorboard_points(out, 'train/loss_base') == tensorboard_points(out, 'train/loss_kd') == []
    assert not any('loss_' in key for line in (out / 'log.txt').read_text().splitlines() for key in json.loads(line))
    assert tensorboard_steps(out, 'test/acc1') == {e: a for e, a in {0: 40.0, 1: 60.0, 2: 80.0}.items() if e < final}


def test_a_run_stopped_between_its_tensorboard_scalars_gets_each_missing_one_once(capsys, monkeypatch, small,
                                                                                  tmp_path):
    """Stopped after epoch 1's checkpoint and its train/* scalars, before its test/* ones and its log.txt line: the
    resume writes the missing test/* scalars and not the train/* ones again, each epoch's point once per tag."""
    out = tmp_path / 'out'
    real = finetune.epoch_scalars

    def stopped_halfway_at_epoch_1(tb, log_stats, epoch):
        if epoch == 1:
            real(tb, {k: v for k, v in log_stats.items() if k.startswith('train_')}, epoch)
            raise KeyboardInterrupt
        real(tb, log_stats, epoch)

    with monkeypatch.context() as patch:
        patch.setattr(finetune, 'epoch_scalars', stopped_halfway_at_epoch_1)
        accuracies(patch, [40.0, 60.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 2) == 130
    assert log_epochs(out / 'log.txt') == [0]
    assert tensorboard_points(out, 'train/loss') == [0, 1] and tensorboard_points(out, 'test/acc1') == [0]
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    capsys.readouterr()
    assert log_epochs(out / 'log.txt') == [0, 1]
    for tag in ('train/loss', 'train/lr', 'test/acc1', 'test/acc5', 'test/loss'):
        assert tensorboard_points(out, tag) == [0, 1], tag
    assert tensorboard_steps(out, 'test/acc1') == {0: 40.0, 1: 60.0}


def test_each_epochs_log_line_and_tensorboard_points_are_what_it_trained_and_evaluated(capsys, monkeypatch, small,
                                                                                        tmp_path):
    """Each finished epoch appends one record to log.txt: its training figures (train_*), its evaluation's
    (test_*), the epoch, the best Acc@1 so far, and the model's parameter count and GFLOPs (the pruned model's,
    as torch's FLOP counter counts them); TensorBoard holds the train_* and test_* figures as train/* and test/*
    at step epoch, each once, and nothing else."""
    import timm
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.flop_counter import FlopCounterMode
    pruned_dir = tmp_path / 'pruned'
    assert finetune.main([*DIGITS_ARGS, '--prune', '--prune_mode', 'random', '--prune_rate', '0.5', '--resume',
                          str(small['dense']), '--data-path', str(small['data']), '--output_dir', str(pruned_dir)]) == 0
    evaluations = [{'acc1': 40.0, 'acc5': 90.0, 'loss': 1.5}, {'acc1': 30.0, 'acc5': 95.0, 'loss': 1.25}]
    pending, trained = list(evaluations), []
    real_train = engine.train_one_epoch

    def recorded_training(*args, **kwargs):
        trained.append(real_train(*args, **kwargs))
        return trained[-1]

    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        patch.setattr(engine, 'evaluate', lambda *args, **kwargs: dict(pending.pop(0)))
        patch.setattr(engine, 'train_one_epoch', recorded_training)
        assert _finetune(out, small['data'], '--resume', pruned_dir / 'pruned_random_0.5.pth',
                         '--final_finetune', 2) == 0
    capsys.readouterr()
    assert not pending and [set(t) for t in trained] == [{'loss', 'lr'}] * 2
    records = log_records(out / 'log.txt')
    parameters = sum(p.numel() for p in timm.create_model('deit_digits_patch4_32').parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        timm.create_model('cc_deit_digits_patch4_32', checkpoint_path=str(out / 'checkpoint.pth'))(
            torch.zeros(1, 3, 32, 32))
    pruned_gflops, dense_gflops = counter.get_total_flops() / 2e9, finetune.gflops(
        timm.create_model('cc_deit_digits_patch4_32'))
    assert pruned_gflops < 0.9 * dense_gflops  # (the pruned model's figure, not the dense one's)
    assert len(records) == 2
    for epoch, (record, train, test, best) in enumerate(zip(records, trained, evaluations, (40.0, 40.0))):
        assert set(record) == {'train_loss', 'train_lr', 'test_acc1', 'test_acc5', 'test_loss', 'epoch',
                               'n_parameters', 'gflops', 'max_accuracy'}, record
        assert record['epoch'] == epoch and record['max_accuracy'] == best
        assert {k: record[f'train_{k}'] for k in train} == train and {k: record[f'test_{k}'] for k in test} == test
        assert record['n_parameters'] == parameters
        assert record['gflops'] == pytest.approx(pruned_gflops, rel=0.02)
    names = [n for n in os.listdir(out) if n.startswith('events.out.tfevents')]
    assert len(names) == 1
    events = EventAccumulator(str(out / names[0]))
    events.Reload()
    assert sorted(events.Tags()['scalars']) == ['test/acc1', 'test/acc5', 'test/loss', 'train/loss', 'train/lr']
    for tag in events.Tags()['scalars']:
        key = tag.replace('/', '_')
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [
            (r['epoch'], pytest.approx(r[key], rel=1e-6)) for r in records], tag


def test_a_finetuning_checkpoint_of_the_original_code_starts_a_new_run_and_says_so(capsys, small, tmp_path):
    # The original code's checkpoint.pth/best.pth: model, optimizer, epoch, scaler, channels and args (a
    # Namespace), no lr_scheduler, so neither it nor this project can continue the run: a new one starts from its
    # weights at epoch 0, on a fresh schedule, and a note says so rather than leaving the epoch to be guessed.
    import argparse
    dense = torch.load(small['dense'], map_location='cpu', weights_only=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    original = {**dense, 'optimizer': optimizer.state_dict(), 'epoch': torch.tensor(4), 'scaler': {},
                'channels': None, 'args': argparse.Namespace(model='deit_digits_patch4_32', final_finetune=30)}
    path = tmp_path / 'checkpoint_of_the_original.pth'
    torch.save(original, path)
    out = tmp_path / 'out'
    assert finetune.main([*DIGITS_ARGS, '--data-path', str(small['data']), '--output_dir', str(out), *SCHEDULE,
                          '--resume', str(path), '--final_finetune', '1']) == 0
    printed = capsys.readouterr().out
    assert (f'note: {path} holds an optimizer and epoch 4 but no lr_scheduler' in printed
            and 'starting at epoch 0 (--start_epoch 5 would place it after that epoch' in printed), printed
    records = log_records(out / 'log.txt')
    assert [r['epoch'] for r in records] == [0]
    assert records[0]['train_lr'] == pytest.approx(lr_during_epoch(0), rel=1e-9)
    # a pruned file, which holds no optimizer, starts a new run without the note
    capsys.readouterr()
    assert finetune.main([*DIGITS_ARGS, '--data-path', str(small['data']), '--output_dir', str(tmp_path / 'new'),
                          '--resume', str(small['dense']), '--final_finetune', '1']) == 0
    assert 'no lr_scheduler' not in capsys.readouterr().out


def test_resume_restores_the_loss_scaler(capsys, monkeypatch, small, tmp_path):
    """The loss scaler (mixed precision's, on CUDA) continues where it was: here a CPU GradScaler that doubles its
    scale at every step it finds finite gradients, so after the run its scale is init x 2^steps, steps counted over
    both invocations; a resumed scaler started afresh would hold init x 2^(steps of the second one)."""
    real = torch.amp.GradScaler
    updates = []

    class Counting(real):
        def update(self, new_scale=None):
            updates.append(1)
            return super().update(new_scale)

    monkeypatch.setattr(torch.amp, 'GradScaler', lambda device, enabled=True: Counting('cpu', init_scale=1024.0,
                                                                                        growth_interval=1))
    real_train = engine.train_one_epoch

    def stopped_at_epoch_1(*args, **kwargs):
        if kwargs.get('epoch', args[5] if len(args) > 5 else None) == 1:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        patch.setattr(engine, 'train_one_epoch', stopped_at_epoch_1)
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 2) == 130
    first = len(updates)
    assert first > 0 and torch.load(out / 'checkpoint.pth')['scaler']['scale'] == 1024.0 * 2 ** first
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    capsys.readouterr()
    saved = torch.load(out / 'checkpoint.pth')
    assert saved['epoch'] == 1 and len(updates) == 2 * first
    assert saved['scaler']['scale'] == 1024.0 * 2 ** len(updates)


def test_best_pth_is_written_when_accuracy_rises_and_only_then(monkeypatch, small, tmp_path):
    """Acc@1 10, 30, 20, 30, 40: best.pth is written after epochs 0, 1 and 4, never on the tie at epoch 3."""
    writes = []
    real_save = finetune.save_atomic

    def recording_save(state, path):
        writes.append((os.path.basename(path), state['epoch']))
        return real_save(state, path)

    monkeypatch.setattr(finetune, 'save_atomic', recording_save)
    accuracies(monkeypatch, [10.0, 30.0, 20.0, 30.0, 40.0])
    out = tmp_path / 'out'
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcd'), per_class=(2, 1), size=(32, 32))
    assert _finetune(out, data, '--resume', small['dense'], '--final_finetune', 5) == 0
    assert [e for name, e in writes if name == 'best.pth'] == [0, 1, 4]
    assert [e for name, e in writes if name == 'checkpoint.pth'] == [0, 1, 2, 3, 4]
    assert [r['max_accuracy'] for r in log_records(out / 'log.txt')] == [10.0, 30.0, 30.0, 30.0, 40.0]
    best = load_checkpoint_file(str(out / 'best.pth'))
    assert best['epoch'] == 4 and best['max_accuracy'] == 40.0


@pytest.mark.parametrize('older_file', [False, True], ids=['checkpoint', 'checkpoint-without-improved'])
def test_a_stop_between_the_checkpoint_and_best_pth_is_repaired_on_resume(capsys, monkeypatch, small, tmp_path,
                                                                          older_file):
    """Acc@1 10 then 30: epoch 1 is the best, and the run is stopped after its checkpoint.pth, before its best.pth.
    The resume copies best.pth from the checkpoint, the only file holding that epoch's weights.  (With best.pth
    written first, a stop between the two left a best.pth of an epoch that no checkpoint or log line holds.)  A
    checkpoint written before 'improved' was saved (``older_file``) says whether its epoch is the best by its
    accuracy alone (its test_acc1 reaching max_accuracy): it is repaired too."""
    out = tmp_path / 'out'
    real_save = finetune.save_atomic

    def stopped_before_best_of_epoch_1(state, path):
        if os.path.basename(path) == 'best.pth' and state['epoch'] == 1:
            raise KeyboardInterrupt
        return real_save(state, path)

    with monkeypatch.context() as patch:
        patch.setattr(finetune, 'save_atomic', stopped_before_best_of_epoch_1)
        accuracies(patch, [10.0, 30.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 2) == 130
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 1
    assert load_checkpoint_file(str(out / 'best.pth'))['epoch'] == 0
    if older_file:
        state = load_checkpoint_file(str(out / 'checkpoint.pth'))
        assert state.pop('improved') is True and state['max_accuracy'] == state['log_stats']['test_acc1'] == 30.0
        torch.save(state, out / 'checkpoint.pth')  # as the earlier version wrote it
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    assert f'note: {out / "best.pth"} was not written after epoch 1, the best so far' in capsys.readouterr().out
    assert (out / 'best.pth').read_bytes() == (out / 'checkpoint.pth').read_bytes()
    assert leftovers(out) == []


def test_a_checkpoint_named_by_a_relative_path_continues_in_its_own_folder(capsys, monkeypatch, small, tmp_path):
    """--resume checkpoint.pth from inside the run's folder, without --output_dir, continues there (the folder of
    the file is '.'); --resume out/checkpoint.pth with --output_dir given as the absolute path of that folder is
    the run continued in its own folder too: its log.txt is repaired (the duplicate line of a job killed while
    appending removed), and no note sends the user to another folder for its best epoch."""
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    monkeypatch.chdir(out)
    code = finetune.main([*DIGITS_ARGS, '--data-path', str(small['data']), '--model-ema', '--model-ema-decay', '0.9',
                          *SCHEDULE, '--resume', 'checkpoint.pth', '--final_finetune', '2'])
    assert code == 0
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 1 and log_epochs(out / 'log.txt') == [0, 1]
    with open(out / 'log.txt', 'a') as f:  # epoch 1's line twice: a job killed after appending it, resumed again
        f.write((out / 'log.txt').read_text().splitlines()[-1] + '\n')
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', os.path.join('out', 'checkpoint.pth'), '--final_finetune', 3) == 0
    assert 'note: the best epoch so far' not in capsys.readouterr().out
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 2
    assert log_epochs(out / 'log.txt') == [0, 1, 2]


def test_a_tie_with_the_best_of_the_run_continued_writes_no_best_pth_on_resume(capsys, monkeypatch, small, tmp_path):
    """Acc@1 30 at epoch 0 (first/best.pth), then the run continued from that best.pth into another folder ties it
    at epoch 1: no epoch there improved, so that folder has no best.pth, and a resume of its checkpoint.pth (here
    of a finished run) must not make one of epoch 1 and say that a stop lost it."""
    first, out = tmp_path / 'first', tmp_path / 'out'
    with monkeypatch.context() as patch:
        accuracies(patch, [30.0, 30.0])
        assert _finetune(first, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
        assert _finetune(out, small['data'], '--resume', first / 'best.pth', '--final_finetune', 2) == 0
    assert not (out / 'best.pth').exists()
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    assert 'was not written after epoch' not in capsys.readouterr().out
    assert not (out / 'best.pth').exists()
    assert load_checkpoint_file(str(first / 'best.pth'))['epoch'] == 0


def test_a_run_continued_into_another_folder_names_the_file_of_its_best_epoch(capsys, monkeypatch, small, tmp_path):
    """Acc@1 30 then 20: first/best.pth holds epoch 0, first/checkpoint.pth epoch 1.  Continued into another folder,
    whose epochs do not improve on 30, the run writes no best.pth there: it says which file holds its best epoch,
    instead of ending with a folder without one, silently."""
    first = tmp_path / 'first'
    with monkeypatch.context() as patch:
        accuracies(patch, [30.0, 20.0, 10.0, 10.0, 10.0, 10.0, 10.0])
        assert _finetune(first, small['data'], '--resume', small['dense'], '--final_finetune', 2) == 0
        capsys.readouterr()
        for resumed, out in (('best.pth', tmp_path / 'b'), ('checkpoint.pth', tmp_path / 'c')):
            assert _finetune(out, small['data'], '--resume', first / resumed, '--final_finetune', 3) == 0
            assert not (out / 'best.pth').exists()
            assert (f'note: the best epoch so far of the run continued here (Acc@1 30.00%) is in {first / "best.pth"}: '
                    f'{out / "best.pth"} is written only when an epoch improves on it') in capsys.readouterr().out
        # the checkpoint copied alone into a folder of its own: the file that held the best epoch is not beside it
        (tmp_path / 'lone').mkdir()
        shutil.copy(first / 'checkpoint.pth', tmp_path / 'lone' / 'checkpoint.pth')
        out = tmp_path / 'd'
        assert _finetune(out, small['data'], '--resume', tmp_path / 'lone' / 'checkpoint.pth', '--final_finetune',
                         3) == 0
        assert (f'note: the best epoch so far of the run continued here (Acc@1 30.00%) was saved beside it as '
                f'{tmp_path / "lone" / "best.pth"}, which is not there now: {out / "best.pth"} is written only when '
                f'an epoch improves on it') in capsys.readouterr().out


def test_a_run_continued_into_another_folder_says_to_give_that_folder_again(capsys, monkeypatch, small, tmp_path):
    """Continued from a best.pth into a new --output_dir and stopped in its first epoch: the command printed names
    --output_dir too (--resume of a best.pth alone is refused, and a checkpoint.pth alone writes into its own
    folder)."""
    first = tmp_path / 'first'
    with monkeypatch.context() as patch:
        accuracies(patch, [10.0])
        assert _finetune(first, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        patch.setattr(engine, 'train_one_epoch', interrupted)
        capsys.readouterr()
        assert _finetune(out, small['data'], '--resume', first / 'best.pth', '--final_finetune', 2) == 130
    assert capsys.readouterr().err.strip() == (
        f'interrupted; the last complete checkpoint is {first / "best.pth"} (epoch 0); continue with --resume '
        f'{first / "best.pth"} --output_dir {out}')


def test_resume_of_a_finished_run_does_nothing(capsys, monkeypatch, small, tmp_path):
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    before = {name: (out / name).read_bytes() for name in ('checkpoint.pth', 'best.pth', 'log.txt')}
    best_file = os.stat(out / 'best.pth').st_ino  # (its epoch 0 is the best: a copy of checkpoint.pth, same bytes)
    (out / '.checkpoint.pth.tmp-999999').write_bytes(b'half of a checkpoint')  # a job killed while saving
    capsys.readouterr()

    def no_work(*args):
        raise AssertionError('a finished run built its data, model and teacher')

    monkeypatch.setattr(finetune, 'build_training', no_work)
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 1) == 0
    said = capsys.readouterr().out
    assert f"Nothing to do: 1 epoch already finished in {out / 'checkpoint.pth'} (--final_finetune 1)" in said
    assert 'was not written after epoch' not in said  # best.pth is there: not copied again from the checkpoint
    assert {name: (out / name).read_bytes() for name in before} == before
    assert os.stat(out / 'best.pth').st_ino == best_file
    assert leftovers(out) == []  # the resume cleaned up the stale temporary file


def test_a_second_run_in_the_folder_of_a_run_still_running_is_refused(capsys, monkeypatch, small, tmp_path):
    """A run started in the --output_dir of one that still runs (the same command twice, a job requeued while the
    first still runs) is one error line: it neither continues that run's checkpoint.pth nor starts afresh beside
    its first file, and leaves the temporary file of the checkpoint that run is saving."""
    import fcntl
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    before = {name: (out / name).read_bytes() for name in ('checkpoint.pth', 'best.pth', 'log.txt')}
    saving = out / f'.checkpoint.pth.tmp-{os.getppid()}'  # (the first run's, halfway through its next save)
    saving.write_bytes(b'half of a checkpoint')
    fresh = tmp_path / 'fresh'
    fresh.mkdir()
    held = [os.open(folder, os.O_RDONLY) for folder in (out, fresh)]  # the first runs, still running
    try:
        for folder in held:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 2
        err = capsys.readouterr().err
        assert err == (f'error: {out} is in use by another finetuning run, still running there (its checkpoints and '
                       f'log would be written over); wait for it to end or choose another --output_dir\n')
        assert _finetune(fresh, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 2
        assert f'error: {fresh} is in use by another finetuning run' in capsys.readouterr().err
    finally:
        for folder in held:
            os.close(folder)
    assert {name: (out / name).read_bytes() for name in before} == before
    assert saving.exists() and os.listdir(fresh) == []


def test_a_folder_that_cannot_be_locked_is_finetuned_in_with_a_note(capsys, monkeypatch, small, tmp_path):
    """A file system without flock (some network ones: ENOLCK, EOPNOTSUPP) does not stop a run: the lock only
    guards against a second run, so the run goes on and a note says it is unguarded."""
    import errno
    from utils import checkpoint_io

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(checkpoint_io.fcntl, 'flock', no_locks)
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    said = capsys.readouterr().out
    assert (f'note: cannot lock {out} (No locks available): a second run started there meanwhile would not be '
            f'refused') in said
    assert (out / 'checkpoint.pth').is_file() and len((out / 'log.txt').read_text().splitlines()) == 1


def test_resume_of_a_finished_run_whose_teacher_is_gone_does_nothing(capsys, monkeypatch, small, tmp_path):
    """A finished distillation run reads no teacher: resumed after its --teacher-path was moved away, it says that
    nothing is left to do (it stopped in 'teacher checkpoint not found'); with an epoch left, the missing teacher is
    still one line, exit code 2."""
    out, teacher = tmp_path / 'out', tmp_path / 'teacher.pth'
    shutil.copy(small['dense'], teacher)
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1,
                     '--distillation-type', 'soft', '--teacher-path', teacher) == 0
    teacher.unlink()
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(finetune, 'build_training', lambda *args: pytest.fail('a finished run built its training'))
        assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 1) == 0
    captured = capsys.readouterr()
    assert (f"Nothing to do: 1 epoch already finished in {out / 'checkpoint.pth'} (--final_finetune 1)"
            in captured.out.splitlines()), captured
    assert captured.err == ''
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 2
    assert capsys.readouterr().err == (f'error: teacher checkpoint not found: {teacher} (--teacher-path of the run '
                                       f"{out / 'checkpoint.pth'} continues; give --teacher-path to change it)\n")
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


@pytest.mark.parametrize('run', ['continued', 'already-finished', 'new', 'eval', 'speed-only', 'prune'])
def test_the_resume_file_is_read_once(monkeypatch, small, tmp_path, run):
    """Start-up reads --resume once and passes its contents on: a finetuning run read it up to five times (the
    settings of the run it continues, whether that run was finished, whether the file is the folder's own, whether
    it is readable, and the model), the other commands twice.  The teacher and best.pth (which a resume checks)
    are files of their own."""
    from utils import checkpoint_io
    out, teacher = tmp_path / 'out', tmp_path / 'teacher.pth'
    shutil.copy(small['dense'], teacher)
    distil = ['--distillation-type', 'soft', '--teacher-path', teacher]
    if run in ('continued', 'already-finished'):
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1, *distil) == 0
    resume = out / 'checkpoint.pth' if run in ('continued', 'already-finished') else tmp_path / 'dense.pth'
    if run not in ('continued', 'already-finished'):
        shutil.copy(small['dense'], resume)
    reads = []
    real = checkpoint_io._torch_load

    def counted(path, mmap):
        reads.append(os.path.realpath(path))
        return real(path, mmap)

    monkeypatch.setattr(checkpoint_io, '_torch_load', counted)
    if run in ('continued', 'already-finished', 'new'):
        code = _finetune(out, small['data'], '--resume', resume, *distil,
                         '--final_finetune', 2 if run == 'continued' else 1)
    else:
        flags = {'eval': ['--eval', '--data-path', small['data']], 'speed-only': ['--speed-only', '--speed-repeats', 1],
                 'prune': ['--prune', '--prune_mode', 'random', '--prune_rate', 0.3, '--data-path', small['data']]}
        code = finetune.main([*DIGITS_ARGS, '--resume', str(resume), *map(str, flags[run])])
    assert code == 0
    assert reads.count(os.path.realpath(resume)) == 1, reads
    assert set(reads) <= {os.path.realpath(p) for p in (resume, teacher, out / 'best.pth')}, reads
    if run in ('continued', 'new'):  # (a finished run builds no teacher)
        assert os.path.realpath(teacher) in reads


def test_resume_with_more_epochs_says_the_old_schedule_continues(capsys, small, tmp_path):
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    schedule = load_checkpoint_file(str(out / 'checkpoint.pth'))['lr_scheduler']
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f'warning: {out / "checkpoint.pth"} was written by a run of --final_finetune 1; its learning-rate ' \
           f'schedule over 1 epoch continues unchanged' in lines
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['lr_scheduler']['t_initial'] == schedule['t_initial']
    assert log_epochs(out / 'log.txt') == [0, 1]


def test_a_run_continued_twice_names_the_length_its_schedule_really_has(capsys, small, tmp_path):
    """The first continuation's --final_finetune 2 is recorded in the checkpoint's args, but the schedule it
    restored, and saved again, is still the first run's one epoch: a second continuation says so, not 2."""
    out = tmp_path / 'out'
    assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 2) == 0
    saved = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert saved['args']['final_finetune'] == 2 and saved['lr_scheduler']['t_initial'] == 1
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', out / 'checkpoint.pth', '--final_finetune', 3) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f'warning: {out / "checkpoint.pth"} was written by a run of --final_finetune 2; its learning-rate ' \
           f'schedule over 1 epoch continues unchanged' in lines
    assert log_epochs(out / 'log.txt') == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------
# kill during an epoch, then resume

def signal_during_an_epoch(tmp_path, final_finetune: int, epoch: int, sig, workers: int = 0, group: bool = False):
    """Run a finetune of about 30 steps per epoch in a subprocess and send it ``sig`` on the first progress
    line of ``epoch``, which comes after that epoch's first step: inside it, before its checkpoint.  ``group``:
    to its whole process group (its DataLoader workers too), as SLURM signals every process of a job.
    Returns (argv, output dir, return code, stdout, stderr)."""
    data = make_image_folder(tmp_path / 'data', classes=tuple('abcd'), per_class=(60, 4), size=(32, 32))
    dense = official_checkpoint(tmp_path / 'dense.pth', 'cc_deit_digits_patch4_32')
    out = tmp_path / 'out'
    argv = [*DIGITS_ARGS, '--data-path', data, '--output_dir', str(out), '--final_finetune', str(final_finetune),
            '--num_workers', str(workers)]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'finetune.py'), *argv, '--resume', dense],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                            cwd=tmp_path, start_new_session=group)
    watchdog = threading.Timer(240, proc.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f'Epoch: [{epoch}]'):
                if group:
                    os.killpg(proc.pid, sig)
                else:
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
@pytest.mark.parametrize('stop, said, code', [(KeyboardInterrupt, 'interrupted', 130),
                                               (finetune.Terminated, 'terminated (SIGTERM)', 143)])
def test_a_stop_before_the_first_epoch_says_the_resumed_file_is_as_it_was(stop, said, code, capsys, monkeypatch,
                                                                          small, tmp_path):
    """A run stopped while it restores its checkpoint (before any epoch) says no checkpoint was written and the file
    it resumes is as it was (not 'nothing was written', as if the run held nothing)."""
    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        accuracies(patch, [50.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    ckpt = out / 'checkpoint.pth'
    before = ckpt.read_bytes()

    def stopped(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(finetune, 'restore_training', stopped)
    capsys.readouterr()
    assert _finetune(out, small['data'], '--resume', ckpt, '--final_finetune', 2) == code
    assert capsys.readouterr().err == (f'{said}; no epoch had started, so no checkpoint was written ({ckpt} is as '
                                       f'it was)\n')
    assert ckpt.read_bytes() == before


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

@pytest.mark.slow
def test_sigterm_to_every_process_of_the_job_with_dataloader_workers_ends_with_one_line(tmp_path):
    # SLURM preempts a job by signalling all its processes: the DataLoader workers stop quietly and the main
    # process says what is kept (torch's workers died by the signal, reported as a failed worker: a traceback)
    _, out, code, _, stderr = signal_during_an_epoch(tmp_path, 3, 1, signal.SIGTERM, workers=2, group=True)
    ckpt = out / 'checkpoint.pth'
    assert (code, stderr) == (143, f'terminated (SIGTERM); the last complete checkpoint is {ckpt} (epoch 0); '
                                   f'continue with --resume {ckpt}\n')
    assert load_checkpoint_file(str(ckpt))['epoch'] == 0 and leftovers(out) == []


STOPPED_WHILE_WORKERS_START = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import finetune
    forks = []

    def after_fork():  # the signal while the DataLoader forks its first worker (callbacks swallow exceptions)
        forks.append(1)
        if len(forks) == 1:
            os.kill(os.getpid(), int(sys.argv[2]))

    os.register_at_fork(after_in_parent=after_fork)
    sys.exit(finetune.main(sys.argv[3:]))
''')


@pytest.mark.slow
@pytest.mark.parametrize('sig, code, said', [(signal.SIGTERM, 143, 'terminated (SIGTERM)'),
                                             (signal.SIGINT, 130, 'interrupted')], ids=['sigterm', 'ctrl-c'])
def test_a_stop_while_dataloader_workers_start_is_not_lost(tmp_path, sig, code, said):
    world = digits_world(tmp_path)
    script = tmp_path / 'stopped.py'
    script.write_text(STOPPED_WHILE_WORKERS_START)
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, str(script), ROOT, str(int(sig)), *DIGITS_ARGS, '--resume',
                           world['dense'], '--data-path', world['data'], '--output_dir', str(out),
                           '--final_finetune', '2', '--num_workers', '1'],
                          capture_output=True, text=True, env=subprocess_env(), timeout=240)
    assert (proc.returncode, proc.stderr) == (code, f'{said}; no epoch had finished, so no checkpoint was '
                                                    f'written\n'), proc.stdout[-2000:]
    assert not out.exists()


SIGNALLED_TWICE = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import torch.utils.data.dataloader as dataloader
    import engine, finetune
    Iter = dataloader._MultiProcessingDataLoaderIter
    real_train, real_next, real_shutdown = engine.train_one_epoch, Iter._next_data, Iter._shutdown_workers
    real_kept, second, where = finetune._what_is_kept, int(sys.argv[2]), sys.argv[3]
    state = {}

    def train_one_epoch(*args, **kwargs):
        state['armed'] = kwargs.get('epoch', args[5] if len(args) > 5 else None) == 1
        return real_train(*args, **kwargs)

    def next_data(self):  # Ctrl-C at epoch 1's first batch
        if state.pop('armed', False):
            state['stopping'] = True
            os.kill(os.getpid(), signal.SIGINT)
        return real_next(self)

    def shutdown_workers(self):  # the second signal as the stop shuts the DataLoader workers down
        if where == 'shutdown' and state.pop('stopping', False):
            os.kill(os.getpid(), second)
        return real_shutdown(self)

    def what_is_kept(e):  # or as main reports the stop, before its line
        if where == 'line' and state.pop('stopping', False):
            os.kill(os.getpid(), second)
        return real_kept(e)

    engine.train_one_epoch = train_one_epoch
    Iter._next_data, Iter._shutdown_workers, finetune._what_is_kept = next_data, shutdown_workers, what_is_kept
    sys.exit(finetune.main(sys.argv[4:], ends_process=True))  # (as finetune.py run as a script)
''')


@pytest.mark.slow
@pytest.mark.parametrize('second, where', [(signal.SIGINT, 'shutdown'), (signal.SIGTERM, 'shutdown'),
                                           (signal.SIGTERM, 'line')], ids=['ctrl-c', 'sigterm', 'sigterm-before-line'])
def test_a_second_signal_while_the_run_stops_prints_no_traceback(tmp_path, second, where):
    """Ctrl-C, then a second Ctrl-C (or torchrun's SIGTERM after it) as the stopping run shuts its DataLoader
    workers down or as main reports the stop: the second raised again there ('Exception ignored in ... __del__' and
    a traceback, or a traceback from main), or SIGTERM ended the process by the signal.  Now the run ends as the
    first stop does: its one line saying what is kept, exit 130, the last checkpoint complete."""
    world = digits_world(tmp_path)
    script = tmp_path / 'twice.py'
    script.write_text(SIGNALLED_TWICE)
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, str(script), ROOT, str(int(second)), where, *DIGITS_ARGS, '--resume',
                           world['dense'], '--data-path', world['data'], '--output_dir', str(out),
                           '--final_finetune', '2', '--num_workers', '1'],
                          capture_output=True, text=True, env=subprocess_env(), timeout=240)
    ckpt = out / 'checkpoint.pth'
    assert (proc.returncode, proc.stderr) == (130, f'interrupted; the last complete checkpoint is {ckpt} (epoch 0); '
                                                   f'continue with --resume {ckpt}\n'), proc.stdout[-2000:]
    assert load_checkpoint_file(str(ckpt))['epoch'] == 0 and log_epochs(out / 'log.txt') == [0]
    assert leftovers(out) == []


def test_a_signal_swallowed_on_its_way_leaves_the_next_one_to_stop_the_run(monkeypatch):
    """A SIGTERM that lands in a ``__del__`` (which swallows what it raises) stopped nothing: the next one stops the
    run, not taken for a second signal of a stop under way (which raises nothing)."""
    swallowed = []
    monkeypatch.setattr(sys, 'unraisablehook', lambda unraisable: swallowed.append(unraisable.exc_type))

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(finetune.Terminated):
        with sigterm_unwinds():
            Finalised()  # (freed at once)
            assert swallowed == [finetune.Terminated]
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError('the second SIGTERM raised nothing')


def test_the_first_of_two_signals_held_while_dataloader_workers_start_stops_the_run():
    """Ctrl-C, then torchrun's SIGTERM after it, both while a DataLoader starts its workers (where a stop is held to
    its end): the SIGTERM replaced the held Ctrl-C (the run ended as terminated, 143).  Now the first signal stops
    the run, as it does everywhere else."""
    with pytest.raises(KeyboardInterrupt):
        with sigterm_unwinds():
            with sigterm_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_between_the_two_handlers_put_back_leaves_both_put_back(monkeypatch):
    """Leaving sigterm_unwinds puts SIGTERM's handler back, then Ctrl-C's: a Ctrl-C landing between the two went to
    the stop handler still on SIGINT, whose exception skipped putting SIGINT's back, so a later Ctrl-C in the caller
    went to a handler of a context long left.  Now both are put back whatever lands in between."""
    real_signal = signal.signal

    def swap(signum, handler):
        before = real_signal(signum, handler)
        if signum == signal.SIGTERM and handler is mine:  # SIGTERM's own put back: a Ctrl-C lands now
            os.kill(os.getpid(), signal.SIGINT)
        return before

    def mine(signum, frame):
        pass

    previous = real_signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(signal, 'signal', swap)
        with pytest.raises(KeyboardInterrupt):
            with sigterm_unwinds():
                pass
        monkeypatch.undo()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        real_signal(signal.SIGTERM, previous)


@pytest.mark.parametrize('first, then, stop', [(signal.SIGTERM, signal.SIGINT, finetune.Terminated),
                                               (signal.SIGINT, signal.SIGTERM, KeyboardInterrupt)],
                         ids=['sigterm-then-ctrl-c', 'ctrl-c-then-sigterm'])
def test_the_signals_after_a_stop_end_it_as_the_first_one_did(first, then, stop):
    """While a stop unwinds, a second signal raises nothing into it, and a third ends it (in-process: raises
    for the caller) as the first signal did, whatever the later ones are: a SIGTERM stop stays a SIGTERM stop."""
    second_raised_nothing, ended = False, []
    with sigterm_unwinds():
        try:
            os.kill(os.getpid(), first)
            raise AssertionError('the first signal raised nothing')
        except (finetune.Terminated, KeyboardInterrupt) as e:
            assert isinstance(e, stop)
            os.kill(os.getpid(), then)
            second_raised_nothing = True
            try:
                os.kill(os.getpid(), then)
            except BaseException as third:  # (KeyboardInterrupt kept from pytest's own handling)
                ended.append(third)
    assert second_raised_nothing and len(ended) == 1, ended
    assert isinstance(ended[0], stop), ended


@pytest.mark.parametrize('sig, stop', [(signal.SIGTERM, finetune.Terminated), (signal.SIGINT, KeyboardInterrupt)],
                         ids=['sigterm', 'ctrl-c'])
def test_a_stop_held_while_workers_start_is_under_way_once_it_is_raised(sig, stop):
    """Under a run, a signal while DataLoader workers start lets that step finish, and is raised on the way out as
    a stop like any other: torchrun's SIGTERM after it raises nothing into its unwinding."""
    finished, second_raised_nothing = [], False
    with sigterm_unwinds():
        try:
            with sigterm_held():
                os.kill(os.getpid(), sig)
                finished.append('the held step')
            raise AssertionError('the held signal was not raised')
        except (finetune.Terminated, KeyboardInterrupt) as e:
            assert isinstance(e, stop)
            os.kill(os.getpid(), signal.SIGTERM)
            second_raised_nothing = True
    assert finished == ['the held step'] and second_raised_nothing


def test_a_ctrl_c_held_under_pythons_own_handler_is_raised_on_the_way_out_and_the_handler_put_back():
    """Outside a run (prune's and eval's DataLoaders are made under Python's own handler too) a Ctrl-C while the
    workers start lets the step finish, is raised as KeyboardInterrupt once it has, and Python's handler is back."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finished = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with sigterm_held():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append('the held step')
        assert finished == ['the held step']
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with sigterm_held():
            pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_callers_own_ctrl_c_handler_is_left_to_it_during_a_run():
    """sigterm_unwinds takes over Ctrl-C only where Python's own handler has it: a caller's own (a notebook's, a
    scheduler wrapper's) is left in place during the run and after it."""
    got = []

    def mine(signum, frame):
        got.append(signum)

    previous = signal.signal(signal.SIGINT, mine)
    try:
        try:
            with sigterm_unwinds():
                os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            raise AssertionError("the run took Ctrl-C over from the caller's own handler") from None
        assert got == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_dataloader_worker_stops_quietly_on_sigterm_and_on_ctrl_c():
    """A worker (forked with the run's handlers, or sigterm_held's Ctrl-C handler that only notes the signal) gets
    SIGTERM and Ctrl-C raised as KeyboardInterrupt, on which torch's worker loop returns."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        noted = []
        for sig in (signal.SIGTERM, signal.SIGINT):  # (the handlers the worker was forked with)
            signal.signal(sig, lambda signum, frame: noted.append(signum))
        worker_stops_quietly_on_sigterm(0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)
        assert noted == []
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_a_run_in_another_thread_leaves_the_signal_handlers_to_the_main_thread():
    """Python lets only the main thread set signal handlers: a run in another thread (a notebook's or a server's
    worker calling main) goes on without them, and the main thread's handlers stay as they are."""
    handlers = (signal.SIGTERM, signal.SIGINT)
    before, errors = [signal.getsignal(s) for s in handlers], []

    def run():
        try:
            with sigterm_unwinds():
                with sigterm_held():
                    pass
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert errors == [] and [signal.getsignal(s) for s in handlers] == before


ENDED_BY_END_SCRIPT = textwrap.dedent('''
    import atexit, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from utils.signals import end_script
    code, sig = int(sys.argv[2]), int(sys.argv[3])
    sys.stdout = open(1, 'w', closefd=False)  # block-buffered, as a pipe is without PYTHONUNBUFFERED
    print('the last line, unflushed', end='')  # (held in the buffer)

    def shutting_down():  # the interpreter's shutdown: a further signal lands here (sig 0: nothing is sent)
        print('shutdown ran', flush=True)
        if sig:
            os.kill(os.getpid(), sig)
    atexit.register(shutting_down)
    end_script(code)
''')


@pytest.mark.parametrize('code, sig', [(130, signal.SIGINT), (143, signal.SIGTERM), (0, 0), (2, 0)],
                         ids=['ctrl-c', 'sigterm', 'success', 'user-error'])
def test_a_script_stopped_by_a_signal_ends_at_once_and_any_other_through_the_interpreters_shutdown(tmp_path, code,
                                                                                                    sig):
    """end_script, the last call of each script: main's exit code of a stop (130, 143) ends the process at once,
    without the interpreter's shutdown (its atexit handlers), where a further signal (Python's handlers back) would
    print a traceback or end the process by the signal; any other code goes through sys.exit, the shutdown run."""
    script = tmp_path / 'ended.py'
    script.write_text(ENDED_BY_END_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), ROOT, str(code), str(int(sig))], capture_output=True,
                          text=True, env=subprocess_env(), timeout=120)
    stopped = code in (130, 143)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        code, 'the last line, unflushed' + ('' if stopped else 'shutdown ran\n'), ''), proc


SIGNALLED_TWICE_IN_PROCESS = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import finetune
    from utils import signals
    real_kept, real_said, where = finetune._what_is_kept, signals.stop_said, sys.argv[2]

    def run(args):  # Ctrl-C as the run works
        os.kill(os.getpid(), signal.SIGINT)

    def what_is_kept(e):  # a second as main reports the stop
        if where == 'line':
            os.kill(os.getpid(), signal.SIGINT)
        return real_kept(e)

    def stop_said():  # or once its line is out
        real_said()
        if where == 'after':
            os.kill(os.getpid(), signal.SIGINT)

    finetune.run, finetune._what_is_kept, signals.stop_said = run, what_is_kept, stop_said
    try:
        print('main returned', finetune.main([]))
    except KeyboardInterrupt:
        print('the caller has the KeyboardInterrupt')
    finally:
        print('the caller goes on')
''')


@pytest.mark.parametrize('where', ['line', 'after'])
def test_a_second_signal_while_an_in_process_main_stops_is_the_callers_not_its_process_end(tmp_path, where):
    """main() called in-process (a test, a script, a notebook) by a program of its own: a second Ctrl-C while the
    run stops ended the caller's whole process (os._exit, 130: no finally, unwritten files lost, a notebook's kernel
    gone).  Now the caller gets a KeyboardInterrupt, after main's one line."""
    script = tmp_path / 'caller.py'
    script.write_text(SIGNALLED_TWICE_IN_PROCESS)
    proc = subprocess.run([sys.executable, str(script), ROOT, where], capture_output=True, text=True,
                          env=subprocess_env(), timeout=240)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, 'the caller has the KeyboardInterrupt\nthe caller goes on\n', 'interrupted; nothing was written\n')


def test_a_test_run_started_with_ctrl_c_ignored_gives_its_runs_ctrl_c_back():
    """A shell without job control (a script's `make test &`, nohup) starts the suite with SIGINT ignored, which
    every process it starts inherits: the runs the signal tests send Ctrl-C to then ignored it, rightly, and those
    tests failed.  The test session (conftest) puts Python's handler back, so that its runs start with Ctrl-C at its
    default, as under a terminal."""
    check = textwrap.dedent('''
        import signal, subprocess, sys
        print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)
        sys.path.insert(0, sys.argv[1])
        import conftest
        print(subprocess.run([sys.executable, '-c', 'import signal; print(signal.getsignal(signal.SIGINT) is '
                              'signal.default_int_handler)'], capture_output=True, text=True).stdout.strip())
    ''')
    proc = subprocess.run([sys.executable, '-c', check, os.path.join(ROOT, 'tests')], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (proc.returncode, proc.stdout) == (0, 'True\nTrue\n'), proc.stderr


def test_main_puts_the_previous_sigterm_handler_back(small, tmp_path):
    """After a refused run and after one that did its work (main is also called in-process, by tests and
    scripts)."""
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert finetune.main(['--eval', '--device', 'cpu', '--resume', str(tmp_path / 'missing.pth')]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
        assert finetune.main([*DIGITS_ARGS, '--resume', str(small['dense']), '--speed-only', '--speed-repeats', '1',
                              '--speed-warmup', '0']) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_reads_the_ema_weights_as_it_reads_the_model_weights(capsys, monkeypatch, small, tmp_path):
    """The EMA of a finetuning checkpoint is read like its model weights: wrapper prefixes (a file written from a
    DistributedDataParallel or compiled EMA) stripped and restored exactly; NaN weights refused in one line."""
    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        accuracies(patch, [50.0])
        assert _finetune(out, small['data'], '--resume', small['dense'], '--final_finetune', 1) == 0
    written = load_checkpoint_file(str(out / 'checkpoint.pth'))
    restored = []

    def epochs(run, start_epoch, end_epoch, max_accuracy, *rest, **kwargs):
        restored.append({k: v.clone() for k, v in run.model_ema.module.state_dict().items()})
        return max_accuracy

    monkeypatch.setattr(engine, 'train_epochs', epochs)
    prefixed = dict(written, model_ema={f'module.{k}': v for k, v in written['model_ema'].items()})
    torch.save(prefixed, tmp_path / 'prefixed.pth')
    assert _finetune(tmp_path / 'next', small['data'], '--resume', tmp_path / 'prefixed.pth',
                     '--final_finetune', 2) == 0
    assert restored[0].keys() == written['model_ema'].keys()
    assert all(torch.equal(restored[0][k], v) for k, v in written['model_ema'].items())
    broken = dict(written, model_ema={**written['model_ema'], 'head.bias': torch.full_like(
        written['model_ema']['head.bias'], float('nan'))})
    torch.save(broken, tmp_path / 'broken.pth')
    capsys.readouterr()
    assert _finetune(tmp_path / 'again', small['data'], '--resume', tmp_path / 'broken.pth',
                     '--final_finetune', 2) == 2
    err = capsys.readouterr().err
    assert err == (f'error: {tmp_path / "broken.pth"} (model_ema): head.bias holds NaN or infinite values, weights '
                   f'that compute nothing (written by a run that diverged?)\n')
    assert len(restored) == 1
