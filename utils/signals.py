"""How a run stops: SIGTERM unwound like Ctrl-C (:class:`Terminated`), stops held while a step that an exception
would break runs (a DataLoader starting its workers), DataLoader workers that end quietly, and the errors of a
stop that is not the user's (out of memory, a lost peer process) told apart from the rest."""
import contextlib
import os
import re
import signal
import sys
import threading
import weakref
from typing import Optional

import torch

from .errors import escape_controls
from .progress import print_line


EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C), what a shell reports for a job ended by it
EXIT_TERMINATED = 143  # 128 + SIGTERM, likewise


class Terminated(BaseException):
    """SIGTERM (a cluster scheduler's preemption, `kill`, torchrun stopping its workers).  A BaseException, so it
    unwinds like Ctrl-C: a checkpoint being written is discarded and the last complete one stays."""


@contextlib.contextmanager
def sigterm_unwinds(ends_process: bool = False):
    """While inside, SIGTERM raises Terminated in the main thread instead of ending the process on the spot, and
    Ctrl-C (under Python's own handler) raises KeyboardInterrupt as before.  Once one of them has, the stop is under
    way: a second signal (a second Ctrl-C, torchrun's SIGTERM after it) raises nothing into its unwinding (a
    DataLoader shutting down its workers, the line saying what is kept); the process ends, with the first stop's
    exit code, as soon as that line is out (:func:`stop_said`), or at once if the line is out already or a third
    signal comes.  That is with ``ends_process`` (the CLI run as a script): called in-process (by tests, scripts, a
    notebook), the caller's process is not ended under it: where it would be, the first stop's KeyboardInterrupt or
    Terminated is raised instead, for the caller to have.  The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _stopping():
            if _STOP['said'] or _STOP['again']:
                _exit_now()
            _STOP['again'] = True
            return
        if _HELD['depth']:
            _HELD['pending'] = _HELD['pending'] or signum  # (the first signal stops the run)
            return
        raise _stop(signum)

    _HELD.update(depth=0, pending=None)
    _STOP.update(code=None, exception=None, said=False, again=False, ends_process=ends_process)
    # each previous handler noted before its swap and put back even if a signal raises between the two swaps
    previous = {}
    try:
        previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not a caller's own)
            previous[signal.SIGINT] = signal.default_int_handler
            signal.signal(signal.SIGINT, handler)
        yield
    finally:
        try:
            if signal.SIGTERM in previous:
                signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
        finally:
            if signal.SIGINT in previous:
                signal.signal(signal.SIGINT, previous[signal.SIGINT])


_HELD = {'depth': 0, 'pending': None}  # sigterm_held: how deep inside, and the signal that came meanwhile
# sigterm_unwinds: the last stop (its exit code, its exception, referred to weakly), whether its line is out, whether
# a second signal came, and whether the stop may end the process (the CLI run as a script)
_STOP = {'code': None, 'exception': None, 'said': False, 'again': False, 'ends_process': False}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C under :func:`sigterm_unwinds`: a KeyboardInterrupt that a weak reference can follow."""


def _stop(signum) -> BaseException:
    """The exception that stops the run for ``signum``, noting the stop as under way."""
    exception = Terminated() if signum == signal.SIGTERM else Interrupted()
    _STOP.update(code=EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED,
                 exception=weakref.ref(exception), said=False, again=False)
    return exception


def _stopping() -> bool:
    """Whether a stop is under way: its line is out, or its exception still unwinds or is being reported (one
    swallowed on the way, as an exception raised in a ``__del__`` is, stopped nothing: the next signal stops)."""
    return _STOP['said'] or (_STOP['exception'] is not None and _STOP['exception']() is not None)


def _exit_now():
    if not _STOP['ends_process']:  # (main called in-process: the caller's process is not this module's to end)
        raise Terminated() if _STOP['code'] == EXIT_TERMINATED else KeyboardInterrupt()
    exit_at_once(_STOP['code'])


def exit_at_once(code: int) -> None:
    """Ends the process with ``code`` after flushing stdout and stderr, not through the interpreter's shutdown
    (where a further signal, Python's handlers back, would print a traceback or end the process by the signal)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # (a write the signal cut, or a reader gone: what it had is lost, not the exit)
            pass
    os._exit(code)


def end_script(code: int) -> None:
    """Ends a script's process with its main's exit ``code``: a stop by a signal (130, 143: said and cleaned up)
    at once (:func:`exit_at_once`, no further signal heard), any other through sys.exit."""
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        exit_at_once(code)
    sys.exit(code)


def stop_said() -> None:
    """The line saying what a stopped run has kept is out: a second signal that came meanwhile ends the process now
    (the rest is cleanup), as will one that comes later (in-process: raises the stop's exception, as
    :func:`sigterm_unwinds` says)."""
    if _stopping():
        _STOP['said'] = True
        if _STOP['again']:
            _exit_now()


def say_stopped(e: BaseException, what_is_kept: str, prefix: str = '', during: str = '') -> int:
    """Says, as one line on stderr (after ``prefix``: a process's rank), that the run was stopped by ``e`` (Ctrl-C:
    'interrupted'; SIGTERM, raised as :class:`Terminated`: 'terminated (SIGTERM)'), ``during`` what if given (the
    stage under way: 'stage 2 (prune)'), and ``what_is_kept``; the stop is then said (:func:`stop_said`).  Returns
    its exit code (130, 143).  For a script whose stops are caught under :func:`sigterm_unwinds`."""
    terminated = isinstance(e, Terminated)
    print_line(prefix + escape_controls(f'{"terminated (SIGTERM)" if terminated else "interrupted"}'
                                        f'{" during " + during if during else ""}; {what_is_kept}'), file=sys.stderr)
    stop_said()
    return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


@contextlib.contextmanager
def sigterm_held():
    """While inside, a SIGTERM or a Ctrl-C (under :func:`sigterm_unwinds`, or Python's own handler) is noted,
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
            signum, _HELD['pending'] = _HELD['pending'], None
            raise _stop(signum)
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
