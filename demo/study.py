"""Taylor against random pruning at mini scale, over seeds and prune rates: the demo's pipeline, repeated.

    python demo/study.py            # or: make study   (12-36 minutes on 2 CPU cores; demo/STUDY.md has the timing)
    python demo/study.py --quick    # seeds 0 1, rates 0.25 0.40, short runs: checks the plumbing in 1-2 minutes

The demo (demo/run_demo.py) makes one run at one budget, which cannot say whether Taylor masks beat random
ones. This script calls the demo's own stages (so every step still runs through finetune.py's code, in-process)
on the same task (scikit-learn digits, ``--data-set DIGITS``) with the same recipe:

1. one dense teacher, trained once for all runs with seed 0 (the demo's teacher: same recipe, same seed)
                                                                                      -> <out>/teacher/
2. for every seed, prune rate (0.25, 0.40, 0.55) and mask mode (Taylor attention importance, random):
   prune the teacher and evaluate it                                           -> <out>/seed<s>/prune_<mode>_<rate>/
   finetune it with soft distillation from the teacher (8 epochs) and evaluate -> <out>/seed<s>/finetune_<mode>_<rate>/
   The seed of a run is the ``--seed`` of its prune and finetune commands: it draws the random masks, orders
   (and shifts) the training images the Taylor scores are summed over, and orders and shifts the images of the
   finetuning (it seeds every random draw of those commands). The teacher does not change with it.
3. <out>/results.json (every run, the mean and standard deviation of each cell, the paired comparisons),
   <out>/results.md (the tables and the sentences), <out>/study.png (accuracy against GFLOPs) and
   <out>/STUDY.md (all of it, with the command, the machine and the time taken).

The comparison of Taylor with random is paired: the same seed gives both the same scoring/finetuning data order,
so per rate and stage the script takes the differences Taylor - random seed by seed and reports their mean with a
two-sided 95% Student t-interval (n - 1 degrees of freedom, n = number of seeds). Where the interval excludes
0 it says which masks win; where it does not, that the data cannot tell them apart.

A teacher already trained in <out>/teacher/ with the same number of epochs, learning rate and seed (and the same
data, batch and recipe, as its checkpoint records them) is reused (``--fresh`` retrains it); every other stage
is redone, each replacing its own directory when it starts. What an earlier study left in <out>/seed*/ that this
one does not write (other seeds, other rates) is removed once every run of this one has finished, so a study that
stops early leaves the earlier results it did not reach.
``finetune.py``'s full output for each stage is in ``<stage dir>/stdout.txt``, starting with the command line (its
evaluations' in ``<stage dir>/eval.txt``).
Every argument is checked before any work starts: a bad one is one ``error: ...`` line and exit code 2.
"""
import os
import sys

# Two cores shared with other work: OpenMP threads that spin while waiting make a busy machine 10x slower.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'demo')):
    if path not in sys.path:
        sys.path.insert(0, path)

import run_demo as demo  # noqa: E402
import finetune  # noqa: E402
import pruning  # noqa: E402
from utils import (UserError, check_output_dir, check_tensorboard_dir, load_checkpoint_file, one_line,  # noqa: E402
                   print_line, state_dict_of, write_atomic, write_text_atomic)
from utils.cli import AT_LEAST_ONE, EXIT_USER_ERROR, POSITIVE, OneLineParser, Range, check_numbers  # noqa: E402
from utils.signals import end_script  # noqa: E402

RATES = (0.25, 0.40, 0.55)
MODES = ('attn', 'random')            # finetune.py's --prune_mode: 'attn' is Taylor attention importance
MODE_NAMES = {'attn': 'Taylor', 'random': 'random'}
SEEDS = (0, 1, 2)
TEACHER_SEED = 0                      # the teacher is trained once, with the demo's default seed
CONFIDENCE = 0.95
SAME_DIFFERENCE = 'every seed gave the same difference'  # said of a zero-width interval
RUN_KEYS = ('prune_rate', 'prune_mode', 'seed', 'finetuned', 'acc1', 'gflops', 'kept_tokens', 'masks_sha1',
            'checkpoint')
