"""A stand-in for launcher/train/entry.py that follows the same contract, in a second per step.

Used by the SLURM plumbing tests: it forms the real gloo group (launcher.train.preflight), logs
per rank, appends metrics.jsonl, writes checkpoints with COMPLETE markers, resumes from the
latest one, and on TUNE_LAUNCH_SAVE_SIGNAL saves at the next step boundary (all ranks
agree through an all-reduce), writes RUN_DIR/PREEMPTED and exits 0.
Environment knobs: FAKE_STEPS (12), FAKE_SAVE_STEPS (4), FAKE_STEP_S (0.5),
FAKE_FAIL_RANK / FAKE_FAIL_STEP (raise there).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.rundir import RunDir
from launcher.train.preflight import run_preflight


def main(run_dir: str) -> int:
    run = Path(run_dir)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    log = (run / "logs" / f"rank{rank}.log").open("a")

    def say(msg: str) -> None:
        log.write(f"[rank {rank} node_rank {os.environ.get('GROUP_RANK')} node {node}] {msg}\n")
        log.flush()

    stop = {"flag": 0}
    name = os.environ.get("TUNE_LAUNCH_SAVE_SIGNAL")
    if name:
        signal.signal(getattr(signal, name), lambda s, f: stop.__setitem__("flag", 1))
    run_preflight(RunDir(run).load_plan())
    steps = int(os.environ.get("FAKE_STEPS", "12"))
    every = int(os.environ.get("FAKE_SAVE_STEPS", "4"))
    ckpts = run / "checkpoints"
    done = [
        int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "COMPLETE").exists()
    ]
    start = max(done, default=0)
    say(f"start at step {start} of {steps} (world {world})")

    def save(step: int) -> None:
        if rank == 0:
            path = ckpts / f"checkpoint-{step}"
            path.mkdir(parents=True, exist_ok=True)
            (path / "COMPLETE").write_text("")
        dist.barrier()

    for step in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.5")))
        if rank == int(os.environ.get("FAKE_FAIL_RANK", "-1")) and step == int(
            os.environ.get("FAKE_FAIL_STEP", "-1")
        ):
            raise ValueError(f"fake failure at step {step} on rank {rank}")
        flag = torch.tensor([stop["flag"]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if rank == 0:
            with (run / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
        say(f"step {step}")
        if step % every == 0 or flag.item():
            save(step)
        if flag.item() and step < steps:
            if rank == 0:
                (run / "PREEMPTED").write_text(json.dumps({"step": step}))
            dist.barrier()
            say(f"saved on signal at step {step}")
            return 0
    if rank == 0:
        (run / "final").mkdir(exist_ok=True)
        (run / "final" / "DONE").write_text("")
    dist.barrier()
    say("done")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
