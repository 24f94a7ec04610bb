"""Shared by the SFT tests and the torchrun script: a tiny model, tokenizer, data, allocation."""

from pathlib import Path

import torch

from conftest import tiny_llama, tiny_tokenizer
from guilomo.artifacts.prepared import write_prepared
from guilomo.data.formulations import formulate, mc_parts
from guilomo.data.prompts import load_template
from guilomo.moe import build_allocation

ALPACA = load_template("alpaca")


def records(n=48, seed=0, formulation="generate"):
    """Two-option questions "Which is a mammal? (i)", the answer cat in a seeded place."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        a = int(torch.randint(0, 2, (1,), generator=g))
        options = ["cat", "fish"] if a == 0 else ["fish", "cat"]
        parts = mc_parts(
            question=f"Which is a mammal? ({i})", context=None, options=options, gold=a
        )
        out.append(formulate(parts, formulation, ALPACA))
    return out


def info(formulation="generate"):
    if formulation == "generate":
        return {"formulation": "generate", "template": "alpaca", "response_split": "### Response:"}
    return {"formulation": formulation}


def prepared(path: Path, formulation="generate") -> Path:
    recs = records(formulation=formulation)
    return write_prepared(
        path,
        {"train": recs[:40], "validation": recs[40:44], "test": recs[44:]},
        report={"rows_read": 48},
        info=info(formulation),
    )


def model_and_tokenizer():
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), initializer_range=0.2, num_hidden_layers=2)
    return model, tok


def allocation(model):
    return build_allocation(
        base_model="tiny",
        module_names=[n for n, _ in model.named_modules()],
        preset="2468",
        top_k=2,
        rank=4,
        placement="all",
    )


def base_and_data(root: Path) -> Path:
    """`root/base` (the tiny model and tokenizer as a model folder) and `root/data`."""
    model, tok = model_and_tokenizer()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    prepared(root / "data")
    return root
