"""Evaluation building blocks: predictions (:func:`predict`), the benchmarks' metrics on them (:func:`score`) and
the pictures.  The evaluate step (``components/steps/evaluate.py``) wires them to files and tracking; the fine-tuning
step calls :func:`predict` and :func:`score` for its validation metric (both are side-effect free)::

    predictions = predict(model, "vqa", val_dataset, batch_size=64)
    metrics = score("vqa", predictions)          # {"vqa_accuracy": 61.3, ...}, percent
    value = metrics[HEADLINE["vqa"]]
"""

from components.evaluation.predict import Predictions, chosen_regions, predict
from components.evaluation.scoring import HEADLINE, mlflow_metric_name, score, score_details

__all__ = ["HEADLINE", "Predictions", "chosen_regions", "mlflow_metric_name", "predict", "score", "score_details"]
