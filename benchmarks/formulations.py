"""What the benchmark times: the models of a run, the formulations of a pruned forward pass, and their rows.

* Models: ``--models`` names (the shortcuts tiny/small/base or timm names), their report labels, and
  :func:`cc_model_for`, the one place that builds the C&C model of a timm name.
* Formulations: the original research code's boolean-mask formulation (a re-implementation), the earlier
  gather/scatter routing, blocks replaced by the identity (routing alone).
* :data:`REGISTRY`: every way a forward pass is timed, as ``name -> builder(cc model, dense timm twin,
  context) -> callable``; :func:`build_runs` turns the selected ones into the rows of a model.  A new
  inference path is one more entry; an entry whose module cannot be imported is skipped with a note.
"""
import contextlib
import copy
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

import engine
import models  # noqa: F401  (registers cc_deit_*)
import pruning

# ----------------------------------------------------------------------------------------------------------------
# Models: names, labels and the C&C model of a timm name

SHORTCUTS = {'tiny': 'deit_tiny_patch16_224', 'small': 'deit_small_patch16_224', 'base': 'deit_base_patch16_224'}
# Report labels of the three DeiTs (the paper's Ti/S/B); any other model is labelled by its timm name.
SHORT_NAMES = {'deit_tiny_patch16_224': 'Ti', 'deit_small_patch16_224': 'S', 'deit_base_patch16_224': 'B'}


def cc_model_supported(timm_name: str) -> bool:
    """Whether :func:`cc_model_for` can build a C&C model of ``timm_name`` (timm's registry and the model it
    builds on the meta device; checked before any work)."""
    try:
        models.check_model_name(timm_name)
    except ValueError:
        return False
    return True


def cc_model_for(timm_name: str, seed: int, device: torch.device) -> nn.Module:
    """The C&C model of a timm ViT: a seeded random init, every mask True, in eval mode on ``device``; timm's
    model converted in place (the one place the benchmark builds one)."""
    torch.manual_seed(seed)
    return models.create_model(timm_name).to(device).eval()


def resolve_model(name: str) -> str:
    """The timm name of a ``--models`` entry: a shortcut (tiny/small/base) or a timm name with a C&C model."""
    if name in SHORTCUTS:
        return SHORTCUTS[name]
    if cc_model_supported(name):
        return name
    raise ValueError(f'unknown model {name!r}; choose from {", ".join(SHORTCUTS)} or a timm model name with a '
                     f'C&C model (e.g. {SHORTCUTS["tiny"]})')


def short_name(timm_name: str) -> str:
    return SHORT_NAMES.get(timm_name, timm_name)


def dense_label(timm_name: str) -> str:
    """'DeiT-Ti' for the three DeiTs, the timm name otherwise."""
    return f'DeiT-{SHORT_NAMES[timm_name]}' if timm_name in SHORT_NAMES else timm_name


def rate_tag(rate: float) -> str:
    return f'{round(rate * 100):02d}'


def pruned_label(timm_name: str, rate: float) -> str:
    """'C&C-Ti-25' (DeiT-Ti at prune rate 0.25); 'C&C-<timm name>-25' for other models."""
    return f'C&C-{short_name(timm_name)}-{rate_tag(rate)}'


def image_shape(model: nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) of the model's input."""
    return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def masks_of(cc_model: nn.Module) -> List[torch.Tensor]:
    """The per-block concat-order masks (the ``models.MASK_KEY`` buffers)."""
    return [cc_model.get_buffer(f'blocks.{i}.{models.MASK_KEY}') for i in range(len(cc_model.blocks))]


def timm_twin(cc_model: nn.Module, timm_name: str, device: torch.device) -> nn.Module:
    """timm's dense model with the cc model's weights (state dict minus the mask buffers)."""
    dense = timm.create_model(timm_name)
    state = {k: v for k, v in cc_model.state_dict().items() if not k.endswith(models.MASK_KEY)}
    dense.load_state_dict(state, strict=True)
    return dense.to(device).eval()


