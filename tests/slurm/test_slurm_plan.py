"""The SLURM backend without a cluster: sbatch rendering (golden files), rank/placeholder
adapter, the node task's pickling and error summary, --smoke, and the choice of the backend
(the same for the dry run and the run). Fast; no `slurm` marker.

UPDATE_GOLDEN=1 rewrites tests/slurm/golden/*.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from pathlib import Path

import pytest

from cluster import rank_env
from cluster.diagnose import Failure, error_summary, first_failure
from cluster.node_entry import NodeTask, failure_message
from cluster.slurm import SlurmBackend, sbatch_parameters
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.rundir import RunDir
from tests.support.golden import check_golden, skip_if_updated

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"


def _plan(recipe: str, tmp_path: Path, *overrides: str, nodes: int | None = 2) -> Plan:
    loaded = load_recipe(ROOT / "recipes" / recipe, list(overrides), nodes=nodes)
    loaded = localize(loaded, ROOT / "recipes")
    return resolve(loaded, ClusterFacts(run_dir=str(tmp_path / "run"), python=sys.executable))


def _normalise(text: str, plan: Plan) -> str:
    return text.replace(plan.run_dir, "RUN_DIR").replace(sys.executable, "PYTHON")


CASES = {
    "llama70b_qlora_2nodes": ("llama70b_qlora.yaml", ()),
    "quickstart_2nodes_cpu": (
        "quickstart.yaml",
        ("resources.gpus_per_node=1", "resources.sbatch_extra={mail-type: END, requeue: true}"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_script_matches_golden(case: str, tmp_path: Path) -> None:
    recipe, overrides = CASES[case]
    plan = _plan(recipe, tmp_path, *overrides)
    text = _normalise(SlurmBackend().prepare(plan).script, plan)
    check_golden(GOLDEN / f"{case}.sbatch", text)
    skip_if_updated()


def test_gpu_request_only_on_gpu_clusters(tmp_path: Path) -> None:
    gpu = sbatch_parameters(_plan("llama70b_qlora.yaml", tmp_path))
    assert gpu["gres"] == "gpu:h100:8"
    assert gpu["ntasks_per_node"] == 1 and gpu["nodes"] == 2
    assert gpu["cpus_per_task"] == 96 and gpu["mem"] == "1000G" and gpu["exclusive"] is True
    assert gpu["signal_delay_s"] == 300 and gpu["time"] == 2 * 24 * 60
    untyped = sbatch_parameters(_plan("llama70b_qlora.yaml", tmp_path, "resources.gpu_type=null"))
    assert untyped["gres"] == "gpu:8"
    cpu = sbatch_parameters(_plan("quickstart.yaml", tmp_path))
    assert "gres" not in cpu and "gpus_per_node" not in cpu
    assert cpu["cpus_per_task"] == 2  # one CPU per gloo process when the recipe does not say


def test_extra_directives_and_scheduling_fields(tmp_path: Path) -> None:
    plan = _plan(
        "quickstart.yaml",
        tmp_path,
        "resources.partition=gpu",
        "resources.account=proj",
        "resources.qos=high",
        "resources.constraint=a100",
        "resources.sbatch_extra={mail-type: END, requeue: true, hold: false}",
    )
    text = SlurmBackend().prepare(plan).script
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --mail-type=END",
        "#SBATCH --requeue",
    ):
        assert line in text
    assert "hold" not in text


def test_dryrun_is_what_submitit_writes(tmp_path: Path) -> None:
    """The dry run's script is submitit's own rendering of the executor's parameters."""
    from submitit.slurm import slurm as submitit_slurm

    plan = _plan("llama70b_qlora.yaml", tmp_path)
    request = SlurmBackend().prepare(plan)
    # an executor as submit() builds it (the srun check patched: no cluster needed here)
    original = submitit_slurm.SlurmExecutor.affinity
    submitit_slurm.SlurmExecutor.affinity = classmethod(lambda cls: 2)  # type: ignore[method-assign,assignment]
    try:
        executor = request.executor()
    finally:
        submitit_slurm.SlurmExecutor.affinity = original  # type: ignore[method-assign]
    script = executor._make_submission_file_text(executor._submitit_command_str, "x")
    assert request.script == script
    shown = request.render()
    assert f"--- sbatch script (submitit writes it as {request.folder}" in shown
    assert script.rstrip() in shown
    assert "{node_rank}" in shown.split("--- each task (srun, one per node)")[1]


