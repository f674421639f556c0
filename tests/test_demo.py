"""The mini reproduction (demo/run_demo.py, shortened with --quick) and the mask drawing (demo/draw_masks.py)."""
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

from conftest import (ROOT, FullAfter, assert_ctrl_c_ends_the_script, assert_one_error_line, exit_code,
                      flags_not_saying_their_default, make_image_folder, no_work, run_demo_script, teacher_checkpoint)

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
def test_each_accuracy_is_the_one_its_run_logged(quick_demo):
    """Each row's acc@1 is what its own stage measured and logged, read here from the stage's files: the teacher's
    and each finetuned model's last epoch (the training loop's evaluation in its log.txt, which the demo's own
    --eval of checkpoint.pth must repeat) and each pruned model's evaluation by --prune (prune_log.txt)."""
    out, _ = quick_demo
    with open(out / 'results.json') as f:
        rows = json.load(f)['rows']
    for r in rows:
        tag = run_demo.rate_tag(r['prune_mode'], r['prune_rate'])  # the stage folders' names
        log = (out / 'teacher' / 'log.txt' if r['prune_mode'] == 'none' else
               out / f'finetune_{tag}' / 'log.txt' if r['finetuned'] else out / f'prune_{tag}' / 'prune_log.txt')
        last = json.loads(log.read_text().strip().splitlines()[-1])
        assert r['acc1'] == pytest.approx(last['test_acc1'], abs=1e-9), (r['name'], log)


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
    # the verdict lines: the gap shown is the gap between the figures shown (one image is 0.28 points)
    verdicts = re.findall(r'^At prune rate 0\.25, (?:before|after) finetuning: Taylor (\d+\.\d\d)% '
                          r'(beats|ties with|loses to) random (\d+\.\d\d)% \(([+-]\d+\.\d\d) points\)$', stdout, re.M)
    assert len(verdicts) == 2, stdout[-3000:]
    for taylor, verdict, rand, gap in verdicts:
        assert f'{float(taylor) - float(rand):+.2f}' == gap
        assert verdict == ('beats' if float(gap) > 0 else 'ties with' if float(gap) == 0 else 'loses to')


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


def test_each_panel_greys_the_patches_its_block_clips_and_boxes_those_that_come_back(tmp_path, monkeypatch):
    """The pictures drawn, recorded at imshow and add_patch: on a white image, panel l is white exactly on the
    patches block l keeps (the plan applied, in original patch order) and blended towards grey on the others;
    an orange box sits on patch p = row * 8 + column where block l keeps p and block l-1 clipped it."""
    import timm
    from matplotlib.axes import Axes
    model = timm.create_model('cc_deit_digits_patch4_32')
    masks = pruning.random_masks(6, 64, 0.4, generator=torch.Generator().manual_seed(3))
    pruning.apply_masks(model, masks)
    shown, boxes = [], []
    monkeypatch.setattr(Axes, 'imshow', lambda ax, picture, **k: shown.append(picture.copy()))
    monkeypatch.setattr(Axes, 'add_patch', lambda ax, p: boxes.append((len(shown) - 1, p.get_xy(), p.get_width(),
                                                                         p.get_height())))
    draw_masks.draw_masks(model, torch.ones(1, 3, 32, 32), str(tmp_path / 'm.png'), (0.0,) * 3, (1.0,) * 3)
    assert len(shown) == 7 and (shown[0] == 1.0).all()  # the input, then one panel per block
    grey = 1 - draw_masks.CLIPPED_ALPHA + draw_masks.CLIPPED_ALPHA * draw_masks.CLIPPED_GREY
    expected_boxes = []
    for layer in range(6):
        panel = shown[layer + 1]
        for p in range(64):
            row, col = divmod(p, 8)
            pixels = panel[4 * row:4 * row + 4, 4 * col:4 * col + 4].reshape(-1, 3)
            want = np.ones(3) if masks[layer, p] else grey
            assert np.allclose(pixels, want), (layer, p)
            if layer and masks[layer, p] and not masks[layer - 1, p]:
                expected_boxes.append((layer + 1, (4 * col - 0.5, 4 * row - 0.5), 4, 4))
    assert expected_boxes and sorted(boxes) == sorted(expected_boxes)


@pytest.mark.parametrize('name,prefix', [('cc_deit_tiny_distilled_patch16_224', 2),
                                         ('cc_vit_base_patch16_gap_224', 0),
                                         ('cc_vit_small_patch14_reg4_dinov2', 5)])
def test_panel_titles_count_the_patches_kept_whatever_the_prefix_tokens(name, prefix, tmp_path, monkeypatch):
    """Each block's title says how many of its patches it keeps, the row sums of the plan applied, for a model
    with a class and a distillation token, with none, or with a class token and 4 registers (not one token
    less than the block processes, which is right only for a single class token)."""
    import models
    monkeypatch.setitem(draw_masks.matplotlib.rcParams, 'svg.fonttype', 'none')  # the titles stay text
    model = models.create_model(name, img_size=56 if 'patch14' in name else 64, depth=3, embed_dim=64,
                                num_heads=2).eval()
    assert model.num_prefix_tokens == prefix
    patches = model.num_tokens - prefix
    masks = pruning.random_masks(3, patches, 0.4, generator=torch.Generator().manual_seed(1))
    pruning.apply_masks(model, masks)
    out = tmp_path / 'm.svg'
    draw_masks.draw_masks(model, torch.zeros(1, 3, *model.patch_embed.img_size), str(out), (0.5,) * 3, (0.5,) * 3)
    titles = re.findall(rf'>(\d+)/{patches} kept<', out.read_text())  # the blocks' titles, left to right
    assert [int(k) for k in titles] == [int(masks[b].sum()) for b in range(3)]

def pruned_tiny_and_folder(tmp_path):
    """(a pruned DeiT-Ti file with 2 classes, an image folder of 2 classes)."""
    import argparse
    import timm
    data = make_image_folder(tmp_path / 'data', classes=('cat', 'dog'), per_class=(1, 2))
    model = timm.create_model('cc_deit_tiny_patch16_224', num_classes=2)
    channels = pruning.apply_masks(model, pruning.random_masks(12, 196, 0.25,
                                                               generator=torch.Generator().manual_seed(0)))
    ckpt = tmp_path / 'pruned_0.25.pth'
    torch.save({'model': model.state_dict(), 'channels': channels,
                'args': argparse.Namespace(model='deit_tiny_patch16_224')}, ckpt)
    return ckpt, data


def test_draw_masks_cli_on_a_pruned_deit_and_an_image_folder(tmp_path, capsys):
    ckpt, data = pruned_tiny_and_folder(tmp_path)
    out = tmp_path / 'm.png'
    code = draw_masks.main(['--resume', str(ckpt), '--data-path', data, '--num-images', '2', '--out', str(out)])
    assert code == 0, capsys.readouterr().err
    fmt, (width, height) = png_size(out)
    assert fmt == 'PNG' and width > 3 * height  # 13 panels in each of 2 rows


def test_draw_masks_draws_the_title_given_even_an_empty_one(tmp_path, monkeypatch, capsys):
    ckpt, data = pruned_tiny_and_folder(tmp_path)
    titles = []
    monkeypatch.setattr(draw_masks, 'draw_masks', lambda *a: titles.append(a[-1]))
    for given in ([], ['--title', ''], ['--title', 'masks $x$']):
        argv = ['--resume', str(ckpt), '--data-path', data, '--num-images', '1', '--out', str(tmp_path / 'm.png')]
        assert draw_masks.main(argv + given) == 0, capsys.readouterr().err
    assert titles[0].startswith(f'{tmp_path.name}/pruned_0.25.pth') and titles[1:] == ['', 'masks $x$']


