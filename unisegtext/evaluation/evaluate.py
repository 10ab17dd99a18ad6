"""Evaluate a folder (or file) of predictions against references: the engine behind
`unisegtext eval`."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unisegtext.errors import DataError
from unisegtext.evaluation.calibration import (
    DEFAULT_BINS,
    CalibrationStats,
    calibration_stats,
    roi_around,
)
from unisegtext.evaluation.inputs import (
    CaseMasks,
    CaseSource,
    LabelMap,
    discover_cases,
    find_probabilities,
    load_probability,
    normalise_name,
    read_label_map,
    single_case,
    spacing_of,
)
from unisegtext.evaluation.metrics import evaluate_case
from unisegtext.evaluation.report import EvaluationReport

logger = logging.getLogger(__name__)

LabelsArg = str | os.PathLike | Mapping[Any, Any] | None


def _label_map(value: LabelsArg, key: str | None) -> LabelMap | None:
    return None if value is None else read_label_map(value, key=key)


def pair_cases(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    pred_labels: LabelMap | None = None,
    ref_labels: LabelMap | None = None,
    labels_key: str | None = None,
    allow_missing: bool = False,
) -> tuple[list[tuple[CaseSource, CaseSource]], bool]:
    """Match prediction and reference cases by name.

    Returns:
        (pairs of (prediction, reference) case sources, whether this is a single-case run).

    Raises:
        DataError: a reference case has no prediction (unless `allow_missing`), or no case
            name matches at all.
    """
    pred_path, ref_path = Path(pred).expanduser(), Path(ref).expanduser()
    if not ref_path.exists():
        raise DataError(f"reference {ref_path} does not exist")
    if not pred_path.exists():
        raise DataError(f"prediction {pred_path} does not exist")
    if ref_path.is_file():
        ref_case = single_case(ref_path, labels=ref_labels, labels_key=labels_key)
        if pred_path.is_file():
            return [
                (
                    single_case(
                        pred_path, name=ref_case.name, labels=pred_labels, labels_key=labels_key
                    ),
                    ref_case,
                )
            ], True
        candidates = [
            pred_path / ref_case.name,
            *(pred_path / f"{ref_case.name}{s}" for s in (".nii.gz", ".nii")),
        ]
        for candidate in candidates:
            if candidate.exists():
                return [
                    (
                        single_case(
                            candidate, name=ref_case.name, labels=pred_labels, labels_key=labels_key
                        ),
                        ref_case,
                    )
                ], True
        # the folder itself is the case folder (what `unisegtext segment -o DIR` writes)
        return [
            (
                single_case(
                    pred_path, name=ref_case.name, labels=pred_labels, labels_key=labels_key
                ),
                ref_case,
            )
        ], True

    refs = discover_cases(ref_path, labels=ref_labels, labels_key=labels_key)
    if pred_path.is_file():
        raise DataError(
            f"--pred {pred_path} is a file but --ref {ref_path} a folder; pass a prediction folder "
            "with one entry per reference case, or a single reference file"
        )
    preds = discover_cases(pred_path, labels=pred_labels, labels_key=labels_key)
    missing = [name for name in refs if name not in preds]
    extra = [name for name in preds if name not in refs]
    if len(missing) == len(refs):
        raise DataError(
            f"no prediction in {pred_path} matches a reference case in {ref_path}: references "
            f"{_few(refs)}, predictions {_few(preds)}; case names (file stems / folder names) must match"
        )
    if missing and not allow_missing:
        raise DataError(
            f"{len(missing)} reference case(s) have no prediction in {pred_path}: {_few(missing)}; "
            "add them, or pass --allow-missing to evaluate only the cases that exist"
        )
    if missing:
        logger.warning(
            "%d reference case(s) without a prediction, skipped: %s", len(missing), _few(missing)
        )
    if extra:
        logger.warning(
            "%d predicted case(s) without a reference, skipped: %s", len(extra), _few(extra)
        )
    return [(preds[name], refs[name]) for name in refs if name in preds], False


def _few(names: Sequence[str] | Mapping[str, Any], n: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def evaluate_folders(
    pred: str | os.PathLike,
    ref: str | os.PathLike,
    *,
    labels: LabelsArg = None,
    pred_labels: LabelsArg = None,
    ref_labels: LabelsArg = None,
    labels_key: str | None = None,
    prob: str | os.PathLike | None = None,
    tolerance_mm: float | Mapping[str, float] = 2.0,
    dataset: str | None = None,
    classes: Sequence[str] | None = None,
    n_bins: int = DEFAULT_BINS,
    calibration_margin_mm: float | None = None,
    allow_missing: bool = False,
    grid_tolerance_mm: float = 1e-2,
) -> EvaluationReport:
    """Evaluate predictions against references, case by case and class by class.

    Args:
        pred: a folder of predicted cases, or one case (multilabel NIfTI or case folder).
        ref: a folder of reference cases, or one reference file (then `pred` is that case's
            prediction: a file, a folder holding ``<case>.nii.gz`` / ``<case>/``, or the case
            folder itself).
        labels: label map for multilabel files on both sides (JSON path or dict, e.g.
            ``{"1": "liver"}``); `pred_labels` / `ref_labels` override it per side. Without
            one, a ``labels.json`` next to the file is used.
        labels_key: which map of a file holding several (``classes.json`` -> "total").
        prob: folder of probability maps for calibration (see :func:`find_probabilities`).
        tolerance_mm: NSD tolerance in mm (one value, or one per class name).
        dataset: dataset name for the rows (default: the reference folder's name, or for a
            single reference file, its folder's name).
        classes: evaluate only these class names (normalised like file names).
        n_bins: calibration bins.
        calibration_margin_mm: score calibration only in the bounding box of reference OR
            p >= 0.5 grown by this margin (default: all voxels).
        allow_missing: skip reference cases without a prediction instead of failing.
        grid_tolerance_mm: largest affine difference accepted between prediction and reference.

    Returns:
        An :class:`EvaluationReport` (rows, summaries, writers).

    Raises:
        DataError: inputs missing or unmatched; VolumeError: grids differ.
    """
    ref_path = Path(ref).expanduser()
    shared = _label_map(labels, labels_key)
    pred_map = _label_map(pred_labels, labels_key) or shared
    ref_map = _label_map(ref_labels, labels_key) or shared
    pairs, single = pair_cases(
        pred,
        ref,
        pred_labels=pred_map,
        ref_labels=ref_map,
        labels_key=labels_key,
        allow_missing=allow_missing,
    )
    if dataset is None:
        dataset = ref_path.parent.name if ref_path.is_file() else ref_path.name
    wanted = [normalise_name(c) for c in classes] if classes else None
    if isinstance(tolerance_mm, Mapping):
        tolerance_mm = {normalise_name(k): float(v) for k, v in tolerance_mm.items()}

    report = EvaluationReport(
        settings={
            "pred": str(pred),
            "ref": str(ref),
            "prob": str(prob) if prob else None,
            "dataset": dataset,
            "tolerance_mm": tolerance_mm
            if not isinstance(tolerance_mm, Mapping)
            else dict(tolerance_mm),
            "n_bins": n_bins,
            "calibration_margin_mm": calibration_margin_mm,
            "grid_tolerance_mm": grid_tolerance_mm,
        }
    )
    for pred_case, ref_case in pairs:
        ref_masks = CaseMasks(ref_case, grid_tolerance_mm=grid_tolerance_mm)
        ref_img = ref_masks.image
        ref_file = (
            ref_case.path
            if ref_case.kind == "multilabel"
            else next(iter(ref_case.class_files.values()))
        )
        pred_masks = CaseMasks(
            pred_case, ref_img, ref_path=ref_file, grid_tolerance_mm=grid_tolerance_mm
        )
        spacing = spacing_of(ref_img)
        names = None
        if wanted is not None:
            names = [c for c in wanted if c in pred_masks and c in ref_masks]
            absent = [c for c in wanted if c not in names]
            if absent:
                logger.warning(
                    "case %s: class(es) %s not named on both sides, skipped",
                    ref_case.name,
                    ", ".join(absent),
                )
        tolerance = tolerance_mm
        if isinstance(tolerance, Mapping):
            needed = names if names is not None else [n for n in ref_masks if n in pred_masks]
            unknown = [n for n in needed if n not in tolerance]
            if unknown:
                raise DataError(
                    f"no NSD tolerance given for class(es) {unknown}; add them to tolerance_mm"
                )
        rows = evaluate_case(
            pred_masks,
            ref_masks,
            spacing,
            tolerance,
            case=ref_case.name,
            dataset=dataset,
            classes=names,
        )
        logger.info("%s/%s: %d classes", dataset, ref_case.name, len(rows))
        if prob is not None:
            _add_calibration(
                report,
                rows,
                prob,
                ref_case.name,
                ref_masks,
                ref_img,
                ref_file,
                spacing,
                single=single,
                n_bins=n_bins,
                margin_mm=calibration_margin_mm,
                grid_tolerance_mm=grid_tolerance_mm,
            )
        report.rows.extend(rows)
    return report


def _add_calibration(
    report: EvaluationReport,
    rows: list,
    prob: str | os.PathLike,
    case: str,
    ref_masks: CaseMasks,
    ref_img: Any,
    ref_file: Path,
    spacing: Sequence[float],
    *,
    single: bool,
    n_bins: int,
    margin_mm: float | None,
    grid_tolerance_mm: float,
) -> None:
    source = find_probabilities(prob, case, single=single)
    if source is None:
        logger.warning("case %s: no probability maps under %s", case, prob)
        return
    available = set(source.names())
    without = []
    for row in rows:
        if row.class_name not in available:
            without.append(row.class_name)
            continue
        probabilities = load_probability(
            source, row.class_name, ref_img, ref_path=ref_file, grid_tolerance_mm=grid_tolerance_mm
        )
        reference = ref_masks[row.class_name]
        roi = (
            None if margin_mm is None else roi_around(reference, probabilities, margin_mm, spacing)
        )
        stats: CalibrationStats = calibration_stats(probabilities, reference, n_bins, roi=roi)
        row.ece, row.brier = stats.ece, stats.brier
        key = (row.dataset, row.class_name)
        report.calibration[key] = (
            report.calibration[key] + stats if key in report.calibration else stats
        )
    if without:
        logger.warning("case %s: no probability map for %s", case, ", ".join(without))
