"""Two processes on CPU (gloo) under the paper's `python -m torch.distributed.launch --use_env` and under
torchrun: pruning plans identical masks on every rank and the same masks when run again, finetuning averages its
metrics over the processes, scales the learning rate by the world size, only rank 0 writes, and a job stopped
by SIGTERM and resumed ends with the weights of the uninterrupted job, bit for bit, with and without DataLoader
workers.  Most commands run one after another in a single job (tests/distributed_job.py)."""
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import finetune
import pruning
from conftest import (DIGITS_ARGS, ROOT, digits_world, free_port, launched, official_checkpoint, run_process_tree,
                      subprocess_env)
from utils import load_checkpoint_file

TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
LAUNCHERS = {
    'launch': [sys.executable, '-m', 'torch.distributed.launch', '--use_env'],  # the paper's command
    'run': [sys.executable, '-m', 'torch.distributed.run'],
    'torchrun': [TORCHRUN],  # the console script
}


def launch(launcher, argv, cwd, nproc=2, timeout=300):
    if launcher == 'torchrun' and not os.path.exists(TORCHRUN):
        pytest.skip(f'no torchrun script next to {sys.executable}')
    cmd = [*LAUNCHERS[launcher], f'--nproc_per_node={nproc}', f'--master_port={free_port()}',
           os.path.join(ROOT, 'finetune.py'), *DIGITS_ARGS, *map(str, argv)]
    return run_process_tree(cmd, timeout, env=subprocess_env(), cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    world = digits_world(tmp_path_factory.mktemp('dist'))
    # 17 validation images: two processes cannot split them evenly, so --dist-eval must split them exactly (a
    # padded sampler, DeiT's DistributedSampler, would evaluate one image twice and divide by 18)
    pixels = np.random.default_rng(17).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(world['data'], 'val', 'a', 'extra.png'))
    world['dense48'] = official_checkpoint(world['base'] / 'dense48.pth', 'cc_deit_digits_patch4_32', img_size=48)
    return world


# ----------------------------------------------------------------------------------------------------------
# one job of two processes running --prune and finetuning (not slow: `make test` runs it too, so the
# checks that only several processes can make, the all-reduce of the scores and the learning rate scaled by the
# world size, are in the fast set)

JOB = os.path.join(ROOT, 'tests', 'distributed_job.py')
# every augmentation on (Python's random, numpy and torch all draw), drop-path, EMA; explicit schedule
AUGMENTED = ['--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
             '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9', '--seed', '7', '--lr', '5e-4',
             '--warmup-epochs', '1', '--final_finetune', '2']


def write_commands(commands, cwd):
    """commands.json for tests/distributed_job.py: ``commands`` ({'argv', 'sigterm_at_epoch',
    'sigkill_rank_at_epoch'}) on the small world's flags; returns its path."""
    path = os.path.join(str(cwd), 'commands.json')
    with open(path, 'w') as f:
        json.dump([{'argv': [*DIGITS_ARGS, *map(str, c['argv'])], 'sigterm_at_epoch': c.get('sigterm_at_epoch'),
                    'sigkill_rank_at_epoch': c.get('sigkill_rank_at_epoch')} for c in commands], f)
    return path


def exit_codes(stdout):
    """{command index: [exit code of rank 0, of rank 1]} from the job's ``@@ command`` lines."""
    codes = {}
    for rank, i, code in re.findall(r'^\[rank (\d)\] @@ command (\d+) exit (-?\d+)$', stdout, re.M):
        codes.setdefault(int(i), [None, None])[int(rank)] = int(code)
    return codes


def launch_job(launcher, commands, cwd, timeout=400):
    """Run ``commands`` one after another in one job of two processes; returns (completed process, {command index:
    [exit code of rank 0, of rank 1]})."""
    cmd = [*LAUNCHERS[launcher], '--nproc_per_node=2', f'--master_port={free_port()}', JOB,
           write_commands(commands, cwd)]
    proc = run_process_tree(cmd, timeout, env=subprocess_env(), cwd=cwd)
    return proc, exit_codes(proc.stdout)


def prune_argv(world, out, workers):
    # 48x48 input: the training crops are timm's, which draw from Python's random
    return ['--prune', '--prune_rate', '0.3', '--input-size', '48', '--resume', world['dense48'],
            '--data-path', world['data'], '--output_dir', out, '--num_workers', workers, '--seed', '7']


def finetune_argv(world, out, workers, *extra):
    return ['--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
            '--num_workers', workers, *AUGMENTED, *extra]


