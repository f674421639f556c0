"""Data sets and transforms: ImageNet folders, CIFAR-100 on disk, iNaturalist 2018/2019, and scikit-learn's
digits (the mini reproduction). Every missing or unreadable input becomes a one-line :class:`UserError`.  And the
loaders a run reads them with (:func:`data_loader`: samplers, seeded shuffles, workers that stop quietly)."""
import errno
import functools
import itertools
import json
import multiprocessing
import os
import stat
import sys
import time
import unicodedata
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from samplers import DistributedEvalSampler, RASampler
from utils import UserError, few_names, one_line, print_line, rank0_print, seeding
from utils.signals import sigterm_held, worker_stops_quietly_on_sigterm

DATA_SETS = ('IMNET', 'CIFAR', 'INAT', 'INAT19', 'DIGITS')
INATURALIST = ('INAT', 'INAT19')  # 2018 and 2019, whose --inat-category chooses what a label is
# DeiT's small-image rule (CIFAR's 32 px): at an input this size or less, training crops with padding instead of
# a random resized crop, and evaluation takes the images as they are (no crop).
SMALL_INPUT = 32


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB, turning decoder failures into an error that names the file (and one that is not a
    regular file: a named pipe called x.png was opened and waited on for ever)."""
    not_regular = f'cannot read image {path}: not a regular file (a device, a pipe or a socket)'
    try:  # One lookup of the path per image (data sets on network file systems pay for each): opened without
        # waiting (O_NONBLOCK: a pipe's open returns at once), then what was opened is looked at.
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    except OSError as e:
        if e.errno == errno.ENXIO:  # (a socket cannot be opened at all)
            raise BadImageError(not_regular) from None
        raise BadImageError(f'cannot read image {path}: {e}') from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            os.set_blocking(fd, True)  # (a regular file's reads ignore O_NONBLOCK; cleared so no file system sees it)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise BadImageError(not_regular)
    try:
        with open(fd, 'rb') as f:
            img = Image.open(f)
            # 16-bit: convert() clips at 255, so nearly all white.  (Pillow opens a grey PGM of more than 8 bits
            # as mode I, its values scaled to 0..65535: 16 bits too.)
            if img.mode in ('I;16', 'I;16B', 'I;16L') or (img.mode == 'I' and img.format == 'PPM'):
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            if img.mode in ('I', 'F'):  # convert() clips these at 255 too: a float image in [0, 1] comes out black
                kind = 'floats' if img.mode == 'F' else 'integers'
                raise BadImageError(f'cannot read image {path}: its pixels are 32-bit {kind} (mode {img.mode}), '
                                    f'which have no fixed range to map to 8-bit RGB: convert it to 8 or 16 bits')
            return img.convert('RGB')
    except UnidentifiedImageError:  # its own message repeats the path as '<_io.BufferedReader name=...>'
        raise BadImageError(f'cannot read image {path}: not an image, or a format Pillow cannot decode') from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # (the last: past Pillow's limit)
        raise BadImageError(f'cannot read image {path}: {e}') from None


# ----------------------------------------------------------------------------------------------------------
# transforms

def _posterize_keeping_zero_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, where keeping 0 bits gives a black image as it did with Pillow < 12.

    DeiT's default ``--aa rand-m9-mstd0.5-inc1`` uses "PosterizeIncreasing", which asks for 0 bits whenever the
    sampled magnitude reaches 10 (about 2% of the calls at m9, mstd 0.5); Pillow 12+ refuses that with
    ``ValueError: bits must be between or equal to 1 and 8``, which stopped finetuning at a random step.
    """
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform) -> list:
    """The ops of this transform's auto-augmentation (timm's AugmentOp instances)."""
    ops = []
    for t in getattr(transform, 'transforms', []):
        ops.extend(getattr(t, 'ops', []))  # RandAugment, AugMixAugment
        for sub_policy in getattr(t, 'policy', []):  # AutoAugment
            ops.extend(sub_policy)
    return ops


def _keep_zero_bit_posterize(transform) -> None:
    """Give the posterize ops of this transform's auto-augmentation the zero-bit fix, on these instances only
    (timm's own op table stays as it is)."""
    from timm.data import auto_augment
    for op in _augment_ops(transform):
        if getattr(op, 'aug_fn', None) is auto_augment.posterize:
            op.aug_fn = _posterize_keeping_zero_bits


