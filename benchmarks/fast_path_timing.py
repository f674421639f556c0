#!/usr/bin/env python
"""Time the fast inference path (models/fast_path.py) against timm and our eager pruned model, on one device.

For each section (a model at one batch size; in this order: DeiT-Ti at batch 256, 32 and 1, DeiT-B at 128,
DeiT-S at 256), these rows run on the *same seeded random weights* (throughput does not depend on their
values) and are timed interleaved in one process with ``engine.time_interleaved`` (rows take turns, the
starting row rotates every round, every pass synchronised; median of the rounds):

* ``timm eager``: timm's dense ``deit_*_patch16_224`` (autocast fp16 on CUDA, fp32 on CPU);
* ``timm compiled``: the same under ``torch.compile`` (optional, within a compile-time budget, and only at
  batch >= 128 by default);
* ``ours eager rr``: ``cc_deit_*`` with the masks of prune rate rr applied (autocast like timm);
* ``fast <backend>[+graph][ res16] <masks>``: ``build_fast_path`` of the dense model and of each pruned one,
  backends ``torch`` and ``triton`` (CUDA, or the CPU interpreter), with and without a CUDA graph, the Triton
  one also with an fp16 residual stream; ``compile`` for the dense model and the first rate with
  ``--compile all``.  Fast rows are built with fp16 weights on CUDA (fp32 on CPU).

Masks: ``pruning.random_masks`` (the random baseline: exactly int(196 * 12 * rate) (layer, patch) slots clipped,
uniformly, seeded by the rate), so per-block kept counts vary around 197 * (1 - rate), as in a real plan.

For every pruned row: images/s, its speed-up against timm eager and against the fastest dense row of the
section (paired per round: the median of the per-round ratios), the FLOPs ratio (``models.count_macs`` dense
over pruned), and the speed-up as a fraction of that ratio.  Targets: the fastest pruned row of each rate
against the fastest dense row reaches >= 0.9x the FLOPs ratio at batch 256 (128 for DeiT-B) and >= 1.0x at
batch 1 and 32.  Every row's logits on the timed batch are compared with the fp32 eager model with the same
masks: max |logit difference| and top-1 agreement (random-init logits lie close together, so near-ties make
top-1 agreement an underestimate; the logit spread is reported beside it).

Writes ``fast_path_timing.json`` and ``fast_path_timing.md`` into ``--out`` after every section, so a run cut
short by a time limit keeps what it measured.  A row that fails to build or run is recorded with its error
and left out; the others go on.

    python benchmarks/fast_path_timing.py --device cuda --out runs/fast_path      # GPU: ~3-4 min
    python benchmarks/fast_path_timing.py --device cpu --quick --out /tmp/fp       # smoke run, seconds
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import engine  # noqa: E402
import models  # noqa: E402,F401  (registers cc_deit_*)
import pruning  # noqa: E402
from models import fast_kernels  # noqa: E402
from models.fast_path import build_fast_path  # noqa: E402

ARCHS = {'tiny': ('deit_tiny_patch16_224', 'Ti'), 'small': ('deit_small_patch16_224', 'S'),
         'base': ('deit_base_patch16_224', 'B')}
# (arch, batch) in the order they run on a GPU: the headline sections first, in case time runs out.
GPU_SECTIONS = [('tiny', 256), ('tiny', 32), ('tiny', 1), ('base', 128), ('small', 256)]
# --quick: a DeiT-shaped model small enough for seconds on a CPU (and for the Triton interpreter).
QUICK_MODEL = dict(embed_dim=64, depth=3, num_heads=2, img_size=32, patch_size=8, num_classes=10)
QUICK_SECTIONS = [('tiny', 4)]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cpu', 'cuda'])
    p.add_argument('--quick', action='store_true', help='tiny model, one rate, few rounds: a smoke run')
    p.add_argument('--sections', default=None,
                   help='comma-separated arch:batch, e.g. tiny:256,base:128 (default: all GPU sections)')
    p.add_argument('--rates', default='0.25,0.30,0.40')
    p.add_argument('--repeats', type=int, default=None, help='timed rounds (default 25; --quick 3)')
    p.add_argument('--warmup', type=int, default=None, help='untimed rounds first (default 5; --quick 1)')
    p.add_argument('--compile', default=None, choices=['none', 'timm', 'all'],
                   help="torch.compile rows: none, timm's dense model, or also our 'compile' backend "
                        '(default: timm on CUDA, none on CPU)')
    p.add_argument('--compile-budget', type=float, default=120.0,
                   help='seconds of compilation after which no further model is compiled')
    p.add_argument('--compile-min-batch', type=int, default=128,
                   help='compile rows only in sections of at least this batch size (at small batches the '
                        'CUDA-graph rows are the fast dense ones, and each new batch size recompiles)')
    p.add_argument('--time-limit', type=float, default=float('inf'),
                   help='seconds after which no further section starts (what ran is written)')
    p.add_argument('--no-graphs', action='store_true', help='leave out the CUDA-graph rows')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=os.path.join(ROOT, 'runs', 'fast_path'))
    args = p.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(',')] if not args.quick else [0.3]
    args.repeats = args.repeats or (3 if args.quick else 25)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    if args.compile is None:
        args.compile = 'timm' if args.device == 'cuda' and not args.quick else 'none'
    if args.sections:
        args.sections = [(s.split(':')[0], int(s.split(':')[1])) for s in args.sections.split(',')]
        for arch, _ in args.sections:
            if arch not in ARCHS:
                p.error(f'unknown arch {arch!r}; choose from {", ".join(ARCHS)}')
    else:
        args.sections = QUICK_SECTIONS if args.quick else GPU_SECTIONS
    return args


# ----------------------------------------------------------------------------------------------------------------
# models

def seeded_pair(arch: str, seed: int, quick: bool, device: torch.device):
    """Our model with all masks True (seeded random init) and timm's dense twin with the same weights."""
    name = ARCHS[arch][0]
    kwargs = QUICK_MODEL if quick else {}
    torch.manual_seed(seed)
    cc = models.create_model(name, **kwargs).to(device).eval()
    dense = timm.create_model(name, **kwargs)
    dense.load_state_dict({k: v for k, v in cc.state_dict().items() if not k.endswith(models.MASK_KEY)})
    return cc, dense.to(device).eval()


