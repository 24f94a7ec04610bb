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


def test_one_override_syntax_for_stage_and_run(tmp_path):
    """`key.sub=value` means the same in `guilomo stage sft` as `sft.key.sub=value` in
    `guilomo run`; --flags and a --config file sit under it; lists parse (`--preset [2,4]`)."""
    from guilomo.cli import _stage_config, build_parser
    from guilomo.config import AllocateConfig, SftConfig
    from guilomo.runs import load_run_config

    overrides = ["router.kind=soft", "losses.localized-coef=0.5", "lr=1e-4", "max_steps=3"]
    (tmp_path / "sft.yaml").write_text("lr: 0.1\nbatch_size: 8\nrouter: {top_p: 0.5}\n")
    args = build_parser().parse_args(
        ["stage", "sft", "--out", "o", "--dataset", "d", "--allocation", "a"]
        + ["--config", str(tmp_path / "sft.yaml"), "--micro-batch-size", "2", *overrides]
    )
    stage = _stage_config(SftConfig, args)
    two = "preprocess.datasets=[sciq,arc_easy]"  # localized balancing needs two task types
    run = load_run_config(None, [two, *(f"sft.{o}" for o in overrides)]).sft
    for cfg in (stage, run):
        assert cfg.router.kind == "soft" and cfg.losses.localized_coef == 0.5
        assert cfg.lr == 1e-4 and cfg.max_steps == 3
    assert stage.router.top_p == 0.5 and stage.batch_size == 8 and stage.micro_batch_size == 2
    for argv in (["--preset", "[2,4,6,8]"], ["preset=[2,4,6,8]"]):
        args = build_parser().parse_args(["stage", "allocate", "--out", "o", *argv])
        assert _stage_config(AllocateConfig, args).preset == [2, 4, 6, 8]
