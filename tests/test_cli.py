"""The paper's four commands through finetune.py: official-format dense DeiT-Ti -> --prune -> pruned_0.25.pth
-> --eval, --speed-only, and one epoch of finetuning with soft distillation -> checkpoint.pth."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import finetune
import models
import pruning
from losses import DistillationLoss
from conftest import ROOT, official_checkpoint
from utils import load_checkpoint_file

COMMON = ['--device', 'cpu', '--num_workers', '0', '--batch-size', '4', '--print-freq', '1']
FINETUNE_KEYS = {'model', 'optimizer', 'lr_scheduler', 'epoch', 'scaler', 'channels', 'args'}


def run_cli(capsys, *argv):
    code = finetune.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope='module')
def pruned(tmp_path_factory):
    """One --prune run shared by the tests below (scoring all 3 training batches of the image folder)."""
    from conftest import make_image_folder
    base = tmp_path_factory.mktemp('cli')
    data = make_image_folder(base / 'data')
    dense = official_checkpoint(base / 'deit_tiny.pth', seed=1)
    out = base / 'out'
    code = finetune.main(['--prune', '--prune_rate', '0.25', '--resume', dense, '--data-path', data,
                          '--output_dir', str(out), *COMMON])
    assert code == 0
    return {'base': base, 'data': data, 'dense': dense, 'out': out, 'path': str(out / 'pruned_0.25.pth')}


@pytest.mark.slow
def test_prune_writes_the_pruned_checkpoint(pruned):
    ckpt = load_checkpoint_file(pruned['path'])
    assert {'model', 'channels'} <= set(ckpt)
    sd, channels = ckpt['model'], ckpt['channels']
    masks = [sd[f'blocks.{l}.attn.token_index'] for l in range(12)]
    assert all(m.dtype == torch.bool and m.shape == (197,) and bool(m[0]) for m in masks)
    assert channels == [int(m.sum()) for m in masks]
    assert sum(channels) == 12 * 197 - int(196 * 12 * 0.25)
    assert len(set(channels)) > 1  # the global budget gives layers different counts
    dense_sd = torch.load(pruned['dense'], weights_only=True)['model']
    assert all(torch.equal(sd[k], v) for k, v in dense_sd.items())  # pruning changed no weight
    assert ckpt['scores'].shape == (12, 196)
    # the masks are the global-budget plan of the stored scores at the requested rate, in concat order
    assert torch.stack(masks).equal(pruning.to_concat_order(pruning.plan_masks(ckpt['scores'], 0.25)))
    model = timm.create_model('cc_deit_tiny_patch16_224', checkpoint_path=pruned['path'])
    assert models.kept_token_counts(model) == channels


@pytest.mark.slow
def test_prune_prints_channels_flops_and_accuracy(tmp_path, capsys, pruned):
    code, out, err = run_cli(capsys, '--prune', '--prune_mode', 'random', '--prune_rate', '0.4',
                             '--resume', pruned['dense'], '--data-path', pruned['data'],
                             '--output_dir', str(tmp_path), *COMMON)
    assert code == 0, err
    channels = load_checkpoint_file(str(tmp_path / 'pruned_random_0.4.pth'))['channels']
    assert f'Kept tokens per block (class token included): {channels}' in out
    assert re.search(r'FLOPs: \d+\.\d\d GFLOPs \(dense 1\.25 GFLOPs\)', out)
    assert re.search(r'Accuracy of the network on the 6 test images: \d+\.\d%', out)
    assert sum(channels) == 12 * 197 - int(196 * 12 * 0.4)


@pytest.mark.slow
def test_eval_of_the_pruned_checkpoint(capsys, pruned):
    code, out, err = run_cli(capsys, '--eval', '--resume', pruned['path'], '--data-path', pruned['data'], *COMMON)
    assert code == 0, err
    assert re.search(r'^Accuracy of the network on the 6 test images: \d+\.\d%$', out, re.M)
    match = re.search(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$', out, re.M)
    assert match
    # The same number computed here directly from the model and the validation images.
    model = timm.create_model('cc_deit_tiny_patch16_224', checkpoint_path=pruned['path']).eval()
    # the default evaluation transform: the whole image squashed to 224x224 (the original code's)
    args = argparse.Namespace(input_size=224, eval_crop_ratio=1.0, mean=model.pretrained_cfg['mean'],
                              std=model.pretrained_cfg['std'], data_set='IMNET', data_path=pruned['data'])
    from datasets import build_dataset
    val, _ = build_dataset(False, args)
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(images)
    acc1 = (logits.argmax(1) == targets).float().mean().item() * 100
    # top-5 by hand: the true class has fewer than 5 classes scoring above it
    above = [(logits[i] > logits[i, targets[i]]).sum().item() for i in range(len(targets))]
    acc5 = 100.0 * sum(a < 5 for a in above) / len(above)
    assert float(match.group(1)) == pytest.approx(acc1, abs=1e-3)
    assert float(match.group(2)) == pytest.approx(acc5, abs=1e-3)
    # A random 1000-class head scores 0% on 3 classes whatever it runs, so the loss is what tells the pruned model
    # from the dense one: printed to 3 decimals, it is the pruned model's mean cross-entropy, not the dense one's.
    loss = F.cross_entropy(logits, targets).item()
    assert float(match.group(3)) == pytest.approx(loss, abs=6e-4)
    with torch.no_grad():
        dense_loss = F.cross_entropy(models.dense_copy(model)(images), targets).item()
    assert abs(dense_loss - loss) > 1e-2


@pytest.mark.slow
def test_released_format_with_tensor_channels_and_namespace_args(tmp_path, capsys, pruned):
    ckpt = load_checkpoint_file(pruned['path'])
    released = {'model': ckpt['model'], 'channels': [torch.tensor(c) for c in ckpt['channels']],
                'args': argparse.Namespace(model='deit_tiny_patch16_224', prune_rate=0.25, lr=5e-4)}
    path = tmp_path / 'released.pth'
    torch.save(released, path)
    code, out, err = run_cli(capsys, '--eval', '--resume', str(path), '--data-path', pruned['data'], *COMMON)
    assert code == 0, err
    assert 'Accuracy of the network on the 6 test images' in out
    assert 'lists channels' not in out  # the tensor channels were read as the masks' counts


@pytest.mark.slow
def test_speed_only_pruned_and_dense(capsys, pruned):
    code, out, err = run_cli(capsys, '--speed-only', '--resume', pruned['path'], '--device', 'cpu',
                             '--batch-size', '2', '--speed-repeats', '2', '--speed-warmup', '1')
    assert code == 0, err
    assert re.search(r'^FLOPs of the pruned model: 0\.\d\d GFLOPs$', out, re.M)
    assert re.search(r'^FLOPs of the dense model: 1\.25 GFLOPs$', out, re.M)
    assert re.search(r'^Throughput of the pruned model: \d+\.\d images/s$', out, re.M)
    assert re.search(r'^Throughput of the dense model: \d+\.\d images/s$', out, re.M)
    assert re.search(r'^Speed-up of the pruned model: \d+\.\d\dx \(FLOPs ratio 1\.\d\dx\)$', out, re.M)
    # on CPU the allocator is made steady first, so neither model pays page faults left by the other
    assert re.search(r'^CPU allocator: (steady \(glibc mallopt|default \(not glibc)', out, re.M)


@pytest.mark.slow
def test_speed_only_without_checkpoint_needs_no_data_and_runs_as_a_script():
    result = subprocess.run([sys.executable, 'finetune.py', '--speed-only', '--model', 'deit_tiny_patch16_224',
                             '--device', 'cpu', '--batch-size', '1', '--speed-repeats', '1',
                             '--speed-warmup', '0'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'FLOPs of the dense model: 1.25 GFLOPs' in result.stdout
    assert re.search(r'Throughput of the dense model: \d+\.\d images/s', result.stdout)
    assert 'pruned' not in result.stdout


@pytest.mark.slow
def test_finetune_one_epoch_with_soft_distillation(tmp_path, capsys, monkeypatch, pruned):
    # Every loss the run computes is recorded with what it was computed from, and checked below by hand.
    steps = []
    real_forward = DistillationLoss.forward

    def recording_forward(self, inputs, outputs, labels):
        loss = real_forward(self, inputs, outputs, labels)
        steps.append((inputs.detach().clone(), outputs.detach().clone(), labels.clone(), loss.item()))
        return loss

    monkeypatch.setattr(DistillationLoss, 'forward', recording_forward)
    # the teacher: the dense weights with a head 300 times larger, so its outputs are confident and the KD term
    # is a sizeable part of the loss
    teacher_sd = torch.load(pruned['dense'], weights_only=True)['model']
    teacher_sd['head.weight'] = teacher_sd['head.weight'] * 300
    torch.save({'model': teacher_sd}, tmp_path / 'teacher.pth')
    out_dir = tmp_path / 'ft'
    code, out, err = run_cli(capsys, '--resume', pruned['path'], '--teacher-path', str(tmp_path / 'teacher.pth'),
                             '--teacher-model', 'deit_tiny_patch16_224', '--distillation-type', 'soft',
                             '--distillation-tau', '2.0', '--distillation-alpha', '0.7', '--smoothing', '0.1',
                             '--mixup', '0', '--cutmix', '0', '--final_finetune', '1', '--data-path', pruned['data'],
                             '--output_dir', str(out_dir), '--aa', 'none', '--model-ema', *COMMON)
    assert code == 0, err
    # loss = label-smoothed CE + 0.7 * KD against timm's dense DeiT-Ti with the teacher file's weights
    teacher = timm.create_model('deit_tiny_patch16_224').eval()
    teacher.load_state_dict(teacher_sd)
    assert len(steps) == 3  # 12 training images in batches of 4
    kd_share, kds = [], []
    for images, student, labels, loss in steps:
        with torch.no_grad():
            t = teacher(images)
        log_p = torch.log_softmax(student, dim=1)
        base = (0.9 * -log_p.gather(1, labels[:, None]).squeeze(1) - 0.1 * log_p.mean(dim=1)).mean()
        p_t = torch.softmax(t / 2.0, dim=1)
        log_ratio = torch.log_softmax(t / 2.0, dim=1) - torch.log_softmax(student / 2.0, dim=1)
        kd = (p_t * log_ratio).sum() * 4.0 / t.numel()
        assert loss == pytest.approx((base + 0.7 * kd).item(), rel=1e-5)
        kd_share.append(0.7 * kd.item() / loss)
        kds.append(kd.item())
    assert min(kd_share) > 1e-3  # the KD term is there, 100 times above the tolerance of the check
    record = json.loads((out_dir / 'log.txt').read_text().splitlines()[0])
    assert record['train_loss'] == pytest.approx(sum(s[3] for s in steps) / 3, rel=1e-6)
    # its terms, unweighted: the mean of each, so loss = loss_base + alpha * loss_kd holds for the means too
    assert record['train_loss'] == pytest.approx(record['train_loss_base'] + 0.7 * record['train_loss_kd'], rel=1e-6)
    assert record['train_loss_kd'] == pytest.approx(sum(kds) / 3, rel=1e-5)
    assert re.search(r'Averaged stats: loss [\d.]+  loss_base [\d.]+  loss_kd [\d.]+  lr ', out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out_dir))
    events.Reload()
    for tag in ('loss', 'loss_base', 'loss_kd'):
        assert [e.value for e in events.Scalars(f'train/{tag}')] == [pytest.approx(record[f'train_{tag}'])]
    assert re.search(r'Epoch: \[0\] \[0/3\]  eta: \d+:\d\d:\d\d', out)
    ckpt = load_checkpoint_file(str(out_dir / 'checkpoint.pth'))
    assert FINETUNE_KEYS | {'model_ema'} <= set(ckpt)
    assert ckpt['epoch'] == 0
    # args are a plain dict, so plain torch.load (weights_only by default) reads every file we write
    assert isinstance(ckpt['args'], dict) and ckpt['args']['distillation_type'] == 'soft'
    for name in ('checkpoint.pth', 'best.pth'):
        assert torch.load(out_dir / name)['epoch'] == 0
    assert torch.load(pruned['path'])['args']['prune_rate'] == 0.25
    pruned_ckpt = load_checkpoint_file(pruned['path'])
    assert ckpt['channels'] == pruned_ckpt['channels']
    for l in range(12):  # finetuning trains weights, never masks
        key = f'blocks.{l}.attn.token_index'
        assert torch.equal(ckpt['model'][key], pruned_ckpt['model'][key])
    assert not torch.equal(ckpt['model']['head.weight'], pruned_ckpt['model']['head.weight'])
    assert (out_dir / 'best.pth').exists()
    lines = (out_dir / 'log.txt').read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])['epoch'] == 0
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out_dir))
    # the finetuned checkpoint loads back through timm (timm's rule: the EMA weights when the file has them, the
    # trained ones with use_ema=False; the README says so) and through --eval (the trained ones)
    averaged = timm.create_model('cc_deit_tiny_patch16_224', checkpoint_path=str(out_dir / 'checkpoint.pth'))
    trained = timm.create_model('cc_deit_tiny_patch16_224')
    timm.models.load_checkpoint(trained, str(out_dir / 'checkpoint.pth'), use_ema=False)
    evaluated, _ = models.build_model_from_checkpoint(str(out_dir / 'checkpoint.pth'), None)  # behind --eval
    for name, weights in (('model_ema', averaged), ('model', trained), ('model', evaluated)):
        loaded = weights.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in ckpt[name].items()), name
    assert not torch.equal(ckpt['model']['head.weight'], ckpt['model_ema']['head.weight'])
    code, out, err = run_cli(capsys, '--eval', '--resume', str(out_dir / 'checkpoint.pth'),
                             '--data-path', pruned['data'], *COMMON)
    assert code == 0, err


def test_learning_rate_is_scaled_by_batch_and_world_size(tmp_path, capsys, monkeypatch, image_folder):
    """lr · batch · world_size / 512, printed at the start of finetuning and the base lr the optimizer trains its
    first parameter group with (the schedule's initial_lr, saved with the optimizer)."""
    dense = official_checkpoint(tmp_path / 'digits.pth', 'cc_deit_digits_patch4_32')
    code, out, err = run_cli(capsys, '--model', 'deit_digits_patch4_32', '--resume', dense,
                             '--data-path', image_folder, '--output_dir', str(tmp_path / 'o'),
                             '--final_finetune', '1', '--lr', '1e-3', '--batch-size', '8', '--device', 'cpu',
                             '--num_workers', '0', '--input-size', '32', '--mixup', '0', '--cutmix', '0')
    assert code == 0, err
    assert f'lr {1e-3 * 8 / 512:.2e} for batch 8 x 1 processes' in out
    groups = load_checkpoint_file(str(tmp_path / 'o' / 'checkpoint.pth'))['optimizer']['param_groups']
    assert groups[0]['initial_lr'] == pytest.approx(1e-3 * 8 / 512, rel=1e-12)


class RecordingStream:
    """A stream that records each write call, as the kernel sees them on an unbuffered pipe."""

    def __init__(self):
        self.writes, self.flushes = [], 0

    def write(self, text):
        self.writes.append(text)

    def flush(self):
        self.flushes += 1


def test_output_lines_are_single_writes_so_ranks_sharing_a_pipe_cannot_split_them():
    # torchrun runs workers with `python -u`: print('x') there is two writes, 'x' and '\n'.
    from utils import print_line, rank0_print
    stream = RecordingStream()
    print_line('[rank 1] masks sha1', 'ab' * 20, file=stream)
    rank0_print('FLOPs:', 1.25, file=stream)
    assert stream.writes == [f'[rank 1] masks sha1 {"ab" * 20}\n', 'FLOPs: 1.25\n']
    assert stream.flushes == 2


def test_interleaved_timer_rotates_the_first_run_and_times_each_pass():
    """The timer behind --speed-only and the benchmark: warm-up rounds untimed, then every run once per round
    with the starting run rotating, so no model always runs right after the same other one."""
    from engine import measure_throughput, time_interleaved
    calls = []

    def recorder(name):
        return lambda x: calls.append(name)

    runs = {name: recorder(name) for name in 'abc'}
    seconds = time_interleaved(runs, torch.zeros(1), torch.device('cpu'), repeats=4, warmup=1)
    assert calls == list('abc' 'abc' 'bca' 'cab' 'abc')
    assert {name: len(v) for name, v in seconds.items()} == {'a': 4, 'b': 4, 'c': 4}
    assert all(t >= 0 for v in seconds.values() for t in v)
    model = torch.nn.Conv2d(3, 1, 4).train()
    speed = measure_throughput({'conv': model}, 2, 8, torch.device('cpu'), repeats=2, warmup=0)
    assert set(speed) == {'conv'} and speed['conv'] > 0 and not model.training


def test_throughput_is_the_batch_over_the_median_pass(monkeypatch):
    """Images per second of each model: the batch's images over the median of its timed passes (one slow and one
    fast outlier do not move it), not a batch per second nor the fastest pass."""
    import engine
    passes = {'pruned': [0.5, 0.1, 0.2], 'dense': [0.4, 0.3, 0.9, 0.6, 0.1]}
    monkeypatch.setattr(engine, 'time_interleaved', lambda runs, x, *a, **k: {name: passes[name] for name in runs})
    speed = engine.measure_throughput({'pruned': None, 'dense': None}, 6, 8, torch.device('cpu'), repeats=3)
    assert speed == {'pruned': pytest.approx(6 / 0.2), 'dense': pytest.approx(6 / 0.4)}


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_timing_on_cuda_lets_cudnn_pick_the_fastest_convolution(monkeypatch, device):
    """cudnn.benchmark is on while rows are timed on CUDA (as DeiT and the original code ran), off again after;
    on CPU nothing changes.  (The CUDA case runs on CPU tensors with the synchronisation stubbed out.)"""
    import engine
    monkeypatch.setattr(engine, 'synchronize', lambda d: None)
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    seen = []
    engine.time_interleaved({'a': lambda x: seen.append(torch.backends.cudnn.benchmark)}, torch.zeros(1),
                            torch.device(device), repeats=2, warmup=1)
    assert seen == [device == 'cuda'] * 3 and torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize('name, said', [
    ('deit_tiny_distilled_patch16_224', 'class and distillation tokens included'),
    ('vit_little_patch16_reg1_gap_256', '1 register token included'),  # average pooling, no class token
])
def test_prune_names_the_prefix_tokens_its_kept_counts_include(tmp_path, capsys, image_folder, name, said):
    """The kept counts of --prune include every prefix token; the line says which ones, not 'class token' for a
    model with two prefix tokens or with none of that name."""
    dense = official_checkpoint(tmp_path / 'dense.pth', name, img_size=64, num_classes=3)
    code, out, err = run_cli(capsys, '--prune', '--prune_mode', 'random', '--prune_rate', '0.3', '--model', name,
                             '--input-size', '64', '--resume', dense, '--data-path', image_folder,
                             '--output_dir', str(tmp_path / 'out'), *COMMON)
    assert code == 0, err
    channels = load_checkpoint_file(str(tmp_path / 'out' / 'pruned_random_0.3.pth'))['channels']
    model = timm.create_model(name, img_size=64)
    prefix, patches, depth = model.num_prefix_tokens, model.patch_embed.num_patches, len(model.blocks)
    assert sum(channels) == depth * (prefix + patches) - int(patches * depth * 0.3)  # prefix tokens are counted
    assert f'Kept tokens per block ({said}): {channels}' in out.splitlines()
    assert 'class token included' not in out