def test_master_port_per_job_and_restart() -> None:
    ports = {rank_env.master_port(job, restart) for job in range(100, 110) for restart in range(3)}
    assert len(ports) == 30
    assert all(20000 <= p < 30000 for p in ports)
    assert rank_env.master_port("1234", 1) != rank_env.master_port("1234", 0)


def test_node_values_inside_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_env, "node_address", lambda node: {"gpu07": "10.0.0.7"}[node])
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_RESTART_COUNT": "2",
    }
    values = rank_env.node_values(env)
    assert values == {
        "node_rank": "1",
        "master_addr": "10.0.0.7",
        "master_port": str(rank_env.master_port(4242, 2)),
        "rdzv_id": "4242-2",
    }
    argv = rank_env.fill(
        ["--node-rank={node_rank}", "--rdzv-endpoint={master_addr}:{master_port}"], values
    )
    assert argv == ["--node-rank=1", f"--rdzv-endpoint=10.0.0.7:{values['master_port']}"]
    with pytest.raises(RuntimeError, match="inside the job step"):
        rank_env.node_values({"SLURM_JOB_ID": "1"})
    with pytest.raises(ValueError, match="unfilled"):
        rank_env.fill(["{node_rank}"], {})


def test_node_address_falls_back_to_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert rank_env.node_address("no-such-node-xyz.invalid") == "no-such-node-xyz.invalid"


def test_expand_nodelist() -> None:
    assert rank_env.expand_nodelist("n[1-2],gpu07") == ["n1", "n2", "gpu07"]
    assert rank_env.expand_nodelist("") == []


def test_ranks_from_torchrun_then_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun = {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29400",
        "SLURM_PROCID": "0",
    }
    assert rank_env.ranks(torchrun) == rank_env.Ranks(1, 2, 1, 3, 4, "10.0.0.7", 29400)
    monkeypatch.setattr(rank_env, "node_address", lambda node: "10.0.0.7")
    slurm = {
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_NODEID": "2",
        "SLURM_JOB_NUM_NODES": "4",
        "SLURM_JOB_NODELIST": "gpu[07-10]",
    }
    assert rank_env.ranks(slurm) == rank_env.Ranks(
        2, 4, 1, 5, 8, "10.0.0.7", rank_env.master_port(7)
    )
    assert rank_env.ranks({}) == rank_env.Ranks(0, 1, 0, 0, 1, "127.0.0.1", 29500)


def test_node_task_pickles_without_runtime_state() -> None:
    task = NodeTask(
        "/runs/x",
        launch=["torchrun", "{node_rank}"],
        env={"A": "1"},
        max_requeues=3,
        save_timeout_s=60,
    )
    task.requeues = 2
    task._signals["SIGUSR2"] = 1.0
    copy = pickle.loads(pickle.dumps(task))
    assert (copy.run_dir, copy.requeues, copy.max_requeues) == ("/runs/x", 2, 3)
    assert (copy.launch, copy.env) == (["torchrun", "{node_rank}"], {"A": "1"})
    assert copy._signals == {} and copy._proc is None


def test_error_summary_finds_the_root_cause() -> None:
    log = "\n".join(
        [
            "[rank1]: Traceback (most recent call last):",
            '[rank1]:   File "x.py", line 1, in <module>',
            "[rank1]: ValueError: bad learning rate",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        ]
    )
    assert error_summary(log) == "ValueError: bad learning rate"
    assert error_summary("") == "no error output"


