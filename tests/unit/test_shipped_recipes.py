"""Every shipped recipe resolves, and its configs pass the real libraries' own parsers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launcher.cli import main
from launcher.workflow.stages import is_workflow

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(  # workflow files (several stages) are tests/unit/test_workflow_units.py's
    p
    for p in [*(ROOT / "recipes").glob("*.yaml"), *(ROOT / "recipes").glob("cpu/*.yaml")]
    if not is_workflow(p)
)
REQUIRED = [
    "llama70b_qlora",
    "llama8b_lora",
    "llama8b_full_zero3",
    "mistral7b_qlora",
    "tinyllama_lora",
    "quickstart",
    "llama8b_dora",
    "dora",  # recipes/cpu/: one per method
    "ia3",
    "prompt",
    "prefix",
]


def test_required_recipes_shipped() -> None:
    names = {p.stem for p in RECIPES}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header_is_its_launch_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# tune-launch recipes/{path.relative_to(ROOT / 'recipes')}")


def _dry_run(path: Path, run_dir: Path, *extra: str) -> dict:
    # the rendered configs do not depend on the backend; SLURM prepares multi-node recipes
    # on a host without sbatch too
    argv = ["run", str(path), "--dry-run", "--run-dir", str(run_dir), "--backend", "slurm"]
    assert main([*argv, *extra]) == 0
    return json.loads((run_dir / "plan.json").read_text())


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_configs_accepted_by_deepspeed_and_accelerate(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _dry_run(path, tmp_path / "run")
    # accelerate's own loader (placeholders are per-node strings, filled at launch)
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(tmp_path / "run" / "accelerate.yaml"))
    assert cfg.num_processes == plan["world_size"]
    assert cfg.num_machines == plan["nodes"]
    if plan["deepspeed"] is None:
        return
    ds_file = tmp_path / "run" / "deepspeed.json"
    text = ds_file.read_text()
    assert '"auto"' not in text
    from deepspeed.runtime import config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfig

    # outside a process group DeepSpeed assumes world size 1; give it the plan's through an mpu
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda: 0)

    class _MPU:  # DeepSpeed checks train_batch_size = micro x accumulation x data-parallel size
        def get_data_parallel_world_size(self) -> int:
            return plan["world_size"]

        def get_data_parallel_rank(self) -> int:
            return 0

        def get_model_parallel_world_size(self) -> int:
            return 1

        def get_model_parallel_rank(self) -> int:
            return 0

    ds = DeepSpeedConfig(str(ds_file), mpu=_MPU())
    assert ds.train_batch_size == plan["global_batch_size"]
    assert ds.gradient_accumulation_steps == plan["gradient_accumulation_steps"]
    assert ds.zero_optimization_stage == (
        3 if plan["recipe"]["distributed"]["strategy"] == "zero3" else 2
    )
    if ds.zero_optimization_stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save


def test_70b_plan_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(ROOT / "recipes/llama70b_qlora.yaml"), "--nodes", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in (
        "world_size",
        "nodes",
        "gpus_per_node",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "global_batch_size",
        "deepspeed",
        "accelerate",
        "memory",
        "launch",
    ):
        assert key in doc
    assert doc["world_size"] == 16
    assert (
        doc["global_batch_size"]
        == doc["micro_batch_size"] * doc["gradient_accumulation_steps"] * 16
    )
    assert doc["quant_storage"] == "bf16"  # QLoRA under ZeRO-3: storage = compute dtype
    assert (
        doc["deepspeed"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    )
    assert doc["memory"]["per_gpu_gib"] < 80
    assert "{node_rank}" in " ".join(doc["launch"])


def test_overrides_and_shortcuts(tmp_path: Path) -> None:
    plan = _dry_run(
        ROOT / "recipes/llama8b_lora.yaml",
        tmp_path / "r",
        "--set",
        "train.learning_rate=1e-4",
        "--set",
        "method.r=32",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
    )
    assert plan["recipe"]["train"]["learning_rate"] == 1e-4
    assert plan["recipe"]["method"]["r"] == 32
    assert plan["world_size"] == 8
    written = yaml.safe_load((tmp_path / "r" / "recipe.yaml").read_text())
    assert written["method"]["r"] == 32


def test_plan_never_imports_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from launcher.cli import main; "
        f"rc = main(['plan', '{ROOT}/recipes/llama70b_qlora.yaml', '--json']); "
        "assert rc == 0; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False"), out.stderr
