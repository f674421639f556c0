"""Every mistake a user can make ends in exactly one line `error: ...` on stderr and a non-zero exit code,
never a traceback, and leaves the results already in --output_dir as they were.

The runs go through finetune.main() in this process (fast); test_cli_script_prints_one_line runs the
script itself to check the real stderr and exit status.
"""
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import finetune
import models
from conftest import (DIGITS_ARGS, ROOT, digits_world, launched, make_image_folder, no_work, official_checkpoint,
                      pruned_model, subprocess_env)
import utils
from utils import UserError, check_output_dir

EXIT_USER_ERROR, EXIT_DIVERGED = 2, 3


pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    world = digits_world(tmp_path_factory.mktemp('errors'))
    world['tiny'] = official_checkpoint(world['base'] / 'deit_tiny.pth', 'cc_deit_tiny_patch16_224')
    return world


@pytest.fixture
def earlier(tmp_path, world):
    """An output directory holding the result of an earlier --prune run at another rate (and a note), to prove
    failed runs leave it alone."""
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(world['dense'], out / 'pruned_0.25.pth')
    (out / 'notes.txt').write_text('earlier results\n')
    return out


def snapshot(directory):
    """{relative path: sha1} of every file, hidden ones (temporary files) included."""
    result = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                result[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return result


def cli(capsys, *argv):
    code = finetune.main([*DIGITS_ARGS, *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys, argv, code, pattern):
    got, out, err = cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, out[-2000:], err)
    assert len(lines) == 1, err
    assert lines[0].startswith('error: '), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert 'Traceback' not in out + err
    return lines[0]


def finetune_args(world, out, *extra):
    return ['--data-path', world['data'], '--output_dir', out, '--final_finetune', '1', *extra]


def prune_args(world, out, *extra):
    return ['--prune', '--prune_rate', '0.3', '--resume', world['dense'], '--data-path', world['data'],
            '--output_dir', out, *extra]


def copy_data(world, tmp_path):
    return shutil.copytree(world['data'], tmp_path / 'data')


# ----------------------------------------------------------------------------------------------------------
# data

def test_missing_data_path(capsys, world, earlier, tmp_path):
    before = snapshot(earlier)
    missing = tmp_path / 'nowhere'
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', missing), EXIT_USER_ERROR,
                          rf'--data-path {re.escape(str(missing))} does not exist or is not a directory')
    assert snapshot(earlier) == before


def test_a_continued_runs_data_path_that_is_gone_says_where_it_comes_from(capsys, world, tmp_path):
    """A continued run reads the --data-path its checkpoint records: once that folder had moved, the error named a
    path the user had not given, without saying it came from the run or how to change it (as for its teacher)."""
    data, out = copy_data(world, tmp_path), tmp_path / 'out'
    assert cli(capsys, '--data-path', data, '--output_dir', out, '--final_finetune', '1', '--resume',
               world['dense'])[0] == 0
    moved = data.rename(tmp_path / 'moved')
    before = snapshot(out)
    assert_one_line_error(capsys, ['--resume', out / 'checkpoint.pth', '--final_finetune', '2'], EXIT_USER_ERROR,
                          rf'^error: --data-path {re.escape(str(data))} does not exist or is not a directory '
                          rf'\(--data-path of the run {re.escape(str(out / "checkpoint.pth"))} continues; give '
                          rf'--data-path to change it\)$')
    assert snapshot(out) == before
    code, _, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--final_finetune', '2', '--data-path', moved)
    assert code == 0, err


def test_no_data_path_at_all(capsys, world, earlier):
    assert_one_line_error(capsys, ['--output_dir', earlier, '--final_finetune', '1'], EXIT_USER_ERROR,
                          r'--data-path is required for --data-set IMNET')


def test_empty_data_path(capsys, world, earlier, tmp_path):
    before = snapshot(earlier)
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(capsys, prune_args(world, earlier, '--data-path', empty), EXIT_USER_ERROR,
                          rf'split not found: {re.escape(str(empty / "val"))} \(expected one folder per class')
    assert snapshot(earlier) == before


def test_a_split_that_is_a_file_is_not_said_to_be_missing(capsys, world, tmp_path):
    """A val/ that is there, but as a file, was reported 'split not found': the line says what it is."""
    data = copy_data(world, tmp_path)
    shutil.rmtree(data / 'val')
    (data / 'val').write_bytes(b'not a folder')
    line = assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                                 r'^error: ')
    assert line == f'error: split {data / "val"} is not a directory (expected one folder per class inside)'


def test_missing_split(capsys, world, earlier, tmp_path, monkeypatch):
    """A missing val/ is said before train/ is listed (minutes on ImageNet): finetuning listed train/ first;
    nothing is listed now."""
    import datasets
    listed, image_folder = [], datasets.image_folder
    monkeypatch.setattr(datasets, 'image_folder', lambda split, transform: listed.append(split) or
                        image_folder(split, transform))
    data = copy_data(world, tmp_path)
    shutil.rmtree(data / 'val')
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data), EXIT_USER_ERROR,
                          rf'split not found: {re.escape(str(data / "val"))}')
    assert listed == [], listed


def test_missing_training_split_is_said_before_val_is_listed(capsys, world, earlier, tmp_path, monkeypatch):
    """Finetuning and Taylor pruning read train/ after val/: a missing train/ is said before val/ is listed; random
    masks and --eval read no training image and do not need it."""
    import datasets
    listed, image_folder = [], datasets.image_folder
    monkeypatch.setattr(datasets, 'image_folder', lambda split, transform: listed.append(split) or
                        image_folder(split, transform))
    data = copy_data(world, tmp_path)
    shutil.rmtree(data / 'train')
    before = snapshot(earlier)
    for argv in (finetune_args(world, earlier, '--data-path', data),
                 prune_args(world, earlier, '--data-path', data)):
        assert_one_line_error(capsys, argv, EXIT_USER_ERROR, rf'split not found: {re.escape(str(data / "train"))}')
    assert listed == [] and snapshot(earlier) == before
    code, _, err = cli(capsys, *prune_args(world, earlier, '--data-path', data, '--prune_mode', 'random'))
    assert code == 0, err
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0 and 'Accuracy of the network' in out, err
    assert listed == [str(data / 'val')] * 2, listed


def test_split_without_class_folders(capsys, world, earlier, tmp_path):
    data = copy_data(world, tmp_path)
    shutil.rmtree(data / 'train')
    (data / 'train').mkdir()
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data), EXIT_USER_ERROR,
                          rf'no images in {re.escape(str(data / "train"))}: Couldn\'t find any class folder')


def test_empty_class_folder(capsys, world, earlier, tmp_path):
    data = copy_data(world, tmp_path)
    (data / 'train' / 'zz').mkdir()
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data), EXIT_USER_ERROR,
                          rf'no images in {re.escape(str(data / "train"))}: Found no valid file for the classes zz')


@pytest.mark.parametrize('resume', [False, True])
def test_finetuning_on_a_single_class_is_refused(capsys, world, earlier, tmp_path, resume):
    """One class folder: a fresh model got a one-class head, whose loss is 0 from the first step, and the run
    finished and wrote its checkpoints at 100% accuracy; a resumed head would be taught the one label only."""
    data = make_image_folder(tmp_path / 'one', classes=('a',), per_class=(8, 4), size=(32, 32))
    before = snapshot(earlier)
    extra = ['--resume', world['dense']] if resume else []
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data, *extra), EXIT_USER_ERROR,
                          r'^error: the training set has 1 class: finetuning on it would teach every image the same '
                          r'label \(a classifier needs at least 2 classes\)$')
    assert snapshot(earlier) == before


def test_class_folder_of_files_the_image_folder_does_not_read(capsys, world, earlier, tmp_path):
    """A class folder holding only .gif files was said to have 'no valid file' and nothing more (the note naming
    the extensions left out comes once the folder is listed, which this error stops)."""
    from PIL import Image
    data = copy_data(world, tmp_path)
    (data / 'train' / 'zz').mkdir()
    for i in range(3):
        Image.new('RGB', (32, 32)).save(data / 'train' / 'zz' / f'{i}.gif')
    (data / 'train' / 'a' / 'notes.txt').write_text('not an image\n')
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data), EXIT_USER_ERROR,
                          rf'^error: no images in {re.escape(str(data / "train"))}: Found no valid file for the '
                          rf'classes zz\. \(3 \.gif, 1 \.txt left out: the extensions read are \.jpg \.jpeg \.png '
                          rf'\.ppm \.bmp \.pgm \.tif \.tiff \.webp\)$')


@pytest.mark.parametrize('workers', [0, 1])
def test_truncated_image_is_named_and_the_earlier_pruned_file_survives(capsys, world, earlier, tmp_path, workers):
    data = copy_data(world, tmp_path)
    bad = data / 'train' / 'b' / '3.png'
    content = bad.read_bytes()
    bad.write_bytes(content[:len(content) // 2])
    before = snapshot(earlier)
    # Scoring reads the training images: it fails before pruned_0.3.pth would be written again.
    line = assert_one_line_error(capsys, prune_args(world, earlier, '--data-path', data, '--num_workers', workers),
                                 EXIT_USER_ERROR, rf'^error: cannot read image {re.escape(str(bad))}: .*truncated')
    assert 'BadImageError' not in line  # from a worker too, only the message itself
    assert snapshot(earlier) == before


@pytest.mark.parametrize('workers', [0, 1])
def test_a_path_with_a_newline_stays_whole_on_the_error_line(capsys, world, earlier, tmp_path, workers):
    """The error line kept only the last line of a message (meant for the traceback that an error re-raised from a
    DataLoader worker carries in front of it): a path with a newline in it (a folder named 'da\\nta') was cut to
    its tail.  It is written whole, the newline (or a Unicode line separator) escaped, from a worker too."""
    data = shutil.copytree(world['data'], tmp_path / 'da\nta')
    bad = data / 'train' / 'b' / '3.png'
    bad.write_bytes(bad.read_bytes()[:100])
    before = snapshot(earlier)
    line = assert_one_line_error(capsys, prune_args(world, earlier, '--data-path', data, '--num_workers', workers),
                                 EXIT_USER_ERROR, r'^error: cannot read image ')
    assert line.startswith('error: cannot read image ' + str(bad).replace('\n', '\\n') + ': '), line
    missing = tmp_path / 'no\nwhere'
    line = assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', missing), EXIT_USER_ERROR,
                                 r'^error: --data-path ')
    assert line == 'error: --data-path ' + str(missing).replace('\n', '\\n') + ' does not exist or is not a directory'
    apart = tmp_path / 'no\u2028where'  # a line separator: a line break to str.splitlines and to many terminals
    line = assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', apart), EXIT_USER_ERROR,
                                 r'^error: --data-path ')
    escaped = str(apart).replace('\u2028', '\\u2028')
    assert line == f'error: --data-path {escaped} does not exist or is not a directory'
    assert snapshot(earlier) == before


def test_files_an_image_folder_leaves_out_are_counted_in_a_note(capsys, world, tmp_path):
    """torchvision's ImageFolder reads only some extensions: a .gif (an image Pillow reads) and a .txt beside the
    PNGs were left out without a word, and the accuracy was over fewer images than the folder holds."""
    from PIL import Image
    data = copy_data(world, tmp_path)
    Image.new('RGB', (32, 32)).save(data / 'val' / 'c' / 'extra.gif')
    (data / 'val' / 'a' / 'notes.txt').write_text('not an image\n')
    (data / 'val' / 'b' / 'more.txt').write_text('not an image\n')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0, err
    assert (f'note: 3 files in the class folders of {data / "val"} are left out: their extension is not one of '
            f'.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp (2 .txt, 1 .gif)') in out


def test_one_file_left_out_is_said_in_the_singular():
    from types import SimpleNamespace
    from torchvision.datasets.folder import IMG_EXTENSIONS
    from datasets import skipped_files_note
    extensions = ' '.join(IMG_EXTENSIONS)
    assert skipped_files_note(SimpleNamespace(root='val', skipped={'.gif': 1})) == (
        f'note: 1 file in the class folders of val is left out: its extension is not one of {extensions} (1 .gif)')
    assert skipped_files_note(SimpleNamespace(root='val', skipped={'._*': 1})) == (
        'note: 1 file in the class folders of val is left out: it is a metadata file macOS writes beside a copied '
        'file (1 ._*)')


def test_macos_metadata_files_beside_the_images_are_left_out_and_counted(capsys, world, tmp_path):
    """A folder copied from a Mac holds ._name.png beside each name.png (AppleDouble metadata, not an image):
    torchvision's ImageFolder takes them by their extension, and the run stopped at the first one it read
    ('not an image'); they are left out and counted in the note, the accuracy the same as without them."""
    data = copy_data(world, tmp_path)
    code, out, _ = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0
    clean = [line for line in out.splitlines() if line.startswith(('* Acc@1', 'Accuracy of the network'))]
    assert len(clean) == 2
    for c in ('a', 'b'):
        (data / 'val' / c / '._0.png').write_bytes(b'\x00\x05\x16\x07 Mac OS X metadata')
    (data / 'val' / 'a' / 'notes.txt').write_text('not an image\n')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0, err
    assert (f'note: 3 files in the class folders of {data / "val"} are left out: their extension is not one of '
            f'.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, or they are the metadata files macOS writes beside '
            f'copied files (2 ._*, 1 .txt)') in out
    assert [line for line in out.splitlines() if line.startswith(('* Acc@1', 'Accuracy of the network'))] == clean


def test_images_beside_the_class_folders_are_counted_in_a_note(capsys, world, tmp_path):
    """torchvision's ImageFolder reads only the files of the class folders: images lying directly in val/ beside
    them were left out without a word.  The accuracy is the same as without them (they are not read)."""
    data = copy_data(world, tmp_path)
    code, out, _ = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0
    clean = [line for line in out.splitlines() if line.startswith(('* Acc@1', 'Accuracy of the network'))]
    assert len(clean) == 2 and 'directly in' not in out
    for i, c in enumerate(('a', 'b', 'c')):
        shutil.copy(data / 'val' / c / '0.png', data / 'val' / f'loose{i}.png')
    (data / 'val' / '._loose0.png').write_bytes(b'\x00\x05\x16\x07 Mac OS X metadata')  # not an image: not counted
    (data / 'val' / 'LICENSE.txt').write_text('not an image\n')
    code, out, err = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', data)
    assert code == 0, err
    assert f'note: 3 image files directly in {data / "val"} are not in a class folder and not used\n' in out
    assert [line for line in out.splitlines() if line.startswith(('* Acc@1', 'Accuracy of the network'))] == clean


def test_a_flat_split_of_images_without_class_folders_is_refused(capsys, world, earlier, tmp_path):
    """A val/ unpacked flat (ImageNet's comes so, before it is sorted into class folders) was 'no images in'
    it: its images are counted, and the error says they must be sorted into class folders."""
    data = copy_data(world, tmp_path)
    for folder in [p for p in (data / 'val').iterdir() if p.is_dir()]:
        for image in folder.iterdir():
            image.rename(data / 'val' / f'{folder.name}_{image.name}')
        folder.rmdir()
    n = len([p for p in (data / 'val').iterdir() if p.suffix == '.png'])
    assert n > 0
    before = snapshot(earlier)
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data), EXIT_USER_ERROR,
                          rf'^error: no class folder in {re.escape(str(data / "val"))}: its {n} images lie directly '
                          rf'in it, and images must be sorted into one folder per class \(the folder\'s name is the '
                          rf'label\)$')
    assert snapshot(earlier) == before


def test_a_flat_split_of_one_image_is_said_in_the_singular(tmp_path):
    """The refusal of a split without class folders counts its images: one is 'its 1 image lies', not 'its 1 images
    lie' (as the note on images beside class folders says 1 image file)."""
    import datasets
    from PIL import Image
    val = tmp_path / 'val'
    val.mkdir()
    Image.new('RGB', (8, 8)).save(val / 'only.png')
    with pytest.raises(UserError, match=rf'^no class folder in {re.escape(str(val))}: its 1 image lies directly in '
                                        rf'it, and images must be sorted into one folder per class'):
        datasets.image_folder(str(val), None)
    Image.new('RGB', (8, 8)).save(val / 'second.png')
    with pytest.raises(UserError, match=r': its 2 images lie directly in it, '):
        datasets.image_folder(str(val), None)


def test_images_beside_empty_class_folders_are_named_in_the_refusal(tmp_path):
    """Class folders that hold no image, and the images lying beside them in the split: torchvision's 'Found no
    valid file' alone sent the user looking in the class folders; the refusal also counts the images outside them."""
    import datasets
    from PIL import Image
    val = tmp_path / 'val'
    (val / 'cat').mkdir(parents=True)
    for name in ('a.png', 'b.png'):
        Image.new('RGB', (8, 8)).save(val / name)
    with pytest.raises(UserError, match=rf'^no images in {re.escape(str(val))}: .*\(2 images lie directly in the '
                                        rf'split, not in a class folder\)$'):
        datasets.image_folder(str(val), None)


def test_an_unreadable_class_folder_listing_is_one_line(capsys, world, tmp_path, monkeypatch):
    """--eval compares the class folders of train/ with val/'s; a train/ that cannot be listed (permission denied:
    faked, as root reads everything) was a PermissionError traceback."""
    import datasets
    data = copy_data(world, tmp_path)
    real_scandir = os.scandir

    def denied(path):
        if os.path.basename(os.path.normpath(path)) == 'train':
            raise PermissionError(13, 'Permission denied', str(path))
        return real_scandir(path)

    monkeypatch.setattr(datasets.os, 'scandir', denied)
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                          rf'^error: cannot read {re.escape(str(data / "train"))}: permission denied$')


