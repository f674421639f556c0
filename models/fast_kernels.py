"""Fused forward kernels for the inference fast path (models/fast_path.py), each with a pure-torch reference.

The fast path keeps every token of an image in one buffer ``x`` of shape (B, N, C) in the *original* token
order, and block ``l`` processes the rows ``ids = kept_token_ids()[l]`` of it in place.  The row-wise work of a
block is fused into three memory-bound kernels around the matrix products, so that the residual stream is read
and written once per kernel and no gathered copy of it ever exists:

* ``gather_layer_norm``:       y = LN(x[:, ids])                                  (B, n, C) in the compute dtype
* ``residual_layer_norm_``:    x[:, ids] += gamma * a;  returns LN(x[:, ids])     (a: attention output)
* ``residual_scatter_``:       x[:, ids] += gamma * m                              (m: MLP output)

the first MLP layer with its activation, as one matrix product whose epilogue applies the bias and the exact
(erf) GELU to the fp32 accumulator, so the (B, n, 4C) hidden activation is written once instead of written,
read and written again by a separate GELU:

* ``linear_gelu``:             GELU(y @ W1^T + b1)                                (W1^T stored as (C, 4C))

and the second MLP layer with the residual update as its epilogue, so its (B, n, C) output is never written:

* ``linear_residual_scatter_``: x[:, ids] += gamma * (u @ W2^T + b2)

and, for rows of at most 256 channels (one tile spans a row), the attention's projection with the residual update
and the block's second norm as its epilogue, so neither the projection's output nor a separate residual kernel
is needed (it replaces the projection and ``residual_layer_norm_``):

* ``linear_residual_layer_norm_``: x[:, ids] += gamma * (o @ Wp^T + bp);  returns LN(x[:, ids])

and, for rows of at most 256 channels, the whole MLP with its residual update in one kernel, so the (B, n, 4C)
hidden activation is never written at all (it replaces ``linear_gelu`` and ``linear_residual_scatter_``): a
program holds the second product's accumulator for its rows, one tile spanning the row, and makes their hidden
activation a chunk of columns at a time, GELU'd in fp32 and rounded to the compute dtype (where the unfused
kernels store it):

* ``mlp_residual_scatter_``:   x[:, ids] += gamma * (GELU(y @ W1^T + b1) @ W2^T + b2)

and, for rows of at most 256 channels, the block's first norm as the prologue of the qkv product, so the normed
rows are never written (it replaces ``gather_layer_norm`` and the product): a program reads its rows of the
buffer by id, normalises them in fp32, rounds them to the compute dtype and multiplies them by its columns of
the weight (each program of a row normalises the row again: a row is read from L2 once per column tile):

* ``gather_layer_norm_linear``: LN(x[:, ids]) @ W^T + b                           (B*n, N)

and the patch embedding as one matrix product whose operand is read straight from the images (no unfolded
copy) and whose epilogue adds the conv bias and position embedding and writes the tokens into the buffer:

* ``patch_embed_``:            x[:, P + p] = unfold(images)[:, p] @ W^T + const[p]  (W: the conv weight (C, c*ph*pw))

and the attention of short sequences (n <= a few hundred tokens, head_dim a power of two >= 16):

* ``attention``:               softmax(q k^T * scale) v for every (image, head), read straight from the qkv
                               projection's output (B, n, 3, H, D) and written as (B, n, H*D), so neither the
                               split into heads nor the merge back costs a copy.

LayerNorm is LN(h) = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias over the channel axis, with the biased
variance, computed in fp32 whatever the storage dtypes are (as torch does under autocast).  ``gamma`` is a
LayerScale vector (C,) or None (no scaling).  The residual sum is formed in fp32 and rounded once to the
buffer's dtype; the LayerNorm after it reads that rounded value, exactly as the unfused sequence
"add, store, normalise" does.

The attention kernel is a FlashAttention-style forward pass: a program owns ``BLOCK_M`` query rows of one
(image, head), walks over the keys ``BLOCK_N`` at a time with an online softmax (running max and running sum
in fp32, exp2 with the scale folded into log2(e)), and accumulates P·V in fp32 with P rounded to the input
dtype for the matrix unit.  Query tiles of 32 or 64 rows let a block that keeps 148 tokens pay for 160 or 192
rows instead of the 256 that 128-row tiles cost.  Keys likewise: with a tail tile ``BLOCK_T`` smaller than
``BLOCK_N``, the program walks the first ``n - n % BLOCK_N`` keys ``BLOCK_N`` at a time without masks and the
rest ``BLOCK_T`` at a time, so 148 keys cost one 128-key step and one 32-key step (160 keys) where 128-key steps
alone cost 256 and 64-key steps 192 in three steps.  The tile sizes are chosen by timing in the fast path.

Within :func:`dependent_launches` every kernel is launched with programmatic dependent launch (Hopper on): each
program first waits until the kernel before it in the stream has finished and its writes are visible, then lets
the next kernel's programs be scheduled, so the next kernel is resident when this one ends; what each computes is
unchanged.

Every op has a ``*_reference`` (plain torch: index_select, F.layer_norm, index_copy_, SDPA in fp32) and a
``*_triton`` implementation taking the same arguments (the Triton one may add its tile sizes, an ``out``
buffer, an image address); the undecorated name dispatches to Triton when :func:`triton_runs_on` says it can (a CUDA
tensor, or a CPU one while ``TRITON_INTERPRET=1`` was set before Triton was imported; for ``attention``
also a head_dim that suits the kernel), else to the reference.

Contracts (checked in the wrappers where cheap, else stated): every tensor has a contiguous last dimension;
``ids`` is a 1-D integer tensor on the same device with values in [0, N); the in-place ops that take ids
(``residual_layer_norm_``, ``residual_scatter_``, ``linear_residual_scatter_``, ``linear_residual_layer_norm_``,
``mlp_residual_scatter_``) need *distinct* ids, since two
programs writing the same row would race; ``gather_layer_norm`` does not.  Forward only: the Triton kernels record
no gradients (their outputs have no grad_fn, whatever their inputs), while the references record them as the torch
ops they are made of do (the fast path runs both under no_grad).
"""
import contextlib
import os
import threading
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.errors import TritonError
    HAS_TRITON = True
except ImportError:  # a CPU-only torch without Triton: the references serve everything
    triton = tl = None
    HAS_TRITON = False

    class TritonError(Exception):
        """Never raised: what Triton's compile and launch errors derive from, where Triton is installed."""

__all__ = [
    'HAS_TRITON', 'INTERPRETER', 'TritonError', 'triton_runs_on', 'attention_tiles_ok',
    'HAS_DEPENDENT_LAUNCH', 'dependent_launch_problem', 'dependent_launches',
    'gather_layer_norm', 'gather_layer_norm_reference', 'gather_layer_norm_triton',
    'residual_layer_norm_', 'residual_layer_norm_reference_', 'residual_layer_norm_triton_',
    'residual_scatter_', 'residual_scatter_reference_', 'residual_scatter_triton_',
    'attention', 'attention_reference', 'attention_triton', 'ATTENTION_TILES',
    'linear', 'linear_reference', 'linear_triton',
    'linear_gelu', 'linear_gelu_reference', 'linear_gelu_triton', 'LINEAR_TILES', 'PATCH_EMBED_TILES',
    'linear_residual_scatter_', 'linear_residual_scatter_reference_', 'linear_residual_scatter_triton_',
    'mlp_residual_scatter_', 'mlp_residual_scatter_reference_', 'mlp_residual_scatter_triton_', 'mlp_tiles',
    'gather_layer_norm_linear', 'gather_layer_norm_linear_reference', 'gather_layer_norm_linear_triton',
    'norm_linear_tiles', 'row_tiles',
    'patch_embed_', 'patch_embed_reference_', 'patch_embed_triton_', 'patch_grid', 'unfold_patches',
]


def _interpreting() -> bool:
    """Whether the kernels below run in Triton's CPU interpreter.  Triton reads TRITON_INTERPRET when @triton.jit
    decorates a function: its own library's (tl.sum, tl.cdiv, ...) when Triton is imported, which torch and this
    project's modules do early, and the kernels below when this module is.  Both must have seen it: kernels
    interpreted with Triton's library compiled fail inside at their first call (set after ``import triton``, it
    reached this module only)."""
    if os.environ.get('TRITON_INTERPRET', '0') != '1' or not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.standard.sum, InterpretedFunction)


INTERPRETER = _interpreting()  # (read once, as Triton reads it)

