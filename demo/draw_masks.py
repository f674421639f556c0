"""Draw which patches each block of a Clip & Concat model keeps.

One row per image, one small panel per block. A patch the block clips (it skips the block unchanged) is
greyed out; a patch the block processes is shown as is, and outlined when the block before clipped it
(the token "comes back" with the features it had: clip & concat never discards a token). The masks are the
model's own: ``model.kept_token_ids()`` (original ids of the tokens each block processes; id 0 is the class
token, not a patch).

    python demo/draw_masks.py --resume runs/demo/finetune_attn_0.25/checkpoint.pth --data-path DIGITS \
        --out masks.png
    python demo/draw_masks.py --resume pruned_0.25.pth --model deit_tiny_patch16_224 \
        --data-path /path/to/imagenet/val --num-images 3 --out masks.png

``--data-path`` is an image folder (searched recursively; a ``val/`` inside is preferred) or ``DIGITS``
(scikit-learn's digits, the validation split of ``--data-set DIGITS``). Every argument is checked before any
work starts: a bad one is one ``error: ...`` line and exit code 2.
"""
import argparse
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torchvision.datasets.folder import IMG_EXTENSIONS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models  # noqa: E402,F401  (registers the cc_deit_* models with timm)
from utils import OutputWriteError, UserError, one_line, print_line, write_atomic  # noqa: E402
from utils.checkpoint_io import output_file_problem  # noqa: E402
from utils.cli import (AT_LEAST_ONE, EXIT_USER_ERROR, OneLineParser, Range, check_numbers,  # noqa: E402
                       check_whole_patches, spell)
from utils.signals import Terminated, end_script, say_stopped, sigterm_unwinds  # noqa: E402

IMAGE_EXTENSIONS = IMG_EXTENSIONS  # those finetune.py's image folders read (torchvision's ImageFolder)
CLIPPED_GREY = np.array([0.62, 0.62, 0.66])  # what a clipped patch is blended towards
CLIPPED_ALPHA = 0.75
RETURN_COLOUR = '#ff8c00'                     # outline of a patch kept again after an earlier clip


# ----------------------------------------------------------------------------------------------------------
# masks in image terms

def kept_patches(model: nn.Module) -> torch.Tensor:
    """(depth, num_patches) bool in original patch order: True where block l processes patch p.

    Read from ``model.kept_token_ids()`` (original token ids; prefix tokens, which are not patches, excluded),
    i.e. from what the model actually computes, not from a plan.
    """
    model = getattr(model, 'module', model)
    prefix = model.num_prefix_tokens
    kept = torch.zeros(len(model.blocks), model.num_tokens - prefix, dtype=torch.bool)
    for layer, ids in enumerate(model.kept_token_ids()):
        ids = ids.detach().cpu()
        kept[layer, ids[ids >= prefix] - prefix] = True
    return kept


def returning_patches(kept: torch.Tensor) -> torch.Tensor:
    """True where a patch comes back: block l processes it, block l-1 clipped it (it kept its older
    features meanwhile)."""
    back = torch.zeros_like(kept)
    back[1:] = kept[1:] & ~kept[:-1]
    return back


def _grid(model: nn.Module) -> Tuple[int, int, int, int]:
    pe = model.patch_embed
    gh, gw = pe.grid_size
    ph, pw = pe.patch_size
    return gh, gw, ph, pw


# ----------------------------------------------------------------------------------------------------------
# drawing

