"""MONAI augmentation pipelines for training patches.

Spatial transforms act on ``image`` and ``label`` together (label: nearest neighbour);
intensity transforms on ``image`` only. Mirroring is done by the sampler, not here, because a
left-right flip must swap lateral concepts (see :mod:`unisegtext.training.sampling`).
Every random draw comes from the transform's own ``RandomState``, which the sampler reseeds
per patch: a patch is a pure function of (seed, patch index).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from unisegtext.training.config import AugmentSection


def _p(prob: float, factor: float) -> float:
    return float(min(1.0, prob * factor))


def spatial_transforms(cfg: AugmentSection, patch_size: Sequence[int], *, factor: float = 1.0, label_only: bool = False):
    """Affine (+ optional elastic) deformation, output cropped/padded to `patch_size`.

    Args:
        cfg: augmentation settings.
        patch_size: output size (voxels).
        factor: multiplies probabilities and ranges (strong augmentation > 1).
        label_only: deform only ``label`` (the synthetic generator paints the image later).
    """
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        Rand3DElasticd,
        RandAffined,
        SpatialPadd,
    )

    keys = ["label"] if label_only else ["image", "label"]
    modes = ["nearest"] if label_only else ["bilinear", "nearest"]
    pads = ["zeros"] if label_only else ["border", "zeros"]
    rot = math.radians(cfg.rotate_deg) * min(factor, 2.0)
    scale = cfg.scale_range * min(factor, 2.0)
    transforms = []
    if cfg.elastic_prob > 0:
        transforms.append(
            Rand3DElasticd(
                keys=keys, prob=_p(cfg.elastic_prob, factor), sigma_range=cfg.elastic_sigma,
                magnitude_range=cfg.elastic_magnitude, mode=modes, padding_mode=pads,
            )
        )
    transforms += [
        RandAffined(
            keys=keys, prob=_p(cfg.affine_prob, factor), rotate_range=(rot, rot, rot),
            scale_range=(scale, scale, scale), mode=modes, padding_mode=pads,
        ),  # no spatial_size: MONAI would then resample even when the transform does not fire
        CenterSpatialCropd(keys=keys, roi_size=tuple(patch_size)),
        SpatialPadd(keys=keys, spatial_size=tuple(patch_size)),
    ]
    return Compose(transforms)


def intensity_transforms(cfg: AugmentSection, *, factor: float = 1.0):
    """Intensity scale, gamma, blur, low resolution and noise on ``image``."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandSimulateLowResolutiond,
    )

    sigma = cfg.blur_sigma
    return Compose(
        [
            RandScaleIntensityd(keys="image", factors=cfg.intensity_scale, prob=_p(cfg.intensity_scale_prob, factor)),
            RandAdjustContrastd(keys="image", gamma=cfg.gamma, prob=_p(cfg.gamma_prob, factor)),
            RandGaussianSmoothd(keys="image", sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=_p(cfg.blur_prob, factor)),
            RandSimulateLowResolutiond(keys="image", zoom_range=cfg.low_res_zoom, prob=_p(cfg.low_res_prob, factor)),
            RandGaussianNoised(keys="image", std=cfg.noise_std, prob=_p(cfg.noise_prob, factor)),
        ]
    )
