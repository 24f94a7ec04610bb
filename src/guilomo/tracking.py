"""MLflow tracking: one parent run per pipeline run (`start_pipeline_run`, `end_pipeline_run`),
one child run per stage (`StageTracker`, in the stage's own process); README.md ("Tracking and
lineage in MLflow") lists what each records.

The artifacts' manifests are the lineage record (kind, digest, parents) and MLflow points at
them: tags `guilomo.output.<name>` = the output's URI, and one dataset input per input artifact
(source = its URI, digest = the manifest digest cut to `DATASET_DIGEST_CHARS`; MLflow keeps one
dataset per experiment, name and digest, with its first source, so the input tag `guilomo.uri`
holds this run's URI). `stage_records` reads a pipeline run's stages back, and
`resolve_pipeline_run` finds one by id or name.

Everything goes through `MlflowClient` with the URI from `MLFLOW_TRACKING_URI` (no
process-global active run; a password in it is never logged), and mlflow's errors become a
`TrackingError` naming the call. A parent run id of "" disables tracking: every tracker method
is then a no-op that neither imports mlflow nor touches the network.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse, urlsplit, urlunsplit
from urllib.request import url2pathname

from pydantic import BaseModel

if TYPE_CHECKING:
    from mlflow.entities import Run

    from .artifacts import Manifest

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "guilomo"
DATASET_DIGEST_CHARS = 32  # MLflow stores at most 36 characters of a dataset digest
# MLflow's limits (mlflow.utils.validation): values beyond them are cut, not rejected.
_MAX_KEY, _MAX_PARAM_VALUE, _MAX_TAG_VALUE, _MAX_INPUT_TAG_VALUE = 250, 6000, 8000, 500
_OUTPUT = "guilomo.output."
_F = TypeVar("_F", bound=Callable[..., Any])


class TrackingError(ValueError):
    """Tracking is misconfigured or the tracking server failed; the message says the fix."""


# -- configuration ------------------------------------------------------------------------
def tracking_uri() -> str | None:
    """`MLFLOW_TRACKING_URI` from the environment, or None when unset or empty."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def _redact(uri: str) -> str:
    """`uri` without a password (http://user:secret@host -> http://user:***@host)."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def _require_uri(uri: str | None) -> str:
    uri = uri if uri is not None else tracking_uri()
    if not uri:
        raise TrackingError(
            "MLFLOW_TRACKING_URI is not set: set it to the MLflow tracking server "
            "(http://host:5000) or a local database (sqlite:///path/to/mlflow.db)"
        )
    return uri


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI; None for other URIs and `:memory:`."""
    path = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else ""
    return Path(path).absolute() if path not in ("", ":memory:") else None


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> None:
    """Fail fast, before any heavy work, when the tracking backend cannot be used: http(s) gets
    one short `GET <uri>/health` (mlflow's client would retry for minutes); a sqlite database's
    folder, or a folder store's nearest existing folder, must be writable. Others pass."""
    uri = _require_uri(uri)
    parsed = urlparse(uri)
    scheme, db = parsed.scheme.lower(), _sqlite_file(uri)
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                r.read(64)
        except urllib.error.HTTPError as exc:
            if exc.code not in (401, 403):  # 401/403: an authenticating proxy, so reachable
                raise TrackingError(
                    f"the MLflow tracking server at {_redact(uri)} answered HTTP {exc.code} on "
                    f"{_redact(url)}; check that MLFLOW_TRACKING_URI names an MLflow server "
                    "(and its path prefix, if any), and the server's logs"
                ) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise TrackingError(
                f"the MLflow tracking server at {_redact(uri)} is not reachable (GET "
                f"{_redact(url)}: {getattr(exc, 'reason', exc)}); start the server or set "
                "MLFLOW_TRACKING_URI to a running one (or unset it to run without tracking)"
            ) from None
    elif db is not None and not (db.parent.is_dir() and os.access(db.parent, os.W_OK)):
        problem = "is not writable; fix its permissions" if db.parent.is_dir() else None
        problem = problem or "does not exist; create it"
        raise TrackingError(
            f"{uri}: the folder {db.parent} of the tracking database {problem} or fix "
            "MLFLOW_TRACKING_URI"
        )
    elif scheme in ("", "file"):
        root = Path(url2pathname(parsed.path) if scheme == "file" else uri).absolute()
        existing = next((p for p in (root, *root.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            raise TrackingError(
                f"{uri}: not a writable folder for an MLflow file store; fix "
                "MLFLOW_TRACKING_URI (a server URL or sqlite:///path/to/mlflow.db)"
            )


# -- small helpers ------------------------------------------------------------------------
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


class _Client:
    """`MlflowClient(tracking_uri=uri)` whose calls raise TrackingError (see `_call`)."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri, self._client = uri, MlflowClient(tracking_uri=uri)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return functools.partial(_call, name, self.uri, getattr(self._client, name))


def _truncate(value: str, limit: int) -> str:
    marker = f"...[{len(value)} chars]"
    return value if len(value) <= limit else value[: limit - len(marker)] + marker


def _key(key: str) -> str:
    """`key` made valid as an MLflow param, metric or tag key."""
    key = re.sub(r"[^\w.\- /]", "_", str(key)).strip(" /")
    return (re.sub(r"/+", "/", key).lstrip(".") or "_")[:_MAX_KEY]


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
            text = (
                value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            )
            out[_key(prefix)] = _truncate(text, _MAX_PARAM_VALUE)

    walk("", data)
    return out


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {_key(k): _truncate(str(v), _MAX_TAG_VALUE) for k, v in tags.items()}


def _log_batch(
    client: _Client, run_id: str, *, params: Mapping | None = None, tags: Mapping | None = None
) -> None:
    """Params and tags (cut to MLflow's limits) on a run; MLflow sends them in batches."""
    from mlflow.entities import Param, RunTag

    p = [Param(k, v) for k, v in (params or {}).items()]
    t = [RunTag(k, v) for k, v in _tags(tags or {}).items()]
    client.log_batch(run_id, params=p, tags=t)


def _check_name(name: str, what: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise TrackingError(f"{what} name {name!r}: use letters, digits, '_' and '-' only")


def _normalize(uri: str) -> str:
    """An artifact URI as recorded: s3:// and file:// as given (no trailing '/'), a local
    path made absolute so the lineage does not depend on the working directory."""
    text = os.fspath(uri)
    return (text.rstrip("/") or text) if urlparse(text).scheme else os.path.abspath(text)


def _manifest(uri: str) -> Manifest:
    """The manifest at the artifact `uri` (local or s3://), or TrackingError naming it."""
    from .storage import StorageError, open_store

    try:
        manifest = open_store(uri).read_manifest(uri)
    except StorageError as exc:
        raise TrackingError(f"cannot read the artifact {uri}: {exc}") from None
    if manifest is None:
        raise TrackingError(
            f"{uri}: no manifest.json, so there is no complete artifact there; check the URI, "
            "or run the stage that produces it first"
        )
    return manifest


def _code_tags() -> dict[str, str]:
    """guilomo.code_version, and MLflow's git commit tag when running from a checkout."""
    from .artifacts import code_version

    version = code_version()
    commit = {"mlflow.source.git.commit": version.split("+g", 1)[1]} if "+g" in version else {}
    return {"guilomo.code_version": version, **commit}


def _open() -> _Client:
    """A client for `MLFLOW_TRACKING_URI`, once the backend is known to be reachable."""
    uri = _require_uri(None)
    check_reachable(uri)
    return _Client(uri)


def _experiment_id(client: _Client, name: str) -> str:
    """The id of experiment `name`, created if missing. For a sqlite store its artifacts go
    next to the database (`<db folder>/mlartifacts`), not into the working directory."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = _sqlite_file(client.uri)
        try:
            location = (db.parent / "mlartifacts").as_uri() if db else None
            return client.create_experiment(name, artifact_location=location)
        except TrackingError:  # created by a concurrent process in the meantime?
            if (exp := client.get_experiment_by_name(name)) is None:
                raise
    if exp.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow ({_redact(client.uri)}): experiment {name!r} is deleted; restore it (mlflow "
            f"experiments restore --experiment-id {exp.experiment_id}) or use another name"
        )
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
    client = _open()
    run = client.create_run(_experiment_id(client, experiment), run_name=run_name)
    tags = {**tags, "guilomo.kind": "pipeline", **_code_tags()}
    _log_batch(client, run.info.run_id, params=flatten_params(params), tags=tags)
    log.info("MLflow pipeline run %s (%s) at %s", run.info.run_id, run_name, _redact(client.uri))
    return run.info.run_id


def end_pipeline_run(run_id: str, status: str = "FINISHED", *, summary: bool = False) -> None:
    """Close the parent run with `status` (FINISHED, FAILED or KILLED); "" does nothing.
    `summary`: first copy every stage's final metrics onto it as `<stage>.<metric>`, so
    MLflow's compare view shows each pipeline run's numbers."""
    if not run_id:
        return
    client = _Client(_require_uri(None))
    if summary:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(_key(f"{r.stage}.{k}"), float(v), now, 0)
            for r in stage_records(run_id)
            for k, v in r.metrics.items()
        ]
        client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, status=status)


# -- one stage ----------------------------------------------------------------------------
def _tracked(method: _F) -> _F:
    """A StageTracker method: a no-op returning None when tracking is disabled, an error
    naming the fix outside `with StageTracker(...)`."""

    @functools.wraps(method)
    def wrapper(self: StageTracker, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        if self.run_id is None:
            raise TrackingError(
                f"StageTracker.{method.__name__}: the tracker is not open; use it as "
                "`with StageTracker(...) as tracker:`"
            )
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class StageTracker:
    """The child run of one stage execution; a `parent_run_id` of "" disables it (no-ops)."""

    def __init__(
        self,
        stage: str,
        parent_run_id: str,
        *,
        config: BaseModel | Mapping[str, Any] | None = None,
        inputs: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.stage, self.parent_run_id, self.config = stage, parent_run_id, config
        self.inputs, self.tags = dict(inputs or {}), dict(tags or {})
        self.enabled = bool(parent_run_id)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.input_models: dict[str, str] = {}  # input name -> LoggedModel id, if one exists
        self._pending: list[Any] = []  # queued per-step metric batches (RunOperations)
        self._digests: dict[str, str] = {}  # input name -> manifest digest
        self._client: Any = None

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> StageTracker:
        if not self.enabled:
            return self
        for name in self.inputs:
            _check_name(name, "input")
        client = self._client = _open()
        manifests = {name: _manifest(u) for name, u in self.inputs.items()}
        self.experiment_id = client.get_run(self.parent_run_id).info.experiment_id
        parent = {"mlflow.parentRunId": self.parent_run_id}
        run = client.create_run(self.experiment_id, run_name=self.stage, tags=parent)
        self.run_id = run.info.run_id
        tags = {**self.tags, "guilomo.kind": "stage", "guilomo.stage": self.stage, **_code_tags()}
        try:
            _log_batch(client, self.run_id, params=flatten_params(self.config), tags=tags)
            self._log_inputs(manifests)
        except BaseException:
            self._end("FAILED")
            raise
        log.info("MLflow %s run %s (parent %s)", self.stage, self.run_id, self.parent_run_id)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if not self.enabled or self.run_id is None:
            return
        if exc_type is None:
            self._flush()
            self._client.set_terminated(self.run_id, status="FINISHED")
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            self._end(status, f"{exc_type.__name__}: {exc}")

    def _end(self, status: str, error: str = "") -> None:
        """Mark the run `status`, never hiding the stage's own error behind a tracking one."""
        try:
            self._flush()
            if error:
                self._client.set_tag(self.run_id, "guilomo.error", _truncate(error, _MAX_TAG_VALUE))
            self._client.set_terminated(self.run_id, status=status)
        except Exception as err:
            log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)

    def _log_inputs(self, manifests: dict[str, Manifest]) -> None:
        """One MLflow dataset per input artifact; a LoggedModel input also as a model input."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

        datasets, models = [], []
        for name, m in manifests.items():
            uri = _normalize(self.inputs[name])
            scheme = urlparse(uri).scheme
            self._digests[name] = m.digest
            profile = {"manifest_digest": m.digest, "kind": m.kind, "stage": m.stage}
            profile |= {"files": len(m.files), "code_version": m.code_version, "created": m.created}
            dataset = Dataset(
                name=name,
                digest=m.digest[:DATASET_DIGEST_CHARS],
                source_type="local" if scheme in ("", "file") else scheme,
                source=json.dumps({"uri": uri}),
                profile=json.dumps(profile, sort_keys=True),
            )
            # MLflow keeps the first source of a dataset (experiment, name, digest) met again
            # at another URI; the input tag, stored per run, holds this run's URI.
            tags = [InputTag("mlflow.data.context", name)]
            tags.append(InputTag("guilomo.uri", _truncate(uri, _MAX_INPUT_TAG_VALUE)))
            datasets.append(DatasetInput(dataset, tags))
            model_id = self._find_model(uri, m.digest)
            if model_id is not None:
                self.input_models[name] = model_id
                models.append(LoggedModelInput(model_id))
        if datasets:
            self._client.log_inputs(self.run_id, datasets=datasets, models=models or None)

    def _find_model(self, uri: str, digest: str) -> str | None:
        """The LoggedModel an earlier stage logged for the artifact at `uri`, if any."""
        found = self._client.search_logged_models(
            [self.experiment_id],
            filter_string=f"tags.`guilomo.digest` = '{digest}'",
            max_results=50,
        )
        matches = [m for m in found if m.tags.get("guilomo.uri") == uri]
        return max(matches, key=lambda m: m.creation_timestamp).model_id if matches else None

    # -- logging ------------------------------------------------------------------------
    @_tracked
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
        from mlflow.entities import Metric

        digest = self._digests[dataset][:DATASET_DIGEST_CHARS] if dataset is not None else None
        now, at = int(time.time() * 1000), int(step or 0)
        entries = [
            Metric(_key(k), float(v), now, at, model_id, dataset, digest)
            for k, v in metrics.items()
        ]
        # per-step metrics are queued (flushed on exit), so training never waits on the server
        self._pending.append(
            self._client.log_batch(self.run_id, metrics=entries, synchronous=step is None)
        )

    def _flush(self) -> None:
        """Wait until the queued per-step metrics are stored."""
        pending, self._pending = self._pending, []
        for op in filter(None, pending):  # None: logged synchronously, or nothing to log
            _call("log_batch", self._client.uri, op.wait)

    @_tracked
    def log_tags(self, tags: dict[str, str]) -> None:
        """Set tags on the stage's run (e.g. `guilomo.formulation`)."""
        _log_batch(self._client, self.run_id, tags=tags)

    @_tracked
    def log_params(self, params: dict[str, Any]) -> None:
        """Add params found at run time (e.g. `runtime.threads`; MLflow params never change,
        so these take names the config's params do not have)."""
        _log_batch(self._client, self.run_id, params=flatten_params(params))

    @_tracked
    def log_output(self, name: str, uri: str) -> None:
        """Record the output artifact `name`: tag `guilomo.output.<name>` = its URI, where a
        complete artifact (its manifest) must be."""
        _check_name(name, "output")
        _manifest(uri)
        _log_batch(self._client, self.run_id, tags={_OUTPUT + name: _normalize(uri)})

    @_tracked
    def log_model(
        self, uri: str, name: str = "adapter", params: dict[str, Any] | None = None
    ) -> str | None:
        """Register the artifact at `uri` (an Adapter) as an external MLflow LoggedModel of this
        run: its files stay at `uri`; tags record the URI and the manifest digest. Returns the
        model id (None when tracking is disabled)."""
        import mlflow
        from mlflow.entities import LoggedModelOutput

        m, uri = _manifest(uri), _normalize(uri)
        tags = {"guilomo.uri": uri, "guilomo.digest": m.digest, "guilomo.kind": m.kind}
        tags |= {"guilomo.stage": self.stage, "guilomo.code_version": m.code_version}
        model = _call(
            "create_external_model",
            self._client.uri,
            mlflow.create_external_model,  # READY, with the MLmodel stub the registry needs
            name=name,
            source_run_id=self.run_id,
            tags=_tags(tags),
            params=flatten_params(params) or None,
            model_type=f"guilomo.{m.kind}",
            experiment_id=self.experiment_id,
        )
        self._client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, 0)])
        return model.model_id

    @_tracked
    def log_artifacts(self, paths: list[Path], artifact_path: str = "plots") -> None:
        """Upload files (PNG plots, ...) or folders as run artifacts under `artifact_path`."""
        for p in map(Path, paths):
            if not p.exists():
                raise TrackingError(f"{p}: no such file to log as an artifact; check the path")
            log_files = self._client.log_artifacts if p.is_dir() else self._client.log_artifact
            log_files(self.run_id, str(p), artifact_path)


# -- reading the lineage back -------------------------------------------------------------
@dataclass
class StageRecord:
    """One stage's child run, as `guilomo lineage` shows it."""

    stage: str
    run_id: str
    status: str
    inputs: dict[str, str]  # input name -> artifact URI (the run's MLflow dataset inputs)
    outputs: dict[str, str]  # output name -> artifact URI (tags guilomo.output.<name>)
    metrics: dict[str, float]  # latest value of each metric
    params: dict[str, str]
    tags: dict[str, str]
    start_time: float | None  # seconds since the epoch
    end_time: float | None
    models: list[str] = field(default_factory=list)  # the LoggedModels the run logged

    @cached_property
    def digests(self) -> dict[str, str]:
        """Artifact URI -> manifest digest for every input and output, read from the
        manifests (the lineage record), so it needs access to the artifacts' store."""
        return {u: _manifest(u).digest for u in [*self.inputs.values(), *self.outputs.values()]}


def _record(run: Run) -> StageRecord:
    tags, info = dict(run.data.tags), run.info
    inputs = {}
    for di in run.inputs.dataset_inputs if run.inputs else []:
        uri = {t.key: t.value for t in di.tags}.get("guilomo.uri")
        if uri:
            inputs[di.dataset.name] = uri
    outputs = {k[len(_OUTPUT) :]: v for k, v in tags.items() if k.startswith(_OUTPUT)}
    return StageRecord(
        stage=tags.get("guilomo.stage", info.run_name or ""),
        run_id=info.run_id,
        status=info.status,
        inputs=inputs,
        outputs={k: v for k, v in outputs.items() if "." not in k},  # not older runs' digests
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=tags,
        start_time=info.start_time / 1000 if info.start_time else None,
        end_time=info.end_time / 1000 if info.end_time else None,
        models=[o.model_id for o in run.outputs.model_outputs] if run.outputs else [],
    )


def stage_records(parent_run_id: str) -> list[StageRecord]:
    """The child (stage) runs of a pipeline run, in start order."""
    client = _open()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], query, max_results=1000)  # a DAG's few stages
    return [_record(r) for r in sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))]


