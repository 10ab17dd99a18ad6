"""Aggregation of per-case rows and the result files (results.csv, summary.md, results.json).

Aggregation rules:

* per class: mean, median, standard deviation (population, ddof=0) and n over the cases
  where the class was counted (status other than "both_empty"); a missed or false-positive
  structure counts with Dice 0 and NSD 0. HD95 is summarised over finite values only (the
  cases where both masks exist); ``n_inf`` says how many were left out. Relative volume error
  is summarised over cases whose reference is not empty.
* per dataset and overall: the mean over classes of the per-class means (each class weighs
  the same, however many cases hold it).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.evaluation.calibration import CalibrationStats, plot_reliability_diagram
from unisegtext.evaluation.metrics import METRIC_FIELDS, STATUSES, CaseClassMetrics
from unisegtext.jsonsafe import json_safe as _json_safe

logger = logging.getLogger(__name__)

ALL = "all"  # the dataset / class key of pooled summaries


def summarise_values(values: Iterable[float]) -> dict[str, float | int]:
    """mean, median, std (ddof=0), min, max and n over the finite values; n_inf counts infinities."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    finite = array[np.isfinite(array)]
    out: dict[str, float | int] = {"n": int(finite.size), "n_inf": int(array.size - finite.size)}
    if finite.size:
        out.update(
            mean=float(finite.mean()),
            median=float(np.median(finite)),
            std=float(finite.std()),
            min=float(finite.min()),
            max=float(finite.max()),
        )
    else:
        out.update(mean=math.nan, median=math.nan, std=math.nan, min=math.nan, max=math.nan)
    return out


def summarise_class(rows: Sequence[CaseClassMetrics]) -> dict[str, Any]:
    """Summary of one class over cases (see the module docstring)."""
    counted = [r for r in rows if r.counted]
    status_counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    out: dict[str, Any] = {
        "n_cases": len(rows),
        "n_counted": len(counted),
        **{f"n_{s}": n for s, n in status_counts.items()},
    }
    for name in METRIC_FIELDS:
        out[name] = summarise_values(getattr(r, name) for r in counted)
    out["false_positive_volume_ml_absent"] = float(
        sum(r.pred_volume_ml for r in rows if r.status == "false_positive")
    )
    return out


