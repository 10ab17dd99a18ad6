"""Statistics, previews and run reports of a SegmentationResult (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from unisegtext.inference import PromptResolution, SegmentationResult
from unisegtext.inference.report import build_report, write_report
from unisegtext.inference.statistics import mask_statistics
from unisegtext.io import Volume, read_volume
from unisegtext.io.preview import radiological_slices, to_ras

# LPS voxel order (like DICOM) with anisotropic spacing and an offset
AFFINE = np.array([
    [-2.0, 0.0, 0.0, 100.0],
    [0.0, -3.0, 0.0, 50.0],
    [0.0, 0.0, 4.0, -20.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _volume(shape=(20, 16, 12)) -> Volume:
    array = np.zeros(shape, dtype=np.float32)
    return Volume(array, AFFINE, modality="CT")


def _result(volume: Volume, masks: dict[str, np.ndarray]) -> SegmentationResult:
    resolutions = {p: PromptResolution(p, p, p.replace("_", " "), "exact", 1.0) for p in masks}
    return SegmentationResult(masks=masks, resolutions=resolutions, volume=volume,
                              scores={p: 0.9 for p in masks}, timings={"total": 1.5},
                              model={"name": "tiny-test", "weights_sha256": "ab" * 32, "device": "cpu"})


def test_mask_statistics_geometry_and_intensity():
    vol = _volume()
    vol.array[2:6, 3:5, 1:4] = 50.0  # a 4 x 2 x 3 block
    vol.array[2, 3, 1] = 10.0
    mask = np.zeros(vol.shape, dtype=bool)
    mask[2:6, 3:5, 1:4] = True
    stats = mask_statistics(mask, vol)
    assert stats["present"] is True
    assert stats["voxel_count"] == 24
    assert stats["volume_ml"] == pytest.approx(24 * 2 * 3 * 4 / 1000)
    assert stats["centroid_voxel"] == pytest.approx([3.5, 3.5, 2.0])
    assert stats["centroid_mm"] == pytest.approx([100 - 7.0, 50 - 10.5, -20 + 8.0])
    assert stats["bbox_voxel"] == {"min": [2, 3, 1], "max": [5, 4, 3]}
    # LPS axes: world x and y decrease with the index, so min/max swap
    assert stats["bbox_mm"]["min"] == pytest.approx([100 - 10.0, 50 - 12.0, -16.0])
    assert stats["bbox_mm"]["max"] == pytest.approx([100 - 4.0, 50 - 9.0, -8.0])
    assert stats["extent_mm"] == pytest.approx([8.0, 6.0, 12.0])
    values = np.full(24, 50.0)
    values[0] = 10.0
    assert stats["intensity_mean"] == pytest.approx(values.mean())
    assert stats["intensity_std"] == pytest.approx(values.std())
    assert stats["intensity_unit"] == "HU"
    assert stats["components"] == 1
    json.dumps(stats)  # JSON-able as is


def test_components_use_26_connectivity():
    vol = _volume()
    mask = np.zeros(vol.shape, dtype=bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # touch at a corner only: one component with 26-connectivity
    mask[10, 10, 8] = True  # a separate island
    stats = mask_statistics(mask, vol)
    assert stats["components"] == 2
    assert stats["largest_component_ml"] == pytest.approx(2 * vol.voxel_volume_ml)


def test_empty_mask_is_explicitly_absent():
    vol = _volume()
    stats = mask_statistics(np.zeros(vol.shape, dtype=bool), vol)
    assert stats["present"] is False
    assert stats["voxel_count"] == 0 and stats["volume_ml"] == 0.0 and stats["components"] == 0
    assert stats["centroid_mm"] is None and stats["bbox_voxel"] is None and stats["intensity_mean"] is None


def test_mask_on_wrong_grid_is_refused():
    with pytest.raises(ValueError, match="does not match"):
        mask_statistics(np.zeros((3, 3, 3), dtype=bool), _volume())


def test_result_statistics_and_json_file(tmp_path):
    vol = _volume()
    present = np.zeros(vol.shape, dtype=bool)
    present[4:8, 4:8, 4:8] = True
    result = _result(vol, {"liver": present, "spleen": np.zeros(vol.shape, dtype=bool)})
    stats = result.statistics()
    assert list(stats) == ["liver", "spleen"]
    assert stats["liver"]["concept_id"] == "liver" and stats["liver"]["mean_probability"] == pytest.approx(0.9)
    assert stats["spleen"]["present"] is False and stats["spleen"]["mean_probability"] is None
    path = result.write_statistics(tmp_path / "statistics.json")
    document = json.loads(path.read_text())
    assert document["structures"]["liver"]["voxel_count"] == 64
    assert document["structures"]["spleen"]["present"] is False
    assert document["shape"] == [20, 16, 12]


def _corner_blob(shape, corner) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    sl = tuple(slice(0, 3) if c == 0 else slice(s - 3, s) for c, s in zip(corner, shape))
    mask[sl] = True
    return mask


def test_preview_planes_are_radiological_whatever_the_voxel_order():
    """A blob at the patient's right, anterior, superior corner shows top-left (axial,
    coronal) and top-left in sagittal (anterior on the left, superior on top)."""
    shape = (20, 16, 12)
    # AFFINE stores voxels in LPS order: x index 0 is the patient's right, y index 0 is
    # anterior, the last z index is superior
    lps_blob = _corner_blob(shape, (0, 0, 1))
    ras_affine = np.diag([2.0, 3.0, 4.0, 1.0])
    ras_blob = _corner_blob(shape, (1, 1, 1))  # RAS: right, anterior, superior = high indices
    for blob, affine in ((lps_blob, AFFINE), (ras_blob, ras_affine)):
        ras, new_affine = to_ras(blob, affine)
        assert np.all(np.diag(new_affine)[:3] > 0)
        planes = radiological_slices(ras, (ras.shape[0] - 2, ras.shape[1] - 2, ras.shape[2] - 2))
        for plane in ("axial", "coronal", "sagittal"):
            image = planes[plane]
            assert image[0, 0], f"{plane}: the blob should be at the top-left"
            assert not image[-1, -1]


def test_write_preview_png(ct_path, tmp_path):
    import matplotlib.image

    vol = read_volume(ct_path)
    vol = Volume(vol.array[30:94, 20:84, 40:64], vol.affine, modality="CT")
    mask = np.zeros(vol.shape, dtype=bool)
    mask[20:40, 20:40, 5:15] = True
    result = _result(vol, {"liver": mask, "spleen": np.zeros(vol.shape, dtype=bool)})
    path = result.write_preview(tmp_path / "preview.png")
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600
    assert not list(tmp_path.glob(".*partial*"))


def test_colors_come_from_the_knowledge_tree():
    from unisegtext.knowledge import load_tree

    vol = _volume()
    mask = np.zeros(vol.shape, dtype=bool)
    result = _result(vol, {"liver": mask, "kidney_left": mask})
    result.resolutions["free text"] = PromptResolution("free text", None, None, "open_vocabulary", 0.3)
    result.masks["free text"] = mask
    colors = result.colors()
    assert colors["liver"] == tuple(load_tree().get("liver").color)
    assert colors["free text"] not in (colors["liver"], colors["kidney_left"])
    assert all(0 <= c <= 255 for rgb in colors.values() for c in rgb)


def test_look_alike_tree_colours_are_told_apart_in_one_result():
    """The tree gives the liver and the spleen neighbouring greens; on one preview they must differ
    (the README command's legend showed two indistinguishable greens)."""
    from unisegtext.io.record import MIN_COLOR_DISTANCE
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    liver, spleen = (np.array(tree.get(c).color, dtype=float) for c in ("liver", "spleen"))
    assert np.linalg.norm(liver - spleen) < MIN_COLOR_DISTANCE  # the case this guards against
    vol = _volume()
    mask = np.zeros(vol.shape, dtype=bool)
    result = _result(vol, {"liver": mask, "spleen": mask, "kidney_left": mask, "aorta": mask})
    colors = result.colors()
    assert colors["liver"] == tuple(tree.get("liver").color)  # the first keeps the tree's colour
    assert colors["kidney_left"] == tuple(tree.get("kidney_left").color)
    values = [np.array(c, dtype=float) for c in colors.values()]
    assert all(np.linalg.norm(a - b) >= MIN_COLOR_DISTANCE for i, a in enumerate(values) for b in values[i + 1:])
    alone = _result(vol, {"spleen": mask}).colors()
    assert alone["spleen"] == tuple(tree.get("spleen").color)  # nothing to avoid: the tree's colour


def test_run_report(tmp_path):
    vol = _volume()
    mask = np.zeros(vol.shape, dtype=bool)
    mask[1:3, 1:3, 1:3] = True
    result = _result(vol, {"liver": mask})
    out = tmp_path / "liver.nii.gz"
    out.write_bytes(b"fake")
    report = build_report(result, [out], options={"threshold": 0.5})
    assert report["model"] == {"id": "tiny-test", "weights_sha256": "ab" * 32, "preset": None, "head": None}
    assert report["device"] == "cpu"
    assert report["versions"]["unisegtext"] and report["versions"]["numpy"] == np.__version__
    assert report["prompts"]["liver"]["concept_id"] == "liver" and report["prompts"]["liver"]["how"] == "exact"
    assert report["outputs"][0]["bytes"] == 4 and len(report["outputs"][0]["sha256"]) == 64
    assert report["timings_s"]["total"] == 1.5
    path = write_report(result, tmp_path / "sub" / "run.json", [out])
    assert json.loads(path.read_text())["input"]["shape"] == [20, 16, 12]
