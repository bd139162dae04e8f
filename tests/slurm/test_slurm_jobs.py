"""The SLURM backend on a real SLURM (cluster/testcluster/up.sh: nodes n1, n2; CPU only).

Real training (launcher/train/entry.py) across the two emulated nodes, one process each, through
`tune-launch ... --backend slurm`; the plumbing (preemption paths, cancel) with
tests/slurm/fake_train.py, a one-second-per-step stand-in that follows train.py's contract,
so those tests spend their time on SLURM and not on imports.

Skipped, with the reason, when SLURM is not installed or its controller does not answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from cluster.slurm import SlurmBackend
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.plan_files import write_plan
from launcher.rundir import RunDir

from .conftest import ENV, ROOT, SECRET, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

FAKE_TRAIN = Path(__file__).with_name("fake_train.py")

# keep the real runs short: 2 nodes x 1 process, few steps, checkpoints every 3
QUICK = ["--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--stages", "train"]


def tune(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_steps(run: Path) -> list[int]:
    """Steps of the training log events in metrics.jsonl (evaluation events left out)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("loss") is not None]


def assert_no_secret(run: Path) -> None:
    for path in run.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".pkl", ".bin", ".pt"):
            assert SECRET not in path.read_text(errors="replace"), f"secret written to {path}"


def node_ranks(run: Path) -> dict[int, str]:
    """rank -> node, from each rank's pre-flight line."""
    found = {}
    for log in (run / "logs").glob("rank*.log"):
        for node, rank in re.findall(r"\(node (\S+), rank (\d+)\)", log.read_text()):
            found[int(rank)] = node
    return found


def fake_plan(run: Path, *overrides: str) -> Plan:
    """The quickstart's 2-node plan with the node command running fake_train.py."""
    recipe = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        ["resources.time=00:10:00", "resources.signal_lead_s=20", *overrides],
        nodes=2,
        gpus_per_node=1,
    )
    recipe = localize(recipe, ROOT / "recipes")
    plan = resolve(recipe, ClusterFacts(run_dir=str(run), python=sys.executable, cpus=1))
    launch = list(plan.launch)
    entry = launch.index("launcher.train") - 1  # "-m launcher.train RUN_DIR"
    launch[entry : entry + 2] = [str(FAKE_TRAIN)]
    return plan.model_copy(update={"launch": launch})


def submit_fake(plan: Plan, monkeypatch: pytest.MonkeyPatch, **knobs: str) -> str:
    for key, value in {**ENV, **knobs}.items():
        monkeypatch.setenv(key, value)  # sbatch exports the submitting environment
    write_plan(plan)  # the run directory, as the pipeline writes it before submitting
    backend = SlurmBackend(("train",))  # the stand-in trains; no merge or eval job after it
    assert backend.submit(backend.prepare(plan)) == 0
    return json.loads((Path(plan.run_dir) / "job.json").read_text())["job_id"]


# --------------------------------------------------------------------------------------------
# Rendering against the real controller


def test_sbatch_test_only_accepts_the_70b_script(tmp_path: Path) -> None:
    recipe = load_recipe(ROOT / "recipes/llama70b_qlora.yaml", nodes=2)
    plan = resolve(recipe, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))
    script = SlurmBackend().prepare(plan).script
    # test-only override: this CPU cluster has no GPUs, 2 CPUs and ~11 GB per node, so the
    # three resource sizes it cannot satisfy are reduced; every other line is the rendered one
    reductions = {
        "#SBATCH --gres=gpu:h100:8\n": "",
        "#SBATCH --cpus-per-task=96\n": "#SBATCH --cpus-per-task=2\n",
        "#SBATCH --mem=1000G\n": "#SBATCH --mem=1G\n",
    }
    for line, replacement in reductions.items():
        assert line in script
        script = script.replace(line, replacement)
    for line in ("--exclusive", "--nodes=2", "--ntasks-per-node=1", "--signal=USR2@300"):
        assert f"#SBATCH {line}\n" in script
    path = tmp_path / "llama70b.sbatch"
    path.write_text(script)
    out = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True)
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr


# --------------------------------------------------------------------------------------------
# Plumbing with the stand-in trainer


