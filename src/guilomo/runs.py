"""Whole pipeline runs: the run config, `guilomo run` (kfp.local), `submit`, `rerun`, `lineage`.

A run config (YAML, validated here) holds one section per stage, each checked against that
stage's own pydantic config, plus the DAG options (preset or search, baseline evaluation, GPU
pool). `run_local` executes `guilomo.pipeline.guilomo_pipeline` itself through `kfp.local`'s
SubprocessRunner, so the local run is the cluster's DAG; each stage logs an MLflow child run
under one parent run that this module opens and closes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import AllocateConfig, EvalConfig, PreprocessConfig, SearchConfig, SftConfig
from .textfiles import read_text

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "pipelines" / "configs" / "demo.yaml"
STAGE_CONFIGS: dict[str, type[BaseModel]] = {
    "preprocess": PreprocessConfig,
    "search": SearchConfig,
    "allocate": AllocateConfig,
    "sft": SftConfig,
    "evaluate": EvalConfig,
}
#: Which recorded output each stage produces (the names `guilomo.tasks` logs).
STAGE_OUTPUTS = {
    "preprocess": "dataset",
    "search": "state",
    "allocate": "allocation",
    "preset": "allocation",
    "sft": "adapter",
    "evaluate": "report",
    "evaluate-base": "report",
}
RUN_CONFIG_ARTIFACT = "run_config.json"


class RunConfig(BaseModel):
    """One pipeline run. Stage sections take the fields of `guilomo stage NAME --help`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("guilomo", description="Prefix of the MLflow parent run's name.")
    base_model: str | None = Field(
        None, description="Base model of every stage (a stage section may still set its own)."
    )
    preprocess: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any] = Field(default_factory=dict)
    allocate: dict[str, Any] = Field(default_factory=dict)
    sft: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
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

    @model_validator(mode="after")
    def _check_stages(self) -> RunConfig:
        for stage, model in STAGE_CONFIGS.items():
            section = dict(getattr(self, stage))
            if self.base_model and "base_model" in model.model_fields:
                section.setdefault("base_model", self.base_model)
            try:
                checked = model.model_validate(section)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(x) for x in (stage, *err["loc"]))
                raise ValueError(f"{where}: {err['msg']} (got {err.get('input')!r})") from None
            setattr(self, stage, checked.model_dump(mode="json"))
        if self.use_preset and not self.allocate.get("preset"):
            raise ValueError("use_preset is true but allocate.preset is not set (e.g. 2468)")
        return self

    def stage_arguments(self, stage: str) -> dict[str, Any]:
        """A stage section as a KFP struct: null values (not allowed there) are dropped,
        which must leave the validated config unchanged."""
        section = _drop_none(getattr(self, stage))
        model = STAGE_CONFIGS[stage]
        if model.model_validate(section) != model.model_validate(getattr(self, stage)):
            raise ValueError(f"{stage}: a null value overrides a default; give a value instead")
        return section

    def pipeline_arguments(self, parent_run_id: str = "") -> dict[str, Any]:
        return {f"{s}_config": self.stage_arguments(s) for s in STAGE_CONFIGS} | {
            "use_preset": self.use_preset,
            "evaluate_base": self.evaluate_base,
            "gpu_count": self.gpu_count,
            "gpu_node_selector": self.gpu_node_selector,
            "gpu_tolerations": self.gpu_tolerations,
            "mlflow_parent_run_id": parent_run_id,
            "checkpoint_root": self.checkpoint_root,
            "s3_secret": self.s3_secret,
        }


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or ValueError naming the file and what is wrong."""
    import yaml

    try:
        doc = yaml.safe_load(read_text(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a config file holds a mapping of option: value")
    return doc


def _drop_none(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _drop_none(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [_drop_none(v) for v in doc]
    return doc


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = doc
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {part} is not a section")
        node = child
    node[leaf] = value


def load_run_config(
    path: Path | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """The YAML at `path` (default: the demo, or `base`), then `key=value` overrides (dotted
    keys, YAML values: `sft.max_steps=10`, `use_preset=true`). Raises ValueError naming the
    file and the field."""
    import yaml

    source = str(path) if path is not None else ("the base config" if base else str(DEMO_CONFIG))
    doc = base if base is not None else read_yaml(path or DEMO_CONFIG)
    doc = json.loads(json.dumps(doc))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: overrides are key=value, e.g. sft.max_steps=10")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set(doc, key.strip(), value)
    try:
        return RunConfig.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(config)"
        msg = err["msg"].removeprefix("Value error, ")
        text = f"{source}: {where}: {msg}" if where != "(config)" else f"{source}: {msg}"
        raise ValueError(text) from None


# ------------------------------------------------------------------ tracking set-up


def default_tracking(root: Path) -> str:
    """MLFLOW_TRACKING_URI, or a sqlite file under `root` (set in the environment, so the
    stage processes kfp.local starts log to the same place)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def open_parent_run(
    cfg: RunConfig, *, tags: dict[str, str], imports: dict[str, str] | None = None
) -> str:
    """The MLflow parent run of one pipeline run (params: the config; the config itself as
    `run_config.json`, which `rerun` reads back)."""
    from mlflow.tracking import MlflowClient

    from .tracking import start_pipeline_run

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    tags = dict(tags) | {f"guilomo.import.{k}": v for k, v in (imports or {}).items()}
    run_id = start_pipeline_run(
        run_name=f"{cfg.name}-{stamp}",
        params=cfg.model_dump(mode="json"),
        tags=tags,
        experiment=cfg.experiment,
    )
    MlflowClient().log_dict(run_id, cfg.model_dump(mode="json"), RUN_CONFIG_ARTIFACT)
    return run_id


