#!/usr/bin/env python
"""The Model Zoo table measured side by side: GFLOPs, images/s and speed-up of dense and pruned DeiT.

For each model (DeiT-Ti/S/B) and prune rate, these rows run on the *same weights*, timed interleaved in one
process with the timer of --speed-only (engine.time_interleaved: warm-up, synchronised passes, the starting
row rotating every round); every pass time is kept, so ratios are paired per round and come with a
confidence interval; glibc is told to keep freed memory, so no row pays page faults that depend on what ran
before it):

  * ``DeiT-X (timm)``: timm's own dense ``deit_*_patch16_224`` (the baseline of every speed-up);
  * ``C&C-X-rr (ours)``: ``cc_deit_*`` with the masks applied (per block two fixed-shape gathers and a
    concatenation);
  * ``C&C-X-rr (boolean mask)``: a re-implementation, written below, of the *original research code's*
    formulation, ``keep, rest = x[:, m], x[:, ~m]; x = cat([block(keep), rest], 1)`` in every block;
  * with torch.compile: ``DeiT-X (timm, compiled)`` and ``C&C-X-rr (ours, compiled)`` (fullgraph=True).

GFLOPs are the paper's (DESIGN §6: multiply-accumulates) and are cross-checked against
torch.utils.flop_counter. The script also reports how cost grows (images/s against batch size and against
prune rate), where the time goes (profiled time per family of operations, dense against pruned, set against
the FLOPs ratio), the cost of scoring one batch for pruning against one plain training step on the same batch,
and the token routing alone (every timm block replaced by the identity, so only what differs between the pruned
formulations is timed), then says whether each target of the issue is met. It prints Markdown and writes JSON.

Masks: by default Taylor attention scores of the random-init model on two random-noise batches, planned
with the global budget (``--masks taylor``; per-layer kept counts vary like a real plan's, though the
distribution is not that of a trained model); ``--masks random`` uses the random baseline. Weights are a
seeded random init: throughput does not depend on their values.

    python benchmarks/model_zoo.py                      # CPU here: Ti/S/B, rates 0.25,0.30,0.40
    python benchmarks/model_zoo.py --device cuda        # on a GPU (fp16 autocast, larger batches)
    python benchmarks/model_zoo.py --quick              # smoke run, under a minute on 2 CPU cores
"""
import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from timm.loss import LabelSmoothingCrossEntropy  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402,F401  (registers cc_deit_*)
import pruning  # noqa: E402
from engine import steady_allocator  # noqa: E402

ARCHS = {
    'tiny': ('deit_tiny_patch16_224', 'Ti'),
    'small': ('deit_small_patch16_224', 'S'),
    'base': ('deit_base_patch16_224', 'B'),
}
# DESIGN §6: the seed's figures on their GPU.
SEED_GPU = {
    ('tiny', 0.0): (1.3, 2234, 1.00), ('tiny', 0.25): (1.0, 2876, 1.29), ('tiny', 0.40): (0.7, 3685, 1.65),
    ('small', 0.0): (4.6, 1153, 1.00), ('small', 0.25): (3.4, 1587, 1.38), ('small', 0.30): (3.2, 1711, 1.48),
    ('base', 0.0): (17.6, None, None),
}
DEFAULT_BATCH = {'cpu': {'tiny': 32, 'small': 16, 'base': 8}, 'cuda': {'tiny': 256, 'small': 256, 'base': 128}}
SCORING_TARGET = 1.5


# ----------------------------------------------------------------------------------------------------------------
# The original research code's formulation (a re-implementation for comparison; not used by the project)

class BooleanMaskViT(nn.Module):
    """RE-IMPLEMENTATION of the original C&C research code's approach, for benchmarking only.

    Every block boolean-indexes its input with its concat-order mask, runs the (unmodified timm) block on the
    kept tokens and concatenates kept first, clipped after: DESIGN §1 taken literally. Boolean indexing has a
    data-dependent output shape (``nonzero``: a host-device sync per block on a GPU, and no
    ``torch.compile(fullgraph=True)``). It wraps the dense timm model it is given and shares its weights.
    """

    def __init__(self, vit: nn.Module, concat_masks: List[torch.Tensor]):
        super().__init__()
        self.vit = vit
        for i, m in enumerate(concat_masks):
            self.register_buffer(f'mask_{i}', m.clone().to(torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))
        x = self.run_blocks(x)
        return v.forward_head(v.norm(x))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.vit.blocks):
            m = getattr(self, f'mask_{i}')
            keep, rest = x[:, m], x[:, ~m]
            keep = blk(keep)
            x = torch.cat([keep, rest], dim=1)
        return x


class ScatterRouting(nn.Module):
    """The routing this project used before (kept for the routing measurement only): tokens stay in their
    original order; each block gathers the tokens it keeps and scatters the results back (``index_copy``)."""

    def __init__(self, cc_model: nn.Module):
        super().__init__()
        self.blocks = cc_model.blocks
        self.kept_ids = cc_model.kept_token_ids()

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk, ids in zip(self.blocks, self.kept_ids):
            if blk.dense:
                x = Block.forward(blk, x)
            else:
                x = x.index_copy(1, ids, Block.forward(blk, x.index_select(1, ids)))
        return x


