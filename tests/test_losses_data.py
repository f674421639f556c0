"""The distillation loss of the method, the data sets and the samplers."""
import argparse
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from conftest import make_image_folder
from datasets import DigitsDataset, build_dataset, build_transform
import losses
from losses import DistillationLoss
from samplers import DistributedEvalSampler, RASampler
from utils import UserError


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_soft_distillation_is_base_plus_alpha_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    tau, alpha = 2.0, 0.7
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t), 'soft', alpha, tau)(None, s, y)
    p_t = torch.softmax(t / tau, 1)
    kl = (p_t * (torch.log_softmax(t / tau, 1) - torch.log_softmax(s / tau, 1))).sum()
    expected = nn.functional.cross_entropy(s, y) + alpha * kl * tau * tau / s.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_hard_distillation_uses_teacher_argmax():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t), 'hard', 0.5, 1.0)(None, s, y)
    ce = nn.functional.cross_entropy
    assert loss.item() == pytest.approx((ce(s, y) + 0.5 * ce(s, t.argmax(1))).item(), rel=1e-6)
    assert DistillationLoss(nn.CrossEntropyLoss())(None, s, y).item() == pytest.approx(ce(s, y).item())


def test_soft_distillation_of_fp16_logits_at_a_small_temperature_is_finite():
    """Under autocast (CUDA) the student's and the teacher's logits are fp16: divided by a small tau in fp16 they
    overflowed to inf (10 / 1e-4 > 65504) and the loss was NaN; in float32 it is the loss of their fp32 values."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 10, generator=g) * 10, torch.randn(4, 10, generator=g) * 10
    y = torch.randint(0, 10, (4,), generator=g)
    s16, t16 = s.half(), t.half()
    for tau in (1e-4, 1.0, 20.0):
        got = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t16), 'soft', 0.5, tau)(None, s16, y)
        want = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t16.float()), 'soft', 0.5, tau)(None, s16.float(), y)
        assert torch.isfinite(got), tau
        assert got.item() == pytest.approx(want.item(), rel=1e-3)
        assert losses.soft_distillation(s16, t16, tau).item() == \
            pytest.approx(losses.soft_distillation(s16.float(), t16.float(), tau).item(), rel=1e-6)


def test_soft_distillation_in_float32_holds_within_the_temperatures_the_command_line_accepts():
    """tau^2 * KL in float32 against float64: within 0.5% from 1e-3 to 1e3 (finetune.TEMPERATURE); at 1e5 the KL of
    two nearly uniform distributions is rounding, times 1e10; towards 0 the term itself vanishes with tau."""
    import finetune
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(64, 1000, generator=g) * 5, torch.randn(64, 1000, generator=g) * 5
    ref = {tau: losses.soft_distillation(s.double(), t.double(), tau).item() for tau in (1e-3, 1.0, 1e3, 1e5)}
    for tau in (finetune.TEMPERATURE.low, 1.0, finetune.TEMPERATURE.high):
        assert losses.soft_distillation(s, t, tau).item() == pytest.approx(ref[tau], rel=5e-3), tau
    assert losses.soft_distillation(s, t, 1e5).item() != pytest.approx(ref[1e5], rel=0.05)
    assert ref[1e-3] < 1e-2 * ref[1.0]


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distilled_student_base_loss_reads_the_class_head_and_kd_the_distillation_head(kind):
    """A distilled DeiT in distilled training returns (class head, distillation head), as DeiT trains it."""
    g = torch.Generator().manual_seed(2)
    cls_out, dist_out, t = (torch.randn(4, 6, generator=g) for _ in range(3))
    y = torch.randint(0, 6, (4,), generator=g)
    ce = nn.functional.cross_entropy
    loss = DistillationLoss(nn.CrossEntropyLoss(), _Fixed(t), kind, 0.5, 1.0)(None, (cls_out, dist_out), y)
    if kind == 'hard':
        kd = ce(dist_out, t.argmax(1))
    else:
        kd = (torch.softmax(t, 1) * (torch.log_softmax(t, 1) - torch.log_softmax(dist_out, 1))).sum() / t.numel()
    assert loss.item() == pytest.approx((ce(cls_out, y) + 0.5 * kd).item(), rel=1e-5)
    # without distillation only the class head is trained on the labels
    assert DistillationLoss(nn.CrossEntropyLoss())(None, (cls_out, dist_out), y).item() == \
        pytest.approx(ce(cls_out, y).item())


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_the_teacher_gets_no_gradient_and_builds_no_graph(kind):
    """The teacher's forward runs without autograd: a teacher whose weights still require gradients (frozen or
    not) gets none from the loss, and the student's gradient is the one of fixed teacher outputs."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 4), nn.Linear(5, 4)
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 0, 1])
    DistillationLoss(nn.CrossEntropyLoss(), teacher, kind, 0.5, 2.0)(x, student(x), y).backward()
    assert teacher.weight.grad is None and teacher.bias.grad is None
    fixed = _Fixed(teacher(x).detach())
    expected = torch.autograd.grad(DistillationLoss(nn.CrossEntropyLoss(), fixed, kind, 0.5, 2.0)(x, student(x), y),
                                   student.weight)[0]
    assert torch.allclose(student.weight.grad, expected, atol=1e-7)


