"""What the benchmark times: the models of a run, the formulations of a forward pass, their rows and checks.

* Models: ``--models`` names (the shortcuts tiny/small/base or timm names), their report labels, and
  :func:`cc_model_for`, the one place that builds the C&C model of a timm name.
* Formulations: the original research code's boolean-mask formulation (a re-implementation), the earlier
  gather/scatter routing, blocks replaced by the identity (routing alone).
* :data:`REGISTRY`: every way a forward pass is timed (timm eager and compiled, ours eager and compiled, the
  boolean formulation, the fast inference path of models/fast_path.py per backend, with and without a CUDA
  graph), as ``name -> builder(cc model, dense timm twin, context) -> callable``; :func:`build_runs` turns the
  selected ones into the rows of a model and checks each one's logits against the eager fp32 model
  (:func:`logit_check`); :class:`CompileBudget` says when compiled rows are built.  A new inference path is one
  more entry; an entry that cannot run here (its module does not import, no Triton) is skipped with a note, and
  one that fails to build is left out with the reason.
"""
import contextlib
import copy
import importlib
import math
import time
import traceback
from dataclasses import dataclass, field, replace
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


def model_argument(name: str, flag: str = '--model') -> str:
    """:func:`resolve_model` of a script's ``flag``: a mistake is a UserError naming the flag (one line, exit 2)."""
    from utils import UserError
    try:
        return resolve_model(name)
    except ValueError as e:
        raise UserError(f'argument {flag}: {e}') from None


def rates_pruning_nothing(timm_name: str, rates: List[float], label: Optional[str] = None) -> Dict[float, str]:
    """{rate: why it prunes nothing} for each of ``rates`` that clips no (layer, patch) slot of ``timm_name``'s C&C
    model (its blocks and patches read from a build on the meta device, which allocates nothing); ``label`` names
    the model in the message (default: ``timm_name``)."""
    with torch.device('meta'):
        probe = models.create_model(timm_name)
    depth, patches = len(probe.blocks), probe.patch_embed.num_patches
    return {rate: f'{nothing} of {label or timm_name}: nothing would be pruned (a rate clips one from '
                  f'1/{depth * patches} on)'
            for rate in rates if (nothing := pruning.clips_nothing(depth, patches, rate))}


def architecture(timm_name: str) -> str:
    """The network of a timm name without its pretrained tag ('deit_tiny_patch16_224' of
    'deit_tiny_patch16_224.fb_in1k'): the tag names weights, and the benchmark's are a seeded random init."""
    return timm_name.partition('.')[0]


def short_name(timm_name: str) -> str:
    return SHORT_NAMES.get(architecture(timm_name), timm_name)


