"""Why the linear layers of a pruned DeiT lose part of their FLOPs ratio on a GPU: cuBLAS throughput per shape.

On an H200 (fp16, batch 256) the dense DeiT-Ti's matrix products took 1.24 times as long as C&C-Ti-30's, where it
has 1.42 times the tokens: cuBLAS picks other kernels at the pruned row counts M = batch x kept tokens than at the
dense M = batch x 197, some of them slower per row.  This script measures, in one process, each of DeiT's four products
(qkv, attention projection, fc1, fc2) at M = batch x n for the dense count and the kept counts of a pruned model,
through each route torch offers to cuBLAS (each product's time replayed from a CUDA graph, the GPU's time):

  linear        F.linear with its bias (torch's default, as the fast path calls it)
  mm+bias       the product without bias, then the bias added (two kernels)
  halves        two cuBLAS calls, each on half of the rows, written into one output (at a row count where
                cuBLAS's heuristic picks a slow kernel, each half is another row count)
  lt            F.linear with torch.backends.cuda.preferred_blas_library('cublaslt')
  no-reduced    F.linear with allow_fp16_reduced_precision_reduction off

and then, under each route that is a global setting (linear, lt, no-reduced), builds the Triton fast path with
CUDA graphs for the dense model and the pruned one, and times the six graphs interleaved, so the end-to-end
speed-up per route is a ratio taken in one run.

  python benchmarks/linear_shapes.py --device cuda [--model deit_tiny_patch16_224] [--rate 0.3] [--batch 256]

Prints a table and writes linear_shapes.json/.md to --out (the products per shape as soon as they are measured,
then again with the end-to-end part).  CUDA only; no test times it.
"""
import contextlib
import json
import os
import statistics
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROUTES = ('linear', 'mm+bias', 'halves', 'lt', 'no-reduced')
# the header of the first table, by which an earlier linear_shapes.md is known
SUMMARY_HEADER = '| route | dense ms | pruned ms | time ratio | token ratio |'
SETTING_ROUTES = ('linear', 'lt', 'no-reduced')  # the routes that are a global setting: timed end to end too


@contextlib.contextmanager
def route(name: str):
    """The global cuBLAS setting a route runs under, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    lib, reduced = torch.backends.cuda.preferred_blas_library(), matmul.allow_fp16_reduced_precision_reduction
    try:
        if name == 'lt':
            torch.backends.cuda.preferred_blas_library('cublaslt')
        if name == 'no-reduced':
            matmul.allow_fp16_reduced_precision_reduction = False
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(lib)
        matmul.allow_fp16_reduced_precision_reduction = reduced


def _halves(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    h = x.shape[0] // 2
    torch.addmm(b, x[:h], w.t(), out=out[:h])
    torch.addmm(b, x[h:], w.t(), out=out[h:])
    return out


def product(name: str):
    if name == 'mm+bias':
        return lambda x, w, b: torch.mm(x, w.t()) + b
    if name == 'halves':
        return _halves
    return F.linear


def gemm_ms(fn, x, w, b) -> float:
    """The GPU's milliseconds per call, replayed from a CUDA graph as the fast path's build times its candidates
    (models.fast_path._cuda_graph_ms): launched one by one from Python, a product of 10-30 microseconds measures
    the CPU's launch overhead instead."""
    from models.fast_path import _cuda_graph_ms
    return _cuda_graph_ms(lambda: fn(x, w, b))


def shapes_of(width: int, hidden: int):
    return {'qkv': (width, 3 * width), 'proj': (width, width), 'fc1': (width, hidden), 'fc2': (hidden, width)}


