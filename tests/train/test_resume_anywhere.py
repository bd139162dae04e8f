"""Resume anywhere: a run continued on another number of processes, against the same run
uninterrupted (real 2-process / 1-process training on gloo through the real CLI).

2 -> 1 -> 2 processes for ZeRO-2 LoRA (the quickstart) and ZeRO-3 full fine-tuning: the
run ends at the same step, every step is logged once, every step trains the same rows as
the uninterrupted run (train.log_samples), each row of the first epoch once, and the final
loss and weights match within the tolerances below. Then: DDP with a new learning rate,
the refusal of a change a checkpoint cannot take, and --restart.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launcher.rundir import RunDir
from launcher.train.samples import steps_to_rows

from .conftest import PYTHON, QUICKSTART, REPO, cli_env, explain, metrics, tensors

pytestmark = pytest.mark.train

# The same rows in the same steps, summed over 2 ranks or accumulated on 1: only the order of
# float additions differs (measured: |loss difference| <= 2e-5 over 30 steps, weights 1e-5).
LOSS_RTOL = 1e-3
WEIGHT_ATOL = 1e-3

# constant learning rate: changing max_steps between the legs does not change the schedule
COMMON = [
    "train.logging_steps=1",
    "train.lr_scheduler=constant",
    "train.warmup_ratio=0",
    "train.log_samples=true",
    "eval.enabled=false",
]
ZERO2_LORA = [*COMMON, "train.save_steps=10"]  # 432 rows, 27 steps of 16 per epoch
ZERO3_FULL = [
    *COMMON,
    "method.kind=full",
    "distributed.strategy=zero3",
    "train.learning_rate=1e-3",
    "train.save_steps=4",
]


def tune(run_dir: Path, *args: str, sets: list[str]) -> subprocess.CompletedProcess[str]:
    argv = [PYTHON, "-m", "launcher.cli", "run", str(QUICKSTART), "--stages", "train"]
    argv += ["--run-dir", str(run_dir), *args]
    for assignment in sets:
        argv += ["--set", assignment]
    return subprocess.run(
        argv, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, explain(result)
    return result.stderr


def legs(run_dir: Path, sets: list[str], plan: list[tuple[int, int]]) -> list[str]:
    """Run the same recipe to each (max_steps, processes) in turn; the stderr of each."""
    return [
        ok(tune(run_dir, "--gpus-per-node", str(procs), sets=[*sets, f"train.max_steps={steps}"]))
        for steps, procs in plan
    ]


def loss_by_step(run_dir: Path) -> dict[int, float]:
    logged = [(int(m["step"]), float(m["loss"])) for m in metrics(run_dir) if m.get("loss")]
    steps = [s for s, _ in logged]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return dict(logged)


def final_weights(run_dir: Path) -> dict[str, Any]:
    final = RunDir(run_dir).final
    found = sorted(final.glob("*.safetensors"))
    assert found, f"no weights in {final}"
    weights: dict[str, Any] = {}
    for path in found:
        weights |= tensors(path)
    return weights


def assert_same_run(resumed: Path, baseline: Path, steps: int) -> None:
    ours, theirs = loss_by_step(resumed), loss_by_step(baseline)
    assert sorted(ours) == list(range(1, steps + 1)), "every step logged exactly once"
    assert sorted(theirs) == list(range(1, steps + 1))
    worst = max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in ours)
    assert worst <= LOSS_RTOL, f"loss differs from the uninterrupted run by {worst:.2e} (relative)"
    a, b = final_weights(resumed), final_weights(baseline)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff <= WEIGHT_ATOL, f"final weights differ by {diff}"
    # the same rows in the same steps: the data position survived each change of world size
    assert steps_to_rows(RunDir(resumed)) == steps_to_rows(RunDir(baseline))


def converted(run_dir: Path) -> list[str]:
    return [
        line
        for line in RunDir(run_dir).rank_log(0).read_text().splitlines()
        if "converted" in line and "universal checkpoint" in line
    ]


@pytest.fixture(scope="module")
def zero2_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "uninterrupted"
    legs(run_dir, ZERO2_LORA, [(30, 2)])
    return run_dir


def test_zero2_lora_resumes_2_1_2_processes_as_if_uninterrupted(
    zero2_baseline: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "resumed"
    second, third = legs(run_dir, ZERO2_LORA, [(10, 2), (20, 1), (30, 2)])[1:]
    assert "processes 2 -> 1 (ZeRO state resharded at start)" in second
    assert "gradient accumulation 2 -> 4 (global batch 16)" in second
    assert "processes 1 -> 2" in third
    assert len(converted(run_dir)) == 2  # at step 10 (written by 2) and 20 (written by 1)
    assert_same_run(run_dir, zero2_baseline, 30)
    # each row of the first epoch (27 steps of 16 = the 432 rows) trained exactly once
    by_step = steps_to_rows(RunDir(run_dir))
    first_epoch = [row for step in range(1, 28) for row in by_step[step]]
    assert sorted(first_epoch) == list(range(432))


def test_zero3_full_resumes_2_1_2_processes_as_if_uninterrupted(tmp_path: Path) -> None:
    baseline, run_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
    legs(baseline, ZERO3_FULL, [(12, 2)])
    legs(run_dir, ZERO3_FULL, [(4, 2), (8, 1), (12, 2)])
    assert len(converted(run_dir)) == 2
    assert_same_run(run_dir, baseline, 12)


def test_ddp_qlora_resumes_on_one_process_with_a_new_learning_rate(tmp_path: Path) -> None:
    """DDP checkpoints need no conversion; a new peak learning rate is applied at the
    resumed step (the scheduler's saved state would otherwise keep the old one)."""
    sets = [*COMMON, "method.kind=qlora", "distributed.strategy=ddp", "train.save_steps=3"]
    run_dir = tmp_path / "run"
    ok(tune(run_dir, sets=[*sets, "train.max_steps=3"]))
    log = ok(
        tune(
            run_dir,
            "--gpus-per-node",
            "1",
            sets=[*sets, "train.max_steps=5", "train.learning_rate=1e-3"],
        )
    )
    assert "train.learning_rate 0.005 -> 0.001" in log and "processes 2 -> 1" in log
    rates = {int(m["step"]): m["learning_rate"] for m in metrics(run_dir) if m.get("loss")}
    assert sorted(rates) == [1, 2, 3, 4, 5]
    assert [rates[s] for s in (1, 2, 3)] == [pytest.approx(5e-3)] * 3
    assert [rates[s] for s in (4, 5)] == [pytest.approx(1e-3)] * 2
    assert not converted(run_dir)


def test_a_change_the_checkpoint_cannot_take_is_refused_before_any_process(
    zero2_baseline: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(zero2_baseline, run_dir)
    logs_before = {p.name: p.stat().st_mtime for p in RunDir(run_dir).logs.iterdir()}
    plan_before = RunDir(run_dir).plan_file.read_text()
    sets = [*ZERO2_LORA, "train.max_steps=40", "method.r=8", "data.packing=true"]
    result = tune(run_dir, "--gpus-per-node", "1", sets=sets)
    assert result.returncode == 2, explain(result)
    err = result.stderr
    assert "Traceback" not in err
    assert "cannot resume" in err and "checkpoint-30 (step 30)" in err
    assert "method.r: checkpoint-30 (step 30) was trained with 16" in err and "(got 8)" in err
    assert "data.packing" in err and "--set method.r=16" in err and "--restart" in err
    assert "train.max_steps" not in err  # a change it can take is not listed as a problem
    # nothing started: no rank wrote, the plan of the run that made the checkpoint stays
    assert {p.name: p.stat().st_mtime for p in RunDir(run_dir).logs.iterdir()} == logs_before
    assert RunDir(run_dir).plan_file.read_text() == plan_before


def test_restart_starts_over_in_the_same_directory(zero2_baseline: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "copy"
    shutil.copytree(zero2_baseline, run_dir)
    sets = [*ZERO2_LORA, "method.r=8", "train.max_steps=3", "train.save_steps=3"]
    ok(tune(run_dir, "--restart", sets=sets))
    run = RunDir(run_dir)
    assert [c.step for c in run.list_checkpoints()] == [3]
    assert sorted(loss_by_step(run_dir)) == [1, 2, 3]
    assert max(steps_to_rows(run)) == 3
    marker = run.read_marker(run.final)
    assert marker is not None and marker["step"] == 3
