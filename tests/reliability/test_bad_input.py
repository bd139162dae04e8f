"""Bad input through the real CLI: broken data files and dangerous YAML.

Data: every case is a real file given to `tune-launch run --set data.train=FILE`; the run
must stop before any process starts with exit 2, a row-numbered (or file-level) problem and
no traceback. YAML: every tag that makes PyYAML build Python objects (or read files) is
refused as invalid YAML without running anything; tests/unit/test_broken_recipes.py covers
`!!python/object/apply` already. There is no include/extends mechanism in recipes (one
complete file per recipe), so there is nothing to escape through.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launcher.cli import main

from .conftest import SHORT, TRAIN_DATA, explain, run_cli

pytestmark = [pytest.mark.timeout(300)]

ROWS = TRAIN_DATA.read_text(encoding="utf-8").splitlines(keepends=True)[:40]
GOOD = "".join(ROWS)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _malformed(tmp: Path) -> Path:
    broken = (
        ROWS[0] + '{"instruction": "x", "output": \n' + ROWS[2] + "[1, 2]\n" + "".join(ROWS[4:])
    )
    return _write(tmp / "malformed.jsonl", broken.encode())


def _latin1(tmp: Path) -> Path:
    row = json.dumps({"instruction": "café?", "output": "oui"}, ensure_ascii=False)
    return _write(tmp / "latin1.jsonl", (ROWS[0] + row + "\n").encode("latin-1") + GOOD.encode())


def _utf16(tmp: Path) -> Path:
    return _write(tmp / "utf16.jsonl", GOOD.encode("utf-16"))  # with its byte-order mark


def _empty(tmp: Path) -> Path:
    return _write(tmp / "empty.jsonl", b"")


def _blank(tmp: Path) -> Path:
    return _write(tmp / "blank.jsonl", b"\n \n\t\n")


def _huge_line(tmp: Path) -> Path:
    huge = json.dumps({"instruction": "a " * 25_000_000, "output": "x"})  # ~50 MB, valid JSON
    return _write(tmp / "huge.jsonl", (ROWS[0] + huge + "\n" + "".join(ROWS[1:])).encode())


def _directory(tmp: Path) -> Path:
    path = tmp / "a_directory.jsonl"
    path.mkdir()
    return path


def _wrong_shape(tmp: Path) -> Path:
    rows = ROWS[0] + json.dumps({"instruction": 3, "output": ["x"]}) + "\n" + '"a string"\n'
    return _write(tmp / "shape.jsonl", rows.encode())


CASES = {
    # name: (builder, expected text in stderr)
    "malformed_jsonl": (_malformed, ["malformed.jsonl:2: malformed JSON", "malformed.jsonl:4:"]),
    "latin1_bytes": (_latin1, ["latin1.jsonl:2: not valid UTF-8 (byte 0xe9"]),
    "utf16_bom": (_utf16, ["utf16.jsonl:1: the file is UTF-16"]),
    "empty_file": (_empty, ["data file is empty"]),
    "blank_lines_only": (_blank, ["data file is empty"]),
    "huge_50mb_line": (_huge_line, ["huge.jsonl:2: line of 47.7 MiB"]),
    "directory_not_file": (_directory, ["is a directory, not a data file"]),
    "wrong_types": (
        _wrong_shape,
        ["shape.jsonl:2: field 'instruction' must be a string", "shape.jsonl:3:"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_file_is_a_numbered_error_through_the_cli(
    case: str, tmp_path: Path, record_property
) -> None:
    record_property("fault_class", "bad data file through the CLI")
    build, expected = CASES[case]
    path = build(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli(run_dir, *SHORT, f"data.train={path}", timeout=240)
    assert result.returncode == 2, explain(result)
    for text in expected:
        assert text in result.stderr, explain(result)
    assert "Traceback" not in result.stderr
    assert len(result.stderr) < 10_000  # the 50 MB line is not echoed back
    assert not (run_dir / "logs").exists() or not list((run_dir / "logs").glob("rank*"))


DANGEROUS_YAML = {
    "python_object_new": "!!python/object/new:os.system [echo pwned]",
    "python_object": "!!python/object:subprocess.Popen {args: [touch, MARKER]}",
    "python_name": "!!python/name:os.system",
    "python_module": "!!python/module:os",
    "python_apply_list": "!!python/object/apply:subprocess.check_output [[touch, MARKER]]",
    "python_tuple": "!!python/tuple [a, b]",
    "python_bytes": "!!python/bytes aGVsbG8=",
    "local_tag": "!include /etc/passwd",
    "set_tag": "!!set {a, b}",
}


@pytest.mark.parametrize("case", sorted(DANGEROUS_YAML))
def test_dangerous_yaml_tags_are_refused(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property
) -> None:
    record_property("fault_class", "unsafe YAML: tags that build objects or read files")
    recipe = tmp_path / "r.yaml"
    tag = DANGEROUS_YAML[case].replace("MARKER", str(tmp_path / "MARKER"))
    recipe.write_text(
        f"name: t\nmodel: {{name_or_path: tiny:llama}}\n"
        f"data: {{train: {TRAIN_DATA}}}\nrun_dir: {tag}\n"
    )
    code = main(["plan", str(recipe)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "MARKER").exists()
    # refused by the loader (unknown tag) or, for the safe standard tags, by the schema
    assert "not valid YAML" in err or "- run_dir:" in err, err


def test_yaml_anchors_cannot_blow_up_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property
) -> None:
    """A 'billion laughs' document (12 levels: 9 x 6^11 = 3.3e9 leaves if expanded): aliases
    are shared references in PyYAML, so loading is cheap; the schema refuses the keys and the
    error shows a bounded repr of the value (a plain repr() would never finish)."""
    record_property("fault_class", "unsafe YAML: alias bomb (billion laughs)")
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        prev = chr(ord("a") + i - 1)
        name = chr(ord("a") + i)
        lines.append(f"{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("\n".join(lines) + "\nname: t\nmodel: {name_or_path: tiny:llama}\n")
    started = time.monotonic()
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "unknown key" in err and len(err) < 20_000
    assert time.monotonic() - started < 30