def build_transform(is_train: bool, args):
    """DeiT's training transform; at an input of 32 px or less its crop with 4 px of padding, taken after the
    squash to input x input that the evaluation makes there (a no-op for images of the input's size, CIFAR's), so
    that images of another size train at the scale they are evaluated at (and smaller ones do not stop the run).
    Evaluation: ``--eval-crop-ratio`` 1.0 (the default) squashes the whole image to input x input (bicubic), as the
    original code evaluated; a ratio below 1 resizes the shorter side to input/ratio, then crops the centre (DeiT:
    0.875), except at an input of 32 px or less, where DeiT takes the images as they are (CIFAR's): no crop there,
    the squash (a no-op for images of the input's size)."""
    size = args.input_size
    mean, std = args.mean, args.std
    squash = transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC)  # the whole image, input x input
    if is_train:
        from timm.data import create_transform
        t = create_transform(
            input_size=size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in (None, '', 'none') else args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std,
        )
        _keep_zero_bit_posterize(t)
        if size <= SMALL_INPUT:  # the evaluation's squash first: crops of images at the scale evaluated, any size
            t.transforms[0:1] = [squash, transforms.RandomCrop(size, padding=4)]
        return t
    if size <= SMALL_INPUT or args.eval_crop_ratio >= 1.0:
        resize = [squash]
    else:
        resize = [transforms.Resize(int(size / args.eval_crop_ratio), interpolation=InterpolationMode.BICUBIC),
                  transforms.CenterCrop(size)]
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(mean, std)])


def check_training_transform(args, unused: Collection[str] = ()) -> None:
    """The training transform's strings (``--aa``, ``--train-interpolation``, ``--remode``) read as timm reads them,
    before any work: a mistyped one is a one-line error here, not a traceback when the first image loads.  Those
    in ``unused`` (destinations the run does not use: finetune.unused_flags) are neither read nor checked."""
    from timm.data import create_transform
    from timm.data.transforms import str_to_interp_mode
    if 'train_interpolation' not in unused and args.train_interpolation != 'random':
        try:
            str_to_interp_mode(args.train_interpolation)
        except KeyError:
            raise UserError(f'--train-interpolation {args.train_interpolation}: not an interpolation timm knows '
                            f'(bicubic, bilinear, nearest, ..., or random)') from None
    if 'remode' not in unused and args.remode not in ('pixel', 'rand', 'const'):
        raise UserError(f'--remode {args.remode}: random erasing fills with pixel, rand or const')
    if 'aa' in unused or args.aa in (None, '', 'none'):
        return
    policy, *sections = args.aa.split('-')
    # timm skips a section without a number, in every policy it knows (AutoAugment's mstd too): refuse it instead
    if policy in ('rand', 'augmix', 'original', 'originalr', 'v0', 'v0r', '3a'):
        bare = [part for part in sections if not any(ch.isdigit() for ch in part)]
        if bare:
            raise UserError(f'--aa {args.aa}: section {bare[0]!r} has no value (each is a name and a number, as in '
                            f'rand-m9-mstd0.5-inc1)')
    interpolation = 'random' if 'train_interpolation' in unused else args.train_interpolation
    try:
        t = create_transform(input_size=32, is_training=True, auto_augment=args.aa, interpolation=interpolation)
    except (AssertionError, KeyError, ValueError) as e:
        why = str(e) or ('a policy is rand-<sections>, augmix-<sections>, or AutoAugment\'s original, originalr, '
                         'v0, v0r or 3a')  # (timm's bare assertion on the name before the first '-')
        raise UserError(f'--aa {args.aa}: timm cannot read this augmentation policy ({why})') from None
    # AugMix draws its mixing weights from Dirichlet(alpha) and Beta(alpha, alpha) at every image: timm takes an
    # alpha of 0 here and numpy refused it at the first training image, in a traceback
    from timm.data import auto_augment
    alpha = next((op.alpha for op in t.transforms if isinstance(op, auto_augment.AugMixAugment)), None)
    if alpha is not None and not alpha > 0:
        raise UserError(f'--aa {args.aa}: AugMix\'s alpha (section a) must be positive, got {alpha:g}')
    # timm's rotations, shears and translations resample with --train-interpolation, and Pillow's affine
    # transforms take only nearest, bilinear and bicubic: box, hamming or lanczos failed at the first such op
    geometric = {getattr(auto_augment, name) for name in ('rotate', 'shear_x', 'shear_y', 'translate_x_rel',
                                                          'translate_y_rel', 'translate_x_abs', 'translate_y_abs')}
    affine = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
    resamples = [op.kwargs.get('resample') for op in _augment_ops(t) if getattr(op, 'aug_fn', None) in geometric]
    if any(not isinstance(r, (list, tuple)) and r not in affine for r in resamples):  # (a list: random's choice)
        raise UserError(f'--train-interpolation {args.train_interpolation}: --aa {args.aa} rotates, shears and '
                        f'translates images with it, which Pillow does only with nearest, bilinear or bicubic '
                        f'(or random)')