def test_distillation_needs_a_teacher():
    with pytest.raises(ValueError, match='teacher'):
        DistillationLoss(nn.CrossEntropyLoss(), None, 'soft')


def test_digits_split_is_fixed_and_disjoint():
    train, val = DigitsDataset(train=True), DigitsDataset(train=False)
    assert (len(train), len(val)) == (1437, 360)
    assert train.images.shape[1:] == (3, 32, 32) and set(val.targets.tolist()) == set(range(10))
    again = DigitsDataset(train=False)
    assert torch.equal(again.images, val.images)
    flat_train = {tuple(x.flatten()[::7].tolist()) for x in train.images}
    overlap = sum(tuple(x.flatten()[::7].tolist()) in flat_train for x in val.images)
    assert overlap < 5  # the digits data has a few exact duplicates, no more
    img, target = val[0]
    assert torch.equal(img, val.images[0]) and isinstance(target, int)
    shifted = torch.stack([train[0][0] for _ in range(8)])
    assert not all(torch.equal(shifted[0], s) for s in shifted)  # ±2 px random shifts while training


def _args(**kw):
    base = dict(input_size=224, eval_crop_ratio=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                data_set='IMNET', data_path='', color_jitter=0.3, aa='none', train_interpolation='bicubic',
                reprob=0.0, remode='pixel', recount=1, inat_category='name')
    base.update(kw)
    return argparse.Namespace(**base)


def test_eval_transform_crop_ratio():
    from PIL import Image
    img = Image.new('RGB', (300, 200))
    assert build_transform(False, _args())(img).shape == (3, 224, 224)
    names = [type(t).__name__ for t in build_transform(False, _args()).transforms]
    assert names[:2] == ['Resize', 'CenterCrop']
    resize = build_transform(False, _args()).transforms[0]
    assert resize.size == int(224 / 0.875)
    plain = build_transform(False, _args(eval_crop_ratio=1.0)).transforms
    assert type(plain[1]).__name__ == 'ToTensor' and plain[0].size == (224, 224)
    # at 32 px or less DeiT takes the images as they are (CIFAR): no crop whatever the ratio
    small = build_transform(False, _args(input_size=32, eval_crop_ratio=0.875)).transforms
    assert [type(t).__name__ for t in small] == ['Resize', 'ToTensor', 'Normalize'] and small[0].size == (32, 32)
    cifar_image = Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    deit = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
    assert torch.equal(build_transform(False, _args(input_size=32))(cifar_image), deit(cifar_image))


@pytest.mark.parametrize('side', [16, 32, 64])
def test_small_input_training_crops_the_image_squashed_as_evaluated(side):
    """At 32 px or less DeiT's training crop (4 px padding) reads the image at the scale the evaluation squashes
    it to: CIFAR's 32 px images as they are, others resized first (a smaller one stopped the run, a larger one
    trained on crops of another scale than evaluated)."""
    import random
    from timm.data import create_transform
    args = _args(input_size=32, aa='rand-m9-mstd0.5-inc1', reprob=0.25)
    g = torch.Generator().manual_seed(side)
    img = Image.fromarray(torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=g).numpy())
    deit = create_transform(input_size=32, is_training=True, color_jitter=0.3, auto_augment=args.aa,
                            interpolation='bicubic', re_prob=0.25, re_mode='pixel', mean=args.mean,
                            std=args.std)
    deit.transforms[0] = transforms.RandomCrop(32, padding=4)  # DeiT's build_transform at 32 px
    squashed = img.resize((32, 32), Image.BICUBIC) if side != 32 else img
    ours = build_transform(True, args)

    def seeded(transform, image, seed):  # crops and erasing: Python's random and torch; RandAugment's ops: numpy
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        return transform(image)
    for seed in range(6):
        assert torch.allclose(seeded(ours, img, seed), seeded(deit, squashed, seed), atol=0.02), seed