def dense_label(timm_name: str) -> str:
    """'DeiT-Ti' for the three DeiTs (under any pretrained tag), the timm name otherwise."""
    arch = architecture(timm_name)
    return f'DeiT-{SHORT_NAMES[arch]}' if arch in SHORT_NAMES else timm_name


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
    fast_autotune: bool = True    # fast-path rows time their kernel candidates at build (attention/mlp 'auto')
    seed: int = 0                 # of the batch the rows' logits are checked on
    compile_backend: Optional[Callable] = None  # torch.compile's backend for the compiled rows; None: its default

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def batch_of_noise(self) -> torch.Tensor:
        return torch.randn(self.batch, *self.shape, device=self.device)

    def check_batch(self) -> torch.Tensor:
        """The images every row's logits are checked on: seeded by the run's seed, one batch of the timed size."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.batch, *self.shape, generator=g).to(self.device)


# builder(cc model: pruned, or dense with every mask True; timm's dense twin with the same weights; context)
Builder = Callable[[nn.Module, nn.Module, Context], Callable]
REFERENCES = ('timm', 'ours')  # the eager rows: the baseline of every speed-up, the model every pruned row computes


@dataclass(frozen=True)
class Formulation:
    """One way of running a forward pass, timed as one row per model (dense) or per prune rate (pruned)."""
    name: str                  # the row's "kind" in the JSON, the "mode" in the summary, a --rows name
    prefix: str                # row key: prefix (dense row) or prefix_<rate tag> (pruned rows)
    label: str                 # the formulation column of the report
    build: Builder
    pruned: bool               # True: a row per prune rate; False: one dense row per model
    compiled: bool = False     # a torch.compile row: subject to --compile, --compile-models and the compile budget
    recompilable: bool = False  # compiled with ctx.compile_backend: compiled afresh when its logits are off
    prime: bool = False        # called once before timing (compilation, graph capture), untimed
    fixed_batch: bool = False  # built for one batch size (e.g. CUDA graphs): rebuilt for every batch size
    requires: Optional[str] = None   # a module that must import, else the row is skipped with a note
    devices: Tuple[str, ...] = ('cpu', 'cuda')
    compare: Tuple[Tuple[str, str], ...] = ()  # (row field, formulation name): speed-ups besides vs timm
    twin: str = 'timm'         # pruned rows: the dense formulation the main table compares the row with
    runs_here: Optional[Callable[[torch.device], Optional[str]]] = None  # why it cannot run on a device, or None

    def key(self, rate: Optional[float] = None) -> str:
        return f'{self.prefix}_{rate_tag(rate)}' if self.pruned else self.prefix


def _compiled(use_dense: bool) -> Builder:
    def build(cc: nn.Module, dense: nn.Module, ctx: Context) -> Callable:
        # dynamic=False: every batch size gets a graph of its own (static shapes), never a dynamic-shape one.
        model = dense if use_dense else cc
        if ctx.compile_backend is None:
            return torch.compile(model, fullgraph=True, dynamic=False)
        return torch.compile(model, fullgraph=True, dynamic=False, backend=ctx.compile_backend)
    return build


def _fast_path(backend: str, cuda_graph: Optional[bool], residual_dtype: Optional[torch.dtype]) -> Builder:
    """build_fast_path of the given model (dense: every mask True) for the context's batch size; ``cuda_graph``
    None: on CUDA only.  With ``ctx.fast_autotune`` the attention and the matrix products' candidates are timed
    per kept count at build, and a CUDA graph with and without programmatic dependent launch (the path as a user
    builds it); without, SDPA's own dispatch and cuBLAS, a graph without it, nothing timed."""
    def build(cc: nn.Module, dense: nn.Module, ctx: Context) -> Callable:
        from models.fast_path import build_fast_path
        graph = ctx.device.type == 'cuda' if cuda_graph is None else cuda_graph
        tune = ctx.fast_autotune
        return build_fast_path(cc, backend=backend, dtype=ctx.dtype or torch.float32, cuda_graph=graph,
                               batch_size=ctx.batch, residual_dtype=residual_dtype,
                               attention='auto' if tune else 'sdpa', mlp='auto' if tune else 'torch',
                               dependent_launch='auto' if tune else 'off')
    return build


def _triton_runs_on(device: torch.device) -> Optional[str]:
    from models import fast_kernels
    if fast_kernels.triton_runs_on(torch.empty(0, device=device)):
        return None
    if not fast_kernels.HAS_TRITON:
        return 'Triton is not installed'
    return ('Triton runs on CPU only in its interpreter (TRITON_INTERPRET=1 in the environment; slow: small '
            'models only)')


# The fast inference path (models.fast_path): (name, label, backend, CUDA graph, residual dtype, devices).
FAST_PATHS = (
    ('fast-torch', 'fast path, torch', 'torch', False, None, ('cpu', 'cuda')),
    ('fast-triton', 'fast path, triton', 'triton', False, None, ('cpu', 'cuda')),
    ('fast-triton-graph', 'fast path, triton, CUDA graph', 'triton', True, None, ('cuda',)),
    ('fast-triton-res16', 'fast path, triton, CUDA graph, fp16 residual', 'triton', True, torch.float16, ('cuda',)),
    ('fast-compile', 'fast path, compile', 'compile', None, None, ('cpu', 'cuda')),
)


