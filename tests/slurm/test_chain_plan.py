"""The SLURM chain without a cluster: which stages follow training, what each job asks of
SLURM, what the dry run prints, and the progress line everything shows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.chain import StageState, never_starts, slurm_word
from cluster.slurm import SlurmBackend
from cluster.stages import later_stages, stage_parameters
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.train.progress import progress_line

ROOT = Path(__file__).resolve().parents[2]


def plan_of(recipe: str, tmp_path: Path, *overrides: str, nodes: int = 2, gpus: int = 1) -> Plan:
    loaded = load_recipe(
        ROOT / "recipes" / recipe, list(overrides), nodes=nodes, gpus_per_node=gpus
    )
    loaded = localize(loaded, ROOT / "recipes")
    return resolve(loaded, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))


def test_quickstart_chains_merge_then_eval_and_stages_leave_them_out(tmp_path: Path) -> None:
    plan = plan_of("quickstart.yaml", tmp_path)
    assert later_stages(plan) == ["merge", "eval"]
    assert later_stages(plan, ["train", "merge"]) == ["merge"]
    assert later_stages(plan, ["train"]) == []
    full = plan_of("quickstart.yaml", tmp_path, "method.kind=full", "distributed.strategy=ddp")
    assert later_stages(full) == ["eval"]  # nothing to merge: eval follows training


def test_70b_eval_job_asks_the_gpus_of_the_plans_tensor_parallel_size(tmp_path: Path) -> None:
    plan = plan_of("llama70b_qlora.yaml", tmp_path, gpus=8)
    tp = plan.serve["tensor_parallel_size"]
    assert tp > 1  # 70B in bf16 does not fit one 80 GiB GPU
    ev = stage_parameters(plan, "eval")
    assert ev["gres"] == f"gpu:h100:{tp}" and ev["nodes"] == 1
    assert ev["job_name"] == "llama70b-qlora-eval"
    merge = stage_parameters(plan, "merge")
    assert "gres" not in merge and merge["job_name"] == "llama70b-qlora-merge"
    merge_gib = plan.memory["host_ram_merge_gib"]  # type: ignore[index]
    assert int(merge["mem"].removesuffix("G")) >= merge_gib
    assert merge["cpus_per_task"] == 8
    sized = plan_of("llama70b_qlora.yaml", tmp_path, "merge.cpus=3", "merge.mem_gib=40", gpus=8)
    assert (
        stage_parameters(sized, "merge")["cpus_per_task"],
        stage_parameters(sized, "merge")["mem"],
    ) == (3, "40G")
    assert stage_parameters(plan, "serve", "8:00:00")["time"] == 480


def test_dry_run_prints_every_job_of_the_chain(tmp_path: Path) -> None:
    plan = plan_of("quickstart.yaml", tmp_path)
    text = SlurmBackend().prepare(plan).render()
    assert "#SBATCH --job-name=quickstart-train" in text
    merge = text.split("--- then the merge job", 1)[1]
    assert "#SBATCH --job-name=quickstart-merge" in merge
    assert "#SBATCH --dependency='afterok:<job id of train>'" in merge
    assert "#SBATCH --kill-on-invalid-dep=yes" in merge
    ev = text.split("--- then the eval job", 1)[1]
    assert "#SBATCH --dependency='afterok:<job id of merge>'" in ev
    only_train = SlurmBackend(("train",)).prepare(plan).render()
    assert "then the" not in only_train


def test_pending_reasons_that_never_start() -> None:
    def pending(reason: str) -> StageState:
        return StageState("train", "1", state="PENDING", reason=reason)

    assert never_starts(pending("PartitionConfig")) == "PartitionConfig"
    assert never_starts(pending("PartitionNodeLimit")) == "PartitionNodeLimit"
    assert never_starts(pending("Resources")) is None  # busy: it will start
    assert never_starts(pending("Dependency")) is None
    assert slurm_word("CANCELLED by 0") == "CANCELLED" and slurm_word("REQUEUED") == "PENDING"


def test_progress_line() -> None:
    record = {
        "step": 40,
        "total_steps": 300,
        "loss": 1.23456,
        "learning_rate": 0.00498,
        "tokens_per_s": 5123.0,
        "elapsed_s": 12.0,
        "eta_s": 78.0,
        "peak_memory_gib": 1.2,
    }
    assert progress_line(record) == (
        "step 40/300 (13%) | loss 1.2346 | lr 4.98e-03 | 5.1k tok/s | "
        "0:00:12 elapsed, ETA 0:01:18 | peak 1.20 GiB GPU"
    )
    assert (
        progress_line({"step": 100, "eval_loss": 0.81234}) == "eval at step 100: eval_loss 0.8123"
    )
    assert progress_line({"step": 3, "epoch": 1.0}) is None


def test_serve_on_slurm_bad_flags_exit_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from launcher.cli import main

    assert main(["serve", str(tmp_path), "--backend", "slurm", "--time", "soon"]) == 2
    assert "--time: not a time limit" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--backend", "slurm", "--host", "0.0.0.0"]) == 2
    assert "--host" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--backend", "slurm"]) == 2  # no plan.json
    assert "not a run directory" in capsys.readouterr().err