def test_image_folder_classes(tmp_path):
    root = make_image_folder(tmp_path, classes=('x', 'y'), per_class=(3, 1))
    ds, n = build_dataset(False, _args(data_path=root))
    assert n == 2 and len(ds) == 2 and ds[0][0].shape == (3, 224, 224)


def test_image_folder_reads_the_files_torchvisions_image_folder_reads(tmp_path):
    """The same images, in the same order with the same labels, as DeiT's loader (torchvision's ImageFolder): a
    file named only by its extension (``.png``, which torchvision reads) was left out as having none."""
    from torchvision import datasets
    root = make_image_folder(tmp_path, classes=('x', 'y', 'B', 'a_1', 'Z'), per_class=(2, 2))
    for name in ('.png', 'UPPER.JPEG', 'a.tar.jpg', 'notes.txt', 'anim.gif', 'README'):
        Image.new('RGB', (8, 8)).save(tmp_path / 'val' / 'y' / name, format='PNG')
    ours, n = build_dataset(False, _args(data_path=root))
    assert ours.samples == datasets.ImageFolder(str(tmp_path / 'val')).samples and len(ours) == 13
    # the classes are the folder names sorted by code point (upper case first), each labelled by its place there
    assert n == 5 and ours.classes == ['B', 'Z', 'a_1', 'x', 'y']
    assert [(os.path.basename(os.path.dirname(path)), label) for path, label in ours.samples] == \
        [(name, label) for label, name in enumerate(ours.classes) for _ in range(5 if name == 'y' else 2)]
    assert ours.skipped == {'.txt': 1, '.gif': 1, 'no extension': 1}


def test_a_link_to_a_folder_it_lies_in_is_refused(tmp_path):
    """os.walk, following links as ImageFolder has it, read a class folder's images again at every level of a
    link to a folder it lies in: 41 copies of each, and a note of a file left out."""
    root = make_image_folder(tmp_path, classes=('x', 'y'), per_class=(2, 2))
    (tmp_path / 'val' / 'y' / 'sub').mkdir()
    (tmp_path / 'val' / 'y' / 'sub' / 'again').symlink_to('..')
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_path=root))
    link, target = tmp_path / 'val' / 'y' / 'sub' / 'again', os.path.realpath(tmp_path / 'val' / 'y')
    assert str(e.value) == (f'{link} is a symbolic link to {target}, a folder it lies in: its images would be read '
                            f'again at every level (remove the link)')


def _inaturalist(root, splits, file_name=lambda split, i, category: f'{split}_{i}.jpg', stored=None):
    """Official-format iNaturalist 2018 json files under ``root`` for ``splits`` ({split: category ids, one image
    each}), and the images, saved at ``stored(file_name)`` (default: as listed) with their index as the colour."""
    categories = [{'id': 0, 'name': 'owl', 'kingdom': 'A', 'supercategory': 'Aves'},
                  {'id': 1, 'name': 'cat', 'kingdom': 'A', 'supercategory': 'Mammalia'},
                  {'id': 2, 'name': 'fern', 'kingdom': 'P', 'supercategory': 'Plantae'}]
    (root / 'categories.json').write_text(json.dumps(categories))
    for split, cats in splits.items():
        images, anns = [], []
        for i, c in enumerate(cats):
            name = file_name(split, i, categories[c])
            path = root / (stored or (lambda n: n))(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (20, 20), (10 * i, 0, 0)).save(path)
            images.append({'id': 100 + i, 'file_name': name})
            anns.append({'image_id': 100 + i, 'category_id': c})
        (root / f'{split}2018.json').write_text(json.dumps({'images': images, 'annotations': anns}))


