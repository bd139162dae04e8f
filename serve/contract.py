"""The train/serve contract: the server formats and stops chats as training did.

check_contract(base_url, model_name, model_dir) asks the running server to
  1. tokenize a chat (`POST /tokenize` with messages): the ids must equal the training
     tokenizer's `apply_chat_template(..., add_generation_prompt=True)` (the chat template of
     train_contract.json when the directory has one), and
  2. generate greedily with a generous max_tokens: it must end with finish_reason "stop"
     (an EOS id from generation_config.json / train_contract.json), not "length".
A mismatch raises RunError with the first differing position and the tokens around it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from launcher.errors import RunError
from launcher.rundir import RunDir

DEFAULT_MESSAGES: list[dict[str, str]] = [
    {"role": "user", "content": "Is this review positive or negative?\n\nthe food was great."}
]


def load_contract(model_dir: str | Path) -> dict[str, Any]:
    """train_contract.json of a served directory ({} when training did not write one)."""
    path = RunDir.contract_file(Path(model_dir))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_ids(model_dir: str | Path) -> list[int]:
    """EOS ids training used: train_contract.json, else generation_config.json, else config."""
    model_dir = Path(model_dir)
    contract = load_contract(model_dir)
    found = contract.get("eos_token_ids") or contract.get("eos_token_id")
    if found is None:
        for name in ("generation_config.json", "config.json"):
            try:
                found = json.loads((model_dir / name).read_text(encoding="utf-8")).get(
                    "eos_token_id"
                )
            except (OSError, ValueError):
                continue
            if found is not None:
                break
    if found is None:
        return []
    return [int(i) for i in (found if isinstance(found, list) else [found])]


def chat_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> list[int]:
    """apply_chat_template as a flat list of ids (transformers 5 returns a BatchEncoding)."""
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, **kwargs)
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(i) for i in out]


def training_prompt_ids(
    model_dir: str | Path, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], Any]:
    """The training tokenizer's prompt ids for `messages`, and the tokenizer."""
    from transformers import AutoTokenizer

    template = load_contract(model_dir).get("chat_template")
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if template:
        kwargs["chat_template"] = template
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        return chat_ids(tokenizer, messages, **kwargs), tokenizer
    except Exception as exc:  # no tokenizer files, no chat template, ...
        raise RunError(
            f"train/serve contract: cannot apply the training chat template of {model_dir}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _diff(expected: list[int], got: list[int], tokenizer: Any) -> str:
    pos = next(
        (i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
        min(len(expected), len(got)),
    )
    lo, hi = max(0, pos - 3), pos + 4

    def show(ids: list[int]) -> str:
        window = ids[lo:hi]
        return f"{window} {tokenizer.convert_ids_to_tokens(window)}"

    return (
        f"first difference at token {pos} (training {len(expected)} tokens, server {len(got)}):\n"
        f"  training: {show(expected)}\n  server:   {show(got)}"
    )


def check_contract(
    base_url: str,
    model_name: str,
    model_dir: str | Path,
    *,
    api_key: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    max_tokens: int = 256,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Check the served `model_name` against the training tokenizer in `model_dir`.

    Returns {"prompt_tokens", "finish_reason", "completion_tokens", "text"}; RunError if not."""
    import httpx

    messages = list(messages or DEFAULT_MESSAGES)
    base_url = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    expected, tokenizer = training_prompt_ids(model_dir, messages)
    with httpx.Client(timeout=timeout_s, headers=headers) as client:
        resp = client.post(
            f"{base_url}/tokenize",
            json={"model": model_name, "messages": messages, "add_generation_prompt": True},
        )
        if resp.status_code != 200:
            raise RunError(f"/tokenize failed ({resp.status_code}): {resp.text[:500]}")
        body = resp.json()
        got = [int(i) for i in body["tokens"]]
        if got != expected:
            raise RunError(
                f"train/serve contract: the server formats chats differently from training "
                f"({model_name} vs the tokenizer in {model_dir}); {_diff(expected, got, tokenizer)}"
            )
        room = int(body.get("max_model_len") or len(got) + max_tokens) - len(got)
        budget = max(1, min(max_tokens, room))
        resp = client.post(
            f"{base_url}/v1/chat/completions",
            json={
                "model": model_name,
                "messages": messages,
                "temperature": 0,
                "max_tokens": budget,
            },
        )
        if resp.status_code != 200:
            raise RunError(f"chat completion failed ({resp.status_code}): {resp.text[:500]}")
    choice = resp.json()["choices"][0]
    usage = resp.json().get("usage") or {}
    text = (choice.get("message") or {}).get("content") or ""
    if choice.get("finish_reason") != "stop":
        raise RunError(
            f"train/serve contract: greedy generation of {model_name} did not stop at EOS "
            f"(finish_reason {choice.get('finish_reason')!r} after {usage.get('completion_tokens')} "
            f"tokens, max_tokens {budget}); EOS ids of training: {eos_ids(model_dir)}. Check "
            f"generation_config.json in {model_dir} and that training taught the end-of-turn "
            f"token. Text: {text[:200]!r}"
        )
    return {
        "prompt_tokens": len(got),
        "finish_reason": choice["finish_reason"],
        "completion_tokens": usage.get("completion_tokens"),
        "text": text,
    }
