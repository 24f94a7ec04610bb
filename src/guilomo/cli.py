"""The `guilomo` command line. Bad input exits with code 2 and a message, never a traceback."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import __version__
from .moe.config import Placement, RouterKind
from .threads import prepare_openmp

EXIT_BAD_INPUT = 2


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    keys = ("out", "steps", "batch_size", "seed", "preset", "placement", "router", "rank")
    r = run_demo(**{k: getattr(args, k) for k in keys}, progress=not args.quiet)
    print(
        f"\nguilomo demo: LoRA-MoE ({args.placement}, preset {args.preset}, router {args.router}) "
        f"teaches a frozen random LLaMA to sort digits"
    )
    print(f"{'metric':<22}{'base':>10}{'adapted':>10}")
    print(f"{'held-out loss':<22}{r.loss_before:>10.3f}{r.loss_after:>10.3f}")
    print(f"{'held-out exact match':<22}{r.accuracy_before:>10.1%}{r.accuracy_after:>10.1%}")
    print(f"trainable parameters  {r.trainable_params:,} (base {r.base_params:,}, frozen)")
    print("expert load (share of routed tokens), first and last adapted module:")
    names = list(r.router_stats)
    for name in dict.fromkeys([names[0], names[-1]]) if names else []:
        shares = " ".join(f"{s:.2f}" for s in r.router_stats[name])
        print(f"  {name:<40} {shares}")
    print(f"adapter saved to {r.adapter_dir}; reloaded logits identical: {r.reload_identical}")
    print(f"time {r.seconds:.1f}s")
    failed = not r.reload_identical or r.loss_after >= r.loss_before
    if failed:
        print(
            "demo FAILED: the adapter did not learn or did not reload identically", file=sys.stderr
        )
    return int(failed)


# ------------------------------------------------------------------ stages


def _add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> str:
    """One --option per top-level config field, help from the field; returns the help text
    of the nested fields, which are set as `section.field=value` (the run config's syntax)."""
    nested = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            for sub, f in ann.model_fields.items():
                text = textwrap.indent(textwrap.fill(_help(f), 82), " " * 6)
                nested.append(f"  {name}.{sub}=VALUE\n{text}")
            continue
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        # X of an optional `X | None`, or the Literal itself
        inner = ann if get_origin(ann) is Literal else next(iter(get_args(ann)), None)
        if get_origin(inner) is Literal:
            kw["choices"] = [str(c) for c in get_args(inner)]
        if get_origin(ann) in (list, tuple):
            kw["nargs"] = "+" if get_origin(ann) is list else len(get_args(ann))
        if get_origin(inner) is dict:
            kw |= {"nargs": "+", "metavar": "KEY=VALUE"}
        parser.add_argument(
            "--" + name.replace("_", "-"), help=_help(field).replace("%", "%%"), **kw
        )
    return "\n".join(nested)


def _help(field: FieldInfo) -> str:
    return f"{field.description or ''} (default: {field.get_default(call_default_factory=True)})"


def _stage_config(model: type[BaseModel], args: argparse.Namespace) -> BaseModel:
    """--config FILE, then the --options, then the key=value overrides."""
    from .config import apply_overrides, read_yaml, validated

    data = read_yaml(args.config) if args.config is not None else {}
    for key, value in vars(args).items():
        if key not in model.model_fields:
            continue
        if key == "preset" and isinstance(value, str):
            value = _parse_preset(value)
        if isinstance(value, list) and "dict" in str(model.model_fields[key].annotation):
            value = dict(v.split("=", 1) for v in value)
        data[key] = value
    data = apply_overrides(data, args.overrides)
    return validated(model, data, str(args.config) if args.config is not None else "")


def _run_stage(args: argparse.Namespace) -> int:
    import shutil

    from .distributed import init_distributed, world
    from .remote import StageIO, checkpoint_folder, is_remote, local_path
    from .stages import STAGES, Context

    stage = STAGES[args.stage]
    cfg = _stage_config(stage.config, args)
    ctx = Context(
        progress=not args.quiet,
        overwrite=args.overwrite,
        say=lambda text: print(f"{stage.name}: {text} -> {args.out}"),
    )
    with StageIO(args.out, overwrite=stage.replaces or args.overwrite) as io:
        uris = {i.name: getattr(args, i.name) for i in stage.inputs}
        inputs = {i.name: io.input(uris[i.name], i.kind) for i in stage.inputs}
        ctx.parents = [u for u in uris.values() if u is not None]
        if stage.checkpointed:
            init_distributed()
            uri = args.checkpoints or args.out.rstrip("/") + ".ckpt"
            remote = is_remote(uri)
            ctx.checkpoints = checkpoint_folder(uri) if remote else local_path(uri)
            ctx.checkpoint_uri = uri if remote else None
        stage.run(cfg, inputs, io.out_path, ctx)
        if world()[0] == 0:  # under torchrun, rank 0 writes the artifact
            io.publish()
            if ctx.checkpoints is not None and not args.keep_checkpoints:
                shutil.rmtree(ctx.checkpoints, ignore_errors=True)  # an s3:// mirror stays
    return 0


def _add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    from .stages import STAGES

    stage = sub.add_parser(
        "stage",
        help="run one pipeline stage without Kubeflow",
        description="Run one stage as plain Python. Each writes a verified artifact "
        "(payload + manifest.json, published atomically). Every artifact URI (--dataset, "
        "--allocation, --state, --adapter, --out, --checkpoints) is a local folder or "
        "s3://bucket/prefix; S3 is configured by AWS_ENDPOINT_URL, AWS_REGION, "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. S3 inputs are cached under "
        "$GUILOMO_CACHE (default ~/.cache/guilomo). Options are --flags or KEY=VALUE "
        "(dotted for nested sections: router.kind=soft), as in `guilomo run`.",
    )
    stages = stage.add_subparsers(dest="stage", required=True, metavar="NAME")
    for s in STAGES.values():
        p = stages.add_parser(
            s.name,
            help=s.help.split(";")[0].split(".")[0],
            description=textwrap.fill(s.help, 88),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", type=Path, help="YAML file of options (flags override it)")
        p.add_argument("--out", required=True, help=f"{s.output[1]} to write: folder or s3:// URI")
        for i in s.inputs:
            flags = ["--" + i.name] + (["--search"] if i.name == "state" else [])
            p.add_argument(*flags, dest=i.name, required=i.required, help=i.help)
        if s.checkpointed:
            p.add_argument(
                "--checkpoints",
                help="checkpoint folder, or an s3:// URI the stage pushes every checkpoint to and "
                "resumes from (default: OUT.ckpt)",
            )
            p.add_argument(
                "--keep-checkpoints",
                action="store_true",
                help="keep the local checkpoint folder once the artifact is published (it is "
                "removed by default; an s3:// --checkpoints mirror is always kept)",
            )
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if not s.replaces:
            p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
        p.set_defaults(func=_run_stage, overwrite=False)
        nested = _add_config_options(p, s.config)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="options as key=value")
        if nested:
            p.epilog = "nested options, as KEY=VALUE:\n" + nested


def _compare(args: argparse.Namespace) -> int:
    from .artifacts import ArtifactError
    from .artifacts.eval_report import read_report
    from .compare import compare_reports, format_comparison
    from .remote import fetch_artifact, is_remote

    reports = []
    for uri in (args.report_a, args.report_b):
        try:  # an s3:// report is downloaded (verified) into the cache, as stage inputs are
            reports.append(read_report(fetch_artifact(uri, kind="EvalReport")))
        except ArtifactError as exc:
            raise ArtifactError(f"{uri}: {exc}" if is_remote(uri) else str(exc)) from None
    cmp = compare_reports(*reports, metric=args.metric, resamples=args.resamples, seed=args.seed)
    print(format_comparison(cmp, args.report_a, args.report_b))
    return 0


def _compile(args: argparse.Namespace) -> int:
    from .pipeline import compile_all

    print(*compile_all(args.root), sep="\n")
    return 0


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="train a LoRA-MoE adapter end to end on a tiny model (about 25 s on 2 CPU cores)",
        description="Train a LoRA-MoE adapter on a frozen random 4-layer LLaMA to sort digits, "
        "report held-out accuracy before and after and the load of every expert, save the "
        "adapter and check that reloading it gives identical logits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the adapter")
    demo.add_argument("--steps", type=_positive, default=600, help="training steps")
    demo.add_argument("--batch-size", type=_positive, default=32, help="sequences per step")
    demo.add_argument("--seed", type=int, default=0, help="seed for model, data and init")
    demo.add_argument(
        "--preset",
        default="2468",
        help="MoLA allocation: uniform, 2468, 8642, or a per-layer list like [2,4,6,8]",
    )
    demo.add_argument(
        "--placement",
        choices=get_args(Placement),
        default="all",
        help="all projections (MoLA), mlp only (LoRAMoE), or mixlora",
    )
    demo.add_argument("--router", choices=get_args(RouterKind), default="topk", help="routing rule")
    demo.add_argument("--rank", type=_positive, default=8, help="rank of every expert")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    class _CompareFormatter(
        argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
    ):
        """Keeps the example output's lines; adds each option's default."""

    compare = sub.add_parser(
        "compare",
        help="compare two EvalReports of the same questions: difference, interval, p-value",
        description="""\
Compare two evaluations of the same questions: EvalReport folders or s3:// URIs,
e.g. a baseline A and a searched allocation B evaluated on one split. Reports of
different questions are refused (exit 2), naming the first question that differs.

It prints each accuracy with its 95% Wilson interval; B - A in points with a 95%
paired bootstrap interval (the questions resampled with replacement, the same ones
for A and B); and the exact McNemar test: how many questions only A and only B got
right, and the two-sided p-value of a split that lopsided if A and B were equally
good. An interval that contains 0, or a large p, means these questions cannot tell
A and B apart.

  A runs/eval-uniform: 41.2% [37.3, 45.3] (N=570, rc, acc)
  B runs/eval-2468: 43.9% [39.8, 48.0] (N=570, rc, acc)
  B - A: +2.6 points, 95% CI [-0.4, +5.6] (paired bootstrap, 10,000 resamples, seed 0)
  McNemar exact: A only right 31, B only right 46, p = 0.110""",
        formatter_class=_CompareFormatter,
    )
    compare.add_argument("report_a", metavar="REPORT_A", help="EvalReport A (the baseline)")
    compare.add_argument("report_b", metavar="REPORT_B", help="EvalReport B (compared to A)")
    compare.add_argument(
        "--metric",
        choices=["acc", "acc_norm"],
        default="acc",
        help="acc: the pick by summed score (or the generated answer); acc_norm: the pick by "
        "length-normalised score (the rc and mc formulations only)",
    )
    compare.add_argument("--resamples", type=_positive, default=10000, help="bootstrap resamples")
    compare.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    compare.set_defaults(func=_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guilomo",
        description="Fine-tune causal LMs with LoRA mixtures of experts whose expert counts and "
        "ranks are searched (GuiLoMo).",
    )
    parser.add_argument("--version", action="version", version=f"guilomo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_demo_parser(sub)
    _add_stage_parsers(sub)
    from .cli_runs import add_run_parsers
    from .images import add_image_parsers
    from .memory import add_memory_parser

    add_run_parsers(sub)
    add_image_parsers(sub)
    add_memory_parser(sub)
    compile_ = sub.add_parser(
        "compile",
        help="write the KFP component and pipeline YAML",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compile one Kubeflow Pipelines component per stage to ROOT/components/ and "
        "the whole DAG to ROOT/pipelines/guilomo.yaml (the committed copies are checked by a test).",
    )
    compile_.add_argument("--root", type=Path, default=Path("."), help="repository root")
    compile_.set_defaults(func=_compile)

    _add_compare_parser(sub)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parse_preset(text: str) -> str | list[int]:
    if text.startswith("["):
        try:
            return [int(v) for v in text.strip("[]").split(",")]
        except ValueError:
            raise ValueError(
                f"--preset {text!r}: a per-layer list holds integers, e.g. [2,4,6,8]"
            ) from None
    return text


def main(argv: list[str] | None = None) -> int:
    prepare_openmp()  # before anything imports torch
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may follow options (`rerun sft --from RUN sft.lr=1e-4`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # exits 2 with argparse's message
    from .runs import PipelineFailed  # not before the parse: `--help` does without it

    try:
        if args.command == "demo":
            args.preset = _parse_preset(args.preset)
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # ArtifactError, AdapterError, ValidationError
        name = args.command + (f" {args.stage}" if getattr(args, "stage", None) else "")
        print(f"guilomo {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PipelineFailed as exc:  # a task of a local run failed; the message has its log
        print(f"guilomo {args.command}: a pipeline task failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
