"""The Kubeflow Pipelines side: one lightweight component per stage (a thin function, imports
inside, that calls `guilomo.tasks.run_task`, where all the logic lives; in image `IMAGE` or
under `kfp.local`), and the DAG. GPU stages (search, sft, evaluate) request `nvidia.com/gpu`
and take node selector and tolerations from pipeline parameters (kfp-kubernetes), so the GPU
pool is chosen at submit time, and retry with backoff; CPU stages get none, so tainted GPU
nodes do not take them."""

from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from . import __version__

IMAGE = f"guilomo:{__version__}"  # a versioned tag, never `latest`; `guilomo image` builds it


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess_op(  # noqa: ANN201
    config: dict, dataset: Output[Dataset], parent_run_id: str, kfp_run: str, kfp_task: str
):
    from guilomo.tasks import Io, Tracking, run_task

    run_task("preprocess", config, {}, Io.of(dataset), Tracking(parent_run_id, kfp_run, kfp_task))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def search_op(  # noqa: ANN201
    config: dict,
    dataset: Input[Dataset],
    state: Output[Artifact],
    parent_run_id: str,
    kfp_run: str,
    kfp_task: str,
    gpus: int,
    checkpoint_root: str,
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task, gpus, checkpoint_root)
    run_task("search", config, {"dataset": Io.of(dataset)}, Io.of(state), tracking)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def allocate_op(  # noqa: ANN201
    config: dict,
    state: Input[Artifact],
    allocation: Output[Artifact],
    parent_run_id: str,
    kfp_run: str,
    kfp_task: str,
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task)
    run_task("allocate", config, {"state": Io.of(state)}, Io.of(allocation), tracking)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preset_op(  # noqa: ANN201
    config: dict, allocation: Output[Artifact], parent_run_id: str, kfp_run: str, kfp_task: str
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task)
    run_task("allocate", config, {"state": None}, Io.of(allocation), tracking)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sft_op(  # noqa: ANN201
    config: dict,
    dataset: Input[Dataset],
    allocation: Input[Artifact],
    adapter: Output[Model],
    parent_run_id: str,
    kfp_run: str,
    kfp_task: str,
    gpus: int,
    checkpoint_root: str,
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task, gpus, checkpoint_root)
    inputs = {"dataset": Io.of(dataset), "allocation": Io.of(allocation)}
    run_task("sft", config, inputs, Io.of(adapter), tracking)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(  # noqa: ANN201
    config: dict,
    dataset: Input[Dataset],
    adapter: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    parent_run_id: str,
    kfp_run: str,
    kfp_task: str,
    gpus: int,
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task, gpus)
    inputs = {"dataset": Io.of(dataset), "adapter": Io.of(adapter)}
    for key, value in run_task("evaluate", config, inputs, Io.of(report), tracking).items():
        metrics.log_metric(key, value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_base_op(  # noqa: ANN201
    config: dict,
    dataset: Input[Dataset],
    report: Output[Artifact],
    metrics: Output[Metrics],
    parent_run_id: str,
    kfp_run: str,
    kfp_task: str,
    gpus: int,
):
    from guilomo.tasks import Io, Tracking, run_task

    tracking = Tracking(parent_run_id, kfp_run, kfp_task, gpus)
    inputs = {"dataset": Io.of(dataset), "adapter": None}
    for key, value in run_task("evaluate", config, inputs, Io.of(report), tracking).items():
        metrics.log_metric(key, value)


_OPS = (preprocess_op, search_op, allocate_op, preset_op, sft_op, evaluate_op, evaluate_base_op)
COMPONENTS = {op.name.removesuffix("-op"): op for op in _OPS}  # "preprocess", ..., "evaluate-base"


#: Environment of every pipeline pod, from the chart (charts/guilomo): the ConfigMap holds the
#: MLflow URI, S3 endpoint and region, image and checkpoint root; the Secret (named by the
#: `s3_secret` pipeline parameter) the S3 keys. Both optional, so pods start without them.
ENV_CONFIG_MAP = "guilomo-env"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_REGION")  # MLflow's and S3's
ENV_KEYS += ("GUILOMO_IMAGE", "GUILOMO_CHECKPOINT_ROOT")  # guilomo's own
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

#: The stages `guilomo rerun` can start from, in DAG order, and the upstream artifacts each
#: imports from the earlier run (by the output names the stages record).
RERUN_IMPORTS = {
    "search": ("dataset",),
    "allocate": ("dataset", "state"),
    "preset": ("dataset",),
    "sft": ("dataset", "allocation"),
    "evaluate": ("dataset", "adapter"),
}
_ARTIFACT_CLASS = {"dataset": Dataset, "state": Artifact, "allocation": Artifact, "adapter": Model}


class _Dag:
    """Builds the tasks from the pipeline parameters `p` (KFP channels, by name)."""

    def __init__(self, p: dict[str, Any]) -> None:
        self.p = p
        # every task's tracking arguments: the MLflow parent run, the KFP run and task
        run, task = dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_TASK_ID_PLACEHOLDER
        self.ids = {"parent_run_id": p["mlflow_parent_run_id"], "kfp_run": run, "kfp_task": task}
        # `gpus` is also a plain argument of the GPU tasks: it carries gpu_count into dsl.If
        # sub-DAGs, which the accelerator limit alone does not (kfp 2.17 omits it from their
        # inputs), and it sets the number of torchrun processes.
        self.gpu_ids = self.ids | {"gpus": p["gpu_count"]}
        self.training_ids = self.gpu_ids | {"checkpoint_root": p["checkpoint_root"]}

    def _set(self, task: dsl.PipelineTask, name: str, gpu: bool = False) -> dsl.PipelineTask:
        config_map_env, secret_env = {k: k for k in ENV_KEYS}, {k: k for k in SECRET_KEYS}
        kubernetes.use_config_map_as_env(task, ENV_CONFIG_MAP, config_map_env, optional=True)
        kubernetes.use_secret_as_env(task, self.p["s3_secret"], secret_env, optional=True)
        task.set_display_name(name)
        if gpu:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(self.p["gpu_count"])
            kubernetes.add_node_selector_json(task, self.p["gpu_node_selector"])
            kubernetes.add_toleration_json(task, self.p["gpu_tolerations"])
            task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
        return task.set_caching_options(True)

    def search(self, dataset):  # noqa: ANN001
        task = search_op(config=self.p["search_config"], dataset=dataset, **self.training_ids)
        return self._set(task, "search", gpu=True).outputs["state"]

    def allocate(self, state=None):  # noqa: ANN001
        """From a search state, or (state None) the preset in allocate_config."""
        if state is None:
            task = preset_op(config=self.p["allocate_config"], **self.ids)
            return self._set(task, "allocate (preset)").outputs["allocation"]
        task = allocate_op(config=self.p["allocate_config"], state=state, **self.ids)
        return self._set(task, "allocate").outputs["allocation"]

    def sft(self, dataset, allocation):  # noqa: ANN001
        config = self.p["sft_config"]
        task = sft_op(config=config, dataset=dataset, allocation=allocation, **self.training_ids)
        return self._set(task, "sft", gpu=True).outputs["adapter"]

    def evaluate(self, dataset, adapter=None) -> None:  # noqa: ANN001
        """The adapter's score, or (adapter None) the untuned base model's."""
        args = {"config": self.p["evaluate_config"], "dataset": dataset, **self.gpu_ids}
        if adapter is None:
            self._set(evaluate_base_op(**args), "evaluate (base)", gpu=True)
        else:
            self._set(evaluate_op(**args, adapter=adapter), "evaluate", gpu=True)

    def whole(self) -> None:
        task = preprocess_op(config=self.p["preprocess_config"], **self.ids)
        dataset = self._set(task, "preprocess").outputs["dataset"]
        # sft and evaluate are built in both branches: kfp.local cannot join them with dsl.OneOf
        with dsl.If(self.p["use_preset"] == True, name="preset-allocation"):  # noqa: E712 (KFP)
            self.evaluate(dataset, self.sft(dataset, self.allocate()))
        with dsl.Else(name="searched-allocation"):
            self.evaluate(dataset, self.sft(dataset, self.allocate(self.search(dataset))))
        with dsl.If(self.p["evaluate_base"] == True, name="baseline"):  # noqa: E712
            self.evaluate(dataset)

    def rerun(self, stage: str, uris: dict[str, str]) -> None:
        """`stage` and everything downstream, the upstream artifacts imported from `uris`."""
        got = {}
        for name in RERUN_IMPORTS[stage]:
            cls = _ARTIFACT_CLASS[name]
            task = dsl.importer(artifact_uri=uris[name], artifact_class=cls, reimport=False)
            got[name] = task.set_display_name(f"import {name}").output
        if stage in ("search", "allocate", "preset"):  # preset: no state, the preset allocation
            state = self.search(got["dataset"]) if stage == "search" else got.get("state")
            got["allocation"] = self.allocate(state)
        if stage != "evaluate":
            got["adapter"] = self.sft(got["dataset"], got["allocation"])
        self.evaluate(got["dataset"], got["adapter"])


def _pipeline(start: str | None = None, uris: dict[str, str] | None = None):
    """The whole DAG, or (`start` a stage) the rerun DAG from `start`: one signature for both,
    so one run config fits both."""
    name = "guilomo" if start is None else f"guilomo-rerun-{start}"
    stages = "preprocess -> GSV search -> allocation -> LoRA-MoE SFT -> evaluation"
    text = f"GuiLoMo: {stages}" if start is None else f"guilomo: rerun from {start}"

    @dsl.pipeline(name=name, description=text)
    def guilomo_pipeline(
        preprocess_config: dict = {},  # noqa: B006 (KFP pipeline parameters are literals)
        search_config: dict = {},  # noqa: B006
        allocate_config: dict = {},  # noqa: B006
        sft_config: dict = {},  # noqa: B006
        evaluate_config: dict = {},  # noqa: B006
        use_preset: bool = False,
        evaluate_base: bool = True,
        gpu_count: int = 1,
        gpu_node_selector: dict = {},  # noqa: B006
        gpu_tolerations: list = [],  # noqa: B006
        mlflow_parent_run_id: str = "",
        checkpoint_root: str = "",
        s3_secret: str = "guilomo-s3",
    ):
        """use_preset: skip the search and train the preset in allocate_config (the MoLA
        baseline); evaluate_base: also evaluate the untuned base model (the baseline row);
        mlflow_parent_run_id: the MLflow run each stage's child run hangs under ('' = untracked);
        checkpoint_root: where search and SFT mirror their checkpoints ('' = the chart's
        GUILOMO_CHECKPOINT_ROOT, else pod-local only); s3_secret: the Secret with the S3 keys."""
        dag = _Dag(locals())  # the parameters (and `start`, `uris`) by name
        if start is None:
            dag.whole()
        else:
            dag.rerun(start, uris)

    return guilomo_pipeline


guilomo_pipeline = _pipeline()


def rerun_pipeline(stage: str, uris: dict[str, str]):  # noqa: ANN201
    """`guilomo_pipeline` from `stage` on, importing the upstream artifacts at `uris` (output
    name -> URI, as an earlier run recorded them) with `dsl.importer`."""
    if stage not in RERUN_IMPORTS:
        raise ValueError(f"cannot rerun {stage!r}; choose one of {', '.join(RERUN_IMPORTS)}")
    missing = [k for k in RERUN_IMPORTS[stage] if not uris.get(k)]
    if missing:
        raise ValueError(f"rerun {stage}: no recorded URI for {', '.join(missing)}")
    return _pipeline(stage, uris)


def compile_all(root: Path) -> list[Path]:
    jobs = [(root / "components" / f"{n}.yaml", c) for n, c in COMPONENTS.items()]
    jobs.append((root / "pipelines" / "guilomo.yaml", guilomo_pipeline))
    for path, func in jobs:
        path.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(func, str(path))
    return [path for path, _ in jobs]
