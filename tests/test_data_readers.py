"""Reader families: each reads a miniature copy written in its true on-disk layout."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import BUILDERS, make_per_structure, make_totalsegmentator

from unisegtext.data.check import check_dataset
from unisegtext.data.readers import find_cases, get_reader, map_grey_values
from unisegtext.data.registry import Descriptor
from unisegtext.errors import DataError


@pytest.fixture(params=sorted(BUILDERS))
def fake(request, tmp_path):
    return BUILDERS[request.param](tmp_path / request.param)


def test_reader_finds_cases_and_loads_truth(fake):
    descriptor = Descriptor.from_dict(fake.descriptor)
    samples = get_reader(descriptor).samples(fake.root)
    assert [s.case for s in samples] == sorted(fake.truth)
    for sample in samples:
        data = sample.load()
        truth = fake.truth[sample.case]
        assert data.image.dtype == np.float32 and data.image.ndim == 4
        assert data.image.shape == truth.image.shape
        np.testing.assert_allclose(data.image, truth.image, atol=1e-3)
        np.testing.assert_array_equal(data.label, truth.label)
        np.testing.assert_allclose(data.affine, truth.affine, atol=1e-6)
        assert np.issubdtype(data.label.dtype, np.integer)
        assert sample.modality == descriptor.modality[0]
        assert sample.targets == {c: v for c, v in descriptor.target_values().items() if c in sample.annotated}


def test_check_reports_a_complete_copy_as_ok(fake):
    report = check_dataset(Descriptor.from_dict(fake.descriptor), fake.root)
    assert report.ok, "\n".join(report.lines())
    assert report.cases == sorted(fake.truth)


def test_nnunet_split_comes_from_the_descriptor(tmp_path):
    fake = BUILDERS["nnunet"](tmp_path / "d")
    samples = get_reader(Descriptor.from_dict(fake.descriptor)).samples(fake.root)
    assert {s.case: s.split for s in samples} == {"liver_000": None, "liver_001": None, "liver_002": "validation"}


def test_msd_training_list_and_resource_forks(tmp_path):
    fake = BUILDERS["msd"](tmp_path / "d")
    reader = get_reader(Descriptor.from_dict(fake.descriptor))
    samples = reader.samples(fake.root)
    assert [s.case for s in samples] == ["BRATS_001", "BRATS_002"]  # '._BRATS_001' ignored
    assert samples[0].load().image.shape[0] == 4  # 4D file -> 4 channels
    # also without the training list: the '._' files must not become cases
    (fake.root / "dataset.json").write_text("{}")
    assert find_cases(fake.root, "imagesTr/{case}.nii.gz") == ["BRATS_001", "BRATS_002"]


def test_totalsegmentator_meta_split_and_overlap_policy(tmp_path):
    fake = make_totalsegmentator(tmp_path / "ts")
    descriptor = Descriptor.from_dict(fake.descriptor)
    samples = {s.case: s for s in get_reader(descriptor).samples(fake.root)}
    assert {c: s.split for c, s in samples.items()} == {"s0001": "train", "s0002": "validation", "s0003": "test"}
    data = samples["s0002"].load()
    assert data.label[0, 0, 0] == 3  # kidney_left (later) overwrote spleen
    assert data.meta["overlap_voxels"] == {"kidney_left": 8}

    strict = dict(fake.descriptor, layout={"family": "totalsegmentator", "on_overlap": "error"})
    sample = get_reader(Descriptor.from_dict(strict)).sample(fake.root, "s0002")
    with pytest.raises(DataError, match="mask 'kidney_left' overlaps earlier structures in 8 voxels"):
        sample.load()


def test_per_structure_partial_annotation_and_extra_files(tmp_path):
    fake = make_per_structure(tmp_path / "han")
    descriptor = Descriptor.from_dict(fake.descriptor)
    samples = {s.case: s for s in get_reader(descriptor).samples(fake.root)}
    assert samples["case_01"].annotated == ["brainstem", "parotid_gland_left", "parotid_gland_right"]
    # a missing mask file means "not annotated here", never "absent"
    assert samples["case_02"].annotated == ["brainstem", "parotid_gland_left"]
    assert "parotid_gland_right" not in samples["case_02"].targets
    report = check_dataset(descriptor, fake.root)
    assert list(report.missing) == ["case_02"]
    assert [p.rsplit("/", 1)[-1] for p in report.extra_files["case_02"]] == ["Mandible.nii.gz"]


def test_check_reports_missing_files_and_unknown_label_values(tmp_path):
    import nibabel as nib

    fake = BUILDERS["case_folders"](tmp_path / "kits")
    (fake.root / "case_00001" / "segmentation.nii.gz").unlink()
    path = fake.root / "case_00002" / "segmentation.nii.gz"
    img = nib.load(str(path))
    label = np.asarray(img.dataobj).copy()
    label[0, 0, 0] = 9
    nib.save(nib.Nifti1Image(label, img.affine), str(path))
    report = check_dataset(Descriptor.from_dict(fake.descriptor), fake.root)
    assert not report.ok
    assert list(report.missing) == ["case_00001"]
    assert report.unexpected_values == {9: ["case_00002"]}
    text = "\n".join(report.lines())
    assert "value 9 on disk but not in the descriptor's labels" in text and "PROBLEMS FOUND" in text


def test_check_reports_unmapped_png_grey_values(tmp_path):
    from PIL import Image

    fake = BUILDERS["dicom_png"](tmp_path / "chaos")
    png = sorted((fake.root / "1" / "T2SPIR" / "Ground").glob("*.png"))[0]
    grey = np.asarray(Image.open(png)).copy()
    grey[0, 0] = 100
    Image.fromarray(grey).save(png)
    report = check_dataset(Descriptor.from_dict(fake.descriptor), fake.root)
    assert report.unmapped_grey_values == {100: ["1"]} and not report.ok


def test_map_grey_values_tolerance():
    grey = np.array([0, 61, 63, 66, 126, 100], dtype=np.uint8)
    label, unmapped = map_grey_values(grey, {63: 1, 126: 2}, tolerance=3)
    assert label.tolist() == [0, 1, 1, 1, 2, 0] and unmapped == 1


def test_unknown_case_ids_are_rejected(tmp_path):
    fake = BUILDERS["case_folders"](tmp_path / "kits")
    with pytest.raises(DataError, match="case_9 not found"):
        get_reader(Descriptor.from_dict(fake.descriptor)).samples(fake.root, cases=["case_9"])


def test_missing_root_is_a_clear_error(tmp_path):
    fake = BUILDERS["case_folders"](tmp_path / "kits")
    with pytest.raises(DataError, match="is not a folder"):
        get_reader(Descriptor.from_dict(fake.descriptor)).samples(tmp_path / "nowhere")
