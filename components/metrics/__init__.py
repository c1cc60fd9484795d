"""The benchmarks' official metrics (pure functions on plain Python / numpy / torch inputs) and the pictures of
the evaluate step.

- :mod:`components.metrics.vqa`: VQA accuracy exactly as the official ``vqaEval.py``.
- :mod:`components.metrics.vcr`: VCR Q->A, QA->R and Q->AR accuracy as ViLBERT's evaluation script.
- :mod:`components.metrics.grounding`: RefCOCO+ accuracy, IoU > 0.5 with ViLBERT's inclusive-pixel IoU.
- :mod:`components.metrics.retrieval`: R@1/5/10 and median rank, caption->image and image->caption.
- :mod:`components.metrics.pictures`: PNG pictures (imported on its own: it pulls in matplotlib lazily).

All accuracies and recalls are fractions in [0, 1], and so is the ``chance`` each summary reports (the score
of uniformly random answers / choices / rankings; each module's docstring defines it for its task).  Each
module names the original file and commit it follows; tests/data/metrics/ holds cases the original code
scored, and tests/components/test_metrics_official.py checks them all.
"""

from components.metrics.grounding import IOU_THRESHOLD, box_iou, grounding_scores, is_correct, xywh_to_xyxy
from components.metrics.retrieval import (
    image_retrieval_ranks,
    recall_summary,
    retrieval_scores,
    text_retrieval_ranks,
)
from components.metrics.vcr import vcr_accuracy, vcr_predictions, vcr_q2ar_scores, vcr_scores
from components.metrics.vqa import normalize_answer, process_punctuation, vqa_accuracy, vqa_scores

__all__ = [
    "IOU_THRESHOLD",
    "box_iou",
    "grounding_scores",
    "image_retrieval_ranks",
    "is_correct",
    "normalize_answer",
    "process_punctuation",
    "recall_summary",
    "retrieval_scores",
    "text_retrieval_ranks",
    "vcr_accuracy",
    "vcr_predictions",
    "vcr_q2ar_scores",
    "vcr_scores",
    "vqa_accuracy",
    "vqa_scores",
    "xywh_to_xyxy",
]
