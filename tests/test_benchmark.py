"""benchmarks/: the rows time like against like, the statistics and the summary agree with the timings they come
from, the original code's protocol is what it says, every argument is checked before any work, and the script
runs as a user runs it.  No test asserts a speed: timings are read back, never judged."""
import copy
import json
import math
import os
import re
import statistics
import shlex
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import engine
import models
import pruning
from benchmarks import formulations as F
from benchmarks import model_zoo as zoo
from benchmarks import report, stats
from conftest import ROOT, pruned_model, subprocess_env
from models import fast_kernels as K

CPU = torch.device('cpu')
# One torch thread: the models here are small, and two threads spin against each other on a busy machine (a test
# taking 3 s on one thread took 20-35 s on two with the host's load at 6).
pytestmark = pytest.mark.usefixtures('one_thread')


def _flops(model, batch=2):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(batch, 3, 224, 224))
    return counter.get_total_flops()


@pytest.fixture(scope='module')
def tiny():
    """DeiT-Ti as the benchmark builds it: our model (every mask True), timm's twin, and a copy pruned at 0.3."""
    cc, dense = F.seeded_models('deit_tiny_patch16_224', 0, CPU)
    return cc, dense, {0.3: F.pruned_copy(cc, F.plan(None, 12, 196, 0.3, seed=0))}


# ---------------------------------------------------------------------------------------------------------------
# what is timed

def test_benchmark_rows_compute_the_same_function():
    """timm's DeiT loaded with our weights, our pruned model and the boolean-mask re-implementation of the original
    code give the same logits, and count the same FLOPs."""
    model = pruned_model('cc_deit_tiny_patch16_224', 0.0)
    dense = F.timm_twin(model, 'deit_tiny_patch16_224', CPU)
    ours = F.pruned_copy(model, F.plan(None, 12, 196, 0.3, seed=0))
    assert len(set(models.kept_token_counts(ours))) > 1  # layers keep different numbers of tokens
    boolean = F.BooleanMaskViT(dense, [blk.attn.token_index for blk in ours.blocks]).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max().item() < 1e-4
        assert (boolean(x) - ours(x)).abs().max().item() < 1e-4
        assert (boolean(x) - dense(x)).abs().max().item() > 1e-3  # pruning changed the function
    assert _flops(boolean) == _flops(ours)


def test_registry_builds_the_rows_of_a_model_in_report_order_with_their_checks(tiny):
    cc, dense, pruned = tiny
    chosen, _ = F.select(CPU, compile_rows=False, names=zoo.DEFAULT_ROWS['cpu'])
    assert [f.name for f in chosen] == ['timm', 'ours', 'boolean']
    ctx = F.Context(CPU, None, 2, F.image_shape(cc), seed=5)
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, ctx)
    assert list(built.runs) == ['timm', 'ours_30', 'boolean_30']
    assert [m['label'] for m in built.meta.values()] == [
        'DeiT-Ti (timm)', 'C&C-Ti-30 (ours)', 'C&C-Ti-30 (boolean mask, original formulation)']
    assert built.runs['timm'] is dense and built.runs['ours_30'] is pruned[0.3]
    assert built.meta['boolean_30']['macs'] == models.count_macs(pruned[0.3])
    assert built.meta['timm']['macs'] == models.count_macs(cc) and built.meta['timm']['dense']
    # Every row is checked against the eager fp32 model with its masks, on the seeded check batch: recomputed here.
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    assert set(built.checks) == {'timm', 'ours_30', 'boolean_30'}
    with torch.no_grad():
        expected = {'timm': (dense(x) - cc(x)).abs().max().item(),
                    'boolean_30': (built.runs['boolean_30'](x) - pruned[0.3](x)).abs().max().item(),
                    'ours_30': 0.0}
        assert (built.runs['boolean_30'](x) - dense(x)).abs().max() > 1e-2  # the pruned function, not the dense one
    for key, check in built.checks.items():
        assert check['max_abs_diff'] == pytest.approx(expected[key], abs=1e-7), key
        assert check['tolerance'] == 1e-3 and check['autocast_error'] == 0.0  # fp32 on CPU: no rounding baseline
        assert check['within_tolerance'] and check['images'] == 2 and check['top1_agreement'] == 1.0


def test_rows_are_only_ever_called_at_the_timed_batch_size(tiny):
    """A compiled model called at another batch size recompiles (with torch's default, with a dynamic batch
    dimension, and the timed passes would then run that graph): building and checking the rows use the timed
    batch size only."""
    sizes = {}

    def recorder(name):
        def build(cc, dense, ctx):
            def run(x):
                sizes.setdefault(name, set()).add(x.shape[0])
                return cc(x)  # the C&C model given: dense (every mask True) for a dense row, else pruned
            return run
        return build

    shaped = [F.Formulation('shaped-dense', 'shaped_dense', 'x', recorder('dense'), pruned=False, prime=True),
              F.Formulation('shaped', 'shaped', 'x', recorder('pruned'), pruned=True, prime=True),
              F.Formulation('eager-extra', 'eager', 'x', recorder('eager'), pruned=True)]
    cc, dense, pruned = tiny
    ctx = F.Context(CPU, None, 3, F.image_shape(cc))
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned,
                         [F.REGISTRY['timm'], F.REGISTRY['ours'], *shaped], ctx)
    assert sizes == {'dense': {3}, 'pruned': {3}, 'eager': {3}}
    assert set(built.checks) == {'timm', 'shaped_dense', 'ours_30', 'shaped_30', 'eager_30'}
    assert all(c['max_abs_diff'] < 1e-4 for c in built.checks.values())
    # Again at another batch size: rows built for one batch size are built again, compiled ones called once,
    # eager ones reused as they are; only the first two are checked again.
    sizes.clear()
    again = F.rebuild_for_batch(built, lambda rate: cc if rate is None else pruned[rate], dense,
                                F.Context(CPU, None, 1, F.image_shape(cc)))
    assert sizes == {'dense': {1}, 'pruned': {1}} and set(again.checks) == {'shaped_dense', 'shaped_30'}
    # each checked again against the eager fp32 model of its own masks (the pruned row against the pruned model)
    assert all(c['max_abs_diff'] < 1e-4 and report.check_failure(c) is None for c in again.checks.values())
    assert again.runs['eager_30'] is built.runs['eager_30'] and set(again.runs) == set(built.runs)


def test_compiled_rows_compile_the_model_of_their_row(tiny, monkeypatch):
    """timm compiled compiles timm's dense model, ours compiled the pruned model of its rate (torch.compile stood in
    for by a recorder, so no compilation runs): a compiled row on the wrong model would still build and time."""
    cc, dense, pruned = tiny
    compiled = []

    def record(model, **kwargs):
        compiled.append((model, kwargs))
        return model
    monkeypatch.setattr(torch, 'compile', record)
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours', 'ours-compiled')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, F.Context(CPU, None, 1, F.image_shape(cc)))
    assert [m for m, _ in compiled] == [dense, pruned[0.3]]
    assert all(k == {'fullgraph': True, 'dynamic': False} for _, k in compiled)
    assert built.runs['timm_compiled'] is dense and built.runs['compiled_30'] is pruned[0.3]
    assert built.checks['compiled_30']['max_abs_diff'] == 0.0


def test_routing_rows_move_the_same_tokens_and_restore_timm(tiny):
    """The routing-alone measurement times real code: with blocks computing, the earlier gather/scatter routing
    and ours (blocks + return to original order) agree; the identity patch is undone afterwards."""
    ours = tiny[2][0.3]
    tokens = torch.randn(2, 197, 192)
    original_forward = F.Block.forward
    with torch.no_grad():
        assert (F.run_blocks_ours(ours, tokens) - F.ScatterRouting(ours).run_blocks(tokens)).abs().max() < 1e-5
        with F.blocks_as_identity():
            routed = F.run_blocks_ours(ours, tokens)
        assert torch.equal(routed, tokens)  # identity blocks + return to original order = no change
    assert F.Block.forward is original_forward


def test_rows_checked_in_half_precision_on_cpu_take_the_eager_models_rounding_error_as_their_scale():
    """bf16 autocast on a CPU: every row's check sets the row's logits on the run's seeded batch against the eager
    fp32 model with its masks, and its tolerance is 2 x what bf16 alone costs that eager model (not 0 as in fp32,
    which would fail every half-precision row); each figure recomputed here by hand."""
    cc, dense = F.seeded_models('deit_digits_patch4_32', 0, CPU)
    pruned = {0.3: F.pruned_copy(cc, F.plan(None, len(cc.blocks), cc.patch_embed.num_patches, 0.3, seed=0))}
    chosen = [F.REGISTRY[n] for n in ('timm', 'ours', 'boolean')]
    ctx = F.Context(CPU, torch.bfloat16, 3, F.image_shape(cc), seed=7)
    built = F.build_runs('deit_digits_patch4_32', cc, dense, pruned, chosen, ctx)
    x = torch.randn(3, *F.image_shape(cc), generator=torch.Generator().manual_seed(7))  # the run's seed
    eager = {'timm': cc, 'ours_30': pruned[0.3], 'boolean_30': pruned[0.3]}
    with torch.no_grad():
        for key, model in eager.items():
            ref = model(x)
            with torch.autocast('cpu', dtype=torch.bfloat16):
                own_error = (model(x).float() - ref).abs().max().item()
                diff = (built.runs[key](x).float() - ref).abs().max().item()
            check = built.checks[key]
            assert own_error > 1e-3, key  # bf16 rounding is far above the fp32 slack
            assert check['autocast_error'] == pytest.approx(own_error, rel=1e-6), key
            assert check['tolerance'] == pytest.approx(2 * own_error + 1e-3, rel=1e-6), key
            assert check['max_abs_diff'] == pytest.approx(diff, rel=1e-6), key
            assert check['images'] == 3 and check['within_tolerance'], key


def test_a_formulation_whose_module_does_not_import_is_skipped_with_its_reason():
    def never(cc, dense, ctx):
        raise AssertionError('built')
    registry = {'timm': F.REGISTRY['timm'], 'ours': F.REGISTRY['ours'],
                'needs-missing': F.Formulation('needs-missing', 'missing', 'x', never, pruned=True,
                                               requires='benchmarks_test_no_such_module'),
                'gpu-only': F.Formulation('gpu-only', 'gpu', 'x', never, pruned=True, devices=('cuda',))}
    registry['not-here'] = F.Formulation('not-here', 'nothere', 'x', never, pruned=True,
                                         runs_here=lambda device: f'nothing runs on {device.type}')
    chosen, skipped = F.select(CPU, compile_rows=True, registry=registry)
    assert [f.name for f in chosen] == ['timm', 'ours']
    assert list(skipped) == ['needs-missing', 'not-here']
    assert 'benchmarks_test_no_such_module is not importable' in skipped['needs-missing']
    assert skipped['not-here'] == 'nothing runs on cpu'
    chosen, _ = F.select(CPU, True, registry, names=['ours', 'timm'])
    assert [f.name for f in chosen] == ['timm', 'ours']  # in registry order
    # The fast inference path is registered per variant, dense and pruned, each built for its batch size; the
    # CUDA-graph variants on CUDA only, the Triton ones wherever Triton runs (on CPU: its interpreter).
    fast = {f.name: f for f in F.REGISTRY.values() if f.requires == 'models.fast_path'}
    variants = ['fast-torch', 'fast-triton', 'fast-triton-graph', 'fast-triton-res16', 'fast-compile']
    assert sorted(fast) == sorted(v + s for v in variants for s in ('', '-dense'))
    assert all(f.fixed_batch and f.prime and f.twin == f.name.replace('-dense', '') + '-dense' for f in fast.values())
    assert [n for n, f in fast.items() if f.devices == ('cuda',)] == [
        'fast-triton-graph-dense', 'fast-triton-graph', 'fast-triton-res16-dense', 'fast-triton-res16']
    assert [n for n, f in fast.items() if f.compiled] == ['fast-compile-dense', 'fast-compile']
    chosen, skipped = F.select(CPU, compile_rows=False)
    triton_here = K.triton_runs_on(torch.empty(0))
    assert ('fast-triton' in [f.name for f in chosen]) == triton_here
    assert ('fast-triton' in skipped) != triton_here  # not runnable here: skipped with the reason, never dropped


def test_logit_check_judges_the_difference_and_top1_on_images_with_a_clear_margin():
    """Hand-made logits, 4 images x 3 classes, baseline (the eager model's own autocast error) 0.1: image 3's top
    two are 0.15 apart (< 2 x 0.1, a near-tie), the others 1.0 or more."""
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.5], [1.0, 1.15, 0.0]])
    near_tie_flipped = ref + torch.tensor([[0.05, 0, 0], [0, 0, 0], [0, 0, 0], [0.2, 0, 0]])  # image 3: 1.2 > 1.15
    c = F.logit_check(near_tie_flipped, ref, baseline=0.1)
    assert c['max_abs_diff'] == pytest.approx(0.2) and c['tolerance'] == pytest.approx(0.2 + 1e-3)
    assert c['within_tolerance'] and c['images'] == 4 and c['clear_images'] == 3
    assert c['top1_agreement'] == 0.75 and c['top1_agreement_clear'] == 1.0 and c['top1_ok'] is True
    clear_flipped = ref.clone()
    clear_flipped[1, 1] = -5.0  # image 1's clear winner loses: top-1 fails on a clear image
    c = F.logit_check(clear_flipped, ref, baseline=0.1)
    assert not c['within_tolerance'] and c['top1_agreement_clear'] == pytest.approx(2 / 3) and c['top1_ok'] is False
    c = F.logit_check(ref, ref, baseline=0.0)  # fp32: every image with distinct top two counts
    assert (c['max_abs_diff'], c['tolerance'], c['clear_images'], c['top1_ok']) == (0.0, 1e-3, 4, True)
    c = F.logit_check(ref + float('nan'), ref, baseline=0.0)
    assert not c['within_tolerance']  # NaN logits never pass


def test_a_logit_difference_equal_to_the_tolerance_is_within_it():
    """The tolerance is an upper bound the difference may reach ("at most 2 x baseline + 1e-3"): baseline 0.2495
    makes it exactly 0.5, and logits 0.5 off (exact in float32) pass; the next float32 above does not."""
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    c = F.logit_check(ref + 0.5, ref, baseline=0.2495)
    assert (c['tolerance'], c['max_abs_diff'], c['within_tolerance']) == (0.5, 0.5, True)
    assert report.check_failure(c) is None
    above = float(np.nextafter(np.float32(2.5), np.float32(3.0)))
    c = F.logit_check(ref + torch.tensor([[above - 2.0, 0.5], [0.5, 0.5]]), ref, baseline=0.2495)
    assert c['max_abs_diff'] > 0.5 and not c['within_tolerance']


def test_check_targets_judge_the_worst_row_of_a_section_and_leave_the_references_aside():
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    checks = {'timm': F.logit_check(ref + 5.0, ref, 0.0),  # a reference row: its error is the scale, not judged
              'good': F.logit_check(ref + 2e-4, ref, 0.0), 'worse': F.logit_check(ref + 8e-4, ref, 0.0)}
    kinds, labels = {'timm': 'timm', 'good': 'fast-x', 'worse': 'fast-y'}, {'worse': 'Y (fast y)'}
    within, top1 = report.check_targets('M batch 2', checks, labels, kinds)
    assert within['met'] and within['value'] == pytest.approx(0.8) and 'worst: Y (fast y)' in within['target']
    assert top1['met'] and top1['value'] == 1.0
    checks['nan'] = F.logit_check(ref + float('nan'), ref, 0.0)
    within, _ = report.check_targets('M batch 2', checks, labels, dict(kinds, nan='fast-z'))
    assert not within['met'] and 'worst: nan' in within['target']
    assert report.check_targets('M batch 2', {'timm': checks['timm']}, labels, kinds) == []


def test_compile_budget_refuses_compiled_rows_below_the_batch_floor_and_once_spent():
    budget = F.CompileBudget(seconds=30, min_batch=128)
    compiled, eager = F.REGISTRY['timm-compiled'], F.REGISTRY['ours']
    assert budget.refuses(compiled, 256) is None and budget.refuses(eager, 1) is None
    assert '--compile-min-batch' in budget.refuses(compiled, 32)
    budget.spend(eager, 100.0)  # eager rows do not count
    budget.spend(compiled, 29.0)
    assert budget.refuses(compiled, 256) is None
    budget.spend(F.REGISTRY['fast-compile'], 2.0)  # the fast path's compile backend counts
    assert '--compile-budget' in budget.refuses(F.REGISTRY['ours-compiled'], 256) and budget.spent == 31.0
    assert budget.refuses(F.REGISTRY['fast-triton'], 1) is None
    assert F.CompileBudget().refuses(compiled, 1) is None  # none given: no limit


def test_models_accept_shortcuts_and_timm_names_and_labels_follow_the_short_table(monkeypatch):
    assert F.resolve_model('small') == 'deit_small_patch16_224'
    assert F.resolve_model('deit_base_patch16_224') == 'deit_base_patch16_224'
    assert [F.pruned_label(n, 0.25) for n in F.SHORTCUTS.values()] == ['C&C-Ti-25', 'C&C-S-25', 'C&C-B-25']
    assert F.dense_label('deit_small_patch16_224') == 'DeiT-S'
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        F.resolve_model('huge')
    # Any timm name the C&C helper supports is taken as it is, labelled by its timm name.
    monkeypatch.setattr(F, 'cc_model_supported', lambda name: name == 'vit_small_patch16_224')
    assert F.resolve_model('vit_small_patch16_224') == 'vit_small_patch16_224'
    assert F.dense_label('vit_small_patch16_224') == 'vit_small_patch16_224'
    assert F.pruned_label('vit_small_patch16_224', 0.3) == 'C&C-vit_small_patch16_224-30'


# ---------------------------------------------------------------------------------------------------------------
# statistics, verdicts

@pytest.mark.parametrize('n, lower, upper', [(7, 1, 7), (10, 2, 9), (20, 6, 15), (21, 6, 16), (100, 40, 61)])
def test_confidence_interval_of_the_median_uses_the_textbook_order_statistics(n, lower, upper):
    # 95% distribution-free intervals (x_(lower), x_(upper)), 1-based, as tabulated for the sign test.
    values = [10.0 * i for i in range(n, 0, -1)]  # unsorted on purpose
    assert stats.median_ci(values) == [10.0 * lower, 10.0 * upper]


def test_confidence_interval_of_the_median_agrees_with_the_binomial_distribution_at_many_rounds():
    # The largest r whose coverage 1 - 2 P(Binomial(n, 1/2) <= r - 1) is at least 95%, from scipy; up to the
    # rounds of a summary section (--repeats times up to 10). (Speed is not timed in a test: the interval carries
    # its binomial sum from one candidate to the next, linear in n where summing it again was cubic.)
    from scipy.stats import binom
    for n in (6, 15, 31, 250, 1001, 4000):
        r = max(r for r in range(1, (n + 1) // 2 + 1) if 1 - 2 * binom.cdf(r - 1, n, 0.5) >= 0.95)
        assert stats.median_ci([float(i) for i in range(n, 0, -1)]) == [float(r), float(n + 1 - r)]


def test_too_few_rounds_give_no_interval_and_no_decided_verdict():
    # min-max of n values covers the median with probability 1 - 2^(1-n): 93.75% at n=5, 96.9% at n=6
    assert stats.median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) is None
    assert stats.median_ci([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == [1.0, 6.0]
    five = stats.Timings({'dense': [1.0] * 5, 'pruned': [0.5] * 5}, batch=8).ratio('pruned', 'dense')
    assert (five['median'], five['ci']) == (2.0, None)
    assert report.verdict(report._target('t', five['median'], 1.0, True, five['ci'], paired=True)) == \
        'yes, within noise'
    # a figure with no rounds to pair (the original protocol's ratio of means) has no interval by nature
    assert report.verdict(report._target('t', 2.0, 1.0, True, None)) == 'yes'


def test_an_interval_that_ends_on_the_threshold_contains_it():
    # the interval is closed (two order statistics): one whose end is the threshold holds a value that meets the
    # target and one that does not only if the other end is on the other side
    at_least = [report.verdict(report._target('t', median, 1.0, True, ci)) for median, ci in
                [(0.99, [0.97, 1.0]), (1.02, [1.0, 1.05]), (1.0, [1.0, 1.0]), (0.99, [0.97, 0.9999])]]
    assert at_least == ['no, within noise', 'yes', 'yes', '**NO**']
    at_most = [report.verdict(report._target('t', median, 1.5, False, ci)) for median, ci in
               [(1.6, [1.5, 1.7]), (1.4, [1.3, 1.5]), (1.6, [1.5001, 1.7])]]
    assert at_most == ['no, within noise', 'yes', '**NO**']


def test_spread_of_pass_times_is_the_interquartile_range_over_the_median():
    """Against numpy's quartiles by the same definition (statistics.quantiles' default, 'exclusive', is numpy's
    'weibull' method); one wild pass moves neither quartile; too few or unusable times give no figure."""
    rng = np.random.default_rng(0)
    for n in (4, 5, 9, 30, 301):
        v = list(rng.uniform(1.0, 2.0, n))
        q1, q3 = np.percentile(v, [25, 75], method='weibull')
        assert stats.spread(v) == pytest.approx((q3 - q1) / np.median(v))
    assert stats.spread([2.0] * 10) == 0.0
    steady = [1.0, 1.01, 0.99, 1.0, 1.02, 0.98, 1.0, 1.01]
    assert stats.spread(steady + [9.0]) < 0.03 and stats.spread(steady + [0.01]) < 0.03
    assert stats.spread([1.0, 1.0, 1.0]) is None  # the original protocol: one mean per row
    assert stats.spread([1.0, float('nan'), 1.0, 1.0]) is None and stats.spread([1.0, 0.0, 1.0, 1.0]) is None


def test_a_row_is_unsteady_only_when_its_spread_is_more_than_the_limit():
    """Five passes with quartiles 4.75 and 5.25 (statistics.quantiles' exclusive method: halfway between the first
    two and the last two) around a median of 5.0 spread 0.5 / 5.0, exactly UNSTEADY_SPREAD: not more than it, so
    steady; a last pass of 5.5 moves the upper quartile to 5.375 (a spread of 0.125), which is unsteady."""
    at_limit = [4.75, 5.25, 5.0, 4.75, 5.25]
    assert stats.spread(at_limit) == stats.UNSTEADY_SPREAD == 0.5 / 5.0
    assert stats.Timings({'timm': at_limit, 'ours': [5.0] * 5}, batch=8).unsteady() == {}
    above = at_limit[:-1] + [5.5]
    assert stats.Timings({'timm': above, 'ours': [5.0] * 5}, batch=8).unsteady() == {'timm': 0.625 / 5.0}


def test_rows_whose_pass_times_spread_are_named_in_the_report_and_when_timed(capsys):
    """A row that a slowed host held back for part of its rounds (the committed GPU run's eager DeiT-Ti rows:
    7.3 ms passes, then 10 ms) is listed with its spread; steady rows, and the original protocol's one mean per
    row, are not."""
    results = _summary_run()
    res = results['models']['tiny']
    assert report._unsteady_lines(results) == [] and report.unsteady_rows(res) == []
    slowed = [7.3] * 4 + [10.0] * 4 + [7.3] * 4
    res['rows'][0]['seconds'] = slowed + [7.3]  # timm: 5 slow passes of 13 -> quartiles 7.3 and 10
    for r in res['rows'][1:]:
        r['seconds'] = [r['seconds'][0]] * 13
    res['summary_sweep']['batches'][0]['seconds']['ours_25'] = [0.1, 0.2, 0.1, 0.2]
    q1, q3 = np.percentile(slowed + [7.3], [25, 75], method='weibull')
    assert report.unsteady_rows(res) == [(10, {'X (timm)': pytest.approx((q3 - q1) / 7.3)}),
                                         (1, {'C&C-Ti-25 (ours)': pytest.approx(0.1 / 0.15)})]
    lines = report._unsteady_lines(results)
    assert lines[-2:] == [f'- DeiT-Ti, batch 10: X (timm) {100 * (q3 - q1) / 7.3:.0f}%',
                          '- DeiT-Ti, batch 1: C&C-Ti-25 (ours) 67%'] and lines[1].startswith('Unsteady timings:')
    # the committed GPU run: its DeiT-Ti section's eager rows were held back (7.3 ms passes of timm, then 8-10 ms),
    # none of its CUDA-graph rows were
    committed = json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cuda.json')))
    text = report.markdown(committed, zoo.families_of('cuda'))
    flagged = text.split('Unsteady timings:')[1].split('\n\n')[1].splitlines()
    assert flagged[0].startswith('- DeiT-Ti, batch 256: DeiT-Ti (timm) 13%, ') and 'CUDA graph' not in text.split(
        'Unsteady timings:')[1].split('\n\n')[1]
    for r in res['rows']:
        r['protocol'] = 'original'
    assert report.unsteady_rows(res) == [(1, {'C&C-Ti-25 (ours)': pytest.approx(0.1 / 0.15)})]
    # and the benchmark says so as it times them
    capsys.readouterr()
    zoo.say_unsteady(stats.Timings({'timm': slowed, 'ours': [1.0] * 12}, 8))
    zoo.say_unsteady(stats.Timings({'timm': [1.0] * 12}, 8))
    zoo.say_unsteady(stats.Timings({'timm': [1.0, 2.0, 1.0, 2.0]}, 8, paired=False))
    out = capsys.readouterr().out
    # timm: quartiles 7.3 and 10 ms, median 7.3: 2.7 / 7.3
    assert out.count('\n') == 1 and out.startswith('note: unsteady timings') and 'timm 37%' in out
    assert 'ours' not in out


def test_verdicts_separate_a_miss_from_noise():
    verdicts = [report.verdict(report._target('t', median, 1.0, True, ci)) for median, ci in
                [(1.05, [1.01, 1.09]), (1.02, [0.97, 1.06]), (0.98, [0.95, 1.03]), (0.95, [0.92, 0.99])]]
    assert verdicts == ['yes', 'yes, within noise', 'no, within noise', '**NO**']
    assert report.verdict(report._target('scoring', 1.2, 1.5, False, [1.1, 1.3])) == 'yes'
    assert report.verdict(report._target('no interval', 0.99, 1.0, True, None)) == '**NO**'


def test_count_of_targets_met_says_how_many_are_met_only_within_noise():
    targets = [report._target('t', median, 1.0, True, ci) for median, ci in
               [(1.05, [1.01, 1.09]), (1.02, [0.97, 1.06]), (0.98, [0.95, 1.03]), (1.2, None)]]
    targets += [report._target('lost', None, 1.0, True), report._target('paired', 1.1, 1.0, True, paired=True)]
    assert report.count_targets(targets) == '4 of 6 targets met (2 of them within noise), 1 not measured'
    assert report.count_targets(targets[:1] + targets[2:4]) == '2 of 3 targets met'


def test_fast_path_builds_table_names_each_products_kernels():
    """The builds table names the kernels each product ran with, each once (cuBLAS on padded rows among them);
    results from before a product was timed say nothing ('–')."""
    def results(products):
        built = {'attention': {'133': 'sdpa-flash_attention'}, 'patch_embedding': 'torch', 'cuda_graph_batch': None,
                 **products}
        return {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'C&C-Ti-30 (fast)',
                                                              'fast_path': built}]}}}
    products = {'qkv': {'133': 'torch+256rows', '141': 'torch', '143': 'torch+256rows'}, 'proj': {'133': 'torch'},
                'mlp': {'133': 'triton-128x128x64w4s4'}}
    header, rule, row = report._fast_path_table(results(products))[-3:]
    cells = dict(zip(header.strip('|').split(' | '), row.strip('|').split(' | ')))
    assert cells['qkv'] == 'torch, torch+256rows' and cells['attention proj'] == 'torch'
    assert cells['MLP fc1 + GELU'] == 'triton-128x128x64w4s4' and cells['MLP fc2 + residual'] == '–'
    assert cells['proj + residual + LN2'] == '–'  # results from before that was timed
    header, rule, row = report._fast_path_table(results(dict(products, proj_norm={'133': 'triton-64x256x64w8s3',
                                                                                  '141': 'torch'})))[-3:]
    cells = dict(zip(header.strip('|').split(' | '), row.strip('|').split(' | ')))
    assert cells['proj + residual + LN2'] == 'torch, triton-64x256x64w8s3' and cells['attention proj'] == 'torch'


def test_fast_path_builds_table_says_whether_the_graph_launches_with_dependent_launch():
    """The PDL column: '–' without a CUDA graph or in results from before it was chosen; on or off, with the
    graph's ms per forward without / with it where the build timed both, or why it was refused."""
    def cell(**built):
        d = {'attention': {}, 'patch_embedding': 'torch', 'cuda_graph_batch': 256, **built}
        header, rule, row = report._fast_path_table(
            {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'r', 'fast_path': d}]}}})[-3:]
        return dict(zip(header.strip('|').split(' | '), row.strip('|').split(' | ')))['PDL']
    assert cell() == '–' and cell(cuda_graph_batch=None, dependent_launch=False) == '–'
    assert cell(dependent_launch=True, dependent_launch_ms={'off': 2.9, 'on': 2.8125}) == 'on (2.900 / 2.812 ms)'
    assert cell(dependent_launch=False, dependent_launch_ms={'off': 2.9, 'on': 3.0}) == 'off (2.900 / 3.000 ms)'
    assert cell(dependent_launch=True, dependent_launch_ms={}) == 'on'  # asked for, untimed
    refused = {'dependent_launch': {'0': {'on': 'its logits differ'}}}
    assert cell(dependent_launch=False, dependent_launch_ms={}, refused=refused) == 'off (refused: its logits differ)'


def test_product_times_sum_the_chosen_kernels_against_cublas_on_the_real_rows_over_the_blocks():
    """Per product, the build-time ms of the kernel chosen at each block's kept count against cuBLAS's on the real
    rows, summed over the blocks (a kept count that two blocks share counts twice; a block keeping nothing, not
    at all); a build whose products were not all timed both ways (CPU, or results from before) gets no row."""
    timed = {'133': {'torch': 0.036, 'torch+256rows': 0.026}, '150': {'torch': 0.030, 'torch+256rows': 0.031}}
    d = {'kept_counts': [150, 133, 133, 0], 'attention': {}, 'patch_embedding': 'torch', 'cuda_graph_batch': 256}
    for kind in ('qkv', 'proj', 'mlp', 'fc2'):
        d[kind], d[f'{kind}_ms'] = {'133': 'torch+256rows', '150': 'torch'}, timed
    times = report.product_times(d)
    assert set(times) == {'qkv', 'proj', 'mlp', 'fc2'}
    assert times['qkv'] == (pytest.approx(0.030 + 2 * 0.026), pytest.approx(0.030 + 2 * 0.036))
    results = {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'C&C-Ti-30 (fast)',
                                                             'fast_path': d}]}}}
    lines = report._fast_path_table(results)
    assert lines[-1] == '| C&C-Ti-30 (fast) | 256 | ' + ' | '.join(['0.082 / 0.102'] * 4 + ['0.328 / 0.408']) + ' |'
    untimed = dict(d, fc2_ms={'133': {'torch+256rows': 0.026}, '150': {'torch': 0.030}})  # no plain time at 133
    assert report.product_times(untimed) is None
    assert report.product_times({k: v for k, v in d.items() if not k.endswith('_ms')}) is None  # a CPU build
    results['models']['m']['rows'][0]['fast_path'] = untimed
    assert not any('at build time (each replayed' in line for line in report._fast_path_table(results))
    # at 133 the projection ran fused with its residual update and norm, 0.010 ms faster than cuBLAS's product
    # and the residual-norm kernel: the projection's chosen time is that much less (twice: two blocks keep 133)
    fused = dict(d, proj_norm={'133': 'triton-64x256x64w8s3', '150': 'torch'},
                 proj_norm_ms={'133': {'torch': 0.050, 'triton-64x256x64w8s3': 0.040}, '150': {'torch': 0.045}})
    assert report.product_times(fused)['proj'] == (pytest.approx(0.030 + 2 * (0.026 - 0.010)),
                                                   pytest.approx(0.030 + 2 * 0.036))
    assert report.product_times(dict(fused, proj_norm_ms={})) is None  # the fused choice without its times
    assert report.floored_projections(fused) == []


def test_qkv_fused_with_the_first_norm_counts_its_time_less_what_that_saved():
    """Where the first norm and qkv ran as one kernel (norm_qkv), qkv's share is its chosen time less what the one
    kernel saved over the gather-norm kernel and qkv, and 0 where it saved more than that (the table says where);
    the builds table names the kernel chosen; without the one kernel's times there is no row."""
    timed = {'133': {'torch': 0.036, 'torch+256rows': 0.026}, '150': {'torch': 0.030, 'torch+256rows': 0.031}}
    d = {'kept_counts': [150, 133, 133, 0], 'attention': {}, 'patch_embedding': 'torch', 'cuda_graph_batch': 256,
         'norm_qkv': {'133': 'triton-64x64x256w4s1', '150': 'triton-64x64x256w4s1'},
         'norm_qkv_ms': {'133': {'torch': 0.040, 'triton-64x64x256w4s1': 0.030},
                         '150': {'torch': 0.045, 'triton-64x64x256w4s1': 0.010}}}
    for kind in ('qkv', 'proj', 'mlp', 'fc2'):
        d[kind], d[f'{kind}_ms'] = {'133': 'torch+256rows', '150': 'torch'}, timed
    # at 133: 0.026 - 0.010 saved (two blocks); at 150: 0.030 - 0.035 saved: 0, not negative
    assert report.product_times(d)['qkv'] == (pytest.approx(2 * 0.016), pytest.approx(0.030 + 2 * 0.036))
    assert report.floored_projections(d, 'qkv') == [150] and report.floored_projections(d) == []
    results = {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'C&C-Ti-30 (fast)',
                                                             'fast_path': d}]}}}
    lines = report._fast_path_table(results)
    assert lines[-1].startswith('| C&C-Ti-30 (fast) | 256 | 0.032 / 0.102 (0 at kept 150) | 0.082 / 0.102 |')
    assert any('| torch, torch+256rows | triton-64x64x256w4s1 | torch, torch+256rows |' in line for line in lines)
    assert report.product_times(dict(d, norm_qkv_ms={})) is None


def test_a_whole_mlp_run_as_one_kernel_counts_as_the_first_products_time_and_none_as_the_second():
    """Where the whole MLP and its residual update ran as one kernel (mlp_residual), that kernel's build-time ms is
    the first MLP product's share and the second's is 0, so the sum of all four holds what ran; the tables say
    where, and the builds table names the kernel chosen.  Without the one kernel's times there is no row."""
    timed = {'133': {'torch': 0.036, 'torch+256rows': 0.026}, '150': {'torch': 0.030, 'torch+256rows': 0.031}}
    d = {'kept_counts': [150, 133, 133, 0], 'attention': {}, 'patch_embedding': 'torch', 'cuda_graph_batch': 256,
         'mlp_residual': {'133': 'triton-64x32x64w8s3', '150': 'torch'},
         'mlp_residual_ms': {'133': {'torch': 0.052, 'triton-64x32x64w8s3': 0.040}, '150': {'torch': 0.061}}}
    for kind in ('qkv', 'proj', 'mlp', 'fc2'):
        d[kind], d[f'{kind}_ms'] = {'133': 'torch+256rows', '150': 'torch'}, timed
    times = report.product_times(d)
    assert times['mlp'] == (pytest.approx(0.030 + 2 * 0.040), pytest.approx(0.030 + 2 * 0.036))
    assert times['fc2'] == (pytest.approx(0.030), pytest.approx(0.030 + 2 * 0.036))
    assert times['qkv'] == times['proj'] == (pytest.approx(0.030 + 2 * 0.026), pytest.approx(0.030 + 2 * 0.036))
    assert report.whole_mlp_counts(d) == [133]
    results = {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'C&C-Ti-30 (fast)',
                                                             'fast_path': d}]}}}
    lines = report._fast_path_table(results)
    assert lines[-1] == ('| C&C-Ti-30 (fast) | 256 | 0.082 / 0.102 | 0.082 / 0.102 | 0.110 / 0.102 (with fc2 at kept '
                         '133) | 0.030 / 0.102 (0 at kept 133) | 0.304 / 0.408 |')
    assert 'there the whole MLP and its residual update ran as one kernel' in lines[-5]
    assert any(line.endswith('| torch, triton-64x32x64w8s3 | torch |') for line in lines)  # the builds table
    assert report.product_times(dict(d, mlp_residual_ms={})) is None
    assert report.whole_mlp_counts(dict(d, mlp_residual={'133': 'torch', '150': 'torch'})) == []


