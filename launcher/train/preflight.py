"""Pre-flight on every rank before weights load: the process group forms and an all-reduce
returns the expected value, within seconds, naming the node when it does not.

Called first thing by launcher/train.py. The process group it initialises is the one the
Trainer then uses (accelerate reuses an initialised default group).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def run_preflight(timeout_s: int, on_gpu: bool) -> None:
    """Form the default process group and all-reduce ones; raise RuntimeError on mismatch."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return
    rank = int(os.environ.get("RANK", "0"))
    host = socket.gethostname()
    node = os.environ.get("SLURMD_NODENAME") or os.environ.get("TUNE_LAUNCH_NODE_NAME") or host
    backend = "nccl" if on_gpu else "gloo"
    started = time.monotonic()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        nccl_timeout = int(os.environ.get("TUNE_LAUNCH_NCCL_TIMEOUT_S", "1800"))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=nccl_timeout))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
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
