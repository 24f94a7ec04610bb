"""The `guilomo` command line. Bad input exits with code 2 and a message, never a traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ValidationError

from . import __version__
from .artifacts import ArtifactError
from .moe.config import Placement, RouterKind
from .runs import PipelineFailed, read_yaml

EXIT_BAD_INPUT = 2


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(
        out=args.out,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        preset=args.preset,
        placement=args.placement,
        router=args.router,
        rank=args.rank,
        progress=not args.quiet,
    )
    rows = [
        ("held-out loss", f"{r.loss_before:.3f}", f"{r.loss_after:.3f}"),
        ("held-out exact match", f"{r.accuracy_before:.1%}", f"{r.accuracy_after:.1%}"),
    ]
    print(
        f"\nguilomo demo: LoRA-MoE ({args.placement}, preset {args.preset}, router {args.router}) "
        f"teaches a frozen random LLaMA to sort digits"
    )
    print(f"{'metric':<22}{'base':>10}{'adapted':>10}")
    for name, a, b in rows:
        print(f"{name:<22}{a:>10}{b:>10}")
    print(f"trainable parameters  {r.trainable_params:,} (base {r.base_params:,}, frozen)")
    print("expert load (share of routed tokens), first and last adapted module:")
    names = list(r.router_stats)
    for name in dict.fromkeys([names[0], names[-1]]) if names else []:
        shares = " ".join(f"{s:.2f}" for s in r.router_stats[name])
        print(f"  {name:<40} {shares}")
    print(f"adapter saved to {r.adapter_dir}; reloaded logits identical: {r.reload_identical}")
    print(f"time {r.seconds:.1f}s")
    if not r.reload_identical or r.loss_after >= r.loss_before:
        print(
            "demo FAILED: the adapter did not learn or did not reload identically", file=sys.stderr
        )
        return 1
    return 0


# ------------------------------------------------------------------ config options


def _add_config_options(
    parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = ""
) -> None:
    """One --option per config field (nested models as --router.kind), help from the field."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        dest = prefix + name
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _add_config_options(parser, ann, prefix=dest + ".")
            continue
        default = field.get_default(call_default_factory=True)
        kw: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
        args = [a for a in get_args(ann) if a is not type(None)]
        if get_origin(ann) is Literal or (args and get_origin(args[0]) is Literal):
            kw["choices"] = [
                str(c) for c in get_args(ann if get_origin(ann) is Literal else args[0])
            ]
        if get_origin(ann) is list or get_origin(ann) is tuple:
            kw["nargs"] = "+" if get_origin(ann) is list else len(get_args(ann))
        if args and get_origin(args[0]) is dict:
            kw["nargs"] = "+"
            kw["metavar"] = "KEY=VALUE"
        help_text = (field.description or "").replace("%", "%%")
        kw["help"] = f"{help_text} (default: {default})"
        parser.add_argument("--" + dest.replace("_", "-"), **kw)


def _config_from_args(
    model: type[BaseModel], args: argparse.Namespace, file: Path | None
) -> BaseModel:
    data: dict[str, Any] = {}
    if file is not None:
        data = read_yaml(file)
    for key, value in vars(args).items():
        if key.split(".")[0] not in model.model_fields:
            continue
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, str) and "=" in v for v in value)
        ):
            field = model.model_fields.get(key)
            if field is not None and "dict" in str(field.annotation):
                value = dict(v.split("=", 1) for v in value)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(config)"
        source = f"{file}: " if file is not None else ""
        raise ValueError(f"{source}{where}: {err['msg']} (got {err.get('input')!r})") from None


# ------------------------------------------------------------------ stages


def _stage_preprocess(args: argparse.Namespace) -> int:
    from .artifacts import read_artifact
    from .remote import StageIO
    from .stages.preprocess import PreprocessConfig, run_preprocess

    cfg = _config_from_args(PreprocessConfig, args, args.config)
    with StageIO(args.out, overwrite=args.overwrite) as io:
        m = read_artifact(run_preprocess(cfg, io.out_path, overwrite=args.overwrite))
        io.publish()
    print(f"preprocess: {m.metadata['counts']} -> {args.out}")
    return 0


