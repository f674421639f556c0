"""Several processes: joining the launcher's process group, ranks, and the collectives the loops need."""
import datetime
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from .errors import UserError

LAUNCHERS = 'torchrun, or torch.distributed.launch --use_env'
SET_BY_LAUNCHER = f'the launcher sets it: {LAUNCHERS}'


def several_processes() -> bool:
    """Whether the environment asks for more than one process: WORLD_SIZE set, and not to 1, as the launcher
    (``torch.distributed.launch --use_env``, ``torchrun``) sets it.  ``launcher_ranks`` checks the values."""
    return os.environ.get('WORLD_SIZE', '').strip() not in ('', '1')


def rank_prefix() -> str:
    """'[rank N] ' before a process's error line when the launcher started several (each says its own), else ''."""
    return f'[rank {os.environ["RANK"]}] ' if several_processes() and 'RANK' in os.environ else ''


def _whole_number(name: str, default: Optional[str] = None) -> int:
    text = os.environ.get(name, default)
    if text is None:
        raise UserError(f'WORLD_SIZE is {os.environ["WORLD_SIZE"]} but {name} is not set in the environment '
                        f'({SET_BY_LAUNCHER}; unset WORLD_SIZE to run one process)')
    try:
        return int(text)
    except ValueError:
        raise UserError(f'{name}={text!r} in the environment is not a whole number ({SET_BY_LAUNCHER})') from None


def launcher_ranks() -> Tuple[int, int, int]:
    """``(rank, world size, local rank)`` of this process as the launcher set them in the environment (0, 1, 0 for a
    single process).  A user error, before any work, for a value that is not a whole number, a RANK or LOCAL_RANK
    outside the world (a rank past it would wait half an hour for peers that never come), or a missing MASTER_ADDR
    or MASTER_PORT (where the processes meet, env:// rendezvous)."""
    if not several_processes():
        return 0, 1, 0
    world = _whole_number('WORLD_SIZE')
    if world < 1:
        raise UserError(f'WORLD_SIZE={world} in the environment: a job has at least one process ({SET_BY_LAUNCHER})')
    rank, local_rank = _whole_number('RANK'), _whole_number('LOCAL_RANK', '0')
    for name, value in (('RANK', rank), ('LOCAL_RANK', local_rank)):
        if not 0 <= value < world:
            raise UserError(f'{name}={value} in the environment is not one of the WORLD_SIZE={world} processes '
                            f'(0 to {world - 1}; {SET_BY_LAUNCHER})')
    for name in ('MASTER_ADDR', 'MASTER_PORT'):
        if not os.environ.get(name, '').strip():
            raise UserError(f'{name} is not set in the environment: the {world} processes meet at '
                            f'MASTER_ADDR:MASTER_PORT (the launcher sets both: {LAUNCHERS})')
    port = _whole_number('MASTER_PORT')
    if not 0 < port < 65536:
        raise UserError(f'MASTER_PORT={port} in the environment is not a TCP port (1 to 65535)')
    return rank, world, local_rank


def init_distributed_mode(args) -> None:
    """Join the process group set up by ``torch.distributed.launch --use_env`` or ``torchrun``.

    NCCL on CUDA, gloo otherwise. Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu``.
    The process's GPU becomes its current device (that of LOCAL_RANK; ``--device cuda:N`` for a single process),
    where torch puts what it is not told where: the context of pinned batches, cuBLAS handles.  Left at GPU 0,
    a process on another GPU would open a CUDA context on GPU 0 as well.
    """
    args.rank, args.world_size, args.gpu = launcher_ranks()
    if args.world_size == 1:
        args.distributed = False
        if args.device.startswith('cuda') and torch.device(args.device).index is not None:
            torch.cuda.set_device(torch.device(args.device))
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
    # NCCL's barrier is an all-reduce on a GPU: named, it is this process's (unnamed, torch warns that it guesses)
    dist.barrier(**({'device_ids': [args.gpu]} if backend == 'nccl' else {}))


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
    """True only if ``flag`` holds on every process (so all processes stop together).  A process alone answers
    ``flag`` itself: nothing goes to the device and back (the training loop asks at every step)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return t.item() == 0.0