def test_a_projection_fused_that_saved_more_than_it_took_is_counted_as_no_time_never_negative():
    """Fusing the projection with its residual update and norm can save more than the projection chosen took (the
    fused kernel beat cuBLAS's product and the residual-norm kernel by more than the product's time): its share is
    then 0 at that kept count, not negative, the table says where, and the sum of all four adds the 0."""
    timed = {'133': {'torch': 0.036, 'torch+256rows': 0.026}, '150': {'torch': 0.030, 'torch+256rows': 0.031}}
    d = {'kept_counts': [150, 133, 133, 0], 'attention': {}, 'patch_embedding': 'torch', 'cuda_graph_batch': 256,
         'proj_norm': {'133': 'triton-64x256x64w8s3', '150': 'torch'},
         'proj_norm_ms': {'133': {'torch': 0.070, 'triton-64x256x64w8s3': 0.030}, '150': {'torch': 0.045}}}
    for kind in ('qkv', 'proj', 'mlp', 'fc2'):
        d[kind], d[f'{kind}_ms'] = {'133': 'torch+256rows', '150': 'torch'}, timed
    # at 133: chosen 0.026, saved 0.040: 0 (was 0.026 - 0.040 = -0.014 per block, -0.028 over the two blocks)
    assert report.product_times(d)['proj'] == (pytest.approx(0.030), pytest.approx(0.030 + 2 * 0.036))
    assert report.floored_projections(d) == [133]
    results = {'models': {'m': {'batch_size': 256, 'rows': [{'key': 'k', 'label': 'C&C-Ti-30 (fast)',
                                                             'fast_path': d}]}}}
    lines = report._fast_path_table(results)
    assert lines[-1] == ('| C&C-Ti-30 (fast) | 256 | 0.082 / 0.102 | 0.030 / 0.102 (0 at kept 133) | 0.082 / 0.102 | '
                         '0.082 / 0.102 | 0.276 / 0.408 |')
    assert '"0 at kept N": there fusing saved more than the product chosen took' in lines[-5]
    assert not any(re.search(r'(^|[ |])-\d', line) for line in lines)


def test_ratios_pair_rounds_in_our_protocol_and_divide_means_in_the_original():
    t = stats.Timings({'fast': [1.0, 2.0, 4.0], 'slow': [3.0, 3.0, 6.0]}, batch=4)
    # 3, 1.5, 1.5; three rounds are too few for a 95% interval
    assert t.ratio('fast', 'slow') == {'median': 1.5, 'min': 1.5, 'max': 3.0, 'ci': None}
    assert t.images_per_s('fast') == 2.0 and t.fastest(['slow', 'fast']) == 'fast'
    o = stats.Timings({'fast': [0.5], 'slow': [2.0]}, batch=4, paired=False)
    assert o.ratio('fast', 'slow') == {'median': 4.0, 'min': 4.0, 'max': 4.0, 'ci': None}
    assert report.fmt_ratio(1.5, [1.25, 3.0]) == '1.50 (1.25–3.00)' and report.fmt_ratio(None) == '–'
    for lists in (([1.0, 2.0], [3.0, 3.0, 6.0]), ([1.0, 2.0, 4.0], [3.0])):  # rounds that do not pair: a fault
        with pytest.raises(ValueError):
            stats.Timings(dict(zip(('fast', 'slow'), lists)), batch=4).ratio('fast', 'slow')


# ---------------------------------------------------------------------------------------------------------------
# where the time goes (breakdown)

def test_breakdown_families_split_the_paper_formula_exactly():
    for rate in (0.0, 0.3):
        model = pruned_model('cc_deit_tiny_patch16_224', rate)
        macs = zoo.family_macs(model)
        assert sum(macs.values()) == models.count_macs(model)
        assert macs['attention'] == sum(2 * n * n * 192 for n in models.kept_token_counts(model))
    # a distilled DeiT's second head is a linear layer, not part of the patch embedding (a 16x16 convolution
    # from 3 channels to 192 at each of the 196 patches)
    model = models.create_model('deit_tiny_distilled_patch16_224')
    macs = zoo.family_macs(model)
    assert macs['patch embedding'] == 196 * 3 * 16 * 16 * 192
    assert macs['linear layers'] == 12 * 198 * (4 * 192 * 192 + 2 * 192 * 768) + 2 * 192 * 1000
    assert sum(macs.values()) == models.count_macs(model)


def test_breakdown_sorts_aten_ops_into_families():
    expected = {'aten::mkldnn_convolution': 'patch embedding', 'aten::addmm': 'linear layers',
                'aten::_scaled_dot_product_flash_attention_for_cpu': 'attention', 'aten::_softmax': 'attention',
                'aten::bmm': 'attention', 'aten::index_select': 'token routing', 'aten::cat': 'token routing',
                'aten::gelu': zoo.OTHER_OPS, 'aten::native_layer_norm': zoo.OTHER_OPS, 'aten::add': zoo.OTHER_OPS}
    assert {op: zoo.op_family(op) for op in expected} == expected


def test_breakdown_sorts_cuda_kernels_into_families():
    """Kernel names as cuDNN, cuBLAS, flash attention, torch, inductor and models/fast_kernels.py give them (read
    off profiles of these libraries; the fused kernels count where their larger part is)."""
    expected = {
        'sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64': 'patch embedding',
        'void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>': 'patch embedding',
        'sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1': 'linear layers',
        'nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN': 'linear layers',
        'ampere_fp16_s16816gemm_fp16_128x128_ldg8_f2f_stages_32x5_tn': 'linear layers',
        'void cublasLt::splitKreduce_kernel<32, 16, int, float, __half>': 'linear layers',
        'void gemv2T_kernel_val<int, int, __half, __half, float, 128, 16, 4, 4, false, true>': 'linear layers',
        '_linear_kernel': 'linear layers', '_mlp_kernel': 'linear layers', '_norm_linear_kernel': 'linear layers',
        'void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>': 'attention',
        'fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>)': 'attention',
        'cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1': 'attention',
        '_attention_kernel': 'attention',
        'void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>': 'LayerNorm',
        '_gather_layer_norm_kernel': 'LayerNorm', '_residual_kernel': 'LayerNorm',
        'triton_per_fused_add_native_layer_norm_3': 'LayerNorm',
        'void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(...)>': 'GELU',
        'void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>': zoo.ADDS,
        'void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(...)>': zoo.ADDS,
        'Memcpy DtoD (Device -> Device)': zoo.ADDS,
        'triton_poi_fused__to_copy_convert_element_type_0': zoo.ADDS,
        'void at::native::(anonymous namespace)::indexSelectLargeIndex<float, long, unsigned int, 2, 2, -2, true>':
            'token routing',
        'void at::native::index_elementwise_kernel<128, 4, ...>': 'token routing',
        'void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>': 'token routing',
        'void at::native::reduce_kernel<512, 1, ...>': zoo.OTHER_KERNELS,
    }
    assert {k: zoo.kernel_family(k) for k in expected} == expected
    assert set(expected.values()) == set(zoo.CUDA_FAMILIES)
    # every kernel models/fast_kernels.py launches has a family (the patch embedding's is moved there by name of
    # its step, FastViT.embed, whatever its kernels are called)
    from models import fast_kernels as K
    if K.HAS_TRITON:
        launched = sorted(n for n, f in vars(K).items() if n.endswith('_kernel') and hasattr(f, 'fn'))
        assert launched == ['_attention_kernel', '_gather_layer_norm_kernel', '_linear_kernel', '_mlp_kernel',
                            '_norm_linear_kernel', '_patch_embed_kernel', '_residual_kernel']
        assert [n for n in launched if n != '_patch_embed_kernel' and zoo.kernel_family(n) == zoo.OTHER_KERNELS] == []


def test_breakdown_on_cuda_sums_device_events_by_kernel_name():
    """event_family_ms reads the GPU time of device events (kernels, memcpy) and ignores the CPU-side ops and
    launches, which on CUDA only queue the work; on CPU it is the other way round."""
    from torch.autograd import DeviceType

    def event(name, device_type, us, self_cpu=0.0):
        return SimpleNamespace(name=name, device_type=device_type, self_cpu_time_total=self_cpu,
                               time_range=SimpleNamespace(elapsed_us=lambda: us))
    events = [event('aten::linear', DeviceType.CPU, 0, self_cpu=50.0),
              event('cudaLaunchKernel', DeviceType.CPU, 0, 9.0),
              event('nvjet_hsh_128x256', DeviceType.CUDA, 300.0), event('nvjet_hsh_128x256', DeviceType.CUDA, 200.0),
              event('_gather_layer_norm_kernel', DeviceType.CUDA, 40.0), event('Memset (Device)', DeviceType.CUDA, 2.0)]
    families, kernels = zoo.event_family_ms(events, 'cuda')
    assert families == pytest.approx({'linear layers': 0.5, 'LayerNorm': 0.04, zoo.ADDS: 0.002})
    assert kernels == pytest.approx({'nvjet_hsh_128x256': 0.5, '_gather_layer_norm_kernel': 0.04,
                                     'Memset (Device)': 0.002})
    families, kernels = zoo.event_family_ms(events, 'cpu')
    assert families == pytest.approx({'linear layers': 0.05, zoo.OTHER_OPS: 0.009}) and kernels == {}


def test_breakdown_of_the_fast_path_moves_its_patch_embedding_and_compares_pruned_with_dense(tiny):
    """A fast-path row's patch embedding (unfold, one matrix product, an add: ops that look like any others) is
    profiled alone and moved to its family, and breakdowns() sets the fast pruned row against the fast dense
    row besides ours against timm."""
    cc, dense, pruned = tiny
    chosen = [F.REGISTRY[n] for n in ('timm', 'ours', 'fast-torch-dense', 'fast-torch')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, F.Context(CPU, None, 2, (3, 224, 224)))
    fast = built.runs['fast_torch_30']
    ms, _ = zoo.profile_families({'fast': fast}, torch.randn(2, 3, 224, 224), rounds=1)
    # The fast path has no convolution: what 'patch embedding' holds was moved there (a matrix product of
    # (2*196, 768) by (768, 192) and copies), and the linear layers still hold the blocks' products.
    assert ms['fast']['patch embedding'] > 0 and ms['fast']['linear layers'] > ms['fast']['patch embedding']
    out = zoo.breakdowns(cc, dense, pruned, built, 2, (3, 224, 224), CPU, 1, None)
    assert out['breakdown_fast_rows'] == ['fast-torch-dense', 'fast-torch']
    ratio = models.count_macs(cc) / models.count_macs(pruned[0.3])
    assert out['breakdown']['30']['flops_ratio'] == pytest.approx(ratio)
    assert set(out['breakdown']) == set(out['breakdown_fast']) == {'30'} and 'kernels' not in out
    b = out['breakdown_fast']['30']
    assert b['flops_ratio'] == pytest.approx(models.count_macs(cc) / models.count_macs(pruned[0.3]))
    assert sum(f['excess_ms'] for f in b['families'].values()) == pytest.approx(b['gap_ms'])
    text = report._breakdown_table({'models': {'tiny': {'short': 'Ti', **out}},
                                    'settings': {'breakdown_rounds': 1, 'device': 'cpu'}}, zoo.FAMILIES)
    assert any('C&C-Ti-30 | fast-torch vs fast-torch-dense' in line for line in text)
    assert any('C&C-Ti-30 | ours vs timm' in line for line in text)


def test_breakdown_profiles_real_ops_and_its_excesses_add_up_to_the_gap(tiny):
    """The profiler's op names of this torch version land in the intended families (a renamed attention kernel
    would silently become 'other'), the routing shows up in the pruned model only, and the per-family excesses
    over the FLOPs ratio sum to the whole gap."""
    cc, dense, pruned = tiny
    ours = pruned[0.3]
    ms, top = zoo.profile_families({'timm': dense, 'ours': ours}, torch.randn(2, 3, 224, 224), rounds=2)
    assert top == {}  # kernels are listed on CUDA only
    for name in ('timm', 'ours'):
        for family in ('patch embedding', 'linear layers', 'attention', zoo.OTHER_OPS):
            assert ms[name][family] > 0, (name, family)
    assert ms['ours']['token routing'] > 0
    # The routing is the pruned model's own: its gathers are counted, not timed (36 index_selects and 12 cats
    # in the blocks, one gather back to the original order; timm concatenates the class token once).
    from torch.profiler import ProfilerActivity, profile
    counts = {}
    for name, model in (('timm', dense), ('ours', ours)):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(torch.randn(1, 3, 224, 224))
        counts[name] = {e.key: e.count for e in prof.key_averages() if zoo.op_family(e.key) == 'token routing'}
    assert counts['timm'] == {'aten::cat': 1}
    assert counts['ours']['aten::index_select'] == 2 * sum(not b.dense for b in ours.blocks)
    b = zoo.gap_breakdown(ms['timm'], ms['ours'], zoo.family_macs(cc), zoo.family_macs(ours))
    assert b['flops_ratio'] == pytest.approx(models.count_macs(cc) / models.count_macs(ours))
    assert sum(f['excess_ms'] for f in b['families'].values()) == pytest.approx(b['gap_ms'])
    assert b['ours_ms'] - b['timm_ms'] / b['flops_ratio'] == pytest.approx(b['gap_ms'])
    assert b['families']['token routing']['time_ratio'] is None
    assert b['families']['patch embedding']['flops_ratio'] == 1.0


def test_gap_breakdown_of_gpu_kernel_families(tiny):
    """On CUDA the profile sums kernel times by CUDA_FAMILIES (LayerNorm, GELU, adds... on their own), not the CPU's
    op families: the breakdown and its table carry every family profiled, the excesses still summing to the gap."""
    cc, dense, pruned = tiny
    ours = pruned[0.3]
    dense_ms = {f: 1.0 + i for i, f in enumerate(zoo.CUDA_FAMILIES)}
    ours_ms = {f: 0.5 + 0.5 * i for i, f in enumerate(zoo.CUDA_FAMILIES)}
    b = zoo.gap_breakdown(dense_ms, ours_ms, zoo.family_macs(cc), zoo.family_macs(ours))
    assert list(b['families']) == list(zoo.CUDA_FAMILIES)
    assert sum(f['excess_ms'] for f in b['families'].values()) == pytest.approx(b['gap_ms'])
    assert b['families']['LayerNorm']['time_ratio'] == pytest.approx(dense_ms['LayerNorm'] / ours_ms['LayerNorm'])
    assert b['families']['LayerNorm']['flops_ratio'] is None  # the formula prices no LayerNorm
    results = {'settings': {'device': 'cuda', 'breakdown_rounds': 3},
               'models': {'tiny': {'short': 'Ti', 'breakdown': {'30': b}}}}
    lines = report._breakdown_table(results, zoo.CUDA_FAMILIES)
    row = next(line for line in lines if line.startswith('| C&C-Ti-30'))
    assert row.count('|') == 4 + len(zoo.CUDA_FAMILIES) + 1


# ---------------------------------------------------------------------------------------------------------------
# the summary

def _row(key, kind, dense, rate, seconds, flops_ratio=1.0, label=None):
    return {'key': key, 'kind': kind, 'dense': dense, 'prune_rate': rate, 'seconds': seconds,
            'flops_ratio': flops_ratio, 'label': label or f'X ({kind})', 'protocol': 'ours',
            'speedup_vs_timm': 1.0, 'speedup_vs_timm_ci': None}


def _summary_run():
    """A results dict with hand-made timings where timm compiled is the fastest dense mode and the boolean
    formulation the fastest pruned one; the batch sweep has other winners."""
    rows = [_row('timm', 'timm', True, 0.0, [1.00, 1.10, 0.90]),
            _row('timm_compiled', 'timm-compiled', True, 0.0, [0.80, 0.85, 0.75]),
            _row('ours_25', 'ours', False, 0.25, [0.70, 0.72, 0.69], 1.37, 'C&C-Ti-25 (ours)'),
            _row('boolean_25', 'boolean', False, 0.25, [0.60, 0.75, 0.62], 1.37, 'C&C-Ti-25 (boolean mask)'),
            _row('compiled_25', 'ours-compiled', False, 0.25, [0.65, 0.66, 0.64], 1.37, 'C&C-Ti-25 (ours, compiled)'),
            _row('ours_40', 'ours', False, 0.40, [0.50, 0.50, 0.50], 1.73, 'C&C-Ti-40 (ours)')]
    sweep = [{'batch_size': 1, 'seconds': {'timm': [0.10, 0.10, 0.10], 'timm_compiled': [0.20, 0.20, 0.20],
                                           'ours_25': [0.12, 0.12, 0.12], 'boolean_25': [0.30, 0.30, 0.30],
                                           'compiled_25': [0.08, 0.09, 0.085], 'ours_40': [0.2, 0.2, 0.2]}},
             {'batch_size': 8, 'seconds': {k: [1.0] * 3 for k in ('timm', 'timm_compiled', 'ours_25', 'boolean_25',
                                                                  'compiled_25', 'ours_40')}}]
    return {'models': {'tiny': {'model': 'deit_tiny_patch16_224', 'batch_size': 10, 'rows': rows, 'checks': {},
                                'short': 'Ti', 'label': 'DeiT-Ti', 'summary_sweep': {'batches': sweep}}},
            'settings': {'dtype': 'fp32'}}


def test_summary_takes_the_fastest_pruned_and_dense_modes_of_the_run():
    """The hand-made run of _summary_run; the expected ratios are worked out by hand."""
    results = _summary_run()
    report.attach_summary(results, 'cuda')
    first, second = results['summary']
    assert set(first) == {
        'model', 'timm_model', 'prune_rate', 'batch_size', 'protocol', 'flops_ratio', 'best_pruned_mode',
        'best_dense_mode', 'speedup_vs_best_dense', 'speedup_vs_best_dense_range', 'speedup_vs_best_dense_ci',
        'speedup_vs_timm_eager', 'speedup_vs_timm_eager_range', 'speedup_vs_timm_eager_ci', 'speedup_by_batch',
        'speedup_batch1', 'speedup_batch32', 'targets', 'section_model', 'pruned_modes', 'dense_modes'}
    assert (first['model'], first['flops_ratio']) == ('C&C-Ti-25', 1.37)
    assert first['dense_modes'] == ['timm', 'timm-compiled'] and first['pruned_modes'] == [
        'ours', 'boolean', 'ours-compiled']
    assert (first['best_pruned_mode'], first['best_dense_mode']) == ('boolean', 'timm-compiled')
    # per-round timm_compiled/boolean: 0.80/0.60, 0.85/0.75, 0.75/0.62 -> median 0.75/0.62
    assert first['speedup_vs_best_dense'] == pytest.approx(0.75 / 0.62)
    # per-round timm/boolean: 1.00/0.60, 1.10/0.75, 0.90/0.62 -> median 1.10/0.75
    assert first['speedup_vs_timm_eager'] == pytest.approx(1.10 / 0.75)
    # batch 1: fastest pruned = ours compiled (median 0.085), fastest dense = timm (0.10): median 0.10/0.085
    assert first['speedup_by_batch']['1']['best_pruned_mode'] == 'ours-compiled'
    assert first['speedup_batch1'] == pytest.approx(0.10 / 0.085)
    assert first['speedup_batch32'] is None and first['speedup_by_batch']['8']['speedup'] == 1.0
    assert (second['model'], second['best_pruned_mode'], second['speedup_batch1']) == ('C&C-Ti-40', 'ours', 0.5)
    # targets: >= 0.9 x the FLOPs ratio, batch 1 >= 1.0; none for batch 32, which did not run
    assert set(first['targets']) == {'vs_best_dense', 'batch1'}
    assert first['targets']['vs_best_dense']['threshold'] == pytest.approx(0.9 * 1.37)
    assert first['targets']['vs_best_dense']['met'] == (0.75 / 0.62 >= 0.9 * 1.37)
    assert second['targets']['batch1']['met'] is False
    assert sum('fastest pruned' in t['target'] for t in results['targets']) == 4


def test_dense_modes_compared_are_said_once_when_every_comparison_had_the_same():
    """_summary_run with every check passed: the main batch and batch 1 (batch 8 is no summary batch) of both
    pruned models chose among timm and timm compiled, said in one line for every comparison; with timm compiled
    left out at batch 1 (--compile-min-batch) the two sets are each said with where they held."""
    results = _summary_run()
    report.attach_summary(results, 'cuda')
    lines = report._summary_table(results)
    assert [x for x in lines if x.startswith('Dense modes compared')] == [
        'Dense modes compared: timm, timm-compiled (every comparison).']
    results = _summary_run()
    at1 = results['models']['tiny']['summary_sweep']['batches'][0]
    del at1['seconds']['timm_compiled']
    at1['skipped_rows'] = {'timm_compiled': 'compiled rows only at batch >= 8 (--compile-min-batch)'}
    report.attach_summary(results, 'cuda')
    assert [x for x in report._summary_table(results) if x.startswith('Dense modes compared')] == [
        'Dense modes compared: timm, timm-compiled (C&C-Ti-25 main batch; C&C-Ti-40 main batch).',
        'Dense modes compared: timm (C&C-Ti-25 batch 1; C&C-Ti-40 batch 1).']


def test_main_table_says_which_pruned_rows_are_set_against_timm_eager_for_want_of_their_dense_row():
    """A pruned row is shown against the dense row of its formulation (its ``twin``); with --rows timm,ours,
    ours-compiled (or fast-torch without fast-torch-dense) that dense row is not timed, and the row, against timm
    eager, says so."""
    def row(key, kind, dense, vs_timm, label, twin=None, vs_twin=None):
        r = dict(_row(key, kind, dense, 0.0 if dense else 0.25, [1.0]), speedup_vs_timm=vs_timm, label=label,
                 kept_tokens_mean=1.0, gflops=1.0, images_per_s=1.0)
        return r if twin is None else dict(r, twin=twin, speedup_vs_twin=vs_twin)
    rows = [row('timm', 'timm', True, 1.0, 'DeiT-Ti (timm)'),
            row('fast_torch', 'fast-torch-dense', True, 1.5, 'DeiT-Ti (fast path, torch)'),
            row('ours_25', 'ours', False, 1.25, 'C&C-Ti-25 (ours)', 'timm', 1.25),
            row('fast_torch_25', 'fast-torch', False, 1.75, 'C&C-Ti-25 (fast path, torch)', 'fast_torch', 1.125),
            row('compiled_25', 'ours-compiled', False, 1.2, 'C&C-Ti-25 (ours, compiled)')]  # timm compiled not timed
    results = {'models': {'tiny': {'batch_size': 8, 'rows': rows}}, 'settings': {'protocol': 'ours'}}
    cells = {line.split(' | ')[0][2:] + ' ' + line.split(' | ')[1]: line.split(' | ')[8]
             for line in report._main_table(results) if line.startswith('| DeiT') or line.startswith('| C&C')}
    assert cells == {'DeiT-Ti timm': '1.00', 'DeiT-Ti fast path, torch': '1.50', 'C&C-Ti-25 ours': '1.25',
                     'C&C-Ti-25 fast path, torch': '1.12', 'C&C-Ti-25 ours, compiled': '1.20 (vs timm)'}
    assert '"(vs timm)": that dense row was not timed' in report._main_table(results)[-1]
    del rows[-1]
    assert '(vs timm)' not in '\n'.join(report._main_table(results))


def test_a_row_that_fails_its_logit_check_takes_no_part_in_the_speed_verdicts():
    """_summary_run's fastest pruned row (boolean) with logits off, and its fastest dense one (timm compiled) with
    top-1 off: the verdicts compare the fastest rows that passed, and say which were left out and why."""
    results = _summary_run()
    ref = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    results['models']['tiny']['checks'] = {
        'boolean_25': F.logit_check(ref + 0.5, ref, 0.0),
        # within a (large) tolerance, but both clear winners lose
        'timm_compiled': F.logit_check(ref + torch.tensor([[-1.6, 1.6], [1.6, -1.6]]), ref, 0.8),
        'compiled_25': F.logit_check(ref, ref, 0.0), 'timm': F.logit_check(ref + 5.0, ref, 0.0)}  # timm: reference
    # at batch 1 timm compiled was compiled again and checked again (it passed there); boolean, an eager row, was
    # reused as it was, so its main check stands
    results['models']['tiny']['summary_sweep']['batches'][0]['checks'] = {'timm_compiled': F.logit_check(ref, ref, 0.0)}
    report.attach_summary(results, 'cuda')
    first = results['summary'][0]
    assert (first['best_pruned_mode'], first['best_dense_mode']) == ('ours-compiled', 'timm')
    # per-round timm / ours compiled: 1.00/0.65, 1.10/0.66, 0.90/0.64 -> median 1.00/0.65
    assert first['speedup_vs_best_dense'] == pytest.approx(1.00 / 0.65)
    assert first['dense_modes'] == ['timm'] and first['pruned_modes'] == ['ours', 'ours-compiled']
    assert first['excluded'] == {'boolean': 'logits off: max |difference| 5.00e-01 > tolerance 1.00e-03',
                                 'timm-compiled': 'top-1 differs on 100.0% of the clear-margin images'}
    at1 = first['speedup_by_batch']['1']
    assert at1['pruned_modes'] == ['ours', 'ours-compiled'] and at1['dense_modes'] == ['timm', 'timm-compiled']
    assert set(at1['excluded']) == {'boolean'}
    lines = report._summary_table(results)
    assert ('Left out of the comparison for C&C-Ti-25: boolean (logits off: max |difference| 5.00e-01 > tolerance '
            '1.00e-03); timm-compiled (top-1 differs on 100.0% of the clear-margin images).') in lines
    assert 'Dense modes compared: timm (C&C-Ti-25 main batch; C&C-Ti-40 main batch).' in lines
    assert 'Dense modes compared: timm, timm-compiled (C&C-Ti-25 batch 1; C&C-Ti-40 batch 1).' in lines
    assert ('Left out of the comparison for C&C-Ti-25 at batch 1: boolean (logits off: max |difference| 5.00e-01 > '
            'tolerance 1.00e-03).') in lines
    # the fastest dense row that passed is timm, but timm compiled, which failed, may be faster: no verdict
    assert first['dense_not_compared'] == {
        'timm_compiled': 'logit check failed: top-1 differs on 100.0% of the clear-margin images'}
    assert first['targets']['vs_best_dense']['met'] is None
    assert first['targets']['vs_best_dense']['verdict'] == (
        'not measured (ahead of the dense modes timed, but not compared with timm_compiled (logit check failed: '
        'top-1 differs on 100.0% of the clear-margin images))')
    assert 'dense_not_compared' not in at1  # (3 rounds: too few for an interval, so no decided verdict)
    assert first['targets']['batch1']['verdict'] == 'yes, within noise'


def test_a_dense_mode_left_out_leaves_a_target_it_would_decide_not_measured():
    """Timm compiled not built for the main table (the compile budget spent) nor at batch 1 (--compile-min-batch):
    a pruned row ahead of the dense rows that were timed may not be ahead of it, so no "yes"; one behind them is
    behind the fastest dense row too, so its "no" stands.  A pruned row left out does not count."""
    results = _planned(_summary_run(), ['tiny'], [0.25, 0.40], [1])
    tiny = results['models']['tiny']
    tiny['rows'] = [r for r in tiny['rows'] if r['key'] != 'timm_compiled']
    budget = 'compile budget of 120 s spent (130 s; --compile-budget)'
    tiny['skipped_rows'] = {'timm_compiled': budget, 'fast_triton_40': 'building or running it failed: OSError: x'}
    at1 = tiny['summary_sweep']['batches'][0]
    del at1['seconds']['timm_compiled']
    at1['skipped_rows'] = {'timm_compiled': 'compiled rows only at batch >= 128 (--compile-min-batch)'}
    report.attach_summary(results, 'cuda')
    ti25, ti40 = results['summary']
    assert ti25['dense_not_compared'] == ti40['dense_not_compared'] == {'timm_compiled': budget}
    # C&C-Ti-25, main: boolean over timm, per round 1.00/0.60, 1.10/0.75, 0.90/0.62: median 1.10/0.75 >= 0.9 x 1.37
    main = ti25['targets']['vs_best_dense']
    assert (main['value'], main['met']) == (pytest.approx(1.10 / 0.75), None)
    assert main['verdict'] == f'not measured (ahead of the dense modes timed, but not compared with timm_compiled ' \
                              f'({budget}))'
    # batch 1: ours compiled over timm, 0.10/0.085 >= 1.0; C&C-Ti-40: ours 0.2 against timm's 0.1, a miss
    assert ti25['speedup_by_batch']['1']['dense_not_compared'] == {
        'timm_compiled': 'compiled rows only at batch >= 128 (--compile-min-batch)'}
    assert ti25['targets']['batch1']['met'] is None and 'not compared with timm_compiled' in ti25['targets'][
        'batch1']['verdict']
    assert (ti40['targets']['batch1']['met'], ti40['targets']['batch1']['verdict']) == (False, 'no, within noise')
    assert ti40['targets']['vs_best_dense']['met'] is None  # 0.5 s against timm's 1.0: 2.0 >= 0.9 x 1.73
    assert set(results['not_measured']) == {ti25['targets']['vs_best_dense']['target'],
                                            ti25['targets']['batch1']['target'],
                                            ti40['targets']['vs_best_dense']['target']}


def test_a_dense_mode_not_timed_at_a_summary_batch_leaves_its_target_not_measured_there():
    """Timm compiled timed nowhere at batch 1, though batch 1 lists no row left out: left out of the main table
    (the compile budget spent: it was never built, so a summary section neither builds it again nor notes it), or
    in the main table but missing from batch 1's pass times.  Ours is ahead of timm eager at batch 1 (0.5 s against
    1.0 s in every one of eight rounds), but may not be ahead of timm compiled: batch 1's target is not measured,
    naming it, never "yes"."""
    timm = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    budget = 'compile budget of 120 s spent (130 s; --compile-budget)'
    for main_has_it, why in ((False, budget), (True, 'not timed at this batch size')):
        results = _eight_rounds(timm, [0.9] * 8, [0.5] * 8)
        tiny = results['models']['tiny']
        if not main_has_it:
            tiny['rows'] = [r for r in tiny['rows'] if r['key'] != 'timm_compiled']
            tiny['skipped_rows'] = {'timm_compiled': budget}
        at1 = tiny['summary_sweep']['batches'][0]
        del at1['seconds']['timm_compiled']
        assert 'skipped_rows' not in at1
        report.attach_summary(results, 'cuda')
        entry, = results['summary']
        assert entry['speedup_by_batch']['1']['dense_modes'] == ['timm']
        assert entry['speedup_by_batch']['1']['dense_not_compared'] == {'timm_compiled': why}
        target = entry['targets']['batch1']
        assert target['met'] is None and target['verdict'] == (
            f'not measured (ahead of the dense modes timed, but not compared with timm_compiled ({why}))')
        assert target['target'] in results['not_measured']


def _eight_rounds(timm, timm_compiled, ours_25):
    """A run of eight rounds (enough for a 95% interval) at the main batch and at batch 1, the same pass times at
    both: timm eager, timm compiled and ours at rate 0.25 (FLOPs ratio 1.37)."""
    rows = [_row('timm', 'timm', True, 0.0, timm), _row('timm_compiled', 'timm-compiled', True, 0.0, timm_compiled),
            _row('ours_25', 'ours', False, 0.25, ours_25, 1.37, 'C&C-Ti-25 (ours)')]
    return _planned({'models': {'tiny': {
        'model': 'deit_tiny_patch16_224', 'batch_size': 8, 'rows': rows, 'checks': {}, 'short': 'Ti',
        'label': 'DeiT-Ti',
        'summary_sweep': {'batches': [{'batch_size': 1, 'seconds': {'timm': timm, 'timm_compiled': timm_compiled,
                                                                    'ours_25': ours_25}}]}}}}, ['tiny'], [0.25], [1])


@pytest.mark.parametrize('compiled, decided', [
    ([4.0, 4.1, 3.9, 4.0, 4.2, 3.8, 4.0, 4.1], True),     # 4x slower than timm eager in every round
    ([0.9, 0.95, 0.92, 0.9, 0.91, 0.93, 0.9, 0.94], False),  # faster than timm eager: it may be the fastest
    ([1.3, 0.8, 1.25, 0.85, 1.2, 0.9, 1.3, 0.8], False),     # now faster, now slower: not clearly slower
    # slower in 7 rounds, as fast in one: the interval's lower end is 1.0 exactly, which is not clearly slower
    ([t * f for t, f in zip([1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97], [1.0, 1.1, 1.2, 1.1, 1.3, 1.2, 1.1, 1.15])],
     False)])
def test_a_wrong_dense_row_timed_clearly_slower_than_the_fastest_compared_one_does_not_hold_back_a_verdict(
        compiled, decided):
    """Timm compiled with logits off (the committed H200 run's DeiT-Ti at batch 32: 0.60 off, timed 8x slower than
    the fast dense path) is left out of the comparison; if its passes were timed clearly slower than the fastest
    dense row compared (the interval of the per-round ratio above 1), it was not the fastest dense mode of the
    run, right or wrong, so the verdicts stand, and ``excluded`` says why.  Faster, or not clearly slower, it
    might have been: the verdicts that would be met stay "not measured"."""
    timm = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    results = _eight_rounds(timm, compiled, [0.5] * 8)
    ref = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    off = F.logit_check(ref + 0.6, ref, 0.0)
    results['models']['tiny']['checks'] = {'timm_compiled': off}
    results['models']['tiny']['summary_sweep']['batches'][0]['checks'] = {'timm_compiled': off}
    report.attach_summary(results, 'cuda')
    entry, = results['summary']
    why = 'logits off: max |difference| 6.00e-01 > tolerance 1.00e-03'
    assert entry['best_dense_mode'] == 'timm' and entry['dense_modes'] == ['timm']
    assert entry['speedup_vs_best_dense'] == pytest.approx(2.0, rel=0.02)
    for compared in (entry, entry['speedup_by_batch']['1']):
        if decided:
            # timm_compiled / timm per round, sorted: 3.80, 3.88, 3.96, 3.98, 4.00, 4.02, 4.23, 4.24: median
            # (3.98 + 4.00) / 2; with 8 rounds the 95% interval of the median is the min-max range
            assert compared['excluded'] == {'timm-compiled': why + '; timed 3.99x slower than timm (95% CI '
                                                              '3.80-4.24), so not the fastest dense mode'}
            assert 'dense_not_compared' not in compared
        else:
            assert compared['excluded'] == {'timm-compiled': why}
            assert compared['dense_not_compared'] == {'timm_compiled': 'logit check failed: ' + why}
    verdicts = [t['verdict'] for t in entry['targets'].values()]
    assert verdicts == (['yes', 'yes'] if decided else [
        f'not measured (ahead of the dense modes timed, but not compared with timm_compiled (logit check failed: '
        f'{why}))'] * 2)
    assert results['not_measured'] == ([] if decided else [t['target'] for t in entry['targets'].values()])


