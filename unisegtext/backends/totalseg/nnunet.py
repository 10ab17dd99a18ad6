"""nnU-Net v2's inference path, rewritten from its documented behaviour (nnunetv2 2.8.1).

Arrays here are in nnU-Net's axis order: an image read from NIfTI enters as the nibabel array
transposed (2, 1, 0), i.e. (z, y, x), with the spacing reversed the same way; the plans'
`transpose_forward` then applies on top. Each step matches nnU-Net's own so that masks agree
voxel for voxel (tests compare against `nnUNetPredictor` when nnunetv2 is installed):

* `DefaultPreprocessor`: transpose, crop to the (hole-filled) non-zero box, normalise
  (CT: clip to the plans' 0.5/99.5 percentiles, then (x - mean) / max(std, 1e-8) with the plans'
  foreground mean/std; z-score: per image), resample to the plans spacing (order 3, order 0 along
  an axis whose spacing is > 3x the others; nothing when the shape is unchanged).
* sliding window: tiles at `compute_steps_for_sliding_window` positions, Gaussian importance
  (impulse filtered with sigma = patch/8, peak scaled to 10, fp16), logits accumulated in fp16,
  no mirroring.
* export: logits resampled back to the cropped shape (order 1), argmax, crop reinserted,
  transpose reverted.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
from functools import lru_cache
from typing import Any

import numpy as np
import torch

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD


# ---------------------------------------------------------------- preprocessing (DefaultPreprocessor)

def nonzero_bbox(data: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """Half-open bounding box of the hole-filled non-zero mask over all channels, and the mask.

    data: (C, *spatial). An all-zero image keeps its full extent (as nnU-Net's bbox search).
    """
    from scipy.ndimage import binary_fill_holes

    mask = data[0] != 0
    for c in range(1, data.shape[0]):
        mask |= data[c] != 0
    mask = binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, mask.shape[axis]])
    return bbox, mask


def crop_to_nonzero(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(cropped data, seg with 0 inside / -1 outside the non-zero mask (int8), bbox)."""
    bbox, mask = nonzero_bbox(data)
    slicer = tuple(slice(lo, hi) for lo, hi in bbox)
    seg = np.where(mask[slicer], np.int8(0), np.int8(-1))[None]
    return data[(slice(None), *slicer)], seg, bbox


def normalise(data: np.ndarray, seg: np.ndarray, schemes: list[str], use_mask_for_norm: list[bool],
              intensity_properties: dict[str, dict[str, float]]) -> np.ndarray:
    """nnU-Net's per-channel normalisation, in place on float32 `data` (C, *spatial)."""
    for c, scheme in enumerate(schemes):
        image = data[c]
        if scheme == "CTNormalization":
            props = intensity_properties[str(c)]
            np.clip(image, props["percentile_00_5"], props["percentile_99_5"], out=image)
            image -= props["mean"]
            image /= max(props["std"], 1e-8)
        elif scheme == "ZScoreNormalization":
            if use_mask_for_norm[c]:
                mask = seg[0] >= 0
                mean, std = image[mask].mean(), image[mask].std()
                image[mask] = (image[mask] - mean) / max(std, 1e-8)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, 1e-8)
        elif scheme != "NoNormalization":
            raise ValueError(f"normalisation {scheme!r} is not supported")
        data[c] = image
    return data


def compute_new_shape(old_shape, old_spacing, new_spacing) -> np.ndarray:
    return np.array([int(round(i / j * k)) for i, j, k in zip(old_spacing, new_spacing, old_shape)])


def _separate_z(force_separate_z: bool | None, current_spacing, new_spacing,
                threshold: float = ANISO_THRESHOLD) -> tuple[bool, int | None]:
    """Whether to resample one (anisotropic) axis separately with order_z, and which."""
    def anisotropic(spacing):
        return (np.max(spacing) / np.min(spacing)) > threshold

    def lowres_axis(spacing):
        return np.where(max(spacing) / np.array(spacing) == 1)[0]

    if force_separate_z is not None:
        do_separate = bool(force_separate_z)
        axis = lowres_axis(current_spacing) if force_separate_z else None
    elif anisotropic(current_spacing):
        do_separate, axis = True, lowres_axis(current_spacing)
    elif anisotropic(new_spacing):
        do_separate, axis = True, lowres_axis(new_spacing)
    else:
        do_separate, axis = False, None
    if axis is not None:
        if len(axis) in (2, 3):
            return False, None
        return do_separate, int(axis[0])
    return do_separate, None