# ----------------------------------------------------------------------------------------------------------
# data sets

def build_dataset(is_train: bool, args) -> Tuple[Dataset, int]:
    """Return ``(dataset, nb_classes)`` for ``args.data_set``; the split is train/ or val/."""
    name = args.data_set
    if name == 'DIGITS':
        return DigitsDataset(train=is_train), 10
    transform = build_transform(is_train, args)
    check_split(is_train, args)
    root = args.data_path
    if name == 'IMNET':
        ds = image_folder(os.path.join(root, 'train' if is_train else 'val'), transform)
        return ds, len(ds.classes)
    if name == 'CIFAR':
        try:
            return datasets.CIFAR100(root, train=is_train, transform=transform, download=False), 100
        except Exception as e:  # noqa: BLE001  (torchvision checks every file's md5 first, then unpickles them)
            why = ('train, test or meta in cifar-100-python/ is missing or not the official file (torchvision checks '
                   'their md5 sums)' if 'corrupted' in str(e) else one_line(e))
            raise UserError(f'CIFAR-100 under {root} is unreadable: {why}') from None
    if name in INATURALIST:
        year = 2018 if name == 'INAT' else 2019
        ds = INatDataset(root, train=is_train, year=year, category=args.inat_category, transform=transform)
        return ds, ds.nb_classes
    raise UserError(f'unknown --data-set {name}; choose one of {", ".join(DATA_SETS)}')


def check_data_path(args) -> None:
    """The --data-path of a data set read from files (all but DIGITS): given, and a directory."""
    if args.data_set == 'DIGITS':
        return
    if not args.data_path:
        raise UserError(f'--data-path is required for --data-set {args.data_set}')
    if not os.path.isdir(args.data_path):
        raise UserError(f'--data-path {args.data_path} does not exist or is not a directory')
    if not os.access(args.data_path, os.X_OK):  # (nothing in it can be reached: each split was "not found")
        raise UserError(f'cannot read --data-path {args.data_path}: permission denied')


def check_split(is_train: bool, args) -> None:
    """What :func:`build_dataset` checks before it lists anything: the data path, and the split's folder (IMNET)
    or file (CIFAR).  A run that needs both splits checks both first, so a missing one is said before the other
    is listed (minutes on ImageNet).  (DIGITS has no files; iNaturalist's validation set reads both json files.)"""
    check_data_path(args)
    name, root = args.data_set, args.data_path
    if name == 'IMNET':
        split = os.path.join(root, 'train' if is_train else 'val')
        if not os.path.isdir(split):
            found = f'split {split} is not a directory' if os.path.exists(split) else f'split not found: {split}'
            raise UserError(f'{found} (expected one folder per class inside)')
    elif name == 'CIFAR':
        folder = os.path.join(root, 'cifar-100-python')
        marker = os.path.join(folder, 'train' if is_train else 'test')
        if os.path.isdir(folder) and not os.access(folder, os.X_OK):
            raise UserError(f'cannot read {folder}: permission denied')
        if not os.path.isfile(marker):
            raise UserError(f'CIFAR-100 not found: expected {marker} (the python version of CIFAR-100, '
                            f'unpacked; nothing is downloaded)')


def class_folders(split: str):
    """The class names an ImageFolder of ``split`` would have (its sorted sub-folders), without scanning the
    images; None if there is no such folder."""
    if not os.path.isdir(split):
        return None
    return _top_listing(split)[0]


def _top_listing(split: str) -> Tuple[List[str], int]:
    """From one listing of ``split`` alone: its sub-folders (the class names, sorted) and the number of image
    files lying directly in it, which an ImageFolder does not read (only the files of its class folders)."""
    try:
        folders, loose = [], 0
        for entry in os.scandir(split):
            if entry.is_dir():
                folders.append(entry.name)
            elif _is_image_name(entry.name) and entry.is_file():
                loose += 1
        return sorted(folders), loose
    except OSError as e:
        raise UserError(f'cannot read {split}: {_why(e)}') from None


def _why(e: OSError) -> str:
    """An error of reading a folder or a file, as the refusals of this module say it ('permission denied')."""
    return 'permission denied' if isinstance(e, PermissionError) else e.strerror or str(e)