def fast_eval_argv(world, base, *extra):
    return ['--eval', '--resume', base / 'prune0a' / 'pruned_0.3.pth', '--input-size', '48', '--data-path',
            world['data'], '--batch-size', '4', *extra, '--fast-path', 'torch']


FINETUNE_EXTRA = {0: ['--dist-eval', '--no-repeated-aug'], 2: ['--repeated-aug']}  # both samplers of several processes


@pytest.fixture(scope='module')
def job(world):
    """Under the paper's launcher: the same --prune twice without and twice with DataLoader workers, then for
    workers 0 and 2 a two-epoch finetune and the same finetune stopped by SIGTERM as epoch 1 starts; then --eval of
    the first pruned file through the fast path, without and with --dist-eval, and the fast path with finetuning."""
    base = world['base'] / 'job'
    base.mkdir()
    commands = [{'argv': prune_argv(world, base / f'prune{w}{run}', w)} for w in (0, 2) for run in 'ab']
    commands += [{'argv': finetune_argv(world, base / f'ref{w}', w, *FINETUNE_EXTRA[w])} for w in (0, 2)]
    commands += [{'argv': finetune_argv(world, base / f'cut{w}', w, *FINETUNE_EXTRA[w]), 'sigterm_at_epoch': 1}
                 for w in (0, 2)]
    # the first pruned file evaluated through the fast path, without and with --dist-eval; the path with finetuning
    commands += [{'argv': fast_eval_argv(world, base, *extra)} for extra in ([], ['--dist-eval'])]
    commands += [{'argv': ['--resume', world['dense'], '--data-path', world['data'], '--output_dir', base / 'fast_ft',
                           '--fast-path', 'torch']}]
    # a finetune in a folder another run holds (this process, for the job's length): refused by every rank
    commands += [{'argv': finetune_argv(world, base / 'held', 0)}]
    (base / 'held').mkdir()
    held = os.open(base / 'held', os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc, codes = launch_job('launch', commands, base)
    finally:
        os.close(held)
    assert 'torch.distributed.launch is deprecated' in proc.stderr  # it warns, and runs
    assert codes == {**{i: [0, 0] for i in range(6)}, 6: [143, 143], 7: [143, 143], 8: [0, 0], 9: [0, 0],
                     10: [2, 2], 11: [2, 2]}, proc.stdout[-3000:] + proc.stderr[-3000:]
    shutil.copytree(base / 'cut0', base / 'cut0_stopped')  # as stopped, for a test that damages it
    return {'base': base, 'stdout': proc.stdout, 'stderr': proc.stderr}


def command_output(job, i):
    """The lines command ``i`` of the job printed (rank 0's and the per-rank ones)."""
    starts = [0] + [m.end() for m in re.finditer(r'^\[rank 0\] @@ command \d+ exit -?\d+\n', job['stdout'], re.M)]
    return job['stdout'][starts[i]:starts[i + 1]]


def test_prune_with_two_processes_plans_the_same_masks_on_every_rank(world, job):
    stdout = command_output(job, 0)
    out = job['base'] / 'prune0a'
    digests = dict(re.findall(r'^\[rank (\d)\] masks sha1 ([0-9a-f]{40})$', stdout, re.M))
    assert set(digests) == {'0', '1'}, stdout
    # Each rank scored its own half of the training set; the summed scores give both the same plan.
    assert digests['0'] == digests['1']
    # rank 0 alone wrote the pruned checkpoint, and it holds exactly those masks
    assert stdout.count('Saved ') == 1
    assert sorted(os.listdir(out)) == ['prune_attn_0.3', 'prune_log.txt', 'pruned_0.3.pth']
    assert len((out / 'prune_log.txt').read_text().splitlines()) == 1
    assert len(os.listdir(out / 'prune_attn_0.3')) == 1  # one TensorBoard events file
    ckpt = load_checkpoint_file(str(out / 'pruned_0.3.pth'))
    masks = [ckpt['model'][f'blocks.{l}.attn.token_index'] for l in range(6)]
    assert finetune.masks_sha1(masks) == digests['0']
    assert ckpt['channels'] == [int(m.sum()) for m in masks]
    # the stored (all-reduced) scores are what the masks were planned from, at the requested rate
    plan = pruning.plan_masks(ckpt['scores'], 0.3)
    assert int((~plan).sum()) == int(144 * 6 * 0.3)
    model = timm.create_model('cc_deit_digits_patch4_32', img_size=48)
    pruning.apply_masks(model, plan)
    assert finetune.masks_sha1(model.masks) == digests['0']


@pytest.mark.parametrize('workers', [0, 2])
def test_the_same_prune_with_two_processes_gives_the_same_scores_and_masks(job, workers):
    a, b = (load_checkpoint_file(str(job['base'] / f'prune{workers}{run}' / 'pruned_0.3.pth')) for run in 'ab')
    assert torch.equal(a['scores'], b['scores'])
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'] if k.endswith('token_index'))


def test_finetune_with_two_processes_scales_the_lr_and_only_rank_0_writes(world, job, capsys):
    stdout = command_output(job, 4)
    out = job['base'] / 'ref0'
    # (but the job's last commands': the fast path refused with finetuning, test_eval_through_the_fast_path_...,
    # and a folder held by another run, test_a_folder_another_run_holds_...)
    assert not re.search(r'^\[rank \d\] error(?!: --fast-path is an inference path|: \S+held is in use)',
                         job['stderr'], re.M)
    # rank 0 prints and writes; the learning rate is scaled by batch 8 x 2 processes
    lr = 5e-4 * 8 * 2 / 512  # --lr 5e-4 (AUGMENTED) scaled by batch 8 x 2 processes
    assert stdout.count('Finetuning for epochs 0..1') == 1
    assert f'(lr {lr:.2e} for batch 8 x 2 processes)' in stdout
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.startswith('events.out.tfevents')] == ['best.pth', 'checkpoint.pth', 'log.txt']
    assert len(names) == 4  # one TensorBoard file: rank 0's
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    ckpt = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert ckpt['epoch'] == 1 and ckpt['args']['world_size'] == 2 and ckpt['args']['scaled_lr'] == pytest.approx(lr)
    assert ckpt['args']['lr'] == 5e-4  # the base lr as given, so a continued run does not scale it again
    assert len(ckpt['rng']) == 2  # each process's random streams
    # --dist-eval: the processes evaluated 9 and 8 of the 17 images; the sums give the single-process figures
    assert 'Accuracy of the network on the 17 test images' in stdout
    code = finetune.main([*DIGITS_ARGS, '--eval', '--resume', str(out / 'checkpoint.pth'),
                          '--data-path', world['data'], '--dist-eval'])
    single = capsys.readouterr().out
    assert code == 0
    # --dist-eval splits the evaluation of several processes; in a single process it is said to have no effect
    assert 'note: --dist-eval has no effect: a single process evaluates every image' in single.splitlines()
    assert 'no effect: a single process' not in stdout
    acc1, acc5, loss = map(float, re.search(r'\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)', single).groups())
    # (printed to 3 decimals; a padded split, 18 images' counts over 17, would miss unless none or all are right)
    assert records[-1]['test_acc1'] == pytest.approx(acc1, abs=5.1e-4)
    assert records[-1]['test_acc5'] == pytest.approx(acc5, abs=5.1e-4)
    assert records[-1]['test_loss'] == pytest.approx(loss, abs=1e-3)