def test_inaturalist_json_layout(tmp_path):
    # training annotations list owl, cat, fern (sorted: cat, fern, owl)
    _inaturalist(tmp_path, {'train': [0, 1, 2, 2], 'val': [2, 0]})
    args = _args(data_set='INAT', data_path=str(tmp_path), input_size=32)
    train, n = build_dataset(True, args)
    val, n_val = build_dataset(False, args)
    assert n == 3 and len(train) == 4
    assert n_val == 3  # the training set's classes, though val2018.json names only two of them
    # DeiT's labels: the order in which the training annotations first name each class
    deit = {'owl': 0, 'cat': 1, 'fern': 2}
    assert train.targets == [deit['owl'], deit['cat'], deit['fern'], deit['fern']]
    assert val.targets == [deit['fern'], deit['owl']]
    image, label = val[1]
    assert label == deit['owl'] and image.shape == (3, 32, 32)
    assert image.equal(build_transform(False, args)(Image.new('RGB', (20, 20), (10, 0, 0))))  # val image 1
    _, kingdoms = build_dataset(True, _args(data_set='INAT', data_path=str(tmp_path), inat_category='kingdom'))
    assert kingdoms == 2


def _official_name(split, i, category):
    return f'train_val2018/{category["supercategory"]}/{category["id"]}/{split}_{i}.jpg'


@pytest.mark.parametrize('deit_layout', [False, True])
def test_inaturalist_images_as_the_archive_or_deit_lays_them_out(tmp_path, deit_layout):
    """The archive's layout (split/supercategory/id/file) and the one DeiT's loader reads (no supercategory
    folder) both load, each image with its own label."""
    without_supercategory = lambda name: '/'.join(name.split('/')[:1] + name.split('/')[2:])  # noqa: E731
    _inaturalist(tmp_path, {'train': [0, 1], 'val': [0, 1, 0]}, file_name=_official_name,
                 stored=without_supercategory if deit_layout else None)
    val, n = build_dataset(False, _args(data_set='INAT', data_path=str(tmp_path), input_size=32))
    folder = tmp_path / 'train_val2018'
    expected = ([folder / '0' / 'val_0.jpg', folder / '1' / 'val_1.jpg', folder / '0' / 'val_2.jpg'] if deit_layout
                else [folder / 'Aves' / '0' / 'val_0.jpg', folder / 'Mammalia' / '1' / 'val_1.jpg',
                      folder / 'Aves' / '0' / 'val_2.jpg'])
    assert [path for path, _ in val.samples] == list(map(str, expected))
    assert n == 2 and val.targets == [0, 1, 0]  # owl first in the training annotations (sorted: cat first)
    pixels = [float(val[i][0][0, 0, 0]) for i in range(3)]
    assert pixels[0] < pixels[1] < pixels[2]  # each read from its own file (red 0, 10, 20)


def test_inaturalist_images_missing_in_both_layouts_is_one_line(tmp_path):
    _inaturalist(tmp_path, {'train': [0], 'val': [0]}, file_name=_official_name, stored=lambda name: 'elsewhere.jpg')
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_set='INAT', data_path=str(tmp_path)))
    listed = tmp_path / 'train_val2018' / 'Aves' / '0' / 'val_0.jpg'
    flat = tmp_path / 'train_val2018' / '0' / 'val_0.jpg'
    assert str(e.value) == (f'the first image {tmp_path / "val2018.json"} lists is not there: no {listed} nor {flat} '
                            f'(the layout without the supercategory folder)')


def test_inaturalist_annotation_problems_name_their_file_and_entry(tmp_path):
    """Each damaged annotation is one line naming the file it is in and the image or category it concerns (a
    KeyError's bare id, or the validation file's name for a problem of the training file's, said neither)."""
    def damaged(edit, name='val2018.json'):
        root = tmp_path / name.replace('.json', '') / str(len(list(tmp_path.iterdir())))
        return _damaged_inaturalist_error(root, name, edit).replace(str(root), 'ROOT')

    assert damaged(lambda d: d['annotations'].pop()) == 'ROOT/val2018.json: image 101 (val_1.jpg) has no annotation'
    assert damaged(lambda d: d['annotations'][1].update(category_id=7), 'train2018.json') == (
        'ROOT/train2018.json: image 101 is annotated with category 7, which ROOT/categories.json does not list')
    assert damaged(lambda d: d['annotations'][1].update(category_id='1'), 'train2018.json') == (  # was 'category 1'
        "ROOT/train2018.json: image 101 is annotated with category '1', which ROOT/categories.json does not list (it "
        "lists 1: a number and a string are different ids)")
    assert damaged(lambda d: d['annotations'].append({'image_id': 100, 'category_id': 1})) == (
        'ROOT/val2018.json: image 100 is annotated twice, as fern and cat')
    assert damaged(lambda d: d[1].pop('name'), 'categories.json') == (
        'ROOT/categories.json: category 1 has no "name" (--inat-category name)')
    assert damaged(lambda d: d.pop('annotations'), 'train2018.json') == (
        'ROOT/train2018.json is not an iNaturalist annotation file: it has no list "annotations"')
    # the same class twice is the same label: read as once
    _inaturalist(tmp_path, {'train': [0, 1, 2], 'val': [2, 0]})
    data = json.loads((tmp_path / 'val2018.json').read_text())
    data['annotations'].append(dict(data['annotations'][0]))
    (tmp_path / 'val2018.json').write_text(json.dumps(data))
    assert build_dataset(False, _args(data_set='INAT', data_path=str(tmp_path)))[0].targets == [2, 0]