# ------------------------------------------------------------------ local runs


@dataclass
class RunSummary:
    parent_run_id: str
    seconds: float
    records: list[Any] = field(default_factory=list)
    tracking_uri: str = ""
    ok: bool = True
    log_path: Path | None = None


def run_local(
    cfg: RunConfig,
    *,
    root: Path,
    rerun: tuple[str, dict[str, str], str] | None = None,
    verbose: bool = False,
) -> RunSummary:
    """Run the DAG on this machine through kfp.local (each task a subprocess, artifacts under
    `root/kfp`). `rerun` = (stage, upstream URIs, earlier parent run id): run only `stage`
    and what follows, importing the rest. Returns the parent run and its stage records."""
    from kfp import local

    from .pipeline import guilomo_pipeline, rerun_pipeline
    from .tracking import end_pipeline_run, stage_records

    root = Path(root)
    uri = default_tracking(root)
    tags = {"guilomo.mode": "local"}
    imports: dict[str, str] = {}
    if rerun is not None:
        stage, imports, earlier = rerun
        tags |= {"guilomo.rerun_of": earlier, "guilomo.rerun_stage": stage}
    parent = open_parent_run(cfg, tags=tags, imports=imports)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str((root / "kfp").resolve()),
        raise_on_error=True,
    )
    pipeline = guilomo_pipeline if rerun is None else rerun_pipeline(rerun[0], imports)
    log_path = root / "logs" / f"{parent}.log"
    start, ok = time.monotonic(), False
    try:
        with _console(log_path, verbose=verbose):
            pipeline(**cfg.pipeline_arguments(parent))
        ok = True
    except RuntimeError as exc:  # kfp.local: a task failed (its output is in the log)
        raise PipelineFailed(
            f"{exc}\nthe whole log: {log_path}\n--- its last lines ---\n{_tail(log_path)}"
        ) from None
    finally:
        end_pipeline_run(parent, "FINISHED" if ok else "FAILED")
    return RunSummary(parent, time.monotonic() - start, stage_records(parent), uri, ok, log_path)


class PipelineFailed(RuntimeError):
    """A task of a local run failed; the message holds the log's path and its tail."""


#: Lines of a local run shown on the console (everything goes to the log file).
_SHOWN = ("[guilomo]", "finished with status", "Pipeline ", "ERROR", "Error:", "Traceback")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextmanager
def _console(log_path: Path, *, verbose: bool) -> Iterator[None]:
    """Send this process's stdout and stderr (and so the task subprocesses', which inherit
    them) to `log_path`, echoing only the lines that say what happens (all of them with
    `verbose`): kfp.local prints every task's full executor input otherwise."""
    import re
    import sys
    import threading

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    read_fd, write_fd = os.pipe()
    ansi = re.compile(r"\x1b\[[0-9;]*m")

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as src, open(log_path, "ab") as log:
            for raw in src:
                log.write(raw)
                log.flush()
                line = ansi.sub("", raw.decode(errors="replace"))
                if verbose or (any(k in line for k in _SHOWN) and "Warning" not in line):
                    os.write(saved_out, line.strip().encode() + b"\n")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)  # the pipe's last writer closes: the pump sees EOF
        thread.join(timeout=10)
        os.close(saved_out)
        os.close(saved_err)


