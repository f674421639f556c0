"""From plans in original token order to the concat-order masks a checkpoint stores, and applying them."""
import numbers
from typing import List

import torch
import torch.nn as nn

from models.clip_concat import as_mask_tensor, clip_concat_model, mask_values_problem
from models.routing import walk_token_order


def to_concat_order(masks: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Convert per-block plans over patches (depth, num_patches; original order, True = kept) to concat-order
    masks over the whole sequence (depth, num_prefix_tokens + num_patches; prefix tokens True).

    Block l sees its input in the order block l-1 left it in (kept first, clipped after), so its mask is the
    plan read through the running order (position -> original token id, the identity at block 0):
    ``token_index_l[p] = plan_l[order[p]]``, then ``order = cat([order[token_index_l], order[~token_index_l]])``.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2 or masks.dtype != torch.bool:  # (an array: no .dim)
        raise ValueError('masks must be a bool tensor of shape (depth, num_patches)')
    if (isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral)
            or num_prefix_tokens < 0):  # (a negative count failed in torch.ones, a fraction in its size)
        raise ValueError(f'num_prefix_tokens must be a whole number >= 0, got {num_prefix_tokens!r}')
    depth, num_patches = masks.shape
    full = torch.cat([torch.ones(depth, num_prefix_tokens, dtype=torch.bool), masks.cpu()], dim=1)
    walk = walk_token_order(num_prefix_tokens + num_patches, (lambda order, row=row: row[order] for row in full))
    return torch.stack([mask for _, mask in walk if mask is not None]) if depth else full


@torch.no_grad()
def apply_masks(model: nn.Module, masks: torch.Tensor) -> List[int]:
    """Write a plan (depth, num_patches; original order, True = kept) into the model's
    ``blocks.{l}.attn.token_index`` buffers and return ``channels`` (kept tokens per block, prefix included).
    The plan is bool, or numbers that are all 0 or 1: a tensor, an array, nested lists, or a list of rows.
    """
    model = clip_concat_model(model, 'apply_masks')
    masks = as_mask_tensor(masks, 'masks')
    depth, num_patches = len(model.blocks), model.num_tokens - model.num_prefix_tokens
    if tuple(masks.shape) != (depth, num_patches):
        raise ValueError(f'masks must have shape ({depth}, {num_patches}) for this model, '
                         f'got {tuple(masks.shape)}')
    problem = mask_values_problem(masks)
    if problem:  # scores, say: read as booleans they would keep every token whose score is not zero
        raise ValueError(f'masks: {problem} (scores become a plan through pruning.plan_masks)')
    return model.set_masks(to_concat_order(masks.to(torch.bool), model.num_prefix_tokens))
