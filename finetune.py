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
import inspect
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
import datetime
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import engine
import models
import pruning
from datasets import DATA_SETS, build_dataset
from engine import NonFiniteLossError, evaluate, measure_throughput, steady_allocator
from losses import DistillationLoss
from samplers import DistributedEvalSampler, RASampler
from utils import (UserError, TensorBoard, all_agree, check_output_dir, checkpoint_args, init_distributed_mode,
                   is_main_process, one_line, print_line, rank0_print, remove_stale_temporaries, save_atomic, write_text_atomic)
from utils import seeding

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a job ended by SIGTERM
EXIT_PEER_FAILED = 1  # another process of a multi-process job stopped first; its own message says why


class _Parser(argparse.ArgumentParser):
    """A mistyped flag or value is one line too (argparse would print the whole usage first)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f'error: {message} (see --help)\n')


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser('finetune.py', description='Clip & Concat for timm ViTs: prune, evaluate, benchmark, finetune.',
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # what to do
    a('--eval', action='store_true', help='evaluate --resume on the validation set')
    a('--speed-only', action='store_true', help='print GFLOPs and images/s (pruned and dense) and exit')
    a('--prune', action='store_true', help='score, plan and write <output_dir>/pruned_<rate>.pth')
    a('--prune_mode', default='attn', choices=['attn', 'random'])
    a('--prune_rate', default=0.25, type=float, help='fraction of (layer, patch) slots to clip, in (0, 1)')
    a('--prune-batches', default=None, type=int, help='score at most this many training batches')
    a('--final_finetune', default=30, type=int, help='epochs of distillation finetuning')
    # model
    a('--model', default='deit_tiny_patch16_224',
      help='any timm ViT name, "cc_" optional (e.g. deit_small_distilled_patch16_224, vit_small_patch16_224)')
    a('--input-size', default=None, type=int, help='image size (default: the model\'s)')
    a('--drop', default=0.0, type=float, help='dropout rate')
    a('--drop-path', default=0.1, type=float, help='stochastic depth rate')
    a('--model-ema', action='store_true')
    a('--no-model-ema', action='store_false', dest='model_ema')
    a('--model-ema-decay', default=0.99996, type=float)
    a('--model-ema-force-cpu', action='store_true')
    # optimizer and schedule (DeiT's defaults)
    a('--opt', default='adamw')
    a('--opt-eps', default=1e-8, type=float)
    a('--opt-betas', default=None, type=float, nargs='+')
    a('--clip-grad', default=None, type=float)
    a('--momentum', default=0.9, type=float)
    a('--weight-decay', default=0.05, type=float)
    a('--sched', default='cosine')
    a('--lr', default=5e-4, type=float, help='base lr, scaled by batch * world_size / 512')
    a('--unscale-lr', action='store_true', help='use --lr as given, without the linear scaling')
    a('--lr-noise', default=None, type=float, nargs='+')
    a('--lr-noise-pct', default=0.67, type=float)
    a('--lr-noise-std', default=1.0, type=float)
    a('--warmup-lr', default=1e-6, type=float)
    a('--min-lr', default=1e-5, type=float)
    a('--decay-epochs', default=30, type=float)
    a('--warmup-epochs', default=5, type=int)
    a('--cooldown-epochs', default=10, type=int)
    a('--patience-epochs', default=10, type=int)
    a('--decay-rate', default=0.1, type=float)
    # augmentation (DeiT's defaults)
    a('--color-jitter', default=0.3, type=float)
    a('--aa', default='rand-m9-mstd0.5-inc1', help='auto-augment policy, or "none"')
    a('--smoothing', default=0.1, type=float, help='label smoothing')
    a('--train-interpolation', default='bicubic')
    a('--repeated-aug', action='store_true', help='RASampler (3 repeats) instead of DistributedSampler')
    a('--no-repeated-aug', action='store_false', dest='repeated_aug')
    a('--reprob', default=0.25, type=float, help='random erase probability')
    a('--remode', default='pixel')
    a('--recount', default=1, type=int)
    a('--mixup', default=0.8, type=float)
    a('--cutmix', default=1.0, type=float)
    a('--cutmix-minmax', default=None, type=float, nargs='+')
    a('--mixup-prob', default=1.0, type=float)
    a('--mixup-switch-prob', default=0.5, type=float)
    a('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'])
    a('--eval-crop-ratio', default=0.875, type=float, help='resize to input/ratio then centre crop; 1.0: resize')
    # distillation
    a('--teacher-model', default=None, help='dense teacher architecture (default: same as --model)')
    a('--teacher-path', default='')
    a('--distillation-type', default='none', choices=['none', 'soft', 'hard'])
    a('--distillation-alpha', default=0.5, type=float)
    a('--distillation-tau', default=1.0, type=float)
    # data and run
    a('--data-path', default='', help='data set root (IMNET: train/ and val/ class folders)')
    a('--data-set', default='IMNET', choices=list(DATA_SETS))
    a('--inat-category', default='name')
    a('--batch-size', default=64, type=int)
    a('--output_dir', default='', help='where to write checkpoints, log.txt and TensorBoard events')
    a('--device', default=None, help='cuda (default when available) or cpu')
    a('--seed', default=0, type=int)
    a('--resume', default='', help='checkpoint: official DeiT, pruned_<rate>.pth or checkpoint.pth')
    a('--start_epoch', default=0, type=int)
    a('--dist-eval', action='store_true', help='split evaluation across processes')
    a('--num_workers', default=10, type=int)
    a('--pin-mem', action='store_true', default=True)
    a('--no-pin-mem', action='store_false', dest='pin_mem')
    a('--no-amp', action='store_false', dest='amp', help='disable mixed precision (only used on CUDA)')
    a('--print-freq', default=10, type=int)
    a('--speed-repeats', default=10, type=int, help='timed forward passes per model (median is reported)')
    a('--speed-warmup', default=3, type=int)
    a('--speed-dtype', default=None, choices=['fp32', 'fp16', 'bf16'],
      help='autocast for --speed-only (default fp16 on CUDA, fp32 on CPU)')
    a('--world_size', default=1, type=int, help='set by the launcher')
    a('--dist_url', default='env://', help='set by the launcher')
    a('--local-rank', '--local_rank', default=None, type=int, dest='local_rank', help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------------------------------
# argument checks

def validate_args(args) -> None:
    """Refuse inconsistent requests before any work starts."""
    modes = [m for m in ('eval', 'speed_only', 'prune') if getattr(args, m)]
    if len(modes) > 1:
        raise UserError('choose one of --eval, --speed-only and --prune')
    if args.prune and not 0.0 < args.prune_rate < 1.0:
        raise UserError(f'--prune_rate must be in (0, 1), got {args.prune_rate}')
    if args.prune_batches is not None and args.prune_batches < 1:
        raise UserError(f'--prune-batches must be at least 1, got {args.prune_batches}')
    if args.batch_size < 1:
        raise UserError(f'--batch-size must be at least 1, got {args.batch_size}')
    if args.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {args.num_workers}')
    if args.final_finetune < 1 and not modes:
        raise UserError(f'--final_finetune must be at least 1, got {args.final_finetune}')
    if not 0.0 < args.eval_crop_ratio <= 1.0:
        raise UserError(f'--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}')
    if args.speed_repeats < 1 or args.speed_warmup < 0:
        raise UserError('--speed-repeats must be at least 1 and --speed-warmup at least 0')
    if args.eval and not args.resume:
        raise UserError('--eval needs --resume CHECKPOINT (the model to evaluate)')
    if args.prune and not args.resume:
        raise UserError('--prune needs --resume CHECKPOINT (the dense DeiT to prune)')
    if (args.prune or not modes) and not args.output_dir:
        raise UserError('--output_dir is required: ' + ('--prune writes pruned_<rate>.pth there' if args.prune
                                                         else 'finetuning writes checkpoint.pth and log.txt there'))
    if not modes and args.distillation_type != 'none' and not args.teacher_path:
        raise UserError(f'--distillation-type {args.distillation_type} needs --teacher-path (the dense teacher)')
    if args.distillation_type != 'none' and not 0.0 <= args.distillation_alpha:
        raise UserError('--distillation-alpha must be 0 or more')
    if args.distillation_tau <= 0:
        raise UserError(f'--distillation-tau must be positive, got {args.distillation_tau}')
    if args.data_set != 'DIGITS' and (args.eval or args.prune or not modes) and not args.data_path:
        raise UserError(f'--data-path is required for --data-set {args.data_set}')
    if args.resume and os.path.isdir(args.resume):
        raise UserError(f'--resume {args.resume} is a directory; give the checkpoint file '
                        f'(e.g. {os.path.join(args.resume, "checkpoint.pth")})')
    if args.resume and not os.path.isfile(args.resume):
        raise UserError(f'checkpoint not found: {args.resume}')
    if not modes and not args.lr > 0:
        raise UserError(f'--lr must be positive, got {args.lr}')
    if not 0.0 <= args.smoothing < 1.0:
        raise UserError(f'--smoothing must be in [0, 1), got {args.smoothing}')
    if args.teacher_path and not modes and not os.path.isfile(args.teacher_path):
        raise UserError(f'teacher checkpoint not found: {args.teacher_path}')
    args.model = cc_model_name(args.model)
    if args.teacher_model:
        cc_model_name(args.teacher_model, '--teacher-model')


def cc_model_name(name: str, flag: str = '--model') -> str:
    """Any timm ViT name, with or without ``cc_`` -> ``cc_<timm name>``, checked against timm's registry."""
    try:
        return 'cc_' + models.check_model_name(name)
    except ValueError as e:
        raise UserError(f'{flag}: {e}') from None


