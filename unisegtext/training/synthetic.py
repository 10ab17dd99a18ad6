"""SynthSeg-style synthetic images from real label maps.

In the spirit of Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast
and resolution without retraining" (Medical Image Analysis 2023): a (deformed) label map is
painted with a random Gaussian intensity distribution per label, then blurred (partial
volume), multiplied by a smooth bias field, gamma-transformed, and degraded by noise and
lower resolution (the last two by the shared intensity pipeline). The network so sees
unlimited contrasts of the same anatomy and learns shape rather than one scanner's grey values.
"""

from __future__ import annotations

import numpy as np

from unisegtext.training.config import SyntheticSection


def synthesize_image(label: np.ndarray, rng: np.random.Generator, cfg: SyntheticSection) -> np.ndarray:
    """Paint a label map with random per-label intensities.

    Args:
        label: (X, Y, Z) integer label map (already deformed).
        rng: the patch's random generator.
        cfg: synthetic settings (``std_range``, ``bias_prob``).

    Returns:
        (X, Y, Z) float32 image in about [0, 1] (to be normalised with the MR scheme).
    """
    from scipy import ndimage

    values, inverse = np.unique(label, return_inverse=True)
    means = rng.uniform(0.0, 1.0, size=len(values)).astype(np.float32)
    stds = rng.uniform(cfg.std_range[0], cfg.std_range[1], size=len(values)).astype(np.float32)
    inverse = inverse.reshape(label.shape)
    noise = rng.standard_normal(label.shape, dtype=np.float32)
    image = means[inverse] + stds[inverse] * noise  # (X, Y, Z)

    sigma = rng.uniform(0.3, 1.0, size=3)  # partial-volume blur, voxels per axis
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")

    if rng.random() < cfg.bias_prob:
        coarse = rng.normal(0.0, 0.25, size=(4, 4, 4)).astype(np.float32)
        zoom = [s / 4.0 for s in label.shape]
        field = ndimage.zoom(coarse, zoom, order=3, mode="nearest")[: label.shape[0], : label.shape[1], : label.shape[2]]
        pad = [(0, s - f) for s, f in zip(label.shape, field.shape)]
        field = np.pad(field, pad, mode="edge")
        image = image * np.exp(field)

    low, high = float(image.min()), float(image.max())
    image = (image - low) / max(high - low, 1e-6)
    gamma = float(np.exp(rng.normal(0.0, 0.25)))
    image = np.power(np.clip(image, 0.0, 1.0), gamma)
    return image.astype(np.float32)
