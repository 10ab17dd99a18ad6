"""The :class:`Volume` record: one 3D scan with its geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unisegtext.errors import VolumeError

MODALITIES = ("CT", "MR")


@dataclass
class Volume:
    """One 3D scan, in the voxel order it was stored in.

    Attributes:
        array: intensities, shape (X, Y, Z), float32 (CT in HU when the source says so).
        affine: (4, 4) voxel index -> RAS+ world coordinates in mm (nibabel convention).
        modality: "CT", "MR" or None when unknown (then it is guessed from the intensities).
        header: the source NIfTI header (kept so that outputs carry the same qform/sform codes),
            or None for DICOM and arrays.
        source: where it came from (path or a short description).
        meta: extra facts (e.g. DICOM UIDs, the DICOM headers of the source series).
        modality_source: how `modality` was decided: "given" (by the caller), "dicom" (the
            Modality tag), or None while unknown (see :meth:`decide_modality`).
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str | None = None
    header: Any = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    modality_source: str | None = None

    def __post_init__(self) -> None:
        self.array = check_array(self.array, self.source or "array")
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise VolumeError(
                f"affine must be a finite (4, 4) matrix, got shape {affine.shape}; pass the "
                "voxel-to-world (RAS, mm) matrix, e.g. nibabel's img.affine"
            )
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise VolumeError("affine is singular (a zero voxel size?); check the image header")
        self.affine = affine
        if self.modality is not None:
            modality = str(self.modality).upper()
            modality = {"MRI": "MR", "CT": "CT"}.get(modality, modality)
            if modality not in MODALITIES:
                raise VolumeError(
                    f"modality {self.modality!r} is not supported; use one of {MODALITIES} or None"
                )
            self.modality = modality
            if self.modality_source is None:
                self.modality_source = "given"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    @property
    def orientation(self) -> str:
        """Axis codes such as 'RAS' or 'LPS' (nibabel's aff2axcodes)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def guessed_modality(self) -> str:
        """The given modality, else a guess from the intensities (CT has air near -1000 HU)."""
        return self.modality or guess_modality(self.array)

    def decide_modality(self) -> tuple[str, str]:
        """(modality, how): the given or DICOM modality, else an intensity guess ("guessed")."""
        if self.modality is not None:
            return self.modality, self.modality_source or "given"
        return guess_modality(self.array), "guessed"

    def to_nifti(self):
        """This volume as a nibabel Nifti1Image with the source header when there is one."""
        from unisegtext.io.nifti import image_like

        return image_like(self.array, self)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, spacing_mm=({sp}), orientation={self.orientation}, "
            f"modality={self.modality}, source={self.source!r})"
        )


def check_array(array: Any, what: str = "array") -> np.ndarray:
    """Validate a scan array and return it as float32 (X, Y, Z)."""
    try:
        array = np.asanyarray(array)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise VolumeError(f"{what}: could not be turned into an array ({exc})") from exc
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        hint = (
            "pass one 3D volume, or choose a channel/time point with channel=N (CLI: --channel N)"
            if array.ndim == 4
            else "pass a 3D volume (X, Y, Z); a single 2D slice cannot be segmented in 3D"
        )
        raise VolumeError(f"{what} has {array.ndim} dimensions {tuple(array.shape)}; {hint}")
    if min(array.shape) < 1:
        raise VolumeError(f"{what} is empty (shape {tuple(array.shape)})")
    if np.iscomplexobj(array):
        raise VolumeError(
            f"{what} holds complex numbers ({array.dtype}); pass the magnitude image "
            "(e.g. np.abs(data)): dropping the imaginary part silently would change the scan"
        )
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise VolumeError(f"{what} has dtype {array.dtype}; expected numbers")
    array = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        n = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise VolumeError(
            f"{what} contains {n} NaN or infinite values; replace them (e.g. np.nan_to_num) "
            "before segmenting"
        )
    return array


def guess_modality(array: np.ndarray) -> str:
    """Guess CT vs MR from intensities (a guess: pass the modality when it is known).

    CT is in Hounsfield units: a share of voxels at or below -500 HU (air, outside the body),
    or, for a CT stored in a soft-tissue window (BTCV: -125..275 HU, air reads -125) or cropped
    to the body, a share of voxels at or below -100 HU (fat, the window floor) over a range of
    several hundred HU. MR magnitude images are not negative, and z-scored MR stays within a
    few units of 0.
    """
    sample = array[:: max(1, array.shape[0] // 64), :: max(1, array.shape[1] // 64), :]
    low, high = float(sample.min()), float(sample.max())
    if low < -3100:
        return "MR"
    if float(np.mean(sample < -500)) > 0.01:
        return "CT"
    return "CT" if float(np.mean(sample <= -100)) > 0.02 and high - low >= 300 else "MR"