def test_the_batch_targets_ask_the_pruned_model_to_be_at_least_as_fast_as_the_fastest_dense_one():
    """Batch 1 and 32 ask for at least 1.0x the fastest dense mode: ours timed 3% slower than timm eager in every
    one of eight rounds (the interval of the per-round ratio 1/1.03 wholly below 1) misses it at both, decided;
    exactly as fast meets it."""
    timm = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    for factor, met, verdict in ((1.03, False, '**NO**'), (1.0, True, 'yes')):
        ours = [t * factor for t in timm]
        results = _eight_rounds(timm, [4.0] * 8, ours)
        results['settings']['summary_batch_sizes'] = [32, 1]
        results['models']['tiny']['summary_sweep']['batches'].append(
            {'batch_size': 32, 'seconds': {'timm': timm, 'timm_compiled': [4.0] * 8, 'ours_25': ours}})
        report.attach_summary(results, 'cuda')
        entry, = results['summary']
        for bs in ('1', '32'):
            target = entry['targets'][f'batch{bs}']
            assert target['threshold'] == 1.0 and target['value'] == pytest.approx(1 / factor)
            assert (target['met'], target['verdict']) == (met, verdict), (bs, target)


def test_the_summary_figures_at_batch_1_and_32_are_each_of_their_own_batch():
    """Batch 32 and batch 1 timed with other pass times: each of speedup_batch1 and speedup_batch32 (the README's
    columns) is the median of the per-round ratios of its own batch's fastest dense and pruned rows, and the
    summary table shows both."""
    timm = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    results = _eight_rounds(timm, [4.0] * 8, [0.5] * 8)
    results['settings']['summary_batch_sizes'] = [32, 1]
    at32 = {'timm': [0.6, 0.62, 0.58, 0.61, 0.59, 0.6, 0.63, 0.57], 'timm_compiled': [0.5] * 8,
            'ours_25': [0.4, 0.41, 0.39, 0.4, 0.42, 0.38, 0.4, 0.41]}
    results['models']['tiny']['summary_sweep']['batches'].insert(0, {'batch_size': 32, 'seconds': at32})
    report.attach_summary(results, 'cuda')
    entry, = results['summary']
    at1 = results['models']['tiny']['summary_sweep']['batches'][1]['seconds']
    expected = {1: statistics.median(t / o for t, o in zip(at1['timm'], at1['ours_25'])),  # timm the fastest dense
                32: statistics.median(c / o for c, o in zip(at32['timm_compiled'], at32['ours_25']))}
    assert expected[1] == pytest.approx(2.0, rel=0.02) and expected[32] == pytest.approx(1.25)
    for bs, value in expected.items():
        assert entry[f'speedup_batch{bs}'] == entry['speedup_by_batch'][str(bs)]['speedup'] == pytest.approx(value)
    assert entry['speedup_by_batch']['32']['best_dense_mode'] == 'timm-compiled'
    line = next(x for x in report._summary_table(results) if x.startswith('| C&C-Ti-25 |'))
    assert line.split(' | ')[6:8] == [f'{expected[1]:.2f}', f'{expected[32]:.2f}']


def test_results_whose_verdicts_were_worked_out_again_say_so_in_the_markdown():
    with open(os.path.join(report.RESULTS_DIR, 'cuda.json')) as f:  # a whole run's results
        results = json.load(f)
    results.pop('rederived', None)
    assert 're-derived' not in report.markdown(results)
    results['rederived'] = [{'date': '2026-12-05', 'why': 'a new rule.'}]
    lines = report.markdown(results).splitlines()
    assert lines[:3] == [lines[0], '', 'Summary and targets re-derived on 2026-12-05 from this run\'s own pass '
                                       'times and logit checks, nothing timed again: a new rule.']


@pytest.mark.parametrize('row, times', [
    ('timm', [1.0] * 7 + [math.nan]), ('timm', [math.inf] * 8), ('timm_compiled', [0.9] * 7 + [math.nan]),
    ('timm_compiled', [0.9] * 7 + [-0.9]), ('ours_25', [0.5] * 7 + [math.nan]), ('ours_25', [0.0] * 8),
    ('ours_25', [])])
def test_pass_times_that_are_no_measurement_never_give_a_yes_or_a_figure(row, times):
    """A NaN, infinite, zero or negative pass time, or none at all, is no measurement: such a row takes no part in
    the comparison (said under ``excluded``); a dense one makes the targets it would decide "not measured", and
    no figure of the summary is NaN or infinite.  (The median of a list with a NaN in it is whatever sorting put
    in the middle: a NaN timm pass read 2.0x and "yes"; a zero one raised ZeroDivisionError.)"""
    good = {'timm': [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97], 'timm_compiled': [0.9] * 8, 'ours_25': [0.5] * 8}
    results = _eight_rounds(**{**good, row: times})
    report.attach_summary(results, 'cuda')
    entry, = results['summary']
    json.dumps(results['summary'], allow_nan=False)  # every figure a finite number or None
    assert entry['excluded'][{'timm': 'timm', 'timm_compiled': 'timm-compiled', 'ours_25': 'ours'}[row]]
    for name in ('vs_best_dense', 'batch1'):
        target = entry['targets'][name]
        assert target['met'] is None and target['verdict'].startswith('not measured'), target
    if row == 'timm':  # no timm eager to set the pruned model against
        assert entry['speedup_vs_timm_eager'] is None
    # the same run with every pass time a measurement: both targets are met, decided
    results = _eight_rounds(**good)
    report.attach_summary(results, 'cuda')
    assert [t['verdict'] for t in results['summary'][0]['targets'].values()] == ['yes', 'yes']


def test_a_ratio_with_a_pass_time_that_is_no_measurement_is_none_and_its_target_not_measured():
    # every ratio of a row goes through Timings.ratio (a row's speed-up over timm, the routing, the sweeps): with a
    # NaN pass time among eight the median of the ratios was 2.0 and its interval [2.0, nan], a row target's "yes"
    good = [0.5] * 8
    for bad in ([1.0] * 7 + [math.nan], [math.inf] * 8, [0.0] * 8, []):
        for t in (stats.Timings({'timm': bad, 'ours': good}, batch=8),
                  stats.Timings({'timm': [1.0] * 8, 'ours': bad}, batch=8)):
            ratio = t.ratio('ours', 'timm')
            assert ratio == {'median': None, 'min': None, 'max': None, 'ci': None}
            fields = stats.as_fields('speedup_vs_timm', ratio)
            target = report._target('t', fields['speedup_vs_timm'], 1.37, True, fields['speedup_vs_timm_ci'],
                                    paired=True)
            assert target['met'] is None and report.verdict(target).startswith('not measured')
    assert stats.Timings({'timm': [1.0] * 8, 'ours': good}, batch=8).ratio('ours', 'timm')['median'] == 2.0


def test_modes_tied_on_images_per_s_go_to_the_first_row_of_the_table_in_every_comparison():
    # timm compiled and ours tie with other rows of the same median (the same pass times, rounds in another order);
    # the first row of the table is taken, at the main batch and at batch 1 alike, and the ratio is against it
    timm, compiled = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97], [0.8, 0.82, 0.78, 0.81, 0.79, 0.8, 0.83, 0.77]
    ours = [0.5, 0.52, 0.48, 0.51, 0.49, 0.5, 0.53, 0.47]
    results = _eight_rounds(timm, compiled, ours)
    rows = results['models']['tiny']['rows']
    rows.insert(2, _row('fast_torch', 'fast-torch-dense', True, 0.0, compiled[::-1]))
    rows.append(_row('fast_torch_25', 'fast-torch', False, 0.25, ours[::-1], 1.37, 'C&C-Ti-25 (fast path, torch)'))
    results['models']['tiny']['summary_sweep']['batches'][0]['seconds'].update(
        fast_torch=compiled[::-1], fast_torch_25=ours[::-1])
    report.attach_summary(results, 'cuda')
    entry, = results['summary']
    at1 = entry['speedup_by_batch']['1']
    assert (entry['best_pruned_mode'], entry['best_dense_mode']) == (at1['best_pruned_mode'], at1['best_dense_mode']) \
        == ('ours', 'timm-compiled')
    assert entry['speedup_vs_best_dense'] == statistics.median(c / o for c, o in zip(compiled, ours))


def test_a_target_whose_value_is_not_a_number_is_not_measured():
    for ci in (None, [math.nan, math.nan], [0.9, 1.1]):
        target = report._target('t', math.nan, 1.0, True, ci, paired=True)
        assert target['met'] is None and report.verdict(target).startswith('not measured')
    # an interval with a NaN end decides nothing
    assert report.verdict(report._target('t', 1.5, 1.0, True, [1.2, math.nan], paired=True)) == 'yes, within noise'


def _planned(results, models, rates, batches):
    """_summary_run's results as a run of --models ``models`` x --rates ``rates`` with summary batches ``batches``
    would record its plan (the DeiT shortcuts only)."""
    timm_names = {'tiny': 'deit_tiny_patch16_224', 'small': 'deit_small_patch16_224'}
    results['settings'] = {'dtype': 'fp16', 'summary_batch_sizes': batches}
    results['pruned_models'] = [{'model': f'C&C-{"Ti" if m == "tiny" else "S"}-{round(r * 100)}',
                                 'timm_model': timm_names[m], 'prune_rate': r, 'section_model': m}
                                for m in models for r in rates]
    return results


def test_a_run_cut_short_has_every_planned_entry_and_target_and_counts_what_it_could_not_measure():
    """Ti ran its main table and batch 1; Ti's batch 32 and all of DeiT-S were left out by the time limit (S's
    main table) and never started.  Every planned entry and every asked-for target is there: what could not be
    measured is unmet (met None), says why, and is counted, so such a run never reads as complete."""
    results = _planned(_summary_run(), ['tiny', 'small'], [0.25, 0.40], [32, 1])
    results['sections'] = [
        {'section': 'DeiT-Ti, batch 10 (main table)', 'kind': 'main', 'model': 'tiny', 'batch_size': 10,
         'status': 'done'},
        {'section': 'DeiT-Ti, batch 32 (summary)', 'kind': 'summary', 'model': 'tiny', 'batch_size': 32,
         'status': 'left out', 'reason': 'time limit of 180 s reached after 181 s (--time-limit)'},
        {'section': 'DeiT-S, batch 256 (main table)', 'kind': 'main', 'model': 'small', 'batch_size': 256,
         'status': 'left out', 'reason': 'time limit of 180 s reached after 181 s (--time-limit)'}]
    report.attach_summary(results, 'cuda')
    entries = {e['model']: e for e in results['summary']}
    assert list(entries) == ['C&C-Ti-25', 'C&C-Ti-40', 'C&C-S-25', 'C&C-S-40']  # the planned order
    ti = entries['C&C-Ti-25']['targets']
    assert set(ti) == {'vs_best_dense', 'batch1', 'batch32'}
    assert ti['batch1']['met'] is True and ti['batch32']['met'] is None
    assert ti['batch32']['verdict'] == ('not measured (batch 32 left out: time limit of 180 s reached after 181 s '
                                        '(--time-limit))')
    s25 = entries['C&C-S-25']
    assert s25['not_run'] == 'main table left out: time limit of 180 s reached after 181 s (--time-limit)'
    assert (s25['speedup_vs_best_dense'], s25['flops_ratio'], s25['speedup_batch1']) == (None, None, None)
    assert {k: t['met'] for k, t in s25['targets'].items()} == {'vs_best_dense': None, 'batch1': None,
                                                                 'batch32': None}
    assert s25['targets']['batch1']['verdict'] == f'not measured ({s25["not_run"]})'
    assert len(results['not_measured']) == 2 + 3 * 2  # Ti-25/40 at batch 32; S-25/40 all three
    assert all(t in [x['target'] for x in results['targets']] for t in results['not_measured'])
    text = '\n'.join(report._summary_table(results) + report._targets_table(results))  # renders with the gaps
    assert '| C&C-S-25 | – | – | – | – | – | – | – |' in text
    assert 'not measured (main table left out' in text


def test_logit_checks_refuse_an_infinite_tolerance_and_do_not_judge_top1_on_too_few_clear_images():
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, 0.5]])  # two clear images, two exact ties
    c = F.logit_check(ref, ref, baseline=float('inf'))
    assert not c['within_tolerance']  # the eager model's own error unbounded: nothing can be judged close
    c = F.logit_check(ref, ref, baseline=0.0)
    assert (c['clear_images'], c['top1_ok']) == (2, True)  # half the images: judged
    c = F.logit_check(ref[1:], ref[1:], baseline=0.0)
    assert (c['clear_images'], c['top1_ok']) == (1, None)  # one of three: not judged
    within, top1 = report.check_targets('M batch 3', {'x': c}, {}, {'x': 'fast-x'})
    assert within['met'] is True and top1['met'] is None
    assert report.verdict(top1) == 'not measured (x: only 1 of 3 images have a clear margin)'
    # one row judged and passing, another not judged: the section's top-1 target is not passed
    both = {'x': c, 'y': F.logit_check(ref, ref, baseline=0.0)}
    _, top1 = report.check_targets('M batch 3', both, {'x': 'X (fast x)'}, {'x': 'fast-x', 'y': 'fast-y'})
    assert report.verdict(top1) == 'not measured (X (fast x): only 1 of 3 images have a clear margin)'
    # an infinite tolerance: the row fails its section's target and is kept out of the speed verdicts, saying why
    inf = F.logit_check(ref + 1e-2, ref, baseline=float('inf'))
    within, _ = report.check_targets('M batch 4', {'z': inf}, {}, {'z': 'fast-z'})
    assert within['met'] is False and within['value'] == float('inf')
    assert (report.check_failure(inf)
            == "no finite tolerance: the eager model's own error at this precision is not finite")


def test_readme_speed_table_sets_a_gpu_run_beside_the_cpu_run(tmp_path, capsys, monkeypatch):
    """The committed CPU run with the hand-made GPU run of _summary_run: four GPU columns headed with the GPU's
    name, filled for the pruned models that run has (C&C-Ti-25 and -40; ratios worked out by hand), '–' for the
    dense rows and the models it lacks; the CPU and paper columns as without a GPU run."""
    cpu = json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')))
    gpu = _summary_run()
    report.attach_summary(gpu, 'cuda')
    with pytest.raises(ValueError, match='name no GPU'):
        report.readme_speed_table(cpu, gpu)
    gpu['machine'] = {'gpu': 'NVIDIA H200', 'device': 'cuda'}
    alone, beside = report.readme_speed_table(cpu), report.readme_speed_table(cpu, gpu)
    split = lambda line: line.strip('|').split(' | ')  # noqa: E731
    header = split(beside[0].strip())
    assert header[6:10] == ['NVIDIA H200: fastest pruned over fastest dense', 'over timm eager', 'batch 1',
                            'batch 32']
    rows = {split(line.strip())[0].strip(): split(line.strip()) for line in beside[2:]}
    assert len(rows) == len(alone) - 2 == 12  # Ti, S, B: dense + three rates each
    # Ti-25: timm compiled / boolean 0.75/0.62; timm / boolean 1.10/0.75; batch 1 timm / ours compiled 0.10/0.085
    assert rows['C&C-Ti-25'][6:10] == ['1.21', '1.47', '1.18', '–']
    # Ti-40: per-round timm compiled / ours 0.80/0.50, 0.85/0.50, 0.75/0.50 -> 1.60; timm 1.0..1.1 / 0.5 -> 2.00
    assert rows['C&C-Ti-40'][6:10] == ['1.60', '2.00', '0.50', '–']
    assert rows['DeiT-Ti'][6:10] == rows['C&C-Ti-30'][6:10] == rows['C&C-B-25'][6:10] == ['–'] * 4
    for line, plain in zip(beside[2:], alone[2:]):
        assert split(line.strip())[:6] + split(line.strip())[10:] == split(plain.strip())
    (tmp_path / 'gpu.json').write_text(json.dumps(gpu))
    report.main(['--gpu', str(tmp_path / 'gpu.json')])
    assert capsys.readouterr().out.splitlines() == beside
    # the default GPU run (results/cuda.json) is left out while there is none; one named must exist
    cpu_json = os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')
    with monkeypatch.context() as m:
        m.setattr(report, 'RESULTS_DIR', str(tmp_path / 'no_results'))
        report.main(['--cpu', cpu_json])
        assert capsys.readouterr().out.splitlines() == alone
    with pytest.raises(SystemExit) as e:
        report.main(['--gpu', str(tmp_path / 'none.json')])
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ''
    assert captured.err == f'error: --gpu {tmp_path / "none.json"}: No such file or directory\n'

    # --write-readme puts that table in place of the README's (its header grows by the GPU's columns); the rest of
    # the file stays as it was, and writing it again changes nothing
    # (the README holds the table of the committed GPU run, or the CPU's alone while none is committed)
    readme = open(os.path.join(ROOT, 'README.md')).read()
    committed_gpu = os.path.join(ROOT, 'benchmarks', 'results', 'cuda.json')
    committed = report.readme_speed_table(cpu, json.load(open(committed_gpu)) if os.path.exists(committed_gpu)
                                          else None)
    (tmp_path / 'README.md').write_text(readme)
    report.main(['--gpu', str(tmp_path / 'gpu.json'), '--write-readme', str(tmp_path / 'README.md')])
    assert capsys.readouterr().out == f'wrote the speed table into {tmp_path / "README.md"}\n'
    written = (tmp_path / 'README.md').read_text()
    assert '\n'.join(committed) in readme
    assert written == readme.replace('\n'.join(committed), '\n'.join(beside)) != readme
    report.main(['--gpu', str(tmp_path / 'gpu.json'), '--write-readme', str(tmp_path / 'README.md')])
    assert capsys.readouterr().out.endswith('(unchanged)\n') and (tmp_path / 'README.md').read_text() == written


