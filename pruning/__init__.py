"""Choosing and applying Clip & Concat masks: Taylor attention scores, the global budget, concat order."""
from .budget import clips_nothing, num_clipped_slots, plan_masks, random_masks
from .masks import apply_masks, to_concat_order
from .taylor import attention_taylor_scores

__all__ = [
    'attention_taylor_scores', 'plan_masks', 'random_masks', 'apply_masks', 'to_concat_order',
    'num_clipped_slots', 'clips_nothing',
]