# What --quick sets, for each of these flags not given on the command line (a flag given keeps its value).
QUICK = {'seeds': list(SEEDS[:2]), 'rates': list(RATES[:2]), 'teacher_epochs': 2, 'finetune_epochs': 1,
         'prune_batches': 4}


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser('demo/study.py',
                      description='Taylor against random Clip & Concat masks on scikit-learn digits, over seeds')
    p.add_argument('--out', default=os.path.join('runs', 'study'), help='output directory (default %(default)s)')
    p.add_argument('--seeds', default=list(SEEDS), type=int, nargs='+', help='seeds of the runs (default 0 1 2)')
    p.add_argument('--rates', default=list(RATES), type=float, nargs='+',
                   help='prune rates (default 0.25 0.40 0.55)')
    as_demo = demo.get_args_parser().get_default  # the demo's budget is the study's unless told otherwise
    p.add_argument('--teacher-epochs', default=as_demo('teacher_epochs'), type=int,
                   help='epochs of dense teacher training (default %(default)s, as the demo)')
    p.add_argument('--teacher-lr', default=as_demo('teacher_lr'), type=float,
                   help='learning rate of the teacher (default %(default)s, as the demo)')
    p.add_argument('--finetune-epochs', default=as_demo('finetune_epochs'), type=int,
                   help='epochs of distillation finetuning (default %(default)s, as the demo)')
    p.add_argument('--finetune-lr', default=as_demo('finetune_lr'), type=float,
                   help='learning rate of the finetuning (default %(default)s, as the demo)')
    p.add_argument('--prune-batches', default=as_demo('prune_batches'), type=int,
                   help='score at most this many training batches (default: the whole training set, as the demo)')
    p.add_argument('--quick', action='store_true',
                   help=f'checks the plumbing in 1-2 minutes: {demo.flags_text(QUICK)}, each where not given '
                        f'(a value given wins)')
    p.add_argument('--fresh', action='store_true', help='retrain the teacher even if <out>/teacher has one')
    p.add_argument('--device', default=None, help='cpu or cuda (default: the CLI\'s, cuda when available)')
    p.add_argument('--verbose', action='store_true', help='show every line finetune.py prints')
    return p


# Every numeric flag of the parser, with what it accepts (check_numbers refuses a flag missing here).
NUMERIC_FLAGS: Dict[str, Range] = {
    'seeds': Range(0, 2 ** 32 - 1), 'rates': Range(0, 1, low_open=True, high_open=True),
    'teacher_epochs': AT_LEAST_ONE, 'teacher_lr': POSITIVE, 'finetune_epochs': AT_LEAST_ONE,
    'finetune_lr': POSITIVE, 'prune_batches': AT_LEAST_ONE,
}


def model_slots() -> Tuple[int, int]:
    """(depth, patches) of the demo's model, built as the prune stage builds it: the (layer, patch) slots a prune
    rate is a fraction of (the class token is never counted)."""
    import timm
    model = timm.create_model(finetune.cc_model_name(demo.MODEL), num_classes=10)
    return len(model.blocks), model.num_tokens - model.num_prefix_tokens


def check_rates(rates: Sequence[float]) -> None:
    """Each rate has a folder of its own and prunes something: two rates that round to the same two decimals would
    write the same prune_<mode>_<rate>/ and finetune_<mode>_<rate>/ folders over each other, and a rate that clips
    no slot makes the prune stage fail after the teacher has been trained; one named 0.00 or 1.00 would misname
    its runs."""
    tags: Dict[str, float] = {}
    for rate in rates:
        tag = demo.rate_tag(MODES[0], rate)
        if tag in tags:
            raise UserError(f'--rates: {tags[tag]:g} and {rate:g} both round to {rate:.2f}, the name of their '
                            f'folders (prune_<mode>_{rate:.2f}/): give rates that differ in their first two decimals')
        tags[tag] = rate
    depth, patches = model_slots()
    slots = depth * patches
    for rate in rates:
        nothing = pruning.clips_nothing(depth, patches, rate)
        if nothing:
            raise UserError(f'--rates {nothing} of {demo.MODEL}: nothing would be pruned (a rate clips one from '
                            f'1/{slots} on)')
        if f'{rate:.2f}' in ('0.00', '1.00'):  # the folders' and the tables' name of the rate
            raise UserError(f'--rates {rate:g} would be named {rate:.2f} in its folders and tables, as if '
                            f'{"nothing" if rate < 0.5 else "everything"} were pruned: give rates from 0.005 to '
                            f'below 0.995')


def validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse a bad command line before any work starts (nothing trained, no file or directory written)."""
    check_numbers(a, p, NUMERIC_FLAGS)
    for flag, values in (('--seeds', a.seeds), ('--rates', a.rates)):
        if len(set(values)) != len(values):
            raise UserError(f'{flag} must be distinct, got {" ".join(map(str, values))}')
    check_rates(a.rates)
    demo.check_device(a.device)
    check_output_dir(a.out, '--out')
    check_tensorboard_dir(a.out, '--out')  # (each stage writes its scalars in a folder of it, as the demo's)


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> Dict[str, object]:
    """``validate_args``, a mistake being one ``error:`` line and exit code 2 (SystemExit); then ``--quick``, which
    sets only the flags not given (returned, for the run to say which), and no path in the way of what the runs it
    plans write."""
    try:
        validate_args(p, a)
        chosen = demo.apply_quick(a, QUICK) if a.quick else {}
        demo.check_nothing_in_the_way(a.out, *planned_outputs(a), script='study')
    except UserError as e:
        p.exit(EXIT_USER_ERROR, f'error: {one_line(e)}\n')
    return chosen


# The files the study writes in --out once every run has finished.
OUTPUT_FILES = {'results': 'results.json', 'table': 'results.md', 'figure': 'study.png', 'report': 'STUDY.md'}


def seed_dir(out: str, seed: int) -> str:
    return os.path.join(out, f'seed{seed}')


def planned_outputs(a: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """(the folders, the files) the study writes under ``a.out``: the teacher's, each seed's and each stage's folder
    (run_all), and OUTPUT_FILES (run_study)."""
    folders = [os.path.join(a.out, demo.TEACHER_DIR)]
    for seed in a.seeds:
        folders.append(seed_dir(a.out, seed))
        folders += [demo.stage_dir(seed_dir(a.out, seed), stage, mode, rate)
                    for rate in a.rates for mode in MODES for stage in ('prune', 'finetune')]
    return folders, [os.path.join(a.out, name) for name in OUTPUT_FILES.values()] + demo.teacher_logs(folders[0])


# ----------------------------------------------------------------------------------------------------------
# statistics

def cell_stats(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    values = [float(v) for v in values]
    return {'n': len(values), 'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None}


def paired_comparison(taylor: Sequence[float], random: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Taylor - random, paired by seed: the mean difference and its two-sided Student t-interval.

    ``verdict`` is 'taylor' or 'random' where the interval lies above or below 0, 'undecided' where it contains
    0, and also where one pair gives no interval at all.
    """
    from scipy.stats import t as student_t
    if len(taylor) != len(random) or not taylor:
        raise ValueError('paired comparison needs the same, non-zero number of Taylor and random runs')
    diffs = [float(a) - float(b) for a, b in zip(taylor, random)]
    n, mean = len(diffs), statistics.fmean(diffs)
    result = {'n': n, 'differences': diffs, 'mean': mean, 'std': None, 'df': n - 1, 'confidence': confidence,
              'interval': 'two-sided Student t-interval on the paired differences', 'ci_low': None,
              'ci_high': None, 'verdict': 'undecided'}
    if n > 1:
        # Accuracies are multiples of 100/360: equal differences can come out a rounding error apart.
        sd = 0.0 if max(diffs) - min(diffs) < 1e-9 else statistics.stdev(diffs)
        half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        result.update(std=sd, ci_low=mean - half, ci_high=mean + half)
        if result['ci_low'] > 0:
            result['verdict'] = 'taylor'
        elif result['ci_high'] < 0:
            result['verdict'] = 'random'
    return result


def epochs_text(epochs: int) -> str:
    return f'{epochs} epoch{"s" if epochs != 1 else ""}'


def stage_name(finetuned: bool, epochs: int) -> str:
    return f'after {epochs_text(epochs)} of distillation finetuning' if finetuned else 'before finetuning'


def sentence(rate: float, finetuned: bool, epochs: int, c: dict) -> str:
    """One sentence stating what the paired comparison ``c`` shows at this rate and stage."""
    where = f'At prune rate {rate:.2f} {stage_name(finetuned, epochs)}'
    diff = (f'Taylor - random = {c["mean"]:+.2f} points (mean over {c["n"]} seed{"s" if c["n"] != 1 else ""}, '
            f'paired by seed)')
    if c['ci_low'] is None:
        return f'{where}, the data cannot tell Taylor and random apart: {diff}, and one seed gives no interval.'
    interval = f'{round(100 * c["confidence"])}% t-interval [{c["ci_low"]:+.2f}, {c["ci_high"]:+.2f}]'
    if c['std'] == 0:
        interval += f' ({SAME_DIFFERENCE}, so the interval has zero width)'
    if c['verdict'] == 'taylor':
        return f'{where}, Taylor beats random: {diff}, {interval}, which excludes 0.'
    if c['verdict'] == 'random':
        return f'{where}, random beats Taylor: {diff}, {interval}, which excludes 0.'
    return f'{where}, the data cannot tell Taylor and random apart: {diff}, {interval}, which includes 0.'


# ----------------------------------------------------------------------------------------------------------
# progress

def clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return '?'
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f'{h}:{rest // 60:02d}:{rest % 60:02d}' if h else f'{rest // 60}:{rest % 60:02d}'


def estimate_remaining(remaining: Sequence[tuple], done: Dict[tuple, List[float]]) -> Optional[float]:
    """Seconds left: each remaining step ``(stage, mode, rate)`` at the mean duration of the finished steps of the
    same stage, mode and rate, else of the same stage; None while a stage has no finished step yet."""
    total = 0.0
    for step in remaining:
        same = done.get(step) or [d for key, ds in done.items() if key[0] == step[0] for d in ds]
        if not same:
            return None
        total += statistics.fmean(same)
    return total


# ----------------------------------------------------------------------------------------------------------
# the runs

def masks_sha1(checkpoint: str) -> str:
    """The CLI's digest of the per-block masks stored in a checkpoint file."""
    sd = state_dict_of(load_checkpoint_file(checkpoint))
    depth = len({k for k in sd if k.endswith('.attn.token_index')})
    return finetune.masks_sha1([sd[f'blocks.{i}.attn.token_index'] for i in range(depth)])


def teacher_gflops() -> float:
    import timm
    return finetune.gflops(timm.create_model(finetune.cc_model_name(demo.MODEL), num_classes=10))


