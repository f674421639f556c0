"""The fast inference path of a (pruned or dense) timm ViT: ``build_fast_path(model) -> nn.Module``.

The math
--------
A Clip & Concat model runs block ``l`` on the tokens its mask keeps and lets the others skip it.  In the
model's own formulation the tokens travel in *concat order* (kept first, clipped after); since every per-token
op is row-wise and attention has no positional term, the same logits come out (up to float summation order) if
all tokens stay in their **original order** in one buffer ``x`` (B, N, C) and block ``l`` updates, in place,
the rows ``ids_l = model.kept_token_ids()[l]``::

    h = x[:, ids] + ls1(Attn(LN1(x[:, ids])))
    x[:, ids] = h + ls2(MLP(LN2(h)))

Clipped tokens never move.  A dense model (every block keeps every token) goes through the same path; that is
"our fast dense path" in speed comparisons.  The output is ``model.forward_head(model.norm(x))``, the logits
``model(images)`` returns (for a distilled DeiT in eval mode, the mean of both heads).

What is fused, and why
----------------------
Measured on one H200 (benchmarks/results/cuda_profile.json: fp16 autocast, DeiT-Ti, batch 256, GPU ms per
forward, dense timm / pruned-25 eager): LayerNorm in fp32 2.25/1.74, residual adds, fp32->fp16 casts and copies
1.48/1.18, GELU 0.62/0.47, matrix products 1.38/1.13, patch conv 0.85/0.85, attention 0.53/0.54, token routing
(gathers and concatenation) -/0.72; total 7.10/6.62.  The memory-bound ops cost more than the matrix products,
and the eager pruned models reach only 0.48-0.60 (DeiT-Ti) and 0.73-0.79 (DeiT-S, -B) of their FLOPs ratio
(benchmarks/results/cuda.md).  So, with ``backend='triton'``, a block is

    y   = gather_layer_norm(x, ids)                  # gather + LN1 + cast: one pass (models/fast_kernels.py)
    qkv = y @ Wqkv^T + bqkv                          # cuBLAS (each product on rows padded as timed, see below)
                                                     # or the Triton product kernel, chosen per kept count
    o   = attention(qkv)                             # SDPA backend or Triton kernel, chosen per kept count
    a   = o @ Wproj^T + bproj                        # cuBLAS or the Triton product kernel, then
    y2  = residual_layer_norm_(x, ids, a, gamma1)    # x[:, ids] += gamma1*a, LN2, cast: one pass; or both in
                                                     # one Triton kernel (rows of at most 256 channels)
    u   = GELU(y2 @ W1^T + b1)                       # cuBLAS + torch's GELU, or one Triton kernel (GELU in
                                                     # the epilogue), chosen per kept count
    m   = u @ W2^T + b2                              # cuBLAS, then
    residual_scatter_(x, ids, m, gamma2)             # x[:, ids] += gamma2*m: one pass, straight back; or both
                                                     # in one Triton kernel (the scatter as the epilogue)

i.e. three memory-bound passes over the kept rows instead of LN, add, cast, gather and concatenation each
paying their own.  cuBLAS adds a bias for free but its GELU epilogue is the tanh approximation, not the
model's exact GELU; the fused Triton product applies the exact GELU to its fp32 accumulator, which saves
writing the (B, n, 4C) hidden activation and reading it back (GELU measured 0.62 ms of 7.10).  Whether that
beats cuBLAS's product is a matter of measurement, so on CUDA both are timed at build time (``mlp_choices``);
likewise the second product with the residual update as its epilogue (``fc2_choices``), which saves writing
and reading its (B, n, C) output, and, where a row has at most 256 channels (DeiT-Ti), the attention's
projection with the residual update and the second norm as its epilogue (``proj_norm_choices``: one kernel
instead of the projection and ``residual_layer_norm_``; its tile spans the row, so the norm sees the whole
residual) and the whole MLP with its residual update (``mlp_residual_choices``: one kernel instead of the two
products; a program makes its rows' hidden activation a chunk of columns at a time and multiplies it straight
into the second product's accumulator, so the (B, n, 4C) activation, the MLP's largest tensor, is never written
or read: at DeiT-Ti width and batch 256, 54 MB each way a block at 138 kept tokens), and the first norm with the
qkv product (``norm_qkv_choices``: one kernel instead of ``gather_layer_norm`` and the product; a program reads
its rows by id, normalises them and multiplies them by its columns of the weight, so the normed rows are never
written).  With all three, a block at DeiT-Ti width is three kernels and the attention.  cuBLAS itself picks its
kernel by a heuristic on the shape, and at some row counts it picks a slow one (measured on an H200: the qkv
product at DeiT-Ti width took 0.033-0.037 ms at three of C&C-Ti-30's kept counts against 0.025 at the others),
so qkv, the projection and the first MLP product are also timed with their operand padded by 64 to 1024 rows
(``ROW_PADS``, at most an eighth more rows, so none at batch 1 below 512 kept tokens): the kernel before it writes
the real rows into a longer buffer, cuBLAS multiplies all of it, and the real rows of the result are used; the
second MLP product is timed on the padding its operand got from the first (the first product's output keeps it) and
without it.  qkv and the projection are also timed as the Triton product kernel without an epilogue (its tiles
are the MLP's): in the same H200 run cuBLAS took 0.0103 ms for C&C-Ti-30's projection at 132 kept tokens and
0.0128-0.0154 at its other counts (133-150 tokens), padded or not, where the dense model's 197 took 0.0142, so that
product hardly shrank with the tokens (not yet measured with this kernel).

The patch embedding is one matrix product over unfolded patches (the conv weight reshaped to (C, 3*p*p);
measured 0.28 ms against 0.97 for the conv at DeiT-Ti width and batch 256, in a first H200 run whose figures
were not kept as a results file), its bias folded with the position embedding into one constant
added as the tokens are written into the buffer.  With ``backend='triton'`` it can be one kernel
(``embed_choice``): the product reads its operand straight from the images (no unfolded copy) and its epilogue
adds the constant and writes the tokens into the buffer; timed against the unfused sequence at build time like
the MLP's products, since it is a fixed cost that pruning does not shrink.

Attention: SDPA's time was flat from 197 down to 129 tokens and halved at 128 (that first run; 128-row tiles: a
block keeping 148 tokens pays for 256 rows), so for each distinct kept count the candidates (the SDPA backends
flash / efficient / cuDNN (at a multiple of 128 tokens only) / math through ``torch.nn.attention.sdpa_kernel``,
and with ``backend='triton'`` the Triton kernel with 32- to 128-row query tiles and 64- to 256-key tiles, three
with a 16- or 32-key tail tile) are checked against an fp32 reference and timed once at build time on CUDA, and
the fastest is kept (``attention_choices``); on CPU, and with ``backend='compile'``, it is SDPA, untimed.
Candidates are timed replayed from a CUDA graph: the GPU's time, not the CPU's cost of launching them, which
differs between cuBLAS, torch and Triton and at small batches would decide the ranking.  ``cuda_graph=True``
captures the whole forward for one batch size (measured for the dense fast path of DeiT-Ti: 9.2x at batch 32, 2.2x
at batch 256, images/s, benchmarks/results/cuda.json); another batch size (the last, smaller batch of an evaluation)
runs uncaptured.  A graph replays on fixed addresses, so its input is normally copied into a static buffer first (for
DeiT at batch 256, 154 MB read and written: a fixed cost that pruning does not shrink); with the Triton patch
embedding the graph instead reads the caller's images where they are, the kernel loading their address from a
one-element tensor that is set before each replay.  On a Hopper GPU (compute capability 9.x) with a Triton that
has programmatic dependent launch (:func:`models.fast_kernels.dependent_launch_problem`) the Triton backend captures
the forward a second time with its kernels launched that way (each waits on the GPU for the one before it, so the
logits are the same bit for bit, which is checked), times both graphs and keeps the faster (``dependent_launch``).
The final norm is computed only on the tokens the head reads (the prefix tokens for ``global_pool='token'`` by
timm's own pool, as the model's pool is at each call).

Backends: ``'triton'`` as above (CUDA, or CPU under ``TRITON_INTERPRET=1`` for tests); ``'torch'`` the same
original-order formulation in plain torch ops (index_select, F.layer_norm, index_copy_, SDPA), runnable
anywhere; ``'compile'`` is ``torch.compile(fullgraph=True)`` of the ``'torch'`` formulation (inductor fuses the
gathers into the norms itself), one graph per shape of the images, each path with its own recompile limit.

Precision: weights are cast once, the linear layers' to ``dtype`` (fp16/bf16 for speed; default fp32);
LayerNorm statistics, softmax and residual sums are computed in fp32; the token buffer (the residual stream)
is stored in ``residual_dtype`` (default fp32, as under autocast; fp16 halves its traffic at some accuracy).
The head runs in the model's own dtype (fp32, unless the model was cast).  Logits come back in fp32.  Images
may be of any floating dtype (cast as the patch embedding reads them); integer or bool images (raw pixels) are
refused with a ValueError (the eager model refuses them too, with the RuntimeError of its convolution's dtypes).

Not supported (``ValueError('fast path: ... is not supported')`` at build time): a model other than timm's
``VisionTransformer`` and its subclasses (timm's EVA, say), qk_norm, scale_norm, gated attention, an attention
scale other than head_dim ** -0.5 (timm's fused attention ignores ``attn.scale``, its unfused one applies it), a qkv or
projection width other than the (B, n, 3, H, D) layout, non-LayerNorm norms (and LayerNorm subclasses that add to
the norm, as timm's LayerNormAct), a GELU other than exact erf or another activation, MLPs other than timm's
``Mlp`` or with a norm inside (scale_mlp_norm), blocks other than timm's ``Block`` (and subclasses of ``Block``,
``Attention``, ``LayerScale`` or torch's ``Linear`` with a forward of their own, and of ``VisionTransformer``
with a ``forward`` or ``forward_features`` of their own), dynamic image size or padding, a patch embedding other
than timm's ``PatchEmbed`` (a hybrid's CNN backbone), unflattened, or whose projection is not a stride=kernel conv
without padding (or a subclass of torch's ``Conv2d`` computing otherwise), an image size that is not a multiple of
the patch size, a norm after the patch embedding, a ``norm_pre`` other than LayerNorm, a position embedding that is
not additive, forward hooks on the model or the modules the path computes (those of the head run as they are).
Inference only: no gradients, eval semantics (the model is put in eval mode; the path refuses to run while the model
is in training mode, as the head it calls is the model's own); the built module holds the weights as it reads them
(cast copies, or the model's own tensors where they already have that dtype, device and layout: an in-place edit of
the model then reaches some of them), so rebuild it after changing the model (the head is the model's:
``model.forward_head`` is called on the features, given the tokens its pool reads as it is at each call, so
``reset_classifier(n, 'avg')`` is followed, and with ``backend='compile'`` a hook registered on the head, or
removed, has the path compiled afresh; the path refuses to run once the model is cast or moved, or its CUDA graph
once the head is replaced, as ``reset_classifier`` does, or changed, its pool or ``fc_norm`` say: the graph captured
the old head's kernels, or a hook is registered on the head after the capture; and once a module or parameter
the path computes is replaced (``model.norm = ...``, ``model.blocks[3] = ...``, ``blk.mlp.fc1 = ...``,
``model.pos_embed = nn.Parameter(...)``: anything set as an attribute, which torch's registration hooks report), or
a forward hook is registered on a module it computes (or the model), or a global one
(``register_module_forward_hook``, bar torch's FLOP counter's): the path calls none of them); one built from a
Clip & Concat model's own masks refuses to run once they are set again (or written in place to other values, or
replaced by tensors of other values) or a state dict is loaded into the model.  The path itself is for the dtype and
device it was built for: ``.half()``, ``.to()`` and the like are refused unless they change nothing, and so is
``load_state_dict`` (build it again instead).
"""
import contextlib
import statistics
import types
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm as TimmLayerNorm, LayerNormFp32, LayerScale, Mlp, PatchEmbed
from timm.layers.activations import GELU as TimmGELU
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from torch.nn.modules.module import (_global_forward_hooks as _GLOBAL_FORWARD_HOOKS,
                                     _global_forward_pre_hooks as _GLOBAL_FORWARD_PRE_HOOKS,
                                     register_module_module_registration_hook,
                                     register_module_parameter_registration_hook)
from torch.utils.hooks import RemovableHandle

from . import fast_kernels as K
from .clip_concat import _check_patch_count, _timm_head, _version_of

__all__ = ['build_fast_path', 'FastViT', 'CaptureError', 'AttentionChoice', 'ProductChoice', 'choose_attention',
           'choose_product', 'choose_fc2', 'choose_proj_norm', 'choose_mlp_residual', 'choose_norm_qkv',
           'check_supported', 'cpu_compiler_problem', 'BACKENDS', 'ATTENTION_MODES', 'MLP_MODES',
           'DEPENDENT_LAUNCH_MODES', 'DTYPES']

BACKENDS = ('triton', 'torch', 'compile')
ATTENTION_MODES = ('auto', 'sdpa', 'triton')
MLP_MODES = ('auto', 'torch', 'triton')
DEPENDENT_LAUNCH_MODES = ('auto', 'on', 'off')
# what ``dtype`` (the products') and ``residual_dtype`` (the token buffer's) may be: an integer buffer would
# truncate every residual sum without a word
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# what the model must be

