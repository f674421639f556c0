"""The benchmark's report: the summary of the fastest modes, the targets and their verdicts, Markdown tables.

Everything here works on the results dictionary (the JSON the benchmark writes), so a saved
``benchmarks/results/<device>.json`` can be summarised again without running anything.
``python -m benchmarks.report`` (or ``python benchmarks/report.py``) prints the README's speed table from the
committed results (a test checks that the README holds exactly that table).
"""
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

# Run by path (python benchmarks/report.py) as well as with -m: the repository root is where `benchmarks` is found.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import shapes  # noqa: E402
from benchmarks.shapes import SUMMARY_BATCHES, SUMMARY_FIGURES  # noqa: E402
from benchmarks.stats import NO_RATIO, UNSTEADY_SPREAD, Timings, as_fields  # noqa: E402

SCORING_TARGET = 1.5          # scoring one batch <= 1.5x a plain training step
SUMMARY_FLOPS_SHARE = 0.9     # fastest pruned over fastest dense >= 0.9 x the FLOPs ratio
# ... and >= 1.0 at each of SUMMARY_BATCHES, batch 1 and 32 (in shapes.py: the summary's figures are named after them)
TOP1_SHARE = 0.99             # top-1 = the eager fp32 model's on >= 99% of the images with a clear margin
PROTOCOLS = {
    'ours': 'interleaved: the rows take turns in rounds, the starting row rotating, every pass synchronised, '
            'under torch.no_grad and the run\'s autocast precision; images/s = batch / median pass time; a '
            'speed-up is the median of per-round ratios, with a 95% CI',
    'original': 'the original code\'s: torch.rand(batch, 3, H, W), fp32, autograd on (no torch.no_grad), '
                'cudnn.benchmark on, TF32 allowed on CUDA; each row alone, one after another: 3 runs of {passes} '
                'passes back to back, each from one synchronisation to the next, the last run\'s mean the figure '
                '(the first two are the warm-up, as the original\'s three calls); a speed-up is a ratio of means, '
                'with no interval',
}


def fmt(v, spec='.2f', none='–'):
    return none if v is None else format(v, spec)


def fmt_ratio(value: Optional[float], ci: Optional[List[float]] = None, spec: str = '.2f') -> str:
    """The one format of a ratio: '1.33', or '1.33 (1.23–1.36)' with its confidence interval."""
    if value is None:
        return '–'
    return f'{value:{spec}}' + (f' ({ci[0]:{spec}}–{ci[1]:{spec}})' if ci else '')


def protocol_line(protocol: str, settings: Dict) -> str:
    return f'Protocol "{protocol}": ' + PROTOCOLS[protocol].format(passes=settings.get('original_passes'))


def model_name(row: Dict) -> str:
    """'C&C-Ti-25' from the row label 'C&C-Ti-25 (ours)'."""
    return row['label'].partition(' (')[0]


# ----------------------------------------------------------------------------------------------------------------
# summary: the fastest pruned mode against the fastest dense mode

REFERENCE_KINDS = ('timm', 'ours')  # the eager models: their own error is the logit checks' scale, not judged


def check_failure(check: Optional[Dict]) -> Optional[str]:
    """Why a row's logit check (benchmarks.formulations.logit_check) failed; None if it passed or was not taken."""
    if not check:
        return None
    if not math.isfinite(check['tolerance']):
        return 'no finite tolerance: the eager model\'s own error at this precision is not finite'
    if not check['within_tolerance']:
        return f'logits off: max |difference| {check["max_abs_diff"]:.2e} > tolerance {check["tolerance"]:.2e}'
    if check.get('top1_ok') is False:
        return f'top-1 differs on {1 - check["top1_agreement_clear"]:.1%} of the clear-margin images'
    return None


def _comparison(t: Timings, pruned: List[str], dense: List[str], checks: Dict[str, Dict], kind: Dict[str, str],
                not_timed: Dict[str, str]):
    """(fastest pruned key, fastest dense key, their paired ratio or None, what was compared) among the rows whose
    pass times are a measurement (benchmarks.stats.Timings.problem) and whose logit check did not fail: a fast but
    wrong row takes no part in a speed verdict.  "Fastest" is the most images/s (the median pass); the ratio is
    the median of the per-round ratios of those two rows.  The dense rows the run asked for that are not in the
    comparison, not timed (``not_timed``) or excluded, are ``dense_not_compared`` (row key -> why): a verdict
    against the others is no verdict against the fastest dense.  But not a dense row excluded by its logit check
    whose passes were timed clearly slower than the fastest dense row compared (the 95% interval of their per-round
    ratio wholly above 1): it was not the fastest dense mode of the run, right or wrong, so it decides nothing
    (it stays in ``excluded``, with its ratio)."""
    untimed = {k: why for k in pruned + dense for why in [t.problem(k)] if why}
    failed = {k: why for k in pruned + dense if k not in untimed and kind[k] not in REFERENCE_KINDS
              for why in [check_failure(checks.get(k))] if why}
    excluded = {**untimed, **failed}
    ok_p, ok_d = [k for k in pruned if k not in excluded], [k for k in dense if k not in excluded]
    best_p, best_d = t.fastest(ok_p), t.fastest(ok_d)
    ratio = t.ratio(best_p, best_d) if best_p and best_d else None
    slower = {k: r for k in dense if k in failed and best_d
              for r in [t.ratio(best_d, k)] if r['ci'] is not None and r['ci'][0] > 1}
    compared = {'pruned_modes': [kind[k] for k in ok_p], 'dense_modes': [kind[k] for k in ok_d]}
    if excluded:
        compared['excluded'] = {
            kind[k]: why + (f'; timed {r["median"]:.2f}x slower than {kind[best_d]} (95% CI {r["ci"][0]:.2f}-'
                            f'{r["ci"][1]:.2f}), so not the fastest dense mode' if (r := slower.get(k)) else '')
            for k, why in excluded.items()}
    missing = {**not_timed, **{k: untimed[k] for k in dense if k in untimed},
               **{k: f'logit check failed: {failed[k]}' for k in dense if k in failed and k not in slower}}
    if missing:
        compared['dense_not_compared'] = missing
    return best_p, best_d, ratio, compared


# The key of a pruned row ends in its prune-rate tag (benchmarks.formulations.Formulation.key: 'fast_triton_25'),
# a dense row's does not ('timm_compiled'); how report reads "Rows left out" without the registry.
PRUNED_ROW_KEY = re.compile(r'.+_\d{2,}')


def _dense_not_timed(skipped: Dict[str, str]) -> Dict[str, str]:
    """The dense rows among those a section left out (``skipped_rows``: key -> why)."""
    return {k: why for k, why in skipped.items() if not PRUNED_ROW_KEY.fullmatch(k)}


def _expected_batches(results: Dict) -> List[int]:
    """The summary batch sizes the run was asked for (SUMMARY_BATCHES among --summary-batch-sizes); for results
    that do not record the setting, those that ran."""
    asked = results.get('settings', {}).get('summary_batch_sizes')
    if asked is None:
        asked = [b['batch_size'] for res in results['models'].values()
                 for b in res.get('summary_sweep', {}).get('batches', [])]
    return [bs for bs in SUMMARY_BATCHES if bs in asked]


def _section_state(results: Dict, model: Optional[str], kind: str, batch: Optional[int] = None) -> str:
    """Why a planned section has no figures: its status and reason in results['sections'] ('not run' if none)."""
    for rec in results.get('sections', []):
        if rec.get('model') == model and rec.get('kind') == kind and (batch is None or rec['batch_size'] == batch):
            return rec['status'] + (f': {rec["reason"]}' if rec.get('reason') else '')
    return 'not run'


