"""NIfTI reading and writing that keeps the input grid exactly."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from unisegtext.errors import VolumeError
from unisegtext.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, *, channel: int | None = None, modality: str | None = None) -> Volume:
    """Read a .nii/.nii.gz file into a :class:`Volume`.

    Args:
        path: the file.
        channel: for a 4D file, which volume along the 4th axis to use.
        modality: "CT" or "MR" when known.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise VolumeError(f"{path} is an empty file (0 bytes); re-export or re-download the scan")
    try:
        img = nib.load(str(path))
        return volume_from_nifti(img, channel=channel, modality=modality, source=str(path))
    except VolumeError:
        raise
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise VolumeError(
            f"{path} could not be read as NIfTI ({type(exc).__name__}: {exc}); the file is "
            "corrupt or not a NIfTI image"
        ) from exc


def volume_from_nifti(img: Any, *, channel: int | None = None, modality: str | None = None, source: str | None = None) -> Volume:
    """Turn a nibabel spatial image into a :class:`Volume` (keeps its header)."""
    if not hasattr(img, "affine") or not hasattr(img, "get_fdata"):
        raise VolumeError(f"expected a nibabel image, got {type(img).__name__}")
    shape = img.shape
    what = source or "nibabel image"
    if len(shape) == 4 and shape[3] > 1:
        if channel is None:
            raise VolumeError(
                f"{what} has 4 dimensions {tuple(shape)}; pass one 3D volume, or choose a "
                "channel/time point with channel=N (CLI: --channel N)"
            )
        if not 0 <= channel < shape[3]:
            raise VolumeError(f"channel={channel} is out of range for {what} with {shape[3]} channels")
        array = np.asarray(img.dataobj[..., channel], dtype=np.float32)
    else:
        try:
            array = np.asarray(img.get_fdata(dtype=np.float32))
        except (EOFError, zlib.error, OSError, ValueError) as exc:
            raise VolumeError(f"{what}: the image data is truncated or corrupt ({exc})") from exc
    header = img.header.copy() if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) else None
    return Volume(array, np.asarray(img.affine), modality=modality, header=header, source=source)


def image_like(array: np.ndarray, reference: Volume) -> nib.Nifti1Image:
    """A NIfTI image of `array` on the reference grid: same affine and qform/sform codes."""
    array = np.asarray(array)
    if array.shape[:3] != reference.shape:
        raise VolumeError(f"array shape {array.shape} does not match the reference grid {reference.shape}")
    header = reference.header
    if header is not None and isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        header = header.copy()
        header.set_data_dtype(array.dtype)
        header.set_slope_inter(1.0, 0.0)  # a mask must not inherit the scan's scaling
        img = nib.Nifti1Image(array, reference.affine, header=header)
        qform, qcode = reference.header.get_qform(coded=True)
        sform, scode = reference.header.get_sform(coded=True)
        img.set_qform(qform if qform is not None else reference.affine, int(qcode))
        img.set_sform(sform if sform is not None else reference.affine, int(scode))
        return img
    img = nib.Nifti1Image(array, reference.affine)
    img.set_qform(reference.affine, 1)
    img.set_sform(reference.affine, 1)
    return img


def save_nifti_atomic(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write a NIfTI file under a temporary name in the same folder, then rename it."""
    path = Path(path)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name[: -len(suffix)]}.partial-{os.getpid()}{suffix}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
