"""Object storage: artifacts and checkpoint folders to and from local paths and a real S3
server (SeaweedFS, started per module by tests/servers.py; skipped only without `weed`)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from guilomo.artifacts import MANIFEST, ArtifactWriter, read_artifact
from guilomo.storage import (
    SYNC_BLOBS,
    SYNC_MARKER,
    LocalStore,
    S3Store,
    StorageError,
    Store,
    TransferSettings,
    open_store,
)
from servers import (
    BUCKET,
    NO_WEED,
    WeedS3Server,
    find_weed,
    free_ports,
    point_env_at,
    weed_s3_server,
)

MiB = 1 << 20
# A low multipart threshold keeps the multipart test file small (parts are >= 5 MiB).
SMALL_PARTS = TransferSettings(multipart_threshold=4 * MiB, multipart_chunksize=5 * MiB, attempts=3)


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture
def s3_env(weed, monkeypatch, tmp_path):
    point_env_at(weed, monkeypatch, tmp_path)
    return weed


@dataclass
class Backend:
    name: str
    base: str  # a URI prefix of this test's own
    server: WeedS3Server | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def store(self, **kw) -> Store:
        kw.setdefault("transfer", SMALL_PARTS)
        return open_store(self.base, **kw)

    def stamp(self, uri: str) -> object:
        """When the object was last written, as the backend itself tells."""
        if self.server is None:
            return LocalStore()._path(uri).stat().st_mtime_ns
        bucket, key = S3Store._split(uri)
        return self.server.client().head_object(Bucket=bucket, Key=key)["LastModified"]

    def tamper(self, uri: str, data: bytes, metadata: dict | None = None) -> None:
        """Replace an object's bytes behind the store's back."""
        if self.server is None:
            LocalStore()._path(uri).write_bytes(data)
            return
        bucket, key = S3Store._split(uri)
        self.server.client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})


@pytest.fixture(params=["local", "file", "s3"])
def backend(request, tmp_path):
    tag = f"{request.node.originalname}-{uuid.uuid4().hex[:6]}"
    if request.param == "local":
        return Backend("local", str(tmp_path / "remote" / tag))
    if request.param == "file":
        return Backend("file", (tmp_path / "remote" / tag).as_uri())
    server = request.getfixturevalue("s3_env")
    return Backend("s3", f"s3://{BUCKET}/{tag}", server)


# -- helpers -------------------------------------------------------------------------------
def make_artifact(dest: Path, big: int = 9 * MiB, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with ArtifactWriter(dest, kind="Adapter", stage="sft", config={"seed": seed}) as tmp:
        (tmp / "weights.bin").write_bytes(rng.randbytes(big))
        (tmp / "adapter_config.json").write_text(f'{{"rank": 8, "seed": {seed}}}\n')
        (tmp / "plots").mkdir()
        (tmp / "plots" / "loss.txt").write_text("1.0\n0.5\n")
    return dest


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- 1. round trip -------------------------------------------------------------------------
def test_artifact_roundtrip(backend, tmp_path):
    src = make_artifact(tmp_path / "src" / "adapter")
    store, uri = backend.store(), backend.uri("adapter")
    assert not store.exists(uri)
    manifest = store.put_artifact(src, uri)
    assert store.exists(uri)
    assert store.list(uri) == sorted(backend.uri("adapter", rel) for rel in tree(src))

    if backend.name == "s3":
        big = store.head(backend.uri("adapter", "weights.bin"))
        key = backend.uri("adapter", "weights.bin").split(f"{BUCKET}/", 1)[1]
        etag = backend.server.client().head_object(Bucket=BUCKET, Key=key)["ETag"]
        assert etag.strip('"').endswith("-2")  # multipart: 5 MiB + 4 MiB parts
        assert big.sha256 == manifest.files["weights.bin"] and big.size == 9 * MiB
        small = store.head(backend.uri("adapter", "adapter_config.json"))
        assert small.sha256 == manifest.files["adapter_config.json"]
        want = base64.b64encode(bytes.fromhex(small.sha256)).decode()
        assert small.checksum_sha256 == want  # the server checked the exact bytes

    out = tmp_path / "dst" / "adapter"
    got = store.get_artifact(uri, out, kind="Adapter")
    assert got == manifest == read_artifact(out, kind="Adapter")
    assert tree(out) == tree(src)
    assert os.listdir(out.parent) == ["adapter"]  # no temporary folder left

    assert store.put_artifact(src, uri) == manifest  # the same artifact again: a no-op
    assert store.get_artifact(uri, out) == manifest  # already there: kept
    other = make_artifact(tmp_path / "src" / "other", big=1000, seed=1)
    with pytest.raises(StorageError, match="already holds another Adapter artifact"):
        store.put_artifact(other, uri)
    with pytest.raises(StorageError, match="expected Allocation"):
        store.get_artifact(uri, tmp_path / "wrong", kind="Allocation")
    assert not (tmp_path / "wrong").exists()


# -- 2. no manifest, no artifact ---------------------------------------------------------------
def test_payload_without_manifest_is_absent(backend, tmp_path):
    src = make_artifact(tmp_path / "src" / "adapter", big=6 * MiB)
    store, uri = backend.store(), backend.uri("adapter")
    for rel in tree(src):  # an upload interrupted before the manifest
        if rel != MANIFEST:
            store.put_file(src / rel, backend.uri("adapter", rel))
    assert not store.exists(uri)
    out = tmp_path / "dst" / "adapter"
    with pytest.raises(StorageError, match=f"{uri}: no {MANIFEST}") as err:
        store.get_artifact(uri, out)
    assert "interrupted" in str(err.value)
    assert not out.exists() and os.listdir(out.parent) == []

    sent = []
    store.put_artifact(src, uri, progress=sent.append)  # resumes: the payload is already there
    assert store.exists(uri)
    assert store.get_artifact(uri, out).kind == "Adapter" and tree(out) == tree(src)


# -- 3. server killed during an upload -----------------------------------------------------
def test_upload_survives_server_restart(tmp_path_factory, tmp_path, monkeypatch, caplog):
    if find_weed() is None:
        pytest.skip(NO_WEED)
    caplog.set_level(logging.WARNING, logger="guilomo.storage")
    rng = random.Random(3)
    src = tmp_path / "adapter"
    with ArtifactWriter(src, kind="Adapter", stage="sft") as tmp:
        for name in "abcd":
            (tmp / f"{name}.bin").write_bytes(rng.randbytes(256 * 1024))
        (tmp / "e.bin").write_bytes(rng.randbytes(6 * MiB))  # multipart, after the restart
    payload = set(read_artifact(src).files)

    with weed_s3_server(tmp_path_factory.mktemp("weed-fault")) as server:
        point_env_at(server, monkeypatch, tmp_path)
        uri = f"s3://{BUCKET}/fault/adapter"
        transfer = TransferSettings(
            multipart_threshold=4 * MiB,
            multipart_chunksize=5 * MiB,
            attempts=12,  # botocore's backoff: waits of up to 0.05 * 2^k s, about 100 s in all
            connect_timeout=2,
            read_timeout=10,
        )
        writer = open_store(uri, transfer=transfer)
        reader = open_store(
            uri, transfer=TransferSettings(attempts=1, connect_timeout=1, read_timeout=2)
        )
        first_done, killed, errors, done = threading.Event(), threading.Event(), [], []

        def progress(rel: str) -> None:
            done.append(rel)
            if not first_done.is_set():
                first_done.set()
                assert killed.wait(20)

        def upload() -> None:
            try:
                writer.put_artifact(src, uri, progress=progress)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=upload)
        thread.start()
        try:
            assert first_done.wait(30)
            assert not reader.exists(uri)
            server.kill()  # SIGKILL by PID while the upload is between files
            killed.set()
            time.sleep(1.5)
            server.start()  # same ports, same data folder
            seen = []  # (manifest visible, objects present) while the upload runs
            while thread.is_alive():
                try:
                    if reader.exists(uri):
                        seen.append({u.rsplit("/", 1)[-1] for u in reader.list(uri)})
                except StorageError:
                    pass  # the restarted server may still be settling
                time.sleep(0.05)
        finally:
            killed.set()
            thread.join(90)
        assert not errors, errors
        assert done == [*sorted(payload), MANIFEST]
        for names in seen:  # whenever the manifest was visible, the whole payload was there
            assert payload <= names
        assert any("attempt" in r.getMessage() for r in caplog.records)  # it did retry
        client = server.client()
        stamps = {
            rel: client.head_object(Bucket=BUCKET, Key=f"fault/adapter/{rel}")["LastModified"]
            for rel in [*payload, MANIFEST]
        }
        assert all(stamps[MANIFEST] >= stamps[rel] for rel in payload)
        out = tmp_path / "out"
        reader.get_artifact(uri, out, kind="Adapter")
        assert tree(out) == tree(src)


# -- 4. corrupted objects --------------------------------------------------------------------
def test_corrupted_object_refused(backend, tmp_path):
    src = make_artifact(tmp_path / "src" / "adapter", big=1 * MiB)
    store, uri = backend.store(), backend.uri("adapter")
    manifest = store.put_artifact(src, uri)
    dst_parent = tmp_path / "dst"
    out = dst_parent / "adapter"
    target = backend.uri("adapter", "weights.bin")

    backend.tamper(target, b"not the weights")
    with pytest.raises(StorageError, match="weights.bin: checksum mismatch") as err:
        store.get_artifact(uri, out)
    assert str(err.value).startswith(uri)
    assert not out.exists() and os.listdir(dst_parent) == []

    if backend.name == "s3":  # same size, forged metadata: caught by the manifest
        data = bytearray((src / "weights.bin").read_bytes())
        data[123] ^= 0xFF
        backend.tamper(target, bytes(data), metadata={"sha256": manifest.files["weights.bin"]})
        with pytest.raises(StorageError, match="weights.bin: checksum mismatch"):
            store.get_artifact(uri, out)
        assert os.listdir(dst_parent) == []


# -- 5. checkpoint folders ---------------------------------------------------------------------
def test_sync_checkpoint_folder(backend, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "rng").mkdir(parents=True)
    (ckpt / "adapter.safetensors").write_bytes(os.urandom(2 * MiB))
    (ckpt / "trainer_state.json").write_text('{"step": 50}\n')
    (ckpt / "rng" / "state.json").write_text('{"seed": 1}\n')
    store, uri = backend.store(), backend.uri("ckpt")

    assert store.sync_dir_down(uri, tmp_path / "nothing") is None  # nothing synced yet
    first = store.sync_dir_up(ckpt, uri)
    assert sorted(first.transferred) == sorted(tree(ckpt)) and first.skipped == []

    def blob(rel: str) -> str:
        return backend.uri(
            "ckpt", SYNC_BLOBS, hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
        )

    stamp = backend.stamp(blob("adapter.safetensors"))
    again = store.sync_dir_up(ckpt, uri)
    assert again.transferred == [] and len(again.skipped) == 3

    old_state = blob("trainer_state.json")
    (ckpt / "trainer_state.json").write_text('{"step": 100}\n')
    time.sleep(1.1 if backend.server else 0.01)  # S3's LastModified counts whole seconds
    third = store.sync_dir_up(ckpt, uri)
    assert third.transferred == ["trainer_state.json"]
    assert sorted(third.skipped) == ["adapter.safetensors", "rng/state.json"]
    assert backend.stamp(blob("adapter.safetensors")) == stamp  # not re-uploaded
    assert store.head(old_state) is None and len(third.removed) == 1  # superseded blob pruned

    resumed = tmp_path / "resumed"
    down = store.sync_dir_down(uri, resumed)
    assert sorted(down.transferred) == sorted(tree(ckpt)) and tree(resumed) == tree(ckpt)
    assert store.sync_dir_down(uri, resumed).skipped == sorted(tree(ckpt))

    # An interrupted sync (new blob uploaded, marker not yet) leaves the last checkpoint intact.
    (ckpt / "trainer_state.json").write_text('{"step": 150}\n')
    store.put_file(ckpt / "trainer_state.json", blob("trainer_state.json"))
    fresh = tmp_path / "fresh"
    store.sync_dir_down(uri, fresh)
    assert (fresh / "trainer_state.json").read_text() == '{"step": 100}\n'
    assert store.head(backend.uri("ckpt", SYNC_MARKER)) is not None


# -- 6. local paths and URIs -------------------------------------------------------------------
def test_open_store_schemes(tmp_path):
    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StorageError, match="not an s3://bucket/prefix URI"):
        open_store("s3://bucket/x").exists(str(tmp_path))
    src = make_artifact(tmp_path / "a", big=10)
    with pytest.raises(StorageError, match="not a local path"):
        LocalStore().put_artifact(src, "s3://bucket/x")


def test_local_roundtrip_without_server(tmp_path):
    """The module-level helpers with plain paths: no server, no boto3 client."""
    from guilomo import storage

    src = make_artifact(tmp_path / "src", big=100_000)
    remote = tmp_path / "remote" / "adapter"
    storage.put_artifact(src, str(remote))
    assert open_store(remote).exists(str(remote)) and read_artifact(remote) == read_artifact(src)
    storage.get_artifact(remote.as_uri(), tmp_path / "back")
    assert tree(tmp_path / "back") == tree(src)
    assert len(storage.list_uris(str(remote))) == 4


# -- 7. credentials never leak -----------------------------------------------------------------
def test_credentials_never_in_errors_or_logs(s3_env, monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    src = make_artifact(tmp_path / "src", big=1000)
    uri = f"s3://{BUCKET}/creds/adapter"
    open_store(uri, transfer=SMALL_PARTS).put_artifact(src, uri)

    secret, key_id = "wrong-SECRET-0f1e2d3c4b5a", "WRONGKEYID7Q2X"
    messages = []
    for env in ({"AWS_SECRET_ACCESS_KEY": secret}, {"AWS_ACCESS_KEY_ID": key_id}):
        with monkeypatch.context() as m:
            for var, value in env.items():
                m.setenv(var, value)
            store = open_store(uri, transfer=SMALL_PARTS)
            calls = [
                lambda s=store: s.put_artifact(src, f"s3://{BUCKET}/creds/other"),
                lambda s=store: s.get_artifact(uri, tmp_path / "out"),
                lambda s=store: s.exists(uri),
                lambda s=store: s.sync_dir_up(src, f"s3://{BUCKET}/creds/ckpt"),
            ]
            for call in calls:
                with pytest.raises(StorageError) as err:
                    call()
                assert "AWS_SECRET_ACCESS_KEY" in str(err.value)  # the fix names the variable
                chain, e = [], err.value
                while e is not None:
                    chain.append(f"{e!r} {e}")
                    e = e.__cause__ or e.__context__
                messages += chain
    assert not (tmp_path / "out").exists()
    text = "\n".join(messages)
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for value in (secret, s3_env.secret_key):
        assert value not in text and value not in logs
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("guilomo"))
    for value in (key_id, s3_env.access_key):
        assert value not in text and value not in ours


def test_missing_credentials_explained(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_store(f"s3://{BUCKET}/x", transfer=SMALL_PARTS).exists(f"s3://{BUCKET}/x")


def test_unreachable_server_bounded_retries(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="guilomo.storage")
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    uri = "s3://bucket/x/f.bin"
    store = open_store(uri, transfer=TransferSettings(attempts=3))
    start = time.monotonic()
    with pytest.raises(
        StorageError, match=f"{uri}: upload failed: .*after up to 3 attempts"
    ) as err:
        store.put_file(src, uri)
    assert time.monotonic() - start < 10
    assert f"127.0.0.1:{port}" in str(err.value) and "run again" in str(err.value)
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert [m.split(": attempt ")[1][:3] for m in retries] == ["1/3", "2/3"]


def test_server_without_checksums(s3_env, tmp_path):
    """A server that rejects S3 checksums: the store notices, drops them and still verifies
    every upload by size and x-amz-meta-sha256."""
    from botocore.exceptions import ClientError

    uri = f"s3://{BUCKET}/nochecksum/adapter"
    store = open_store(uri, transfer=SMALL_PARTS)
    real = store._client.upload_file
    rejected = []

    def upload_file(*args, ExtraArgs=None, **kw):
        if any(k.startswith("Checksum") for k in ExtraArgs or {}):
            rejected.append(args[2])
            error = {"Code": "NotImplemented", "Message": "checksums are not implemented"}
            raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 501}}, "Put")
        return real(*args, ExtraArgs=ExtraArgs, **kw)

    store._client.upload_file = upload_file
    src = make_artifact(tmp_path / "src", big=5 * MiB)
    manifest = store.put_artifact(src, uri)
    assert len(rejected) == 1 and store._checksums is False
    info = store.head(f"{uri}/weights.bin")
    assert info.sha256 == manifest.files["weights.bin"] and info.checksum_sha256 is None
    store.get_artifact(uri, tmp_path / "out")
    assert tree(tmp_path / "out") == tree(src)