def summary(results: Dict) -> List[Dict]:
    """One entry per pruned model the run planned (``results['pruned_models']``; per pruned row of the main table
    for results that do not record it): the fastest pruned mode over the fastest dense mode of the same run
    (timm eager, timm compiled or any dense formulation, among the rows whose logit check passed), over timm
    eager, and, from the summary sweep when it ran, at other batch sizes (``speedup_batch1``/``speedup_batch32``:
    None when that batch size was not swept).  An entry whose main table did not run has None figures and says
    why (``not_run``), so a run cut short never reads as complete."""
    out = []
    for section_model, res in results['models'].items():
        rows = res['rows']
        kind = {r['key']: r['kind'] for r in rows}
        protocol = rows[0].get('protocol', 'ours')
        t = Timings({r['key']: r['seconds'] for r in rows}, res['batch_size'], paired=protocol == 'ours')
        dense = [r['key'] for r in rows if r.get('dense', r['kind'].startswith('timm'))]
        sweep = res.get('summary_sweep', {}).get('batches', [])
        rates = list(dict.fromkeys(r['prune_rate'] for r in rows if r['key'] not in dense))
        left_out = _dense_not_timed(res.get('skipped_rows', {}))  # dense rows the main table never built
        for rate in rates:
            pruned = [r['key'] for r in rows if r['key'] not in dense and r['prune_rate'] == rate]
            best_p, best_d, vs_dense, compared = _comparison(t, pruned, dense, res.get('checks', {}), kind,
                                                             left_out)
            first = next(r for r in rows if r['key'] == pruned[0])
            entry = {'model': model_name(first), 'timm_model': res['model'], 'prune_rate': rate,
                     'section_model': section_model, 'batch_size': res['batch_size'], 'protocol': protocol,
                     'flops_ratio': first['flops_ratio'], 'best_pruned_mode': kind.get(best_p),
                     'best_dense_mode': kind.get(best_d),
                     **as_fields('speedup_vs_best_dense', vs_dense or NO_RATIO),
                     **as_fields('speedup_vs_timm_eager', t.ratio(best_p, 'timm') if best_p else NO_RATIO),
                     **compared}
            by_batch = {}
            for b in sweep:
                tb = Timings(b['seconds'], b['batch_size'])
                # a row built again at this batch was checked again; one reused as it was keeps its main check
                checks = {**res.get('checks', {}), **b.get('checks', {})}
                # the main table's dense rows not timed here, and those it left out itself (never built, so never
                # built again)
                not_timed = {**left_out, **{k: 'not timed at this batch size' for k in dense if k not in b['seconds']},
                             **_dense_not_timed(b.get('skipped_rows', {}))}
                p, d, r, cmp = _comparison(tb, [k for k in pruned if k in b['seconds']],
                                           [k for k in dense if k in b['seconds']], checks, kind, not_timed)
                by_batch[str(b['batch_size'])] = {
                    'speedup': r and r['median'], 'ci': r and r['ci'], 'best_pruned_mode': kind.get(p),
                    'best_dense_mode': kind.get(d), 'protocol': 'ours', **cmp}
            entry['speedup_by_batch'] = by_batch
            for bs in SUMMARY_BATCHES:
                entry[f'speedup_batch{bs}'] = by_batch[str(bs)]['speedup'] if str(bs) in by_batch else None
            out.append(entry)
    done = {e['model'] for e in out}
    for plan in results.get('pruned_models', []):
        if plan['model'] not in done:
            out.append({**plan, 'batch_size': None, 'protocol': None, 'flops_ratio': None, 'best_pruned_mode': None,
                        'best_dense_mode': None, **as_fields('speedup_vs_best_dense', NO_RATIO),
                        **as_fields('speedup_vs_timm_eager', NO_RATIO), 'speedup_by_batch': {},
                        **{f'speedup_batch{bs}': None for bs in SUMMARY_BATCHES},
                        'not_run': 'main table ' + _section_state(results, plan['section_model'], 'main')})
    order = {p['model']: i for i, p in enumerate(results.get('pruned_models', []))}
    return sorted(out, key=lambda e: order.get(e['model'], len(order)))


# ----------------------------------------------------------------------------------------------------------------
# targets

def _target(name: str, value: Optional[float], threshold: Optional[float], at_least: bool, ci=None,
            missing: Optional[str] = None, not_compared: Optional[Dict[str, str]] = None,
            paired: bool = False) -> Dict:
    """A target verdict on a median; ``ci`` is its 95% confidence interval, to tell a miss from noise: the
    verdict is 'yes' or 'no' when every value of the interval, its ends included, meets the target or every one
    misses it, 'within noise' otherwise.
    ``paired``: the value is a median of per-round ratios, so without an interval (too few rounds for a 95% one,
    benchmarks.stats.median_ci) the verdict is 'within noise' too; other values (a ratio of means, a logit
    check) have none by nature.
    A target that could not be measured (``value`` None, or NaN) has ``met`` None and says why (``missing``); an
    interval with a NaN end decides nothing.
    ``not_compared``: for a comparison against the fastest dense mode, the dense rows left out of it (key -> why);
    then the value is only an upper bound, so a value on the good side of the threshold is no verdict (``met``
    None, the value kept), and one on the bad side stays a miss."""
    if value is None or threshold is None or math.isnan(value):
        return {'target': name, 'value': None, 'threshold': threshold, 'met': None,
                'missing': (missing or 'not measured') if value is None or threshold is None else 'not a number'}
    def meets(v):
        return v >= threshold if at_least else v <= threshold

    met = meets(value)
    if met and not_compared:
        return {'target': name, 'value': value, 'threshold': threshold, 'met': None, 'ci': ci,
                'missing': 'ahead of the dense modes timed, but not compared with '
                           + '; '.join(f'{k} ({why})' for k, why in not_compared.items())}
    out = {'target': name, 'value': value, 'threshold': threshold, 'met': met}
    if ci is not None:
        out['ci'] = ci
        # decided when the whole (closed) interval is on one side: an end on the threshold meets the target
        out['decided'] = meets(ci[0]) == meets(ci[1]) and not (math.isnan(ci[0]) or math.isnan(ci[1]))
    elif paired:
        out['decided'] = False
    return out


def verdict(target: Dict) -> str:
    if target['met'] is None:
        return f'not measured ({target["missing"]})'
    if target.get('decided', True):
        return 'yes' if target['met'] else '**NO**'
    return 'yes, within noise' if target['met'] else 'no, within noise'


def count_targets(targets: List[Dict]) -> str:
    """'N of M targets met', with how many of the N are met only within noise (the median meets the target, its
    interval does not) and how many of the M could not be measured."""
    met = [t for t in targets if t['met'] is True]
    noisy = sum(not t.get('decided', True) for t in met)
    missing = sum(t['met'] is None for t in targets)
    return (f'{len(met)} of {len(targets)} targets met' + (f' ({noisy} of them within noise)' if noisy else '')
            + (f', {missing} not measured' if missing else ''))