def run_all(a: argparse.Namespace, out: str) -> Tuple[dict, List[dict], Dict[str, float]]:
    t0 = time.time()
    timings: Dict[str, float] = {}
    demo.begin_stage('the teacher stage', f'[teacher] {demo.MODEL}, {a.teacher_epochs} epochs from scratch, seed '
                                    f'{TEACHER_SEED}, trained once for all runs')
    common = demo.common_args(TEACHER_SEED, a.device)
    teacher, teacher_acc, reused = demo.train_teacher(os.path.join(out, demo.TEACHER_DIR), a.teacher_epochs,
                                                      a.teacher_lr, common, a.fresh, a.verbose, echo=False)
    timings['teacher'] = time.time() - t0
    teacher_row = {'acc1': float(teacher_acc), 'gflops': teacher_gflops(), 'seed': TEACHER_SEED,
                   'epochs': a.teacher_epochs, 'checkpoint': os.path.relpath(teacher, out),
                   'reused': reused}

    steps = [(stage, mode, rate, seed) for seed in a.seeds for rate in a.rates for mode in MODES
             for stage in ('prune', 'finetune')]
    done: Dict[tuple, List[float]] = {}
    runs: List[dict] = []
    pruned: Dict[tuple, dict] = {}
    t_steps = time.time()
    for i, (stage, mode, rate, seed) in enumerate(steps):
        eta = estimate_remaining([s[:3] for s in steps[i:]], done)
        step = f'{stage} {MODE_NAMES[mode]} {rate:.2f} seed {seed}'
        demo.begin_stage(f'step {i + 1}/{len(steps)} ({step})', f'[{i + 1}/{len(steps)}] {step} ... elapsed '
                                                               f'{clock(time.time() - t0)}, eta {clock(eta)}')
        t = time.time()
        common = demo.common_args(seed, a.device)
        folder = seed_dir(out, seed)
        tag = f'{demo.rate_tag(mode, rate)} s{seed}'
        if stage == 'prune':
            r = demo.prune(teacher, mode, rate, demo.stage_dir(folder, stage, mode, rate), common, a.prune_batches,
                           f'prune {tag}', a.verbose, echo=False)
            pruned[(mode, rate, seed)] = r
            channels = r['channels']
        else:
            r = demo.distill(pruned[(mode, rate, seed)]['path'], teacher,
                             demo.stage_dir(folder, stage, mode, rate), common, a.finetune_epochs, a.finetune_lr,
                             f'finetune {tag}', a.verbose, echo=False)
            channels = pruned[(mode, rate, seed)]['channels']
        runs.append({'prune_rate': float(rate), 'prune_mode': mode, 'seed': seed, 'finetuned': stage == 'finetune',
                     'acc1': r['acc1'], 'gflops': r['gflops'], 'kept_tokens': channels,
                     'masks_sha1': masks_sha1(r['path']), 'checkpoint': os.path.relpath(r['path'], out)})
        done.setdefault((stage, mode, rate), []).append(time.time() - t)
    timings['prune'] = sum(sum(v) for k, v in done.items() if k[0] == 'prune')
    timings['finetune'] = sum(sum(v) for k, v in done.items() if k[0] == 'finetune')
    timings['steps'] = time.time() - t_steps
    timings['per_step_mean'] = {f'{stage} {mode} {rate:.2f}': statistics.fmean(v)
                                for (stage, mode, rate), v in done.items()}
    remove_earlier_runs(out, {os.path.dirname(r['checkpoint']) for r in runs})
    return teacher_row, runs, timings