# (BLOCK_M, BLOCK_N, BLOCK_T, num_warps, num_stages) the fast path times for the attention kernel; the first is
# the default.  BLOCK_T is the key tile of the tail (the last n % BLOCK_N keys); BLOCK_T == BLOCK_N walks every
# key tile alike, masked.  Two pipeline stages: a key loop of at most a few tiles gains little from more, and
# (64, 256) with three stages of K and V tiles (64 KB a stage at head_dim 64) would crowd the 227 KB of shared
# memory.  The tail tile is for pruned blocks.  Measured on an H200 at batch 1, C&C-B-25 (138-155 kept tokens)
# was no faster than dense DeiT-B (0.999x): the dense blocks' 197 keys took two 128-key steps and the pruned
# blocks' three 64-key steps (their fastest; 128-key tiles would also take two).  128 + 32 covers 129-160 keys
# in one whole step and a quarter step.  In that run's builds at the main batch sizes (256; DeiT-B 128;
# benchmarks/results/cuda.json) 64-key steps won at every kept count of DeiT-Ti, S and B, dense or pruned
# (C&C-Ti-30, 132-150 keys: 0.035 ms against 0.043 for 128 + 32; dense 197: 0.054), where at batch 1 the
# 128-key steps won (and 128 + 32), so the last two tiles take 64-key steps and then 16 or 32 keys at a time: 138
# keys cost 144 (two steps and a quarter) instead of 192 (three), 197 cost 208 instead of 256 (not yet measured
# on a GPU).
ATTENTION_TILES = ((64, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 128, 128, 4, 2), (128, 64, 64, 8, 2),
                   (128, 128, 128, 8, 2), (64, 256, 256, 8, 2), (64, 128, 32, 4, 2), (64, 64, 16, 4, 2),
                   (64, 64, 32, 4, 2))
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the fused matrix products; the first is the default (the
# tile a forced build, mlp='triton', runs).  Few on purpose: each is compiled per shape family at build time, and
# every compile costs seconds.  Compiled for sm_90a, the second and third spill registers (a 128x128 fp32
# accumulator is 128 registers a thread in 4 warps, and the fc2 epilogue holds a residual tile as large beside it);
# on an H200 they took 1.5x and 2.1x the fastest candidate's time for fc2.  The first holds the 128x128 tile in 8
# warps, without spills.
LINEAR_TILES = ((128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
                (128, 64, 64, 4, 4))
# The patch embedding's: those, and two 256-column tiles that take 32 of the 768 (= 3 x 16 x 16) pixel columns a
# step.  Its product is bound by the fp32 image read (at DeiT-Ti width and batch 256 the fastest, 128x256x64 in 8
# warps, moved about half of what an H200's memory can); a 256-column tile reads each image once whatever the width
# up to 256 (DeiT-Ti's 192), and the 32-column steps halve the pixel tile a thread holds beside the accumulator.
# Compiled for sm_90a the 64-row one spills nothing and fits two blocks in a multiprocessor's shared memory (88
# KB each); the 128-row one has four stages in flight (not yet measured on a GPU).
PATCH_EMBED_TILES = LINEAR_TILES + ((128, 256, 32, 8, 4), (64, 256, 32, 4, 4))


def _has_dependent_launch() -> bool:
    """Whether this Triton can launch a kernel with programmatic dependent launch: the device-side wait and trigger
    (``tl.extra.cuda.gdc_wait``, ``gdc_launch_dependents``) and the ``launch_pdl`` launch option (Triton 3.4+)."""
    if not HAS_TRITON or INTERPRETER:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        cuda = tl.extra.cuda
    except (ImportError, AttributeError):
        return False
    return (hasattr(cuda, 'gdc_wait') and hasattr(cuda, 'gdc_launch_dependents')
            and 'launch_pdl' in getattr(CUDAOptions, '__dataclass_fields__', {}))


HAS_DEPENDENT_LAUNCH = _has_dependent_launch()
# inside dependent_launches(): every kernel below launched from that thread is launched with PDL (per thread: a
# kernel another thread launches meanwhile, outside any capture, keeps its plain variant)
_DEPENDENT = threading.local()


def dependent_launch_problem(device: torch.device) -> Optional[str]:
    """Why the kernels cannot be launched with programmatic dependent launch on ``device`` (PDL: a kernel's
    programs are scheduled while the kernel before it in the stream finishes, and wait on the GPU for its
    results, instead of being launched only after it has finished), or None.  PDL needs a Hopper GPU or later
    (compute capability 9.0) and a Triton that has it; the wait is a Hopper instruction, so a kernel compiled
    with it would not build for an earlier GPU."""
    if device.type != 'cuda':
        return f'it needs a CUDA GPU, not {device.type}'
    if not HAS_DEPENDENT_LAUNCH:
        return 'this Triton has no programmatic dependent launch (Triton 3.4 or later has it)'
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f'it needs compute capability 9.0 or later (Hopper); this GPU has {major}.{minor}'
    return None


@contextlib.contextmanager
def dependent_launches():
    """Within it, every Triton kernel of this module is launched with programmatic dependent launch: each program
    first waits until the kernel before it in the stream has finished and its writes are visible
    (``griddepcontrol.wait``), so what a kernel computes is unchanged, and then lets the next kernel's programs be
    scheduled, so in a CUDA graph the next kernel is ready when this one ends (fewer idle cycles between kernels,
    which at the fast path's short kernels are a fixed cost per kernel).  The kernels are compiled again with the
    wait (a variant of their own).  Only for a device :func:`dependent_launch_problem` has no objection to (the
    fast path captures its CUDA graph inside it, where it chose to).  It holds for the thread that entered it:
    kernels that other threads launch meanwhile are launched as usual."""
    if not HAS_DEPENDENT_LAUNCH:
        raise RuntimeError('dependent launches: this Triton has no programmatic dependent launch (or its '
                           'interpreter runs the kernels)')
    before = getattr(_DEPENDENT, 'on', False)
    _DEPENDENT.on = True
    try:
        yield
    finally:
        _DEPENDENT.on = before


def _launch_options() -> dict:
    """The launch options of a kernel of this module: with :func:`dependent_launches` the wait compiled in (GDC)
    and the launch attribute (launch_pdl)."""
    return {'GDC': True, 'launch_pdl': True} if getattr(_DEPENDENT, 'on', False) else {}


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return HAS_TRITON and (t.is_cuda or (INTERPRETER and t.device.type == 'cpu'))


def _row_tile(C: int) -> Tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps) for the row kernels: the channel axis padded to a power of two, and as many
    rows per program as make about 4096 elements, so a program moves 8-16 KB and C=192 wastes no launches."""
    block_c = triton.next_power_of_2(C)
    rows = max(1, min(32, 4096 // block_c))
    return block_c, rows, 4 if block_c * rows <= 4096 else 8


def _check_rows(x: torch.Tensor, ids: torch.Tensor, other: Optional[torch.Tensor] = None) -> None:
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f'x must be (B, N, C) with a contiguous last dimension, got shape {tuple(x.shape)}')
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64) or ids.device != x.device:
        raise ValueError('ids must be a 1-D int32/int64 tensor on the device of x')
    if other is not None:
        B, _, C = x.shape
        if tuple(other.shape) != (B, ids.numel(), C) or other.stride(-1) != 1:
            raise ValueError(f'expected a ({B}, {ids.numel()}, {C}) tensor with a contiguous last dimension, '
                             f'got {tuple(other.shape)}')


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


# ---------------------------------------------------------------------------------------------------------------
# references (plain torch; the test oracle and the CPU path)

def gather_layer_norm_reference(x: torch.Tensor, ids: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], eps: float,
                                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """LN(x[:, ids]) in fp32, returned in ``out_dtype`` (default: the dtype of x)."""
    rows = x.index_select(1, ids).float()
    y = F.layer_norm(rows, (x.shape[-1],), _f32(weight), _f32(bias), eps)
    return y.to(out_dtype or x.dtype)


def residual_layer_norm_reference_(x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
                                   gamma: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                                   bias: Optional[torch.Tensor], eps: float,
                                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """h = x[:, ids] + gamma * a (fp32, rounded to x's dtype) written back into x; returns LN(h) in
    ``out_dtype`` (default: the dtype of a)."""
    h = x.index_select(1, ids).float() + (a.float() if gamma is None else a.float() * gamma.float())
    h = h.to(x.dtype)
    x.index_copy_(1, ids, h)
    y = F.layer_norm(h.float(), (x.shape[-1],), _f32(weight), _f32(bias), eps)
    return y.to(out_dtype or a.dtype)


def residual_scatter_reference_(x: torch.Tensor, ids: torch.Tensor, m: torch.Tensor,
                                gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """x[:, ids] = x[:, ids] + gamma * m (fp32, rounded to x's dtype); returns x."""
    h = x.index_select(1, ids).float() + (m.float() if gamma is None else m.float() * gamma.float())
    return x.index_copy_(1, ids, h.to(x.dtype))


def attention_reference(qkv: torch.Tensor, num_heads: int, scale: float, **unused) -> torch.Tensor:
    """qkv (B, n, 3*H*D) laid out as (B, n, 3, H, D) -> softmax(q k^T * scale) v as (B, n, H*D), computed in
    fp32 and returned in qkv's dtype.  Tile arguments of the Triton version are accepted and ignored."""
    B, n, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    q, k, v = qkv.float().view(B, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return o.transpose(1, 2).reshape(B, n, num_heads * head_dim).to(qkv.dtype)


def _linear_f32(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = x.float() @ weight_t.float()
    return y if bias is None else y + bias.float()


def linear_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                     **unused) -> torch.Tensor:
    """x @ weight_t + bias computed in fp32, returned in x's dtype.  ``weight_t`` is the linear layer's weight
    transposed, (K, N).  Tile arguments are accepted and ignored."""
    return _linear_f32(x, weight_t, bias).to(x.dtype)


def linear_gelu_reference(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                          **unused) -> torch.Tensor:
    """GELU(x @ weight_t + bias) with the exact (erf) GELU, computed in fp32, returned in x's dtype.
    ``weight_t`` is the linear layer's weight transposed, (K, N).  Tile arguments are accepted and ignored."""
    return F.gelu(_linear_f32(x, weight_t, bias)).to(x.dtype)


def linear_residual_scatter_reference_(x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor,
                                       weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                                       gamma: Optional[torch.Tensor], **unused) -> torch.Tensor:
    """x[:, ids] = x[:, ids] + gamma * (u @ weight_t + bias), the product in fp32 and not rounded before the
    sum, the sum rounded once to x's dtype; returns x.  ``weight_t`` is the linear layer's weight transposed."""
    m = u.float() @ weight_t.float()
    if bias is not None:
        m = m + bias.float()
    return residual_scatter_reference_(x, ids, m, gamma)


def linear_residual_layer_norm_reference_(x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor,
                                          weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                                          gamma: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                                          ln_bias: Optional[torch.Tensor], eps: float,
                                          out_dtype: Optional[torch.dtype] = None,
                                          out: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
    """h = x[:, ids] + gamma * (u @ weight_t + bias), the product in fp32 and not rounded before the sum, h
    rounded once to x's dtype and written back into x; returns LN(h) (fp32, with ``ln_weight``, ``ln_bias``)
    in ``out_dtype`` (default u's dtype), written into ``out`` when given (as the Triton version: see
    :func:`out_rows`).  Tile arguments are accepted and ignored."""
    B, n, C = x.shape[0], ids.numel(), x.shape[-1]
    out = None if out is None else out_rows(B, n, C, x.device, out, out_dtype, u.dtype)  # checked before x changes
    m = u.float() @ weight_t.float()
    if bias is not None:
        m = m + bias.float()
    y = residual_layer_norm_reference_(x, ids, m, gamma, ln_weight, ln_bias, eps, out_dtype or u.dtype)
    return y if out is None else out.copy_(y)


def mlp_residual_scatter_reference_(x: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, w1_t: torch.Tensor,
                                    b1: Optional[torch.Tensor], w2_t: torch.Tensor, b2: Optional[torch.Tensor],
                                    gamma: Optional[torch.Tensor], **unused) -> torch.Tensor:
    """x[:, ids] = x[:, ids] + gamma * (GELU(y @ w1_t + b1) @ w2_t + b2): the hidden activation computed in fp32
    and rounded to y's dtype (:func:`linear_gelu_reference`), the second product in fp32 and not rounded before
    the sum, the sum rounded once to x's dtype (:func:`linear_residual_scatter_reference_`); returns x.  ``w1_t``
    (C, H) and ``w2_t`` (H, C) are the MLP's weights transposed.  Tile arguments are accepted and ignored."""
    u = linear_gelu_reference(y, w1_t, b1)
    return linear_residual_scatter_reference_(x, ids, u, w2_t, b2, gamma)


def gather_layer_norm_linear_reference(x: torch.Tensor, ids: torch.Tensor, ln_weight: Optional[torch.Tensor],
                                       ln_bias: Optional[torch.Tensor], eps: float, weight_t: torch.Tensor,
                                       bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                                       **unused) -> torch.Tensor:
    """LN(x[:, ids]) (fp32, rounded to weight_t's dtype: :func:`gather_layer_norm_reference`) @ weight_t + bias,
    the product in fp32 and rounded once -> (B * n, N) in weight_t's dtype, image by image; written into the
    first B * n rows of ``out`` when given (as the Triton version).  Tile arguments are accepted and ignored."""
    M, N = x.shape[0] * ids.numel(), weight_t.shape[1]
    if out is not None:
        _check_norm_linear_out(out, M, N, weight_t.dtype, x.device)
    y = gather_layer_norm_reference(x, ids, ln_weight, ln_bias, eps, weight_t.dtype)
    product = y.reshape(-1, x.shape[-1]).float() @ weight_t.float()
    if bias is not None:
        product = product + bias.float()
    if out is None:
        return product.to(weight_t.dtype)
    out[:M] = product
    return out


def _check_norm_linear_out(out: torch.Tensor, M: int, N: int, dtype: torch.dtype, device: torch.device) -> None:
    if (out.dim() != 2 or out.shape[0] < M or out.shape[1] != N or out.stride(1) != 1 or out.dtype != dtype
            or out.device != device):
        raise ValueError(f'out must be an (at least {M}, {N}) {dtype} tensor on {device} with contiguous rows, got '
                         f'{tuple(out.shape)} {out.dtype} on {out.device}')


def patch_grid(images: torch.Tensor, patch: Tuple[int, int]) -> torch.Tensor:
    """(B, c, H, W) images -> a (B, H/ph, W/pw, c, ph, pw) view (no copy for contiguous images): each patch in
    the conv weight's (c, ky, kx) order, the patches row-major over the grid."""
    B, c, H, W = images.shape
    ph, pw = patch
    return images.reshape(B, c, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)


def unfold_patches(images: torch.Tensor, patch: Tuple[int, int]) -> torch.Tensor:
    """(B, c, H, W) images -> (B, (H/ph)*(W/pw), c*ph*pw) patches (:func:`patch_grid` flattened): the matrix a
    stride=kernel conv multiplies."""
    grid = patch_grid(images, patch)
    return grid.reshape(grid.shape[0], grid.shape[1] * grid.shape[2], -1)


def _check_patch_embed(out: torch.Tensor, images: torch.Tensor, weight_t: torch.Tensor, const: torch.Tensor,
                       prefix: int, patch: Tuple[int, int]) -> int:
    B, c, H, W = images.shape
    ph, pw = patch
    num_patches = (H // ph) * (W // pw)
    K, C = weight_t.shape
    if H % ph or W % pw or K != c * ph * pw:
        raise ValueError(f'images {tuple(images.shape)} do not tile into {ph}x{pw} patches of {K} values')
    if out.dim() != 3 or tuple(out.shape[::2]) != (B, C) or out.shape[1] < prefix + num_patches or out.stride(-1) != 1:
        raise ValueError(f'out must be ({B}, >= {prefix + num_patches}, {C}) with a contiguous last dimension, '
                         f'got {tuple(out.shape)}')
    if tuple(const.shape) != (num_patches, C):
        raise ValueError(f'const must be ({num_patches}, {C}), got {tuple(const.shape)}')
    return num_patches


def patch_embed_reference_(out: torch.Tensor, images: torch.Tensor, weight_t: torch.Tensor, const: torch.Tensor,
                           prefix: int, patch: Tuple[int, int], **unused) -> torch.Tensor:
    """out[:, prefix + p] = unfold(images)[:, p] @ weight_t + const[p]: the pixels rounded to weight_t's dtype,
    the product and the sum in fp32, one rounding to out's dtype; returns out.  ``weight_t`` is the conv weight
    reshaped to (C, c*ph*pw) and transposed; ``const`` (num_patches, C) the conv bias plus the position
    embedding.  Tile arguments of the Triton version are accepted and ignored."""
    num_patches = _check_patch_embed(out, images, weight_t, const, prefix, patch)
    a = unfold_patches(images, patch).to(weight_t.dtype).float()
    out[:, prefix:prefix + num_patches] = (a @ weight_t.float() + const.float()).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels

if HAS_TRITON:
    @triton.jit
    def _await_prior_launch(GDC: tl.constexpr):
        """With GDC (a launch with programmatic dependent launch, :func:`dependent_launches`): wait until the
        kernel before this one in the stream has finished and its writes are visible, before this program reads
        or writes anything, then let the next kernel's programs be scheduled as this kernel's last ones run."""
        if GDC:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _layer_norm_rows(h, cols_ok, C, eps, w_ptr, b_ptr, cols, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """LN over the last axis of an fp32 (ROWS, BLOCK_C) tile whose columns >= C are masked off."""
        mean = tl.sum(h, axis=1) / C
        d = tl.where(cols_ok[None, :], h - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / C
        y = d * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        return y

    @triton.jit
    def _gather_layer_norm_kernel(x_ptr, ids_ptr, w_ptr, b_ptr, out_ptr, num_rows, n, C,
                                  stride_xb, stride_xn, stride_ob, stride_on, eps,
                                  HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                  ROWS: tl.constexpr, BLOCK_C: tl.constexpr, GDC: tl.constexpr = False):
        # Output row r = b * n + i reads token ids[i] of image b.
        _await_prior_launch(GDC)
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rows_ok = r < num_rows
        b = (r // n).to(tl.int64)
        i = r % n
        tok = tl.load(ids_ptr + i, mask=rows_ok, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        cols_ok = cols < C
        ok = rows_ok[:, None] & cols_ok[None, :]
        h = tl.load(x_ptr + (b * stride_xb + tok * stride_xn)[:, None] + cols[None, :], mask=ok, other=0.0)
        y = _layer_norm_rows(h.to(tl.float32), cols_ok, C, eps, w_ptr, b_ptr, cols, HAS_W, HAS_B)
        dst = out_ptr + (b * stride_ob + i.to(tl.int64) * stride_on)[:, None] + cols[None, :]
        tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _residual_kernel(x_ptr, ids_ptr, a_ptr, g_ptr, w_ptr, b_ptr, out_ptr, num_rows, n, C,
                         stride_xb, stride_xn, stride_ab, stride_an, stride_ob, stride_on, eps,
                         HAS_G: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                         ROWS: tl.constexpr, BLOCK_C: tl.constexpr, GDC: tl.constexpr = False):
        # x[b, ids[i]] += g * a[b, i]; with NORM also out[b, i] = LN(x[b, ids[i]]).
        _await_prior_launch(GDC)
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        rows_ok = r < num_rows
        b = (r // n).to(tl.int64)
        i = (r % n).to(tl.int64)
        tok = tl.load(ids_ptr + i, mask=rows_ok, other=0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        cols_ok = cols < C
        ok = rows_ok[:, None] & cols_ok[None, :]
        src = x_ptr + (b * stride_xb + tok * stride_xn)[:, None] + cols[None, :]
        h = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + (b * stride_ab + i * stride_an)[:, None] + cols[None, :], mask=ok, other=0.0)
        a = a.to(tl.float32)
        if HAS_G:
            a = a * tl.load(g_ptr + cols, mask=cols_ok, other=0.0).to(tl.float32)[None, :]
        h = (h + a).to(x_ptr.dtype.element_ty)
        tl.store(src, h, mask=ok)
        if NORM:
            y = _layer_norm_rows(h.to(tl.float32), cols_ok, C, eps, w_ptr, b_ptr, cols, HAS_W, HAS_B)
            dst = out_ptr + (b * stride_ob + i * stride_on)[:, None] + cols[None, :]
            tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _attention_step(q, k_base, v_base, start, n, stride_qn, offs_d, m_i, l_i, acc, qk_scale,
                        BLOCK: tl.constexpr, MASKED: tl.constexpr):
        # One key tile [start, start + BLOCK) of the online softmax: (running max, running sum, accumulator).
        offs_n = start + tl.arange(0, BLOCK)
        if MASKED:
            n_ok = offs_n < n
            kt = tl.load(k_base + offs_n[None, :] * stride_qn + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK), log2 units
            s = tl.where(n_ok[None, :], s, float('-inf'))
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_qn + offs_d[:, None])
            s = tl.dot(q, kt) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key tile has a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_qn + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_qn + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _attention_kernel(qkv_ptr, out_ptr, n, H, stride_qb, stride_qn, stride_ob, stride_on, qk_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_T: tl.constexpr, GDC: tl.constexpr = False):
        # One program: BLOCK_M query rows of one (image, head). q, k, v of head h sit at channel offsets
        # h*D, C + h*D and 2C + h*D of each token's qkv row (C = H * D).  Keys: BLOCK_N at a time, masked; or,
        # with a smaller tail tile BLOCK_T, the whole BLOCK_N tiles unmasked and the rest BLOCK_T at a time.
        # A one-axis grid, query tiles fastest: the order of a (tiles, B*H) grid, without CUDA's 65535 limit on
        # its second axis (which B*H passes from batch 5462 at 12 heads).
        _await_prior_launch(GDC)
        num_m = tl.cdiv(n, BLOCK_M)
        pid = tl.program_id(0)
        pid_m = pid % num_m
        pid_bh = pid // num_m
        b = (pid_bh // H).to(tl.int64)
        h = pid_bh % H
        C = H * HEAD_DIM
        q_base = qkv_ptr + b * stride_qb + h * HEAD_DIM
        k_base = q_base + C
        v_base = q_base + 2 * C
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_ok = offs_m < n
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=m_ok[:, None], other=0.0)
        m_i = tl.full((BLOCK_M,), float('-inf'), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        if BLOCK_T == BLOCK_N:
            for start in range(0, n, BLOCK_N):
                m_i, l_i, acc = _attention_step(q, k_base, v_base, start, n, stride_qn, offs_d, m_i, l_i, acc,
                                                qk_scale, BLOCK_N, True)
        else:
            whole = n - n % BLOCK_N
            for start in range(0, whole, BLOCK_N):
                m_i, l_i, acc = _attention_step(q, k_base, v_base, start, n, stride_qn, offs_d, m_i, l_i, acc,
                                                qk_scale, BLOCK_N, False)
            for start in range(whole, n, BLOCK_T):
                m_i, l_i, acc = _attention_step(q, k_base, v_base, start, n, stride_qn, offs_d, m_i, l_i, acc,
                                                qk_scale, BLOCK_T, True)
        acc = acc / l_i[:, None]
        dst = out_ptr + b * stride_ob + offs_m[:, None] * stride_on + h * HEAD_DIM + offs_d[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])

    @triton.jit
    def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """(row offsets, column offsets) of this program's (BLOCK_M, BLOCK_N) output tile.  Programs walk the
        tiles in groups of GROUP_M rows of tiles, so consecutive programs reuse the same weight columns from L2."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_m
        pid_n = (pid % per_group) // group_m
        return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    @triton.jit
    def _linear_kernel(x_ptr, wt_ptr, b_ptr, out_ptr, ids_ptr, g_ptr, y_ptr, lnw_ptr, lnb_ptr, M, N, K, n,
                       stride_xm, stride_wk, stride_ob, stride_on, stride_yb, stride_yn, eps,
                       HAS_B: tl.constexpr, HAS_G: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_LNB: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, GELU: tl.constexpr = True,
                       GDC: tl.constexpr = False):
        # acc = x @ wt + b, accumulated in fp32 over (BLOCK_M, BLOCK_N) tiles.  Epilogue on the fp32 accumulator:
        #   RESIDUAL=False: out[r] = GELU(acc[r]) (exact erf; GELU=False: acc[r] as it is), one rounding to out's
        #                   dtype; stride_ob is the row stride of out (M, N) and stride_on unused;
        #   RESIDUAL=True:  out[b, ids[i]] += g * acc[r] for r = b * n + i, out being the (B, N_tokens, N) token
        #                   buffer (strides stride_ob, stride_on), read and written once;
        #   and NORM=True:  also y[b, i] = LN(out[b, ids[i]]) as written (lnw, lnb its affine), y being (B, n, N)
        #                   (strides stride_yb, stride_yn): one tile spans the row (BLOCK_N >= N, one column of
        #                   programs), and its masked columns hold 0.
        _await_prior_launch(GDC)
        offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            if EVEN_K:
                a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
                w = tl.load(wt_ptr + kk[:, None] * stride_wk + offs_n[None, :], mask=n_ok[None, :], other=0.0)
            else:
                k_ok = kk < K
                a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(wt_ptr + kk[:, None] * stride_wk + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
            acc = tl.dot(a, w, acc)
        if HAS_B:
            acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            if HAS_G:
                acc = acc * tl.load(g_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            b = (offs_m // n).to(tl.int64)
            tok = tl.load(ids_ptr + offs_m % n, mask=m_ok, other=0).to(tl.int64)
            dst = out_ptr + (b * stride_ob + tok * stride_on)[:, None] + offs_n[None, :]
            h = (tl.load(dst, mask=ok, other=0.0).to(tl.float32) + acc).to(out_ptr.dtype.element_ty)
            tl.store(dst, h, mask=ok)
            if NORM:
                y = _layer_norm_rows(h.to(tl.float32), n_ok, N, eps, lnw_ptr, lnb_ptr, offs_n, HAS_W, HAS_LNB)
                i = (offs_m % n).to(tl.int64)
                y_dst = y_ptr + (b * stride_yb + i * stride_yn)[:, None] + offs_n[None, :]
                tl.store(y_dst, y.to(y_ptr.dtype.element_ty), mask=ok)
        else:
            if GELU:
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            dst = out_ptr + offs_m.to(tl.int64)[:, None] * stride_ob + offs_n[None, :]
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _mlp_kernel(y_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, x_ptr, ids_ptr, g_ptr, M, H, n, stride_ym,
                    stride_xb, stride_xn, C: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr,
                    HAS_G: tl.constexpr, EVEN_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, GDC: tl.constexpr = False):
        # Rows r = b * n + i of y (M, C): x[b, ids[i]] += g * (GELU(y[r] @ W1t + b1) @ W2t + b2), W1t (C, H) and
        # W2t (H, C) contiguous, BLOCK_C >= C (one tile spans the row).  The hidden activation of the program's
        # BLOCK_M rows is made BLOCK_H columns at a time: the first product over C in BLOCK_K steps into fp32,
        # bias and exact GELU on it, one rounding to the weights' dtype, then straight into the second product's
        # fp32 accumulator; the residual update is its epilogue, as in _linear_kernel.
        _await_prior_launch(GDC)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        offs_k = tl.arange(0, BLOCK_K)
        y_rows = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < H
            t = tl.zeros((BLOCK_M, BLOCK_H), tl.float32)
            for k in tl.static_range(0, C, BLOCK_K):
                kk = k + offs_k
                if C % BLOCK_K == 0 and EVEN_H:
                    a = tl.load(y_rows + kk[None, :], mask=m_ok[:, None], other=0.0)
                    w = tl.load(w1t_ptr + kk[:, None] * H + offs_h[None, :])
                else:
                    k_ok = kk < C
                    a = tl.load(y_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                    w = tl.load(w1t_ptr + kk[:, None] * H + offs_h[None, :], mask=k_ok[:, None] & h_ok[None, :],
                                other=0.0)
                t = tl.dot(a, w, t)
            if HAS_B1:
                t = t + tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
            t = 0.5 * t * (1.0 + tl.erf(t * 0.7071067811865476))
            # hidden columns past H: their W1 columns and W2 rows load as 0, so they add nothing
            w2 = tl.load(w2t_ptr + offs_h[:, None] * C + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :],
                         other=0.0)
            acc = tl.dot(t.to(w2t_ptr.dtype.element_ty), w2, acc)
        if HAS_B2:
            acc = acc + tl.load(b2_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_G:
            acc = acc * tl.load(g_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        ok = m_ok[:, None] & c_ok[None, :]
        b = (offs_m // n).to(tl.int64)
        tok = tl.load(ids_ptr + offs_m % n, mask=m_ok, other=0).to(tl.int64)
        dst = x_ptr + (b * stride_xb + tok * stride_xn)[:, None] + offs_c[None, :]
        h = (tl.load(dst, mask=ok, other=0.0).to(tl.float32) + acc).to(x_ptr.dtype.element_ty)
        tl.store(dst, h, mask=ok)

    @triton.jit
    def _norm_linear_kernel(x_ptr, ids_ptr, lnw_ptr, lnb_ptr, wt_ptr, b_ptr, out_ptr, M, N, n, stride_xb,
                            stride_xn, stride_om, eps, C: tl.constexpr, HAS_W: tl.constexpr, HAS_LNB: tl.constexpr,
                            HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr, GDC: tl.constexpr = False):
        # out[r] = LN(x[b, ids[i]]) @ wt + b for rows r = b * n + i (out (M, N), row stride stride_om; wt (C, N)
        # contiguous; BLOCK_C >= C: the norm needs the whole row, and the product takes it in one step, its
        # columns >= C zero on both sides).  The norm in fp32, rounded to wt's dtype for the matrix unit, as
        # _gather_layer_norm_kernel stores it; the product accumulated in fp32, bias added, rounded once.
        _await_prior_launch(GDC)
        offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        m_ok = offs_m < M
        n_ok = offs_n < N
        cols = tl.arange(0, BLOCK_C)
        cols_ok = cols < C
        b = (offs_m // n).to(tl.int64)
        tok = tl.load(ids_ptr + offs_m % n, mask=m_ok, other=0).to(tl.int64)
        h = tl.load(x_ptr + (b * stride_xb + tok * stride_xn)[:, None] + cols[None, :],
                    mask=m_ok[:, None] & cols_ok[None, :], other=0.0)
        # (columns >= C: 0, as h - mean is masked there and the affine loads 0)
        y = _layer_norm_rows(h.to(tl.float32), cols_ok, C, eps, lnw_ptr, lnb_ptr, cols, HAS_W, HAS_LNB)
        y = y.to(wt_ptr.dtype.element_ty)
        w = tl.load(wt_ptr + cols[:, None] * N + offs_n[None, :], mask=cols_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(y, w)
        if HAS_B:
            acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        dst = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _patch_embed_kernel(img_ptr, addr_ptr, wt_ptr, c_ptr, out_ptr, M, N, K, num_patches, grid_w, stride_ib,
                            stride_ic, stride_ih, stride_ob, stride_on, prefix, PH: tl.constexpr,
                            PW: tl.constexpr, INDIRECT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            GDC: tl.constexpr = False):
        # Row r = b * num_patches + p of the unfolded patch matrix (p = py * grid_w + px), column k = (ch, ky, kx)
        # in the conv weight's order: pixel (ch, py*PH + ky, px*PW + kx) of image b (unit stride along W).
        # out[b, prefix + p] = const[p] + row @ wt, the pixels cast to wt's dtype for the matrix unit, the
        # product and the sum in fp32 (the accumulator starts at const[p]: no tile of it is held beside the
        # accumulator after the loop, which made the 256-column tiles spill), one rounding to out's dtype.
        # INDIRECT: the images start at the address stored at addr_ptr, read when the kernel runs (img_ptr only
        # gives their dtype); the address is a multiple of 16 bytes, said here since a loaded value carries no
        # alignment (the loads stay 16 bytes wide).
        _await_prior_launch(GDC)
        if INDIRECT:
            img_ptr = tl.multiple_of(tl.load(addr_ptr).to(tl.pointer_type(img_ptr.dtype.element_ty)), 16)
        offs_m, offs_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        b = (offs_m // num_patches).to(tl.int64)
        p = offs_m % num_patches
        py = p // grid_w
        px = p % grid_w
        row_base = b * stride_ib + (py * PH).to(tl.int64) * stride_ih + px * PW
        ok = m_ok[:, None] & n_ok[None, :]
        acc = tl.load(c_ptr + p[:, None] * N + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + offs_k
            ch = kk // (PH * PW)
            ky = (kk // PW) % PH
            kx = kk % PW
            col = ch.to(tl.int64) * stride_ic + ky * stride_ih + kx
            if EVEN_K:
                a = tl.load(img_ptr + row_base[:, None] + col[None, :], mask=m_ok[:, None], other=0.0)
                w = tl.load(wt_ptr + kk[:, None] * N + offs_n[None, :], mask=n_ok[None, :], other=0.0)
            else:
                k_ok = kk < K
                a = tl.load(img_ptr + row_base[:, None] + col[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                w = tl.load(wt_ptr + kk[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
            acc = tl.dot(a.to(wt_ptr.dtype.element_ty), w, acc)
        dst = out_ptr + (b * stride_ob + (prefix + p).to(tl.int64) * stride_on)[:, None] + offs_n[None, :]
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)


def _need_triton(t: torch.Tensor) -> None:
    if not triton_runs_on(t):
        raise RuntimeError('the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before Triton is '
                           'imported')


def _flag_ptr(t: Optional[torch.Tensor], fallback: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """A pointer argument for an optional vector: the tensor and True, or any valid tensor and False."""
    return (fallback, False) if t is None else (t.contiguous(), True)


def out_rows(B: int, n: int, C: int, device: torch.device, out: Optional[torch.Tensor],
              out_dtype: Optional[torch.dtype], default_dtype: torch.dtype) -> torch.Tensor:
    """The (B, n, C) output of a kernel: ``out`` when given (any tensor of that shape whose rows are contiguous,
    e.g. the first B*n rows of a longer buffer, see models/fast_path.py; ``out_dtype``, if given too, must be its
    dtype), else a new one in ``out_dtype`` or ``default_dtype``."""
    if out is None:
        return torch.empty(B, n, C, dtype=out_dtype or default_dtype, device=device)
    dtype = out_dtype or out.dtype
    if (tuple(out.shape) != (B, n, C) or out.stride(-1) != 1 or out.stride(1) != C or out.device != device
            or out.dtype != dtype):
        raise ValueError(f'out must be a ({B}, {n}, {C}) {dtype} tensor on {device} with contiguous rows, got '
                         f'{tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}')
    return out


def gather_layer_norm_triton(x: torch.Tensor, ids: torch.Tensor, weight: Optional[torch.Tensor],
                             bias: Optional[torch.Tensor], eps: float, out_dtype: Optional[torch.dtype] = None,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of :func:`gather_layer_norm_reference`: one pass, reading only the rows in ids; written
    into ``out`` when given (see :func:`out_rows`)."""
    _need_triton(x)
    _check_rows(x, ids)
    B, _, C = x.shape
    n = ids.numel()
    out = out_rows(B, n, C, x.device, out, out_dtype, x.dtype)
    if B * n == 0:
        return out
    w, has_w = _flag_ptr(weight, x)
    b, has_b = _flag_ptr(bias, x)
    block_c, rows, warps = _row_tile(C)
    grid = (triton.cdiv(B * n, rows),)
    _gather_layer_norm_kernel[grid](x, ids, w, b, out, B * n, n, C, x.stride(0), x.stride(1),
                                    out.stride(0), out.stride(1), float(eps), HAS_W=has_w, HAS_B=has_b,
                                    ROWS=rows, BLOCK_C=block_c, num_warps=warps, **_launch_options())
    return out


def _residual_triton(x, ids, a, gamma, weight, bias, eps, out_dtype, norm, out=None):
    _need_triton(x)
    _check_rows(x, ids, a)
    B, _, C = x.shape
    n = ids.numel()
    out = out_rows(B, n, C, x.device, out, out_dtype, a.dtype) if norm else None
    if B * n == 0:
        return out
    g, has_g = _flag_ptr(gamma, x)
    w, has_w = _flag_ptr(weight, x)
    b, has_b = _flag_ptr(bias, x)
    o = out if norm else a
    block_c, rows, warps = _row_tile(C)
    grid = (triton.cdiv(B * n, rows),)
    _residual_kernel[grid](x, ids, a, g, w, b, o, B * n, n, C, x.stride(0), x.stride(1), a.stride(0),
                           a.stride(1), o.stride(0), o.stride(1), float(eps), HAS_G=has_g, NORM=norm,
                           HAS_W=has_w, HAS_B=has_b, ROWS=rows, BLOCK_C=block_c, num_warps=warps, **_launch_options())
    return out


def residual_layer_norm_triton_(x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor,
                                gamma: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor], eps: float, out_dtype: Optional[torch.dtype] = None,
                                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of :func:`residual_layer_norm_reference_` (ids must be distinct); the norm is written into
    ``out`` when given (see :func:`out_rows`)."""
    return _residual_triton(x, ids, a, gamma, weight, bias, eps, out_dtype, norm=True, out=out)


def residual_scatter_triton_(x: torch.Tensor, ids: torch.Tensor, m: torch.Tensor,
                             gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton version of :func:`residual_scatter_reference_` (ids must be distinct)."""
    _residual_triton(x, ids, m, gamma, None, None, 0.0, None, norm=False)
    return x


def _check_dot_dtype(t: torch.Tensor, what: str) -> None:
    """The matrix products of the attention, linear and patch-embedding kernels accumulate in fp32: Triton's
    product of fp64 operands is fp64 and does not take that accumulator (the interpreter ran it and wrote fp32
    values into fp64 memory: garbage).  Triton's interpreter (CPU) computes a bf16 product wrongly."""
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f'the Triton {what} takes float16, bfloat16 or float32 operands, got '
                         f'{str(t.dtype).replace("torch.", "")}')
    if t.dtype == torch.bfloat16 and t.device.type == 'cpu':  # (checked with Triton 3.9: off by 1e10)
        raise ValueError(f'the Triton {what} takes bfloat16 operands on CUDA only: Triton\'s interpreter '
                         f'computes their products wrongly')


def attention_tiles_ok(head_dim: int) -> bool:
    """The Triton attention needs a power-of-two head_dim of at least 16 (the matrix unit's smallest K)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def attention_triton(qkv: torch.Tensor, num_heads: int, scale: float, block_m: int = ATTENTION_TILES[0][0],
                     block_n: int = ATTENTION_TILES[0][1], block_t: int = ATTENTION_TILES[0][2],
                     num_warps: int = ATTENTION_TILES[0][3], num_stages: int = ATTENTION_TILES[0][4],
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of :func:`attention_reference`: fp32 softmax and accumulation, output in qkv's dtype; written
    into ``out`` when given (see :func:`out_rows`).  ``block_t``: the key tile of the tail (see
    :data:`ATTENTION_TILES`), at most ``block_n``."""
    _need_triton(qkv)
    B, n, three_c = qkv.shape
    if three_c % (3 * num_heads) or qkv.stride(-1) != 1:
        raise ValueError(f'qkv must be (B, n, 3*H*D) with a contiguous last dimension, got {tuple(qkv.shape)}')
    _check_dot_dtype(qkv, 'attention')
    head_dim = three_c // (3 * num_heads)
    if not attention_tiles_ok(head_dim):
        raise ValueError(f'the Triton attention needs a power-of-two head_dim >= 16, got {head_dim}')
    if not 16 <= block_t <= block_n:
        raise ValueError(f'the tail tile must be 16 to block_n ({block_n}) keys, got {block_t}')
    out = out_rows(B, n, num_heads * head_dim, qkv.device, out, qkv.dtype, qkv.dtype)
    if B * n == 0:
        return out
    grid = (triton.cdiv(n, block_m) * B * num_heads,)
    _attention_kernel[grid](qkv, out, n, num_heads, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
                            float(scale) * 1.4426950408889634, HEAD_DIM=head_dim, BLOCK_M=block_m,
                            BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps, num_stages=num_stages,
                            **_launch_options())
    return out


def _check_linear(x: torch.Tensor, weight_t: torch.Tensor) -> Tuple[int, int]:
    K, N = weight_t.shape
    if x.shape[-1] != K or x.stride(-1) != 1 or not weight_t.is_contiguous():
        raise ValueError(f'x (..., {K}) with a contiguous last dimension and a contiguous ({K}, {N}) weight_t '
                         f'expected, got {tuple(x.shape)} and {tuple(weight_t.shape)}')
    _check_dot_dtype(weight_t, 'matrix product')
    return K, N


def _launch_linear(x2, weight_t, bias, out, ids, gamma, n, stride_ob, stride_on, residual, tiles, norm=None,
                   gelu=True):
    """The fused product's launch; ``norm``: (y, LN weight, LN bias, eps) for the residual epilogue's LN; ``gelu``
    (without ``residual``): the GELU epilogue, else the product (with its bias) as it is."""
    block_m, block_n, block_k, num_warps, num_stages = tiles
    M, K = x2.shape
    N = weight_t.shape[1]
    b, has_b = _flag_ptr(bias, weight_t)
    g, has_g = _flag_ptr(gamma, weight_t)
    y, lnw, lnb, eps = norm or (out, None, None, 0.0)
    lnw, has_w = _flag_ptr(lnw, weight_t)
    lnb, has_lnb = _flag_ptr(lnb, weight_t)
    stride_yb, stride_yn = (y.stride(0), y.stride(1)) if norm else (0, 0)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _linear_kernel[grid](x2, weight_t, b, out, ids, g, y, lnw, lnb, M, N, K, n, x2.stride(0), weight_t.stride(0),
                         stride_ob, stride_on, stride_yb, stride_yn, float(eps), HAS_B=has_b, HAS_G=has_g,
                         RESIDUAL=residual, NORM=norm is not None, HAS_W=has_w, HAS_LNB=has_lnb,
                         EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                         GELU=gelu, num_warps=num_warps, num_stages=num_stages, **_launch_options())


def _linear_rows(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor], gelu: bool,
                 tiles: Tuple[int, int, int, int, int]) -> torch.Tensor:
    """x (..., K) @ weight_t (K, N) + bias, GELU of it if ``gelu``: a new (..., N) tensor in x's dtype."""
    _need_triton(x)
    K, N = _check_linear(x, weight_t)
    x2 = x.reshape(-1, K)
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _launch_linear(x2, weight_t, bias, out, out, None, 1, out.stride(0), 0, False, tiles, gelu=gelu)
    return out.view(*x.shape[:-1], N)


def linear_triton(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                  block_m: int = LINEAR_TILES[0][0], block_n: int = LINEAR_TILES[0][1],
                  block_k: int = LINEAR_TILES[0][2], num_warps: int = LINEAR_TILES[0][3],
                  num_stages: int = LINEAR_TILES[0][4]) -> torch.Tensor:
    """Triton version of :func:`linear_reference`, the plain product (qkv, the attention's projection) by the
    product kernel without an epilogue: x (..., K) with a contiguous last dimension, weight_t (K, N) contiguous,
    bias (N,) or None; returns (..., N) in x's dtype, accumulated in fp32 and rounded once (as cuBLAS does in fp16
    and bf16)."""
    return _linear_rows(x, weight_t, bias, False, (block_m, block_n, block_k, num_warps, num_stages))


def linear_gelu_triton(x: torch.Tensor, weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                       block_m: int = LINEAR_TILES[0][0], block_n: int = LINEAR_TILES[0][1],
                       block_k: int = LINEAR_TILES[0][2], num_warps: int = LINEAR_TILES[0][3],
                       num_stages: int = LINEAR_TILES[0][4]) -> torch.Tensor:
    """Triton version of :func:`linear_gelu_reference`: x (..., K) with a contiguous last dimension, weight_t
    (K, N) contiguous, bias (N,) or None; returns (..., N) in x's dtype.  The GELU runs on the fp32 accumulator
    (the unfused sequence rounds the product to x's dtype first; the two differ by that rounding)."""
    return _linear_rows(x, weight_t, bias, True, (block_m, block_n, block_k, num_warps, num_stages))


def _check_residual_product(x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, weight_t: torch.Tensor
                            ) -> Tuple[int, int, int, int]:
    """(K, C, B, n) of a product whose epilogue updates the rows ``ids`` of the buffer x (B, N, C) with
    u (B, n, K) @ weight_t (K, C); ValueError for shapes that do not fit."""
    K, C = _check_linear(u, weight_t)
    _check_rows(x, ids)
    B, n = x.shape[0], ids.numel()
    if tuple(u.shape[:2]) != (B, n) or x.shape[-1] != C:
        raise ValueError(f'expected u of shape ({B}, {n}, {K}) and a buffer of width {C}, got {tuple(u.shape)} '
                         f'and {tuple(x.shape)}')
    return K, C, B, n


def linear_residual_scatter_triton_(x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, weight_t: torch.Tensor,
                                    bias: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                                    block_m: int = LINEAR_TILES[0][0], block_n: int = LINEAR_TILES[0][1],
                                    block_k: int = LINEAR_TILES[0][2], num_warps: int = LINEAR_TILES[0][3],
                                    num_stages: int = LINEAR_TILES[0][4]) -> torch.Tensor:
    """Triton version of :func:`linear_residual_scatter_reference_`: x[:, ids] += gamma * (u @ weight_t + bias)
    with u (B, n, K), weight_t (K, C) contiguous, x (B, N, C); distinct ids.  The product is not rounded before
    it is added (the unfused sequence rounds it to u's dtype first).  Returns x."""
    _need_triton(x)
    K, C, B, n = _check_residual_product(x, ids, u, weight_t)
    if B * n:
        _launch_linear(u.reshape(B * n, K), weight_t, bias, x, ids, gamma, n, x.stride(0), x.stride(1), True,
                       (block_m, block_n, block_k, num_warps, num_stages))
    return x


def row_tiles(width: int) -> List[Tuple[int, int, int, int, int]]:
    """Tiles whose BLOCK_N spans a row of ``width`` (the power of two that does), for widths up to 256; none for
    wider rows (a 512-column fp32 accumulator beside its residual tile would spill).  Those of
    :func:`linear_residual_layer_norm_triton_` (its norm needs the whole row), and extra candidates for the second
    MLP product with its residual update, whose 192 output columns (DeiT-Ti) otherwise take three 64-column tiles
    or a 128-column one and a ragged one.  Compiled for sm_90a at DeiT-Ti's 192 (BLOCK_N 256; ptxas -v, Triton
    3.9 and 3.6): with the norm, the 64-row tile (wgmma) spills 92 (3.6: 84) bytes a thread, the 32- and 16-row
    tiles (mma.sync) none; without it none spills; 64 rows in 4 warps spilled 1.6-1.8 KB either way and 32 rows in
    4 warps 16 bytes with the norm (3.9), so they are not offered."""
    if width > 256:
        return []
    block_n = max(16, _next_power_of_2(width))
    return [(64, block_n, 64, 8, 3), (32, block_n, 64, 8, 3), (16, block_n, 64, 4, 3)]


def _next_power_of_2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def linear_residual_layer_norm_triton_(x: torch.Tensor, ids: torch.Tensor, u: torch.Tensor,
                                       weight_t: torch.Tensor, bias: Optional[torch.Tensor],
                                       gamma: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor],
                                       ln_bias: Optional[torch.Tensor], eps: float,
                                       out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None,
                                       block_m: int = 64, block_n: Optional[int] = None, block_k: int = 64,
                                       num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """Triton version of :func:`linear_residual_layer_norm_reference_`: x[:, ids] += gamma * (u @ weight_t +
    bias), then LN of the rows as written, in one kernel (the attention's projection, its residual add and the
    block's second norm).  u (B, n, K), weight_t (K, C) contiguous, x (B, N, C); distinct ids; ``block_n`` must
    span the row (default: the power of two that does).  Returns the (B, n, C) LN output (``out`` when given, see
    :func:`out_rows`), in ``out_dtype`` (default u's dtype)."""
    _need_triton(x)
    K, C, B, n = _check_residual_product(x, ids, u, weight_t)
    block_n = block_n or max(16, _next_power_of_2(C))
    if block_n < C:
        raise ValueError(f'block_n {block_n} does not span a row of {C}: the norm needs the whole row in one tile')
    out = out_rows(B, n, C, x.device, out, out_dtype, u.dtype)
    if B * n:
        _launch_linear(u.reshape(B * n, K), weight_t, bias, x, ids, gamma, n, x.stride(0), x.stride(1), True,
                       (block_m, block_n, block_k, num_warps, num_stages), norm=(out, ln_weight, ln_bias, eps))
    return out


def mlp_tiles(width: int) -> List[Tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_H, BLOCK_K, num_warps, num_stages) for :func:`mlp_residual_scatter_triton_` at rows of
    ``width`` channels, the first the default; none for rows wider than 256 (the (BLOCK_M, BLOCK_C) fp32
    accumulator the kernel holds for the whole row would spill).  A program streams all of W1 and W2 (for DeiT-Ti
    590 KB) through shared memory for its BLOCK_M rows, so taller tiles do more work per byte read, and shorter
    ones make more programs (C&C-Ti-30 at batch 256: 35 000 rows, 552 programs of 64 rows for 132 SMs).  Compiled
    at DeiT-Ti's 192 (Triton 3.9, ptxas -v): for sm_90a the first takes 94 KB of shared memory (two programs fit
    an SM) and spills nothing, the second 123 KB and 16 bytes a thread, the third (mma.sync: under wgmma's 64
    rows) 74 KB, the fourth (one stage, no pipelining) 90 KB and 8 bytes (172 with Triton 3.6, the version on the
    GPU machines this project is measured on; the others no more than with 3.9); not offered: 128-row tiles (292
    bytes spilled in 16 warps, 1.2 KB in 8), 4 warps for 64 rows (1.3 KB), 64x128 in two stages (238 KB, over
    the 227 KB a block may have).  On Ampere and Ada all four fit (74-106 KB) without spills; on Turing the
    products are not on tensor cores and the tiles do not fit its 64 KB (a build refuses what fails to launch)."""
    if width > 256:  # (the accumulator spans the row)
        return []
    return [(64, 32, 64, 8, 3), (64, 64, 64, 8, 2), (32, 64, 64, 4, 2), (64, 128, 64, 8, 1)]


def mlp_residual_scatter_triton_(x: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, w1_t: torch.Tensor,
                                 b1: Optional[torch.Tensor], w2_t: torch.Tensor, b2: Optional[torch.Tensor],
                                 gamma: Optional[torch.Tensor], block_m: int = 64, block_h: int = 32,
                                 block_k: int = 64, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """Triton version of :func:`mlp_residual_scatter_reference_`: x[:, ids] += gamma * (GELU(y @ w1_t + b1) @ w2_t
    + b2) in one kernel, the hidden activation never written; y (B, n, C) with contiguous rows, w1_t (C, H) and
    w2_t (H, C) contiguous, x (B, N, C) with C at most 256; distinct ids.  The second product is not rounded before
    it is added (as :func:`linear_residual_scatter_triton_`).  Returns x."""
    _need_triton(x)
    C, H = _check_linear(y, w1_t)
    _check_rows(x, ids, y)
    if tuple(w2_t.shape) != (H, C) or not w2_t.is_contiguous() or w2_t.dtype != w1_t.dtype:
        raise ValueError(f'w2_t must be a contiguous ({H}, {C}) {w1_t.dtype} tensor, got {tuple(w2_t.shape)} '
                         f'{w2_t.dtype}')
    if y.dtype != w1_t.dtype:  # (the hidden activation is rounded to the weights' dtype, the reference's to y's)
        raise ValueError(f'y must have the weights\' dtype {w1_t.dtype}, got {y.dtype}')
    block_c = max(16, _next_power_of_2(C))
    if block_c > 256:
        raise ValueError(f'the fused MLP holds a whole row in one tile: rows of at most 256 channels, got {C}')
    B, n = y.shape[:2]
    M = B * n
    if M == 0:
        return x
    y2 = y.reshape(M, C)
    b1_, has_b1 = _flag_ptr(b1, w1_t)
    b2_, has_b2 = _flag_ptr(b2, w1_t)
    g, has_g = _flag_ptr(gamma, w1_t)
    _mlp_kernel[(triton.cdiv(M, block_m),)](y2, w1_t, b1_, w2_t, b2_, x, ids, g, M, H, n, y2.stride(0),
                                            x.stride(0), x.stride(1), C=C, HAS_B1=has_b1, HAS_B2=has_b2,
                                            HAS_G=has_g, EVEN_H=H % block_h == 0, BLOCK_M=block_m,
                                            BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_C=block_c,
                                            num_warps=num_warps, num_stages=num_stages, **_launch_options())
    return x


def norm_linear_tiles(width: int) -> List[Tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for :func:`gather_layer_norm_linear_triton` at rows of
    ``width`` channels, the first the default: BLOCK_K spans the row (the power of two that does; the norm needs
    the whole row, and the product takes it in one step, so there is no loop to pipeline: one stage); none for
    rows wider than 256.  Compiled for sm_90a at DeiT-Ti's 192 (Triton 3.9, ptxas -v), none spills: 64x64 in 4
    warps 64 KB of shared memory, 64x128 and 128x64 in 8 warps 96 KB, 32x64 (mma.sync) 48 KB; on Ampere likewise
    (128x128 in 8 warps spilled 1 KB there, and is not offered)."""
    if width > 256:  # (the tile spans the row)
        return []
    block_k = max(16, _next_power_of_2(width))
    return [(64, 64, block_k, 4, 1), (64, 128, block_k, 8, 1), (128, 64, block_k, 8, 1), (32, 64, block_k, 4, 1)]


def gather_layer_norm_linear_triton(x: torch.Tensor, ids: torch.Tensor, ln_weight: Optional[torch.Tensor],
                                    ln_bias: Optional[torch.Tensor], eps: float, weight_t: torch.Tensor,
                                    bias: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                                    block_m: int = 64, block_n: int = 64, block_k: Optional[int] = None,
                                    num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """Triton version of :func:`gather_layer_norm_linear_reference`: LN(x[:, ids]) @ weight_t + bias in one
    kernel, the normed rows never written; x (B, N_tokens, C) with C at most 256, weight_t (C, N) contiguous;
    ``block_k`` must span the row (default: the power of two that does).  Returns (B * n, N) in weight_t's
    dtype: ``out`` when given (its first B * n rows are written: a longer buffer's padding rows are left as they
    are), else a new tensor.  The normed rows are rounded to weight_t's dtype before the product, as the unfused
    kernels store them."""
    _need_triton(x)
    _check_rows(x, ids)
    C, N = _check_linear(x, weight_t)
    block_k = block_k or max(16, _next_power_of_2(C))
    if not max(16, C) <= block_k <= 256 or block_k != _next_power_of_2(block_k):
        raise ValueError(f'the fused norm and product hold a whole row in one tile of 16 to 256 columns (a power '
                         f'of two: the matrix unit takes at least 16): got rows of {C} channels, block_k {block_k}')
    M = x.shape[0] * ids.numel()
    if out is None:
        out = torch.empty(M, N, dtype=weight_t.dtype, device=x.device)
    _check_norm_linear_out(out, M, N, weight_t.dtype, x.device)
    if M == 0:
        return out
    lnw, has_w = _flag_ptr(ln_weight, weight_t)
    lnb, has_lnb = _flag_ptr(ln_bias, weight_t)
    b, has_b = _flag_ptr(bias, weight_t)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _norm_linear_kernel[grid](x, ids, lnw, lnb, weight_t, b, out, M, N, ids.numel(), x.stride(0), x.stride(1),
                              out.stride(0), float(eps), C=C, HAS_W=has_w, HAS_LNB=has_lnb, HAS_B=has_b,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_k, GROUP_M=8,
                              num_warps=num_warps, num_stages=num_stages, **_launch_options())
    return out


def patch_embed_triton_(out: torch.Tensor, images: torch.Tensor, weight_t: torch.Tensor, const: torch.Tensor,
                        prefix: int, patch: Tuple[int, int], block_m: int = LINEAR_TILES[0][0],
                        block_n: int = LINEAR_TILES[0][1], block_k: int = LINEAR_TILES[0][2],
                        num_warps: int = LINEAR_TILES[0][3], num_stages: int = LINEAR_TILES[0][4],
                        image_address: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton version of :func:`patch_embed_reference_`: one kernel reads the images (any float dtype; made
    contiguous) and writes the patch tokens into rows prefix.. of ``out``; the unfolded patches never exist.
    ``weight_t`` (c*ph*pw, C) contiguous, ``const`` (num_patches, C).  Returns out.

    ``image_address``: a one-element int64 tensor on the device holding the address of the images to read, which
    the kernel loads when it runs; ``images`` (contiguous) then only gives their shape, strides and dtype.  A
    CUDA graph captured so reads whatever images of that layout the address names at replay, with no copy into
    a static input.  The address must be a multiple of 16 bytes."""
    _need_triton(out)
    num_patches = _check_patch_embed(out, images, weight_t, const, prefix, patch)
    if not weight_t.is_contiguous():
        raise ValueError('weight_t must be contiguous')
    _check_dot_dtype(weight_t, 'patch embedding')
    if image_address is not None and (not images.is_contiguous() or image_address.dtype != torch.int64
                                      or image_address.numel() != 1 or image_address.device != images.device):
        raise ValueError('image_address needs contiguous images and a one-element int64 tensor on their device')
    images = images.contiguous()
    const = const.contiguous()
    B = images.shape[0]
    K, N = weight_t.shape
    M = B * num_patches
    if M == 0:
        return out
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    indirect = image_address is not None
    _patch_embed_kernel[grid](images, image_address if indirect else images, weight_t, const, out, M, N, K,
                              num_patches, images.shape[3] // patch[1], images.stride(0), images.stride(1),
                              images.stride(2), out.stride(0), out.stride(1), prefix, PH=patch[0], PW=patch[1],
                              INDIRECT=indirect, EVEN_K=K % block_k == 0, BLOCK_M=block_m,
                              BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=num_warps,
                              num_stages=num_stages, **_launch_options())
    return out


# ---------------------------------------------------------------------------------------------------------------
# dispatch: Triton where it can run, else the reference

def gather_layer_norm(x, ids, weight, bias, eps, out_dtype=None):
    """LN(x[:, ids]) -> (B, n, C) in ``out_dtype``; see the module docstring."""
    impl = gather_layer_norm_triton if triton_runs_on(x) else gather_layer_norm_reference
    return impl(x, ids, weight, bias, eps, out_dtype)


def residual_layer_norm_(x, ids, a, gamma, weight, bias, eps, out_dtype=None):
    """x[:, ids] += gamma * a in place; returns LN(x[:, ids]); see the module docstring."""
    impl = residual_layer_norm_triton_ if triton_runs_on(x) else residual_layer_norm_reference_
    return impl(x, ids, a, gamma, weight, bias, eps, out_dtype)


def residual_scatter_(x, ids, m, gamma):
    """x[:, ids] += gamma * m in place; returns x; see the module docstring."""
    impl = residual_scatter_triton_ if triton_runs_on(x) else residual_scatter_reference_
    return impl(x, ids, m, gamma)


def linear_residual_scatter_(x, ids, u, weight_t, bias, gamma, **tiles):
    """x[:, ids] += gamma * (u @ weight_t + bias) in place; see :func:`linear_residual_scatter_triton_`."""
    impl = linear_residual_scatter_triton_ if triton_runs_on(x) else linear_residual_scatter_reference_
    return impl(x, ids, u, weight_t, bias, gamma, **tiles)


def linear_residual_layer_norm_(x, ids, u, weight_t, bias, gamma, ln_weight, ln_bias, eps, out_dtype=None,
                                **tiles):
    """x[:, ids] += gamma * (u @ weight_t + bias) in place; returns LN(x[:, ids]); see
    :func:`linear_residual_layer_norm_triton_`."""
    impl = linear_residual_layer_norm_triton_ if triton_runs_on(x) else linear_residual_layer_norm_reference_
    return impl(x, ids, u, weight_t, bias, gamma, ln_weight, ln_bias, eps, out_dtype, **tiles)


def mlp_residual_scatter_(x, ids, y, w1_t, b1, w2_t, b2, gamma, **tiles):
    """x[:, ids] += gamma * (GELU(y @ w1_t + b1) @ w2_t + b2) in place; see :func:`mlp_residual_scatter_triton_`."""
    impl = mlp_residual_scatter_triton_ if triton_runs_on(x) else mlp_residual_scatter_reference_
    return impl(x, ids, y, w1_t, b1, w2_t, b2, gamma, **tiles)


def gather_layer_norm_linear(x, ids, ln_weight, ln_bias, eps, weight_t, bias, **tiles):
    """LN(x[:, ids]) @ weight_t + bias -> (B * n, N); see :func:`gather_layer_norm_linear_triton`."""
    impl = gather_layer_norm_linear_triton if triton_runs_on(x) else gather_layer_norm_linear_reference
    return impl(x, ids, ln_weight, ln_bias, eps, weight_t, bias, **tiles)


def linear(x, weight_t, bias, **tiles):
    """x @ weight_t + bias; see :func:`linear_triton`."""
    impl = linear_triton if triton_runs_on(x) else linear_reference
    return impl(x, weight_t, bias, **tiles)


def linear_gelu(x, weight_t, bias, **tiles):
    """GELU(x @ weight_t + bias), exact erf; see :func:`linear_gelu_triton`."""
    impl = linear_gelu_triton if triton_runs_on(x) else linear_gelu_reference
    return impl(x, weight_t, bias, **tiles)


def attention(qkv, num_heads, scale, **tiles):
    """softmax(q k^T * scale) v from a (B, n, 3*H*D) qkv tensor -> (B, n, H*D); see the module docstring."""
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if triton_runs_on(qkv) and attention_tiles_ok(head_dim):
        return attention_triton(qkv, num_heads, scale, **tiles)
    return attention_reference(qkv, num_heads, scale)


def patch_embed_(out, images, weight_t, const, prefix, patch, **tiles):
    """out[:, prefix + p] = unfold(images)[:, p] @ weight_t + const[p]; see :func:`patch_embed_triton_`."""
    impl = patch_embed_triton_ if triton_runs_on(out) else patch_embed_reference_
    return impl(out, images, weight_t, const, prefix, patch, **tiles)
