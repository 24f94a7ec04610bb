"""Print docker/constraints.txt: the exact version of every package guilomo needs at run time.

The set is the closure of guilomo's own requirements (not its `test` extra) over the installed
distributions, markers evaluated for this interpreter, so test-only tools (pytest, peft,
lm-eval and what they pull in) never reach the image. torch itself is left out (its own
dependencies are not): the Dockerfiles pin it with a build argument (CPU or CUDA wheel). `make docker-constraints` runs this in the
environment the tests pass in; `make venv` installs the project under these constraints, so
the tests, the image and the compiled pipeline YAML (which records kfp's version) agree.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

SKIP = re.compile(r"^(torch|triton|nvidia-.*)$")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def closure(root: str) -> dict[str, str]:
    """Installed name -> version for `root`'s run-time requirements, recursively."""
    seen: dict[str, str] = {}
    todo = [(Requirement(r), ()) for r in metadata.requires(root) or []]
    while todo:
        req, extras = todo.pop()  # extras: those its parent was asked for with
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (extras or ("",))
        ):
            continue
        name = _name(req.name)
        if name in seen:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} (needed by {root}) is not installed; run `make venv` first")
        seen[name] = f"{dist.metadata['Name']}=={dist.version}"
        for text in dist.requires or []:
            todo.append((Requirement(text), tuple(req.extras)))
    return seen


def main() -> None:
    pins = closure("guilomo")
    print("# Exact versions the image installs and `make venv` installs under (constraints, not")
    print("# requirements). Regenerate with `make docker-constraints` (docker/constraints.py);")
    print("# torch is pinned by the Dockerfiles' build args and the Makefile.")
    for name, line in sorted(pins.items()):
        if not SKIP.match(name):  # torch's own dependencies (sympy, ...) are still pinned
            print(line)


if __name__ == "__main__":
    main()
