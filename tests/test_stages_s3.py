"""`guilomo stage NAME` with every artifact on S3 (a real SeaweedFS server), checkpoints pushed
while SFT runs, a killed stage resumed on a fresh "pod", bad upstream artifacts, and the
per-step hooks of SFT and search."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from guilomo import cli
from guilomo.artifacts import MANIFEST, read_artifact
from guilomo.storage import (
    SYNC_BLOBS,
    SYNC_MARKER,
    NotFoundError,
    S3Store,
    get_artifact,
    get_file,
    list_uris,
    open_store,
    put_artifact,
)
from servers import (
    AWS_UNSET,
    BUCKET,
    client_env,
    point_env_at,
)
from sft_helpers import allocation, base_and_data, model_and_tokenizer, prepared

GUILOMO = str(Path(sys.executable).parent / "guilomo")
STEPS = 24  # SFT steps of the checkpoint tests: long enough to be seen mid-run


@pytest.fixture
def env(weed, monkeypatch, tmp_path):
    """This process pointed at the server, with its own artifact cache."""
    point_env_at(weed, monkeypatch, tmp_path)
    monkeypatch.setenv("GUILOMO_CACHE", str(tmp_path / "cache"))
    return weed


@pytest.fixture(scope="module")
def world(weed, tmp_path_factory):
    """A tiny base model folder, and a PreparedDataset and an Allocation on S3."""
    root = base_and_data(tmp_path_factory.mktemp("s3world"))
    prefix = f"s3://{BUCKET}/stages-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        point_env_at(weed, mp, root)
        from guilomo.stages.allocate import AllocateConfig, run_allocate

        run_allocate(
            AllocateConfig(base_model=str(root / "base"), preset="2468", rank=4), root / "alloc"
        )
        put_artifact(root / "data", f"{prefix}/inputs/data")
        put_artifact(root / "alloc", f"{prefix}/inputs/alloc")

    def environ(cache: Path) -> dict[str, str]:
        """The environment of one `guilomo` process; a new `cache` is a new pod's disk."""
        base = {k: v for k, v in os.environ.items() if k not in AWS_UNSET}
        return {**base, **client_env(weed, root), "GUILOMO_CACHE": str(cache)}

    return SimpleNamespace(
        server=weed,
        root=root,
        base=root / "base",
        prefix=prefix,
        data=f"{prefix}/inputs/data",
        alloc=f"{prefix}/inputs/alloc",
        environ=environ,
        uri=lambda name: f"{prefix}/{name}",
    )


