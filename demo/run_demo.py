"""The mini reproduction on real images: Clip & Concat on scikit-learn's handwritten digits, end to end.

    python demo/run_demo.py            # or: make demo   (about 5 minutes on 2 quiet CPU cores)
    python demo/run_demo.py --quick    # a few epochs, for the tests

Every stage goes through finetune.py's own code (``finetune.run`` on parsed command lines, printed as
``$ python finetune.py ...``), exactly as on ImageNet, with ``--data-set DIGITS``:

1. train a small DeiT-shaped teacher (``deit_digits_patch4_32``) from scratch  -> <out>/teacher/
2. prune it: Taylor attention at 0.25 and 0.40, random at 0.25; evaluate each   -> <out>/prune_<mode>_<rate>/
3. finetune each pruned model with soft distillation from the teacher          -> <out>/finetune_<mode>_<rate>/
4. GFLOPs and images/s, pruned and dense timed interleaved (--speed-only)      -> <out>/speed_<mode>_<rate>.txt
5. <out>/results.json, and a Markdown table in the Model Zoo's format, printed; <out>/details.json: the stages'
   times, the timing runs' figures (the speed-ups) and the arguments
6. <out>/masks.png: the patches each block keeps (demo/draw_masks.py)
7. TensorBoard: every training/pruning stage in its directory, the summary in <out>/summary/
   (``tensorboard --logdir runs/demo``)

The full output of each finetune.py call is in ``<stage dir>/stdout.txt`` (of its --eval calls in
``<stage dir>/eval.txt``, of the timings in ``<out>/speed_<mode>_<rate>.txt``); the console shows a summary.
A teacher already trained in <out>/teacher/ with the same number of epochs, learning rate and seed (and the same
data, batch and recipe, as its checkpoint records them) is reused (an unfinished one is continued); every other
stage is redone.

Every argument is checked before any work starts: a bad one is one ``error: ...`` line and exit code 2.
"""
import os
import sys

# Two cores shared with other work: OpenMP threads that spin while waiting make a busy machine 10x slower.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'demo')):
    if path not in sys.path:
        sys.path.insert(0, path)

import finetune  # noqa: E402
import models  # noqa: E402
from utils import (TensorBoard, UserError, check_output_dir, check_tensorboard_dir, checkpoint_args,  # noqa: E402
                   load_checkpoint_file, one_line, print_line, write_text_atomic)
from utils.cli import AT_LEAST_ONE, EXIT_USER_ERROR, POSITIVE, OneLineParser, Range, check_numbers  # noqa: E402
from utils.signals import Terminated, end_script, say_stopped, sigterm_unwinds  # noqa: E402

MODEL = 'deit_digits_patch4_32'
CONFIGS = [('attn', 0.25), ('attn', 0.40), ('random', 0.25)]  # (prune mode, prune rate)
COMPARED_RATE = 0.25  # the rate of CONFIGS pruned both ways (Taylor and random): the verdict lines compare them
ROW_KEYS = ('name', 'prune_mode', 'prune_rate', 'finetuned', 'acc1', 'gflops', 'throughput')
# The training recipe for this small shape: AdamW, label smoothing 0.1, +-2 px shifts (built into DIGITS), batch 64,
# cosine schedule. Every flag the runs act on is given here, even where it equals the CLI's current default, so that
# a change of finetune.py's defaults (e.g. to the paper's ImageNet recipe) does not change the demo; a flag they do
# not act on is left out, as finetune.py would note it as having no effect (the step and plateau schedules' flags
# under cosine, the cool-down after --final_finetune, momentum with adamw, DIGITS' fixed transform's --aa and
# --reprob, repeated augmentation in one process). --lr and the warm-up (WARMUP_LR where there is one) are given
# per stage. --uniform-lr: every parameter group follows the schedule (the paper's finetuning keeps weight
# matrices at 1e-6, which would leave a teacher trained from scratch untrained).
RECIPE = ['--uniform-lr', '--opt', 'adamw', '--opt-eps', '1e-8', '--weight-decay', '0.05', '--smoothing', '0.1',
          '--unscale-lr', '--sched', 'cosine', '--min-lr', '1e-5', '--mixup', '0', '--cutmix', '0', '--drop', '0',
          '--drop-path', '0', '--no-model-ema']
WARMUP_LR = ['--warmup-lr', '1e-6']  # (with --warmup-epochs 0 it has no effect: given only with a warm-up)
# Soft distillation from the dense teacher, as in the paper's finetuning.
DISTILL = ['--distillation-type', 'soft', '--distillation-alpha', '0.5', '--distillation-tau', '1.0']


MAX_MASK_ROWS = 32  # draw_masks.MAX_ROWS (a test keeps them equal; draw_masks loads matplotlib, imported to draw)
# What --quick sets, for each of these flags not given on the command line (a flag given keeps its value).
QUICK = {'teacher_epochs': 2, 'finetune_epochs': 1, 'prune_batches': 4, 'speed_repeats': 5}


