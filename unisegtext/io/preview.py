"""A quick-look PNG of a result: axial, coronal and sagittal overlays with a colour legend.

Slices are shown in the radiological convention whatever the stored voxel order: the scan is
reoriented to RAS+ first (nibabel orientation helpers, no resampling), then

- axial: patient right on the viewer's left, anterior at the top;
- coronal: patient right on the viewer's left, superior at the top;
- sagittal: anterior on the viewer's left, superior at the top;

with pixels drawn at their true aspect ratio (voxel spacing). matplotlib draws with the Agg
backend through its object API, so no display or global pyplot state is touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from unisegtext.io.record import ResultRecord as SegmentationResult

PLANES = ("axial", "coronal", "sagittal")
# letters at the (left, right, top, bottom) edges of each panel
EDGE_LABELS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
CT_WINDOW = (-160.0, 240.0)  # soft-tissue window: level 40 HU, width 400 HU


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder and flip the axes of `array` (X, Y, Z, ...) so that they run R, A, S.

    Returns:
        The reoriented array (a view where possible) and its affine.
    """
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(array, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return ras, new_affine


def radiological_slices(ras: np.ndarray, point: Sequence[int]) -> dict[str, np.ndarray]:
    """The three planes through voxel `point` of a RAS+ array, as images (row 0 at the top).

    Args:
        ras: (X, Y, Z) array in RAS+ voxel order (see :func:`to_ras`).
        point: (i, j, k) voxel of `ras` the planes pass through.

    Returns:
        plane name -> 2D array ready for ``imshow(origin="upper")`` in the radiological
        convention described in the module docstring.
    """
    i, j, k = (int(v) for v in point)
    return {
        "axial": ras[::-1, ::-1, k].T,  # rows: anterior -> posterior; columns: right -> left
        "coronal": ras[::-1, j, ::-1].T,  # rows: superior -> inferior; columns: right -> left
        "sagittal": ras[i, ::-1, ::-1].T,  # rows: superior -> inferior; columns: anterior -> posterior
    }


def _pixel_aspect(spacing: Sequence[float]) -> dict[str, float]:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}  # row size / column size


def _window(array: np.ndarray, modality: str | None) -> tuple[float, float]:
    if modality == "CT":
        return CT_WINDOW
    low, high = np.percentile(array, [1.0, 99.0])
    return float(low), float(max(high, low + 1e-6))


def preview_point(masks: Sequence[np.ndarray], shape: Sequence[int]) -> tuple[int, int, int]:
    """The rounded centroid of the union of `masks`, or the middle voxel when all are empty."""
    union = np.zeros(tuple(shape), dtype=bool)
    for mask in masks:
        union |= mask
    if not union.any():
        return tuple(int(s) // 2 for s in shape)  # type: ignore[return-value]
    return tuple(int(round(float(np.mean(axis)))) for axis in np.nonzero(union))  # type: ignore[return-value]


def write_preview(
    result: SegmentationResult,
    path: str | os.PathLike,
    *,
    prompts: Sequence[str] | None = None,
    center: str | None = None,
    alpha: float = 0.45,
    dpi: int = 110,
) -> Path:
    """Write a PNG with axial, coronal and sagittal overlays and a legend.

    Args:
        result: the segmentation result.
        path: output file (``preview.png``).
        prompts: which prompts to draw (default: all).
        center: a prompt whose mask centroid the planes pass through; by default the
            centroid of all drawn masks, or the middle slices when every mask is empty.
        alpha: overlay opacity.
        dpi: resolution of the PNG.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    prompts = list(prompts) if prompts is not None else result.prompts
    unknown = [p for p in prompts + ([center] if center else []) if p not in result.masks]
    if unknown:
        raise ValueError(f"no mask for {unknown}; the result has {result.prompts}")
    volume = result.volume
    image, ras_affine = to_ras(volume.array, volume.affine)
    masks = {p: to_ras(result.masks[p], volume.affine)[0] for p in prompts}
    spacing = tuple(float(s) for s in np.linalg.norm(ras_affine[:3, :3], axis=0))
    point = preview_point([masks[center]] if center else list(masks.values()), image.shape)
    colors = result.colors()
    volumes = result.volumes_ml
    vmin, vmax = _window(image, volume.guessed_modality())
    aspect = _pixel_aspect(spacing)
    planes = radiological_slices(image, point)
    overlays = {p: radiological_slices(m, point) for p, m in masks.items()}

    figure = Figure(figsize=(13, 5.2), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    for ax, plane in zip(axes, PLANES):
        ax.imshow(planes[plane], cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect[plane], interpolation="nearest")
        for prompt in prompts:
            mask = overlays[prompt][plane]
            if not mask.any():
                continue
            rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
            rgba[mask, :3] = np.asarray(colors[prompt], dtype=np.float32) / 255.0
            rgba[mask, 3] = alpha
            ax.imshow(rgba, aspect=aspect[plane], interpolation="nearest")
        index = {"axial": point[2], "coronal": point[1], "sagittal": point[0]}[plane]
        ax.set_title(f"{plane} (slice {index})", color="white", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right, top, bottom = EDGE_LABELS[plane]
        for text, xy, ha, va in ((left, (0.01, 0.5), "left", "center"), (right, (0.99, 0.5), "right", "center"),
                                 (top, (0.5, 0.99), "center", "top"), (bottom, (0.5, 0.01), "center", "bottom")):
            ax.text(*xy, text, transform=ax.transAxes, color="yellow", fontsize=9, ha=ha, va=va)
    handles = []
    for prompt in prompts:
        resolution = result.resolutions.get(prompt)
        name = resolution.concept_name if resolution and resolution.concept_name else prompt
        found = f"{volumes[prompt]:.1f} mL" if result.masks[prompt].any() else "not found"
        label = f"{prompt} -> {name} ({found})" if name != prompt else f"{prompt} ({found})"
        handles.append(Patch(facecolor=np.asarray(colors[prompt]) / 255.0, edgecolor="white", label=label))
    figure.legend(handles=handles, loc="lower center", ncol=min(4, max(1, len(handles))), frameon=False,
                  labelcolor="white", fontsize=9)
    rows = -(-len(handles) // 4)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.06 + 0.045 * rows, wspace=0.03)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.png")
    try:
        figure.savefig(str(tmp), facecolor=figure.get_facecolor())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path

