"""MLflow tracking and lineage: one parent run per pipeline run, one child run per stage.

The pipeline driver (`guilomo run`, `guilomo rerun`) opens the parent run with
`start_pipeline_run` and hands its id to every stage. Each stage, in its own process (a KFP
component), wraps its work in a `StageTracker`:

    with StageTracker("sft", parent_run_id, config=cfg,
                      inputs={"dataset": ds_uri, "allocation": alloc_uri},
                      tags={"kfp.run_id": ..., "kfp.task_id": ...}) as tracker:
        out = sft.run(cfg, ...)                      # the heavy work, after the reachability check
        tracker.log_metrics({"train_loss": 0.41}, step=100)
        tracker.log_output("adapter", out_uri)
        tracker.log_model(out_uri, name="adapter")   # an external LoggedModel
        tracker.log_artifacts([Path("loss.png")])

What lands in MLflow, per child run:

* tags `guilomo.stage`, `guilomo.kind=stage`, `guilomo.code_version`, the caller's tags (KFP
  run and task ids, image digest, GPUs), `guilomo.input.<name>` / `guilomo.output.<name>` =
  artifact URI and `...<name>.digest` = the full manifest digest;
* params: the stage config flattened with dots (`lora.rank`);
* one MLflow dataset input per input artifact: name = input name, source = the artifact URI
  (MLflow's `{"uri": ...}` source JSON, source type `s3` or `local`), digest = the manifest
  digest's first 32 characters (`DATASET_DIGEST_CHARS`; MLflow keeps 36), profile = the full
  digest, kind, producing stage and code version; input tags `mlflow.data.context` = name and
  `guilomo.uri` = URI. (MLflow stores one dataset per experiment, name and digest, so the same
  content met again at another URI shows its first source; the run tags and the input tag
  always hold this run's URI.) An input that an earlier stage logged as a LoggedModel (the
  adapter, for evaluate) is also linked as a model input;
* the adapter as an external LoggedModel (its weights stay at the artifact URI), whose
  `source_run_id` is the stage's run and which is logged as the run's model output;
* plots as run artifacts under `plots/`.

`stage_records(parent)` reads the chain back and `resolve_pipeline_run(name_or_id)` finds a
parent run; `guilomo lineage` prints them. Everything here goes through `MlflowClient` with an
explicit tracking URI: no process-global active run, so stages in one process cannot collide.

The tracking URI comes only from `MLFLOW_TRACKING_URI` (an `http(s)://` server or a local
`sqlite:///path/mlflow.db`). A parent run id of "" disables tracking: every tracker method is
then a no-op that neither imports mlflow nor touches the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

from pydantic import BaseModel

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

    from .artifacts import Manifest

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "guilomo"
DATASET_DIGEST_CHARS = 32  # MLflow stores at most 36 characters of a dataset digest
RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
# MLflow's limits (mlflow.utils.validation): values beyond them are cut, not rejected.
_MAX_KEY = 250
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_INPUT_TAG_VALUE = 500
_BATCH = 100  # params or tags per log_batch request
_METRIC_BATCH = 1000
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_START_HINT = (
    "start the server or set MLFLOW_TRACKING_URI to a running one (or unset it to run "
    "without tracking)"
)


class TrackingError(ValueError):
    """Tracking is misconfigured or the tracking server failed; the message says the fix."""


# -- configuration ------------------------------------------------------------------------
def tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` from the environment, or None when unset or empty."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def _redact(uri: str) -> str:
    """`uri` without a password (http://user:secret@host -> http://user:***@host)."""
    parts = urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri


def _require_uri(uri: str | None) -> str:
    uri = uri if uri is not None else tracking_uri()
    if not uri:
        raise TrackingError(
            "MLFLOW_TRACKING_URI is not set: set it to the MLflow tracking server "
            "(http://host:5000) or a local database (sqlite:///path/to/mlflow.db)"
        )
    return uri


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before any heavy work, when the tracking backend cannot be used.

    http(s): one `GET <uri>/health` with a short timeout (mlflow's own client would retry for
    minutes). sqlite: the database's folder must exist and be writable. A local folder store:
    it or its nearest existing parent must be a writable folder. Other schemes pass.
    """
    uri = _require_uri(uri)
    shown = _redact(uri)
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                r.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):  # an authenticating proxy: reachable; mlflow sends creds
                return
            raise TrackingError(
                f"the MLflow tracking server at {shown} answered HTTP {exc.code} on "
                f"{_redact(url)}; check that MLFLOW_TRACKING_URI names an MLflow server (and "
                "its path prefix, if any), and the server's logs"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"the MLflow tracking server at {shown} is not reachable (GET {_redact(url)}: "
                f"{reason}); {_START_HINT}"
            ) from None
        return
    if scheme == "sqlite":
        path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
        if path in ("", ":memory:"):
            return
        folder = Path(path).parent
        if not folder.is_dir():
            raise TrackingError(
                f"{uri}: the folder {folder} of the tracking database does not exist; create "
                "it or fix MLFLOW_TRACKING_URI"
            )
        if not os.access(folder, os.W_OK):
            raise TrackingError(
                f"{uri}: the folder {folder} is not writable; fix its permissions or point "
                "MLFLOW_TRACKING_URI elsewhere"
            )
        return
    if scheme in ("", "file"):
        root = Path(url2pathname(parsed.path) if scheme == "file" else uri).absolute()
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            raise TrackingError(
                f"{uri}: not a writable folder for an MLflow file store; fix "
                "MLFLOW_TRACKING_URI (a server URL or sqlite:///path/to/mlflow.db)"
            )


# -- small helpers ------------------------------------------------------------------------
def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _call(what: str, uri: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, with mlflow and transport errors turned into TrackingError."""
    try:
        return fn(*args, **kwargs)
    except TrackingError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow ({_redact(uri)}): {what} failed: {msg[:400]}; check the tracking server "
            "and its logs, then run again"
        ) from exc


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = f"...[{len(value)} chars]"
    return value[: limit - len(marker)] + marker


