"""Evaluation of sequence-classification runs in-process: reward models and classifiers.

vLLM generates text; a reward model or a classifier outputs scores, so eval_run hands these
runs here (model.task=sequence_classification). Both the trained model and the untrained base
score the held-out rows (eval.data, else the validation split) with transformers:

    reward          reward accuracy: the share of held-out pairs whose chosen answer scores
                    above the rejected one (prompt + answer through the chat template, as TRL's
                    RewardTrainer tokenizes them), and the mean margin chosen - rejected
    classification  accuracy: argmax of the logits equals the label

"base" is the model training started from: the base weights with the classification head
initialised under train.seed, as launcher/train/model.py builds it (a LoRA run: the adapter
switched off, its saved head back to the original). Writes RUN_DIR/eval/results.json and
report.md.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from launcher.config.plan import Plan
from launcher.errors import RunError
from launcher.rundir import RunDir
from serve.spec import is_adapter

log = logging.getLogger(__name__)

LAYOUT = "in-process transformers scoring (sequence classification: no vLLM path)"
DEFINITIONS = {
    "reward_accuracy": "share of held-out pairs whose chosen answer scores above the rejected",
    "reward_margin": "mean of score(chosen) - score(rejected)",
    "accuracy": "share of held-out rows whose argmax class is the label",
}
Row = dict[str, Any]


def held_out_rows(plan: Plan) -> tuple[list[Row], str, dict[str, int] | None]:
    """The trainer rows to score (eval.data, else the validation split), their source in
    words, and the string-label ids of training."""
    from launcher.data.rows import load_splits
    from serve.examples import eval_data_rows

    recipe = plan.recipe
    data, ev = recipe.data, recipe.eval
    splits = load_splits(recipe)
    if ev.data:
        rows, source = eval_data_rows(recipe, splits.labels), ev.data
    elif splits.validation:
        rows, source = splits.validation, "the validation split"
    else:
        raise RunError("no held-out data to score: set eval.data, data.validation or val_split")
    rows = rows[: ev.max_examples] if ev.max_examples else rows
    if not rows:
        raise RunError(f"no usable {data.format} rows in {source}")
    return rows, source, splits.labels


def load_models(plan: Plan, run: RunDir, num_labels: int) -> tuple[Any, Any, Any]:
    """(tokenizer, fine-tuned model, base): for an adapter the base is the same object with
    the adapter off (see `variant`); for a full fine-tune a second model."""
    import torch
    import transformers

    recipe = plan.recipe
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.final))

    def base() -> Any:
        transformers.set_seed(recipe.train.seed)  # the head training started from
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            plan.base_model,
            num_labels=num_labels,
            dtype=torch.float32,
            trust_remote_code=recipe.model.trust_remote_code,
        )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.eval()

    if is_adapter(run.final):
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base(), str(run.final)).eval()
        return tokenizer, tuned, tuned
    tuned = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(run.final), dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code
    ).eval()
    tuned.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, tuned, base()


def variant(model: Any, tuned: Any, name: str) -> Any:
    """The context a variant scores in: the base of an adapter run is the adapter off."""
    if name == "base" and model is tuned and hasattr(model, "disable_adapter"):
        return model.disable_adapter()
    return nullcontext()


def reward_scores(model: Any, tokenizer: Any, rows: list[Row], max_len: int | None) -> list[Row]:
    """Each pair's chosen and rejected score (one forward per answer)."""
    import torch

    def score(messages: list[dict[str, str]]) -> float:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        input_ids = torch.tensor([ids["input_ids"][:max_len]])
        with torch.no_grad():
            return float(model(input_ids=input_ids).logits[0, 0])

    found = []
    for row in rows:
        chosen, rejected = (
            score(row["prompt"] + row["chosen"]),
            score(row["prompt"] + row["rejected"]),
        )
        found.append(
            {"prompt": row["prompt"][-1]["content"], "chosen": chosen, "rejected": rejected}
        )
    return found


def reward_metrics(found: list[Row]) -> dict[str, float]:
    n = len(found)
    return {
        "examples": n,
        "reward_accuracy": sum(r["chosen"] > r["rejected"] for r in found) / n,
        "reward_margin": sum(r["chosen"] - r["rejected"] for r in found) / n,
    }


def class_predictions(
    model: Any, tokenizer: Any, rows: list[Row], max_len: int | None
) -> list[Row]:
    import torch

    found = []
    for row in rows:
        batch = tokenizer(
            row["text"], truncation=max_len is not None, max_length=max_len, return_tensors="pt"
        )
        with torch.no_grad():
            predicted = int(model(**batch).logits[0].argmax())
        found.append({"text": row["text"], "label": row["label"], "predicted": predicted})
    return found


def class_metrics(found: list[Row]) -> dict[str, float]:
    n = len(found)
    return {"examples": n, "accuracy": sum(r["label"] == r["predicted"] for r in found) / n}


def eval_scores(run: RunDir) -> dict[str, Any]:
    """Score the run's model and its base on the held-out rows; write the report."""
    started = time.monotonic()
    plan = run.load_plan()
    recipe = plan.recipe
    rows, source, labels = held_out_rows(plan)
    reward = plan.objective == "reward"
    num_labels = 1 if reward else len(labels) if labels else int(recipe.model.num_labels or 2)
    tokenizer, tuned, base = load_models(plan, run, num_labels)
    predict: Callable[[Any, Any, list[Row], int | None], list[Row]]
    predict, measure = (
        (reward_scores, reward_metrics) if reward else (class_predictions, class_metrics)
    )
    predictions, metrics = {}, {}
    for name, model in (("finetuned", tuned), ("base", base)):
        with variant(model, tuned, name):
            predictions[name] = predict(model, tokenizer, rows, recipe.data.max_seq_len)
        metrics[name] = measure(predictions[name])
        log.info("%s: %s", name, {k: round(v, 4) for k, v in metrics[name].items()})
    results = {
        "run": plan.name,
        "run_dir": str(run.path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "layout": LAYOUT,
        "data": {"source": source, "format": recipe.data.format, "examples": len(rows)},
        "definitions": {k: v for k, v in DEFINITIONS.items() if k in metrics["finetuned"]},
        "metrics": metrics,
        "seconds": round(time.monotonic() - started, 1),
        "predictions": predictions,
    }
    run.eval.mkdir(parents=True, exist_ok=True)
    RunDir.write_atomic(run.eval_results, json.dumps(results, indent=2) + "\n")
    RunDir.write_atomic(run.eval_report, render(results))
    return results


def render(results: dict[str, Any]) -> str:
    """report.md: the metrics of both variants, their definitions."""
    data, metrics = results["data"], results["metrics"]
    columns = [c for c in metrics["finetuned"] if c != "examples"]
    out = [
        f"# Evaluation of run `{results['run']}`",
        "",
        f"{data['examples']} held-out rows from `{data['source']}` ({data['format']}), scored "
        f"by {results['layout']}. Took {results['seconds']} s.",
        "",
        "| model | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, values in metrics.items():
        out.append(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
    out.append("")
    out += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in results["definitions"].items()]
    out += ["", "Every score: `results.json`."]
    return "\n".join(out) + "\n"
