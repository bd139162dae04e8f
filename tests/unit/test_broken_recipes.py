"""Every broken recipe exits 2, names the field, shows the bad value's fix, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli import main

BROKEN = sorted((Path(__file__).parent / "broken").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[2]


def _expected_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ").strip()


def test_corpus_is_large_enough() -> None:
    assert len(BROKEN) >= 15


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_recipe_exits_2_naming_the_field(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["plan", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    field = _expected_field(path)
    assert f"- {field}:" in err, err
    assert "fix:" in err
    assert "Traceback" not in err


def test_unknown_key_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    main(["plan", str(Path(__file__).parent / "broken" / "typo_field.yaml")])
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'?" in err


def test_all_problems_listed_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nmodel: {name_or_path: tiny:llama, dtype: f32}\n"
        f"data: {{train: {ROOT}/recipes/data/quickstart_train.jsonl}}\n"
        "train: {learning_rate: -1, epochs: 0, optimizr: adamw_torch}\n"
    )
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err
    for field in ("model.dtype", "train.learning_rate", "train.epochs", "train.optimizr"):
        assert f"- {field}:" in err, err
    assert "4 problems" in err


def test_cli_subprocess_no_traceback_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", str(BROKEN[0])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "problem" in proc.stderr


def test_python_tag_is_refused_without_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert main(["plan", str(recipe)]) == 2
    assert not marker.exists()
    assert "not valid YAML" in capsys.readouterr().err


def test_bad_override_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "plan",
            str(ROOT / "recipes/quickstart.yaml"),
            "--set",
            "train.lerning_rate=1",
            "--set",
            "method.r=abc",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "train.lerning_rate" in err and "method.r" in err


def test_missing_recipe_file_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "no/such/recipe.yaml"]) == 2
    assert "recipe file not found" in capsys.readouterr().err
