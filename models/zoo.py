"""Model names: any timm ViT with or without ``cc_``, the registered ``cc_deit_*`` names, the digits model.

``create_model('vit_small_patch16_224')`` and ``create_model('cc_vit_small_patch16_224')`` both build timm's
model and apply Clip & Concat to it.  Whether a name is usable is decided by timm's own registry and by the
model it builds (on the meta device, which allocates nothing): a timm ``VisionTransformer`` made of timm
``Block``\\ s.  Importing this module registers with timm:

* ``cc_deit_tiny_patch16_224``, ``cc_deit_small_patch16_224``, ``cc_deit_base_patch16_224``: timm's DeiT with
  Clip & Concat applied (``timm.create_model(name, checkpoint_path=...)`` loads official DeiT weights, masks
  all True, or any Clip & Concat checkpoint);
* ``deit_digits_patch4_32`` (a plain timm ViT: patch 4, width 96, depth 6, 3 heads, 10 classes, 32x32 input;
  the mini reproduction's model) and its ``cc_`` twin.
"""
import difflib
from functools import partial
from typing import Tuple

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, load_pretrained, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .clip_concat import apply_clip_concat, unsupported_reason

__all__ = ['base_name', 'check_model_name', 'patch_size', 'pretrained_cfg', 'token_stride']


def base_name(name: str) -> str:
    """The timm name behind ``name``: ``cc_deit_tiny_patch16_224`` -> ``deit_tiny_patch16_224``."""
    return name[3:] if name.startswith('cc_') else name


def check_model_name(name: str) -> str:
    """Return the timm name behind ``name`` if Clip & Concat applies to that model; ValueError otherwise."""
    base = base_name(name)
    if not base.strip():  # ('not in timm's registry' named no model)
        given = f' ({name!r})' if name else ''
        raise ValueError(f'empty model name{given}')
    if base.startswith('cc_'):
        raise ValueError(f'unknown model {name}: the cc_ prefix (optional) is given more than once')
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f' (similar: {", ".join(close)})' if close else ''
        raise ValueError(f'unknown model {name}: not in timm\'s registry{hint}')
    arch, _, tag = base.partition('.')
    tags = [n.partition('.')[2] for n in timm.list_pretrained(f'{arch}.*')]
    if tag and tag not in tags:
        raise ValueError(f'unknown model {name}: timm has no pretrained tag {tag!r} for {arch} '
                         f'({", ".join(tags) or "it has none"})')
    with torch.device('meta'):
        probe = timm.create_model(base)
    reason = unsupported_reason(probe)
    if reason:
        raise ValueError(f'Clip & Concat does not apply to {name}: {reason}')
    return base


def create_model(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's model ``name`` (``cc_`` optional) with Clip & Concat applied; ``kwargs`` go to timm.  (With a
    checkpoint file: ``models.create_model(name, checkpoint_path=...)``, in models/checkpoint.py.)  Where the
    ``cc_`` name is registered (the DeiTs, the digits model), it is that model, whose ``pretrained_cfg`` names
    it (as timm's hub format writes it)."""
    base = base_name(name)
    if '.' not in base and timm.is_model('cc_' + base):
        return timm.create_model('cc_' + base, pretrained=pretrained, **kwargs)
    return apply_clip_concat(timm.create_model(base, pretrained=pretrained, **kwargs))


def patch_size(name: str) -> Tuple[int, int]:
    """The patch size (height, width) of the model behind ``name``, read off a model built on the meta device: the
    pixels of the image one token covers (:func:`token_stride`)."""
    with torch.device('meta'):
        probe = timm.create_model(base_name(name))
    return token_stride(probe.patch_embed)


def token_stride(patch_embed: nn.Module) -> Tuple[int, int]:
    """The pixels (height, width) one token covers: the patch size of timm's ``PatchEmbed``; for a hybrid
    embedding (a CNN backbone, then patches of its feature map: timm's ``HybridEmbed``, whose ``patch_size`` is
    counted in feature-map cells) the image size over the token grid."""
    if hasattr(patch_embed, 'backbone'):
        return tuple(int(i) // int(g) for i, g in zip(patch_embed.img_size, patch_embed.grid_size))
    return tuple(int(p) for p in patch_embed.patch_size)


def pretrained_cfg(name: str):
    """timm's pretrained config (input size, mean, std, crop) of the model behind ``name``."""
    return timm.models.get_pretrained_cfg(base_name(name))


# ----------------------------------------------------------------------------------------------------------
# registrations

def _cfg(**kwargs):
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': .875,
            'interpolation': 'bicubic', 'fixed_input_size': True, 'mean': (0.485, 0.456, 0.406),
            'std': (0.229, 0.224, 0.225), 'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs}


default_cfgs = generate_default_cfgs({
    'deit_digits_patch4_32': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5, 0.5, 0.5),
                                  std=(0.5, 0.5, 0.5)),
})


@register_model
def deit_digits_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A DeiT-shaped model for 32x32 digits (the mini reproduction): patch 4, width 96, depth 6, 3 heads."""
    if pretrained:
        raise ValueError('deit_digits_patch4_32 has no pretrained weights; train it with make demo')
    args = dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10)
    return build_model_with_cfg(VisionTransformer, 'deit_digits_patch4_32', False,
                                pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs))


PRETRAINED_SOURCES = ('state_dict', 'file', 'hf_hub_id', 'url')  # where timm's load_pretrained reads weights from


def _cc(base: str, pretrained: bool, kwargs) -> nn.Module:
    """timm's ``base`` with Clip & Concat applied.  Its ``pretrained_cfg`` names the ``cc_`` model as its
    ``architecture``, and ``pretrained=True`` loads the weights into the Clip & Concat model, not into timm's: a
    pruned model written in timm's hub format (``save_for_hf``, ``push_to_hf_hub``, whose config.json takes that
    name) is read back pruned by ``timm.create_model('local-dir:...'`` or ``'hf-hub:...', pretrained=True)``, where
    timm's dense model was built and refused its masks as unexpected keys; official weights load with all masks
    True, as before."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')
              or v is not None}
    model = apply_clip_concat(timm.create_model(base, **kwargs))
    model.pretrained_cfg['architecture'] = 'cc_' + base  # (the dict timm made for this model; default_cfg too)
    if pretrained and not any(model.pretrained_cfg.get(k) for k in PRETRAINED_SOURCES):
        # (timm's loader would warn and leave the random initialisation; the digits model is one)
        raise ValueError(f'cc_{base} has no pretrained weights (its pretrained_cfg names none of '
                         f'{", ".join(PRETRAINED_SOURCES)})')
    if pretrained:
        load_pretrained(model, pretrained_cfg=model.pretrained_cfg, num_classes=model.num_classes,
                        in_chans=model.patch_embed.proj.in_channels, cache_dir=kwargs.get('cache_dir'),
                        filter_fn=partial(checkpoint_filter_fn, adapt_layer_scale=True))
    return model


@register_model
def cc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-Ti with Clip & Concat masks."""
    return _cc('deit_tiny_patch16_224', pretrained, kwargs)


@register_model
def cc_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-S with Clip & Concat masks."""
    return _cc('deit_small_patch16_224', pretrained, kwargs)


@register_model
def cc_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """DeiT-B with Clip & Concat masks."""
    return _cc('deit_base_patch16_224', pretrained, kwargs)


@register_model
def cc_deit_digits_patch4_32(pretrained: bool = False, **kwargs) -> nn.Module:
    """The digits model with Clip & Concat masks."""
    return _cc('deit_digits_patch4_32', pretrained, kwargs)