def remove_earlier_runs(out: str, written: set) -> None:
    """Remove what an earlier study left under <out>/seed*/ and this one did not write (``written``: its stage
    directories, relative to ``out``): other seeds' and other rates' runs would mislead next to these results.
    Called once every run has finished, so a study that stops early destroys nothing it has not replaced.  A seed
    folder that is a symbolic link is never emptied: nothing in the folder it names is removed, and the link only
    where this study wrote nothing through it."""
    for name in sorted(os.listdir(out)):
        seed_folder = os.path.join(out, name)
        if not (re.fullmatch(r'seed\d+', name) and os.path.isdir(seed_folder)):
            continue
        if os.path.islink(seed_folder):  # (the folder it names is not --out's)
            if not any(w.startswith(name + os.sep) for w in written):
                os.remove(seed_folder)
            continue
        for entry in sorted(os.listdir(seed_folder)):
            if os.path.join(name, entry) not in written:
                path = os.path.join(seed_folder, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        if not os.listdir(seed_folder):
            os.rmdir(seed_folder)


def summarise(runs: List[dict], seeds: Sequence[int], rates: Sequence[float], epochs: int
              ) -> Tuple[List[dict], List[dict]]:
    """Per cell (rate, mode, finetuned): mean and std over seeds; per (rate, finetuned): the paired comparison;
    by rate, ascending, whatever order --rates gave (the tables, sentences and verdicts list them alike)."""
    by = {(r['prune_rate'], r['prune_mode'], r['seed'], r['finetuned']): r for r in runs}
    cells, paired = [], []
    for rate in sorted(rates):
        for finetuned in (False, True):
            for mode in MODES:
                rs = [by[(float(rate), mode, s, finetuned)] for s in seeds]
                cells.append({'prune_rate': float(rate), 'prune_mode': mode, 'finetuned': finetuned,
                              'seeds': list(seeds), 'acc1': cell_stats([r['acc1'] for r in rs]),
                              'gflops': cell_stats([r['gflops'] for r in rs])})
            c = paired_comparison([by[(float(rate), 'attn', s, finetuned)]['acc1'] for s in seeds],
                                  [by[(float(rate), 'random', s, finetuned)]['acc1'] for s in seeds])
            c.update(prune_rate=float(rate), finetuned=finetuned, seeds=list(seeds))
            c['sentence'] = sentence(rate, finetuned, epochs, c)
            paired.append(c)
    return cells, paired


# ----------------------------------------------------------------------------------------------------------
# the table, the figure, the report

def mean_std(s: dict) -> str:
    return f'{s["mean"]:.2f}' if s['std'] is None else f'{s["mean"]:.2f} ± {s["std"]:.2f}'


def markdown(teacher: dict, cells: List[dict], paired: List[dict], seeds: Sequence[int], epochs: int) -> str:
    seed_list = ', '.join(str(s) for s in seeds)
    cell = {(c['prune_rate'], c['prune_mode'], c['finetuned']): c for c in cells}
    rates = sorted({c['prune_rate'] for c in cells})
    spread = (f'mean ± standard deviation (n - 1) over seeds {seed_list}' if len(seeds) > 1
              else f'one seed ({seed_list}): no standard deviation')
    lines = [f'acc@1 (%) on the 360 validation digits, {spread}; GFLOPs per image as the paper counts them, mean '
             f'over the seeds.', '',
             f'| prune rate | masks | GFLOPs | acc@1 pruned | acc@1 after KD finetune ({epochs_text(epochs)}) '
             f'| seeds |',
             '|---|---|---|---|---|---|',
             f'| 0 | dense teacher | {teacher["gflops"]:.4f} | {teacher["acc1"]:.2f} | – | '
             f'1 (trained once, seed {teacher["seed"]}) |']
    for rate in rates:
        for mode in MODES:
            before, after = cell[(rate, mode, False)], cell[(rate, mode, True)]
            lines.append(f'| {rate:.2f} | {MODE_NAMES[mode]} | {before["gflops"]["mean"]:.4f} | '
                         f'{mean_std(before["acc1"])} | {mean_std(after["acc1"])} | {before["acc1"]["n"]} |')
    how = (f'{round(100 * CONFIDENCE)}% two-sided Student t-interval on the paired differences, n - 1 degrees of '
           f'freedom' if len(seeds) > 1 else 'one seed: no interval')
    lines += ['', f'Taylor - random, paired by seed (points of acc@1; {how}):', '',
              '| prune rate | when | per seed | mean | interval | verdict |', '|---|---|---|---|---|---|']
    verdicts = {'taylor': 'Taylor wins', 'random': 'random wins', 'undecided': 'cannot tell'}
    for c in paired:
        interval = '–' if c['ci_low'] is None else f'[{c["ci_low"]:+.2f}, {c["ci_high"]:+.2f}]'
        lines.append(f'| {c["prune_rate"]:.2f} | {stage_name(c["finetuned"], epochs)} | '
                     f'{", ".join(f"{d:+.2f}" for d in c["differences"])} | {c["mean"]:+.2f} | {interval} | '
                     f'{verdicts[c["verdict"]]} |')
    lines += [''] + [f'- {c["sentence"]}' for c in paired]
    return '\n'.join(lines)


def plot(teacher: dict, runs: List[dict], cells: List[dict], path: str, epochs: int) -> str:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colours = {'attn': '#1f77b4', 'random': '#d62728'}
    markers = {'attn': 'o', 'random': 's'}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    xs = [c['gflops']['mean'] for c in cells] + [teacher['gflops']]
    shift = 0.006 * (max(xs) - min(xs))
    offset = {'attn': -shift, 'random': shift}
    for ax, finetuned in zip(axes, (False, True)):
        for mode in MODES:
            cs = sorted((c for c in cells if c['prune_mode'] == mode and c['finetuned'] == finetuned),
                        key=lambda c: c['gflops']['mean'])
            x = [c['gflops']['mean'] + offset[mode] for c in cs]
            y = [c['acc1']['mean'] for c in cs]
            err = [c['acc1']['std'] or 0.0 for c in cs]
            ax.errorbar(x, y, yerr=err, color=colours[mode], marker=markers[mode], capsize=4, lw=1.5,
                        label=f'{MODE_NAMES[mode]} (mean ± 1 std)')
            each = [r for r in runs if r['prune_mode'] == mode and r['finetuned'] == finetuned]
            ax.scatter([r['gflops'] + offset[mode] for r in each], [r['acc1'] for r in each], s=12, color=colours[mode],
                       alpha=0.35, label=f'{MODE_NAMES[mode]}, each seed')
            if mode == 'attn':
                for c in cs:
                    ax.annotate(f'{c["prune_rate"]:.2f}', (c['gflops']['mean'] + offset[mode], c['acc1']['mean']),
                                textcoords='offset points', xytext=(6, 6), fontsize=8, color='#555555')
        ax.scatter([teacher['gflops']], [teacher['acc1']], marker='*', s=180, color='black', zorder=5,
                   label='dense teacher')
        ax.axhline(teacher['acc1'], color='black', lw=0.8, ls=':')
        ax.set_xlabel('GFLOPs per image (labels: prune rate)')
        ax.set_ylabel('acc@1 on 360 validation digits (%)')
        ax.set_title('pruned, before finetuning' if not finetuned else f'after {epochs_text(epochs)} of KD finetuning')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc='best')
    n = len({r['seed'] for r in runs})
    fig.suptitle(f'Clip & Concat on scikit-learn digits: Taylor against random masks, {n} seeds per point')
    fig.text(0.5, 0.01, f'Taylor and random are drawn {1e3 * shift:.2f} MFLOPs to either side of their GFLOPs so '
             f'their bars do not hide each other; bars: ±1 standard deviation over seeds', ha='center', fontsize=8,
             color='#555555')
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    try:  # through the atomic writer: a failed write leaves the previous figure, not a truncated one
        write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
        plt.close(fig)
    return path


