"""The original code's recipe, as its runs actually ran: defaults, per-group learning rates, where the schedule
lands epoch by epoch, the evaluation transform, the scoring inputs, its timing protocol and its four commands
verbatim; a continued run keeps its own settings; train and validation classes are compared."""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import types

import pytest
import timm
import torch
import torchvision

import datasets
import engine
import finetune
import models
import pruning
from conftest import (DIGITS_ARGS, OUT_OF_MEMORY, OUT_OF_MEMORY_FIGURES, ROOT, digits_world, formula_macs,
                      free_port, make_image_folder, no_work, official_checkpoint, run_process_tree, subprocess_env)
from utils import UserError, load_checkpoint_file
from utils.cli import ParsedArgs

pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------------------------------------
# 1. defaults: the original recipe's values

# The original code's pruning/finetuning configuration, flag by flag, as its own pruning parser sets it (DeiT's
# parser with the recipe's changes: lr 0.01, min-lr 1e-6, warmup-lr 1e-5, no warm-up, decay-epochs 15, cool-down
# 30, colour jitter 0.4, repeated augmentation on, and no weight EMA, where DeiT's parser keeps one).
ORIGINAL = {
    'eval': False, 'speed_only': False, 'prune': False, 'prune_mode': 'attn', 'prune_rate': 0.25,
    'final_finetune': 30, 'iter_nums': 12, 'finetune_nums': 1, 'model': 'deit_tiny_patch16_224', 'drop': 0.0,
    'drop_path': 0.1, 'model_ema': False,
    'model_ema_decay': 0.99996, 'model_ema_force_cpu': False, 'opt': 'adamw', 'opt_eps': 1e-8, 'opt_betas': None,
    'clip_grad': None, 'momentum': 0.9, 'weight_decay': 0.05, 'sched': 'cosine', 'lr': 0.01, 'lr_noise': None,
    'lr_noise_pct': 0.67, 'lr_noise_std': 1.0, 'warmup_lr': 1e-5, 'min_lr': 1e-6, 'decay_epochs': 15,
    'warmup_epochs': 0, 'cooldown_epochs': 30, 'patience_epochs': 10, 'decay_rate': 0.1, 'color_jitter': 0.4,
    'aa': 'rand-m9-mstd0.5-inc1', 'smoothing': 0.1, 'train_interpolation': 'bicubic', 'repeated_aug': True,
    'reprob': 0.25, 'remode': 'pixel', 'recount': 1, 'resplit': False, 'mixup': 0.8, 'cutmix': 1.0,
    'cutmix_minmax': None,
    'mixup_prob': 1.0, 'mixup_switch_prob': 0.5, 'mixup_mode': 'batch', 'teacher_path': '',
    'distillation_type': 'none', 'distillation_alpha': 0.5, 'distillation_tau': 1.0, 'finetune': '',
    'data_set': 'IMNET',
    'inat_category': 'name', 'batch_size': 64, 'output_dir': '', 'seed': 0, 'resume': '', 'start_epoch': 0,
    'dist_eval': False, 'num_workers': 10, 'pin_mem': True, 'amp': True, 'print_freq': 10, 'world_size': 1,
    'dist_url': 'env://',
}
# Flags the original does not have: the value that does what it did.
AS_THE_ORIGINAL = {
    'prune_batches': None,       # scores every training batch
    'unscale_lr': False,         # the lr is scaled by batch * world_size / 512
    'uniform_lr': False,         # only parameter group 0 follows the schedule
    'eval_crop_ratio': 1.0,      # Resize([input, input]): the whole image squashed, no crop
    'local_rank': None,          # set by the launcher
    'fast_path': 'none',         # the eager model (the fast inference path is ours, off by default)
    'decay_milestones': [30, 60],  # timm's (--sched multistep, which the original's timm did not have)
}
# Deliberate differences, each explained in the README: {flag: (ours, the original's)}.
DIFFERENT = {
    'teacher_model': (None, 'regnety_160'),      # the teacher is the dense model itself: same as --model
    'device': (None, 'cuda'),                    # cuda when available, else cpu
    'data_path': ('', '/data/imagenet/'),        # a path on the authors' machine
    'input_size': (None, 224),                   # the model's own (224 for DeiT)
    'speed_protocol': ('interleaved', 'original'),
    'speed_dtype': (None, 'fp32'),               # fp16 autocast on CUDA in our protocol
    'speed_repeats': (10, 50),
    'speed_warmup': (3, 0),
}


def test_defaults_are_the_original_recipe():
    defaults = vars(finetune.get_args_parser().parse_args([]))
    expected = {**ORIGINAL, **AS_THE_ORIGINAL, **{k: ours for k, (ours, _) in DIFFERENT.items()}}
    assert set(defaults) == set(expected), 'a flag without its original value in this table'
    assert {k: v for k, v in defaults.items() if v != expected[k]} == {}
    # of the same kind too: 1 == True == 1.0, but a default of 1.0 where a count is read (argparse converts only
    # given values, never a default) or of 1 for a switch is not the original's value
    assert {k: type(v).__name__ for k, v in defaults.items() if type(v) is not type(expected[k])} == {}


def test_every_deliberate_difference_is_explained_in_the_readme():
    with open(os.path.join(ROOT, 'README.md')) as f:
        readme = f.read()
    section = readme[readme.index('### Deliberate differences from the original code'):]
    section = section[:section.index('\n## ')]
    parser = finetune.get_args_parser()
    for dest in DIFFERENT:
        flag = finetune.flag_name(next(a for a in parser._actions if a.dest == dest))
        assert f'`{flag}' in section, f'{flag} differs from the original without a word in the README'


def test_drop_is_dropout_where_the_original_model_had_it():
    """The original model (timm 0.4's ViT) applied --drop after the position embedding, after the attention's
    projection and after both MLP layers, and had no dropout before the head; timm 1.0 spells those
    pos_drop_rate and proj_drop_rate, and its drop_rate is the head's."""
    args = argparse.Namespace(model='deit_tiny_patch16_224', input_size=224, drop=0.3, drop_path=0.2)
    model = finetune.new_model(args, num_classes=10)
    dropouts = {name: m.p for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    expected = {'pos_drop': 0.3, 'head_drop': 0.0}
    for l in range(12):
        expected.update({f'blocks.{l}.attn.attn_drop': 0.0, f'blocks.{l}.attn.proj_drop': 0.3,
                         f'blocks.{l}.mlp.drop1': 0.3, f'blocks.{l}.mlp.drop2': 0.3})
    assert dropouts == expected
    assert model.blocks[11].drop_path1.drop_prob == pytest.approx(0.2)  # the last block gets the full rate


# ----------------------------------------------------------------------------------------------------------
# 2. + 4. parameter groups and their learning rate, epoch by epoch, through the real epoch loop

def epoch_lrs(monkeypatch, args, model, epochs):
    """The lr of every parameter group during each epoch of engine.train_epochs, with the optimizer and
    schedule built as the CLI builds them (training and evaluation themselves stubbed out)."""
    optimizer, schedule = finetune.build_optimizer(args, model)
    seen = []

    def train(model_, criterion, loader, optimizer_, *rest, **kw):
        seen.append([g['lr'] for g in optimizer_.param_groups])
        return {'loss': 0.0, 'lr': optimizer_.param_groups[0]['lr']}

    monkeypatch.setattr(engine, 'train_one_epoch', train)
    monkeypatch.setattr(engine, 'evaluate', lambda *a, **k: {'acc1': 0.0, 'acc5': 0.0, 'loss': 0.0})
    run = engine.Training(model=model, model_without_ddp=model, criterion=None, optimizer=optimizer,
                          lr_scheduler=schedule, scaler=None, amp=False, clip_grad=None, model_ema=None,
                          mixup_fn=None, loader_train=types.SimpleNamespace(sampler=None),
                          loader_val=types.SimpleNamespace(dataset=[]), device=torch.device('cpu'))
    engine.train_epochs(run, 0, epochs, -1.0, lambda *a: None, printer=lambda *a: None)
    return optimizer, seen


def cosine(base, t, total, low=1e-6):
    """timm's cosine schedule at t (no warm-up), written out."""
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / total))


def deit_tiny_groups():
    """timm 0.4.12's rule for DeiT-Ti, written out by name: no weight decay for biases, LayerNorm parameters
    and the model's no_weight_decay() names (pos_embed, cls_token); the weight matrices in the other group."""
    no_decay = {'cls_token', 'pos_embed', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias', 'head.bias'}
    decay = {'patch_embed.proj.weight', 'head.weight'}
    for l in range(12):
        no_decay |= {f'blocks.{l}.{n}' for n in ('norm1.weight', 'norm1.bias', 'attn.qkv.bias', 'attn.proj.bias',
                                                  'norm2.weight', 'norm2.bias', 'mlp.fc1.bias', 'mlp.fc2.bias')}
        decay |= {f'blocks.{l}.{n}' for n in ('attn.qkv.weight', 'attn.proj.weight', 'mlp.fc1.weight',
                                              'mlp.fc2.weight')}
    return no_decay, decay


def group_names(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g['params']} for g in optimizer.param_groups]


@pytest.fixture(scope='module')
def deit_tiny():
    return models.create_model('deit_tiny_patch16_224')


def test_deit_tiny_groups_train_at_the_learning_rates_the_original_ran(monkeypatch, deit_tiny):
    args = finetune.get_args_parser().parse_args([])  # the recipe: lr 0.01, batch 64, weight decay 0.05
    optimizer, lrs = epoch_lrs(monkeypatch, args, deit_tiny, 30)
    no_decay, decay = deit_tiny_groups()
    assert group_names(optimizer, deit_tiny) == [no_decay, decay]
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.0, 0.05]
    scaled = 0.01 * 64 / 512
    # epoch k runs at t = k - 1 (epochs 0 and 1 both at t = 0); the weight matrices at 1e-6 throughout
    for epoch, t in ((0, 0), (1, 0), (15, 14), (29, 28)):
        assert lrs[epoch][0] == pytest.approx(cosine(scaled, t, 30), rel=1e-12), epoch
        assert lrs[epoch][1] == pytest.approx(1e-6, rel=1e-12), epoch
    assert lrs[0][0] == pytest.approx(1.25e-3) and lrs[29][0] == pytest.approx(1.4647e-5, rel=1e-4)


def test_without_weight_decay_one_group_follows_the_schedule(monkeypatch, deit_tiny):
    args = finetune.get_args_parser().parse_args(['--weight-decay', '0'])
    optimizer, lrs = epoch_lrs(monkeypatch, args, deit_tiny, 30)
    no_decay, decay = deit_tiny_groups()
    assert group_names(optimizer, deit_tiny) == [no_decay | decay]
    for epoch, t in ((0, 0), (15, 14), (29, 28)):
        assert lrs[epoch] == [pytest.approx(cosine(1.25e-3, t, 30), rel=1e-12)]


def test_the_weight_matrices_decay_by_the_flag_and_the_rest_not_at_all():
    """--weight-decay is group 1's (the weight matrices') and group 0 has none: a step with zero gradients is
    AdamW's decoupled decay alone, p * (1 - lr * weight decay) for each matrix, every other tensor unchanged
    (--uniform-lr: both groups at the scaled lr, so the decay shows in float32)."""
    model = models.create_model('deit_digits_patch4_32')
    args = finetune.get_args_parser().parse_args(['--weight-decay', '0.02', '--uniform-lr'])
    optimizer, _ = finetune.build_optimizer(args, model)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [0.0, 0.02]
    before = [[p.detach().clone() for p in g['params']] for g in optimizer.param_groups]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    lr = 0.01 * 64 / 512
    assert all(torch.equal(p, p0) for p, p0 in zip(optimizer.param_groups[0]['params'], before[0]))
    for p, p0 in zip(optimizer.param_groups[1]['params'], before[1]):
        assert p.ndim == 2 or p.ndim == 4
        assert torch.allclose(p.detach(), p0 * (1 - lr * 0.02), rtol=2e-7, atol=0)
        assert not torch.allclose(p.detach(), p0 * (1 - lr * 0.05), rtol=2e-7, atol=0)  # the default would show


def test_uniform_lr_schedules_every_group(monkeypatch, deit_tiny):
    args = finetune.get_args_parser().parse_args(['--uniform-lr'])
    optimizer, lrs = epoch_lrs(monkeypatch, args, deit_tiny, 30)
    assert [len(names) for names in group_names(optimizer, deit_tiny)] == [102, 50]
    for epoch, t in ((0, 0), (15, 14), (29, 28)):
        assert lrs[epoch] == [pytest.approx(cosine(1.25e-3, t, 30), rel=1e-12)] * 2


def test_warm_up_decay_and_cool_down_land_where_the_original_puts_them(monkeypatch):
    """The schedule's length is --final_finetune (the original sets epochs = final_finetune): a 3-epoch linear
    warm-up from --warmup-lr, then the cosine over t = 0..8 (not shifted by the warm-up), never the cool-down;
    cosine ignores --decay-epochs.  --sched step decays every --decay-epochs."""
    model = models.create_model('deit_digits_patch4_32')
    base = 0.01 * 64 / 512
    runs = {}
    for decay in ('15', '2'):
        args = finetune.get_args_parser().parse_args(['--warmup-epochs', '3', '--final_finetune', '8',
                                                      '--decay-epochs', decay, '--uniform-lr'])
        runs[decay] = [lr[0] for lr in epoch_lrs(monkeypatch, args, model, 8)[1]]
    warm = [1e-5 + t * (base - 1e-5) / 3 for t in range(3)]
    ts = [0, 0, 1, 2, 3, 4, 5, 6]  # epoch k at t = k - 1
    expected = [warm[t] if t < 3 else cosine(base, t, 8) for t in ts]
    assert runs['15'] == pytest.approx(expected, rel=1e-12)
    assert runs['2'] == runs['15']
    args = finetune.get_args_parser().parse_args(['--sched', 'step', '--decay-epochs', '2', '--decay-rate', '0.5',
                                                  '--final_finetune', '6'])
    _, lrs = epoch_lrs(monkeypatch, args, model, 6)
    assert [lr[0] for lr in lrs] == pytest.approx([base, base, base, base / 2, base / 2, base / 4], rel=1e-12)
    assert [lr[1] for lr in lrs] == pytest.approx([1e-6, 1e-6, 1e-6, 5e-7, 5e-7, 2.5e-7], rel=1e-12)


