"""--seed reproduces a run, and a resumed run equals an uninterrupted one bit for bit (one process here; two
processes under torchrun in test_distributed.py).

Every random stream is exercised: timm's auto-augment and random erasing draw from Python's ``random``, mixup
and cutmix from numpy, drop-path and torchvision's crops and flips from torch, the shuffle and the workers' seeds
from the training DataLoader's generator.  Runs happen twice in this process, so a stream left unseeded has
moved on by the second run and shows up as a difference."""
import json
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import engine
import finetune
import pruning
from conftest import digits_world, launched, official_checkpoint
from utils import load_checkpoint_file, seeding, signals

pytestmark = pytest.mark.usefixtures('one_thread')

# Every augmentation on (DeiT's defaults for auto-augment, random erasing, mixup and cutmix), drop-path and EMA.
AUGMENTED = ['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--batch-size', '8', '--print-freq', '100',
             '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0',
             '--drop-path', '0.1', '--model-ema', '--model-ema-decay', '0.9', '--seed', '7',
             '--lr', '5e-4', '--warmup-epochs', '1']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return digits_world(tmp_path_factory.mktemp('seeding'))


def log_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(path, key='model'):
    return torch.load(path, weights_only=True)[key]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f'{len(different)} tensors differ, e.g. {different[:3]}'


# ----------------------------------------------------------------------------------------------------------
# the streams themselves

def draws(generator):
    # random.gauss first: it returns Python's cached second gaussian where one is held (as numpy's standard_normal
    # returns numpy's), so a restore that dropped either cache shows
    return (random.gauss(0, 1), random.random(), random.getrandbits(64), float(np.random.rand()),
            float(np.random.standard_normal()), torch.rand(3).tolist(),
            torch.randint(0, 1000, (3,), generator=generator).tolist())


def test_seed_everything_seeds_python_numpy_and_torch_with_seed_plus_rank():
    seeding.seed_everything(7, rank=1)
    got = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    # independent generators seeded with 7 + 1
    expected = (random.Random(8).random(), float(np.random.RandomState(8).rand()),
                torch.rand(2, generator=torch.Generator().manual_seed(8)).tolist())
    assert got == expected


def test_captured_state_survives_a_weights_only_file_and_restores_every_stream(tmp_path):
    seeding.seed_everything(3)
    g = seeding.data_generator(3)
    np.random.standard_normal()  # numpy now holds a cached gaussian: part of its state too
    random.gauss(0, 1)  # and Python's
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1  # both caches are held
    path = tmp_path / 'state.pth'
    torch.save({'rng': [seeding.capture({'data': g})]}, path)
    first = draws(g)
    state = torch.load(path)['rng'][0]  # plain torch.load: weights_only by default
    seeding.restore(state, {'data': g})
    assert draws(g) == first
    assert draws(g) != first  # and the streams go on from there


def test_the_cuda_stream_of_the_processs_own_gpu_is_captured_and_restored(monkeypatch):
    """On CUDA the device's generator (dropout, drop-path on the GPU) is part of the state too: that of the
    process's GPU (cuda:1 for LOCAL_RANK 1), not of the current device's.  CUDA is simulated: one generator state
    per GPU, the current device being GPU 0."""
    gpus = {0: torch.tensor([10, 11], dtype=torch.uint8), 1: torch.tensor([20, 21], dtype=torch.uint8)}

    def index(device):
        return torch.device(device).index or 0  # 'cuda' alone: the current device

    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': gpus[index(device)].clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': gpus.__setitem__(index(device),
                                                                                                   state.clone()))
    state = seeding.capture(device=torch.device('cuda', 1))
    assert torch.equal(state['cuda'], torch.tensor([20, 21], dtype=torch.uint8))
    gpus[0], gpus[1] = torch.tensor([12, 13], dtype=torch.uint8), torch.tensor([22, 23], dtype=torch.uint8)  # drawn
    seeding.restore(state, device='cuda:1')
    assert gpus[1].tolist() == [20, 21] and gpus[0].tolist() == [12, 13]
    assert 'cuda' not in seeding.capture(device='cpu')


def test_each_process_of_a_launched_run_seeds_its_streams_with_seed_plus_its_rank(world, monkeypatch):
    """main seeds Python's random, numpy and torch with --seed plus the RANK the launcher gives the process, so
    the processes of a job augment differently.  The launcher's environment is set, the rendezvous simulated; the
    run is stopped just after seeding (where it checks its training transform)."""
    import torch.distributed as dist

    class Seeded(BaseException):
        pass

    def stop(*args, **kwargs):
        raise Seeded

    launched(monkeypatch, RANK='3', WORLD_SIZE='4', LOCAL_RANK='1')
    monkeypatch.setattr(dist, 'init_process_group', lambda *args, **kwargs: None)
    monkeypatch.setattr(dist, 'barrier', lambda *args, **kwargs: None)
    monkeypatch.setattr(finetune, 'check_training_transform', stop)
    with pytest.raises(Seeded):
        finetune.main(['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--seed', '5', '--eval', '--resume',
                       world['dense'], '--data-path', world['data']])
    got = (random.random(), float(np.random.rand()), torch.rand(2).tolist())
    assert got == (random.Random(8).random(), float(np.random.RandomState(8).rand()),
                   torch.rand(2, generator=torch.Generator().manual_seed(8)).tolist())


