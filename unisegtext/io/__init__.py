"""Reading scans into :class:`Volume` records and writing masks on the input grid."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.errors import VolumeError
from unisegtext.io.nifti import (
    image_like,
    is_nifti,
    read_nifti,
    save_nifti_atomic,
    volume_from_nifti,
)
from unisegtext.io.volume import Volume, check_array, guess_modality

VolumeLike = Any  # str | os.PathLike | nibabel image | Volume | (array, affine)

__all__ = [
    "Volume",
    "VolumeLike",
    "read_volume",
    "check_array",
    "guess_modality",
    "image_like",
    "save_nifti_atomic",
    "read_nifti",
]


def read_volume(
    source: VolumeLike,
    affine: np.ndarray | None = None,
    *,
    modality: str | None = None,
    channel: int | None = None,
    series_uid: str | None = None,
    max_memory_gb: float | None = None,
) -> Volume:
    """Read anything that names a 3D scan into a :class:`Volume`.

    Args:
        source: a NIfTI path (.nii, .nii.gz), a DICOM series folder or .zip, a nibabel image,
            a :class:`Volume`, or a numpy array (then `affine` is required).
        affine: (4, 4) voxel -> RAS mm matrix, only with an array.
        modality: "CT" or "MR" when known (else read from DICOM or guessed from intensities).
        channel: for 4D inputs, which volume to use.
        series_uid: for a DICOM folder with several series, which one.
        max_memory_gb: refuse a NIfTI whose header declares more voxels than this allows
            (default: :func:`unisegtext.resources.default_memory_limit_gb`).

    Raises:
        VolumeError: missing path, not a regular file or folder, unreadable file, wrong
            dimensionality, NaNs...
        ResourceLimitError: the scan is too large to read within the memory limit.
    """
    if isinstance(source, Volume):
        if modality is not None and source.modality != modality:
            return Volume(source.array, source.affine, modality, source.header, source.source, dict(source.meta))
        return source
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not hasattr(source, "affine")):
        if affine is None:
            raise VolumeError(
                "an array needs its affine: segment(array, prompts, affine=np.diag([sx, sy, sz, 1])) "
                "with the voxel size in mm"
            )
        array = source
        if np.ndim(array) == 4 and channel is not None:
            array = np.asarray(array)[..., channel]
        return Volume(check_array(array), affine, modality=modality, source="array")
    if hasattr(source, "affine") and hasattr(source, "get_fdata"):
        return volume_from_nifti(source, channel=channel, modality=modality)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise VolumeError(f"{path} does not exist; check the path (relative paths start at {Path.cwd()})")
        if not path.is_dir() and not path.is_file():  # a FIFO, device or socket would block or never end
            raise VolumeError(
                f"{path} is not a regular file or folder (a pipe, device or socket); save the scan to a "
                ".nii/.nii.gz file or a DICOM folder/.zip and pass that"
            )
        if path.is_dir() or not is_nifti(path) and zipfile.is_zipfile(path):
            from unisegtext.io.dicom import read_dicom_series

            return read_dicom_series(path, series_uid=series_uid, modality=modality)
        if series_uid is not None:
            raise VolumeError(f"series_uid (--series) selects a series of a DICOM folder or .zip; {path.name} is not one")
        if is_nifti(path):
            return read_nifti(path, channel=channel, modality=modality, max_memory_gb=max_memory_gb)
        if path.suffix.lower() in (".dcm", ""):
            raise VolumeError(f"{path} is a single file; pass the folder (or .zip) holding the whole DICOM series")
        raise VolumeError(
            f"{path}: unsupported file type {''.join(path.suffixes) or '(none)'}; "
            "pass a .nii/.nii.gz file, a DICOM folder or a .zip of a DICOM series"
        )
    raise VolumeError(
        f"cannot read a scan from {type(source).__name__}; pass a path, a nibabel image, a Volume "
        "or a numpy array with affine="
    )