@pytest.mark.parametrize('sched', ['cosine', 'step'])
def test_a_warm_up_that_outlasts_the_run_is_noted_exactly_when_no_epoch_trains_past_it(monkeypatch, sched):
    """The note fires exactly when every epoch, as engine.train_epochs steps timm's schedule, trains below the
    scaled lr at a warm-up rate (rising from --warmup-lr), judged here from the rates the epochs train at."""
    model = models.create_model('deit_digits_patch4_32')
    base = 0.01 * 64 / 512
    for epochs, warmup in ((1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (4, 2), (4, 3), (5, 5)):
        args = finetune.get_args_parser().parse_args(['--sched', sched, '--warmup-epochs', str(warmup),
                                                      '--final_finetune', str(epochs), '--uniform-lr'])
        lrs = [lr[0] for lr in epoch_lrs(monkeypatch, args, model, epochs)[1]]
        warm = [1e-5 + t * (base - 1e-5) / warmup for t in range(warmup)]
        all_warm = all(any(lr == pytest.approx(w, rel=1e-12) for w in warm) and lr < base for lr in lrs)
        note = finetune.warmup_note(args)
        assert (note is not None) == all_warm, (epochs, warmup, lrs)
        if note:
            assert note == (f'note: --warmup-epochs {warmup} outlasts this {epochs}-epoch run: its epochs train at '
                            f'schedule steps 0..{max(epochs - 2, 0)} (epoch k >= 1 at step k - 1), all of them '
                            f'warm-up steps, so no epoch trains at the --sched {sched} schedule')


@pytest.mark.parametrize('sched', ['cosine', 'poly', 'step'])
def test_a_min_lr_above_the_lr_a_group_is_scheduled_from_is_noted_exactly_when_its_lr_rises(monkeypatch, sched):
    """--min-lr is the end of timm's cosine (tanh, poly, ...) schedule, not a floor: above a group's base lr (the
    scaled --lr, which a small batch makes small, or the weight matrices' 1e-6) the run's lr rises to it, which a
    note says; a schedule that does not read --min-lr (step) gets no such note."""
    model = models.create_model('deit_digits_patch4_32')
    for flags in (['--min-lr', '1e-2', '--uniform-lr'], ['--min-lr', '1e-5'], ['--min-lr', '1e-6'],
                  ['--min-lr', '1e-5', '--uniform-lr'], ['--min-lr', '1e-3', '--batch-size', '16', '--uniform-lr']):
        args = finetune.get_args_parser().parse_args(['--sched', sched, '--final_finetune', '4', *flags])
        lrs = epoch_lrs(monkeypatch, args, model, 4)[1]
        rises = [g for g in range(len(lrs[0])) if lrs[-1][g] > lrs[0][g] * (1 + 1e-9)]
        note = finetune.min_lr_note(args)
        assert (note is not None) == bool(rises), (flags, lrs)
        if note:
            assert note.startswith(f'note: --min-lr {args.min_lr:g} is above ')
            assert note.endswith(f'the --sched {sched} schedule rises to it over the run instead of decaying to it')
            assert ("the weight matrices' 1e-06" in note) == ('--uniform-lr' not in flags and 1 in rises)


def test_a_warmup_lr_above_the_lr_a_group_is_scheduled_from_is_noted_exactly_when_its_warmup_falls(monkeypatch):
    """timm warms every parameter group from --warmup-lr to its own base lr: above a group's base (the weight
    matrices' 1e-6 without --uniform-lr, from the default 1e-5; or a scaled --lr that a small batch makes small)
    the asked-for warm-up is a fall, which a note says; no warm-up, no note."""
    model = models.create_model('deit_digits_patch4_32')
    for flags in (['--warmup-epochs', '2'], ['--warmup-epochs', '2', '--uniform-lr'], ['--uniform-lr'],
                  ['--warmup-epochs', '2', '--warmup-lr', '1e-7'],
                  ['--warmup-epochs', '2', '--uniform-lr', '--warmup-lr', '1e-2', '--batch-size', '16'],
                  ['--warmup-epochs', '2', '--weight-decay', '0']):
        args = finetune.get_args_parser().parse_args(['--final_finetune', '5', *flags])
        lrs = epoch_lrs(monkeypatch, args, model, 5)[1]
        warmup = int(args.warmup_epochs)
        falls = [g for g in range(len(lrs[0])) if warmup and lrs[warmup + 1][g] < lrs[0][g] * (1 - 1e-9)]
        note = finetune.warmup_lr_note(args)
        assert (note is not None) == bool(falls), (flags, lrs)
        if note:
            assert note.startswith(f'note: --warmup-lr {args.warmup_lr:g} is above ')
            assert note.endswith(f'the warm-up of --warmup-epochs {warmup} falls from it to that lr instead of '
                                 f'rising to it')
            assert ("the weight matrices' 1e-06" in note) == ('--uniform-lr' not in flags and 1 in falls)


def test_a_step_interval_below_one_epoch_decays_several_times_at_each_epoch(monkeypatch):
    """As --help says: the schedule is stepped once per epoch, so --sched step --decay-epochs 0.5 multiplies the lr
    by --decay-rate twice at each step (timm's t // decay_t), not once every half epoch."""
    model = models.create_model('deit_digits_patch4_32')
    base = 0.01 * 64 / 512
    args = finetune.get_args_parser().parse_args(['--sched', 'step', '--decay-epochs', '0.5', '--decay-rate', '0.5',
                                                  '--final_finetune', '4', '--uniform-lr'])
    _, lrs = epoch_lrs(monkeypatch, args, model, 4)
    assert [lr[0] for lr in lrs] == pytest.approx([base, base, base / 4, base / 16], rel=1e-12)
    assert 'so 0.5 decays twice at each epoch' in ' '.join(finetune.get_args_parser().format_help().split())


def test_multistep_decays_from_the_milestones_given(monkeypatch):
    """--sched multistep multiplies the lr by --decay-rate from each epoch --decay-milestones names; the milestones
    are a flag (timm's scheduler otherwise decays at its own 30 and 60, which no flag set: within the default 30
    epochs never, so --decay-rate did nothing) and must increase."""
    model = models.create_model('deit_digits_patch4_32')
    base = 0.01 * 64 / 512
    args = finetune.get_args_parser().parse_args(['--sched', 'multistep', '--decay-milestones', '2', '4',
                                                  '--decay-rate', '0.5', '--final_finetune', '6', '--uniform-lr'])
    _, lrs = epoch_lrs(monkeypatch, args, model, 6)
    assert [lr[0] for lr in lrs] == pytest.approx([base, base, base / 2, base / 2, base / 4, base / 4], rel=1e-12)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return digits_world(tmp_path_factory.mktemp('recipe'))


@pytest.fixture
def few_digits(monkeypatch):
    """--data-set DIGITS cut to its first 64 training and 32 validation images, for runs that check which flags
    a run reads or notes, not what it learns (a whole DIGITS epoch takes 10-25 s on 2 CPU cores)."""
    whole = datasets.DigitsDataset.__init__

    def cut(self, train):
        whole(self, train)
        n = 64 if train else 32
        self.images, self.targets = self.images[:n], self.targets[:n]
    monkeypatch.setattr(datasets.DigitsDataset, '__init__', cut)


def cli(capsys, *argv):
    code = finetune.main([*DIGITS_ARGS, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def records(out_dir):
    with open(os.path.join(out_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_the_cli_steps_the_schedule_as_the_original(capsys, world, tmp_path):
    out = tmp_path / 'out'
    code, stdout, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                            '--final_finetune', 3)
    assert code == 0, err
    base = 0.01 * 8 / 512
    assert [r['train_lr'] for r in records(out)] == pytest.approx(
        [base, base, cosine(base, 1, 3)], rel=1e-12)  # epochs 0, 1 at t = 0, epoch 2 at t = 1
    groups = torch.load(out / 'checkpoint.pth')['optimizer']['param_groups']
    assert [g['lr'] for g in groups] == pytest.approx([cosine(base, 2, 3), 1e-6], rel=1e-12)
    # the groups and the lrs they start at are printed once
    assert len(re.findall(r'^Parameter group 0: \d+ tensors .* lr 1\.56e-04', stdout, re.M)) == 1
    assert len(re.findall(r'^Parameter group 1: \d+ tensors \(\d+ weight matrices\), weight decay 0\.05, '
                          r'lr 1\.00e-06', stdout, re.M)) == 1


def test_a_new_run_from_a_later_start_epoch_runs_that_epoch_at_its_place_in_the_schedule(capsys, world, tmp_path):
    """A new run (a pruned or official file) given --start_epoch 2 runs epoch k at t = k - 1, as every epoch of a
    run from epoch 0 does: epoch 2 at t = 1, not at the schedule's start (t = 0) and then a jump to t = 2."""
    out = tmp_path / 'out'
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--final_finetune', 4, '--start_epoch', 2)
    assert code == 0, err
    base = 0.01 * 8 / 512
    assert [(r['epoch'], r['train_lr']) for r in records(out)] == [
        (2, pytest.approx(cosine(base, 1, 4), rel=1e-12)), (3, pytest.approx(cosine(base, 2, 4), rel=1e-12))]


def test_decay_milestones_that_do_not_increase_are_one_line(capsys, tmp_path):
    code, out, err = cli(capsys, '--data-set', 'DIGITS', '--output_dir', tmp_path / 'out', '--sched', 'multistep',
                         '--decay-milestones', 4, 2)
    assert code == 2 and err == 'error: --decay-milestones 4 2: the epochs must increase\n'
    assert not (tmp_path / 'out').exists()


def test_an_lr_noise_range_that_ends_before_it_starts_is_one_line(capsys, monkeypatch, tmp_path):
    """timm adds the noise for t in [first, second) x the schedule's length: a range that ends before it starts
    would add none, whatever --lr-noise-pct and --lr-noise-std say."""
    model = models.create_model('deit_digits_patch4_32')
    runs = {}
    for noise in ([], ['--lr-noise', '0.2', '0.8'], ['--lr-noise', '0.8', '0.2']):
        args = finetune.get_args_parser().parse_args(['--final_finetune', '10', '--uniform-lr', *noise])
        runs[' '.join(noise[1:])] = [lr[0] for lr in epoch_lrs(monkeypatch, args, model, 10)[1]]
    assert runs['0.2 0.8'] != runs[''] and runs['0.8 0.2'] == runs['']
    code, out, err = cli(capsys, '--data-set', 'DIGITS', '--output_dir', tmp_path / 'out', '--lr-noise', 0.8, 0.2)
    assert code == 2 and err == ('error: --lr-noise 0.8 0.2: the noise applies from the first fraction of the '
                                 'schedule up to the second, so the first must be below the second (timm would add '
                                 'none)\n')
    assert not (tmp_path / 'out').exists()


def test_an_lr_noise_that_no_trained_epoch_reaches_is_one_line(capsys, tmp_path, monkeypatch):
    """The schedule is stepped after each epoch, so over 10 epochs the epochs train at steps 0..8 (and epoch 0 at
    the starting rate): noise from 0.8 x 10 reaches the last epoch, noise from 0.81 x 10 (or a range holding no
    whole step, or any noise over one epoch) none; those are refused before any work."""
    model = models.create_model('deit_digits_patch4_32')

    def lrs(epochs, *noise):
        args = finetune.get_args_parser().parse_args(['--final_finetune', str(epochs), '--uniform-lr', *noise])
        return [lr[0] for lr in epoch_lrs(monkeypatch, args, model, epochs)[1]]

    plain = lrs(10)
    assert lrs(10, '--lr-noise', '0.8')[:9] == plain[:9] and lrs(10, '--lr-noise', '0.8')[9] != plain[9]
    assert lrs(10, '--lr-noise', '0.81') == plain and lrs(10, '--lr-noise', '0.31', '0.39') == plain
    assert lrs(10, '--lr-noise', '0.3', '0.31') != plain and lrs(1, '--lr-noise', '0') == lrs(1)
    finetune.check_lr_noise_reaches_an_epoch([0.8], 10)
    finetune.check_lr_noise_reaches_an_epoch([0.3, 0.31], 10)
    for noise, epochs, steps, trained in ((['0.81'], 10, 't >= 8.1', '0..8'), (['0.31', '0.39'], 10,
                                          '3.1 <= t < 3.9', '0..8'), (['0'], 1, 't >= 0', None)):
        out_dir = tmp_path / f'out{epochs}{noise[0]}'
        code, out, err = cli(capsys, '--data-set', 'DIGITS', '--output_dir', out_dir, '--final_finetune', epochs,
                             '--lr-noise', *noise)
        assert code == 2 and err == (
            f'error: --lr-noise {" ".join(noise)}: timm adds the noise at the steps {steps} of the {epochs}-epoch '
            f'schedule, and the epochs train at {f"steps {trained}" if trained else "no step"} (epoch k >= 1 at '
            f'step k - 1: the schedule is stepped after each epoch, as in DeiT), so no epoch would get noise\n')
        assert not out_dir.exists()

@pytest.mark.parametrize('flags', [
    ['--mixup', '0.3', '--cutmix', '0.6', '--mixup-prob', '0.7', '--mixup-switch-prob', '0.3', '--mixup-mode', 'elem',
     '--smoothing', '0.05'],
    ['--mixup', '0.5', '--cutmix-minmax', '0.3', '0.7', '--mixup-switch-prob', '0.6', '--mixup-mode', 'pair',
     '--smoothing', '0.2'],
])
def test_mixup_and_cutmix_are_deits_of_the_flags(flags):
    """The images and soft targets a finetuning batch trains on are what DeiT's Mixup, built from the same flags
    as DeiT's main.py builds it, makes under the same numpy seed; the base loss reads the soft targets."""
    import numpy as np
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    args = finetune.get_args_parser().parse_args(flags)
    criterion, mixup_fn = finetune.build_criterion(args, 10, None)
    assert isinstance(criterion.base_criterion, SoftTargetCrossEntropy)
    value = {f[2:].replace('-', '_'): v for f, v in zip(flags, flags[1:]) if f.startswith('--')}
    deit = Mixup(mixup_alpha=float(value['mixup']), cutmix_alpha=float(value.get('cutmix', 1.0)),
                 cutmix_minmax=[0.3, 0.7] if 'cutmix_minmax' in value else None,
                 prob=float(value.get('mixup_prob', 1.0)), switch_prob=float(value['mixup_switch_prob']),
                 mode=value['mixup_mode'], label_smoothing=float(value['smoothing']), num_classes=10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    for seed in range(6):
        np.random.seed(seed)
        ours = mixup_fn(x.clone(), y.clone())
        np.random.seed(seed)
        expected = deit(x.clone(), y.clone())
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1]), seed
    assert not torch.equal(ours[0], x)  # the images were mixed


@pytest.mark.parametrize('smoothing', [0.2, 0.0])
def test_without_mixing_the_base_loss_is_cross_entropy_smoothed_by_the_flag(smoothing):
    """--mixup 0 --cutmix 0: the base loss is cross-entropy with --smoothing's label smoothing (torch's own
    label_smoothing is the reference), plain cross-entropy at 0."""
    args = finetune.get_args_parser().parse_args(['--mixup', '0', '--cutmix', '0', '--smoothing', str(smoothing)])
    criterion, mixup_fn = finetune.build_criterion(args, 10, None)
    assert mixup_fn is None
    g = torch.Generator().manual_seed(6)
    logits, y = torch.randn(8, 10, generator=g) * 3, torch.randint(0, 10, (8,), generator=g)
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=smoothing)
    assert criterion(None, logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    if smoothing:  # (the recipe's 0.1 would give another loss)
        assert expected.item() != pytest.approx(
            torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-3)


@pytest.mark.parametrize('size', [32, 224])
def test_a_cutmix_box_range_is_refused_exactly_where_timm_cannot_draw_a_box_from_it(size):
    """--cutmix-minmax: a range is refused (before any work) where timm's box draw at that image size fails, and
    accepted where it draws, at the edges of the whole pixels too (a refused 0.3 0.31 at 32 px stopped the run in a
    traceback at the first batch CutMix mixed)."""
    import numpy as np
    from timm.data.mixup import rand_bbox_minmax
    from utils import UserError
    ranges = [(0.3, 0.31), (0.3, 0.3125), (0.31, 0.32), (0.5, 0.502), (0.5, 0.505), (0.01, 0.02), (0.2, 0.8),
              (0.999, 1.0), (0.25, 0.28125)]
    refused = accepted = 0
    for low, high in ranges:
        np.random.seed(0)
        try:
            rand_bbox_minmax((3, size, size), (low, high), count=4)
            draws = True
        except ValueError:
            draws = False
        try:
            finetune.check_cutmix_box_sides(size, low, high)
            passes = True
        except UserError:
            passes = False
        assert passes == draws, (size, low, high)
        refused, accepted = refused + (not draws), accepted + draws
    assert refused and accepted  # both kinds at each size


# ----------------------------------------------------------------------------------------------------------
# 3. evaluation transform

def test_default_evaluation_transform_squashes_the_whole_image():
    from PIL import Image
    import numpy as np
    from datasets import build_transform
    args = finetune.get_args_parser().parse_args([])
    args.input_size, args.mean, args.std = 224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)  # 300 wide, 200 high
    image = Image.fromarray(pixels)
    got = build_transform(False, args)(image)
    squashed = np.asarray(image.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(squashed).permute(2, 0, 1) - 0.5) / 0.25
    assert got.shape == (3, 224, 224)
    assert torch.allclose(got, expected, atol=1e-6)  # nothing cropped: the left and right edges are in it
    args.eval_crop_ratio = 0.875  # DeiT's centre crop, one flag away
    assert not torch.allclose(build_transform(False, args)(image), expected, atol=1e-2)


@pytest.mark.parametrize('ratio, wide', [(0.875, True), (0.88, True), (0.8, False)])
def test_a_crop_ratio_below_one_resizes_the_shorter_side_to_input_over_it_bicubic_then_crops_the_centre(ratio, wide):
    """DeiT's evaluation, --eval-crop-ratio r < 1: the shorter side resized to int(input / r) with the aspect kept,
    bicubic, then the centre input x input taken (int: 64 / 0.88 = 72.7 is 72, as in DeiT); written out here with
    Pillow alone."""
    from PIL import Image
    import numpy as np
    from datasets import build_transform
    args = finetune.get_args_parser().parse_args(['--eval-crop-ratio', str(ratio)])
    args.input_size, args.mean, args.std = 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    w, h = (150, 100) if wide else (90, 120)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (h, w, 3), dtype=np.uint8))
    short = int(64 / ratio)
    size = (int(short * w / h), short) if wide else (short, int(short * h / w))
    resized = image.resize(size, Image.BICUBIC)
    left, top = round((size[0] - 64) / 2), round((size[1] - 64) / 2)
    crop = np.asarray(resized.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(crop).permute(2, 0, 1) - 0.5) / 0.25
    got = build_transform(False, args)(image)
    assert got.shape == (3, 64, 64)
    assert torch.allclose(got, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 6. scoring inputs and the original timing protocol

def test_scoring_sees_the_training_transform_without_auto_augment_or_erasing(world):
    from timm.data import auto_augment
    args = finetune.get_args_parser().parse_args(['--data-path', world['data'], '--input-size', '64'])
    args.mean, args.std = (0.5,) * 3, (0.5,) * 3
    dataset, classes = finetune.scoring_dataset(args)
    kinds = [type(t).__name__ for t in dataset.transform.transforms]
    assert kinds == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'ColorJitter', 'MaybeToTensor',
                     'Normalize']
    jitter = dataset.transform.transforms[2]
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))  # 0.4
    assert not any(isinstance(t, auto_augment.RandAugment) for t in dataset.transform.transforms)
    assert classes == 4 and len(dataset) == 32


