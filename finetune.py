"""Clip & Concat for DeiT: prune, evaluate, benchmark and distillation-finetune from one command line.

    python finetune.py --prune --prune_rate 0.25 --resume deit_tiny.pth --data-path /imagenet --output_dir out
    python finetune.py --eval --resume out/pruned_0.25.pth --data-path /imagenet
    python finetune.py --speed-only --resume out/pruned_0.25.pth
    python -m torch.distributed.launch --nproc_per_node=2 --use_env finetune.py --resume out/pruned_0.25.pth \
        --teacher-path deit_tiny.pth --distillation-type soft --data-path /imagenet --output_dir out/ft

The CLI only wires things together: the loops are in engine.py, the method in models/ and pruning/.
"""
import argparse
import contextlib
import copy
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import datetime
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

import engine
import models
import pruning
from datasets import (DATA_SETS, INATURALIST, SMALL_INPUT, BadImageError, DigitsDataset, Limited, as_told_apart,
                      build_data, check_classes, check_data_path, check_same_classes, check_split,
                      check_training_transform, data_loader)
from engine import NonFiniteLossError, evaluate, measure_throughput, steady_allocator
from losses import DistillationLoss
from utils import (OutputWriteError, UserError, TensorBoard, all_agree, append_line, check_output_dir,
                   check_tensorboard_dir, checkpoint_args, escape_controls, in_use_message, init_distributed_mode,
                   is_main_process, launcher_ranks, load_checkpoint_file, one_line, output_dir_held, print_line,
                   rank0_print, rank_prefix, remove_stale_temporaries, save_atomic, several_processes, write_atomic)
from utils import seeding
from utils.cli import (AT_LEAST_ONE, EXIT_USER_ERROR, FRACTION, NON_NEGATIVE, POSITIVE, UNIT, OneLineParser, Range,
                       check_numbers, check_whole_patches, fits, flag_name, spell)
from utils.run_log import (check_prune_log, epoch_scalars, epoch_tags, events_files, read_log, reconcile_log,
                           scalars_at)
from utils.signals import (Terminated, cpu_out_of_memory, cuda_out_of_memory, end_script, lost_peer, past_64_bits,
                           say_stopped, sigterm_unwinds)

EXIT_DIVERGED = 3
EXIT_PEER_FAILED = 1  # another process of a multi-process job stopped first; its own message says why
EXIT_OUT_OF_MEMORY = 1  # the GPU (or CPU) ran out of memory: found only once the work runs, not a usage error (2)


def given_flags(args) -> frozenset:
    """The destinations the user set explicitly.  Arguments not parsed by :func:`get_args_parser` (built in a
    script) count every value that differs from the parser's default as given."""
    given = getattr(args, 'given', None)
    if isinstance(given, frozenset):
        return given
    defaults = vars(get_args_parser().parse_args([]))
    return frozenset(k for k, v in vars(args).items() if k in defaults and v != defaults[k])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown after each help text, and as the help of a flag that takes a value but has no text, except
    where the text says them itself or the flag turns a default off (``--no-amp``: "default: True" would read as
    if mixed precision were off)."""

    def _format_action(self, action):
        if action.help is None and action.option_strings and action.nargs != 0:  # (argparse prints no help line)
            action = copy.copy(action)
            action.help = 'default: %(default)s'
        return super()._format_action(action)

    def _get_help_string(self, action):
        if ('default' in (action.help or '') or isinstance(action, argparse._StoreFalseAction)
                or action.default == ''):  # ("(default: )" would say nothing)
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    """The original code's flags and, unless the README says otherwise, its recipe's defaults."""
    p = OneLineParser('finetune.py', description='Clip & Concat for timm ViTs: prune, evaluate, benchmark, finetune.',
                      formatter_class=HelpFormatter,
                      spelled_here={'--epochs': '--final_finetune'})  # (the original code's name for it)
    a = p.add_argument
    # what to do
    a('--eval', action='store_true', help='evaluate --resume on the validation set')
    a('--speed-only', action='store_true', help='print GFLOPs and images/s (pruned and dense) and exit')
    a('--prune', action='store_true',
      help='score, plan and write pruned_<rate>.pth (random masks: pruned_random_<rate>.pth) to --output_dir, '
           'by default the directory of --resume')
    a('--prune_mode', default='attn', choices=['attn', 'random'])
    a('--prune_rate', default=0.25, type=float, help='fraction of (layer, patch) slots to clip, in (0, 1)')
    a('--prune-batches', default=None, type=int, help='score at most this many training batches per process')
    a('--final_finetune', default=30, type=int,
      help='epochs of distillation finetuning (also the length of the learning-rate schedule)')
    a('--iter_nums', default=12, type=int,
      help="the original code's flag (pruning rounds), which its finetune.py never read: no effect, --prune prunes "
           "once")
    a('--finetune_nums', default=1, type=int,
      help="the original code's flag (finetuning steps between pruning rounds), which its finetune.py never read: "
           "no effect")
    # model
    a('--model', default='deit_tiny_patch16_224',
      help='any timm ViT name, "cc_" optional (e.g. deit_small_distilled_patch16_224, vit_small_patch16_224)')
    a('--input-size', default=None, type=int, help='image size (default: the model\'s)')
    a('--drop', default=0.0, type=float,
      help='dropout rate after the position embedding, the attention projection and the MLP layers (as the '
           'original code)')
    a('--drop-path', default=0.1, type=float, help='stochastic depth rate')
    a('--model-ema', action='store_true', help='keep an EMA of the weights (saved as model_ema)')
    a('--no-model-ema', action='store_false', dest='model_ema')
    a('--model-ema-decay', default=0.99996, type=float)
    a('--model-ema-force-cpu', action='store_true')
    # optimizer and schedule (the original recipe's defaults)
    a('--opt', default='adamw')
    a('--opt-eps', default=1e-8, type=float)
    a('--opt-betas', default=None, type=float, nargs='+')
    a('--clip-grad', default=None, type=float)
    a('--momentum', default=0.9, type=float)
    a('--weight-decay', default=0.05, type=float)
    a('--sched', default='cosine')
    a('--lr', default=0.01, type=float, help='base lr, scaled by batch * world_size / 512')
    a('--unscale-lr', action='store_true', help='use --lr as given, without the linear scaling')
    a('--uniform-lr', action='store_true',
      help='every parameter group follows the scheduled lr; by default, as the original code effectively ran, '
           'only the group without weight decay does and the weight matrices stay at 1e-6')
    a('--lr-noise', default=None, type=float, nargs='+')
    a('--lr-noise-pct', default=0.67, type=float)
    a('--lr-noise-std', default=1.0, type=float)
    a('--warmup-lr', default=1e-5, type=float)
    a('--min-lr', default=1e-6, type=float)
    a('--decay-epochs', default=15, type=float,
      help='step interval of --sched step in epochs (the schedule is stepped once per epoch, so 0.5 decays twice at '
           'each epoch); the length of the decay phase of --sched wsd and rsqrt in epochs (below 1: a fraction of the '
           'schedule); cosine does not use it')
    a('--decay-milestones', default=[30, 60], type=int, nargs='+',
      help='epochs from which --sched multistep runs at a further --decay-rate times the lr (default: 30 60, '
           'timm\'s)')
    a('--warmup-epochs', default=0, type=int)
    a('--cooldown-epochs', default=30, type=int,
      help='epochs at --min-lr after the schedule (after --final_finetune, so never reached)')
    a('--patience-epochs', default=10, type=int)
    a('--decay-rate', '--dr', default=0.1, type=float)
    # augmentation (the original recipe's defaults)
    a('--color-jitter', default=0.4, type=float)
    a('--aa', default='rand-m9-mstd0.5-inc1', help='auto-augment policy, or "none"')
    a('--smoothing', default=0.1, type=float, help='label smoothing')
    a('--train-interpolation', default='bicubic')
    a('--repeated-aug', action='store_true',
      help='RASampler (3 repeats) instead of DistributedSampler under several processes')
    a('--no-repeated-aug', action='store_false', dest='repeated_aug')
    p.set_defaults(repeated_aug=True)
    a('--reprob', default=0.25, type=float, help='random erase probability')
    a('--remode', default='pixel')
    a('--recount', default=1, type=int)
    a('--resplit', action='store_true',
      help="DeiT's flag (no random erasing on a clean split), which neither DeiT nor the original code reads: no "
           "effect")
    a('--mixup', default=0.8, type=float)
    a('--cutmix', default=1.0, type=float)
    a('--cutmix-minmax', default=None, type=float, nargs='+')
    a('--mixup-prob', default=1.0, type=float)
    a('--mixup-switch-prob', default=0.5, type=float)
    a('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    a('--eval-crop-ratio', default=1.0, type=float,
      help='evaluation: resize to input/ratio (bicubic), then centre crop; 1.0 squashes the whole image to '
           'input x input, as the original code evaluated; 0.875 is DeiT\'s')
    # distillation
    a('--teacher-model', default=None, help='dense teacher architecture (default: same as --model)')
    a('--teacher-path', default='',
      help='checkpoint of the dense teacher (needed by --distillation-type soft or hard; default: none)')
    a('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    a('--distillation-alpha', default=0.5, type=float)
    a('--distillation-tau', default=1.0, type=float)
    a('--finetune', default='',
      help="DeiT's flag (start from a checkpoint's weights), in the original code's parser too, which never read it: "
           "a file is refused, give it to --resume")
    # data and run
    a('--data-path', default='', help='data set root (IMNET: train/ and val/ class folders)')
    a('--data-set', default='IMNET', choices=list(DATA_SETS))
    a('--inat-category', default='name', help='semantic granularity of the iNaturalist labels (as DeiT)',
      choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    a('--batch-size', default=64, type=int)
    a('--output_dir', default='',
      help='where to write checkpoints, logs and TensorBoard events (--prune, and a run continued from its '
           'checkpoint.pth: default the directory of --resume)')
    a('--device', default=None, help='cuda (default when available) or cpu')
    a('--seed', default=0, type=int)
    a('--resume', default='',
      help='checkpoint: official DeiT, pruned_<rate>.pth, or checkpoint.pth/best.pth (continues that run)')
    a('--start_epoch', default=0, type=int)
    a('--dist-eval', action='store_true', help='split evaluation across processes')
    a('--num_workers', default=10, type=int)
    a('--pin-mem', action='store_true', default=True)
    a('--no-pin-mem', action='store_false', dest='pin_mem')
    a('--no-amp', action='store_false', dest='amp', help='disable mixed precision (only used on CUDA)')
    a('--print-freq', default=10, type=int)
    a('--fast-path', default='none', choices=['none', 'triton', 'compile', 'torch'],
      help='--eval and --speed-only through the fast inference path (models/fast_path.py): triton = fused Triton '
           'kernels, patch embedding as one matrix product, attention (and in fp16/bf16 the matrix products and the '
           'patch embedding\'s own kernel) chosen by timing per kept count, CUDA graph for the batch (CUDA); '
           'compile = torch.compile of the same original-order formulation; torch = that formulation in plain torch '
           'ops (any device); none = the eager model. Its '
           'matrix products run in fp16 for --eval (fp32 with --no-amp or on CPU), in --speed-dtype for --speed-only')
    a('--speed-protocol', default='interleaved', choices=['interleaved', 'original'],
      help='interleaved: pruned and dense twin take turns, median, no_grad, fp16 autocast on CUDA; original: the '
           'original code\'s timing (fp32 with autograd, 3 runs of 50 passes of a batch of 256, the last run\'s '
           'mean; only this model)')
    a('--speed-repeats', default=10, type=int,
      help='timed forward passes per model, the median reported (default: 10; --speed-protocol original: passes '
           'per run, default 50, the mean)')
    a('--speed-warmup', default=3, type=int,
      help='untimed rounds first (not with --speed-protocol original, whose warm-up is the first two of its 3 '
           'runs)')
    a('--speed-dtype', default=None, choices=['fp32', 'fp16', 'bf16'],
      help='autocast for --speed-only (default fp16 on CUDA, fp32 on CPU; --speed-protocol original: fp32)')
    a('--world_size', default=1, type=int, help='set by the launcher')
    a('--dist_url', default='env://', help='set by the launcher')
    a('--local-rank', '--local_rank', default=None, type=int, dest='local_rank', help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------------------
# argument checks

# Every numeric flag of the parser, with what it accepts (a test checks that none is missing).  A batch or an
# image side past 2**31 - 1 overflowed the loaders' and torch's 64-bit counts with a traceback.
SIZE = Range(1, 2 ** 31 - 1)
# Each DataLoader worker is a process, all started at once: far more than any machine runs usefully forked processes
# until the machine refused (or ran out of memory), with a traceback if ever.
MAX_WORKERS = 1024
# Soft distillation's temperature: its term is tau^2 * KL(softmax(t/tau) || softmax(s/tau)), which falls with tau
# (KL grows as 1/tau), so below 1e-3 it all but vanishes (a teacher run for nothing); above 1e3 the KL of two
# nearly uniform distributions is float32 rounding, times tau^2 (how far off depends on the logits: for 64 images of
# 1000 random logits, at 1e4 0.1-14% at scale 5 and 20-140% at scale 1; at 1e5 several times the value, either sign).
TEMPERATURE = Range(1e-3, 1e3)
NUMERIC_FLAGS: Dict[str, Range] = {
    'prune_rate': Range(0, 1, low_open=True, high_open=True), 'prune_batches': AT_LEAST_ONE,
    'final_finetune': AT_LEAST_ONE, 'iter_nums': AT_LEAST_ONE, 'finetune_nums': NON_NEGATIVE, 'input_size': SIZE,
    'drop': FRACTION, 'drop_path': FRACTION,
    'model_ema_decay': UNIT, 'opt_eps': POSITIVE, 'opt_betas': Range(0, 1, high_open=True, count=(2, 2)),
    'clip_grad': POSITIVE, 'momentum': UNIT, 'weight_decay': NON_NEGATIVE, 'lr': POSITIVE,
    'lr_noise': Range(0, 1, count=(1, 2)), 'lr_noise_pct': NON_NEGATIVE, 'lr_noise_std': NON_NEGATIVE,
    'warmup_lr': NON_NEGATIVE, 'min_lr': NON_NEGATIVE, 'decay_epochs': POSITIVE, 'decay_milestones': AT_LEAST_ONE,
    'warmup_epochs': NON_NEGATIVE, 'cooldown_epochs': NON_NEGATIVE, 'patience_epochs': NON_NEGATIVE,
    'decay_rate': POSITIVE,
    'color_jitter': NON_NEGATIVE, 'smoothing': FRACTION, 'reprob': UNIT, 'recount': AT_LEAST_ONE,
    'mixup': NON_NEGATIVE, 'cutmix': NON_NEGATIVE, 'cutmix_minmax': Range(0, 1, low_open=True, count=(2, 2)),
    'mixup_prob': UNIT, 'mixup_switch_prob': UNIT, 'eval_crop_ratio': Range(0, 1, low_open=True),
    'distillation_alpha': NON_NEGATIVE, 'distillation_tau': TEMPERATURE, 'batch_size': SIZE,
    'seed': Range(0, 2 ** 32 - 1), 'start_epoch': NON_NEGATIVE, 'num_workers': Range(0, MAX_WORKERS),
    'print_freq': AT_LEAST_ONE, 'speed_repeats': AT_LEAST_ONE, 'speed_warmup': NON_NEGATIVE,
    'world_size': AT_LEAST_ONE, 'local_rank': NON_NEGATIVE,
}


def modes_of(args) -> List[str]:
    return [m for m in ('eval', 'speed_only', 'prune') if getattr(args, m)]


def mode_flag(args) -> Optional[str]:
    """The flag of the requested run ('--eval', '--speed-only', '--prune'), None for finetuning."""
    modes = modes_of(args)
    return {'eval': '--eval', 'speed_only': '--speed-only', 'prune': '--prune'}[modes[0]] if modes else None


# Flags that only change a finetuning run (given with --eval, --speed-only or --prune they would do nothing), and
# those of them that only matter with a teacher.  (--prune_mode is not refused outside --prune: the original
# code's finetuning command passes it; UNUSED_RULES below names it in a note.)
FINETUNE_ONLY = ('teacher_path', 'teacher_model', 'distillation_type', 'distillation_alpha', 'distillation_tau',
                 'final_finetune', 'model_ema', 'model_ema_decay', 'model_ema_force_cpu')
TEACHER_ONLY = ('teacher_path', 'teacher_model', 'distillation_alpha', 'distillation_tau')
# Values of FINETUNE_ONLY flags that ask for nothing (no teacher, no EMA): outside finetuning they are noted, not
# refused, as a shared set of flags passes them.
ASKS_NOTHING = {'distillation_type': 'none', 'model_ema': False}


def check_flags_apply(args, parser: argparse.ArgumentParser) -> None:
    """A flag given on the command line that the requested run would ignore is refused: a teacher without a
    distillation type would be dropped, a prune rate without --prune would prune nothing, and so on."""
    given = given_flags(args)
    named = lambda dests: ', '.join(spell(parser, d, getattr(args, d)) for d in dests)  # noqa: E731
    mode = mode_flag(args)
    asks = [d for d in FINETUNE_ONLY if d in given and (d not in ASKS_NOTHING or getattr(args, d) != ASKS_NOTHING[d])]
    unused = asks if mode else []
    if unused:
        raise UserError(f'{named(unused)}: only finetuning uses {"this" if len(unused) == 1 else "these"}, and '
                        f'{mode} trains nothing')
    unused = [d for d in TEACHER_ONLY if d in given]
    if not mode and args.distillation_type == 'none' and unused:
        raise UserError(f'{named(unused)} given, but --distillation-type is none, so no teacher would be used: add '
                        f'--distillation-type soft (or hard), or leave {"it" if len(unused) == 1 else "them"} out')
    if not mode and args.distillation_type != 'none' and 'distillation_alpha' in given and args.distillation_alpha == 0:
        # (loss = base + alpha * KD: the teacher would run every step for a term weighted by 0)
        raise UserError(f'--distillation-alpha 0 weighs the {args.distillation_type} distillation term by 0, so the '
                        f'teacher would run every step and change nothing: give a positive --distillation-alpha, or '
                        f'--distillation-type none without a teacher')
    unused = [d for d in ('prune_rate', 'prune_batches') if d in given]
    if mode != '--prune' and unused:
        raise UserError(f'{named(unused)}: {"this applies" if len(unused) == 1 else "these apply"} to --prune only')
    if mode == '--prune' and args.prune_mode == 'random' and 'prune_batches' in given:
        raise UserError('--prune-batches caps the batches Taylor scoring reads; --prune_mode random scores nothing')
    if args.finetune:  # (DeiT's way to start from a file, which the original code accepted and dropped)
        raise UserError(f"--finetune {args.finetune}: the original code's parser has this flag of DeiT's, but never "
                        f'read it; to start from the weights of a file give it to --resume')
    if args.data_set == 'DIGITS' and 'data_path' in given:
        raise UserError("--data-set DIGITS is scikit-learn's digits, read from the package: --data-path does not "
                        'apply')


# Flags a run accepts but does not use, when given on the command line: each rule is (whether it applies to the
# run, the destinations, why they have no effect).  They are noted, not refused (check_flags_apply refuses the
# ones that signal a mistaken request): the original code's commands pass some of them (--data-path to
# --speed-only; --prune_mode and --decay-epochs with the cosine schedule to finetuning), and scripts share one
# set of training flags between their commands (the tests' and the demo's do).  A flag is named once, by the
# first rule that holds it.
OPTIMIZATION = ('opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'clip_grad', 'sched', 'lr', 'unscale_lr',
                'uniform_lr', 'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'warmup_lr', 'min_lr', 'decay_epochs',
                'decay_milestones', 'warmup_epochs', 'cooldown_epochs', 'patience_epochs', 'decay_rate', 'start_epoch')
MIXING = ('mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob', 'mixup_switch_prob', 'mixup_mode')
ERASING = ('aa', 'reprob', 'remode', 'recount')  # auto-augment and random erasing: the recipe's, not scoring's
TRAIN_TRANSFORM = ('color_jitter', 'train_interpolation') + ERASING
# The schedules of timm 1.0.31's create_scheduler that read each of these flags (the others ignore it).
SCHEDULES_READING = {'decay_epochs': ('step', 'wsd', 'rsqrt'), 'decay_rate': ('step', 'multistep', 'plateau', 'poly'),
                     'patience_epochs': ('plateau',), 'decay_milestones': ('multistep',),
                     'min_lr': ('cosine', 'tanh', 'plateau', 'poly', 'wsd', 'rsqrt')}
SPEED = ('speed_protocol', 'speed_repeats', 'speed_warmup', 'speed_dtype')
UNUSED_RULES = (
    (lambda a: not a.prune, ('prune_mode',), 'only --prune makes masks'),
    (lambda a: bool(modes_of(a)), tuple(ASKS_NOTHING), '{mode} trains nothing'),
    (lambda a: a.eval or a.speed_only,
     OPTIMIZATION + MIXING + TRAIN_TRANSFORM + ('smoothing', 'repeated_aug', 'drop', 'drop_path'),
     '{mode} trains nothing'),
    (lambda a: a.prune and a.prune_mode == 'random',
     OPTIMIZATION + MIXING + TRAIN_TRANSFORM + ('smoothing', 'repeated_aug', 'drop', 'drop_path'),
     '--prune_mode random trains nothing and reads no training image'),
    (lambda a: a.prune, OPTIMIZATION + MIXING + ERASING + ('drop', 'drop_path'),
     'Taylor scoring trains nothing, and reads the training images without auto-augment, random erasing, mixup '
     'or cutmix through the model in eval mode'),
    (lambda a: a.speed_only, ('data_path', 'data_set', 'inat_category', 'num_workers', 'pin_mem', 'eval_crop_ratio',
                              'dist_eval', 'amp', 'print_freq', 'output_dir'),
     '--speed-only times random images (in --speed-dtype; fp32 under --speed-protocol original), prints no '
     'progress and writes nothing'),
    (lambda a: a.eval, ('output_dir',), '--eval writes nothing'),
    (lambda a: a.eval, ('seed',), '--eval draws no random number (its transform is fixed, and the model runs in eval '
                                  'mode)'),
    (lambda a: not str(a.device or '').startswith('cuda'), ('amp', 'pin_mem'),
     'mixed precision and pinned memory are used on CUDA only, and this run is on the CPU'),
    (lambda a: not a.speed_only, SPEED, 'only --speed-only times the model'),
    # (only its default, none, reaches a note: another backend outside --eval and --speed-only is refused)
    (lambda a: not (a.eval or a.speed_only), ('fast_path',), 'the fast path is an inference path (--eval and '
     '--speed-only); finetuning and --prune run the eager model'),
    (lambda a: a.data_set == 'DIGITS', TRAIN_TRANSFORM + ('eval_crop_ratio',),
     '--data-set DIGITS has its own fixed transform'),
    (lambda a: a.data_set not in INATURALIST, ('inat_category',), 'only iNaturalist has categories'),
    (lambda a: input_size(a) <= SMALL_INPUT and (a.prune or a.aa in (None, '', 'none')), ('train_interpolation',),
     f'at an input of {SMALL_INPUT} px or less the training crop is a padded crop of the image squashed to the input '
     f'(bicubic), and only auto-augment would interpolate (off here, or turned off by Taylor scoring)'),
    (lambda a: input_size(a) <= SMALL_INPUT, ('eval_crop_ratio',),
     f'at an input of {SMALL_INPUT} px or less the evaluation does not crop (as in DeiT, which takes CIFAR images as '
     f'they are)'),
    (lambda a: a.reprob == 0, ('remode', 'recount'), '--reprob 0 erases nothing'),
    (lambda a: a.lr_noise is None, ('lr_noise_pct', 'lr_noise_std'), 'no --lr-noise is given'),
    (lambda a: not several_processes(), ('dist_eval',), 'a single process evaluates every image'),
    (lambda a: not several_processes(), ('local_rank',),
     'only the processes of a launcher read it (torch.distributed.launch passes it); one process started by hand '
     'takes its GPU from --device (cuda:N)'),
    (lambda a: not several_processes(), ('repeated_aug',),
     'repeated augmentation shares each image among several processes (as in DeiT); one process shuffles plainly'),
    *((lambda a, d=d: not modes_of(a) and a.sched not in SCHEDULES_READING[d], (d,),
       "not read by timm's {sched} schedule") for d in SCHEDULES_READING),
    (lambda a: not modes_of(a), ('cooldown_epochs',),
     'the run ends after --final_finetune epochs, where the cool-down would start'),
    *((lambda a, d=d, f=f: optimizer_reads(a.opt, f) is False, (d,), "not read by timm's {opt} optimizer")
      for d, f in (('momentum', 'has_momentum'), ('opt_betas', 'has_betas'), ('opt_eps', 'has_eps'))),
    (lambda a: a.warmup_epochs == 0, ('warmup_lr',), 'there is no warm-up (--warmup-epochs 0)'),
    (lambda a: not a.model_ema, ('model_ema_decay', 'model_ema_force_cpu'), 'no --model-ema is given'),
    (lambda a: a.distillation_type == 'hard', ('distillation_tau',),
     "hard distillation learns the teacher's top class, with no temperature"),
    (lambda a: a.aa not in (None, '', 'none') and '3a' not in a.aa and not a.prune, ('color_jitter',),
     'timm applies no colour jitter with an auto-augment policy (--aa); --aa none turns it on'),  # (scoring: off)
    (lambda a: not mixing(a), ('mixup_prob', 'mixup_switch_prob', 'mixup_mode'),
     'mixup and cutmix are off (--mixup 0 --cutmix 0)'),
    (lambda a: not (a.mixup > 0 and (a.cutmix > 0 or a.cutmix_minmax is not None)), ('mixup_switch_prob',),
     'it switches between mixup and cutmix, and only one of them is on'),
    (lambda a: True, ('iter_nums', 'finetune_nums'),
     "the original code's finetune.py never read them either: --prune scores and prunes once"),
    (lambda a: True, ('resplit',), "DeiT and the original code never read it either (timm's random erasing is "
     "given no split)"),
    (lambda a: True, ('world_size', 'dist_url'),
     "the launcher sets the processes up (torchrun or torch.distributed.launch: WORLD_SIZE, and env://)"),
)


def timm_optimizer_info(opt: str):
    """timm's registry entry (its ``OptimInfo``: name, class, what it takes) of the optimizer ``opt``, a
    ``lookahead_`` prefix aside; None where timm cannot say (an unknown optimizer is refused where it is created,
    with its message)."""
    try:
        from timm.optim._optim_factory import default_registry
        return default_registry.get_optimizer_info(opt.lower().split('_')[-1])
    except Exception:  # noqa: BLE001
        return None


def optimizer_reads(opt: str, what: str) -> Optional[bool]:
    """Whether timm's optimizer ``opt`` takes momentum / betas / eps (``what``: 'has_momentum', 'has_betas',
    'has_eps' of timm's optimizer registry); None where timm cannot say (then nothing is noted)."""
    takes = getattr(timm_optimizer_info(opt), what, None)
    return None if takes is None else bool(takes)