def summary_targets(entry: Dict, device: str, batches: List[int], results: Optional[Dict] = None
                    ) -> Dict[str, Dict]:
    """The summary's targets for one entry: 'vs_best_dense', and 'batch1'/'batch32' for the batch sizes the run
    was asked for (``batches``); one that could not be measured is there too, unmet, saying why."""
    name = entry['model']
    not_run = entry.get('not_run')
    no_correct_row = 'no pruned or no dense row with pass times that are a measurement passed its logit check'
    threshold = None if entry['flops_ratio'] is None else SUMMARY_FLOPS_SHARE * entry['flops_ratio']
    out = {'vs_best_dense': _target(
        f'{name}: fastest pruned ({entry["best_pruned_mode"] or "–"}) over fastest dense '
        f'({entry["best_dense_mode"] or "–"}) '
        f'>= {SUMMARY_FLOPS_SHARE} x FLOPs ratio ({device})', entry['speedup_vs_best_dense'], threshold, True,
        entry['speedup_vs_best_dense_ci'], not_run or no_correct_row, entry.get('dense_not_compared'),
        paired=entry.get('protocol') == 'ours')}
    for bs in batches:
        b = entry['speedup_by_batch'].get(str(bs))
        if b is not None:
            why = no_correct_row
        else:
            why = not_run or f'batch {bs} ' + _section_state(results or {}, entry.get('section_model'), 'summary', bs)
        out[f'batch{bs}'] = _target(f'{name}: fastest pruned over fastest dense at batch {bs} >= 1.0 ({device})',
                                    b and b['speedup'], 1.0, True, b and b['ci'], why,
                                    b and b.get('dense_not_compared'), paired=True)
    return out


def targets(results: Dict, device: str) -> List[Dict]:
    out = []
    for res in results['models'].values():
        for row in res['rows']:
            paired = row.get('protocol', 'ours') == 'ours'  # the original protocol's ratios are of means
            if row['kind'] == 'ours':
                out.append(_target(f'{row["label"]}: speed-up over dense timm >= FLOPs ratio ({device})',
                                   row['speedup_vs_timm'], row['flops_ratio'], True, row['speedup_vs_timm_ci'],
                                   paired=paired))
            if row['kind'] in ('ours', 'ours-compiled') and 'vs_boolean' in row:
                out.append(_target(f'{row["label"]}: >= 1.0x the boolean-mask formulation',
                                   row['vs_boolean'], 1.0, True, row['vs_boolean_ci'], paired=paired))
        labels = {r['key']: r['label'] for r in res['rows']}
        kinds = {r['key']: r['kind'] for r in res['rows']}
        out += check_targets(f'{res["label"]} batch {res["batch_size"]}', res.get('checks', {}), labels, kinds)
        for b in res.get('summary_sweep', {}).get('batches', []):
            out += check_targets(f'{res["label"]} batch {b["batch_size"]}', b.get('checks', {}), labels, kinds)
        for tag, rc in res.get('routing', {}).items():
            out.append(_target(f'C&C-{res["short"]}-{tag}: token routing alone, boolean-mask time / ours',
                               rc['boolean_over_ours'], 1.0, True, rc['boolean_over_ours_ci'], paired=True))
        if 'scoring' in res:
            sc = res['scoring']
            out.append(_target(f'{res["label"]}: scoring a batch <= {SCORING_TARGET}x a training step',
                               sc['ratio'], SCORING_TARGET, False, sc['ratio_ci'], paired=True))
    for entry in results.get('summary', []):
        out += entry['targets'].values()
    return out


def check_targets(where: str, checks: Dict[str, Dict], labels: Dict[str, str], kinds: Dict[str, str]) -> List[Dict]:
    """Two targets for the rows checked in one section (the eager reference rows timm and ours aside, whose
    error is the tolerance's scale): every row's max |logit difference| from the eager fp32 model within its
    tolerance (value: the largest difference / tolerance), and top-1 equal to the eager fp32 model's on >= 99%
    of the images with a clear margin (value: the lowest such share).  See benchmarks.formulations.logit_check."""
    checked = {k: c for k, c in checks.items() if kinds.get(k) not in REFERENCE_KINDS}
    if not checked:
        return []
    def share(c):  # of the tolerance; NaN logits, and a tolerance that is not finite, count as infinitely far
        ok = math.isfinite(c['tolerance']) and not math.isnan(c['max_abs_diff'])
        return c['max_abs_diff'] / c['tolerance'] if ok else math.inf

    worst = max(checked, key=lambda k: share(checked[k]))
    c = checked[worst]
    out = [_target(f'{where}: every row\'s max |logit - eager fp32| within its tolerance (worst: '
                   f'{labels.get(worst, worst)}, {c["max_abs_diff"]:.2e} for {c["tolerance"]:.2e})',
                   share(c), 1.0, False)]
    judged = {k: c for k, c in checked.items() if c.get('top1_ok', c['top1_agreement_clear']) is not None}
    name = f'{where}: top-1 = eager fp32 on >= {TOP1_SHARE:.0%} of the images with a clear margin'
    unjudged = [k for k in checked if k not in judged]
    if unjudged:  # too few clear images for some row (formulations.MIN_CLEAR_SHARE): said, never passed
        out.append(_target(name, None, TOP1_SHARE, True, missing='; '.join(
            f'{labels.get(k, k)}: only {checked[k]["clear_images"]} of {checked[k]["images"]} images have a clear '
            f'margin' for k in unjudged)))
    elif judged:
        low = min(judged, key=lambda k: judged[k]['top1_agreement_clear'])
        c = judged[low]
        out.append(_target(f'{name} (lowest: {labels.get(low, low)}, on {c["clear_images"]} of {c["images"]} '
                           f'images; over all images {c["top1_agreement"]:.3f})', c['top1_agreement_clear'],
                           TOP1_SHARE, True))
    return out


def attach_summary(results: Dict, device: str) -> None:
    """results['summary'] (each entry with its targets and verdicts), then results['targets'], and
    results['not_measured']: the targets that could not be measured (a run cut short, a row that failed)."""
    results['summary'] = summary(results)
    batches = _expected_batches(results)
    for entry in results['summary']:
        entry['targets'] = {k: dict(t, verdict=verdict(t))
                            for k, t in summary_targets(entry, device, batches, results).items()}
    results['targets'] = targets(results, device)
    results['not_measured'] = [t['target'] for t in results['targets'] if t['met'] is None]


# ----------------------------------------------------------------------------------------------------------------
# Markdown

def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(r) + ' |' for r in rows]


def _machine(results: Dict) -> str:
    m, s = results['machine'], results['settings']
    where = m.get('gpu') or f'{m["cpu"]}, {m["cpu_cores"]} cores, {m["torch_threads"]} torch threads'
    protocol = s.get('protocol', 'ours')
    timed = (f'{s["dtype"]}, median of {s["repeats"]} interleaved passes' if protocol == 'ours' else
             f'main table fp32, the last of 3 runs of {s["original_passes"]} passes per row (original protocol); '
             f'other tables {s["dtype"]}, median of {s["repeats"]} interleaved passes')
    load = (f'; load average {m["load_average_at_start"][0]:.2f} at start, {m["load_average_at_end"][0]:.2f} at end'
            if m.get('load_average_at_start') and m.get('load_average_at_end') else '')
    return (f'Measured on {m["device"]} ({where}), torch {m["torch"]}, timm {m["timm"]}, {timed}, '
            f'allocator {m.get("malloc", "default")}{load}.')


