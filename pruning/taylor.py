"""Taylor importance of each key token from attention probabilities and their gradients.

For block l with attention probabilities A (B, H, N, N; after the softmax) and G = dL/dA, a batch adds

    s_l[j] += | sum_{b,h,i} A[b,h,i,j] * G[b,h,i,j] | / (B * H * N)

to the score of every key token j that is not a prefix token (class, distillation, register tokens are never
scored).  Absolute value per batch, summed over batches.

A is read at a hook point of timm's own attention (the module ``attn.attn_drop``, applied right after the
softmax, as timm's ``AttentionExtract`` does): while scoring, each attention takes timm's explicit path
(``fused_attn = False``) instead of the fused kernel, so every branch of timm's code (q/k norms, gates,
masks) runs as written there.  Where that module sees more than one map per head, H counts the maps:
timm's ``DiffAttention`` (the ``vit_dwee_*`` models) applies it to both softmax maps of each head (B, 2H, N, N)
before taking their difference, so a token's score sums the Taylor terms of both maps, each map weighted as
a head.
"""
import contextlib
import itertools
import numbers
from typing import Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from models.clip_concat import clip_concat_model


@contextlib.contextmanager
def attention_probabilities(model: nn.Module):
    """While inside, ``captured[l]`` holds block l's attention probabilities of the last forward pass, as a
    tensor autograd can differentiate to (a leaf if nothing before it needs gradients)."""
    captured: List[Optional[torch.Tensor]] = [None] * len(model.blocks)
    handles, fused = [], [blk.attn.fused_attn for blk in model.blocks]

    def capture(layer):
        def hook(module, inputs, output):
            if not output.requires_grad:  # frozen weights: dL/dA is still needed, so A becomes a leaf
                output = output.detach().requires_grad_()
            captured[layer] = output
            return output
        return hook

    try:
        for layer, blk in enumerate(model.blocks):
            blk.attn.fused_attn = False
            handles.append(blk.attn.attn_drop.register_forward_hook(capture(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for blk, was_fused in zip(model.blocks, fused):
            blk.attn.fused_attn = was_fused
        captured[:] = [None] * len(captured)


@contextlib.contextmanager
def _scoring_state(model: nn.Module):
    """Eval mode (no dropout, no drop-path) and all masks True; both restored afterwards: each module's own
    train/eval flag, and the masks with the plan's version (the same plan: a fast path built from it stays
    valid)."""
    modes = [(module, module.training) for module in model.modules()]
    # a mask changed in place and not yet taken up gets its plan (and a new version) first: the version restored
    # below is that of the masks restored, so a fast path built from an older plan is not taken for valid again
    model.sync_token_plan()
    saved_masks = [m.clone() for m in model.masks]
    version = model.token_plan_version
    try:
        model.eval()
        model.set_dense()
        yield
    finally:
        model.set_masks(saved_masks)
        model.token_plan_version = version
        for module, was_training in modes:
            module.training = was_training


def _loss(criterion, output, targets, step: int) -> torch.Tensor:
    """The batch's loss, a scalar that autograd can differentiate to the attention probabilities."""
    loss = criterion(output, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f'batch {step}: the criterion must return a scalar loss, got {shape} (reduce it, e.g. '
                         f"reduction='mean')")
    if not loss.requires_grad:
        raise ValueError(f'batch {step}: the loss does not depend on the model\'s output through autograd (a '
                         f'criterion that detaches it, or scoring under torch.inference_mode())')
    return loss.reshape(())


def _pair(batch, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` of one batch; a ValueError saying what the batch is otherwise."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)):
        what = f'a {type(batch).__name__} of {len(batch)}: ' + ', '.join(type(item).__name__ for item in batch[:4])
    else:
        what = f'a {type(batch).__name__}'
    raise ValueError(f'batch {step}: batches must give (images, targets) pairs of tensors, got {what}')


def attention_taylor_scores(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], criterion,
                            device='cpu', max_batches: Optional[int] = None) -> torch.Tensor:
    """Score every (layer, patch) slot; returns a float32 CPU tensor (depth, num_patches).

    No weight changes and no ``.grad`` is written: gradients are taken with respect to the attention
    probabilities only, so the backward pass skips every weight-gradient product. Under torch.distributed
    the per-process sums are all-reduced, so every process plans the same masks (a process given no batch adds
    nothing; the ValueError for no batch at all is raised in every process).
    """
    model = clip_concat_model(model, 'attention_taylor_scores')  # (scoring runs it eagerly, with hooks)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):  # (a NumPy integer is a whole number too)
        raise ValueError(f'max_batches must be a whole number >= 1 (or None: every batch), got {max_batches!r}')
    if torch.is_inference_mode_enabled():
        raise RuntimeError('attention_taylor_scores needs gradients: call it outside torch.inference_mode()')
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    scores = torch.zeros(depth, model.num_tokens, dtype=torch.float64, device=device)
    scored = 0
    with _scoring_state(model), attention_probabilities(model) as probs, torch.enable_grad():
        # (islice stops before drawing a batch past the cap: an iterator the caller goes on using loses none)
        for step, batch in enumerate(itertools.islice(batches, max_batches)):
            images, targets = _pair(batch, step)
            if images.dim() and not images.shape[0]:  # no image: nothing to add (its 1 / (B·H·N) would be 0 / 0)
                continue
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            loss = _loss(criterion, model(images), targets, step)
            grads = torch.autograd.grad(loss, probs)
            scored += 1
            for layer, (a, g) in enumerate(zip(probs, grads)):
                b, h, n, _ = a.shape
                contribution = (a.detach() * g).sum(dim=(0, 1, 2)).abs() / (b * h * n)
                scores[layer] += contribution.to(torch.float64)
            del grads, loss
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if several:
        # the count travels with the scores, so every process learns in the same collective whether any scored: a
        # process that raised alone would leave the others waiting in it for ever
        packed = torch.cat([scores.flatten(), scores.new_tensor([scored])])
        dist.all_reduce(packed)
        scores, scored = packed[:-1].view_as(scores), int(packed[-1].item())
    if not scored:
        raise ValueError('no batch was scored: `batches` gave none' + (' in any process' if several else ''))
    return scores[:, prefix:].float().cpu()
