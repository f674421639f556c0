"""Several processes: joining the launcher's process group, ranks, and the collectives the loops need."""
import datetime
import os

import torch
import torch.distributed as dist


def several_processes() -> bool:
    """Whether the launcher (``torch.distributed.launch --use_env``, ``torchrun``) started more than one process."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and int(os.environ['WORLD_SIZE']) > 1


def init_distributed_mode(args) -> None:
    """Join the process group set up by ``torch.distributed.launch --use_env`` or ``torchrun``.

    NCCL on CUDA, gloo otherwise. Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu``.
    """
    if several_processes():
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

