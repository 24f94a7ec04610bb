"""Artifacts and checkpoint folders in local folders and on S3 (`s3://bucket/prefix`).

`open_store(uri)` gives a `LocalStore` (a path or file:// URI) or an `S3Store` (boto3's managed
transfers). Both verify every transfer (size and sha256, plus S3 checksums where the server
supports them). `put_artifact` uploads `manifest.json` LAST, so a prefix without one is absent or
incomplete, and skips files already stored (a rerun resumes). `get_artifact` downloads into a
temporary sibling folder and renames it into place once `read_artifact` accepts it. Checkpoint
folders are synced by content (`<uri>/blobs/<sha256>`), then a marker (`<uri>/sync.json`) naming
them, so an interrupted sync leaves the previous one intact.

S3 endpoint, region and credentials come only from the environment (`AWS_ENDPOINT_URL[_S3]`,
`AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or boto3's
credential chain) and never appear in logs or errors. Transient failures are retried, and
logged, by botocore's "standard" retry mode, per request and per multipart part.
"""

from __future__ import annotations

import base64
import builtins
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import ValidationError

from .artifacts import MANIFEST, ArtifactError, ArtifactKind, Manifest, read_artifact, sha256_file
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
Progress = Callable[[str], None] | None
PathLike = str | os.PathLike


class StorageError(ValueError):
    """An object-store operation failed; the message names the URI and the fix."""


class NotFoundError(StorageError):
    """No object at the URI."""


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer and client settings. `attempts` bounds botocore's "standard" retry mode
    per request: jittered exponential backoff from 50 ms, each wait at most 20 s (a server
    that is back within about ten seconds is waited for)."""

    multipart_threshold: int = 8 * MiB
    multipart_chunksize: int = 8 * MiB
    max_concurrency: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    attempts: int = 10


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    sha256: str | None = None  # from the object's metadata (S3)
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


def _digest(folder: Path) -> str | None:
    try:
        return read_artifact(folder).digest
    except ArtifactError:
        return None


def _counts(result: SyncResult) -> tuple[int, int]:
    return len(result.transferred), len(result.skipped)


def local_path(uri: PathLike) -> Path:
    """The path of a plain path or a file:// URI; StorageError for any other URI."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme not in ("", "file"):
        raise StorageError(f"{text}: not a local path or file:// URI")
    if not parsed.scheme:
        return Path(text)
    if parsed.netloc not in ("", "localhost"):
        raise StorageError(f"{text}: file URIs must be file:///absolute/path")
    return Path(url2pathname(parsed.path))