def test_an_unreadable_folder_inside_a_class_folder_is_one_line(capsys, world, tmp_path, monkeypatch):
    """ImageFolder reads the images of sub-folders of a class folder too; one that cannot be listed (permission
    denied: faked, as root reads everything) was passed over by torchvision's os.walk, its images left out without
    a word."""
    data = copy_data(world, tmp_path)
    sub = data / 'val' / 'b' / 'sub'
    sub.mkdir()
    shutil.copy(data / 'val' / 'b' / '0.png', sub / 'x.png')
    real_scandir = os.scandir

    def denied(path):
        if os.path.normpath(path) == str(sub):
            raise PermissionError(13, 'Permission denied', str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, 'scandir', denied)
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                          rf'^error: cannot read {re.escape(str(sub))}: permission denied$')


def test_eval_on_another_data_set_than_the_file_was_trained_on(capsys, world, tmp_path):
    """Labels without names (DIGITS, CIFAR, iNaturalist): the data set the file records is the one whose labels
    its head learnt; another one with as many classes ran and printed an accuracy of other classes."""
    checkpoint = torch.load(world['dense'])
    checkpoint['args'] = dict(checkpoint.get('args') or {}, data_set='CIFAR')
    path = tmp_path / 'cifar.pth'
    torch.save(checkpoint, path)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-set', 'DIGITS'], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))} records --data-set CIFAR, whose labels name other '
                          rf'classes than --data-set DIGITS: give --data-set CIFAR$')


@pytest.mark.parametrize('recorded', ['DIGITS', 'INAT'])
def test_eval_on_image_folders_of_a_file_trained_on_labels_without_names(capsys, world, tmp_path, recorded):
    """A file trained on DIGITS or iNaturalist records no class folders: evaluated on an image folder (whose
    names it cannot be compared with), the data set it records was not compared either, and --eval printed an
    accuracy of other classes."""
    checkpoint = torch.load(world['dense'])
    checkpoint['args'] = dict(checkpoint.get('args') or {}, data_set=recorded)
    path = tmp_path / 'other.pth'
    torch.save(checkpoint, path)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))} records --data-set {recorded}, whose labels name '
                          rf'other classes than --data-set IMNET: give --data-set {recorded}$')
    checkpoint['args']['data_set'] = 'IMNET'  # the same data set, no folders recorded (an earlier version): read
    torch.save(checkpoint, path)
    code, _, err = cli(capsys, '--eval', '--resume', path, '--data-path', world['data'])
    assert code == 0, err


def test_class_names_that_differ_only_in_their_unicode_form_are_told_apart(capsys, world, tmp_path):
    """A folder name with an accent written as one character in train/ and as two in val/ (a copy from macOS) was
    refused as 'only in val/: émile; only in train/: émile', the same name twice; it is now printed escaped."""
    import unicodedata
    composed, decomposed = unicodedata.normalize('NFC', 'émile'), unicodedata.normalize('NFD', 'émile')
    data = make_image_folder(tmp_path / 'data', classes=('a', composed), per_class=(2, 2), size=(32, 32))
    os.rename(os.path.join(data, 'val', composed), os.path.join(data, 'val', decomposed))
    line = assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data],
                                 EXIT_USER_ERROR, r'^error: the class folders of train/ and val/')
    assert "(only in val/: 'e\\u0301mile'; only in train/: '\\xe9mile')" in line
    checkpoint = torch.load(world['dense'])
    checkpoint['classes'] = ['a', composed]
    torch.save(checkpoint, tmp_path / 'named.pth')
    shutil.rmtree(os.path.join(data, 'train'))
    line = assert_one_line_error(capsys, ['--eval', '--resume', tmp_path / 'named.pth', '--data-path', data],
                                 EXIT_USER_ERROR, r'^error: the validation classes under ')
    assert "(label 1: '\\xe9mile' in the file, 'e\\u0301mile' here)" in line


def test_a_file_of_another_data_set_with_named_classes_is_refused_for_its_data_set():
    """A file trained on image folders (its class names recorded) evaluated on CIFAR-100 (whose classes have names
    too) was refused for its names, told to 'give the --data-path it used': the data set is what differs."""
    import argparse
    args = argparse.Namespace(resume='/x/imnet.pth', teacher_path='', data_set='CIFAR', data_path='/data/cifar',
                              inat_category='name')
    checkpoint = {'args': {'data_set': 'IMNET'}, 'classes': ['n01', 'n02']}
    cifar = argparse.Namespace(classes=['apple', 'aquarium_fish'])
    with pytest.raises(UserError) as e:
        finetune.check_recorded_classes(checkpoint, cifar, args, 'validation')
    assert str(e.value) == ('/x/imnet.pth records --data-set IMNET, whose labels name other classes than '
                            '--data-set CIFAR: give --data-set IMNET')
    checkpoint['classes'] = ['apple', 'aquarium_fish']  # the same names (CIFAR's, as image folders): the same labels
    finetune.check_recorded_classes(checkpoint, cifar, args, 'validation')
    args.data_set, checkpoint['classes'] = 'IMNET', ['apple', 'n03']  # the same data set, other folders: the names say
    with pytest.raises(UserError, match=r'\(label 1: n03 in the file, aquarium_fish here\): give the --data-path'):
        finetune.check_recorded_classes(checkpoint, cifar, args, 'validation')


def test_checkpoint_with_non_finite_weights(capsys, world, tmp_path):
    """NaN or infinite weights compute nothing: --eval printed an accuracy of 0% without a word."""
    checkpoint = torch.load(world['dense'])
    checkpoint['model']['blocks.1.mlp.fc1.weight'][3, 2] = float('nan')
    checkpoint['model']['head.bias'][0] = float('-inf')
    path = tmp_path / 'diverged.pth'
    torch.save(checkpoint, path)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))}: blocks\.1\.mlp\.fc1\.weight, head\.bias hold NaN or '
                          rf'infinite values, weights that compute nothing \(written by a run that diverged\?\)$')
    with pytest.raises(UserError, match='head.bias hold NaN'):
        models.create_model('deit_digits_patch4_32', checkpoint_path=str(path))


def test_checkpoint_of_tensors_without_values(capsys, world, tmp_path):
    """A state dict saved from a model built on the meta device holds shapes, no values: a traceback (of
    Tensor.item) before, wherever a checkpoint is read."""
    checkpoint = torch.load(world['dense'])
    checkpoint['model'] = {k: torch.empty(v.shape, device='meta') for k, v in checkpoint['model'].items()}
    path = tmp_path / 'meta.pth'
    torch.save(checkpoint, path)
    for argv in (['--eval', '--resume', path, '--data-path', world['data']],
                 ['--speed-only', '--resume', path],
                 ['--data-path', world['data'], '--output_dir', tmp_path / 'out', '--final_finetune', '1',
                  '--teacher-path', path, '--distillation-type', 'soft']):
        assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                              rf'^error: {re.escape(str(path))}: cls_token, pos_embed, .* hold no values '
                              rf'\(tensors of the meta device')
    with pytest.raises(UserError, match='hold no values'):
        models.create_model('deit_digits_patch4_32', checkpoint_path=str(path))
    assert not (tmp_path / 'out').exists()


def test_file_that_is_not_an_image(capsys, world, earlier, tmp_path):
    data = copy_data(world, tmp_path)
    bad = data / 'val' / 'c' / '1.png'
    bad.write_bytes(b'this is not a png')
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                          rf'^error: cannot read image {re.escape(str(bad))}: not an image')


def test_an_image_that_is_a_named_pipe_is_named_not_waited_on(capsys, world, tmp_path):
    """A named pipe called 9.png in a class folder: --eval opened it and waited for a writer for ever (draw_masks
    refused it already)."""
    import signal
    data = copy_data(world, tmp_path)
    pipe = data / 'val' / 'a' / '9.png'
    os.mkfifo(pipe)

    def waited(*args):
        raise TimeoutError('the pipe was opened and waited on')
    previous = signal.signal(signal.SIGALRM, waited)
    signal.alarm(20)
    try:
        assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                              rf'^error: cannot read image {re.escape(str(pipe))}: not a regular file \(a device, '
                              rf'a pipe or a socket\)$')
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_an_image_past_pillows_size_limit_is_named(capsys, world, tmp_path, monkeypatch):
    """Pillow refuses to decode an image of more than twice MAX_IMAGE_PIXELS (a decompression bomb, it says); its
    DecompressionBombError is not an OSError and was a traceback.  (The limit is lowered here, and one image made
    64x64: the 32x32 the model reads stays within the limit, as the run's own check of --input-size asks.)"""
    from PIL import Image
    data = copy_data(world, tmp_path)
    Image.new('RGB', (64, 64)).save(data / 'val' / 'a' / '0.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1500)
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data], EXIT_USER_ERROR,
                          rf'^error: cannot read image {re.escape(str(data / "val" / "a"))}/0\.png: Image size '
                          r'\(4096 pixels\) exceeds limit of 3000 pixels')


def test_default_auto_augment_never_asks_pillow_for_zero_bits():
    """DeiT's --aa rand-m9-mstd0.5-inc1 posterizes to 0 bits at full magnitude; Pillow 12+ raises on that,
    which used to stop a finetune at a random step with a traceback from a DataLoader worker."""
    import argparse
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment
    import datasets
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    args = argparse.Namespace(input_size=32, color_jitter=0.3, aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic',
                              reprob=0.25, remode='pixel', recount=1, mean=(0.5,) * 3, std=(0.5,) * 3)
    transform = datasets.build_transform(True, args)
    rand_augment = next(t for t in transform.transforms if isinstance(t, auto_augment.RandAugment))
    posterize, = [op for op in rand_augment.ops if op.name == 'PosterizeIncreasing']
    posterize.prob, posterize.magnitude_std = 1.0, 0
    posterize.magnitude = 10  # 0 bits: black
    assert np.asarray(posterize(img)).max() == 0
    posterize.magnitude = 5
    assert np.asarray(posterize(img)).max() > 0
    # only this transform's op is fixed: timm's table is untouched
    assert auto_augment.NAME_TO_OP['PosterizeIncreasing'] is auto_augment.posterize
    transform = datasets.build_transform(True, args)
    for _ in range(300):
        transform(img)


def test_more_classes_than_the_model_head(capsys, world, earlier, tmp_path):
    data = make_image_folder(tmp_path / 'data11', classes=[f'c{i:02d}' for i in range(11)], per_class=(1, 1),
                             size=(32, 32))
    assert_one_line_error(capsys, finetune_args(world, earlier, '--data-path', data, '--resume', world['dense']),
                          EXIT_USER_ERROR, r'the training set has 11 classes but the model\'s head has 10')


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def test_missing_checkpoint(capsys, world, earlier, tmp_path):
    assert_one_line_error(capsys, finetune_args(world, earlier, '--resume', tmp_path / 'nope.pth'),
                          EXIT_USER_ERROR, r'checkpoint not found: .*nope\.pth')
    # `--resume run/checkpoint.pth` alone continues a run in its folder: a mistyped path is named as such, not
    # answered with the --output_dir a new run would need
    assert_one_line_error(capsys, ['--resume', tmp_path / 'nope' / 'checkpoint.pth'], EXIT_USER_ERROR,
                          r'^error: checkpoint not found: .*nope/checkpoint\.pth$')


def test_checkpoint_that_is_a_directory(capsys, world, earlier, tmp_path):
    for argv in (finetune_args(world, earlier, '--resume', tmp_path), ['--resume', tmp_path]):
        assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                              rf'--resume {re.escape(str(tmp_path))} is a directory; give the checkpoint file')


def test_a_checkpoint_that_is_not_a_regular_file_is_not_said_to_be_missing(capsys, world, earlier, tmp_path):
    """/dev/null or a named pipe is there, but is no file: it was answered 'checkpoint not found'."""
    pipe = tmp_path / 'pipe.pth'
    os.mkfifo(pipe)
    for path in (pipe, pathlib.Path(os.devnull)):
        assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                              rf'^error: --resume {re.escape(str(path))} is not a regular file \(a device, a pipe\?\); '
                              r'give the checkpoint file$')
        assert_one_line_error(capsys, finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type',
                                                    'soft', '--teacher-path', path), EXIT_USER_ERROR,
                              rf'^error: --teacher-path {re.escape(str(path))} is not a regular file')


def test_garbage_checkpoint(capsys, world, earlier, tmp_path):
    garbage = tmp_path / 'garbage.pth'
    garbage.write_bytes(b'hello, this is not a checkpoint at all')
    before = snapshot(earlier)
    assert_one_line_error(capsys, prune_args(world, earlier, '--resume', garbage), EXIT_USER_ERROR,
                          rf'{re.escape(str(garbage))} is not a readable PyTorch checkpoint')
    assert snapshot(earlier) == before


def test_truncated_checkpoint(capsys, world, earlier, tmp_path):
    half = tmp_path / 'half.pth'
    content = open(world['dense'], 'rb').read()
    half.write_bytes(content[:len(content) // 2])
    assert_one_line_error(capsys, ['--eval', '--resume', half, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'{re.escape(str(half))} is not a readable PyTorch checkpoint \(truncated or corrupt')


def test_timm_weights_in_safetensors_are_read_as_the_bare_state_dict_they_hold(capsys, world, tmp_path):
    """The Hugging Face hub serves timm's weights as model.safetensors (a bare state dict, no pickle): --eval and
    --prune read it, by its content whatever its name, as the same weights in torch.save's format (the same
    accuracy; a pruned file holding them); a truncated one is one error line."""
    from safetensors.torch import save_file
    weights = torch.load(world['dense'], weights_only=True)['model']
    for path in (tmp_path / 'model.safetensors', tmp_path / 'renamed.pth'):
        save_file(weights, str(path))
    accuracy = []
    for path in (world['dense'], tmp_path / 'model.safetensors', tmp_path / 'renamed.pth'):
        code, out, err = cli(capsys, '--eval', '--resume', path, '--data-path', world['data'])
        assert code == 0, err
        accuracy.append([line for line in out.splitlines() if line.startswith('Accuracy of the network')])
    assert accuracy[0] and accuracy[1] == accuracy[2] == accuracy[0]
    code, _, err = cli(capsys, *prune_args(world, tmp_path / 'out', '--resume', tmp_path / 'model.safetensors',
                                           '--prune_mode', 'random'))
    assert code == 0, err
    pruned = torch.load(tmp_path / 'out' / 'pruned_random_0.3.pth', weights_only=True)['model']
    assert all(torch.equal(pruned[k], v) for k, v in weights.items())
    half = tmp_path / 'half.safetensors'
    content = (tmp_path / 'model.safetensors').read_bytes()
    half.write_bytes(content[:len(content) // 2])
    assert_one_line_error(capsys, ['--eval', '--resume', half, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(half))} is not a readable safetensors file \(')


def test_an_unreadable_checkpoint_is_said_before_the_data_is_listed(capsys, world, earlier, tmp_path, monkeypatch):
    """--eval, --prune and --speed-only of a truncated --resume, and a finetune with a truncated --teacher-path: the
    error comes before the data set is listed (minutes on ImageNet) or a model is built."""
    half = tmp_path / 'half.pth'
    content = open(world['dense'], 'rb').read()
    half.write_bytes(content[:len(content) // 2])

    def listed(*args, **kwargs):
        raise AssertionError('the data was listed first')
    monkeypatch.setattr(finetune, 'build_data', listed)
    monkeypatch.setattr(finetune, 'build_dataset', listed, raising=False)
    unreadable = rf'{re.escape(str(half))} is not a readable PyTorch checkpoint \(truncated or corrupt'
    for argv in (['--eval', '--resume', half, '--data-path', world['data']], ['--speed-only', '--resume', half],
                 prune_args(world, earlier, '--resume', half),
                 finetune_args(world, tmp_path / 'out', '--resume', world['dense'], '--distillation-type', 'soft',
                               '--teacher-path', half)):
        assert_one_line_error(capsys, argv, EXIT_USER_ERROR, unreadable)


@pytest.mark.parametrize('entries, pattern', [
    ({'a.txt': 'hello'}, r'is a zip archive but not a PyTorch checkpoint: it holds a\.txt and no data\.pkl'),
    ({'w/cls.npy': 'x', 'w/pos.npy': 'x', 'w/head.npy': 'x', 'w/norm.npy': 'x'},
     r'is a zip archive but not a PyTorch checkpoint: it holds w/cls\.npy, w/pos\.npy, w/head\.npy and 1 more and '
     r'no data\.pkl \(every file torch\.save writes has one\)$'),
    ({}, r'is an empty zip archive, not a PyTorch checkpoint$'),
])
def test_zip_archive_that_is_not_a_checkpoint(capsys, world, earlier, tmp_path, entries, pattern):
    """A zip of other files (numpy's .npz weights, an archive given by mistake): torch's complaints were about its
    C++ sources ('[enforce fail at inline_container.cc:179] ', 'Expected hasRecord("version") to be true') or
    'Unsupported operand 80' (an empty archive), none of which says what the file is."""
    import zipfile
    path = tmp_path / 'weights.npz'
    with zipfile.ZipFile(path, 'w') as archive:
        for name, text in entries.items():
            archive.writestr(name, text)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))} ' + pattern)


@pytest.mark.parametrize('kind', ['empty', 'html', 'gzip', 'tar', 'old torch tar', 'text'])
def test_a_file_in_no_format_of_torch_is_named_for_what_it_is(capsys, world, earlier, tmp_path, kind):
    """Files torch.load refuses that are not checkpoints at all: its complaint ('Unsupported operand 60',
    'KeyError 101', 'EOFError') said 'corrupt' and nothing of what the file is.  A download that saved a web page,
    a compressed or archived checkpoint, torch's format before 1.0 (a tar of pickle, storages and tensors, which
    the safe loader cannot read), an empty or a text file: each is named, in one line."""
    import gzip
    import tarfile
    path = tmp_path / 'checkpoint.pth'
    dense = open(world['dense'], 'rb').read()
    if kind == 'empty':
        path.write_bytes(b'')
        said = r'is empty \(0 bytes\), not a PyTorch checkpoint$'
    elif kind == 'html':
        path.write_text('\n  <!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n')
        said = r'is an HTML page, not a PyTorch checkpoint \(a download that saved a web page, .* of the file\?\)$'
    elif kind == 'gzip':
        path.write_bytes(gzip.compress(dense))
        said = r'is gzip-compressed, not a PyTorch checkpoint: decompress it \(gunzip\) and give the file inside$'
    elif kind in ('tar', 'old torch tar'):  # (a tar holding a checkpoint: zipfile finds the inner zip's directory)
        members = {'dense.pth': dense} if kind == 'tar' else {n: b'' for n in ('sys_info', 'pickle', 'storages',
                                                                              'tensors')}
        with tarfile.open(path, 'w') as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        said = (r'is a tar archive, not a PyTorch checkpoint: it holds dense\.pth; extract the checkpoint from it$'
                if kind == 'tar' else r'is in the tar format of torch before 1\.0, which the safe loader \(torch\.load '
                r'with weights_only=True\) does not read; if it comes from a source you trust, load it with '
                r'torch\.load\(weights_only=False\) and save it again with torch\.save$')
    else:
        path.write_text('hello, this is not a checkpoint\n')
        said = (r"is not a readable PyTorch checkpoint: it is in neither of torch\.save's formats \(a zip archive or "
                r"a pickle\) and begins b'hello, this is n'$")
    with pytest.raises(Exception):  # torch itself does not read it
        torch.load(path, weights_only=True)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))} ' + said)


def test_torchscript_archive_is_named_as_such(capsys, world, earlier, tmp_path):
    """A module saved with torch.jit.save holds code, which torch.load(weights_only=True) refuses: it was called
    'truncated or corrupt'."""
    import warnings
    path = tmp_path / 'model.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # (torch.jit.script is deprecated)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: {re.escape(str(path))} is a TorchScript archive \(torch\.jit\.save\), not a '
                          r'checkpoint of weights: load it with torch\.jit\.load and save its state_dict\(\) with '
                          r'torch\.save$')


def test_checkpoint_whose_weights_changed_after_writing(capsys, world, earlier, tmp_path):
    """Bytes of a tensor overwritten in place: the file still unpickles, so the zip's CRC-32s are what tell."""
    flipped = tmp_path / 'flipped.pth'
    content = bytearray(open(world['dense'], 'rb').read())
    weights = torch.load(world['dense'])['model']['blocks.0.attn.qkv.weight'].numpy().tobytes()
    at = content.find(weights)
    assert at > 0
    content[at + 100:at + 164] = bytes(64)
    flipped.write_bytes(bytes(content))
    torch.load(flipped)  # torch itself reads it, with the wrong weights
    assert_one_line_error(capsys, ['--eval', '--resume', flipped, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'{re.escape(str(flipped))} is corrupt: its entry \S+/data/\d+ does not match its '
                          r'checksum \(the file changed after it was written\)')


@pytest.mark.parametrize('content, pattern', [
    (torch.zeros(3), r'holds a Tensor, not a checkpoint dict'),
    ({'epoch': 3, 'note': 'no weights'}, r'checkpoint holds no model state dict'),
    ({'model': torch.zeros(3)}, r'odd\.pth: its "model" entry is a Tensor, not a state dict of named tensors$'),
])
def test_checkpoint_without_a_model(capsys, world, earlier, tmp_path, content, pattern):
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          pattern)


def test_checkpoint_of_another_model_size(capsys, world, earlier):
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--resume', world['tiny']), EXIT_USER_ERROR,
        rf'{re.escape(world["tiny"])} does not fit cc_deit_digits_patch4_32: cls_token has shape \(1, 1, 192\) in '
        r'the checkpoint but \(1, 1, 96\) in the model \(another model size\? set --model\)')


