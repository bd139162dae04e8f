"""The host-side log format, set up once by whatever runs first (the pipeline, a workflow,
a SLURM stage job): `[tune-launch] message` lines, without the HTTP clients' per-request
lines. The ranks log their own way (launcher/train/entry.py)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO


def setup_cli_logging(stream: TextIO | None = None) -> None:
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            stream=stream or sys.stderr, level=logging.INFO, format="[tune-launch] %(message)s"
        )
