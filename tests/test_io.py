"""unisegtext.io: reading volumes, grids, and bad input."""

from __future__ import annotations

import gzip
import zipfile

import nibabel as nib
import numpy as np
import pytest
from dicom_helpers import write_series

from unisegtext.errors import VolumeError
from unisegtext.io import Volume, image_like, read_volume, save_nifti_atomic


def test_read_nifti_keeps_grid_and_header(ct_path):
    vol = read_volume(ct_path)
    assert vol.shape == (122, 101, 112)
    assert np.allclose(vol.spacing, (3, 3, 3))
    assert vol.orientation == "RAS"
    assert vol.guessed_modality() == "CT"
    assert vol.array.min() <= -900  # HU, air outside the body


def test_mr_is_lps_and_guessed_mr(mr_path):
    vol = read_volume(mr_path)
    assert vol.orientation == "LPS"
    assert vol.guessed_modality() == "MR"


@pytest.mark.parametrize("name", ["ct.nii.gz", "mr.nii.gz"])
def test_mask_written_on_input_grid(shared_data, tmp_path, name):
    src = shared_data / "totalseg_examples" / name
    vol = read_volume(src)
    mask = (vol.array > vol.array.mean()).astype(np.uint8)
    out = save_nifti_atomic(image_like(mask, vol), tmp_path / "mask.nii.gz")
    ref, back = nib.load(str(src)), nib.load(str(out))
    assert back.shape == ref.shape
    assert np.allclose(back.affine, ref.affine)
    assert int(back.header["qform_code"]) == int(ref.header["qform_code"])
    assert int(back.header["sform_code"]) == int(ref.header["sform_code"])
    assert np.array_equal(np.asarray(back.dataobj), mask)
    assert not list(tmp_path.glob(".*partial*"))


def test_array_needs_affine():
    with pytest.raises(VolumeError, match="affine"):
        read_volume(np.zeros((8, 8, 8)))
    vol = read_volume(np.zeros((8, 8, 8)), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert vol.spacing == (2.0, 2.0, 2.0)


def test_2d_and_4d_rejected_with_hint():
    with pytest.raises(VolumeError, match="2 dimensions"):
        read_volume(np.zeros((8, 8)), np.eye(4))
    with pytest.raises(VolumeError, match="channel"):
        read_volume(np.zeros((8, 8, 8, 3)), np.eye(4))
    vol = read_volume(np.zeros((8, 8, 8, 3)), np.eye(4), channel=1)
    assert vol.shape == (8, 8, 8)


def test_4d_nifti_needs_channel(tmp_path):
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(VolumeError, match="4 dimensions"):
        read_volume(path)
    assert read_volume(path, channel=0).shape == (6, 6, 6)


def test_nan_rejected():
    data = np.zeros((8, 8, 8))
    data[1, 2, 3] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        read_volume(data, np.eye(4))


def test_missing_empty_corrupt_files(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError, match="empty"):
        read_volume(empty)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(VolumeError, match="corrupt|could not be read"):
        read_volume(corrupt)
    truncated = tmp_path / "truncated.nii.gz"
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), str(good))
    truncated.write_bytes(good.read_bytes()[:400])
    with pytest.raises(VolumeError):
        read_volume(truncated)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"x")
    with pytest.raises(VolumeError, match="unsupported"):
        read_volume(path)


def test_volume_validates_affine():
    with pytest.raises(VolumeError, match="singular"):
        Volume(np.zeros((4, 4, 4)), np.zeros((4, 4)))


def test_dicom_series_folder_and_zip(ct_path, tmp_path):
    pytest.importorskip("pydicom")
    vol = read_volume(ct_path)
    sub = Volume(vol.array[:40, :30, :12], vol.affine, modality="CT")
    write_series(tmp_path / "series", sub)
    back = read_volume(tmp_path / "series")
    assert back.shape == sub.shape
    assert back.modality == "CT"
    assert np.allclose(back.affine, sub.affine, atol=1e-4)
    assert np.allclose(back.array, np.round(sub.array), atol=1e-3)  # rescale applied, slices sorted
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "series").iterdir()):
            zf.write(f, f"dicom/{f.name}")
    from_zip = read_volume(archive)
    assert np.array_equal(from_zip.array, back.array)


def test_dicom_folder_without_images(tmp_path):
    pytest.importorskip("pydicom")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError, match="no DICOM"):
        read_volume(tmp_path)
