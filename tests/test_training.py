"""The training loop against references computed here by hand: two SGD steps of a finetune built by the CLI
(distillation term, dense teacher, gradients reset between steps, gradient clipping, EMA), top-1/top-5 counts,
and every epoch and every process shuffling its own way."""
import argparse
import datetime
import json
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import datasets
import engine
import finetune
import models
import pruning
from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures('one_thread')

# ALPHA is neither 1 (a --distillation-alpha left out of the loss would give the same loss) nor the default 0.5;
# EMA_DECAY is not 0.5, where an EMA that weighed the new weights by the decay (decay and 1 - decay swapped) is the
# same EMA
LR, ALPHA, TAU, EMA_DECAY, CLIP = 0.05, 2.0, 2.0, 0.75, 0.2


def checkpoint_with_masks(path, seed, head_scale=1.0):
    """A digits model with random weights (seed) and a random 30% plan, as {'model': state_dict}."""
    torch.manual_seed(seed)
    model = models.create_model('cc_deit_digits_patch4_32')
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    pruning.apply_masks(model, pruning.random_masks(6, 64, 0.3, generator=torch.Generator().manual_seed(seed)))
    torch.save({'model': model.state_dict()}, path)
    return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp('training')
    return {
        'base': base,
        'data': make_image_folder(base / 'data', classes=tuple('abcd'), per_class=(2, 1), size=(32, 32)),
        'student': checkpoint_with_masks(base / 'student.pth', 0),
        # the teacher's file holds masks too, which the teacher must ignore; its large head makes its outputs
        # confident, so the distillation term is a sizeable part of the loss
        'teacher': checkpoint_with_masks(base / 'teacher.pth', 1, head_scale=300.0),
    }


def fixed_batches(seed=5, n=2, batch=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n * batch, 3, 32, 32, generator=g), torch.randint(0, 10, (n * batch,), generator=g)


def finetune_two_steps(files, out, monkeypatch, *extra):
    """finetune.py with soft distillation and plain SGD at a constant lr, then its Training object trained for
    one epoch of two fixed batches of 4 (in order).  Returns (training, checkpoint written after the epoch)."""
    x, y = fixed_batches()
    captured = {}
    real = engine.train_epochs

    def on_fixed_batches(training, *args, **kwargs):
        captured['training'] = training
        captured['param_groups'] = [dict(lr=g['lr'], n=len(g['params'])) for g in training.optimizer.param_groups]
        training.loader_train = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
        training.loader_val = DataLoader(TensorDataset(x[:4], y[:4]), batch_size=4)
        return real(training, *args, **kwargs)

    monkeypatch.setattr(engine, 'train_epochs', on_fixed_batches)
    argv = ['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--num_workers', '0', '--batch-size', '4',
            '--print-freq', '100', '--data-path', files['data'], '--output_dir', str(out), '--resume', files['student'],
            '--teacher-path', files['teacher'], '--distillation-type', 'soft', '--distillation-alpha', str(ALPHA),
            '--distillation-tau', str(TAU), '--mixup', '0', '--cutmix', '0', '--smoothing', '0', '--drop-path', '0',
            '--aa', 'none', '--reprob', '0', '--opt', 'momentum', '--momentum', '0', '--weight-decay', '0',
            '--lr', str(LR), '--unscale-lr', '--sched', 'step', '--decay-epochs', '100', '--warmup-epochs', '0',
            '--model-ema', '--model-ema-decay', str(EMA_DECAY), '--final_finetune', '1', *map(str, extra)]
    assert finetune.main(argv) == 0
    # one parameter group at the lr asked for (weight decay 0), so every weight moves by lr * gradient
    assert captured['param_groups'] == [{'lr': LR, 'n': len(list(captured['training'].model_without_ddp.parameters()))}]
    return captured['training'], torch.load(out / 'checkpoint.pth', weights_only=True)


@pytest.mark.parametrize('extra, noted', [(['--batch-size', '16'], True), (['--batch-size', '8'], False),
                                           (['--batch-size', '16', '--unscale-lr'], False)])
