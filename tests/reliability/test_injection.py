"""Recipe strings never execute anything: dry runs for the local and the SLURM backend with
hostile values everywhere a string of the recipe lands (run_dir, data path, partition,
account, sbatch_extra directives, env values, serve.extra_args), then the scripts they
rendered are really run by bash (with `exec`/`srun` swapped for a printer) to prove the
quoting holds. Values that cannot be quoted safely in an `#SBATCH` line (line breaks,
control characters) and hostile run names are refused with exit 2. The real local training
in a hostile run directory is in test_adversarial_run.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import QUICKSTART, REPO, TRAIN_DATA, explain, run_cli

pytestmark = [pytest.mark.timeout(300)]

MARK = "TL_PWNED"
HOSTILE = f"'sq' \"dq\" $(touch {MARK}1) `touch {MARK}2`; touch {MARK}3 & x | y"


# a bash function standing in for the command a script ends with: it records the environment
# and its arguments (NUL-separated), and runs nothing
PRINTER = 'NAME() { env -0 > "$OUT_ENV"; printf "%s\\0" "$@" > "$OUT_ARGV"; }\n'


def _run_printing(
    name: str, script: str, *, out: Path, cwd: Path
) -> tuple[dict[str, str], list[str]]:
    """Run `script` with bash, the command `name` defined as a printer: the environment and
    the arguments that command received, as bash passed them."""
    env_out, argv_out = out / "env.bin", out / "argv.bin"
    ran = subprocess.run(
        ["bash", "-c", PRINTER.replace("NAME", name) + script],
        cwd=cwd,
        env={"PATH": os.environ["PATH"], "OUT_ENV": str(env_out), "OUT_ARGV": str(argv_out)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    env = dict(item.split("=", 1) for item in env_out.read_text().split("\0") if "=" in item)
    return env, argv_out.read_text().split("\0")[:-1]


def _markers(*roots: Path) -> list[Path]:
    found = [p for root in roots if root.is_dir() for p in root.rglob(f"{MARK}*")]
    return found + list(Path("/").glob(f"{MARK}*"))


def _hostile_recipe(root: Path) -> tuple[Path, Path, dict[str, Any]]:
    data = root / f"data {HOSTILE}.jsonl"
    shutil.copy(TRAIN_DATA, data)
    run_dir = root / f"run {HOSTILE}"
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["run_dir"] = str(run_dir)
    recipe["data"]["train"] = str(data)
    recipe["eval"]["data"] = str(data)
    recipe["env"] = {"TL_PLANTED": f"$(touch {MARK}4) `touch {MARK}5`; touch {MARK}6 'q' \"dq\""}
    recipe["resources"] |= {
        "partition": f"debug;touch {MARK}7",
        "account": f"$(touch {MARK}8)",
        "qos": f"`touch {MARK}9`",
        "sbatch_extra": {
            "comment": f"a; $(touch {MARK}10) `touch {MARK}11` 'q' \"dq\"",
            "mail-type": "END",
        },
    }
    recipe["serve"]["extra_args"] = [f"--x=$(touch {MARK}12)", f"; touch {MARK}13"]
    path = root / "hostile.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run_dir, recipe


def _section(stdout: str, title: str) -> str:
    """One `--- title` block of the dry run's output."""
    start = stdout.index(f"--- {title}")
    body = stdout[stdout.index("\n", start) + 1 :]
    end = re.search(r"^--- ", body, flags=re.M)
    return body[: end.start()] if end else body


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_local_dry_run_and_its_launch_script_execute_nothing(
    tmp_path: Path, scratch: Path, record_property
) -> None:
    record_property("fault_class", "injection: local dry run + launch.sh executed by bash")
    path, run_dir, recipe = _hostile_recipe(tmp_path)
    result = run_cli(None, recipe=path, extra=("--dry-run",), cwd=scratch, timeout=120)
    assert result.returncode == 0, explain(result)
    assert "nothing was launched" in result.stdout
    script = (run_dir / "launch.sh").read_text()
    # run the script for real, its `exec <launch>` replaced by a dump of the environment
    # and of the launch argv as bash sees them
    assert "\nexec " in script
    env, argv = _run_printing(
        "launch", script.replace("\nexec ", "\nlaunch "), out=tmp_path, cwd=scratch
    )
    assert env["TL_PLANTED"] == recipe["env"]["TL_PLANTED"]
    assert argv[-1] == str(run_dir)  # the hostile run dir arrives as one literal argument
    assert not _markers(tmp_path, scratch, REPO), _markers(tmp_path, scratch, REPO)