@pytest.mark.parametrize('mode', ['eval', 'prune', 'finetune', 'teacher', 'inat'])
def test_a_file_of_another_data_set_is_refused_before_the_data_is_listed(capsys, monkeypatch, world, earlier,
                                                                         tmp_path, mode):
    """A file whose args record another --data-set (or --inat-category) than the run's was refused only once the
    data set had been listed (minutes on ImageNet): its args and the command's say it without the data."""
    checkpoint = torch.load(world['dense'], weights_only=True)
    checkpoint['args'] = {'data_set': 'CIFAR'} if mode != 'inat' else {'data_set': 'INAT', 'inat_category': 'kingdom'}
    path = tmp_path / 'other.pth'
    torch.save(checkpoint, path)
    monkeypatch.setattr(finetune, 'build_data', no_work)
    argv = {'eval': ['--eval', '--resume', path, '--data-path', world['data']],
            'prune': prune_args(world, earlier, '--resume', path),
            'finetune': finetune_args(world, earlier, '--resume', path),
            'teacher': finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                                     '--teacher-path', path),
            'inat': ['--eval', '--resume', path, '--data-set', 'INAT', '--data-path', world['data']]}[mode]
    named = f'the teacher {path}' if mode == 'teacher' else str(path)
    recorded, given = ('--inat-category kingdom', '--inat-category name') if mode == 'inat' else \
        ('--data-set CIFAR', '--data-set IMNET')
    remedy = f'give a teacher trained on {given}' if mode == 'teacher' else f'give {recorded}'
    before = snapshot(earlier)
    assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                          rf'^error: {re.escape(named)} records {recorded}, whose labels name other classes '
                          rf'than {given}: {re.escape(remedy)}$')
    assert snapshot(earlier) == before


@pytest.mark.parametrize('mode', ['eval', 'finetune', 'teacher'])
def test_weights_that_do_not_fit_the_model_are_refused_before_the_data_is_listed(capsys, monkeypatch, world, earlier,
                                                                                 mode):
    """A file of another model (here a DeiT-Ti file for the digits model) given to --eval, to a finetune as
    --resume or as --teacher-path was refused only once the data sets had been listed (minutes on ImageNet), as
    the model was built after them; --prune builds it first, and so do they now."""
    monkeypatch.setattr(finetune, 'build_data', no_work)
    argv = {'eval': ['--eval', '--resume', world['tiny'], '--data-path', world['data']],
            'finetune': finetune_args(world, earlier, '--resume', world['tiny']),
            'teacher': finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                                     '--teacher-path', world['tiny'])}[mode]
    before = snapshot(earlier)
    assert_one_line_error(capsys, argv, EXIT_USER_ERROR, rf'^error: {re.escape(world["tiny"])} does not fit '
                                                         r'cc_deit_digits_patch4_32: cls_token has shape')
    assert snapshot(earlier) == before


def test_checkpoint_whose_args_name_another_model_is_refused_even_where_the_weights_fit(capsys, world, tmp_path):
    """A file this project wrote names its model; ViT-S and DeiT-S have the same shapes but not the same input
    normalisation, so --model must be the model the file holds (left out, the file's own model is not guessed)."""
    sd = torch.load(world['dense'], weights_only=True)['model']
    path = tmp_path / 'pruned_0.3.pth'
    torch.save({'model': sd, 'args': {'model': 'cc_deit_digits_patch4_32'}}, path)
    mistaken = {'model': 'vit_tiny_patch16_224', 'prune_rate': 0.3}
    torch.save({'model': sd, 'args': mistaken}, tmp_path / 'other.pth')
    for file, named in ((path, 'deit_digits_patch4_32'), (tmp_path / 'other.pth', 'vit_tiny_patch16_224')):
        argv = ['--eval', '--resume', file, '--data-path', world['data']]
        if named == 'deit_digits_patch4_32':  # DIGITS_ARGS pass --model deit_digits_patch4_32: the same model
            code, _, err = cli(capsys, *argv)
            assert code == 0, err
            continue
        assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                              rf'{re.escape(str(file))} holds {named} \(the model its args name\), not '
                              rf'deit_digits_patch4_32: set --model {named}$')


def test_unreadable_files_are_named_as_unreadable(capsys, world, earlier, tmp_path, monkeypatch):
    """Permission denied (simulated: tests may run as root, who reads everything) is said as such, for the
    checkpoint and for a class folder of the data, not reported as a corrupt file or an empty class."""
    data = copy_data(world, tmp_path)
    denied = {str(world['dense']), os.path.join(str(data), 'val', 'b')}
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: str(p) not in denied and real_access(p, mode, **kw))
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', world['data']],
                          EXIT_USER_ERROR, rf'^error: cannot read {re.escape(str(world["dense"]))}: permission denied$')
    ckpt = shutil.copy(world['dense'], tmp_path / 'readable.pth')
    assert_one_line_error(capsys, ['--eval', '--resume', ckpt, '--data-path', data], EXIT_USER_ERROR,
                          rf'^error: cannot read {re.escape(os.path.join(str(data), "val", "b"))}: permission denied$')


def test_a_data_path_that_cannot_be_searched_is_named_as_unreadable(capsys, world, tmp_path, monkeypatch):
    """A --data-path whose contents cannot be reached (no search permission: simulated, as root reads everything)
    said that its split, its CIFAR folder or its annotation file was not found; so does a CIFAR-100 folder's."""
    data = copy_data(world, tmp_path)
    cifar = tmp_path / 'cifar' / 'cifar-100-python'
    cifar.mkdir(parents=True)
    (cifar / 'test').write_bytes(b'')
    denied = {str(data), str(cifar)}
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: str(p) not in denied and real_access(p, mode, **kw))
    for name in ('isdir', 'isfile'):  # what the kernel answers for what lies inside
        real = getattr(os.path, name)
        monkeypatch.setattr(os.path, name, lambda p, real=real: os.path.dirname(str(p)) not in denied and real(p))
    for data_set in ('IMNET', 'INAT'):
        assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', data, '--data-set',
                                       data_set], EXIT_USER_ERROR,
                              rf'^error: cannot read --data-path {re.escape(str(data))}: permission denied$')
    assert_one_line_error(capsys, ['--eval', '--resume', world['dense'], '--data-path', str(tmp_path / 'cifar'),
                                   '--data-set', 'CIFAR'], EXIT_USER_ERROR,
                          rf'^error: cannot read {re.escape(str(cifar))}: permission denied$')


def _with_masks(world, tmp_path, change):
    sd = torch.load(world['dense'], weights_only=True)['model']
    for layer in range(6):
        sd[f'blocks.{layer}.attn.token_index'] = torch.ones(65, dtype=torch.bool)
    change(sd)
    path = tmp_path / 'pruned_bad.pth'
    torch.save({'model': sd, 'channels': [65] * 6}, path)
    return path


def test_mask_of_the_wrong_length(capsys, world, earlier, tmp_path):
    path = _with_masks(world, tmp_path, lambda sd: sd.__setitem__('blocks.2.attn.token_index',
                                                                  torch.ones(50, dtype=torch.bool)))
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          r'does not fit cc_deit_digits_patch4_32: blocks\.2\.attn\.token_index: mask has shape '
                          r'\(50,\), the model needs \(65,\)')


def test_mask_without_the_class_token(capsys, world, earlier, tmp_path):
    def drop_class_token(sd):
        sd['blocks.4.attn.token_index'][0] = False
    path = _with_masks(world, tmp_path, drop_class_token)
    assert_one_line_error(capsys, finetune_args(world, earlier, '--resume', path), EXIT_USER_ERROR,
                          r'blocks\.4\.attn\.token_index: the class token \(position 0\) must be kept')


class RunsCode:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


class CustomObject:
    pass


@pytest.mark.parametrize('payload, culprit', [('system', r'posix\.system'), ('class', r'test_errors\.CustomObject')])
def test_checkpoint_that_would_run_code_is_refused(capsys, world, earlier, tmp_path, payload, culprit):
    marker = tmp_path / 'code-ran'
    sd = torch.load(world['dense'], weights_only=True)['model']
    path = tmp_path / 'evil.pth'
    torch.save({'model': sd, 'args': RunsCode(marker) if payload == 'system' else CustomObject()}, path)
    before = snapshot(earlier)
    assert_one_line_error(
        capsys, prune_args(world, earlier, '--resume', path), EXIT_USER_ERROR,
        rf'^error: refusing to load {re.escape(str(path))}: it holds the object {culprit}, which could run code '
        r'when unpickled \(only tensors, plain containers and argparse\.Namespace are allowed\)$')
    assert not marker.exists()
    assert snapshot(earlier) == before


@pytest.mark.parametrize('mmap', [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_also_when_only_mapped(tmp_path, mmap):
    """Reading only a file's args (mmap=True: a continued run's first look at --resume, best.pth, a teacher) is as
    safe as reading it whole: the object is refused, and its code never runs."""
    marker = tmp_path / 'code-ran'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(2)}, 'args': RunsCode(marker)}, path)
    with pytest.raises(UserError, match=rf'^refusing to load {re.escape(str(path))}: it holds the object '
                                        r'posix\.system, which could run code'):
        utils.load_checkpoint_file(str(path), mmap=mmap)
    assert not marker.exists()


@pytest.mark.parametrize('mmap', [False, True])
def test_reading_a_released_file_leaves_torchs_allow_list_as_it_was(tmp_path, mmap):
    """argparse.Namespace is allowed for the reads of this project only: after one, torch's own allow-list still
    does not hold it, and plain torch.load(weights_only=True) still refuses a file holding a Namespace (so a file
    written with such args, which plain torch.load cannot read, is not hidden by an earlier read in the same
    process)."""
    import argparse
    import pickle
    path = tmp_path / 'released.pth'
    torch.save({'model': {'w': torch.zeros(2)}, 'args': argparse.Namespace(model='deit_tiny_patch16_224')}, path)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    assert utils.load_checkpoint_file(str(path), mmap=mmap)['args'] == argparse.Namespace(model='deit_tiny_patch16_224')
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(pickle.UnpicklingError, match='Namespace'):
        torch.load(path, weights_only=True)


def test_running_out_of_memory_while_reading_a_checkpoint_is_not_called_a_corrupt_file(tmp_path, monkeypatch):
    """A MemoryError while a checkpoint is read propagates as it is (the run says it is out of memory), instead of
    the file being called truncated or corrupt."""
    path = tmp_path / 'dense.pth'
    torch.save({'model': {'w': torch.zeros(2)}}, path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, 'load', out_of_memory)
    for mmap in (False, True):
        with pytest.raises(MemoryError):
            utils.load_checkpoint_file(str(path), mmap=mmap)


@pytest.mark.parametrize('mmap', [False, True])
def test_a_checkpoint_in_torchs_legacy_format_loads(tmp_path, mmap):
    """torch.save's format before its zip archives (files written by old releases) has no checksums to check and
    cannot be mapped: it is read whole, as it was written."""
    path = tmp_path / 'legacy.pth'
    sd = {'head.weight': torch.randn(3, 4), 'blocks.0.attn.token_index': torch.tensor([True, False, True])}
    torch.save({'model': sd, 'channels': [2]}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    loaded = utils.load_checkpoint_file(str(path), mmap=mmap)
    assert loaded['channels'] == [2] and all(torch.equal(loaded['model'][k], v) for k, v in sd.items())


def test_teacher_of_another_model_size_names_the_teacher_flag(capsys, world, earlier):
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                              '--teacher-path', world['tiny']), EXIT_USER_ERROR,
        rf'{re.escape(world["tiny"])} does not fit cc_deit_digits_patch4_32: cls_token has shape .* in the model '
        r'\(another model size\? set --teacher-model\)$')


def test_teacher_made_for_another_input_size_says_the_run_decides_it(capsys, world, earlier, tmp_path):
    """The teacher is built for the student's input: its hint was `set --input-size 48`, which made the student's
    own checkpoint refuse with `set --input-size 32`, a loop without a way out."""
    torch.manual_seed(0)
    sd = models.build_model('deit_digits_patch4_32', 10, img_size=48).state_dict()
    teacher = tmp_path / 'teacher48.pth'
    torch.save({'model': {k: v for k, v in sd.items() if not k.endswith('token_index')}}, teacher)
    before = snapshot(earlier)
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                              '--teacher-path', teacher), EXIT_USER_ERROR,
        rf'^error: {re.escape(str(teacher))} does not fit cc_deit_digits_patch4_32: pos_embed has shape '
        r'\(1, 145, 96\) in the checkpoint but \(1, 65, 96\) in the model \(a teacher made for another input size '
        r'\(48\)\? the teacher sees the images of the run, of --input-size 32\)$')
    assert snapshot(earlier) == before


def test_teacher_with_another_number_of_classes(capsys, monkeypatch, world, earlier, tmp_path):
    """Distillation compares the two heads logit by logit: a teacher with 7 classes for a 10-class student.  The
    student's head is its --resume file's, so this is said before the data sets are listed (minutes on ImageNet)."""
    sd = torch.load(world['dense'], weights_only=True)['model']
    sd['head.weight'], sd['head.bias'] = sd['head.weight'][:7], sd['head.bias'][:7]
    teacher = tmp_path / 'teacher7.pth'
    torch.save({'model': sd}, teacher)
    monkeypatch.setattr(finetune, 'build_data', no_work)
    before = snapshot(earlier)
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                              '--teacher-path', teacher), EXIT_USER_ERROR,
        rf'^error: the teacher {re.escape(str(teacher))} has 7 classes, the student 10$')
    assert snapshot(earlier) == before


