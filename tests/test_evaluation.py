"""Evaluation metrics against hand-computed values, empty-structure rules, calibration, and the
`unisegtext eval` command on small NIfTI files."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from unisegtext.errors import DataError, VolumeError
from unisegtext.evaluation import (
    CalibrationStats,
    EvaluationReport,
    brier_score,
    calibration_stats,
    dice,
    evaluate_case,
    evaluate_folders,
    evaluate_masks,
    expected_calibration_error,
    hd95,
    nsd,
    plot_reliability_diagram,
    read_label_map,
    volume_ml,
)

ANISO = (1.0, 1.0, 3.0)  # mm


def cube(origin=(2, 2, 2), size=4, shape=(10, 10, 10)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x, y, z = origin
    mask[x : x + size, y : y + size, z : z + size] = True
    return mask


# Hand computation for a 4x4x4 cube A and the same cube B shifted by one voxel along one axis.
# Surface voxels (6-neighbourhood erosion, as MONAI): 64 - 8 interior = 56 per cube.
# For a shift along axis k (voxel size s_k), the distances from A's surface to B's surface are:
#   36 voxels shared by both surfaces -> 0
#   16 voxels of A's face that B does not cover -> s_k (B's face one voxel further)
#    4 voxels in the middle of A's opposite face (inside B) -> min over the other axes of the
#      voxel size (they are one voxel away from B's side faces) or s_k (B's face beyond)
# and symmetrically from B to A.


def test_dice_hand_computed():
    a = cube()
    b = cube(origin=(2, 2, 3))  # overlap 4x4x3 = 48 voxels
    assert dice(a, b) == pytest.approx(2 * 48 / (64 + 64))  # 0.75
    assert dice(a, a) == pytest.approx(1.0)
    assert dice(a, cube(origin=(6, 6, 6))) == pytest.approx(0.0)  # disjoint cubes touch no voxel
    # a sub-cube 2x2x2 inside: 2*8/(64+8)
    small = np.zeros_like(a)
    small[3:5, 3:5, 3:5] = True
    assert dice(small, a) == pytest.approx(16 / 72)


def test_nsd_shift_along_thick_axis_anisotropic():
    a, b = cube(), cube(origin=(2, 2, 3))  # shift one voxel along z, z spacing 3 mm
    # distances each way: 36 x 0 mm, 4 x 1 mm (x/y neighbours are 1 mm away), 16 x 3 mm
    assert nsd(a, b, ANISO, tolerance_mm=2.0) == pytest.approx((36 + 4) * 2 / 112)  # 5/7
    assert nsd(a, b, ANISO, tolerance_mm=0.5) == pytest.approx(36 * 2 / 112)  # 9/14
    assert nsd(a, b, ANISO, tolerance_mm=3.0) == pytest.approx(1.0)
    # the same voxel shift on an isotropic 1 mm grid is within 1 mm everywhere
    assert nsd(a, b, (1.0, 1.0, 1.0), tolerance_mm=1.0) == pytest.approx(1.0)


def test_nsd_shift_along_fine_axis_anisotropic():
    a, b = cube(), cube(origin=(3, 2, 2))  # shift one voxel along x (1 mm)
    # distances: 36 x 0, 20 x 1 mm -> all within 2 mm, 36/56 within 0.5 mm
    assert nsd(a, b, ANISO, tolerance_mm=2.0) == pytest.approx(1.0)
    assert nsd(a, b, ANISO, tolerance_mm=0.5) == pytest.approx(9 / 14)


def test_hd95_shifted_cube():
    a = cube()
    # along z (3 mm): sorted distances 36 x 0, 4 x 1, 16 x 3; the 95th percentile of 56
    # values sits at rank 0.95 * 55 = 52.25, inside the 3 mm block (ranks 40..55)
    assert hd95(a, cube(origin=(2, 2, 3)), ANISO) == pytest.approx(3.0)
    # along x (1 mm): 36 x 0, 20 x 1 mm
    assert hd95(a, cube(origin=(3, 2, 2)), ANISO) == pytest.approx(1.0)
    # a 2-voxel shift along z: 16 face voxels at 6 mm, 12 ring voxels at 3 mm, 4 at 1 mm, 24 at
    # 0 mm; rank 52.25 falls in the 6 mm block (ranks 40..55)
    assert hd95(a, cube(origin=(2, 2, 4)), ANISO) == pytest.approx(6.0)
    assert hd95(a, a, ANISO) == pytest.approx(0.0)


def test_volume_ml_anisotropic():
    assert volume_ml(cube(), ANISO) == pytest.approx(64 * 3 / 1000)  # 0.192 mL


def test_both_empty_is_not_a_hit():
    empty = np.zeros((10, 10, 10), dtype=bool)
    row = evaluate_masks(empty, empty, ANISO, 2.0, class_name="liver")
    assert row.status == "both_empty" and not row.counted
    assert math.isnan(row.dice) and math.isnan(row.nsd) and math.isnan(row.hd95_mm)
    assert row.fp_volume_ml == 0 and row.ref_volume_ml == 0
    assert math.isnan(dice(empty, empty)) and math.isnan(hd95(empty, empty, ANISO))


def test_false_positive_reports_volume_in_ml():
    empty = np.zeros((10, 10, 10), dtype=bool)
    row = evaluate_masks(cube(), empty, ANISO, 2.0, class_name="kidney_tumor")
    assert row.status == "false_positive" and row.counted
    assert row.dice == 0.0 and row.nsd == 0.0 and math.isinf(row.hd95_mm)
    assert row.fp_volume_ml == pytest.approx(0.192)
    assert row.pred_volume_ml == pytest.approx(0.192)
    assert math.isnan(row.relative_volume_error)  # no reference volume to divide by


def test_missed_structure():
    empty = np.zeros((10, 10, 10), dtype=bool)
    row = evaluate_masks(empty, cube(), ANISO, 2.0)
    assert row.status == "missed"
    assert row.dice == 0.0 and row.nsd == 0.0 and math.isinf(row.hd95_mm)
    assert row.fn_volume_ml == pytest.approx(0.192)
    assert row.relative_volume_error == pytest.approx(-1.0)


def test_present_volume_errors_and_fp_fn():
    row = evaluate_masks(cube(origin=(2, 2, 3)), cube(), ANISO, 2.0)
    assert row.volume_error_ml == pytest.approx(0.0)
    assert row.fp_volume_ml == pytest.approx(16 * 3 / 1000)  # one 4x4 slab outside the reference
    assert row.fn_volume_ml == pytest.approx(16 * 3 / 1000)
    big = cube(size=5)
    row = evaluate_masks(big, cube(), (1, 1, 1), 2.0)
    assert row.volume_error_ml == pytest.approx((125 - 64) / 1000)
    assert row.relative_volume_error == pytest.approx(61 / 64)


def test_shape_mismatch_raises():
    with pytest.raises(VolumeError, match="differ in shape"):
        dice(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))


def test_evaluate_case_matches_names_and_aggregation_skips_both_empty():
    empty = np.zeros((10, 10, 10), dtype=bool)
    pred = {"liver": cube(), "spleen": cube(origin=(2, 2, 3)), "pancreas": empty, "extra": cube()}
    ref = {"liver": cube(), "spleen": cube(), "pancreas": empty, "stomach": cube()}
    rows = evaluate_case(pred, ref, ANISO, 2.0, case="c1", dataset="d")
    assert [r.class_name for r in rows] == [
        "liver",
        "spleen",
        "pancreas",
    ]  # reference order, shared names
    rows += evaluate_case(
        {"liver": cube(origin=(6, 6, 6))}, {"liver": cube()}, ANISO, case="c2", dataset="d"
    )
    report = EvaluationReport(rows, settings={"tolerance_mm": 2.0})
    per_class = report.per_class()
    assert per_class["liver"]["dice"]["n"] == 2
    assert per_class["liver"]["dice"]["mean"] == pytest.approx(0.5)  # 1.0 and 0.0
    assert per_class["pancreas"]["dice"]["n"] == 0 and per_class["pancreas"]["n_both_empty"] == 1
    overall = report.overall()
    assert overall["dice"]["mean"] == pytest.approx(
        (0.5 + 0.75) / 2
    )  # mean over classes with a value
    assert overall["n_both_empty"] == 1


# --------------------------------------------------------------------------- calibration
def test_ece_perfectly_calibrated_is_zero():
    prob = np.concatenate([np.full(400, 0.25), np.full(400, 0.75)])
    labels = np.zeros(800, dtype=bool)
    labels[:100] = True  # 25 % of the p=0.25 voxels
    labels[400:700] = True  # 75 % of the p=0.75 voxels
    assert expected_calibration_error(prob, labels, n_bins=10) == pytest.approx(0.0, abs=1e-12)
    assert brier_score(prob, labels) == pytest.approx(0.25 * 0.75)


def test_ece_badly_calibrated():
    prob = np.full(1000, 0.9)
    labels = np.zeros(1000, dtype=bool)
    labels[:100] = True  # only 10 % positive at 90 % confidence
    assert expected_calibration_error(prob, labels, n_bins=10) == pytest.approx(0.8)
    assert brier_score(prob, labels) == pytest.approx(0.1 * 0.01 + 0.9 * 0.81)


def test_calibration_stats_pool_and_plot(tmp_path):
    a = calibration_stats(np.full(10, 0.05), np.zeros(10, bool), n_bins=10)
    b = calibration_stats(
        np.full(10, 1.0), np.ones(10, bool), n_bins=10
    )  # p=1 falls in the last bin
    pooled = a + b
    assert pooled.n_voxels == 20 and pooled.counts[0] == 10 and pooled.counts[-1] == 10
    assert pooled.ece == pytest.approx((10 * 0.05 + 10 * 0.0) / 20)
    png = plot_reliability_diagram(pooled, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isnan(CalibrationStats(5).ece)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        calibration_stats(np.full(4, 3.0), np.zeros(4, bool))


# --------------------------------------------------------------------------- label maps
def test_label_map_forms(tmp_path):
    assert read_label_map({"0": "background", "1": "Liver", "2": "kidney tumor"}) == {
        "liver": (1,),
        "kidney_tumor": (2,),
    }
    assert read_label_map({"labels": {"background": 0, "kidney": [1, 2], "tumor": 2}}) == {
        "kidney": (1, 2),
        "tumor": (2,),
    }
    nested = tmp_path / "classes.json"
    nested.write_text(json.dumps({"total": {"1": "spleen"}, "total_mr": {"1": "liver"}}))
    assert read_label_map(nested, key="total_mr") == {"liver": (1,)}
    with pytest.raises(DataError, match="--labels-key"):
        read_label_map(nested)


# --------------------------------------------------------------------------- files and CLI
AFFINE = np.diag([1.0, 1.0, 3.0, 1.0])


def save(array: np.ndarray, path, affine=AFFINE, dtype=np.uint8):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))
    return path


@pytest.fixture
def folders(tmp_path):
    """Reference: multilabel files (1 liver, 2 spleen) + labels.json. Predictions: case a as a
    per-class folder, case b as a multilabel file with other label values (7 liver, 5 spleen)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    liver, spleen = cube(origin=(1, 1, 1)), cube(origin=(5, 5, 5))
    ref_labels = liver * 1 + spleen * 2
    save(ref_labels, ref / "a.nii.gz")
    save(ref_labels, ref / "b.nii.gz")
    (ref / "labels.json").write_text(json.dumps({"0": "background", "1": "liver", "2": "spleen"}))
    save(liver, pred / "a" / "liver.nii.gz")
    save(np.zeros_like(spleen), pred / "a" / "Spleen.nii.gz")  # missed, and a different spelling
    save(liver * 7 + cube(origin=(5, 5, 6)) * 5, pred / "b.nii.gz")  # spleen shifted along z
    pred_labels = tmp_path / "pred_labels.json"
    pred_labels.write_text(json.dumps({"7": "liver", "5": "spleen"}))
    return ref, pred, pred_labels


