"""FLOPs by the paper's formula (docs/method.md) against torch's own counter, and torch.compile(fullgraph=True) of a pruned model.

``models.count_macs`` counts multiply-accumulates the paper's way: patch embedding, per block with n kept tokens
qkv 3nC², attention 2n²C, projection nC², MLP 8nC², then the head. ``torch.utils.flop_counter.FlopCounterMode``
counts FLOPs (2 per MAC) of matmul-like aten ops only: convolution, (add)mm, bmm and the fused
scaled-dot-product-attention kernels. Neither counts layernorm, GELU, softmax, residual adds or biases, so the
conventions match and the two should agree (in fact exactly) for dense and pruned models.

The attention op is checked on its own: on CPU timm's fused path dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which the counter registers (QKᵀ and AV: 4·n²·C FLOPs per
image and block). The unfused path (``fused_attn = False``, the one used while scoring) runs QKᵀ and AV as
``aten.bmm``; both paths are checked, so a backend whose SDPA is not counted cannot pass silently.
"""
import json
import os

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
import pruning


def _pruned(name, rate, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    if rate:
        depth, num_patches = len(model.blocks), model.num_tokens - 1
        pruning.apply_masks(model, pruning.random_masks(depth, num_patches, rate,
                                                        generator=torch.Generator().manual_seed(seed)))
    return model


def _count(model, batch=2, size=224):
    x = torch.randn(batch, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
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
    model = _pruned(name, rate)
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
    if fused:
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


def test_pruning_lowers_counted_flops_as_predicted():
    """The counter sees the pruned model do less work, by the ratio the formula predicts."""
    dense_total, _ = _count(_pruned('cc_deit_tiny_patch16_224', 0.0), batch=1)
    pruned = _pruned('cc_deit_tiny_patch16_224', 0.4)
    pruned_total, _ = _count(pruned, batch=1)
    predicted = models.count_macs(pruned) / models.count_macs(_pruned('cc_deit_tiny_patch16_224', 0.0))
    assert pruned_total < 0.75 * dense_total
    assert abs(pruned_total / dense_total - predicted) < 0.02


def _model_zoo():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'model_zoo.py')
    spec = importlib.util.spec_from_file_location('model_zoo', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_rows_compute_the_same_function():
    """benchmarks/model_zoo.py times like against like: timm's DeiT loaded with our weights, our pruned model and
    the boolean-mask re-implementation of the original code give the same logits, and count the same FLOPs."""
    zoo = _model_zoo()
    model = _pruned('cc_deit_tiny_patch16_224', 0.0)
    dense = zoo.timm_twin(model, 'deit_tiny_patch16_224', torch.device('cpu'))
    ours = zoo.pruned_copy(model, zoo.plan(None, 12, 196, 0.3, seed=0))
    assert len(set(models.kept_token_counts(ours))) > 1  # layers keep different numbers of tokens
    boolean = zoo.BooleanMaskViT(dense, [blk.attn.token_index for blk in ours.blocks]).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max().item() < 1e-4
        assert (boolean(x) - ours(x)).abs().max().item() < 1e-4
        assert (boolean(x) - dense(x)).abs().max().item() > 1e-3  # pruning changed the function
    assert _count(boolean)[0] == _count(ours)[0]


# ---------------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)

def _reset_dynamo():
    torch._dynamo.reset()


def test_pruned_model_captures_as_one_graph_and_follows_new_masks():
    """Dynamo traces a pruned model without graph breaks (fullgraph=True raises on any), the traced model gives
    the eager output, and new masks (new gather indices of other lengths) are picked up, not served from a stale graph.
    The 'eager' backend checks the capture only; the inductor test below checks generated code."""
    _reset_dynamo()
    model = _pruned('cc_deit_tiny_patch16_224', 0.25)
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
    model = _pruned('cc_deit_tiny_patch16_224', 0.25)
    assert any(not blk.dense for blk in model.blocks)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        eager = model(x)
        out = compiled(x)
    assert out.shape == eager.shape == (2, 1000)
    assert (out - eager).abs().max().item() < 1e-4
    _reset_dynamo()


def test_routing_rows_move_the_same_tokens_and_restore_timm():
    """The routing-alone measurement times real code: with blocks computing, the earlier gather/scatter routing
    and ours (blocks + return to original order) agree; the identity patch is undone afterwards."""
    zoo = _model_zoo()
    ours = zoo.pruned_copy(_pruned('cc_deit_tiny_patch16_224', 0.0), zoo.plan(None, 12, 196, 0.3, seed=0))
    tokens = torch.randn(2, 197, 192)
    original_forward = zoo.Block.forward
    with torch.no_grad():
        assert (zoo.run_blocks_ours(ours, tokens) - zoo.ScatterRouting(ours).run_blocks(tokens)).abs().max() < 1e-5
        with zoo.blocks_as_identity():
            routed = zoo.run_blocks_ours(ours, tokens)
        assert torch.equal(routed, tokens)  # identity blocks + return to original order = no change
    assert zoo.Block.forward is original_forward


@pytest.mark.parametrize('n, lower, upper', [(7, 1, 7), (10, 2, 9), (20, 6, 15), (21, 6, 16), (100, 40, 61)])
def test_benchmark_confidence_interval_of_the_median_uses_the_textbook_order_statistics(n, lower, upper):
    # 95% distribution-free intervals (x_(lower), x_(upper)), 1-based, as tabulated for the sign test.
    zoo = _model_zoo()
    values = [10.0 * i for i in range(n, 0, -1)]  # unsorted on purpose
    assert zoo.median_ci(values) == [10.0 * lower, 10.0 * upper]


def test_benchmark_verdicts_separate_a_miss_from_noise():
    zoo = _model_zoo()
    verdicts = [zoo.verdict(zoo._target('t', median, 1.0, True, ci)) for median, ci in
                [(1.05, [1.01, 1.09]), (1.02, [0.97, 1.06]), (0.98, [0.95, 1.03]), (0.95, [0.92, 0.99])]]
    assert verdicts == ['yes', 'yes, within noise', 'no, within noise', '**NO**']
    assert zoo.verdict(zoo._target('scoring', 1.2, 1.5, False, [1.1, 1.3])) == 'yes'


# ---------------------------------------------------------------------------------------------------------------
# where the time goes (benchmark breakdown)

def test_breakdown_families_split_the_paper_formula_exactly():
    zoo = _model_zoo()
    for rate in (0.0, 0.3):
        model = _pruned('cc_deit_tiny_patch16_224', rate)
        macs = zoo.family_macs(model)
        assert sum(macs.values()) == models.count_macs(model)
        assert macs['attention'] == sum(2 * n * n * 192 for n in models.kept_token_counts(model))


def test_breakdown_sorts_aten_ops_into_families():
    zoo = _model_zoo()
    expected = {'aten::mkldnn_convolution': 'patch embedding', 'aten::addmm': 'linear layers',
                'aten::_scaled_dot_product_flash_attention_for_cpu': 'attention', 'aten::_softmax': 'attention',
                'aten::bmm': 'attention', 'aten::index_select': 'token routing', 'aten::cat': 'token routing',
                'aten::gelu': zoo.OTHER_OPS, 'aten::native_layer_norm': zoo.OTHER_OPS, 'aten::add': zoo.OTHER_OPS}
    assert {op: zoo.op_family(op) for op in expected} == expected


def test_breakdown_profiles_real_ops_and_its_excesses_add_up_to_the_gap():
    """The profiler's op names of this torch version land in the intended families (a renamed attention kernel
    would silently become 'other'), the routing shows up in the pruned model only, and the per-family excesses
    over the FLOPs ratio sum to the whole gap."""
    zoo = _model_zoo()
    cc = _pruned('cc_deit_tiny_patch16_224', 0.0)
    dense = zoo.timm_twin(cc, 'deit_tiny_patch16_224', torch.device('cpu'))
    ours = zoo.pruned_copy(cc, zoo.plan(None, 12, 196, 0.3, seed=0))
    ms = zoo.profile_families({'timm': dense, 'ours': ours}, torch.randn(2, 3, 224, 224), rounds=2)
    for name in ('timm', 'ours'):
        for family in ('patch embedding', 'linear layers', 'attention', zoo.OTHER_OPS):
            assert ms[name][family] > 0, (name, family)
    assert ms['ours']['token routing'] > 5 * ms['timm']['token routing']  # 36 routing ops against one cat
    b = zoo.gap_breakdown(ms['timm'], ms['ours'], zoo.family_macs(cc), zoo.family_macs(ours))
    assert b['flops_ratio'] == pytest.approx(models.count_macs(cc) / models.count_macs(ours))
    assert sum(f['excess_ms'] for f in b['families'].values()) == pytest.approx(b['gap_ms'])
    assert b['ours_ms'] - b['timm_ms'] / b['flops_ratio'] == pytest.approx(b['gap_ms'])
    assert b['families']['token routing']['time_ratio'] is None
    assert b['families']['patch embedding']['flops_ratio'] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# the benchmark script as a user runs it

def _run_model_zoo(*args):
    import subprocess
    import sys
    from conftest import ROOT, subprocess_env
    return subprocess.run([sys.executable, os.path.join('benchmarks', 'model_zoo.py'), *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_model_zoo_quick_run_prints_the_tables_and_writes_json(tmp_path):
    out = tmp_path / 'zoo.json'
    proc = _run_model_zoo('--quick', '--device', 'cpu', '--json', str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res['models']['tiny']['rows']
    assert [r['kind'] for r in rows] == ['timm', 'ours', 'boolean', 'ours', 'boolean']
    assert all(r['counter_gflops'] == pytest.approx(r['gflops'], rel=1e-6) for r in rows)
    assert set(res['models']['tiny']['breakdown']) == {'25', '40'}
    for heading in ('| model | formulation | batch |', 'Where the time goes', 'Token routing alone',
                    'images/s against batch size', 'images/s against prune rate', '| target |'):
        assert heading in proc.stdout, heading
    assert (tmp_path / 'zoo.md').read_text().strip() in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f'{sum(t["met"] for t in res["targets"])} of ')


@pytest.mark.parametrize('args, message', [
    (['--models', 'tiny,huge'], "unknown model 'huge'; choose from tiny, small, base"),
    (['--rates', '0.25,1.5'], '--rates must lie in (0, 1)'),
    (['--breakdown-rounds', '-1'], '--breakdown-rounds must be 0 or more'),
])
def test_model_zoo_rejects_bad_arguments_in_one_line(args, message):
    proc = _run_model_zoo(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(f'error: {message}')
    assert 'Traceback' not in proc.stderr
