"""The loops: train one epoch, evaluate, measure throughput. Each returns a dict of averaged metrics."""
import contextlib
import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import MetricLogger, SmoothedValue, all_agree, all_reduce_sum


class NonFiniteLossError(Exception):
    """Training diverged; the caller stops and keeps the last good checkpoint."""


def train_one_epoch(model: nn.Module, criterion, data_loader: Iterable, optimizer, device: torch.device,
                    epoch: int, scaler, amp: bool = False, max_norm: Optional[float] = None,
                    model_ema=None, mixup_fn=None, print_freq: int = 10, printer=print) -> Dict[str, float]:
    """One pass over ``data_loader``; returns the epoch's averaged ``loss`` and last ``lr``, and with a criterion
    that reports its terms (:class:`losses.DistillationLoss` distilling) their averages too (``loss_base``,
    ``loss_kd``)."""
    model.train()
    logger = MetricLogger(printer=printer)
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for step, (samples, targets) in enumerate(logger.log_every(data_loader, print_freq, f'Epoch: [{epoch}]')):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with torch.autocast(device.type, enabled=amp):
            outputs = model(samples)
            loss = criterion(samples, outputs, targets)
        loss_value = loss.item()
        # Every process must stop together, or the others wait forever in the next all-reduce.
        if not all_agree(math.isfinite(loss_value), device):
            raise NonFiniteLossError(f'loss is {loss_value} at epoch {epoch}, step {step}')
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        try:
            scaler.step(optimizer)
        except RuntimeError as e:  # an absurd learning rate: the update itself is not a finite float
            if 'overflow' not in str(e):
                raise
            raise NonFiniteLossError(f'the optimizer step overflowed at epoch {epoch}, step {step} '
                                     f'(lr {optimizer.param_groups[0]["lr"]:g})') from None
        scaler.update()
        if model_ema is not None:
            model_ema.update(model)
        logger.update(loss=loss_value, n=samples.shape[0])
        terms = getattr(criterion, 'terms', None)
        if terms:  # (one copy from the device for all of them; loss.item() above already waited for them)
            values = torch.stack([t.float() for t in terms.values()]).tolist()
            logger.update(**dict(zip(terms, values)), n=samples.shape[0])
        logger.update(lr=optimizer.param_groups[0]['lr'])
    logger.synchronize_between_processes(device)
    stats = logger.averages()
    stats['lr'] = optimizer.param_groups[0]['lr']
    printer('Averaged stats: ' + '  '.join(f'{k} {v:.4f}' for k, v in stats.items() if k.startswith('loss'))
            + f'  lr {stats["lr"]:.6f}')
    return stats


@dataclass
class Training:
    """What a finetuning run is made of (built by the CLI, stepped by :func:`train_epochs`)."""
    model: nn.Module  # what is called: DDP-wrapped under several processes
    model_without_ddp: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: Any
    amp: bool
    clip_grad: Optional[float]
    model_ema: Optional[nn.Module]
    mixup_fn: Optional[Callable]
    loader_train: Any
    loader_val: Any
    device: torch.device


