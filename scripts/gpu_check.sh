#!/usr/bin/env bash
# Every GPU figure of issue #20 in one call of the device tool (the machine is lent for minutes, so
# nothing is built or downloaded there that could be prepared here; see scripts/gpu_bundle.sh).
#
#   OUT=/some/dir bash scripts/gpu_check.sh [BUDGET_S]     # default 530 s, under the 600 s call limit
#
# Steps, most important first, each under a deadline cut from what is left of BUDGET_S, each writing
# its files to $OUT as it finishes (so a run cut short still returns what it measured):
#   1. install .gpu/whl (no index) and skyfall itself (editable, no dependencies)
#   2. scripts/bench_tile.py: the projected JAX-configuration tile (Stage 1 at paper-jax on the default
#      tile and a 2048² variant, Stage 2 training, FlowEdit s/image per memory mode, depth) as a table
#      and JSON; gsplat JIT-compiles in its background while the refiner phases run
#   3. pytest -m gpu: the whole GPU suite (not stopping at the first failure)
#   4. scripts/bench_flowedit.py with the speed options (fp8 weights + activations, 4 images per
#      transformer call, regionally compiled blocks) against the figures of #20 (2.95 s/image bf16)
#   5. scripts/bench_step.py: paper-jax ms/step, syncs per step and the profiler's top ops (pseudo depth
#      from a random-weight Depth Anything V2 Large: the paper's cost, no weights needed)
# Without a GPU (nvidia-smi absent) it runs the same wiring with CPU-sized stand-ins (a dry run).
set -u
cd "$(dirname "$0")/.."
BUDGET=${1:-530}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[t=$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/timeline.txt"; }
# left CAP: seconds for the next step: at most CAP, at most what the budget has left, at least 5.
left() { local l=$(( BUDGET - ($(date +%s) - T0) )); [ "$l" -lt 5 ] && l=5; [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5 MAX_JOBS=${MAX_JOBS:-15}
PY=${PYTHON:-python3}

GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  GPU=1
  nvidia-smi --query-gpu=name,memory.total,compute_cap,driver_version --format=csv,noheader | tee -a "$OUT/timeline.txt"
  # compile gsplat for this card only
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)}
else
  el "no GPU: dry run with CPU-sized stand-ins"
fi

# 1. install
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site .gpu/whl/*.whl >"$OUT/install.log" 2>&1 \
    || el "wheel install failed (see install.log)"
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import skyfall" >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$OUT/install.log" 2>&1 || el "skyfall install failed"
fi
$PY - <<'EOF' 2>&1 | tee -a "$OUT/timeline.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for m in ("gsplat", "diffusers", "transformers", "torchao", "plyfile", "tyro", "skyfall"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(m, "MISSING", type(e).__name__, e)
EOF
el installed
TILE=()
[ -f .gpu/tile/transforms_train.json ] && TILE=(--tile .gpu/tile)

# 2. the projected tile
if [ $GPU = 1 ]; then
  ( timeout "$(left 270)" $PY scripts/bench_tile.py ${TILE[@]+"${TILE[@]}"} --budget-s "$(( $(left 270) - 10 ))" \
      --refiner-modes gpu,fp8-dynamic,cpu-offload --json "$OUT/bench_tile.json" ) >"$OUT/bench_tile.log" 2>&1
else
  ( timeout "$(left 120)" $PY scripts/bench_tile.py --reduced --json "$OUT/bench_tile.json" ) >"$OUT/bench_tile.log" 2>&1
fi
el "bench_tile rc=$?"

# 3. the whole GPU suite
( timeout "$(left 130)" $PY -m pytest -q -m gpu -p no:cacheprovider ) >"$OUT/pytest_gpu.log" 2>&1
el "gpu tests rc=$?: $(tail -1 "$OUT/pytest_gpu.log")"

# 4. the refiner with its speed options
if [ $GPU = 1 ]; then
  ( timeout "$(left 100)" $PY scripts/bench_flowedit.py --random-weights --modes fp8-dynamic --no-depth \
      --batch-size 4 --compile blocks --warmup 1 ) >"$OUT/bench_flowedit_fast.jsonl" 2>"$OUT/bench_flowedit_fast.err"
else
  ( timeout "$(left 60)" $PY scripts/bench_flowedit.py --random-weights --tiny --modes gpu --no-depth \
      --batch-size 2 --warmup 1 ) >"$OUT/bench_flowedit_fast.jsonl" 2>"$OUT/bench_flowedit_fast.err"
fi
el "bench_flowedit (speed options) rc=$?: $(tail -1 "$OUT/bench_flowedit_fast.jsonl")"

# 5. trainer throughput
if [ $GPU = 1 ] && [ ${#TILE[@]} -gt 0 ]; then
  ( timeout "$(left 100)" $PY scripts/bench_step.py --preset paper-jax ${TILE[@]+"${TILE[@]}"} --start 1000 --steps 300 \
      --count-steps 20 --profile 5 --depth random-large --json "$OUT/bench_step.json" ) >"$OUT/bench_step.log" 2>&1
else
  ( timeout "$(left 100)" env OMP_NUM_THREADS=1 $PY scripts/bench_step.py --preset tiny --steps 20 --count-steps 5 \
      --json "$OUT/bench_step.json" ) >"$OUT/bench_step.log" 2>&1
fi
el "bench_step rc=$?: $(grep -m1 'ms/step' "$OUT/bench_step.log")"
el end
# the figures, for the reply's output tail
grep -v '^{' "$OUT/bench_tile.log" | grep -E '^\||^skyfall|^Projected' ; tail -3 "$OUT/pytest_gpu.log"
cat "$OUT/bench_flowedit_fast.jsonl"; grep -E 'ms/step|syncs/step' "$OUT/bench_step.log"
