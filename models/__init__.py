"""Clip & Concat models: any timm ViT converted in place, the registered ``cc_deit_*`` names, FLOPs, and the
model-from-checkpoint builder.  Importing this package registers the ``cc_deit_*`` models with timm.

    model = models.apply_clip_concat(timm.create_model('vit_small_patch16_224'))   # in place, masks all True
    model = models.create_model('cc_deit_small_distilled_patch16_224')             # by timm name, cc_ optional
"""
from . import routing  # noqa: F401
from .checkpoint import (build_model, build_model_from_checkpoint, check_recorded_name, create_model, dense_copy,
                         head_classes, load_entry, load_weights)
from .clip_concat import (MASK_KEY, CCBlock, CCVisionTransformer, apply_clip_concat, is_clip_concat,
                          kept_token_counts, unsupported_reason)
from .flops import attention_width, count_macs
from .zoo import base_name, check_model_name, patch_size, pretrained_cfg

__all__ = [
    'MASK_KEY', 'CCBlock', 'CCVisionTransformer', 'apply_clip_concat', 'is_clip_concat', 'kept_token_counts',
    'unsupported_reason', 'attention_width', 'count_macs', 'base_name', 'check_model_name', 'create_model',
    'patch_size', 'pretrained_cfg',
    'build_model', 'build_model_from_checkpoint', 'check_recorded_name', 'dense_copy', 'head_classes', 'load_entry',
    'load_weights',
]
