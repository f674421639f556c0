"""timm's compiled DeiT against its eager fp32 logits, batch size after batch size, as the benchmark compiles it.

The benchmark compiles timm's dense model once (``torch.compile(fullgraph=True, dynamic=False)``) and calls that one
object at the main batch size, then at the summary's 32 and 1, each a static recompile for the new shape, checking
the logits at every size against the eager fp32 model with the same weights (its ``logit_check``).  On an H200
(torch 2.11, fp16) DeiT-Ti's compiled model once gave logits 0.60 away from fp32 at batch 32 there (tolerance
3.3e-3), while fresh compiles of timm's DeiT-Ti (another random init) in a later process agreed within 1.4e-3.
This script repeats the benchmark's sequence on the benchmark's model and images, and beside it compiles every
batch size afresh (``torch._dynamo.reset()`` first, inductor's caches off), so one run tells a recompile of the
shared object from a fresh one; run it once with inductor's on-disk cache as the benchmark left it and once with
an empty one (``TORCHINDUCTOR_CACHE_DIR``) to tell the cache apart too (``bash benchmarks/gpu_check.sh compiled``
does both).  Where a check is off, the batch size is compiled afresh once more with SDPA's cuDNN backend excluded,
and the images that are off are listed; every line says what the compile caches did (hits, misses).

  python benchmarks/compiled_check.py [--device cuda] [--model deit_tiny_patch16_224] [--batch-sizes 256,32,1]

Prints one line per batch size and way of compiling: the max |logit difference|, the tolerance, and whether the
check passed; exits 1 if any failed.  fp16 autocast on a GPU, fp32 on CPU (where it is only a smoke test).
"""
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def build_parser():
    from benchmarks.model_zoo import MAX_BATCH, _int_list
    from utils.cli import OneLineParser
    p = OneLineParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda', help='default: %(default)s')
    p.add_argument('--model', default='deit_tiny_patch16_224',
                   help='a timm model name with a C&C model, or tiny/small/base (default: %(default)s)')
    p.add_argument('--batch-sizes', type=_int_list(1, MAX_BATCH), default=[256, 32, 1],
                   help='the batch sizes, in the order they are compiled (default: 256,32,1)')
    return p


def main(argv=None) -> int:
    from benchmarks.formulations import model_argument
    from models.fast_path import cpu_compiler_problem
    from utils import UserError, one_line
    args = build_parser().parse_args(argv)
    try:
        if not args.batch_sizes:  # given empty ('' or ','): nothing would be checked, and that would pass
            raise UserError('argument --batch-sizes: no batch size given')
        args.model = model_argument(args.model)
        if args.device == 'cuda' and not torch.cuda.is_available():
            raise UserError('argument --device: cuda: no CUDA GPU is available')
        problem = cpu_compiler_problem() if args.device == 'cpu' else None
        if problem is not None:
            raise UserError(f'argument --device: cpu: torch.compile builds its CPU kernels with a C++ compiler, and '
                            f'none works here ({one_line(problem)})')
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0 if all(ok for _, _, ok in check(args.model, args.batch_sizes, torch.device(args.device))) else 1


NO_CUDNN = 'fresh, cuDNN attention off'


