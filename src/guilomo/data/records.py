"""What every reader returns: records in a `ReadReport`, or a `DataError`.

A record is a dict: "instruction", "input", "output", "answer" (str), "subject" (str or
None), "source", "id" (str), and "split" ("train" / "validation" / "test") when the source
is split. A multiple-choice record also has `question`, `context`, `options`, `gold` (the
answer's index) and, when the harness has its own prompt for the set, `cloze`; its
instruction / output are the generate form (see `formulations`).
Unusable rows are dropped and counted by reason; input that cannot be read at all raises
`DataError`, naming the file, the line or field, and a fix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .formulations import LETTERS

#: Licence of each data set, from its dataset card (HellaSwag: its repository's).
LICENCES: dict[str, str] = {
    "scienceqa": "CC BY-NC-SA 4.0", "arc_easy": "CC BY-SA 4.0", "arc_challenge": "CC BY-SA 4.0",
    "sciq": "CC BY-NC 3.0", "openbookqa": "Apache-2.0", "boolq": "CC BY-SA 3.0",
    "piqa": "AFL-3.0", "social_iqa": "not stated on its dataset card", "hellaswag": "MIT",
    "winogrande": "CC BY",
}  # fmt: skip


class DataError(ValueError):
    """Input data that cannot be read; the message names the file, line/field and a fix."""


class Drop(Exception):
    """A row left out; the message is the reason counted in `ReadReport.dropped`."""


@dataclass
class ReadReport:
    """A reader's records and what it left out: `rows_read == kept + sum(dropped.values())`;
    `notes` counts rows kept after a repair (e.g. a duplicate SciQ distractor removed)."""

    source: str  # the path read
    name: str  # the data set: the records' `source`
    records: list[dict[str, Any]] = field(default_factory=list)
    rows_read: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return len(self.records)

    @property
    def licence(self) -> str | None:
        return LICENCES.get(self.name)

    def convert(self, make: Callable[..., Any], *args: Any) -> Any:
        """Count one row read; return `make(*args)`, or None (counted) if the row drops."""
        self.rows_read += 1
        try:
            return make(*args)
        except Drop as drop:
            self.dropped[str(drop)] += 1
            return None

    def checked(self) -> ReadReport:
        if not self.records:
            raise DataError(
                f"{self.source}: none of the {self.rows_read} rows could be used (dropped: "
                f"{dict(self.dropped)}); check that the path holds the data set you meant"
            )
        return self

    def summary(self) -> dict[str, Any]:
        """Everything but the records, JSON-ready (for a report file)."""
        plain = {k: getattr(self, k) for k in ("name", "source", "licence", "rows_read", "kept")}
        counts = {k: dict(sorted(getattr(self, k).items())) for k in ("dropped", "notes")}
        splits = Counter(r.get("split", "unsplit") for r in self.records)
        return plain | counts | {"splits": dict(splits)}


def option_index(value: Any, n: int, *, base: int = 0, unknown: str = "unknown answer") -> int:
    """The 0-based index among `n` options of an int or digit-string label (`base` 1 for
    1-based labels), or Drop."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Drop(unknown)
    if not 0 <= value - base < n:
        raise Drop("answer index out of range")
    return value - base


def require(row: Mapping[str, Any], names: Iterable[str]) -> None:
    for name in names:
        if row.get(name) is None:
            raise Drop(f"missing field {name!r}")


def check_option_count(options: Sequence[Any]) -> None:
    if not 2 <= len(options) <= len(LETTERS):
        raise Drop("fewer than 2 choices" if len(options) < 2 else "too many choices")
