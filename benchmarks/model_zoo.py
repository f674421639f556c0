#!/usr/bin/env python
"""The Model Zoo table measured side by side: GFLOPs, images/s and speed-up of dense and pruned ViTs.

For each model (DeiT-Ti/S/B by default, or any timm name with a C&C model) and prune rate, the rows run on the
*same weights*, in one process; each row is one formulation of benchmarks/formulations.py:

  * ``DeiT-X (timm)``: timm's own dense model (the baseline of every speed-up);
  * ``C&C-X-rr (ours)``: our model with the masks applied (per block two fixed-shape gathers and a
    concatenation);
  * ``C&C-X-rr (boolean mask)``: a re-implementation of the *original research code's* formulation,
    ``keep, rest = x[:, m], x[:, ~m]; x = cat([block(keep), rest], 1)`` in every block;
  * with torch.compile: ``DeiT-X (timm, compiled)`` and ``C&C-X-rr (ours, compiled)`` (fullgraph=True);
  * the fast inference path (models/fast_path.py), dense and pruned: the Triton backend with and without a CUDA
    graph (the GPU default), and on request the torch and compile backends and an fp16 residual stream.

``--rows`` picks the formulations (defaults per device: see DEFAULT_ROWS).  Every row's logits are checked
against the eager fp32 model with the same weights and masks (max |difference| within the fp16 fast path's
tolerance, top-1 on the images with a clear margin), and a row that fails to build is left out with the reason.

Two timing protocols (``--protocol``).  ``ours`` (default): the rows are timed interleaved with the timer of
--speed-only (engine.time_interleaved: warm-up, synchronised passes, the starting row rotating every round,
under no_grad); every pass time is kept, so ratios are paired per round and come with a confidence interval;
glibc is told to keep freed memory, so no row pays page faults that depend on what ran before it.
``original``: the original code's throughput measurement, each row alone (fp32, autograd on, cudnn.benchmark,
TF32 on CUDA, 3 back-to-back runs of 50 passes, the last run's mean the figure); the other measurements stay
on ours.

GFLOPs are the paper's (docs/method.md: multiply-accumulates) and are cross-checked against
torch.utils.flop_counter.  The script also reports how cost grows (images/s against batch size and against
prune rate), where the time goes (profiled time per family of operations, dense against pruned, set against
the FLOPs ratio), the cost of scoring one batch for pruning against one plain training step on the same batch,
the token routing alone (every timm block replaced by the identity, so only what differs between the pruned
formulations is timed), and a summary: per pruned row, its fastest mode against the fastest dense mode, also at
batch 1 and 32; then it says whether each of the targets is met.  It prints Markdown and writes JSON.

A run is a list of sections (a model's main table, its rows again at a summary batch size, a sweep) in the order
of what they are worth; with --time-limit no new section starts after that many seconds, and the JSON and
Markdown are written after every section, so a run cut short keeps what it measured, and ``--resume`` that
JSON runs only the sections it lacks (the same settings, on the same machine kind; every ratio compares rows of
one section, so rows timed in one process).  Compiled rows are built within --compile-budget seconds of
compilation and at batch sizes of at least --compile-min-batch.

Masks: by default Taylor attention scores of the random-init model on two random-noise batches, planned
with the global budget (``--masks taylor``; per-layer kept counts vary like a real plan's, though the
distribution is not that of a trained model); ``--masks random`` uses the random baseline.  Weights are a
seeded random init: throughput does not depend on their values.

    python benchmarks/model_zoo.py                      # CPU here: Ti/S/B, rates 0.25,0.30,0.40
    python benchmarks/model_zoo.py --device cuda        # on a GPU (fp16 autocast, larger batches; gpu_check.sh)
    python benchmarks/model_zoo.py --quick              # smoke run, under a minute on 2 CPU cores
"""
import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402
import pruning  # noqa: E402
from models.flops import patch_embed_macs  # noqa: E402
from benchmarks import report, shapes  # noqa: E402
from benchmarks.formulations import (  # noqa: E402
    REFERENCES, REGISTRY, CompileBudget, Context, Runs, ScatterRouting, architecture, blocks_as_identity, build_runs,
    configure_dynamo, dense_label, image_shape, plan, pruned_copy, pruned_label, rate_tag, rates_pruning_nothing,
    rebuild_for_batch, resolve_model, rows_to_rebuild, run_blocks_ours, seeded_models, select, short_name, unavailable,
)
from benchmarks.stats import UNSTEADY_SPREAD, Timings, as_fields, paired  # noqa: E402
from engine import original_settings, steady_allocator  # noqa: E402
from utils import UserError, earlier_output, remove_stale_temporaries, write_text_atomic  # noqa: E402
from utils.checkpoint_io import output_file_problem  # noqa: E402
from utils.signals import Terminated, end_script, say_stopped, sigterm_unwinds  # noqa: E402

# The paper's figures on its GPU (GFLOPs, images/s, speed-up; docs/method.md); a row's ``seed_gpu``.
SEED_GPU = {
    ('deit_tiny_patch16_224', 0.0): (1.3, 2234, 1.00), ('deit_tiny_patch16_224', 0.25): (1.0, 2876, 1.29),
    ('deit_tiny_patch16_224', 0.40): (0.7, 3685, 1.65),
    ('deit_small_patch16_224', 0.0): (4.6, 1153, 1.00), ('deit_small_patch16_224', 0.25): (3.4, 1587, 1.38),
    ('deit_small_patch16_224', 0.30): (3.2, 1711, 1.48),
    ('deit_base_patch16_224', 0.0): (17.6, None, None),
}


def paper_figures(timm_name: str, rate: float) -> Optional[Tuple]:
    """The paper's (GFLOPs, images/s, speed-up) for a model at exactly one of its rates (0.0: dense), else None: a
    row at another rate (0.254, named -25 as 0.25 is) is not the paper's model."""
    return next((figures for (arch, paper_rate), figures in SEED_GPU.items()
                 if arch == architecture(timm_name) and math.isclose(rate, paper_rate, abs_tol=1e-12)), None)


DEFAULT_BATCH = {'cpu': {'deit_tiny_patch16_224': 32, 'deit_small_patch16_224': 16, 'deit_base_patch16_224': 8},
                 'cuda': {'deit_tiny_patch16_224': 256, 'deit_small_patch16_224': 256,
                          'deit_base_patch16_224': 128}}
FALLBACK_BATCH = {'cpu': 16, 'cuda': 128}  # other timm models
# The rows timed by default (--rows).  CPU: as the recorded CPU run.  CUDA: the rows the summary's targets compare
# (timm eager and compiled; ours eager; the fast path's Triton backend, dense and pruned, with and without a CUDA
# graph), nothing else: the boolean formulation, our compiled model and the fast path's other variants on request.
DEFAULT_ROWS = {'cpu': ['timm', 'timm-compiled', 'ours', 'boolean', 'ours-compiled'],
                'cuda': ['timm', 'timm-compiled', 'ours', 'fast-triton-dense', 'fast-triton', 'fast-triton-graph-dense',
                         'fast-triton-graph']}
ORIGINAL_BATCH = 256                         # the original code timed torch.rand(256, 3, 224, 224)
DTYPES = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
EXIT_USAGE = 2


# ----------------------------------------------------------------------------------------------------------------
# Arguments: one validation of everything, before any work

MAX_COUNT = 100_000   # passes, rounds, repeats
MAX_BATCH = 65_536
MAX_SEED = 2 ** 32 - 1
MAX_SECONDS = 1_000_000


class UsageError(Exception):
    """A mistake in the arguments: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <message>`` on stderr, exit 2, no usage dump."""

    def error(self, message: str):
        sys.stderr.write(f'error: {message}\n')
        sys.exit(EXIT_USAGE)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer from {lo} to {hi}, got {text!r}') from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f'must be from {lo} to {hi}, got {value}')
        return value
    return parse


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number of seconds from {lo:g} to {hi:g}, '
                                             f'got {text!r}') from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f'must be from {lo:g} to {hi:g} seconds, got {text.strip()}')
        return value
    return parse


def _int_list(lo: int, hi: int) -> Callable[[str], List[int]]:
    one = _int_in(lo, hi)

    def parse(text: str) -> List[int]:
        values = [one(part) for part in text.split(',') if part.strip()]
        return _no_repeats(values)
    return parse


def _rate(zero_allowed: bool = True, noun: str = 'a prune rate') -> Callable[[str], float]:
    """One prune rate, in [0, 1) (``zero_allowed``) or (0, 1); ``noun`` names it in the message."""
    interval = '[0, 1)' if zero_allowed else '(0, 1)'

    def parse(text: str) -> float:
        part = text.strip()
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{part!r} is not a number') from None
        if not (math.isfinite(value) and (0.0 <= value if zero_allowed else 0.0 < value) and value < 1.0):
            raise argparse.ArgumentTypeError(f'{noun} must lie in {interval}, got {part!r}')
        return value
    return parse


def _rate_list(zero_allowed: bool) -> Callable[[str], List[float]]:
    one = _rate(zero_allowed, 'prune rates')

    def parse(text: str) -> List[float]:
        return _no_repeats([one(part) for part in text.split(',') if part.strip()])
    return parse


def _no_repeats(values: list) -> list:
    for v in values:
        if values.count(v) > 1:
            raise argparse.ArgumentTypeError(f'{v} is given twice')
    return values


def _names(text: str) -> List[str]:
    return [n.strip() for n in text.split(',') if n.strip()]


