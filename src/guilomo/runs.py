"""Whole pipeline runs: the run config, `guilomo run` (kfp.local, the cluster's DAG), `submit`,
`rerun`, `lineage`. Each stage logs an MLflow child run under one parent run opened here."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import config
from .config import AllocateConfig, EvalConfig, PreprocessConfig, SearchConfig, SftConfig, read_yaml
from .stages import STAGES
from .tracking import end_pipeline_run, resolve_pipeline_run, stage_records, start_pipeline_run

if TYPE_CHECKING:
    from rich.table import Table
    from rich.tree import Tree

#: The run configs shipped with the package: `--config NAME` picks `configs/NAME.yaml`.
CONFIGS = Path(__file__).resolve().parent / "configs"
STAGE_CONFIGS: dict[str, type[BaseModel]] = {n: s.config for n, s in STAGES.items()}
RUN_CONFIG_ARTIFACT = "run_config.json"
#: The run config's fields that are `guilomo_pipeline` parameters as they are.
_DAG_OPTIONS = {"use_preset", "evaluate_base", "gpu_count", "gpu_node_selector"}
_DAG_OPTIONS |= {"gpu_tolerations", "checkpoint_root", "s3_secret"}
#: (stage to start from, upstream output name -> URI to import, earlier parent run id)
Rerun = tuple[str, dict[str, str], str]


class RunConfig(BaseModel):
    """One pipeline run: a section per stage (`guilomo stage NAME --help`), the DAG options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("guilomo", description="Prefix of the MLflow parent run's name.")
    base_model: str | None = Field(
        None, description="Base model of every stage (a stage section may still set its own)."
    )
    preprocess: PreprocessConfig = PreprocessConfig()
    search: SearchConfig = SearchConfig()
    allocate: AllocateConfig = AllocateConfig()
    sft: SftConfig = SftConfig()
    evaluate: EvalConfig = EvalConfig()
    use_preset: bool = Field(False, description="Skip the search; train allocate.preset.")
    evaluate_base: bool = Field(True, description="Also evaluate the untuned base model.")
    gpu_count: int = Field(1, ge=0, description="GPUs per GPU stage (cluster runs).")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    checkpoint_root: str = Field(
        "", description="s3://bucket/prefix where search and SFT mirror their checkpoints."
    )
    experiment: str = Field("guilomo", description="MLflow experiment.")
    s3_secret: str = Field(
        "guilomo-s3", description="Kubernetes Secret with the S3 keys (cluster runs)."
    )

    @model_validator(mode="before")
    @classmethod
    def _shared_base_model(cls, doc: Any) -> Any:
        """`base_model` fills every stage section that does not set its own."""
        if isinstance(doc, dict) and doc.get("base_model"):
            doc = dict(doc)
            for stage, model in STAGE_CONFIGS.items():
                section = doc.get(stage) or {}
                if isinstance(section, dict) and "base_model" in model.model_fields:
                    doc[stage] = {"base_model": doc["base_model"], **section}
        return doc

    @model_validator(mode="after")
    def _check_stages(self) -> RunConfig:
        if self.use_preset and not self.allocate.preset:
            raise ValueError("use_preset is true but allocate.preset is not set (e.g. 2468)")
        losses, prep = self.sft.losses, self.preprocess
        types = len(prep.datasets) if prep.source == "multiple_choice" else 1
        if losses.localized_coef > 0 and types != losses.localized_groups:
            raise ValueError(
                f"sft.losses.localized_coef is {losses.localized_coef}: LoRAMoE's localized "
                f"balancing needs one task type per expert group ({losses.localized_groups}), "
                f"and preprocess gives {types} (one per data set in preprocess.datasets); mix "
                f"{losses.localized_groups} data sets or set sft.losses.localized_groups"
                if types > 1
                else f"sft.losses.localized_coef is {losses.localized_coef}, but the data has "
                "no task types (one source): mix data sets (preprocess.datasets=[sciq,arc_easy]) "
                "or set sft.losses.localized_coef=0"
            )
        if not self.use_preset and (problem := self.allocate.contradicts(self.search.model_dump())):
            raise ValueError(f"{problem} (or set use_preset=true to train the preset)")
        return self

    def stage_arguments(self, stage: str) -> dict[str, Any]:
        """A stage section as a KFP struct: the fields the run config sets (the stage applies
        its own defaults); nulls (not allowed there) dropped, which must change nothing."""
        section = getattr(self, stage)
        plain = section.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        if type(section).model_validate(plain) != section:
            raise ValueError(f"{stage}: a null value overrides a default; give a value instead")
        return plain

    def pipeline_arguments(self, parent_run_id: str = "") -> dict[str, Any]:
        stages = {f"{s}_config": self.stage_arguments(s) for s in STAGE_CONFIGS}
        dag = self.model_dump(mode="json", include=_DAG_OPTIONS)
        return stages | dag | {"mlflow_parent_run_id": parent_run_id}