try:
    from torch.utils.module_tracker import ModuleTracker as _ModuleTracker
except ImportError:  # (an older torch: none to tell apart)
    _ModuleTracker = ()

# what torch.compile raises when a fullgraph function needs more compiled graphs than its recompile limit allows
_RECOMPILE_LIMIT_HIT = getattr(getattr(getattr(torch, '_dynamo', None), 'exc', None), 'FailOnRecompileLimitHit', ())


class CaptureError(RuntimeError):
    """A CUDA graph could not capture the forward, or a candidate while timing it.  Under torch 2.11 the caching
    allocator may stay unusable afterwards, so the process should stop rather than go on without graphs."""


def _unsupported(what: str) -> ValueError:
    return ValueError(f'fast path: {what} is not supported')


# LayerNorm classes whose forward is the norm alone (timm's LayerNormFp32 computes it in fp32, as the path does);
# other subclasses may add to it (timm's LayerNormAct applies an activation after the norm)
_LAYER_NORM_FORWARDS = (nn.LayerNorm.forward, TimmLayerNorm.forward, LayerNormFp32.forward)


def _is_layer_norm(m: nn.Module, C: int) -> bool:
    return (isinstance(m, nn.LayerNorm) and type(m).forward in _LAYER_NORM_FORWARDS
            and tuple(m.normalized_shape) == (C,))


def _forward_owner(module: nn.Module, name: str = 'forward') -> type:
    """The class whose method ``name`` the module runs, Clip & Concat's mixins aside (a converted block runs its
    timm class's forward on the tokens it keeps; a converted model its class's forward and forward_features)."""
    from .clip_concat import CCBlockMixin, CCModelMixin
    return next(cls for cls in type(module).__mro__ if cls not in (CCBlockMixin, CCModelMixin) and name in vars(cls))


def _check_linear(parent: nn.Module, where: str, name: str) -> None:
    """The path reads a product's weight and bias: a subclass computing otherwise (a LoRA adapter, say) or another
    module with those attributes would be computed as a plain Linear."""
    m = getattr(parent, name)
    if not isinstance(m, nn.Linear) or _forward_owner(m) is not nn.Linear:
        raise _unsupported(f'{where}.{name}: {type(m).__name__} (only torch Linear)')


def _check_block(blk: nn.Module, layer: int, C: int) -> None:
    where = f'blocks.{layer}'
    if not isinstance(blk, Block):
        raise _unsupported(f'{where}: a {type(blk).__name__} block (only timm Block)')
    if _forward_owner(blk) is not Block:  # a subclass computing something else: the path would compute timm's
        raise _unsupported(f'{where}: a block with the forward of {_forward_owner(blk).__name__} (only timm Block)')
    for name in ('norm1', 'norm2'):
        if not _is_layer_norm(getattr(blk, name), C):
            raise _unsupported(f'{where}.{name}: {type(getattr(blk, name)).__name__} (only LayerNorm over C)')
    attn = blk.attn
    if not isinstance(attn, Attention) or _forward_owner(attn) is not Attention:
        raise _unsupported(f'{where}.attn: {type(attn).__name__} (only timm Attention)')
    for name, what in (('q_norm', 'qk_norm'), ('k_norm', 'qk_norm'), ('norm', 'scale_norm')):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            raise _unsupported(f'{where}.attn: {what}')
    if getattr(attn, 'gate', None) is not None:
        raise _unsupported(f'{where}.attn: a gated attention')
    if float(attn.scale) != attn.head_dim ** -0.5:  # timm's fused attention ignores attn.scale, its own does not
        raise _unsupported(f'{where}.attn: a scale ({float(attn.scale):g}) other than head_dim ** -0.5')
    for name in ('qkv', 'proj'):
        _check_linear(attn, f'{where}.attn', name)
    attn_dim = attn.num_heads * attn.head_dim
    if attn.qkv.out_features != 3 * attn_dim or attn.proj.in_features != attn_dim or attn.proj.out_features != C:
        raise _unsupported(f'{where}.attn: an attention width other than the qkv/proj layout (B, n, 3, H, D)')
    for name in ('ls1', 'ls2'):
        ls = getattr(blk, name)
        if not isinstance(ls, (LayerScale, nn.Identity)) or _forward_owner(ls) not in (LayerScale, nn.Identity):
            raise _unsupported(f'{where}.{name}: {type(ls).__name__} (only LayerScale or Identity)')
    mlp = blk.mlp
    if not isinstance(mlp, Mlp) or type(mlp).forward is not Mlp.forward:
        raise _unsupported(f'{where}.mlp: {type(mlp).__name__} (only timm Mlp)')
    for name in ('fc1', 'fc2'):
        _check_linear(mlp, f'{where}.mlp', name)
    # (a subclass of torch's GELU with a forward of its own computes something else)
    torch_gelu = isinstance(mlp.act, nn.GELU) and _forward_owner(mlp.act) is nn.GELU
    exact_gelu = (torch_gelu and mlp.act.approximate == 'none') or type(mlp.act) is TimmGELU
    if not exact_gelu:  # timm's GELU (act_layer='gelu') is F.gelu, the exact one
        raise _unsupported(f'{where}.mlp.act: {mlp.act!r} (only exact-erf GELU)')
    if not isinstance(mlp.norm, nn.Identity):
        raise _unsupported(f'{where}.mlp.norm: a norm inside the MLP')


_COMPUTED = ('', 'patch_embed', 'pos_drop', 'patch_drop', 'norm_pre', 'blocks', 'norm')


def _computed_modules(model: nn.Module, computed: bool = True):
    """(name, module) of the modules the path computes itself, never calling them: the model, its embedding,
    blocks and final norm; with ``computed=False`` the others, the head's, which it calls."""
    for name, m in model.named_modules():
        if (name.split('.')[0] in _COMPUTED) == computed:
            yield name, m


def _computed_objects(model: nn.Module) -> List[Tuple[str, object]]:
    """(name, object) of the modules the path computes (the model itself aside) and of every parameter they hold
    (the position embedding and class token among them): what it reads when it is built."""
    out = []
    for name, m in _computed_modules(model):
        if name:
            out.append((name, m))
        out.extend((f'{name}.{p}' if name else p, t) for p, t in m._parameters.items())
    return out


# torch calls its global registration hooks whenever a module or parameter is set as an attribute of any module
# in the process (``model.blocks[3] = ...``, ``layer.weight = nn.Parameter(...)``, a model being constructed):
# their count, installed with the first fast path, which each path compares once per call, so it looks for a
# replaced module or parameter of its model only when one may have been set
_REGISTRATIONS = [0]
_REGISTRATION_HOOKS: List[RemovableHandle] = []


def _count_registration(module: nn.Module, name: str, value) -> None:
    _REGISTRATIONS[0] += 1


def _count_registrations() -> None:
    if not _REGISTRATION_HOOKS:
        _REGISTRATION_HOOKS.append(register_module_module_registration_hook(_count_registration))
        _REGISTRATION_HOOKS.append(register_module_parameter_registration_hook(_count_registration))


def _hook_watch(named_modules) -> List[Tuple[str, dict, frozenset]]:
    """(name, hook dict, the ids it holds now) for the forward and forward-pre hooks of each module."""
    return [(name, d, frozenset(d)) for name, m in named_modules for d in (m._forward_pre_hooks, m._forward_hooks)]


def _next_hook_id() -> Optional[int]:
    """torch's count of the hook handles made so far, every hook registration's (None where torch has none):
    while it stands still, no hook was registered."""
    return getattr(RemovableHandle, 'next_id', None)


def _global_forward_hooks() -> list:
    """torch's global forward and forward-pre hooks (register_module_forward_hook), which every module's call
    runs, less those of torch's ModuleTracker (FlopCounterMode's), which only note the module being run."""
    return [h for h in (*_GLOBAL_FORWARD_PRE_HOOKS.values(), *_GLOBAL_FORWARD_HOOKS.values())
            if not isinstance(getattr(h, '__self__', None), _ModuleTracker)]


def check_supported(model: nn.Module) -> None:
    """Raise ``ValueError('fast path: <what> is not supported')`` unless the fast path computes this model."""
    if not isinstance(model, VisionTransformer):
        raise _unsupported(f'a {type(model).__name__} (only timm VisionTransformer and its subclasses)')
    for name in ('forward', 'forward_features'):  # the path computes timm's; a subclass's own would be ignored
        if _forward_owner(model, name) is not VisionTransformer:
            raise _unsupported(f'a {name} of its own ({_forward_owner(model, name).__name__}.{name}; only timm '
                               f'VisionTransformer\'s)')
    for name, m in _computed_modules(model):
        hooks = [h for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                 if h is not _check_patch_count]  # (Clip & Concat's check of the patch count, which forward makes)
        if hooks:  # the path never calls the module, so a hook that changes its input or output is skipped
            raise _unsupported(f'a forward hook on {name or "the model"}')
    if getattr(model, 'dynamic_img_size', False):
        raise _unsupported('dynamic_img_size')
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed) or type(pe).forward is not PatchEmbed.forward:
        # e.g. timm's HybridEmbed: a CNN backbone before its projection, which the path would skip
        raise _unsupported(f'a {type(pe).__name__} patch embedding (only timm PatchEmbed)')
    proj = getattr(pe, 'proj', None)
    if (not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.padding not in ((0, 0), 'valid')
            or proj.dilation != (1, 1) or proj.groups != 1):
        raise _unsupported('a patch embedding other than a stride=kernel Conv2d without padding')
    if _forward_owner(proj) is not nn.Conv2d or _forward_owner(proj, '_conv_forward') is not nn.Conv2d:
        # its weight read as a plain convolution's (timm's weight-standardised StdConv2dSame, say)
        raise _unsupported(f'patch_embed.proj: {type(proj).__name__} (only torch Conv2d)')
    if not isinstance(getattr(pe, 'norm', nn.Identity()), nn.Identity):
        raise _unsupported('patch_embed.norm')
    if getattr(pe, 'dynamic_img_pad', False) or not getattr(pe, 'flatten', True):
        raise _unsupported('a padded or unflattened patch embedding')
    img_size, patch = getattr(pe, 'img_size', None), proj.kernel_size
    if img_size is None or any(s % p for s, p in zip(img_size, patch)):
        # timm's convolution drops the pixels beyond the last whole patch; the unfolded GEMM tiles the image exactly
        raise _unsupported(f'an image size ({img_size}) that is not a multiple of the patch size ({patch})')
    C = model.embed_dim
    for name in ('norm_pre', 'norm'):
        m = getattr(model, name)
        if not (isinstance(m, nn.Identity) or _is_layer_norm(m, C)):
            raise _unsupported(f'{name}: {type(m).__name__} (only LayerNorm or Identity)')
    for layer, blk in enumerate(model.blocks):
        _check_block(blk, layer, C)


def kept_ids_of(model: nn.Module) -> List[torch.Tensor]:
    """Original token ids each block processes: ``model.kept_token_ids()`` where the model has it (a Clip &
    Concat model), every token otherwise (a plain dense timm model)."""
    if hasattr(model, 'kept_token_ids'):
        return [ids.detach().cpu() for ids in model.kept_token_ids()]
    N = model.patch_embed.num_patches + model.num_prefix_tokens
    return [torch.arange(N) for _ in model.blocks]


def _validated_ids(kept_ids: Sequence[torch.Tensor], depth: int, N: int) -> List[torch.Tensor]:
    """Sorted int64 CPU copies; each must hold distinct integer ids in [0, N) (the in-place kernels need distinct;
    float ids would be truncated, a boolean mask read as ids 0 and 1)."""
    if len(kept_ids) != depth:
        raise ValueError(f'kept_ids: {len(kept_ids)} entries for {depth} blocks')
    out = []
    for layer, ids in enumerate(kept_ids):
        ids = torch.as_tensor(ids).detach()
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:  # a mask or scores: not ids
            raise ValueError(f'kept_ids[{layer}]: ids must be integers (token ids, not a mask), got '
                             f'{str(ids.dtype).replace("torch.", "")}')
        ids = ids.cpu().to(torch.int64).flatten().sort().values
        if ids.numel() and (ids[0] < 0 or ids[-1] >= N):
            raise ValueError(f'kept_ids[{layer}]: ids must lie in [0, {N})')
        if ids.numel() > 1 and bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f'kept_ids[{layer}]: ids must be distinct')
        out.append(ids)
    return out


# ---------------------------------------------------------------------------------------------------------------
# attention: the candidates and the choice per kept count

@dataclass(frozen=True)
class AttentionChoice:
    """How one block computes attention: ``kind`` 'sdpa' (``backend``: an SDPBackend name, None for torch's own
    dispatch) or 'triton' (``tiles``: BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages; see
    ``fast_kernels.ATTENTION_TILES``); ``ms``: its build-time time, if timed."""
    kind: str
    backend: Optional[str] = None
    tiles: Optional[Tuple[int, int, int, int, int]] = None
    ms: Optional[float] = None

    @property
    def label(self) -> str:
        """'triton-64x128w4s2' (BLOCK_M x BLOCK_N), 'triton-64x128+32w4s2' with a tail tile of 32 keys."""
        if self.kind == 'triton':
            bm, bn, bt, warps, stages = self.tiles
            return f'triton-{bm}x{bn}{"" if bt == bn else f"+{bt}"}w{warps}s{stages}'
        return f'sdpa-{(self.backend or "default").lower()}'