def build_parser() -> Parser:
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    count, batch = _int_in(1, MAX_COUNT), _int_in(1, MAX_BATCH)
    count0 = _int_in(0, MAX_COUNT)
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='default: cuda when a GPU is available, else cpu')
    p.add_argument('--models', type=_names, default=None,
                   help='comma-separated: the shortcuts tiny,small,base and/or timm model names with a C&C model '
                        '(default: CPU tiny,small,base; CUDA tiny,base,small, the order of what they are worth)')
    p.add_argument('--rates', type=_rate_list(zero_allowed=False), default=None,
                   help='comma-separated prune rates in (0, 1) (default 0.25,0.30,0.40)')
    p.add_argument('--batch-size', type=batch, default=None,
                   help=f'batch for every model, 1 to {MAX_BATCH} (default: CPU 32/16/8 for Ti/S/B, CUDA 256/256/128, '
                        f'other models {FALLBACK_BATCH["cpu"]}/{FALLBACK_BATCH["cuda"]}; --protocol original '
                        f'{ORIGINAL_BATCH})')
    p.add_argument('--repeats', type=count, default=None,
                   help='timed passes per row (default: CPU 15, CUDA 30); 6 or more give a 95%% CI of the median')
    p.add_argument('--warmup', type=count0, default=None, help='warm-up passes per row (default: CPU 1, CUDA 10)')
    p.add_argument('--dtype', choices=list(DTYPES), default=None,
                   help='autocast precision of the timed forwards (default: CPU fp32, CUDA fp16); the rows of '
                        '--protocol original are fp32 whatever this says')
    p.add_argument('--masks', choices=['taylor', 'random'], default='taylor',
                   help='taylor: Taylor scores of the random-init model on noise batches (default); random: random '
                        'baseline')
    p.add_argument('--rows', type=_names, default=None,
                   help='comma-separated formulations to time, each a row per model or per prune rate (default: '
                        f'CPU {",".join(DEFAULT_ROWS["cpu"])}; CUDA {",".join(DEFAULT_ROWS["cuda"])}); timm and ours '
                        f'always; all: {", ".join(REGISTRY)}')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='the torch.compile rows (default on; --quick: off)')
    p.add_argument('--compile-models', type=_names, default=None,
                   help='models (of --models) that get torch.compile rows (default: CPU the first of --models, as '
                        'a cold inductor compile takes 15-40 s per pruned model on 2 cores; CUDA all)')
    p.add_argument('--compile-budget', type=_float_in(0, MAX_SECONDS), default=None,
                   help='seconds of torch.compile (first calls of compiled rows) after which no further compiled row '
                        'is built; those left out are listed (default: CPU none, CUDA 240)')
    p.add_argument('--compile-min-batch', type=batch, default=None,
                   help='compiled rows only in sections of at least this batch size (default 1: timm compiled is one '
                        'of the dense modes the summary\'s targets compare with, at every batch size; each batch size '
                        'recompiles)')
    p.add_argument('--fast-autotune', action=argparse.BooleanOptionalAction, default=None,
                   help='fast-path rows time their attention and matrix-product candidates (fused kernels, cuBLAS '
                        'on padded rows) per kept count when built, as build_fast_path does by default (default on); '
                        '--no-fast-autotune: SDPA\'s own dispatch and cuBLAS, nothing timed at build')
    p.add_argument('--time-limit', type=_float_in(1, MAX_SECONDS), default=None,
                   help='seconds after which no new section starts (the first this run measures always runs; the '
                        'results are written after every section; default: none)')
    p.add_argument('--resume', default=None, metavar='JSON',
                   help='the results JSON of an earlier run with the same settings on the same machine kind (GPU, '
                        'torch, timm): its finished sections are kept, the others run (those it left out, or that '
                        'failed); only --time-limit, --json and --markdown may differ (--json may name this file, '
                        'which the whole results then replace)')
    p.add_argument('--protocol', choices=['ours', 'original'], default='ours',
                   help='how the main table is timed: ours (interleaved rounds, no_grad, median; default) or '
                        'original (the original code: each row alone, fp32, autograd on, cudnn.benchmark, TF32 on '
                        'CUDA, 3 runs of --original-passes passes back to back, the last run\'s mean)')
    p.add_argument('--original-passes', type=count, default=None,
                   help='passes per run of --protocol original (3 runs per row; default 50, as the original '
                        'code)')
    p.add_argument('--sweep-batch-sizes', type=_int_list(1, MAX_BATCH), default=None,
                   help='batch-size sweep (default: CPU 1,8,32,64; CUDA "" = skip)')
    p.add_argument('--sweep-rates', type=_rate_list(zero_allowed=True), default=None,
                   help='prune-rate sweep, rates in [0, 1) (default: CPU 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7; CUDA "" = '
                        'skip)')
    p.add_argument('--summary-batch-sizes', type=_int_list(1, MAX_BATCH), default=None,
                   help='batch sizes at which every row of the main table is timed again for the summary '
                        '(speedup_batch1/32), in this order (default: CUDA 32,1, CPU "" = skip)')
    p.add_argument('--scoring-repeats', type=count0, default=None,
                   help='timed scoring/training-step pairs per model (default: CPU 3, CUDA 0; 0 skips)')
    p.add_argument('--scoring-batch-size', type=batch, default=None,
                   help='batch of the scoring-cost comparison (default: the model\'s batch, at most 64)')
    p.add_argument('--routing-repeats', type=count0, default=None,
                   help='rounds of the token-routing-alone timing (default: CPU 60, CUDA 0; 0 skips)')
    p.add_argument('--breakdown-rounds', type=count0, default=None,
                   help='profiled passes per row for the time-by-family breakdown: aten ops on CPU, kernels on '
                        'CUDA (default: CPU 3, CUDA 0; 0 skips)')
    p.add_argument('--threads', type=_int_in(1, 1024), default=None,
                   help='torch.set_num_threads, 1 to 1024 (default: torch\'s own)')
    p.add_argument('--malloc', choices=['steady', 'default'], default='steady',
                   help='steady: glibc keeps freed memory, so no row pays page faults that depend on what ran '
                        'before it (default); default: leave the allocator as it is')
    p.add_argument('--seed', type=_int_in(0, MAX_SEED), default=0, help=f'0 to {MAX_SEED} (default 0)')
    p.add_argument('--json', default=None, help='where to write the results (default benchmarks/results/<device>.json; '
                                                 'with --quick runs/benchmark/<device>-quick.json); an existing file '
                                                 'is replaced only if this script wrote it')
    p.add_argument('--markdown', default=None, help='where to write the tables (default: next to --json, .md); an '
                                                     'existing file is replaced only if it holds tables this script '
                                                     'wrote')
    p.add_argument('--quick', action='store_true',
                   help='smoke run; for each of these not given: DeiT-Ti, rates 0.25,0.40, batch 8, 2 passes, '
                        'no compile, short sweeps, summary batches 1,32, 2 original passes')
    return p


def defaults(device: str, protocol: str = 'ours') -> Tuple[Dict, Dict]:
    """The values of flags left out: the device's defaults, and those of the quick run (--quick)."""
    cpu = device == 'cpu'
    # CUDA: the sections in the order of what they are worth (Ti, then B, then S; the summary batch sizes 32 and
    # 1), the summary's rows only, no sweeps or side measurements unless asked (see benchmarks/README.md).
    normal = {'models': ['tiny', 'small', 'base'] if cpu else ['tiny', 'base', 'small'], 'rates': [0.25, 0.30, 0.40],
              'repeats': 15 if cpu else 30, 'warmup': 1 if cpu else 10, 'dtype': 'fp32' if cpu else 'fp16',
              'compile': True, 'rows': list(DEFAULT_ROWS[device]),
              'sweep_batch_sizes': [1, 8, 32, 64] if cpu else [],
              'sweep_rates': [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7] if cpu else [],
              'summary_batch_sizes': [] if cpu else [32, 1],
              'scoring_repeats': 3 if cpu else 0, 'routing_repeats': 60 if cpu else 0,
              'breakdown_rounds': 3 if cpu else 0, 'compile_budget': None if cpu else 240.0,
              'compile_min_batch': 1, 'fast_autotune': True, 'time_limit': None}
    quick = {'models': ['tiny'], 'rates': [0.25, 0.40], 'batch_size': 8, 'repeats': 2, 'warmup': 1,
             'compile': False, 'sweep_batch_sizes': [1, 8], 'sweep_rates': [0.25, 0.5],
             'summary_batch_sizes': [1, 32], 'scoring_repeats': 1, 'routing_repeats': 5,
             'breakdown_rounds': 1 if cpu else 0}
    if protocol == 'original':
        normal['original_passes'], quick['original_passes'] = 50, 2
    return normal, quick


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def _fill_defaults(args) -> None:
    """Flags left out take their defaults; --quick sets only what was not given (recorded in args.quick_set)."""
    normal, quick = defaults(args.device, args.protocol)
    args.quick_set = {}
    for dest in sorted(normal.keys() | quick.keys()):
        if getattr(args, dest) is not None:
            continue
        if args.quick and dest in quick:
            setattr(args, dest, quick[dest])
            args.quick_set[dest] = quick[dest]
        elif dest in normal:
            setattr(args, dest, normal[dest])


def _check(args, set_flags=frozenset()) -> None:
    """Everything that depends on more than one flag, or on the machine; raises UsageError.  ``set_flags``: the
    destinations set on the command line."""
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('argument --device: no CUDA device is available')
    if not args.models:
        raise UsageError('argument --models: no model given')
    given = {}  # timm name -> the name given in --models
    for name in args.models:
        try:
            timm_name = resolve_model(name)
        except ValueError as e:
            raise UsageError(f'argument --models: {e}') from None
        arch = timm_name.partition('.')[0]  # a pretrained tag names weights, not another network
        same = next((t for t in given if t.partition('.')[0] == arch), None)
        if same is not None:
            raise UsageError(f'argument --models: {given[same]!r} and {name!r} are the same model ({arch})')
        given[timm_name] = name
    args.timm_models = {name: timm_name for timm_name, name in given.items()}
    if args.compile_models is None:
        args.compile_models = args.models[:1] if args.device == 'cpu' else list(args.models)
    compile_models = []
    for name in args.compile_models:
        try:
            timm_name = resolve_model(name)
        except ValueError as e:
            raise UsageError(f'argument --compile-models: {e}') from None
        # the model of --models with that architecture (a pretrained tag names weights, as in --models)
        same = next((given[t] for t in given if t.partition('.')[0] == timm_name.partition('.')[0]), None)
        if same is None:
            raise UsageError(f'argument --compile-models: {name!r} is not one of --models')
        if same in compile_models:
            raise UsageError(f'argument --compile-models: {same!r} is given twice')
        compile_models.append(same)
    args.compile_models = compile_models
    _check_rows(args)
    if not args.rates:
        raise UsageError('argument --rates: no prune rate given')
    tags = {}
    for rate in args.rates:
        if rate_tag(rate) in tags:
            raise UsageError(f'argument --rates: {tags[rate_tag(rate)]} and {rate} both round to '
                             f'{rate_tag(rate)}%, the name of their rows')
        tags[rate_tag(rate)] = rate
    for name, timm_name in args.timm_models.items():
        # the rate sweep runs on the first model only
        sweep = [('--sweep-rates', r) for r in args.sweep_rates if r] if name == args.models[0] else []
        flags = [('--rates', r) for r in args.rates] + sweep
        nothing = rates_pruning_nothing(timm_name, [rate for _, rate in flags], name)
        for flag, rate in flags:
            if rate in nothing:
                raise UsageError(f'argument {flag}: {nothing[rate]}')
    for rate in args.rates:  # (one that clips nothing is said so above)
        if not 0 < int(rate_tag(rate)) < 100:  # 'C&C-Ti-00' would read as dense (and take its paper figures)
            raise UsageError(f'argument --rates: {rate} rounds to {rate_tag(rate)}%, the name of its rows, as if '
                             f'{"nothing" if rate < 0.5 else "everything"} were pruned: give rates that round to '
                             f'1% to 99%')
    if args.protocol != 'original' and args.original_passes is not None:
        raise UsageError('argument --original-passes: only with --protocol original')
    _check_no_effect(args, set_flags)


