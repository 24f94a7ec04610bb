"""`guilomo run | submit | rerun | lineage`: whole pipeline runs (see `guilomo.runs`)."""

from __future__ import annotations

import argparse
from pathlib import Path

_CONFIG_HELP = (
    "run config: a YAML file, or the name of one shipped with guilomo (demo, the default; "
    "llama2-7b-scienceqa); sections preprocess, search, allocate, sft, evaluate take the "
    "options of `guilomo stage NAME --help`"
)
_VERBOSE_HELP = (
    "show every task's full output (default: the stage lines; all of it goes to "
    "ROOT/logs/<run>.log)"
)
_OVERRIDE_HELP = "overrides of the config, dotted: sft.max_steps=10 use_preset=true"


def _print_summary(summary, heading: str) -> None:  # noqa: ANN001
    from .runs import summary_table

    print(f"\n{heading}" + (f" (log: {summary.log_path})" if summary.log_path else ""))
    print(summary_table(summary))
    print(
        f"\nMLflow parent run {summary.parent_run_id} at {summary.tracking_uri} "
        f"({summary.seconds:.0f}s in all)"
    )
    if summary.tracking_uri.startswith("sqlite:"):
        print(f"browse it: mlflow ui --backend-store-uri {summary.tracking_uri}")


def _run(args: argparse.Namespace) -> int:
    from .runs import load_run_config, run_local

    cfg = load_run_config(args.config, args.overrides)
    summary = run_local(cfg, root=args.root, verbose=args.verbose)
    _print_summary(summary, f"guilomo run {cfg.name}: done")
    return 0


def _rerun(args: argparse.Namespace) -> int:
    from .runs import load_run_config, recorded_config, rerun_plan, run_local, submit
    from .tracking import resolve_pipeline_run

    if args.host is None:
        from .runs import default_tracking

        default_tracking(args.root)
    earlier = resolve_pipeline_run(args.from_run, experiment=args.experiment)
    stage, imports = rerun_plan(earlier, args.stage)
    base = recorded_config(earlier)
    cfg = load_run_config(args.config, args.overrides, base=None if args.config else base)
    for name, uri in imports.items():
        print(f"rerun {stage}: importing {name} from {uri}")
    if args.host:
        run_id, url, parent = submit(cfg, host=args.host, rerun=(stage, imports, earlier))
        print(f"submitted KFP run {run_id}: {url}" + (f" (MLflow run {parent})" if parent else ""))
        return 0
    summary = run_local(cfg, root=args.root, rerun=(stage, imports, earlier), verbose=args.verbose)
    _print_summary(summary, f"guilomo rerun {stage} --from {earlier}: done")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from .runs import load_run_config, submit

    cfg = load_run_config(args.config, args.overrides)
    if args.gpu_pool:
        from .cluster import load_gpu_pool

        pool = load_gpu_pool(args.gpu_pools, args.gpu_pool)
        cfg = load_run_config(None, [], base=cfg.model_dump(mode="json") | pool)
    run_id, url, parent = submit(
        cfg,
        host=args.host,
        image=args.image,
        namespace=args.namespace,
        service_account=args.service_account,
    )
    print(f"submitted KFP run {run_id}: {url}")
    print(
        f"MLflow parent run {parent}"
        if parent
        else "untracked: set MLFLOW_TRACKING_URI to the cluster's MLflow server to track it"
    )
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from .runs import default_tracking, lineage, render_lineage

    default_tracking(args.root)
    for i, (rec, tree) in enumerate(lineage(args.run, experiment=args.experiment)):
        m = rec.metrics
        score = " ".join(f"{k} {m[k]:.4f}" for k in ("accuracy", "acc_norm") if k in m)
        if "accuracy_ci95_low" in m:
            score += f" (95% CI {m['accuracy_ci95_low']:.4f}-{m['accuracy_ci95_high']:.4f})"
        total = int(m.get("total", 0))
        formulation = rec.tags.get("guilomo.formulation", "?")
        print(
            ("\n" if i else "") + f"{rec.stage} score: {score} on {total} questions, "
            f"{formulation} (MLflow run {rec.run_id})"
        )
        print("\n".join(render_lineage(tree)))
    return 0


_ROOT_HELP = "local folder for artifacts (kfp/) and the MLflow sqlite store (mlflow.db)"


