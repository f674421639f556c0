"""The mini reproduction (demo/run_demo.py, shortened with --quick) and the mask drawing (demo/draw_masks.py)."""
import json
import os
import re
import sys

import pytest
import torch

from conftest import ROOT, make_image_folder, run_demo_script

sys.path.insert(0, os.path.join(ROOT, 'demo'))
import draw_masks  # noqa: E402
import pruning  # noqa: E402

ROW_KEYS = {'name': str, 'prune_mode': str, 'prune_rate': float, 'finetuned': bool, 'acc1': float,
            'gflops': float, 'throughput': float}


def png_size(path):
    from PIL import Image
    with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.format, img.size


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'runs'
    stdout = run_demo_script('run_demo.py', out, timeout=600)
    return out, stdout


@pytest.mark.slow
def test_results_json_schema(quick_demo):
    out, _ = quick_demo
    with open(out / 'results.json') as f:
        results = json.load(f)
    assert list(results) == ['rows']
    rows = results['rows']
    assert len(rows) >= 5
    for r in rows:
        assert set(r) == set(ROW_KEYS), r
        for k, t in ROW_KEYS.items():
            assert isinstance(r[k], t), (k, r[k])
        assert 0.0 <= r['acc1'] <= 100.0 and r['gflops'] > 0 and r['throughput'] > 0
    teacher = [r for r in rows if r['prune_rate'] == 0.0]
    assert len(teacher) == 1 and teacher[0]['prune_mode'] == 'none' and not teacher[0]['finetuned']
    combos = {(r['prune_mode'], r['prune_rate'], r['finetuned']) for r in rows}
    for mode, rate in (('attn', 0.25), ('attn', 0.40), ('random', 0.25)):
        assert {(mode, rate, False), (mode, rate, True)} <= combos
    # Pruning lowers the FLOPs as the paper counts them; the same masks give the same FLOPs after finetuning.
    by = {(r['prune_mode'], r['prune_rate'], r['finetuned']): r for r in rows}
    assert by[('attn', 0.40, True)]['gflops'] < by[('attn', 0.25, True)]['gflops'] < teacher[0]['gflops']
    assert by[('attn', 0.25, False)]['gflops'] == by[('attn', 0.25, True)]['gflops']


@pytest.mark.slow
def test_markdown_table_printed(quick_demo):
    out, stdout = quick_demo
    with open(out / 'results.json') as f:
        rows = json.load(f)['rows']
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith('| model | acc@1 | GFLOPs | images/s | speed-up')]
    assert len(header) == 1, stdout[-3000:]
    i = header[0]
    assert re.fullmatch(r'\|(---\|)+', lines[i + 1])
    body = lines[i + 2:i + 2 + len(rows)]
    assert all(line.startswith('| ') and line.endswith(' |') for line in body)
    assert len(body) == len(rows)
    assert i + 2 + len(rows) == len(lines) or not lines[i + 2 + len(rows)].startswith('|')  # one line per row
    ncols = lines[i].count('|')
    for row, line in zip(rows, body):
        cells = [c.strip() for c in line.strip('|').split('|')]
        assert line.count('|') == ncols
        assert cells[0] == row['name'] and cells[1] == f"{row['acc1']:.1f}"
    assert 'Taylor' in stdout and 'random' in stdout


@pytest.mark.slow
def test_masks_png_and_logs(quick_demo):
    out, _ = quick_demo
    fmt, (width, height) = png_size(out / 'masks.png')
    assert fmt == 'PNG'
    assert 400 <= width <= 3000 and 250 <= height <= 2000 and width > height  # 7 panels wide, 4 rows
    # TensorBoard events of every stage, and the finetune logs.
    stages = ['teacher', 'prune_attn_0.25', 'prune_attn_0.40', 'prune_random_0.25', 'finetune_attn_0.25',
              'finetune_attn_0.40', 'finetune_random_0.25', 'summary']
    for stage in stages:
        events = [f for _, _, files in os.walk(out / stage) for f in files if f.startswith('events.out.tfevents')]
        assert events, f'no TensorBoard events under {stage}'
    assert (out / 'finetune_attn_0.25' / 'log.txt').read_text().strip()


# ----------------------------------------------------------------------------------------------------------
# the drawing on its own (fast)

def test_kept_patches_are_the_applied_plan():
    import timm
    model = timm.create_model('cc_deit_digits_patch4_32')
    masks = pruning.random_masks(6, 64, 0.4, generator=torch.Generator().manual_seed(3))
    pruning.apply_masks(model, masks)
    kept = draw_masks.kept_patches(model)
    assert torch.equal(kept, masks)
    back = draw_masks.returning_patches(kept)
    assert not back[0].any()
    assert torch.equal(back[1:], masks[1:] & ~masks[:-1])


def test_draw_masks_cli_on_a_pruned_deit_and_an_image_folder(tmp_path, capsys):
    import argparse
    import timm
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=(1, 2))
    model = timm.create_model('cc_deit_tiny_patch16_224', num_classes=2)
    channels = pruning.apply_masks(model, pruning.random_masks(12, 196, 0.25,
                                                               generator=torch.Generator().manual_seed(0)))
    ckpt = tmp_path / 'pruned_0.25.pth'
    torch.save({'model': model.state_dict(), 'channels': channels,
                'args': argparse.Namespace(model='deit_tiny_patch16_224')}, ckpt)
    out = tmp_path / 'm.png'
    code = draw_masks.main(['--resume', str(ckpt), '--data-path', data, '--num-images', '2', '--out', str(out)])
    assert code == 0, capsys.readouterr().err
    fmt, (width, height) = png_size(out)
    assert fmt == 'PNG' and width > 3 * height  # 13 panels in each of 2 rows


def test_draw_masks_cli_errors(tmp_path, capsys):
    assert draw_masks.main(['--resume', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'm.png')]) == 2
    assert 'checkpoint not found' in capsys.readouterr().err
    assert not (tmp_path / 'm.png').exists()