def _main_table(results: Dict) -> List[str]:
    rows, no_twin = [], False
    for res in results['models'].values():
        for r in res['rows']:
            name, _, formulation = r['label'].partition(' (')
            speed = fmt_ratio(r.get('speedup_vs_twin', r['speedup_vs_timm']))
            if not r.get('dense', True) and 'twin' not in r:  # its dense row was not timed: against timm eager
                speed, no_twin = f'{speed} (vs timm)', True
            rows.append([name, formulation.rstrip(')'), str(res['batch_size']), f'{r["kept_tokens_mean"]:.1f}',
                         f'{r["gflops"]:.2f}', fmt(r.get('counter_gflops')), f'{r["flops_ratio"]:.2f}',
                         f'{r["images_per_s"]:.1f}', speed, fmt_ratio(r.get('vs_boolean')),
                         fmt(r.get('seed_gpu', {}).get('speedup'))])
    protocol = results['settings'].get('protocol', 'ours')
    return ([protocol_line(protocol, results['settings']), ''] + table(
        ['model', 'formulation', 'batch', 'kept tokens/block', 'GFLOPs', 'counter GFLOPs', 'FLOPs ratio',
         'images/s', 'speed-up vs dense', 'vs boolean mask', 'paper GPU speed-up'], rows)
        + ['', 'Speed-ups are timed in the same run '
               + ('(median of the per-round ratios)' if protocol == 'ours' else '(ratio of the mean pass times)')
               + ': dense rows against timm\'s dense model with the same weights (eager), pruned rows against the '
               'dense row of the same formulation (ours and the boolean mask: timm eager; ours compiled: timm '
               'compiled; a fast path: its dense build)'
               + ('; "(vs timm)": that dense row was not timed (not in --rows, or left out), so the row is against '
                  'timm eager' if no_twin else '')
               + '. GFLOPs = multiply-accumulates by the paper\'s formula (docs/method.md); "counter" = '
               'torch.utils.flop_counter / 2.'])


def _summary_table(results: Dict) -> List[str]:
    entries = results.get('summary', [])
    if not entries:
        return []
    protocol = next((e['protocol'] for e in entries if e['protocol']), 'ours')
    rows = [[e['model'], fmt(e['flops_ratio']), e['best_pruned_mode'] or '–', e['best_dense_mode'] or '–',
             fmt_ratio(e['speedup_vs_best_dense'], e['speedup_vs_best_dense_ci']),
             fmt_ratio(e['speedup_vs_timm_eager']),
             *(fmt_ratio(e[f'speedup_batch{bs}']) for bs in SUMMARY_BATCHES),
             ', '.join(f'{k}: {t["verdict"]}' for k, t in e['targets'].items())] for e in entries]
    return (['', f'Summary: the fastest pruned mode against the fastest dense mode (main table: protocol '
                 f'"{protocol}", batch as above; batch {" and ".join(map(str, SUMMARY_BATCHES))}: protocol "ours", '
                 f'summary sweep, timed in more rounds the smaller the batch (repeats x main batch / batch, at most '
                 f'10 x), "–" where not run). Targets: vs best dense >= {SUMMARY_FLOPS_SHARE} x FLOPs ratio; '
                 f'batch {" and ".join(map(str, SUMMARY_BATCHES))} >= 1.0.', '']
            + table(['model', 'FLOPs ratio', 'best pruned mode', 'best dense mode', 'vs best dense (95% CI)',
                     'vs timm eager', *(f'batch {bs}' for bs in SUMMARY_BATCHES), 'targets met'], rows)
            + _compared_lines(entries))


def unsteady_rows(res: Dict) -> List[Tuple[int, Dict[str, float]]]:
    """(batch, {row label: spread}) for each section of one model (its main table, then its summary batches) with
    rows whose pass times spread more than UNSTEADY_SPREAD (``stats.spread``)."""
    labels = {r['key']: r['label'] for r in res['rows']}
    protocol = res['rows'][0].get('protocol', 'ours') if res['rows'] else 'ours'
    sections = [(res['batch_size'], {r['key']: r['seconds'] for r in res['rows']})] if protocol == 'ours' else []
    sections += [(b['batch_size'], b['seconds']) for b in res.get('summary_sweep', {}).get('batches', [])]
    out = []
    for batch, seconds in sections:
        found = Timings(seconds, batch).unsteady()
        if found:
            out.append((batch, {labels.get(k, k): v for k, v in found.items()}))
    return out


def spreads_text(rows: Dict[str, float]) -> str:
    """'timm 13%, ours_25 16%': rows with their spread (``stats.spread``), as the log, the tables and gpu_check.sh
    name them."""
    return ', '.join(f'{name} {100 * v:.0f}%' for name, v in rows.items())


def _unsteady_lines(results: Dict) -> List[str]:
    lines = [f'- {res["label"]}, batch {batch}: {spreads_text(rows)}'
             for res in results['models'].values() for batch, rows in unsteady_rows(res)]
    if not lines:
        return []
    return (['', f'Unsteady timings: rows whose pass times spread more than {100 * UNSTEADY_SPREAD:.0f}% '
                 '(interquartile range over the median; steady rows spread a few per cent), a sign that the host '
                 'ran slower during part of the section (another load on the machine, or its clock). Rows that wait '
                 'on the host (eager ones, the more so at small batches) are held back more than those that do not '
                 '(CUDA graphs), so their images/s and the ratios against them are less certain than their '
                 'intervals say; time such a section again:', '']
            + lines)


def _compared_lines(entries: List[Dict]) -> List[str]:
    """Which dense modes each comparison chose from, once per distinct set (the compiled rows are built only from
    --compile-min-batch on, so the small batches may have fewer), and the rows a failed logit check kept out."""
    sets: Dict[Tuple[str, ...], List[str]] = {}
    for e in entries:
        comparisons = [('main batch', e)] + [(f'batch {b}', c) for b, c in e['speedup_by_batch'].items()
                                             if int(b) in SUMMARY_BATCHES]
        for where, c in comparisons:
            if 'dense_modes' in c:
                sets.setdefault(tuple(c['dense_modes']), []).append(f'{e["model"]} {where}')
    lines = [f'Dense modes compared: {", ".join(modes) or "none"} ({"; ".join(where)}).'
             for modes, where in sets.items()] if len(sets) > 1 else (
        [f'Dense modes compared: {", ".join(next(iter(sets)))} (every comparison).'] if sets else [])
    lines += [f'Left out of the comparison for {e["model"]}{" at batch " + b if b else ""}: '
              + '; '.join(f'{k} ({why})' for k, why in c['excluded'].items()) + '.'
              for e in entries for b, c in [('', e)] + list(e['speedup_by_batch'].items()) if c.get('excluded')]
    return [''] + lines if lines else []


def _scoring_table(results: Dict) -> List[str]:
    rows = [[res['label'], str(sc['batch_size']), f'{sc["scoring_s"]:.3f}', f'{sc["train_step_s"]:.3f}',
             fmt_ratio(sc['ratio'])] for res in results['models'].values() for sc in [res.get('scoring')] if sc]
    if not rows:
        return []
    return (['', 'Scoring one batch for pruning against one plain training step of the dense model on the same batch '
                 '(fp32, median of interleaved pairs, protocol "ours"):', '']
            + table(['model', 'batch', 'scoring one batch (s)', 'one training step (s)', 'ratio'], rows))


def _routing_table(results: Dict) -> List[str]:
    rows = [[f'C&C-{res["short"]}-{tag}', str(rc['batch_size']), f'{rc["ms"]["ours"]:.2f}',
             f'{rc["ms"]["boolean"]:.2f}', f'{rc["ms"]["scatter"]:.2f}', fmt_ratio(rc['boolean_over_ours']),
             f'{100 * rc["ms"]["ours"] / rc["forward_ms_ours"]:.1f}%']
            for res in results['models'].values() for tag, rc in res.get('routing', {}).items()]
    if not rows:
        return []
    return (['', 'Token routing alone (every timm block replaced by the identity; ms per batch, median of '
                 f'{results["settings"]["routing_repeats"]} interleaved rounds, protocol "ours"):', '']
            + table(['model', 'batch', 'ours: 2 gathers + concat', 'boolean mask + concat', 'gather + scatter',
                     'boolean / ours', 'ours, share of its forward pass'], rows))