def test_eval_through_the_fast_path_with_two_processes_gives_the_single_process_figures(world, job, capsys):
    """--eval --fast-path torch under the launcher, each process evaluating every image and (--dist-eval) 9 and 8
    of the 17: rank 0 alone prints, once, the figures of one process's eager evaluation of the same file; the path
    with finetuning is refused in one line per process, exit 2 from each, before any work."""
    figures = []
    for i in (8, 9):
        stdout = command_output(job, i)
        assert re.findall(r'^(?!\[rank 1\] @@ )\[rank 1\]', stdout, re.M) == [], stdout  # rank 1 prints nothing
        assert stdout.count('Fast path (torch): ') == 1, stdout
        assert stdout.count('Accuracy of the network on the 17 test images') == 1, stdout
        figures.append(re.findall(r'^\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)$', stdout, re.M))
    argv = [*DIGITS_ARGS, *map(str, fast_eval_argv(world, job['base']))][:-2]  # eager, one process
    assert argv[-2:] == ['--batch-size', '4']
    code = finetune.main(argv)
    single = capsys.readouterr().out
    assert code == 0
    eager = re.findall(r'^\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)$', single, re.M)
    assert len(eager) == 1 and all(len(f) == 1 for f in figures), (figures, eager)
    # the same top-1 and top-5; the loss to its printed 3 decimals (the path sums in another order)
    for (acc1, acc5, loss), in figures:
        assert (acc1, acc5) == eager[0][:2] and float(loss) == pytest.approx(float(eager[0][2]), abs=1.1e-3)
    for rank in (0, 1):
        assert job['stderr'].count(f'[rank {rank}] error: --fast-path is an inference path: use it with --eval or '
                                   f'--speed-only\n') == 1, job['stderr'][-3000:]
    assert not re.search(r'^\[rank\d\]: Traceback', job['stderr'], re.M), job['stderr'][-3000:]
    assert not (job['base'] / 'fast_ft').exists()


