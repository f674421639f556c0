"""Two processes on CPU (gloo) under the seed's `python -m torch.distributed.launch --use_env` and under
torchrun: pruning plans identical masks on every rank, finetuning averages its metrics over
the processes, scales the learning rate by the world size, and only rank 0 writes."""
import json
import os
import re
import subprocess
import sys

import pytest
import timm

import finetune
import pruning
from conftest import DIGITS_ARGS, ROOT, free_port, make_image_folder, official_checkpoint, subprocess_env
from utils import load_checkpoint_file

pytestmark = pytest.mark.slow

TORCHRUN = os.path.join(os.path.dirname(sys.executable), 'torchrun')
LAUNCHERS = {
    'launch': [sys.executable, '-m', 'torch.distributed.launch', '--use_env'],  # the seed's command
    'run': [sys.executable, '-m', 'torch.distributed.run'],
    'torchrun': [TORCHRUN],  # the console script
}


def launch(launcher, argv, cwd, nproc=2, timeout=300):
    if launcher == 'torchrun' and not os.path.exists(TORCHRUN):
        pytest.skip(f'no torchrun script next to {sys.executable}')
    cmd = [*LAUNCHERS[launcher], f'--nproc_per_node={nproc}', f'--master_port={free_port()}',
           os.path.join(ROOT, 'finetune.py'), *DIGITS_ARGS, *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp('dist')
    data = make_image_folder(base / 'data', classes=tuple('abcd'), per_class=(8, 4), size=(32, 32))
    dense = official_checkpoint(base / 'dense.pth', 'cc_deit_digits_patch4_32')
    return {'base': base, 'data': data, 'dense': dense}


# ----------------------------------------------------------------------------------------------------------
# --prune

@pytest.mark.parametrize('launcher', ['launch', 'run'])
def test_prune_with_two_processes_plans_the_same_masks_on_every_rank(world, tmp_path, launcher):
    out = tmp_path / 'out'
    stdout = ok(launch(launcher, ['--prune', '--prune_rate', '0.3', '--resume', world['dense'],
                                  '--data-path', world['data'], '--output_dir', out], tmp_path))
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
    # the stored (all-reduced) scores are what the masks were planned from
    model = timm.create_model('cc_deit_digits_patch4_32')
    pruning.apply_masks(model, pruning.plan_masks(ckpt['scores'], 0.3))
    assert finetune.masks_sha1(model.masks) == digests['0']


# ----------------------------------------------------------------------------------------------------------
# finetuning

def test_finetune_with_two_processes_under_the_seeds_launcher(world, tmp_path, capsys):
    out = tmp_path / 'out'
    proc = launch('launch', ['--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                             '--final_finetune', '2', '--dist-eval'], tmp_path)
    stdout = ok(proc)
    assert 'torch.distributed.launch is deprecated' in proc.stderr  # it warns, and runs
    assert not re.search(r'^\[rank \d\] error', proc.stderr, re.M)
    # rank 0 prints and writes; the learning rate is scaled by batch 8 x 2 processes
    lr = 0.01 * 8 * 2 / 512  # the default --lr 0.01
    assert stdout.count('Finetuning for epochs 0..1') == 1
    assert f'(lr {lr:.2e} for batch 8 x 2 processes)' in stdout
    names = sorted(os.listdir(out))
    assert [n for n in names if not n.startswith('events.out.tfevents')] == ['best.pth', 'checkpoint.pth', 'log.txt']
    assert len(names) == 4  # one TensorBoard file: rank 0's
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    ckpt = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert ckpt['epoch'] == 1 and ckpt['args']['world_size'] == 2 and ckpt['args']['scaled_lr'] == pytest.approx(lr)
    assert ckpt['args']['lr'] == 0.01  # the base lr as given, so a continued run does not scale it again
    # --dist-eval: each process evaluated half of the 16 images; the sums give the single-process figures
    assert 'Accuracy of the network on the 16 test images' in stdout
    code = finetune.main([*DIGITS_ARGS, '--eval', '--resume', str(out / 'checkpoint.pth'),
                          '--data-path', world['data']])
    single = capsys.readouterr().out
    assert code == 0
    acc1, acc5, loss = map(float, re.search(r'\* Acc@1 (\S+) Acc@5 (\S+) loss (\S+)', single).groups())
    assert records[-1]['test_acc1'] == pytest.approx(acc1, abs=1e-9)
    assert records[-1]['test_acc5'] == pytest.approx(acc5, abs=1e-9)
    assert records[-1]['test_loss'] == pytest.approx(loss, abs=1e-3)


def test_finetune_with_two_processes_resumes_under_torchrun(world, tmp_path):
    out = tmp_path / 'out'
    common = ['--data-path', world['data'], '--output_dir', out, '--repeated-aug']
    ok(launch('run', ['--resume', world['dense'], '--final_finetune', '1', *common], tmp_path))
    first = load_checkpoint_file(str(out / 'checkpoint.pth'))
    stdout = ok(launch('torchrun', ['--resume', out / 'checkpoint.pth', '--final_finetune', '2', *common], tmp_path))
    assert f'Resumed from {out / "checkpoint.pth"}: continuing at epoch 1' in stdout
    assert 'Epoch: [0]' not in stdout and 'Epoch: [1]' in stdout
    records = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1]
    final = load_checkpoint_file(str(out / 'checkpoint.pth'))
    assert final['epoch'] == 1
    # the optimizer state went on from the first run (AdamW step counts add up)
    steps = lambda c: float(c['optimizer']['state'][0]['step'])  # noqa: E731
    assert steps(final) == 2 * steps(first)


def test_bad_image_under_two_processes_stops_the_job_with_one_line_per_rank(world, tmp_path):
    import shutil
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


def test_launch_without_use_env_passes_local_rank_which_is_accepted():
    """torch.distributed.launch without --use_env appends --local-rank=K; the process reads LOCAL_RANK anyway."""
    for flag in ('--local-rank=1', '--local_rank=1'):
        args = finetune.get_args_parser().parse_args([flag])
        assert args.local_rank == 1
