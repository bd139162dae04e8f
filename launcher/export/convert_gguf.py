"""llama.cpp's own converter (convert_hf_to_gguf.py, conversion/ and gguf-py/ from the
llama-cpp-python source that built our llama.cpp), run as `python -m launcher.export.convert_gguf CONVERTER_DIR ARGS...`.

One adjustment, made from outside: the converter names a BPE tokenizer's pre-tokenizer by the
hash of its tokens on a test string and refuses a tokenizer it has never seen, such as one
trained for the run. When it refuses and tokenizer.json's pre-tokenizer is exactly GPT-2's
(ByteLevel with its regex, nothing else), llama.cpp's "gpt-2" pre-tokenizer is that very
rule and is used; any other tokenizer is still refused. Tokenization of the held-out prompts
by llama.cpp is then compared with training's (validation.json: tokenization_agreement).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("tune-launch.export")


def gpt2_pre_tokenizer(model_dir: Path) -> bool:
    """tokenizer.json splits text exactly as GPT-2 does: ByteLevel(use_regex), no normalizer."""
    try:
        spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("model", {}).get("type") == "BPE"
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and not pre.get("add_prefix_space", False)
    )


def _patch(model_dir: Path) -> None:
    from conversion.base import TextModel  # the converter's package, on sys.path

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            if not gpt2_pre_tokenizer(model_dir):
                raise
            log.warning("unknown BPE tokenizer with GPT-2's ByteLevel pre-tokenizer: gpt-2")
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter_dir, args = Path(argv[0]), argv[1:]
    # the converter's own gguf-py: the source's copy is ahead of PyPI's gguf 0.19.0 (same
    # version number, but the converter needs its LazyChunkedTensor)
    os.environ.pop("NO_LOCAL_GGUF", None)
    sys.path[:0] = [str(converter_dir), str(converter_dir / "gguf-py")]
    model_dir = Path(next(a for a in args if not a.startswith("-")))
    _patch(model_dir)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