@pytest.mark.parametrize('case, message', [
    ('no table', 'README.md: no speed table in it (a line beginning "| model | GFLOPs |")'),
    # a second table (pasted twice, a merge): the first was replaced and the second, stale, left as it was
    ('two tables', 'README.md: 2 speed tables in it (lines 3 and 7 begin "| model | GFLOPs |"), not one'),
    ('no readme', 'missing.md: No such file or directory'),
    ('gpu missing', 'none.json: No such file or directory'),
    ('gpu not json', 'gpu.json: not JSON'),
    ('gpu not results', 'gpu.json: not a results file of benchmarks/model_zoo.py'),
    # lists nested deeper than Python's recursion limit: json.load's RecursionError was a traceback
    ('gpu nested too deep', 'gpu.json: not a results file of benchmarks/model_zoo.py (nested too deep to read)'),
    ('gpu without its name', 'gpu.json: not the GPU run the speed table shows (it names no GPU (machine.gpu is '
                             'missing))'),  # it named no file
    # the GPU columns were headed "['NVIDIA H200']: fastest pruned over fastest dense"
    ('gpu name a list', 'gpu.json: not the GPU run the speed table shows (it names no GPU (machine.gpu is a list, '
                        'not a string))'),
    ('gpu name blank', '(it names no GPU (machine.gpu is blank))'),
    # a model twice: its GPU figures were the last entry's, its CPU row printed twice
    ('gpu summary entry twice', 'gpu.json: not the GPU run the speed table shows (its summary has more than one entry '
                                'of C&C-Ti-25)'),
    # an entry named after the dense model (hand-edited): its figures filled the GPU columns of timm's row
    ('gpu summary entry of a dense model', 'gpu.json: not the GPU run the speed table shows (its summary has an '
                                           'entry for DeiT-Ti, a dense model: the summary is of pruned models against '
                                           'the fastest dense one)'),
    ('cpu section twice', 'cpu.json: not the CPU run the speed table shows (it has more than one row of DeiT-Ti, '
                          'C&C-Ti-25, C&C-Ti-30, C&C-Ti-40)'),
    # a "|" or a newline in a cell split the README's table (the rows after it no longer part of it)
    ('gpu name with a newline', 'gpu.json: not the GPU run the speed table shows (its machine.gpu has a "|" or a '
                                'control character, which would break the Markdown table)'),
    ('cpu label with a bar', 'cpu.json: not a results file of benchmarks/model_zoo.py (models.tiny.rows[2].label has '
                             'a "|" or a control character, which would break the Markdown table)'),
    ('gpu machine a list', 'gpu.json: not a results file of benchmarks/model_zoo.py (machine is a list, not an '
                           'object)'),
    ('cpu models a list', 'cpu.json: not a results file of benchmarks/model_zoo.py (models is a list, not an '
                          'object)'),
    ('cpu model without rows', 'cpu.json: not a results file of benchmarks/model_zoo.py (models.x has no "rows")'),
    ('cpu row without its figures', 'cpu.json: not a results file of benchmarks/model_zoo.py (models.tiny.rows[0] '
                                    'has no "gflops")'),
    ('cpu figure not a number', 'cpu.json: not a results file of benchmarks/model_zoo.py (models.tiny.rows[2].'
                                'images_per_s is nan, not a finite number)'),  # JSON's NaN was printed as 'nan'
    ('cpu without models', 'cpu.json: not a results file of benchmarks/model_zoo.py (models is an empty object)'),
    # the table looks its columns up by the entry's model: a KeyError traceback without one
    ('gpu summary entry without its model', 'gpu.json: not a results file of benchmarks/model_zoo.py (summary[0] has '
                                            'no "model")'),
    ('gpu figure not a number', 'gpu.json: not a results file of benchmarks/model_zoo.py (summary[0].speedup_batch1 '
                                'is inf, not a finite number)'),
    # a figure of no measurement (0, negative) was printed into the table as if it were one: '0.00', '-3.0'
    ('gpu figure zero', 'gpu.json: not a results file of benchmarks/model_zoo.py (summary[0].speedup_vs_best_dense '
                        'is not above 0)'),
    ('cpu images/s negative', '(models.tiny.rows[2].images_per_s is not above 0)'),
    ('cpu speed-up zero', '(models.tiny.rows[2].speedup_vs_timm is not above 0)'),
    ('cpu GFLOPs zero', '(models.tiny.rows[0].gflops is not above 0)'),
    ('cpu paper images/s negative', '(models.tiny.rows[0].seed_gpu.images_per_s is not above 0)'),
    ('cpu a gpu run', 'cpu.json: not the CPU run the speed table shows (it was measured on cuda, not on the CPU)'),
    ('cpu original protocol', 'cpu.json: not the CPU run the speed table shows (it was timed with --protocol '
                              'original; the table is protocol ours)'),
    ('cpu fp16', 'cpu.json: not the CPU run the speed table shows (it was timed in fp16; the table is fp32)'),
    # a smoke test or the random baseline: printed into the README's table as if it were the measurement
    ('cpu quick', 'cpu.json: not the CPU run the speed table shows (it is a --quick run (a smoke test of a few '
                  'passes), not a measurement)'),
    ('gpu random masks', 'gpu.json: not the GPU run the speed table shows (its pruned models have --masks random; '
                         'the table is the Taylor-pruned models)'),
    # a run at another batch size: set beside a README that states each model's default batch size
    ('cpu batch size', 'cpu.json: not the CPU run the speed table shows (it was timed at --batch-size 64 for every '
                       'model; the table and the README around it state each model\'s default batch size)'),
    ('gpu batch size', 'gpu.json: not the GPU run the speed table shows (it was timed at --batch-size 64 for every '
                       'model; the table and the README around it state each model\'s default batch size)'),
    # the GPU figures of other pruned models set beside the CPU rows, as if of the same ones
    ('gpu another seed', "gpu.json: not the GPU run the speed table shows (its --seed 1 is not the CPU run's 0: "
                         "other weights and masks, not the pruned models of the rows its columns would stand "
                         "beside)"),
    ('cpu unfinished', 'cpu.json: not the CPU run the speed table shows (1 of its sections did not finish; '
                       'model_zoo.py --resume finishes them)'),
    ('readme not writable', 'cannot write'),
    # the paper's figures and the boolean-mask ratio beside a row: a traceback or a format error naming nothing
    ('cpu seed_gpu a string', 'cpu.json: not a results file of benchmarks/model_zoo.py (models.tiny.rows[0].'
                              'seed_gpu is a string, not an object)'),
    ('cpu paper images/s a fraction', '(models.tiny.rows[0].seed_gpu.images_per_s is a number, not an integer)'),
    ('cpu vs_boolean a string', '(models.tiny.rows[2].vs_boolean is a string, not a finite number)'),
    # a GPU run the table is not made from: it was printed into the README's GPU columns as if it were
    ('gpu a cpu run', 'gpu.json: not the GPU run the speed table shows (it was measured on cpu, not on a CUDA GPU)'),
    ('gpu original protocol', 'gpu.json: not the GPU run the speed table shows (it was timed with --protocol '
                              'original; the table is protocol ours)'),
    ('gpu rows given', 'gpu.json: not the GPU run the speed table shows (it timed only the rows given with --rows '
                       '(timm, ours), not every mode the fastest dense and pruned ones are chosen from)'),
    ('gpu unfinished', 'gpu.json: not the GPU run the speed table shows (1 of its sections did not finish; '
                       'model_zoo.py --resume finishes them)'),
    ('gpu without a summary', 'gpu.json: not the GPU run the speed table shows (it has no summary)'),
])
def test_readme_table_writer_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case, message):
    readme = tmp_path / 'README.md'
    readme.write_text('# a README\n\nno table here\n' if case == 'no table' else
                      '# a README\n\n| model | GFLOPs |\n|---|---|\n| x | 1 |\n\n| model | GFLOPs |\n|---|---|\n'
                      if case == 'two tables' else open(os.path.join(ROOT, 'README.md')).read())
    before = readme.read_text()
    gpu = tmp_path / 'gpu.json'
    gpu.write_text({'gpu not json': '{', 'gpu not results': '[1, 2]',
                    'gpu nested too deep': '[' * 100000 + ']' * 100000}.get(case, '{}'))
    if case in ('gpu without its name', 'gpu name a list', 'gpu name blank', 'gpu name with a newline',
                'gpu summary entry twice', 'gpu summary entry of a dense model', 'gpu machine a list',
                'gpu figure not a number', 'gpu figure zero', 'gpu summary entry without its model',
                'gpu a cpu run', 'gpu original protocol', 'gpu rows given', 'gpu unfinished', 'gpu random masks',
                'gpu batch size', 'gpu another seed', 'gpu without a summary'):
        run = _summary_run()
        report.attach_summary(run, 'cuda')
        run['machine'] = {'device': 'cuda'} if case == 'gpu without its name' else {'gpu': 'NVIDIA H200',
                                                                                    'device': 'cuda'}
        if case in ('gpu name a list', 'gpu name blank'):
            run['machine']['gpu'] = ['NVIDIA H200'] if case == 'gpu name a list' else ' '
        if case == 'gpu summary entry twice':
            run['summary'].append(dict(run['summary'][0], speedup_vs_best_dense=9.99))
        if case == 'gpu summary entry of a dense model':
            run['models']['tiny']['rows'][0]['label'] = 'DeiT-Ti (timm)'
            run['summary'].append(dict(run['summary'][0], model='DeiT-Ti'))
        if case == 'gpu name with a newline':
            run['machine']['gpu'] = 'NVIDIA\nH200'
        if case == 'gpu machine a list':
            run['machine'] = ['NVIDIA H200']
        if case == 'gpu figure not a number':
            run['summary'][0]['speedup_batch1'] = math.inf
        if case == 'gpu summary entry without its model':
            del run['summary'][0]['model']
        if case == 'gpu figure zero':
            run['summary'][0]['speedup_vs_best_dense'] = 0
        if case == 'gpu a cpu run':
            run['machine']['device'] = 'cpu'
        if case == 'gpu original protocol':
            run['settings']['protocol'] = 'original'
        if case == 'gpu rows given':
            run['settings'].update(rows=['timm', 'ours'], rows_given=True)
        if case == 'gpu random masks':
            run['settings']['masks'] = 'random'
        if case == 'gpu batch size':
            run['settings']['batch_size'] = 64
        if case == 'gpu another seed':
            run['settings']['seed'] = 1
        if case == 'gpu without a summary':
            del run['summary']
        if case == 'gpu unfinished':
            run['sections'] = [{'kind': 'main', 'status': 'done'}, {'kind': 'summary', 'status': 'left out'}]
        gpu.write_text(json.dumps(run))
    cpu = json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')))
    if case == 'cpu models a list':
        cpu['models'] = list(cpu['models'].values())
    elif case == 'cpu model without rows':
        cpu['models'] = {'x': {}}
    elif case == 'cpu row without its figures':
        del cpu['models']['tiny']['rows'][0]['gflops'], cpu['models']['tiny']['rows'][0]['images_per_s']
    elif case == 'cpu figure not a number':
        cpu['models']['tiny']['rows'][2]['images_per_s'] = math.nan
    elif case == 'cpu images/s negative':
        cpu['models']['tiny']['rows'][2]['images_per_s'] = -3.0
    elif case == 'cpu speed-up zero':
        cpu['models']['tiny']['rows'][2]['speedup_vs_timm'] = 0
    elif case == 'cpu GFLOPs zero':
        cpu['models']['tiny']['rows'][0]['gflops'] = 0.0
    elif case == 'cpu paper images/s negative':
        cpu['models']['tiny']['rows'][0]['seed_gpu']['images_per_s'] = -5
    elif case == 'cpu label with a bar':
        cpu['models']['tiny']['rows'][2]['label'] = 'C&C|Ti-25 (ours)'
    elif case == 'cpu section twice':
        cpu['models']['tiny_again'] = copy.deepcopy(cpu['models']['tiny'])
    elif case == 'cpu without models':
        cpu['models'] = {}
    elif case == 'cpu a gpu run':
        cpu['machine']['device'] = 'cuda'
    elif case == 'cpu original protocol':
        cpu['settings']['protocol'] = 'original'
    elif case == 'cpu fp16':
        cpu['settings']['dtype'] = 'fp16'
    elif case == 'cpu quick':
        cpu['settings']['quick'] = True
    elif case == 'cpu batch size':
        cpu['settings']['batch_size'] = 64
        for res in cpu['models'].values():
            res['batch_size'] = 64
    elif case == 'cpu unfinished':
        cpu['sections'][-1]['status'] = 'pending'
    elif case == 'cpu seed_gpu a string':
        cpu['models']['tiny']['rows'][0]['seed_gpu'] = 'x'
    elif case == 'cpu paper images/s a fraction':
        cpu['models']['tiny']['rows'][0]['seed_gpu']['images_per_s'] = 12.5
    elif case == 'cpu vs_boolean a string':
        cpu['models']['tiny']['rows'][2]['vs_boolean'] = 'abc'
    (tmp_path / 'cpu.json').write_text(json.dumps(cpu))
    if case == 'readme not writable':  # the disk fills as the new README is written: the old one stays
        def full(src, dst):
            raise OSError(28, 'No space left on device')
        monkeypatch.setattr(os, 'replace', full)
    target = tmp_path / 'missing.md' if case == 'no readme' else readme
    with pytest.raises(SystemExit) as e:
        report.main(['--cpu', str(tmp_path / 'cpu.json'),
                     '--gpu', str(tmp_path / 'none.json') if case == 'gpu missing' else str(gpu)
                     if case.startswith('gpu') else os.path.join(ROOT, 'benchmarks', 'results', 'cuda.json'),
                     '--write-readme', str(target)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ') and message in err, err
    assert readme.read_text() == before and sorted(os.listdir(tmp_path)) == sorted(
        ['README.md', 'cpu.json', 'gpu.json'])  # nothing written, no temporary file left


def test_readme_speed_table_shows_a_dash_for_a_row_without_its_speed_up():
    """A row of an older or cut CPU run without its speed-up over timm (which the shape check lets through, as
    null) shows '–' there, as a null does; it was a KeyError traceback."""
    cpu = json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')))
    ours = next(i for i, r in enumerate(cpu['models']['tiny']['rows']) if r['kind'] == 'ours')
    cpu['models']['tiny']['rows'][ours]['speedup_vs_timm'] = None
    as_null = report.readme_speed_table(cpu)
    del cpu['models']['tiny']['rows'][ours]['speedup_vs_timm']
    assert report.readme_speed_table(cpu) == as_null
    assert ' | – | ' in next(line for line in as_null if line.startswith('| C&C-Ti-25 |'))


def test_write_readme_keeps_the_line_ends_of_a_windows_readme(tmp_path, capsys):
    """A README with Windows line ends (\\r\\n) gets its new speed table with the same line ends, and every other
    line as it was; it was rewritten throughout with \\n (and called unchanged when its table was)."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    table = report.readme_speed_table(json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json'))),
                                      json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cuda.json'))))
    assert '\n'.join(table) in readme and '\r' not in readme
    path = tmp_path / 'README.md'
    for stale in (table[2], table[2].replace(' | ', ' | 9', 1)):  # as it is, and one row stale
        path.write_bytes(readme.replace(table[2], stale).replace('\n', '\r\n').encode())
        report.main(['--write-readme', str(path)])
        assert path.read_bytes() == readme.replace('\n', '\r\n').encode()
        assert capsys.readouterr().out.endswith('(unchanged)\n') == (stale == table[2])


def test_write_readme_reads_the_readme_as_utf8_whatever_the_locale(tmp_path):
    """The README is read as UTF-8, as it is written: under an ASCII locale the README (its '–') was refused as
    undecodable, and under a Latin-1 one every character beyond ASCII would come back written twice over."""
    readme = tmp_path / 'README.md'
    shutil.copy(os.path.join(ROOT, 'README.md'), readme)
    env = dict(subprocess_env(), LC_ALL='C', PYTHONUTF8='0', PYTHONCOERCECLOCALE='0')
    r = subprocess.run([sys.executable, '-m', 'benchmarks.report', '--write-readme', str(readme)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith('(unchanged)\n'), r.stderr
    assert readme.read_bytes() == open(os.path.join(ROOT, 'README.md'), 'rb').read()


def test_report_on_an_ascii_stdout_says_what_to_set(tmp_path):
    """Printing the table (its '–' and '×') to a stdout whose encoding is ASCII is one line naming the encoding and
    the way out, not the codec's own words; with PYTHONIOENCODING=utf-8 the same run prints the table."""
    env = dict(subprocess_env(), LC_ALL='C', PYTHONUTF8='0', PYTHONCOERCECLOCALE='0')
    r = subprocess.run([sys.executable, '-m', 'benchmarks.report'], cwd=ROOT, env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == b''
    assert r.stderr.decode() == ("error: standard output's encoding (ascii) cannot print the table's characters "
                                 "(U+2013 the first): set PYTHONIOENCODING=utf-8, or write the table into a README "
                                 "with --write-readme\n"), r.stderr
    r = subprocess.run([sys.executable, '-m', 'benchmarks.report'], cwd=ROOT, env=dict(env, PYTHONIOENCODING='utf-8'),
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and '| model |' in r.stdout.decode('utf-8'), r.stderr


def test_report_names_a_path_with_a_newline_in_one_line(tmp_path, capsys):
    """A file named with a newline (--cpu, --gpu, --write-readme) is refused in one line, the newline escaped."""
    for flag in ('--cpu', '--gpu'):
        with pytest.raises(SystemExit) as e:
            report.main([flag, str(tmp_path / 'a\nb.json')])
        captured = capsys.readouterr()
        assert e.value.code == 2 and captured.out == ''
        assert captured.err == f'error: {flag} {tmp_path}/a\\nb.json: No such file or directory\n', captured.err


def test_report_runs_by_path_from_anywhere_and_a_mistyped_flag_is_one_line(tmp_path):
    """`python benchmarks/report.py` prints what `python -m benchmarks.report` prints, from another folder and
    without the repository on PYTHONPATH."""
    env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
    script = [sys.executable, os.path.join(ROOT, 'benchmarks', 'report.py')]
    by_path = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    as_module = subprocess.run([sys.executable, '-m', 'benchmarks.report'], capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=120)
    assert by_path.returncode == as_module.returncode == 0, by_path.stderr
    assert by_path.stdout == as_module.stdout and by_path.stdout.startswith(report.TABLE_START)
    typo = subprocess.run(script + ['--gup', 'x.json'], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert typo.returncode == 2 and typo.stdout == ''
    assert typo.stderr == 'error: unrecognized arguments: --gup x.json (see --help)\n', typo.stderr
    # a reader that stops before the table is written (`| head -1` on a slow pipe; here `| true`, which reads
    # nothing): no BrokenPipeError traceback, and the status of a reader that has what it wanted
    piped = subprocess.run(f'{shlex.quote(sys.executable)} {shlex.quote(script[1])} | true; echo "${{PIPESTATUS[0]}}"',
                           shell=True, executable='/bin/bash', capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
    assert piped.stdout == '0\n' and piped.stderr == '', piped.stderr


# ---------------------------------------------------------------------------------------------------------------
# the original code's protocol

def test_original_protocol_verdicts_on_the_boolean_formulation_are_ratios_of_means_not_unpaired_medians():
    """Under --protocol original a row's ratios are ratios of means, with no interval by nature: its target against
    the boolean formulation is decided like its target against timm; under ours, a ratio with too few rounds for
    an interval is 'within noise'."""
    for protocol, decided in (('original', 'yes'), ('ours', 'yes, within noise')):
        row = dict(_row('ours_25', 'ours', False, 0.25, [1.0], 1.2, 'C&C-Ti-25 (ours)'), protocol=protocol,
                   speedup_vs_timm=1.3, vs_boolean=1.1, vs_boolean_ci=None)
        results = {'models': {'tiny': {'label': 'DeiT-Ti', 'short': 'Ti', 'batch_size': 2, 'rows': [row]}}}
        verdicts = {t['target']: report.verdict(t) for t in report.targets(results, 'cpu')}
        assert verdicts == {'C&C-Ti-25 (ours): speed-up over dense timm >= FLOPs ratio (cpu)': decided,
                            'C&C-Ti-25 (ours): >= 1.0x the boolean-mask formulation': decided}, protocol


def test_original_protocol_times_each_row_alone_with_autograd_and_the_original_settings(monkeypatch):
    weight = torch.ones(1, requires_grad=True)
    calls = []

    def row(name):
        def run(x):
            out = (x * weight).sum()
            calls.append({'row': name, 'graph': out.grad_fn is not None,
                          'cudnn_benchmark': torch.backends.cudnn.benchmark, 'shape': tuple(x.shape), 'dtype': x.dtype,
                          'uniform': 0 <= x.min().item() <= x.max().item() < 1,
                          'input': x.data_ptr()})
            return out
        return run

    # start and end of each of the original's three runs, row a then row b; the first runs are slow (set-up)
    clock = iter([10.0, 30.0, 30.0, 36.0, 40.0, 44.0, 50.0, 60.0, 60.0, 63.0, 70.0, 72.0])
    monkeypatch.setattr(engine, 'time', SimpleNamespace(perf_counter=lambda: next(clock)))
    before = torch.backends.cudnn.benchmark
    with torch.no_grad():  # the caller's no_grad does not reach the protocol: it builds autograd graphs
        t = zoo.time_original({'a': row('a'), 'b': row('b')}, batch=3, device=CPU, passes=4, shape=(3, 8, 8))
    assert [c['row'] for c in calls] == ['a'] * 12 + ['b'] * 12  # one row after another, its 3 runs of 4 passes
    assert all(c['graph'] and c['cudnn_benchmark'] and c['dtype'] == torch.float32 and c['uniform'] for c in calls)
    assert {c['shape'] for c in calls} == {(3, 3, 8, 8)}
    assert len({c['input'] for c in calls[:12]}) == 1  # one input batch per row
    assert t.seconds == {'a': [1.0], 'b': [0.5]}  # (44 - 40) / 4 and (72 - 70) / 4: the last run's mean pass time
    assert t.ratio('b', 'a')['median'] == 2.0 and t.ratio('b', 'a')['ci'] is None
    assert torch.backends.cudnn.benchmark == before


def test_original_settings_allow_tf32_on_cuda_only_and_are_restored():
    b = torch.backends
    before = (b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    b.cuda.matmul.allow_tf32 = False
    try:
        with zoo.original_settings(CPU):
            assert b.cudnn.benchmark and not b.cuda.matmul.allow_tf32
        with pytest.raises(RuntimeError):
            with zoo.original_settings(torch.device('cuda')):  # flags only: no GPU needed to set them
                assert b.cudnn.benchmark and b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32
                raise RuntimeError('a row failed')
        assert (b.cudnn.benchmark, b.cuda.matmul.allow_tf32) == (before[0], False)
    finally:
        b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = before


# ---------------------------------------------------------------------------------------------------------------
# arguments: one validation before any work

# Every option of the parser is classified here, so a new numeric flag without a test of its range fails below.
# Numeric flags: values refused besides nan, inf and -1, and values accepted (the documented edges).
NUMERIC = {
    '--batch-size': (['0', '65537', '1.5'], ['1', '65536']),
    '--repeats': (['0', '100001'], ['1']),
    '--warmup': (['100001', '0.5'], ['0']),
    '--original-passes': (['0', '100001'], ['1']),
    '--scoring-repeats': (['100001'], ['0']),
    '--scoring-batch-size': (['0', '65537'], ['1']),
    '--routing-repeats': (['100001'], ['0']),
    '--breakdown-rounds': (['100001'], ['0']),
    '--threads': (['0', '1025'], ['1', '1024']),
    '--seed': (['4294967296', '1e3'], ['0', '4294967295']),
    '--rates': (['0', '1', '1.5', 'abc', '0.25,abc', '0.3,0.3', '0.25,0.251', ''], ['0.5', '0.1,0.9']),
    '--sweep-rates': (['1', '0.5,nan'], ['0', '0,0.5', '']),
    '--sweep-batch-sizes': (['0', '65537', '8,8'], ['1,8', '']),
    '--summary-batch-sizes': (['0', '2.5'], ['1,32', '']),
    '--time-limit': (['0', '0.5', '1000001', 'abc'], ['1', '1000000', '90.5']),
    '--compile-budget': (['0', '1000001', 'abc'], ['0.5', '120']),
    '--compile-min-batch': (['0', '65537', '1.5'], ['1', '65536']),
}
FLOAT_FLAGS = {'--time-limit', '--compile-budget'}
OTHER_OPTIONS = {'-h', '--help', '--device', '--models', '--dtype', '--masks', '--compile', '--no-compile',
                 '--compile-models', '--protocol', '--malloc', '--json', '--markdown', '--quick', '--rows',
                 '--fast-autotune', '--no-fast-autotune', '--resume'}


def test_help_says_the_default_of_every_option_that_takes_a_value():
    """benchmarks/README.md: '--help lists the defaults'."""
    for action in zoo.build_parser()._actions:
        if action.option_strings and action.nargs != 0 and action.default is not None:
            assert 'default' in (action.help or ''), f'{action.option_strings[0]}: its --help says no default'


def _parse(tmp_path, *argv, folder='out'):
    return zoo.parse_args(['--device', 'cpu', '--json', str(tmp_path / folder / 'r.json'), *argv])


def _refused(capsys, tmp_path, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        _parse(tmp_path, *argv, folder='refused')
    assert e.value.code == 2, argv
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), (argv, lines)
    assert not (tmp_path / 'refused').exists(), argv  # nothing written
    return lines[0]


def test_every_numeric_flag_refuses_nan_inf_negative_and_out_of_range_values_naming_the_flag(capsys, tmp_path):
    options = {s for a in zoo.build_parser()._actions for s in a.option_strings}
    assert options == set(NUMERIC) | OTHER_OPTIONS, 'classify the new option here'
    for flag, (refused, accepted) in NUMERIC.items():
        extra = ['--protocol', 'original'] if flag == '--original-passes' else []
        if flag == '--compile-min-batch':  # (at most the main batch: compiled rows are built there)
            extra = ['--batch-size', '65536']
        for value in ['nan', 'inf', '-1', *refused]:
            line = _refused(capsys, tmp_path, *extra, flag, value)
            assert flag in line, (flag, value, line)
        for value in accepted:
            args = _parse(tmp_path, *extra, flag, value)
            dest = flag[2:].replace('-', '_')
            parsed = getattr(args, dest)
            if isinstance(parsed, list):
                number = float if 'rates' in flag else int
                assert parsed == [number(v) for v in value.split(',') if v]
            else:
                assert parsed == (float(value) if flag in FLOAT_FLAGS else int(value))


@pytest.mark.parametrize('argv, flag, words', [
    (['--models', 'tiny,huge'], '--models', "unknown model 'huge'"),
    (['--models', 'tiny,deit_tiny_patch16_224'], '--models', 'the same model'),
    (['--models', ''], '--models', 'no model given'),
    (['--compile-models', 'small'], '--compile-models', "'small' is not one of --models"),
    (['--models', 'tiny,small', '--compile-models', 'tiny,deit_tiny_patch16_224'], '--compile-models',
     "'tiny' is given twice"),
    (['--models', 'vit_base_patch32_224,tiny', '--sweep-rates', '0.001'], '--sweep-rates',
     'clips int(588 x 0.001) = 0 of the 588 (layer, patch) slots of vit_base_patch32_224'),
    (['--original-passes', '5'], '--original-passes', 'only with --protocol original'),
    (['--rows', 'timm,ours,tensorrt'], '--rows', "unknown row 'tensorrt'"),
    (['--rows', 'timm,boolean'], '--rows', 'add ours'),
    (['--rows', 'ours,boolean'], '--rows', 'add timm'),
    (['--rows', 'timm,ours,ours'], '--rows', 'ours is given twice'),
    (['--rows', 'timm,ours,fast-triton-graph'], '--rows', 'fast-triton-graph runs on cuda only, not on cpu'),
    (['--rows', 'timm,ours,ours-compiled', '--no-compile'], '--rows', 'ours-compiled use torch.compile'),
    (['--rows', 'timm,ours,timm-compiled', '--quick'], '--rows', 'add --compile'),
    (['--no-compile', '--compile-budget', '10'], '--compile-budget', 'torch.compile is off (--no-compile)'),
    (['--quick', '--compile-models', 'tiny'], '--compile-models', 'off (--quick without --compile)'),
    (['--quick', '--compile-min-batch', '8'], '--compile-min-batch', 'so no compiled row runs'),
    # compiled rows are built in the main table (batch 8 here) only: batch 32 of the summary would time none
    (['--quick', '--compile', '--compile-min-batch', '32'], '--compile-min-batch',
     'above the main-table batch of every model with compiled rows (tiny 8)'),
    (['--rows', 'timm,ours', '--compile-budget', '5'], '--compile-budget', 'no row of --rows is compiled'),
    # a budget spent before the first compile: the compiled rows asked for (--compile) would run for no model
    (['--quick', '--compile', '--compile-budget', '0'], '--compile-budget',
     'builds no compiled row, so those of --rows (timm-compiled, ours-compiled) would run for no model'),
    (['--scoring-repeats', '0', '--scoring-batch-size', '16'], '--scoring-batch-size', '--scoring-repeats is 0,'),
    (['--no-fast-autotune'], '--no-fast-autotune', 'no row of --rows is a fast-path row'),
    (['--device', 'tpu'], '--device', 'invalid choice'),
    (['--no-such-flag'], '--no-such-flag', 'unrecognized'),
])
def test_other_mistakes_are_one_line_naming_the_flag(capsys, tmp_path, argv, flag, words):
    line = _refused(capsys, tmp_path, '--models', 'tiny', *argv)  # the last --models given counts
    assert flag in line and words in line, line


def test_flags_for_what_the_run_does_are_accepted_where_it_does_it(tmp_path):
    """The counterparts of the refusals of flags without effect: with the rows they steer, they are taken."""
    # the rate sweep runs on the first model only: a rate that clips nothing of another model is no mistake
    # (int(12 x 196 x 0.001) = 2 (layer, patch) slots of DeiT-Ti, int(12 x 49 x 0.001) = 0 of ViT-B/32)
    args = _parse(tmp_path, '--models', 'tiny,vit_base_patch32_224', '--sweep-rates', '0,0.001')
    assert args.sweep_rates == [0.0, 0.001]
    args = _parse(tmp_path, '--quick', '--compile', '--compile-budget', '5', '--compile-min-batch', '8')
    assert (args.compile_budget, args.compile_min_batch) == (5.0, 8) and 'ours-compiled' in args.rows
    args = _parse(tmp_path, '--rows', 'timm,ours,fast-torch-dense,fast-torch', '--no-fast-autotune',
                  '--scoring-repeats', '2', '--scoring-batch-size', '4')
    assert args.fast_autotune is False and (args.scoring_repeats, args.scoring_batch_size) == (2, 4)


def test_compile_models_names_a_model_of_models_as_models_compares_them(tmp_path):
    """--models takes 'tiny' and 'deit_tiny_patch16_224.fb_in1k' for the same model (a tag names weights): so
    does --compile-models, which names the model as --models gave it."""
    args = _parse(tmp_path, '--models', 'deit_tiny_patch16_224.fb_in1k,small', '--compile-models', 'tiny')
    assert args.compile_models == ['deit_tiny_patch16_224.fb_in1k']
    args = _parse(tmp_path, '--models', 'tiny,small', '--compile-models', 'deit_small_patch16_224.fb_in1k,tiny')
    assert args.compile_models == ['small', 'tiny']
    # not given, on CPU: the first model only (a cold inductor compile of each pruned model takes 15-40 s there)
    assert _parse(tmp_path, '--models', 'small,tiny').compile_models == ['small']


def test_a_deit_named_with_a_pretrained_tag_is_benchmarked_as_that_deit(tmp_path):
    """The tag names weights, which the benchmark does not load (a seeded random init): the DeiT under a tag takes
    DeiT-Ti's default batch, labels and paper figures, as 'tiny' does."""
    for device, protocol in (('cpu', 'ours'), ('cuda', 'ours'), ('cpu', 'original')):
        assert zoo.default_batch('deit_tiny_patch16_224.fb_in1k', torch.device(device), protocol) == \
            zoo.default_batch('deit_tiny_patch16_224', torch.device(device), protocol)
    args = _parse(tmp_path, '--models', 'deit_tiny_patch16_224.fb_in1k,small')
    assert [s.title(args) for s in zoo.plan_sections(args, CPU)][:2] == [
        'DeiT-Ti, batch 32 (main table)', 'DeiT-S, batch 16 (main table)']
    assert F.pruned_label('deit_tiny_patch16_224.fb_in1k', 0.25) == 'C&C-Ti-25'
    assert F.dense_label('vit_small_patch16_224.augreg_in21k') == 'vit_small_patch16_224.augreg_in21k'
    cc, dense = F.seeded_models('deit_tiny_patch16_224', 0, CPU)
    built = F.Runs(runs={'timm': dense}, formulation={'timm': F.REGISTRY['timm']}, checks={'timm': {}},
                   build_seconds={'timm': 0.0},
                   meta={'timm': {'label': 'DeiT-Ti (timm)', 'kind': 'timm', 'dense': True, 'rate': 0.0,
                                  'macs': 1, 'kept': [197], 'build_seconds': 0.0, 'check': {}}})
    timings = stats.Timings({'timm': [1.0] * 6}, 8)
    row, = zoo.make_rows(built, timings, 1, {'timm': 1.0}, 'deit_tiny_patch16_224.fb_in1k', 'ours')
    assert row['seed_gpu'] == {'gflops': 1.3, 'images_per_s': 2234, 'speedup': 1.0}


def test_paper_figures_go_to_the_papers_rates_only():
    """The paper measured DeiT-Ti at 0.25 and 0.40: a row at 0.254 (named C&C-Ti-25 all the same) is another model
    and gets no paper figures, nor does 0.245; the dense model is rate 0.0; the figures are docs/method.md's."""
    assert zoo.paper_figures('deit_tiny_patch16_224', 0.25) == (1.0, 2876, 1.29)
    assert zoo.paper_figures('deit_tiny_patch16_224.fb_in1k', 0.40) == (0.7, 3685, 1.65)
    assert zoo.paper_figures('deit_tiny_patch16_224', 0.0) == (1.3, 2234, 1.00)
    for rate in (0.254, 0.245, 0.3):
        assert zoo.paper_figures('deit_tiny_patch16_224', rate) is None, rate
    assert F.pruned_label('deit_tiny_patch16_224', 0.254) == 'C&C-Ti-25'
    assert zoo.paper_figures('vit_small_patch16_224', 0.25) is None


def test_rows_asked_for_that_cannot_run_here_are_refused_and_default_ones_skipped(capsys, tmp_path, monkeypatch):
    """Triton runs on CPU only under its interpreter: fast-triton named in --rows is refused before any work
    (it was skipped with a note after the other rows had run); among the default rows it is left out with that
    note, as before."""
    monkeypatch.setattr(K, 'INTERPRETER', False)
    line = _refused(capsys, tmp_path, '--rows', 'timm,ours,fast-triton')
    assert line.startswith('error: argument --rows: fast-triton cannot run here: '), line
    monkeypatch.setitem(zoo.DEFAULT_ROWS, 'cpu', ['timm', 'ours', 'fast-triton'])
    args = _parse(tmp_path, '--quick')
    assert args.rows == ['timm', 'ours', 'fast-triton']
    timed, skipped = F.select(CPU, args.compile, names=args.rows)
    assert [f.name for f in timed] == ['timm', 'ours'] and list(skipped) == ['fast-triton']
    if K.HAS_TRITON:  # under the interpreter it runs on CPU, so asking for it is fine
        monkeypatch.setattr(K, 'INTERPRETER', True)
        assert _parse(tmp_path, '--rows', 'timm,ours,fast-triton').rows == ['timm', 'ours', 'fast-triton']


def test_outputs_are_checked_writable_before_any_work(capsys, tmp_path, monkeypatch):
    """--json and --markdown are checked as the atomic writer will meet them, and nothing is created to find out:
    their folders are made with the first results written (they were made at the start, so a run refused later or
    stopped before its first section left empty folders behind)."""
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    line = _refused(capsys, tmp_path, '--markdown', str(blocker / 'sub' / 'r.md'))
    assert '--markdown' in line and 'does not exist and cannot be created (Not a directory)' in line
    line = _refused(capsys, tmp_path, '--json', str(tmp_path))
    assert '--json' in line and 'is a directory' in line
    assert '--json' in _refused(capsys, tmp_path, '--json', '')
    line = _refused(capsys, tmp_path, '--json', str(tmp_path / 'new' / 'deeper' / 'r.json'),
                    '--markdown', str(tmp_path / 'new' / 'deeper' / 'r.json'))
    assert '--markdown' in line and not (tmp_path / 'new').exists()
    args = _parse(tmp_path, '--markdown', str(tmp_path / 'made' / 'for' / 'r.md'))
    assert args.markdown == str(tmp_path / 'made' / 'for' / 'r.md') and not (tmp_path / 'made').exists()
    assert args.json == str(tmp_path / 'out' / 'r.json')
    from utils import write_text_atomic
    write_text_atomic(args.markdown, '# tables\n')  # as the run writes them: the folders made then
    assert (tmp_path / 'made' / 'for' / 'r.md').read_text() == '# tables\n'
    # a results file the user may not write is not replaced (the rename would, whatever its mode); os.access says
    # so (root may write any file: told here it may not)
    locked = tmp_path / 'locked.json'
    locked.write_text('{}')
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda p, mode, **kw: os.fspath(p) != str(locked) and real_access(p, mode, **kw))
    line = _refused(capsys, tmp_path, '--json', str(locked))
    assert line == f'error: argument --json: {locked} cannot be written: Permission denied'


def test_an_output_name_the_file_system_cannot_write_is_refused_before_any_work(capsys, tmp_path):
    """A name the file system takes but the atomic writer's temporary file next to it does not (or one too long
    itself) would fail only when the first section is written: refused at the start."""
    from utils import UserError, write_text_atomic
    longest = os.pathconf(tmp_path, 'PC_NAME_MAX')
    for name in ('a' * (longest - 10) + '.json', 'b' * (longest + 1) + '.json'):
        with pytest.raises(UserError):  # what the run would meet after its first section
            write_text_atomic(str(tmp_path / 'probe' / name), '{}')
        for flag in ('--json', '--markdown'):
            line = _refused(capsys, tmp_path, flag, str(tmp_path / 'refused' / name))
            assert line.startswith(f'error: argument {flag}: ')
            assert line.endswith('cannot be written: File name too long')
    assert not (tmp_path / 'probe').exists()


def test_an_output_named_with_a_blank_at_either_end_is_refused(capsys, tmp_path):
    """--json 'r.json ' (a stray space) wrote a file of that name; a new file or folder named so is refused, a file
    that exists under such a name is replaced as any output of this script is."""
    for flag in ('--json', '--markdown'):
        path = str(tmp_path / 'refused' / 'r.json ')
        line = _refused(capsys, tmp_path, flag, path)
        assert line == f"error: argument {flag}: {path} is refused: its name 'r.json ' begins or ends with a blank " \
                       f"(a stray space?)"
        path = str(tmp_path / 'refused' / ' x' / 'r.json')
        assert line != _refused(capsys, tmp_path, flag, path)
        assert "' x', the name of a folder to create, begins or ends with a blank" in _refused(capsys, tmp_path, flag,
                                                                                                path)


def test_an_output_folder_the_file_system_cannot_make_leaves_no_folder_and_no_traceback(capsys, tmp_path):
    """A folder name too long below new folders: the folders made above it were left behind; a path of more
    folders than Python's recursion limit: a RecursionError traceback (os.makedirs recursed once per folder).  Now
    nothing is made before the results are written, and more new folders than any output folder may need are
    refused first."""
    longest = os.pathconf(tmp_path, 'PC_NAME_MAX')
    for flag in ('--json', '--markdown'):
        line = _refused(capsys, tmp_path, flag, str(tmp_path / 'refused' / 'new' / ('c' * (longest + 1)) / 'r.json'))
        assert line.startswith(f'error: argument {flag}: ') and 'cannot be created (File name too long)' in line
        too_deep = os.path.join(str(tmp_path / 'refused'), *['d'] * 2100, 'r.json')  # longer than a path can be
        assert 'cannot be created (File name too long)' in _refused(capsys, tmp_path, flag, too_deep)
    # more new folders than any output folder may need (utils.check_output_dir's rule): refused, none made
    deep = os.path.join(str(tmp_path / 'refused'), *['d'] * 300, 'r.json')
    assert 'folders to create, more than' in _refused(capsys, tmp_path, '--json', deep)
    assert not (tmp_path / 'refused').exists()


def test_results_and_tables_in_one_file_are_refused_naming_the_flag_given(capsys, tmp_path):
    """--json x.md alone: the tables' default path (--json with .md) is the same file, which the line says of
    --json (the flag given), not of an unnamed --markdown; both named alike: said of --markdown."""
    md = str(tmp_path / 'refused' / 'x.md')
    line = _refused(capsys, tmp_path, '--json', md)
    assert line.startswith(f'error: argument --json: {md} ends in .md') and 'give --markdown' in line
    line = _refused(capsys, tmp_path, '--json', md.replace('.md', '.json'), '--markdown', md.replace('.md', '.json'))
    assert line == 'error: argument --markdown: the same file as --json'


def test_outputs_replace_only_files_the_benchmark_wrote(capsys, tmp_path):
    """An existing --json or --markdown is replaced only if it is this script's own output (the committed results
    are); any other file is refused before work starts and left as it was.  A --quick run writes under runs/,
    never over the committed measurements."""
    script = tmp_path / 'job.sh'
    script.write_text('#!/bin/sh\n')
    line = _refused(capsys, tmp_path, '--json', str(script))
    assert '--json' in line and 'not an output of this benchmark' in line and script.read_text() == '#!/bin/sh\n'
    notes = tmp_path / 'notes.md'
    notes.write_text('my notes\n')
    assert 'not an output' in _refused(capsys, tmp_path, '--markdown', str(notes))
    # the tables never replace a results JSON, nor the results the tables, whatever the file's name
    results, tables = tmp_path / 'results.json', tmp_path / 'tables.md'
    results.write_text(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')).read())
    tables.write_text(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.md')).read())
    before = results.read_text(), tables.read_text()
    line = _refused(capsys, tmp_path, '--markdown', str(results))
    assert line == (f'error: argument --markdown: {results} is a results JSON of this benchmark, not the tables; '
                    f'refusing to overwrite it')
    line = _refused(capsys, tmp_path, '--json', str(tables), '--markdown', str(tmp_path / 'refused' / 'r.md'))
    assert line == (f'error: argument --json: {tables} is the tables of this benchmark, not a results JSON; '
                    f'refusing to overwrite it')
    assert (results.read_text(), tables.read_text()) == before
    committed = os.path.join(ROOT, 'benchmarks', 'results', 'cpu')
    args = zoo.parse_args(['--device', 'cpu', '--json', committed + '.json'])  # a new measurement may replace it
    assert (args.json, args.markdown) == (committed + '.json', committed + '.md')
    quick = zoo.parse_args(['--device', 'cpu', '--quick'])
    assert quick.json == os.path.join(ROOT, 'runs', 'benchmark', 'cpu-quick.json')
    # a link to a file not written yet (results kept elsewhere) is where the outputs go, as before any run
    (tmp_path / 'elsewhere').mkdir()
    link = tmp_path / 'linked.json'
    link.symlink_to(tmp_path / 'elsewhere' / 'r.json')
    assert zoo.parse_args(['--device', 'cpu', '--json', str(link)]).json == str(link)


def test_quick_fills_in_only_what_the_user_did_not_give(tmp_path):
    args = _parse(tmp_path, '--quick', '--rates', '0.3', '--models', 'small', '--batch-size', '4', '--repeats', '3',
                  '--compile')
    assert (args.rates, args.models, args.batch_size, args.repeats, args.compile) == ([0.3], ['small'], 4, 3, True)
    assert args.timm_models == {'small': 'deit_small_patch16_224'}
    assert not {'rates', 'models', 'batch_size', 'repeats', 'compile'} & set(args.quick_set)
    assert args.quick_set['warmup'] == 1 and args.quick_set['sweep_batch_sizes'] == [1, 8]
    line = zoo.quick_line(args)
    assert line.startswith('--quick set: ') and '--warmup 1' in line and '--rates' not in line
    plain = _parse(tmp_path)  # without --quick: the device's defaults, nothing "set by --quick"
    assert (plain.rates, plain.models, plain.repeats, plain.quick_set) == (
        [0.25, 0.30, 0.40], ['tiny', 'small', 'base'], 15, {})
    assert plain.rows == ['timm', 'timm-compiled', 'ours', 'boolean', 'ours-compiled'] and plain.compile
    assert (plain.time_limit, plain.compile_budget, plain.compile_min_batch) == (None, None, 1)
    # --quick turns compile off: the compiled rows leave the default rows (named in --rows they are refused)
    assert _parse(tmp_path, '--quick').rows == ['timm', 'ours', 'boolean']


# ---------------------------------------------------------------------------------------------------------------
# the script run in process, small: summary against its rows, a registered formulation, the original protocol

SMALL = ['--device', 'cpu', '--quick', '--masks', 'random', '--rates', '0.25', '--batch-size', '2', '--repeats', '3',
         '--warmup', '0', '--sweep-batch-sizes', '', '--sweep-rates', '', '--scoring-repeats', '0',
         '--routing-repeats', '0', '--breakdown-rounds', '0', '--summary-batch-sizes', '1,2', '--malloc', 'default']


def test_a_results_file_that_cannot_be_written_mid_run_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    """Writing the results after a section fails (here: its folder replaced by a file under the run): one
    ``error:`` line naming the file and exit status 1, no traceback; the exit status is 1 as well for a failed
    section."""
    out = tmp_path / 'results'
    out.mkdir()

    def replace_folder(*a, **k):
        shutil.rmtree(out)
        out.write_text('not a folder')

    monkeypatch.setattr(zoo, 'run_section', replace_folder)
    assert zoo.cli(SMALL + ['--json', str(out / 'r.json'), '--markdown', str(out / 'r.md')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: ') and str(out / 'r.json') in err and len(err.splitlines()) == 1
    assert 'Traceback' not in err

    def fails(*a, **k):
        raise RuntimeError('broken row')

    monkeypatch.setattr(zoo, 'run_section', fails)
    assert zoo.cli(SMALL + ['--json', str(tmp_path / 'r.json'), '--markdown', str(tmp_path / 'r.md')]) == 1
    assert json.loads((tmp_path / 'r.json').read_text())['sections'][0]['status'] == 'failed'


def test_ctrl_c_is_one_line_saying_what_the_results_files_hold(tmp_path, capsys, monkeypatch, one_thread):
    """Ctrl-C (KeyboardInterrupt in a section): no traceback, exit status 130 and one line; after a finished
    section the results files hold it (and --resume of them runs the rest), before one nothing is written."""
    run_section = zoo.run_section

    def second_interrupted(section, *a, **kw):
        if section.kind == 'summary':
            raise KeyboardInterrupt
        return run_section(section, *a, **kw)

    monkeypatch.setattr(zoo, 'run_section', second_interrupted)
    out = tmp_path / 'r.json'
    argv = DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '1', '--json', str(out)]
    assert zoo.cli(argv) == 130
    err = capsys.readouterr().err
    assert err == (f'interrupted; {out} and {tmp_path / "r.md"} hold the 1 section finished; --resume {out} runs '
                   f'the others\n')
    assert [s['status'] for s in json.loads(out.read_text())['sections']] == ['done', 'pending']

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, 'run_section', interrupted)
    again = tmp_path / 'again.json'
    assert zoo.cli(argv[:-1] + [str(again)]) == 130
    assert capsys.readouterr().err == 'interrupted; no section finished: nothing written\n'
    assert not again.exists()


@pytest.mark.parametrize('tables_written', [0, 1])
def test_ctrl_c_between_writing_the_results_and_the_tables_says_what_each_file_holds(tmp_path, capsys, monkeypatch,
                                                                                    one_thread, tables_written):
    """A Ctrl-C once the results JSON is written but before the tables are: the line says what each file holds (it
    said 'nothing written' beside a JSON holding the section finished, or counted in the JSON a section that the
    tables do not hold); with every section done there is nothing for --resume to run."""
    write, mds = zoo.write_text_atomic, []

    def tables_interrupted(path, text):
        if path.endswith('.md'):
            mds.append(path)
            if len(mds) > tables_written:
                raise KeyboardInterrupt
        write(path, text)

    monkeypatch.setattr(zoo, 'write_text_atomic', tables_interrupted)
    out, md = tmp_path / 'r.json', tmp_path / 'r.md'
    assert zoo.cli(DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '1', '--json', str(out)]) == 130
    err = capsys.readouterr().err
    held = [s['status'] for s in json.loads(out.read_text())['sections']]
    if tables_written == 0:
        assert err == f'interrupted; {out} holds the 1 section finished ({md}: not written); --resume {out} runs the ' \
                      f'others\n'
        assert held == ['done', 'pending'] and not md.exists()
    else:
        assert err == f'interrupted; {out} holds the 2 sections finished ({md}: 1 of them)\n'
        assert held == ['done', 'done'] and '| pending |' in md.read_text()


def test_sigterm_is_one_line_saying_what_the_results_files_hold(tmp_path, capsys, monkeypatch, one_thread):
    """SIGTERM (a time limit's `timeout`, as gpu_check.sh's steps have, or a scheduler) ended the benchmark on the
    spot: no line, and a kill between the results and the tables left them out of step.  It now stops as Ctrl-C
    does, with exit status 143 and the line saying what the files hold (in-process here: Terminated, which
    utils.signals raises for SIGTERM)."""
    from utils.signals import Terminated
    run_section = zoo.run_section

    def second_terminated(section, *a, **kw):
        if section.kind == 'summary':
            raise Terminated()
        return run_section(section, *a, **kw)

    monkeypatch.setattr(zoo, 'run_section', second_terminated)
    out = tmp_path / 'r.json'
    argv = DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '1', '--json', str(out)]
    assert zoo.cli(argv) == 143
    assert capsys.readouterr().err == (f'terminated (SIGTERM); {out} and {tmp_path / "r.md"} hold the 1 section '
                                       f'finished; --resume {out} runs the others\n')
    assert [s['status'] for s in json.loads(out.read_text())['sections']] == ['done', 'pending']


def test_a_run_starts_by_removing_the_temporary_files_a_killed_run_left(tmp_path, capsys, one_thread):
    """A run killed while writing (SIGKILL, `timeout --kill-after`) leaves the atomic writer's hidden temporary file
    beside the results: the next run with those outputs removes it."""
    from utils import temporary_path
    out = tmp_path / 'r.json'
    left = [temporary_path(str(p), pid=99999999) for p in (out, tmp_path / 'r.md')]
    for path in left:
        open(path, 'w').close()
    assert zoo.cli(DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '', '--json', str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ['r.json', 'r.md']


@pytest.mark.slow
def test_sigterm_to_the_script_stops_it_with_the_line_and_resumable_results(tmp_path):
    """The script itself (its own signal handling, as `timeout` sends SIGTERM): once the first section is written,
    SIGTERM ends it with 143 and one line; the results it names are whole, and --resume runs the rest."""
    import signal
    out = tmp_path / 'r.json'
    argv = [sys.executable, os.path.join(ROOT, 'benchmarks', 'model_zoo.py'), *DIGITS, '--rows', 'timm,ours',
            '--summary-batch-sizes', '1,2', '--json', str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 240
        while not (tmp_path / 'r.md').exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('terminated (SIGTERM); ') and 'Traceback' not in err, err
    held = [s['status'] for s in json.loads(out.read_text())['sections']]
    assert held[0] == 'done' and 'pending' in held
    assert sorted(os.listdir(tmp_path)) == ['r.json', 'r.md']
    assert zoo.cli(argv[2:] + ['--resume', str(out)]) == 0
    assert [s['status'] for s in json.loads(out.read_text())['sections']] == ['done'] * len(held)


def _fastest(rows_or_seconds, batch):
    return max(rows_or_seconds, key=lambda kv: batch / statistics.median(kv[1]))


def test_quick_run_summary_agrees_with_the_rows_it_comes_from(tmp_path, capsys, monkeypatch, one_thread):
    extra = F.Formulation('extra-eager', 'extra', 'ours again, registered', lambda cc, d, ctx: copy.deepcopy(cc),
                          pruned=True, requires='json')
    extra_dense = F.Formulation('extra-dense', 'extra_dense', 'timm again, registered',
                                lambda cc, d, ctx: copy.deepcopy(d), pruned=False, requires='json')
    missing = F.Formulation('needs-missing', 'missing', 'never built', lambda *a: None, pruned=True,
                            requires='benchmarks_test_no_such_module')
    for f in (extra, extra_dense, missing):
        monkeypatch.setitem(F.REGISTRY, f.name, f)
    # among the default rows, one that cannot run here is skipped with a note (named in --rows, it is refused)
    monkeypatch.setitem(zoo.DEFAULT_ROWS, 'cpu', ['needs-missing', 'extra-eager', 'ours', 'timm', 'boolean',
                                                  'extra-dense'])
    res = zoo.main(SMALL + ['--json', str(tmp_path / 'r.json')])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / 'r.json').read_text())['summary'] == res['summary']
    assert [line for line in out.splitlines() if line.startswith('--quick set:')] == [zoo.quick_line(
        SimpleNamespace(quick_set={'models': ['tiny'], 'compile': False}))]
    assert 'note: formulation needs-missing not timed: benchmarks_test_no_such_module is not importable' in out
    model = res['models']['tiny']
    rows = model['rows']
    assert [r['kind'] for r in rows] == ['timm', 'extra-dense', 'ours', 'boolean', 'extra-eager']  # registry order
    assert model['checks']['extra_25']['max_abs_diff'] < 1e-4 and model['checks']['extra_dense']['max_abs_diff'] < 1e-4
    assert [s['status'] for s in res['sections']] == ['done', 'done', 'done']
    assert f'\n{report.count_targets(res["targets"])}; wrote ' in out

    entry, = res['summary']
    dense = [(r['key'], r['seconds']) for r in rows if r['dense']]
    pruned = [(r['key'], r['seconds']) for r in rows if not r['dense']]
    by_key = {r['key']: r for r in rows}
    (bp, p_s), (bd, d_s) = _fastest(pruned, 2), _fastest(dense, 2)
    assert (entry['model'], entry['prune_rate'], entry['protocol']) == ('C&C-Ti-25', 0.25, 'ours')
    assert (entry['best_pruned_mode'], entry['best_dense_mode']) == (by_key[bp]['kind'], by_key[bd]['kind'])
    assert entry['flops_ratio'] == pytest.approx(by_key['timm']['gflops'] / by_key[bp]['gflops'])
    assert entry['speedup_vs_best_dense'] == pytest.approx(statistics.median([d / p for p, d in zip(p_s, d_s)]))
    timm_s = by_key['timm']['seconds']
    assert entry['speedup_vs_timm_eager'] == pytest.approx(statistics.median([t / p for p, t in zip(p_s, timm_s)]))
    assert entry['speedup_vs_timm_eager'] == pytest.approx(by_key[bp]['speedup_vs_timm'])
    sweep = {b['batch_size']: b['seconds'] for b in model['summary_sweep']['batches']}
    assert sorted(sweep) == [1, 2] and all(set(s) == set(by_key) for s in sweep.values())  # every mode swept
    for bs, seconds in sweep.items():
        (sp, sp_s) = _fastest([(k, seconds[k]) for k, _ in pruned], bs)
        (sd, sd_s) = _fastest([(k, seconds[k]) for k, _ in dense], bs)
        got = entry['speedup_by_batch'][str(bs)]
        assert (got['best_pruned_mode'], got['best_dense_mode']) == (by_key[sp]['kind'], by_key[sd]['kind'])
        assert got['speedup'] == pytest.approx(statistics.median([d / p for p, d in zip(sp_s, sd_s)]))
    assert entry['speedup_batch1'] == entry['speedup_by_batch']['1']['speedup']
    assert entry['speedup_batch32'] is None  # not swept
    target = next(t for t in res['targets'] if t['target'].startswith('C&C-Ti-25: fastest pruned ('))
    assert target['threshold'] == pytest.approx(0.9 * entry['flops_ratio'])
    assert '| model | FLOPs ratio | best pruned mode | best dense mode |' in out
    assert (tmp_path / 'r.md').read_text().strip() in out


def test_cuda_sections_run_in_the_order_of_their_value():
    """The CUDA defaults: DeiT-Ti at 256, then Ti at 32 and 1 (the batch-1/32 targets), DeiT-B at 128, DeiT-S at
    256, then B and S at 32 and 1; no sweeps; the summary's rows only."""
    normal, _ = zoo.defaults('cuda')
    args = SimpleNamespace(**normal, batch_size=None, protocol='ours',
                           timm_models={n: F.SHORTCUTS[n] for n in normal['models']})
    plan = [(s.kind, args.timm_models[s.model], s.batch) for s in zoo.plan_sections(args, torch.device('cuda'))]
    ti, s_, b = 'deit_tiny_patch16_224', 'deit_small_patch16_224', 'deit_base_patch16_224'
    assert plan == [('main', ti, 256), ('summary', ti, 32), ('summary', ti, 1), ('main', b, 128), ('main', s_, 256),
                    ('summary', b, 32), ('summary', b, 1), ('summary', s_, 32), ('summary', s_, 1)]
    assert normal['rows'] == ['timm', 'timm-compiled', 'ours', 'fast-triton-dense', 'fast-triton',
                              'fast-triton-graph-dense', 'fast-triton-graph']
    assert all('cuda' in F.REGISTRY[n].devices for n in normal['rows'])
    assert (normal['compile_min_batch'], normal['scoring_repeats'], normal['routing_repeats']) == (1, 0, 0)
    # CPU: as before, with the sweeps at the end
    cpu, _ = zoo.defaults('cpu')
    args = SimpleNamespace(**cpu, batch_size=None, protocol='ours',
                           timm_models={n: F.SHORTCUTS[n] for n in cpu['models']})
    assert [(s.kind, s.model) for s in zoo.plan_sections(args, CPU)] == [
        ('main', 'tiny'), ('main', 'small'), ('main', 'base'), ('batch-sweep', 'tiny'), ('rate-sweep', 'tiny')]


DIGITS = ['--device', 'cpu', '--quick', '--models', 'deit_digits_patch4_32', '--masks', 'random', '--rates', '0.3',
          '--batch-size', '4', '--repeats', '2', '--warmup', '0', '--sweep-batch-sizes', '', '--sweep-rates', '',
          '--scoring-repeats', '0', '--routing-repeats', '0', '--breakdown-rounds', '0', '--malloc', 'default']


def test_quick_run_times_the_fast_path_rows_and_checks_every_row_against_eager_fp32(tmp_path, capsys, monkeypatch,
                                                                                     one_thread):
    """The fast path's rows through the torch backend (and the Triton interpreter, which tests/conftest.py turns on
    without a GPU) on the small digits model: built per batch size, logits checked against the eager fp32 model
    (recomputed here), a row whose logits are off is flagged, a row that fails to build is left out with the
    reason, and the summary compares the fastest modes of what ran."""
    off = F.Formulation('off-by-half', 'off', 'ours + 0.5', lambda cc, d, ctx: (lambda x: cc(x) + 0.5), pruned=True)

    def explode(cc, d, ctx):
        raise RuntimeError('no kernel for this')
    fails = F.Formulation('fails', 'fails', 'never built', explode, pruned=True, requires='json')
    for f in (off, fails):
        monkeypatch.setitem(F.REGISTRY, f.name, f)
    triton = K.triton_runs_on(torch.empty(0))
    fast = ['fast-torch-dense', 'fast-torch'] + (['fast-triton-dense', 'fast-triton'] if triton else [])
    res = zoo.main(DIGITS + ['--rows', ','.join(['timm', 'ours', *fast, 'off-by-half', 'fails']), '--seed', '3',
                             '--summary-batch-sizes', '1', '--json', str(tmp_path / 'r.json')])
    out = capsys.readouterr().out
    assert [s['status'] for s in res['sections']] == ['done', 'done']
    model = res['models']['deit_digits_patch4_32']
    rows = {r['key']: r for r in model['rows']}
    kinds = [r['kind'] for r in model['rows']]
    assert kinds == ['timm'] + [k for k in fast if k.endswith('-dense')] + ['ours'] + [
        k for k in fast if not k.endswith('-dense')] + ['off-by-half']
    assert model['skipped_rows'] == {'fails_30': 'building or running it failed: RuntimeError: no kernel for this'}
    assert 'note: row fails_30 not timed: building or running it failed' in out

    # The check batch and the eager fp32 models, rebuilt here from the seed: the recorded checks are what they say.
    cc, dense = F.seeded_models('deit_digits_patch4_32', 3, CPU)
    pruned = zoo.pruned_models(cc, None, [0.3], seed=3)[0.3]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager = {True: cc(x), False: pruned(x)}
    from models.fast_path import build_fast_path
    for key, r in rows.items():
        # GFLOPs of the row's own model by the docs/method.md formula, and torch's counter agreeing with it
        own = cc if r['dense'] else pruned
        assert r['gflops'] == models.count_macs(own) / 1e9 and r['kept_tokens'] == models.kept_token_counts(own)
        assert r['counter_gflops'] == pytest.approx(r['gflops'], rel=0.02), key
        assert r['flops_ratio'] == pytest.approx(models.count_macs(cc) / models.count_macs(own)), key
        check = model['checks'][key]
        assert r['check'] == check and check['images'] == 4 and check['tolerance'] == 1e-3
        if r['kind'] == 'off-by-half':
            assert check['max_abs_diff'] == pytest.approx(0.5, abs=1e-5) and not check['within_tolerance']
            assert check['top1_agreement'] == 1.0  # a constant shift keeps the order: only the difference fails
            continue
        assert check['within_tolerance'] and check['top1_agreement'] == 1.0 and check['top1_ok']
        if r['kind'].startswith('fast-'):
            assert r['fast_path']['kept_counts'] == r['kept_tokens'] and r['fast_path']['cuda_graph_batch'] is None
            backend = r['kind'].split('-')[1]
            with torch.no_grad():
                mine = build_fast_path(cc if r['dense'] else pruned, backend=backend)(x)
            assert check['max_abs_diff'] == pytest.approx((mine - eager[r['dense']]).abs().max().item(), abs=1e-6)
    assert rows['fast_torch_30']['twin'] == 'fast_torch'  # pruned fast rows: against their own dense build
    for key, base, field in (('fast_torch_30', 'fast_torch', 'speedup_vs_twin'), ('ours_30', 'timm', 'speedup_vs_timm'),
                             ('fast_torch_30', 'timm', 'speedup_vs_timm')):  # dense time / pruned time, per round
        per_round = [d / p for p, d in zip(rows[key]['seconds'], rows[base]['seconds'])]
        assert rows[key][field] == pytest.approx(statistics.median(per_round)), (key, field)
    targets = {t['target'].split(': ', 1)[1].split(' (')[0]: t for t in res['targets'] if 'batch 4:' in t['target']}
    within = targets["every row's max |logit - eager fp32| within its tolerance"]
    assert 'worst: C&C-deit_digits_patch4_32-30 (ours + 0.5)' in within['target'] and within['met'] is False
    assert targets['top-1 = eager fp32 on >= 99% of the images with a clear margin']['met'] is True

    # batch 1: the fast rows built again (and checked again); eager rows reused
    b1, = model['summary_sweep']['batches']
    assert set(b1['checks']) == {k for k, r in rows.items() if r['kind'].startswith('fast-')}
    assert set(b1['seconds']) == set(rows) and set(b1['fast_path']) == set(b1['checks'])
    entry, = res['summary']
    assert entry['model'] == 'C&C-deit_digits_patch4_32-30' and entry['speedup_batch1'] is not None
    first_pruned = kinds.index('ours')
    assert entry['best_pruned_mode'] in kinds[first_pruned:] and entry['best_dense_mode'] in kinds[:first_pruned]
    md = (tmp_path / 'r.md').read_text()
    assert '| C&C-deit_digits_patch4_32-30 (fast path, torch) | 4 |' in md  # logit checks and fast path builds
    assert 'Fast path builds' in md and '- deit_digits_patch4_32 batch 4, fails_30: building or running it failed' in md


def test_each_section_times_its_rows_at_its_own_batch_with_warm_up_passes_untimed(tmp_path, monkeypatch, one_thread):
    """A row that records every call: built and checked once at the main batch (4), then --warmup untimed and
    --repeats timed passes at 4; the summary section at batch 2 calls it at 2 only, its rounds (repeats x 4 / 2)
    timed after the warm-up.  The pass times recorded are the timed passes, no more."""
    calls = []

    def build(cc, dense, ctx):
        def run(x):
            calls.append(x.shape[0])
            return cc(x)
        return run
    monkeypatch.setitem(F.REGISTRY, 'recorder', F.Formulation('recorder', 'rec', 'recorder', build, pruned=True))
    res = zoo.main(DIGITS + ['--rows', 'timm,ours,recorder', '--repeats', '3', '--warmup', '2',
                             '--summary-batch-sizes', '2', '--routing-repeats', '2',
                             '--json', str(tmp_path / 'r.json')])
    model = res['models']['deit_digits_patch4_32']
    rows = {r['key']: r for r in model['rows']}
    # the routing entry sets the routing alone beside the main table's forward pass of ours at that rate
    ours_ms = 1e3 * statistics.median(rows['ours_30']['seconds'])
    assert model['routing']['30']['forward_ms_ours'] == pytest.approx(ours_ms)
    assert model['batch_size'] == 4 and all(len(r['seconds']) == 3 for r in rows.values())
    rounds = zoo.summary_rounds(3, 4, 2)
    assert rounds == 6
    assert calls == [4] + [4] * (2 + 3) + [2] * (2 + rounds)
    b2, = model['summary_sweep']['batches']
    assert b2['batch_size'] == 2 and b2['rounds'] == rounds
    assert all(len(s) == rounds for s in b2['seconds'].values())
    for key, seconds in b2['seconds'].items():  # images/s at the batch the section timed
        assert b2['images_per_s'][key] == pytest.approx(2 / statistics.median(seconds))


def test_a_dense_row_that_fails_to_build_at_a_summary_batch_is_left_out_there_saying_why(tmp_path, monkeypatch,
                                                                                        one_thread):
    """A dense row built for each batch size (fixed_batch) that builds at the main batch (4) and fails at the
    summary batch (2): left out of batch 2 with its reason (the section's skipped_rows, "Rows left out"), and batch
    2's comparison names it among the dense modes it could not compare with, so its target is no "yes"."""
    def build(cc, dense, ctx):
        if ctx.batch != 4:
            raise RuntimeError(f'no kernel for batch {ctx.batch}')
        return dense
    monkeypatch.setitem(F.REGISTRY, 'flaky-dense', F.Formulation('flaky-dense', 'flaky', 'timm, built per batch',
                                                                build, pruned=False, fixed_batch=True))
    res = zoo.main(DIGITS + ['--rows', 'timm,ours,flaky-dense', '--summary-batch-sizes', '2',
                             '--json', str(tmp_path / 'r.json')])
    assert [s['status'] for s in res['sections']] == ['done', 'done']
    why = 'building or running it failed: RuntimeError: no kernel for batch 2'
    b2, = res['models']['deit_digits_patch4_32']['summary_sweep']['batches']
    assert set(b2['seconds']) == {'timm', 'ours_30'} and b2['skipped_rows'] == {'flaky': why}
    entry, = res['summary']
    assert entry['speedup_by_batch']['2']['dense_not_compared'] == {'flaky': why}
    assert f'- deit_digits_patch4_32 batch 2, flaky: {why}' in (tmp_path / 'r.md').read_text()


def test_sweeps_time_the_pruned_models_and_divide_the_right_pass_times(monkeypatch):
    """Both sweeps with their timer scripted (timm 4 s, ours 2/2.5/1 s, boolean 3 s per round): images/s, the
    speed-up against timm and against the boolean formulation are dense (or boolean) time over ours, paired per
    round; and the rows timed compute what they are named after: ours and the boolean formulation the pruned model
    of the rate (their logits agree, and differ from the dense model's), rate 0 our model with every mask True."""
    script = {'timm': [4.0, 4.0, 4.0], 'ours': [2.0, 2.5, 1.0], 'boolean': [3.0, 3.0, 3.0]}
    timed = []

    def timer(runs, batch, device, repeats, warmup, dtype, x=None, shape=(3, 224, 224)):
        timed.append((batch, dict(runs)))
        return stats.Timings({k: script[k.split('_')[0]] for k in runs}, batch)
    monkeypatch.setattr(zoo, 'time_interleaved', timer)
    args = SimpleNamespace(seed=0, masks='random', repeats=3, warmup=0)
    name = 'deit_digits_patch4_32'
    ips = {k: 8 / statistics.median(v) for k, v in script.items()}
    for row in zoo.batch_sweep(name, 0.3, [8], args, CPU, None):
        assert row == {'batch_size': 8, **ips, 'speedup_vs_timm': 2.0, 'vs_boolean': 1.5}
    rows = zoo.rate_sweep(name, [0.0, 0.3], 8, args, CPU, None)
    assert [r['speedup_vs_timm'] for r in rows] == [2.0, 2.0] and rows[1]['vs_boolean'] == 1.5
    assert rows[1]['timm'] == ips['timm'] and rows[1]['ours'] == ips['ours'] and rows[1]['boolean'] == ips['boolean']
    cc, dense = F.seeded_models(name, 0, CPU)
    pruned = zoo.pruned_models(cc, None, [0.3], 0)[0.3]
    assert rows[1]['gflops'] == models.count_macs(pruned) / 1e9 and rows[0]['gflops'] == models.count_macs(cc) / 1e9
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, full = pruned(x), dense(x)
        assert (want - full).abs().max() > 1e-3
        (_, batch_runs), (_, rate_runs) = timed
        for runs, suffix in ((batch_runs, '30'), (rate_runs, '0.3')):
            for key in (f'ours_{suffix}', f'boolean_{suffix}'):
                assert (runs[key](x) - want).abs().max() < 1e-4, key
            assert (runs['timm'](x) - full).abs().max() < 1e-4
        assert (rate_runs['ours_0.0'](x) - full).abs().max() < 1e-4


def test_scoring_and_routing_costs_divide_the_right_pass_times(monkeypatch):
    """The scoring cost and the routing-alone timing with their timers scripted (each timed function still run
    once): scoring over a training step and boolean over ours are paired per round, medians in seconds and ms."""
    cc, dense = F.seeded_models('deit_digits_patch4_32', 0, CPU)
    pruned = F.pruned_copy(cc, F.plan(None, len(cc.blocks), cc.patch_embed.num_patches, 0.3, seed=0))
    ran = []

    def scoring_timer(runs, x, device, repeats, warmup, dtype=None):
        for name, run in runs.items():
            run(x)
            ran.append(name)
        return {'scoring': [3.0, 3.0, 3.0], 'train_step': [1.0, 2.0, 1.5]}
    monkeypatch.setattr(engine, 'time_interleaved', scoring_timer)
    sc = zoo.scoring_cost(cc, dense, 2, 3, CPU, 0)
    assert ran == ['scoring', 'train_step']
    assert (sc['scoring_s'], sc['train_step_s'], sc['ratio']) == (3.0, 1.5, 2.0)  # median of 3/1, 3/2, 3/1.5

    def routing_timer(runs, batch, device, repeats, warmup, dtype, x=None, shape=None):
        for run in runs.values():
            run(x)
        return stats.Timings({'ours': [1e-3] * 3, 'boolean': [2e-3, 3e-3, 2.5e-3], 'scatter': [4e-3] * 3}, batch)
    monkeypatch.setattr(zoo, 'time_interleaved', routing_timer)
    rc = zoo.routing_cost(pruned, F.BooleanMaskViT(dense, F.masks_of(pruned)), 2, CPU, 3, None)
    assert rc['ms'] == pytest.approx({'ours': 1.0, 'boolean': 2.5, 'scatter': 4.0})
    assert rc['boolean_over_ours'] == pytest.approx(2.5)


def test_rows_of_two_rates_compare_each_with_the_rows_of_its_own_rate():
    """make_rows on two rates with scripted pass times (different per row and per round): every ratio a row holds
    is its baseline's time over its own, paired per round, the baseline being timm, its twin, and the boolean row
    of the same rate; GFLOPs, the FLOPs ratio and the counter's GFLOPs are those of the row's own model."""
    cc, dense = F.seeded_models('deit_digits_patch4_32', 0, CPU)
    pruned = zoo.pruned_models(cc, None, [0.3, 0.5], 0)
    chosen = [F.REGISTRY[n] for n in ('timm', 'ours', 'boolean')]
    built = F.build_runs('deit_digits_patch4_32', cc, dense, pruned, chosen, F.Context(CPU, None, 2, (3, 32, 32)))
    assert list(built.runs) == ['timm', 'ours_30', 'boolean_30', 'ours_50', 'boolean_50']
    seconds = {'timm': [8.0, 9.0, 10.0], 'ours_30': [4.0, 3.0, 5.0], 'boolean_30': [6.0, 6.0, 6.0],
               'ours_50': [2.0, 2.0, 1.0], 'boolean_50': [7.0, 5.0, 4.0]}
    counted = {'timm': 1.0, '30': 0.7, '50': 0.5}
    rows = {r['key']: r for r in zoo.make_rows(built, stats.Timings(seconds, 2), models.count_macs(cc), counted,
                                               'deit_digits_patch4_32', 'ours')}

    def over(base, key):
        return statistics.median([b / k for k, b in zip(seconds[key], seconds[base])])
    for rate, tag in ((0.3, '30'), (0.5, '50')):
        for kind in ('ours', 'boolean'):
            r = rows[f'{kind}_{tag}']
            assert r['speedup_vs_timm'] == pytest.approx(over('timm', f'{kind}_{tag}'))
            assert r['twin'] == 'timm' and r['speedup_vs_twin'] == pytest.approx(over('timm', f'{kind}_{tag}'))
            assert r['gflops'] == models.count_macs(pruned[rate]) / 1e9 and r['counter_gflops'] == counted[tag]
            assert r['flops_ratio'] == pytest.approx(models.count_macs(cc) / models.count_macs(pruned[rate]))
            assert r['images_per_s'] == pytest.approx(2 / statistics.median(seconds[f'{kind}_{tag}']))
        assert rows[f'ours_{tag}']['vs_boolean'] == pytest.approx(over(f'boolean_{tag}', f'ours_{tag}'))
    assert rows['timm']['counter_gflops'] == 1.0 and rows['timm']['flops_ratio'] == 1.0


def test_time_limit_and_failures_end_sections_and_results_are_written_after_every_section(tmp_path, monkeypatch,
                                                                                        one_thread):
    """Three sections (main table, summary batches 1 and 2), a clock made to advance 1000 s per section, a
    time limit of 1500 s and a summary section that fails: the first runs, the second fails and is recorded,
    the third is left out; the JSON on disk after each section holds what had run by then."""
    now = [0.0]
    monkeypatch.setattr(zoo, 'clock', lambda: now[0])
    run_section = zoo.run_section

    def one_section(section, *a, **kw):
        now[0] += 1000
        if section.kind == 'summary':
            raise RuntimeError('the GPU fell off the bus')
        return run_section(section, *a, **kw)
    monkeypatch.setattr(zoo, 'run_section', one_section)
    written = []
    write = zoo.write_outputs
    monkeypatch.setattr(zoo, 'write_outputs', lambda results, text, args: (
        write(results, text, args), written.append(json.loads(open(args.json).read()))))
    res = zoo.main(DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '1,2', '--time-limit', '1500',
                             '--json', str(tmp_path / 'r.json')])
    assert [(s['status'], s['batch_size']) for s in res['sections']] == [('done', 4), ('failed', 1), ('left out', 2)]
    assert res['sections'][1]['reason'] == 'RuntimeError: the GPU fell off the bus'
    assert res['sections'][2]['reason'] == 'time limit of 1500 s reached after 2000 s (--time-limit)'
    assert [[s['status'] for s in w['sections']] for w in written] == [
        ['done', 'pending', 'pending'], ['done', 'failed', 'pending'], ['done', 'failed', 'left out'],
        ['done', 'failed', 'left out']]  # after each section, then once more at the end
    first = written[0]['summary'][0]
    assert first['model'] == 'C&C-deit_digits_patch4_32-30' and first['speedup_batch1'] is None
    assert written[-1] == json.loads((tmp_path / 'r.json').read_text())
    # the batch-1 section failed, so its target is not measured (no batch-2 target: only 1 and 32 have one)
    assert res['pruned_models'] == [{'model': 'C&C-deit_digits_patch4_32-30', 'timm_model': 'deit_digits_patch4_32',
                                     'prune_rate': 0.3, 'section_model': 'deit_digits_patch4_32'}]
    batch1 = res['summary'][0]['targets']['batch1']
    assert batch1['met'] is None and batch1['missing'] == 'batch 1 failed: RuntimeError: the GPU fell off the bus'
    assert res['not_measured'] == [batch1['target']]
    assert '| deit_digits_patch4_32, batch 2 (summary) | left out: time limit' in (tmp_path / 'r.md').read_text()


def test_summary_sections_time_more_rounds_the_smaller_their_batch():
    assert zoo.summary_rounds(30, 256, 32) == 240 and zoo.summary_rounds(30, 128, 32) == 120
    assert zoo.summary_rounds(30, 256, 1) == zoo.summary_rounds(30, 128, 1) == 300  # at most 10 times
    assert zoo.summary_rounds(30, 8, 32) == 30 and zoo.summary_rounds(2, 48, 32) == 2  # never fewer


def test_resume_runs_only_the_sections_left_out_and_keeps_the_earlier_ones(tmp_path, monkeypatch, one_thread):
    """A run cut by its time limit after its main table, then --resume of its JSON in a fresh start: only the two
    summary sections run, on the model made again (same weights and masks: its kept counts are checked against the
    earlier run's), every row of the main table timed again at each summary batch; the main table is carried over
    verbatim and marked as the earlier run's.  With masks that do not keep the recorded counts, the summaries fail
    saying so instead of timing another model."""
    now = [0.0]
    monkeypatch.setattr(zoo, 'clock', lambda: now[0])
    run_section, ran = zoo.run_section, []

    def one_section(section, *a, **kw):
        now[0] += 1000
        ran.append((section.kind, section.batch))
        return run_section(section, *a, **kw)
    monkeypatch.setattr(zoo, 'run_section', one_section)
    argv = DIGITS + ['--masks', 'taylor', '--rows', 'timm,ours,fast-torch-dense,fast-torch',
                     '--summary-batch-sizes', '1,2']
    first = zoo.main(argv + ['--time-limit', '500', '--json', str(tmp_path / 'first.json')])
    assert [s['status'] for s in first['sections']] == ['done', 'left out', 'left out']
    ran.clear()
    resumed = zoo.main(argv + ['--resume', str(tmp_path / 'first.json'), '--json', str(tmp_path / 'second.json')])
    assert ran == [('summary', 1), ('summary', 2)]
    assert [s['status'] for s in resumed['sections']] == ['done'] * 3
    assert resumed['sections'][0] == dict(first['sections'][0], earlier_run=True)
    assert [('earlier_run' in s, 'reason' in s) for s in resumed['sections']] == [(True, False), (False, False),
                                                                                  (False, False)]
    rows = first['models']['deit_digits_patch4_32']['rows']
    model = resumed['models']['deit_digits_patch4_32']
    assert model['rows'] == rows and model['checks'] == first['models']['deit_digits_patch4_32']['checks']
    batches = model['summary_sweep']['batches']
    # --repeats 2 at the main batch 4: 8 rounds at batch 1, 4 at batch 2 (zoo.summary_rounds)
    assert [(b['batch_size'], b['rounds'], len(b['seconds']['timm'])) for b in batches] == [(1, 8, 8), (2, 4, 4)]
    for b in batches:  # every row timed again; the fast path's, built for one batch size, built and checked again
        assert set(b['seconds']) == {r['key'] for r in rows} and set(b['checks']) == {'fast_torch', 'fast_torch_30'}
    assert resumed['summary'][0]['speedup_batch1'] is not None
    assert resumed['earlier_runs'] == [{'command': first['command'], 'seconds': first['seconds'],
                                        'compile_seconds_spent': first.get('compile_seconds_spent'),
                                        'code_changed_since': []}]
    assert resumed['code'] == first['code'] and 'models/fast_path.py' in first['code']
    md = (tmp_path / 'second.md').read_text()
    assert '| deit_digits_patch4_32, batch 4 (main table) | done (earlier run) |' in md
    assert 'This run resumed an earlier one (--resume)' in md and '--time-limit 500' in md

    # a resumed run whose start took its whole --time-limit still measures its first section (only that one)
    monkeypatch.setattr(zoo, 'clock', lambda: now.__setitem__(0, now[0] + 600) or now[0])
    late = zoo.main(argv + ['--resume', str(tmp_path / 'first.json'), '--time-limit', '500',
                            '--json', str(tmp_path / 'late.json')])
    assert [s['status'] for s in late['sections']] == ['done', 'done', 'left out']

    tampered = json.loads((tmp_path / 'first.json').read_text())
    pruned_row = next(r for r in tampered['models']['deit_digits_patch4_32']['rows'] if not r['dense'])
    pruned_row['kept_tokens'][-1] -= 1
    tampered['code']['models/fast_path.py'] = '0' * 16  # as if the file had changed since
    (tmp_path / 'tampered.json').write_text(json.dumps(tampered))
    third = zoo.main(argv + ['--resume', str(tmp_path / 'tampered.json'), '--json', str(tmp_path / 'third.json')])
    assert [s['status'] for s in third['sections']] == ['done', 'failed', 'failed']
    assert 'not the model it measured' in third['sections'][1]['reason']
    assert third['earlier_runs'][-1]['code_changed_since'] == ['models/fast_path.py']
    assert 'The code changed since the earlier run: models/fast_path.py' in (tmp_path / 'third.md').read_text()


def test_a_summary_section_that_failed_and_ran_again_on_resume_keeps_the_order_of_summary_batch_sizes(
        tmp_path, monkeypatch, one_thread):
    """A run whose first summary section failed and whose second ran, then --resume of it: the summary batch timed
    again takes its place in the order of --summary-batch-sizes (it was appended after the one kept, so the resumed
    results, their targets and tables listed the batches in another order than an uninterrupted run's)."""
    run_section = zoo.run_section

    def first_summary_fails(section, *a, **kw):
        if section.kind == 'summary' and section.batch == 1:
            raise RuntimeError('the GPU fell off the bus')
        return run_section(section, *a, **kw)
    monkeypatch.setattr(zoo, 'run_section', first_summary_fails)
    argv = DIGITS + ['--rows', 'timm,ours', '--summary-batch-sizes', '1,2']
    first = zoo.main(argv + ['--json', str(tmp_path / 'first.json')])
    assert [s['status'] for s in first['sections']] == ['done', 'failed', 'done']
    monkeypatch.setattr(zoo, 'run_section', run_section)
    resumed = zoo.main(argv + ['--resume', str(tmp_path / 'first.json'), '--json', str(tmp_path / 'second.json')])
    assert [s['status'] for s in resumed['sections']] == ['done'] * 3
    model = resumed['models']['deit_digits_patch4_32']
    assert [b['batch_size'] for b in model['summary_sweep']['batches']] == [1, 2]
    kept = first['models']['deit_digits_patch4_32']['summary_sweep']['batches']
    assert model['summary_sweep']['batches'][1] == kept[0]
    assert list(resumed['summary'][0]['speedup_by_batch']) == ['1', '2']


def test_a_run_resumed_twice_keeps_its_sweep_and_the_history_of_its_calls(tmp_path, monkeypatch, one_thread):
    """Both summary sections fail in the first call (its rate sweep runs), one again in the second (a resume of
    the first), none in the third (a resume of the second): the third's results hold the first call's sweep as it
    was timed, and name both earlier calls, in order."""
    run_section = zoo.run_section
    failing = {1, 2}

    def summaries_fail(section, *a, **kw):
        if section.kind == 'summary' and section.batch in failing:
            raise RuntimeError('the GPU fell off the bus')
        return run_section(section, *a, **kw)
    monkeypatch.setattr(zoo, 'run_section', summaries_fail)
    at = DIGITS.index('--sweep-rates')
    argv = DIGITS[:at] + ['--sweep-rates', '0.2'] + DIGITS[at + 2:]
    argv += ['--rows', 'timm,ours', '--summary-batch-sizes', '1,2']
    first = zoo.main(argv + ['--json', str(tmp_path / 'first.json')])
    assert [s['kind'] for s in first['sections'] if s['status'] == 'done'] == ['main', 'rate-sweep']
    failing.discard(1)
    second = zoo.main(argv + ['--resume', str(tmp_path / 'first.json'), '--json', str(tmp_path / 'second.json')])
    failing.clear()
    third = zoo.main(argv + ['--resume', str(tmp_path / 'second.json'), '--json', str(tmp_path / 'third.json')])
    assert [s['status'] for s in third['sections']] == ['done'] * len(third['sections'])
    assert third['sweeps']['rate'] == second['sweeps']['rate'] == first['sweeps']['rate']
    assert [r['command'] for r in third['earlier_runs']] == [first['command'], second['command']]
    assert [s.get('earlier_run', False) for s in third['sections']] == [
        s['status'] == 'done' for s in second['sections']]


def test_a_resumed_run_names_every_file_of_the_measured_code_changed_added_or_removed_since():
    """adopt compares the earlier run's code hashes with this run's: a file edited, one added and one removed since
    are all named (each a change to the code the kept sections were not measured with); one unchanged is not."""
    earlier = {'sections': [], 'command': 'python benchmarks/model_zoo.py', 'seconds': 10.0,
               'code': {'engine.py': 'a' * 16, 'models/gone.py': 'b' * 16, 'models/edited.py': 'c' * 16}}
    results = {'sections': [], 'models': {}, 'sweeps': {},
               'code': {'engine.py': 'a' * 16, 'models/edited.py': 'd' * 16, 'models/added.py': 'e' * 16}}
    assert zoo.adopt(results, earlier) == []
    assert results['earlier_runs'] == [{'command': 'python benchmarks/model_zoo.py', 'seconds': 10.0,
                                        'compile_seconds_spent': None,
                                        'code_changed_since': ['models/added.py', 'models/edited.py',
                                                               'models/gone.py']}]


def _earlier_results(tmp_path, *argv) -> str:
    """A results JSON as a run with these arguments writes it on this machine (no section finished)."""
    args = _parse(tmp_path, *argv, folder='earlier')
    path = tmp_path / 'earlier.json'
    path.write_text(json.dumps({'machine': zoo.machine_info(CPU), 'command': 'python benchmarks/model_zoo.py',
                                'settings': zoo.settings_of(args), 'sections': [], 'models': {}}))
    return str(path)


def test_resume_refuses_other_settings_another_machine_and_other_files(capsys, tmp_path, monkeypatch):
    earlier = _earlier_results(tmp_path, '--rates', '0.25,0.4', '--time-limit', '60')
    args = _parse(tmp_path, '--rates', '0.25,0.4', '--time-limit', '600', '--resume', earlier)  # may differ
    assert args.earlier['settings']['rates'] == [0.25, 0.4]
    line = _refused(capsys, tmp_path, '--rates', '0.25', '--resume', earlier)
    assert line == (f'error: argument --resume: {earlier} was run with other settings: --rates [0.25, 0.4] there, '
                    f'[0.25] here (only --time-limit, --json and --markdown may differ)')
    assert "--repeats 15 there, 3 here" in _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--repeats', '3',
                                                    '--resume', earlier)
    # the same settings spelled out are the same settings (what is derived from the flags is not compared)
    assert _parse(tmp_path, '--rates', '0.25,0.4', '--rows', ','.join(args.rows), '--resume', earlier).earlier
    real = zoo.machine_info(CPU)
    others = {'device': 'cuda', 'gpu': 'NVIDIA H100', 'torch': '2.11.0', 'timm': '9.9.9', 'python': '2.7.18',
              'torch_threads': 16, 'cuda': '13.0', 'triton': '3.6.0', 'cpu': 'Other CPU', 'cpu_cores': 64}
    assert set(others) == set(zoo.SAME_MACHINE) | {'cpu', 'cpu_cores'}  # every field a CPU run compares
    for field, other in others.items():
        monkeypatch.setattr(zoo, 'machine_info', lambda device: dict(real, **{field: other}))
        line = _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--resume', earlier)
        assert line.endswith(f"was measured on another machine kind: {field} {real.get(field)!r} there, "
                             f"{other!r} here"), field
    notes = tmp_path / 'notes.json'
    notes.write_text('{"a": 1}')
    assert 'is not a results JSON of this benchmark' in _refused(capsys, tmp_path, '--resume', str(notes))
    notes.write_text('[' * 100000 + ']' * 100000)  # json.load's RecursionError was a traceback
    assert 'is not a results JSON of this benchmark' in _refused(capsys, tmp_path, '--resume', str(notes))
    tables = tmp_path / 'r.md'  # the tables this script writes beside the JSON: its output, but not resumable
    tables.write_text('Measured on cpu (AMD EPYC, 2 cores).\n')
    assert 'is not a results JSON of this benchmark' in _refused(capsys, tmp_path, '--resume', str(tables))
    assert 'no such file' in _refused(capsys, tmp_path, '--resume', str(tmp_path / 'missing.json'))
    # an empty path, and a file that is there but no regular file, were "no such file" (of '', of /dev/null)
    assert _refused(capsys, tmp_path, '--resume', '') == 'error: argument --resume: an empty path'
    assert _refused(capsys, tmp_path, '--resume', os.devnull) == (
        f'error: argument --resume: {os.devnull} is not a regular file (a device, a pipe?): name the results JSON')
    # a folder (the results folder, say) is not a missing file: it said "no such file" of a folder that is there
    assert _refused(capsys, tmp_path, '--resume', str(tmp_path)) == (
        f'error: argument --resume: {tmp_path} is a folder: name the results JSON in it')
    monkeypatch.setattr(zoo, 'machine_info', lambda device: real)
    done = dict(json.loads(open(earlier).read()), machine=real)
    # a run with --threads recorded the threads it set; this one sets them only after the check
    threads = torch.get_num_threads() + 1
    with_threads = json.loads(open(_earlier_results(tmp_path, '--rates', '0.25,0.4', '--threads', str(threads))).read())
    with_threads['machine']['torch_threads'] = threads
    (tmp_path / 'threads.json').write_text(json.dumps(with_threads))
    assert _parse(tmp_path, '--rates', '0.25,0.4', '--threads', str(threads), '--resume',
                  str(tmp_path / 'threads.json')).earlier
    # a run with every section done has nothing to carry on: resuming it would measure nothing and write it again
    done['sections'] = [{'section': 'DeiT-Ti, batch 32 (main table)', 'kind': 'main', 'model': 'tiny',
                         'batch_size': 32, 'status': 'done'}]
    (tmp_path / 'done.json').write_text(json.dumps(done))
    assert _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--resume', str(tmp_path / 'done.json')) == (
        f'error: argument --resume: every section of {tmp_path / "done.json"} is done: nothing to carry on (without '
        f'--resume the benchmark runs again)')


def test_resume_refuses_an_earlier_run_with_any_flag_but_the_four_free_ones_of_another_value(capsys, tmp_path):
    """Every flag of the command line (the seed, the rows, the summary batch sizes among them) must have the same
    value in the run carried on, but --time-limit, --json, --markdown and --resume itself: each other flag given
    another value in the earlier file is refused, naming it."""
    path = _earlier_results(tmp_path, '--rates', '0.25,0.4')
    earlier = json.loads(open(path).read())
    dests = {a.dest for a in zoo.build_parser()._actions} - {'help'}
    free = {'time_limit', 'json', 'markdown', 'resume'}
    assert free <= dests and {'seed', 'rows', 'summary_batch_sizes', 'masks', 'protocol'} <= dests - free
    for dest in sorted(dests):
        edited = tmp_path / f'{dest}.json'
        edited.write_text(json.dumps(dict(earlier, settings=dict(earlier['settings'], **{dest: 'other'}))))
        argv = ('--rates', '0.25,0.4', '--resume', str(edited))
        if dest in free:
            assert _parse(tmp_path, *argv).earlier['settings'][dest] == 'other'
        else:
            line = _refused(capsys, tmp_path, *argv)
            assert f"was run with other settings: --{dest.replace('_', '-')} 'other' there, " in line, (dest, line)


def test_resume_may_write_its_results_over_the_file_it_carries_on_but_not_the_tables(capsys, tmp_path):
    """--json may name the file --resume reads (its whole results, the kept sections included, replace it
    atomically); --markdown naming it would turn the results into tables, and is refused."""
    earlier = _earlier_results(tmp_path, '--rates', '0.25,0.4')
    before = open(earlier).read()
    args = _parse(tmp_path, '--rates', '0.25,0.4', '--resume', earlier, '--json', earlier)
    assert (args.json, args.markdown) == (earlier, earlier[:-len('.json')] + '.md') and args.earlier
    line = _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--resume', earlier, '--markdown', earlier)
    assert line == (f'error: argument --markdown: {earlier} is the results JSON --resume reads; refusing to '
                    f'overwrite it with tables')
    assert open(earlier).read() == before


@pytest.mark.parametrize('case, words', [
    ('sections a number', '(sections is a number, not a list)'),
    ('sections strings', '(sections[0] is a string, not an object)'),
    ('machine a list', '(machine is a list, not an object)'),
    ('models a list', '(models is a list, not an object)'),
    ('model without rows', '(models.tiny has no "rows")'),
    ('main done, its model missing', "(its section 'DeiT-Ti, batch 32 (main table)' is done but \"models\" has no "
                                     "'tiny')"),
    ('sweep done, its results missing', "(its section 'DeiT-Ti (rate-sweep)' is done but \"sweeps\" has no "
                                        "'rate')"),
    ('code a list', '(code is a list, not an object)'),
    ('earlier runs an object', '(earlier_runs is an object, not a list)'),
])
def test_resume_of_a_results_json_of_another_shape_is_one_line(capsys, tmp_path, case, words):
    """A results JSON whose parts are not what this script writes (edited by hand, cut short by another tool) is
    refused naming what, before any work; every part a resumed run reads is checked."""
    path = _earlier_results(tmp_path, '--rates', '0.25,0.4')
    results = json.loads(open(path).read())
    args = _parse(tmp_path, '--rates', '0.25,0.4', folder='plan')
    results['sections'] = [{'section': s.title(args), 'kind': s.kind, 'model': s.model, 'batch_size': s.batch,
                            'status': 'pending'} for s in zoo.plan_sections(args, CPU)]
    done = {'main done, its model missing': 'main', 'sweep done, its results missing': 'rate-sweep'}.get(case)
    for section in results['sections']:
        if section['kind'] == done:
            section['status'] = 'done'
            break
    results.update({'sections a number': {'sections': 5}, 'sections strings': {'sections': ['a', 'b']},
                    'machine a list': {'machine': [1, 2]}, 'models a list': {'models': []},
                    'model without rows': {'models': {'tiny': {}}}, 'code a list': {'code': []},
                    'earlier runs an object': {'earlier_runs': {}}}.get(case, {}))
    with open(path, 'w') as f:
        json.dump(results, f)
    line = _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--resume', path)
    assert line == f'error: argument --resume: {path} is not a results JSON of this benchmark {words}', line


def _kept_main_table(tmp_path, *argv) -> dict:
    """A results JSON (as a dict) of a run with --rates 0.25,0.4 and ``argv`` whose first main table, DeiT-Ti at
    batch 32, is done, with rows of the shape model_zoo.py writes; the other sections pending."""
    path = _earlier_results(tmp_path, '--rates', '0.25,0.4', *argv)
    results = json.loads(open(path).read())
    args = _parse(tmp_path, '--rates', '0.25,0.4', *argv, folder='plan')
    results['sections'] = [{'section': s.title(args), 'kind': s.kind, 'model': s.model, 'batch_size': s.batch,
                            'status': 'pending'} for s in zoo.plan_sections(args, CPU)]
    results['sections'][0].update(status='done', seconds=12.5)
    check = {'max_abs_diff': 0.0, 'tolerance': 1e-3, 'within_tolerance': True, 'top1_agreement': 1.0,
             'top1_agreement_clear': 1.0, 'clear_images': 32, 'images': 32, 'top1_ok': True}
    rows = [{'key': 'timm', 'label': 'DeiT-Ti (timm)', 'kind': 'timm', 'prune_rate': 0.0, 'gflops': 1.26,
             'flops_ratio': 1.0, 'kept_tokens': [197] * 12, 'kept_tokens_mean': 197.0, 'images_per_s': 100.0,
             'speedup_vs_timm': 1.0, 'speedup_vs_timm_ci': None, 'seconds': [0.32, 0.32], 'dense': True,
             'check': check}]
    rows += [{'key': f'ours_{round(100 * r)}', 'label': f'C&C-Ti-{round(100 * r)} (ours)', 'kind': 'ours',
              'prune_rate': r, 'gflops': 1.0, 'flops_ratio': 1.26, 'kept_tokens': [150] * 12,
              'kept_tokens_mean': 150.0, 'images_per_s': 120.0, 'speedup_vs_timm': 1.2,
              'speedup_vs_timm_ci': [1.1, 1.3], 'seconds': [0.27, 0.27], 'dense': False} for r in (0.25, 0.4)]
    results['models'] = {'tiny': {'model': 'deit_tiny_patch16_224', 'short': 'Ti', 'label': 'DeiT-Ti',
                                  'batch_size': 32, 'protocol': 'ours', 'rows': rows, 'checks': {'timm': dict(check)}}}
    results['code'] = {'engine.py': '0' * 16}
    return results


DELETE = object()


def _edit(results, path, value):
    """``results`` with the value at ``path`` (keys and list indices) replaced by ``value``, or removed (DELETE)."""
    at = results
    for key in path[:-1]:
        at = at[key]
    if value is DELETE:
        del at[path[-1]]
    else:
        at[path[-1]] = value
    return results


ROW = ('models', 'tiny', 'rows', 1)


@pytest.mark.parametrize('path, value, words', [
    (ROW + ('dense',), DELETE, 'models.tiny.rows[1] has no "dense"'),
    (ROW + ('images_per_s',), '120.0', 'models.tiny.rows[1].images_per_s is a string, not a number'),
    (ROW + ('prune_rate',), '0.25', 'models.tiny.rows[1].prune_rate is a string, not a finite number'),
    (ROW + ('prune_rate',), 0.3, 'models.tiny.rows[1].prune_rate is 0.3, not one of --rates'),
    (ROW + ('kind',), 'fast', "models.tiny.rows[1].kind is 'fast', no row of this benchmark"),
    (ROW + ('kept_tokens',), [150, '150'], 'models.tiny.rows[1].kept_tokens[1] is a string, not a whole number'),
    (ROW + ('kept_tokens',), [150, -1], 'models.tiny.rows[1].kept_tokens[1] is a number, not a whole number'),
    (ROW + ('seconds',), 0.27, 'models.tiny.rows[1].seconds is a number, not a list'),
    (ROW + ('speedup_vs_timm_ci',), [1.1], 'models.tiny.rows[1].speedup_vs_timm_ci has 1 entries, not 2'),
    (ROW + ('label',), DELETE, 'models.tiny.rows[1] has no "label"'),
    # the main table reads the paper's figures of a row that has them as an object (a null was a traceback there)
    (ROW + ('seed_gpu',), None, 'models.tiny.rows[1].seed_gpu is null, not an object'),
    (ROW + ('gflops',), float('nan'), 'models.tiny.rows[1].gflops is nan, not a finite number'),
    (('models', 'tiny', 'rows'), [], 'models.tiny.rows is an empty list'),
    # the summary of the run carried on took its speed-up over timm eager from it: a KeyError after the work
    (('models', 'tiny', 'rows', 0), DELETE, 'models.tiny.rows has no timm row, which every speed-up is over'),
    # a row twice: printed twice, and the summary took both rows' pass times from the last
    (('models', 'tiny', 'rows', 2, 'key'), 'ours_25', "models.tiny.rows has more than one row of key 'ours_25'"),
    # paired round by round in the summary of the run carried on: zip's ValueError after the work
    (ROW + ('seconds',), [0.27], 'models.tiny.rows have 1 or 2 pass times each, not one per round of the rounds they '
                                 'were timed in together'),
    (('models', 'tiny', 'batch_size'), '32', 'models.tiny.batch_size is a string, not a positive whole number'),
    (('models', 'tiny', 'batch_size'), 16, "models.tiny.batch_size is 16, but its section is 'DeiT-Ti, batch 32 "
                                           "(main table)'"),
    (('models', 'tiny', 'checks'), [], 'models.tiny.checks is a list, not an object'),
    (('models', 'tiny', 'checks', 'timm', 'within_tolerance'), 'yes',
     'models.tiny.checks.timm.within_tolerance is a string, not a boolean'),
    # the report reads the agreement of a check that judged top-1 (a null there was a traceback in check_targets)
    (('models', 'tiny', 'checks', 'timm', 'top1_agreement_clear'), None,
     'models.tiny.checks.timm judges top-1 (top1_ok) without its agreement on the clear images '
     '(top1_agreement_clear is null)'),
    (('models', 'tiny', 'summary_sweep'), [], 'models.tiny.summary_sweep is a list, not an object'),
    # a kept summary batch is read by the report of the run carried on: its pass times, checks and rows left out
    # decide verdicts there (a string "no" of within_tolerance read as a pass), so each is checked as it is written
    (('models', 'tiny', 'summary_sweep'), {'batches': [{'batch_size': 0, 'seconds': {}}]},
     'models.tiny.summary_sweep.batches[0].batch_size is a number, not a positive whole number'),
    (('models', 'tiny', 'summary_sweep'), {'batches': [{'batch_size': 1, 'seconds': {'timm': ['0.01']}}]},
     'models.tiny.summary_sweep.batches[0].seconds.timm[0] is a string, not a number'),
    # its rows paired round by round as well (a summary batch is carried over with its main table, done or not)
    (('models', 'tiny', 'summary_sweep'), {'batches': [{'batch_size': 1, 'seconds': {'timm': [0.01],
                                                                                     'ours_25': [0.01, 0.02]}}]},
     'models.tiny.summary_sweep.batches[0].seconds have 1 or 2 pass times each, not one per round of the rounds '
     'they were timed in together'),
    (('models', 'tiny', 'summary_sweep'), {'batches': [{'batch_size': 1, 'seconds': {},
                                                        'checks': {'timm': {'max_abs_diff': 0.0}}}]},
     'models.tiny.summary_sweep.batches[0].checks.timm has no "tolerance"'),
    (('models', 'tiny', 'summary_sweep'), {'batches': [{'batch_size': 1, 'seconds': {},
                                                        'skipped_rows': {'timm_compiled': 5}}]},
     'models.tiny.summary_sweep.batches[0].skipped_rows.timm_compiled is a number, not a string'),
    (('models', 'tiny', 'skipped_rows'), {'timm_compiled': None}, 'models.tiny.skipped_rows.timm_compiled is null, '
                                                                   'not a string'),
    (ROW + ('twin',), 5, 'models.tiny.rows[1].twin is a number, not a string'),
    (ROW + ('check',), {'max_abs_diff': 0.0}, 'models.tiny.rows[1].check has no "tolerance"'),
    (('sections', 0, 'seconds'), '12.5', 'sections[0].seconds is a string, not a number'),
    (('sections', 1, 'status'), 3, 'sections[1].status is a number, not a string'),
    (('command',), 5, 'command is a number, not a string'),
    (('command',), DELETE, 'the file has no "command"'),  # quoted under the sections table as `None`
    (('earlier_runs',), ['python benchmarks/model_zoo.py'], 'earlier_runs[0] is a string, not an object'),
    (('code', 'engine.py'), 12, 'code.engine.py is a number, not a string'),
])
def test_resume_of_a_results_json_with_a_kept_part_of_another_shape_is_one_line(capsys, tmp_path, path, value,
                                                                                 words):
    """Every part of the results a resumed run carries over (a kept main table's model results, its rows and
    checks; the kept sections' records; the earlier command and runs; the code hashes) is checked before any work:
    one edited by hand (a key missing, a number as a string, a list for an object) is refused naming where it is
    and what is wrong, not a traceback in the middle of the run or of its report."""
    results = _kept_main_table(tmp_path)
    good = tmp_path / 'good.json'
    good.write_text(json.dumps(results))
    assert _parse(tmp_path, '--rates', '0.25,0.4', '--resume', str(good)).earlier == results
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(_edit(results, path, value)))
    line = _refused(capsys, tmp_path, '--rates', '0.25,0.4', '--resume', str(bad))
    assert line == f'error: argument --resume: {bad} is not a results JSON of this benchmark ({words})', line


def test_the_committed_results_have_the_shape_the_report_and_a_resumed_run_read():
    """Every results JSON of model_zoo.py committed (not linear_shapes.py's, another script's) passes both checks of
    its shape: what the report reads (shapes.REPORT; the CPU run's speed-table rows, shapes.SPEED_TABLE) and what a
    resumed run carries over (shapes.RUN, each model's results, each sweep).  The report is the more lenient of
    the two where it reads less: keys it does without, and the rows the speed table leaves out."""
    from benchmarks import shapes
    folder = os.path.join(ROOT, 'benchmarks', 'results')
    names = sorted(n for n in os.listdir(folder) if n.endswith('.json') and n != 'cuda_linear_routes.json')
    assert {'cpu.json', 'cuda.json'} <= set(names)
    for name in names:
        results = json.load(open(os.path.join(folder, name)))
        assert shapes.problem(results, shapes.REPORT, '') is None, name
        assert shapes.problem(results, shapes.RUN, '') is None, name
        for model, res in results['models'].items():
            assert shapes.problem(res, shapes.MODEL, f'models.{model}') is None, name
        for key, sweep in results.get('sweeps', {}).items():
            assert shapes.problem(sweep, shapes.SWEEPS[key], f'sweeps.{key}') is None, name
    cpu = json.load(open(os.path.join(folder, 'cpu.json')))
    assert shapes.problem(cpu, shapes.SPEED_TABLE, '') is None
    assert shapes.problem({}, shapes.REPORT, '') is None  # the report does without what it does not find
    rows = cpu['models']['tiny']['rows']
    kinds = [r['kind'] for r in rows]
    other, ours = kinds.index('boolean'), kinds.index('ours')
    rows[other]['images_per_s'] = math.nan
    assert shapes.problem(cpu, shapes.SPEED_TABLE, '') is None  # a row the table leaves out is not read
    assert shapes.problem(cpu, shapes.RUN, '') is None
    assert shapes.problem(cpu['models']['tiny'], shapes.MODEL, 'models.tiny') is None  # a failed timing is NaN
    del rows[ours]['kind']
    assert shapes.problem(cpu, shapes.SPEED_TABLE, '') == f'models.tiny.rows[{ours}] has no "kind"'


def test_resume_of_a_summary_section_done_without_its_figures_is_one_line(capsys, tmp_path):
    """A summary section marked done is kept, never run again: its figures must be in the file (its batch in its
    model's summary sweep, whose main table is kept with it), else the resumed run said "done" beside no figures
    (or beside a main table measured again, without that batch)."""
    argv = ('--rates', '0.25,0.4', '--summary-batch-sizes', '1')
    results = _kept_main_table(tmp_path, *argv[2:])
    assert results['sections'][1]['section'] == 'DeiT-Ti, batch 1 (summary)'
    results['sections'][1]['status'] = 'done'
    path = tmp_path / 'earlier.json'
    tiny = results['models']['tiny']
    for sweep, words in ((None, 'has no "summary_sweep", which its summary sections add to'),
                         ({'batches': []}, None), ({'batches': [{'batch_size': 2, 'seconds': {}}]}, None)):
        if sweep is None:
            tiny.pop('summary_sweep', None)
        else:
            tiny['summary_sweep'] = sweep
        path.write_text(json.dumps(results))
        line = _refused(capsys, tmp_path, *argv, '--resume', str(path))
        assert line == (f'error: argument --resume: {path} is not a results JSON of this benchmark (' + (
            f'models.tiny {words}' if words else "its section 'DeiT-Ti, batch 1 (summary)' is done but "
            "models.tiny.summary_sweep has no batch 1") + ')'), line
    tiny['summary_sweep'] = {'batches': [{'batch_size': 1, 'seconds': {'timm': [0.01]}}]}
    path.write_text(json.dumps(results))
    assert _parse(tmp_path, *argv, '--resume', str(path)).earlier == results
    results['sections'][0]['status'] = 'failed'  # its main table runs again: the batch-1 figures would be lost
    path.write_text(json.dumps(results))
    assert _refused(capsys, tmp_path, *argv, '--resume', str(path)) == (
        f"error: argument --resume: {path} is not a results JSON of this benchmark (its section 'DeiT-Ti, batch 1 "
        f"(summary)' is done but not its main table's, which runs again)")


def test_original_protocol_runs_on_cpu_and_says_so(tmp_path, capsys, one_thread):
    res = zoo.main(SMALL + ['--protocol', 'original', '--original-passes', '1', '--json', str(tmp_path / 'o.json')])
    out = capsys.readouterr().out
    assert res['settings']['protocol'] == 'original' and res['protocol']['main_table'] == 'original'
    rows = res['models']['tiny']['rows']
    timm_s = rows[0]['seconds'][0]
    for r in rows:
        assert r['protocol'] == 'original' and len(r['seconds']) == 1
        assert r['images_per_s'] == pytest.approx(2 / r['seconds'][0])
        assert r['speedup_vs_timm'] == pytest.approx(timm_s / r['seconds'][0]) and r['speedup_vs_timm_ci'] is None
    entry, = res['summary']
    assert entry['protocol'] == 'original' and entry['speedup_vs_best_dense_ci'] is None
    assert res['models']['tiny']['summary_sweep']['protocol'] == 'ours'
    assert 'Protocol "original"' in out and ("3 runs of 1 passes back to back, each from one synchronisation to the "
                                             "next, the last run's mean the figure") in out
    assert 'Main table: protocol original; sweeps, routing, scoring and breakdown: protocol ours' in out


# ---------------------------------------------------------------------------------------------------------------
# the script as a user runs it

def _run_model_zoo(*args):
    return subprocess.run([sys.executable, os.path.join('benchmarks', 'model_zoo.py'), *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('args, message', [
    (['--rates', 'abc'], "argument --rates: 'abc' is not a number"),
    (['--batch-size', '0'], 'argument --batch-size: must be from 1 to 65536, got 0'),
    (['--json', os.path.join(ROOT, 'README.md', 'r.json')],
     f'argument --json: {os.path.join(ROOT, "README.md", "r.json")} cannot be written: '
     f'{os.path.join(ROOT, "README.md")} is not a directory'),
    # a rate that clips no slot was timed as a pruned model (its FLOPs ratio 1.00, its targets "met")
    (['--rates', '0.0001'], 'argument --rates: 0.0001 clips int(2352 x 0.0001) = 0 of the 2352 (layer, patch) '
                            'slots of tiny: nothing would be pruned'),
    (['--sweep-rates', '0,0.0001'], 'argument --sweep-rates: 0.0001 clips int(2352 x 0.0001) = 0'),
    # a rate named 00% was labelled C&C-Ti-00 and given the paper's figures of the dense DeiT-Ti
    (['--rates', '0.004'], 'argument --rates: 0.004 rounds to 00%, the name of its rows, as if nothing were pruned'),
    (['--rates', '0.25,0.996'], 'argument --rates: 0.996 rounds to 100%, the name of its rows, as if everything'),
    # the same network under a pretrained tag was timed twice, as two models
    (['--models', 'tiny,deit_tiny_patch16_224.fb_in1k'], "argument --models: 'tiny' and "
                                                          "'deit_tiny_patch16_224.fb_in1k' are the same model"),
    # flags that nothing of the run reads were recorded in its results as if they had been used
    (['--protocol', 'original', '--original-passes', '1', '--repeats', '7', '--summary-batch-sizes', '',
      '--sweep-batch-sizes', '', '--sweep-rates', ''], 'argument --repeats: has no effect here: --protocol original'),
    (['--protocol', 'original', '--original-passes', '1', '--dtype', 'bf16', '--summary-batch-sizes', '',
      '--sweep-batch-sizes', '', '--sweep-rates', '', '--breakdown-rounds', '0'], 'argument --dtype: has no effect'),
    (['--compile', '--rows', 'timm,ours,ours-compiled', '--compile-models', ''],
     'argument --compile-models: no model named, so the compiled rows of --rows (ours-compiled) would run for none'),
])
def test_model_zoo_rejects_bad_arguments_in_one_line_before_any_work(args, message, capsys, tmp_path):
    # results of a case not refused go to tmp_path, never over benchmarks/results/cpu.json
    where = [] if '--json' in args else ['--json', str(tmp_path / 'not_written.json')]
    with pytest.raises(SystemExit) as exit_:
        zoo.main(['--device', 'cpu', *args, *where])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f'error: {message}')
    assert out == '' and os.listdir(tmp_path) == []


def test_model_zoo_as_a_script_refuses_a_bad_argument_in_one_line_without_a_traceback():
    proc = _run_model_zoo('--device', 'cpu', '--rates', 'abc')
    assert proc.returncode == 2
    assert proc.stderr == "error: argument --rates: 'abc' is not a number\n" and proc.stdout == ''


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
    assert [e['model'] for e in res['summary']] == ['C&C-Ti-25', 'C&C-Ti-40']
    assert all(e['speedup_batch1'] is not None and e['speedup_batch32'] is not None for e in res['summary'])
    for heading in ('| model | formulation | batch |', 'Summary: the fastest pruned mode', 'Where the time goes',
                    'Token routing alone', 'images/s against batch size', 'images/s against prune rate',
                    '| target |'):
        assert heading in proc.stdout, heading
    assert (tmp_path / 'zoo.md').read_text().strip() in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith(f'{sum(t["met"] is True for t in res["targets"])} of ')


# ---------------------------------------------------------------------------------------------------------------
# the README stays true

def test_readme_speed_table_is_the_committed_results():
    """The README's speed table is exactly what the committed results give (cpu.json, and cuda.json once a GPU
    run is committed): no figure in it was not measured, and none is stale."""
    results = os.path.join(ROOT, 'benchmarks', 'results')
    cpu = json.load(open(os.path.join(results, 'cpu.json')))
    gpu = json.load(open(os.path.join(results, 'cuda.json'))) if os.path.exists(
        os.path.join(results, 'cuda.json')) else None
    lines = report.readme_speed_table(cpu, gpu)
    readme = open(os.path.join(ROOT, 'README.md')).read().splitlines()
    at = readme.index(lines[0])
    assert readme[at:at + len(lines) + 1] == lines + ['']  # the whole table, and nothing appended to it


def test_readme_lists_every_option_and_nothing_cites_outside_the_repository():
    bench = os.path.join(ROOT, 'benchmarks')
    readme = open(os.path.join(bench, 'README.md')).read()
    options = {s for a in zoo.build_parser()._actions for s in a.option_strings if s.startswith('--')} - {'--help'}
    assert sorted(o for o in options if f'`{o}' not in readme) == []
    results = [os.path.join('results', f) for f in os.listdir(os.path.join(bench, 'results')) if f.endswith('.md')]
    for name in ['README.md'] + results + [f for f in os.listdir(bench) if f.endswith('.py')]:
        text = open(os.path.join(bench, name)).read()
        assert not re.search(r'DESIGN|\bissue \d|\(issue', text), name


# ---------------------------------------------------------------------------------------------------------------
# the prepared GPU session (benchmarks/gpu_check.sh): its commands must still be valid when a GPU comes

GPU_CHECK = os.path.join(ROOT, 'benchmarks', 'gpu_check.sh')


def _gpu_check_commands(marker: str):
    """The command lines of gpu_check.sh that contain ``marker``, continuation lines joined."""
    text = open(GPU_CHECK).read().replace('\\\n', ' ')
    return [line.strip() for line in text.splitlines() if marker in line and not line.lstrip().startswith('#')]


def test_gpu_check_benchmark_commands_are_valid_model_zoo_command_lines(tmp_path, monkeypatch):
    """Each model_zoo.py call of the GPU check passes the script's whole argument validation as on a CUDA machine
    (CUDA reported available; nothing runs), so a renamed flag or row is found here, not in a GPU session."""
    import shlex
    commands = _gpu_check_commands('benchmarks/model_zoo.py')
    assert len(commands) == 4  # the two compiles done ahead, the benchmark (or its resumption) and the profile
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(zoo, 'machine_info', lambda device: {'device': str(device), 'gpu': 'NVIDIA H200'})
    # rows named in --rows must run here: their modules must import; Triton on the (absent) GPU is taken as there
    monkeypatch.setattr(zoo, 'unavailable', lambda formulation, device=None: F.unavailable(formulation))
    parsed = {}
    for command in commands:
        line = command.split('benchmarks/model_zoo.py', 1)[1].replace('$OUT', str(tmp_path))
        line = line.split(' > /dev/null &')[0].replace('"$WARM', f'"{tmp_path}')
        line = re.sub(r'"\$\{PROFILE_\w+:-([^}]*)\}"', r'\1', line)  # the profile's model and rates: defaults
        line = line.replace('"${profile_batch[@]}"', '')  # and its batch: the model's default
        args = zoo.parse_args(shlex.split(line.replace('"${resume[@]}"', '')))
        if '"${resume[@]}"' in line:  # `resume`: the same flags carrying on the JSON they wrote
            earlier = tmp_path / 'earlier.json'
            earlier.write_text(json.dumps({'machine': zoo.machine_info(torch.device('cuda')), 'sections': [],
                                           'command': 'python benchmarks/model_zoo.py', 'models': {},
                                           'settings': zoo.settings_of(args)}))
            again = zoo.parse_args(shlex.split(line.replace('"${resume[@]}"', f'--resume {earlier}')))
            assert again.earlier['settings'] == json.loads(json.dumps(zoo.settings_of(args)))
        assert args.device == 'cuda' and args.json.startswith(str(tmp_path))
        if args.breakdown_rounds:  # the profile: DeiT-Ti's eager and fast rows, dense and pruned, no CUDA graph
            assert args.rows == ['timm', 'ours', 'fast-triton-dense', 'fast-triton'] and args.summary_batch_sizes == []
            assert zoo.BREAKDOWN_FAST_ROWS[0] == 'fast-triton'
            role = 'profile'
        elif args.rows == ['timm', 'ours', 'timm-compiled']:  # timm's compiles done ahead
            assert args.compile_budget >= 1000
            role = 'compiles ahead'
        elif not args.compile:  # the fast path's kernels compiled ahead
            role = 'kernels ahead'
        else:  # the benchmark: the CUDA defaults (the targets' rows and batch sizes)
            assert args.rows == zoo.DEFAULT_ROWS['cuda'] and args.summary_batch_sizes == [32, 1]
            role = 'benchmark'
        assert role not in parsed, role
        parsed[role] = args
    # the compiles done ahead are the benchmark's own: timm's DeiTs, at its batch sizes, precision and device
    ahead, kernels, bench = parsed['compiles ahead'], parsed['kernels ahead'], parsed['benchmark']
    assert 'timm-compiled' in bench.rows and bench.compile_models == bench.models
    for field in ('device', 'models', 'batch_size', 'dtype', 'seed', 'compile', 'compile_models',
                  'summary_batch_sizes', 'compile_min_batch'):
        assert getattr(ahead, field) == getattr(bench, field), field
    assert bench.compile_min_batch == 1  # timm compiled is one of the dense modes compared at every batch size
    # and so are the kernels compiled ahead: every fast-path row of the benchmark, in the sections it runs (the same
    # models, masks, batch sizes and precision), with its timed choices among the same candidates
    assert kernels.rows == [r for r in bench.rows if r != 'timm-compiled']
    for field in ('device', 'models', 'rates', 'batch_size', 'dtype', 'seed', 'masks', 'summary_batch_sizes',
                  'fast_autotune'):
        assert getattr(kernels, field) == getattr(bench, field), field
    assert kernels.time_limit < 170  # its hard limit's: a section it starts has most of its window


def test_gpu_check_names_existing_test_files_and_refuses_unknown_steps(tmp_path):
    for command in _gpu_check_commands('pytest'):
        files = [w for w in command.split() if w.startswith('tests/')]
        assert files and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), command
    out = tmp_path / 'out'
    refusals = {('tests', 'no-such-step'):
                'error: unknown step no-such-step (tests, benchmark, resume, profile, linear, compiled)',
                # a pattern is a step name as given, never the files it matches ('test?' passed the check as tests
                # and then ran nothing; '*' named a file of the repository)
                ('test?',): 'error: unknown step test? (tests, benchmark, resume, profile, linear, compiled)',
                ('*',): 'error: unknown step * (tests, benchmark, resume, profile, linear, compiled)',
                # an empty step (an unset variable) is neither the default steps nor dropped beside others
                ('',): "error: an empty step '' (tests, benchmark, resume, profile, linear, compiled; none given: "
                       "tests benchmark)",
                ('tests', ' '): "error: an empty step ' ' (tests, benchmark, resume, profile, linear, compiled; none "
                                "given: tests benchmark)",
                ('resume',): f'error: resume: no {tmp_path / "none.json"} (copy there the cuda.json of the call to '
                             f'carry on)',
                ('benchmark', 'resume'): 'error: resume is the benchmark carried on: give one of benchmark and resume',
                ('tests', 'benchmark', 'profile'): "error: steps 'tests benchmark profile' write 10 files; a remote "
                                                   "run brings back at most 8: give them in separate calls"}
    for steps, message in refusals.items():
        done = subprocess.run(['bash', GPU_CHECK, *steps], capture_output=True, text=True, timeout=60,
                              env=dict(subprocess_env(), OUT=str(out), RESUME=str(tmp_path / 'none.json')))
        assert done.returncode == 2 and done.stderr == message + '\n', steps
        assert not out.exists()  # refused before anything is written
    # a machine whose python3 sees no GPU (a stand-in python3 that answers so): refused before $OUT is made or
    # emptied (every step ran, failed and wrote its log)
    stand_in = tmp_path / 'bin'
    stand_in.mkdir()
    (stand_in / 'python3').write_text('#!/bin/sh\nexit 1\n')
    (stand_in / 'python3').chmod(0o755)
    env = subprocess_env()
    done = subprocess.run(['bash', GPU_CHECK], capture_output=True, text=True, timeout=60,
                          env=dict(env, OUT=str(out), PATH=f'{stand_in}:{env["PATH"]}'))
    assert done.returncode == 2 and done.stderr == ('error: python3 here sees no CUDA GPU (torch.cuda.is_available() '
                                                    'is not True): run it on the GPU machine\n'), done.stderr
    assert not out.exists()


def test_gpu_check_reads_the_results_the_benchmark_writes():
    """The Python that gpu_check.sh runs on the benchmark's JSON (the sections, the summary with its targets, the
    logit checks; the profile's slowest kernels) and the README table it prints run on a real results file (the
    committed CPU run), so a renamed key shows here, not in a GPU session's output."""
    text = open(GPU_CHECK).read()
    snippets = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", text, re.S)
    assert len(snippets) == 3  # the environment, the benchmark's summary, the profile's kernels
    cpu_json = os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')
    results = json.load(open(cpu_json))
    outputs = []
    for code in snippets[1:]:
        done = subprocess.run([sys.executable, '-', cpu_json], input=code, capture_output=True, text=True,
                              timeout=60, env=subprocess_env(), cwd=ROOT)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    summary = outputs[0].splitlines()
    assert summary[:len(results['sections'])] == [f"{s['section']}: {s['status']}" for s in results['sections']]
    first = results['summary'][0]
    assert any(line.startswith(f"{first['model']}: FLOPs ratio {first['flops_ratio']:.2f}, "
                               f"{first['best_pruned_mode']} over {first['best_dense_mode']}") for line in summary)
    assert sum('logit' in line or 'top-1' in line for line in summary) == sum(
        'logit' in t['target'] or 'top-1' in t['target'] for t in results['targets']) > 0
    assert outputs[1] == ''  # a CPU run profiles no kernels
    assert not any(line.startswith('unsteady:') for line in summary)
    # the committed GPU run: its unsteady sections, named as the Markdown names them
    cuda_json = os.path.join(ROOT, 'benchmarks', 'results', 'cuda.json')
    done = subprocess.run([sys.executable, '-', cuda_json], input=snippets[1], capture_output=True, text=True,
                          timeout=60, env=subprocess_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    named = [line[len('unsteady: '):] for line in done.stdout.splitlines() if line.startswith('unsteady: ')]
    listed = [line[2:] for line in report._unsteady_lines(json.load(open(cuda_json))) if line.startswith('- ')]
    assert named == [line.replace(', batch', ' batch', 1) for line in listed] and len(named) == 6
    table = _gpu_check_commands('benchmarks.report')
    assert len(table) == 1 and 'python3 -m benchmarks.report --gpu "$OUT/cuda.json"' in table[0]


# python3 as gpu_check.sh calls it, stood in for on a machine without a GPU (run by the real interpreter): every call
# is logged; the GPU probe and xdist's import answer yes (xdist: unless STAND_IN_NO_XDIST), pip does nothing, pytest
# and model_zoo.py write a few lines (model_zoo.py its results: STAND_IN_RESULTS as --json) and exit with the code
# STAND_IN_RC gives their step (`test_fast_path:1,model_zoo:124`; 0 if none), a second late for the steps STAND_IN_SLOW
# names (the last to end then: the script must wait for it); the environment's versions are a line
# (importing torch and timm takes seconds and names no GPU here); the summaries of the results run for real (the
# README table of benchmarks.report only with STAND_IN_REPORT=real: it imports torch).
_STAND_IN_PYTHON = r'''
import json, os, shutil, sys, time
args = sys.argv[1:]
with open(os.environ['STAND_IN_LOG'], 'a') as log:
    log.write(json.dumps(args) + '\n')
rc = dict(item.split(':') for item in os.environ.get('STAND_IN_RC', '').split(',') if item)


def exit_of(step):
    if step in os.environ.get('STAND_IN_SLOW', '').split(','):
        time.sleep(1)
    return int(rc.get(step, 0))


if args[:1] == ['-c'] and 'torch.cuda.is_available()' in args[1]:
    sys.exit(0)
elif args == ['-c', 'import xdist']:
    sys.exit(1 if os.environ.get('STAND_IN_NO_XDIST') else 0)
elif args[:3] == ['-m', 'pip', 'install']:
    sys.exit(0)
elif args[:2] == ['-m', 'pytest']:
    step = 'test_fast_path' if 'tests/test_fast_path.py' in args else 'test_model'
    code = exit_of(step)
    print(f'{step}: .....{"F" if code else "."}  [100%]')
    print(f'{"1 failed, 5" if code else "6"} passed in 0.5s')
    sys.exit(code)
elif args[:1] == ['benchmarks/model_zoo.py']:
    opts = dict(zip(args, args[1:]))
    if '--rows' in opts and 'fast-triton' in opts['--rows']:  # the Triton kernels compiled ahead, section by section
        print('\n== DeiT-Ti: batch 256, cuda, its kernels ==')
        sys.exit(exit_of('warm_kernels'))
    if '--rows' in opts:  # the compiles done ahead: graphs and the kernel configs timed, into inductor's cache
        cache = os.path.join(os.environ['TORCHINDUCTOR_CACHE_DIR'], 'fxgraph', 'ab')
        os.makedirs(cache, exist_ok=True)
        code = exit_of('warm_compile')
        for name in ('graph.py', 'kernel.best_config'):
            open(os.path.join(cache, name), 'w').close()
        print('torch.compile time (first call): tiny 9 s')
        sys.exit(code)
    if '--resume' in opts and not os.path.isfile(opts['--resume']):
        sys.exit(f'error: --resume {opts["--resume"]}: no such file')
    shutil.copyfile(os.environ['STAND_IN_RESULTS'], opts['--json'])
    with open(opts['--markdown'], 'w') as f:
        f.write('# the stand-in results\n')
    print('section tiny@256: done')
    sys.exit(exit_of('model_zoo'))
elif args[:1] == ['benchmarks/compiled_check.py']:
    print(f"batch 32 shared: cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}: ok")
    sys.exit(exit_of('compiled'))
elif args == ['-']:
    sys.stdin.read()
    print('python (stand-in) torch (stand-in) available True')
    sys.exit(0)
elif args[:1] == ['-'] or args[:2] == ['-m', 'benchmarks.report'] and os.environ.get('STAND_IN_REPORT') == 'real':
    os.execv(sys.executable, [sys.executable, *args])
elif args[:2] == ['-m', 'benchmarks.report']:
    print('| the README table (stand-in) |')
    sys.exit(0)
sys.exit(f'stand-in python3: an unexpected call {args}')
'''


def _run_gpu_check(tmp_path, *steps, **env):
    """Runs gpu_check.sh end to end with python3, nvidia-smi and timeout stood in for (timeout logs its arguments,
    then runs the real one); returns the run, python3's calls (argument lists) and timeout's (argument strings).
    The timm wheel is looked for in WHEELS, an empty folder unless the caller gives one (not the checkout's .whl/)."""
    bin_ = tmp_path / 'bin'
    if not bin_.exists():
        bin_.mkdir()
        # (python3 runs the stand-in through sh: a #! line cannot name an interpreter whose path has a blank)
        (tmp_path / 'stand_in_python3.py').write_text(_STAND_IN_PYTHON)
        python3 = f'exec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / "stand_in_python3.py"))} "$@"'
        scripts = {'python3': f'#!/bin/sh\n{python3}\n',
                   'nvidia-smi': '#!/bin/sh\necho "NVIDIA H200 (stand-in nvidia-smi)"\n',
                   'timeout': f'#!/bin/sh\necho "$*" >> "$STAND_IN_TIMEOUTS"\nexec {shutil.which("timeout")} "$@"\n'}
        for name, text in scripts.items():
            (bin_ / name).write_text(text)
            (bin_ / name).chmod(0o755)
        results = json.load(open(os.path.join(ROOT, 'benchmarks', 'results', 'cpu.json')))
        results['machine'].update(device='cuda', gpu='NVIDIA H200')  # the committed CPU run, as if measured there
        (tmp_path / 'results.json').write_text(json.dumps(results))
    for name in ('calls', 'timeouts'):
        (tmp_path / name).write_text('')
    base = subprocess_env()
    env = {**base, 'OUT': str(tmp_path / 'out'), 'PATH': f'{bin_}:{base["PATH"]}',
           'STAND_IN_LOG': str(tmp_path / 'calls'), 'STAND_IN_TIMEOUTS': str(tmp_path / 'timeouts'),
           'STAND_IN_RESULTS': str(tmp_path / 'results.json'),
           'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'inductor'), 'RESUME': str(tmp_path / 'earlier.json'),
           'WARM': str(tmp_path / 'warm'), 'WHEELS': str(tmp_path / 'no_wheels'), **env}
    done = subprocess.run(['bash', GPU_CHECK, *steps], capture_output=True, text=True, timeout=120, env=env)
    calls = [json.loads(line) for line in (tmp_path / 'calls').read_text().splitlines()]
    return done, calls, (tmp_path / 'timeouts').read_text().splitlines()


def _status(out):
    """status.txt as (step, verdict, rc) rows, each line checked whole."""
    lines = (out / 'status.txt').read_text().splitlines()
    rows = [re.fullmatch(r'(\w+): (ok|FAILED|TIMED OUT) \(rc (\d+), \d+ s\)', line) for line in lines]
    assert all(rows), lines
    return [(m[1], m[2], int(m[3])) for m in rows]


def test_gpu_check_runs_its_steps_end_to_end_within_its_time_limits(tmp_path):
    """The default call (the tests, then the benchmark) end to end, the GPU's work stood in for: each step runs once
    under its limit, with the flags it is meant to have, into status.txt as 'ok'; $OUT holds exactly the files the
    header promises; the summaries run on the results; the worst case of the limits fits the wall-clock limits the
    header gives a remote call (the default and `resume`), with time left for the summaries."""
    header = ' '.join(line.lstrip('#').strip() for line in open(GPU_CHECK).read().split('\nset -uo')[0].splitlines())
    out = tmp_path / 'out'
    # the timm wheel travels as a remote call carries it
    wheel = tmp_path / 'wheels' / 'timm-1.0.31-py3-none-any.whl'
    wheel.parent.mkdir()
    wheel.write_bytes(b'')
    # the compiles done ahead end after the tests (their cache then cleared of their kernel configs)
    done, calls, timeouts = _run_gpu_check(tmp_path, STAND_IN_REPORT='real', STAND_IN_SLOW='warm_compile',
                                           WHEELS=str(wheel.parent))
    assert done.returncode == 0, done.stdout + done.stderr
    status = _status(out)
    # the tests and the compiles done ahead run at once (their lines in any order), the benchmark alone after them
    assert sorted(status[:4]) == [(s, 'ok', 0) for s in ('test_fast_path', 'test_model', 'warm_compile',
                                                          'warm_kernels')]
    assert status[4:] == [('model_zoo', 'ok', 0)]
    promised = re.search(r'Outputs go to \$OUT \(default \S+\), (\d+) files [^:]*: (.*?)\.  ', header)
    names = promised[2].split(', ')
    assert sorted(os.listdir(out)) == sorted(names) and len(names) == int(promised[1]) == 7
    assert json.loads((out / 'cuda.json').read_text()) == json.loads((tmp_path / 'results.json').read_text())
    # the stand-in GPU probe and versions, the tests' logs, the benchmark's summary and README table come out
    assert 'NVIDIA H200 (stand-in nvidia-smi)' in (out / 'env.txt').read_text()
    assert '6 passed' in (out / 'test_fast_path.log').read_text() and '6 passed' in (out / 'test_model.log').read_text()
    assert 'torch.compile time (first call): tiny 9 s' in done.stdout
    assert '\n== DeiT-Ti: batch 256, cuda, its kernels ==\n' in done.stdout  # the sections whose kernels it compiled
    results = json.loads((tmp_path / 'results.json').read_text())
    for s in results['sections']:
        assert f"\n{s['section']}: {s['status']}" in done.stdout
    assert re.search(r'^\| model \|.*\| NVIDIA H200: ', done.stdout, re.M) and '\n| DeiT-Ti | ' in done.stdout
    # the kernel configs timed under the tests' load are gone, the compiled graphs stay
    cache = tmp_path / 'inductor' / 'fxgraph' / 'ab'
    assert sorted(os.listdir(cache)) == ['graph.py']
    # python3's calls: the probe, the wheel's install (where the tests' python3 and PYTHONPATH find it), the
    # versions, xdist, the two test runs and the two compiles ahead (at once), the benchmark and its two summaries
    steps = [c for c in calls if c[:2] == ['-m', 'pytest'] or c[:1] == ['benchmarks/model_zoo.py']]
    assert len(calls) == 6 + len(steps) and len(steps) == 5, calls
    assert calls[0][0] == '-c' and calls[2:4] == [['-'], ['-c', 'import xdist']], calls
    assert calls[1][:3] == ['-m', 'pip', 'install'] and calls[1][-3:] == ['--target', '/tmp/site', str(wheel)]
    assert f'installed {wheel}' in (out / 'env.txt').read_text()
    assert calls[-2:] == [['-', str(out / 'cuda.json')], ['-m', 'benchmarks.report', '--gpu', str(out / 'cuda.json')]]
    pytest_calls = [c for c in steps if c[1] == 'pytest']
    assert len(pytest_calls) == 2 and all(c[c.index('-n') + 1] == '4' for c in pytest_calls)
    bench = steps[-1]
    assert bench[bench.index('--json') + 1] == str(out / 'cuda.json') and '--resume' not in bench
    # timeout's calls: each step under its hard limit with 15 s of kill grace; the environment's commands and the
    # probe under theirs
    limits = {}
    for line in timeouts:
        words = line.split()
        if words[0].startswith('--kill-after='):
            name = ('test_fast_path' if 'tests/test_fast_path.py' in line else 'test_model' if 'tests/' in line
                    else 'warm_kernels' if 'fast-triton' in line else 'warm_compile' if '--rows' in line
                    else 'model_zoo')
            limits[name] = (int(words[1]), int(words[0].split('=')[1]))
        else:
            limits[' '.join(words[1:3])] = int(words[0])
    assert set(limits) == {'python3 -c', 'python3 -m', 'nvidia-smi', 'python3 -', 'test_model', 'warm_compile',
                           'warm_kernels', 'test_fast_path', 'model_zoo'}, limits
    assert all(limits[s][1] == 15 for s in ('test_model', 'warm_compile', 'warm_kernels', 'test_fast_path',
                                             'model_zoo'))
    environment = limits['python3 -m'] + limits['nvidia-smi'] + limits['python3 -']  # pip, the GPU, the versions
    tests = max(sum(limits[s]) for s in ('test_model', 'warm_compile', 'warm_kernels', 'test_fast_path'))
    benchmark = sum(limits['model_zoo'])
    worst = {'default': environment + tests + benchmark, 'resume': environment + benchmark}
    for call, worst_case in worst.items():
        wall = re.search(rf'bash benchmarks/gpu_check.sh {"" if call == "default" else call}\s+# a wall-clock limit '
                         rf'of (\d+) s', header)
        assert worst_case + 15 <= int(wall[1]), (call, worst_case, wall[0])  # 15 s: the summaries, the README table


def test_gpu_check_records_a_failed_step_and_carries_on(tmp_path):
    """A failing test step and a benchmark cut by its hard limit are recorded in status.txt, the benchmark still runs
    and its results still come, and the call exits non-zero; a failed compile done ahead is recorded but only costs
    the benchmark its cold compiles: the call still exits 0."""
    out = tmp_path / 'out'
    # the model's tests end last: the benchmark waits for them
    done, calls, _ = _run_gpu_check(tmp_path, STAND_IN_RC='test_fast_path:1,model_zoo:124', STAND_IN_SLOW='test_model')
    assert done.returncode == 1, done.stdout + done.stderr
    assert sorted(_status(out)) == [('model_zoo', 'TIMED OUT', 124), ('test_fast_path', 'FAILED', 1),
                                    ('test_model', 'ok', 0), ('warm_compile', 'ok', 0), ('warm_kernels', 'ok', 0)]
    assert _status(out)[-1][0] == 'model_zoo' and '1 failed' in (out / 'test_fast_path.log').read_text()
    assert (out / 'cuda.json').exists() and calls[-1][:2] == ['-m', 'benchmarks.report']
    for ahead in ('warm_compile', 'warm_kernels'):
        done, _, _ = _run_gpu_check(tmp_path, STAND_IN_RC=f'{ahead}:1')
        assert done.returncode == 0, done.stdout + done.stderr
        assert (ahead, 'FAILED', 1) in _status(out) and len(os.listdir(out)) == 7
    done, _, _ = _run_gpu_check(tmp_path, 'tests', STAND_IN_RC='test_model:1')  # a step run in the background
    assert done.returncode == 1 and sorted(_status(out)) == [('test_fast_path', 'ok', 0), ('test_model', 'FAILED', 1)]


def test_gpu_check_compiled_step_checks_with_the_machines_cache_and_with_an_empty_one(tmp_path):
    """`compiled` runs benchmarks/compiled_check.py twice, each a valid command line of it: first with inductor's
    cache as the machine has it (TORCHINDUCTOR_CACHE_DIR as the other steps use it), then with a new empty cache
    folder, removed afterwards; a failed check is recorded and makes the call fail."""
    from benchmarks import compiled_check
    commands = _gpu_check_commands('benchmarks/compiled_check.py')
    assert len(commands) == 2
    for command in commands:
        line = command.split('benchmarks/compiled_check.py', 1)[1]
        assert compiled_check.build_parser().parse_args(shlex.split(line)).device == 'cuda'
    out = tmp_path / 'out'
    done, calls, _ = _run_gpu_check(tmp_path, 'compiled')
    assert done.returncode == 0, done.stdout + done.stderr
    assert _status(out) == [('compiled_cache', 'ok', 0), ('compiled_fresh', 'ok', 0)]
    assert sorted(os.listdir(out)) == ['compiled_cache.log', 'compiled_fresh.log', 'env.txt', 'status.txt']
    assert [c for c in calls if c[:1] == ['benchmarks/compiled_check.py']] == [['benchmarks/compiled_check.py',
                                                                               '--device', 'cuda']] * 2
    cached = re.search(r'cache (\S+): ok', (out / 'compiled_cache.log').read_text())[1]
    fresh = re.search(r'cache (\S+): ok', (out / 'compiled_fresh.log').read_text())[1]
    assert cached == str(tmp_path / 'inductor') and fresh != cached and not os.path.exists(fresh)
    done, _, _ = _run_gpu_check(tmp_path, 'compiled', STAND_IN_RC='compiled:1')
    assert done.returncode == 1 and _status(out) == [('compiled_cache', 'FAILED', 1), ('compiled_fresh', 'FAILED', 1)]


def test_compiled_check_refuses_bad_arguments_before_any_work():
    for argv, message in [(['--batch-sizes', '0'], 'error: argument --batch-sizes: must be from 1 to 65536, got 0'),
                          (['--model', 'nope'], "error: argument --model: unknown model 'nope'"),
                          (['--device', 'tpu'], "error: argument --device: invalid choice: 'tpu'"),
                          # an empty list checked nothing and exited 0, as if every check had passed
                          (['--device', 'cpu', '--batch-sizes', ' , '],
                           'error: argument --batch-sizes: no batch size given')]:
        done = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'compiled_check.py'), *argv],
                              capture_output=True, text=True, timeout=120, env=subprocess_env())
        assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count('\n') == 1, done.stderr


