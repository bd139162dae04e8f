"""1. Planning latency: `tune-launch plan` vs `import torch` vs `accelerate launch --help`.

Target: our plan under a quarter of the torch import.
"""

from __future__ import annotations

from tests.benchmarks.common import PY, ROOT, median, run_timed

NAME = "planning_latency"


def run(smoke: bool) -> dict[str, object]:
    reps = 1 if smoke else 7
    commands = {
        "tune-launch plan": [
            PY,
            "-m",
            "launcher.cli",
            "plan",
            str(ROOT / "recipes/llama70b_qlora.yaml"),
            "--nodes",
            "2",
            "--json",
        ],
        "python -c 'import torch'": [PY, "-c", "import torch"],
        "accelerate launch --help": [PY, "-m", "accelerate.commands.launch", "--help"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(reps):  # alternate so drifts in machine load hit all three alike
        for key, argv in commands.items():
            result = run_timed(argv)
            assert result.returncode == 0, result.output[-2000:]
            times[key].append(result.seconds)
    med = {k: median(v) for k, v in times.items()}
    ratio = med["tune-launch plan"] / med["python -c 'import torch'"]
    return {
        "name": NAME,
        "repetitions": reps,
        "median_s": med,
        "ratio_plan_over_torch_import": ratio,
        "ratio_plan_over_accelerate_help": med["tune-launch plan"]
        / med["accelerate launch --help"],
        "target": "plan < 0.25 x torch import",
        "met": ratio < 0.25,
    }