def _check_no_effect(args, set_flags) -> None:
    """A flag given for something this run does not do is refused, as --original-passes without --protocol
    original is: accepted, it would be silently ignored."""
    if not any(REGISTRY[n].compiled for n in args.rows):
        why = ('no row of --rows is compiled' if args.compile else
               'torch.compile is off (--no-compile), so no compiled row runs' if 'compile' in set_flags else
               'torch.compile is off (--quick without --compile), so no compiled row runs')
        for dest in ('compile_models', 'compile_budget', 'compile_min_batch'):
            if dest in set_flags:
                raise UsageError(f'argument {_flag(dest)}: has no effect here: {why}')
    compiled = [n for n in args.rows if REGISTRY[n].compiled]
    if compiled and not args.compile_models:  # (given empty: the default names a model)
        raise UsageError(f'argument --compile-models: no model named, so the compiled rows of --rows '
                         f'({", ".join(compiled)}) would run for none; name a model, or give --no-compile')
    if compiled and args.compile_budget == 0:  # (spent before the first compile: CompileBudget refuses every row)
        raise UsageError(f'argument --compile-budget: 0 s of compilation builds no compiled row, so those of --rows '
                         f'({", ".join(compiled)}) would run for no model; give more seconds, or --no-compile')
    if compiled and 'compile_min_batch' in set_flags:
        # compiled rows are built in a model's main table; a summary batch size only times again what was built there
        mains = {name: main_batch(args, name, torch.device(args.device)) for name in args.compile_models}
        if max(mains.values()) < args.compile_min_batch:
            raise UsageError(f'argument --compile-min-batch: {args.compile_min_batch} is above the main-table batch '
                             f'of every model with compiled rows ('
                             + ', '.join(f'{name} {batch}' for name, batch in mains.items())
                             + '), where they are built (a summary batch size times again only the rows built there):'
                             f' no compiled row would run; give at most {max(mains.values())}, or --no-compile')
    ours_tables = args.summary_batch_sizes or args.sweep_batch_sizes or args.sweep_rates
    if args.protocol == 'original' and not ours_tables:
        why = ('--protocol original times the main table its own way (fp32, --original-passes), and no table of '
               'protocol ours runs (--summary-batch-sizes, --sweep-batch-sizes and --sweep-rates are empty)')
        for dest in ('repeats', 'warmup') + (() if args.breakdown_rounds else ('dtype',)):
            if dest in set_flags:
                raise UsageError(f'argument {_flag(dest)}: has no effect here: {why}'
                                 + ('' if dest != 'dtype' else ' and --breakdown-rounds is 0'))
    if 'scoring_batch_size' in set_flags and not args.scoring_repeats:
        why = '' if 'scoring_repeats' in set_flags else f' (its default on {args.device})'
        raise UsageError(f'argument --scoring-batch-size: has no effect here: --scoring-repeats is 0{why}, so the '
                         f'scoring cost is not measured')
    if 'fast_autotune' in set_flags and not any(n.startswith('fast-') for n in args.rows):  # the fast path's rows
        flag = '--fast-autotune' if args.fast_autotune else '--no-fast-autotune'
        raise UsageError(f'argument {flag}: has no effect here: no row of --rows is a fast-path row (fast-*)')


def _check_rows(args) -> None:
    """--rows: known formulations, each once, meant for the device, the references included; compiled ones only
    with --compile (left out of the default rows without it)."""
    for name in args.rows:
        if name not in REGISTRY:
            raise UsageError(f'argument --rows: unknown row {name!r}; choose from {", ".join(REGISTRY)}')
        if args.rows.count(name) > 1:
            raise UsageError(f'argument --rows: {name} is given twice')
        devices = REGISTRY[name].devices
        if args.device not in devices:
            raise UsageError(f'argument --rows: {name} runs on {" and ".join(devices)} only, not on {args.device}')
        # a row asked for that cannot run here (no Triton, Triton on CPU without its interpreter) is refused now,
        # not skipped with a note once the other rows have run; the default rows skip it with that note
        reason = unavailable(REGISTRY[name], torch.device(args.device)) if args.rows_given else None
        if reason:
            raise UsageError(f'argument --rows: {name} cannot run here: {reason}')
    for name in REFERENCES:
        if name not in args.rows:
            raise UsageError(f'argument --rows: {" and ".join(REFERENCES)} are always timed (the baseline of every '
                             f'speed-up, and the model every pruned row computes): add {name}')
    compiled = [n for n in args.rows if REGISTRY[n].compiled]
    if compiled and not args.compile:
        if args.rows_given:
            raise UsageError(f'argument --rows: {", ".join(compiled)} use torch.compile, which is off (--no-compile or '
                             '--quick): add --compile')
        args.rows = [n for n in args.rows if n not in compiled]


def _writable(path: str, flag: str) -> str:
    """``path`` made absolute, once it is known that the results can be written there at the end of the first
    section (utils.output_file_problem; nothing is created: the atomic writer makes the folders with the file)."""
    why = output_file_problem(path)
    if why:
        raise UsageError(f'argument {flag}: {path} {why}')
    return os.path.abspath(path)


def _results_of(path: str) -> Optional[Dict]:
    """The results in ``path`` if it is a results JSON this script wrote (with its sections and machine), else
    None."""
    try:
        return report.load_results(path, 'results', required=('sections', 'models', 'machine'))
    except ValueError:
        return None


def _is_tables(path: str) -> bool:
    """Whether ``path`` holds the tables this script writes (--markdown)."""
    try:
        with open(path) as f:
            return f.readline().startswith('Measured on ')
    except (OSError, UnicodeDecodeError):
        return False


# What each output flag writes, for utils.earlier_output: an earlier output of its kind may be replaced.
OUTPUT_KINDS = {'--json': ('a results JSON', lambda path: _results_of(path) is not None),
                '--markdown': ('the tables', _is_tables)}


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name one file (through links too), whether it exists yet or not."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


# What a resumed run (--resume) may change: where it writes, when it stops starting sections, what it resumes.
FREE_SETTINGS = ('json', 'markdown', 'resume', 'time_limit')
# What must be the same machine kind for a resumed run (on a CPU also the processor and its cores).
SAME_MACHINE = ('device', 'gpu', 'torch', 'timm', 'python', 'torch_threads', 'cuda', 'triton')
# The code a measurement runs, recorded by file hash, so that a resumed run can say what changed in between.
CODE = ('engine.py', 'benchmarks', 'models', 'pruning')


def settings_of(args) -> Dict:
    """The run's settings as its JSON records them: every flag after its default, not where it writes."""
    return {k: v for k, v in vars(args).items() if k not in ('json', 'markdown', 'earlier', 'written')}


def _resumable(args) -> Dict:
    """The results of the run that --resume names, if this run may carry it on: a results JSON of this script,
    with the same settings (but FREE_SETTINGS) on the same machine kind (SAME_MACHINE; on a CPU also the same
    processor and core count); raises UsageError saying what differs."""
    path = args.resume
    if not path:
        raise UsageError('argument --resume: an empty path')
    if os.path.isdir(path):
        raise UsageError(f'argument --resume: {path} is a folder: name the results JSON in it')
    if os.path.exists(path) and not os.path.isfile(path):
        raise UsageError(f'argument --resume: {path} is not a regular file (a device, a pipe?): name the results '
                         f'JSON')
    if not os.path.isfile(path):
        raise UsageError(f'argument --resume: {path}: no such file')
    earlier = _results_of(path)
    if earlier is None:
        raise UsageError(f'argument --resume: {path} is not a results JSON of this benchmark{_shape_note(path)}')
    if 'settings' not in earlier or not isinstance(earlier['settings'], dict):
        raise UsageError(f'argument --resume: {path} records no settings')
    now = json.loads(json.dumps(settings_of(args)))
    then = earlier['settings']
    flags = sorted({a.dest for a in build_parser()._actions} - {'help'} - set(FREE_SETTINGS))
    differ = [k for k in flags if now.get(k) != then.get(k)]  # the flags after their defaults, nothing derived
    if differ:
        raise UsageError(f'argument --resume: {path} was run with other settings: ' + '; '.join(
            f'{_flag(k)} {then.get(k)!r} there, {now.get(k)!r} here' for k in differ)
            + ' (only --time-limit, --json and --markdown may differ)')
    machine = machine_info(torch.device(args.device))
    if args.threads:  # main() sets it after this check; the run resumed recorded it set
        machine['torch_threads'] = args.threads
    same = SAME_MACHINE + (('cpu', 'cpu_cores') if args.device == 'cpu' else ())
    other = [k for k in same if machine.get(k) != earlier['machine'].get(k)]
    if other:
        raise UsageError(f'argument --resume: {path} was measured on another machine kind: ' + '; '.join(
            f'{k} {earlier["machine"].get(k)!r} there, {machine.get(k)!r} here' for k in other))
    sections = earlier['sections']
    if sections and all(s.get('status') == 'done' for s in sections):
        raise UsageError(f'argument --resume: every section of {path} is done: nothing to carry on (without '
                         f'--resume the benchmark runs again)')
    problem = _resume_problem(earlier, plan_sections(args, torch.device(args.device)), args)
    if problem:
        raise UsageError(f'argument --resume: {path} is not a results JSON of this benchmark ({problem})')
    return earlier


