"""Build small but complete DICOM image series from a :class:`Volume` for tests.

The series carries the patient, study, series, frame-of-reference and image-plane modules a
DICOM SEG writer (highdicom) needs from its source images, with real pixel data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unisegtext.io import Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(
    folder: Path,
    vol: Volume,
    modality: str = "CT",
    shuffle: bool = True,
    uid: str = "1.2.3",
    *,
    study_uid: str = "1.2.3.4",
    frame_of_reference_uid: str = "1.2.3.5",
) -> list[Path]:
    """Write `vol` as a multi-slice DICOM series (LPS patient coordinates), one file per slice.

    Pixel values are stored as uint16 with RescaleIntercept -1024 (CT in HU). Files are named
    in a shuffled order when `shuffle` so that readers must sort by position.

    Returns:
        The written files, in file-name order.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    data = np.round(vol.array).astype(np.int32)
    order = list(range(vol.shape[2]))
    if shuffle:
        np.random.default_rng(0).shuffle(order)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    files = []
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{n:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        # patient and study
        ds.PatientName = "Test^Phantom"
        ds.PatientID = "UST-0001"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyID = "1"
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        # series, equipment, frame of reference
        ds.Modality = modality
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = 1
        ds.Manufacturer = "UniSegText tests"
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # image
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SOPClassUID = sop_class
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = -1024.0
        ds.RescaleSlope = 1.0
        ds.PixelData = np.clip(data[:, :, k].T + 1024, 0, 65535).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        files.append(path)
    return sorted(files)