# ------------------------------------------------------------------ earlier runs


def recorded_uris(parent_run_id: str) -> dict[str, str]:
    """Output name -> artifact URI for everything a pipeline run produced or imported."""
    from mlflow.tracking import MlflowClient

    from .tracking import stage_records

    run = MlflowClient().get_run(parent_run_id)
    uris = {
        k.removeprefix("guilomo.import."): v
        for k, v in run.data.tags.items()
        if k.startswith("guilomo.import.")
    }
    for rec in stage_records(parent_run_id):
        if rec.status == "FINISHED" and rec.stage != "evaluate-base":
            uris |= rec.outputs
    return uris


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
    """The stage to start from (allocate becomes preset for a preset run) and the upstream
    URIs to import, checked against what the earlier run recorded."""
    from .pipeline import RERUN_IMPORTS
    from .tracking import stage_records

    if stage == "preprocess":
        raise ValueError("rerun preprocess is a new run: use `guilomo run` with the same config")
    if stage == "allocate" and any(r.stage == "preset" for r in stage_records(parent_run_id)):
        stage = "preset"
    if stage not in RERUN_IMPORTS:
        raise ValueError(f"cannot rerun {stage!r}; choose one of search, allocate, sft, evaluate")
    uris = recorded_uris(parent_run_id)
    need = RERUN_IMPORTS[stage]
    missing = [k for k in need if k not in uris]
    if missing:
        raise ValueError(
            f"run {parent_run_id} recorded no {', '.join(missing)} (its stages before {stage} "
            "did not finish); rerun from an earlier stage"
        )
    return stage, {k: uris[k] for k in need}


# ------------------------------------------------------------------ lineage


@dataclass
class Node:
    uri: str
    kind: str
    stage: str
    digest: str
    config_hash: str
    code_version: str
    metadata: dict[str, Any]
    parents: list[Node]


def lineage_tree(uri: str, _seen: dict[str, Node] | None = None) -> Node:
    """The artifact at `uri` and, recursively, the artifacts its manifest names as parents.
    Parents that are not artifacts (raw data files) appear as leaves of kind 'source'."""
    from .storage import StorageError, open_store

    seen = {} if _seen is None else _seen
    if uri in seen:
        return seen[uri]
    try:
        manifest = open_store(uri).read_manifest(uri)
    except StorageError as exc:
        raise ValueError(str(exc)) from None
    if manifest is None:
        node = Node(uri, "source", "", "", "", "", {}, [])
    else:
        node = Node(
            uri,
            manifest.kind,
            manifest.stage,
            manifest.digest,
            manifest.config_hash,
            manifest.code_version,
            manifest.metadata,
            [],
        )
        seen[uri] = node
        is_source = manifest.kind == "PreparedDataset"
        for parent in manifest.parents:
            node.parents.append(
                Node(parent, "source", "", "", "", "", {}, [])
                if is_source
                else lineage_tree(parent, seen)
            )
    return node


def render_lineage(node: Node, _seen: set[str] | None = None) -> list[str]:
    """The tree as text lines: each artifact's kind, URI, stage, digest, config hash and code
    version; an artifact reached twice (the dataset) is expanded once."""
    seen: set[str] = set() if _seen is None else _seen
    lines: list[str] = []

    def walk(n: Node, lead: str, branch: str, more: str) -> None:
        if n.kind == "source":
            lines.append(f"{lead}{branch}source data  {n.uri}")
            return
        lines.append(f"{lead}{branch}{n.kind}  {n.uri}")
        body = lead + more
        if n.uri in seen:
            lines.append(f"{body}   (as above)")
            return
        seen.add(n.uri)
        lines.append(
            f"{body}   stage {n.stage} · digest {n.digest} · config {n.config_hash[:16]} · "
            f"code {n.code_version}"
        )
        for i, parent in enumerate(n.parents):
            last = i == len(n.parents) - 1
            walk(parent, body, "└─ " if last else "├─ ", "   " if last else "│  ")

    walk(node, "", "", "")
    return lines


def lineage(run_ref: str, experiment: str = "guilomo") -> tuple[Any, Node]:
    """The evaluate stage record of a pipeline run, and the lineage tree of its report."""
    from .tracking import resolve_pipeline_run, stage_records

    parent = resolve_pipeline_run(run_ref, experiment=experiment)
    evals = [r for r in stage_records(parent) if r.stage == "evaluate" and "report" in r.outputs]
    if not evals:
        raise ValueError(f"run {parent} has no finished evaluate stage to trace")
    rec = evals[-1]
    return rec, lineage_tree(rec.outputs["report"])


