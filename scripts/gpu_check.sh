#!/usr/bin/env bash
# The GPU proof (issue 17, docs/gpu-results.md): one command that measures, on one GPU,
#   1 planner     the memory planner against torch.cuda.max_memory_allocated (1B shape)
#   2 throughput  tokens/s, MFU, peak memory: tune-launch vs the plain baseline, 1B and 8B
#   3 fsdp        FSDP2 through tune-launch and the rank's code, layers really wrapped
#   4 qlora       NF4 double-quant load, paged_adamw_8bit paging, ZeRO-2/3 runs, nvcc ops
# each part time-boxed, writing OUT_DIR/<part>.json after every check and its log beside it;
# one part failing or running out of time loses none of the others. At the end
# OUT_DIR/summary.json holds the versions, the GPU and every outcome, and OUT_DIR/logs.tar.gz
# every log. Without CUDA the parts that need it are skipped, saying so.
#
#   bash scripts/gpu_check.sh OUT_DIR [--cpu-smoke] [--only PART,...] [--budget SECONDS]
#
# --cpu-smoke  the same parts on CPU with the tiny shape and a few steps (the test suite runs
#              this: tests/benchmarks/test_gpu_check.py), so the GPU run is never the first
# --only       a subset, e.g. `--only throughput` for a rerun
# --budget     seconds the whole may take (default 470 on a GPU, 360 for --cpu-smoke): parts
#              1, 3, 4 run side by side first (memory is per process), then part 2 alone
#              (timings) in what is left; --cpu-smoke runs all four side by side
# A `.whl/` folder (scripts/fetch-wheels.sh) is installed first into /tmp/site (not with
# --cpu-smoke: those wheels are for the GPU machine's Python 3.12).
# Environment: PYTHON (default python3); GPU_CHECK_WORK, a folder for the models and runs
# (kept; default a new folder under TMPDIR, removed at the end unless GPU_CHECK_KEEP_WORK=1).
set -uo pipefail

usage() {
  sed -n '12,23p' "$0" >&2
  exit 2
}
[ $# -ge 1 ] || usage
OUT=$1
shift
SMOKE=0 ONLY="" BUDGET=""
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --only) ONLY=${2:?--only PART,...}; shift ;;
    --budget) BUDGET=${2:?--budget SECONDS}; shift ;;
    *) usage ;;
  esac
  shift
done

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
if [ -n "${GPU_CHECK_WORK:-}" ]; then
  WORK=$GPU_CHECK_WORK KEEP_WORK=1
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") KEEP_WORK=${GPU_CHECK_KEEP_WORK:-0}
fi
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# DeepSpeed's just-in-time ops build into a private folder, seeded from the shared cache and
# from this check's own: a run stopped by its time box mid-build leaves its lock file here,
# never in a cache that other runs would wait on forever
SHARED_EXT=${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}
OWN_EXT=$ROOT/.cache/gpu-check-extensions
export TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
mkdir -p "$TORCH_EXTENSIONS_DIR"
for seed in "$SHARED_EXT" "$OWN_EXT"; do
  [ -d "$seed" ] && cp -a "$seed/." "$TORCH_EXTENSIONS_DIR/"
done
find "$TORCH_EXTENSIONS_DIR" -name lock -delete
MODE=()
if [ "$SMOKE" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path, even on a GPU host
  MODE=(--smoke)
  BUDGET=${BUDGET:-360}
else
  BUDGET=${BUDGET:-470}
fi
STEPS=()   # --rc STEP=CODE --box STEP=SECONDS for the summary

# 1. the carried wheels (GPU.md's recipe: they are for the GPU machine's Python 3.12), else
#    this Python's own packages
if [ "$SMOKE" = 0 ] && [ -d .whl ] && compgen -G ".whl/*" >/dev/null; then
  timeout -k 10 240 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --no-build-isolation --upgrade --target /tmp/site .whl/* >"$WORK/install.log" 2>&1
  STEPS+=(--rc "install=$?")
  export PYTHONPATH=/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no wheels installed (no .whl/, or --cpu-smoke): $PY's own packages" >"$WORK/install.log"
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }
step() {  # STEP SECONDS LOG: one step of scripts/gpu_check.py, time-boxed
  timeout -k 15 "$2" "$PY" scripts/gpu_check.py "$1" --out "$OUT" --work "$WORK" "${MODE[@]}" \
    >"$3" 2>&1
}
left() {  # seconds of the budget left, less MARGIN ($1), at least 30
  local n=$((BUDGET - SECONDS - ${1:-0}))
  echo $((n > 30 ? n : 30))
}

# 2. versions, GPU, nvidia-smi; the models and data every part reads
step env 120 "$WORK/env.log"
STEPS+=(--rc "env=$?")
step prepare 150 "$WORK/prepare.log"
STEPS+=(--rc "prepare=$?")

# 3. parts 1, 3, 4 side by side (and the 8B model written for part 2), then part 2 alone;
#    --cpu-smoke runs all four side by side (CPU timings are not measurements)
if [ "$SMOKE" = 1 ]; then
  SIDE=(planner fsdp qlora throughput) ALONE=() BOX_A=$(left 20)
else
  SIDE=(planner fsdp qlora) ALONE=(throughput) BOX_A=$(left 120)
  BOX_A=$((BOX_A < 210 ? BOX_A : 210))
fi
pids=() names=()
for part in "${SIDE[@]}"; do
  wanted "$part" || continue
  step "$part" "$BOX_A" "$OUT/$part.log" &
  pids+=($!) names+=("$part")
  STEPS+=(--box "$part=$BOX_A")
done
if wanted throughput && [ "$SMOKE" = 0 ]; then
  step prepare-8b "$BOX_A" "$WORK/prepare-8b.log" &
  pids+=($!) names+=(prepare-8b)
fi
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  STEPS+=(--rc "${names[$i]}=$?")
done
for part in "${ALONE[@]}"; do
  wanted "$part" || continue
  box=$(left 20)
  step "$part" "$box" "$OUT/$part.log"
  STEPS+=(--rc "$part=$?" --box "$part=$box")
done

# 4. summary.json, logs.tar.gz
"$PY" scripts/gpu_check.py summary --out "$OUT" --work "$WORK" "${MODE[@]}" "${STEPS[@]}" \
  --info "command=bash scripts/gpu_check.sh $OUT ${MODE[*]:+--cpu-smoke} ${ONLY:+--only $ONLY}" \
  --info "budget_s=$BUDGET" --info "elapsed_s=$SECONDS" --info "work=$WORK"
code=$?
if [ -z "$(find "$TORCH_EXTENSIONS_DIR" -name lock)" ]; then  # complete builds: keep them
  rm -rf "$OWN_EXT.tmp" && mkdir -p "$ROOT/.cache" && cp -a "$TORCH_EXTENSIONS_DIR" "$OWN_EXT.tmp" \
    && rm -rf "$OWN_EXT" && mv "$OWN_EXT.tmp" "$OWN_EXT"
fi
[ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
echo "gpu_check: ${SECONDS}s of a ${BUDGET}s budget, exit $code"
exit "$code"