def check(timm_name, batch_sizes, device):
    """[(batch, way, passed)] with one line printed per entry: first 'shared', one compiled object called at every
    batch size in turn (the benchmark's way), then 'fresh', a compile of its own for each batch size, with
    inductor's caches off (a cold compile, whatever the cache folder holds), then, only for the batch sizes where
    either was off, 'fresh, cuDNN attention off': the same fresh compile with SDPA's cuDNN backend excluded
    (PyTorch later turned that backend off for sequence lengths that are not a multiple of 128, such as DeiT's
    197).  Each line also says what the compile caches did (AOT autograd's and inductor's FX graph cache: hits,
    misses) and, for a check that is off, which images are (their max |logit difference|)."""
    from benchmarks.formulations import Checker, Context, seeded_models, without_cudnn_attention
    cc, dense = seeded_models(timm_name, 0, device)  # the benchmark's weights (seed 0)
    dtype = torch.float16 if device.type == 'cuda' else None
    shape = (3, *dense.patch_embed.img_size)
    cache = os.environ.get('TORCHINDUCTOR_CACHE_DIR', "inductor's default")
    gpu = f' {torch.cuda.get_device_name()}' if device.type == 'cuda' else ''
    print(f'{timm_name}, {device.type}{gpu}, torch {torch.__version__}, {"fp16" if dtype else "fp32"}; inductor '
          f'cache: {cache}', flush=True)
    # one checker per batch size: its eager fp32 reference is computed once, for every way
    checkers = {batch: Checker(lambda rate: cc, Context(device, dtype, batch, shape)) for batch in batch_sizes}
    out = []
    for way in ('shared', 'fresh', NO_CUDNN):
        run = None
        off = {batch for batch, _, ok in out if not ok}
        sizes = [b for b in batch_sizes if b in off] if way == NO_CUDNN else batch_sizes
        # the fresh compiles with inductor's caches off: else each would load what the shared object's compile
        # of that size wrote a moment before (the same graph), and tell nothing apart from it
        attention = without_cudnn_attention() if way == NO_CUDNN else contextlib.nullcontext()
        with torch.compiler.config.patch(force_disable_caches=way != 'shared'), attention:
            for batch in sizes:
                checker = checkers[batch]
                if run is None or way != 'shared':
                    torch._dynamo.reset()
                    run = torch.compile(dense, fullgraph=True, dynamic=False)
                ctx = checker.ctx
                before = _cache_counts()
                with torch.no_grad(), ctx.autocast():
                    run(ctx.batch_of_noise())  # the compile, on other images (as the benchmark's untimed first call)
                caches = _cache_counts(before)
                c, images_off = _check_images(checker, run)
                ok = c['max_abs_diff'] <= c['tolerance']
                print(f'batch {batch} {way}: max |logit - eager fp32| {c["max_abs_diff"]:.2e}, tolerance '
                      f'{c["tolerance"]:.2e} (eager {"fp16" if dtype else "fp32"}: {c["autocast_error"]:.2e}): '
                      f'{"ok" if ok else "OFF"}; caches: {caches}'
                      + (f'; images off: {images_off}' if images_off else ''), flush=True)
                out.append((batch, way, ok))
    return out


def _check_images(checker, run):
    """The checker's logit check of ``run`` and, for the images beyond its tolerance, 'index (max |difference|)'
    for the first eight, and how many there are."""
    c = checker.check(run, None)
    if c['max_abs_diff'] <= c['tolerance']:
        return c, ''
    ref, _ = checker.references[None]
    with torch.no_grad(), checker.ctx.autocast():
        per_image = (run(checker.x).float() - ref).abs().amax(dim=1)
    bad = [(i, d) for i, d in enumerate(per_image.tolist()) if d > c['tolerance']]
    return c, ', '.join(f'{i} ({d:.2e})' for i, d in bad[:8]) + f' ({len(bad)} of {len(per_image)})'


def _cache_counts(before=None):
    """The compile caches' counters (AOT autograd's and inductor's FX graph cache: hits, misses, bypasses, ...) so
    far in this process; with ``before`` (an earlier result), those that changed since, as 'name +n, ...' (or
    'none used')."""
    from torch._dynamo.utils import counters
    now = {f'{group}.{name}': n for group in ('aot_autograd', 'inductor') for name, n in counters[group].items()
           if 'cache' in name}
    if before is None:
        return now
    changed = [f'{name} +{n - before.get(name, 0)}' for name, n in sorted(now.items()) if n != before.get(name, 0)]
    return ', '.join(changed) or 'none used'


if __name__ == '__main__':
    sys.exit(main())