def _shape_note(path: str) -> str:
    """' (what)' when ``path`` is a JSON object of which a part read back has another shape than this script
    writes (shapes.REPORT), else ''."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError):  # (lists nested thousands deep: json.load recursed too far)
        return ''
    problem = shapes.problem(data, shapes.REPORT, '') if isinstance(data, dict) else None
    return f' ({problem})' if problem else ''


def _resume_problem(earlier: Dict, planned: List['Section'], args) -> Optional[str]:
    """What a resumed run would read from ``earlier`` (report.load_results has checked its models, machine and
    sections are what this script writes) and not find, or None: the results of each finished section it keeps
    (adopt), and the code hashes and earlier runs it carries over."""
    why = shapes.problem(earlier, shapes.RUN, '')
    if why:
        return why
    kept = [section for section, old in zip(planned, earlier['sections'])
            if old['status'] == 'done' and old['section'] == section.title(args)]  # the others run again
    for section in kept:
        why = None
        if section.kind == 'summary':  # its figures are in the results of its main table, which must be kept too
            main = next(s for s in planned if s.kind == 'main' and s.model == section.model)
            if main not in kept:
                return f'its section {section.title(args)!r} is done but not its main table\'s, which runs again'
            sweep = earlier['models'][section.model].get('summary_sweep')
            if not (isinstance(sweep, dict) and isinstance(sweep.get('batches'), list) and any(
                    isinstance(b, dict) and b.get('batch_size') == section.batch for b in sweep['batches'])):
                return (f'its section {section.title(args)!r} is done but models.{section.model}.summary_sweep has '
                        f'no batch {section.batch}')
        elif section.kind == 'main':
            if section.model not in earlier['models']:
                return f'its section {section.title(args)!r} is done but "models" has no {section.model!r}'
            why = _kept_model_problem(earlier['models'][section.model], f'models.{section.model}', section, args)
        elif section.kind in SWEEP_KEYS:
            key = SWEEP_KEYS[section.kind]
            if not (isinstance(earlier.get('sweeps'), dict) and isinstance(earlier['sweeps'].get(key), dict)):
                return f'its section {section.title(args)!r} is done but "sweeps" has no {key!r}'
            why = shapes.problem(earlier['sweeps'][key], shapes.SWEEPS[key], f'sweeps.{key}')
        if why:
            return why
    return None


def _kept_model_problem(result: Dict, where: str, section: 'Section', args) -> Optional[str]:
    """What in the results of a main table a resumed run keeps (``result``, at ``where`` in the file) has another
    shape than bench_model writes, or does not fit the run carried on (its batch size, its rows' formulations and
    prune rates, the summary sweep its later sections add to), or None."""
    why = shapes.problem(result, shapes.MODEL, where)
    if why:
        return why
    if result['batch_size'] != section.batch:
        return f'{where}.batch_size is {result["batch_size"]}, but its section is {section.title(args)!r}'
    for i, row in enumerate(result['rows']):
        if row['kind'] not in REGISTRY:
            return f'{where}.rows[{i}].kind is {row["kind"]!r}, no row of this benchmark'
        if REGISTRY[row['kind']].pruned and row['prune_rate'] not in args.rates:
            return f'{where}.rows[{i}].prune_rate is {row["prune_rate"]}, not one of --rates'
    if not any(row['kind'] == 'timm' for row in result['rows']):  # (the report's summary was a KeyError on it)
        return f'{where}.rows has no timm row, which every speed-up is over'
    keys = [row['key'] for row in result['rows']]
    twice = [k for k in dict.fromkeys(keys) if keys.count(k) > 1]
    if twice:  # its pass times taken for both from the last, and the row printed twice
        return f'{where}.rows has more than one row of key {", ".join(map(repr, twice))}'
    timed_together = [(f'{where}.rows', [row['seconds'] for row in result['rows']])]
    timed_together += [(f'{where}.summary_sweep.batches[{i}].seconds', list(batch['seconds'].values()))
                       for i, batch in enumerate(result.get('summary_sweep', {}).get('batches', []))]
    for name, seconds in timed_together:  # one pass each round: the report pairs them round by round
        rounds = sorted({len(s) for s in seconds if s})
        if len(rounds) > 1:
            return (f'{name} have {" or ".join(map(str, rounds))} pass times each, not one per round of the rounds '
                    f'they were timed in together')
    if args.summary_batch_sizes and 'summary_sweep' not in result:
        return f'{where} has no "summary_sweep", which its summary sections add to'
    return None


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.rows_given = args.rows is not None
    # the flags set on the command line (those whose default is None), before the defaults fill them in
    set_flags = frozenset(dest for dest, value in vars(args).items() if value is not None)
    try:
        _fill_defaults(args)
        _check(args, set_flags)
        for flag in ('json', 'markdown'):
            if getattr(args, flag) == '':
                raise UsageError(f'argument --{flag}: an empty path')
        # a smoke run never replaces the committed measurements
        default = (os.path.join(ROOT, 'runs', 'benchmark', f'{args.device}-quick.json') if args.quick
                   else os.path.join(ROOT, 'benchmarks', 'results', f'{args.device}.json'))
        args.json = _writable(args.json or default, '--json')
        markdown_given = args.markdown is not None
        args.markdown = _writable(args.markdown or os.path.splitext(args.json)[0] + '.md', '--markdown')
        if _same_file(args.markdown, args.json):
            raise UsageError('argument --markdown: the same file as --json' if markdown_given else
                             f'argument --json: {args.json} ends in .md, where the tables go (--markdown defaults '
                             f'to --json with .md): name the results .json, or give --markdown')
        # --json may name the file --resume reads: it is replaced (atomically) by the whole results, the sections
        # kept from it included; the tables written over it would lose the run carried on
        if args.resume is not None and _same_file(args.markdown, args.resume):
            raise UsageError(f'argument --markdown: {args.markdown} is the results JSON --resume reads; refusing to '
                             f'overwrite it with tables')
        for flag, path in (('--json', args.json), ('--markdown', args.markdown)):
            why = earlier_output(path, flag, OUTPUT_KINDS, 'this benchmark')
            if why:
                raise UsageError(f'argument {flag}: {why}')
        args.earlier = _resumable(args) if args.resume is not None else None
    except UsageError as e:
        parser.error(str(e))
    return args


def quick_line(args) -> str:
    def show(v):
        if isinstance(v, list):
            return ','.join(map(str, v)) if v else '"" (skip)'
        return str(v)
    return '--quick set: ' + ', '.join(
        (f'{_flag(k)} {show(v)}' if not isinstance(v, bool) else (_flag(k) if v else f'--no-{k}'))
        for k, v in sorted(args.quick_set.items())) + ' (every other value as given or its default)'


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers

def machine_info(device: torch.device) -> Dict:
    info = dict(engine.machine_facts(), device=str(device),
                load_average_at_start=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None)
    if device.type == 'cuda':
        from models import fast_kernels
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    triton=fast_kernels.triton.__version__ if fast_kernels.HAS_TRITON else None)
    return info


def code_hashes() -> Dict[str, str]:
    """The SHA-256 (first 16 hex digits) of every Python file of CODE, by path from the repository root."""
    out = {}
    for entry in CODE:
        path = os.path.join(ROOT, entry)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f.endswith('.py'))
        for f in files:
            with open(f, 'rb') as fh:
                out[os.path.relpath(f, ROOT)] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return dict(sorted(out.items()))


def default_batch(timm_name: str, device: torch.device, protocol: str) -> int:
    if protocol == 'original':
        return ORIGINAL_BATCH
    return DEFAULT_BATCH[device.type].get(architecture(timm_name), FALLBACK_BATCH[device.type])


def main_batch(args, name: str, device: torch.device) -> int:
    """The batch of model ``name``'s main table (where its rows, the compiled ones among them, are built):
    --batch-size, else the default for its architecture on this device under this protocol."""
    return args.batch_size or default_batch(args.timm_models[name], device, args.protocol)


def counter_gmacs(model: nn.Module, device: torch.device) -> float:
    """MACs of one image according to torch.utils.flop_counter (FLOPs / 2), in G.  Attention runs on SDPA's math
    backend here, as plain matrix products, which every torch's counter counts (torch 2.11's has no formula for
    the CPU flash kernel, and counted no attention at all on a CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = torch.randn(1, *image_shape(model), device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def noise_batches(n: int, batch: int, num_classes: int, device: torch.device, seed: int, shape=(3, 224, 224)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g).to(device),
             torch.randint(0, num_classes, (batch,), generator=g).to(device)) for _ in range(n)]


def _scores(cc, args, device) -> Optional[torch.Tensor]:
    """Taylor scores of the random-init model on 2 noise batches of 8 images (``--masks taylor``), whatever the
    batch a section times, so every section plans the same masks for a rate; None plans random masks.
    Computed on the CPU (an fp32 copy of a model on a GPU): a GPU's reductions need not repeat bit for bit from
    one process to the next, and a run that carries on another (``--resume``) must plan the masks it measured."""
    if args.masks != 'taylor':
        return None
    cpu = torch.device('cpu')
    scorer = cc if device.type == 'cpu' else copy.deepcopy(cc).to(cpu, torch.float32)
    return pruning.attention_taylor_scores(
        scorer, noise_batches(2, 8, cc.num_classes, cpu, args.seed, image_shape(cc)),
        LabelSmoothingCrossEntropy(0.1), device=cpu)


def pruned_models(cc: nn.Module, scores: Optional[torch.Tensor], rates: List[float],
                  seed: int) -> Dict[float, nn.Module]:
    depth, num_patches = len(cc.blocks), cc.num_tokens - cc.num_prefix_tokens
    return {rate: pruned_copy(cc, plan(scores, depth, num_patches, rate, seed)) for rate in rates}


# ----------------------------------------------------------------------------------------------------------------
# Timing: our protocol and the original code's

def time_interleaved(runs: Dict[str, Callable], batch: int, device: torch.device, repeats: int, warmup: int,
                     dtype, x: Optional[torch.Tensor] = None, shape=(3, 224, 224)) -> Timings:
    """Our protocol: engine.time_interleaved (the timer of --speed-only: rows take turns, the starting row
    rotates, every pass synchronised) under no_grad, on ``x`` or a random image batch, keeping every pass
    time."""
    if x is None:
        x = torch.randn(batch, *shape, device=device)
    with torch.no_grad():
        return Timings(engine.time_interleaved(runs, x, device, repeats, warmup, dtype), batch)


def time_original(runs: Dict[str, Callable], batch: int, device: torch.device, passes: int,
                  shape=(3, 224, 224)) -> Timings:
    """The original code's protocol, row by row: ``torch.rand(batch, *shape)`` through the row in fp32 with
    autograd on (each pass builds a graph), under :func:`original_settings`; its three runs of ``passes``
    passes back to back (engine.original_runs_seconds), each from one synchronisation to the next; the row's
    figure is the last run's mean pass time.  No other warm-up and no interleaving: only the row being timed
    runs."""
    seconds = {}
    with original_settings(device):
        for name, run in runs.items():
            x = torch.rand(batch, *shape, device=device)
            seconds[name] = [engine.original_runs_seconds(run, x, passes)[-1]]
    return Timings(seconds, batch, paired=False)


def time_rows(runs: Dict[str, Callable], batch: int, device: torch.device, args, dtype, shape) -> Timings:
    if args.protocol == 'original':
        return time_original(runs, batch, device, args.original_passes, shape)
    return time_interleaved(runs, batch, device, args.repeats, args.warmup, dtype, shape=shape)


