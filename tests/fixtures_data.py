"""Builders of miniature fake dataset copies, one per reader family, in their true layouts.

Each builder writes a few tiny random cases under ``root`` and returns a :class:`FakeDataset`
with the descriptor (as a dict, ready for ``Descriptor.from_dict``) and the ground truth of
every case on the source grid: image (C, X, Y, Z), combined label map (X, Y, Z), affine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

SHAPE = (6, 9, 12)  # divisible by 3: resampling by 3 samples exact voxel centres


@dataclass
class TruthCase:
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray  # (X, Y, Z) int
    affine: np.ndarray  # (4, 4) RAS


@dataclass
class FakeDataset:
    root: Path
    descriptor: dict[str, Any]
    truth: dict[str, TruthCase] = field(default_factory=dict)
    #: a file of one case that a test may corrupt (path relative to root)
    corruptible: dict[str, str] = field(default_factory=dict)


def _affine(kind: int) -> np.ndarray:
    """A few non-trivial voxel -> RAS affines: LPS-like flips, axis permutation, anisotropy."""
    if kind == 0:
        return np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
    if kind == 1:  # array axes (X, Y, Z) run along (S, R, P)
        return np.array([[0, 1.0, 0, 0], [0, 0, -1.0, 3], [2.0, 0, 0, 1], [0, 0, 0, 1]])
    return np.diag([1.0, 1.0, 2.0, 1.0])


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _random_label(rng: np.random.Generator, values: list[int], shape=SHAPE) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    # blocks of each value, so that every value is present and resampling keeps it
    for i, value in enumerate(values):
        x0 = rng.integers(0, shape[0] - 3)
        label[x0 : x0 + 3, 3 * (i % 3) : 3 * (i % 3) + 3, 3 * i % shape[2] : 3 * i % shape[2] + 3] = value
    return label


def _image(rng: np.random.Generator, channels: int = 1, shape=SHAPE) -> np.ndarray:
    return rng.normal(100, 30, size=(channels, *shape)).astype(np.float32)


def _base(dataset_id: str, family: str, layout: dict, labels: dict, targets: dict, modality="CT") -> dict:
    return {
        "id": dataset_id,
        "name": f"fake {family}",
        "version": "",
        "homepage": "",
        "licence": "",
        "citation": "",
        "modality": [modality],
        "body_region": "abdomen",
        "num_cases": 3,
        "layout": {"family": family, **layout},
        "labels": labels,
        "targets": targets,
        "notes": "synthetic test fixture; no licence",
    }


def make_nnunet(root: Path, seed: int = 0) -> FakeDataset:
    """nnU-Net v2 raw: two channels, imagesTr/{case}_{channel:04d}.nii.gz, labels 0/1/2."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": 3, "file_ending": ".nii.gz",
    }))
    fake = FakeDataset(root, _base(
        "fake_nnunet", "nnunet", {}, {0: "background", 1: "liver", 2: "tumour"},
        {"liver": [1, 2], "liver_tumor": [2]}, modality="MR",
    ))
    fake.descriptor["split"] = {"validation": ["liver_002"]}
    for i in range(3):
        case = f"liver_{i:03d}"
        affine = _affine(i)
        image, label = _image(rng, 2), _random_label(rng, [1, 2])
        for c in range(2):
            _save(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", image[c], affine)
        _save(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        fake.truth[case] = TruthCase(image, label, affine)
    fake.corruptible["liver_001"] = "imagesTr/liver_001_0001.nii.gz"
    return fake


def make_msd(root: Path, seed: int = 1) -> FakeDataset:
    """MSD: older dataset.json with a "training" list, one 4D image per case, '._' junk files."""
    rng = np.random.default_rng(seed)
    training = []
    fake = FakeDataset(root, _base(
        "fake_msd", "nnunet", {"images": "imagesTr/{case}.nii.gz", "labels": "labelsTr/{case}.nii.gz"},
        {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"},
        {"brain_tumor_edema": [1], "brain_tumor_enhancing": [3], "brain_tumor_whole": [1, 2, 3]}, modality="MR",
    ))
    for i in range(2):
        case = f"BRATS_{i + 1:03d}"
        affine = _affine(2)
        image, label = _image(rng, 4), _random_label(rng, [1, 2, 3])
        _save(root / "imagesTr" / f"{case}.nii.gz", np.moveaxis(image, 0, -1), affine)
        _save(root / "labelsTr" / f"{case}.nii.gz", label, affine)
        (root / "imagesTr" / f"._{case}.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        fake.truth[case] = TruthCase(image, label, affine)
    (root / "dataset.json").write_text(json.dumps({
        "name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": 2, "training": training,
    }))
    return fake


def make_totalsegmentator(root: Path, seed: int = 2) -> FakeDataset:
    """TotalSegmentator: s0001/ct.nii.gz + s0001/segmentations/<structure>.nii.gz + meta.csv.

    In s0002 kidney_left overlaps spleen (later structure, higher value, wins).
    """
    rng = np.random.default_rng(seed)
    labels = {1: "spleen", 2: "kidney_right", 3: "kidney_left"}
    fake = FakeDataset(root, _base(
        "fake_totalseg", "totalsegmentator", {}, labels,
        {"spleen": [1], "kidney_right": ["kidney_right"], "kidney_left": [3]},
    ))
    splits = {"s0001": "train", "s0002": "val", "s0003": "test"}
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.csv").write_text("image_id;age;split\n" + "".join(f"{c};50;{s}\n" for c, s in splits.items()))
    for i, case in enumerate(splits):
        affine = _affine(i)
        image = (_image(rng) * 10 - 1000).astype(np.float32)
        masks = {name: np.zeros(SHAPE, dtype=np.uint8) for name in labels.values()}
        masks["spleen"][0:3, 0:3, 0:4] = 1
        masks["kidney_right"][3:6, 3:6, 4:8] = 1
        masks["kidney_left"][3:6, 6:9, 8:12] = 1
        if case == "s0002":
            masks["kidney_left"][0:2, 0:2, 0:2] = 1  # overlaps spleen
        truth = np.zeros(SHAPE, dtype=np.uint8)
        for value, name in sorted(labels.items()):
            truth[masks[name] > 0] = value
        ct = np.rint(image[0]).astype(np.int16)
        _save(root / case / "ct.nii.gz", ct, affine)
        for name, mask in masks.items():
            _save(root / case / "segmentations" / f"{name}.nii.gz", mask, affine)
        fake.truth[case] = TruthCase(ct[None].astype(np.float32), truth, affine)
    fake.corruptible["s0003"] = "s0003/segmentations/spleen.nii.gz"
    return fake


def make_case_folders(root: Path, seed: int = 3) -> FakeDataset:
    """KiTS-style: case_00000/imaging.nii.gz + case_00000/segmentation.nii.gz (1 kidney, 2 tumour, 3 cyst)."""
    rng = np.random.default_rng(seed)
    fake = FakeDataset(root, _base(
        "fake_kits", "case_folders",
        {"image": "{case}/imaging.nii.gz", "label": "{case}/segmentation.nii.gz"},
        {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"},
        {"kidney": [1, 2, 3], "kidney_tumor": [2], "kidney_cyst": [3]},
    ))
    for i in range(3):
        case = f"case_{i:05d}"
        affine = _affine(i)
        image, label = _image(rng), _random_label(rng, [1, 2, 3])
        _save(root / case / "imaging.nii.gz", image[0], affine)
        _save(root / case / "segmentation.nii.gz", label, affine)
        fake.truth[case] = TruthCase(image, label, affine)
    fake.corruptible["case_00002"] = "case_00002/imaging.nii.gz"
    return fake


def make_multi_sequence(root: Path, seed: int = 4) -> FakeDataset:
    """BraTS 2023: {case}/{case}-t1n.nii.gz, -t1c, -t2w, -t2f, -seg (1 NCR, 2 ED, 3 ET)."""
    rng = np.random.default_rng(seed)
    fake = FakeDataset(root, _base(
        "fake_brats", "multi_sequence", {},
        {0: "background", 1: "NCR", 2: "ED", 3: "ET"},
        {
            "brain_tumor_necrotic_core": [1], "brain_tumor_edema": [2], "brain_tumor_enhancing": [3],
            "brain_tumor_core": [1, 3], "brain_tumor_whole": [1, 2, 3],
        },
        modality="MR",
    ))
    for i in range(2):
        case = f"BraTS-GLI-{i:05d}-000"
        affine = _affine(0)
        image, label = _image(rng, 4), _random_label(rng, [1, 2, 3])
        for c, seq in enumerate(["t1n", "t1c", "t2w", "t2f"]):
            _save(root / case / f"{case}-{seq}.nii.gz", image[c], affine)
        _save(root / case / f"{case}-seg.nii.gz", label, affine)
        fake.truth[case] = TruthCase(image, label, affine)
    return fake


def make_per_structure(root: Path, seed: int = 5) -> FakeDataset:
    """HaN-Seg/PDDCA-like: {case}/image.nii.gz + {case}/<Structure>.nii.gz; labels keyed by file stem.

    case_02 lacks Parotid_R.nii.gz (so parotid_gland_right is not annotated there) and has an
    extra mask file that no label names.
    """
    rng = np.random.default_rng(seed)
    labels = {"Brainstem": "brainstem", "Parotid_L": "left parotid", "Parotid_R": "right parotid"}
    fake = FakeDataset(root, _base(
        "fake_han", "per_structure_files", {}, labels,
        {"brainstem": ["Brainstem"], "parotid_gland_left": ["Parotid_L"], "parotid_gland_right": ["Parotid_R"]},
    ))
    for i in (1, 2):
        case = f"case_{i:02d}"
        affine = _affine(i)
        image = _image(rng)
        truth = np.zeros(SHAPE, dtype=np.uint8)
        _save(root / case / "image.nii.gz", image[0], affine)
        for value, stem in enumerate(labels, start=1):
            if case == "case_02" and stem == "Parotid_R":
                continue
            mask = np.zeros(SHAPE, dtype=np.uint8)
            mask[value - 1 :: 3, :, 2 * value : 2 * value + 3] = 1
            truth[mask > 0] = value
            _save(root / case / f"{stem}.nii.gz", mask, affine)
        if case == "case_02":
            _save(root / case / "Mandible.nii.gz", np.zeros(SHAPE, dtype=np.uint8), affine)
        fake.truth[case] = TruthCase(image, truth, affine)
    return fake


GREY = {63: 1, 126: 2, 189: 3, 252: 4}


def make_dicom_png(root: Path, seed: int = 6) -> FakeDataset:
    """CHAOS MR-like: {case}/T2SPIR/DICOM_anon/*.dcm + {case}/T2SPIR/Ground/*.png (grey 63/126/189/252).

    File names run opposite to the slice position, so the reader must sort by position;
    pixels are stored as uint16 with RescaleSlope 2 and RescaleIntercept -100.
    """
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    rng = np.random.default_rng(seed)
    fake = FakeDataset(root, _base(
        "fake_chaos", "dicom_png",
        {"dicom": "{case}/T2SPIR/DICOM_anon", "masks": "{case}/T2SPIR/Ground/*.png", "grey_values": dict(GREY), "grey_tolerance": 4},
        {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"},
        {"liver": [1], "kidney_right": [2], "kidney_left": [3], "spleen": [4]},
        modality="MR",
    ))
    rows, cols, n = 9, 6, 12  # array (X = cols, Y = rows, Z = slices) = SHAPE
    row_spacing, col_spacing, step, origin = 0.8, 0.7, 2.5, (-30.0, -40.0, 10.0)
    for case in ("1", "2"):
        stored = rng.integers(0, 1000, size=(n, rows, cols), dtype=np.uint16)  # by position k
        label_rc = np.zeros((n, rows, cols), dtype=np.uint8)
        for v in range(1, 5):
            label_rc[3 * (v - 1) : 3 * v, v : v + 3, 1:4] = v
        grey_of = {v: g for g, v in GREY.items()}
        series_uid = generate_uid()
        folder = root / case / "T2SPIR" / "DICOM_anon"
        ground = root / case / "T2SPIR" / "Ground"
        folder.mkdir(parents=True)
        ground.mkdir(parents=True)
        for k in range(n):
            index = n - 1 - k  # file name order opposite to position order
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(str(folder / f"IMG{index:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID = MRImageStorage
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.SeriesInstanceUID = series_uid
            ds.Modality = "MR"
            ds.Rows, ds.Columns = rows, cols
            ds.PixelSpacing = [row_spacing, col_spacing]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + step * k]
            ds.SliceThickness = step
            ds.InstanceNumber = index + 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept = 2, -100
            ds.PixelData = stored[k].tobytes()
            try:
                pydicom.dcmwrite(str(folder / f"IMG{index:04d}.dcm"), ds, enforce_file_format=True)
            except TypeError:  # pydicom < 3
                ds.is_little_endian, ds.is_implicit_VR = True, False
                ds.save_as(str(folder / f"IMG{index:04d}.dcm"), write_like_original=False)
            grey = np.zeros((rows, cols), dtype=np.uint8)
            for v, g in grey_of.items():
                grey[label_rc[k] == v] = g - 2 if v == 2 else g  # within tolerance
            Image.fromarray(grey).save(ground / f"liver_GT_{index:03d}.png")
        image = np.transpose(stored.astype(np.float32) * 2 - 100, (2, 1, 0))[None]  # (1, X, Y, Z)
        label = np.transpose(label_rc, (2, 1, 0))
        lps = np.array([
            [col_spacing, 0, 0, origin[0]], [0, row_spacing, 0, origin[1]], [0, 0, step, origin[2]], [0, 0, 0, 1],
        ])
        fake.truth[case] = TruthCase(image, label, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)
    fake.corruptible["2"] = "2/T2SPIR/DICOM_anon/IMG0003.dcm"
    return fake


BUILDERS = {
    "nnunet": make_nnunet,
    "msd": make_msd,
    "totalsegmentator": make_totalsegmentator,
    "case_folders": make_case_folders,
    "multi_sequence": make_multi_sequence,
    "per_structure_files": make_per_structure,
    "dicom_png": make_dicom_png,
}


def corrupt(path: Path) -> None:
    """Overwrite a file with bytes that no reader accepts."""
    path.write_bytes(b"\x1f\x8b this is not a valid gzip or DICOM file" + b"\x00" * 64)
