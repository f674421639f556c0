"""FLOPs as the paper counts them: multiply-accumulates of one image (docs/method.md, "FLOPs")."""
from typing import List, Optional

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from .clip_concat import kept_token_counts


def count_macs(model: nn.Module, channels: Optional[List[int]] = None) -> int:
    """Multiply-accumulates of one image: the patch embedding (:func:`patch_embed_macs`), then per block with
    ``n`` kept tokens: qkv ``3nCD``, attention ``2n²D``, projection ``nDC``, MLP ``2nCH``, then the head(s) (on
    every token for a head that predicts each token: :func:`head_rows`); ``C`` is the width, ``D`` the attention
    width (``C`` in every standard ViT) and ``H`` the MLP width (``4C`` in DeiT), so a DeiT block costs
    ``12nC² + 2n²C``.  The attention's linear layers are priced as ``n`` times their weights (qkv and the
    projection; the gate of timm's ``Attention(gated=True)`` adds ``nCD``).  A gated MLP (timm's ``GluMlp``,
    ``SwiGLU``, ``GeGluMlp``: two products of width ``H`` multiplied together, then ``H`` to ``C``) costs ``3nCH``:
    the MLP is priced as the sum of its linear layers, ``n`` times their weights.  LayerNorm, GELU, softmax,
    residual adds and the token routing are not counted (as in the paper).  An attention-pooling head is counted
    over the tokens of the last block it reads (:func:`pooled_tokens`, :func:`attention_pool_macs`).
    ``channels`` defaults to the model's kept counts (a plain timm ViT counts as dense); given, it holds one count
    per block.  A DistributedDataParallel or ``torch.compile`` wrapper is looked through.
    """
    model = getattr(model, 'module', model)
    model = getattr(model, '_orig_mod', model)  # (the wrapper's type has not the model's forward_head: head_rows)
    if not isinstance(model, VisionTransformer):  # (its patch_embed or blocks were missing: an AttributeError)
        raise TypeError(f'count_macs counts a timm VisionTransformer (a Clip & Concat model or a plain one), got '
                        f'{"None" if model is None else "a " + type(model).__name__}')
    num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    first = next(iter(model.blocks), None)  # (a timm ViT of depth 0 has none: its blocks cost nothing)
    if channels is None:
        channels = kept_token_counts(model) if hasattr(getattr(first, 'attn', None), 'token_index') \
            else [num_tokens] * len(model.blocks)
    else:
        channels = _checked_channels(channels, len(model.blocks), num_tokens)
    patch_macs = patch_embed_macs(model.patch_embed)
    block_macs = 0
    if first is not None:
        D = attention_width(first.attn)
        attn = linear_macs_per_token(first.attn)  # qkv, projection (and gate)
        mlp = linear_macs_per_token(first.mlp)
        block_macs = sum(n * attn + 2 * n * n * D + n * mlp for n in channels)
    heads = [h for h in (getattr(model, 'head', None), getattr(model, 'head_dist', None)) if isinstance(h, nn.Linear)]
    head_macs = sum(h.in_features * h.out_features for h in heads) * head_rows(model, num_tokens)
    pool = getattr(model, 'attn_pool', None)
    pool_macs = 0 if pool is None else attention_pool_macs(pool, pooled_tokens(model, num_tokens), model.embed_dim)
    return patch_macs + block_macs + pool_macs + head_macs


def _checked_channels(channels, depth: int, num_tokens: int) -> List[int]:
    """``channels`` as ints: one count per block, each from 0 to the model's ``num_tokens``; ValueError (TypeError
    for what is no count) otherwise, where a list of another length would price only some blocks, or too many."""
    if isinstance(channels, torch.Tensor):
        channels = channels.tolist()
    try:
        counts = [int(n) for n in channels]
        if any(isinstance(n, bool) or int(n) != n for n in channels):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f'channels must be whole numbers, one kept-token count per block, got {channels!r}') from None
    if len(counts) != depth:
        raise ValueError(f'channels holds {len(counts)} counts for a model of {depth} blocks')
    if any(not 0 <= n <= num_tokens for n in counts):
        raise ValueError(f'channels {counts}: a block keeps from 0 to {num_tokens} tokens')
    return counts