def run_blocks_ours(cc_model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The blocks of our model as forward_features runs them, with its final return to the original order."""
    x = cc_model.blocks(x)
    return x.index_select(1, cc_model.restore_ids) if cc_model.reordered else x


@contextlib.contextmanager
def blocks_as_identity():
    """timm's Block.forward becomes the identity while inside: a forward pass through the blocks is then left
    with the token routing only (gathers, concatenation, scatter), the one thing the pruned formulations do
    differently (attention and MLP are the same timm code in all of them)."""
    original = Block.forward
    Block.forward = lambda self, x, attn_mask=None, is_causal=False: x
    try:
        yield
    finally:
        Block.forward = original


# ----------------------------------------------------------------------------------------------------------------
# Where the time goes: dense against pruned, per family of operations (CPU profiler)

# First match wins (substrings of aten op names); everything else is OTHER_OPS.
OP_FAMILIES = (
    ('patch embedding', ('convolution',)),
    ('attention', ('scaled_dot_product', 'softmax', 'bmm')),
    ('linear layers', ('addmm', 'aten::mm', 'aten::matmul', 'aten::linear')),
    ('token routing', ('index_select', 'aten::cat', 'aten::index')),
)
OTHER_OPS = 'LayerNorm, GELU, adds, copies'
FAMILIES = ('patch embedding', 'linear layers', 'attention', OTHER_OPS, 'token routing')  # report order


def op_family(op_name: str) -> str:
    for family, parts in OP_FAMILIES:
        if any(part in op_name for part in parts):
            return family
    return OTHER_OPS


def family_macs(model: nn.Module) -> Dict[str, int]:
    """The DESIGN §6 count split by family of operations (sums to models.count_macs; the formula prices no
    LayerNorm, GELU, softmax, residual add or routing, so those families have none)."""
    C, kept = model.embed_dim, models.kept_token_counts(model)
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = models.count_macs(model, [0] * len(kept)) - C * model.num_classes
    return {'patch embedding': patch,
            'attention': sum(2 * n * n * C for n in kept),
            'linear layers': sum(4 * n * C * C + 2 * n * C * hidden for n in kept) + C * model.num_classes}


def profile_families(rows: Dict[str, nn.Module], x: torch.Tensor, rounds: int,
                     dtype: Optional[torch.dtype] = None) -> Dict[str, Dict[str, float]]:
    """Milliseconds per forward pass spent in each family of operations, for every row: the self time of each
    aten op (torch.profiler, CPU) summed by family, averaged over ``rounds`` passes that take turns as the
    timed rows do (engine.time_interleaved runs them).  Run after the timing: the profiler slows every op a
    little."""
    from torch.profiler import ProfilerActivity, profile
    out = {name: dict.fromkeys(FAMILIES, 0.0) for name in rows}

    def profiled(name: str) -> Callable:
        def run(t: torch.Tensor) -> None:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                rows[name](t)
            for event in prof.key_averages():
                out[name][op_family(event.key)] += event.self_cpu_time_total / 1e3 / rounds
        return run

    with torch.no_grad():
        engine.time_interleaved({name: profiled(name) for name in rows}, x, x.device, rounds, 0, dtype)
    return out


def gap_breakdown(dense_ms: Dict[str, float], ours_ms: Dict[str, float], dense_macs: Dict[str, int],
                  ours_macs: Dict[str, int]) -> Dict:
    """How far each family is from the model's FLOPs ratio R.  If the pruned pass took exactly 1/R of the dense
    one, the speed-up would equal R; ``excess_ms`` of a family is its pruned time minus its dense time / R, so the
    excesses add up to the whole gap (positive: slower than its share, negative: faster).  A family's own FLOPs
    ratio says what the formula expects of it (linear layers scale with the kept tokens, attention with their
    square); LayerNorm, GELU, adds and the routing are not in the formula."""
    ratio = sum(dense_macs.values()) / sum(ours_macs.values())
    total_dense, total_ours = sum(dense_ms.values()), sum(ours_ms.values())
    families = {}
    for f in FAMILIES:
        d, o = dense_ms.get(f, 0.0), ours_ms.get(f, 0.0)
        comparable = f != 'token routing'  # dense timm has no routing (one concatenation of the class token)
        families[f] = {'timm_ms': d, 'ours_ms': o, 'time_ratio': d / o if o and comparable else None,
                       'flops_ratio': dense_macs[f] / ours_macs[f] if ours_macs.get(f) else None,
                       'excess_ms': o - d / ratio, 'excess_share': (o - d / ratio) / total_ours}
    return {'flops_ratio': ratio, 'profiled_speedup': total_dense / total_ours, 'timm_ms': total_dense,
            'ours_ms': total_ours, 'gap_ms': total_ours - total_dense / ratio, 'families': families}


# ----------------------------------------------------------------------------------------------------------------
# helpers

def machine_info(device: torch.device) -> Dict:
    cpu = platform.processor() or ''
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        'cpu': cpu, 'cpu_cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
        'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
        'platform': platform.platform(), 'device': str(device),
        'load_average_at_start': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def counter_gmacs(model: nn.Module, device: torch.device) -> float:
    """MACs of one image according to torch.utils.flop_counter (FLOPs / 2), in G."""
    x = torch.randn(1, 3, 224, 224, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def timm_twin(cc_model: nn.Module, timm_name: str, device: torch.device) -> nn.Module:
    """timm's dense DeiT with the cc model's weights (state dict minus the mask buffers)."""
    dense = timm.create_model(timm_name)
    state = {k: v for k, v in cc_model.state_dict().items() if not k.endswith(models.MASK_KEY)}
    dense.load_state_dict(state, strict=True)
    return dense.to(device).eval()


def seeded_models(timm_name: str, seed: int, device: torch.device) -> (nn.Module, nn.Module):
    """Our model with all masks True (a seeded random init) and timm's dense twin with the same weights."""
    torch.manual_seed(seed)
    cc = timm.create_model('cc_' + timm_name).to(device).eval()
    return cc, timm_twin(cc, timm_name, device)


def noise_batches(n: int, batch: int, num_classes: int, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 224, 224, generator=g).to(device),
             torch.randint(0, num_classes, (batch,), generator=g).to(device)) for _ in range(n)]


def plan(scores: Optional[torch.Tensor], depth: int, num_patches: int, rate: float, seed: int) -> torch.Tensor:
    if scores is None:
        return pruning.random_masks(depth, num_patches, rate, generator=torch.Generator().manual_seed(seed))
    return pruning.plan_masks(scores, rate)


