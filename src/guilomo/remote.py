"""Artifact and checkpoint URIs for the stages: local folders and `s3://bucket/prefix` alike.

A stage reads and writes local folders; this module puts URIs around them: `fetch_artifact`
(an S3 input, downloaded once into the cache), `StageIO` (the output, published whole) and
`mirror_checkpoints` (a local working copy of a checkpoint URI). S3 settings come from the
environment (see `guilomo.storage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from .artifacts import MANIFEST, ArtifactError, ArtifactKind, Manifest, read_manifest
from .folders import replace_folder
from .storage import StorageError, local_path, open_store

log = logging.getLogger(__name__)


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether `uri` names an object store (s3://...) rather than a local path or file://."""
    return urlparse(os.fspath(uri)).scheme not in ("", "file")


def cache_root() -> Path:
    """guilomo's cache (`$GUILOMO_CACHE` or ~/.cache/guilomo), shared with the models."""
    from .models import default_cache_dir

    return default_cache_dir()


def fetch_artifact(uri: str, *, kind: ArtifactKind) -> Path:
    """A local, verified folder holding the `kind` artifact at `uri`: a local path as it is
    (the stage verifies it); an S3 one downloaded, verified, to `<cache>/artifacts/<manifest
    digest>` the first time, then re-verified and reused by later stages on the machine."""
    uri = str(uri)
    if not is_remote(uri):
        return local_path(uri)
    store = open_store(uri)
    manifest = store.read_manifest(uri, required=True)  # StorageError naming the URI
    dest = cache_root() / "artifacts" / manifest.digest
    if store.get_artifact(uri, dest, kind=kind, overwrite=True).digest != manifest.digest:
        shutil.rmtree(dest, ignore_errors=True)
        raise StorageError(f"{uri}: the artifact changed while it was downloaded; run again")
    log.info("%s: %s artifact at %s", uri, kind, dest)
    return dest


class StageIO:
    """The input and output URIs of one stage run.

    `overwrite` replaces an artifact already at `out` (search, sft and evaluate always do,
    as they do locally); without it, an existing output is refused before any work starts.
    The manifest's `parents` name the URIs the user gave, never the cache folders.

        with StageIO("s3://bucket/runs/42/allocation") as io:
            state = io.input("s3://bucket/runs/42/search", "SearchState")  # a cache folder
            run_allocate(config, io.out_path, search=state)
            io.publish()
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = os.fspath(out)
        self.overwrite = overwrite
        self.remote_out = is_remote(self.out)
        self._aliases: dict[str, str] = {}  # local cache folder -> the URI it came from
        self._staging: Path | None = None
        self._out_path: Path | None = None

    def __enter__(self) -> StageIO:
        if not self.overwrite and self.remote_out and open_store(self.out).exists(self.out):
            raise StorageError(
                f"{self.out}: already holds an artifact; write to a new URI (artifacts are "
                "immutable) or pass --overwrite"
            )
        if not self.overwrite and not self.remote_out and local_path(self.out).exists():
            raise ArtifactError(
                f"{self.out}: already exists; choose a new output location or pass --overwrite"
            )
        return self

    def __exit__(self, *exc: object) -> None:
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
                staging = tempfile.mkdtemp(prefix=f".{dest.name}.stage-", dir=dest.parent)
                self._staging = Path(staging)
                self._out_path = self._staging / dest.name
            else:
                self._out_path = local_path(self.out)
        return self._out_path

    def publish(self) -> Manifest:
        """Put the artifact the stage wrote at `out`; returns its manifest."""
        path = self.out_path
        manifest = read_manifest(path)
        parents = [self._aliases.get(p, p) for p in manifest.parents]
        if parents != manifest.parents:  # only ever in a staging folder, not yet published
            manifest = manifest.model_copy(update={"parents": parents})
            text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True)
            (path / MANIFEST).write_text(text + "\n")
        if self.remote_out:
            return open_store(self.out).put_artifact(path, self.out, overwrite=self.overwrite)
        if self._staging is not None:
            dest = local_path(self.out)
            if dest.exists() and not self.overwrite:
                raise ArtifactError(f"{dest}: already exists; pass --overwrite to replace it")
            replace_folder(path, dest)
        return manifest


def checkpoint_folder(uri: str) -> Path:
    """The local working copy of the checkpoint folder at the store URI `uri`."""
    key = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / "checkpoints" / key


def mirror_checkpoints(uri: str | None, local: Path | None) -> Callable[[], None] | None:
    """Make `local` a working copy of the checkpoint folder at `uri`: pull the checkpoint last
    pushed there now (a retried pod resuming; once per machine under torchrun, the other
    processes waiting) and return the push to call after every save. None without a `uri`."""
    if uri is None:
        return None
    if local is None:
        raise ValueError("a checkpoint URI mirrors a local folder: give the local one as well")
    from .distributed import barrier

    local = Path(local)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        found = open_store(uri).sync_dir_down(uri, local) is not None
        log.info("%s: %s", uri, f"checkpoint pulled to {local}" if found else "no checkpoint yet")
    barrier()

    def push() -> None:
        """A failed push (after the store's own bounded retries) is logged and the stage goes
        on: the local checkpoint is intact, the one at `uri` is the previous complete one,
        and the next save pushes again."""
        try:
            open_store(uri).sync_dir_up(local, uri)
        except StorageError as exc:
            log.warning("checkpoint not pushed to %s (the stage goes on): %s", uri, exc)

    return push