@dataclass(frozen=True)
class ProductChoice:
    """How one block computes one of its matrix products with its epilogue, y @ W^T + b (qkv, the attention's
    projection), GELU(y @ W1^T + b1) or x[:, ids] += gamma * (u @ W2^T + b2): ``kind`` 'torch' (cuBLAS with the
    bias in its epilogue, then torch's GELU or the scatter kernel) or 'triton' (one fused kernel; ``tiles``:
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); ``pad``: for 'torch', extra rows cuBLAS computes beyond the
    B*n real ones (see :data:`ROW_PADS`); ``ms``: its build-time time, if timed."""
    kind: str
    tiles: Optional[Tuple[int, int, int, int, int]] = None
    ms: Optional[float] = None
    pad: int = 0

    @property
    def label(self) -> str:
        if self.kind == 'triton':
            return 'triton-{}x{}x{}w{}s{}'.format(*self.tiles)
        return f'torch+{self.pad}rows' if self.pad else 'torch'


# The block's four products, each chosen per kept count (cuBLAS on its rows or padded, or a fused Triton kernel)
PRODUCT_KINDS = ('qkv', 'proj', 'mlp', 'fc2')
# The choices that fuse a product with its neighbours, each timed against them as chosen, for rows of at most 256
# channels: the projection with its residual update and the second norm, the whole MLP with its residual update,
# the first norm with qkv
FUSED_KINDS = ('proj_norm', 'mlp_residual', 'norm_qkv')

# Extra rows a cuBLAS product may compute beyond its B*n real ones.  cuBLAS picks its kernel by a heuristic on
# the shape.  Measured on an H200 at DeiT-Ti width and batch 256, the dense model's four products all ran one
# kernel (192x192 tiles), while at C&C-Ti-30's kept counts cuBLAS picked eight others, and their time fell 1.24x
# where the rows fell 1.42x; at three of those counts (133, 141, 143 tokens) the qkv product took 0.033-0.037 ms
# against 0.025 at 132-139 and 150 (CUDA-graph timings).  So where the products are timed, qkv, the projection and
# the first MLP product are also timed with their operand padded by each of these row counts that costs at most an
# eighth more rows (at batch 1, none below 512 tokens): the kernel before it (a norm, the attention) writes the
# real rows into a longer buffer, cuBLAS multiplies all of it, and the real rows of the result are used.  The
# second MLP product's operand is the first's output, padded as the first product ran; it is timed on that
# padding and unpadded.  Rows are independent in a matrix product, so they are those of the unpadded product; the
# padding rows are never initialised and their results never used.
ROW_PADS = (64, 128, 256, 512, 1024)


def row_pads(rows: int) -> List[int]:
    """0 and the :data:`ROW_PADS` worth timing for a product over ``rows`` real rows (at most rows / 8 extra)."""
    return [0] + [p for p in ROW_PADS if 8 * p <= rows]


