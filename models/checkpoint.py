"""Building a Clip & Concat model from a checkpoint file: the one builder the CLI, the demo and scripts use.

A checkpoint is an official timm/DeiT file (``{"model": state_dict}``, no masks: all True), a pruned file
(``pruned_<rate>.pth``: masks in the state dict), a finetuning checkpoint, or a bare state dict.  Loading is
strict, and every way a file can fail to fit the model is a one-line :class:`utils.UserError`.
"""
import copy
import math
import re
import warnings
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from utils import UserError, checkpoint_args, few_names, load_checkpoint_file, state_dict_of

from .clip_concat import MASK_KEY, kept_token_counts
from . import zoo
from .zoo import base_name, check_model_name

__all__ = ['build_model', 'build_model_from_checkpoint', 'create_model', 'dense_copy', 'head_classes', 'load_entry',
           'load_weights']


def build_model(name: str, num_classes: int, img_size: Optional[int] = None, **timm_kwargs) -> nn.Module:
    """The Clip & Concat model ``name`` (any timm ViT name, ``cc_`` optional) with random weights."""
    extra = {'img_size': img_size} if img_size else {}
    return zoo.create_model(name, num_classes=num_classes, **extra, **timm_kwargs)


def head_classes(state_dict: Dict[str, torch.Tensor], default: int) -> int:
    """The number of classes the checkpoint's head was trained for (``default`` when it has no head): the rows of
    its weight, or the length of its bias when the weight is missing (so the missing key is what is reported)."""
    w, b = state_dict.get('head.weight'), state_dict.get('head.bias')
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    return int(b.shape[0]) if w is None and isinstance(b, torch.Tensor) and b.dim() == 1 else default


