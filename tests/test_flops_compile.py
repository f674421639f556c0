"""FLOPs by the paper's formula (docs/method.md) against torch's own counter, and torch.compile(fullgraph=True)
of a pruned model.

``models.count_macs`` counts multiply-accumulates the paper's way: patch embedding, per block with n kept tokens
qkv 3nC², attention 2n²C, projection nC², MLP 8nC², then the head. ``torch.utils.flop_counter.FlopCounterMode``
counts FLOPs (2 per MAC) of matmul-like aten ops only: convolution, (add)mm, bmm and the fused
scaled-dot-product-attention kernels. Neither counts layernorm, GELU, softmax, residual adds or biases, so the
conventions match and the two should agree (in fact exactly) for dense and pruned models.

The attention op is checked on its own: on CPU timm's fused path dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which the counter registers (QKᵀ and AV: 4·n²·C FLOPs per
image and block). The unfused path (``fused_attn = False``, the one used while scoring) runs QKᵀ and AV as
``aten.bmm``; both paths are checked, so a backend whose SDPA is not counted cannot pass silently. A torch whose
counter has no formula for that CPU kernel (2.11's counted no attention at all on a CPU) runs SDPA on its math
backend here, as plain batched products, as benchmarks/model_zoo.py's counter_gmacs does everywhere.
"""
import contextlib

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, flop_registry

import models
import pruning
from conftest import formula_macs, pruned_model


# whether this torch's counter counts the fused SDPA kernel of a CPU (else SDPA runs on its math backend here)
CPU_FUSED_COUNTED = 'aten._scaled_dot_product_flash_attention_for_cpu' in {str(op) for op in flop_registry}


def _count(model, batch=2, size=224):
    x = torch.randn(batch, 3, size, size)
    counter = FlopCounterMode(display=False)
    backend = contextlib.nullcontext() if CPU_FUSED_COUNTED else sdpa_kernel([SDPBackend.MATH])
    with torch.no_grad(), backend, counter:
        model(x)
    per_op = {str(op): int(v) for op, v in counter.get_flop_counts()['Global'].items()}
    return counter.get_total_flops(), per_op


def _attention_flops(per_op):
    """FLOPs the counter attributed to attention: SDPA kernels (fused) or batched matmuls (unfused)."""
    sdpa = sum(v for k, v in per_op.items() if 'scaled_dot_product' in k)
    bmm = sum(v for k, v in per_op.items() if k in ('aten.bmm', 'aten.baddbmm'))
    return sdpa, bmm


@pytest.mark.parametrize('fused', [True, False], ids=['fused_sdpa', 'unfused'])
@pytest.mark.parametrize('rate', [0.0, 0.25, 0.4])
@pytest.mark.parametrize('name', ['cc_deit_tiny_patch16_224', 'cc_deit_small_patch16_224'])
def test_design_formula_matches_torch_flop_counter(name, rate, fused):
    model = pruned_model(name, rate)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    channels = models.kept_token_counts(model)
    if rate:
        assert min(channels) < model.num_tokens, 'masks were not applied'
    batch = 2
    total, per_op = _count(model, batch)
    expected = 2 * models.count_macs(model)
    assert abs(total / batch - expected) / expected < 0.02, (total / batch, expected, per_op)

    # The counter really counted attention, on whichever path ran: 2 matmuls of n²·C MACs per block.
    C = model.embed_dim
    attention_expected = batch * sum(2 * 2 * n * n * C for n in channels)
    sdpa, bmm = _attention_flops(per_op)
    if fused and CPU_FUSED_COUNTED:
        assert sdpa > 0, f'no scaled-dot-product-attention op was counted: {per_op}'
        assert bmm == 0
        assert sdpa == attention_expected
    else:
        assert sdpa == 0
        assert bmm == attention_expected
    # Patch embedding (a convolution) and everything linear (qkv, proj, MLP, head) by their own formulas.
    proj = model.patch_embed.proj
    patch = model.patch_embed.num_patches * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * C
    assert per_op['aten.convolution'] == batch * 2 * patch
    hidden = model.blocks[0].mlp.fc1.out_features
    linear = sum(4 * n * C * C + 2 * n * C * hidden for n in channels) + C * model.num_classes
    assert per_op['aten.addmm'] == batch * 2 * linear


def test_differential_attention_counts_its_products_at_their_width():
    """timm's DiffAttention (vit_dwee_*) runs two attention maps of half-width heads against values of twice that
    width: QK^T and AV each cost n^2 C, as in a standard block, and the formula with the attention width of
    models.attention_width (C there, not heads x head_dim = C/2) counts what the counter counts, pruned or not."""
    torch.manual_seed(0)
    for rate in (0.0, 0.4):
        model = models.create_model('vit_dwee_patch16_reg1_gap_256', img_size=64, depth=2, num_classes=5).eval()
        assert models.attention_width(model.blocks[0].attn) == model.embed_dim
        assert model.blocks[0].attn.num_heads * model.blocks[0].attn.head_dim == model.embed_dim // 2
        if rate:
            pruning.apply_masks(model, pruning.random_masks(len(model.blocks), model.patch_embed.num_patches, rate,
                                                            generator=torch.Generator().manual_seed(0)))
            assert min(models.kept_token_counts(model)) < model.num_tokens
        for blk in model.blocks:
            blk.attn.fused_attn = False  # (the fused path runs AV once per map: two, where the method has one)
        total, per_op = _count(model, batch=1, size=64)
        assert total == 2 * models.count_macs(model), (total, 2 * models.count_macs(model), per_op)