def _sdpa(qkv: torch.Tensor, num_heads: int, scale: float, backend: Optional[str],
          out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA on views of the (B, n, 3, H, D) qkv tensor; returns (B, n, H*D), written into ``out`` when given (a
    (B, n, H*D) tensor with contiguous rows: the one copy the heads' transpose costs anyway)."""
    B, n, three_c = qkv.shape
    D = three_c // (3 * num_heads)
    if out is not None:
        out = K.out_rows(B, n, num_heads * D, qkv.device, out, qkv.dtype, qkv.dtype)
    q, k, v = qkv.view(B, n, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    if backend is None:
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if out is None:
        return o.transpose(1, 2).reshape(B, n, num_heads * D)
    out.view(B, n, num_heads, D).copy_(o.transpose(1, 2))
    return out


def run_attention(choice: AttentionChoice, qkv: torch.Tensor, num_heads: int, scale: float,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of a (B, n, 3*H*D) qkv tensor as ``choice`` says -> (B, n, H*D), into ``out`` when given."""
    if choice.kind == 'triton':
        bm, bn, bt, warps, stages = choice.tiles
        return K.attention_triton(qkv, num_heads, scale, block_m=bm, block_n=bn, block_t=bt, num_warps=warps,
                                  num_stages=stages, out=out)
    return _sdpa(qkv, num_heads, scale, choice.backend, out)


def run_linear(choice: ProductChoice, y: torch.Tensor, weight: torch.Tensor, weight_t: Optional[torch.Tensor],
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y @ weight^T + bias, a plain product (qkv, the attention's projection), as ``choice`` says: cuBLAS, or the
    Triton product kernel without an epilogue (``weight_t``: weight transposed)."""
    if choice.kind == 'triton':
        bm, bn, bk, warps, stages = choice.tiles
        return K.linear_triton(y, weight_t, bias, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                               num_stages=stages)
    return F.linear(y, weight, bias)


def run_linear_gelu(choice: ProductChoice, y: torch.Tensor, weight: torch.Tensor, weight_t: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU(y @ weight^T + bias) as ``choice`` says (``weight_t``: weight transposed, for the Triton kernel)."""
    if choice.kind == 'triton':
        bm, bn, bk, warps, stages = choice.tiles
        return K.linear_gelu_triton(y, weight_t, bias, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=stages)
    return F.gelu(F.linear(y, weight, bias))


def _cuda_graph_ms(fn, reps: int = 20, groups: int = 5) -> float:
    """Median milliseconds per call of ``fn`` as a CUDA graph replays it: ``reps`` calls captured in one graph,
    ``groups`` replays timed with CUDA events.  That is the GPU's time for the call, each kernel launched as a
    captured forward launches it, without the CPU's launch overhead, which at small batches is most of what
    launching the calls one by one would measure (and which differs between cuBLAS, torch and Triton launches).
    A call that cannot be captured raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: lazy initialisation, compiles, cuBLAS handles
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode='thread_local'):
        for _ in range(reps):
            fn()
    return _replay_ms([graph], reps=1, groups=groups)[0] / reps  # (a replay is ``reps`` calls)


def _replay_ms(graphs: Sequence[torch.cuda.CUDAGraph], reps: int = 5, groups: int = 7) -> List[float]:
    """Median milliseconds per replay of each captured graph: ``groups`` rounds in which each graph in turn is
    replayed ``reps`` times between two CUDA events (interleaved, so a clock that drifts during the rounds weighs
    on all alike), after one untimed round."""
    times: List[List[float]] = [[] for _ in graphs]
    for r in range(groups + 1):
        for i, graph in enumerate(graphs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            if r:
                times[i].append(start.elapsed_time(end) / reps)
    return [statistics.median(t) for t in times]


def _times_on(device: torch.device) -> bool:
    """Whether a build times its candidates (with CUDA events): on a CUDA device.  Elsewhere it takes SDPA and the
    torch products without timing anything."""
    return device.type == 'cuda'


def _time_candidate(run, cand) -> float:
    """Milliseconds per call of ``run(cand)`` on the GPU, replayed from a CUDA graph (:func:`_cuda_graph_ms`).  The
    fastest rows run in a captured graph, where only the GPU's time counts; timed launch by launch, a small batch
    would rank the CPU's launch overheads instead.  With :func:`_times_on`, the one seam through which the tests
    run the timed choice on CPU with scripted times."""
    return _cuda_graph_ms(lambda: run(cand))


def attention_candidates(n: int, head_dim: int, with_triton: bool) -> List[AttentionChoice]:
    """The SDPA backends this torch has, then the Triton tiles (when the head_dim suits the kernel).  cuDNN's only
    for a sequence length that is a multiple of 128: PyTorch itself later turned that backend off for other
    lengths, as they caused problems in CUDA-graph captures, and a capture that fails leaves torch 2.11's
    allocator unusable for the rest of the process."""
    from torch.nn.attention import SDPBackend
    names = ('FLASH_ATTENTION', 'EFFICIENT_ATTENTION') + (('CUDNN_ATTENTION',) if n % 128 == 0 else ()) + ('MATH',)
    out = [AttentionChoice('sdpa', backend=name) for name in names if hasattr(SDPBackend, name)]
    if with_triton and K.HAS_TRITON and K.attention_tiles_ok(head_dim):
        out += [AttentionChoice('triton', tiles=t) for t in K.ATTENTION_TILES]
    return out


_CHOICE_CACHE: Dict[tuple, tuple] = {}


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """How far a candidate's output may be from the fp32 reference ``ref`` when its operands are in ``dtype``: 8
    units of that dtype's last place, at least 5e-3, relative to ref's largest magnitude (at least 1)."""
    return max(8 * torch.finfo(dtype).eps, 5e-3) * max(1.0, ref.abs().max().item())


@torch.no_grad()
def _fastest(candidates, run, reference: torch.Tensor, tol: float, check=None):
    """(the fastest candidate whose output is within ``tol`` of ``reference``, or None; its ms; {label: ms};
    {label: why it was refused}).  ``check(c)`` (default ``run``) gives the output compared, then ``run(c)`` is
    timed.  A candidate whose check raises (a backend refusing these shapes or dtypes, a tile that does not fit)
    or misses the tolerance gets inf, and the reason is kept.  An AttributeError, NameError or TypeError is a
    bug here and propagates; so does a failure while timing a candidate that computed the right thing (a CUDA
    graph that could not capture it: in torch 2.11 that leaves the allocator unusable, so it is never hidden),
    as a CaptureError, or as itself when the GPU ran out of memory."""
    check = check or run
    timings, refused, best, best_ms = {}, {}, None, float('inf')
    for cand in candidates:
        ms = float('inf')
        try:
            err = (check(cand).float() - reference).abs().max().item()
        except (AttributeError, NameError, TypeError):
            raise  # a mistake in this code, not a candidate that does not suit these shapes: never hide it
        except Exception as e:  # noqa: BLE001
            refused[cand.label] = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0][:200]}'
        else:
            if err <= tol:
                try:
                    ms = _time_candidate(run, cand)
                except torch.OutOfMemoryError:
                    raise  # the GPU is full (the graph's memory pool): the batch is too large, not a capture failure
                except Exception as e:
                    raise CaptureError(f'timing {cand.label} in a CUDA graph failed after it computed the right '
                                       f'thing ({type(e).__name__}: {str(e).strip()[:300]})') from e
            else:
                refused[cand.label] = f'max |difference| {err:.3g} over the tolerance {tol:.3g}'
        timings[cand.label] = ms
        if ms < best_ms:
            best, best_ms = cand, ms
    return best, best_ms, timings, refused


def _keep_fastest(key: tuple, candidates, run, reference: torch.Tensor, tol: float, check=None
                  ) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """A product's timed choice (:func:`_fastest` of ``candidates``), cached under ``key``: (the fastest with its
    ms, or ProductChoice('torch') where none passed; {label: ms}; {label: why it was refused})."""
    best, ms, timings, refused = _fastest(candidates, run, reference, tol, check)
    best = ProductChoice('torch') if best is None else replace(best, ms=ms)
    _CHOICE_CACHE[key] = (best, timings, refused)
    return _CHOICE_CACHE[key]


def _unfused_or_tiles(tiles, dtype: torch.dtype) -> List[ProductChoice]:
    """A fused kernel's candidates: 'torch' (the unfused kernels as already chosen), then each of its Triton tiles
    where Triton is installed and the products are fp16 or bf16."""
    fused = K.HAS_TRITON and dtype in (torch.float16, torch.bfloat16)
    return [ProductChoice('torch')] + ([ProductChoice('triton', tiles=t) for t in tiles] if fused else [])


@torch.no_grad()
def choose_attention(n: int, batch: int, num_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                     device: torch.device, with_triton: bool
                     ) -> Tuple[AttentionChoice, Dict[str, float], Dict[str, str]]:
    """Time every candidate on random qkv of shape (batch, n, 3*H*D) on CUDA and return the fastest, with every
    candidate's milliseconds (inf: failed, or not within tolerance of the fp32 reference) and why each refused
    one was.  Cached per shape."""
    key = (str(device), dtype, n, batch, num_heads, head_dim, float(scale), with_triton)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    g = torch.Generator(device=device).manual_seed(n)
    qkv = torch.randn(batch, n, 3 * num_heads * head_dim, device=device, generator=g).to(dtype)
    ref = K.attention_reference(qkv, num_heads, scale).float()
    tol = _tolerance(dtype, ref)
    best, ms, timings, refused = _fastest(attention_candidates(n, head_dim, with_triton),
                                          lambda c: run_attention(c, qkv, num_heads, scale), ref, tol)
    best = AttentionChoice('sdpa') if best is None else AttentionChoice(best.kind, best.backend, best.tiles, ms)
    _CHOICE_CACHE[key] = (best, timings, refused)
    return best, timings, refused


@torch.no_grad()
def choose_product(rows: int, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device,
                   gelu: bool) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """Time y @ W^T + b (``gelu``: GELU of it, the MLP's first product; else a plain product, qkv or the
    attention's projection) for y (rows, in_features) on CUDA: cuBLAS on the real rows and on each
    :func:`row_pads` padding of them, and the Triton product kernel's tiles (for ``gelu`` with the GELU as its
    epilogue; else plain, against cuBLAS's heuristic, which at some row counts picks a slow kernel that no padding
    avoids); return the fastest whose real rows are within tolerance of the fp32 reference, with every candidate's
    milliseconds.  Cached per shape."""
    key = ('gelu' if gelu else 'linear', str(device), dtype, rows, in_features, out_features)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    pads = row_pads(rows)
    g = torch.Generator(device=device).manual_seed(rows)
    y = torch.randn(rows + pads[-1], in_features, device=device, generator=g).to(dtype)
    w = (torch.randn(out_features, in_features, device=device, generator=g) * in_features ** -0.5).to(dtype)
    b = torch.randn(out_features, device=device, generator=g).to(dtype)
    wt = w.t().contiguous()
    ref = (K.linear_gelu_reference(y[:rows], wt, b) if gelu else F.linear(y[:rows].float(), w.float(), b.float()))
    ref = ref.float()
    tol = _tolerance(dtype, ref)
    candidates = [ProductChoice('torch', pad=p) for p in pads]
    if K.HAS_TRITON and dtype in (torch.float16, torch.bfloat16):
        candidates += [ProductChoice('triton', tiles=t) for t in K.LINEAR_TILES]

    def run(c: ProductChoice) -> torch.Tensor:
        operand = y[:rows + c.pad]
        return (run_linear_gelu if gelu else run_linear)(c, operand, w, wt, b)[:rows]
    return _keep_fastest(key, candidates, run, ref, tol)


def _random_buffer(batch: int, num_tokens: int, n: int, width: int, residual_dtype: torch.dtype,
                   device: torch.device) -> Tuple[torch.Generator, torch.Tensor, torch.Tensor]:
    """What a product with a residual epilogue is timed on: a generator seeded by the kept count (for the rest of
    its operands), a random (batch, num_tokens, width) token buffer and ``n`` distinct sorted token ids."""
    g = torch.Generator(device=device).manual_seed(n)
    x = torch.randn(batch, num_tokens, width, device=device, generator=g).to(residual_dtype)
    ids = torch.randperm(num_tokens, device=device, generator=g)[:n].sort().values
    return g, x, ids


def run_linear_residual(choice: ProductChoice, x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor,
                        weight: torch.Tensor, weight_t: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """x[:, ids] += gamma * (u @ weight^T + bias) as ``choice`` says: cuBLAS (on the first B*n + ``choice.pad``
    rows of u, as many as it has) then the scatter kernel, or one fused Triton kernel (``weight_t``: weight
    transposed).  ``u``: (rows, hidden), its first B*n rows the real ones, image by image.  Returns x."""
    B, n = x.shape[0], ids.numel()
    if choice.kind == 'triton':
        return K.linear_residual_scatter_triton_(x, ids, u[:B * n].view(B, n, -1), weight_t, bias, gamma,
                                                 *choice.tiles)
    m = F.linear(u[:B * n + choice.pad], weight, bias)[:B * n].view(B, n, -1)
    return K.residual_scatter_triton_(x, ids, m, gamma)


@torch.no_grad()
def choose_fc2(batch: int, num_tokens: int, n: int, hidden: int, width: int, dtype: torch.dtype,
               residual_dtype: torch.dtype, device: torch.device, operand_pad: int = 0
               ) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """Time x[:, ids] += gamma * (u @ W^T + b) for u (batch * n real rows + ``operand_pad``, hidden) into a
    (batch, num_tokens, width) buffer on CUDA: cuBLAS + the scatter kernel, on the real rows and (when the first
    product left ``operand_pad`` rows of padding in u: it ran padded) on all of them, against the fused Triton
    kernel's tiles (:data:`K.LINEAR_TILES`, and :func:`K.row_tiles` for rows of at most 256 channels); return the
    fastest within tolerance of the fp32 reference, with every candidate's milliseconds.  Cached per shape."""
    key = ('fc2', str(device), dtype, residual_dtype, batch, num_tokens, n, hidden, width, operand_pad)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    g, x, ids = _random_buffer(batch, num_tokens, n, width, residual_dtype, device)
    u = torch.randn(batch * n + operand_pad, hidden, device=device, generator=g).to(dtype)
    w = (torch.randn(width, hidden, device=device, generator=g) * hidden ** -0.5).to(dtype)
    b = torch.randn(width, device=device, generator=g).to(dtype)
    gamma = torch.randn(width, device=device, generator=g)
    wt = w.t().contiguous()
    ref = K.linear_residual_scatter_reference_(x.clone(), ids, u[:batch * n].view(batch, n, hidden), wt, b,
                                               gamma).float()
    tol = _tolerance(dtype, ref)
    candidates = [ProductChoice('torch')] + ([ProductChoice('torch', pad=operand_pad)] if operand_pad else [])
    if dtype in (torch.float16, torch.bfloat16):  # and for rows of at most 256 channels, tiles that span one
        tiles = K.LINEAR_TILES + tuple(t for t in K.row_tiles(width) if t not in K.LINEAR_TILES)
        candidates += [ProductChoice('triton', tiles=t) for t in tiles]
    timed = x.clone()  # accumulates over the timed calls: the values drift, the work does not change
    return _keep_fastest(key, candidates, lambda c: run_linear_residual(c, timed, ids, u, w, wt, b, gamma), ref, tol,
                         check=lambda c: run_linear_residual(c, x.clone(), ids, u, w, wt, b, gamma))


def run_proj_norm(proj: ProductChoice, fused: ProductChoice, x: torch.Tensor, ids: torch.Tensor, o: torch.Tensor,
                  weight: torch.Tensor, weight_t: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  gamma: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                  eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention's projection, the residual update and the block's second norm: x[:, ids] += gamma *
    (o @ weight^T + bias), then LN of those rows -> (B, n, C), into ``out`` when given.  ``fused`` 'triton': one
    kernel (``weight_t``: weight transposed; its tiles); 'torch': cuBLAS as ``proj`` says (on the first B*n +
    ``proj.pad`` rows of ``o``, (rows, H*D), image by image; or the Triton product kernel, as ``proj`` says) then
    the residual-norm kernel."""
    B, n = x.shape[0], ids.numel()
    if fused.kind == 'triton':
        bm, bn, bk, warps, stages = fused.tiles
        return K.linear_residual_layer_norm_triton_(x, ids, o[:B * n].view(B, n, -1), weight_t, bias, gamma,
                                                    ln_weight, ln_bias, eps, out=out, block_m=bm, block_n=bn,
                                                    block_k=bk, num_warps=warps, num_stages=stages)
    a = run_linear(proj, o[:B * n + proj.pad], weight, weight_t, bias)[:B * n].view(B, n, -1)
    return K.residual_layer_norm_triton_(x, ids, a, gamma, ln_weight, ln_bias, eps, out=out)


@torch.no_grad()
def choose_proj_norm(batch: int, num_tokens: int, n: int, in_width: int, width: int, dtype: torch.dtype,
                     residual_dtype: torch.dtype, device: torch.device, proj: ProductChoice
                     ) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """Time the projection, residual update and second norm (:func:`run_proj_norm`) for o (batch * n real rows
    + ``proj.pad``, in_width) into a (batch, num_tokens, width) buffer on CUDA: unfused ('torch': cuBLAS as
    ``proj`` was chosen, then the residual-norm kernel) against the fused kernel's tiles (:func:`K.row_tiles`,
    rows of at most 256 channels); return the fastest whose norm output and updated rows are within tolerance of
    the fp32 reference, with every candidate's milliseconds.  Cached per shape."""
    key = ('proj_norm', str(device), dtype, residual_dtype, batch, num_tokens, n, in_width, width, proj.label)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    g, x, ids = _random_buffer(batch, num_tokens, n, width, residual_dtype, device)
    o = torch.randn(batch * n + proj.pad, in_width, device=device, generator=g).to(dtype)
    w = (torch.randn(width, in_width, device=device, generator=g) * in_width ** -0.5).to(dtype)
    b = torch.randn(width, device=device, generator=g).to(dtype)
    gamma, ln_w, ln_b = (torch.randn(width, device=device, generator=g) for _ in range(3))
    wt = w.t().contiguous()

    def both(y: torch.Tensor, after: torch.Tensor) -> torch.Tensor:  # the norm's output and the rows updated
        return torch.cat([y.float().flatten(), after.index_select(1, ids).float().flatten()])
    ref_x = x.clone()
    ref = both(K.linear_residual_layer_norm_reference_(ref_x, ids, o[:batch * n].view(batch, n, in_width), wt, b,
                                                       gamma, ln_w, ln_b, 1e-6), ref_x)
    tol = _tolerance(dtype, ref)
    candidates = _unfused_or_tiles(K.row_tiles(width), dtype)  # unfused: the projection's own pad is proj's

    def check(c: ProductChoice) -> torch.Tensor:
        after = x.clone()
        return both(run_proj_norm(proj, c, after, ids, o, w, wt, b, gamma, ln_w, ln_b, 1e-6), after)
    timed = x.clone()  # accumulates over the timed calls: the values drift, the work does not change
    return _keep_fastest(
        key, candidates, lambda c: run_proj_norm(proj, c, timed, ids, o, w, wt, b, gamma, ln_w, ln_b, 1e-6), ref,
        tol, check=check)


def run_norm_qkv(qkv: ProductChoice, fused: ProductChoice, x: torch.Tensor, ids: torch.Tensor,
                 ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], eps: float, weight: torch.Tensor,
                 weight_t: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 operand: Optional[torch.Tensor]) -> torch.Tensor:
    """The block's first norm and the qkv product: LN(x[:, ids]) @ weight^T + bias -> (B, n, N).  ``fused``
    'triton': one kernel (its tiles; ``weight_t``: weight transposed), the normed rows never written; 'torch': the
    gather-norm kernel writes the first B*n rows of ``operand`` ((B*n + ``qkv.pad``, C) in the compute dtype),
    the product as ``qkv`` says (cuBLAS, or the Triton product kernel) multiplies all of it, and the real rows of
    the product are returned."""
    B, n = x.shape[0], ids.numel()
    if fused.kind == 'triton':  # (out=None: a new tensor of the B*n rows; then the tiles)
        return K.gather_layer_norm_linear_triton(x, ids, ln_weight, ln_bias, eps, weight_t, bias, None,
                                                 *fused.tiles).view(B, n, -1)
    K.gather_layer_norm_triton(x, ids, ln_weight, ln_bias, eps, out=operand[:B * n].view(B, n, -1))
    return run_linear(qkv, operand, weight, weight_t, bias)[:B * n].view(B, n, -1)


@torch.no_grad()
def choose_norm_qkv(batch: int, num_tokens: int, n: int, width: int, out_features: int, dtype: torch.dtype,
                    residual_dtype: torch.dtype, device: torch.device, qkv: ProductChoice
                    ) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """Time the first norm and the qkv product (:func:`run_norm_qkv`) on the rows ``ids`` of a (batch,
    num_tokens, width) buffer on CUDA: unfused ('torch': the gather-norm kernel, then cuBLAS as ``qkv`` was chosen,
    on its padding) against the one kernel's tiles (:func:`K.norm_linear_tiles`, rows of at most 256 channels);
    return the fastest within tolerance of the fp32 reference, with every candidate's milliseconds.  Cached per
    shape."""
    key = ('norm_qkv', str(device), dtype, residual_dtype, batch, num_tokens, n, width, out_features,
           qkv.label)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    g, x, ids = _random_buffer(batch, num_tokens, n, width, residual_dtype, device)
    ln_w, ln_b = (torch.randn(width, device=device, generator=g) for _ in range(2))
    w = (torch.randn(out_features, width, device=device, generator=g) * width ** -0.5).to(dtype)
    b = torch.randn(out_features, device=device, generator=g).to(dtype)
    w_t = w.t().contiguous()
    operand = torch.empty(batch * n + qkv.pad, width, dtype=dtype, device=device)
    ref = K.gather_layer_norm_linear_reference(x, ids, ln_w, ln_b, 1e-6, w_t, b).float().view(batch, n, -1)
    tol = _tolerance(dtype, ref)
    candidates = _unfused_or_tiles(K.norm_linear_tiles(width), dtype)  # unfused: the product's own pad is qkv's
    return _keep_fastest(key, candidates, lambda c: run_norm_qkv(qkv, c, x, ids, ln_w, ln_b, 1e-6, w, w_t, b, operand),
                         ref, tol)


def run_mlp_residual(fc1: ProductChoice, fc2: ProductChoice, fused: ProductChoice, x: torch.Tensor,
                     ids: torch.Tensor, y: torch.Tensor, w1: torch.Tensor, w1_t: Optional[torch.Tensor],
                     b1: Optional[torch.Tensor], w2: torch.Tensor, w2_t: Optional[torch.Tensor],
                     b2: Optional[torch.Tensor], gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """The block's MLP and its residual update: x[:, ids] += gamma * (GELU(y @ w1^T + b1) @ w2^T + b2) for ``y``
    (rows, C), its first B*n rows the real ones, image by image.  ``fused`` 'triton': one kernel (its tiles;
    ``w1_t``, ``w2_t``: the weights transposed), the hidden activation never written; 'torch': the first product
    as ``fc1`` says (on all of y's rows: its padding), then the second as ``fc2`` says.  Returns x."""
    if fused.kind == 'triton':
        B, n = x.shape[0], ids.numel()
        return K.mlp_residual_scatter_triton_(x, ids, y[:B * n].view(B, n, -1), w1_t, b1, w2_t, b2, gamma,
                                              *fused.tiles)
    u = run_linear_gelu(fc1, y, w1, w1_t, b1)  # (B*n + its padding, hidden)
    return run_linear_residual(fc2, x, ids, u, w2, w2_t, b2, gamma)


@torch.no_grad()
def choose_mlp_residual(batch: int, num_tokens: int, n: int, width: int, hidden: int, dtype: torch.dtype,
                        residual_dtype: torch.dtype, device: torch.device, fc1: ProductChoice, fc2: ProductChoice
                        ) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
    """Time the block's MLP with its residual update (:func:`run_mlp_residual`) for y (batch * n real rows +
    ``fc1.pad``, width) into a (batch, num_tokens, width) buffer on CUDA: unfused ('torch': the two products as
    ``fc1`` and ``fc2`` were chosen) against the one-kernel MLP's tiles (:func:`K.mlp_tiles`, rows of at most 256
    channels); return the fastest whose updated rows are within tolerance of the fp32 reference, with every
    candidate's milliseconds.  Cached per shape."""
    key = ('mlp_residual', str(device), dtype, residual_dtype, batch, num_tokens, n, width, hidden, fc1, fc2)
    if key in _CHOICE_CACHE:
        return _CHOICE_CACHE[key]
    g, x, ids = _random_buffer(batch, num_tokens, n, width, residual_dtype, device)
    y = torch.randn(batch * n + fc1.pad, width, device=device, generator=g).to(dtype)
    w1 = (torch.randn(hidden, width, device=device, generator=g) * width ** -0.5).to(dtype)
    b1 = torch.randn(hidden, device=device, generator=g).to(dtype)
    w2 = (torch.randn(width, hidden, device=device, generator=g) * hidden ** -0.5).to(dtype)
    b2 = torch.randn(width, device=device, generator=g).to(dtype)
    gamma = torch.randn(width, device=device, generator=g)
    w1_t, w2_t = w1.t().contiguous(), w2.t().contiguous()
    ref = K.mlp_residual_scatter_reference_(x.clone(), ids, y[:batch * n].view(batch, n, width), w1_t, b1, w2_t,
                                            b2, gamma).index_select(1, ids).float()
    tol = _tolerance(dtype, ref)
    candidates = _unfused_or_tiles(K.mlp_tiles(width), dtype)  # unfused: each product as chosen, fc1 padded

    def run(c: ProductChoice, into: torch.Tensor) -> torch.Tensor:
        return run_mlp_residual(fc1, fc2, c, into, ids, y, w1, w1_t, b1, w2, w2_t, b2, gamma)
    timed = x.clone()  # accumulates over the timed calls: the values drift, the work does not change
    return _keep_fastest(key, candidates, lambda c: run(c, timed), ref, tol,
                         check=lambda c: run(c, x.clone()).index_select(1, ids))


# ---------------------------------------------------------------------------------------------------------------
# the executor

class _FastBlock(nn.Module):
    """One block's weights (cast, contiguous: copies where the model's differ in either) and its token ids."""

    def __init__(self, blk: Block, ids: torch.Tensor, N: int, dtype: torch.dtype, device: torch.device):
        super().__init__()

        def w(t):  # matrix weights and their biases: the compute dtype
            return None if t is None else t.detach().to(device, dtype).contiguous()

        def f32(t):  # norm affine and LayerScale: fp32 (the kernels compute in fp32)
            return None if t is None else t.detach().to(device, torch.float32).contiguous()

        attn = blk.attn
        self.n = int(ids.numel())
        self.dense = bool(self.n == N and torch.equal(ids, torch.arange(N)))
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, float(attn.scale)
        self.eps1, self.eps2 = float(blk.norm1.eps), float(blk.norm2.eps)
        self.register_buffer('ids', ids.to(device))
        for name, t in (('ln1_w', f32(blk.norm1.weight)), ('ln1_b', f32(blk.norm1.bias)),
                        ('qkv_w', w(attn.qkv.weight)), ('qkv_b', w(attn.qkv.bias)),
                        ('proj_w', w(attn.proj.weight)), ('proj_b', w(attn.proj.bias)),
                        ('gamma1', f32(getattr(blk.ls1, 'gamma', None))),
                        ('ln2_w', f32(blk.norm2.weight)), ('ln2_b', f32(blk.norm2.bias)),
                        ('fc1_w', w(blk.mlp.fc1.weight)), ('fc1_b', w(blk.mlp.fc1.bias)),
                        ('fc2_w', w(blk.mlp.fc2.weight)), ('fc2_b', w(blk.mlp.fc2.bias)),
                        ('gamma2', f32(getattr(blk.ls2, 'gamma', None)))):
            self.register_buffer(name, t)
        self.register_buffer('fc1_wt', None)  # W1^T (C, 4C), made when the fused linear + GELU is chosen
        self.register_buffer('fc2_wt', None)  # W2^T (4C, C), made when the fused linear + residual is chosen
        self.register_buffer('proj_wt', None)  # Wp^T (H*D, C), made when a Triton kernel runs the projection
        self.register_buffer('qkv_wt', None)  # Wqkv^T (C, 3*H*D), made when a Triton kernel runs qkv
        self.attention = AttentionChoice('sdpa')
        self.qkv = ProductChoice('torch')
        self.proj = ProductChoice('torch')
        self.mlp = ProductChoice('torch')
        self.fc2 = ProductChoice('torch')
        self.proj_norm = ProductChoice('torch')  # 'torch': cuBLAS as proj says, then the residual-norm kernel
        self.mlp_residual = ProductChoice('torch')  # 'torch': fc1 as mlp says, then fc2 as fc2 says
        self.norm_qkv = ProductChoice('torch')  # 'torch': the gather-norm kernel, then qkv as qkv says


def _layer_norm_f32(t: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    return F.layer_norm(t.float(), (t.shape[-1],), weight, bias, eps)


def _scaled(t: torch.Tensor, gamma: Optional[torch.Tensor]) -> torch.Tensor:
    return t.float() if gamma is None else t.float() * gamma


class FastViT(nn.Module):
    """Inference-only executor of a timm ViT in the original-order formulation (see the module docstring).

    ``forward(images)`` takes (B, 3, H, W) images and returns what ``model(images)`` returns, in fp32.
    Build it with :func:`build_fast_path`.
    """

    def __init__(self, model: VisionTransformer, backend: str = 'triton', dtype: Optional[torch.dtype] = None,
                 residual_dtype: Optional[torch.dtype] = None, kept_ids: Optional[Sequence[torch.Tensor]] = None,
                 attention: str = 'auto', mlp: str = 'auto', tune_batch: Optional[int] = None,
                 dependent_launch: str = 'auto'):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
        if attention not in ATTENTION_MODES:
            raise ValueError(f'attention must be one of {ATTENTION_MODES}, got {attention!r}')
        if mlp not in MLP_MODES:
            raise ValueError(f'mlp must be one of {MLP_MODES}, got {mlp!r}')
        if dependent_launch not in DEPENDENT_LAUNCH_MODES:
            raise ValueError(f'dependent_launch must be one of {DEPENDENT_LAUNCH_MODES}, got {dependent_launch!r}')
        if dependent_launch == 'on' and backend != 'triton':
            raise ValueError("dependent_launch='on' needs backend='triton' (it launches the Triton kernels)")
        for name, value in (('dtype', dtype), ('residual_dtype', residual_dtype)):
            if value is not None and not any(value is d for d in DTYPES):
                raise ValueError(f'{name} must be torch.float16, torch.bfloat16, torch.float32 or torch.float64 (or '
                                 f'None), got {value!r}')
        if 'triton' in (attention, mlp) and backend != 'triton':
            raise ValueError("attention='triton' and mlp='triton' need backend='triton'")
        if 'triton' in (attention, mlp) and dtype is torch.float64:  # (with 'auto' the kernels are not chosen)
            raise ValueError("attention='triton' and mlp='triton' need dtype float16, bfloat16 or float32 (the "
                             "Triton kernels' matrix products accumulate in fp32)")
        if backend == 'triton' and not K.HAS_TRITON:  # else the build passes and the first forward fails
            raise ValueError("fast path: backend 'triton' needs Triton, which this Python cannot import (backend "
                             "'torch' runs without it)")
        check_supported(model)
        first = next(model.parameters())  # cast or moved in place by model.half() / .to(): checked in forward
        device = first.device
        if backend == 'triton' and not (device.type == 'cuda' or (K.INTERPRETER and device.type == 'cpu')):
            raise ValueError("fast path: backend 'triton' needs a CUDA model, or TRITON_INTERPRET=1 set before "
                             "Triton is imported (torch and models import it)")
        problem = K.dependent_launch_problem(device) if dependent_launch == 'on' else None
        if problem is not None:
            raise ValueError(f"dependent_launch='on': {problem}")
        if 'triton' in (attention, mlp) and dtype is torch.bfloat16 and device.type == 'cpu':
            raise ValueError("attention='triton' and mlp='triton' in bfloat16 need a CUDA model: Triton's "
                             "interpreter computes bfloat16 matrix products wrongly")
        model.eval()
        self.backend = backend
        self.device = device
        self.dtype = dtype or torch.float32
        self.residual_dtype = residual_dtype or torch.float32
        self._dependent_launch_mode = dependent_launch
        object.__setattr__(self, '_model', model)  # shared, not a submodule: only forward_head is used
        object.__setattr__(self, '_first_parameter', first)  # the model's, not one of this module's
        # what a CUDA graph captures (held here, so its weights stay where the graph reads them)
        object.__setattr__(self, '_built_head', getattr(model, 'head', None))
        self._head_dtype = first.dtype  # the features go to the head in the model's dtype

        pe = model.patch_embed
        C = model.embed_dim
        self.embed_dim = C
        self.patch = tuple(pe.proj.kernel_size)
        self.img_size = tuple(pe.img_size)
        self.in_chans = pe.proj.in_channels
        self.num_prefix = model.num_prefix_tokens
        self.num_patches = pe.num_patches
        self.num_tokens = N = self.num_prefix + self.num_patches
        self.register_buffer('patch_w', pe.proj.weight.detach().reshape(C, -1).to(device, self.dtype).contiguous())
        self.register_buffer('patch_wt', None)  # patch_w transposed, made when the Triton patch embedding is chosen
        prefix_const, patch_const = self._position_constants(model)
        if pe.proj.bias is not None:
            patch_const = patch_const + pe.proj.bias.detach().float().cpu()
        self.register_buffer('prefix_const', prefix_const.to(device, self.residual_dtype))
        self.register_buffer('patch_const', patch_const.to(device, self.residual_dtype))
        # tokens (dtype) + patch_const (residual dtype) are written straight into the buffer unless the sum's
        # type would be wider than the buffer's, or dynamo traces it (it refuses a strided out=; inductor fuses
        # the assignment instead).
        self._add_into_buffer = (backend != 'compile'
                                 and torch.promote_types(self.dtype, self.residual_dtype) == self.residual_dtype)
        self.norm_pre = self._norm_params(model.norm_pre, device)
        self.norm = self._norm_params(model.norm, device)
        # the modules and parameters the path computes, as read here: one replaced afterwards (model.norm moved to
        # fc_norm, a block swapped) is refused, looked for when torch's count of registrations has moved
        _count_registrations()
        object.__setattr__(self, '_computed_built', _computed_objects(model))
        # the hooks of the modules the path computes (check_supported refused all but Clip & Concat's own): one
        # registered later would be skipped, so the forward looks for them, only when torch's count of hook handles
        # has moved since it last looked (one attribute read per call); global hooks likewise
        object.__setattr__(self, '_hooks_watched', _hook_watch(_computed_modules(model)))
        self._hooks_checked_at = None

        ids = _validated_ids(kept_ids if kept_ids is not None else kept_ids_of(model), len(model.blocks), N)
        # the model's plan this path copied (its masks and weights), to refuse running on after it changes
        self._plan_version = getattr(model, 'token_plan_version', None) if kept_ids is None else None
        # its mask buffers, where the attention modules hold them, and their in-place version counters (None for
        # an inference tensor, which has none): a write into one (model.masks[l][p] = False) or a new tensor
        # assigned (blocks[l].attn.token_index = ...) makes no new plan until the model runs, so the forward has
        # the model take it up when a buffer was replaced or a counter moved (the model's own check of the same,
        # sync_token_plan, finds each buffer through three module lookups per forward: about 45 us at 12 blocks on
        # a CPU, against about 2 us for these held slots, so the forward calls it only when something changed)
        self._mask_slots = [] if self._plan_version is None else [blk.attn._buffers for blk in model.blocks]
        self._watch_masks()
        self.blocks = nn.ModuleList(_FastBlock(blk, i, N, self.dtype, device) for blk, i in zip(model.blocks, ids))
        # Tokens the head reads: the prefix for class-token pooling by timm's own heads, else all of them.  The
        # pool is the model's as it is at each call (reset_classifier(n, 'avg') after the build reads every token),
        # so the forward looks again (_pools_by_token: a few attribute reads) and takes one of these two.
        self.register_buffer('prefix_ids', torch.arange(self.num_prefix, device=device))
        self.register_buffer('all_ids', torch.arange(N, device=device))
        self._by_token = self._pools_by_token()
        # what a CUDA graph captures of the head besides its weights: checked before each replay
        object.__setattr__(self, '_built_head_state', _head_state(model))

        self._graph = self._static_in = self._static_out = None
        # whether the captured graph launches its Triton kernels with programmatic dependent launch (None: no
        # graph), and the graph's milliseconds per replay without and with it where the capture timed both
        self.dependent_launch: Optional[bool] = None
        self.dependent_launch_ms: Dict[str, float] = {}
        self._head_hooks, self._head_hooks_checked_at = [], None  # (see _capture)
        # With a CUDA graph and the Triton patch embedding: the graph reads its images at the address held here,
        # set before each replay, instead of from a copy in _static_in (the tensor it was captured reading).
        self._image_address = None
        # why a timed candidate was refused, per kind of choice and kept count: {kind: {n: {label: reason}}}
        self.refused: Dict[str, Dict[int, Dict[str, str]]] = {
            kind: {} for kind in ('attention',) + PRODUCT_KINDS + FUSED_KINDS + ('patch_embedding',
                                                                                  'dependent_launch')}
        self.attention_choices: Dict[int, AttentionChoice] = {}
        self.attention_timings: Dict[int, Dict[str, float]] = {}
        self.qkv_choices: Dict[int, ProductChoice] = {}
        self.qkv_timings: Dict[int, Dict[str, float]] = {}
        self.proj_choices: Dict[int, ProductChoice] = {}
        self.proj_timings: Dict[int, Dict[str, float]] = {}
        self.proj_norm_choices: Dict[int, ProductChoice] = {}
        self.proj_norm_timings: Dict[int, Dict[str, float]] = {}
        self.mlp_choices: Dict[int, ProductChoice] = {}
        self.mlp_timings: Dict[int, Dict[str, float]] = {}
        self.fc2_choices: Dict[int, ProductChoice] = {}
        self.fc2_timings: Dict[int, Dict[str, float]] = {}
        self.mlp_residual_choices: Dict[int, ProductChoice] = {}
        self.mlp_residual_timings: Dict[int, Dict[str, float]] = {}
        self.norm_qkv_choices: Dict[int, ProductChoice] = {}
        self.norm_qkv_timings: Dict[int, Dict[str, float]] = {}
        # the batch size the candidates are timed at (batch_size, or 64); a product's row padding (ROW_PADS)
        # applies at that size only
        self.tune_batch = tune_batch or 64
        with _on(device):  # timing captures and events on the model's GPU, whichever is current
            self._choose_attention(attention)
            self._choose_products(mlp)
            self._choose_embed(mlp)

        self._run = self._forward_impl
        if backend == 'compile':
            self._compile()
        self._registrations_seen = _REGISTRATIONS[0]  # (this module's own submodules counted too)

    def _compile(self) -> None:
        """``_run`` as torch.compile of the forward, of a code object of its own: dynamo keeps at most
        torch._dynamo.config.recompile_limit graphs (8) per code object, and with fullgraph fails past it, so paths
        built in one process do not share that limit (else the ninth plan of other kept counts could not run).
        The compiled graph holds the head as it traced it, hooks and all, and dynamo does not guard on module hooks
        (torch._dynamo.config.skip_nnmodule_hook_guards): a hook registered on the head, or removed, afterwards
        would be left out, or run on, so the forward compiles the path afresh then."""
        impl = FastViT._forward_impl
        own = types.FunctionType(impl.__code__.replace(), impl.__globals__, impl.__name__, impl.__defaults__,
                                 impl.__closure__)
        self._run = torch.compile(types.MethodType(own, self), fullgraph=True, dynamic=False)
        object.__setattr__(self, '_compiled_head_hooks', _hook_watch(_computed_modules(self._model, computed=False)))

    # -- build helpers ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _position_constants(self, model) -> Tuple[torch.Tensor, torch.Tensor]:
        """``_pos_embed`` maps patch tokens p (B, Np, C) to [prefix, p + pos]; read both constants off it
        (prefix rows: class/dist/register tokens plus their position embedding) and check it is additive."""
        C, Np, P = model.embed_dim, self.num_patches, self.num_prefix
        dev = next(model.parameters()).device
        const = model._pos_embed(torch.zeros(1, Np, C, device=dev)).float()
        g = torch.Generator().manual_seed(0)
        probe = torch.randn(1, Np, C, generator=g).to(dev)
        moved = model._pos_embed(probe).float()
        if const.shape != (1, P + Np, C) or moved.shape != const.shape:
            raise _unsupported('a _pos_embed that does not return prefix + patch tokens')
        if not torch.allclose(moved - const, F.pad(probe, (0, 0, P, 0)), atol=1e-5, rtol=1e-5):
            raise _unsupported('a position embedding that is not additive')
        return const[0, :P].cpu(), const[0, P:].cpu()

    @staticmethod
    def _norm_params(m: nn.Module, device) -> Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor], float]]:
        """(weight, bias, eps) in fp32 for a LayerNorm, None for an Identity."""
        if isinstance(m, nn.Identity):
            return None
        f = lambda t: None if t is None else t.detach().to(device, torch.float32).contiguous()  # noqa: E731
        return f(m.weight), f(m.bias), float(m.eps)

    def _choose_attention(self, mode: str) -> None:
        for blk in self.blocks:
            if blk.n == 0:
                continue  # a block that keeps nothing does not run
            if blk.n not in self.attention_choices:
                refused: Dict[str, str] = {}
                if mode == 'triton':
                    if not K.attention_tiles_ok(blk.head_dim):
                        raise ValueError(f'attention=triton: head_dim {blk.head_dim} is not a power of two >= 16')
                    choice, timings = AttentionChoice('triton', tiles=K.ATTENTION_TILES[0]), {}
                elif mode == 'auto' and _times_on(self.device) and self.backend != 'compile':
                    choice, timings, refused = choose_attention(blk.n, self.tune_batch, blk.num_heads,
                                                                blk.head_dim, blk.scale, self.dtype, self.device,
                                                                with_triton=self.backend == 'triton')
                else:
                    choice, timings = AttentionChoice('sdpa'), {}
                self.attention_choices[blk.n] = choice
                self.attention_timings[blk.n] = timings
                self.refused['attention'][blk.n] = refused
            blk.attention = self.attention_choices[blk.n]

    def _times_products(self, mode: str) -> bool:
        """Whether the matrix products (the block's four, the patch embedding) are timed at build, cuBLAS with and
        without row padding against the fused Triton kernels: ``mlp='auto'`` with the Triton backend on CUDA in
        fp16/bf16."""
        return (mode == 'auto' and _times_on(self.device) and self.backend == 'triton'
                and self.dtype in (torch.float16, torch.bfloat16))

    def _choose_products(self, mode: str) -> None:
        """For each kept count, how the block's products run (``qkv``; ``proj``: the attention's projection;
        ``mlp``: fc1 + GELU; ``fc2``: fc2 + residual; ``proj_norm``: the projection fused with its residual update
        and the second norm, or not; ``mlp_residual``: the whole MLP and its residual update as one kernel, or fc1
        and fc2 as chosen; ``norm_qkv``: the first norm and qkv as one kernel, or the gather-norm kernel and qkv as
        chosen).  The ``mlp`` mode decides them all; 'triton' forces the fused kernels of fc1 and fc2
        and leaves qkv and proj to cuBLAS, unfused, and the MLP in two kernels.  fc2 is chosen after fc1: its
        operand has padding rows only if fc1 ran padded; the one-kernel MLP is timed against the two as
        chosen, the one-kernel norm and qkv against the two."""
        timed = self._times_products(mode)
        batch = self.tune_batch
        for blk in self.blocks:
            if blk.n == 0:
                continue  # a block that keeps nothing does not run
            if blk.n not in self.mlp_choices:
                hidden, width = blk.fc1_w.shape
                rows = batch * blk.n
                torch_product = (ProductChoice('torch'), {}, {})
                if mode == 'triton':
                    fused = (ProductChoice('triton', tiles=K.LINEAR_TILES[0]), {}, {})
                    choices = torch_product, torch_product, fused, fused
                elif timed:
                    fc1 = choose_product(rows, width, hidden, self.dtype, self.device, gelu=True)
                    choices = (choose_product(rows, width, blk.qkv_w.shape[0], self.dtype, self.device, gelu=False),
                               choose_product(rows, blk.proj_w.shape[1], width, self.dtype, self.device,
                                              gelu=False),
                               fc1,
                               choose_fc2(batch, self.num_tokens, blk.n, hidden, width, self.dtype,
                                          self.residual_dtype, self.device, operand_pad=fc1[0].pad))
                else:
                    choices = (torch_product,) * 4
                # the projection, its residual update and the second norm in one kernel (rows of at most 256
                # channels) against cuBLAS as just chosen and the residual-norm kernel
                choices += ((choose_proj_norm(batch, self.num_tokens, blk.n, blk.proj_w.shape[1], width, self.dtype,
                                              self.residual_dtype, self.device, choices[1][0])
                             if timed and K.row_tiles(width) else torch_product),)
                # the whole MLP with its residual update in one kernel (rows of at most 256 channels) against the
                # two products as just chosen
                choices += ((choose_mlp_residual(batch, self.num_tokens, blk.n, width, hidden, self.dtype,
                                                 self.residual_dtype, self.device, choices[2][0], choices[3][0])
                             if timed and K.mlp_tiles(width) else torch_product),)
                # the first norm and qkv in one kernel (rows of at most 256 channels) against the gather-norm kernel
                # and qkv as chosen
                choices += ((choose_norm_qkv(batch, self.num_tokens, blk.n, width, blk.qkv_w.shape[0], self.dtype,
                                             self.residual_dtype, self.device, choices[0][0])
                             if timed and K.norm_linear_tiles(width) else torch_product),)
                for kind, (choice, timings, refused) in zip(PRODUCT_KINDS + FUSED_KINDS, choices):
                    getattr(self, f'{kind}_choices')[blk.n] = choice
                    getattr(self, f'{kind}_timings')[blk.n] = timings
                    self.refused[kind][blk.n] = refused
            for kind in PRODUCT_KINDS + FUSED_KINDS:
                setattr(blk, kind, getattr(self, f'{kind}_choices')[blk.n])
            one_kernel = blk.mlp_residual.kind == 'triton'
            if blk.mlp.kind == 'triton' or one_kernel:
                blk.fc1_wt = blk.fc1_w.t().contiguous()
            if blk.fc2.kind == 'triton' or one_kernel:
                blk.fc2_wt = blk.fc2_w.t().contiguous()
            if blk.proj_norm.kind == 'triton' or blk.proj.kind == 'triton':
                blk.proj_wt = blk.proj_w.t().contiguous()
            if blk.norm_qkv.kind == 'triton' or blk.qkv.kind == 'triton':
                blk.qkv_wt = blk.qkv_w.t().contiguous()

    def _choose_embed(self, mode: str) -> None:
        """How the patch embedding runs (``embed_choice``): 'torch' (an unfolded copy of the patches in the
        compute dtype, cuBLAS, an add into the buffer) or 'triton' (one kernel reads the images and writes the
        tokens, models/fast_kernels.py ``patch_embed_``).  The ``mlp`` mode decides it as it decides the MLP's
        fused products: 'auto' times both on CUDA (backend 'triton', fp16/bf16), 'triton' forces the kernel."""
        timings: Dict[str, float] = {}
        refused: Dict[str, str] = {}
        if mode == 'triton':
            choice = ProductChoice('triton', tiles=K.LINEAR_TILES[0])
        elif self._times_products(mode):
            choice, timings, refused = self._time_embed(self.tune_batch)
        else:
            choice = ProductChoice('torch')
        self._set_embed(choice)
        self.embed_timings = timings
        self.refused['patch_embedding'][0] = refused

    def _set_embed(self, choice: ProductChoice) -> None:
        self.embed_choice = choice
        if choice.kind == 'triton' and self.patch_wt is None:
            self.patch_wt = self.patch_w.t().contiguous()  # (c*ph*pw, C)

    @torch.no_grad()
    def _time_embed(self, batch: int) -> Tuple[ProductChoice, Dict[str, float], Dict[str, str]]:
        """Time the patch embedding at ``batch`` random images both ways (each within tolerance of the fp32
        reference); cached per shape."""
        key = ('embed', str(self.device), self.dtype, self.residual_dtype, batch, self.in_chans, self.img_size,
               self.patch, self.embed_dim, self.num_prefix)
        if key not in _CHOICE_CACHE:
            g = torch.Generator(device=self.device).manual_seed(batch)
            images = torch.randn(batch, self.in_chans, *self.img_size, device=self.device, generator=g)
            ref = torch.zeros(batch, self.num_tokens, self.embed_dim, device=self.device)
            K.patch_embed_reference_(ref, images, self.patch_w.t(), self.patch_const, self.num_prefix, self.patch)
            ref[:, :self.num_prefix] = self.prefix_const.float()
            if self.norm_pre is not None:  # the candidates' _embed applies it too
                ref = _layer_norm_f32(ref, *self.norm_pre)
            tol = _tolerance(self.dtype, ref)

            def run(c: ProductChoice) -> torch.Tensor:
                self._set_embed(c)
                return self._embed(images)
            _keep_fastest(key, _unfused_or_tiles(K.PATCH_EMBED_TILES, self.dtype), run, ref, tol)
        return _CHOICE_CACHE[key]

    # -- forward ------------------------------------------------------------------------------------------------

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The token buffer (B, N, C) in original order: prefix constants, then unfolded patches @ W^T plus the
        patch constant (conv bias + position embedding)."""
        B = images.shape[0]
        buf = torch.empty(B, self.num_tokens, self.embed_dim, dtype=self.residual_dtype, device=images.device)
        buf[:, :self.num_prefix] = self.prefix_const
        if self.embed_choice.kind == 'triton':
            address = self._image_address if images is self._static_in else None
            K.patch_embed_triton_(buf, images, self.patch_wt, self.patch_const, self.num_prefix, self.patch,
                                  *self.embed_choice.tiles, image_address=address)
            return self._norm_pre(buf)
        grid = K.patch_grid(images, self.patch)  # (B, hp, wp, c, ph, pw), a view
        patches = torch.empty(grid.shape, dtype=self.dtype, device=images.device)
        patches.copy_(grid)  # cast and unfold in one copy
        tokens = F.linear(patches.view(B * self.num_patches, -1), self.patch_w).view(B, self.num_patches,
                                                                                    self.embed_dim)
        if self._add_into_buffer:
            torch.add(tokens, self.patch_const, out=buf[:, self.num_prefix:])  # one pass into the buffer
        else:
            buf[:, self.num_prefix:] = (tokens.float() + self.patch_const.float()).to(self.residual_dtype)
        return self._norm_pre(buf)

    def _norm_pre(self, buf: torch.Tensor) -> torch.Tensor:
        if self.norm_pre is not None:
            buf = _layer_norm_f32(buf, *self.norm_pre).to(self.residual_dtype)
        return buf

    def _rows(self, x: torch.Tensor, n: int, pad: int, width: Optional[int] = None
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """A (B*n + pad, width) operand buffer in the compute dtype and its first B*n rows viewed as (B, n, width),
        where the kernel before the product writes them (``width``: C, or the attention's H*D for the projection's
        operand); ``pad`` (a :class:`ProductChoice`'s) only at the batch size it was timed at."""
        B, _, C = x.shape
        width = width or C
        pad = pad if B == self.tune_batch else 0
        buf = torch.empty(B * n + pad, width, dtype=self.dtype, device=x.device)
        return buf, buf[:B * n].view(B, n, width)

    def _block_triton(self, x: torch.Tensor, blk: _FastBlock) -> torch.Tensor:
        n = blk.n
        # each product's operand: its real rows, then its padding (none where a kernel fuses it with the norm)
        operand = None if blk.norm_qkv.kind == 'triton' else self._rows(x, n, blk.qkv.pad)[0]
        qkv = run_norm_qkv(blk.qkv, blk.norm_qkv, x, blk.ids, blk.ln1_w, blk.ln1_b, blk.eps1, blk.qkv_w, blk.qkv_wt,
                           blk.qkv_b, operand)  # the real rows of the product, (B, n, 3*H*D)
        fused = blk.proj_norm.kind == 'triton'  # the projection, residual update and norm in one kernel
        o_buf, o = self._rows(x, n, 0 if fused else blk.proj.pad, blk.proj_w.shape[1])
        run_attention(blk.attention, qkv, blk.num_heads, blk.scale, out=o)
        buf, y = self._rows(x, n, 0 if blk.mlp_residual.kind == 'triton' else blk.mlp.pad)
        run_proj_norm(blk.proj, blk.proj_norm, x, blk.ids, o_buf, blk.proj_w, blk.proj_wt, blk.proj_b, blk.gamma1,
                      blk.ln2_w, blk.ln2_b, blk.eps2, out=y)
        return run_mlp_residual(blk.mlp, blk.fc2, blk.mlp_residual, x, blk.ids, buf, blk.fc1_w, blk.fc1_wt,
                                blk.fc1_b, blk.fc2_w, blk.fc2_wt, blk.fc2_b, blk.gamma2)

    def _block_torch(self, x: torch.Tensor, blk: _FastBlock) -> torch.Tensor:
        t = x if blk.dense else x.index_select(1, blk.ids)
        y = _layer_norm_f32(t, blk.ln1_w, blk.ln1_b, blk.eps1).to(self.dtype)
        qkv = F.linear(y, blk.qkv_w, blk.qkv_b)
        a = F.linear(run_attention(blk.attention, qkv, blk.num_heads, blk.scale), blk.proj_w, blk.proj_b)
        h = (t.float() + _scaled(a, blk.gamma1)).to(self.residual_dtype)
        y = _layer_norm_f32(h, blk.ln2_w, blk.ln2_b, blk.eps2).to(self.dtype)
        m = F.linear(F.gelu(F.linear(y, blk.fc1_w, blk.fc1_b)), blk.fc2_w, blk.fc2_b)
        h = (h.float() + _scaled(m, blk.gamma2)).to(self.residual_dtype)
        return h if blk.dense else x.index_copy_(1, blk.ids, h)

    @property
    def head_ids(self) -> torch.Tensor:
        """The tokens the model's head reads as it is now, in original order: the prefix for class-token pooling
        by timm's own heads, else all of them."""
        return self.prefix_ids if self._pools_by_token() else self.all_ids

    def _pools_by_token(self) -> bool:
        """Whether the model's head reads only the prefix tokens now: timm's pool (or DeiT's distilled head), not
        one set on the model itself, with global_pool 'token' and no attention pool (reset_classifier may have
        changed either since the build)."""
        return (self.num_prefix > 0 and self._model.__dict__.get('global_pool') == 'token'
                and getattr(self._model, 'attn_pool', None) is None and _timm_head(self._model))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """model.norm of the tokens the head reads, in original order, fp32."""
        ids = self.prefix_ids if self._by_token else self.all_ids  # (as the forward found the head)
        if self.norm is None:
            return x.index_select(1, ids).float()
        if self.backend == 'triton':
            return K.gather_layer_norm_triton(x, ids, *self.norm, out_dtype=torch.float32)
        return _layer_norm_f32(x.index_select(1, ids), *self.norm)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The token buffer after the patch embedding (and ``norm_pre``), as the forward pass builds it: the first
        step of :meth:`forward`, on its own (the benchmark profiles it)."""
        with torch.autocast(images.device.type, enabled=False), _on(self.device):
            return self._embed(images)

    def _forward_impl(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            x = self._embed(images)
            for blk in self.blocks:
                if blk.n:
                    x = self._block_triton(x, blk) if self.backend == 'triton' else self._block_torch(x, blk)
            return self._model.forward_head(self._features(x).to(self._head_dtype)).float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_chans,) + self.img_size
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f'expected images of shape (B, {", ".join(map(str, expected))}), '
                             f'got {tuple(images.shape)}')
        if not images.is_floating_point():  # the eager model refuses them too (its convolution's dtypes differ)
            raise ValueError(f'expected floating-point images (normalised as the model\'s data config says), got '
                             f'{str(images.dtype).replace("torch.", "")}')
        if any(slot['token_index'] is not m or v is not None and m._version != v  # a mask replaced or written
               for slot, m, v in self._masks_seen):
            self._model.sync_token_plan()  # a new plan if its values changed
            self._watch_masks()
        if self._plan_version is not None and self._model.token_plan_version != self._plan_version:
            raise RuntimeError('fast path: the model\'s masks were set or its weights loaded after this path was '
                               'built from them: build it again')
        if self._model.training:  # the head is the model's own: dropout, a distilled model's two outputs
            raise RuntimeError('fast path: the model is in training mode and this path computes its eval mode: '
                               'call model.eval()')
        first = self._first_parameter
        if first.dtype != self._head_dtype or first.device != self.device:  # its head would not fit
            raise RuntimeError(f'fast path: the model was cast or moved after this path was built (now '
                               f'{str(first.dtype).replace("torch.", "")} on {first.device}, built for '
                               f'{str(self._head_dtype).replace("torch.", "")} on {self.device}): build it '
                               f'again')
        if _REGISTRATIONS[0] != self._registrations_seen:  # a module or parameter was set somewhere
            self._check_computed()
        hook_id = _next_hook_id()
        if hook_id is None or hook_id != self._hooks_checked_at:
            self._check_hooks()
            self._hooks_checked_at = hook_id
        by_token = self._pools_by_token()  # the head's pool as it is now (read by the forward, compiled or not)
        if by_token is not self._by_token:
            self._by_token = by_token
        if images.shape[0] == 0:  # no rows for the kernels and views: the head gives the empty output's shape
            tokens = (self.prefix_ids if self._by_token else self.all_ids).numel()
            features = torch.zeros(0, tokens, self.embed_dim, dtype=self._head_dtype, device=self.device)
            return self._model.forward_head(features).float()
        if self._graph is not None and images.shape == self._static_in.shape:
            if getattr(self._model, 'head', None) is not self._built_head:  # the graph would compute the old one
                raise RuntimeError('fast path: the model\'s head was replaced after this path was built '
                                   '(reset_classifier, say), and its CUDA graph replays the old one: build it again')
            if _head_state(self._model) != self._built_head_state:
                raise RuntimeError('fast path: the model\'s head was changed after this path was built (its '
                                   'global_pool, fc_norm or another module of its head), and its CUDA graph replays '
                                   'the old one: build it again')
            if hook_id is None or hook_id != self._head_hooks_checked_at:
                for name, hooks, captured in self._head_hooks:
                    if hooks and not hooks.keys() <= captured:
                        raise RuntimeError(f'fast path: a forward hook was registered on {name} after this path\'s '
                                           f'CUDA graph was captured, and the graph replays the head without it: '
                                           f'build it again')
                self._head_hooks_checked_at = hook_id
            with _on(self.device):  # replayed on the model's GPU's current stream
                if self._reads_in_place(images):
                    self._image_address.fill_(images.data_ptr())
                else:
                    self._static_in.copy_(images)
                    if self._image_address is not None:
                        self._image_address.fill_(self._static_in.data_ptr())
                self._graph.replay()
                return self._static_out.clone()
        with _on(self.device):  # Triton launches on the current device, whatever the tensors' device
            try:
                return self._run(images.to(self.device))
            except _RECOMPILE_LIMIT_HIT as e:
                raise RuntimeError(f'fast path: backend \'compile\' has compiled this path for as many input shapes '
                                   f'as torch._dynamo.config.recompile_limit allows '
                                   f'({torch._dynamo.config.recompile_limit}; each batch size, dtype and layout of '
                                   f'the images is one): raise that limit, or build the path again') from e

    def _check_computed(self) -> None:
        """RuntimeError if a module or parameter the path computes was replaced (or removed) since the build: the
        path holds what it read then."""
        now = dict(_computed_objects(self._model))
        for name, built in self._computed_built:
            if now.get(name) is not built:
                what = 'the model\'s final norm (model.norm)' if name == 'norm' else f'model.{name}'
                raise RuntimeError(f'fast path: {what} was replaced after this path was built, and the path computes '
                                   f'the one it read then: build it again')
        self._registrations_seen = _REGISTRATIONS[0]

    def _check_hooks(self) -> None:
        """RuntimeError if a forward hook was registered after the build on a module the path computes (or the
        model), or a global one is registered: the path calls none of them, so the hook would be skipped."""
        for name, hooks, built in self._hooks_watched:
            if hooks and not hooks.keys() <= built:
                raise RuntimeError(f'fast path: a forward hook was registered on {name or "the model"} after this path '
                                   f'was built, and the path calls none of the modules it computes: remove the hook, '
                                   f'or run the model itself')
        if _global_forward_hooks():
            raise RuntimeError('fast path: a global forward hook is registered (register_module_forward_hook), and '
                               'the path calls none of the modules it computes: remove the hook, or run the model '
                               'itself')
        if self.backend == 'compile' and any(hooks.keys() != noted for _, hooks, noted in self._compiled_head_hooks):
            self._compile()  # (a hook on the head registered or removed since the compiled graph traced it)

    def _watch_masks(self) -> None:
        """Note the model's mask tensors and their version counters, as the forward compares them."""
        masks = [slot['token_index'] for slot in self._mask_slots]
        self._masks_seen = [(slot, m, _version_of(m)) for slot, m in zip(self._mask_slots, masks)]

    def _reads_in_place(self, images: torch.Tensor) -> bool:
        """Whether the captured graph can read ``images`` where they are (its patch embedding reads them through
        an address): contiguous, on the device, in the captured dtype, 16-byte aligned."""
        return (self._image_address is not None and images.device == self.device
                and images.dtype == self._static_in.dtype and images.is_contiguous() and images.data_ptr() % 16 == 0)

    @torch.no_grad()
    def capture_cuda_graph(self, batch_size: int) -> None:
        """Capture the whole forward for ``batch_size`` images (static input and output buffers); later calls
        with that batch size replay it, others run uncaptured.  With the Triton patch embedding the graph reads
        the caller's images where they are (contiguous fp32 on the device; their address is written before the
        replay); other images are copied into the static input first."""
        if self.device.type != 'cuda':
            raise ValueError('fast path: CUDA graphs need a CUDA model')
        with _on(self.device):  # a capture records the current device's work: make it the model's
            self._capture(batch_size)

    def _capture(self, batch_size: int) -> None:
        # The buffers every call writes are ordinary tensors even when the path is built under
        # torch.inference_mode: an inference tensor refuses in-place writes outside it, so later calls would fail.
        with torch.inference_mode(False):
            static_in = torch.randn(batch_size, self.in_chans, *self.img_size, device=self.device)
            self._graph, self._static_in, self._image_address = None, static_in, None
            if self.embed_choice.kind == 'triton':
                self._image_address = torch.tensor([static_in.data_ptr()], dtype=torch.int64, device=self.device)
        self._note_captured_head()
        self._static_out, self.dependent_launch, self.dependent_launch_ms = None, None, {}
        self.refused['dependent_launch'] = {}
        mode = self._dependent_launch_mode
        dependent = mode == 'on'
        graph, out = self._capture_graph(static_in, dependent)
        if mode == 'auto' and self._times_dependent_launch():
            graph, out, dependent = self._choose_dependent_launch(static_in, graph, out)
        self._graph, self._static_out, self.dependent_launch = graph, out, dependent

    def _capture_graph(self, static_in: torch.Tensor, dependent: bool, pool=None
                       ) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The forward on ``static_in`` captured in a CUDA graph (warmed up first, off the capture), its Triton
        kernels launched with programmatic dependent launch if ``dependent``, its memory from the pool of another
        graph if ``pool`` (``graph.pool()``); (graph, its output buffer)."""
        with K.dependent_launches() if dependent else contextlib.nullcontext():
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture: Triton/inductor compile, cuBLAS handles
                for _ in range(3):
                    self._run(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=pool):
                    static_out = self._run(static_in)
                torch.cuda.synchronize(self.device)
            except torch.OutOfMemoryError:
                raise  # the batch does not fit: said as such (finetune.out_of_memory), not as a capture failure
            except Exception as e:
                how = (' with programmatic dependent launch (build the path with dependent_launch=\'off\' to '
                       'capture without it)' if dependent else '')
                raise CaptureError(f'capturing the forward in a CUDA graph{how} failed ({type(e).__name__}: '
                                   f'{str(e).strip()[:300]})') from e
        return graph, static_out

    def _times_dependent_launch(self) -> bool:
        """Whether a capture times its graph with and without programmatic dependent launch (``dependent_launch``
        'auto'): the Triton backend on a Hopper GPU (compute capability 9.x, H100 and H200) with a Triton that has
        it (:func:`models.fast_kernels.dependent_launch_problem`).  Not on later GPUs unasked ('on' takes them): a
        capture that fails leaves torch's allocator unusable for the rest of the process, and on a consumer
        Blackwell GPU (12.0) a capture of kernels launched so has been reported to fail."""
        return (self.backend == 'triton' and _times_on(self.device)
                and K.dependent_launch_problem(self.device) is None
                and torch.cuda.get_device_capability(self.device)[0] == 9)

    def _choose_dependent_launch(self, static_in: torch.Tensor, graph: torch.cuda.CUDAGraph, out: torch.Tensor
                                 ) -> Tuple[torch.cuda.CUDAGraph, torch.Tensor, bool]:
        """The forward captured again with programmatic dependent launch, both graphs replayed on the same
        (random) images and timed (:func:`_replay_ms`; ``dependent_launch_ms`` 'off' and 'on'), and the faster
        kept: (graph, its output buffer, whether it is the one with it).  The second graph must give the first's
        logits bit for bit (the same kernels on the same operands, each waiting for the one before it); one that
        does not, or whose warm-up fails (a kernel variant with the wait that does not build, say), is refused (the
        reason in ``refused['dependent_launch']``) and the first graph kept; a failure of the capture itself is
        raised (CaptureError), as any: torch's allocator is unusable after it.  The second
        graph takes its memory from the first's pool (the two are only ever replayed one after the other, and each
        writes every intermediate before it reads it), so capturing it needs little more memory than the first."""
        try:
            dep_graph, dep_out = self._capture_graph(static_in, dependent=True, pool=graph.pool())
        except (CaptureError, torch.OutOfMemoryError):
            raise  # a capture that failed leaves torch's allocator unusable: never hidden; a full GPU is the batch's
        except Exception as e:  # noqa: BLE001  (its warm-up, before any capture: a kernel variant with the wait
            # that does not build, say; refused, as a tile that fails to launch)
            self.refused['dependent_launch'] = {0: {'on': f'its warm-up failed ({type(e).__name__}: '
                                                          f'{str(e).strip()[:300]})'}}
            graph.replay()  # the graph without it still runs (else that error is raised here, at the build)
            torch.cuda.synchronize(self.device)
            return graph, out, False
        graph.replay()
        dep_graph.replay()
        torch.cuda.synchronize(self.device)
        if not torch.equal(out, dep_out):
            diff = (out - dep_out).abs().max().item()
            self.refused['dependent_launch'] = {0: {'on': f'its logits differ from the graph launched without it '
                                                          f'(max |difference| {diff:.3g})'}}
            dep_graph.reset()
            return graph, out, False
        off_ms, on_ms = _replay_ms([graph, dep_graph])
        self.dependent_launch_ms = {'off': off_ms, 'on': on_ms}
        faster = on_ms < off_ms
        # the slower one's executable graph released; the memory stays in the pool the two share, which the kept one
        # holds (a pool is freed when the last graph using it is)
        (graph if faster else dep_graph).reset()
        return (dep_graph, dep_out, True) if faster else (graph, out, False)

    def _note_captured_head(self) -> None:
        """Note the head as a graph captures it, as each replay checks it: the head (held, so its weights stay
        where the graph reads them), its other modules and pool, and the hooks of its modules."""
        self._by_token = self._pools_by_token()
        object.__setattr__(self, '_built_head', getattr(self._model, 'head', None))
        object.__setattr__(self, '_built_head_state', _head_state(self._model))
        object.__setattr__(self, '_head_hooks', _hook_watch(_computed_modules(self._model, computed=False)))
        self._head_hooks_checked_at = None

    def _load_from_state_dict(self, *args, **kwargs):
        """``load_state_dict``: refused (RuntimeError) before anything is written.  The path's weights are cast
        copies of the model's or share the model's own storage, so a load would overwrite the model's weights in
        place, and the result would be neither model (the head is the model's, the token ids and the build's
        choices were made for the model it was built from)."""
        raise RuntimeError('fast path: it cannot load a state dict (it holds the weights of the model it was built '
                           'from, some of them the model\'s own tensors): load the state dict into the model and '
                           'build the path again')

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()`` and the like: refused (RuntimeError, nothing changed) unless they
        change nothing.  The kernels and their timed choices are for the dtype and device the path was built for,
        and a captured CUDA graph reads its weights at their addresses: a cast copy would leave it reading freed
        memory."""
        if any(fn(t) is not t for t in self.buffers()):
            built = str(self.dtype).replace('torch.', '')
            raise RuntimeError(f'fast path: it cannot be cast or moved (built for {built} on {self.device}): build '
                               f'it again, with build_fast_path(model, dtype=...) on the model\'s device')
        return self

    def describe(self) -> Dict:
        """What was built: backend, dtypes, kept count per block, attention chosen per kept count."""
        return {
            'backend': self.backend, 'dtype': str(self.dtype).replace('torch.', ''),
            'residual_dtype': str(self.residual_dtype).replace('torch.', ''),
            'cuda_graph_batch': None if self._graph is None else int(self._static_in.shape[0]),
            'cuda_graph_input': (None if self._graph is None
                                 else 'read in place' if self._image_address is not None else 'copied'),
            'dependent_launch': self.dependent_launch,
            'dependent_launch_ms': dict(self.dependent_launch_ms),
            'kept_counts': [blk.n for blk in self.blocks],
            'attention': {str(n): c.label for n, c in sorted(self.attention_choices.items())},
            'attention_ms': _finite(self.attention_timings),
            'qkv': {str(n): c.label for n, c in sorted(self.qkv_choices.items())},
            'qkv_ms': _finite(self.qkv_timings),
            'proj': {str(n): c.label for n, c in sorted(self.proj_choices.items())},
            'proj_ms': _finite(self.proj_timings),
            'proj_norm': {str(n): c.label for n, c in sorted(self.proj_norm_choices.items())},
            'proj_norm_ms': _finite(self.proj_norm_timings),
            'mlp': {str(n): c.label for n, c in sorted(self.mlp_choices.items())},
            'mlp_ms': _finite(self.mlp_timings),
            'fc2': {str(n): c.label for n, c in sorted(self.fc2_choices.items())},
            'fc2_ms': _finite(self.fc2_timings),
            'mlp_residual': {str(n): c.label for n, c in sorted(self.mlp_residual_choices.items())},
            'mlp_residual_ms': _finite(self.mlp_residual_timings),
            'norm_qkv': {str(n): c.label for n, c in sorted(self.norm_qkv_choices.items())},
            'norm_qkv_ms': _finite(self.norm_qkv_timings),
            'patch_embedding': self.embed_choice.label,
            'patch_embedding_ms': _finite({0: self.embed_timings}).get('0', {}),
            'refused': {kind: {str(n): why for n, why in sorted(per_count.items()) if why}
                        for kind, per_count in self.refused.items() if any(per_count.values())},
        }


def _on(device: torch.device):
    """A context in which ``device`` is the current CUDA device (nothing to do for another device type)."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def _finite(timings: Dict[int, Dict[str, float]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Build-time timings for a JSON report: inf (failed or out of tolerance) as None."""
    return {str(n): {k: (v if v < float('inf') else None) for k, v in t.items()}
            for n, t in sorted(timings.items()) if t}


def _head_state(model: nn.Module) -> tuple:
    """What the model's head computes with besides its weights and what ``head`` itself is: its other modules,
    its pool, and a forward_head or pool set on the model itself (a CUDA graph replays them as captured)."""
    mods, d = model._modules, model.__dict__
    return (*(mods.get(name) for name in ('head_dist', 'fc_norm', 'head_drop', 'attn_pool')),
            d.get('global_pool'), d.get('attn_pool'), d.get('forward_head'), d.get('pool'))


def cpu_compiler_problem() -> Optional[Exception]:
    """Why torch.compile cannot build its CPU kernels here, or None: inductor's own search for its C++ compiler
    (from $CXX or its config), whose error otherwise comes as a traceback at the first compiled call, after the
    model is built (the 'compile' backend on a CPU, a torch.compile of timm's model alike)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # (a torch that keeps it elsewhere: its own error comes at the first compiled call)
        return None
    try:
        get_cpp_compiler()
    except RuntimeError as e:  # (torch._inductor.exc.InvalidCxxCompiler)
        return e
    return None


def build_fast_path(model: nn.Module, backend: str = 'triton', dtype: Optional[torch.dtype] = None,
                    cuda_graph: bool = False, batch_size: Optional[int] = None,
                    residual_dtype: Optional[torch.dtype] = None, attention: str = 'auto', mlp: str = 'auto',
                    kept_ids: Optional[Sequence[torch.Tensor]] = None, dependent_launch: str = 'auto') -> FastViT:
    """An inference-only module computing ``model(images)`` fast, on the model's device.

    ``backend``: 'triton' (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), 'torch' (plain torch ops,
    anywhere), 'compile' (torch.compile of the 'torch' formulation).  ``dtype``: the matrix products' dtype
    (torch.float16/bfloat16 for speed; default fp32).  ``residual_dtype``: the token buffer's (default fp32).
    Either is a floating dtype, fp16, bf16, fp32 or fp64 (anything else: ValueError).
    ``attention``: 'auto' (time SDPA backends and, for 'triton', the Triton kernel per distinct kept count on
    CUDA, at ``batch_size`` images or 64; SDPA on CPU and for 'compile'), 'sdpa', or 'triton'.  ``mlp``: the
    matrix products with fused epilogues, i.e. the MLP's two (GELU; the residual update) and the patch
    embedding's (the position constant, written into the buffer), and the attention's two (qkv and the
    projection): 'auto' (with backend 'triton' and fp16/bf16 on CUDA: time cuBLAS, on the real rows and padded
    (``ROW_PADS``; the second MLP product as the first left its operand), + the elementwise kernels against the
    fused Triton kernels, per kept count for the block's four products, and at rows of at most 256 channels the
    projection fused with its residual update and the second norm against cuBLAS + the residual-norm kernel
    (``proj_norm``), the whole MLP with its residual update in one kernel against its two products as chosen
    (``mlp_residual``), and the first norm with qkv in one kernel against the gather-norm kernel and qkv as chosen
    (``norm_qkv``); else torch), 'torch', or 'triton' (the fused kernels of the MLP's two products and the
    patch embedding; qkv and the projection by cuBLAS, unfused).  ``cuda_graph``: capture the forward for
    ``batch_size`` images (CUDA only).  ``kept_ids``: per-block original token ids, overriding
    ``model.kept_token_ids()`` (a model without it is dense).  ``dependent_launch``: how the CUDA graph launches
    the Triton kernels: 'auto' (backend 'triton' on a Hopper GPU, compute capability 9.x, with a Triton that has
    it: the graph captured both with and without programmatic dependent launch, the two checked to give the same
    logits bit for bit and timed, the faster kept; else without), 'on' (with it, untimed, on any GPU of compute
    capability 9.0 or later; ValueError where it cannot be), 'off' (without).
    """
    if cuda_graph and not batch_size:
        raise ValueError('cuda_graph=True needs batch_size')
    if dependent_launch == 'on' and not cuda_graph:
        raise ValueError("dependent_launch='on' needs cuda_graph=True (it is how the CUDA graph launches the kernels)")
    fast = FastViT(model, backend=backend, dtype=dtype, residual_dtype=residual_dtype, kept_ids=kept_ids,
                   attention=attention, mlp=mlp, tune_batch=batch_size, dependent_launch=dependent_launch)
    if cuda_graph:
        fast.capture_cuda_graph(batch_size)
    return fast