def holds_masks(state_dict: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict carries mask buffers (a pruned file's); official weights carry none."""
    return any(k.endswith(MASK_KEY) for k in state_dict)


def load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str, name: str,
                 flag: str = '--model') -> None:
    """Strict loading: a missing, unexpected or mis-shaped key is a one-line error naming the first few (and
    ``flag``, the option that names the model, when another model size would fit)."""
    empty = [k for k in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')
             if isinstance(state_dict.get(k), torch.Tensor) and state_dict[k].dim() and not state_dict[k].shape[0]]
    if empty:  # (a head of 0 classes is none in timm: its keys were called unexpected, or its shape another model's)
        k = empty[0]
        raise UserError(f'{path}: its classifier head has no classes ({k} has shape {tuple(state_dict[k].shape)}): '
                        f'a model that predicts nothing')
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and not k.endswith(MASK_KEY)
                  and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        k = mismatched[0]
        # a position embedding of the model's width but another length, the only difference of a file of the
        # model's own keys, is another input size; any other mismatch (the width of pos_embed, another patch
        # size, a file with other prefix tokens: a distillation or register token more or less) another model
        same_width = state_dict[k].shape[-1:] == own[k].shape[-1:]
        same_keys = ({n for n in state_dict if not n.endswith(MASK_KEY)}
                     == {n for n in own if not n.endswith(MASK_KEY)})
        if mismatched == ['pos_embed'] and same_width and same_keys:
            size = _input_size(model, state_dict[k].shape[-2])
            if flag == '--teacher-model':  # the teacher reads the student's images: --input-size would change both
                height, width = (int(s) for s in model.patch_embed.img_size)
                run = f'{height}' if height == width else f'{height}x{width}'
                hint = (f'a teacher made for another input size{size and f" ({size.strip()})"}? the teacher sees '
                        f'the images of the run, of --input-size {run}')
            else:
                hint = ('another input size? ' + (f'set --input-size{size}' if flag.startswith('--')
                                                   else f'pass img_size={size.strip() or "..."}'))
        elif k.startswith(('head.', 'head_dist.')) and state_dict[k].shape[1:] == own[k].shape[1:]:
            heads = {h: int(state_dict[f'{h}.weight'].shape[0]) for h in ('head', 'head_dist')
                     if isinstance(state_dict.get(f'{h}.weight'), torch.Tensor) and state_dict[f'{h}.weight'].dim()}
            if len(set(heads.values())) > 1:  # (no number of classes fits both: the hint below sent one to the other)
                raise UserError(f'{path} does not fit {name}: its two classifier heads have different numbers of '
                                f'classes (head {heads["head"]}, head_dist {heads["head_dist"]}), where a '
                                f'distilled model\'s heads predict the same classes (was only one of them replaced?)')
            n = int(state_dict[k].shape[0])
            hint = f"another number of classes? the checkpoint's head has {n}: pass num_classes={n}"
        else:
            hint = f'another model size? set {flag}'
        raise UserError(f'{path} does not fit {name}: {k} has shape {tuple(state_dict[k].shape)} in the '
                        f'checkpoint but {tuple(own[k].shape)} in the model ({hint})')
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        dense_file = not holds_masks(state_dict)
        missing = [k for k in own if k not in state_dict and not (dense_file and k.endswith(MASK_KEY))]
        unexpected = [k for k in state_dict if k not in own]
        parts = []
        if missing:
            parts.append(f'missing keys {few_names(missing, 3)}')
        if unexpected:
            parts.append(f'unexpected keys {few_names(unexpected, 3)}')
        if not parts:  # errors reported by the mask checks of the model
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            parts.append('; '.join(lines[:2]) or str(e))
        raise UserError(f'{path} does not fit {name}: ' + '; '.join(parts)) from None


def _input_size(model: nn.Module, positions: int) -> str:
    """' <size>' for a position embedding of ``positions`` rows: the square image of the model's patches it was
    made for ('' where there is none)."""
    prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
    side = math.isqrt(max(positions - prefix, 0))
    ph, pw = zoo.token_stride(model.patch_embed)
    return f' {side * ph}' if side and side * side == positions - prefix and ph == pw else ''


def build_model_from_checkpoint(path: str, name: Optional[str], fallback_classes: int = 1000,
                                img_size: Optional[int] = None, warn=print, flag: str = '--model',
                                checkpoint: Optional[dict] = None, **timm_kwargs) -> Tuple[nn.Module, dict]:
    """``(model, checkpoint)``: the model ``name`` with the file's weights and masks, and the whole file.

    ``name`` None: the model named in the file's ``args`` (files written by this project say which it is).  A
    ``name`` other than the timm model the file's ``args`` name is refused, even where the weights would fit (a
    ViT-S and a DeiT-S have the same shapes, not the same input normalisation); ``flag`` is the option that names
    the model, for the messages.

    The head gets as many classes as the file's head has (``fallback_classes`` for a file without one).  A
    ``channels`` list that disagrees with the masks is reported through ``warn``; the masks win.

    ``checkpoint``: the contents of ``path`` where the caller has read them already (``load_checkpoint_file(path)``),
    so that the file is not read again; by default it is read here.
    """
    checkpoint, sd = _read(path, checkpoint)
    recorded = checkpoint_args(checkpoint).get('model')
    if name is None:
        if not isinstance(recorded, str):
            raise UserError(f'{path} does not say which model it holds; pass {flag}')
        try:
            check_model_name(recorded)
        except ValueError as e:
            raise UserError(f'{path}: {e}') from None
        name = recorded
    check_recorded_name(checkpoint, path, name, flag)
    model = build_model(name, head_classes(sd, fallback_classes), img_size, **timm_kwargs)
    _load(model, checkpoint, sd, path, name, flag, warn)
    return model, checkpoint


def create_model(name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, **kwargs) -> nn.Module:
    """timm's model ``name`` (``cc_`` optional) with Clip & Concat applied; ``kwargs`` go to timm.
    ``checkpoint_path``: loaded as ``--eval`` loads it (the trained ``model`` weights of a file that also holds
    ``model_ema``, strictly, the checks of :func:`build_model_from_checkpoint`; a one-line
    :class:`utils.UserError` when it does not fit).  timm's own ``timm.create_model(name, checkpoint_path=...)``
    follows timm's rule instead, which prefers the EMA weights."""
    model = zoo.create_model(name, pretrained=pretrained, **kwargs)
    if checkpoint_path:
        checkpoint, sd = _read(checkpoint_path)
        check_recorded_name(checkpoint, checkpoint_path, name, 'the model name')
        _load(model, checkpoint, sd, checkpoint_path, name, 'the model name', lambda line: warnings.warn(line))
    return model


def _read(path: str, checkpoint: Optional[dict] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(the file's contents, its model state dict, in timm's names); ``checkpoint``: the contents, read already."""
    if checkpoint is None:
        checkpoint = load_checkpoint_file(path)
    return checkpoint, _timm_state_dict(checkpoint, path)


def _timm_state_dict(entry: dict, path: str) -> Dict[str, torch.Tensor]:
    """The model state dict of a file's contents (or of an entry holding one, such as ``model_ema``) in timm's
    names: wrapper prefixes stripped, and DeiT III's released files (the DeiT repository's models), which name
    LayerScale blocks.{l}.gamma_1 and gamma_2, renamed to timm's blocks.{l}.ls1.gamma and ls2.gamma (as timm's
    own converter renames them)."""
    try:
        sd = state_dict_of(entry)
    except UserError as e:
        raise UserError(f'{path}: {e}') from None
    return {re.sub(r'^(blocks\.\d+)\.gamma_([12])$', r'\1.ls\2.gamma', k): v for k, v in sd.items()}


def load_entry(model: nn.Module, checkpoint: dict, key: str, path: str, name: str, flag: str = '--model') -> None:
    """The state dict ``checkpoint[key]`` of a file, other than its model weights (a finetuning checkpoint's
    ``model_ema``), into ``model`` as the weights are loaded: in timm's names, refused when not finite, strictly."""
    sd = _timm_state_dict(checkpoint[key], f'{path} ({key})')
    _check_finite(sd, f'{path} ({key})')
    load_weights(model, sd, path, name, flag)