@pytest.mark.parametrize('recorded', ['classes', 'data_set'])
def test_teacher_trained_on_other_classes(capsys, world, earlier, tmp_path, recorded):
    """As many logits, other classes: the student was distilled towards another class's logit at every label
    where the teacher's classes differ (folders of other names, or another data set's unnamed labels)."""
    checkpoint = torch.load(world['dense'], weights_only=True)
    if recorded == 'classes':
        checkpoint['classes'] = ['a', 'b', 'x', 'y']
        data = ['--data-path', world['data']]
        pattern = (rf'^error: the training classes under {re.escape(str(world["data"]))} are not those the teacher '
                   rf'{re.escape(str(tmp_path / "teacher.pth"))} records \(label 2: x in the file, c here\): '
                   r'give a teacher trained on these classes$')
    else:
        checkpoint['args'] = {'data_set': 'CIFAR'}
        data = ['--data-set', 'DIGITS']
        pattern = (rf'^error: the teacher {re.escape(str(tmp_path / "teacher.pth"))} records --data-set '
                   r'CIFAR, whose labels name other classes than --data-set DIGITS: give a teacher trained on '
                   r'--data-set DIGITS$')
    torch.save(checkpoint, tmp_path / 'teacher.pth')
    before = snapshot(earlier)
    assert_one_line_error(capsys, [*data, '--output_dir', earlier, '--final_finetune', '1', '--resume', world['dense'],
                                   '--distillation-type', 'soft', '--teacher-path', tmp_path / 'teacher.pth'],
                          EXIT_USER_ERROR, pattern)
    assert snapshot(earlier) == before


def test_missing_teacher(capsys, world, earlier, tmp_path):
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--distillation-type', 'hard', '--teacher-path', tmp_path / 't.pth'),
        EXIT_USER_ERROR, r'teacher checkpoint not found: .*t\.pth')
    assert_one_line_error(  # a path that exists, but as a directory, is not "not found"
        capsys, finetune_args(world, earlier, '--distillation-type', 'hard', '--teacher-path', tmp_path),
        EXIT_USER_ERROR, rf'^error: --teacher-path {re.escape(str(tmp_path))} is a directory; give the checkpoint '
                         r'file of the teacher$')


def test_an_empty_teacher_model_is_refused_not_taken_for_the_students(capsys, world, earlier):
    """--teacher-model '' (a script's "$TEACHER" unset) was taken as no --teacher-model: the teacher was built with
    --model's architecture, and a file that fits it was distilled from without a word."""
    before = snapshot(earlier)
    assert_one_line_error(
        capsys, finetune_args(world, earlier, '--resume', world['dense'], '--distillation-type', 'soft',
                              '--teacher-path', world['dense'], '--teacher-model', ''),
        EXIT_USER_ERROR, r"^error: --teacher-model is empty: give the teacher's model \(without the flag the teacher "
                         r"has --model's architecture\)$")
    assert snapshot(earlier) == before


# ----------------------------------------------------------------------------------------------------------
# flags

@pytest.mark.parametrize('rate', ['0', '1', '1.0', '-0.1', '1.5'])
def test_prune_rate_outside_0_1(capsys, world, earlier, rate):
    before = snapshot(earlier)
    assert_one_line_error(capsys, prune_args(world, earlier) + ['--prune_rate', rate], EXIT_USER_ERROR,
                          rf'--prune_rate must be in \(0, 1\), got {float(rate)}$')
    assert snapshot(earlier) == before


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_without_teacher_path(capsys, world, earlier, kind):
    assert_one_line_error(capsys, finetune_args(world, earlier, '--distillation-type', kind), EXIT_USER_ERROR,
                          rf'--distillation-type {kind} needs --teacher-path \(the dense teacher\)')


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_weighted_by_0_is_refused(capsys, world, earlier, kind):
    """loss = base + alpha * KD: at --distillation-alpha 0 the teacher ran every step for a term weighted by 0,
    without a word (the teacher given, and dropped)."""
    before = snapshot(earlier)
    assert_one_line_error(capsys, finetune_args(world, earlier, '--distillation-type', kind, '--teacher-path',
                                                world['dense'], '--distillation-alpha', '0'), EXIT_USER_ERROR,
                          rf'^error: --distillation-alpha 0 weighs the {kind} distillation term by 0, so the teacher '
                          rf'would run every step and change nothing: give a positive --distillation-alpha, or '
                          rf'--distillation-type none without a teacher$')
    assert snapshot(earlier) == before


@pytest.mark.parametrize('tau', ['1e-300', '1e-4', '2000', '1e100'])
def test_a_temperature_that_loses_the_soft_term_is_refused(capsys, world, earlier, tau):
    """Below 1e-3, tau^2 * KL scales the soft term to all but nothing (1e-300: NaN as the logits are divided by
    it, the run stopped as diverged); above 1e3, float32 rounding decides it (test_losses_data shows both)."""
    before = snapshot(earlier)
    assert_one_line_error(capsys, finetune_args(world, earlier, '--distillation-type', 'soft', '--teacher-path',
                                                world['dense'], '--distillation-tau', tau), EXIT_USER_ERROR,
                          rf'^error: --distillation-tau must be in \[0\.001, 1000\], got {re.escape(str(float(tau)))}$')
    assert snapshot(earlier) == before


def test_output_dir_that_cannot_be_written(capsys, world, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a directory')
    target = blocker / 'out'
    assert_one_line_error(capsys, finetune_args(world, target), EXIT_USER_ERROR,
                          rf'cannot write to --output_dir {re.escape(str(target))}: Not a directory')
    assert blocker.read_text() == 'not a directory'


@pytest.mark.parametrize('mode', ['finetune', 'prune'])
@pytest.mark.parametrize('inside', ['train/out', 'val', 'val/a/deeper'])
def test_an_output_dir_inside_a_split_of_the_data_is_refused(capsys, world, tmp_path, mode, inside):
    """Folders written inside train/ or val/ would become classes of the split (an empty one breaks the next run);
    nothing is created. A folder beside the splits is allowed (the runs only read train/ and val/)."""
    data = tmp_path / 'data'
    shutil.copytree(world['data'], data)
    before = snapshot(data)
    out = data / inside
    argv = (finetune_args if mode == 'finetune' else prune_args)(dict(world, data=data), out)
    split = inside.split('/')[0]
    assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                          rf'^error: --output_dir {re.escape(str(out))} lies inside the {split} split of --data-path '
                          rf'\({re.escape(str(data / split))}\)')
    assert snapshot(data) == before
    assert sorted(p.name for p in (data / split).iterdir()) == ['a', 'b', 'c', 'd']
    if mode == 'prune':  # beside the splits: a run as usual
        code, _, err = cli(capsys, *prune_args(dict(world, data=data), data / 'runs'))
        assert code == 0, err


@pytest.mark.parametrize('argv, pattern', [
    (['--eval'], r'--eval needs --resume CHECKPOINT'),
    (['--prune'], r'--prune needs --resume CHECKPOINT'),
    (['--eval', '--prune', '--resume', 'x.pth'], r'choose one of --eval, --speed-only and --prune'),
    (['--final_finetune', '1'], r'--output_dir is required'),
    (['--batch-size', '0'], r'--batch-size must be in \[1, 2147483647\], got 0'),
    (['--final_finetune', '0'], r'--final_finetune must be at least 1, got 0'),
    (['--lr', '0'], r'--lr must be positive, got 0\.0'),
    (['--lr=-1e-3'], r'--lr must be positive, got -0\.001'),
    # a negative number in scientific notation, or -inf, is the flag's value (argparse took it for a flag)
    (['--lr', '-1e-3'], r'^error: --lr must be positive, got -0\.001$'),
    (['--weight-decay', '-5E-2'], r'^error: --weight-decay must be 0 or more, got -0\.05$'),
    (['--lr', '-inf'], r'^error: --lr must be finite and positive, got -inf$'),
    (['--opt-betas', '0.9', '-1e-3'], r'^error: --opt-betas must be in \[0, 1\), got -0\.001$'),
    (['--smoothing', '1'], r'--smoothing must be in \[0, 1\), got 1\.0'),
    (['--model', 'deit_huge_patch14_224'], r'--model: unknown model deit_huge_patch14_224: not in timm\'s registry '
                                           r'\(similar: deit3_huge_patch14_224'),
    (['--teacher-model', 'resnet50'], r'--teacher-model: Clip & Concat does not apply to resnet50: it is a ResNet, not '
                                      r'a timm VisionTransformer'),
    (['--device', 'cuda'], r'--device cuda: CUDA is not available on this machine \(use --device cpu\)'),
    (['--device', 'tpu'], r'--device tpu is not a device torch knows'),
    (['--opt', 'nosuchopt'], r'cannot create the optimizer \(--opt nosuchopt\): Optimizer nosuchopt not found'),
    (['--sched', 'nosuchsched'], r'cannot create the learning-rate schedule \(--sched nosuchsched\)'),
    (['--aa', 'bogus'], r'--aa bogus: timm cannot read this augmentation policy \(Unknown AA policy bogus\)'),
    (['--aa', 'rand-m9-zz'], r"--aa rand-m9-zz: section 'zz' has no value"),
    # (AutoAugment's policies too: timm skipped the section, and the run went on without the magnitude noise asked)
    (['--aa', 'original-mstd'], r"^error: --aa original-mstd: section 'mstd' has no value"),
    (['--aa', '3a-mstd'], r"^error: --aa 3a-mstd: section 'mstd' has no value"),
    (['--aa', 'rand-q5'], r'--aa rand-q5: timm cannot read this augmentation policy'),
    # timm takes AugMix's alpha 0, which numpy's Dirichlet refused at the first training image (a traceback)
    (['--aa', 'augmix-m3-a0'], r"^error: --aa augmix-m3-a0: AugMix's alpha \(section a\) must be positive, got 0$"),
    (['--aa', 'randm9'], r"--aa randm9: timm cannot read this augmentation policy \(a policy is rand-<sections>, "
                         r"augmix-<sections>, or AutoAugment's original, originalr, v0, v0r or 3a\)"),
    # (auto-augment interpolates: at the digits model's 32 px, without it the interpolation is not read)
    (['--aa', 'rand-m9-mstd0.5-inc1', '--train-interpolation', 'bogus'],
     r'--train-interpolation bogus: not an interpolation timm knows'),
    # Pillow rotates, shears and translates only with nearest, bilinear or bicubic: a traceback at the first such op
    (['--aa', 'rand-m9-mstd0.5-inc1', '--train-interpolation', 'lanczos'],
     r'^error: --train-interpolation lanczos: --aa rand-m9-mstd0\.5-inc1 rotates, shears and translates images'),
    (['--aa', 'original', '--train-interpolation', 'box'], r'^error: --train-interpolation box: --aa original rotates'),
    (['--reprob', '0.5', '--remode', 'bogus'], r'--remode bogus: random erasing fills with pixel, rand or const'),
    (['--input-size', '30'], r'--input-size 30 is not a whole number of 4x4 patches of cc_deit_digits_patch4_32'),
    (['--input-size', '2'], r'--input-size 2 is not a whole number of 4x4 patches'),
    (['--start_epoch', '1'], r'--start_epoch 1 is not before --final_finetune 1: no epoch would run'),
    # an empty --resume (a script's "$CKPT" unset) trained a dense model from random initialisation for every epoch
    (['--resume', ''], r'^error: --resume is empty: give the checkpoint file \(without the flag the run trains a '
                       r'dense model from random initialisation\)$'),
    (['--speed-only', '--resume='], r'^error: --resume is empty: give the checkpoint file \(without the flag the run '
                                    r'measures the dense model with random weights\)$'),
    # a flag the run would ignore: a teacher without distillation is not silently dropped
    (['--teacher-path', 'teacher.pth'], r'--teacher-path teacher\.pth given, but --distillation-type is none, so no '
                                        r'teacher would be used: add --distillation-type soft \(or hard\)'),
    (['--teacher-model', 'deit_tiny_patch16_224', '--distillation-tau', '20'],
     r'--teacher-model deit_tiny_patch16_224, --distillation-tau 20\.0 given, but --distillation-type is none'),
    (['--prune_rate', '0.3'], r'--prune_rate 0\.3: this applies to --prune only'),
    (['--prune-batches', '2'], r'^error: --prune-batches 2: this applies to --prune only$'),
    # the weight of a distillation term that is not computed: dropped without a word, as a teacher would be
    (['--distillation-alpha', '0.7'], r'^error: --distillation-alpha 0\.7 given, but --distillation-type is none'),
    # timm's multistep schedule counts a repeated epoch twice (two decays at once)
    (['--decay-milestones', '2', '2'], r'^error: --decay-milestones 2 2: the epochs must increase$'),
    # every spelling of a negative number float() reads is the flag's value (argparse said "expected one argument")
    (['--lr', '-.5'], r'^error: --lr must be positive, got -0\.5$'),
    (['--lr', '-NaN'], r'^error: --lr must be finite and positive, got nan$'),
    (['--lr', '-1e+3'], r'^error: --lr must be positive, got -1000\.0$'),
    # a list flag of the wrong length: a third --lr-noise value was dropped by timm, one --cutmix-minmax a traceback
    (['--lr-noise', '0.1', '0.5', '0.9'], r'^error: --lr-noise takes 1 or 2 values, got 3$'),
    (['--cutmix-minmax', '0.5'], r'^error: --cutmix-minmax takes 2 values, got 1$'),
    (['--mixup', '0.8', '--batch-size', '7'], r'--batch-size 7: mixup and cutmix mix each image with another of its '
                                              r'batch, so the batch must be even'),
    # cutmix alone mixes too (a run that took it for no mixing also built no Mixup: cutmix silently off)
    (['--mixup', '0', '--cutmix', '1', '--batch-size', '7'], r'^error: --batch-size 7: mixup and cutmix mix each '),
    (['--speed-only', '--distillation-type', 'soft', '--teacher-path', 't.pth'],
     r'--teacher-path t\.pth, --distillation-type soft: only finetuning uses these, and --speed-only trains nothing'),
    (['--speed-only', '--model-ema'], r'--model-ema: only finetuning uses this, and --speed-only trains nothing'),
    (['--data-set', 'DIGITS'], r"--data-set DIGITS is scikit-learn's digits, read from the package: --data-path "
                               r'does not apply'),
    # timm's plateau schedule needs a metric the epoch loop does not pass: it would sit at --warmup-lr
    (['--sched', 'plateau'], r'--sched plateau lowers the rate when a metric stops improving, .* would then hold '
                             r'--warmup-lr from the second epoch on'),
    (['--mixup', '0.8', '--cutmix-minmax', '0.8', '0.2'], r'--cutmix-minmax 0\.8 0\.2: .* the first must be below '
                                                          r'the second'),
    (['--cutmix-minmax', '0.5', '0.5'], r'--cutmix-minmax 0\.5 0\.5: '),
    # a range holding no whole box side at the input's size: numpy refused timm's draw at the first CutMix batch
    (['--cutmix-minmax', '0.3', '0.31'], r'--cutmix-minmax 0\.3 0\.31: at 32x32 px images CutMix draws its box side '
                                         r'from 9 px up to, not including, 9 px: no side to draw \(the second value '
                                         r'must be at least 10/32, or the first lower\)$'),
    (['--input-size', '224', '--cutmix-minmax', '0.5', '0.502'], r'--cutmix-minmax 0\.5 0\.502: at 224x224 px images '
                                                                 r'.* from 112 px up to, not including, 112 px: '),
    (['--cutmix', '0', '--cutmix-minmax', '0.2', '0.8'], r'--cutmix 0 with --cutmix-minmax: a box ratio range turns '
                                                         r'CutMix on'),
    # the evaluation resizes to input / ratio before its crop: a tiny ratio overflowed Pillow or took all memory
    (['--input-size', '64', '--eval-crop-ratio', '1e-9'], r'--eval-crop-ratio 1e-09 resizes each image to \d+ px on '
                                                         r'its shorter side .* Pillow\'s limit for one image \(give '
                                                         r'a ratio of at least 0\.007\)$'),
    (['--input-size', '64', '--eval-crop-ratio', '1e-300'],
     r'--eval-crop-ratio 1e-300 resizes each image to 6\.4e\+301 px on its shorter side .* at least 0\.007\)$'),
    # images of more pixels than Pillow makes of one: the model of that size took the memory before any image was read
    (['--input-size', '100000'], r'--input-size 100000: each image would be 100000x100000 px, more than the \d+ pixels '
                                 r'of Pillow\'s limit for one image \(give at most 9459\)$'),
    # (every data set of image files: not ImageNet's folders alone)
    (['--data-set', 'CIFAR', '--input-size', '100000'], r'^error: --input-size 100000: each image would be '),
    (['--data-set', 'INAT', '--input-size', '100000'], r'^error: --input-size 100000: each image would be '),
    # past 2**31 - 1 the loaders' and torch's 64-bit counts overflowed (tracebacks)
    (['--batch-size', '10000000000000000000'], r'--batch-size must be in \[1, 2147483647\], got 10000000000000000000'),
    (['--input-size', '4000000000000000000'], r'--input-size must be in \[1, 2147483647\], got 4000000000000000000'),
    (['--device', 'meta'], r'--device meta: this tool runs on cuda or cpu, not meta$'),
    (['--device', 'mps'], r'--device mps: this tool runs on cuda or cpu, not mps$'),
    (['--device', 'cpu:1'], r'--device cpu:1: torch has one CPU device \(use --device cpu\)$'),
    (['--model', 'cc_cc_deit_digits_patch4_32'], r'--model: unknown model cc_cc_deit_digits_patch4_32: the cc_ prefix '
                                                 r'\(optional\) is given more than once'),
    # (it said "unknown model : not in timm's registry", naming no model)
    (['--model', ''], r"^error: --model: empty model name$"),
    (['--model', 'cc_'], r"^error: --model: empty model name \('cc_'\)$"),
    (['--teacher-model', ' '], r"^error: --teacher-model: empty model name \(' '\)$"),
])
def test_bad_flags(capsys, world, earlier, argv, pattern):
    before = snapshot(earlier)
    mode = {'--eval', '--prune', '--speed-only'} & set(argv)  # (--final_finetune is refused with these)
    args = ['--data-path', world['data'], '--output_dir', earlier, *([] if mode else ['--final_finetune', '1']),
            *argv]
    if argv[:1] == ['--final_finetune'] and argv[1] == '1':  # the case without --output_dir
        args = ['--data-path', world['data'], *argv]
    assert_one_line_error(capsys, args, EXIT_USER_ERROR, pattern)
    assert snapshot(earlier) == before


