"""Data files and folders -> rows: a .json, .jsonl or .parquet file, a `save_to_disk`
folder, or a folder of split-named files; one `Part` per file or split. An `image` column
becomes the marker "<image>" (or None): its bytes are never copied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..textfiles import decode_utf8, read_text
from .records import DataError
from .split import SPLIT_NAMES, SPLITS, split_name

LAYOUTS = (
    "a .json (list of objects), .jsonl or .parquet file; a datasets save_to_disk folder "
    "(dataset_dict.json, or state.json + dataset_info.json); a folder of split-named files "
    "(train*.parquet / validation*.jsonl / test*.json ..., directly or under data/)"
)
CHECK_THE_SET = "check that this is the right data set, or rename the column"
_SPLIT_FILE = re.compile(rf"^({'|'.join(SPLIT_NAMES)})(?:[-_.].*)?$")
Rows = list[dict[str, Any]]


@dataclass
class Part:
    """The rows of one file or split; `split` is ours ("train"...) or None if unsplit."""

    origin: str
    split: str | None
    columns: list[str]
    rows: Rows
    # per file: (its first row, "FILE: unit", the rows' numbers there if not 0, 1, ...)
    files: list[tuple[int, str, list[int] | None]] = field(default_factory=list)

    def where(self, i: int) -> str:
        """Row `i` as "FILE: line 7" (.jsonl, 1-based), "FILE: item 3" (a .json list's
        index) or "FILE: row 3" (parquet, save_to_disk; 0-based, as `dataset[3]`)."""
        home = (0, f"{self.origin}: row", None)
        first, place, numbers = next((f for f in reversed(self.files) if i >= f[0]), home)
        return f"{place} {i - first if numbers is None else numbers[i - first]}"


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def require_columns(parts: Sequence[Part], required: Iterable[str], origin: str, fix: str) -> None:
    """DataError if a required field is absent (or null) in every row; `fix` says what to do."""
    names = columns(dict.fromkeys(p.columns) for p in parts)
    for name in required:
        if not any(r.get(name) is not None for p in parts for r in p.rows):
            where = "no such column" if name not in names else "it is empty in every row"
            raise DataError(
                f"{origin}: required field {name!r}: {where}; the columns are {names}; {fix}"
            )


def load_any(path: Path, *, single_split: bool = False, layouts: str = LAYOUTS) -> list[Part]:
    """The parts of any supported file or folder. With `single_split`, a lone file or
    Dataset keeps the split its name or metadata records (ScienceQA's wish; a lone
    evaluation split of another set is read unsplit)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; looked for {layouts}")
    if path.is_file():
        return [_split_part([path], _split_of(path) if single_split else None)]
    saved = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    if saved or (path / "dataset_dict.json").is_file():
        return _saved(path, single_split=single_split)
    for where in (path, path / "data"):
        found: dict[str, list[Path]] = {}
        for p in sorted(where.iterdir()) if where.is_dir() else ():
            if p.is_file() and p.suffix in _READERS and (split := _split_of(p)):
                found.setdefault(split, []).append(p)
        if found:
            return [_split_part(found[split], split) for split in SPLITS if split in found]
    present = sorted(p.name for p in path.iterdir())[:20]
    raise DataError(f"{path}: none of the known layouts; looked for {layouts}; found {present}")


def read_json(path: Path) -> Any:
    text = read_text(path, error=DataError)
    if not text.strip():
        raise DataError(f"{path}: the file is empty; it should hold a JSON list of objects")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}); "
            "fix that line (a file with one object per line must be named .jsonl)"
        ) from None


# JSON and JSONL are parsed here, not by datasets' Arrow JSON reader: errors name the line,
# and each row keeps its own types (Arrow rejects a column mixing e.g. ints and strings).
def _json_list(path: Path) -> tuple[Rows, str, None]:
    doc = read_json(path)
    if not isinstance(doc, list):
        raise DataError(
            f"{path}: holds a JSON {type(doc).__name__}, expected a list of objects; "
            "wrap the records in [...] or write one object per line as .jsonl"
        )
    if not doc:
        raise DataError(f"{path}: the list is empty; there are no records to read")
    return [_object(row, f"{path}: item {i}") for i, row in enumerate(doc)], "item", None


