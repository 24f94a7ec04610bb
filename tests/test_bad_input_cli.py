"""Bad input through `guilomo stage ...`: exit 2, a message naming the file, the place and the
field, no traceback, and no --out folder left behind."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_llama, tiny_tokenizer

GUILOMO = str(Path(sys.executable).parent / "guilomo")
FIXTURE = Path(__file__).parent / "fixtures" / "scienceqa"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def guilomo(*args):
    return subprocess.run([GUILOMO, *map(str, args)], capture_output=True, text=True, timeout=600)


def refused(tmp_path, *args, words):
    """Run `guilomo stage ... --out OUT`; assert exit 2, every word in stderr, no OUT."""
    out = tmp_path / "out"
    r = guilomo("stage", *args, "--out", out)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    for word in words:
        assert word in r.stderr, (word, r.stderr[-2000:])
    assert not out.exists()
    return r.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny 4-layer LLaMA folder (allocate reads its module names)."""
    root = tmp_path_factory.mktemp("base")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(root)
    tok.save_pretrained(root)
    return root


# ------------------------------------------------------------- 1. answer outside the options


def _question(answer, options="(A) red (B) blue"):
    return {
        "prompt": f"Context: N/A\nQuestion: Which colour?\nOptions: {options}\n",
        "response": f"Answer: The answer is {answer}.",
        "label": answer,
    }


FIELDS = ["--fields", "instruction=prompt", "output=response", "answer=label"]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_answer_outside_the_options_exits_2(tmp_path, kind):
    rows = [_question("A"), _question("B"), _question("Q"), _question("A")]
    path = tmp_path / f"rows.{kind}"
    if kind == "jsonl":  # a blank line first: the line number is the file's, not the row's
        path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))
        place = "line 4"
    elif kind == "json":
        path.write_text(json.dumps(rows))
        place = "item 2"
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
        place = "row 2"
    refused(
        tmp_path,
        *("preprocess", "--source", "instructions", "--path", path, *FIELDS),
        words=[f"{path}: {place}: field 'label' is 'Q', not one of the options", "A, B"],
    )


