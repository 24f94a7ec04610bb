"""One GPU check (`make gpu-check`): the CUDA tests and the GPU benchmarks, one JSON report.

    make gpu-check                      # or: .venv/bin/python benchmarks/gpu_check.py --out gpu-check.json

On a machine with CUDA it runs, in this order and within about 10 minutes:

1. `pytest -m cuda tests/test_cuda.py`: the fused layer against the eager reference in fp32
   and bf16, SFT steps with activation checkpointing against the plain backward, and
   generation with the adapter against the CPU;
2. `benchmarks/moe_layer.py --device cuda --quick` (bf16);
3. `benchmarks/whole_model.py --device cuda`;
4. `benchmarks/memory_model.py --device cuda --layers 8` (the plan against
   `torch.cuda.max_memory_allocated`).

The report (`--out`, and the last line on stdout) holds the device, each part's exit status,
time and last JSON line. Without CUDA it says so and exits 0: there is nothing to check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {
    "cuda_tests": [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"],
    "moe_layer": [sys.executable, "benchmarks/moe_layer.py", "--device", "cuda", "--quick"],
    "whole_model": [sys.executable, "benchmarks/whole_model.py", "--device", "cuda"],
    "memory_model": [
        sys.executable,
        "benchmarks/memory_model.py",
        "--device",
        "cuda",
        "--layers",
        "8",
    ],
}


def last_json(text: str) -> object:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def run_part(name: str, cmd: list[str], timeout: int) -> dict:
    print(f"gpu-check: {name}: {' '.join(cmd[1:])}", file=sys.stderr)
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "timed_out": True, "seconds": round(time.perf_counter() - t, 1)}
    part = {"rc": r.returncode, "seconds": round(time.perf_counter() - t, 1)}
    part["result"] = last_json(r.stdout)
    if name == "cuda_tests":
        part["result"] = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    if r.returncode != 0:
        part["stderr_tail"] = r.stderr[-2000:]
    return part


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON report")
    p.add_argument("--timeout", type=int, default=300, help="seconds per part at most")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        report = {"cuda": False, "message": "no CUDA GPU on this machine: nothing to check"}
        print(report["message"], file=sys.stderr)
    else:
        report = {
            "cuda": True,
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cuda_version": torch.version.cuda,
            "parts": {n: run_part(n, PARTS[n], args.timeout) for n in args.parts},
        }
        report["ok"] = all(part.get("rc") == 0 for part in report["parts"].values())
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if report.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