def _check_finite(sd: Dict[str, torch.Tensor], where: str) -> None:
    empty = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if empty:  # (a state dict of a model built on the meta device and saved before it was given weights)
        raise UserError(f'{where}: {few_names(empty, 3)} hold{"s" * (len(empty) == 1)} no values (tensors of the meta '
                        f'device: saved from a model that was never given its weights)')
    broken = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
              and not bool(torch.isfinite(v).all())]
    if broken:  # (evaluated, such weights gave an accuracy of chance or 0% without a word)
        raise UserError(f'{where}: {few_names(broken, 3)} hold{"s" * (len(broken) == 1)} NaN or infinite values, '
                        f'weights that compute nothing (written by a run that diverged?)')


def check_recorded_name(checkpoint: dict, path: str, name: str, flag: str) -> None:
    """A file whose ``args`` name another timm model than ``name`` is refused (see above).  A pretrained tag
    counts only where it changes timm's pretrained config (input normalisation, size, crop): a file that records
    ``deit_tiny_patch16_224.fb_in1k`` is the model ``deit_tiny_patch16_224`` names (its default tag), while
    ``vit_base_patch16_224.mae`` is not ``vit_base_patch16_224`` (another mean and std)."""
    recorded = checkpoint_args(checkpoint).get('model')
    if isinstance(recorded, str) and _timm_name(recorded) is not None and not _same_model(recorded, name):
        raise UserError(f'{path} holds {base_name(recorded)} (the model its args name), not {base_name(name)}: '
                        f'set {flag} {base_name(recorded)}')


def _load(model: nn.Module, checkpoint: dict, sd: Dict[str, torch.Tensor], path: str, name: str, flag: str,
          warn) -> None:
    """The file's weights and masks into ``model``, strictly, and its ``channels`` checked against the masks."""
    stored = recorded_channels(checkpoint, path)
    _check_finite(sd, path)
    load_weights(model, sd, path, name, flag)
    actual = kept_token_counts(model)
    if stored is not None and stored != actual:
        if holds_masks(sd):
            warn(f'warning: {path} lists channels {stored}, but its masks keep {actual}; using the masks')
        elif any(c < model.num_tokens for c in stored):  # (counts that clip tokens: a pruned model's)
            raise UserError(f'{path} lists channels {stored}, a pruned model, but holds no masks '
                            f'(blocks.{{l}}.{MASK_KEY}): without them it would be the dense model')
        else:  # (no count clips a token: an empty list, or one of another length, is no pruned model's)
            warn(f'warning: {path} lists channels {stored} but holds no masks; loading the dense model (kept tokens '
                 f'per block: {actual})')


def recorded_channels(checkpoint: dict, path: str) -> Optional[List[int]]:
    """The file's ``channels`` (kept tokens per block) as ints, None if it has none; released files hold 0-dim
    tensors.  Anything else is a one-line error."""
    stored = checkpoint.get('channels')
    if stored is None:
        return None
    try:
        if isinstance(stored, (str, bytes)) or not all(float(c) == int(c) >= 0 for c in stored):
            raise TypeError
        return [int(c) for c in stored]
    except (TypeError, ValueError, RuntimeError):
        shown = repr(stored) if len(repr(stored)) <= 60 else type(stored).__name__
        raise UserError(f'{path}: its channels ({shown}) are not a list of kept-token counts per block') from None


def _timm_name(name: str) -> Optional[str]:
    """The timm model behind ``name`` (``cc_`` optional), or None for a name timm does not know."""
    base = base_name(name)
    return base if timm.is_model(base) else None


def _same_model(recorded: str, name: str) -> bool:
    """Whether two timm names (``cc_`` optional, pretrained tag optional) build the same network with the same
    pretrained config; an untagged name means its architecture's default tag, as in timm."""
    a, b = _timm_name(recorded), _timm_name(name)
    if a == b:
        return True
    if b is None or a.partition('.')[0] != b.partition('.')[0]:
        return False
    try:
        cfg_a, cfg_b = timm.models.get_pretrained_cfg(a), timm.models.get_pretrained_cfg(b)
    except RuntimeError:  # (a tag timm does not know for that architecture)
        return False
    return cfg_a is not None and cfg_a == cfg_b


def dense_copy(model: nn.Module) -> nn.Module:
    """The same weights with every mask True: the dense model this one was pruned from."""
    dense = copy.deepcopy(getattr(model, 'module', model))
    dense.set_dense()
    return dense
