"""The global clipping budget: P = int(num_patches · depth · prune_rate) (layer, patch) slots in total
(prefix tokens are never counted), and the plans that clip exactly P of them.

plan_masks weighs each layer's scores as w_l = s_l / ||s_l||_2 · (1 - layer_decay · l), l from 0 (a layer of zero
scores weighs 0 everywhere), and clips the P slots of smallest w (ties: lower layer, then lower patch index).
random_masks clips P distinct slots drawn uniformly.
"""
import math
import numbers
from typing import List, Optional

import torch

from models.clip_concat import stacked_rows


def num_clipped_slots(depth: int, num_patches: int, prune_rate: float) -> int:
    """How many (layer, patch) slots a prune rate clips; prefix tokens (class, distillation, register) are never
    counted."""
    _check_number('prune_rate', prune_rate)
    if not 0.0 <= prune_rate < 1.0:
        raise ValueError(f'prune_rate must be in [0, 1), got {prune_rate}')
    return int(num_patches * depth * prune_rate)


def _check_number(name: str, value) -> None:
    """TypeError unless ``value`` is one real number (a Python or NumPy number, or a tensor of one real value)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.is_meta:
            raise TypeError(f'{name} must be a number, got a tensor of shape {tuple(value.shape)} ({value.dtype})')
    elif not isinstance(value, numbers.Real):
        raise TypeError(f'{name} must be a number, got {type(value).__name__}')


def _check_count(name: str, value) -> None:
    """TypeError unless ``value`` is a whole number (not a bool), ValueError if it is negative."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f'{name} must be a whole number, got {type(value).__name__} {value!r}')
    if value < 0:
        raise ValueError(f'{name} must be >= 0, got {value}')


def clips_nothing(depth: int, num_patches: int, prune_rate: float) -> Optional[str]:
    """None when ``prune_rate`` clips at least one (layer, patch) slot; otherwise the count that says it clips none,
    ``'<rate> clips int(<slots> x <rate>) = 0 of the <slots> (layer, patch) slots'``, for the caller's message."""
    if num_clipped_slots(depth, num_patches, prune_rate):
        return None
    slots = depth * num_patches
    return f'{prune_rate:g} clips int({slots} x {prune_rate:g}) = 0 of the {slots} (layer, patch) slots'


def plan_masks(scores: torch.Tensor, prune_rate: float, layer_decay: float = 0.005) -> torch.Tensor:
    """Keep/clip plan in original token order from per-layer importance scores (depth, num_patches; a tensor, an
    array or a list).

    Each layer is L2-normalised so layers compete on equal terms (a layer of zero scores stays zero: its slots
    are clipped first), then scaled by ``1 - layer_decay * l`` so deeper layers give up tokens slightly more
    readily (a prior that is not positive in every layer is refused: at 0 or below it would clip a layer's most
    important tokens first). The P smallest weighted scores are clipped; ties go to the lower layer, then the
    lower token index (a stable sort over the row-major order).
    """
    rows = stacked_rows(scores, 'scores')  # one tensor per layer, as apply_masks takes the rows of a plan
    if rows is not None:
        if rows.is_meta:
            raise TypeError('scores must be real numbers with values, got rows that are tensors of the meta device')
        scores = rows
    if not isinstance(scores, torch.Tensor):
        try:
            scores = torch.as_tensor(scores)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f'scores must be numbers (depth, num_patches): a tensor, an array or a list, got '
                            f'{type(scores).__name__}') from None
    if scores.is_complex() or scores.is_meta:
        raise TypeError(f'scores must be real numbers with values, got a {scores.dtype} tensor'
                        f'{" of the meta device" if scores.is_meta else ""}')
    if scores.dim() != 2:
        raise ValueError(f'scores must be (depth, num_patches), got shape {tuple(scores.shape)}')
    depth, num_patches = scores.shape
    budget = num_clipped_slots(depth, num_patches, prune_rate)
    s = scores.detach().to('cpu', torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f'scores hold NaN or infinite values (layers {_layers_where(~torch.isfinite(s))}), which '
                         f'would decide the plan arbitrarily; a non-finite loss while scoring gives them')
    if bool((s < 0).any()):  # (the prior scales magnitudes: on a negative score it would keep deeper tokens first)
        raise ValueError(f'scores hold negative values (layers {_layers_where(s < 0)}): importance scores are '
                         f'magnitudes (Taylor scores are |A * dL/dA|), and the depth prior would rank negative ones '
                         f'the other way round')
    _check_number('layer_decay', layer_decay)
    if not math.isfinite(float(layer_decay)):
        raise ValueError(f'layer_decay must be a finite number, got {layer_decay}')
    # each layer divided by its largest score first: the norm of scores far from 1 (1e-200, 1e200) underflows to 0
    # or overflows to inf, which would weigh a layer that is not all zeros 0 everywhere (its slots clipped first)
    peaks = s.amax(dim=1, keepdim=True) if num_patches else s.sum(dim=1, keepdim=True)
    # (a peak below float64's smallest normal number, 2.2e-308, is divided by as it is: raised to that number, it left
    # the layer's scores far below 1, their norm then taken as 1, and the layer clipped first as if it were zeros)
    scaled = torch.where(peaks > 0, s / torch.where(peaks > 0, peaks, torch.ones_like(peaks)), torch.zeros_like(s))
    norms = scaled.norm(dim=1, keepdim=True)  # (1 or more where a score is not 0: no underflow, no overflow)
    normalised = torch.where(norms > 0, scaled / norms.clamp_min(1.0), torch.zeros_like(s))
    prior = 1.0 - layer_decay * torch.arange(depth, dtype=torch.float64).unsqueeze(1)
    if depth and float(prior[-1]) <= 0:  # a prior of 0 ranks a whole layer first; a negative one inverts its ranking
        raise ValueError(f'layer_decay {layer_decay} makes the depth prior of layer {depth - 1}, 1 - {layer_decay} x '
                         f'{depth - 1} = {float(prior[-1]):g}, not positive: that layer\'s most important tokens would '
                         f'be clipped first (for {depth} layers, layer_decay < {1 / (depth - 1):g})')
    weighted = (normalised * prior).flatten()
    order = torch.sort(weighted, stable=True).indices
    keep = torch.ones(depth * num_patches, dtype=torch.bool)
    keep[order[:budget]] = False
    return keep.view(depth, num_patches)


def _layers_where(where: torch.Tensor) -> List[int]:
    """The layers (rows) of a (depth, num_patches) bool tensor that hold a True, for a message."""
    return sorted({int(layer) for layer in where.nonzero()[:, 0]})


def random_masks(depth: int, num_patches: int, prune_rate: float,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random baseline: exactly P distinct (layer, patch) slots clipped, drawn uniformly."""
    _check_count('depth', depth)
    _check_count('num_patches', num_patches)
    budget = num_clipped_slots(depth, num_patches, prune_rate)
    keep = torch.ones(depth * num_patches, dtype=torch.bool)
    keep[torch.randperm(depth * num_patches, generator=generator)[:budget]] = False
    return keep.view(depth, num_patches)