def test_answer_that_is_not_a_capital_letter_exits_2(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [_question("A"), _question("red")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(
        tmp_path,
        *("preprocess", "--source", "instructions", "--path", path, *FIELDS),
        words=[f"{path}: line 2: field 'label' is 'red', not a single capital letter", "A, B"],
    )


# ------------------------------------------------------------------ 2. text that is not UTF-8


ROWS = [{"instruction": f"Café {i}?", "output": "Oui."} for i in range(6)]


def test_utf16_jsonl_exits_2(tmp_path):
    path = tmp_path / "rows.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)
    path.write_bytes(text.encode("utf-16"))
    refused(
        tmp_path,
        *("preprocess", "--source", "instructions", "--path", path),
        words=[
            f"{path}: line 1: not UTF-8 text (byte 0xff at position 0: looks like UTF-16)",
            "save it as UTF-8",
        ],
    )


def test_latin1_json_exits_2(tmp_path):
    path = tmp_path / "rows.json"
    text = json.dumps(ROWS, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    refused(
        tmp_path,
        *("preprocess", "--source", "instructions", "--path", path),
        words=[
            f"{path}: not UTF-8 text (byte 0xe9 at position {text.index('é')})",
            "save it as UTF-8",
        ],
    )


def test_latin1_line_in_the_middle_of_a_jsonl_names_the_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS]
    path.write_bytes("".join(lines[:4]).encode() + lines[4].encode("latin-1"))
    refused(
        tmp_path,
        *("preprocess", "--source", "instructions", "--path", path),
        words=[f"{path}: line 5: not UTF-8 text (byte 0xe9 at position {lines[4].index('é')})"],
    )


@pytest.mark.parametrize(
    "stage,yaml",
    [(["preprocess"], "seed: 1\n"), (["allocate", "--preset", "2468"], "top_k: 2\n")],
)
def test_utf16_config_yaml_exits_2(tmp_path, stage, yaml):
    config = tmp_path / "stage.yaml"
    config.write_bytes(yaml.encode("utf-16"))
    refused(
        tmp_path,
        *stage,
        "--config",
        config,
        words=[f"{config}: not UTF-8 text (byte 0xff at position 0: looks like UTF-16)"],
    )


# ------------------------------------------------------ 3. top_k above a module's experts


@pytest.mark.parametrize(
    "preset,module",
    [
        (["uniform", "--experts", 2], "model.layers.0.self_attn.q_proj"),
        (["2468"], "model.layers.0.self_attn.q_proj"),  # 4 layers: 2, 4, 6, 8 experts
        (["8642"], "model.layers.3.self_attn.q_proj"),
        (["[4,4,2,4]"], "model.layers.2.self_attn.q_proj"),
        (["8642", "--placement", "mixlora"], "model.layers.3.mlp"),
    ],
)
def test_top_k_above_a_presets_experts_exits_2(tmp_path, base, preset, module):
    refused(
        tmp_path,
        *("allocate", "--base-model", base, "--top-k", 3, "--preset", *preset),
        words=[
            f"top_k (--top-k) is 3, but {module} has only 2 expert(s)",
            "lower --top-k to 2",
            "raise --experts / the preset's counts",
        ],
    )


def test_top_k_above_a_reference_modules_experts_exits_2(tmp_path, base):
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ATTENTION]
    modules += [f"model.layers.{i}.mlp.{p}" for i in range(4) for p in MLP]
    experts = {m: 2 if m == "model.layers.1.mlp.up_proj" else 4 for m in modules}
    ranks = {f"{m}.expertlora_E_vector_{j}": 8 for m, n in experts.items() for j in range(n)}
    (tmp_path / "expert.json").write_text(json.dumps(experts))
    (tmp_path / "rank.json").write_text(json.dumps(ranks))
    reference = ["--reference-expert", tmp_path / "expert.json"]
    reference += ["--reference-rank", tmp_path / "rank.json"]
    refused(
        tmp_path,
        *("allocate", "--base-model", base, *reference, "--top-k", 3),
        words=[
            f"{tmp_path / 'expert.json'}: top_k (--top-k) is 3, but "
            "model.layers.1.mlp.up_proj has only 2 expert(s)",
            "lower --top-k to 2",
        ],
    )
    # the same files with a top_k every module can give are imported
    r = guilomo(
        "stage",
        "allocate",
        "--base-model",
        base,
        *reference,
        "--top-k",
        2,
        "--out",
        tmp_path / "ok",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    alloc = json.loads((tmp_path / "ok" / "allocation.json").read_text())
    assert {m: (a["experts"], a["top_k"]) for m, a in alloc["modules"].items()} == {
        m: (n, 2) for m, n in experts.items()
    }


# ----------------------------------------------------- 4. ScienceQA with only image questions


@pytest.mark.parametrize("where", ["folder", "problems.json", "renamed copy", "copy elsewhere"])
def test_scienceqa_with_only_image_questions_exits_2(tmp_path, where):
    folder = tmp_path / "sqa"
    shutil.copytree(FIXTURE, folder)
    problems = json.loads((FIXTURE / "problems.json").read_text())
    for p in problems.values():
        p["image"] = "image.png"
    (folder / "problems.json").write_text(json.dumps(problems))
    path = {
        "folder": folder,
        "problems.json": folder / "problems.json",
        "renamed copy": folder / "scienceqa_problems.json",
        "copy elsewhere": tmp_path / "elsewhere" / "problems-copy.json",  # no pid_splits.json
    }[where]
    if path.suffix == ".json" and not path.exists():
        path.parent.mkdir(exist_ok=True)
        shutil.copy(folder / "problems.json", path)
    named = folder / "problems.json" if where == "folder" else path
    refused(
        tmp_path,
        *("preprocess", "--source", "scienceqa", "--path", path),
        words=[
            f"{named}: no text-only question left: all {len(problems)} questions have an image",
            "point the path at a full copy of ScienceQA",
        ],
    )


# -------------------------------------------------- 5. ScienceQA ids and questions in 2 splits


def test_scienceqa_keeps_its_ids_and_drops_train_copies_of_held_out_questions(tmp_path):
    folder = tmp_path / "sqa"
    shutil.copytree(FIXTURE, folder)
    problems = json.loads((FIXTURE / "problems.json").read_text())
    splits = json.loads((FIXTURE / "pid_splits.json").read_text())
    problems["13"] = dict(problems["10"])  # test question 10, again under another id in train
    problems["14"] = dict(problems["8"])  # validation question 8, again in train
    splits["train"] += ["13", "14"]
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps(splits))

    out = tmp_path / "data"
    r = guilomo("stage", "preprocess", "--source", "scienceqa", "--path", folder, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 questions are in more than one split" in r.stderr
    assert "duplicate of a test question: 1, duplicate of a validation question: 1" in r.stderr

    records = {
        s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()]
        for s in ("train", "validation", "test")
    }
    text_only = {pid for pid, p in problems.items() if not p["image"]}
    pid_split = {
        pid: s
        for s, key in (("train", "train"), ("validation", "val"), ("test", "test"))
        for pid in splits[key]
    }
    expected = {
        s: {f"scienceqa-{pid}" for pid in text_only - {"13", "14"} if pid_split[pid] == s}
        for s in records
    }
    assert {s: {r["id"] for r in rs} for s, rs in records.items()} == expected
    train = {r["instruction"] for r in records["train"]}
    assert not train & {r["instruction"] for r in records["test"] + records["validation"]}

    (source,) = json.loads((out / "report.json").read_text())["sources"]
    assert source["dropped"] == {
        "has image": 4,
        "duplicate of a test question": 1,
        "duplicate of a validation question": 1,
    }
    assert source["notes"] == {"questions in several splits": 2}
