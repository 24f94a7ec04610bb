"""What each KFP component runs: `run_task(stage, ...)`, one stage as an MLflow child run.

The components in `guilomo.pipeline` are thin (KFP serialises their source); tests call
`run_task` without KFP. `Io` pairs a local path (KFP's `artifact.path`) with its URI
(`artifact.uri`: `s3://...` on a cluster), so manifests and MLflow name URIs.
"""

from __future__ import annotations

import os
import shutil
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
    def of(cls, artifact: Any) -> Io:  # a KFP artifact: anything with `.path` and `.uri`
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

        image = os.environ.get(IMAGE_ENV, f"guilomo:{__version__}")
        gpus = "" if self.gpus is None else str(self.gpus)
        tags = {"kfp.run_id": self.kfp_run, "kfp.task_id": self.kfp_task, "guilomo.image": image}
        return {k: v for k, v in (tags | {"guilomo.gpus": gpus}).items() if v}

    def checkpoint_uri(self, stage: str) -> str | None:
        """Where a long stage mirrors its checkpoints: `<root>/<kfp run>/<stage>`, stable
        across retries of the same run, so a retried pod resumes."""
        root = self.checkpoint_root or os.environ.get(CHECKPOINT_ROOT_ENV, "")
        return f"{root.rstrip('/')}/{self.kfp_run or 'local'}/{stage}" if root else None

    def tracker(self, stage: str, config: Any, inputs: dict[str, Io]) -> StageTracker:
        uris = {k: v.uri for k, v in inputs.items()}
        return StageTracker(stage, self.parent_run_id, config=config, inputs=uris, tags=self.tags())


def _say(msg: str) -> None:
    print(f"[guilomo] {msg}", file=sys.stderr, flush=True)


class Progress:
    """`on_step` for the console of a pipeline run: a line such as `sft: step 12/60, loss
    2.41, 0.45 steps/s, 1m47s left` on the first step, then every `every` seconds and on
    the last step (the console shows the task's `[guilomo]` lines, the log has them all)."""

    def __init__(self, name: str, total: int | None, every: float = 30.0, say: Any = _say) -> None:
        self.name, self.total, self.every, self.say = name, total, every, say
        self.first: tuple[int, float] | None = None
        self.last = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        done = step == self.total
        if self.first is not None and now - self.last < self.every and not done:
            return
        self.last = now
        parts = [f"step {step}" + (f"/{self.total}" if self.total else "")]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items() if k in ("loss", "val_loss")]
        if self.first is None:  # the pace is known from the second line on
            self.first = (step, now)
        elif step > self.first[0]:
            rate = (step - self.first[0]) / (now - self.first[1])
            parts.append(f"{rate:.3g} steps/s")
            if self.total and not done:
                left = (self.total - step) / rate
                parts.append(f"{int(left // 60)}m{int(left % 60):02d}s left")
        self.say(f"{self.name}: {', '.join(parts)}")


def run_task(
    stage: str, config: dict, inputs: dict[str, Io | None], out: Io, tracking: Tracking
) -> dict[str, float]:
    """Run `stage` (a name in `STAGES`) as one tracked MLflow child run (the tracker checks that
    MLflow answers before any model is loaded). A checkpointed stage with `tracking.gpus` > 1
    reruns itself under torchrun, one process per GPU of the node; rank 0 tracks and publishes."""
    from .threads import prepare_openmp

    prepare_openmp()  # a fresh component process: before torch loads libgomp
    from .artifacts import read_artifact
    from .config import validated
    from .stages import STAGES, Context

    spec = STAGES[stage]
    if spec.checkpointed and _under_torchrun(stage, config, inputs, out, tracking):
        meta = read_artifact(out.path).metadata
        return {k: float(v) for k, v in meta.items() if isinstance(v, (int, float))}
    cfg = validated(spec.config, config, f"{stage} config")
    name = spec.run_name(inputs)
    present = {k: v for k, v in inputs.items() if v is not None}
    from .distributed import init_distributed, world  # torch: once the config is valid

    if spec.checkpointed:
        init_distributed()  # join torchrun's process group (if any): only rank 0 tracks
        tracking = tracking if world()[0] == 0 else replace(tracking, parent_run_id="")

    with tracking.tracker(name, cfg, present) as tr:
        ctx = Context(
            parents=[v.uri for v in present.values()],
            checkpoints=out.path.with_name(out.path.name + ".ckpt") if spec.checkpointed else None,
            checkpoint_uri=tracking.checkpoint_uri(stage) if spec.checkpointed else None,
            progress=False,
            overwrite=True,
            say=lambda text: _say(f"{name}: {text} -> {out.uri}"),
        )
        local = {k: v.path for k, v in present.items()}
        progress = Progress(name, spec.planned_steps(cfg, local))

        def on_step(step: int, m: dict[str, float]) -> None:
            tr.log_metrics(m, step=step)
            progress(step, m)

        ctx.on_step = on_step
        t0 = time.perf_counter()
        metrics = spec.run(cfg, local, out.path, ctx)
        if world()[0] != 0:
            return metrics
        if ctx.checkpoints is not None:  # pod-local; a checkpoint_root mirror stays
            shutil.rmtree(ctx.checkpoints, ignore_errors=True)
        tr.log_metrics({COMPUTE: time.perf_counter() - t0})
        _record(tr, spec, cfg, metrics, out, ctx)
    return metrics