def test_draw_masks_refuses_a_crop_ratio_whose_resize_pillow_cannot_make(tmp_path, monkeypatch, capsys):
    """A folder's images through a 224 px model with --eval-crop-ratio 1e-9: the resize before the crop would be
    224e9 px a side (Pillow overflowed, with a traceback; 0.001 took the machine's memory).  One error line, as
    finetune.py gives it, before any image is read, and no picture."""
    ckpt, data = pruned_tiny_and_folder(tmp_path)
    monkeypatch.setattr(draw_masks, 'folder_images', no_work)
    out = tmp_path / 'm.png'
    argv = ['--resume', str(ckpt), '--data-path', data, '--num-images', '1', '--out', str(out)]
    assert exit_code(draw_masks.main, argv + ['--eval-crop-ratio', '1e-9']) == 2
    assert_one_error_line(capsys.readouterr().err, '--eval-crop-ratio 1e-09 resizes each image to 224000000000 px')
    assert not out.exists()


def test_draw_masks_refuses_digits_for_a_model_of_another_input_size(tmp_path, capsys):
    """DIGITS through a 224 px DeiT: one error line naming the checkpoint and both sizes (timm's patch embedding
    raised an AssertionError), and no picture."""
    ckpt, _ = pruned_tiny_and_folder(tmp_path)
    out = tmp_path / 'm.png'
    assert draw_masks.main(['--resume', str(ckpt), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, f'the model of {ckpt} reads 224x224')
    assert 'DIGITS has 32x32 images' in err and not out.exists()


def test_draw_masks_reads_a_folder_named_digits_and_asks_when_DIGITS_is_ambiguous(tmp_path, capsys, monkeypatch):
    """--data-path digits (any spelling but DIGITS) is a folder: it drew scikit-learn's digits instead.  With a
    folder DIGITS beside it, --data-path DIGITS could mean either: refused, naming both ways to say which."""
    ckpt, data = pruned_tiny_and_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    os.rename(data, tmp_path / 'digits')
    drawn = []
    monkeypatch.setattr(draw_masks, 'draw_masks', lambda *a: drawn.append(a))
    argv = ['--resume', str(ckpt), '--num-images', '1', '--out', str(tmp_path / 'm.png')]
    assert draw_masks.main(argv + ['--data-path', 'digits']) == 0, capsys.readouterr().err
    assert len(drawn) == 1  # the folder's 224 px images through the 224 px model (digits would be refused)
    os.rename(tmp_path / 'digits', tmp_path / 'DIGITS')
    assert draw_masks.main(argv + ['--data-path', 'DIGITS']) == 2
    assert_one_error_line(capsys.readouterr().err, "--data-path DIGITS: both scikit-learn's digits and a folder")
    assert draw_masks.main(argv + ['--data-path', './DIGITS']) == 0, capsys.readouterr().err
    assert len(drawn) == 2


def test_draw_masks_refuses_a_checkpoint_that_is_not_a_regular_file(tmp_path, capsys):
    """--resume naming a device or a pipe: /dev/zero was read until the machine ran out of memory (killed), a pipe
    waited for a writer for ever, /dev/null was 'empty'.  One error line saying what it is, at once; no picture."""
    import signal
    fifo = tmp_path / 'pipe.pth'
    os.mkfifo(fifo)
    out = tmp_path / 'm.png'

    def waited(*args):
        raise TimeoutError('--resume was opened and waited on')
    previous = signal.signal(signal.SIGALRM, waited)
    try:
        for resume in ('/dev/null', str(fifo)):  # (not /dev/zero: without the check it takes the memory)
            signal.alarm(5)
            assert draw_masks.main(['--resume', resume, '--out', str(out)]) == 2
            signal.alarm(0)
            assert_one_error_line(capsys.readouterr().err, 'checkpoint is not a regular file')
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not out.exists()


def test_draw_masks_refuses_an_image_that_is_not_a_regular_file(tmp_path, capsys):
    """A named pipe called x.png in the --data-path folder: the drawing opened it and waited for a writer for ever.
    One error line naming it, at once; no picture."""
    import signal
    ckpt = digits_checkpoint(tmp_path)
    (tmp_path / 'data' / 'a').mkdir(parents=True)
    os.mkfifo(tmp_path / 'data' / 'a' / 'x.png')
    out = tmp_path / 'm.png'

    def waited(*args):
        raise TimeoutError('the pipe was opened and waited on')
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(5)
    try:
        code = draw_masks.main(['--resume', str(ckpt), '--data-path', str(tmp_path / 'data'), '--num-images', '1',
                                '--out', str(out)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, f'cannot read image {tmp_path / "data" / "a" / "x.png"}: not a '
                                                   f'regular file')
    assert not out.exists()


def test_draw_masks_cli_errors(tmp_path, capsys):
    assert draw_masks.main(['--resume', str(tmp_path / 'missing.pth'), '--out', str(tmp_path / 'm.png')]) == 2
    assert 'checkpoint not found' in capsys.readouterr().err
    assert not (tmp_path / 'm.png').exists()


# ----------------------------------------------------------------------------------------------------------
# bad command lines: one `error:` line naming the flag, exit code 2, before any work (fast)

import finetune  # noqa: E402
import run_demo  # noqa: E402


@pytest.mark.parametrize('argv,flag', [
    (['--finetune-lr', 'nan'], '--finetune-lr'),
    (['--teacher-lr', '0'], '--teacher-lr'),
    (['--teacher-lr', 'inf'], '--teacher-lr'),
    (['--speed-repeats', '0'], '--speed-repeats'),
    (['--teacher-epochs', '0'], '--teacher-epochs'),
    (['--finetune-epochs', '-1'], '--finetune-epochs'),
    (['--num-images', '0'], '--num-images'),
    (['--num-images', '33'], '--num-images'),
    (['--prune-batches', '0'], '--prune-batches'),
    (['--quick', '--prune-batches', '0'], '--prune-batches'),
    (['--seed', '-1'], '--seed'),
    (['--seed', str(2 ** 32)], '--seed'),
    (['--device', 'gpu'], '--device'),
    (['--out', 'FILE'], '--out'),
    (['--out', ''], '--out'),
    (['--out', 'FILE/sub'], '--out'),
    (['--out', 'a' * 300], '--out'),  # a name longer than the file system takes
    (['--out', 'new/' + 'a' * 300 + '/out'], '--out'),
    (['--out', 'a/' * 2100], '--out'),  # a path longer than the system takes
    (['--teacher-epochs', 'two'], '--teacher-epochs'),
    (['--seed=--'], '--seed'),  # (argparse took the '--' away, leaving the seed an empty list)
    (['--out=--'], '--out'),
])
def test_run_demo_refuses_bad_arguments_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    """Each bad flag of run_demo.py: exit code 2, one `error:` line naming it, and nothing trained or written
    (neither --out nor the default runs/demo is created; the existing file given as --out is left alone)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'FILE').write_text('not a directory')
    for name in ('cli', 'train_teacher', 'prune', 'distill'):
        monkeypatch.setattr(run_demo, name, no_work)
    argv = [str(tmp_path / a) if a.startswith('FILE') else a for a in argv]
    if '--out' not in argv:
        argv += ['--out', str(tmp_path / 'out')]
    assert exit_code(run_demo.main, argv) == 2
    assert_one_error_line(capsys.readouterr().err, flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['FILE']
    assert (tmp_path / 'FILE').read_text() == 'not a directory'


@pytest.mark.parametrize('taylor,rand,expected', [
    # 254 and 250 of the 360 images: 70.5556 and 69.4444, whose unrounded gap (1.1111) printed +1.11 beside
    # figures 1.12 apart
    (100 * 254 / 360, 100 * 250 / 360, 'Taylor 70.56% beats random 69.44% (+1.12 points)'),
    (100 * 250 / 360, 100 * 254 / 360, 'Taylor 69.44% loses to random 70.56% (-1.12 points)'),
    (81.116, 80.004, 'Taylor 81.12% beats random 80.00% (+1.12 points)'),
    (100 * 288 / 360, 100 * 288 / 360, 'Taylor 80.00% ties with random 80.00% (+0.00 points)'),
    (80.001, 79.999, 'Taylor 80.00% ties with random 80.00% (+0.00 points)'),  # (not 'beats' by +0.00)
])
def test_run_demo_verdict_gap_is_the_gap_between_the_figures_it_prints(taylor, rand, expected):
    line = run_demo.verdict_line('after finetuning', taylor, rand)
    assert line == f'At prune rate 0.25, after finetuning: {expected}'
    assert {('attn', run_demo.COMPARED_RATE), ('random', run_demo.COMPARED_RATE)} <= set(run_demo.CONFIGS)
    shown = re.fullmatch(r'.*Taylor (\d+\.\d\d)% .* random (\d+\.\d\d)% \(([+-]\d+\.\d\d) points\)', line)
    assert f'{float(shown[1]) - float(shown[2]):+.2f}' == shown[3]


def test_demo_readme_names_every_file_and_folder_of_the_demo_not_per_configuration():
    """demo/README.md lists the demo's outputs: each one that is not per prune configuration, as it is called under
    runs/demo/ (details.json, the speed-ups the table prints, was written but not named)."""
    with open(os.path.join(ROOT, 'demo', 'README.md')) as f:
        readme = f.read()
    folders, files = run_demo.output_paths(os.path.join('runs', 'demo'))
    for key, path in list(folders.items()) + list(files.items()):
        if isinstance(key, str):
            assert f'`{path}' in readme, path


def test_run_demo_help_gives_each_default():
    """Every flag with a value by default says it in --help (the learning rates, the repeats and the seed said
    nothing, the epochs not how many): what a run does unasked."""
    assert flags_not_saying_their_default(run_demo.get_args_parser()) == []


def test_run_demo_caps_the_rows_of_its_figure_as_draw_masks_does():
    assert run_demo.MAX_MASK_ROWS == draw_masks.MAX_ROWS


def test_draw_masks_needs_as_many_images_as_rows(tmp_path, capsys):
    data = make_image_folder(tmp_path / 'data')  # val/: 3 classes of 2 images
    with pytest.raises(draw_masks.UserError, match=r'--num-images 9: .*val holds 6 images'):
        draw_masks.folder_images(str(data), 9, 32, (0.5,) * 3, (0.5,) * 3, 1.0)


def test_draw_masks_takes_one_image_per_class_folder_even_of_a_large_one(tmp_path):
    """The rows differ: the first image of each class folder, in sorted order, also when the first folder holds
    many images (a train/ split: the search had stopped there, after 50 per row)."""
    data = make_image_folder(tmp_path / 'data', classes=('a', 'b', 'c'), per_class=(0, 0), size=(8, 8))
    for c, n in (('a', 110), ('b', 1), ('c', 1)):
        make_image_folder(tmp_path / 'tmp', classes=(c,), per_class=(n, 0), size=(8, 8))
        os.replace(tmp_path / 'tmp' / 'train' / c, tmp_path / 'data' / 'val' / c)
    _, labels = draw_masks.folder_images(str(data), 2, 32, (0.5,) * 3, (0.5,) * 3, 1.0)
    assert labels == [os.path.join('a', '0.png'), os.path.join('b', '0.png')]
    _, labels = draw_masks.folder_images(str(data), 4, 32, (0.5,) * 3, (0.5,) * 3, 1.0)
    assert labels == [os.path.join(*p) for p in (('a', '0.png'), ('b', '0.png'), ('c', '0.png'), ('a', '1.png'))]


def test_draw_masks_reads_the_images_finetune_reads_and_only_those(tmp_path):
    """The image folders of finetune.py are torchvision's ImageFolder: a .pgm is an image there and a .gif is not;
    draw_masks reads the same files (it read .gif and skipped .pgm)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    for c, ext in (('a', 'pgm'), ('b', 'gif'), ('c', 'png')):
        os.makedirs(tmp_path / 'val' / c)
        Image.new('L' if ext == 'pgm' else 'RGB', (8, 8)).save(tmp_path / 'val' / c / f'0.{ext}')
    read = sorted(os.path.relpath(p, tmp_path / 'val') for p, _ in ImageFolder(str(tmp_path / 'val'),
                                                                                allow_empty=True).samples)
    _, labels = draw_masks.folder_images(str(tmp_path), 2, 32, (0.5,) * 3, (0.5,) * 3, 1.0)
    assert sorted(labels) == read == [os.path.join('a', '0.pgm'), os.path.join('c', '0.png')]


def test_run_demo_refuses_a_file_where_a_stage_writes_a_folder_and_the_reverse(tmp_path, capsys):
    """<out>/teacher a plain file stopped the demo in a FileExistsError traceback once the teacher stage began;
    such a path is named in one line before any work, and nothing is written."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'teacher').write_text('not a folder')
    assert run_demo.main(['--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f'error: --out {out}: {out / "teacher"} is in the way (the demo writes a folder there): move it '
                   f'away\n')
    (out / 'teacher').unlink()
    (out / 'speed_attn_0.40.txt').mkdir()
    assert run_demo.main(['--out', str(out)]) == 2
    assert capsys.readouterr().err == (f'error: --out {out}: {out / "speed_attn_0.40.txt"} is in the way (the demo '
                                       f'writes a file there): move it away\n')
    assert os.listdir(out) == ['speed_attn_0.40.txt']


@pytest.mark.parametrize('name', ['stdout.txt', 'eval.txt'])
def test_run_demo_refuses_a_folder_where_the_teacher_stage_writes_its_log(name, tmp_path, capsys):
    """<out>/teacher/ is kept (a teacher there is reused), not emptied as the other stages' folders are: a folder at
    its stdout.txt stopped the demo in an IsADirectoryError traceback (exit code 1) once the teacher stage began."""
    out = tmp_path / 'out'
    (out / 'teacher' / name).mkdir(parents=True)
    assert run_demo.main(['--out', str(out), '--quick']) == 2
    captured = capsys.readouterr()
    assert captured.err == (f'error: --out {out}: {out / "teacher" / name} is in the way (the demo writes a file '
                            f'there): move it away\n')
    assert captured.out == ''
    assert os.listdir(out / 'teacher') == [name]


def test_run_demo_device_needs_cuda(tmp_path, capsys):
    """--device cuda on a machine without CUDA is refused at once, naming --device."""
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    assert run_demo.main(['--device', 'cuda', '--out', str(tmp_path / 'out')]) == 2
    assert_one_error_line(capsys.readouterr().err, '--device')
    assert not (tmp_path / 'out').exists()


def test_demo_parsers_name_their_script():
    """The sentence describing each script is its description, not its prog (which starts the usage line)."""
    for module, prog in ((run_demo, 'demo/run_demo.py'), (draw_masks, 'demo/draw_masks.py')):
        p = module.get_args_parser()
        assert p.prog == prog and p.description and p.format_usage().startswith(f'usage: {prog} ')


def test_run_demo_default_arguments_pass_the_checks(tmp_path):
    """The defaults and --quick pass validate_args (every numeric flag has a range), which creates nothing."""
    for extra in ([], ['--quick', '--device', 'cpu']):
        a = run_demo.get_args_parser().parse_args(['--out', str(tmp_path / 'out')] + extra)
        run_demo.validate_args(a)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('extra,expected,said', [
    ([], {'teacher_epochs': 2, 'finetune_epochs': 1, 'prune_batches': 4, 'speed_repeats': 5},
     '--quick set: --teacher-epochs 2, --finetune-epochs 1, --prune-batches 4, --speed-repeats 5'),
    (['--teacher-epochs', '10', '--speed-repeats', '40'],
     {'teacher_epochs': 10, 'finetune_epochs': 1, 'prune_batches': 4, 'speed_repeats': 40},
     '--quick set: --finetune-epochs 1, --prune-batches 4'),
    (['--teacher-epochs', '30', '--finetune-epochs', '8', '--prune-batches', '9', '--speed-repeats', '30'],
     {'teacher_epochs': 30, 'finetune_epochs': 8, 'prune_batches': 9, 'speed_repeats': 30}, None),
])
def test_run_demo_quick_sets_only_what_is_not_given(extra, expected, said, tmp_path, monkeypatch, capsys):
    """--quick shortens the flags left out and says which; a value given wins (--teacher-epochs 10 used to run 2
    epochs, --speed-repeats 40 five repeats)."""
    seen = {}
    monkeypatch.setattr(run_demo, 'run', lambda a: seen.update(vars(a)) or 0)
    assert run_demo.main(['--quick', '--out', str(tmp_path / 'out')] + extra) == 0
    assert {k: seen[k] for k in expected} == expected
    lines = capsys.readouterr().out.splitlines()
    assert lines == ([f'{said} (every other value as given or its default)'] if said else [])
    quick = next(action for action in run_demo.get_args_parser()._actions if action.dest == 'quick')
    assert run_demo.flags_text(run_demo.QUICK) in quick.help  # --help says what it sets


@pytest.mark.parametrize('lines', [0, 3], ids=['first-line', 'in-a-stage'])
def test_run_demo_standard_output_that_cannot_be_written_is_one_line(lines, tmp_path, capsys, monkeypatch):
    """`run_demo.py > /dev/full` (or `| head` whose reader has gone): an OSError traceback with exit code 1, at its
    first line or at a stage's (finetune.py's lines pass through the stage's console); now one error line, exit
    2, before the teacher trains."""
    out = tmp_path / 'out'
    monkeypatch.setattr(sys, 'stdout', FullAfter(lines))
    monkeypatch.setattr(finetune.engine, 'train_epochs', lambda *a, **k: pytest.fail('the teacher trained'))
    assert run_demo.main(['--quick', '--device', 'cpu', '--out', str(out)]) == 2
    said = f'cannot write to standard output: {os.strerror(28)}'
    if lines:
        said = f'stage teacher: {said} (full output: {out}/teacher/stdout.txt)'
    assert_one_error_line(capsys.readouterr().err, said)
    assert not os.path.exists(out / 'teacher' / 'checkpoint.pth')


def test_run_demo_keeps_earlier_results_until_a_stage_replaces_them(tmp_path, monkeypatch, capsys):
    """A run that stops while the teacher trains (diverged, interrupted) leaves the earlier run's stages, results and
    TensorBoard summary: each stage replaces its own directory when it starts, not all of them before the teacher."""
    out = tmp_path / 'out'
    earlier = ['prune_attn_0.25/pruned_attn_0.25.pth', 'finetune_attn_0.25/checkpoint.pth', 'summary/events',
               'results.json']
    for name in earlier:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text('earlier')

    def diverged(*args, **kwargs):
        raise SystemExit('stage teacher diverged')
    monkeypatch.setattr(run_demo, 'train_teacher', diverged)
    for name in ('cli', 'prune', 'distill'):
        monkeypatch.setattr(run_demo, name, no_work)
    with pytest.raises(SystemExit, match='diverged'):
        run_demo.main(['--quick', '--device', 'cpu', '--out', str(out)])
    assert all((out / name).read_text() == 'earlier' for name in earlier)


def test_run_demo_speed_logs_hold_this_runs_timings_only(tmp_path, monkeypatch, capsys):
    """The speed stage's logs are appended to as they are written: an earlier run's are removed first, so each holds
    one run's timings."""
    out = tmp_path / 'out'
    out.mkdir()
    logs = [out / f'speed_{run_demo.rate_tag(mode, rate)}.txt' for mode, rate in run_demo.CONFIGS]
    for log in logs:
        log.write_text('timings of an earlier run\n')
    monkeypatch.setattr(run_demo, 'train_teacher', lambda *a, **k: ('teacher.pth', 90.0, False))
    monkeypatch.setattr(run_demo, 'prune', lambda *a, **k: {'path': 'pruned.pth', 'acc1': 50.0})
    monkeypatch.setattr(run_demo, 'distill', lambda *a, **k: {'path': 'finetuned.pth', 'acc1': 80.0})
    seen = []

    def speed(argv, log_path, *args, **kwargs):
        seen.append(os.path.exists(log_path))
        if len(seen) == len(logs):
            raise SystemExit('stop after the speed stage')
        return {}
    monkeypatch.setattr(run_demo, 'cli', speed)
    with pytest.raises(SystemExit, match='stop after the speed stage'):
        run_demo.main(['--quick', '--device', 'cpu', '--out', str(out)])
    assert seen == [False] * len(logs)


def test_run_demo_rows_and_verdicts_carry_the_figures_of_their_own_stage(tmp_path, monkeypatch, capsys):
    """Every figure of results.json, the table and the verdict lines is the one its own stage gave: stages
    scripted with a different accuracy, GFLOPs and images/s per configuration (and distinct teacher, before and
    after figures), the expected rows written out by hand here."""
    import timm
    out = tmp_path / 'out'
    tags = [run_demo.rate_tag(mode, rate) for mode, rate in run_demo.CONFIGS]
    pruned_acc = {tag: 40.0 + i for i, tag in enumerate(tags)}      # 40, 41, 42
    finetuned_acc = {tag: 70.0 + 3 * i for i, tag in enumerate(tags)}  # 70, 73, 76
    speed = {tag: {'dense_gflops': 0.05, 'pruned_gflops': 0.04 - 0.01 * i, 'dense_throughput': 1000.0 + 10 * i,
                   'pruned_throughput': 1500.0 + 100 * i, 'speedup': 1.5 + 0.1 * i} for i, tag in enumerate(tags)}
    monkeypatch.setattr(run_demo, 'train_teacher', lambda *a, **k: ('teacher.pth', 90.0, False))
    monkeypatch.setattr(run_demo, 'prune', lambda teacher, mode, rate, *a, **k: {
        'path': f'pruned_{run_demo.rate_tag(mode, rate)}.pth', 'acc1': pruned_acc[run_demo.rate_tag(mode, rate)]})

    def distill(pruned, teacher, out_dir, common, epochs, lr, tag, verbose):
        stage = tag.split()[-1]
        assert pruned == f'pruned_{stage}.pth'  # each finetuning starts from its own pruned model
        return {'path': f'finetuned_{stage}.pth', 'acc1': finetuned_acc[stage]}
    monkeypatch.setattr(run_demo, 'distill', distill)

    def timed(argv, log_path, tag, *a, **k):
        stage = tag.split()[-1]
        assert argv[argv.index('--resume') + 1] == f'finetuned_{stage}.pth'  # the finetuned model is timed
        return speed[stage]
    monkeypatch.setattr(run_demo, 'cli', timed)
    monkeypatch.setattr(draw_masks, 'load_model', lambda path, name: timm.create_model('cc_deit_digits_patch4_32'))

    def draw(model, images, path, *a, **k):
        from PIL import Image
        Image.new('RGB', (4, 4)).save(path)
        return path
    monkeypatch.setattr(draw_masks, 'draw_masks', draw)
    assert run_demo.main(['--quick', '--device', 'cpu', '--out', str(out)]) == 0
    rows = json.loads((out / 'results.json').read_text())['rows']
    expected = [('DeiT-digits (teacher)', 90.0, 0.05, 1010.0, 1.0)]  # dense images/s: the median of the three runs
    for i, (mode, rate) in enumerate(run_demo.CONFIGS):
        tag = tags[i]
        for finetuned, acc in ((False, pruned_acc[tag]), (True, finetuned_acc[tag])):
            expected.append((run_demo.row_name(mode, rate, finetuned), acc, 0.04 - 0.01 * i, 1500.0 + 100 * i,
                             1.5 + 0.1 * i))
    assert [(r['name'], r['acc1'], r['gflops'], r['throughput']) for r in rows] == [e[:4] for e in expected]
    stdout = capsys.readouterr().out
    for name, acc, gflops, throughput, speedup in expected:
        assert f'| {name} | {acc:.1f} | {gflops:.3f} | {throughput:.0f} | {speedup:.2f} |' in stdout, name
    # the verdicts set Taylor (attn 0.25: 40 before, 70 after) against random (random 0.25: 42, 76)
    assert 'before finetuning: Taylor 40.00% loses to random 42.00% (-2.00 points)' in stdout
    # the stage headers count 1, 2, 3, ... (they went from 4 to 6: the results' stage said nothing)
    headers = [int(n) for n in re.findall(r'^== (\d+)\. ', stdout, re.M)]
    assert headers == list(range(1, len(headers) + 1)) and len(headers) >= 6, headers
    assert 'after finetuning: Taylor 70.00% loses to random 76.00% (-6.00 points)' in stdout


def test_run_demo_stopped_after_results_json_leaves_the_details_of_the_same_run(tmp_path, monkeypatch, capsys):
    """details.json (the speed-ups the table prints, the arguments) is written with results.json: a run that stops
    in the pictures' stage left an earlier run's details.json beside its own results.json."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'details.json').write_text(json.dumps({'speed': 'of an earlier run'}))
    speed = {'dense_gflops': 0.05, 'pruned_gflops': 0.04, 'dense_throughput': 1000.0, 'pruned_throughput': 1500.0,
             'speedup': 1.5}
    monkeypatch.setattr(run_demo, 'train_teacher', lambda *a, **k: ('teacher.pth', 90.0, False))
    monkeypatch.setattr(run_demo, 'prune', lambda *a, **k: {'path': 'pruned.pth', 'acc1': 50.0})
    monkeypatch.setattr(run_demo, 'distill', lambda *a, **k: {'path': 'finetuned.pth', 'acc1': 80.0})
    monkeypatch.setattr(run_demo, 'cli', lambda *a, **k: dict(speed))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(draw_masks, 'load_model', interrupted)
    assert run_demo.main(['--quick', '--device', 'cpu', '--seed', '5', '--out', str(out)]) == 130
    assert json.loads((out / 'results.json').read_text())['rows'][1]['throughput'] == 1500.0
    details = json.loads((out / 'details.json').read_text())
    assert details['speed'] == {run_demo.rate_tag(mode, rate): speed for mode, rate in run_demo.CONFIGS}
    assert details['args']['seed'] == 5 and details['args']['teacher_epochs'] == 2


@pytest.mark.parametrize('epochs', [['--quick'], ['--teacher-epochs', '6', '--finetune-epochs', '1']])
def test_run_demo_passes_finetune_no_flag_it_notes_as_unused(epochs, tmp_path, monkeypatch, capsys):
    """Every finetune.py command of the demo (teacher with and without a warm-up, Taylor and random pruning,
    finetuning, evaluations, timings) is given only flags it acts on: finetune.py notes none as having no effect
    (the recipe passed the cosine schedule step/plateau flags, momentum with adamw, --aa and --reprob on DIGITS,
    --no-repeated-aug in one process, --warmup-lr without a warm-up, and --data-set to --speed-only)."""
    import finetune
    out = tmp_path / 'out'
    commands = []

    def cli(argv, log_path, *args, **kwargs):
        commands.append(argv)
        if sum('--speed-only' in c for c in commands) == len(run_demo.CONFIGS):
            raise SystemExit('stop after the speed stage')
        return {'acc1': 50.0}
    monkeypatch.setattr(run_demo, 'cli', cli)
    monkeypatch.setattr(run_demo, 'last_json_line', lambda path: {'gflops': 0.03, 'channels': [65] * 6})
    with pytest.raises(SystemExit, match='stop after the speed stage'):
        run_demo.main(epochs + ['--device', 'cpu', '--out', str(out)])
    kinds = {('--prune' in c, '--eval' in c, '--speed-only' in c, '--teacher-path' in c) for c in commands}
    assert len(kinds) == 5 and any('random' in c for c in commands), commands  # every kind of command was seen
    parser = finetune.get_args_parser()
    for argv in commands:
        assert finetune.unused_flag_notes(parser.parse_args(argv), parser) == [], argv


@pytest.mark.parametrize('echo', [True, False])
def test_run_demo_prints_each_command_as_a_shell_runs_it(echo, tmp_path, monkeypatch, capsys):
    """The `$ python finetune.py ...` line of a stage (on the console, or first in its log) is the command a shell
    runs, a path with a space or a quote in it included: it was the arguments joined with spaces."""
    import shlex
    import finetune
    monkeypatch.setattr(finetune, 'run', lambda args: {'acc1': 50.0})
    folder = tmp_path / "my runs" / "it's"
    argv = ['--eval', '--resume', str(folder / 'checkpoint.pth'), '--output_dir', str(folder)]
    log = folder / 'eval.txt'
    run_demo.cli(argv, str(log), 'teacher eval', False, echo)
    line = capsys.readouterr().out.splitlines()[0] if echo else log.read_text().splitlines()[0]
    assert line.startswith('$ ') and shlex.split(line[2:]) == ['python', 'finetune.py'] + argv


def test_run_demo_write_failure_midway_is_one_error_line(tmp_path, monkeypatch, capsys):
    """A result that cannot be written midway (the atomic writer's error: a full disk) ends the run with one
    `error:` line and exit code 2, not a traceback."""
    def full_disk(*args, **kwargs):
        raise run_demo.UserError('cannot write x/results.json: No space left on device (the previous file is '
                                 'untouched)')
    monkeypatch.setattr(run_demo, 'train_teacher', full_disk)
    assert run_demo.main(['--quick', '--device', 'cpu', '--out', str(tmp_path / 'out')]) == 2
    assert_one_error_line(capsys.readouterr().err, 'No space left on device')


@pytest.mark.parametrize('kind,code,said', [
    ('user', 2, r'error: stage teacher: cannot write \S+: No space left on device \(the previous file is untouched\) '
                r'\(full output: \S+stdout\.txt\)'),
    ('nan', 3, r'error: stage teacher diverged: loss is nan at epoch 0, step 0; stopped \(full output: \S+\)'),
])
def test_a_stage_that_stops_ends_as_finetune_py_would(kind, code, said, tmp_path, monkeypatch, capsys):
    """A stage's finetune.py run that stops on a user error found midway (a full disk) or on a diverged loss ends
    the demo with finetune.py's one `error:` line, naming the stage and its log, and finetune.py's exit code (2,
    3), not a line without `error:` and exit code 1."""
    import finetune

    def stops(args):
        if kind == 'user':
            raise run_demo.UserError(f'cannot write {args.output_dir}/checkpoint.pth: No space left on device (the '
                                     'previous file is untouched)')
        raise finetune.NonFiniteLossError('loss is nan at epoch 0, step 0; stopped')
    monkeypatch.setattr(finetune, 'run', stops)
    assert run_demo.main(['--quick', '--device', 'cpu', '--out', str(tmp_path / 'out')]) == code
    err = capsys.readouterr().err
    assert_one_error_line(err, 'stage teacher')
    assert re.fullmatch(said, err.strip()), err


@pytest.mark.parametrize('fresh', [False, True])
def test_ctrl_c_ends_the_demo_with_one_line_and_exit_130(fresh, tmp_path, monkeypatch, capsys):
    """(With --fresh the line said to run the demo again, which with --fresh retrains the teacher it said is
    reused.)"""
    assert_ctrl_c_ends_the_script(run_demo.main, 'demo', tmp_path, monkeypatch, capsys, fresh)


@pytest.mark.parametrize('fresh', [False, True])
def test_sigterm_ends_the_demo_as_ctrl_c_does_with_exit_143(fresh, tmp_path, monkeypatch, capsys):
    """(SIGTERM, a scheduler's or `kill`'s, ended the demo without a word.)"""
    assert_ctrl_c_ends_the_script(run_demo.main, 'demo', tmp_path, monkeypatch, capsys, fresh, sigterm=True)

@pytest.mark.parametrize('sigterm', [False, True])
def test_a_stop_in_a_later_stage_names_that_stage(sigterm, tmp_path, monkeypatch, capsys):
    """The one line of a Ctrl-C (SIGTERM) names the stage under way as its header numbers it, here the prune stage
    after the teacher, not the first stage nor none; nothing of the stage is written."""
    from utils.signals import Terminated
    out = tmp_path / 'out'
    monkeypatch.setattr(run_demo, 'train_teacher', lambda *a, **k: (str(out / 'teacher' / 'checkpoint.pth'), 90.0,
                                                                     False))

    def stopped(*args, **kwargs):
        raise Terminated if sigterm else KeyboardInterrupt
    monkeypatch.setattr(run_demo, 'prune', stopped)
    assert run_demo.main(['--quick', '--device', 'cpu', '--out', str(out)]) == (143 if sigterm else 130)
    captured = capsys.readouterr()
    said = 'terminated (SIGTERM)' if sigterm else 'interrupted'
    assert captured.err.startswith(f'{said} during stage 2 (prune); run the demo again to go on ') and \
        captured.err.count('\n') == 1, captured.err
    assert '== 2. prune the teacher' in captured.out and os.listdir(out) == []


def fake_teacher(path, lr=1e-3, seed=0, epochs=3, epoch=2, model=None):
    import finetune
    digits = finetune.cc_model_name(run_demo.MODEL)
    return teacher_checkpoint(path, model or digits, lr, seed, epochs, epoch, weights_of=digits)


def test_teacher_reused_only_with_the_same_epochs_lr_and_seed(tmp_path):
    """teacher_check: 'done' (or 'partial', unfinished) only for the same model, epochs, learning rate and seed;
    a teacher stored with another lr or seed is 'other', and it says what differs."""
    path = fake_teacher(tmp_path / 'teacher' / 'checkpoint.pth')
    assert run_demo.teacher_check(path, 3, 1e-3, 0)[0] == 'done'
    assert run_demo.teacher_check(str(tmp_path / 'missing.pth'), 3, 1e-3, 0)[0] == 'none'
    assert run_demo.teacher_check(path, 4, 1e-3, 0)[0] == 'other'
    assert run_demo.teacher_check(path, 3, 2e-3, 0) == ('other', 'learning rate 0.001 instead of 0.002')
    assert run_demo.teacher_check(path, 3, 1e-3, 1) == ('other', 'seed 0 instead of 1')
    partial = fake_teacher(tmp_path / 'partial' / 'checkpoint.pth', epoch=0)
    assert run_demo.teacher_check(partial, 3, 1e-3, 0)[0] == 'partial'
    assert run_demo.teacher_check(partial, 3, 1e-3, 5)[0] == 'other'
    other_model = fake_teacher(tmp_path / 'm' / 'checkpoint.pth', model='cc_deit_tiny_patch16_224')
    assert run_demo.teacher_check(other_model, 3, 1e-3, 0)[0] == 'other'
    # the model recorded by its timm name (cc_ left out, as --model may give it) is the same model
    plain = fake_teacher(tmp_path / 'plain' / 'checkpoint.pth', model=run_demo.MODEL)
    assert run_demo.teacher_check(plain, 3, 1e-3, 0) == ('done', None)


def test_teacher_check_reads_the_teacher_once(tmp_path, monkeypatch):
    """teacher_check reads the stored teacher once: its settings and its weights (built to prove they fit the
    model) come from the same read, as finetune.py's --resume does (it read the file a second time to build)."""
    from utils import checkpoint_io
    path = fake_teacher(tmp_path / 'teacher' / 'checkpoint.pth')
    reads, real = [], checkpoint_io._torch_load
    monkeypatch.setattr(checkpoint_io, '_torch_load',
                        lambda p, mmap: reads.append(os.path.realpath(p)) or real(p, mmap))
    assert run_demo.teacher_check(path, 3, 1e-3, 0) == ('done', None)
    assert reads == [os.path.realpath(path)]


def test_a_teacher_of_another_recipe_or_data_is_not_reused(tmp_path):
    """A teacher whose recorded args differ from the demo's training command in a flag it sets (the data set, the
    batch, the optimizer: another finetune.py run, or an older demo's recipe) is 'other', the flag named; the
    flags that say only where and how it ran (device, workers, folder) do not count, nor flags it does not record."""
    import finetune
    common = run_demo.common_args(0, 'cpu')
    command = run_demo.teacher_command(3, 1e-3, common)
    recorded = vars(finetune.get_args_parser().parse_args(command + ['--output_dir', 'elsewhere']))
    for changes, why in (({}, None), ({'device': 'cuda', 'num_workers': 8, 'output_dir': 'x'}, None),
                         ({'data_set': 'IMNET'}, "data_set 'IMNET' instead of 'DIGITS'"),
                         ({'batch_size': 128}, 'batch_size 128 instead of 64'),
                         ({'opt': 'sgd'}, "opt 'sgd' instead of 'adamw'"),
                         ({'weight_decay': 0.0}, 'weight_decay 0.0 instead of 0.05')):
        path = fake_teacher(tmp_path / str(len(changes)) / 'checkpoint.pth')
        ckpt = torch.load(path)
        ckpt['args'] = dict(recorded, model=finetune.cc_model_name(run_demo.MODEL), **changes)
        torch.save(ckpt, path)
        assert run_demo.teacher_check(path, 3, 1e-3, 0, command) == (('done', None) if why is None
                                                                     else ('other', why)), changes
        assert run_demo.teacher_check(path, 3, 1e-3, 0)[0] == 'done'  # (without the command: the four values)


@pytest.mark.parametrize('spoil, why', [
    (lambda ckpt: ckpt.update(epoch='abc'), "its last epoch is 'abc', not a whole number"),
    (lambda ckpt: ckpt.update(epoch=None), 'its last epoch is None, not a whole number'),
    (lambda ckpt: ckpt['model'].pop('blocks.0.attn.qkv.weight'),
     r'its weights cannot be used: \S+ does not fit cc_deit_digits_patch4_32: missing keys '
     r'blocks\.0\.attn\.qkv\.weight'),
    # a pruned model (the checkpoint.pth of a finetuning with the teacher's epochs, lr and seed): it was reused as
    # the dense teacher
    (lambda ckpt: ckpt['model']['blocks.1.attn.token_index'][-8:].fill_(False),
     r'a pruned model \(its blocks keep \[65, 57, 65, 65, 65, 65\] of 65 tokens\), not a dense teacher'),
])
def test_a_teacher_that_cannot_be_reused_is_trained_again(spoil, why, tmp_path):
    """A stored teacher with the right model, schedule and seed but an epoch that is not a number (a traceback)
    or weights that do not fit the model (the demo failed at the teacher's evaluation, exit 1) is 'other': the
    demo says why and trains a new one."""
    path = fake_teacher(tmp_path / 'teacher' / 'checkpoint.pth')
    ckpt = torch.load(path, weights_only=True)
    spoil(ckpt)
    torch.save(ckpt, path)
    state, said = run_demo.teacher_check(path, 3, 1e-3, 0)
    assert state == 'other' and re.fullmatch(why, said), said


@pytest.mark.parametrize('lr,seed,retrained', [(1e-3, 0, False), (2e-3, 0, True), (1e-3, 7, True)])
def test_train_teacher_retrains_on_another_lr_or_seed(lr, seed, retrained, tmp_path, monkeypatch, capsys):
    """train_teacher reuses a stored teacher only with the same --teacher-lr and --seed (the --seed of its common
    arguments); otherwise it says why, removes it and trains a new one from scratch with the lr asked for."""
    teacher_dir = tmp_path / 'teacher'
    fake_teacher(teacher_dir / 'checkpoint.pth', lr=1e-3, seed=0)
    calls = []
    monkeypatch.setattr(run_demo, 'cli', lambda argv, *a, **k: calls.append(argv) or {'acc1': 50.0})
    path, acc, reused = run_demo.train_teacher(str(teacher_dir), 3, lr, run_demo.common_args(seed, 'cpu'))
    out = capsys.readouterr().out
    assert path == str(teacher_dir / 'checkpoint.pth') and acc == 50.0 and reused is not retrained
    trainings = [c for c in calls if '--eval' not in c]
    if retrained:
        assert len(trainings) == 1 and '--resume' not in trainings[0]
        assert trainings[0][trainings[0].index('--lr') + 1] == str(lr)
        assert trainings[0][trainings[0].index('--seed') + 1] == str(seed)
        assert 'training a new one' in out and ('learning rate' in out or 'seed' in out)
        assert not (teacher_dir / 'checkpoint.pth').exists()  # the other teacher was removed
    else:
        assert trainings == [] and 'reusing the teacher already trained' in out
    # the evaluation is given no flag finetune.py notes as having no effect (--seed: it draws no random number)
    parser = finetune.get_args_parser()
    for argv in [c for c in calls if '--eval' in c]:
        assert finetune.unused_flag_notes(parser.parse_args(argv), parser) == [], argv


@pytest.mark.parametrize('fresh', [False, True])
def test_a_teacher_folder_that_is_a_link_is_replaced_as_a_link(fresh, tmp_path, monkeypatch, capsys):
    """<out>/teacher, a symbolic link to a folder holding another teacher (or any, with --fresh): the demo and the
    study ended in an OSError traceback (rmtree refuses a link), exit code 1.  The link is removed and a new
    teacher trained in its place; the folder it names, not the output's, is left as it was."""
    elsewhere = tmp_path / 'elsewhere'
    fake_teacher(elsewhere / 'checkpoint.pth', lr=1e-3, seed=0)
    teacher_dir = tmp_path / 'out' / 'teacher'
    teacher_dir.parent.mkdir()
    os.symlink(elsewhere, teacher_dir)
    calls = []
    monkeypatch.setattr(run_demo, 'cli', lambda argv, *a, **k: calls.append(argv) or {'acc1': 50.0})
    run_demo.train_teacher(str(teacher_dir), 3, 1e-3 if fresh else 2e-3, run_demo.common_args(0, 'cpu'), fresh)
    assert len([c for c in calls if '--eval' not in c]) == 1 and not os.path.lexists(teacher_dir)
    assert sorted(os.listdir(elsewhere)) == ['checkpoint.pth']


def test_a_stage_folder_that_is_a_link_is_replaced_as_a_link(tmp_path, monkeypatch):
    """A stage's folder (<out>/prune_attn_0.25/, or a seed's in the study) that is a symbolic link: it was left as it
    was (rmtree's errors ignored) and the stage wrote through it, beside what the folder it names held.  The link is
    removed and the stage writes a folder of its own; the linked folder is left as it was."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'precious.txt').write_text('keep')
    stage = tmp_path / 'prune_attn_0.25'
    os.symlink(elsewhere, stage)

    def cli(argv, log_path, *a, **k):
        out_dir = argv[argv.index('--output_dir') + 1]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'prune_log.txt'), 'a') as f:
            f.write(json.dumps({'gflops': 0.03, 'channels': [65] * 6}) + '\n')
        return {'acc1': 50.0}
    monkeypatch.setattr(run_demo, 'cli', cli)
    run_demo.prune('teacher.pth', 'attn', 0.25, str(stage), run_demo.common_args(0, 'cpu'), None, 'prune')
    assert stage.is_dir() and not stage.is_symlink() and os.listdir(stage) == ['prune_log.txt']
    assert os.listdir(elsewhere) == ['precious.txt']


def test_the_summary_folder_that_is_a_link_is_replaced_as_a_link(tmp_path):
    """<out>/summary (the demo's TensorBoard events) that is a symbolic link: its emptying was skipped (rmtree's
    error on a link ignored), so the events went into the folder it names, beside an earlier run's.  The link is
    removed and the events are written into a folder of its own; the linked folder is left as it was."""
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'events.out.tfevents.earlier').write_text('an earlier run')
    summary = tmp_path / 'summary'
    os.symlink(elsewhere, summary)
    tb = run_demo.fresh_summary(str(summary))
    tb.scalars({'acc1': 50.0}, 0, prefix='demo/')
    tb.close()
    assert summary.is_dir() and not summary.is_symlink()
    assert [f for f in os.listdir(summary) if f.startswith('events.out.tfevents.')]
    assert os.listdir(elsewhere) == ['events.out.tfevents.earlier']


def test_fresh_retrains_a_reusable_teacher_and_says_why(tmp_path, monkeypatch, capsys):
    """--fresh trains the teacher again from scratch even where the stored one would be reused, and says it is
    --fresh that retrains it (not that the folder holds another teacher: it holds the same one)."""
    teacher_dir = tmp_path / 'teacher'
    fake_teacher(teacher_dir / 'checkpoint.pth', lr=1e-3, seed=0)
    assert run_demo.teacher_check(str(teacher_dir / 'checkpoint.pth'), 3, 1e-3, 0)[0] == 'done'
    calls = []
    monkeypatch.setattr(run_demo, 'cli', lambda argv, *a, **k: calls.append(argv) or {'acc1': 50.0})
    assert run_demo.train_teacher(str(teacher_dir), 3, 1e-3, run_demo.common_args(0, 'cpu'), fresh=True)[2] is False
    out = capsys.readouterr().out
    trainings = [c for c in calls if '--eval' not in c]
    assert len(trainings) == 1 and '--resume' not in trainings[0]
    assert not (teacher_dir / 'checkpoint.pth').exists()
    assert '--fresh' in out and 'another teacher' not in out, out

@pytest.mark.parametrize('argv,flag', [
    (['--eval-crop-ratio', '0'], '--eval-crop-ratio'),
    (['--eval-crop-ratio', '1.5'], '--eval-crop-ratio'),
    (['--num-images', '0'], '--num-images'),
    (['--num-images', '400'], '--num-images'),  # a figure of 400 rows took minutes to lay out
    (['--data-set', 'IMNET'], '--data-path'),  # no folder given: --data-path is still its default, DIGITS
    (['--input-size', '0'], '--input-size'),
    (['--out', 'x.jpgz'], '--out'),
    (['--out', 'FILE/m.png'], '--out'),
    (['--out', '.'], '--out'),
    (['--out', '/proc/none/m.png'], '--out'),
    (['--out', ''], '--out'),  # matplotlib would write a hidden .png
    (['--out', 'FILE'], '--out'),  # no extension: matplotlib would write FILE.png, and FILE may be the checkpoint
    (['--out', 'm'], '--out'),
    # a name the file system takes, but not the atomic writer's temporary one beside it, or one too long itself:
    # said only when the picture was written, after the model was read and run
    (['--out', 'm' * (os.pathconf('/tmp', 'PC_NAME_MAX') - 8) + '.png'], '--out'),
    (['--out', 'm' * 300 + '.png'], '--out'),
    (['--title', r'$\foo$'], '--title'),  # mathtext fails only when the figure is drawn, after the work
    (['--title', r'$\frac{1}$ of the slots'], '--title'),
    (['--data-set', 'DIGITS', '--data-path', 'FILE'], '--data-path'),  # as finetune.py: DIGITS reads no folder
    # no such folder, or a file: said only after the checkpoint was read and its model built
    (['--data-path', 'MISSING'], '--data-path'),
    (['--data-path', 'FILE'], '--data-path'),
    (['--data-set', 'IMNET', '--data-path', 'MISSING'], '--data-path'),
    (['--input-size', '64'], '--input-size'),  # the digits are 32 px: timm's patch embedding asserted
    # a folder's images resized to 100000 px a side: the model of that size took 240 GB (a traceback), or more
    (['--data-path', 'FILE', '--input-size', '100000'], '--input-size 100000'),
    (['--data-path', 'FILE', '--input-size', str(10 ** 30)], '--input-size'),
])
def test_draw_masks_refuses_bad_arguments_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    """Each bad flag of draw_masks.py: exit code 2, one `error:` line naming it, before the model is loaded and
    with nothing written (an unsupported extension, a folder that cannot be created, a directory as --out)."""
    if argv[-1].startswith('/proc/') and not os.path.isdir('/proc'):
        pytest.skip('no /proc here')
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'FILE').write_text('not a directory')
    monkeypatch.setattr(draw_masks, 'load_model', no_work)
    argv = [str(tmp_path / a) if a.startswith(('FILE', 'MISSING')) else a for a in argv]
    code = exit_code(draw_masks.main, ['--resume', str(tmp_path / 'missing.pth')] + argv)
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, flag)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['FILE']


@pytest.mark.parametrize('out', ['FOLDER', 'FOLDER/', '.', 'NEW/'])
def test_draw_masks_out_naming_a_folder_says_so_and_suggests_a_name_it_takes(out, tmp_path, monkeypatch, capsys):
    """--out naming a folder (one that exists, or a name ending in a separator) is refused as a folder, with a file
    name in it that --out takes: it was refused as having no extension, suggesting FOLDER/.png or ..png, which have
    none either."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'FOLDER').mkdir()
    monkeypatch.setattr(draw_masks, 'load_model', no_work)
    assert exit_code(draw_masks.main, ['--resume', str(tmp_path / 'missing.pth'), '--out', out]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, 'directory')
    suggested = re.search(r'e\.g\. (\S+)$', err.strip()).group(1)
    assert suggested == os.path.join(out, 'masks.png')
    draw_masks.check_out_file(suggested)  # (raises if --out would refuse it)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['FOLDER']


def digits_checkpoint(tmp_path):
    """A digits model file whose args name its model, as finetune.py writes it (draw_masks reads the name)."""
    import argparse
    import timm
    model = timm.create_model('cc_deit_digits_patch4_32')
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(model='deit_digits_patch4_32')}, path)
    return path


def test_draw_masks_refuses_to_draw_over_the_checkpoint(tmp_path, monkeypatch, capsys):
    """--out naming the --resume file itself is refused before the model is loaded; the checkpoint is left alone."""
    ckpt = tmp_path / 'model.png'
    ckpt.write_bytes(b'checkpoint')
    monkeypatch.setattr(draw_masks, 'load_model', no_work)
    assert exit_code(draw_masks.main, ['--resume', str(ckpt), '--out', str(ckpt)]) == 2
    assert_one_error_line(capsys.readouterr().err, '--out')
    assert ckpt.read_bytes() == b'checkpoint'


def test_draw_masks_failed_write_keeps_the_previous_picture(tmp_path, monkeypatch, capsys):
    """A disk that fills while the picture is written: one error line, exit code 2, the previous picture intact
    and no temporary file left (the picture goes through the atomic writer, not straight to --out)."""
    import errno
    import matplotlib.figure
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / 'm.png'
    out.write_bytes(b'previous picture')

    def full_disk(fig, f, **kwargs):
        f.write(b'\x89PNG partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
    assert draw_masks.main(['--resume', str(ckpt), '--num-images', '1', '--out', str(out)]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err, 'No space left on device')
    assert 'Saved' not in captured.out
    assert out.read_bytes() == b'previous picture'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth', 'm.png']


@pytest.mark.parametrize('stop, code, said', [(KeyboardInterrupt, 130, 'interrupted'),
                                               ('Terminated', 143, 'terminated (SIGTERM)')])
@pytest.mark.parametrize('earlier', [False, True])
def test_draw_masks_stopped_midway_is_one_line_and_finetunes_exit_code(stop, code, said, earlier, tmp_path,
                                                                      monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) while the picture is made: one line saying so and that nothing was written (a picture
    already there is as it was), exit code 130 (143) as finetune.py's, no traceback."""
    from utils.signals import Terminated
    stop = Terminated if stop == 'Terminated' else stop
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / 'm.png'
    if earlier:
        out.write_bytes(b'previous picture')

    def stopped(*args, **kwargs):
        raise stop()
    monkeypatch.setattr(draw_masks, 'digits_images', stopped)
    assert draw_masks.main(['--resume', str(ckpt), '--num-images', '1', '--out', str(out)]) == code
    kept = f' ({out} is as it was)' if earlier else ''
    assert capsys.readouterr().err == f'{said}; nothing was written{kept}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ckpt.pth'] + (['m.png'] if earlier else [])
    assert not earlier or out.read_bytes() == b'previous picture'


def test_draw_masks_notes_an_eval_crop_ratio_it_does_not_use(tmp_path, capsys):
    """--eval-crop-ratio, given, is noted where the evaluation transform ignores it (finetune.py's rules: DIGITS has
    its own transform; at 32 px or less nothing is cropped), and not where it crops; the picture is still drawn."""
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / 'm.svg'
    assert draw_masks.main(['--resume', str(ckpt), '--num-images', '1', '--eval-crop-ratio', '0.875',
                            '--out', str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == 'note: --eval-crop-ratio 0.875 has no effect: --data-set DIGITS has its own fixed transform'
    assert lines[-1] == f'Saved {out}' and out.read_text().lstrip().startswith('<?xml')
    parser = draw_masks.get_args_parser()
    folder = parser.parse_args(['--resume', 'x', '--data-path', str(tmp_path), '--eval-crop-ratio', '0.875'])
    assert draw_masks.unused_flag_notes(folder, parser, 224) == []
    assert draw_masks.unused_flag_notes(folder, parser, 32) == [
        'note: --eval-crop-ratio 0.875 has no effect: at an input of 32 px or less the evaluation does not crop (as '
        'in DeiT, which takes CIFAR images as they are)']
    default = parser.parse_args(['--resume', 'x', '--data-path', str(tmp_path)])
    assert draw_masks.unused_flag_notes(default, parser, 32) == []  # not given: nothing to say


def test_draw_masks_refuses_an_input_size_that_is_not_a_whole_number_of_patches(tmp_path, capsys):
    """--input-size 33 for a model of 4x4 patches: the patch embedding drops the rest of each image, and the drawing
    failed only after the images were read and run, saying 'images are (33, 33), the model needs (32, 32)' without
    naming the flag.  One error line naming --input-size and the patch size, as finetune.py gives it; no picture."""
    ckpt = digits_checkpoint(tmp_path)
    data = make_image_folder(tmp_path / 'data', classes=('a',), per_class=(1, 1))
    out = tmp_path / 'm.png'
    assert draw_masks.main(['--resume', str(ckpt), '--data-path', data, '--num-images', '1', '--input-size', '33',
                            '--out', str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, '--input-size 33 is not a whole number of 4x4 patches')
    assert not out.exists()
    assert draw_masks.main(['--resume', str(ckpt), '--data-path', data, '--num-images', '1', '--input-size', '32',
                            '--out', str(out)]) == 0, capsys.readouterr().err
    assert out.exists()


def test_draw_masks_titles_a_checkpoint_whose_folder_name_is_not_text_here(tmp_path, capsys):
    """A folder named beyond ASCII read under LC_ALL=C (here: a byte that is no UTF-8 either) is held with
    surrogates, which the font cannot draw: the title ended the drawing in a traceback, and no picture."""
    ckpt = digits_checkpoint(tmp_path)
    folder = tmp_path / os.fsdecode(b'r\xc3\xbcn\xff')
    folder.mkdir()
    ckpt = ckpt.rename(folder / 'ckpt.pth')
    out = tmp_path / 'm.png'
    assert draw_masks.main(['--resume', str(ckpt), '--num-images', '1', '--out', str(out)]) == 0, \
        capsys.readouterr().err
    assert out.exists()
    assert draw_masks.plain_text(os.fsdecode(b'r\xc3\xbcn\xff $')) == 'r\u00fcn\\xff \\$'


def test_draw_masks_standard_output_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """`draw_masks.py ... > /dev/full` (or `| head` whose reader has gone): an OSError traceback, exit code 1."""
    ckpt = digits_checkpoint(tmp_path)
    out = tmp_path / 'm.png'
    monkeypatch.setattr(sys, 'stdout', FullAfter(0))
    assert draw_masks.main(['--resume', str(ckpt), '--num-images', '1', '--out', str(out)]) == 2
    assert_one_error_line(capsys.readouterr().err, f'cannot write to standard output: {os.strerror(28)}; {out} '
                                                   f'was written completely')
    assert out.exists()
