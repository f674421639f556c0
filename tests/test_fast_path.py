"""The fast inference path: each fused kernel against its torch reference and against plain torch written here,
then the whole path against the eager model's logits (dense, pruned, a token that comes back, LayerScale,
distilled, global-average pooling, register tokens).

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before models.fast_kernels is imported) on small odd shapes; on a CUDA machine the same tests run the compiled
kernels on the GPU, and the CUDA-only tests below (fp16 accuracy of a DeiT-Ti-sized model, CUDA graphs,
the attention choice) run too.  The interpreter computes a bf16 ``tl.dot`` wrongly (checked with Triton 3.9:
results off by 1e10), so bf16 attention is checked on CUDA only; bf16 row kernels are checked everywhere, but
the interpreter rounds fp32 -> bf16 toward zero (the GPU to nearest even), so a bf16 result is compared within
an ulp there instead of bit for bit.
"""
import contextlib
import copy
import functools
import json
import math
import os
import re
import sys
import threading
import types

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import models  # noqa: F401  (registers cc_deit_* with timm)
import pruning
from models import fast_kernels as K
import models.fast_path as FP
from models.fast_path import (AttentionChoice, CaptureError, ProductChoice, build_fast_path, choose_attention,
                               run_attention)
from models.fast_path import attention_candidates as FP_attention_candidates
from conftest import CUDA_ONLY_REASON, OUT_OF_MEMORY, OUT_OF_MEMORY_FIGURES, NarrowAttention

# One torch thread: the CPU work here is small, and two threads spin against each other on a busy machine.
pytestmark = pytest.mark.usefixtures('one_thread')

CUDA = torch.cuda.is_available()
DEVICE = torch.device('cuda' if CUDA else 'cpu')
cuda_only = pytest.mark.skipif(not CUDA, reason=CUDA_ONLY_REASON)  # run first on a GPU (conftest)
needs_triton = pytest.mark.skipif(not K.triton_runs_on(torch.empty(0, device=DEVICE)),
                                  reason='Triton cannot run here (no CUDA, no interpreter)')
# fp32 logits: on CPU everything is fp32; on CUDA the Triton kernels' fp32 dots run in tf32.  The CUDA
# tolerances here (2e-3: whole path and fp32 kernels) were checked without a GPU by truncating every operand of
# the interpreter's dot to tf32's 10-bit mantissa: the worst error was 0.33 of the tolerance for the whole path
# (the pruned model) and 0.56 for a kernel (attention).
LOGIT_TOL = 2e-3 if CUDA else 1e-4  # CUDA_LOGIT_TOL (below) on a GPU


