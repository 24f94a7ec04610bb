"""The README's commands, run as a user runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

GUILOMO = [str(Path(sys.executable).parent / "guilomo")]


def guilomo(*args, cwd=None):
    return subprocess.run([*GUILOMO, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_commands():
    r = guilomo("--help")
    assert r.returncode == 0
    commands = ("demo", "stage", "run", "submit", "rerun", "lineage", "compile", "image", "compare")
    for command in commands:
        assert command in r.stdout
    for command, options in [
        ("run", ("--config", "--root", "--verbose", "KEY=VALUE")),
        ("submit", ("--host", "--image", "--gpu-pool", "--service-account", "--namespace")),
        ("rerun", ("--from", "--host", "--config")),
        ("lineage", ("--experiment",)),
        ("compare", ("REPORT_A", "REPORT_B", "--metric", "--resamples", "--seed", "McNemar")),
    ]:
        r = guilomo(command, "--help")
        assert r.returncode == 0
        for option in options:
            assert option in r.stdout, (command, option)
    r = guilomo("demo", "--help")
    assert r.returncode == 0
    for option in ("--steps", "--preset", "--placement", "--router", "--out"):
        assert option in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--steps", "0"], "--steps: must be >= 1"),
        (["demo", "--router", "hash"], "invalid choice: 'hash'"),
        (["demo", "--preset", "1357", "--steps", "1"], "unknown preset '1357'"),
        (["demo", "--preset", "[2,x]", "--steps", "1"], "a per-layer list holds integers"),
        (["demo", "--preset", "[2,4]", "--steps", "1"], "2 entries but the model has 4 layers"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, args, message):
    r = guilomo(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_demo_trains_saves_and_reloads(tmp_path):
    r = guilomo("demo", "--steps", "80", "--quiet", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "reloaded logits identical: True" in r.stdout
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("held-out loss"))
    before, after = (float(v) for v in line.split()[-2:])
    assert after < 0.5 * before


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *(["stage", s, "--help"] for s in ("preprocess", "search", "allocate", "sft", "evaluate")),
    ],
)
def test_help_prints_without_importing_torch(argv):
    """`--help` reads the stages' configs from `guilomo.config` alone: no torch or
    transformers import before it prints (they cost seconds)."""
    code = (
        "import sys\n"
        "from guilomo.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--help" in r.stdout or "usage" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "[]"
