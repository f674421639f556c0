"""Token routing of one Clip & Concat block, and the one walk of the token order through the blocks.

A block with mask ``m`` (bool over its input positions, *concat order*) computes, with ``f`` the timm block:

    keep, rest = x[:, m], x[:, ~m]          # both keep their relative order
    x = cat([f(keep), rest], dim=1)         # kept first, clipped after

Two formulations of it live here, with the same signature ``(f, x, kept_pos, clipped_pos) -> x``:

* :func:`gather_concat` — two fixed-shape gathers and a concatenation (the default): the integer positions
  are prepared whenever masks change, so ``forward`` has static shapes, no host-device sync and compiles
  with ``torch.compile(fullgraph=True)``;
* :func:`boolean_mask_concat` — the definition above taken literally, for reference and comparison
  (boolean indexing has data-dependent shapes: a sync per block on a GPU).

:func:`update_in_place` is the same block in the *original order*: tokens never move, the block reads the ones
it keeps by their original ids, in the order it would see them in concat order (so it computes exactly the same
values), and writes its outputs back to the same ids.  The model uses it where the order of the tokens is the
output (:meth:`models.clip_concat.CCModelMixin.original_order`).

A block chooses its routing through its ``routing`` attribute; a faster path (a fused GPU kernel) replaces
that function or the whole forward without touching the block's timm code.
"""
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch

BlockFn = Callable[[torch.Tensor], torch.Tensor]


def gather_concat(block: BlockFn, x: torch.Tensor, kept_pos: torch.Tensor, clipped_pos: torch.Tensor
                  ) -> torch.Tensor:
    """``cat([block(x[:, kept_pos]), x[:, clipped_pos]], 1)`` with integer positions (fixed shapes)."""
    if kept_pos.numel() == 0:  # a block that keeps nothing (possible without prefix tokens) is the identity
        return x
    return torch.cat([block(x.index_select(1, kept_pos)), x.index_select(1, clipped_pos)], dim=1)


def boolean_mask_concat(block: BlockFn, x: torch.Tensor, kept_pos: torch.Tensor, clipped_pos: torch.Tensor
                        ) -> torch.Tensor:
    """The reference: ``keep, rest = x[:, m], x[:, ~m]; cat([block(keep), rest], 1)`` with a boolean mask
    rebuilt from the positions (data-dependent shapes)."""
    mask = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    mask[kept_pos] = True
    keep, rest = x[:, mask], x[:, ~mask]
    if keep.shape[1] == 0:
        return x
    return torch.cat([block(keep), rest], dim=1)


def update_in_place(block: BlockFn, x: torch.Tensor, kept_ids: torch.Tensor) -> torch.Tensor:
    """``x`` (original order) with ``x[:, kept_ids]`` replaced by ``block(x[:, kept_ids])``; ``kept_ids``: the
    original ids of the kept tokens in the block's concat order."""
    if kept_ids.numel() == 0:
        return x
    return x.index_copy(1, kept_ids, block(x.index_select(1, kept_ids)))


def positions(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept_pos, clipped_pos): positions of True and of False entries of a concat-order mask, ascending."""
    return mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)


def walk_token_order(num_tokens: int, masks: Iterable, device=None
                     ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The running order of the tokens through the blocks: yields ``(order, mask)`` per block, where
    ``order[p]`` is the original id of the token at position ``p`` of the block's input and ``mask`` its
    concat-order mask, then one last ``(order, None)`` for the output of the last block.

    Each item of ``masks`` is a concat-order mask, or a function ``order -> mask`` (how original-order plans
    become concat-order masks: ``lambda order: plan[order]``). After each block the order is
    ``cat([order[mask], order[~mask]])``: kept first, clipped after.
    """
    order = torch.arange(num_tokens, device=device)
    for mask in masks:
        if callable(mask):
            mask = mask(order)
        yield order, mask
        order = torch.cat([order[mask], order[~mask]])
    yield order, None