def test_save_signal_saves_requeues_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """USR2 alone, as the time limit sends it (sbatch --signal=USR2@signal_lead_s): the ranks
    agree on the next step, save it, exit; submitit requeues; the job resumes right after
    the saved step (nothing redone) and completes. (SIGTERM-first preemption, resuming
    from the last periodic checkpoint, is test_preemption_of_real_training_resumes...)"""
    run = tmp_path / "run"
    plan = fake_plan(run)
    job_id = submit_fake(plan, monkeypatch, FAKE_STEPS="10", FAKE_SAVE_STEPS="4")
    submitted = (run / "slurm" / f"{job_id}_submission.sh").read_text()
    assert submitted == SlurmBackend().prepare(plan).script

    wait_for(lambda: len(train_steps(run)) >= 2, 90, "step 2")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    saved_at = wait_for(lambda: _marker_step(run), 60, "the save on USR2 (RUN_DIR/PREEMPTED)")
    assert SlurmBackend().wait(run, poll_s=1) == 0

    steps = train_steps(run)
    assert steps == list(range(1, 11)), steps  # no gap, no repeat
    assert (run / "checkpoints" / f"checkpoint-{saved_at}" / "COMPLETE").exists()
    assert (run / "final" / "DONE").exists()
    assert f"saved on signal at step {saved_at}" in _log(run)
    status = tune("status", str(run))
    assert status.returncode == 0 and "COMPLETED" in status.stdout, status.stdout
    assert "requeued 1x" in status.stdout, status.stdout
    assert_no_secret(run)


def _marker_step(run: Path) -> int | None:
    try:  # the requeued job's task 0 removes the marker when it starts
        return int(json.loads((run / "PREEMPTED").read_text())["step"])
    except (OSError, ValueError):
        return None


def _log(run: Path) -> str:
    path = run / "logs" / "rank0.log"
    return path.read_text() if path.exists() else ""


def test_cancel_ends_the_job_and_status_says_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    job_id = submit_fake(fake_plan(run), monkeypatch, FAKE_STEPS="1000", FAKE_STEP_S="1")
    wait_for(lambda: train_steps(run), 90, "the first step")
    cancel = tune("cancel", str(run))
    assert cancel.returncode == 0, cancel.stderr
    wait_for(lambda: "CANCELLED" in tune("status", str(run)).stdout, 60, "status CANCELLED")
    status = tune("status", str(run))
    assert status.returncode == 1 and "CANCELLED" in status.stdout, status.stdout
    wait_for(
        lambda: (
            not subprocess.run(
                ["squeue", "-h", "-j", job_id], capture_output=True, text=True
            ).stdout.strip()
        ),
        30,
        f"job {job_id} to leave the queue",
    )
    steps = len(train_steps(run))
    time.sleep(3)
    assert len(train_steps(run)) == steps  # nothing trains any more


# --------------------------------------------------------------------------------------------
# Real training across the two nodes


