#!/usr/bin/env bash
# The GPU session in one command, on a machine with a CUDA GPU (run from the repository root):
#
#   bash benchmarks/gpu_check.sh              # everything: the tests, then the benchmark
#   bash benchmarks/gpu_check.sh benchmark    # the benchmark alone (a rerun); `tests` for the tests alone
#   bash benchmarks/gpu_check.sh resume       # the sections an earlier benchmark did not finish, no more
#   bash benchmarks/gpu_check.sh profile      # where the GPU time goes, by kernel (not in the default run)
#   bash benchmarks/gpu_check.sh linear       # the matrix products per shape and cuBLAS route (not default)
#   bash benchmarks/gpu_check.sh compiled     # timm's compiled DeiT-Ti against fp32, cached and fresh (not default)
#
# Run remotely (the working tree copied to the GPU machine with the git-ignored .whl/ folder prepared as below,
# one command under a wall-clock limit, the files of $OUT brought back, at most 8):
#
#   bash benchmarks/gpu_check.sh              # a wall-clock limit of 570 s
#
# then copy cuda.json and cuda.md into benchmarks/results/, and if a section was left out (the time limit),
# failed or was cut by the hard limit (still pending), while the GPU is still at hand:
#
#   bash benchmarks/gpu_check.sh resume       # a wall-clock limit of 360 s
#
# which reads benchmarks/results/cuda.json (an untracked file travels with the working tree; $RESUME names
# another), runs `model_zoo.py --resume` of it with the benchmark's own flags, so only the sections it lacks, and
# writes the whole results (its sections marked as the earlier run's) to $OUT/cuda.json and cuda.md again.
#
# Budget: at most 9.5 minutes wall, about 6 expected (the machine's start, 1-2 minutes, comes on top): each step
# has a hard time limit, so the worst case is 45 + 180 + 280 s plus 15 s of kill grace for each of the last two
# (the environment's three commands have none) and the summaries,
# about 9.5 minutes (and the first check that python3 sees a GPU, limited to 60 s, which takes seconds), while
# the expected run leaves room in 15 minutes of GPU time to carry the benchmark on (`bash benchmarks/gpu_check.sh
# resume`, 360 s: 45 + 280 s of limits, 15 s of kill grace, the summaries).
#   1. environment (about 15 s; its three commands limited to 15, 10 and 20 s): the timm wheel installed into
#      /tmp/site (PYTHONPATH), nvidia-smi, the versions of python/torch/triton/timm;
#   2. tests, two at once, as one is GPU work and the other CPU work and neither is timed (limit 180 s), and with
#      them the benchmark's torch.compile of timm's DeiTs done ahead into inductor's cache (limit 170 s, 4 compile
#      workers; it saves the benchmark most of its 9 cold compiles, timm's 3 DeiTs at their main batch size, 32 and 1;
#      its log is $WARM/warm_compile.log (WARM: default /tmp/warm_compile), not
#      brought back; its failure is noted in status.txt, not counted as one; the kernel configs it timed under the
#      tests' load are deleted, so the benchmark times its own), and the fast path's Triton kernels compiled ahead
#      into Triton's cache (limit 170 s, no new section after 130 s: the benchmark's own fast-path rows built in its
#      own sections, in its order, so every candidate kernel its builds time is compiled for the same shapes; its log
#      $WARM/warm_kernels.log; a failure noted, not counted; the choices those builds made under the tests' load
#      are not kept: the benchmark's builds time their own):
#      pytest tests/test_fast_path.py on CUDA (the kernels compiled for the GPU, the whole path against the eager
#      model, fp16 accuracy at DeiT-Ti size, CUDA graphs (on Hopper with and without programmatic dependent
#      launch, each kernel compiled a second time with its wait), the timed choices; the CUDA-only tests first, so a
#      time-out cuts the others; most of its time is Triton compiling kernel variants, which also fills Triton's
#      cache for the benchmark; the 25 slowest tests are listed) and
#      pytest tests/test_model.py tests/test_families.py (the eager model's equality tests, limit 120 s);
#   3. the benchmark, alone on the machine (limit 280 s): benchmarks/model_zoo.py --device cuda with its CUDA
#      defaults (benchmarks/README.md, "On a GPU"): sections DeiT-Ti at batch 256, Ti at 32 and 1, DeiT-B at 128,
#      DeiT-S at 256, then B and S at 32 and 1; no new section after 200 s (--time-limit), the results written
#      after every section, so the hard limit only ever cuts the section in progress.
# A failing or timed-out step is recorded in status.txt and the next one still runs; the script exits non-zero
# if any did.
#
# `profile` (a call of its own, about 1-2 minutes, limit 150 s; run it when the targets are missed, to see why):
# DeiT-Ti at batch 256, rates 0.25 and 0.40 (in the environment, PROFILE_RATES=0.25,0.30 names other rates,
# PROFILE_MODELS=base another model, PROFILE_BATCH=1 another batch size), rows timm, ours, fast-triton-dense and
# fast-triton, each profiled (torch.profiler, the GPU time of every kernel summed by family: linear layers,
# attention, LayerNorm, GELU, adds/casts/copies, token routing, patch embedding, other kernels), dense
# against pruned and set against the FLOPs ratio, with the slowest kernels of every row; outputs profile.log,
# profile.json, profile.md (with env.txt and status.txt).
#
# `compiled` (a call of its own, about 1-3 minutes, limits 150 s each; `gpu_check.sh compiled` right after a run on
# the same machine, while its inductor cache is still there): benchmarks/compiled_check.py twice, timm's DeiT-Ti
# compiled at batch 256, 32 and 1 and its logits checked against eager fp32, as the benchmark compiles it and
# afresh per batch size, first with this machine's inductor cache as the earlier steps left it, then with an empty
# one; outputs compiled_cache.log and compiled_fresh.log (with env.txt and status.txt).  It is there because the
# benchmark's compiled DeiT-Ti once gave logits far off fp32 at batch 32 where fresh compiles did not.
#
# Outputs go to $OUT (default /tmp/gpu_check_out), 7 files (a remote run brings back at most 8): env.txt,
# status.txt, test_fast_path.log, test_model.log, model_zoo.log, cuda.json, cuda.md.  cuda.json and cuda.md are
# benchmarks/results/cuda.json and cuda.md: copy them there.
#
# The GPU machine has python3 with torch + Triton but may carry another timm and has no network, so timm
# 1.0.31 travels as a wheel in the (git-ignored) .whl/ folder ($WHEELS names another).  Download it beforehand
# on a machine with network access, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl timm==1.0.31
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
# an empty step (a script's unset variable, `gpu_check.sh "$STEP"`) is a mistake, not "no step given": refused
# rather than taken for the default steps (alone) or dropped (beside others)
for a in "$@"; do
    if [[ -z "${a//[[:space:]]/}" ]]; then
        echo "error: an empty step '$a' (tests, benchmark, resume, profile, linear, compiled; none given:" \
             "tests benchmark)" >&2
        exit 2
    fi