def flags_text(values: Dict[str, object]) -> str:
    """``{'teacher_epochs': 2, 'seeds': [0, 1]}`` as the command line says it: '--teacher-epochs 2, --seeds 0 1'."""
    return ', '.join(f'--{dest.replace("_", "-")} '
                     + (' '.join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
                     for dest, value in values.items())


def apply_quick(a: argparse.Namespace, quick: Dict[str, object]) -> Dict[str, object]:
    """``--quick``: the values of ``quick`` for the flags the command line did not give (``a.given``, kept by the
    parser); a flag given keeps its value, so that --quick never overrides what was asked. Returns what it set."""
    given = getattr(a, 'given', frozenset())
    chosen = {dest: value for dest, value in quick.items() if dest not in given}
    for dest, value in chosen.items():
        setattr(a, dest, list(value) if isinstance(value, (list, tuple)) else value)
    return chosen


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser('demo/run_demo.py', description='Clip & Concat mini reproduction on scikit-learn digits')
    p.add_argument('--out', default=os.path.join('runs', 'demo'), help='output directory (default %(default)s)')
    p.add_argument('--teacher-epochs', default=30, type=int,
                   help='epochs of dense teacher training (default %(default)s)')
    p.add_argument('--teacher-lr', default=1e-3, type=float,
                   help='learning rate of the teacher, cosine schedule (default %(default)s)')
    p.add_argument('--finetune-epochs', default=8, type=int,
                   help='epochs of distillation finetuning per model (default %(default)s)')
    p.add_argument('--finetune-lr', default=5e-4, type=float,
                   help='learning rate of the finetuning, cosine schedule (default %(default)s)')
    p.add_argument('--prune-batches', default=None, type=int,
                   help='score at most this many training batches (default: all of them)')
    p.add_argument('--speed-repeats', default=30, type=int,
                   help='timings of each model, the median reported (default %(default)s)')
    p.add_argument('--num-images', default=4, type=int,
                   help=f'rows of masks.png (1 to {MAX_MASK_ROWS}, default %(default)s)')
    p.add_argument('--quick', action='store_true',
                   help=f'checks the plumbing in about a minute: {flags_text(QUICK)}, each where not given '
                        f'(a value given wins)')
    p.add_argument('--fresh', action='store_true', help='retrain the teacher even if <out>/teacher has one')
    p.add_argument('--device', default=None, help='cpu or cuda (default: the CLI\'s, cuda when available)')
    p.add_argument('--seed', default=0, type=int,
                   help='seeds the random streams and the data order of every stage (default %(default)s)')
    p.add_argument('--verbose', action='store_true', help='show every line finetune.py prints')
    return p


# Every numeric flag of the parser, with what it accepts (check_numbers refuses a flag missing here).
NUMERIC_FLAGS: Dict[str, Range] = {
    'teacher_epochs': AT_LEAST_ONE, 'teacher_lr': POSITIVE, 'finetune_epochs': AT_LEAST_ONE,
    'finetune_lr': POSITIVE, 'prune_batches': AT_LEAST_ONE, 'speed_repeats': AT_LEAST_ONE,
    'num_images': Range(1, MAX_MASK_ROWS), 'seed': Range(0, 2 ** 32 - 1),
}


def check_device(device: Optional[str]) -> None:
    """``--device``, if given, is cpu or cuda (cuda:N), and CUDA is there when asked for."""
    if device is None:
        return
    if not re.fullmatch(r'cpu|cuda(:\d+)?', device):
        raise UserError(f'--device {device}: use cpu or cuda (cuda:N for one GPU of several)')
    finetune.resolve_device(device)


def validate_args(a: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Refuse a bad command line before any work starts (nothing trained, no file or directory written)."""
    check_numbers(a, parser or get_args_parser(), NUMERIC_FLAGS)
    check_device(a.device)
    check_output_dir(a.out, '--out')  # (an existing file there is refused too)
    check_tensorboard_dir(a.out, '--out')  # (each stage writes its scalars in a folder of it)
    check_nothing_in_the_way(a.out, *planned_outputs(a.out))


def check_nothing_in_the_way(out: str, folders: List[str], files: List[str], script: str = 'demo') -> None:
    """No file where one of ``folders`` goes and no folder where one of ``files`` goes: a stage found it in its way
    only when it wrote there, after the work before it."""
    for path in [f for f in folders if os.path.lexists(f) and not os.path.isdir(f)] + \
            [f for f in files if os.path.isdir(f)]:
        kind = 'a file' if os.path.isdir(path) else 'a folder'
        raise UserError(f'--out {out}: {path} is in the way (the {script} writes {kind} there): move it away')


def planned_outputs(out: str) -> Tuple[List[str], List[str]]:
    """(the folders, the files) the demo writes under ``out``, each stage's: those of :func:`output_paths`."""
    folders, files = output_paths(out)
    return list(folders.values()), list(files.values()) + teacher_logs(folders['teacher'])


def teacher_logs(teacher_dir: str) -> List[str]:
    """The logs :func:`train_teacher` appends to in ``teacher_dir``, which it keeps (not emptied first, as the
    other stages' folders are): a folder there stopped the demo in a traceback once the teacher stage began."""
    return [os.path.join(teacher_dir, name) for name in ('stdout.txt', 'eval.txt')]


TEACHER_DIR = 'teacher'  # <out>/teacher/: the dense teacher, which a later run reuses (the study's too)


def stage_dir(out: str, stage: str, mode: str, rate: float) -> str:
    """<out>/<stage>_<mode>_<rate>/: the folder of one prune mode and rate's 'prune' or 'finetune' stage."""
    return os.path.join(out, f'{stage}_{rate_tag(mode, rate)}')


def output_paths(out: str) -> Tuple[Dict[object, str], Dict[object, str]]:
    """(folders, files): every path the demo writes under ``out``, by what it holds. Folders: 'teacher',
    'summary' and, for each of CONFIGS' rate_tag, ('prune', tag) and ('finetune', tag); files: 'results' and
    'details' (.json) and, per tag, ('speed', tag) and ('masks', tag) (the first config's is masks.png). :func:`run`
    writes these and :func:`planned_outputs` checks them before any work, so the two cannot disagree."""
    folders = {'teacher': os.path.join(out, TEACHER_DIR), 'summary': os.path.join(out, 'summary')}
    files = {'results': os.path.join(out, 'results.json'), 'details': os.path.join(out, 'details.json')}
    for i, (mode, rate) in enumerate(CONFIGS):
        tag = rate_tag(mode, rate)
        folders.update({(stage, tag): stage_dir(out, stage, mode, rate) for stage in ('prune', 'finetune')})
        files[('speed', tag)] = os.path.join(out, f'speed_{tag}.txt')
        files[('masks', tag)] = os.path.join(out, 'masks.png' if i == 0 else f'masks_{tag}.png')
    return folders, files


# ----------------------------------------------------------------------------------------------------------
# running finetune.py in-process

class _StageOutput:
    """Everything the CLI prints goes to ``log_path``; the console gets per-epoch accuracy and key lines."""
    KEY_LINES = ('Clipped ', 'Kept tokens', 'FLOPs', 'Throughput', 'Speed-up', 'Resumed', 'Nothing to do',
                 'Training time', 'No --resume')

    def __init__(self, log_path: str, tag: str, console, verbose: bool):
        self.file = open(log_path, 'a')
        self.tag, self.console, self.verbose = tag, console, verbose
        self.buffer, self.epoch, self.epoch_start = '', None, time.time()
        self.total_epochs: Optional[int] = None

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.verbose:
            self.console.write(text)
            return len(text)
        self.buffer += text
        while '\n' in self.buffer:
            line, self.buffer = self.buffer.split('\n', 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        m = re.match(r'Epoch: \[(\d+)\]', line)
        if m and int(m.group(1)) != self.epoch:
            self.epoch, self.epoch_start = int(m.group(1)), time.time()
            return
        m = re.match(r'Finetuning for epochs (\d+)\.\.(\d+)', line)
        if m:
            self.total_epochs = int(m.group(2)) + 1
        m = re.match(r'Accuracy of the network on the (\d+) test images: ([\d.]+)%', line)
        if m and self.epoch is not None:
            of = f'/{self.total_epochs}' if self.total_epochs else ''
            self._say(f'epoch {self.epoch + 1}{of}: val acc@1 {m.group(2)}% '
                      f'({time.time() - self.epoch_start:.1f} s)')
        elif m:
            self._say(f'acc@1 {m.group(2)}% on {m.group(1)} validation images')
        elif line.startswith(self.KEY_LINES):
            self._say(line)

    def _say(self, text: str) -> None:
        self.console.write(f'  [{self.tag}] {text}\n')
        self.console.flush()

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()

    def fileno(self) -> int:  # (the console's: print_line turns it to /dev/null once it cannot be written)
        return self.console.fileno()

    def close(self) -> None:
        if self.buffer:
            self._line(self.buffer)
        self.file.close()


class StageDiverged(Exception):
    """A stage stopped on a non-finite loss or weights (finetune.NonFiniteLossError), its stage and log named."""


def cli(argv: List[str], log_path: str, tag: str, verbose: bool, echo: bool = True) -> Dict[str, float]:
    """``python finetune.py argv`` in this process; returns the stats dict of the run_* function.

    The command is printed on the console (``echo``) or, when not, as the first line of its log. What finetune.py
    would end with as one ``error:`` line comes out as UserError or StageDiverged, naming the stage and its log,
    for :func:`main` to end as finetune.py does (exit code 2, or finetune.EXIT_DIVERGED).
    """
    command = '$ python finetune.py ' + ' '.join(shlex.quote(arg) for arg in argv)  # (a path with a space)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    if echo:
        print_line(command)
    else:
        with open(log_path, 'a') as f:
            f.write(command + '\n')
    args = finetune.get_args_parser().parse_args(argv)
    out = _StageOutput(log_path, tag, sys.stdout, verbose)
    try:
        with contextlib.redirect_stdout(out):
            return finetune.run(args)
    except UserError as e:
        raise UserError(f'stage {tag}: {one_line(e)} (full output: {log_path})') from None
    except finetune.NonFiniteLossError as e:
        raise StageDiverged(f'stage {tag} diverged: {one_line(e)} (full output: {log_path})') from None
    finally:
        out.close()


# ----------------------------------------------------------------------------------------------------------
# the stages, shared with demo/study.py: each is one or two finetune.py commands

def common_args(seed: int, device: Optional[str]) -> List[str]:
    """The flags every stage shares: the model, the data, batch 64, in-process data loading, the seed."""
    return (['--model', MODEL, '--data-set', 'DIGITS', '--batch-size', '64', '--num_workers', '0',
             '--print-freq', '1000', '--seed', str(seed)] + (['--device', device] if device else []))


def evaluation_args(common: List[str]) -> List[str]:
    """``common_args`` without ``--seed``, which an evaluation does not read (finetune.py would note it)."""
    return without(common, '--seed')


def speed_args(common: List[str]) -> List[str]:
    """``common_args`` without the flags ``--speed-only`` does not read (it times random images and prints no
    progress: finetune.py would note them)."""
    return without(common, '--data-set', '--num_workers', '--print-freq')


def without(argv: List[str], *flags: str) -> List[str]:
    """``argv`` less each of ``flags`` and the value after it."""
    for flag in flags:
        at = argv.index(flag)
        argv = argv[:at] + argv[at + 2:]
    return argv


def teacher_command(epochs: int, lr: float, common: List[str]) -> List[str]:
    """The flags the teacher is trained with (its folder and a --resume aside)."""
    warmup = ['--warmup-epochs', '2'] + WARMUP_LR if epochs > 5 else ['--warmup-epochs', '0']
    return common + RECIPE + ['--lr', str(lr)] + warmup + ['--final_finetune', str(epochs)]


# Flags that say where and how a run goes, not what it trains (and the model, which a run records under its cc_
# name: teacher_check compares it so).
NOT_RECIPE = ('output_dir', 'resume', 'device', 'num_workers', 'print_freq', 'model')


def recipe_difference(stored: dict, command: List[str]) -> Optional[str]:
    """How the ``args`` a checkpoint records differ from what the flags of ``command`` set (the data set, the
    batch, the recipe: every flag but NOT_RECIPE), for the flags it records; None where they agree."""
    parser = finetune.get_args_parser()
    wanted = vars(parser.parse_args(command))
    for token in command:
        action = parser._option_string_actions.get(token)
        if action is None or action.dest in NOT_RECIPE or action.dest not in stored:
            continue
        have, want = stored[action.dest], wanted[action.dest]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (have, want))
        if not (math.isclose(have, want, rel_tol=1e-9, abs_tol=0.0) if numbers else have == want):
            return f'{action.dest} {have!r} instead of {want!r}'
    return None


def teacher_check(path: str, epochs: int, lr: float, seed: int,
                  command: Optional[List[str]] = None) -> Tuple[str, Optional[str]]:
    """(state, why): the state, 'none', 'done', 'partial' (same schedule, unfinished) or 'other' (another model,
    number of epochs, learning rate or seed, as stored in its ``args``; the demo passes --unscale-lr, so the
    stored ``lr`` is the one given; or, with ``command``, the teacher's training flags, another value of a flag
    it sets: :func:`recipe_difference`; or a pruned model, whose blocks clip tokens), and, for 'other', how the
    checkpoint at ``path`` differs from a teacher trained for ``epochs`` epochs at ``lr`` with ``seed``."""
    if not os.path.isfile(path):
        return 'none', None
    try:
        ckpt = load_checkpoint_file(path)
    except UserError as e:
        return 'other', f'it cannot be read: {one_line(e)}'
    stored = checkpoint_args(ckpt)
    stored_lr = stored.get('lr')
    stored_model = stored.get('model')
    if not isinstance(stored_model, str) or models.base_name(stored_model) != MODEL:  # (cc_ or not: one model)
        why = f'another model, {stored_model}'
    elif stored.get('final_finetune') != epochs:
        why = f'{stored.get("final_finetune")} epochs instead of {epochs}'
    elif (isinstance(stored_lr, bool) or not isinstance(stored_lr, (int, float))
          or not math.isclose(stored_lr, lr, rel_tol=1e-9, abs_tol=0.0)):
        why = f'learning rate {stored_lr} instead of {lr}'
    elif stored.get('seed') != seed:
        why = f'seed {stored.get("seed")} instead of {seed}'
    elif command is not None and (difference := recipe_difference(stored, command)):
        why = difference
    elif isinstance(ckpt.get('epoch'), bool) or not isinstance(ckpt.get('epoch'), int):
        why = f'its last epoch is {ckpt.get("epoch")!r}, not a whole number'
    else:
        try:
            model, _ = models.build_model_from_checkpoint(path, finetune.cc_model_name(MODEL), warn=lambda line: None,
                                                          checkpoint=ckpt)  # (the contents read above: the file once)
        except UserError as e:
            return 'other', f'its weights cannot be used: {one_line(e)}'
        kept = models.kept_token_counts(model)
        if any(k != model.num_tokens for k in kept):  # (a finetuning's checkpoint.pth records a teacher's schedule)
            return 'other', f'a pruned model (its blocks keep {kept} of {model.num_tokens} tokens), not a dense teacher'
        return ('done' if ckpt['epoch'] >= epochs - 1 else 'partial'), None
    return 'other', why


def seed_of(common: List[str]) -> int:
    """The ``--seed`` of a ``common_args`` list."""
    return int(common[common.index('--seed') + 1])


def train_teacher(teacher_dir: str, epochs: int, lr: float, common: List[str], fresh: bool = False,
                  verbose: bool = False, echo: bool = True) -> Tuple[str, float, bool]:
    """Train the dense teacher from scratch in ``teacher_dir`` (or reuse / continue one trained there with the
    same number of epochs, learning rate and seed, the ``--seed`` of ``common``, and recipe) and evaluate it:
    (checkpoint path, acc@1 on the validation set, whether a teacher trained to the end was reused as it was)."""
    teacher = os.path.join(teacher_dir, 'checkpoint.pth')
    seed = seed_of(common)
    command = teacher_command(epochs, lr, common)
    state, why = ('other', None) if fresh else teacher_check(teacher, epochs, lr, seed, command)
    if state == 'other' and os.path.exists(teacher_dir):
        if fresh:  # (not checked: whatever it holds is retrained, as asked)
            print_line(f'   (--fresh: training a new teacher in place of what {teacher_dir} holds)')
        else:
            print_line(f'   ({teacher_dir} holds another teacher{f" ({why})" if why else ""}; training a new one)')
        remove_folder(teacher_dir)
    if state == 'done':
        print_line(f'   reusing the teacher already trained in {teacher} ({epochs} epochs, lr {lr}, seed {seed}); '
                   f'--fresh retrains it')
    else:
        resume = ['--resume', teacher] if state == 'partial' else []
        if resume:
            print_line(f'   continuing the unfinished teacher in {teacher}')
        cli(command + ['--output_dir', teacher_dir] + resume,
            os.path.join(teacher_dir, 'stdout.txt'), 'teacher', verbose, echo)
    acc = cli(evaluation_args(common) + ['--eval', '--resume', teacher], os.path.join(teacher_dir, 'eval.txt'),
              'teacher eval', verbose, echo)['acc1']
    return teacher, acc, state == 'done'


def remove_folder(path: str, ignore_errors: bool = False) -> None:
    """A stage's folder removed for the stage to write it anew; one that is a symbolic link is removed as a link (the
    folder it names is not the output's: left as it is; rmtree refuses a link)."""
    if os.path.islink(path):
        os.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=ignore_errors)


def fresh_summary(folder: str) -> TensorBoard:
    """The demo's TensorBoard writer on ``folder`` emptied first (an earlier run's events would mix in); a folder
    that is a symbolic link is replaced by one of its own, as a stage's folder is (:func:`remove_folder`)."""
    remove_folder(folder, ignore_errors=True)
    return TensorBoard(folder)


def prune(teacher: str, mode: str, rate: float, out_dir: str, common: List[str], prune_batches: Optional[int],
          tag: str, verbose: bool = False, echo: bool = True) -> dict:
    """``--prune`` the teacher into ``out_dir`` (emptied first) and evaluate it there, before any finetuning.

    Returns ``path`` (pruned_<rate>.pth), ``acc1``, and what the CLI logged in prune_log.txt: ``gflops``
    (as the paper counts them) and ``channels`` (kept tokens per block, class token included).
    """
    remove_folder(out_dir, ignore_errors=True)
    extra = ['--prune-batches', str(prune_batches)] if prune_batches and mode == 'attn' else []  # random: no scoring
    stats = cli(common + ['--prune', '--prune_mode', mode, '--prune_rate', str(rate), '--resume', teacher,
                          '--output_dir', out_dir] + extra, os.path.join(out_dir, 'stdout.txt'), tag, verbose, echo)
    record = last_json_line(os.path.join(out_dir, 'prune_log.txt'))
    return {'path': os.path.join(out_dir, finetune.pruned_file_name(mode, float(rate))), 'acc1': float(stats['acc1']),
            'gflops': float(record['gflops']), 'channels': [int(c) for c in record['channels']]}


def distill(pruned: str, teacher: str, out_dir: str, common: List[str], epochs: int, lr: float, tag: str,
            verbose: bool = False, echo: bool = True) -> dict:
    """Finetune a pruned model with soft distillation from the dense teacher in ``out_dir`` (emptied first),
    then ``--eval`` its last epoch. Returns ``path`` (checkpoint.pth, the last epoch, not the best on val),
    ``acc1`` and ``gflops`` (from the last line of the run's log.txt)."""
    remove_folder(out_dir, ignore_errors=True)
    cli(common + RECIPE + ['--resume', pruned, '--teacher-path', teacher] + DISTILL +
        ['--lr', str(lr), '--warmup-epochs', '0', '--final_finetune', str(epochs), '--output_dir', out_dir],
        os.path.join(out_dir, 'stdout.txt'), tag, verbose, echo)
    checkpoint = os.path.join(out_dir, 'checkpoint.pth')
    acc = cli(evaluation_args(common) + ['--eval', '--resume', checkpoint], os.path.join(out_dir, 'eval.txt'),
              f'{tag} eval', verbose, echo)['acc1']
    return {'path': checkpoint, 'acc1': float(acc),
            'gflops': float(last_json_line(os.path.join(out_dir, 'log.txt'))['gflops'])}


def last_json_line(path: str) -> dict:
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1])


