"""DICOM in (a real multi-slice series built from the example CT) and DICOM SEG out."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from dicom_helpers import write_series

from unisegtext import segment
from unisegtext.inference import PromptResolution, SegmentationResult
from unisegtext.io import Volume, read_volume

hd = pytest.importorskip("highdicom")

CROP = (slice(30, 94), slice(20, 84), slice(40, 64))  # 64 x 64 x 24 voxels of the abdomen
PROMPTS = ["liver", "kidney_left", "liver tumor"]


@pytest.fixture(scope="module")
def crop(ct_path) -> Volume:
    vol = read_volume(ct_path)
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in CROP]
    return Volume(np.round(vol.array[CROP]), vol.affine @ shift, modality="CT")


@pytest.fixture(scope="module")
def series(crop, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_series(folder, crop, uid="1.2.826.0.1.3680043.8.498.1")
    return folder


@pytest.fixture(scope="module")
def dicom_result(series, tiny_model):
    return segment(series, PROMPTS, model=tiny_model, return_probabilities=True, progress=False)


def test_dicom_series_input_gives_masks_on_the_dicom_grid(dicom_result, crop, tiny_model, series, tmp_path):
    vol = dicom_result.volume
    assert vol.shape == (64, 64, 24)
    assert vol.modality == "CT"
    assert np.allclose(vol.affine, crop.affine, atol=1e-4)
    assert len(vol.meta["datasets"]) == 24
    for mask in dicom_result.masks.values():
        assert mask.shape == (64, 64, 24) and mask.dtype == bool
    # the same scan given as an array gives the same probabilities: DICOM reading is exact
    direct = segment(crop, PROMPTS, model=tiny_model, return_probabilities=True, progress=False)
    for prompt in PROMPTS:
        assert np.allclose(dicom_result.probabilities[prompt], direct.probabilities[prompt], atol=1e-5)
    # and so does a zip of the series
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(series.iterdir()):
            zf.write(f, f"DICOM/{f.name}")
    zipped = segment(archive, ["liver"], model=tiny_model, progress=False)
    assert np.array_equal(zipped.masks["liver"], dicom_result.masks["liver"])


def test_dicom_seg_round_trip(dicom_result, tmp_path):
    from pydicom.sr.codedict import codes

    from unisegtext import __version__
    from unisegtext.knowledge import load_tree

    assert any(m.any() for m in dicom_result.masks.values())
    files = dicom_result.save(tmp_path / "out", output_type="dicom-seg")
    seg_path = tmp_path / "out" / "segmentation.dcm"
    assert seg_path in files
    seg = hd.seg.segread(str(seg_path))
    source = dicom_result.volume.meta["datasets"]
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID

    tree = load_tree()
    items = {str(item.SegmentLabel): item for item in seg.SegmentSequence}
    assert list(items) == PROMPTS
    for prompt, item in items.items():
        concept = tree.get(dicom_result.resolutions[prompt].concept_id)
        code = concept.dicom
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == code["category"]["value"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == code["type"]["value"]
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        lab = hd.color.CIELabColor.from_rgb(*concept.color)
        assert list(item.RecommendedDisplayCIELabValue) == list(lab.value)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "UniSegText"
        assert algorithm.AlgorithmVersion == __version__
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.ArtificialIntelligence.value
        assert item.TrackingID == concept.id
    # laterality as the type modifier (SNOMED 7771000 Left), lesion with its anatomic region
    modifier = items["kidney_left"].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence
    assert modifier[0].CodeValue == "7771000"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in items["liver"].SegmentedPropertyTypeCodeSequence[0]
    assert items["liver tumor"].AnatomicRegionSequence[0].CodeValue == tree.get("liver").dicom["type"]["value"]

    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in source],
        segment_numbers=[1, 2, 3],
    )  # (frames, rows, columns, segments)
    for n, prompt in enumerate(PROMPTS):
        assert np.array_equal(pixels[..., n].transpose(2, 1, 0).astype(bool), dicom_result.masks[prompt])

    from unisegtext.io.dicom_seg import read_dicom_seg

    back = read_dicom_seg(seg_path, dicom_result.volume)
    for prompt in PROMPTS:
        assert np.array_equal(back[prompt], dicom_result.masks[prompt])


def test_empty_segment_survives_the_round_trip(dicom_result, tmp_path):
    from unisegtext.io.dicom_seg import read_dicom_seg, write_dicom_seg

    masks = dict(dicom_result.masks)
    masks["liver"] = np.zeros_like(masks["liver"])
    result = SegmentationResult(masks=masks, resolutions=dicom_result.resolutions, volume=dicom_result.volume,
                                model=dicom_result.model)
    path = write_dicom_seg(result, tmp_path / "seg.dcm")
    back = read_dicom_seg(path, result.volume)
    assert not back["liver"].any()
    assert np.array_equal(back["kidney_left"], masks["kidney_left"])


def _hand_result(volume, prompts_to_concepts):
    masks = {p: np.zeros(volume.shape, dtype=bool) for p in prompts_to_concepts}
    for mask in masks.values():
        mask[10:20, 10:20, 5:10] = True
    resolutions = {p: PromptResolution(p, c, c, "exact", 1.0) for p, c in prompts_to_concepts.items()}
    return SegmentationResult(masks=masks, resolutions=resolutions, volume=volume, model={"name": "test"})


def test_concept_without_code_is_refused_unless_generic(dicom_result, tmp_path):
    from unisegtext.io.dicom_seg import DicomSegError, write_dicom_seg

    result = _hand_result(dicom_result.volume, {"abdominal wall": "abdominal_wall",
                                                "enhancing tumor": "brain_tumor_enhancing"})
    with pytest.raises(DicomSegError, match=r"abdominal wall.*does not invent codes.*--dicom-generic-codes"):
        write_dicom_seg(result, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
    path = write_dicom_seg(result, tmp_path / "seg.dcm", generic_codes=True)
    seg = hd.seg.segread(str(path))
    wall, tumor = seg.SegmentSequence
    assert wall.SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # Tissue (generic)
    assert wall.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007"
    assert tumor.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal
    assert tumor.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # Lesion (generic)
    assert "abdominal_wall" in wall.SegmentDescription


def test_nifti_input_is_refused_with_a_clear_message(ct_path, tmp_path):
    from unisegtext.io.dicom_seg import DicomSegError

    vol = read_volume(ct_path)
    result = _hand_result(vol, {"liver": "liver"})
    with pytest.raises(DicomSegError, match="needs a DICOM input series"):
        result.save(tmp_path / "out", output_type="dicom-seg")
    assert not list((tmp_path / "out").glob("*"))


def test_cli_dicom_seg_statistics_preview_report(series, tiny_model_dir, tmp_path, capsys):
    from unisegtext.cli import main

    out = tmp_path / "out"
    report = tmp_path / "run.json"
    code = main(["segment", "-i", str(series), "-o", str(out), "-p", "liver", "-p", "kidney_left",
                 "--model", str(tiny_model_dir), "--output-type", "dicom-seg", "--statistics", "--preview",
                 "--report", str(report), "--quiet"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"segmentation.dcm", "prompts.json", "statistics.json", "preview.png", "manifest.json"}
    seg = hd.seg.segread(str(out / "segmentation.dcm"))
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "kidney_left"]
    stats = json.loads((out / "statistics.json").read_text())["structures"]
    assert set(stats) == {"liver", "kidney_left"} and "centroid_mm" in stats["liver"]
    run = json.loads(report.read_text())
    assert run["model"]["weights_sha256"] and len(run["model"]["weights_sha256"]) == 64
    assert run["prompts"]["kidney_left"]["concept_id"] == "kidney_left"
    assert run["input"]["format"] == "dicom"
    assert {o["path"].rsplit("/", 1)[-1] for o in run["outputs"]} >= {"segmentation.dcm", "statistics.json", "preview.png"}
    assert run["device"] == "cpu" and "inference" in run["timings_s"]


def test_cli_refuses_dicom_seg_for_nifti_before_segmenting(ct_path, tmp_path, capsys, monkeypatch):
    from unisegtext.cli import main

    def boom(*args, **kwargs):  # pragma: no cover - must not run
        raise AssertionError("segment() ran although the output could not be written")

    monkeypatch.setattr("unisegtext.inference.segment", boom)
    code = main(["segment", "-i", str(ct_path), "-o", str(tmp_path / "o"), "-p", "liver",
                 "--output-type", "dicom-seg"])
    assert code == 2
    err = capsys.readouterr().err
    assert "DICOM input series" in err and err.count("\n") == 1