# ------------------------------------------------------------------ the summary table


def _fmt_metrics(rec: Any) -> str:
    m = rec.metrics
    keys = {
        "preprocess": ("rows.train", "rows.validation", "rows.test"),
        "search": ("val_loss", "train_loss"),
        "allocate": ("experts", "total_rank", "trainable_parameters"),
        "preset": ("experts", "total_rank", "trainable_parameters"),
        "sft": ("final_loss", "tokens_per_second"),
    }.get(rec.stage, ())
    if rec.stage in ("evaluate", "evaluate-base") and "accuracy" in m:
        return _fmt_accuracy(m)
    parts = []
    for k in keys:
        if k in m:
            v = m[k]
            parts.append(
                f"{k.split('.')[-1]}={v:.4g}" if v != int(v) else f"{k.split('.')[-1]}={int(v)}"
            )
    return " ".join(parts)


def _fmt_accuracy(m: dict[str, float]) -> str:
    """accuracy with its 95% interval and N, then acc_norm and the majority baseline."""
    text = f"accuracy={m['accuracy']:.3f}"
    if "accuracy_ci95_low" in m:
        text += f" [{m['accuracy_ci95_low']:.3f}, {m['accuracy_ci95_high']:.3f}]"
    if "total" in m:
        text += f" N={int(m['total'])}"
    if "acc_norm" in m:
        text += f" acc_norm={m['acc_norm']:.3f}"
    if "majority_baseline" in m:
        text += f" majority={m['majority_baseline']:.3f}"
    return text


def summary_table(summary: RunSummary) -> str:
    rows = [("stage", "time", "key metrics", "artifact", "MLflow run")]
    for rec in summary.records:
        took = (
            f"{rec.end_time - rec.start_time:.1f}s"
            if rec.end_time and rec.start_time
            else rec.status.lower()
        )
        out = next(iter(rec.outputs.values()), "")
        rows.append((rec.stage, took, _fmt_metrics(rec), out, rec.run_id))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------ the cluster


def submit(
    cfg: RunConfig,
    *,
    host: str,
    rerun: tuple[str, dict[str, str], str] | None = None,
    image: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
) -> tuple[str, str, str]:
    """Submit the DAG (or a rerun DAG) to the KFP endpoint `host`. With MLFLOW_TRACKING_URI
    set, the parent run is opened first and tagged with the KFP run id. `image` replaces the
    compiled `guilomo:<version>` (e.g. `registry/guilomo@sha256:...`, as `guilomo image push`
    prints). Returns (KFP run id, run URL, MLflow parent run id or '')."""
    import tempfile

    import kfp
    from kfp import compiler
    from mlflow.tracking import MlflowClient

    from .pipeline import IMAGE, guilomo_pipeline, rerun_pipeline

    if image is not None and (not image or image.endswith(":latest")):
        raise ValueError(f"--image {image!r}: give a versioned tag or a digest, never latest")

    parent = ""
    tags = {"guilomo.mode": "cluster", "guilomo.kfp_host": host}
    imports: dict[str, str] = {}
    if rerun is not None:
        stage, imports, earlier = rerun
        tags |= {"guilomo.rerun_of": earlier, "guilomo.rerun_stage": stage}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        parent = open_parent_run(cfg, tags=tags, imports=imports)
    pipeline = guilomo_pipeline if rerun is None else rerun_pipeline(rerun[0], imports)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(pipeline, str(package))
        if image:
            text = package.read_text()
            package.write_text(text.replace(f"image: {IMAGE}\n", f"image: {image}\n"))
        try:
            client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=cfg.pipeline_arguments(parent),
                run_name=f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}",
                experiment_name=cfg.experiment,
                namespace=namespace,
                service_account=service_account,
            )
        except Exception as exc:  # connection, auth and API errors alike
            if parent:
                from .tracking import end_pipeline_run

                end_pipeline_run(parent, "FAILED")
            raise ValueError(
                f"{host}: submitting to Kubeflow Pipelines failed ({type(exc).__name__}: "
                f"{str(exc)[:300]}); check the URL and that the KFP API answers"
            ) from None
    url = f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
    if parent:
        MlflowClient().set_tag(parent, "kfp.run_id", result.run_id)
    return result.run_id, url, parent