def pruned_copy(cc: nn.Module, rate: float, seed: int) -> nn.Module:
    """A copy of ``cc`` with ``pruning.random_masks`` at ``rate`` (seeded by seed and rate) applied."""
    model = copy.deepcopy(cc)
    depth, num_patches = len(model.blocks), model.num_tokens - model.num_prefix_tokens
    g = torch.Generator().manual_seed(seed * 1000 + round(rate * 100))
    pruning.apply_masks(model, pruning.random_masks(depth, num_patches, rate, generator=g))
    return model.eval()


def rate_tag(rate: float) -> str:
    return f'{round(rate * 100):02d}'


class Row:
    """One timed thing: its label, what it is, the callable, and what the report says about it."""

    def __init__(self, label: str, kind: str, masks: str, run: Callable, **info):
        self.label, self.kind, self.masks, self.run, self.info = label, kind, masks, run, info


# ----------------------------------------------------------------------------------------------------------------
# measuring

def accuracy(run: Callable, reference: torch.Tensor, x: torch.Tensor, autocast_dtype) -> Dict:
    """max |logit - fp32 eager| and top-1 agreement of one call of ``run`` on ``x`` (under the timing's
    autocast, as it is timed)."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = run(x).float()
    return {'max_abs_diff': (out - reference).abs().max().item(),
            'top1_agreement': (out.argmax(1) == reference.argmax(1)).float().mean().item()}


def paired_ratio(slow: List[float], fast: List[float]) -> float:
    """Median over rounds of slow/fast pass time (the two passes of a round ran back to back)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


class CompileBudget:
    def __init__(self, seconds: float):
        self.left = seconds

    def allows(self) -> bool:
        return self.left > 0

    def spend(self, seconds: float) -> None:
        self.left -= seconds


