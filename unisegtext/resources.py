"""Resource bounds of one run: memory estimated before anything large is allocated.

A scan's header says how large everything will be: its voxel count, the model grid it is
resampled to (its extent over the model's spacing), the number of prompts. :func:`estimate_run_memory`
adds up the arrays a :func:`~unisegtext.segment` call holds at its peak, and
:func:`check_memory` refuses a run above the limit with a message that says by how much and
how to raise it (``max_memory_gb=`` in Python, ``--max-memory`` on the command line,
``UNISEGTEXT_MAX_MEMORY_GB`` in the environment). Torch-free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from unisegtext.errors import UniSegError

GiB = 2**30
#: fixed part of a run: interpreter, torch, the model and one window's activations
BASE_BYTES = int(1.5 * GiB)
#: most sliding windows one run may take (overlap close to 1 would otherwise run for days)
MAX_WINDOWS = 20_000
#: the largest sliding-window overlap accepted
MAX_OVERLAP = 0.9


class ResourceLimitError(UniSegError, MemoryError):
    """A run would need more memory (or windows) than allowed."""


#: where a container's memory limit is read (cgroup v2, then v1); "max" or a huge number: none
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def cgroup_memory_bytes(files: Sequence[str] | None = None) -> int | None:
    """The memory limit of this process's container (Docker ``--memory``, a Kubernetes limit,
    a batch job's cgroup), or None when there is none. ``sysconf`` reports the host's RAM inside
    a container, so a limit taken from it alone lets a run grow until the kernel kills it."""
    for name in CGROUP_LIMIT_FILES if files is None else files:
        try:
            text = Path(name).read_text().strip()
        except (OSError, ValueError):
            continue
        if text.isdigit() and 0 < int(text) < 2**60:  # cgroup v1 writes ~2**63 for "no limit"
            return int(text)
    return None


def physical_memory_bytes() -> int | None:
    """The memory this process may use: the machine's RAM, or its container's limit if lower;
    None when neither can be read."""
    try:
        ram: int | None = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        ram = None
    limit = cgroup_memory_bytes()
    if ram is None or (limit is not None and limit < ram):
        return limit
    return ram


def default_memory_limit_gb() -> float:
    """``UNISEGTEXT_MAX_MEMORY_GB`` if set, else 80 % of the machine's RAM or of its container's
    memory limit, whichever is lower (16 GB if neither is known)."""
    env = os.environ.get("UNISEGTEXT_MAX_MEMORY_GB")
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ResourceLimitError(f"UNISEGTEXT_MAX_MEMORY_GB={env!r} is not a number of GB") from None
        if not value > 0 or not math.isfinite(value):
            raise ResourceLimitError(f"UNISEGTEXT_MAX_MEMORY_GB={env!r} must be a positive number of GB")
        return value
    ram = physical_memory_bytes()
    return 0.8 * ram / GiB if ram else 16.0


def memory_limit_bytes(max_memory_gb: float | None) -> int:
    """The limit in bytes: `max_memory_gb`, else the default."""
    if max_memory_gb is None:
        max_memory_gb = default_memory_limit_gb()
    try:
        value = float(max_memory_gb)
    except (TypeError, ValueError):
        raise ResourceLimitError(f"max_memory_gb must be a number of GB, got {max_memory_gb!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise ResourceLimitError(f"max_memory_gb must be a positive number of GB, got {max_memory_gb!r}")
    return int(value * GiB)


@dataclass
class MemoryEstimate:
    """Bytes a run holds at its peak, by part."""

    input_bytes: int
    model_grid_bytes: int
    probability_bytes: int
    output_bytes: int
    base_bytes: int = BASE_BYTES
    window_bytes: int = 0

    @property
    def total(self) -> int:
        return (self.input_bytes + self.model_grid_bytes + self.probability_bytes + self.output_bytes
                + self.base_bytes + self.window_bytes)

    def describe(self) -> str:
        parts = [("input", self.input_bytes), ("model grid", self.model_grid_bytes),
                 ("probability maps", self.probability_bytes), ("masks", self.output_bytes),
                 ("model", self.base_bytes), ("window activations", self.window_bytes)]
        return ", ".join(f"{name} {value / GiB:.2f} GB" for name, value in parts)


def model_grid_shape(shape: Sequence[int], spacing_mm: Sequence[float], target_mm: Sequence[float]) -> tuple[int, ...]:
    """Voxels of the scan resampled to the model's spacing (per axis, in the scan's axis order;
    the product does not depend on the order)."""
    sizes = (n * s / t for n, s, t in zip(shape, spacing_mm, target_mm))
    return tuple(max(1, int(round(v))) if v < 2**62 else 2**62 for v in sizes)  # 1e308 mm voxels: no OverflowError


def estimate_run_memory(
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    target_spacing_mm: Sequence[float],
    n_texts: int,
    n_prompts: int,
    *,
    return_probabilities: bool = False,
    window_bytes: int = 0,
) -> MemoryEstimate:
    """Peak memory of one segmentation run.

    Args:
        shape: the input scan's voxels (X, Y, Z).
        spacing_mm: its voxel size.
        target_spacing_mm: the model's spacing.
        n_texts: texts queried (a union prompt queries several).
        n_prompts: masks returned.
        return_probabilities: float maps on the input grid are returned too.
        window_bytes: activations of one batch of sliding windows
            (:func:`window_activation_bytes`), beyond what ``BASE_BYTES`` covers.
    """
    n_input = math.prod(int(s) for s in shape)
    n_model = math.prod(model_grid_shape(shape, spacing_mm, target_spacing_mm))
    input_bytes = n_input * 4 * 2  # float32 scan + its reoriented, normalised copy
    model_grid = n_model * 4 * 2  # resampled image + the window importance/count map
    probabilities = n_model * 4 * max(1, n_texts) * 2  # output accumulator + post-processed copy
    output = n_input * max(1, n_prompts) * (1 + (4 if return_probabilities else 0)) + n_input * 4 * 2
    return MemoryEstimate(input_bytes, model_grid, probabilities, output, window_bytes=window_bytes)


#: float32 values held per voxel of a window and per feature channel at the peak of one forward
#: pass (measured on the CPU, 2026-12-06: about 3 for the nano and tiny presets; 4 keeps a margin)
ACTIVATION_COPIES = 4
#: part of one window's activations that BASE_BYTES already covers (the nano default's window)
BASE_WINDOW_BYTES = 256 * 2**20


def window_activation_bytes(
    patch_size: Sequence[int],
    channels: Sequence[int],
    embed_dim: int,
    feature_levels: Sequence[int],
    d_model: int,
    n_texts: int,
    max_prompts_per_pass: int,
    sw_batch_size: int,
) -> int:
    """Activation memory of one batch of sliding windows, beyond the part in ``BASE_BYTES``.

    A window of V voxels holds, at its peak, a few float32 copies of the backbone's feature maps
    (level l has V / 8**l voxels with ``channels[l]`` channels each), of the voxel embedding, of
    the decoder's visual tokens (``d_model`` wide, at each of ``feature_levels``) and of the mask
    probabilities of its prompts; ``sw_batch_size`` windows run together. A config with a large
    patch, wide channels or many windows per pass would otherwise pass the memory check and then
    exhaust the machine.
    """
    voxels = math.prod(int(s) for s in patch_size)
    per_voxel = sum(c / 8**level for level, c in enumerate(channels)) + embed_dim
    per_voxel += sum(d_model / 8**level for level in feature_levels if 0 <= level < len(channels))
    per_voxel *= ACTIVATION_COPIES
    per_voxel += 2 * max(1, n_texts) + 3 * max(1, min(n_texts, max_prompts_per_pass))  # outputs; logits
    total = int(voxels * 4 * per_voxel * max(1, sw_batch_size))
    return max(0, total - BASE_WINDOW_BYTES)


def check_memory(estimate: MemoryEstimate, max_memory_gb: float | None, what: str) -> None:
    """Refuse a run whose estimate exceeds the limit.

    Raises:
        ResourceLimitError: with the estimate, the limit, the factor and the way to raise it.
    """
    limit = memory_limit_bytes(max_memory_gb)
    if estimate.total > limit:
        raise ResourceLimitError(
            f"{what} would need about {estimate.total / GiB:.1f} GB of memory ({estimate.describe()}), "
            f"{estimate.total / limit:.1f}x the limit of {limit / GiB:.1f} GB. Check the voxel size in the "
            "header, use fewer prompts, or raise the limit (max_memory_gb= in Python, --max-memory GB on "
            "the command line, UNISEGTEXT_MAX_MEMORY_GB in the environment)"
        )


def check_input_size(n_voxels: int, max_memory_gb: float | None, what: str) -> None:
    """Refuse to load a scan whose header declares more voxels than the limit allows (4 bytes
    each once in float32, twice during reading)."""
    limit = memory_limit_bytes(max_memory_gb)
    need = n_voxels * 8 + BASE_BYTES
    if need > limit:
        raise ResourceLimitError(
            f"{what} declares {n_voxels:,} voxels, about {need / GiB:.1f} GB to read, "
            f"{need / limit:.1f}x the limit of {limit / GiB:.1f} GB. Check the image dimensions in its "
            "header, or raise the limit (max_memory_gb=, --max-memory GB, UNISEGTEXT_MAX_MEMORY_GB)"
        )


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Sliding windows MONAI takes over `shape` (the scan on the model grid) with `overlap`."""
    total = 1
    for size, p in zip(shape, patch):
        if size <= p:
            continue
        step = max(1, int(p * (1.0 - overlap)))
        total *= math.ceil((size - p) / step) + 1
    return total


