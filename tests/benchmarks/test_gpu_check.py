"""scripts/gpu_check.sh, the GPU proof (docs/gpu-results.md), on CPU.

Its --cpu-smoke run goes through every part with the tiny shape, so the GPU run is never the
script's first run: each check either measured something real here (the planner's estimate
and the run's peak RSS, tokens/s, the FSDP plans, the probe inside the rank's code, NF4
loading, ZeRO-2/3 runs) or was skipped with a reason naming CUDA. And what a GPU run carries
(the working tree plus the wheels in .whl/) must fit one 64 MiB transfer to the GPU node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("planner", "throughput", "fsdp", "qlora")
CARRY_LIMIT = 64 * 2**20  # what one transfer to the GPU node may carry: tree + wheels
RESULT_FILES = {f"{p}.json" for p in PARTS} | {"summary.json", "logs.tar.gz"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One --cpu-smoke run into a folder that does not exist yet; its OUT_DIR."""
    base = tmp_path_factory.mktemp("gpu-check")
    out = base / "new" / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(base / "work")}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu_check.sh"), str(out), "--cpu-smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def checks(out: Path, part: str) -> dict[str, dict[str, Any]]:
    doc = json.loads((out / f"{part}.json").read_text())
    assert doc["mode"] == "cpu-smoke" and doc["status"] == "ok", doc
    found = {c["name"]: c for c in doc["checks"]}
    for check in found.values():  # measured, or skipped saying it needs CUDA; never failed
        assert check["status"] in ("measured", "skipped"), check
        if check["status"] == "skipped":
            assert "CUDA" in check["reason"], check
    return found


pytestmark = [pytest.mark.bench]


