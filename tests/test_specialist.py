"""The nnU-Net-style specialist: planner rules, training pieces, and the side-by-side command."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unisegtext.baselines.nnunet_plan import (
    conv_feature_map_size,
    deep_supervision_weights,
    plan_specialist,
    plan_topology,
)
from unisegtext.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ planner
def test_isotropic_plan_matches_nnunet_default_fullres():
    # 1 mm isotropic, median 256^3: nnU-Net's familiar 128^3 patch, 6 stages, 32..320 features
    plan = plan_specialist((1.0, 1.0, 1.0), (256, 256, 256), num_classes=2)
    assert plan.patch_size == [128, 128, 128]
    assert plan.strides == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert plan.kernel_sizes == [[3, 3, 3]] * 6
    assert plan.features == [32, 64, 128, 256, 320, 320]
    assert plan.batch_size == 2
    assert plan.deep_supervision_outputs == 3  # decoder outputs except the lowest, besides full resolution


def test_anisotropic_topology_pools_in_plane_first_and_uses_1_kernels():
    # 0.8 x 0.8 x 3 mm: z is neither pooled nor convolved (kernel 1) until its spacing is within 2x
    topo = plan_topology((0.8, 0.8, 3.0), (160, 160, 48))
    assert topo.strides == [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    assert topo.kernel_sizes == [[3, 3, 1]] + [[3, 3, 3]] * 5
    assert topo.num_pool_per_axis == [5, 5, 3]
    assert topo.patch_size == [160, 160, 48]


def test_patch_is_padded_to_a_multiple_of_the_pooling():
    topo = plan_topology((1.0, 1.0, 1.0), (37, 37, 37))
    assert topo.num_pool_per_axis == [3, 3, 3]  # 37 -> 19 -> 10 -> 5 (>= 8 needed to pool)
    assert topo.patch_size == [40, 40, 40]


def test_a_lone_poolable_axis_needs_three_times_the_minimum_edge():
    topo = plan_topology((1.0, 1.0, 1.0), (64, 8, 8))
    assert topo.num_pool_per_axis == [3, 1, 1]  # 64,8,8 -> 32,4,4 -> 16 -> 8, then 8 < 12 stops


def test_small_median_shape_clips_the_patch_and_keeps_batch_two():
    # LA-MRI at 1.5 mm is about 80 x 62 x 37 voxels
    plan = plan_specialist((1.5, 1.5, 1.5), (80, 62, 37), num_classes=2, num_cases=4)
    assert plan.patch_size == [80, 64, 40]
    assert plan.batch_size == 2
    assert plan.strides[-1] == [2, 2, 1]  # z stops pooling at 5 voxels
    assert plan.deep_supervision_outputs == len(plan.strides) - 3


def test_memory_budget_shrinks_the_patch():
    big = plan_specialist((1.0, 1.0, 1.0), (256, 256, 256), num_classes=2, vram_gb=8)
    small = plan_specialist((1.0, 1.0, 1.0), (256, 256, 256), num_classes=2, vram_gb=2)
    assert np.prod(small.patch_size) < np.prod(big.patch_size)
    assert small.feature_map_size <= 560e6 * 2 / 8


def test_conv_feature_map_size_by_hand():
    # encoder 2*2*8^3 + 2*4*4^3 = 2560; decoder level 0: (2 convs + transpconv)*2*8^3 + 3 classes*8^3 = 4608
    assert conv_feature_map_size((8, 8, 8), [[1, 1, 1], [2, 2, 2]], [2, 4], num_classes=3) == 7168


def test_deep_supervision_weights_halve_and_sum_to_one():
    assert deep_supervision_weights(2) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(0) == [1.0]


def test_planner_rejects_bad_input():
    with pytest.raises(ConfigError, match="spacing"):
        plan_topology((1.0, 0.0, 1.0), (64, 64, 64))
    with pytest.raises(ConfigError, match="3D"):
        plan_specialist((1.0, 1.0), (64, 64), num_classes=2)


# ------------------------------------------------------------------------------------------ training pieces
def _sphere_case(name: str, split: str = "train", seed: int = 0, values=(1,)):
    from unisegtext.baselines.specialist import SpecialistCase

    rng = np.random.default_rng(seed)
    shape = (24, 24, 16)
    grid = np.indices(shape)
    centre = np.array([12, 12, 8]) + rng.integers(-2, 3, 3)
    inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= 25
    label = np.zeros(shape, np.uint8)
    label[inside] = values[0]
    image = rng.normal(0, 0.3, shape).astype(np.float32) + 2.0 * inside
    return SpecialistCase("synthetic", name, image[None], label, np.diag([2.0, 2.0, 2.0, 1.0]), "MR",
                          {"blob": list(values)}, split)


def test_budget_needs_steps_or_time():
    from unisegtext.baselines.specialist import TrainBudget

    with pytest.raises(ConfigError, match="max_steps or time_s"):
        TrainBudget()
    budget = TrainBudget(max_steps=10, time_s=100.0)
    assert budget.progress(5, 10.0) == pytest.approx(0.5)
    assert budget.progress(1, 80.0) == pytest.approx(0.8)
    assert budget.progress(20, 0.0) == 1.0


def test_overlapping_targets_train_as_regions():
    from unisegtext.baselines.specialist import SpecialistCase, encode_target, label_mode

    label = np.array([0, 1, 2, 3]).reshape(1, 1, 4)
    case = SpecialistCase("d", "c", np.zeros((1, 1, 1, 4), np.float32), label, np.eye(4), "CT",
                          {"kidney": [1, 2, 3], "kidney_tumor": [2]})
    assert label_mode([case], ["kidney", "kidney_tumor"]) == "regions"
    regions = encode_target(case, ["kidney", "kidney_tumor"], "regions")
    assert regions[:, 0, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    assert label_mode([case], ["kidney_tumor"]) == "softmax"


def test_train_and_predict_few_steps_gives_masks_on_the_input_grid():
    from unisegtext.baselines.specialist import TrainBudget, predict_specialist, train_specialist

    cases = [_sphere_case(f"c{i}", seed=i) for i in range(3)]
    result = train_specialist(cases, ["blob"], TrainBudget(max_steps=2), base_features=4, seed=0)
    assert result.steps == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert result.plan.features[0] == 4 and result.mode == "softmax"
    masks = predict_specialist(result, cases[0].image)
    assert set(masks) == {"blob"}
    assert masks["blob"].shape == cases[0].label.shape and masks["blob"].dtype == bool


def test_saved_specialist_loads_and_predicts_the_same(tmp_path):
    """DynUNet aliases its blocks (skip_layers); saving must still work and round-trip."""
    from unisegtext.baselines.specialist import (
        TrainBudget,
        load_specialist,
        predict_specialist,
        save_specialist,
        train_specialist,
    )

    cases = [_sphere_case(f"c{i}", seed=i) for i in range(2)]
    result = train_specialist(cases, ["blob"], TrainBudget(max_steps=2), base_features=4, seed=0)
    loaded = load_specialist(save_specialist(result, tmp_path / "spec"))
    assert (loaded.plan, loaded.classes, loaded.mode, loaded.normaliser) == (
        result.plan, result.classes, result.mode, result.normaliser)
    for name, tensor in result.network.state_dict().items():
        assert torch.equal(tensor, loaded.network.state_dict()[name]), name
    image = cases[0].image
    assert np.array_equal(predict_specialist(result, image)["blob"], predict_specialist(loaded, image)["blob"])


def test_interrupted_specialist_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from unisegtext.baselines import specialist as module
    from unisegtext.baselines.specialist import TrainBudget, train_specialist
    from unisegtext.errors import ConfigError

    cases = [_sphere_case(f"c{i}", seed=i) for i in range(2)]
    kwargs = {"base_features": 4, "seed": 0, "checkpoint_every": 2}
    straight = train_specialist(cases, ["blob"], TrainBudget(max_steps=4), **kwargs)
    real, calls = module._sample_batch, []

    def killed_at_step_3(*args):  # the process dies while drawing step 3's batch
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(module, "_sample_batch", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_specialist(cases, ["blob"], TrainBudget(max_steps=4), checkpoint_dir=tmp_path / "ck", **kwargs)
    monkeypatch.setattr(module, "_sample_batch", real)
    resumed = train_specialist(cases, ["blob"], TrainBudget(max_steps=4), checkpoint_dir=tmp_path / "ck", resume=True, **kwargs)
    assert resumed.steps == 4 and len(resumed.losses) == 4
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-6, abs=1e-7)
    for name, tensor in straight.network.state_dict().items():
        assert torch.allclose(tensor, resumed.network.state_dict()[name], rtol=1e-5, atol=1e-6), name
    with pytest.raises(ConfigError, match="resume needs a checkpoint"):
        train_specialist(cases, ["blob"], TrainBudget(max_steps=4), checkpoint_dir=tmp_path / "none", resume=True, **kwargs)


@pytest.mark.slow
def test_specialist_learns_an_easy_structure():
    from unisegtext.baselines.specialist import TrainBudget, predict_specialist, train_specialist
    from unisegtext.evaluation.metrics import dice

    cases = [_sphere_case(f"c{i}", seed=i) for i in range(4)]
    result = train_specialist(cases, ["blob"], TrainBudget(max_steps=60), base_features=8, seed=0)
    held = _sphere_case("held", seed=10)
    mask = predict_specialist(result, held.image)["blob"]
    assert dice(mask, held.mask("blob")) > 0.7


# ------------------------------------------------------------------------------------------ command
def test_case_selection_uses_the_split_and_limits():
    script = runpy.run_path(str(ROOT / "eval" / "specialist.py"), run_name="specialist_cli")
    cases = [_sphere_case("a"), _sphere_case("b"), _sphere_case("v1", "validation"), _sphere_case("v2", "validation")]
    train, held = script["select_cases"](cases, None, None, 1, None)
    assert [c.case for c in train] == ["a"] and [c.case for c in held] == ["v1", "v2"]
    with pytest.raises(SystemExit, match="--val-cases"):
        script["select_cases"](cases[:2], None, None, None, None)


def test_paired_comparison_skips_cases_not_scored_by_both():
    script = runpy.run_path(str(ROOT / "eval" / "specialist.py"), run_name="specialist_cli")
    nan = float("nan")
    per_case = [
        {"model": "specialist", "case": "a", "class": "liver", "dice": 0.9},
        {"model": "unisegtext", "case": "a", "class": "liver", "dice": 0.8},
        {"model": "specialist", "case": "b", "class": "liver", "dice": 0.6},
        {"model": "unisegtext", "case": "b", "class": "liver", "dice": 0.7},
        {"model": "specialist", "case": "c", "class": "liver", "dice": nan},  # absent in both: not paired
        {"model": "unisegtext", "case": "c", "class": "liver", "dice": 0.5},
        {"model": "specialist", "case": "a", "class": "spleen", "dice": nan},
        {"model": "unisegtext", "case": "a", "class": "spleen", "dice": nan},
    ]
    paired = script["paired_by_class"](per_case, ["liver", "spleen"])
    assert list(paired) == ["liver"]
    assert (paired["liver"]["cases"], paired["liver"]["better"]) == (2, 1)
    assert paired["liver"]["mean_dice_difference"] == pytest.approx(0.0)


def test_markdown_table_has_one_row_per_model_and_a_mean():
    script = runpy.run_path(str(ROOT / "eval" / "specialist.py"), run_name="specialist_cli")
    rows = [{"model": "spec", "training": "10 steps", "parameters": 2_000_000, "dice": {"a": 0.8, "b": 0.6}},
            {"model": "uni", "training": "x", "parameters": 3_000_000, "dice": {"a": 0.5, "b": float("nan")}}]
    table = script["markdown_table"](rows, ["a", "b"], 4)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 4
    assert lines[2].endswith("| 0.800 | 0.600 | 0.700 |")
    assert lines[3].endswith("| 0.500 | n/a | 0.500 |")


@pytest.mark.slow
def test_side_by_side_command_on_la_mri(shared_data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    script = runpy.run_path(str(ROOT / "eval" / "specialist.py"), run_name="specialist_cli")
    out = tmp_path / "side_by_side.json"
    monkeypatch.setattr(sys, "argv", ["specialist.py"])
    report = script["main"]([
        "--dataset", "la_mri_2018", "--root", str(shared_data / "la_mri"), "--checkpoint", str(tiny_model_dir),
        "--train-limit", "2", "--val-limit", "1", "--max-steps", "2", "--spacing", "3", "3", "3",
        "--base-features", "4", "--out", str(out), "--save-specialist", str(tmp_path / "spec"),
    ])
    printed = capsys.readouterr().out
    assert "| nnU-Net-style specialist (DynUNet) |" in printed and "| UniSegText (" in printed
    assert "heart_left_atrium Dice" in printed
    data = json.loads(out.read_text())
    assert data["held_out_cases"] == ["23X6SY44VT9KFHR7S7OC"]  # first of the 16 fixed validation ids
    assert data["specialist_steps"] == 2
    assert {r["model"] for r in data["per_case"]} == {"specialist", "unisegtext"}
    assert report["classes"] == ["heart_left_atrium"]
    from unisegtext.baselines import load_specialist

    assert load_specialist(tmp_path / "spec").classes == ["heart_left_atrium"]  # the saved model reads back