def mean_over_classes(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over classes of the per-class means, per metric, with the number of classes used."""
    out: dict[str, Any] = {"n_classes": len(per_class)}
    for name in METRIC_FIELDS:
        means = [c[name]["mean"] for c in per_class.values() if c[name]["n"] > 0]
        out[name] = {"mean": float(np.mean(means)) if means else math.nan, "n_classes": len(means)}
    for status in STATUSES:
        out[f"n_{status}"] = int(sum(c[f"n_{status}"] for c in per_class.values()))
    return out


@dataclass
class EvaluationReport:
    """Rows of one or more evaluations, their summaries and calibration data.

    Attributes:
        rows: one :class:`CaseClassMetrics` per case and class.
        calibration: (dataset, class name) -> pooled :class:`CalibrationStats` over cases.
        settings: the options used (tolerance, bins, inputs), copied into results.json.
    """

    rows: list[CaseClassMetrics] = field(default_factory=list)
    calibration: dict[tuple[str, str], CalibrationStats] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: EvaluationReport) -> EvaluationReport:
        calibration = dict(self.calibration)
        for key, stats in other.calibration.items():
            calibration[key] = calibration[key] + stats if key in calibration else stats
        settings = dict(self.settings)
        for key, value in other.settings.items():
            if key in ("pred", "ref", "prob", "dataset"):
                settings[key] = [*_as_list(settings.get(key)), *_as_list(value)]
            else:
                settings.setdefault(key, value)
        return EvaluationReport([*self.rows, *other.rows], calibration, settings)

    # ------------------------------------------------------------------ summaries
    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.rows))

    @property
    def classes(self) -> list[str]:
        return list(dict.fromkeys(r.class_name for r in self.rows))

    def per_class(self, dataset: str | None = None) -> dict[str, dict[str, Any]]:
        """class name -> summary over cases (of one dataset, or of all)."""
        groups: dict[str, list[CaseClassMetrics]] = defaultdict(list)
        for row in self.rows:
            if dataset is None or row.dataset == dataset:
                groups[row.class_name].append(row)
        return {name: summarise_class(rows) for name, rows in groups.items()}

    def per_dataset(self) -> dict[str, dict[str, Any]]:
        """dataset -> {"n_cases", "classes": per-class summaries, "mean_over_classes": ...}."""
        out = {}
        for dataset in self.datasets:
            per_class = self.per_class(dataset)
            out[dataset] = {
                "n_cases": len({r.case for r in self.rows if r.dataset == dataset}),
                "classes": per_class,
                "mean_over_classes": mean_over_classes(per_class),
            }
        return out

    def overall(self) -> dict[str, Any]:
        """Mean over classes of the per-class means over all datasets."""
        return {
            "n_cases": len({(r.dataset, r.case) for r in self.rows}),
            **mean_over_classes(self.per_class()),
        }

    def calibration_summary(self) -> dict[str, dict[str, Any]]:
        """class name (or "all", pooled over classes) -> ECE, Brier and curve, over all datasets."""
        by_class: dict[str, CalibrationStats] = {}
        for (_dataset, name), stats in self.calibration.items():
            by_class[name] = by_class[name] + stats if name in by_class else stats
        out = {name: stats.to_dict() for name, stats in by_class.items()}
        if by_class:
            pooled = None
            for stats in by_class.values():
                pooled = stats if pooled is None else pooled + stats
            out[ALL] = pooled.to_dict()  # type: ignore[union-attr]
        return out

    def pooled_calibration(self, class_name: str | None = None) -> CalibrationStats | None:
        pooled = None
        for (_dataset, name), stats in self.calibration.items():
            if class_name is None or name == class_name:
                pooled = stats if pooled is None else pooled + stats
        return pooled

    # ------------------------------------------------------------------ outputs
    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able data; NaN and inf become null (the row's status says why)."""
        return _json_safe(
            {
                "settings": self.settings,
                "rules": {
                    "both_empty": "structure absent in reference and prediction: Dice/NSD/HD95 null, not counted in means",
                    "missed": "reference non-empty, prediction empty: Dice 0, NSD 0, HD95 infinite (null here, excluded from HD95 means)",
                    "false_positive": "reference empty, prediction non-empty: Dice 0, NSD 0, HD95 infinite; fp_volume_ml is the predicted volume",
                    "aggregation": "per class over counted cases; per dataset and overall as the mean over classes of class means",
                },
                "overall": self.overall(),
                "per_class": self.per_class(),
                "per_dataset": self.per_dataset(),
                "calibration": self.calibration_summary(),
                "cases": [r.to_dict() for r in self.rows],
            }
        )

    def to_markdown(self) -> str:
        """The summary tables (per class, per dataset, overall, calibration) as Markdown."""
        tolerance = self.settings.get("tolerance_mm", "?")
        lines = [
            f"# Evaluation ({len({(r.dataset, r.case) for r in self.rows})} cases, "
            f"{len(self.classes)} classes, NSD tolerance {tolerance} mm)",
            "",
        ]
        lines += [
            "Mean ± std (median) over cases; HD95 over cases where both masks exist. "
            "Structures absent on both sides are not counted.",
            "",
        ]
        lines += ["## Per class", "", *_class_table(self.per_class(), tolerance), ""]
        lines += ["## Per dataset (mean over classes)", ""]
        header = [
            "dataset",
            "cases",
            "classes",
            "Dice",
            f"NSD@{tolerance}mm",
            "HD95 mm",
            "abs ΔV mL",
            "abs ΔV/V %",
            "missed",
            "false pos.",
            "both empty",
        ]
        lines += [_row(header), _row(["---"] * len(header))]
        for dataset, info in self.per_dataset().items():
            lines.append(_row([dataset, info["n_cases"], *_mean_cells(info["mean_over_classes"])]))
        overall = self.overall()
        lines.append(_row(["**overall**", overall["n_cases"], *_mean_cells(overall)]))
        calibration = self.calibration_summary()
        if calibration:
            lines += [
                "",
                f"## Calibration (voxel-wise, {next(iter(calibration.values()))['n_bins']} bins)",
                "",
                _row(["class", "voxels", "ECE", "Brier"]),
                _row(["---"] * 4),
            ]
            for name, info in calibration.items():
                label = "**all classes pooled**" if name == ALL else name
                lines.append(
                    _row(
                        [
                            label,
                            f"{info['n_voxels']:,}",
                            _fmt(info["ece"], 4),
                            _fmt(info["brier"], 4),
                        ]
                    )
                )
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | os.PathLike, *, plots: bool = True) -> list[Path]:
        """Write results.csv, summary.md, results.json (and reliability diagrams) to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = [write_csv(self.rows, out / "results.csv")]
        (out / "summary.md").write_text(self.to_markdown())
        written.append(out / "summary.md")
        (out / "results.json").write_text(
            json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        )
        written.append(out / "results.json")
        if plots and self.calibration:
            pooled = self.pooled_calibration()
            if pooled is not None:
                written.append(
                    plot_reliability_diagram(
                        pooled, out / "reliability.png", title="All classes pooled"
                    )
                )
            for name in dict.fromkeys(n for _d, n in self.calibration):
                stats = self.pooled_calibration(name)
                if stats is not None:
                    written.append(
                        plot_reliability_diagram(
                            stats, out / "reliability" / f"{name}.png", title=name
                        )
                    )
        logger.info("wrote %s", ", ".join(str(p) for p in written))
        return written


CSV_COLUMNS = [
    "dataset",
    "case",
    "class_name",
    "status",
    "dice",
    "nsd",
    "hd95_mm",
    "tolerance_mm",
    "ref_volume_ml",
    "pred_volume_ml",
    "volume_error_ml",
    "abs_volume_error_ml",
    "relative_volume_error",
    "abs_relative_volume_error",
    "fp_volume_ml",
    "fn_volume_ml",
    "ece",
    "brier",
]


def paired_vs_reference(reference: list[dict], other: list[dict]) -> dict:
    """Per-case comparison of two runs' Dice (lists of {"case", "dice"}, paired by case): cases
    where `other` is higher, and the mean paired difference."""
    ref = {c["case"]: c["dice"] for c in reference}
    diffs = [c["dice"] - ref[c["case"]] for c in other]
    return {"cases": len(diffs), "better": sum(d > 0 for d in diffs), "mean_dice_difference": sum(diffs) / len(diffs)}


def write_csv(rows: Sequence[CaseClassMetrics], path: str | os.PathLike) -> Path:
    """One line per case and class; NaN is written as an empty cell, inf as "inf"."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            values = row.to_dict()
            writer.writerow({k: _csv_cell(values.get(k)) for k in CSV_COLUMNS})
    return path