def _key(key: str) -> str:
    """`key` made valid as an MLflow param, metric or tag key."""
    key = re.sub(r"[^\w.\- /]", "_", str(key)).strip(" /")
    key = re.sub(r"/+", "/", key).lstrip(".") or "_"
    return key[:_MAX_KEY]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def flatten_params(config: BaseModel | Mapping[str, Any] | None) -> dict[str, str]:
    """A config as MLflow params: nested mappings joined with dots, values as strings (JSON
    for non-strings, so `true`, `null`, `[1, 2]`), keys and values cut to MLflow's limits."""
    if config is None:
        return {}
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[_key(prefix)] = _truncate(_text(value), _MAX_PARAM_VALUE)

    walk("", data)
    return out


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_key(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in tags.items()}


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _log_batch(
    client: MlflowClient,
    uri: str,
    run_id: str,
    *,
    params: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> None:
    from mlflow.entities import Param, RunTag

    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, v) for k, v in (tags or {}).items()]
    for chunk in _chunks(p, _BATCH):
        _call("logging params", uri, client.log_batch, run_id, params=chunk)
    for chunk in _chunks(t, _BATCH):
        _call("logging tags", uri, client.log_batch, run_id, tags=chunk)


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.match(name):
        raise TrackingError(
            f"{what} name {name!r}: use letters, digits, '_' and '-' only (it becomes the "
            f"MLflow tag guilomo.{what}.<name>)"
        )
    return name


def _normalize(uri: str) -> str:
    """An artifact URI as recorded: s3:// and file:// as given (no trailing '/'), a local
    path made absolute so the lineage does not depend on the working directory."""
    text = os.fspath(uri)
    if urlparse(text).scheme:
        return text.rstrip("/") or text
    return os.path.abspath(text)


def _manifest(uri: str) -> Manifest:
    """The manifest at the artifact `uri` (local or s3://), or TrackingError naming it."""
    from .storage import StorageError, open_store

    try:
        manifest = open_store(uri).read_manifest(uri)
    except StorageError as exc:
        raise TrackingError(f"cannot record the artifact {uri}: {exc}") from None
    if manifest is None:
        raise TrackingError(
            f"{uri}: no manifest.json, so there is no complete artifact there; check the URI, "
            "or run the stage that produces it first"
        )
    return manifest


def _source_type(uri: str) -> str:
    scheme = urlparse(uri).scheme
    return "local" if scheme in ("", "file") else scheme


def _code_version() -> str:
    from .artifacts import code_version

    return code_version()