def machine() -> dict:
    import engine
    return engine.machine_facts()


def git_revision() -> str:
    try:
        head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
    return (head + (' with uncommitted changes' if dirty else '')) if head else 'unknown'


def load_average() -> str:
    try:
        return ' / '.join(f'{x:.2f}' for x in os.getloadavg())
    except OSError:
        return 'unknown'


class LoadSampler:
    """The 1-minute load average every ``period`` seconds while the study runs (how busy the machine was)."""

    def __init__(self, period: float = 15.0):
        import threading
        self.samples: List[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while True:
            try:
                self.samples.append(os.getloadavg()[0])
            except OSError:
                return
            if self.stop.wait(period):
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {'samples': len(self.samples), 'min': min(self.samples), 'median': statistics.median(self.samples),
                'max': max(self.samples)}


def verdict_summary(paired: List[dict], finetuned: bool) -> str:
    """'Taylor beats random at 0.25 (+9.17 points, 95% t-interval [...]); the data cannot tell at 0.55 (...)'; an
    interval of zero width (the same difference for every seed) says so, as the sentences do."""
    groups = {'taylor': 'Taylor beats random', 'random': 'random beats Taylor',
              'undecided': 'the data cannot tell them apart'}
    parts = []
    for verdict, words in groups.items():
        cs = [c for c in paired if c['finetuned'] == finetuned and c['verdict'] == verdict]
        if cs:
            each = [f'{c["prune_rate"]:.2f} ({c["mean"]:+.2f} points'
                    + ('' if c['ci_low'] is None else f', [{c["ci_low"]:+.2f}, {c["ci_high"]:+.2f}]')
                    + (f', {SAME_DIFFERENCE}' if c['ci_low'] is not None and c['std'] == 0 else '') + ')'
                    for c in cs]
            parts.append(f'{words} at {"rate" if len(cs) == 1 else "rates"} {and_list(each)}')
    return '; '.join(parts)


def and_list(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ', '.join(items[:-1]) + ' and ' + items[-1]


def wrap(text: str, bullet: bool = False, width: int = 115) -> str:
    import textwrap
    if bullet:
        return textwrap.fill(text, width, initial_indent='- ', subsequent_indent='  ', break_on_hyphens=False)
    return textwrap.fill(text, width, break_on_hyphens=False)


def spread_summary(cells: List[dict], finetuned: bool) -> str:
    """'mean acc@1 Taylor / random 92.6 / 88.1 at 0.25, ...; standard deviation over seeds up to 2.3 points for
    Taylor and up to 20.5 for random'"""
    cell = {(c['prune_rate'], c['prune_mode']): c['acc1'] for c in cells if c['finetuned'] == finetuned}
    rates = sorted({rate for rate, _ in cell})
    means = and_list([f'{cell[(r, "attn")]["mean"]:.1f} / {cell[(r, "random")]["mean"]:.1f} at {r:.2f}'
                      for r in rates])
    text = f'mean acc@1 Taylor / random {means}'
    stds = {mode: [cell[(r, mode)]['std'] for r in rates] for mode in MODES}
    if all(v is not None for vs in stds.values() for v in vs):
        text += (f'; standard deviation over seeds up to {max(stds["attn"]):.1f} points for Taylor and up to '
                 f'{max(stds["random"]):.1f} for random')
    return text


def report(argv: Sequence[str], results: dict, table: str) -> str:
    """STUDY.md: how the numbers were made, the tables, the sentences, the figure and a paragraph for README.md."""
    cfg, m, t = results['config'], results['machine'], results['timings_s']
    wall, level, paired = t['total'], round(100 * CONFIDENCE), results['paired']
    d = demo.get_args_parser().parse_args([])  # what `make demo` runs
    as_demo = (all(cfg[k] == getattr(d, k) for k in ('teacher_epochs', 'teacher_lr', 'finetune_epochs',
                                                      'finetune_lr', 'prune_batches'))
               and d.seed == TEACHER_SEED == 0 and 0 in cfg['seeds'] and {0.25, 0.40} <= set(cfg['rates']))
    seeds = and_list([str(s) for s in cfg['seeds']])
    rates = and_list([f'{r:.2f}' for r in cfg['rates']])
    n_seeds = len(cfg['seeds'])
    runs_per_stage = n_seeds * len(cfg['rates']) * len(MODES)
    minutes = wall / 60
    command = 'python demo/study.py' + ''.join(' ' + shlex.quote(x) for x in argv)
    short_command = 'make study' if not argv else command
    ft = epochs_text(cfg['finetune_epochs'])
    sampled = results['load_average'].get('one_minute_during') or {}
    during = ('' if not sampled else f'; the 1-minute load average every 15 s during the run: median '
              f'{sampled["median"]:.1f} (from {sampled["min"]:.1f} to {sampled["max"]:.1f})')
    same_as_demo = (": it is the demo's teacher, and the runs with seed 0 at rates 0.25 (both masks) and 0.40 "
                    "(Taylor) are the demo's own runs (the same finetune.py commands; only the output directories "
                    "differ)" if as_demo else '')
    load = f', at a load average of about {sampled["median"]:.0f}' if sampled else ''
    scoring = ('the whole training set' if cfg['prune_batches'] is None
               else f'{cfg["prune_batches"]} training batches')
    intro = (f"Clip & Concat on scikit-learn's handwritten digits (`--data-set DIGITS`: 1,437 training and 360 "
             f"validation images, 32×32): the mini reproduction of `make demo`, repeated over seeds and prune "
             f"rates. Prune rates {rates}; Taylor attention importance and random masks; accuracy of the pruned "
             f"model before finetuning and after {ft} of soft distillation from the dense teacher; seeds {seeds}.")
    how = [
        f"Command: `{command}` (`make study` runs `python demo/study.py` without flags), at commit "
        f"{results['git']}.",
        f"Machine: {m['cpu']}, {m['cpu_cores']} CPU cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"timm {m['timm']}, Python {m['python']}. Load average (1/5/15 min) at the start "
        f"{results['load_average']['start']}, at the end {results['load_average']['end']}{during}. The study "
        f"itself keeps about 1-2 cores busy; a higher load means other work shared the machine and made the "
        f"times longer.",
        f"Wall time: **{minutes:.1f} minutes** ({wall:.0f} s): teacher {t['teacher']:.0f} s"
        f"{' (reused from an earlier run: its training is not in this time)' if results['teacher']['reused'] else ''}"
        f", {runs_per_stage} prune runs {t['prune']:.0f} s, {runs_per_stage} finetuning runs {t['finetune']:.0f} s.",
        f"The teacher (`{demo.MODEL}`, {epochs_text(cfg['teacher_epochs'])} from scratch, seed {TEACHER_SEED}) "
        f"is trained **once** for all runs, with the demo's recipe and seed{same_as_demo}. Training it once per "
        f"seed would add {epochs_text(cfg['teacher_epochs'])} of training for every seed, and the question is "
        f"about the masks, not the teacher; the spread over seeds below is therefore that of the masks, the "
        f"scoring and the finetuning around one teacher.",
        "The **seed** of a run is the `--seed` of its `finetune.py --prune` and finetuning commands: it draws "
        "the random masks, orders and shifts the training images the Taylor scores are summed over (so each "
        "seed's Taylor masks are planned from its own scoring pass and saved in its own file), and orders and "
        "shifts the images of the finetuning. Taylor and random runs of the same seed share that data order, "
        "which is why the comparison is paired by seed.",
        f"Recipe (the demo's, every flag it acts on explicit): `{' '.join(cfg['recipe'])}`; finetuning "
        f"`--lr {cfg['finetune_lr']} --warmup-epochs 0`, {ft}, `{' '.join(cfg['distillation'])}`; Taylor scores "
        f"over {scoring}. Accuracy after finetuning is the last epoch's, not the best epoch's on the validation "
        f"set.",
        "Every run is in `results.json` (`runs`: prune_rate, prune_mode, seed, finetuned, acc1, gflops, kept "
        "tokens per block, the masks' sha1, the checkpoint), with the cells and the paired comparisons below.",
    ]
    note = ("One validation image is 0.28 points of accuracy. " + (
        f"The interval is the two-sided {level}% Student t-interval of the mean of the {n_seeds} paired differences "
        f"(Taylor minus random, same seed), with {n_seeds - 1} degree{'s' if n_seeds != 2 else ''} of freedom: with "
        f"so few seeds it is wide, and it says nothing about other teachers." if n_seeds > 1 else
        "With one seed there is one paired difference (Taylor minus random) and no interval: a t-interval needs at "
        "least two seeds, so these runs cannot tell Taylor and random apart."))
    readme = (f"**Taylor against random, over seeds (`make study`).** One run of the demo cannot say whether "
              f"Taylor masks beat random ones. `{short_command}` ({round(minutes)} minutes on "
              f"{m['cpu_cores']} CPU cores{load}) repeats the demo's prune → distillation-finetune at prune rates "
              f"{rates} with Taylor and with random masks, over seeds {seeds} (one teacher, trained once; the seed "
              f"sets the random masks and the data order of the scoring and of the finetuning), and compares the "
              f"two seed by seed ({level}% t-interval on the paired differences). Before finetuning "
              f"({spread_summary(results['cells'], False)}), {verdict_summary(paired, False)}. After {ft} of "
              f"distillation ({spread_summary(results['cells'], True)}), {verdict_summary(paired, True)}. "
              f"Table and details: [demo/STUDY.md](demo/STUDY.md).")
    parts = ['# Taylor against random masks at mini scale', wrap(intro), '![accuracy against GFLOPs](study.png)',
             '## How these numbers were made', '\n'.join(wrap(b, bullet=True) for b in how),
             '## Results', table, wrap(note),
             '## For README.md',
             'To paste into the top-level README (its links are relative to the repository root, not to this file):',
             '```markdown\n' + wrap(readme) + '\n\n![Taylor against random over seeds](demo/study.png)\n```']
    return '\n\n'.join(parts) + '\n'


def main(argv=None, *, ends_process: bool = False) -> int:
    """study.py's command line (``argv``, or sys.argv's); returns the exit code.  ``ends_process``: run as the
    script (see :func:`run_demo.ends_as_finetune`)."""
    p = get_args_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    chosen = check_args(p, a)
    out = a.out
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    steps = 2 * len(MODES) * len(a.seeds) * len(a.rates)

    def work() -> int:  # (its lines too: standard output that cannot be written is one error line)
        if chosen:
            print_line(f'--quick set: {demo.flags_text(chosen)} (every other value as given or its default)')
        print_line(f'Taylor against random masks: prune rates {", ".join(f"{r:.2f}" for r in a.rates)}, seeds '
                   f'{", ".join(map(str, a.seeds))}; {steps} prune/finetune steps after the teacher. The commands '
                   f'and finetune.py\'s output are in each stage\'s stdout.txt (its evaluations\' in eval.txt) under '
                   f'{out}/')
        return run_study(a, argv, t0)
    return demo.ends_as_finetune(work, 'study', out, a.fresh, ends_process)


def run_study(a: argparse.Namespace, argv: List[str], t0: float) -> int:
    """The runs, the summary and the files, for checked arguments."""
    out = a.out
    load_start = load_average()
    with LoadSampler() as load:
        teacher, runs, timings = run_all(a, out)
    demo.begin_stage('the summary (the table, the figure, the files)')
    cells, paired = summarise(runs, a.seeds, a.rates, a.finetune_epochs)
    table = markdown(teacher, cells, paired, a.seeds, a.finetune_epochs)
    plot(teacher, runs, cells, os.path.join(out, OUTPUT_FILES['figure']), a.finetune_epochs)
    timings['total'] = time.time() - t0
    results = {
        'config': {'seeds': list(a.seeds), 'rates': [float(r) for r in a.rates], 'modes': list(MODES),
                   'teacher_epochs': a.teacher_epochs, 'teacher_lr': a.teacher_lr, 'teacher_seed': TEACHER_SEED,
                   'teacher': 'trained once for all runs', 'finetune_epochs': a.finetune_epochs,
                   'finetune_lr': a.finetune_lr, 'prune_batches': a.prune_batches, 'quick': a.quick,
                   'recipe': list(demo.RECIPE), 'distillation': list(demo.DISTILL),
                   'confidence': CONFIDENCE, 'acc1': 'last epoch; pruned rows before finetuning are the --prune '
                                                     'evaluation'},
        'teacher': teacher, 'runs': runs, 'cells': cells, 'paired': paired,
        'sentences': [c['sentence'] for c in paired],
        'timings_s': timings, 'machine': machine(), 'git': git_revision(),
        'load_average': {'start': load_start, 'end': load_average(), 'one_minute_during': load.summary()},
        'command': ['python', 'demo/study.py'] + argv,
    }
    assert all(tuple(r) == RUN_KEYS for r in runs)
    write_text_atomic(os.path.join(out, OUTPUT_FILES['results']), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(out, OUTPUT_FILES['table']), table + '\n')
    write_text_atomic(os.path.join(out, OUTPUT_FILES['report']), report(argv, results, table))

    print_line()
    print_line(table)
    print_line()
    print_line(f'Files: {out}/results.json, {out}/results.md, {out}/study.png, {out}/STUDY.md')
    print_line(f'Total time: {clock(timings["total"])} (teacher {timings["teacher"]:.0f} s, '
               f'prune {timings["prune"]:.0f} s, finetune {timings["finetune"]:.0f} s), '
               f'finished {datetime.datetime.now():%Y-%m-%d %H:%M}')
    return 0


if __name__ == '__main__':
    end_script(main(ends_process=True))
