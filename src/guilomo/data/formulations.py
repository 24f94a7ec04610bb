"""How a multiple-choice question is put to the model: the three formulations.

Preprocess chooses one formulation for a whole PreparedDataset and records it in the
manifest; every record then carries the exact text SFT trains on (``prompt`` + ``output``)
and evaluation scores, so a pipeline cannot train in one formulation and score another.

- ``rc`` (ranked classification, "cloze"; the default for the multiple-choice sets): the
  prompt lm-evaluation-harness uses for the task, e.g. ``"Question: {question}\\nAnswer:"``,
  and each option's text after one space as the continuation. ``acc`` picks the option with
  the largest summed log-likelihood, ``acc_norm`` the largest per character of the option
  text (the harness's definition). SFT trains ``" " + gold option``.
- ``mc`` (OLMES' multiple-choice format): the prompt lists the options as `` A. {option}``
  lines between ``Question: {question}`` and ``Answer:``; the continuations `` A``, `` B``..
  score the letter, which only models large enough to follow the format get right. SFT
  trains `` {gold letter}``.
- ``generate`` (the ScienceQA protocol; the default for ScienceQA and instruction data): the
  instruction ``Context: ..\\nQuestion: ..\\nOptions: (A) .. (B) ..\\n`` inside the prompt
  template (Alpaca by default), greedy decoding, exactly one ``The answer is X``. SFT trains
  ``Answer: The answer is X.``.

A reader gives a multiple-choice record its parts (``question``, ``context``, ``options``,
``gold``) and, where the harness has its own prompt for the set, ``cloze``: ``{"prompt":
str, or one str per option (WinoGrande's partial scoring), "choices": [str]}``.
:func:`formulate` turns it into the record of one formulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .prompts import Template

Formulation = Literal["rc", "mc", "generate"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Between a prompt and an option's continuation (lm-evaluation-harness' target delimiter).
DELIMITER = " "


def mc_parts(
    *,
    question: str,
    context: str | None,
    options: Sequence[str],
    gold: int,
    cloze: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The fields a reader gives a multiple-choice record (before :func:`formulate`):
    its parts, and ``instruction`` / ``output`` / ``answer`` in the generate form."""
    if not 0 <= gold < len(options):
        raise ValueError(f"gold index {gold} is not one of the {len(options)} options")
    shown = (context or "").strip() or "N/A"
    opts = " ".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(options))
    parts: dict[str, Any] = {
        "instruction": f"Context: {shown}\nQuestion: {question}\nOptions: {opts}\n",
        "input": "",
        "output": f"Answer: The answer is {LETTERS[gold]}.",
        "answer": LETTERS[gold],
        "question": question,
        "context": context,
        "options": list(options),
        "gold": gold,
    }
    if cloze is not None:
        parts["cloze"] = {"prompt": cloze["prompt"], "choices": list(cloze["choices"])}
    return parts


def formulate(
    record: Mapping[str, Any], formulation: Formulation, template: Template
) -> dict[str, Any]:
    """The record in `formulation`: adds ``formulation``, ``prompt`` (what the model reads
    before the trained or scored answer) and ``output`` (the trained answer); ``rc`` and
    ``mc`` add ``choices`` (each option's continuation after :data:`DELIMITER`) and, for
    per-option prompts, ``contexts``. `template` wraps the ``generate`` instruction only;
    ``rc`` or ``mc`` for a record without options (instruction data) is a ValueError."""
    out = {k: v for k, v in record.items() if k != "cloze"}
    out["formulation"] = formulation
    if formulation == "generate":
        out["prompt"] = template.prompt(record["instruction"], record.get("input", ""))
        return out
    if "options" not in record:
        raise ValueError(
            f"record {record.get('id')!r} has no options to score: formulation {formulation!r} "
            "needs multiple-choice data; use formulation 'generate' for instruction data"
        )
    gold, options, context = int(record["gold"]), record["options"], record.get("context")
    # the context (if any) on a line of its own, as the harness does for SciQ
    head = f"{context.strip()}\n" if context and context.strip() else ""
    head += f"Question: {record['question']}\n"
    if formulation == "rc":  # the harness's prompt, or for ScienceQA one in its style
        cloze = record.get("cloze") or {"prompt": f"{head}Answer:", "choices": options}
        out["choices"] = list(cloze["choices"])
        if isinstance(cloze["prompt"], str):
            out["prompt"] = cloze["prompt"]
        else:  # one prompt per option, one continuation (WinoGrande)
            out["contexts"] = list(cloze["prompt"])
            out["prompt"] = out["contexts"][gold]
    else:
        listed = "".join(f" {LETTERS[i]}. {text}\n" for i, text in enumerate(options))
        out["prompt"] = f"{head}{listed}Answer:"
        out["choices"] = list(LETTERS[: len(options)])
    out["output"] = DELIMITER + out["choices"][gold]
    return out


def scored_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(context, continuation) per option of an ``rc`` / ``mc`` record, in option order."""
    choices = record["choices"]
    contexts = record.get("contexts") or [record["prompt"]] * len(choices)
    return [(c, DELIMITER + text) for c, text in zip(contexts, choices, strict=True)]