def optimizer_betas(opt: str) -> Optional[tuple]:
    """The default ``betas`` of timm's optimizer ``opt`` (how many it takes: Adan three), None where timm cannot
    say."""
    info = timm_optimizer_info(opt)
    try:
        default = inspect.signature(info.opt_class).parameters['betas'].default
    except (AttributeError, KeyError, TypeError, ValueError):  # (no entry, no class, no betas)
        return None
    return tuple(default) if isinstance(default, (tuple, list)) else None


def check_teacher_normalisation(teacher: str, student: str) -> None:
    """The teacher reads the student's images, normalised with the student's mean and std (timm's pretrained
    config): refuse a teacher trained on another normalisation (e.g. timm's ViTs, 0.5, against DeiT's ImageNet
    statistics), whose logits on those images would be off without a word."""
    t, s = models.pretrained_cfg(teacher), models.pretrained_cfg(student)
    if (tuple(t.mean), tuple(t.std)) != (tuple(s.mean), tuple(s.std)):
        def stats(cfg):
            return f'mean {tuple(round(v, 4) for v in cfg.mean)}, std {tuple(round(v, 4) for v in cfg.std)}'
        raise UserError(f'--teacher-model {models.base_name(teacher)} was trained on images normalised with '
                        f'{stats(t)}, and the student {models.base_name(student)} reads them normalised with '
                        f'{stats(s)}: the teacher would see images it was not trained on (choose a teacher with '
                        f"the student's normalisation)")


def check_image_side(size: int) -> None:
    """Images are made ``size`` px a side (the training crop, the evaluation's centre crop): more pixels than Pillow's
    limit for one image is refused (the model of that size alone could take the machine's memory, or raise from a
    huge allocation, before the first image is read)."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    if limit and size * size > limit:
        raise UserError(f'--input-size {size}: each image would be {size}x{size} px, more than the {limit} pixels of '
                        f'Pillow\'s limit for one image (give at most {math.isqrt(limit)})')


def check_folder_image_sizes(size: int, ratio: float) -> None:
    """The sizes a folder's images are made at, read at ``size`` px with --eval-crop-ratio ``ratio``: the image
    itself (:func:`check_image_side`) and, where the evaluation crops (inputs above SMALL_INPUT px and a ratio
    below 1), the resize before its centre crop (:func:`check_crop_resize`)."""
    check_image_side(size)
    if size > SMALL_INPUT and ratio < 1:
        check_crop_resize(size, ratio)


def check_crop_resize(size: int, ratio: float) -> None:
    """The evaluation resizes each image's shorter side to ``size / ratio`` before its centre crop: a ratio so small
    that this image would have more pixels than Pillow's limit for one image is refused (a tiny ratio made Pillow
    overflow, or the resize take the machine's memory, at the first evaluation, after a finetune's first epoch)."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    side = int(size / ratio)
    if limit and side * side > limit:
        least = math.ceil(size / math.isqrt(limit) * 1000) / 1000
        shown = side if side < 10 ** 12 else f'{float(side):.3g}'  # (1e-300: not a number 300 digits long)
        raise UserError(f'--eval-crop-ratio {ratio:g} resizes each image to {shown} px on its shorter side (input '
                        f'{size} / {ratio:g}) before the centre crop: more than the {limit} pixels of Pillow\'s limit '
                        f'for one image (give a ratio of at least {least:g})')


def input_size(args) -> int:
    """The run's image size: --input-size, or the model's own (timm's pretrained config)."""
    return args.input_size or models.pretrained_cfg(args.model).input_size[-1]


def unused_flags(args) -> Dict[str, str]:
    """{destination: why it has no effect} for every flag this run would not use (``UNUSED_RULES``; given or not),
    the first rule holding a flag giving its reason."""
    mode = mode_flag(args)
    unused: Dict[str, str] = {}
    for applies, dests, why in UNUSED_RULES:
        if applies(args):
            for d in dests:
                unused.setdefault(d, why.format(mode=mode, sched=args.sched, opt=args.opt))
    return unused