def test_inaturalist_ids_and_classes_that_are_lists_or_objects_are_one_line(tmp_path):
    """An id or a class value that is a JSON list or object (a damaged file) was a TypeError traceback
    (unhashable type) wherever it was looked up."""
    cases = [('val2018.json', lambda d: d['images'][0].update(id=[100]), 'val2018.json: the "id" of an image is [100]'),
             ('val2018.json', lambda d: d['annotations'][0].update(image_id=[100]),
              'val2018.json: the "image_id" of an annotation is [100]'),
             ('train2018.json', lambda d: d['annotations'][1].update(category_id={'id': 1}),
              'train2018.json: the "category_id" of an annotation is {\'id\': 1}'),
             ('categories.json', lambda d: d[1].update(id=[1]), 'categories.json: the "id" of a category is [1]'),
             ('categories.json', lambda d: d[2].update(name=['fern']),
              'categories.json: the "name" of category 2 is [\'fern\']')]
    for i, (name, edit, expected) in enumerate(cases):
        root = tmp_path / str(i)
        assert _damaged_inaturalist_error(root, name, edit) == f'{root}/{expected}: not a single value (a number or ' \
                                                               f'a string)'


def test_inaturalist_validation_class_that_prints_as_a_training_one_is_one_line(tmp_path):
    """A validation class the training annotations lack, printed as one of theirs (the string '1' beside the number
    1), passed the check for unseen classes, which compared them as text, and was a KeyError traceback."""
    _inaturalist(tmp_path, {'train': [0, 1], 'val': [2, 0]})
    categories = json.loads((tmp_path / 'categories.json').read_text())
    categories[0]['name'], categories[2]['name'] = 1, '1'
    (tmp_path / 'categories.json').write_text(json.dumps(categories))
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_set='INAT', data_path=str(tmp_path)))
    assert str(e.value) == (f"{tmp_path / 'val2018.json'} has classes (name) that train2018.json does not: '1'; "
                            f'labels are taken from the training annotations')


def _damaged_inaturalist_error(root, name, edit) -> str:
    """The one-line error of the validation set of a small iNaturalist 2018 under ``root`` whose file ``name`` was
    changed by ``edit`` (of its parsed JSON)."""
    root.mkdir(parents=True)
    _inaturalist(root, {'train': [0, 1, 2], 'val': [2, 0]})
    data = json.loads((root / name).read_text())
    edit(data)
    (root / name).write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_set='INAT', data_path=str(root)))
    return str(e.value)


def test_inaturalist_annotation_file_that_cannot_be_read_is_one_line(tmp_path, monkeypatch):
    """An annotation file that is there but cannot be opened (permission denied: faked, as root reads everything)
    was a PermissionError traceback."""
    import builtins
    import datasets
    _inaturalist(tmp_path, {'train': [0, 1], 'val': [1]})
    real_open = builtins.open

    def denied(path, *a, **k):
        if str(path).endswith('categories.json'):
            raise PermissionError(13, 'Permission denied', str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(datasets, 'open', denied, raising=False)
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_set='INAT', data_path=str(tmp_path)))
    assert str(e.value) == f'cannot read {tmp_path / "categories.json"}: permission denied'


