"""7. Resume on another world size: what converting a ZeRO checkpoint costs, and where.

tune-launch reshards a DeepSpeed ZeRO checkpoint for a new world size by converting it, at
resume and only then, into DeepSpeed's universal checkpoint (launcher/train/resume.py). The
alternative — writing a world-size-independent copy at every save — would add that
conversion to every checkpoint. This measures, on real checkpoints written by real 2-process
ZeRO-3 full fine-tuning through the CLI:
- the checkpoint's size, and the time of the conversion (launcher.train.resume.to_universal,
  the rank-0 code path, run in its own process) with its peak RSS: what a resume on a new
  world size pays once, and what every save would pay under the alternative;
- what a save costs us on top of the Trainer's own: a copy of plan.json (its size).

The model: a Llama of hidden 1024, 8 layers, MLP 2816 (about 100M parameters with the tiny
tokenizer's vocabulary), random weights; --smoke: the quickstart's tiny Llama (0.56M).

    python tests/benchmarks/bench_resume.py WORK [--smoke]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.common import PY, ROOT, run_timed

NAME = "resume_reshard"
SHAPE = {"hidden_size": 1024, "num_hidden_layers": 8, "intermediate_size": 2816}
SHAPE |= {"num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 64}
TRAIN = [
    "method.kind=full",
    "distributed.strategy=zero3",
    "train.max_steps=2",
    "train.save_steps=2",
    "train.global_batch_size=8",
    "eval.enabled=false",
    "data.val_split=0",
]


def build_model(work: Path) -> Path:
    """The tiny Llama's tokenizer with a bigger random model beside it."""
    import transformers

    from launcher.tiny import write_tiny

    corpus = [str(ROOT / "recipes/data/quickstart_train.jsonl")]
    out = write_tiny("llama", work / "model", corpus_files=corpus)
    config = transformers.AutoConfig.from_pretrained(out)
    for key, value in SHAPE.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    return Path(out)


def train(work: Path, model: str) -> Path:
    run_dir = work / "run"
    argv = [PY, "-m", "launcher.cli", "run", str(ROOT / "recipes/quickstart.yaml")]
    argv += ["--stages", "train", "--run-dir", str(run_dir)]
    for item in [*TRAIN, f"model.name_or_path={model}"]:
        argv += ["--set", item]
    done = run_timed(argv, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, done.output[-3000:]
    return run_dir / "checkpoints" / "checkpoint-2"


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(smoke: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = "tiny:llama" if smoke else str(build_model(work))
        checkpoint = train(work, model)
        tag = (checkpoint / "latest").read_text().strip()
        zero_mb = size_mb(checkpoint / tag)
        code = (
            "import sys; from pathlib import Path; "
            "from launcher.train.resume import to_universal; "
            "to_universal(Path(sys.argv[1]), workers=2)"
        )
        converted = run_timed([PY, "-c", code, str(checkpoint)])
        assert converted.returncode == 0, converted.output[-3000:]
        universal = checkpoint / f"{tag}_universal"
        universal_mb = size_mb(universal)
        params = [d for d in (universal / "zero").iterdir() if d.is_dir()]
        whole = [d for d in params if {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"} <= _names(d)]
        plan_kb = (checkpoint / "plan.json").stat().st_size / 1024
    return {
        "name": NAME,
        "model": "tiny:llama (0.56M)" if smoke else f"llama {SHAPE}",
        "zero3_checkpoint_mb": round(zero_mb, 1),
        "universal_mb": round(universal_mb, 1),
        "conversion_s": round(converted.seconds, 1),
        "conversion_peak_rss_mb": round(converted.peak_rss_mb),
        "added_per_save": f"plan.json, {plan_kb:.1f} KB",
        "parameters_converted": f"{len(whole)} of {len(params)} with weights and both moments",
        "headline": {
            "checkpoint_mb": round(zero_mb, 1),
            "conversion_s": round(converted.seconds, 1),
            "per_save_added": f"{plan_kb:.1f} KB",
        },
        "target": "every parameter converted whole; cost paid per world-size change, not per save",
        "met": bool(params) and len(whole) == len(params),
    }


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


if __name__ == "__main__":
    print(json.dumps(run("--smoke" in sys.argv), indent=2))