def test_a_batch_larger_than_the_training_set_says_the_lr_is_scaled_for_it(capsys, files, tmp_path, extra, noted):
    """8 training images and --batch-size 16: every step trains on a batch of 8 (none is dropped), while --lr is
    scaled for 16; the run says so rather than train at twice the rate its batch would be given."""
    argv = ['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--num_workers', '0', '--print-freq', '100',
            '--data-path', files['data'], '--output_dir', str(tmp_path / 'out'), '--resume', files['student'],
            '--mixup', '0', '--cutmix', '0', '--aa', 'none', '--reprob', '0', '--final_finetune', '1', *extra]
    assert finetune.main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note: the training set')]
    assert notes == ([f'note: the training set gives 8 images per process, fewer than --batch-size 16: each step '
                      f'trains on a batch of 8, at the lr {0.01 * 16 / 512:.2e} that --lr 0.01 is scaled to for batch '
                      f'16 (--batch-size 8 would scale it to {0.01 * 8 / 512:.2e})'] if noted else [])


def by_hand(files, clip):
    """The same two steps written out: loss = CE + alpha * tau^2 * KL(teacher || student) / numel with the teacher
    dense (timm's own model, no masks), gradients of this step only, clipped to a total norm of ``clip``, an SGD
    step, then EMA = d * EMA + (1 - d) * weights."""
    student = models.create_model('cc_deit_digits_patch4_32', drop_path_rate=0.0)
    student.load_state_dict(torch.load(files['student'], weights_only=True)['model'])
    student.train()
    teacher = timm.create_model('deit_digits_patch4_32').eval()
    teacher.load_state_dict({k: v for k, v in torch.load(files['teacher'], weights_only=True)['model'].items()
                             if not k.endswith('token_index')})
    names, params = zip(*student.named_parameters())
    start = {n: p.detach().clone() for n, p in zip(names, params)}
    ema = dict(start)
    x, y = fixed_batches()
    losses, kds = [], []
    for xb, yb in zip(x.split(4), y.split(4)):
        s = student(xb)
        with torch.no_grad():
            t = teacher(xb)
        p_t = torch.softmax(t / TAU, dim=1)
        log_ratio = torch.log_softmax(t / TAU, dim=1) - torch.log_softmax(s / TAU, dim=1)
        kd = (p_t * log_ratio).sum() * TAU ** 2 / s.numel()
        loss = F.cross_entropy(s, yb) + ALPHA * kd
        grads = torch.autograd.grad(loss, params)
        if clip is not None:
            total = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            if clip / (total + 1e-6) < 1:
                grads = [g * (clip / (total + 1e-6)) for g in grads]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= LR * g
        ema = {n: EMA_DECAY * ema[n] + (1 - EMA_DECAY) * p.detach() for n, p in zip(names, params)}
        losses.append(loss.item())
        kds.append(kd.item())
    weights = {n: p.detach().clone() for n, p in zip(names, params)}
    return start, weights, ema, losses, kds


def relative_error(got, expected, start):
    """|(got - start) - (expected - start)| / |expected - start| over all tensors: the error of the update."""
    num = sum(float(((got[k] - expected[k]).double() ** 2).sum()) for k in expected)
    den = sum(float(((expected[k] - start[k]).double() ** 2).sum()) for k in expected)
    return math.sqrt(num / den)


@pytest.mark.parametrize('clip', [None, CLIP])
def test_two_training_steps_equal_the_hand_computation(files, tmp_path, monkeypatch, clip):
    extra = [] if clip is None else ['--clip-grad', clip]
    training, ckpt = finetune_two_steps(files, tmp_path / 'out', monkeypatch, *extra)
    start, weights, ema, losses, kds = by_hand(files, clip)
    # the loss of each step holds the distillation term: the epoch's logged loss is their mean
    with open(tmp_path / 'out' / 'log.txt') as f:
        record = json.loads(f.readline())
    assert record['train_loss'] == pytest.approx(sum(losses) / 2, rel=1e-5)
    # and its two terms, unweighted, as loss = loss_base + alpha * loss_kd
    assert record['train_loss_kd'] == pytest.approx(sum(kds) / 2, rel=1e-5)
    assert record['train_loss_base'] == pytest.approx(sum(a - ALPHA * b for a, b in zip(losses, kds)) / 2, rel=1e-5)
    assert ALPHA * sum(kds) / sum(losses) > 0.02  # the KD term is big enough to be told apart from its absence
    # weights after two steps: each step's own gradient (reset in between), clipped when asked
    got = {k: ckpt['model'][k] for k in weights}
    assert relative_error(got, weights, start) < 1e-4
    # EMA after the two steps, from the weights the run started with
    got_ema = {k: ckpt['model_ema'][k] for k in ema}
    assert relative_error(got_ema, ema, start) < 1e-4