def test_inaturalist_annotations_are_read_as_utf8_whatever_the_locale(tmp_path):
    """JSON is UTF-8: under an ASCII locale (C, without Python's coercion to UTF-8) a category name with an accent
    made categories.json 'not valid JSON'."""
    import subprocess
    import sys
    from conftest import ROOT
    _inaturalist(tmp_path, {'train': [0, 1], 'val': [1]})
    categories = json.loads((tmp_path / 'categories.json').read_text())
    categories[0]['name'] = 'Ptérodactyle'
    (tmp_path / 'categories.json').write_text(json.dumps(categories, ensure_ascii=False), encoding='utf-8')
    code = ('import datasets, sys, locale; assert locale.getpreferredencoding(False) != "utf-8"; '
            'print(ascii(datasets._read_json(sys.argv[1])[0]["name"]))')
    env = {'PATH': '/usr/bin:/bin', 'LC_ALL': 'C', 'PYTHONCOERCECLOCALE': '0', 'PYTHONUTF8': '0', 'PYTHONPATH': ROOT}
    done = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'categories.json')], env=env,
                          capture_output=True, text=True, errors='replace')
    assert done.returncode == 0 and done.stdout.strip() == ascii('Ptérodactyle'), done.stderr


def test_inaturalist_annotations_nested_too_deep_are_one_error(tmp_path):
    """An annotation file of JSON nested thousands deep ended in json.load's RecursionError traceback."""
    import datasets
    path = tmp_path / 'train2018.json'
    path.write_text('[' * 100000 + ']' * 100000)
    with pytest.raises(UserError, match='nested too deep'):
        datasets._read_json(str(path))


def _cifar100(root, sizes=(('train', 5), ('test', 3))):
    """CIFAR-100's python files (torchvision's format, random pixels) under root/cifar-100-python; returns the
    arrays written: {split: (data (n, 3072) uint8, fine labels)}."""
    import pickle
    import numpy as np
    folder = root / 'cifar-100-python'
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for split, n in sizes:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, n)]
        (folder / split).write_bytes(pickle.dumps({'data': data, 'fine_labels': labels, 'coarse_labels': [0] * n}))
        written[split] = data, labels
    (folder / 'meta').write_bytes(pickle.dumps({'fine_label_names': [f'c{i}' for i in range(100)],
                                                'coarse_label_names': [f'g{i}' for i in range(20)]}))
    return written


def test_cifar100_reads_the_python_files_with_their_fine_labels(tmp_path, monkeypatch):
    import numpy as np
    import torchvision.datasets.cifar as cifar
    written = _cifar100(tmp_path)
    monkeypatch.setattr(cifar, 'check_integrity', lambda *a, **k: True)  # these are not the official files
    args = _args(data_set='CIFAR', data_path=str(tmp_path), input_size=32, eval_crop_ratio=1.0)
    val, n = build_dataset(False, args)
    train, _ = build_dataset(True, args)
    assert n == 100 and (len(train), len(val)) == (5, 3)
    data, labels = written['test']
    assert val.targets == labels and train.targets == written['train'][1]
    image, label = val[2]
    pixels = torch.from_numpy(data[2].reshape(3, 32, 32).astype(np.float32) / 255)
    assert label == labels[2] and torch.allclose(image, (pixels - 0.5) / 0.5, atol=1e-6)  # CHW, as the file has it
    assert train[0][0].shape == (3, 32, 32)


def test_cifar100_that_fails_the_checksums_is_one_line(tmp_path):
    _cifar100(tmp_path)  # right names, not the official bytes
    with pytest.raises(UserError) as e:
        build_dataset(False, _args(data_set='CIFAR', data_path=str(tmp_path), input_size=32))
    assert str(e.value) == (f'CIFAR-100 under {tmp_path} is unreadable: train, test or meta in cifar-100-python/ is '
                            f'missing or not the official file (torchvision checks their md5 sums)')
    (tmp_path / 'cifar-100-python' / 'test').unlink()
    with pytest.raises(UserError, match=r'^CIFAR-100 not found: expected .*cifar-100-python/test \(the python '):
        build_dataset(False, _args(data_set='CIFAR', data_path=str(tmp_path), input_size=32))


def test_distributed_eval_sampler_covers_each_image_once():
    data = list(range(11))
    parts = [list(DistributedEvalSampler(data, 3, r)) for r in range(3)]
    assert sorted(sum(parts, [])) == data


def test_repeated_augmentation_sampler():
    data = list(range(512))
    samplers = [RASampler(data, 2, r, shuffle=True, repeats=3, seed=0) for r in range(2)]
    parts = [list(s) for s in samplers]
    assert all(len(p) == len(s) == 256 for p, s in zip(parts, samplers))
    counts = torch.bincount(torch.tensor(sum(parts, [])), minlength=512)
    assert counts.max() == 3  # an image appears up to 3 times per epoch, on different processes
    assert all(i in parts[0] and i in parts[1] for i in range(512) if counts[i] > 1)
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != parts[0]


