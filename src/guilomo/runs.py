"""Whole pipeline runs: the run config, `guilomo run` (kfp.local), `submit`, `rerun`, `lineage`.

A run config (YAML, validated here) holds one section per stage, each checked against that
stage's own pydantic config, plus the DAG options (preset or search, baseline evaluation, GPU
pool). `run_local` executes `guilomo.pipeline.guilomo_pipeline` itself through `kfp.local`'s
SubprocessRunner, so the local run is the cluster's DAG; each stage logs an MLflow child run
under one parent run that this module opens and closes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import (
    AllocateConfig,
    EvalConfig,
    PreprocessConfig,
    SearchConfig,
    SftConfig,
    apply_overrides,
    read_yaml,
    validated,
)
from .stages import RUN_NAMES, STAGES

#: The run configs shipped with the package: `--config NAME` picks `configs/NAME.yaml`.
CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
STAGE_CONFIGS: dict[str, type[BaseModel]] = {n: s.config for n, s in STAGES.items()}
#: Which recorded output each stage's run produces (the names `guilomo.tasks` logs).
STAGE_OUTPUTS = {n: s.output[0] for n, s in RUN_NAMES.items()}
RUN_CONFIG_ARTIFACT = "run_config.json"


class RunConfig(BaseModel):
    """One pipeline run: a typed section per stage (the fields of `guilomo stage NAME
    --help`), the shared base model, and the DAG options."""

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
        problem = self.allocate.contradicts(self.search.model_dump())
        if not self.use_preset and problem:
            raise ValueError(f"{problem} (or set use_preset=true to train the preset)")
        return self

    def stage_arguments(self, stage: str) -> dict[str, Any]:
        """A stage section as a KFP struct: the fields the run config sets (the stage
        applies its own defaults, and knows which were given); null values (not allowed
        there) are dropped, which must leave the validated config unchanged."""
        section = getattr(self, stage)
        plain = _drop_none(section.model_dump(mode="json", exclude_unset=True))
        if type(section).model_validate(plain) != section:
            raise ValueError(f"{stage}: a null value overrides a default; give a value instead")
        return plain

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


def _drop_none(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: _drop_none(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [_drop_none(v) for v in doc]
    return doc


def config_path(text: str | Path) -> Path:
    """A run config's path: a file, or the name of a shipped one (`demo`,
    `llama2-7b-scienceqa`, see `CONFIGS`)."""
    path = Path(text)
    shipped = CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        return shipped
    return path


def load_run_config(
    path: Path | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> RunConfig:
    """The YAML at `path` (default: the demo, or `base`), then `key=value` overrides (dotted
    keys, YAML values: `sft.max_steps=10`, `use_preset=true`). Raises ValueError naming the
    file and the field."""
    source = str(path) if path is not None else ("the base config" if base else str(DEMO_CONFIG))
    doc = base if base is not None else read_yaml(config_path(path) if path else DEMO_CONFIG)
    return validated(RunConfig, apply_overrides(doc, overrides), source)


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
        end_pipeline_run(parent, "FINISHED" if ok else "FAILED", summary=ok)
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
        if manifest.kind == "PreparedDataset":  # its parents are raw data, not artifacts
            found = {s.get("path"): s for s in manifest.metadata.get("sources") or []}
            for parent in manifest.parents:
                src = found.get(parent, {})
                node.parents.append(
                    Node(parent, "source", "", src.get("digest", ""), "", "", src, [])
                )
        else:
            node.parents += [lineage_tree(parent, seen) for parent in manifest.parents]
    return node


def render_lineage(node: Node, _seen: set[str] | None = None) -> list[str]:
    """The tree as text lines: each artifact's kind, URI, stage, digest, config hash and code
    version; an artifact reached twice (the dataset) is expanded once."""
    seen: set[str] = set() if _seen is None else _seen
    lines: list[str] = []

    def walk(n: Node, lead: str, branch: str, more: str) -> None:
        if n.kind == "source":
            origin = " · ".join(x for x in (n.digest, n.metadata.get("package", "")) if x)
            lines.append(
                f"{lead}{branch}source data  {n.uri}" + (f"  ({origin})" if origin else "")
            )
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
        base = n.metadata.get("base_model")
        if base:
            origin = base.get("revision") or base.get("source") or ""
            lines.append(
                f"{body}   base model {base['name']} · {base['digest']}"
                + (f" · {origin}" if origin else "")
            )
        for i, parent in enumerate(n.parents):
            last = i == len(n.parents) - 1
            walk(parent, body, "└─ " if last else "├─ ", "   " if last else "│  ")

    walk(node, "", "", "")
    return lines


def lineage(run_ref: str, experiment: str = "guilomo") -> list[tuple[Any, Node]]:
    """The evaluate (then evaluate-base) stage records of a pipeline run, each with the
    lineage tree of its report."""
    from .tracking import resolve_pipeline_run, stage_records

    parent = resolve_pipeline_run(run_ref, experiment=experiment)
    records = stage_records(parent)
    found = []
    for stage in ("evaluate", "evaluate-base"):
        evals = [r for r in records if r.stage == stage and "report" in r.outputs]
        if evals:
            found.append((evals[-1], lineage_tree(evals[-1].outputs["report"])))
    if not found:
        raise ValueError(f"run {parent} has no finished evaluate stage to trace")
    return found


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