def compiled(model: nn.Module, x: torch.Tensor, autocast_dtype, budget: CompileBudget):
    """torch.compile(model) compiled by a first call under the timing's autocast; None past the budget."""
    if not budget.allows():
        return None, None
    start = time.perf_counter()
    fn = torch.compile(model)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        fn(x)
    engine.synchronize(x.device)
    seconds = time.perf_counter() - start
    budget.spend(seconds)
    return fn, seconds


def fast_variants(device: torch.device, compile_ours: bool, graphs: bool) -> List[Dict]:
    """The build_fast_path configurations timed for each mask set."""
    dtype = torch.float16 if device.type == 'cuda' else None
    triton_ok = fast_kernels.triton_runs_on(torch.empty(0, device=device))
    out = [dict(backend='torch', dtype=dtype)]
    if triton_ok:
        out.append(dict(backend='triton', dtype=dtype))
    if device.type == 'cuda' and graphs:
        out.append(dict(backend='torch', dtype=dtype, cuda_graph=True))
        if triton_ok:
            out.append(dict(backend='triton', dtype=dtype, cuda_graph=True))
            out.append(dict(backend='triton', dtype=dtype, cuda_graph=True, residual_dtype=torch.float16))
    if compile_ours:
        out.append(dict(backend='compile', dtype=dtype, cuda_graph=device.type == 'cuda' and graphs))
    return out


def variant_label(v: Dict) -> str:
    return (f'fast {v["backend"]}' + ('+graph' if v.get('cuda_graph') else '')
            + (' res16' if v.get('residual_dtype') == torch.float16 else ''))