def _jsonl(path: Path) -> tuple[Rows, str, list[int]]:
    rows, linenos = [], []
    with open(path, "rb") as f:
        head = f.peek(4)[:4]  # a UTF-16/32 byte-order mark, named if a line fails to decode
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{path}: line {lineno}", head=head, error=DataError)
            if not line.strip():
                continue
            try:
                rows.append(_object(json.loads(line), f"{path}: line {lineno}"))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one complete JSON object: fix or delete that line"
                ) from None
            linenos.append(lineno)
    if not rows:
        raise DataError(f"{path}: the file is empty (no JSON lines); there is nothing to read")
    return rows, "line", linenos


def _object(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: a JSON {type(row).__name__}, expected an object; make each row one"
        )
    return row


# Parquet is read by pyarrow in batches: load_dataset("parquet") would first copy each file
# into the Hugging Face cache, and fails on a file with no rows.
def _parquet(path: Path) -> tuple[Rows, str, None]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    return [row for batch in batches for row in _arrow_rows(batch)], "row", None


_READERS = {".parquet": _parquet, ".jsonl": _jsonl, ".json": _json_list}


def _split_part(paths: Sequence[Path], split: str | None) -> Part:
    if paths[0].suffix not in _READERS:
        raise DataError(
            f"{paths[0]}: unknown file type {paths[0].suffix!r}; use .json (a list of objects), "
            ".jsonl, .parquet, or a datasets save_to_disk folder"
        )
    rows: Rows = []
    files = []
    for path in paths:
        file_rows, unit, numbers = _READERS[path.suffix](path)
        files.append((len(rows), f"{path}: {unit}", numbers))
        rows += file_rows
    origin = str(paths[0]) + ("..." if len(paths) > 1 else "")
    if not rows:
        what = f"the {split} split" if split else "the file"
        raise DataError(f"{origin}: {what} has no rows; there is nothing to read")
    return Part(origin, split, columns(rows), rows, files)


def _split_of(path: Path) -> str | None:
    match = _SPLIT_FILE.match(path.name.removesuffix(path.suffix))
    return SPLIT_NAMES[match.group(1)] if match else None


def _saved(path: Path, *, single_split: bool) -> list[Part]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        # datasets saves an empty split with no data files, and then cannot load it
        folders = [path, *sorted(path.iterdir())]
        empty = [d for d in folders if (d / "state.json").is_file() and not any(d.glob("*.arrow"))]
        if empty:
            what = "the data set" if empty[0] == path else f"split {empty[0].name!r}"
            raise DataError(
                f"{path}: {what} has no rows (no data files); nothing to read"
            ) from None
        raise DataError(f"{path}: not a readable save_to_disk folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        return [_dataset(d, f"{path} [{n}]", split_name(n, str(path))) for n, d in ds.items()]
    recorded = SPLIT_NAMES.get(str(ds.split).lower()) if ds.split is not None else None
    return [_dataset(ds, str(path), recorded if single_split else None)]


def _dataset(ds: Any, origin: str, split: str | None) -> Part:
    rows = [row for table in ds.with_format("arrow").iter(4096) for row in _arrow_rows(table)]
    if not rows:
        what = f"split {split!r}" if split else "the data set"
        raise DataError(f"{origin}: {what} has no rows; there is nothing to read")
    return Part(origin, split, list(ds.column_names), rows)


def _arrow_rows(table: Any) -> Rows:
    """Rows of an Arrow table or batch as dicts; `image` becomes "<image>" or None."""
    if "image" not in table.column_names:
        return table.to_pylist()
    import pyarrow as pa
    import pyarrow.compute as pc

    image = table.column("image")
    present = pc.is_valid(image)
    if pa.types.is_struct(image.type):  # datasets' Image feature: {bytes, path}
        inner = [pc.is_valid(pc.struct_field(image, name)) for name in ("bytes", "path")]
        present = pc.and_(present, pc.or_(*inner))
    marker = pc.if_else(present, "<image>", pa.scalar(None, pa.string()))
    return table.set_column(table.column_names.index("image"), "image", marker).to_pylist()
