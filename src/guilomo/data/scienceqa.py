"""ScienceQA's text-only questions as records, with their original split.

The original `pid_splits.json` has the primary splits `train`, `val` (-> "validation") and
`test`, and their subsets `minitrain`, `minival`, `minitest`: a pid only in a subset (never
so in the released data) goes to its parent split; `trainval` is ignored (it cannot tell
train from val). A problem in no split falls back to its own `split` field.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .files import CHECK_THE_SET, LAYOUTS, Part, columns, load_any, read_json, require_columns
from .formulations import mc_parts
from .records import DataError, Drop, ReadReport, check_option_count, option_index, require
from .split import SPLIT_NAMES, SPLITS, split_name

log = logging.getLogger(__name__)

_REQUIRED = ("question", "choices", "answer")
_ID_FIELDS = ("question", "hint", "choices", "answer", "subject", "topic", "category", "grade",
              "lecture", "solution")  # fmt: skip


def read_scienceqa(path: str | Path) -> ReadReport:
    """Text-only ScienceQA questions as records, with their original split under `"split"`.

    `path`: the original release's folder (or its problems.json), the Hugging Face parquet
    layout, or a `save_to_disk` folder. Ids: `scienceqa-<pid>`, or where there is no pid
    `scienceqa-<16 hex digits of a SHA-1 of the question's fields>` (`-2`... on repeats). A
    question in several splits is kept only in the last of train < validation < test.
    """
    root = Path(path)
    # A .json file can only be the original release's problems.json, whatever its name.
    problems = root if root.is_file() and root.suffix == ".json" else root / "problems.json"
    if problems.is_file():
        parts, source = _original_parts(problems), str(problems)
    else:
        layouts = f"problems.json + pid_splits.json, or {LAYOUTS}"
        parts, source = load_any(root, single_split=True, layouts=layouts), str(root)
    require_columns(parts, _REQUIRED, source, CHECK_THE_SET)
    if all(r.get("image") for p in parts for r in p.rows):
        raise DataError(
            f"{source}: no text-only question left: all {sum(len(p.rows) for p in parts)} "
            "questions have an image, and only text-only questions are read; point the path "
            "at a full copy of ScienceQA"
        )
    report = ReadReport(source, "scienceqa")
    found = [report.convert(_record, row, part) for part in parts for row in part.rows]
    seen: Counter[str] = Counter()
    for record in _latest_copies([f for f in found if f is not None], report):
        seen[record["id"]] += 1
        if seen[record["id"]] > 1:  # a content-hash id: the same question again in its split
            record["id"] = f"{record['id']}-{seen[record['id']]}"
        report.records.append(record)
    return report.checked()


def _record(row: Mapping[str, Any], part: Part) -> tuple[str, dict[str, Any]]:
    if "_drop" in row:
        raise Drop(row["_drop"])
    if row.get("image"):
        raise Drop("has image")
    require(row, _REQUIRED)
    question, choices, hint = row["question"], row["choices"], row.get("hint")
    if not isinstance(question, str) or not question.strip():
        raise Drop("empty question")
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        raise Drop("choices not a list of strings")
    check_option_count(choices)
    gold = option_index(row["answer"], len(choices), unknown="answer not an integer index")
    fields = [gold if k == "answer" else row.get(k) for k in _ID_FIELDS]
    key = json.dumps(fields, ensure_ascii=False, sort_keys=True, default=str)
    digest = "scienceqa-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
    context = hint if isinstance(hint, str) else ""
    record = mc_parts(question=question, context=context, options=list(choices), gold=gold)
    record["subject"] = None if row.get("subject") is None else str(row["subject"])
    record["source"] = "scienceqa"
    record["id"] = f"scienceqa-{row['_pid']}" if "_pid" in row else digest
    if part.split is not None:
        record["split"] = part.split
    elif row.get("split") is not None:
        record["split"] = split_name(str(row["split"]), part.origin)
    return digest, record


def _latest_copies(
    found: Sequence[tuple[str, dict[str, Any]]], report: ReadReport
) -> list[dict[str, Any]]:
    """The records less the copies of a question (by hash) also in a later split."""
    latest: dict[str, str] = {}
    for digest, record in found:
        if "split" in record:
            latest[digest] = max(latest.get(digest, "train"), record["split"], key=SPLITS.index)
    copies = [(d, r) for d, r in found if "split" in r and r["split"] != latest[d]]
    if copies:
        dropped = Counter(f"duplicate of a {latest[d]} question" for d, _ in copies)
        report.dropped.update(dropped)
        shared = report.notes["questions in several splits"] = len({d for d, _ in copies})
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        log.warning(
            f"{report.source}: {shared} questions are in more than one split (the same "
            "question, choices, answer, hint, lecture and solution); each is kept only in test, "
            f"or else validation, and its {len(copies)} copies in the earlier splits are dropped "
            f"({reasons}), so nothing is trained on a question it is tested on"
        )
    return [r for d, r in found if not ("split" in r and r["split"] != latest[d])]


def _original_parts(problems_path: Path) -> list[Part]:
    """problems.json (+ pid_splits.json) -> a `Part` per split, and one of rows to drop."""
    problems = read_json(problems_path)
    valid = isinstance(problems, dict) and all(isinstance(p, dict) for p in problems.values())
    if not problems or not valid:
        raise DataError(
            f"{problems_path}: not ScienceQA's problems.json, a non-empty object mapping problem "
            'id -> {"question": ..., "choices": [...], "answer": ...}; check the path'
        )
    splits_path = problems_path.parent / "pid_splits.json"
    if not splits_path.is_file() and not all("split" in p for p in problems.values()):
        raise DataError(
            f"{splits_path}: not found, and not every problem in {problems_path.name} has a "
            "'split' field; put pid_splits.json beside problems.json"
        )
    assigned, conflicts = _pid_splits(splits_path) if splits_path.is_file() else ({}, set())
    by_split: dict[str | None, list[dict[str, Any]]] = {s: [] for s in (*SPLITS, None)}
    for pid, problem in problems.items():
        split = assigned.get(pid)
        if split is None and pid not in conflicts and problem.get("split") is not None:
            split = split_name(str(problem["split"]), f"{problems_path}: problem {pid!r}")
        row = {**problem, "_pid": pid}  # the record id keeps it
        if pid in conflicts or split is None:
            row["_drop"] = "in several splits" if pid in conflicts else "in no split"
        by_split[None if "_drop" in row else split].append(row)
    names = columns(problems.values())
    return [Part(str(problems_path), s, names, rows) for s, rows in by_split.items() if rows]


def _pid_splits(path: Path) -> tuple[dict[str, str], set[str]]:
    """pid -> split from pid_splits.json, and the pids in two primary splits."""
    doc = read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(v, list) for v in doc.values()):
        raise DataError(f"{path}: expected an object mapping split name -> list of problem ids")
    assigned: dict[str, str] = {}
    conflicts: set[str] = set()
    # the primary splits first, then the mini subsets for pids not placed yet
    for key in sorted(doc, key=lambda k: k.strip().lower().startswith("mini")):
        name, subset = key.strip().lower(), key.strip().lower().startswith("mini")
        if name not in SPLIT_NAMES:
            continue  # trainval and unknown keys are ignored
        if not doc[key] and not subset:
            raise DataError(
                f"{path}: split {key!r} is empty; list its problem ids or remove the key"
            )
        for pid in map(str, doc[key]):
            if assigned.setdefault(pid, SPLIT_NAMES[name]) != SPLIT_NAMES[name] and not subset:
                conflicts.add(pid)
    return assigned, conflicts