def test_quickstart_trains_across_two_nodes(tmp_path: Path) -> None:
    """Also: `--dry-run` printed the very request the run submitted, and submitit wrote the
    script the dry run showed."""
    run = tmp_path / "run"
    argv = [
        str(ROOT / "recipes/quickstart.yaml"),
        *QUICK,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.save_steps=3",
        "--run-dir",
        str(run),
    ]
    dry = tune(*argv, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    out = tune(*argv, "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    submitted = RunDir(run).request_file.read_text()
    assert dry.stdout.startswith(submitted + "\nplan "), (submitted, dry.stdout)
    job_id = json.loads(RunDir(run).job_file.read_text())["job_id"]
    script = (RunDir(run).slurm / f"{job_id}_submission.sh").read_text().rstrip()
    assert (
        f"--- sbatch script (submitit writes it as {RunDir(run).slurm}/<job id>_submission.sh)\n{script}\n\n"
        in submitted
    )
    assert re.search(r"submitted SLURM job \d+", out.stdout), out.stdout
    assert f"tune-launch status {run}" in out.stdout
    final = run / "final"
    for name in ("adapter_config.json", "train_contract.json", "tokenizer.json", "COMPLETE"):
        assert (final / name).is_file(), name
    assert (final / "adapter_model.safetensors").stat().st_size > 0
    assert set(node_ranks(run).values()) == {"n1", "n2"}, node_ranks(run)
    assert set(node_ranks(run)) == {0, 1}
    status = tune("status", str(run))
    assert status.returncode == 0 and "COMPLETED" in status.stdout, status.stdout
    logs = tune("logs", str(run), "--rank", "1")
    assert logs.returncode == 0 and "pre-flight ok" in logs.stdout
    assert_no_secret(run)


def test_70b_recipe_smoke_runs_its_plan_on_two_nodes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = tune(
        str(ROOT / "recipes/llama70b_qlora.yaml"),
        "--smoke",
        *QUICK,
        "--wait",
        # the test cluster: CPUs only (fp32 follows), 2 CPUs and ~11 GB per node
        "--set",
        "resources.accelerator=cpu",
        "--set",
        "resources.cpus_per_node=2",
        "--set",
        "resources.mem_per_node_gib=8",
        "--run-dir",
        str(run),
        cwd=tmp_path,  # the smoke data set is written under ./runs/
    )
    assert out.returncode == 0, out.stdout + out.stderr
    plan = json.loads((run / "plan.json").read_text())
    recipe = plan["recipe"]
    assert recipe["model"]["name_or_path"] == "tiny:llama"
    assert recipe["method"]["kind"] == "qlora" and recipe["distributed"]["strategy"] == "zero3"
    assert recipe["train"]["optimizer"] == "paged_adamw_8bit"
    assert recipe["train"]["gradient_checkpointing"] is True
    assert plan["nodes"] == 2 and plan["world_size"] == 2
    assert (run / "final" / "adapter_model.safetensors").stat().st_size > 0
    assert list((run / "checkpoints").glob("checkpoint-*/**/zero_pp_rank_*")), "no ZeRO-3 shards"
    assert set(node_ranks(run).values()) == {"n1", "n2"}
    assert train_steps(run)[-1] == 6


def test_failing_training_reports_failed_with_the_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = tune(
        str(ROOT / "recipes/quickstart.yaml"),
        *QUICK,
        "--wait",
        # valid for the schema and the planner; fails on the ranks (no flash-attn on CPU)
        "--set",
        "model.attn_implementation=flash_attention_2",
        "--run-dir",
        str(run),
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stdout + out.stderr
    status = tune("status", str(run))
    assert status.returncode == 1, status.stdout
    assert "FAILED" in status.stdout and "requeued" not in status.stdout
    error = next(line for line in status.stdout.splitlines() if "error:" in line)
    assert "FlashAttention2" in error and re.search(r"on node n[12] \(rank \d\)", error), error


def test_preemption_of_real_training_resumes_without_gap(tmp_path: Path) -> None:
    """submitit's preemption (SIGTERM, then USR2) of a real 2-node run: requeued, resumed
    from its last complete checkpoint on a new rendezvous port, completed. The merge job
    chained after it keeps waiting through the requeue and merges the final adapter."""
    import submitit

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            str(ROOT / "recipes/quickstart.yaml"),
            *QUICK[:-1],
            "train,merge",
            "--wait",
            "--set",
            "train.max_steps=10",
            "--set",
            "train.save_steps=3",
            "--set",
            "train.logging_steps=1",
            "--set",
            "train.global_batch_size=8",  # no accumulation: shorter steps
            "--run-dir",
            str(run),
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: len(train_steps(run)) >= 5, 180, "step 5")
        job_id = json.loads((run / "job.json").read_text())["job_id"]
        submitit.SlurmJob(folder=run / "slurm", job_id=job_id, tasks=(0, 1))._interrupt()
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    steps = train_steps(run)
    assert sorted(set(steps)) == list(range(1, 11)), steps  # no gap
    repeats = sum(n - 1 for n in Counter(steps).values())
    assert repeats <= 3, steps  # at most one checkpoint interval redone
    assert "requeued 1x" in output, output
    assert re.search(r"resuming from \S+checkpoint-[369]\b", _log(run)), "no resume"
    assert (run / "final" / "adapter_model.safetensors").stat().st_size > 0
    assert re.search(r"merge: job \d+ COMPLETED", output), output
    assert RunDir.is_complete(run / "merged")