def rate_tag(mode: str, rate: float) -> str:
    return f'{mode}_{rate:.2f}'


def row_name(mode: str, rate: float, finetuned: bool) -> str:
    name = f'C&C-digits-{round(rate * 100)} ({"Taylor" if mode == "attn" else "random"})'
    return name + (' + KD finetune' if finetuned else '')


def markdown_table(rows: List[dict], speedups: Dict[str, float]) -> str:
    """The Model Zoo's columns (model, acc@1, GFLOPs, images/s, speed-up), then how the row was made."""
    lines = ['| model | acc@1 | GFLOPs | images/s | speed-up | prune mode | prune rate | finetuned |',
             '|---|---|---|---|---|---|---|---|']
    for r in rows:
        s = speedups.get(r['name'])
        lines.append(f'| {r["name"]} | {r["acc1"]:.1f} | {r["gflops"]:.3f} | {r["throughput"]:.0f} | '
                     f'{"–" if s is None else f"{s:.2f}"} | {r["prune_mode"]} | {r["prune_rate"]:.2f} | '
                     f'{"yes" if r["finetuned"] else "no"} |')
    return '\n'.join(lines)


def verdict_line(label: str, taylor: float, rand: float) -> str:
    """'At prune rate 0.25, <label>: Taylor 81.11% beats random 80.00% (+1.11 points)' (the rate
    :data:`COMPARED_RATE`, at which both rows were pruned): each accuracy rounded to the two decimals printed (one
    image of the 360 is 0.28 points, so one decimal could show a gap its figures do not) before the gap and the
    verdict are taken, so that the gap shown is the gap between the figures shown."""
    taylor, rand = round(taylor, 2), round(rand, 2)
    diff = round(taylor - rand, 2)  # (the float difference of two 2-decimal figures is a rounding error off)
    verdict = 'beats' if diff > 0 else ('ties with' if diff == 0 else 'loses to')
    return (f'At prune rate {COMPARED_RATE:g}, {label}: Taylor {taylor:.2f}% {verdict} random {rand:.2f}% '
            f'({diff:+.2f} points)')


