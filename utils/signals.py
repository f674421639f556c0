"""How a run stops: SIGTERM unwound like Ctrl-C (:class:`Terminated`), stops held while a step that an exception
would break runs (a DataLoader starting its workers), DataLoader workers that end quietly, and the errors of a
stop that is not the user's (out of memory, a lost peer process) told apart from the rest."""
import contextlib
import re
import signal
import threading
from typing import Optional

import torch


class Terminated(BaseException):
    """SIGTERM (a cluster scheduler's preemption, `kill`, torchrun stopping its workers).  A BaseException, so it
    unwinds like Ctrl-C: a checkpoint being written is discarded and the last complete one stays."""


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM raises Terminated in the main thread instead of ending the process on the spot.
    The previous handler comes back afterwards (the CLI's main() is also called in-process, by tests and
    scripts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _HELD['depth']:
            _HELD['pending'] = True
            return
        raise Terminated()

    _HELD.update(depth=0, pending=False)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_HELD = {'depth': 0, 'pending': False}  # sigterm_held: how deep inside, and whether a SIGTERM came meanwhile


@contextlib.contextmanager
def sigterm_held():
    """While inside, a SIGTERM (under :func:`sigterm_unwinds`) or a Ctrl-C (under Python's own handler) is noted,
    and raised as Terminated or KeyboardInterrupt on the way out: for a step that an exception would leave broken,
    a DataLoader starting its workers (os.fork's callbacks swallow an exception raised in them, so the stop was
    lost, and an iterator cut while it starts cannot shut down the workers it has started)."""
    interrupted = []
    previous_int = None
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        previous_int = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    _HELD['depth'] += 1
    try:
        yield
    finally:
        _HELD['depth'] -= 1
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
        if not _HELD['depth'] and _HELD['pending']:
            _HELD['pending'] = False
            raise Terminated()
        if interrupted:
            raise KeyboardInterrupt


def _stop_quietly(signum, frame):
    raise KeyboardInterrupt


def worker_stops_quietly_on_sigterm(worker_id: int) -> None:
    """A DataLoader worker ends on SIGTERM as on Ctrl-C: torch's worker loop returns on KeyboardInterrupt (exit
    code 0) and the main process stops the run.  A scheduler that signals every process of the job (SLURM, a
    kill of the process group) reaches the workers too; under torch's own handler they die by the signal, which
    the main process reports as a failed worker (a traceback, exit code 1) instead of its one line and 143.
    Ctrl-C gets Python's own handler back (the worker was forked under :func:`sigterm_held`'s)."""
    signal.signal(signal.SIGTERM, _stop_quietly)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def lost_peer(e: BaseException) -> bool:
    """A collective failed because another process of the job stopped (it prints its own error)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dist_error = getattr(torch.distributed, 'DistError', None)
    text = str(e)
    return (dist_error is not None and isinstance(e, dist_error)) or any(marker in text for marker in (
        'Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'remote worker crashing'))


def cpu_out_of_memory(e: BaseException) -> Optional[str]:
    """For the error torch's CPU allocator raises when it cannot allocate (a plain RuntimeError, unlike the GPU's
    OutOfMemoryError), what was asked for ('Tried to allocate 32.00 GiB'); None for any other error."""
    found = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    return found and f'Tried to allocate {int(found.group(1)) / 2 ** 30:.2f} GiB'


def cuda_out_of_memory(e: BaseException) -> Optional[str]:
    """For CUDA's own out-of-memory errors, raised where memory is taken outside torch's caching allocator (a CUDA
    context, cuBLAS's or cuDNN's handles and workspaces, pinned host memory: a plain RuntimeError, not
    OutOfMemoryError), the error; None for any other error."""
    found = re.search(r'CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED', str(e))
    return found and found.group(0)


def past_64_bits(e: BaseException) -> Optional[str]:
    """For torch's error when a tensor's size in bytes does not fit in 64 bits (a batch or an image size that no
    machine holds), the sizes asked for; None for any other error."""
    found = re.search(r'Storage size calculation overflowed with sizes=(\[[\d, ]*\])', str(e))
    return found and f'Tried to allocate a tensor of sizes {found.group(1)}, more bytes than 64 bits count'
