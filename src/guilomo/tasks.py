"""What each KFP component runs: one stage, tracked as an MLflow child run.

The components in `guilomo.pipeline` are thin (KFP serialises their source); everything they
do lives here, as plain functions that tests call without KFP. Each task

1. validates its config (pydantic) and opens its `StageTracker`, which checks that the MLflow
   server answers *before* any model is loaded;
2. runs the stage's `run_*` function, logging per-step metrics;
3. records its output artifact's URI and digest, key metrics and plots on the child run.

`Io` pairs the local path a task reads or writes (KFP's `artifact.path`) with the artifact's
URI (KFP's `artifact.uri`: `s3://...` on a cluster), so manifests and MLflow name URIs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .tracking import StageTracker

#: Environment variable with the image the task runs in (set by the chart / `guilomo image`).
IMAGE_ENV = "GUILOMO_IMAGE"
#: Default checkpoint root when the pipeline passes none (set by the chart's ConfigMap).
CHECKPOINT_ROOT_ENV = "GUILOMO_CHECKPOINT_ROOT"
#: Metric each task logs: seconds inside the stage's own `run_*` (model load and compute),
#: against which `benchmarks/pipeline.py` measures process start, imports, storage, tracking.
COMPUTE = "compute_seconds"


@dataclass(frozen=True)
class Io:
    path: Path
    uri: str

    @classmethod
    def of(cls, artifact: Any) -> Io:
        """From a KFP artifact object (anything with `.path` and `.uri`)."""
        return cls(Path(artifact.path), str(artifact.uri or artifact.path))


@dataclass(frozen=True)
class Tracking:
    """Who is running: the MLflow parent run and the KFP run / task ids (may be empty)."""

    parent_run_id: str = ""
    kfp_run: str = ""
    kfp_task: str = ""
    gpus: int | None = None
    checkpoint_root: str = ""

    def tags(self) -> dict[str, str]:
        from . import __version__

        tags = {
            "kfp.run_id": self.kfp_run,
            "kfp.task_id": self.kfp_task,
            "guilomo.image": os.environ.get(IMAGE_ENV, f"guilomo:{__version__}"),
        }
        if self.gpus is not None:
            tags["guilomo.gpus"] = str(self.gpus)
        return {k: v for k, v in tags.items() if v}

    def checkpoint_uri(self, stage: str) -> str | None:
        """Where a long stage mirrors its checkpoints: `<root>/<kfp run>/<stage>`, stable
        across retries of the same run, so a retried pod resumes."""
        root = self.checkpoint_root or os.environ.get(CHECKPOINT_ROOT_ENV, "")
        if not root:
            return None
        return f"{root.rstrip('/')}/{self.kfp_run or 'local'}/{stage}"

    def tracker(self, stage: str, config: Any, inputs: dict[str, Io]) -> StageTracker:
        return StageTracker(
            stage,
            self.parent_run_id,
            config=config,
            inputs={k: v.uri for k, v in inputs.items()},
            tags=self.tags(),
        )


def _say(msg: str) -> None:
    print(f"[guilomo] {msg}", file=sys.stderr, flush=True)


def preprocess_task(config: dict, out: Io, tracking: Tracking) -> dict[str, Any]:
    from .artifacts import read_artifact
    from .stages.preprocess import PreprocessConfig, run_preprocess

    cfg = PreprocessConfig.model_validate(config)
    with tracking.tracker("preprocess", cfg, {}) as tr:
        t0 = time.perf_counter()
        run_preprocess(cfg, out.path, overwrite=True)
        tr.log_metrics({COMPUTE: time.perf_counter() - t0})
        counts = read_artifact(out.path).metadata.get("counts", {})
        tr.log_metrics({f"rows.{k}": float(v) for k, v in counts.items()})
        tr.log_output("dataset", out.uri)
    _say(f"preprocess: {counts} -> {out.uri}")
    return counts


def search_task(config: dict, dataset: Io, out: Io, tracking: Tracking) -> int:
    """With `tracking.gpus` > 1 (and not yet under torchrun), the task runs itself again under
    torchrun, one process per GPU of the node; rank 0 tracks and writes the state."""
    if _under_torchrun("search", tracking, config=config, dataset=dataset, out=out):
        from .artifacts import read_artifact

        return int(read_artifact(out.path).metadata["steps"])

    from .distributed import world
    from .stages.search import SearchConfig, run_search_stage

    cfg = SearchConfig.model_validate(config)
    tracking = _rank_tracking(tracking)
    with tracking.tracker("search", cfg, {"dataset": dataset}) as tr:
        t0 = time.perf_counter()
        result = run_search_stage(
            cfg,
            dataset=dataset.path,
            out=out.path,
            checkpoints=out.path.with_name(out.path.name + ".ckpt"),
            checkpoint_uri=tracking.checkpoint_uri("search"),
            parents=[dataset.uri],
            on_step=lambda step, m: tr.log_metrics(m, step=step),
            progress=False,
        )
        if world()[0] == 0:
            tr.log_metrics({COMPUTE: time.perf_counter() - t0})
            tr.log_output("state", out.uri)
            tr.log_artifacts(sorted((out.path / "plots").glob("*.png")))
    _say(f"search: {result.steps} steps (resumed from {result.resumed_from}) -> {out.uri}")
    return result.steps


def allocate_task(config: dict, state: Io | None, out: Io, tracking: Tracking) -> int | None:
    """`state` None: the preset in `config` (the MoLA baseline, no search)."""
    from .stages.allocate import AllocateConfig, run_allocate

    cfg = AllocateConfig.model_validate(config)
    inputs = {"state": state} if state is not None else {}
    stage = "allocate" if state is not None else "preset"
    with tracking.tracker(stage, cfg, inputs) as tr:
        t0 = time.perf_counter()
        alloc, params = run_allocate(
            cfg,
            out.path,
            search=state.path if state else None,
            overwrite=True,
            parents=[state.uri] if state else None,
        )
        tr.log_metrics({COMPUTE: time.perf_counter() - t0})
        summary = alloc.summary()
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        if params is not None:
            metrics["trainable_parameters"] = float(params)
        tr.log_metrics(metrics)
        tr.log_output("allocation", out.uri)
        tr.log_artifacts(sorted((out.path / "plots").glob("*.png")))
    _say(f"{stage}: {summary} -> {out.uri}")
    return params


def torchrun_command(task: str, nproc: int, args_file: Path) -> list[str]:
    """The command that reruns `task` on `nproc` processes of this node (one per GPU)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "guilomo.tasks",
        task,
        str(args_file),
    ]