def unused_flag_notes(args, parser: argparse.ArgumentParser, said: Set[str] = frozenset()) -> List[str]:
    """One ``note:`` line per reason for the flags given on the command line that this run accepts but does not
    use, so that nothing asked for is dropped without a word (``said``: flags another line already names so)."""
    given = given_flags(args) - set(said)
    by_reason: Dict[str, List[str]] = {}
    for dest, why in unused_flags(args).items():
        if dest in given:
            by_reason.setdefault(why, []).append(dest)
    return [f'note: {", ".join(spell(parser, d, getattr(args, d)) for d in dests)} '
            f'{"has" if len(dests) == 1 else "have"} no effect: {why}' for why, dests in by_reason.items()]


def mixing(args) -> bool:
    """Whether a finetuning run mixes images (timm's Mixup: mixup, CutMix, or a CutMix box ratio range)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def check_checkpoint_path(path: str, flag: str, give: str, what: str, inside: Optional[str] = None) -> None:
    """``path`` (of ``flag``) is a regular file: a directory, another kind of file (a device, a pipe) or nothing
    there is one line saying which (``give``: what to give instead; ``what``: the file, for 'not found';
    ``inside``: for a directory, the file in it to name as an example)."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        example = f' (e.g. {os.path.join(path, inside)})' if inside else ''
        raise UserError(f'{flag} {path} is a directory; give {give}{example}')
    if os.path.exists(path):
        raise UserError(f'{flag} {path} is not a regular file (a device, a pipe?); give {give}')
    raise UserError(f'{what} not found: {path}')


def check_cpu_compiler() -> None:
    """torch.compile builds its CPU kernels with a C++ compiler (torch._inductor's, from $CXX or the usual names):
    without a working one, --fast-path compile on the CPU stopped in a traceback at the first compiled forward,
    after the model was loaded and the data listed (or the timing begun)."""
    from models.fast_path import cpu_compiler_problem
    problem = cpu_compiler_problem()
    if problem is not None:
        raise UserError(f'--fast-path compile on the CPU needs a C++ compiler for torch.compile\'s kernels, and none '
                        f'works here ({one_line(problem)}); --fast-path torch runs without one')


def check_fast_path_supports(args) -> None:
    """``--model`` is one the fast path computes (models/fast_path.py's check_supported, on the model built on the
    meta device at the run's input size, which allocates nothing): a hybrid's CNN patch embedding, another GELU or
    attention is refused here, before the model is loaded and the data listed (it was refused only as the path was
    built, after both)."""
    from models.fast_path import check_supported
    with torch.device('meta'):
        probe = models.create_model(args.model, img_size=input_size(args))
    try:
        check_supported(probe)
    except ValueError as e:
        raise UserError(f'--fast-path {args.fast_path}: {e} (--model {models.base_name(args.model)}; without '
                        f'--fast-path it runs as the eager model)') from None


def validate_args(args, void: Set[str] = frozenset(), finished: bool = False) -> None:
    """Refuse inconsistent requests before any work starts (every numeric flag included); ``void``: flags given
    that the run being continued makes void (:func:`continue_run`), so not judged here; ``finished``: the run
    continued has no epoch left (:func:`finished_checkpoint`), so its teacher, which it does not read, need not be
    there."""
    launcher_ranks()  # the environment a launcher sets, checked as the flags are
    modes = modes_of(args)
    if len(modes) > 1:
        raise UserError('choose one of --eval, --speed-only and --prune')
    parser = get_args_parser()
    check_numbers(args, parser, NUMERIC_FLAGS)
    if args.speed_only and args.speed_protocol == 'original':  # (else every --speed-* flag is only noted)
        given = given_flags(args)
        if 'speed_warmup' in given or ('speed_dtype' in given and args.speed_dtype != 'fp32'):
            raise UserError('--speed-protocol original times fp32 passes as the original did (three runs, the last '
                            'the figure): --speed-warmup and --speed-dtype do not apply')
    if args.speed_only and several_processes():  # each would time while the others share its cores or bus
        raise UserError(f'--speed-only times one process: run it without the launcher (WORLD_SIZE is '
                        f'{os.environ["WORLD_SIZE"]})')
    if args.fast_path != 'none':
        if not (args.eval or args.speed_only):
            raise UserError('--fast-path is an inference path: use it with --eval or --speed-only')
        if args.speed_only and args.speed_protocol == 'original':
            raise UserError('--speed-protocol original times the loaded eager model as the original code did; '
                            '--fast-path does not apply')
    if args.fast_path in ('triton', 'compile'):  # (torch.compile writes its CUDA kernels in Triton)
        on_gpu = resolve_device(args.device).startswith('cuda')
        if args.fast_path == 'triton' and not on_gpu:
            if os.environ.get('TRITON_INTERPRET') != '1':
                raise UserError('--fast-path triton needs a CUDA GPU (on CPU use --fast-path torch or compile)')
            from models.fast_kernels import INTERPRETER  # (as Triton read it when it decorated the kernels)
            if not INTERPRETER:
                raise UserError('--fast-path triton on CPU: TRITON_INTERPRET=1 was set after Triton was imported '
                                '(torch and models import it), which then compiles its kernels for a GPU')
        if args.fast_path == 'compile' and not on_gpu:
            check_cpu_compiler()
        else:
            from models.fast_kernels import HAS_TRITON
            if not HAS_TRITON:
                needs = ('triton needs Triton' if args.fast_path == 'triton' else
                         'compile on a GPU needs Triton (torch.compile writes its CUDA kernels with it)')
                raise UserError(f'--fast-path {needs}, which this Python cannot import (pip install triton, or use '
                                f'--fast-path torch)')
    if args.eval and not args.resume:
        raise UserError('--eval needs --resume CHECKPOINT (the model to evaluate)')
    if args.prune and not args.resume:
        raise UserError('--prune needs --resume CHECKPOINT (the dense DeiT to prune)')
    if not args.resume and 'resume' in given_flags(args):  # ("$CKPT" unset): not the run without a file it would be
        without = ('measures the dense model with random weights' if args.speed_only
                   else 'trains a dense model from random initialisation')
        raise UserError(f'--resume is empty: give the checkpoint file (without the flag the run {without})')
    if args.resume:
        check_checkpoint_path(args.resume, '--resume', 'the checkpoint file', 'checkpoint', inside='checkpoint.pth')
    if not modes and not args.output_dir:
        # (continue_run defaults it for a --resume named checkpoint.pth: the user who gave best.pth learns why not)
        default = ''
        if args.resume and os.path.basename(args.resume) != 'checkpoint.pth':
            default = (f' (it defaults to the folder of --resume only for a checkpoint.pth, which continues its run '
                       f'in place; {args.resume} is not one)')
        raise UserError(f'--output_dir is required: finetuning writes checkpoint.pth and log.txt there{default}')
    if not modes and args.distillation_type != 'none' and not args.teacher_path:
        raise UserError(f'--distillation-type {args.distillation_type} needs --teacher-path (the dense teacher)')
    reads_data = bool(args.eval or args.prune or not modes)  # --speed-only times random tensors
    if args.data_set != 'DIGITS' and reads_data and not args.data_path:
        raise UserError(f'--data-path is required for --data-set {args.data_set}')
    if args.teacher_path and not modes and args.distillation_type != 'none' and not finished:
        check_checkpoint_path(args.teacher_path, '--teacher-path', 'the checkpoint file of the teacher',
                              'teacher checkpoint')
    args.model = cc_model_name(args.model)
    if args.teacher_model == '' and 'teacher_model' in given_flags(args):  # ("$TEACHER" unset)
        raise UserError("--teacher-model is empty: give the teacher's model (without the flag the teacher has "
                        "--model's architecture)")
    if args.teacher_model:
        cc_model_name(args.teacher_model, '--teacher-model')
    if args.input_size:
        check_whole_patches(args.input_size, models.patch_size(args.model), args.model)
    if args.fast_path != 'none':  # a model the path does not compute: said before the data is listed, not after
        check_fast_path_supports(args)
    if not modes and args.distillation_type != 'none' and args.teacher_model:  # it reads the student's images
        teacher, size = cc_model_name(args.teacher_model, '--teacher-model'), input_size(args)
        ph, pw = models.patch_size(teacher)
        if size % ph or size % pw:
            raise UserError(f'--teacher-model {models.base_name(teacher)} reads the {size}x{size} images in {ph}x{pw} '
                            f'patches, and {size} is not a whole number of them (its patch embedding would drop the '
                            f'rest of the image)')
    if args.data_set == 'DIGITS' and reads_data:
        size = DigitsDataset.SIZE
        own = models.pretrained_cfg(args.model).input_size[-1] == size  # (only --input-size changed it)
        DigitsDataset.check_size(input_size(args), models.base_name(args.model),
                                 f'give --input-size {size}, the model\'s own, or leave it out' if own else
                                 f'give --input-size {size}, or a model made for them: deit_digits_patch4_32')
    if reads_data and args.data_set != 'DIGITS':
        check_folder_image_sizes(input_size(args), args.eval_crop_ratio)
    if not modes and args.distillation_type != 'none' and args.data_set != 'DIGITS':
        check_teacher_normalisation(args.teacher_model or args.model, args.model)
    if not modes and 'start_epoch' in given_flags(args) - void and args.start_epoch >= args.final_finetune:
        raise UserError(f'--start_epoch {args.start_epoch} is not before --final_finetune {args.final_finetune}: no '
                        f'epoch would run')
    check_flags_apply(args, parser)
    if not modes and args.sched == 'plateau':
        raise UserError('--sched plateau lowers the rate when a metric stops improving, and the epoch loop (as '
                        "DeiT's) steps the schedule without one: timm's plateau schedule would then hold --warmup-lr "
                        'from the second epoch on; choose cosine, step, multistep, tanh or poly')
    if not modes and sorted(set(args.decay_milestones)) != list(args.decay_milestones):  # timm bisects them
        raise UserError(f'--decay-milestones {" ".join(map(str, args.decay_milestones))}: the epochs must '
                        f'increase')
    if not modes and args.lr_noise is not None and len(args.lr_noise) == 2 and args.lr_noise[0] >= args.lr_noise[1]:
        low, high = args.lr_noise
        raise UserError(f'--lr-noise {low:g} {high:g}: the noise applies from the first fraction of the schedule up to '
                        f'the second, so the first must be below the second (timm would add none)')
    if not modes and args.lr_noise is not None:
        check_lr_noise_reaches_an_epoch(args.lr_noise, args.final_finetune)
    if not modes and args.cutmix_minmax is not None:  # (other runs note the mixing flags as having no effect)
        low, high = args.cutmix_minmax
        if low >= high:
            raise UserError(f'--cutmix-minmax {low:g} {high:g}: the box ratio is drawn between the two, so the first '
                            f'must be below the second')
        check_cutmix_box_sides(input_size(args), low, high)
        if 'cutmix' in given_flags(args) and args.cutmix == 0:
            raise UserError('--cutmix 0 with --cutmix-minmax: a box ratio range turns CutMix on (timm then sets '
                            'its alpha to 1): leave out one of them')
    if not modes and mixing(args) and args.batch_size % 2:
        raise UserError(f'--batch-size {args.batch_size}: mixup and cutmix mix each image with another of its '
                        f'batch, so the batch must be even (or turn them off: --mixup 0 --cutmix 0)')
    if not modes:
        check_optimizer_and_schedule(args)


def check_cutmix_box_sides(size: int, low: float, high: float) -> None:
    """timm draws each side of a ``--cutmix-minmax`` CutMix box from the whole pixels ``int(size * low)`` up to,
    not including, ``int(size * high)``: a range too narrow for the ``size`` px images holds no side, and numpy
    refused the draw at the first batch CutMix mixed (a traceback after the data and the models were built)."""
    first, end = int(size * low), int(size * high)
    if first >= end:
        raise UserError(f'--cutmix-minmax {low:g} {high:g}: at {size}x{size} px images CutMix draws its box side from '
                        f'{first} px up to, not including, {end} px: no side to draw (the second value must be at '
                        f'least {first + 1}/{size}, or the first lower)')


def check_optimizer_and_schedule(args) -> None:
    """Build the run's optimizer and learning-rate schedule (:func:`build_optimizer`) once for a one-unit linear
    layer, before any work: an --opt or --sched timm does not know, or a schedule it refuses, is a user error before
    the data is listed and the model and teacher are built, not after; so is a second-order optimizer (timm's
    AdaHessian), whose step differentiates the gradients again: the training step does not keep the graph for that,
    torch's fused attention has no second derivative, DDP does not synchronise it, and its random probe vectors
    are not saved with a checkpoint, so a resumed run would not continue the same one."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # (the run's own build says them)
        # the lr scaled by the processes the run will have: the launcher's count, which init_distributed_mode puts
        # in args.world_size later (the flag --world_size itself has no effect)
        trial = argparse.Namespace(**{**vars(args), 'world_size': launcher_ranks()[1]})
        optimizer, _ = build_optimizer(trial, nn.Linear(1, 1))
    if getattr(optimizer, 'is_second_order', False):
        raise UserError(f'--opt {args.opt} is a second-order optimizer (its step differentiates the gradients '
                        f'again), which this finetuning does not run: choose a first-order one (e.g. adamw, sgd)')
    kron = getattr(timm_optimizer_info(args.opt), 'name', None) == 'kron'  # (lookahead_kron too)
    if kron and importlib.util.find_spec('opt_einsum') is None:
        # (timm's Kron contracts its preconditioners with einsum; torch's own order makes the full outer product of
        # each weight matrix first: 5 GB for the digits model's fc1, far more for DeiT's)
        raise UserError(f'--opt {args.opt}: timm\'s Kron optimizer needs the opt_einsum package (pip install '
                        f'opt_einsum), which is not installed: without it each step builds every weight matrix\'s '
                        f'full outer product (gigabytes per layer)')


def check_lr_noise_reaches_an_epoch(fractions: Sequence[float], epochs: int) -> None:
    """timm adds the noise at the schedule steps t >= fractions[0] x epochs (and < fractions[1] x epochs); the
    schedule is stepped after each epoch, as in DeiT, so epoch 0 trains at the starting rate (no noise) and epoch
    k >= 1 at step k - 1: a noise that starts past step epochs - 2, or a range holding no whole step, adds none."""
    bounds = [f * epochs for f in fractions]  # timm's noise range, in steps
    first = max(0, math.ceil(bounds[0]))  # the first step that gets noise
    if first <= epochs - 2 and (len(bounds) == 1 or first < bounds[1]):
        return
    spec = ' '.join(f'{f:g}' for f in fractions)
    steps = (f'steps {bounds[0]:g} <= t < {bounds[1]:g}' if len(bounds) == 2 else f'steps t >= {bounds[0]:g}')
    trained = f'steps 0..{epochs - 2}' if epochs >= 2 else 'no step'
    raise UserError(f'--lr-noise {spec}: timm adds the noise at the {steps} of the {epochs}-epoch schedule, and '
                    f'the epochs train at {trained} (epoch k >= 1 at step k - 1: the schedule is stepped after each '
                    f'epoch, as in DeiT), so no epoch would get noise')


def warmup_note(args) -> Optional[str]:
    """A ``note:`` when the warm-up outlasts the epochs a finetuning run trains: the schedule is stepped after each
    epoch, so the last epoch trains at step final_finetune - 2 (epoch 0 at step 0), and timm warms up at every
    step below --warmup-epochs: then no epoch trains at the --sched schedule, only at warm-up rates."""
    last = max(args.final_finetune - 2, 0)
    if args.warmup_epochs <= last:
        return None
    return (f'note: --warmup-epochs {args.warmup_epochs} outlasts this {args.final_finetune}-epoch run: its epochs '
            f'train at schedule steps 0..{last} (epoch k >= 1 at step k - 1), all of them warm-up steps, so no '
            f'epoch trains at the --sched {args.sched} schedule')


def _group_bases_below(args, lr: float) -> List[str]:
    """The base learning rates of the run's parameter groups (what each group's schedule starts from: the scaled
    --lr, and the weight matrices' 1e-6 without --uniform-lr, see build_optimizer) that are below ``lr``, said."""
    scaled = scaled_lr(args)
    how = f'--lr {args.lr:g}' + ('' if args.unscale_lr else f' x batch {args.batch_size} x {args.world_size} / 512')
    bases = [(scaled, f'the scheduled lr {scaled:.2e} ({how})')]
    if args.weight_decay and not args.uniform_lr:
        bases.append((ORIGINAL_BASE_LR, f"the weight matrices' {ORIGINAL_BASE_LR:g} (without --uniform-lr)"))
    return [text for base, text in bases if base < lr]


