"""The pipeline's Kubeflow components.  Thin on purpose: each body imports the step function from ``components``
and calls it with a config built from the component's parameters (the training steps: one ``settings`` mapping,
built by the same loader as ``vilbert pretrain --config``), so the Kubeflow pipeline, ``dvc repro`` and the
``vilbert`` CLI run the same code.

Bodies run inside the project image (``IMAGE``) on a cluster, or in this Python environment under
``kfp.local.SubprocessRunner``; they may only use names imported inside the function (KFP ships the source).
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

#: The project image, pinned to this release (infra/docker/Dockerfile; CUDA variant for GPU steps).
IMAGE = "registry.example.com/vilbert-mlops:0.1.0"
GPU_IMAGE = "registry.example.com/vilbert-mlops:0.1.0-cuda"


def _component(image: str = IMAGE):
    # install_kfp_package=False: the image already holds kfp (pinned by the lock); nothing installs at run time
    return dsl.component(base_image=image, install_kfp_package=False)


@_component()
def ingest_op(source: str, data_version: str, dataset: Output[Dataset]) -> None:
    """Ingest ``source`` into a dataset root.  ``data_version`` (DVC hash / S3 ETag / the synthetic URI) is the
    cache key of this step: the same source with new data gets a new key."""
    from components.steps.ingest import IngestConfig, run_ingest

    result = run_ingest(IngestConfig(source=source, output=dataset.path, progress=False, workers=4))
    dataset.metadata.update({"source": source, "data_version": data_version, "images": result.images.stored,
                             "quarantined": result.images.quarantined})  # fmt: skip


@_component()
def validate_op(dataset: Input[Dataset], validation: Output[Dataset], report: Output[Markdown]) -> None:
    """Great Expectations suites over the dataset; rejected rows are quarantined with their reasons."""
    import shutil
    from pathlib import Path

    from components.steps.validate import ValidateConfig, run_validate

    result = run_validate(ValidateConfig(dataset=dataset.path, output=validation.path))
    summary = Path(validation.path) / "summary.md"
    if summary.exists():
        shutil.copyfile(summary, report.path)
    else:
        Path(report.path).write_text(f"validation passed: {result.passed}\n")
    validation.metadata.update({"passed": result.passed})
    if not result.passed:
        raise RuntimeError(f"validation failed: {result.failures}")


@_component()
def features_op(dataset: Input[Dataset], backend: str, demo_epochs: int, demo_train_images: int,
                features: Output[Dataset]) -> None:  # fmt: skip
    """Region features of every image (the demo detector, or Faster R-CNN with user weights)."""
    from dataclasses import replace

    from components.features.backends.demo import DemoOptions
    from components.steps.features import FeaturesConfig, run_features

    demo = replace(DemoOptions(), epochs=demo_epochs, train_images=demo_train_images)
    result = run_features(
        FeaturesConfig(dataset=dataset.path, output=features.path, backend=backend, demo=demo, progress=False)
    )
    features.metadata.update({"backend": backend, "images": result.stored_total, "quarantined": result.quarantined})


@_component()
def pretrain_op(
    dataset: Input[Dataset],
    validation: Input[Dataset],
    features: Input[Dataset],
    settings: str,
    launcher: str,
    experiment: str,
    pytorchjob_nodes: int,
    pytorchjob_gpus_per_node: int,
    model: Output[Model],
) -> None:
    """Pretraining: torchrun inside this step (``local``) or a Training Operator PyTorchJob (``pytorchjob``).
    ``settings``: PretrainConfig fields as JSON (params.yaml's model + pretrain sections), built by the CLI's
    loader."""
    import json

    from pipelines.launchers import pretrain_in_step, pretrain_with_pytorchjob

    options = json.loads(settings)
    if launcher == "pytorchjob":
        uris = {"dataset": dataset.uri, "validation": validation.uri, "features": features.uri}
        summary = pretrain_with_pytorchjob(options, uris, model.path, pytorchjob_nodes, pytorchjob_gpus_per_node,
                                           experiment)  # fmt: skip
    else:
        paths = {"dataset": dataset.path, "validation": validation.path, "features": features.path}
        summary = pretrain_in_step(options, paths, model.path, experiment)
    model.metadata.update(summary)


@_component()
def finetune_op(
    task: str,
    init: str,
    pretrained: Input[Model],
    dataset: Input[Dataset],
    validation: Input[Dataset],
    features: Input[Dataset],
    settings: str,
    experiment: str,
    model: Output[Model],
    blind: bool = False,
) -> None:
    """Fine-tune on one task from the pretrained model (``init="pretrained"``) or from scratch (``blind``: the
    task's blind baseline, from scratch without the image).  ``settings``: FinetuneConfig fields as JSON
    (params.yaml's model + finetune sections), built by the CLI's loader."""
    import json

    from components.steps.finetune import run_finetune
    from pipelines.launchers import finetune_config

    paths = {"dataset": dataset.path, "validation": validation.path, "features": features.path,
             "pretrained": pretrained.path}  # fmt: skip
    result = run_finetune(finetune_config(json.loads(settings), paths, task, init, blind, model.path, experiment))
    model.metadata.update({"task": task, "init": init, "blind": blind, "steps": result.steps, "loss": result.final_loss,
                           "mlflow_run": result.tracking_run_id or ""})  # fmt: skip


@_component()
def evaluate_op(
    model: Input[Model],
    dataset: Input[Dataset],
    validation: Input[Dataset],
    features: Input[Dataset],
    zero_shot: bool,
    settings: str,
    experiment: str,
    evaluation: Output[Dataset],
    metrics: Output[Metrics],
    pictures: Output[HTML],
) -> None:
    """The task's official metrics, per-example predictions and pictures of a fine-tuned (or, zero-shot, the
    pretrained) model.  ``settings``: EvaluateConfig fields as JSON (params.yaml's evaluate section)."""
    import json

    from components.evaluation import mlflow_metric_name
    from components.steps.evaluate import run_evaluate
    from pipelines.launchers import evaluate_config, pictures_page

    paths = {"model": model.path, "output": evaluation.path, "dataset": dataset.path, "validation": validation.path,
             "features": features.path}  # fmt: skip
    result = run_evaluate(evaluate_config(json.loads(settings), paths, zero_shot, experiment))
    for name, value in result.metrics.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(mlflow_metric_name(name), float(value))  # recall@1 -> recall_at_1
    evaluation.metadata.update({"task": result.task, "metric": result.metric, "value": result.value})
    pictures_page(evaluation.path, pictures.path)


@_component()
def table_op(
    pretrained: Input[list[Dataset]],
    scratch: Input[list[Dataset]],
    zero_shot: Input[Dataset],
    blind: Input[list[Dataset]],
    experiment: str,
    table: Output[Markdown],
    summary: Output[Metrics],
) -> None:
    """The paper's table: pretrained vs. no multimodal pretraining vs. zero-shot, and the blind baselines, per task."""
    import shutil
    import tempfile
    from pathlib import Path

    from components.steps.common import TrackingOptions
    from components.steps.table import TableConfig, run_table

    folders = tuple(a.path for a in [*pretrained, *scratch, zero_shot, *blind])
    out = Path(tempfile.mkdtemp())
    result = run_table(
        TableConfig(evaluations=folders, output=str(out), tracking=TrackingOptions(experiment=experiment))
    )
    shutil.copyfile(out / "table.md", table.path)
    for task, gain in result.gains.items():
        summary.log_metric(f"{task}.gain", gain)


@_component()
def register_op(
    finetuned: Input[Model],
    evaluation: Input[Dataset],
    features: Input[Dataset],
    experiment: str,
    registration: Output[Dataset],
) -> None:
    """Log the fine-tuned model as an MLflow pyfunc, register a version, and gate the ``challenger`` alias."""
    import json
    from pathlib import Path

    from components.steps.register import RegisterConfig, register_model

    result = register_model(
        RegisterConfig(model=finetuned.path, evaluation=evaluation.path, features=features.path, experiment=experiment)
    )
    info = {k: v for k, v in vars(result).items() if isinstance(v, (str, int, float, bool, type(None)))}
    Path(registration.path).write_text(json.dumps(info, indent=2))
    registration.metadata.update(info)
