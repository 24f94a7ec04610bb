"""The memory plan (`guilomo plan-memory`) against the measured peak of real SFT steps.

    .venv/bin/python benchmarks/memory_model.py                 # SmolLM2-135M shape, CPU
    .venv/bin/python benchmarks/memory_model.py --layers 4 --micro-batch 2 --cutoff 64

For the SmolLM2-135M shape (random weights, fp32 on CPU; `--layers` to shrink it) with
LoRA-MoE 8 experts x top-2 x r8 on all projections, with and without activation
checkpointing: the plan (built on the meta device) and the peak measured in a fresh child
process over two AdamW steps. On CPU the peak is the child's peak resident memory minus its
resident memory before the model is built, with glibc's mmap threshold fixed at 64 KiB
(`MALLOC_MMAP_THRESHOLD_`), so every tensor's pages go back to the system when it is freed
and the resident set follows the live tensors. On CUDA (`--device cuda`) it is
`torch.cuda.max_memory_allocated`. Target: the plan within 15% of the measured peak. Then
the plan of LLaMA-3-8B (bf16, checkpointing, micro-batch 4 x 256), target under 24 GiB.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from guilomo.memory import SHAPES, meta_model, model_config, plan_memory
from guilomo.moe import MoeConfig, build_allocation, inject_adapter

GIB = 2**30


def adapted(config, device: str, dtype: torch.dtype):
    if device == "meta":
        model = meta_model(config, dtype)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    alloc = build_allocation(
        base_model="bench",
        module_names=[n for n, _ in model.named_modules()],
        preset="uniform",
        experts=8,
        top_k=2,
        rank=8,
    )
    return model, inject_adapter(model, MoeConfig(allocation=alloc, lora_dropout=0.05))


def shape(args):
    config = model_config("smollm2-135m")
    config.num_hidden_layers = args.layers
    return config


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args) -> None:
    """In the child: the peak bytes of two SFT steps, printed as JSON."""
    torch.set_num_threads(2)
    dtype = torch.float32
    config = shape(args)
    adapted(config, "meta", dtype)  # import and warm every code path before the baseline
    before = _resident() if args.device == "cpu" else 0
    model, adapter = adapted(config, args.device, dtype)
    if args.checkpointing:
        adapter.enable_checkpointing()
    model.train()
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.cutoff), device=args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        out = model(input_ids=ids, labels=ids, use_cache=False)
        (out.loss + adapter.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"peak": peak}))


def measured(args, checkpointing: bool) -> int:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--layers",
        str(args.layers),
        "--micro-batch",
        str(args.micro_batch),
        "--cutoff",
        str(args.cutoff),
        "--device",
        args.device,
    ]
    if checkpointing:
        cmd.append("--checkpointing")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return measure(args)
    rows = {}
    for ckpt in (False, True):
        model, adapter = adapted(shape(args), "meta", torch.float32)
        plan = plan_memory(
            model,
            adapter,
            micro_batch=args.micro_batch,
            cutoff=args.cutoff,
            gradient_checkpointing=ckpt,
        )
        peak = measured(args, ckpt)
        name = "checkpointing" if ckpt else "plain"
        rows[name] = {
            "planned_gib": plan.total / GIB,
            "measured_gib": peak / GIB,
            "ratio": plan.total / peak,
        }
        print(
            f"{name:<14} planned {plan.total / GIB:6.3f} GiB  measured {peak / GIB:6.3f} GiB  "
            f"ratio {plan.total / peak:.3f}",
            file=sys.stderr,
        )
    big, big_adapter = adapted(model_config("llama-3-8b"), "meta", torch.bfloat16)
    llama = plan_memory(big, big_adapter, micro_batch=4, cutoff=256, gradient_checkpointing=True)
    print(
        json.dumps(
            {
                "device": args.device,
                "model": {
                    "shape": "smollm2-135m",
                    "layers": args.layers,
                    "dtype": "float32",
                    "micro_batch": args.micro_batch,
                    "cutoff": args.cutoff,
                },
                "adapter": "uniform 8 experts x top-2 x r8, all projections",
                "rows": {k: {m: round(v, 4) for m, v in r.items()} for k, r in rows.items()},
                "llama_3_8b": {
                    "inputs": "bf16, checkpointing, micro-batch 4 x 256",
                    **{k: round(v, 3) for k, v in llama.table().items()},
                },
                "shapes": sorted(SHAPES),
                "targets": {"within": 0.15, "llama_3_8b_max_gib": 24},
                "met": {
                    "within_15pct": all(abs(r["ratio"] - 1) <= 0.15 for r in rows.values()),
                    "llama_3_8b_under_24gib": llama.total / GIB < 24,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