def min_lr_note(args) -> Optional[str]:
    """A ``note:`` when --min-lr is above the lr a parameter group's schedule starts from (the scaled --lr, or the
    weight matrices' 1e-6 without --uniform-lr): timm's schedule then runs from that lr up to --min-lr, a rise
    where the flag names a floor (a small batch scales --lr below a --min-lr typed for a large one)."""
    below = _group_bases_below(args, args.min_lr) if args.sched in SCHEDULES_READING['min_lr'] else []
    if not below:
        return None
    return (f'note: --min-lr {args.min_lr:g} is above {" and ".join(below)}: the --sched {args.sched} schedule '
            f'rises to it over the run instead of decaying to it')


def warmup_lr_note(args) -> Optional[str]:
    """A ``note:`` when a warm-up is asked for and --warmup-lr is above the lr a parameter group's schedule starts
    from: timm warms every group from --warmup-lr to its own base, so that group's lr falls over the warm-up (the
    weight matrices' 1e-6 without --uniform-lr, from the default --warmup-lr 1e-5, as the original code's groups
    would have)."""
    below = _group_bases_below(args, args.warmup_lr) if args.warmup_epochs > 0 else []
    if not below:
        return None
    return (f'note: --warmup-lr {args.warmup_lr:g} is above {" and ".join(below)}: the warm-up of '
            f'--warmup-epochs {args.warmup_epochs} falls from it to that lr instead of rising to it')


# ----------------------------------------------------------------------------------------------------------
# continuing a finetuning run: its own settings, unless the command line says otherwise

# Per invocation, never taken from the run being continued: what to do, where, on which machine, how verbosely.
NOT_INHERITED = frozenset({
    'eval', 'speed_only', 'prune', 'prune_mode', 'prune_rate', 'prune_batches', 'resume', 'output_dir', 'device',
    'num_workers', 'pin_mem', 'print_freq', 'dist_eval', 'start_epoch', 'speed_protocol',
    'speed_repeats', 'speed_warmup', 'speed_dtype', 'world_size', 'dist_url', 'local_rank',
    'iter_nums', 'finetune_nums', 'resplit', 'finetune'})
# What the labels of a run mean: a file trained with other values than those given has other classes (refused).
CLASSES_OF_THE_RUN = ('data_set', 'inat_category')


def names_other_classes(dest: str, recorded, args) -> bool:
    """Whether a file's recorded value of a :data:`CLASSES_OF_THE_RUN` flag means other classes than ``args``'s
    (the category matters for iNaturalist only)."""
    if dest == 'inat_category' and args.data_set not in INATURALIST:
        return False
    return isinstance(recorded, str) and recorded != getattr(args, dest)


# Fixed in the optimizer and learning-rate schedule state a continued run restores: another value given on the
# command line would have no effect, so the run's own value is kept (with a warning).
IN_RESTORED_STATE = frozenset({
    'opt', 'opt_eps', 'opt_betas', 'momentum', 'weight_decay', 'lr', 'unscale_lr', 'uniform_lr', 'sched',
    'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'warmup_lr', 'min_lr', 'decay_epochs', 'decay_milestones',
    'warmup_epochs', 'cooldown_epochs', 'patience_epochs', 'decay_rate'})


def _uniform_in(checkpoint: dict) -> Optional[bool]:
    """Whether a checkpoint written without ``uniform_lr`` in its args scheduled every parameter group from the
    same lr (this project before the flag existed) or not (the original code): read from its optimizer."""
    try:
        initial = [float(g['initial_lr']) for g in checkpoint['optimizer']['param_groups']]
    except (KeyError, TypeError, ValueError):
        return None
    return len(set(initial)) == 1 if len(initial) > 1 else None


def schedule_length(checkpoint: dict, recorded: int) -> int:
    """The epochs of the learning-rate schedule a finetuning checkpoint restores: its scheduler's ``t_initial``
    (cosine, tanh, poly), set when the run was started and kept by every run continuing it, whatever
    --final_finetune they were given (and recorded in ``args``); ``recorded`` where the scheduler has none."""
    length = (checkpoint.get('lr_scheduler') or {}).get('t_initial')
    return length if isinstance(length, int) and not isinstance(length, bool) else recorded


def continue_run(args, checkpoint: Optional[dict] = None) -> Tuple[List[str], Dict[str, object], Set[str]]:
    """``--resume`` of a finetuning checkpoint (``checkpoint.pth``, ``best.pth``) continues that run: teacher,
    distillation, EMA, schedule, optimizer groups, augmentation, data and model come from the checkpoint's
    ``args`` for every flag not given on the command line (``given_flags``).  A pruned or official file starts
    a new run and changes nothing here.  ``checkpoint``: the contents of ``--resume`` where the caller has read
    them (:func:`run` reads the file once), else it is read here.  Returns the lines to print (what was taken
    over, and one line per given value that differs from the run's), {destination: value taken over} and the
    given destinations whose line says they have no effect."""
    if modes_of(args) or not args.resume or not os.path.isfile(args.resume):
        return [], {}, set()
    if checkpoint is None:
        checkpoint = load_checkpoint_file(args.resume, mmap=True)
    if not is_training_checkpoint(checkpoint):
        return [], {}, set()
    check_training_fields(checkpoint, args.resume)
    stored = checkpoint_args(checkpoint)
    parser = get_args_parser()
    given = given_flags(args)
    lines, inherited, no_effect = [], {}, set()
    if 'scaled_lr' not in stored:
        stored.pop('lr', None)  # written when args.lr held the already scaled lr: not a base lr to scale again
        if 'lr' in given:  # (with the scaled_lr of a newer file, the loop below says so, naming the run's lr)
            lines.append(f'warning: {spell(parser, "lr", args.lr)} has no effect: the optimizer and learning-rate '
                         f'schedule restored from {args.resume} continue those of the run')
            no_effect.add('lr')
    if 'start_epoch' in given:  # DeiT's rule: a continued run starts after the last epoch its checkpoint holds
        lines.append(f'warning: {spell(parser, "start_epoch", args.start_epoch)} has no effect: the run continues '
                     f'after the last epoch {args.resume} holds')
        no_effect.add('start_epoch')
    # (saved by another number of processes, the streams cannot continue: they are seeded from the --seed given,
    # which the note at the start of training says, and the run goes on with that seed)
    rng = checkpoint.get('rng')
    continues_streams = isinstance(rng, (list, tuple)) and len(rng) == launcher_ranks()[1]
    if 'seed' in given and stored.get('seed') not in (None, args.seed) and continues_streams:
        lines.append(f'warning: {spell(parser, "seed", args.seed)} has no effect: the random streams saved in '
                     f'{args.resume} continue those of its {spell(parser, "seed", stored["seed"])}')
        no_effect.add('seed')
    uniform = _uniform_in(checkpoint) if 'uniform_lr' not in stored else None
    if uniform is not None:
        stored['uniform_lr'] = uniform
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != 'help'}
    same = {'model': models.base_name, 'teacher_model': lambda n: n and models.base_name(n)}
    distillation = (args.distillation_type if 'distillation_type' in given
                    else stored.get('distillation_type', args.distillation_type))
    for dest, value in stored.items():
        action = actions.get(dest)
        if action is None or dest in NOT_INHERITED or not fits(action, value):
            continue
        if dest in ('teacher_model', 'teacher_path') and distillation == 'none':
            continue  # no teacher is used (DeiT's own checkpoints name its default regnety_160 all the same)
        if dest == 'amp' and not str(stored.get('device') or '').startswith('cuda'):
            continue  # mixed precision runs on CUDA only: a run written elsewhere records it off, whatever was asked
        current = getattr(args, dest)
        norm = same.get(dest, lambda v: v)
        if dest in no_effect or norm(value) == norm(current):
            continue
        if dest not in given:
            setattr(args, dest, value)
            inherited[dest] = value
        elif dest == 'final_finetune':  # the scheduler state just restored keeps the old length, as in DeiT
            length = schedule_length(checkpoint, value)
            lines.append(f'warning: {args.resume} was written by a run of --final_finetune {value}; its '
                         f'learning-rate schedule over {length} epoch{"s" * (length != 1)} continues '
                         f'unchanged')
        elif dest in IN_RESTORED_STATE:  # the run's value stays, so the saved args say what ran
            lines.append(f'warning: {spell(parser, dest, current)} has no effect: the optimizer and learning-rate '
                         f'schedule restored from {args.resume} continue those of {spell(parser, dest, value)}')
            setattr(args, dest, value)
            no_effect.add(dest)
        elif dest in CLASSES_OF_THE_RUN and names_other_classes(dest, value, args):
            raise UserError(f'{spell(parser, dest, current)}: {args.resume} continues a run trained with '
                            f'{spell(parser, dest, value)}, whose labels name other classes (leave the flag out to '
                            f'continue it)')
        else:
            lines.append(f'{spell(parser, dest, current)} given: {args.resume} was written with '
                         f'{spell(parser, dest, value)}')
    if 'output_dir' not in given and not args.output_dir and os.path.basename(args.resume) == 'checkpoint.pth':
        args.output_dir = inherited['output_dir'] = os.path.dirname(args.resume) or '.'
    relative = [d for d in SAVED_ABSOLUTE if d in inherited and inherited[d] and not os.path.isabs(inherited[d])]
    if relative:  # written before paths were saved absolute: the directory it was started from is unknown
        lines.append(f'warning: {args.resume} holds {" and ".join(spell(parser, d, inherited[d]) for d in relative)} '
                     f'relative to the directory its run was started from, which it does not record: read from '
                     f'here as {" and ".join(os.path.abspath(inherited[d]) for d in relative)} (give the flag to '
                     f'choose)')
    if inherited:
        # (a flag not given holds its default, so every value taken over is one the user would have had to repeat)
        lines.insert(0, f'Continuing the run of {args.resume} with its settings for the flags not given: '
                        f'{" ".join(spell(parser, d, v) for d, v in inherited.items())}')
    return lines, inherited, no_effect


def _with_origin(error: UserError, args, inherited: Dict[str, object]) -> UserError:
    """A refused value that came from the run being continued says so, and how to change it."""
    parser = get_args_parser()
    text = str(error)
    for dest, value in inherited.items():
        flag = flag_name(next(a for a in parser._actions if a.dest == dest))
        named = re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', text)
        if named or (dest in ('teacher_path', 'data_path', 'output_dir') and value and str(value) in text):
            return UserError(f'{text} ({flag} of the run {args.resume} continues; give {flag} to change it)')
    return error


def cc_model_name(name: str, flag: str = '--model') -> str:
    """Any timm ViT name, with or without ``cc_`` -> ``cc_<timm name>``, checked against timm's registry."""
    try:
        return 'cc_' + models.check_model_name(name)
    except ValueError as e:
        raise UserError(f'{flag}: {e}') from None


def resolve_device(requested: Optional[str]) -> str:
    """``--device`` as torch names it (cuda when available if not given): a user error for a device this tool does
    not run on, a GPU this machine does not have, or, for processes that a launcher started (each takes the GPU of
    its LOCAL_RANK), a GPU index or a LOCAL_RANK past the machine's GPUs."""
    if requested is None:
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif requested.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {requested}: CUDA is not available on this machine (use --device cpu)')
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f'--device {requested} is not a device torch knows (use cuda or cpu)') from None
    if device.type not in ('cpu', 'cuda'):
        raise UserError(f'--device {requested}: this tool runs on cuda or cpu, not {device.type}')
    if device.type == 'cpu' and device.index not in (None, 0):
        raise UserError(f'--device {requested}: torch has one CPU device (use --device cpu)')
    if device.type == 'cuda':
        count = torch.cuda.device_count()
        has = f'this machine has {count} CUDA device{"s" * (count != 1)}'
        if several_processes():
            if device.index is not None:
                raise UserError(f'--device {requested}: under a launcher each process takes the GPU of its '
                                f'LOCAL_RANK (use --device cuda)')
            local_rank = launcher_ranks()[2]
            if local_rank >= count:
                raise UserError(f'LOCAL_RANK {local_rank}: {has}, so at most {count} process'
                                f'{"es" * (count != 1)} per node can use one each (--nproc_per_node)')
        elif device.index is not None and device.index >= count:
            raise UserError(f'--device {requested}: {has} (cuda:0' + (f' to cuda:{count - 1})' if count > 1 else ')'))
    return requested


# ----------------------------------------------------------------------------------------------------------
# models and checkpoints

def dropout_rates(args) -> Dict[str, float]:
    """timm's keyword arguments for ``--drop`` and ``--drop-path``.  ``--drop`` is dropout where the original's
    timm (0.3/0.4) put its ``drop_rate``: after the position embedding, the attention's projection and both MLP
    layers; timm 1.0's ``drop_rate`` is a dropout before the head, which the original model did not have."""
    return {'pos_drop_rate': args.drop, 'proj_drop_rate': args.drop, 'drop_path_rate': args.drop_path}


def load_model(args, path: str, name: str, checkpoint: Optional[dict] = None) -> Tuple[nn.Module, dict]:
    """models.build_model_from_checkpoint with this run's input size and dropout rates (``checkpoint``: the
    contents of ``path``, where they are read already)."""
    return models.build_model_from_checkpoint(path, name, img_size=args.input_size, warn=rank0_print,
                                              checkpoint=checkpoint, **dropout_rates(args))


def new_model(args, num_classes: int = 1000) -> nn.Module:
    """``--model`` with random weights (a run without ``--resume``)."""
    return models.build_model(args.model, num_classes, img_size=args.input_size, **dropout_rates(args))


def masks_sha1(masks) -> str:
    """A digest of the per-block concat-order masks (as stored in checkpoints), to compare plans at a glance."""
    import hashlib
    stacked = torch.stack([m.detach().to('cpu', torch.uint8) for m in masks])
    return hashlib.sha1(stacked.numpy().tobytes()).hexdigest()


def describe(model: nn.Module) -> str:
    channels = models.kept_token_counts(model)
    prefix = model.num_prefix_tokens
    return (f'{model.num_tokens - prefix} patches + {prefix} prefix token{"s" if prefix != 1 else ""}; '
            f'kept tokens per block: {channels}')


def prefix_tokens_included(model: nn.Module) -> str:
    """Which prefix tokens the kept counts of ``model`` include, in words: 'class token included' (DeiT), 'class
    and distillation tokens included', 'class token and 4 register tokens included', '1 register token included'
    (a pooling model without class token), 'no prefix token'."""
    named = [word for word, attr in (('class', 'cls_token'), ('distillation', 'dist_token'))
             if getattr(model, attr, None) is not None]
    parts = [' and '.join(named) + (' tokens' if len(named) > 1 else ' token')] if named else []
    registers = getattr(model, 'num_reg_tokens', 0) or 0
    if registers:
        parts.append(f'{registers} register token{"s" if registers > 1 else ""}')
    return ' and '.join(parts) + ' included' if parts else 'no prefix token'