class Store:
    """Verified transfers and the publish protocols between local folders and one kind of
    storage. A subclass provides the single-attempt primitives `_check_uri(uri) -> str`,
    `_head(uri) -> ObjectInfo | None`, `_upload(local, uri, sha256, size) -> ObjectInfo`
    (verified), `_download(uri, dest) -> ObjectInfo` (NotFoundError if there is no object),
    `_list(uri_prefix) -> Iterator[str]` (URIs) and `_delete(uri)`."""

    def _hint(self, exc: BaseException) -> str:
        return f"{type(exc).__name__}: {exc}; check the path and its permissions"

    def _remote_sha256(self, info: ObjectInfo) -> str | None:
        return info.sha256

    def _call(self, op: str, uri: str, fn: Callable[[], T]) -> T:
        """`fn()`; any other error than a StorageError becomes one naming `uri` and the fix."""
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{uri}: {op} failed: {_redact(self._hint(exc))}") from exc

    # -- single objects -----------------------------------------------------------------
    def head(self, uri: str) -> ObjectInfo | None:
        """The object at `uri` (size, sha256 metadata, checksum), or None."""
        uri = self._check_uri(uri)
        return self._call("head", uri, lambda: self._head(uri))

    def put_file(self, local: PathLike, uri: str, *, sha256: str | None = None) -> ObjectInfo:
        """Upload one file (sha256 computed unless given) and verify it; returns the object."""
        uri, src = self._check_uri(uri), Path(local)
        if not src.is_file():
            raise StorageError(f"{src}: not a file, so it cannot be uploaded to {uri}")
        digest, size = sha256 or sha256_file(src), src.stat().st_size
        return self._call("upload", uri, lambda: self._upload(src, uri, digest, size))

    def get_file(self, uri: str, local: PathLike, *, sha256: str | None = None) -> ObjectInfo:
        """Download one object to `local` (a temporary file, then a rename), checking its
        recorded sha256 and, if given, the expected `sha256`."""
        uri, dest = self._check_uri(uri), Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "part")
        try:
            info = self._call("download", uri, lambda: self._download(uri, tmp))
            if tmp.stat().st_size != info.size:  # replaced since `_download` looked at it
                log.warning("%s: changed while it was downloaded; one more attempt", uri)
                info = self._call("download", uri, lambda: self._download(uri, tmp))
            got = sha256_file(tmp)
            checks = [(info.sha256, "its metadata records"), (sha256, "the manifest expects")]
            for want, where in checks:
                if want is not None and got != want:
                    raise StorageError(
                        f"{uri}: checksum mismatch: the object's bytes have sha256 {got[:16]}..., "
                        f"{where} {want[:16]}...; the object was corrupted or replaced after "
                        "upload: upload it again from its source"
                    )
            os.replace(tmp, dest)
            return info
        finally:
            tmp.unlink(missing_ok=True)

    def _read_json(self, uri: str, dest: Path | None = None) -> Any | None:
        """The JSON document at `uri` (downloaded to `dest` if given), or None if there is none."""
        with tempfile.TemporaryDirectory(prefix="guilomo-storage-") as d:
            path = dest or Path(d) / "doc.json"
            try:
                self.get_file(uri, path)
            except NotFoundError:
                return None
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise StorageError(f"{uri}: not valid JSON ({exc}); upload it again") from None

    # -- artifacts ----------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        """Whether a complete artifact (its manifest) is at `uri`."""
        return self.head(_join(self._check_uri(uri), MANIFEST)) is not None

    def read_manifest(
        self, uri: str, *, dest: Path | None = None, required: bool = False
    ) -> Manifest | None:
        """The manifest of the artifact at `uri` (its file kept at `dest` if given); None, or
        StorageError if `required`, when there is none."""
        uri = self._check_uri(uri)
        doc = self._read_json(_join(uri, MANIFEST), dest)
        if doc is None and required:
            raise StorageError(
                f"{uri}: no {MANIFEST}, so there is no complete artifact here (never written, or "
                "its upload was interrupted before it published the manifest); check the URI, or "
                "rerun the stage or upload that writes it"
            )
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
        self, local_dir: PathLike, uri: str, *, overwrite: bool = False, progress: Progress = None
    ) -> Manifest:
        """Upload the verified artifact at `local_dir` to `uri`, `manifest.json` last; a no-op
        when `uri` holds it already. `progress(rel)` is called after each file is stored."""
        uri, root = self._check_uri(uri), Path(local_dir)
        try:
            manifest = read_artifact(root)
        except ArtifactError as exc:
            raise StorageError(f"cannot upload to {uri}: {exc}") from None
        try:
            remote = self.read_manifest(uri)
        except StorageError:  # an invalid manifest: replace it only when asked to
            if not overwrite:
                raise
            remote = None
        if remote is not None and remote.digest == manifest.digest:  # the digest has the kind
            log.info("%s: already holds this %s artifact", uri, manifest.kind)
            return remote
        if remote is not None and not overwrite:
            raise StorageError(
                f"{uri}: already holds another {remote.kind} artifact; upload to a new URI "
                "(artifacts are immutable) or pass overwrite=True"
            )
        murl = _join(uri, MANIFEST)
        self._call("delete", murl, lambda: self._delete(murl))  # unpublish first
        start, sent = time.monotonic(), 0
        for rel, sha in [*manifest.files.items(), (MANIFEST, None)]:  # the manifest last
            src, dst = root / rel, _join(uri, rel)
            size = src.stat().st_size
            info = None if sha is None else self.head(dst)
            if info is None or info.size != size or self._remote_sha256(info) != sha:
                self.put_file(src, dst, sha256=sha)
                sent += size
            if progress is not None:
                progress(rel)
        mib, took = sent / MiB, time.monotonic() - start
        log.info("%s: uploaded %s artifact (%.1f MiB sent) in %.1fs", uri, manifest.kind, mib, took)
        return manifest

    def get_artifact(
        self,
        uri: str,
        local_dir: PathLike,
        *,
        kind: ArtifactKind | None = None,
        overwrite: bool = False,
    ) -> Manifest:
        """Download the artifact at `uri` to `local_dir` through a temporary sibling folder,
        checked with `read_artifact` (every checksum) before it is renamed into place; on any
        error nothing is left at `local_dir`. An identical artifact there is kept as it is."""
        uri, dest = self._check_uri(uri), Path(local_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dest, "tmp")
        tmp.mkdir()
        try:
            manifest = self.read_manifest(uri, dest=tmp / MANIFEST, required=True)
            if kind is not None and manifest.kind != kind:
                raise StorageError(f"{uri}: holds a {manifest.kind} artifact, expected {kind}")
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
            try:
                replace_folder(tmp, dest)
            except OSError as exc:  # e.g. another process on this machine put it there first
                if _digest(dest) != manifest.digest:
                    raise StorageError(f"{uri}: cannot put the download at {dest}: {exc}") from None
            log.info("%s: downloaded %s artifact to %s", uri, manifest.kind, dest)
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- checkpoint folders -------------------------------------------------------------
    def sync_dir_up(self, local_dir: PathLike, uri: str) -> SyncResult:
        """Push a checkpoint folder: new or changed files to `<uri>/blobs/<sha256>`, then the
        marker `<uri>/sync.json` naming them (last), then delete the blobs it does not name.
        Call it between checkpoint saves, not during one."""
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
            info = self.head(blob := _join(uri, f"{SYNC_BLOBS}/{ent['sha256']}"))
            if info and info.size == ent["size"] and info.sha256 in (None, ent["sha256"]):
                result.skipped.append(rel)
            else:
                self.put_file(root / rel, blob, sha256=ent["sha256"])
                result.transferred.append(rel)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with tempfile.TemporaryDirectory(prefix="guilomo-storage-") as d:
            marker = Path(d) / SYNC_MARKER
            doc = {"version": 1, "created": now, "files": files}
            marker.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            self.put_file(marker, _join(uri, SYNC_MARKER))
        keep = {ent["sha256"] for ent in files.values()}
        for blob in self.list(_join(uri, SYNC_BLOBS)):
            if (name := blob.rsplit("/", 1)[-1]) not in keep:
                self._call("delete", blob, lambda u=blob: self._delete(u))
                result.removed.append(name)
        log.info("%s: synced %s up (%d sent, %d unchanged)", uri, root, *_counts(result))
        return result

    def sync_dir_down(self, uri: str, local_dir: PathLike) -> SyncResult | None:
        """Pull the checkpoint folder last synced to `uri` into `local_dir` (a retried pod
        resuming); None when nothing was ever synced there. Changed files are downloaded and
        verified first, then moved into place; identical ones are skipped."""
        uri, root = self._check_uri(uri), Path(local_dir)
        for attempt in (1, 2, 3):
            marker = self._read_json(_join(uri, SYNC_MARKER))
            if marker is None:
                return None
            try:
                return self._sync_down(uri, root, marker)
            except NotFoundError as exc:  # a concurrent sync_dir_up pruned a blob: reread
                if attempt == 3:
                    raise StorageError(
                        f"{uri}: the checkpoint changed during three downloads in a row ({exc}); "
                        "stop the other writer, then run again"
                    ) from None
                log.warning("%s: checkpoint changed while downloading; reading it again", uri)
        raise AssertionError("unreachable")

    def _sync_down(self, uri: str, root: Path, marker: Any) -> SyncResult:
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
        log.info("%s: synced down to %s (%d fetched, %d unchanged)", uri, root, *_counts(result))
        return result

    # -- listing ------------------------------------------------------------------------
    def list(self, uri_prefix: str) -> builtins.list[str]:
        """URIs of every object under the folder `uri_prefix`, sorted."""
        uri_prefix = self._check_uri(uri_prefix)
        return self._call("list", uri_prefix, lambda: sorted(self._list(uri_prefix)))