@pytest.fixture(autouse=True)
def no_tf32_convolutions():
    """On CUDA, the eager model's patch conv would run in TF32 (cuDNN's default); our fp32 path's GEMM does not.
    Compare fp32 with fp32."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = before


if K.INTERPRETER:
    import triton
    import triton.language as tl

    @triton.jit
    def _strays_kernel(x_ptr, out_ptr, n, READ_PAST: tl.constexpr, WRITE_PAST: tl.constexpr):
        # out[i] = 2 x[i] for i < n, 16 lanes, masked to n, or, to test the test, one element past either end
        i = tl.arange(0, 16)
        v = tl.load(x_ptr + i, mask=i < n + READ_PAST, other=0.0)
        tl.store(out_ptr + i, 2 * v, mask=i < n + WRITE_PAST)


@pytest.mark.skipif(not K.INTERPRETER, reason='checks the bounds check of interpreted kernels')
def test_the_interpreter_runs_refuse_a_kernel_that_reaches_past_its_tensors():
    """The bounds check every interpreted kernel here runs under: a kernel whose masks let one lane past the end of
    the tensor it reads, or of the one it writes, fails, naming the access; within them it runs.  A view counts
    as far as its sizes and strides reach, not as far as the buffer under it."""
    from triton.runtime.errors import InterpreterError
    buf = torch.arange(12.0)
    x, out = buf[:5], torch.zeros(8)[:5]
    _strays_kernel[(1,)](x, out, 5, READ_PAST=0, WRITE_PAST=0)
    assert torch.equal(out, 2 * x)
    for read, write, what in ((1, 0, 'loads'), (0, 1, 'stores')):
        stray = f'a kernel {what} 1 element\\(s\\) outside the tensors it was given'
        with pytest.raises(InterpreterError, match=stray):
            _strays_kernel[(1,)](x, out, 5, READ_PAST=read, WRITE_PAST=write)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(DEVICE, dtype)


def _same_rounding(a, b):
    """Within one unit in the last place of their dtype: the kernel and the reference form the same fp32 sum
    and round it once, but a GPU may fuse a*g + x into one FMA (one rounding fewer), and the interpreter
    rounds fp32 -> bf16 toward zero."""
    return (a.double() - b.double()).abs().max().item() <= torch.finfo(a.dtype).eps * max(1.0, b.abs().max().item())


def _ulp_tol(dtype, scale):
    """A few units in the last place of ``dtype`` at magnitude ``scale`` (fp32: float rounding only, and on a GPU
    Triton's approximate square root and division)."""
    return 8 * torch.finfo(dtype).eps * max(1.0, scale)


# ---------------------------------------------------------------------------------------------------------------
# kernels

def plain_layer_norm(rows, weight, bias, eps):
    """(h - mean) / sqrt(biased var + eps) * weight + bias, in float64."""
    h = rows.double()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


# C=40: not a power of two; ids repeated and unsorted for the gather; n*B not a multiple of the row tile.
GATHER_IDS = [7, 0, 20, 7, 3, 12, 5, 3, 19, 1, 2]
DISTINCT_IDS = [7, 0, 20, 3, 12, 5, 19, 1, 2]


@needs_triton
@pytest.mark.parametrize('C', [40, 64])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('affine', [True, False])
def test_gather_layer_norm(C, dtype, affine):
    x = _randn(3, 21, C, seed=1, dtype=dtype) * 3 + 1
    ids = torch.tensor(GATHER_IDS, device=DEVICE)
    w, b = (_randn(C, seed=2), _randn(C, seed=3)) if affine else (None, None)
    ours = K.gather_layer_norm_triton(x, ids, w, b, 1e-6, out_dtype=dtype)
    ref = K.gather_layer_norm_reference(x, ids, w, b, 1e-6, out_dtype=dtype)
    plain = plain_layer_norm(x[:, ids], w, b, 1e-6)
    assert ours.shape == (3, len(GATHER_IDS), C) and ours.dtype == dtype
    tol = _ulp_tol(dtype, plain.abs().max().item())
    assert (ours.double() - ref.double()).abs().max().item() <= tol
    assert (ours.double() - plain).abs().max().item() <= tol
    # fp32 output from a low-precision buffer: the LN of the stored values, not rounded again
    ours32 = K.gather_layer_norm_triton(x, ids, w, b, 1e-6, out_dtype=torch.float32)
    assert (ours32.double() - plain).abs().max().item() <= _ulp_tol(torch.float32, plain.abs().max().item())
    # without out_dtype: the dtype of x
    assert K.gather_layer_norm_triton(x, ids, w, b, 1e-6).dtype == dtype


@needs_triton
@pytest.mark.parametrize('eps', [1e-6, 1e-5])
def test_layer_norm_kernels_add_eps_inside_the_square_root(eps):
    """Rows whose variance is of the order of eps (std 1e-3, eps 1e-6 as timm's ViTs, and 1e-5 as torch's
    default), where sqrt(var + eps) and sqrt(var) + eps differ by a third or more, and so do two eps: at unit
    variance they differ by 1e-7, below the tolerance of the tests above."""
    C = 40
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(2, 21, C, seed=30) * 1e-3 + 0.5
    w, b = _randn(C, seed=31), _randn(C, seed=32)
    plain = plain_layer_norm(x[:, ids], w, b, eps)
    tol = 1e-3 * plain.abs().max().item()  # the rows' float rounding (values near 0.5, deviations near 1e-3)
    assert (K.gather_layer_norm_triton(x, ids, w, b, eps).double() - plain).abs().max().item() <= tol
    a = torch.zeros(2, len(DISTINCT_IDS), C, device=DEVICE)
    ours = K.residual_layer_norm_triton_(x.clone(), ids, a, None, w, b, eps)
    assert (ours.double() - plain).abs().max().item() <= tol


@needs_triton
@pytest.mark.parametrize('x_dtype,a_dtype', [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                             (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize('layer_scale', [True, False])
def test_residual_layer_norm_updates_kept_rows_and_normalises(x_dtype, a_dtype, layer_scale):
    C = 40
    x = _randn(3, 21, C, seed=4, dtype=x_dtype)
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    a = _randn(3, len(DISTINCT_IDS), C, seed=5, dtype=a_dtype)
    g = _randn(C, seed=6) if layer_scale else None
    w, b = _randn(C, seed=7), _randn(C, seed=8)
    ours_x, ref_x = x.clone(), x.clone()
    ours = K.residual_layer_norm_triton_(ours_x, ids, a, g, w, b, 1e-5)
    ref = K.residual_layer_norm_reference_(ref_x, ids, a, g, w, b, 1e-5)
    # plain torch: h = x[:, ids] + g * a, rounded to the buffer's dtype, written back; LN of that
    h = (x[:, ids].double() + a.double() * (g.double() if layer_scale else 1.0)).to(x_dtype)
    plain_x = x.clone()
    plain_x[:, ids] = h
    plain = plain_layer_norm(h, w, b, 1e-5)
    assert ours.dtype == a_dtype
    assert _same_rounding(ours_x, ref_x)
    assert (ours_x.double() - plain_x.double()).abs().max().item() <= _ulp_tol(x_dtype, 8)
    untouched = torch.ones(21, dtype=torch.bool)
    untouched[DISTINCT_IDS] = False
    assert torch.equal(ours_x[:, untouched.to(DEVICE)], x[:, untouched.to(DEVICE)])
    tol = _ulp_tol(a_dtype, plain.abs().max().item())
    assert (ours.double() - ref.double()).abs().max().item() <= tol
    assert (ours.double() - plain).abs().max().item() <= tol
    # an fp32 norm: the LN of the sum as stored in the buffer (rounded to its dtype), not of the fp32 sum, which
    # an fp16/bf16 norm output's own rounding would hide
    stored = x.clone()
    ours32 = K.residual_layer_norm_triton_(stored, ids, a, g, w, b, 1e-5, out_dtype=torch.float32)
    plain32 = plain_layer_norm(stored[:, ids], w, b, 1e-5)
    assert (ours32.double() - plain32).abs().max().item() <= _ulp_tol(torch.float32, plain32.abs().max().item())


@needs_triton
@pytest.mark.parametrize('x_dtype,m_dtype', [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize('layer_scale', [True, False])
def test_residual_scatter_adds_into_kept_rows_only(x_dtype, m_dtype, layer_scale):
    C = 24
    x = _randn(2, 13, C, seed=9, dtype=x_dtype)
    ids = torch.tensor([12, 4, 0, 9, 5], device=DEVICE)
    m = _randn(2, 5, C, seed=10, dtype=m_dtype)
    g = _randn(C, seed=11) if layer_scale else None
    ours, ref = x.clone(), x.clone()
    assert K.residual_scatter_triton_(ours, ids, m, g) is ours
    K.residual_scatter_reference_(ref, ids, m, g)
    plain = x.clone()
    plain[:, ids] = (x[:, ids].double() + m.double() * (g.double() if layer_scale else 1.0)).to(x_dtype)
    assert _same_rounding(ours, ref)
    assert (ours.double() - plain.double()).abs().max().item() <= _ulp_tol(x_dtype, 8)
    rest = [i for i in range(13) if i not in (12, 4, 0, 9, 5)]
    assert torch.equal(ours[:, rest], x[:, rest])


@needs_triton
def test_row_kernels_refuse_mismatched_shapes():
    x = torch.zeros(2, 5, 8, device=DEVICE)
    ids = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match=r'expected a \(2, 2, 8\) tensor'):
        K.residual_scatter_triton_(x, ids, torch.zeros(2, 3, 8, device=DEVICE), None)
    with pytest.raises(ValueError, match='ids must be a 1-D'):
        K.gather_layer_norm_triton(x, ids.view(1, 2), None, None, 1e-6)


@needs_triton
def test_kernels_write_into_the_first_rows_of_a_longer_buffer():
    """With ``out``, the two norm kernels and the attention (the Triton kernel, and SDPA's transposing copy)
    write the (B, n, C) result into a view of the first B*n rows of a longer (B*n + pad, C) buffer, as the fast
    path pads a product's operand: the same values as without it, the rows after them untouched; an ``out`` of
    another shape, dtype or layout is refused."""
    C, ids = 64, torch.tensor(DISTINCT_IDS, device=DEVICE)
    B, n = 3, len(DISTINCT_IDS)
    x = _randn(B, 21, C, seed=12)
    a = _randn(B, n, C, seed=13, dtype=torch.float16)
    w, b, g = _randn(C, seed=14), _randn(C, seed=15), _randn(C, seed=16)
    qkv = _randn(B, n, 3 * C, seed=17, dtype=torch.float16)
    attention = [(f'attention {c.label}', lambda xx, c=c, out_dtype=None, **kw: run_attention(c, qkv, 2, 0.125, **kw))
                 for c in (AttentionChoice('triton', tiles=K.ATTENTION_TILES[0]), AttentionChoice('sdpa'))]
    for name, run in [('gather', lambda xx, **kw: K.gather_layer_norm_triton(xx, ids, w, b, 1e-6, **kw)),
                      ('residual', lambda xx, **kw: K.residual_layer_norm_triton_(xx, ids, a, g, w, b, 1e-6, **kw))
                      ] + attention:
        buf = torch.full((B * n + 7, C), 7.0, dtype=torch.float16, device=DEVICE)
        x1, x2 = x.clone(), x.clone()
        alone = run(x1, out_dtype=torch.float16)
        assert run(x2, out=buf[:B * n].view(B, n, C)).data_ptr() == buf.data_ptr(), name
        assert torch.equal(buf[:B * n].view(B, n, C), alone) and torch.equal(x1, x2), name
        assert bool((buf[B * n:] == 7.0).all()), name
        for bad, why in ((torch.empty(B, n + 1, C, dtype=torch.float16, device=DEVICE), 'shape'),
                         (torch.empty(B, n, C, device=DEVICE), 'dtype'),
                         (torch.empty(B, C, n, dtype=torch.float16, device=DEVICE).transpose(1, 2), 'layout')):
            with pytest.raises(ValueError, match=rf'out must be a \({B}, {n}, {C}\) torch.float16 tensor'):
                run(x.clone(), out=bad, out_dtype=torch.float16)


def plain_attention(qkv, num_heads, scale):
    """softmax(q k^T * scale) v per (image, head), in float64, from a (B, n, 3, H, D) layout."""
    B, n, three_c = qkv.shape
    D = three_c // (3 * num_heads)
    q, k, v = qkv.double().view(B, n, 3, num_heads, D).permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, n, num_heads * D)


ATTN_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@needs_triton
@pytest.mark.parametrize('n', [1, 17, 70])
@pytest.mark.parametrize('dtype', ATTN_DTYPES)
@pytest.mark.parametrize('tiles', [(64, 64, 64, 4, 2), (32, 64, 64, 4, 2), (64, 256, 256, 8, 2),
                                   (16, 32, 16, 4, 2)])  # the last: whole 32-key steps, then 16-key ones
def test_attention_kernel(n, dtype, tiles):
    H, D = 2, 32
    qkv = _randn(2, n, 3 * H * D, seed=n, dtype=dtype) * 2
    ours = K.attention_triton(qkv, H, D ** -0.5, *tiles)
    ref = K.attention_reference(qkv, H, D ** -0.5)
    plain = plain_attention(qkv, H, D ** -0.5)
    assert ours.shape == (2, n, H * D) and ours.dtype == dtype
    # P is rounded to the input dtype before P@V (as in flash attention); fp32 on CUDA runs the dots in tf32.
    tol = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    tol *= max(1.0, plain.abs().max().item())
    assert (ours.double() - plain).abs().max().item() <= tol
    assert (ref.double() - plain).abs().max().item() <= tol


@needs_triton
@pytest.mark.parametrize('scale', [0.3, 0.05])
def test_attention_kernel_takes_the_scale_it_is_given(scale):
    """A scale other than head_dim^-0.5 (a model with its own qk scale): the kernel and the reference use it."""
    H, D = 2, 32
    qkv = _randn(2, 17, 3 * H * D, seed=4) * 2
    plain = plain_attention(qkv, H, scale)
    assert (plain - plain_attention(qkv, H, D ** -0.5)).abs().max().item() > 0.05  # the scale matters here
    for out in (K.attention_triton(qkv, H, scale, 64, 64, 64, 4, 2), K.attention_reference(qkv, H, scale)):
        assert (out.double() - plain).abs().max().item() <= (2e-3 if CUDA else 1e-5) * max(1.0, plain.abs().max())


def test_attention_tile_labels():
    """Every tile the build times has its own label; a tail tile shows as '+BLOCK_T', and tiles without one keep
    the labels earlier results (benchmarks/results) name them by."""
    labels = [AttentionChoice('triton', tiles=t).label for t in K.ATTENTION_TILES]
    assert len(set(labels)) == len(labels)
    assert AttentionChoice('triton', tiles=(64, 128, 32, 4, 2)).label == 'triton-64x128+32w4s2'
    assert AttentionChoice('triton', tiles=(64, 64, 64, 4, 2)).label == 'triton-64x64w4s2'


@needs_triton
@pytest.mark.parametrize('block_t', [8, 128])
def test_attention_kernel_refuses_a_tail_tile_out_of_range(block_t):
    qkv = _randn(1, 5, 3 * 2 * 32, seed=1, dtype=torch.float16)
    with pytest.raises(ValueError, match=rf'tail tile must be 16 to block_n \(64\) keys, got {block_t}'):
        K.attention_triton(qkv, 2, 0.125, 64, 64, block_t)


@needs_triton
def test_attention_kernel_without_a_tail():
    """A tail tile and a key count that is a whole number of BLOCK_N steps: no tail step at all."""
    H, D = 2, 32
    qkv = _randn(2, 64, 3 * H * D, seed=3, dtype=torch.float16) * 2
    plain = plain_attention(qkv, H, D ** -0.5)
    ours = K.attention_triton(qkv, H, D ** -0.5, 16, 32, 16, 4, 2)
    assert (ours.double() - plain).abs().max().item() <= 4e-3 * max(1.0, plain.abs().max().item())


@cuda_only
@pytest.mark.parametrize('n', [129, 148, 197])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_attention_kernel_deit_shapes_on_cuda(n, dtype):
    H, D = 3, 64
    qkv = _randn(8, n, 3 * H * D, seed=n, dtype=dtype)
    plain = plain_attention(qkv, H, D ** -0.5)
    tol = (4e-3 if dtype == torch.float16 else 3e-2) * max(1.0, plain.abs().max().item())
    for tiles in K.ATTENTION_TILES:
        ours = K.attention_triton(qkv, H, D ** -0.5, *tiles)
        assert (ours.double() - plain).abs().max().item() <= tol, tiles


# CUDA's grid limits: 2^31 - 1 programs along the first axis, 65535 along the second and third.
CUDA_GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)


@pytest.mark.skipif(not K.HAS_TRITON, reason='needs Triton')
def test_attention_grid_fits_cuda_at_large_batches(monkeypatch):
    """At 12 heads, batch 5462 makes 65544 (image, head) pairs, past what CUDA allows on a grid's second axis: the
    launch must put them where CUDA takes them (the kernel's own arithmetic is tested above and on CUDA below)."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(K, '_attention_kernel', Recorder())
    monkeypatch.setattr(K, '_need_triton', lambda t: None)
    qkv = torch.zeros(5462, 3, 3 * 12 * 16, dtype=torch.float16)
    K.attention_triton(qkv, 12, 0.25, 16, 16, 16)
    (grid,) = launched
    assert all(g <= limit for g, limit in zip(grid, CUDA_GRID_LIMITS)), grid
    assert math.prod(grid) == 5462 * 12  # one program per (image, head) and 16-row query tile


@cuda_only
def test_attention_kernel_at_a_batch_past_the_second_grid_axis():
    """Batch 5462 at 12 heads (DeiT-B's) runs and is right in its last image, which a grid that wrapped or was
    refused would get wrong."""
    H, D = 12, 64
    qkv = _randn(5462, 5, 3 * H * D, seed=5, dtype=torch.float16)
    ours = K.attention_triton(qkv, H, D ** -0.5, *K.ATTENTION_TILES[0])
    for b in (0, 2730, 5461):
        plain = plain_attention(qkv[b:b + 1], H, D ** -0.5)
        assert (ours[b:b + 1].double() - plain).abs().max().item() <= 4e-3 * max(1.0, plain.abs().max().item()), b
LINEAR_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@needs_triton
@pytest.mark.parametrize('dtype', LINEAR_DTYPES)
@pytest.mark.parametrize('shape,tiles', [((2, 19, 48), (32, 32, 16, 4, 2)),   # K: 3 tiles; M, N ragged
                                         ((37, 40), (16, 64, 32, 4, 2)),      # K not a multiple of BLOCK_K
                                         ((3, 5, 64), K.LINEAR_TILES[0]),     # one tile larger than everything
                                         ((150, 24), (16, 32, 16, 4, 2))])    # 10 row tiles: 8, then 2 (GROUP_M 8)
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('gelu', [True, False])
def test_linear_gelu(dtype, shape, tiles, with_bias, gelu):
    """The product kernel with the GELU epilogue (the MLP's first product) and without (qkv, the projection)."""
    N = 80
    x = _randn(*shape, seed=12, dtype=dtype)
    w = _randn(N, shape[-1], seed=13) * shape[-1] ** -0.5
    b = _randn(N, seed=14) if with_bias else None
    wt = w.t().contiguous().to(dtype)
    ours = (K.linear_gelu_triton if gelu else K.linear_triton)(x, wt, None if b is None else b.to(dtype), *tiles)
    ref = (K.linear_gelu_reference if gelu else K.linear_reference)(x, wt, None if b is None else b.to(dtype))
    # plain torch: the exact GELU written out, x * Phi(x), on the fp64 product
    z = x.double() @ wt.double() + (0 if b is None else b.to(dtype).double())
    plain = z * 0.5 * (1 + torch.erf(z / 2 ** 0.5)) if gelu else z
    assert ours.shape == shape[:-1] + (N,) and ours.dtype == dtype
    # fp16/bf16 inputs, fp32 accumulation: one rounding of the output; fp32 on CUDA: tf32 dots
    tol = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    scale = max(1.0, plain.abs().max().item())
    assert (ours.double() - plain).abs().max().item() <= tol * scale
    assert (ref.double() - plain).abs().max().item() <= tol * scale


# (buffer dtype, product operand dtype) of the fused products that update the buffer's rows
RESIDUAL_PRODUCT_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.float16),
                           (torch.float16, torch.float16)] + ([(torch.float32, torch.bfloat16)] if CUDA else [])


def _plain_residual_product(x, ids, u, wt, b, g):
    """x with x[:, ids] + g * (u @ wt + b) in float64, rounded once to x's dtype (g None: no LayerScale)."""
    plain = x.clone()
    m = u.double() @ wt.double() + b.double()
    plain[:, ids] = (x[:, ids].double() + m * (1.0 if g is None else g.double())).to(x.dtype)
    return plain


def _product_tol(u_dtype):
    """fp16/bf16 operands, fp32 accumulation (tf32 for fp32 operands on CUDA)."""
    return {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[u_dtype]


@needs_triton
@pytest.mark.parametrize('x_dtype,u_dtype', RESIDUAL_PRODUCT_DTYPES)
@pytest.mark.parametrize('tiles', [(32, 32, 16, 4, 2), (16, 64, 32, 4, 2)])
@pytest.mark.parametrize('layer_scale', [True, False])
def test_linear_residual_scatter(x_dtype, u_dtype, tiles, layer_scale):
    """x[:, ids] += gamma * (u @ W^T + b) with distinct unsorted ids, K = 72 (not a multiple of every BLOCK_K),
    C = 40 (ragged against BLOCK_N), B * n = 18 rows (ragged against BLOCK_M)."""
    B, N, C, K_ = 2, 21, 40, 72
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(B, N, C, seed=15, dtype=x_dtype)
    u = _randn(B, len(DISTINCT_IDS), K_, seed=16, dtype=u_dtype)
    wt = (_randn(K_, C, seed=17) * K_ ** -0.5).to(u_dtype)
    b = _randn(C, seed=18, dtype=u_dtype)
    g = _randn(C, seed=19) if layer_scale else None
    ours, ref = x.clone(), x.clone()
    assert K.linear_residual_scatter_triton_(ours, ids, u, wt, b, g, *tiles) is ours
    K.linear_residual_scatter_reference_(ref, ids, u, wt, b, g)
    plain = _plain_residual_product(x, ids, u, wt, b, g)
    # one rounding to the buffer's dtype
    scale = max(1.0, plain.abs().max().item())
    tol = max(_product_tol(u_dtype), 2 * torch.finfo(x_dtype).eps) * scale
    assert (ours.double() - plain.double()).abs().max().item() <= tol
    assert (ref.double() - plain.double()).abs().max().item() <= tol
    # and the reference's one rounding, tightly: the product is added unrounded (a product rounded to fp16 before
    # the fp32 buffer's update is within the loose bound above, not within this)
    same = max(_product_tol(u_dtype) if u_dtype is torch.float32 else 1e-5, 2 * torch.finfo(x_dtype).eps) * scale
    assert (ours.double() - ref.double()).abs().max().item() <= same
    rest = [i for i in range(N) if i not in DISTINCT_IDS]
    assert torch.equal(ours[:, rest], x[:, rest])


@needs_triton
@pytest.mark.parametrize('x_dtype,u_dtype', RESIDUAL_PRODUCT_DTYPES)
@pytest.mark.parametrize('tiles', [(16, 64, 32, 4, 2), (32, 64, 16, 4, 2)])
@pytest.mark.parametrize('affine', [True, False])
def test_linear_residual_layer_norm(x_dtype, u_dtype, tiles, affine):
    """x[:, ids] += gamma * (u @ W^T + b) and LN of the rows as written, in one kernel, with distinct unsorted
    ids, K = 72 (ragged against BLOCK_K 32), C = 40 (the tile's 64 columns span it, 24 masked off), B * n = 18
    rows (ragged against BLOCK_M): against float64 arithmetic and against the reference, the LN of the rounded
    residual as the unfused kernels compute it; the rows not kept are untouched.  Without the affine and
    LayerScale, the flags' other branch."""
    B, N, C, K_ = 2, 21, 40, 72
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(B, N, C, seed=60, dtype=x_dtype)
    u = _randn(B, len(DISTINCT_IDS), K_, seed=61, dtype=u_dtype)
    wt = (_randn(K_, C, seed=62) * K_ ** -0.5).to(u_dtype)
    b = _randn(C, seed=63, dtype=u_dtype)
    g, lw, lb = (_randn(C, seed=64), _randn(C, seed=65) + 1, _randn(C, seed=66)) if affine else (None,) * 3
    ours, ref = x.clone(), x.clone()
    y = K.linear_residual_layer_norm_triton_(ours, ids, u, wt, b, g, lw, lb, 1e-6, block_m=tiles[0],
                                             block_n=tiles[1], block_k=tiles[2], num_warps=tiles[3],
                                             num_stages=tiles[4])
    y_ref = K.linear_residual_layer_norm_reference_(ref, ids, u, wt, b, g, lw, lb, 1e-6)
    assert y.dtype == y_ref.dtype == u_dtype and y.shape == (B, len(DISTINCT_IDS), C)
    plain = _plain_residual_product(x, ids, u, wt, b, g)
    h = plain[:, ids].double()
    y_plain = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    if affine:
        y_plain = y_plain * lw.double() + lb.double()
    tol = _product_tol(u_dtype)
    res_tol = max(tol, 2 * torch.finfo(x_dtype).eps) * max(1.0, plain.abs().max().item())
    assert (ours.double() - plain.double()).abs().max().item() <= res_tol
    assert (ref.double() - plain.double()).abs().max().item() <= res_tol
    same = (max(_product_tol(u_dtype) if u_dtype is torch.float32 else 1e-5, 2 * torch.finfo(x_dtype).eps)
            * max(1.0, plain.abs().max().item()))  # the product added unrounded, as the reference adds it
    assert (ours.double() - ref.double()).abs().max().item() <= same
    rest = [i for i in range(N) if i not in DISTINCT_IDS]
    assert torch.equal(ours[:, rest], x[:, rest])
    # the norm of a rounded residual amplifies its rounding by 1/std: compare against the reference, which
    # normalises the same rounded rows, tightly, and against float64 within the residual's rounding
    y_tol = max(tol, 2 * torch.finfo(u_dtype).eps) * max(1.0, y_plain.abs().max().item())
    assert (y.double() - y_ref.double()).abs().max().item() <= y_tol
    assert (y.double() - y_plain).abs().max().item() <= y_tol + 50 * torch.finfo(x_dtype).eps


@needs_triton
def test_linear_residual_layer_norm_normalises_the_rows_as_written():
    """The fused kernel's norm reads the residual rows rounded to the buffer's dtype, as the unfused "add, store,
    normalise" does, not its fp32 sum: with an fp16 buffer and an fp32 output, the output is LN of the rows the
    kernel wrote, tightly (LN of the unrounded sum is off by the rounding amplified by 1/std, about 1e-3 here,
    which the fp16 outputs of the test above hide)."""
    B, N, C, K_ = 2, 21, 40, 72
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(B, N, C, seed=70, dtype=torch.float16) * 4
    u = _randn(B, len(DISTINCT_IDS), K_, seed=71, dtype=torch.float16)
    wt = (_randn(K_, C, seed=72) * K_ ** -0.5).to(torch.float16)
    b = _randn(C, seed=73, dtype=torch.float16)
    g, lw, lb = _randn(C, seed=74), _randn(C, seed=75) + 1, _randn(C, seed=76)
    ours = x.clone()
    y = K.linear_residual_layer_norm_triton_(ours, ids, u, wt, b, g, lw, lb, 1e-6, out_dtype=torch.float32,
                                             block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=2)
    assert y.dtype == torch.float32
    as_written = F.layer_norm(ours[:, ids].float(), (C,), lw, lb, 1e-6)
    assert (y - as_written).abs().max().item() <= 1e-5 * max(1.0, as_written.abs().max().item())


def test_linear_residual_layer_norm_writes_into_out_where_triton_cannot_run(monkeypatch):
    """The dispatcher falls back to the reference where Triton cannot run; a given ``out`` is then written and
    returned, as the Triton version does (not a new tensor with ``out`` left as it was), and a wrong one is
    refused before x is changed."""
    monkeypatch.setattr(K, 'triton_runs_on', lambda t: False)
    B, N, C, K_ = 2, 21, 40, 72
    ids = torch.tensor(DISTINCT_IDS)
    x = _randn(B, N, C, seed=80).cpu()
    u, wt, b = _randn(B, len(DISTINCT_IDS), K_, seed=81).cpu(), _randn(K_, C, seed=82).cpu(), _randn(C, seed=83).cpu()
    expected = K.linear_residual_layer_norm_reference_(x.clone(), ids, u, wt, b, None, None, None, 1e-6)
    buf = torch.zeros(B * len(DISTINCT_IDS) + 3, C)  # a longer buffer, its first rows the output (as the path's)
    out = buf[:B * len(DISTINCT_IDS)].view(B, len(DISTINCT_IDS), C)
    ours = x.clone()
    y = K.linear_residual_layer_norm_(ours, ids, u, wt, b, None, None, None, 1e-6, out=out, block_m=16)
    assert y.data_ptr() == out.data_ptr() and torch.equal(out, expected)
    assert torch.equal(buf[B * len(DISTINCT_IDS):], torch.zeros(3, C))
    before = x.clone()
    with pytest.raises(ValueError, match='out must be a'):
        K.linear_residual_layer_norm_(x, ids, u, wt, b, None, None, None, 1e-6, out=torch.empty(B, 1, C))
    assert torch.equal(x, before)


def test_linear_residual_layer_norm_needs_a_tile_that_spans_the_row():
    x, u = _randn(1, 4, 40, seed=1), _randn(1, 2, 8, seed=2)
    wt = _randn(8, 40, seed=3)
    with pytest.raises(ValueError, match='block_n 32 does not span a row of 40'):
        K.linear_residual_layer_norm_triton_(x, torch.tensor([0, 2], device=DEVICE), u, wt, None, None, None,
                                             None, 1e-6, block_n=32)
    assert [t[1] for t in K.row_tiles(192)] == [256] * 3 and K.row_tiles(384) == []
    assert {t[1] for t in K.row_tiles(40)} == {64}
    assert {t[1] for t in K.row_tiles(256)} == {256} and K.row_tiles(257) == []  # rows of up to 256 channels


def _plain_mlp(x, ids, y, w1t, b1, w2t, b2, g):
    """x with x[:, ids] + g * (GELU(y @ w1t + b1) @ w2t + b2) in float64 (exact erf GELU), rounded once to x's
    dtype; the hidden activation is not rounded (the kernel rounds it to y's dtype, as the unfused path does)."""
    u = y.double() @ w1t.double() + (0.0 if b1 is None else b1.double())
    u = 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))
    m = u @ w2t.double() + (0.0 if b2 is None else b2.double())
    plain = x.clone()
    plain[:, ids] = (x[:, ids].double() + m * (1.0 if g is None else g.double())).to(x.dtype)
    return plain


@needs_triton
@pytest.mark.parametrize('x_dtype,u_dtype', RESIDUAL_PRODUCT_DTYPES)
@pytest.mark.parametrize('C,H,tiles,affine', [(40, 72, (16, 32, 16, 4, 2), True),   # C, H ragged against every tile
                                              (40, 72, (32, 64, 64, 4, 2), True),   # one K step wider than the row
                                              (64, 128, (16, 64, 32, 4, 2), True),  # whole tiles: unmasked loads
                                              (40, 72, (16, 32, 16, 4, 2), False)])
def test_mlp_residual_scatter(x_dtype, u_dtype, C, H, tiles, affine):
    """The whole MLP and its residual update in one kernel, x[:, ids] += gamma * (GELU(y @ W1^T + b1) @ W2^T +
    b2), with distinct unsorted ids and B * n = 18 rows (ragged against BLOCK_M): against float64 arithmetic
    within the products' tolerance, and against the reference (the two fused products' references in turn,
    the hidden activation rounded as both round it) tightly; the rows not kept are untouched; the dispatcher
    runs the kernel.  Without biases and LayerScale, the flags' other branch."""
    B, N = 2, 21
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(B, N, C, seed=90, dtype=x_dtype)
    y = _randn(B, len(DISTINCT_IDS), C, seed=91, dtype=u_dtype)
    w1t = (_randn(C, H, seed=92) * C ** -0.5).to(u_dtype)
    w2t = (_randn(H, C, seed=93) * H ** -0.5).to(u_dtype)
    b1, b2, g = ((_randn(H, seed=94, dtype=u_dtype), _randn(C, seed=95, dtype=u_dtype), _randn(C, seed=96))
                 if affine else (None,) * 3)
    ours, ref, dispatched = x.clone(), x.clone(), x.clone()
    assert K.mlp_residual_scatter_triton_(ours, ids, y, w1t, b1, w2t, b2, g, *tiles) is ours
    K.mlp_residual_scatter_reference_(ref, ids, y, w1t, b1, w2t, b2, g)
    K.mlp_residual_scatter_(dispatched, ids, y, w1t, b1, w2t, b2, g, block_m=tiles[0], block_h=tiles[1],
                            block_k=tiles[2], num_warps=tiles[3], num_stages=tiles[4])
    assert torch.equal(dispatched, ours)
    plain = _plain_mlp(x, ids, y, w1t, b1, w2t, b2, g)
    scale = max(1.0, plain.abs().max().item())
    # the hidden activation rounded to fp16 (not in the float64 sum): a few units of its last place, summed over H
    tol = max(_product_tol(u_dtype), 8 * torch.finfo(u_dtype).eps, 2 * torch.finfo(x_dtype).eps) * scale
    assert (ours.double() - plain.double()).abs().max().item() <= tol
    assert (ref.double() - plain.double()).abs().max().item() <= tol
    same = max(_product_tol(u_dtype) if u_dtype is torch.float32 else 1e-5, 2 * torch.finfo(x_dtype).eps) * scale
    assert (ours.double() - ref.double()).abs().max().item() <= same
    rest = [i for i in range(N) if i not in DISTINCT_IDS]
    assert torch.equal(ours[:, rest], x[:, rest])


@needs_triton
@pytest.mark.parametrize('x_dtype,w_dtype', RESIDUAL_PRODUCT_DTYPES)
@pytest.mark.parametrize('C,N_out,tiles,affine', [(40, 72, (16, 32, 64, 4, 1), True),    # C, N ragged
                                                   (64, 128, (32, 64, 64, 4, 1), True),   # whole tiles
                                                   (40, 72, (32, 64, 128, 4, 1), True),   # a wider row tile
                                                   (40, 72, (16, 32, 64, 4, 1), False)])
def test_gather_layer_norm_linear(x_dtype, w_dtype, C, N_out, tiles, affine):
    """The first norm and the qkv product in one kernel, LN(x[:, ids]) @ W^T + b, with distinct unsorted ids and
    B * n = 18 rows (ragged against BLOCK_M): against float64 arithmetic within the product's tolerance (the normed
    rows rounded to the weight's dtype first, as both kernels store them), and against the reference (the
    gather-norm reference, then the product) tightly; written into the first rows of a longer buffer, its padding
    rows untouched; the dispatcher runs the kernel.  Without the norm's affine and the bias, the flags' other
    branch."""
    B, N = 2, 21
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    x = _randn(B, N, C, seed=100, dtype=x_dtype) * 3 + 1
    wt = (_randn(C, N_out, seed=101) * C ** -0.5).to(w_dtype)
    lw, lb, b = ((_randn(C, seed=102) + 1, _randn(C, seed=103), _randn(N_out, seed=104, dtype=w_dtype))
                 if affine else (None,) * 3)
    M = B * len(DISTINCT_IDS)
    buf = torch.full((M + 5, N_out), 7.0, dtype=w_dtype, device=DEVICE)
    bm, bn, bk, warps, stages = tiles
    ours = K.gather_layer_norm_linear_triton(x, ids, lw, lb, 1e-6, wt, b, out=buf, block_m=bm, block_n=bn,
                                             block_k=bk, num_warps=warps, num_stages=stages)
    assert ours is buf and torch.equal(buf[M:], torch.full((5, N_out), 7.0, dtype=w_dtype, device=DEVICE))
    ref = K.gather_layer_norm_linear_reference(x, ids, lw, lb, 1e-6, wt, b)
    dispatched = K.gather_layer_norm_linear(x, ids, lw, lb, 1e-6, wt, b, block_m=bm, block_n=bn, block_k=bk,
                                            num_warps=warps, num_stages=stages)
    assert ref.dtype == dispatched.dtype == w_dtype and ref.shape == dispatched.shape == (M, N_out)
    assert torch.equal(dispatched, buf[:M])
    h = x[:, ids].double()
    y = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    if affine:
        y = y * lw.double() + lb.double()
    plain = y.to(w_dtype).double().reshape(M, C) @ wt.double() + (b.double() if affine else 0.0)
    scale = max(1.0, plain.abs().max().item())
    # the normed rows' rounding to w_dtype may differ in their last place where the fp32 norm and float64 differ
    tol = max(_product_tol(w_dtype), 8 * torch.finfo(w_dtype).eps) * scale
    assert (buf[:M].double() - plain).abs().max().item() <= tol
    assert (ref.double() - plain).abs().max().item() <= tol
    same = (_product_tol(w_dtype) if w_dtype is torch.float32 else 2 * torch.finfo(w_dtype).eps) * scale
    assert (buf[:M].double() - ref.double()).abs().max().item() <= same


def test_gather_layer_norm_linear_refuses_a_tile_that_does_not_span_the_row(monkeypatch):
    """The norm needs the whole row in one tile: a row tile narrower than the row (or than the matrix unit's
    16), not a power of two or wider than 256 columns is refused; so is a buffer too short for the rows, before
    anything is written.  Where Triton cannot run, the dispatcher's reference writes into the given buffer too."""
    x, ids, wt = _randn(1, 4, 40, seed=1), torch.tensor([0, 2], device=DEVICE), _randn(40, 8, seed=3)
    for block_k, wide in ((32, 40), (48, 40), (512, 300), (8, 8)):  # (8: under the matrix unit's 16)
        with pytest.raises(ValueError, match='one tile of 16 to 256 columns'):
            K.gather_layer_norm_linear_triton(_randn(1, 4, wide, seed=1), ids, None, None, 1e-6,
                                              _randn(wide, 8, seed=3), None, block_k=block_k)
    short = torch.zeros(1, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r'out must be an \(at least 2, 8\)'):
        K.gather_layer_norm_linear_triton(x, ids, None, None, 1e-6, wt, None, out=short)
    assert torch.equal(short, torch.zeros(1, 8, device=DEVICE))
    assert [t[2] for t in K.norm_linear_tiles(192)] == [t[2] for t in K.norm_linear_tiles(256)] == [256] * 4
    assert K.norm_linear_tiles(257) == []  # (rows of up to 256 channels, 256 included)
    monkeypatch.setattr(K, 'triton_runs_on', lambda t: False)
    buf = torch.zeros(3, 8, device=DEVICE)
    assert K.gather_layer_norm_linear(x, ids, None, None, 1e-6, wt, None, out=buf, block_m=16) is buf
    assert torch.equal(buf[:2], K.gather_layer_norm_linear_reference(x, ids, None, None, 1e-6, wt, None))
    assert torch.equal(buf[2], torch.zeros(8, device=DEVICE))


def test_mlp_residual_scatter_refuses_what_it_cannot_hold():
    """Rows wider than 256 channels (the accumulator spans the row), a second weight of the wrong shape and
    rows of another dtype than the weights' (the hidden activation is rounded to the weights' dtype) are refused
    before anything is written; the tiles offered are for rows of at most 256 channels."""
    ids = torch.tensor([0, 2], device=DEVICE)
    for C, w2_shape, y_dtype, message in (
            (264, (16, 264), torch.float32, 'rows of at most 256 channels, got 264'),
            (40, (40, 16), torch.float32, r'w2_t must be a contiguous \(16, 40\)'),
            (40, (16, 40), torch.float16, "y must have the weights' dtype torch.float32, got torch.float16")):
        x, y = _randn(1, 4, C, seed=1), _randn(1, 2, C, seed=2, dtype=y_dtype)
        before = x.clone()
        with pytest.raises(ValueError, match=message):
            K.mlp_residual_scatter_triton_(x, ids, y, _randn(C, 16, seed=3), None, _randn(*w2_shape, seed=4), None,
                                           None)
        assert torch.equal(x, before)
    assert K.mlp_tiles(257) == [] and K.mlp_tiles(256) == K.mlp_tiles(192) != []


@needs_triton
@pytest.mark.parametrize('dtype', LINEAR_DTYPES)
@pytest.mark.parametrize('geometry,tiles', [((3, 20, 30, 5, 5), (32, 32, 16, 4, 2)),   # K = 75: ragged K tiles
                                            ((3, 32, 32, 8, 8), (16, 64, 64, 4, 2)),   # K = 192, one tile too wide
                                            ((2, 16, 24, 8, 4), K.LINEAR_TILES[0]),    # 2 channels, ph != pw
                                            ((3, 32, 32, 8, 8), K.PATCH_EMBED_TILES[-1])])  # 32-column steps
def test_patch_embed_equals_the_strided_convolution(dtype, geometry, tiles):
    """The fused patch embedding against F.conv2d (stride = kernel) plus the position embedding, written into
    rows prefix.. of a buffer whose other rows stay as they were; B * num_patches ragged against BLOCK_M, C = 40
    ragged against BLOCK_N."""
    c, H, W, ph, pw = geometry
    B, C, prefix = 3, 40, 2
    num_patches = (H // ph) * (W // pw)
    x = _randn(B, c, H, W, seed=20)
    w = _randn(C, c, ph, pw, seed=21) * (c * ph * pw) ** -0.5
    bias, pos = _randn(C, seed=22), _randn(num_patches, C, seed=23)
    conv = F.conv2d(x.double(), w.to(dtype).double(), bias.double(), stride=(ph, pw))
    plain = conv.flatten(2).transpose(1, 2) + pos.double()
    wt = w.reshape(C, -1).t().contiguous().to(dtype)
    ours = torch.full((B, prefix + num_patches + 1, C), 7.0, device=DEVICE)
    assert K.patch_embed_triton_(ours, x, wt, pos + bias, prefix, (ph, pw), *tiles) is ours
    ref = K.patch_embed_reference_(torch.full_like(ours, 7.0), x, wt, pos + bias, prefix, (ph, pw))
    # the pixels rounded to the weights' dtype for the matrix unit, fp32 accumulation (tf32 dots on CUDA)
    tol = {torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    tol *= max(1.0, plain.abs().max().item())
    for out in (ours, ref):
        assert (out[:, prefix:prefix + num_patches].double() - plain).abs().max().item() <= tol
        assert bool((out[:, :prefix] == 7).all() and (out[:, prefix + num_patches:] == 7).all())
    # against the reference, which rounds only the pixels, tightly (a constant rounded to the weights' dtype is
    # within the bound above, not within this; fp32 on CUDA: the kernel's tf32 dots against fp32 ones)
    same = tol if dtype is torch.float32 else 1e-5 * max(1.0, plain.abs().max().item())
    assert (ours.double() - ref.double()).abs().max().item() <= same


@needs_triton
def test_patch_embed_takes_images_of_any_layout():
    """Channels-last images (unit stride along the channels, not along W) and a crop of wider images give the
    strided convolution too: the kernel reads pixels along W with unit stride, so the wrapper must lay them out."""
    B, c, C, prefix, (ph, pw) = 2, 3, 40, 1, (4, 4)
    wide = _randn(B, c, 12, 20, seed=33)
    w = _randn(C, c, ph, pw, seed=34) * (c * ph * pw) ** -0.5
    const = _randn(12, C, seed=35)
    wt = w.reshape(C, -1).t().contiguous()
    for images in (wide[..., :16].contiguous(memory_format=torch.channels_last), wide[..., 2:18]):
        assert not images.is_contiguous()
        plain = F.conv2d(images.double(), w.double(), stride=(ph, pw)).flatten(2).transpose(1, 2) + const.double()
        ours = K.patch_embed_triton_(torch.zeros(B, prefix + 12, C, device=DEVICE), images, wt, const, prefix,
                                     (ph, pw), 16, 32, 16, 4, 2)
        tol = (2e-3 if CUDA else 1e-5) * max(1.0, plain.abs().max().item())
        assert (ours[:, prefix:].double() - plain).abs().max().item() <= tol


@needs_triton
def test_patch_embed_reads_the_images_an_address_names(kernels_stay_inside_their_tensors):
    """With image_address the kernel reads the images whose address the tensor holds when it runs (as a CUDA
    graph replay would), not the ones it was given for their layout: the same bits as reading them directly."""
    B, C, prefix, patch = 2, 40, 1, (8, 8)
    layout, images = _randn(B, 3, 32, 32, seed=24), _randn(B, 3, 32, 32, seed=25)
    kernels_stay_inside_their_tensors.append(images)  # (read at the address, not given)
    wt, const = _randn(3 * 64, C, seed=26) * 0.1, _randn(16, C, seed=27)
    direct = K.patch_embed_triton_(torch.zeros(B, prefix + 16, C, device=DEVICE), images, wt, const, prefix, patch)
    address = torch.tensor([layout.data_ptr()], dtype=torch.int64, device=DEVICE)
    address.fill_(images.data_ptr())  # after the fact, as before a replay
    read = K.patch_embed_triton_(torch.zeros_like(direct), layout, wt, const, prefix, patch, image_address=address)
    assert torch.equal(read, direct)
    assert not torch.equal(read, K.patch_embed_triton_(torch.zeros_like(direct), layout, wt, const, prefix, patch))
    with pytest.raises(ValueError, match='image_address needs contiguous images'):
        K.patch_embed_triton_(torch.zeros_like(direct), layout.transpose(2, 3), wt, const, prefix, patch,
                              image_address=address)
    with pytest.raises(ValueError, match='one-element int64 tensor'):
        K.patch_embed_triton_(torch.zeros_like(direct), layout, wt, const, prefix, patch,
                              image_address=address.to(torch.int32))


@needs_triton
def test_patch_embed_refuses_mismatched_shapes():
    x, wt, const = _randn(2, 3, 16, 16), _randn(3 * 8 * 8, 40), _randn(4, 40)
    with pytest.raises(ValueError, match='do not tile'):
        K.patch_embed_triton_(torch.empty(2, 5, 40, device=DEVICE), x, wt, const, 1, (5, 5))
    with pytest.raises(ValueError, match='out must be'):
        K.patch_embed_triton_(torch.empty(2, 4, 40, device=DEVICE), x, wt, const, 1, (8, 8))
    with pytest.raises(ValueError, match='const must be'):
        K.patch_embed_triton_(torch.empty(2, 5, 40, device=DEVICE), x, wt, const[:3], 1, (8, 8))


@needs_triton
@pytest.mark.parametrize('kernel', ['gather', 'residual_norm', 'residual', 'linear_residual', 'linear_residual_norm',
                                    'patch_embed', 'attention'])
def test_kernels_touch_no_row_past_their_images(kernel):
    """Each kernel that takes token rows given, for the buffer, its outputs and its operands, the first B images
    of tensors of B + 1: the image after them stays as it was (the kernels' values are checked above).  B * n = 18
    rows, ragged against every row tile, n = 9 against the attention's 16 query rows, so a row mask off by one
    writes row B * n (the attention: row n of the last image), the next image's first row here (past the end of
    a tensor of B images, where the interpreter may crash or not, and a GPU corrupts whatever lies there)."""
    B, N, C = 2, 21, 40
    ids = torch.tensor(DISTINCT_IDS, device=DEVICE)
    n = len(DISTINCT_IDS)
    w, b, g = _randn(C, seed=40), _randn(C, seed=41), _randn(C, seed=42)
    tensors = {'x': _randn(B + 1, N, C, seed=43), 'out': torch.zeros(B + 1, n, C, device=DEVICE),
               'a': _randn(B + 1, n, C, seed=44), 'u': _randn(B + 1, n, 24, seed=45),
               'qkv': _randn(B + 1, n, 3 * 64, seed=50), 'o': torch.zeros(B + 1, n, 64, device=DEVICE)}
    before = {k: t.clone() for k, t in tensors.items()}
    x, out, a, u, qkv, o = (tensors[k][:B] for k in ('x', 'out', 'a', 'u', 'qkv', 'o'))
    wt = _randn(24, C, seed=46) * 24 ** -0.5
    images, pwt, const = _randn(B, 3, 12, 12, seed=47), _randn(3 * 4 * 4, C, seed=48) * 0.25, _randn(9, C, seed=49)
    {'gather': lambda: K.gather_layer_norm_triton(x, ids, w, b, 1e-6, out=out),
     'residual_norm': lambda: K.residual_layer_norm_triton_(x, ids, a, g, w, b, 1e-6, out=out),
     'residual': lambda: K.residual_scatter_triton_(x, ids, a, g),
     'linear_residual': lambda: K.linear_residual_scatter_triton_(x, ids, u, wt, b, g, 32, 32, 16, 4, 2),
     'linear_residual_norm': lambda: K.linear_residual_layer_norm_triton_(x, ids, u, wt, b, g, w, b, 1e-6, out=out,
                                                                          block_m=32, block_k=16, num_warps=4,
                                                                          num_stages=2),
     'patch_embed': lambda: K.patch_embed_triton_(x, images, pwt, const, 12, (4, 4), 32, 32, 16, 4, 2),
     'attention': lambda: K.attention_triton(qkv, 2, 0.125, 16, 32, 16, 4, 2, out=o)}[kernel]()
    for k, t in tensors.items():
        assert torch.equal(t[B], before[k][B]), k
    written = {'gather': 'out', 'attention': 'o'}.get(kernel, 'x')
    assert not torch.equal(tensors[written][:B], before[written][:B])


def test_attention_dispatch_falls_back_for_other_head_dims():
    qkv = _randn(2, 9, 3 * 2 * 24, seed=3)  # head_dim 24: no Triton tile
    out = K.attention(qkv, 2, 24 ** -0.5)
    assert (out.double() - plain_attention(qkv, 2, 24 ** -0.5)).abs().max().item() <= 1e-5


def test_the_triton_attention_takes_the_power_of_two_head_dims_from_16():
    """Its tiles need a power-of-two head_dim of at least 16 (the matrix unit's smallest K): 16 itself included."""
    assert [d for d in range(1, 257) if K.attention_tiles_ok(d)] == [16, 32, 64, 128, 256]


# ---------------------------------------------------------------------------------------------------------------
# the whole path

TINY = dict(embed_dim=64, depth=3, num_heads=2, img_size=32, patch_size=8, num_classes=10)


def randomise_affine(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """timm's init leaves every Linear bias 0, every LayerNorm's weight 1 and bias 0, and LayerScale a constant:
    a path that read the wrong bias, norm or scale would compute the same numbers.  Random ones, distinct per
    module and channel, make such a mix-up show in the logits.  (Biases of the weights' own scale, 0.02: at 0.1
    they swamp the tiny model's tokens, and pruning them barely moves the logits, see _masks_matter.)"""
    g = _gen(1000 + seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
            elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.2)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
            elif isinstance(m, timm.layers.LayerScale):
                m.gamma.copy_(0.2 + 0.8 * torch.rand(m.gamma.shape, generator=g))
    return model


def tiny_cc(seed=0, **kw):
    torch.manual_seed(seed)
    model = timm.create_model('cc_deit_tiny_patch16_224', **dict(TINY, **kw))
    return randomise_affine(model, seed).to(DEVICE).eval()


def images(batch=3, seed=0, size=32):
    return _randn(batch, 3, size, size, seed=seed)


def original_order_reference(model, x, kept_ids):
    """The original-order formulation with timm's own modules: x[:, ids] = block(x[:, ids]) per block."""
    t = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for blk, ids in zip(model.blocks, kept_ids):
        ids = ids.to(t.device)
        t = t.clone()
        t[:, ids] = timm.models.vision_transformer.Block.forward(blk, t[:, ids])
    return model.forward_head(model.norm(t))


def revisiting_plan(depth, num_patches, seed):
    """A random plan (original order) in which some patch is clipped at one block and kept at a later one."""
    plan = torch.rand(depth, num_patches, generator=_gen(seed)) > 0.4
    assert any(not plan[l, j] and plan[l2, j]
               for j in range(num_patches) for l in range(depth) for l2 in range(l + 1, depth))
    return plan


def _close(ours, ref):
    return (ours - ref).abs().max().item() <= LOGIT_TOL * max(1.0, ref.abs().max().item())


def _close_in_fp16(ours, ref):
    """Within the rounding of a path whose products run in fp16 (the timed builds'): 1e-2 of the logits' scale."""
    return (ours - ref).abs().max().item() <= 1e-2 * max(1.0, ref.abs().max().item())


CUDA_LOGIT_TOL = 2e-3  # LOGIT_TOL on a GPU: the bar _masks_matter sets on every device


def _masks_matter(pruned, dense):
    """Pruning moves the logits by far more than the comparison tolerance (else the comparison proves little).
    The bar is the GPU's (the looser) tolerance on every device, so a model and kept ids chosen on CPU that move
    the logits too little for the GPU fail here too, not only in a session with a GPU."""
    return (pruned - dense).abs().max().item() > 10 * CUDA_LOGIT_TOL * max(1.0, dense.abs().max().item())


def _cases():
    """Build arguments to run the whole path with here: the torch backend; the Triton backend with torch's
    attention and MLP, with every Triton kernel, and (CUDA) with the timed choice."""
    out = [dict(backend='torch')]
    if K.triton_runs_on(torch.empty(0, device=DEVICE)):
        out += [dict(backend='triton', attention='sdpa', mlp='torch'),
                dict(backend='triton', attention='triton', mlp='triton')]
        if CUDA:
            out.append(dict(backend='triton', attention='auto', mlp='auto'))
    return out


CASES = _cases()


@torch.no_grad()
def test_original_order_reference_equals_concat_order_model():
    """The test's reference formulation against the repo's model (tokens in concat order): the same logits."""
    model = tiny_cc(1)
    pruning.apply_masks(model, revisiting_plan(3, 16, 1))
    x = images()
    assert (original_order_reference(model, x, model.kept_token_ids()) - model(x)).abs().max().item() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_dense_model(case):
    model = tiny_cc(0)
    fast = build_fast_path(model, **case)
    assert fast.describe()['kept_counts'] == [17, 17, 17]
    assert all(blk.dense for blk in fast.blocks)
    x = images()
    assert _close(fast(x), model(x))


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
@pytest.mark.parametrize('plan', ['random', 'revisiting'])
def test_pruned_model(case, plan):
    model = tiny_cc(2)
    x = images(seed=2)
    dense = model(x)
    masks = (pruning.random_masks(3, 16, 0.3, generator=_gen(0)) if plan == 'random'
             else revisiting_plan(3, 16, 2))
    pruning.apply_masks(model, masks)
    ref = model(x)
    assert _masks_matter(ref, dense)
    fast = build_fast_path(model, **case)
    built = fast.describe()
    assert built['kept_counts'] == [int(m.sum()) + 1 for m in masks]
    if case.get('mlp') == 'triton':  # the fused kernels really ran
        chosen = [v for key in ('attention', 'mlp', 'fc2') for v in built[key].values()]
        assert len(chosen) == 3 * len(set(built['kept_counts'])) and all(v.startswith('triton-') for v in chosen)
        assert built['patch_embedding'].startswith('triton-')
    elif case['backend'] == 'torch' or case.get('mlp') == 'torch':
        assert built['patch_embedding'] == 'torch'
    assert _close(fast(x), ref)


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_layer_scale(case):
    model = tiny_cc(3, init_values=0.5)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(3)))
    gammas = [blk.ls1.gamma for blk in model.blocks] + [blk.ls2.gamma for blk in model.blocks]
    assert all(g.unique().numel() == g.numel() for g in gammas)  # per channel (randomise_affine), all distinct
    x = images(seed=3)
    fast = build_fast_path(model, **case)
    assert torch.equal(fast.blocks[0].gamma1.cpu(), model.blocks[0].ls1.gamma.float().cpu())
    assert torch.equal(fast.blocks[0].gamma2.cpu(), model.blocks[0].ls2.gamma.float().cpu())
    assert _close(fast(x), model(x))


def _kept_ids(depth, N, prefix, seed, rate=0.35):
    """Random per-block ids that keep every prefix token and clip some patches (each block keeps one at least)."""
    out = []
    for l in range(depth):
        keep = torch.rand(N - prefix, generator=_gen(seed + l)) > rate
        keep[l] = True
        out.append(torch.cat([torch.arange(prefix), keep.nonzero().squeeze(1) + prefix]))
    return out


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_distilled_model(case):
    """DeiT's distilled model (class + distillation token; eval logits = mean of both heads): dense against its
    own forward, pruned (ids chosen here) against the original-order reference."""
    torch.manual_seed(4)
    model = VisionTransformerDistilled(**TINY).to(DEVICE).eval()
    x = images(seed=4)
    assert _close(build_fast_path(model, **case)(x), model(x))
    ids = _kept_ids(3, 18, 2, seed=4)
    fast = build_fast_path(model, **case, kept_ids=ids)
    ref = original_order_reference(model, x, ids)
    assert _masks_matter(ref, model(x))
    assert fast.head_ids.tolist() == [0, 1]  # the final norm runs on the two tokens the heads read
    assert _close(fast(x), ref)


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_global_average_pool_without_class_token(case):
    torch.manual_seed(5)
    model = VisionTransformer(**TINY, class_token=False, global_pool='avg').to(DEVICE).eval()
    assert model.num_prefix_tokens == 0 and not isinstance(model.fc_norm, torch.nn.Identity)
    x = images(seed=5)
    assert _close(build_fast_path(model, **case)(x), model(x))
    ids = _kept_ids(3, 16, 0, seed=5)
    fast = build_fast_path(model, **case, kept_ids=ids)
    ref = original_order_reference(model, x, ids)
    assert _masks_matter(ref, model(x))
    assert fast.head_ids.numel() == 16  # average pooling reads every token
    assert _close(fast(x), ref)


class _MeanPoolViT(VisionTransformer):
    """timm's head with a pool of its own: the mean over every token, whatever global_pool says."""

    def pool(self, x, pool_type=None):
        return x.mean(1)


@torch.no_grad()
def test_a_pool_of_its_own_reads_every_token():
    """global_pool='token' lets the path normalise only the class token for timm's pool; a subclass's pool may
    read any token, so it gets them all."""
    torch.manual_seed(24)
    model = _MeanPoolViT(**TINY).to(DEVICE).eval()
    x = images(seed=24)
    for case in CASES:
        fast = build_fast_path(model, **case)
        assert fast.head_ids.numel() == 17, case
        assert _close(fast(x), model(x)), case


@torch.no_grad()
@pytest.mark.parametrize('name', ['forward_head', 'pool'])
def test_a_head_set_on_the_model_itself_reads_every_token(name):
    """A forward_head or pool assigned to the model (not its class) may read any token, as a subclass's may: the
    path used to hand it the class token alone under global_pool='token', built before or after the assignment."""
    model = tiny_cc(25)
    x = images(seed=25)
    before = build_fast_path(model, backend='torch')
    if name == 'pool':
        model.pool = lambda t, pool_type=None: t.mean(1)
    else:
        model.forward_head = lambda t, pre_logits=False: model.head(t.mean(1))
    after = build_fast_path(model, backend='torch')
    assert _masks_matter(model(x), model.head(model.forward_features(x)[:, 0]))  # not the class token's logits
    assert after.head_ids.numel() == 17 and _close(after(x), model(x))
    assert _close(before(x), model(x))


@torch.no_grad()
def test_register_tokens_and_position_embedding_without_class_entry():
    torch.manual_seed(6)
    model = VisionTransformer(**TINY, reg_tokens=2, no_embed_class=True).to(DEVICE).eval()
    assert model.num_prefix_tokens == 3
    x = images(seed=6)
    ids = _kept_ids(3, 19, 3, seed=6)
    ref = original_order_reference(model, x, ids)
    assert _masks_matter(ref, model(x))
    for case in CASES:
        assert _close(build_fast_path(model, **case)(x), model(x)), case
        # pruned: the register tokens are kept in every block, the patches clipped; the position embedding (only
        # the patches') must land on the patch rows of the buffer whatever the blocks keep
        assert _close(build_fast_path(model, **case, kept_ids=ids)(x), ref), case


@torch.no_grad()
def test_a_norm_before_the_blocks_is_applied():
    """timm's pre_norm=True (CLIP's ViTs) puts a LayerNorm between the embedding and the blocks (norm_pre, an
    Identity in DeiT, the only kind the other tests build): the path applies it to the token buffer, dense and
    pruned.  Its affine is made far from the identity so that leaving it out shows, and small (a stream of unit
    scale would drown the random blocks' updates, so that pruning would hardly move the logits); the blocks clip
    80% of the patches."""
    torch.manual_seed(21)
    model = VisionTransformer(**TINY, pre_norm=True).to(DEVICE).eval()
    assert isinstance(model.norm_pre, torch.nn.LayerNorm)
    model.norm_pre.weight.uniform_(0.05, 0.2)
    model.norm_pre.bias.normal_(0, 0.05)
    x = images(seed=21)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))
    ids = _kept_ids(3, 17, 1, seed=21, rate=0.8)
    ref = original_order_reference(model, x, ids)
    assert _masks_matter(ref, model(x))
    assert _close(build_fast_path(model, backend='torch', kept_ids=ids)(x), ref)


@torch.no_grad()
def test_each_norm_is_computed_with_its_own_eps():
    """Every LayerNorm the path computes (norm_pre, each block's two, the final one) divides by sqrt(var + eps)
    with the eps that norm holds: timm's ViTs use 1e-6, which every other test builds with, but CLIP's use 1e-5
    and a model may set any.  Here each eps is of the order of its input's variance and the two of a block are
    20 times apart, so that reading a fixed eps, or the other norm's of the block, moves the logits (checked on
    the eager model: by more than the GPU's comparison tolerance); the path must compute the model, dense and
    pruned."""
    torch.manual_seed(30)
    model = randomise_affine(VisionTransformer(**TINY, pre_norm=True), 30).to(DEVICE).eval()
    model.norm_pre.weight.uniform_(0.05, 0.2)  # a small stream (variance about 0.02), whose norms eps can move
    for blk in model.blocks:  # and blocks whose updates weigh on it
        blk.attn.proj.weight.mul_(4)
        blk.mlp.fc2.weight.mul_(4)
    norms = [model.norm_pre] + [n for blk in model.blocks for n in (blk.norm1, blk.norm2)] + [model.norm]
    for norm, eps in zip(norms, (0.3, 0.2, 0.005, 0.1, 0.005, 0.1, 0.01, 0.03)):
        norm.eps = eps
    x = images(seed=30)
    ref = model(x)
    for norm in norms:  # each eps matters: 1e-6 in its place moves the logits
        eps, norm.eps = norm.eps, 1e-6
        assert _masks_matter(model(x), ref), eps
        norm.eps = eps
    for blk in model.blocks:  # and so does either norm of a block taking the other's
        blk.norm1.eps, blk.norm2.eps = blk.norm2.eps, blk.norm1.eps
        assert _masks_matter(model(x), ref)
        blk.norm1.eps, blk.norm2.eps = blk.norm2.eps, blk.norm1.eps
    ids = _kept_ids(3, 17, 1, seed=30)
    pruned = original_order_reference(model, x, ids)
    assert _masks_matter(pruned, ref)
    for case in CASES:
        assert _close(build_fast_path(model, **case)(x), ref), case
        assert _close(build_fast_path(model, **case, kept_ids=ids)(x), pruned), case


@torch.no_grad()
def test_the_mlp_applies_the_models_exact_gelu():
    """timm's Mlp applies the exact (erf) GELU; its tanh approximation (cuBLAS's epilogue) differs by up to 5e-4
    on pre-activations of a few units, which the logits of a model of DeiT's initialisation (tiny weights, small
    pre-activations) do not show.  With the MLP's weights scaled up they do: the fp32 torch path agrees with
    the model to 5e-6 (the approximation is off by 3e-5 here)."""
    model = tiny_cc(20).cpu()
    for blk in model.blocks:
        blk.mlp.fc1.weight.mul_(25)
        blk.mlp.fc2.weight.mul_(10)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(20)))
    seen = []
    hook = model.blocks[0].mlp.act.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    x = images(seed=20).cpu()
    ref = model(x)
    hook.remove()
    h = seen[0]
    assert (F.gelu(h) - F.gelu(h, approximate='tanh')).abs().max().item() > 1e-4  # the two GELUs differ here
    fast = build_fast_path(model, backend='torch')
    assert (fast(x) - ref).abs().max().item() <= 5e-6 * max(1.0, ref.abs().max().item())