@pytest.mark.parametrize('argv, pattern', [
    (['--opt', 'nosuchopt'], r'cannot create the optimizer \(--opt nosuchopt\): Optimizer nosuchopt not found'),
    (['--sched', 'nosuchsched'], r"cannot create the learning-rate schedule \(--sched nosuchsched\): Unknown "
                                 r"scheduler 'nosuchsched'"),
    (['--sched', 'none'], r'--sched none: finetuning needs a learning-rate schedule'),
    (['--sched', 'wsd'], r'cannot create the learning-rate schedule \(--sched wsd\): wsd schedule requires'),
    # timm's own advice ("set stable_timescale explicitly") names a setting no flag here gives
    (['--sched', 'rsqrt', '--warmup-epochs', '0', '--decay-epochs', '1'],
     r"cannot create the learning-rate schedule \(--sched rsqrt\): timm's rsqrt schedule takes its time scale from "
     r"the warmup, and --warmup-epochs is 0: give --warmup-epochs of at least 1$"),
    # timm's Adan takes three betas and indexed the third of the two --opt-betas gives: a traceback
    (['--opt', 'adan', '--opt-betas', '0.9', '0.99'],
     r"^error: --opt-betas 0\.9 0\.99: timm's adan optimizer takes 3 betas \(its defaults: 0\.98 0\.92 0\.99\), the "
     r'flag gives 2: leave it out to use its defaults$'),
    (['--opt', 'lookahead_adan', '--opt-betas', '0.9', '0.9'],
     r"^error: --opt-betas 0\.9 0\.9: timm's lookahead_adan optimizer takes 3 betas"),
    # timm's AdaHessian differentiates the gradients again in its step: the run stopped in a traceback (the graph
    # not kept; no second derivative of fused attention), and resumed without its random probe vectors
    (['--opt', 'adahessian'], r'--opt adahessian is a second-order optimizer \(its step differentiates the gradients '
                              r'again\), which this finetuning does not run: choose a first-order one'),
])
def test_optimizer_and_schedule_are_refused_before_the_data_is_read(capsys, monkeypatch, world, earlier, argv,
                                                                    pattern):
    """timm refuses these names when the optimizer is built, which came after the data sets were listed (minutes
    on ImageNet) and the model and teacher were built: they are refused with the other flags now."""
    def no_work(*args, **kwargs):
        raise AssertionError('the data was read before the flags were checked')

    monkeypatch.setattr(finetune, 'build_data', no_work)
    assert_one_line_error(capsys, ['--data-path', world['data'], '--output_dir', earlier, '--final_finetune', '1',
                                   *argv], EXIT_USER_ERROR, pattern)


@pytest.mark.parametrize('opt', ['kron', 'lookahead_kron'])
def test_kron_without_opt_einsum_is_refused_before_any_work(monkeypatch, opt):
    """timm's Kron contracts its preconditioners with einsum, which without opt_einsum builds each weight matrix's
    full outer product (measured: a 3 GB allocation for the digits model's qkv at the first step, out of memory);
    it is refused at the start, naming the package, and taken when the package is there."""
    import importlib.util
    parse = finetune.get_args_parser().parse_args
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'opt_einsum' else real(name, *a))
    with pytest.raises(UserError, match=rf"^--opt {opt}: timm's Kron optimizer needs the opt_einsum package \(pip "
                                        r"install opt_einsum\), which is not installed"):
        finetune.check_optimizer_and_schedule(parse(['--opt', opt]))
    finetune.check_optimizer_and_schedule(parse(['--opt', 'adamw']))
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object() if name == 'opt_einsum'
                        else real(name, *a))
    finetune.check_optimizer_and_schedule(parse(['--opt', opt]))


@pytest.mark.parametrize('variables, pattern', [
    (dict(WORLD_SIZE='abc'), r"WORLD_SIZE='abc' in the environment is not a whole number \(the launcher sets it: "
                             r"torchrun, or torch.distributed.launch --use_env\)"),
    (dict(LOCAL_RANK='x'), r"LOCAL_RANK='x' in the environment is not a whole number \(the launcher sets it: .*\)"),
    (dict(WORLD_SIZE='0'), r'WORLD_SIZE=0 in the environment: a job has at least one process \(.*\)'),
    (dict(RANK=None), r'WORLD_SIZE is 2 but RANK is not set in the environment \(the launcher sets it: torchrun, or '
                      r'torch.distributed.launch --use_env; unset WORLD_SIZE to run one process\)'),
    (dict(RANK='5'), r'RANK=5 in the environment is not one of the WORLD_SIZE=2 processes \(0 to 1; .*\)'),
    (dict(LOCAL_RANK='-1'), r'LOCAL_RANK=-1 in the environment is not one of the WORLD_SIZE=2 processes .*'),
    (dict(MASTER_ADDR=None), r'MASTER_ADDR is not set in the environment: the 2 processes meet at '
                             r'MASTER_ADDR:MASTER_PORT \(the launcher sets both: .*\)'),
    (dict(MASTER_PORT=' '), r'MASTER_PORT is not set in the environment: .*'),
    (dict(MASTER_PORT='99999'), r'MASTER_PORT=99999 in the environment is not a TCP port \(1 to 65535\)'),
    (dict(MASTER_PORT='0'), r'MASTER_PORT=0 in the environment is not a TCP port \(1 to 65535\)'),
])
def test_a_launcher_environment_the_job_cannot_run_with_is_refused_before_any_work(capsys, monkeypatch, world,
                                                                                   earlier, variables, pattern):
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, as a launcher sets them: one error line naming
    the variable, before any work (they were a ValueError traceback, a rendezvous traceback, or, for a RANK past
    WORLD_SIZE, half an hour's wait for peers that never come)."""
    launched(monkeypatch, **variables)

    def rendezvous(*args, **kwargs):  # a bad environment let through would wait there for peers that never come
        raise AssertionError('the process group was joined')
    monkeypatch.setattr(torch.distributed, 'init_process_group', rendezvous)
    before = snapshot(earlier)
    code, out, err = cli(capsys, '--device', 'cpu', *finetune_args(world, earlier))
    assert code == EXIT_USER_ERROR and err.count('\n') == 1, err
    rank = os.environ.get('RANK')
    assert re.fullmatch((f'\\[rank {rank}\\] ' if rank else '') + 'error: ' + pattern, err.strip()), err
    assert snapshot(earlier) == before


def test_speed_only_under_a_launcher_is_refused(capsys, monkeypatch, world):
    """Every process would time at once, sharing the machine, and rank 0's figures be printed as one process's."""
    launched(monkeypatch, RANK='1')
    code, out, err = cli(capsys, '--speed-only', '--resume', world['dense'], '--speed-repeats', 1)
    assert code == EXIT_USER_ERROR and err == ('[rank 1] error: --speed-only times one process: run it without the '
                                               'launcher (WORLD_SIZE is 2)\n'), err


def test_a_mistyped_flag_under_a_launcher_names_the_process_as_the_later_errors_do(capsys, monkeypatch):
    """Every process parses the same flags: each said "error: ..." alike, where every error found later says
    "[rank N] error: ..."; the parser's line now names its process too.  One process: no prefix."""
    launched(monkeypatch, RANK='1')
    with pytest.raises(SystemExit) as stop:
        finetune.main(['--final-finetune', '3'])
    assert stop.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == '[rank 1] error: unrecognized arguments: --final-finetune 3 (see --help)\n', err
    monkeypatch.setenv('WORLD_SIZE', '1')
    with pytest.raises(SystemExit):
        finetune.main(['--batch-size'])
    assert capsys.readouterr().err == 'error: argument --batch-size: expected one argument (see --help)\n'


def test_one_process_ignores_the_launcher_variables_that_do_not_ask_for_several(monkeypatch):
    """WORLD_SIZE unset, empty or 1 is one process, whatever else is set (a RANK left from another job)."""
    for world_size in (None, '', '1'):
        launched(monkeypatch, WORLD_SIZE=world_size, RANK='3', MASTER_ADDR=None)
        assert utils.launcher_ranks() == (0, 1, 0) and not utils.several_processes()
    launched(monkeypatch, RANK='1', LOCAL_RANK=None)
    assert utils.launcher_ranks() == (1, 2, 0)


@pytest.mark.parametrize('device, count, launcher, pattern', [
    ('cuda:2', 2, False, r'--device cuda:2: this machine has 2 CUDA devices \(cuda:0 to cuda:1\)$'),
    ('cuda:1', 1, False, r'--device cuda:1: this machine has 1 CUDA device \(cuda:0\)$'),
    ('cuda:0', 2, True, r'--device cuda:0: under a launcher each process takes the GPU of its LOCAL_RANK '
                        r'\(use --device cuda\)$'),
    ('cuda', 2, True, r'LOCAL_RANK 2: this machine has 2 CUDA devices, so at most 2 processes per node can use one '
                      r'each \(--nproc_per_node\)$'),
])
def test_a_gpu_the_run_cannot_use_is_refused_before_any_work(capsys, monkeypatch, world, earlier, device, count,
                                                            launcher, pattern):
    """An index past the machine's GPUs, any index under a launcher (which gives each process the GPU of its
    LOCAL_RANK), or a LOCAL_RANK past the machine's GPUs (--device cuda, or no --device), is one error line before
    the output directory is touched; CUDA is simulated (this machine may have none)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
    if launcher:  # the third process of a node (LOCAL_RANK 2)
        launched(monkeypatch, RANK='2', WORLD_SIZE='3', LOCAL_RANK='2')
    before = snapshot(earlier)
    code, out, err = cli(capsys, '--device', device, *finetune_args(world, earlier))
    assert code == EXIT_USER_ERROR and err.count('\n') == 1, err
    assert re.fullmatch(('\\[rank 2\\] ' if launcher else '') + 'error: ' + pattern, err.strip()), err
    assert snapshot(earlier) == before


def test_the_default_device_under_a_launcher_is_the_gpu_of_local_rank_which_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    launched(monkeypatch, RANK='1', WORLD_SIZE='2', LOCAL_RANK='1')
    with pytest.raises(UserError, match=r'^LOCAL_RANK 1: this machine has 1 CUDA device, so at most 1 process per '
                                        r'node can use one each \(--nproc_per_node\)$'):
        finetune.resolve_device(None)
    monkeypatch.setenv('LOCAL_RANK', '0')
    assert finetune.resolve_device(None) == 'cuda'


@pytest.mark.parametrize('argv, pattern', [
    (['--eval', '--final_finetune', '3', '--teacher-path', 'T'],
     r'--teacher-path T, --final_finetune 3: only finetuning uses these, and --eval trains nothing'),
    (['--prune', '--prune_mode', 'random', '--prune-batches', '2'],
     r'--prune-batches caps the batches Taylor scoring reads; --prune_mode random scores nothing'),
    # (each EMA flag on its own: not only noted as --model-ema's, which these runs have no use for either)
    (['--eval', '--model-ema-decay', '0.9'],
     r'^error: --model-ema-decay 0\.9: only finetuning uses this, and --eval trains nothing$'),
    (['--prune', '--model-ema-force-cpu'],
     r'^error: --model-ema-force-cpu: only finetuning uses this, and --prune trains nothing$'),
])
def test_flags_the_mode_would_ignore_are_refused(capsys, world, earlier, argv, pattern):
    before = snapshot(earlier)
    assert_one_line_error(capsys, ['--resume', world['dense'], '--data-path', world['data'], '--output_dir', earlier,
                                   *argv], EXIT_USER_ERROR, pattern)
    assert snapshot(earlier) == before


@pytest.mark.parametrize('mode', ['--eval', '--speed-only'])
def test_finetuning_flags_that_ask_for_nothing_are_noted_not_refused(capsys, world, mode):
    """--distillation-type none and --no-model-ema ask for no teacher and no EMA: a set of flags shared between a
    finetuning command and --eval may pass them (noted as having no effect); asking for either is still refused."""
    base = ['--resume', world['dense'], mode] + (['--data-path', world['data']] if mode == '--eval' else
                                                 ['--speed-repeats', '1', '--speed-warmup', '0'])
    code, out, err = cli(capsys, *base, '--distillation-type', 'none', '--no-model-ema')
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith('note: --distillation-type none, --no-model-ema')
            and line.endswith(f'have no effect: {mode} trains nothing')]  # (with the training flags cli() passes)
    for asked, spelled in ((['--distillation-type', 'soft'], '--distillation-type soft'),
                           (['--model-ema'], '--model-ema')):
        assert_one_line_error(capsys, [*base, *asked], EXIT_USER_ERROR,
                              rf'^error: {spelled}: only finetuning uses this, and {mode} trains nothing$')


@pytest.mark.parametrize('argv, size', [
    (['--model', 'deit_tiny_patch16_224', '--final_finetune', '1', '--output_dir', '{out}'], 224),  # the default model
    (['--input-size', '64', '--eval', '--resume', '{dense}'], 64),
    (['--model', 'deit_tiny_patch16_224', '--prune', '--resume', '{tiny}', '--output_dir', '{out}'], 224),
])
def test_digits_at_another_image_size_is_refused_before_any_work(capsys, world, earlier, argv, size):
    """scikit-learn's digits are 32x32 images: a model reading another size would fail at its first batch."""
    before = snapshot(earlier)
    argv = [a.format(out=earlier, dense=world['dense'], tiny=world['tiny']) for a in argv]
    line = assert_one_line_error(capsys, ['--data-set', 'DIGITS', *argv], EXIT_USER_ERROR,
                                 r'--data-set DIGITS has 32x32 images and \S+ reads ')
    assert f'reads {size}x{size} (give --input-size 32' in line
    # the digits model itself at another --input-size: the remedy is its own size, not the model already given
    digits_model = 'deit_digits_patch4_32' in line.split(' reads ')[0]
    assert line.endswith("32, the model's own, or leave it out)" if digits_model
                         else 'or a model made for them: deit_digits_patch4_32)'), line
    assert snapshot(earlier) == before
    # timing reads no data: any model may be timed with --data-set DIGITS named
    args = finetune.get_args_parser().parse_args([*DIGITS_ARGS, '--data-set', 'DIGITS', '--speed-only', '--model',
                                                  'deit_tiny_patch16_224'])
    finetune.validate_args(args)


def test_a_teacher_whose_patches_do_not_divide_the_input_size_is_refused(capsys, world, earlier, tmp_path):
    """The teacher reads the student's images: at --input-size 40 a 16x16-patch teacher (its file made at 40 px)
    dropped the last 8 pixels of each side without a word, and the run finished (the student's own patch size is
    checked)."""
    files = {}
    for name in ('deit_digits_patch4_32', 'vit_tiny_patch16_224'):
        torch.manual_seed(0)
        state = models.build_model('cc_' + name, 4, img_size=40).state_dict()
        files[name] = tmp_path / f'{name}.pth'
        torch.save({'model': {k: v for k, v in state.items() if not k.endswith('token_index')}}, files[name])
    before = snapshot(earlier)
    assert_one_line_error(capsys, finetune_args(world, earlier, '--resume', files['deit_digits_patch4_32'],
                                                '--input-size', 40, '--distillation-type', 'soft', '--teacher-path',
                                                files['vit_tiny_patch16_224'], '--teacher-model',
                                                'vit_tiny_patch16_224'), EXIT_USER_ERROR,
                          r'^error: --teacher-model vit_tiny_patch16_224 reads the 40x40 images in 16x16 patches, and '
                          r'40 is not a whole number of them \(its patch embedding would drop the rest of the image\)$')
    assert snapshot(earlier) == before


@pytest.mark.parametrize('teacher, refused', [
    ('deit_tiny_patch16_224', True),           # ImageNet's mean and std; the student (digits model) reads 0.5, 0.5
    ('deit_digits_patch4_32', False),
])
def test_teacher_trained_on_another_normalisation_is_refused(capsys, world, earlier, teacher, refused):
    """The teacher reads the student's images, normalised for the student: a teacher trained on another mean and
    std would give logits off without a word."""
    argv = [*DIGITS_ARGS, '--data-path', str(world['data']), '--output_dir', str(earlier), '--final_finetune', '1',
            '--resume', str(world['dense']), '--teacher-path', str(world['tiny']), '--teacher-model', teacher,
            '--distillation-type', 'soft']
    if refused:
        before = snapshot(earlier)
        line = assert_one_line_error(capsys, argv, EXIT_USER_ERROR, r'--teacher-model deit_tiny_patch16_224 was '
                                     r'trained on images normalised with mean \(0\.485, 0\.456, 0\.406\), std '
                                     r'\(0\.229, 0\.224, 0\.225\), and the student deit_digits_patch4_32 reads')
        assert 'mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)' in line
        assert snapshot(earlier) == before
    else:
        finetune.validate_args(finetune.get_args_parser().parse_args(argv))
    # DIGITS normalises every image the same way, whatever the models' configs say: nothing to refuse there
    finetune.check_teacher_normalisation('deit_digits_patch4_32', 'cc_deit_digits_patch4_32')
    digits = [a for a in argv if a not in ('--data-path', str(world['data']))] + ['--data-set', 'DIGITS']
    finetune.validate_args(finetune.get_args_parser().parse_args(digits))


@pytest.mark.parametrize('argv, pattern', [
    (['--prune_rate', 'quarter'], r"^error: argument --prune_rate: invalid float value: 'quarter' \(see --help\)$"),
    (['--no-such-flag'], r'^error: unrecognized arguments: --no-such-flag \(see --help\)$'),
    (['--epochs', '3', '--eval'],  # DeiT's name for the original code's --final_finetune
     r'^error: unrecognized arguments: --epochs 3; here --epochs is --final_finetune \(see --help\)$'),
    (['--prune_mode', 'magnitude'], r"^error: argument --prune_mode: invalid choice: 'magnitude'"),
    (['--inat-category', 'bogus'], r"^error: argument --inat-category: invalid choice: 'bogus'"),
    (['--eval', 'x\ny'], r'^error: unrecognized arguments: x\\ny \(see --help\)$'),  # a stray word with a newline
])
def test_unparsable_command_line_is_one_line_too(capsys, argv, pattern):
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == EXIT_USER_ERROR
    assert len(lines) == 1 and re.search(pattern, lines[0]), err


# ----------------------------------------------------------------------------------------------------------
# earlier runs are never overwritten

@pytest.fixture(scope='module')
def finished(world, tmp_path_factory):
    """A one-epoch finetune: out/checkpoint.pth, best.pth and log.txt."""
    out = tmp_path_factory.mktemp('finished') / 'out'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = finetune.main([*DIGITS_ARGS, *map(str, finetune_args(world, out, '--resume', world['dense']))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


def test_fresh_finetune_into_a_directory_with_a_checkpoint_is_refused(capsys, world, finished, monkeypatch):
    """Before the data is read: on ImageNet, listing train/ and val/ takes minutes before this refusal came."""
    monkeypatch.setattr(finetune, 'build_data', no_work)
    before = snapshot(finished)
    ckpt = finished / 'checkpoint.pth'
    assert_one_line_error(capsys, finetune_args(world, finished, '--resume', world['dense']), EXIT_USER_ERROR,
                          rf'{re.escape(str(ckpt))} already exists from an earlier run; continue it with '
                          rf'--resume {re.escape(str(ckpt))} or choose another --output_dir')
    assert snapshot(finished) == before


def test_continuing_another_checkpoint_into_a_directory_with_a_checkpoint_is_refused(capsys, world, finished,
                                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, 'build_data', no_work)  # refused before the data is read
    other = tmp_path / 'other.pth'
    shutil.copy(finished / 'checkpoint.pth', other)
    before = snapshot(finished)
    assert_one_line_error(capsys, finetune_args(world, finished, '--resume', other, '--final_finetune', '3'),
                          EXIT_USER_ERROR, r'checkpoint\.pth already exists from an earlier run')
    # best.pth of the same run would roll the run back and cut log.txt: refused as well
    assert_one_line_error(capsys, finetune_args(world, finished, '--resume', finished / 'best.pth',
                                                '--final_finetune', '3'),
                          EXIT_USER_ERROR, r'checkpoint\.pth already exists from an earlier run')
    # a checkpoint.pth too, when it is another run's (another folder's): only the folder's own file continues there
    (tmp_path / 'elsewhere').mkdir()
    shutil.copy(finished / 'checkpoint.pth', tmp_path / 'elsewhere' / 'checkpoint.pth')
    assert_one_line_error(capsys, finetune_args(world, finished, '--resume', tmp_path / 'elsewhere' / 'checkpoint.pth',
                                                '--final_finetune', '3'),
                          EXIT_USER_ERROR, r'checkpoint\.pth already exists from an earlier run')
    assert snapshot(finished) == before


def test_best_pth_continued_without_output_dir_is_told_why_its_folder_is_not_the_default(capsys, finished):
    """--resume out/checkpoint.pth alone continues in out/; out/best.pth alone is refused, and the line says that
    the default is for a checkpoint.pth only (out/ holds the run's later checkpoint, which only it continues)."""
    before = snapshot(finished)
    best = finished / 'best.pth'
    assert_one_line_error(capsys, ['--resume', best, '--final_finetune', '3'], EXIT_USER_ERROR,
                          r'^error: --output_dir is required: finetuning writes checkpoint\.pth and log\.txt there '
                          r'\(it defaults to the folder of --resume only for a checkpoint\.pth, which continues its '
                          rf'run in place; {re.escape(str(best))} is not one\)$')
    assert snapshot(finished) == before


def test_a_finished_run_continued_with_another_model_is_refused_as_an_unfinished_one_is(capsys, finished):
    """A run whose last epoch is done builds no model, so --model was not checked: another model than the run's
    said 'Nothing to do' with exit code 0, where the same command before the last epoch is refused."""
    before = snapshot(finished)
    assert_one_line_error(capsys, ['--resume', finished / 'checkpoint.pth', '--model', 'deit_tiny_patch16_224'],
                          EXIT_USER_ERROR, r'checkpoint\.pth holds deit_digits_patch4_32 \(the model its args name\), '
                                           r'not deit_tiny_patch16_224: set --model deit_digits_patch4_32$')
    assert snapshot(finished) == before


def test_fresh_finetune_next_to_an_earlier_best_and_log_is_refused(capsys, world, finished, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    shutil.copy(finished / 'best.pth', out / 'best.pth')
    shutil.copy(finished / 'log.txt', out / 'log.txt')
    before = snapshot(out)
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', world['dense']), EXIT_USER_ERROR,
                          rf'{re.escape(str(out))} already holds best\.pth and log\.txt from an earlier run')
    assert snapshot(out) == before


@pytest.mark.parametrize('moved', [('checkpoint.pth', 'best.pth', 'log.txt'), ('checkpoint.pth', 'log.txt')],
                         ids=['all-three', 'best-left'])
def test_a_new_run_into_a_folder_left_with_an_earlier_runs_tensorboard_events_is_refused(capsys, world, finished,
                                                                                          tmp_path, monkeypatch, moved):
    """The run's files moved away as the refusal says, but not its TensorBoard events: a new run there drew its
    scalars over the earlier run's, at the same epochs, in one TensorBoard run."""
    monkeypatch.setattr(finetune, 'build_data', no_work)  # refused before the data is read
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    for name in moved:
        (out / name).unlink()
    events = sorted(p.name for p in out.iterdir() if p.name.startswith('events.out.tfevents'))
    assert events
    before = snapshot(out)
    left = '' if 'best.pth' in moved else r'best\.pth and '
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', world['dense']), EXIT_USER_ERROR,
                          rf'{re.escape(str(out))} already holds {left}TensorBoard events \({re.escape(events[0])}\) '
                          r'from an earlier run; choose another --output_dir \(or move them away\)$')
    # and so is the run of another checkpoint continued there
    other = tmp_path / 'other.pth'
    shutil.copy(finished / 'checkpoint.pth', other)
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', other, '--final_finetune', '3'),
                          EXIT_USER_ERROR, r'TensorBoard events .* from an earlier run')
    assert snapshot(out) == before


def test_resume_with_an_optimizer_that_does_not_fit(capsys, world, finished, tmp_path):
    out = tmp_path / 'out'
    shutil.copytree(finished, out)
    # A checkpoint that does not record the settings of its run (a continued run takes them from its args: the
    # weight decay of a checkpoint that has them is kept, see test_recipe.py)
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    del ckpt['args']
    torch.save(ckpt, out / 'checkpoint.pth')
    before = snapshot(out)
    # --weight-decay 0 gives one parameter group where the checkpoint has two (decay / no decay)
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', out / 'checkpoint.pth', '--final_finetune',
                                                '2', '--weight-decay', '0'), EXIT_USER_ERROR,
                          r'checkpoint\.pth: its optimizer or scheduler state does not fit this run \(loaded state '
                          r'dict has a different number of parameter groups\); resume with the --opt')
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------
# non-finite loss: stop, keep the last good checkpoint

