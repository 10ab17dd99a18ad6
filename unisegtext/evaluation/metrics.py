"""Overlap, surface and volume metrics for one case, one class at a time.

Every function takes boolean masks of shape (X, Y, Z) on the same grid and the voxel size
`spacing_mm` along the array axes (the column norms of the reference affine). Dice, NSD and
HD95 are MONAI's implementations (:func:`monai.metrics.compute_dice`,
:func:`monai.metrics.compute_surface_dice`, :func:`monai.metrics.compute_hausdorff_distance`);
this module only defines what happens when a mask is empty, where MONAI returns NaN or inf.

Empty structures, explicitly (``status`` column of :class:`CaseClassMetrics`):

============== ========== ========== ======== ========== ==============================
status          reference  prediction Dice     NSD        HD95 (mm)
============== ========== ========== ======== ========== ==============================
present         non-empty  non-empty  value    value      value
missed          non-empty  empty      0        0          inf (no predicted surface)
false_positive  empty      non-empty  0        0          inf (no reference surface);
                                                          the predicted volume is the
                                                          false-positive volume in mL
both_empty      empty      empty      NaN      NaN        NaN -- a correct "absent", not
                                                          a hit: excluded from means
============== ========== ========== ======== ========== ==============================

Surface voxels are MONAI's: a voxel of the mask whose 6-neighbourhood leaves the mask (binary
erosion with a cross, XOR the mask); distances are Euclidean in mm between surface-voxel
centres. NSD counts the surface voxels of both masks within `tolerance_mm` of the other
surface; HD95 is the larger of the two directed 95th percentiles (linear interpolation).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from unisegtext.errors import VolumeError

logger = logging.getLogger(__name__)

STATUSES = ("present", "missed", "false_positive", "both_empty")

# metric columns of CaseClassMetrics that are aggregated over cases
METRIC_FIELDS = (
    "dice",
    "nsd",
    "hd95_mm",
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
)


@dataclass
class CaseClassMetrics:
    """The metrics of one class in one case (one row of results.csv).

    Attributes:
        dataset: dataset name (the --dataset value or the reference folder's name).
        case: case name (file or folder name without extension).
        class_name: the structure, as named on the reference side (normalised: lower case,
            "_" between words).
        status: "present", "missed", "false_positive" or "both_empty" (see the module docstring).
        dice: Dice coefficient in [0, 1]; NaN when both masks are empty.
        nsd: normalised surface Dice at `tolerance_mm`, in [0, 1]; NaN when both are empty.
        hd95_mm: 95th-percentile symmetric Hausdorff distance in mm; inf when exactly one mask
            is empty, NaN when both are.
        tolerance_mm: the NSD tolerance used.
        ref_volume_ml, pred_volume_ml: volumes in mL (voxel count x voxel volume).
        volume_error_ml: pred - ref in mL (signed).
        abs_volume_error_ml: |pred - ref| in mL.
        relative_volume_error: (pred - ref) / ref (a fraction, signed); NaN when ref is empty.
        abs_relative_volume_error: |relative_volume_error|.
        fp_volume_ml: volume predicted outside the reference (pred AND NOT ref) in mL; for a
            structure absent from the reference this is the whole predicted volume.
        fn_volume_ml: reference volume the prediction missed (ref AND NOT pred) in mL.
        ece: expected calibration error of the probability map (NaN without --prob).
        brier: Brier score of the probability map (NaN without --prob).
    """

    dataset: str
    case: str
    class_name: str
    status: str
    dice: float
    nsd: float
    hd95_mm: float
    tolerance_mm: float
    ref_volume_ml: float
    pred_volume_ml: float
    volume_error_ml: float
    abs_volume_error_ml: float
    relative_volume_error: float
    abs_relative_volume_error: float
    fp_volume_ml: float
    fn_volume_ml: float
    ece: float = math.nan
    brier: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def counted(self) -> bool:
        """False for a structure absent on both sides: it is not a hit and not averaged."""
        return self.status != "both_empty"

    def to_dict(self) -> dict[str, Any]:
        row = asdict(self)
        extra = row.pop("extra")
        row.update(extra)
        return row


# --------------------------------------------------------------------------- helpers
def check_spacing(spacing_mm: Sequence[float] | float, ndim: int = 3) -> tuple[float, ...]:
    """Return the voxel size as a tuple of `ndim` positive floats (mm)."""
    values = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64)).ravel()
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise VolumeError(
            f"spacing_mm must be {ndim} positive numbers (voxel size in mm per array axis), "
            f"got {spacing_mm!r}"
        )
    return tuple(float(v) for v in values)


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise VolumeError(
            f"prediction and reference masks differ in shape: {pred.shape} vs {ref.shape}; "
            "resample the prediction onto the reference grid first"
        )
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _crop_to_union(
    pred: np.ndarray, ref: np.ndarray, margin: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus `margin` voxels.

    Surface metrics do not change (MONAI crops the same way, and voxels outside the image are
    background either way); it keeps the full-volume float copies MONAI makes small.
    """
    union = pred | ref
    if not union.any():
        return pred, ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + margin + 1))
    box = tuple(slices)
    return pred[box], ref[box]


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """Silence MONAI's empty-mask warnings (empty masks never reach it) and the deprecation
    warning its own surface-distance code raises internally (MONAI 1.5-1.6)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is all 0, this may result in nan/inf distance.*"
        )
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy.*", category=FutureWarning
        )
        yield


def _as_batch(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask))[None, None]  # (1, 1, X, Y, Z)


# --------------------------------------------------------------------------- metrics
def volume_ml(mask: np.ndarray, spacing_mm: Sequence[float] | float) -> float:
    """Volume of a boolean mask in mL (voxel count x voxel volume in mm^3 / 1000)."""
    mask = np.asarray(mask)
    spacing = check_spacing(spacing_mm, mask.ndim)
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def volume_errors(pred_ml: float, ref_ml: float) -> dict[str, float]:
    """Signed, absolute and relative volume errors.

    Returns:
        volume_error_ml (pred - ref), abs_volume_error_ml, relative_volume_error
        ((pred - ref) / ref, NaN when ref is 0) and abs_relative_volume_error.
    """
    diff = float(pred_ml) - float(ref_ml)
    relative = diff / float(ref_ml) if ref_ml > 0 else math.nan
    return {
        "volume_error_ml": diff,
        "abs_volume_error_ml": abs(diff),
        "relative_volume_error": relative,
        "abs_relative_volume_error": abs(relative),
    }


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient 2|P & R| / (|P| + |R|) (MONAI's compute_dice).

    Returns NaN when both masks are empty and 0.0 when only one is.
    """
    from monai.metrics import compute_dice

    pred, ref = _check_pair(pred, ref)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return math.nan
    if not pred_any or not ref_any:
        return 0.0
    pred, ref = _crop_to_union(pred, ref)
    value = compute_dice(
        _as_batch(pred), _as_batch(ref), include_background=True, ignore_empty=True
    )
    return float(value[0, 0])


