"""Whole-model cost of LoRA-MoE against PEFT LoRA and a MoLA loop: training step, saved
activations and greedy decoding, on a SmolLM2-135M-shaped model with random weights.

The model is ``LlamaForCausalLM`` with SmolLM2-135M's shape (vocab 49152, hidden 576, MLP 1536,
30 layers, 9 heads, 3 KV heads, tied embeddings) and random weights: the shapes decide the
cost, not the values. Three instances are built from the same seed (the same base weights)
and adapted on all 7 projections (q, k, v, o, gate, up, down) of every layer:

* ``guilomo`` LoRA-MoE, uniform 8 experts x top-2 x rank 8 (``guilomo.moe.inject_adapter``,
              fused experts; its router aux loss is added to the loss);
* ``peft``    PEFT LoRA r=16, alpha 32 (the same *active* rank as top-2 of rank 8), unmerged;
* ``mola``    the MoLA research code's method: a router per projection, softmax, top-2
              renormalised, then a Python loop over the 8 experts (separate A_e, B_e of rank 8)
              gathering each expert's tokens by index lists and ``index_add_``-ing
              ``B_e(A_e(x_e)) * alpha / r * weight`` back.

What is measured, each phase timed round-robin (the starting method rotates every round):

1. training step (zero grads, forward, loss, backward, AdamW step over the trainable
   parameters), without and then with activation checkpointing (transformers' own,
   non-reentrant; ``adapter.enable_checkpointing()`` for guilomo). The MoLA loop is timed
   without checkpointing only;
2. the bytes autograd saves for the backward in one training forward, counted with
   ``torch.autograd.graph.saved_tensors_hooks``: each saved tensor's storage counted once
   (deduplicated by ``untyped_storage().data_ptr()``), parameters and buffers (frozen or
   trainable) left out, so only activations count. With checkpointing, the inputs the
   checkpoint keeps to recompute each layer are held by it, not saved through autograd's
   hooks, and are not counted (alike for every method);
3. greedy decoding of the base model (a fourth instance, same seed), PEFT LoRA (unmerged) and
   LoRA-MoE: batch 8, prompts of 32 tokens, KV cache,
   ``generate(do_sample=False, max_new_tokens=16, min_new_tokens=16)``.

Each ratio is the median over the rounds of that round's ratio, so slow drift of the machine's
speed cancels; the ms columns are per-method medians. Before timing, every training method must
give a finite loss. Targets on CPU (2 threads, fp32): training step <= 1.05x PEFT LoRA's time
and <= 1.0x its saved bytes (with and without checkpointing); the MoLA loop >= 2x slower than
LoRA-MoE; decoding <= 1.2x the base model's time. The last line printed on stdout is one JSON
object (ratios, targets, met flags, sizes, device, threads, versions); progress goes to stderr.

Run:  ``.venv/bin/python benchmarks/whole_model.py [--quick] [--device cuda] [--rounds N]``
(tiny: ``--layers 2 --hidden 64 --vocab 256``; on CUDA the run uses bf16 and synchronises
around every timed region). A full CPU run (3 rounds, 2 threads) takes an estimated 10-12 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import peft
import torch
import transformers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from guilomo.moe import MoeConfig, build_allocation, inject_adapter
from moe_layer import LOAD_WARN, OtherLoad, log, paired, sync

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERTS, TOP_K, RANK, ALPHA = 8, 2, 8, 16.0  # guilomo and the MoLA loop (scale alpha / r = 2)
PEFT_RANK, PEFT_ALPHA = 16, 32.0  # the same active rank and scale
TRAIN_METHODS = ("guilomo", "peft", "mola")
CKPT_METHODS = ("guilomo", "peft")
DECODE_METHODS = ("base", "peft", "guilomo")

TARGETS = {
    "train_vs_peft_max": 1.05,
    "train_vs_peft_ckpt_max": 1.05,
    "saved_bytes_vs_peft_max": 1.0,
    "saved_bytes_vs_peft_ckpt_max": 1.0,
    "mola_loop_slowdown_min": 2.0,
    "decode_vs_base_max": 1.2,
}


# --------------------------------------------------------------------------------------------
# The MoLA loop: the research code's per-expert gather / index_add_
# --------------------------------------------------------------------------------------------


class MolaLinear(nn.Module):
    """A frozen ``nn.Linear`` plus 8 LoRA experts (separate A_e, B_e) and a top-2 router."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        dt, dev = base.weight.dtype, base.weight.device
        self.router = nn.Linear(base.in_features, EXPERTS, bias=False, device=dev, dtype=dt)
        self.experts_A = nn.ModuleList(
            nn.Linear(base.in_features, RANK, bias=False, device=dev, dtype=dt)
            for _ in range(EXPERTS)
        )
        self.experts_B = nn.ModuleList(
            nn.Linear(RANK, base.out_features, bias=False, device=dev, dtype=dt)
            for _ in range(EXPERTS)
        )
        for b in self.experts_B:
            nn.init.zeros_(b.weight)  # LoRA's B starts at zero
        self.scale = ALPHA / RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat).float().softmax(dim=-1)
        top_w, top_i = probs.topk(TOP_K, dim=-1)  # (N, k)
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros(flat.shape[0], result.shape[-1], dtype=result.dtype, device=x.device)
        for e in range(EXPERTS):
            tok, slot = (top_i == e).nonzero(as_tuple=True)  # host sync per expert
            if tok.numel() == 0:
                continue
            y_e = self.experts_B[e](self.experts_A[e](flat[tok])) * self.scale
            out.index_add_(0, tok, y_e * top_w[tok, slot, None])
        return result + out.view_as(result)