def test_clipping_matters_at_this_learning_rate(files):
    """The control for the test above: clipped and unclipped steps are far apart, so ignoring --clip-grad shows."""
    start, clipped, _, _, _ = by_hand(files, CLIP)
    _, unclipped, _, _, _ = by_hand(files, None)
    assert relative_error(clipped, unclipped, start) > 0.5


def test_the_teacher_is_dense_whatever_masks_its_file_holds(files, tmp_path, monkeypatch):
    training, _ = finetune_two_steps(files, tmp_path / 'out', monkeypatch)
    teacher = training.criterion.teacher
    assert all(bool(m.all()) for m in teacher.masks)
    # frozen in eval mode after the two training steps (dropout or drop-path of a larger teacher would be random)
    assert not any(m.training for m in teacher.modules()) and not any(p.requires_grad for p in teacher.parameters())
    reference = timm.create_model('deit_digits_patch4_32').eval()
    reference.load_state_dict({k: v for k, v in torch.load(files['teacher'], weights_only=True)['model'].items()
                               if not k.endswith('token_index')})
    x, _ = fixed_batches()
    with torch.no_grad():
        assert torch.allclose(teacher(x), reference(x), atol=1e-5, rtol=1e-5)
    # the file's own masks do clip tokens: a teacher built with them computes something else
    pruned = models.create_model('cc_deit_digits_patch4_32').eval()
    pruned.load_state_dict(torch.load(files['teacher'], weights_only=True)['model'])
    with torch.no_grad():
        assert not torch.allclose(pruned(x), reference(x), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# evaluation

class LogitTable(nn.Module):
    """A 'model' whose input i gives the i-th row of a fixed table of logits."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer('logits', logits)

    def forward(self, x):
        return self.logits[x.long().flatten()]


@pytest.mark.parametrize('classes', [10, 3])
def test_top1_top5_and_loss_counted_by_hand(classes):
    g = torch.Generator().manual_seed(0)
    n = 50
    logits = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    loader = DataLoader(TensorDataset(torch.arange(n).float().view(n, 1), targets), batch_size=7)
    lines = []
    stats = engine.evaluate(loader, LogitTable(logits), torch.device('cpu'), printer=lines.append)
    # rank of the true class among the logits of its row, by hand (no ties in random floats)
    ranks = [sum(1 for c in range(classes) if logits[i, c] > logits[i, targets[i]]) for i in range(n)]
    hits = {k: sum(r < k for r in ranks) for k in (1, 3, 5)}
    assert stats['acc1'] == pytest.approx(100.0 * hits[1] / n)
    assert stats['acc5'] == pytest.approx(100.0 * hits[5] / n)
    if classes > 5:
        assert hits[3] != hits[5]  # top-3 counted as top-5 would show
    else:
        assert stats['acc5'] == 100.0
    nll = [math.log(sum(math.exp(v) for v in logits[i].tolist())) - logits[i, targets[i]].item() for i in range(n)]
    assert stats['loss'] == pytest.approx(sum(nll) / n, rel=1e-5)
    # the result line prints each figure in its place (Acc@1 and Acc@5 differ here, so a swap would show)
    assert hits[1] != hits[5]
    assert lines[-1] == f'* Acc@1 {100.0 * hits[1] / n:.3f} Acc@5 {100.0 * hits[5] / n:.3f} loss {sum(nll) / n:.3f}'


def test_evaluations_of_disjoint_parts_summed_over_processes_give_the_whole_sets_figures(monkeypatch):
    """--dist-eval: each process evaluates its own part and the counts are summed over the processes, so the
    figures are those of the whole set.  Two processes are stood in for: the second's part (23 images) is
    evaluated first and its sums recorded; the first's (27 images) is evaluated with an all-reduce that adds them."""
    g = torch.Generator().manual_seed(1)
    n, classes = 50, 10
    logits = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    parts = [torch.arange(27), torch.arange(27, n)]
    recorded = []
    monkeypatch.setattr(engine, 'all_reduce_sum', lambda values, device: recorded.append(list(values)) or
                        torch.tensor(values, dtype=torch.float64))
    quiet = lambda *a: None  # noqa: E731

    def loader(rows):
        return DataLoader(TensorDataset(rows.float().view(-1, 1), targets[rows]), batch_size=8)

    engine.evaluate(loader(parts[1]), LogitTable(logits), torch.device('cpu'), printer=quiet)
    other = recorded[-1]
    monkeypatch.setattr(engine, 'all_reduce_sum', lambda values, device: torch.tensor(
        [a + b for a, b in zip(values, other)], dtype=torch.float64))
    stats = engine.evaluate(loader(parts[0]), LogitTable(logits), torch.device('cpu'), printer=quiet)
    ranks = [sum(1 for c in range(classes) if logits[i, c] > logits[i, targets[i]]) for i in range(n)]
    nll = [math.log(sum(math.exp(v) for v in logits[i].tolist())) - logits[i, targets[i]].item() for i in range(n)]
    assert stats['acc1'] == pytest.approx(100.0 * sum(r < 1 for r in ranks) / n)
    assert stats['acc5'] == pytest.approx(100.0 * sum(r < 5 for r in ranks) / n)
    assert stats['loss'] == pytest.approx(sum(nll) / n, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# shuffling: a new order every epoch, a different one on every process

@pytest.mark.parametrize('repeated_aug', [False, True])
def test_every_epoch_and_every_process_shuffles_its_own_way(monkeypatch, repeated_aug):
    """The loaders finetune.py builds for each of two processes, stepped by engine.train_epochs for 3 epochs."""
    dataset = TensorDataset(torch.arange(48))
    seen = {}

    def record(model, criterion, loader, *args, **kwargs):
        seen.setdefault(current_rank, []).append(torch.cat([batch[0] for batch in loader]).tolist())
        return {'loss': 0.0, 'lr': 0.0}

    monkeypatch.setattr(engine, 'train_one_epoch', record)
    monkeypatch.setattr(engine, 'evaluate', lambda *a, **k: {'acc1': 0.0, 'acc5': 0.0, 'loss': 0.0})
    for current_rank in (0, 1):
        args = finetune.get_args_parser().parse_args(['--batch-size', '4', '--num_workers', '0', '--seed', '3'])
        args.distributed, args.world_size, args.rank, args.device = True, 2, current_rank, 'cpu'
        args.repeated_aug = repeated_aug
        loader = datasets.data_loader(dataset, args, train=True)
        run = engine.Training(model=None, model_without_ddp=None, criterion=None, optimizer=None,
                              lr_scheduler=argparse.Namespace(step=lambda epoch: None), scaler=None, amp=False,
                              clip_grad=None, model_ema=None, mixup_fn=None, loader_train=loader,
                              loader_val=DataLoader(dataset), device=torch.device('cpu'))
        engine.train_epochs(run, 0, 3, -1.0, lambda *a: None, printer=lambda *a: None)
    for rank in (0, 1):
        orders = seen[rank]
        assert len(orders) == 3 and len({tuple(o) for o in orders}) == 3, f'rank {rank} repeats an order'
    for epoch in range(3):
        assert seen[0][epoch] != seen[1][epoch]
        if not repeated_aug:  # DistributedSampler: the two halves of one permutation
            assert sorted(seen[0][epoch] + seen[1][epoch]) == list(range(48))


def test_each_epoch_prints_its_top1_accuracy_over_the_validation_images_and_the_best_so_far(monkeypatch):
    """After each epoch: 'Accuracy of the network on the N test images: X%' with N the validation images (7, in 3
    batches) and X the epoch's Acc@1 (not its Acc@5), then the best Acc@1 so far."""
    results = iter([{'acc1': 40.0, 'acc5': 90.0, 'loss': 1.0}, {'acc1': 30.0, 'acc5': 95.0, 'loss': 1.5}])
    monkeypatch.setattr(engine, 'train_one_epoch', lambda *a, **k: {'loss': 0.0, 'lr': 0.0})
    monkeypatch.setattr(engine, 'evaluate', lambda *a, **k: next(results))
    loader_train = DataLoader(TensorDataset(torch.arange(4)), batch_size=2)
    loader_val = DataLoader(TensorDataset(torch.arange(7)), batch_size=3)
    run = engine.Training(model=None, model_without_ddp=None, criterion=None, optimizer=None,
                          lr_scheduler=argparse.Namespace(step=lambda epoch: None), scaler=None, amp=False,
                          clip_grad=None, model_ema=None, mixup_fn=None, loader_train=loader_train,
                          loader_val=loader_val, device=torch.device('cpu'))
    lines = []
    assert engine.train_epochs(run, 0, 2, -1.0, lambda *a: None, printer=lines.append) == 40.0
    assert lines == ['Accuracy of the network on the 7 test images: 40.0%', 'Max accuracy: 40.00%',
                     'Accuracy of the network on the 7 test images: 30.0%', 'Max accuracy: 40.00%']


@pytest.mark.parametrize('repeated_aug', [True, False])
def test_several_processes_draw_deits_order_of_their_seed_and_epoch(repeated_aug):
    """Under 2 processes each training loader's order is DeiT's, written out here from a permutation of 48 images
    seeded by --seed + epoch: repeated augmentation deals 3 copies of each image to the processes in turn and each
    draws 24 of them (under 256 images, 48 / 2); without it, each takes every other image of the permutation."""
    dataset = TensorDataset(torch.arange(48))
    for seed in (3, 4):
        args = finetune.get_args_parser().parse_args(['--batch-size', '4', '--num_workers', '0', '--seed', str(seed)])
        args.distributed, args.world_size, args.device, args.repeated_aug = True, 2, 'cpu', repeated_aug
        for rank in (0, 1):
            args.rank = rank
            loader = datasets.data_loader(dataset, args, train=True)
            for epoch in (0, 2):
                loader.sampler.set_epoch(epoch)
                order = torch.randperm(48, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
                if repeated_aug:
                    expected = [i for i in order for _ in range(3)][rank::2][:24]
                else:
                    expected = order[rank::2]
                assert torch.cat([batch[0] for batch in loader]).tolist() == expected, (seed, rank, epoch)


def test_training_drops_its_last_partial_batch_and_evaluation_reads_every_image_once():
    """DeiT's loaders: training batches of --batch-size, the last partial one dropped (a training set shorter than a
    batch is one batch); evaluation in batches of 1.5 x --batch-size, every image once, in order."""
    args = finetune.get_args_parser().parse_args(['--batch-size', '4', '--num_workers', '0'])
    args.distributed, args.world_size, args.rank, args.device = False, 1, 0, 'cpu'
    for n, train_sizes, eval_sizes in ((10, [4, 4], [6, 4]), (3, [3], [3])):
        dataset = TensorDataset(torch.arange(n))
        train = [batch[0] for batch in datasets.data_loader(dataset, args, train=True)]
        assert [len(b) for b in train] == train_sizes, n
        assert len(set(torch.cat(train).tolist())) == sum(train_sizes), n
        evaluation = [batch[0] for batch in datasets.data_loader(dataset, args, train=False)]
        assert [len(b) for b in evaluation] == eval_sizes, n
        assert torch.cat(evaluation).tolist() == list(range(n)), n


def test_smoothed_values_format_the_window_and_the_whole_run():
    """A meter formats the median and mean of its window (the last window_size values), the average over every
    update weighted by its count, and the last value, as DeiT's does; the progress line shows median (average)."""
    from utils.progress import MetricLogger, SmoothedValue
    meter = SmoothedValue(window_size=3, fmt='{median:.1f} {avg:.2f} {global_avg:.3f} {value:.1f}')
    for value, n in ((10.0, 1), (1.0, 3), (2.0, 1), (6.0, 1)):
        meter.update(value, n)
    assert str(meter) == f'2.0 3.00 {(10 + 3 + 2 + 6) / 6:.3f} 6.0'
    lines = []
    logger = MetricLogger(printer=lines.append)
    for i in logger.log_every(range(3), print_freq=2, header='Test:'):
        logger.update(loss=float(i + 1))
    assert [line.split('  ')[0] for line in lines[:2]] == ['Test: [0/3]', 'Test: [2/3]']
    assert 'loss: 2.0000 (2.0000)' in lines[1] and lines[2].startswith('Test: Total time: ')


def test_a_meters_average_over_processes_weighs_every_processs_images(monkeypatch):
    """After synchronising, a meter's global average is the sum of every process's values (each times its count)
    over the sum of their counts: this process's 2 images of loss 1 and 4 images of loss 4 with another process's
    3 images of loss 10 average (2 + 16 + 30) / 9, not their total over this process's 6 images."""
    from utils import progress
    meter = progress.SmoothedValue()
    meter.update(1.0, 2)
    meter.update(4.0, 4)
    other = [3, 30.0]  # the other process's count and total
    monkeypatch.setattr(progress, 'all_reduce_sum', lambda values, device: torch.tensor(
        [a + b for a, b in zip(values, other)], dtype=torch.float64))
    meter.synchronize_between_processes(torch.device('cpu'))
    assert (meter.count, meter.global_avg) == (9, pytest.approx((2 + 16 + 30) / 9))


class TimedBatches:
    """Four batches, each taking ``data[i]`` seconds of the fake ``clock`` to load."""

    def __init__(self, clock, data):
        self.clock, self.data = clock, data

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for i, seconds in enumerate(self.data):
            self.clock[0] += seconds
            yield i


def test_progress_lines_show_the_eta_of_the_mean_step_and_the_last_step(monkeypatch):
    """On a fake clock: a step's time is its loading and its work, the ETA is the mean step time so far times the
    steps left, the last step is printed whatever print_freq says, then the total."""
    import types
    from utils import progress
    clock = [0.0]
    monkeypatch.setattr(progress, 'time', types.SimpleNamespace(time=lambda: clock[0]))
    data, work = [1, 0, 2, 1], [9, 20, 28, 10]  # steps of 10, 20, 30 and 11 seconds
    lines = []
    logger = progress.MetricLogger(printer=lines.append)
    for i in logger.log_every(TimedBatches(clock, data), print_freq=2, header='Epoch: [0]'):
        clock[0] += work[i]
    # printed after steps 0, 2 and (the last) 3: mean step 10, 20 and 71 / 4 s, with 3, 1 and 0 steps left
    assert [line.split('  ') for line in lines[:3]] == [
        ['Epoch: [0] [0/4]', 'eta: 0:00:30', '', 'time: 10.0000', 'data: 1.0000'],
        ['Epoch: [0] [2/4]', 'eta: 0:00:20', '', 'time: 20.0000', 'data: 1.0000'],
        ['Epoch: [0] [3/4]', 'eta: 0:00:00', '', 'time: 17.7500', 'data: 1.0000']]
    assert lines[3:] == ['Epoch: [0] Total time: 0:01:11 (17.7500 s / it)']


def test_the_eta_and_step_time_are_the_mean_of_every_step_not_of_the_last_twenty(monkeypatch):
    """Past the meters' window of 20 values the ETA and the step time are still the mean over every step so far:
    3 slow steps (100 s) then 1-second ones, printed at step 22 of 30, give (300 + 20) / 23 s per step and 7 steps
    left, not the last twenty steps' 1 s."""
    import types
    from utils import progress
    clock = [0.0]
    monkeypatch.setattr(progress, 'time', types.SimpleNamespace(time=lambda: clock[0]))
    work = [100] * 3 + [1] * 27
    lines = []
    logger = progress.MetricLogger(printer=lines.append)
    for i in logger.log_every(TimedBatches(clock, [0] * 30), print_freq=22, header='Test:'):
        clock[0] += work[i]
    mean = sum(work[:23]) / 23
    assert lines[1].split('  ') == ['Test: [22/30]', f'eta: {datetime.timedelta(seconds=int(mean * 7))}', '',
                                    f'time: {mean:.4f}', 'data: 0.0000']


def test_only_the_first_process_prints_and_writes_tensorboard(monkeypatch, tmp_path, capsys):
    """rank0_print and TensorBoard are silent on every process but the first (whose output they are)."""
    from utils import progress
    for main in (False, True):
        monkeypatch.setattr(progress, 'is_main_process', lambda: main)
        progress.rank0_print('Max accuracy: 50.00%')
        tb = progress.TensorBoard(str(tmp_path / f'tb-{main}'))
        tb.scalars({'loss': 1.0}, 0)
        tb.close()
    assert capsys.readouterr().out == 'Max accuracy: 50.00%\n'
    assert not (tmp_path / 'tb-False').exists()
    assert [p.name.startswith('events.out.tfevents') for p in (tmp_path / 'tb-True').iterdir()] == [True]


# ----------------------------------------------------------------------------------------------------------
# several processes

def gap_model_with_an_idle_block():
    """A ViT without prefix tokens (global average pooling) whose middle block's mask keeps no token."""
    torch.manual_seed(0)
    model = models.apply_clip_concat(timm.create_model('vit_base_patch16_gap_224', img_size=32, depth=3, embed_dim=32,
                                                       num_heads=2, num_classes=4))
    keep, clip = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)
    model.set_masks([keep, clip, keep])
    return model


def idle_block_batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]


def two_steps(model, batches, rank=0, world=1):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in batches:
        per_process = x.shape[0] // world
        rows = slice(rank * per_process, (rank + 1) * per_process)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()


def ddp_two_steps(rank, port, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        model = gap_model_with_an_idle_block()
        two_steps(finetune.distributed_model(model, torch.device('cpu')), idle_block_batches(), rank, 2)
        torch.save(model.state_dict(), f'{out}/rank{rank}.pth')
    finally:
        dist.destroy_process_group()


def test_a_block_that_keeps_no_token_trains_under_several_processes(tmp_path):
    """DDP waits for every parameter's gradient unless told otherwise: a block whose mask keeps nothing has none,
    and the second step stopped in a RuntimeError.  Two processes on half a batch each now end with the weights of
    one process on the whole batch (gradients averaged), and the idle block's weights untouched."""
    import torch.multiprocessing as mp
    from conftest import free_port
    mp.spawn(ddp_two_steps, args=(free_port(), str(tmp_path)), nprocs=2)
    reference = gap_model_with_an_idle_block()
    idle = {k: v.clone() for k, v in reference.state_dict().items() if k.startswith('blocks.1.')}
    two_steps(reference, idle_block_batches())
    for rank in range(2):
        got = torch.load(tmp_path / f'rank{rank}.pth', weights_only=True)
        for key, value in reference.state_dict().items():
            assert torch.allclose(got[key], value, atol=1e-6), (rank, key)
        assert all(torch.equal(got[k], v) for k, v in idle.items())
    untrained = gap_model_with_an_idle_block()
    assert not torch.equal(reference.blocks[0].attn.qkv.weight, untrained.blocks[0].attn.qkv.weight)


# ----------------------------------------------------------------------------------------------------------
# the epoch loop: training and evaluation modes, the epoch's averaged loss

class ModeRecorder(nn.Module):
    """A linear classifier that records, at every forward, whether it was called in training mode."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.linear(x)


def two_epochs_of_a_mode_recorder():
    """engine.train_epochs for 2 epochs of a ModeRecorder left in eval mode, at lr 0 (the weights stay), on 4 images
    in training batches of 3 and 1.  Returns (model, the images, their labels, each epoch's training stats)."""
    torch.manual_seed(0)
    model = ModeRecorder().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, generator=g), torch.tensor([0, 2, 1, 1])
    run = engine.Training(model=model, model_without_ddp=model, criterion=lambda s, out, t: F.cross_entropy(out, t),
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                          lr_scheduler=argparse.Namespace(step=lambda epoch: None),
                          scaler=torch.amp.GradScaler('cuda', enabled=False), amp=False, clip_grad=None,
                          model_ema=None, mixup_fn=None, loader_train=DataLoader(TensorDataset(x, y), batch_size=3),
                          loader_val=DataLoader(TensorDataset(x, y), batch_size=4), device=torch.device('cpu'))
    stats = []
    engine.train_epochs(run, 0, 2, -1.0, lambda epoch, train_stats, *rest: stats.append(train_stats),
                        printer=lambda *a: None)
    return model, x, y, stats


def test_each_epoch_trains_in_training_mode_and_evaluates_in_eval_mode():
    """From a model left in eval mode, each epoch trains in training mode (dropout, drop-path on) and evaluates in
    eval mode, whatever mode the step before left it in."""
    model, _, _, _ = two_epochs_of_a_mode_recorder()
    assert model.modes == [True, True, False] * 2


def test_the_epoch_loss_is_the_mean_over_its_images():
    """The epoch's logged loss is the mean over its images: a last batch of 1 image weighs a quarter (of 4
    images), not a half (of 2 batches)."""
    model, x, y, stats = two_epochs_of_a_mode_recorder()
    with torch.no_grad():
        per_image = F.cross_entropy(model.linear(x), y, reduction='none')
    assert [s['loss'] for s in stats] == [pytest.approx(per_image.mean().item(), rel=1e-6)] * 2
    assert per_image.mean().item() != pytest.approx((per_image[:3].mean() + per_image[3]).item() / 2, rel=1e-3)


class InputRecorder(nn.Module):
    """A linear classifier (4 features, 3 classes) that records the inputs of every forward."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(4, 3)
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.linear(x)


def one_epoch(model, criterion, x, y, batch_size, lr=0.0, **kwargs):
    """engine.train_one_epoch of ``model`` over (x, y) in order, plain SGD at ``lr``; returns its stats."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    kwargs.setdefault('scaler', torch.amp.GradScaler('cpu', enabled=False))
    return engine.train_one_epoch(model, criterion, loader, optimizer, torch.device('cpu'), 0, printer=lambda *a: None,
                                  **kwargs)


def test_the_epochs_loss_terms_are_their_means_over_its_images():
    """The logged loss_base and loss_kd of an epoch are means over its images, as its loss is: with batches of 3
    images and 1, CE and tau^2 * KL(teacher || student) / classes per image, averaged over the 4 images."""
    from losses import DistillationLoss
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 4, generator=g), torch.tensor([0, 2, 1, 1])
    student, teacher, tau = InputRecorder(0), InputRecorder(1).eval(), 2.0
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', 0.5, tau)
    stats = one_epoch(student, criterion, x, y, batch_size=3)
    with torch.no_grad():
        s, t = student.linear(x), teacher.linear(x)
    base = F.cross_entropy(s, y, reduction='none')
    p_t = torch.softmax(t / tau, dim=1)
    kd = (p_t * (p_t.log() - torch.log_softmax(s / tau, dim=1))).sum(dim=1) * tau ** 2 / 3
    assert stats['loss_base'] == pytest.approx(base.mean().item(), rel=1e-5)
    assert stats['loss_kd'] == pytest.approx(kd.mean().item(), rel=1e-5)
    assert stats['loss'] == pytest.approx((base + 0.5 * kd).mean().item(), rel=1e-5)
    # the mean of the two batches' means is another number: weighing each batch alike would show
    for per_image in (base, kd):
        assert per_image.mean().item() != pytest.approx((per_image[:3].mean() + per_image[3]).item() / 2, rel=1e-3)


def test_the_teacher_sees_the_mixed_images_the_student_trains_on():
    """Under mixup the student and the teacher both see the mixed batch (DeiT), not the images before mixing."""
    from losses import DistillationLoss
    from timm.loss import SoftTargetCrossEntropy
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 4, generator=g), torch.tensor([0, 2, 1, 1])

    def mix(samples, targets):  # half of each image and half of the batch's reversed one
        soft = F.one_hot(targets, 3).float()
        return 0.5 * samples + 0.5 * samples.flip(0), 0.5 * soft + 0.5 * soft.flip(0)
    student, teacher = InputRecorder(0), InputRecorder(1).eval()
    criterion = DistillationLoss(SoftTargetCrossEntropy(), teacher, 'soft', 0.5, 1.0)
    one_epoch(student, criterion, x, y, batch_size=4, mixup_fn=mix)
    mixed = 0.5 * x + 0.5 * x.flip(0)
    assert len(student.inputs) == len(teacher.inputs) == 1
    assert torch.equal(student.inputs[0], mixed) and torch.equal(teacher.inputs[0], mixed)