def resolve_device(requested: Optional[str]) -> str:
    if requested is None:
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if requested.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {requested}: CUDA is not available on this machine (use --device cpu)')
    try:
        torch.device(requested)
    except RuntimeError:
        raise UserError(f'--device {requested} is not a device torch knows (use cuda or cpu)') from None
    return requested


# ----------------------------------------------------------------------------------------------------------
# models and checkpoints

def load_model(args, path: str, name: str, fallback_classes: int = 1000) -> Tuple[nn.Module, dict]:
    """models.build_model_from_checkpoint with this run's input size and dropout rates."""
    return models.build_model_from_checkpoint(path, name, fallback_classes, img_size=args.input_size,
                                              warn=rank0_print, drop_rate=args.drop, drop_path_rate=args.drop_path)


def new_model(args, num_classes: int = 1000) -> nn.Module:
    """``--model`` with random weights (a run without ``--resume``)."""
    return models.build_model(args.model, num_classes, img_size=args.input_size, drop_rate=args.drop,
                              drop_path_rate=args.drop_path)


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


def gflops(model: nn.Module) -> float:
    return models.count_macs(model) / 1e9


# ----------------------------------------------------------------------------------------------------------
# data

def data_loader(dataset, args, train: bool, sampler=None, batch_size=None):
    # Training draws its shuffle and its workers' seeds from a generator of its own (saved with checkpoints).
    generator = seeding.data_generator(args.seed, args.rank) if train else None
    if sampler is None:
        if args.distributed and train:
            if args.repeated_aug:
                sampler = RASampler(dataset, args.world_size, args.rank, shuffle=True, seed=args.seed)
            else:
                sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, shuffle=True,
                                                              seed=args.seed)
        elif args.distributed and args.dist_eval:
            sampler = DistributedEvalSampler(dataset, args.world_size, args.rank)
        elif train:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        else:
            sampler = torch.utils.data.SequentialSampler(dataset)
    bs = batch_size or (args.batch_size if train else int(1.5 * args.batch_size))
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=bs, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device.startswith('cuda'), drop_last=train and len(sampler) >= bs,
        persistent_workers=False, generator=generator)