def _fast_formulations() -> List[Formulation]:
    out = []
    for name, label, backend, graph, residual, devices in FAST_PATHS:
        for pruned in (False, True):
            out.append(Formulation(
                name if pruned else f'{name}-dense', name.replace('-', '_'), label,
                _fast_path(backend, graph, residual),
                pruned=pruned, compiled=backend == 'compile', prime=True, fixed_batch=True,
                requires='models.fast_path', devices=devices, twin=f'{name}-dense',
                compare=(('vs_boolean', 'boolean'),) if pruned else (),
                runs_here=_triton_runs_on if backend == 'triton' else None))
    return out


def _register(*formulations: Formulation) -> Dict[str, Formulation]:
    return {f.name: f for f in formulations}


# Row order of a model: the dense rows in this order, then for each prune rate its pruned rows in this order.
# 'timm' (the baseline of every speed-up) and 'ours' (the reference of the pruned rows) come first.
REGISTRY: Dict[str, Formulation] = _register(
    Formulation('timm', 'timm', 'timm', lambda cc, dense, ctx: dense, pruned=False),
    Formulation('timm-compiled', 'timm_compiled', 'timm, compiled', _compiled(use_dense=True), pruned=False,
                compiled=True, prime=True, recompilable=True),
    Formulation('ours', 'ours', 'ours', lambda cc, dense, ctx: cc, pruned=True,
                compare=(('vs_boolean', 'boolean'),)),
    Formulation('boolean', 'boolean', 'boolean mask, original formulation',
                lambda cc, dense, ctx: BooleanMaskViT(dense, masks_of(cc)).to(ctx.device).eval(), pruned=True),
    Formulation('ours-compiled', 'compiled', 'ours, compiled', _compiled(use_dense=False), pruned=True,
                compiled=True, prime=True, recompilable=True, twin='timm-compiled',
                compare=(('vs_boolean', 'boolean'),)),
    *_fast_formulations(),
)


def unavailable(formulation: Formulation, device: Optional[torch.device] = None) -> Optional[str]:
    """Why a formulation cannot run in this environment (its module does not import, or it cannot run on
    ``device``), or None."""
    if formulation.requires is not None:
        try:
            importlib.import_module(formulation.requires)
        except ImportError as e:
            return f'{formulation.requires} is not importable ({e})'
    if device is not None and formulation.runs_here is not None:
        return formulation.runs_here(device)
    return None


def select(device: torch.device, compile_rows: bool, registry: Optional[Dict[str, Formulation]] = None,
           names: Optional[List[str]] = None) -> Tuple[List[Formulation], Dict[str, str]]:
    """The formulations to time on ``device``, in registry order: those named (every one registered for the
    device when ``names`` is None), compiled ones only with ``compile_rows``; and a note for each of them that
    is left out because it cannot run here."""
    chosen, skipped = [], {}
    for f in (REGISTRY if registry is None else registry).values():
        if names is not None and f.name not in names:
            continue
        if device.type not in f.devices:
            continue  # not meant for this device (e.g. a GPU-only path on CPU): no note
        if f.compiled and not compile_rows:
            continue
        reason = unavailable(f, device)
        if reason:
            skipped[f.name] = reason
        else:
            chosen.append(f)
    return chosen, skipped


