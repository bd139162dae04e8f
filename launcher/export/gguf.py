"""`--format gguf`: GGUF files for llama.cpp / Ollama, run by llama.cpp itself.

    model-F16.gguf, model-Q8_0.gguf   llama.cpp's convert_hf_to_gguf.py (launcher/export/
                                      convert_gguf.py), from the fine-tuned model directory
    model-Q4_K_M.gguf                 llama.cpp's quantizer (llama_model_quantize, through
                                      llama-cpp-python) from the F16 file; tensors whose rows
                                      are not a multiple of 256 get llama.cpp's own fallback
                                      type (validation.json lists the tensor types)
    Modelfile                         Ollama: FROM the Q8_0 file, training's template and stops

Each file is loaded by llama.cpp (llama-cpp-python) and answers the held-out prompts
greedily; the answers are compared with transformers' greedy answers of the merged model.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from launcher.errors import RunError
from launcher.export.reference import (
    GENERATE_TOKENS,
    Generation,
    Prompt,
    compare,
    cut_at_eos,
)

# scripts/setup.sh puts llama.cpp's converter (convert_hf_to_gguf.py + conversion/) here, from
# the same llama-cpp-python source that built the llama.cpp we load
CONVERTER = Path(sys.prefix) / "share" / "llama.cpp"
CONVERTED = {"F16": "f16", "Q8_0": "q8_0"}  # file type -> converter --outtype
QUANTIZED = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama.cpp's quantizer, from F16
MODELFILE_FROM = "Q8_0"
# the least agreement with the merged model each file must reach (none: recorded only)
MIN_AGREEMENT: dict[str, float | None] = {"F16": 0.95, "Q8_0": 0.9, "Q4_K_M": None}


def gguf_name(kind: str) -> str:
    return f"model-{kind}.gguf"


def check_installed() -> None:
    missing = []
    for module in ("llama_cpp", "gguf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not (CONVERTER / "convert_hf_to_gguf.py").is_file():
        missing.append(f"llama.cpp's converter in {CONVERTER}")
    if missing:
        raise RunError(
            f"--format gguf needs {', '.join(missing)}: run scripts/setup-llama-cpp.sh .venv "
            "(llama.cpp's build; scripts/setup.sh runs it, `make test` in the background)"
        )


def convert(model_dir: Path, out: Path, kind: str, log: Path) -> None:
    argv = [sys.executable, "-m", "launcher.export.convert_gguf", str(CONVERTER)]
    argv += [str(model_dir), "--outtype", CONVERTED[kind], "--outfile", str(out)]
    with log.open("ab") as fh:
        proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RunError(f"llama.cpp's converter failed ({kind}, exit {proc.returncode}): see {log}")


def quantize(src: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED[kind])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise RunError(f"llama.cpp's quantizer failed ({kind}, code {rc})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds (the gguf package's reader)."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


def run_llama_cpp(
    path: Path, prompts: list[Prompt], eos: list[int]
) -> tuple[list[Generation], float]:
    """Greedy answers by llama.cpp, fed training's prompt tokens, and the share of prompts
    llama.cpp's own tokenizer (with the file's BOS rule) tokenizes as training did."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=os.cpu_count(), seed=0, verbose=False)
    out, same_tokens = [], 0
    try:
        for p in prompts:
            same_tokens += llm.tokenize(p.text.encode(), add_bos=True, special=True) == p.ids
            tokens: list[int] = []
            for tok in llm.generate(p.ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
                tokens.append(int(tok))
                if tok in eos or len(tokens) >= GENERATE_TOKENS:
                    break
            g = cut_at_eos(tokens, eos)
            g.text = llm.detokenize(g.tokens).decode("utf-8", errors="replace")
            out.append(g)
    finally:
        llm.close()
    return out, same_tokens / max(len(prompts), 1)


def build_files(model_dir: Path, staged: Path, log: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for kind in CONVERTED:
        started = time.monotonic()
        convert(model_dir, staged / gguf_name(kind), kind, log)
        files[kind] = {"seconds": round(time.monotonic() - started, 1)}
    for kind in QUANTIZED:
        started = time.monotonic()
        quantize(staged / gguf_name("F16"), staged / gguf_name(kind), kind)
        files[kind] = {"seconds": round(time.monotonic() - started, 1)}
    for kind, info in files.items():
        path = staged / gguf_name(kind)
        info |= {
            "file": path.name,
            "bytes": path.stat().st_size,
            "tensor_types": tensor_types(path),
        }
    return files


def export_gguf(
    model_dir: Path,
    staged: Path,
    prompts: list[Prompt],
    reference: list[Generation],
    eos: list[int],
    log: Path,
) -> dict[str, Any]:
    """Write the GGUF files and the Modelfile into `staged`; the validation record."""
    check_installed()
    import llama_cpp

    files = build_files(model_dir, staged, log)
    for kind, info in files.items():
        started = time.monotonic()
        got, tokenization = run_llama_cpp(staged / info["file"], prompts, eos)
        info["validation"] = {
            **compare(prompts, reference, got),
            "tokenization_agreement": tokenization,
            "min_agreement": MIN_AGREEMENT[kind],
            "seconds": round(time.monotonic() - started, 1),
        }
    write_modelfile(model_dir, staged)
    failed = [
        kind
        for kind, info in files.items()
        if MIN_AGREEMENT[kind] is not None
        and info["validation"]["agreement"] < (MIN_AGREEMENT[kind] or 0.0)
    ]
    return {
        "consumer": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "files": files,
        "modelfile": {"file": "Modelfile", "from": gguf_name(MODELFILE_FROM)},
        "ok": not failed,
        "failed": failed,
    }


def write_modelfile(model_dir: Path, staged: Path) -> None:
    from transformers import AutoTokenizer

    from launcher.export.modelfile import render_modelfile, stop_tokens
    from serve.contract import load_contract

    contract = load_contract(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = [int(i) for i in contract.get("eos_token_ids") or []]
    stops = stop_tokens(contract, {i: str(tok.convert_ids_to_tokens(i)) for i in ids})
    text = render_modelfile(gguf_name(MODELFILE_FROM), contract, stops)
    (staged / "Modelfile").write_text(text, encoding="utf-8")