def test_a_folder_another_run_holds_is_refused_by_every_process(job):
    """A finetune under the launcher in an --output_dir that another run holds: rank 0 cannot take the folder, and
    every process stops with the same one line, exit 2 (the others waited for rank 0 at their first collective, and
    ended in a lost peer), before any work; the folder is left as it was."""
    held = job['base'] / 'held'
    for rank in (0, 1):
        assert job['stderr'].count(f'[rank {rank}] error: {held} is in use by another finetuning run, still running '
                                   f'there (its checkpoints and log would be written over); wait for it to end or '
                                   f'choose another --output_dir\n') == 1, job['stderr'][-3000:]
    assert 'Finetuning for epochs' not in command_output(job, 11) and os.listdir(held) == []


@pytest.mark.slow
@pytest.mark.parametrize('workers, launcher', [(0, 'torchrun'), (2, 'run')])
def test_two_processes_stopped_and_resumed_equal_the_uninterrupted_run_bit_for_bit(world, job, workers, launcher):
    cut, ref = job['base'] / f'cut{workers}', job['base'] / f'ref{workers}'
    stopped = command_output(job, 6 if workers == 0 else 7)
    assert 'Epoch: [1]' not in stopped
    # each process of the two stopped jobs says which checkpoint is the last complete one
    for w in (0, 2):
        line = (f'terminated (SIGTERM); the last complete checkpoint is {job["base"] / f"cut{w}" / "checkpoint.pth"} '
                f'(epoch 0)')
        assert job['stderr'].count(line) == 2, job['stderr'][-3000:]
    first = load_checkpoint_file(str(cut / 'checkpoint.pth'))
    assert first['epoch'] == 0
    # --seed not repeated (no workers), or another one (2 workers): the continued run shuffles by the run's, as its
    # saved random streams continue (the samplers of several processes shuffle by it; another --seed reached them)
    argv = finetune_argv(world, cut, workers, *FINETUNE_EXTRA[workers], '--resume', cut / 'checkpoint.pth')
    seed_at = argv.index('--seed')
    proc = launch(launcher, argv[:seed_at] + argv[seed_at + 2:] + (['--seed', '5'] if workers else []), cut)
    stdout = ok(proc)
    assert f'Resumed from {cut / "checkpoint.pth"}: continuing at epoch 1' in stdout
    if workers:
        assert 'warning: --seed 5 has no effect: the random streams saved in' in stdout
    else:
        assert ' --seed 7' in next(line for line in stdout.splitlines() if line.startswith('Continuing the run of'))
    assert 'Epoch: [0]' not in stdout and 'Epoch: [1]' in stdout
    final, reference = (load_checkpoint_file(str(d / 'checkpoint.pth')) for d in (cut, ref))
    assert final['epoch'] == 1
    for key in ('model', 'model_ema'):
        assert all(torch.equal(final[key][k], reference[key][k]) for k in reference[key]), key
    records, ref_records = ([json.loads(line) for line in (d / 'log.txt').read_text().splitlines()] for d in (cut, ref))
    assert records == ref_records
    # the optimizer state went on from the first run (AdamW step counts add up)
    steps = lambda c: float(c['optimizer']['state'][0]['step'])  # noqa: E731
    assert steps(final) == 2 * steps(first)


@pytest.mark.slow
def test_when_one_process_cannot_restore_its_random_streams_every_process_reseeds(world, job):
    """rank 1's saved streams damaged, rank 0's intact: both reseed from --seed and the epoch (the note says why),
    so that their samplers shuffle by the same seed, rather than rank 0 going on with the run's and rank 1 with
    --seed's (which duplicates and skips images)."""
    cut = job['base'] / 'cut0_stopped'
    path = cut / 'checkpoint.pth'
    checkpoint = load_checkpoint_file(str(path))
    assert checkpoint['epoch'] == 0
    checkpoint['rng'][1] = {}
    torch.save(checkpoint, path)
    argv = finetune_argv(world, cut, 0, *FINETUNE_EXTRA[0], '--resume', path)
    stdout = ok(launch('torchrun', argv, cut))
    assert ('note: the checkpoint cannot continue the random streams exactly (the random state it holds for another '
            'process does not fit this run)') in stdout
    assert 'Epoch: [1]' in stdout