# -- local folders ------------------------------------------------------------------------
class LocalStore(Store):
    """Local paths and `file://` URIs; each file is copied to a temporary sibling, then renamed."""

    def _check_uri(self, uri: PathLike) -> str:
        local_path(uri)
        return os.fspath(uri)

    def _path(self, uri: str) -> Path:
        return local_path(uri)

    def _head(self, uri: str) -> ObjectInfo | None:
        p = self._path(uri)
        return ObjectInfo(uri, p.stat().st_size) if p.is_file() else None

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

    def _list(self, uri_prefix: str) -> Iterator[str]:
        root = self._path(uri_prefix)
        for p in root.rglob("*"):  # nothing when there is no such folder
            if p.is_file() and not (p.name.startswith(".") and ".part-" in p.name):
                yield _join(uri_prefix, p.relative_to(root).as_posix())

    def _delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)


# -- S3 -----------------------------------------------------------------------------------
def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _client_error(exc: BaseException) -> tuple[str, int, str] | None:
    """(code, HTTP status, message) of the first botocore ClientError in `exc`'s chain."""
    from botocore.exceptions import ClientError

    for e in _chain(exc):
        if isinstance(e, ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            error = e.response.get("Error", {})
            return str(error.get("Code", "")), int(status or 0), str(error.get("Message", ""))
    return None


def _checksum_unsupported(exc: BaseException) -> bool:
    err = _client_error(exc)
    return err is not None and (
        err[0] == "NotImplemented"
        or (err[0] in ("InvalidRequest", "InvalidArgument") and "checksum" in err[2].lower())
    )


class S3Store(Store):
    """`s3://bucket/prefix` URIs through boto3, configured only from the environment.

    Uploads carry the file's sha256 as metadata (`x-amz-meta-sha256`) and, where the server
    supports them, S3 checksums (`ChecksumSHA256` on single-part uploads, so the server checks
    the exact bytes; SHA256 per part on multipart ones); a server that rejects checksums is
    detected and used without them. Every upload is checked afterwards (size and sha256)."""

    def __init__(self, transfer: TransferSettings | None = None) -> None:
        from boto3.s3.transfer import TransferConfig

        self.settings = s = transfer or TransferSettings()
        self._checksums = True
        self._transfer = TransferConfig(
            multipart_threshold=s.multipart_threshold,
            multipart_chunksize=s.multipart_chunksize,
            max_concurrency=s.max_concurrency,
        )
        self._client = self._make_client(checksums=True)

    def _make_client(self, *, checksums: bool) -> Any:
        import boto3
        from botocore.config import Config

        endpoint, when = _s3_endpoint(), "when_supported" if checksums else "when_required"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config = Config(
            region_name=region or "us-east-1",
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
        why = f"{type(caught_exception).__name__}: {caught_exception}" if caught_exception else ""
        if attempts < self.settings.attempts and (why or status in _RETRIED_STATUS):
            op = getattr(kw.get("operation"), "name", "request")
            args = (op, attempts, self.settings.attempts, _redact(why)[:200] or f"HTTP {status}")
            log.warning("S3 %s: attempt %d/%d failed (%s); retrying", *args)

    def _check_uri(self, uri: PathLike) -> str:
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
        if (endpoint := _s3_endpoint()) is None:
            return "AWS S3"
        p = urlparse(endpoint)  # not its netloc: that may hold user:password@
        return f"the S3 endpoint {p.scheme}://{p.hostname}" + (f":{p.port}" if p.port else "")

    def _hint(self, exc: BaseException) -> str:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if (err := _client_error(exc)) is None:
            missing = (NoCredentialsError, PartialCredentialsError)
            if any(isinstance(e, missing) for e in _chain(exc)):
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
        sha256 = (r.get("Metadata") or {}).get(SHA256_METADATA)
        return ObjectInfo(uri, r["ContentLength"], sha256, r.get("ChecksumSHA256"))

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
            if not (checksums and _checksum_unsupported(exc)):
                raise
            log.warning("the S3 server rejects checksums; verifying with sha256 metadata only")
            self._checksums = False
            self._client = self._make_client(checksums=False)
            return self._upload(local, uri, sha256, size)
        info = self._head(uri)
        server = info.checksum_sha256 if info else None  # "<base64>-<parts>" for multipart
        whole_ok = not server or "-" in server or server == _b64(sha256)
        if info is None or (info.size, info.sha256) != (size, sha256) or not whole_ok:
            raise StorageError(
                f"{uri}: the upload did not verify (the stored object's size, sha256 metadata "
                "or checksum differs); check the object store's health, then run again"
            )
        return info

    def _download(self, uri: str, dest: Path) -> ObjectInfo:
        info = self._head(uri)
        if info is None:
            raise NotFoundError(f"{uri}: no such object; check the URI")
        bucket, key = self._split(uri)
        extra = {"ChecksumMode": "ENABLED"} if self._checksums else {}
        self._client.download_file(bucket, key, str(dest), ExtraArgs=extra, Config=self._transfer)
        return info

    def _list(self, uri_prefix: str) -> Iterator[str]:
        bucket, key = self._split(uri_prefix)
        prefix = f"{key.rstrip('/')}/" if key else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"

    def _delete(self, uri: str) -> None:
        bucket, key = self._split(uri)
        self._client.delete_object(Bucket=bucket, Key=key)


def open_store(uri: PathLike, *, transfer: TransferSettings | None = None) -> Store:
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


def put_artifact(local_dir: PathLike, uri: str, **kwargs: Any) -> Manifest:
    return open_store(uri).put_artifact(local_dir, uri, **kwargs)


def get_artifact(uri: str, local_dir: PathLike, **kwargs: Any) -> Manifest:
    return open_store(uri).get_artifact(uri, local_dir, **kwargs)


def get_file(uri: str, local: PathLike, **kwargs: Any) -> ObjectInfo:
    return open_store(uri).get_file(uri, local, **kwargs)


def list_uris(uri_prefix: str) -> list[str]:
    """URIs of every object under the folder `uri_prefix`."""
    return open_store(uri_prefix).list(uri_prefix)
