"""The state file of a sweep (SWEEP_DIR/sweep.json: "variants") or a workflow
(RUN_DIR/workflow.json: "stages"): one record per name, rewritten atomically as it goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from launcher.rundir import RunDir


def load_records(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """name -> record; {} when the file is missing or unreadable."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    records = found.get(key, []) if isinstance(found, dict) else []
    return {r["name"]: r for r in records if isinstance(r, dict) and "name" in r}


def save_records(path: Path, key: str, records: dict[str, dict[str, Any]]) -> None:
    RunDir.write_atomic(path, json.dumps({key: list(records.values())}, indent=2) + "\n")
