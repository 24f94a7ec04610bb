"""Search step cost: one bilevel GSV step divided by one SFT step, same model and batch.

    .venv/bin/python benchmarks/search_step.py            # or: make bench

A small random LLaMA gets the search-mode LoRA-MoE (N_max experts of rank R_max on every
projection). The SFT step is the same full-size LoRA-MoE without GSVs: forward, backward,
AdamW. The search step is `BilevelSearch.step` (first order: a validation pass for the GSVs
and a train pass for the weights; second order: four passes). The methods run interleaved
round by round and the medians are compared, so machine noise hits all alike. Targets:
first order <= 2.2x, second order <= 4.5x. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from guilomo.moe import MoeConfig, build_allocation, inject_adapter
from guilomo.moe.search import inject_search, module_shapes, size_range
from guilomo.stages.bilevel import BilevelSearch, SizeControl


def base(args, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=args.seq,
    )
    return LlamaForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--estimator", choices=["expected", "reference"], default="expected")
    args = p.parse_args()
    torch.set_num_threads(2)

    g = torch.Generator().manual_seed(0)

    def batch():
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        return {"input_ids": ids, "labels": ids}

    train, val = batch(), batch()
    common = dict(lora_dropout=0.0)

    sft_model = base(args)
    alloc = build_allocation(
        base_model="bench",
        module_names=[n for n, _ in sft_model.named_modules()],
        preset="uniform",
        experts=args.experts,
        top_k=2,
        rank=args.rank,
    )
    sft_adapter = inject_adapter(sft_model, MoeConfig(allocation=alloc, **common))
    sft_opt = torch.optim.AdamW(sft_adapter.parameters(), lr=3e-4)
    sft_model.train()

    def sft_step():
        out = sft_model(**train)
        loss = out.loss + sft_adapter.aux_loss()
        sft_opt.zero_grad(set_to_none=True)
        loss.backward()
        sft_opt.step()

    searches = {}
    for order in ("first", "second"):
        m = base(args)
        a = inject_search(
            m,
            base_model="bench",
            max_experts=args.experts,
            max_rank=args.rank,
            top_k=2,
            estimator=args.estimator,
            **common,
        )
        size = None
        if args.estimator == "expected":  # the stage's default size penalty, as a search has it
            p_max = size_range(
                module_shapes(a), top_k=2, max_experts=args.experts, max_rank=args.rank
            )[1]
            size = SizeControl(p_max=p_max, penalty=0.01)
        searches[order] = BilevelSearch(m, a, total_steps=10_000, order=order, size=size)

    steps = {
        "sft": sft_step,
        **{f"search_{o}": (lambda s=s: s.step(train, val)) for o, s in searches.items()},
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
    for r in range(args.rounds):
        for name, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    first = med["search_first"] / med["sft"]
    second = med["search_second"] / med["sft"]
    print(f"{'step':<14}{'median s':>10}{'x SFT':>8}")
    for k, v in med.items():
        print(f"{k:<14}{v:>10.3f}{v / med['sft']:>8.2f}")
    print(
        json.dumps(
            {
                "device": "cpu",
                "threads": 2,
                "model": {
                    "hidden": args.hidden,
                    "layers": args.layers,
                    "batch": args.batch,
                    "seq": args.seq,
                    "experts": args.experts,
                    "rank": args.rank,
                },
                "sft_step_s": round(med["sft"], 4),
                "first_order_ratio": round(first, 3),
                "second_order_ratio": round(second, 3),
                "targets": {"first_order_max": 2.2, "second_order_max": 4.5},
                "met": {"first_order": first <= 2.2, "second_order": second <= 4.5},
            }
        )
    )


if __name__ == "__main__":
    main()