def train_epochs(run: Training, start_epoch: int, end_epoch: int, max_accuracy: float,
                 after_epoch: Callable[[int, Dict, Dict, bool, float], None], print_freq: int = 10,
                 printer=print) -> float:
    """The epoch loop: shuffle for the epoch, train, step the learning-rate schedule, evaluate, then
    ``after_epoch(epoch, train_stats, test_stats, improved, max_accuracy)`` (checkpoints, logs).  ``improved``
    is True only for an accuracy above every earlier one, so best.pth is the first epoch reaching the best.
    Returns the best Acc@1.

    The schedule is stepped to ``epoch`` after epoch ``epoch``, as DeiT and the original code do: epochs 0 and 1
    both run at t = 0 (the lr the schedule starts with), epoch k >= 1 at t = k - 1."""
    for epoch in range(start_epoch, end_epoch):
        if hasattr(run.loader_train.sampler, 'set_epoch'):
            run.loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(run.model, run.criterion, run.loader_train, run.optimizer, run.device, epoch,
                                      run.scaler, run.amp, run.clip_grad, run.model_ema, run.mixup_fn, print_freq,
                                      printer)
        run.lr_scheduler.step(epoch)
        test_stats = evaluate(run.loader_val, run.model, run.device, run.amp, print_freq, printer)
        # The epoch's last updates can break the weights while every loss they came from was finite (no later step
        # sees them): the validation loss (the same on every process) does, before anything is saved.
        if not math.isfinite(test_stats['loss']):
            raise NonFiniteLossError(f'the validation loss is {test_stats["loss"]} after epoch {epoch}: the weights '
                                     f'diverged in its last steps')
        printer(f'Accuracy of the network on the {len(run.loader_val.dataset)} test images: '
                f'{test_stats["acc1"]:.1f}%')
        improved = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        printer(f'Max accuracy: {max_accuracy:.2f}%')
        after_epoch(epoch, train_stats, test_stats, improved, max_accuracy)
    return max_accuracy


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device, amp: bool = False,
             print_freq: int = 10, printer=print) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy; counts are summed over processes, so they are exact when
    each process evaluates a disjoint part (``--dist-eval``) and unchanged when each evaluates everything."""
    model.eval()
    logger = MetricLogger(printer=printer)
    correct1 = correct5 = loss_sum = count = 0.0
    for images, targets in logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            outputs = model(images)
        outputs = outputs.float()
        loss = F.cross_entropy(outputs, targets, reduction='sum')
        top = outputs.topk(min(5, outputs.shape[1]), dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        loss_sum += loss.item()
        count += images.shape[0]
        n = max(images.shape[0], 1)
        logger.update(acc1=100.0 * hits[:, 0].float().mean().item(), n=n)
    c1, c5, total_loss, n = all_reduce_sum([correct1, correct5, loss_sum, count], device).tolist()
    n = max(n, 1.0)
    stats = {'acc1': 100.0 * c1 / n, 'acc5': 100.0 * c5 / n, 'loss': total_loss / n}
    printer(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats


def machine_facts() -> Dict[str, Any]:
    """What a reported time was measured on: CPU model, cores, torch threads and the software versions."""
    import timm
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {'cpu': cpu, 'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'platform': platform.platform()}


def steady_allocator() -> str:
    """Make glibc keep freed blocks in its heap instead of unmapping them (mallopt: mmap threshold 32 MiB, the
    most it allows, and no trimming).  By default glibc's mmap threshold adapts to the history of the
    process, so whether a 5-20 MB activation comes back as fresh pages (thousands of page faults per forward:
    14,000 in dense DeiT-Ti at batch 32 and none in the pruned model, in the same process) depends
    on what ran before.  That penalises one model or another at random in a side-by-side timing; steady, each
    pays for its compute only.  Changes the whole process: for processes that measure speed.  Returns how the
    allocator was set, for the report."""
    if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
        return 'default (not glibc)'
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 32 << 20) != 1 or libc.mallopt(m_trim_threshold, 2 ** 31 - 1) != 1:
        return 'default (mallopt refused)'
    return 'steady (glibc mallopt: mmap threshold 32 MiB, no trimming)'


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it; nothing to wait for on CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cudnn_autotune(device: torch.device):
    """``cudnn.benchmark`` on while inside, on CUDA (restored on the way out): every convolution of a fixed shape
    (a ViT's patch embedding) runs the fastest algorithm cuDNN finds on its first call, as DeiT and the original
    code ran every model, so timed rows are compared at their best, not at cuDNN's heuristic choice."""
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = saved or device.type == 'cuda'
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def time_interleaved(runs: Dict[str, Callable], x: torch.Tensor, device: torch.device, repeats: int,
                     warmup: int, dtype: Optional[torch.dtype] = None) -> Dict[str, List[float]]:
    """Seconds of each synchronised forward pass of every run on the same input, one list per run.

    The runs take turns inside a round and the starting run rotates from round to round, so drifts in clock
    speed or load, and whatever a pass leaves behind for the next one, hit all of them alike.  ``warmup``
    untimed rounds first (on CUDA they also let cuDNN pick its convolution algorithms: :func:`cudnn_autotune`).
    ``dtype`` selects autocast (fp16/bf16); None runs in fp32.  Gradients are the caller's choice (a training
    step can be timed too).
    """
    for run in runs.values():
        if isinstance(run, nn.Module):
            run.eval()
    names = list(runs)
    seconds = {name: [] for name in names}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), cudnn_autotune(device):
        for _ in range(warmup):
            for name in names:
                runs[name](x)
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                synchronize(device)
                start = time.perf_counter()
                runs[name](x)
                synchronize(device)
                seconds[name].append(time.perf_counter() - start)
    return seconds


@torch.no_grad()
def measure_throughput(models: Dict[str, nn.Module], batch_size: int, input_size: int, device: torch.device,
                       repeats: int = 10, warmup: int = 3, dtype: Optional[torch.dtype] = None
                       ) -> Dict[str, float]:
    """Images per second of each model on the same random batch: the median over ``repeats`` interleaved,
    synchronised passes (``time_interleaved``)."""
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    times = time_interleaved(models, x, device, repeats, warmup, dtype)
    return {name: batch_size / statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def original_settings(device: torch.device):
    """The original code's global settings while inside: cudnn.benchmark on, and on CUDA TF32 matmuls and
    convolutions allowed (its torch allowed them by default); restored on the way out."""
    backends = torch.backends
    saved = (backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
    backends.cudnn.benchmark = True
    if device.type == 'cuda':
        backends.cuda.matmul.allow_tf32 = True
        backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved


def original_pass_seconds(run: Callable, x: torch.Tensor, passes: int) -> float:
    """One run of the original code's timing routine (call it inside :func:`original_settings`): ``run`` in eval
    mode, fp32 and with autograd on even under the caller's ``no_grad`` (each pass builds a graph): one
    synchronisation, ``passes`` passes, one synchronisation; returns the mean seconds per pass."""
    if isinstance(run, nn.Module):
        run.eval()
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # (fp32 under a caller's autocast too)
        synchronize(x.device)
        start = time.perf_counter()
        for _ in range(passes):
            run(x)
        synchronize(x.device)
        return (time.perf_counter() - start) / passes


# The original code called its timing routine three times in a row and printed the first result as inaccurate
# (it carries the first call's set-up and cudnn's autotuning): the last run is the figure.
ORIGINAL_RUNS = 3


def original_runs_seconds(run: Callable, x: torch.Tensor, passes: int) -> List[float]:
    """The original code's timing: :data:`ORIGINAL_RUNS` runs of :func:`original_pass_seconds` back to back, no
    other warm-up; the mean seconds per pass of each run, the last being the figure."""
    return [original_pass_seconds(run, x, passes) for _ in range(ORIGINAL_RUNS)]


def throughput_original_protocol(model: nn.Module, batch_size: int, input_size: int, device: torch.device,
                                 passes: int = 50) -> List[float]:
    """Images per second of each run as the original code timed them: ``torch.rand(batch, 3, size, size)``
    through the model alone (:func:`original_runs_seconds` under :func:`original_settings`); the last is the
    figure."""
    x = torch.rand(batch_size, 3, input_size, input_size, device=device)
    with original_settings(device):
        return [batch_size / seconds for seconds in original_runs_seconds(model, x, passes)]
