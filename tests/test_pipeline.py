"""The compiled KFP YAML: committed copies are current; GPU settings only on GPU stages."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GUILOMO = str(Path(sys.executable).parent / "guilomo")
GPU_EXECUTORS = {"exec-search-op", "exec-sft-op", "exec-evaluate-op", "exec-evaluate-base-op"}


def compiled(tmp_path):
    r = subprocess.run(
        [GUILOMO, "compile", "--root", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return tmp_path


def test_committed_yaml_is_current(tmp_path):
    out = compiled(tmp_path)
    fresh = sorted(p.relative_to(out) for p in out.rglob("*.yaml"))
    committed = sorted(
        p.relative_to(ROOT) for d in ("components", "pipelines") for p in (ROOT / d).glob("*.yaml")
    )
    assert fresh == committed
    for rel in fresh:
        assert (out / rel).read_text() == (ROOT / rel).read_text(), (
            f"{rel} is stale: run guilomo compile"
        )


def test_gpu_settings_only_on_gpu_stages_and_no_credentials(tmp_path):
    text = (compiled(tmp_path) / "pipelines" / "guilomo.yaml").read_text()
    spec, platform = list(yaml.safe_load_all(text))
    executors = spec["deploymentSpec"]["executors"]
    with_gpu = {
        name
        for name, ex in executors.items()
        if ex["container"].get("resources", {}).get("accelerator", {}).get("resourceType")
        == "nvidia.com/gpu"
    }
    assert with_gpu == GPU_EXECUTORS
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == GPU_EXECUTORS
    for ex in k8s.values():
        assert "nodeSelector" in ex and "tolerations" in ex
    for ex in executors.values():
        assert ":latest" not in ex["container"]["image"]
    lowered = text.lower()
    for word in ("aws_secret", "secret_access_key", "password", "token="):
        assert word not in lowered


def test_caching_and_retries(tmp_path):
    spec, _ = list(
        yaml.safe_load_all((compiled(tmp_path) / "pipelines" / "guilomo.yaml").read_text())
    )

    def tasks(dag):
        for name, task in dag["tasks"].items():
            yield name, task
            comp = spec["components"][task["componentRef"]["name"]]
            if "dag" in comp:
                yield from tasks(comp["dag"])

    found = dict(tasks(spec["root"]["dag"]))
    leaves = {n: t for n, t in found.items() if not n.startswith("condition")}
    assert {
        "preprocess-op",
        "search-op",
        "allocate-op",
        "preset-op",
        "sft-op",
        "evaluate-op",
        "evaluate-base-op",
    } <= set(leaves)
    for name, task in leaves.items():
        assert task["cachingOptions"].get("enableCache") is True, name
    for name in ("search-op", "sft-op", "evaluate-op", "evaluate-base-op"):
        assert leaves[name]["retryPolicy"]["maxRetryCount"] == 2, name
    for name in ("preprocess-op", "allocate-op", "preset-op"):
        assert "retryPolicy" not in leaves[name], name