def test_repeated_augmentation_sampler_without_shuffling_keeps_the_data_sets_order():
    """shuffle=False: the copies of image 0, then of image 1, ... dealt out to the processes in turn, the same
    every epoch."""
    for rank in range(2):
        sampler = RASampler(list(range(10)), 2, rank, shuffle=False, repeats=3, seed=4)
        expected = [0, 0, 1, 2, 2] if rank == 0 else [0, 1, 1, 2, 3]  # of 0 0 0 1 1 1 2 2 2 3 ..., every other one
        assert list(sampler) == expected
        sampler.set_epoch(5)
        assert list(sampler) == expected


def test_a_16_bit_png_is_read_at_its_brightness(tmp_path):
    """Pillow's convert('RGB') clips a 16-bit grey image at 255: a gradient came out all but white."""
    import numpy as np
    from PIL import Image
    from datasets import load_rgb
    grey = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(grey).save(tmp_path / 'deep.png')
    assert Image.open(tmp_path / 'deep.png').mode.startswith('I;16')
    rgb = np.asarray(load_rgb(str(tmp_path / 'deep.png')))
    assert rgb.shape == (64, 64, 3) and (rgb == (grey >> 8)[:, :, None]).all()


@pytest.mark.parametrize('maxval', [65535, 1023])
def test_a_pgm_of_more_than_8_bits_is_read_at_its_brightness(tmp_path, maxval):
    """A grey PGM (an extension ImageFolder reads) with a maxval above 255 opens in Pillow as mode I: it was refused
    as '32-bit integers ... convert it to 8 or 16 bits', though it holds 16 bits at most."""
    from datasets import load_rgb
    grey = (np.arange(48 * 40).reshape(48, 40) * 37 % (maxval + 1)).astype(np.uint16)
    path = tmp_path / 'deep.pgm'
    path.write_bytes(b'P5 40 48 %d\n' % maxval + grey.astype('>u2').tobytes())
    rgb = np.asarray(load_rgb(str(path)))
    sixteen_bits = np.round(grey.astype(np.float64) / maxval * 65535).astype(np.uint16)  # the netpbm scale
    assert rgb.shape == (48, 40, 3) and (rgb == (sixteen_bits >> 8)[:, :, None]).all() and rgb.max() > 250


def test_32_bit_integer_and_float_images_are_refused_by_name(tmp_path):
    """Pillow's convert('RGB') clips mode I and F images at 255 (a float image in [0, 1] came out black, without a
    word): they have no range to map to 8 bits, so reading one is a one-line error naming the file."""
    import numpy as np
    from PIL import Image
    from datasets import BadImageError, load_rgb
    assert not np.asarray(Image.fromarray(np.full((8, 8), 0.5, np.float32)).convert('RGB')).any()  # (the clipping)
    for name, array, kind in (('float.tif', np.full((8, 8), 0.5, np.float32), 'floats'),
                              ('int.tif', np.full((8, 8), 70000, np.int32), 'integers')):
        Image.fromarray(array).save(tmp_path / name)
        with pytest.raises(BadImageError, match=rf'^cannot read image {re.escape(str(tmp_path / name))}: its pixels '
                                                rf'are 32-bit {kind} \(mode [IF]\), which have no fixed range'):
            load_rgb(str(tmp_path / name))


