"""Run the benchmark suite; write docs/benchmarks.json and docs/benchmarks.md.

python tests/benchmarks/run_all.py            # the full suite (make bench)
python tests/benchmarks/run_all.py --smoke    # one repetition, smallest sizes (CI)
python tests/benchmarks/run_all.py --only planning_latency,merge_memory  # updates those entries
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.common import machine  # noqa: E402

MODULES = [
    "tests.benchmarks.bench_plan",
    "tests.benchmarks.bench_planner_accuracy",
    "tests.benchmarks.bench_train",
    "tests.benchmarks.bench_merge",
    "tests.benchmarks.bench_eval",
    "tests.benchmarks.bench_resume",
    "tests.benchmarks.bench_dataprep",
    "tests.benchmarks.bench_gpu",
    "tests.benchmarks.bench_gpu_planner",
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    only = {s for s in args.only.split(",") if s}
    out_dir = Path(args.out)
    # before measuring: a run that measures for an hour must not then fail to write its file
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            results.append({"name": name.rsplit(".", 1)[-1], "skipped": f"not available: {exc}"})
            continue
        if only and module.NAME not in only:
            continue
        start = time.perf_counter()
        print(f"== {module.NAME}", flush=True)
        result = module.run(args.smoke)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result, indent=2, default=str), flush=True)
        results.append(result)
    doc = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python tests/benchmarks/run_all.py", *sys.argv[1:]]),
        "machine": machine(),
        "smoke": args.smoke,
        "results": results,
    }
    if args.smoke:
        out = out_dir / "benchmarks-smoke.json"
        out.write_text(json.dumps(doc, indent=2, default=str))
        print(f"smoke results: {out}")
        return 0
    previous = out_dir / "benchmarks.json"
    if only and previous.is_file():  # --only replaces those entries, keeps the others
        fresh = {r["name"]: r for r in results}
        old = json.loads(previous.read_text())
        doc["results"] = [fresh.pop(r["name"], r) for r in old["results"]] + list(fresh.values())
        doc["command"] = f"{old['command']} ({old['date']}), then {doc['command']}"
    (out_dir / "benchmarks.json").write_text(json.dumps(doc, indent=2, default=str))
    from tests.benchmarks.report import kept_notes, render

    page = out_dir / "benchmarks.md"
    notes = kept_notes(page.read_text()) if page.is_file() else ""
    page.write_text(render(doc, notes))
    print(f"wrote {out_dir / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