class CompileBudget:
    """When compiled rows (torch.compile: timm's, ours, the fast path's 'compile' backend) are built: only at
    batch sizes of at least ``min_batch``, and only until ``seconds`` of compilation (first calls) are spent;
    a row refused is left out with the reason."""

    def __init__(self, seconds: Optional[float] = None, min_batch: int = 1):
        self.seconds = math.inf if seconds is None else seconds
        self.min_batch = min_batch
        self.spent = 0.0

    def refuses(self, f: Formulation, batch: int) -> Optional[str]:
        if not f.compiled:
            return None
        if batch < self.min_batch:
            return f'compiled rows only at batch >= {self.min_batch} (--compile-min-batch)'
        if self.spent >= self.seconds:
            return f'compile budget of {self.seconds:.0f} s spent ({self.spent:.0f} s; --compile-budget)'
        return None

    def spend(self, f: Formulation, seconds: float) -> None:
        if f.compiled:
            self.spent += seconds


# ----------------------------------------------------------------------------------------------------------------
# Checking a row: its logits against the eager fp32 model with the same weights and masks

TOP1_SHARE = 0.99      # top-1 identical on at least 99% of the images with a clear margin
MIN_CLEAR_SHARE = 0.5  # ... judged only when at least half the images have one
ABSOLUTE_SLACK = 1e-3  # tolerance = 2 x the eager model's own autocast error + this


@contextlib.contextmanager
def cudnn_tf32(allowed: bool):
    """TF32 convolutions (cuDNN; on by default, unlike TF32 matrix products) allowed or not while inside."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def eager_fp32(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The eager model's logits in fp32 (no autocast, no TF32 convolution): the reference every row is checked
    against."""
    with torch.autocast(x.device.type, enabled=False), cudnn_tf32(False):
        return model(x).float()


@torch.no_grad()
def autocast_error(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, ctx: Context) -> float:
    """max |logit difference| of the eager model at the run's precision from its own fp32 logits: what rounding
    alone costs, the scale of a row's tolerance.  Under autocast (fp16/bf16) the eager model's autocast forward;
    in fp32 on a GPU its forward with cuDNN's default TF32 convolution (the fast path's Triton fp32 dots use TF32
    too); 0 in fp32 on a CPU."""
    if ctx.dtype is None and ctx.device.type != 'cuda':
        return 0.0
    with ctx.autocast(), cudnn_tf32(True):
        return (model(x).float() - reference).abs().max().item()


def logit_check(out: torch.Tensor, reference: torch.Tensor, baseline: float) -> Dict:
    """A row's logits ``out`` against the eager fp32 ``reference`` on the same images (the rule of
    tests/test_fast_path.py for the fp16 fast path): the max |logit difference| must be at most
    2 x ``baseline`` + 1e-3, where ``baseline`` is the eager model's own autocast error (0 in fp32); top-1 must
    agree on >= 99% of the images whose fp32 top-2 margin exceeds 2 x ``baseline``.  A random-init model has
    near-ties that half precision cannot resolve, in timm's forward as in ours, so top-1 agreement over all
    images is reported beside it, not judged.  With fewer than half the images clear, top-1 is not judged at all
    (``top1_ok`` None: too few images say too little); an infinite tolerance (the eager model's own error) never
    passes."""
    out, reference = out.float(), reference.float()
    diff = (out - reference).abs().max().item()
    tolerance = 2 * baseline + ABSOLUTE_SLACK
    if reference.shape[1] > 1:
        top2 = reference.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * baseline
    else:  # one class: no tie possible
        clear = torch.ones(reference.shape[0], dtype=torch.bool, device=reference.device)
    agree = out.argmax(1) == reference.argmax(1)
    n_clear = int(clear.sum())
    on_clear = agree[clear].float().mean().item() if n_clear else None
    return {'max_abs_diff': diff, 'tolerance': tolerance, 'autocast_error': baseline,
            'within_tolerance': bool(diff <= tolerance and math.isfinite(tolerance)),
            'top1_agreement': agree.float().mean().item(), 'top1_agreement_clear': on_clear, 'clear_images': n_clear,
            'images': int(out.shape[0]),
            'top1_ok': None if on_clear is None or n_clear < MIN_CLEAR_SHARE * out.shape[0]
            else bool(on_clear >= TOP1_SHARE)}


# ----------------------------------------------------------------------------------------------------------------
# Building the rows of a model

@dataclass
class Runs:
    """The callables of one model's rows and what the report says about each (keyed by row key)."""
    runs: Dict[str, Callable] = field(default_factory=dict)
    meta: Dict[str, Dict] = field(default_factory=dict)
    formulation: Dict[str, Formulation] = field(default_factory=dict)
    checks: Dict[str, Dict] = field(default_factory=dict)
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


class Checker:
    """The eager fp32 logits of every mask set on one batch of the timed size, computed when first needed, and
    :func:`logit_check` of any row against them."""

    def __init__(self, model_of: Callable[[Optional[float]], nn.Module], ctx: Context):
        self.model_of, self.ctx = model_of, ctx
        self.x = ctx.check_batch()
        self.references: Dict[Optional[float], Tuple[torch.Tensor, float]] = {}

    def check(self, run: Callable, rate: Optional[float]) -> Dict:
        if rate not in self.references:
            model = self.model_of(rate)
            ref = eager_fp32(model, self.x)
            self.references[rate] = ref, autocast_error(model, self.x, ref, self.ctx)
        ref, baseline = self.references[rate]
        with torch.no_grad(), self.ctx.autocast():
            out = run(self.x)
        return logit_check(out, ref, baseline)


def _note(key: str, reason: str) -> None:
    print(f'note: row {key} not timed: {reason}', flush=True)


# How a compiled row whose logits came out off is compiled again (recompile_if_off), in this order until one passes.
FRESH = 'fresh'
FRESH_NO_CUDNN = 'fresh, without cuDNN attention'


def fresh_inductor() -> Callable:
    """A torch.compile backend: inductor as torch.compile's default runs it, with its caches off (no FX graph or
    AOT autograd cache entry is read).  Each call gives a new backend object, and dynamo reuses a compiled frame only
    for the backend that compiled it (a second ``torch.compile`` of the same module with the default backend, or of
    a copy of it, reuses the first one's graph, measured), so a model compiled with it is traced and compiled anew
    beside any earlier compile of the same model, which stays as it was."""
    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, config_patches={'force_disable_caches': True})
    return backend