def _stage_checkpoints(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The local checkpoint folder and, for an s3:// --checkpoints (default: OUT.ckpt, beside
    an s3:// OUT), the URI it mirrors."""
    from .remote import checkpoint_folder, is_remote, local_path

    uri = args.checkpoints or args.out.rstrip("/") + ".ckpt"
    if is_remote(uri):
        return checkpoint_folder(uri), uri
    return local_path(uri), None


def _stage_search(args: argparse.Namespace) -> int:
    from .distributed import init_distributed, world
    from .remote import StageIO
    from .stages.search import SearchConfig, run_search_stage

    cfg = _config_from_args(SearchConfig, args, args.config)
    with StageIO(args.out, overwrite=True) as io:
        dataset = io.input(args.dataset, "PreparedDataset")
        init_distributed()
        ckpt, ckpt_uri = _stage_checkpoints(args)
        r = run_search_stage(
            cfg,
            dataset=dataset,
            out=io.out_path,
            checkpoints=ckpt,
            checkpoint_uri=ckpt_uri,
            parents=[args.dataset],
            progress=not args.quiet,
        )
        if world()[0] == 0:  # under torchrun, rank 0 writes the state
            io.publish()
    print(f"search: {r.steps} steps (resumed from {r.resumed_from}) -> {args.out}")
    return 0


def _stage_allocate(args: argparse.Namespace) -> int:
    from .remote import StageIO
    from .stages.allocate import AllocateConfig, run_allocate

    cfg = _config_from_args(AllocateConfig, args, args.config)
    reference = None
    if args.reference_expert or args.reference_rank:
        if not (args.reference_expert and args.reference_rank):
            raise ValueError("--reference-expert and --reference-rank go together")
        reference = (args.reference_expert, args.reference_rank)
    with StageIO(args.out, overwrite=args.overwrite) as io:
        search = io.input(args.search, "SearchState")
        alloc, params = run_allocate(
            cfg, io.out_path, search=search, reference=reference, overwrite=args.overwrite
        )
        io.publish()
    s = alloc.summary()
    print(
        f"allocate: {s['modules']} modules, {s['experts']} experts, total rank {s['total_rank']}, "
        f"{params:,} trainable parameters -> {args.out}"
        if params
        else f"allocate: {s} -> {args.out}"
    )
    return 0


def _stage_sft(args: argparse.Namespace) -> int:
    from .artifacts.allocation import read_allocation
    from .distributed import init_distributed, world
    from .remote import StageIO
    from .stages.sft import SftConfig, run_sft

    cfg = _config_from_args(SftConfig, args, args.config)
    with StageIO(args.out, overwrite=True) as io:
        dataset = io.input(args.dataset, "PreparedDataset")
        alloc = read_allocation(io.input(args.allocation, "Allocation"))
        init_distributed()
        ckpt, ckpt_uri = _stage_checkpoints(args)
        r = run_sft(
            cfg,
            dataset=dataset,
            allocation=alloc,
            out=io.out_path,
            checkpoints=ckpt,
            checkpoint_uri=ckpt_uri,
            parents=[args.dataset, args.allocation],
            progress=not args.quiet,
        )
        if world()[0] == 0:  # under torchrun, rank 0 writes the adapter
            io.publish()
    print(
        f"sft: {r.steps} steps (resumed from {r.resumed_from}), final loss "
        f"{r.losses[-1]:.4f}, {r.tokens_per_second:,.0f} tokens/s -> {args.out}"
    )
    return 0


def _stage_evaluate(args: argparse.Namespace) -> int:
    from .remote import StageIO
    from .stages.evaluate import EvalConfig, headline, run_evaluate

    cfg = _config_from_args(EvalConfig, args, args.config)
    with StageIO(args.out, overwrite=True) as io:
        dataset = io.input(args.dataset, "PreparedDataset")
        adapter = io.input(args.adapter, "Adapter")
        parents = [args.dataset] + ([args.adapter] if args.adapter else [])
        report = run_evaluate(
            cfg, dataset=dataset, out=io.out_path, adapter=adapter, parents=parents
        )
        io.publish()
    print(f"evaluate: {headline(report)} -> {args.out}")
    return 0


def _add_stage_parsers(sub: argparse._SubParsersAction) -> None:
    from .config import AllocateConfig, EvalConfig, PreprocessConfig, SearchConfig, SftConfig

    stage = sub.add_parser(
        "stage",
        help="run one pipeline stage without Kubeflow",
        description="Run one stage as plain Python. Each writes a verified artifact "
        "(payload + manifest.json, published atomically). Every artifact URI (--dataset, "
        "--allocation, --search, --adapter, --out, --checkpoints) is a local folder or "
        "s3://bucket/prefix; S3 is configured by AWS_ENDPOINT_URL, AWS_REGION, "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. S3 inputs are cached under "
        "$GUILOMO_CACHE (default ~/.cache/guilomo).",
    )
    stages = stage.add_subparsers(dest="stage", required=True, metavar="NAME")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML file of options (flags override it)")
    common.add_argument("--out", required=True, help="artifact to write: folder or s3:// URI")

    specs = [
        (
            "preprocess",
            PreprocessConfig,
            _stage_preprocess,
            "Read raw data (ScienceQA, instruction data, multiple-choice sets), split it seeded "
            "into train / validation / test, and write a PreparedDataset.",
        ),
        (
            "search",
            SearchConfig,
            _stage_search,
            "Bilevel GSV search: LoRA weights on the train split, GSVs on the validation split; "
            "checkpoints as it goes and resumes; runs under torchrun for several GPUs (each "
            "process takes its rows of every batch); writes a SearchState with GSV plots.",
        ),
        (
            "allocate",
            AllocateConfig,
            _stage_allocate,
            "Turn a SearchState (optionally under a parameter budget), a MoLA preset, or the "
            "reference code's expert.json / rank.json into an Allocation with heatmaps.",
        ),
        (
            "sft",
            SftConfig,
            _stage_sft,
            "Train a LoRA-MoE built from an Allocation on a PreparedDataset; checkpoints every N "
            "steps and resumes; runs under torchrun for several GPUs (DDP, or FSDP with "
            "--parallel fsdp for bases too large for one GPU). Writes an Adapter.",
        ),
        (
            "evaluate",
            EvalConfig,
            _stage_evaluate,
            "Evaluate the base model, or the base plus an Adapter, on a split, in the "
            "dataset's formulation (rc / mc: each option scored by log-likelihood, as "
            "lm-evaluation-harness does; generate: greedy decoding and 'The answer is X'). "
            "Reports every accuracy with its N and 95% Wilson interval, the predicted answers "
            "and the majority-answer baseline. Writes an EvalReport.",
        ),
    ]
    for name, model, func, text in specs:
        p = stages.add_parser(
            name, parents=[common], help=text.split(";")[0].split(".")[0], description=text
        )
        if name in ("search", "sft", "evaluate"):
            p.add_argument("--dataset", required=True, help="PreparedDataset: folder or s3:// URI")
        if name in ("search", "sft"):
            p.add_argument(
                "--checkpoints",
                help="checkpoint folder, or an s3:// URI the stage pushes every checkpoint to and "
                "resumes from (default: OUT.ckpt)",
            )
        if name == "sft":
            p.add_argument("--allocation", required=True, help="Allocation: folder or s3:// URI")
        if name == "evaluate":
            p.add_argument(
                "--adapter", help="Adapter: folder or s3:// URI (omit for the base model)"
            )
        if name == "allocate":
            p.add_argument("--search", help="SearchState: folder or s3:// URI")
            p.add_argument("--reference-expert", type=Path, help="the reference code's expert.json")
            p.add_argument("--reference-rank", type=Path, help="the reference code's rank.json")
        if name in ("preprocess", "allocate"):
            p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
        if name in ("search", "sft"):
            p.add_argument("--quiet", action="store_true", help="no progress bar")
        _add_config_options(p, model)
        p.set_defaults(func=func)


def _compare(args: argparse.Namespace) -> int:
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

    for path in compile_all(args.root):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guilomo",
        description=(
            "Fine-tune causal LMs with LoRA mixtures of experts whose expert counts and ranks "
            "are searched (GuiLoMo)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"guilomo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="train a LoRA-MoE adapter end to end on a tiny model (about a minute on CPU)",
        description=(
            "Train a LoRA-MoE adapter on a frozen random 4-layer LLaMA to sort digits, report "
            "held-out accuracy before and after and the load of every expert, save the adapter "
            "and check that reloading it gives identical logits."
        ),
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
    _add_stage_parsers(sub)
    from .cli_runs import add_run_parsers
    from .images import add_image_parsers

    add_run_parsers(sub)
    add_image_parsers(sub)
    comp = sub.add_parser(
        "compile",
        help="write the KFP component and pipeline YAML",
        description="Compile one Kubeflow Pipelines component per stage to ROOT/components/ and "
        "the whole DAG to ROOT/pipelines/guilomo.yaml (the committed copies are checked by a test).",
    )
    comp.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    comp.set_defaults(func=_compile)

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
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides may follow options (`rerun sft --from RUN sft.lr=1e-4`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.parse_args(argv)  # exits 2 with argparse's message
    try:
        if getattr(args, "preset", None) is not None:
            args.preset = _parse_preset(args.preset)
        return args.func(args)
    except (
        ArtifactError,
        ValidationError,
        ValueError,
        FileNotFoundError,
    ) as exc:  # AdapterError too
        name = args.command + (f" {args.stage}" if getattr(args, "stage", None) else "")
        print(f"guilomo {name}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PipelineFailed as exc:  # a task of a local run failed; the message has its log
        print(f"guilomo {args.command}: a pipeline task failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