def _under_torchrun(task: str, tracking: Tracking, **kwargs: Any) -> bool:
    """With `tracking.gpus` > 1 and not yet under torchrun: run `task` again under torchrun,
    one process per GPU, with the same arguments (JSON in a temporary file), and return
    True; a failed rank fails the task. Otherwise return False: this process does the work."""
    if (tracking.gpus or 0) <= 1 or "WORLD_SIZE" in os.environ:
        return False
    import json
    import subprocess
    import tempfile

    def plain(v: Any) -> Any:
        if isinstance(v, Io):
            return {"path": str(v.path), "uri": v.uri}
        if isinstance(v, Tracking):
            return {"tracking": v.__dict__}
        return v

    nproc = int(tracking.gpus)
    with tempfile.TemporaryDirectory() as tmp:
        args_file = Path(tmp) / "args.json"
        args = {k: plain(v) for k, v in kwargs.items()} | {"tracking": plain(tracking)}
        args_file.write_text(json.dumps(args))
        cmd = torchrun_command(task, nproc, args_file)
        _say(f"{task}: {nproc} processes: {' '.join(cmd)}")
        code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise RuntimeError(f"{task} under torchrun failed with exit code {code}; see the log above")
    return True


def _rank_tracking(tracking: Tracking) -> Tracking:
    """Join torchrun's process group (if any); only rank 0 tracks: one child run per stage."""
    from .distributed import init_distributed, world

    init_distributed()
    return tracking if world()[0] == 0 else replace(tracking, parent_run_id="")


