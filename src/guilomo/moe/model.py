"""Put LoRA-MoE layers into a stock transformers causal LM by module name; save and load them.

No forked modeling code: modules named by the allocation are swapped with
`nn.Module.set_submodule`, and the padding mask reaches the layers through a forward
pre-hook on the model (public torch API). The model keeps its class, signature and
`generate()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from .config import MoeConfig
from .layer import ExpertImpl, LoraMoeLinear, MixLoraMlp, RoutingState, is_llama_mlp
from .losses import aux_loss

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "guilomo-lora-moe"
FORMAT_VERSION = 1

MoeLayer = LoraMoeLinear | MixLoraMlp


class AdapterError(ValueError):
    """An adapter does not fit its model, or its files are bad. The message says how to fix it."""


def _linear_leaf_names(model: nn.Module) -> list[str]:
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )


def _module_shape(module: nn.Module) -> dict[str, int] | None:
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if is_llama_mlp(module):
        return {"in": module.gate_proj.in_features, "out": module.gate_proj.out_features}
    return None


def check_targets(model: nn.Module, config: MoeConfig) -> dict[str, nn.Module]:
    """The modules the allocation names, or an `AdapterError` naming what is missing or unwrappable."""
    modules = dict(model.named_modules())
    names = config.allocation.module_names
    missing = [n for n in names if n not in modules]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise AdapterError(
            f"{type(model).__name__} has no module {shown}. Its linear layers are named "
            f"{_linear_leaf_names(model)}; build the allocation from this model's module names "
            "(guilomo.moe.build_allocation(..., targets=[...]))"
        )
    found = {n: modules[n] for n in names}
    bad = {n: type(m).__name__ for n, m in found.items() if _module_shape(m) is None}
    if bad:
        n, kind = next(iter(bad.items()))
        raise AdapterError(
            f"cannot wrap {n} of type {kind} ({len(bad)} such modules): guilomo wraps "
            "torch.nn.Linear projections and LLaMA-style MLP blocks (gate_proj/up_proj/down_proj)"
        )
    return found


def _adapter_params(layers: dict[str, MoeLayer]) -> dict[str, nn.Parameter]:
    """Adapter parameters by full name (`<module>.lora_A`, ...): everything but the base."""
    return {
        f"{name}.{n}": p
        for name, layer in layers.items()
        for n, p in layer.named_parameters()
        if not n.startswith("base_layer.")
    }


class MoeAdapter:
    """Handle on the LoRA-MoE layers injected into a model: losses, statistics, save."""

    def __init__(
        self, model: nn.Module, config: MoeConfig, layers: dict[str, MoeLayer], state: RoutingState
    ):
        self.model = model
        self.config = config
        self.layers = layers
        self.state = state
        self.search_reader = None  # set by `guilomo.moe.search.inject_search`
        self._hook = model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state.attention_mask = kwargs.get("attention_mask")
        self.state.records.clear()

    # -- training ------------------------------------------------------------------
    def set_task_types(self, task_types: torch.Tensor | None) -> None:
        """Per-example task type (B,) for LoRAMoE's localized balancing, for the next forwards."""
        self.state.task_types = task_types

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted auxiliary router losses of the last forward (None when all are off)."""
        return aux_loss(self.state.records.values(), self.config.losses, self.state.task_types)

    def enable_checkpointing(self) -> None:
        """Activation checkpointing on transformers' own mechanism, non-reentrant. Dropout
        masks repeat in the recomputation (checkpoint restores the RNG state; the masks draw
        from the global generator) and the recomputation records no routing."""
        model = self.model
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers 5
        enable = enable or model.gradient_checkpointing_enable
        enable({"use_reentrant": False, "context_fn": self._checkpoint_contexts})
        if self.search_reader is not None:  # the recomputation must read the forward's gates
            self.search_reader.hold = True

    def _checkpoint_contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        return nullcontext(), self.state.recomputation()

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from _adapter_params(self.layers).values()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- statistics ----------------------------------------------------------------
    def router_stats(self) -> dict[str, list[float]]:
        """Per module, the share of routed token slots each expert received since the last reset."""
        out = {}
        for name, count in self.state.counts.items():
            c = count.double()
            out[name] = (c / c.sum().clamp_min(1)).tolist()
        return out

    def reset_router_stats(self) -> None:
        self.state.counts.clear()
        self.state.tokens.clear()

    # -- persistence ---------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in _adapter_params(self.layers).items()}

    def save(
        self, directory: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write `adapter_config.json` + `adapter_model.safetensors` into `directory`.

        `tensors`: the weights to write instead of this adapter's own (e.g. the full tensors
        gathered from FSDP shards, under the same names as `state_dict()`)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        shapes = {n: _module_shape(layer.base_layer) for n, layer in self.layers.items()}
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "guilomo_version": __version__,
            "base_shapes": shapes,
            "config": self.config.model_dump(mode="json"),
        }
        own = self.state_dict()
        if tensors is not None and set(tensors) != set(own):
            raise ValueError("tensors to save must have exactly the adapter's parameter names")
        tensors = {k: v.contiguous().cpu() for k, v in (tensors or own).items()}
        tmp_w, tmp_c = d / (WEIGHTS_NAME + ".tmp"), d / (CONFIG_NAME + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": FORMAT})
        tmp_c.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, d / WEIGHTS_NAME)
        os.replace(tmp_c, d / CONFIG_NAME)  # the config last: its presence marks a complete save
        return d


def inject_adapter(
    model: nn.Module,
    config: MoeConfig,
    *,
    expert_impl: ExpertImpl = "fused",
    weights: dict[str, torch.Tensor] | None = None,
    weights_source: str = "weights",
) -> MoeAdapter:
    """Freeze `model` and swap in LoRA-MoE layers at the allocation's modules (in place).

    With `weights`, every adapter tensor is checked and copied in before the model is
    touched, so a mismatch leaves the model as it was.
    """
    targets = check_targets(model, config)
    state = RoutingState()
    layers: dict[str, MoeLayer] = {}
    for name, module in targets.items():
        kind = LoraMoeLinear if isinstance(module, nn.Linear) else MixLoraMlp
        layers[name] = kind(
            base_layer=module,
            name=name,
            allocation=config.allocation.modules[name],
            config=config,
            state=state,
            expert_impl=expert_impl,
        )
    if weights is not None:
        _copy_weights(layers, weights, weights_source)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in layers.items():
        layer.train(targets[name].training)
        model.set_submodule(name, layer)
    return MoeAdapter(model, config, layers, state)


def _copy_weights(
    layers: dict[str, MoeLayer], tensors: dict[str, torch.Tensor], source: str
) -> None:
    expected = _adapter_params(layers)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{source}: tensors do not match {CONFIG_NAME}: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )
    for key, target in expected.items():
        src = tensors[key]
        if src.shape != target.shape:
            raise AdapterError(
                f"{source}: tensor {key} has shape {tuple(src.shape)}, the config implies "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(src)


def _read_config(path: Path) -> tuple[MoeConfig, dict]:
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterError(
            f"{cfg_path}: not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AdapterError(
            f"{cfg_path}: not a guilomo LoRA-MoE adapter (`format` is not {FORMAT!r})"
        )
    if doc.get("format_version") != FORMAT_VERSION:
        raise AdapterError(
            f"{cfg_path}: format_version {doc.get('format_version')!r} is not supported "
            f"(this guilomo reads {FORMAT_VERSION})"
        )
    try:
        config = MoeConfig.model_validate(doc.get("config"))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise AdapterError(f"{cfg_path}: config.{field}: {err['msg']}") from None
    return config, doc


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, *, expert_impl: ExpertImpl = "fused"
) -> MoeAdapter:
    """Inject the adapter saved in `directory` into `model`, after checking they fit."""
    path = Path(directory)
    config, doc = _read_config(path)
    targets = check_targets(model, config)
    for name, want in (doc.get("base_shapes") or {}).items():
        have = _module_shape(targets[name]) if name in targets else None
        if have != want:
            raise AdapterError(
                f"{path / CONFIG_NAME}: module {name} was {want} in the adapter's base model but "
                f"is {have} here: load the adapter on the base model it was trained on "
                f"({config.base_model})"
            )
    w_path = path / WEIGHTS_NAME
    if not w_path.is_file():
        raise AdapterError(f"{w_path}: not found")
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{w_path}: corrupted or not a safetensors file ({exc})") from None
    return inject_adapter(
        model, config, expert_impl=expert_impl, weights=tensors, weights_source=str(w_path)
    )