@pytest.mark.parametrize('argv, flag', [(['--model=--'], '--model'), (['--device=cpu', '--batch-sizes=--'],
                                                                         '--batch-sizes')])
def test_compiled_check_refuses_a_flag_given_as_equals_dash_dash(argv, flag, monkeypatch, capsys):
    """`--model=--`: argparse took the '--' away and left the flag an empty list (a TypeError traceback, or no
    batch size checked); one `error:` line naming the flag, before any check."""
    from benchmarks import compiled_check
    monkeypatch.setattr(compiled_check, 'check', lambda *a: pytest.fail('no check may start'))
    with pytest.raises(SystemExit) as e:
        compiled_check.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ''
    assert err == f"error: argument {flag}: '--' is not a value (see --help)\n", err


def test_report_refuses_write_readme_equals_dash_dash(monkeypatch, capsys):
    """`--write-readme=--` is not the repository's README (argparse took the '--' away, leaving the flag as given
    without a value)."""
    monkeypatch.setattr(report, 'write_text_atomic', lambda *a: pytest.fail('nothing may be written'), raising=False)
    monkeypatch.setattr(report, 'readme_speed_table', lambda *a: pytest.fail('no table may be made'))
    with pytest.raises(SystemExit) as e:
        report.main(['--write-readme=--'])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ''
    assert err == "error: argument --write-readme: '--' is not a value (see --help)\n", err