@pytest.mark.parametrize('flags', [[], ['--color-jitter', '0.2', '--train-interpolation', 'bilinear']])
def test_scoring_images_are_deits_training_transform_of_the_flags_without_auto_augment_or_erasing(world, flags):
    """The images scored, drawn under the same seeds as DeiT's training transform (timm's create_transform) with
    --color-jitter and --train-interpolation as given (the recipe's 0.4 and bicubic by default), no auto-augment,
    no random erasing: the same pixels (ColorJitter is only there without auto-augment, so scoring is where the
    flag shows)."""
    import random
    import numpy as np
    from PIL import Image
    from timm.data import create_transform
    args = finetune.get_args_parser().parse_args(['--data-path', world['data'], '--input-size', '64', *flags])
    args.mean, args.std = (0.5,) * 3, (0.25,) * 3
    ours = finetune.scoring_dataset(args)[0].transform
    jitter, interpolation = (0.2, 'bilinear') if flags else (0.4, 'bicubic')
    deit = create_transform(input_size=64, is_training=True, color_jitter=jitter, auto_augment=None,
                            interpolation=interpolation, re_prob=0.0, mean=args.mean, std=args.std)
    pixels = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)

    def seeded(transform, seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return transform(image)
    for seed in range(4):
        assert torch.allclose(seeded(ours, seed), seeded(deit, seed), atol=1e-5), seed
    assert not torch.allclose(seeded(ours, 0), seeded(ours, 1), atol=1e-2)  # the draws do change the images


def test_original_timing_protocol_runs_fp32_with_autograd_in_three_synchronised_runs():
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            calls.append((x.shape, x.dtype, torch.is_grad_enabled(), self.training,
                          torch.backends.cudnn.benchmark, float(x.min()) >= 0 and float(x.max()) < 1))
            return x * self.w

    before = torch.backends.cudnn.benchmark
    with torch.no_grad():  # the protocol builds the autograd graph anyway, as the original did
        speed = engine.throughput_original_protocol(Probe().train(), 3, 8, torch.device('cpu'), passes=4)
    assert calls == [((3, 3, 8, 8), torch.float32, True, False, True, True)] * 12  # torch.rand, eval mode
    assert len(speed) == 3 and min(speed) > 0 and torch.backends.cudnn.benchmark == before  # the original's 3 runs


@pytest.fixture(scope='module')
def pruned_digits(world):
    model = models.create_model('deit_digits_patch4_32')
    model.load_state_dict(load_checkpoint_file(world['dense'])['model'], strict=False)
    channels = pruning.apply_masks(model, pruning.random_masks(6, 64, 0.3, torch.Generator().manual_seed(0)))
    path = world['base'] / 'pruned_random_0.3.pth'
    torch.save({'model': model.state_dict(), 'channels': channels, 'args': {'prune_mode': 'random'}}, path)
    return path


def test_a_pruned_teacher_runs_dense_and_says_so(capsys, pruned_digits):
    args = argparse.Namespace(teacher_model=None, model='deit_digits_patch4_32', teacher_path=str(pruned_digits),
                              input_size=32)
    teacher = finetune.build_teacher(args, torch.device('cpu'), 10)
    out = capsys.readouterr().out
    kept = torch.load(pruned_digits)['channels']
    assert kept != [65] * 6  # the file is a pruned model
    assert f'note: {pruned_digits} holds a pruned model (kept tokens per block: {kept}); the teacher runs dense ' \
        'on its weights, every token kept' in out.splitlines()
    reference = timm.create_model('deit_digits_patch4_32')  # timm's own ViT of the same weights
    weights = {k: v for k, v in torch.load(pruned_digits)['model'].items() if not k.endswith('token_index')}
    reference.load_state_dict(weights)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), reference.eval()(x))
    assert not any(p.requires_grad for p in teacher.parameters())


def test_speed_only_with_the_original_protocol(capsys, pruned_digits):
    code, out, err = cli(capsys, '--speed-only', '--speed-protocol', 'original', '--resume', pruned_digits,
                         '--batch-size', 2, '--speed-repeats', 2)
    assert code == 0, err
    # (cuDNN and TF32, which the protocol switches on on CUDA, are not named on a CPU, which has neither)
    assert re.search(r'^Original protocol: batch 2 of torch\.rand at 32x32 on cpu, fp32 with autograd \(no no_grad\); '
                     r'3 runs of 2 passes back to back, each timed from one synchronisation to the next; the last is '
                     r'the figure; only this model$', out, re.M)
    assert 'TF32' not in out and 'cudnn' not in out
    assert re.search(r'^Throughput of the pruned model, run 1 of 3 \(inaccurate, as the original printed it: '
                     r'set-up\): \d+\.\d images/s\n'
                     r'Throughput of the pruned model, run 2 of 3: \d+\.\d images/s\n'
                     r'FLOPs of the pruned model: 0\.0\d\d GFLOPs\nThroughput of the pruned model: \d+\.\d images/s$',
                     out, re.M)
    assert 'dense model' not in out  # the original timed the loaded model only
    code, out, err = cli(capsys, '--speed-only', '--speed-protocol', 'original', '--speed-warmup', 1)
    assert code == 2 and err.strip() == ('error: --speed-protocol original times fp32 passes as the original did '
                                         '(three runs, the last the figure): --speed-warmup and --speed-dtype do not '
                                         'apply')


# ----------------------------------------------------------------------------------------------------------
# 5. the paper's four commands, verbatim

def test_prune_without_output_dir_writes_beside_the_checkpoint(capsys, world, tmp_path):
    dense = shutil.copy(world['dense'], tmp_path / 'dense.pth')
    code, out, err = cli(capsys, '--prune', '--resume', dense, '--data-path', world['data'], '--prune-batches', 1)
    assert code == 0, err
    path = tmp_path / 'pruned_0.25.pth'
    assert f'No --output_dir: writing beside --resume, in {tmp_path}' in out.splitlines()
    assert f'Saved {path}' in out.splitlines()
    assert torch.load(path)['channels'] == models.kept_token_counts(
        timm_model_with(load_checkpoint_file(str(path))['model']))