def _from_args_file(path: Path) -> dict[str, Any]:
    import json

    def typed(v: Any) -> Any:
        if isinstance(v, dict) and set(v) == {"path", "uri"}:
            return Io(Path(v["path"]), v["uri"])
        if isinstance(v, dict) and set(v) == {"tracking"}:
            return Tracking(**v["tracking"])
        return v

    return {k: typed(v) for k, v in json.loads(Path(path).read_text()).items()}


def sft_task(config: dict, dataset: Io, allocation: Io, out: Io, tracking: Tracking) -> float:
    """With `tracking.gpus` > 1 (and not yet under torchrun), the task runs itself again under
    torchrun, one process per GPU of the node (DDP); rank 0 tracks and writes the adapter."""
    import tempfile

    from .artifacts import read_artifact

    if _under_torchrun(
        "sft", tracking, config=config, dataset=dataset, allocation=allocation, out=out
    ):
        return float(read_artifact(out.path).metadata["final_loss"])

    from .artifacts.allocation import read_allocation
    from .distributed import world
    from .plots import loss_curve
    from .stages.sft import SftConfig, run_sft

    cfg = SftConfig.model_validate(config)
    tracking = _rank_tracking(tracking)
    with tracking.tracker("sft", cfg, {"dataset": dataset, "allocation": allocation}) as tr:
        t0 = time.perf_counter()
        result = run_sft(
            cfg,
            dataset=dataset.path,
            allocation=read_allocation(allocation.path),
            out=out.path,
            checkpoints=out.path.with_name(out.path.name + ".ckpt"),
            checkpoint_uri=tracking.checkpoint_uri("sft"),
            parents=[dataset.uri, allocation.uri],
            on_step=lambda step, m: tr.log_metrics(m, step=step),
            progress=False,
        )
        if world()[0] == 0:
            tr.log_metrics(
                {
                    "final_loss": result.losses[-1],
                    "tokens_per_second": result.tokens_per_second,
                    COMPUTE: time.perf_counter() - t0,
                }
            )
            tr.log_output("adapter", out.uri)
            tr.log_model(out.uri, name="adapter", params={"steps": result.steps})
            with tempfile.TemporaryDirectory() as tmp:
                tr.log_artifacts([loss_curve(result.losses, Path(tmp) / "sft_loss.png")])
    _say(f"sft: {result.steps} steps, final loss {result.losses[-1]:.4f} -> {out.uri}")
    return result.losses[-1]


def evaluate_task(
    config: dict, dataset: Io, adapter: Io | None, out: Io, tracking: Tracking
) -> dict[str, Any]:
    """`adapter` None: the untuned base model (the baseline row)."""
    import tempfile

    from .plots import expert_load
    from .stages.evaluate import EvalConfig, headline, report_metrics, run_evaluate

    cfg = EvalConfig.model_validate(config)
    inputs = {"dataset": dataset} | ({"adapter": adapter} if adapter is not None else {})
    stage = "evaluate" if adapter is not None else "evaluate-base"
    with tracking.tracker(stage, cfg, inputs) as tr:
        t0 = time.perf_counter()
        report = run_evaluate(
            cfg,
            dataset=dataset.path,
            out=out.path,
            adapter=adapter.path if adapter is not None else None,
            parents=[v.uri for v in inputs.values()],
            progress=False,
        )
        tr.log_metrics({COMPUTE: time.perf_counter() - t0})
        tr.log_tags({"guilomo.formulation": report["formulation"]})
        # the score also on the adapter's LoggedModel, tied to the dataset's digest
        metrics = report_metrics(report)
        tr.log_metrics(metrics, model_id=tr.input_models.get("adapter"), dataset="dataset")
        tr.log_output("report", out.uri)
        if report.get("expert_load"):
            with tempfile.TemporaryDirectory() as tmp:
                tr.log_artifacts(
                    [expert_load(report["expert_load"], Path(tmp) / "expert_load.png")]
                )
    _say(f"{stage}: {headline(report)} -> {out.uri}")
    return report


TASKS = {"search": search_task, "sft": sft_task}

if __name__ == "__main__":  # one rank of `torchrun_command`
    TASKS[sys.argv[1]](**_from_args_file(Path(sys.argv[2])))
