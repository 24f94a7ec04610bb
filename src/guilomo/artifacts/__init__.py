"""Typed artifacts: a folder of payload files plus `manifest.json`, written last.

The manifest records the kind, schema version, the sha256 of every payload file, the
producing stage, the hash of the stage's config, the URIs of the parent artifacts and the
code version. A stage writes into a temporary sibling folder and renames it into place,
so a killed stage never leaves a folder that looks complete; a reader verifies the
manifest and every checksum and refuses anything else.

    with ArtifactWriter(out, kind="Allocation", stage="allocate", config=cfg) as tmp:
        (tmp / "allocation.json").write_text(...)
    manifest = read_artifact(out, kind="Allocation")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..folders import replace_folder

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
ArtifactKind = Literal["PreparedDataset", "SearchState", "Allocation", "Adapter", "EvalReport"]


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, tampered with or of the wrong kind."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ArtifactKind
    schema_version: Literal[1] = SCHEMA_VERSION
    files: dict[str, str] = Field(description="Payload path (relative, '/'-separated) -> sha256.")
    stage: str = Field(description="The stage that produced the artifact.")
    config_hash: str = Field(description="sha256 of the stage config's canonical JSON.")
    parents: list[str] = Field(default_factory=list, description="URIs of the input artifacts.")
    code_version: str
    created: str = Field(description="UTC time the artifact was completed (ISO 8601).")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Small stage facts.")

    @property
    def digest(self) -> str:
        """sha256 of the payload: kind + every file's checksum (the MLflow dataset digest)."""
        payload = json.dumps({"kind": self.kind, "files": self.files}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(path: Path, keep: Callable[[Path], bool] | None = None) -> str:
    """`sha256:` + the sha256 of the relative names and sha256s of the files under `path`
    (those `keep` accepts), or of the file `path` itself: an identity for raw data and
    model weights that are not artifacts."""
    path = Path(path)
    if path.is_file():
        return "sha256:" + sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and (keep is None or keep(p)))
    lines = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_file(p)}\n" for p in files)
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def config_hash(config: BaseModel | Mapping[str, Any] | None) -> str:
    """sha256 of a config's canonical JSON (sorted keys); '' for no config."""
    if config is None:
        return ""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> str:
    """guilomo's version, plus the git commit when running from a checkout."""
    if env := os.environ.get("GUILOMO_CODE_VERSION"):
        return env
    git = ["git", "rev-parse", "--short=12", "HEAD"]
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(git, cwd=here, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return __version__
    sha = done.stdout.strip()
    return f"{__version__}+g{sha}" if sha else __version__


@contextmanager
def ArtifactWriter(
    dest: str | os.PathLike,
    *,
    kind: ArtifactKind,
    stage: str,
    config: BaseModel | Mapping[str, Any] | None = None,
    parents: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Iterator[Path]:
    """Context manager: yields a temporary folder; on success checksums it, writes the
    manifest last and renames the folder to `dest`. On error the temporary folder is removed
    and `dest` is left as it was."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ArtifactError(
            f"{dest}: already exists; choose a new output location or pass overwrite"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        manifest = Manifest(
            kind=kind,
            files={rel: sha256_file(tmp / rel) for rel in _payload(tmp)},
            stage=stage,
            config_hash=config_hash(config),
            parents=list(parents),
            code_version=code_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            metadata=dict(metadata or {}),
        )
        text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True)
        (tmp / MANIFEST).write_text(text + "\n")
        replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _payload(root: Path) -> list[str]:
    """The relative names of the files under `root`, less the manifest."""
    names = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(name for name in names if name != MANIFEST)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The manifest of the artifact at `path`, without checking the payload."""
    root = Path(path)
    mpath = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no artifact here (not a folder)")
    if not mpath.is_file():
        raise ArtifactError(
            f"{root}: no {MANIFEST}, so this is not a complete artifact (an interrupted stage "
            "or a folder written by hand); rerun the stage that produces it"
        )
    try:
        return Manifest.model_validate_json(mpath.read_text())
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ArtifactError(f"{mpath}: invalid manifest: {field}: {err['msg']}") from None


def read_artifact(path: str | os.PathLike, kind: ArtifactKind | None = None) -> Manifest:
    """Verify the artifact at `path` (manifest, kind, every checksum, no stray files)."""
    root = Path(path)
    manifest = read_manifest(root)
    if kind is not None and manifest.kind != kind:
        raise ArtifactError(f"{root}: holds a {manifest.kind} artifact, expected {kind}")
    present = set(_payload(root))
    missing = sorted(set(manifest.files) - present)
    extra = sorted(present - set(manifest.files))
    if missing or extra:
        raise ArtifactError(
            f"{root}: files do not match {MANIFEST}: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for rel, want in manifest.files.items():
        if sha256_file(root / rel) != want:
            raise ArtifactError(
                f"{root / rel}: checksum mismatch: the file changed after it was written"
            )
    return manifest