def gflops(model: nn.Module) -> float:
    return models.count_macs(model) / 1e9


def gflops_text(value: float) -> str:
    """GFLOPs as printed: two decimals, as the paper's tables (1.25), and two significant digits below 0.1, where
    two decimals would say 0.04 against 0.05 for models 1.35 times apart (the digits demo's 0.036 and 0.048)."""
    decimals = 2 if value >= 0.1 or value <= 0 else 1 - math.floor(math.log10(value))
    return f'{value:.{decimals}f}'


# ----------------------------------------------------------------------------------------------------------
# the four commands

def run_speed(args, device: torch.device, resumed: Optional[dict]) -> Dict[str, float]:
    if args.resume:
        model, _ = load_model(args, args.resume, args.model, checkpoint=resumed)
    else:
        model = new_model(args)
        rank0_print(f'No --resume: measuring the dense {args.model} with random weights')
    model.to(device)
    size = model.patch_embed.img_size[0]
    pruned = any(not blk.dense for blk in model.blocks)
    rank0_print(f'Model {args.model}: {describe(model)}')
    if args.speed_protocol == 'original':
        return _speed_original_protocol(args, model, 'pruned' if pruned else 'dense', size, device)
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}[
        args.speed_dtype or ('fp16' if device.type == 'cuda' else 'fp32')]
    dense = models.dense_copy(model) if pruned else model
    # 'dense' is timm's computation (every mask True: timm's own Block.forward) under autocast; with --fast-path
    # the pruned model and the dense model of the same weights run through that path too.
    runs = {'pruned': model, 'dense': dense} if pruned else {'dense': model}
    if args.fast_path != 'none':
        runs = {'dense': dense, 'dense_fast': fast_model(args, dense, device, args.batch_size, dtype, 'dense model')}
        if pruned:
            runs['pruned'] = fast_model(args, model, device, args.batch_size, dtype, 'pruned model')
    if device.type == 'cpu':
        rank0_print(f'CPU allocator: {steady_allocator()}')
    throughput = measure_throughput(runs, args.batch_size, size, device, repeats=args.speed_repeats,
                                    warmup=args.speed_warmup, dtype=dtype)
    precision = 'fp32' if dtype is None else str(dtype).replace('torch.', '')
    rank0_print(f'Batch {args.batch_size} at {size}x{size} on {device} ({precision}), median of '
                f'{args.speed_repeats} timed passes, models interleaved'
                + (f'; fast path: {args.fast_path}' if args.fast_path != 'none' else ''))
    names = {'pruned': 'pruned model' + (f' (fast path, {args.fast_path})' if args.fast_path != 'none' else ''),
             'dense': 'dense model', 'dense_fast': f'dense model (fast path, {args.fast_path})'}
    results = {}
    for name, run in runs.items():
        flops = gflops(model if name == 'pruned' else dense)
        results[f'{name}_gflops'] = flops
        results[f'{name}_throughput'] = throughput[name]
        rank0_print(f'FLOPs of the {names[name]}: {gflops_text(flops)} GFLOPs')
        rank0_print(f'Throughput of the {names[name]}: {throughput[name]:.1f} images/s')
    if pruned:
        speedup = throughput['pruned'] / throughput['dense']
        flops_ratio = results['dense_gflops'] / results['pruned_gflops']
        results.update(speedup=speedup, flops_ratio=flops_ratio)
        rank0_print(f'Speed-up of the pruned model: {speedup:.2f}x (FLOPs ratio {flops_ratio:.2f}x)'
                    + (f' against the eager dense model ({precision})' if args.fast_path != 'none' else ''))
    if args.fast_path != 'none' and pruned:
        fastest = max(('dense', 'dense_fast'), key=lambda k: throughput[k])
        against = throughput['pruned'] / throughput[fastest]
        results.update(fastest_dense=fastest, speedup_vs_fastest_dense=against)
        label = 'eager dense model' if fastest == 'dense' else names[fastest]
        rank0_print(f'Speed-up of the pruned model against the fastest dense model ({label}): '
                    f'{against:.2f}x')
    elif args.fast_path != 'none':
        results['fast_path_speedup'] = throughput['dense_fast'] / throughput['dense']
        rank0_print(f'Speed-up of the fast path ({args.fast_path}) over the eager model: '
                    f'{results["fast_path_speedup"]:.2f}x')
    return results


def fast_model(args, model: nn.Module, device: torch.device, batch_size: int, dtype: Optional[torch.dtype] = None,
               name: str = 'model') -> nn.Module:
    """``model`` through ``--fast-path`` (models/fast_path.py): an inference-only module on the model's device,
    its matrix products in ``dtype`` (fp32 if None), its kernels chosen by timing at ``batch_size`` (on CUDA), a CUDA
    graph captured for ``batch_size`` with the Triton backend on CUDA (other batch sizes run uncaptured).  The
    build is announced (``name``: which model; what takes its time) and its seconds said: with 'triton' on a GPU
    it times every candidate kernel, the first build on a machine compiling them first (tens of seconds; then
    Triton's on-disk cache); with 'torch' on a GPU it times SDPA's attention backends; 'compile' times nothing
    and compiles at its first forward."""
    from models.fast_kernels import TritonError
    from models.fast_path import CaptureError, build_fast_path
    graph = device.type == 'cuda' and args.fast_path == 'triton'
    what = {'triton': f': kernels timed and a CUDA graph captured at batch {batch_size}, each kernel compiled first '
                      f'where Triton\'s cache lacks it',
            'torch': f': attention backends timed at batch {batch_size}'}.get(args.fast_path, '')
    what = what if device.type == 'cuda' else ''
    later = '; torch.compile compiles it at its first forward' if args.fast_path == 'compile' else ''
    rank0_print(f'Building the fast path ({args.fast_path}) of the {name} on {device}{what}{later} ...')
    start = time.perf_counter()
    try:
        fast = build_fast_path(model.eval(), backend=args.fast_path, dtype=dtype, cuda_graph=graph,
                               batch_size=batch_size)
        rank0_print(f'Fast path of the {name} built in {time.perf_counter() - start:.1f} s')
        return fast
    except ValueError as e:
        raise UserError(f'--fast-path {args.fast_path}: {e}') from None
    except TritonError as e:  # the build runs the kernels (timing, the graph's warm-up): an unsupported GPU
        raise UserError(f'--fast-path {args.fast_path}: Triton cannot compile or run its kernels on this device '
                        f'({type(e).__name__}: {one_line(e)}); --fast-path compile or torch runs without '
                        f'them') from None
    except CaptureError as e:  # not the user's mistake, but said in one line with the way round it
        raise UserError(f'--fast-path {args.fast_path}: {one_line(e)}; --fast-path torch runs without CUDA '
                        f'graphs') from None


ORIGINAL_SPEED_BATCH, ORIGINAL_SPEED_PASSES = 256, 50


def run_batch_size(args) -> int:
    """The batch the run computes on: ``--batch-size``, except for --speed-protocol original, whose batch is the
    original's 256 unless --batch-size is given."""
    if args.speed_only and args.speed_protocol == 'original' and 'batch_size' not in given_flags(args):
        return ORIGINAL_SPEED_BATCH
    return args.batch_size


def _speed_original_protocol(args, model: nn.Module, name: str, size: int, device: torch.device) -> Dict[str, float]:
    """The original code's timing of the loaded model alone (``engine.throughput_original_protocol``): its three
    runs, each printed, the last the figure; its batch of 256 and its 50 passes unless --batch-size /
    --speed-repeats are given."""
    batch = run_batch_size(args)
    passes = args.speed_repeats if 'speed_repeats' in given_flags(args) else ORIGINAL_SPEED_PASSES
    speeds = engine.throughput_original_protocol(model, batch, size, device, passes)
    runs = len(speeds)
    gpu = ', cudnn.benchmark on, TF32 matmuls allowed' if device.type == 'cuda' else ''  # (neither exists on a CPU)
    rank0_print(f'Original protocol: batch {batch} of torch.rand at {size}x{size} on {device}, fp32 with autograd '
                f'(no no_grad){gpu}; {runs} runs of {passes} passes back to back, each timed from one '
                f'synchronisation to the next; the last is the figure; only this model')
    for i, speed in enumerate(speeds[:-1]):
        why = (f' (inaccurate, as the original printed it: set-up{" and cudnn autotuning" if gpu else ""})'
               if i == 0 else '')
        rank0_print(f'Throughput of the {name} model, run {i + 1} of {runs}{why}: {speed:.1f} images/s')
    rank0_print(f'FLOPs of the {name} model: {gflops_text(gflops(model))} GFLOPs')
    rank0_print(f'Throughput of the {name} model: {speeds[-1]:.1f} images/s')
    return {f'{name}_gflops': gflops(model), f'{name}_throughput': speeds[-1]}


def run_eval(args, device: torch.device, resumed: dict) -> Dict[str, float]:
    # The model (its head sized by the file) before the data, as for --prune: weights that do not fit --model are
    # refused before the data set is listed, which takes minutes on ImageNet.
    model, checkpoint = load_model(args, args.resume, args.model, checkpoint=resumed)
    check_recorded_data_set(checkpoint, args)
    dataset_val, nb_classes = build_data(args, train=False)
    check_same_classes(args, dataset_val)
    check_classes(nb_classes, model, 'validation')
    check_recorded_classes(checkpoint, dataset_val, args, 'validation')
    model.to(device)
    rank0_print(f'Model {args.model} from {args.resume}: {describe(model)}; {gflops_text(gflops(model))} GFLOPs')
    loader = data_loader(dataset_val, args, train=False)
    if args.fast_path != 'none':
        model = fast_model(args, model, device, loader.batch_size, torch.float16 if args.amp else None)
        built = model.describe()
        rank0_print(f'Fast path ({args.fast_path}): ' + json.dumps({k: built[k] for k in (
            'dtype', 'cuda_graph_batch', 'dependent_launch', 'attention', 'qkv', 'norm_qkv', 'proj', 'proj_norm',
            'mlp', 'fc2', 'mlp_residual')}))
    stats = evaluate(loader, model, device, amp=args.amp, print_freq=args.print_freq, printer=rank0_print)
    rank0_print(f'Accuracy of the network on the {len(dataset_val)} test images: {stats["acc1"]:.1f}%')
    return stats


def pruned_file_name(prune_mode: str, prune_rate: float) -> str:
    """``pruned_<rate>.pth`` (the original's name) for Taylor masks, ``pruned_random_<rate>.pth`` for random ones,
    so both fit in one --output_dir."""
    return f'pruned_{prune_rate}.pth' if prune_mode == 'attn' else f'pruned_{prune_mode}_{prune_rate}.pth'


def scoring_dataset(args):
    """The images Taylor scores are taken on: the training set with its training transform (random-resized crop,
    flip, colour jitter) but no auto-augment and no random erasing (mixup and cutmix are never applied while
    scoring), as the original code scored."""
    score_args = argparse.Namespace(**{**vars(args), 'aa': 'none', 'reprob': 0.0})
    return build_data(score_args, train=True)


def run_prune(args, device: torch.device, resumed: dict) -> Dict[str, float]:
    from timm.loss import LabelSmoothingCrossEntropy
    path = os.path.join(args.output_dir, pruned_file_name(args.prune_mode, args.prune_rate))
    # Checked before a scoring pass that can take an hour on ImageNet; agreed on by every process before
    # rank 0 can write the file, so all of them stop with the same message.
    if not all_agree(not os.path.exists(path), device):
        raise UserError(f'{path} already exists from an earlier run; choose another --output_dir '
                        f'(or move it away)')
    # its TensorBoard folder too: that run's scalars are at step 0, where this one's would be drawn over them
    events = prune_tensorboard_dir(args)
    if not all_agree(not events_files(events), device):
        raise UserError(f'{events} already holds the TensorBoard events of an earlier --prune at this mode and rate; '
                        f'choose another --output_dir (or move it away)')
    # The model (its head sized by the file) before the data: a file or a rate that cannot be pruned is refused
    # before the data set is listed, which takes minutes on ImageNet.
    model, source = load_model(args, args.resume, args.model, checkpoint=resumed)
    depth, num_patches = len(model.blocks), model.num_tokens - model.num_prefix_tokens
    already = sum(model.num_tokens - kept for kept in models.kept_token_counts(model))
    if already:  # scoring and planning start from the dense model: the file's masks would be silently replaced
        raise UserError(f'--resume {args.resume} is already pruned ({already} of {depth * num_patches} (layer, patch) '
                        f'slots clipped): --prune starts from a dense checkpoint')
    nothing = pruning.clips_nothing(depth, num_patches, args.prune_rate)
    if nothing:
        raise UserError(f'--prune_rate {nothing}: nothing would be pruned')
    check_recorded_data_set(source, args)
    check_split(False, args)
    if args.prune_mode == 'attn':  # scored on the training set: a missing one is said before val/ is listed
        check_split(True, args)
    dataset_val, nb_classes = build_data(args, train=False)
    check_classes(nb_classes, model, 'validation')
    check_recorded_classes(source, dataset_val, args, 'validation')
    model.to(device)
    if args.prune_mode == 'attn':
        dataset_train, train_classes = scoring_dataset(args)
        check_same_classes(args, dataset_val, dataset_train)
        check_classes(train_classes, model, 'training')
        loader = data_loader(dataset_train, args, train=True)
        criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
        from utils import MetricLogger
        batches = Limited(loader, args.prune_batches)
        logged = MetricLogger(printer=rank0_print).log_every(batches, args.print_freq, 'Scoring:')
        scores = pruning.attention_taylor_scores(model, logged, criterion, device=device)
        if not bool(torch.isfinite(scores).all()):  # the same on every process: the scores are all-reduced
            raise NonFiniteLossError(f'the Taylor scores of {args.resume} are not finite (a NaN or infinite loss or '
                                     f'gradient while scoring: its weights?); no masks planned, nothing written')
        masks = pruning.plan_masks(scores, args.prune_rate)
        scored_batches = len(batches)  # (what was scored, not what --prune-batches asked: a smaller set has fewer)
        # the loader drops a last partial batch, unless the process's share is shorter than a batch: then that is
        # its one batch
        per_batch = min(loader.batch_size, len(loader.sampler))
        short = [f'--prune-batches {args.prune_batches}'] * ((args.prune_batches or 0) > scored_batches) \
            + [f'--batch-size {args.batch_size}'] * (per_batch < args.batch_size)
        rank0_print(f'Scored {scored_batches} batch{"es" * (scored_batches > 1)} of {per_batch} images per process'
                    + (f' ({" and ".join(short)} asked for more: the training set has no more)' if short else ''))
    else:
        check_same_classes(args, dataset_val)
        scores = None
        masks = pruning.random_masks(depth, num_patches, args.prune_rate,
                                     generator=torch.Generator().manual_seed(args.seed))
    channels = pruning.apply_masks(model, masks)
    clipped = int((~masks).sum())
    rank0_print(f'Clipped {clipped} of {depth * num_patches} (layer, patch) slots '
                f'({args.prune_mode}, prune rate {args.prune_rate})')
    rank0_print(f'Kept tokens per block ({prefix_tokens_included(model)}): {channels}')
    if args.distributed:  # every process prints what it planned: the digests must agree (scores are summed)
        print_line(f'[rank {args.rank}] masks sha1 {masks_sha1(model.masks)}')
    pruned_gflops = gflops(model)  # (printed, logged and written to TensorBoard below)
    rank0_print(f'FLOPs: {gflops_text(pruned_gflops)} GFLOPs (dense {gflops_text(gflops(models.dense_copy(model)))} '
                f'GFLOPs)')
    if is_main_process():
        checkpoint = {'model': model.state_dict(), 'channels': channels, 'args': args_to_save(args)}
        if scores is not None:
            checkpoint['scores'], checkpoint['scored_batches'] = scores, scored_batches
        if 'classes' in source:  # the classes the weights were trained on, checked wherever the file is used
            checkpoint['classes'] = source['classes']
    written = False  # known to this process to be complete
    try:
        if is_main_process():
            remove_stale_temporaries([path])  # of an earlier --prune killed while it wrote this file
            save_atomic(checkpoint, path)
            written = True
            print_line(f'Saved {path}')
        all_agree(True, device)  # the other processes know the file is complete once rank 0 has written it
        written = True
        stats = evaluate(data_loader(dataset_val, args, train=False), model, device, amp=args.amp,
                         print_freq=args.print_freq, printer=rank0_print)
        rank0_print(f'Accuracy of the network on the {len(dataset_val)} test images: {stats["acc1"]:.1f}%')
        if is_main_process():  # (a stop while the results are logged: the pruned file is complete all the same)
            record = {'prune_mode': args.prune_mode, 'prune_rate': args.prune_rate, 'channels': channels,
                      'gflops': pruned_gflops, **({'scored_batches': scored_batches} if scores is not None else {}),
                      **{f'test_{k}': v for k, v in stats.items()}}
            append_line(os.path.join(args.output_dir, 'prune_log.txt'), json.dumps(record))
            tb = TensorBoard(prune_tensorboard_dir(args))
            tb.scalars({'acc1': stats['acc1'], 'acc5': stats['acc5'], 'gflops': pruned_gflops}, 0, prefix='prune/')
            tb.close()
    except STOPS_MIDWAY as e:
        if written:
            e.kept = f'{path} was written completely'
        raise
    return stats


