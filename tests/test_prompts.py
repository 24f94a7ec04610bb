"""Prompt templates, tokenisation, length grouping and collation."""

import json

import pytest

from conftest import tiny_tokenizer
from guilomo.data.prompts import (
    IGNORE,
    collate,
    length_grouped_batches,
    load_template,
    tokenize_example,
)

RECORD = {
    "instruction": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) fish\n",
    "input": "",
    "output": "Answer: The answer is A.",
}


def test_alpaca_template_is_the_reference_text():
    t = load_template("alpaca")
    assert t.prompt(RECORD["instruction"]) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n"
        + RECORD["instruction"]
        + "\n\n### Response:\n"
    )
    assert "### Input:\nextra\n\n" in t.prompt("do it", "extra")
    assert t.response("...### Response:\n Answer: The answer is B.") == "Answer: The answer is B."


def test_template_from_file_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            {
                "prompt_input": "{instruction}|{input}|",
                "prompt_no_input": "{instruction}|",
                "response_split": "|",
            }
        )
    )
    assert load_template(str(path)).prompt("a", "b") == "a|b|"
    path.write_text(json.dumps({"prompt_input": "x"}))
    with pytest.raises(ValueError, match=r"lacks \['prompt_no_input', 'response_split'\]"):
        load_template(str(path))
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        load_template("vicuna")


def test_tokenize_masks_prompt_and_appends_eos():
    tok = tiny_tokenizer()
    t = load_template("alpaca")
    record = {**RECORD, "prompt": t.prompt(RECORD["instruction"])}  # as preprocess writes it
    full = tokenize_example(record, tok, cutoff=512, train_on_inputs=True)
    masked = tokenize_example(record, tok, cutoff=512, train_on_inputs=False)
    prompt_ids = tok(t.prompt(RECORD["instruction"]))["input_ids"]
    whole = tok(t.prompt(RECORD["instruction"]) + RECORD["output"])["input_ids"]
    assert full["input_ids"] == whole + [tok.eos_token_id]
    assert full["labels"] == full["input_ids"]
    n = len(prompt_ids)
    assert masked["labels"][:n] == [IGNORE] * n and masked["labels"][n:] == full["input_ids"][n:]
    short = tokenize_example(record, tok, cutoff=10)
    assert len(short["input_ids"]) == 10 and short["input_ids"] == whole[:10]  # no EOS when cut


def test_length_grouping_is_a_seeded_partition_with_less_padding():
    lengths = [((i * 37) % 101) + 1 for i in range(400)]
    a = length_grouped_batches(lengths, 8, seed=1, group=10)
    assert a == length_grouped_batches(lengths, 8, seed=1, group=10)
    assert a != length_grouped_batches(lengths, 8, seed=2, group=10)
    assert sorted(i for b in a for i in b) == list(range(400))
    naive = [list(range(i, i + 8)) for i in range(0, 400, 8)]
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert padded(a) < 0.8 * padded(naive)


def test_collate_pads_right():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7]},
            {"input_ids": [8], "attention_mask": [1], "labels": [8]},
        ],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
