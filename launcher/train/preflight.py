"""The process group: the pre-flight every rank runs before weights load (the group forms and
an all-reduce returns the expected value, within seconds, naming the node when it does not),
and the two collectives the run adds outside the Trainer (barrier, any_rank).

Called first thing by launcher/train/entry.py. The process group it initialises is the one
the Trainer then uses (accelerate reuses an initialised default group). The timeouts are the
plan's; rank, world size and node name are the launcher's per-process facts.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from launcher.config.plan import Plan

log = logging.getLogger(__name__)


def run_preflight(plan: Plan) -> None:
    """Form the default process group and all-reduce ones; raise RuntimeError on mismatch."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return
    timeout_s = plan.recipe.distributed.preflight_timeout_s
    rank = int(os.environ.get("RANK", "0"))
    host = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME") or os.environ.get("TUNE_LAUNCH_NODE_NAME") or host
    backend = "nccl" if plan.on_gpu else "gloo"
    started = time.monotonic()
    if not dist.is_initialized():
        if plan.on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        collective = datetime.timedelta(seconds=plan.recipe.distributed.nccl_timeout_s)
        dist.init_process_group(backend=backend, timeout=collective)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if plan.on_gpu else torch.device("cpu")
    )
    value = torch.ones(1, device=device)
    work = dist.all_reduce(value, async_op=True)
    deadline = started + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"pre-flight: all-reduce did not finish within {timeout_s}s on node {node} "
                f"(rank {rank} of {world}, {backend}); check the network between nodes "
                "(distributed.nccl_socket_ifname, distributed.nccl_ib_disable)"
            )
        time.sleep(0.05)
    work.wait()
    if int(value.item()) != world:
        raise RuntimeError(
            f"pre-flight: all-reduce returned {value.item()} on node {node} (rank {rank}), expected {world}"
        )
    log.info(
        "pre-flight ok: %d ranks, %s, %.2fs (node %s, rank %d)",
        world,
        backend,
        time.monotonic() - started,
        node,
        rank,
    )


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True if flag is true on any rank (every rank must make the same decision)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