@pytest.mark.train
def test_smoke_writes_what_the_device_tool_returns(smoke: Path) -> None:
    """Six files (the tool returns at most 8), every part ok, the logs packed."""
    assert {p.name for p in smoke.iterdir()} == RESULT_FILES
    summary = json.loads((smoke / "summary.json").read_text())
    assert {name: part["status"] for name, part in summary["parts"].items()} == dict.fromkeys(
        PARTS, "ok"
    )
    assert (
        summary["env"]["mode"] == "cpu-smoke" and summary["env"]["gpu"]["cuda_available"] is False
    )
    assert all(v == "ok" for v in summary["env"]["imports"].values()), summary["env"]["imports"]
    with tarfile.open(smoke / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert {f"logs/{p}.log" for p in PARTS} <= set(names), names
    assert any(n.endswith("logs/rank0.log") for n in names), names


@pytest.mark.train
def test_smoke_planner_estimates_and_measures_a_peak(smoke: Path) -> None:
    found = checks(smoke, "planner")
    assert set(found) == {"full gc=off", "qlora gc=on"}
    for check in found.values():
        assert check["status"] == "measured", check
        assert check["plan_per_gpu_gib"] > 0 and check["host_peak_rss_mib"] > 0, check
        assert check["tokens_per_s"] > 0, check
        assert "CUDA" in check["gpu_comparison"], check
    # the full fine-tune trains every weight: the plan holds more than for the adapters
    assert found["full gc=off"]["plan_per_gpu_gib"] > found["qlora gc=on"]["plan_per_gpu_gib"]


@pytest.mark.train
def test_smoke_throughput_pairs_run_and_say_what_is_not_measured(smoke: Path) -> None:
    found = checks(smoke, "throughput")
    for name in ("llama3.2-1b lora", "llama3.2-1b qlora"):
        row = found[name]
        # side by side with the other parts on 2 cores: real figures, not comparable ones
        assert row["ours_tokens_per_s"] > 0 and row["baseline_tokens_per_s"] > 0, row
    for name in ("llama3.1-8b lora", "llama3.1-8b qlora", "llama3.1-8b lora liger"):
        assert found[name]["status"] == "skipped", found[name]
    doc = json.loads((smoke / "throughput.json").read_text())
    assert any("model.liger_kernel=true" in note for note in doc["notes"])


@pytest.mark.train
def test_smoke_fsdp_plans_and_the_probe_inside_the_rank(smoke: Path) -> None:
    found = checks(smoke, "fsdp")
    lora_plan, qlora_plan = found["lora: plan"], found["qlora: plan"]
    assert lora_plan["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert qlora_plan["quant_storage"] == "bf16", qlora_plan
    for name in ("lora: tune-launch run", "qlora: tune-launch run", "qlora: wrap probe"):
        assert found[name]["status"] == "skipped", found[name]
    probe = found["lora: wrap probe"]  # the rank's code under DDP on CPU, the callback in it
    assert probe["status"] == "measured", probe
    assert probe["after_step_1"]["layers"] == 2 and probe["after_step_1"]["layers_wrapped"] == 0


@pytest.mark.train
def test_smoke_qlora_kernels_and_zero_runs(smoke: Path) -> None:
    found = checks(smoke, "qlora")
    nf4 = found["nf4 double-quant load"]
    assert nf4["status"] == "measured" and nf4["linear4bit"] > 0, nf4
    assert nf4["quant_types"] == ["nf4"] and nf4["double_quant"] is True, nf4
    assert nf4["logits_finite"] and 0 < nf4["nf4_relative_error_one_layer"] < 0.5, nf4
    paged = found["paged_adamw_8bit"]
    assert paged["adamw_8bit"]["state_mib"] > 0 and "CUDA" in paged["paging"], paged
    for strategy, stage in (("zero2", 2), ("zero3", 3)):
        run = found[f"{strategy} qlora run"]
        assert run["status"] == "measured" and run["zero_stage"] == stage, run
        assert run["tokens_per_s"] > 0 and run["final_written"], run
    assert found["deepspeed op built by nvcc"]["status"] == "skipped"


def carried_bytes() -> int:
    """What travels to the GPU node with the checkout: tracked files and untracked ones git does
    not ignore, plus a shared/ folder inside the checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = {ROOT / name for name in listed.split("\0") if name}
    if (ROOT / "shared").is_dir():
        files |= set((ROOT / "shared").rglob("*"))
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def recorded_bundle() -> int:
    text = (ROOT / "docs/gpu-results.md").read_text()
    found = re.search(r"wheel bundle: ([\d,]+) bytes", text)
    assert found, "docs/gpu-results.md must record the wheel bundle's measured size"
    return int(found.group(1).replace(",", ""))


def test_gpu_run_carries_under_the_64_mib_limit() -> None:
    """The tree plus .whl/ (measured now when it is here, else the size docs/gpu-results.md
    recorded for scripts/fetch-wheels.sh's bundle) fits one call's 64 MiB."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the carried tree is git's file list")
    tree = carried_bytes()
    wheels = ROOT / ".whl"
    if wheels.is_dir() and any(wheels.iterdir()):
        bundle = sum(p.stat().st_size for p in wheels.rglob("*") if p.is_file())
    else:
        bundle = recorded_bundle()
    mib = 2**20
    print(f"tree {tree / mib:.1f} MiB + wheels {bundle / mib:.1f} MiB of {CARRY_LIMIT / mib} MiB")
    assert tree + bundle <= CARRY_LIMIT, (
        f"a GPU call would carry {(tree + bundle) / mib:.1f} MiB (tree {tree / mib:.1f}, "
        f"wheels {bundle / mib:.1f}): over the 64 MiB a transfer may carry"
    )


def test_run_all_creates_its_out_folder(tmp_path: Path) -> None:
    """`run_all.py --out DIR` with DIR not there yet writes DIR/benchmarks.json (it used to
    measure everything, then fail to write it)."""
    out = tmp_path / "not" / "yet"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests/benchmarks/run_all.py"),
            "--only",
            "none",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((out / "benchmarks.json").read_text())["results"] == []
