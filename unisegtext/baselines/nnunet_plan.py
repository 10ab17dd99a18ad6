"""nnU-Net's default 3D full-resolution plan, re-derived for a MONAI DynUNet specialist.

nnU-Net v2 (``nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py``
and ``network_topology.py``, read at MIC-DKFZ/nnUNet) derives the network from the target
spacing and the median image shape:

1. Initial patch: proportional to 1/spacing with the volume of 256**3 voxels, clipped to the
   median shape.
2. Topology (``get_pool_and_conv_props``): repeatedly pool (stride 2) every axis whose feature
   map is still >= 2 * 4 voxels and whose current spacing is within a factor 2 of the smallest
   current spacing among those axes (a lone axis needs >= 3 * 4 voxels); an axis's kernel
   becomes 3 (from 1) once its spacing is within a factor 2 of the smallest spacing and stays
   3; the bottleneck always has kernel 3. The patch is padded up to a multiple of 2**pools.
3. Memory: while the summed conv feature-map size of the U-Net (a proxy for activation memory)
   exceeds 560e6 for an 8 GB target (batch 2), shrink the axis whose patch/median ratio is
   largest by its divisibility step and re-plan.
4. Batch size: reference / estimate * 2, capped so one batch covers at most 5 % of the dataset's
   voxels, and at least 2. Features: 32 * 2**stage, at most 320; 2 convs per stage in encoder
   and decoder; instance norm; leaky ReLU.
5. Deep supervision: one output per decoder resolution except the lowest, weights 1/2**i,
   normalised (nnU-Net zeroes the weight of its lowest output; here it is not built).

This module is our own re-implementation of those rules (no nnU-Net code); it is torch-free.
One deliberate difference: nnU-Net's kernel update indexes the spacing list of the poolable
axes with the axis number (``spacings_of_axes[d]``); we compare axis d's own current spacing,
which is what nnU-Net's comment describes and gives the same result whenever all axes can pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from unisegtext.errors import ConfigError

MIN_FEATURE_MAP_EDGE = 4  # nnU-Net: UNet_featuremap_min_edge_length
REFERENCE_FEATURE_MAP_3D = 560_000_000  # nnU-Net: UNet_reference_val_3d, for 8 GB and batch 2
REFERENCE_VRAM_GB = 8.0
REFERENCE_BATCH_3D = 2
MIN_BATCH_SIZE = 2
MAX_DATASET_COVERED = 0.05
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
CONVS_PER_STAGE = 2


@dataclass
class Topology:
    """Pooling and kernels of a U-Net for one patch size and spacing.

    Attributes:
        num_pool_per_axis: number of stride-2 poolings along each axis.
        strides: per stage, the stride of its first conv (stage 0: all 1).
        kernel_sizes: per stage, the conv kernel size along each axis (1 or 3).
        patch_size: the patch, padded up to a multiple of ``2**num_pool_per_axis``.
        divisible_by: 2**num_pool_per_axis.
    """

    num_pool_per_axis: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    patch_size: list[int]
    divisible_by: list[int]


@dataclass
class SpecialistPlan:
    """Everything that builds and trains the specialist (an nnU-Net "3d_fullres" plan).

    Attributes:
        spacing_mm: voxel size the network is trained at (the data's spacing).
        median_shape: median case shape at that spacing, in voxels.
        patch_size: training/inference patch in voxels.
        strides, kernel_sizes: per stage (see :class:`Topology`).
        features: channels per stage.
        batch_size: patches per step.
        deep_supervision_outputs: extra outputs below full resolution (DynUNet ``deep_supr_num``).
        num_classes: network outputs (softmax: background + classes; regions: one per region).
        in_channels: image channels.
        feature_map_size: nnU-Net's memory proxy for this plan.
        notes: how the plan was reached.
    """

    spacing_mm: list[float]
    median_shape: list[int]
    patch_size: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    features: list[int]
    batch_size: int
    deep_supervision_outputs: int
    num_classes: int
    in_channels: int = 1
    feature_map_size: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pad_to_divisible(shape: Sequence[int], divisible_by: Sequence[int]) -> list[int]:
    """Round each side up to a multiple of its divisor (unchanged when already divisible)."""
    return [int(math.ceil(s / d) * d) for s, d in zip(shape, divisible_by)]


def plan_topology(
    spacing_mm: Sequence[float],
    patch_size: Sequence[int],
    min_feature_map_edge: int = MIN_FEATURE_MAP_EDGE,
    max_num_pool: int = 999_999,
) -> Topology:
    """nnU-Net's pooling/kernel rule for a patch at a spacing (see the module docstring).

    Args:
        spacing_mm: voxel size per axis.
        patch_size: patch in voxels per axis.
        min_feature_map_edge: smallest bottleneck edge (nnU-Net: 4).
        max_num_pool: at most this many poolings per axis.
    """
    if len(spacing_mm) != len(patch_size) or any(s <= 0 for s in spacing_mm) or any(p < 1 for p in patch_size):
        raise ConfigError(
            f"spacing {tuple(spacing_mm)} and patch {tuple(patch_size)} must have the same length, "
            "positive spacings and patch sides >= 1"
        )
    dim = len(spacing_mm)
    spacing = [float(s) for s in spacing_mm]
    size = [float(p) for p in patch_size]
    strides: list[list[int]] = [[1] * dim]
    kernels: list[list[int]] = []
    pools = [0] * dim
    kernel = [1] * dim
    while True:
        poolable = [a for a in range(dim) if size[a] >= 2 * min_feature_map_edge]
        if not poolable:
            break
        finest = min(spacing[a] for a in poolable)
        poolable = [a for a in poolable if spacing[a] / finest < 2 and pools[a] < max_num_pool]
        if len(poolable) == 1 and size[poolable[0]] < 3 * min_feature_map_edge:
            break
        if not poolable:
            break
        finest_all = min(spacing)
        for a in range(dim):
            if kernel[a] != 3 and spacing[a] / finest_all < 2:
                kernel[a] = 3
        stride = [1] * dim
        for a in poolable:
            stride[a] = 2
            pools[a] += 1
            spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * dim)  # bottleneck
    divisible_by = [2**p for p in pools]
    return Topology(
        num_pool_per_axis=pools,
        strides=strides,
        kernel_sizes=kernels,
        patch_size=pad_to_divisible(patch_size, divisible_by),
        divisible_by=divisible_by,
    )


def features_per_stage(num_stages: int, base: int = BASE_FEATURES, maximum: int = MAX_FEATURES_3D) -> list[int]:
    return [min(maximum, base * 2**i) for i in range(num_stages)]


def conv_feature_map_size(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    num_classes: int,
    convs_per_stage: int = CONVS_PER_STAGE,
    deep_supervision: bool = True,
) -> int:
    """nnU-Net's activation-memory proxy: summed output sizes (channels x voxels) of every conv.

    Encoder: each stage's convs at its resolution. Decoder (per level above the bottleneck):
    its convs, the transposed conv, and the segmentation output (every level with deep
    supervision, else only the top one). One sample; no batch dimension.
    """
    sizes: list[list[int]] = []
    current = [int(p) for p in patch_size]
    total = 0
    for stage, stride in enumerate(strides):
        current = [c // s for c, s in zip(current, stride)]
        sizes.append(current)
        total += convs_per_stage * features[stage] * math.prod(current)
    levels = len(strides) - 1
    for level in range(levels - 1, -1, -1):  # decoder, from just above the bottleneck up
        voxels = math.prod(sizes[level])
        total += (convs_per_stage + 1) * features[level] * voxels
        if deep_supervision or level == 0:
            total += num_classes * voxels
    return int(total)


def deep_supervision_weights(outputs: int) -> list[float]:
    """Loss weights for the full-resolution output and `outputs` lower ones: 1/2**i, normalised."""
    raw = [1.0 / 2**i for i in range(outputs + 1)]
    return [w / sum(raw) for w in raw]


def plan_specialist(
    spacing_mm: Sequence[float],
    median_shape: Sequence[int],
    num_classes: int,
    *,
    in_channels: int = 1,
    num_cases: int | None = None,
    vram_gb: float = REFERENCE_VRAM_GB,
    base_features: int = BASE_FEATURES,
    max_features: int = MAX_FEATURES_3D,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> SpecialistPlan:
    """nnU-Net's 3d_fullres plan for data at `spacing_mm` with median shape `median_shape`.

    Args:
        spacing_mm: the training data's voxel size (nnU-Net: the median spacing).
        median_shape: median case shape in voxels at that spacing.
        num_classes: network outputs.
        in_channels: image channels.
        num_cases: training cases (caps the batch at 5 % of the dataset's voxels).
        vram_gb: GPU memory target (nnU-Net default 8).
        base_features, max_features: channels of stage 0 and the cap (nnU-Net: 32, 320).
        patch_size: fix the patch instead of searching it (then only the topology is derived).
        batch_size: fix the batch size.
    """
    if len(spacing_mm) != 3 or len(median_shape) != 3:
        raise ConfigError(f"a 3D plan needs 3 spacings and a 3D median shape, got {spacing_mm} and {median_shape}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    spacing = [float(s) for s in spacing_mm]
    median = [max(1, int(round(m))) for m in median_shape]
    notes: list[str] = []
    reference = REFERENCE_FEATURE_MAP_3D * vram_gb / REFERENCE_VRAM_GB

    def estimate(topo: Topology) -> int:
        feats = features_per_stage(len(topo.strides), base_features, max_features)
        return conv_feature_map_size(topo.patch_size, topo.strides, feats, num_classes)

    if patch_size is not None:
        topo = plan_topology(spacing, patch_size)
        notes.append(f"patch {list(patch_size)} given; padded to {topo.patch_size}")
    else:
        inverse = [1.0 / s for s in spacing]
        scale = (256**3 / math.prod(inverse)) ** (1 / 3)
        initial = [min(int(round(i * scale)), m) for i, m in zip(inverse, median)]
        topo = plan_topology(spacing, initial)
        notes.append(f"initial patch {initial} (256^3 voxels shaped by 1/spacing, clipped to the median shape)")
        size = estimate(topo)
        while size / REFERENCE_BATCH_3D * 2 > reference:
            ratios = [p / m for p, m in zip(topo.patch_size, median)]
            axis = max(range(3), key=lambda a: (ratios[a], a))
            shrunk = list(topo.patch_size)
            probe = list(shrunk)
            probe[axis] -= topo.divisible_by[axis]
            step = plan_topology(spacing, probe).divisible_by[axis]
            shrunk[axis] -= step
            if shrunk[axis] < 1:
                break
            topo = plan_topology(spacing, shrunk)
            size = estimate(topo)
        notes.append(f"patch {topo.patch_size} fits the {vram_gb:g} GB feature-map budget")
    features = features_per_stage(len(topo.strides), base_features, max_features)
    size = conv_feature_map_size(topo.patch_size, topo.strides, features, num_classes)
    if batch_size is None:
        batch_size = int(round(reference / size * REFERENCE_BATCH_3D))
        if num_cases:
            cap = int(round(math.prod(median) * num_cases * MAX_DATASET_COVERED / math.prod(topo.patch_size)))
            batch_size = min(batch_size, cap)
        batch_size = max(batch_size, MIN_BATCH_SIZE)
    return SpecialistPlan(
        spacing_mm=spacing,
        median_shape=median,
        patch_size=topo.patch_size,
        strides=topo.strides,
        kernel_sizes=topo.kernel_sizes,
        features=features,
        batch_size=int(batch_size),
        deep_supervision_outputs=max(0, len(topo.strides) - 3),
        num_classes=num_classes,
        in_channels=in_channels,
        feature_map_size=size,
        notes=notes,
    )