def guilomo(*args, env, check=True):
    r = subprocess.run(
        [GUILOMO, *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def sft_args(world, out, *extra, data=None):
    return [
        "stage",
        "sft",
        "--dataset",
        data or world.data,
        "--allocation",
        world.alloc,
        "--out",
        out,
        "--base-model",
        world.base,
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        "--cutoff",
        64,
        "--quiet",
        *extra,
    ]


def manifest_at(uri):
    m = open_store(uri).read_manifest(uri)
    assert m is not None, f"no manifest at {uri}"
    return m


def checkpoint_step(uri: str, tmp: Path) -> int | None:
    """The step of the SFT checkpoint last pushed to `uri` (None: nothing pushed yet, or
    the run pushed a newer one and pruned this one's blobs between our two reads)."""
    if open_store(uri).head(f"{uri}/{SYNC_MARKER}") is None:
        return None
    tag = uuid.uuid4().hex[:8]
    try:
        get_file(f"{uri}/{SYNC_MARKER}", tmp / f"marker-{tag}.json")
        files = json.loads((tmp / f"marker-{tag}.json").read_text())["files"]
        sha = files["trainer_state.json"]["sha256"]
        get_file(f"{uri}/{SYNC_BLOBS}/{sha}", tmp / f"state-{tag}.json")
    except NotFoundError:  # superseded while we read: the caller polls again
        return None
    return json.loads((tmp / f"state-{tag}.json").read_text())["step"]


def adapter_tensors(uri: str, dest: Path) -> dict[str, torch.Tensor]:
    get_artifact(uri, dest, kind="Adapter")
    return load_file(str(dest / "adapter_model.safetensors"))


# -- 1. the five stages chained through S3 -----------------------------------------------------
def test_five_stages_chained_through_s3(world, env, tmp_path):
    environ = world.environ(tmp_path / "cache")
    uri = {n: world.uri(f"chain/{n}") for n in ("data", "search", "alloc", "adapter", "eval")}
    guilomo(
        "stage",
        "preprocess",
        "--out",
        uri["data"],
        "--datasets",
        "sciq",
        "--train-size",
        24,
        "--validation-size",
        8,
        "--test-size",
        8,
        "--seed",
        1,
        env=environ,
    )
    tiny = ["--base-model", world.base, "--cutoff", 64, "--quiet"]
    guilomo(
        "stage",
        "search",
        "--dataset",
        uri["data"],
        "--out",
        uri["search"],
        *tiny,
        "--steps",
        2,
        "--max-experts",
        2,
        "--max-rank",
        2,
        "--top-k",
        1,
        "--batch-size",
        8,
        env=environ,
    )
    guilomo("stage", "allocate", "--search", uri["search"], "--out", uri["alloc"], env=environ)
    r = guilomo(
        "stage",
        "sft",
        "--dataset",
        uri["data"],
        "--allocation",
        uri["alloc"],
        "--out",
        uri["adapter"],
        *tiny,
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        env=environ,
    )
    assert f"-> {uri['adapter']}" in r.stdout
    r = guilomo(
        "stage",
        "evaluate",
        "--dataset",
        uri["data"],
        "--adapter",
        uri["adapter"],
        "--out",
        uri["eval"],
        "--base-model",
        world.base,
        "--limit",
        4,
        "--max-new-tokens",
        4,
        env=environ,
    )
    assert "accuracy" in r.stdout

    kinds = {
        "data": ("PreparedDataset", None),
        "search": ("SearchState", [uri["data"]]),
        "alloc": ("Allocation", [uri["search"]]),
        "adapter": ("Adapter", [uri["data"], uri["alloc"]]),
        "eval": ("EvalReport", [uri["data"], uri["adapter"]]),
    }
    for name, (kind, parents) in kinds.items():
        m = manifest_at(uri[name])
        assert m.kind == kind, name
        if parents is not None:
            assert m.parents == parents, (name, m.parents)  # the URIs, not the cache folders
        report = get_artifact(uri[name], tmp_path / "check" / name, kind=kind)  # verifies
        assert report.digest == m.digest
    # S3 inputs were cached by manifest digest; the default checkpoints sit beside OUT on S3.
    cached = {p.name for p in (tmp_path / "cache" / "artifacts").iterdir()}
    assert {manifest_at(uri[n]).digest for n in ("data", "search", "alloc", "adapter")} <= cached
    assert open_store(uri["adapter"]).head(f"{uri['adapter']}.ckpt/{SYNC_MARKER}") is not None
    assert open_store(uri["search"]).head(f"{uri['search']}.ckpt/{SYNC_MARKER}") is not None
    report = json.loads((tmp_path / "check" / "eval" / "report.json").read_text())
    assert report["total"] == 4


# -- 2. checkpoints reach S3 while SFT runs ----------------------------------------------------
@pytest.fixture(scope="module")
def full_sft(world, tmp_path_factory):
    """An uninterrupted SFT run with S3 checkpoints, watched from outside while it runs."""
    tmp = tmp_path_factory.mktemp("full")
    out, ckpt = world.uri("full/adapter"), world.uri("full/ckpt")
    args = sft_args(world, out, "--max-steps", STEPS, "--checkpoint-every", 2)
    args += ["--checkpoints", ckpt]
    environ = world.environ(tmp / "cache")
    seen_step, seen_running = None, False
    with pytest.MonkeyPatch.context() as mp:
        point_env_at(world.server, mp, tmp)
        with open(tmp / "log", "w") as log:
            proc = subprocess.Popen(
                [GUILOMO, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, env=environ
            )
            try:
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline:
                    step = checkpoint_step(ckpt, tmp)
                    if step is not None and step < STEPS and proc.poll() is None:
                        seen_step, seen_running = step, True  # on S3 before the run ended
                        break
                    time.sleep(0.05)
                rc = proc.wait(300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        final_step = checkpoint_step(ckpt, tmp)
    assert rc == 0, (tmp / "log").read_text()[-3000:]
    return SimpleNamespace(
        out=out,
        ckpt=ckpt,
        seen_step=seen_step,
        seen_running=seen_running,
        final_step=final_step,
        log=(tmp / "log").read_text(),
    )


def test_checkpoints_reach_s3_while_sft_runs(world, env, full_sft):
    assert full_sft.seen_running, full_sft.log[-2000:]
    assert 2 <= full_sft.seen_step < STEPS  # a mid-run checkpoint, visible from outside
    assert full_sft.final_step == STEPS
    assert f"{STEPS} steps (resumed from 0)" in full_sft.log
    m = manifest_at(full_sft.out)
    assert m.kind == "Adapter" and m.parents == [world.data, world.alloc]


# -- 3. killed, then resumed from S3 on a fresh pod --------------------------------------------
@pytest.mark.slow
def test_killed_sft_resumes_from_s3_on_a_fresh_pod(world, env, full_sft, tmp_path):
    out, ckpt = world.uri("killed/adapter"), world.uri("killed/ckpt")
    args = sft_args(world, out, "--max-steps", STEPS, "--checkpoint-every", 2)
    args += ["--checkpoints", ckpt]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(
            [GUILOMO, *map(str, args)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=world.environ(tmp_path / "pod1"),
        )
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if open_store(ckpt).head(f"{ckpt}/{SYNC_MARKER}") is not None:
                    break
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = checkpoint_step(ckpt, tmp_path)
    assert step is not None and 2 <= step < STEPS, (step, (tmp_path / "log").read_text()[-2000:])
    assert list_uris(out) == []  # nothing published by the killed run

    r = guilomo(*args, env=world.environ(tmp_path / "pod2"))  # a new pod: an empty disk
    assert f"{STEPS} steps (resumed from {step})" in r.stdout, r.stdout
    assert manifest_at(out).parents == [world.data, world.alloc]
    a = adapter_tensors(full_sft.out, tmp_path / "full")
    b = adapter_tensors(out, tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 4. bad upstream artifacts on S3 -----------------------------------------------------------
def _broken(world, weed, case: str, tmp: Path) -> str:
    """A copy of the dataset on S3, damaged as `case` says."""
    uri = world.uri(f"broken/{case}-{uuid.uuid4().hex[:6]}")
    if case == "nothing":
        return uri
    put_artifact(prepared(tmp / "data"), uri)
    bucket, key = S3Store._split(uri)
    client = weed.client()
    if case == "no-manifest":  # payload uploaded, manifest never published
        client.delete_object(Bucket=bucket, Key=f"{key}/{MANIFEST}")
    elif case == "manifest-not-json":
        client.put_object(Bucket=bucket, Key=f"{key}/{MANIFEST}", Body=b'{"kind": "Prep')
    elif case == "manifest-wrong-schema":
        doc = json.loads((tmp / "data" / MANIFEST).read_text())
        doc["files"] = "everything"
        client.put_object(Bucket=bucket, Key=f"{key}/{MANIFEST}", Body=json.dumps(doc).encode())
    elif case == "payload-tampered":
        rel = next(r for r in read_artifact(tmp / "data").files if r.endswith(".jsonl"))
        client.put_object(Bucket=bucket, Key=f"{key}/{rel}", Body=b'{"instruction": "x"}\n')
    return uri


@pytest.mark.parametrize(
    "case,message",
    [
        ("nothing", "no manifest.json"),
        ("no-manifest", "no manifest.json"),
        ("manifest-not-json", "not valid JSON"),
        ("manifest-wrong-schema", "invalid manifest.json"),
        ("payload-tampered", "checksum mismatch"),
    ],
)
def test_bad_upstream_artifact_exits_2_and_publishes_nothing(
    world, env, tmp_path, capsys, case, message
):
    data = _broken(world, env, case, tmp_path)
    out = world.uri(f"broken/out-{uuid.uuid4().hex[:6]}")
    rc = cli.main([str(a) for a in sft_args(world, out, "--max-steps", 2, data=data)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert data in err and message in err, err
    assert err.startswith("guilomo stage sft: error: ") and "Traceback" not in err
    assert list_uris(out) == [] and list_uris(f"{out}.ckpt") == []
    cached = tmp_path / "cache" / "artifacts"  # nothing half-downloaded left behind
    assert not cached.exists() or list(cached.iterdir()) == []


def test_wrong_kind_and_existing_output_refused(world, env, capsys):
    out = world.uri(f"wrong/{uuid.uuid4().hex[:6]}")
    rc = cli.main(["stage", "allocate", "--search", world.data, "--out", out])
    err = capsys.readouterr().err
    assert rc == 2 and world.data in err and "expected SearchState" in err, err
    assert list_uris(out) == []
    rc = cli.main(["stage", "allocate", "--out", world.alloc, "--preset", "2468"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{world.alloc}: already holds an artifact" in err, err


# -- 5. per-step hooks and checkpoint URIs, in process -----------------------------------------
def test_sft_on_step_reports_what_the_result_records(tmp_path):
    from guilomo.stages.sft import SftConfig, run_sft

    model, tok = model_and_tokenizer()
    cfg = SftConfig(
        base_model="tiny", max_steps=4, batch_size=4, micro_batch_size=2, cutoff=64, seed=1
    )
    calls: list[tuple[int, dict[str, float]]] = []
    r = run_sft(
        cfg,
        dataset=prepared(tmp_path / "data"),
        allocation=allocation(model),
        out=tmp_path / "adapter",
        model=model,
        tokenizer=tok,
        progress=False,
        on_step=lambda step, m: calls.append((step, m)),
    )
    assert [s for s, _ in calls] == [1, 2, 3, 4]
    assert [m["loss"] for _, m in calls] == r.losses
    assert all(set(m) == {"loss", "lr", "step_tokens_per_second"} for _, m in calls)
    assert all(m["lr"] > 0 and m["step_tokens_per_second"] > 0 for _, m in calls)


def test_search_on_step_and_checkpoint_uri(env, tmp_path):
    """Search pushes its checkpoints to S3; a run on a fresh folder pulls them and resumes."""
    from guilomo.stages.search import SearchConfig, run_search_stage

    cfg = SearchConfig(
        base_model="tiny",
        max_experts=2,
        max_rank=2,
        top_k=1,
        steps=3,
        batch_size=8,
        cutoff=64,
        checkpoint_every=2,
        seed=2,
    )
    data = prepared(tmp_path / "data")
    ckpt_uri = f"s3://{BUCKET}/search-ckpt-{uuid.uuid4().hex[:8]}"

    def search(name, calls):
        model, tok = model_and_tokenizer()
        return run_search_stage(
            cfg,
            dataset=data,
            out=tmp_path / name,
            checkpoints=tmp_path / f"{name}.ckpt",
            checkpoint_uri=ckpt_uri,
            model=model,
            tokenizer=tok,
            parents=["s3://somewhere/data"],
            progress=False,
            on_step=lambda step, m: calls.append((step, m)),
        )

    calls: list[tuple[int, dict[str, float]]] = []
    first = search("first", calls)
    assert first.resumed_from == 0 and [s for s, _ in calls] == [1, 2, 3]
    assert [m for _, m in calls] == [
        {k: v for k, v in row.items() if k != "step"} for row in first.losses
    ]
    assert {"train_loss", "val_loss"} <= set(calls[0][1])
    assert open_store(ckpt_uri).head(f"{ckpt_uri}/{SYNC_MARKER}") is not None
    assert read_artifact(tmp_path / "first").parents == ["s3://somewhere/data"]

    again: list = []
    second = search("second", again)  # a fresh local folder: the state comes from S3
    assert second.resumed_from == 3 and again == []
    a = load_file(str(tmp_path / "first" / "search_state.safetensors"))
    b = load_file(str(tmp_path / "second" / "search_state.safetensors"))
    for k in a:
        if k != "rng":
            assert torch.equal(a[k], b[k]), k


def test_s3_inputs_into_a_local_output(world, env, tmp_path):
    """A local OUT fed from S3: the manifest names the S3 URIs (also for stages that record
    the paths they were given), and no staging folder is left beside OUT."""
    from guilomo.stages.search import SearchConfig, run_search_stage

    model, tok = model_and_tokenizer()
    cfg = SearchConfig(base_model=str(world.base), max_experts=2, max_rank=2, top_k=1, steps=1)
    run_search_stage(
        cfg.model_copy(update={"batch_size": 8, "cutoff": 64}),
        dataset=prepared(tmp_path / "data"),
        out=tmp_path / "search",
        checkpoints=tmp_path / "search.ckpt",
        model=model,
        tokenizer=tok,
        progress=False,
    )
    state = world.uri(f"local-out/search-{uuid.uuid4().hex[:6]}")
    put_artifact(tmp_path / "search", state)
    out = tmp_path / "runs" / "alloc"
    assert cli.main(["stage", "allocate", "--search", state, "--out", str(out)]) == 0
    m = read_artifact(out, kind="Allocation")
    assert m.parents == [state]
    assert [p.name for p in out.parent.iterdir()] == ["alloc"]