def load_teacher(args) -> Tuple[nn.Module, dict]:
    """The model of --teacher-path (--teacher-model, else --model) and the file's contents, unchecked against the
    data: a file that does not fit the model is refused here, before the data set is listed."""
    return models.build_model_from_checkpoint(args.teacher_path, cc_model_name(args.teacher_model or args.model),
                                              img_size=args.input_size, warn=rank0_print, flag='--teacher-model')


def check_teacher_classes(args, teacher: nn.Module, num_classes: int) -> None:
    """Distillation compares the teacher's logits with the student's (``num_classes``) one by one."""
    if teacher.num_classes != num_classes:
        raise UserError(f'the teacher {args.teacher_path} has {teacher.num_classes} classes, '
                        f'the student {num_classes}')


def build_teacher(args, device: torch.device, num_classes: int, dataset=None,
                  loaded: Optional[Tuple[nn.Module, dict]] = None) -> nn.Module:
    """The dense teacher of --teacher-path (``loaded``: :func:`load_teacher`'s result, where it was read
    already), frozen in eval mode; a file that records other classes than ``dataset``'s (the training set) is
    refused: its logits would teach the student other classes' labels."""
    teacher, source = loaded or load_teacher(args)
    check_teacher_classes(args, teacher, num_classes)
    if dataset is not None:
        check_recorded_classes(source, dataset, args, 'training', teacher=True)
    if not all(blk.dense for blk in teacher.blocks):
        rank0_print(f'note: {args.teacher_path} holds a pruned model (kept tokens per block: '
                    f'{models.kept_token_counts(teacher)}); the teacher runs dense on its weights, every token kept')
    teacher.set_dense()  # the teacher is the dense model, whatever masks its file holds
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------------------
# finetuning: build the run, restore a checkpoint into it, then the epoch loop of engine.py

def output_paths(args) -> Dict[str, str]:
    return {name: os.path.join(args.output_dir, name) for name in ('checkpoint.pth', 'best.pth', 'log.txt')}


def check_earlier_run(args, continuing: bool) -> None:
    """Never overwrite the results of another run: only continuing <output_dir>/checkpoint.pth itself may."""
    paths = output_paths(args)
    checkpoint_path = paths['checkpoint.pth']
    if os.path.exists(checkpoint_path):
        if not (continuing and os.path.samefile(args.resume, checkpoint_path)):
            raise UserError(f'{checkpoint_path} already exists from an earlier run; continue it with --resume '
                            f'{checkpoint_path} or choose another --output_dir')
    else:
        earlier = [name for name in ('best.pth', 'log.txt') if os.path.exists(paths[name])]
        events = events_files(args.output_dir)  # (this run's scalars would be drawn over that run's, epoch by epoch)
        if events:
            more = f' and {len(events) - 1} more' if events[1:] else ''
            earlier.append(f'TensorBoard events ({events[0]}{more})')
        if earlier:
            named = ' and '.join(filter(None, [', '.join(earlier[:-1]), earlier[-1]]))
            raise UserError(f'{args.output_dir} already holds {named} from an earlier run; '
                            f'choose another --output_dir (or move them away)')


def build_criterion(args, num_classes: int, teacher: Optional[nn.Module]):
    """(criterion, mixup_fn): DeiT's base loss (soft targets under mixup/cutmix, else label smoothing) inside
    the method's distillation loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if mixing(args):
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
        base_criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        base_criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        base_criterion = nn.CrossEntropyLoss()
    criterion = DistillationLoss(base_criterion, teacher, args.distillation_type, args.distillation_alpha,
                                 args.distillation_tau)
    return criterion, mixup_fn


# The original code set ``args.lr = 1e-6`` before building its optimizer with timm's create_optimizer, then put
# the scaled lr into param_groups[0] only: every other group (the weight matrices) kept this lr as its base.
ORIGINAL_BASE_LR = 1e-6


def parameter_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """The parameter groups of timm 0.4.12's ``create_optimizer``, which the original code used: with weight decay,
    group 0 without it (1-d tensors, biases and the model's ``no_weight_decay()`` names such as ``pos_embed``,
    ``cls_token``, ``dist_token``) and group 1 with it (every weight matrix); without weight decay, one group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not weight_decay:
        return [{'params': [p for _, p in named], 'weight_decay': 0.0}]
    skip = set(model.no_weight_decay()) if hasattr(model, 'no_weight_decay') else set()
    exempt = [p.ndim <= 1 or n.endswith('.bias') or n in skip for n, p in named]
    return [{'params': [p for (_, p), e in zip(named, exempt) if e], 'weight_decay': 0.0},
            {'params': [p for (_, p), e in zip(named, exempt) if not e], 'weight_decay': weight_decay}]


def scaled_lr(args) -> float:
    """``--lr`` scaled by batch * world_size / 512 (unless ``--unscale-lr``)."""
    return args.lr if args.unscale_lr else args.lr * args.batch_size * args.world_size / 512.0


def build_optimizer(args, model: nn.Module):
    """(optimizer, learning-rate schedule) of a finetuning run.  By default each parameter group's base lr is
    what the original code effectively trained with: group 0 the scaled ``--lr``, any other group (the weight
    matrices, when there is weight decay) ``ORIGINAL_BASE_LR``; ``--uniform-lr``: every group the scaled lr.
    timm's schedule takes each group's lr as its base, over ``--final_finetune`` epochs."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler
    args.scaled_lr = scaled_lr(args)
    if not math.isfinite(args.scaled_lr):
        raise UserError(f'--lr {args.lr:g} scaled by batch x processes / 512 ({args.batch_size} x {args.world_size} '
                        f'/ 512) is {args.scaled_lr}: give a smaller --lr (or --unscale-lr)')
    if args.lr > 0 and args.scaled_lr == 0:  # below the smallest float: the run would train nothing, said nowhere
        raise UserError(f'--lr {args.lr:g} scaled by batch x processes / 512 ({args.batch_size} x {args.world_size} '
                        f'/ 512) is 0 in floating point: give a larger --lr (or --unscale-lr)')
    args.epochs = args.final_finetune
    groups = parameter_groups(model, args.weight_decay)
    for i, group in enumerate(groups):
        group['lr'] = args.scaled_lr if args.uniform_lr or i == 0 else ORIGINAL_BASE_LR
    betas = optimizer_betas(args.opt) if args.opt_betas is not None else None
    if betas is not None and len(betas) != len(args.opt_betas):  # timm's Adan indexed a third: a traceback
        raise UserError(f'--opt-betas {" ".join(f"{b:g}" for b in args.opt_betas)}: timm\'s {args.opt} optimizer '
                        f'takes {len(betas)} betas (its defaults: {" ".join(f"{b:g}" for b in betas)}), the flag '
                        f'gives {len(args.opt_betas)}: leave it out to use its defaults')
    try:
        optimizer = create_optimizer_v2(groups, **{**optimizer_kwargs(cfg=args), 'lr': args.scaled_lr})
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise UserError(f'cannot create the optimizer (--opt {args.opt}): {one_line(e)}') from None
    try:
        lr_scheduler, _ = create_scheduler(args, optimizer)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        why = one_line(e)
        if 'stable_timescale' in why:  # (timm's advice names a setting this command line does not have)
            why = (f'timm\'s {args.sched} schedule takes its time scale from the warmup, and --warmup-epochs is '
                   f'{args.warmup_epochs:g}: give --warmup-epochs of at least 1')
        raise UserError(f'cannot create the learning-rate schedule (--sched {args.sched}): {why}') from None
    if lr_scheduler is None:
        raise UserError(f'--sched {args.sched}: finetuning needs a learning-rate schedule (e.g. cosine, step)')
    return optimizer, lr_scheduler


def describe_parameter_groups(optimizer, model: nn.Module, args) -> List[str]:
    """One line per parameter group: what is in it, its weight decay and the lr its next epoch runs at."""
    names = {id(p): n for n, p in model.named_parameters()}
    lines = []
    for i, group in enumerate(optimizer.param_groups):
        params = group['params']
        if len(optimizer.param_groups) == 1:
            kinds = 'every parameter'
        elif group['weight_decay'] == 0:
            special = [names.get(id(p), '?') for p in params if p.ndim > 1]  # pos_embed, cls_token, ...
            kinds = f'{len(params) - len(special)} biases and norms' + ''.join(f', {n}' for n in special)
        else:
            kinds = f'{sum(p.ndim > 1 for p in params)} weight matrices'
        lines.append(f'Parameter group {i}: {len(params)} tensors ({kinds}), weight decay {group["weight_decay"]:g}, '
                     f'lr {group["lr"]:.2e} (schedule from {group.get("initial_lr", group["lr"]):.2e})')
    if not args.uniform_lr and len(optimizer.param_groups) > 1:
        lines.append(f'Learning rates as the original code ran: only group 0 follows the scheduled lr, the other '
                     f'groups keep {ORIGINAL_BASE_LR:g} as their base (--uniform-lr: every group the scheduled lr)')
    return lines


def distributed_model(model: nn.Module, device: torch.device, gpu: Optional[int] = None) -> nn.Module:
    """``model`` in DistributedDataParallel for training.  A block whose mask keeps no token (possible in a model
    without prefix tokens) runs no weight of its own, and DDP by default waits for every parameter's gradient, so
    the second step would stop in a RuntimeError: such a model has DDP look for the parameters a step left out."""
    device_ids = [gpu] if device.type == 'cuda' else None
    # Masks are identical on every rank (planned from all-reduced scores): no need to re-send them each step.
    ddp = nn.parallel.DistributedDataParallel
    no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(ddp).parameters
                      else {'broadcast_buffers': False})
    idle_block = any(not bool(mask.any()) for mask in getattr(model, 'masks', []))
    return ddp(model, device_ids=device_ids, find_unused_parameters=idle_block, **no_buffer_sync)


def build_training(args, device: torch.device, resumed: Optional[dict]) -> Tuple[engine.Training, dict]:
    """Everything a finetuning run is made of, before any checkpoint state is restored into it; returns it
    with the ``--resume`` file's contents (``resumed``, as :func:`run` read them; {} without one)."""
    from timm.utils import ModelEmaV2

    # The files' models (their heads sized by the files) before the data, as for --prune: weights that do not fit
    # --model or --teacher-model are refused before the data sets are listed, which takes minutes on ImageNet.
    if args.resume:
        model, checkpoint = load_model(args, args.resume, args.model, checkpoint=resumed)
        if not is_training_checkpoint(checkpoint):  # (a run continued: its data set is checked in continue_run)
            check_recorded_data_set(checkpoint, args)
    loaded_teacher = load_teacher(args) if args.distillation_type != 'none' else None
    if loaded_teacher is not None:
        check_recorded_data_set(loaded_teacher[1], args, teacher=True)
        if args.resume:  # the student's head is sized by its file: both are known before the data
            check_teacher_classes(args, loaded_teacher[0], model.num_classes)
    # the validation set first, as --prune lists it: a missing or broken val/ is said before train/ is listed, which
    # takes minutes on ImageNet (and a missing train/ before val/ is listed)
    check_split(False, args)
    check_split(True, args)
    dataset_val, _ = build_data(args, train=False)
    dataset_train, nb_classes = build_data(args, train=True)
    check_same_classes(args, dataset_val, dataset_train)
    if not args.resume:
        rank0_print(f'No --resume: training a dense {args.model} from random initialisation')
        model, checkpoint = new_model(args, nb_classes), {}
    check_classes(nb_classes, model, 'training', trains=True)
    continuing = is_training_checkpoint(checkpoint)
    check_recorded_classes(checkpoint, dataset_train, args, 'training', continuing)  # (earlier runs: checked in run)
    model.to(device)
    rank0_print(f'Student {args.model}: {describe(model)}; {gflops_text(gflops(model))} GFLOPs')

    teacher = None
    if args.distillation_type != 'none':
        teacher = build_teacher(args, device, model.num_classes, dataset_train, loaded_teacher)
        rank0_print(f'Teacher {cc_model_name(args.teacher_model or args.model)} from {args.teacher_path} (dense)')
        if hasattr(model, 'set_distilled_training'):  # DeiT's distilled models: KD through the distillation head
            model.set_distilled_training(True)
            rank0_print('Distilled model: base loss on the class head, KD through the distillation head (as DeiT)')

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model, decay=args.model_ema_decay,
                               device='cpu' if args.model_ema_force_cpu else None)
    model_without_ddp = model
    if args.distributed:
        model = distributed_model(model, device, args.gpu)

    loader_train = data_loader(dataset_train, args, train=True)
    per_process = len(loader_train.sampler)
    if mixing(args) and per_process < args.batch_size and per_process % 2:
        # (a training set at least a batch long drops its last, partial batch: every batch is --batch-size)
        smaller = f'an even --batch-size of at most {per_process - 1}, or ' if per_process > 2 else ''
        raise UserError(f'the training set gives {per_process} image{"s" if per_process > 1 else ""} per process, '
                        f'fewer than --batch-size {args.batch_size}, and an odd number: mixup and cutmix need an even '
                        f'batch (give {smaller}--mixup 0 --cutmix 0)')
    optimizer, lr_scheduler = build_optimizer(args, model_without_ddp)
    if per_process < args.batch_size and not args.unscale_lr:  # (one batch per step, of every image there is)
        rank0_print(f'note: the training set gives {per_process} image{"s" if per_process > 1 else ""} per process, '
                    f'fewer than --batch-size {args.batch_size}: each step trains on a batch of {per_process}, at the '
                    f'lr {args.scaled_lr:.2e} that --lr {args.lr:g} is scaled to for batch {args.batch_size} '
                    f'(--batch-size {per_process} would scale it to '
                    f'{args.lr * per_process * args.world_size / 512.0:.2e})')
    criterion, mixup_fn = build_criterion(args, model_without_ddp.num_classes, teacher)
    training = engine.Training(
        model=model, model_without_ddp=model_without_ddp, criterion=criterion, optimizer=optimizer,
        lr_scheduler=lr_scheduler, scaler=torch.amp.GradScaler('cuda', enabled=args.amp), amp=args.amp,
        clip_grad=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
        loader_train=loader_train,
        loader_val=data_loader(dataset_val, args, train=False), device=device)
    return training, checkpoint


