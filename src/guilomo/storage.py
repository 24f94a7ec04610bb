"""Object storage for artifacts and checkpoints: local folders and S3 (`s3://bucket/prefix`).

`open_store(uri)` gives a `LocalStore` for a path or `file://` URI and an `S3Store` (boto3's
managed transfers) for `s3://bucket/prefix`, with the same guarantees:

* `put_artifact(local_dir, uri)` uploads every payload file, verifies each upload (size and
  sha256, plus S3 checksums where the server supports them) and uploads `manifest.json`
  LAST: a prefix without a manifest is absent or incomplete, never half an artifact. Files
  already stored are not sent again, so rerunning an interrupted upload resumes it.
* `get_artifact(uri, local_dir)` downloads into a temporary sibling folder, verifies every
  checksum with `read_artifact` and only then renames the folder into place.
* `sync_dir_up(local_dir, uri)` / `sync_dir_down(uri, local_dir)` push and pull a running
  stage's checkpoint folder: files by content (`<uri>/blobs/<sha256>`), then a marker
  (`<uri>/sync.json`) naming them, so an interrupted sync leaves the previous one intact.

S3 endpoint, region and credentials come only from the environment (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_REGION` or `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` or boto3's credential chain) and never appear in logs or errors.
Transient failures (connection errors, timeouts, 5xx, throttling) are retried by botocore's
"standard" retry mode, per request and per multipart part; each retry is logged.

    store = open_store("s3://bucket/runs/42")
    store.put_artifact("runs/42/allocation", "s3://bucket/runs/42/allocation")
    store.get_artifact("s3://bucket/runs/42/allocation", "/tmp/allocation", kind="Allocation")
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
import os
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

from .artifacts import (
    MANIFEST,
    ArtifactError,
    ArtifactKind,
    Manifest,
    read_artifact,
    sha256_file,
)
from .folders import replace_folder

log = logging.getLogger(__name__)

MiB = 1 << 20
SYNC_MARKER = "sync.json"
SYNC_BLOBS = "blobs"
SHA256_METADATA = "sha256"  # stored as the object metadata header x-amz-meta-sha256
_CREDENTIAL_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
    | {"InvalidToken", "TokenRefreshRequired", "AuthorizationHeaderMalformed", "403"}
)
_RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")
ProgressFn = Callable[[str], None]


class StorageError(ValueError):
    """An object-store operation failed; the message names the URI and the fix."""


class NotFoundError(StorageError):
    """No object at the URI."""


class _Unverified(Exception):
    """A transfer finished but its result did not verify; worth one more attempt."""


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer and client settings (ignored by `LocalStore`). `attempts` is botocore's
    per-request bound in its "standard" mode: jittered exponential backoff from 50 ms,
    each wait at most 20 s (a server that is back within about ten seconds is waited for)."""

    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    max_concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    attempts: int = 10


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object."""

    uri: str
    size: int
    sha256: str | None = None  # from the object's metadata (S3) or computed (local)
    checksum_sha256: str | None = None  # the server's own checksum (base64), if any


@dataclass
class SyncResult:
    """Relative paths transferred, skipped (already identical) and removed by a sync."""

    transferred: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


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
    """`exc`, its causes and contexts."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _mismatch(uri: str, got: str, want: str, where: str) -> StorageError:
    return StorageError(
        f"{uri}: checksum mismatch: the object's bytes have sha256 {got[:16]}..., {where} "
        f"{want[:16]}...; the object was corrupted or replaced after upload: upload it again "
        "from its source"
    )


