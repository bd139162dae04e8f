"""Multi-turn chats train every assistant turn, through the whole pipeline: train -> merge ->
vLLM -> eval, as `tune-launch RECIPE` runs it.

Every training chat answers a review's sentiment in its first assistant turn and ends with a
fixed sign-off turn; the evaluation asks the first question alone. The task lives only in
the earlier assistant turn: a launcher that trains only the last turn teaches the sign-off
and scores 0 (measured before the fix: 0.000, every answer "goodbye")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "recipes" / "data"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PY if VENV_PY.exists() else Path(sys.executable))
SIGN_OFF = "goodbye"


def as_chats(source: Path, target: Path, *, sign_off: bool) -> Path:
    lines = []
    for line in source.read_text().splitlines():
        row = json.loads(line)
        turns = [
            {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
            {"role": "assistant", "content": row["output"]},
        ]
        if sign_off:
            turns += [
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": SIGN_OFF},
            ]
        lines.append(json.dumps({"messages": turns}))
    target.write_text("\n".join(lines) + "\n")
    return target


RECIPE = """\
name: multiturn
model: {{name_or_path: "tiny:llama", dtype: fp32}}
method: {{kind: lora, r: 16, alpha: 32, dropout: 0.0}}
data: {{train: {train}, format: messages, max_seq_len: 96}}
train:
  max_steps: 120
  micro_batch_size: 16
  global_batch_size: 16
  learning_rate: 5.0e-3
  warmup_ratio: 0.05
  precision: fp32
  save_steps: 120
  logging_steps: 20
distributed: {{strategy: ddp}}
resources: {{nodes: 1, gpus_per_node: 1, accelerator: cpu, time: "00:20:00"}}
serve: {{enabled: true, engine: vllm-cpu, mode: merged, port: 0, health_timeout_s: 300}}
eval: {{enabled: true, data: {eval}, max_examples: 40, max_tokens: 4, compare_base: false,
        few_shot: 0}}
"""


@pytest.mark.train
@pytest.mark.vllm
def test_the_task_in_an_earlier_turn_is_learnt(tmp_path: Path) -> None:
    train = as_chats(DATA / "quickstart_train.jsonl", tmp_path / "train.jsonl", sign_off=True)
    evaluate = as_chats(DATA / "quickstart_eval.jsonl", tmp_path / "eval.jsonl", sign_off=False)
    recipe = tmp_path / "multiturn.yaml"
    recipe.write_text(RECIPE.format(train=train, eval=evaluate))
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [PYTHON, "-m", "launcher.cli", "run", str(recipe), "--run-dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
        },
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run = RunDir(run_dir)
    assert run.is_complete(run.merged)
    results = json.loads(run.eval_results.read_text())
    fine = results["metrics"]["finetuned"]["exact_match"]
    answers = [r["prediction"] for r in results["predictions"]["finetuned"]]
    assert fine >= 0.8, (results["metrics"], answers[:10])
    # the served template is the trained one: the server tokenizes prompts as training did
    assert results["contract"].get("ok") is True, results["contract"]
