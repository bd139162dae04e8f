"""Unit tests of the eval's checks on results shaped as lm-eval, the parity gate and the
streamed requests produce them: the forgetting check's arithmetic (a destroyed skill flagged,
a kept one passing), lm-eval's results parsed with their stderr, local task files resolved,
the parity verdict and its worst prompt, serving-speed percentiles and the report's sections.
The real runs: tests/serve/test_eval_gates.py and tests/e2e/test_quickstart.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from serve.lm_eval import forgetting, lm_eval_argv, parse_results, prepare_include
from serve.parity import compare, describe_failure
from serve.report import lm_eval_section, parity_section, speed_section
from serve.speed import percentile, serving_speed

REPO = Path(__file__).resolve().parents[2]


def lm_eval_raw(acc: float, stderr: float = 0.05) -> dict:
    """lm-eval's results.json `results` for one task, as 0.4.13 writes it."""
    return {
        "general": {
            "alias": "general",
            "acc,none": acc,
            "acc_stderr,none": stderr,
            "acc_norm,none": acc - 0.1,
            "acc_norm_stderr,none": "N/A",
        }
    }


def test_parse_results_keeps_values_and_stderr() -> None:
    tasks = parse_results(lm_eval_raw(0.8, 0.04))
    assert tasks == {
        "general": {
            "acc": {"value": 0.8, "stderr": 0.04},
            "acc_norm": {"value": pytest.approx(0.7), "stderr": None},
        }
    }


@pytest.mark.parametrize(
    ("base", "finetuned", "flagged"),
    [(0.80, 0.40, True), (0.80, 0.71, True), (0.80, 0.72, False), (0.80, 0.95, False)],
)
def test_forgetting_flags_a_drop_below_the_ratio(
    base: float, finetuned: float, flagged: bool
) -> None:
    b = {"tasks": parse_results(lm_eval_raw(base))}
    f = {"tasks": parse_results(lm_eval_raw(finetuned))}
    verdict = forgetting(b, f, ["general"], 0.9)
    row = verdict["tasks"][0]
    assert row["metric"] == "acc" and row["flagged"] is flagged
    assert row["ratio"] == pytest.approx(finetuned / base)
    assert verdict["flagged"] == (["general"] if flagged else [])


def test_forgetting_without_a_result_is_incomplete_not_passed() -> None:
    base = {"tasks": parse_results(lm_eval_raw(0.8))}
    verdict = forgetting(base, {"error": "lm_eval exited 1"}, ["general"], 0.9)
    assert verdict["flagged"] == [] and verdict["incomplete"] == ["general"]


def test_local_task_data_files_resolved_against_the_yaml(tmp_path: Path) -> None:
    out = prepare_include([str(REPO / "recipes" / "tasks" / "quickstart")], tmp_path / "tasks")
    assert out is not None
    copied = {p.name: p for p in out.rglob("*.yaml")}
    assert set(copied) == {"quickstart_sentiment.yaml", "quickstart_sentiment_gen.yaml"}
    for path in copied.values():
        files = yaml.safe_load(path.read_text())["dataset_kwargs"]["data_files"]
        assert Path(files["test"]) == REPO / "recipes" / "data" / "quickstart_eval.jsonl"
        assert Path(files["test"]).is_file()


def test_lm_eval_command_uses_the_run_tokenizer_and_chat_template(tmp_path: Path) -> None:
    argv = lm_eval_argv(
        "http://h:1/v1/", "qs", tmp_path / "final", ["t"], tmp_path, include=tmp_path, concurrent=1
    )
    spec = json.loads(argv[-1])
    assert argv[1:3] == ["-m", "serve.lm_eval"]
    assert "base_url=http://h:1/v1/completions" in spec["model_args"]
    assert f"tokenizer={tmp_path / 'final'}" in spec["model_args"]
    assert "num_concurrent=1" in spec["model_args"]
    assert spec["chat"] is True and spec["tasks"] == ["t"]


def side(prompt: list[int], logprobs: list[float], greedy: str, answer: list[int] | None = None):
    return {
        "question": "q?",
        "reference": "yes",
        "prompt_ids": prompt,
        "answer_ids": answer or [7, 2],
        "logprobs": logprobs,
        "greedy": greedy,
    }


def test_parity_passes_within_tolerance() -> None:
    verdict = compare(
        [side([1, 5], [-0.1, -0.2], "yes")], [side([1, 5], [-0.1001, -0.2], "yes")], 0.01
    )
    assert verdict["ok"] is True
    assert verdict["max_abs_delta"] == pytest.approx(1e-4)
    assert verdict["greedy_agreement"] == 1.0


def test_parity_fails_and_names_the_worst_prompt() -> None:
    ref = [
        side([1, 5], [-0.1, -0.2], "yes"),
        {**side([1, 6], [-0.3, -0.1], "no"), "question": "bad?"},
    ]
    got = [side([1, 5], [-0.1, -0.21], "yes"), side([1, 9], [-2.0, -0.1], "maybe")]
    verdict = compare(ref, got, 0.05)
    assert verdict["ok"] is False
    assert verdict["worst"]["question"] == "bad?"
    problems = " ".join(verdict["worst"]["problems"])
    assert "formats the prompt differently" in problems
    assert "differ by up to 1.7" in problems and "greedy answers differ" in problems
    message = describe_failure(verdict)
    assert "1 of 2 prompts" in message and "'bad?'" in message
    assert "FAILED" in "\n".join(parity_section(verdict))


def test_parity_different_answer_tokens_fail() -> None:
    verdict = compare([side([1], [-0.1], "a", [7])], [side([1], [-0.1, -0.1], "a", [7, 8])], 1.0)
    assert verdict["ok"] is False and verdict["max_abs_delta"] is None


def test_serving_speed_from_streamed_rows() -> None:
    rows = [
        {"error": None, "start_s": i * 0.1, "end_s": i * 0.1 + 0.5, "latency_s": 0.5,
         "ttft_s": 0.1 * (i + 1), "completion_tokens": 4}
        for i in range(10)
    ]  # fmt: skip
    speed = serving_speed(rows, 4, ["base"])
    assert speed is not None
    assert speed["output_tokens"] == 40
    assert speed["wall_s"] == pytest.approx(1.4)
    assert speed["output_tokens_per_s"] == pytest.approx(40 / 1.4, abs=0.01)
    assert speed["ttft_p50_s"] == pytest.approx(0.5) and speed["ttft_p95_s"] == pytest.approx(1.0)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 50) is None
    assert serving_speed([{"error": None}], 4) is None  # in-process generation: no timings
    table = "\n".join(speed_section({"finetuned": speed}))
    assert "| fine-tuned | 10 | 4 | 28.5700 |" in table and "| base |" in table


def test_report_lm_eval_section_shows_stderr_and_the_flag() -> None:
    base = {"tasks": parse_results(lm_eval_raw(0.8, 0.04))}
    fine = {"tasks": parse_results(lm_eval_raw(0.4, 0.05))}
    summary = {
        "tasks": ["general"],
        "finetuned": {**fine, "chat_template": True},
        "base": base,
        "forgetting": forgetting(base, fine, ["general"], 0.9),
    }
    text = "\n".join(lm_eval_section(summary))
    assert "| general | acc | 0.4000 ± 0.0500 | 0.8000 ± 0.0400 |" in text
    assert "FLAGGED: general fell below 0.9 x the base" in text
    assert "chat template applied: fine-tuned true, base false" in text
    assert "Not run: lm_eval is missing." in "\n".join(
        lm_eval_section({"skipped": "lm_eval is missing"})
    )
