"""The compiled KFP YAML: committed copies are current; GPU settings only on GPU stages."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler

from guilomo.pipeline import rerun_pipeline

ROOT = Path(__file__).resolve().parents[1]
GUILOMO = str(Path(sys.executable).parent / "guilomo")
GPU_EXECUTORS = {"exec-search-op", "exec-sft-op", "exec-evaluate-op", "exec-evaluate-base-op"}


def base_name(name):
    """KFP numbers a component's second use (sft-op-2 in the other branch)."""
    return re.sub(r"-\d+$", "", name)


def compiled(tmp_path):
    r = subprocess.run(
        [GUILOMO, "compile", "--root", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return tmp_path


def constraints():
    """docker/constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_environment_image_and_compiled_yaml_agree_on_versions():
    """The tests run on the versions the image installs (make venv installs under
    docker/constraints.txt), and the committed YAML records the kfp of both."""
    from importlib import metadata

    pins = constraints()
    assert {"kfp", "transformers", "mlflow", "datasets", "pydantic"} <= set(pins)
    wrong = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # platform-specific, not installed here
        if installed != version:
            wrong[name] = f"{installed} installed, {version} pinned"
    assert not wrong, (
        f"{wrong}: this environment is not the image's; `make venv` installs under "
        "docker/constraints.txt (or, to move on, `make docker-constraints` and `guilomo compile`)"
    )
    for d in ("components", "pipelines"):
        for path in (ROOT / d).glob("*.yaml"):
            recorded = re.findall(r"^sdkVersion: kfp-(\S+)$", path.read_text(), re.M)
            assert recorded == [pins["kfp"]], (
                f"{path}: records kfp {recorded}, image has {pins['kfp']}"
            )


def test_committed_yaml_is_current(tmp_path):
    out = compiled(tmp_path)
    fresh = sorted(p.relative_to(out) for p in out.rglob("*.yaml"))
    committed = sorted(
        p.relative_to(ROOT) for d in ("components", "pipelines") for p in (ROOT / d).glob("*.yaml")
    )
    assert fresh == committed
    for rel in fresh:
        assert (out / rel).read_text() == (ROOT / rel).read_text(), (
            f"{rel} is stale: run guilomo compile (after make venv, so kfp is the image's)"
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
    assert {base_name(n) for n in with_gpu} == GPU_EXECUTORS
    cpu = set(executors) - with_gpu
    assert {base_name(n) for n in cpu} == {
        "exec-preprocess-op",
        "exec-allocate-op",
        "exec-preset-op",
    }
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, ex in k8s.items():
        on_gpu = name in with_gpu
        assert ("nodeSelector" in ex) == on_gpu and ("tolerations" in ex) == on_gpu, name
        # every pod: the chart's ConfigMap and the S3 Secret as environment, both optional
        (cm,) = ex["configMapAsEnv"]
        assert cm["configMapName"] == "guilomo-env" and cm["optional"] is True
        assert {e["envVar"] for e in cm["keyToEnv"]} >= {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"}
        (secret,) = ex["secretAsEnv"]
        assert {e["envVar"] for e in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        }
    for ex in executors.values():
        assert ":latest" not in ex["container"]["image"]
    lowered = text.lower()
    for word in ("password", "token="):
        assert word not in lowered
    # the S3 key is only ever named, as the Secret key mapped to its env var (two per pod)
    assert lowered.count("aws_secret_access_key") == 2 * len(executors)


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

    found = list(tasks(spec["root"]["dag"]))
    leaves = {base_name(n): t for n, t in found if not n.startswith("condition")}
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


def test_every_sub_dag_declares_the_parameters_its_tasks_read(tmp_path):
    """A task inside dsl.If / dsl.Else may only read its sub-DAG's declared inputs (kfp 2.17
    dropped the GPU count used as an accelerator limit; kfp.local then failed)."""
    spec, _ = list(
        yaml.safe_load_all((compiled(tmp_path) / "pipelines" / "guilomo.yaml").read_text())
    )
    comps = dict(spec["components"]) | {"root": spec["root"]}
    for name, comp in comps.items():
        if "dag" not in comp:
            continue
        declared = set(comp.get("inputDefinitions", {}).get("parameters", {}))
        for task_name, task in comp["dag"]["tasks"].items():
            for param in task.get("inputs", {}).get("parameters", {}).values():
                ref = param.get("componentInputParameter")
                if ref is not None:
                    assert ref in declared, f"{name}/{task_name} reads undeclared {ref}"
            text = yaml.safe_dump(task)
            for ref in re.findall(r"inputs\.parameters\[''([^']+)''\]", text):
                assert ref in set(task["inputs"]["parameters"]), f"{task_name}: {ref}"


@pytest.mark.parametrize(
    ("stage", "imports", "runs"),
    [
        ("sft", {"dataset", "allocation"}, {"sft-op", "evaluate-op"}),
        ("evaluate", {"dataset", "adapter"}, {"evaluate-op"}),
        ("allocate", {"dataset", "state"}, {"allocate-op", "sft-op", "evaluate-op"}),
        ("search", {"dataset"}, {"search-op", "allocate-op", "sft-op", "evaluate-op"}),
    ],
)
def test_rerun_pipeline_imports_upstream_and_runs_only_downstream(tmp_path, stage, imports, runs):
    uris = {k: f"s3://bucket/run/{k}" for k in ("dataset", "state", "allocation", "adapter")}
    path = tmp_path / "rerun.yaml"
    compiler.Compiler().compile(rerun_pipeline(stage, uris), str(path))
    spec, _ = list(yaml.safe_load_all(path.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    importers = {n for n in tasks if n.startswith("importer")}
    assert set(tasks) - importers == runs
    executors = spec["deploymentSpec"]["executors"]
    imported = {
        executors[spec["components"][tasks[n]["componentRef"]["name"]]["executorLabel"]][
            "importer"
        ]["artifactUri"]["constant"]
        for n in importers
    }
    assert imported == {uris[k] for k in imports}


def test_rerun_pipeline_refuses_a_stage_without_its_inputs():
    with pytest.raises(ValueError, match="allocation"):
        rerun_pipeline("sft", {"dataset": "s3://b/d"})
    with pytest.raises(ValueError, match="cannot rerun"):
        rerun_pipeline("preprocess", {})
