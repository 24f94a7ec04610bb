"""The import graph follows README.md's layer diagram: every module of src/guilomo sits on
one line of it, and imports (module level or inside functions) only from its own line or
a line below. So there is no import circle between layers and no upward import."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "guilomo"


def layers() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("The layers, top to bottom", 1)[1].split("```text\n", 1)[1]
    block = block.split("```", 1)[0]
    rows = []
    for line in block.splitlines():
        m = re.match(r"^(\S+(?: \S+)*)\s{2,}\S", line)
        assert m, f"README layer line without a description: {line!r}"
        rows.append(m.group(1).split())
    return rows


def module_of(path: Path) -> str:
    rel = path.relative_to(SRC).as_posix()
    return rel.split("/")[0] + "/" if "/" in rel else rel


def imports(path: Path, source: str | None = None) -> set[str]:
    """The src/guilomo entries (`x.py` or `pkg/`) that `path` (or `source` as if at `path`)
    imports."""
    package = path.parent.relative_to(SRC).parts  # () for top-level modules
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            parts = base + (node.module.split(".") if node.module else [])
            names = [parts] if parts else [[a.name] for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            names = [m.split(".")[1:] for m in mods if m.split(".")[0] == "guilomo"]
            names = [n if n else ["__init__"] for n in names]
        else:
            continue
        for parts in names:
            target = SRC.joinpath(*parts)
            found.add(f"{parts[0]}/" if target.is_dir() or len(parts) > 1 else f"{parts[0]}.py")
    return found - {module_of(path)}


def test_every_import_goes_to_the_same_layer_or_below():
    rows = layers()
    level = {m: i for i, row in enumerate(rows) for m in row}
    modules = {module_of(p) for p in SRC.rglob("*.py")}
    assert modules <= set(level), f"not in README's layer diagram: {sorted(modules - set(level))}"
    upward = []
    for path in SRC.rglob("*.py"):
        here = level[module_of(path)]
        for target in imports(path):
            if target in level and level[target] < here:
                upward.append(f"{path.relative_to(SRC)} imports {target}")
    assert not upward, upward


def test_the_checker_sees_an_upward_import():
    """The parser resolves relative and absolute imports (so the test above can fail)."""
    assert "moe/" not in imports(SRC / "moe" / "layer.py")  # its own package is no import
    probe = "from ..stages import STAGES\nimport guilomo.cli\nfrom . import prepared\n"
    found = imports(SRC / "artifacts" / "probe.py", probe)
    assert found == {"stages/", "cli.py"}
    assert "artifacts/" in imports(SRC / "stages" / "probe.py", "from ..artifacts import x\n")