def main(argv=None, *, ends_process: bool = False) -> int:
    """run_demo.py's command line (``argv``, or sys.argv's); returns the exit code.  ``ends_process``: run as the
    script (see :func:`ends_as_finetune`)."""
    parser = get_args_parser()
    a = parser.parse_args(argv)
    try:
        validate_args(a, parser)
    except UserError as e:
        print(f'error: {one_line(e)}', file=sys.stderr)
        return EXIT_USER_ERROR
    chosen = apply_quick(a, QUICK) if a.quick else {}

    def work() -> int:  # (its lines too: standard output that cannot be written is one error line)
        if chosen:
            print_line(f'--quick set: {flags_text(chosen)} (every other value as given or its default)')
        return run(a)
    return ends_as_finetune(work, 'demo', a.out, a.fresh, ends_process)


def ends_as_finetune(work: Callable[[], int], script: str, out: str, fresh: bool = False,
                     ends_process: bool = False) -> int:
    """``work()`` (the demo's or the study's stages), ended as finetune.py ends: a user error found midway (e.g.
    a disk that filled while writing a result) or a diverged stage is one ``error:`` line and finetune.py's exit
    code, Ctrl-C (SIGTERM) one line saying what running ``script`` again does and exit code 130 (143) (with
    ``fresh``, a run of --fresh: again without it, as --fresh would retrain the teacher it kept).  ``ends_process``:
    run as the script (see :func:`utils.signals.sigterm_unwinds`)."""
    _STAGE['now'] = ''
    with sigterm_unwinds(ends_process):
        try:
            return work()
        except UserError as e:
            print(f'error: {one_line(e)}', file=sys.stderr)
            return EXIT_USER_ERROR
        except StageDiverged as e:
            print(f'error: {e}', file=sys.stderr)
            return finetune.EXIT_DIVERGED
        except (KeyboardInterrupt, Terminated) as e:
            again = 'again without --fresh' if fresh else 'again'
            return say_stopped(e, f'run the {script} {again} to go on (a teacher in {os.path.join(out, TEACHER_DIR)}, '
                                  f'trained wholly or in part, is reused; every other stage is redone)',
                               during=_STAGE['now'])


