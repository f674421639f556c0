"""The four commands on other timm ViTs, saved as plain timm state dicts: a distilled DeiT and DeiT III through
--prune -> --eval -> finetune with distillation, and --speed-only (GFLOPs and images/s of the pruned and dense
model) for every family: register tokens, 384 px, global average pooling without class token, patch 32, a hybrid
(CNN stem)."""
import re

import pytest
import timm
import torch

import finetune
import models
from conftest import make_image_folder, official_checkpoint
from utils import load_checkpoint_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('one_thread')]

COMMON = ['--device', 'cpu', '--num_workers', '0', '--batch-size', '4', '--print-freq', '100', '--mixup', '0',
          '--cutmix', '0', '--aa', 'none', '--reprob', '0']


def cli(capsys, *argv):
    code = finetune.main([*map(str, argv), *COMMON])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('families') / 'data', per_class=(4, 2), size=(40, 48))


@pytest.mark.parametrize('name, size', [('deit_tiny_distilled_patch16_224', 64), ('deit3_small_patch16_224', 64)])
def test_prune_eval_and_distillation_finetune(tmp_path, capsys, data, name, size):
    dense = official_checkpoint(tmp_path / 'dense.pth', name, seed=2, img_size=size)  # timm's state dict, no masks
    out = cli(capsys, '--prune', '--prune_rate', '0.3', '--model', name, '--input-size', size, '--resume', dense,
              '--data-path', data, '--output_dir', tmp_path / 'out')
    path = tmp_path / 'out' / 'pruned_0.3.pth'
    ckpt = load_checkpoint_file(str(path))
    model = timm.create_model(name, img_size=size)
    prefix, num_patches, depth = model.num_prefix_tokens, model.patch_embed.num_patches, len(model.blocks)
    masks = [ckpt['model'][f'blocks.{l}.{models.MASK_KEY}'] for l in range(depth)]
    assert all(bool(m[:prefix].all()) and m.numel() == prefix + num_patches for m in masks)
    assert sum(ckpt['channels']) == depth * (prefix + num_patches) - int(num_patches * depth * 0.3)
    assert ckpt['scores'].shape == (depth, num_patches)
    assert re.search(r'Accuracy of the network on the 6 test images: [\d.]+%', out)

    out = cli(capsys, '--eval', '--model', name, '--input-size', size, '--resume', path, '--data-path', data)
    assert re.search(r'\* Acc@1 [\d.]+ Acc@5 [\d.]+', out)

    ft = tmp_path / 'ft'
    out = cli(capsys, '--model', name, '--input-size', size, '--resume', path, '--teacher-path', dense,
              '--distillation-type', 'soft', '--final_finetune', '1', '--data-path', data, '--output_dir', ft)
    distilled = hasattr(model, 'head_dist')
    assert ('through the distillation head' in out) == distilled
    final = load_checkpoint_file(str(ft / 'checkpoint.pth'))
    for l in range(depth):  # finetuning trains weights, never masks
        assert torch.equal(final['model'][f'blocks.{l}.{models.MASK_KEY}'], masks[l])
    changed = ['head.weight'] + (['head_dist.weight'] if distilled else [])
    assert all(not torch.equal(final['model'][k], ckpt['model'][k]) for k in changed)


def test_distilled_deit_finetuned_without_distillation_trains_the_average_of_its_heads(tmp_path, capsys, data):
    """Without a teacher the loss reads the logits the model is evaluated on, (head + head_dist) / 2, so both heads
    learn (DeiT's loss would read the class head alone; the README lists this difference)."""
    name = 'deit_tiny_distilled_patch16_224'
    dense = official_checkpoint(tmp_path / 'dense.pth', name, seed=3, img_size=64)
    out = cli(capsys, '--model', name, '--input-size', 64, '--resume', dense, '--final_finetune', '1',
              '--data-path', data, '--output_dir', tmp_path / 'ft')
    assert 'distillation head' not in out
    before = load_checkpoint_file(str(dense))['model']
    after = load_checkpoint_file(str(tmp_path / 'ft' / 'checkpoint.pth'))['model']
    # a head outside the loss would have no gradient, and the optimizer would leave it as it was
    for key in ('head.weight', 'head_dist.weight'):
        assert not torch.equal(after[key], before[key]), key


@pytest.mark.parametrize('name, size', [
    ('deit_tiny_distilled_patch16_224', 64), ('deit3_small_patch16_224', 64),
    ('vit_small_patch14_reg4_dinov2', 56), ('vit_tiny_patch16_384', 384),
    ('vit_little_patch16_reg1_gap_256', 64), ('vit_small_patch32_224', 128), ('vitamin_small_224', 64),
])
def test_speed_only_prints_flops_and_speed_up(tmp_path, capsys, data, name, size):
    dense = official_checkpoint(tmp_path / 'dense.pth', name, seed=1, img_size=size, num_classes=3)
    cli(capsys, '--prune', '--prune_mode', 'random', '--prune_rate', '0.4', '--model', name, '--input-size', size,
        '--resume', dense, '--data-path', data, '--output_dir', tmp_path / 'out')
    path = tmp_path / 'out' / 'pruned_random_0.4.pth'
    out = cli(capsys, '--speed-only', '--model', name, '--input-size', size, '--resume', path,
              '--batch-size', '2', '--speed-repeats', '1', '--speed-warmup', '0')
    model = models.create_model(name, img_size=size, num_classes=3)
    dense_gflops = models.count_macs(model) / 1e9
    models.load_weights(model, load_checkpoint_file(str(path))['model'], str(path), name)
    assert f'FLOPs of the dense model: {finetune.gflops_text(dense_gflops)} GFLOPs' in out
    assert f'FLOPs of the pruned model: {finetune.gflops_text(models.count_macs(model) / 1e9)} GFLOPs' in out
    assert re.search(r'Throughput of the pruned model: [\d.]+ images/s', out)
    assert re.search(r'Speed-up of the pruned model: [\d.]+x \(FLOPs ratio [\d.]+x\)', out)
