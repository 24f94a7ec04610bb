"""Prompt templates (data, not code) and tokenisation for SFT and the search.

A template is a JSON file with `prompt_input`, `prompt_no_input` (Python format strings over
`{instruction}` and `{input}`) and `response_split`. `alpaca` ships with guilomo; any other
JSON file of that shape can be named by path. Preprocess applies it (the generate
formulation), so every PreparedDataset record holds its finished `prompt`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..textfiles import read_text

IGNORE = -100


@dataclass(frozen=True)
class Template:
    name: str
    prompt_input: str
    prompt_no_input: str
    response_split: str

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response(self, generated: str) -> str:
        """The text after the response marker (the whole text if the marker is absent)."""
        return generated.split(self.response_split, 1)[-1].strip()


def load_template(name_or_path: str) -> Template:
    """A shipped template by name (`alpaca`) or a JSON file by path."""
    path, shipped = Path(name_or_path), resources.files("guilomo.data") / "templates"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ValueError(f"{path}: template file not found")
        source, text = str(path), read_text(path)
    elif (shipped / f"{name_or_path}.json").is_file():
        source, text = name_or_path, (shipped / f"{name_or_path}.json").read_text()
    else:
        names = sorted(p.name.removesuffix(".json") for p in shipped.iterdir())
        raise ValueError(
            f"unknown template {name_or_path!r}: use one of {names} or a JSON file path"
        )
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    keys = ("prompt_input", "prompt_no_input", "response_split")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ValueError(f"{source}: template lacks {missing}")
    return Template(path.stem if path.suffix else name_or_path, *(doc[k] for k in keys))


def tokenize_example(
    record: Mapping[str, str],
    tokenizer,  # noqa: ANN001 (a transformers tokenizer)
    *,
    cutoff: int = 256,
    train_on_inputs: bool = True,
    add_eos: bool = True,
) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels of the record's prompt + output, truncated to
    `cutoff`; EOS is appended when the text fits. With train_on_inputs off, the prompt's
    tokens get label -100 so only the response is learned."""
    prompt = record["prompt"]
    kw = {"truncation": True, "max_length": cutoff, "add_special_tokens": True}
    ids = tokenizer(prompt + record["output"], **kw)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < cutoff and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(tokenizer(prompt, **kw)["input_ids"])
        labels[:n_prompt] = [IGNORE] * min(n_prompt, len(labels))
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, group: int = 50
) -> list[list[int]]:
    """Seeded batches of indices of similar length (less padding): the indices shuffled, cut
    into mega-batches of `group * batch_size`, sorted by length inside each, cut into
    batches, the batch order shuffled again. (Hand-written: transformers'
    LengthGroupedSampler samples one process's indices as it goes; SFT and the search need
    the whole seeded batch list up front, the same on every rank, so a resumed run replays it.)"""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * group
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pad id, attention 0, label -100. (Hand-written:
    DataCollatorForSeq2Seq pads the same way through `tokenizer.pad`, which needs the
    tokenizer at every batch and warns on fast tokenizers; this needs only the pad id.)"""
    width = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        out["input_ids"].append(list(e["input_ids"]) + [pad_id] * pad)
        out["attention_mask"].append(list(e["attention_mask"]) + [0] * pad)
        out["labels"].append(list(e["labels"]) + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
