"""The Kubeflow Pipelines side: one lightweight component per stage, and the DAG.

Each component is a thin function (imports inside) that calls the stage's plain-Python
`run_*`; the same functions run on a cluster (image `IMAGE`) and under `kfp.local`.
Stage configs travel as dict parameters and are validated by the stage's pydantic model.

GPU stages (search, sft, evaluate) request `nvidia.com/gpu` (count a pipeline parameter)
and take their node selector and tolerations from pipeline parameters (kfp-kubernetes),
so the GPU pool is chosen at submit time; they retry with backoff. CPU stages get neither
the GPU request nor the GPU toleration, so tainted GPU nodes do not take them.
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from . import __version__

IMAGE = f"guilomo:{__version__}"  # a versioned tag, never `latest`; `guilomo image` builds it
GPU_STAGES = ("search", "sft", "evaluate", "evaluate-base")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess_op(config: dict, dataset: Output[Dataset]):  # noqa: ANN201
    from pathlib import Path

    from guilomo.stages.preprocess import PreprocessConfig, run_preprocess

    run_preprocess(PreprocessConfig.model_validate(config), Path(dataset.path), overwrite=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def search_op(config: dict, dataset: Input[Dataset], state: Output[Artifact]):  # noqa: ANN201
    from pathlib import Path

    from guilomo.stages.search import SearchConfig, run_search_stage

    out = Path(state.path)
    run_search_stage(
        SearchConfig.model_validate(config),
        dataset=Path(dataset.path),
        out=out,
        checkpoints=out.with_name(out.name + ".ckpt"),
        progress=False,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def allocate_op(config: dict, state: Input[Artifact], allocation: Output[Artifact]):  # noqa: ANN201
    from pathlib import Path

    from guilomo.stages.allocate import AllocateConfig, run_allocate

    run_allocate(
        AllocateConfig.model_validate(config),
        Path(allocation.path),
        search=Path(state.path),
        overwrite=True,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preset_op(config: dict, allocation: Output[Artifact]):  # noqa: ANN201
    from pathlib import Path

    from guilomo.stages.allocate import AllocateConfig, run_allocate

    run_allocate(AllocateConfig.model_validate(config), Path(allocation.path), overwrite=True)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sft_op(  # noqa: ANN201
    config: dict, dataset: Input[Dataset], allocation: Input[Artifact], adapter: Output[Model]
):
    from pathlib import Path

    from guilomo.stages.allocate import read_allocation
    from guilomo.stages.sft import SftConfig, init_distributed, run_sft

    init_distributed()
    out = Path(adapter.path)
    run_sft(
        SftConfig.model_validate(config),
        dataset=Path(dataset.path),
        allocation=read_allocation(Path(allocation.path)),
        out=out,
        checkpoints=out.with_name(out.name + ".ckpt"),
        parents=[dataset.uri, allocation.uri],
        progress=False,
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_op(  # noqa: ANN201
    config: dict,
    dataset: Input[Dataset],
    adapter: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
):
    from pathlib import Path

    from guilomo.stages.evaluate import EvalConfig, run_evaluate

    result = run_evaluate(
        EvalConfig.model_validate(config),
        dataset=Path(dataset.path),
        out=Path(report.path),
        adapter=Path(adapter.path),
        parents=[dataset.uri, adapter.uri],
    )
    metrics.log_metric("accuracy", result["accuracy"])
    metrics.log_metric("total", result["total"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_base_op(  # noqa: ANN201
    config: dict, dataset: Input[Dataset], report: Output[Artifact], metrics: Output[Metrics]
):
    from pathlib import Path

    from guilomo.stages.evaluate import EvalConfig, run_evaluate

    result = run_evaluate(
        EvalConfig.model_validate(config),
        dataset=Path(dataset.path),
        out=Path(report.path),
        parents=[dataset.uri],
    )
    metrics.log_metric("accuracy", result["accuracy"])
    metrics.log_metric("total", result["total"])


COMPONENTS = {
    "preprocess": preprocess_op,
    "search": search_op,
    "allocate": allocate_op,
    "preset": preset_op,
    "sft": sft_op,
    "evaluate": evaluate_op,
    "evaluate-base": evaluate_base_op,
}


def _on_gpu(task: dsl.PipelineTask, name: str, gpus, node_selector, tolerations):  # noqa: ANN001
    task.set_display_name(name)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    task.set_caching_options(True)
    return task


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
):
    """use_preset: skip the search and train the preset in allocate_config (the MoLA
    baseline); evaluate_base: also evaluate the untuned base model (the baseline row)."""
    prep = preprocess_op(config=preprocess_config).set_display_name("preprocess")
    prep.set_caching_options(True)
    with dsl.If(use_preset == True, name="preset-allocation"):  # noqa: E712 (KFP condition)
        preset = preset_op(config=allocate_config).set_display_name("allocate (preset)")
        preset.set_caching_options(True)
    with dsl.Else(name="searched-allocation"):
        search = _on_gpu(
            search_op(config=search_config, dataset=prep.outputs["dataset"]),
            "search",
            gpu_count,
            gpu_node_selector,
            gpu_tolerations,
        )
        alloc = allocate_op(config=allocate_config, state=search.outputs["state"])
        alloc.set_display_name("allocate").set_caching_options(True)
    allocation = dsl.OneOf(preset.outputs["allocation"], alloc.outputs["allocation"])
    sft = _on_gpu(
        sft_op(config=sft_config, dataset=prep.outputs["dataset"], allocation=allocation),
        "sft",
        gpu_count,
        gpu_node_selector,
        gpu_tolerations,
    )
    _on_gpu(
        evaluate_op(
            config=evaluate_config, dataset=prep.outputs["dataset"], adapter=sft.outputs["adapter"]
        ),
        "evaluate",
        gpu_count,
        gpu_node_selector,
        gpu_tolerations,
    )
    with dsl.If(evaluate_base == True, name="baseline"):  # noqa: E712
        _on_gpu(
            evaluate_base_op(config=evaluate_config, dataset=prep.outputs["dataset"]),
            "evaluate (base)",
            gpu_count,
            gpu_node_selector,
            gpu_tolerations,
        )


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