def add_run_parsers(sub: argparse._SubParsersAction) -> None:
    """`guilomo run`, `submit`, `rerun` and `lineage`."""
    for add in (_add_run, _add_submit, _add_rerun, _add_lineage):
        add(sub)


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run the whole pipeline on this machine (the demo when given no config)",
        description=(
            "Run the five-stage DAG on this machine through kfp.local (the same pipeline "
            "function the cluster runs; each task is a subprocess). Every stage logs an MLflow "
            "child run under one parent run: to MLFLOW_TRACKING_URI when set, else to "
            "ROOT/mlflow.db. Ends with a table of stage, time, key metrics, artifact and run."
        ),
    )
    run.add_argument("--config", type=Path, help=_CONFIG_HELP)
    run.add_argument("--root", type=Path, default=Path("runs/pipeline"), help=_ROOT_HELP)
    run.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP)
    run.set_defaults(func=_run)


def _add_submit(sub: argparse._SubParsersAction) -> None:
    submit = sub.add_parser(
        "submit",
        help="compile the pipeline and submit it to a Kubeflow Pipelines endpoint",
        description=(
            "Submit the DAG with the run config's arguments to Kubeflow Pipelines (kfp.Client) "
            "and print the run's URL. With MLFLOW_TRACKING_URI set, the MLflow parent run is "
            "opened first and its id passed to every task. GPU pool: gpu_count, "
            "gpu_node_selector and gpu_tolerations in the config."
        ),
    )
    submit.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui"
    )
    submit.add_argument("--config", type=Path, help=_CONFIG_HELP)
    submit.add_argument(
        "--image", help="image for every task instead of guilomo:<version> (tag or @sha256 digest)"
    )
    submit.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    submit.add_argument(
        "--service-account",
        help="service account of the pipeline pods (the chart's: guilomo-pipeline)",
    )
    submit.add_argument(
        "--gpu-pool", help="a GPU pool from --gpu-pools: its node selector, tolerations, GPU count"
    )
    submit.add_argument(
        "--gpu-pools",
        type=Path,
        default=Path("gpu-pools.yaml"),
        help="the chart's pool list: kubectl get configmap guilomo-gpu-pools "
        "-o jsonpath='{.data.gpu-pools\\.yaml}' > gpu-pools.yaml",
    )
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP)
    submit.set_defaults(func=_submit)


def _add_rerun(sub: argparse._SubParsersAction) -> None:
    rerun = sub.add_parser(
        "rerun",
        help="rerun one stage and everything downstream, reusing an earlier run's artifacts",
        description=(
            "Rerun STAGE (search, allocate, sft or evaluate) and the stages after it. The "
            "upstream artifacts are imported (dsl.importer) from the URIs the earlier run "
            "recorded in MLflow, and its run config is reused unless --config is given; "
            "KEY=VALUE overrides apply on top. Runs locally, or on the cluster with --host."
        ),
    )
    rerun.add_argument("stage", metavar="STAGE", help="search, allocate, sft or evaluate")
    rerun.add_argument(
        "--from", dest="from_run", required=True, metavar="RUN", help="MLflow parent run id or name"
    )
    rerun.add_argument("--config", type=Path, help="run config YAML (default: the earlier run's)")
    rerun.add_argument("--root", type=Path, default=Path("runs/pipeline"), help=_ROOT_HELP)
    rerun.add_argument("--host", help="submit to this KFP endpoint instead of running locally")
    rerun.add_argument("--experiment", default="guilomo", help="MLflow experiment of RUN's name")
    rerun.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    rerun.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP)
    rerun.set_defaults(func=_rerun)


def _add_lineage(sub: argparse._SubParsersAction) -> None:
    lin = sub.add_parser(
        "lineage",
        help="trace a run's evaluation score back to its dataset digest",
        description=(
            "Print, for RUN's evaluation and its evaluation of the base model, the chain from "
            "the score to the data and the base model it came from: every "
            "artifact's URI, kind, digest, config hash and code version, read from the "
            "artifacts' manifests."
        ),
    )
    lin.add_argument("run", metavar="RUN", help="MLflow parent run id or name")
    lin.add_argument("--root", type=Path, default=Path("runs/pipeline"), help=_ROOT_HELP)
    lin.add_argument("--experiment", default="guilomo", help="MLflow experiment of RUN's name")
    lin.set_defaults(func=_lineage)
