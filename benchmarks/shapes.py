"""The shape of the results JSON benchmarks/model_zoo.py writes, as far as it is read back: what the report reads
of any run (report.load_results: the models and their rows, the machine, the settings, the sections, the summary)
and of the CPU run the README's speed table is made from (the rows of that table), and what a resumed run
(model_zoo.py --resume) carries over (a main table's model results with their rows, checks and fast-path builds, a
sweep's rows, a kept section's record, the earlier runs).  :func:`problem` says, in words, where a value read back
has another shape than model_zoo.py writes (a key missing, a string where a number goes, a list where an object
goes), so that a hand-edited or cut file is refused before any work instead of failing in the middle of the run or
of its report."""
import math
import re
from typing import Dict, Optional


def json_kind(value) -> str:
    """What a JSON value is, in words: 'an object', 'a list', 'a string', 'a number', 'a boolean', 'null'."""
    if isinstance(value, bool):
        return 'a boolean'
    return {dict: 'an object', list: 'a list', str: 'a string', int: 'a number', float: 'a number'}.get(
        type(value), 'null')


class Spec:
    """A shape: ``problem(value, where)`` is None when ``value`` has it, else what is wrong, naming ``where``."""
    def problem(self, value, where: str) -> Optional[str]:
        raise NotImplementedError


class Leaf(Spec):
    def __init__(self, name: str, test):
        self.name, self.test = name, test

    def problem(self, value, where):
        if self.test(value):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return f'{where} is {value}, not {self.name}'
        return f'{where} is {json_kind(value)}, not {self.name}'


def _at(where: str, key) -> str:
    """The path of ``key`` in the object at ``where`` ('' at the top of the file)."""
    return f'{where}.{key}' if where else str(key)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


