"""Folders that appear whole: written under a temporary sibling name, then renamed."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_folder(src: Path, dest: Path) -> None:
    """Rename the folder `src` to `dest`; an existing `dest` is moved aside first and then
    deleted, so `dest` is always either the old folder or the new one, whole."""
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