def sweep_batches(built: Runs, cc_of: Callable, dense: nn.Module, batch_sizes: List[int], args,
                  device: torch.device, dtype, shape) -> List[Timings]:
    """Every row of ``built`` timed again, interleaved (our protocol), at each batch size."""
    out = []
    for bs in batch_sizes:
        runs = rebuild_for_batch(built, cc_of, dense, Context(device, dtype, bs, shape)).runs
        out.append(time_interleaved(runs, bs, device, args.repeats, args.warmup, dtype, shape=shape))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Where the time goes: dense against pruned, per family of operations (torch.profiler)

# CPU: the self time of aten ops; first match wins (substrings of aten op names); everything else is OTHER_OPS.
OP_FAMILIES = (
    ('patch embedding', ('convolution',)),
    ('attention', ('scaled_dot_product', 'softmax', 'bmm')),
    ('linear layers', ('addmm', 'aten::mm', 'aten::matmul', 'aten::linear')),
    ('token routing', ('index_select', 'aten::cat', 'aten::index')),
)
OTHER_OPS = 'LayerNorm, GELU, adds, copies'
FAMILIES = ('patch embedding', 'linear layers', 'attention', OTHER_OPS, 'token routing')  # report order

# CUDA: the time of each kernel (and memcpy/memset) on the GPU, by its name: lower-case substrings, first match
# wins, as cuDNN, cuBLAS, flash attention, torch, inductor and models/fast_kernels.py name their kernels.  A fused
# kernel counts in the family of its larger part: _linear_kernel (the products with GELU or with the residual
# update as epilogue), _mlp_kernel (both MLP products, GELU and the residual update) and _norm_linear_kernel (the
# first norm and qkv) in linear layers, _gather_layer_norm_kernel (the routing fused in) in LayerNorm, and so
# _residual_kernel, the residual update of the buffer: after attention it normalises too (LN2), after the MLP's
# cuBLAS product it is the update alone; one kernel name for both, counted in LayerNorm.
ADDS = 'adds, casts, copies'
OTHER_KERNELS = 'other kernels'
KERNEL_FAMILIES = (
    ('attention', ('flash', 'fmha', 'attention', 'sdpa', 'softmax')),  # before 'fprop': cuDNN's SDPA has it
    ('patch embedding', ('fprop', 'convolve', 'conv2d', 'nchwtonhwc', 'nhwctonchw', 'implicit_gemm')),
    ('linear layers', ('gemm', 'gemv', 'nvjet', 'cutlass', 'xmma', 'cublas', 'splitk', 'triton_tem', '_linear_',
                       '_mlp_kernel', '_norm_linear_kernel')),
    ('LayerNorm', ('layer_norm', 'layernorm', '_residual_kernel')),
    ('GELU', ('gelu',)),
    ('token routing', ('index', 'gather', 'catarray')),
    (ADDS, ('elementwise', 'memcpy', 'memset', 'copy', 'add', 'mul', 'fill', 'scatter', 'triton_poi')),
)
CUDA_FAMILIES = ('patch embedding', 'linear layers', 'attention', 'LayerNorm', 'GELU', ADDS, 'token routing',
                 OTHER_KERNELS)


def families_of(device_type: str) -> Tuple[str, ...]:
    return CUDA_FAMILIES if device_type == 'cuda' else FAMILIES


def op_family(op_name: str) -> str:
    for family, parts in OP_FAMILIES:
        if any(part in op_name for part in parts):
            return family
    return OTHER_OPS


def kernel_family(kernel_name: str) -> str:
    name = kernel_name.lower()
    for family, parts in KERNEL_FAMILIES:
        if any(part in name for part in parts):
            return family
    return OTHER_KERNELS


def family_macs(model: nn.Module) -> Dict[str, int]:
    """The docs/method.md count split by family of operations (sums to models.count_macs; the formula prices
    no LayerNorm, GELU, softmax, residual add or routing, so those families have none)."""
    kept, attn = models.kept_token_counts(model), model.blocks[0].attn
    patch = patch_embed_macs(model.patch_embed)
    attention = sum(2 * n * n * models.attention_width(attn) for n in kept)  # the attention width, not C
    # the rest: the blocks' four products and every head (a distilled model's two)
    return {'patch embedding': patch, 'attention': attention,
            'linear layers': models.count_macs(model) - patch - attention}


def event_family_ms(events, device_type: str) -> Tuple[Dict[str, float], Dict[str, float]]:
    """({family: ms}, {kernel name: ms}) of one profiled pass.  CPU: the self CPU time of each aten op, by
    :func:`op_family` (no per-kernel dict).  CUDA: the GPU time of each device event (kernel, memcpy, memset),
    by :func:`kernel_family` of its name."""
    from torch.autograd import DeviceType
    families: Dict[str, float] = {}
    kernels: Dict[str, float] = {}
    for e in events:
        if device_type == 'cuda':
            if e.device_type == DeviceType.CPU:
                continue
            ms = e.time_range.elapsed_us() / 1e3
            kernels[e.name] = kernels.get(e.name, 0.0) + ms
            family = kernel_family(e.name)
        else:
            if e.device_type != DeviceType.CPU:
                continue
            ms, family = e.self_cpu_time_total / 1e3, op_family(e.name)
        families[family] = families.get(family, 0.0) + ms
    return families, kernels


def profile_families(rows: Dict[str, Callable], x: torch.Tensor, rounds: int, dtype: Optional[torch.dtype] = None,
                     top_kernels: int = 15) -> Tuple[Dict[str, Dict[str, float]], Dict[str, List]]:
    """Milliseconds per forward pass spent in each family of operations, for every row, averaged over ``rounds``
    passes that take turns as the timed rows do (engine.time_interleaved runs them): on CPU the self time of each
    aten op, on CUDA the GPU time of each kernel (:func:`event_family_ms`).  A fast-path row (a FastViT) has
    its patch embedding (``FastViT.embed``: the unfold, one matrix product and the constant add, or the fused
    kernel; kernels that look like any others) profiled on its own in each round and moved from their families
    to 'patch embedding'.  Returns ({row: {family: ms}}, {row: [[kernel, ms per pass], ...] the ``top_kernels`` slowest,
    CUDA only}).  Run after the timing: the profiler slows every op a little."""
    from torch.profiler import ProfilerActivity, profile

    from models.fast_path import FastViT
    device_type = x.device.type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == 'cuda' else [])
    out = {name: dict.fromkeys(families_of(device_type), 0.0) for name in rows}
    kernels: Dict[str, Dict[str, float]] = {name: {} for name in rows}

    def profiled_pass(fn: Callable, t: torch.Tensor) -> Tuple[Dict[str, float], Dict[str, float]]:
        with profile(activities=activities) as prof:
            fn(t)
            engine.synchronize(t.device)
        return event_family_ms(prof.events(), device_type)

    def profiled(name: str) -> Callable:
        def run(t: torch.Tensor) -> None:
            fams, kern = profiled_pass(rows[name], t)
            if isinstance(rows[name], FastViT):
                moved, _ = profiled_pass(rows[name].embed, t)
                for family, ms in moved.items():
                    take = min(ms, fams.get(family, 0.0))
                    fams[family] = fams.get(family, 0.0) - take
                    fams['patch embedding'] = fams.get('patch embedding', 0.0) + take
            for family, ms in fams.items():  # every family is one of out[name]'s
                out[name][family] += ms / rounds
            for k, ms in kern.items():
                kernels[name][k] = kernels[name].get(k, 0.0) + ms / rounds
        return run

    with torch.no_grad():
        # one unprofiled pass of each row first: first-call costs (cuDNN's autotuning on CUDA, for a precision
        # the timing did not use) stay out of the profile
        engine.time_interleaved(rows, x, x.device, 0, 1, dtype)
        engine.time_interleaved({name: profiled(name) for name in rows}, x, x.device, rounds, 0, dtype)
    top = {name: [[k, ms] for k, ms in sorted(kern.items(), key=lambda kv: -kv[1])[:top_kernels]]
           for name, kern in kernels.items() if kern}
    return out, top


# The fast-path rows the breakdown profiles, fastest first (CUDA graphs hide the kernels from the profiler).
BREAKDOWN_FAST_ROWS = ('fast-triton', 'fast-compile', 'fast-torch')


def breakdowns(cc: nn.Module, dense: nn.Module, pruned: Dict[float, nn.Module], built: Runs, batch: int, shape,
               device: torch.device, rounds: int, dtype) -> Dict:
    """Where the time goes, per prune rate: ``breakdown`` (ours eager against dense timm) and, when a fast-path
    row was built, ``breakdown_fast`` (its pruned row against its dense row, ``breakdown_fast_rows`` names
    them); on CUDA ``kernels``, the slowest kernels of every profiled row."""
    rows = {'timm': dense, **{f'ours_{rate_tag(r)}': m for r, m in pruned.items()}}
    first_rate = next(iter(pruned))
    fast = next((REGISTRY[n] for n in BREAKDOWN_FAST_ROWS
                 if REGISTRY[n].key(first_rate) in built.runs and REGISTRY[f'{n}-dense'].key() in built.runs), None)
    if fast is not None:
        dense_fast = REGISTRY[f'{fast.name}-dense']
        rows[dense_fast.key()] = built.runs[dense_fast.key()]
        rows.update({fast.key(r): built.runs[fast.key(r)] for r in pruned if fast.key(r) in built.runs})
    ms, top = profile_families(rows, torch.randn(batch, *shape, device=device), rounds, dtype)
    dense_macs = family_macs(cc)
    out = {'breakdown': {rate_tag(r): gap_breakdown(ms['timm'], ms[f'ours_{rate_tag(r)}'], dense_macs,
                                                    family_macs(m)) for r, m in pruned.items()}}
    if fast is not None:
        out['breakdown_fast_rows'] = [dense_fast.name, fast.name]
        out['breakdown_fast'] = {rate_tag(r): gap_breakdown(ms[dense_fast.key()], ms[fast.key(r)], dense_macs,
                                                            family_macs(m))
                                 for r, m in pruned.items() if fast.key(r) in ms}
    if top:
        out['kernels'] = top
    return out


