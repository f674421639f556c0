"""Several finetune.py commands in one torch.distributed job: the tests pay for starting the processes once.

    python -m torch.distributed.launch --nproc_per_node=2 --use_env tests/distributed_job.py commands.json

``commands.json`` is a list of ``{"argv": [...], "sigterm_at_epoch": null or K, "sigkill_rank_at_epoch": null or
[R, K]}``.  Each command runs through
``finetune.main(argv)``, as ``python finetune.py ARGV`` would, in every process; the process group is made by
the first command and kept for the next ones (``finetune.main`` would otherwise end it after each).  With
``"sigterm_at_epoch": K`` each process sends itself SIGTERM as epoch K starts, as a scheduler preempting the job
would; with ``"sigkill_rank_at_epoch": [R, K]`` process R alone kills itself as epoch K starts (the kernel's
out-of-memory killer, a crash).  After each command every process prints ``[rank R] @@ command I exit CODE``.
"""
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed as dist  # noqa: E402

import engine  # noqa: E402
import finetune  # noqa: E402
from utils import print_line  # noqa: E402


def main(path: str) -> int:
    with open(path) as f:
        commands = json.load(f)
    real_init, real_destroy, real_train = dist.init_process_group, dist.destroy_process_group, engine.train_one_epoch
    dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else real_init(*a, **k)
    dist.destroy_process_group = lambda *a, **k: None
    try:
        for i, command in enumerate(commands):
            stops = {}
            if command.get('sigterm_at_epoch') is not None:
                stops[command['sigterm_at_epoch']] = signal.SIGTERM
            kill = command.get('sigkill_rank_at_epoch')
            if kill is not None and int(os.environ.get('RANK', '0')) == kill[0]:
                stops[kill[1]] = signal.SIGKILL

            def train_one_epoch(*args, stops=stops, **kwargs):
                epoch = kwargs.get('epoch', args[5] if len(args) > 5 else None)
                if epoch in stops:
                    os.kill(os.getpid(), stops[epoch])
                return real_train(*args, **kwargs)

            engine.train_one_epoch = train_one_epoch if stops else real_train
            code = finetune.main(command['argv'])
            print_line(f'[rank {os.environ.get("RANK", "0")}] @@ command {i} exit {code}')
            sys.stderr.flush()
    finally:
        engine.train_one_epoch = real_train
        if dist.is_initialized():
            real_destroy()
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1]))