def to_display(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised (3, H, W) tensor back to an (H, W, 3) array in [0, 1]."""
    m = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image.detach().cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def draw_masks(model: nn.Module, images: torch.Tensor, out_path: str, mean: Sequence[float],
               std: Sequence[float], row_labels: Optional[List[str]] = None, title: Optional[str] = None,
               panel_inches: float = 1.15, dpi: int = 110) -> str:
    """Draw ``images`` (B, 3, H, W, normalised as the model expects) with the patches each block keeps.

    Row b: the image, then one panel per block. Returns ``out_path``, written in the format its extension names
    (PNG without one) through the atomic writer: a failed write leaves the previous file as it was.
    """
    model = getattr(model, 'module', model)
    gh, gw, ph, pw = _grid(model)
    size = (gh * ph, gw * pw)
    if tuple(images.shape[-2:]) != size:
        raise UserError(f'images are {tuple(images.shape[-2:])}, the model needs {size}')
    kept = kept_patches(model)
    back = returning_patches(kept)
    depth, num_patches = kept.shape
    rows, cols = images.shape[0], depth + 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_inches + 0.4, rows * panel_inches + 1.1),
                             squeeze=False, layout='constrained')
    for r in range(rows):
        picture = to_display(images[r], mean, std)
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(picture, interpolation='nearest')
                if row_labels:
                    ax.set_ylabel(row_labels[r], fontsize=7)
                if r == 0:
                    ax.set_title('input', fontsize=8)
                continue
            layer = c - 1
            shaded = picture.copy()
            clip = (~kept[layer]).view(gh, gw).numpy()
            pixel_clip = np.kron(clip, np.ones((ph, pw), dtype=bool))
            shaded[pixel_clip] = (1 - CLIPPED_ALPHA) * shaded[pixel_clip] + CLIPPED_ALPHA * CLIPPED_GREY
            ax.imshow(shaded, interpolation='nearest')
            for p in torch.nonzero(back[layer]).flatten().tolist():
                y, x = divmod(p, gw)
                ax.add_patch(plt.Rectangle((x * pw - 0.5, y * ph - 0.5), pw, ph, fill=False,
                                           edgecolor=RETURN_COLOUR, linewidth=0.9 if gw <= 8 else 0.6))
            if r == 0:
                ax.set_title(f'block {layer}\n{int(kept[layer].sum())}/{num_patches} kept', fontsize=7)
    kept_total = int(kept.sum())
    head = title or 'Clip & Concat: patches each block processes'
    fig.suptitle(f'{head}\nclipped (layer, patch) slots: {depth * num_patches - kept_total} of '
                 f'{depth * num_patches} ({1 - kept_total / (depth * num_patches):.0%})', fontsize=9)
    fig.supxlabel('grey: clipped at this block (the token skips it unchanged and is concatenated back)\n'
                  'orange box: comes back here (clipped by the block before, processed by this one)', fontsize=7)
    fmt = os.path.splitext(out_path)[1][1:].lower() or 'png'
    try:
        write_atomic(out_path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
    finally:
        plt.close(fig)
    return out_path


# ----------------------------------------------------------------------------------------------------------
# images

def digits_images(num: int) -> Tuple[torch.Tensor, List[int]]:
    """The first ``num`` validation digits with distinct labels (then any), as the model sees them."""
    from datasets import DigitsDataset
    ds = DigitsDataset(train=False)
    chosen, seen = [], set()
    for i, t in enumerate(ds.targets.tolist()):
        if t not in seen:
            chosen.append(i)
            seen.add(t)
        if len(chosen) == num:
            break
    for i in range(len(ds)):
        if len(chosen) >= num:
            break
        if i not in chosen:
            chosen.append(i)
    return torch.stack([ds[i][0] for i in chosen]), [int(ds.targets[i]) for i in chosen]


def folder_images(root: str, num: int, input_size: int, mean, std, crop_ratio: float
                  ) -> Tuple[torch.Tensor, List[str]]:
    """``num`` images under ``root`` (or ``root/val``), with the eval transform: in sorted order, the first image of
    each folder that holds one, then the next ones of those folders where fewer folders than ``num`` hold images."""
    from datasets import build_transform, load_rgb
    check_image_folder(root)
    if os.path.isdir(os.path.join(root, 'val')):
        root = os.path.join(root, 'val')
    # At most ``num`` images of each folder (no more can be drawn), until ``num`` folders have images: a class
    # folder holding many images (a train/ split) must not end the search before the other classes are seen.
    paths, with_images = [], 0
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        found = [os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)][:num]
        paths += found
        with_images += bool(found)
        if with_images >= num:
            break
    if not paths:
        raise UserError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) under {root}')
    # One image per class folder first, so the rows differ.
    picked, folders = [], set()
    for p in paths:
        if os.path.dirname(p) not in folders:
            picked.append(p)
            folders.add(os.path.dirname(p))
        if len(picked) == num:
            break
    picked += [p for p in paths if p not in picked][:num - len(picked)]
    if len(picked) < num:
        raise UserError(f'--num-images {num}: {root} holds {len(picked)} images ({", ".join(IMAGE_EXTENSIONS)})')
    t_args = argparse.Namespace(input_size=input_size, mean=mean, std=std, eval_crop_ratio=crop_ratio)
    transform = build_transform(False, t_args)
    images = torch.stack([transform(load_rgb(p)) for p in picked])  # (load_rgb refuses a pipe named like an image)
    labels = [os.path.relpath(p, root) for p in picked]
    return images, labels


def check_image_folder(root: str) -> None:
    """``--data-path`` names a folder (when it is not DIGITS)."""
    if not os.path.isdir(root):
        raise UserError(f'--data-path {root} is neither DIGITS nor a folder')


# ----------------------------------------------------------------------------------------------------------
# command line

def load_model(resume: str, model_name: Optional[str], input_size: Optional[int] = None) -> nn.Module:
    """Any C&C checkpoint (official weights, pruned_<rate>.pth, checkpoint.pth) -> model in eval mode; without
    ``model_name`` the model the file names in its ``args``; ``input_size`` a whole number of its patches."""
    if model_name is not None:
        try:
            model_name = 'cc_' + models.check_model_name(model_name)
        except ValueError as e:
            raise UserError(f'--model: {e}') from None
    model, _ = models.build_model_from_checkpoint(resume, model_name, img_size=input_size)
    if input_size is not None:  # (finetune.py's check, on the model read)
        check_whole_patches(input_size, model.patch_embed.patch_size, f'the model of {resume}')
    return model.eval()


def class_name(index: int, num_classes: int) -> str:
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo
            return ImageNetInfo().index_to_description(index).split(',')[0]
        except Exception:  # names are a nicety
            pass
    return str(index)


MAX_ROWS = 32  # a row per image, a panel per block: more rows would be unreadable (and slow to lay out)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser('demo/draw_masks.py', description='Draw the patches each block of a Clip & Concat model keeps')
    p.add_argument('--resume', required=True, help='checkpoint: official DeiT, pruned_<rate>.pth, checkpoint.pth')
    p.add_argument('--model', default=None, help='e.g. deit_tiny_patch16_224 (default: from the checkpoint)')
    p.add_argument('--data-path', default='DIGITS', help='an image folder, or DIGITS')
    p.add_argument('--data-set', default=None, choices=['DIGITS', 'IMNET'],
                   help='DIGITS: scikit-learn\'s digits (a --data-path folder is refused with it, as finetune.py '
                        'does); IMNET reads images from --data-path (default: DIGITS when --data-path is DIGITS, '
                        'its default, else IMNET)')
    p.add_argument('--num-images', default=4, type=int, help=f'rows: one image each (1 to {MAX_ROWS})')
    p.add_argument('--input-size', default=None, type=int)
    p.add_argument('--eval-crop-ratio', default=1.0, type=float,
                   help='in (0, 1]: as finetune.py\'s (default 1.0, the whole image squashed; 0.875 is DeiT\'s crop; '
                        'no effect on DIGITS or at an input of 32 px or less, which a note says)')
    p.add_argument('--out', default='masks.png',
                   help='the picture, written exactly there; its extension is the format and is required (png, pdf, '
                        'svg, ...; default masks.png)')
    p.add_argument('--title', default=None, help='matplotlib text: $...$ is math (write \\$ for a dollar sign)')
    return p


# Every numeric flag of the parser, with what it accepts (check_numbers refuses a flag missing here).
NUMERIC_FLAGS: Dict[str, Range] = {
    'num_images': Range(1, MAX_ROWS), 'input_size': AT_LEAST_ONE, 'eval_crop_ratio': Range(0, 1, low_open=True),
}


def check_out_file(out: str, flag: str = '--out') -> None:
    """``out`` can be written as a picture: a file name with the extension of a format matplotlib writes here, not
    a directory, in a folder that exists or can be created and is writable (nothing is created to find out).
    The extension is required: without one matplotlib would add ``.png`` and write another file than the one
    named (and the name given could be that of a checkpoint)."""
    if not out:
        raise UserError(f'{flag} is empty: give the picture\'s file name (e.g. masks.png)')
    why = output_file_problem(out)  # a folder named, a name too long, a folder that cannot be made or written
    if why:
        folder = os.path.isdir(out) or out.endswith(tuple(filter(None, (os.sep, os.altsep))))
        example = f'; give the picture\'s file name, e.g. {os.path.join(out, "masks.png")}' if folder else ''
        raise UserError(f'{flag} {out} {why}{example}')
    extension = os.path.splitext(out)[1][1:].lower()
    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    if not extension:
        raise UserError(f'{flag} {out} has no extension: name the picture with its format, e.g. {out}.png '
                        f'(one of {", ".join(sorted(formats))})')
    if extension not in formats:
        raise UserError(f'{flag} {out}: .{extension} is not a picture format matplotlib writes '
                        f'(use one of {", ".join(sorted(formats))})')
    texsystem = matplotlib.rcParams['pgf.texsystem']
    if extension == 'pgf' and not shutil.which(texsystem):
        raise UserError(f'{flag} {out}: matplotlib writes .pgf with {texsystem}, which is not installed here')


def check_text(text: str, flag: str) -> None:
    """``text`` can be typeset by matplotlib: its ``$...$`` parts are mathtext, which raises on an unknown
    command only when the figure is drawn, after all the work; a small figure drawn here finds it first."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = matplotlib.figure.Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.suptitle(text, fontsize=9)
    try:
        fig.canvas.draw()
    except ValueError as e:
        why = re.sub(r'^\w+Exception: ', '', one_line(e))
        shown = text.replace('\n', '\\n')  # the error stays one line
        raise UserError(f'{flag} {shown}: matplotlib cannot typeset its $...$ math ({why}); '
                        f'write \\$ for a dollar sign') from None


def plain_text(text: str) -> str:
    """``text`` drawn as written (file names, paths): its dollar signs escaped so none starts mathtext, and a name's
    bytes that are not text in this locale (surrogates, which the font cannot draw: any name beyond ASCII under
    LC_ALL=C) read as UTF-8, or escaped where they are not that either."""
    text = text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    return text.replace('$', r'\$')


def uses_digits(args: argparse.Namespace) -> bool:
    """scikit-learn's digits: --data-set DIGITS, or the default --data-set with --data-path exactly DIGITS (any
    other spelling is a folder's name)."""
    return args.data_set == 'DIGITS' or (args.data_set is None and args.data_path == 'DIGITS')


def validate_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> None:
    """Refuse a bad command line before any work starts (no model loaded, no file or directory written)."""
    check_numbers(args, parser or get_args_parser(), NUMERIC_FLAGS)
    if args.data_set == 'IMNET' and args.data_path == 'DIGITS' and not os.path.isdir('DIGITS'):
        raise UserError('--data-set IMNET reads an image folder: give it with --data-path')
    if args.data_set is None and args.data_path == 'DIGITS' and os.path.isdir('DIGITS'):
        raise UserError("--data-path DIGITS: both scikit-learn's digits and a folder DIGITS here; give ./DIGITS for "
                        "the folder, or --data-set DIGITS for the digits")
    if args.data_set == 'DIGITS' and args.data_path != 'DIGITS':
        raise UserError("--data-set DIGITS is scikit-learn's digits, read from the package: --data-path does not "
                        'apply')
    check_out_file(args.out)
    if os.path.exists(args.out) and os.path.exists(args.resume) and os.path.samefile(args.out, args.resume):
        raise UserError(f'--out {args.out} is the --resume checkpoint: give the picture another name')
    if args.title is not None:
        check_text(args.title, '--title')
    if uses_digits(args) and args.input_size is not None:
        check_digits_size(args.input_size, f'--input-size {args.input_size}')
    elif args.input_size is not None:
        check_folder_size(args.input_size, args.eval_crop_ratio)
    if not uses_digits(args):  # (found by folder_images only after the checkpoint was read and its model built)
        check_image_folder(args.data_path)


def check_digits_size(size: int, reader: str) -> None:
    """A model reading another size than the digits' cannot draw them (the check is the dataset's own)."""
    from datasets import DigitsDataset
    DigitsDataset.check_size(size, reader, 'draw a model made for them, deit_digits_patch4_32, or images of a '
                                           '--data-path folder')


def check_folder_size(size: int, ratio: float) -> None:
    """A folder's images made ``size`` px a side by the evaluation transform, which can resize them for ``ratio``'s
    crop first: finetune.py's checks (more pixels than Pillow makes of one image; a tiny ratio made Pillow overflow,
    or the resize take the machine's memory)."""
    import finetune
    finetune.check_folder_image_sizes(size, ratio)


def unused_flag_notes(args: argparse.Namespace, parser: argparse.ArgumentParser, size: int) -> List[str]:
    """``note:`` lines for the flags given that this drawing does not use, at an input of ``size`` px: the
    evaluation transform is finetune.py's, so finetune.py's own rules (``finetune.unused_flags`` of the
    ``--eval`` this drawing does) say which flags it ignores and why."""
    import finetune
    given = getattr(args, 'given', frozenset())
    if 'eval_crop_ratio' not in given:
        return []
    evaluation = finetune.get_args_parser().parse_args(
        ['--eval', '--data-set', 'DIGITS' if uses_digits(args) else 'IMNET', '--input-size', str(size)])
    why = finetune.unused_flags(evaluation).get('eval_crop_ratio')
    return [] if why is None else [f'note: {spell(parser, "eval_crop_ratio", args.eval_crop_ratio)} has no effect: '
                                   f'{why}']


def main(argv=None, *, ends_process: bool = False) -> int:
    """draw_masks.py's command line (``argv``, or sys.argv's); returns the exit code.  Ctrl-C or SIGTERM is one
    line saying so and exit code 130 or 143, as finetune.py's; ``ends_process``: run as the script (see
    :func:`utils.signals.sigterm_unwinds`)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    with sigterm_unwinds(ends_process):
        try:
            validate_args(args, parser)
            model = load_model(args.resume, args.model, args.input_size)
            cfg = getattr(model, 'pretrained_cfg', None) or {}
            mean = tuple(cfg.get('mean', (0.485, 0.456, 0.406)))
            std = tuple(cfg.get('std', (0.229, 0.224, 0.225)))
            size = model.patch_embed.img_size[0]
            if uses_digits(args):
                check_digits_size(size, f'the model of {args.resume}')
            else:
                check_folder_size(size, args.eval_crop_ratio)
            for line in unused_flag_notes(args, parser, size):
                print_line(line)
            if uses_digits(args):
                images, targets = digits_images(args.num_images)
                mean = std = (0.5, 0.5, 0.5)
                labels = [f'digit {t}' for t in targets]
            else:
                images, labels = folder_images(args.data_path, args.num_images, size, mean, std,
                                               args.eval_crop_ratio)
                labels = [plain_text(label) for label in labels]
            with torch.no_grad():
                preds = model(images).argmax(1).tolist()
            row_labels = [f'{lab}\npred {class_name(p, model.num_classes)}' for lab, p in zip(labels, preds)]
            parent = os.path.basename(os.path.dirname(os.path.abspath(args.resume)))
            name = os.path.join(parent, os.path.basename(args.resume))
            title = args.title if args.title is not None else plain_text(f'{name} ({cfg.get("architecture", "")})')
            draw_masks(model, images, args.out, mean, std, row_labels, title)
            try:  # (standard output that cannot be written, `| head`: one line, as finetune.py's)
                print_line(f'Saved {args.out}')
            except OutputWriteError as e:
                raise UserError(f'{e}; {args.out} was written completely') from None
        except UserError as e:
            print(f'error: {one_line(e)}', file=sys.stderr)
            return EXIT_USER_ERROR
        except (KeyboardInterrupt, Terminated) as e:  # (the picture is written whole or not at all)
            kept = f' ({args.out} is as it was)' if os.path.exists(args.out) else ''
            return say_stopped(e, f'nothing was written{kept}')
    return 0


if __name__ == '__main__':
    end_script(main(ends_process=True))
