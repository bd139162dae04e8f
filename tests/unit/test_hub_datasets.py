"""Hub datasets are read offline from the local Hugging Face cache, with a subset (the
dataset's configuration) and a split, slices included (`train[:20%]`): from the snapshot that
`hf download --repo-type dataset` leaves in the hub cache, or from the datasets cache an
earlier `datasets.load_dataset` filled. A dataset in neither stops `tune-launch run` before any
process starts (exit 2, the field and the `hf download` that fetches it), never a network wait.

The caches are built here the way those tools leave them: parquet files and a README whose
`configs:` name the subsets, in a snapshot folder named by commit with refs/main."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config.recipe import load_recipe, localize
from launcher.data.rows import load_splits

DATASET = "acme/qa"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
README = """---
configs:
- config_name: en
  default: true
  data_files:
  - {split: train, path: en/train-*.parquet}
  - {split: test, path: en/test-*.parquet}
- config_name: de
  data_files:
  - {split: train, path: de/train-*.parquet}
---
"""


def rows(prefix: str, n: int) -> list[dict[str, str]]:
    return [{"instruction": f"{prefix}{i}", "output": "ok"} for i in range(n)]


def cache_dataset(hub: Path) -> Path:
    """What `hf download --repo-type dataset acme/qa` leaves in the hub cache."""
    import datasets

    folder = hub / f"datasets--{DATASET.replace('/', '--')}"
    snapshot = folder / "snapshots" / COMMIT
    parts = {"en/train": rows("en", 50), "en/test": rows("test", 10), "de/train": rows("de", 30)}
    for name, items in parts.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(items).to_parquet(str(snapshot / f"{name}-00000.parquet"))
    (snapshot / "README.md").write_text(README)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    # the libraries read their cache folders once, at import
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    return home / "hub"


def recipe_file(tmp_path: Path, train: str, extra: str = "") -> Path:
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows("local", 8)))
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"name: hub\nmodel: {{name_or_path: 'tiny:llama'}}\ndata:\n  train:\n{train}{extra}"
    )
    return path


def splits(path: Path):  # type: ignore[no-untyped-def]
    return load_splits(localize(load_recipe(path), path.parent))


def texts(items: list[dict[str, list[dict[str, str]]]]) -> list[str]:
    return [row["prompt"][0]["content"] for row in items]


def test_a_subset_and_a_sliced_split(hub: Path, tmp_path: Path) -> None:
    cache_dataset(hub)
    train = f'    - {{path: {DATASET}, subset: de, split: "train[:20%]"}}\n'
    got = splits(recipe_file(tmp_path, train))
    assert texts(got.train) == [f"de{i}" for i in range(6)]  # 20% of 30
    assert got.reports[0].source == "acme/qa (de, train[:20%])"


def test_a_data_dir_reads_only_that_folder(hub: Path, tmp_path: Path) -> None:
    """torchtune's stack_exchange_paired_dataset: `data_dir="data/rl"` of a dataset whose
    folders hold different parts (no `configs:` in its README)."""
    import datasets

    folder = hub / "datasets--acme--paired"
    snapshot = folder / "snapshots" / COMMIT
    for part, n in (("rl", 7), ("finetune", 5)):
        (snapshot / "data" / part).mkdir(parents=True)
        datasets.Dataset.from_list(rows(part, n)).to_parquet(
            str(snapshot / "data" / part / "train-00000.parquet")
        )
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)
    got = splits(recipe_file(tmp_path, "    - {path: acme/paired, data_dir: data/rl}\n"))
    assert texts(got.train) == [f"rl{i}" for i in range(7)]
    assert got.reports[0].source == "acme/paired (default, data/rl, train)"
    whole = splits(recipe_file(tmp_path, "    - {path: acme/paired}\n"))
    assert len(whole.train) == 12


def test_the_default_subset_validation_split_and_a_local_file_mixed(
    hub: Path, tmp_path: Path
) -> None:
    cache_dataset(hub)
    train = f"    - {{path: {DATASET}, max_samples: 12}}\n    - {{path: local.jsonl}}\n"
    validation = f"  validation:\n    - {{path: {DATASET}, split: test}}\n"
    got = splits(recipe_file(tmp_path, train, validation))
    assert sorted(t[:2] for t in texts(got.train)) == ["en"] * 12 + ["lo"] * 8
    assert texts(got.validation) == [f"test{i}" for i in range(10)]
    assert [r.used for r in got.reports] == [12, 8, 10]


def test_the_datasets_cache_of_an_earlier_load(hub: Path, tmp_path: Path) -> None:
    """A dataset loaded once online lives in HF_DATASETS_CACHE as
    owner___name/subset/version/hash/name-split.arrow; built here by loading the snapshot
    folder, then giving the folder and the Arrow files the hub id's names."""
    import datasets

    snapshot = cache_dataset(hub)
    datasets.load_dataset(str(snapshot), "de", split="train")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    (cache / COMMIT).rename(cache / "acme___qa")
    for arrow in (cache / "acme___qa").glob("*/*/*/*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace(COMMIT, "qa")))
    shutil.rmtree(hub)  # no snapshot left: only the datasets cache
    train = f"    - {{path: {DATASET}, subset: de, split: 'train[10:15]'}}\n"
    assert texts(splits(recipe_file(tmp_path, train)).train) == [f"de{i}" for i in range(10, 15)]


def test_an_unknown_subset_or_split_names_the_field(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache_dataset(hub)
    for bad in ("subset: fr", "split: validation"):
        path = recipe_file(
            tmp_path, f"    - {{path: local.jsonl}}\n    - {{path: {DATASET}, {bad}}}\n"
        )
        assert main(["run", str(path), "--run-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert "- data.train.1:" in err and bad.split(": ")[1] in err, err
        assert "Traceback" not in err


def test_a_dataset_not_in_the_cache_stops_the_run_before_any_process(
    hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline or not: never a network wait
    run = tmp_path / "run"
    path = recipe_file(tmp_path, "    - {path: local.jsonl}\n    - {path: acme/missing}\n")
    started = time.monotonic()
    assert main(["run", str(path), "--run-dir", str(run)]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert "- data.train.1: hub dataset acme/missing is not in the Hugging Face cache" in err
    assert "hf download --repo-type dataset acme/missing" in err
    assert "Traceback" not in err
    assert not (run / "logs").exists() and not (run / "job.json").exists()