done
steps="${*:-tests benchmark}"
read -ra step_list <<< "$steps"  # split on blanks, never expanded as file names (a step 'test?')
for s in "${step_list[@]}"; do
    case "$s" in
        tests|benchmark|resume|profile|linear|compiled) ;;
        *) echo "error: unknown step $s (tests, benchmark, resume, profile, linear, compiled)" >&2; exit 2 ;;
    esac
done
RESUME="${RESUME:-benchmarks/results/cuda.json}"
WHEELS="${WHEELS:-.whl}"  # the folder of the timm wheel (above)
WARM="${WARM:-/tmp/warm_compile}"  # the compiles done ahead: their log and results, kept out of $OUT
resume=()
if [[ " $steps " == *" resume "* ]]; then
    if [[ " $steps " == *" benchmark "* ]]; then
        echo "error: resume is the benchmark carried on: give one of benchmark and resume" >&2; exit 2
    fi
    if [ ! -f "$RESUME" ]; then
        echo "error: resume: no $RESUME (copy there the cuda.json of the call to carry on)" >&2; exit 2
    fi
    resume=(--resume "$RESUME")
fi
# what each step writes into $OUT (a remote run brings back at most 8 files; env.txt and status.txt always come)
files=2
for s in "${step_list[@]}"; do
    case "$s" in
        tests) files=$((files + 2)) ;;                   # test_fast_path.log, test_model.log
        benchmark|resume) files=$((files + 3)) ;;        # model_zoo.log, cuda.json, cuda.md
        profile|linear) files=$((files + 3)) ;;          # profile.log/.json/.md; linear.log, linear_shapes.json/.md
        compiled) files=$((files + 2)) ;;                # compiled_cache.log, compiled_fresh.log
    esac