def test_compiled_check_on_a_cpu_without_a_compiler_is_one_line_before_any_work(monkeypatch, capsys):
    """torch.compile builds CPU kernels with a C++ compiler (inductor's, from $CXX or its config): without a working
    one, --device cpu stopped in inductor's traceback at the first compile, after building the models."""
    import torch._inductor.config as inductor_config
    from benchmarks import compiled_check
    monkeypatch.setattr(compiled_check, 'check', lambda *a: pytest.fail('no check may start'))
    # torch's own patch, not monkeypatch (which would delete the entry on undo)
    with inductor_config.patch({'cpp.cxx': (None, os.path.join(os.sep, 'nonexistent', 'g++'))}):
        code = compiled_check.main(['--device', 'cpu', '--batch-sizes', '1'])
    out, err = capsys.readouterr()
    assert code == 2 and out == '' and err.count('\n') == 1, err
    assert err.startswith("error: argument --device: cpu: torch.compile builds its CPU kernels with a C++ compiler, "
                          "and none works here (") and err.endswith(')\n'), err
    from models.fast_path import cpu_compiler_problem
    assert cpu_compiler_problem() is None  # the compiler of this machine, found again


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:dynamo_pgo force disabled:UserWarning')  # (its fresh compile turns caches off)
def test_compiled_check_compares_the_compiled_model_with_eager_fp32_on_cpu(capsys):
    """On CPU (fp32) the script's two ways of compiling both agree with the eager model, batch size by batch size,
    in the order given; a compiled model that computed something else would be reported OFF."""
    from benchmarks import compiled_check
    assert compiled_check.check('deit_tiny_patch16_224', [3, 2], torch.device('cpu')) == [
        (3, 'shared', True), (2, 'shared', True), (3, 'fresh', True), (2, 'fresh', True)]
    out = capsys.readouterr().out
    assert out.count(': ok; caches: ') == 4 and 'OFF' not in out and 'images off' not in out