def test_smoke_keeps_the_plan_and_shrinks_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.config.smoke import smoke_recipe

    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        ROOT / "recipes/llama70b_qlora.yaml",
        ["resources.accelerator=cpu"],
        nodes=2,
        gpus_per_node=1,
    )
    smoke = smoke_recipe(recipe)
    assert smoke.name == "llama70b-qlora-smoke"
    assert smoke.model.name_or_path == "tiny:llama"
    assert (smoke.method.kind, smoke.method.r, smoke.method.target_modules) == (
        "qlora",
        64,
        "all-linear",
    )
    assert smoke.distributed == recipe.distributed
    assert (smoke.train.optimizer, smoke.train.gradient_checkpointing) == ("paged_adamw_8bit", True)
    assert (smoke.train.max_steps, smoke.train.save_steps) == (6, 3)
    assert (smoke.model.dtype, smoke.train.precision, smoke.method.quant.compute_dtype) == (
        "fp32",
    ) * 3
    assert smoke.data.max_seq_len == 64 and not smoke.serve.enabled and not smoke.eval.enabled
    assert smoke.resources.time == "00:30:00" and smoke.resources.nodes == 2
    rows = [json.loads(line) for line in Path(smoke.data.train).read_text().splitlines()]
    assert len(rows) == 160 and rows[0]["messages"][-1]["role"] == "assistant"
    assert Path(smoke.data.train).is_relative_to(tmp_path / "runs" / "llama70b-qlora-smoke")
    plan = resolve(smoke, ClusterFacts(run_dir=str(tmp_path / "run")))
    assert plan.world_size == 2 and plan.gradient_accumulation_steps == 2
    assert plan.quant_storage == "fp32" and plan.deepspeed is not None
    # on a GPU cluster the dtypes stay the recipe's
    gpu = smoke_recipe(load_recipe(ROOT / "recipes/llama70b_qlora.yaml", nodes=2))
    assert (gpu.model.dtype, gpu.train.precision) == ("bf16", "bf16")


# torchrun's report of a rank killed from outside (torch.distributed.elastic's format)
ROOT_CAUSE_KILLED = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Root Cause (first observed failure):
[0]:
  time      : 2026-11-22_10:00:09
  host      : n2
  rank      : 1 (local_rank: 0)
  exitcode  : -9 (pid: 4242)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
"""


def test_the_first_failure_is_the_killed_rank_else_the_oldest_error_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.logs.mkdir()
    assert first_failure(run, "", since=0) == Failure(None)
    run.rank_error(1).write_text("")
    os.utime(run.rank_error(1), (100, 100))
    run.rank_error(0).write_text("")  # a later failure: the peer that lost rank 1
    os.utime(run.rank_error(0), (200, 200))
    assert first_failure(run, "", since=50) == Failure(1)
    assert first_failure(run, "", since=300) == Failure(None)  # an earlier attempt's errors
    # a rank killed from outside writes no error file: torchrun's report names it
    assert first_failure(run, ROOT_CAUSE_KILLED, since=300) == Failure(1, "SIGKILL")
    # ... and comes first even when other ranks wrote error files on losing it
    killed_rank_0 = ROOT_CAUSE_KILLED.replace("rank      : 1", "rank      : 0")
    assert first_failure(run, killed_rank_0, since=0) == Failure(0, "SIGKILL")


def test_a_rank_that_lost_its_peer_is_not_the_first_failure(tmp_path: Path) -> None:
    """Rank 0 exits without an error file (os._exit mid-save); rank 1 then fails in a barrier
    on the closed connection: torchrun's report (rank 0, exit code 1) names the cause."""
    run = RunDir(tmp_path)
    run.logs.mkdir()
    run.rank_error(1).write_text(
        "Traceback (most recent call last):\n    work.wait()\nRuntimeError: [pair.cc:553] "
        "Connection closed by peer [127.0.0.1]:41680. This is typically caused by a remote "
        "worker crashing.\n"
    )
    exited_rank_0 = ROOT_CAUSE_KILLED.replace("rank      : 1", "rank      : 0").replace(
        "-9 (pid: 4242)  (SIGKILL)", "1 (pid: 4242)"
    )
    assert first_failure(run, exited_rank_0, since=0) == Failure(0)
    assert first_failure(run, "", since=0) == Failure(1)  # nothing better is known
    run.rank_error(0).write_text("ValueError: bad row\n")  # a real error beats a lost peer
    os.utime(run.rank_error(0), (time.time() + 5, time.time() + 5))
    assert first_failure(run, "", since=0) == Failure(0)


