"""Bad data through the real CLI: it fails before any process starts (fast, no training)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from launcher.rundir import RunDir

from .conftest import explain, run_cli


def test_broken_rows_fail_before_launch_with_row_numbers(tmp_path: Path) -> None:
    good = {"instruction": "q", "input": "", "output": "a"}
    lines = [json.dumps(good), '{"instruction": "q"', json.dumps({**good, "output": ""})]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    result = run_cli(tmp_path / "run", f"data.train={broken}")
    assert result.returncode == 2, explain(result)
    assert "broken.jsonl:2: malformed JSON" in result.stderr
    assert "broken.jsonl:3: empty 'output'" in result.stderr
    assert "2 invalid row(s) of 3" in result.stderr
    assert not RunDir(tmp_path / "run").rank_log(0).exists()  # no process started
    assert time.monotonic() - started < 60

    missing = run_cli(tmp_path / "run2", f"data.train={tmp_path / 'nope.jsonl'}")
    assert missing.returncode == 2, explain(missing)
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr
