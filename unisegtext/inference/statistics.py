"""Per-mask statistics: volume, position, extent, intensity and connected components.

All positions are given twice: as 0-based voxel indices on the input grid (the axes of
``Volume.array``) and in world coordinates, millimetres in RAS+ (nibabel's convention: +x
towards the patient's right, +y anterior, +z superior). Statistics hold no arrays, so they
serialise to JSON as they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unisegtext.io.volume import Volume

if TYPE_CHECKING:  # pragma: no cover
    from unisegtext.io.record import ResultRecord as SegmentationResult

# 26-connectivity: voxels touching by a face, an edge or a corner belong to one component
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def mask_statistics(mask: np.ndarray, volume: Volume) -> dict[str, Any]:
    """Statistics of one boolean mask on the grid of `volume`.

    Args:
        mask: bool (X, Y, Z) on the grid of `volume`.
        volume: the scan the mask was computed on (its affine and intensities are used).

    Returns:
        A JSON-able dict:

        - ``present``: False when the mask is empty (then every position is None).
        - ``voxel_count``, ``volume_ml``.
        - ``centroid_voxel`` (float indices) and ``centroid_mm`` (world RAS, mm).
        - ``bbox_voxel``: ``{"min": [i, j, k], "max": [i, j, k]}``, inclusive indices.
        - ``bbox_mm``: ``{"min": [x, y, z], "max": [x, y, z]}``, the world RAS box (mm)
          spanned by the voxel centres of the voxel bounding box.
        - ``extent_mm``: size of the voxel bounding box along the array axes, mm.
        - ``intensity_mean``, ``intensity_std`` (HU for CT, scanner units for MR),
          ``intensity_unit``.
        - ``components``: number of 26-connected components; ``largest_component_ml``.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume grid {volume.shape}")
    unit = "HU" if volume.modality == "CT" else "arbitrary units"
    count = int(np.count_nonzero(mask))
    if count == 0:
        return {
            "present": False,
            "voxel_count": 0,
            "volume_ml": 0.0,
            "centroid_voxel": None,
            "centroid_mm": None,
            "bbox_voxel": None,
            "bbox_mm": None,
            "extent_mm": None,
            "intensity_mean": None,
            "intensity_std": None,
            "intensity_unit": unit,
            "components": 0,
            "largest_component_ml": 0.0,
        }
    voxel_ml = volume.voxel_volume_ml
    index = np.nonzero(mask)
    centroid = np.array([float(np.mean(axis)) for axis in index])
    low = np.array([int(axis.min()) for axis in index])
    high = np.array([int(axis.max()) for axis in index])
    corners = np.array([[c[0], c[1], c[2], 1.0] for c in _corners(low, high)])  # (8, 4)
    corners_mm = (volume.affine @ corners.T)[:3].T  # (8, 3)
    values = volume.array[mask].astype(np.float64)
    labels, n_components = ndimage.label(mask, structure=CONNECTIVITY_26)
    sizes = np.bincount(labels.ravel())[1:] if n_components else np.zeros(0, dtype=int)
    return {
        "present": True,
        "voxel_count": count,
        "volume_ml": count * voxel_ml,
        "centroid_voxel": centroid.tolist(),
        "centroid_mm": (volume.affine @ np.append(centroid, 1.0))[:3].tolist(),
        "bbox_voxel": {"min": low.tolist(), "max": high.tolist()},
        "bbox_mm": {"min": corners_mm.min(axis=0).tolist(), "max": corners_mm.max(axis=0).tolist()},
        "extent_mm": ((high - low + 1) * np.asarray(volume.spacing)).tolist(),
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std()),
        "intensity_unit": unit,
        "components": int(n_components),
        "largest_component_ml": float(sizes.max()) * voxel_ml if sizes.size else 0.0,
    }


def result_statistics(result: SegmentationResult, prompts: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`mask_statistics` for every prompt of a result, with what the prompt meant.

    Each entry adds ``concept_id``, ``concept_name`` and ``mean_probability`` (the mean
    probability inside the mask, ``result.scores``) to the mask statistics.
    """
    out: dict[str, dict[str, Any]] = {}
    for prompt in prompts or result.prompts:
        resolution = result.resolutions.get(prompt)
        entry: dict[str, Any] = {
            "concept_id": resolution.concept_id if resolution else None,
            "concept_name": resolution.concept_name if resolution else None,
        }
        entry.update(mask_statistics(result.masks[prompt], result.volume))
        entry["mean_probability"] = float(result.scores.get(prompt, 0.0)) if entry["present"] else None
        entry["present"] = bool(result.present.get(prompt, entry["present"])) and entry["present"]
        entry["presence_probability"] = round(float(result.presence.get(prompt, 1.0 if entry["present"] else 0.0)), 4)
        out[prompt] = entry
    return out


def write_statistics(result: SegmentationResult, path: str | os.PathLike) -> Path:
    """Write :func:`result_statistics` as JSON (``statistics.json``) and return the path."""
    path = Path(path)
    document = {
        "coordinates": {
            "voxel": "0-based indices along the axes of the input array (X, Y, Z)",
            "mm": "world coordinates in millimetres, RAS+ (nibabel): +x right, +y anterior, +z superior",
        },
        "shape": list(result.volume.shape),
        "spacing_mm": list(result.volume.spacing),
        "structures": result_statistics(result),
    }
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _corners(low: np.ndarray, high: np.ndarray) -> list[tuple[int, int, int]]:
    return [(x, y, z) for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