def test_data_generators_differ_between_ranks_and_seeds():
    firsts = {(seed, rank): torch.randint(0, 2 ** 62, (1,), generator=seeding.data_generator(seed, rank)).item()
              for seed in (0, 1) for rank in (0, 1)}
    assert len(set(firsts.values())) == 4  # seed 0 rank 1 is not seed 1 rank 0


def test_the_training_loader_of_each_process_draws_from_a_stream_of_its_own():
    """Under several processes the training DataLoader's generator gives the base seed of each epoch's workers (the
    sampler shuffles by --seed and the epoch): it differs between the processes of a job, so that their workers
    augment differently, and with --seed; the same process and seed draw the same."""
    import argparse
    import datasets

    def first_draws(seed, rank):
        args = argparse.Namespace(seed=seed, rank=rank, world_size=2, distributed=True, repeated_aug=True,
                                  dist_eval=False, batch_size=2, num_workers=0, pin_mem=False, device='cpu')
        generator = datasets.data_loader(list(range(8)), args, train=True).generator
        return tuple(torch.randint(0, 2 ** 62, (4,), generator=generator).tolist())

    draws_of = {(seed, rank): first_draws(seed, rank) for seed in (5, 6) for rank in (0, 1)}
    assert len(set(draws_of.values())) == 4
    assert first_draws(5, 1) == draws_of[5, 1]


def test_a_checkpoint_without_states_for_this_world_size_reseeds_from_seed_and_epoch():
    messages = []
    g = torch.Generator()
    assert not seeding.restore_or_reseed(None, 0, 1, 7, 2, {'data': g}, warn=messages.append)
    after_none = draws(g)
    assert not seeding.restore_or_reseed([{}, {}], 0, 1, 7, 2, {'data': g}, warn=messages.append)
    assert draws(g) == after_none  # the same epoch reseeds the same way
    assert not seeding.restore_or_reseed(None, 0, 1, 7, 3, {'data': g}, warn=messages.append)
    assert draws(g) != after_none  # another epoch: other draws
    assert 'written by 2 processes, this run has 1' in messages[1]
    assert not seeding.restore_or_reseed([{}], 0, 2, 7, 2, {'data': g}, warn=messages.append)
    assert 'written by 1 process, this run has 2' in messages[3]
    assert all('will not match an uninterrupted one bit for bit' in m for m in messages)


def test_every_process_reseeds_when_one_cannot_restore_its_streams():
    """The choice is one for all processes (``agree``, utils.all_agree in a run): rank 0's state fits, but
    another rank's does not, so rank 0 reseeds too, exactly as reseed(seed, rank, epoch), with a note naming
    the other process; with every process agreeing, it restores its own state."""
    g = torch.Generator()
    state = seeding.capture({'data': g})
    messages = []
    expected = torch.Generator()
    seeding.reseed(7, 0, 2, {'data': expected})
    expected_draws = draws(expected)
    assert not seeding.restore_or_reseed([state, {}], 0, 2, 7, 2, {'data': g}, warn=messages.append,
                                         agree=lambda ok: False)
    assert draws(g) == expected_draws
    assert 'the random state it holds for another process does not fit this run' in messages[0]
    seeding.restore(state, {'data': expected})
    expected_draws = draws(expected)
    assert seeding.restore_or_reseed([state, {}], 0, 2, 7, 2, {'data': g}, warn=messages.append,
                                     agree=lambda ok: ok)
    assert draws(g) == expected_draws and len(messages) == 1


def test_reseeded_streams_are_not_epoch_0s_and_differ_by_rank_seed_and_epoch():
    """The data generator alone (the shuffle, the workers' seeds): reseeded at epoch 2, it is not the stream a
    fresh run starts epoch 0 with (data_generator), and it differs with the rank, the seed and the epoch; so do
    the global streams (augmentations, drop-path), or two processes would augment alike after the resume."""
    def reseeded(seed, rank, epoch):
        g = torch.Generator()
        seeding.restore_or_reseed(None, rank, 2, seed, epoch, {'data': g}, warn=lambda _: None)
        own = tuple(torch.randint(0, 2 ** 62, (4,), generator=g).tolist())
        return own, (random.random(), float(np.random.rand()), tuple(torch.rand(2).tolist()))

    fresh = tuple(torch.randint(0, 2 ** 62, (4,), generator=seeding.data_generator(7, 0)).tolist())
    cases = [(7, 0, 2), (7, 1, 2), (8, 0, 2), (7, 0, 3)]
    data, glob = zip(*(reseeded(*c) for c in cases))
    assert fresh not in data
    assert len(set(data)) == len(cases) and len(set(glob)) == len(cases)
    assert reseeded(7, 1, 2) == (data[1], glob[1])  # and each is reproducible


