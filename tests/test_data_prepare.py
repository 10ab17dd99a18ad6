"""`prepare`: the harmonised cache (RAS, one spacing), its index, resumability, failures, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures_data import BUILDERS, corrupt

from unisegtext.cli.data import main as data_main
from unisegtext.data.prepare import load_cache_index, load_cached_case, prepare_dataset
from unisegtext.data.registry import Descriptor, load_descriptor
from unisegtext.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _canonical(truth):
    """Independent expectation: nibabel's as_closest_canonical of the truth on its source grid."""
    label = nib.as_closest_canonical(nib.Nifti1Image(truth.label, truth.affine))
    channels = [np.asarray(nib.as_closest_canonical(nib.Nifti1Image(c, truth.affine)).dataobj) for c in truth.image]
    return np.stack(channels), np.asarray(label.dataobj), label.affine


@pytest.fixture(params=sorted(BUILDERS))
def fake(request, tmp_path):
    return BUILDERS[request.param](tmp_path / request.param)


def test_prepare_native_spacing_is_ras_and_lossless(fake, tmp_path):
    descriptor = Descriptor.from_dict(fake.descriptor)
    result = prepare_dataset(descriptor, fake.root, tmp_path / "cache", spacing=None)
    assert sorted(result.written) == sorted(fake.truth) and not result.failed
    index = load_cache_index(tmp_path / "cache")
    assert index["spacing"] is None and len(index["cases"]) == len(fake.truth)
    for entry in index["cases"]:
        cached = load_cached_case(entry)
        image, label, affine = _canonical(fake.truth[entry["case"]])
        assert cached.image.dtype == np.float32 and cached.label.dtype == np.uint8
        np.testing.assert_allclose(cached.image, image, atol=1e-3)
        np.testing.assert_array_equal(cached.label, label)
        np.testing.assert_allclose(np.array(entry["affine"]), affine, atol=1e-5)
        assert "".join(nib.aff2axcodes(np.array(entry["affine"]))) == "RAS"
        assert entry["shape"] == list(label.shape)
        assert entry["annotated"] == sorted(entry["targets"])
        expected_present = sorted(c for c, v in entry["targets"].items() if np.isin(label, v).any())
        assert entry["present"] == expected_present


def test_prepare_resamples_to_target_spacing(tmp_path):
    fake = BUILDERS["nnunet"](tmp_path / "d")  # case liver_002: spacing (1, 1, 2), RAS already
    descriptor = Descriptor.from_dict(fake.descriptor)
    prepare_dataset(descriptor, fake.root, tmp_path / "cache", spacing=(3.0, 3.0, 6.0), cases=["liver_000", "liver_002"])
    index = load_cache_index(tmp_path / "cache")
    assert index["spacing"] == [3.0, 3.0, 6.0]
    for entry in index["cases"]:
        cached = load_cached_case(entry, mmap=False)
        image, label, _ = _canonical(fake.truth[entry["case"]])
        assert entry["spacing"] == [3.0, 3.0, 6.0]
        assert cached.label.shape == tuple(s // 3 for s in label.shape)
        # output voxel i samples input voxel 3i + 1 exactly (voxel edges aligned)
        np.testing.assert_array_equal(cached.label, label[1::3, 1::3, 1::3])
        np.testing.assert_allclose(cached.image, image[:, 1::3, 1::3, 1::3], atol=1e-3)
        assert {e["case"]: e["split"] for e in index["cases"]} == {"liver_000": "train", "liver_002": "validation"}


def test_prepare_is_resumable_and_skips_corrupt_cases(tmp_path):
    fake = BUILDERS["case_folders"](tmp_path / "kits")
    descriptor = Descriptor.from_dict(fake.descriptor)
    cache = tmp_path / "cache"
    corrupt(fake.root / fake.corruptible["case_00002"])
    first = prepare_dataset(descriptor, fake.root, cache, spacing=(2.0, 2.0, 2.0))
    assert sorted(first.written) == ["case_00000", "case_00001"]
    assert list(first.failed) == ["case_00002"]
    index = json.loads((cache / "index.json").read_text())
    assert [f["case"] for f in index["failed"]] == ["case_00002"]
    assert [e["case"] for e in index["cases"]] == ["case_00000", "case_00001"]
    assert not list(cache.rglob("*.tmp*")), "no partial files may remain"
    mtimes = {p: p.stat().st_mtime_ns for p in (cache / "fake_kits").glob("*.npy")}

    second = prepare_dataset(descriptor, fake.root, cache, spacing=(2.0, 2.0, 2.0))
    assert sorted(second.skipped) == ["case_00000", "case_00001"] and not second.written
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes

    # fix the case: the next run prepares only it and clears it from "failed"
    fresh = BUILDERS["case_folders"](tmp_path / "fresh")
    (fake.root / "case_00002" / "imaging.nii.gz").write_bytes((fresh.root / "case_00002" / "imaging.nii.gz").read_bytes())
    third = prepare_dataset(descriptor, fake.root, cache, spacing=(2.0, 2.0, 2.0))
    assert third.written == ["case_00002"] and not third.failed
    index = load_cache_index(cache)
    assert index["failed"] == [] and len(index["cases"]) == 3


def test_corrupt_mask_and_dicom_are_reported(tmp_path):
    for family in ("totalsegmentator", "dicom_png", "nnunet"):
        fake = BUILDERS[family](tmp_path / family)
        (case, rel), = fake.corruptible.items()
        corrupt(fake.root / rel)
        result = prepare_dataset(Descriptor.from_dict(fake.descriptor), fake.root, tmp_path / f"c_{family}", spacing=None)
        assert list(result.failed) == [case], family
        assert len(result.written) == len(fake.truth) - 1


def test_cache_refuses_a_second_spacing(tmp_path):
    fake = BUILDERS["case_folders"](tmp_path / "kits")
    descriptor = Descriptor.from_dict(fake.descriptor)
    prepare_dataset(descriptor, fake.root, tmp_path / "cache", spacing=(2.0, 2.0, 2.0), limit=1)
    with pytest.raises(DataError, match="spacing"):
        prepare_dataset(descriptor, fake.root, tmp_path / "cache", spacing=(1.0, 1.0, 1.0), limit=1)


def test_two_datasets_share_one_cache_index(tmp_path):
    cache = tmp_path / "cache"
    for family in ("case_folders", "multi_sequence"):
        fake = BUILDERS[family](tmp_path / family)
        prepare_dataset(Descriptor.from_dict(fake.descriptor), fake.root, cache, spacing=(2.0, 2.0, 2.0))
    index = load_cache_index(cache)
    assert sorted({e["dataset"] for e in index["cases"]}) == ["fake_brats", "fake_kits"]
    brats = [e for e in index["cases"] if e["dataset"] == "fake_brats"][0]
    assert brats["channels"] == 4 and load_cached_case(brats).image.shape[0] == 4


def test_totalsegmentator_example_round_trip(tmp_path, shared_data):
    """The real TotalSegmentator example, arranged in the dataset's layout, through prepare."""
    examples = shared_data / "totalseg_examples"
    classes = json.loads((examples / "classes.json").read_text())["total"]
    ct = nib.load(str(examples / "ct.nii.gz"))
    seg_img = nib.load(str(examples / "ct_seg.nii.gz"))
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    case_dir = tmp_path / "ts" / "s0001"
    (case_dir / "segmentations").mkdir(parents=True)
    nib.save(ct, str(case_dir / "ct.nii.gz"))
    for value, name in classes.items():
        mask = (seg == int(value)).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, seg_img.affine), str(case_dir / "segmentations" / f"{name}.nii.gz"))

    descriptor = load_descriptor(REPO / "data_registry" / "totalsegmentator_v2_ct.yaml")
    code = data_main(["prepare", str(tmp_path / "ts"), "--dataset", str(REPO / "data_registry" / "totalsegmentator_v2_ct.yaml"),
                      "--out", str(tmp_path / "cache"), "--spacing", "3", "3", "3", "--no-progress"])
    assert code == 0
    index = load_cache_index(tmp_path / "cache")
    (entry,) = index["cases"]
    concept_of_value = {v[0]: c for c, v in descriptor.target_values().items()}
    present_values = sorted(int(v) for v in np.unique(seg) if v)
    assert len(present_values) == 61  # as the README of the examples states
    assert entry["annotated"] == sorted(descriptor.targets) and len(entry["annotated"]) == 117
    assert entry["present"] == sorted(concept_of_value[v] for v in present_values)
    assert entry["modality"] == "CT" and entry["spacing"] == [3.0, 3.0, 3.0]
    cached = load_cached_case(entry)
    # the example is RAS at 3 mm already: the cached label equals the source voxel for voxel
    np.testing.assert_array_equal(cached.label, np.asarray(nib.as_closest_canonical(seg_img).dataobj))
    np.testing.assert_allclose(cached.image[0], ct.get_fdata(dtype=np.float32), atol=1e-3)
    assert entry["voxels"]["liver"] == int((seg == 5).sum())


