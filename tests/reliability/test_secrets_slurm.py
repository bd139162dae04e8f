"""Secrets on SLURM: HF_TOKEN, WANDB_API_KEY and a variable the recipe lists under `secrets:`
set in the submitting shell of a real 2-node job (`--backend slurm --nodes 2
--gpus-per-node 1 --wait`). They must reach both ranks (/proc/<pid>/environ, read while the
job runs) and be in no file of the run directory (RUN_DIR/slurm included) nor of slurmd's
spool and the SLURM logs (/var/spool/slurmd*, /var/log/slurm*), during and after the job.

sbatch exports the submitting environment (--export=ALL, SLURM's default), so slurmctld
keeps the job's environment in its state directory while the job exists; that is checked
too and reported as a finding (it is root-only SLURM state, outside tune-launch's control).
"""

from __future__ import annotations

import glob
import secrets
from pathlib import Path

import pytest

from .conftest import (
    SLURM_2_NODES,
    Starter,
    assert_no_leftovers,
    cli_env,
    job_record,
    require_slurm,
    wait_ranks,
)

pytestmark = [pytest.mark.slurm, pytest.mark.train, pytest.mark.timeout(900)]

SECRETS = {
    "HF_TOKEN": "hf_slurm_reliability_" + secrets.token_hex(12),
    "WANDB_API_KEY": "wandb_slurm_reliability_" + secrets.token_hex(12),
    "TL_RECIPE_SECRET": "recipe_slurm_secret_" + secrets.token_hex(12),
}
SPOOLS = ["/var/spool/slurmd*", "/var/log/slurm*"]
CONTROLLER = ["/var/spool/slurmctld*"]


def files_holding(patterns: list[str], needles: list[str]) -> dict[str, list[str]]:
    """file -> needles found in its bytes, for every readable file under the patterns."""
    hits: dict[str, list[str]] = {}
    roots = [Path(p) for pattern in patterns for p in glob.glob(pattern)]
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found = [n for n in needles if n.encode() in data]
            if found:
                hits[str(path)] = found
    return hits


def test_secrets_reach_both_nodes_and_no_file(
    tmp_path: Path, background: Starter, record_property
) -> None:
    record_property("fault_class", "secrets: HF_TOKEN, WANDB_API_KEY, recipe secret (SLURM)")
    require_slurm()
    run_dir = tmp_path / "run"
    values = list(SECRETS.values())
    job = background(
        run_dir,
        "train.max_steps=6",
        "train.save_steps=3",
        "train.logging_steps=1",
        "data.val_split=0",
        "serve.enabled=false",
        "eval.enabled=false",
        "secrets=[HF_TOKEN, WANDB_API_KEY, TL_RECIPE_SECRET]",
        env=cli_env(**SECRETS),
        extra=SLURM_2_NODES,
    )
    ranks = wait_ranks(run_dir, 2, 600)
    environs = {rank: proc.environ() for rank, proc in ranks.items()}
    nodes = {env.get("SLURMD_NODENAME") for env in environs.values()}
    during = files_holding([str(run_dir), *SPOOLS], values)
    controller = files_holding(CONTROLLER, values)

    assert job.wait(600) == 0, job.explain()
    assert job_record(run_dir)["state"] == "COMPLETED"
    assert nodes == {"n1", "n2"}, nodes
    for rank, env in environs.items():
        for name, value in SECRETS.items():
            assert env.get(name) == value, f"{name} did not reach rank {rank}"
    assert not during, f"secrets in files while the job ran: {during}"
    after = files_holding([str(run_dir), *SPOOLS], values)
    assert not after, f"secrets in files: {after}"
    assert not [v for v in values if v in job.stdout or v in job.stderr]
    assert (run_dir / "final" / "COMPLETE").is_file()
    assert_no_leftovers(run_dir, within_s=60)
    if controller:
        record_property(
            "finding",
            "slurmctld's state directory holds the job environment (secrets included) while "
            f"the job exists: {sorted(controller)} (sbatch --export=ALL; root-only SLURM state)",
        )