def test_weights_giving_a_nan_loss_stop_before_any_checkpoint(capsys, world, tmp_path):
    """Finite weights whose logits overflow (NaN or infinite weights are refused when the file is read)."""
    sd = torch.load(world['dense'], weights_only=True)['model']
    sd['head.weight'] = torch.full_like(sd['head.weight'], 3e38)
    nan = tmp_path / 'nan.pth'
    torch.save({'model': sd}, nan)
    out = tmp_path / 'out'
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', nan, '--final_finetune', '2'),
                          EXIT_DIVERGED, rf'^error: loss is nan at epoch 0, step 0; stopped\. Last good checkpoint, '
                                         rf'untouched: {re.escape(str(nan))}$')
    # the output directory is created with the first checkpoint: a run that fails before it leaves nothing
    assert not out.exists()


def test_divergence_after_a_good_epoch_keeps_its_checkpoint_byte_for_byte(capsys, world, tmp_path):
    out = tmp_path / 'out'
    # A step schedule that multiplies the learning rate by 1e30 at every step: epochs 0 and 1 run at t = 0 (the
    # schedule is stepped to t = epoch after each epoch, as in DeiT), epoch 2 at t = 1 diverges. The schedule is
    # part of the checkpoint, so the resumed run diverges too.
    sched = ['--sched', 'step', '--decay-epochs', '1', '--decay-rate', '1e30', '--warmup-epochs', '0']
    code, _, err = cli(capsys, *finetune_args(world, out, '--resume', world['dense'], '--final_finetune', '2', *sched))
    assert code == 0, err
    before = snapshot(out)
    ckpt = out / 'checkpoint.pth'
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', ckpt, '--final_finetune', '3', *sched),
                          EXIT_DIVERGED, rf'^error: loss is (nan|inf|-inf) at epoch 2, step \d+; stopped\. Last good '
                                         rf'checkpoint, untouched: {re.escape(str(ckpt))}$')
    after = snapshot(out)
    for name in ('checkpoint.pth', 'best.pth', 'log.txt'):
        assert after[name] == before[name], name
    assert not [name for name in after if '.tmp' in name]
    assert torch.load(ckpt, weights_only=False)['epoch'] == 1


def test_overflowing_learning_rate_is_a_divergence_too(capsys, world, tmp_path):
    out = tmp_path / 'out'
    sched = ['--sched', 'step', '--decay-epochs', '1', '--decay-rate', '1e60', '--warmup-epochs', '0']
    code, _, err = cli(capsys, *finetune_args(world, out, '--resume', world['dense'], '--final_finetune', '2', *sched))
    assert code == 0, err
    before = snapshot(out)
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', out / 'checkpoint.pth', '--final_finetune',
                                                '3', *sched),
                          EXIT_DIVERGED, r'(the optimizer step overflowed|loss is \S+) at epoch 2, step \d+.*; '
                                         r'stopped\. Last good checkpoint, untouched: ')
    assert snapshot(out)['checkpoint.pth'] == before['checkpoint.pth']


def test_a_stop_that_names_a_path_with_a_newline_is_one_line(capsys, world, tmp_path):
    """A run that stops midway names the file it kept: a --resume path with a newline in it (a folder 'de\\nnse')
    split the error line in two, and a divergence's message was cut to its last line.  The line is whole, the
    newline escaped."""
    resume = shutil.copy(world['dense'], tmp_path / 'de\nnse.pth')
    out = tmp_path / 'out'
    line = assert_one_line_error(capsys, finetune_args(world, out, '--resume', resume, '--lr', '1e20',
                                                       '--batch-size', '64'), EXIT_DIVERGED, r'^error: ')
    assert line == ('error: the validation loss is nan after epoch 0: the weights diverged in its last steps; '
                    'stopped. Last good checkpoint, untouched: ' + str(resume).replace('\n', '\\n'))
    assert not out.exists()


def test_weights_broken_by_an_epochs_last_step_are_a_divergence_and_nothing_is_saved(capsys, world, tmp_path):
    """One step per epoch (the whole training set in one batch): its loss is finite, the update it makes is not.
    The validation loss is checked before anything is saved, so the run stops as a divergence, writing nothing."""
    out = tmp_path / 'out'
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', world['dense'], '--lr', '1e20',
                                                '--batch-size', '64'),
                          EXIT_DIVERGED, rf'^error: the validation loss is nan after epoch 0: the weights diverged in '
                                         rf'its last steps; stopped\. Last good checkpoint, untouched: '
                                         rf'{re.escape(str(world["dense"]))}$')
    assert not out.exists()


def test_a_tensor_too_large_for_64_bit_sizes_is_one_line_like_out_of_memory(capsys):
    """An image size within --input-size's range whose position embedding has more bytes than 64 bits count: torch's
    'Storage size calculation overflowed' was a traceback; it is said as a lack of memory is (exit code 1)."""
    code, out, err = cli(capsys, '--speed-only', '--input-size', 2147483644, '--speed-repeats', 1)
    assert code == finetune.EXIT_OUT_OF_MEMORY == 1 and 'Traceback' not in err
    assert re.fullmatch(r'error: out of CPU memory \(Tried to allocate a tensor of sizes \[1, 288230375077969922, '
                        r'96\], more bytes than 64 bits count\) with --batch-size 8 per process: a smaller '
                        r'--batch-size or --input-size needs less; nothing was written\n', err), err


def test_learning_rate_that_overflows_when_scaled_is_refused(capsys, world, tmp_path):
    out = tmp_path / 'out'
    assert_one_line_error(capsys, finetune_args(world, out, '--resume', world['dense'], '--lr', '1e308',
                                                '--batch-size', '1024'),
                          EXIT_USER_ERROR, r'^error: --lr 1e\+308 scaled by batch x processes / 512 \(1024 x 1 / 512\) '
                                           r'is inf: give a smaller --lr \(or --unscale-lr\)$')
    assert not out.exists()


def test_scaled_learning_rate_is_checked_at_the_launchers_process_count(monkeypatch):
    """The lr is scaled by batch x processes / 512, the processes being the launcher's WORLD_SIZE (which replaces
    args.world_size once the processes meet): the check before any work scales it by that count, not by the
    --world_size flag, which has no effect. An lr that overflows only at the real count is refused there (it was
    refused only after the data was listed), and one that would overflow only at a --world_size given in a single
    process passes."""
    parse = finetune.get_args_parser().parse_args
    finetune.check_optimizer_and_schedule(parse(['--lr', '1e305', '--batch-size', '512', '--world_size', '1000']))
    launched(monkeypatch, WORLD_SIZE='2000', RANK='0')
    with pytest.raises(UserError, match=r'^--lr 1e\+305 scaled by batch x processes / 512 '
                                        r'\(512 x 2000 / 512\) is inf: give a smaller --lr'):
        finetune.check_optimizer_and_schedule(parse(['--lr', '1e305', '--batch-size', '512']))


def test_learning_rate_that_underflows_to_zero_when_scaled_is_refused():
    """An --lr whose scaled value is below the smallest float became 0 (a run training nothing, without a word);
    an --lr of 0 itself is what was asked."""
    parse = finetune.get_args_parser().parse_args
    with pytest.raises(UserError, match=r'^--lr 4\.94066e-324 scaled by batch x processes / 512 \(64 x 1 / 512\) '
                                        r'is 0 in floating point: give a larger --lr'):
        finetune.check_optimizer_and_schedule(parse(['--lr', '4.9e-324', '--batch-size', '64']))
    finetune.check_optimizer_and_schedule(parse(['--lr', '4.9e-324', '--batch-size', '64', '--unscale-lr']))
    finetune.check_optimizer_and_schedule(parse(['--lr', '0', '--batch-size', '64']))


# ----------------------------------------------------------------------------------------------------------
# the script itself

@pytest.mark.slow
@pytest.mark.parametrize('case', ['garbage checkpoint', 'bad flag'])
def test_cli_script_prints_one_line(world, tmp_path, case):
    if case == 'garbage checkpoint':
        garbage = tmp_path / 'garbage.pth'
        garbage.write_bytes(b'\x80\x02garbage')
        argv = ['--eval', '--resume', str(garbage), '--data-path', world['data']]
        pattern = (r'^error: .*garbage\.pth is not a readable PyTorch checkpoint \(corrupt, or pickled objects the '
                   r'safe loader refuses: Unsupported operand \d+\)$')
    else:
        argv = ['--prune', '--prune_rate', '2', '--resume', world['dense'], '--data-path', world['data'],
                '--output_dir', str(tmp_path / 'out')]
        pattern = r'^error: --prune_rate must be in \(0, 1\), got 2\.0$'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'finetune.py'), *DIGITS_ARGS, *argv],
                          capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr
    assert 'Traceback' not in proc.stdout + proc.stderr


class GoneReader(io.StringIO):
    """Standard output whose reader has gone after ``lines`` writes (`| head`), or whose disk is full."""

    def __init__(self, err, lines=6):
        super().__init__()
        self.err, self.lines = err, lines

    def write(self, text):
        self.lines -= 1
        if self.lines < 0:
            raise OSError(self.err, os.strerror(self.err))
        return super().write(text)


@pytest.mark.parametrize('err', [32, 28])  # EPIPE, ENOSPC
def test_standard_output_that_cannot_be_written_stops_the_run_with_one_line(capsys, monkeypatch, world, tmp_path, err):
    """A traceback (BrokenPipeError from print_line) with exit code 1 before; a finetune says what it has kept."""
    monkeypatch.setattr(sys, 'stdout', GoneReader(err))
    code = finetune.main([*DIGITS_ARGS, '--final_finetune', '1', '--data-path', world['data'],
                          '--output_dir', str(tmp_path / 'out')])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0] == f'error: cannot write to standard output: {os.strerror(err)}; no epoch ' \
                                           f'had finished, so no checkpoint was written', lines
    assert not (tmp_path / 'out').exists()


def test_closed_standard_output_takes_nothing_as_with_print(capsys, monkeypatch, world):
    monkeypatch.setattr(sys, 'stdout', None)  # (`finetune.py ... >&-`: Python sets it None)
    assert finetune.main([*DIGITS_ARGS, '--eval', '--resume', world['dense'], '--data-path', world['data']]) == 0
    assert 'error' not in capsys.readouterr().err