def _is_image_name(name: str) -> bool:
    """torchvision's rule (by the end of the name, as it reads it: a file named .png too), less macOS's ._*."""
    return not name.startswith('._') and datasets.folder.has_file_allowed_extension(name,
                                                                                   datasets.folder.IMG_EXTENSIONS)


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, whose listing refuses a folder it cannot read inside a class folder: torchvision's
    os.walk passes over it, and its images, without a word.  The same samples in the same order otherwise."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        def unreadable(e: OSError):
            raise UserError(f'cannot read {e.filename}: {_why(e)}')
        samples, found = [], set()
        for name in sorted(class_to_idx):
            for root, folders, files in sorted(os.walk(os.path.join(directory, name), onerror=unreadable,
                                                       followlinks=True)):
                _refuse_a_loop(root, folders)
                for file in sorted(files):
                    if is_valid_file(os.path.join(root, file)):
                        samples.append((os.path.join(root, file), class_to_idx[name]))
                        found.add(name)
        empty = set(class_to_idx) - found
        if empty and not allow_empty:  # (torchvision's words)
            raise FileNotFoundError(f'Found no valid file for the classes {", ".join(sorted(empty))}. ')
        return samples


def _refuse_a_loop(root: str, folders: List[str]) -> None:
    """A symbolic link among ``folders`` (of ``root``) to a folder it lies in: os.walk, following links, read that
    folder's images again at every level, until the path had 40 links (41 copies of each, and a file left out)."""
    for name in folders:
        link = os.path.join(root, name)
        if os.path.islink(link):
            target, here = os.path.realpath(link), os.path.realpath(root)
            if os.path.commonpath([target, here]) == target:
                raise UserError(f'{link} is a symbolic link to {target}, a folder it lies in: its images would be '
                                f'read again at every level (remove the link)')


def image_folder(split: str, transform) -> datasets.ImageFolder:
    """An ImageFolder whose unreadable, empty or class-less split is reported as a one-line error (a missing one
    is said by :func:`check_split`, before anything is listed); images lying directly in the split (not in a
    class folder) are counted for a note, or refused when there is no class folder at all (a flat val/, as
    ImageNet's comes before it is sorted)."""
    if not os.access(split, os.R_OK | os.X_OK):
        raise UserError(f'cannot read {split}: permission denied')
    classes, loose = _top_listing(split)
    unreadable = next((c for c in classes if not os.access(os.path.join(split, c), os.R_OK | os.X_OK)), None)
    if unreadable:
        raise UserError(f'cannot read {os.path.join(split, unreadable)}: permission denied')
    if loose and not classes:
        raise UserError(f'no class folder in {split}: its {_images_lie(loose)} directly in it, and images must be '
                        f'sorted into one folder per class (the folder\'s name is the label)')
    skipped: Dict[str, int] = {}

    def is_image(path: str) -> bool:  # torchvision's rule (its extensions), with what it leaves out counted
        if os.path.basename(path).startswith('._'):  # macOS's metadata beside each file copied from a Mac
            skipped[APPLE_DOUBLE] = skipped.get(APPLE_DOUBLE, 0) + 1  # (torchvision reads it, and the run stops)
            return False
        if _is_image_name(os.path.basename(path)):
            return True
        extension = os.path.splitext(path)[1].lower()
        skipped[extension or 'no extension'] = skipped.get(extension or 'no extension', 0) + 1
        return False
    try:
        folder = _ImageFolder(split, transform=transform, loader=load_rgb, is_valid_file=is_image)
    except FileNotFoundError as e:  # (no class folder, or one without an image it reads)
        why = str(e).splitlines()[0].strip()
        if skipped:  # files are there, of extensions ImageFolder does not read (.gif, .jfif, ...): say so
            why += (f' ({_kinds(skipped)} left out: the extensions read are '
                    f'{" ".join(datasets.folder.IMG_EXTENSIONS)})')
        if loose:  # beside class folders that hold none: the images are there, outside them
            why += f' ({_images_lie(loose)} directly in the split, not in a class folder)'
        raise UserError(f'no images in {split}: {why}') from None
    folder.skipped = skipped  # {extension: files} left out, for the run to say
    folder.loose = loose  # images directly in the split, not in a class folder: not read
    return folder


APPLE_DOUBLE = '._*'  # macOS's AppleDouble files (._name.JPEG): metadata, not images, whatever their extension