def test_an_image_is_looked_up_once_by_path_and_what_is_no_file_is_named(tmp_path, monkeypatch):
    """One lookup of the path per image (a stat before opening was a second one, paid per image and epoch on a
    network file system); a named pipe, a device and a socket are still refused by name at once, and every file
    opened is closed."""
    import socket
    import stat as stat_module
    import datasets
    from PIL import Image
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(tmp_path / 'ok.png')
    os.mkfifo(tmp_path / 'pipe.png')
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(tmp_path / 'sock.png'))
    assert stat_module.S_ISSOCK(os.stat(tmp_path / 'sock.png').st_mode)
    opened, closed, stats = [], [], []
    real_open, real_close, real_stat = os.open, os.close, os.stat
    ours = (str(tmp_path), '/dev/zero')

    def counted_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        if str(path).startswith(ours):
            opened.append(fd)
        return fd

    def counted_stat(path, *args, **kwargs):
        if str(path).startswith(ours):
            stats.append(path)
        return real_stat(path, *args, **kwargs)

    blocking = []
    real_image_open = Image.open
    monkeypatch.setattr(Image, 'open', lambda f, *a, **k: blocking.append(os.get_blocking(f.fileno()))
                        or real_image_open(f, *a, **k))
    # (os is one module: these are seen by everything, so only the test's own paths are counted)
    monkeypatch.setattr(os, 'open', counted_open)
    monkeypatch.setattr(os, 'stat', counted_stat)
    monkeypatch.setattr(os, 'close', lambda fd: (closed.append(fd) if fd in opened else None) or real_close(fd))
    try:
        assert np.asarray(datasets.load_rgb(str(tmp_path / 'ok.png'))).reshape(-1).tolist() == list(range(48))
        for name in ('pipe.png', 'sock.png', '/dev/zero'):
            path = name if name.startswith('/') else str(tmp_path / name)
            with pytest.raises(datasets.BadImageError, match=rf'^cannot read image {re.escape(path)}: not a regular '
                                                             rf'file \(a device, a pipe or a socket\)$'):
                datasets.load_rgb(path)
        with pytest.raises(datasets.BadImageError, match=r'No such file or directory'):
            datasets.load_rgb(str(tmp_path / 'gone.png'))
    finally:
        server.close()
    assert stats == []
    assert blocking == [True]  # the image read from a file whose O_NONBLOCK was cleared (only ok.png got there)
    assert len(opened) == 3  # ok.png, the pipe, /dev/zero (a socket cannot be opened, nor a missing file)
    assert closed == opened[1:]  # the refused ones closed at once; ok.png's by its file object, so none is open:
    for fd in set(opened):
        with pytest.raises(OSError):
            os.fstat(fd)


def test_repeated_augmentation_sampler_gives_every_process_its_length_even_with_more_processes_than_copies():
    """Every process must draw the samples its length promises (a process without batches skips the epoch's
    collectives, and the job hangs), also where the copies of a tiny training set are fewer than the processes;
    where one pass of padding suffices, the order is DeiT's (repeat each shuffled index, pad with the first ones,
    take every num_replicas-th)."""
    for n in range(1, 6):
        for world in range(1, 17):
            parts = [list(RASampler(list(range(n)), world, r, shuffle=True, repeats=3, seed=5)) for r in range(world)]
            promised = len(RASampler(list(range(n)), world, 0, repeats=3))
            # fewer than 256 images, where DeiT's rule selects none: about the training set per epoch in all
            assert promised == -(-n // world), (n, world)
            assert [len(p) for p in parts] == [promised] * world, (n, world)
            assert all(0 <= i < n for p in parts for i in p)
            copies = [i for i in torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
                      for _ in range(3)]
            total = -(-3 * n // world) * world
            if total - len(copies) <= len(copies):  # DeiT's own padding
                padded = copies + copies[:total - len(copies)]
                assert parts == [padded[r::world][:promised] for r in range(world)], (n, world)


def deit_ra_sampler(n, world, rank, epoch, seed, repeats=3):
    """DeiT's RASampler.__iter__ written out (its seed offset by the run's --seed, as here): each index of a shuffle
    repeated, padded with the first ones to a multiple of the processes, every world-th taken, and only
    floor(n // 256 * 256 / world) of them kept."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = [i for i in torch.randperm(n, generator=g).tolist() for _ in range(repeats)]
    num_samples = int(math.ceil(n * repeats / world))
    total = num_samples * world
    indices += indices[:total - len(indices)]
    return indices[rank:total:world][:int(math.floor(n // 256 * 256 / world))]


@pytest.mark.parametrize('n, world', [(256, 1), (300, 2), (600, 2), (1000, 3), (700, 8), (256, 3), (512, 3)])
def test_repeated_augmentation_sampler_draws_deits_samples(n, world):
    """From 256 images up, each process draws DeiT's samples, epoch by epoch: its number of them is rounded down
    to a multiple of 256 images over all processes (300 images on 2 processes: 128 each, not 150), and that share
    rounded down where the processes do not divide it (512 images on 3 processes: 170 each, not 171)."""
    for epoch in (0, 1):
        for rank in range(world):
            sampler = RASampler(list(range(n)), world, rank, shuffle=True, repeats=3, seed=7)
            sampler.set_epoch(epoch)
            expected = deit_ra_sampler(n, world, rank, epoch, seed=7)
            assert len(sampler) == len(expected) == n // 256 * 256 // world
            assert list(sampler) == expected, (n, world, rank, epoch)
