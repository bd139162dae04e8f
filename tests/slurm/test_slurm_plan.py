"""The SLURM backend without a cluster: sbatch rendering (golden files), rank/placeholder
adapter, the node task's pickling and error summary, --smoke. Fast; no `slurm` marker.

UPDATE_GOLDEN=1 rewrites tests/slurm/golden/*.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest

from cluster import rank_env
from cluster.node_entry import NodeTask, error_summary
from cluster.slurm import SlurmBackend, sbatch_parameters, sbatch_script, time_minutes
from launcher.config.plan import ClusterFacts, Plan, resolve
from launcher.config.recipe import load_recipe, localize

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
    text = _normalise(sbatch_script(plan), plan)
    golden = GOLDEN / f"{case}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
        pytest.skip(f"golden file rewritten: {golden}")
    assert golden.read_text() == text, f"{golden} differs (UPDATE_GOLDEN=1 to accept)"


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
    text = sbatch_script(plan)
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


def test_time_formats() -> None:
    assert time_minutes("90") == 90
    assert time_minutes("00:30:00") == 30
    assert time_minutes("01:00:01") == 61
    assert time_minutes("2-00:00:00") == 2880


def test_dryrun_is_what_submitit_writes(tmp_path: Path) -> None:
    """The dry run's script is submitit's own rendering of the executor's parameters."""
    import submitit
    from submitit.slurm import slurm as submitit_slurm

    plan = _plan("llama70b_qlora.yaml", tmp_path)
    shown = SlurmBackend().dryrun(plan)
    script = next(v for k, v in shown.items() if k.startswith("sbatch script"))
    # an executor as submit() builds it (the srun check patched: no cluster needed here)
    original = submitit_slurm.SlurmExecutor.affinity
    submitit_slurm.SlurmExecutor.affinity = classmethod(lambda cls: 2)  # type: ignore[method-assign,assignment]
    try:
        executor = submitit.SlurmExecutor(
            folder=Path(plan.run_dir) / "slurm", python=plan.launch[0]
        )
    finally:
        submitit_slurm.SlurmExecutor.affinity = original  # type: ignore[method-assign]
    executor.update_parameters(**sbatch_parameters(plan))
    assert script == executor._make_submission_file_text(executor._submitit_command_str, "x")
    assert "{node_rank}" in shown["each task (srun, one per node)"]


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
    task = NodeTask("/runs/x", max_requeues=3, save_timeout_s=60)
    task.requeues = 2
    task._signals["SIGUSR2"] = 1.0
    copy = pickle.loads(pickle.dumps(task))
    assert (copy.run_dir, copy.requeues, copy.max_requeues) == ("/runs/x", 2, 3)
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


def test_failure_message_names_the_first_failing_rank_and_its_node(tmp_path: Path) -> None:
    from cluster.node_entry import failure_message

    logs = tmp_path / "logs"
    logs.mkdir()
    assert failure_message(tmp_path, since=0) is None
    (logs / "rank1.log").write_text(
        "2026-11-22 10:00:00 rank1 INFO launcher.preflight: pre-flight ok: 2 ranks, gloo, "
        "0.1s (node n2, rank 1)\n"
        "2026-11-22 10:00:05 rank1 ERROR launcher.train: training failed on rank 1: boom\n"
        "Traceback (most recent call last):\n"
        '  File "train.py", line 1, in train\n'
        "ValueError: boom\n"
    )
    (logs / "rank1.error").write_text("")
    os.utime(logs / "rank1.error", (100, 100))
    (logs / "rank0.error").write_text("")  # a later failure: the peer that lost rank 1
    os.utime(logs / "rank0.error", (200, 200))
    assert (
        failure_message(tmp_path, since=50)
        == "training failed on node n2 (rank 1): ValueError: boom"
    )
    assert failure_message(tmp_path, since=300) is None  # errors from an earlier attempt
    # a pre-flight failure: no ok line; its message names the node
    (logs / "rank1.log").write_text(
        "training failed on rank 1: pre-flight\nRuntimeError: pre-flight: all-reduce did not "
        "finish within 60s on node n2 (rank 1 of 2, gloo)\n"
    )
    message = failure_message(tmp_path, since=50)
    assert message is not None and message.startswith("training failed (rank 1): RuntimeError")
    assert "on node n2" in message


def test_checkpoint_decides_requeue_completion_and_the_bound(tmp_path: Path) -> None:
    """NodeTask.checkpoint (submitit calls it on USR2): requeue after a save, not after a
    finished training, and never more than resources.max_requeues times."""
    import subprocess

    from submitit.helpers import DelayedSubmission

    def task_after(code: int, *, saved: bool, requeues: int = 0) -> NodeTask:
        task = NodeTask(str(tmp_path), max_requeues=2, save_timeout_s=5)
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