def is_training_checkpoint(checkpoint: dict) -> bool:
    """A ``checkpoint.pth``/``best.pth`` of a finetuning run (which ``--resume`` continues)."""
    return all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch'))


def _scalar(v):
    """A checkpoint's number as Python's (a 0-d tensor, as some code saves an epoch, read as its value)."""
    return v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v


def check_training_fields(checkpoint: dict, path: str) -> None:
    """The entries of a finetuning checkpoint that a continued run reads, of the types it reads them as (a
    damaged or hand-made file is a one-line error before anything is built)."""
    def number(v, whole=False):
        v = _scalar(v)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (not whole or float(v).is_integer())

    problems = []
    if not number(checkpoint['epoch'], whole=True) or checkpoint['epoch'] < 0:
        problems.append(f"epoch {checkpoint['epoch']!r} (a finished epoch's number)")
    if 'max_accuracy' in checkpoint and not number(checkpoint['max_accuracy']):
        problems.append(f"max_accuracy {checkpoint['max_accuracy']!r} (a number)")
    for key in ('optimizer', 'lr_scheduler', 'model_ema', 'log_stats', 'scaler'):
        if key in checkpoint and checkpoint[key] is not None and not isinstance(checkpoint[key], dict):
            problems.append(f'{key} a {type(checkpoint[key]).__name__} (a dict)')
    if checkpoint.get('model_ema', {}) is None:
        problems.append('model_ema None (a state dict)')
    stats = checkpoint.get('log_stats')
    if isinstance(stats, dict) and 'test_acc1' in stats and not number(stats['test_acc1']):
        problems.append(f"log_stats test_acc1 {stats['test_acc1']!r} (a number)")  # (read as the epoch's accuracy)
    if not isinstance(checkpoint.get('improved', False), bool):
        problems.append(f"improved {checkpoint['improved']!r} (True or False)")
    classes = checkpoint.get('classes')
    if classes is not None and not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
        problems.append('classes not a list of folder names')
    if problems:
        raise UserError(f'{path} is not a finetuning checkpoint this run can continue: its {"; ".join(problems)}')


def restore_training(training: engine.Training, checkpoint: dict, args) -> Tuple[int, float]:
    """Continue a finetuning checkpoint: optimizer, schedule, loss scaler and EMA restored, ``log.txt``
    repaired; returns (first epoch to run, best Acc@1 so far).  Other files start a new run at epoch
    ``--start_epoch``, at that epoch's place in the schedule (t = epoch - 1, as :func:`engine.train_epochs` runs
    every epoch after the first)."""
    if not is_training_checkpoint(checkpoint):
        if 'optimizer' in checkpoint and 'epoch' in checkpoint:  # the original code's checkpoint.pth and best.pth
            epoch = _scalar(checkpoint['epoch'])
            rank0_print(f'note: {args.resume} holds an optimizer and epoch {epoch} but no lr_scheduler, as the '
                        f'original code\'s finetuning checkpoints do (it could not continue them either): this run '
                        f'is a new finetune from its weights, with a new optimizer and schedule, starting at epoch '
                        f'{args.start_epoch}'
                        + (f' (--start_epoch {epoch + 1} would place it after that epoch in the schedule)'
                           if isinstance(epoch, int) and not args.start_epoch else ''))
        if args.start_epoch:
            training.lr_scheduler.step(args.start_epoch - 1)
        return args.start_epoch, -1.0  # so the first evaluation always writes best.pth
    try:
        training.optimizer.load_state_dict(checkpoint['optimizer'])
        training.lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        if checkpoint.get('scaler'):
            training.scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as e:
        raise UserError(f'{args.resume}: its optimizer or scheduler state does not fit this run '
                        f'({one_line(e)}); resume with the --opt, --weight-decay and --sched of the run '
                        f'that wrote it') from None
    if training.model_ema is not None and 'model_ema' in checkpoint:
        models.load_entry(training.model_ema.module, checkpoint, 'model_ema', args.resume,
                          f'{args.model} (EMA)')
    start_epoch = int(checkpoint['epoch']) + 1
    max_accuracy = float(checkpoint.get('max_accuracy', -1.0))
    repair_outputs(args, checkpoint)
    best_elsewhere_note(args, checkpoint)
    rank0_print(f'Resumed from {args.resume}: continuing at epoch {start_epoch} '
                + (f'(best Acc@1 so far {max_accuracy:.2f}%)' if max_accuracy >= 0 else '(it records no best Acc@1)'))
    restored_lr = training.optimizer.param_groups[0].get('initial_lr')
    if isinstance(restored_lr, float) and not math.isclose(restored_lr, args.scaled_lr, rel_tol=1e-9):
        rank0_print(f'note: the learning rate restored with the optimizer of {args.resume}, {restored_lr:.2e}, '
                    f'continues as the run set it; this run\'s flags (batch {args.batch_size} x {args.world_size} '
                    f'processes) would have started at {args.scaled_lr:.2e}')
        args.scaled_lr = float(restored_lr)  # the saved args say what runs
    # Every random stream where the uninterrupted run has it (last, so nothing above draws from them).
    if seeding.restore_or_reseed(checkpoint.get('rng'), args.rank, args.world_size, args.seed, start_epoch,
                                 random_generators(training), training.device, rank0_print,
                                 agree=lambda ok: all_agree(ok, training.device)):
        args.seed = checkpoint_args(checkpoint).get('seed', args.seed)  # the streams continued are the run's
        sampler = training.loader_train.sampler
        if hasattr(sampler, 'seed'):  # several processes shuffle by seed + epoch: the run's seed, as the streams
            sampler.seed = args.seed
    return start_epoch, max_accuracy


def in_own_folder(args) -> bool:
    """Whether a continued run writes to the folder of its ``--resume`` file."""
    return os.path.realpath(os.path.dirname(args.resume)) == os.path.realpath(args.output_dir)


def best_epoch_reached(checkpoint: dict) -> Tuple[float, bool]:
    """The run's best Acc@1 so far that ``checkpoint`` records (-1 if none), and whether the checkpoint's own epoch
    is the one that first reached it.  best.pth is written right after checkpoint.pth when an epoch improves; an
    epoch that only tied the best wrote no best.pth (the first epoch reaching it did, perhaps in the folder of the
    run this one continues): ``improved`` says which; a checkpoint of an earlier version, without it, is judged by
    its accuracy."""
    accuracy = float(checkpoint.get('max_accuracy', -1.0))
    reached = accuracy >= 0 and float((checkpoint.get('log_stats') or {}).get('test_acc1', -1.0)) == accuracy
    return accuracy, bool(reached and checkpoint.get('improved', True))


def repair_outputs(args, checkpoint: dict) -> None:
    """A run continued in the folder of its checkpoint: ``log.txt`` holds each finished epoch's line once (the
    checkpoint's own epoch added if a kill lost it, with its TensorBoard scalars), ``best.pth`` is the checkpoint's
    when its epoch is the best and a kill came before that file (the temporary files of a job killed while saving
    are removed by :func:`clear_killed_saves`, for every finetuning run).  Rank 0 does it."""
    if not is_main_process() or not in_own_folder(args):
        return
    paths = output_paths(args)
    epoch = int(checkpoint['epoch'])
    if reconcile_log(paths['log.txt'], epoch, checkpoint.get('log_stats')):
        # TensorBoard is written before log.txt, so a missing log line may mean missing scalars (a kill before
        # them) or not (a kill while the line was written): those not there yet are written now, none twice
        written = scalars_at(args.output_dir, epoch)
        if set(epoch_tags(checkpoint['log_stats'])) - written:
            tb = TensorBoard(args.output_dir)
            epoch_scalars(tb, checkpoint['log_stats'], epoch, written)
            tb.close()
    # a kill between checkpoint.pth and best.pth leaves the checkpoint's epoch, the best so far, without the latter
    accuracy, reached = best_epoch_reached(checkpoint)
    best = load_checkpoint_file(paths['best.pth'], mmap=True) if os.path.isfile(paths['best.pth']) else {}
    if reached and float(best.get('max_accuracy', -1.0)) < accuracy:
        def copy(f):
            with open(args.resume, 'rb') as source:
                shutil.copyfileobj(source, f, 16 << 20)
        write_atomic(paths['best.pth'], copy)
        rank0_print(f'note: {paths["best.pth"]} was not written after epoch {epoch}, the best so far (a stop right '
                    f'after its checkpoint): copied from {args.resume}')


def best_elsewhere_note(args, checkpoint: dict) -> None:
    """A run continued into another folder (a ``best.pth`` resumed): that folder's ``best.pth`` is written only once
    an epoch improves on the run's best so far, so until then a note names the file holding it (or says it is
    gone: a checkpoint copied alone).  Rank 0 says it."""
    if not is_main_process() or in_own_folder(args):
        return
    accuracy, reached = best_epoch_reached(checkpoint)
    best = output_paths(args)['best.pth']
    if accuracy < 0 or os.path.isfile(best):
        return
    where = args.resume if reached else os.path.join(os.path.dirname(args.resume), 'best.pth')
    held = 'is in' if os.path.isfile(where) else 'was saved beside it as'
    rank0_print(f'note: the best epoch so far of the run continued here (Acc@1 {accuracy:.2f}%) {held} '
                f'{where}{"" if held == "is in" else ", which is not there now"}: {best} is written only when an '
                f'epoch improves on it')


def finished_checkpoint(args, checkpoint: Optional[dict]) -> Optional[dict]:
    """``checkpoint``, the contents of ``--resume`` (None without one), when it is a finetuning checkpoint that
    already holds the run's last epoch (the run has nothing left to do); None for any other run."""
    if modes_of(args) or checkpoint is None or not is_training_checkpoint(checkpoint):
        return None
    return checkpoint if int(checkpoint['epoch']) + 1 >= args.final_finetune else None


def clear_killed_saves(args) -> None:
    """Remove the temporary files a job killed while saving left in the run's output folder (a finished run's, a
    continued one's, a fresh one's: killed while saving its first checkpoint).  Rank 0 does it, once per run, after
    every check that can refuse the run, so that a refused run leaves the folder as it was."""
    if is_main_process():
        remove_stale_temporaries(list(output_paths(args).values()))


def finished_run(args, checkpoint: dict) -> Dict[str, float]:
    """A finished run (``checkpoint``: its :func:`finished_checkpoint`): its outputs repaired, and nothing else
    done (no data, model or teacher is built)."""
    # (no model is built here: a --model other than the run's is refused as an unfinished run's is)
    models.check_recorded_name(checkpoint, args.resume, args.model, '--model')
    clear_killed_saves(args)
    repair_outputs(args, checkpoint)
    done = int(checkpoint['epoch']) + 1
    rank0_print(f'Nothing to do: {done} epoch{"s" * (done != 1)} already finished in {args.resume} '
                f'(--final_finetune {args.final_finetune})')
    return {'max_accuracy': float(checkpoint.get('max_accuracy', -1.0))}


def random_generators(training: engine.Training) -> Dict[str, torch.Generator]:
    """The generators of a run besides the global ones (saved and restored with them)."""
    return {'data': training.loader_train.generator}


# Paths a continued run takes over from its checkpoint: saved absolute, so that resuming from another directory
# reads the same data and teacher, not whatever the relative path names there.
SAVED_ABSOLUTE = ('data_path', 'teacher_path')


def args_to_save(args) -> dict:
    """The run's arguments as a checkpoint keeps them (a plain dict), :data:`SAVED_ABSOLUTE` made absolute."""
    saved = vars(args).copy()
    for dest in SAVED_ABSOLUTE:
        if saved.get(dest):
            saved[dest] = os.path.abspath(saved[dest])
    return saved


def training_state(training: engine.Training, args, epoch: int, max_accuracy: float, log_stats: dict,
                   rng: List[dict], improved: bool) -> dict:
    """What ``checkpoint.pth`` and ``best.pth`` hold (``args`` as a plain dict: plain ``torch.load`` reads it);
    ``rng``: every process's random streams (``seeding.gather``), in rank order; ``improved``: whether the epoch
    raised the best Acc@1 (so best.pth is written with it)."""
    model = training.model_without_ddp
    state = {
        'model': model.state_dict(), 'optimizer': training.optimizer.state_dict(),
        'lr_scheduler': training.lr_scheduler.state_dict(), 'epoch': epoch, 'scaler': training.scaler.state_dict(),
        'channels': models.kept_token_counts(model), 'args': args_to_save(args), 'max_accuracy': max_accuracy,
        'log_stats': log_stats, 'rng': rng, 'improved': improved,
    }
    if training.model_ema is not None:
        state['model_ema'] = training.model_ema.module.state_dict()
    classes = class_names(training.loader_train.dataset)
    if classes is not None:
        state['classes'] = classes
    return state


def class_names(dataset) -> Optional[List[str]]:
    """The names behind the labels 0, 1, ... of a data set that has them (an image folder's sorted class folders),
    else None."""
    names = getattr(dataset, 'classes', None)
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


# The data sets whose labels have names (class_names of the data set: an image folder's, CIFAR-100's)
NAMED_CLASSES = ('IMNET', 'CIFAR')


def check_recorded_data_set(checkpoint: dict, args, teacher: bool = False, names_decide: bool = True) -> None:
    """The :data:`CLASSES_OF_THE_RUN` values a file of this project records (in its ``args``) against the run's:
    a file trained with other ones is refused, its labels being other classes.  Needs no data, so it is said
    before the data set is listed (minutes on ImageNet).  ``names_decide``: where the file records its class
    names and the run's data set names its classes too, the names decide instead, once the data set is listed
    (:func:`check_recorded_classes`, which calls this where they do not); ``teacher``: the file is the
    --teacher-path, not --resume."""
    if names_decide and isinstance(checkpoint.get('classes'), (list, tuple)) and args.data_set in NAMED_CLASSES:
        return
    recorded = checkpoint_args(checkpoint)
    parser = get_args_parser()
    named = f'the teacher {args.teacher_path}' if teacher else args.resume
    for dest in CLASSES_OF_THE_RUN:
        value = recorded.get(dest)
        if names_other_classes(dest, value, args):
            remedy = (f'give a teacher trained on {spell(parser, dest, getattr(args, dest))}' if teacher
                      else f'give {spell(parser, dest, value)}')
            raise UserError(f'{named} records {spell(parser, dest, value)}, whose labels name '
                            f'other classes than {spell(parser, dest, getattr(args, dest))}: {remedy}')


