"""`make bench` runs these scripts; here they run small and must end in one JSON line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script,args,keys",
    [
        ("moe_layer.py", ["--quick", "--cases", "1024"], {"cases", "targets", "met"}),
        (
            "moe_layer.py",
            ["--quick", "--cases", "1024/hetero", "--dropout", "0.05"],
            {"cases", "dropout", "met"},
        ),
        (
            "search_step.py",
            [
                "--hidden",
                "64",
                "--layers",
                "2",
                "--vocab",
                "128",
                "--seq",
                "16",
                "--batch",
                "2",
                "--rounds",
                "2",
                "--experts",
                "4",
                "--rank",
                "2",
            ],
            {"first_order_ratio", "second_order_ratio", "met"},
        ),
    ],
)
def test_benchmark_prints_json_last(script, args, keys):
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert keys <= set(last)