def breakdown_entries(res: Dict) -> List[Tuple[str, str, Dict]]:
    """(prune-rate tag, which rows, breakdown) of one model's results: ours against timm, then the fast path's
    pruned row against its dense row where it was profiled."""
    fast_dense, fast = res.get('breakdown_fast_rows') or ('', '')
    pairs = (('breakdown', 'ours vs timm'), ('breakdown_fast', f'{fast} vs {fast_dense}'))
    return [(tag, what, b) for key, what in pairs for tag, b in res.get(key, {}).items()]


def _breakdown_table(results: Dict, families) -> List[str]:
    rows = []
    for res in results['models'].values():
        for tag, what, b in breakdown_entries(res):
            cells = [f'{fmt(c["time_ratio"])} ({fmt(c["flops_ratio"])}) {100 * c["excess_share"]:+.1f}%'
                     for c in (b['families'][f] for f in families)]
            rows.append([f'C&C-{res["short"]}-{tag}', what, f'{b["flops_ratio"]:.2f}',
                         fmt_ratio(b['profiled_speedup']), *cells])
    if not rows:
        return []
    measured = ('the GPU time of every kernel (by its name)' if results.get('settings', {}).get('device') == 'cuda'
                else 'the self time of the aten ops')
    return (['', f'Where the time goes: torch.profiler, {measured}, summed by family, dense against pruned (mean of '
                 f'{results["settings"]["breakdown_rounds"]} profiled passes per row, taking turns as in protocol '
                 '"ours"). Each cell: the family\'s time ratio dense/pruned, in brackets its own FLOPs ratio (what '
                 'the formula expects of it), then its time above the model\'s FLOPs ratio as a share of the pruned '
                 'pass; these shares add up to the gap between the profiled speed-up and the FLOPs ratio.', '']
            + table(['model', 'rows', 'FLOPs ratio', 'profiled speed-up', *families], rows))


def _sweep_tables(results: Dict) -> List[str]:
    lines = []
    sweeps = results.get('sweeps', {})
    if sweeps.get('batch'):
        s = sweeps['batch']
        lines += ['', f'images/s against batch size ({s.get("label", "DeiT-" + s["short"])}, prune rate '
                      f'{s["prune_rate"]}, protocol "ours"):', '']
        lines += table(['batch', 'dense (timm)', 'ours', 'boolean mask', 'speed-up vs dense', 'vs boolean mask'],
                       [[str(r['batch_size']), f'{r["timm"]:.1f}', f'{r["ours"]:.1f}', f'{r["boolean"]:.1f}',
                         fmt_ratio(r['speedup_vs_timm']), fmt_ratio(r['vs_boolean'])] for r in s['rows']])
    if sweeps.get('rate'):
        s = sweeps['rate']
        lines += ['', f'images/s against prune rate ({s.get("label", "DeiT-" + s["short"])}, batch {s["batch_size"]}, '
                      'one interleaved run, protocol "ours"):', '']
        lines += table(['prune rate', 'GFLOPs', 'FLOPs ratio', 'ours images/s', 'boolean mask images/s',
                        'speed-up vs dense', 'vs boolean mask'],
                       [[f'{r["prune_rate"]:.2f}', f'{r["gflops"]:.2f}', f'{r["flops_ratio"]:.2f}', f'{r["ours"]:.1f}',
                         fmt(r.get('boolean'), '.1f'), fmt_ratio(r['speedup_vs_timm']), fmt_ratio(r.get('vs_boolean'))]
                        for r in s['rows']])
    return lines


def _targets_table(results: Dict) -> List[str]:
    if not results.get('targets'):
        return []
    rows = []
    for t in results['targets']:
        spec = t.get('format', '.3f')
        rows.append([t['target'], fmt_ratio(t['value'], t.get('ci'), spec), fmt(t['threshold'], spec), verdict(t)])
    return ([''] + table(['target', 'value: median or ratio (95% CI of the median)', 'threshold', 'met'], rows)
            + ['', 'CI: distribution-free confidence interval of the median from order statistics; none with '
                   'fewer than 6 rounds (too few for a 95% interval: the verdict is then "within noise") and for '
                   'figures of the original protocol (one mean per row). "Within noise": the interval contains the '
                   'threshold.'])


def _sections_table(results: Dict) -> List[str]:
    sections = results.get('sections', [])
    if not sections:
        return []
    rows = [[s['section'], s['status'] + (f': {s["reason"]}' if s.get('reason') else '')
             + (' (earlier run)' if s.get('earlier_run') else ''), fmt(s.get('seconds'), '.0f')] for s in sections]
    lines = ['', 'Sections, in the order they ran:', ''] + table(['section', 'status', 'seconds'], rows)
    if results.get('earlier_runs'):
        lines += ['', 'This run resumed an earlier one (--resume): the sections marked "earlier run" were timed by '
                      + ', then by '.join(f'`{r["command"]}`' for r in results['earlier_runs'])
                      + ' in another process, with the same settings on the same machine kind. Every ratio compares '
                        'rows of one section, timed in one process.']
        changed = sorted({f for r in results['earlier_runs'] for f in r.get('code_changed_since', [])})
        if changed:
            lines += ['', f'The code changed since the earlier run: {", ".join(changed)}; the sections kept were '
                          'measured with the code as it was.']
    return lines


def _left_out(results: Dict) -> List[str]:
    lines = [f'- {name}: {why}' for name, why in results.get('formulations', {}).get('skipped', {}).items()]
    for res in results['models'].values():
        lines += [f'- {res["label"]} batch {res["batch_size"]}, {key}: {why}'
                  for key, why in res.get('skipped_rows', {}).items()]
        for b in res.get('summary_sweep', {}).get('batches', []):
            lines += [f'- {res["label"]} batch {b["batch_size"]}, {key}: {why}'
                      for key, why in b.get('skipped_rows', {}).items()]
    return ['', 'Rows left out:', ''] + lines if lines else []


def _checks_table(results: Dict) -> List[str]:
    rows, recompiled = [], []
    for res in results['models'].values():
        labels = {r['key']: r['label'] for r in res['rows']}
        sections = [(res['batch_size'], res.get('checks', {}))]
        sections += [(b['batch_size'], b.get('checks', {})) for b in res.get('summary_sweep', {}).get('batches', [])]
        for batch, checks in sections:
            for key, c in checks.items():
                if c.get('recompiled'):
                    recompiled.append(f'- {labels.get(key, key)}, batch {batch}: '
                                      + '; '.join(f'compiled {e["way"]}: {e["failure"]}' for e in c['recompiled'])
                                      + f'; compiled {c.get("way", "again")}: {check_failure(c) or "passed"} '
                                        '(the compile timed, checked above)')
                clear = c['top1_agreement_clear']
                rows.append([labels.get(key, key), str(batch), f'{c["max_abs_diff"]:.2e}', f'{c["tolerance"]:.2e}',
                             f'{c["top1_agreement"]:.3f}', '–' if clear is None else f'{clear:.3f}',
                             f'{c["clear_images"]}/{c["images"]}',
                             'yes' if c['within_tolerance'] and c['top1_ok'] is not False else '**NO**'])
    if not rows:
        return []
    return (['', 'Logit checks: each row\'s logits against the eager fp32 model with the same weights and masks, on '
                 'one random batch of the section\'s size (rows timed again at another batch size are checked again '
                 'when they were built or compiled again). Tolerance: 2 x the eager model\'s own error at the run\'s '
                 'precision (its autocast forward; TF32 in fp32 on a GPU; none in fp32 on a CPU) + 1e-3; top-1 '
                 'judged on the images whose fp32 top-2 margin exceeds 2 x that error (random-init models have '
                 'near-ties that half precision cannot resolve).', '']
            + table(['row', 'batch', 'max abs logit diff', 'tolerance', 'top-1 = fp32, all images',
                     'top-1 = fp32, clear margin', 'clear images', 'ok'], rows)
            + (['', 'Compiled again: a torch.compile row whose check failed was compiled afresh (traced and compiled '
                    'anew, inductor\'s caches off), then, if still off, afresh with SDPA\'s cuDNN attention '
                    'excluded, until one passed:', ''] + recompiled if recompiled else []))


