"""Voxel-wise calibration of probability maps: ECE, Brier score, reliability diagrams.

Each class is a binary problem per voxel: the model's probability p that the voxel belongs to
the structure against the reference label y in {0, 1}. Probabilities are binned into
`n_bins` equal-width bins over [0, 1] (p = 1 falls in the last bin); per bin the mean
probability ("confidence") is compared with the fraction of reference-foreground voxels
("observed frequency"):

    ECE   = sum_b (n_b / N) * |mean_p_b - mean_y_b|
    Brier = mean over voxels of (p - y)^2

Scores are accumulated as per-bin sums (:class:`CalibrationStats`), so a class or all classes
pooled can be summed over many cases without keeping voxels in memory. Over all voxels of a
scan most voxels are confidently background, which makes ECE small; compare ECE values only
between runs with the same region (see `roi_margin_mm` of :func:`calibration_stats`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unisegtext.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_BINS = 15


@dataclass
class CalibrationStats:
    """Per-bin sums over voxels; add two with ``+`` to pool cases or classes.

    Attributes:
        n_bins: number of equal-width bins over [0, 1].
        counts: (n_bins,) voxels per bin.
        sum_prob: (n_bins,) sum of probabilities per bin.
        sum_label: (n_bins,) number of reference-foreground voxels per bin.
        sum_sq_error: sum over all voxels of (p - y)^2 (for the Brier score).
    """

    n_bins: int = DEFAULT_BINS
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_prob: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_label: np.ndarray = field(default=None)  # type: ignore[assignment]
    sum_sq_error: float = 0.0

    def __post_init__(self) -> None:
        if int(self.n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        self.n_bins = int(self.n_bins)
        for name in ("counts", "sum_prob", "sum_label"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.n_bins, dtype=np.float64))

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        if other.n_bins != self.n_bins:
            raise ValueError(
                f"cannot pool calibration stats with {self.n_bins} and {other.n_bins} bins"
            )
        return CalibrationStats(
            self.n_bins,
            self.counts + other.counts,
            self.sum_prob + other.sum_prob,
            self.sum_label + other.sum_label,
            self.sum_sq_error + other.sum_sq_error,
        )

    @property
    def n_voxels(self) -> int:
        return int(self.counts.sum())

    @property
    def ece(self) -> float:
        """Expected calibration error in [0, 1]; NaN without voxels."""
        total = self.counts.sum()
        if total == 0:
            return math.nan
        filled = self.counts > 0
        gap = np.abs(self.sum_prob[filled] - self.sum_label[filled])  # n_b * |conf_b - freq_b|
        return float(gap.sum() / total)

    @property
    def brier(self) -> float:
        """Mean squared difference between probability and label; NaN without voxels."""
        total = self.counts.sum()
        return float(self.sum_sq_error / total) if total else math.nan

    def curve(self) -> dict[str, list[float]]:
        """Reliability-curve data per bin: edges, centres, mean probability, observed
        frequency (NaN for empty bins) and voxel counts."""
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(self.counts > 0, self.sum_prob / self.counts, np.nan)
            frequency = np.where(self.counts > 0, self.sum_label / self.counts, np.nan)
        return {
            "bin_edges": edges.tolist(),
            "bin_centres": ((edges[:-1] + edges[1:]) / 2).tolist(),
            "mean_probability": confidence.tolist(),
            "observed_frequency": frequency.tolist(),
            "count": self.counts.tolist(),
        }

    def to_dict(self) -> dict[str, object]:
        return {
            "n_voxels": self.n_voxels,
            "ece": self.ece,
            "brier": self.brier,
            "n_bins": self.n_bins,
            **self.curve(),
        }


def calibration_stats(
    probabilities: np.ndarray,
    reference: np.ndarray,
    n_bins: int = DEFAULT_BINS,
    *,
    roi: np.ndarray | None = None,
) -> CalibrationStats:
    """Bin the voxels of one probability map against its reference mask.

    Args:
        probabilities: (X, Y, Z) floats in [0, 1] (values within 1e-3 outside are clipped).
        reference: (X, Y, Z) boolean reference mask, same shape.
        n_bins: number of equal-width bins.
        roi: optional (X, Y, Z) boolean mask of the voxels to score (default: all voxels).

    Raises:
        DataError: shapes differ, or the map holds NaNs or values outside [0, 1].
    """
    prob = np.asarray(probabilities, dtype=np.float64)
    ref = np.asarray(reference).astype(bool, copy=False)
    if prob.shape != ref.shape:
        raise DataError(
            f"probability map has shape {prob.shape} but the reference mask {ref.shape}; "
            "write the probabilities on the reference grid"
        )
    if roi is not None:
        roi = np.asarray(roi, dtype=bool)
        prob, ref = prob[roi], ref[roi]
    else:
        prob, ref = prob.ravel(), ref.ravel()
    if prob.size and (not np.all(np.isfinite(prob)) or prob.min() < -1e-3 or prob.max() > 1 + 1e-3):
        raise DataError(
            f"probabilities must lie in [0, 1], got values in [{np.nanmin(prob):.4g}, {np.nanmax(prob):.4g}]"
            f"{' and NaNs' if np.isnan(prob).any() else ''}; pass probability maps, not logits "
            "or label maps (apply a sigmoid first)"
        )
    prob = np.clip(prob, 0.0, 1.0)
    stats = CalibrationStats(n_bins)
    index = np.minimum((prob * n_bins).astype(np.int64), n_bins - 1)
    stats.counts += np.bincount(index, minlength=n_bins)
    stats.sum_prob += np.bincount(index, weights=prob, minlength=n_bins)
    stats.sum_label += np.bincount(index, weights=ref.astype(np.float64), minlength=n_bins)
    stats.sum_sq_error = float(np.sum((prob - ref) ** 2))
    return stats


def expected_calibration_error(
    probabilities: np.ndarray, reference: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE over voxels with `n_bins` equal-width bins (see the module docstring)."""
    return calibration_stats(probabilities, reference, n_bins).ece


