"""From plans in original token order to the concat-order masks a checkpoint stores."""
from typing import List

import torch
import torch.nn as nn


def to_concat_order(masks: torch.Tensor) -> torch.Tensor:
    """Convert per-block plans over patches (depth, num_patches; original order) to concat-order masks
    over the whole sequence (depth, 1 + num_patches; class token True).

    Block l sees its input in the order block l-1 left it in (kept first, clipped after), so its mask is
    read through a running permutation ``order`` (position -> original token id).
    """
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError('masks must be a bool tensor of shape (depth, num_patches)')
    depth, num_patches = masks.shape
    full = torch.cat([torch.ones(depth, 1, dtype=torch.bool), masks.cpu()], dim=1)
    order = torch.arange(num_patches + 1)
    out = torch.empty_like(full)
    for layer in range(depth):
        token_index = full[layer][order]
        out[layer] = token_index
        order = torch.cat([order[token_index], order[~token_index]])
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, masks: torch.Tensor) -> List[int]:
    """Write a plan (depth, num_patches; original order, True = kept) into the model's
    ``blocks.{l}.attn.token_index`` buffers and return ``channels`` (kept tokens per block, class included).
    """
    model = getattr(model, 'module', model)
    depth, num_tokens = len(model.blocks), model.num_tokens
    if tuple(masks.shape) != (depth, num_tokens - 1):
        raise ValueError(f'masks must have shape ({depth}, {num_tokens - 1}) for this model, '
                         f'got {tuple(masks.shape)}')
    concat = to_concat_order(masks.to(torch.bool))
    for blk, token_index in zip(model.blocks, concat):
        blk.attn.token_index.copy_(token_index)
    model.refresh_token_plan()
    return [int(m.sum()) for m in concat]
