"""Clip & Concat for any timm ``VisionTransformer``, applied in place.

Each block owns a boolean mask ``blocks.{l}.attn.token_index`` over its whole input sequence (prefix tokens
and patches), in *concat order*: the order the previous block leaves its tokens in, kept first, clipped
after.  Clipped tokens skip the block unchanged; kept tokens attend among themselves only; no token is
ever dropped (docs/method.md).

:func:`apply_clip_concat` changes an existing timm model through the smallest surface: the class of the
model and of each block is swapped for a subclass that adds the routing (nothing of timm's code is copied
or changed: the block still runs timm's own ``Block.forward`` on the tokens it keeps), and each attention
module gets the mask buffer, so masks travel with the state dict.  With all masks True the model computes
exactly what timm's model computes.

Prefix tokens (class, distillation and register tokens) are always kept, so they stay at the front of the
sequence through every block and the head reads them where timm reads them; pooled heads (global average,
attention pooling) do not depend on the order of the tokens at all.

Inside the blocks tokens travel in concat order, as in the reference semantics: the positions of the kept
and of the clipped tokens are prepared whenever masks change (after ``load_state_dict``, in
:meth:`CCModelMixin.set_masks`, and at the next forward after a change made to the mask buffers in place),
so ``forward`` has fixed shapes (no host-device sync per block, and ``torch.compile(fullgraph=True)`` works).
``forward_features`` returns the tokens in their original order again (token ``num_prefix_tokens + p`` is
patch ``p``, as in timm); ``forward`` skips that reordering when the head reads the prefix tokens or pools,
and keeps it for a head that does neither (``global_pool=''``: a prediction per token) and for a subclass of
``VisionTransformer`` with a ``forward`` of its own (which runs as it is).  ``forward_intermediates`` (timm's)
runs the blocks in the original order (:meth:`CCModelMixin.original_order`), so each block's output, as timm
returns it, is in original order too and its feature maps are the image's patch grid.
"""
import contextlib
from typing import Dict, List, Optional, Sequence, Type

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent, AttentionPoolPrr, to_2tuple
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer

from .routing import gather_concat, positions, update_in_place, walk_token_order

__all__ = ['MASK_KEY', 'CCBlock', 'CCVisionTransformer', 'apply_clip_concat', 'clip_concat_model', 'is_clip_concat',
           'kept_token_counts', 'as_mask_tensor', 'mask_values_problem', 'prefix_rule']

MASK_KEY = 'attn.token_index'  # blocks.{l}.attn.token_index: the block's concat-order mask (bool)


class CCBlockMixin:
    """Runs the timm block it is mixed into on the tokens its mask keeps; the others pass through.

    Set by :func:`apply_clip_concat` and :meth:`CCModelMixin.refresh_token_plan`: ``kept_pos`` and
    ``clipped_pos`` (positions in this block's input order, non-persistent buffers), ``kept_ids`` (the original
    ids of the kept tokens, in that order; ``ids_in_order``: they are 0, 1, 2, ...), ``dense`` (every token kept:
    timm's forward as is), ``routing`` (a function of :mod:`models.routing`) and ``in_original_order`` (tokens
    arrive and leave in their original order: :func:`models.routing.update_in_place`).
    """

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        timm_forward = super().forward
        # in the original order, by id, unless the block takes every token in their original order anyway
        in_place = self.in_original_order and not (self.dense and self.ids_in_order)
        if self.dense and not in_place:
            if attn_mask is None and not is_causal:  # called as timm calls its blocks (a subclass may take x alone)
                return timm_forward(x)
            return timm_forward(x, attn_mask=attn_mask, is_causal=is_causal)
        x = _without_attention_mask(x, attn_mask, is_causal)
        if in_place:
            return update_in_place(timm_forward, x, self.kept_ids)
        return self.routing(timm_forward, x, self.kept_pos, self.clipped_pos)

    def __prepare_scriptable__(self):
        _refuse_scripting()


