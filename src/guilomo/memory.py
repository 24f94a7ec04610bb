"""Peak memory of an SFT step, predicted from a model's config alone.

The model is built on the meta device (no weights: LLaMA-3-8B's shapes cost nothing), the
adapter injected, and one training forward run on meta tensors under
`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the
backward: the activations are counted, not modelled. The rest is arithmetic:

    peak = base weights + adapter weights + their gradients + AdamW's two moments
         + the saved activations + the backward's largest transient

where the transient is the logits' gradient (fp32 and the model dtype) and, with
checkpointing, one decoder layer's activations recomputed at a time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from .moe.config import Placement

if TYPE_CHECKING:  # torch loads only when a plan is made: `--help` stays fast
    import torch
    from torch import nn

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part of the predicted peak of one SFT step."""

    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer: int
    activations: int
    backward_transient: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def table(self) -> dict[str, float]:
        """The parts and the total in GiB."""
        return {k: v / GIB for k, v in {**asdict(self), "total": self.total}.items()}


class _Saved:
    """Bytes autograd saves for the backward: each storage once (a view counts as the tensor
    it views), parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {id(p) for p in model.parameters()}
        self.seen: list[torch.Tensor] = []  # kept alive so ids stay unique
        self.ids: set[int] = set()
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in self.params and id(base) not in self.ids:
            self.ids.add(id(base))
            self.seen.append(base)
            self.bytes += base.untyped_storage().nbytes()
        return t

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        import torch

        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def _bytes(params: object) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _saved_by_forward(model: nn.Module, micro_batch: int, cutoff: int) -> tuple[int, int]:
    """(bytes one training forward saves, of which the first decoder layer's), on meta
    inputs with a 4-D boolean causal mask, so no step reads a tensor's values."""
    import torch

    saved, window = _Saved(model), []

    def mark(*_: object) -> None:  # (a pre-hook's return value would replace the inputs)
        window.append(saved.bytes)

    layer = model.get_decoder().layers[0]
    hooks = (layer.register_forward_pre_hook(mark), layer.register_forward_hook(mark))
    device = next(model.parameters()).device
    ids = torch.zeros(micro_batch, cutoff, dtype=torch.long, device=device)
    mask = torch.ones(micro_batch, 1, cutoff, cutoff, dtype=torch.bool, device=device)
    try:
        with saved.hooks():
            model(input_ids=ids, attention_mask=mask.tril(), labels=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return saved.bytes, window[1] - window[0]


def plan_memory(
    model: nn.Module,
    adapter: object,
    *,
    micro_batch: int,
    cutoff: int,
    gradient_checkpointing: bool = False,
) -> MemoryPlan:
    """The plan of an SFT step of `model` (best on the meta device) with `adapter` injected.
    Enables checkpointing on the model when asked."""
    import torch

    trainable = list(adapter.parameters())
    mine = {id(p) for p in trainable}
    model.train()
    activations, layer = _saved_by_forward(model, micro_batch, cutoff)
    vocab = model.get_output_embeddings().weight.shape[0]
    dtype = trainable[0].dtype if trainable else torch.float32
    transient = micro_batch * cutoff * vocab * (4 + dtype.itemsize)  # the logits' gradient
    if gradient_checkpointing:  # the backward rebuilds one layer's activations at a time
        adapter.enable_checkpointing()
        activations = _saved_by_forward(model, micro_batch, cutoff)[0]
        transient += layer
    return MemoryPlan(
        base_weights=_bytes(p for p in model.parameters() if id(p) not in mine),
        adapter_weights=_bytes(trainable),
        gradients=_bytes(trainable),
        optimizer=2 * _bytes(trainable),
        activations=activations,
        backward_transient=transient,
    )


def _llama(
    vocab: int, hidden: int, mlp: int, layers: int, heads: int, kv: int, **kw: object
) -> dict:
    return dict(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        **kw,
    )


#: Model shapes known by name (published configs), so a plan needs neither weights nor network.
SHAPES: dict[str, dict[str, object]] = {
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, rope_theta=5e5, tie_word_embeddings=False),
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, rope_theta=1e5, tie_word_embeddings=True),
}


def model_config(spec: str) -> object:
    """A transformers config: a named shape (`SHAPES`), a config.json, or a folder with one."""
    from transformers import AutoConfig

    if spec.lower() in SHAPES:
        shape = dict(SHAPES[spec.lower()])
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"--base-model {spec}: no such config.json; give a model folder, a config.json or "
            f"one of {', '.join(SHAPES)}"
        )
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a transformers model config ({exc})") from None


def meta_model(config: object, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` on the meta device: shapes only, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _plan_command(args: argparse.Namespace) -> int:
    import torch

    from .artifacts.allocation import read_allocation
    from .moe import MoeConfig, build_allocation, inject_adapter

    model = meta_model(model_config(args.base_model), getattr(torch, args.dtype))
    if args.allocation is not None:
        alloc = read_allocation(args.allocation)
    else:
        names = [n for n, _ in model.named_modules()]
        alloc = build_allocation(
            base_model=args.base_model,
            module_names=names,
            preset="uniform",
            experts=args.experts,
            top_k=args.top_k,
            rank=args.rank,
            placement=args.placement,
        )
    adapter = inject_adapter(model, MoeConfig(allocation=alloc, lora_dropout=args.dropout))
    plan = plan_memory(
        model,
        adapter,
        micro_batch=args.micro_batch,
        cutoff=args.cutoff,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    table = plan.table()
    if args.json:
        print(json.dumps({k: round(v, 4) for k, v in table.items()}))
        return 0
    for part, gib in table.items():
        print(f"{part:<20}{gib:>10.2f} GiB")
    return 0


def add_memory_parser(sub: argparse._SubParsersAction) -> None:
    """Register `guilomo plan-memory` on the top-level subparsers."""
    p = sub.add_parser(
        "plan-memory",
        help="predict the peak memory of an SFT step from a model's config alone",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Predict the peak GPU memory of one SFT step (base weights, adapter, "
        "gradients, AdamW state, activations, the backward's largest transient). The model is "
        "built on the meta device from its config, so an 8B model needs no weights; the "
        "activations are those autograd saves in a forward on meta tensors. Checked against "
        "measured peaks by benchmarks/memory_model.py.",
    )
    p.add_argument(
        "--base-model",
        required=True,
        help=f"a model folder, a config.json, or a named shape: {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--allocation",
        type=Path,
        help="an Allocation artifact folder (default: "
        "uniform --experts x --top-k x --rank on --placement)",
    )
    p.add_argument("--experts", type=int, default=8, help="experts per module (uniform)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (uniform)")
    p.add_argument("--rank", type=int, default=8, help="rank of every expert (uniform)")
    p.add_argument("--placement", choices=get_args(Placement), default="all")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--cutoff", type=int, default=256, help="tokens per sequence")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="bfloat16",
        help="dtype of the base weights (the adapter takes the same)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (GiB)")
    p.set_defaults(func=_plan_command)