def _code_tags() -> dict[str, str]:
    """guilomo.code_version, and MLflow's git commit tag when running from a checkout."""
    version = _code_version()
    tags = {"guilomo.code_version": version}
    if "+g" in version:
        tags["mlflow.source.git.commit"] = version.split("+g", 1)[1]
    return tags


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created if missing. For a sqlite store its artifacts go
    next to the database (`<db folder>/mlartifacts`), not into the working directory."""
    from mlflow.exceptions import MlflowException

    exp = _call("looking up the experiment", uri, client.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            raise TrackingError(
                f"MLflow ({_redact(uri)}): experiment {name!r} is deleted; restore it "
                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use "
                "another experiment name"
            )
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///") and uri[len("sqlite:///") :] not in ("", ":memory:"):
        location = (Path(uri[len("sqlite:///") :]).absolute().parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:  # created by a concurrent process in the meantime
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise TrackingError(
                f"MLflow ({_redact(uri)}): cannot create experiment {name!r}: {exc.message}"
            ) from exc
        return exp.experiment_id


# -- the parent run -----------------------------------------------------------------------
def start_pipeline_run(
    *,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    experiment: str = DEFAULT_EXPERIMENT,
) -> str:
    """Open the parent run of one pipeline run and return its id; it stays RUNNING until
    `end_pipeline_run`. Creates `experiment` if missing."""
    uri = _require_uri(None)
    check_reachable(uri)
    client = _client(uri)
    exp_id = _experiment_id(client, uri, experiment)
    all_tags = _tags({**tags, "guilomo.kind": "pipeline", **_code_tags()})
    run = _call(
        "creating the pipeline run", uri, client.create_run, exp_id, run_name=run_name, tags={}
    )
    _log_batch(client, uri, run.info.run_id, params=flatten_params(params), tags=all_tags)
    log.info("MLflow pipeline run %s (%s) at %s", run.info.run_id, run_name, _redact(uri))
    return run.info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED", *, summary: bool = False) -> None:
    """Close the parent run with `status` (FINISHED, FAILED or KILLED); "" does nothing.
    `summary`: first copy every stage's final metrics onto it as `<stage>.<metric>`, so
    MLflow's compare view shows each pipeline run's numbers."""
    if not run_id:
        return
    if status not in RUN_STATUSES:
        raise TrackingError(f"run status {status!r}: use one of {', '.join(RUN_STATUSES)}")
    uri = _require_uri(None)
    client = _client(uri)
    if summary:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(_key(f"{r.stage}.{k}"), float(v), now, 0)
            for r in stage_records(run_id)
            for k, v in r.metrics.items()
        ]
        for chunk in _chunks(metrics, _METRIC_BATCH):
            _call("logging the pipeline's metrics", uri, client.log_batch, run_id, metrics=chunk)
    _call("ending the pipeline run", uri, client.set_terminated, run_id, status=status)


# -- one stage ----------------------------------------------------------------------------
class StageTracker:
    """The child run of one stage execution; see the module docstring.

    `parent_run_id == ""` disables tracking: the tracker then does nothing, cheaply.
    """

    def __init__(
        self,
        stage: str,
        parent_run_id: str,
        *,
        config: BaseModel | Mapping[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.stage = stage
        self.parent_run_id = parent_run_id
        self.config = config
        self.inputs = dict(inputs or {})
        self.tags = dict(tags or {})
        self.enabled = bool(parent_run_id)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.input_models: dict[str, str] = {}  # input name -> LoggedModel id, if one exists
        self._pending: list[Any] = []  # queued per-step metric batches (RunOperations)
        self._digests: dict[str, str] = {}  # input name -> manifest digest
        self._uri = ""
        self._client: MlflowClient | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> StageTracker:
        if not self.enabled:
            return self
        for name in self.inputs:
            _check_name(name, "input")
        uri = self._uri = _require_uri(None)
        check_reachable(uri)
        manifests = {name: _manifest(u) for name, u in self.inputs.items()}
        inputs = {name: _normalize(u) for name, u in self.inputs.items()}
        client = self._client = _client(uri)
        parent = _call(
            f"reading the pipeline run {self.parent_run_id}",
            uri,
            client.get_run,
            self.parent_run_id,
        )
        self.experiment_id = parent.info.experiment_id
        tags = {
            **self.tags,
            "mlflow.parentRunId": self.parent_run_id,
            "guilomo.kind": "stage",
            "guilomo.stage": self.stage,
            **_code_tags(),
        }
        for name, u in inputs.items():
            tags[f"guilomo.input.{name}"] = u
            tags[f"guilomo.input.{name}.digest"] = manifests[name].digest
        run = _call(
            f"starting the {self.stage} run",
            uri,
            client.create_run,
            self.experiment_id,
            run_name=self.stage,
            tags={"mlflow.parentRunId": self.parent_run_id},
        )
        self.run_id = run.info.run_id
        try:
            _log_batch(
                client, uri, self.run_id, params=flatten_params(self.config), tags=_tags(tags)
            )
            self._log_inputs(inputs, manifests)
        except BaseException:
            try:
                self._terminate("FAILED")
            except TrackingError as err:
                log.warning("could not mark MLflow run %s FAILED: %s", self.run_id, err)
            raise
        log.info("MLflow %s run %s (parent %s)", self.stage, self.run_id, self.parent_run_id)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.enabled or self.run_id is None:
            return
        if exc_type is None:
            self._flush()
            self._terminate("FINISHED")
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:  # never hide the stage's own error behind a tracking error
            self._flush()
            assert self._client is not None
            self._client.set_tag(
                self.run_id, "guilomo.error", _truncate(f"{exc_type.__name__}: {exc}", 8000)
            )
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)

    def _terminate(self, status: str) -> None:
        assert self._client is not None and self.run_id is not None
        _call(
            f"ending the {self.stage} run",
            self._uri,
            self._client.set_terminated,
            self.run_id,
            status=status,
        )

    def _log_inputs(self, inputs: dict[str, str], manifests: dict[str, Manifest]) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        assert self._client is not None and self.run_id is not None
        datasets, models = [], []
        for name, uri in inputs.items():
            m = manifests[name]
            self._digests[name] = m.digest
            profile = {
                "manifest_digest": m.digest,
                "kind": m.kind,
                "stage": m.stage,
                "files": len(m.files),
                "code_version": m.code_version,
                "created": m.created,
            }
            dataset = Dataset(
                name=name,
                digest=m.digest[:DATASET_DIGEST_CHARS],
                source_type=_source_type(uri),
                source=json.dumps({"uri": uri}),
                profile=json.dumps(profile, sort_keys=True),
            )
            # MLflow keeps one dataset per (experiment, name, digest): the same content seen
            # again at another URI keeps the first source, so the input tag (stored per run)
            # records this run's URI.
            tags = [
                InputTag("mlflow.data.context", name),
                InputTag("guilomo.uri", _truncate(uri, _MAX_INPUT_TAG_VALUE)),
            ]
            datasets.append(DatasetInput(dataset, tags))
            model_id = self._find_model(uri, m.digest)
            if model_id is not None:
                self.input_models[name] = model_id
                models.append(LoggedModelInput(model_id))
        if datasets or models:
            _call(
                "logging the input artifacts",
                self._uri,
                self._client.log_inputs,
                self.run_id,
                datasets=datasets,
                models=models or None,
            )

    def _find_model(self, uri: str, digest: str) -> str | None:
        """The LoggedModel an earlier stage logged for the artifact at `uri`, if any."""
        assert self._client is not None and self.experiment_id is not None
        found = _call(
            "searching logged models",
            self._uri,
            self._client.search_logged_models,
            [self.experiment_id],
            filter_string=f"tags.`guilomo.digest` = '{digest}'",
            max_results=50,
        )
        matches = [m for m in found if m.tags.get("guilomo.uri") == uri]
        return max(matches, key=lambda m: m.creation_timestamp).model_id if matches else None

    # -- logging ------------------------------------------------------------------------
    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int | None = None,
        *,
        model_id: str | None = None,
        dataset: str | None = None,
    ) -> None:
        """Log metrics at `step` (0 when None). `model_id` attaches them to a LoggedModel
        (e.g. `input_models["adapter"]` in evaluate); `dataset` (an input name) records which
        dataset digest they were measured on."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        self._require_started("log_metrics")
        ds_name = ds_digest = None
        if dataset is not None:
            if dataset not in self._digests:
                raise TrackingError(
                    f"log_metrics(dataset={dataset!r}): not an input of this stage; use one "
                    f"of {sorted(self._digests)}"
                )
            ds_name, ds_digest = dataset, self._digests[dataset][:DATASET_DIGEST_CHARS]
        now = int(time.time() * 1000)
        entries = [
            Metric(
                _key(k),
                float(v),
                now,
                int(step or 0),
                model_id=model_id,
                dataset_name=ds_name,
                dataset_digest=ds_digest,
            )
            for k, v in metrics.items()
        ]
        assert self._client is not None and self.run_id is not None
        for chunk in _chunks(entries, _METRIC_BATCH):
            if step is None:
                _call(
                    "logging metrics", self._uri, self._client.log_batch, self.run_id, metrics=chunk
                )
            else:  # per-step metrics: queued, so training never waits on the server
                self._pending.append(
                    self._client.log_batch(self.run_id, metrics=chunk, synchronous=False)
                )

    def _flush(self) -> None:
        """Wait until the queued per-step metrics are stored."""
        pending, self._pending = self._pending, []
        for op in pending:
            _call("logging metrics", self._uri, op.wait)

    def log_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the stage's run (e.g. `guilomo.formulation`)."""
        if not self.enabled:
            return
        self._require_started("log_tags")
        assert self._client is not None and self.run_id is not None
        _log_batch(self._client, self._uri, self.run_id, tags=_tags(tags))

    def log_output(self, name: str, uri: str) -> None:
        """Record the output artifact `name` at `uri` (tags with its URI and manifest digest)."""
        if not self.enabled:
            return
        self._require_started("log_output")
        _check_name(name, "output")
        manifest = _manifest(uri)
        uri = _normalize(uri)
        assert self._client is not None and self.run_id is not None
        _log_batch(
            self._client,
            self._uri,
            self.run_id,
            tags=_tags(
                {f"guilomo.output.{name}": uri, f"guilomo.output.{name}.digest": manifest.digest}
            ),
        )

    def log_model(
        self, uri: str, name: str = "adapter", params: dict[str, Any] | None = None
    ) -> str | None:
        """Register the artifact at `uri` (an Adapter) as an external MLflow LoggedModel of this
        run: its files stay at `uri`; tags record the URI and the manifest digest. Returns the
        model id (None when tracking is disabled)."""
        if not self.enabled:
            return None
        from mlflow.entities import LoggedModelOutput

        self._require_started("log_model")
        manifest = _manifest(uri)
        uri = _normalize(uri)
        client = self._client
        assert client is not None and self.run_id is not None and self.experiment_id is not None
        tags = _tags(
            {
                "mlflow.model.isExternal": "true",
                "guilomo.uri": uri,
                "guilomo.digest": manifest.digest,
                "guilomo.kind": manifest.kind,
                "guilomo.stage": self.stage,
                "guilomo.code_version": manifest.code_version,
            }
        )
        model = _call(
            "creating the logged model",
            self._uri,
            client.create_logged_model,
            self.experiment_id,
            name=name,
            source_run_id=self.run_id,
            tags=tags,
            params=flatten_params(params) or None,
            model_type=f"guilomo.{manifest.kind}",
        )
        try:
            self._write_mlmodel(model)
            model = _call(
                "finalizing the logged model",
                self._uri,
                client.finalize_logged_model,
                model.model_id,
                "READY",
            )
        except BaseException:
            try:
                client.finalize_logged_model(model.model_id, "FAILED")
            except Exception as err:
                log.warning("could not mark logged model %s FAILED: %s", model.model_id, err)
            raise
        _call(
            "linking the logged model to the run",
            self._uri,
            client.log_outputs,
            self.run_id,
            [LoggedModelOutput(model.model_id, 0)],
        )
        _log_batch(
            client, self._uri, self.run_id, tags=_tags({f"guilomo.model.{name}": model.model_id})
        )
        return model.model_id

    def _write_mlmodel(self, model: Any) -> None:
        """The MLmodel stub `mlflow.create_external_model` writes, so the external model can
        be registered in the Model Registry; skipped on mlflow versions without the helper."""
        try:
            from mlflow.models.model import MLMODEL_FILE_NAME
            from mlflow.models.utils import get_external_mlflow_model_spec
        except ImportError:
            return
        assert self._client is not None
        with tempfile.TemporaryDirectory(prefix="guilomo-mlmodel-") as d:
            get_external_mlflow_model_spec(model).save(os.path.join(d, MLMODEL_FILE_NAME))
            _call(
                "uploading the MLmodel file",
                self._uri,
                self._client.log_model_artifacts,
                model.model_id,
                d,
            )

    def log_artifacts(self, paths: list[Path], artifact_path: str = "plots") -> None:
        """Upload files (PNG plots, ...) or folders as run artifacts under `artifact_path`."""
        if not self.enabled:
            return
        self._require_started("log_artifacts")
        assert self._client is not None and self.run_id is not None
        for p in map(Path, paths):
            if p.is_dir():
                fn, what = self._client.log_artifacts, f"uploading the folder {p}"
            elif p.is_file():
                fn, what = self._client.log_artifact, f"uploading {p}"
            else:
                raise TrackingError(f"{p}: no such file to log as an artifact; check the path")
            _call(what, self._uri, fn, self.run_id, str(p), artifact_path)

    def _require_started(self, what: str) -> None:
        if self.run_id is None:
            raise TrackingError(
                f"StageTracker.{what}: the tracker is not open; use it as "
                "`with StageTracker(...) as tracker:`"
            )