def build_data(args, train: bool):
    dataset, nb_classes = build_dataset(train, args)
    if len(dataset) == 0:
        raise UserError(f'the {"training" if train else "validation"} set of {args.data_set} is empty')
    return dataset, nb_classes


def check_classes(nb_classes: int, model: nn.Module, what: str) -> None:
    if nb_classes is not None and nb_classes > model.num_classes:
        raise UserError(f'the {what} set has {nb_classes} classes but the model\'s head has {model.num_classes}')


class _Limited:
    """An iterable cut to ``limit`` items that still knows its length (for progress and ETA)."""

    def __init__(self, iterable, limit: Optional[int]):
        self.iterable = iterable
        self.length = len(iterable) if limit is None else min(limit, len(iterable))

    def __iter__(self):
        return itertools.islice(iter(self.iterable), self.length)

    def __len__(self) -> int:
        return self.length


# ----------------------------------------------------------------------------------------------------------
# the four commands

def run_speed(args, device: torch.device) -> Dict[str, float]:
    if args.resume:
        model, _ = load_model(args, args.resume, args.model)
    else:
        model = new_model(args)
        rank0_print(f'No --resume: measuring the dense {args.model} with random weights')
    model.to(device)
    size = model.patch_embed.img_size[0]
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': None}[
        args.speed_dtype or ('fp16' if device.type == 'cuda' else 'fp32')]
    pruned = any(not blk.dense for blk in model.blocks)
    runs = {'pruned': model, 'dense': models.dense_copy(model)} if pruned else {'dense': model}
    rank0_print(f'Model {args.model}: {describe(model)}')
    if device.type == 'cpu':
        rank0_print(f'CPU allocator: {steady_allocator()}')
    throughput = measure_throughput(runs, args.batch_size, size, device, repeats=args.speed_repeats,
                                    warmup=args.speed_warmup, dtype=dtype)
    precision = 'fp32' if dtype is None else str(dtype).replace('torch.', '')
    rank0_print(f'Batch {args.batch_size} at {size}x{size} on {device} ({precision}), median of '
                f'{args.speed_repeats} timed passes, models interleaved')
    results = {}
    for name, m in runs.items():
        results[f'{name}_gflops'] = gflops(m)
        results[f'{name}_throughput'] = throughput[name]
        rank0_print(f'FLOPs of the {name} model: {gflops(m):.2f} GFLOPs')
        rank0_print(f'Throughput of the {name} model: {throughput[name]:.1f} images/s')
    if pruned:
        speedup = throughput['pruned'] / throughput['dense']
        flops_ratio = results['dense_gflops'] / results['pruned_gflops']
        results.update(speedup=speedup, flops_ratio=flops_ratio)
        rank0_print(f'Speed-up of the pruned model: {speedup:.2f}x (FLOPs ratio {flops_ratio:.2f}x)')
    return results


