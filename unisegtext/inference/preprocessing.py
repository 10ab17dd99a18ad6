"""Volume -> canonical network input (RAS, target spacing, normalised), and the way back.

The inverse is exact on the grid: whatever the model predicts is brought back to the input
array's shape and voxel order, so masks share the input's affine and header.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from unisegtext.io.volume import Volume
from unisegtext.models.config import PreprocessingConfig


@dataclass
class PreparedVolume:
    """A scan ready for the network, with what is needed to undo the preparation.

    Attributes:
        image: (1, X', Y', Z') float32 normalised intensities at the target spacing.
        canonical_shape: shape after reorientation, before resampling.
        to_canonical: nibabel orientation transform input -> canonical.
        from_canonical: the inverse transform.
        modality: "CT" or "MR" as used for normalisation.
        spacing_mm: the target spacing.
        pad_value: the normalised intensity of "outside" (used when padding windows).
    """

    image: torch.Tensor
    canonical_shape: tuple[int, int, int]
    to_canonical: np.ndarray
    from_canonical: np.ndarray
    modality: str
    spacing_mm: tuple[float, float, float]
    pad_value: float


def orientation_transforms(affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """(to, back) nibabel orientation transforms between the array order and `axcodes`."""
    current = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(tuple(axcodes))
    return nib.orientations.ornt_transform(current, target), nib.orientations.ornt_transform(target, current)


def apply_orientation(array: np.ndarray, ornt: np.ndarray, leading: int = 0) -> np.ndarray:
    """Flip/transpose the 3 spatial axes of `array` (after `leading` non-spatial axes)."""
    if leading == 0:
        return nib.orientations.apply_orientation(array, ornt)
    moved = np.moveaxis(array, tuple(range(leading)), tuple(range(-leading, 0)))
    out = nib.orientations.apply_orientation(moved, ornt)
    return np.moveaxis(out, tuple(range(-leading, 0)), tuple(range(leading)))


def canonical_spacing(volume: Volume, to_canonical: np.ndarray) -> tuple[float, float, float]:
    spacing = np.asarray(volume.spacing)
    order = to_canonical[:, 0].astype(int)  # output axis of each input axis
    out = np.empty(3)
    out[order] = spacing
    return tuple(float(s) for s in out)  # type: ignore[return-value]


def normalise(array: np.ndarray, modality: str, config: PreprocessingConfig) -> tuple[np.ndarray, float]:
    """CT: clip to the HU window and map to [-1, 1]. MR: clip to percentiles, z-score.

    Returns the normalised array and the value that represents "outside / air".
    """
    if modality == "CT":
        low, high = config.ct_window
        out = (np.clip(array, low, high) - (low + high) / 2.0) / ((high - low) / 2.0)
        return out.astype(np.float32), -1.0
    lo_p, hi_p = config.mr_percentiles
    sample = array[:: max(1, array.shape[0] // 128), :: max(1, array.shape[1] // 128)]
    low, high = np.percentile(sample, [lo_p, hi_p])
    clipped = np.clip(array, low, high)
    foreground = clipped[clipped > low] if np.any(clipped > low) else clipped
    mean, std = float(foreground.mean()), float(foreground.std())
    out = (clipped - mean) / max(std, 1e-6)
    return out.astype(np.float32), float((low - mean) / max(std, 1e-6))


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, int, int]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target))  # type: ignore[return-value]


def resample(tensor: torch.Tensor, size: tuple[int, int, int], mode: str = "trilinear") -> torch.Tensor:
    """Resample (C, X, Y, Z) to `size` (trilinear for intensities/probabilities, nearest for labels)."""
    if tuple(tensor.shape[1:]) == tuple(size):
        return tensor
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(tensor.unsqueeze(0), size=size, mode=mode, **kwargs).squeeze(0)


def preprocess(volume: Volume, config: PreprocessingConfig, modality: str | None = None) -> PreparedVolume:
    """Reorient to the model's orientation, normalise, resample to its spacing."""
    modality = modality or volume.guessed_modality()
    to_canonical, from_canonical = orientation_transforms(volume.affine, config.orientation)
    array = apply_orientation(volume.array, to_canonical)
    spacing = canonical_spacing(volume, to_canonical)
    normalised, pad_value = normalise(array, modality, config)
    size = target_shape(array.shape, spacing, config.spacing_mm)
    image = resample(torch.from_numpy(np.ascontiguousarray(normalised))[None], size)
    return PreparedVolume(
        image=image.contiguous(),
        canonical_shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
        to_canonical=to_canonical,
        from_canonical=from_canonical,
        modality=modality,
        spacing_mm=tuple(config.spacing_mm),  # type: ignore[arg-type]
        pad_value=pad_value,
    )


def restore(maps: torch.Tensor, prepared: PreparedVolume) -> np.ndarray:
    """(P, X', Y', Z') model-space maps -> (P, X, Y, Z) numpy on the input array grid."""
    resized = resample(maps.float(), prepared.canonical_shape)
    return apply_orientation(resized.cpu().numpy(), prepared.from_canonical, leading=1)
