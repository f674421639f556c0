"""Taylor importance of each key token from attention probabilities and their gradients.

For block l with attention probabilities A (B, H, N, N) and G = dL/dA, a batch adds
``|sum_{b,h,i} A[b,h,i,j] * G[b,h,i,j]| / (B*H*N)`` to the score of key token j >= 1.
"""
import contextlib
from typing import Iterable, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


@contextlib.contextmanager
def _scoring_state(model: nn.Module):
    """Eval mode, all masks True, attention probabilities exposed; everything restored afterwards."""
    was_training = model.training
    saved_masks = [blk.attn.token_index.clone() for blk in model.blocks]
    try:
        model.eval()
        for blk in model.blocks:
            blk.attn.token_index.fill_(True)
            blk.attn.keep_attention_probs = True
        model.refresh_token_plan()
        yield
    finally:
        for blk, mask in zip(model.blocks, saved_masks):
            blk.attn.token_index.copy_(mask)
            blk.attn.keep_attention_probs = False
            blk.attn.attention_probs = None
        model.refresh_token_plan()
        model.train(was_training)


def attention_taylor_scores(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], criterion,
                            device='cpu', max_batches: Optional[int] = None) -> torch.Tensor:
    """Score every (layer, patch) slot; returns a float32 CPU tensor (depth, num_patches).

    No weight changes and no ``.grad`` is written: gradients are taken with respect to the attention
    probabilities only, so the backward pass skips every weight-gradient product. Under torch.distributed
    the per-process sums are all-reduced, so every process plans the same masks.
    """
    model = getattr(model, 'module', model)
    depth = len(model.blocks)
    scores = torch.zeros(depth, model.num_tokens, dtype=torch.float64, device=device)
    with _scoring_state(model), torch.enable_grad():
        for step, (images, targets) in enumerate(batches):
            if max_batches is not None and step >= max_batches:
                break
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            loss = criterion(model(images), targets)
            probs = [blk.attn.attention_probs for blk in model.blocks]
            grads = torch.autograd.grad(loss, probs)
            for layer, (a, g) in enumerate(zip(probs, grads)):
                b, h, n, _ = a.shape
                contribution = (a.detach() * g).sum(dim=(0, 1, 2)).abs() / (b * h * n)
                scores[layer] += contribution.to(torch.float64)
            del probs, grads, loss
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(scores)
    return scores[:, 1:].float().cpu()
