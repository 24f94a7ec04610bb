"""`guilomo run | submit | rerun | lineage`: whole pipeline runs (see `guilomo.runs`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `guilomo --help` does without it
    from . import runs

_CONFIG_HELP = (
    "run config: a YAML file, or the name of one shipped with guilomo (demo, the default; "
    "llama2-7b-scienceqa); sections preprocess, search, allocate, sft, evaluate take the "
    "options of `guilomo stage NAME --help`"
)
_ROOT_HELP = "local folder for artifacts (kfp/) and the MLflow sqlite store (mlflow.db)"
_VERBOSE_HELP = "show every task's full output (default: the stage lines; all of it goes to "
_VERBOSE_HELP += "ROOT/logs/<run>.log)"
_OVERRIDE_HELP = "overrides of the config, dotted: sft.max_steps=10 use_preset=true"
_RUN_HELP = "MLflow parent run id or name"
#: Options more than one command takes.
_SHARED: dict[str, dict[str, Any]] = {
    "--config": dict(type=Path, help=_CONFIG_HELP),
    "--root": dict(type=Path, default=Path("runs/pipeline"), help=_ROOT_HELP),
    "--experiment": dict(default="guilomo", help="MLflow experiment of RUN's name"),
    "--verbose": dict(action="store_true", help=_VERBOSE_HELP),
    "overrides": dict(nargs="*", metavar="KEY=VALUE", help=_OVERRIDE_HELP),
}


def _print(renderable: Any) -> None:
    """A rich table or tree; off a terminal, plain text as wide as it needs (no 80 columns)."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else 10_000
    Console(markup=False, highlight=False, width=width).print(renderable)


def _launch(
    args: argparse.Namespace, cfg: runs.RunConfig, what: str, rerun: runs.Rerun | None = None
) -> int:
    """Run `cfg` on this machine, or submit it to `--host`; say what came of it."""
    from . import runs

    if vars(args).get("host"):
        options = {k: vars(args).get(k) for k in ("image", "namespace", "service_account")}
        run_id, url, parent = runs.submit(cfg, host=args.host, rerun=rerun, **options)
        print(f"submitted KFP run {run_id}: {url}")
        untracked = "untracked: set MLFLOW_TRACKING_URI to the cluster's MLflow server to track it"
        print(f"MLflow parent run {parent}" if parent else untracked)
        return 0
    r = runs.run_local(cfg, root=args.root, rerun=rerun, verbose=args.verbose)
    print(f"\n{what}: done (log: {r.log_path})")
    _print(runs.summary_table(r))
    print(f"\nMLflow parent run {r.parent_run_id} at {r.tracking_uri} ({r.seconds:.0f}s in all)")
    if r.tracking_uri.startswith("sqlite:"):
        print(f"browse it: mlflow ui --backend-store-uri {r.tracking_uri}")
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run the five-stage DAG on this machine through kfp.local (the same pipeline function
    the cluster runs; each task is a subprocess). Every stage logs an MLflow child run under
    one parent run: to MLFLOW_TRACKING_URI when set, else to ROOT/mlflow.db. Ends with a
    table of stage, time, key metrics, artifact and run."""
    from . import runs

    cfg = runs.load_run_config(args.config, args.overrides)
    return _launch(args, cfg, f"guilomo run {cfg.name}")


def _submit(args: argparse.Namespace) -> int:
    """Submit the DAG with the run config's arguments to Kubeflow Pipelines (kfp.Client) and
    print the run's URL. With MLFLOW_TRACKING_URI set, the MLflow parent run is opened first
    and its id passed to every task. GPU pool: gpu_count, gpu_node_selector and
    gpu_tolerations in the config."""
    from . import runs

    cfg = runs.load_run_config(args.config, args.overrides)
    if args.gpu_pool:
        from .cluster import load_gpu_pool

        pool = load_gpu_pool(args.gpu_pools, args.gpu_pool)
        cfg = runs.load_run_config(None, [], base=cfg.model_dump(mode="json") | pool)
    return _launch(args, cfg, "")


def _rerun(args: argparse.Namespace) -> int:
    """Rerun STAGE (search, allocate, sft or evaluate) and the stages after it. The upstream
    artifacts are imported (dsl.importer) from the URIs the earlier run recorded in MLflow,
    and its run config is reused unless --config is given; KEY=VALUE overrides apply on top.
    Runs locally, or on the cluster with --host."""
    from . import runs
    from .tracking import resolve_pipeline_run

    if args.host is None:
        runs.default_tracking(args.root)
    earlier = resolve_pipeline_run(args.from_run, experiment=args.experiment)
    stage, imports = runs.rerun_plan(earlier, args.stage)
    base = None if args.config else runs.recorded_config(earlier)
    cfg = runs.load_run_config(args.config, args.overrides, base=base)
    for name, uri in imports.items():
        print(f"rerun {stage}: importing {name} from {uri}")
    return _launch(args, cfg, f"guilomo rerun {stage} --from {earlier}", (stage, imports, earlier))


def _lineage(args: argparse.Namespace) -> int:
    """Print, for RUN's evaluation and its evaluation of the base model, the chain from the
    score to the data and the base model it came from: every artifact's URI, kind, digest,
    config hash and code version, read from the artifacts' manifests."""
    from . import runs

    runs.default_tracking(args.root)
    for i, (rec, tree) in enumerate(runs.lineage(args.run, experiment=args.experiment)):
        m = rec.metrics
        score = " ".join(f"{k} {m[k]:.4f}" for k in ("accuracy", "acc_norm") if k in m)
        if "accuracy_ci95_low" in m:
            score += f" (95% CI {m['accuracy_ci95_low']:.4f}-{m['accuracy_ci95_high']:.4f})"
        print(
            ("\n" if i else "") + f"{rec.stage} score: {score} on {int(m.get('total', 0))} "
            f"questions, {rec.tags.get('guilomo.formulation', '?')} (MLflow run {rec.run_id})"
        )
        _print(tree)
    return 0