def test_compiled_check_reports_a_compiled_model_that_is_off(monkeypatch, capsys):
    """A 'compiled' model whose logits move by 0.1 (torch.compile stood in for) fails every way at every size, and
    each line lists the images that are off."""
    from benchmarks import compiled_check
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: (lambda x: model(x) + 0.1))
    no_cudnn = compiled_check.NO_CUDNN
    assert compiled_check.check('deit_tiny_patch16_224', [2, 1], torch.device('cpu')) == [
        (2, 'shared', False), (1, 'shared', False), (2, 'fresh', False), (1, 'fresh', False),
        (2, no_cudnn, False), (1, no_cudnn, False)]
    out = capsys.readouterr().out
    assert out.count(': OFF; caches: none used') == 6  # (nothing compiled)
    assert 'batch 1 fresh: max |logit - eager fp32| 1.00e-01' in out
    assert 'images off: 0 (1.00e-01), 1 (1.00e-01) (2 of 2)' in out and 'images off: 0 (1.00e-01) (1 of 1)' in out


def test_compiled_check_compiles_a_size_that_is_off_again_without_cudnn_attention(monkeypatch, capsys):
    """Only a batch size where a way was off is compiled a third time, afresh, with SDPA's cuDNN backend excluded
    while it compiles and runs (and only then); the images that are off are named, those that are not are not."""
    from benchmarks import compiled_check
    cudnn_seen = []

    def compile_(model, **kw):
        def run(x):
            cudnn_seen.append(torch.backends.cuda.cudnn_sdp_enabled())
            out = model(x)
            if x.shape[0] == 3 and cudnn_seen[-1]:  # off at batch 3 while cuDNN attention may run: image 1 only
                out[1] += 0.5
            return out
        return run
    monkeypatch.setattr(torch, 'compile', compile_)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    result = compiled_check.check('deit_tiny_patch16_224', [3, 2], torch.device('cpu'))
    assert result == [(3, 'shared', False), (2, 'shared', True), (3, 'fresh', False), (2, 'fresh', True),
                      (3, compiled_check.NO_CUDNN, True)]
    out = capsys.readouterr().out
    assert out.count('images off: 1 (5.00e-01) (1 of 3)') == 2 and out.count('images off') == 2
    # per check: the compiling call, the checked one and, when off, the call that finds the images
    assert cudnn_seen == [was] * 3 + [was] * 2 + [was] * 3 + [was] * 2 + [False] * 2
    assert torch.backends.cuda.cudnn_sdp_enabled() == was


def test_compiled_check_compiles_fresh_with_inductors_caches_off(monkeypatch, capsys):
    """The 'fresh' compiles run with inductor's caches off, the shared object's with them as the run has them: else
    each fresh compile would load what the shared object's compile of that size had just written to the cache (the
    same graph; seen on CPU, two cache hits of two), and an empty cache folder would not make it cold."""
    from benchmarks import compiled_check
    seen = []

    def compile_(model, **kw):
        def run(x):
            seen.append(torch.compiler.config.force_disable_caches)
            return model(x)
        return run
    monkeypatch.setattr(torch, 'compile', compile_)
    assert all(ok for _, _, ok in compiled_check.check('deit_tiny_patch16_224', [2, 1], torch.device('cpu')))
    assert seen == [False] * 4 + [True] * 4  # per size: the compiling call, then the checked one
    assert not torch.compiler.config.force_disable_caches


def test_gpu_check_resume_and_a_reused_out_folder(tmp_path):
    """`resume` without the results to carry on is refused before $OUT is touched; with them, the benchmark alone
    runs with --resume of them (also where they are $OUT's own cuda.json, which the clean-up of a reused $OUT then
    keeps); a reused $OUT keeps no file of an earlier call that this one does not write."""
    out = tmp_path / 'out'
    out.mkdir()
    stale = ['status.txt', 'model_zoo.log', 'cuda.json', 'cuda.md', 'profile.json', 'linear.log', 'test_model.log']
    for name in stale:
        (out / name).write_text('from an earlier call')
    done, calls, _ = _run_gpu_check(tmp_path, 'resume')
    assert done.returncode == 2 and done.stderr == (f'error: resume: no {tmp_path / "earlier.json"} (copy there the '
                                                    f'cuda.json of the call to carry on)\n'), done.stderr
    assert calls == [] and sorted(os.listdir(out)) == sorted(stale)
    assert all((out / name).read_text() == 'from an earlier call' for name in stale)
    # the tests alone, without xdist: the earlier benchmark's log and results are gone, the tests' logs are new
    done, calls, _ = _run_gpu_check(tmp_path, 'tests', STAND_IN_NO_XDIST='1')
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(os.listdir(out)) == ['env.txt', 'status.txt', 'test_fast_path.log', 'test_model.log']
    assert sorted(_status(out)) == [('test_fast_path', 'ok', 0), ('test_model', 'ok', 0)]
    assert '6 passed' in (out / 'test_model.log').read_text()
    assert [c for c in calls if c[:2] == ['-m', 'pytest'] and '-n' in c] == []
    assert not any(c[:1] == ['benchmarks/model_zoo.py'] for c in calls)
    # resume: the benchmark alone, carrying on $RESUME, once outside $OUT and once $OUT's own cuda.json
    for earlier in (tmp_path / 'earlier.json', out / 'cuda.json'):
        earlier.write_text('{"sections": []}')
        (out / 'test_model.log').write_text('from an earlier call')
        done, calls, _ = _run_gpu_check(tmp_path, 'resume', RESUME=str(earlier))
        assert done.returncode == 0, done.stdout + done.stderr
        assert _status(out) == [('model_zoo', 'ok', 0)]
        assert sorted(os.listdir(out)) == ['cuda.json', 'cuda.md', 'env.txt', 'model_zoo.log', 'status.txt']
        bench = [c for c in calls if c[:1] == ['benchmarks/model_zoo.py']]
        assert len(bench) == 1 and bench[0][bench[0].index('--resume') + 1] == str(earlier), calls
        assert not any(c[:2] == ['-m', 'pytest'] for c in calls)


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/linear_shapes.py: the matrix products per cuBLAS route (measured on a GPU only)

def test_linear_shapes_routes_set_and_restore_the_cublas_settings():
    """Each route computes the same product, and leaves torch's global cuBLAS settings as it found them."""
    from benchmarks import linear_shapes
    matmul = torch.backends.cuda.matmul
    before = torch.backends.cuda.preferred_blas_library(), matmul.allow_fp16_reduced_precision_reduction
    x, w, b = torch.randn(5, 8), torch.randn(3, 8), torch.randn(3)
    seen = {}
    for name in linear_shapes.ROUTES:
        with linear_shapes.route(name):
            seen[name] = (str(torch.backends.cuda.preferred_blas_library()),
                          matmul.allow_fp16_reduced_precision_reduction)
            assert torch.allclose(linear_shapes.product(name)(x, w, b), x @ w.t() + b, atol=1e-5)
        assert (torch.backends.cuda.preferred_blas_library(), matmul.allow_fp16_reduced_precision_reduction) == before
    assert 'Cublaslt' in seen['lt'][0] and seen['no-reduced'][1] is False
    assert seen['linear'] == seen['mm+bias'] == seen['halves'] == (str(before[0]), before[1])
    odd = torch.randn(7, 8)  # halves of an odd row count: 3 and 4 rows, each written in place
    assert torch.allclose(linear_shapes.product('halves')(odd, w, b), odd @ w.t() + b, atol=1e-5)