def load_run_config(
    path: Path | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """The YAML at `path` (a file or a shipped config's name; default `demo`, or else `base`),
    then `key=value` overrides (`sft.max_steps=10`). ValueError names the file and field."""
    if path is None and base is not None:
        doc, source = base, "the base config"
    else:
        path = Path(path) if path is not None else CONFIGS / "demo.yaml"
        shipped = CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
        name_only = not path.exists() and path.parent == Path(".") and shipped.is_file()
        doc, source = read_yaml(shipped if name_only else path), str(path)
    return config.validated(RunConfig, config.apply_overrides(doc, overrides), source)


# -- starting a run -----------------------------------------------------------------------
def default_tracking(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or else (set so for the stages' processes too) ROOT/mlflow.db."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        root.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    return os.environ["MLFLOW_TRACKING_URI"]


def _run_name(cfg: RunConfig) -> str:
    return f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _start(cfg: RunConfig, tags: dict, rerun: Rerun | None, track: bool = True) -> tuple[str, Any]:
    """The MLflow parent run ('' unless `track`; its params and `run_config.json` are the
    config, which `rerun` reads back) and the pipeline function to run."""
    from mlflow.tracking import MlflowClient

    from .pipeline import guilomo_pipeline, rerun_pipeline

    stage, imports, earlier = rerun or ("", {}, "")
    tags |= {"guilomo.rerun_of": earlier, "guilomo.rerun_stage": stage} if rerun else {}
    tags |= {f"guilomo.import.{k}": v for k, v in imports.items()}
    parent, doc = "", cfg.model_dump(mode="json")
    if track:
        parent = start_pipeline_run(
            run_name=_run_name(cfg), params=doc, tags=tags, experiment=cfg.experiment
        )
        MlflowClient().log_dict(parent, doc, RUN_CONFIG_ARTIFACT)
    return parent, rerun_pipeline(stage, imports) if rerun else guilomo_pipeline


# -- local runs ---------------------------------------------------------------------------
@dataclass
class RunSummary:
    parent_run_id: str
    seconds: float
    records: list[Any]
    tracking_uri: str
    log_path: Path


class PipelineFailed(RuntimeError):
    """A task of a local run failed; the message holds the log's path and its tail."""


def run_local(
    cfg: RunConfig, *, root: Path, rerun: Rerun | None = None, verbose: bool = False
) -> RunSummary:
    """Run the DAG (or a rerun DAG) here through kfp.local, each task a subprocess."""
    from kfp import local

    root = Path(root)
    uri = default_tracking(root)
    parent, pipeline = _start(cfg, {"guilomo.mode": "local"}, rerun)
    local.init(local.SubprocessRunner(use_venv=False), pipeline_root=str((root / "kfp").resolve()))
    log_path = root / "logs" / f"{parent}.log"
    start, ok = time.monotonic(), False
    try:
        with _logged(log_path, verbose=verbose):
            pipeline(**cfg.pipeline_arguments(parent))
        ok = True
    except RuntimeError as exc:  # a task failed (kfp.local's raise_on_error); see the log
        log = log_path.read_text(errors="replace") if log_path.is_file() else "(no log)"
        tail = log.splitlines()[-40:]
        raise PipelineFailed(
            f"{exc}\nthe whole log: {log_path}\n--- its last lines ---\n" + "\n".join(tail)
        ) from None
    finally:
        end_pipeline_run(parent, "FINISHED" if ok else "FAILED", summary=ok)
    return RunSummary(parent, time.monotonic() - start, stage_records(parent), uri, log_path)


#: Lines of a local run shown on the console (everything goes to the log file).
_SHOWN = ("[guilomo]", "finished with status", "Pipeline ", "ERROR", "Error:", "Traceback")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def _logged(log_path: Path, *, verbose: bool) -> Iterator[None]:
    """Send stdout and stderr (the task subprocesses' too) to `log_path`, echoing only the
    lines that say what happens (all with `verbose`): kfp.local prints every task's input."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as src, open(log_path, "ab") as log:
            for raw in src:
                log.write(raw)
                log.flush()
                line = _ANSI.sub("", raw.decode(errors="replace"))
                if verbose or (any(k in line for k in _SHOWN) and "Warning" not in line):
                    os.write(saved[0], line.strip().encode() + b"\n")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    _point_stdio(write_fd, write_fd)
    os.close(write_fd)
    try:
        yield
    finally:
        _point_stdio(*saved)  # the pipe's last writer closes: the pump sees EOF
        thread.join(timeout=10)
        os.close(saved[0])
        os.close(saved[1])


def _point_stdio(out: int, err: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)


# -- earlier runs -------------------------------------------------------------------------
def recorded_config(parent_run_id: str) -> dict[str, Any]:
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{parent_run_id}/{RUN_CONFIG_ARTIFACT}")
    except Exception as exc:  # any MLflow failure means the same here
        raise ValueError(
            f"run {parent_run_id}: cannot read its {RUN_CONFIG_ARTIFACT} ({exc}); was it "
            "started by `guilomo run` or `guilomo submit`?"
        ) from None


def rerun_plan(parent_run_id: str, stage: str) -> tuple[str, dict[str, str]]:
    """The stage to start from (allocate becomes preset in a preset run) and the URIs to import."""
    from mlflow.tracking import MlflowClient

    from .pipeline import RERUN_IMPORTS

    if stage == "preprocess":
        raise ValueError("rerun preprocess is a new run: use `guilomo run` with the same config")
    records = stage_records(parent_run_id)
    if stage == "allocate" and any(r.stage == "preset" for r in records):
        stage = "preset"
    if stage not in RERUN_IMPORTS:
        raise ValueError(f"cannot rerun {stage!r}; choose one of search, allocate, sft, evaluate")
    tags = MlflowClient().get_run(parent_run_id).data.tags
    uris = {k.split(".", 2)[2]: v for k, v in tags.items() if k.startswith("guilomo.import.")}
    for rec in records:
        if rec.status == "FINISHED" and rec.stage != "evaluate-base":
            uris |= rec.outputs
    if missing := [k for k in RERUN_IMPORTS[stage] if k not in uris]:
        raise ValueError(
            f"run {parent_run_id} recorded no {', '.join(missing)} (its stages before {stage} "
            "did not finish); rerun from an earlier stage"
        )
    return stage, {k: uris[k] for k in RERUN_IMPORTS[stage]}


# -- lineage ------------------------------------------------------------------------------
def lineage(run_ref: str, experiment: str = "guilomo") -> list[tuple[Any, Tree]]:
    """A run's last evaluate and evaluate-base records, each with its report's lineage tree."""
    parent = resolve_pipeline_run(run_ref, experiment=experiment)
    last = {r.stage: r for r in stage_records(parent) if "report" in r.outputs}
    found = [last[s] for s in ("evaluate", "evaluate-base") if s in last]
    if not found:
        raise ValueError(f"run {parent} has no finished evaluate stage to trace")
    return [(rec, lineage_tree(rec.outputs["report"])) for rec in found]


def lineage_tree(uri: str, _seen: dict[str, str] | None = None) -> Tree:
    """The artifact at `uri` over the artifacts its manifest names as parents, recursively; raw
    data files are leaves, and an artifact reached twice (the dataset) is expanded once."""
    from rich.tree import Tree

    from .storage import open_store

    seen = {} if _seen is None else _seen
    if uri in seen:
        return Tree(f"{seen[uri]}  {uri}\n   (as above)")
    m = open_store(uri).read_manifest(uri)  # StorageError (a ValueError) if it is damaged
    if m is None:
        return _source(uri, {})
    seen[uri] = m.kind
    label = f"{m.kind}  {uri}\n   stage {m.stage} · digest {m.digest} · config "
    label += f"{m.config_hash[:16]} · code {m.code_version}"
    if b := m.metadata.get("base_model"):  # its origin: a hub revision, or the GGUF's package
        origin = b.get("revision") or b.get("source")
        label += f"\n   base model {b['name']} · {b['digest']}" + (f" · {origin}" if origin else "")
    tree = Tree(label)
    if m.kind == "PreparedDataset":  # its parents are raw data, not artifacts
        found = {s.get("path"): s for s in m.metadata.get("sources") or []}
        tree.children += [_source(parent, found.get(parent, {})) for parent in m.parents]
    else:
        tree.children += [lineage_tree(parent, seen) for parent in m.parents]
    return tree


def _source(uri: str, src: dict[str, Any]) -> Tree:
    from rich.tree import Tree

    origin = " · ".join(filter(None, (src.get("digest"), src.get("package"))))
    return Tree(f"source data  {uri}" + (f"  ({origin})" if origin else ""))


# -- the summary table --------------------------------------------------------------------
_ALLOCATION = ("experts", "total_rank", "trainable_parameters")
_KEY_METRICS = {
    "preprocess": ("rows.train", "rows.validation", "rows.test"),
    "search": ("val_loss", "train_loss"),
    "allocate": _ALLOCATION,
    "preset": _ALLOCATION,
    "sft": ("final_loss", "tokens_per_second"),
}


def _fmt_metrics(stage: str, m: dict[str, float]) -> str:
    if stage.startswith("evaluate") and "accuracy" in m:
        text = f"accuracy={m['accuracy']:.3f}"
        if "accuracy_ci95_low" in m:
            text += f" [{m['accuracy_ci95_low']:.3f}, {m['accuracy_ci95_high']:.3f}]"
        text += f" N={int(m['total'])}" if "total" in m else ""
        for key, name in (("acc_norm", "acc_norm"), ("majority_baseline", "majority")):
            text += f" {name}={m[key]:.3f}" if key in m else ""
        return text
    return " ".join(
        f"{k.split('.')[-1]}={int(m[k]) if float(m[k]).is_integer() else format(m[k], '.4g')}"
        for k in _KEY_METRICS.get(stage, ())
        if k in m
    )


def summary_table(summary: RunSummary) -> Table:
    """Each stage's name, time, key metrics, artifact and MLflow run."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("stage", "time", "key metrics", "artifact", "MLflow run"):
        table.add_column(name, no_wrap=name != "key metrics")  # only the metrics wrap
    for rec in summary.records:
        timed = rec.end_time and rec.start_time
        took = f"{rec.end_time - rec.start_time:.1f}s" if timed else rec.status.lower()
        out = next(iter(rec.outputs.values()), "")
        table.add_row(rec.stage, took, _fmt_metrics(rec.stage, rec.metrics), out, rec.run_id)
    return table


# -- the cluster --------------------------------------------------------------------------
def submit(
    cfg: RunConfig,
    *,
    host: str,
    rerun: Rerun | None = None,
    image: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> tuple[str, str, str]:
    """Submit the DAG (or a rerun DAG) to the KFP endpoint `host`; with MLFLOW_TRACKING_URI set,
    open the parent run first. `image` replaces `guilomo:<version>` (`guilomo image push`
    prints one). Returns (KFP run id, run URL, MLflow parent run id or '')."""
    import kfp
    from kfp import compiler
    from mlflow.tracking import MlflowClient

    from .pipeline import IMAGE

    if image is not None and (not image or image.endswith(":latest")):
        raise ValueError(f"--image {image!r}: give a versioned tag or a digest, never latest")
    tags = {"guilomo.mode": "cluster", "guilomo.kfp_host": host}
    parent, pipeline = _start(cfg, tags, rerun, track=bool(os.environ.get("MLFLOW_TRACKING_URI")))
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        if image:
            package.write_text(
                package.read_text().replace(f"image: {IMAGE}\n", f"image: {image}\n")
            )
        try:
            client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=cfg.pipeline_arguments(parent),
                run_name=_run_name(cfg),
                experiment_name=cfg.experiment,
                namespace=namespace,
                service_account=service_account,
            )
        except Exception as exc:  # connection, auth and API errors alike
            end_pipeline_run(parent, "FAILED")  # untracked (""): nothing to end
            raise ValueError(
                f"{host}: submitting to Kubeflow Pipelines failed ({type(exc).__name__}: "
                f"{str(exc)[:300]}); check the URL and that the KFP API answers"
            ) from None
    if parent:
        MlflowClient().set_tag(parent, "kfp.run_id", result.run_id)
    return result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}", parent