@torch.fx.wrap
def _without_attention_mask(x: torch.Tensor, attn_mask, is_causal) -> torch.Tensor:
    """``x``, or ValueError when a pruned block is given an attention mask (its masks would need the token routing
    too).  A leaf of FX's symbolic tracing (timm's ``create_feature_extractor``), which passes the model's
    ``attn_mask`` and ``is_causal`` as proxies whatever they will be: the check runs on the values the traced
    module is called with, where a test on the proxies refused every pruned model (timm's dense one traces)."""
    if attn_mask is not None or is_causal:
        raise ValueError('attention masks are not supported on a pruned block')
    return x


def _mask_buffer(layer: int, blk: nn.Module) -> torch.Tensor:
    """Block ``layer``'s mask buffer; TypeError naming the block when its attention module has none: one replaced
    after the model was converted (timm's model takes any module there) drops the mask it held, and the
    AttributeError raised inside :attr:`CCModelMixin.masks` was reported by nn.Module as the model having no
    attribute ``masks``."""
    attn = getattr(blk, 'attn', None)
    if isinstance(attn, nn.Module) and 'token_index' in attn._buffers:
        return attn.token_index
    kind = type(attn).__name__
    raise TypeError(f'blocks.{layer}.attn ({"an" if kind[:1] in "AEIOU" else "a"} {kind}) has no mask buffer '
                    f'token_index: an attention module replaced after apply_clip_concat does not take over the mask '
                    f'of the one it replaces; give it that mask (new.register_buffer("token_index", '
                    f'old.token_index)), or replace the layers inside the attention (such as attn.qkv) instead')