@torch.no_grad()
def test_residual_stream_in_half_precision():
    """residual_dtype=fp16: the buffer is stored in fp16, the logits stay within fp16 rounding of fp32.  The same
    path with an fp32 buffer runs the same kernels, so the two differ by the stream's rounding alone (about 1e-4
    here), which must show, or the fp16 buffer was never used.  (Against the eager model the fp32 path differs by
    float rounding alone on CPU, about 1e-7; on CUDA the Triton kernels' fp32 dots run in TF32, whose 10-bit
    mantissa is fp16's, so there it differs by as much as the fp16 buffer does.)"""
    model = tiny_cc(7)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(7)))
    x = images(seed=7)
    ref = model(x)
    scale = max(1.0, ref.abs().max().item())
    for case in CASES:
        fast = build_fast_path(model, **case, residual_dtype=torch.float16)
        assert fast.describe()['residual_dtype'] == 'float16', case
        assert fast.prefix_const.dtype == fast.patch_const.dtype == torch.float16, case
        ours = fast(x)
        in_fp32 = build_fast_path(model, **case)(x)
        stream = (ours - in_fp32).abs().max().item()
        diff = (ours - ref).abs().max().item()
        assert 1e-5 * scale < stream and diff <= 1e-2 * scale, (case, stream, diff)
        if not CUDA:
            assert 10 * (in_fp32 - ref).abs().max().item() < diff, case


@torch.no_grad()
def test_half_precision_products_leave_the_residual_stream_in_its_own_dtype():
    """dtype=fp16 rounds the products' operands, not the token buffer: every residual sum is stored in
    residual_dtype (fp32 by default).  Patch tokens that sit at 300 (a conv bias; each norm takes the mean off, so
    the blocks see what they saw without it) make the stream's rounding show: at 300 fp16 keeps steps of 0.25,
    coarser than what the blocks add, where fp32 keeps 3e-5.  So the fp16-products path with an fp32 stream
    agrees with the eager fp32 model within fp16 rounding of the products, and the same path with an fp16 stream
    (which must be off by far more, or the offset proved nothing) does not, dense and pruned, every case."""
    model = tiny_cc(33)
    model.patch_embed.proj.bias.add_(300.0)
    x = images(seed=33)
    for masks in (None, pruning.random_masks(3, 16, 0.3, generator=_gen(33))):
        if masks is not None:
            pruning.apply_masks(model, masks)
        ref = model(x)
        scale = max(1.0, ref.abs().max().item())
        for case in CASES:
            in_fp32 = build_fast_path(model, **case, dtype=torch.float16)(x)
            in_fp16 = build_fast_path(model, **case, dtype=torch.float16, residual_dtype=torch.float16)(x)
            assert (in_fp32 - ref).abs().max().item() <= 1e-3 * scale, (case, masks is None)
            assert (in_fp16 - ref).abs().max().item() > 5e-3 * scale, (case, masks is None)
    # the norm before the blocks (pre_norm=True) writes the buffer in the stream's dtype too, not the products'
    torch.manual_seed(33)
    model = VisionTransformer(**TINY, pre_norm=True).to(DEVICE).eval()
    ids = _kept_ids(3, 17, 1, seed=33)
    ref = original_order_reference(model, x, ids)
    for case in CASES:
        for residual in (torch.float32, torch.float16):
            fast = build_fast_path(model, **case, dtype=torch.float16, residual_dtype=residual, kept_ids=ids)
            assert fast.embed(x).dtype == residual, (case, residual)
            assert _close_in_fp16(fast(x), ref), (case, residual)


# ---------------------------------------------------------------------------------------------------------------
# the timed choice (on CUDA the build times every candidate; here the times are scripted)

@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('winner', ['triton', 'torch'])
def test_timed_choice_keeps_the_fastest_candidate_that_computes_the_right_thing(monkeypatch, winner):
    """What a CUDA build does with attention='auto', mlp='auto', run here with scripted times in fp16.  Each
    kind of choice has a candidate scripted fastest of all that is wrong: its output is off, or it raises.  It
    must be refused (no time recorded) and the fastest correct one kept, per kept count, for every block of that
    count.  The built path must then compute the model (and, when the chosen kernels are the first Triton
    tiles, exactly what those kernels forced compute; the forced build multiplies qkv and the projection by
    cuBLAS, so here their Triton tiles all fail, as tiles that do not fit: their choice has a test of its own)."""
    fast_att, wrong_att = (AttentionChoice('triton', tiles=t).label for t in K.ATTENTION_TILES[:2])
    fast_lin, wrong_lin = (ProductChoice('triton', tiles=t).label for t in K.LINEAR_TILES[:2])
    kept_att, kept_lin = (fast_att, fast_lin) if winner == 'triton' else ('sdpa-math', 'torch')
    script = {kept_att: 1.0, kept_lin: 1.0, wrong_att: 0.5, wrong_lin: 0.5}
    timed, refused = [], []

    def scripted(run, cand):
        run(cand)
        timed.append(cand.label)
        return script.get(cand.label, 2.0)

    run_attention, run_linear_gelu, run_linear = FP.run_attention, FP.run_linear_gelu, FP.run_linear
    run_linear_residual, patch_embed = FP.run_linear_residual, K.patch_embed_triton_

    def no_plain_tile(choice, *a):
        if choice.kind == 'triton':
            raise RuntimeError('out of resources')
        return run_linear(choice, *a)

    def wrong_attention(choice, *a, **kw):  # a tile that computes something else
        refused.append('attention') if choice.label == wrong_att else None
        return run_attention(choice, *a, **kw) + (choice.label == wrong_att)

    def wrong_gelu(choice, *a):
        refused.append('mlp') if choice.label == wrong_lin else None
        return run_linear_gelu(choice, *a) * (1.0 + (choice.label == wrong_lin))

    def failing_residual(choice, *a):  # a tile that does not fit, say
        if choice.label == wrong_lin:
            refused.append('fc2')
            raise RuntimeError('out of resources')
        return run_linear_residual(choice, *a)

    def failing_embed(*a, **kw):
        if tuple(a[6:]) == K.LINEAR_TILES[1]:
            refused.append('embed')
            raise RuntimeError('out of resources')
        return patch_embed(*a, **kw)

    monkeypatch.setattr(FP, '_times_on', lambda device: True)
    monkeypatch.setattr(FP, '_time_candidate', scripted)
    monkeypatch.setattr(FP, '_CHOICE_CACHE', {})
    monkeypatch.setattr(FP, 'run_attention', wrong_attention)
    monkeypatch.setattr(FP, 'run_linear_gelu', wrong_gelu)
    monkeypatch.setattr(FP, 'run_linear', no_plain_tile)
    monkeypatch.setattr(FP, 'run_linear_residual', failing_residual)
    monkeypatch.setattr(K, 'patch_embed_triton_', failing_embed)

    model = tiny_cc(8)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(8)))
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, batch_size=2)
    built = fast.describe()
    counts = sorted(set(built['kept_counts']))
    assert len(counts) > 1
    # the wrong ones ran once each (per kept count), were refused, and never timed
    assert sorted(refused) == sorted(['attention', 'mlp', 'fc2'] * len(counts) + ['embed'])
    assert wrong_att not in timed and wrong_lin not in timed
    for kind, kept, wrong in (('attention', kept_att, wrong_att), ('mlp', kept_lin, wrong_lin),
                              ('fc2', kept_lin, wrong_lin)):
        assert built[kind] == {str(n): kept for n in counts}, kind
        for n in counts:
            ms = built[f'{kind}_ms'][str(n)]
            assert ms[kept] == 1.0 and ms[wrong] is None, (kind, ms)
            assert sum(v is not None for v in ms.values()) >= 2, (kind, ms)  # others were timed, and slower
    assert built['patch_embedding'] == kept_lin and built['patch_embedding_ms'][wrong_lin] is None
    # and each refusal says why: the output off by how much, or what was raised
    for kind, wrong, why in (('attention', wrong_att, 'max |difference| '), ('mlp', wrong_lin, 'max |difference| '),
                             ('fc2', wrong_lin, 'RuntimeError: out of resources')):
        assert all(built['refused'][kind][str(n)][wrong].startswith(why) for n in counts), (kind, built['refused'])
    assert built['refused']['patch_embedding']['0'][wrong_lin] == 'RuntimeError: out of resources'
    for blk in fast.blocks:
        assert (blk.attention.label, blk.mlp.label, blk.fc2.label) == (kept_att, kept_lin, kept_lin)
        assert (blk.fc1_wt is not None, blk.fc2_wt is not None) == (winner == 'triton',) * 2
    x = images(seed=8)
    if winner == 'triton':  # the forced Triton build runs the first tiles too: the same kernels, the same bits
        forced = build_fast_path(model, backend='triton', dtype=torch.float16, attention='triton', mlp='triton')
        assert torch.equal(fast(x), forced(x))
    ref = model(x)  # and fp16 products stay within fp16 rounding of the fp32 eager model
    assert _close_in_fp16(fast(x), ref)


def _script_timings(monkeypatch, script, default=2.0):
    """The timed build on this device with scripted milliseconds: each candidate runs once as it would be timed,
    then counts ``script[label]`` (``default`` if unscripted); the choice cache is emptied first."""

    def scripted(run, cand):
        run(cand)
        return script.get(cand.label, default)
    monkeypatch.setattr(FP, '_times_on', lambda device: True)
    monkeypatch.setattr(FP, '_time_candidate', scripted)
    monkeypatch.setattr(FP, '_CHOICE_CACHE', {})


def _scripted_pruned_build(monkeypatch, script, seed, batch_size=2, backend='triton', dtype=torch.float16):
    """A tiny model pruned at random (``seed``) and its path (``backend``, products in ``dtype``) built with the
    timings scripted (:func:`_script_timings`): (model, path, its describe(), the distinct kept counts)."""
    _script_timings(monkeypatch, script)
    model = tiny_cc(seed)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(seed)))
    fast = build_fast_path(model, backend=backend, dtype=dtype, batch_size=batch_size)
    built = fast.describe()
    return model, fast, built, sorted(set(built['kept_counts']))


def _assert_fused_choice(built, counts, kind, tiles, kept, wrong):
    """A fused kind's timed choice at every kept count: ``kept`` chosen at its scripted 0.5 ms among 'torch' and
    every tile of ``tiles``, and ``wrong`` (scripted faster, its output off) refused, untimed."""
    assert built[kind] == {str(n): kept for n in counts}
    for n in counts:
        ms = built[f'{kind}_ms'][str(n)]
        assert set(ms) == {'torch'} | {ProductChoice('triton', tiles=t).label for t in tiles}
        assert ms[kept] == 0.5 and ms[wrong] is None
        assert built['refused'][kind][str(n)][wrong].startswith('max |difference| ')


@needs_triton
@torch.no_grad()
def test_each_block_runs_the_choice_timed_at_its_own_kept_count(monkeypatch):
    """Scripted times that differ by kept count: at the smallest count one attention tile and one fc1 tile are
    fastest, at every other count others.  Each block must run the choice of its own count (not the first one
    made, nor one count's for all), and describe() must say the same."""
    att = [AttentionChoice('triton', tiles=t).label for t in K.ATTENTION_TILES[:2]]
    lin = [ProductChoice('triton', tiles=t).label for t in K.LINEAR_TILES[:2]]
    now = {}
    choose_attention, choose_product = FP.choose_attention, FP.choose_product

    def attention_at(n, *a, **kw):
        now['n'] = n
        return choose_attention(n, *a, **kw)

    def product_at(rows, *a, **kw):
        now['n'] = rows // 2  # batch_size 2
        return choose_product(rows, *a, **kw)

    def scripted(run, cand):
        run(cand)
        first = now['n'] == smallest
        return {att[0]: 0.5 if first else 3.0, att[1]: 3.0 if first else 0.5,
                lin[0]: 0.5 if first else 3.0, lin[1]: 3.0 if first else 0.5}.get(cand.label, 2.0)
    model = tiny_cc(6)
    masks = pruning.random_masks(3, 16, 0.3, generator=_gen(6))
    pruning.apply_masks(model, masks)
    counts = [int(m.sum()) + 1 for m in masks]  # the patches kept and the class token, block by block
    assert counts == [11, 14, 12]  # the smallest first, then larger ones: not the order of a sorted dict
    counts = sorted(counts)
    smallest = counts[0]
    monkeypatch.setattr(FP, '_times_on', lambda device: True)
    monkeypatch.setattr(FP, '_time_candidate', scripted)
    monkeypatch.setattr(FP, '_CHOICE_CACHE', {})
    monkeypatch.setattr(FP, 'choose_attention', attention_at)
    monkeypatch.setattr(FP, 'choose_product', product_at)
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, batch_size=2)
    built = fast.describe()
    assert sorted(set(built['kept_counts'])) == counts
    for blk in fast.blocks:
        first = blk.n == smallest
        assert blk.attention.label == built['attention'][str(blk.n)] == att[0 if first else 1], blk.n
        assert blk.mlp.label == built['mlp'][str(blk.n)] == lin[0 if first else 1], blk.n
    x = images(seed=6)
    ref = model(x)
    assert _close_in_fp16(fast(x), ref)


@torch.no_grad()
def test_a_timed_build_of_the_torch_backend_offers_sdpa_alone(monkeypatch):
    """backend='torch' runs no Triton kernel: its timed attention choice is among SDPA's backends only."""
    _, _, built, _ = _scripted_pruned_build(monkeypatch, {'sdpa-math': 0.5}, seed=8, backend='torch')
    assert built['attention_ms'] and all(ms and all(label.startswith('sdpa-') for label in ms)
                                         for ms in built['attention_ms'].values()), built['attention_ms']
    assert set(built['attention'].values()) == {'sdpa-math'}


@needs_triton
@torch.no_grad()
def test_the_torch_backend_never_takes_an_attention_choice_timed_for_the_triton_backend(monkeypatch):
    """Timed choices are cached per shape for the process: a torch build after a Triton build of the same model and
    batch (scripted times, a Triton tile fastest there) must still choose among SDPA's backends, and run no Triton
    kernel (it is the backend that runs without Triton)."""
    tile = AttentionChoice('triton', tiles=K.ATTENTION_TILES[0]).label
    model, _, built, counts = _scripted_pruned_build(monkeypatch, {tile: 0.5, 'sdpa-math': 1.0}, seed=8)
    assert built['attention'] == {str(n): tile for n in counts}
    torch_path = build_fast_path(model, backend='torch', dtype=torch.float16, batch_size=2)
    assert torch_path.describe()['attention'] == {str(n): 'sdpa-math' for n in counts}
    monkeypatch.setattr(K, 'attention_triton', lambda *a, **kw: pytest.fail('a Triton kernel ran'))
    x = images(seed=8)
    ref = model(x)
    assert _close_in_fp16(torch_path(x), ref)


@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('backend, dtype', [('torch', torch.float16), ('triton', torch.float32)],
                         ids=['torch-fp16', 'triton-fp32'])
def test_a_timed_build_times_the_products_only_for_the_triton_backend_in_half_precision(monkeypatch, backend, dtype):
    """mlp='auto' times the products (the block's four, the fused kinds, the patch embedding) with the Triton
    backend in fp16 or bf16 only: the torch backend runs its own ops whatever would be chosen, and in fp32 the build
    takes cuBLAS untimed.  There (timed build, scripted times) the attention alone is timed; every product choice
    is 'torch', with no timings to report."""
    _, _, built, counts = _scripted_pruned_build(monkeypatch, {}, seed=8, backend=backend, dtype=dtype)
    assert built['attention_ms'] and all(built['attention_ms'].values())
    for kind in ('qkv', 'proj', 'mlp', 'fc2', 'proj_norm', 'mlp_residual', 'norm_qkv'):
        assert built[kind] == {str(n): 'torch' for n in counts} and not built[f'{kind}_ms'], (kind, built)
    assert built['patch_embedding'] == 'torch' and not built['patch_embedding_ms']


