"""Evaluate stage: answer extraction, option parsing, generation and log-likelihood plumbing
checked against plain unbatched computations, the EvalReport artifact, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from guilomo.artifacts import ArtifactError, read_artifact
from guilomo.data.prepared import write_prepared
from guilomo.data.prompts import load_template
from guilomo.stages import evaluate as ev
from guilomo.stages.evaluate import (
    EvalConfig,
    evaluate,
    extract_answer,
    parse_options,
    run_evaluate,
)
from guilomo.stages.sft import SftConfig, run_sft
from sft_helpers import allocation, model_and_tokenizer, prepared, records

TEMPLATE = load_template("alpaca")


def mc_records(n=8):
    """records() with ids, subjects and a longer context on some (prompts of unequal length)."""
    out = []
    for i, r in enumerate(records(n, seed=3)):
        r = dict(r, id=f"q{i}", subject=["physics", "biology"][i % 2], source="test")
        if i % 3 == 0:
            r["instruction"] = r["instruction"].replace(
                "Context: N/A", "Context: " + "Cats and fish are animals. " * (1 + i % 4)
            )
        out.append(r)
    return out


# --------------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("Answer: The answer is A.", "A"),
        ("The answer is B", "B"),
        ("Answer: The answer is C.\n\nBecause cats are mammals.", "C"),
        ("\n  Answer: The answer is D.  \n### Response:", "D"),
        ("The answer is A. The answer is B.", None),  # several answers
        ("The answer is A. Again: The answer is A.", None),  # several, even if identical
        ("the answer is A", None),  # case-sensitive
        ("THE ANSWER IS A", None),
        ("The answer is (A)", None),  # the letter must follow "is " directly
        ("The answer is a", None),  # lowercase letter
        ("The answer is  A", None),  # two spaces
        ("The answer is\nA", None),
        ("The answer is AB", "A"),  # no word boundary in the rule: the first letter counts
        ("The answer is Apple.", "A"),  # likewise
        ("The answer is: A", None),
        ("Answer: A", None),
        ("", None),
        ("The answer isA", None),
        ("xxThe answer is Zyy", "Z"),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


# ----------------------------------------------------------------------- parse_options


@pytest.mark.parametrize(
    ("instruction", "want"),
    [
        (
            "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) fish\n",
            [("A", "cat"), ("B", "fish")],
        ),
        (  # parentheses inside option texts, and letters out of sequence, are kept
            "Question: q\nOptions: (A) H (2) gas (B) water (see (D)) (C) (a) or (b)\n",
            [("A", "H (2) gas"), ("B", "water (see (D))"), ("C", "(a) or (b)")],
        ),
        (  # "(C)" inside option A is not a cut: C must come after B
            "Options: (A) like (C) here (B) two\n",
            [("A", "like (C) here"), ("B", "two")],
        ),
        (  # no space before the marker: part of the text
            "Options: (A) x(B) y (B) z\n",
            [("A", "x(B) y"), ("B", "z")],
        ),
        (  # an empty option and a trailing line
            "Options: (A)  (B) y (C) z\nAnswer with the letter.",
            [("A", ""), ("B", "y"), ("C", "z")],
        ),
        (  # the options line at the very start, no trailing newline, many options
            "Options: (A) a (B) b (C) c (D) d (E) e",
            [(c, c.lower()) for c in "ABCDE"],
        ),
        (  # an "Options:" mention in the question is not the options line
            "Question: Options: are there any?\nOptions: (A) yes (B) no\n",
            [("A", "yes"), ("B", "no")],
        ),
        (  # an empty last option
            "Options: (A) x (B) \n",
            [("A", "x"), ("B", "")],
        ),
    ],
)
def test_parse_options(instruction, want):
    assert parse_options(instruction) == want


@pytest.mark.parametrize(
    "instruction",
    [
        "Question: q\n",
        "Question: q\nOptions: A) x B) y\n",
        "Question: q\nOptions: (B) x (C) y\n",
        "Question: q\n Options: (A) x (B) y\n",  # not at the start of a line
        "Question: q\nOptions: (A) only one\n",
    ],
)
def test_parse_options_refuses(instruction):
    with pytest.raises(ValueError, match="no 'Options|at least 2"):
        parse_options(instruction)


def test_config():
    for name, field in EvalConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError, match="Extra inputs"):
        EvalConfig(modus="generate")
    with pytest.raises(ValueError):
        EvalConfig(mode="beam")
    assert EvalConfig().mode == "generate" and EvalConfig().split == "test"


# ------------------------------------------------------------------------------ generate


def unbatched_response(model, tok, record, max_new_tokens):
    """model.generate on one prompt, no padding: the reference for the batched run."""
    prompt = TEMPLATE.prompt(record["instruction"], record.get("input", ""))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return text.split("### Response:")[0].strip()


def test_generate_batched_equals_unbatched():
    model, tok = model_and_tokenizer()
    recs = mc_records(7)
    cfg = EvalConfig(mode="generate", batch_size=3, max_new_tokens=6)
    rep = evaluate(model, tok, recs, cfg)
    assert tok.padding_side == "right"  # the tokenizer was not changed
    assert [p["id"] for p in rep["predictions"]] == [r["id"] for r in recs]
    responses = [p["response"] for p in rep["predictions"]]
    assert len(set(responses)) > 1  # the prompts do lead to different outputs
    for r, p in zip(recs, rep["predictions"], strict=True):
        assert p["response"] == unbatched_response(model, tok, r, 6), r["id"]
        assert p["prediction"] == extract_answer(p["response"])
        assert p["correct"] == (p["prediction"] == r["answer"])
    correct = [p["correct"] for p in rep["predictions"]]
    assert rep["correct"] == sum(correct) and rep["total"] == 7
    assert rep["accuracy"] == pytest.approx(sum(correct) / 7)
    assert rep["failures"] == sum(p["prediction"] is None for p in rep["predictions"])
    with torch.no_grad():
        one = evaluate(model, tok, recs, cfg.model_copy(update={"batch_size": 1}))
    assert [p["response"] for p in one["predictions"]] == responses


class ScriptedGenerate:
    """Stands in for model.generate: appends a scripted response (then EOS and padding)."""

    def __init__(self, model, tok, scripts):
        self.model, self.tok, self.scripts = model, tok, scripts

    def __call__(self, input_ids, attention_mask, generation_config):
        assert generation_config.do_sample is False
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends last
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = self.tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
            key = next(k for k in self.scripts if k in prompt)
            new = self.tok(self.scripts[key], add_special_tokens=False)["input_ids"]
            rows.append(ids + new + [self.tok.eos_token_id])
        width = max(map(len, rows))
        rows = [r + [self.tok.pad_token_id] * (width - len(r)) for r in rows]
        return torch.tensor(rows)


def test_generate_scoring_with_scripted_outputs(monkeypatch):
    model, tok = model_and_tokenizer()
    recs = mc_records(4)
    answers = [r["answer"] for r in recs]
    other = {"A": "B", "B": "A"}
    scripts = {
        "(0)": f"Answer: The answer is {answers[0]}.",  # right
        "(1)": f"Answer: The answer is {other[answers[1]]}.",  # wrong
        "(2)": "Answer: The answer is A. The answer is B.",  # failure
        "(3)": f"Answer: The answer is {answers[3]}.\n### Response: The answer is C.",  # right
    }
    monkeypatch.setattr(model, "generate", ScriptedGenerate(model, tok, scripts))
    rep = evaluate(model, tok, recs, EvalConfig(batch_size=3))
    preds = rep["predictions"]
    assert [p["correct"] for p in preds] == [True, False, False, True]
    assert preds[2]["prediction"] is None and rep["failures"] == 1
    assert preds[3]["response"] == f"Answer: The answer is {answers[3]}."
    assert rep["correct"] == 2 and rep["accuracy"] == 0.5
    assert rep["per_subject"] == {
        "biology": {"accuracy": 0.5, "correct": 1, "total": 2},  # q1 wrong, q3 right
        "physics": {"accuracy": 0.5, "correct": 1, "total": 2},  # q0 right, q2 failed
    }
    # limit takes the first records; no subjects -> no per_subject
    bare = [{k: v for k, v in r.items() if k != "subject"} for r in recs]
    rep = evaluate(model, tok, bare, EvalConfig(limit=2))
    assert rep["total"] == 2 and "per_subject" not in rep


# -------------------------------------------------------------------------------- loglik


def plain_scores(model, tok, record):
    """Per option: sum of log p(continuation token) from one full-sequence forward each."""
    prompt = TEMPLATE.prompt(record["instruction"], record.get("input", ""))
    n_prompt = len(tok(prompt)["input_ids"])
    out = {}
    for letter, text in parse_options(record["instruction"]):
        ids = tok(prompt + "Answer: " + text)["input_ids"]
        assert ids[:n_prompt] == tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        total = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        out[letter] = (total, len(ids) - n_prompt)
    return out


def test_loglik_matches_plain_loop_and_batching():
    model, tok = model_and_tokenizer()
    recs = mc_records(6)
    recs[1]["instruction"] = recs[1]["instruction"].rstrip("\n") + " (C) bird\n"
    assert len(parse_options(recs[1]["instruction"])) == 3  # unequal option counts in a batch
    cfg = EvalConfig(mode="loglik", batch_size=5)
    rep = evaluate(model, tok, recs, cfg)
    one = evaluate(model, tok, recs, cfg.model_copy(update={"batch_size": 1}))
    norm_ok = []
    for r, p, q in zip(recs, rep["predictions"], one["predictions"], strict=True):
        want = plain_scores(model, tok, r)
        assert set(p["scores"]) == set(want)
        for letter, (total, _) in want.items():
            assert p["scores"][letter] == pytest.approx(total, abs=1e-4), (r["id"], letter)
            assert q["scores"][letter] == pytest.approx(total, abs=1e-4), (r["id"], letter)
        best = max(want, key=lambda k: want[k][0])
        best_norm = max(want, key=lambda k: want[k][0] / want[k][1])
        assert p["prediction"] == best and p["correct"] == (best == r["answer"])
        assert p["prediction_norm"] == best_norm
        norm_ok.append(best_norm == r["answer"])
        assert "response" not in p
    assert rep["accuracy"] == pytest.approx(
        sum(p["correct"] for p in rep["predictions"]) / len(recs)
    )
    assert rep["acc_norm"] == pytest.approx(sum(norm_ok) / len(recs))
    assert rep["failures"] == 0


def test_loglik_without_logits_to_keep(monkeypatch):
    """Models whose forward lacks logits_to_keep get full logits: the same scores."""
    model, tok = model_and_tokenizer()
    recs = mc_records(4)
    cfg = EvalConfig(mode="loglik", batch_size=4)
    fast = evaluate(model, tok, recs, cfg)
    monkeypatch.setattr(ev, "_accepts_logits_to_keep", lambda m: False)
    full = evaluate(model, tok, recs, cfg)
    for a, b in zip(fast["predictions"], full["predictions"], strict=True):
        for k in a["scores"]:
            assert a["scores"][k] == pytest.approx(b["scores"][k], abs=1e-4)


def test_loglik_bad_records():
    model, tok = model_and_tokenizer()
    recs = mc_records(3)
    recs[2]["instruction"] = "Question: What is 2 + 2?\n"
    with pytest.raises(ValueError, match="record q2: no 'Options"):
        evaluate(model, tok, recs, EvalConfig(mode="loglik"))
    recs = mc_records(3)
    recs[1]["answer"] = "D"
    with pytest.raises(ValueError, match=r"record q1: answer 'D' is not one of its options"):
        evaluate(model, tok, recs, EvalConfig(mode="loglik"))
    recs[1]["answer"] = ""
    with pytest.raises(ValueError, match="record q1: no 'answer'"):
        evaluate(model, tok, recs, EvalConfig())
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, [], EvalConfig())


# ----------------------------------------------------------------------------- the stage


def test_run_evaluate_base_and_adapter(tmp_path):
    data = prepared(tmp_path / "data")
    model, tok = model_and_tokenizer()
    sft_cfg = SftConfig(
        base_model="tiny", max_steps=2, batch_size=4, micro_batch_size=4, lr=1e-2, cutoff=64
    )
    run_sft(
        sft_cfg,
        dataset=data,
        allocation=allocation(model),
        out=tmp_path / "adapter",
        model=model,
        tokenizer=tok,
        progress=False,
    )
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and any(v.abs().sum() > 0 for v in b)  # trained: B is no longer zero

    cfg = EvalConfig(mode="loglik", base_model="tiny", batch_size=8)
    reports = {}
    for name, adapter in (("base", None), ("tuned", tmp_path / "adapter")):
        model, tok = model_and_tokenizer()  # the same base weights each time
        rep = run_evaluate(
            cfg,
            dataset=data,
            out=tmp_path / name,
            adapter=adapter,
            model=model,
            tokenizer=tok,
            parents=[str(data)],
            progress=False,
        )
        m = read_artifact(tmp_path / name, kind="EvalReport")
        assert set(m.files) == {"report.json"} and m.stage == "evaluate"
        assert m.parents == [str(data)]
        assert m.metadata == {
            "accuracy": rep["accuracy"],
            "total": 4,
            "failures": 0,
            "adapter": adapter is not None,
            "acc_norm": rep["acc_norm"],
        }
        assert json.loads((tmp_path / name / "report.json").read_text()) == rep
        reports[name] = rep
    base, tuned = (reports[k]["predictions"] for k in ("base", "tuned"))
    assert [p["id"] for p in base] == [p["id"] for p in tuned]
    assert any(
        abs(p["scores"][k] - q["scores"][k]) > 1e-3
        for p, q in zip(base, tuned, strict=True)
        for k in p["scores"]
    )

    # generate mode on the base model writes a report too (the baseline row)
    model, tok = model_and_tokenizer()
    rep = run_evaluate(
        EvalConfig(max_new_tokens=4, limit=2),
        dataset=data,
        out=tmp_path / "gen",
        model=model,
        tokenizer=tok,
        progress=False,
    )
    assert rep["total"] == 2 and len(rep["predictions"]) == 2
    assert read_artifact(tmp_path / "gen", kind="EvalReport").metadata["adapter"] is False


def test_run_evaluate_bad_inputs(tmp_path):
    data = prepared(tmp_path / "data")
    model, tok = model_and_tokenizer()
    kw = dict(dataset=data, model=model, tokenizer=tok, progress=False)
    with pytest.raises(ArtifactError, match="holds a PreparedDataset artifact, expected Adapter"):
        run_evaluate(EvalConfig(), out=tmp_path / "x", adapter=data, **kw)
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "adapter_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_evaluate(EvalConfig(), out=tmp_path / "x", adapter=loose, **kw)
    assert not (tmp_path / "x").exists()

    empty = write_prepared(
        tmp_path / "empty", {"train": records(4), "test": []}, report={"rows_read": 4}
    )
    with pytest.raises(ArtifactError, match="the test split is empty"):
        run_evaluate(EvalConfig(), out=tmp_path / "x", **{**kw, "dataset": empty})
    assert not (tmp_path / "x").exists()