def test_la_mri_check_and_prepare_two_cases(tmp_path, shared_data, capsys):
    root = str(shared_data / "la_mri")
    assert data_main(["check", root, "--dataset", "la_mri_2018"]) == 0
    out = capsys.readouterr().out
    assert "cases found: 80 (descriptor: 80)" in out and "OK" in out
    cases = ["06SR5RBREL16DQ6M8LWS", "23X6SY44VT9KFHR7S7OC"]
    code = data_main(["prepare", root, "--dataset", "la_mri_2018", "--out", str(tmp_path / "cache"),
                      "--cases", *cases, "--no-progress"])
    assert code == 0
    index = load_cache_index(tmp_path / "cache")
    assert [e["case"] for e in index["cases"]] == cases
    assert [e["split"] for e in index["cases"]] == ["train", "validation"]
    for entry in index["cases"]:
        assert entry["present"] == ["heart_left_atrium"] and entry["modality"] == "MR"
        assert entry["spacing"] == [1.5, 1.5, 1.5]
        source = nib.load(str(shared_data / "la_mri" / "labelsTr" / f"{entry['case']}.nii.gz"))
        expected_shape = np.round(np.array(source.shape) * 0.625 / 1.5).astype(int).tolist()
        assert entry["shape"] == expected_shape
        # the left atrium keeps its volume within 5 % through nearest-neighbour resampling
        source_ml = float(np.asarray(source.dataobj).astype(bool).sum()) * 0.625**3 / 1000
        cached_ml = entry["voxels"]["heart_left_atrium"] * 1.5**3 / 1000
        assert abs(cached_ml - source_ml) / source_ml < 0.05
    assert data_main(["prepare", root, "--dataset", "la_mri_2018", "--out", str(tmp_path / "cache"),
                      "--cases", *cases, "--no-progress"]) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out


def test_cli_list_prints_table_and_totals(capsys):
    assert data_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "la_mri_2018" in out and "totalsegmentator_v2_ct" in out
    assert "(dataset, label) mappings" in out.strip().splitlines()[-1]


def test_cli_unknown_dataset_is_an_error(capsys, tmp_path):
    assert data_main(["check", str(tmp_path), "--dataset", "la_mri"]) == 2
    assert "unknown dataset 'la_mri'" in capsys.readouterr().err