def test_prune_refuses_to_replace_an_earlier_pruned_checkpoint_before_scoring(capsys, world, earlier):
    shutil.copy(earlier / 'pruned_0.25.pth', earlier / 'pruned_0.3.pth')
    before = snapshot(earlier)
    path = earlier / 'pruned_0.3.pth'
    code, out, err = cli(capsys, *prune_args(world, earlier))
    assert code == EXIT_USER_ERROR
    assert err.strip() == f'error: {path} already exists from an earlier run; choose another --output_dir ' \
                          f'(or move it away)'
    assert 'Scoring:' not in out
    assert snapshot(earlier) == before


def test_prune_refuses_to_add_to_the_tensorboard_folder_of_an_earlier_prune_before_scoring(capsys, world, tmp_path):
    """The pruned file of an earlier --prune at the same mode and rate moved away, as its refusal says, but not its
    TensorBoard folder: a second prune wrote its scalars at step 0 beside that run's, in one TensorBoard run."""
    out = tmp_path / 'out'
    assert cli(capsys, *prune_args(world, out, '--prune_mode', 'random'))[0] == 0
    (out / 'pruned_random_0.3.pth').rename(tmp_path / 'kept.pth')
    before = snapshot(out)
    code, out_text, err = cli(capsys, *prune_args(world, out, '--prune_mode', 'random', '--seed', '1'))
    assert code == EXIT_USER_ERROR
    assert err.strip() == f'error: {out / "prune_random_0.3"} already holds the TensorBoard events of an earlier ' \
                          f'--prune at this mode and rate; choose another --output_dir (or move it away)'
    assert 'Clipped' not in out_text
    assert snapshot(out) == before


def test_prune_with_an_empty_output_dir_is_refused_not_written_beside_resume(capsys, world, tmp_path):
    """--output_dir '' (a script's "$OUT" unset) was taken as no --output_dir: --prune scored and wrote its file, log
    and TensorBoard folder beside --resume; only a flag left out means that."""
    source = tmp_path / 'source'
    source.mkdir()
    shutil.copy(world['dense'], source / 'dense.pth')
    before = snapshot(source)
    argv = prune_args(world, tmp_path / 'out') + ['--resume', source / 'dense.pth', '--output_dir', '']
    assert_one_line_error(capsys, argv, EXIT_USER_ERROR, r'^error: --output_dir is empty: give a directory$')
    assert snapshot(source) == before and sorted(os.listdir(source)) == ['dense.pth']


def test_prune_refuses_an_already_pruned_checkpoint_before_scoring(capsys, world, earlier, tmp_path):
    """Scoring and planning start from the dense model: pruning a pruned file would silently drop its masks."""
    model = pruned_model('cc_deit_digits_patch4_32', 0)
    model.blocks[2].attn.token_index[[3, 5]] = False
    pruned = tmp_path / 'pruned_0.1.pth'
    torch.save({'model': model.state_dict()}, pruned)
    before = snapshot(earlier)
    code, out, err = cli(capsys, *prune_args(world, earlier, '--resume', pruned))
    assert code == EXIT_USER_ERROR
    assert err.strip() == (f'error: --resume {pruned} is already pruned (2 of 384 (layer, patch) slots clipped): '
                           f'--prune starts from a dense checkpoint')
    assert 'Scoring:' not in out and snapshot(earlier) == before


def test_prune_of_weights_that_give_no_finite_scores_plans_nothing(capsys, world, earlier, tmp_path):
    """Attention logits that overflow make every Taylor score NaN; planned anyway, the first layer took almost the
    whole budget.  (Finite weights: NaN or infinite ones are refused when the file is read.)"""
    checkpoint = torch.load(world['dense'])
    checkpoint['model']['blocks.1.attn.qkv.weight'] *= 1e30
    spoilt = tmp_path / 'spoilt.pth'
    torch.save(checkpoint, spoilt)
    before = snapshot(earlier)
    assert_one_line_error(capsys, prune_args(world, earlier, '--resume', spoilt), EXIT_DIVERGED,
                          rf'^error: the Taylor scores of {re.escape(str(spoilt))} are not finite .*; no masks '
                          rf'planned, nothing written$')
    assert snapshot(earlier) == before


def test_prune_rate_that_clips_nothing_is_refused_before_scoring(capsys, world, earlier):
    code, out, err = cli(capsys, *prune_args(world, earlier, '--prune_rate', '1e-4'))
    assert code == EXIT_USER_ERROR
    assert err.strip() == ('error: --prune_rate 0.0001 clips int(384 x 0.0001) = 0 of the 384 (layer, patch) slots: '
                           'nothing would be pruned')
    assert 'Scoring:' not in out


def test_prune_refuses_a_pruned_checkpoint_or_a_rate_that_clips_nothing_before_the_data_is_listed(
        capsys, world, earlier, tmp_path, monkeypatch):
    """Both refusals need only the model: they come before the data set is listed (minutes on ImageNet)."""
    model = pruned_model('cc_deit_digits_patch4_32', 0)
    model.blocks[4].attn.token_index[[1, 7, 9]] = False
    pruned = tmp_path / 'pruned_0.1.pth'
    torch.save({'model': model.state_dict()}, pruned)

    def listed(*args, **kwargs):
        raise AssertionError('the data was listed first')
    monkeypatch.setattr(finetune, 'build_data', listed)
    assert_one_line_error(capsys, prune_args(world, earlier, '--resume', pruned), EXIT_USER_ERROR,
                          rf'^error: --resume {re.escape(str(pruned))} is already pruned \(3 of 384 ')
    assert_one_line_error(capsys, prune_args(world, earlier, '--prune_rate', '1e-4'), EXIT_USER_ERROR,
                          r'^error: --prune_rate 0\.0001 clips int\(384 x 0\.0001\) = 0 of the 384 ')


def test_odd_training_set_smaller_than_the_batch_is_refused_with_mixup(capsys, world, tmp_path):
    """A training set at least a batch long drops its last batch; a shorter one is one batch, which timm's mixup
    refuses (with an assertion, midway) when it is odd."""
    data = pathlib.Path(make_image_folder(tmp_path / 'data', classes=tuple('abcd'), per_class=(2, 1), size=(32, 32)))
    next((data / 'train' / 'a').iterdir()).unlink()  # 7 training images
    out_dir = tmp_path / 'out'
    assert_one_line_error(capsys, finetune_args(world, out_dir, '--data-path', data, '--mixup', '0.8'),
                          EXIT_USER_ERROR, r'the training set gives 7 images per process, fewer than --batch-size 8, '
                                           r'and an odd number: mixup and cutmix need an even batch \(give an even '
                                           r'--batch-size of at most 6, or --mixup 0 --cutmix 0\)$')
    assert not out_dir.exists()


def test_unreadable_image_found_after_the_pruned_file_is_written_says_it_is_complete(capsys, world, earlier,
                                                                                     tmp_path):
    """Scoring reads the training images; the evaluation after it reads the validation ones.  An image found
    unreadable there cannot be found before the work, so the line says what the run has written."""
    data = copy_data(world, tmp_path)
    bad = data / 'val' / 'c' / '1.png'
    bad.write_bytes(b'this is not a png')
    line = assert_one_line_error(capsys, prune_args(world, earlier, '--data-path', data, '--prune-batches', '1'),
                                 EXIT_USER_ERROR, rf'^error: cannot read image {re.escape(str(bad))}: not an image')
    path = earlier / 'pruned_0.3.pth'
    assert line.endswith(f'; {path} was written completely')
    assert torch.load(path, weights_only=False)['model']['blocks.0.attn.token_index'].dtype == torch.bool


def test_a_stop_while_prune_logs_its_results_says_the_pruned_file_is_complete(capsys, monkeypatch, world, earlier):
    """After the evaluation --prune appends to prune_log.txt and writes its TensorBoard scalars (importing
    TensorBoard takes a moment): a Ctrl-C there leaves the pruned file complete, and the line says so rather than
    'nothing was written'."""
    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, 'TensorBoard', stopped)
    code, out, err = cli(capsys, *prune_args(world, earlier, '--prune_mode', 'random'))
    path = earlier / 'pruned_random_0.3.pth'
    assert code == 130 and err.strip() == f'interrupted; {path} was written completely'
    assert 'Accuracy of the network on the 16 test images' in out
    assert torch.load(path, weights_only=True)['channels'] == [
        int(m.sum()) for k, m in torch.load(path, weights_only=True)['model'].items() if k.endswith('token_index')]


def test_speed_flags_that_clash_are_only_noted_where_nothing_is_timed(tmp_path):
    """--speed-protocol original with --speed-warmup is refused with --speed-only (the original protocol has no
    warm-up); with --eval no speed flag does anything, so each is named in the note, as a shared flag set passes
    them."""
    parser = finetune.get_args_parser()
    (tmp_path / 'x.pth').write_bytes(b'')
    argv = ['--speed-protocol', 'original', '--speed-warmup', '1', '--resume', str(tmp_path / 'x.pth')]
    with pytest.raises(UserError, match='--speed-protocol original times fp32 passes'):
        finetune.validate_args(parser.parse_args(['--speed-only', *argv]))
    args = parser.parse_args(['--eval', '--data-path', 'd', *argv])
    finetune.validate_args(args)
    assert finetune.unused_flag_notes(args, parser) == [
        'note: --speed-protocol original, --speed-warmup 1 have no effect: only --speed-only times the model']


def test_flags_the_chosen_optimizer_schedule_or_augmentation_ignores_are_noted():
    parser = finetune.get_args_parser()
    args = parser.parse_args(['--momentum', '0.5', '--opt-betas', '0.8', '0.9', '--warmup-lr', '1e-4',
                              '--model-ema-decay', '0.9', '--color-jitter', '0.9', '--mixup', '0', '--cutmix', '0',
                              '--mixup-mode', 'pair', '--world_size', '2', '--output_dir', 'o', '--local_rank', '1'])
    notes = finetune.unused_flag_notes(args, parser)
    assert notes == [
        'note: --local-rank 1 has no effect: only the processes of a launcher read it (torch.distributed.launch '
        'passes it); one process started by hand takes its GPU from --device (cuda:N)',
        "note: --momentum 0.5 has no effect: not read by timm's adamw optimizer",
        'note: --warmup-lr 0.0001 has no effect: there is no warm-up (--warmup-epochs 0)',
        'note: --model-ema-decay 0.9 has no effect: no --model-ema is given',
        'note: --color-jitter 0.9 has no effect: timm applies no colour jitter with an auto-augment policy (--aa); '
        '--aa none turns it on',
        'note: --mixup-mode pair has no effect: mixup and cutmix are off (--mixup 0 --cutmix 0)',
        'note: --world_size 2 has no effect: the launcher sets the processes up (torchrun or '
        'torch.distributed.launch: WORLD_SIZE, and env://)']
    args = parser.parse_args(['--opt', 'sgd', '--opt-betas', '0.8', '0.9', '--opt-eps', '1e-3', '--momentum', '0.5',
                              '--distillation-type', 'hard', '--distillation-tau', '5', '--mixup', '0.8',
                              '--cutmix', '0', '--mixup-switch-prob', '0.2', '--aa', 'none', '--color-jitter', '0.3'])
    notes = finetune.unused_flag_notes(args, parser)
    assert notes == [
        "note: --opt-betas 0.8 0.9, --opt-eps 0.001 have no effect: not read by timm's sgd optimizer",
        "note: --distillation-tau 5.0 has no effect: hard distillation learns the teacher's top class, with no "
        "temperature",
        'note: --mixup-switch-prob 0.2 has no effect: it switches between mixup and cutmix, and only one of them is on']


def test_checkpoints_keep_the_data_and_teacher_paths_absolute(tmp_path, monkeypatch):
    """A run continued from another directory reads the data and the teacher it was started with."""
    monkeypatch.chdir(tmp_path)
    args = finetune.get_args_parser().parse_args(['--data-path', 'data', '--teacher-path', 't.pth',
                                                  '--distillation-type', 'soft', '--output_dir', 'out'])
    saved = finetune.args_to_save(args)
    assert (saved['data_path'], saved['teacher_path']) == (str(tmp_path / 'data'), str(tmp_path / 't.pth'))
    assert saved['output_dir'] == 'out' and args.data_path == 'data'  # the run's own args are left as given
    # an older checkpoint with a relative path: taken over, and said to be read from here
    torch.save({'optimizer': {}, 'lr_scheduler': {}, 'epoch': 0, 'args': vars(args)}, tmp_path / 'checkpoint.pth')
    again = finetune.get_args_parser().parse_args(['--resume', str(tmp_path / 'checkpoint.pth')])
    lines, inherited, _ = finetune.continue_run(again)
    assert inherited['data_path'] == 'data'
    assert (f'warning: {tmp_path / "checkpoint.pth"} holds --data-path data and --teacher-path t.pth relative to the '
            f'directory its run was started from, which it does not record: read from here as {tmp_path / "data"} '
            f'and {tmp_path / "t.pth"} (give the flag to choose)') in lines


def test_a_position_embedding_that_does_not_fit_names_input_size_or_model_size_by_its_shape():
    from models.checkpoint import load_weights
    from utils import UserError
    model = pruned_model('cc_deit_digits_patch4_32', 0)
    state = model.state_dict()
    _, n, c = state['pos_embed'].shape
    for shape, hint in (((1, 2 * n - 1, c), 'another input size? set --input-size'),
                        ((1, n, 2 * c), 'another model size? set --model')):
        with pytest.raises(UserError, match=re.escape(f'pos_embed has shape {shape} in the checkpoint but '
                                                      f'{(1, n, c)} in the model ({hint})')):
            load_weights(model, {**state, 'pos_embed': torch.zeros(shape)}, 'x.pth', 'cc_deit_digits_patch4_32')


def test_a_distilled_file_for_a_model_without_distillation_token_names_the_model_not_the_input_size():
    """A DeiT file with a distillation token has one more position (and more keys) than the model without one:
    another model, which --input-size cannot fix."""
    from models.checkpoint import load_weights
    model = pruned_model('cc_deit_digits_patch4_32', 0)
    state = model.state_dict()
    _, n, c = state['pos_embed'].shape
    distilled = {**state, 'pos_embed': torch.zeros(1, n + 1, c), 'dist_token': torch.zeros(1, 1, c),
                 'head_dist.weight': torch.zeros(10, c), 'head_dist.bias': torch.zeros(10)}
    with pytest.raises(UserError, match=re.escape(f'pos_embed has shape {(1, n + 1, c)} in the checkpoint but '
                                                  f'{(1, n, c)} in the model (another model size? set --model)')):
        load_weights(model, distilled, 'x.pth', 'cc_deit_digits_patch4_32')
    undistilled = {k: v for k, v in state.items() if k != 'cls_token'}  # the other way: a position fewer
    with pytest.raises(UserError, match=re.escape('(another model size? set --model)')):
        load_weights(model, {**undistilled, 'pos_embed': torch.zeros(1, n - 1, c)}, 'x.pth', 'cc_deit_digits_patch4_32')


def test_a_file_of_another_patch_size_names_the_model_not_the_input_size():
    """Another patch size changes the position embedding's length too, but no input size makes the patch
    embedding fit."""
    from models.checkpoint import load_weights
    model = pruned_model('cc_deit_digits_patch4_32', 0)
    state = model.state_dict()
    _, n, c = state['pos_embed'].shape
    patch8 = {**state, 'pos_embed': torch.zeros(1, (n - 1) // 4 + 1, c),
              'patch_embed.proj.weight': torch.zeros(c, 3, 8, 8)}
    with pytest.raises(UserError, match=re.escape('(another model size? set --model)')):
        load_weights(model, patch8, 'x.pth', 'cc_deit_digits_patch4_32')


def test_continuing_a_run_on_other_class_folders_is_refused(capsys, world, finished, tmp_path):
    """The same number of classes under other names would give the run's labels to other classes."""
    ckpt = finished / 'checkpoint.pth'
    assert torch.load(ckpt, weights_only=False)['classes'] == ['a', 'b', 'c', 'd']
    data = pathlib.Path(make_image_folder(tmp_path / 'other', classes=('a', 'b', 'x', 'y'), per_class=(2, 1),
                                          size=(32, 32)))
    before = snapshot(finished)
    assert_one_line_error(capsys, ['--resume', ckpt, '--data-path', data, '--final_finetune', '2'], EXIT_USER_ERROR,
                          rf'^error: the training classes under {re.escape(str(data))} are not those of the run '
                          rf'{re.escape(str(ckpt))} continues \(label 2: c in the run, x here\): give the --data-path '
                          rf'it used$')
    assert snapshot(finished) == before


@pytest.mark.parametrize('mode', ['--eval', '--prune'])
def test_evaluating_or_pruning_a_model_on_other_class_folders_is_refused(capsys, world, finished, tmp_path, mode):
    """A file that records its classes is refused on folders with other names before any work (--eval and
    --prune ran, every label read as another class); a pruned file carries its classes on."""
    ckpt = finished / 'checkpoint.pth'
    data = pathlib.Path(make_image_folder(tmp_path / 'other', classes=('a', 'b', 'x', 'y'), per_class=(2, 1),
                                          size=(32, 32)))
    out = tmp_path / 'out'
    argv = [mode, '--resume', ckpt, '--data-path', data] + (['--output_dir', out] if mode == '--prune' else [])
    assert_one_line_error(capsys, argv, EXIT_USER_ERROR,
                          rf'^error: the validation classes under {re.escape(str(data))} are not those '
                          rf'{re.escape(str(ckpt))} records \(label 2: c in the file, x here\): give the '
                          rf'--data-path it used$')
    assert not out.exists()
    if mode == '--prune':  # on its own folders it prunes, and the pruned file records them
        code, _, err = cli(capsys, '--prune', '--prune_rate', '0.3', '--prune_mode', 'random', '--resume', ckpt,
                           '--data-path', world['data'], '--output_dir', out)
        assert code == 0, err
        assert torch.load(out / 'pruned_random_0.3.pth', weights_only=False)['classes'] == ['a', 'b', 'c', 'd']


# ----------------------------------------------------------------------------------------------------------
# checkpoints that are damaged, hand-made or from elsewhere

def test_a_pruned_file_without_its_masks_is_refused_not_run_dense(capsys, world, earlier, tmp_path):
    """Its channels say it is pruned; without the mask buffers it would load as the dense model."""
    model = pruned_model('cc_deit_digits_patch4_32', 0.25)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith('attn.token_index')}
    path = tmp_path / 'pruned_0.25.pth'
    torch.save({'model': sd, 'channels': pruned_counts(model)}, path)
    for mode in (['--eval', '--data-path', world['data']], ['--speed-only', '--speed-repeats', '1']):
        assert_one_line_error(capsys, [*mode, '--resume', path], EXIT_USER_ERROR,
                              rf'{re.escape(str(path))} lists channels \[.*\], a pruned model, but holds no masks '
                              r'\(blocks\.\{l\}\.attn\.token_index\): without them it would be the dense model$')