def gap_breakdown(dense_ms: Dict[str, float], ours_ms: Dict[str, float], dense_macs: Dict[str, int],
                  ours_macs: Dict[str, int]) -> Dict:
    """How far each family is from the model's FLOPs ratio R.  If the pruned pass took exactly 1/R of the dense
    one, the speed-up would equal R; ``excess_ms`` of a family is its pruned time minus its dense time / R, so the
    excesses add up to the whole gap (positive: slower than its share, negative: faster).  A family's own FLOPs
    ratio says what the formula expects of it (linear layers scale with the kept tokens, attention with their
    square); LayerNorm, GELU, adds and the routing are not in the formula."""
    ratio = sum(dense_macs.values()) / sum(ours_macs.values())
    total_dense, total_ours = sum(dense_ms.values()), sum(ours_ms.values())
    families = {}
    for f in dict.fromkeys([*dense_ms, *ours_ms]):  # the families profiled (families_of the device), in order
        d, o = dense_ms.get(f, 0.0), ours_ms.get(f, 0.0)
        comparable = f != 'token routing'  # dense timm has no routing (one concatenation of the class token)
        families[f] = {'timm_ms': d, 'ours_ms': o, 'time_ratio': d / o if o and comparable else None,
                       'flops_ratio': dense_macs[f] / ours_macs[f] if ours_macs.get(f) else None,
                       'excess_ms': o - d / ratio, 'excess_share': (o - d / ratio) / total_ours}
    return {'flops_ratio': ratio, 'profiled_speedup': total_dense / total_ours, 'timm_ms': total_dense,
            'ours_ms': total_ours, 'gap_ms': total_ours - total_dense / ratio, 'families': families}


# ----------------------------------------------------------------------------------------------------------------
# The other measurements: scoring cost, routing alone

