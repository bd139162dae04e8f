"""`tune-launch serve RUN_DIR --backend slurm [--time T]`: a standing vLLM endpoint as a SLURM
job (NAME-serve) that others can use.

The job (EndpointTask, pickled by submitit) serves the run through serve/vllm.py's managed
process, bound to every interface of its node, and writes RUN_DIR/endpoint.json (job id, node,
its address from `scontrol show node`, port, URL, model names) once /health answers; it then
stays until the job is cancelled (`tune-launch cancel RUN_DIR`) or reaches its time limit,
when the server's whole process group is stopped. The submitting command waits for that file,
checks /health itself, prints the URL and returns. The API key comes only from the
environment (serve.api_key_env, exported to the job by sbatch): nothing here writes it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any

from cluster import chain
from cluster.stages import say, serve_gpus, stage_parameters
from launcher.errors import Problem, RecipeError, RunError
from launcher.rundir import RunDir


def read(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(RunDir(run_dir).endpoint_file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def live_job(run_dir: Path) -> list[str]:
    """The endpoint's job id while SLURM still has it queued or running."""
    data = read(run_dir)
    if not data or not data.get("job_id"):
        return []
    infos, _ = chain.query_jobs([str(data["job_id"])])
    info = infos.get(str(data["job_id"]))
    return [str(data["job_id"])] if info and info.state in chain.LIVE else []


class EndpointTask:
    """The callable of the endpoint job: serve until cancelled (picklable: no secret)."""

    def __init__(self, run_dir: str, port: int, mode: str | None, engine: str | None) -> None:
        self.run_dir, self.port, self.mode, self.engine = str(run_dir), port, mode, engine

    def __call__(self) -> dict[str, Any]:
        from dataclasses import replace

        from cluster import rank_env
        from serve.spec import spec_for_run
        from serve.vllm import VLLMServer

        run = RunDir(self.run_dir)
        spec = spec_for_run(run.path, mode=self.mode, engine=self.engine)  # type: ignore[arg-type]
        spec = replace(spec, host="0.0.0.0", port=self.port)
        node = os.environ.get("SLURMD_NODENAME", "")
        address = rank_env.node_address(node) if node else "127.0.0.1"
        server = VLLMServer(spec, log_path=run.named_server_log("endpoint"))
        with server:
            url = f"http://{address}:{server.port}/v1"
            info = {
                "job_id": os.environ.get("SLURM_JOB_ID"),
                "node": node,
                "host": address,
                "port": server.port,
                "url": url,
                "models": spec.model_names,
                "api_key_env": spec.api_key_env,
                "started": time.time(),
            }
            RunDir.write_atomic(run.endpoint_file, json.dumps(info, indent=2))
            say(f"serving {', '.join(spec.model_names)} at {url}")
            while server.alive():
                time.sleep(2.0)
            raise RunError(f"the vLLM server exited. Last lines of its log:\n{server.tail()}")


def serve_on_slurm(
    run_dir: Path,
    *,
    time_limit: str | None,
    port: int | None,
    mode: str | None,
    engine: str | None,
) -> int:
    """Submit the endpoint job, wait until its /health answers, print the URL."""
    import submitit

    if time_limit is not None and not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}|\d+", time_limit):
        raise RecipeError(
            [Problem("--time", "not a time limit", "use [D-]HH:MM:SS or minutes", time_limit)],
            "usage",
        )
    run = RunDir(Path(run_dir).resolve())
    if not run.has_plan():
        raise RecipeError(
            [
                Problem(
                    "RUN_DIR", "not a run directory (no plan.json)", "pass RUN_DIR", str(run_dir)
                )
            ],
            "usage",
        )
    plan = run.load_plan()
    key_env = plan.recipe.serve.api_key_env
    if key_env and not os.environ.get(key_env):
        raise RecipeError(
            [
                Problem(
                    "serve.api_key_env",
                    f"names {key_env}, which is not set in this environment",
                    f"export {key_env} (the job receives it from this shell, never from a file)",
                    key_env,
                )
            ],
            "usage",
        )
    if live_job(run.path):
        raise RunError(f"an endpoint of {run.path} is already up: `tune-launch status {run.path}`")
    params = stage_parameters(plan, "serve", time_limit)
    python = plan.launch[0]
    from cluster.slurm import sbatch_script

    chain.test_only("serve", sbatch_script(params, str(run.path), python), params)
    run.endpoint_file.unlink(missing_ok=True)
    executor = submitit.SlurmExecutor(
        folder=run.slurm, max_num_timeout=0, python=shlex.quote(python)
    )
    executor.update_parameters(**params)
    chosen = port if port is not None else plan.recipe.serve.port
    job = executor.submit(EndpointTask(str(run.path), chosen, mode, engine))
    job_id = str(job.job_id)
    RunDir.write_atomic(
        run.endpoint_file, json.dumps({"job_id": job_id, "submitted": time.time()}, indent=2)
    )
    gpus = serve_gpus(plan)
    print(
        f"submitted SLURM job {job_id} ({params['job_name']}, "
        f"{f'{gpus} GPU(s)' if gpus else 'CPU'}) serving {run.path}",
        flush=True,
    )
    try:
        url = _wait_healthy(run, job_id, plan.recipe.serve.health_timeout_s + 120, params)
    except BaseException:
        chain.cancel_jobs([job_id])
        raise
    print(f"serving at {url}", flush=True)
    print(f"  stop it: tune-launch cancel {run.path}", flush=True)
    return 0


def _wait_healthy(run: RunDir, job_id: str, timeout_s: float, params: dict[str, Any]) -> str:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos, _ = chain.query_jobs([job_id])
        info = infos.get(job_id)
        if info is not None:
            reason = chain.never_starts(info, params.get("partition"))
            if reason:
                raise RunError(
                    f"{chain.never_message(info, reason)}; the request: "
                    f"{chain.describe_request(params)}; {chain.partition_offers(params.get('partition'))}"
                )
            if info.state in ("FAILED", "CANCELLED", "COMPLETED"):
                error = chain.job_error(run, job_id, 1, info.slurm_state)
                raise RunError(f"the endpoint job {job_id} ended ({info.state}): {error}")
        data = read(run.path) or {}
        if data.get("url"):
            try:
                health = data["url"].removesuffix("/v1") + "/health"
                if httpx.get(health, timeout=5).status_code == 200:
                    return str(data["url"])
            except httpx.HTTPError:
                pass
        time.sleep(2.0)
    raise RunError(f"the endpoint job {job_id} was not healthy within {timeout_s:.0f} s")
