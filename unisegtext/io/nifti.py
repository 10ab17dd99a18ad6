"""NIfTI reading and writing that keeps the input grid exactly."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from unisegtext.errors import VolumeError
from unisegtext.io.volume import Volume

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def read_nifti(path: str | os.PathLike, *, channel: int | None = None, modality: str | None = None,
               max_memory_gb: float | None = None) -> Volume:
    """Read a .nii/.nii.gz file into a :class:`Volume`.

    The header is checked before any voxel is read: its voxel sizes (a zero or non-finite
    ``pixdim`` that nibabel would silently read as 1 mm is refused unless an sform defines
    the geometry) and its voxel count against the memory limit.

    Args:
        path: the file.
        channel: for a 4D file, which volume along the 4th axis to use.
        modality: "CT" or "MR" when known.
        max_memory_gb: memory limit (see :mod:`unisegtext.resources`).
    """
    from unisegtext.resources import check_input_size

    path = Path(path)
    if path.stat().st_size == 0:
        raise VolumeError(f"{path} is an empty file (0 bytes); re-export or re-download the scan")
    try:
        raw = _raw_header(path)
        _check_voxel_sizes(raw, path)
        shape = tuple(int(s) for s in raw.get_data_shape())
        _check_dimensions(shape, str(path))  # before reading: a 40^3 x 1 x 32767 file is 8 GB of data
        voxels = 1
        for n in shape[:3]:  # one 3D volume is read (of a 4D file: the chosen channel)
            voxels *= max(1, n)
        check_input_size(voxels, max_memory_gb, str(path))
        img = nib.load(str(path))
        return volume_from_nifti(img, channel=channel, modality=modality, source=str(path))
    except (VolumeError, MemoryError):
        raise
    except (nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError,
            OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, IndexError, TypeError) as exc:
        raise VolumeError(
            f"{path} could not be read as NIfTI ({type(exc).__name__}: {exc}); the file is "
            "corrupt or not a NIfTI image"
        ) from exc


def _raw_header(path: Path):
    """The header as stored (nibabel's loaded header has zero voxel sizes already replaced by 1)."""
    with nib.openers.ImageOpener(str(path)) as handle:
        start = handle.read(4)
        sizeof_hdr = int.from_bytes(start, "little")
        if sizeof_hdr not in (348, 540):
            sizeof_hdr = int.from_bytes(start, "big")
        if sizeof_hdr not in (348, 540):  # garbage would otherwise be read as (huge) dimensions
            raise nib.filebasedimages.ImageFileError(f"the header size is {sizeof_hdr}, not 348 (NIfTI-1) or 540 (NIfTI-2)")
        handle.seek(0)
        klass = nib.Nifti2Header if sizeof_hdr == 540 else nib.Nifti1Header
        return klass.from_fileobj(handle, check=False)


def _check_voxel_sizes(header, path: Path) -> None:
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if np.all(np.isfinite(pixdim)) and np.all(pixdim != 0):
        return
    if int(header["sform_code"]) > 0:
        srow = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        if np.all(np.isfinite(srow)) and abs(np.linalg.det(srow[:, :3])) > 1e-12:
            logger.warning("%s: pixdim %s holds a zero or non-finite voxel size; the geometry comes from "
                           "its sform, which is valid", path, pixdim.tolist())
            return
    raise VolumeError(
        f"{path}: the header gives voxel sizes {pixdim.tolist()} mm (pixdim[1:4]) and no valid sform; a zero "
        "or missing voxel size would be read as 1 mm and every volume would be wrong. Fix the header "
        "(e.g. nibabel: img.header.set_zooms(...)) and save the scan again"
    )


def _check_dimensions(shape: tuple[int, ...], what: str) -> None:
    """Refuse images with more than 4 dimensions (beyond trailing axes of size 1): which of their
    volumes is the scan cannot be chosen, and reading them all could take any amount of memory."""
    extra = [int(n) for n in shape[4:]]
    if any(n > 1 for n in extra):
        raise VolumeError(
            f"{what} has {len(shape)} dimensions {tuple(int(n) for n in shape)}; pass one 3D volume (or a 4D "
            "file with channel=N / --channel N). Save the volume you want to segment as its own NIfTI file"
        )


def volume_from_nifti(img: Any, *, channel: int | None = None, modality: str | None = None, source: str | None = None) -> Volume:
    """Turn a nibabel spatial image into a :class:`Volume` (keeps its header)."""
    if not hasattr(img, "affine") or not hasattr(img, "get_fdata"):
        raise VolumeError(f"expected a nibabel image, got {type(img).__name__}")
    shape = img.shape
    what = source or "nibabel image"
    if hasattr(img, "get_data_dtype") and np.dtype(img.get_data_dtype()).kind == "c":  # get_fdata would drop the imaginary part
        raise VolumeError(f"{what} holds complex numbers ({np.dtype(img.get_data_dtype())}); pass the magnitude image "
                          "(e.g. np.abs(data)): dropping the imaginary part silently would change the scan")
    _check_dimensions(shape, what)
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
        if array.ndim > 3 and all(n == 1 for n in array.shape[3:]):  # (X, Y, Z, 1, 1): one volume
            array = array.reshape(array.shape[:3])
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