def pruned_copy(cc: nn.Module, masks: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(cc)
    pruning.apply_masks(model, masks)
    return model.eval()


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor, autocast) -> float:
    with torch.no_grad(), autocast():
        return (a(x).float() - b(x).float()).abs().max().item()


def rate_tag(rate: float) -> str:
    return f'{round(rate * 100):02d}'


def configure_dynamo() -> None:
    """Several same-class models are compiled per run (one per prune rate, each a recompile of the same
    forward): allow that, and fail loudly rather than fall back to eager if the limit is ever hit."""
    cfg = torch._dynamo.config
    for name, value in (('recompile_limit', 64), ('cache_size_limit', 64), ('fail_on_recompile_limit_hit', True)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


def compile_model(model: nn.Module, x: torch.Tensor, autocast) -> (nn.Module, float):
    """torch.compile(fullgraph=True); the first call (under the timing's no_grad/autocast) compiles it."""
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad(), autocast():
        compiled(x)
    engine.synchronize(x.device)
    return compiled, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------
# measurements

def median_ci(values: List[float], confidence: float = 0.95) -> List[float]:
    """A distribution-free confidence interval of the median: the order statistics x_(r), x_(n+1-r) with the
    largest r whose coverage 1 - 2 P(Binomial(n, 1/2) < r) is at least ``confidence``.  Host noise is not
    Gaussian (a pass is only ever slowed down), so no normal approximation.  With fewer than 6 values no such
    interval exists (n=5 gives 94% at best) and the min-max range is returned."""
    v, n = sorted(values), len(values)
    best = 1
    for r in range(2, (n + 1) // 2 + 1):
        below = sum(math.comb(n, i) for i in range(r)) / 2 ** n  # P(Binomial(n, 1/2) <= r - 1)
        if 1 - 2 * below < confidence:
            break
        best = r
    return [v[best - 1], v[n - best]]


def paired(ratios: List[float]) -> Dict:
    """Median of per-round ratios, their range, and the 95% confidence interval of the median."""
    return {'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios), 'ci': median_ci(ratios)}


def as_fields(key: str, summary: Dict) -> Dict:
    """A ``paired`` summary as report fields: ``key`` (the median), ``key_range`` and ``key_ci``."""
    return {key: summary['median'], f'{key}_range': [summary['min'], summary['max']], f'{key}_ci': summary['ci']}


class Timings:
    """Seconds per forward of every row, one list per row, one entry per round (rows interleaved)."""

    def __init__(self, seconds: Dict[str, List[float]], batch: int):
        self.seconds, self.batch = seconds, batch

    def images_per_s(self, name: str) -> float:
        return self.batch / statistics.median(self.seconds[name])

    def ratio(self, fast: str, slow: str) -> Dict:
        """Speed of ``fast`` over ``slow``: the median of the per-round ratios (each pair timed back to back),
        their range over the rounds and the confidence interval of the median."""
        return paired([s / f for f, s in zip(self.seconds[fast], self.seconds[slow])])


def time_interleaved(runs: Dict[str, Callable], batch: int, device: torch.device, repeats: int, warmup: int,
                     dtype, x: Optional[torch.Tensor] = None) -> Timings:
    """engine.time_interleaved (the timer of --speed-only: rows take turns, the starting row rotates, every
    pass synchronised) under no_grad, on ``x`` or a random image batch, keeping every pass time."""
    if x is None:
        x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        return Timings(engine.time_interleaved(runs, x, device, repeats, warmup, dtype), batch)


def scoring_cost(cc: nn.Module, dense: nn.Module, batch: int, reps: int, device: torch.device, seed: int) -> Dict:
    """Seconds for one attention_taylor_scores batch vs one plain training step (forward, backward, AdamW step)
    of the dense model on the same batch, fp32, timed interleaved; medians of ``reps`` after one warm-up."""
    criterion = LabelSmoothingCrossEntropy(0.1)
    (x, y), = noise_batches(1, batch, cc.num_classes, device, seed)
    scorer = copy.deepcopy(cc)
    trainee = copy.deepcopy(dense).train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4, weight_decay=0.05)

    def score():
        pruning.attention_taylor_scores(scorer, [(x, y)], criterion, device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(trainee(x), y)
        loss.backward()
        optimizer.step()

    times = engine.time_interleaved({'scoring': lambda _: score(), 'train_step': lambda _: train_step()}, x,
                                    device, reps, 1, None)
    s, t = statistics.median(times['scoring']), statistics.median(times['train_step'])
    ratio = paired([a / b for a, b in zip(times['scoring'], times['train_step'])])
    del scorer, trainee, optimizer
    return {'batch_size': batch, 'repeats': reps, 'scoring_s': s, 'train_step_s': t, **as_fields('ratio', ratio)}


def routing_cost(ours: nn.Module, boolean: 'BooleanMaskViT', batch: int, device: torch.device, repeats: int,
                 dtype) -> Dict:
    """Milliseconds per batch of the token routing alone (blocks as identity), on token tensors of the model's
    shape, interleaved and rotated like the main table; many cheap rounds, so the spread is small."""
    x = torch.randn(batch, ours.num_tokens, ours.embed_dim, device=device)
    scatter = ScatterRouting(ours)
    runs = {'ours': lambda t: run_blocks_ours(ours, t), 'boolean': boolean.run_blocks,
            'scatter': scatter.run_blocks}
    with blocks_as_identity():
        with torch.no_grad():  # the routings move the same tokens (ours ends in the original order)
            assert runs['ours'](x).shape == runs['boolean'](x).shape == runs['scatter'](x).shape
        timings = time_interleaved(runs, batch, device, repeats, 3, dtype, x=x)
    return {'batch_size': batch, 'repeats': repeats,
            'ms': {k: 1e3 * statistics.median(v) for k, v in timings.seconds.items()},
            **as_fields('boolean_over_ours', timings.ratio('ours', 'boolean'))}


def bench_model(arch: str, args, device: torch.device, dtype, autocast) -> Dict:
    timm_name, short = ARCHS[arch]
    batch = args.batch_size or DEFAULT_BATCH[device.type][arch]
    print(f'\n== DeiT-{short}: batch {batch}, {args.repeats} timed passes after {args.warmup} warm-up, '
          f'{device}, {"fp32" if dtype is None else str(dtype).replace("torch.", "")} ==', flush=True)
    torch._dynamo.reset()
    cc, dense = seeded_models(timm_name, args.seed, device)
    depth, num_patches = len(cc.blocks), cc.num_tokens - 1
    dense_macs = models.count_macs(cc)

    start = time.perf_counter()
    scores = _scores(cc, args, device, batch=min(batch, 8))
    if scores is not None:
        print(f'Taylor scores of the random-init model on 2 noise batches: {time.perf_counter() - start:.1f} s',
              flush=True)

    x = torch.randn(min(batch, 4), 3, 224, 224, device=device)
    checks = {'timm_vs_ours_dense_max_abs': max_diff(dense, cc, x, autocast)}
    runs: Dict[str, nn.Module] = {'timm': dense}
    meta: Dict[str, Dict] = {'timm': {'label': f'DeiT-{short} (timm)', 'kind': 'timm', 'rate': 0.0,
                                      'macs': dense_macs, 'kept': [cc.num_tokens] * depth}}
    compile_s = {}
    compile_rows = args.compile and arch in args.compile_models
    if compile_rows:
        runs['timm_compiled'], compile_s['timm'] = compile_model(dense, torch.randn(batch, 3, 224, 224,
                                                                                     device=device), autocast)
        meta['timm_compiled'] = dict(meta['timm'], label=f'DeiT-{short} (timm, compiled)', kind='timm-compiled')
    pruned_models = {}
    for rate in args.rates:
        tag = rate_tag(rate)
        masks = plan(scores, depth, num_patches, rate, args.seed)
        ours = pruned_copy(cc, masks)
        pruned_models[rate] = ours
        kept = models.kept_token_counts(ours)
        macs = models.count_macs(ours)
        boolean = BooleanMaskViT(dense, [blk.attn.token_index for blk in ours.blocks]).to(device).eval()
        checks[f'ours_vs_boolean_{tag}_max_abs'] = max_diff(ours, boolean, x, autocast)
        base = {'rate': rate, 'macs': macs, 'kept': kept}
        runs[f'ours_{tag}'] = ours
        meta[f'ours_{tag}'] = dict(base, label=f'C&C-{short}-{tag} (ours)', kind='ours')
        runs[f'boolean_{tag}'] = boolean
        meta[f'boolean_{tag}'] = dict(base, label=f'C&C-{short}-{tag} (boolean mask, original formulation)',
                                      kind='boolean')
        if compile_rows:
            compiled, compile_s[tag] = compile_model(ours, torch.randn(batch, 3, 224, 224, device=device),
                                                     autocast)
            checks[f'compiled_vs_ours_{tag}_max_abs'] = max_diff(compiled, ours, x, autocast)
            runs[f'compiled_{tag}'] = compiled
            meta[f'compiled_{tag}'] = dict(base, label=f'C&C-{short}-{tag} (ours, compiled)', kind='ours-compiled')
        print(f'rate {rate}: kept tokens per block {kept}; {macs / 1e9:.2f} GFLOPs', flush=True)
    if compile_s:
        print('torch.compile(fullgraph=True) time, first call: '
              + ', '.join(f'{k} {v:.0f} s' for k, v in compile_s.items()), flush=True)

    # FLOPs: the DESIGN §6 formula against torch's counter, for the dense model and each pruned one.
    counted = {'timm': counter_gmacs(dense, device)}
    for rate, ours in pruned_models.items():
        counted[f'ours_{rate_tag(rate)}'] = counter_gmacs(ours, device)

    start = time.perf_counter()
    timings = time_interleaved(runs, batch, device, args.repeats, args.warmup, dtype)
    print(f'timed {len(runs)} rows interleaved in {time.perf_counter() - start:.0f} s', flush=True)

    rows = []
    for key, m in meta.items():
        row = {'key': key, 'label': m['label'], 'kind': m['kind'], 'prune_rate': m['rate'],
               'gflops': m['macs'] / 1e9, 'flops_ratio': dense_macs / m['macs'],
               'kept_tokens': m['kept'], 'kept_tokens_mean': sum(m['kept']) / len(m['kept']),
               'images_per_s': timings.images_per_s(key), **as_fields('speedup_vs_timm', timings.ratio(key, 'timm')),
               'seconds': timings.seconds[key]}
        tag = rate_tag(m['rate'])
        if f'ours_{tag}' in counted:
            row['counter_gflops'] = counted[f'ours_{tag}']
        elif m['kind'].startswith('timm'):
            row['counter_gflops'] = counted['timm']
        if m['kind'] in ('ours', 'ours-compiled'):
            row.update(as_fields('vs_boolean', timings.ratio(key, f'boolean_{tag}')))
        if m['kind'] in ('ours-compiled', 'timm-compiled'):
            row.update(as_fields('speedup_vs_timm_compiled', timings.ratio(key, 'timm_compiled')))
        seed = SEED_GPU.get((arch, round(m['rate'], 2)))
        if seed and m['kind'] in ('timm', 'ours'):
            row['seed_gpu'] = {'gflops': seed[0], 'images_per_s': seed[1], 'speedup': seed[2]}
        rows.append(row)

    result = {'model': timm_name, 'short': short, 'batch_size': batch, 'rows': rows, 'checks': checks,
              'compile_seconds': compile_s, 'masks': args.masks}
    if args.breakdown_rounds:
        start = time.perf_counter()
        profiled = {'timm': dense, **{f'ours_{rate_tag(r)}': m for r, m in pruned_models.items()}}
        ms = profile_families(profiled, torch.randn(batch, 3, 224, 224, device=device), args.breakdown_rounds,
                              dtype)
        dense_families = family_macs(cc)
        result['breakdown'] = {rate_tag(r): gap_breakdown(ms['timm'], ms[f'ours_{rate_tag(r)}'], dense_families,
                                                           family_macs(m)) for r, m in pruned_models.items()}
        for tag, b in result['breakdown'].items():
            worst = max(b['families'].items(), key=lambda kv: kv[1]['excess_ms'])
            print(f'profiled C&C-{short}-{tag}: speed-up {b["profiled_speedup"]:.2f} for a FLOPs ratio of '
                  f'{b["flops_ratio"]:.2f}; most time above that ratio: {worst[0]} '
                  f'({100 * worst[1]["excess_share"]:+.1f}% of the pruned pass)', flush=True)
        print(f'profiled {len(profiled)} rows x {args.breakdown_rounds} passes in {time.perf_counter() - start:.0f} s',
              flush=True)
    if args.routing_repeats:
        result['routing'] = {}
        for rate, ours in pruned_models.items():
            boolean = runs[f'boolean_{rate_tag(rate)}']
            rc = routing_cost(ours, boolean, batch, device, args.routing_repeats, dtype)
            rc['forward_ms_ours'] = 1e3 * statistics.median(timings.seconds[f'ours_{rate_tag(rate)}'])
            result['routing'][rate_tag(rate)] = rc
            print(f'token routing alone, rate {rate}: ours {rc["ms"]["ours"]:.2f} ms, '
                  f'boolean {rc["ms"]["boolean"]:.2f} ms, gather/scatter {rc["ms"]["scatter"]:.2f} ms per batch',
                  flush=True)
    if args.scoring_repeats:
        scoring_batch = args.scoring_batch_size or min(batch, 64)
        result['scoring'] = scoring_cost(cc, dense, scoring_batch, args.scoring_repeats, device, args.seed)
        sc = result['scoring']
        print(f'scoring one batch {sc["scoring_s"]:.2f} s vs one training step {sc["train_step_s"]:.2f} s '
              f'(ratio {sc["ratio"]:.2f})', flush=True)
    return result


def batch_sweep(arch: str, rate: float, batch_sizes: List[int], args, device, dtype, autocast) -> List[Dict]:
    """images/s of dense timm, ours and the boolean formulation against batch size, one rate."""
    timm_name, short = ARCHS[arch]
    cc, dense = seeded_models(timm_name, args.seed, device)
    masks = plan(_scores(cc, args, device), len(cc.blocks), cc.num_tokens - 1, rate, args.seed)
    ours = pruned_copy(cc, masks)
    boolean = BooleanMaskViT(dense, [blk.attn.token_index for blk in ours.blocks]).to(device).eval()
    out = []
    print(f'\n== batch-size sweep: DeiT-{short}, prune rate {rate} ==', flush=True)
    for bs in batch_sizes:
        t = time_interleaved({'timm': dense, 'ours': ours, 'boolean': boolean}, bs, device, args.repeats,
                             args.warmup, dtype)
        ips = {k: t.images_per_s(k) for k in t.seconds}
        out.append(dict(batch_size=bs, **ips, speedup_vs_timm=t.ratio('ours', 'timm')['median'],
                        vs_boolean=t.ratio('ours', 'boolean')['median']))
        print(f'batch {bs}: ' + ', '.join(f'{k} {v:.1f}' for k, v in ips.items()) + ' images/s', flush=True)
    return out


def rate_sweep(arch: str, rates: List[float], batch: int, args, device, dtype, autocast) -> List[Dict]:
    """images/s of ours and the boolean formulation against prune rate, with the FLOPs ratio (one timed run)."""
    timm_name, short = ARCHS[arch]
    cc, dense = seeded_models(timm_name, args.seed, device)
    scores = _scores(cc, args, device)
    dense_macs = models.count_macs(cc)
    runs, macs = {'timm': dense}, {}
    for rate in rates:
        ours = pruned_copy(cc, plan(scores, len(cc.blocks), cc.num_tokens - 1, rate, args.seed)) if rate else cc
        runs[f'ours_{rate}'] = ours
        macs[rate] = models.count_macs(ours)
        if rate:
            masks = [b.attn.token_index for b in ours.blocks]
            runs[f'boolean_{rate}'] = BooleanMaskViT(dense, masks).to(device).eval()
    print(f'\n== prune-rate sweep: DeiT-{short}, batch {batch}, {len(runs)} rows interleaved ==', flush=True)
    t = time_interleaved(runs, batch, device, args.repeats, args.warmup, dtype)
    out = []
    for rate in rates:
        row = {'prune_rate': rate, 'gflops': macs[rate] / 1e9, 'flops_ratio': dense_macs / macs[rate],
               'timm': t.images_per_s('timm'), 'ours': t.images_per_s(f'ours_{rate}'),
               'speedup_vs_timm': t.ratio(f'ours_{rate}', 'timm')['median']}
        if rate:
            row['boolean'] = t.images_per_s(f'boolean_{rate}')
            row['vs_boolean'] = t.ratio(f'ours_{rate}', f'boolean_{rate}')['median']
        out.append(row)
        print(f'rate {rate}: FLOPs ratio {row["flops_ratio"]:.2f}x, speed-up {row["speedup_vs_timm"]:.2f}x',
              flush=True)
    return out


def _scores(cc, args, device, batch: int = 8) -> Optional[torch.Tensor]:
    """Taylor scores of the random-init model on 2 noise batches (``--masks taylor``); None plans random masks."""
    if args.masks != 'taylor':
        return None
    return pruning.attention_taylor_scores(cc, noise_batches(2, batch, cc.num_classes, device, args.seed),
                                           LabelSmoothingCrossEntropy(0.1), device=device)


# ----------------------------------------------------------------------------------------------------------------
# report

def _target(name: str, value: float, threshold: float, at_least: bool, ci=None) -> Dict:
    """A target verdict on a median; ``ci`` is its 95% confidence interval, to tell a miss from noise: the
    verdict is 'yes' or 'no' when the interval lies on one side of the threshold, 'within noise' otherwise."""
    met = value >= threshold if at_least else value <= threshold
    out = {'target': name, 'value': value, 'threshold': threshold, 'met': met}
    if ci is not None:
        out['ci'] = ci
        out['decided'] = not (ci[0] < threshold < ci[1])
    return out


def verdict(target: Dict) -> str:
    if target.get('decided', True):
        return 'yes' if target['met'] else '**NO**'
    return 'yes, within noise' if target['met'] else 'no, within noise'


def targets(results: Dict, device: torch.device) -> List[Dict]:
    out = []
    for arch, res in results['models'].items():
        for row in res['rows']:
            if row['kind'] == 'ours':
                out.append(_target(f'{row["label"]}: speed-up over dense timm >= FLOPs ratio ({device.type})',
                                   row['speedup_vs_timm'], row['flops_ratio'], True, row['speedup_vs_timm_ci']))
                out.append(_target(f'{row["label"]}: >= 1.0x the boolean-mask formulation',
                                   row['vs_boolean'], 1.0, True, row['vs_boolean_ci']))
            if row['kind'] == 'ours-compiled':
                out.append(_target(f'{row["label"]}: >= 1.0x the boolean-mask formulation',
                                   row['vs_boolean'], 1.0, True, row['vs_boolean_ci']))
        for key, diff in res['checks'].items():
            if key.startswith('compiled_vs_ours'):
                tol = 1e-3 if results['settings']['dtype'] == 'fp32' else 5e-2
                out.append(dict(_target(f'DeiT-{res["short"]} {key.split("_")[3]}: torch.compile(fullgraph=True) '
                                        f'works, max |logit - eager|', diff, tol, False), format='.1e'))
        for tag, rc in res.get('routing', {}).items():
            out.append(_target(f'C&C-{res["short"]}-{tag}: token routing alone, boolean-mask time / ours',
                               rc['boolean_over_ours'], 1.0, True, rc['boolean_over_ours_ci']))
        if 'scoring' in res:
            sc = res['scoring']
            out.append(_target(f'DeiT-{res["short"]}: scoring a batch <= {SCORING_TARGET}x a training step',
                               sc['ratio'], SCORING_TARGET, False, sc['ratio_ci']))
    return out


def fmt(v, spec='.2f', none='–'):
    return none if v is None else format(v, spec)


def markdown(results: Dict) -> str:
    m = results['machine']
    where = m.get('gpu') or f'{m["cpu"]}, {m["cpu_cores"]} cores, {m["torch_threads"]} torch threads'
    lines = [f'Measured on {m["device"]} ({where}), torch {m["torch"]}, timm {m["timm"]}, '
             f'{results["settings"]["dtype"]}, median of {results["settings"]["repeats"]} interleaved passes, '
             f'allocator {m.get("malloc", "default")}'
             + (f'; load average {m["load_average_at_start"][0]:.2f} at start, {m["load_average_at_end"][0]:.2f} at end'
                if m.get('load_average_at_start') and m.get('load_average_at_end') else '') + '.',
             '', '| model | formulation | batch | kept tokens/block | GFLOPs | counter GFLOPs | FLOPs ratio | images/s '
                 '| speed-up vs DeiT | vs boolean mask | seed GPU speed-up |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for res in results['models'].values():
        for r in res['rows']:
            name, _, formulation = r['label'].partition(' (')
            speed = r.get('speedup_vs_timm_compiled', r['speedup_vs_timm'])
            seed = r.get('seed_gpu', {}).get('speedup')
            lines.append(f'| {name} | {formulation.rstrip(")")} | {res["batch_size"]} | {r["kept_tokens_mean"]:.1f} '
                         f'| {r["gflops"]:.2f} | {fmt(r.get("counter_gflops"))} | {r["flops_ratio"]:.2f} '
                         f'| {r["images_per_s"]:.1f} | {speed:.2f} | {fmt(r.get("vs_boolean"))} | {fmt(seed)} |')
    lines.append('')
    lines.append('Speed-ups are against timm\'s dense DeiT with the same weights, timed in the same run (median of '
                 'the per-round ratios); compiled rows against the compiled dense DeiT. GFLOPs = multiply-accumulates '
                 'by the paper\'s formula (DESIGN §6); "counter" = torch.utils.flop_counter / 2.')
    if results['models'] and any('scoring' in r for r in results['models'].values()):
        lines += ['', '| model | batch | scoring one batch (s) | one training step (s) | ratio |',
                  '|---|---|---|---|---|']
        for res in results['models'].values():
            if 'scoring' in res:
                sc = res['scoring']
                lines.append(f'| DeiT-{res["short"]} | {sc["batch_size"]} | {sc["scoring_s"]:.3f} '
                             f'| {sc["train_step_s"]:.3f} | {sc["ratio"]:.2f} |')
    if any(res.get('routing') for res in results['models'].values()):
        lines += ['', 'Token routing alone (every timm block replaced by the identity; ms per batch, median of '
                      f'{results["settings"]["routing_repeats"]} interleaved rounds):', '',
                  '| model | batch | ours: 2 gathers + concat | boolean mask + concat | gather + scatter '
                  '| boolean / ours | ours, share of its forward pass |', '|---|---|---|---|---|---|---|']
        for res in results['models'].values():
            for tag, rc in res.get('routing', {}).items():
                lines.append(f'| C&C-{res["short"]}-{tag} | {rc["batch_size"]} | {rc["ms"]["ours"]:.2f} '
                             f'| {rc["ms"]["boolean"]:.2f} | {rc["ms"]["scatter"]:.2f} | {rc["boolean_over_ours"]:.2f} '
                             f'| {100 * rc["ms"]["ours"] / rc["forward_ms_ours"]:.1f}% |')
    if any(res.get('breakdown') for res in results['models'].values()):
        lines += ['', 'Where the time goes: torch.profiler self time of the aten ops, summed by family, dense timm '
                      f'against ours (mean of {results["settings"]["breakdown_rounds"]} profiled passes per row, '
                      'taking turns). Each cell: the family\'s time ratio timm/ours, in brackets its own FLOPs '
                      'ratio (what the formula expects of it), then its time above the model\'s FLOPs ratio as a '
                      'share of the pruned pass; these shares add up to the gap between the profiled speed-up and '
                      'the FLOPs ratio.', '',
                  '| model | FLOPs ratio | profiled speed-up | ' + ' | '.join(FAMILIES) + ' |',
                  '|---|---|---|' + '---|' * len(FAMILIES)]
        for res in results['models'].values():
            for tag, b in res.get('breakdown', {}).items():
                cells = []
                for f in FAMILIES:
                    c = b['families'][f]
                    cells.append(f'{fmt(c["time_ratio"])} ({fmt(c["flops_ratio"])}) {100 * c["excess_share"]:+.1f}%')
                lines.append(f'| C&C-{res["short"]}-{tag} | {b["flops_ratio"]:.2f} | {b["profiled_speedup"]:.2f} | '
                             + ' | '.join(cells) + ' |')
    sweeps = results.get('sweeps', {})
    if sweeps.get('batch'):
        s = sweeps['batch']
        lines += ['', f'images/s against batch size (DeiT-{s["short"]}, prune rate {s["prune_rate"]}):', '',
                  '| batch | DeiT (timm) | ours | boolean mask | speed-up vs DeiT | vs boolean mask |',
                  '|---|---|---|---|---|---|']
        for r in s['rows']:
            lines.append(f'| {r["batch_size"]} | {r["timm"]:.1f} | {r["ours"]:.1f} | {r["boolean"]:.1f} '
                         f'| {r["speedup_vs_timm"]:.2f} | {r["vs_boolean"]:.2f} |')
    if sweeps.get('rate'):
        s = sweeps['rate']
        lines += ['', f'images/s against prune rate (DeiT-{s["short"]}, batch {s["batch_size"]}, one interleaved run):',
                  '', '| prune rate | GFLOPs | FLOPs ratio | ours images/s | boolean mask images/s '
                      '| speed-up vs DeiT | vs boolean mask |', '|---|---|---|---|---|---|---|']
        for r in s['rows']:
            lines.append(f'| {r["prune_rate"]:.2f} | {r["gflops"]:.2f} | {r["flops_ratio"]:.2f} | {r["ours"]:.1f} '
                         f'| {fmt(r.get("boolean"), ".1f")} | {r["speedup_vs_timm"]:.2f} '
                         f'| {fmt(r.get("vs_boolean"))} |')
    if results.get('targets'):
        lines += ['', '| target | median over rounds (95% CI of the median) | threshold | met |',
                  '|---|---|---|---|']
        for t in results['targets']:
            spec = t.get('format', '.3f')
            value = f'{t["value"]:{spec}}'
            if 'ci' in t:
                value += f' ({t["ci"][0]:{spec}}–{t["ci"][1]:{spec}})'
            lines.append(f'| {t["target"]} | {value} | {t["threshold"]:{spec}} | {verdict(t)} |')
        lines += ['', 'CI: distribution-free confidence interval of the median from order statistics (min–max with '
                      'fewer than 6 rounds). "Within noise": the interval contains the threshold.']
    return '\n'.join(lines) + '\n'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=['cpu', 'cuda'], default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--models', default='tiny,small,base', help='comma-separated: tiny,small,base')
    p.add_argument('--rates', default='0.25,0.30,0.40', help='comma-separated prune rates')
    p.add_argument('--batch-size', type=int, default=None,
                   help='batch for every model (default: CPU 32/16/8 for Ti/S/B, CUDA 256/256/128)')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed passes per row (default: CPU 15, CUDA 30); 6 or more give a 95%% CI of the median')
    p.add_argument('--warmup', type=int, default=None, help='warm-up passes per row (default: CPU 1, CUDA 10)')
    p.add_argument('--dtype', choices=['fp32', 'fp16', 'bf16'], default=None,
                   help='autocast precision of the timed forwards (default: CPU fp32, CUDA fp16)')
    p.add_argument('--masks', choices=['taylor', 'random'], default='taylor',
                   help='taylor: Taylor scores of the random-init model on noise batches; random: random baseline')
    p.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile rows')
    p.add_argument('--compile-models', default=None,
                   help='models that get torch.compile rows (default: CPU the first of --models, as a cold '
                        'inductor compile takes 15-40 s per pruned model on 2 cores; CUDA all)')
    p.add_argument('--sweep-batch-sizes', default=None,
                   help='batch-size sweep (default: CPU 1,8,32,64; CUDA 1,32,128,256,512; "" to skip)')
    p.add_argument('--sweep-rates', default=None,
                   help='prune-rate sweep (default 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7; "" to skip)')
    p.add_argument('--scoring-repeats', type=int, default=None,
                   help='timed scoring/training-step pairs per model (default 3; 0 to skip)')
    p.add_argument('--scoring-batch-size', type=int, default=None,
                   help='batch of the scoring-cost comparison (default: the model\'s batch, at most 64)')
    p.add_argument('--routing-repeats', type=int, default=None,
                   help='rounds of the token-routing-alone timing (default 60; 0 to skip)')
    p.add_argument('--breakdown-rounds', type=int, default=None,
                   help='profiled passes per row for the time-by-family breakdown (default: CPU 3, 0 to skip; '
                        'CPU only)')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s own)')
    p.add_argument('--malloc', choices=['steady', 'default'], default='steady',
                   help='steady: glibc keeps freed memory, so no row pays page faults that depend on what ran '
                        'before it (default); default: leave the allocator as it is')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='where to write the results (default benchmarks/results/<device>.json)')
    p.add_argument('--markdown', default=None, help='where to write the tables (default: next to --json, .md)')
    p.add_argument('--quick', action='store_true',
                   help='smoke run: DeiT-Ti, rates 0.25,0.40, batch 8, 2 passes, no compile, short sweeps')
    args = p.parse_args(argv)
    cpu = args.device == 'cpu'
    if args.quick:
        args.models = 'tiny'
        args.rates = '0.25,0.40'
        args.batch_size = args.batch_size or 8
        args.repeats = args.repeats or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.compile = False
        args.sweep_batch_sizes = '1,8' if args.sweep_batch_sizes is None else args.sweep_batch_sizes
        args.sweep_rates = '0.25,0.5' if args.sweep_rates is None else args.sweep_rates
        args.scoring_repeats = 1 if args.scoring_repeats is None else args.scoring_repeats
        args.routing_repeats = 5 if args.routing_repeats is None else args.routing_repeats
        args.breakdown_rounds = 1 if args.breakdown_rounds is None else args.breakdown_rounds
    args.models = [m.strip() for m in args.models.split(',') if m.strip()]
    for m in args.models:
        if m not in ARCHS:
            p.error(f'unknown model {m!r}; choose from {", ".join(ARCHS)}')
    if args.compile_models is None:
        args.compile_models = args.models[0] if cpu else ','.join(args.models)
    args.compile_models = [m.strip() for m in args.compile_models.split(',') if m.strip()]
    args.rates = [float(r) for r in args.rates.split(',') if r.strip()]
    if any(not 0.0 < r < 1.0 for r in args.rates):
        p.error('--rates must lie in (0, 1)')
    args.repeats = args.repeats or (15 if cpu else 30)
    args.warmup = (1 if cpu else 10) if args.warmup is None else args.warmup
    args.dtype = args.dtype or ('fp32' if cpu else 'fp16')
    if args.sweep_batch_sizes is None:
        args.sweep_batch_sizes = '1,8,32,64' if cpu else '1,32,128,256,512'
    args.sweep_batch_sizes = [int(b) for b in args.sweep_batch_sizes.split(',') if b.strip()]
    if args.sweep_rates is None:
        args.sweep_rates = '0,0.1,0.2,0.3,0.4,0.5,0.6,0.7'
    args.sweep_rates = [float(r) for r in args.sweep_rates.split(',') if r.strip()]
    args.scoring_repeats = 3 if args.scoring_repeats is None else args.scoring_repeats
    args.routing_repeats = 60 if args.routing_repeats is None else args.routing_repeats
    if args.breakdown_rounds is not None and args.breakdown_rounds < 0:
        p.error('--breakdown-rounds must be 0 or more')
    if args.breakdown_rounds is None:
        args.breakdown_rounds = 3 if cpu else 0
    elif args.breakdown_rounds and not cpu:
        p.error('--breakdown-rounds: the time-by-family breakdown reads CPU op times; on a GPU use 0 '
                '(or torch.profiler with CUDA activities)')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device is available')
    args.json = args.json or os.path.join(ROOT, 'benchmarks', 'results', f'{args.device}.json')
    args.markdown = args.markdown or os.path.splitext(args.json)[0] + '.md'
    return args


def main(argv=None) -> Dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configure_dynamo()
    dtype = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}[args.dtype]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    started = time.perf_counter()
    malloc = steady_allocator() if args.malloc == 'steady' else 'default'
    results = {'machine': dict(machine_info(device), malloc=malloc),
               'command': ' '.join(['python benchmarks/model_zoo.py'] + (sys.argv[1:] if argv is None else argv)),
               'settings': {k: v for k, v in vars(args).items() if k not in ('json', 'markdown')},
               'mask_source': ('Taylor attention scores of the random-init model on 2 random-noise batches, '
                               'global budget (pruning.plan_masks)' if args.masks == 'taylor'
                               else 'pruning.random_masks (seeded)'),
               'boolean_mask_row': 're-implementation of the original research code\'s per-block boolean '
                                   'indexing + torch.cat (BooleanMaskViT in benchmarks/model_zoo.py)',
               'models': {}, 'sweeps': {}}
    print(f'Machine: {results["machine"]}', flush=True)
    for arch in args.models:
        results['models'][arch] = bench_model(arch, args, device, dtype, autocast)
    sweep_arch = args.models[0]
    sweep_batch = args.batch_size or DEFAULT_BATCH[device.type][sweep_arch]
    if args.sweep_batch_sizes:
        results['sweeps']['batch'] = {
            'model': ARCHS[sweep_arch][0], 'short': ARCHS[sweep_arch][1], 'prune_rate': args.rates[0],
            'rows': batch_sweep(sweep_arch, args.rates[0], args.sweep_batch_sizes, args, device, dtype, autocast)}
    if args.sweep_rates:
        results['sweeps']['rate'] = {
            'model': ARCHS[sweep_arch][0], 'short': ARCHS[sweep_arch][1], 'batch_size': sweep_batch,
            'rows': rate_sweep(sweep_arch, args.sweep_rates, sweep_batch, args, device, dtype, autocast)}
    results['targets'] = targets(results, device)
    results['seconds'] = time.perf_counter() - started
    if hasattr(os, 'getloadavg'):
        results['machine']['load_average_at_end'] = list(os.getloadavg())
    text = markdown(results)
    print('\n' + text, flush=True)
    for path, content in ((args.json, json.dumps(results, indent=2)), (args.markdown, text)):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            f.write(content + ('\n' if not content.endswith('\n') else ''))
    met = sum(t['met'] for t in results['targets'])
    print(f'{met} of {len(results["targets"])} targets met; wrote {args.json} and {args.markdown} '
          f'({results["seconds"]:.0f} s)', flush=True)
    return results


if __name__ == '__main__':
    main()