done
if [ $files -gt 8 ]; then
    echo "error: steps '$steps' write $files files; a remote run brings back at most 8: give them in separate calls" >&2
    exit 2
fi
# a machine whose python3 sees no CUDA GPU is refused before $OUT is touched (every step would fail or time on CPU)
if ! timeout 60 python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' > /dev/null 2>&1; then
    echo "error: python3 here sees no CUDA GPU (torch.cuda.is_available() is not True): run it on the GPU machine" >&2
    exit 2
fi
mkdir -p "$OUT"
# a reused $OUT (a local run) must not lend this run an earlier one's verdicts, results or logs
# (but not the results a resume reads, when $RESUME names $OUT/cuda.json: the resumed run replaces it whole)
for f in status.txt cuda.json cuda.md profile.json profile.md linear_shapes.json linear_shapes.md \
         test_fast_path.log test_model.log model_zoo.log profile.log linear.log compiled_cache.log \
         compiled_fresh.log; do
    if [ ${#resume[@]} -gt 0 ] && [ "$(realpath -m "$OUT/$f")" = "$(realpath -m "$RESUME")" ]; then continue; fi
    rm -f "$OUT/$f"
done
touch "$OUT/status.txt"

# step NAME SECONDS COMMAND...: run COMMAND under a hard time limit, output to $OUT/NAME.log, status recorded.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    local log="${LOGDIR:-$OUT}/$name.log"
    timeout --kill-after=15 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict=FAILED; fi
    echo "$name: $verdict (rc $rc, $((SECONDS - start)) s)" | tee -a "$OUT/status.txt"
    tail -n 15 "$log"
}

# 1. environment
{
    if ls "$WHEELS"/timm-*.whl > /dev/null 2>&1; then
        timeout 15 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$WHEELS"/*.whl && echo "installed $(ls "$WHEELS"/*.whl)"
    else
        echo "no $WHEELS/timm-*.whl: using the machine's own timm"
    fi
} > "$OUT/env.txt" 2>&1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor_gpu_check}"
{
    timeout 10 nvidia-smi || echo "nvidia-smi failed or timed out"
    timeout 20 python3 - <<'EOF'
import os, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available(), 'cpu cores', os.cpu_count())
if torch.cuda.is_available():
    print('gpu', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
try:
    import triton; print('triton', triton.__version__)
except Exception as e:
    print('triton: not importable:', e)
import timm; print('timm', timm.__version__, timm.__file__)
EOF
} >> "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

xdist=()
python3 -c 'import xdist' > /dev/null 2>&1 && xdist=(-n 4)

# 2. the tests: the model's equality tests (CPU work; 4 processes of 2 threads, so half the cores stay free for
#    the Triton compiles of the other tests) in the background while the fast path's run on the GPU (slow-marked
#    included: the compiled backend on the GPU).
#    When the benchmark follows, also its torch.compile of timm's DeiTs (the rows timm-compiled at the batch sizes it
#    times, the main ones and the summary's 32 and 1, same models, precision and device: the same graphs), done
#    ahead into inductor's on-disk cache, which the benchmark's compiles then read instead of compiling cold
#    (measured on CPU with torch 2.11: 23 s cold, 10 s from the cache, for DeiT-Ti); 4 compile workers, so the
#    tests keep most of the cores.
if [[ " $steps " == *" tests "* ]]; then
    step test_model 120 env OMP_NUM_THREADS=2 python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" \
        tests/test_model.py tests/test_families.py > /dev/null &
    model_tests=$!
    warm= warm_kernels=
    if [[ " $steps " == *" benchmark "* ]]; then
        mkdir -p "$WARM"  # its log stays out of $OUT, which brings back 8 files at most
        LOGDIR="$WARM" step warm_compile 170 env OMP_NUM_THREADS=2 TORCHINDUCTOR_COMPILE_THREADS=4 \
            python3 benchmarks/model_zoo.py --device cuda --rows timm,ours,timm-compiled --rates 0.25 --repeats 1 \
            --warmup 0 --compile-budget 1000000 --json "$WARM/cuda.json" > /dev/null &
        warm=$!
        # and its fast-path rows' Triton kernels, every candidate its builds time, compiled ahead into Triton's
        # on-disk cache by the same builds (same models, masks, batch sizes, precision and device: the same kernel
        # variants), so the benchmark's builds load them instead of compiling each (most of a cold build's seconds);
        # the choices these builds make under the tests' load stay in their process: the benchmark times its own
        LOGDIR="$WARM" step warm_kernels 170 env OMP_NUM_THREADS=2 python3 benchmarks/model_zoo.py --device cuda \
            --rows timm,ours,fast-triton-dense,fast-triton,fast-triton-graph-dense,fast-triton-graph --no-compile \
            --repeats 1 --warmup 0 --time-limit 130 --json "$WARM/kernels.json" > /dev/null &
        warm_kernels=$!
    fi
    step test_fast_path 180 python3 -m pytest -q -p no:cacheprovider -rsP --durations=25 "${xdist[@]}" \
        tests/test_fast_path.py
    wait $model_tests
    tail -n 15 "$OUT/test_model.log"
    if [ -n "$warm" ]; then
        wait $warm_kernels
        grep -h "^== " "$WARM/warm_kernels.log" 2> /dev/null  # the sections whose kernels it compiled
        wait $warm
        grep -h 'torch.compile time' "$WARM/warm_compile.log"
        # the compiled graphs stay in the cache; the kernel configs inductor chose by timing them while the tests
        # loaded the GPU do not: the benchmark's own first call of each compiled row times them again, alone
        [ -d "$TORCHINDUCTOR_CACHE_DIR" ] && find "$TORCHINDUCTOR_CACHE_DIR" -name '*.best_config' -delete
    fi
fi

# 3. the benchmark, with nothing else running: no new section after --time-limit; the outer limit is the hard
#    stop for the section in progress, and what ran before it is already in cuda.json / cuda.md.  `resume`: the
#    same command carrying on $RESUME (its finished sections kept, the others run).
if [[ " $steps " == *" benchmark "* || " $steps " == *" resume "* ]]; then
    step model_zoo 280 python3 benchmarks/model_zoo.py --device cuda --time-limit 200 "${resume[@]}" \
        --json "$OUT/cuda.json" --markdown "$OUT/cuda.md"
    [ -f "$OUT/cuda.json" ] && python3 - "$OUT/cuda.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for s in r['sections']:
    print(f"{s['section']}: {s['status']}" + (f" ({s['reason']})" if s.get('reason') else ''))
f = lambda v: '-' if v is None else f'{v:.2f}'
for e in r['summary']:
    print(f"{e['model']}: FLOPs ratio {f(e['flops_ratio'])}, {e['best_pruned_mode'] or '-'} over "
          f"{e['best_dense_mode'] or '-'} {f(e['speedup_vs_best_dense'])} (vs timm eager "
          f"{f(e['speedup_vs_timm_eager'])}), batch 1 {f(e['speedup_batch1'])}, batch 32 {f(e['speedup_batch32'])}; "
          + ', '.join(f"{k}: {t['verdict']}" for k, t in e['targets'].items())
          + (f"; left out of the comparison: {e['excluded']}" if e.get('excluded') else ''))
for t in r['targets']:
    if 'logit' in t['target'] or 'top-1' in t['target']:
        met = {True: 'yes', False: 'NO', None: 'NOT MEASURED (' + str(t.get('missing')) + ')'}[t['met']]
        print(f"{t['target']}: {'-' if t['value'] is None else format(t['value'], '.3f')} vs {t['threshold']} "
              f"-> {met}")
from benchmarks import report  # rows a slowed host held back: time their section again
for res in r['models'].values():
    for batch, rows in report.unsteady_rows(res):
        print(f"unsteady: {res['label']} batch {batch}: {report.spreads_text(rows)}")
for run in r.get('earlier_runs', []):
    if run.get('code_changed_since'):
        print(f"note: the sections kept from the earlier run were measured before these files changed: "
              f"{', '.join(run['code_changed_since'])}")
if r.get('not_measured'):
    print(f"INCOMPLETE: {len(r['not_measured'])} targets not measured (see above); with GPU time left, copy "
          f"cuda.json (and cuda.md) into benchmarks/results/, then: bash benchmarks/gpu_check.sh resume")
EOF
    # the README's speed table with this run's GPU columns (once cuda.json is in benchmarks/results/,
    # `python -m benchmarks.report --write-readme` puts it into the README)
    [ -f "$OUT/cuda.json" ] && python3 -m benchmarks.report --gpu "$OUT/cuda.json"
fi

# 4. on request: where the GPU time goes, by kernel, for DeiT-Ti or $PROFILE_MODELS (eager and fast path, dense and
#    pruned).
if [[ " $steps " == *" profile "* ]]; then
    profile_batch=()
    [ -n "${PROFILE_BATCH:-}" ] && profile_batch=(--batch-size "$PROFILE_BATCH")
    step profile 150 python3 benchmarks/model_zoo.py --device cuda --models "${PROFILE_MODELS:-tiny}" \
        "${profile_batch[@]}" --rates "${PROFILE_RATES:-0.25,0.40}" --rows timm,ours,fast-triton-dense,fast-triton \
        --no-compile --summary-batch-sizes "" --repeats 10 --breakdown-rounds 3 --json "$OUT/profile.json" \
        --markdown "$OUT/profile.md"
    [ -f "$OUT/profile.md" ] && awk '/^Where the time goes/{f=1} f&&/^\| target/{exit} f' "$OUT/profile.md"
    [ -f "$OUT/profile.json" ] && python3 - "$OUT/profile.json" <<'EOF'
import json, sys
for name, res in json.load(open(sys.argv[1]))['models'].items():
    for row, top in res.get('kernels', {}).items():
        print(f'{row}: ' + '; '.join(f'{ms:.3f} ms {k[:60]}' for k, ms in top[:6]))
EOF
fi

# 5. on request: the matrix products' GPU time per shape and cuBLAS route, and the fast path's end-to-end speed-up
# under each route (benchmarks/linear_shapes.py; about 1 minute when measured, before each route's builds timed
# their own kernel choices, which adds two builds' timing: limit 240 s; the per-shape figures are written first).
if [[ " $steps " == *" linear "* ]]; then
    step linear 240 python3 benchmarks/linear_shapes.py --device cuda --out "$OUT"
fi

# 6. on request: timm's compiled DeiT-Ti against its eager fp32 logits at 256, 32 and 1, compiled as the benchmark
# compiles it (one object, a static recompile per batch size) and afresh per batch size, once with inductor's cache
# as this machine has it (the compiles done ahead and the benchmark's, where they ran before on it) and once with
# an empty one (benchmarks/compiled_check.py; a cold compile of DeiT-Ti is not yet timed on the GPU machine, 23 s
# on 2 CPU cores, estimated 30-40 s in benchmarks/README.md: limit 150 s each, every check printed as it is made).
if [[ " $steps " == *" compiled "* ]]; then
    step compiled_cache 150 python3 benchmarks/compiled_check.py --device cuda
    fresh_cache=$(mktemp -d)
    step compiled_fresh 150 env TORCHINDUCTOR_CACHE_DIR="$fresh_cache" python3 benchmarks/compiled_check.py \
        --device cuda
    rm -rf "$fresh_cache"
fi

echo "== status"
cat "$OUT/status.txt"
# a compile done ahead that failed or ran out of time only costs the benchmark its cold compiles: not a failure
! grep -Ev '^warm_(compile|kernels):' "$OUT/status.txt" | grep -qv ': ok '
