"""Evaluation of segmentations: Dice, normalised surface Dice, HD95, volume errors, calibration.

    >>> from unisegtext.evaluation import evaluate_folders
    >>> report = evaluate_folders("preds/", "labelsTs/", labels="labels.json", tolerance_mm=2.0)
    >>> report.save("eval_out/")          # results.csv, summary.md, results.json
    >>> print(report.to_markdown())

Metric functions work on numpy boolean masks and a voxel size in mm (:mod:`.metrics`); how
empty structures count is defined in the :mod:`.metrics` docstring. torch and MONAI are
imported only when a metric is computed.
"""

from __future__ import annotations

from unisegtext.evaluation.calibration import (
    CalibrationStats,
    brier_score,
    calibration_stats,
    expected_calibration_error,
    plot_reliability_diagram,
)
from unisegtext.evaluation.evaluate import evaluate_folders, pair_cases
from unisegtext.evaluation.inputs import normalise_name, read_label_map
from unisegtext.evaluation.metrics import (
    CaseClassMetrics,
    dice,
    evaluate_case,
    evaluate_masks,
    hd95,
    nsd,
    volume_errors,
    volume_ml,
)
from unisegtext.evaluation.report import EvaluationReport, paired_vs_reference

__all__ = [
    "CalibrationStats",
    "CaseClassMetrics",
    "EvaluationReport",
    "brier_score",
    "calibration_stats",
    "dice",
    "evaluate_case",
    "evaluate_folders",
    "evaluate_masks",
    "expected_calibration_error",
    "hd95",
    "normalise_name",
    "nsd",
    "paired_vs_reference",
    "pair_cases",
    "plot_reliability_diagram",
    "read_label_map",
    "volume_errors",
    "volume_ml",
]
