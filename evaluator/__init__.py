"""Metrics, the evaluation loop, prediction, reports and visualisations. Defines no model layers."""

from .evaluate import evaluate, run_inference, write_reports
from .loading import load_model
from .metrics import (METRIC_KEYS, all_metrics, aupro, aupro_200, average_precision, f1_max, image_auroc, pixel_ap, pixel_metrics,
                      pixel_auroc, pixel_f1_max, ranking_metrics)
from .predict import predict

__all__ = ["METRIC_KEYS", "all_metrics", "aupro", "aupro_200", "average_precision", "evaluate", "f1_max", "image_auroc",
           "load_model", "pixel_ap", "pixel_auroc", "pixel_f1_max", "pixel_metrics", "predict", "ranking_metrics", "run_inference",
           "write_reports"]
