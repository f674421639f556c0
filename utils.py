"""Small shared pieces: user-facing errors, distributed set-up, safe checkpoint I/O, progress logging."""
import argparse
import datetime
import os
import pickle
import sys
import time
from collections import defaultdict, deque
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake in what the user asked for; the CLI prints it as one line and exits non-zero."""


# ----------------------------------------------------------------------------------------------------------
# distributed

def init_distributed_mode(args) -> None:
    """Join the process group set up by ``torch.distributed.launch --use_env`` or ``torchrun``.

    NCCL on CUDA, gloo otherwise. Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu``.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', 0))
    else:
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    args.distributed = True
    if args.device.startswith('cuda'):
        torch.cuda.set_device(args.gpu)
        args.device = f'cuda:{args.gpu}'
        backend = 'nccl'
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, init_method='env://', world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=30))
    dist.barrier()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(values, device) -> torch.Tensor:
    """Sum a list of numbers over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_dist():
        dist.all_reduce(t)
    return t


def all_agree(flag: bool, device) -> bool:
    """True only if ``flag`` holds on every process (so all processes stop together)."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    if is_dist():
        dist.all_reduce(t)
    return t.item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# checkpoints

# What checkpoints of this project and of the released code may hold besides tensors and containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint_file(path: str) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed.

    Every failure becomes a one-line :class:`UserError` naming the file and the problem.
    """
    if not path:
        raise UserError('no checkpoint given')
    if not os.path.exists(path):
        raise UserError(f'checkpoint not found: {path}')
    if os.path.isdir(path):
        raise UserError(f'checkpoint is a directory, not a file: {path}')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if 'GLOBAL ' in text or 'Unsupported global' in text or 'not an allowed global' in text:
            culprit = _unsupported_global(text)
            raise UserError(f'refusing to load {path}: it holds {culprit}, which could run code when unpickled '
                            f'(only tensors, plain containers and argparse.Namespace are allowed)') from None
        if 'Weights only load failed' in text:  # the restricted unpickler stopped at an instruction it refuses
            raise UserError(f'{path} is not a readable PyTorch checkpoint (corrupt, or pickled objects the safe '
                            f'loader refuses: {_weights_only_detail(text)})') from None
        raise UserError(f'{path} is not a readable PyTorch checkpoint ({_first_line(text)})') from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001  (garbage bytes fail anywhere in the unpickler: KeyError, IndexError, ...)
        raise UserError(f'{path} is not a readable PyTorch checkpoint (truncated or corrupt: '
                        f'{_describe(e)})') from None
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    return checkpoint


def _first_line(text: str) -> str:
    """The first sentence of the first non-empty line (torch's messages go on with advice), at most 200 chars."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line.split('. ', 1)[0].rstrip('.')[:200]
    return 'unknown error'


def _describe(e: BaseException) -> str:
    text = _first_line(str(e))
    if text == 'unknown error' or len(text) < 8:  # e.g. KeyError: 101 from a garbage pickle stream
        return f'{type(e).__name__} {text}' if text != 'unknown error' else type(e).__name__
    return text


def _weights_only_detail(text: str) -> str:
    """The unpickler's own complaint inside torch's long weights_only message (e.g. 'Unsupported operand 103')."""
    boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation', 'In PyTorch',
                   '(1)', '(2)')
    for line in text.splitlines():
        line = line.replace('WeightsUnpickler error:', '').strip()
        if line and not line.startswith(boilerplate):
            return line.split('. ', 1)[0].rstrip('.')[:200]
    return 'unsupported content'


def _unsupported_global(text: str) -> str:
    for marker in ('Unsupported global: GLOBAL ', 'GLOBAL '):
        if marker in text:
            rest = text.split(marker, 1)[1]
            return 'the object ' + rest.split()[0].rstrip('.,')
    return 'an object that is not on the allow-list'


def state_dict_of(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The model weights of an official DeiT, pruned, finetune or bare state-dict checkpoint."""
    for key in ('model', 'state_dict'):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            sd = checkpoint[key]
            break
    else:
        sd = checkpoint
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError('checkpoint holds no model state dict (expected a "model" entry of tensors)')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` with ``torch.save`` to a temporary file in the same directory, then rename it over
    ``path``: a job killed while saving leaves the previous file intact."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # disk full, directory removed, ...: one line, the previous file is intact
            what = 'the previous file is untouched' if os.path.exists(path) else 'nothing was written'
            raise UserError(f'cannot write {path}: {e.strerror or e} ({what})') from None
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(paths) -> list:
    """Delete the temporary files that jobs killed inside :func:`save_atomic` left next to ``paths``."""
    removed = []
    for path in paths:
        directory, name = os.path.split(os.path.abspath(path))
        prefix = f'.{name}.tmp-'
        if not os.path.isdir(directory):
            continue
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry != f'{prefix}{os.getpid()}':
                try:
                    os.remove(os.path.join(directory, entry))
                    removed.append(entry)
                except OSError:
                    pass
    return removed


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_output_dir(path: str) -> None:
    """Create ``path`` if needed and prove it is writable, before any long work starts."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        with open(probe, 'wb') as f:
            f.write(b'ok')
        os.remove(probe)
    except OSError as e:
        raise UserError(f'cannot write to --output_dir {path}: {e.strerror or e}') from None


# ----------------------------------------------------------------------------------------------------------
# progress logging (DeiT style)

class SmoothedValue:
    """A running window of values plus the global average."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device) -> None:
        t = all_reduce_sum([self.count, self.total], device)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Prints ``header [ i/n] eta: … metrics … time: …`` every ``print_freq`` steps."""

    def __init__(self, delimiter: str = '  ', printer=print):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.printer = printer

    def update(self, n: int = 1, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v), n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self, device) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes(device)

    def averages(self) -> Dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = ''):
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = iter_time.global_avg * (total - i - 1)
                self.printer(self.delimiter.join([
                    f'{header} [{i:>{width}}/{total}]',
                    f'eta: {datetime.timedelta(seconds=int(eta))}',
                    str(self),
                    f'time: {iter_time.global_avg:.4f}',
                    f'data: {data_time.global_avg:.4f}',
                ]))
            end = time.time()
        total_time = time.time() - start
        self.printer(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
                     f'({total_time / max(total, 1):.4f} s / it)')


def print_line(*args, sep: str = ' ', file=None) -> None:
    """Print one line with a single write and flush.  The processes of a job share the launcher's pipes and
    torchrun starts them with `python -u`, where `print` writes text and newline separately: another rank's
    line could land in between."""
    stream = sys.stdout if file is None else file
    stream.write(sep.join(map(str, args)) + '\n')
    stream.flush()


def rank0_print(*args, **kwargs) -> None:
    if is_main_process():
        print_line(*args, **kwargs)


class TensorBoard:
    """Scalars to TensorBoard from rank 0 only; a no-op elsewhere or without an output directory."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, values: Dict[str, float], step: int, prefix: str = '') -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f'{prefix}{k}', v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
