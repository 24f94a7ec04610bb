"""Object storage for artifacts and checkpoints: local folders and S3 (`s3://bucket/prefix`).

`open_store(uri)` picks the implementation from the URI: a local path or `file://` URI gives a
`LocalStore`, `s3://bucket/prefix` an `S3Store` (boto3). Both share the same guarantees:

* `put_artifact(local_dir, uri)` uploads every payload file, verifies each upload (size and
  sha256, plus S3 checksums where the server supports them) and uploads `manifest.json`
  LAST. A prefix without a manifest is absent or incomplete, never half an artifact.
* `get_artifact(uri, local_dir)` downloads into a temporary sibling folder, verifies every
  checksum with `read_artifact` and only then renames the folder into place.
* `sync_dir_up(local_dir, uri)` / `sync_dir_down(uri, local_dir)` push and pull a running
  stage's checkpoint folder. Files are stored by content (`<uri>/blobs/<sha256>`) and a
  marker (`<uri>/sync.json`) naming them is written last, so changed files are uploaded,
  unchanged ones skipped, and an interrupted sync leaves the previous checkpoint intact.

S3 endpoint, region and credentials come only from the environment: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (unset: AWS itself), `AWS_REGION` or `AWS_DEFAULT_REGION`, and
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (or anything else boto3's credential chain
finds). Credentials are never logged or put in error messages. Transient failures
(connection errors, timeouts, 5xx, throttling) are retried twice over: by botocore per
request, and around each whole-file transfer with exponential backoff, bounded in attempts
and total time.

    store = open_store("s3://bucket/runs/42")
    store.put_artifact("runs/42/allocation", "s3://bucket/runs/42/allocation")
    store.get_artifact("s3://bucket/runs/42/allocation", "/tmp/allocation", kind="Allocation")
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import ValidationError

from .artifacts import MANIFEST, ArtifactError, ArtifactKind, Manifest, read_artifact, sha256_file

log = logging.getLogger(__name__)

MiB = 1 << 20
SYNC_MARKER = "sync.json"
SYNC_BLOBS = "blobs"
SHA256_METADATA = "sha256"  # stored as the object metadata header x-amz-meta-sha256
_CREDENTIAL_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if used) in the "
    "environment, and that they may access this bucket"
)
_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "BadDigest",
        "XAmzContentSHA256Mismatch",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidClientTokenId",
        "403",
    }
)

T = TypeVar("T")


class StorageError(ValueError):
    """An object-store operation failed; the message names the URI and the fix."""


class NotFoundError(StorageError):
    """No object at the URI."""


class _Transient(Exception):
    """Internal: a transfer finished but did not verify; worth another attempt."""


@dataclass(frozen=True)
class RetryPolicy:
    """Outer retries around whole operations: exponential backoff with jitter, bounded by
    `attempts` and by `deadline` seconds in total."""

    attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 8.0
    deadline: float = 120.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * random.uniform(0.75, 1)


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer and client settings (ignored by `LocalStore`)."""

    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    max_concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    client_attempts: int = 3  # botocore's own per-request retries ("standard" mode)


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object."""

    uri: str
    size: int
    sha256: str | None = None  # from the object's metadata (S3) or computed (local)
    etag: str | None = None
    checksum_sha256: str | None = None  # the server's own checksum (base64), if any


@dataclass
class SyncResult:
    """Relative paths transferred, skipped (already identical) and removed by a sync."""

    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


ProgressFn = Callable[[str], None]


# -- helpers ------------------------------------------------------------------------------
def _join(uri: str, rel: str) -> str:
    return f"{uri.rstrip('/')}/{rel}"


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _redact(text: str) -> str:
    """`text` with any credential value from the environment replaced by ***."""
    for var in _CREDENTIAL_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _check_rel(rel: str, uri: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise StorageError(f"{uri}: refusing unsafe file name {rel!r} in the manifest")
    return rel


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes, contexts and wrapped `last_exception`s."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        last = getattr(e, "last_exception", None)
        todo += [e.__cause__, e.__context__, last if isinstance(last, BaseException) else None]


def _copy_hashing(src: Path, dst: Path, chunk: int = MiB) -> tuple[str, int]:
    """Copy `src` to `dst`; return the sha256 and size of the bytes copied."""
    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            h.update(block)
            fout.write(block)
            n += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), n


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# -- the interface ------------------------------------------------------------------------
class Store(ABC):
    """Artifact and checkpoint transfers between local folders and one kind of storage.

    Subclasses implement single-attempt primitives (`_head`, `_upload`, `_download`,
    `_list`, `_delete`); this class adds retries, verification and the publish protocols.
    """

    def __init__(self, retry: RetryPolicy | None = None) -> None:
        self.retry = retry or RetryPolicy()

    # -- primitives (one attempt each) --------------------------------------------------
    @abstractmethod
    def _check_uri(self, uri: str | os.PathLike) -> str:
        """`uri` as a string, or StorageError if this store cannot handle it."""

    @abstractmethod
    def _head(self, uri: str) -> ObjectInfo | None:
        """The object at `uri`, or None when there is none."""

    @abstractmethod
    def _upload(self, local: Path, uri: str, sha256: str, size: int) -> ObjectInfo:
        """Upload `local` (whose sha256 and size are given) and verify the stored object."""

    @abstractmethod
    def _download(self, uri: str, dest: Path) -> ObjectInfo:
        """Download to `dest`; NotFoundError if there is no object."""

    @abstractmethod
    def _list(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        """Every object under the folder `uri_prefix`."""

    @abstractmethod
    def _delete(self, uri: str) -> None:
        """Remove the object at `uri` (no error if there is none)."""

    def _is_transient(self, exc: BaseException) -> bool:
        return False

    def _describe(self, exc: BaseException) -> str:
        text = str(exc) if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"
        return _redact(text)[:400]

    def _hint(self, exc: BaseException) -> str:
        return "check the path and its permissions"

    def _where(self) -> str:
        return "the file system"

    def _remote_sha256(self, info: ObjectInfo) -> str | None:
        return info.sha256

    # -- retries ------------------------------------------------------------------------
    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """`fn()`, retried with backoff on transient errors; StorageError naming `uri`."""
        policy, start, attempt = self.retry, time.monotonic(), 0
        while True:
            attempt += 1
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                desc = self._describe(exc)
                if not (isinstance(exc, _Transient) or self._is_transient(exc)):
                    raise StorageError(f"{uri}: {op} failed: {desc}; {self._hint(exc)}") from exc
                elapsed, delay = time.monotonic() - start, policy.delay(attempt)
                if attempt >= policy.attempts or elapsed + delay > policy.deadline:
                    raise StorageError(
                        f"{uri}: {op} failed after {attempt} attempts in {elapsed:.1f}s: {desc}; "
                        f"check that {self._where()} is reachable and healthy, then run again "
                        "(transfers are safe to repeat)"
                    ) from exc
                log.warning(
                    "%s: %s failed (%s); attempt %d/%d in %.1fs",
                    uri,
                    op,
                    desc,
                    attempt + 1,
                    policy.attempts,
                    delay,
                )
                time.sleep(delay)

    # -- single objects -----------------------------------------------------------------
    def head(self, uri: str) -> ObjectInfo | None:
        """The object at `uri` (size, sha256 metadata, ETag), or None."""
        uri = self._check_uri(uri)
        return self._call("head", uri, lambda: self._head(uri))

    def put_file(
        self, local: str | os.PathLike, uri: str, *, sha256: str | None = None
    ) -> ObjectInfo:
        """Upload one file (sha256 computed unless given) and verify it; returns the object."""
        uri, src = self._check_uri(uri), Path(local)
        if not src.is_file():
            raise StorageError(f"{src}: not a file, so it cannot be uploaded to {uri}")
        digest = sha256 or sha256_file(src)
        size = src.stat().st_size
        return self._call("upload", uri, lambda: self._upload(src, uri, digest, size))

    def get_file(
        self, uri: str, local: str | os.PathLike, *, sha256: str | None = None
    ) -> ObjectInfo:
        """Download one object to `local` (atomically: temporary file, then rename), checking
        its size, its recorded sha256 and, if given, the expected `sha256`."""
        uri, dest = self._check_uri(uri), Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "part")

        def attempt() -> tuple[ObjectInfo, str]:
            info = self._download(uri, tmp)
            size = tmp.stat().st_size
            if size != info.size:
                raise _Transient(f"got {size} bytes of the object's {info.size}")
            return info, sha256_file(tmp)

        try:
            info, got = self._call("download", uri, attempt)
            if info.sha256 is not None and got != info.sha256:
                raise StorageError(
                    f"{uri}: checksum mismatch: the object's bytes have sha256 {got[:16]}..., "
                    f"its metadata records {info.sha256[:16]}...; the object was corrupted or "
                    "replaced after upload: upload it again from its source"
                )
            if sha256 is not None and got != sha256:
                raise StorageError(
                    f"{uri}: checksum mismatch: the object has sha256 {got[:16]}..., the "
                    f"manifest expects {sha256[:16]}...; the object was corrupted or replaced "
                    "after upload: upload it again from its source"
                )
            os.replace(tmp, dest)
            return info
        finally:
            tmp.unlink(missing_ok=True)

    def _read_json(self, uri: str) -> Any | None:
        """The JSON object at `uri`, or None when there is none."""
        with tempfile.TemporaryDirectory(prefix="guilomo-storage-") as d:
            try:
                self.get_file(uri, Path(d) / "doc.json")
            except NotFoundError:
                return None
            text = (Path(d) / "doc.json").read_text()
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri}: not valid JSON ({exc}); upload it again") from None

    def _write_json(self, doc: Any, uri: str) -> ObjectInfo:
        with tempfile.TemporaryDirectory(prefix="guilomo-storage-") as d:
            path = Path(d) / "doc.json"
            path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            return self.put_file(path, uri)

    def _same(self, info: ObjectInfo | None, sha256: str, size: int) -> bool:
        return info is not None and info.size == size and self._remote_sha256(info) == sha256

    # -- artifacts ----------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        """Whether a complete artifact (its manifest) is at `uri`."""
        return self.head(_join(self._check_uri(uri), MANIFEST)) is not None

    def read_manifest(self, uri: str) -> Manifest | None:
        """The manifest of the artifact at `uri`, or None when there is none."""
        uri = self._check_uri(uri)
        doc = self._read_json(_join(uri, MANIFEST))
        if doc is None:
            return None
        try:
            return Manifest.model_validate(doc)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"]) or "(root)"
            raise StorageError(
                f"{uri}: invalid {MANIFEST}: {loc}: {err['msg']}; upload the artifact again"
            ) from None

    def put_artifact(
        self,
        local_dir: str | os.PathLike,
        uri: str,
        *,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
    ) -> Manifest:
        """Upload the verified artifact at `local_dir` to `uri`, `manifest.json` last.

        Files already stored with the same size and sha256 are not sent again, so rerunning
        an interrupted upload resumes it; uploading the same artifact twice is a no-op.
        `progress(rel)` is called after each file is stored.
        """
        uri, root = self._check_uri(uri), Path(local_dir)
        try:
            manifest = read_artifact(root)
        except ArtifactError as exc:
            raise StorageError(f"cannot upload to {uri}: {exc}") from None
        murl = _join(uri, MANIFEST)
        try:
            remote = self.read_manifest(uri)
        except StorageError:  # an invalid manifest: replace it only when asked to
            if not overwrite:
                raise
            remote = None
            self._call("delete", murl, lambda: self._delete(murl))
        if remote is not None:
            if remote.kind == manifest.kind and remote.digest == manifest.digest:
                log.info("%s: already holds this %s artifact", uri, manifest.kind)
                return remote
            if not overwrite:
                raise StorageError(
                    f"{uri}: already holds another {remote.kind} artifact; upload to a new URI "
                    "(artifacts are immutable) or pass overwrite=True"
                )
            self._call("delete", murl, lambda: self._delete(murl))  # unpublish first
        start, sent = time.monotonic(), 0
        for rel, sha in manifest.files.items():
            src, dst = root / rel, _join(uri, rel)
            size = src.stat().st_size
            if not self._same(self.head(dst), sha, size):
                self.put_file(src, dst, sha256=sha)
                sent += size
            if progress is not None:
                progress(rel)
        self.put_file(root / MANIFEST, murl)  # publish
        if progress is not None:
            progress(MANIFEST)
        log.info(
            "%s: uploaded %s artifact (%d files, %.1f MiB sent) in %.1fs",
            uri,
            manifest.kind,
            len(manifest.files),
            sent / MiB,
            time.monotonic() - start,
        )
        return manifest

    def get_artifact(
        self,
        uri: str,
        local_dir: str | os.PathLike,
        *,
        kind: ArtifactKind | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Download the artifact at `uri` to `local_dir`, verified, or raise StorageError.

        Files go to a temporary sibling folder that is checked with `read_artifact` (every
        checksum) and then renamed into place; on any error nothing is left at `local_dir`.
        An identical artifact already at `local_dir` is kept as it is.
        """
        uri, dest = self._check_uri(uri), Path(local_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "tmp")
        tmp.mkdir()
        try:
            try:
                self.get_file(_join(uri, MANIFEST), tmp / MANIFEST)
            except NotFoundError:
                raise StorageError(
                    f"{uri}: no {MANIFEST}, so there is no complete artifact here (nothing was "
                    "uploaded, or the upload was interrupted before it published the "
                    "manifest); check the URI or rerun the upload"
                ) from None
            try:
                manifest = Manifest.model_validate_json((tmp / MANIFEST).read_text())
            except ValidationError as exc:
                raise StorageError(
                    f"{uri}: invalid {MANIFEST} ({exc.errors()[0]['msg']}); upload it again"
                ) from None
            if kind is not None and manifest.kind != kind:
                raise StorageError(f"{uri}: holds a {manifest.kind} artifact, expected {kind}")
            if dest.exists():
                try:
                    if read_artifact(dest).digest == manifest.digest:
                        return manifest
                except ArtifactError:
                    pass
                if not overwrite:
                    raise StorageError(
                        f"{dest}: already exists and differs from {uri}; choose another "
                        "destination or pass overwrite=True"
                    )
            for rel, sha in manifest.files.items():
                _check_rel(rel, uri)
                self.get_file(_join(uri, rel), tmp / rel, sha256=sha)
            try:
                read_artifact(tmp, kind=kind)
            except ArtifactError as exc:
                raise StorageError(f"{uri}: refusing the downloaded artifact: {exc}") from None
            if dest.exists():
                old = _tmp_sibling(dest, "old")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
            log.info("%s: downloaded %s artifact to %s", uri, manifest.kind, dest)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- checkpoint folders -------------------------------------------------------------
    def sync_dir_up(
        self,
        local_dir: str | os.PathLike,
        uri: str,
        *,
        prune: bool = True,
        progress: ProgressFn | None = None,
    ) -> SyncResult:
        """Push a checkpoint folder: new or changed files to `<uri>/blobs/<sha256>`, then the
        marker `<uri>/sync.json` naming them (last). With `prune`, blobs the new marker does
        not name are deleted afterwards. Call it between checkpoint saves, not during one."""
        uri, root = self._check_uri(uri), Path(local_dir)
        if not root.is_dir():
            raise StorageError(f"{root}: no such folder, so there is nothing to sync to {uri}")
        files = {
            p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
        result = SyncResult()
        for rel, ent in files.items():
            blob = _join(uri, f"{SYNC_BLOBS}/{ent['sha256']}")
            info = self.head(blob)
            if (
                info is not None
                and info.size == ent["size"]
                and info.sha256 in (None, ent["sha256"])
            ):
                result.skipped.append(rel)
            else:
                self.put_file(root / rel, blob, sha256=ent["sha256"])
                result.transferred.append(rel)
            if progress is not None:
                progress(rel)
        marker = {
            "version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        self._write_json(marker, _join(uri, SYNC_MARKER))
        if prune:
            keep = {ent["sha256"] for ent in files.values()}
            for obj in self._list_infos(_join(uri, SYNC_BLOBS)):
                name = obj.uri.rsplit("/", 1)[-1]
                if name not in keep:
                    self._call("delete", obj.uri, lambda u=obj.uri: self._delete(u))
                    result.removed.append(name)
        log.info(
            "%s: synced %s up (%d sent, %d unchanged)",
            uri,
            root,
            len(result.transferred),
            len(result.skipped),
        )
        return result

    def sync_dir_down(
        self, uri: str, local_dir: str | os.PathLike, *, prune: bool = False
    ) -> SyncResult | None:
        """Pull the checkpoint folder last synced to `uri` into `local_dir` (a retried pod
        resuming). Returns None when nothing was ever synced there. Changed files are
        downloaded and verified first, then moved into place; identical ones are skipped.
        With `prune`, local files the checkpoint does not name are deleted."""
        uri, root = self._check_uri(uri), Path(local_dir)
        for attempt in range(3):
            marker = self._read_json(_join(uri, SYNC_MARKER))
            if marker is None:
                return None
            try:
                return self._sync_down(uri, root, marker, prune)
            except NotFoundError as exc:  # a concurrent sync_dir_up pruned a blob: reread
                if attempt == 2:
                    raise StorageError(
                        f"{uri}: the checkpoint changed during three downloads in a row ({exc}); "
                        "stop the other writer, then run again"
                    ) from None
                log.warning("%s: checkpoint changed while downloading; reading it again", uri)
        raise AssertionError("unreachable")

    def _sync_down(self, uri: str, root: Path, marker: Any, prune: bool) -> SyncResult:
        try:
            files = {
                _check_rel(rel, uri): (str(ent["sha256"]), int(ent["size"]))
                for rel, ent in marker["files"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError):
            raise StorageError(
                f"{_join(uri, SYNC_MARKER)}: not a sync marker; sync the folder up again"
            ) from None
        root.mkdir(parents=True, exist_ok=True)
        staging = _tmp_sibling(root, "sync")
        result, fetched = SyncResult(), []
        try:
            for rel, (sha, size) in sorted(files.items()):
                local = root / rel
                if local.is_file() and local.stat().st_size == size and sha256_file(local) == sha:
                    result.skipped.append(rel)
                    continue
                self.get_file(_join(uri, f"{SYNC_BLOBS}/{sha}"), staging / rel, sha256=sha)
                fetched.append(rel)
            for rel in fetched:  # everything verified: move into place
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, root / rel)
                result.transferred.append(rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if prune:
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root).as_posix()
                if p.is_file() and rel not in files:
                    p.unlink()
                    result.removed.append(rel)
        log.info(
            "%s: synced down to %s (%d fetched, %d unchanged)",
            uri,
            root,
            len(result.transferred),
            len(result.skipped),
        )
        return result

    # -- listing ------------------------------------------------------------------------
    def _list_infos(self, uri_prefix: str) -> builtins.list[ObjectInfo]:
        return self._call("list", uri_prefix, lambda: builtins.list(self._list(uri_prefix)))

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """URIs of every object under the folder `uri_prefix`, sorted."""
        uri_prefix = self._check_uri(uri_prefix)
        return sorted(info.uri for info in self._list_infos(uri_prefix))


# -- local folders ------------------------------------------------------------------------
class LocalStore(Store):
    """Local paths and `file://` URIs. Files are written to a temporary sibling and renamed,
    so each file appears whole; the manifest still comes last."""

    def _check_uri(self, uri: str | os.PathLike) -> str:
        text = os.fspath(uri)
        if urlparse(text).scheme not in ("", "file"):
            raise StorageError(f"{text}: not a local path or file:// URI")
        return text

    def _path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"{uri}: file URIs must be file:///absolute/path")
            return Path(url2pathname(parsed.path))
        return Path(uri)

    def _head(self, uri: str) -> ObjectInfo | None:
        p = self._path(uri)
        if not p.is_file():
            return None
        st = p.stat()
        return ObjectInfo(uri, st.st_size, etag=f"{st.st_mtime_ns:x}-{st.st_size:x}")

    def _remote_sha256(self, info: ObjectInfo) -> str | None:
        return sha256_file(self._path(info.uri))

    def _upload(self, local: Path, uri: str, sha256: str, size: int) -> ObjectInfo:
        dest = self._path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "part")
        try:
            got, n = _copy_hashing(local, tmp)
            if got != sha256 or n != size:
                raise StorageError(
                    f"{local}: changed while it was copied to {uri} (sha256 or size differs "
                    "from the manifest); stop whatever writes it and upload again"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(uri, n, sha256=got)

    def _download(self, uri: str, dest: Path) -> ObjectInfo:
        src = self._path(uri)
        if not src.is_file():
            raise NotFoundError(f"{uri}: no such file; check the path")
        got, n = _copy_hashing(src, dest)
        return ObjectInfo(uri, n, sha256=got)

    def _list(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        root = self._path(uri_prefix)
        if not root.is_dir():
            return
        for p in sorted(root.rglob("*")):
            if p.is_file() and not (p.name.startswith(".") and ".part-" in p.name):
                st = p.stat()
                rel = p.relative_to(root).as_posix()
                yield ObjectInfo(_join(uri_prefix, rel), st.st_size, etag=f"{st.st_mtime_ns:x}")

    def _delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)


# -- S3 -----------------------------------------------------------------------------------
def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_error(exc: BaseException) -> tuple[str, int] | None:
    """(code, HTTP status) of the first botocore ClientError in `exc`'s chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            return code, status
    return None


class S3Store(Store):
    """`s3://bucket/prefix` URIs through boto3, configured only from the environment.

    Uploads carry the file's sha256 as metadata (`x-amz-meta-sha256`) and, where the server
    supports them, S3 checksums (`ChecksumSHA256` on single-part uploads, which makes the
    server verify the exact bytes; `ChecksumAlgorithm=SHA256` per part on multipart ones).
    A server that rejects checksums is detected and used without them. Every upload is
    verified afterwards (size and sha256); every download against the metadata and, for
    artifacts, the manifest.
    """

    def __init__(
        self, retry: RetryPolicy | None = None, transfer: TransferSettings | None = None
    ) -> None:
        super().__init__(retry)
        try:
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            raise StorageError("s3:// URIs need boto3: pip install boto3") from None
        self.settings = transfer or TransferSettings()
        self._checksums = True
        self._lock = threading.Lock()
        self._transfer = TransferConfig(
            multipart_threshold=self.settings.multipart_threshold,
            multipart_chunksize=self.settings.multipart_chunksize,
            max_concurrency=self.settings.max_concurrency,
        )
        self._client = self._make_client(checksums=True)

    def _make_client(self, *, checksums: bool) -> Any:
        import boto3
        from botocore.config import Config

        endpoint = _s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        when = "when_supported" if checksums else "when_required"
        config = Config(
            region_name=region,
            retries={"mode": "standard", "max_attempts": self.settings.client_attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            max_pool_connections=max(10, self.settings.max_concurrency * 2),
            s3={"addressing_style": "path"} if endpoint else None,
            request_checksum_calculation=when,
            response_checksum_validation=when,
        )
        try:
            return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        except ValueError as exc:  # an unparsable endpoint
            raise StorageError(
                f"cannot configure S3 ({_redact(str(exc))[:200]}); set AWS_ENDPOINT_URL (or "
                "AWS_ENDPOINT_URL_S3) to a URL such as http://host:port, or unset it for AWS"
            ) from None

    def _check_uri(self, uri: str | os.PathLike) -> str:
        text = os.fspath(uri)
        parsed = urlparse(text)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{text}: not an s3://bucket/prefix URI")
        return text

    @staticmethod
    def _split(uri: str) -> tuple[str, str]:
        parsed = urlparse(uri)
        return parsed.netloc, parsed.path.lstrip("/")

    def _where(self) -> str:
        endpoint = _s3_endpoint()
        if endpoint is None:
            return "AWS S3"
        parsed = urlparse(endpoint)
        return f"the S3 endpoint {parsed.scheme}://{parsed.hostname}:{parsed.port or ''}".rstrip(
            ":"
        )

    def _is_transient(self, exc: BaseException) -> bool:
        from botocore import exceptions as be

        retryable: tuple[type[BaseException], ...] = (
            be.ConnectionError,
            be.HTTPClientError,
            be.IncompleteReadError,
            getattr(be, "ResponseStreamingError", be.HTTPClientError),
            getattr(be, "FlexibleChecksumError", be.HTTPClientError),
            ConnectionError,
            TimeoutError,
            _Transient,
        )
        if any(isinstance(e, retryable) for e in _chain(exc)):
            return True
        err = _client_error(exc)
        return err is not None and (err[1] >= 500 or err[1] == 429 or err[0] in _TRANSIENT_CODES)

    def _describe(self, exc: BaseException) -> str:
        err = _client_error(exc)
        if err is not None:
            for e in _chain(exc):
                response = getattr(e, "response", None)
                if isinstance(response, dict) and "Error" in response:
                    msg = str(response["Error"].get("Message", "")) or "(no message)"
                    return _redact(f"{err[0] or 'error'} (HTTP {err[1]}): {msg}")[:400]
        return super()._describe(exc)

    def _hint(self, exc: BaseException) -> str:
        from botocore import exceptions as be

        if any(
            isinstance(e, be.NoCredentialsError | be.PartialCredentialsError) for e in _chain(exc)
        ):
            return "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
        err = _client_error(exc)
        if err is not None and (err[0] in _AUTH_CODES or err[1] == 403):
            return _CREDENTIALS_HINT
        if err is not None and err[0] == "NoSuchBucket":
            return "create the bucket, or fix the bucket name in the URI"
        return "check the URI, the AWS_* environment and the object store's logs"

    def _checksum_unsupported(self, exc: BaseException) -> bool:
        err = _client_error(exc)
        if err is None:
            return False
        code = err[0]
        text = self._describe(exc).lower()
        return code == "NotImplemented" or (
            code in ("InvalidRequest", "InvalidArgument", "NotImplemented") and "checksum" in text
        )

    def _without_checksums(self) -> None:
        with self._lock:
            if self._checksums:
                log.warning("the S3 server rejects checksums; verifying with sha256 metadata only")
                self._checksums = False
                self._client = self._make_client(checksums=False)

    def _head(self, uri: str) -> ObjectInfo | None:
        bucket, key = self._split(uri)
        if not key:
            raise StorageError(f"{uri}: names a bucket, not an object")
        extra = {"ChecksumMode": "ENABLED"} if self._checksums else {}
        try:
            r = self._client.head_object(Bucket=bucket, Key=key, **extra)
        except Exception as exc:
            err = _client_error(exc)
            if err is not None and (err[1] == 404 or err[0] in ("404", "NoSuchKey", "NotFound")):
                return None
            raise
        return ObjectInfo(
            uri,
            int(r["ContentLength"]),
            sha256=(r.get("Metadata") or {}).get(SHA256_METADATA),
            etag=str(r.get("ETag", "")).strip('"') or None,
            checksum_sha256=r.get("ChecksumSHA256"),
        )

    def _upload(self, local: Path, uri: str, sha256: str, size: int) -> ObjectInfo:
        bucket, key = self._split(uri)
        checksums = self._checksums
        extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}}
        if checksums and size < self.settings.multipart_threshold:
            extra["ChecksumSHA256"] = _b64(sha256)  # the server checks the exact bytes
        elif checksums:
            extra["ChecksumAlgorithm"] = "SHA256"  # per part
        try:
            self._client.upload_file(
                str(local), bucket, key, ExtraArgs=extra, Config=self._transfer
            )
        except Exception as exc:
            if checksums and self._checksum_unsupported(exc):
                self._without_checksums()
                raise _Transient("the server rejected checksums; retrying without") from exc
            raise
        info = self._head(uri)
        if info is None:
            raise _Transient("the object is missing right after its upload")
        problems = []
        if info.size != size:
            problems.append(f"size {info.size} != {size}")
        if info.sha256 != sha256:
            problems.append("x-amz-meta-sha256 differs")
        full = info.checksum_sha256
        if full and "-" not in full and full != _b64(sha256):
            problems.append("the server's ChecksumSHA256 differs")
        if problems:
            raise _Transient(f"upload did not verify: {', '.join(problems)}")
        return info

    def _download(self, uri: str, dest: Path) -> ObjectInfo:
        info = self._head(uri)
        if info is None:
            raise NotFoundError(f"{uri}: no such object; check the URI")
        bucket, key = self._split(uri)
        extra = {"ChecksumMode": "ENABLED"} if self._checksums else {}
        self._client.download_file(bucket, key, str(dest), ExtraArgs=extra, Config=self._transfer)
        return info

    def _list(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        bucket, key = self._split(uri_prefix)
        prefix = f"{key.rstrip('/')}/" if key else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield ObjectInfo(
                    f"s3://{bucket}/{obj['Key']}",
                    int(obj["Size"]),
                    etag=str(obj.get("ETag", "")).strip('"') or None,
                )

    def _delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self._client.delete_object(Bucket=bucket, Key=key)


# -- entry points -------------------------------------------------------------------------
def open_store(
    uri: str | os.PathLike,
    *,
    retry: RetryPolicy | None = None,
    transfer: TransferSettings | None = None,
) -> Store:
    """The store for `uri`: `S3Store` for s3://, `LocalStore` for a path or file:// URI."""
    scheme = urlparse(os.fspath(uri)).scheme
    if scheme == "s3":
        return S3Store(retry, transfer)
    if scheme in ("", "file"):
        return LocalStore(retry)
    raise StorageError(
        f"{os.fspath(uri)}: unsupported URI scheme {scheme!r}; use a local path, "
        "file:///path or s3://bucket/prefix"
    )


def put_artifact(local_dir: str | os.PathLike, uri: str, **kwargs: Any) -> Manifest:
    """`open_store(uri).put_artifact(local_dir, uri, ...)`."""
    return open_store(uri).put_artifact(local_dir, uri, **kwargs)


def get_artifact(uri: str, local_dir: str | os.PathLike, **kwargs: Any) -> Manifest:
    """`open_store(uri).get_artifact(uri, local_dir, ...)`."""
    return open_store(uri).get_artifact(uri, local_dir, **kwargs)


def exists(uri: str) -> bool:
    """Whether a complete artifact (its manifest) is at `uri`."""
    return open_store(uri).exists(uri)


def list_uris(uri_prefix: str) -> list[str]:
    """URIs of every object under the folder `uri_prefix`."""
    return open_store(uri_prefix).list(uri_prefix)


def put_file(local: str | os.PathLike, uri: str, **kwargs: Any) -> ObjectInfo:
    """`open_store(uri).put_file(local, uri, ...)`."""
    return open_store(uri).put_file(local, uri, **kwargs)


def get_file(uri: str, local: str | os.PathLike, **kwargs: Any) -> ObjectInfo:
    """`open_store(uri).get_file(uri, local, ...)`."""
    return open_store(uri).get_file(uri, local, **kwargs)


def sync_dir_up(local_dir: str | os.PathLike, uri: str, **kwargs: Any) -> SyncResult:
    """`open_store(uri).sync_dir_up(local_dir, uri, ...)`."""
    return open_store(uri).sync_dir_up(local_dir, uri, **kwargs)


def sync_dir_down(uri: str, local_dir: str | os.PathLike, **kwargs: Any) -> SyncResult | None:
    """`open_store(uri).sync_dir_down(uri, local_dir, ...)`."""
    return open_store(uri).sync_dir_down(uri, local_dir, **kwargs)
