"""Artifact and checkpoint URIs for the stages: local folders and `s3://bucket/prefix` alike.

A stage reads and writes local folders; this module puts URIs around them.

* `fetch_artifact(uri, kind=...)`: a local path is used as it is; an artifact on S3 is
  downloaded once into the cache (`<cache>/artifacts/<manifest digest>`, where `<cache>` is
  `$GUILOMO_CACHE` or `~/.cache/guilomo`), every checksum verified, and reused from there by
  later stages on the same machine.
* `StageIO(out)`: the stage writes its artifact to `io.out_path`, then `io.publish()` puts it
  at `out`: `put_artifact` (payload first, `manifest.json` last) for s3://, a rename for a
  local folder. Manifest `parents` name the URIs the user gave, never the cache folders.
* `checkpoint_folder(uri)`: the local working copy of a checkpoint URI; `mirror_checkpoints`
  pulls it and returns the push (`pull_checkpoints` / `push_checkpoints`, with
  `sync_dir_down` / `sync_dir_up`).

    with StageIO("s3://bucket/runs/42/allocation") as io:
        state = io.input("s3://bucket/runs/42/search", "SearchState")   # a cache folder
        run_allocate(config, io.out_path, search=state)
        io.publish()

S3 settings come from the environment (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY; see `guilomo.storage`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlparse
from urllib.request import url2pathname

from .artifacts import (
    MANIFEST,
    ArtifactError,
    ArtifactKind,
    Manifest,
    read_artifact,
    read_manifest,
)
from .folders import replace_folder
from .storage import StorageError, open_store

log = logging.getLogger(__name__)


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether `uri` names an object store (s3://...) rather than a local path or file://."""
    return urlparse(os.fspath(uri)).scheme not in ("", "file")


def local_path(uri: str | os.PathLike) -> Path:
    """The local path of a plain path or a file:// URI."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme:
        raise StorageError(f"{text}: not a local path")
    return Path(text)


def cache_root() -> Path:
    """guilomo's cache (`$GUILOMO_CACHE` or ~/.cache/guilomo), shared with the models."""
    from .models import default_cache_dir

    return default_cache_dir()


def fetch_artifact(uri: str, *, kind: ArtifactKind, cache: Path | None = None) -> Path:
    """A local, verified folder holding the `kind` artifact at `uri`.

    Local paths are returned as they are (the stage verifies them as before). An artifact on
    S3 goes to `<cache>/artifacts/<manifest digest>`: downloaded and checked file by file the
    first time, re-verified and reused afterwards. Raises StorageError (naming `uri`) when
    there is no manifest, the manifest is damaged, the kind differs or a file does not match.
    """
    uri = str(uri)
    if not is_remote(uri):
        return local_path(uri)
    store = open_store(uri)
    manifest = store.read_manifest(uri)  # StorageError naming the URI if it is damaged
    if manifest is None:
        raise StorageError(
            f"{uri}: no {MANIFEST}, so there is no complete {kind} artifact here (never written, "
            "or its upload was interrupted before it was published); check the URI or rerun "
            "the stage that writes it"
        )
    if manifest.kind != kind:
        raise StorageError(f"{uri}: holds a {manifest.kind} artifact, expected {kind}")
    dest = (cache or cache_root()) / "artifacts" / manifest.digest
    try:
        got = store.get_artifact(uri, dest, kind=kind, overwrite=True)
    except OSError as exc:  # e.g. another process on this machine moved it in first
        if not _holds(dest, manifest.digest, kind):
            raise StorageError(f"{uri}: cannot put the download at {dest}: {exc}") from None
        got = manifest
    if got.digest != manifest.digest:
        shutil.rmtree(dest, ignore_errors=True)
        raise StorageError(f"{uri}: the artifact changed while it was downloaded; run again")
    log.info("%s: %s artifact at %s", uri, kind, dest)
    return dest


def _holds(folder: Path, digest: str, kind: ArtifactKind) -> bool:
    try:
        return read_artifact(folder, kind=kind).digest == digest
    except ArtifactError:
        return False