def _resize(image: np.ndarray, shape, order: int) -> np.ndarray:
    """skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False) on float64
    input: scipy's grid-mode zoom with edge padding, clipped to the input's range."""
    from scipy import ndimage

    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / f for f in factors], order=order, mode="nearest", cval=0, grid_mode=True)
    np.clip(out, np.asarray(np.min(image)), np.asarray(np.max(image)), out=out)
    return out


def resample_to_shape(data: np.ndarray, new_shape, current_spacing, new_spacing, *, is_seg: bool = False,
                      order: int = 3, order_z: int = 0, force_separate_z: bool | None = False,
                      separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> np.ndarray:
    """nnU-Net's `resample_data_or_seg_to_shape` for images and logits (C, *spatial)."""
    from scipy.ndimage import map_coordinates

    if is_seg:
        raise ValueError("segmentation resampling is not needed at inference")
    if isinstance(data, torch.Tensor):
        data = data.numpy()
    do_separate_z, axis = _separate_z(force_separate_z, current_spacing, new_spacing, separate_z_anisotropy_threshold)
    shape = np.array(data[0].shape)
    new_shape = np.array(new_shape)
    if not np.any(shape != new_shape):
        return data
    out = np.zeros((data.shape[0], *new_shape), dtype=data.dtype)
    data = data.astype(float, copy=False)
    for c in range(data.shape[0]):
        if not do_separate_z:
            out[c] = _resize(data[c], new_shape, order)
            continue
        in_plane = [a for a in range(3) if a != axis]
        tmp = deepcopy(new_shape)
        tmp[axis] = shape[axis]
        stacked = np.zeros(tmp)
        for i in range(shape[axis]):
            index: list[Any] = [slice(None)] * 3
            index[axis] = i
            stacked[tuple(index)] = _resize(data[c][tuple(index)], new_shape[in_plane], order)
        if shape[axis] == new_shape[axis]:
            out[c] = stacked
            continue
        scale = [float(o) / n for o, n in zip(stacked.shape, new_shape)]
        grid = np.mgrid[: new_shape[0], : new_shape[1], : new_shape[2]].astype(float)
        coords = np.array([s * (g + 0.5) - 0.5 for s, g in zip(scale, grid)])
        out[c] = map_coordinates(stacked, coords, order=order_z, mode="nearest")
    return out


def preprocess(image: np.ndarray, spacing: list[float], prep: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """DefaultPreprocessor.run_case_npy for inference.

    Args:
        image: (C, z, y, x) as nnU-Net reads it (any float/int dtype).
        spacing: the image's spacing in the same (z, y, x) order, mm.
        prep: the `preprocessing` block of a part's config.json.

    Returns:
        (data (C, *network grid) float32, properties to undo it).
    """
    # C-contiguous, as nnU-Net's readers hand it over: the layout decides the summation order
    # of the z-score mean/std, and so their last bits
    data = np.array(image, dtype=np.float32, order="C")  # a copy: normalisation works in place
    forward = prep["transpose_forward"]
    data = data.transpose([0, *[i + 1 for i in forward]])
    original_spacing = [spacing[i] for i in forward]
    props: dict[str, Any] = {"spacing": list(spacing), "shape_before_cropping": data.shape[1:]}
    data, seg, bbox = crop_to_nonzero(data)
    props["bbox_used_for_cropping"] = bbox
    props["shape_after_cropping_and_before_resampling"] = data.shape[1:]
    target_spacing = prep["spacing"]
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
    data = normalise(data, seg, prep["normalization_schemes"], prep["use_mask_for_norm"],
                     prep["foreground_intensity_properties_per_channel"])
    data = resample_to_shape(data, new_shape, original_spacing, target_spacing, **prep["resampling_fn_data_kwargs"])
    return data, props


def logits_to_labels(logits: torch.Tensor, props: dict[str, Any], prep: dict[str, Any]) -> np.ndarray:
    """Export: logits (K, *network grid) -> labels (z, y, x) on the grid `preprocess` was given."""
    forward = prep["transpose_forward"]
    spacing_transposed = [props["spacing"][i] for i in forward]
    logits_np = resample_to_shape(logits, props["shape_after_cropping_and_before_resampling"], prep["spacing"],
                                  spacing_transposed, **prep["resampling_fn_probabilities_kwargs"])
    if isinstance(logits_np, torch.Tensor):
        logits_np = logits_np.numpy()
    cropped = logits_np.argmax(0)
    dtype = np.uint8 if logits_np.shape[0] - 1 < 255 else np.uint16
    labels = np.zeros(props["shape_before_cropping"], dtype=dtype)
    labels[tuple(slice(lo, hi) for lo, hi in props["bbox_used_for_cropping"])] = cropped
    return labels.transpose(prep["transpose_backward"])


# ---------------------------------------------------------------- sliding window

def compute_steps(image_size, tile_size, tile_step_size: float) -> list[list[int]]:
    """Tile start positions per axis: as few tiles as cover the axis with steps of at most
    tile*step, spread evenly between 0 and size - tile (nnU-Net's rule)."""
    if not 0 < tile_step_size <= 1:
        raise ValueError(f"tile_step_size must be in (0, 1], got {tile_step_size}")
    targets = [t * tile_step_size for t in tile_size]
    counts = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, targets, tile_size)]
    steps = []
    for size, tile, n in zip(image_size, tile_size, counts):
        largest = size - tile
        actual = largest / (n - 1) if n > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(n)])
    return steps


