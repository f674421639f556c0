"""DeiT with per-block Clip & Concat token pruning.

Each block owns a boolean mask ``attn.token_index`` over its input sequence, stored in *concat order*
(the order the previous block leaves its tokens in: kept first, clipped after).  Clipped tokens skip the
block unchanged; kept tokens attend among themselves only; no token is ever dropped.

Inside the blocks the tokens travel in concat order, exactly as in the reference semantics: each block
gathers its kept tokens and its clipped tokens with integer indices (``kept_pos``, ``clipped_pos``: positions
in the block's input order) and concatenates the processed kept tokens with the clipped ones.  The indices
are prepared once whenever masks change (after ``load_state_dict`` and in :func:`pruning.apply_masks`), so
``forward`` has fixed shapes: no boolean indexing, no host-device sync per block, and it compiles with
``torch.compile(fullgraph=True)``.  Two gathers and a concatenation cost less than gathering the kept tokens
and scattering them back into the original order (a scatter is several times slower than a gather on CPU).
``forward_features`` returns the tokens in their original order again (one gather), so token ``1 + p`` is
patch ``p`` as in timm; ``forward_intermediates`` leaves each block's output in its concat order.
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    'CCAttention', 'CCBlock', 'CCVisionTransformer', 'count_macs', 'kept_token_counts', 'MASK_KEY',
]

MASK_KEY = 'attn.token_index'


class CCAttention(Attention):
    """timm attention plus the block's mask buffer and a mode that exposes the attention probabilities.

    ``keep_attention_probs`` is switched on only while scoring (Taylor importance needs A and dL/dA);
    otherwise the fused ``scaled_dot_product_attention`` path of timm is used.
    """

    def __init__(self, dim: int, *args, num_tokens: int = 197, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.fused_attn = True
        self.keep_attention_probs = False
        self.attention_probs: Optional[torch.Tensor] = None
        self.register_buffer('token_index', torch.ones(num_tokens, dtype=torch.bool))

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not self.keep_attention_probs:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError('attention masks are not supported while scoring')
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if not attn.requires_grad:
            # Scoring needs dL/dA even when every weight is frozen: make A the graph's leaf.
            attn.requires_grad_()
        self.attention_probs = attn
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.proj_drop(self.proj(self.norm(x)))
        return x


class CCBlock(Block):
    """A timm block that runs only on the tokens its mask keeps and passes the others through."""

    def __init__(self, dim: int, num_heads: int, *args, num_tokens: int = 197, **kwargs):
        kwargs['attn_layer'] = CCAttention
        super().__init__(dim, num_heads, *args, **kwargs)
        self.attn.token_index = torch.ones(num_tokens, dtype=torch.bool, device=self.attn.token_index.device)
        # Positions (in this block's input order) of the tokens it processes and of those it passes on;
        # rebuilt from the masks, never saved.
        self.register_buffer('kept_pos', torch.arange(num_tokens), persistent=False)
        self.register_buffer('clipped_pos', torch.arange(0), persistent=False)
        self.dense = True

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if self.dense:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError('attention masks are not supported on a pruned block')
        kept = super().forward(x.index_select(1, self.kept_pos))
        return torch.cat([kept, x.index_select(1, self.clipped_pos)], dim=1)


class CCVisionTransformer(VisionTransformer):
    """timm's VisionTransformer whose blocks clip & concat tokens according to their masks."""

    def __init__(self, *args, **kwargs):
        kwargs['block_fn'] = CCBlock
        kwargs.setdefault('class_token', True)
        kwargs.setdefault('global_pool', 'token')
        super().__init__(*args, **kwargs)
        if self.num_prefix_tokens != 1 or not self.has_class_token:
            raise ValueError('Clip & Concat needs exactly one class token and no register tokens')
        self.num_tokens = self.patch_embed.num_patches + 1
        for blk in self.blocks:
            blk.attn.token_index = torch.ones(self.num_tokens, dtype=torch.bool)
        self.register_buffer('restore_ids', torch.arange(self.num_tokens), persistent=False)
        self.reordered = False
        self.register_load_state_dict_pre_hook(_fill_dense_masks)
        self.register_load_state_dict_post_hook(_after_load)
        self.refresh_token_plan()

    @property
    def masks(self) -> List[torch.Tensor]:
        """The per-block concat-order masks (views of the buffers)."""
        return [blk.attn.token_index for blk in self.blocks]

    @torch.no_grad()
    def refresh_token_plan(self) -> None:
        """Recompute the blocks' gather indices from the concat-order masks (call after changing masks)."""
        for layer, blk in enumerate(self.blocks):
            mask = blk.attn.token_index
            if not bool(mask[0]):
                raise ValueError(f'blocks.{layer}.{MASK_KEY}: the class token (position 0) must be kept')
            blk.kept_pos = mask.nonzero().squeeze(1)
            blk.clipped_pos = (~mask).nonzero().squeeze(1)
            blk.dense = bool(mask.all())
        order = self._token_orders()[-1]
        # restore_ids[j]: where original token j sits after the last block.
        self.restore_ids = torch.argsort(order)
        self.reordered = not torch.equal(order, torch.arange(self.num_tokens, device=order.device))

    def _token_orders(self) -> List[torch.Tensor]:
        """Position -> original token id at the input of each block, then after the last one."""
        orders = [torch.arange(self.num_tokens, device=self.blocks[0].attn.token_index.device)]
        for blk in self.blocks:
            orders.append(torch.cat([orders[-1][blk.kept_pos], orders[-1][blk.clipped_pos]]))
        return orders

    def kept_token_ids(self) -> List[torch.Tensor]:
        """Original ids (0 = class token, 1 + p = patch p) of the tokens each block processes."""
        return [order[blk.kept_pos] for order, blk in zip(self._token_orders(), self.blocks)]

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return x.index_select(1, self.restore_ids) if self.reordered else x