def _record(tr: StageTracker, spec: Any, cfg: Any, metrics: dict, out: Io, ctx: Any) -> None:
    """Tags, metrics (an evaluation's also on the adapter's LoggedModel), the output, an adapter
    as a LoggedModel, plots, base model and raw data, and an evaluation's predictions."""
    from .artifacts import read_artifact

    tr.log_tags(ctx.tags)
    tr.log_params({f"runtime.{k}": v for k, v in ctx.params.items()})
    model = tr.input_models.get("adapter")
    tr.log_metrics(metrics, model_id=model, dataset="dataset" if model else None)
    name, kind = spec.output
    tr.log_output(name, out.uri)
    if kind == "Adapter":
        params = cfg.model_dump(mode="json") | {"steps": int(metrics["steps"])}
        tr.log_model(out.uri, name=name, params=params)
    tr.log_artifacts(sorted((out.path / "plots").glob("*.png")))
    tr.log_tags(_lineage_tags(read_artifact(out.path).metadata))
    if kind == "EvalReport":  # the per-question predictions
        tr.log_artifacts([out.path / "report.json"], artifact_path="report")


def _lineage_tags(meta: dict[str, Any]) -> dict[str, str]:
    """Run tags naming the base model and the raw data (their digests and origins)."""
    tags = {f"guilomo.base_model.{k}": v for k, v in (meta.get("base_model") or {}).items()}
    for i, src in enumerate(meta.get("sources") or []):
        tags |= {f"guilomo.source.{i}.{k}": v for k, v in src.items()}
    return tags


def torchrun_command(task: str, nproc: int, args_file: Path) -> list[str]:
    """The command that reruns `task` on `nproc` processes of this node (one per GPU)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*torchrun, f"--nproc-per-node={nproc}", "-m", "guilomo.tasks", task, str(args_file)]


def _under_torchrun(
    stage: str, config: dict, inputs: dict[str, Io | None], out: Io, tracking: Tracking
) -> bool:
    """With `tracking.gpus` > 1 and not yet under torchrun: run the task again under
    torchrun with the same arguments (JSON in a temporary file), and return True; a failed
    rank fails the task. Otherwise return False: this process works."""
    if (tracking.gpus or 0) <= 1 or "WORLD_SIZE" in os.environ:
        return False
    import json
    import subprocess
    import tempfile

    args = {"config": config, "inputs": inputs, "out": out, "tracking": tracking.__dict__}
    with tempfile.TemporaryDirectory() as tmp:
        args_file = Path(tmp) / "args.json"
        args_file.write_text(json.dumps(args, default=lambda io: [str(io.path), io.uri]))
        cmd = torchrun_command(stage, tracking.gpus, args_file)
        _say(f"{stage}: {tracking.gpus} processes: {' '.join(cmd)}")
        code = subprocess.run(cmd, check=False).returncode
    if code != 0:
        raise RuntimeError(
            f"{stage} under torchrun failed with exit code {code}; see the log above"
        )
    return True


def _from_args_file(path: Path) -> dict[str, Any]:
    import json

    args = json.loads(Path(path).read_text())
    args["inputs"] = {k: v and Io(Path(v[0]), v[1]) for k, v in args["inputs"].items()}
    args["out"] = Io(Path(args["out"][0]), args["out"][1])
    args["tracking"] = Tracking(**args["tracking"])
    return args


if __name__ == "__main__":  # one rank of `torchrun_command`
    run_task(sys.argv[1], **_from_args_file(Path(sys.argv[2])))