def _fast_builds(results: Dict):
    """(row label, batch, build seconds, the build's ``describe()``) for every fast-path build of the run: the main
    table's and the summary sweep's."""
    for res in results['models'].values():
        builds = [(res['batch_size'], {r['key']: r['fast_path'] for r in res['rows'] if 'fast_path' in r},
                   res.get('build_seconds', {}))]
        builds += [(b['batch_size'], b.get('fast_path', {}), b.get('build_seconds', {}))
                   for b in res.get('summary_sweep', {}).get('batches', [])]
        labels = {r['key']: r['label'] for r in res['rows']}
        for batch, found, seconds in builds:
            for key, d in found.items():
                yield labels.get(key, key), batch, seconds.get(key), d


PRODUCTS = (('qkv', 'qkv'), ('proj', 'attention proj'), ('mlp', 'MLP fc1 + GELU'), ('fc2', 'MLP fc2 + residual'))


def _fast_path_table(results: Dict) -> List[str]:
    rows = []
    for label, batch, seconds, d in _fast_builds(results):
        attention = ', '.join(f'{n}: {a}' for n, a in d.get('attention', {}).items())
        # the products: the kernels chosen, each once ('–': results from before that product was timed)
        products = [', '.join(sorted(set(d.get(k, {}).values()))) or '–' for k, _ in PRODUCTS]
        norm_qkv, fused, whole_mlp = (', '.join(sorted(set(d.get(k, {}).values()))) or '–'
                                      for k in ('norm_qkv', 'proj_norm', 'mlp_residual'))
        rows.append([label, str(batch), fmt(seconds, '.1f'),
                     f'yes, input {d.get("cuda_graph_input")}' if d.get('cuda_graph_batch') else 'no',
                     _dependent_launch_cell(d), attention or '–', products[0], norm_qkv, products[1], fused,
                     *products[2:], whole_mlp, d.get('patch_embedding', '–')])
    if not rows:
        return []
    return (['', 'Fast path builds (models/fast_path.py): kernels chosen per kept count at build time (a product: '
                 'each kernel chosen at some kept count; "torch+Nrows": cuBLAS on N padding rows beyond the real '
                 'ones; "LN1 + qkv": "torch" runs the gather-norm kernel, then qkv as chosen, a Triton tile the two '
                 'as one kernel; "proj + residual + LN2": "torch" runs the projection as chosen, then the '
                 'residual-norm kernel, a Triton tile runs the three as one kernel; "whole MLP + residual": "torch" '
                 'runs fc1 and fc2 as chosen, a Triton tile the whole MLP and its residual update as one kernel; '
                 '"PDL": whether the CUDA graph launches the Triton kernels with programmatic dependent launch, and '
                 'the graph\'s ms per forward without / with it where the build timed both; '
                 '"–": results from before it was timed):', '']
            + table(['row', 'batch', 'build s', 'CUDA graph', 'PDL', 'attention (kept count: kernel)', PRODUCTS[0][1],
                     'LN1 + qkv', PRODUCTS[1][1], 'proj + residual + LN2', *(name for _, name in PRODUCTS[2:]),
                     'whole MLP + residual', 'patch embedding'], rows)
            + _product_times_table(results))


def _dependent_launch_cell(d: Dict) -> str:
    """Whether a build's CUDA graph launches its kernels with programmatic dependent launch: 'on' or 'off', with
    the graph's ms per forward without / with it where the build timed both, or why it was refused; '–' without
    a graph or in results from before it was chosen."""
    used = d.get('dependent_launch')
    if not d.get('cuda_graph_batch') or used is None:
        return '–'
    ms = d.get('dependent_launch_ms') or {}
    why = (d.get('refused', {}).get('dependent_launch') or {}).get('0', {}).get('on')
    detail = (f' ({ms["off"]:.3f} / {ms["on"]:.3f} ms)' if {'off', 'on'} <= set(ms)
              else f' (refused: {why})' if why else '')
    return ('on' if used else 'off') + detail


# the products that may run as one kernel with their neighbours (a norm, a residual update), and that choice
FUSED_WITH = {'proj': 'proj_norm', 'qkv': 'norm_qkv'}


def _fusing_saved(d: Dict, n: int, kind: str = 'proj') -> Optional[float]:
    """The ms that running product ``kind`` fused with its neighbours saved at kept count ``n`` over the product
    chosen and the neighbour's kernel (the projection + residual + norm kernel over the projection then the
    residual-norm kernel; the norm + qkv kernel over the gather-norm kernel then qkv): 0.0 where it ran unfused,
    None where the fused choice has no times."""
    fused = d.get(FUSED_WITH[kind], {}).get(str(n), 'torch')
    if fused == 'torch':
        return 0.0
    pair = d.get(f'{FUSED_WITH[kind]}_ms', {}).get(str(n), {})
    if pair.get(fused) is None or pair.get('torch') is None:
        return None
    return pair['torch'] - pair[fused]


def whole_mlp_counts(d: Dict) -> List[int]:
    """The kept counts (each once, blocks that keep nothing aside) at which the whole MLP and its residual update
    ran as one kernel (``mlp_residual``)."""
    out = []
    for n in d.get('kept_counts', []):
        if n and d.get('mlp_residual', {}).get(str(n), 'torch') != 'torch' and n not in out:
            out.append(n)
    return out


def floored_projections(d: Dict, kind: str = 'proj') -> List[int]:
    """The kept counts (each once) at which fusing product ``kind`` (the projection, with its residual update and
    norm; qkv, with the first norm) saved more than the product chosen took at build time: its share
    (:func:`product_times`) is 0 there, never negative."""
    out = []
    for n in d.get('kept_counts', []):
        chosen = d.get(f'{kind}_ms', {}).get(str(n), {}).get(d.get(kind, {}).get(str(n)))
        saved = _fusing_saved(d, n, kind) if n else None
        if chosen is not None and saved is not None and saved > chosen and n not in out:
            out.append(n)
    return out


def product_times(d: Dict) -> Optional[Dict[str, Tuple[float, float]]]:
    """For one build's ``describe()``: per product, (the chosen kernels' build-time ms, cuBLAS's on the real rows
    only), each summed over the blocks; None unless every block's product was timed both ways.  Where the
    projection ran fused with its residual update and norm, or qkv with the first norm, its share is its time less
    what fusing saved, and 0 where fusing saved more than that (:func:`floored_projections`): a kernel takes no
    negative time, and the rest of the saving belongs to the norm and residual kernels, which the table does not
    show.  Where the whole MLP ran as one kernel (:func:`whole_mlp_counts`), its time is the first MLP product's
    share and the second's is 0."""
    out = {}
    whole = whole_mlp_counts(d)
    for kind, _ in PRODUCTS:
        chosen_ms = plain_ms = 0.0
        for n in d.get('kept_counts', []):
            if not n:
                continue  # a block that keeps nothing does not run
            ms = d.get(f'{kind}_ms', {}).get(str(n), {})
            chosen, plain = ms.get(d.get(kind, {}).get(str(n))), ms.get('torch')
            if chosen is None or plain is None:
                return None
            if kind in FUSED_WITH:  # run as one kernel with its neighbours: its share
                saved = _fusing_saved(d, n, kind)
                if saved is None:
                    return None
                chosen = max(0.0, chosen - saved)
            if n in whole and kind in ('mlp', 'fc2'):  # one kernel for both: its time is fc1's share
                chosen = d.get('mlp_residual_ms', {}).get(str(n), {}).get(d['mlp_residual'][str(n)])
                if chosen is None:
                    return None
                chosen = chosen if kind == 'mlp' else 0.0
            chosen_ms, plain_ms = chosen_ms + chosen, plain_ms + plain
        out[kind] = (chosen_ms, plain_ms)
    return out if d.get('kept_counts') else None


