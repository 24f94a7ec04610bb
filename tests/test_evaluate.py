"""Evaluate stage: answer extraction, generation and log-likelihood scoring checked against
plain unbatched computations, the report's statistics against hand counts and scipy, the
EvalReport artifact, and bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import binomtest

import guilomo.scoring as scoring
from guilomo.artifacts import ArtifactError, read_artifact
from guilomo.artifacts.prepared import write_prepared
from guilomo.data.formulations import formulate, mc_parts
from guilomo.stages.evaluate import (
    EvalConfig,
    evaluate,
    extract_answer,
    lenient_answer,
    run_evaluate,
)
from guilomo.stages.sft import SftConfig, run_sft
from sft_helpers import ALPACA, allocation, info, model_and_tokenizer, prepared, records


def mc_records(n=8, formulation="generate"):
    """Questions with ids, subjects, 2-3 options and a context of unequal length on some."""
    out = []
    for i in range(n):
        options = ["cat", "fish", "bird"][: 2 + (i % 4 == 1)]
        gold = (i * 7) % len(options)
        context = "Cats and fish are animals. " * (1 + i % 4) if i % 3 == 0 else None
        parts = mc_parts(
            question=f"Which is a mammal? ({i})", context=context, options=options, gold=gold
        )
        r = formulate(parts, formulation, ALPACA)
        out.append(dict(r, id=f"q{i}", subject=["physics", "biology"][i % 2], source="test"))
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


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("The answer is (B)", "B"),  # rejected by the strict rule
        ("the answer is: C.", "C"),
        ("Answer: A", "A"),
        ("Answer: The answer is B.", "B"),
        ("(B) heat transfer", "B"),  # the untuned model's style
        ("B) heat", "B"),
        ("D", "D"),
        ("The answer is a mammal", None),  # "a" is a word, not a letter
        ("A man walks in", None),
        ("The answer is (B). The answer is C", None),  # two different letters
        ("", None),
    ],
)
def test_lenient_answer(text, want):
    assert lenient_answer(text) == want


def test_config():
    for name, field in EvalConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError, match="Extra inputs"):
        EvalConfig(mode="generate")  # the formulation is the dataset's, not an option
    assert EvalConfig().split == "test"


def test_report_statistics_are_the_hand_counts():
    """Accuracy, its Wilson interval (scipy), the answer distribution and the majority
    baseline, counted by hand from the scripted predictions."""
    model, tok = model_and_tokenizer()
    recs = mc_records(8)
    gold = [r["answer"] for r in recs]
    said = ["A"] * 8  # always A
    scripts = {f"({i})": f"Answer: The answer is {said[i]}." for i in range(8)}
    model.generate = ScriptedGenerate(model, tok, scripts)
    rep = evaluate(model, tok, recs, EvalConfig(batch_size=3), formulation="generate")
    k = sum(g == "A" for g in gold)
    ci = binomtest(k, 8).proportion_ci(confidence_level=0.95, method="wilson")
    assert (rep["correct"], rep["total"]) == (k, 8)
    assert rep["ci95"] == pytest.approx([ci.low, ci.high])
    assert rep["predicted"] == {"A": 8, **{g: 0 for g in set(gold) - {"A"}}}
    assert rep["gold"] == {g: gold.count(g) for g in sorted(set(gold))}
    top = max(sorted(set(gold)), key=gold.count)
    assert rep["majority_baseline"]["answer"] == top
    assert rep["majority_baseline"]["accuracy"] == gold.count(top) / 8
    assert rep["formulation"] == "generate" and rep["split"] == "test"
    assert rep["per_subject"]["physics"]["total"] == 4


# ------------------------------------------------------------------------------ generate


def unbatched_response(model, tok, record, max_new_tokens):
    """model.generate on one prompt, no padding: the reference for the batched run."""
    ids = tok(record["prompt"], return_tensors="pt")["input_ids"]
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
    assert recs[0]["prompt"] == ALPACA.prompt(recs[0]["instruction"])
    cfg = EvalConfig(batch_size=3, max_new_tokens=6)
    kw = dict(formulation="generate", response_split="### Response:")
    rep = evaluate(model, tok, recs, cfg, **kw)
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
        one = evaluate(model, tok, recs, cfg.model_copy(update={"batch_size": 1}), **kw)
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
    recs = mc_records(5)
    answers = [r["answer"] for r in recs]
    other = {"A": "B", "B": "A", "C": "A"}
    scripts = {
        "(0)": f"Answer: The answer is {answers[0]}.",  # right
        "(1)": f"Answer: The answer is {other[answers[1]]}.",  # wrong
        "(2)": "Answer: The answer is A. The answer is B.",  # failure, not readable either
        "(3)": f"Answer: The answer is {answers[3]}.\n### Response: The answer is C.",  # right
        "(4)": f"The answer is ({answers[4]})",  # failure, but a lenient reader says right
    }
    monkeypatch.setattr(model, "generate", ScriptedGenerate(model, tok, scripts))
    kw = dict(formulation="generate", response_split="### Response:")
    rep = evaluate(model, tok, recs, EvalConfig(batch_size=3), **kw)
    preds = rep["predictions"]
    assert [p["correct"] for p in preds] == [True, False, False, True, False]
    assert preds[2]["prediction"] is None and rep["failures"] == 2
    assert preds[3]["response"] == f"Answer: The answer is {answers[3]}."
    assert rep["correct"] == 2 and rep["accuracy"] == 0.4  # the strict rule decides
    assert rep["lenient"]["rejected_but_readable"] == 1
    assert rep["lenient"]["of_which_correct"] == 1
    assert rep["predicted"]["none"] == 2
    assert {k: (v["correct"], v["total"]) for k, v in rep["per_subject"].items()} == {
        "biology": (1, 2),  # q1 wrong, q3 right
        "physics": (1, 3),  # q0 right, q2 failed, q4 rejected
    }
    # limit takes the first records; no subjects -> no per_subject
    bare = [{k: v for k, v in r.items() if k != "subject"} for r in recs]
    rep = evaluate(model, tok, bare, EvalConfig(limit=2), **kw)
    assert rep["total"] == 2 and "per_subject" not in rep


# -------------------------------------------------------------------------------- loglik


def plain_scores(model, tok, record):
    """Per option: the continuation's summed log-prob from one forward over that pair alone,
    split as the harness splits it (whole text tokenised, the context's token count off)."""
    contexts = record.get("contexts") or [record["prompt"]] * len(record["choices"])
    out = []
    for context, choice in zip(contexts, record["choices"], strict=True):
        ctx = tok(context)["input_ids"]
        cont = tok(context + " " + choice)["input_ids"][len(ctx) :]
        with torch.no_grad():
            logits = model(torch.tensor([ctx + cont])).logits[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        out.append(sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("formulation", ["rc", "mc"])
def test_loglik_matches_plain_loop_and_batching(formulation):
    model, tok = model_and_tokenizer()
    recs = mc_records(7, formulation)
    assert len({len(r["choices"]) for r in recs}) == 2  # unequal option counts in a batch
    cfg = EvalConfig(batch_size=3)
    rep = evaluate(model, tok, recs, cfg, formulation=formulation)
    one = evaluate(
        model, tok, recs, cfg.model_copy(update={"batch_size": 1}), formulation=formulation
    )
    norm_ok = []
    for r, p, q in zip(recs, rep["predictions"], one["predictions"], strict=True):
        want = plain_scores(model, tok, r)
        assert p["scores"] == pytest.approx(want, abs=1e-4), r["id"]
        assert q["scores"] == pytest.approx(want, abs=1e-4), r["id"]
        best = max(range(len(want)), key=lambda j: want[j])
        per_char = [w / len(c) for w, c in zip(want, r["choices"], strict=True)]
        best_norm = max(range(len(want)), key=lambda j: per_char[j])
        assert p["prediction"] == "ABC"[best] and p["correct"] == ("ABC"[best] == r["answer"])
        assert p["prediction_norm"] == "ABC"[best_norm]
        assert p["scores_norm"] == pytest.approx(per_char, abs=1e-4)
        norm_ok.append("ABC"[best_norm] == r["answer"])
        assert "response" not in p
    assert rep["accuracy"] == pytest.approx(
        sum(p["correct"] for p in rep["predictions"]) / len(recs)
    )
    assert rep["acc_norm"] == pytest.approx(sum(norm_ok) / len(recs))
    assert rep["formulation"] == formulation and "failures" not in rep


def test_loglik_per_option_contexts():
    """WinoGrande-style records: one context per option, one continuation."""
    model, tok = model_and_tokenizer()
    parts = mc_parts(
        question="The cat ate the fish because _ was hungry.",
        context=None,
        options=["the cat", "the fish"],
        gold=0,
        cloze={"prompt": ["The cat ate the fish because the cat", "The cat ate the fish "
                          "because the fish"], "choices": ["was hungry.", "was hungry."]},
    )  # fmt: skip
    rec = dict(formulate(parts, "rc", ALPACA), id="w0")
    assert rec["prompt"] == rec["contexts"][0] and rec["output"] == " was hungry."
    rep = evaluate(model, tok, [rec], EvalConfig(), formulation="rc")
    assert rep["predictions"][0]["scores"] == pytest.approx(plain_scores(model, tok, rec), abs=1e-4)


def test_loglik_without_logits_to_keep(monkeypatch):
    """Models whose forward lacks logits_to_keep get full logits: the same scores."""
    model, tok = model_and_tokenizer()
    recs = mc_records(4, "rc")
    cfg = EvalConfig(batch_size=4)
    fast = evaluate(model, tok, recs, cfg, formulation="rc")
    names = scoring._forward_names(model)
    monkeypatch.setattr(scoring, "_forward_names", lambda m: (None, names[1]))
    full = evaluate(model, tok, recs, cfg, formulation="rc")
    for a, b in zip(fast["predictions"], full["predictions"], strict=True):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_loglik_bad_records():
    model, tok = model_and_tokenizer()
    recs = mc_records(3, "rc")
    del recs[2]["choices"]
    with pytest.raises(ValueError, match="record q2: no 'choices'"):
        evaluate(model, tok, recs, EvalConfig(), formulation="rc")
    recs = mc_records(3, "rc")
    recs[1]["answer"] = "D"
    with pytest.raises(ValueError, match=r"record q1: answer 'D' is not one of its options"):
        evaluate(model, tok, recs, EvalConfig(), formulation="rc")
    recs[1]["answer"] = ""
    with pytest.raises(ValueError, match="record q1: no 'answer'"):
        evaluate(model, tok, recs, EvalConfig(), formulation="rc")
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, [], EvalConfig(), formulation="rc")


# ----------------------------------------------------------------------------- the stage


def test_run_evaluate_base_and_adapter(tmp_path):
    data = prepared(tmp_path / "data", formulation="rc")
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

    cfg = EvalConfig(base_model="tiny", batch_size=8)
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
        plots = {"plots/expert_load.png"} if adapter is not None else set()  # the adapter's load
        assert set(m.files) == {"report.json"} | plots and m.stage == "evaluate"
        assert m.parents == [str(data)]
        assert m.metadata == {
            "formulation": "rc",
            "accuracy": rep["accuracy"],
            "ci95": rep["ci95"],
            "total": 4,
            "majority_baseline": rep["majority_baseline"]["accuracy"],
            "adapter": adapter is not None,
            "acc_norm": rep["acc_norm"],
        }
        assert json.loads((tmp_path / name / "report.json").read_text()) == rep
        reports[name] = rep
    base, tuned = (reports[k]["predictions"] for k in ("base", "tuned"))
    assert [p["id"] for p in base] == [p["id"] for p in tuned]
    assert any(
        abs(x - y) > 1e-3 for p, q in zip(base, tuned, strict=True)
        for x, y in zip(p["scores"], q["scores"], strict=True)
    )  # fmt: skip
    assert "expert_load" in reports["tuned"] and "expert_load" not in reports["base"]

    # a generate dataset is evaluated by generation: the baseline row of the ScienceQA runs
    gen = prepared(tmp_path / "gen-data", formulation="generate")
    model, tok = model_and_tokenizer()
    rep = run_evaluate(
        EvalConfig(max_new_tokens=4, limit=2),
        dataset=gen,
        out=tmp_path / "gen",
        model=model,
        tokenizer=tok,
        progress=False,
    )
    assert (
        rep["total"] == 2 and len(rep["predictions"]) == 2 and "response" in rep["predictions"][0]
    )
    assert read_artifact(tmp_path / "gen", kind="EvalReport").metadata["formulation"] == "generate"


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
        tmp_path / "empty", {"train": records(4), "test": []}, report={}, info=info()
    )
    with pytest.raises(ArtifactError, match="the test split is empty"):
        run_evaluate(EvalConfig(), out=tmp_path / "x", **{**kw, "dataset": empty})
    old = write_prepared(tmp_path / "old", {"test": records(4)}, report={}, info={})
    with pytest.raises(ArtifactError, match="before formulations.*rerun preprocess"):
        run_evaluate(EvalConfig(), out=tmp_path / "x", **{**kw, "dataset": old})
    assert not (tmp_path / "x").exists()