def pruned_counts(model):
    import models
    counts = models.kept_token_counts(model)
    assert min(counts) < 65  # really pruned
    return counts


@pytest.mark.parametrize('channels', [5, ['a'] * 6, [65.5] * 6, 'sixty', [65, 65, 65, -1, 65, 65]])
def test_channels_that_are_not_counts_are_one_line(capsys, world, earlier, tmp_path, channels):
    path = tmp_path / 'odd.pth'
    torch.save({'model': torch.load(world['dense'], weights_only=True)['model'], 'channels': channels}, path)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'{re.escape(str(path))}: its channels \(.*\) are not a list of kept-token counts per '
                          r'block$')


def test_weights_saved_from_a_compiled_or_wrapped_model_load(capsys, world, tmp_path):
    """torch.compile's _orig_mod. and DDP's module. prefixes are stripped, as timm's loader strips them."""
    sd = torch.load(world['dense'], weights_only=True)['model']
    path = tmp_path / 'compiled.pth'
    torch.save({'model': {f'module._orig_mod.{k}': v for k, v in sd.items()}}, path)
    code, out, err = cli(capsys, '--eval', '--resume', path, '--data-path', world['data'])
    assert code == 0, err
    reference = cli(capsys, '--eval', '--resume', world['dense'], '--data-path', world['data'])[1]
    accuracy = lambda text: re.search(r'Accuracy of the network on the \d+ test images: .*', text).group(0)  # noqa
    assert accuracy(out) == accuracy(reference)


def test_a_file_pickled_with_a_newer_protocol_is_one_line_that_says_so(capsys, world, earlier, tmp_path):
    """torch.load(weights_only=True) cannot read protocol 4 (a plain pickle.dump, or torch.save with
    pickle_protocol=4); torch's own warning about it is not printed beside the error."""
    path = tmp_path / 'protocol4.pth'
    torch.save(torch.load(world['dense'], weights_only=True), path, pickle_protocol=4)
    assert_one_line_error(capsys, ['--eval', '--resume', path, '--data-path', world['data']], EXIT_USER_ERROR,
                          rf'^error: cannot load {re.escape(str(path))}: it was pickled with protocol 4 \(torch\.save '
                          r'uses 2\), whose instructions the safe loader .* does not read; if it comes from a source '
                          r'you trust, save it again with torch\.save$')


@pytest.mark.parametrize('change, problem', [
    ({'epoch': 'last'}, r"epoch 'last' \(a finished epoch's number\)"),
    ({'epoch': -3}, r"epoch -3 \(a finished epoch's number\)"),
    ({'max_accuracy': None}, r'max_accuracy None \(a number\)'),
    ({'model_ema': None}, r'model_ema None \(a state dict\)'),
    ({'optimizer': [1, 2]}, r'optimizer a list \(a dict\)'),
    ({'log_stats': {'epoch': 0, 'test_acc1': 'high'}}, r"log_stats test_acc1 'high' \(a number\)"),
    ({'improved': 'yes'}, r"improved 'yes' \(True or False\)"),
])
def test_a_damaged_finetuning_checkpoint_is_refused_before_anything_is_built(capsys, world, finished, tmp_path,
                                                                            change, problem):
    out = shutil.copytree(finished, tmp_path / 'out')
    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=True)
    checkpoint.update(change)
    torch.save(checkpoint, out / 'checkpoint.pth')
    before = snapshot(out)
    ckpt = out / 'checkpoint.pth'
    line = assert_one_line_error(capsys, ['--resume', ckpt, '--final_finetune', '2'], EXIT_USER_ERROR,
                                 rf'^error: {re.escape(str(ckpt))} is not a finetuning checkpoint this run can '
                                 rf'continue: its {problem}$')
    assert 'Traceback' not in line and snapshot(out) == before


def test_a_deit_training_checkpoint_without_distillation_does_not_hand_on_its_default_teacher(world, tmp_path):
    """DeiT's checkpoints keep its default --teacher-model regnety_160 (not a ViT) even without distillation: a
    continued run takes over neither teacher flag, so it is not refused for a teacher it does not use."""
    import argparse
    stored = argparse.Namespace(model='deit_digits_patch4_32', teacher_model='regnety_160', teacher_path='',
                                distillation_type='none', lr=5e-4, epochs=300)
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': {}, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 3, 'args': stored}, path)
    args = finetune.get_args_parser().parse_args([*DIGITS_ARGS, '--data-path', str(world['data']), '--resume',
                                                  str(path)])
    lines, inherited, _ = finetune.continue_run(args)
    assert 'teacher_model' not in inherited and 'teacher_path' not in inherited
    assert args.distillation_type == 'none' and args.teacher_model != 'regnety_160'
    finetune.validate_args(args)  # not refused
    # with distillation switched on again the run's teacher is taken over (and then checked)
    args = finetune.get_args_parser().parse_args(['--resume', str(path), '--distillation-type', 'soft'])
    assert finetune.continue_run(args)[1]['teacher_model'] == 'regnety_160'


def test_a_results_file_the_run_cannot_append_to_is_refused_before_work(capsys, world, earlier, monkeypatch):
    """The run appends to prune_log.txt (--prune) or log.txt (finetuning) at the end of its work: one it may not
    write is said at the start (simulated: tests may run as root)."""
    (earlier / 'prune_log.txt').write_text('{"prune_mode": "attn", "prune_rate": 0.5}\n')  # an earlier prune's
    before = snapshot(earlier)
    real_access = os.access
    denied = str(earlier / 'prune_log.txt')
    for refused, said in ((os.W_OK, 'write to'), (os.R_OK, 'read')):
        monkeypatch.setattr(os, 'access', lambda p, mode, **kw: not (str(p) == denied and mode & refused)
                            and real_access(p, mode, **kw))
        code, out, err = cli(capsys, *prune_args(world, earlier))
        assert code == EXIT_USER_ERROR
        assert err.strip() == (f'error: cannot {said} {denied}: permission denied (the run appends its results to '
                               f'it, and reads it first: it appends only to the log of earlier prunes)')
        assert 'Scoring:' not in out and snapshot(earlier) == before


@pytest.mark.parametrize('content, line', [
    ('my notes on the pruning\n', "line 1 is not a record of --prune (a JSON object with its prune_mode): 'my notes "
                                  "on the pruning'"),
    ('{"epoch": 0, "train_loss": 1.0}\n', 'line 1 is not a record of --prune'),  # a finetune's log.txt, copied
    ('{"prune_mode": "attn"}\n[1, 2]\n', "line 2 is not a record of --prune (a JSON object with its prune_mode): "
                                         "'[1, 2]'"),
    (b'\x80\x81 not utf-8\n', 'is not a text file, not the log of --prune'),
    ('{"a": ' * 100000 + '1' + '}' * 100000 + '\n', 'line 1 is not a record of --prune'),  # (json's RecursionError)
])
def test_a_prune_log_that_is_not_one_is_refused_before_work_and_left_as_it_is(capsys, world, earlier, content,
                                                                              line):
    """--prune appends its record to prune_log.txt, after earlier prunes' (the attn and random masks of a rate
    share a folder), as a continued finetune keeps log.txt: a file there that is not such a log (notes, another
    run's log) was appended to without a word; it is refused before the scoring, as log.txt's rule has it."""
    log = earlier / 'prune_log.txt'
    log.write_bytes(content) if isinstance(content, bytes) else log.write_text(content)
    before = snapshot(earlier)
    code, out, err = cli(capsys, *prune_args(world, earlier))
    assert code == EXIT_USER_ERROR and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f'error: {log} {line}') and err.strip().endswith('move it away)' if isinstance(
        content, bytes) else '--prune appends its results to it, so move the file away'), err
    assert 'Scoring:' not in out and snapshot(earlier) == before


@pytest.mark.parametrize('spoil, pattern', [
    (lambda out: (out / 'prune_log.txt').mkdir(),
     r'cannot write to \S+prune_log\.txt: it is a directory \(the run appends its results to it, and reads it '
     r'first: it appends only to the log of earlier prunes\)$'),
    (lambda out: (out / 'prune_attn_0.3').write_text('a file\n'),
     r"cannot write to --prune's TensorBoard folder \S+prune_attn_0\.3: Not a directory$"),
], ids=['results-file-a-folder', 'tensorboard-folder-a-file'])
def test_what_prune_writes_after_its_work_is_checked_before_it(capsys, world, earlier, spoil, pattern):
    """--prune writes pruned_<rate>.pth, then appends prune_log.txt and writes TensorBoard scalars into a folder of
    its own: a path it could not write there is said before the scoring, and nothing is written."""
    spoil(earlier)
    before = snapshot(earlier)
    assert_one_line_error(capsys, prune_args(world, earlier), EXIT_USER_ERROR, pattern)
    assert snapshot(earlier) == before and not (earlier / 'pruned_0.3.pth').exists()


def test_an_output_dir_that_links_to_nowhere_is_refused_before_work(capsys, world, tmp_path):
    link = tmp_path / 'out'
    link.symlink_to(tmp_path / 'gone' / 'out')
    assert_one_line_error(capsys, prune_args(world, link), EXIT_USER_ERROR,
                          rf'^error: cannot write to --output_dir {re.escape(str(link))}: {re.escape(str(link))} is a '
                          rf'symbolic link to {re.escape(str(tmp_path / "gone" / "out"))}, which does not exist$')
    assert sorted(os.listdir(tmp_path)) == ['out']


@pytest.mark.parametrize('name', ['  ', 'out ', ' out'])
def test_an_output_dir_to_create_named_with_a_blank_at_either_end_is_refused(capsys, world, tmp_path, name):
    """`--output_dir "$OUT "` or `--output_dir ' '` made a folder of that name without a word (a stray space is
    hard to see in a listing); a folder to create whose name begins or ends with a blank is refused, one that
    exists already is taken as it is."""
    target = tmp_path / name / 'run'
    assert_one_line_error(capsys, prune_args(world, target), EXIT_USER_ERROR,
                          rf'^error: cannot write to --output_dir {re.escape(str(target))}: {re.escape(repr(name))}, '
                          rf'the name of a folder to create, begins or ends with a blank \(a stray space\?\)$')
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / name).mkdir()
    check_output_dir(str(target))  # (raises if refused)


def test_a_run_log_a_continued_run_cannot_read_back_is_refused_before_work(capsys, world, finished, tmp_path,
                                                                            monkeypatch):
    """A continued run reads log.txt back (each finished epoch once): unreadable, it is said at the start
    (simulated: tests may run as root)."""
    out = shutil.copytree(finished, tmp_path / 'out')
    before = snapshot(out)
    denied = str(out / 'log.txt')
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: not (str(p) == denied and mode & os.R_OK)
                        and real_access(p, mode, **kw))
    assert_one_line_error(capsys, ['--resume', out / 'checkpoint.pth', '--final_finetune', 2], EXIT_USER_ERROR,
                          rf'^error: cannot read {re.escape(denied)}: permission denied \(the run appends its '
                          r'results to it, and a continued run reads it back\)$')
    assert snapshot(out) == before


def _best_a_folder(out):
    (out / 'best.pth').unlink()
    (out / 'best.pth').mkdir()


@pytest.mark.parametrize('spoil, message', [
    (_best_a_folder, 'error: cannot write {out}/best.pth: it is a directory (the run writes its checkpoints there)'),
    (lambda out: (out / 'log.txt').write_text('my notes on this run\n'),
     "error: {out}/log.txt line 1 is not a record of a run (a JSON object with its epoch): 'my notes on this run'; "
     'the run rewrites its log when it continues, so move the file away'),
], ids=['best.pth-a-folder', 'log.txt-of-notes'])
def test_what_a_continued_run_writes_is_checked_before_its_first_epoch(capsys, finished, tmp_path, spoil, message):
    """A continued run replaces checkpoint.pth and best.pth and rewrites log.txt: best.pth a directory was found
    only after the first epoch had been trained and evaluated (that epoch was lost), and a log.txt of notes was
    rewritten without a word."""
    out = shutil.copytree(finished, tmp_path / 'out')
    spoil(out)
    before = snapshot(out)
    code, stdout, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--final_finetune', 2)
    assert code == EXIT_USER_ERROR and 'Epoch:' not in stdout and snapshot(out) == before
    assert err.strip() == message.format(out=out)


def test_a_run_continued_through_a_link_to_its_directory_repairs_its_log(capsys, finished, tmp_path):
    """--output_dir a symbolic link to the checkpoint's directory is that directory: the log is repaired on
    resume as it is without the link (it was not: an epoch's line stayed missing, or twice)."""
    out = shutil.copytree(finished, tmp_path / 'out')
    link = tmp_path / 'link'
    link.symlink_to(out)
    (out / 'log.txt').write_text('')  # killed before epoch 0's line was written
    code, stdout, err = cli(capsys, '--resume', out / 'checkpoint.pth', '--output_dir', link, '--final_finetune', 2)
    assert code == 0, err
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0, 1]


def test_other_warnings_while_loading_are_issued_once_and_the_load_completes(tmp_path, monkeypatch):
    """Loading records torch's warnings to read the pickle protocol from them; the others are issued again,
    once each, after the recording (issued inside it, they would be recorded again without end)."""
    import warnings
    from utils import checkpoint_io
    real = checkpoint_io._torch_load

    def warns(path, mmap):
        warnings.warn('a warning of the loader', UserWarning)
        return real(path, mmap)

    path = tmp_path / 'ok.pth'
    torch.save({'model': {'w': torch.zeros(2)}}, path)
    monkeypatch.setattr(checkpoint_io, '_torch_load', warns)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        assert list(checkpoint_io.load_checkpoint_file(str(path))) == ['model']
    assert [str(w.message) for w in seen] == ['a warning of the loader']


def test_an_output_dir_through_a_folder_that_does_not_exist_and_back_is_refused_before_work(capsys, world, tmp_path):
    """`--output_dir missing/../out`: the checks and the atomic writer took it as `out` (os.path.abspath drops both
    names), the system refuses to follow it: --prune wrote its pruned file there, then failed on its log."""
    target = f'{tmp_path / "missing"}{os.sep}..{os.sep}out'
    assert_one_line_error(capsys, prune_args(world, target), EXIT_USER_ERROR,
                          rf'^error: cannot write to --output_dir {re.escape(target)}: '
                          rf"{re.escape(str(tmp_path / 'missing'))} is not an existing folder, so the '..' after it "
                          rf'leads nowhere$')
    assert sorted(os.listdir(tmp_path)) == []
    (tmp_path / 'missing').mkdir()
    check_output_dir(target)  # (raises if refused)


def test_an_output_dir_to_create_under_an_unexpanded_home_folder_is_refused(capsys, world, tmp_path, monkeypatch):
    """`--output_dir "~/runs"` (quoted, so the shell left it) made a folder named '~' in the current directory
    without a word; a '~' that exists there already is taken as it is, and so is a '~name' of no user."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(world['base']))
    assert_one_line_error(capsys, prune_args(world, '~/runs'), EXIT_USER_ERROR,
                          rf"^error: cannot write to --output_dir ~/runs: '~', the name of a folder to create, is the "
                          rf"shell's name for a home folder, not expanded here \(quoted\?\): give "
                          rf"{re.escape(str(world['base'] / 'runs'))} if that is meant$")
    assert sorted(os.listdir(tmp_path)) == []
    check_output_dir('~no-user-of-this-name/runs')  # (raises if refused)
    (tmp_path / '~').mkdir()
    check_output_dir('~/runs')


def test_an_output_dir_whose_name_is_not_utf8_text_is_refused_before_work(capsys, world, tmp_path):
    """TensorBoard's writer encodes its folder's name strictly as UTF-8: a name with other bytes (every name beyond
    ASCII under LC_ALL=C without UTF-8 mode) ended a finetune in a UnicodeEncodeError traceback after its first
    checkpoint, and --prune after its pruned file."""
    out = str(tmp_path / os.fsdecode(b'out\xff'))
    assert_one_line_error(capsys, ['--final_finetune', '1', '--data-path', world['data'], '--output_dir', out],
                          EXIT_USER_ERROR, r'^error: cannot write to --output_dir .*out\\udcff: TensorBoard writes '
                                           r'only to a folder whose name is UTF-8 text')
    assert_one_line_error(capsys, prune_args(world, out), EXIT_USER_ERROR, 'TensorBoard writes only')
    assert sorted(os.listdir(tmp_path)) == []