def scoring_cost(cc: nn.Module, dense: nn.Module, batch: int, reps: int, device: torch.device, seed: int) -> Dict:
    """Seconds for one attention_taylor_scores batch vs one plain training step (forward, backward, AdamW step)
    of the dense model on the same batch, fp32, timed interleaved; medians of ``reps`` after one warm-up."""
    criterion = LabelSmoothingCrossEntropy(0.1)
    (x, y), = noise_batches(1, batch, cc.num_classes, device, seed, image_shape(cc))
    scorer = copy.deepcopy(cc)
    trainee = copy.deepcopy(dense).train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4, weight_decay=0.05)

    def score():
        pruning.attention_taylor_scores(scorer, [(x, y)], criterion, device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(trainee(x), y)
        loss.backward()
        optimizer.step()

    times = engine.time_interleaved({'scoring': lambda _: score(), 'train_step': lambda _: train_step()}, x,
                                    device, reps, 1, None)
    s, t = statistics.median(times['scoring']), statistics.median(times['train_step'])
    ratio = paired([a / b for a, b in zip(times['scoring'], times['train_step'])])
    return {'batch_size': batch, 'repeats': reps, 'scoring_s': s, 'train_step_s': t, **as_fields('ratio', ratio)}


def routing_cost(ours: nn.Module, boolean: nn.Module, batch: int, device: torch.device, repeats: int,
                 dtype) -> Dict:
    """Milliseconds per batch of the token routing alone (blocks as identity), on token tensors of the model's
    shape, interleaved and rotated like the main table; many cheap rounds, so the spread is small."""
    x = torch.randn(batch, ours.num_tokens, ours.embed_dim, device=device)
    scatter = ScatterRouting(ours)
    runs = {'ours': lambda t: run_blocks_ours(ours, t), 'boolean': boolean.run_blocks,
            'scatter': scatter.run_blocks}
    with blocks_as_identity():
        with torch.no_grad():  # the routings move the same tokens (ours ends in the original order)
            assert runs['ours'](x).shape == runs['boolean'](x).shape == runs['scatter'](x).shape
        timings = time_interleaved(runs, batch, device, repeats, 3, dtype, x=x)
    return {'batch_size': batch, 'repeats': repeats,
            'ms': {k: 1e3 * statistics.median(v) for k, v in timings.seconds.items()},
            **as_fields('boolean_over_ours', timings.ratio('ours', 'boolean'))}


# ----------------------------------------------------------------------------------------------------------------
# The main table of one model

def make_rows(built: Runs, timings: Timings, dense_macs: int, counted: Dict[str, float], timm_name: str,
              protocol: str) -> List[Dict]:
    """The report rows of one model's timed run (the one place rows are made)."""
    rows = []
    for key, m in built.meta.items():
        f, rate = built.formulation[key], m['rate']
        row = {'key': key, 'label': m['label'], 'kind': m['kind'], 'prune_rate': rate,
               'gflops': m['macs'] / 1e9, 'flops_ratio': dense_macs / m['macs'],
               'kept_tokens': m['kept'], 'kept_tokens_mean': sum(m['kept']) / len(m['kept']),
               'images_per_s': timings.images_per_s(key), **as_fields('speedup_vs_timm', timings.ratio(key, 'timm')),
               'seconds': timings.seconds[key],
               'counter_gflops': counted['timm'] if m['dense'] else counted[rate_tag(rate)]}
        twin = REGISTRY[f.twin].key() if f.pruned and f.twin in REGISTRY else None
        if twin in timings.seconds:  # pruned rows: against the dense row of the same formulation
            row['twin'] = twin
            row.update(as_fields('speedup_vs_twin', timings.ratio(key, twin)))
        for field, baseline in f.compare:
            base = REGISTRY[baseline].key(rate if REGISTRY[baseline].pruned else None)
            if base in timings.seconds:
                row.update(as_fields(field, timings.ratio(key, base)))
        seed = paper_figures(timm_name, rate)
        if seed and m['kind'] in ('timm', 'ours'):
            row['seed_gpu'] = {'gflops': seed[0], 'images_per_s': seed[1], 'speedup': seed[2]}
        row.update(dense=m['dense'], protocol=protocol, build_seconds=m['build_seconds'], check=m['check'])
        if 'fast_path' in m:
            row['fast_path'] = m['fast_path']
        rows.append(row)
    return rows


@dataclass
class Live:
    """One model as its main section left it, for its later sections (the summary batch sizes)."""
    cc: nn.Module
    dense: nn.Module
    pruned: Dict[float, nn.Module]
    built: Runs
    shape: Tuple[int, int, int]
    result: Dict

    def model_of(self, rate: Optional[float]) -> nn.Module:
        return self.cc if rate is None else self.pruned[rate]


def main_models(timm_name: str, args, device: torch.device
                ) -> Tuple[nn.Module, nn.Module, Dict[float, nn.Module], Optional[float]]:
    """A main table's models: ours (every mask True) and timm's twin with the seeded weights, the pruned copies
    with the masks of each rate (planned from Taylor scores on two noise batches of 8 images, or random), and
    the seconds the scoring took (None without).  A resumed run makes its models again through this, the same."""
    torch._dynamo.reset()
    cc, dense = seeded_models(timm_name, args.seed, device)
    start = time.perf_counter()
    scores = _scores(cc, args, device)  # (the sweeps plan from the same batches: one model per rate everywhere)
    scoring_s = None if scores is None else time.perf_counter() - start
    return cc, dense, pruned_models(cc, scores, args.rates, args.seed), scoring_s


def bench_model(name: str, args, device: torch.device, dtype, budget: CompileBudget) -> Live:
    """The main section of one model: its rows built, checked and timed at its batch size (the main table), and
    its routing, scoring and breakdown measurements when asked."""
    timm_name = args.timm_models[name]
    label = dense_label(timm_name)
    original = args.protocol == 'original'
    batch = main_batch(args, name, device)
    timed = (f'protocol original: fp32, autograd on, 3 runs of {args.original_passes} passes per row (the last '
             f'run\'s mean), one row after another' if original else
             f'protocol ours: {args.repeats} timed passes after {args.warmup} warm-up, '
             f'interleaved, {args.dtype}')
    print(f'\n== {label}: batch {batch}, {device}, {timed} ==', flush=True)
    cc, dense, pruned, scoring_s = main_models(timm_name, args, device)
    shape = image_shape(cc)
    dense_macs = models.count_macs(cc)
    if scoring_s is not None:
        print(f'Taylor scores of the random-init model on 2 noise batches: {scoring_s:.1f} s', flush=True)
    for rate, ours in pruned.items():
        print(f'rate {rate}: kept tokens per block {models.kept_token_counts(ours)}; '
              f'{models.count_macs(ours) / 1e9:.2f} GFLOPs', flush=True)
    ctx = Context(device, None if original else dtype, batch, shape, grad=original, fast_autotune=args.fast_autotune,
                  seed=args.seed)
    chosen, _ = select(device, args.compile and name in args.compile_models, names=args.rows)
    start = time.perf_counter()
    built = build_runs(timm_name, cc, dense, pruned, chosen, ctx, budget)
    print(f'built and checked {len(built.runs)} rows in {time.perf_counter() - start:.0f} s '
          f'({", ".join(f"{k} {s:.0f} s" for k, s in built.build_seconds.items() if s >= 1) or "each under 1 s"})',
          flush=True)
    compile_s = {k: s for k, s in built.build_seconds.items() if built.formulation[k].compiled}
    if compile_s:
        print('torch.compile time (first call): ' + ', '.join(f'{k} {v:.0f} s' for k, v in compile_s.items())
              + f'; {budget.spent:.0f} s of compile in this run so far', flush=True)

    # FLOPs: the docs/method.md formula against torch's counter, for the dense model and each pruned one.
    counted = {'timm': counter_gmacs(dense, device),
               **{rate_tag(r): counter_gmacs(m, device) for r, m in pruned.items()}}

    start = time.perf_counter()
    timings = time_rows(built.runs, batch, device, args, dtype, shape)
    print(f'timed {len(built.runs)} rows ({"original protocol, one after another" if original else "interleaved"}) '
          f'in {time.perf_counter() - start:.0f} s', flush=True)
    say_unsteady(timings)
    rows = make_rows(built, timings, dense_macs, counted, timm_name, args.protocol)

    result = {'model': timm_name, 'short': short_name(timm_name), 'label': label, 'batch_size': batch,
              'protocol': args.protocol, 'rows': rows, 'checks': built.checks, 'compile_seconds': compile_s,
              'build_seconds': built.build_seconds, 'masks': args.masks}
    if built.skipped:
        result['skipped_rows'] = built.skipped
    if args.breakdown_rounds:
        start = time.perf_counter()
        result.update(breakdowns(cc, dense, pruned, built, batch, shape, device, args.breakdown_rounds, dtype))
        for tag, what, b in report.breakdown_entries(result):
            worst = max(b['families'].items(), key=lambda kv: kv[1]['excess_ms'])
            print(f'profiled C&C-{result["short"]}-{tag} ({what}): speed-up {b["profiled_speedup"]:.2f} for a '
                  f'FLOPs ratio of {b["flops_ratio"]:.2f}; most time above that ratio: {worst[0]} '
                  f'({100 * worst[1]["excess_share"]:+.1f}% of the pruned pass)', flush=True)
        print(f'profiled the rows x {args.breakdown_rounds} passes in {time.perf_counter() - start:.0f} s', flush=True)
    if args.routing_repeats:
        result['routing'] = {}
        for rate, ours in pruned.items():
            tag = rate_tag(rate)
            boolean = built.runs.get(REGISTRY['boolean'].key(rate)) or REGISTRY['boolean'].build(ours, dense, ctx)
            rc = routing_cost(ours, boolean, batch, device, args.routing_repeats, dtype)
            rc['forward_ms_ours'] = 1e3 * statistics.median(timings.seconds[REGISTRY['ours'].key(rate)])
            result['routing'][tag] = rc
            print(f'token routing alone, rate {rate}: ours {rc["ms"]["ours"]:.2f} ms, '
                  f'boolean {rc["ms"]["boolean"]:.2f} ms, gather/scatter {rc["ms"]["scatter"]:.2f} ms per batch',
                  flush=True)
    if args.scoring_repeats:
        scoring_batch = args.scoring_batch_size or min(batch, 64)
        result['scoring'] = scoring_cost(cc, dense, scoring_batch, args.scoring_repeats, device, args.seed)
        sc = result['scoring']
        print(f'scoring one batch {sc["scoring_s"]:.2f} s vs one training step {sc["train_step_s"]:.2f} s '
              f'(ratio {sc["ratio"]:.2f})', flush=True)
    if args.summary_batch_sizes:
        result['summary_sweep'] = {'protocol': 'ours', 'batches': []}
    return Live(cc, dense, pruned, built, shape, result)


def revive(name: str, result: Dict, args, device: torch.device, dtype) -> Live:
    """A model whose main table the run resumed measured (``result``), made again for its summary sections: the
    same seeded weights and masks (each block must keep the token counts that run recorded, else this raises) and
    its rows as :func:`summary_batch` rebuilds them (fixed-batch rows are built there, for its batch size)."""
    cc, dense, pruned, _ = main_models(args.timm_models[name], args, device)
    for row in result['rows']:
        if not row['dense']:
            kept = models.kept_token_counts(pruned[row['prune_rate']])
            if kept != row['kept_tokens']:
                raise RuntimeError(f'{row["label"]}: the masks made again keep {kept} tokens per block, the run '
                                   f'resumed recorded {row["kept_tokens"]}: not the model it measured')
    ctx = Context(device, dtype, result['batch_size'], image_shape(cc), fast_autotune=args.fast_autotune,
                  seed=args.seed)
    model_of = (lambda rate: cc if rate is None else pruned[rate])
    built = rows_to_rebuild(result['rows'], model_of, dense, ctx)
    return Live(cc, dense, pruned, built, image_shape(cc), result)


def say_unsteady(t: Timings) -> None:
    """One line naming the rows whose pass times spread more than UNSTEADY_SPREAD (the report lists them too)."""
    found = t.unsteady() if t.paired else {}
    if found:
        print(f'note: unsteady timings (interquartile range over the median above {100 * UNSTEADY_SPREAD:.0f}%): '
              + report.spreads_text(found) + '; something likely slowed the host while they ran: time this section '
              'again', flush=True)


SUMMARY_ROUNDS_CAP = 10


def summary_rounds(repeats: int, main_batch: int, batch: int) -> int:
    """Timed rounds of a summary section: --repeats times main batch / batch, at most SUMMARY_ROUNDS_CAP times.  A
    pass of a smaller batch costs that much less, and what every pass pays whatever its size (launching,
    synchronising: the same for every row) weighs more in it, so its per-round ratios scatter more; more rounds keep
    the confidence interval of their median about as tight, in about the time of the main table's rounds."""
    return repeats * max(1, min(SUMMARY_ROUNDS_CAP, main_batch // batch))


def summary_batch(live: Live, batch: int, args, device: torch.device, dtype, budget: CompileBudget) -> Dict:
    """A summary section: every row of a model's main table timed again, interleaved (protocol ours), at another
    batch size; rows built for one batch size are built again, compiled ones recompiled (both checked again)."""
    res = live.result
    print(f'\n== {res["label"]}: batch {batch} (summary: every row again, protocol ours, {args.dtype}) ==', flush=True)
    ctx = Context(device, dtype, batch, live.shape, fast_autotune=args.fast_autotune, seed=args.seed)
    start = time.perf_counter()
    rebuilt = rebuild_for_batch(live.built, live.model_of, live.dense, ctx, budget)
    built_s = time.perf_counter() - start
    rounds = summary_rounds(args.repeats, res['batch_size'], batch)
    t = time_interleaved(rebuilt.runs, batch, device, rounds, args.warmup, dtype, shape=live.shape)
    entry = {'batch_size': batch, 'rounds': rounds,
             'images_per_s': {k: t.images_per_s(k) for k in t.seconds}, 'seconds': t.seconds,
             'checks': rebuilt.checks, 'build_seconds': rebuilt.build_seconds}
    if rebuilt.skipped:
        entry['skipped_rows'] = rebuilt.skipped
    if rebuilt.fast_path:
        entry['fast_path'] = rebuilt.fast_path
    # in the order of --summary-batch-sizes, whatever order they ran in (a resumed run times again one that failed)
    order = {bs: i for i, bs in enumerate(args.summary_batch_sizes)}
    batches = res['summary_sweep']['batches']
    batches.append(entry)
    batches.sort(key=lambda b: order.get(b['batch_size'], len(order)))
    print(f'batch {batch}: rebuilt in {built_s:.0f} s; ' + ', '.join(
        f'{k} {v:.0f}' for k, v in entry['images_per_s'].items()) + ' images/s', flush=True)
    say_unsteady(t)
    return entry


# ----------------------------------------------------------------------------------------------------------------
# Sweeps of the first model (our protocol)

def batch_sweep(timm_name: str, rate: float, batch_sizes: List[int], args, device, dtype) -> List[Dict]:
    """images/s of dense timm, ours and the boolean formulation against batch size, one rate."""
    cc, dense = seeded_models(timm_name, args.seed, device)
    shape = image_shape(cc)
    pruned = pruned_models(cc, _scores(cc, args, device), [rate], args.seed)
    ctx = Context(device, dtype, batch_sizes[0], shape)
    built = build_runs(timm_name, cc, dense, pruned, [REGISTRY[n] for n in ('timm', 'ours', 'boolean')], ctx)
    names = {'timm': 'timm', 'ours': REGISTRY['ours'].key(rate), 'boolean': REGISTRY['boolean'].key(rate)}
    print(f'\n== batch-size sweep: {dense_label(timm_name)}, prune rate {rate} (protocol ours) ==', flush=True)
    out = []
    for t in sweep_batches(built, lambda r: cc if r is None else pruned[r], dense, batch_sizes, args, device, dtype,
                           shape):
        ips = {k: t.images_per_s(key) for k, key in names.items()}
        out.append(dict(batch_size=t.batch, **ips, speedup_vs_timm=t.ratio(names['ours'], 'timm')['median'],
                        vs_boolean=t.ratio(names['ours'], names['boolean'])['median']))
        print(f'batch {t.batch}: ' + ', '.join(f'{k} {v:.1f}' for k, v in ips.items()) + ' images/s', flush=True)
    return out


def rate_sweep(timm_name: str, rates: List[float], batch: int, args, device, dtype) -> List[Dict]:
    """images/s of ours and the boolean formulation against prune rate, with the FLOPs ratio (one timed run)."""
    cc, dense = seeded_models(timm_name, args.seed, device)
    shape = image_shape(cc)
    pruned = pruned_models(cc, _scores(cc, args, device), [r for r in rates if r], args.seed)
    dense_macs = models.count_macs(cc)
    ctx = Context(device, dtype, batch, shape)
    runs, macs = {'timm': dense}, {}
    for rate in rates:
        ours = pruned[rate] if rate else cc  # rate 0: our model with every mask True, no boolean row
        runs[f'ours_{rate}'] = ours
        macs[rate] = models.count_macs(ours)
        if rate:
            runs[f'boolean_{rate}'] = REGISTRY['boolean'].build(ours, dense, ctx)
    print(f'\n== prune-rate sweep: {dense_label(timm_name)}, batch {batch}, {len(runs)} rows interleaved '
          f'(protocol ours) ==', flush=True)
    t = time_interleaved(runs, batch, device, args.repeats, args.warmup, dtype, shape=shape)
    out = []
    for rate in rates:
        row = {'prune_rate': rate, 'gflops': macs[rate] / 1e9, 'flops_ratio': dense_macs / macs[rate],
               'timm': t.images_per_s('timm'), 'ours': t.images_per_s(f'ours_{rate}'),
               'speedup_vs_timm': t.ratio(f'ours_{rate}', 'timm')['median']}
        if rate:
            row['boolean'] = t.images_per_s(f'boolean_{rate}')
            row['vs_boolean'] = t.ratio(f'ours_{rate}', f'boolean_{rate}')['median']
        out.append(row)
        print(f'rate {rate}: FLOPs ratio {row["flops_ratio"]:.2f}x, speed-up {row["speedup_vs_timm"]:.2f}x',
              flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sections: what runs, in what order, within the time limit

SWEEP_KEYS = {'batch-sweep': 'batch', 'rate-sweep': 'rate'}  # a sweep section's entry in results['sweeps']


@dataclass(frozen=True)
class Section:
    """One unit of the run: a model's main table ('main'), a model's rows again at a summary batch size
    ('summary'), or a sweep of the first model ('batch-sweep', 'rate-sweep')."""
    kind: str
    model: str
    batch: Optional[int] = None

    def title(self, args) -> str:
        label = dense_label(args.timm_models[self.model])
        if self.kind == 'main':
            return f'{label}, batch {self.batch} (main table)'
        if self.kind == 'summary':
            return f'{label}, batch {self.batch} (summary)'
        return f'{label} ({self.kind})'


def plan_sections(args, device: torch.device) -> List[Section]:
    """The sections in the order they run, which is the order of what they are worth: each model's main table
    in the order of --models, the first model's summary batch sizes right after its main table, then the other
    models' summary batch sizes, then the sweeps.  With --time-limit, the end of this list is what a short run
    leaves out."""
    mains = [Section('main', name, main_batch(args, name, device)) for name in args.models]
    summaries = {name: [Section('summary', name, bs) for bs in args.summary_batch_sizes] for name in args.models}
    first = args.models[0]
    out = [mains[0], *summaries[first], *mains[1:]]
    for name in args.models[1:]:
        out += summaries[name]
    if args.sweep_batch_sizes:
        out.append(Section('batch-sweep', first))
    if args.sweep_rates:
        out.append(Section('rate-sweep', first))
    return out


def run_section(section: Section, live: Dict[str, Live], results: Dict, args, device: torch.device, dtype,
                budget: CompileBudget) -> None:
    name = section.model
    if section.kind == 'main':
        live[name] = bench_model(name, args, device, dtype, budget)
        results['models'][name] = live[name].result
    elif section.kind == 'summary':
        if name not in live:  # its main table was measured by the run resumed
            live[name] = revive(name, results['models'][name], args, device, dtype)
        summary_batch(live[name], section.batch, args, device, dtype, budget)
    else:
        first = args.timm_models[name]
        info = {'model': first, 'short': short_name(first), 'label': dense_label(first), 'protocol': 'ours'}
        if section.kind == 'batch-sweep':
            results['sweeps'][SWEEP_KEYS['batch-sweep']] = dict(info, prune_rate=args.rates[0], rows=batch_sweep(
                first, args.rates[0], args.sweep_batch_sizes, args, device, dtype))
        else:
            sweep_batch = args.batch_size or default_batch(first, device, 'ours')
            results['sweeps'][SWEEP_KEYS['rate-sweep']] = dict(info, batch_size=sweep_batch, rows=rate_sweep(
                first, args.sweep_rates, sweep_batch, args, device, dtype))


def adopt(results: Dict, earlier: Dict) -> List[str]:
    """Carry the finished sections of the run resumed (--resume, its settings checked equal) into ``results``:
    their records (marked ``earlier_run``), the tables of its models and its sweeps, and its command and compile
    seconds (recorded; the compile budget is each call's own, as is its time limit: a call on a machine started
    afresh compiles cold); returns the titles of the sections kept."""
    kept = []
    for record, old in zip(results['sections'], earlier['sections']):
        if old.get('status') == 'done' and old.get('section') == record['section']:
            record.update(copy.deepcopy(old), earlier_run=True)
            kept.append(record['section'])
            if record['kind'] == 'main':
                results['models'][record['model']] = copy.deepcopy(earlier['models'][record['model']])
            elif record['kind'] in SWEEP_KEYS:
                key = SWEEP_KEYS[record['kind']]
                results['sweeps'][key] = copy.deepcopy(earlier['sweeps'][key])
    then, now = earlier.get('code', {}), results['code']
    changed = sorted(f for f in then.keys() | now.keys() if then.get(f) != now.get(f))
    results['earlier_runs'] = earlier.get('earlier_runs', []) + [
        {'command': earlier.get('command'), 'seconds': earlier.get('seconds'),
         'compile_seconds_spent': earlier.get('compile_seconds_spent'), 'code_changed_since': changed}]
    return kept


def write_outputs(results: Dict, text: str, args) -> None:
    # through the one atomic writer: a run killed while writing leaves the previous complete file; args.written
    # notes the sections done in each file once it is written (what a Ctrl-C says the files hold)
    done = sum(r['status'] == 'done' for r in results['sections'])
    for path, content in ((args.json, json.dumps(results, indent=2)), (args.markdown, text)):
        write_text_atomic(path, content + ('\n' if not content.endswith('\n') else ''))
        args.written[path] = done


def report_so_far(results: Dict, args, device: torch.device, started: float) -> str:
    """Summary, targets and tables of what has run, written to --json and --markdown (after every section)."""
    report.attach_summary(results, device.type)
    results['seconds'] = clock() - started
    text = report.markdown(results, families_of(device.type))
    write_outputs(results, text, args)
    return text


clock = time.perf_counter  # the run's clock (the time limit, the seconds of each section)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    remove_stale_temporaries([args.json, args.markdown])  # those of a run killed while it wrote them
    if args.quick_set:
        print(quick_line(args), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configure_dynamo()
    dtype = DTYPES[args.dtype]

    started = clock()
    malloc = steady_allocator() if args.malloc == 'steady' else 'default'
    timed, skipped = select(device, args.compile, names=args.rows)
    settings = settings_of(args)
    sections = plan_sections(args, device)
    results = {'machine': dict(machine_info(device), malloc=malloc),
               'command': ' '.join(['python benchmarks/model_zoo.py'] + (sys.argv[1:] if argv is None else argv)),
               'settings': settings,
               'protocol': {'main_table': args.protocol, 'other_measurements': 'ours',
                            'description': {p: report.PROTOCOLS[p].format(passes=args.original_passes)
                                            for p in ('ours', args.protocol)}},
               'mask_source': ('Taylor attention scores of the random-init model on 2 random-noise batches of 8 '
                               'images, global budget (pruning.plan_masks)' if args.masks == 'taylor'
                               else 'pruning.random_masks (seeded)'),
               'boolean_mask_row': 're-implementation of the original research code\'s per-block boolean '
                                   'indexing + torch.cat (BooleanMaskViT in benchmarks/formulations.py)',
               'formulations': {'available': [f.name for f in timed], 'skipped': skipped},
               'sections': [{'section': s.title(args), 'kind': s.kind, 'model': s.model, 'batch_size': s.batch,
                             'status': 'pending'} for s in sections],
               # every pruned model the summary is to have an entry for, measured or not (report.summary)
               'pruned_models': [{'model': pruned_label(args.timm_models[name], rate),
                                  'timm_model': args.timm_models[name], 'prune_rate': rate, 'section_model': name}
                                 for name in args.models for rate in args.rates],
               'models': {}, 'sweeps': {}, 'code': code_hashes()}
    print(f'Machine: {results["machine"]}', flush=True)
    print(f'Main table: protocol {args.protocol}; sweeps, routing, scoring and breakdown: protocol ours', flush=True)
    print('Sections, in this order: ' + '; '.join(s.title(args) for s in sections)
          + (f' (none starts after {args.time_limit:.0f} s)' if args.time_limit else ''), flush=True)
    for name, reason in skipped.items():
        print(f'note: formulation {name} not timed: {reason}', flush=True)
    budget = CompileBudget(args.compile_budget, args.compile_min_batch)
    if args.earlier is not None:
        kept = adopt(results, args.earlier)
        print(f'Resuming {args.resume}: ' + (f'{len(kept)} sections kept ({"; ".join(kept)})' if kept else
                                             'no finished section in it'), flush=True)
        changed = results['earlier_runs'][-1]['code_changed_since']
        if changed:
            print(f'note: the code changed since that run ({", ".join(changed)}); the sections kept were measured '
                  f'with the code as it was', flush=True)
    args.written = {}  # (--json and --markdown, by this run: the sections done in each)
    try:
        live: Dict[str, Live] = {}
        started_one = False  # the first section this run measures starts whatever the time (a resumed run's too)
        for section, record in zip(sections, results['sections']):
            elapsed = clock() - started
            if record['status'] == 'done':  # kept from the run resumed
                continue
            if started_one and args.time_limit is not None and elapsed >= args.time_limit:
                record.update(status='left out', reason=f'time limit of {args.time_limit:.0f} s reached after '
                                                        f'{elapsed:.0f} s (--time-limit)')
                print(f'left out: {section.title(args)} ({record["reason"]})', flush=True)
            elif section.kind == 'summary' and section.model not in results['models']:
                record.update(status='left out', reason='its main table did not run')
                print(f'left out: {section.title(args)} ({record["reason"]})', flush=True)
            else:
                start, started_one = clock(), True
                try:
                    run_section(section, live, results, args, device, dtype, budget)
                    record['status'] = 'done'
                except Exception as e:  # noqa: BLE001  (one failing section must not lose the others)
                    traceback.print_exc()
                    record.update(status='failed', reason=f'{type(e).__name__}: {e}')
                record['seconds'] = clock() - start
                print(f'section {section.title(args)}: {record["status"]} in {record["seconds"]:.0f} s', flush=True)
            needed = {s.model for s, r in zip(sections, results['sections']) if r['status'] == 'pending'}
            try:
                for name in [n for n in live if n not in needed]:
                    del live[name]  # no later section needs this model: free its rows (CUDA graphs, compiled code)
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            except RuntimeError as e:  # e.g. a sticky CUDA error: what ran must still be written
                print(f'note: freeing memory failed: {e}', flush=True)
            results['models'] = {n: results['models'][n] for n in args.models if n in results['models']}
            results['compile_seconds_spent'] = budget.spent
            report_so_far(results, args, device, started)
        if hasattr(os, 'getloadavg'):
            results['machine']['load_average_at_end'] = list(os.getloadavg())
        text = report_so_far(results, args, device, started)
    except (KeyboardInterrupt, Terminated) as e:  # (cli says it in one line)
        # what the files hold: a Ctrl-C while they were written leaves the one not yet written as it was
        done, tables = args.written.get(args.json), args.written.get(args.markdown)
        held = f'{args.json} and {args.markdown} hold' if tables == done else f'{args.json} holds'
        note = '' if tables == done else f' ({args.markdown}: ' + (
            'not written' if tables is None else f'{tables} of them') + ')'
        others = f'; --resume {args.json} runs the others' if done != len(results['sections']) else ''
        e.kept = (f'{held} the {done} section{"s" * (done != 1)} finished{note}{others}' if done is not None
                  else 'no section finished: nothing written' + (f' ({args.resume} is as it was)' if args.resume
                                                                 else ''))
        raise
    print('\n' + text, flush=True)
    undone = [r['section'] for r in results['sections'] if r['status'] != 'done']
    print(report.count_targets(results['targets'])
          + f'; wrote {args.json} and {args.markdown} ({results["seconds"]:.0f} s)'
          + (f'; not done: {"; ".join(undone)}' if undone else ''), flush=True)
    return results


def cli(argv=None, *, ends_process: bool = False) -> int:
    """The command: exit status 1 when a section failed, or when writing the results failed mid-run (a disk that
    filled, a folder removed: one ``error:`` line, the sections written before it kept), 130 on Ctrl-C and 143 on
    SIGTERM (a time limit's ``timeout``, a scheduler; one line saying what the results files hold, none of them
    half-written), 0 otherwise.  ``ends_process``: run as the script (see utils.signals.sigterm_unwinds)."""
    with sigterm_unwinds(ends_process):
        try:
            results = main(argv)
        except UserError as e:
            sys.stderr.write(f'error: {e}\n')
            return 1
        except (KeyboardInterrupt, Terminated) as e:
            return say_stopped(e, getattr(e, 'kept', 'nothing was written'))
    return 1 if any(r['status'] == 'failed' for r in results['sections']) else 0


if __name__ == '__main__':
    end_script(cli(ends_process=True))