def test_failure_message_names_the_first_failing_rank_and_its_node(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.logs.mkdir()
    assert failure_message(run, Failure(None), "") is None
    run.rank_log(1).write_text(
        "2026-11-22 10:00:00 rank1 INFO launcher.preflight: pre-flight ok: 2 ranks, gloo, "
        "0.1s (node n2, rank 1)\n"
        "2026-11-22 10:00:05 rank1 ERROR launcher.train: training failed on rank 1: boom\n"
        "Traceback (most recent call last):\n"
        '  File "train.py", line 1, in train\n'
        "ValueError: boom\n"
    )
    assert (
        failure_message(run, Failure(1), "")
        == "training failed on node n2 (rank 1): ValueError: boom"
    )
    # a pre-flight failure: no ok line; its message names the node
    run.rank_log(1).write_text(
        "training failed on rank 1: pre-flight\nRuntimeError: pre-flight: all-reduce did not "
        "finish within 60s on node n2 (rank 1 of 2, gloo)\n"
    )
    message = failure_message(run, Failure(1), "")
    assert message is not None and message.startswith("training failed (rank 1): RuntimeError")
    assert "on node n2" in message
    killed = failure_message(run, Failure(1, "SIGKILL"), "")
    assert killed is not None and "rank 1 was killed by SIGKILL" in killed


def test_checkpoint_decides_requeue_completion_and_the_bound(tmp_path: Path) -> None:
    """NodeTask.checkpoint (submitit calls it on USR2): requeue after a save, not after a
    finished training, and never more than resources.max_requeues times."""
    import subprocess

    from submitit.helpers import DelayedSubmission

    def task_after(code: int, *, saved: bool, requeues: int = 0) -> NodeTask:
        task = NodeTask(str(tmp_path), launch=[], env={}, max_requeues=2, save_timeout_s=5)
        task.requeues = requeues
        task._proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        task._proc.wait()
        (tmp_path / "PREEMPTED").unlink(missing_ok=True)
        if saved:
            (tmp_path / "PREEMPTED").write_text('{"step": 3}')
        return task

    finished = task_after(0, saved=False)
    assert finished.checkpoint() is None and finished._completed
    saved = task_after(0, saved=True)
    resubmission = saved.checkpoint()
    assert isinstance(resubmission, DelayedSubmission) and resubmission.function is saved
    assert saved.requeues == 1
    stopped = task_after(1, saved=False, requeues=1)  # SIGTERM first: last periodic checkpoint
    assert isinstance(stopped.checkpoint(), DelayedSubmission) and stopped.requeues == 2
    with pytest.raises(RuntimeError, match="max_requeues=2"):
        task_after(0, saved=True, requeues=2).checkpoint()


# --------------------------------------------------------------------------------------------
# One choice of backend; the dry run prints the request the run submits

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
FAKE_SBATCH = """#!/bin/sh
# a stand-in sbatch: keeps the script it is given, answers as sbatch does
/bin/cp "$1" "{keep}"
echo "Submitted batch job 4242"
"""


def _path_with(monkeypatch: pytest.MonkeyPatch, bin_dir: Path, **tools: str) -> None:
    """PATH = bin_dir (holding `tools`) and the interpreter's folder: no real SLURM command."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}")


def _tune(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from launcher.cli import main

    code = main(["run", str(QUICKSTART), "--stages", "train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_auto_on_two_nodes_without_sbatch_refuses_the_dry_run_and_the_run_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _path_with(monkeypatch, tmp_path / "bin")
    run = tmp_path / "run"
    dry = _tune(capsys, "--nodes", "2", "--run-dir", str(run), "--dry-run")
    real = _tune(capsys, "--nodes", "2", "--run-dir", str(run))
    for code, _out, err in (dry, real):
        assert code == 2, err
        assert "resources.backend" in err and "sbatch is not on PATH" in err, err
        assert "--nodes 1" in err, err  # the fix
    assert dry[2] == real[2]
    assert not run.exists()  # refused before anything was written


def test_auto_on_two_nodes_submits_to_slurm_the_request_the_dry_run_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = tmp_path / "sbatch_got.sh"
    fake = FAKE_SBATCH.format(keep=kept)
    _path_with(monkeypatch, tmp_path / "bin", sbatch=fake, srun="#!/bin/sh\nexit 0\n")
    run = tmp_path / "run"
    argv = ("--nodes", "2", "--gpus-per-node", "1", "--run-dir", str(run))
    code, dry, err = _tune(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert dry.startswith("--- sbatch script"), dry[:200]
    code, out, err = _tune(capsys, *argv)
    assert code == 0, err
    assert "submitted SLURM job 4242" in out
    recorded = RunDir(run).request_file.read_text()
    assert dry.startswith(recorded + "\nplan "), (recorded, dry)  # the request, then the plan
    script = dry.split("--- sbatch script", 1)[1].split("\n", 1)[1].split("\n\n--- ")[0]
    assert kept.read_text().rstrip() == script  # what sbatch got is what the dry run showed
    record = json.loads(RunDir(run).job_file.read_text())
    assert (record["backend"], record["job_id"]) == ("slurm", "4242")
