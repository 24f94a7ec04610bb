"""The lettered options of a multiple-choice instruction (``Options: (A) .. (B) ..``).

Shared by the readers (an answer must name a listed option) and the evaluate stage
(log-likelihood scoring of each option).
"""

from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The options line: "Options: (A) " at the start of the instruction or of a line.
_OPTIONS_LINE = re.compile(r"(?:^|\n)Options: (?=\(A\) )")


def has_options(instruction: str) -> bool:
    """Does the instruction have an ``Options: (A) ...`` line?"""
    return _OPTIONS_LINE.search(instruction) is not None


def parse_options(instruction: str) -> list[tuple[str, str]]:
    """The ``(letter, text)`` options of a multiple-choice instruction.

    The options line is the last line starting ``Options: (A) `` (text after its end of line
    is not part of it). It is cut at `` (B) ``, then at `` (C) `` after that, and so on: only
    the next consecutive letter ends an option, so parentheses in option texts ("H (2)",
    "(a) or (b)", "see (D)") are kept. An option text containing the literal next marker
    (" (B) " inside option A) cannot be told apart and is cut there. Texts are stripped.

    Raises:
        ValueError: there is no options line, or it lists fewer than two options.
    """
    matches = list(_OPTIONS_LINE.finditer(instruction))
    if not matches:
        raise ValueError("no 'Options: (A) ...' line in the instruction")
    start = matches[-1].end()
    end = instruction.find("\n", start)
    line = instruction[start : end if end >= 0 else len(instruction)]
    pos = len("(A) ")
    options: list[tuple[str, str]] = []
    for i, letter in enumerate(LETTERS):
        nxt = re.compile(rf" \({LETTERS[i + 1]}\)(?: |$)") if i + 1 < len(LETTERS) else None
        m = nxt.search(line, pos) if nxt is not None else None
        if m is None:
            options.append((letter, line[pos:].strip()))
            break
        options.append((letter, line[pos : m.start()].strip()))
        pos = m.end()
    if len(options) < 2:
        raise ValueError("the options line lists only option A; need at least 2 options")
    return options
