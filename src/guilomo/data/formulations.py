"""How a multiple-choice question is put to the model: the three formulations.

Preprocess chooses one formulation for a whole PreparedDataset and records it in the
manifest; every record then carries the exact text SFT trains on (``prompt`` + ``output``)
and evaluation scores, so a pipeline cannot train in one formulation and score another.

- ``rc`` (ranked classification, the "cloze" formulation; the default for the
  multiple-choice sets): the prompt lm-evaluation-harness uses for the task, e.g.
  ``"Question: {question}\\nAnswer:"``, and each option's text after one space as the
  continuation. ``acc`` picks the option with the largest summed log-likelihood,
  ``acc_norm`` the largest log-likelihood per character of the option text (the harness's
  definition). SFT trains ``" " + gold option``.
- ``mc``: the options listed with letters (OLMES' multiple-choice format)::

      Question: {question}
       A. {option 1}
       B. {option 2}
      Answer:

  and the continuation `` A``, `` B``, ...: it scores the letter, which only models large
  enough to follow the format get right. SFT trains `` {gold letter}``.
- ``generate``: the ScienceQA protocol: the instruction ``Context: ..\\nQuestion: ..\\n
  Options: (A) .. (B) ..\\n`` inside the prompt template (Alpaca by default), greedy
  decoding, exactly one ``The answer is X``. SFT trains ``Answer: The answer is X.``; the
  default for ScienceQA and instruction data.

A reader gives a multiple-choice record its parts (``question``, ``context``, ``options``,
``gold``) and, where the harness has its own prompt for the set, ``cloze``: ``{"prompt":
str, or one str per option (WinoGrande's partial scoring), "choices": [str]}``.
:func:`formulate` turns it into the record of one formulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    from .prompts import Template

Formulation = Literal["rc", "mc", "generate"]
FORMULATIONS: tuple[str, ...] = get_args(Formulation)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: Between a prompt and an option's continuation (lm-evaluation-harness' target delimiter).
DELIMITER = " "


def format_question(context: str | None, question: str, options: Sequence[str]) -> str:
    """The instruction of the ``generate`` formulation (ScienceQA's format)."""
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options; at most {len(LETTERS)} can be lettered")
    context = (context or "").strip() or "N/A"
    opts = " ".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(options))
    return f"Context: {context}\nQuestion: {question}\nOptions: {opts}\n"


def generic_cloze(question: str, context: str | None, options: Sequence[str]) -> dict[str, Any]:
    """The ``rc`` form of a set the harness has no prompt for (ScienceQA): its context (if
    any) on a line of its own, as the harness does for SciQ, then ``Question: ..\\nAnswer:``."""
    lead = f"{context.strip()}\n" if context and context.strip() else ""
    return {"prompt": f"{lead}Question: {question}\nAnswer:", "choices": list(options)}


def mc_prompt(question: str, context: str | None, options: Sequence[str]) -> str:
    """The ``mc`` prompt: context (if any), the question, the lettered options, ``Answer:``."""
    lead = f"{context.strip()}\n" if context and context.strip() else ""
    listed = "".join(f" {LETTERS[i]}. {text}\n" for i, text in enumerate(options))
    return f"{lead}Question: {question}\n{listed}Answer:"


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
    parts: dict[str, Any] = {
        "instruction": format_question(context, question, options),
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
    per-option prompts, ``contexts``. `template` wraps the ``generate`` instruction only.

    Raises:
        ValueError: ``rc`` or ``mc`` for a record without options (instruction data).
    """
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
    gold, options = int(record["gold"]), record["options"]
    if formulation == "rc":
        cloze = record.get("cloze") or generic_cloze(
            record["question"], record.get("context"), options
        )
        out["choices"] = list(cloze["choices"])
        if isinstance(cloze["prompt"], str):
            out["prompt"] = cloze["prompt"]
        else:  # one prompt per option, one continuation (WinoGrande)
            out["contexts"] = list(cloze["prompt"])
            out["prompt"] = out["contexts"][gold]
    else:
        out["prompt"] = mc_prompt(record["question"], record.get("context"), options)
        out["choices"] = list(LETTERS[: len(options)])
    out["output"] = DELIMITER + out["choices"][gold]
    return out


def scored_pairs(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(context, continuation) per option of an ``rc`` / ``mc`` record, in option order."""
    choices = record["choices"]
    contexts = record.get("contexts") or [record["prompt"]] * len(choices)
    return [(c, DELIMITER + text) for c, text in zip(contexts, choices, strict=True)]