# -- reading the lineage back -------------------------------------------------------------
@dataclass
class StageRecord:
    """One stage's child run, as `guilomo lineage` shows it."""

    stage: str
    run_id: str
    status: str
    inputs: dict[str, str]  # input name -> artifact URI
    outputs: dict[str, str]  # output name -> artifact URI
    metrics: dict[str, float]  # latest value of each metric
    params: dict[str, str]
    tags: dict[str, str]
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    digests: dict[str, str] = field(default_factory=dict)  # artifact URI -> manifest digest
    models: dict[str, str] = field(default_factory=dict)  # model name -> LoggedModel id


def _prefixed(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {
        k[len(prefix) :]: v
        for k, v in tags.items()
        if k.startswith(prefix) and "." not in k[len(prefix) :]
    }


def _record(run: Run) -> StageRecord:
    tags = dict(run.data.tags)
    inputs = _prefixed(tags, "guilomo.input.")
    outputs = _prefixed(tags, "guilomo.output.")
    digests = {}
    for kind, named in (("input", inputs), ("output", outputs)):
        for name, uri in named.items():
            d = tags.get(f"guilomo.{kind}.{name}.digest")
            if d:
                digests[uri] = d
    info = run.info
    return StageRecord(
        stage=tags.get("guilomo.stage", info.run_name or ""),
        run_id=info.run_id,
        status=info.status,
        inputs=inputs,
        outputs=outputs,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=tags,
        start_time=info.start_time / 1000 if info.start_time else None,
        end_time=info.end_time / 1000 if info.end_time else None,
        digests=digests,
        models=_prefixed(tags, "guilomo.model."),
    )


def stage_records(parent_run_id: str) -> list[StageRecord]:
    """The child (stage) runs of a pipeline run, in start order."""
    uri = _require_uri(None)
    check_reachable(uri)
    client = _client(uri)
    parent = _call(f"reading the pipeline run {parent_run_id}", uri, client.get_run, parent_run_id)
    runs: list[Run] = []
    token = None
    while True:
        page = _call(
            "searching stage runs",
            uri,
            client.search_runs,
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            break
    runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))
    return [_record(r) for r in runs]