class Store(ABC):
    """Artifact and checkpoint transfers between local folders and one kind of storage.

    Subclasses implement single-attempt primitives (`_head`, `_upload`, `_download`,
    `_list`, `_delete`); this class adds verification and the publish protocols.
    """

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

    def _hint(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}; check the path and its permissions"

    def _remote_sha256(self, info: ObjectInfo) -> str | None:
        return info.sha256

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """`fn()`, once more if its result did not verify; StorageError naming `uri`."""
        for attempt in (1, 2):
            try:
                return fn()
            except StorageError:
                raise
            except _Unverified as exc:
                if attempt == 2:
                    raise StorageError(
                        f"{uri}: {op} did not verify twice ({exc}); check the object store's "
                        "health, then run again (transfers are safe to repeat)"
                    ) from None
                log.warning("%s: %s did not verify (%s); one more attempt", uri, op, exc)
            except Exception as exc:
                raise StorageError(f"{uri}: {op} failed: {_redact(self._hint(exc))}") from exc
        raise AssertionError("unreachable")

    # -- single objects -----------------------------------------------------------------
    def head(self, uri: str) -> ObjectInfo | None:
        """The object at `uri` (size, sha256 metadata, checksum), or None."""
        uri = self._check_uri(uri)
        return self._call("head", uri, lambda: self._head(uri))

    def put_file(
        self, local: str | os.PathLike, uri: str, *, sha256: str | None = None
    ) -> ObjectInfo:
        """Upload one file (sha256 computed unless given) and verify it; returns the object."""
        uri, src = self._check_uri(uri), Path(local)
        if not src.is_file():
            raise StorageError(f"{src}: not a file, so it cannot be uploaded to {uri}")
        digest, size = sha256 or sha256_file(src), src.stat().st_size
        return self._call("upload", uri, lambda: self._upload(src, uri, digest, size))

    def get_file(
        self, uri: str, local: str | os.PathLike, *, sha256: str | None = None
    ) -> ObjectInfo:
        """Download one object to `local` (a temporary file, then a rename), checking its
        size, its recorded sha256 and, if given, the expected `sha256`."""
        uri, dest = self._check_uri(uri), Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "part")

        def attempt() -> ObjectInfo:
            info = self._download(uri, tmp)
            if (size := tmp.stat().st_size) != info.size:
                raise _Unverified(f"got {size} bytes of the object's {info.size}")
            return info

        try:
            info = self._call("download", uri, attempt)
            got = sha256_file(tmp)
            if info.sha256 is not None and got != info.sha256:
                raise _mismatch(uri, got, info.sha256, "its metadata records")
            if sha256 is not None and got != sha256:
                raise _mismatch(uri, got, sha256, "the manifest expects")
            os.replace(tmp, dest)
            return info
        finally:
            tmp.unlink(missing_ok=True)

    def _read_json(self, uri: str) -> Any | None:
        """The JSON document at `uri`, or None when there is none."""
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

    def _stored(self, uri: str, sha256: str, size: int) -> bool:
        info = self.head(uri)
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
        """Upload the verified artifact at `local_dir` to `uri`, `manifest.json` last; a no-op
        when `uri` holds it already. `progress(rel)` is called after each file is stored."""
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
        if remote is not None and (remote.kind, remote.digest) == (manifest.kind, manifest.digest):
            log.info("%s: already holds this %s artifact", uri, manifest.kind)
            return remote
        if remote is not None and not overwrite:
            raise StorageError(
                f"{uri}: already holds another {remote.kind} artifact; upload to a new URI "
                "(artifacts are immutable) or pass overwrite=True"
            )
        self._call("delete", murl, lambda: self._delete(murl))  # unpublish first
        start, sent = time.monotonic(), 0
        for rel, sha in [*manifest.files.items(), (MANIFEST, None)]:  # the manifest last
            src, dst = root / rel, _join(uri, rel)
            if sha is None or not self._stored(dst, sha, src.stat().st_size):
                self.put_file(src, dst, sha256=sha)
                sent += src.stat().st_size
            if progress is not None:
                progress(rel)
        took = time.monotonic() - start
        log.info(
            "%s: uploaded %s artifact (%.1f MiB sent) in %.1fs",
            uri,
            manifest.kind,
            sent / MiB,
            took,
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
            manifest = self._fetch_manifest(uri, tmp / MANIFEST, kind)
            if dest.exists():
                if _digest(dest) == manifest.digest:
                    return manifest
                if not overwrite:
                    raise StorageError(
                        f"{dest}: already exists and differs from {uri}; choose another "
                        "destination or pass overwrite=True"
                    )
            for rel, sha in manifest.files.items():
                self.get_file(_join(uri, _check_rel(rel, uri)), tmp / rel, sha256=sha)
            try:
                read_artifact(tmp, kind=kind)
            except ArtifactError as exc:
                raise StorageError(f"{uri}: refusing the downloaded artifact: {exc}") from None
            replace_folder(tmp, dest)
            log.info("%s: downloaded %s artifact to %s", uri, manifest.kind, dest)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch_manifest(self, uri: str, dest: Path, kind: ArtifactKind | None) -> Manifest:
        try:
            self.get_file(_join(uri, MANIFEST), dest)
        except NotFoundError:
            raise StorageError(
                f"{uri}: no {MANIFEST}, so there is no complete artifact here (nothing was "
                "uploaded, or the upload was interrupted before it published the manifest); "
                "check the URI or rerun the upload"
            ) from None
        try:
            manifest = Manifest.model_validate_json(dest.read_text())
        except ValidationError as exc:
            raise StorageError(
                f"{uri}: invalid {MANIFEST} ({exc.errors()[0]['msg']}); upload it again"
            ) from None
        if kind is not None and manifest.kind != kind:
            raise StorageError(f"{uri}: holds a {manifest.kind} artifact, expected {kind}")
        return manifest

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
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write_json({"version": 1, "created": now, "files": files}, _join(uri, SYNC_MARKER))
        if prune:
            keep = {ent["sha256"] for ent in files.values()}
            for obj in self._list_infos(_join(uri, SYNC_BLOBS)):
                if (name := obj.uri.rsplit("/", 1)[-1]) not in keep:
                    self._call("delete", obj.uri, lambda u=obj.uri: self._delete(u))
                    result.removed.append(name)
        log.info("%s: synced %s up (%d sent, %d unchanged)", uri, root, *_counts(result))
        return result

    def sync_dir_down(
        self, uri: str, local_dir: str | os.PathLike, *, prune: bool = False
    ) -> SyncResult | None:
        """Pull the checkpoint folder last synced to `uri` into `local_dir` (a retried pod
        resuming); None when nothing was ever synced there. Changed files are downloaded and
        verified first, then moved into place; identical ones are skipped. With `prune`,
        local files the checkpoint does not name are deleted."""
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
        result = SyncResult()
        try:
            for rel, (sha, size) in sorted(files.items()):
                local = root / rel
                if local.is_file() and local.stat().st_size == size and sha256_file(local) == sha:
                    result.skipped.append(rel)
                else:
                    self.get_file(_join(uri, f"{SYNC_BLOBS}/{sha}"), staging / rel, sha256=sha)
                    result.transferred.append(rel)
            for rel in result.transferred:  # everything verified: move into place
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, root / rel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if prune:
            for p in sorted(root.rglob("*")):
                if p.is_file() and (rel := p.relative_to(root).as_posix()) not in files:
                    p.unlink()
                    result.removed.append(rel)
        log.info("%s: synced down to %s (%d fetched, %d unchanged)", uri, root, *_counts(result))
        return result

    # -- listing ------------------------------------------------------------------------
    def _list_infos(self, uri_prefix: str) -> builtins.list[ObjectInfo]:
        return self._call("list", uri_prefix, lambda: builtins.list(self._list(uri_prefix)))

    def list(self, uri_prefix: str) -> builtins.list[str]:
        """URIs of every object under the folder `uri_prefix`, sorted."""
        uri_prefix = self._check_uri(uri_prefix)
        return sorted(info.uri for info in self._list_infos(uri_prefix))


def _digest(folder: Path) -> str | None:
    try:
        return read_artifact(folder).digest
    except ArtifactError:
        return None


def _counts(result: SyncResult) -> tuple[int, int]:
    return len(result.transferred), len(result.skipped)


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
        return ObjectInfo(uri, p.stat().st_size)

    def _remote_sha256(self, info: ObjectInfo) -> str | None:
        return sha256_file(self._path(info.uri))

    def _upload(self, local: Path, uri: str, sha256: str, size: int) -> ObjectInfo:
        dest = self._path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "part")
        try:
            shutil.copyfile(local, tmp)
            if sha256_file(tmp) != sha256 or tmp.stat().st_size != size:
                raise StorageError(
                    f"{local}: changed while it was copied to {uri} (sha256 or size differs "
                    "from the manifest); stop whatever writes it and upload again"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(uri, size, sha256=sha256)

    def _download(self, uri: str, dest: Path) -> ObjectInfo:
        src = self._path(uri)
        if not src.is_file():
            raise NotFoundError(f"{uri}: no such file; check the path")
        shutil.copyfile(src, dest)
        return ObjectInfo(uri, dest.stat().st_size)

    def _list(self, uri_prefix: str) -> Iterator[ObjectInfo]:
        root = self._path(uri_prefix)
        if not root.is_dir():
            return
        for p in sorted(root.rglob("*")):
            if p.is_file() and not (p.name.startswith(".") and ".part-" in p.name):
                rel = p.relative_to(root).as_posix()
                yield ObjectInfo(_join(uri_prefix, rel), p.stat().st_size)

    def _delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)


