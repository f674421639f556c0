"""Checkpoint files: safe loading (weights only; torch.save's formats and safetensors), and atomic writing
(temporary file, fsync, rename)."""
import argparse
import contextlib
import copy
import errno
import os
import pickle
import re
import stat
import tempfile
import warnings
import zipfile
from typing import Any, Callable, Dict, Optional, Tuple

import torch

try:
    import fcntl  # (POSIX: the lock of output_dir_held)
except ImportError:
    fcntl = None

from .errors import OutputWriteError, UserError


# What checkpoints of this project and of the released code may hold besides tensors and containers.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint_file(path: str, mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(weights_only=True)`` with only ``argparse.Namespace`` allow-listed; a safetensors file (the
    format the Hugging Face hub serves timm's weights in, ``model.safetensors``), whatever its name, is read as
    the bare state dict it holds.

    ``mmap``: map the tensors instead of reading them (cheap when only ``args`` is wanted); files in the legacy
    format, which cannot be mapped, are read.  Every failure becomes a one-line :class:`UserError` naming the
    file and the problem, except a MemoryError while loading, which propagates as it is.
    """
    if not path:
        raise UserError('no checkpoint given')
    if not os.path.exists(path):
        raise UserError(f'checkpoint not found: {path}')
    if os.path.isdir(path):
        raise UserError(f'checkpoint is a directory, not a file: {path}')
    if not os.path.isfile(path):  # (/dev/zero was read until the memory ran out; a pipe waited for a writer)
        raise UserError(f'checkpoint is not a regular file (a device, a pipe or a socket): {path}')
    if not os.access(path, os.R_OK):
        raise UserError(f'cannot read {path}: permission denied')
    if _is_safetensors(path):
        return _load_safetensors(path)
    caught = []
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings(record=True) as caught:
            checkpoint = _torch_load(path, mmap)
    except pickle.UnpicklingError as e:
        protocol = _reissue_warnings(caught)
        text = str(e)
        foreign = _foreign_file(path)
        if foreign:
            raise UserError(foreign) from None
        if 'GLOBAL ' in text or 'Unsupported global' in text or 'not an allowed global' in text:
            culprit = _unsupported_global(text)
            raise UserError(f'refusing to load {path}: it holds {culprit}, which could run code when unpickled '
                            f'(only tensors, plain containers and argparse.Namespace are allowed)') from None
        if protocol is not None and 'Unsupported operand' in text:
            raise UserError(f'cannot load {path}: it was pickled with protocol {protocol} (torch.save uses 2), '
                            f'whose instructions the safe loader (torch.load with weights_only=True) does not read; '
                            f'if it comes from a source you trust, save it again with torch.save') from None
        if 'Weights only load failed' in text:  # the restricted unpickler stopped at an instruction it refuses
            raise UserError(f'{path} is not a readable PyTorch checkpoint (corrupt, or pickled objects the safe '
                            f'loader refuses: {_weights_only_detail(text)})') from None
        raise UserError(f'{path} is not a readable PyTorch checkpoint ({_first_line(text)})') from None
    except MemoryError:
        raise
    except OSError as e:  # the file is there but cannot be read (permissions, an I/O error)
        raise UserError(f'cannot read {path}: {e.strerror or e}') from None
    except Exception as e:  # noqa: BLE001  (garbage bytes fail anywhere in the unpickler: KeyError, IndexError, ...)
        foreign = _foreign_file(path)
        raise UserError(foreign or f'{path} is not a readable PyTorch checkpoint (truncated or corrupt: '
                        f'{_describe(e)})') from None
    _reissue_warnings(caught)
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict')
    if not mmap:
        _check_crcs(path)
    return checkpoint


def _foreign_file(path: str) -> Optional[str]:
    """For a file torch.load could not read that is not in either of torch.save's formats, the error saying what it
    is instead (the unpickler's own complaint, 'Unsupported operand 60' or 'KeyError 101', does not): an empty
    file, a zip archive that is not torch's (:func:`_foreign_zip`), a gzip-compressed or tar file, an HTML page (a
    download that saved a web page), or anything else that is neither a zip archive nor a pickle.  None for a file
    that is in one of torch's formats (truncated, corrupt, or refused for what it holds: the caller says which)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(512)
    except OSError:
        return None
    if not head:
        return f'{path} is empty (0 bytes), not a PyTorch checkpoint'
    if head[257:262] == b'ustar':  # (before the zip test, which finds a zip the tar holds)
        return _foreign_tar(path)
    if head.startswith(b'\x1f\x8b'):
        return f'{path} is gzip-compressed, not a PyTorch checkpoint: decompress it (gunzip) and give the file inside'
    if zipfile.is_zipfile(path):
        return _foreign_zip(path)
    if head.startswith(b'\x80') or head.startswith(b'PK'):  # a pickle (torch.save's older format), a damaged zip
        return None
    if re.match(rb'\s*(<!doctype html|<html)', head.lower()):
        return (f'{path} is an HTML page, not a PyTorch checkpoint (a download that saved a web page, such as a '
                f'sign-in or confirmation page, instead of the file?)')
    return (f'{path} is not a readable PyTorch checkpoint: it is in neither of torch.save\'s formats (a zip archive '
            f'or a pickle) and begins {head[:16]!r}')