def attention_pool_macs(pool: nn.Module, n: int, width: int) -> int:
    """Multiply-accumulates of an attention-pooling head over the ``n`` tokens it reads from the last block
    (:func:`pooled_tokens`: the patches alone, or with the prefix tokens; the clipped ones are back in the
    sequence there), ``width`` channels each.  timm's ``AttentionPoolLatent`` (``global_pool='map'``): ``L``
    latent queries (``latent_len``) attend to the tokens, keys and values made from them, ``2nC·C``, queries
    ``L·C·C``, the products ``2LnC``, then per latent the projection and the MLP, ``L`` times their weights;
    ``AttentionPoolPrr`` (``'prr'``): attention of the tokens to each other without projections, ``2n²C``.
    Another kind of pool is counted by torch's FLOP counter on ``n`` tokens."""
    kv = getattr(pool, 'kv', None)
    if hasattr(pool, 'latent_len') and isinstance(kv, nn.Linear):
        L, C = pool.latent_len, kv.out_features // 2
        per_latent = sum(linear_macs_per_token(m) for m in (pool.q, pool.proj, getattr(pool, 'mlp', None))
                         if m is not None)  # (an absent q or proj is an Identity: none)
        return n * linear_macs_per_token(kv) + 2 * L * n * C + L * per_latent
    if type(pool).__name__ == 'AttentionPoolPrr':
        return 2 * n * n * width
    return measured_macs(pool, 1, n, width)


def pooled_tokens(model: nn.Module, num_tokens: int) -> int:
    """How many of the last block's ``num_tokens`` tokens an attention-pooling head reads: timm's ``pool`` drops
    the prefix tokens (class, distillation, register) before it unless ``pool_include_prefix`` is set (as
    ``global_pool='prr'`` sets it), so a ``'map'`` head of a model with a class token pools the patches alone."""
    return num_tokens if getattr(model, 'pool_include_prefix', False) else num_tokens - model.num_prefix_tokens


def head_rows(model: nn.Module, num_tokens: int) -> int:
    """How many rows of features the head reads per image: one (a prefix token, or the pooled tokens), or every
    token for timm's head without pooling (``global_pool=''``), which predicts each token."""
    per_token = (getattr(model, 'global_pool', None) == '' and getattr(model, 'attn_pool', None) is None
                 and type(model).forward_head is VisionTransformer.forward_head)
    return num_tokens if per_token else 1


def attention_width(attn: nn.Module) -> int:
    """``D`` of :func:`count_macs`: the width the attention products run at, the input of the output projection.
    In timm's ``Attention`` that is heads x head_dim; ``DiffAttention`` (the ``vit_dwee_*`` models) halves its
    head_dim for two attention maps per head that read values of twice that width, so there QK^T (two maps)
    and AV (their difference) cost ``n^2 C`` each, as in a standard block: ``D = C``."""
    proj = getattr(attn, 'proj', None)
    return proj.in_features if isinstance(proj, nn.Linear) else attn.num_heads * attn.head_dim


def linear_macs_per_token(module: nn.Module) -> int:
    """Multiply-accumulates per token of the linear layers of a block's MLP or attention: their weights (``2CH``
    for timm's ``Mlp``, ``3CH`` for a gated one, whose first layer, or first two, make ``2H`` channels of which the
    second layer reads ``H``; ``4CD`` for timm's ``Attention``, ``5CD`` gated)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def patch_embed_macs(patch_embed: nn.Module) -> int:
    """Multiply-accumulates of the patch embedding for one image: patches x their pixels x the width for timm's
    ``PatchEmbed``; a hybrid embedding (a CNN backbone before the patches, timm's ``HybridEmbed``) is counted by
    torch's FLOP counter over one image (convolutions and products; its norms and activations are not counted, as
    in the blocks), in eval mode so that no BatchNorm statistics move."""
    proj = getattr(patch_embed, 'proj', None)
    if not hasattr(patch_embed, 'backbone') and isinstance(proj, nn.Conv2d):
        return patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] \
            * proj.out_channels
    return measured_macs(patch_embed, 1, patch_embed.in_chans, *patch_embed.img_size)


def measured_macs(module: nn.Module, *shape: int) -> int:
    """Multiply-accumulates of one forward of ``module`` on zeros of ``shape`` (in its parameters' device and
    dtype), as torch's FLOP counter counts them (products and convolutions: half its FLOPs), in eval mode so that
    no BatchNorm statistics move, and without gradients; the module's training flags are left as they were."""
    weight = next(module.parameters(), None)
    example = torch.zeros(*shape, device=None if weight is None else weight.device,
                          dtype=torch.float32 if weight is None else weight.dtype)
    modes = {m: m.training for m in module.modules()}
    counter = FlopCounterMode(display=False)
    try:
        module.eval()
        with torch.no_grad(), counter:
            module(example)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops() // 2