def resolve_pipeline_run(ref: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The parent run id for `ref`: a pipeline run id, a stage run id (its parent is
    returned) or a pipeline run name that is unique in `experiment`."""
    client = _open()
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            tags = client.get_run(ref).data.tags
            return tags.get("guilomo.kind") == "stage" and tags.get("mlflow.parentRunId") or ref
        except TrackingError:  # no such run: perhaps a run name
            pass
    hint = (
        f"list pipeline runs with `mlflow runs list --experiment-id <id>` or in the MLflow UI "
        f"at {_redact(client.uri)} (experiment {experiment!r}), and pass a run id or a unique "
        "run name"
    )
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no pipeline run {ref!r}: experiment {experiment!r} does not exist")
    quote = "'" if "'" not in ref else '"'
    if quote in ref:
        raise TrackingError(f"run name {ref!r}: contains both quote characters; {hint}")
    query = f"attributes.run_name = {quote}{ref}{quote} AND tags.`guilomo.kind` = 'pipeline'"
    found = client.search_runs([exp.experiment_id], query, max_results=20)
    if len(found) == 1:
        return found[0].info.run_id
    if not found:
        raise TrackingError(
            f"no pipeline run named or with id {ref!r} at {_redact(client.uri)}; {hint}"
        )
    ids = ", ".join(r.info.run_id for r in found[:5])
    raise TrackingError(f"{len(found)} pipeline runs are named {ref!r} ({ids}); pass the run id")