@torch.no_grad()
def test_a_timed_build_of_the_compile_backend_times_nothing(monkeypatch):
    """backend='compile' leaves the attention to what inductor makes of SDPA: a timed build (scripted times) chooses
    SDPA's own dispatch for every kept count, untimed, and no product either."""
    _, _, built, counts = _scripted_pruned_build(monkeypatch, {'sdpa-math': 0.5}, seed=8, backend='compile')
    assert built['attention'] == {str(n): 'sdpa-default' for n in counts} and not built['attention_ms'], built
    assert all(not built[f'{kind}_ms'] for kind in ('qkv', 'proj', 'mlp', 'fc2', 'patch_embedding')), built


@torch.no_grad()
def test_a_timed_build_times_at_the_batch_size_it_is_given_or_64(monkeypatch):
    """The build times its candidates at ``batch_size`` images, 64 where none is given (the docstring's default):
    each distinct kept count's attention is timed once, on a (batch, n, 3C) operand of that batch."""
    timed, real = [], FP.choose_attention

    def recording(n, batch, *args, **kwargs):
        timed.append((n, batch))
        return real(n, batch, *args, **kwargs)
    monkeypatch.setattr(FP, 'choose_attention', recording)
    _script_timings(monkeypatch, {})
    model = tiny_cc(8)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(8)))
    counts = sorted(set(models.kept_token_counts(model)))
    for batch_size, batch in ((None, 64), (5, 5)):
        timed.clear()
        build_fast_path(model, backend='torch', batch_size=batch_size)
        assert sorted(timed) == [(n, batch) for n in counts], batch_size


@torch.no_grad()
def test_row_pads_add_at_most_an_eighth_of_the_rows():
    """A product is timed padded by each of 64, 128, 256, 512 and 1024 rows that is at most an eighth of its real
    rows (so none at 511 rows, 64 from 512, all five from 8192), and unpadded always."""
    for rows, pads in ((1, [0]), (511, [0]), (512, [0, 64]), (1023, [0, 64]), (1024, [0, 64, 128]),
                       (4095, [0, 64, 128, 256]), (4096, [0, 64, 128, 256, 512]), (8191, [0, 64, 128, 256, 512]),
                       (8192, [0, 64, 128, 256, 512, 1024]), (10 ** 6, [0, 64, 128, 256, 512, 1024])):
        assert FP.row_pads(rows) == pads, rows


@needs_triton
@torch.no_grad()
def test_timed_patch_embedding_offers_its_own_tiles(monkeypatch):
    """The patch embedding's timed choice (scripted times, fp16) offers cuBLAS on the unfolded patches and every
    tile of K.PATCH_EMBED_TILES, the 32-column-step ones included, and keeps the fastest; the path then computes
    the model with it, within fp16 rounding of the fp32 eager model."""
    labels = [ProductChoice('triton', tiles=t).label for t in K.PATCH_EMBED_TILES]
    fastest = labels[-1]
    model, fast, built, _ = _scripted_pruned_build(monkeypatch, {fastest: 0.5}, seed=8)
    assert set(built['patch_embedding_ms']) == {'torch', *labels} and len(labels) == len(set(labels))
    assert built['patch_embedding'] == fastest and built['patch_embedding_ms'][fastest] == 0.5
    x = images(seed=8)
    ref = model(x)
    assert _close_in_fp16(fast(x), ref)


@needs_triton
@torch.no_grad()
def test_timed_patch_embedding_of_a_model_with_a_norm_before_the_blocks(monkeypatch):
    """With pre_norm=True (CLIP's ViTs) the patch embedding's candidates write the buffer after norm_pre, so their
    reference is normalised too: the tile scripted fastest is kept, no candidate refused, and the path computes
    the model within fp16 rounding."""
    fastest = ProductChoice('triton', tiles=K.PATCH_EMBED_TILES[-1]).label
    _script_timings(monkeypatch, {fastest: 0.5})
    torch.manual_seed(34)
    model = randomise_affine(VisionTransformer(**TINY, pre_norm=True), 34).to(DEVICE).eval()
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, batch_size=2)
    built = fast.describe()
    assert built['patch_embedding'] == fastest and built['patch_embedding_ms'][fastest] == 0.5
    assert 'patch_embedding' not in built['refused'], built['refused']
    x = images(seed=34)
    ref = model(x)
    assert _close_in_fp16(fast(x), ref)


@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('fc1', ['padded', 'triton'])
def test_timed_build_can_pad_the_rows_of_a_product(monkeypatch, fc1):
    """Where cuBLAS is faster on a few more rows (its heuristic picks a slow kernel at some row counts), the timed
    build keeps the padded product: the kernel before it (a norm, the attention) writes the B*n real rows into a
    longer buffer and the product runs on all of it.  fc2 is offered its operand's padding only when fc1 ran
    padded (its output then has those rows).  The padding rows are never initialised (NaN here) and never reach
    the logits; at another batch size than the timed one nothing is padded."""
    assert FP.row_pads(256 * 133) == [0, 64, 128, 256, 512, 1024] and FP.row_pads(32 * 143) == [0, 64, 128, 256, 512]
    assert FP.row_pads(143) == [0]  # batch 1: nothing worth an eighth more rows
    monkeypatch.setattr(FP, 'ROW_PADS', (2, 4, 64))
    padded, fused = ProductChoice('torch', pad=4).label, ProductChoice('triton', tiles=K.LINEAR_TILES[0]).label
    assert padded == 'torch+4rows'
    script = {padded: 0.5, 'torch': 1.0, fused: 0.25 if fc1 == 'triton' else 2.0}
    model, fast, built, counts = _scripted_pruned_build(monkeypatch, script, seed=11, batch_size=4)
    plain = build_fast_path(model, backend='triton', dtype=torch.float16, attention='sdpa',  # the same, unpadded
                            mlp='torch' if fc1 == 'padded' else 'triton')
    mlp = padded if fc1 == 'padded' else fused  # (the Triton tile, scripted fastest, wins qkv and proj as well)
    for kind, kept in (('qkv', mlp), ('proj', mlp), ('mlp', mlp), ('fc2', mlp)):
        assert built[kind] == {str(n): kept for n in counts}, kind
        offered = {'torch', padded} | ({'torch+2rows'} if kind != 'fc2' else set())
        for n in counts:
            assert (offered <= set(built[f'{kind}_ms'][str(n)])) == (kind != 'fc2' or fc1 == 'padded'), kind
    assert not any(set(ms) & {'torch+2rows', 'torch+64rows'} for ms in built['fc2_ms'].values())
    rows, real_rows = [], FP.FastViT._rows

    def nan_padded_rows(self, x, n, pad, width=None):
        buf, y = real_rows(self, x, n, pad, width)
        buf.fill_(float('nan'))  # what the kernel before the product does not write stays NaN
        rows.append(buf.shape[0] - x.shape[0] * n)
        return buf, y

    monkeypatch.setattr(FP.FastViT, '_rows', nan_padded_rows)
    for batch, pads in ((4, [4 if fc1 == 'padded' else 0] * 3), (3, [0, 0, 0])):
        rows.clear()
        x = images(batch, seed=11)
        ours = fast(x)
        assert rows == pads * len(built['kept_counts']), (batch, rows)  # qkv's, proj's and fc1's operands
        assert torch.isfinite(ours).all() and _close(ours, plain(x)), batch


@needs_triton
@torch.no_grad()
def test_timed_build_can_run_qkv_and_the_projection_by_the_triton_product(monkeypatch):
    """qkv and the attention's projection are also timed as the Triton product kernel without an epilogue (every
    tile of K.LINEAR_TILES, beside cuBLAS on the real and on padded rows): a tile scripted fastest is kept for
    both at every kept count, a faster one that computes something else is refused, untimed, and the forward then
    runs that kernel for both products of every block (their weights transposed once, at build), within fp16
    rounding of the fp32 eager model."""
    kept, wrong = (ProductChoice('triton', tiles=t).label for t in (K.LINEAR_TILES[-1], K.LINEAR_TILES[-2]))
    real = FP.run_linear
    monkeypatch.setattr(FP, 'run_linear', lambda choice, *a: real(choice, *a) + (choice.label == wrong))
    model, fast, built, counts = _scripted_pruned_build(monkeypatch, {kept: 0.5, wrong: 0.25}, seed=12)
    tiles = {ProductChoice('triton', tiles=t).label for t in K.LINEAR_TILES}
    for kind in ('qkv', 'proj'):
        assert built[kind] == {str(n): kept for n in counts}, kind
        for n in counts:
            ms = built[f'{kind}_ms'][str(n)]
            assert {'torch'} | tiles <= set(ms) and ms[kept] == 0.5 and ms[wrong] is None, (kind, ms)
            assert built['refused'][kind][str(n)][wrong].startswith('max |difference| ')
    running = [blk for blk in fast.blocks if blk.n]
    assert all(blk.qkv_wt is not None and blk.proj_wt is not None for blk in running)
    ran, plain = [], K.linear_triton
    monkeypatch.setattr(K, 'linear_triton', lambda y, wt, *a, **kw: ran.append(tuple(wt.shape)) or plain(y, wt, *a,
                                                                                                       **kw))
    x = images(seed=12)
    ours = fast(x)
    C = model.embed_dim
    assert sorted(ran) == sorted([(C, 3 * C), (C, C)] * len(running))
    ref = model(x)
    assert _close_in_fp16(ours, ref)


@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('flaw', ['norm', 'residual'])
@pytest.mark.parametrize('winner', ['fused', 'torch'])
def test_timed_build_can_fuse_the_projection_with_the_residual_and_norm(monkeypatch, winner, flaw):
    """Rows of at most 256 channels: the timed build also times the attention's projection, its residual update
    and the second norm as one kernel (each tile of K.row_tiles) against cuBLAS as chosen for the projection and
    the residual-norm kernel ('torch'), and keeps the fastest that computes the right thing: a tile scripted
    fastest of all that computes something else (a wrong norm output, or the right one with the residual rows
    left as they were: both are the kernel's results) is refused.  Fused or not, the path computes the model."""
    fused, wrong = (ProductChoice('triton', tiles=t).label for t in K.row_tiles(64)[:2])
    kept = fused if winner == 'fused' else 'torch'
    script = {kept: 0.5, wrong: 0.25}
    run_proj_norm, refused = FP.run_proj_norm, []

    def wrong_tile(proj, choice, *a, **kw):
        if choice.label != wrong:
            return run_proj_norm(proj, choice, *a, **kw)
        refused.append(choice.label)
        x, ids = a[0], a[1]
        before = x.index_select(1, ids)
        y = run_proj_norm(proj, choice, *a, **kw)
        if flaw == 'residual':  # the norm of the updated rows, but the update not written back
            x.index_copy_(1, ids, before)
            return y
        return y * 2.0

    monkeypatch.setattr(FP, 'run_proj_norm', wrong_tile)
    model, fast, built, counts = _scripted_pruned_build(monkeypatch, script, seed=12)
    _assert_fused_choice(built, counts, 'proj_norm', K.row_tiles(64), kept, wrong)
    assert sorted(refused) == [wrong] * len(counts)
    # the second MLP product is offered the row-spanning tiles too, beside its usual ones
    offered = {ProductChoice('triton', tiles=t).label for t in K.LINEAR_TILES + tuple(K.row_tiles(64))}
    assert all(offered <= set(built['fc2_ms'][str(n)]) for n in counts)
    for blk in fast.blocks:
        assert blk.proj_norm.label == kept and (blk.proj_wt is not None) == (winner == 'fused')
    x = images(seed=12)
    ref = model(x)
    assert _close_in_fp16(fast(x), ref)
    monkeypatch.setattr(FP, 'run_proj_norm', run_proj_norm)  # the forward runs what was chosen, not the stand-in
    launches, fused_kernel = [], K.linear_residual_layer_norm_triton_
    monkeypatch.setattr(K, 'linear_residual_layer_norm_triton_', lambda *a, **kw: launches.append(1) or
                        fused_kernel(*a, **kw))
    assert _close_in_fp16(fast(x), ref)
    assert len(launches) == (sum(n > 0 for n in built['kept_counts']) if winner == 'fused' else 0)
    # an untimed build (CPU, or mlp='torch') never fuses: the choice is 'torch' and the projection cuBLAS's
    plain = build_fast_path(model, backend='triton', dtype=torch.float16, attention='sdpa', mlp='torch')
    assert set(plain.describe()['proj_norm'].values()) == {'torch'}


@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('winner', ['one kernel', 'torch'])
def test_timed_build_can_run_the_whole_mlp_as_one_kernel(monkeypatch, winner):
    """Rows of at most 256 channels: the timed build also times the whole MLP with its residual update as one
    kernel (each tile of K.mlp_tiles) against its two products as chosen ('torch'), and keeps the fastest that
    computes the right thing: a tile scripted fastest of all that writes other rows' values is refused.  The
    forward then launches the one kernel per block (and neither product's kernel) or the products as chosen, and
    computes the model either way; an untimed build never takes it."""
    fused, wrong = (ProductChoice('triton', tiles=t).label for t in K.mlp_tiles(64)[:2])
    kept = fused if winner == 'one kernel' else 'torch'
    script = {kept: 0.5, wrong: 0.25}
    run_mlp_residual, refused = FP.run_mlp_residual, []

    def wrong_tile(fc1, fc2, choice, x, *a):
        out = run_mlp_residual(fc1, fc2, choice, x, *a)
        if choice.label == wrong:
            refused.append(choice.label)
            x.mul_(1.5)  # every row scaled: a kernel that also wrote where it should not have
        return out

    monkeypatch.setattr(FP, 'run_mlp_residual', wrong_tile)
    model, fast, built, counts = _scripted_pruned_build(monkeypatch, script, seed=13)
    _assert_fused_choice(built, counts, 'mlp_residual', K.mlp_tiles(64), kept, wrong)
    assert sorted(refused) == [wrong] * len(counts)
    for blk in fast.blocks:
        assert blk.mlp_residual.label == kept
        assert (blk.fc1_wt is not None and blk.fc2_wt is not None) or winner == 'torch'
    monkeypatch.setattr(FP, 'run_mlp_residual', run_mlp_residual)  # the forward runs what was chosen
    x = images(seed=13)
    ref = model(x)
    launches = []
    for name in ('mlp_residual_scatter_triton_', 'linear_gelu_triton', 'linear_residual_scatter_triton_',
                 'residual_scatter_triton_'):
        kernel = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _k=kernel, _n=name, **kw: launches.append(_n) or _k(*a, **kw))
    monkeypatch.setattr(FP.F, 'gelu', lambda *a, _g=F.gelu, **kw: launches.append('torch gelu') or _g(*a, **kw))
    assert _close_in_fp16(fast(x), ref)
    blocks = sum(n > 0 for n in built['kept_counts'])
    if winner == 'one kernel':
        assert launches == ['mlp_residual_scatter_triton_'] * blocks
    else:  # fc1 + GELU (Triton's, or cuBLAS and torch's GELU), then fc2 + residual (one kernel, or the scatter's)
        firsts = {'linear_gelu_triton', 'torch gelu'}
        seconds = {'linear_residual_scatter_triton_', 'residual_scatter_triton_'}
        assert [k in firsts for k in launches[::2]] == [k in seconds for k in launches[1::2]] == [True] * blocks
    plain = build_fast_path(model, backend='triton', dtype=torch.float16, attention='sdpa', mlp='torch')
    assert set(plain.describe()['mlp_residual'].values()) == {'torch'}


@needs_triton
@torch.no_grad()
@pytest.mark.parametrize('winner', ['one kernel', 'torch'])
def test_timed_build_can_run_the_first_norm_and_qkv_as_one_kernel(monkeypatch, winner):
    """Rows of at most 256 channels: the timed build also times the first norm and the qkv product as one kernel
    (each tile of K.norm_linear_tiles) against the gather-norm kernel and qkv as chosen ('torch'), and keeps the
    fastest that computes the right thing (a tile scripted fastest of all whose output is off is refused); the
    forward then launches the one kernel per block instead of the two, and computes the model either way; an
    untimed build never takes it."""
    fused, wrong = (ProductChoice('triton', tiles=t).label for t in K.norm_linear_tiles(64)[:2])
    kept = fused if winner == 'one kernel' else 'torch'
    script = {kept: 0.5, wrong: 0.25}
    run_norm_qkv = FP.run_norm_qkv

    def wrong_tile(qkv, choice, *a):
        out = run_norm_qkv(qkv, choice, *a)
        return out * 1.01 if choice.label == wrong else out

    monkeypatch.setattr(FP, 'run_norm_qkv', wrong_tile)
    model, fast, built, counts = _scripted_pruned_build(monkeypatch, script, seed=14)
    _assert_fused_choice(built, counts, 'norm_qkv', K.norm_linear_tiles(64), kept, wrong)
    for blk in fast.blocks:
        assert blk.norm_qkv.label == kept and (blk.qkv_wt is not None) == (winner == 'one kernel')
    monkeypatch.setattr(FP, 'run_norm_qkv', run_norm_qkv)  # the forward runs what was chosen
    x = images(seed=14)
    ref = model(x)
    launches = []
    for name in ('gather_layer_norm_linear_triton', 'gather_layer_norm_triton'):
        kernel = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _k=kernel, _n=name, **kw: launches.append(_n) or _k(*a, **kw))
    assert _close_in_fp16(fast(x), ref)
    blocks = sum(n > 0 for n in built['kept_counts'])
    one = winner == 'one kernel'  # (and the final norm on the tokens the head reads: the gather-norm kernel)
    assert launches == ['gather_layer_norm_linear_triton' if one else 'gather_layer_norm_triton'] * blocks + [
        'gather_layer_norm_triton']
    plain = build_fast_path(model, backend='triton', dtype=torch.float16, attention='sdpa', mlp='torch')
    assert set(plain.describe()['norm_qkv'].values()) == {'torch'}


def test_on_a_gpu_the_cuda_only_tests_run_first(monkeypatch):
    """A GPU session's time limit may cut the run: the tests that only a GPU can run go first (conftest), in
    their own order, then the others in theirs; elsewhere nothing moves."""
    import conftest

    class Item:
        def __init__(self, name, *marks):
            self.name, self.marks = name, marks

        def iter_markers(self):
            return iter(self.marks)

    gpu, other = cuda_only.mark, pytest.mark.skipif(False, reason='another reason').mark
    names = lambda items: [item.name for item in items]  # noqa: E731
    items = [Item('a'), Item('b', gpu), Item('c', other), Item('d', other, gpu), Item('e')]
    for available, expected in ((False, 'abcde'), (True, 'bdace')):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: available)
        conftest.pytest_collection_modifyitems(None, items)
        assert names(items) == list(expected)
        items.sort(key=lambda item: item.name)


def test_cudnn_attention_is_a_candidate_only_at_multiples_of_128_tokens():
    """PyTorch later turned cuDNN attention off at other lengths (trouble in CUDA-graph captures); a failed
    capture would leave torch 2.11's allocator unusable, so the build never tries it there."""
    from torch.nn.attention import SDPBackend
    if not hasattr(SDPBackend, 'CUDNN_ATTENTION'):
        pytest.skip('this torch has no cuDNN attention backend')
    for n, offered in ((197, False), (148, False), (128, True), (256, True)):
        labels = [c.label for c in FP_attention_candidates(n, 64, with_triton=False)]
        assert ('sdpa-cudnn_attention' in labels) == offered, (n, labels)
        assert {'sdpa-flash_attention', 'sdpa-efficient_attention', 'sdpa-math'} <= set(labels)


@needs_triton
@torch.no_grad()
def test_timed_build_skips_blocks_that_keep_nothing(monkeypatch):
    """A block that keeps no token does not run, so nothing is chosen (or timed) for it: on CUDA timing it would
    compare empty tensors.  The timed build (scripted times) computes what the torch formulation computes."""
    counts = []

    def scripted(run, cand):
        run(cand)
        return 1.0

    real_choose = FP.choose_attention
    monkeypatch.setattr(FP, '_times_on', lambda device: True)
    monkeypatch.setattr(FP, '_time_candidate', scripted)
    monkeypatch.setattr(FP, '_CHOICE_CACHE', {})
    monkeypatch.setattr(FP, 'choose_attention', lambda n, *a, **kw: counts.append(n) or real_choose(n, *a, **kw))
    model = tiny_cc(10)
    ids = [torch.arange(17), torch.tensor([], dtype=torch.int64), torch.tensor([0, 3, 5, 9])]
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, kept_ids=ids, batch_size=2)
    assert sorted(counts) == [4, 17] and sorted(fast.attention_choices) == [4, 17]
    assert sorted(fast.mlp_choices) == sorted(fast.fc2_choices) == [4, 17]
    x = images(seed=10)
    plain = build_fast_path(model, backend='torch', kept_ids=ids)
    assert _close_in_fp16(fast(x), plain(x))


@pytest.mark.parametrize('kwargs,what', [
    (dict(qk_norm=True), 'qk_norm is not supported'),
    (dict(act_layer='gelu_tanh'), 'only exact-erf GELU'),
    # a GELU subclass with a forward of its own (doubled): the path would compute plain GELU, not it
    (dict(act_layer=type('DoubledGELU', (torch.nn.GELU,), {'forward': lambda self, x: 2 * F.gelu(x)})),
     r'DoubledGELU\(approximate=.none.\) \(only exact-erf GELU\)'),
    (dict(norm_layer='rmsnorm'), 'only LayerNorm'),
    # a LayerNorm subclass that applies an activation (ReLU) after the norm: not the norm the path computes
    (dict(norm_layer=timm.layers.norm_act.LayerNormAct), r'LayerNormAct \(only LayerNorm'),
    # timm's hybrid ViTs: a CNN backbone (here one strided conv) before the patch projection, which the path skips
    (dict(patch_size=1, embed_layer=functools.partial(timm.layers.HybridEmbed, backbone=torch.nn.Conv2d(3, 16, 4, 4))),
     r'a HybridEmbed patch embedding \(only timm PatchEmbed\)'),
    # timm's convolution drops the 4 pixels past the last whole 8x8 patch; the unfolded product cannot
    (dict(img_size=36), r'an image size \(\(36, 36\)\) that is not a multiple of the patch size \(\(8, 8\)\)'),
])
def test_unsupported_models_are_refused_at_build_time(kwargs, what):
    model = VisionTransformer(**{**TINY, **kwargs}).eval()
    model(torch.randn(1, 3, *model.patch_embed.img_size))  # the eager model runs
    for backend in ('torch', 'triton'):
        with pytest.raises(ValueError, match=what):
            build_fast_path(model, backend=backend)


def _gate_block_1(model):
    model.blocks[1].attn.gate = torch.nn.Linear(64, 64)  # timm's Attention(gated=True): a sigmoid gate on its output


def _tanh_gelu_in_block_1(model):
    model.blocks[1].mlp.act = torch.nn.GELU(approximate='tanh')  # torch's own GELU module, approximated


def _rms_norm_pre(model):
    model.norm_pre = timm.layers.RmsNorm(64)


def _rms_final_norm(model):
    model.norm = timm.layers.RmsNorm(64)


@torch.no_grad()
@pytest.mark.parametrize('kwargs, change, what', [
    (dict(scale_attn_norm=True), None, r'blocks\.0\.attn: scale_norm is not supported'),
    (dict(scale_mlp_norm=True), None, r'blocks\.0\.mlp\.norm: a norm inside the MLP is not supported'),
    ({}, _gate_block_1, r'blocks\.1\.attn: a gated attention is not supported'),
    ({}, _tanh_gelu_in_block_1, r"blocks\.1\.mlp\.act: GELU\(approximate='tanh'\) \(only exact-erf GELU\)"),
    ({}, _rms_norm_pre, r'norm_pre: RmsNorm \(only LayerNorm or Identity\) is not supported'),
    ({}, _rms_final_norm, r'norm: RmsNorm \(only LayerNorm or Identity\) is not supported'),
], ids=['scale_attn_norm', 'scale_mlp_norm', 'gated', 'tanh_gelu', 'rms_norm_pre', 'rms_final_norm'])
def test_parts_the_path_leaves_out_or_computes_otherwise_are_refused_at_build_time(kwargs, change, what):
    """What timm's modules compute beyond the path's formulation, where the blocks and norms around them are ones it
    computes: a norm of the attention's output (scale_attn_norm) or of the MLP's hidden activation
    (scale_mlp_norm), a gate on the attention's output, torch's GELU module with the tanh approximation (not
    timm's GELUTanh, the case above), a norm_pre or a final norm other than LayerNorm.  The path would leave each
    out, or compute the exact GELU or a LayerNorm in its place, so each is refused at build time by both
    backends (the eager model runs it)."""
    torch.manual_seed(32)
    model = VisionTransformer(**{**TINY, **kwargs})
    if change is not None:
        change(model)
    model = model.to(DEVICE).eval()
    assert model(images(seed=32)).shape == (3, 10)
    for backend in ('torch', 'triton'):
        with pytest.raises(ValueError, match=what):
            build_fast_path(model, backend=backend)


@torch.no_grad()
def test_an_attention_scale_of_its_own_is_refused_at_build_time():
    """timm's fused attention (SDPA, the default) ignores attn.scale and its unfused one applies it: the eager
    model's result with another scale depends on that switch, so the path refuses the model rather than choose."""
    torch.manual_seed(25)
    model = VisionTransformer(**TINY).to(DEVICE).eval()
    model.blocks[1].attn.scale = 0.5
    what = r'blocks\.1\.attn: a scale \(0\.5\) other than head_dim \*\* -0\.5 is not supported'
    for backend in ('torch', 'triton'):
        with pytest.raises(ValueError, match=what):
            build_fast_path(model, backend=backend)


class _TemperedAttention(timm.layers.attention.Attention):
    """timm's attention, its output doubled: a forward of its own."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class _HalvedBlock(timm.models.vision_transformer.Block):
    """timm's block, its output halved: a forward of its own."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 0.5 * super().forward(x, attn_mask=attn_mask, is_causal=is_causal)


class _OffsetLayerScale(timm.layers.LayerScale):
    """timm's LayerScale plus an offset per channel: a forward of its own."""

    def forward(self, x):
        return x * self.gamma + torch.arange(x.shape[-1], dtype=x.dtype, device=x.device)


class _DoubledLinear(torch.nn.Linear):
    """torch's Linear, its output doubled: a forward of its own (as a LoRA adapter's is, around the weight)."""

    def forward(self, x):
        return 2 * super().forward(x)


@torch.no_grad()
@pytest.mark.parametrize('convert', [False, True], ids=['timm', 'clip_concat'])
@pytest.mark.parametrize('part, what', [
    ('attn', r'blocks\.0\.attn: _TemperedAttention \(only timm Attention\)'),
    ('block', r'blocks\.0: a block with the forward of _HalvedBlock \(only timm Block\)'),
    ('ls', r'blocks\.0\.ls1: _OffsetLayerScale \(only LayerScale or Identity\)'),
    ('qkv', r'blocks\.0\.attn\.qkv: _DoubledLinear \(only torch Linear\)'),
    ('fc2', r'blocks\.0\.mlp\.fc2: _DoubledLinear \(only torch Linear\)'),
], ids=['attention', 'block', 'layer_scale', 'qkv', 'fc2'])
def test_subclasses_with_a_forward_of_their_own_are_refused_at_build_time(part, what, convert):
    """Subclasses pass an isinstance check but compute something else, which the path (computing timm's
    modules) would ignore without a word; one that only changes the construction (NarrowAttention) is accepted."""
    torch.manual_seed(23)
    kwargs = {'attn': dict(attn_layer=_TemperedAttention), 'block': dict(block_fn=_HalvedBlock),
              'ls': dict(init_values=0.5)}.get(part, {})
    model = VisionTransformer(**{**TINY, **kwargs})
    if part == 'ls':
        for blk in model.blocks:
            blk.ls1 = _OffsetLayerScale(blk.ls1.gamma.numel(), init_values=0.5)
    for parent, name in (('attn', 'qkv'), ('mlp', 'fc2')):
        if part == name:  # the same weights in a Linear that doubles its output
            parent = getattr(model.blocks[0], parent)
            plain_linear = getattr(parent, name)
            setattr(parent, name, _DoubledLinear(plain_linear.in_features, plain_linear.out_features))
            getattr(parent, name).load_state_dict(plain_linear.state_dict())
    plain = VisionTransformer(**{**TINY, 'init_values': 0.5 if part == 'ls' else None})
    _refused_at_build(model, plain, what, convert, seed=23)