@lru_cache(maxsize=2)
def gaussian_importance(tile_size: tuple[int, ...], sigma_scale: float = 1.0 / 8, value_scale: float = 10.0) -> torch.Tensor:
    """fp16 importance map: a centred impulse blurred with sigma = tile * sigma_scale, peak = value_scale,
    zeros replaced by the smallest non-zero value."""
    from scipy.ndimage import gaussian_filter

    impulse = np.zeros(tile_size)
    impulse[tuple(t // 2 for t in tile_size)] = 1
    blurred = gaussian_filter(impulse, [t * sigma_scale for t in tile_size], 0, mode="constant", cval=0)
    blurred /= np.max(blurred) / value_scale
    weights = torch.from_numpy(blurred).to(dtype=torch.float16)
    zero = weights == 0
    weights[zero] = torch.min(weights[~zero])
    return weights


def pad_to_patch(image: torch.Tensor, patch_size) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes of (C, *spatial) up to the patch size, content centred (the
    odd voxel after it); also the slicer that removes the padding."""
    old = np.array(image.shape)
    new = np.array([image.shape[0], *[max(p, s) for p, s in zip(patch_size, image.shape[1:])]])
    below = (new - old) // 2
    above = below + (new - old) % 2
    if np.any(below) or np.any(above):
        pad = [int(v) for pair in zip(below[::-1], above[::-1]) for v in pair]
        image = torch.nn.functional.pad(image, pad, "constant", 0)
    slicer = tuple(slice(int(b), int(n - a)) for b, a, n in zip(below, above, image.shape))
    return image, slicer


@torch.inference_mode()
def sliding_window_logits(network: torch.nn.Module, data: torch.Tensor, patch_size, tile_step_size: float,
                          device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Logits (K, *spatial) of `network` over `data` (C, *spatial), Gaussian-blended in fp16.

    The tile loop order (x, then y, then z) and the fp16 accumulators are nnU-Net's: the sums
    are not associative in fp16, so another order could flip a near-tied argmax.
    """
    device = torch.device(device)
    network = network.to(device).eval()
    padded, unpad = pad_to_patch(data, patch_size)
    steps = compute_steps(padded.shape[1:], patch_size, tile_step_size)
    gaussian = gaussian_importance(tuple(int(p) for p in patch_size)).to(device)
    logits = weights = None
    tiles = [(sx, sy, sz) for sx in steps[0] for sy in steps[1] for sz in steps[2]]
    iterator = tiles
    if progress:
        from tqdm import tqdm

        iterator = tqdm(tiles, desc="windows", leave=False)
    autocast = torch.autocast("cuda", enabled=True) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        for start in iterator:
            window = (slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)])
            tile = torch.clone(padded[window][None], memory_format=torch.contiguous_format).to(device)
            prediction = network(tile)[0]
            if logits is None:
                logits = torch.zeros((prediction.shape[0], *padded.shape[1:]), dtype=torch.half, device=device)
                weights = torch.zeros(padded.shape[1:], dtype=torch.half, device=device)
            prediction *= gaussian
            logits[window] += prediction
            weights[window[1:]] += gaussian
    torch.div(logits, weights, out=logits)
    if torch.any(torch.isinf(logits)):
        raise RuntimeError("infinite logits after blending (fp16 overflow); the network outputs are out of range")
    return logits[(slice(None), *unpad[1:])].cpu()