def seeded_models(timm_name: str, seed: int, device: torch.device) -> Tuple[nn.Module, nn.Module]:
    """Our model with all masks True (a seeded random init) and timm's dense twin with the same weights."""
    cc = cc_model_for(timm_name, seed, device)
    return cc, timm_twin(cc, timm_name, device)


def plan(scores: Optional[torch.Tensor], depth: int, num_patches: int, rate: float, seed: int) -> torch.Tensor:
    if scores is None:
        return pruning.random_masks(depth, num_patches, rate, generator=torch.Generator().manual_seed(seed))
    return pruning.plan_masks(scores, rate)


def pruned_copy(cc: nn.Module, masks: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(cc)
    pruning.apply_masks(model, masks)
    return model.eval()


def max_diff(a: Callable, b: Callable, x: torch.Tensor, autocast) -> float:
    with torch.no_grad(), autocast():
        return (a(x).float() - b(x).float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# The original research code's formulation (a re-implementation for comparison; not used by the project)

class BooleanMaskViT(nn.Module):
    """RE-IMPLEMENTATION of the original C&C research code's approach, for benchmarking only.

    Every block boolean-indexes its input with its concat-order mask, runs the (unmodified timm) block on the
    kept tokens and concatenates kept first, clipped after: the reference semantics of docs/method.md taken
    literally.  Boolean indexing has a data-dependent output shape (``nonzero``: a host-device sync per block
    on a GPU, and no ``torch.compile(fullgraph=True)``).  It wraps the dense timm model it is given and shares
    its weights.
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


def configure_dynamo() -> None:
    """Several same-class models are compiled per run (one per prune rate, each a recompile of the same
    forward): allow that, and fail loudly rather than fall back to eager if the limit is ever hit."""
    cfg = torch._dynamo.config
    for name, value in (('recompile_limit', 64), ('cache_size_limit', 64), ('fail_on_recompile_limit_hit', True)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)


# ----------------------------------------------------------------------------------------------------------------
# The registry of formulations

@dataclass
class Context:
    """What a builder may need: where and how the rows will run."""
    device: torch.device
    dtype: Optional[torch.dtype]  # autocast precision of the timed passes; None = fp32
    batch: int
    shape: Tuple[int, int, int]   # one image
    grad: bool = False            # the original code's protocol times with autograd on

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def batch_of_noise(self) -> torch.Tensor:
        return torch.randn(self.batch, *self.shape, device=self.device)


# builder(cc model: pruned, or dense with every mask True; timm's dense twin with the same weights; context)
Builder = Callable[[nn.Module, nn.Module, Context], Callable]


@dataclass(frozen=True)
class Formulation:
    """One way of running a forward pass, timed as one row per model (dense) or per prune rate (pruned)."""
    name: str                  # the row's "kind" in the JSON, the "mode" in the summary
    prefix: str                # row key: prefix (dense row) or prefix_<rate tag> (pruned rows)
    label: str                 # the formulation column of the report
    build: Builder
    pruned: bool               # True: a row per prune rate; False: one dense row per model
    compiled: bool = False     # a torch.compile row: subject to --compile / --compile-models
    prime: bool = False        # called once before timing (compilation, graph capture), untimed
    fixed_batch: bool = False  # built for one batch size (e.g. CUDA graphs): rebuilt for every batch size
    requires: Optional[str] = None   # a module that must import, else the row is skipped with a note
    devices: Tuple[str, ...] = ('cpu', 'cuda')
    compare: Tuple[Tuple[str, str], ...] = ()  # (row field, formulation name): speed-ups besides vs timm
    check: Optional[str] = None  # JSON key of its max |logit difference| from the eager reference

    def key(self, rate: Optional[float] = None) -> str:
        return f'{self.prefix}_{rate_tag(rate)}' if self.pruned else self.prefix

    def check_key(self, rate: Optional[float] = None) -> str:
        if self.check:
            return self.check.format(tag=rate_tag(rate) if self.pruned else '')
        return f'{self.key(rate)}_vs_{"ours" if self.pruned else "timm"}_max_abs'


def _compiled(use_dense: bool) -> Builder:
    def build(cc: nn.Module, dense: nn.Module, ctx: Context) -> Callable:
        return torch.compile(dense if use_dense else cc, fullgraph=True)
    return build


def _fast_path(backend: str) -> Builder:
    def build(cc: nn.Module, dense: nn.Module, ctx: Context) -> Callable:
        from models.fast_path import build_fast_path
        return build_fast_path(copy.deepcopy(cc), backend=backend, dtype=ctx.dtype or torch.float32,
                               cuda_graph=ctx.device.type == 'cuda', batch_size=ctx.batch)
    return build


def _register(*formulations: Formulation) -> Dict[str, Formulation]:
    return {f.name: f for f in formulations}


# Row order of a model: the dense rows in this order, then for each prune rate its pruned rows in this order.
# 'timm' (the baseline of every speed-up) and 'ours' (the reference of the pruned rows) come first.
REGISTRY: Dict[str, Formulation] = _register(
    Formulation('timm', 'timm', 'timm', lambda cc, dense, ctx: dense, pruned=False),
    Formulation('timm-compiled', 'timm_compiled', 'timm, compiled', _compiled(use_dense=True), pruned=False,
                compiled=True, prime=True, compare=(('speedup_vs_timm_compiled', 'timm-compiled'),)),
    Formulation('ours', 'ours', 'ours', lambda cc, dense, ctx: cc, pruned=True,
                compare=(('vs_boolean', 'boolean'),)),
    Formulation('boolean', 'boolean', 'boolean mask, original formulation',
                lambda cc, dense, ctx: BooleanMaskViT(dense, masks_of(cc)).to(ctx.device).eval(), pruned=True,
                check='ours_vs_boolean_{tag}_max_abs'),
    Formulation('ours-compiled', 'compiled', 'ours, compiled', _compiled(use_dense=False), pruned=True,
                compiled=True, prime=True, check='compiled_vs_ours_{tag}_max_abs',
                compare=(('vs_boolean', 'boolean'), ('speedup_vs_timm_compiled', 'timm-compiled'))),
    # The fast GPU inference path (models.fast_path, being written): dense and pruned rows per backend.
    *(Formulation(f'fast-{backend}{"" if pruned else "-dense"}', f'fast_{backend}', f'fast path, {backend}',
                  _fast_path(backend), pruned=pruned, prime=True, fixed_batch=True, requires='models.fast_path',
                  devices=('cuda',), compare=(('vs_boolean', 'boolean'),) if pruned else ())
      for backend in ('triton', 'compile') for pruned in (False, True)),
)


def unavailable(formulation: Formulation) -> Optional[str]:
    """Why a formulation cannot run in this environment (its module does not import), or None."""
    if formulation.requires is None:
        return None
    try:
        importlib.import_module(formulation.requires)
    except ImportError as e:
        return f'{formulation.requires} is not importable ({e})'
    return None


def select(device: torch.device, compile_rows: bool,
           registry: Optional[Dict[str, Formulation]] = None) -> Tuple[List[Formulation], Dict[str, str]]:
    """The formulations to time on ``device`` (compiled ones only with ``compile_rows``), and a note for each
    registered one that is left out because it cannot run here."""
    chosen, skipped = [], {}
    for f in (REGISTRY if registry is None else registry).values():
        if device.type not in f.devices:
            continue  # not meant for this device (e.g. a GPU-only path on CPU): no note
        if f.compiled and not compile_rows:
            continue
        reason = unavailable(f)
        if reason:
            skipped[f.name] = reason
        else:
            chosen.append(f)
    return chosen, skipped


# ----------------------------------------------------------------------------------------------------------------
# Building the rows of a model

@dataclass
class Runs:
    """The callables of one model's rows and what the report says about each (keyed by row key)."""
    runs: Dict[str, Callable] = field(default_factory=dict)
    meta: Dict[str, Dict] = field(default_factory=dict)
    formulation: Dict[str, Formulation] = field(default_factory=dict)
    checks: Dict[str, float] = field(default_factory=dict)
    build_seconds: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)

    def keys_of(self, dense: bool, rate: Optional[float] = None) -> List[str]:
        """Row keys of the dense rows, or of the pruned rows at ``rate``."""
        return [k for k, m in self.meta.items() if m['dense'] == dense and (dense or m['rate'] == rate)]


def build_one(f: Formulation, cc: nn.Module, dense: nn.Module, ctx: Context) -> Tuple[Callable, float]:
    """Build one row's callable (and call it once, untimed, when it compiles or captures); seconds taken."""
    start = time.perf_counter()
    run = f.build(cc, dense, ctx)
    if f.prime:
        with torch.set_grad_enabled(ctx.grad), ctx.autocast():
            run(ctx.batch_of_noise())
        engine.synchronize(ctx.device)
    return run, time.perf_counter() - start


def build_runs(timm_name: str, cc: nn.Module, dense: nn.Module, pruned: Dict[float, nn.Module],
               formulations: List[Formulation], ctx: Context, x_check: torch.Tensor) -> Runs:
    """The rows of one model: every dense formulation on ``cc`` (all masks True) and ``dense``, then for each
    rate every pruned formulation on the pruned model.  Each row but the references ('timm' for the dense rows,
    'ours' for the pruned ones) is checked against its reference (max |logit difference|) on ``x_check``, or on a
    batch of the timed size (dense rows, and rows that compile or capture for one shape).
    A formulation with a ``requires`` module that fails to build is skipped with a note, not fatal."""
    out = Runs()
    depth = len(cc.blocks)
    dense_macs = models.count_macs(cc)
    todo = [(f, None, cc) for f in formulations if not f.pruned]
    todo += [(f, rate, model) for rate, model in pruned.items() for f in formulations if f.pruned]
    x_full = None
    for f, rate, model in todo:
        key = f.key(rate)
        try:
            run, seconds = build_one(f, model, dense, ctx)
        except Exception as e:  # noqa: BLE001  (an optional path must not sink a long run)
            if f.requires is None:
                raise
            out.skipped[key] = f'{type(e).__name__}: {e}'
            print(f'note: {f.name} row {key} not timed: building it failed ({out.skipped[key]})', flush=True)
            continue
        out.runs[key], out.formulation[key], out.build_seconds[key] = run, f, seconds
        if f.pruned:
            label = f'{pruned_label(timm_name, rate)} ({f.label})'
            macs, kept = models.count_macs(model), models.kept_token_counts(model)
        else:
            label = f'{dense_label(timm_name)} ({f.label})'
            macs, kept = dense_macs, [cc.num_tokens] * depth
        out.meta[key] = {'label': label, 'kind': f.name, 'dense': not f.pruned, 'rate': rate or 0.0,
                         'macs': macs, 'kept': kept}
        reference = REGISTRY['ours' if f.pruned else 'timm'].key(rate)
        if key != reference:
            # Compiled rows, rows built for one batch size and dense rows are checked at the timed batch size:
            # a compiled model called at another size recompiles with a dynamic batch dimension, and dynamo
            # then serves the timed passes from that newer graph instead of the static one.
            if f.pruned and not f.prime:
                x = x_check
            else:
                x = x_full = x_full if x_full is not None else ctx.batch_of_noise()
            out.checks[f.check_key(rate)] = max_diff(run, out.runs[reference], x, ctx.autocast)
    return out


def rebuild_for_batch(runs: Runs, cc_of: Callable[[Optional[float]], nn.Module], dense: nn.Module,
                      ctx: Context) -> Dict[str, Callable]:
    """The callables of ``runs`` for another batch size (``ctx.batch``): rows built for one batch size
    (``fixed_batch``) are built again; compiled rows are called once untimed (a recompile for the new shape)."""
    out = {}
    for key, run in runs.runs.items():
        f = runs.formulation[key]
        rate = runs.meta[key]['rate'] if f.pruned else None
        if f.fixed_batch:
            run, _ = build_one(f, cc_of(rate), dense, ctx)
        elif f.prime:
            with torch.set_grad_enabled(False), ctx.autocast():
                run(ctx.batch_of_noise())
        out[key] = run
    return out