def _refused_at_build(model, plain, what, convert, seed):
    """``model`` (a subclass computing otherwise than ``plain``, timm's, with the same weights), or its Clip &
    Concat conversion with random masks, is refused by both backends' builds with ``what``."""
    model, plain = model.to(DEVICE).eval(), plain.to(DEVICE).eval()
    plain.load_state_dict(model.state_dict())
    x = images(seed=seed)
    assert not _close(model(x), plain(x))  # the subclass does change the result
    if convert:
        models.apply_clip_concat(model)
        pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(seed)))
    for backend in ('torch', 'triton'):
        with pytest.raises(ValueError, match=what):
            build_fast_path(model, backend=backend)


class _StandardisedConv(torch.nn.Conv2d):
    """A strided convolution whose weight is standardised as it runs (as timm's StdConv2dSame): a convolution of
    its own, though it has torch's kernel, stride and padding."""

    def _conv_forward(self, x, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / (weight.std((1, 2, 3), keepdim=True) + 1e-6)
        return super()._conv_forward(x, w, bias)


@torch.no_grad()
@pytest.mark.parametrize('convert', [False, True], ids=['timm', 'clip_concat'])
def test_a_patch_convolution_of_its_own_is_refused_at_build_time(convert):
    torch.manual_seed(26)
    model = VisionTransformer(**TINY)
    proj = model.patch_embed.proj
    model.patch_embed.proj = _StandardisedConv(3, proj.out_channels, proj.kernel_size, stride=proj.stride)
    model.patch_embed.proj.load_state_dict(proj.state_dict())
    _refused_at_build(model, VisionTransformer(**TINY), r'patch_embed\.proj: _StandardisedConv \(only torch Conv2d\)',
                      convert, seed=26)


@torch.no_grad()
@pytest.mark.parametrize('convert', [False, True], ids=['timm', 'clip_concat'])
@pytest.mark.parametrize('kind, what', [
    ('stride', r'a patch embedding other than a stride=kernel Conv2d without padding is not supported'),
    ('padding', r'a patch embedding other than a stride=kernel Conv2d without padding is not supported'),
    ('groups', r'a patch embedding other than a stride=kernel Conv2d without padding is not supported'),
    ('norm', r'patch_embed\.norm is not supported'),
], ids=['stride', 'padding', 'groups', 'norm'])
def test_a_patch_embedding_other_than_whole_patches_times_a_matrix_is_refused_at_build_time(kind, what, convert):
    """The path embeds the patches as one product: each p x p patch, unfolded, times the conv weight reshaped to
    (C, 3*p*p), written straight into the token buffer.  timm's PatchEmbed runs other convolutions just as well,
    each giving the same 4 x 4 grid here (so the eager model runs): a 4x4 kernel every 8 pixels (a corner of
    each patch), an 8x8 kernel every 8 pixels of an image padded by 2 (patches shifted across their borders), a
    grouped one (each output channel reads one colour); and a norm after the projection (embed_norm_layer), which
    the path would skip.  Each is refused at build time, by both backends."""
    torch.manual_seed(31)
    if kind == 'norm':
        model = VisionTransformer(**TINY, embed_norm_layer='layernorm')
        assert isinstance(model.patch_embed.norm, torch.nn.LayerNorm)
    elif kind == 'groups':  # (a width the three colours divide)
        model = VisionTransformer(**{**TINY, 'embed_dim': 96, 'num_heads': 3})
        model.patch_embed.proj = torch.nn.Conv2d(3, 96, 8, stride=8, groups=3)
    else:
        model = VisionTransformer(**TINY)
        model.patch_embed.proj = (torch.nn.Conv2d(3, 64, 4, stride=8) if kind == 'stride' else
                                  torch.nn.Conv2d(3, 64, 8, stride=8, padding=2))
    model = model.to(DEVICE).eval()
    assert model(images(seed=31)).shape == (3, 10)  # the eager model runs it
    if convert:
        models.apply_clip_concat(model)
        pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(31)))
    for backend in ('torch', 'triton'):
        with pytest.raises(ValueError, match=what):
            build_fast_path(model, backend=backend)


@torch.no_grad()
@pytest.mark.parametrize('convert', [False, True], ids=['timm', 'clip_concat'])
@pytest.mark.parametrize('where, pre', [('blocks.1', False), ('blocks.0.mlp.fc1', True), ('', False)],
                         ids=['block', 'fc1-pre', 'model'])
def test_a_forward_hook_the_path_would_skip_is_refused_at_build_time(where, pre, convert):
    """The path calls none of the modules it computes (nor the model), so a hook that changes their input or
    output would be skipped without a word."""
    torch.manual_seed(27)
    model = VisionTransformer(**TINY)
    module = model.get_submodule(where)
    if pre:
        module.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    else:
        module.register_forward_hook(lambda m, args, out: 2 * out)
    _refused_at_build(model, VisionTransformer(**TINY), rf'a forward hook on {where or "the model"} is not supported',
                      convert, seed=27)


@torch.no_grad()
def test_clip_concats_own_hook_is_accepted():
    """A Clip & Concat model without a position embedding checks the patch count in a hook on its patch embedding;
    the path checks the image size itself."""
    torch.manual_seed(28)
    model = models.apply_clip_concat(VisionTransformer(**TINY, pos_embed='none')).to(DEVICE).eval()
    assert model.patch_embed._forward_hooks
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(28)))
    x = images(seed=28)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


class _ProbabilitiesViT(VisionTransformer):
    """A VisionTransformer with a forward of its own: probabilities instead of logits."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return super().forward(x, attn_mask=attn_mask, is_causal=is_causal).softmax(-1)


class _ScaledFeaturesViT(VisionTransformer):
    """A VisionTransformer with a forward_features of its own: the features doubled before the head."""

    def forward_features(self, x, attn_mask=None, is_causal=False):
        return 2 * super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)


@torch.no_grad()
@pytest.mark.parametrize('convert', [False, True], ids=['timm', 'clip_concat'])
@pytest.mark.parametrize('cls, what', [
    (_ProbabilitiesViT, r'a forward of its own \(_ProbabilitiesViT\.forward; only timm VisionTransformer'),
    (_ScaledFeaturesViT, r'a forward_features of its own \(_ScaledFeaturesViT\.forward_features; only timm'),
], ids=['forward', 'forward_features'])
def test_models_with_a_forward_of_their_own_are_refused_at_build_time(cls, what, convert):
    """The path computes timm's embedding, blocks and norm and calls the head: a model class that computes its
    output or its features otherwise would get timm's result without a word."""
    torch.manual_seed(29)
    _refused_at_build(cls(**TINY), VisionTransformer(**TINY), what, convert, seed=29)


@torch.no_grad()
def test_layer_norm_subclasses_that_compute_the_norm_are_accepted():
    """timm's own LayerNorm and LayerNormFp32 (the norm computed in fp32, which the path does anyway)."""
    x = images(seed=17)
    for norm_layer in (timm.layers.LayerNorm, timm.layers.LayerNormFp32):
        torch.manual_seed(17)
        model = VisionTransformer(**TINY, norm_layer=norm_layer).to(DEVICE).eval()
        assert _close(build_fast_path(model, backend='torch')(x), model(x)), norm_layer


@torch.no_grad()
def test_timms_own_exact_gelu_is_accepted():
    """act_layer='gelu' gives timm's GELU module (F.gelu, the exact erf GELU), not torch's nn.GELU."""
    torch.manual_seed(19)
    model = VisionTransformer(**TINY, act_layer='gelu').to(DEVICE).eval()
    assert type(model.blocks[0].mlp.act) is timm.layers.activations.GELU
    x = images(seed=19)
    for case in CASES:
        assert _close(build_fast_path(model, **case)(x), model(x)), case


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_attention_narrower_than_the_model(case):
    torch.manual_seed(12)
    model = VisionTransformer(**TINY, attn_layer=NarrowAttention)
    model = models.apply_clip_concat(model).to(DEVICE).eval()
    assert model.blocks[0].attn.proj.in_features == 32 != model.embed_dim
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(12)))
    x = images(seed=12)
    assert _close(build_fast_path(model, **case)(x), model(x))


@torch.no_grad()
def test_a_path_built_from_the_models_masks_refuses_to_run_after_they_change():
    model = tiny_cc(13)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(13)))
    x = images(seed=13)
    fast = build_fast_path(model, backend='torch')
    given = build_fast_path(model, backend='torch', kept_ids=model.kept_token_ids())  # its own plan: not the model's
    assert _close(fast(x), model(x))
    stale = "the model's masks were set or its weights loaded after this path was built from them: build it again"
    model.load_state_dict(model.state_dict())  # the same masks and weights, loaded: they might not have been
    with pytest.raises(RuntimeError, match=stale):
        fast(x)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.5, generator=_gen(14)))
    with pytest.raises(RuntimeError, match=stale):
        fast(x)
    given(x)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


@torch.no_grad()
def test_a_path_built_from_the_models_masks_refuses_to_run_after_one_is_written_in_place():
    """The model takes up a mask written in place (``model.masks[l][p] = False``) at its next forward; the path,
    called first, used to run on with the old plan.  Writing a mask's own values back changes nothing."""
    model = tiny_cc(16)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(16)))
    x = images(seed=16)
    fast = build_fast_path(model, backend='torch')
    before = model(x)
    model.masks[1][1:] = model.masks[1][1:].clone()  # the same values, written
    assert _close(fast(x), before)
    model.masks[1][1:] = False  # block 1 keeps only the class token
    with pytest.raises(RuntimeError, match="the model's masks were set or its weights loaded after this path"):
        fast(x)
    assert _masks_matter(model(x), before)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


@torch.no_grad()
def test_a_path_built_from_the_models_masks_refuses_to_run_after_one_is_replaced_by_another_tensor():
    """The model takes up a mask buffer replaced by assignment (``blocks[l].attn.token_index = ...``) at its next
    forward; the path, watching only its old tensors' version counters, ran on with the old plan.  A tensor of
    the same values (made in inference mode, too) changes nothing, and the path then watches that tensor."""
    model = tiny_cc(17)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(17)))
    x = images(seed=17)
    fast = build_fast_path(model, backend='torch')
    before = model(x)
    with torch.inference_mode():
        model.blocks[2].attn.token_index = model.blocks[2].attn.token_index.clone()  # the same values
    assert _close(fast(x), before)
    model.blocks[1].attn.token_index = model.blocks[1].attn.token_index.clone()  # the same values
    assert _close(fast(x), before)
    model.blocks[1].attn.token_index[1:] = False  # written in place in the tensor now watched
    with pytest.raises(RuntimeError, match="the model's masks were set or its weights loaded after this path"):
        fast(x)
    fast = build_fast_path(model, backend='torch')
    before = model(x)
    model.blocks[1].attn.token_index = torch.ones_like(model.blocks[1].attn.token_index)  # block 1 keeps all
    with pytest.raises(RuntimeError, match="the model's masks were set or its weights loaded after this path"):
        fast(x)
    assert _masks_matter(model(x), before)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


@torch.no_grad()
def test_a_path_follows_a_pool_changed_after_it_was_built():
    """The path normalises only the tokens the head reads, the class token for global_pool='token': after
    reset_classifier(n, 'avg') (or global_pool set directly) the head averages every patch token, which the path
    used to leave out (the mean of none: NaN logits).  It looks at the pool each call and follows it, both ways."""
    model = tiny_cc(18)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(18)))
    x = images(seed=18)
    for case in CASES:
        model.reset_classifier(10, 'token')
        model.to(DEVICE).eval()
        fast = build_fast_path(model, **case)
        assert fast.head_ids.tolist() == [0] and _close(fast(x), model(x)), case
        model.reset_classifier(10, 'avg')
        model.to(DEVICE).eval()
        assert _close(fast(x), model(x)) and fast.head_ids.numel() == 17, case
        assert fast(x[:0]).shape == model(x[:0]).shape == (0, 10), case
        model.global_pool = 'max'
        assert _close(fast(x), model(x)), case
        model.global_pool = 'token'
        assert _close(fast(x), model(x)) and fast.head_ids.tolist() == [0], case
        model.global_pool = ''  # no pool: every token's logits
        out = fast(x)
        assert out.shape == (3, 17, 10) and _close(out, model(x)), case


@torch.no_grad()
def test_a_path_follows_an_attention_pool_removed_after_it_was_built():
    """reset_classifier(n, 'token') on a model pooling by attention ('map') removes that pool: the head then reads
    the class token, as the path hands it."""
    torch.manual_seed(19)
    model = VisionTransformer(**TINY, global_pool='map').to(DEVICE).eval()
    x = images(seed=19)
    fast = build_fast_path(model, backend='torch')
    assert fast.head_ids.numel() == 17 and _close(fast(x), model(x))
    model.reset_classifier(10, 'token')
    model.to(DEVICE).eval()
    assert model.attn_pool is None
    assert fast.head_ids.tolist() == [0] and _close(fast(x), model(x))


@torch.no_grad()
def test_a_final_norm_replaced_after_the_build_is_refused():
    """The path computes model.norm with the weights it read at build time: a norm replaced afterwards (moved to
    fc_norm for average pooling, say) was left out without a word.  The path says to build it again."""
    model = tiny_cc(20)
    x = images(seed=20)
    fast = build_fast_path(model, backend='torch')
    before = model(x)
    model.reset_classifier(10, 'avg')
    model.fc_norm, model.norm = model.norm, torch.nn.Identity()
    model.to(DEVICE).eval()
    assert _masks_matter(model(x), before)
    with pytest.raises(RuntimeError, match=r"^fast path: the model's final norm \(model\.norm\) was replaced after "
                                           r"this path was built, and the path computes the one it read then: build "
                                           r"it again$"):
        fast(x)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


def _replace(model, where):
    """Set a new module or parameter (other weights) where named, as a user would, by attribute assignment."""
    torch.manual_seed(99)

    def renewed(blk):  # the block with its masks, its linear layers initialised anew
        return copy.deepcopy(blk).apply(lambda m: m.reset_parameters() if isinstance(m, torch.nn.Linear) else None)

    if where == 'blocks.1':
        model.blocks[1] = renewed(model.blocks[1])
    elif where == 'blocks.0.mlp.fc1':
        old = model.blocks[0].mlp.fc1
        model.blocks[0].mlp.fc1 = torch.nn.Linear(old.in_features, old.out_features)
    elif where == 'blocks.2.attn.qkv.weight':
        model.blocks[2].attn.qkv.weight = torch.nn.Parameter(torch.randn_like(model.blocks[2].attn.qkv.weight))
    elif where == 'pos_embed':
        model.pos_embed = torch.nn.Parameter(torch.randn_like(model.pos_embed))
    else:  # 'blocks': the stack replaced by another of the same masks
        model.blocks = torch.nn.Sequential(*map(renewed, model.blocks))
    model.to(DEVICE).eval()


@torch.no_grad()
@pytest.mark.parametrize('where', ['blocks.1', 'blocks.0.mlp.fc1', 'blocks.2.attn.qkv.weight', 'pos_embed',
                                   'blocks'])
def test_a_module_or_parameter_replaced_after_the_build_is_refused(where):
    """The path computes the blocks, embedding and norms with the weights it read at build time: a module or
    parameter of theirs set anew afterwards (a block swapped, a layer or weight replaced, the stack replaced) was
    computed as the old one without a word.  The path names it and says to build it again; a model built
    elsewhere in the meantime, or the same module set back, leaves it running."""
    model = tiny_cc(21)
    x = images(seed=21)
    fast = build_fast_path(model, backend='torch')
    before = model(x)
    tiny_cc(22)  # another model built: modules and parameters registered, none of this model's replaced
    assert _close(fast(x), before)
    kept = dict(model.named_modules())['blocks.0'].mlp.fc1
    model.blocks[0].mlp.fc1 = kept  # the same module set again: nothing replaced
    assert _close(fast(x), before)
    _replace(model, where)
    assert _masks_matter(model(x), before)
    with pytest.raises(RuntimeError, match=rf"^fast path: model\.{re.escape(where)} was replaced after this path "
                                           r"was built, and the path computes the one it read then: build it again$"):
        fast(x)
    assert _close(build_fast_path(model, backend='torch')(x), model(x))


@torch.no_grad()
@pytest.mark.parametrize('where, pre', [('blocks.1', False), ('blocks.0.mlp.fc1', True), ('', False),
                                        ('norm', False)], ids=['block', 'fc1-pre', 'model', 'norm'])
def test_a_forward_hook_registered_after_the_build_is_refused(where, pre):
    """Hooks on the modules the path computes are refused at build time (it calls none of them); one registered
    afterwards was skipped without a word.  Once it is removed the path runs again; a hook on the head, which the
    path calls, runs as it is."""
    model = tiny_cc(21)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(21)))
    x = images(seed=21)
    fast = build_fast_path(model, backend='torch')
    before = fast(x)
    module = model.get_submodule(where)
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: (2 * args[0],))
    else:
        handle = module.register_forward_hook(lambda m, args, out: 2 * out)
    assert _masks_matter(model(x), before)
    refused = (rf"^fast path: a forward hook was registered on {where or 'the model'} after this path was built, and "
               r"the path calls none of the modules it computes: remove the hook, or run the model itself$")
    for _ in range(2):  # (and again, no hook registered since)
        with pytest.raises(RuntimeError, match=refused):
            fast(x)
    handle.remove()
    assert _close(fast(x), model(x))
    with model.head.register_forward_hook(lambda m, args, out: 2 * out):
        assert _masks_matter(model(x), before) and _close(fast(x), model(x))


@torch.no_grad()
@pytest.mark.parametrize('pre', [False, True], ids=['forward', 'pre'])
def test_a_global_forward_hook_is_refused(pre):
    """A global hook (register_module_forward_hook) runs on every module the model calls, none of which the path
    calls; torch's FLOP counter's own (its ModuleTracker's, which note the module being run) are let through."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_cc(22)
    x = images(seed=22)
    fast = build_fast_path(model, backend='torch')
    before = fast(x)

    def twice(m, args, out=None):  # doubles what the block's MLP gets, or gives
        if isinstance(m, torch.nn.Linear) and m is model.blocks[1].mlp.fc2:
            return (2 * args[0],) if out is None else 2 * out

    handle = (register_module_forward_pre_hook if pre else register_module_forward_hook)(twice)
    try:
        assert _masks_matter(model(x), before)
        with pytest.raises(RuntimeError, match=r"^fast path: a global forward hook is registered "
                                               r"\(register_module_forward_hook\), and the path calls none of the "
                                               r"modules it computes: remove the hook, or run the model itself$"):
            fast(x)
    finally:
        handle.remove()
    counter = FlopCounterMode(display=False)
    with counter:
        assert _close(fast(x), model(x))
    assert counter.get_total_flops() > 0


@torch.no_grad()
def test_a_model_put_back_in_training_mode_is_refused():
    """The path computes the model in eval mode, but the head it calls is the model's own: in training mode that
    head drops features out (and a distilled model's returns both heads' logits), so the path refuses to run
    until the model is in eval mode again.  A path built from a model in training mode puts it in eval mode."""
    model = tiny_cc(15, drop_rate=0.5)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(15)))
    x = images(seed=15)
    fast = build_fast_path(model, backend='torch')
    model.train()
    with pytest.raises(RuntimeError, match=r'fast path: the model is in training mode .* call model\.eval\(\)'):
        fast(x)
    model.eval()
    assert _close(fast(x), model(x))
    model.train()  # a build puts the model in eval mode itself (its docstring): the path runs at once
    fast = build_fast_path(model, backend='torch')
    assert not any(m.training for m in model.modules())
    assert _close(fast(x), model(x))


@torch.no_grad()
def test_a_model_cast_after_the_path_was_built_is_refused():
    """The path holds copies of the weights in the dtype it was built for and calls the model's own head: after
    model.half() or .double() that head no longer fits the features (a raw dtype error), so the path says to build
    it again; cast back (exactly, from fp64), it runs."""
    model = tiny_cc(17)
    x = images(seed=17)
    fast = build_fast_path(model, backend='torch')
    model.double()
    on = re.escape(str(fast.device))  # cuda:0 on a GPU
    with pytest.raises(RuntimeError, match=rf'^fast path: the model was cast or moved after this path was built '
                                           rf'\(now float64 on {on}, built for float32 on {on}\): build it again$'):
        fast(x)
    model.float()
    assert _close(fast(x), model(x))


@torch.no_grad()
def test_the_path_holds_none_of_the_models_parameters():
    """The path keeps its own weights as buffers and only refers to the model: none of the model's parameters is
    one of the path's, so its state dict holds none of them (the path used to hold the model's first parameter,
    the class token, as its own: .double() on the path made the model's class token fp64 and the path then blamed
    the model for being cast)."""
    model = tiny_cc(17)
    fast = build_fast_path(model, backend='torch')
    assert list(fast.parameters()) == []
    assert not any(t is p for t in fast.state_dict(keep_vars=True).values() for p in model.parameters())


@torch.no_grad()
def test_loading_a_state_dict_into_the_path_is_refused():
    """A path shares storage with its model's fp32 weights: loading another path's state dict into it used to
    overwrite that model's weights in place and leave the path computing neither model (the other's blocks, its
    own model's head).  It is refused, and nothing changes."""
    model, other = tiny_cc(18), tiny_cc(19)
    x = images(seed=18)
    ref = model(x)
    fast = build_fast_path(model, backend='torch')
    with pytest.raises(RuntimeError, match=r'^fast path: it cannot load a state dict .*: load the state dict into '
                                           r'the model and build the path again$'):
        fast.load_state_dict(build_fast_path(other, backend='torch').state_dict())
    assert torch.equal(model(x), ref) and _close(fast(x), ref)


@torch.no_grad()
def test_casting_or_moving_the_path_is_refused():
    """The path is built for one dtype and device (its kernels' choices, and a CUDA graph that reads its weights
    at their addresses: cast copies would leave the graph reading freed memory): .half(), .double() or .to() a
    dtype are refused and change nothing, in the path or in the model; calls that change nothing pass."""
    model = tiny_cc(17)
    x = images(seed=17)
    ref = model(x)
    fast = build_fast_path(model, backend='torch')
    before = {k: (v.dtype, v.data_ptr()) for k, v in fast.state_dict().items()}
    refused = (r'^fast path: it cannot be cast or moved \(built for float32 on ' + str(fast.device) + r'\): build it '
               r"again, with build_fast_path\(model, dtype=\.\.\.\) on the model's device$")
    for cast in (lambda f: f.half(), lambda f: f.double(), lambda f: f.to(torch.bfloat16)):
        with pytest.raises(RuntimeError, match=refused):
            cast(fast)
    assert {k: (v.dtype, v.data_ptr()) for k, v in fast.state_dict().items()} == before
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert fast.float() is fast and fast.to(fast.device) is fast
    assert _close(fast(x), ref) and torch.equal(model(x), ref)


@torch.no_grad()
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_a_model_held_in_half_precision(dtype):
    """A model whose weights are fp16 or bf16 (model.half()): its head reads the features in its own dtype; the
    logits come back in fp32, within that precision of the eager model."""
    model = tiny_cc(16)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(16)))
    x = images(seed=16)
    model = model.to(dtype)
    ref = model(x.to(dtype)).float()
    for case in CASES:
        if dtype == torch.bfloat16 and not CUDA and 'triton' in (case.get('attention'), case.get('mlp')):
            # the interpreter's bf16 dot is wrong (the module's docstring): refused, not computed (it used to be)
            with pytest.raises(ValueError, match=r"in bfloat16 need a CUDA model: Triton's interpreter computes"):
                build_fast_path(model, **case, dtype=dtype)
            with pytest.raises(ValueError, match=r'^the Triton matrix product takes bfloat16 operands on CUDA only'):
                K.linear_gelu_triton(x[:, 0, :16, :16].to(dtype), torch.zeros(16, 16, dtype=dtype), None)
            continue
        out = build_fast_path(model, **case, dtype=dtype)(x.to(dtype))
        assert out.dtype == torch.float32, case
        assert (out - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item()), case


@torch.no_grad()
@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(c.values()))
def test_an_empty_batch(case):
    """No image in: no logits out, of the shape the eager model gives (it runs an empty batch)."""
    model = tiny_cc(18)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(18)))
    x = images(0)
    out = build_fast_path(model, **case)(x)
    assert out.shape == model(x).shape == (0, 10) and out.dtype == torch.float32


def test_bad_arguments_are_refused():
    model = tiny_cc(0)
    with pytest.raises(ValueError, match='backend must be one of'):
        build_fast_path(model, backend='tensorrt')
    with pytest.raises(ValueError, match='cuda_graph=True needs batch_size'):
        build_fast_path(model, cuda_graph=True)
    with pytest.raises(ValueError, match='ids must be distinct'):
        build_fast_path(model, backend='torch', kept_ids=[torch.tensor([0, 1, 1])] * 3)
    fast = build_fast_path(model, backend='torch')
    for shape in ((1, 3, 64, 64), (1, 1, 32, 32), (1, 4, 32, 32), (3, 32, 32)):  # size, channels, no batch axis
        said = rf'expected images of shape \(B, 3, 32, 32\), got {re.escape(str(shape))}'
        with pytest.raises(ValueError, match=said):
            fast(torch.zeros(*shape, device=DEVICE))
    for dtype in (torch.uint8, torch.int64, torch.bool):  # raw pixels or masks: the eager model refuses them too
        raw = torch.zeros(1, 3, 32, 32, dtype=dtype, device=DEVICE)
        with pytest.raises(RuntimeError):
            model(raw)
        with pytest.raises(ValueError, match=f'expected floating-point images .*, got {str(dtype)[6:]}$'):
            fast(raw)


def test_kept_ids_in_any_order_are_checked_and_held_sorted():
    """A model's kept ids come in its concat order, not sorted: the checks (distinct, within [0, N)) must hold
    for ids in any order (a duplicate or an id out of range that is not at an end of the list was let through
    when only neighbours and the ends were compared), and each block holds its ids sorted, as the kernels read
    them.  And there is one list of ids per block, no fewer, no more."""
    model = tiny_cc(0)
    pruning.apply_masks(model, revisiting_plan(3, 16, 2))
    given = model.kept_token_ids()
    assert any(not torch.equal(ids, ids.sort().values) for ids in given)  # concat order, not sorted
    fast = build_fast_path(model, backend='torch')
    for blk, ids in zip(fast.blocks, given):
        assert blk.ids.tolist() == sorted(ids.tolist()) and blk.ids.dtype == torch.int64
    for bad, said in ((torch.tensor([0, 3, 1, 3]), 'ids must be distinct'),
                      (torch.tensor([0, 17, 1]), r'ids must lie in \[0, 17\)'),
                      (torch.tensor([0, -1, 1]), r'ids must lie in \[0, 17\)'),
                      # ids 0, 1, 2, 5 once truncated; a mask of two tokens reads as the distinct ids 0 and 1
                      (torch.tensor([0., 1.5, 2.7, 5.2]), r'ids must be integers \(token ids, not a mask\), got float'),
                      (torch.tensor([False, True]), r'ids must be integers \(token ids, not a mask\), got bool')):
        with pytest.raises(ValueError, match=rf'^kept_ids\[1\]: {said}'):
            build_fast_path(model, backend='torch', kept_ids=[given[0], bad, given[2]])
    # one list of ids per block: fewer would leave the last blocks out of the path, more name blocks it lacks
    for ids in (given[:2], given + [given[0]]):
        with pytest.raises(ValueError, match=rf'^kept_ids: {len(ids)} entries for 3 blocks$'):
            build_fast_path(model, backend='torch', kept_ids=ids)