def resolve_pipeline_run(ref: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The parent run id for `ref`: a pipeline run id, a stage run id (its parent is
    returned) or a pipeline run name that is unique in `experiment`."""
    from mlflow.exceptions import MlflowException

    uri = _require_uri(None)
    check_reachable(uri)
    client = _client(uri)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            parent = run.data.tags.get("mlflow.parentRunId")
            if run.data.tags.get("guilomo.kind") == "stage" and parent:
                return parent
            return run.info.run_id
    exp = _call("looking up the experiment", uri, client.get_experiment_by_name, experiment)
    hint = (
        f"list pipeline runs with `mlflow runs list --experiment-id <id>` or in the MLflow UI "
        f"at {_redact(uri)} (experiment {experiment!r}), and pass a run id or a unique run name"
    )
    if exp is None:
        raise TrackingError(f"no pipeline run {ref!r}: experiment {experiment!r} does not exist")
    quote = "'" if "'" not in ref else '"'
    if quote in ref:
        raise TrackingError(f"run name {ref!r}: contains both quote characters; {hint}")
    found = _call(
        "searching pipeline runs",
        uri,
        client.search_runs,
        [exp.experiment_id],
        filter_string=(
            f"attributes.run_name = {quote}{ref}{quote} AND tags.`guilomo.kind` = 'pipeline'"
        ),
        max_results=20,
    )
    if len(found) == 1:
        return found[0].info.run_id
    if not found:
        raise TrackingError(f"no pipeline run named or with id {ref!r} at {_redact(uri)}; {hint}")
    ids = ", ".join(r.info.run_id for r in found[:5])
    raise TrackingError(
        f"{len(found)} pipeline runs are named {ref!r} ({ids}); pass the run id instead"
    )