# --------------------------------------------------------------------------- formatting helpers
def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return value




def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _stat_cell(stats: Mapping[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if stats["n"] == 0:
        return "–"
    return (
        f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f} "
        f"({stats['median'] * scale:.{digits}f})"
    )


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _class_table(per_class: Mapping[str, Mapping[str, Any]], tolerance: Any) -> list[str]:
    header = [
        "class",
        "n",
        "Dice",
        f"NSD@{tolerance}mm",
        "HD95 mm",
        "abs ΔV mL",
        "abs ΔV/V %",
        "missed",
        "false pos. (mL)",
        "both empty",
    ]
    lines = [_row(header), _row(["---"] * len(header))]
    absent = [name for name, s in per_class.items() if s["n_counted"] == 0]
    for name, s in per_class.items():
        if s["n_counted"] == 0:
            continue
        hd = _stat_cell(s["hd95_mm"], 2)
        if s["hd95_mm"]["n_inf"]:
            hd += f" [{s['hd95_mm']['n_inf']} inf]"
        fp = f"{s['n_false_positive']}" + (
            f" ({s['false_positive_volume_ml_absent']:.2f})" if s["n_false_positive"] else ""
        )
        lines.append(
            _row(
                [
                    name,
                    s["n_counted"],
                    _stat_cell(s["dice"]),
                    _stat_cell(s["nsd"]),
                    hd,
                    _stat_cell(s["abs_volume_error_ml"], 2),
                    _stat_cell(s["abs_relative_volume_error"], 1, 100.0),
                    s["n_missed"],
                    fp,
                    s["n_both_empty"],
                ]
            )
        )
    if absent:
        lines += [
            "",
            f"Absent from reference and prediction in every case ({len(absent)}, not counted): "
            + ", ".join(absent),
        ]
    return lines


def _mean_cells(summary: Mapping[str, Any]) -> list[str]:
    def mean(name: str, digits: int = 3, scale: float = 1.0) -> str:
        return _fmt(summary[name]["mean"] * scale, digits)

    return [
        str(summary["n_classes"]),
        mean("dice"),
        mean("nsd"),
        mean("hd95_mm", 2),
        mean("abs_volume_error_ml", 2),
        mean("abs_relative_volume_error", 1, 100.0),
        str(summary["n_missed"]),
        str(summary["n_false_positive"]),
        str(summary["n_both_empty"]),
    ]