def check_overlap(overlap: float, shape: Sequence[int], patch: Sequence[int]) -> int:
    """Validate a sliding-window overlap for a model-grid shape; returns the window count.

    Raises:
        ResourceLimitError: overlap outside [0, 0.9], or more than MAX_WINDOWS windows.
    """
    try:
        overlap = float(overlap)
    except (TypeError, ValueError):
        raise ResourceLimitError(f"overlap must be a number in [0, {MAX_OVERLAP}], got {overlap!r}") from None
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise ResourceLimitError(
            f"overlap must be within [0, {MAX_OVERLAP}], got {overlap}; 0.25 (the default) to 0.5 is usual, "
            "and more only multiplies the run time"
        )
    windows = count_windows(shape, patch, overlap)
    if windows > MAX_WINDOWS and count_windows(shape, patch, 0.0) > MAX_WINDOWS:  # no overlap would help
        raise ResourceLimitError(
            f"the scan spans {tuple(shape)} voxels on the model's grid, {windows:,} sliding windows (the limit is "
            f"{MAX_WINDOWS:,}, and even overlap 0 exceeds it); check the voxel size in the header: a wrong one "
            "makes a small scan look huge"
        )
    if windows > MAX_WINDOWS:
        raise ResourceLimitError(
            f"overlap {overlap} would take {windows:,} sliding windows (the limit is {MAX_WINDOWS:,}); "
            "lower the overlap"
        )
    return windows
