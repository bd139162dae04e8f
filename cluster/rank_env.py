"""One adapter from SLURM / torchrun variables to ranks.

Two uses:
- `ranks()`: who am I (node rank, local/global rank, world, master address/port), read from
  torchrun's variables when a launcher started us, else from SLURM's (one task per process).
- `node_values()`: the values of the per-node placeholders of a plan's launch argv
  (`{node_rank}`, `{master_addr}`, `{master_port}`, `{rdzv_id}`, see launcher/config/render.py),
  computed INSIDE a SLURM step on the node that runs the launcher: SLURM_NODEID only has the
  node's own value there, never on the batch host.

The master address is the first node of SLURM_JOB_NODELIST resolved to an address: SLURM's
NodeAddr (`scontrol show node`), because node names need not resolve (NodeName and the
host's name can differ; the test cluster's n1/n2 do not resolve at all). The master port is
derived from the job id and SLURM_RESTART_COUNT, so concurrent jobs on a node and a requeued
job whose old rendezvous port lingers in TIME_WAIT do not collide.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Master ports fall in [20000, 30000): above the usual services and below Linux's ephemeral
# range (32768+), so an outgoing connection never holds one. Jobs 1000 ids apart share a port
# only if they also share their first node at the same time.
PORT_BASE = 20000
PORT_JOBS = 1000
PORT_RESTARTS = 10

PLACEHOLDERS = ("{node_rank}", "{master_addr}", "{master_port}", "{rdzv_id}")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits in the job."""

    node_rank: int
    nnodes: int
    local_rank: int
    global_rank: int
    world_size: int
    master_addr: str
    master_port: int


def master_port(job_id: int | str, restart_count: int | str = 0) -> int:
    """A port per (job, restart): 20000 + 10 * (job_id mod 1000) + (restarts mod 10)."""
    job = int(re.sub(r"\D", "", str(job_id)) or 0)
    return PORT_BASE + PORT_RESTARTS * (job % PORT_JOBS) + int(restart_count) % PORT_RESTARTS


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`n[1-2],gpu07`) as names, in SLURM's order."""
    if not nodelist:
        return []
    from submitit.slurm.slurm import _parse_node_list  # submitit's parser of SLURM host lists

    return list(_parse_node_list(nodelist))


def node_address(node: str, *, timeout: float = 10.0) -> str:
    """An address for a node: NodeAddr from `scontrol show node`, else DNS, else the name."""
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "node", node],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"\bNodeAddr=(\S+)", out)
    if match and match.group(1) not in ("", "(null)"):
        return match.group(1)
    try:
        return socket.gethostbyname(node)
    except OSError:
        return node


def _int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            return int(str(value).split("(")[0])  # SLURM_TASKS_PER_NODE may read "2(x2)"
    return default


def node_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Placeholder values for this node's launch argv. Call inside the SLURM step."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        raise RuntimeError("not inside a SLURM job: SLURM_JOB_ID is not set")
    if "SLURM_NODEID" not in env:
        raise RuntimeError(
            "SLURM_NODEID is not set: node values must be computed inside the job step (srun), "
            "not on the batch host"
        )
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    first = nodes[0] if nodes else env.get("SLURMD_NODENAME", "localhost")
    return {
        "node_rank": str(int(env["SLURM_NODEID"])),
        "master_addr": node_address(first),
        "master_port": str(master_port(job_id, env.get("SLURM_RESTART_COUNT", "0"))),
        "rdzv_id": f"{job_id}-{env.get('SLURM_RESTART_COUNT', '0')}",
    }


def fill(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """The launch argv with each `{name}` placeholder replaced (other braces left alone)."""
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", value)
        out.append(arg)
    left = [a for a in out if any(p in a for p in PLACEHOLDERS)]
    if left:
        raise ValueError(f"unfilled placeholders in the launch argv: {left}")
    return out


def ranks(env: Mapping[str, str] | None = None) -> Ranks:
    """This process's ranks: torchrun's variables first, then SLURM's, then a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # started by torchrun / accelerate launch
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=1)
        world = _int(env, "WORLD_SIZE", default=1)
        return Ranks(
            node_rank=_int(env, "GROUP_RANK", "NODE_RANK", "SLURM_NODEID", default=0),
            nnodes=_int(
                env, "GROUP_WORLD_SIZE", "SLURM_JOB_NUM_NODES", default=world // local_world
            ),
            local_rank=_int(env, "LOCAL_RANK", default=0),
            global_rank=_int(env, "RANK", default=0),
            world_size=world,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", default=29500),
        )
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:  # one SLURM task per process
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", ""))
        return Ranks(
            node_rank=_int(env, "SLURM_NODEID", default=0),
            nnodes=_int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            global_rank=_int(env, "SLURM_PROCID", default=0),
            world_size=_int(env, "SLURM_NTASKS", default=1),
            master_addr=node_address(nodes[0]) if nodes else "127.0.0.1",
            master_port=master_port(env["SLURM_JOB_ID"], env.get("SLURM_RESTART_COUNT", "0")),
        )
    return Ranks(0, 1, 0, 0, 1, "127.0.0.1", 29500)
