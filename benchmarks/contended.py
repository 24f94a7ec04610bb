"""A training step alone and beside CPU-bound neighbours: does the CPU share explain the slowdown?

    .venv/bin/python benchmarks/contended.py                  # 2 neighbours, threads sized
    .venv/bin/python benchmarks/contended.py --threads 8      # oversubscribed, for contrast

One LoRA-MoE SFT step (a small random LLaMA, 8 experts x top-2 x r8 on every projection,
forward + backward + AdamW) is timed alone, then while `--neighbours` processes spin on the
CPU. The CPU share the step got is the process's CPU time per second of wall time under
contention over the same figure alone (`resource.getrusage`). Threads come from
`guilomo.threads.thread_count` (affinity, cgroup quota, OMP_NUM_THREADS) unless `--threads`
is given; libgomp's spin count is guilomo's (`prepare_openmp`) unless `--openmp-default`. Target: slowdown <= 1.5 / share, i.e. the step loses no more than its lost CPU
explains (OpenMP threads spinning on cores they do not get break it). The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time

from guilomo.threads import prepare_openmp, thread_count


def spin() -> None:
    while True:
        pass


def make_step(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from guilomo.moe import MoeConfig, build_allocation, inject_adapter

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    model = LlamaForCausalLM(config)
    alloc = build_allocation(
        base_model="bench",
        module_names=[n for n, _ in model.named_modules()],
        preset="uniform",
        experts=8,
        top_k=2,
        rank=8,
    )
    adapter = inject_adapter(model, MoeConfig(allocation=alloc, lora_dropout=0.0))
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    ids = torch.randint(0, 2048, (args.batch, args.seq))
    model.train()

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        (out.loss + adapter.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, rounds: int) -> tuple[float, float]:
    """(median seconds per step, CPU seconds per wall second over the rounds)."""
    times = []
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return statistics.median(times), cpu / wall


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--neighbours", type=int, default=2, help="CPU-bound processes beside it")
    p.add_argument("--threads", type=int, help="torch threads (default: guilomo's sizing)")
    p.add_argument("--openmp-default", action="store_true", help="keep libgomp's own spin count")
    args = p.parse_args()
    if not args.openmp_default:
        prepare_openmp()  # as guilomo's CLI and tasks do, before torch loads libgomp
    import torch

    threads, source = thread_count(args.threads)
    torch.set_num_threads(threads)
    step = make_step(args)
    step()  # warm-up
    alone, rate_alone = timed(step, args.rounds)
    procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.neighbours)]
    for proc in procs:
        proc.start()
    try:
        time.sleep(0.5)
        contended, rate = timed(step, args.rounds)
    finally:
        for proc in procs:
            proc.terminate()
    share = min(1.0, rate / rate_alone)
    slowdown = contended / alone
    print(
        f"alone {alone:.3f} s  beside {args.neighbours} {contended:.3f} s  slowdown "
        f"{slowdown:.2f}x  CPU share {share:.2f}  slowdown x share {slowdown * share:.2f}",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "threads": threads,
                "threads_source": source,
                "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
                "neighbours": args.neighbours,
                "step_alone_s": round(alone, 4),
                "step_contended_s": round(contended, 4),
                "cpu_rate_alone": round(rate_alone, 3),
                "cpu_rate_contended": round(rate, 3),
                "cpu_share": round(share, 3),
                "slowdown": round(slowdown, 3),
                "slowdown_times_share": round(slowdown * share, 3),
                "target": {"slowdown_times_share_max": 1.5},
                "met": slowdown * share <= 1.5,
            }
        )
    )


if __name__ == "__main__":
    main()