def nsd(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float] | float,
    tolerance_mm: float = 2.0,
) -> float:
    """Normalised surface Dice at `tolerance_mm` (MONAI's compute_surface_dice).

    The fraction of the surface voxels of both masks that lie within `tolerance_mm` of the
    other mask's surface, distances in mm on the grid `spacing_mm`. NaN when both masks are
    empty, 0.0 when only one is.
    """
    from monai.metrics import compute_surface_dice

    pred, ref = _check_pair(pred, ref)
    spacing = check_spacing(spacing_mm, pred.ndim)
    tolerance = float(tolerance_mm)
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return math.nan
    if not pred_any or not ref_any:
        return 0.0
    pred, ref = _crop_to_union(pred, ref)
    with _quiet_monai():
        value = compute_surface_dice(
            _as_batch(pred),
            _as_batch(ref),
            class_thresholds=[tolerance],
            include_background=True,
            spacing=list(spacing),
        )
    return float(value[0, 0])


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | float) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI's compute_hausdorff_distance).

    NaN when both masks are empty, inf when exactly one is (there is no surface to measure to).
    """
    from monai.metrics import compute_hausdorff_distance

    pred, ref = _check_pair(pred, ref)
    spacing = check_spacing(spacing_mm, pred.ndim)
    pred_any, ref_any = bool(pred.any()), bool(ref.any())
    if not pred_any and not ref_any:
        return math.nan
    if not pred_any or not ref_any:
        return math.inf
    pred, ref = _crop_to_union(pred, ref)
    with _quiet_monai():
        value = compute_hausdorff_distance(
            _as_batch(pred),
            _as_batch(ref),
            include_background=True,
            percentile=95,
            spacing=list(spacing),
        )
    return float(value[0, 0])


def status_of(pred: np.ndarray, ref: np.ndarray) -> str:
    """ "present", "missed", "false_positive" or "both_empty" (see the module docstring)."""
    pred_any, ref_any = bool(np.any(pred)), bool(np.any(ref))
    if ref_any:
        return "present" if pred_any else "missed"
    return "false_positive" if pred_any else "both_empty"


def evaluate_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing_mm: Sequence[float] | float,
    tolerance_mm: float = 2.0,
    *,
    case: str = "",
    class_name: str = "",
    dataset: str = "",
) -> CaseClassMetrics:
    """All metrics of one class in one case.

    Args:
        pred, ref: boolean masks (X, Y, Z) on the same grid.
        spacing_mm: voxel size in mm along the array axes (from the reference header).
        tolerance_mm: NSD tolerance in mm.
    """
    pred, ref = _check_pair(pred, ref)
    spacing = check_spacing(spacing_mm, pred.ndim)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref_ml = float(np.count_nonzero(ref)) * voxel_ml
    pred_ml = float(np.count_nonzero(pred)) * voxel_ml
    status = status_of(pred, ref)
    if status == "present":
        pred_c, ref_c = _crop_to_union(pred, ref)
        dice_value = dice(pred_c, ref_c)
        nsd_value = nsd(pred_c, ref_c, spacing, tolerance_mm)
        hd_value = hd95(pred_c, ref_c, spacing)
        fp_ml = float(np.count_nonzero(pred_c & ~ref_c)) * voxel_ml
        fn_ml = float(np.count_nonzero(ref_c & ~pred_c)) * voxel_ml
    else:
        dice_value = math.nan if status == "both_empty" else 0.0
        nsd_value = math.nan if status == "both_empty" else 0.0
        hd_value = math.nan if status == "both_empty" else math.inf
        fp_ml, fn_ml = pred_ml, ref_ml  # one side is empty: all of the other side is an error
    return CaseClassMetrics(
        dataset=dataset,
        case=case,
        class_name=class_name,
        status=status,
        dice=dice_value,
        nsd=nsd_value,
        hd95_mm=hd_value,
        tolerance_mm=float(tolerance_mm),
        ref_volume_ml=ref_ml,
        pred_volume_ml=pred_ml,
        fp_volume_ml=fp_ml,
        fn_volume_ml=fn_ml,
        **volume_errors(pred_ml, ref_ml),
    )


def evaluate_case(
    pred_masks: Mapping[str, np.ndarray],
    ref_masks: Mapping[str, np.ndarray],
    spacing_mm: Sequence[float] | float,
    tolerance_mm: float | Mapping[str, float] = 2.0,
    *,
    case: str = "",
    dataset: str = "",
    classes: Sequence[str] | None = None,
) -> list[CaseClassMetrics]:
    """Metrics for every class of one case, matched by class name.

    A class the reference does not name is unknown for it (not background) and is skipped, as
    is a class the prediction does not name (the model was not asked for it); both are logged.
    A class named on both sides but empty on one or both is evaluated with the rules of the
    module docstring.

    Args:
        pred_masks: class name -> boolean mask (X, Y, Z).
        ref_masks: class name -> boolean mask (X, Y, Z), same grid.
        spacing_mm: voxel size in mm along the array axes (from the reference header).
        tolerance_mm: NSD tolerance in mm, one value or one per class name.
        case, dataset: labels copied into the rows.
        classes: evaluate only these class names (each must be named on both sides).

    Returns:
        One :class:`CaseClassMetrics` per class, in the reference's order.
    """
    from unisegtext.errors import DataError

    spacing = check_spacing(spacing_mm)
    if classes is None:
        names = [name for name in ref_masks if name in pred_masks]
        only_ref = [name for name in ref_masks if name not in pred_masks]
        only_pred = [name for name in pred_masks if name not in ref_masks]
        if only_pred:
            logger.warning(
                "case %s: %d predicted class(es) not named by the reference, skipped: %s",
                case or "?",
                len(only_pred),
                ", ".join(only_pred),
            )
        if only_ref:
            logger.info(
                "case %s: reference classes not predicted, skipped: %s",
                case or "?",
                ", ".join(only_ref),
            )
    else:
        names = list(classes)
        missing = [n for n in names if n not in pred_masks or n not in ref_masks]
        if missing:
            raise DataError(
                f"case {case or '?'}: class(es) {missing} are not named on both sides "
                f"(prediction: {sorted(pred_masks)}, reference: {sorted(ref_masks)}); "
                "check the label maps or the class list"
            )
    if isinstance(tolerance_mm, Mapping):
        unknown = [name for name in names if name not in tolerance_mm]
        if unknown:
            raise DataError(
                f"case {case or '?'}: no NSD tolerance for class(es) {unknown}; add them to tolerance_mm"
            )
    rows = []
    for name in names:
        tolerance = tolerance_mm[name] if isinstance(tolerance_mm, Mapping) else tolerance_mm
        rows.append(
            evaluate_masks(
                pred_masks[name],
                ref_masks[name],
                spacing,
                tolerance,
                case=case,
                class_name=name,
                dataset=dataset,
            )
        )
    return rows