def inject_mola(model: nn.Module) -> list[nn.Parameter]:
    """Freeze `model`, wrap its 7 projections per layer with `MolaLinear`; the new parameters."""
    model.requires_grad_(False)
    targets = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTIONS
    ]
    params: list[nn.Parameter] = []
    for name in targets:
        wrapper = MolaLinear(model.get_submodule(name))
        model.set_submodule(name, wrapper)
        params += [p for n, p in wrapper.named_parameters() if not n.startswith("base.")]
    return params


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass
class Method:
    """One adapted model with what its training step needs."""

    model: nn.Module
    params: list[nn.Parameter]
    aux_loss: Callable[[], torch.Tensor | None]
    enable_checkpointing: Callable[[], None]
    optimizer: torch.optim.Optimizer | None = None


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    heads = args.heads or max(1, args.hidden // 64)
    return LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=args.kv_heads or max(1, heads // 3),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )


def base_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(llama_config(args)).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def hf_checkpointing(model: nn.Module) -> Callable[[], None]:
    def enable() -> None:
        fn = getattr(model, "activation_checkpointing_enable", None)  # transformers 5
        if fn is not None:
            fn({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable({"use_reentrant": False})

    return enable


def build_guilomo(model: nn.Module) -> Method:
    alloc = build_allocation(
        base_model="bench",
        module_names=[n for n, _ in model.named_modules()],
        preset="uniform",
        experts=EXPERTS,
        top_k=TOP_K,
        rank=RANK,
        placement="all",
    )
    adapter = inject_adapter(model, MoeConfig(allocation=alloc, lora_alpha=ALPHA, lora_dropout=0.0))
    return Method(model, list(adapter.parameters()), adapter.aux_loss, adapter.enable_checkpointing)


def build_peft(model: nn.Module) -> Method:
    cfg = peft.LoraConfig(
        r=PEFT_RANK, lora_alpha=PEFT_ALPHA, lora_dropout=0.0, target_modules=list(PROJECTIONS)
    )
    # autocast_adapter_dtype=False: on bf16 the adapters stay bf16, like guilomo's
    pm = peft.get_peft_model(model, cfg, autocast_adapter_dtype=False)
    params = [p for p in pm.parameters() if p.requires_grad]
    return Method(pm, params, lambda: None, hf_checkpointing(pm))


def build_mola(model: nn.Module) -> Method:
    return Method(model, inject_mola(model), lambda: None, hf_checkpointing(model))


def build_methods(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Method]:
    builders = {"guilomo": build_guilomo, "peft": build_peft, "mola": build_mola}
    methods: dict[str, Method] = {}
    reference = None
    for name, build in builders.items():
        model = base_model(args, device, dtype)
        if reference is None:
            reference = {k: v.clone() for k, v in model.state_dict().items()}
        elif any(not torch.equal(reference[k], v) for k, v in model.state_dict().items()):
            raise SystemExit("ABORT: models built from the same seed have different base weights")
        m = build(model)
        m.optimizer = torch.optim.AdamW(m.params, lr=1e-4)
        m.model.train()
        methods[name] = m
        n_train = sum(p.numel() for p in m.params)
        log(f"  {name}: {n_train / 1e6:.2f}M trainable parameters")
    return methods


# --------------------------------------------------------------------------------------------
# Training step, saved bytes, timing
# --------------------------------------------------------------------------------------------


def make_train_step(m: Method, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        m.optimizer.zero_grad(set_to_none=True)
        loss = m.model(**batch, use_cache=False).loss
        aux = m.aux_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        m.optimizer.step()
        return loss.detach()

    return step


def saved_bytes(m: Method, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the activations autograd saves in one training forward (storages counted once;
    parameters and buffers left out). The graph is freed by a backward, without a step."""
    skip = {t.untyped_storage().data_ptr() for t in m.model.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in m.model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen.setdefault(s.data_ptr(), s.nbytes())
        return t

    m.optimizer.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = m.model(**batch, use_cache=False).loss
        aux = m.aux_loss()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    m.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def round_robin(
    steps: dict[str, Callable[[], object]], rounds: int, device: torch.device, label: str
) -> dict[str, list[float]]:
    """Per-method times (s) over `rounds`; the starting method rotates every round."""
    names = list(steps)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
        log(
            f"  {label} round {r + 1}/{rounds}: "
            + "  ".join(f"{n}={samples[n][-1] * 1e3:.0f}ms" for n in names)
        )
    return samples


def medians_ms(samples: dict[str, list[float]]) -> dict[str, float]:
    return {n: round(statistics.median(s) * 1e3, 1) for n, s in samples.items()}


def train_phase(
    methods: dict[str, Method], names: tuple[str, ...], batch: dict, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Finite-loss check + warm-up, saved bytes, then the timed rounds of `names`."""
    steps = {n: make_train_step(methods[n], batch) for n in names}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(1, args.warmup)):
            loss = float(step())
        if not math.isfinite(loss):
            raise SystemExit(f"ABORT: {name}'s training loss is not finite ({loss})")
        log(f"  warm-up {name}: loss {loss:.3f}, {time.perf_counter() - t0:.1f}s")
    nbytes = {n: saved_bytes(m, batch) for n, m in methods.items()}
    log("  saved MiB: " + "  ".join(f"{n}={b / 2**20:.1f}" for n, b in nbytes.items()))
    return round_robin(steps, args.rounds, args.device_t, "train"), nbytes


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def make_decode(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    mask = torch.ones_like(prompts)

    def decode() -> None:
        out = model.generate(
            input_ids=prompts,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return decode


def decode_phase(models: dict[str, nn.Module], args: argparse.Namespace) -> dict[str, list[float]]:
    g = torch.Generator().manual_seed(args.seed + 2)
    prompts = torch.randint(0, args.vocab, (args.decode_batch, args.prompt), generator=g)
    prompts = prompts.to(args.device_t)
    steps = {}
    for name, model in models.items():
        model.eval()
        steps[name] = make_decode(model, prompts, args.new_tokens)
    for step in steps.values():
        for _ in range(max(1, args.warmup)):
            step()
    return round_robin(steps, args.rounds, args.device_t, "decode")


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (fp32) or cuda (bf16)")
    add("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add("--rounds", type=int, default=None, help="timed rounds per phase (default 3; --quick 2)")
    add("--warmup", type=int, default=1, help="warm-up iterations per method and phase")
    add("--quick", action="store_true", help="smoke run: 4 layers, 2 rounds (unless given)")
    add("--layers", type=int, default=None, help="decoder layers (default 30; --quick 4)")
    add("--hidden", type=int, default=576, help="hidden size (default 576)")
    add("--intermediate", type=int, default=None, help="MLP size (default hidden * 8 // 3)")
    add("--heads", type=int, default=None, help="attention heads (default hidden // 64)")
    add("--kv-heads", type=int, default=None, help="KV heads (default heads // 3, at least 1)")
    add("--vocab", type=int, default=49152, help="vocabulary (default 49152)")
    add("--batch", type=int, default=4, help="training batch (default 4)")
    add("--seq", type=int, default=128, help="training sequence length (default 128)")
    add("--decode-batch", type=int, default=8, help="decoding batch (default 8)")
    add("--prompt", type=int, default=32, help="decoding prompt length (default 32)")
    add("--new-tokens", type=int, default=16, help="decoded tokens (default 16)")
    add("--seed", type=int, default=0, help="seed of the base weights and the data")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = 4 if args.quick else 30
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    return args


def sizes(args: argparse.Namespace, methods: dict[str, Method]) -> dict:
    cfg = llama_config(args)
    return {
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "vocab": cfg.vocab_size,
        "batch": args.batch,
        "seq": args.seq,
        "decode_batch": args.decode_batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "trainable": {n: sum(p.numel() for p in m.params) for n, m in methods.items()},
    }


def ratios(plain: dict, ckpt: dict, decode: dict, nbytes: dict, nbytes_ckpt: dict) -> dict:
    return {
        "train_vs_peft": round(paired(plain, "guilomo", "peft"), 3),
        "train_vs_peft_ckpt": round(paired(ckpt, "guilomo", "peft"), 3),
        "saved_bytes_vs_peft": round(nbytes["guilomo"] / nbytes["peft"], 3),
        "saved_bytes_vs_peft_ckpt": round(nbytes_ckpt["guilomo"] / nbytes_ckpt["peft"], 3),
        "mola_loop_slowdown": round(paired(plain, "mola", "guilomo"), 3),
        "decode_vs_base": round(paired(decode, "guilomo", "base"), 3),
        "peft_decode_vs_base": round(paired(decode, "peft", "base"), 3),
        "ckpt_vs_plain_train": round(
            statistics.median(ckpt["guilomo"]) / statistics.median(plain["guilomo"]), 3
        ),
    }


def met_flags(r: dict) -> dict[str, bool]:
    met = {
        "train_vs_peft": r["train_vs_peft"] <= TARGETS["train_vs_peft_max"],
        "train_vs_peft_ckpt": r["train_vs_peft_ckpt"] <= TARGETS["train_vs_peft_ckpt_max"],
        "saved_bytes_vs_peft": r["saved_bytes_vs_peft"] <= TARGETS["saved_bytes_vs_peft_max"],
        "saved_bytes_vs_peft_ckpt": r["saved_bytes_vs_peft_ckpt"]
        <= TARGETS["saved_bytes_vs_peft_ckpt_max"],
        "mola_loop_slowdown": r["mola_loop_slowdown"] >= TARGETS["mola_loop_slowdown_min"],
        "decode_vs_base": r["decode_vs_base"] <= TARGETS["decode_vs_base_max"],
    }
    met["all"] = all(met.values())
    return met


def run_training(
    methods: dict[str, Method], args: argparse.Namespace
) -> tuple[dict, dict, dict, dict]:
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device_t)
    batch = {"input_ids": ids, "labels": ids}
    log("training, no checkpointing")
    plain, nbytes = train_phase(methods, TRAIN_METHODS, batch, args)
    for m in methods.values():
        m.enable_checkpointing()
    log("training, activation checkpointing")
    ckpt, nbytes_ckpt = train_phase(methods, CKPT_METHODS, batch, args)
    return plain, ckpt, nbytes, nbytes_ckpt


def print_table(ms: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]]) -> None:
    cols = ("base", *TRAIN_METHODS)
    print(f"{'phase':<16}" + "".join(f"{n:>12}" for n in cols))
    for phase, row in ms.items():
        print(f"{phase + ' ms':<16}" + "".join(f"{row.get(n, ''):>12}" for n in cols))
    for phase, row in nbytes.items():
        cells = "".join(f"{row[n] / 2**20:>12.1f}" if n in row else f"{'':>12}" for n in cols)
        print(f"{phase + ' MiB':<16}" + cells)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = args.device_t = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(
        f"device={device_name} dtype={str(dtype).removeprefix('torch.')} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}"
    )
    methods = build_methods(args, device, dtype)
    load = OtherLoad()
    plain, ckpt, nbytes, nbytes_ckpt = run_training(methods, args)
    size = sizes(args, methods)
    del methods["mola"]  # free its memory before the base model is built
    decode_models = {"base": base_model(args, device, dtype)}
    decode_models.update({n: m.model for n, m in methods.items()})
    log("greedy decoding")
    decode = decode_phase({n: decode_models[n] for n in DECODE_METHODS}, args)
    other = load.cores()
    r = ratios(plain, ckpt, decode, nbytes, nbytes_ckpt)
    met = met_flags(r)
    ms = {"train": medians_ms(plain), "train_ckpt": medians_ms(ckpt), "decode": medians_ms(decode)}
    print_table(ms, {"saved": nbytes, "saved_ckpt": nbytes_ckpt})
    disturbed = other is not None and other > LOAD_WARN
    if disturbed:
        print(
            f"WARNING: other processes used {other:.2f} cores while timing: the ratios are "
            "unreliable; re-run on an idle machine."
        )
    elapsed = time.perf_counter() - t_start
    log(f"total {elapsed:.1f}s")
    summary = {
        "device": device.type,
        "device_name": device_name,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "sizes": size,
        "ratios": r,
        "targets": TARGETS,
        "met": met,
        "ms": ms,
        "saved_bytes": {"plain": nbytes, "ckpt": nbytes_ckpt},
        "other_load_cores": None if other is None else round(other, 2),
        "disturbed": disturbed,
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