# ----------------------------------------------------------------------------------------------------------
# finetuning: the same seed gives the same run; interrupted and resumed equals uninterrupted

def finetune_argv(world, out, workers, *extra):
    return [*AUGMENTED, '--num_workers', str(workers), '--data-path', world['data'], '--output_dir', str(out),
            *map(str, extra)]


def sigterm_at_epoch(monkeypatch, stop_epoch):
    """The next finetune receives SIGTERM (a scheduler's preemption) as epoch ``stop_epoch`` starts."""
    real = engine.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        if kwargs.get('epoch', args[5] if len(args) > 5 else None) == stop_epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, 'train_one_epoch', train_one_epoch)


@pytest.mark.parametrize('workers', [0, 2])
def test_seeded_finetune_reproduces_and_an_interrupted_run_resumes_bit_for_bit(world, tmp_path, monkeypatch, workers):
    ref = tmp_path / 'ref'
    assert finetune.main(finetune_argv(world, ref, workers, '--resume', world['dense'], '--final_finetune', 3)) == 0
    ref_log = log_records(ref / 'log.txt')

    out = tmp_path / 'out'
    with monkeypatch.context() as patch:
        sigterm_at_epoch(patch, 1)
        assert finetune.main(finetune_argv(world, out, workers, '--resume', world['dense'],
                                           '--final_finetune', 3)) == signals.EXIT_TERMINATED
    assert load_checkpoint_file(str(out / 'checkpoint.pth'))['epoch'] == 0
    # the same seed gave the same first epoch: the same losses and accuracy, to the last bit
    first = log_records(out / 'log.txt')
    assert first == ref_log[:1]

    assert finetune.main(finetune_argv(world, out, workers, '--resume', out / 'checkpoint.pth',
                                       '--final_finetune', 3)) == 0
    assert_same_tensors(weights(out / 'checkpoint.pth'), weights(ref / 'checkpoint.pth'))
    assert_same_tensors(weights(out / 'checkpoint.pth', 'model_ema'), weights(ref / 'checkpoint.pth', 'model_ema'))
    resumed_log = log_records(out / 'log.txt')
    assert [r['train_loss'] for r in resumed_log] == [r['train_loss'] for r in ref_log]
    assert resumed_log == ref_log
    # the training really drew different augmentations and orders epoch after epoch (nothing repeats)
    assert len({r['train_loss'] for r in ref_log}) == 3


def test_another_seed_gives_another_run(world, tmp_path):
    """The control for the test above: --seed reaches the augmentations and the order."""
    losses = []
    for seed in (7, 8):
        out = tmp_path / f'seed{seed}'
        assert finetune.main(finetune_argv(world, out, 0, '--resume', world['dense'], '--final_finetune', 1,
                                           '--seed', seed)) == 0
        losses.append(log_records(out / 'log.txt')[0]['train_loss'])
    assert losses[0] != losses[1]


def test_resume_from_a_checkpoint_without_random_state_continues_with_fresh_streams(world, tmp_path, capsys,
                                                                                    monkeypatch):
    """A checkpoint of an earlier version: the resumed epoch must not replay epoch 0's order and draws."""
    orders = []  # the training order of each epoch: the shuffle the DataLoader's generator draws
    real_iter = torch.utils.data.RandomSampler.__iter__

    def recorded_iter(sampler):
        orders.append(list(real_iter(sampler)))
        return iter(orders[-1])

    monkeypatch.setattr(torch.utils.data.RandomSampler, '__iter__', recorded_iter)
    out = tmp_path / 'out'
    assert finetune.main(finetune_argv(world, out, 0, '--resume', world['dense'], '--final_finetune', 1)) == 0
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    del ckpt['rng']
    torch.save(ckpt, out / 'checkpoint.pth')
    capsys.readouterr()
    assert finetune.main(finetune_argv(world, out, 0, '--resume', out / 'checkpoint.pth', '--final_finetune', 2)) == 0
    assert 'note: the checkpoint cannot continue the random streams exactly (it holds no random state' in \
        capsys.readouterr().out
    assert len(orders) == 2 and sorted(orders[0]) == sorted(orders[1])  # epoch 0, then the resumed epoch 1
    assert orders[1] != orders[0]


# ----------------------------------------------------------------------------------------------------------
# --prune

