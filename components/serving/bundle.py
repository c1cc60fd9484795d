"""What a registered model carries besides the checkpoint: the feature extractor, the serving settings, the MLflow
signature and input example, the models-from-code entry file, and the pinned requirements.

The extractor folder (artifact ``extractor``)::

    extractor.json   the feature store's extractor.json, with ``prepared.weights_uri`` relative to this folder
    spec.json        the store's feature spec (what the model was trained on)
    weights/         the extractor weights: the demo detector folder, or the detector's state-dict file

A ``detector`` (Faster R-CNN) store's user-supplied weights are copied in as well: serving never fetches them.
"""

from __future__ import annotations

import base64
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from components.data.tasks import TASKS
from components.serving.predictor import NUM_CHOICES, ServingInputError

WEIGHTS_DIR = "weights"
SPEC_FILE = "spec.json"
#: The models-from-code entry: MLflow runs it to get the python model (no pickle anywhere).
MODEL_CODE = '''"""MLflow models-from-code entry of a registered ViLBERT model (written by the register step)."""

import mlflow

from components.serving.predictor import pyfunc_model

mlflow.models.set_model(pyfunc_model())
'''
#: Distributions the serving code imports (pinned to the installed versions in the model's requirements.txt).
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "transformers", "tokenizers", "safetensors", "numpy",
                    "pandas", "pillow", "pyarrow", "boto3", "scipy")  # fmt: skip
EXAMPLE_CHOICES = ["the circle", "the square", "the triangle", "nothing"]


class BundleError(ValueError):
    """The model cannot be bundled for serving (no extractor description, missing or changed weights)."""


def stage_extractor(store: str, target: Path) -> dict[str, Any]:
    """Copy the extractor that made ``store``'s features into ``target`` (layout in the module docstring).

    Returns the store's feature spec (dict).  Works for local and ``s3://`` stores and weights."""
    from components import storage
    from components.features.backends import EXTRACTOR_FILE

    try:
        described = json.loads(storage.read_bytes(storage.join(store, EXTRACTOR_FILE)))
        spec = json.loads(storage.read_bytes(storage.join(store, SPEC_FILE)))
    except FileNotFoundError as exc:
        raise BundleError(
            f"feature store {store} has no {EXTRACTOR_FILE} or {SPEC_FILE} ({exc}): serving needs the extractor that "
            "made the features; imported features cannot be served from images (extract with `vilbert features`)"
        ) from None
    prepared = dict(described["prepared"])
    source = str(prepared["weights_uri"])
    target.mkdir(parents=True, exist_ok=True)
    weights = target / WEIGHTS_DIR
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if storage.is_s3(source):
        is_file = storage.exists(source)  # one object (a state-dict file), else a folder (the demo detector)
        if is_file:
            storage.download_file(source, weights / name)
        else:
            storage.sync_down(source, weights)
            (weights / storage.SYNC_STATE_FILE).unlink(missing_ok=True)  # the sync's bookkeeping, not a weight
    elif Path(source).is_dir():
        is_file = False
        shutil.copytree(source, weights)
    elif Path(source).is_file():
        is_file = True
        weights.mkdir()
        shutil.copy2(source, weights / name)
    else:
        raise BundleError(f"extractor weights {source} (named in {store}/{EXTRACTOR_FILE}) do not exist")
    if not any(p.is_file() for p in weights.rglob("*")):
        raise BundleError(f"extractor weights {source} hold no files")
    # Relative to the folder; each backend's load() checks the weights' sha256 against the spec's itself.
    prepared["weights_uri"] = f"{WEIGHTS_DIR}/{name}" if is_file else WEIGHTS_DIR
    (target / EXTRACTOR_FILE).write_text(json.dumps({**described, "prepared": prepared}, indent=2) + "\n")
    (target / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    return spec


def load_bundled_extractor(folder: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(extractor, FeatureSpec)`` from a staged extractor folder: the backend's own ``load`` (as
    ``components.features.backends.open_extractor``), with the weights found inside the folder."""
    from components.features.backends import BACKENDS, EXTRACTOR_FILE, BoxLimits, PreparedBackend
    from components.features.spec import FeatureSpec

    folder = Path(folder)
    described = json.loads((folder / EXTRACTOR_FILE).read_text())
    prepared = PreparedBackend(
        **{**described["prepared"], "weights_uri": str(folder / described["prepared"]["weights_uri"])}
    )
    if prepared.backend not in BACKENDS:
        raise BundleError(f"unknown extractor backend {prepared.backend!r}")
    extractor = BACKENDS[prepared.backend].load(prepared, BoxLimits(**described["limits"]), device)
    return extractor, FeatureSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))


def example_image() -> bytes:
    """A small real PNG for the input example: image 0 of a synthetic world (64 x 64 pixels)."""
    from components.sources.synthetic import SyntheticConfig, generate_image

    return generate_image(SyntheticConfig(n=24, size=64), 0).png


def example_frame(task: str, image: bytes | None = None) -> pd.DataFrame:
    """The input example of ``task``: one row with a base64 image and the task's text (and choices)."""
    if task not in TASKS:
        raise ServingInputError(f"unknown task {task!r}")
    serving = TASKS[task].serving
    row: dict[str, Any] = {"image": base64.b64encode(image or example_image()).decode(), "text": serving.example_text}
    if serving.choices:
        row["choices"] = list(EXAMPLE_CHOICES[:NUM_CHOICES])
    return pd.DataFrame([row])


def signature(task: str) -> Any:
    """The MLflow ModelSignature of ``task``'s registered model (inputs enforced, outputs documented)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    serving = TASKS[task].serving

    def column(name: str, kind: str) -> Any:  # "double[]": an array of doubles
        return ColSpec(Array(kind.removesuffix("[]")), name) if kind.endswith("[]") else ColSpec(kind, name)

    inputs: list[Any] = [ColSpec("string", "image"), ColSpec("string", "text")]
    if serving.choices:
        inputs.append(column("choices", "string[]"))
    outputs = [column(name, kind) for name, kind in serving.outputs]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def pinned_requirements() -> list[str]:
    """``name==version`` of the installed :data:`SERVING_PACKAGES` (those not installed are left out)."""
    pins = []
    for name in SERVING_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def code_paths() -> list[str]:
    """The project packages a registered model carries (``model/`` and ``components/``): a clean process imports
    them from the model's ``code/`` folder, so a version always runs the code it was registered with."""
    import model.checkpoint

    # From module files: a stale editable install can make ``components`` a namespace package (no __file__).
    return [str(Path(model.checkpoint.__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