def check_recorded_classes(checkpoint: dict, dataset, args, split: str, continuing: bool = False,
                           teacher: bool = False) -> None:
    """The class folders a file of this project records (``classes``: those its model was trained on) against
    ``dataset``'s: labels are positions in the sorted folder list, so other names would give the model's labels
    to other classes.  Official files record none (not checked).  ``continuing``: the run continues the file's;
    ``teacher``: the file is the --teacher-path (whose logits the student is distilled towards), not --resume."""
    path = args.teacher_path if teacher else args.resume
    named = f'the teacher {path}' if teacher else path
    saved, current = checkpoint.get('classes'), class_names(dataset)
    named_alike = isinstance(saved, (list, tuple)) and current is not None and list(saved) == current
    if not continuing and not named_alike:
        # labels without names on one side (iNaturalist, DIGITS, or a file that records none), or other names: the
        # data set the file records says first (a file of another one is refused for that, not for its names)
        check_recorded_data_set(checkpoint, args, teacher, names_decide=False)
    if not isinstance(saved, (list, tuple)) or current is None or named_alike:
        return
    first = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b), min(len(saved), len(current)))
    whose, there = ((f'of the run {path} continues', 'the run') if continuing
                    else (f'{named} records', 'the file'))
    remedy = 'give a teacher trained on these classes' if teacher else 'give the --data-path it used'
    theirs, ours = (str(names[first]) if first < len(names) else 'none' for names in (saved, current))
    theirs, ours = as_told_apart([theirs], [ours])[0], as_told_apart([ours], [theirs])[0]
    raise UserError(f'the {split} classes under {args.data_path} are not those {whose} (label {first}: '
                    f'{theirs} in {there}, {ours} here): {remedy}')


def run_finetune(args, device: torch.device, resumed: Optional[dict]) -> Dict[str, float]:
    try:
        training, checkpoint = build_training(args, device, resumed)
        start_epoch, max_accuracy = restore_training(training, checkpoint, args)  # (finished runs stop in run())
    except STOPS_MIDWAY as e:  # (listing the data, building the models, restoring the run: no checkpoint yet)
        if args.resume and not getattr(e, 'kept', None):
            e.kept = f'no epoch had started, so no checkpoint was written ({args.resume} is as it was)'
        raise
    for line in describe_parameter_groups(training.optimizer, training.model_without_ddp, args):
        rank0_print(line)
    clear_killed_saves(args)
    paths = output_paths(args)
    tb = None  # created with the first checkpoint: a run that fails before it leaves no events file
    continuing = is_training_checkpoint(checkpoint)
    last_good, last_epoch = (args.resume, int(checkpoint['epoch'])) if continuing else (None, None)

    def save(epoch, train_stats, test_stats, improved, best):
        nonlocal last_good, last_epoch, tb
        model = training.model_without_ddp
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': sum(p.numel() for p in model.parameters()),
                     'gflops': gflops(model), 'max_accuracy': best}
        rng = seeding.gather(seeding.capture(random_generators(training), training.device))  # every process
        if is_main_process():
            state = training_state(training, args, epoch, best, log_stats, rng, improved)
            # checkpoint.pth first: a best.pth that a kill right after it misses is copied from it on resume
            # (repair_outputs); the other order left a best.pth of an epoch the checkpoint does not reach
            save_atomic(state, paths['checkpoint.pth'])
            last_good, last_epoch = paths['checkpoint.pth'], epoch
            if improved:
                save_atomic(state, paths['best.pth'])
        all_agree(True, training.device)  # the other processes count the checkpoint written once rank 0 has
        last_good, last_epoch = paths['checkpoint.pth'], epoch
        if not is_main_process():
            return
        if tb is None:
            tb = TensorBoard(args.output_dir)
        epoch_scalars(tb, log_stats, epoch)  # before log.txt: a resume that finds no log line writes those missing
        append_line(paths['log.txt'], json.dumps(log_stats))

    rank0_print(f'Finetuning for epochs {start_epoch}..{args.final_finetune - 1} '
                f'(lr {args.scaled_lr:.2e} {"for" if args.scaled_lr == scaled_lr(args) else "as restored, with"} '
                f'batch {args.batch_size} x {args.world_size} processes)')
    start_time = time.time()
    try:
        max_accuracy = engine.train_epochs(training, start_epoch, args.final_finetune, max_accuracy, save,
                                           args.print_freq, rank0_print)
    except NonFiniteLossError as e:
        kept = last_good or args.resume or '(none yet)'
        raise NonFiniteLossError(f'{e}; stopped. Last good checkpoint, untouched: {kept}') from None
    except STOPS_MIDWAY as e:
        if last_good is None:
            e.kept = 'no epoch had finished, so no checkpoint was written'
        else:  # (--output_dir defaults to the folder of a checkpoint.pth: named when the run writes elsewhere)
            elsewhere = (os.path.basename(last_good) != 'checkpoint.pth'
                         or os.path.realpath(os.path.dirname(last_good)) != os.path.realpath(args.output_dir))
            e.kept = (f'the last complete checkpoint is {last_good} (epoch {last_epoch}); continue with '
                      f'--resume {last_good}' + (f' --output_dir {args.output_dir}' if elsewhere else ''))
        raise
    finally:
        if tb is not None:
            tb.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    rank0_print(f'Training time {total}')
    return {'max_accuracy': max_accuracy}


# ----------------------------------------------------------------------------------------------------------

def writes_output(args) -> bool:
    return bool(args.prune or not modes_of(args))


def check_output_outside_splits(args) -> None:
    """An --output_dir inside an image folder's ``train/`` or ``val/`` (IMNET) is refused: the folders the run
    writes there (its output folder, --prune's TensorBoard folder) would be read as classes of that split by the
    next run on the data."""
    if args.data_set != 'IMNET' or not args.data_path:
        return
    out = os.path.realpath(args.output_dir)
    for split in ('train', 'val'):
        root = os.path.realpath(os.path.join(args.data_path, split))
        if out == root or out.startswith(root + os.sep):
            raise UserError(f'--output_dir {args.output_dir} lies inside the {split} split of --data-path '
                            f'({os.path.join(args.data_path, split)}): the folders a run writes there would be read '
                            f'as classes; choose a folder outside train/ and val/')


def check_appendable(path: str, reads: str) -> None:
    """The results file a run appends to is, if it is there already, a file the run may write and read (``reads``:
    why it does, for the messages)."""
    if not os.path.exists(path):
        return
    why = f'the run appends its results to it, and {reads}'
    if os.path.isdir(path):
        raise UserError(f'cannot write to {path}: it is a directory ({why})')
    writable = os.access(path, os.W_OK)
    if not writable or (reads and not os.access(path, os.R_OK)):
        raise UserError(f'cannot {"read" if writable else "write to"} {path}: permission denied ({why})')


def prune_tensorboard_dir(args) -> str:
    """Where ``--prune`` writes its TensorBoard scalars: a folder of its own per mode and rate."""
    return os.path.join(args.output_dir, f'prune_{args.prune_mode}_{args.prune_rate}')


def run(args) -> Dict[str, float]:
    # --resume is read once, whole (its checksums checked), and its contents passed on: a finetuning run reads it
    # first (the run it continues gives its settings), the others once the flags are judged
    continues = not modes_of(args) and args.resume and os.path.isfile(args.resume)
    resumed = load_checkpoint_file(args.resume) if continues else None
    notes, inherited, no_effect = continue_run(args, resumed)
    # (an --output_dir given empty, a script's "$OUT" unset, is refused below as empty: not this default)
    beside_resume = bool(args.prune and not args.output_dir and args.resume and 'output_dir' not in given_flags(args))
    if beside_resume:
        args.output_dir = os.path.dirname(args.resume) or '.'
        notes.append(f'No --output_dir: writing beside --resume, in {args.output_dir}')
    # a finished run is known before the flags are judged: it reads no teacher, so one moved away since is no error
    finished = finished_checkpoint(args, resumed)
    try:
        validate_args(args, void=no_effect, finished=finished is not None)
        if finished is None and not args.speed_only:  # (a continued run's, moved since, says where it comes from)
            check_data_path(args)
    except UserError as e:
        raise _with_origin(e, args, inherited) from None
    args.device = resolve_device(args.device)
    if writes_output(args):
        check_output_outside_splits(args)
        try:
            check_output_dir(args.output_dir)
            check_tensorboard_dir(args.output_dir)  # (finetuning writes its scalars there, --prune in a folder of it)
            if args.prune:
                check_output_dir(prune_tensorboard_dir(args), flag="--prune's TensorBoard folder")
        except UserError as e:
            where = ' (the directory of --resume: give --output_dir)' if beside_resume else ''
            raise UserError(f'{e}{where}') from None
        if args.prune:  # earlier prunes' records are kept and this one's appended, to their log and no other file
            prune_log = os.path.join(args.output_dir, 'prune_log.txt')
            check_appendable(prune_log, 'reads it first: it appends only to the log of earlier prunes')
            check_prune_log(prune_log)
        else:  # finetuning: the checkpoints it writes, and the log a continued run rewrites
            paths = output_paths(args)
            check_appendable(paths['log.txt'], 'a continued run reads it back')
            for path in filter(os.path.isdir, (paths['checkpoint.pth'], paths['best.pth'])):
                raise UserError(f'cannot write {path}: it is a directory (the run writes its checkpoints there)')
            read_log(paths['log.txt'])
            # another run's results: refused before the data is listed (minutes on ImageNet)
            check_earlier_run(args, resumed is not None and is_training_checkpoint(resumed))
    if not modes_of(args) and finished is None:
        notes += filter(None, [warmup_note(args)])
    notes += unused_flag_notes(args, get_args_parser(), said=no_effect)
    init_distributed_mode(args)
    if not modes_of(args) and not (resumed is not None and is_training_checkpoint(resumed)):
        # (a continued run keeps the rates its optimizer restores)
        notes += filter(None, [min_lr_note(args), warmup_lr_note(args)])
    for line in notes:
        rank0_print(line)
    if finished is not None:
        return finished_run(args, finished)
    device = torch.device(args.device)
    args.amp = args.amp and device.type == 'cuda'  # mixed precision on CUDA only
    seeding.seed_everything(args.seed, args.rank)  # Python's random, numpy, torch: --seed + rank
    cfg = models.pretrained_cfg(args.model)
    args.input_size = input_size(args)
    args.mean, args.std = tuple(cfg.mean), tuple(cfg.std)
    check_training_transform(args, unused_flags(args))  # the transform strings this run reads, before any work
    # the --resume file is a readable checkpoint before the data is listed (minutes on ImageNet): an unreadable one
    # is said here, as it would be once its model is built (the teacher's file is read where its model is built,
    # also before the data: build_training)
    if args.resume and resumed is None:
        resumed = load_checkpoint_file(args.resume)
    if args.speed_only:
        return run_speed(args, device, resumed)
    if args.eval:
        return run_eval(args, device, resumed)
    if args.prune:
        return run_prune(args, device, resumed)
    with output_dir_of_this_run(args, device):
        return run_finetune(args, device, resumed)


def output_dir_of_this_run(args, device: torch.device) -> contextlib.ExitStack:
    """Rank 0 holds --output_dir for the run (:func:`utils.output_dir_held`): another run in the same folder, started
    before this one's first file or continuing the same checkpoint, would write its own files over this one's.
    Agreed on by every process, so a refused run stops in all of them with the same line (the others would wait
    for rank 0 at their first collective)."""
    held, refused = contextlib.ExitStack(), None
    if is_main_process():
        try:
            held.enter_context(output_dir_held(args.output_dir, warn=rank0_print))
        except UserError as e:
            refused = e
    if not all_agree(refused is None, device):
        held.close()
        raise refused or UserError(in_use_message(args.output_dir))
    return held


# What stops a run midway and is reported with what the run has kept: the stage that knows sets it on the
# exception as ``kept`` (:func:`_what_is_kept`).  RuntimeError: torch's out-of-memory errors (the GPU's
# OutOfMemoryError; the CPU allocator's plain RuntimeError, see cpu_out_of_memory; CUDA's own, see
# cuda_out_of_memory) and a lost peer; any other RuntimeError carries ``kept`` unread and is raised as it is.
# BadImageError: an image that cannot be read, found when the run reaches it (a user error, said with what is kept);
# OutputWriteError: a checkpoint or log that cannot be written (a full disk), likewise.
STOPS_MIDWAY = (KeyboardInterrupt, Terminated, RuntimeError, BadImageError, OutputWriteError)


def _what_is_kept(e: BaseException) -> str:
    """What an interrupted run leaves: set on the exception by the stage that knows (finetuning, pruning)."""
    return getattr(e, 'kept', None) or 'nothing was written'


def out_of_memory(args, e: BaseException) -> str:
    """One line for a GPU (or the CPU) that ran out of memory: torch's figures (what was asked for, what the GPU
    has), the batch that did it and the way round it, and what the run has kept."""
    sentences = re.split(r'(?<=\.)\s+', one_line(e))
    figures = ' '.join(x for x in sentences if x.startswith(('Tried to allocate', 'GPU '))) or one_line(e)[:200]
    cpu, past, cuda = cpu_out_of_memory(e), past_64_bits(e), cuda_out_of_memory(e)
    where, figures = ('CPU', f'{cpu}, which the allocator refused') if cpu else ('GPU', cuda or figures)
    if past:
        where, figures = ('GPU' if str(args.device).startswith('cuda') else 'CPU'), past
    hint = 'a smaller --batch-size' + (' or --input-size' if past else '') + ' needs less'
    if not args.speed_only:
        hint += ' (evaluation batches are 1.5 times it)'
    if not modes_of(args) and not args.unscale_lr:
        hint += '; the learning rate scales with it (--lr x batch x processes / 512)'
    batch = run_batch_size(args)
    which = f'--batch-size {batch}' if batch == args.batch_size else f'a batch of {batch} (the original protocol\'s)'
    return f'out of {where} memory ({figures.rstrip(".")}) with {which} per process: {hint}; {_what_is_kept(e)}'


def main(argv=None, *, ends_process: bool = False) -> int:
    """finetune.py's command line (``argv``, or sys.argv's); returns the exit code.  ``ends_process``: run as the
    script, whose process a further signal while a stop is under way may end (see :func:`sigterm_unwinds`); called
    in-process, that signal raises KeyboardInterrupt (Terminated) to the caller instead."""
    args = get_args_parser().parse_args(argv)
    prefix = rank_prefix()

    def say(line: str) -> None:  # one line, whatever the paths it names hold (a newline in a folder's name)
        print_line(prefix + escape_controls(line), file=sys.stderr)

    # (the handlers stay until the stop is said and its exception freed: the freeing shuts the DataLoader workers
    # down, where a second signal would otherwise raise)
    with sigterm_unwinds(ends_process):
        try:
            run(args)
        except UserError as e:
            kept = getattr(e, 'kept', None)  # found midway (an unreadable image): what the run has written is complete
            say(f'error: {one_line(e)}' + (f'; {kept}' if kept else ''))
            return EXIT_USER_ERROR
        except NonFiniteLossError as e:  # (this project's message, raised in this process: whole)
            say(f'error: {str(e).strip()}')
            return EXIT_DIVERGED
        except torch.OutOfMemoryError as e:
            say(f'error: {out_of_memory(args, e)}')
            return EXIT_OUT_OF_MEMORY
        except (KeyboardInterrupt, Terminated) as e:
            return say_stopped(e, _what_is_kept(e), prefix)
        except RuntimeError as e:
            if cpu_out_of_memory(e) or past_64_bits(e) or cuda_out_of_memory(e):
                say(f'error: {out_of_memory(args, e)}')
                return EXIT_OUT_OF_MEMORY
            if not lost_peer(e):
                raise
            # (what the stage knows it kept, as after Ctrl-C or SIGTERM: the checkpoint to continue from)
            say(f'error: stopped because another process of this job failed (see its error); '
                f'{getattr(e, "kept", None) or "checkpoints written so far are complete"}')
            return EXIT_PEER_FAILED
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return 0


if __name__ == '__main__':
    end_script(main(ends_process=True))