STR = Leaf('a string', lambda v: isinstance(v, str))
BOOL = Leaf('a boolean', lambda v: isinstance(v, bool))
NUMBER = Leaf('a number', _number)  # a figure measured (NaN and infinity are what a failed timing gives)
FINITE = Leaf('a finite number', lambda v: _number(v) and math.isfinite(v))
COUNT = Leaf('a whole number', lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
BATCH = Leaf('a positive whole number', lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)
INTEGER = Leaf('an integer', lambda v: isinstance(v, int) and not isinstance(v, bool))


class Maybe(Spec):
    """``spec`` or null."""
    def __init__(self, spec: Spec):
        self.spec = spec

    def problem(self, value, where):
        return None if value is None else self.spec.problem(value, where)


class ListOf(Spec):
    def __init__(self, item: Spec, length: Optional[int] = None, nonempty: bool = False):
        self.item, self.length, self.nonempty = item, length, nonempty

    def problem(self, value, where):
        if not isinstance(value, list):
            return f'{where} is {json_kind(value)}, not a list'
        if self.length is not None and len(value) != self.length:
            return f'{where} has {len(value)} entries, not {self.length}'
        if self.nonempty and not value:
            return f'{where} is an empty list'
        for i, v in enumerate(value):
            why = self.item.problem(v, f'{where}[{i}]')
            if why:
                return why
        return None


class MapOf(Spec):
    """An object whose every value has the shape ``value``."""
    def __init__(self, value: Spec, nonempty: bool = False):
        self.value, self.nonempty = value, nonempty

    def problem(self, value, where):
        if not isinstance(value, dict):
            return f'{where} is {json_kind(value)}, not an object'
        if self.nonempty and not value:
            return f'{where} is an empty object'
        for k, v in value.items():
            why = self.value.problem(v, _at(where, k))
            if why:
                return why
        return None


class Obj(Spec):
    """An object with the keys of ``required`` (each of its shape) and, where present, those of ``optional``;
    other keys are left as they are."""
    def __init__(self, required: Dict[str, Spec], optional: Optional[Dict[str, Spec]] = None):
        self.required, self.optional = required, optional or {}

    def problem(self, value, where):
        if not isinstance(value, dict):
            return f'{where} is {json_kind(value)}, not an object'
        for k, spec in self.required.items():
            if k not in value:
                return f'{where or "the file"} has no "{k}"'
            why = spec.problem(value[k], _at(where, k))
            if why:
                return why
        for k, spec in self.optional.items():
            why = spec.problem(value[k], _at(where, k)) if k in value else None
            if why:
                return why
        return None


class Where(Spec):
    """``spec``, and then ``holds(value)``: a rule between its fields, else ``what`` is said of ``where``."""
    def __init__(self, spec: Spec, holds, what: str):
        self.spec, self.holds, self.what = spec, holds, what

    def problem(self, value, where):
        return self.spec.problem(value, where) or (None if self.holds(value) else f'{where} {self.what}')


class When(Spec):
    """``spec`` where ``test(value)``; any other value is a part the reader leaves out, of any shape."""
    def __init__(self, test, spec: Spec):
        self.test, self.spec = test, spec

    def problem(self, value, where):
        return self.spec.problem(value, where) if self.test(value) else None


OBJECT = Obj({})  # an object, whatever its keys
# what a row is and its FLOPs: read by the README's speed table and by a resumed run alike
ROW_NAMED = {'label': STR, 'kind': STR, 'gflops': FINITE, 'flops_ratio': FINITE}
# the paper's figures beside a row (its seed_gpu; null: the paper has none), but its images/s (see PAPER_ROW)
PAPER = {'gflops': Maybe(FINITE), 'speedup': Maybe(FINITE)}

# a figure the README's speed table prints (images/s, GFLOPs, a speed-up): a non-positive one is no measurement
POSITIVE = Where(FINITE, lambda v: v > 0, 'is not above 0')

# --- what the report reads of any results file (report.load_results)
SUMMARY_BATCHES = (1, 32)  # the batch sizes, other than each model's own, a summary entry has the speed-up at
# the figures of a summary entry that the README's speed table reads (null: not measured)
SUMMARY_FIGURES = ('speedup_vs_best_dense', 'speedup_vs_timm_eager', *(f'speedup_batch{bs}' for bs in SUMMARY_BATCHES))
REPORT = Obj({}, {'models': MapOf(Obj({'rows': ListOf(OBJECT)})), 'machine': OBJECT, 'settings': OBJECT,
                  'sections': ListOf(OBJECT),
                  'summary': ListOf(Obj({'model': STR}, {k: Maybe(POSITIVE) for k in SUMMARY_FIGURES}))})

# --- what the README's speed table reads of the CPU run (report.readme_speed_table), once REPORT holds: at least
# one model, and the figures of its timm and ours rows, each finite; a row of another kind is left out of the table
TABLE_KINDS = ('timm', 'ours')
# text put into a cell of a Markdown table (a row's label, the GPU's name): a "|" splits the cell, a newline the table
CELL = Where(STR, lambda v: not re.search(r'[|\x00-\x1f\x7f]', v),
             'has a "|" or a control character, which would break the Markdown table')
# the paper's figures of a row (absent or null where the paper has none), its images/s printed as a whole number
PAPER_ROW = Maybe(Obj({}, {'gflops': Maybe(POSITIVE), 'speedup': Maybe(POSITIVE),
                           'images_per_s': Maybe(Where(INTEGER, lambda v: v > 0, 'is not above 0'))}))


def _in_table(row) -> bool:
    """Whether the speed table reads ``row``: one of TABLE_KINDS, or one whose kind says nothing else."""
    return not isinstance(row, dict) or row.get('kind') in TABLE_KINDS or not isinstance(row.get('kind'), str)


TABLE_ROW = When(_in_table, Obj(dict(ROW_NAMED, label=CELL, gflops=POSITIVE, flops_ratio=POSITIVE,
                                     images_per_s=POSITIVE),
                                {'speedup_vs_timm': Maybe(POSITIVE), 'vs_boolean': Maybe(POSITIVE),
                                 'seed_gpu': PAPER_ROW}))
SPEED_TABLE = Obj({'models': MapOf(Obj({'rows': ListOf(TABLE_ROW)}), nonempty=True)})

# --- what a resumed run carries over (model_zoo.py --resume)
RATIO_CI = Maybe(ListOf(NUMBER, length=2))
# a check judges top-1 (top1_ok) only on the images with a clear margin, whose agreement it then reports
CHECK = Where(Obj({'max_abs_diff': NUMBER, 'tolerance': NUMBER, 'within_tolerance': BOOL, 'top1_agreement': NUMBER,
                   'top1_agreement_clear': Maybe(NUMBER), 'clear_images': COUNT, 'images': COUNT,
                   'top1_ok': Maybe(BOOL)},
                  {'autocast_error': NUMBER, 'way': STR, 'recompiled': ListOf(Obj({'way': STR, 'failure': STR}))}),
              lambda c: c['top1_ok'] is None or c['top1_agreement_clear'] is not None,
              'judges top-1 (top1_ok) without its agreement on the clear images (top1_agreement_clear is null)')
# made per kept count
FAST_PATH_CHOICES = ('attention', 'qkv', 'proj', 'proj_norm', 'mlp', 'fc2', 'mlp_residual', 'norm_qkv')
PER_COUNT = MapOf(STR)  # kept count -> the kernel chosen
PER_COUNT_MS = MapOf(MapOf(Maybe(NUMBER)))  # kept count -> kernel -> build-time ms (null: failed)
FAST_PATH = Obj({}, {'kept_counts': ListOf(COUNT), 'cuda_graph_batch': Maybe(BATCH), 'cuda_graph_input': Maybe(STR),
                     'dependent_launch': Maybe(BOOL), 'dependent_launch_ms': MapOf(NUMBER), 'patch_embedding': STR,
                     **{k: PER_COUNT for k in FAST_PATH_CHOICES},
                     **{f'{k}_ms': PER_COUNT_MS for k in FAST_PATH_CHOICES}})
ROW = Obj({'key': STR, **ROW_NAMED, 'prune_rate': FINITE,
           'kept_tokens': ListOf(COUNT, nonempty=True), 'kept_tokens_mean': FINITE, 'images_per_s': NUMBER,
           'speedup_vs_timm': Maybe(NUMBER), 'speedup_vs_timm_ci': RATIO_CI, 'seconds': ListOf(NUMBER),
           'dense': BOOL},
          {'counter_gflops': Maybe(FINITE), 'twin': STR, 'speedup_vs_twin': Maybe(NUMBER),
           'speedup_vs_twin_ci': RATIO_CI, 'vs_boolean': Maybe(NUMBER), 'vs_boolean_ci': RATIO_CI, 'protocol': STR,
           'build_seconds': Maybe(NUMBER), 'check': Maybe(CHECK), 'fast_path': FAST_PATH,
           'seed_gpu': Obj({}, dict(PAPER, images_per_s=Maybe(NUMBER)))})
SUMMARY_BATCH = Obj({'batch_size': BATCH, 'seconds': MapOf(ListOf(NUMBER))},
                    {'rounds': COUNT, 'images_per_s': MapOf(NUMBER), 'checks': MapOf(CHECK),
                     'build_seconds': MapOf(Maybe(NUMBER)), 'skipped_rows': MapOf(STR), 'fast_path': MapOf(FAST_PATH)})
FAMILY = Obj({'time_ratio': Maybe(NUMBER), 'flops_ratio': Maybe(NUMBER), 'excess_share': NUMBER},
             {'excess_ms': NUMBER})
BREAKDOWN = MapOf(Obj({'families': MapOf(FAMILY), 'flops_ratio': NUMBER, 'profiled_speedup': Maybe(NUMBER)}))
MODEL = Obj({'model': STR, 'short': STR, 'label': STR, 'batch_size': BATCH, 'rows': ListOf(ROW, nonempty=True)},
            {'protocol': STR, 'checks': MapOf(CHECK), 'build_seconds': MapOf(Maybe(NUMBER)),
             'compile_seconds': MapOf(NUMBER), 'skipped_rows': MapOf(STR),
             'summary_sweep': Obj({'batches': ListOf(SUMMARY_BATCH)}),
             'routing': MapOf(Obj({'batch_size': BATCH, 'ms': Obj({'ours': NUMBER, 'boolean': NUMBER,
                                                                     'scatter': NUMBER}),
                                   'boolean_over_ours': Maybe(NUMBER), 'boolean_over_ours_ci': RATIO_CI,
                                   'forward_ms_ours': NUMBER})),
             'scoring': Obj({'batch_size': BATCH, 'scoring_s': NUMBER, 'train_step_s': NUMBER,
                             'ratio': Maybe(NUMBER), 'ratio_ci': RATIO_CI}),
             'breakdown': BREAKDOWN, 'breakdown_fast': BREAKDOWN, 'breakdown_fast_rows': ListOf(STR, length=2)})
_SWEEP_INFO = {'model': STR, 'short': STR, 'label': STR}
SWEEPS = {
    'batch': Obj(dict(_SWEEP_INFO, prune_rate=FINITE, rows=ListOf(Obj({
        'batch_size': BATCH, 'timm': NUMBER, 'ours': NUMBER, 'boolean': NUMBER, 'speedup_vs_timm': Maybe(NUMBER),
        'vs_boolean': Maybe(NUMBER)})))),
    'rate': Obj(dict(_SWEEP_INFO, batch_size=BATCH, rows=ListOf(Obj(
        {'prune_rate': FINITE, 'gflops': FINITE, 'flops_ratio': FINITE, 'timm': NUMBER, 'ours': NUMBER,
         'speedup_vs_timm': Maybe(NUMBER)}, {'boolean': NUMBER, 'vs_boolean': Maybe(NUMBER)})))),
}
SECTION = Obj({'section': STR, 'status': STR}, {'kind': STR, 'seconds': Maybe(NUMBER), 'reason': STR})
EARLIER_RUN = Obj({}, {'command': Maybe(STR), 'seconds': Maybe(NUMBER), 'compile_seconds_spent': Maybe(NUMBER),
                       'code_changed_since': ListOf(STR)})
RUN = Obj({'sections': ListOf(SECTION), 'command': STR},
          {'seconds': Maybe(NUMBER), 'compile_seconds_spent': Maybe(NUMBER),
           'code': MapOf(STR), 'earlier_runs': ListOf(EARLIER_RUN)})


def problem(value, spec: Spec, where: str) -> Optional[str]:
    return spec.problem(value, where)