@pytest.mark.parametrize('clip', [None, 0.05])
def test_a_scaled_loss_steps_with_the_unscaled_gradient_clipped_to_its_norm(clip):
    """With mixed precision's loss scaler on (a CPU GradScaler here, scale 1024), the step is SGD on the true
    gradient: unscaled before it is clipped to a total norm of --clip-grad, not clipped at 1024 times its size."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 4, generator=g), torch.tensor([0, 2, 1, 1])
    model, lr = InputRecorder(0), 0.5
    start = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    norm = math.sqrt(sum(float((gr.double() ** 2).sum()) for gr in grads))
    if clip is not None:
        assert norm > 4 * clip  # clipping changes this step
        grads = [gr * (clip / (norm + 1e-6)) for gr in grads]
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    one_epoch(model, lambda s, out, t: F.cross_entropy(out, t), x, y, batch_size=4, lr=lr, scaler=scaler,
              max_norm=clip)
    assert scaler.get_scale() == 1024.0  # (no inf or NaN was found: the step was taken)
    for p, p0, gr in zip(model.parameters(), start, grads):
        assert torch.allclose(p.detach(), p0 - lr * gr, rtol=1e-5, atol=1e-7)


def test_mixed_precision_runs_the_training_and_evaluation_forwards_under_autocast():
    """amp=True: the model's forward runs under autocast in training and in evaluation (fp16 on CUDA; bf16 here on
    the CPU), and amp=False without it."""
    seen = []

    class AutocastRecorder(InputRecorder):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled('cpu'))
            return super().forward(x)
    x, y = torch.randn(4, 4), torch.tensor([0, 2, 1, 1])
    for amp in (True, False):
        model = AutocastRecorder(0)
        one_epoch(model, lambda s, out, t: F.cross_entropy(out.float(), t), x, y, batch_size=4, amp=amp)
        engine.evaluate(DataLoader(TensorDataset(x, y), batch_size=4), model, torch.device('cpu'), amp=amp,
                        printer=lambda *a: None)
        assert seen == [amp, amp], amp
        seen.clear()


def test_the_original_timing_runs_in_fp32_with_autograd_under_the_callers_autocast_and_no_grad():
    """original_pass_seconds times the model in fp32 with autograd on, as the original code did; under a caller's
    autocast its passes ran in bfloat16."""
    seen = []

    def run(x):
        seen.append((torch.is_grad_enabled(), (x @ torch.ones(1, 1)).dtype))

    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        engine.original_pass_seconds(run, torch.ones(2, 1), 2)
    assert seen == [(True, torch.float32)] * 2