def test_prune_records_the_batches_it_scored_not_the_cap_it_was_given(capsys, world, tmp_path):
    """--prune-batches is a cap: the world's training set has 4 classes x 8 images, 4 full batches of 8, so a cap
    of 1000 scores 4 and a cap of 2 scores 2; the file and prune_log.txt say how many were scored."""
    images = sum(len(files) for _, _, files in os.walk(os.path.join(world['data'], 'train')))
    assert images == 32
    for cap, scored in ((1000, images // 8), (2, 2)):
        out_dir = tmp_path / str(cap)
        code, out, err = cli(capsys, '--prune', '--resume', world['dense'], '--data-path', world['data'],
                             '--output_dir', out_dir, '--prune-batches', cap)
        assert code == 0, err
        note = ' (--prune-batches 1000 asked for more: the training set has no more)' if cap == 1000 else ''
        assert f'Scored {scored} batches of 8 images per process{note}' in out.splitlines()
        checkpoint = torch.load(out_dir / 'pruned_0.25.pth')
        assert checkpoint['scored_batches'] == scored and checkpoint['args']['prune_batches'] == cap
        assert json.loads((out_dir / 'prune_log.txt').read_text())['scored_batches'] == scored


def test_prune_says_how_many_images_a_batch_held_when_the_training_set_is_shorter_than_one(capsys, world, tmp_path):
    """32 training images and --batch-size 64: the loader keeps its one partial batch, of 32 images, and the
    line says so, not 64."""
    code, out, err = cli(capsys, '--prune', '--resume', world['dense'], '--data-path', world['data'],
                         '--output_dir', tmp_path, '--batch-size', 64)
    assert code == 0, err
    assert ('Scored 1 batch of 32 images per process (--batch-size 64 asked for more: the training set has no more)'
            in out.splitlines())
    code, out, err = cli(capsys, '--prune', '--resume', world['dense'], '--data-path', world['data'],
                         '--output_dir', tmp_path / 'capped', '--batch-size', 64, '--prune-batches', 3)
    assert code == 0, err
    assert ('Scored 1 batch of 32 images per process (--prune-batches 3 and --batch-size 64 asked for more: the '
            'training set has no more)' in out.splitlines())


def timm_model_with(state_dict):
    model = models.create_model('deit_digits_patch4_32')
    model.load_state_dict(state_dict)
    return model


@pytest.mark.slow
def test_the_papers_commands_run_as_printed(tmp_path):
    """The README of the original code prints these (this README shows them); only paths are adapted, and
    arguments appended at the end only make the runs small (argparse: the last value wins)."""
    official_checkpoint(tmp_path / 'deit_tiny_patch16_224-a1311bcf.pth', seed=3)
    make_image_folder(tmp_path / 'imagenet')
    script = os.path.join(ROOT, 'finetune.py')

    def run(cmd, *launcher):
        proc = run_process_tree([sys.executable, *launcher, script, *cmd.split()], 600, cwd=tmp_path,
                                 env=subprocess_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    small = ' --batch-size 2'  # appended: small batches of the 12 training images
    with open(os.path.join(ROOT, 'README.md')) as f:  # the README shows the commands as run here
        block = next(b for b in f.read().split('```bash') if '# 1. prune' in b).split('```')[0]
    shown = ' '.join(block.replace('\\\n', ' ').split())
    commands = {
        'prune': '--prune --model deit_tiny_patch16_224 --resume deit_tiny_patch16_224-a1311bcf.pth '
                 '--data-path /path/to/imagenet --batch-size 256 --prune_mode attn --prune_rate 0.25',
        'eval': '--eval --model deit_tiny_patch16_224  --batch-size 256 --data-path /path/to/imagenet '
                '--resume pruned_0.25.pth',
        'speed': '--speed-only --model deit_tiny_patch16_224  --batch-size 256 --data-path /path/to/imagenet '
                 '--resume pruned_0.25.pth',
        'finetune': '--model deit_tiny_patch16_224 --batch-size 256 --data-path /path/to/imagenet '
                    '--resume pruned_0.25.pth --teacher-path  deit_tiny_patch16_224-a1311bcf.pth '
                    '--teacher-model deit_tiny_patch16_224 --distillation-type soft --prune_mode attn '
                    '--final_finetune 30 --decay-epochs 6 --batch-size 256 --lr 1e-4 --weight-decay 0.001 '
                    '--distillation-alpha 0.2 --distillation-tau 20 --output_dir output/'}
    for name, cmd in commands.items():
        assert 'finetune.py ' + ' '.join(cmd.split()) in shown, name
    commands = {k: v.replace('/path/to/imagenet', 'imagenet') for k, v in commands.items()}
    out = run(commands['prune'] + small)
    # no --output_dir: the file goes beside the checkpoint (here: the current directory), and says so
    assert 'No --output_dir: writing beside --resume, in .' in out.splitlines()
    assert f'Saved {os.path.join(".", "pruned_0.25.pth")}' in out.splitlines()
    assert 'masks sha1' not in out  # a single process
    assert sorted(os.listdir(tmp_path)) == ['deit_tiny_patch16_224-a1311bcf.pth', 'imagenet', 'prune_attn_0.25',
                                            'prune_log.txt', 'pruned_0.25.pth']
    assert torch.load(tmp_path / 'pruned_0.25.pth')['args']['output_dir'] == '.'

    out = run(commands['eval'])
    assert re.search(r'^Accuracy of the network on the 6 test images: \d+\.\d%$', out, re.M)

    out = run(commands['speed'] + ' --batch-size 2 --speed-repeats 1 --speed-warmup 0')
    assert re.search(r'^Speed-up of the pruned model: \d+\.\d\dx', out, re.M)
    # the command passes --data-path, which a speed run does not read: said, not refused
    assert ('note: --data-path imagenet has no effect: --speed-only times random images (in --speed-dtype; fp32 '
            'under --speed-protocol original), prints no progress and writes nothing') in out.splitlines()

    out = run(commands['finetune'] + small + ' --final_finetune 1',
              '-m', 'torch.distributed.launch', f'--master_port={free_port()}', '--nproc_per_node=2', '--use_env')
    assert 'Teacher cc_deit_tiny_patch16_224 from deit_tiny_patch16_224-a1311bcf.pth (dense)' in out
    notes = [line for line in out.splitlines() if line.startswith('note:')]
    # (the last: this test's batch 2 scales --lr 1e-4 below --min-lr 1e-6; the command's 256 x 2 does not)
    assert notes == ['note: --prune_mode attn has no effect: only --prune makes masks',
                     "note: --decay-epochs 6.0 has no effect: not read by timm's cosine schedule",
                     'note: --min-lr 1e-06 is above the scheduled lr 7.81e-07 (--lr 0.0001 x batch 2 x 2 / 512): the '
                     '--sched cosine schedule rises to it over the run instead of decaying to it']
    assert f'(lr {1e-4 * 2 * 2 / 512:.2e} for batch 2 x 2 processes)' in out
    ckpt = torch.load(tmp_path / 'output' / 'checkpoint.pth')
    assert {k: ckpt['args'][k] for k in ('weight_decay', 'distillation_type', 'distillation_alpha',
                                          'distillation_tau', 'decay_epochs', 'prune_mode')} == {
        'weight_decay': 0.001, 'distillation_type': 'soft', 'distillation_alpha': 0.2, 'distillation_tau': 20.0,
        'decay_epochs': 6.0, 'prune_mode': 'attn'}
    assert [g['initial_lr'] for g in ckpt['optimizer']['param_groups']] == pytest.approx([1e-4 * 2 * 2 / 512, 1e-6])


# ----------------------------------------------------------------------------------------------------------
# 7. a continued run keeps its objective

@pytest.fixture(scope='module')
def distilled(world, tmp_path_factory):
    """One epoch with soft distillation and EMA: <out>/checkpoint.pth, best.pth, log.txt."""
    out = tmp_path_factory.mktemp('distilled') / 'out'
    teacher = world['base'] / 'teacher.pth'
    shutil.copy(world['dense'], teacher)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = finetune.main([*DIGITS_ARGS, '--resume', world['dense'], '--data-path', world['data'],
                              '--output_dir', str(out), '--final_finetune', '1', '--distillation-type', 'soft',
                              '--distillation-alpha', '0.7', '--teacher-path', str(teacher), '--model-ema',
                              '--uniform-lr', '--smoothing', '0.2'])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return {'out': out, 'teacher': teacher}


def test_resume_without_repeating_the_flags_continues_with_distillation_and_ema(capsys, world, distilled, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(distilled['out'], out)
    ckpt = out / 'checkpoint.pth'
    code, stdout, err = cli(capsys, '--resume', ckpt, '--final_finetune', 2)  # no data path, no output dir
    assert code == 0, err
    lines = stdout.splitlines()
    taken = next(line for line in lines if line.startswith('Continuing the run of'))
    for flag in ('--distillation-type soft', f'--teacher-path {distilled["teacher"]}', '--distillation-alpha 0.7',
                 '--model-ema', '--uniform-lr', '--smoothing 0.2', f'--data-path {world["data"]}',
                 f'--output_dir {out}'):
        assert flag in taken, flag
    assert f'Teacher cc_deit_digits_patch4_32 from {distilled["teacher"]} (dense)' in lines
    assert 'continuing at epoch 1' in stdout
    final = torch.load(ckpt)  # plain torch.load reads what a continued run writes
    assert final['epoch'] == 1 and 'model_ema' in final
    assert {k: final['args'][k] for k in ('distillation_type', 'distillation_alpha', 'teacher_path', 'model_ema',
                                          'uniform_lr', 'smoothing')} == \
        {'distillation_type': 'soft', 'distillation_alpha': 0.7, 'teacher_path': str(distilled['teacher']),
         'model_ema': True, 'uniform_lr': True, 'smoothing': 0.2}
    assert [r['epoch'] for r in records(out)] == [0, 1]
    assert torch.load(out / 'best.pth')['args']['distillation_type'] == 'soft'


def test_a_value_given_on_resume_wins_and_each_difference_is_one_line(capsys, world, distilled, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(distilled['out'], out)
    ckpt = out / 'checkpoint.pth'
    code, stdout, err = cli(capsys, '--resume', ckpt, '--output_dir', out, '--final_finetune', 2,
                            '--distillation-alpha', 0.3, '--no-model-ema', '--weight-decay', 0, '--lr', 0.5,
                            '--decay-epochs', 4, '--speed-repeats', 3)
    assert code == 0, err
    lines = stdout.splitlines()
    # the restored schedule makes --decay-epochs void: said once, by that warning (which names the run's value),
    # not again by a note (the cosine schedule ignores it too); a flag void for another reason gets its note
    assert f'warning: --decay-epochs 4.0 has no effect: the optimizer and learning-rate schedule restored from ' \
           f'{ckpt} continue those of --decay-epochs 15' in lines
    assert [line for line in lines if line.startswith('note:')] == [
        'note: --speed-repeats 3 has no effect: only --speed-only times the model']
    assert f'--distillation-alpha 0.3 given: {ckpt} was written with --distillation-alpha 0.7' in lines
    assert f'--no-model-ema given: {ckpt} was written with --model-ema' in lines
    assert f'warning: {ckpt} was written by a run of --final_finetune 1; its learning-rate schedule over 1 ' \
           f'epoch continues unchanged' in lines
    # the optimizer and its schedule are restored: such values cannot change them, and the run's stay
    assert f'warning: --weight-decay 0.0 has no effect: the optimizer and learning-rate schedule restored from ' \
           f'{ckpt} continue those of --weight-decay 0.05' in lines
    assert f'warning: --lr 0.5 has no effect: the optimizer and learning-rate schedule restored from ' \
           f'{ckpt} continue those of --lr 0.01' in lines
    final = torch.load(ckpt)
    assert final['args']['distillation_alpha'] == 0.3 and final['args']['model_ema'] is False
    assert final['args']['weight_decay'] == 0.05 and final['args']['lr'] == 0.01
    assert final['args']['distillation_type'] == 'soft'  # not given: the run's own


def test_a_continued_run_says_that_start_epoch_and_an_older_files_lr_are_void(capsys, world, distilled, tmp_path):
    """A continued run starts after the last epoch its checkpoint holds (DeiT's rule), so --start_epoch is void:
    said in a warning, and not judged against --final_finetune (5 >= 2 refuses a new run).  A checkpoint written
    before runs recorded their scaled lr restores its own schedule too, so a given --lr is void, also said."""
    for name in ('a', 'b'):
        shutil.copytree(distilled['out'], tmp_path / name)
    ckpt = tmp_path / 'a' / 'checkpoint.pth'
    code, stdout, err = cli(capsys, '--resume', ckpt, '--final_finetune', 2, '--start_epoch', 5)
    assert code == 0, err
    lines = stdout.splitlines()
    assert f'warning: --start_epoch 5 has no effect: the run continues after the last epoch {ckpt} holds' in lines
    assert any(line.startswith(f'Resumed from {ckpt}: continuing at epoch 1') for line in lines)
    assert not [line for line in lines if line.startswith('note:') and 'start_epoch' in line]
    old = tmp_path / 'b' / 'checkpoint.pth'
    state = torch.load(old, weights_only=False)
    del state['args']['scaled_lr']  # as written before runs recorded it
    torch.save(state, old)
    code, stdout, err = cli(capsys, '--resume', old, '--final_finetune', 2, '--lr', 0.5)
    assert code == 0, err
    assert (f'warning: --lr 0.5 has no effect: the optimizer and learning-rate schedule restored from {old} continue '
            f'those of the run') in stdout.splitlines()
    assert torch.load(old, weights_only=False)['optimizer']['param_groups'][0]['initial_lr'] == \
        state['optimizer']['param_groups'][0]['initial_lr']


def test_a_continued_run_says_its_seed_and_lr_are_the_runs_and_saves_what_ran(capsys, world, distilled, tmp_path):
    """The random streams saved in the checkpoint continue, so a given --seed changes nothing (said, and the run's
    seed kept in what is saved); the lr restored with the optimizer stays that of the run's batch, so a new
    --batch-size trains at it (said, and saved as the run's scaled lr)."""
    for name in ('a', 'b'):
        shutil.copytree(distilled['out'], tmp_path / name)
    first = torch.load(tmp_path / 'a' / 'checkpoint.pth')
    restored = first['optimizer']['param_groups'][0]['initial_lr']
    assert restored == pytest.approx(0.01 * 8 / 512) and first['args']['seed'] == 0
    runs = {}
    for name, extra in (('a', ['--seed', 7]), ('b', [])):
        ckpt = tmp_path / name / 'checkpoint.pth'
        code, stdout, err = cli(capsys, '--resume', ckpt, '--final_finetune', 2, '--batch-size', 4, *extra)
        assert code == 0, err
        runs[name] = stdout.splitlines(), torch.load(ckpt)
    lines, final = runs['a']
    ckpt = tmp_path / 'a' / 'checkpoint.pth'
    assert (f'warning: --seed 7 has no effect: the random streams saved in {ckpt} continue those of its --seed 0'
            in lines)
    assert not any(line.startswith('--seed 7 given') for line in lines)
    assert (f"note: the learning rate restored with the optimizer of {ckpt}, {restored:.2e}, continues as the run "
            f"set it; this run's flags (batch 4 x 1 processes) would have started at {0.01 * 4 / 512:.2e}") in lines
    assert f'Finetuning for epochs 1..1 (lr {restored:.2e} as restored, with batch 4 x 1 processes)' in lines
    assert final['args']['seed'] == 0 and final['args']['batch_size'] == 4
    assert final['args']['scaled_lr'] == final['optimizer']['param_groups'][0]['initial_lr'] == restored
    other = runs['b'][1]['model']  # the same run without --seed 7: the same weights, bit for bit
    assert all(torch.equal(v, other[k]) for k, v in final['model'].items())


def test_a_seed_given_to_a_run_that_cannot_continue_its_streams_seeds_them(capsys, world, distilled, tmp_path):
    """A checkpoint written by 2 processes, continued by 1: its saved streams cannot go on, so they are seeded from
    --seed; a given one then has an effect (it was said to have none), and the run saves it as its seed."""
    finals = {}
    for seed in (7, 8):
        out = shutil.copytree(distilled['out'], tmp_path / str(seed))
        ckpt = out / 'checkpoint.pth'
        saved = torch.load(ckpt)
        saved['rng'] = [saved['rng'][0], saved['rng'][0]]  # as two processes write it
        torch.save(saved, ckpt)
        code, stdout, err = cli(capsys, '--resume', ckpt, '--final_finetune', 2, '--seed', seed)
        assert code == 0, err
        assert 'has no effect' not in stdout + err
        assert ('note: the checkpoint cannot continue the random streams exactly (it was written by 2 processes, '
                'this run has 1); they are seeded from --seed and epoch 1 instead') in stdout + err
        finals[seed] = torch.load(ckpt)
        assert finals[seed]['args']['seed'] == seed
    assert not all(torch.equal(v, finals[8]['model'][k]) for k, v in finals[7]['model'].items())


def test_a_continued_run_keeps_its_data_set(capsys, world, distilled, tmp_path):
    out = shutil.copytree(distilled['out'], tmp_path / 'out')
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, stdout, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--final_finetune', 2, '--data-set', 'DIGITS')
    assert code == 2
    assert err.strip() == (f'error: --data-set DIGITS: {out / "checkpoint.pth"} continues a run trained with '
                           f'--data-set IMNET, whose labels name other classes (leave the flag out to continue it)')
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_continued_inaturalist_run_keeps_its_category(tmp_path):
    """iNaturalist's labels are the classes of its --inat-category: another category would continue the run on other
    classes (refused before anything is read); for other data sets the category means nothing (taken as given)."""
    for data_set, refused in (('INAT19', True), ('IMNET', False)):
        path = tmp_path / f'{data_set}.pth'
        torch.save({'model': {}, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 0,
                    'args': {'model': 'deit_digits_patch4_32', 'data_set': data_set, 'inat_category': 'kingdom'}}, path)
        args = finetune.get_args_parser().parse_args(['--resume', str(path), '--inat-category', 'order'])
        if refused:
            with pytest.raises(UserError, match=rf'^--inat-category order: {re.escape(str(path))} continues a run '
                                                rf'trained with --inat-category kingdom, whose labels name other'):
                finetune.continue_run(args)
        else:
            lines, inherited, _ = finetune.continue_run(args)
            assert args.inat_category == 'order' and 'inat_category' not in inherited
            assert f'--inat-category order given: {path} was written with --inat-category kingdom' in lines


def test_a_continued_run_keeps_its_mixed_precision_where_it_ran_on_cuda(tmp_path):
    """--no-amp is per run, not per invocation: a CUDA run started without AMP continues without it (said in the
    line of settings taken over); a CPU run records AMP off whatever was asked, so it hands nothing on."""
    for device, handed_on in (('cuda', True), ('cpu', False)):
        path = tmp_path / f'{device}.pth'
        torch.save({'model': {}, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 0,
                    'args': {'model': 'deit_digits_patch4_32', 'amp': False, 'device': device}}, path)
        args = finetune.get_args_parser().parse_args(['--resume', str(path)])
        lines, inherited, _ = finetune.continue_run(args)
        assert args.amp is not handed_on and ('amp' in inherited) is handed_on
        assert ('--no-amp' in lines[0].split(': ', 1)[1].split()) is handed_on


def test_a_teacher_that_is_gone_is_one_line(capsys, world, distilled, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(distilled['out'], out)
    moved = tmp_path / 'teacher.pth'
    shutil.copy(distilled['teacher'], moved)
    ckpt = torch.load(out / 'checkpoint.pth')
    ckpt['args']['teacher_path'] = str(tmp_path / 'gone.pth')
    torch.save(ckpt, out / 'checkpoint.pth')
    code, stdout, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--final_finetune', 2)
    assert code == 2
    assert err.strip() == (f'error: teacher checkpoint not found: {tmp_path / "gone.pth"} (--teacher-path of the run '
                           f'{out / "checkpoint.pth"} continues; give --teacher-path to change it)')
    code, stdout, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--final_finetune', 2,
                            '--teacher-path', moved)
    assert code == 0, err
    assert f'Teacher cc_deit_digits_patch4_32 from {moved} (dense)' in stdout


def test_a_pruned_file_starts_a_new_run(capsys, world, tmp_path):
    pruned = tmp_path / 'pruned_0.3.pth'
    code, _, err = cli(capsys, '--prune', '--prune_rate', 0.3, '--resume', world['dense'], '--data-path',
                       world['data'], '--output_dir', tmp_path, '--smoothing', 0.3, '--prune-batches', 1)
    assert code == 0, err
    assert torch.load(pruned)['args']['smoothing'] == 0.3
    code, stdout, err = cli(capsys, '--resume', pruned, '--data-path', world['data'], '--output_dir',
                            tmp_path / 'ft', '--final_finetune', 1)
    assert code == 0, err
    assert 'Continuing the run' not in stdout
    assert torch.load(tmp_path / 'ft' / 'checkpoint.pth')['args']['smoothing'] == 0.1


def test_given_flags_are_told_apart_from_defaults():
    parser = finetune.get_args_parser()
    args = parser.parse_args(['--lr', '0.01', '--no-model-ema', '--repeated-aug'])
    assert finetune.given_flags(args) == {'lr', 'model_ema', 'repeated_aug'}  # even when equal to the default
    assert 'given' not in vars(args)  # not saved with the arguments
    plain = argparse.Namespace(**{**vars(parser.parse_args([])), 'lr': 0.5})  # built in a script
    assert finetune.given_flags(plain) == {'lr'}


def test_the_originals_short_spelling_of_the_decay_rate():
    # the original's parser spells --decay-rate also --dr (here not a prefix of --drop or --drop-path)
    args = finetune.get_args_parser().parse_args(['--dr', '0.5'])
    assert args.decay_rate == 0.5 and finetune.given_flags(args) == {'decay_rate'}


# ----------------------------------------------------------------------------------------------------------
# 8. train and validation classes

def test_an_extra_validation_class_folder_is_refused(capsys, world, tmp_path):
    data = shutil.copytree(world['data'], tmp_path / 'data')
    shutil.copytree(data / 'val' / 'b', data / 'val' / 'bb')  # sorted between b and c: c and d would shift
    expected = (f'error: the class folders of train/ and val/ under {data} differ (only in val/: bb): labels are '
                f'positions in the sorted folder list, so classes after the first difference would be scored '
                f'against another class\'s label')
    for argv in (['--eval', '--resume', world['dense']],
                 ['--prune', '--prune_mode', 'random', '--resume', world['dense'], '--output_dir', tmp_path / 'p'],
                 ['--prune', '--resume', world['dense'], '--output_dir', tmp_path / 'p'],
                 ['--resume', world['dense'], '--output_dir', tmp_path / 'ft', '--final_finetune', 1]):
        code, out, err = cli(capsys, *argv, '--data-path', data)
        assert (code, err.strip()) == (2, expected), argv
        assert 'Scoring:' not in out and 'Epoch:' not in out
    assert not (tmp_path / 'p').exists() and not (tmp_path / 'ft').exists()
    shutil.rmtree(data / 'val' / 'bb')
    shutil.rmtree(data / 'train' / 'a')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 2 and '(only in val/: a)' in err


def test_a_train_folder_without_class_folders_does_not_stop_an_evaluation(capsys, world, tmp_path):
    """--eval reads val/ alone: a train/ that holds no class folder yet (ImageNet's per-class archives, not
    unpacked) has no labels to compare with, and was refused as differing in every class ('only in val/: a, b,
    c, d')."""
    data = shutil.copytree(world['data'], tmp_path / 'data')
    shutil.rmtree(data / 'train')
    (data / 'train').mkdir()
    (data / 'train' / 'a.tar').write_bytes(b'archive')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert (code, err) == (0, ''), err
    assert 'Accuracy of the network on the 16 test images' in out


def test_inaturalist_validation_classes_missing_from_training_are_refused(tmp_path):
    from datasets import build_dataset
    from utils import UserError
    categories = [{'id': i, 'name': n} for i, n in enumerate(('owl', 'cat', 'fern'))]
    (tmp_path / 'categories.json').write_text(json.dumps(categories))
    for split, cats in (('train', [0, 1]), ('val', [2, 0])):
        images = [{'id': i, 'file_name': f'{split}_{i}.jpg'} for i in range(len(cats))]
        anns = [{'image_id': i, 'category_id': c} for i, c in enumerate(cats)]
        (tmp_path / f'{split}2018.json').write_text(json.dumps({'images': images, 'annotations': anns}))
    args = argparse.Namespace(data_set='INAT', data_path=str(tmp_path), inat_category='name', input_size=32,
                              eval_crop_ratio=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(UserError, match=r'val2018\.json has classes \(name\) that train2018\.json does not: fern;'):
        build_dataset(False, args)


def test_a_head_with_more_classes_than_the_data_set_is_a_warning(capsys, world):
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'])
    assert code == 0, err
    assert ("warning: the model's head has 10 classes and the validation set 4: labels 0..3 are read as the "
            "head's first 4 classes") in out.splitlines()


# ----------------------------------------------------------------------------------------------------------
# B. every numeric flag: finite and in its range, one line before any work

# Beyond nan, inf and -1: a value just outside each flag's range.
OUT_OF_RANGE = {
    'prune_rate': '1', 'prune_batches': '0', 'final_finetune': '0', 'iter_nums': '0', 'finetune_nums': '-2',
    'input_size': '0', 'drop': '1',
    'drop_path': '1', 'model_ema_decay': '1.5', 'opt_eps': '0', 'opt_betas': '1', 'clip_grad': '0',
    'momentum': '1.5', 'weight_decay': '-1e-3', 'lr': '0', 'lr_noise': '1.5', 'lr_noise_pct': '-0.5',
    'lr_noise_std': '-0.5', 'warmup_lr': '-1e-6', 'min_lr': '-1e-6', 'decay_epochs': '0', 'decay_milestones': '0',
    'warmup_epochs': '-2',
    'cooldown_epochs': '-2', 'patience_epochs': '-2', 'decay_rate': '0', 'color_jitter': '-0.1', 'smoothing': '1',
    'reprob': '1.5', 'recount': '0', 'mixup': '-0.5', 'cutmix': '-0.5', 'cutmix_minmax': '0', 'mixup_prob': '1.5',
    'mixup_switch_prob': '1.5', 'eval_crop_ratio': '0', 'distillation_alpha': '-0.5', 'distillation_tau': '0',
    'batch_size': '0', 'seed': str(2 ** 32), 'start_epoch': '-2', 'num_workers': '-2', 'print_freq': '0',
    'speed_repeats': '0', 'speed_warmup': '-2', 'world_size': '0', 'local_rank': '-2',
}
# List flags: the other values that make a list of the right length.
COMPANIONS = {'opt_betas': ['0.9'], 'cutmix_minmax': ['0.5'], 'lr_noise': [], 'decay_milestones': []}
# Documented acceptances: edges inside the range, and huge but finite values (a diverging run stops with exit 3);
# a list flag's values are separated by spaces.
ACCEPTED = [('decay_rate', '1e30'), ('lr', '1e3'), ('prune_rate', '0.999'), ('drop_path', '0.999'),
            ('model_ema_decay', '1'), ('model_ema_decay', '0'), ('momentum', '0'), ('weight_decay', '0'),
            ('smoothing', '0'), ('reprob', '1'), ('mixup', '0'), ('eval_crop_ratio', '1'), ('warmup_lr', '0'),
            ('seed', str(2 ** 32 - 1)), ('num_workers', '0'), ('speed_warmup', '0'), ('color_jitter', '5'),
            ('color_jitter', '0'), ('lr_noise_pct', '0'), ('mixup_switch_prob', '1'), ('mixup_switch_prob', '0'),
            ('lr_noise', '0 1'), ('lr_noise', '1'), ('cutmix_minmax', '0.5 1'), ('opt_betas', '0 0.999')]


def numeric_flags():
    parser = finetune.get_args_parser()
    return {a.dest: finetune.flag_name(a) for a in parser._actions if a.type in (int, float)}


def test_every_numeric_flag_has_a_range_here_and_in_the_program():
    assert set(numeric_flags()) == set(OUT_OF_RANGE) == set(finetune.NUMERIC_FLAGS)


@pytest.mark.parametrize('dest', sorted(OUT_OF_RANGE))
def test_bad_numbers_are_one_line_naming_the_flag(capsys, tmp_path, dest):
    flag = numeric_flags()[dest]
    for value in ('nan', 'inf', '-1', OUT_OF_RANGE[dest]):
        argv = ['--eval', '--resume', str(tmp_path / 'missing.pth'), flag, *COMPANIONS.get(dest, []), value]
        if dest not in COMPANIONS:
            argv[-2:] = [f'{flag}={value}']
        try:
            code = finetune.main(argv)
        except SystemExit as e:  # argparse itself refuses what is not a number of the flag's type
            code = e.code
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), (value, err)
        assert flag in lines[0] and 'checkpoint not found' not in lines[0], (value, lines[0])
        assert not out


def test_the_original_codes_round_flags_are_accepted_and_noted(capsys, world, tmp_path):
    """The original code's --iter_nums and --finetune_nums (defaults 12 and 1 in its pruning parser) were never read
    by its finetune.py, which prunes once: any value is taken, so its scripts run, and named as having no effect;
    a finetuning checkpoint whose args hold the original's defaults continues."""
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'],
                         '--iter_nums', 3, '--finetune_nums', 0)
    assert code == 0, err
    assert ("note: --iter_nums 3, --finetune_nums 0 have no effect: the original code's finetune.py never read them "
            "either: --prune scores and prunes once") in out.splitlines()
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'])
    assert code == 0 and '--iter_nums' not in out + err  # the defaults, not given, say nothing
    out_dir = tmp_path / 'run'
    code, out, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out_dir,
                         '--final_finetune', 1)
    assert code == 0, err
    checkpoint = torch.load(out_dir / 'checkpoint.pth')
    assert (checkpoint['args']['iter_nums'], checkpoint['args']['finetune_nums']) == (12, 1)
    checkpoint['args'].update(iter_nums=1, finetune_nums=0)  # as this project wrote them before
    torch.save(checkpoint, out_dir / 'checkpoint.pth')
    code, out, err = cli(capsys, '--resume', out_dir / 'checkpoint.pth', '--final_finetune', 2)
    assert code == 0, err
    assert '--iter_nums' not in out + err and '--finetune_nums' not in out + err  # no effect: not taken over
    assert torch.load(out_dir / 'checkpoint.pth')['epoch'] == 1


def test_deits_resplit_flag_is_accepted_and_noted(capsys, world):
    """DeiT's --resplit, in the original code's parser too, is read by neither (their transform passes timm no
    split): taken, so their scripts run, and named as having no effect."""
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--resplit')
    assert code == 0, err
    assert ("note: --resplit has no effect: DeiT and the original code never read it either (timm's random erasing "
            "is given no split)") in out.splitlines()


def test_deits_finetune_flag_with_a_file_is_refused_naming_resume(capsys, world, tmp_path):
    """DeiT's --finetune (start from a file's weights), in the original code's parser too, was never read there: a
    file given to it would be dropped, so it is one line naming --resume, before any work; its default is taken."""
    out_dir = tmp_path / 'run'
    code, out, err = cli(capsys, '--data-path', world['data'], '--output_dir', out_dir, '--finetune', world['dense'])
    assert code == 2 and not out and not out_dir.exists()
    assert err == (f"error: --finetune {world['dense']}: the original code's parser has this flag of DeiT's, but never "
                   f'read it; to start from the weights of a file give it to --resume\n')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--finetune', '')
    assert code == 0, err


def test_a_run_whose_args_hold_deits_finetune_and_resplit_continues_without_them(capsys, world, tmp_path):
    """DeiT's checkpoints record its --finetune (the file the run started from) and --resplit; neither is read here,
    so a continued run takes neither over (a file taken over would be refused as a given one is)."""
    out_dir = tmp_path / 'run'
    code, out, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out_dir,
                         '--final_finetune', 1)
    assert code == 0, err
    checkpoint = torch.load(out_dir / 'checkpoint.pth')
    assert (checkpoint['args']['finetune'], checkpoint['args']['resplit']) == ('', False)
    checkpoint['args'].update(finetune=str(world['dense']), resplit=True)  # a DeiT run started with both
    torch.save(checkpoint, out_dir / 'checkpoint.pth')
    code, out, err = cli(capsys, '--resume', out_dir / 'checkpoint.pth', '--final_finetune', 2)
    assert code == 0, err
    assert not re.search(r'--finetune\b(?!_)|--resplit', out + err), out + err
    assert torch.load(out_dir / 'checkpoint.pth')['epoch'] == 1


def test_num_workers_past_what_a_machine_starts_is_refused(capsys, monkeypatch, tmp_path):
    """Each worker is a process the loader starts at once: a huge --num_workers forked processes without end (until
    the machine refused) instead of one line; up to the bound the value is accepted."""
    monkeypatch.setattr(finetune, 'build_data', no_work)
    parser = finetune.get_args_parser()
    finetune.check_numbers(parser.parse_args(['--num_workers', '1024']), parser, finetune.NUMERIC_FLAGS)
    for workers in ('1025', '99999999999999999999'):
        code = finetune.main(['--eval', '--resume', str(tmp_path / 'missing.pth'), '--device', 'cpu',
                              '--data-set', 'DIGITS', '--num_workers', workers])
        out, err = capsys.readouterr()
        assert code == 2 and not out, err
        assert err == f'error: --num_workers must be in [0, 1024], got {workers}\n'


def test_documented_acceptances():
    parser = finetune.get_args_parser()
    flags = numeric_flags()
    for dest, value in ACCEPTED:
        finetune.check_numbers(parser.parse_args([flags[dest], *value.split()]), parser, finetune.NUMERIC_FLAGS)


def test_a_recorded_value_fits_a_flag_only_as_the_command_line_would_give_it():
    """A continued run takes over the recorded args that fit their flags (utils.cli.fits): a value of the flag's
    type, one of its choices, a list for a list flag, True or False for a switch, None where the default is None.
    Anything else (a float for an integer flag, a bool for a number, a name outside the choices, a scalar for a
    list flag) is not taken over: the run would fail with it, or do something no command line asks."""
    from utils.cli import fits
    actions = {a.dest: a for a in finetune.get_args_parser()._actions}
    taken = [('batch_size', 8), ('lr', 1e-3), ('lr', 1), ('data_set', 'CIFAR'), ('model_ema', True),
             ('model_ema', False), ('opt_betas', [0.9, 0.99]), ('opt_betas', (0.9, 0.99)), ('opt_betas', None),
             ('decay_milestones', [2, 4]), ('teacher_model', 'deit_tiny_patch16_224')]
    left = [('batch_size', 8.0), ('batch_size', True), ('batch_size', None), ('lr', True), ('lr', '1e-3'),
            ('data_set', 'FOO'), ('model_ema', 1), ('opt_betas', 0.9), ('opt_betas', [0.9, True]),
            ('decay_milestones', [2, 4.0]), ('teacher_model', 3)]
    assert [case for case in taken if not fits(actions[case[0]], case[1])] == []
    assert [case for case in left if fits(actions[case[0]], case[1])] == []


# ----------------------------------------------------------------------------------------------------------
# C. interruptions, output directories, names

@pytest.mark.parametrize('signal_name', ['interrupted', 'terminated (SIGTERM)'])
def test_interrupted_in_the_first_epoch_says_no_checkpoint_was_written(capsys, monkeypatch, world, tmp_path,
                                                                      signal_name):
    stop = KeyboardInterrupt if signal_name == 'interrupted' else finetune.Terminated

    def interrupted(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(engine, 'train_one_epoch', interrupted)
    out = tmp_path / 'deep' / 'out'
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--final_finetune', 2)
    assert code == (130 if stop is KeyboardInterrupt else 143)
    assert err.strip() == f'{signal_name}; no epoch had finished, so no checkpoint was written'
    assert not (tmp_path / 'deep').exists()  # and no empty directory or TensorBoard file either


def test_out_of_gpu_memory_is_one_line_with_the_batch_and_what_was_kept(capsys, monkeypatch, world, tmp_path):
    """A GPU that runs out of memory is not a traceback: one line with torch's figures, the batch size that did it,
    the way round it (and, for finetuning, that the learning rate follows the batch), and what the run kept."""
    real_train = engine.train_one_epoch

    def out_of_memory_at_epoch_1(*args, **kwargs):
        if args[5] == 1:  # (model, criterion, loader, optimizer, device, epoch, ...)
            raise torch.OutOfMemoryError(OUT_OF_MEMORY)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(engine, 'train_one_epoch', out_of_memory_at_epoch_1)
    out = tmp_path / 'out'
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--final_finetune', 2, '--batch-size', 16)
    ckpt = out / 'checkpoint.pth'
    assert code == finetune.EXIT_OUT_OF_MEMORY == 1
    assert err.strip() == (f'error: out of GPU memory ({OUT_OF_MEMORY_FIGURES}) with --batch-size 16 per process: '
                           f'a smaller --batch-size needs less (evaluation batches are 1.5 times it); the learning '
                           f'rate scales with it (--lr x batch x processes / 512); the last complete checkpoint is '
                           f'{ckpt} (epoch 0); continue with --resume {ckpt}')
    assert load_checkpoint_file(str(ckpt))['epoch'] == 0

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(OUT_OF_MEMORY)

    monkeypatch.setattr(finetune, 'evaluate', out_of_memory)
    code, _, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--batch-size', 8)
    assert (code, err.strip()) == (1, f'error: out of GPU memory ({OUT_OF_MEMORY_FIGURES}) with --batch-size 8 per '
                                      f'process: a smaller --batch-size needs less (evaluation batches are 1.5 times '
                                      f'it); nothing was written')
    # the original protocol times its own batch of 256 unless --batch-size is given: the line names that batch
    monkeypatch.setattr(engine, 'throughput_original_protocol', out_of_memory)
    code = finetune.main(['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--speed-only', '--speed-protocol',
                          'original', '--resume', str(world['dense'])])
    err = capsys.readouterr().err
    assert (code, err.strip()) == (1, f'error: out of GPU memory ({OUT_OF_MEMORY_FIGURES}) with a batch of 256 (the '
                                      f'original protocol\'s) per process: a smaller --batch-size needs less; '
                                      f'nothing was written')


# What torch raises (torch.AcceleratorError where it has one) for CUDA's own errors: the error, then CUDA's advice
CUDA_ADVICE = ('\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below '
               'might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with '
               '`TORCH_USE_CUDA_DSA` to enable device-side assertions.\n')


def test_out_of_gpu_memory_outside_torchs_allocator_is_one_line_too(capsys, monkeypatch, world):
    """CUDA's own out-of-memory errors (a CUDA context, cuBLAS's handle or workspace, pinned host memory: memory not
    taken through torch's caching allocator) come as a plain RuntimeError, not OutOfMemoryError: the same one line
    as torch's (they were a traceback); another CUDA error stays a traceback."""
    error = getattr(torch, 'AcceleratorError', RuntimeError)
    for text, said in (('CUDA error: out of memory', 'CUDA error: out of memory'),
                       ('CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`',
                        'CUBLAS_STATUS_ALLOC_FAILED')):
        def raise_it(*args, **kwargs):
            raise error(text + CUDA_ADVICE)

        monkeypatch.setattr(finetune, 'evaluate', raise_it)
        code, _, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'],
                           '--batch-size', 8)
        assert (code, err.strip()) == (1, f'error: out of GPU memory ({said}) with --batch-size 8 per process: a '
                                          f'smaller --batch-size needs less (evaluation batches are 1.5 times it); '
                                          f'nothing was written')

    def illegal_access(*args, **kwargs):
        raise error('CUDA error: an illegal memory access was encountered' + CUDA_ADVICE)

    monkeypatch.setattr(finetune, 'evaluate', illegal_access)
    with pytest.raises(RuntimeError, match='illegal memory access'):
        cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--batch-size', 8)


def test_out_of_cpu_memory_is_one_line_too(capsys, monkeypatch, world, tmp_path):
    """torch's CPU allocator raises a plain RuntimeError when it cannot allocate (not the GPU's OutOfMemoryError):
    the same one line, naming the CPU, with what was asked for; and the finetuning run says what it kept."""
    def allocate_32_tib(*args, **kwargs):
        torch.empty(2 ** 45, dtype=torch.uint8)  # more than any machine here has: torch's own refusal
        raise AssertionError('the allocation succeeded')

    monkeypatch.setattr(finetune, 'evaluate', allocate_32_tib)
    code, _, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--batch-size', 8)
    assert (code, err.strip()) == (1, 'error: out of CPU memory (Tried to allocate 32768.00 GiB, which the allocator '
                                      'refused) with --batch-size 8 per process: a smaller --batch-size needs less '
                                      '(evaluation batches are 1.5 times it); nothing was written')
    monkeypatch.setattr(engine, 'train_one_epoch', allocate_32_tib)
    out = tmp_path / 'out'
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--final_finetune', 1, '--batch-size', 16)
    assert code == 1 and err.strip().startswith('error: out of CPU memory (Tried to allocate 32768.00 GiB')
    assert err.strip().endswith('; no epoch had finished, so no checkpoint was written'), err
    monkeypatch.setattr(engine, 'train_one_epoch', lambda *a, **kw: torch.ones(2).view(3))  # another RuntimeError
    with pytest.raises(RuntimeError, match='shape'):  # a bug stays a traceback
        cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', tmp_path / 'bug',
            '--final_finetune', 1, '--batch-size', 16)


def test_a_refused_run_creates_nothing(capsys, world, tmp_path):
    out = tmp_path / 'new' / 'out'
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--distillation-type', 'soft', '--teacher-path', world['base'] / 'tiny_teacher_missing.pth')
    assert code == 2 and 'teacher checkpoint not found' in err
    code, _, err = cli(capsys, '--resume', world['dense'], '--data-path', world['data'], '--output_dir', out,
                       '--model', 'deit_tiny_patch16_224')  # refused while loading: does not fit
    assert code == 2 and 'does not fit' in err
    assert not (tmp_path / 'new').exists()


def test_attn_and_random_prunes_at_one_rate_share_an_output_dir(capsys, world, tmp_path):
    for mode in ('attn', 'random'):
        cap = ['--prune-batches', 1] if mode == 'attn' else []  # (random masks score nothing: refused there)
        code, out, err = cli(capsys, '--prune', '--prune_mode', mode, '--prune_rate', 0.25, '--resume', world['dense'],
                             '--data-path', world['data'], '--output_dir', tmp_path, *cap)
        assert code == 0, err
        assert 'masks sha1' not in out
    assert sorted(os.listdir(tmp_path)) == ['prune_attn_0.25', 'prune_log.txt', 'prune_random_0.25',
                                            'pruned_0.25.pth', 'pruned_random_0.25.pth']
    attn, rand = (torch.load(tmp_path / name) for name in ('pruned_0.25.pth', 'pruned_random_0.25.pth'))
    assert attn['args']['prune_mode'] == 'attn' and 'scores' in attn
    assert rand['args']['prune_mode'] == 'random' and 'scores' not in rand
    logged = [json.loads(line)['prune_mode'] for line in (tmp_path / 'prune_log.txt').read_text().splitlines()]
    assert logged == ['attn', 'random']


def test_help_names_the_script_and_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '250')  # no wrapping
    with pytest.raises(SystemExit) as info:
        finetune.main(['--help'])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith('usage: finetune.py')
    assert re.search(r'--lr LR\s+base lr, scaled by batch \* world_size / 512 \(default: 0\.01\)', out)


