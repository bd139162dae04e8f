"""The strategy registry: the schema's names, what each strategy renders, and no code that
goes around it by comparing a strategy's name."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from launcher.config.render import render_deepspeed
from launcher.config.schema import DistributedConfig
from launcher.config.strategies import STRATEGIES, get_strategy

ROOT = Path(__file__).resolve().parents[2]
NAMES = "|".join(STRATEGIES)
# `strategy == "zero3"`, `strategy in ("zero3", "fsdp")`, `"fsdp" != ....strategy`
COMPARED = re.compile(
    rf"strategy\s*(==|!=|\bin\b|\bnot in\b)\s*\(?\s*[\"'](?:{NAMES})[\"']"
    rf"|[\"'](?:{NAMES})[\"']\s*(==|!=)\s*\S*strategy\b"
)


def test_schema_names_equal_the_registry() -> None:
    literal = DistributedConfig.model_fields["strategy"].annotation
    assert set(typing.get_args(literal)) == set(STRATEGIES)


def test_deepspeed_json_carries_the_registry_stage() -> None:
    for name, strategy in STRATEGIES.items():
        config = render_deepspeed(
            strategy=name,
            micro_batch_size=1,
            gradient_accumulation_steps=1,
            world_size=2,
            max_grad_norm=1.0,
            precision="fp32",
            offload_optimizer=False,
            offload_params=strategy.offloads_parameters,
            shape=None,
        )
        if strategy.zero_stage is None:
            assert config is None, name
            continue
        assert config is not None and config["zero_optimization"]["stage"] == strategy.zero_stage
        offloaded = "offload_param" in config["zero_optimization"]
        assert offloaded == strategy.offloads_parameters, name


def test_what_shards_what() -> None:
    assert not get_strategy("ddp").shards_gradients and get_strategy("ddp").plain_ddp
    assert get_strategy("zero2").shards_optimizer and not get_strategy("zero2").shards_parameters
    assert get_strategy("zero3").shards_parameters and get_strategy("fsdp").shards_parameters
    assert get_strategy("fsdp").gpu_only and not get_strategy("zero3").gpu_only


def test_no_product_code_compares_a_strategy_name() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("launcher", "cluster", "serve")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if COMPARED.search(line)
    ]
    assert not found, "ask launcher/config/strategies.py instead:\n" + "\n".join(found)


def test_the_check_finds_a_comparison() -> None:
    assert COMPARED.search('if dist.strategy in ("zero3", "fsdp"):')
    assert COMPARED.search('zero3 = recipe.distributed.strategy == "zero3"')
    assert not COMPARED.search('if packing and strategy in ("wrapped", "bfd_split"):')
