"""Real training: 2 processes on gloo through the real CLI, tiny models, a few steps each.

`tune-launch run RECIPE --stages train --run-dir DIR --set ...` in a subprocess, then the
run directory is read back. Each run takes 25-60 s on a 2-core machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.rundir import RunDir

from .conftest import QUICKSTART, SHORT, cli_env, explain, metrics, run_cli, tensors, train_losses

pytestmark = pytest.mark.train

# Resumed and uninterrupted runs must end with the same adapter. On CPU with the same seed,
# data order and world size they are bitwise equal; the tolerance leaves room for nothing else.
RESUME_ATOL = 1e-6


def assert_ok(result: Any) -> None:
    assert result.returncode == 0, explain(result)


def same_tensors(a: dict[str, Any], b: dict[str, Any], atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"max |difference| {worst} > {atol}"
    return worst


def mean_example_tokens(model_dir: Path) -> float:
    """Mean tokens of a quickstart example as a chat (user turn + answer) with the run's
    tokenizer and template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in (QUICKSTART.parent / "data/quickstart_train.jsonl").open()]
    lengths = [
        len(
            tok.apply_chat_template(
                [
                    {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                    {"role": "assistant", "content": r["output"]},
                ],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for r in rows
    ]
    return sum(lengths) / len(lengths)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart (tiny Llama, LoRA, ZeRO-2, 2 processes), 20 steps: the reference run."""
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    assert_ok(run_cli(run_dir, *SHORT))
    return run_dir


def test_lora_zero2_quickstart_trains(quickstart_run: Path) -> None:
    losses = train_losses(quickstart_run)
    # from ~7.0 (uniform over the 1024-token vocabulary) the 1-token answers are learned fast
    assert losses[-1] < losses[0] - 0.5, losses
    assert any(m.get("eval_loss") for m in metrics(quickstart_run))
    first = metrics(quickstart_run)[1]
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch", "time"):
        assert first.get(key) is not None, (key, first)
    run = RunDir(quickstart_run)
    assert list(run.tensorboard.rglob("events.out.tfevents.*"))
    # tokens are counted over both ranks: 16 examples a step x their mean length
    last = [m for m in metrics(quickstart_run) if m.get("num_input_tokens_seen")][-1]
    expected = last["step"] * 16 * mean_example_tokens(run.final)
    assert 0.9 * expected <= last["num_input_tokens_seen"] <= 1.1 * expected, (last, expected)
    assert not run.data_cache.exists()  # removed once training completed
    for rank in (0, 1):
        assert run.rank_log(rank).stat().st_size > 0
    ckpts = run.list_checkpoints()
    assert [c.step for c in ckpts] == [10, 20] and all(c.complete for c in ckpts)
    assert run.is_complete(run.final) and (run.final / "adapter_config.json").is_file()
    assert json.loads(run.job_file.read_text())["state"] == "COMPLETED"


def test_chat_template_and_eos_saved_are_those_used_in_training(quickstart_run: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    run = RunDir(quickstart_run)
    used = AutoTokenizer.from_pretrained(run.base)  # the recipe sets no template
    saved = AutoTokenizer.from_pretrained(run.final)
    contract = json.loads(RunDir.contract_file(run.final).read_text())
    assert saved.chat_template == used.chat_template == contract["chat_template"]
    assert saved.eos_token == used.eos_token == "<|end|>"
    assert contract["eos_token_id"] == used.eos_token_id == saved.eos_token_id
    generation = GenerationConfig.from_pretrained(run.final)
    assert used.eos_token_id in generation.eos_token_id
    assert contract["eos_token_ids"] == generation.eos_token_id
    assert contract["pad_token_id"] == saved.pad_token_id != saved.eos_token_id
    checkpoint_contract = RunDir.contract_file(run.checkpoint(20))
    assert json.loads(checkpoint_contract.read_text()) == contract


def test_crash_during_a_save_leaves_the_previous_checkpoint_resumable(
    quickstart_run: Path, tmp_path: Path
) -> None:
    """Rank 0 dies while writing checkpoint 20; the same command started again resumes from
    checkpoint 10 and ends with the adapter of the uninterrupted quickstart run."""
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    started = time.monotonic()
    crashed = run_cli(run_dir, *SHORT, env=cli_env(TUNE_LAUNCH_FAULT="crash_in_save:20"))
    # rank 0 died mid-save while rank 1 waited in a collective: torchrun stopped it at once
    assert crashed.returncode == 1, explain(crashed)
    assert time.monotonic() - started < 240
    assert "rank 0 failed" in crashed.stderr and "fault injection" in crashed.stderr
    assert run.is_complete(run.checkpoint(10))
    assert not run.checkpoint(20).exists()
    assert (run.staging / "checkpoint-20").is_dir()  # the partial save, never published
    assert not run.final.exists()

    again = run_cli(run_dir, *SHORT)  # the same command, in the same run directory
    assert_ok(again)
    assert "removed incomplete checkpoint" in again.stderr
    assert "resuming from" in again.stderr and "checkpoint-10 (step 10)" in again.stderr
    assert not run.staging.exists()
    same_tensors(
        tensors(RunDir(quickstart_run).final / "adapter_model.safetensors"),
        tensors(run.final / "adapter_model.safetensors"),
        RESUME_ATOL,
    )


def test_full_finetune_zero3_restarts_and_consolidates_into_safetensors_shards(
    tmp_path: Path,
) -> None:
    """Rank 0 is killed right after the first ZeRO-3 checkpoint; train.restarts=1 relaunches
    and resumes from the sharded checkpoint; the final model is gathered into shards."""
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    result = run_cli(
        run_dir,
        "method.kind=full",
        "distributed.strategy=zero3",
        "train.max_steps=6",
        "train.save_steps=3",
        "train.learning_rate=1e-3",
        "train.restarts=1",
        "merge.shard_size_gb=0.0004",  # 400 kB shards: the tiny model (> 1 MB in fp32) needs several
        env=cli_env(TUNE_LAUNCH_FAULT="exit_after_save:3"),
    )
    assert_ok(result)
    assert "restarting from the last complete checkpoint (restart 1 of 1)" in result.stderr
    assert "checkpoint-3 (step 3)" in result.stderr
    run = RunDir(run_dir)
    assert json.loads(run.job_file.read_text())["extra"]["attempt"] == 2
    shards = sorted(p.name for p in (run.checkpoint(3) / "global_step3").iterdir())
    assert "zero_pp_rank_0_mp_rank_00_model_states.pt" in shards
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert (run.final / "model.safetensors.index.json").is_file()
    assert len(list(run.final.glob("model-*-of-*.safetensors"))) >= 2
    trained = AutoModelForCausalLM.from_pretrained(run.final, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(run.base, dtype=torch.float32)
    trained_sd, base_sd = trained.state_dict(), base.state_dict()
    assert trained_sd.keys() == base_sd.keys()
    changed = [k for k in base_sd if not torch.equal(trained_sd[k], base_sd[k])]
    assert len(changed) > len(base_sd) // 2, changed
    assert all(torch.isfinite(v).all() for v in trained_sd.values())


def test_qlora_zero3_paged_adamw_8bit_gradient_checkpointing(tmp_path: Path) -> None:
    import torch

    run_dir = tmp_path / "run"
    result = run_cli(
        run_dir,
        "method.kind=qlora",
        "distributed.strategy=zero3",
        "train.optimizer=paged_adamw_8bit",
        "train.gradient_checkpointing=true",
        "train.max_steps=4",
        "train.save_steps=4",
        # TRL casts a quantized model's adapters to bf16; the recipe's fp32 wins
        "method.adapter_dtype=fp32",
    )
    assert_ok(result)
    run = RunDir(run_dir)
    args = torch.load(run.checkpoint(4) / "training_args.bin", weights_only=False)
    assert (
        str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "paged_adamw_8bit"
    )
    assert args.gradient_checkpointing
    adapter = tensors(run.final / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    lora_b = [t for k, t in adapter.items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().max()) > 0 for t in lora_b)  # B starts at zero
    assert all(torch.isfinite(torch.tensor(loss)) for loss in train_losses(run_dir))


def test_lora_on_an_8bit_base(tmp_path: Path) -> None:
    """axolotl's load_in_8bit / LLaMA-Factory's quantization_bit 8: LoRA on an LLM.int8 base
    (bitsandbytes on CPU), planned at a byte a weight."""
    run_dir = tmp_path / "run"
    result = run_cli(
        run_dir,
        "method.kind=qlora",
        "method.quant.bits=8",
        "distributed.strategy=ddp",
        "train.max_steps=6",
        "train.save_steps=6",
        "train.logging_steps=1",
    )
    assert_ok(result)
    run = RunDir(run_dir)
    plan = json.loads((run_dir / "plan.json").read_text())
    # the fp32 tiny model's block weights at a byte each (embeddings stay fp32)
    assert plan["memory"]["weight_bytes"] < plan["memory"]["params"] * 4
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "layers (Linear8bitLt)" in log, log[-2000:]
    losses = train_losses(run_dir)
    assert losses[-1] < losses[0], losses
    assert (run.final / "adapter_model.safetensors").is_file()


TEMPLATE = (
    "<s>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_dpo_on_preferences_with_the_recipe_chat_template(
    tmp_path: Path, preference_file: Path
) -> None:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["data"] |= {
        "train": str(preference_file),
        "format": "preference",
        "val_split": 0.125,
        "chat_template": TEMPLATE,
    }
    recipe["train"] |= {
        "max_steps": 4,
        "save_steps": 4,
        "logging_steps": 1,
        "global_batch_size": 8,
        "micro_batch_size": 2,
        "learning_rate": 1e-3,
    }
    recipe["eval"]["data"] = str(QUICKSTART.parent / recipe["eval"]["data"])
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "run"
    assert_ok(run_cli(run_dir, recipe=path))
    logged = metrics(run_dir)
    assert any("rewards/margins" in m or "eval_rewards/margins" in m for m in logged)
    final = RunDir(run_dir).final
    assert len(tensors(final / "adapter_model.safetensors")) > 0
    contract = json.loads(RunDir.contract_file(final).read_text())
    assert contract["chat_template"] == TEMPLATE


def test_classification_distilbert_lora_reports_accuracy_and_f1(
    tmp_path: Path, classification_file: Path
) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        run_dir,
        "model.name_or_path=tiny:distilbert",
        "model.task=sequence_classification",
        "model.num_labels=2",
        "data.format=classification",
        f"data.train={classification_file}",
        "data.val_split=0.2",
        "serve.enabled=false",
        "eval.enabled=false",
        "distributed.strategy=ddp",
        "train.max_steps=40",
        "train.save_steps=20",
        "train.learning_rate=5e-3",
        "train.warmup_ratio=0",
    )
    assert_ok(result)
    run = RunDir(run_dir)
    scores = json.loads(run.classification_eval_file.read_text())
    assert 0 <= scores["eval_f1"] <= 1
    # "the <thing> was <good|bad word>" is learned within 40 steps
    assert scores["eval_accuracy"] >= 0.75, scores
    adapter = tensors(run.final / "adapter_model.safetensors")
    assert any("classifier" in k for k in adapter)  # the head travels with the adapter
    assert any("eval_accuracy" in m for m in metrics(run_dir))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = cli_env(TUNE_LAUNCH_FAULT="nan_loss:8")
    result = run_cli(run_dir, "train.max_steps=12", "train.save_steps=5", env=env)
    assert result.returncode == 1, explain(result)
    assert "non-finite loss (nan) at step 8" in result.stderr
    assert "checkpoint-5" in result.stderr and "learning_rate" in result.stderr
    run = RunDir(run_dir)
    assert run.is_complete(run.checkpoint(5))
    assert not run.final.exists()