_STAGE = {'now': ''}  # the stage under way in ends_as_finetune's work, as the line of a stop names it


def begin_stage(now: str, header: str = '') -> None:
    """Notes ``now`` ('stage 2 (prune)') as the stage under way, which the line of a stop names
    (:func:`ends_as_finetune`), and prints the stage's ``header`` line if given."""
    _STAGE['now'] = now
    if header:
        print_line(header)


def demo_stage(number: int, name: str, what: str = '') -> None:
    """The demo's stage ``number`` (``name``) begins: its header '== <number>. <what>' if ``what`` is given."""
    begin_stage(f'stage {number} ({name})', what and f'== {number}. {what}')


def run(a: argparse.Namespace) -> int:
    """The demo's stages, for checked arguments.  Every stage but the teacher is redone; each stage replaces only
    its own directory, when it starts (the finetune CLI refuses an --output_dir holding a checkpoint), so a run
    that stops early (a diverged stage, Ctrl-C) leaves the results of an earlier run it did not reach."""
    out = a.out
    folders, files = output_paths(out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    timings: Dict[str, float] = {}
    common = common_args(a.seed, a.device)

    # 1. the dense teacher ------------------------------------------------------------------------------
    demo_stage(1, 'teacher', f'teacher: {MODEL} trained from scratch for {a.teacher_epochs} epochs')
    teacher, teacher_acc, _ = train_teacher(folders['teacher'], a.teacher_epochs, a.teacher_lr, common,
                                            a.fresh, a.verbose)
    timings['teacher'] = time.time() - t0

    # 2. prune ------------------------------------------------------------------------------------------
    t = time.time()
    demo_stage(2, 'prune', 'prune the teacher (Taylor attention 0.25 / 0.40, random 0.25) and evaluate')
    pruned, before = {}, {}
    for mode, rate in CONFIGS:
        tag = rate_tag(mode, rate)
        p = prune(teacher, mode, rate, folders[('prune', tag)], common, a.prune_batches, f'prune {tag}', a.verbose)
        pruned[tag], before[tag] = p['path'], p['acc1']
    timings['prune'] = time.time() - t

    # 3. finetune with soft distillation ------------------------------------------------------------------
    t = time.time()
    demo_stage(3, 'finetune', f'finetune each pruned model for {a.finetune_epochs} epochs, soft distillation from '
                              f'the teacher')
    after, finetuned = {}, {}
    for mode, rate in CONFIGS:
        tag = rate_tag(mode, rate)
        f = distill(pruned[tag], teacher, folders[('finetune', tag)], common, a.finetune_epochs,
                    a.finetune_lr, f'finetune {tag}', a.verbose)
        finetuned[tag], after[tag] = f['path'], f['acc1']
    timings['finetune'] = time.time() - t

    # 4. speed ------------------------------------------------------------------------------------------
    t = time.time()
    demo_stage(4, 'speed', 'GFLOPs and images/s: each pruned model timed interleaved with the dense model')
    speed = {}
    for mode, rate in CONFIGS:
        tag = rate_tag(mode, rate)
        log = files[('speed', tag)]
        if os.path.isfile(log):
            os.remove(log)  # the log is appended to: an earlier run's timings would precede these
        speed[tag] = cli(speed_args(common) + ['--speed-only', '--resume', finetuned[tag], '--speed-repeats',
                                               str(a.speed_repeats), '--speed-warmup', '5'], log, f'speed {tag}',
                         a.verbose)
    timings['speed'] = time.time() - t

    # 5. results.json and the table ---------------------------------------------------------------------------
    demo_stage(5, 'results')  # its header once the files are written
    dense_gflops = speed[rate_tag(*CONFIGS[0])]['dense_gflops']
    dense_throughput = statistics.median(s['dense_throughput'] for s in speed.values())
    rows = [{'name': 'DeiT-digits (teacher)', 'prune_mode': 'none', 'prune_rate': 0.0, 'finetuned': False,
             'acc1': teacher_acc, 'gflops': dense_gflops, 'throughput': dense_throughput}]
    speedups = {rows[0]['name']: 1.0}
    for mode, rate in CONFIGS:
        tag = rate_tag(mode, rate)
        for is_ft, acc in ((False, before[tag]), (True, after[tag])):
            row = {'name': row_name(mode, rate, is_ft), 'prune_mode': mode, 'prune_rate': float(rate),
                   'finetuned': is_ft, 'acc1': float(acc), 'gflops': speed[tag]['pruned_gflops'],
                   'throughput': speed[tag]['pruned_throughput']}
            rows.append(row)
            speedups[row['name']] = speed[tag]['speedup']
    assert all(tuple(r) == ROW_KEYS for r in rows)
    write_text_atomic(files['results'], json.dumps({'rows': rows}, indent=2))
    details = {'timings_s': timings, 'speed': speed, 'args': vars(a),
               'acc1_rule': 'last epoch (checkpoint.pth) evaluated with --eval; pruned rows before finetuning '
                            'are the --prune evaluation'}
    # with results.json: a run that stops later (the pictures) leaves no earlier run's timings and args beside it;
    # written again at the end with the timings of the pictures
    write_text_atomic(files['details'], json.dumps(details, indent=2))
    table = markdown_table(rows, speedups)
    print_line(f'== 5. results: {files["results"]} ({len(rows)} rows, the table printed at the end), '
               f'{files["details"]} (times, timings, arguments)')

    # 6. masks.png ------------------------------------------------------------------------------------------
    t = time.time()
    import draw_masks
    import torch
    demo_stage(6, 'masks', 'masks: the patches each block keeps')
    pictures = {}
    for mode, rate in CONFIGS:
        tag = rate_tag(mode, rate)
        model = draw_masks.load_model(finetuned[tag], MODEL)
        images, targets = draw_masks.digits_images(a.num_images)
        with torch.no_grad():
            preds = model(images).argmax(1).tolist()
        labels = [f'digit {t_}\npred {p}' for t_, p in zip(targets, preds)]
        pictures[tag] = draw_masks.draw_masks(model, images, files[('masks', tag)], (0.5,) * 3, (0.5,) * 3,
                                              labels, title=row_name(mode, rate, True))
        print_line(f'   {pictures[tag]}')
    timings['masks'] = time.time() - t

    # 7. TensorBoard summary ------------------------------------------------------------------------------
    demo_stage(7, 'TensorBoard summary')
    tb = fresh_summary(folders['summary'])
    if tb.writer is not None:
        import numpy as np
        from PIL import Image
        for i, r in enumerate(rows):
            tb.scalars({'acc1': r['acc1'], 'gflops': r['gflops'], 'throughput': r['throughput']}, i,
                       prefix='demo/')
        tb.writer.add_text('results', table)
        for tag, path in pictures.items():
            tb.writer.add_image(f'masks/{tag}', np.asarray(Image.open(path).convert('RGB')), 0, dataformats='HWC')
    tb.close()

    timings['total'] = time.time() - t0
    write_text_atomic(files['details'], json.dumps(details, indent=2))
    print_line()
    print_line(f'Clip & Concat on scikit-learn digits ({len(rows)} rows, {out}/results.json); acc@1 on the 360 '
               f'validation images, last epoch; speed-up against the dense model timed interleaved in the same run:')
    print_line()
    print_line(table)
    print_line()
    taylor, rand = rate_tag('attn', COMPARED_RATE), rate_tag('random', COMPARED_RATE)
    for label, res in (('before finetuning', before), ('after finetuning', after)):
        print_line(verdict_line(label, res[taylor], res[rand]))
    others = ', '.join(os.path.basename(p) for p in list(pictures.values())[1:])
    print_line(f'Masks: {files[("masks", rate_tag(*CONFIGS[0]))]}  (also {others})')
    print_line(f'TensorBoard: tensorboard --logdir {out}')
    print_line(f'Total time: {timings["total"]:.0f} s (teacher {timings["teacher"]:.0f}, '
               f'prune {timings["prune"]:.0f}, finetune {timings["finetune"]:.0f}, speed {timings["speed"]:.0f}, '
               f'masks {timings["masks"]:.0f})')
    return 0


if __name__ == '__main__':
    end_script(main(ends_process=True))
