"""Importing this package registers the Clip & Concat DeiT variants with timm."""
from .cc_deit import (  # noqa: F401
    CCAttention, CCBlock, CCVisionTransformer, MASK_KEY, count_macs, kept_token_counts,
)