def run_eval(args, device: torch.device) -> Dict[str, float]:
    dataset_val, nb_classes = build_data(args, train=False)
    model, _ = load_model(args, args.resume, args.model, nb_classes)
    check_classes(nb_classes, model, 'validation')
    model.to(device)
    rank0_print(f'Model {args.model} from {args.resume}: {describe(model)}; {gflops(model):.2f} GFLOPs')
    stats = evaluate(data_loader(dataset_val, args, train=False), model, device, amp=args.amp,
                     print_freq=args.print_freq, printer=rank0_print)
    rank0_print(f'Accuracy of the network on the {len(dataset_val)} test images: {stats["acc1"]:.1f}%')
    return stats


def run_prune(args, device: torch.device) -> Dict[str, float]:
    from timm.loss import LabelSmoothingCrossEntropy
    path = os.path.join(args.output_dir, f'pruned_{args.prune_rate}.pth')
    # Checked before a scoring pass that can take an hour on ImageNet; agreed on by every process before
    # rank 0 can write the file, so all of them stop with the same message.
    if not all_agree(not os.path.exists(path), device):
        raise UserError(f'{path} already exists from an earlier run; choose another --output_dir '
                        f'(or move it away)')
    dataset_val, nb_classes = build_data(args, train=False)
    model, _ = load_model(args, args.resume, args.model, nb_classes)
    check_classes(nb_classes, model, 'validation')
    model.to(device)
    depth, num_patches = len(model.blocks), model.num_tokens - model.num_prefix_tokens
    if args.prune_mode == 'attn':
        # Scoring sees plain training images: no mixup, cutmix, auto-augment or random erasing.
        score_args = argparse.Namespace(**{**vars(args), 'aa': 'none', 'reprob': 0.0})
        dataset_train, train_classes = build_data(score_args, train=True)
        check_classes(train_classes, model, 'training')
        loader = data_loader(dataset_train, args, train=True)
        criterion = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
        from utils import MetricLogger
        batches = _Limited(loader, args.prune_batches)
        logged = MetricLogger(printer=rank0_print).log_every(batches, args.print_freq, 'Scoring:')
        scores = pruning.attention_taylor_scores(model, logged, criterion, device=device)
        masks = pruning.plan_masks(scores, args.prune_rate)
    else:
        scores = None
        masks = pruning.random_masks(depth, num_patches, args.prune_rate,
                                     generator=torch.Generator().manual_seed(args.seed))
    channels = pruning.apply_masks(model, masks)
    clipped = int((~masks).sum())
    rank0_print(f'Clipped {clipped} of {depth * num_patches} (layer, patch) slots '
                f'({args.prune_mode}, prune rate {args.prune_rate})')
    rank0_print(f'Kept tokens per block (class token included): {channels}')
    # Every process prints what it planned: with several processes the digests must agree (scores are summed).
    print_line(f'[rank {args.rank}] masks sha1 {masks_sha1(model.masks)}')
    rank0_print(f'FLOPs: {gflops(model):.2f} GFLOPs (dense {gflops(models.dense_copy(model)):.2f} GFLOPs)')
    if is_main_process():
        checkpoint = {'model': model.state_dict(), 'channels': channels, 'args': vars(args).copy()}
        if scores is not None:
            checkpoint['scores'] = scores
        save_atomic(checkpoint, path)
        print_line(f'Saved {path}')
    stats = evaluate(data_loader(dataset_val, args, train=False), model, device, amp=args.amp,
                     print_freq=args.print_freq, printer=rank0_print)
    rank0_print(f'Accuracy of the network on the {len(dataset_val)} test images: {stats["acc1"]:.1f}%')
    if is_main_process():
        record = {'prune_mode': args.prune_mode, 'prune_rate': args.prune_rate, 'channels': channels,
                  'gflops': gflops(model), **{f'test_{k}': v for k, v in stats.items()}}
        with open(os.path.join(args.output_dir, 'prune_log.txt'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        tb = TensorBoard(os.path.join(args.output_dir, f'prune_{args.prune_mode}_{args.prune_rate}'))
        tb.scalars({'acc1': stats['acc1'], 'acc5': stats['acc5'], 'gflops': gflops(model)}, 0, prefix='prune/')
        tb.close()
    return stats


def build_teacher(args, device: torch.device, num_classes: int) -> nn.Module:
    name = cc_model_name(args.teacher_model or args.model)
    teacher, _ = models.build_model_from_checkpoint(args.teacher_path, name, img_size=args.input_size,
                                                    warn=rank0_print)
    if teacher.num_classes != num_classes:
        raise UserError(f'the teacher {args.teacher_path} has {teacher.num_classes} classes, '
                        f'the student {num_classes}')
    teacher.set_dense()  # the teacher is the dense model, whatever masks its file holds
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reconcile_log(log_path: str, last_epoch: int, last_stats: Optional[dict]) -> None:
    """Make ``log.txt`` hold each finished epoch (0..last_epoch) exactly once after a resume."""
    entries: Dict[int, str] = {}
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                epoch = record.get('epoch')
                if isinstance(epoch, int) and epoch <= last_epoch:
                    entries[epoch] = json.dumps(record)
    if last_stats is not None and last_epoch not in entries:
        entries[last_epoch] = json.dumps(last_stats)
    write_text_atomic(log_path, ''.join(entries[e] + '\n' for e in sorted(entries)))


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
        if earlier:
            raise UserError(f'{args.output_dir} already holds {" and ".join(earlier)} from an earlier run; '
                            f'choose another --output_dir (or move them away)')


def build_criterion(args, num_classes: int, teacher: Optional[nn.Module]):
    """(criterion, mixup_fn): DeiT's base loss (soft targets under mixup/cutmix, else label smoothing) inside
    the method's distillation loss."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
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


def build_training(args, device: torch.device) -> Tuple[engine.Training, dict]:
    """Everything a finetuning run is made of, before any checkpoint state is restored into it; returns it
    with the ``--resume`` file's contents ({} without one)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler
    from timm.utils import ModelEmaV2

    dataset_train, nb_classes = build_data(args, train=True)
    dataset_val, _ = build_data(args, train=False)
    if args.resume:
        model, checkpoint = load_model(args, args.resume, args.model, nb_classes)
    else:
        rank0_print(f'No --resume: training a dense {args.model} from random initialisation')
        model, checkpoint = new_model(args, nb_classes), {}
    check_classes(nb_classes, model, 'training')
    check_earlier_run(args, continuing=is_training_checkpoint(checkpoint))
    model.to(device)
    rank0_print(f'Student {args.model}: {describe(model)}; {gflops(model):.2f} GFLOPs')

    teacher = None
    if args.distillation_type != 'none':
        teacher = build_teacher(args, device, model.num_classes)
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
        device_ids = [args.gpu] if device.type == 'cuda' else None
        # Masks are identical on every rank (planned from all-reduced scores): no need to re-send them each step.
        ddp = nn.parallel.DistributedDataParallel
        no_buffer_sync = ({'forward_sync_buffers': False} if 'forward_sync_buffers' in inspect.signature(ddp).parameters
                          else {'broadcast_buffers': False})
        model = ddp(model, device_ids=device_ids, **no_buffer_sync)

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * args.world_size / 512.0
    args.epochs = args.final_finetune
    try:
        optimizer = create_optimizer_v2(model_without_ddp, **optimizer_kwargs(cfg=args))
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise UserError(f'cannot create the optimizer (--opt {args.opt}): {one_line(e)}') from None
    try:
        lr_scheduler, _ = create_scheduler(args, optimizer)
    except (ValueError, KeyError, AssertionError, TypeError) as e:
        raise UserError(f'cannot create the learning-rate schedule (--sched {args.sched}): {one_line(e)}') from None
    criterion, mixup_fn = build_criterion(args, model_without_ddp.num_classes, teacher)
    training = engine.Training(
        model=model, model_without_ddp=model_without_ddp, criterion=criterion, optimizer=optimizer,
        lr_scheduler=lr_scheduler, scaler=torch.amp.GradScaler('cuda', enabled=args.amp), amp=args.amp,
        clip_grad=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
        loader_train=data_loader(dataset_train, args, train=True),
        loader_val=data_loader(dataset_val, args, train=False), device=device)
    return training, checkpoint


def is_training_checkpoint(checkpoint: dict) -> bool:
    """A ``checkpoint.pth``/``best.pth`` of a finetuning run (which ``--resume`` continues)."""
    return all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch'))


def restore_training(training: engine.Training, checkpoint: dict, args) -> Tuple[int, float]:
    """Continue a finetuning checkpoint: optimizer, schedule, loss scaler and EMA restored, ``log.txt``
    repaired; returns (first epoch to run, best Acc@1 so far).  Other files start a new run at epoch
    ``--start_epoch``."""
    if not is_training_checkpoint(checkpoint):
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
        models.load_weights(training.model_ema.module, checkpoint['model_ema'], args.resume, f'{args.model} (EMA)')
    start_epoch = int(checkpoint['epoch']) + 1
    max_accuracy = float(checkpoint.get('max_accuracy', -1.0))
    paths = output_paths(args)
    if is_main_process() and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(args.output_dir):
        reconcile_log(paths['log.txt'], start_epoch - 1, checkpoint.get('log_stats'))
        remove_stale_temporaries(list(paths.values()))  # from a job killed while saving
    rank0_print(f'Resumed from {args.resume}: continuing at epoch {start_epoch} '
                f'(best Acc@1 so far {max_accuracy:.2f}%)')
    planned = checkpoint_args(checkpoint).get('final_finetune', args.final_finetune)
    if planned != args.final_finetune:  # the scheduler state just loaded keeps the old length, as in DeiT
        rank0_print(f'warning: {args.resume} was written by a run of --final_finetune {planned}; its '
                    f'learning-rate schedule over {planned} epochs continues unchanged')
    # Every random stream where the uninterrupted run has it (last, so nothing above draws from them).
    seeding.restore_or_reseed(checkpoint.get('rng'), args.rank, args.world_size, args.seed, start_epoch,
                              random_generators(training), training.device, rank0_print)
    return start_epoch, max_accuracy


def random_generators(training: engine.Training) -> Dict[str, torch.Generator]:
    """The generators of a run besides the global ones (saved and restored with them)."""
    return {'data': training.loader_train.generator}


def training_state(training: engine.Training, args, epoch: int, max_accuracy: float, log_stats: dict,
                   rng: List[dict]) -> dict:
    """What ``checkpoint.pth`` and ``best.pth`` hold (``args`` as a plain dict: plain ``torch.load`` reads it);
    ``rng``: every process's random streams (``seeding.gather``), in rank order."""
    model = training.model_without_ddp
    state = {
        'model': model.state_dict(), 'optimizer': training.optimizer.state_dict(),
        'lr_scheduler': training.lr_scheduler.state_dict(), 'epoch': epoch, 'scaler': training.scaler.state_dict(),
        'channels': models.kept_token_counts(model), 'args': vars(args).copy(), 'max_accuracy': max_accuracy,
        'log_stats': log_stats, 'rng': rng,
    }
    if training.model_ema is not None:
        state['model_ema'] = training.model_ema.module.state_dict()
    return state


def run_finetune(args, device: torch.device) -> Dict[str, float]:
    training, checkpoint = build_training(args, device)
    start_epoch, max_accuracy = restore_training(training, checkpoint, args)
    if start_epoch >= args.final_finetune:
        rank0_print(f'Nothing to do: {args.final_finetune} epochs already finished')
        return {'max_accuracy': max_accuracy}
    paths = output_paths(args)
    tb = TensorBoard(args.output_dir)
    last_good = args.resume or '(none yet)'

    def save(epoch, train_stats, test_stats, improved, best):
        nonlocal last_good
        model = training.model_without_ddp
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': sum(p.numel() for p in model.parameters()),
                     'gflops': gflops(model), 'max_accuracy': best}
        rng = seeding.gather(seeding.capture(random_generators(training), training.device))  # every process
        if not is_main_process():
            return
        state = training_state(training, args, epoch, best, log_stats, rng)
        if improved:
            save_atomic(state, paths['best.pth'])
        save_atomic(state, paths['checkpoint.pth'])
        last_good = paths['checkpoint.pth']
        with open(paths['log.txt'], 'a') as f:
            f.write(json.dumps(log_stats) + '\n')
        tb.scalars(train_stats, epoch, prefix='train/')
        tb.scalars(test_stats, epoch, prefix='test/')

    rank0_print(f'Finetuning for epochs {start_epoch}..{args.final_finetune - 1} '
                f'(lr {args.lr:.2e} for batch {args.batch_size} x {args.world_size} processes)')
    start_time = time.time()
    try:
        max_accuracy = engine.train_epochs(training, start_epoch, args.final_finetune, max_accuracy, save,
                                           args.print_freq, rank0_print)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f'{e}; stopped. Last good checkpoint, untouched: {last_good}') from None
    finally:
        tb.close()
    total = datetime.timedelta(seconds=int(time.time() - start_time))
    rank0_print(f'Training time {total}')
    return {'max_accuracy': max_accuracy}


