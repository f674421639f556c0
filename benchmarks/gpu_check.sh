#!/usr/bin/env bash
# The fast path's GPU check, in one call on a machine with a CUDA GPU (run from the repository root):
#
#   bash benchmarks/gpu_check.sh
#
# Budget: under about 8 minutes wall in all (each step has its own hard time limit, below), so it fits a
# 15-minute device lease with room to rerun once.  Outputs go to $OUT (default /tmp/gpu_check_out), at most
# 8 files: env.txt, status.txt, test_fast_path.log, fast_path_timing.log, fast_path_timing.json,
# fast_path_timing.md, test_model.log.
#
# The GPU machine has python3 with torch + Triton but may carry another timm and has no network, so timm
# 1.0.31 travels as a wheel in the (git-ignored) .whl/ folder.  Download it beforehand on a machine with
# network access, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl timm==1.0.31
#
# and carry .whl along with the working tree.  The steps:
#   1. install the wheel into /tmp/site (PYTHONPATH), record nvidia-smi and the versions of torch/triton/timm;
#   2. pytest tests/test_fast_path.py on CUDA (the kernels compiled for the GPU, the whole path in fp32 against
#      the eager model, fp16 accuracy at DeiT-Ti size, CUDA graphs, the attention choice);
#   3. benchmarks/fast_path_timing.py (fp16; DeiT-Ti at batch 256, 32 and 1, DeiT-B at 128, DeiT-S at 256,
#      as far as its time limit goes);
#   4. pytest tests/test_model.py (the eager model's equality tests).
# A failing step is recorded in status.txt and the next one still runs; the script exits non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
: > "$OUT/status.txt"
failed=0

# step NAME SECONDS COMMAND...: run COMMAND under a hard time limit, output to $OUT/NAME.log, status recorded.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local verdict=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT"; elif [ $rc -ne 0 ]; then verdict=FAILED; fi
    [ $rc -ne 0 ] && failed=1
    echo "$name: $verdict (rc $rc, $((SECONDS - start)) s)" | tee -a "$OUT/status.txt"
    tail -n 15 "$OUT/$name.log"
}

# 1. environment
{
    if ls .whl/timm-*.whl > /dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && echo "installed $(ls .whl/*.whl)"
    else
        echo "no .whl/timm-*.whl: using the machine's own timm"
    fi
} > "$OUT/env.txt" 2>&1
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
    nvidia-smi || echo "nvidia-smi failed"
    python3 - <<'EOF'
import platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'available', torch.cuda.is_available())
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

# 2. the fast path's tests on CUDA (slow-marked included: the compiled backend on the GPU); most of their time
#    is Triton compiling kernel variants, so with pytest-xdist there they run in 4 processes.
xdist=()
python3 -c 'import xdist' > /dev/null 2>&1 && xdist=(-n 4)
step test_fast_path 180 python3 -m pytest -q -p no:cacheprovider -rsP "${xdist[@]}" tests/test_fast_path.py

# 3. timing: the script stops starting sections after --time-limit, the outer limit is the hard stop;
#    it writes its JSON/Markdown after every section.
step fast_path_timing 220 python3 benchmarks/fast_path_timing.py --device cuda --out "$OUT" \
    --time-limit 160 --compile timm --compile-budget 80

# 4. the eager model's equality tests
step test_model 80 python3 -m pytest -q -p no:cacheprovider tests/test_model.py

echo "== status"
cat "$OUT/status.txt"
[ -f "$OUT/fast_path_timing.md" ] && cat "$OUT/fast_path_timing.md"
exit $failed
