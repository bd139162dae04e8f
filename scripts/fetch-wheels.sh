#!/usr/bin/env bash
# Wheels for a GPU node without network (an air-gapped cluster): run this on a machine that
# reaches a package registry, carry the folder to the node, install from it there.
#
#   scripts/fetch-wheels.sh [DIR]      # default .whl/ (ignored by git)
#
# What it fetches: the packages tune-launch's training and its GPU check (`make gpu-check`,
# scripts/gpu_check.sh) need beyond a node's own torch, at the versions constraints.txt pins:
# trl, datasets, pydantic, bitsandbytes, deepspeed (source: it compiles its ops with the
# node's nvcc), submitit, liger-kernel and their pure-Python dependencies, plus transformers
# unless WITH_TRANSFORMERS=0 (use the node's own). PYTHON_VERSION (default 3.12) and
# PLATFORM (default x86_64) name the node's interpreter and architecture.
#
# On the node, before anything imports them:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
#     --target /tmp/site DIR/* && export PYTHONPATH=/tmp/site:$PWD
# scripts/gpu_check.sh does this itself when a .whl/ folder is in the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-x86_64}
PIP=${PIP:-python3 -m pip}

pinned() {  # a package's pin in constraints.txt (either spelling of - and _), else its name
  local name=$1 line
  line=$(grep -iE "^${name//[-_]/[-_]}==" constraints.txt | head -n 1 || true)
  printf '%s\n' "${line:-$name}"
}

binary=(
  trl datasets dill multiprocess xxhash
  pydantic pydantic-core annotated-types typing-inspection
  bitsandbytes submitit cloudpickle hjson liger-kernel
)
if [[ "${WITH_TRANSFORMERS:-1}" == 1 ]]; then
  binary+=(transformers)
fi
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_${PLATFORM}")
done
platforms+=(--platform any)

mkdir -p "$DIR"
specs=()
for name in "${binary[@]}"; do
  specs+=("$(pinned "$name")")
done
$PIP download -q --no-deps --only-binary=:all: --implementation cp \
  --python-version "$PYTHON_VERSION" "${platforms[@]}" -d "$DIR" "${specs[@]}"
# deepspeed publishes no wheel: its source, built on the node against the node's CUDA
$PIP download -q --no-deps --no-binary=:all: -d "$DIR" "$(pinned deepspeed)"

bytes=$(find "$DIR" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
count=$(find "$DIR" -type f | wc -l)
awk -v b="$bytes" -v n="$count" -v d="$DIR" \
  'BEGIN {printf "%d files, %.1f MiB (%d bytes) in %s\n", n, b / 1048576, b, d}'
