"""Confining tool paths to an allowed folder.

A path an LLM passes is untrusted input: it is resolved (symlinks followed) and must land
inside the allowed root; for a folder, every symlink inside it must too. Size limits are
checked before any file is parsed.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from unisegtext.errors import UniSegError


class ToolInputError(UniSegError, ValueError):
    """A tool call's arguments are not acceptable (outside the allowed root, too large...)."""


def confine(root: str | os.PathLike, given: str) -> Path:
    """Resolve `given` (relative to `root`, or absolute) and require it to lie inside `root`.

    Symlinks are resolved first, so a link that points outside the root is refused like
    ``../../etc/passwd``.

    Raises:
        ToolInputError: empty or malformed path, outside the root, or missing.
    """
    if not isinstance(given, str) or not given.strip():
        raise ToolInputError("the scan path is empty; pass a path relative to the data folder")
    if "\x00" in given:
        raise ToolInputError("the scan path contains a NUL character")
    root_path = Path(root).resolve(strict=True)
    candidate = Path(given)
    if not candidate.is_absolute():
        candidate = root_path / candidate
    resolved = candidate.resolve(strict=False)
    if not _inside(resolved, root_path):
        raise ToolInputError(
            f"{given!r} is outside the data folder this tool may read; pass a path inside it "
            "(relative paths start at the data folder)"
        )
    if not resolved.exists():
        raise ToolInputError(f"{given!r} does not exist in the data folder")
    return resolved


def check_tree(root: str | os.PathLike, folder: Path, *, max_files: int, max_bytes: int) -> None:
    """Check a folder (a DICOM series) before reading it.

    Every symlink inside must resolve inside `root`; the number of files and their total size
    are bounded.

    Raises:
        ToolInputError: a link points out, or the folder is too large.
    """
    root_path = Path(root).resolve(strict=True)
    n_files = 0
    total = 0
    for current, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            entry = Path(current) / name
            if entry.is_symlink() and not _inside(entry.resolve(strict=False), root_path):
                rel = entry.relative_to(folder)
                raise ToolInputError(f"{rel} in the scan folder links outside the data folder; refusing to read it")
        for name in files:
            entry = Path(current) / name
            n_files += 1
            if n_files > max_files:
                raise ToolInputError(f"the scan folder holds more than {max_files} files; pass one series")
            try:
                total += entry.stat().st_size
            except OSError:
                continue
            if total > max_bytes:
                raise ToolInputError(
                    f"the scan folder is larger than {max_bytes / 2**20:.0f} MB, the limit of this tool"
                )


def check_file(path: Path, *, max_bytes: int, max_voxels: int, model_spacing_mm: tuple[float, ...] | None = None,
               max_memory_gb: float | None = None, n_prompts: int = 1) -> None:
    """Check a scan file before it is read: its size (and a zip's uncompressed size); for a
    NIfTI, its voxel count as stored and on the model's grid, and the estimated memory of the
    run (all from the header).

    Raises:
        ToolInputError: not a regular file, too large, or not a readable zip.
        ResourceLimitError: the run would need more memory than allowed.
    """
    if not path.is_file():
        raise ToolInputError(f"{path.name} is not a regular file (a pipe, device or socket cannot be read)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ToolInputError(
            f"{path.name} is {size / 2**20:.0f} MB, larger than the limit of {max_bytes / 2**20:.0f} MB"
        )
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")) and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except zipfile.BadZipFile as exc:
            raise ToolInputError(f"{path.name} is not a valid zip archive ({exc})") from exc
        if unpacked > max_bytes:
            raise ToolInputError(
                f"{path.name} unpacks to {unpacked / 2**20:.0f} MB, larger than the limit of "
                f"{max_bytes / 2**20:.0f} MB"
            )
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel as nib
        import numpy as np

        try:
            image = nib.load(str(path))  # header only
            shape = tuple(int(s) for s in image.header.get_data_shape())[:3]
            # voxel sizes as the reader sees them: from the affine (sform/qform), not pixdim
            zooms = tuple(float(z) for z in np.linalg.norm(image.affine[:3, :3], axis=0))[: len(shape)]
        except Exception:  # unreadable: the reader reports it properly later
            return
        voxels = 1
        for s in shape:
            voxels *= int(s)
        if voxels > max_voxels:
            raise ToolInputError(f"{path.name} has {voxels:,} voxels {tuple(shape)}, more than the limit of {max_voxels:,}")
        if model_spacing_mm is not None and len(zooms) == 3 and all(0 < z < float("inf") for z in zooms):
            from unisegtext.resources import check_memory, estimate_run_memory, model_grid_shape

            grid = model_grid_shape(shape, zooms, model_spacing_mm)
            on_grid = 1
            for s in grid:
                on_grid *= s
            if on_grid > max_voxels:
                raise ToolInputError(
                    f"{path.name} would have {on_grid:,} voxels on the model's {tuple(model_spacing_mm)} mm grid "
                    f"(its voxel size is {tuple(round(z, 3) for z in zooms)} mm), more than the limit of {max_voxels:,}"
                )
            estimate = estimate_run_memory(shape, zooms, model_spacing_mm, n_prompts, n_prompts)
            check_memory(estimate, max_memory_gb, f"segmenting {path.name}")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