def _refuse_scripting():
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on the module and each submodule before compiling (not
    at a forward): its own error on a Clip & Concat model ("'Tensor' object has no attribute or method 'forward'")
    named neither the cause nor the remedy."""
    raise RuntimeError('torch.jit.script cannot compile a Clip & Concat model: its blocks call timm\'s Block.forward '
                       'through super() and route tokens with a function chosen per block, which TorchScript does not '
                       'support; use torch.jit.trace (it records the masks of the moment) or torch.compile')


class CCModelMixin:
    """The mask API of a Clip & Concat model, mixed into its timm class by :func:`apply_clip_concat`.

    ``num_tokens``: length of the sequence the blocks see (prefix tokens + patches).
    """

    def __prepare_scriptable__(self):
        _refuse_scripting()

    def __setstate__(self, state):
        """A copy (``copy.deepcopy``, pickle, ``torch.load`` of the whole model) has mask tensors whose version
        counters start again, and may equal the ones the plan was stamped with although a mask was changed in place
        after it: the copy's next sync compares the masks' values instead (:meth:`sync_token_plan`)."""
        super().__setstate__(state)
        planned = getattr(self, '_planned_masks', None)
        if planned is not None:
            self._planned_masks = [(mask, -1) for mask, _ in planned]

    def type(self, dst_type):
        """nn.Module's ``type`` (it casts every parameter and buffer) for the floating-point tensors only, as
        ``.half()``, ``.double()`` and ``.to(dtype)`` cast: the masks stay boolean and the token positions integers,
        which cast they broke the model (and ``set_masks``, which writes into the mask buffers)."""
        return self._apply(lambda t: t.type(dst_type) if t.is_floating_point() else t)

    @property
    def masks(self) -> List[torch.Tensor]:
        """The per-block concat-order masks (the buffers themselves: a change made to them in place, such as
        ``model.masks[3][7] = False`` or an EMA copying its model's buffers, is taken up by the next forward,
        :meth:`sync_token_plan`)."""
        return [_mask_buffer(layer, blk) for layer, blk in enumerate(self.blocks)]

    @torch.no_grad()
    def set_masks(self, concat_masks: Sequence[torch.Tensor]) -> List[int]:
        """Write concat-order masks (one row of length ``num_tokens`` per block: bool, or numbers that are all 0
        or 1; tensors, arrays or lists) and return the kept counts.  Plans in original order go through
        ``pruning.apply_masks``."""
        if (isinstance(concat_masks, (str, bytes)) or not hasattr(concat_masks, '__iter__')
                or getattr(concat_masks, 'ndim', 1) == 0):
            raise TypeError(f'set_masks takes one mask per block (a list of rows, or a 2-d tensor or array), got '
                            f'{_described(concat_masks)}')
        concat_masks = [as_mask_tensor(mask, f'blocks.{layer}.{MASK_KEY}')
                        for layer, mask in enumerate(concat_masks)]
        if len(concat_masks) != len(self.blocks):
            raise ValueError(f'{len(concat_masks)} masks for {len(self.blocks)} blocks')
        for layer, mask in enumerate(concat_masks):  # all checked before any is written: a refusal changes nothing
            if tuple(mask.shape) != (self.num_tokens,):
                raise ValueError(f'blocks.{layer}.{MASK_KEY}: a mask has shape {tuple(mask.shape)}, the model needs '
                                 f'({self.num_tokens},)')
            problem = mask_values_problem(mask)
            if problem:
                raise ValueError(f'blocks.{layer}.{MASK_KEY}: {problem}')
            self._check_prefix_kept(layer, mask.to(torch.bool))
        # copies first: a row may be (a view of) another block's buffer, as in set_masks(model.masks[::-1])
        concat_masks = [mask.to(torch.bool, copy=True) for mask in concat_masks]
        for buffer, mask in zip(self.masks, concat_masks):
            buffer.copy_(mask)
        self.refresh_token_plan()
        return kept_token_counts(self)

    @torch.no_grad()
    def set_dense(self) -> None:
        """Every mask True: the dense model of the same weights."""
        for mask in self.masks:
            mask.fill_(True)
        self.refresh_token_plan()

    def _check_mask_buffers(self) -> None:
        """Each block's mask is still a boolean tensor of ``num_tokens`` entries, else TypeError/ValueError naming
        it: a buffer replaced by assignment (``blk.attn.token_index = t``) with numbers was read as indices (an
        integer's ``~`` is not its negation) or failed deep inside the plan.  Masks batched by ``torch.func.vmap``
        (an ensemble's ``stack_module_state`` buffers) are a TypeError too: they failed in torch's words
        ("Batching rule not implemented for aten::equal")."""
        for layer, mask in enumerate(self.masks):
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                what = (_described(mask) if not isinstance(mask, torch.Tensor)
                        else f'a tensor of dtype {str(mask.dtype).replace("torch.", "")}')
                raise TypeError(f'blocks.{layer}.{MASK_KEY} (the block\'s mask: True keeps the token) is {what}; '
                                f'masks are boolean: write them with model.set_masks(...), which takes 0/1 numbers '
                                f'too, or in place (model.masks[{layer}][p] = False)')
            if tuple(mask.shape) != (self.num_tokens,):
                raise ValueError(f'blocks.{layer}.{MASK_KEY}: a mask has shape {tuple(mask.shape)}, the model needs '
                                 f'({self.num_tokens},)')
            if torch._C._functorch.is_batchedtensor(mask):
                raise TypeError(f'blocks.{layer}.{MASK_KEY} is batched by torch.func.vmap (the buffers of '
                                f'stack_module_state, say): a mask decides which tokens the block routes, one mask for '
                                f'the whole batch; vmap over the parameters only, with the buffers not batched '
                                f'(in_dims=None, or functional_call(model, params, ...))')

    def _check_prefix_kept(self, layer: int, mask: torch.Tensor) -> None:
        """Block ``layer``'s bool mask keeps every prefix token (class, distillation, register), else ValueError."""
        if not bool(mask[:self.num_prefix_tokens].all()):
            rule = prefix_rule(self.num_prefix_tokens, _has_class_token(self))
            raise ValueError(f'blocks.{layer}.{MASK_KEY}: {rule}')

    @torch.no_grad()
    def refresh_token_plan(self) -> None:
        """Recompute the blocks' positions from the masks (called after every change of masks).  On the meta
        device (a model built to be materialised by ``load_state_dict(..., assign=True)``) masks have no values:
        nothing is computed until they do.  The positions are ordinary tensors even when the masks change under
        ``torch.inference_mode`` (tensors made there could not be used by a forward that trains)."""
        self.token_plan_version = getattr(self, 'token_plan_version', 0) + 1  # what was built from a plan can tell
        self._check_mask_buffers()
        if any(mask.is_meta for mask in self.masks):
            return
        with torch.inference_mode(False):
            self._plan_positions()
        self._stamp_masks()

    def _plan_positions(self) -> None:
        orders = self.token_orders()
        for layer, (blk, order) in enumerate(zip(self.blocks, orders)):
            mask = blk.attn.token_index
            self._check_prefix_kept(layer, mask)
            blk.kept_pos, blk.clipped_pos = positions(mask)
            blk.kept_ids = order[blk.kept_pos]
            blk.ids_in_order = bool(torch.equal(blk.kept_ids, torch.arange(blk.kept_ids.numel(),
                                                                           device=blk.kept_ids.device)))
            blk.dense = bool(mask.all())
        order = orders[-1]
        self.restore_ids = torch.argsort(order)  # restore_ids[j]: where original token j is after the blocks
        self.reordered = not torch.equal(order, torch.arange(self.num_tokens, device=order.device))

    def _stamp_masks(self) -> None:
        """Remember the mask tensors the plan was made from, their in-place version counters and their values."""
        masks = self.masks
        self._planned_masks = [(mask, _version_of(mask)) for mask in masks]
        self._planned_values = torch.stack(masks).cpu() if masks else None

    def sync_token_plan(self) -> None:
        """Recompute the plan if a mask buffer was changed in place or replaced since it was made (the masks are
        the buffers themselves, written by whatever writes buffers: ``model.masks[l][p] = False``, an EMA of the
        model's state dict, a broadcast of buffers).  Cheap when nothing changed (no device sync); called by
        ``forward``, ``forward_features``, ``forward_intermediates`` and ``kept_token_ids``.  Not inside
        ``torch.compile`` (which traces the plan of the moment: call :meth:`refresh_token_plan` after changing
        masks in place) nor in DataParallel's replicas (their buffers are copies made per forward)."""
        if torch.compiler.is_compiling() or getattr(self, '_is_replica', False):
            return
        masks = self.masks
        planned = getattr(self, '_planned_masks', None)
        if planned is not None and len(planned) == len(masks) and all(
                mask is was and _version_of(mask) == version for mask, (was, version) in zip(masks, planned)):
            return
        self._check_mask_buffers()  # (before they are stacked: one replaced by another kind of tensor)
        if any(mask.is_meta for mask in masks):  # no values yet (see refresh_token_plan)
            return
        values = getattr(self, '_planned_values', None)
        if (planned is not None and values is not None and len(planned) == len(masks)
                and torch.equal(torch.stack(masks).cpu(), values)):  # the same masks (moved, or copied over)
            self._stamp_masks()
            return
        self.refresh_token_plan()

    def token_orders(self) -> List[torch.Tensor]:
        """Position -> original token id at the input of each block, then after the last block."""
        device = self.blocks[0].attn.token_index.device
        return [order for order, _ in walk_token_order(self.num_tokens, self.masks, device)]

    def kept_token_ids(self) -> List[torch.Tensor]:
        """Original ids of the tokens each block processes (prefix tokens first, then ``prefix + p`` for
        patch ``p``), in the order the block sees them."""
        self.sync_token_plan()
        return [blk.kept_ids.clone() for blk in self.blocks]

    @contextlib.contextmanager
    def original_order(self):
        """Inside, tokens stay in their original order through the blocks: each block reads the tokens it keeps
        by id and writes its outputs back in their places (:func:`models.routing.update_in_place`; the same
        values, as each block sees its kept tokens in the same order).  Slower than the concat order (a gather
        and a scatter of the whole sequence per block); for outputs whose token order matters."""
        previous = [blk.in_original_order for blk in self.blocks]
        for blk in self.blocks:
            blk.in_original_order = True
        try:
            yield self
        finally:
            for blk, was in zip(self.blocks, previous):
                blk.in_original_order = was

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False,
                         restore_order: bool = True) -> torch.Tensor:
        self.sync_token_plan()
        x = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        moved = self.reordered and not self.blocks[-1].in_original_order
        return x.index_select(1, self.restore_ids) if restore_order and moved else x

    def forward_intermediates(self, *args, **kwargs):
        """timm's ``forward_intermediates`` (same arguments and results) with the blocks run in the original
        order, so every intermediate is in original order and its NCHW map is the image's patch grid."""
        self.sync_token_plan()
        with self.original_order():
            return super().forward_intermediates(*args, **kwargs)

    def prune_intermediate_layers(self, *args, **kwargs):
        """timm's (same arguments and result): the blocks past the last index kept are removed, so the order the
        last remaining block leaves the tokens in is another one, which ``forward_features`` must undo."""
        result = super().prune_intermediate_layers(*args, **kwargs)
        self.refresh_token_plan()
        return result

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's (same arguments).  Masks hold one entry per token of the current input, so a pruned model is
        refused (ValueError, nothing changed: its tokens past the old count would be dropped without a word); a
        dense one gets masks of the new length, all True."""
        self.sync_token_plan()
        same = ((img_size is None or to_2tuple(img_size) == tuple(self.patch_embed.img_size))
                and (patch_size is None or to_2tuple(patch_size) == tuple(self.patch_embed.patch_size)))
        if not same and not all(blk.dense for blk in self.blocks):
            raise ValueError('set_input_size of a pruned model: its masks are planned for '
                             f'{self.num_tokens} tokens (set_dense() first, then plan masks for the new size)')
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        if num_tokens != self.num_tokens:
            for blk in self.blocks:
                mask = blk.attn.token_index
                blk.attn.token_index = torch.ones(num_tokens, dtype=torch.bool, device=mask.device)
            self.num_tokens = num_tokens
            self.refresh_token_plan()

    # True for a subclass of VisionTransformer with a forward of its own (set by _with_mixin): run that forward,
    # which sees the tokens in their original order from forward_features
    runs_subclass_forward = False

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if self.runs_subclass_forward:  # (called as the subclass is called: it may take x alone)
            if attn_mask is None and not is_causal:
                return super().forward(x)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        # A head that reads the prefix tokens (always at the front) or pools over all tokens does not depend on
        # their order: the tokens go to it in concat order.  Any other head gets them in original order, as timm.
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal,
                                                       restore_order=not _head_ignores_order(self)))


def _timm_head(model: nn.Module) -> bool:
    """Whether the model's head is timm's own, whose reading of the tokens is known: VisionTransformer's
    ``forward_head`` with its ``pool``, or DeiT's distilled ``forward_head`` (the class and distillation tokens);
    not one of a subclass's own, nor one set on the model object itself (which may read any token)."""
    own, cls = vars(model), type(model)
    if 'forward_head' in own or 'pool' in own:
        return False
    return (cls.forward_head is VisionTransformerDistilled.forward_head
            or (cls.forward_head is VisionTransformer.forward_head and cls.pool is VisionTransformer.pool))


def _head_ignores_order(model: nn.Module) -> bool:
    """Whether the model's head gives the same result whatever the order of the tokens after the prefix tokens:
    timm's own head (or DeiT's distilled one) reading prefix tokens, pooling over the tokens, or attention pooling
    without a position term.  Not so (the head must get the original order) for a head without pooling
    (``global_pool=''``: one prediction per token), token pooling without a prefix token (set by hand: timm's
    constructor refuses it; position 0 is patch 0), an attention pool with a position embedding, a PRR pool that
    reads position 0 without the prefix tokens, or a head not timm's own (:func:`_timm_head`)."""
    if not _timm_head(model):
        return False
    if type(model).forward_head is VisionTransformerDistilled.forward_head:
        return True  # (the class and distillation tokens, always at the front)
    pool, prefix = model.attn_pool, model.num_prefix_tokens
    if pool is None:
        return model.global_pool in ('avg', 'avgmax', 'max') or (model.global_pool == 'token' and prefix > 0)
    if type(pool) is AttentionPoolLatent:
        return pool.pos_embed is None
    if type(pool) is AttentionPoolPrr:
        return pool.pool == 'avg' or (pool.pool == 'token' and model.pool_include_prefix and prefix > 0)
    return False


def _version_of(tensor: torch.Tensor) -> Optional[int]:
    """The in-place version counter of ``tensor``; None for a tensor made in ``torch.inference_mode`` (which has
    none: a change to it in place, possible only in inference mode, is not seen)."""
    return None if tensor.is_inference() else tensor._version


class CCBlock(CCBlockMixin, Block):
    """timm's ``Block`` with Clip & Concat routing."""


class CCVisionTransformer(CCModelMixin, VisionTransformer):
    """timm's ``VisionTransformer`` with Clip & Concat masks."""


_CLASSES: Dict[type, type] = {Block: CCBlock, VisionTransformer: CCVisionTransformer}


def _with_mixin(cls: Type[nn.Module], mixin: type) -> type:
    """The C&C subclass of a timm class (made once per class, and kept in this module so it pickles)."""
    if cls not in _CLASSES:
        name = 'CC' + cls.__name__
        attrs = {'__module__': __name__, '__doc__': f'{cls.__name__} with Clip & Concat masks.'}
        if mixin is CCModelMixin:
            own = next(c for c in cls.__mro__ if 'forward' in vars(c))
            attrs['runs_subclass_forward'] = own is not VisionTransformer
        _CLASSES[cls] = type(name, (mixin, cls), attrs)
        globals().setdefault(name, _CLASSES[cls])
    return _CLASSES[cls]


def __getattr__(name: str) -> type:
    """The Clip & Concat subclass ``CC<name>`` of a timm class loaded in this process, made on first use: a model
    pickled whole (``torch.save(model)``, a spawned worker) names its class, which :func:`_with_mixin` makes only
    when a model of that class is converted, so a fresh process that unpickles it has not made it yet."""
    if name.startswith('CC'):
        for base, mixin in ((VisionTransformer, CCModelMixin), (Block, CCBlockMixin)):
            found, stack = [], [base]
            while stack:
                cls = stack.pop()
                stack.extend(cls.__subclasses__())
                if cls.__name__ == name[2:] and not issubclass(cls, (CCModelMixin, CCBlockMixin)):
                    found.append(cls)
            if found:
                return _with_mixin(found[0], mixin)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def is_clip_concat(model: nn.Module) -> bool:
    """Whether ``model`` is a Clip & Concat model, or wraps one (DistributedDataParallel, ``torch.compile``)."""
    model = getattr(model, 'module', model)
    return isinstance(getattr(model, '_orig_mod', model), CCModelMixin)


def clip_concat_model(model: nn.Module, needed_by: str) -> nn.Module:
    """The Clip & Concat model inside ``model`` (a DistributedDataParallel or ``torch.compile`` wrapper is looked
    through); a TypeError naming ``needed_by`` if there is none."""
    model = getattr(model, 'module', model)
    model = getattr(model, '_orig_mod', model)
    if not hasattr(model, 'set_masks'):
        raise TypeError(f'{needed_by} needs a Clip & Concat model, got a {type(model).__name__} '
                        f'(models.apply_clip_concat(model) converts a timm VisionTransformer in place)')
    return model


def unsupported_reason(model: nn.Module) -> Optional[str]:
    """Why Clip & Concat cannot be applied to ``model`` (None if it can)."""
    if not isinstance(model, VisionTransformer):
        name = type(model).__name__
        return f'it is {"an" if name[:1] in "AEIO" else "a"} {name}, not a timm VisionTransformer'
    if len(model.blocks) == 0:
        return 'it has no blocks (depth=0): masks are per block, and there is none to prune'
    if getattr(model, 'dynamic_img_size', False):
        return 'it has dynamic_img_size=True (masks need a fixed number of patches)'
    if not isinstance(model.patch_drop, nn.Identity):
        return 'it drops patches at random in training (patch_drop_rate > 0)'
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, Block):
            return f'blocks.{i} is a {type(blk).__name__}; Clip & Concat patches timm\'s Block'
    return None