def test_help_shows_the_default_of_every_flag_that_takes_a_value(capsys, monkeypatch):
    """Flags without a help text show their default too (--weight-decay, --min-lr, --warmup-lr, ... are the
    recipe's, and --help is where a user reads them)."""
    monkeypatch.setenv('COLUMNS', '1000')  # one line per flag
    with pytest.raises(SystemExit):
        finetune.main(['--help'])
    out = capsys.readouterr().out
    entries = {}  # first option string -> its entry of the help (the flag's line and any continuation lines)
    for line in out[out.index('options:'):].splitlines()[1:]:
        if line.startswith('  -'):
            flag = line.split()[0].rstrip(',')
            entries[flag] = line
        elif line.strip():
            entries[flag] += ' ' + line.strip()
    checked = 0
    for action in finetune.get_args_parser()._actions:
        if not action.option_strings or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue  # switches (store_true / store_false) and hidden flags
        if (action.help and 'default' in action.help) or action.default == '':
            continue  # the text says its default itself; an empty default is not shown
        entry = entries[action.option_strings[0]]
        assert f'default: {action.default})' in entry or entry.endswith(f'default: {action.default}'), entry
        checked += 1
    assert checked > 40
    for flag, value in (('--weight-decay', '0.05'), ('--min-lr', '1e-06'), ('--warmup-lr', '1e-05'),
                        ('--warmup-epochs', '0')):
        assert entries[flag].endswith(f'default: {value}'), entries[flag]
    assert '30 60' in entries['--decay-milestones']  # (its text named "timm's defaults" without their values)
    assert '(default: )' not in out  # an empty default says nothing