# -- S3 -----------------------------------------------------------------------------------
def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_error(exc: BaseException) -> tuple[str, int, str] | None:
    """(code, HTTP status, message) of the first botocore ClientError in `exc`'s chain."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            error = response["Error"]
            return str(error.get("Code", "")), int(status), str(error.get("Message", ""))
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

    def __init__(self, transfer: TransferSettings | None = None) -> None:
        try:
            from boto3.s3.transfer import TransferConfig
        except ImportError:
            raise StorageError("s3:// URIs need boto3: pip install boto3") from None
        self.settings = s = transfer or TransferSettings()
        self._checksums = True
        self._lock = threading.Lock()
        self._transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
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
            retries={"mode": "standard", "max_attempts": self.settings.attempts},
            connect_timeout=self.settings.connect_timeout,
            read_timeout=self.settings.read_timeout,
            max_pool_connections=max(10, self.settings.max_concurrency * 2),
            s3={"addressing_style": "path"} if endpoint else None,
            request_checksum_calculation=when,
            response_checksum_validation=when,
        )
        try:
            client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        except ValueError as exc:  # an unparsable endpoint
            raise StorageError(
                f"cannot configure S3 ({_redact(str(exc))[:200]}); set AWS_ENDPOINT_URL (or "
                "AWS_ENDPOINT_URL_S3) to a URL such as http://host:port, or unset it for AWS"
            ) from None
        client.meta.events.register("needs-retry.s3", self._log_retry)
        return client

    def _log_retry(self, attempts: int, caught_exception: Any = None, **kw: Any) -> None:
        """Say so when a request failed and botocore's retry mode may try it again."""
        response = kw.get("response")
        status = response[1].get("ResponseMetadata", {}).get("HTTPStatusCode", 0) if response else 0
        transient = status in _RETRIED_STATUS  # what botocore's standard mode retries
        if attempts < self.settings.attempts and (caught_exception is not None or transient):
            why = f"{type(caught_exception).__name__}: {caught_exception}"
            log.warning(
                "S3 %s: attempt %d/%d failed (%s); retrying",
                getattr(kw.get("operation"), "name", "request"),
                attempts,
                self.settings.attempts,
                _redact(why)[:200] if caught_exception is not None else f"HTTP {status}",
            )

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

    def _hint(self, exc: BaseException) -> str:
        from botocore import exceptions as be

        err = _client_error(exc)
        if err is None:
            if any(
                isinstance(e, be.NoCredentialsError | be.PartialCredentialsError)
                for e in _chain(exc)
            ):
                return "no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment"
            return (
                f"{type(exc).__name__}: {str(exc)[:300]} (after up to {self.settings.attempts} "
                f"attempts); check that {self._where()} is reachable and healthy, then run "
                "again (transfers are safe to repeat)"
            )
        code, status, message = err
        what = f"{code or 'error'} (HTTP {status}): {message or '(no message)'}"[:400]
        if code in _AUTH_CODES or status == 403:
            return (
                f"{what}; check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
                "AWS_SESSION_TOKEN if used) in the environment, and that they may access this bucket"
            )
        if code == "NoSuchBucket":
            return f"{what}; create the bucket, or fix the bucket name in the URI"
        if status >= 500 or status == 429:
            return f"{what}; check that {self._where()} is healthy, then run again"
        return f"{what}; check the URI, the AWS_* environment and the object store's logs"

    def _checksum_unsupported(self, exc: BaseException) -> bool:
        err = _client_error(exc)
        return err is not None and (
            err[0] == "NotImplemented"
            or (err[0] in ("InvalidRequest", "InvalidArgument") and "checksum" in err[2].lower())
        )

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
            if not (checksums and self._checksum_unsupported(exc)):
                raise
            with self._lock:
                if self._checksums:
                    log.warning(
                        "the S3 server rejects checksums; verifying with sha256 metadata only"
                    )
                    self._checksums = False
                    self._client = self._make_client(checksums=False)
            return self._upload(local, uri, sha256, size)
        info = self._head(uri)
        if info is None:
            raise _Unverified("the object is missing right after its upload")
        problems = [f"size {info.size} != {size}"] if info.size != size else []
        if info.sha256 != sha256:
            problems.append("x-amz-meta-sha256 differs")
        full = info.checksum_sha256
        if full and "-" not in full and full != _b64(sha256):
            problems.append("the server's ChecksumSHA256 differs")
        if problems:
            raise _Unverified(f"upload did not verify: {', '.join(problems)}")
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
                yield ObjectInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))

    def _delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self._client.delete_object(Bucket=bucket, Key=key)


def open_store(uri: str | os.PathLike, *, transfer: TransferSettings | None = None) -> Store:
    """The store for `uri`: `S3Store` for s3://, `LocalStore` for a path or file:// URI."""
    scheme = urlparse(os.fspath(uri)).scheme
    if scheme == "s3":
        return S3Store(transfer)
    if scheme in ("", "file"):
        return LocalStore()
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


def get_file(uri: str, local: str | os.PathLike, **kwargs: Any) -> ObjectInfo:
    """`open_store(uri).get_file(uri, local, ...)`."""
    return open_store(uri).get_file(uri, local, **kwargs)


def list_uris(uri_prefix: str) -> list[str]:
    """URIs of every object under the folder `uri_prefix`."""
    return open_store(uri_prefix).list(uri_prefix)