def skipped_files_note(dataset) -> Optional[str]:
    """The ``note:`` for the files of an image folder's class folders that are not read (an extension
    torchvision's ImageFolder does not take: .gif, .jfif, .txt, ...; macOS's ._* metadata files), or None."""
    skipped = getattr(dataset, 'skipped', None)
    if not skipped:
        return None
    n = sum(skipped.values())
    files, are, their = ('file', 'is', 'its') if n == 1 else ('files', 'are', 'their')
    reasons = []
    if set(skipped) - {APPLE_DOUBLE}:
        reasons.append(f'{their} extension is not one of {" ".join(datasets.folder.IMG_EXTENSIONS)}')
    if APPLE_DOUBLE in skipped:
        reasons.append('it is a metadata file macOS writes beside a copied file' if n == 1 else
                       'they are the metadata files macOS writes beside copied files')
    return (f'note: {n} {files} in the class folders of {dataset.root} {are} left out: '
            f'{", or ".join(reasons)} ({_kinds(skipped)})')


def _images_lie(n: int) -> str:
    """'1 image lies' or 'n images lie': the images lying directly in a split, in the refusals that count them."""
    return f'{n} image lies' if n == 1 else f'{n} images lie'


def loose_images_note(dataset) -> Optional[str]:
    """The ``note:`` for the images lying directly in an image folder's split, beside its class folders (which
    an ImageFolder reads, not them), or None."""
    loose = getattr(dataset, 'loose', 0)
    if not loose:
        return None
    files, are = ('image file', 'is') if loose == 1 else ('image files', 'are')
    return f'note: {loose} {files} directly in {dataset.root} {are} not in a class folder and not used'


def _kinds(skipped: Dict[str, int]) -> str:
    """'3 .gif, 1 .txt': the files left out, by extension, most first."""
    return ', '.join(f'{n} {extension}' for extension, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))


class INatDataset(Dataset):
    """iNaturalist 2018/2019 from the official json files; classes at the level ``category`` (e.g. 'name').

    Labels are those DeiT's loader gives, so that the heads of checkpoints finetuned with it (the original Clip &
    Concat code among them) line up: a class's label is the order in which its ``category`` value first appears
    among the annotations of train{year}.json, not its rank in a sorted list.  Images are read at
    ``root/<file_name>``, the official archives' layout (``train_val2018/<supercategory>/<id>/<file>.jpg``), or,
    when that does not hold the first image, at the layout DeiT's loader reads, without the supercategory folder
    (``train_val2018/<id>/<file>.jpg``).  If neither holds it, a one-line error says so here, before any work."""

    def __init__(self, root: str, train: bool, year: int, category: str, transform=None):
        self.root, self.transform = root, transform
        ann_path = os.path.join(root, f'{"train" if train else "val"}{year}.json')
        cat_path = os.path.join(root, 'categories.json')
        data = _read_json(ann_path)
        cat_value = _inat_category_values(_read_json(cat_path), category, cat_path)
        train_path = os.path.join(root, f'train{year}.json')
        # Class ids are assigned from the training annotations, in order of first appearance, so train and val
        # agree and the labels are DeiT's.
        train_data = data if train else _read_json(train_path)
        values = list(dict.fromkeys(_inat_labels(train_data, cat_value, train_path, cat_path).values()))
        by_image = _inat_labels(data, cat_value, ann_path, cat_path)
        index = {v: i for i, v in enumerate(values)}
        # (a value printed as a training one is another type: the number 1 and the string '1', shown as such)
        named = set(map(str, values))
        unseen = sorted({repr(v) if str(v) in named else str(v) for v in by_image.values()
                         if v not in index or str(v) not in named})
        if unseen:
            shown = ', '.join(unseen[:5]) + (f' (+{len(unseen) - 5} more)' if len(unseen) > 5 else '')
            raise UserError(f'{ann_path} has classes ({category}) that train{year}.json does not: {shown}; '
                            f'labels are taken from the training annotations')
        files = []
        for img in _inat_list(data, 'images', ann_path):
            if not isinstance(img, dict) or 'id' not in img or not isinstance(img.get('file_name'), str):
                raise UserError(f'{ann_path}: an entry of "images" without an "id" and a "file_name": {img!r:.80}')
            if _json_key(img['id'], f'{ann_path}: the "id" of an image') not in by_image:
                raise UserError(f'{ann_path}: image {img["id"]} ({img["file_name"]}) has no annotation')
            files.append((img['file_name'], index[by_image[img['id']]]))
        if not files:
            raise UserError(f'no images listed in {ann_path}')
        without_supercategory = _inat_layout(root, files[0][0], ann_path)
        self.samples = [(_inat_image_path(root, name, without_supercategory), target) for name, target in files]
        self.nb_classes = len(values)
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, target = self.samples[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), target


