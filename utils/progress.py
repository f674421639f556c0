"""Progress and results: DeiT-style progress lines with ETA, whole-line printing, TensorBoard scalars."""
import datetime
import os
import sys
import time
from collections import defaultdict, deque
from typing import Dict, Optional

import torch

from .distributed import all_reduce_sum, is_main_process
from .errors import OutputWriteError, UserError


class SmoothedValue:
    """A running window of values plus the global average; ``fmt`` may name median, avg (of the window),
    global_avg and value."""

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
    def avg(self) -> float:
        """The mean of the window."""
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


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
    line could land in between.  A stream that is closed (None, as Python sets it) takes nothing, as with
    `print`; standard output that can no longer be written (a pipe whose reader has gone, `| head`; a full disk)
    stops the run with a one-line :class:`OutputWriteError`, and what is still buffered for it goes nowhere."""
    stream = sys.stdout if file is None else file
    if stream is None:
        return
    try:
        stream.write(sep.join(map(str, args)) + '\n')
        stream.flush()
    except OSError as e:
        if stream is not sys.stdout:
            raise
        try:  # (else Python's flush at exit fails again, with a traceback-like 'Exception ignored' message)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        raise OutputWriteError(f'cannot write to standard output: {e.strerror or e}') from None


def rank0_print(*args, **kwargs) -> None:
    if is_main_process():
        print_line(*args, **kwargs)


def check_tensorboard_dir(path: str, flag: str = '--output_dir') -> None:
    """TensorBoard's writer takes only a folder whose name is UTF-8 text (it encodes it strictly): a name with
    other bytes, as Python holds them (surrogates; every name beyond ASCII under the C locale without UTF-8
    mode), ended the run in a traceback when its first scalars were written.  UserError naming ``flag`` if so."""
    try:
        path.encode('utf-8')
    except UnicodeEncodeError:
        encoding = sys.getfilesystemencoding()
        hint = ('' if encoding.lower().replace('-', '') == 'utf8' else
                f'; this locale reads file names as {encoding}: run with LC_ALL=C.UTF-8 or PYTHONUTF8=1')
        raise UserError(f'cannot write to {flag} {path}: TensorBoard writes only to a folder whose name is UTF-8 '
                        f'text{hint}') from None


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