class StageIO:
    """The input and output URIs of one stage run (see the module docstring).

    `overwrite` replaces an artifact already at `out` (search, sft and evaluate always do,
    as they do locally); without it, an existing output is refused before any work starts.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = os.fspath(out)
        self.overwrite = overwrite
        self.remote_out = is_remote(self.out)
        self._aliases: dict[str, str] = {}  # local cache folder -> the URI it came from
        self._staging: Path | None = None
        self._out_path: Path | None = None

    def __enter__(self) -> StageIO:
        if not self.overwrite:
            if self.remote_out and open_store(self.out).exists(self.out):
                raise StorageError(
                    f"{self.out}: already holds an artifact; write to a new URI (artifacts "
                    "are immutable) or pass --overwrite"
                )
            if not self.remote_out and local_path(self.out).exists():
                raise ArtifactError(
                    f"{self.out}: already exists; choose a new output location or pass --overwrite"
                )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)

    def input(self, uri: str | os.PathLike | None, kind: ArtifactKind) -> Path | None:
        """The local folder of the input artifact at `uri` (None stays None)."""
        if uri is None:
            return None
        path = fetch_artifact(os.fspath(uri), kind=kind)
        if is_remote(uri):
            self._aliases[str(path)] = os.fspath(uri)
        return path

    @property
    def out_path(self) -> Path:
        """Where the stage writes its artifact: `out` itself when it is a local folder and
        every input is local; otherwise a staging folder that `publish` moves or uploads."""
        if self._out_path is None:
            if self.remote_out:
                self._staging = Path(tempfile.mkdtemp(prefix="guilomo-out-"))
                self._out_path = self._staging / "artifact"
            elif self._aliases:  # parents to relabel before the artifact appears
                dest = local_path(self.out)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._staging = Path(
                    tempfile.mkdtemp(prefix=f".{dest.name}.stage-", dir=dest.parent)
                )
                self._out_path = self._staging / dest.name
            else:
                self._out_path = local_path(self.out)
        return self._out_path

    def publish(self) -> Manifest:
        """Put the artifact the stage wrote at `out`; returns its manifest."""
        path = self.out_path
        manifest = self._relabel_parents(path)
        if self.remote_out:
            return open_store(self.out).put_artifact(path, self.out, overwrite=self.overwrite)
        if self._staging is not None:
            dest = local_path(self.out)
            if dest.exists() and not self.overwrite:
                raise ArtifactError(f"{dest}: already exists; pass --overwrite to replace it")
            replace_folder(path, dest)
        return manifest

    def _relabel_parents(self, path: Path) -> Manifest:
        """Name the input URIs, not their cache folders, in the manifest's `parents` (for
        stages that record the paths they were given)."""
        manifest = read_manifest(path)
        parents = [self._aliases.get(p, p) for p in manifest.parents]
        if parents == manifest.parents:
            return manifest
        manifest = manifest.model_copy(update={"parents": parents})
        tmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
        )
        os.replace(tmp, path / MANIFEST)
        return manifest


def checkpoint_folder(uri: str) -> Path:
    """The local working copy of the checkpoint folder at the store URI `uri`."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / "checkpoints" / key


def pull_checkpoints(uri: str, local: Path) -> bool:
    """Bring the checkpoint last pushed to `uri` into `local` (a retried pod resuming);
    False when nothing was pushed there yet."""
    found = open_store(uri).sync_dir_down(uri, local) is not None
    log.info("%s: %s", uri, f"checkpoint pulled to {local}" if found else "no checkpoint yet")
    return found


def mirror_checkpoints(uri: str | None, local: Path | None) -> Callable[[], None] | None:
    """Make `local` a working copy of the checkpoint folder at `uri`: pull it now (once per
    machine under torchrun, the other processes waiting) and return the push to call after
    every save. None when there is no `uri`."""
    if uri is None:
        return None
    if local is None:
        raise ValueError("a checkpoint URI mirrors a local folder: give the local one as well")
    from .distributed import barrier

    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        pull_checkpoints(uri, Path(local))
    barrier()
    return functools.partial(push_checkpoints, Path(local), uri)


def push_checkpoints(local: Path, uri: str) -> None:
    """Push the checkpoint folder just saved to `uri`. A failure (after the store's own
    bounded retries) is logged and the stage goes on: the local checkpoint is intact, the
    one at `uri` is the previous complete one, and the next save pushes again."""
    try:
        open_store(uri).sync_dir_up(local, uri)
    except StorageError as exc:
        log.warning("checkpoint not pushed to %s (the stage goes on): %s", uri, exc)