def bench_section(arch: str, batch: int, args, device: torch.device, budget: CompileBudget,
                  errors: List[str]) -> Dict:
    short = ARCHS[arch][1]
    autocast_dtype = torch.float16 if device.type == 'cuda' else None
    print(f'\n== DeiT-{short}{" (quick)" if args.quick else ""}: batch {batch}, {device}, '
          f'{args.repeats} rounds after {args.warmup} warm-up ==', flush=True)
    torch._dynamo.reset()
    cc, timm_dense = seeded_pair(arch, args.seed, args.quick, device)
    size = cc.patch_embed.img_size[0]
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    dense_macs = models.count_macs(cc)
    masked = [('dense', cc)] + [(rate_tag(r), pruned_copy(cc, r, args.seed)) for r in args.rates]
    with torch.no_grad():
        references = {tag: m(x).float() for tag, m in masked}  # fp32 eager logits per mask set
    macs = {tag: models.count_macs(m) for tag, m in masked}

    rows: List[Row] = [Row('timm eager', 'timm', 'dense', timm_dense)]
    compile_here = args.compile in ('timm', 'all') and batch >= args.compile_min_batch
    if args.compile in ('timm', 'all') and not compile_here:
        errors.append(f'DeiT-{short} b{batch}: compiled rows left out (batch < --compile-min-batch)')
    if compile_here:
        try:
            fn, seconds = compiled(timm_dense, x, autocast_dtype, budget)
            if fn is None:
                errors.append(f'DeiT-{short} b{batch}: timm compiled left out (compile budget spent)')
            else:
                rows.append(Row('timm compiled', 'timm-compiled', 'dense', fn, build_s=seconds))
        except Exception as e:  # noqa: BLE001  (a failing row is reported, the others still run)
            errors.append(f'DeiT-{short} b{batch}: timm compiled: {type(e).__name__}: {e}')
    for tag, model in masked[1:]:
        rows.append(Row(f'ours eager {tag}', 'ours-eager', tag, model))
    for i, (tag, model) in enumerate(masked):
        compile_ours = compile_here and args.compile == 'all' and i <= 1
        for v in fast_variants(device, compile_ours, not args.no_graphs):
            label = f'{variant_label(v)} {tag}'
            if v['backend'] == 'compile' and not budget.allows():
                errors.append(f'DeiT-{short} b{batch}: {label} left out (compile budget spent)')
                continue
            try:
                start = time.perf_counter()
                fast = build_fast_path(model, batch_size=batch, **v)
                if v['backend'] == 'compile' and not v.get('cuda_graph'):
                    fast(x)  # compile now, not in the warm-up
                engine.synchronize(device)
                seconds = time.perf_counter() - start
                if v['backend'] == 'compile':
                    budget.spend(seconds)
                rows.append(Row(label, 'fast', tag, fast, build_s=seconds, built=fast.describe()))
            except Exception as e:  # noqa: BLE001
                errors.append(f'DeiT-{short} b{batch}: {label}: {type(e).__name__}: {e}')
                traceback.print_exc()

    result_rows = []
    for row in list(rows):
        try:
            row.info.update(accuracy(row.run, references[row.masks], x, autocast_dtype))
        except Exception as e:  # noqa: BLE001
            errors.append(f'DeiT-{short} b{batch}: {row.label} failed to run: {type(e).__name__}: {e}')
            rows.remove(row)
    with torch.no_grad():
        seconds = engine.time_interleaved({r.label: r.run for r in rows}, x, device, args.repeats, args.warmup,
                                          autocast_dtype)
    dense_rows = [r for r in rows if r.masks == 'dense']
    fastest_dense = min(dense_rows, key=lambda r: statistics.median(seconds[r.label]))
    timm_s = seconds['timm eager']
    for r in rows:
        t = seconds[r.label]
        out = {'label': r.label, 'kind': r.kind, 'masks': r.masks, 'ms': 1e3 * statistics.median(t),
               'ms_range': [1e3 * min(t), 1e3 * max(t)], 'images_per_s': batch / statistics.median(t),
               'speedup_vs_timm_eager': paired_ratio(timm_s, t),
               'speedup_vs_fastest_dense': paired_ratio(seconds[fastest_dense.label], t),
               'flops_ratio': dense_macs / macs[r.masks], 'gmacs': macs[r.masks] / 1e9, **r.info}
        out['fraction_of_flops_ratio'] = out['speedup_vs_fastest_dense'] / out['flops_ratio']
        result_rows.append(out)
    target = 0.9 if batch >= 128 else 1.0
    summary = []
    for tag, _ in masked[1:]:
        pruned = [r for r in result_rows if r['masks'] == tag]
        best = min(pruned, key=lambda r: r['ms'])
        summary.append({'masks': tag, 'fastest_pruned': best['label'], 'fastest_dense': fastest_dense.label,
                        'speedup': best['speedup_vs_fastest_dense'], 'flops_ratio': best['flops_ratio'],
                        'fraction_of_flops_ratio': best['fraction_of_flops_ratio'], 'target': target,
                        'met': best['fraction_of_flops_ratio'] >= target})
    section = {'arch': arch, 'short': short, 'batch_size': batch, 'quick': args.quick,
               'kept_counts': {tag: models.kept_token_counts(m) for tag, m in masked},
               'logit_std': references['dense'].std().item(), 'fastest_dense': fastest_dense.label,
               'rows': result_rows, 'targets': summary}
    del rows, masked, cc, timm_dense
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return section


# ----------------------------------------------------------------------------------------------------------------
# report

def machine_info(device: torch.device) -> Dict:
    info = {'device': str(device), 'torch': torch.__version__, 'timm': timm.__version__,
            'python': platform.python_version(), 'cpu_cores': os.cpu_count(),
            'triton': getattr(fast_kernels.triton, '__version__', None),
            'triton_interpreter': fast_kernels.INTERPRETER}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    return info


