"""Random streams: seeding a run so it reproduces, and saving them with a checkpoint so a resume is exact.

A process of a run draws from

* Python's ``random``: timm's crops, auto-augment and random erasing, when images load in the process itself;
* numpy's global generator: timm's mixup and cutmix;
* torch's global generator (and, on CUDA, the device's): weight initialisation, drop-path, dropout,
  torchvision's crops and flips;
* the training DataLoader's own generator (:func:`data_generator`): the shuffle of a single process, and the
  base seed each epoch's DataLoader workers get; PyTorch seeds every worker's ``random``, numpy and torch
  from that base seed and the worker's id, so workers reproduce too.  (Under several processes the shuffle
  is a function of ``--seed`` and the epoch: the samplers' ``set_epoch``.)

:func:`seed_everything` seeds the global streams from ``--seed`` plus the rank (so the processes of a job
augment differently), as DeiT does.  :func:`capture` returns every stream's state as tensors and plain
containers, which ``torch.load(weights_only=True)`` reads back; :func:`restore` puts them back.  A checkpoint
holds one such state per process, gathered by :func:`gather`, so after ``--resume`` each process continues
every stream where the uninterrupted run would have been.
"""
import random
import zlib
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ['seed_everything', 'data_generator', 'derived_seed', 'capture', 'restore', 'gather', 'reseed',
           'restore_or_reseed']


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python's ``random``, numpy and torch (CPU and every CUDA device) with ``seed + rank``."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): nearby keys give unrelated streams."""
    words = np.random.SeedSequence([k % 2 ** 64 for k in keys]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


def data_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The training DataLoader's generator: its own stream, so what the model draws (drop-path) does not move
    the shuffle or the workers' seeds."""
    return torch.Generator().manual_seed(derived_seed(seed, rank, 1))


def capture(generators: Optional[Dict[str, torch.Generator]] = None, device: Optional[torch.device] = None) -> dict:
    """This process's random streams: tensors, ints, floats, None, strings, lists and dicts only."""
    version, mt, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': {'version': int(version), 'state': torch.tensor(mt, dtype=torch.int64),
                   'gauss_next': None if gauss_next is None else float(gauss_next)},
        'numpy': {'kind': str(kind), 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
        'generators': {name: g.get_state() for name, g in (generators or {}).items() if g is not None},
    }
    if device is not None and torch.device(device).type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, generators: Optional[Dict[str, torch.Generator]] = None,
            device: Optional[torch.device] = None) -> None:
    """Put back what :func:`capture` returned.  On a state of another shape, whatever Python, numpy or torch raise
    about it: KeyError, TypeError, ValueError, RuntimeError (a torch state of another size), AttributeError or
    IndexError (the exceptions :func:`restore_or_reseed` takes as a state that does not fit)."""
    py = state['python']
    random.setstate((int(py['version']), tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['key'].numpy().astype(np.uint32), int(npy['pos']), int(npy['has_gauss']),
                         float(npy['cached_gaussian'])))
    torch.set_rng_state(state['torch'])
    for name, g in (generators or {}).items():
        if g is not None:
            g.set_state(state['generators'][name])
    if device is not None and torch.device(device).type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], device)


def gather(state: dict) -> List[dict]:
    """Every process's state, in rank order, on every process (one entry without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def reseed(seed: int, rank: int, epoch: int, generators: Optional[Dict[str, torch.Generator]] = None) -> None:
    """Seed every stream from (seed, rank, epoch): for a resume from a checkpoint that holds no state for this
    process.  Reproducible, and no stream repeats an earlier epoch's draws, but not what an uninterrupted run
    would have drawn."""
    seed_everything(derived_seed(seed, rank, epoch))
    for name, g in (generators or {}).items():
        if g is not None:
            g.manual_seed(derived_seed(seed, rank, epoch, zlib.crc32(name.encode())))


def restore_or_reseed(states: Optional[List[dict]], rank: int, world_size: int, seed: int, epoch: int,
                      generators: Optional[Dict[str, torch.Generator]] = None, device=None,
                      warn: Callable[[str], None] = print, agree: Callable[[bool], bool] = lambda ok: ok) -> bool:
    """After a resume: this process's streams from ``states`` (one per rank) when the checkpoint was written by
    as many processes, else :func:`reseed` with a warning.  Returns True when restored exactly.  ``agree`` makes
    the choice one for all processes (utils.all_agree): where one process cannot restore its streams, every
    process reseeds, so that they go on from the same seed (a sampler shuffles by it) and the same epoch."""
    reason = None
    if isinstance(states, (list, tuple)) and len(states) == world_size:
        try:
            restore(states[rank], generators, device)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            reason = 'its random state does not fit this run'
    elif states is None:
        reason = 'it holds no random state (written by an older version)'
    else:
        written = len(states) if isinstance(states, (list, tuple)) else '?'
        reason = f'it was written by {written} process{"es" * (written != 1)}, this run has {world_size}'
    if agree(reason is None):
        return True
    reseed(seed, rank, epoch, generators)
    warn(f'note: the checkpoint cannot continue the random streams exactly '
         f'({reason or "the random state it holds for another process does not fit this run"}); they are seeded '
         f'from --seed and epoch {epoch} instead, so this run will not match an uninterrupted one bit for bit')
    return False