def test_slurm_dry_run_and_its_sbatch_script_execute_nothing(
    tmp_path: Path, scratch: Path, record_property
) -> None:
    record_property("fault_class", "injection: SLURM dry run + sbatch script executed by bash")
    path, run_dir, _recipe = _hostile_recipe(tmp_path)
    result = run_cli(
        None,
        recipe=path,
        extra=("--dry-run", "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1"),
        cwd=scratch,
        timeout=120,
    )
    assert result.returncode == 0, explain(result)
    sbatch = _section(result.stdout, "sbatch script")
    lines = sbatch.strip().splitlines()
    header = lines[: lines.index("# command")]
    # every line before the command is a comment: no directive spilled into a shell line
    assert all(line.startswith("#") or not line.strip() for line in header), header
    directives = [line for line in header if line.startswith("#SBATCH")]
    assert any("--partition=" in line and f"touch {MARK}7" in line for line in directives)
    assert any("--comment=" in line and f"$(touch {MARK}10)" in line for line in directives)
    # run the script for real with srun replaced by a printer of its arguments
    _env, argv = _run_printing("srun", sbatch, out=tmp_path, cwd=scratch)
    assert argv[-1] == str(run_dir / "slurm"), argv  # submitit's folder, one literal argument
    assert not _markers(tmp_path, scratch, REPO), _markers(tmp_path, scratch, REPO)


@pytest.mark.parametrize(
    "override",
    [
        f'resources.partition="debug\\ntouch {MARK}"',
        f'resources.sbatch_extra={{comment: "x\\ntouch {MARK}"}}',
        f'resources.sbatch_extra={{"mail-type\\ntouch {MARK}": END}}',
        f'resources.gpu_type="h100\\ntouch {MARK}"',
        f'run_dir="runs/x\\ntouch {MARK}"',
        f'name="x; touch {MARK}"',
        f'name="$(touch {MARK})"',
    ],
    ids=[
        "partition",
        "sbatch_value",
        "sbatch_key",
        "gpu_type",
        "run_dir",
        "name_semicolon",
        "name_subshell",
    ],
)
def test_values_that_cannot_stay_on_their_line_are_refused(
    override: str, tmp_path: Path, scratch: Path, record_property
) -> None:
    record_property("fault_class", "injection: line breaks / hostile names refused (exit 2)")
    result = run_cli(
        None,  # runs/<name> under the scratch working directory, or the recipe's run_dir
        override,
        extra=("--dry-run", "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1"),
        cwd=scratch,
        timeout=120,
    )
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr
    assert not _markers(tmp_path, scratch, REPO)


def test_a_newline_in_the_run_dir_flag_is_refused(
    tmp_path: Path, scratch: Path, record_property
) -> None:
    record_property("fault_class", "injection: line break in --run-dir refused (exit 2)")
    run_dir = tmp_path / f"run\ntouch {MARK}"
    result = run_cli(
        run_dir,
        extra=("--dry-run", "--backend", "slurm", "--nodes", "2", "--gpus-per-node", "1"),
        cwd=scratch,
        timeout=120,
    )
    assert result.returncode == 2, explain(result)
    assert "--run-dir: contains a line break" in result.stderr
    assert not run_dir.exists() and not _markers(tmp_path, scratch, REPO)