@contextlib.contextmanager
def without_cudnn_attention():
    """SDPA's backends without cuDNN's while inside (flash, memory-efficient, math: the order torch tries)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


class WithoutCudnnAttention:
    """A compiled model called with SDPA's cuDNN backend excluded: its compile (the first call) and every later
    call, so that a recompile too chooses among the other backends (the choice is made when the graph is traced;
    dynamo does not guard on it).  Entering the context costs each call about 10 us of host time (measured on a
    2-core CPU host), timed with the row."""
    def __init__(self, run: Callable):
        self.run = run

    def __call__(self, x):
        with without_cudnn_attention():
            return self.run(x)


def recompile_if_off(f: Formulation, run: Callable, check: Dict, model: nn.Module, dense: nn.Module, ctx: Context,
                     checker: 'Checker', rate: Optional[float], key: str,
                     budget: 'CompileBudget') -> Tuple[Callable, Dict]:
    """(the callable to time, its check): ``run`` and ``check`` as they are, unless ``f`` is a torch.compile row
    whose logit check failed.  Then the model is compiled again, each time afresh (:func:`fresh_inductor`: traced
    and compiled anew, inductor's caches off), first as before (FRESH), then, if still off, with SDPA's cuDNN
    attention excluded (FRESH_NO_CUDNN: PyTorch itself later stopped choosing that backend for sequence lengths
    that are not a multiple of 128, such as DeiT's 197), until one passes, while the compile budget allows.  One
    compile of timm's DeiT-Ti was once far off fp32 at one batch size where fresh compiles of the same model were
    not; a row compiled again that passes is a correct compile of the same model, and is timed.  The check
    returned is the last compile's, with ``recompiled``: the compiles before it, each {'way', 'failure'} ('as
    built' for the row's own), and ``way``: how the last one was compiled.  If none passes, the last one is kept
    and, failed, is left out of the comparisons as any row whose check fails."""
    from benchmarks.report import check_failure
    failure = check_failure(check)
    if failure is None or not f.recompilable:
        return run, check
    earlier = [{'way': 'as built', 'failure': failure}]
    for way in (FRESH, FRESH_NO_CUDNN):
        said = f'note: row {key} at batch {ctx.batch}, compiled {earlier[-1]["way"]}: {earlier[-1]["failure"]}'
        refused = budget.refuses(f, ctx.batch)
        if refused:
            print(f'{said}; not compiled again: {refused}', flush=True)
            break
        start = time.perf_counter()
        try:
            with without_cudnn_attention() if way == FRESH_NO_CUDNN else contextlib.nullcontext():
                again, _ = build_one(f, model, dense, replace(ctx, compile_backend=fresh_inductor()))  # compiles
            if way == FRESH_NO_CUDNN:
                again = WithoutCudnnAttention(again)
            c = checker.check(again, rate)
        except Exception as e:  # noqa: BLE001  (the row as it was is still timed, and still left out)
            traceback.print_exc()
            print(f'{said}; compiling it again ({way}) failed: {type(e).__name__}: {e}', flush=True)
            break
        finally:
            budget.spend(f, time.perf_counter() - start)
        run, check = again, {**c, 'way': way, 'recompiled': list(earlier)}
        failure = check_failure(c)
        print(f'{said}; compiled again ({way}): {failure or "passed"}', flush=True)
        if failure is None:
            break
        earlier.append({'way': way, 'failure': failure})
    return run, check


def build_runs(timm_name: str, cc: nn.Module, dense: nn.Module, pruned: Dict[float, nn.Module],
               formulations: List[Formulation], ctx: Context, budget: Optional[CompileBudget] = None) -> Runs:
    """The rows of one model: every dense formulation on ``cc`` (all masks True) and ``dense``, then for each
    rate every pruned formulation on the pruned model.  Every row is checked (:func:`logit_check`) against the
    eager fp32 model with its masks (``cc`` for the dense rows) on one batch of the timed size (rows that
    compile or capture for one shape are only ever called at that size).  A row other than the references that
    fails to build or run, or that the compile budget refuses, is left out with the reason (``skipped``)."""
    out = Runs()
    budget = budget or CompileBudget()
    checker = Checker(lambda rate: cc if rate is None else pruned[rate], ctx)
    depth = len(cc.blocks)
    dense_macs = models.count_macs(cc)
    todo = [(f, None, cc) for f in formulations if not f.pruned]
    todo += [(f, rate, model) for rate, model in pruned.items() for f in formulations if f.pruned]
    for f, rate, model in todo:
        key = f.key(rate)
        refused = budget.refuses(f, ctx.batch)
        if refused:
            out.skipped[key] = refused
            _note(key, refused)
            continue
        start = time.perf_counter()
        try:
            run, seconds = build_one(f, model, dense, ctx)
            check = checker.check(run, rate)
        except Exception as e:  # noqa: BLE001  (one row must not sink a long run; the references must work)
            if f.name in REFERENCES:
                raise
            traceback.print_exc()
            out.skipped[key] = f'building or running it failed: {type(e).__name__}: {e}'
            _note(key, out.skipped[key])
            continue
        finally:
            budget.spend(f, time.perf_counter() - start)
        again = time.perf_counter()
        run, check = recompile_if_off(f, run, check, model, dense, ctx, checker, rate, key, budget)
        seconds += time.perf_counter() - again  # a compile that is off costs the compiles that replace it
        out.runs[key], out.formulation[key], out.build_seconds[key], out.checks[key] = run, f, seconds, check
        if f.pruned:
            label = f'{pruned_label(timm_name, rate)} ({f.label})'
            macs, kept = models.count_macs(model), models.kept_token_counts(model)
        else:
            label = f'{dense_label(timm_name)} ({f.label})'
            macs, kept = dense_macs, [cc.num_tokens] * depth
        out.meta[key] = {'label': label, 'kind': f.name, 'dense': not f.pruned, 'rate': rate or 0.0,
                         'macs': macs, 'kept': kept, 'build_seconds': seconds, 'check': check}
        if hasattr(run, 'describe'):
            out.meta[key]['fast_path'] = run.describe()
    return out


def rows_to_rebuild(rows: List[Dict], cc_of: Callable[[Optional[float]], nn.Module], dense: nn.Module,
                    ctx: Context) -> Runs:
    """The rows of a main table an earlier run timed (its report rows: ``key``, ``kind``, ``prune_rate``) as
    :func:`rebuild_for_batch` takes them, for another batch size: eager rows built (the model, or a wrapper of it),
    compiled rows wrapped but not compiled (their first call compiles), fixed-batch rows left for it to build."""
    out = Runs()
    for row in rows:
        f = REGISTRY[row['kind']]
        rate = row['prune_rate'] if f.pruned else None
        out.formulation[row['key']] = f
        out.meta[row['key']] = {'rate': row['prune_rate'], 'dense': not f.pruned}
        out.runs[row['key']] = None if f.fixed_batch else f.build(cc_of(rate), dense, ctx)
    return out


@dataclass
class Rebuilt:
    """The callables of a model's rows at another batch size, what was left out there, and the checks of the
    rows built or compiled again for it."""
    runs: Dict[str, Callable]
    skipped: Dict[str, str]
    checks: Dict[str, Dict]
    fast_path: Dict[str, Dict]
    build_seconds: Dict[str, float]


def rebuild_for_batch(runs: Runs, cc_of: Callable[[Optional[float]], nn.Module], dense: nn.Module,
                      ctx: Context, budget: Optional[CompileBudget] = None) -> Rebuilt:
    """The callables of ``runs`` for another batch size (``ctx.batch``): rows built for one batch size
    (``fixed_batch``) are built again, compiled rows are called once untimed (a static recompile for the new
    shape); both are checked again (:func:`logit_check`) at that size, as they run new code.  Eager rows are
    reused.  A row that fails, or that the compile budget refuses, is left out of this batch size."""
    budget = budget or CompileBudget()
    checker = Checker(cc_of, ctx)
    out = Rebuilt({}, {}, {}, {}, {})
    for key, run in runs.runs.items():
        f = runs.formulation[key]
        rate = runs.meta[key]['rate'] if f.pruned else None
        if not (f.fixed_batch or f.prime):
            out.runs[key] = run
            continue
        refused = budget.refuses(f, ctx.batch)
        if refused:
            out.skipped[key] = refused
            _note(f'{key} at batch {ctx.batch}', refused)
            continue
        start = time.perf_counter()
        try:
            if f.fixed_batch:
                run, _ = build_one(f, cc_of(rate), dense, ctx)
            else:
                with torch.set_grad_enabled(ctx.grad), ctx.autocast():
                    run(ctx.batch_of_noise())
                engine.synchronize(ctx.device)
            out.checks[key] = checker.check(run, rate)
        except Exception as e:  # noqa: BLE001
            if f.name in REFERENCES:
                raise
            traceback.print_exc()
            out.skipped[key] = f'building or running it failed: {type(e).__name__}: {e}'
            _note(f'{key} at batch {ctx.batch}', out.skipped[key])
            continue
        finally:
            budget.spend(f, time.perf_counter() - start)
        run, out.checks[key] = recompile_if_off(f, run, out.checks[key], cc_of(rate), dense, ctx, checker, rate,
                                                key, budget)
        out.runs[key], out.build_seconds[key] = run, time.perf_counter() - start
        if hasattr(run, 'describe'):
            out.fast_path[key] = run.describe()
    return out