@torch.no_grad()
def test_captured_batch_size_replays_and_others_run_uncaptured():
    """The dispatch around a CUDA graph, on any device: a stand-in graph whose replay runs the forward on the
    static input.  The captured batch size copies the images in and returns a copy of the static output; any
    other batch size runs uncaptured."""
    model = tiny_cc(9)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(9)))
    fast = build_fast_path(model, backend='torch')
    replays = []

    class StandInGraph:
        def replay(self):
            replays.append(1)
            fast._static_out.copy_(fast._forward_impl(fast._static_in))

    fast._static_in = torch.zeros(2, 3, 32, 32, device=DEVICE)
    fast._static_out = torch.zeros(2, 10, device=DEVICE)
    fast._graph = StandInGraph()
    a, b = images(2, seed=10), images(3, seed=11)
    out_a = fast(a)
    assert len(replays) == 1 and torch.equal(fast._static_in, a)
    assert _close(out_a, model(a)) and out_a.data_ptr() != fast._static_out.data_ptr()
    assert _close(fast(b), model(b)) and len(replays) == 1


@torch.no_grad()
def test_a_captured_graph_refuses_a_replaced_head():
    """A CUDA graph replays the kernels of the head it captured, reading its weights at their addresses: after
    reset_classifier (a new head) a replay would compute the old head, so the captured batch size is refused with
    the remedy, while other batch sizes, which call the model's head as it is, give the new head's output (a
    stand-in graph, as above, so on any device)."""
    model = tiny_cc(9)
    fast = build_fast_path(model, backend='torch')
    fast._static_in = torch.zeros(2, 3, 32, 32, device=DEVICE)
    fast._static_out = torch.zeros(2, 10, device=DEVICE)
    fast._graph = types.SimpleNamespace(replay=lambda: fast._static_out.copy_(fast._forward_impl(fast._static_in)))
    a, b = images(2, seed=10), images(3, seed=11)
    assert _close(fast(a), model(a))
    model.reset_classifier(4)
    model.to(DEVICE).eval()
    with pytest.raises(RuntimeError, match=r"^fast path: the model's head was replaced after this path was built "
                                           r"\(reset_classifier, say\), and its CUDA graph replays the old one: "
                                           r"build it again$"):
        fast(a)
    out = fast(b)
    assert out.shape == (3, 4) and _close(out, model(b))


@torch.no_grad()
def test_a_captured_graph_refuses_a_head_changed_in_place():
    """A CUDA graph replays its head as captured, pool and all: a pool set directly (no new head) or an fc_norm
    replaced would be left out of the replay, so the captured batch size is refused while others follow the
    model (a stand-in graph, as above)."""
    model = tiny_cc(9)
    fast = build_fast_path(model, backend='torch')
    fast._static_in = torch.zeros(2, 3, 32, 32, device=DEVICE)
    fast._static_out = torch.zeros(2, 10, device=DEVICE)
    fast._graph = types.SimpleNamespace(replay=lambda: None)  # replays what it captured: the old head's logits
    a, b = images(2, seed=10), images(3, seed=11)
    changed = (r"^fast path: the model's head was changed after this path was built \(its global_pool, fc_norm or "
               r"another module of its head\), and its CUDA graph replays the old one: build it again$")
    for name, value in (('global_pool', 'avg'), ('fc_norm', torch.nn.LayerNorm(64).to(DEVICE))):
        before = getattr(model, name)
        setattr(model, name, value)
        with pytest.raises(RuntimeError, match=changed):
            fast(a)
        assert _close(fast(b), model(b))
        setattr(model, name, before)
        fast(a)  # as captured again
    model.forward_head = lambda t, pre_logits=False: model.head(t.mean(1))  # one of the model's own
    with pytest.raises(RuntimeError, match=changed):
        fast(a)
    assert _close(fast(b), model(b))


@torch.no_grad()
def test_a_captured_graph_refuses_a_hook_on_its_head_registered_after_the_capture():
    """The uncaptured path calls the model's head, hooks and all; a CUDA graph replays the head as captured, so a
    hook registered on it afterwards is refused for the captured batch size (a stand-in graph, as above)."""
    model = tiny_cc(9)
    fast = build_fast_path(model, backend='torch')
    fast._static_in = torch.zeros(2, 3, 32, 32, device=DEVICE)
    fast._static_out = torch.zeros(2, 10, device=DEVICE)
    fast._graph = types.SimpleNamespace(replay=lambda: None)  # replays what it captured: the head without the hook
    fast._note_captured_head()
    a, b = images(2, seed=10), images(3, seed=11)
    fast(a)
    with model.head.register_forward_hook(lambda m, args, out: 2 * out):
        with pytest.raises(RuntimeError, match=r"^fast path: a forward hook was registered on head after this "
                                               r"path's CUDA graph was captured, and the graph replays the head "
                                               r"without it: build it again$"):
            fast(a)
        assert _close(fast(b), model(b))
    fast(a)


# ---------------------------------------------------------------------------------------------------------------
# Programmatic dependent launch: the kernels launched with the wait, and the capture's choice

def _launches_of(monkeypatch, call):
    """(kernel, its PDL launch options) for every kernel that ``call`` launches, the kernels replaced by recorders
    (nothing runs: the wrappers' checks and launches only)."""
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((self.name, {k: kwargs[k] for k in ('GDC', 'launch_pdl') if k in kwargs}))
            return launch
    with monkeypatch.context() as m:
        for name in FAST_PATH_KERNELS:
            m.setattr(K, name, Recorder(name))
        call()
    return seen


@needs_triton
@torch.no_grad()
def test_inside_dependent_launches_every_kernel_waits_for_the_one_before_it(monkeypatch):
    """Within K.dependent_launches() every kernel is launched with the launch attribute (launch_pdl) and compiled
    with the wait (GDC); outside it, and after it, none is.  The kernels: a forward of the Triton path with the
    fused MLP products forced, the one-kernel MLP and the first norm with qkv.  Kernels launched meanwhile from
    another thread are launched as usual."""
    model = tiny_cc(9)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(9)))
    fast = build_fast_path(model, backend='triton', attention='triton', mlp='triton')
    x, ids = images(2, seed=3), torch.tensor(DISTINCT_IDS, device=DEVICE)
    buf, y = _randn(2, 21, 40, seed=1), _randn(2, len(DISTINCT_IDS), 40, seed=2)

    def launch_all():
        fast(x)
        K.mlp_residual_scatter_triton_(buf, ids, y, _randn(40, 72, seed=3), None, _randn(72, 40, seed=4), None,
                                       None, 16, 32, 16, 4, 2)
        K.gather_layer_norm_linear_triton(buf, ids, None, None, 1e-6, _randn(40, 24, seed=5), None, block_m=16,
                                          block_n=32, block_k=64, num_warps=4, num_stages=1)
    def in_another_thread():
        seen = []
        thread = threading.Thread(target=lambda: seen.extend(_launches_of(monkeypatch, launch_all)))
        thread.start()
        thread.join()
        return seen

    monkeypatch.setattr(K, 'HAS_DEPENDENT_LAUNCH', True)
    before = _launches_of(monkeypatch, launch_all)
    with K.dependent_launches():
        inside = _launches_of(monkeypatch, launch_all)
        # the context is the thread's that entered it: another thread's launches meanwhile are plain ones
        elsewhere = in_another_thread()
    after = _launches_of(monkeypatch, launch_all)
    assert {name for name, _ in inside} == set(FAST_PATH_KERNELS)
    assert all(options == {'GDC': True, 'launch_pdl': True} for _, options in inside), inside
    assert before == after == elsewhere == [(name, {}) for name, _ in inside]


def test_dependent_launches_are_refused_where_triton_cannot_make_them(monkeypatch):
    """Where this Triton has no programmatic dependent launch (or its interpreter runs the kernels), the context
    refuses at once; dependent_launch_problem says why per device: not a GPU, no Triton support, a GPU before
    Hopper."""
    monkeypatch.setattr(K, 'HAS_DEPENDENT_LAUNCH', False)
    with pytest.raises(RuntimeError, match=r'^dependent launches: this Triton has no programmatic dependent '
                                           r'launch \(or its interpreter runs the kernels\)$'):
        with K.dependent_launches():
            pass
    assert K._launch_options() == {}
    cuda = torch.device('cuda')
    assert K.dependent_launch_problem(torch.device('cpu')) == 'it needs a CUDA GPU, not cpu'
    assert K.dependent_launch_problem(cuda) == ('this Triton has no programmatic dependent launch (Triton 3.4 or '
                                                'later has it)')
    monkeypatch.setattr(K, 'HAS_DEPENDENT_LAUNCH', True)
    for capability, problem in (((8, 6), 'it needs compute capability 9.0 or later (Hopper); this GPU has 8.6'),
                                ((9, 0), None), ((10, 0), None)):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert K.dependent_launch_problem(cuda) == problem


def test_dependent_launch_argument_is_checked_at_build():
    model = tiny_cc(9)
    with pytest.raises(ValueError, match=r"^dependent_launch must be one of \('auto', 'on', 'off'\), got 'yes'$"):
        build_fast_path(model, backend='torch', dependent_launch='yes')
    with pytest.raises(ValueError, match=r"^dependent_launch='on' needs backend='triton' \(it launches the Triton "
                                         r"kernels\)$"):
        build_fast_path(model, backend='torch', dependent_launch='on', cuda_graph=True, batch_size=2)
    if not CUDA and K.INTERPRETER:
        with pytest.raises(ValueError, match=r"^dependent_launch='on': it needs a CUDA GPU, not cpu$"):
            build_fast_path(model, backend='triton', dependent_launch='on', cuda_graph=True, batch_size=2)
    # without a graph there is nothing to launch with it: said, not ignored
    with pytest.raises(ValueError, match=r"^dependent_launch='on' needs cuda_graph=True \(it is how the CUDA graph "
                                         r"launches the kernels\)$"):
        build_fast_path(model, backend='triton', dependent_launch='on')


def test_the_capture_tries_dependent_launch_unasked_on_hopper_only(monkeypatch):
    """dependent_launch='auto' times the two graphs only with the Triton backend, on a GPU without a problem
    (K.dependent_launch_problem), of compute capability 9.x: not on a later one unasked (a capture that fails
    leaves the allocator unusable, and captures so launched were reported to fail on 12.0)."""
    fast = build_fast_path(tiny_cc(9), backend='torch')
    monkeypatch.setattr(FP, '_times_on', lambda device: True)
    monkeypatch.setattr(K, 'dependent_launch_problem', lambda device: None)
    for backend, capability, tries in (('triton', (9, 0), True), ('triton', (10, 0), False),
                                       ('triton', (12, 0), False), ('triton', (8, 9), False), ('torch', (9, 0), False)):
        fast.backend = backend
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None, c=capability: c)
        assert fast._times_dependent_launch() is tries, (backend, capability)
    fast.backend = 'triton'
    monkeypatch.setattr(K, 'dependent_launch_problem', lambda device: 'no')
    assert fast._times_dependent_launch() is False

class _StandInGraph:
    """A captured graph, on any device: its replay runs the uncaptured forward on the path's static input (or
    writes ``off_by`` more), and it remembers whether it was reset."""

    def __init__(self, fast, dependent, off_by=0.0):
        self.fast, self.dependent, self.off_by, self.was_reset, self.replays = fast, dependent, off_by, False, 0
        self.out = torch.zeros(fast._static_in.shape[0], 10, device=DEVICE)

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fast._forward_impl(self.fast._static_in) + self.off_by)

    def reset(self):
        self.was_reset = True

    def pool(self):
        return ('pool of', self)


def _stand_in_capture(monkeypatch, fast, mode, replay_ms=(1.0, 1.0), off_by=0.0, fails=None):
    """fast._capture(2) with stand-in graphs (the second, with dependent launch, off by ``off_by``), the graphs'
    times scripted (without, with); the graphs made, in order.  ``fails``: the exception a capture with dependent
    launch raises instead."""
    made = []

    def capture(static_in, dependent, pool=None):
        if dependent and fails is not None:
            raise fails
        made.append(_StandInGraph(fast, dependent, off_by if len(made) else 0.0))
        made[-1].captured_in = pool
        return made[-1], made[-1].out
    monkeypatch.setattr(fast, '_capture_graph', capture)
    monkeypatch.setattr(fast, '_times_dependent_launch', lambda: True)
    monkeypatch.setattr(FP, '_replay_ms', lambda graphs: list(replay_ms))
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)
    fast._dependent_launch_mode = mode
    fast._capture(2)
    return made


@torch.no_grad()
@pytest.mark.parametrize('on_ms', [0.8, 1.2])
def test_a_capture_keeps_the_faster_graph_with_or_without_dependent_launch(monkeypatch, on_ms):
    """dependent_launch='auto': the forward is captured without, then with programmatic dependent launch, both
    graphs replayed and checked equal, and timed; the faster is kept and the other reset (its executable graph
    released), and describe() says which, with both times.  The kept graph's replays give the model's logits."""
    model = tiny_cc(9)
    fast = build_fast_path(model, backend='torch')
    made = _stand_in_capture(monkeypatch, fast, 'auto', replay_ms=(1.0, on_ms))
    faster = on_ms < 1.0
    assert [g.dependent for g in made] == [False, True]
    assert made[1].captured_in == made[0].pool()  # the second graph's memory from the first's pool
    assert fast._graph is made[faster] and made[not faster].was_reset and not made[faster].was_reset
    d = fast.describe()
    assert d['dependent_launch'] is faster and d['dependent_launch_ms'] == {'off': 1.0, 'on': on_ms}
    assert 'dependent_launch' not in d['refused']
    x = images(2, seed=4)
    assert _close(fast(x), model(x))


@torch.no_grad()
def test_a_graph_with_dependent_launch_that_computes_otherwise_is_refused(monkeypatch):
    """The graph with dependent launch must give the other's logits bit for bit: one that does not (here off by
    1e-6) is refused with the difference, reset, and the graph without it kept, untimed."""
    fast = build_fast_path(tiny_cc(9), backend='torch')
    made = _stand_in_capture(monkeypatch, fast, 'auto', off_by=1e-6)
    assert fast._graph is made[0] and made[1].was_reset and not made[0].was_reset
    d = fast.describe()
    assert d['dependent_launch'] is False and d['dependent_launch_ms'] == {}
    assert re.fullmatch(r'its logits differ from the graph launched without it \(max \|difference\| [0-9.e-]+\)',
                        d['refused']['dependent_launch']['0']['on'])


@torch.no_grad()
def test_a_capture_with_dependent_launch_whose_warm_up_fails_is_refused(monkeypatch):
    """dependent_launch='auto': a capture with dependent launch whose warm-up fails, before anything is captured
    (a kernel variant with the wait that does not build, say), is refused with its error, and the graph without
    it kept, untimed, after one replay shows it still runs; the path computes the model.  A failure of the capture
    itself is raised, as any capture's (torch's allocator is unusable after it), and so is one with 'on'."""
    model = tiny_cc(9)
    fast = build_fast_path(model, backend='torch')
    made = _stand_in_capture(monkeypatch, fast, 'auto', fails=ValueError('a kernel variant that does not build'))
    assert [g.dependent for g in made] == [False] and fast._graph is made[0] and not made[0].was_reset
    assert made[0].replays == 1
    d = fast.describe()
    assert d['dependent_launch'] is False and d['dependent_launch_ms'] == {}
    assert d['refused']['dependent_launch'] == {
        '0': {'on': 'its warm-up failed (ValueError: a kernel variant that does not build)'}}
    x = images(2, seed=4)
    assert _close(fast(x), model(x))
    for mode, fails in (('auto', CaptureError('capturing the forward ... failed')),
                        ('auto', torch.OutOfMemoryError('CUDA out of memory')),
                        ('on', CaptureError('capturing the forward ... failed'))):
        fast = build_fast_path(tiny_cc(9), backend='torch')
        with pytest.raises(type(fails), match=str(fails).replace('.', r'\.')):
            _stand_in_capture(monkeypatch, fast, mode, fails=fails)