def test_a_timm_vit_without_blocks_counts_its_patch_embedding_and_head():
    """count_macs takes plain timm ViTs, and timm builds and runs one of depth 0 (no block to convert): its
    embedding and head, as torch's counter counts them; a count per block is refused for a block it lacks."""
    torch.manual_seed(0)
    model = timm.create_model('vit_small_patch16_224', img_size=32, depth=0, embed_dim=64, num_heads=2,
                              num_classes=5).eval()
    total, _ = _count(model, batch=1, size=32)
    assert models.count_macs(model) * 2 == total == 2 * (4 * 3 * 16 * 16 * 64 + 64 * 5)
    assert models.count_macs(model, channels=[]) == models.count_macs(model)
    with pytest.raises(ValueError, match='channels holds 1 counts for a model of 0 blocks'):
        models.count_macs(model, channels=[5])


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'deit_small_patch16_224'])
def test_dense_timm_deit_counts_like_the_paper(name):
    """timm's own DeiT (not our patched model) against the formula, and the paper's 1.3 / 4.6 GFLOPs."""
    torch.manual_seed(0)
    dense = timm.create_model(name).eval()
    cc = timm.create_model('cc_' + name).eval()
    total, per_op = _count(dense, batch=1)
    assert abs(total - 2 * models.count_macs(cc)) / total < 0.02
    assert sum(_attention_flops(per_op)) > 0
    paper = {'deit_tiny_patch16_224': 1.3, 'deit_small_patch16_224': 4.6}[name]
    assert round(models.count_macs(cc) / 1e9, 1) == paper
    # exactly the formula for 196 patches and the class token, 197 tokens in every block, timm's model and ours
    assert models.count_macs(dense) == models.count_macs(cc) == formula_macs(dense, [197] * 12)


def test_pruning_lowers_counted_flops_as_predicted():
    """The counter sees the pruned model do less work, by the ratio the formula predicts."""
    dense_total, _ = _count(pruned_model('cc_deit_tiny_patch16_224', 0.0), batch=1)
    pruned = pruned_model('cc_deit_tiny_patch16_224', 0.4)
    pruned_total, _ = _count(pruned, batch=1)
    predicted = models.count_macs(pruned) / models.count_macs(pruned_model('cc_deit_tiny_patch16_224', 0.0))
    assert pruned_total < 0.75 * dense_total
    assert abs(pruned_total / dense_total - predicted) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)

def _reset_dynamo():
    torch._dynamo.reset()


def test_pruned_model_captures_as_one_graph_and_follows_new_masks():
    """Dynamo traces a pruned model without graph breaks (fullgraph=True raises on any), the traced model gives
    the eager output, and new masks (new gather indices of other lengths) are picked up, not served from a stale graph.
    The 'eager' backend checks the capture only; the inductor test below checks generated code."""
    _reset_dynamo()
    model = pruned_model('cc_deit_tiny_patch16_224', 0.25)
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0
        assert explanation.graph_count == 1
        before = models.kept_token_counts(model)
        pruning.apply_masks(model, pruning.random_masks(12, 196, 0.4, generator=torch.Generator().manual_seed(1)))
        assert models.kept_token_counts(model) != before
        assert (compiled(x) - model(x)).abs().max().item() < 1e-4
    _reset_dynamo()


@pytest.mark.slow
def test_pruned_model_compiles_with_inductor_and_matches_eager():
    """torch.compile(fullgraph=True) with the default backend (inductor; C++ on CPU, Triton on GPU)."""
    _reset_dynamo()
    model = pruned_model('cc_deit_tiny_patch16_224', 0.25)
    assert any(not blk.dense for blk in model.blocks)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    assert out.shape == eager.shape == (2, 1000)
    assert (out - eager).abs().max().item() < 1e-4
    _reset_dynamo()


def test_count_macs_looks_through_a_torch_compile_wrapper():
    """A compiled model (torch.compile wraps it) is counted as the model itself, a head without pooling too
    (whose reading of the tokens is told by the model's class, not the wrapper's)."""
    torch.manual_seed(0)
    for pool in ('token', ''):
        cc = models.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=5,
                                 global_pool=pool)
        pruning.apply_masks(cc, pruning.random_masks(2, 16, 0.4, generator=torch.Generator().manual_seed(0)))
        assert models.count_macs(torch.compile(cc)) == models.count_macs(cc)


@pytest.mark.parametrize('model', [torch.nn.Linear(2, 2), None], ids=['linear', 'none'])
def test_count_macs_of_what_is_no_vision_transformer_says_so(model):
    with pytest.raises(TypeError, match='count_macs counts a timm VisionTransformer'):
        models.count_macs(model)