def markdown(results: Dict) -> str:
    m = results['machine']
    lines = [f'Fast path timing on {m.get("gpu", m["device"])}, torch {m["torch"]}, triton {m["triton"]}, '
             f'timm {m["timm"]}; {results["settings"]["dtype"]}; median of {results["settings"]["repeats"]} '
             'interleaved rounds; speed-ups are medians of per-round ratios.', '']
    for s in results['sections']:
        lines += [f'### DeiT-{s["short"]}{" (quick model)" if s["quick"] else ""}, batch {s["batch_size"]}', '',
                  f'Fastest dense row: {s["fastest_dense"]}. Logit std (fp32, dense) {s["logit_std"]:.3g}.', '',
                  '| row | masks | ms | images/s | vs timm eager | vs fastest dense | FLOPs ratio | fraction of '
                  'FLOPs ratio | max abs logit diff | top-1 agreement | attention (kept count: kernel) '
                  '| MLP fc1+GELU | MLP fc2+residual |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
        for r in s['rows']:
            built = r.get('built', {})
            att = ', '.join(f'{n}:{a}' for n, a in built.get('attention', {}).items())
            mlp, fc2 = (', '.join(sorted(set(built.get(key, {}).values()))) or '–' for key in ('mlp', 'fc2'))
            lines.append(f'| {r["label"]} | {r["masks"]} | {r["ms"]:.3f} | {r["images_per_s"]:.0f} '
                         f'| {r["speedup_vs_timm_eager"]:.2f} | {r["speedup_vs_fastest_dense"]:.2f} '
                         f'| {r["flops_ratio"]:.2f} | {r["fraction_of_flops_ratio"]:.2f} '
                         f'| {r["max_abs_diff"]:.2e} | {r["top1_agreement"]:.3f} | {att or "–"} | {mlp} | {fc2} |')
        lines += ['', '| prune rate | fastest pruned | fastest dense | speed-up | FLOPs ratio | fraction | target '
                      '| met |', '|---|---|---|---|---|---|---|---|']
        for t in s['targets']:
            lines.append(f'| {t["masks"]} | {t["fastest_pruned"]} | {t["fastest_dense"]} | {t["speedup"]:.2f} '
                         f'| {t["flops_ratio"]:.2f} | {t["fraction_of_flops_ratio"]:.2f} | >= {t["target"]} '
                         f'| {"yes" if t["met"] else "**NO**"} |')
        lines.append('')
    if results['errors']:
        lines += ['Left out or failed:', ''] + [f'- {e}' for e in results['errors']] + ['']
    return '\n'.join(lines)


def write(results: Dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'fast_path_timing.json'), 'w') as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, 'fast_path_timing.md'), 'w') as f:
        f.write(markdown(results))


def configure_dynamo() -> None:
    """Several models of one class are compiled in one process (one per section): allow the recompiles."""
    cfg = torch._dynamo.config
    for name in ('recompile_limit', 'cache_size_limit'):
        if hasattr(cfg, name):
            setattr(cfg, name, 64)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device here')
    configure_dynamo()
    results = {'machine': machine_info(device),
               'settings': {'dtype': 'fp16 (autocast for eager rows, fp16 weights for fast rows)'
                            if device.type == 'cuda' else 'fp32', 'repeats': args.repeats, 'warmup': args.warmup,
                            'rates': args.rates, 'masks': 'pruning.random_masks, seeded per rate',
                            'compile': args.compile, 'compile_budget_s': args.compile_budget, 'quick': args.quick},
               'sections': [], 'errors': []}
    budget = CompileBudget(args.compile_budget)
    for arch, batch in args.sections:
        elapsed = time.perf_counter() - start
        if elapsed > args.time_limit:
            results['errors'].append(f'DeiT-{ARCHS[arch][1]} b{batch}: left out (time limit {args.time_limit:.0f} s '
                                     f'reached after {elapsed:.0f} s)')
            continue
        try:
            results['sections'].append(bench_section(arch, batch, args, device, budget, results['errors']))
        except Exception as e:  # noqa: BLE001  (one failing section must not lose the others)
            traceback.print_exc()
            results['errors'].append(f'DeiT-{ARCHS[arch][1]} b{batch}: section failed: {type(e).__name__}: {e}')
        results['elapsed_s'] = time.perf_counter() - start
        write(results, args.out)
        print(markdown({**results, 'sections': results['sections'][-1:]}), flush=True)
    write(results, args.out)
    print(f'wrote {os.path.join(args.out, "fast_path_timing.json")} and .md ({results["elapsed_s"]:.0f} s)'
          if 'elapsed_s' in results else 'nothing measured', flush=True)
    return results


if __name__ == '__main__':
    main()