# ----------------------------------------------------------------------------------------------------------
# D. flags a run accepts but does not use: named in a note, and really not read

class RecordedReads(ParsedArgs):
    """Parsed arguments that record every public attribute read of them (class-wide: copies made with
    ``argparse.Namespace(**vars(args))`` while it is patched in record too)."""
    __slots__ = ()
    reads = set()

    def __getattribute__(self, name):
        if not name.startswith('_'):
            RecordedReads.reads.add(name)
        return super().__getattribute__(name)


# Read while the run works, yet without effect there: the model is built with its dropout rates and then runs in
# eval mode (Taylor scoring, evaluation and timing alike); timm's create_scheduler reads every schedule flag and
# each schedule ignores those SCHEDULES_READING does not give it, and the cool-down only lengthens an epoch count
# finetuning does not use (test_the_schedules_ignore_the_flags_they_are_said_to).
# Taylor scoring reads the erasing flags from a copy of the arguments that turns them off (--aa none, --reprob 0,
# so --remode and --recount erase nothing; test_scoring_sees_the_training_transform_without_auto_augment_or_erasing).
# Likewise timm reads the noise flags without --lr-noise (the schedules test), and the erasing mode and count
# without erasing (test_without_random_erasing_its_mode_and_count_change_nothing).
# timm's optimizer_kwargs reads momentum, betas and eps whatever the optimizer, which takes those its registry gives
# it, and create_scheduler reads --warmup-lr without a warm-up (test_the_optimizers_and_schedules_ignore_...);
# --world_size is read after the launcher's WORLD_SIZE (or 1) has replaced it (init_distributed_mode); on the CPU
# run() has turned --amp off before the work reads it, and the loaders pin memory on CUDA only.
READ_WITHOUT_EFFECT = ({'drop', 'drop_path', 'cooldown_epochs', 'lr_noise_pct', 'lr_noise_std', 'remode', 'recount',
                        'momentum', 'opt_betas', 'opt_eps', 'warmup_lr', 'world_size', 'amp', 'pin_mem',
                        'train_interpolation'}  # (timm's crop, replaced at 32 px: see the interpolation test)
                       | set(finetune.SCHEDULES_READING))
