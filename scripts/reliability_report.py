"""Run the reliability tier and write docs/reliability.md.

    python scripts/reliability_report.py            # tests/reliability + the referenced tests
    python scripts/reliability_report.py --no-slow-refs   # leave out the referenced slow ones
    python scripts/reliability_report.py --from-xml FILE  # only render an existing junit XML
                                                          # (the tier's cases; e.g. the suite's)

The tier is pytest over tests/reliability (faults injected for real: signals, a tmpfs, real
data files, a real SLURM and vLLM) plus the existing tests of other tiers that cover a fault
class already (listed in REFERENCED with that class). Each test names its fault class
(junit property `fault_class`, see tests/reliability/conftest.py); the report is one row
per class: cases, outcome, and the reason of anything not passed. Exit code: pytest's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
XML = ROOT / ".cache" / "reliability.xml"

# existing tests (other tiers) that cover a fault class: node id -> fault class
REFERENCED_FAST = {
    "tests/unit/test_broken_recipes.py::test_broken_recipe_exits_2_naming_the_field": (
        "bad recipe: broken-recipe corpus (every section)"
    ),
    "tests/unit/test_broken_recipes.py::test_python_tag_is_refused_without_running": (
        "unsafe YAML: tags that build objects or read files"
    ),
    "tests/unit/test_broken_recipes.py::test_bad_override_exits_2": "bad recipe: --set overrides",
    "tests/unit/test_property.py": "property: random flat documents and --set (loader)",
    "tests/train/test_local_backend.py::test_sigterm_to_the_launcher_stops_every_process": (
        "launcher interrupted (SIGTERM), local"
    ),
    "tests/train/test_local_backend.py::test_cancel_signals_the_recorded_process_group": (
        "launcher interrupted (SIGTERM), local"
    ),
    "tests/train/test_local_backend.py::test_a_second_run_in_the_same_directory_is_refused": (
        "two runs in one run directory (lock)"
    ),
    "tests/train/test_checkpoint_discovery.py": (
        "crash while writing a checkpoint: partial-checkpoint discovery and cleanup (units)"
    ),
    "tests/serve/test_serve_units.py::test_missing_api_key_is_refused_before_starting": (
        "serving: API key"
    ),
    "tests/serve/test_serve_units.py::test_env_cpu_fixes_and_no_secret": "serving: API key",
    "tests/unit/test_resume_rules.py": (
        "resume under a changed recipe: refused before any process, or applied (units)"
    ),
}
# tests/train/test_train_runs.py::test_crash_during_a_save_leaves_the_previous_checkpoint_resumable
# (the manual rerun after a crash in a save) is left to the train tier: three launches, and
# tests/reliability/test_checkpoint_crash.py runs the same fault through the restart path
REFERENCED_SLOW = {
    "tests/serve/test_serve_lifecycle.py::test_bad_model_path_is_a_run_error_with_the_log_tail": (
        "serving: bad model path"
    ),
    "tests/serve/test_serve_server.py::test_api_key_required_and_never_logged": "serving: API key",
    "tests/serve/test_serve_server.py::test_binds_localhost_by_default": (
        "serving: binds 127.0.0.1 by default"
    ),
    "tests/train/test_resume_anywhere.py::test_zero2_lora_resumes_2_1_2_processes_as_if_uninterrupted": (
        "resume on another world size (2 -> 1 -> 2 processes), local"
    ),
    "tests/train/test_resume_anywhere.py::test_zero3_full_resumes_2_1_2_processes_as_if_uninterrupted": (
        "resume on another world size (2 -> 1 -> 2 processes), local"
    ),
    "tests/train/test_resume_anywhere.py::test_ddp_qlora_resumes_on_one_process_with_a_new_learning_rate": (
        "resume on another world size (2 -> 1 processes, DDP, a new learning rate), local"
    ),
    "tests/train/test_resume_anywhere.py::test_a_change_the_checkpoint_cannot_take_is_refused_before_any_process": (
        "resume under a changed recipe: refused before any process, or applied"
    ),
    "tests/train/test_resume_anywhere.py::test_restart_starts_over_in_the_same_directory": (
        "resume under a changed recipe: refused before any process, or applied"
    ),
    "tests/slurm/test_slurm_resume.py": "resume on another world size (2 nodes -> 1), SLURM",
}


@dataclass
class Case:
    nodeid: str
    outcome: str  # passed, failed, error, skipped, xfail
    seconds: float
    reason: str = ""
    fault_class: str = ""
    findings: list[str] = field(default_factory=list)


def _nodeid(testcase: ET.Element) -> str:
    classname, name = testcase.get("classname", ""), testcase.get("name", "")
    parts = classname.split(".")
    # tests.reliability.test_x -> tests/reliability/test_x.py (no test classes here)
    return "/".join(parts) + ".py::" + name


def read_cases(xml_path: Path, referenced: dict[str, str]) -> list[Case]:
    cases = []
    for testcase in ET.parse(xml_path).getroot().iter("testcase"):
        props = {
            p.get("name"): p.get("value", "")
            for p in testcase.iter("property")
            if p.get("name") == "fault_class"
        }
        findings = [
            p.get("value", "") for p in testcase.iter("property") if p.get("name") == "finding"
        ]
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = testcase.find(tag)
            if node is None:
                continue
            message = (node.get("message") or "").strip()
            if tag == "skipped" and node.get("type") == "pytest.xfail":
                outcome = "xfail"
            else:
                outcome = {"failure": "failed"}.get(tag, tag)
            reason = message.splitlines()[0] if message else (node.text or "").strip()[:200]
            break
        nodeid = _nodeid(testcase)
        fault = props.get("fault_class") or next(
            (cls for prefix, cls in referenced.items() if nodeid.startswith(prefix)), ""
        )
        if not fault and "tests/reliability/" not in nodeid:
            continue  # another tier's test (--from-xml of the whole suite's XML)
        cases.append(Case(nodeid, outcome, float(testcase.get("time", 0)), reason, fault, findings))
    return cases


def _outcome(cases: list[Case]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for case in cases:
        counts[case.outcome] += 1
    order = ("passed", "failed", "error", "xfail", "skipped")
    return ", ".join(f"{counts[k]} {k}" for k in order if counts[k])


# the table's order: faults first, then bad input, injection and secrets, trust
ORDER = (
    "rank dies",
    "launcher interrupted",
    "crash while writing",
    "resume",
    "two runs",
    "disk too small",
    "loss NaN",
    "serving",
    "bad recipe",
    "property",
    "unsafe YAML",
    "bad data",
    "injection",
    "secrets",
    "trust",
)


def _rank(name: str) -> tuple[int, str]:
    return next((i for i, p in enumerate(ORDER) if name.startswith(p)), len(ORDER)), name


def _tests(group: list[Case]) -> str:
    """Test names, each with its parameter ids."""
    params: dict[str, list[str]] = defaultdict(list)
    for case in group:
        name = case.nodeid.split("::")[-1]
        base, _, param = name.partition("[")
        params[base] += [param.rstrip("]")] if param else []
    shown = []
    for base in sorted(params)[:4]:
        ids = params[base]
        if len(ids) > 8:
            ids = [*ids[:8], f"+{len(ids) - 8}"]
        shown.append(f"`{base}`" + (f" [{', '.join(ids)}]" if ids else ""))
    if len(params) > 4:
        shown.append(f"(+{len(params) - 4} more)")
    refs = sorted({c.nodeid.split("::")[0] for c in group if "tests/reliability/" not in c.nodeid})
    return ", ".join(shown) + (" *ref* " + ", ".join(f"`{r}`" for r in refs) if refs else "")


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(cases: list[Case], *, command: str, seconds: float, pytest_code: int) -> str:
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in cases:
        groups[case.fault_class or "(unclassified)"].append(case)
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Reliability and security: faults, bad input and secrets",
        "",
        f"Generated by `{command}` on {now} ({platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}); {len(cases)} test cases in {seconds / 60:.1f} min, "
        f"pytest exit code {pytest_code}. Regenerate with `make reliability-report`.",
        "",
        "Every fault is injected for real: SIGKILL/SIGINT/SIGTERM to real processes, a real 2 MiB",
        "tmpfs, real broken files through the real CLI, a real 2-node SLURM job, the real vLLM",
        "server. Tests live in `tests/reliability/` (plus the referenced tests of other tiers,",
        "marked *ref*). Outcomes: passed / failed / xfail (a known weakness, reason given) /",
        "skipped (reason given). A run shared by several tests is timed in the first one.",
        "",
        "| fault or input class | cases | outcome | time | tests | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(groups, key=_rank):
        group = groups[name]
        notes = sorted({f"{c.outcome}: {c.reason}" for c in group if c.outcome != "passed"})
        notes += ["finding: see below"] if any(c.findings for c in group) else []
        spent = sum(c.seconds for c in group)
        lines.append(
            f"| {_escape(name)} | {len(group)} | {_outcome(group)} | {spent:.0f} s | "
            f"{_tests(group)} | {_escape('; '.join(notes))} |"
        )
    findings = sorted({(c.nodeid, f) for c in cases for f in c.findings})
    lines += ["", "## Findings recorded by the tests", ""]
    lines += [f"- `{nodeid}`: {_escape(text)[:400]}" for nodeid, text in findings] or ["- none"]
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "- Recipes have no include/extends mechanism: one complete YAML file per recipe, loaded",
    "  with a safe loader that also refuses duplicate keys; Python tags, `!include`-style local",
    "  tags and alias bombs are refused (`tests/reliability/test_bad_input.py`).",
    "- Values that land in the sbatch script or launch.sh are quoted (spaces, quotes, `$(...)`,",
    "  backticks, `;` are inert, proven by executing the rendered scripts); line breaks and",
    "  control characters cannot be quoted inside an `#SBATCH` line and are refused by the plan",
    "  (`run_dir`/`--run-dir`, `resources.partition|account|qos|constraint|gpu_type`,",
    "  `resources.sbatch_extra` keys and values).",
    "- Secrets (HF_TOKEN, WANDB_API_KEY, names under `secrets:`) travel only through the",
    "  environment: checked in every file of the run directory (bytes), the CLI output,",
    "  slurmd's spool and the SLURM logs. With SLURM's default `--export=ALL`, slurmctld keeps",
    "  the job's environment in its root-only state directory while the job exists (recorded",
    "  as a finding above); a site that cannot accept that needs a secrets store instead.",
    "- Resuming reads the Trainer's and DeepSpeed's own pickled optimizer/RNG state from the",
    "  run's checkpoints (the libraries' loaders): resume only from run directories you wrote.",
    "- The tier's slow cases (real training, SLURM, vLLM) carry the `train`, `slurm` and `vllm`",
    "  markers; the rest runs in `make test-fast`.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-slow-refs", action="store_true", help="skip the slow referenced tests"
    )
    parser.add_argument("--from-xml", type=Path, help="render this junit XML, run nothing")
    parser.add_argument("--out", type=Path, default=DOC)
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args(argv)
    referenced = dict(REFERENCED_FAST)
    if not args.no_slow_refs:
        referenced |= REFERENCED_SLOW
    command = "python scripts/reliability_report.py" + (
        " --no-slow-refs" if args.no_slow_refs else ""
    )
    if args.from_xml is not None:
        command = "python scripts/reliability_report.py --from-xml <the whole suite's junit XML>"
    started = time.monotonic()
    code = 0
    xml_path = args.from_xml or XML
    if args.from_xml is None:
        XML.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
        cmd = [
            sys.executable, "-m", "pytest", "tests/reliability", *referenced,
            "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={XML}",
            "-rfEsx", "--durations=15", *args.pytest_args,
        ]  # fmt: skip
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    seconds = time.monotonic() - started
    cases = read_cases(xml_path, referenced)
    if args.from_xml is not None:
        seconds = sum(c.seconds for c in cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(cases, command=command, seconds=seconds, pytest_code=code))
    print(f"wrote {args.out} ({len(cases)} cases)")
    return code


if __name__ == "__main__":
    sys.exit(main())