def _fill_dense_masks(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
    """Official DeiT weights carry no masks: read them as 'keep everything'. Check masks that are present."""
    keys = [f'{prefix}blocks.{i}.{MASK_KEY}' for i in range(len(module.blocks))]
    present = [k for k in keys if k in state_dict]
    if not present:
        for k in keys:
            state_dict[k] = torch.ones(module.num_tokens, dtype=torch.bool)
        return
    for k in present:
        mask = state_dict[k]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.numel() != module.num_tokens:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            error_msgs.append(f'{k}: mask has shape {shape}, the model needs ({module.num_tokens},)')
        elif not bool(mask[0]):
            error_msgs.append(f'{k}: the class token (position 0) must be kept')
        else:
            state_dict[k] = mask.to(torch.bool)
            continue
        state_dict[k] = torch.ones(module.num_tokens, dtype=torch.bool)  # reported once, above


def _after_load(module, incompatible_keys):
    module.refresh_token_plan()


def kept_token_counts(model: nn.Module) -> List[int]:
    """``channels``: how many tokens (class token included) each block processes."""
    return [int(blk.attn.token_index.sum()) for blk in model.blocks]


def count_macs(model: nn.Module, channels: Optional[List[int]] = None) -> int:
    """Multiply-accumulates of one image, as the paper counts them (DESIGN §6).

    Patch embedding, then per block with n kept tokens: qkv 3nC², attention 2n²C, projection nC²,
    MLP 2·r·nC² (8nC² for DeiT's ratio 4); then the head.
    """
    if channels is None:
        channels = kept_token_counts(model)
    C = model.embed_dim
    proj = model.patch_embed.proj
    patch_macs = model.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * C
    hidden = model.blocks[0].mlp.fc1.out_features
    block_macs = sum(3 * n * C * C + 2 * n * n * C + n * C * C + 2 * n * C * hidden for n in channels)
    head_macs = C * model.num_classes if model.num_classes else 0
    return patch_macs + block_macs + head_macs


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': .875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


# Pretrained weights are timm's DeiT weights (masks all True); pruned masks come from checkpoints.
default_cfgs = generate_default_cfgs({
    'cc_deit_tiny_patch16_224': _cfg(hf_hub_id='timm/deit_tiny_patch16_224.fb_in1k'),
    'cc_deit_small_patch16_224': _cfg(hf_hub_id='timm/deit_small_patch16_224.fb_in1k'),
    'cc_deit_base_patch16_224': _cfg(hf_hub_id='timm/deit_base_patch16_224.fb_in1k'),
    'cc_deit_digits_patch4_32': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0,
                                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> CCVisionTransformer:
    return build_model_with_cfg(
        CCVisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def cc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> CCVisionTransformer:
    """DeiT-Ti with Clip & Concat masks."""
    return _create('cc_deit_tiny_patch16_224', pretrained,
                   **dict(dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs))


@register_model
def cc_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> CCVisionTransformer:
    """DeiT-S with Clip & Concat masks."""
    return _create('cc_deit_small_patch16_224', pretrained,
                   **dict(dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs))


@register_model
def cc_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> CCVisionTransformer:
    """DeiT-B with Clip & Concat masks."""
    return _create('cc_deit_base_patch16_224', pretrained,
                   **dict(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs))


@register_model
def cc_deit_digits_patch4_32(pretrained: bool = False, **kwargs) -> CCVisionTransformer:
    """A DeiT-shaped model for 32x32 digits (the mini reproduction): patch 4, width 96, depth 6, 3 heads."""
    if pretrained:
        raise ValueError('cc_deit_digits_patch4_32 has no pretrained weights; train it with make demo')
    return _create('cc_deit_digits_patch4_32', False,
                   **dict(dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, num_classes=10),
                          **kwargs))
