"""Evaluation without a server: greedy generation with transformers in this process.

For the methods vLLM cannot load (prompt and prefix tuning: launcher/config/methods.py,
`in_process_eval`) eval_run answers every example here instead of at a vLLM endpoint, with the
same variants, metrics and report (serve/eval.py, serve/scoring.py):
    finetuned      the base with RUN_DIR/final's adapter (peft PeftModel)
    base           the same model with the adapter disabled, zero-shot
    base_few_shot  the same, with eval.few_shot training examples as prior chat turns
Prompts are the training tokenizer's chat template with the generation prompt (what training
saw), answers greedy up to eval.max_tokens, stopping at the contract's EOS ids. Perplexity is
computed from the model's own logits on the reference answer through its EOS, as
serve/scoring.py does from vLLM's prompt logprobs. One example at a time: no padding, so
virtual tokens and positions are exactly those of training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.contract import chat_ids
from serve.examples import Example, with_shots
from serve.scoring import empty_row, score_prediction

if TYPE_CHECKING:
    from serve.eval import Evaluation

log = logging.getLogger(__name__)

LAYOUT = "in-process transformers generation (base + adapter; the method has no vLLM path)"


def load_adapted(base_model: str, final: Path, dtype: str, trust_remote_code: bool) -> Any:
    """The base model with the run's adapter, in eval mode."""
    import torch
    import transformers
    from peft import PeftModel

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    base = transformers.AutoModelForCausalLM.from_pretrained(
        base_model, dtype=dtypes[dtype], trust_remote_code=trust_remote_code
    )
    return PeftModel.from_pretrained(base, str(final)).eval()


@contextmanager
def adapter_off(model: Any, off: bool) -> Iterator[None]:
    """The base model's answers: peft's disable_adapter (no virtual tokens, no prefix)."""
    with model.disable_adapter() if off else nullcontext():
        yield


class LocalScorer:
    """Greedy answers and reference logprobs from one in-process model."""

    def __init__(self, model: Any, tokenizer: Any, eos: list[int], max_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos = eos
        self.max_tokens = max_tokens
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (eos[0] if eos else 0)

    def generate(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """The greedy answer and its finish reason (stop at EOS, else length)."""
        import torch

        ids = chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.max_tokens,
                do_sample=False,
                eos_token_id=self.eos or None,
                pad_token_id=self.pad,
            )
        new = [int(t) for t in out[0, len(ids) :]]  # the prompt, then the answer
        stopped = bool(new) and new[-1] in self.eos
        text = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        return text, "stop" if stopped else "length"

    def reference_logprob(
        self, messages: list[dict[str, str]], reference: str
    ) -> tuple[float, int] | None:
        """Sum of the logprobs of the reference answer's tokens (through EOS), and their count."""
        import torch

        prompt = chat_ids(self.tokenizer, messages, add_generation_prompt=True)
        full = chat_ids(self.tokenizer, [*messages, {"role": "assistant", "content": reference}])
        if full[: len(prompt)] != prompt:
            return None
        answer = full[len(prompt) :]
        cut = next((i for i, t in enumerate(answer) if t in self.eos), None)
        if cut is not None:
            answer = answer[: cut + 1]
        if not answer:
            return None
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        # prompt tuning returns logits for its virtual tokens too: keep the inputs' positions
        logprobs = torch.log_softmax(logits[0, -ids.shape[1] :].float(), dim=-1)
        span = range(len(prompt), len(prompt) + len(answer))
        total = sum(float(logprobs[i - 1, int(ids[0, i])]) for i in span)
        return total, len(answer)

    def answer(self, index: int, ex: Example, messages: list[dict[str, str]]) -> dict[str, Any]:
        """One row as serve/scoring.py writes it."""
        row = empty_row(index, ex)
        started = time.monotonic()
        try:
            row["prediction"], row["finish_reason"] = self.generate(messages)
        except Exception as exc:  # one failed example is a wrong answer, not a failed eval
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["latency_s"] = round(time.monotonic() - started, 4)
        row["exact_match"], row["correct"] = score_prediction(row["prediction"], ex.reference)
        if row["error"] is None:
            try:
                found = self.reference_logprob(messages, ex.reference)
            except Exception as exc:  # no perplexity for this example
                row["ref_error"] = f"{type(exc).__name__}: {exc}"[:300]
            else:
                if found:
                    row["ref_logprob"], row["ref_tokens"] = found
        return row


def generate_in_process(ev: Evaluation) -> str:
    """Answer every variant of `ev` in this process; fills ev.predictions and ev.served and
    returns the layout in words."""
    plan, recipe = ev.plan, ev.plan.recipe
    model = load_adapted(
        plan.base_model, ev.run.final, recipe.model.dtype, recipe.model.trust_remote_code
    )
    config = model.active_peft_config
    limit = getattr(model.config, "max_position_embeddings", None)
    virtual = int(getattr(config, "num_virtual_tokens", 0) or 0)
    ev.fit(limit - virtual if limit else None, recipe.eval.max_tokens + 16)
    scorer = LocalScorer(model, ev.tokenizer, ev.eos, recipe.eval.max_tokens)
    variants = [("finetuned", False)]
    if recipe.eval.compare_base:
        variants.append(("base", False))
        if recipe.eval.few_shot > 0:
            variants.append(("base_few_shot", True))
    started = time.monotonic()
    for variant, few in variants:
        with adapter_off(model, variant != "finetuned"):
            rows = [
                scorer.answer(i, ex, with_shots(ex, ev.shots) if few else list(ex.messages))
                for i, ex in enumerate(ev.examples)
            ]
        ev.predictions[variant] = rows
        ev.served[variant] = {
            "model": plan.name if variant == "finetuned" else "base",
            "path": str(ev.run.final if variant == "finetuned" else plan.base_model),
            "lora": False,
            "in_process": True,
        }
    log.info(
        "in-process eval: %d variant(s) x %d example(s) in %.1f s",
        len(variants),
        len(ev.examples),
        time.monotonic() - started,
    )
    ev.contract = {
        "ok": True,
        "in_process": True,
        "note": "answered with the training tokenizer and chat template; EOS ids "
        f"{ev.eos} stop generation",
    }
    ev.lm_eval = {"skipped": "lm-evaluation-harness needs an endpoint; this method has none"}
    return LAYOUT