# ----------------------------------------------------------------------------------------------------------

def run(args) -> Dict[str, float]:
    validate_args(args)
    args.device = resolve_device(args.device)
    if args.output_dir:
        check_output_dir(args.output_dir)
    init_distributed_mode(args)
    device = torch.device(args.device)
    args.amp = args.amp and device.type == 'cuda'  # mixed precision on CUDA only
    seeding.seed_everything(args.seed, args.rank)  # Python's random, numpy, torch: --seed + rank
    cfg = models.pretrained_cfg(args.model)
    args.input_size = args.input_size or cfg.input_size[-1]
    args.mean, args.std = tuple(cfg.mean), tuple(cfg.std)
    if args.speed_only:
        return run_speed(args, device)
    if args.eval:
        return run_eval(args, device)
    if args.prune:
        return run_prune(args, device)
    return run_finetune(args, device)


class Terminated(BaseException):
    """SIGTERM (a cluster scheduler's preemption, `kill`, torchrun stopping its workers).  A BaseException, so it
    unwinds like Ctrl-C: a checkpoint being written is discarded and the last complete one stays."""


@contextlib.contextmanager
def sigterm_unwinds():
    """While inside, SIGTERM raises Terminated in the main thread instead of ending the process on the spot.
    The previous handler comes back afterwards (main() is also called in-process, by tests and scripts)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lost_peer(e: BaseException) -> bool:
    """A collective failed because another process of the job stopped (it prints its own error)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    dist_error = getattr(torch.distributed, 'DistError', None)
    text = str(e)
    return (dist_error is not None and isinstance(e, dist_error)) or any(marker in text for marker in (
        'Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'remote worker crashing'))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    prefix = f'[rank {os.environ["RANK"]}] ' if int(os.environ.get('WORLD_SIZE', '1')) > 1 else ''
    try:
        with sigterm_unwinds():
            run(args)
    except UserError as e:
        print_line(f'{prefix}error: {one_line(e)}', file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteLossError as e:
        print_line(f'{prefix}error: {one_line(e)}', file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print_line(f'{prefix}interrupted; checkpoints written so far are complete', file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print_line(f'{prefix}terminated (SIGTERM); checkpoints written so far are complete', file=sys.stderr)
        return EXIT_TERMINATED
    except RuntimeError as e:
        if not _lost_peer(e):
            raise
        print_line(f'{prefix}error: stopped because another process of this job failed (see its error); '
                   f'checkpoints written so far are complete', file=sys.stderr)
        return EXIT_PEER_FAILED
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