def _product_times_table(results: Dict) -> List[str]:
    rows, floored, whole = [], False, False
    for label, batch, _, d in _fast_builds(results):
        times = product_times(d)
        if times is not None:
            total = [sum(t[i] for t in times.values()) for i in (0, 1)]
            cells = {k: f'{c:.3f} / {p:.3f}' for k, (c, p) in times.items()}
            for kind in FUSED_WITH:
                counts = floored_projections(d, kind)
                if counts:
                    floored = True
                    cells[kind] += f' (0 at kept {", ".join(map(str, counts))})'
            counts = whole_mlp_counts(d)
            if counts:
                whole = True
                cells['mlp'] += f' (with fc2 at kept {", ".join(map(str, counts))})'
                cells['fc2'] += f' (0 at kept {", ".join(map(str, counts))})'
            rows.append([label, str(batch), *cells.values(), f'{total[0]:.3f} / {total[1]:.3f}'])
    if not rows:
        return []
    return (['', 'The block\'s products at build time (each replayed from a CUDA graph, ms per forward, summed over '
                 'the blocks): the kernels chosen (cuBLAS on the real or on padded rows, or a fused Triton kernel) / '
                 'cuBLAS on the real rows only (with torch\'s GELU, the scatter kernel); where the projection ran '
                 'fused with its residual update and norm, or qkv with the first norm, its time less what that saved'
                 + (' ("0 at kept N": there fusing saved more than the product chosen took, the rest of the saving '
                    'being the norm and residual kernels\', not shown here; its share is counted as 0, not '
                    'negative)' if floored else '')
             + ('; "with fc2 at kept N": there the whole MLP and its residual update ran as one kernel, whose time '
                'is counted as fc1\'s and 0 as fc2\'s' if whole else '') + '.', '']
            + table(['row', 'batch', *(name for _, name in PRODUCTS), 'all four'], rows))


def _rederived_lines(results: Dict) -> List[str]:
    """``results['rederived']``: each time the summary and targets of a committed run were worked out again from
    its own pass times and logit checks by a later version of this module (``attach_summary``), when and why;
    nothing was timed again.  None: no lines."""
    if not results.get('rederived'):
        return []
    return ['', *(f'Summary and targets re-derived on {r["date"]} from this run\'s own pass times and logit checks, '
                  f'nothing timed again: {r["why"]}' for r in results.get('rederived', []))]


def markdown(results: Dict, families=()) -> str:
    lines = [_machine(results)]
    lines += _rederived_lines(results)
    lines += _sections_table(results)
    lines += ['']
    lines += _main_table(results)
    lines += _summary_table(results)
    lines += _unsteady_lines(results)
    lines += _checks_table(results)
    lines += _fast_path_table(results)
    lines += _left_out(results)
    lines += _scoring_table(results)
    lines += _routing_table(results)
    lines += _breakdown_table(results, families)
    lines += _sweep_tables(results)
    lines += _targets_table(results)
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------------------------------------------
# the README's speed table, from the committed results

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def readme_speed_table(cpu: Dict, gpu: Optional[Dict] = None) -> List[str]:
    """The README's table: for each model of the CPU run, timm's dense row and our pruned rows (the eager model)
    with GFLOPs, CPU images/s, the speed-up against dense timm, the FLOPs ratio and the ratio to the boolean-mask
    formulation, beside the paper's GPU figures (``seed_gpu`` of a row).  With a GPU run (its summary), four
    columns more, headed with the GPU's name, for each pruned model of that run: the fastest pruned mode over the
    fastest dense mode at the run's main batch, the same over timm eager, and at batch 1 and 32 ('–' where not
    run)."""
    entries = {e['model']: e for e in (gpu or {}).get('summary', [])}
    gpu_name = None if gpu is None else gpu.get('machine', {}).get('gpu')
    if gpu is not None and not gpu_name:
        raise ValueError('the GPU results name no GPU (machine.gpu)')
    header = ['model', 'GFLOPs', 'images/s (CPU)', 'speed-up', 'FLOPs ratio', 'vs boolean mask']
    if gpu is not None:
        header += [f'{gpu_name}: fastest pruned over fastest dense', 'over timm eager',
                   *(f'batch {bs}' for bs in SUMMARY_BATCHES)]
    header += ['paper GFLOPs', 'paper images/s (GPU)', 'paper speed-up']
    rows = []
    for res in cpu['models'].values():
        for r in res['rows']:
            if r['kind'] not in shapes.TABLE_KINDS:
                continue
            seed = r.get('seed_gpu') or {}
            row = [model_name(r), f'{r["gflops"]:.2f}', f'{r["images_per_s"]:.1f}', fmt_ratio(r.get('speedup_vs_timm')),
                   f'{r["flops_ratio"]:.2f}', fmt_ratio(r.get('vs_boolean'))]
            if gpu is not None:
                e = entries.get(model_name(r), {})
                row += [fmt_ratio(e.get(k)) for k in SUMMARY_FIGURES]
            row += [fmt(seed.get('gflops'), '.1f'), fmt(seed.get('images_per_s'), 'd'),
                    fmt_ratio(seed.get('speedup'))]
            rows.append(row)
    return table(header, rows)


README = os.path.join(os.path.dirname(os.path.dirname(RESULTS_DIR)), 'README.md')
TABLE_START = '| model | GFLOPs |'  # the first line of the README's speed table


def replace_speed_table(text: str, lines: List[str]) -> str:
    """``text`` (a README) with its speed table, the table lines from the one beginning TABLE_START, replaced by
    ``lines``; ValueError if it has none, or more than one (all but one would be left stale)."""
    rows = text.split('\n')
    starts = [i for i, line in enumerate(rows) if line.startswith(TABLE_START)]
    if not starts:
        raise ValueError(f'no speed table in it (a line beginning "{TABLE_START}")')
    if len(starts) > 1:
        raise ValueError(f'{len(starts)} speed tables in it (lines {", ".join(str(i + 1) for i in starts[:-1])} and '
                         f'{starts[-1] + 1} begin "{TABLE_START}"), not one')
    start = starts[0]
    end = start
    while end < len(rows) and rows[end].startswith('|'):
        end += 1
    eol = '\r' if rows[start].endswith('\r') else ''  # a README with Windows line ends keeps them
    return '\n'.join(rows[:start] + [line + eol for line in lines] + rows[end:])