def _foreign_tar(path: str) -> str:
    """What a tar file is: torch's format before 1.0 (members pickle, storages, tensors), which the safe loader does
    not read, or an archive to extract the checkpoint from."""
    import tarfile
    try:
        with tarfile.open(path) as archive:
            names = archive.getnames()
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        return f'{path} is a damaged tar archive, not a PyTorch checkpoint ({_describe(e)})'
    if {'pickle', 'storages', 'tensors'} <= set(names):
        return (f'{path} is in the tar format of torch before 1.0, which the safe loader (torch.load with '
                f'weights_only=True) does not read; if it comes from a source you trust, load it with '
                f'torch.load(weights_only=False) and save it again with torch.save')
    if not names:
        return f'{path} is an empty tar archive, not a PyTorch checkpoint'
    return f'{path} is a tar archive, not a PyTorch checkpoint: it holds {_few(names)}; extract the checkpoint from it'


def _foreign_zip(path: str) -> Optional[str]:
    """For a zip archive that is not in torch.save's format (every file it writes holds a ``data.pkl``), or that is
    a TorchScript module, the error saying so (torch's own complaints name its C++ sources, or call it corrupt);
    None for any other file."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    if any(name.endswith('/constants.pkl') for name in names):  # torch.jit.save's archive: code and constants
        return (f'{path} is a TorchScript archive (torch.jit.save), not a checkpoint of weights: load it with '
                f'torch.jit.load and save its state_dict() with torch.save')
    if any(name == 'data.pkl' or name.endswith('/data.pkl') for name in names):
        return None
    if not names:
        return f'{path} is an empty zip archive, not a PyTorch checkpoint'
    return (f'{path} is a zip archive but not a PyTorch checkpoint: it holds {_few(names)} and no data.pkl (every '
            f'file torch.save writes has one)')


def _few(names, n: int = 3) -> str:
    return ', '.join(names[:n]) + (f' and {len(names) - n} more' if len(names) > n else '')


def _check_crcs(path: str) -> None:
    """A file in torch's zip format whose bytes changed after it was written (a bad disk, a partial copy over an
    older file) still unpickles, with wrong weights: every entry's CRC-32 is checked against the zip directory's.
    The legacy (non-zip) format carries no checksums."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise UserError(f'{path} is corrupt: its zip archive cannot be read ({_describe(e)})') from None
    if bad is not None:
        raise UserError(f'{path} is corrupt: its entry {bad} does not match its checksum (the file changed after it '
                        f'was written)')


