"""A hub model's shape comes from its own config.json, read offline from the local Hugging
Face cache (HF_HUB_CACHE / HF_HOME), never from another model's numbers: ZeRO-3 bucket sizes
follow its hidden size, FSDP wraps its block class. Without the config nothing is guessed,
and a model that is neither local nor cached stops `tune-launch run` before any process
starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.cli import main

MODEL = "acme/qwen-chat-7b"  # a Qwen2 shape outside the built-in table
CONFIG = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 152064,
    "hidden_size": 3000,
    "intermediate_size": 16000,
    "num_hidden_layers": 20,
    "num_attention_heads": 24,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


def cache_config(hub: Path, repo: str, config: dict[str, object]) -> None:
    """What `hf download` leaves in the cache: a snapshot folder named by commit, refs/main."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    return home / "hub"


def recipe(tmp_path: Path, strategy: str, *, architecture: str | None = None) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    arch_line = f", architecture: {architecture}" if architecture else ""
    path = tmp_path / "r.yaml"
    path.write_text(
        f"name: hub\nmodel: {{name_or_path: {MODEL}{arch_line}}}\n"
        f"data: {{train: {data}}}\n"
        f"distributed: {{strategy: {strategy}}}\n"
        "resources: {gpus_per_node: 2}\n"
    )
    return path


def dry_run(tmp_path: Path, path: Path, *sets: str) -> tuple[int, dict[str, object] | None]:
    run = tmp_path / "run"
    argv = ["run", str(path), "--dry-run", "--run-dir", str(run)]
    for s in sets:
        argv += ["--set", s]
    code = main(argv)
    plan = json.loads((run / "plan.json").read_text()) if code == 0 else None
    return code, plan


def test_cached_config_sizes_zero3_buckets(hub: Path, tmp_path: Path) -> None:
    cache_config(hub, MODEL, CONFIG)
    code, plan = dry_run(tmp_path, recipe(tmp_path, "zero3"))
    assert code == 0 and plan is not None
    zero = plan["deepspeed"]["zero_optimization"]  # type: ignore[index]
    assert zero["reduce_bucket_size"] == 3000 * 3000
    assert zero["stage3_param_persistence_threshold"] == 10 * 3000
    assert plan["model_shape"]["num_layers"] == 20  # type: ignore[index]


def test_cached_config_wraps_the_models_own_block_class(hub: Path, tmp_path: Path) -> None:
    cache_config(hub, MODEL, CONFIG)
    code, plan = dry_run(tmp_path, recipe(tmp_path, "fsdp"))
    assert code == 0 and plan is not None
    wrap = plan["fsdp"]["fsdp_config"]["transformer_layer_cls_to_wrap"]  # type: ignore[index]
    assert wrap == ["Qwen2DecoderLayer"]


def test_without_the_config_nothing_is_guessed(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, plan = dry_run(tmp_path, recipe(tmp_path, "zero3"))
    assert code == 0 and plan is not None
    zero = plan["deepspeed"]["zero_optimization"]  # type: ignore[index]
    assert zero["reduce_bucket_size"] == "auto"  # DeepSpeed resolves it from the loaded model
    assert zero["stage3_prefetch_bucket_size"] == "auto"
    assert plan["memory"] is None
    assert any("not in the Hugging Face cache" in w for w in plan["warnings"])  # type: ignore[attr-defined]

    assert dry_run(tmp_path, recipe(tmp_path, "fsdp"))[0] == 2
    assert "FSDP wraps the model's block class" in capsys.readouterr().err


def test_a_model_neither_local_nor_cached_stops_the_run_before_any_process(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["run", str(recipe(tmp_path, "ddp")), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "not in the Hugging Face cache" in err
    assert "hf download" in err and "Traceback" not in err
    assert not (run / "logs").exists() and not (run / "job.json").exists()


def test_a_tiny_shape_name_is_not_a_real_models_architecture(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = dry_run(tmp_path, recipe(tmp_path, "zero3"), "model.architecture=qwen2")
    assert code == 2
    err = capsys.readouterr().err
    assert "model.architecture" in err and "tiny test shape" in err


def test_architecture_contradicting_the_cached_config_is_refused(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_config(hub, MODEL, CONFIG)
    code, _ = dry_run(tmp_path, recipe(tmp_path, "zero3", architecture="llama3.1-8b"))
    assert code == 2
    assert "model_type=qwen2" in capsys.readouterr().err