def prune(world, out, workers, mode='attn', seed=7):
    # 48x48 input: the training crops are timm's RandomResizedCropAndInterpolation, which draws from Python's
    # random (at 32x32 and below they are torchvision's RandomCrop)
    argv = ['--prune', '--prune_mode', mode, '--prune_rate', '0.3', '--model', 'deit_digits_patch4_32',
            '--input-size', '48', '--resume', world['dense48'], '--data-path', world['data'], '--output_dir', str(out),
            '--device', 'cpu', '--batch-size', '8', '--print-freq', '100', '--num_workers', str(workers),
            '--seed', str(seed)]
    assert finetune.main(argv) == 0
    ckpt = load_checkpoint_file(str(out / finetune.pruned_file_name(mode, 0.3)))
    return ckpt, torch.stack([ckpt['model'][f'blocks.{l}.attn.token_index'] for l in range(6)])


@pytest.fixture(scope='module')
def world48(world):
    world = dict(world)
    world['dense48'] = official_checkpoint(world['base'] / 'dense48.pth', 'cc_deit_digits_patch4_32', img_size=48)
    return world


@pytest.mark.parametrize('workers', [0, 2])
def test_the_same_prune_command_twice_gives_the_same_masks(world48, tmp_path, workers):
    first, masks = prune(world48, tmp_path / 'a', workers)
    second, again = prune(world48, tmp_path / 'b', workers)
    assert torch.equal(first['scores'], second['scores'])
    assert torch.equal(masks, again)
    # and the masks are the plan of the stored scores at the requested rate: 144 patches x 6 blocks x 0.3
    plan = pruning.plan_masks(first['scores'], 0.3)
    assert int((~plan).sum()) == int(144 * 6 * 0.3)
    assert torch.equal(masks, pruning.to_concat_order(plan))
    assert first['channels'] == [int(m.sum()) for m in masks]


def test_random_prune_mode_is_seeded(world48, tmp_path):
    _, a = prune(world48, tmp_path / 'a', 0, 'random')
    _, b = prune(world48, tmp_path / 'b', 0, 'random')
    _, c = prune(world48, tmp_path / 'c', 0, 'random', seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((~a).sum()) == int(144 * 6 * 0.3)


class _RandomDraws(torch.utils.data.Dataset):
    """Each item: its index and one draw of each random source a worker's augmentations use."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor([i, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def test_a_worker_that_hangs_at_its_start_is_killed_and_the_epoch_is_the_one_it_would_have_been(
        monkeypatch, tmp_path, capfd):
    """A forked DataLoader worker that never reaches its first line of Python (a fork that deadlocked, as CPython
    before 3.12 can) stalled the run forever.  Stand-in: on the first start, worker 1 blocks SIGTERM and sleeps
    before it notes its start.  The loader kills it, starts the workers again, and yields what a loader whose
    workers started at once yields: the same shuffle and the same random draws in every worker, and so does the
    next epoch."""
    import datasets
    import finetune
    from datasets import _note_start

    def hang_at_first_starts(started, worker_init_fn, worker_id):
        # worker 1's starts: 1 training, 2 training again, 3 validation (its workers' seeds from the global
        # random state, not the training loader's generator), 4 validation again, 5 the second training epoch
        if worker_id == 1:
            starts = (tmp_path / 'starts').read_text().split() if (tmp_path / 'starts').exists() else []
            (tmp_path / 'starts').write_text(' '.join(starts + [str(os.getpid())]))
            if len(starts) in (0, 2):
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
                time.sleep(600)
        _note_start(started, worker_init_fn, worker_id)

    args = finetune.get_args_parser().parse_args(['--batch-size', '4', '--num_workers', '2', '--seed', '3'])
    args.distributed, args.rank, args.device = False, 0, 'cpu'

    def two_epochs():
        torch.manual_seed(5)
        train, val = datasets.data_loader(_RandomDraws(), args, train=True), datasets.data_loader(_RandomDraws(), args,
                                                                                                    train=False)
        return [torch.cat(list(loader)) for loader in (train, val, train)], torch.rand(3)

    (expected, expected_after) = two_epochs()
    assert sorted(expected[0][:, 0].tolist()) == list(range(24)) and expected[0][:, 0].tolist() != list(range(24))
    monkeypatch.setattr(datasets, '_note_start', hang_at_first_starts)
    monkeypatch.setattr(datasets, 'WORKER_START_TIMEOUT', 3.0)
    (got, got_after) = two_epochs()
    starts = [int(pid) for pid in (tmp_path / 'starts').read_text().split()]
    assert len(starts) == 5
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    assert torch.equal(got_after, expected_after)  # the main process's random state as if no start had failed
    for hung in starts[0], starts[2]:
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)  # killed and reaped
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: 1 of 2 DataLoader workers did not start within 3 s (a fork that deadlocked; pid '
                        f'{hung}): killed, the workers started again' for hung in (starts[0], starts[2])]
