"""Where a pipeline run's time goes, and what a rerun of evaluate alone costs.

Runs `guilomo run` (the demo config unless --config is given) as a user would, in a fresh
root with a local sqlite MLflow store, then `guilomo rerun evaluate --from RUN`. kfp.local runs
the tasks one after another, so a stage's wall time is the time from the previous task's end
to its own end: process start, imports, artifact I/O, tracking and the stage's own work. Its
"compute" is the `compute_seconds` the task logs around the stage's `run_*` call (model load
and the work itself); everything else is outside the stage's own compute.

    python benchmarks/pipeline.py [--config FILE] [--root DIR] [KEY=VALUE ...]

Targets (issue 5): outside share < 10% of the run; rerun of evaluate < 1/5 of the full run.
The last line is one JSON object with those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GUILOMO = str(Path(sys.executable).parent / "guilomo")


def _run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.monotonic()
    r = subprocess.run([GUILOMO, *args], capture_output=True, text=True, env=env)
    took = time.monotonic() - start
    if r.returncode != 0:
        sys.exit(f"guilomo {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return took, r.stdout


def _parent(stdout: str) -> str:
    return next(ln for ln in stdout.splitlines() if ln.startswith("MLflow parent run ")).split()[3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="run config (default: the demo)")
    p.add_argument("--root", type=Path, default=Path("runs/bench-pipeline"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = p.parse_args()

    shutil.rmtree(a.root, ignore_errors=True)
    a.root.mkdir(parents=True)
    db = f"sqlite:///{(a.root / 'mlflow.db').resolve()}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": db}
    cfg = ["--config", str(a.config)] if a.config else []

    started = time.time()
    total, out = _run(["run", *cfg, "--root", str(a.root), *a.overrides], env)
    (a.root / "run-stdout.txt").write_text(out)  # the run's own table, for the README
    parent = _parent(out)
    rerun, _ = _run(["rerun", "evaluate", "--from", parent, "--root", str(a.root)], env)

    os.environ["MLFLOW_TRACKING_URI"] = db
    from guilomo.tracking import stage_records

    records = sorted(stage_records(parent), key=lambda r: r.end_time or 0)
    stages, prev, compute_sum = {}, started, 0.0
    for rec in records:
        wall = (rec.end_time or prev) - prev
        compute = float(rec.metrics.get("compute_seconds", 0.0))
        compute_sum += compute
        stages[rec.stage] = {
            "wall_s": round(wall, 1),
            "compute_s": round(compute, 1),
            "outside_s": round(wall - compute, 1),
        }
        prev = rec.end_time or prev
    outside = total - compute_sum

    print(f"{'stage':<15}{'wall s':>9}{'compute s':>11}{'outside s':>11}")
    for name, s in stages.items():
        print(f"{name:<15}{s['wall_s']:>9.1f}{s['compute_s']:>11.1f}{s['outside_s']:>11.1f}")
    print(f"{'whole run':<15}{total:>9.1f}{compute_sum:>11.1f}{outside:>11.1f}")
    print(
        f"outside the stages' own compute: {outside / total:.1%} of the run (target < 10%)\n"
        f"rerun of evaluate alone: {rerun:.1f}s = {rerun / total:.2f} of the full run "
        "(target < 0.20)"
    )
    print(
        json.dumps(
            {
                "total_s": round(total, 1),
                "compute_s": round(compute_sum, 1),
                "outside_share": round(outside / total, 4),
                "rerun_evaluate_s": round(rerun, 1),
                "rerun_evaluate_ratio": round(rerun / total, 4),
                "stages": stages,
            }
        )
    )


if __name__ == "__main__":
    main()
