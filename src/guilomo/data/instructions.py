"""Generic instruction data (any layout `files` reads) as records, through a field mapping."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import Part, columns, load_any, require_columns
from .formulations import LETTERS
from .records import DataError, Drop, ReadReport
from .split import SPLIT_NAMES

FIELDS = ("instruction", "input", "output", "answer", "subject", "id", "split")
# The options line: "Options: (A) " at the start of the instruction or of a line.
_OPTIONS_LINE = re.compile(r"(?:^|\n)Options: (?=\(A\) )")


def read_instructions(
    path: str | Path, *, fields: Mapping[str, str] | None = None, source: str | None = None
) -> ReadReport:
    """Instruction data as records. `fields` maps our names (`FIELDS`) to the data's columns,
    e.g. `{"instruction": "prompt", "output": "response"}`; unmapped names are looked up as
    they are. `instruction` and `output` are required; `input` and `answer` default to "",
    `subject` to None, `id` to "{source}-{row}"; `source` to the file or folder name. A
    non-empty answer to an instruction with an ``Options: (A) ..`` line must be one of its
    letters, else DataError."""
    root, mapping = Path(path), dict(fields or {})
    unknown = sorted(set(mapping) - set(FIELDS))
    if unknown:
        raise DataError(
            f"fields: unknown target name(s) {unknown}; map any of {list(FIELDS)} "
            "to your column names"
        )
    parts = load_any(root)
    names = columns({c: None for c in p.columns} for p in parts)
    for ours, theirs in mapping.items():
        if theirs not in names:
            raise DataError(
                f"{root}: field mapping {ours!r} -> {theirs!r}: no column {theirs!r}; "
                f"the columns are {names}; fix the mapping"
            )
    col = {name: mapping.get(name, name) for name in FIELDS}
    fix = "map it to an existing column with fields={...}"
    require_columns(parts, (col["instruction"], col["output"]), str(root), fix)
    name = source or (root.stem if root.is_file() else root.name)
    report = ReadReport(str(root), name)
    for part in parts:
        prefix = f"{name}-{part.split}" if part.split and len(parts) > 1 else name
        for i, row in enumerate(part.rows):
            record = report.convert(_record, row, col, part.split, f"{prefix}-{i}", name)
            if record is not None:
                _check_answer(record, col, part, i)
                report.records.append(record)
    return report.checked()


def _record(
    row: Mapping[str, Any], col: Mapping[str, str], split: str | None, default_id: str, source: str
) -> dict[str, Any]:
    value = {ours: row.get(theirs) for ours, theirs in col.items()}
    for ours in ("instruction", "output"):
        if value[ours] is None:
            raise Drop(f"missing field {col[ours]!r}")
        if not str(value[ours]).strip():
            raise Drop(f"empty field {col[ours]!r}")
    if split is None and value["split"] is not None:
        split = SPLIT_NAMES.get(str(value["split"]).strip().lower())
        if split is None:
            raise Drop(f"unknown split {value['split']!r}")
    text = {k: None if v is None else str(v) for k, v in value.items()}
    record = {k: text[k] or "" for k in ("instruction", "input", "output", "answer")}
    record["subject"], record["source"] = text["subject"], source
    record["id"] = default_id if text["id"] is None else text["id"]
    return record if split is None else {**record, "split": split}


def _option_letters(instruction: str) -> str:
    """The letters of the instruction's last ``Options: (A) ..`` line. Only the next letter's
    marker (`` (B) ``, then `` (C) ``..) ends an option, so "H (2)" or "see (D)" in an
    option's text do not."""
    start = list(_OPTIONS_LINE.finditer(instruction))[-1].end()
    line = instruction[start:].split("\n", 1)[0]
    n, pos = 1, len("(A) ")
    while n < len(LETTERS) and (m := re.compile(rf" \({LETTERS[n]}\)(?: |$)").search(line, pos)):
        n, pos = n + 1, m.end()
    return LETTERS[:n]


def _check_answer(record: Mapping[str, Any], col: Mapping[str, str], part: Part, i: int) -> None:
    """DataError unless a non-empty answer is a letter the instruction's options line lists
    (evaluation compares it with the predicted letter: any other answer is scored wrong)."""
    answer, instruction = record["answer"], record["instruction"]
    if not answer.strip() or not _OPTIONS_LINE.search(instruction):
        return
    letters = _option_letters(instruction)
    if len(letters) < 2:
        raise DataError(
            f"{part.where(i)}: field {col['instruction']!r}: the options line lists only option "
            f"A; need at least 2 options; list the options, or leave {col['answer']!r} empty"
        )
    if answer not in letters:
        what = "not a single capital letter"
        if re.fullmatch("[A-Z]", answer):
            what = "not one of the options"
        raise DataError(
            f"{part.where(i)}: field {col['answer']!r} is {answer!r}, {what}; the instruction "
            f"lists options {', '.join(letters)}: make the answer one of these capital letters"
        )
