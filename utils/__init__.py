"""Small shared pieces, by topic: errors (``errors``), several processes (``distributed``), checkpoint files
(``checkpoint_io``) and progress output (``progress``), whose names are re-exported here; and, imported as
modules, seeds and random streams (``seeding``), the command line's machinery (``cli``), how a run stops
(``signals``) and a finetuning run's log (``run_log``)."""
from .checkpoint_io import (SAFE_GLOBALS, append_line, check_output_dir, checkpoint_args, earlier_output,
                            in_use_message, load_checkpoint_file, output_dir_held, remove_stale_temporaries,
                            save_atomic, state_dict_of, temporary_path, write_atomic, write_text_atomic)
from .distributed import (all_agree, all_reduce_sum, get_rank, get_world_size, init_distributed_mode, is_dist,
                          is_main_process, launcher_ranks, rank_prefix, several_processes)
from .errors import OutputWriteError, UserError, escape_controls, few_names, one_line
from .progress import MetricLogger, SmoothedValue, TensorBoard, check_tensorboard_dir, print_line, rank0_print

__all__ = [
    'SAFE_GLOBALS', 'append_line', 'check_output_dir', 'checkpoint_args', 'earlier_output', 'in_use_message',
    'load_checkpoint_file', 'output_dir_held', 'remove_stale_temporaries', 'save_atomic', 'state_dict_of',
    'temporary_path', 'write_atomic', 'write_text_atomic', 'all_agree', 'all_reduce_sum', 'get_rank',
    'get_world_size', 'init_distributed_mode', 'is_dist', 'is_main_process', 'launcher_ranks', 'rank_prefix',
    'several_processes', 'OutputWriteError', 'UserError', 'escape_controls', 'few_names', 'one_line', 'MetricLogger',
    'SmoothedValue', 'TensorBoard', 'check_tensorboard_dir', 'print_line', 'rank0_print',
]