def _reissue_warnings(caught: list) -> Optional[int]:
    """Issue again the warnings ``caught`` while loading (now that the recording context is left), except torch's
    about the pickle protocol, whose protocol is returned instead (it becomes part of the error), or None."""
    protocol = None
    for w in caught:
        found = re.search(r'Detected pickle protocol (\d+)', str(w.message))
        if found:
            protocol = int(found.group(1))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return protocol


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts as a safetensors file does: the length of its JSON header (8 bytes, little-endian),
    within the file, then the header's opening brace.  torch.save's zip archives start with ``PK`` and its legacy
    pickles with 0x80, neither of which reads as such a length."""
    try:
        with open(path, 'rb') as f:
            head = f.read(9)
        size = os.path.getsize(path)
    except OSError as e:
        raise UserError(f'cannot read {path}: {e.strerror or e}') from None
    return len(head) == 9 and 2 <= int.from_bytes(head[:8], 'little') <= size - 8 and head[8:] == b'{'


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, by name (it holds nothing else: no pickled code to refuse, no args)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, ValueError, TypeError) as e:  # a bad header, a truncated file, an unknown dtype
        raise UserError(f'{path} is not a readable safetensors file ({_first_line(str(e))})') from None
    except OSError as e:
        raise UserError(f'cannot read {path}: {e.strerror or e}') from None


def _torch_load(path: str, mmap: bool):
    if mmap:
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e):  # only the legacy (non-zip) format is read the ordinary way
                raise
    return torch.load(path, map_location='cpu', weights_only=True)


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
    """The model weights of an official DeiT, pruned, finetune or bare state-dict checkpoint.  A file that holds
    only averaged weights (``model_ema``, or timm's ``state_dict_ema``, without ``model`` or ``state_dict``) gives
    those, as timm's loader does: they are the only weights it has."""
    for key in ('model', 'state_dict', 'model_ema', 'state_dict_ema'):
        if key in checkpoint:
            sd = checkpoint[key]
            if not isinstance(sd, dict):
                raise UserError(f'its "{key}" entry is a {type(sd).__name__}, not a state dict of named tensors')
            break
    else:
        sd = checkpoint
    if not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError('checkpoint holds no model state dict (expected a "model" entry of named tensors)')
    return {_unwrapped(k): v for k, v in sd.items()}


def _unwrapped(key: str) -> str:
    """A state-dict key without the prefixes wrappers add: DistributedDataParallel/DataParallel's ``module.``
    and torch.compile's ``_orig_mod.`` (as timm's own loader strips them)."""
    while key.startswith(('module.', '_orig_mod.')):
        key = key.split('.', 1)[1]
    return key


def checkpoint_args(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The command-line arguments a checkpoint was written with, as a dict: files of this project hold a plain
    dict, released files of the original code an ``argparse.Namespace``; none at all gives {}."""
    args = checkpoint.get('args')
    if isinstance(args, argparse.Namespace):
        return vars(args).copy()
    return dict(args) if isinstance(args, dict) else {}


def write_atomic(path: str, write: Callable[[Any], None]) -> None:
    """The one atomic writer: ``write(f)`` fills a temporary file (binary) in the same directory, created if
    needed, which is flushed, fsynced and renamed over ``path``, and the rename is made durable.  A job killed
    or failing while writing leaves the previous file intact and no temporary file; an interruption (Ctrl-C,
    SIGTERM) is raised as it is, and an OSError (disk full, directory removed; inside torch.save, behind its zip
    writer's error) becomes a one-line :class:`OutputWriteError`.  A ``path`` that is a symbolic link is written
    through: the file it names is replaced, and the link stays.  The new file keeps the permissions of the file it
    replaces (a checkpoint made private with ``chmod 600`` stays private, from its first byte)."""
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    tmp = temporary_path(path)
    created = _missing_folders(directory)
    try:
        os.makedirs(directory, exist_ok=True)  # an output directory is created when its first file is written
        mode = stat.S_IMODE(os.stat(target).st_mode) if os.path.isfile(target) else None
        with open(tmp, 'wb') as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in created:  # the folders made for this file go with it (when nothing else is in them)
            try:
                os.rmdir(folder)
            except OSError:
                break
        interrupt = _interrupt_behind(e)
        if interrupt is not None:
            raise interrupt
        failed = _behind(e, lambda x: isinstance(x, OSError))  # (inside torch.save: behind its zip writer's error)
        if failed is not None:
            what = 'the previous file is untouched' if os.path.exists(path) else 'nothing was written'
            raise OutputWriteError(f'cannot write {path}: {failed.strerror or failed} ({what})') from None
        raise
    _fsync_directory(directory)


def append_line(path: str, line: str) -> None:
    """Append ``line`` and a newline to a results file (``log.txt``, ``prune_log.txt``); an OSError (disk full,
    directory removed) becomes a one-line :class:`OutputWriteError`.  A line cut short by it is what a continued
    run repairs (run_log.reconcile_log); a file that does not end in a newline (such a line, never repaired in
    ``prune_log.txt``) gets one first, so the new line stays a line of its own."""
    try:
        with open(path, 'a+b') as f:
            cut = f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b'\n'
            f.write(('\n' if cut else '').encode() + (line + '\n').encode('utf-8'))
    except OSError as e:
        raise OutputWriteError(f'cannot append to {path}: {e.strerror or e}') from None


def temporary_path(path: str, pid: object = None) -> str:
    """The temporary file :func:`write_atomic` fills before renaming it over ``path``: beside the file ``path``
    names (a symbolic link is looked through), hidden, with the id of the process writing (``pid``, this one's by
    default; '' gives the prefix every process's shares)."""
    target = os.path.realpath(path)
    pid = os.getpid() if pid is None else pid
    return os.path.join(os.path.dirname(target), f'.{os.path.basename(target)}.tmp-{pid}')


def _interrupt_behind(e: BaseException) -> Optional[BaseException]:
    """The interruption (Ctrl-C, SIGTERM: a BaseException that is not an Exception) that ``e`` is or that it
    was raised while handling, else None.  torch.save cut by a signal ends in a RuntimeError of its zip writer
    ('unexpected pos'), which would otherwise hide the stop the run reports."""
    return _behind(e, lambda x: not isinstance(x, Exception))


def _behind(e: BaseException, wanted: Callable[[BaseException], bool]) -> Optional[BaseException]:
    """The first of ``e`` and the exceptions it was raised while handling (its ``__context__`` chain) that is
    ``wanted``, else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        if wanted(e):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


def _missing_folders(directory: str) -> list:
    """The folders ``os.makedirs(directory)`` would create, deepest first (none when it exists)."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return missing


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` through :func:`write_atomic`, every tensor on the CPU: a file written by a run on a GPU
    loads with plain ``torch.load(path)`` on a machine without one (a CUDA tensor's storage records its device)."""
    obj = on_cpu(obj)
    write_atomic(path, lambda f: torch.save(obj, f))


def on_cpu(obj: Any) -> Any:
    """``obj`` with its tensors (in dicts, lists and tuples, at any depth) on the CPU; CPU tensors as they are."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == 'cpu' else obj.detach().cpu()
    if isinstance(obj, dict):
        moved = copy.copy(obj)  # its own type and attributes (a state dict's _metadata)
        moved.update((k, on_cpu(v)) for k, v in obj.items())
        return moved
    if type(obj) in (list, tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def write_text_atomic(path: str, text: str) -> None:
    """A text file through :func:`write_atomic`."""
    write_atomic(path, lambda f: f.write(text.encode()))


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


def earlier_output(path: str, kind: str, kinds: Dict[str, Tuple[str, Callable[[str], bool]]],
                   owner: str) -> Optional[str]:
    """None if nothing is at ``path`` or it is an earlier output of ``owner`` (a script, in words) of the kind
    ``kind``, so that a new run may replace it; else why it may not be replaced, for a one-line refusal made before
    any work starts.  ``kinds``: each kind of output ``owner`` writes, as {kind: (what it is in words, whether the
    file at a path is one)}; a file of another of them is named as that."""
    if not os.path.exists(path):  # nothing there, or a link to a file not written yet: it is written through
        return None
    found = [k for k, (_, is_one) in kinds.items() if os.path.isfile(path) and is_one(path)]
    if kind in found:
        return None
    if found:
        return f'{path} is {kinds[found[0]][0]} of {owner}, not {kinds[kind][0]}; refusing to overwrite it'
    return f'{path} exists and is not an output of {owner}; refusing to overwrite it'


def remove_stale_temporaries(paths) -> list:
    """Delete the temporary files that jobs killed inside :func:`write_atomic` left next to ``paths`` (next to the
    file a path that is a symbolic link names, where write_atomic writes them)."""
    removed = []
    for path in paths:
        directory, prefix = os.path.split(temporary_path(path, pid=''))
        own = os.path.basename(temporary_path(path))
        if not os.path.isdir(directory):
            continue
        for entry in os.listdir(directory):
            if entry.startswith(prefix) and entry != own:
                try:
                    os.remove(os.path.join(directory, entry))
                    removed.append(entry)
                except OSError:
                    pass
    return removed


def in_use_message(directory: str) -> str:
    return (f'{directory} is in use by another finetuning run, still running there (its checkpoints and log would be '
            f'written over); wait for it to end or choose another --output_dir')


@contextlib.contextmanager
def output_dir_held(directory: str, warn=print):
    """While inside, ``directory`` is this process's: an exclusive lock on the folder itself (flock, released when
    the process ends, even killed), so that a second run started in it while this one runs (the same command twice,
    a job requeued while the first still runs) is refused with a one-line :class:`UserError` instead of writing
    its checkpoints and log over this one's.  The folder is created if needed, and removed on the way out if this
    created it and it is still empty (a run that wrote nothing leaves no folder).  On a file system without such
    locks (some network ones) or without ``fcntl`` the run goes on unguarded, and ``warn`` says so."""
    created = _missing_folders(os.path.abspath(directory))
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise OutputWriteError(f'cannot write to {directory}: {e.strerror or e}') from None
    try:
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, 'no fcntl module on this platform')
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(in_use_message(directory)) from None
        except OSError as e:  # (ENOLCK, EOPNOTSUPP, ENOSYS: a lock is a guard, not what the run needs)
            warn(f'note: cannot lock {directory} ({e.strerror or e}): a second run started there meanwhile would '
                 f'not be refused')
        yield
    finally:
        os.close(fd)
        for folder in created:
            try:
                os.rmdir(folder)
            except OSError:
                break


MAX_NEW_FOLDERS = 256  # that an output folder may need created, well within os.makedirs' recursion


def _path_limit(folder: str, name: str, default: int) -> int:
    """The file system's limit ``name`` (os.pathconf's) for paths in ``folder``; ``default`` where none is told."""
    try:
        limit = os.pathconf(folder, name)
    except (OSError, ValueError, AttributeError):
        return default
    return limit if limit > 0 else default


def name_too_long(path: str) -> bool:
    """Whether the file name of ``path``, or that of the temporary file :func:`write_atomic` fills beside it, is
    longer than the file system takes (which the write would find, at the end of the work)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    limit = _path_limit(folder, 'PC_NAME_MAX', 255)
    return any(len(os.fsencode(os.path.basename(p))) > limit for p in (path, temporary_path(path)))


def _parent_of_nothing(path: str) -> Optional[str]:
    """Why ``path`` as given cannot be followed, or None: a '..' after a name that is not an existing folder
    (`missing/../out`), which the system refuses to follow though os.path.abspath and realpath drop both (the
    checks and the atomic writer would go to `out`, a log appended to the path as given would fail)."""
    parts = path.split(os.sep)
    for i in range(1, len(parts)):
        if parts[i] == os.pardir and not os.path.isdir(os.sep.join(parts[:i]) or os.sep):
            return f'{os.sep.join(parts[:i])} is not an existing folder, so the {os.pardir!r} after it leads nowhere'
    return None


def _home_not_expanded(path: str) -> Optional[str]:
    """Why ``path`` as given should not be created, or None: it begins with a name to create that the shell takes
    for a home folder ('~', or '~user' of a user there is), left unexpanded (`--output_dir "~/runs"`, quoted, or
    `=~/runs`), which would make a folder of that name in the current directory."""
    first = path.split(os.sep, 1)[0]
    if not first.startswith('~') or os.path.lexists(first) or os.path.expanduser(first) == first:
        return None
    return (f'{first!r}, the name of a folder to create, is the shell\'s name for a home folder, not expanded here '
            f'(quoted?): give {os.path.expanduser(path)} if that is meant')


def _not_as_given(path: str) -> Optional[str]:
    """Why ``path``, as typed, is not the path it would be taken for: :func:`_parent_of_nothing`, then
    :func:`_home_not_expanded`; None if neither (the checks of output folders and files both ask)."""
    return _parent_of_nothing(path) or _home_not_expanded(path)


def output_dir_problem(path: str) -> Optional[str]:
    """Why the directory ``path`` cannot be written, or created with its missing parents when its first file is
    written, or should not be (a folder to create whose name begins or ends with a blank, a stray space), in one
    line (e.g. 'Not a directory'), or None; creates nothing.  It writes (and removes) a probe file in
    ``path`` or, if it does not exist yet, in its nearest existing parent, which is where it will be created."""
    why = _not_as_given(path)
    if why:
        return why
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        if os.path.islink(existing):  # a link to nowhere: os.makedirs cannot create a directory through it
            return f'{existing} is a symbolic link to {os.readlink(existing)}, which does not exist'
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return os.strerror(errno.ENOTDIR)
    # a name, or the whole path, longer than the file system takes (it was an OSError when the folder was made)
    missing = [] if existing == target else os.path.relpath(target, existing).split(os.sep)
    if len(os.fsencode(path)) >= _path_limit(existing, 'PC_PATH_MAX', 4096) or \
            any(len(os.fsencode(name)) > _path_limit(existing, 'PC_NAME_MAX', 255) for name in missing):
        return os.strerror(errno.ENAMETOOLONG)
    if len(missing) > MAX_NEW_FOLDERS:  # os.makedirs recurses once per folder: a RecursionError traceback
        return f'{len(missing)} folders to create, more than {MAX_NEW_FOLDERS}'
    blank = [name for name in missing if name != name.strip()]  # `--output_dir "$OUT "`, `--output_dir ' '`
    if blank:
        return f'{blank[0]!r}, the name of a folder to create, begins or ends with a blank (a stray space?)'
    try:  # a probe file of a name no other file has (one left by a killed run with the same pid included)
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=existing)
        try:
            os.write(fd, b'ok')
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_output_dir(path: str, flag: str = '--output_dir') -> None:
    """Prove, before any long work starts, that ``path`` can be written, without creating it: a directory is
    created only when its first file is written, so a run that fails or is refused leaves nothing behind
    (:func:`output_dir_problem`).  UserError naming ``flag`` if not."""
    if not path:
        raise UserError(f'{flag} is empty: give a directory')
    why = output_dir_problem(path)
    if why:
        raise UserError(f'cannot write to {flag} {path}: {why}')


def output_file_problem(path: str) -> Optional[str]:
    """Why :func:`write_atomic` could not write the file ``path`` at the end of the work, or None; creates
    nothing.  Said to follow the path ('... is a directory'): a directory, or a name ending in a separator; a new
    name beginning or ending with a blank (a stray space); a name (or the atomic writer's temporary name beside it)
    longer than the file system takes; a folder that cannot be
    written or created (:func:`output_dir_problem`); a file there already that may not be written (made read-only:
    the rename would replace it all the same)."""
    if os.path.isdir(path):
        return 'is a directory'
    why = _not_as_given(path)
    if why:
        return f'cannot be written: {why}'
    if path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        return 'names a directory (it ends in a separator)'
    name = os.path.basename(path)
    if not os.path.lexists(path) and name != name.strip():
        return f'is refused: its name {name!r} begins or ends with a blank (a stray space?)'
    if name_too_long(path):  # (the file's, or the temporary file's the atomic writer fills beside it)
        return f'cannot be written: {os.strerror(errno.ENAMETOOLONG)}'
    folder = os.path.dirname(os.path.abspath(path))
    why = output_dir_problem(folder)
    if why:
        if os.path.exists(folder) and not os.path.isdir(folder):
            return f'cannot be written: {folder} is not a directory'
        what = 'cannot be written' if os.path.isdir(folder) else 'does not exist and cannot be created'
        return f'cannot be written: its folder {folder} {what} ({why})'
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f'cannot be written: {os.strerror(errno.EACCES)}'
    return None
