"""DICOM series reading (a folder or a .zip of one series).

Slices are sorted by their position along the slice normal and RescaleSlope/Intercept is
applied, so CT comes out in Hounsfield units. DICOM patient coordinates are LPS; the
returned affine is RAS like nibabel's.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.errors import VolumeError
from unisegtext.io.volume import Volume

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise VolumeError(
            "reading DICOM needs pydicom: pip install 'unisegtext[dicom]'"
        ) from exc
    return pydicom


def _iter_datasets(path: Path):
    """Yield (name, dataset) for every DICOM file in a folder (recursively) or a zip."""
    pydicom = _pydicom()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            try:
                yield str(file), pydicom.dcmread(str(file))
            except Exception:  # not DICOM (a README, DICOMDIR, thumbnails): skip
                logger.debug("skipping non-DICOM file %s", file)
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise VolumeError(f"{path} is not a valid zip archive ({exc})") from exc
    with archive:
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if info.is_dir():
                continue
            try:
                yield f"{path}!{info.filename}", pydicom.dcmread(io.BytesIO(archive.read(info)))
            except Exception:
                logger.debug("skipping non-DICOM member %s", info.filename)


def read_dicom_series(path: str | os.PathLike, *, series_uid: str | None = None, modality: str | None = None) -> Volume:
    """Read one DICOM image series from a folder or a .zip into a :class:`Volume`.

    Args:
        path: folder (searched recursively) or zip archive.
        series_uid: which SeriesInstanceUID to read when there are several; by default the
            series with the most slices, with a warning naming the others.
        modality: overrides the DICOM Modality tag.
    """
    path = Path(path)
    series: dict[str, list[tuple[str, Any]]] = defaultdict(list)
    for name, ds in _iter_datasets(path):
        if "PixelData" not in ds or "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        series[str(ds.get("SeriesInstanceUID", ""))].append((name, ds))
    if not series:
        raise VolumeError(
            f"{path} holds no DICOM image slices with position and orientation; pass a folder or "
            ".zip of one CT/MR series, or a NIfTI file"
        )
    if series_uid is not None:
        if series_uid not in series:
            raise VolumeError(f"series {series_uid} not found in {path}; found: {sorted(series)}")
        chosen = series_uid
    else:
        chosen = max(series, key=lambda uid: len(series[uid]))
        if len(series) > 1:
            logger.warning(
                "%s holds %d series; reading %s (%d slices). Choose another with series_uid=... "
                "(CLI: --series UID); the others: %s",
                path, len(series), chosen, len(series[chosen]), ", ".join(sorted(u for u in series if u != chosen)),
            )
    slices = series[chosen]
    if len(slices) < 2:
        raise VolumeError(
            f"{path}: series {chosen} has a single slice; a 3D volume needs at least 2 slices"
        )
    first_name, first = slices[0]
    try:
        orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64).reshape(6)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{first_name}: ImageOrientationPatient {first.ImageOrientationPatient!r} is not 6 numbers") from exc
    row_dir, col_dir = orientation[:3], orientation[3:]
    if (not np.all(np.isfinite(orientation)) or abs(np.linalg.norm(row_dir) - 1) > 0.01
            or abs(np.linalg.norm(col_dir) - 1) > 0.01 or abs(float(np.dot(row_dir, col_dir))) > 0.01):
        raise VolumeError(
            f"{first_name}: ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors "
            "(zero, missing or corrupt); the slice geometry cannot be known. Re-export the series from the scanner/PACS"
        )
    pixel_spacing = first.get("PixelSpacing")
    try:
        row_spacing, col_spacing = (float(v) for v in pixel_spacing)
    except (TypeError, ValueError):
        raise VolumeError(
            f"{first_name}: PixelSpacing (0028,0030) is missing or not two numbers ({pixel_spacing!r}); without it "
            "the voxel size is unknown. Re-export the series with its geometry tags"
        ) from None
    if not (np.isfinite(row_spacing) and np.isfinite(col_spacing) and row_spacing > 0 and col_spacing > 0):
        raise VolumeError(f"{first_name}: PixelSpacing {[row_spacing, col_spacing]} must be two positive numbers (mm)")
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda item: float(np.dot(normal, np.asarray(item[1].ImagePositionPatient, float))))
    positions = np.array([np.asarray(ds.ImagePositionPatient, float) for _, ds in slices])
    gaps = np.diff(positions @ normal)
    if np.any(np.abs(gaps) < 1e-4):
        raise VolumeError(f"{path}: two slices share one position along the slice normal; the folder holds duplicate "
                          "slices or mixes series (choose one with series_uid= / --series)")
    if np.ptp(gaps) > 0.01 * max(abs(float(np.mean(gaps))), 1e-3) + 1e-3:
        logger.warning("%s: slice spacing is not uniform (%.3f to %.3f mm); using the mean",
                       path, float(gaps.min()), float(gaps.max()))

    planes = []
    for name, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise VolumeError(f"{name}: pixel data could not be decoded ({exc})") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(pixels * slope + intercept)
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise VolumeError(f"{path}: slices have different sizes {sorted(shapes)}")
    # pixel_array is (rows, columns) = (j, i); store as (i, j, k)
    array = np.stack(planes, axis=-1).transpose(1, 0, 2)

    step = (positions[-1] - positions[0]) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing   # along i (columns)
    lps[:3, 1] = col_dir * row_spacing   # along j (rows)
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    affine = LPS_TO_RAS @ lps

    tag_modality = str(first.get("Modality", "")).upper()
    meta = {
        "format": "dicom",
        "series_instance_uid": chosen,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "files": [name for name, _ in slices],
        # headers without pixel data: what a DICOM SEG writer needs to reference the source
        "datasets": [_without_pixels(ds) for _, ds in slices],
    }
    how = "given" if modality is not None else None
    if modality is None and tag_modality in ("CT", "MR"):
        modality, how = tag_modality, "dicom"
    return Volume(array, affine, modality=modality, source=str(path), meta=meta, modality_source=how)


def _without_pixels(ds: Any) -> Any:
    header = ds.copy()
    if "PixelData" in header:
        del header.PixelData
    return header