def test_evaluate_folders_mixed_layouts(folders):
    ref, pred, pred_labels = folders
    report = evaluate_folders(pred, ref, pred_labels=pred_labels, tolerance_mm=2.0)
    rows = {(r.case, r.class_name): r for r in report.rows}
    assert set(rows) == {("a", "liver"), ("a", "spleen"), ("b", "liver"), ("b", "spleen")}
    assert rows["a", "liver"].dice == pytest.approx(1.0)
    assert rows["a", "spleen"].status == "missed"
    assert rows["b", "spleen"].dice == pytest.approx(0.75)
    assert rows["b", "spleen"].nsd == pytest.approx(5 / 7)
    assert rows["b", "spleen"].hd95_mm == pytest.approx(3.0)
    assert rows["a", "liver"].dataset == "ref"


def test_cli_end_to_end(folders, tmp_path, capsys):
    from unisegtext.cli.eval import main

    ref, pred, pred_labels = folders
    prob = tmp_path / "prob"
    save(cube(origin=(1, 1, 1)) * 0.9 + 0.05, prob / "a" / "liver_prob.nii.gz", dtype=np.float32)
    out = tmp_path / "out"
    code = main(
        [
            "--pred",
            str(pred),
            "--ref",
            str(ref),
            "--pred-labels",
            str(pred_labels),
            "--prob",
            str(prob),
            "--dataset",
            "toy",
            "--tolerance-mm",
            "2",
            "--out",
            str(out),
            "--n-bins",
            "10",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Per class" in printed and "| liver |" in printed
    with (out / "results.csv").open() as handle:
        rows = {(r["case"], r["class_name"]): r for r in csv.DictReader(handle)}
    assert float(rows["b", "spleen"]["nsd"]) == pytest.approx(5 / 7, abs=1e-5)
    assert rows["a", "spleen"]["status"] == "missed" and rows["a", "spleen"]["hd95_mm"] == "inf"
    assert rows["a", "liver"]["dataset"] == "toy"
    # liver probabilities 0.95 inside, 0.05 outside: ECE = 0.05 exactly
    assert float(rows["a", "liver"]["ece"]) == pytest.approx(0.05, abs=1e-5)
    data = json.loads((out / "results.json").read_text())
    assert data["per_class"]["liver"]["dice"]["mean"] == pytest.approx(1.0)
    assert data["per_class"]["spleen"]["n_missed"] == 1
    assert data["per_dataset"]["toy"]["n_cases"] == 2
    assert data["calibration"]["liver"]["ece"] == pytest.approx(0.05, abs=1e-5)
    assert (out / "summary.md").read_text().startswith("# Evaluation")
    assert (out / "reliability.png").is_file() and (out / "reliability" / "liver.png").is_file()


def test_single_reference_file_and_segment_output_folder(tmp_path):
    """`--ref FILE` with the folder `unisegtext segment --ml` writes (segmentation.nii.gz + labels.json)."""
    ref = save(cube() * 3, tmp_path / "ref" / "case7.nii.gz")
    out = tmp_path / "segment_out"
    save(cube(origin=(3, 2, 2)) * 1, out / "segmentation.nii.gz")
    (out / "labels.json").write_text(json.dumps({"0": "background", "1": "kidney tumor"}))
    report = evaluate_folders(out, ref, ref_labels={"3": "kidney_tumor"})
    (row,) = report.rows
    assert row.case == "case7" and row.class_name == "kidney_tumor"
    assert row.hd95_mm == pytest.approx(1.0) and row.dice == pytest.approx(0.75)


def test_reoriented_prediction_is_accepted(tmp_path):
    ref_img = nib.Nifti1Image(cube(origin=(1, 2, 3)).astype(np.uint8), AFFINE)
    nib.save(ref_img, str(tmp_path / "ref.nii.gz"))
    # the same grid stored LPS-like: flip the first two axes
    flipped = ref_img.as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    nib.save(flipped, str(tmp_path / "pred.nii.gz"))
    report = evaluate_folders(
        tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", labels={"1": "liver"}
    )
    assert report.rows[0].dice == pytest.approx(1.0)


def test_grid_mismatch_is_a_clear_error(tmp_path, capsys):
    from unisegtext.cli.eval import main

    save(cube(), tmp_path / "ref.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 0.0, 1.5]
    save(cube(), tmp_path / "pred.nii.gz", affine=shifted)
    with pytest.raises(
        VolumeError, match="(?s)not on the grid of the reference.*Resample the prediction"
    ):
        evaluate_folders(tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz", labels={"1": "liver"})
    save(cube(shape=(10, 10, 12)), tmp_path / "pred2.nii.gz")
    code = main(
        [
            "--pred",
            str(tmp_path / "pred2.nii.gz"),
            "--ref",
            str(tmp_path / "ref.nii.gz"),
            "--labels",
            '{"1": "liver"}',
        ]
    )  # a label map may be given inline
    assert code == 2
    assert "shape (10, 10, 12) vs (10, 10, 10)" in capsys.readouterr().err


def test_missing_prediction_needs_allow_missing(folders):
    ref, pred, pred_labels = folders
    save(cube(), ref / "c.nii.gz")
    with pytest.raises(DataError, match="allow-missing"):
        evaluate_folders(pred, ref, pred_labels=pred_labels)
    report = evaluate_folders(pred, ref, pred_labels=pred_labels, allow_missing=True)
    assert {r.case for r in report.rows} == {"a", "b"}


def test_shared_example_against_itself(shared_data):
    folder = shared_data / "totalseg_examples"
    seg = folder / "ct_seg.nii.gz"
    report = evaluate_folders(seg, seg, labels=folder / "classes.json", labels_key="total")
    present = [r for r in report.rows if r.status == "present"]
    assert len(report.rows) == 117  # every class of the `total` task
    assert len(present) == 61  # the README: 61 classes present
    assert all(r.dice == pytest.approx(1.0) for r in present)
    assert all(r.nsd == pytest.approx(1.0) and r.hd95_mm == 0.0 for r in present)
    assert all(r.status == "both_empty" for r in report.rows if r not in present)
    assert report.overall()["dice"]["mean"] == pytest.approx(1.0)
