"""Model-space probabilities -> masks on the input grid.

Two steps, both exact and cheap where a naive version is slow on a full-size CT:

* :func:`keep_largest_component` removes, in model space (2 mm: ~10 M voxels, not the
  input's ~80 M), every connected blob of a single-component structure (liver, spleen, one
  kidney) but the largest, as nnU-Net's and TotalSegmentator's post-processing do.
* :func:`resample_box` computes trilinear resampling (identical to
  ``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)``) for a box of the
  output grid only, as three small interpolation matrices; :func:`restore_mask` uses it on the
  bounding box of the structure, so a 20-prompt run never resamples 20 full-size volumes.
"""

from __future__ import annotations

import numpy as np
import torch

from unisegtext.inference.preprocessing import PreparedVolume, apply_orientation


def linear_weights(n_in: int, n_out: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """(stop - start, n_in) weights of 1D linear resampling from n_in to n_out samples, rows
    ``start:stop`` of the output, with PyTorch's ``align_corners=False`` convention (source
    coordinate ``(i + 0.5) * n_in / n_out - 0.5``, clamped at 0, last sample repeated)."""
    stop = n_out if stop is None else stop
    rows = torch.arange(start, stop, dtype=torch.float64)
    src = ((rows + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = (src - lo.double()).clamp(0.0, 1.0)
    weights = torch.zeros((stop - start, n_in), dtype=torch.float64)
    index = torch.arange(stop - start)
    weights[index, lo] += 1.0 - frac
    weights[index, hi] += frac
    return weights.float()


def resample_box(volume: torch.Tensor, out_shape: tuple[int, int, int], box: tuple[slice, slice, slice]) -> torch.Tensor:
    """Trilinear resampling of `volume` (X, Y, Z) to `out_shape`, computed for `box` only.

    Equal (to float rounding) to ``F.interpolate(volume[None, None], out_shape,
    mode="trilinear", align_corners=False)[0, 0][box]``.
    """
    out = volume.float()
    sizes = [len(range(*box[a].indices(out_shape[a]))) for a in range(3)]
    if 0 in sizes:
        return torch.zeros(sizes, dtype=out.dtype)
    for axis in range(3):
        sl = box[axis]
        w = linear_weights(volume.shape[axis], out_shape[axis], sl.start or 0, sl.stop)
        used = torch.nonzero(w.sum(0) > 0).flatten()
        lo, hi = int(used.min()), int(used.max()) + 1
        out = out.narrow(axis, lo, hi - lo)
        out = torch.tensordot(w[:, lo:hi], out, dims=([1], [axis])).movedim(0, axis)
    return out


def keep_largest_component(probability: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the probabilities of every connected blob above `threshold` but the largest
    (26-connectivity), in model space. Voxels below the threshold are kept as they are, so
    the boundary of the kept component interpolates as before."""
    from scipy import ndimage

    mask = (probability > threshold).cpu().numpy()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return probability
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    drop = torch.from_numpy((labels > 0) & (labels != int(sizes.argmax()))).to(probability.device)
    return probability.masked_fill(drop, 0.0)


def _input_box(mask: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...], margin: int = 2) -> tuple[slice, ...]:
    """The box of the output grid that can hold values from the model-space `mask` voxels."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo, hi = max(0, int(present[0]) - margin), min(in_shape[axis], int(present[-1]) + 1 + margin)
        scale = out_shape[axis] / in_shape[axis]
        box.append(slice(max(0, int(np.floor(lo * scale)) - 1), min(out_shape[axis], int(np.ceil(hi * scale)) + 1)))
    return tuple(box)


def restore_mask(probability: torch.Tensor, prepared: PreparedVolume, threshold: float) -> tuple[np.ndarray, float]:
    """Model-space probability (X', Y', Z') -> (bool mask on the input grid, mean probability
    inside it). Only the structure's bounding box is resampled; the result equals
    thresholding the full trilinear resampling."""
    canonical = tuple(int(s) for s in prepared.canonical_shape)
    candidates = (probability > threshold).cpu().numpy()
    mask = np.zeros(canonical, dtype=bool)
    score = 0.0
    if candidates.any():
        box = _input_box(candidates, tuple(probability.shape), canonical)
        values = resample_box(probability.cpu(), canonical, box)  # type: ignore[arg-type]
        inside = values > threshold
        mask[box] = inside.numpy()
        score = float(values[inside].mean()) if bool(inside.any()) else 0.0
    return apply_orientation(mask, prepared.from_canonical), score
