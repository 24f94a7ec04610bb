"""Split names, and the seeded train / validation / test split of records."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from .records import DataError

SPLITS = ("train", "validation", "test")
#: Split names as files, folders and ScienceQA spell them -> ours. ScienceQA's "mini" splits
#: are subsets of the primary ones and are folded into them.
SPLIT_NAMES = (
    dict.fromkeys(("train", "training", "minitrain"), "train")
    | dict.fromkeys(("validation", "valid", "val", "dev", "minival"), "validation")
    | dict.fromkeys(("test", "minitest"), "test")
)
#: Shares of unsplit data when no size is given: 70% train, 10% validation, test the rest.
DEFAULT_TRAIN_SHARE, DEFAULT_VALIDATION_SHARE = 0.7, 0.1


def split_name(name: str, origin: str) -> str:
    if name.strip().lower() not in SPLIT_NAMES:
        raise DataError(
            f"{origin}: unknown split {name!r}; name splits one of "
            f"{sorted(SPLIT_NAMES)} (they map to {list(SPLITS)})"
        )
    return SPLIT_NAMES[name.strip().lower()]


def split_records(
    records: Sequence[Mapping[str, Any]],
    *,
    train_size: int | None = None,
    validation_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Seeded train / validation / test split in which test holds every question the other
    two do not need; copies of the records with `"split"` set, in input order.

    Records without `"split"` are shuffled with `random.Random(seed)`: the first
    `validation_size` (default 10%, at least 1) become validation, the next `train_size`
    (default 70%) train, the rest test, capped at `test_size`. Records with `"split"` keep
    it; with no validation among them, `validation_size` (default 10% of train) train
    records become validation; each split is then capped at its size.
    """
    n, with_split = len(records), sum("split" in r for r in records)
    if 0 < with_split < n:
        raise DataError(
            f"split_records: {with_split} of {n} records carry a 'split' key; either all "
            "records carry one (from the source) or none do"
        )
    rng = random.Random(seed)
    sizes = (train_size, validation_size, test_size)
    if with_split:
        assignment = _source_splits(records, rng, validation_size)
    else:
        n_val = _size(validation_size, DEFAULT_VALIDATION_SHARE, n)
        n_train = _size(train_size, DEFAULT_TRAIN_SHARE, n)
        if n_val + n_train >= n:
            raise DataError(
                f"split_records: {n} questions are too few for {n_train} train and {n_val} "
                "validation questions and a test split; lower train_size / validation_size"
            )
        order = list(range(n))
        rng.shuffle(order)
        names = ["validation"] * n_val + ["train"] * n_train + ["test"] * (n - n_val - n_train)
        assignment = [split for _, split in sorted(zip(order, names, strict=True))]
        sizes = (None, None, test_size)  # train and validation have their sizes already
    for split, size in zip(SPLITS, sizes, strict=True):
        _cap(rng, assignment, split, size)
    pairs = list(zip(records, assignment, strict=True))
    out = {s: [{**r, "split": s} for r, a in pairs if a == s] for s in SPLITS}
    empty = [s for s in SPLITS if not out[s]]
    if empty:
        raise DataError(
            f"split_records: the {empty} split(s) came out empty; use more data or other sizes"
        )
    return out


def _source_splits(
    records: Sequence[Mapping[str, Any]], rng: random.Random, validation_size: int | None
) -> list[str | None]:
    """The records' own splits, with validation carved from train if there is none."""
    assignment: list[str | None] = [str(r["split"]) for r in records]
    for i, split in enumerate(assignment):
        if split not in SPLITS:
            raise DataError(
                f"split_records: record {i} (id {records[i].get('id')!r}) has split {split!r}; "
                f"splits are {list(SPLITS)}"
            )
    if "validation" not in assignment:
        train = [i for i, s in enumerate(assignment) if s == "train"]
        n_val = _size(validation_size, DEFAULT_VALIDATION_SHARE, len(train))
        if n_val >= len(train):
            raise DataError(
                f"split_records: the train split has {len(train)} records, too few to carve "
                f"{n_val} validation records from; lower validation_size or add data"
            )
        for i in rng.sample(train, n_val):
            assignment[i] = "validation"
    return assignment


def _cap(rng: random.Random, assignment: list[str | None], split: str, size: int | None) -> None:
    """Leave out (None) all but a seeded `size` of the records assigned to `split`."""
    members = [i for i, s in enumerate(assignment) if s == split]
    if size is not None and len(members) > size:
        for i in set(members) - set(rng.sample(members, size)):
            assignment[i] = None


def _size(size: int | None, share: float, n: int) -> int:
    return size if size is not None else max(1, round(share * n))


def split_counts(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, int]:
    """Records per split, plus `"total"`."""
    counts = dict.fromkeys(SPLITS, 0) | {name: len(rows) for name, rows in splits.items()}
    return counts | {"total": sum(counts.values())}


def field_counts(
    splits: Mapping[str, Sequence[Mapping[str, Any]]], key: str = "subject"
) -> dict[str, dict[str, int]]:
    """Per split, records per value of `key` (e.g. subject or source); None counts as "none"."""
    return {
        name: dict(sorted(Counter(str(r.get(key) or "none") for r in records).items()))
        for name, records in splits.items()
    }