def apply_clip_concat(model: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` a Clip & Concat model in place (all masks True) and return it.

    Weights, their names and the forward pass are unchanged; added are the mask buffers
    ``blocks.{l}.attn.token_index`` and the mask API of :class:`CCModelMixin`.  A state dict without masks
    (official timm/DeiT weights) loads as "keep everything"; one with masks sets them (strictly checked).  A model
    without a position embedding gets a check on its patch embedding (:func:`_check_patch_count`): images of
    another number of patches are refused, as a position embedding refuses them in the others.
    """
    if isinstance(model, CCModelMixin):
        return model
    reason = unsupported_reason(model)
    if reason:
        raise ValueError(f'cannot apply Clip & Concat: {reason}')
    num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    device = next(model.parameters()).device  # (a hybrid's patch embedding may have no projection)
    model.__class__ = _with_mixin(type(model), CCModelMixin)
    model.num_tokens = num_tokens
    for blk in model.blocks:
        blk.__class__ = _with_mixin(type(blk), CCBlockMixin)
        blk.attn.register_buffer('token_index', torch.ones(num_tokens, dtype=torch.bool, device=device))
        blk.register_buffer('kept_pos', torch.arange(num_tokens, device=device), persistent=False)
        blk.register_buffer('clipped_pos', torch.arange(0, device=device), persistent=False)
        blk.register_buffer('kept_ids', torch.arange(num_tokens, device=device), persistent=False)
        blk.dense = blk.ids_in_order = True
        blk.in_original_order = False
        blk.routing = gather_concat
    model.register_buffer('restore_ids', torch.arange(num_tokens, device=device), persistent=False)
    model.reordered = False
    model.register_load_state_dict_pre_hook(_fill_dense_masks)
    model.register_load_state_dict_post_hook(_after_load)
    if getattr(model, 'pos_embed', None) is None:  # (one with a position embedding refuses another count itself)
        model.patch_embed.register_forward_hook(_check_patch_count)
    model.refresh_token_plan()
    return model


def _check_patch_count(patch_embed, args, patches) -> None:
    """After the patch embedding of a model without a position embedding, which nothing else stops from taking
    images of another size (a patch embedding that does not check it, as a hybrid's CNN stem): ValueError unless
    they give the number of patches the masks were planned for (a pruned block would silently drop the tokens
    past them, or fail on an index)."""
    tokens = patches.numel() // (patches.shape[0] * patches.shape[-1])  # (B, N, C) or (B, H, W, C)
    if tokens != patch_embed.num_patches:  # (a message torch.compile can trace: f-strings of ints)
        (h, w), (model_h, model_w) = args[0].shape[-2:], patch_embed.img_size
        raise ValueError(f'images of {h}x{w} pixels give {tokens} patch tokens; this Clip & Concat model has masks '
                         f'for {patch_embed.num_patches} ({model_h}x{model_w} pixels): resize the images, or '
                         f'set_input_size on the dense model')


def prefix_rule(num_prefix_tokens: int, class_token: bool = True) -> str:
    """The rule a mask broke by clipping a prefix token; ``class_token``: whether the model has one (a single
    prefix token is otherwise a register token)."""
    if num_prefix_tokens == 1:
        return f'the {"class" if class_token else "register"} token (position 0) must be kept'
    return (f'the {num_prefix_tokens} prefix tokens (positions 0-{num_prefix_tokens - 1}: class, distillation or '
            f'register tokens) must be kept')


def _has_class_token(model: nn.Module) -> bool:
    return getattr(model, 'cls_token', None) is not None


def as_mask_tensor(value, name: str) -> torch.Tensor:
    """``value``, a mask or a plan (a tensor, an array, a list of numbers or of tensors), as a tensor with values;
    TypeError naming ``name`` when it holds something other than numbers (strings, None), ValueError when its rows
    have different lengths or it is a tensor of the meta device.  Its values are checked by
    :func:`mask_values_problem`."""
    rows = stacked_rows(value, name)
    if isinstance(value, torch.Tensor):
        tensor = value
    elif rows is not None:
        if rows.is_meta:
            raise ValueError(f'{name} holds no values (rows that are tensors of the meta device)')
        tensor = rows
    else:
        if isinstance(value, (list, tuple)) and value and all(isinstance(row, (list, tuple)) for row in value):
            lengths = [len(row) for row in value]
            if len(set(lengths)) > 1:  # (torch's conversion refuses them with a ValueError read as no numbers)
                raise ValueError(f'{name}: its rows have different lengths ({", ".join(map(str, lengths))})')
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f'{name} must be bool, or numbers that are all 0 or 1 (a tensor, an array or a list), '
                            f'got {_described(value)}') from None
    if tensor.is_meta:
        raise ValueError(f'{name} holds no values (a tensor of the meta device)')
    return tensor


def stacked_rows(value, name: str) -> Optional[torch.Tensor]:
    """``value`` as one tensor when it is a non-empty list or tuple of tensors (one per row, which
    ``torch.as_tensor`` does not take), else None; ValueError naming ``name`` when the rows have different shapes.
    Rows of the meta device give a meta tensor (copying them would be torch's NotImplementedError): the caller
    says they hold no values."""
    if not (isinstance(value, (list, tuple)) and value and all(isinstance(row, torch.Tensor) for row in value)):
        return None
    shapes = [tuple(row.shape) for row in value]
    if len(set(shapes)) > 1:
        raise ValueError(f'{name}: its rows have different shapes ({", ".join(map(str, shapes))})')
    if any(row.is_meta for row in value):
        return torch.empty((len(value), *shapes[0]), device='meta')
    return torch.stack([row.detach().cpu() for row in value])


def _described(value) -> str:
    """What ``value`` is, for a message: its type, and for a list, tuple or array what it holds."""
    if value is None:
        return 'None'
    kind = type(value).__name__
    article = 'an' if kind[:1].lower() in 'aeio' else 'a'
    if isinstance(value, (list, tuple)):
        held = sorted({type(item).__name__ for item in value})
        return f'{article} {kind} of {", ".join(held)}' if held else f'an empty {kind}'
    dtype = getattr(value, 'dtype', None)
    return f'{article} {kind} of {dtype}' if dtype is not None else f'{article} {kind}'


def mask_values_problem(mask: torch.Tensor) -> Optional[str]:
    """Why ``mask`` is not a keep/clip mask (None if it is one): bool, or numbers that are all 0 or 1.  Scores
    passed as masks would otherwise keep every token whose score is not zero."""
    if mask.dtype == torch.bool or bool(((mask == 0) | (mask == 1)).all()):
        return None
    return f'mask holds values other than 0 and 1 ({mask.dtype}); a mask keeps (1) or clips (0) each token'


def _fill_dense_masks(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs):
    """Official weights carry no masks: read them as 'keep everything' for every block whose weights they hold
    (a partial ``strict=False`` load without a block's weights leaves its mask as it is; torch passes ``strict``
    True to every hook, so the keys tell).  In a state dict that holds masks, a block whose weights come without
    one is read the same way and its mask is reported missing (an error when strict).  Check masks that are
    present."""
    keys = [f'{prefix}blocks.{i}.{MASK_KEY}' for i in range(len(module.blocks))]
    present = [k for k in keys if k in state_dict]
    loaded = {key[len(prefix):].split('.')[1] for key in state_dict if key.startswith(f'{prefix}blocks.')}
    for i, k in enumerate(keys):
        if k not in state_dict and str(i) in loaded:
            # on the device of the block's weights: loaded with assign=True, the mask is the tensor given here
            device = next((v.device for key, v in state_dict.items() if key.startswith(f'{prefix}blocks.{i}.')
                           and isinstance(v, torch.Tensor)), None)
            state_dict[k] = torch.ones(module.num_tokens, dtype=torch.bool, device=device)
            if present:  # not official weights: a pruned state dict that lost this block's mask
                missing_keys.append(k)
    for k in present:
        mask = state_dict[k]
        if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.numel() != module.num_tokens:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            error_msgs.append(f'{k}: mask has shape {shape}, the model needs ({module.num_tokens},)')
        elif problem := mask_values_problem(mask):
            error_msgs.append(f'{k}: {problem}')
        elif not bool(mask[:module.num_prefix_tokens].all()):
            error_msgs.append(f'{k}: {prefix_rule(module.num_prefix_tokens, _has_class_token(module))}')
        else:
            state_dict[k] = mask.to(torch.bool)
            continue
        state_dict[k] = torch.ones(module.num_tokens, dtype=torch.bool)  # reported once, above


def _after_load(module, incompatible_keys):
    module.refresh_token_plan()


def kept_token_counts(model: nn.Module) -> List[int]:
    """``channels``: how many tokens (prefix tokens included) each block processes."""
    # (a plain timm ViT is the TypeError naming what it got: it failed on its attention's missing mask)
    model = clip_concat_model(model, 'kept_token_counts')
    return [int(mask.sum()) for mask in model.masks]
