"""What the cluster side (charts/guilomo) and the Python side must agree on.

* `TORCHRUN_SFT`: the `torchrun` command line of multi-GPU / multi-node SFT; the chart's
  PyTorchJob renders exactly this list, its {placeholders} filled from values and from what
  Kubeflow Trainer sets (`$(RANK)`, `$(MASTER_ADDR)`, `$(MASTER_PORT)`).
* GPU pools: the chart renders `gpuPools` into the ConfigMap `guilomo-gpu-pools` (key
  `gpu-pools.yaml`); `gpu_pool` turns one pool into the run-config fields `guilomo submit` passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .textfiles import read_text

#: `torchrun` (one process per GPU of the node, DDP) running `guilomo stage sft`.
TORCHRUN_SFT = (
    "torchrun --nnodes {nnodes} --nproc-per-node {nproc_per_node} --node-rank {node_rank} "
    "--master-addr {master_addr} --master-port {master_port} -m guilomo.cli stage sft "
    "--config {config} --dataset {dataset} --allocation {allocation} "
    "--checkpoints {checkpoints} --out {out} --quiet"
).split()
#: The ConfigMap (and its key) the chart renders from `gpuPools`.
GPU_POOLS_CONFIGMAP = "guilomo-gpu-pools"
GPU_POOLS_KEY = "gpu-pools.yaml"


def torchrun_sft_command(**values: Any) -> list[str]:
    """`TORCHRUN_SFT` with its {placeholders} filled in; KeyError names a missing one."""
    return [part.format(**{k: str(v) for k, v in values.items()}) for part in TORCHRUN_SFT]


def gpu_pool(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """Run-config fields for pool `name` of a `gpu-pools.yaml` document
    (`{pools: {NAME: {gpuCount, nodeSelector, tolerations}}, default: NAME}`)."""
    pools = doc.get("pools") or {}
    if name not in pools:
        known = ", ".join(sorted(pools)) or "none"
        raise ValueError(f"GPU pool {name!r} is not in the chart's gpuPools (known: {known})")
    pool = pools[name]
    return {
        "gpu_count": int(pool.get("gpuCount", 1)),
        "gpu_node_selector": dict(pool.get("nodeSelector") or {}),
        "gpu_tolerations": list(pool.get("tolerations") or []),
    }


def load_gpu_pool(path: Path, name: str | None = None) -> dict[str, Any]:
    """`gpu_pool` of the file at `path` (from `kubectl get configmap guilomo-gpu-pools`);
    `name` None = the chart's default pool."""
    import yaml

    try:
        doc = yaml.safe_load(read_text(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the GPU pools ({exc})") from None
    return gpu_pool(doc, name or str(doc.get("default", "")))