def brier_score(probabilities: np.ndarray, reference: np.ndarray) -> float:
    """Mean of (p - y)^2 over voxels."""
    return calibration_stats(probabilities, reference, 1).brier


def roi_around(
    reference: np.ndarray, probabilities: np.ndarray, margin_mm: float, spacing_mm: Sequence[float]
) -> np.ndarray:
    """Boolean mask of the bounding box of (reference OR p >= 0.5), grown by `margin_mm`.

    An empty union gives an empty region (the structure is absent on both sides).
    """
    union = np.asarray(reference, dtype=bool) | (np.asarray(probabilities) >= 0.5)
    roi = np.zeros(union.shape, dtype=bool)
    if not union.any():
        return roi
    box = []
    for axis, step in enumerate(spacing_mm):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        grow = int(math.ceil(margin_mm / float(step)))
        box.append(slice(max(int(hit[0]) - grow, 0), int(hit[-1]) + grow + 1))
    roi[tuple(box)] = True
    return roi


def plot_reliability_diagram(
    stats: CalibrationStats,
    path: str | os.PathLike,
    *,
    title: str = "Reliability diagram",
) -> Path:
    """Write a reliability diagram PNG: observed frequency against mean probability per bin,
    the diagonal of perfect calibration, and the voxel count per bin (log scale) below.

    Draws on a bare matplotlib `Figure` (Agg canvas): no display needed, and pyplot's global
    backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curve = stats.curve()
    edges = np.asarray(curve["bin_edges"])
    width = edges[1] - edges[0]
    frequency = np.asarray(curve["observed_frequency"], dtype=float)
    confidence = np.asarray(curve["mean_probability"], dtype=float)
    counts = np.asarray(curve["count"], dtype=float)

    fig = Figure(figsize=(4.8, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = counts > 0
    top.bar(
        edges[:-1][filled],
        frequency[filled],
        width=width,
        align="edge",
        color="#4C72B0",
        edgecolor="black",
        linewidth=0.5,
        label="observed frequency",
    )
    top.bar(
        edges[:-1][filled],
        (confidence - frequency)[filled],
        bottom=frequency[filled],
        width=width,
        align="edge",
        color="#DD8452",
        alpha=0.45,
        edgecolor="#DD8452",
        linewidth=0.5,
        label="gap",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("fraction of reference voxels")
    top.set_title(
        f"{title}\nECE {stats.ece:.4f}  Brier {stats.brier:.4f}  ({stats.n_voxels:,} voxels)",
        fontsize=9,
    )
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(
        edges[:-1], np.where(filled, counts, np.nan), width=width, align="edge", color="grey"
    )
    if filled.any():
        bottom.set_yscale("log")
    bottom.set_xlabel("predicted probability")
    bottom.set_ylabel("voxels")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    logger.debug("wrote %s", path)
    return path