def measure_shapes(batch: int, counts, products, device) -> dict:
    """{route: {n: {product: ms}}} for every kept count n (each distinct count once); ``products``:
    {product: (in_features, out_features)}."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for r in ROUTES:
        out[r] = {}
        with route(r):
            fn = product(r)
            for n in counts:
                out[r][n] = {}
                for p, (k, nout) in products.items():
                    x = torch.randn(batch * n, k, device=device, generator=g).half()
                    w = torch.randn(nout, k, device=device, generator=g).half()
                    b = torch.randn(nout, device=device, generator=g).half()
                    out[r][n][p] = gemm_ms(fn, x, w, b)
    return out


def end_to_end(cc, pruned, batch: int, device) -> dict:
    """Per route that is a global setting: the dense (``cc``, every mask True) and pruned fast paths (Triton,
    fp16 products, fp32 token buffer, CUDA graph: the benchmark's fast-triton-graph rows) built and captured under
    it, each route's with the kernel choices timed under it (the build's cache of timed choices is emptied
    first: cuBLAS picks other kernels under another route); then all of them timed interleaved
    (engine.time_interleaved).  Returns each row's median ms and, per route, the median per-round ratio
    dense/pruned."""
    import engine
    from benchmarks.formulations import image_shape
    from models import fast_path
    runs = {}
    for r in SETTING_ROUTES:
        with route(r):
            fast_path._CHOICE_CACHE.clear()
            for tag, m in (('dense', cc), ('pruned', pruned)):
                runs[f'{r}/{tag}'] = fast_path.build_fast_path(m.eval(), dtype=torch.float16, cuda_graph=True,
                                                               batch_size=batch)
    x = torch.randn(batch, *image_shape(cc), device=device)  # the model's input size (--model: any C&C model)
    with torch.no_grad():
        secs = engine.time_interleaved(runs, x, device, repeats=30, warmup=5)
    return {'ms': {k: 1e3 * statistics.median(v) for k, v in secs.items()},
            'speedup': {r: statistics.median(d / q for d, q in zip(secs[f'{r}/dense'], secs[f'{r}/pruned']))
                        for r in SETTING_ROUTES}}


def _is_results(path: str) -> bool:
    """Whether ``path`` holds the results JSON this script writes (linear_shapes.json)."""
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError among them; lists nested thousands deep
        return False
    return isinstance(result, dict) and {'model', 'rate', 'batch', 'kept', 'shapes_ms', 'summary'} <= set(result)


def _is_tables(path: str) -> bool:
    """Whether ``path`` holds the tables this script writes (linear_shapes.md; a note added above them kept)."""
    try:
        with open(path) as f:
            return any(line.rstrip('\n') == SUMMARY_HEADER for line in f)
    except (OSError, UnicodeDecodeError):
        return False


# The files written into --out, for utils.earlier_output: an earlier output of this script may be replaced.
OUTPUT_KINDS = {'linear_shapes.json': ('a results JSON', _is_results), 'linear_shapes.md': ('the tables', _is_tables)}


def build_parser():
    from benchmarks.model_zoo import MAX_BATCH, _int_in, _rate
    from utils.cli import OneLineParser
    p = OneLineParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', choices=['cuda'], default='cuda', help='cuda only: the script measures cuBLAS')
    p.add_argument('--model', default='deit_tiny_patch16_224',
                   help='a timm model name with a C&C model, or tiny/small/base (default: %(default)s)')
    p.add_argument('--rate', type=_rate(), default=0.3,
                   help='the prune rate, in [0, 1), one that clips a (layer, patch) slot (default: %(default)s)')
    p.add_argument('--batch', type=_int_in(1, MAX_BATCH), default=256,
                   help=f'the batch size, 1 to {MAX_BATCH} (default: %(default)s)')
    p.add_argument('--out', default=os.environ.get('OUT', '.'),
                   help='the folder linear_shapes.json and .md are written to (default: $OUT, else the current one)')
    p.add_argument('--no-end-to-end', action='store_true', help='the products per shape only')
    return p


def main(argv=None) -> int:
    from benchmarks.formulations import model_argument, rates_pruning_nothing
    from utils import OutputWriteError, UserError, check_output_dir, earlier_output
    args = build_parser().parse_args(argv)
    # every mistake is found before any timing, and the GPU last, so the others are found on any machine
    try:
        args.model = model_argument(args.model)
        nothing = rates_pruning_nothing(args.model, [args.rate])
        if nothing:
            raise UserError(f'argument --rate: {nothing[args.rate]}')
        check_output_dir(args.out, '--out')
        for name in OUTPUT_KINDS:
            why = earlier_output(os.path.join(args.out, name), name, OUTPUT_KINDS, 'benchmarks/linear_shapes.py')
            if why:
                raise UserError(f'argument --out: {why}')
        if not torch.cuda.is_available():
            raise UserError('argument --device: cuda: no CUDA GPU is available (this script measures cuBLAS)')
        return _measure(args)
    except OutputWriteError as e:  # the results, measured, could not be written (a full disk): not a usage error
        print(f'error: {e}', file=sys.stderr)
        return 1
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def _write(out: str, result: dict, lines) -> None:
    """linear_shapes.json and .md into ``out``, each whole or not at all (a run killed while writing leaves the
    previous one)."""
    from utils import write_text_atomic
    write_text_atomic(os.path.join(out, 'linear_shapes.json'), json.dumps(result, indent=1))
    write_text_atomic(os.path.join(out, 'linear_shapes.md'), '\n'.join(lines) + '\n')


def _measure(args) -> int:
    device = torch.device(args.device)
    import timm
    import models
    from benchmarks import model_zoo as zoo
    from benchmarks.formulations import seeded_models
    cc, _ = seeded_models(args.model, 0, device)  # the benchmark's models: seed 0, Taylor masks of 2 noise batches
    scores = zoo._scores(cc, SimpleNamespace(masks='taylor', seed=0), device)
    pruned = zoo.pruned_models(cc, scores, [args.rate], 0)[args.rate]
    kept = [int(n) for n in models.kept_token_counts(pruned)]
    width = cc.embed_dim
    products = shapes_of(width, cc.blocks[0].mlp.fc1.out_features)
    counts = sorted(set(kept) | {cc.num_tokens}, reverse=True)
    shapes = measure_shapes(args.batch, counts, products, device)
    lines = [f'{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, fp16, '
             f'{args.model} width {width}, batch {args.batch}; kept tokens per block {kept}', '',
             'Per route: the four products summed over the blocks (ms per forward), dense '
             f'({cc.num_tokens} tokens in every block) against pruned, and the ratio beside the token ratio; '
             'then TFLOP/s per product at each n.', '',
             SUMMARY_HEADER, '|---|---|---|---|---|']
    token_ratio = cc.num_tokens * len(kept) / sum(kept)
    summary = {}
    for r in ROUTES:
        d = len(kept) * sum(shapes[r][cc.num_tokens].values())
        q = sum(sum(shapes[r][n].values()) for n in kept)
        summary[r] = {'dense_ms': d, 'pruned_ms': q, 'time_ratio': d / q}
        lines.append(f'| {r} | {d:.3f} | {q:.3f} | {d / q:.3f} | {token_ratio:.3f} |')
    lines += ['', f'FLOPs ratio {models.count_macs(cc) / models.count_macs(pruned):.3f}', '',
              '| route | n | ' + ' | '.join(products) + ' |', '|---|---|' + '---|' * len(products)]
    for r in ROUTES:
        for n in counts:
            cells = [f'{2 * args.batch * n * k * o / (ms * 1e-3) / 1e12:.0f}'
                     for (k, o), ms in zip(products.values(), shapes[r][n].values())]
            lines.append(f'| {r} | {n} | ' + ' | '.join(cells) + ' |')
    result = {'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'model': args.model,
              'rate': args.rate, 'batch': args.batch, 'kept': kept, 'shapes_ms': shapes, 'summary': summary}
    print('\n'.join(lines), flush=True)
    # the per-shape figures are kept now: the end-to-end part builds and captures six fast paths, and a run cut
    # there by its time limit (gpu_check.sh's 240 s) would otherwise lose them too
    _write(args.out, result, lines)
    if not args.no_end_to_end:
        e2e = end_to_end(cc, pruned, args.batch, device)
        result['end_to_end'] = e2e
        table = ['| route | dense ms | pruned ms | speed-up |', '|---|---|---|---|'] + [
            f'| {r} | {e2e["ms"][f"{r}/dense"]:.3f} | {e2e["ms"][f"{r}/pruned"]:.3f} | {s:.3f} |'
            for r, s in e2e['speedup'].items()]
        lines += ['', 'End to end (Triton fast path, fp16, CUDA graph; built and captured under each route, timed '
                      'interleaved, median of 30): pruned over dense of the same route', ''] + table
        print('\n'.join(table), flush=True)
        _write(args.out, result, lines)
    return 0


if __name__ == '__main__':
    sys.exit(main())