READ_OFF_BY_SCORING = set(finetune.ERASING)

RUNS = {
    'eval': ['--eval', '--data-set', 'IMNET'],
    'eval-digits': ['--eval', '--data-set', 'DIGITS'],
    'eval-fast-path': ['--eval', '--data-set', 'IMNET', '--fast-path', 'torch'],
    'speed': ['--speed-only', '--data-set', 'IMNET', '--speed-repeats', '1', '--speed-warmup', '0'],
    'speed-digits': ['--speed-only', '--data-set', 'DIGITS', '--speed-repeats', '1', '--speed-warmup', '0'],
    'speed-fast-path': ['--speed-only', '--speed-repeats', '1', '--speed-warmup', '0', '--fast-path', 'torch'],
    'speed-original': ['--speed-only', '--speed-protocol', 'original', '--speed-repeats', '1'],
    'prune': ['--prune', '--data-set', 'IMNET', '--prune-batches', '1', '--reprob', '0.5'],
    'prune-digits': ['--prune', '--data-set', 'DIGITS', '--prune-batches', '1'],
    'prune-random': ['--prune', '--prune_mode', 'random', '--data-set', 'IMNET'],
    'finetune': ['--data-set', 'IMNET', '--final_finetune', '1'],
    'finetune-digits': ['--data-set', 'DIGITS', '--final_finetune', '1'],
    'finetune-step': ['--data-set', 'IMNET', '--final_finetune', '1', '--sched', 'step'],
}


@pytest.mark.parametrize('run', list(RUNS))
def test_flags_said_to_have_no_effect_are_not_read_by_the_run(capsys, monkeypatch, world, few_digits, tmp_path, run):
    """From the first check of the training transform (run() validates the strings a run will read) to the end
    of the work, no flag the run says has no effect is read, apart from READ_WITHOUT_EFFECT (and, for Taylor
    scoring, the erasing flags its copy of the arguments turns off)."""
    argv = [*RUNS[run], '--resume', world['dense']]
    if '--speed-only' not in argv and 'IMNET' in argv:
        argv += ['--data-path', world['data']]
    if '--eval' not in argv and '--speed-only' not in argv:
        argv += ['--output_dir', tmp_path / 'out']
    seen = {}
    RecordedReads.reads = set()

    def recorded(work):
        def wrapper(args, *rest):
            if 'unused' not in seen:  # (asked before the recording starts: its own reads are not the run's)
                seen['unused'] = finetune.unused_flags(args)
            args.__class__ = RecordedReads
            monkeypatch.setattr(argparse, 'Namespace', RecordedReads)  # scoring's copy of the args records too
            return work(args, *rest)
        return wrapper

    for name in ('check_training_transform', 'run_eval', 'run_speed', 'run_prune', 'run_finetune'):
        monkeypatch.setattr(finetune, name, recorded(getattr(finetune, name)))
    code, out, err = cli(capsys, *argv)
    reads = set(RecordedReads.reads)
    monkeypatch.undo()
    assert code == 0, err
    assert seen['unused'], 'every run leaves some flag unused'
    assert len(reads) > 5  # the recording works: the run reads its own flags
    read_anyway = (set(seen['unused']) & reads) - READ_WITHOUT_EFFECT - (
        READ_OFF_BY_SCORING if run == 'prune' else set())
    assert not read_anyway, f'said to have no effect, but read by {run}: {sorted(read_anyway)}'


TAYLOR = ('Taylor scoring trains nothing, and reads the training images without auto-augment, random erasing, mixup '
          'or cutmix through the model in eval mode')
NOTED = {  # the run's flags beyond DIGITS_ARGS (--mixup 0 --cutmix 0 --aa none --reprob 0 --print-freq 100 ...)
    'finetune-cpu': (['--data-set', 'DIGITS', '--final_finetune', '1', '--no-amp', '--no-pin-mem'],
                     ['note: --no-amp, --no-pin-mem have no effect: mixed precision and pinned memory are used on '
                      'CUDA only, and this run is on the CPU',
                      'note: --aa none, --reprob 0.0 have no effect: --data-set DIGITS has its own fixed transform']),
    'prune': (['--prune', '--prune-batches', '1', '--lr', '0.1', '--smoothing', '0.2', '--drop-path', '0'],
              [f'note: --lr 0.1, --mixup 0.0, --cutmix 0.0, --aa none, --reprob 0.0, --drop-path 0.0 have no effect: '
               f'{TAYLOR}']),
    'prune-random': (['--prune', '--prune_mode', 'random', '--smoothing', '0.2'],
                     ['note: --mixup 0.0, --cutmix 0.0, --aa none, --reprob 0.0, --smoothing 0.2 have no effect: '
                      '--prune_mode random trains nothing and reads no training image']),
    'finetune-digits': (['--data-set', 'DIGITS', '--final_finetune', '1', '--cooldown-epochs', '5', '--color-jitter',
                         '0.3', '--inat-category', 'kingdom', '--lr-noise-pct', '0.5', '--min-lr', '1e-5'],
                        ['note: --color-jitter 0.3, --aa none, --reprob 0.0 have no effect: --data-set DIGITS has its '
                         'own fixed transform',
                         'note: --inat-category kingdom has no effect: only iNaturalist has categories',
                         'note: --lr-noise-pct 0.5 has no effect: no --lr-noise is given',
                         'note: --cooldown-epochs 5 has no effect: the run ends after --final_finetune epochs, where '
                         'the cool-down would start',
                         "note: --min-lr 1e-05 is above the weight matrices' 1e-06 (without --uniform-lr): the --sched "
                         'cosine schedule rises to it over the run instead of decaying to it']),
    'finetune-step': (['--final_finetune', '1', '--sched', 'step', '--min-lr', '1e-5', '--decay-epochs', '1',
                       '--patience-epochs', '3', '--remode', 'const', '--dist-eval', '--no-repeated-aug'],
                      ['note: --remode const has no effect: --reprob 0 erases nothing',
                       'note: --dist-eval has no effect: a single process evaluates every image',
                       'note: --no-repeated-aug has no effect: repeated augmentation shares each image among several '
                       'processes (as in DeiT); one process shuffles plainly',
                       "note: --patience-epochs 3, --min-lr 1e-05 have no effect: not read by timm's step schedule"]),
    'finetune-warm-up': (['--data-set', 'DIGITS', '--final_finetune', '1', '--warmup-epochs', '1'],
                         ['note: --warmup-epochs 1 outlasts this 1-epoch run: its epochs train at schedule steps 0..0 '
                          '(epoch k >= 1 at step k - 1), all of them warm-up steps, so no epoch trains at the --sched '
                          'cosine schedule',
                          'note: --aa none, --reprob 0.0 have no effect: --data-set DIGITS has its own fixed transform',
                          "note: --warmup-lr 1e-05 is above the weight matrices' 1e-06 (without --uniform-lr): the "
                          'warm-up of --warmup-epochs 1 falls from it to that lr instead of rising to it']),
    'speed': (['--speed-only', '--data-set', 'IMNET', '--speed-repeats', '1', '--speed-warmup', '0'],
              ['note: --mixup 0.0, --cutmix 0.0, --aa none, --reprob 0.0 have no effect: --speed-only trains nothing',
               'note: --data-set IMNET, --num_workers 0, --print-freq 100 have no effect: --speed-only times random '
               'images (in --speed-dtype; fp32 under --speed-protocol original), prints no progress and writes '
               'nothing']),
}


@pytest.mark.parametrize('run', list(NOTED))
def test_each_kind_of_run_names_the_flags_it_does_not_use(capsys, world, few_digits, tmp_path, run):
    argv, notes = NOTED[run]
    argv = [*argv, '--resume', world['dense']]
    if '--speed-only' not in argv and 'DIGITS' not in argv:
        argv += ['--data-path', world['data']]
    if '--speed-only' not in argv:
        argv += ['--output_dir', tmp_path / 'out']
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith('note:')] == notes


def test_prune_does_not_call_the_colour_jitter_its_scoring_applies_void(capsys, world, tmp_path):
    """With an auto-augment policy timm applies no colour jitter, so finetuning notes --color-jitter as having no
    effect; Taylor scoring turns auto-augment off, so its images are jittered by the value given: no such note."""
    argv = ['--prune', '--prune-batches', '1', '--aa', 'rand-m9-mstd0.5-inc1', '--color-jitter', '0.3', '--resume',
            world['dense'], '--data-path', world['data'], '--output_dir', tmp_path]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert not [line for line in out.splitlines() if line.startswith('note:') and '--color-jitter' in line]
    args = finetune.get_args_parser().parse_args([*DIGITS_ARGS, *map(str, argv)])
    args.input_size, args.mean, args.std, args.distributed, args.rank = 32, (0.5,) * 3, (0.5,) * 3, False, 0
    jitters = [t for t in finetune.scoring_dataset(args)[0].transform.transforms
               if isinstance(t, torchvision.transforms.ColorJitter)]
    assert [j.brightness for j in jitters] == [pytest.approx((0.7, 1.3))]


