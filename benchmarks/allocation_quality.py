"""Does the searched allocation beat hand-made ones at no more trainable parameters?

    .venv/bin/python benchmarks/allocation_quality.py        # arc_easy + sciq, seeds 0 1 2
    .venv/bin/python benchmarks/allocation_quality.py --tiny # a smoke run (random tiny model)

For each data set and seed: `guilomo stage preprocess` (rc formulation, 300 train and 30
validation questions, the seed's split); four allocations of SmolLM2-135M-Instruct: three
hand-made MoLA presets, `uniform` (5 experts of rank 8 in every module), `2468` and `8642`
(2/4/6/8 experts per layer quarter, or reversed, rank 8; 5 on average), and `searched`, a
GSV search steered to the parameter count of uniform 5 (`--target-like uniform:5`, 40
bilevel steps, at most 8 experts of rank 8 per module, top-2) turned into an Allocation;
each trained by the same SFT (40 steps of 8 questions, lr 1e-3) and evaluated on the test
split (every question not in train or validation).

Reported per set and allocation: the accuracy's mean and spread over the seeds, the
trainable parameters (the Allocation's manifest), and searched - best hand-made (the preset
of the highest mean accuracy on that set), paired on the same questions and pooled over the
seeds (per-question correctness of every seed concatenated), with its 95% paired bootstrap
interval and the exact McNemar p-value (`guilomo.evalstats`). The goal is met on a set when
searched's mean >= the best hand-made mean at searched parameters <= 1.02x that preset's.
A Markdown table goes to stdout, progress to stderr; the last stdout line is one JSON object.

Every finished cell (preprocess, search, allocate, sft, evaluate) is an artifact folder
under --root named by the stage and a short hash of its exact arguments (inputs named by
their own cell folder, so the hashes do not depend on where --root is): an interrupted run
continues where it stopped, and a rerun with the same flags runs nothing. Each finished
evaluation is also recorded in --ledger (default benchmarks/results/allocation-quality, in
the repository: its per-question correctness and the allocation's parameters, a few KB),
and the table is computed from those records: a fresh checkout, or another machine, runs
only the cells an unrecorded evaluation needs, so the benchmark can be continued across
sessions and finished on a GPU machine. (Cells are named by their arguments, not the code
version: delete the ledger when a change to the stages should be measured anew.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from guilomo.artifacts import ArtifactError, read_artifact
from guilomo.artifacts.eval_report import read_report
from guilomo.compare import METRIC_FIELD, compare_reports
from guilomo.evalstats import mcnemar_exact, paired_bootstrap

HAND_MADE = ("uniform", "2468", "8642")
ALLOCATIONS = (*HAND_MADE, "searched")
PARAMS_SLACK = 1.02  # searched may use 2% more parameters than the preset it is held against
TINY_BASE = "tiny-base"
ARTIFACT_KINDS = {
    "preprocess": "PreparedDataset",
    "search": "SearchState",
    "allocate": "Allocation",
    "sft": "Adapter",
    "evaluate": "EvalReport",
}
# Full-run defaults, and the --tiny smoke run's; a flag given on the command line wins.
FULL = dict(
    sets=["arc_easy", "sciq"],
    seeds=[0, 1, 2],
    sft_steps=40,
    search_steps=40,
    train_size=300,
    validation_size=30,
    test_size=None,
    cutoff=160,
    experts=5,
    rank=8,
    max_experts=8,
    max_rank=8,
)
TINY = dict(
    sft_steps=2,
    search_steps=2,
    train_size=16,
    validation_size=8,
    test_size=16,
    cutoff=64,
    experts=2,
    rank=2,
    max_experts=4,
    max_rank=4,
)


@dataclass(frozen=True)
class Ref:
    """A folder under --root, named the same wherever --root is."""

    name: str

    def path(self, root: Path) -> Path:
        return root / self.name


@dataclass(frozen=True)
class Cell(Ref):
    """One stage run: `guilomo stage STAGE ARGS --out ROOT/NAME`, NAME = STAGE-hash(ARGS)."""

    stage: str = ""
    args: tuple = ()
    label: str = ""

    def command(self, root: Path) -> list[str]:
        args = [str(a.path(root)) if isinstance(a, Ref) else str(a) for a in self.args]
        out = str(self.path(root))
        return [sys.executable, "-m", "guilomo", "stage", self.stage, *args, "--out", out]


def cell(stage: str, args: list, label: str) -> Cell:
    key = json.dumps([stage, *(a.name if isinstance(a, Ref) else str(a) for a in args)])
    name = f"{stage}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return Cell(name=name, stage=stage, args=tuple(args), label=label)


@dataclass
class Plan:
    """Every cell in run order (each once), and the evaluation of (set, seed, allocation)."""

    cells: dict[str, Cell] = field(default_factory=dict)
    evals: dict[tuple[str, int, str], Cell] = field(default_factory=dict)
    allocs: dict[tuple[str, int, str], Cell] = field(default_factory=dict)

    def add(self, c: Cell) -> Cell:
        self.cells.setdefault(c.name, c)
        return c


def like_spec(experts: int, rank: int) -> str:
    return f"uniform:{experts}" if rank == 8 else f"uniform:{experts}x{rank}"


def build_plan(o: argparse.Namespace, base: str | Ref) -> Plan:
    plan = Plan()
    preset_args = {
        "uniform": ["--preset", "uniform", "--experts", o.experts, "--rank", o.rank],
        "2468": ["--preset", "2468", "--rank", o.rank],
        "8642": ["--preset", "8642", "--rank", o.rank],
    }
    # The presets' rank-8 commands as in benchmarks/accuracy_smollm2.sh (no --rank at 8).
    if o.rank == 8:
        preset_args = {k: v[: v.index("--rank")] for k, v in preset_args.items()}
    for s in o.sets:
        for seed in o.seeds:
            tag = f"{s} seed {seed}"
            pre = ["--datasets", s, "--formulation", "rc", "--train-size", o.train_size]
            pre += ["--validation-size", o.validation_size, "--seed", seed]
            if o.test_size is not None:
                pre += ["--test-size", o.test_size]
            data = plan.add(cell("preprocess", pre, f"preprocess {tag}"))
            allocs = {
                name: plan.add(cell("allocate", [*a, "--base-model", base], f"allocate {name}"))
                for name, a in preset_args.items()
            }
            search = plan.add(
                cell(
                    "search",
                    [
                        "--dataset",
                        data,
                        "--base-model",
                        base,
                        "--steps",
                        o.search_steps,
                        "--batch-size",
                        4,
                        "--cutoff",
                        o.cutoff,
                        "--max-experts",
                        o.max_experts,
                        "--max-rank",
                        o.max_rank,
                        "--top-k",
                        2,
                        "--lora-lr",
                        "1e-3",
                        "--gsv-lr",
                        "0.01",
                        "--warmup-steps",
                        min(4, o.search_steps // 2),
                        "--target-like",
                        like_spec(o.experts, o.rank),
                        "--seed",
                        seed,
                        "--quiet",
                    ],  # fmt: skip
                    f"search {tag}",
                )
            )
            allocs["searched"] = plan.add(
                cell("allocate", ["--search", search], f"allocate searched {tag}")
            )
            for name, alloc in allocs.items():
                sft = plan.add(
                    cell(
                        "sft",
                        [
                            "--dataset",
                            data,
                            "--allocation",
                            alloc,
                            "--base-model",
                            base,
                            "--max-steps",
                            o.sft_steps,
                            "--batch-size",
                            8,
                            "--micro-batch-size",
                            8,
                            "--lr",
                            "1e-3",
                            "--warmup-steps",
                            4,
                            "--cutoff",
                            o.cutoff,
                            "--seed",
                            seed,
                            "--quiet",
                        ],  # fmt: skip
                        f"sft {name} {tag}",
                    )
                )
                ev = plan.add(
                    cell(
                        "evaluate",
                        [
                            "--dataset",
                            data,
                            "--adapter",
                            sft,
                            "--base-model",
                            base,
                            "--split",
                            "test",
                            "--batch-size",
                            16,
                        ],  # fmt: skip
                        f"evaluate {name} {tag}",
                    )
                )
                plan.evals[(s, seed, name)] = ev
                plan.allocs[(s, seed, name)] = alloc
    return plan


LEDGER = Path(__file__).resolve().parent / "results" / "allocation-quality"
KEPT = ("formulation", "split", "accuracy", "correct", "total", "acc_norm", "correct_norm")
KEPT_PER_QUESTION = ("id", "answer", "prediction", "correct", "prediction_norm", "correct_norm")


def record(ev: Cell, alloc: Cell, root: Path, ledger: Path) -> None:
    """Write LEDGER/EV.json (atomically): what the table needs of one evaluation."""
    report = read_report(ev.path(root))
    doc = {
        "evaluation_cell": ev.name,
        "allocation_cell": alloc.name,
        "trainable_parameters": read_artifact(alloc.path(root)).metadata["trainable_parameters"],
        "report": {
            **{k: report[k] for k in KEPT if k in report},
            "predictions": [
                {k: q[k] for k in KEPT_PER_QUESTION if k in q} for q in report["predictions"]
            ],
        },
    }
    ledger.mkdir(parents=True, exist_ok=True)
    tmp = ledger / f".{ev.name}.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    tmp.replace(ledger / f"{ev.name}.json")


def recorded(ev: Cell, ledger: Path) -> dict | None:
    try:
        return json.loads((ledger / f"{ev.name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def needed(plan: Plan, ledger: Path) -> set[str]:
    """The cells an unrecorded evaluation depends on (itself included)."""
    out: set[str] = set()
    todo = [ev for ev in plan.evals.values() if recorded(ev, ledger) is None]
    while todo:
        c = todo.pop()
        if c.name not in out:
            out.add(c.name)
            todo += [a for a in c.args if isinstance(a, Cell)]
    return out


def complete(c: Cell, root: Path) -> bool:
    try:
        read_artifact(c.path(root), kind=ARTIFACT_KINDS[c.stage])
    except (ArtifactError, FileNotFoundError, OSError):
        return False
    return True


def run_cell(c: Cell, root: Path, i: int, n: int) -> None:
    head = f"[{i}/{n}] {c.label}"
    if complete(c, root):
        print(f"{head} ... cached", file=sys.stderr, flush=True)
        return
    out = c.path(root)
    if out.exists():  # not a complete artifact (its checkpoints, OUT.ckpt, are kept)
        shutil.rmtree(out)
    print(f"{head} ...", file=sys.stderr, flush=True)
    cmd = c.command(root)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not complete(c, root):
        print(f"{head} failed (exit {r.returncode}): {shlex.join(cmd)}", file=sys.stderr)
        tail = (r.stdout + r.stderr).strip().splitlines()[-30:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(1)
    print(f"{head} ... {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def build_tiny_base(folder: Path) -> None:
    """SmolLM2's tokenizer and a random 4-layer LLaMA (as benchmarks/evaluate.py --tiny),
    saved as a model folder; written beside `folder` and renamed into place."""
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from guilomo.models import resolve_model

    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def analyse(o: argparse.Namespace, plan: Plan, ledger: Path) -> tuple[list[dict], dict]:
    key = METRIC_FIELD["acc"]
    cells, summary = [], {}
    for s in o.sets:
        reports = {}
        for seed in o.seeds:
            for name in ALLOCATIONS:
                ev = plan.evals[(s, seed, name)]
                doc = recorded(ev, ledger)
                rep = reports[(seed, name)] = doc["report"]
                params = doc["trainable_parameters"]
                cells.append(
                    {
                        "set": s,
                        "seed": seed,
                        "allocation": name,
                        "accuracy": rep["accuracy"],
                        "n": rep["total"],
                        "trainable_parameters": params,
                        "allocation_cell": doc["allocation_cell"],
                        "evaluation_cell": ev.name,
                    }
                )
        rows = {}
        for name in ALLOCATIONS:
            mine = [c for c in cells if c["set"] == s and c["allocation"] == name]
            params = [c["trainable_parameters"] for c in mine]
            rows[name] = {
                "accuracy": spread([c["accuracy"] for c in mine]),
                "trainable_parameters": max(params),
                "trainable_parameters_min": min(params),
            }
        best = max(HAND_MADE, key=lambda a: rows[a]["accuracy"]["mean"])
        right_best, right_searched = [], []
        for seed in o.seeds:
            a, b = reports[(seed, best)], reports[(seed, "searched")]
            compare_reports(a, b)  # refuses unless the same questions, in the same order
            right_best += [bool(q[key]) for q in a["predictions"]]
            right_searched += [bool(q[key]) for q in b["predictions"]]
        diff, lo, hi = paired_bootstrap(
            right_best, right_searched, resamples=o.resamples, seed=o.bootstrap_seed
        )
        pairs = list(zip(right_best, right_searched, strict=True))
        best_only = sum(x and not y for x, y in pairs)
        searched_only = sum(y and not x for x, y in pairs)
        acc_ok = rows["searched"]["accuracy"]["mean"] >= rows[best]["accuracy"]["mean"]
        budget = rows[best]["trainable_parameters"] * PARAMS_SLACK
        params_ok = rows["searched"]["trainable_parameters"] <= budget
        summary[s] = {
            "allocations": rows,
            "best_hand_made": best,
            "n_paired": len(pairs),
            "diff": diff,
            "diff_ci95": [lo, hi],
            "best_only_right": best_only,
            "searched_only_right": searched_only,
            "mcnemar_p": mcnemar_exact(best_only, searched_only),
            "accuracy_ok": acc_ok,
            "parameters_ok": params_ok,
            "goal_met": acc_ok and params_ok,
        }
    return cells, summary


def table(o: argparse.Namespace, summary: dict) -> str:
    seeds = len(o.seeds)
    lines = [
        f"| set | allocation | accuracy, mean ± std [min, max] over {seeds} seed(s) "
        "| trainable parameters | searched − best hand-made (pooled, paired) |",
        "|---|---|---|---:|---|",
    ]
    for s, sm in summary.items():
        for name in ALLOCATIONS:
            row = sm["allocations"][name]
            acc = row["accuracy"]
            cell_acc = (
                f"{100 * acc['mean']:.1f} ± {100 * acc['std']:.1f} "
                f"[{100 * acc['min']:.1f}, {100 * acc['max']:.1f}]"
            )
            params = f"{row['trainable_parameters']:,}"
            if row["trainable_parameters_min"] != row["trainable_parameters"]:
                params = f"{row['trainable_parameters_min']:,}–{params}"
            note = ""
            if name == sm["best_hand_made"]:
                note = "best hand-made"
            elif name == "searched":
                lo, hi = sm["diff_ci95"]
                p = sm["mcnemar_p"]
                note = (
                    f"{100 * sm['diff']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}], "
                    f"McNemar p = {p:.3f} (N={sm['n_paired']:,}; "
                    f"goal {'met' if sm['goal_met'] else 'not met'})"
                )
            lines.append(f"| {s} | {name} | {cell_acc} | {params} | {note} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sets", nargs="+", help="multiple-choice sets (default arc_easy sciq)")
    p.add_argument("--seeds", nargs="+", type=int, help="split, search and SFT seeds (0 1 2)")
    p.add_argument(
        "--root",
        default="runs/allocation-quality",
        help="the cells' folder (runs/allocation-quality)",
    )
    p.add_argument("--sft-steps", type=int, help="SFT optimiser steps (40)")
    p.add_argument("--search-steps", type=int, help="bilevel search steps (40)")
    p.add_argument("--train-size", type=int, help="train questions (300)")
    p.add_argument("--validation-size", type=int, help="validation questions, the search's (30)")
    p.add_argument("--test-size", type=int, help="cap on the test questions (default none)")
    p.add_argument("--cutoff", type=int, help="max tokens per example (160)")
    p.add_argument("--experts", type=int, help="the uniform preset's experts, the target (5)")
    p.add_argument("--rank", type=int, help="the presets' expert rank (8)")
    p.add_argument("--max-experts", type=int, help="the search's N_max (8)")
    p.add_argument("--max-rank", type=int, help="the search's R_max (8)")
    p.add_argument(
        "--ledger",
        help="folder of the finished evaluations' records (default: the repository's "
        "benchmarks/results/allocation-quality; with --tiny, ROOT/ledger)",
    )
    p.add_argument("--base-model", default="smollm2-135m", help="model folder, hub id or alias")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples")
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke run: a random 4-layer LLaMA with SmolLM2's tokenizer (built in --root), "
        "one set, one seed, 2 search and 2 SFT steps, 16 train, 8 validation and 16 test "
        "questions, cutoff 64, "
        "presets of rank 2 and the target uniform:2x2",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    o = p.parse_args(argv)
    defaults = {**FULL, **TINY} if o.tiny else FULL
    for k, v in defaults.items():
        if getattr(o, k) is None:
            setattr(o, k, v)
    if o.tiny:
        o.sets, o.seeds = o.sets[:1], o.seeds[:1]
    if o.ledger is None:
        o.ledger = Path(o.root) / "ledger" if o.tiny else LEDGER
    return o


def main(argv: list[str] | None = None) -> None:
    o = parse_args(argv)
    root, ledger = Path(o.root), Path(o.ledger)
    base: str | Ref = Ref(TINY_BASE) if o.tiny else o.base_model
    plan = build_plan(o, base)
    cells = list(plan.cells.values())
    todo = needed(plan, ledger)
    if o.dry_run:
        if o.tiny:
            print(f"# build the tiny base model in {Ref(TINY_BASE).path(root)}")
        for c in cells:
            if c.name in todo and not complete(c, root):
                print(shlex.join(c.command(root)))
        print(json.dumps({"dry_run": True, "cells": len(cells), "root": str(root)}))
        return
    root.mkdir(parents=True, exist_ok=True)
    if o.tiny and todo:
        build_tiny_base(Ref(TINY_BASE).path(root))
    t0 = time.perf_counter()
    allocs = {plan.evals[k].name: plan.allocs[k] for k in plan.evals}
    for i, c in enumerate(cells, 1):
        if c.name not in todo:
            print(f"[{i}/{len(cells)}] {c.label} ... cached", file=sys.stderr, flush=True)
            continue
        run_cell(c, root, i, len(cells))
        if c.name in allocs:
            record(c, allocs[c.name], root, ledger)
    cell_rows, summary = analyse(o, plan, ledger)
    print(table(o, summary))
    met = all(sm["goal_met"] for sm in summary.values())
    goal = f"searched >= best hand-made at <= {PARAMS_SLACK}x its parameters"
    print(f"\ngoal ({goal}): {'met' if met else 'not met'}")
    print(
        json.dumps(
            {
                "model": "tiny" if o.tiny else o.base_model,
                "sets": o.sets,
                "seeds": o.seeds,
                "target_like": like_spec(o.experts, o.rank),
                "root": str(root),
                "ledger": str(ledger),
                "wall_s": round(time.perf_counter() - t0, 1),
                "cells": cell_rows,
                "summary": summary,
                "goal_met": met,
            }
        )
    )


if __name__ == "__main__":
    main()