@pytest.mark.parametrize('argv, message', [
    (['--device', 'cpu'], "error: argument --device: invalid choice: 'cpu'"),
    (['--rate', 'abc'], "error: argument --rate: 'abc' is not a number (see --help)"),
    (['--rate', '1'], "error: argument --rate: a prune rate must lie in [0, 1), got '1' (see --help)"),
    (['--rate', 'nan'], "error: argument --rate: a prune rate must lie in [0, 1), got 'nan' (see --help)"),
    (['--batch', '0'], 'error: argument --batch: must be from 1 to 65536, got 0 (see --help)'),
    (['--rate', '0'], 'error: argument --rate: 0 clips int(2352 x 0) = 0 of the 2352 (layer, patch) slots of '
                      'deit_tiny_patch16_224: nothing would be pruned (a rate clips one from 1/2352 on)'),
    (['--rate', '0.0004'], 'clips int(2352 x 0.0004) = 0'),
    (['--no-such-flag'], 'error: unrecognized arguments: --no-such-flag (see --help)'),
    (['--model', 'huge'], "error: argument --model: unknown model 'huge'"),
    (['--out', 'FILE'], 'Not a directory'),
    (['--out', 'FILE/sub'], 'Not a directory'),
])
def test_linear_shapes_refuses_each_mistake_in_one_line_before_measuring(tmp_path, capsys, monkeypatch, argv,
                                                                         message):
    """Every argument is checked before any timing, and as if a GPU were there (so the checks are tested on any
    machine): one line, exit 2, nothing measured or written."""
    from benchmarks import linear_shapes
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(linear_shapes, '_measure', lambda args: pytest.fail('measured'))
    (tmp_path / 'FILE').write_text('')
    argv = [a.replace('FILE', str(tmp_path / 'FILE')) for a in argv]
    with pytest.raises(SystemExit) as e:
        sys.exit(linear_shapes.main(['--out', str(tmp_path / 'out'), *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count('\n') == 1 and err.startswith('error: ') and message in err, err
    assert sorted(os.listdir(tmp_path)) == ['FILE']


def test_linear_shapes_that_cannot_write_what_it_measured_exits_1_not_2(tmp_path, capsys, monkeypatch):
    """Exit code 2 is a usage mistake refused before any work; results measured for minutes that a full disk will
    not take are a failure of the run (1, as model_zoo.py), said in one line."""
    from benchmarks import linear_shapes
    from utils import OutputWriteError

    def measure(args):
        raise OutputWriteError(f'cannot write {args.out}/linear_shapes.json: No space left on device (...)')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(linear_shapes, '_measure', measure)
    code = linear_shapes.main(['--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 1 and err.count('\n') == 1 and err.startswith('error: cannot write ') and 'No space' in err, err


def test_linear_shapes_measures_what_it_was_asked_once_the_checks_pass(tmp_path, monkeypatch):
    from benchmarks import linear_shapes
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    seen = []
    monkeypatch.setattr(linear_shapes, '_measure', lambda args: seen.append(args) or 0)
    assert linear_shapes.main(['--model', 'small', '--rate', '0.25', '--batch', '8', '--out', str(tmp_path / 'o')]) == 0
    assert [(a.model, a.rate, a.batch, a.out) for a in seen] == [('deit_small_patch16_224', 0.25, 8,
                                                                  str(tmp_path / 'o'))]
    assert not (tmp_path / 'o').exists()  # made when its first file is written, not by the checks


def test_linear_shapes_replaces_only_its_own_earlier_outputs_in_out(tmp_path, capsys, monkeypatch):
    """linear_shapes.json or .md in --out that this script did not write (or the other of its two files) is refused
    in one line before anything is measured, and left as it was; its own earlier outputs (the committed ones, a note
    above the tables included) may be replaced, as model_zoo.py's."""
    from benchmarks import linear_shapes
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    measured = []
    monkeypatch.setattr(linear_shapes, '_measure', lambda args: measured.append(args.out) or 0)
    committed = os.path.join(ROOT, 'benchmarks', 'results', 'cuda_linear_routes')
    ours = {'linear_shapes.json': open(committed + '.json').read(), 'linear_shapes.md': open(committed + '.md').read()}
    for name, other in (('linear_shapes.json', 'linear_shapes.md'), ('linear_shapes.md', 'linear_shapes.json')):
        for text, words in (('my notes\n', 'exists and is not an output of benchmarks/linear_shapes.py'),
                            # JSON nested too deep for json.load: its RecursionError was a traceback
                            ('[' * 100000 + ']' * 100000, 'exists and is not an output of benchmarks/linear_shapes.py'),
                            (ours[other], f'is {linear_shapes.OUTPUT_KINDS[other][0]} of benchmarks/linear_shapes.py, '
                                          f'not {linear_shapes.OUTPUT_KINDS[name][0]}')):
            out = tmp_path / 'out'
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            (out / name).write_text(text)
            assert linear_shapes.main(['--out', str(out)]) == 2
            err = capsys.readouterr().err
            assert err == f'error: argument --out: {out / name} {words}; refusing to overwrite it\n', err
            assert os.listdir(out) == [name] and (out / name).read_text() == text and not measured
    out = tmp_path / 'again'
    out.mkdir()
    for name, text in ours.items():
        (out / name).write_text(text)
    assert linear_shapes.main(['--out', str(out)]) == 0 and measured == [str(out)]


def test_linear_shapes_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'linear_shapes.py'), '--out', str(tmp_path)],
                       capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert r.returncode == 2 and r.stderr == ('error: argument --device: cuda: no CUDA GPU is available (this script '
                                              'measures cuBLAS)\n'), r.stderr
    assert os.listdir(tmp_path) == []


def test_linear_shapes_end_to_end_feeds_images_of_the_models_own_size(monkeypatch):
    """The end-to-end part times the fast paths on images of the model's input size (a 32x32 model here), not on
    224x224 ones: --model takes any timm name with a C&C model; each route's builds time their own choices."""
    from benchmarks import linear_shapes
    from models import fast_path
    cc, _ = F.seeded_models('deit_digits_patch4_32', 0, CPU)
    pruned = F.pruned_copy(cc, F.plan(None, len(cc.blocks), cc.patch_embed.num_patches, 0.3, seed=0))
    built, real = [], fast_path.build_fast_path

    def build(model, dtype, cuda_graph, batch_size):  # the path as the GPU builds it, run eagerly here
        built.append((cuda_graph, batch_size, len(fast_path._CHOICE_CACHE)))
        fast_path._CHOICE_CACHE[('a choice timed under', len(built))] = None  # as a GPU build caches its choices
        return real(model, backend='torch')
    monkeypatch.setattr(fast_path, 'build_fast_path', build)
    monkeypatch.setattr(fast_path, '_CHOICE_CACHE', {})
    out = linear_shapes.end_to_end(cc, pruned, 2, CPU)
    # each route's dense build starts from no cached choice: they are timed under that route, not another's
    assert built == [(True, 2, 0), (True, 2, 1)] * 3
    assert set(out['ms']) == {f'{r}/{tag}' for r in linear_shapes.SETTING_ROUTES for tag in ('dense', 'pruned')}
    assert all(math.isfinite(s) and s > 0 for s in out['speedup'].values())


def test_linear_shapes_times_the_models_own_products_and_divides_dense_by_pruned(monkeypatch):
    """The per-shape products are those of timm's block (in and out features of qkv, proj, fc1, fc2), and the
    end-to-end speed-up per route is dense time over pruned time, paired per round (timer scripted)."""
    from benchmarks import linear_shapes
    from models import fast_path
    cc, _ = F.seeded_models('deit_digits_patch4_32', 0, CPU)
    blk = cc.blocks[0]
    layers = {'qkv': blk.attn.qkv, 'proj': blk.attn.proj, 'fc1': blk.mlp.fc1, 'fc2': blk.mlp.fc2}
    assert linear_shapes.shapes_of(cc.embed_dim, blk.mlp.fc1.out_features) == {
        name: (m.in_features, m.out_features) for name, m in layers.items()}
    monkeypatch.setattr(fast_path, 'build_fast_path', lambda model, **k: model)
    script = {'dense': [2.0, 3.0, 4.0], 'pruned': [1.0, 1.0, 1.0]}
    monkeypatch.setattr(engine, 'time_interleaved', lambda runs, x, *a, **k: {
        name: script[name.split('/')[1]] for name in runs})
    out = linear_shapes.end_to_end(cc, cc, 2, CPU)
    assert out['speedup'] == dict.fromkeys(linear_shapes.SETTING_ROUTES, 3.0)
    assert out['ms'] == {f'{r}/{t}': 1e3 * statistics.median(script[t]) for r in linear_shapes.SETTING_ROUTES
                         for t in ('dense', 'pruned')}


def test_linear_shapes_keeps_its_per_shape_figures_when_the_end_to_end_part_is_cut(tmp_path, monkeypatch):
    """The per-shape figures are written before the end-to-end part (six fast-path builds and captures): a run cut
    there (its time limit, a failed capture) keeps them; a run that finishes writes both (products' times scripted,
    the CPU standing in for the GPU)."""
    from benchmarks import linear_shapes
    monkeypatch.setattr(linear_shapes, 'gemm_ms', lambda fn, x, w, b: 1e-6 * x.shape[0] * w.shape[0])
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'NVIDIA H200')

    def cut(*a):
        raise RuntimeError('capturing the forward in a CUDA graph failed')
    monkeypatch.setattr(linear_shapes, 'end_to_end', cut)
    args = SimpleNamespace(device='cpu', model='deit_digits_patch4_32', rate=0.3, batch=2, out=str(tmp_path),
                           no_end_to_end=False)
    with pytest.raises(RuntimeError, match='capturing'):
        linear_shapes._measure(args)
    kept = json.loads((tmp_path / 'linear_shapes.json').read_text())
    assert kept['gpu'] == 'NVIDIA H200' and set(kept['shapes_ms']) == set(linear_shapes.ROUTES)
    assert 'end_to_end' not in kept and '| linear |' in (tmp_path / 'linear_shapes.md').read_text()
    e2e = {'ms': {f'{r}/{t}': 1.0 for r in linear_shapes.SETTING_ROUTES for t in ('dense', 'pruned')},
           'speedup': dict.fromkeys(linear_shapes.SETTING_ROUTES, 1.25)}
    monkeypatch.setattr(linear_shapes, 'end_to_end', lambda *a: e2e)
    assert linear_shapes._measure(args) == 0
    assert json.loads((tmp_path / 'linear_shapes.json').read_text())['end_to_end'] == e2e
    assert '| lt | 1.000 | 1.000 | 1.250 |' in (tmp_path / 'linear_shapes.md').read_text()
    assert sorted(os.listdir(tmp_path)) == ['linear_shapes.json', 'linear_shapes.md']


def test_gpu_check_lends_a_reused_out_folder_no_earlier_results(tmp_path):
    """Run where $OUT already holds an earlier call's results (a local run), a step that fails to write its own must
    not leave the earlier ones to be read as its: every results file a step writes is removed first (a stand-in
    python3 that sees a GPU and fails every step)."""
    stand_in = tmp_path / 'bin'
    stand_in.mkdir()
    (stand_in / 'python3').write_text('#!/bin/sh\ncase "$*" in *is_available*) exit 0 ;; esac\nexit 1\n')
    (stand_in / 'python3').chmod(0o755)
    out = tmp_path / 'out'
    out.mkdir()
    earlier = ['cuda.json', 'cuda.md', 'profile.json', 'profile.md', 'linear_shapes.json', 'linear_shapes.md']
    for name in earlier:
        (out / name).write_text('from an earlier call')
    env = subprocess_env()
    done = subprocess.run(['bash', GPU_CHECK, 'profile', 'linear'], capture_output=True, text=True, timeout=60,
                          env=dict(env, OUT=str(out), PATH=f'{stand_in}:{env["PATH"]}'))
    assert done.returncode != 0 and 'profile: FAILED' in done.stdout and 'linear: FAILED' in done.stdout
    assert not any((out / name).exists() for name in earlier), sorted(os.listdir(out))


def test_taylor_scores_of_a_gpu_run_are_computed_on_the_cpu(tiny, monkeypatch):
    """The benchmark plans its Taylor masks from scores computed on the CPU whatever --device says (a GPU's sums
    need not repeat bit for bit in another process, and a --resume must plan the masks it measured): the scorer
    and its batches are on the CPU, in fp32, and give exactly the scores of a CPU run; the model is left as it
    was."""
    cc = tiny[0]
    args = SimpleNamespace(masks='taylor', seed=3)
    seen = []
    real = pruning.attention_taylor_scores

    def recording(model, batches, criterion, device='cpu', **kw):
        batches = list(batches)
        seen.append((next(model.parameters()).device.type, next(model.parameters()).dtype, model is cc,
                     {t.device.type for b in batches for t in b}, torch.device(device).type))
        return real(model, batches, criterion, device=device, **kw)

    monkeypatch.setattr(pruning, 'attention_taylor_scores', recording)
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    on_cpu = zoo._scores(cc, args, torch.device('cpu'))
    as_if_gpu = zoo._scores(cc, args, torch.device('cuda'))  # (cc itself is on the CPU here: only its copy scores)
    assert seen[1] == ('cpu', torch.float32, False, {'cpu'}, 'cpu') and seen[0][2] is True
    assert torch.equal(on_cpu, as_if_gpu)
    assert all(torch.equal(v, before[k]) for k, v in cc.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# a compiled row whose logits come out off is compiled again, afresh

def _compile_off_unless(fresh_ok, no_cudnn_ok, made):
    """A stand-in for torch.compile: the model, its logits moved by 0.1 unless the compile is a fresh one (a
    ``backend`` given) that ``fresh_ok`` allows, or runs with cuDNN attention off where ``no_cudnn_ok`` allows;
    each compile recorded in ``made`` as (model, fresh)."""
    def compile_(model, **kw):
        fresh = 'backend' in kw
        made.append((model, fresh))

        def run(x):
            no_cudnn = not torch.backends.cuda.cudnn_sdp_enabled()
            ok = fresh and (fresh_ok(x.shape[0]) or (no_cudnn and no_cudnn_ok(x.shape[0])))
            return model(x) if ok else model(x) + 0.1
        return run
    return compile_


def test_a_compiled_row_that_is_off_is_compiled_afresh_and_the_fresh_compile_timed(tiny, monkeypatch, capsys):
    """timm compiled off as built, a fresh compile of the same model correct: the row keeps the fresh compile (the
    callable timed), its check is the fresh one's, passed, and records the compile it replaced; an eager row and
    a compiled row that pass are not compiled again."""
    cc, dense, pruned = tiny
    made = []
    monkeypatch.setattr(torch, 'compile', _compile_off_unless(lambda b: True, lambda b: False, made))
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, F.Context(CPU, None, 2, F.image_shape(cc)))
    assert made == [(dense, False), (dense, True)]
    c = built.checks['timm_compiled']
    assert c['max_abs_diff'] < 1e-4 and report.check_failure(c) is None and c['way'] == F.FRESH
    assert c['recompiled'] == [{'way': 'as built', 'failure': 'logits off: max |difference| 1.00e-01 > tolerance '
                                                              '1.00e-03'}]
    x = torch.randn(2, *F.image_shape(cc))
    with torch.no_grad():
        assert torch.allclose(built.runs['timm_compiled'](x), dense(x), atol=1e-5)
    assert 'way' not in built.checks['timm'] and 'recompiled' not in built.checks['ours_30']
    out = capsys.readouterr().out
    assert ('note: row timm_compiled at batch 2, compiled as built: logits off: max |difference| 1.00e-01 > '
            'tolerance 1.00e-03; compiled again (fresh): passed') in out


def test_a_compiled_row_still_off_afresh_is_compiled_without_cudnn_attention(tiny, monkeypatch):
    """Off as built and afresh, right with SDPA's cuDNN backend excluded: that third compile is timed, cuDNN
    attention off while it compiles and every time it runs, and on again outside."""
    cc, dense, pruned = tiny
    made = []
    monkeypatch.setattr(torch, 'compile', _compile_off_unless(lambda b: False, lambda b: True, made))
    was = torch.backends.cuda.cudnn_sdp_enabled()
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, [F.REGISTRY['timm'], F.REGISTRY['ours'],
                                                                      F.REGISTRY['ours-compiled']],
                         F.Context(CPU, None, 2, F.image_shape(cc)))
    assert made == [(pruned[0.3], False), (pruned[0.3], True), (pruned[0.3], True)]
    c = built.checks['compiled_30']
    assert report.check_failure(c) is None and c['way'] == F.FRESH_NO_CUDNN
    assert [e['way'] for e in c['recompiled']] == ['as built', F.FRESH]
    run = built.runs['compiled_30']
    x = torch.randn(2, *F.image_shape(cc))
    with torch.no_grad():
        assert torch.allclose(run(x), pruned[0.3](x), atol=1e-5)  # it runs without cuDNN attention: right
    assert torch.backends.cuda.cudnn_sdp_enabled() == was


def test_a_compiled_row_off_every_way_keeps_its_last_compile_and_fails(tiny, monkeypatch, capsys):
    """Off whichever way it is compiled: three compiles, the last one kept (timed, and left out of the comparisons
    as its check fails), each failure recorded; with the compile budget spent it is not compiled again at all."""
    cc, dense, pruned = tiny
    made = []
    monkeypatch.setattr(torch, 'compile', _compile_off_unless(lambda b: False, lambda b: False, made))
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours')]
    ctx = F.Context(CPU, None, 2, F.image_shape(cc))
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, ctx)
    assert made == [(dense, False), (dense, True), (dense, True)]
    c = built.checks['timm_compiled']
    assert report.check_failure(c).startswith('logits off') and c['way'] == F.FRESH_NO_CUDNN
    assert [e['way'] for e in c['recompiled']] == ['as built', F.FRESH]
    assert 'timm_compiled' in built.runs
    made.clear()
    budget = F.CompileBudget(seconds=1e-9)  # the row's own build is allowed (nothing spent), its recompiles not
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, ctx, budget)
    assert made == [(dense, False)] and 'recompiled' not in built.checks['timm_compiled']
    assert 'not compiled again: compile budget of 0 s spent' in capsys.readouterr().out


def test_the_compiles_of_a_row_compiled_again_are_charged_to_the_compile_budget(tiny, monkeypatch, capsys):
    """Each compile of a row off as built counts against --compile-budget, as its own build does: with every compile
    taking 10 s (a clock of the benchmark's that only the compiles move) and a budget of 15 s, the row's own build
    and one compile afresh are made, the third refused; all that was compiled is spent."""
    cc, dense, pruned = tiny
    made, clock = [], {'now': 0.0}
    compile_ = _compile_off_unless(lambda b: False, lambda b: False, made)

    def slow_compile(model, **kw):
        clock['now'] += 10.0
        return compile_(model, **kw)
    monkeypatch.setattr(torch, 'compile', slow_compile)
    monkeypatch.setattr(F, 'time', SimpleNamespace(perf_counter=lambda: clock['now']))
    budget = F.CompileBudget(seconds=15)
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen,
                         F.Context(CPU, None, 2, F.image_shape(cc)), budget)
    assert made == [(dense, False), (dense, True)] and budget.spent == 10.0 * len(made) == clock['now']
    assert [e['way'] for e in built.checks['timm_compiled']['recompiled']] == ['as built']
    out = capsys.readouterr().out
    assert 'compiled again (fresh): logits off' in out
    assert 'not compiled again: compile budget of 15 s spent (20 s; --compile-budget)' in out


def test_a_compiled_row_off_at_another_batch_size_is_compiled_afresh_there(tiny, monkeypatch):
    """The summary's batch sizes: a compiled row right at the main batch size and off at another (the recompile of
    the shared object for the new shape) is compiled afresh at that size, and only there."""
    cc, dense, pruned = tiny
    made = []

    def right_at_2(model, **kw):  # the first compile: right at batch 2, off at any other size
        made.append((model, 'backend' in kw))
        return lambda x: model(x) + (0.0 if x.shape[0] == 2 else 0.1)
    fresh = _compile_off_unless(lambda b: True, lambda b: False, made)
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: (fresh if 'backend' in kw else right_at_2)(model, **kw))
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, F.Context(CPU, None, 2, F.image_shape(cc)))
    assert made == [(dense, False)] and 'recompiled' not in built.checks['timm_compiled']
    again = F.rebuild_for_batch(built, lambda rate: cc if rate is None else pruned[rate], dense,
                                F.Context(CPU, None, 1, F.image_shape(cc)))
    assert made == [(dense, False), (dense, True)]
    c = again.checks['timm_compiled']
    assert c['way'] == F.FRESH and report.check_failure(c) is None
    assert again.runs['timm_compiled'] is not built.runs['timm_compiled']


def test_a_row_that_is_not_a_torch_compile_of_its_model_is_not_compiled_again(tiny):
    """Only the rows torch.compile builds from the model are compiled again: another row whose logits are off (here
    a stand-in 'compiled' formulation of its own) keeps its one build and its failed check."""
    cc, dense, pruned = tiny
    builds = []

    def build(cc_, dense_, ctx):
        builds.append(ctx.compile_backend)
        return lambda x: cc_(x) + 0.1
    off = F.Formulation('off', 'off', 'x', build, pruned=True, compiled=True, prime=True)
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, [F.REGISTRY['timm'], F.REGISTRY['ours'], off],
                         F.Context(CPU, None, 2, F.image_shape(cc)))
    assert builds == [None] and report.check_failure(built.checks['off_30']).startswith('logits off')


def test_fresh_inductor_compiles_anew_beside_an_earlier_compile_of_the_same_model():
    """A model compiled with torch.compile's default and called, then compiled with fresh_inductor: dynamo traces
    and inductor compiles it again (one graph more; no cache hit) and it computes the model; a second default
    torch.compile of the same model, by contrast, reuses the first graph (the reason for fresh_inductor).  A small
    model: what dynamo reuses does not depend on what the model is."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    graphs = lambda: counters['stats']['unique_graphs']  # noqa: E731
    with torch.no_grad():
        want = dense(x)
        torch.compile(dense, fullgraph=True, dynamic=False)(x)
        first = graphs()
        torch.compile(dense, fullgraph=True, dynamic=False)(x)
        assert graphs() == first  # reused
        hits = counters['inductor']['fxgraph_cache_hit']
        out = torch.compile(dense, fullgraph=True, dynamic=False, backend=F.fresh_inductor())(x)
    assert graphs() == first + 1 and counters['inductor']['fxgraph_cache_hit'] == hits
    assert torch.allclose(out, want, atol=1e-4)
    torch._dynamo.reset()


def test_the_report_says_which_compiled_rows_were_compiled_again_and_how(tiny, monkeypatch):
    """The checks' section of the report lists, after its table, every row compiled again at a batch size: each
    failed compile with its failure, then the compile timed and its outcome; a run where none was says nothing of
    it."""
    cc, dense, pruned = tiny
    made = []
    monkeypatch.setattr(torch, 'compile', _compile_off_unless(lambda b: False, lambda b: True, made))
    chosen = [F.REGISTRY[n] for n in ('timm', 'timm-compiled', 'ours')]
    built = F.build_runs('deit_tiny_patch16_224', cc, dense, pruned, chosen, F.Context(CPU, None, 2, F.image_shape(cc)))
    res = {'rows': [{'key': 'timm_compiled', 'label': 'DeiT-Ti (timm, compiled)'}], 'batch_size': 2,
           'checks': {'timm': built.checks['timm']},
           'summary_sweep': {'batches': [{'batch_size': 2, 'checks': built.checks}]}}
    lines = report._checks_table({'models': {'tiny': res}})
    off = 'logits off: max |difference| 1.00e-01 > tolerance 1.00e-03'
    assert lines[-1] == (f'- DeiT-Ti (timm, compiled), batch 2: compiled as built: {off}; compiled fresh: {off}; '
                         'compiled fresh, without cuDNN attention: passed (the compile timed, checked above)')
    assert sum(line.startswith('- ') for line in lines) == 1
    assert sum(line.startswith('Compiled again') for line in lines) == 1
    del res['summary_sweep']
    assert not any('Compiled again' in line for line in report._checks_table({'models': {'tiny': res}}))


def test_a_resumed_run_carries_over_a_check_of_a_row_compiled_again_and_refuses_one_cut():
    """The check of a row compiled again (its way and the compiles it replaced) is of the shape a --resume reads;
    a hand-cut record of a replaced compile is named."""
    from benchmarks import shapes
    check = {'max_abs_diff': 1e-4, 'tolerance': 1e-3, 'within_tolerance': True, 'top1_agreement': 1.0,
             'top1_agreement_clear': 1.0, 'clear_images': 2, 'images': 2, 'top1_ok': True, 'autocast_error': 0.0,
             'way': F.FRESH, 'recompiled': [{'way': 'as built', 'failure': 'logits off'}]}
    assert shapes.CHECK.problem(check, 'checks.timm_compiled') is None
    check['recompiled'] = [{'way': 'as built'}]
    assert shapes.CHECK.problem(check, 'checks.timm_compiled') == 'checks.timm_compiled.recompiled[0] has no "failure"'


# ---------------------------------------------------------------------------------------------------------------
# targets and tables against hand-made values (what the tests above left open)

def test_the_top1_target_of_a_section_is_its_worst_row():
    """Two judged rows, one agreeing with the reference on every image, one on half: the section's top-1 target
    is the worse row's 0.5, a miss, and names that row."""
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    checks = {'good': F.logit_check(ref, ref, 0.0), 'flip': F.logit_check(torch.tensor([[2.0, 0.0], [2.0, 0.0]]),
                                                                          ref, 0.0)}
    _, top1 = report.check_targets('M batch 2', checks, {'flip': 'Y (fast y)'}, {'good': 'fast-x', 'flip': 'fast-y'})
    assert (top1['value'], top1['met']) == (0.5, False) and 'lowest: Y (fast y)' in top1['target']


def test_a_sections_check_targets_miss_as_its_rows_checks_fail():
    """The section's targets are the rows' own rules: logits at most the tolerance off (a row 1.5 tolerances off
    misses it) and top-1 equal on at least 99% of the clear-margin images (97 of 100 misses it), each row's check
    failing with it."""
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    off = F.logit_check(ref + 1.5e-3, ref, 0.0)  # tolerance 1e-3
    within, _ = report.check_targets('M batch 2', {'off': off}, {}, {'off': 'fast-x'})
    assert (within['value'], within['threshold'], within['met']) == (pytest.approx(1.5, rel=1e-3), 1.0, False)
    assert report.verdict(within) == '**NO**' and report.check_failure(off).startswith('logits off')
    # baseline 1.0: tolerance 2.001, a clear margin above 2.0; three of 100 clear images flipped within tolerance
    ref = torch.tensor([[3.0, 0.0]] * 100)
    out = ref.clone()
    out[:3] = torch.tensor([1.5, 1.6])
    flipped = F.logit_check(out, ref, 1.0)
    assert flipped['within_tolerance'] and flipped['clear_images'] == 100
    assert flipped['top1_agreement_clear'] == pytest.approx(0.97)
    within, top1 = report.check_targets('M batch 100', {'flipped': flipped}, {}, {'flipped': 'fast-x'})
    assert within['met'] is True
    assert (top1['value'], top1['threshold'], top1['met']) == (pytest.approx(0.97), 0.99, False)
    assert report.verdict(top1) == '**NO**' and report.check_failure(flipped).startswith('top-1 differs')


def test_the_top1_target_reads_the_clear_margin_images_only_for_the_value_and_for_the_worst_row():
    """Baseline 0.1, four images: two with a clear top-2 margin, two near-ties (0.05 apart, under 2 x 0.1).  Row
    "ties" flips both near-ties (all images 0.5, clear ones 1.0): top-1 is judged on the clear images only, so it
    meets the target.  Row "clear" flips a clear image (all images 0.75, clear ones 0.5): beside "ties" it is the
    worst row on the clear images, though not on all images, and the section misses the target."""
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.05], [1.05, 1.0]])
    ties = F.logit_check(torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.1, 1.05], [1.0, 1.1]]), ref, 0.1)
    clear = F.logit_check(torch.tensor([[0.0, 2.0], [0.0, 2.0], [1.0, 1.05], [1.05, 1.0]]), ref, 0.1)
    assert (ties['clear_images'], ties['top1_agreement'], ties['top1_agreement_clear']) == (2, 0.5, 1.0)
    assert (clear['top1_agreement'], clear['top1_agreement_clear']) == (0.75, 0.5)
    kinds, labels = {'ties': 'fast-x', 'clear': 'fast-y'}, {'ties': 'X (fast x)', 'clear': 'Y (fast y)'}
    _, top1 = report.check_targets('M batch 4', {'ties': ties}, labels, kinds)
    assert (top1['value'], top1['met'], report.verdict(top1)) == (1.0, True, 'yes')
    _, top1 = report.check_targets('M batch 4', {'ties': ties, 'clear': clear}, labels, kinds)
    assert (top1['value'], top1['met']) == (0.5, False) and 'lowest: Y (fast y)' in top1['target']


def test_a_row_checked_again_at_a_summary_batch_size_has_a_target_there():
    """timm compiled, compiled again at batch 1 with logits 0.5 off there: the run's targets have batch 1's
    logit target, missed, naming it."""
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    results = _summary_run()
    results['models']['tiny']['summary_sweep']['batches'][0]['checks'] = {
        'timm_compiled': F.logit_check(ref + 0.5, ref, 0.0)}
    report.attach_summary(results, 'cuda')
    at1 = [t for t in results['targets'] if t['target'].startswith("DeiT-Ti batch 1: every row's max")]
    assert len(at1) == 1 and at1[0]['met'] is False and 'worst: X (timm-compiled)' in at1[0]['target']


def test_scoring_and_routing_targets_point_the_right_way():
    """Scoring at 2.0x a training step (the target: at most 1.5x) and the boolean routing at 0.8x ours (the
    target: at least 1.0x): both missed, decided by their intervals."""
    res = {'models': {'tiny': {'label': 'DeiT-Ti', 'short': 'Ti', 'batch_size': 8, 'rows': [],
                               'scoring': {'ratio': 2.0, 'ratio_ci': [1.8, 2.2]},
                               'routing': {'25': {'boolean_over_ours': 0.8, 'boolean_over_ours_ci': [0.7, 0.9]}}}}}
    verdicts = {t['target']: report.verdict(t) for t in report.targets(res, 'cpu')}
    assert verdicts == {'DeiT-Ti: scoring a batch <= 1.5x a training step': '**NO**',
                        'C&C-Ti-25: token routing alone, boolean-mask time / ours': '**NO**'}


def test_a_pruned_rows_targets_are_its_flops_ratio_and_the_boolean_formulation():
    """Original protocol (ratios of means, no interval): ours at 1.15x timm for a FLOPs ratio of 1.2 misses its
    target (1.2 itself, not 0.9 of it); ours at 1.1x and ours compiled at 0.9x the boolean formulation: met, missed."""
    row = dict(_row('ours_25', 'ours', False, 0.25, [1.0], 1.2, 'C&C-Ti-25 (ours)'), protocol='original',
               speedup_vs_timm=1.15, vs_boolean=1.1, vs_boolean_ci=None)
    compiled = dict(_row('compiled_25', 'ours-compiled', False, 0.25, [1.0], 1.2, 'C&C-Ti-25 (ours, compiled)'),
                    protocol='original', vs_boolean=0.9, vs_boolean_ci=None)
    res = {'models': {'tiny': {'label': 'DeiT-Ti', 'short': 'Ti', 'batch_size': 2, 'rows': [row, compiled]}}}
    got = {t['target']: (t['threshold'], report.verdict(t)) for t in report.targets(res, 'cpu')}
    assert got == {'C&C-Ti-25 (ours): speed-up over dense timm >= FLOPs ratio (cpu)': (1.2, '**NO**'),
                   'C&C-Ti-25 (ours): >= 1.0x the boolean-mask formulation': (1.0, 'yes'),
                   'C&C-Ti-25 (ours, compiled): >= 1.0x the boolean-mask formulation': (1.0, '**NO**')}


def test_a_pruned_rows_targets_under_protocol_ours_are_decided_by_their_own_intervals():
    """Protocol ours (medians of per-round ratios): each row target is decided by its own 95% interval.  Ours at
    1.30x timm (1.25-1.35) for a FLOPs ratio of 1.2: "yes"; at 1.05x the boolean formulation (0.98-1.10): "yes,
    within noise"; ours compiled at 0.90x it (0.85-0.95): "**NO**"."""
    row = dict(_row('ours_25', 'ours', False, 0.25, [1.0] * 8, 1.2, 'C&C-Ti-25 (ours)'), speedup_vs_timm=1.3,
               speedup_vs_timm_ci=[1.25, 1.35], vs_boolean=1.05, vs_boolean_ci=[0.98, 1.1])
    compiled = dict(_row('compiled_25', 'ours-compiled', False, 0.25, [1.0] * 8, 1.2, 'C&C-Ti-25 (ours, compiled)'),
                    vs_boolean=0.9, vs_boolean_ci=[0.85, 0.95])
    res = {'models': {'tiny': {'label': 'DeiT-Ti', 'short': 'Ti', 'batch_size': 8, 'rows': [row, compiled]}}}
    got = {t['target']: (t.get('ci'), report.verdict(t)) for t in report.targets(res, 'cpu')}
    assert got == {'C&C-Ti-25 (ours): speed-up over dense timm >= FLOPs ratio (cpu)': ([1.25, 1.35], 'yes'),
                   'C&C-Ti-25 (ours): >= 1.0x the boolean-mask formulation': ([0.98, 1.1], 'yes, within noise'),
                   'C&C-Ti-25 (ours, compiled): >= 1.0x the boolean-mask formulation': ([0.85, 0.95], '**NO**')}


def test_the_summary_verdict_under_the_original_protocol_is_decided():
    """Under the original protocol a row is one mean pass time: the summary's ratio is a ratio of means, with no
    interval by nature, so its verdict is decided ('yes'), not 'within noise' as a paired median without one."""
    results = _summary_run()
    for r in results['models']['tiny']['rows']:
        r['protocol'], r['seconds'] = 'original', [sorted(r['seconds'])[1]]
    results['models']['tiny'].pop('summary_sweep')
    report.attach_summary(results, 'cpu')
    entry = results['summary'][0]
    # boolean's 0.62 s against timm compiled's 0.80: 1.290 >= 0.9 x 1.37 = 1.233
    assert entry['speedup_vs_best_dense'] == pytest.approx(0.80 / 0.62)
    assert entry['targets']['vs_best_dense']['verdict'] == 'yes'


def test_the_summary_table_row_against_hand_computed_figures():
    timm = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 1.03, 0.97]
    results = _eight_rounds(timm, [0.9, 0.92, 0.88, 0.91, 0.89, 0.9, 0.93, 0.87], [0.5] * 8)
    report.attach_summary(results, 'cuda')
    line = next(x for x in report._summary_table(results) if x.startswith('| C&C-Ti-25 |'))
    # vs the fastest dense (timm compiled): per round 0.9/0.5 ... median 1.80, 8 rounds: min-max 1.74-1.86;
    # vs timm eager: median 2.00; batch 1 the same pass times
    assert line == ('| C&C-Ti-25 | 1.37 | ours | timm-compiled | 1.80 (1.74–1.86) | 2.00 | 1.80 | – | '
                    'vs_best_dense: yes, batch1: yes |')


def test_the_other_tables_rows_against_hand_made_figures():
    scoring = {'models': {'m': {'label': 'DeiT-Ti', 'scoring': {'batch_size': 8, 'scoring_s': 0.3,
                                                                'train_step_s': 0.2, 'ratio': 1.5}}}}
    assert report._scoring_table(scoring)[-1] == '| DeiT-Ti | 8 | 0.300 | 0.200 | 1.50 |'
    routing = {'settings': {'routing_repeats': 5}, 'models': {'m': {'short': 'Ti', 'routing': {'25': {
        'batch_size': 8, 'ms': {'ours': 1.0, 'boolean': 2.5, 'scatter': 4.0}, 'boolean_over_ours': 2.5,
        'forward_ms_ours': 20.0}}}}}
    assert report._routing_table(routing)[-1] == '| C&C-Ti-25 | 8 | 1.00 | 2.50 | 4.00 | 2.50 | 5.0% |'  # 1/20
    targets = report._targets_table({'targets': [report._target('t', 1.1, 1.233, True, [1.0, 1.2])]})
    assert targets[3] == '| t | 1.100 (1.000–1.200) | 1.233 | **NO** |'
    sweep = report._sweep_tables({'sweeps': {'batch': {'short': 'Ti', 'prune_rate': 0.25, 'rows': [
        {'batch_size': 8, 'timm': 2.0, 'ours': 4.0, 'boolean': 3.0, 'speedup_vs_timm': 2.0, 'vs_boolean': 1.5}]}}})
    assert sweep[-1] == '| 8 | 2.0 | 4.0 | 3.0 | 2.00 | 1.50 |'
    row = dict(_row('ours_25', 'ours', False, 0.25, [1.0], 1.37, 'C&C-Ti-25 (ours)'), kept_tokens_mean=150.0,
               gflops=0.92, counter_gflops=0.95, images_per_s=120.0, speedup_vs_timm=1.3, twin='timm',
               speedup_vs_twin=1.3, vs_boolean=1.1)
    main = report._main_table({'models': {'tiny': {'batch_size': 8, 'rows': [row]}}, 'settings': {'protocol': 'ours'}})
    assert '| C&C-Ti-25 | ours | 8 | 150.0 | 0.92 | 0.95 | 1.37 | 120.0 | 1.30 | 1.10 | – |' in main


def test_a_cut_run_says_per_batch_size_why_and_keeps_the_planned_order():
    """DeiT-S planned first and never run; Ti's batch 32 failed and its batch 1 was left out: the entries come in
    the planned order, and each batch's target gives its own section's reason."""
    results = _planned(_summary_run(), ['small', 'tiny'], [0.25, 0.40], [32, 1])
    del results['models']['tiny']['summary_sweep']['batches'][0]
    results['sections'] = [
        {'section': 'a', 'kind': 'main', 'model': 'tiny', 'batch_size': 10, 'status': 'done'},
        {'section': 'b', 'kind': 'summary', 'model': 'tiny', 'batch_size': 32, 'status': 'failed',
         'reason': 'RuntimeError: x'},
        {'section': 'c', 'kind': 'summary', 'model': 'tiny', 'batch_size': 1, 'status': 'left out',
         'reason': 'its main table did not run'}]
    report.attach_summary(results, 'cuda')
    assert [e['model'] for e in results['summary']] == ['C&C-S-25', 'C&C-S-40', 'C&C-Ti-25', 'C&C-Ti-40']
    ti = next(e for e in results['summary'] if e['model'] == 'C&C-Ti-25')['targets']
    assert ti['batch1']['verdict'] == 'not measured (batch 1 left out: its main table did not run)'
    assert ti['batch32']['verdict'] == 'not measured (batch 32 failed: RuntimeError: x)'


def test_rows_left_out_lists_every_formulation_and_row_left_out_with_its_section_and_why():
    """A formulation that cannot run here, a row the main table left out and one a summary batch left out (timm
    compiled below --compile-min-batch) are each listed once, under the section that left it out."""
    results = {'formulations': {'skipped': {'fast-triton': 'no Triton'}},
               'models': {'tiny': {'label': 'DeiT-Ti', 'batch_size': 256,
                                   'skipped_rows': {'fast_torch_40': 'building or running it failed: OSError: x'},
                                   'summary_sweep': {'batches': [
                                       {'batch_size': 32},
                                       {'batch_size': 1, 'skipped_rows': {
                                           'timm_compiled': 'compiled rows only at batch >= 32 (--compile-min-'
                                                            'batch)'}}]}}}}
    assert report._left_out(results) == [
        '', 'Rows left out:', '', '- fast-triton: no Triton',
        '- DeiT-Ti batch 256, fast_torch_40: building or running it failed: OSError: x',
        '- DeiT-Ti batch 1, timm_compiled: compiled rows only at batch >= 32 (--compile-min-batch)']
    del results['formulations'], results['models']['tiny']['skipped_rows']
    assert report._left_out(results)[3:] == [
        '- DeiT-Ti batch 1, timm_compiled: compiled rows only at batch >= 32 (--compile-min-batch)']
    results['models']['tiny']['summary_sweep']['batches'].pop()
    assert report._left_out(results) == []


def test_the_logit_checks_table_says_ok_of_exactly_the_rows_that_take_part_in_the_speed_verdicts():
    """Three checks: top-1 not judged (too few clear-margin images: no failure), logits off, top-1 off on the clear
    images (within a large tolerance).  The table's "ok" column is "yes" for the first only, the row the speed
    verdicts keep (check_failure None), at the main batch and at a summary batch alike."""
    ties = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.5, 0.5]])
    ref = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    checks = {'unjudged': F.logit_check(ties, ties, 0.0), 'off': F.logit_check(ref + 0.5, ref, 0.0),
              'flipped': F.logit_check(ref + torch.tensor([[-1.6, 1.6], [1.6, -1.6]]), ref, 0.8)}
    assert [report.check_failure(c) is None for c in checks.values()] == [True, False, False]
    assert checks['unjudged']['top1_ok'] is None and checks['flipped']['within_tolerance']
    rows = [{'key': k, 'label': f'C&C-Ti-25 ({k})'} for k in checks]
    results = {'models': {'tiny': {'batch_size': 4, 'rows': rows, 'checks': checks,
                                   'summary_sweep': {'batches': [{'batch_size': 1, 'checks': checks}]}}}}
    ok = {(line.split(' | ')[0][2:], line.split(' | ')[1]): line.split(' | ')[-1].rstrip(' |')
          for line in report._checks_table(results) if line.startswith('| C&C')}
    assert ok == {(f'C&C-Ti-25 ({k})', batch): 'yes' if k == 'unjudged' else '**NO**' for k in checks
                  for batch in ('4', '1')}


def test_a_check_whose_top1_was_not_judged_is_no_failure():
    """Too few clear-margin images to judge top-1 (top1_ok None): the row is not left out of the speed verdicts."""
    logits = torch.tensor([[0.0, 2.0], [1.0, 1.0], [0.5, 0.5]])
    check = F.logit_check(logits, logits, 0.0)
    assert check['top1_ok'] is None and report.check_failure(check) is None