def _inat_list(data, key: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise UserError(f'{path} is not an iNaturalist annotation file: it has no list "{key}"')
    return data[key]


def _inat_category_values(categories, category: str, path: str) -> dict:
    """categories.json as {category id: its value at the level ``category`` (--inat-category)}."""
    if not isinstance(categories, list):
        raise UserError(f'{path} is not iNaturalist\'s category list')
    values = {}
    for c in categories:
        if not isinstance(c, dict) or 'id' not in c:
            raise UserError(f'{path}: an entry without an "id": {c!r:.80}')
        if category not in c:
            raise UserError(f'{path}: category {c["id"]} has no "{category}" (--inat-category {category})')
        values[_json_key(c['id'], f'{path}: the "id" of a category')] = _json_key(
            c[category], f'{path}: the "{category}" of category {c["id"]}')
    return values


def _inat_labels(data, cat_value: dict, path: str, cat_path: str) -> dict:
    """{image id: its class (the category's value)} from the annotations of ``data`` (in their order); an image
    annotated with two classes, or with a category id categories.json does not list, is an error."""
    labels = {}
    for a in _inat_list(data, 'annotations', path):
        if not isinstance(a, dict) or 'image_id' not in a or 'category_id' not in a:
            raise UserError(f'{path}: an annotation without an "image_id" and a "category_id": {a!r:.80}')
        _json_key(a['image_id'], f'{path}: the "image_id" of an annotation')
        if _json_key(a['category_id'], f'{path}: the "category_id" of an annotation') not in cat_value:
            twin = next((c for c in cat_value if str(c) == str(a['category_id'])), None)
            raise UserError(f'{path}: image {a["image_id"]} is annotated with category {a["category_id"]!r}, which '
                            f'{cat_path} does not list' + (f' (it lists {twin!r}: a number and a string are different '
                                                           f'ids)' if twin is not None else ''))
        value = cat_value[a['category_id']]
        if labels.setdefault(a['image_id'], value) != value:
            raise UserError(f'{path}: image {a["image_id"]} is annotated twice, as {labels[a["image_id"]]} and '
                            f'{value}')
    return labels


def _json_key(value, what: str):
    """``value``, an id or a class, which must be a single value (a list or an object cannot be looked up)."""
    if isinstance(value, (list, dict)):
        raise UserError(f'{what} is {value!r:.60}: not a single value (a number or a string)')
    return value


def _inat_image_path(root: str, file_name: str, without_supercategory: bool) -> str:
    """Where an image listed as ``file_name`` (split/supercategory/id/file) is: under ``root`` as listed, or, in
    the layout DeiT's loader reads, without the supercategory folder."""
    parts = file_name.split('/')
    if without_supercategory and len(parts) == 4 and not os.path.isabs(file_name):
        return os.path.join(root, parts[0], *parts[2:])
    return os.path.join(root, file_name)


def _inat_layout(root: str, file_name: str, ann_path: str) -> bool:
    """Whether the images lie without their supercategory folder (DeiT's layout), judged by the first image."""
    listed, flat = _inat_image_path(root, file_name, False), _inat_image_path(root, file_name, True)
    if os.path.isfile(listed):
        return False
    if os.path.isfile(flat):
        return True
    also = f' nor {flat} (the layout without the supercategory folder)' if flat != listed else ''
    raise UserError(f'the first image {ann_path} lists is not there: no {listed}{also}')


def _read_json(path: str):
    if not os.path.isfile(path):
        raise UserError(f'annotation file not found: {path}')
    try:
        with open(path, encoding='utf-8') as f:  # (JSON's encoding, whatever the locale's)
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f'{path} is not valid JSON: {e}') from None
    except RecursionError:  # (arrays or objects nested thousands deep: json.load's own traceback)
        raise UserError(f'{path} is not an annotation file: its JSON is nested too deep to read') from None
    except OSError as e:  # a file that is there but cannot be read (permission denied, an I/O error)
        raise UserError(f'cannot read {path}: {_why(e)}') from None


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, shipped with the package), upsampled to 3x32x32.

    A fixed split (seed 0): 1,437 training and 360 validation images. Training adds random ±2-pixel shifts.
    """
    NUM_VAL = 360
    SIZE = 32

    def __init__(self, train: bool):
        from sklearn.datasets import load_digits
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        images = torch.nn.functional.interpolate(images, size=(self.SIZE, self.SIZE), mode='bilinear',
                                                 align_corners=False).clamp(0, 1)
        images = (images.repeat(1, 3, 1, 1) - 0.5) / 0.5
        targets = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
        idx = perm[self.NUM_VAL:] if train else perm[:self.NUM_VAL]
        self.images, self.targets = images[idx], targets[idx]
        self.train = train
        self.shift = transforms.RandomCrop(self.SIZE, padding=2, fill=-1.0) if train else None

    @classmethod
    def check_size(cls, size: int, reader: str, remedy: str) -> None:
        """Refuse a model that reads ``size`` px square images: the digits are ``SIZE`` px and are not resized to
        fit (``reader`` names the model, ``remedy`` says what to give instead)."""
        if size != cls.SIZE:
            raise UserError(f'--data-set DIGITS has {cls.SIZE}x{cls.SIZE} images and {reader} reads {size}x{size} '
                            f'({remedy})')

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        if self.shift is not None:
            img = self.shift(img)
        return img, int(self.targets[i])


# ----------------------------------------------------------------------------------------------------------
# loading a data set for a run

WORKER_START_TIMEOUT = 60.0  # seconds for a forked DataLoader worker to reach its first line of Python
WORKER_START_ATTEMPTS = 3


def _note_start(started, worker_init_fn, worker_id: int) -> None:
    """A worker's first call (as ``worker_init_fn``): its pid into ``started[worker_id]``, then the loader's own."""
    started[worker_id] = os.getpid()
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


class DataLoader(torch.utils.data.DataLoader):
    """torch's, with its iterator (which starts the workers) made under :func:`sigterm_held`, and forked workers
    that hang at their start started again.

    A fork copies the locks of the parent's other threads as they are, and CPython before 3.12 (3.11.7 among them;
    later 3.8-3.11 releases have the fix) takes one of them in the child before resetting it: if another thread
    held it at that moment (a library's native thread calling into Python), the worker waits forever before its
    first line of Python, and the run with it, without a word.  So each worker notes its start; one that has not
    started within ``WORKER_START_TIMEOUT`` seconds is killed and the workers are started again, with the seeds
    and shuffle the first start drew (the random states are rewound), so the epoch is the one it would have been.
    """

    def __iter__(self):
        with sigterm_held():
            if self.num_workers == 0 or (self.multiprocessing_context or multiprocessing.get_context()) \
                    .get_start_method() != 'fork':
                return super().__iter__()
            return self._iter_with_started_workers()

    def _iter_with_started_workers(self):
        rng_state = torch.get_rng_state()
        generator_state = self.generator.get_state() if self.generator is not None else None
        init = self.worker_init_fn
        for attempt in range(1, WORKER_START_ATTEMPTS + 1):
            started = multiprocessing.RawArray('q', self.num_workers)  # shared with the forked workers
            before = {p.pid for p in multiprocessing.active_children()}
            self.worker_init_fn = functools.partial(_note_start, started, init)
            try:
                iterator = super().__iter__()
            finally:
                self.worker_init_fn = init
            workers = [p for p in multiprocessing.active_children() if p.pid not in before]
            deadline = time.monotonic() + WORKER_START_TIMEOUT
            while True:
                stuck = [p for p in workers if p.pid not in started[:] and p.is_alive()]
                if not stuck or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if not stuck:  # (a worker that ended without starting is torch's to report, at the first batch)
                return iterator
            iterator._shutdown_workers()  # before the kill, or torch reports the killed worker as a failure
            for p in stuck:
                p.kill()  # SIGKILL: it holds the parent's signal handlers, which act only once its Python runs
                p.join()
            pids = ', '.join(str(p.pid) for p in stuck)
            print_line(f'warning: {len(stuck)} of {self.num_workers} DataLoader workers did not start within '
                       f'{WORKER_START_TIMEOUT:g} s (a fork that deadlocked; pid {pids}): killed, '
                       + ('the workers started again' if attempt < WORKER_START_ATTEMPTS else 'giving up'),
                       file=sys.stderr)
            torch.set_rng_state(rng_state)
            if generator_state is not None:
                self.generator.set_state(generator_state)
        raise RuntimeError(f'DataLoader workers did not start in {WORKER_START_ATTEMPTS} attempts of '
                           f'{WORKER_START_TIMEOUT:g} s each; --num_workers 0 loads in the main process')


def data_loader(dataset, args, train: bool, sampler=None, batch_size=None):
    # Training draws its shuffle and its workers' seeds from a generator of its own (saved with checkpoints).
    generator = seeding.data_generator(args.seed, args.rank) if train else None
    if sampler is None:
        if args.distributed and train:
            if args.repeated_aug:
                sampler = RASampler(dataset, args.world_size, args.rank, shuffle=True, seed=args.seed)
            else:
                sampler = torch.utils.data.DistributedSampler(dataset, args.world_size, args.rank, shuffle=True,
                                                              seed=args.seed)
        elif args.distributed and args.dist_eval:
            sampler = DistributedEvalSampler(dataset, args.world_size, args.rank)
        elif train:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        else:
            sampler = torch.utils.data.SequentialSampler(dataset)
    bs = batch_size or (args.batch_size if train else int(1.5 * args.batch_size))
    return DataLoader(
        dataset, sampler=sampler, batch_size=bs, num_workers=args.num_workers,
        pin_memory=args.pin_mem and args.device.startswith('cuda'), drop_last=train and len(sampler) >= bs,
        persistent_workers=False, generator=generator, worker_init_fn=worker_stops_quietly_on_sigterm)


def build_data(args, train: bool):
    dataset, nb_classes = build_dataset(train, args)
    if len(dataset) == 0:
        raise UserError(f'the {"training" if train else "validation"} set of {args.data_set} is empty')
    for note in (skipped_files_note(dataset), loose_images_note(dataset)):
        if note:
            rank0_print(note)
    return dataset, nb_classes


def check_classes(nb_classes: int, model: torch.nn.Module, what: str, trains: bool = False) -> None:
    """The head must have a logit for every class of the data; a head with more classes than the data set has
    (a checkpoint of another data set?) is allowed, with a warning.  A set the model is trained on (``trains``)
    has at least two classes: on one, every label is that class (a fresh one-class head's loss is 0 from the
    first step), so finetuning would teach nothing but it."""
    if nb_classes is None:
        return
    if trains and nb_classes < 2:
        raise UserError(f'the {what} set has {nb_classes} class{"es" * (nb_classes != 1)}: finetuning on it would '
                        f'teach every image the same label (a classifier needs at least 2 classes)')
    if nb_classes > model.num_classes:
        raise UserError(f'the {what} set has {nb_classes} classes but the model\'s head has {model.num_classes}')
    if nb_classes < model.num_classes:
        rank0_print(f'warning: the model\'s head has {model.num_classes} classes and the {what} set {nb_classes}: '
                    f'labels 0..{nb_classes - 1} are read as the head\'s first {nb_classes} classes')


def check_same_classes(args, dataset_val, dataset_train=None) -> None:
    """IMNET labels are positions in the sorted list of class folders, so a folder that is only in val/ (or only in
    train/) gives every later class another's label: refused.  Without the training set at hand (--eval, random
    masks) its folder names are listed, when train/ is there.  (INAT: checked where the validation set is read.)"""
    if args.data_set != 'IMNET':
        return
    if dataset_train is not None:
        train = list(dataset_train.classes)
    else:
        train = class_folders(os.path.join(args.data_path, 'train'))
        if not train:  # a validation set on its own (a train/ without class folders, its archives unpacked later,
            return  # is no training set either: no label of it to shift)
    val = list(dataset_val.classes)
    if train == val:
        return
    only_val, only_train = sorted(set(val) - set(train)), sorted(set(train) - set(val))
    parts = [f'only in {split}/: {few_names(as_told_apart(names, others))}'
             for split, names, others in (('val', only_val, only_train), ('train', only_train, only_val)) if names]
    raise UserError(f'the class folders of train/ and val/ under {args.data_path} differ ({"; ".join(parts)}): '
                    f'labels are positions in the sorted folder list, so classes after the first difference would be '
                    f'scored against another class\'s label')


def as_told_apart(names: Sequence[str], others: Sequence[str]) -> List[str]:
    """``names`` to print beside ``others``: one that differs from one of them only in its Unicode form (an accent
    as one character or as two, as a copy from macOS can leave it) is printed escaped, where it shows the
    difference."""
    twins = {unicodedata.normalize('NFC', n) for n in others}
    return [ascii(n) if unicodedata.normalize('NFC', n) in twins else n for n in names]


class Limited:
    """An iterable cut to ``limit`` items that still knows its length (for progress and ETA)."""

    def __init__(self, iterable, limit: Optional[int]):
        self.iterable = iterable
        self.length = len(iterable) if limit is None else min(limit, len(iterable))

    def __iter__(self):
        return itertools.islice(iter(self.iterable), self.length)

    def __len__(self) -> int:
        return self.length