@pytest.mark.slow
def test_bad_image_under_two_processes_stops_the_job_with_one_line_per_rank(world, tmp_path):
    data = shutil.copytree(world['data'], tmp_path / 'data')
    bad = data / 'train' / 'c' / '5.png'
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / 'out'
    # Every image read each epoch (repeated augmentation, the default, visits about a third of them)
    proc = launch('launch', ['--resume', world['dense'], '--data-path', data, '--output_dir', out,
                             '--final_finetune', '2', '--no-repeated-aug'], tmp_path, timeout=240)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if re.match(r'^\[rank \d\] error: ', line)]
    assert any(re.match(rf'^\[rank \d\] error: cannot read image {re.escape(str(bad))}: ', line) for line in errors), \
        proc.stderr
    # the processes themselves print no traceback (the launcher adds its own failure summary)
    assert not re.search(r'^\[rank\d\]: Traceback', proc.stderr, re.M), proc.stderr
    assert not (out / 'checkpoint.pth').exists() and not (out / 'best.pth').exists()


@pytest.mark.slow
def test_a_process_killed_midway_leaves_the_other_naming_the_checkpoint_to_continue(world, tmp_path):
    """Rank 1 killed (SIGKILL: no line of its own) as epoch 1 starts: rank 0, whose collective fails, says which
    checkpoint is complete and how to continue, as a stop by Ctrl-C or SIGTERM does.  The two processes are
    started with a launcher's environment but no launcher, which would stop rank 0 itself once it saw rank 1 go."""
    out = tmp_path / 'out'
    path = write_commands([{'argv': ['--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                                     '--final_finetune', '2'], 'sigkill_rank_at_epoch': [1, 1]}], tmp_path)
    env = {**subprocess_env(), 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    procs = [subprocess.Popen([sys.executable, JOB, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env={**env, 'RANK': str(rank), 'LOCAL_RANK': str(rank)})
             for rank in (0, 1)]
    try:
        stdout, stderr = procs[0].communicate(timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[1].returncode == -signal.SIGKILL
    assert exit_codes(stdout) == {0: [1, None]}, stdout[-3000:] + stderr[-3000:]
    checkpoint = out / 'checkpoint.pth'
    assert stderr == (f'[rank 0] error: stopped because another process of this job failed (see its error); the '
                      f'last complete checkpoint is {checkpoint} (epoch 0); continue with --resume {checkpoint}\n')
    assert load_checkpoint_file(str(checkpoint))['epoch'] == 0


def test_a_launcher_the_tests_start_leaves_its_folder_in_the_sessions_temporary_folder(tmp_path, subprocess_tmpdir):
    """torch's launcher leaves a torchelastic_* folder in the temporary folder after every job; the launchers the
    tests start put it in this session's pytest folder (conftest's subprocess_tmpdir), which pytest removes with
    its old sessions, not in the system's, where every `make test` used to add a few for good."""
    def folders(where):
        return set(glob.glob(os.path.join(where, 'torchelastic_*')))
    system = tempfile.gettempdir()
    assert os.path.commonpath([system, subprocess_tmpdir]) == system != subprocess_tmpdir  # (a folder inside it)
    before = folders(subprocess_tmpdir)
    proc = run_process_tree([*LAUNCHERS['run'], '--nproc_per_node=1', f'--master_port={free_port()}', '--no-python',
                             'true'], 120, env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the one folder the job leaves (not a look at the system's folder: other programs may launch jobs meanwhile)
    assert len(folders(subprocess_tmpdir) - before) == 1


def test_launch_without_use_env_passes_local_rank_which_is_accepted():
    """torch.distributed.launch without --use_env appends --local-rank=K; the process reads LOCAL_RANK anyway."""
    for flag in ('--local-rank=1', '--local_rank=1'):
        args = finetune.get_args_parser().parse_args([flag])
        assert args.local_rank == 1


@pytest.mark.parametrize('device, world, current', [('cuda:1', None, 1), ('cuda', None, None), ('cpu', None, None),
                                                    ('cuda', '4', 1), ('cpu', '4', None)])
def test_the_gpu_a_process_runs_on_is_made_its_current_device(monkeypatch, device, world, current):
    """torch puts on the current device what it is not told where: the context of pinned batches (the DataLoader's
    pin-memory thread takes the current device), cuBLAS handles and the like.  One process on --device cuda:1
    left the current device at GPU 0, so it made a CUDA context there too (memory taken on a GPU the user chose
    not to use, and an error where GPU 0 is full or in exclusive mode); every process of a launcher takes the GPU
    of its LOCAL_RANK before it joins the process group.  Under the launcher, the process is the second of the
    second node (RANK 3, LOCAL_RANK 1 of 4): it joins the group as rank 3, on its node's GPU 1.  CUDA and the
    rendezvous are simulated."""
    import argparse
    import torch.distributed as dist
    from utils import init_distributed_mode
    calls = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.append(('set_device', torch.device('cuda', d)
                                                                            if isinstance(d, int) else d)))
    monkeypatch.setattr(dist, 'init_process_group', lambda *a, **k: calls.append(
        ('init', k['backend'], k['init_method'], k['rank'], k['world_size'])))
    monkeypatch.setattr(dist, 'barrier', lambda *a, **k: calls.append(('barrier', k.get('device_ids'))))
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    if world:
        launched(monkeypatch, WORLD_SIZE=world, RANK='3', LOCAL_RANK='1')
    args = argparse.Namespace(device=device)
    init_distributed_mode(args)
    expected = [] if current is None else [('set_device', torch.device('cuda', current))]
    if world:  # (unnamed, NCCL's barrier warns that it guesses the GPU: named, it is the process's; gloo takes none)
        backend, barrier = ('gloo', None) if current is None else ('nccl', [1])
        expected += [('init', backend, 'env://', 3, 4), ('barrier', barrier)]
    assert calls == expected
    assert args.device == (f'cuda:{current}' if current is not None else device)
    assert (args.distributed, args.rank, args.world_size, args.gpu) == ((True, 3, 4, 1) if world else (False, 0, 1, 0))


def test_a_process_alone_agrees_with_itself_without_a_trip_to_the_device(monkeypatch):
    """The training loop asks all_agree at every step whether the loss is finite everywhere; a process alone
    answers from its own flag: no tensor made on the device and read back (a sync per step on a GPU)."""
    import utils.distributed

    def no_tensor(*args, **kwargs):
        raise AssertionError('all_agree made a tensor in a process alone')

    monkeypatch.setattr(utils.distributed.torch, 'tensor', no_tensor)
    assert not utils.distributed.is_dist()
    assert utils.distributed.all_agree(True, 'cpu') is True
    assert utils.distributed.all_agree(False, 'cpu') is False


@pytest.fixture
def group_of_one(tmp_path):
    """A real gloo process group of this process alone (its collectives run, over one process)."""
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('grouped', [False, True], ids=['alone', 'in-a-group'])
def test_sums_over_processes_stay_exact_past_the_integers_float32_holds(request, grouped):
    """Evaluation sums its counts (images, correct answers) and loss totals over the processes: float64, exact to
    2**53, where float32 already rounds 2**24 + 1."""
    import utils.distributed
    if grouped:
        request.getfixturevalue('group_of_one')
    values = [2 ** 24 + 1, 2 ** 40 + 3, 0.1]
    total = utils.distributed.all_reduce_sum(values, 'cpu')
    assert utils.distributed.is_dist() == grouped
    assert total.dtype == torch.float64 and total.tolist() == values


def test_a_collective_failed_by_a_lost_peer_is_told_apart_only_under_a_process_group(request):
    """torch's errors when another process of the job is gone (its DistError, or gloo's text of a closed
    connection) are a lost peer while a process group runs; the same text without one (a broken pipe of a
    process alone, writing to a closed reader) is not, nor is any other error."""
    from utils.signals import lost_peer
    import torch.distributed as dist
    gone = [dist.DistError('timed out'), RuntimeError('[../gloo/transport/tcp/pair.cc:534] Connection closed by peer'),
            RuntimeError('Connection reset by peer'), OSError('[Errno 32] Broken pipe'),
            RuntimeError('NCCL error: remote worker crashing')]
    assert not any(lost_peer(e) for e in gone)
    request.getfixturevalue('group_of_one')
    assert all(lost_peer(e) for e in gone)
    assert not lost_peer(RuntimeError('CUDA error: an illegal memory access was encountered'))
    assert not lost_peer(ValueError('Broken'))