def load_results(path: str, what: str, required=('models',)) -> Dict:
    """The results JSON benchmarks/model_zoo.py wrote to ``path``; ValueError('<what> <path>: why not') when it
    cannot be read, is not JSON, lacks a ``required`` key, or a part the report reads has another shape
    (shapes.REPORT)."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise ValueError(f'{what} {path}: {e.strerror or e}') from None
    except ValueError as e:  # UnicodeDecodeError among them
        raise ValueError(f'{what} {path}: not JSON ({e})') from None
    except RecursionError:  # lists or objects nested thousands deep: no results file, and json.load's own error
        raise ValueError(f'{what} {path}: not a results file of benchmarks/model_zoo.py (nested too deep to read)'
                         ) from None
    if not isinstance(results, dict) or not set(required) <= set(results):
        raise ValueError(f'{what} {path}: not a results file of benchmarks/model_zoo.py')
    problem = shapes.problem(results, shapes.REPORT, '')
    if problem:
        raise ValueError(f'{what} {path}: not a results file of benchmarks/model_zoo.py ({problem})')
    return results


def _run_problem(results: Dict, gpu: bool) -> Optional[str]:
    """How a run given as --cpu (``gpu`` False) or --gpu differs from what the README's columns of that device are,
    or None: a finished run on that device, protocol "ours", each model at its default batch size; on the CPU in
    fp32; on a GPU with the benchmark's own rows (so that the fastest dense and pruned modes are chosen among all of
    them) and its summary."""
    settings = results.get('settings', {})
    device = results.get('machine', {}).get('device', settings.get('device'))
    if not (str(device).startswith('cuda') if gpu else device == 'cpu'):
        return f'it was measured on {device}, not on {"a CUDA GPU" if gpu else "the CPU"}'
    name = results.get('machine', {}).get('gpu')
    if gpu and not (isinstance(name, str) and name.strip()):  # the GPU columns are headed with it
        what = ('is missing' if name is None else 'is blank' if isinstance(name, str)
                else f'is {shapes.json_kind(name)}, not a string')
        return f'it names no GPU (machine.gpu {what})'
    cell = shapes.CELL.problem(name, 'machine.gpu') if gpu else None
    if cell:
        return f'its {cell}'
    if settings.get('protocol', 'ours') != 'ours':
        return f'it was timed with --protocol {settings["protocol"]}; the table is protocol ours'
    if settings.get('quick'):
        return 'it is a --quick run (a smoke test of a few passes), not a measurement'
    if settings.get('masks', 'taylor') != 'taylor':
        return f'its pruned models have --masks {settings["masks"]}; the table is the Taylor-pruned models'
    if settings.get('batch_size') is not None:  # (None: each model's default)
        return (f'it was timed at --batch-size {settings["batch_size"]} for every model; the table and the README '
                f'around it state each model\'s default batch size')
    if not gpu and settings.get('dtype', 'fp32') != 'fp32':
        return f'it was timed in {settings["dtype"]}; the table is fp32'
    if gpu and settings.get('rows_given'):
        return (f'it timed only the rows given with --rows ({", ".join(map(str, settings.get("rows", [])))}), not '
                f'every mode the fastest dense and pruned ones are chosen from')
    unfinished = [s for s in results.get('sections', []) if s.get('status') != 'done']
    if unfinished:
        return f'{len(unfinished)} of its sections did not finish; model_zoo.py --resume finishes them'
    if gpu and not results.get('summary'):
        return 'it has no summary'
    # a model twice (a row or a section copied, a merge): the table would show it twice, or one of two sets of figures
    names = ([e['model'] for e in results['summary']] if gpu else
             [model_name(r) for res in results['models'].values() for r in res['rows']
              if r['kind'] in shapes.TABLE_KINDS])
    twice = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if twice:
        return (f'{"its summary has" if gpu else "it has"} more than one {"entry" if gpu else "row"} of '
                + ', '.join(twice))
    if gpu:  # (a hand-edited entry named after timm's model would fill that dense row's GPU columns)
        dense = {model_name(r) for res in results.get('models', {}).values() for r in res.get('rows', [])
                 if r.get('kind') == 'timm'}
        named = [n for n in names if n in dense]
        if named:
            return (f'its summary has an entry for {", ".join(named)}, a dense model: the summary is of pruned '
                    f'models against the fastest dense one')
    return None


def _pair_problem(cpu: Dict, gpu: Dict) -> Optional[str]:
    """How the GPU run's pruned models differ from the CPU run's, whose rows its columns stand beside, or None:
    another --seed makes other weights and other masks (the Taylor scores of other weights), so a model of the same
    name and rate that is not the same model."""
    seeds = [run.get('settings', {}).get('seed', 0) for run in (cpu, gpu)]
    if seeds[0] != seeds[1]:
        return (f'its --seed {seeds[1]} is not the CPU run\'s {seeds[0]}: other weights and masks, not the pruned '
                f'models of the rows its columns would stand beside')
    return None


def main(argv=None) -> None:
    from utils import UserError, escape_controls, write_text_atomic
    from utils.cli import OneLineParser
    p = OneLineParser(description='Print the README speed table from saved benchmark results, or write it '
                                  'into the README.')
    p.add_argument('--cpu', default=os.path.join(RESULTS_DIR, 'cpu.json'), help='the CPU run (default: %(default)s)')
    default_gpu = os.path.join(RESULTS_DIR, 'cuda.json')
    p.add_argument('--gpu', default=None,
                   help=f'the GPU run (default: {default_gpu}, left out while it does not exist; a file named here '
                        f'must exist)')
    p.add_argument('--write-readme', nargs='?', const=README, default=None, metavar='README',
                   help='replace the speed table of this README (default: the repository\'s) with the table instead '
                        'of printing it; the rest of the file is left as it is')
    args = p.parse_args(argv)
    try:
        cpu = load_results(args.cpu, '--cpu')
        problem = shapes.problem(cpu, shapes.SPEED_TABLE, '')
        if problem:
            raise ValueError(f'--cpu {args.cpu}: not a results file of benchmarks/model_zoo.py ({problem})')
        problem = _run_problem(cpu, gpu=False)
        if problem:
            raise ValueError(f'--cpu {args.cpu}: not the CPU run the speed table shows ({problem})')
        # the committed GPU run is optional (none may be committed yet); a GPU run named on the command line is not
        if args.gpu is None:
            gpu = load_results(default_gpu, '--gpu') if os.path.exists(default_gpu) else None
        else:
            gpu = load_results(args.gpu, '--gpu')
        problem = None if gpu is None else _run_problem(gpu, gpu=True) or _pair_problem(cpu, gpu)
        if problem:
            raise ValueError(f'--gpu {args.gpu or default_gpu}: not the GPU run the speed table shows ({problem})')
        lines = readme_speed_table(cpu, gpu)
        if args.write_readme is None:
            try:
                print('\n'.join(lines), flush=True)
            except BrokenPipeError:  # (a reader that stopped early, `| head`): it has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            except UnicodeEncodeError as e:  # an ASCII locale's stdout (LC_ALL=C without Python's UTF-8 mode)
                raise ValueError(f'standard output\'s encoding ({e.encoding}) cannot print the table\'s characters '
                                 f'(U+{ord(e.object[e.start]):04X} the first): set PYTHONIOENCODING=utf-8, or write '
                                 f'the table into a README with --write-readme') from None
            return
        try:
            # UTF-8, as it is written (not the locale's encoding); its line ends as they are
            with open(args.write_readme, encoding='utf-8', newline='') as f:
                text = f.read()
            new = replace_speed_table(text, lines)
        except (OSError, ValueError) as e:
            raise ValueError(f'--write-readme {args.write_readme}: {getattr(e, "strerror", None) or e}') from None
        write_text_atomic(args.write_readme, new)
    except (ValueError, UserError) as e:  # (a path named with a newline is one line too)
        sys.stderr.write(f'error: {escape_controls(str(e))}\n')
        sys.exit(2)
    print(f'wrote the speed table into {args.write_readme}' + (' (unchanged)' if new == text else ''))


if __name__ == '__main__':
    main()