@torch.no_grad()
@pytest.mark.parametrize('dependent', [False, True])
def test_a_capture_with_dependent_launch_runs_its_warm_up_and_capture_inside_dependent_launches(monkeypatch,
                                                                                               dependent):
    """_capture_graph itself (the other capture tests stand it in): with ``dependent`` every forward it runs, the
    warm-up and the captured one, launches the kernels with programmatic dependent launch (K._launch_options()),
    and none without; after it, none does.  CUDA's streams and graphs are stood in, so it runs on any device."""
    fast = build_fast_path(tiny_cc(9), backend='torch')
    fast._static_in = images(2, seed=4)
    monkeypatch.setattr(K, 'HAS_DEPENDENT_LAUNCH', True)

    class Stream:
        def wait_stream(self, other):
            pass
    for name, value in (('Stream', lambda device=None: Stream()), ('current_stream', lambda device=None: Stream()),
                        ('stream', lambda s: contextlib.nullcontext()), ('CUDAGraph', object),
                        ('graph', lambda g, pool=None: contextlib.nullcontext()),
                        ('synchronize', lambda device=None: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    options = []
    monkeypatch.setattr(fast, '_run', lambda x: options.append(K._launch_options()) or x)
    graph, out = fast._capture_graph(fast._static_in, dependent)
    assert options == [{'GDC': True, 'launch_pdl': True} if dependent else {}] * 4  # 3 warm-ups, the capture
    assert out is fast._static_in and K._launch_options() == {}


@torch.no_grad()
@pytest.mark.parametrize('mode', ['on', 'off'])
def test_dependent_launch_on_or_off_captures_one_graph_untimed(monkeypatch, mode):
    fast = build_fast_path(tiny_cc(9), backend='torch')
    made = _stand_in_capture(monkeypatch, fast, mode)
    assert [g.dependent for g in made] == [mode == 'on'] and fast._graph is made[0]
    d = fast.describe()
    assert d['dependent_launch'] is (mode == 'on') and d['dependent_launch_ms'] == {}


@cuda_only
@torch.no_grad()
def test_a_captured_graph_refuses_a_replaced_head_on_cuda():
    model = _deit_ti_pair(seed=2)
    fast = build_fast_path(model, backend='torch', dtype=torch.float16, cuda_graph=True, batch_size=4)
    fast(torch.randn(4, 3, 224, 224, device=DEVICE))
    model.reset_classifier(7)
    model.to(DEVICE).eval()
    with pytest.raises(RuntimeError, match="head was replaced"):
        fast(torch.randn(4, 3, 224, 224, device=DEVICE))


@torch.no_grad()
def test_every_forward_runs_with_the_models_device_current(monkeypatch):
    """Triton launches its kernels on the current CUDA device, not on the device of their tensors, so a path on
    cuda:1 while cuda:0 is current must make its own device current for every run: the graph's replay, an
    uncaptured batch size (an evaluation's last batch) and ``embed``.  Here with a stand-in for ``_on`` that
    records the device it makes current while the path computes."""
    import contextlib
    model = tiny_cc(9)
    pruning.apply_masks(model, pruning.random_masks(3, 16, 0.3, generator=_gen(9)))
    fast = build_fast_path(model, backend='torch')
    current, seen = [None], []

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], device
        try:
            yield
        finally:
            current[0] = before

    def run(images):
        seen.append(current[0])
        return forward(images)

    def embed(images):
        seen.append(current[0])
        return embed_impl(images)

    forward, embed_impl = fast._run, fast._embed
    monkeypatch.setattr(FP, '_on', on)
    monkeypatch.setattr(fast, '_run', run)
    monkeypatch.setattr(fast, '_embed', embed)
    x = images(2, seed=10)
    assert _close(fast(x), model(x))
    assert seen == [fast.device] * 2  # the forward, and the embedding inside it
    fast.embed(x)
    assert seen == [fast.device] * 3


@pytest.mark.slow
@torch.no_grad()
def test_compiled_backend():
    model = tiny_cc(8)
    pruning.apply_masks(model, revisiting_plan(3, 16, 2))
    x = images(seed=8)
    assert _close(build_fast_path(model, backend='compile')(x), model(x))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_backend_follows_the_head_and_refuses_as_the_others():
    """The compiled graph holds the head as dynamo traced it, and dynamo does not guard on module hooks: a hook
    registered on the head after the first call was left out (and one removed would run on).  The path compiles
    afresh then; a pool changed is followed, and a hook on a block or a final norm replaced is refused, as by the
    other backends.  A dense timm model, against its own forward."""
    torch.manual_seed(30)
    model = VisionTransformer(**TINY).to(DEVICE).eval()
    x = images(seed=30)
    fast = build_fast_path(model, backend='compile')
    before = fast(x)
    assert _close(before, model(x))
    with model.head.register_forward_hook(lambda m, args, out: 2 * out):
        assert _masks_matter(model(x), before) and _close(fast(x), model(x))
    assert _close(fast(x), model(x))  # the hook removed: not run on
    model.reset_classifier(10, 'avg')
    model.to(DEVICE).eval()
    assert _close(fast(x), model(x))
    with model.blocks[1].register_forward_hook(lambda m, args, out: 2 * out):
        with pytest.raises(RuntimeError, match=r'fast path: a forward hook was registered on blocks\.1 after'):
            fast(x)
    model.norm = torch.nn.Identity()
    with pytest.raises(RuntimeError, match=r"fast path: the model's final norm \(model\.norm\) was replaced"):
        fast(x)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_backend_distilled():
    """DeiT's distilled model compiled: pruned (ids chosen here) against the original-order reference."""
    torch.manual_seed(4)
    model = VisionTransformerDistilled(**TINY).to(DEVICE).eval()
    x = images(seed=4)
    ids = _kept_ids(3, 18, 2, seed=4)
    fast = build_fast_path(model, backend='compile', kept_ids=ids)
    ref = original_order_reference(model, x, ids)
    assert _masks_matter(ref, model(x))
    assert fast.head_ids.tolist() == [0, 1] and _close(fast(x), ref)


@pytest.mark.slow
@torch._dynamo.config.patch(recompile_limit=1)
def test_compiled_paths_each_have_their_own_recompile_limit():
    """torch.compile keeps at most recompile_limit graphs (8 by default) per code object and, with fullgraph, fails
    past it.  Paths of other kept counts built in one process each run (they used to share FastViT's code object,
    so the ninth failed); one path run at more shapes than the limit says so in one clear error.  The limit is
    set to 1 here so that two paths show it (with torch's own patch: pytest 9.2's monkeypatch, which restores what
    the target's __dict__ held, deletes a torch config entry on undo, and torch then hides it for good)."""
    x = images(batch=2, seed=9)
    for seed, rate in ((9, 0.2), (10, 0.6)):
        model = tiny_cc(seed)
        pruning.apply_masks(model, pruning.random_masks(3, 16, rate, generator=_gen(seed)))
        fast = build_fast_path(model, backend='compile')
        assert _close(fast(x), model(x))
    assert fast.describe()['kept_counts'] != [17, 17, 17]
    with pytest.raises(RuntimeError, match=r"^fast path: backend 'compile' has compiled this path for as many input "
                                           r"shapes as torch._dynamo.config.recompile_limit allows \(1;"):
        fast(images(batch=3, seed=9))


# ---------------------------------------------------------------------------------------------------------------
# the kernels compiled for a Hopper GPU without one (the interpreter does not lower them)

AOT_SCRIPT = r'''
import inspect, json, os, re, subprocess, sys, tempfile
sys.path.insert(0, sys.argv[1])
import triton
from triton.backends.nvidia import compiler as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models import fast_kernels as K

ARCH = int(sys.argv[2]) if len(sys.argv) > 2 else 90  # the compute capability compiled for: 90, Hopper
target = GPUTarget('cuda', ARCH, 32)
backend = triton.compiler.make_backend(target)

PDL = {}  # on Hopper, each kernel's first compile again with the programmatic dependent launch's wait (GDC)

def compile_(kernel, types, constexprs, num_warps, num_stages=3, aligned=()):
    # aligned: the arguments a launch would find multiples of 16 (Triton specialises on that, bytes for pointers)
    name = kernel.fn.__name__
    if ARCH >= 90 and name not in PDL:
        PDL[name] = None
        PDL[name] = compile_(kernel, types, dict(constexprs, GDC=True), num_warps, num_stages, aligned)
    constexprs = dict({'GDC': False}, **constexprs)
    signature = dict(types, **{k: 'constexpr' for k in constexprs})
    names = list(inspect.signature(kernel.fn).parameters)
    attrs = {(names.index(a),): [['tt.divisibility', 16]] for a in aligned}
    options = backend.parse_options({'num_warps': num_warps, 'num_stages': num_stages}).__dict__
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=target, options=options)
    ptx = compiled.asm['ptx']
    return {'shared': compiled.metadata.shared, 'wgmma': 'wgmma.mma_async' in ptx, 'mma': 'mma.sync' in ptx,
            'gdc': [ptx.count('griddepcontrol.wait'), ptx.count('griddepcontrol.launch_dependents')],
            'wide_loads': ptx.count('cp.async.cg.shared.global') + ptx.count('ld.global.v4'),
            'narrow_loads': len(re.findall(r'ld\.global\.b(?:8|16|32)\b', ptx)),
            'narrow_stores': len(re.findall(r'st\.global\.b(?:8|16|32)\b', ptx)), 'spilled': spilled_bytes(ptx)}

def spilled_bytes(ptx):
    # the bytes a thread spills to local memory, as the ptxas Triton compiles with reports them (-v)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        gpu = f'sm_{ARCH}a' if ARCH == 90 else f'sm_{ARCH}'  # (90a: Hopper's wgmma)
        log = subprocess.run([nvidia.get_ptxas(ARCH).path, '-v', '--gpu-name', gpu, src, '-o',
                              os.path.join(tmp, 'k.cubin')], capture_output=True, text=True, check=True)
    return int(re.search(r'(\d+) bytes spill stores', log.stdout + log.stderr).group(1))

out = {}
# As a DeiT launch specialises them: allocations are 512-byte aligned, and the widths (576, 192, 768) and the
# strides built from them are multiples of 16; the token count and the head count are not.
attn = dict(qkv_ptr='*fp16', out_ptr='*fp16', n='i32', H='i32', stride_qb='i32', stride_qn='i32', stride_ob='i32',
            stride_on='i32', qk_scale='fp32')
attn_aligned = ('qkv_ptr', 'out_ptr', 'stride_qb', 'stride_qn', 'stride_ob', 'stride_on')
for dtype in ('fp16', 'fp32'):
    types = dict(attn, qkv_ptr='*' + dtype, out_ptr='*' + dtype)
    for bm, bn, bt, warps, stages in K.ATTENTION_TILES:
        tail = '' if bt == bn else f'+{bt}'
        out[f'attention {bm}x{bn}{tail} {dtype}'] = compile_(
            K._attention_kernel, types, dict(HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_T=bt), warps, stages,
            aligned=attn_aligned)
lin = dict(x_ptr='*fp16', wt_ptr='*fp16', b_ptr='*fp16', out_ptr='*fp16', ids_ptr='*i64', g_ptr='*fp32',
           y_ptr='*fp16', lnw_ptr='*fp32', lnb_ptr='*fp32', M='i32', N='i32', K='i32', n='i32', stride_xm='i32',
           stride_wk='i32', stride_ob='i32', stride_on='i32', stride_yb='i32', stride_yn='i32', eps='fp32')
lin_aligned = ('x_ptr', 'wt_ptr', 'b_ptr', 'out_ptr', 'ids_ptr', 'g_ptr', 'y_ptr', 'lnw_ptr', 'lnb_ptr', 'N', 'K',
               'stride_xm', 'stride_wk', 'stride_ob', 'stride_on', 'stride_yb', 'stride_yn')
for bm, bn, bk, warps, stages in K.LINEAR_TILES:
    # fc1 with its GELU, the plain product (qkv, the projection), fc2 with its residual update
    for residual, gelu, kind in ((False, True, 'residual=False'), (False, False, 'plain'),
                                 (True, True, 'residual=True')):
        types = dict(lin, out_ptr='*fp32') if residual else lin
        out[f'linear {bm}x{bn}x{bk}w{warps} {kind}'] = compile_(
            K._linear_kernel, types, dict(HAS_B=True, HAS_G=residual, RESIDUAL=residual, NORM=False, HAS_W=False,
                                          HAS_LNB=False, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                          GROUP_M=8, GELU=gelu), warps, stages, aligned=lin_aligned)
for bm, bn, bk, warps, stages in K.row_tiles(192):  # DeiT-Ti: the projection, residual and norm; fc2's extra tiles
    for norm in (True, False):
        out[f'linear {bm}x{bn}x{bk}w{warps} {"norm" if norm else "row"}'] = compile_(
            K._linear_kernel, dict(lin, out_ptr='*fp32'), dict(HAS_B=True, HAS_G=True, RESIDUAL=True, NORM=norm,
                                                               HAS_W=norm, HAS_LNB=norm, EVEN_K=True, BLOCK_M=bm,
                                                               BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, GELU=True),
            warps, stages, aligned=lin_aligned)
mlp = dict(y_ptr='*fp16', w1t_ptr='*fp16', b1_ptr='*fp16', w2t_ptr='*fp16', b2_ptr='*fp16', x_ptr='*fp32',
           ids_ptr='*i64', g_ptr='*fp32', M='i32', H='i32', n='i32', stride_ym='i32', stride_xb='i32',
           stride_xn='i32')
for bm, bh, bk, warps, stages in K.mlp_tiles(192):  # DeiT-Ti: the whole MLP and its residual update
    out[f'mlp {bm}x{bh}x{bk}w{warps}s{stages}'] = compile_(
        K._mlp_kernel, mlp, dict(C=192, HAS_B1=True, HAS_B2=True, HAS_G=True, EVEN_H=True, BLOCK_M=bm, BLOCK_H=bh,
                                 BLOCK_K=bk, BLOCK_C=256), warps, stages,
        aligned=('y_ptr', 'w1t_ptr', 'b1_ptr', 'w2t_ptr', 'b2_ptr', 'x_ptr', 'g_ptr', 'H', 'stride_ym', 'stride_xb',
                 'stride_xn'))
norm_lin = dict(x_ptr='*fp32', ids_ptr='*i64', lnw_ptr='*fp32', lnb_ptr='*fp32', wt_ptr='*fp16', b_ptr='*fp16',
                out_ptr='*fp16', M='i32', N='i32', n='i32', stride_xb='i32', stride_xn='i32', stride_om='i32',
                eps='fp32')
for bm, bn, bk, warps, stages in K.norm_linear_tiles(192):  # DeiT-Ti: the first norm and qkv
    out[f'norm_linear {bm}x{bn}x{bk}w{warps}'] = compile_(
        K._norm_linear_kernel, norm_lin, dict(C=192, HAS_W=True, HAS_LNB=True, HAS_B=True, BLOCK_M=bm, BLOCK_N=bn,
                                              BLOCK_C=bk, GROUP_M=8), warps, stages,
        aligned=('x_ptr', 'lnw_ptr', 'lnb_ptr', 'wt_ptr', 'b_ptr', 'out_ptr', 'N', 'stride_xb', 'stride_xn',
                 'stride_om'))
block_c, rows, warps = K._row_tile(192)
rows_ = dict(x_ptr='*fp32', ids_ptr='*i64', w_ptr='*fp32', b_ptr='*fp32', out_ptr='*fp16', num_rows='i32', n='i32',
             C='i32', stride_xb='i32', stride_xn='i32', stride_ob='i32', stride_on='i32', eps='fp32')
rows_aligned = ('x_ptr', 'w_ptr', 'b_ptr', 'out_ptr', 'C', 'stride_xb', 'stride_xn', 'stride_ob', 'stride_on')
out['gather_layer_norm'] = compile_(K._gather_layer_norm_kernel, rows_,
                                    dict(HAS_W=True, HAS_B=True, ROWS=rows, BLOCK_C=block_c), warps,
                                    aligned=('ids_ptr',) + rows_aligned)
res = dict(x_ptr='*fp32', ids_ptr='*i64', a_ptr='*fp16', g_ptr='*fp32', w_ptr='*fp32', b_ptr='*fp32',
           out_ptr='*fp16', num_rows='i32', n='i32', C='i32', stride_xb='i32', stride_xn='i32', stride_ab='i32',
           stride_an='i32', stride_ob='i32', stride_on='i32', eps='fp32')
for norm in (True, False):
    out[f'residual norm={norm}'] = compile_(
        K._residual_kernel, res, dict(HAS_G=True, NORM=norm, HAS_W=True, HAS_B=True, ROWS=rows, BLOCK_C=block_c),
        warps, aligned=('ids_ptr', 'a_ptr', 'g_ptr', 'stride_ab', 'stride_an') + rows_aligned)
embed = dict(img_ptr='*fp32', addr_ptr='*i64', wt_ptr='*fp16', c_ptr='*fp32', out_ptr='*fp32', M='i32', N='i32',
             K='i32', num_patches='i32', grid_w='i32', stride_ib='i32', stride_ic='i32', stride_ih='i32',
             stride_ob='i32', stride_on='i32', prefix='i32')
for bm, bn, bk, warps, stages in K.PATCH_EMBED_TILES:
    for indirect in (False, True):  # the images at a pointer argument, or at an address read from memory
        out[f'patch_embed {bm}x{bn}x{bk}w{warps} indirect={indirect}'] = compile_(
            K._patch_embed_kernel, embed, dict(PH=16, PW=16, INDIRECT=indirect, EVEN_K=True, BLOCK_M=bm, BLOCK_N=bn,
                                               BLOCK_K=bk, GROUP_M=8), warps, stages,
            aligned=('img_ptr', 'addr_ptr', 'wt_ptr', 'c_ptr', 'out_ptr', 'N', 'K', 'stride_ib', 'stride_ic',
                     'stride_ih', 'stride_ob', 'stride_on'))
out.update({f'pdl {name}': info for name, info in PDL.items()})
print(json.dumps(out))
'''


def _compiled_for(arch: int) -> dict:
    """Every kernel and tile of the fast path compiled for compute capability ``arch`` by AOT_SCRIPT (Triton's own
    compiler and ptxas, no GPU): name -> what the script reads of it."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['TRITON_DEFAULT_FP_FUSION'] = '1'  # Triton's default, said out loud (it warns otherwise)
    done = subprocess.run([sys.executable, '-c', AOT_SCRIPT, root, str(arch)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# the Triton kernels of models/fast_kernels.py (its jit functions named *_kernel)
FAST_PATH_KERNELS = tuple(sorted(n for n, f in vars(K).items() if n.endswith('_kernel') and hasattr(f, 'fn')))

# The shared memory a block may have (opt-in maximum, bytes): Turing (T4, RTX 20), Ampere's A100, and the
# consumer Ampere and Ada GPUs (RTX 30 and 40, sm_86 and 89: the same limit)
SHARED_MEMORY_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 89: 99 * 1024}


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason='on a GPU the kernels are compiled and run by the tests above')
@pytest.mark.skipif(not K.HAS_TRITON, reason='needs Triton')
@pytest.mark.parametrize('arch', sorted(SHARED_MEMORY_PER_BLOCK))
def test_kernels_compile_for_the_gpus_before_hopper(arch):
    """The GPUs people own besides Hopper: every kernel and tile compiles for Turing, Ampere and Ada, and the
    first tile of each kind (the one a forced choice takes; the first candidate a build times) fits in a block's
    shared memory there, in fp16 and, for the attention, fp32.  A larger tile that does not fit fails when
    launched, and the build's timed choice refuses it (test_timed_choice_keeps_the_fastest_candidate_...).  From
    Ampere on the matrix products run on tensor cores (mma.sync; wgmma is Hopper's).  None waits for the kernel
    before it (programmatic dependent launch's wait is Hopper's: the fast path launches with it only there)."""
    kernels = _compiled_for(arch)
    assert all(info['gdc'] == [0, 0] for info in kernels.values())
    assert len(kernels) == (2 * len(K.ATTENTION_TILES) + 3 * len(K.LINEAR_TILES) + 2 * len(K.PATCH_EMBED_TILES)
                            + 2 * len(K.row_tiles(192)) + len(K.mlp_tiles(192)) + len(K.norm_linear_tiles(192)) + 3)
    limit = SHARED_MEMORY_PER_BLOCK[arch]
    first = [f'attention {K.ATTENTION_TILES[0][0]}x{K.ATTENTION_TILES[0][1]} {d}' for d in ('fp16', 'fp32')]
    lin = '{}x{}x{}w{}'.format(*K.LINEAR_TILES[0][:4])
    row = '{}x{}x{}w{}'.format(*K.row_tiles(192)[0][:4])
    first += [f'linear {lin} {k}' for k in ('residual=False', 'plain', 'residual=True')]
    first += [f'linear {row} {k}' for k in ('norm', 'row')]
    first += [f'patch_embed {lin} indirect={i}' for i in (False, True)]
    first += ['gather_layer_norm', 'residual norm=True', 'residual norm=False']
    first += ['norm_linear {}x{}x{}w{}'.format(*K.norm_linear_tiles(192)[0][:4])]
    if arch >= 80:  # the one-kernel MLP is only ever a timed candidate: on Turing it neither fits nor uses mma
        first += ['mlp {}x{}x{}w{}s{}'.format(*K.mlp_tiles(192)[0])]
    assert {n: kernels[n]['shared'] for n in first if kernels[n]['shared'] > limit} == {}
    assert not any(info['wgmma'] for info in kernels.values())
    if arch >= 80:
        products = [n for n in kernels if n.startswith(('attention', 'linear', 'patch_embed', 'mlp', 'norm_linear'))]
        assert all(kernels[n]['mma'] for n in products), [n for n in products if not kernels[n]['mma']]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason='on a GPU the kernels are compiled and run by the tests above')
@pytest.mark.skipif(not K.HAS_TRITON, reason='needs Triton')
def test_kernels_compile_for_hopper():
    """Every kernel and tile the fast path may launch compiles for sm_90 (Triton's own ptxas, no GPU needed), with
    the alignment a DeiT launch specialises on; the matrix products of 64-row tiles use Hopper's wgmma, and
    shared memory stays within the 227 KB a block may have, except the one attention tile that does not fit in
    fp32: launched, it raises Triton's out-of-resources error, which the timed choice records as a refusal
    (the forced tile, the first, fits).  The row kernels move their rows in 16-byte loads and stores.  Registers
    (ptxas -v): the 4-warp 128x128 and the 128x256 product tiles spill, as LINEAR_TILES says, and its first (the
    default), 128x128 in 8 warps, does not; the patch embedding's 256-column tiles at most 64 bytes a thread;
    nothing else spills more than a few bytes.  The one-kernel MLP's
    tiles at DeiT-Ti width (mlp_tiles' docstring): the first (the default) spills nothing, the others at most 16
    bytes a thread, but the one-stage 64x128 at most 192 (172 with Triton 3.6); the first norm with qkv's tiles
    spill nothing.  Every kernel compiled for a launch with
    programmatic dependent launch (GDC) waits for the kernel before it and lets the next one be scheduled; the
    others do neither."""
    kernels = _compiled_for(90)
    pdl = {name: kernels.pop(name) for name in list(kernels) if name.startswith('pdl ')}
    assert sorted(pdl) == ['pdl ' + k for k in sorted(FAST_PATH_KERNELS)]
    assert all(info['gdc'][0] >= 1 and info['gdc'][1] >= 1 for info in pdl.values()), pdl
    assert all(info['gdc'] == [0, 0] for info in kernels.values())
    assert len(kernels) == (2 * len(K.ATTENTION_TILES) + 3 * len(K.LINEAR_TILES) + 2 * len(K.PATCH_EMBED_TILES)
                            + 2 * len(K.row_tiles(192)) + len(K.mlp_tiles(192)) + len(K.norm_linear_tiles(192)) + 3)
    too_big = sorted(name for name, info in kernels.items() if info['shared'] > 227 * 1024)
    assert too_big == ['attention 64x256 fp32'], too_big
    assert K.ATTENTION_TILES[0][:2] != (64, 256)
    for name, info in kernels.items():
        if name.startswith('patch_embed') and name.endswith('indirect=True'):
            # an address read from memory carries no alignment: the kernel states it, so the pixels still move
            # in 16-byte loads, as many as when the images come as an aligned pointer argument
            direct = kernels[name.replace('indirect=True', 'indirect=False')]['wide_loads']
            assert info['wide_loads'] == direct > 0, name
        if name.startswith(('attention', 'linear', 'patch_embed', 'mlp', 'norm_linear')):
            # tiles of 64 rows or more run on wgmma; a 32-row tile is below its 64-row minimum: mma.sync
            assert info['wgmma'] if int(name.split()[1].split('x')[0]) >= 64 else info['mma'], name
    for name in ('gather_layer_norm', 'residual norm=True', 'residual norm=False'):
        # the row kernels are memory-bound: at DeiT's widths they move every row in 16-byte loads and stores
        info = kernels[name]
        assert info['wide_loads'] > 0 and info['narrow_loads'] == info['narrow_stores'] == 0, (name, info)
    # registers: no attention tile or row kernel spills; the 4-warp 128x128 and the 128x256 product tiles do
    # (hundreds of bytes a thread, LINEAR_TILES' comment), and the default tile, 128x128 in 8 warps, holds the fc2
    # epilogue they spill in in registers (the 64-row tiles spill a few bytes at most, as ptxas versions differ)
    spilled = {name: info['spilled'] for name, info in kernels.items() if info['spilled']}
    mlp = {n: b for n, b in spilled.items() if n.startswith('mlp')}
    # (the one-stage 64x128 tile spills 8 bytes with Triton 3.9 and 172 with 3.6, the GPU machine's)
    one_stage = 'mlp {}x{}x{}w{}s{}'.format(*K.mlp_tiles(192)[3])
    assert K.mlp_tiles(192)[3] == (64, 128, 64, 8, 1) and mlp.get(one_stage, 0) <= 192, mlp
    assert max((b for n, b in mlp.items() if n != one_stage), default=0) <= 16, mlp
    assert 'mlp {}x{}x{}w{}s{}'.format(*K.mlp_tiles(192)[0]) not in mlp, mlp
    spilled = {n: b for n, b in spilled.items() if n not in mlp}
    assert not [n for n in spilled if not n.startswith(('linear', 'patch_embed'))], spilled
    # the row-spanning tiles (row_tiles' docstring): with the norm the 64-row one spills under 128 bytes, the
    # narrower ones nothing; as fc2's extra tiles (no norm) none spills
    norm = {n: b for n, b in spilled.items() if n.endswith(' norm')}
    assert set(norm) <= {'linear 64x256x64w8 norm'} and max(norm.values(), default=0) < 128, norm
    assert not [n for n in spilled if n.endswith(' row')], spilled
    spilled = {n: b for n, b in spilled.items() if n not in norm}
    spilling = {'128x128x64w4', '128x256x64w8'}  # a 128-register fp32 accumulator a thread
    assert spilling <= {'{}x{}x{}w{}'.format(*t[:4]) for t in K.LINEAR_TILES}
    assert {n for n, b in spilled.items() if b > 64} <= {n for n in spilled if n.split()[1] in spilling}, spilled
    assert spilled.get('linear 128x128x64w4 residual=True', 0) > 256, spilled
    assert K.LINEAR_TILES[0] == (128, 128, 64, 8, 3) and not [n for n in spilled if '128x128x64w8' in n], spilled
    # the patch embedding's accumulator starts at its constant (no tile of it held beside the accumulator after the
    # loop): its 256-column tiles spill at most 64 bytes a thread (228 with the constant added after the loop), the
    # 64-row one nothing
    embed = {n: b for n, b in spilled.items() if n.startswith('patch_embed') and 'x256x' in n}
    assert max(embed.values(), default=0) <= 64 and not [n for n in embed if n.startswith('patch_embed 64x')], embed


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: half precision at DeiT-Ti size, CUDA graphs, the attention choice

def _deit_ti_pair(seed=0, rate=0.3, num_classes=1000):
    """A DeiT-Ti-sized cc model (seeded random init) with random masks at ``rate``, on the device."""
    torch.manual_seed(seed)
    model = timm.create_model('cc_deit_tiny_patch16_224', num_classes=num_classes).eval()
    pruning.apply_masks(model, pruning.random_masks(12, 196, rate, generator=_gen(seed)))
    return model.to(DEVICE)


@cuda_only
@torch.no_grad()
def test_half_precision_fast_path_agrees_with_fp32_eager():
    """fp16 fast path (Triton backend, CUDA graph) against the fp32 eager model on 256 random images.

    Stated tolerance: the max |logit difference| is at most twice that of timm's own fp16 autocast forward of
    the same model, plus 1e-3 (both round the same products to fp16).  Top-1: identical on >= 99% of the images
    whose fp32 top-2 margin exceeds twice the autocast error (a random-init model has near-ties that fp16
    cannot resolve, ours or timm's; they are left out and must be under 25% of the batch; 10 classes keep the
    margins wide).  Checked without a GPU (Triton's interpreter, CPU fp16 autocast, the first 64 images): max
    |diff| 7e-4 against a bound of 2.8e-3, every image clear and agreeing."""
    model = _deit_ti_pair(num_classes=10)
    x = torch.randn(256, 3, 224, 224, generator=_gen(1)).to(DEVICE)
    ref = model(x)
    with torch.autocast('cuda', dtype=torch.float16):
        autocast_err = (model(x).float() - ref).abs().max().item()
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, cuda_graph=True, batch_size=256)
    out = fast(x)
    err = (out - ref).abs().max().item()
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * autocast_err
    agree = (out.argmax(1) == ref.argmax(1))
    print(f'fp16 fast path: max|diff| {err:.4g} (autocast eager {autocast_err:.4g}); top-1 agreement '
          f'{agree.float().mean().item():.4f} on all, {agree[clear].float().mean().item():.4f} on the '
          f'{int(clear.sum())} with a clear margin; logit std {ref.std().item():.3g}; '
          f'attention {fast.describe()["attention"]}')
    assert err <= 2 * autocast_err + 1e-3
    assert clear.float().mean().item() >= 0.75
    assert agree[clear].float().mean().item() >= 0.99


@cuda_only
@torch.no_grad()
@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_cuda_graph_replays_the_uncaptured_forward(backend):
    model = _deit_ti_pair(seed=2)
    fast = build_fast_path(model, backend=backend, dtype=torch.float16, cuda_graph=True, batch_size=8)
    plain = build_fast_path(model, backend=backend, dtype=torch.float16, batch_size=8)  # the same kernel choices
    a, b, c = (torch.randn(n, 3, 224, 224, generator=_gen(s)).to(DEVICE) for n, s in ((8, 3), (8, 4), (5, 5)))
    out_a, out_b = fast(a), fast(b)  # two replays: the static input really takes the new images
    assert (out_a - plain(a)).abs().max().item() <= 1e-3
    assert (out_b - plain(b)).abs().max().item() <= 1e-3
    assert (out_a - out_b).abs().max().item() > 1e-2 * out_a.abs().max().item()
    assert (fast(c) - plain(c)).abs().max().item() <= 1e-3  # another batch size: the uncaptured path
    assert out_a.data_ptr() != fast(a).data_ptr()  # callers get their own tensor, not the graph's buffer


@cuda_only
@torch.no_grad()
def test_cuda_graph_with_dependent_launch_computes_what_the_graph_without_it_computes():
    """On a GPU that has programmatic dependent launch (Hopper on): the graph captured with it ('on') gives the
    logits of the graph without it ('off') bit for bit, and 'auto' times both and keeps the faster (describe()
    says which, with both times).  On an earlier GPU 'on' is refused with the reason and 'auto' captures without
    it, untimed."""
    model = _deit_ti_pair(seed=5)
    kw = dict(backend='triton', dtype=torch.float16, cuda_graph=True, batch_size=8, attention='triton', mlp='triton')
    x = torch.randn(8, 3, 224, 224, generator=_gen(5)).to(DEVICE)
    off = build_fast_path(model, dependent_launch='off', **kw)
    auto = build_fast_path(model, **kw)
    assert off.describe()['dependent_launch'] is False and torch.equal(auto(x), off(x))
    problem = K.dependent_launch_problem(DEVICE)
    if problem is not None:
        with pytest.raises(ValueError, match="^dependent_launch='on': " + re.escape(problem) + '$'):
            build_fast_path(model, dependent_launch='on', **kw)
        assert auto.describe()['dependent_launch'] is False and auto.describe()['dependent_launch_ms'] == {}
        return
    on = build_fast_path(model, dependent_launch='on', **kw)
    assert on.describe()['dependent_launch'] is True and torch.equal(on(x), off(x))
    ms = auto.describe()['dependent_launch_ms']
    print(f'dependent launch, DeiT-Ti-30 batch 8: {ms}')
    assert set(ms) == {'off', 'on'} and auto.describe()['dependent_launch'] is (ms['on'] < ms['off'])

@cuda_only
@pytest.mark.parametrize('backend', ['triton', 'torch'])
def test_cuda_graph_built_under_inference_mode_runs_outside_it(backend):
    """The buffers a replay writes (the static input, the images' address) are ordinary tensors even when the path
    is built under torch.inference_mode (whose tensors refuse in-place writes outside it); and a path built outside
    runs inside it."""
    model = _deit_ti_pair(seed=4)
    with torch.inference_mode():
        inside = build_fast_path(model, backend=backend, dtype=torch.float16, cuda_graph=True, batch_size=4)
    outside = build_fast_path(model, backend=backend, dtype=torch.float16, cuda_graph=True, batch_size=4)
    a = torch.randn(4, 3, 224, 224, generator=_gen(8)).to(DEVICE)
    with torch.no_grad():
        reference = outside(a)
        for images in (a, a.cpu(), a.half()):  # read in place (triton) or copied into the static input
            assert (inside(images) - reference).abs().max().item() <= 1e-3
    with torch.inference_mode():
        assert (outside(a.cpu()) - reference).abs().max().item() <= 1e-3


@cuda_only
@torch.no_grad()
def test_cuda_graph_reads_the_callers_images_in_place():
    """With the Triton patch embedding the graph reads contiguous, aligned fp32 images on the device where they
    are (its static input is never written); other images (a strided view, an unaligned one, fp16, on the CPU)
    are copied in first.  Every replay gives the uncaptured path's logits, in any order of the two ways."""
    model = _deit_ti_pair(seed=3)
    fast = build_fast_path(model, backend='triton', dtype=torch.float16, cuda_graph=True, batch_size=4, mlp='triton')
    plain = build_fast_path(model, backend='triton', dtype=torch.float16, batch_size=4, mlp='triton')
    assert fast.describe()['cuda_graph_input'] == 'read in place'
    a, b = (torch.randn(4, 3, 224, 224, generator=_gen(s)).to(DEVICE) for s in (6, 7))
    unaligned = torch.empty(a.numel() + 1, device=DEVICE)[1:].view_as(a).copy_(b)
    strided = b.transpose(2, 3).contiguous().transpose(2, 3)
    # each copy brings other values than the static input held (a, b alternate), so a copy always shows
    for images, in_place in ((a, True), (strided, False), (b, True), (a.half(), False), (unaligned, False),
                             (a.cpu(), False), (b, True)):
        before = fast._static_in.clone()
        out = fast(images)
        assert (out - plain(images)).abs().max().item() <= 1e-3
        assert torch.equal(fast._static_in, before) == in_place  # in place: the static input was not written


@cuda_only
@torch.no_grad()
def test_attention_choice_is_a_validated_candidate():
    choice, timings, refused = choose_attention(148, 32, 3, 64, 64 ** -0.5, torch.float16, DEVICE,
                                                with_triton=True)
    assert any(k.startswith('triton-') for k in timings) and 'sdpa-math' in timings
    assert 'sdpa-cudnn_attention' not in timings  # only at multiples of 128 tokens
    assert set(refused) == {k for k, ms in timings.items() if ms == float('inf')}, refused
    assert choice.ms == min(timings.values())
    qkv = torch.randn(4, 148, 3 * 192, device=DEVICE, dtype=torch.float16)
    out = run_attention(choice, qkv, 3, 64 ** -0.5)
    plain = plain_attention(qkv, 3, 64 ** -0.5)
    assert (out.double() - plain).abs().max().item() <= 4e-3 * max(1.0, plain.abs().max().item())
    assert isinstance(choice, AttentionChoice)


@cuda_only
@torch.no_grad()
def test_the_build_times_its_candidates_replayed_from_a_cuda_graph():
    """Every candidate is timed replayed from a CUDA graph (so every choice is one a graph can run): each kind
    of choice has at least two timed candidates and keeps the fastest of them, and the captured forward computes
    the model, within fp16 rounding of the fp32 eager model."""
    replays = []
    graph_ms = FP._cuda_graph_ms
    model = _deit_ti_pair(seed=5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FP, '_CHOICE_CACHE', {})
        mp.setattr(FP, '_cuda_graph_ms', lambda fn: replays.append(1) or graph_ms(fn))
        fast = build_fast_path(model, backend='triton', dtype=torch.float16, cuda_graph=True, batch_size=8)
    built = fast.describe()
    timed = 0
    # qkv, proj: cuBLAS on 8 x 148 rows and padded; proj_norm, mlp_residual, norm_qkv: unfused against the fused
    # tiles (width 192)
    for kind in ('attention', 'qkv', 'proj', 'proj_norm', 'mlp', 'fc2', 'mlp_residual', 'norm_qkv'):
        assert set(built[f'{kind}_ms']) == {str(n) for n in set(built['kept_counts'])}, kind
        for n, ms in built[f'{kind}_ms'].items():
            finite = {k: v for k, v in ms.items() if v is not None}
            assert len(finite) >= 2 and min(finite.values()) > 0, (kind, ms)
            assert finite[built[kind][n]] == min(finite.values()), (kind, n, ms)
            timed += len(finite)
    assert len(replays) == timed + sum(v is not None for v in built['patch_embedding_ms'].values())
    x = torch.randn(8, 3, 224, 224, generator=_gen(5)).to(DEVICE)
    ref = model(x)
    assert _close_in_fp16(fast(x), ref)


# ------------------------------------------------------------------------------------------------------------
# the command line: --fast-path on --eval and --speed-only

@pytest.fixture(scope='module')
def pruned_digits(tmp_path_factory):
    """A pruned digits-sized model as --prune writes it, and a 32x32 image folder."""
    import finetune
    from conftest import make_image_folder, official_checkpoint
    base = tmp_path_factory.mktemp('fast_cli')
    data = make_image_folder(base / 'data', per_class=(4, 6), size=(32, 32))
    dense = official_checkpoint(base / 'dense.pth', 'deit_digits_patch4_32', seed=4, num_classes=3)
    assert finetune.main(['--prune', '--prune_mode', 'random', '--prune_rate', '0.3', '--resume', dense,
                          '--model', 'deit_digits_patch4_32', '--data-path', data, '--device', 'cpu',
                          '--num_workers', '0', '--output_dir', str(base / 'out')]) == 0
    return {'data': data, 'path': str(base / 'out' / 'pruned_random_0.3.pth')}


def _cli(capsys, *argv):
    import finetune
    code = finetune.main(['--model', 'deit_digits_patch4_32', '--device', 'cpu', '--num_workers', '0',
                          *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_through_the_fast_path_gives_the_eager_results(capsys, pruned_digits):
    args = ['--eval', '--resume', pruned_digits['path'], '--data-path', pruned_digits['data'], '--batch-size', '4']
    code, eager, err = _cli(capsys, *args)
    assert code == 0, err
    code, fast, err = _cli(capsys, *args, '--fast-path', 'torch')
    assert code == 0, err
    assert 'Fast path (torch): ' in fast and '"dtype": "float32"' in fast
    # the kernels chosen per kept count, each kind of choice by its name (untimed on CPU: "torch" throughout)
    built = json.loads(next(l for l in fast.splitlines() if l.startswith('Fast path (torch): '))[19:])
    kinds = ('attention', 'qkv', 'norm_qkv', 'proj', 'proj_norm', 'mlp', 'fc2', 'mlp_residual')
    assert set(built) == {'dtype', 'cuda_graph_batch', 'dependent_launch', *kinds}
    assert built['cuda_graph_batch'] is None and built['dependent_launch'] is None  # no graph on CPU
    assert all(set(built[k].values()) == {'sdpa-default' if k == 'attention' else 'torch'} for k in kinds), built
    line = [l for l in eager.splitlines() if l.startswith('* Acc@1')][0]
    acc1, acc5, loss = (float(v) for v in line.split()[2::2])
    fast_line = [l for l in fast.splitlines() if l.startswith('* Acc@1')][0]
    f1, f5, floss = (float(v) for v in fast_line.split()[2::2])
    assert (f1, f5) == (acc1, acc5) and floss == pytest.approx(loss, abs=1e-3)  # 12 images, 2 batches of 6


def test_speed_only_through_the_fast_path_prints_both_speed_ups(capsys, pruned_digits):
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--batch-size', '4',
                          '--speed-repeats', '2', '--speed-warmup', '0', '--fast-path', 'torch')
    assert code == 0, err
    for name in ('dense model', 'dense model (fast path, torch)', 'pruned model (fast path, torch)'):
        assert f'Throughput of the {name}: ' in out
    speedups = [l for l in out.splitlines() if l.startswith('Speed-up of the pruned model')]
    assert len(speedups) == 2
    assert speedups[0].endswith('against the eager dense model (fp32)')
    assert re.search(r'against the fastest dense model \((eager dense model|dense model \(fast path, torch\))\): '
                     r'\d+\.\d\dx$', speedups[1]), speedups[1]


def test_speed_only_of_a_dense_model_through_the_fast_path_prints_its_one_speed_up(capsys):
    """A dense model has no pruned twin: --speed-only --fast-path times the eager model and the fast path on it, and
    prints the one speed-up there is, the path's over the eager model, as their throughputs' ratio (no line about a
    pruned model)."""
    code, out, err = _cli(capsys, '--speed-only', '--batch-size', '4', '--speed-repeats', '2', '--speed-warmup', '0',
                          '--fast-path', 'torch')
    assert code == 0, err
    throughput = {name: float(re.search(rf'^Throughput of the {re.escape(name)}: ([\d.]+) images/s$', out,
                                        re.M).group(1))
                  for name in ('dense model', 'dense model (fast path, torch)')}
    assert 'pruned model' not in out
    line = re.search(r'^Speed-up of the fast path \(torch\) over the eager model: (\d+\.\d\d)x$', out, re.M)
    ratio = throughput['dense model (fast path, torch)'] / throughput['dense model']
    assert line and float(line.group(1)) == pytest.approx(ratio, abs=0.01 + 0.01 * ratio), (line, throughput)


@pytest.mark.parametrize('faster', ['eager', 'fast path'])
def test_speed_only_through_the_fast_path_times_each_model_and_prints_the_speed_ups_of_its_throughputs(
        capsys, monkeypatch, pruned_digits, faster):
    """--speed-only --fast-path on a pruned model times three runs: the eager dense model, the fast path of the
    dense model (every block keeps every token) and the fast path of the pruned model (its own kept counts), and
    prints the pruned path's throughput over the eager dense model's, then over the faster of the two dense runs,
    named.  The throughputs are scripted here (the timer is engine's, tested on its own), the dense path scripted
    slower than the eager model or faster, so that each ratio is known."""
    import finetune
    from models.checkpoint import create_model
    scripted = {'dense': 300.0, 'dense_fast': 100.0, 'pruned': 450.0}
    if faster == 'fast path':
        scripted.update(dense=100.0, dense_fast=300.0)
    timed = {}

    def measure(runs, *args, **kwargs):
        timed.update(runs)
        return {name: scripted[name] for name in runs}
    monkeypatch.setattr(finetune, 'measure_throughput', measure)
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--batch-size', '4',
                          '--speed-repeats', '1', '--speed-warmup', '0', '--fast-path', 'torch')
    assert code == 0, err
    kept = models.kept_token_counts(create_model('deit_digits_patch4_32', checkpoint_path=pruned_digits['path'],
                                                 num_classes=3))
    assert any(n < 65 for n in kept)  # (64 patches and the class token)
    assert timed['dense_fast'].describe()['kept_counts'] == [65] * len(kept)
    assert timed['pruned'].describe()['kept_counts'] == kept
    speedups = [l for l in out.splitlines() if l.startswith('Speed-up of the pruned model')]
    assert speedups[0].startswith(f'Speed-up of the pruned model: {450 / scripted["dense"]:.2f}x (FLOPs ratio ')
    name = 'eager dense model' if faster == 'eager' else 'dense model (fast path, torch)'
    assert speedups[1] == f'Speed-up of the pruned model against the fastest dense model ({name}): 1.50x'


def test_the_command_line_builds_the_path_for_its_batch_size(capsys, monkeypatch, pruned_digits):
    """The build times its kernels (on CUDA) at the batch size it is given, 64 if none: the command line gives it
    the batch it runs, for every backend, not only for the one it captures a CUDA graph for (--fast-path torch on a
    GPU used to time its attention at 64 images whatever --batch-size said)."""
    built, real = [], FP.build_fast_path

    def recording(model, **kwargs):
        built.append(kwargs)
        print(f'(build {len(built)})')
        return real(model, **kwargs)
    monkeypatch.setattr(FP, 'build_fast_path', recording)
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--batch-size', '3',
                          '--speed-repeats', '1', '--speed-warmup', '0', '--fast-path', 'torch')
    assert code == 0, err
    assert [(k['batch_size'], k['cuda_graph']) for k in built] == [(3, False), (3, False)]  # dense, pruned
    # each build said before it starts (a first one on a GPU compiles for tens of seconds) and its time after it
    lines = out.splitlines()
    for i, name in ((1, 'dense model'), (2, 'pruned model')):
        at = lines.index(f'(build {i})')
        assert lines[at - 1] == f'Building the fast path (torch) of the {name} on cpu ...'
        assert re.fullmatch(rf'Fast path of the {name} built in \d+\.\d s', lines[at + 1]), lines[at + 1]
    code, out, err = _cli(capsys, '--eval', '--resume', pruned_digits['path'], '--data-path', pruned_digits['data'],
                          '--batch-size', '4', '--fast-path', 'torch')
    assert code == 0, err
    assert built[2]['batch_size'] == 6  # the evaluation's batches: 1.5 times --batch-size, as DeiT's


def test_a_build_on_a_gpu_says_what_takes_its_time_before_it_starts(capsys, monkeypatch):
    """On CUDA the announcement says what the build of each backend spends its time on: 'triton' times every
    candidate kernel (compiling it first where Triton's cache lacks it) and captures the graph for the batch,
    'torch' times SDPA's attention backends (its build's only timed choice), 'compile' times nothing and compiles
    at its first forward (on CPU too); then the seconds."""
    import argparse
    import finetune
    calls = []
    monkeypatch.setattr(FP, 'build_fast_path', lambda model, **kw: calls.append(kw) or print('(build)') or model)
    model = tiny_cc(1)
    for device, backend in (('cuda', 'triton'), ('cuda', 'torch'), ('cuda', 'compile'), ('cpu', 'compile')):
        assert finetune.fast_model(argparse.Namespace(fast_path=backend), model, torch.device(device), 256,
                                   torch.float16, 'pruned model') is model
    lines = capsys.readouterr().out.splitlines()
    assert lines[0::3] == [
        'Building the fast path (triton) of the pruned model on cuda: kernels timed and a CUDA graph captured at '
        "batch 256, each kernel compiled first where Triton's cache lacks it ...",
        'Building the fast path (torch) of the pruned model on cuda: attention backends timed at batch 256 ...',
        'Building the fast path (compile) of the pruned model on cuda; torch.compile compiles it at its first '
        'forward ...',
        'Building the fast path (compile) of the pruned model on cpu; torch.compile compiles it at its first '
        'forward ...']
    assert lines[1::3] == ['(build)'] * 4
    assert all(re.fullmatch(r'Fast path of the pruned model built in \d+\.\d s', l) for l in lines[2::3]), lines
    assert [(kw['backend'], kw['cuda_graph'], kw['batch_size']) for kw in calls] == [
        ('triton', True, 256), ('torch', False, 256), ('compile', False, 256), ('compile', False, 256)]


@pytest.mark.parametrize('failure, line', [
    (K.TritonError('out of resource: shared memory, Required: 232448, Hardware limit: 101376'),
     'error: --fast-path torch: Triton cannot compile or run its kernels on this device (TritonError: out of '
     'resource: shared memory, Required: 232448, Hardware limit: 101376); --fast-path compile or torch runs '
     'without them'),
    (CaptureError('capturing the forward in a CUDA graph failed (RuntimeError: operation not permitted when stream '
                  'is capturing)'),
     'error: --fast-path torch: capturing the forward in a CUDA graph failed (RuntimeError: operation not '
     'permitted when stream is capturing); --fast-path torch runs without CUDA graphs'),
], ids=['triton-cannot-serve', 'graph-cannot-capture'])
def test_a_path_the_gpu_cannot_build_is_one_line(capsys, monkeypatch, pruned_digits, failure, line):
    """Building the path runs its kernels (the timing, the graph's warm-up) and captures a CUDA graph: a GPU
    Triton cannot compile for or launch on, or a graph that cannot capture the forward (or a candidate while
    timing it), stops the command there with one line naming the failure and the way round it, not a
    traceback."""

    def cannot(*args, **kwargs):
        raise failure
    monkeypatch.setattr(FP, 'build_fast_path', cannot)
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--batch-size', '4',
                          '--speed-repeats', '2', '--speed-warmup', '0', '--fast-path', 'torch')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == line


def test_a_fast_path_that_does_not_fit_says_the_batch_is_too_large(capsys, monkeypatch, pruned_digits):

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(OUT_OF_MEMORY)
    monkeypatch.setattr(FP, 'build_fast_path', out_of_memory)
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--batch-size', '4',
                          '--speed-repeats', '2', '--speed-warmup', '0', '--fast-path', 'torch')
    assert (code, err.strip()) == (1, f'error: out of GPU memory ({OUT_OF_MEMORY_FIGURES}) with --batch-size 4 per '
                                      f'process: a smaller --batch-size needs less; nothing was written')


def test_out_of_memory_while_timing_is_said_as_such(monkeypatch):
    """A candidate that computed the right thing but could not be timed is a CaptureError (the graph could not
    capture it), except when the GPU ran out of memory: that propagates as itself, so the command line says the
    batch is too large (finetune.out_of_memory) instead of blaming CUDA graphs."""
    ref = torch.zeros(3)

    def timing_fails(failure):
        def time_candidate(run, cand):
            raise failure
        monkeypatch.setattr(FP, '_time_candidate', time_candidate)

    timing_fails(torch.OutOfMemoryError(OUT_OF_MEMORY))
    with pytest.raises(torch.OutOfMemoryError):
        FP._fastest([AttentionChoice('sdpa')], lambda c: ref, ref, tol=0.0)
    timing_fails(RuntimeError('operation not permitted when stream is capturing'))
    with pytest.raises(CaptureError, match='operation not permitted'):
        FP._fastest([AttentionChoice('sdpa')], lambda c: ref, ref, tol=0.0)


@pytest.mark.parametrize('failure', [RuntimeError('out of resources'), ValueError('head_dim 24'),
                                     TypeError('unexpected keyword'), AttributeError('no attribute'),
                                     NameError('name is not defined')], ids=lambda e: type(e).__name__)
def test_a_candidate_that_raises_is_refused_unless_it_is_a_mistake_in_the_code(monkeypatch, failure):
    """A candidate whose check raises a RuntimeError or ValueError (a backend refusing these shapes, a tile that does
    not fit) is refused, the reason kept, and the fastest of the others chosen; an AttributeError, NameError or
    TypeError is a mistake in the code that runs the candidates, which a refusal would hide behind a slower
    choice: it propagates."""
    ref = torch.zeros(3)
    script = {'sdpa-flash_attention': 1.0, 'sdpa-math': 2.0, 'sdpa-efficient_attention': 3.0}
    monkeypatch.setattr(FP, '_time_candidate', lambda run, cand: script[cand.label])
    candidates = [AttentionChoice('sdpa', backend=b) for b in ('EFFICIENT_ATTENTION', 'FLASH_ATTENTION', 'MATH')]

    def check(cand):
        if cand.backend == 'FLASH_ATTENTION':
            raise failure
        return ref
    if isinstance(failure, (AttributeError, NameError, TypeError)):
        with pytest.raises(type(failure), match=str(failure)):
            FP._fastest(candidates, check, ref, tol=0.0)
        return
    best, ms, timings, refused = FP._fastest(candidates, check, ref, tol=0.0)
    assert (best.label, ms) == ('sdpa-math', 2.0)
    assert timings == {'sdpa-efficient_attention': 3.0, 'sdpa-flash_attention': float('inf'), 'sdpa-math': 2.0}
    assert refused == {'sdpa-flash_attention': f'{type(failure).__name__}: {failure}'}


def test_a_candidate_is_kept_within_a_tolerance_relative_to_the_reference(monkeypatch):
    """How far a timed candidate's output may be from the fp32 reference: 8 units in the last place of its
    operands' dtype, 5e-3 at least, times the reference's largest magnitude, 1 at least (written out here for each
    dtype and magnitudes below and above 1).  A candidate off by a little less is kept, by a little more refused."""
    monkeypatch.setattr(FP, '_time_candidate', lambda run, cand: 1.0)
    for dtype, ulp in ((torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7), (torch.float32, 2 ** -23)):
        for top in (0.25, 1.0, 40.0):
            ref = torch.tensor([0.1, -top, 0.0])
            tol = max(8 * ulp, 5e-3) * max(1.0, top)
            assert FP._tolerance(dtype, ref) == pytest.approx(tol, rel=1e-6), (dtype, top)
            for off, kept in ((0.99, True), (1.01, False)):
                out = ref + torch.tensor([0.0, off * tol, 0.0])
                best = FP._fastest([AttentionChoice('sdpa')], lambda c: out, ref, FP._tolerance(dtype, ref))[0]
                assert (best is not None) == kept, (dtype, top, off)


def test_the_triton_backend_without_triton_is_refused_before_any_work(capsys, monkeypatch, pruned_digits):
    """A CUDA torch without Triton (torch's Windows wheels do not bring it): the build refuses the Triton backend
    (it used to build, then fail on the first forward with a message about TRITON_INTERPRET), and the command
    line says so in one line before loading anything; the torch backend still runs."""
    monkeypatch.setattr(K, 'HAS_TRITON', False)
    model = tiny_cc(0)
    with pytest.raises(ValueError, match=r"^fast path: backend 'triton' needs Triton, which this Python cannot "
                                         r"import \(backend 'torch' runs without it\)$"):
        build_fast_path(model, backend='triton')
    x = images()
    assert _close(build_fast_path(model, backend='torch')(x), model(x))
    monkeypatch.setenv('TRITON_INTERPRET', '1')  # past the check for a GPU, as on a CUDA machine
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--fast-path', 'triton')
    assert (code, err.strip()) == (2, 'error: --fast-path triton needs Triton, which this Python cannot import (pip '
                                      'install triton, or use --fast-path torch)')
    assert 'Model ' not in out


def test_triton_interpret_set_after_triton_was_imported_is_one_line(pruned_digits):
    """finetune.main called from Python after TRITON_INTERPRET=1 was set, but with Triton imported before it (by
    torch and models; Triton reads it when it decorates its own library's functions): the check passed, the
    kernels were built for the interpreter and failed inside at their first call, a traceback.  Now one line before
    the model is loaded."""
    import subprocess
    from conftest import subprocess_env
    if CUDA:
        pytest.skip('on a GPU the Triton fast path is available')
    script = (
        'import os, sys, finetune\n'
        'os.environ["TRITON_INTERPRET"] = "1"\n'
        f'sys.exit(finetune.main(["--speed-only", "--resume", {pruned_digits["path"]!r}, "--fast-path", "triton", '
        '"--model", "deit_digits_patch4_32", "--device", "cpu", "--speed-repeats", "1", "--speed-warmup", "0"]))\n')
    env = {k: v for k, v in subprocess_env().items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert (run.returncode, run.stderr.strip()) == (
        2, 'error: --fast-path triton on CPU: TRITON_INTERPRET=1 was set after Triton was imported (torch and models '
           'import it), which then compiles its kernels for a GPU'), run.stderr[-2000:]
    assert 'Model ' not in run.stdout


@pytest.mark.parametrize('argv, message', [
    (['--fast-path', 'torch', '--output_dir', '{tmp}/ft', '--data-set', 'DIGITS'],
     '--fast-path is an inference path: use it with --eval or --speed-only'),
    (['--prune', '--fast-path', 'torch'], '--fast-path is an inference path: use it with --eval or --speed-only'),
    (['--speed-only', '--speed-protocol', 'original', '--fast-path', 'torch'], '--fast-path does not apply'),
    (['--speed-only', '--fast-path', 'triton'], '--fast-path triton needs a CUDA GPU'),
])
def test_fast_path_flag_mistakes_are_one_line(capsys, monkeypatch, tmp_path, argv, message):
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    if CUDA and 'triton' in argv:
        pytest.skip('on a GPU the Triton fast path is available')
    code, out, err = _cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], err
    assert not (tmp_path / 'ft').exists()


@pytest.mark.parametrize('mode', [[], ['--prune'], ['--eval'], ['--speed-only']],
                         ids=lambda m: m[0] if m else 'finetune')
def test_fast_path_none_outside_inference_is_noted(mode):
    """--fast-path none (the eager model) with finetuning or --prune asks for nothing those runs could do otherwise:
    noted as having no effect, as --distillation-type none is with --eval, not accepted without a word (another
    backend is refused there: test_fast_path_flag_mistakes_are_one_line); with --eval and --speed-only it chooses
    the eager model, so it is not noted."""
    import finetune
    parser = finetune.get_args_parser()
    args = parser.parse_args([*mode, '--fast-path', 'none'])
    notes = [n for n in finetune.unused_flag_notes(args, parser) if '--fast-path' in n]
    if mode in ([], ['--prune']):
        assert notes == ['note: --fast-path none has no effect: the fast path is an inference path (--eval and '
                         '--speed-only); finetuning and --prune run the eager model']
    else:
        assert notes == []


def test_compile_on_a_cpu_without_a_compiler_is_refused_before_any_work(capsys, monkeypatch, pruned_digits):
    """torch.compile builds CPU kernels with a C++ compiler: without a working one, --fast-path compile on the CPU
    stopped in a traceback (torch._inductor's InvalidCxxCompiler) at the first compiled forward, after loading the
    model (and for --eval listing the data).  It is one line before anything is loaded now."""
    import torch._inductor.config as inductor_config
    import finetune
    from conftest import no_work
    monkeypatch.setattr(finetune, 'load_model', no_work)
    # torch's own patch, not monkeypatch (which would delete the entry on undo: see the recompile-limit test)
    with inductor_config.patch({'cpp.cxx': (None, os.path.join(os.sep, 'nonexistent', 'g++'))}):
        code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--fast-path', 'compile')
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: --fast-path compile on the CPU needs a C++ compiler for torch.compile's "
                               "kernels, and none works here (") and lines[0].endswith('--fast-path torch runs '
                                                                                       'without one'), lines[0]
    assert out == ''


def test_compile_on_a_gpu_without_triton_is_refused_before_any_work(capsys, monkeypatch, pruned_digits):
    """torch.compile writes its CUDA kernels in Triton: on a GPU without Triton (torch's Windows wheels do not bring
    it), --fast-path compile stopped in a traceback at the first compiled forward, after loading the model.  It is
    one line before anything is loaded now (the device resolved as on a CUDA machine)."""
    import finetune
    from conftest import no_work
    monkeypatch.setattr(K, 'HAS_TRITON', False)
    monkeypatch.setattr(finetune, 'resolve_device', lambda requested: 'cuda')
    monkeypatch.setattr(finetune, 'load_model', no_work)
    code, out, err = _cli(capsys, '--speed-only', '--resume', pruned_digits['path'], '--fast-path', 'compile')
    assert (code, err.strip()) == (2, 'error: --fast-path compile on a GPU needs Triton (torch.compile writes its CUDA '
                                      'kernels with it), which this Python cannot import (pip install triton, or use '
                                      '--fast-path torch)')
    assert out == ''


def test_a_model_the_fast_path_does_not_compute_is_refused_before_the_data_is_listed(capsys, monkeypatch, tmp_path,
                                                                                      pruned_digits):
    """A ViT that Clip & Concat takes but the fast path does not compute (here a hybrid, whose patch embedding is a
    CNN) was refused only as the path was built: --eval had loaded the model and listed the data set (minutes on
    ImageNet) first.  It is one line before either now; without --fast-path the same command runs."""
    import finetune
    from conftest import no_work, official_checkpoint
    hybrid = official_checkpoint(tmp_path / 'hybrid.pth', 'vit_tiny_r_s16_p8_224', img_size=32, num_classes=3)
    argv = ['--model', 'vit_tiny_r_s16_p8_224', '--input-size', '32', '--eval', '--resume', hybrid, '--data-path',
            pruned_digits['data'], '--device', 'cpu', '--num_workers', '0', '--batch-size', '4']
    with monkeypatch.context() as m:
        m.setattr(finetune, 'build_data', no_work)
        m.setattr(finetune, 'load_model', no_work)
        code = finetune.main([*argv, '--fast-path', 'torch'])
    out, err = capsys.readouterr()
    assert (code, err.strip()) == (2, 'error: --fast-path torch: fast path: a HybridEmbed patch embedding (only timm '
                                      'PatchEmbed) is not supported (--model vit_tiny_r_s16_p8_224; without '
                                      '--fast-path it runs as the eager model)')
    assert out == ''
    assert finetune.main(argv) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# arguments the path and its kernels refuse (programming errors of a caller: a ValueError naming the argument)

@pytest.mark.parametrize('kwargs, message', [
    (dict(backend='cuda'), r"backend must be one of .*, got 'cuda'"),
    (dict(attention='flash'), r"attention must be one of .*, got 'flash'"),
    (dict(mlp='fused'), r"mlp must be one of .*, got 'fused'"),
    (dict(backend='torch', attention='triton'), r"attention='triton' and mlp='triton' need backend='triton'"),
    (dict(backend='torch', mlp='triton'), r"attention='triton' and mlp='triton' need backend='triton'"),
    (dict(backend='triton', mlp='triton', dtype=torch.float64), r"need dtype float16, bfloat16 or float32 \(the "),
    (dict(backend='triton', attention='triton', dtype=torch.float64), r"need dtype float16, bfloat16 or float32"),
])
def test_build_refuses_unknown_modes_and_triton_parts_without_the_triton_backend(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_fast_path(tiny_cc(0), **kwargs)


@needs_triton
def test_the_triton_matrix_products_refuse_fp64_operands():
    """The attention, linear and patch-embedding kernels accumulate their products in fp32, which Triton's fp64
    product does not take: the interpreter wrote the patch embedding's fp32 sums into an fp64 buffer (values like
    1e-315).  fp64 operands are refused; an fp64 path built with 'auto' takes torch's products and SDPA."""
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x, ids = torch.zeros(2, 5, 16, **f64), torch.arange(3, device=DEVICE)
    w = torch.zeros(16, 16, **f64)
    calls = {'attention': lambda: K.attention_triton(torch.zeros(2, 3, 3 * 2 * 16, **f64), 2, 0.25),
             'matrix product': lambda: K.linear_gelu_triton(x[:, :3], w, None),
             'patch embedding': lambda: K.patch_embed_triton_(x, torch.zeros(2, 1, 8, 8, **f64), w,
                                                              torch.zeros(4, 16, **f64), 1, (4, 4))}
    calls['matrix product, residual'] = lambda: K.linear_residual_scatter_triton_(x, ids, x[:, :3], w, None, None)
    for what, call in calls.items():
        with pytest.raises(ValueError, match=rf'^the Triton {what.split(",")[0]} takes float16, bfloat16 or float32 '
                                             r'operands, got float64$'):
            call()
    model = tiny_cc(20)
    x = images(seed=20)
    fast = build_fast_path(model, backend='triton', dtype=torch.float64, residual_dtype=torch.float64)
    assert fast.describe()['patch_embedding'] == 'torch' and set(fast.describe()['mlp'].values()) == {'torch'}
    assert _close(fast(x), model(x))


@pytest.mark.parametrize('kwargs', [dict(residual_dtype=torch.int32), dict(residual_dtype=torch.uint8),
                                    dict(dtype=torch.int8), dict(dtype=torch.bool), dict(dtype='float16')],
                         ids=['int32-stream', 'uint8-stream', 'int8-products', 'bool-products', 'a-string'])
def test_build_refuses_dtypes_that_are_not_floating_point(kwargs):
    """An integer token buffer truncated every residual sum (logits off by 0.2 here, without a word); integer
    products failed on the first forward with torch's words; a dtype's name failed inside a cast.  Each is refused
    at build time, naming the argument."""
    (name, value), = kwargs.items()
    with pytest.raises(ValueError, match=rf'^{name} must be torch.float16, torch.bfloat16, torch.float32 or '
                                         rf'torch.float64 \(or None\), got {re.escape(repr(value))}$'):
        build_fast_path(tiny_cc(0), backend='torch', **kwargs)


@torch.no_grad()
def test_every_floating_dtype_computes_the_model():
    """The refusal above leaves every floating dtype the path computes: fp64 products and stream agree with the
    eager fp32 model to fp32 rounding, the half-precision ones to their own."""
    model = tiny_cc(19)
    x = images(seed=19)
    ref = model(x)
    scale = max(1.0, ref.abs().max().item())
    for dtype, residual, tol in [(torch.float64, torch.float64, 1e-5), (torch.float16, torch.float16, 1e-2),
                                 (torch.bfloat16, torch.float32, 5e-2), (None, None, 1e-5)]:
        fast = build_fast_path(model, backend='torch', dtype=dtype, residual_dtype=residual)
        assert (fast(x) - ref).abs().max().item() <= tol * scale, (dtype, residual)


@needs_triton
@pytest.mark.parametrize('three_c, heads, message', [
    (3 * 2 * 32 + 3, 2, r'qkv must be \(B, n, 3\*H\*D\)'),  # not three equal parts of whole heads
    (3 * 2 * 24, 2, r'power-of-two head_dim >= 16, got 24'),
    (3 * 4 * 8, 4, r'power-of-two head_dim >= 16, got 8'),
])
def test_attention_kernel_refuses_shapes_it_cannot_tile(three_c, heads, message):
    with pytest.raises(ValueError, match=message):
        K.attention_triton(_randn(1, 5, three_c, seed=1, dtype=torch.float16), heads, 0.125)