@pytest.mark.parametrize('aa, noted', [('none', True), ('rand-m9-mstd0.5-inc1', False)])
def test_the_training_interpolation_is_noted_where_the_32_px_training_transform_does_not_read_it(
        capsys, world, tmp_path, aa, noted):
    """At 32 px the training crop is a padded crop of the squashed image: without auto-augment (which
    interpolates its rotations and shears) --train-interpolation changes no transform, and a run says so; Taylor
    scoring turns auto-augment off, so --prune says so whatever --aa is."""
    from PIL import Image
    image = Image.open(os.path.join(world['data'], 'train', 'a', '0.png')).convert('RGB')

    def transformed(interpolation):  # the training transform of 20 seeds on one image
        args = finetune.get_args_parser().parse_args(['--model', 'deit_digits_patch4_32', '--aa', aa,
                                                      '--train-interpolation', interpolation])
        args.input_size, args.mean, args.std = 32, (0.5,) * 3, (0.5,) * 3
        transform = datasets.build_transform(True, args)
        images = []
        for seed in range(20):
            random.seed(seed)
            torch.manual_seed(seed)
            images.append(transform(image))
        return torch.stack(images)
    assert torch.equal(transformed('bilinear'), transformed('bicubic')) == noted  # what the note has to say
    args = finetune.get_args_parser().parse_args([*DIGITS_ARGS, '--aa', aa, '--train-interpolation', 'bilinear'])
    assert ('train_interpolation' in finetune.unused_flags(args)) == noted
    code, out, err = cli(capsys, '--prune', '--prune-batches', '1', '--aa', aa, '--train-interpolation', 'bilinear',
                         '--resume', world['dense'], '--data-path', world['data'], '--output_dir', tmp_path)
    assert code == 0, err
    assert [line for line in out.splitlines() if '--train-interpolation' in line] == [
        'note: --train-interpolation bilinear has no effect: at an input of 32 px or less the training crop is a '
        'padded crop of the image squashed to the input (bicubic), and only auto-augment would interpolate (off '
        'here, or turned off by Taylor scoring)']


def test_a_transform_string_a_run_does_not_use_is_noted_not_refused(capsys, world, tmp_path):
    """Scoring turns auto-augment and erasing off, and random masks read no training image: their strings are not
    checked there (they were refused before a note called them unused); finetuning still refuses them."""
    for argv in (['--prune', '--prune-batches', '1', '--aa', 'bogus-x1', '--reprob', '0.5', '--remode', 'bogus'],
                 ['--prune', '--prune_mode', 'random', '--train-interpolation', 'foo']):
        code, out, err = cli(capsys, *argv, '--resume', world['dense'], '--data-path', world['data'],
                             '--output_dir', tmp_path / argv[-1])
        assert code == 0, err
        assert any(argv[-1] in line for line in out.splitlines() if line.startswith('note:'))
    code, out, err = cli(capsys, '--aa', 'bogus-x1', '--resume', world['dense'], '--data-path', world['data'],
                         '--output_dir', tmp_path / 'ft', '--final_finetune', 1)
    assert code == 2 and err.startswith('error: --aa bogus-x1: timm cannot read this augmentation policy')


def test_unused_flags_given_are_noted_one_line_per_reason(capsys, world, tmp_path):
    # DIGITS_ARGS gives --mixup 0 --cutmix 0 --aa none --reprob 0: training flags, unused by --eval
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--lr', 0.1,
                         '--output_dir', tmp_path / 'out', '--speed-repeats', 3, '--prune_mode', 'attn')
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith('note:')]
    assert notes == [
        'note: --prune_mode attn has no effect: only --prune makes masks',
        'note: --lr 0.1, --mixup 0.0, --cutmix 0.0, --aa none, --reprob 0.0 have no effect: --eval trains nothing',
        f'note: --output_dir {tmp_path / "out"} has no effect: --eval writes nothing',
        'note: --speed-repeats 3 has no effect: only --speed-only times the model']
    assert not (tmp_path / 'out').exists()
    # a flag the run uses is not noted; the crop ratio is not used at the digits model's 32 px (DeiT's rule)
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'],
                         '--batch-size', 7, '--eval-crop-ratio', 0.875)
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith('note:')][-1:] == [
        'note: --eval-crop-ratio 0.875 has no effect: at an input of 32 px or less the evaluation does not crop (as '
        'in DeiT, which takes CIFAR images as they are)']


def test_eval_names_the_seed_it_does_not_use(capsys, world, monkeypatch):
    """The evaluation draws no random number (fixed transform, model in eval mode): another --seed gives the same
    figures, so a --seed given with --eval is named as having no effect rather than dropped without a word."""
    results = []
    real = finetune.run_eval
    monkeypatch.setattr(finetune, 'run_eval', lambda *a: results.append(real(*a)) or results[-1])
    for seed in ('0', '5'):
        code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'], '--seed', seed)
        assert code == 0, err
        assert [line for line in out.splitlines() if line.startswith('note:')][-1] == (
            f'note: --seed {seed} has no effect: --eval draws no random number (its transform is fixed, and the model '
            f'runs in eval mode)')
    assert results[0] == results[1]


SCHEDULES = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'poly', 'plateau', 'wsd', 'rsqrt')
OTHER_VALUES = {'decay_epochs': 3, 'decay_rate': 0.5, 'patience_epochs': 1, 'min_lr': 1e-3, 'decay_milestones': [3]}


def schedule_lrs(sched, **values):
    """The learning rate of every epoch of --final_finetune 30 (two of warm-up) as finetune.py's schedule steps it."""
    from timm.scheduler import create_scheduler
    args = finetune.get_args_parser().parse_args(['--sched', sched, '--warmup-epochs', '2'])
    for k, v in values.items():
        setattr(args, k, v)
    args.epochs = args.final_finetune
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler, _ = create_scheduler(args, optimizer)
    out = []
    for epoch in range(args.final_finetune):
        scheduler.step(epoch)
        out.append(optimizer.param_groups[0]['lr'])
    return out


@pytest.mark.filterwarnings('ignore::FutureWarning')  # timm deprecates the plateau schedule
def test_the_schedules_ignore_the_flags_they_are_said_to():
    """Independent of the notes: each of timm's schedules, built and stepped as finetune.py does, gives the same
    learning rate at every epoch whatever value the flags SCHEDULES_READING does not give it say; a schedule that
    reads one does change (where a run without a metric can show it); the noise flags change nothing without
    --lr-noise, and the cool-down nothing within --final_finetune epochs."""
    for sched in SCHEDULES:
        base = schedule_lrs(sched)
        for flag, value in OTHER_VALUES.items():
            if sched not in finetune.SCHEDULES_READING[flag]:
                assert schedule_lrs(sched, **{flag: value}) == base, (sched, flag)
        assert schedule_lrs(sched, lr_noise_pct=0.1, lr_noise_std=5.0) == base, sched
        assert schedule_lrs(sched, cooldown_epochs=0) == schedule_lrs(sched, cooldown_epochs=30), sched
    for sched, flag in (('step', 'decay_epochs'), ('step', 'decay_rate'), ('cosine', 'min_lr'),
                        ('multistep', 'decay_milestones')):
        assert schedule_lrs(sched, **{flag: OTHER_VALUES[flag]}) != schedule_lrs(sched), (sched, flag)
    noisy = schedule_lrs('cosine', lr_noise=[0.5])
    assert schedule_lrs('cosine', lr_noise=[0.5], lr_noise_std=5.0) != noisy


def test_the_optimizers_and_schedules_ignore_momentum_betas_eps_and_warmup_lr_where_said_to():
    """Independent of the notes: the optimizer finetune.py builds is the same whatever --momentum says for adamw
    and whatever --opt-betas / --opt-eps say for sgd (and does change where they are read); without a warm-up every
    schedule a run can use gives the same rates whatever --warmup-lr says."""
    model = torch.nn.Linear(3, 2)

    def built(*argv):
        args = finetune.get_args_parser().parse_args([*argv, '--world_size', '1'])
        optimizer, _ = finetune.build_optimizer(args, model)
        return type(optimizer).__name__, optimizer.defaults, [{k: v for k, v in g.items() if k != 'params'}
                                                              for g in optimizer.param_groups]

    for opt, flags in (('adamw', (['--momentum', '0.5'],)),
                       ('sgd', (['--opt-betas', '0.5', '0.6'], ['--opt-eps', '0.1']))):
        plain = built('--opt', opt)
        for extra in flags:
            assert finetune.optimizer_reads(opt, {'--momentum': 'has_momentum', '--opt-betas': 'has_betas',
                                                  '--opt-eps': 'has_eps'}[extra[0]]) is False
            assert built('--opt', opt, *extra) == plain, (opt, extra)
    assert built('--opt', 'sgd', '--momentum', '0.5') != built('--opt', 'sgd')
    assert built('--opt', 'adamw', '--opt-eps', '0.1') != built('--opt', 'adamw')
    for sched in SCHEDULES:
        if sched not in ('plateau', 'rsqrt'):  # (refused: plateau needs a metric; timm's rsqrt needs a warm-up)
            assert schedule_lrs(sched, warmup_epochs=0, warmup_lr=0.5) == schedule_lrs(sched, warmup_epochs=0), sched
    assert schedule_lrs('cosine', warmup_lr=0.5) != schedule_lrs('cosine')


def test_without_random_erasing_its_mode_and_count_change_nothing():
    """--reprob 0: the training transform has no random erasing, so --remode and --recount (said to have no effect
    then) cannot change it; with --reprob above 0 they are the erasing's."""
    from timm.data.random_erasing import RandomErasing

    def transform(**values):
        args = finetune.get_args_parser().parse_args([])
        args.__dict__.update(input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, **values)
        return datasets.build_transform(True, args)

    plain = transform(reprob=0.0)
    assert not any(isinstance(t, RandomErasing) for t in plain.transforms)
    assert repr(transform(reprob=0.0, remode='const', recount=3)) == repr(plain)
    erasing = [t for t in transform(reprob=0.5, remode='const', recount=3).transforms if isinstance(t, RandomErasing)]
    assert [(e.mode, e.max_count) for e in erasing] == [('const', 3)]


def test_gflops_are_printed_with_two_decimals_and_two_significant_digits_below_a_tenth():
    """The paper's tables give GFLOPs to one or two decimals (1.25 for DeiT-Ti here); the digits model's 0.0357 and
    0.0482 (1.35 times apart) would both read as 0.04 and 0.05 (1.25 apart) with two decimals."""
    assert [finetune.gflops_text(v) for v in (17.5614, 1.2543, 0.1, 0.0357, 0.0482, 0.00123, 0.0)] == [
        '17.56', '1.25', '0.10', '0.036', '0.048', '0.0012', '0.00']


def test_prune_and_eval_print_the_accuracy_and_flops_of_the_pruned_model(capsys, world, tmp_path):
    """--prune and --eval of its file print Acc@1 and Acc@5 as counted here on the validation images, the accuracy
    line with Acc@1, the pruned model's FLOPs by the formula, and --prune's TensorBoard points at step 0 the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'out'
    code, pruned, err = cli(capsys, '--prune', '--prune_mode', 'random', '--prune_rate', 0.5, '--resume',
                            world['dense'], '--data-path', world['data'], '--output_dir', out)
    assert code == 0, err
    path = out / 'pruned_random_0.5.pth'
    code, evaluated, err = cli(capsys, '--eval', '--resume', path, '--data-path', world['data'])
    assert code == 0, err
    model = models.create_model('deit_digits_patch4_32').eval()
    model.load_state_dict(load_checkpoint_file(str(path))['model'])
    counts = models.kept_token_counts(model)
    assert f'Kept tokens per block (class token included): {counts}' in pruned and min(counts) < 65
    pruned_gflops, dense_gflops = formula_macs(model, counts) / 1e9, formula_macs(model, [65] * 6) / 1e9
    assert f'FLOPs: {finetune.gflops_text(pruned_gflops)} GFLOPs (dense {finetune.gflops_text(dense_gflops)} ' \
           f'GFLOPs)' in pruned.splitlines()
    assert finetune.gflops_text(pruned_gflops) != finetune.gflops_text(dense_gflops)
    args = argparse.Namespace(input_size=32, eval_crop_ratio=1.0, mean=model.pretrained_cfg['mean'],
                              std=model.pretrained_cfg['std'], data_set='IMNET', data_path=world['data'])
    val, _ = datasets.build_dataset(False, args)
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(images)
    above = [(logits[i] > logits[i, targets[i]]).sum().item() for i in range(len(targets))]
    acc1, acc5 = (100.0 * sum(a < k for a in above) / len(above) for k in (1, 5))
    assert acc1 != acc5  # (else a line printing one for the other would not show)
    for out_text in (pruned, evaluated):
        lines = out_text.splitlines()
        assert f'Accuracy of the network on the {len(val)} test images: {acc1:.1f}%' in lines
        star = next(line for line in lines if line.startswith('* Acc@1 '))
        assert star.startswith(f'* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss ')
    events = EventAccumulator(str(out / 'prune_random_0.5'))
    events.Reload()
    points = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}
    assert points == {'prune/acc1': [(0, pytest.approx(acc1))], 'prune/acc5': [(0, pytest.approx(acc5))],
                      'prune/gflops': [(0, pytest.approx(pruned_gflops))]}


def test_speed_only_prints_each_models_images_per_s_and_the_speed_up_of_the_pruned_one(capsys, monkeypatch,
                                                                                       pruned_digits):
    """--speed-only of a pruned file: each model's images/s as measured (stood in for: 300 and 100), the speed-up
    pruned over dense (3.00x) and the FLOPs ratio dense over pruned by the formula."""
    monkeypatch.setattr(finetune, 'measure_throughput', lambda runs, *a, **k: {'pruned': 300.0, 'dense': 100.0})
    code, out, err = cli(capsys, '--speed-only', '--resume', pruned_digits, '--speed-repeats', 1)
    assert code == 0, err
    model = models.create_model('deit_digits_patch4_32')
    model.load_state_dict(load_checkpoint_file(str(pruned_digits))['model'])
    pruned, dense = (formula_macs(model, counts) / 1e9
                     for counts in (models.kept_token_counts(model), [65] * 6))
    lines = out.splitlines()
    for line in (f'FLOPs of the pruned model: {finetune.gflops_text(pruned)} GFLOPs',
                 'Throughput of the pruned model: 300.0 images/s',
                 f'FLOPs of the dense model: {finetune.gflops_text(dense)} GFLOPs',
                 'Throughput of the dense model: 100.0 images/s',
                 f'Speed-up of the pruned model: 3.00x (FLOPs ratio {dense / pruned:.2f}x)'):
        assert line in lines
