"""The Kubeflow Pipelines side: one lightweight component per stage, and the DAG.

Each component is a thin function (imports inside) that calls the stage's plain-Python
`run_*`; the same functions run on a cluster (image `IMAGE`) and under `kfp.local`.
Stage configs travel as dict parameters and are validated by the stage's pydantic model.

GPU stages (search, sft, evaluate) request `nvidia.com/gpu` (count a pipeline parameter)
and take their node selector and tolerations from pipeline parameters (kfp-kubernetes),
so the GPU pool is chosen at submit time; they retry with backoff. CPU stages get neither
the GPU request nor the GPU toleration, so tainted GPU nodes do not take them.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from . import __version__

IMAGE = f"guilomo:{__version__}"  # a versioned tag, never `latest`; `guilomo image` builds it
GPU_STAGES = ("search", "sft", "evaluate", "evaluate-base")


# Every component takes the MLflow parent run id and the KFP run / task ids (placeholders
# resolved at run time), and calls its task in `guilomo.tasks`, where all the logic lives.


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


COMPONENTS = {
    "preprocess": preprocess_op,
    "search": search_op,
    "allocate": allocate_op,
    "preset": preset_op,
    "sft": sft_op,
    "evaluate": evaluate_op,
    "evaluate-base": evaluate_base_op,
}


#: Environment of every pipeline pod, from the chart (charts/guilomo): the ConfigMap holds the
#: MLflow URI, S3 endpoint and region, image and checkpoint root; the Secret (named by the
#: `s3_secret` pipeline parameter) the S3 keys. Both optional, so pods start without them.
ENV_CONFIG_MAP = "guilomo-env"
ENV_KEYS = (
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "GUILOMO_IMAGE",
    "GUILOMO_CHECKPOINT_ROOT",
)
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _env(task: dsl.PipelineTask, s3_secret) -> None:  # noqa: ANN001
    kubernetes.use_config_map_as_env(task, ENV_CONFIG_MAP, {k: k for k in ENV_KEYS}, optional=True)
    kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in SECRET_KEYS}, optional=True)


def _on_gpu(task: dsl.PipelineTask, name: str, gpus, node_selector, tolerations, s3_secret):  # noqa: ANN001
    _env(task, s3_secret)
    task.set_display_name(name)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    task.set_caching_options(True)
    return task


def _on_cpu(task: dsl.PipelineTask, name: str, s3_secret):  # noqa: ANN001
    _env(task, s3_secret)
    return task.set_display_name(name).set_caching_options(True)


@dataclass(frozen=True)
class _Dag:
    """The pipeline parameters the task builders below need (KFP channels)."""

    search_config: Any
    allocate_config: Any
    sft_config: Any
    evaluate_config: Any
    gpu_count: Any
    gpu_node_selector: Any
    gpu_tolerations: Any
    parent_run_id: Any
    checkpoint_root: Any
    s3_secret: Any

    @property
    def ids(self) -> dict:
        """Tracking arguments of every task: the MLflow parent run, the KFP run and task."""
        return {
            "parent_run_id": self.parent_run_id,
            "kfp_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            "kfp_task": dsl.PIPELINE_TASK_ID_PLACEHOLDER,
        }

    def gpu(self, task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
        return _on_gpu(
            task,
            name,
            self.gpu_count,
            self.gpu_node_selector,
            self.gpu_tolerations,
            self.s3_secret,
        )

    # `gpus` is also a plain argument of the GPU tasks: it carries gpu_count into dsl.If
    # sub-DAGs, which the accelerator limit alone does not (kfp 2.17 omits it from their
    # inputs), and it sets the number of torchrun processes.
    def search(self, dataset):  # noqa: ANN001
        task = search_op(
            config=self.search_config,
            dataset=dataset,
            checkpoint_root=self.checkpoint_root,
            gpus=self.gpu_count,
            **self.ids,
        )
        return self.gpu(task, "search").outputs["state"]

    def allocate(self, state=None):  # noqa: ANN001
        """From a search state, or (state None) the preset in allocate_config."""
        if state is None:
            task, name = preset_op(config=self.allocate_config, **self.ids), "allocate (preset)"
        else:
            task = allocate_op(config=self.allocate_config, state=state, **self.ids)
            name = "allocate"
        return _on_cpu(task, name, self.s3_secret).outputs["allocation"]

    def sft(self, dataset, allocation):  # noqa: ANN001
        task = sft_op(
            config=self.sft_config,
            dataset=dataset,
            allocation=allocation,
            checkpoint_root=self.checkpoint_root,
            gpus=self.gpu_count,
            **self.ids,
        )
        return self.gpu(task, "sft").outputs["adapter"]

    def evaluate(self, dataset, adapter=None) -> None:  # noqa: ANN001
        """The adapter's score, or (adapter None) the untuned base model's."""
        args = {"config": self.evaluate_config, "dataset": dataset, "gpus": self.gpu_count}
        if adapter is None:
            self.gpu(evaluate_base_op(**args, **self.ids), "evaluate (base)")
        else:
            self.gpu(evaluate_op(**args, adapter=adapter, **self.ids), "evaluate")


@dsl.pipeline(
    name="guilomo",
    description="GuiLoMo: preprocess -> GSV search -> allocation -> LoRA-MoE SFT -> evaluation",
)
def guilomo_pipeline(  # noqa: ANN201
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
    dag = _Dag(
        search_config,
        allocate_config,
        sft_config,
        evaluate_config,
        gpu_count,
        gpu_node_selector,
        gpu_tolerations,
        mlflow_parent_run_id,
        checkpoint_root,
        s3_secret,
    )
    prep = preprocess_op(config=preprocess_config, **dag.ids)
    dataset = _on_cpu(prep, "preprocess", s3_secret).outputs["dataset"]
    # sft and evaluate are built in both branches: kfp.local cannot join them with dsl.OneOf
    with dsl.If(use_preset == True, name="preset-allocation"):  # noqa: E712 (KFP condition)
        dag.evaluate(dataset, dag.sft(dataset, dag.allocate()))
    with dsl.Else(name="searched-allocation"):
        dag.evaluate(dataset, dag.sft(dataset, dag.allocate(dag.search(dataset))))
    with dsl.If(evaluate_base == True, name="baseline"):  # noqa: E712
        dag.evaluate(dataset)


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


def rerun_pipeline(stage: str, uris: dict[str, str]):  # noqa: ANN201
    """A pipeline that runs `stage` and everything downstream of it, importing the upstream
    artifacts at `uris` (output name -> URI, as an earlier run recorded them) with
    `dsl.importer`. Its parameters are `guilomo_pipeline`'s, so one run config fits both."""
    if stage not in RERUN_IMPORTS:
        raise ValueError(f"cannot rerun {stage!r}; choose one of {', '.join(RERUN_IMPORTS)}")
    missing = [k for k in RERUN_IMPORTS[stage] if not uris.get(k)]
    if missing:
        raise ValueError(f"rerun {stage}: no recorded URI for {', '.join(missing)}")

    def imported(name: str):
        task = dsl.importer(
            artifact_uri=uris[name], artifact_class=_ARTIFACT_CLASS[name], reimport=False
        )
        task.set_display_name(f"import {name}")
        return task.output

    @dsl.pipeline(name=f"guilomo-rerun-{stage}", description=f"guilomo: rerun from {stage}")
    def rerun(
        preprocess_config: dict = {},  # noqa: B006 (the same parameters as guilomo_pipeline)
        search_config: dict = {},  # noqa: B006
        allocate_config: dict = {},  # noqa: B006
        sft_config: dict = {},  # noqa: B006
        evaluate_config: dict = {},  # noqa: B006
        use_preset: bool = False,
        evaluate_base: bool = False,
        gpu_count: int = 1,
        gpu_node_selector: dict = {},  # noqa: B006
        gpu_tolerations: list = [],  # noqa: B006
        mlflow_parent_run_id: str = "",
        checkpoint_root: str = "",
        s3_secret: str = "guilomo-s3",
    ):
        dag = _Dag(
            search_config,
            allocate_config,
            sft_config,
            evaluate_config,
            gpu_count,
            gpu_node_selector,
            gpu_tolerations,
            mlflow_parent_run_id,
            checkpoint_root,
            s3_secret,
        )
        dataset = imported("dataset")
        if stage == "search":
            allocation = dag.allocate(dag.search(dataset))
        elif stage == "allocate":
            allocation = dag.allocate(imported("state"))
        elif stage == "preset":
            allocation = dag.allocate()
        if stage == "evaluate":
            adapter = imported("adapter")
        else:
            adapter = dag.sft(dataset, allocation if stage != "sft" else imported("allocation"))
        dag.evaluate(dataset, adapter)

    return rerun


def compile_all(root: Path) -> list[Path]:
    """Write components/<stage>.yaml and pipelines/guilomo.yaml under `root`."""
    written = []
    (root / "components").mkdir(parents=True, exist_ok=True)
    (root / "pipelines").mkdir(parents=True, exist_ok=True)
    for name, comp in COMPONENTS.items():
        path = root / "components" / f"{name}.yaml"
        compiler.Compiler().compile(comp, str(path))
        written.append(path)
    path = root / "pipelines" / "guilomo.yaml"
    compiler.Compiler().compile(guilomo_pipeline, str(path))
    written.append(path)
    return written