def add_run_parsers(sub: argparse._SubParsersAction) -> None:
    """`guilomo run`, `submit`, `rerun`, `lineage`; each described by its function's docstring."""

    def command(func: Any, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(func.__name__[1:], help=help, description=func.__doc__)
        parser.set_defaults(func=func)
        return parser

    def shared(parser: argparse.ArgumentParser, *names: str) -> None:
        for name in names:
            parser.add_argument(name, **_SHARED[name])

    run = command(_run, "run the whole pipeline on this machine (the demo when given no config)")
    shared(run, "--config", "--root", "--verbose", "overrides")

    submit = command(_submit, "compile the pipeline and submit it to a Kubeflow Pipelines endpoint")
    submit.add_argument(
        "--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui"
    )
    shared(submit, "--config")
    image_help = "image for every task instead of guilomo:<version> (tag or @sha256 digest)"
    submit.add_argument("--image", help=image_help)
    submit.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    account_help = "service account of the pipeline pods (the chart's: guilomo-pipeline)"
    submit.add_argument("--service-account", help=account_help)
    pool_help = "a GPU pool from --gpu-pools: its node selector, tolerations, GPU count"
    submit.add_argument("--gpu-pool", help=pool_help)
    pools_help = "the chart's pool list: kubectl get configmap guilomo-gpu-pools -o jsonpath="
    pools_help += "'{.data.gpu-pools\\.yaml}' > gpu-pools.yaml"
    submit.add_argument("--gpu-pools", type=Path, default=Path("gpu-pools.yaml"), help=pools_help)
    shared(submit, "overrides")

    rerun_help = "rerun one stage and everything downstream, reusing an earlier run's artifacts"
    rerun = command(_rerun, rerun_help)
    rerun.add_argument("stage", metavar="STAGE", help="search, allocate, sft or evaluate")
    rerun.add_argument("--from", dest="from_run", required=True, metavar="RUN", help=_RUN_HELP)
    rerun.add_argument("--config", type=Path, help="run config YAML (default: the earlier run's)")
    shared(rerun, "--root")
    rerun.add_argument("--host", help="submit to this KFP endpoint instead of running locally")
    shared(rerun, "--experiment", "--verbose", "overrides")

    lineage = command(_lineage, "trace a run's evaluation score back to its dataset digest")
    lineage.add_argument("run", metavar="RUN", help=_RUN_HELP)
    shared(lineage, "--root", "--experiment")
