"""Training: config, partial-label loss, balanced sampling, laterality, synthetic source, loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from unisegtext.errors import ConfigError
from unisegtext.training.config import TrainConfig
from unisegtext.training.losses import partial_label_loss

TRAIN_DIR = Path(__file__).resolve().parents[1] / "train"


def tiny_config(cache_dir: Path, totalseg_root: Path, **optim) -> TrainConfig:
    """A seconds-long run on the TotalSegmentator examples (tiny model, 6 mm)."""
    return TrainConfig.from_dict(
        {
            "name": "test",
            "seed": 3,
            "threads": 1,
            "model": {"preset": "tiny"},
            "data": {
                "cache_dir": str(cache_dir),
                "sources": [
                    {"dataset": "totalseg_example_ct", "root": str(totalseg_root), "weight": 1.0},
                    {"dataset": "totalseg_example_mr", "root": str(totalseg_root), "weight": 1.0},
                ],
            },
            "sampling": {"batch_size": 1, "prompts_per_sample": 2},
            "augment": {"affine_prob": 0.5},
            "synthetic": {"prob": 0.3, "label_maps": ["totalseg_example_ct"]},
            "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 4, **optim},
            "checkpoint": {"every_steps": 2, "keep_last": 1},
            "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        }
    )


@pytest.fixture(scope="module")
def cache_6mm(tmp_path_factory, shared_data) -> Path:
    from unisegtext.training.sources import build_cache

    cache = tmp_path_factory.mktemp("cache6")
    config = tiny_config(cache, shared_data / "totalseg_examples")
    build_cache(config.data.sources, cache, (6.0, 6.0, 6.0))
    return cache


@pytest.fixture(scope="module")
def dataset(cache_6mm, shared_data):
    from unisegtext.data import load_cache_index
    from unisegtext.models import config_from_preset
    from unisegtext.training.sampling import PatchDataset, PromptTexts
    from unisegtext.training.sources import load_sources

    config = tiny_config(cache_6mm, shared_data / "totalseg_examples")
    pre = config_from_preset("tiny").preprocessing
    sources = load_sources(load_cache_index(cache_6mm), config.data.sources, pre)
    annotated = sorted({c for s in sources.values() for case in s.cases for c in case.annotated})
    return PatchDataset(sources, config, pre, PromptTexts(annotated, "{name}", 0.3))


# ------------------------------------------------------------------ config


def test_shipped_configs_parse():
    for path in sorted(TRAIN_DIR.rglob("*.yaml")):
        if path.name.startswith("text_pretrain"):
            continue  # another trainer's config
        config = TrainConfig.from_yaml(path)
        assert config.data.sources, path


def test_nano_config_keeps_validation_out_and_no_lr_flip():
    config = TrainConfig.from_yaml(TRAIN_DIR / "nano.yaml")
    la = [s for s in config.data.sources if s.dataset == "la_mri_2018"]
    assert la and la[0].splits == ["train"]
    assert 0 not in config.augment.flip_axes or config.augment.flip_prob == 0
    assert config.threads == 2
    assert config.checkpoint.export_dir.endswith("unisegtext-nano")


def test_ablation_configs_change_only_what_they_ablate():
    """7a/7b fairness: a run and its control differ only in the ablated ingredient."""
    import dataclasses

    nano = TrainConfig.from_yaml(TRAIN_DIR / "history" / "nano_v1_la.yaml")  # the recipe they ablate
    la = TrainConfig.from_yaml(TRAIN_DIR / "ablations" / "la_only.yaml")
    assert (la.model, la.sampling, la.augment, la.seed) == (nano.model, nano.sampling, nano.augment, nano.seed)
    assert [(s.dataset, s.splits) for s in la.data.sources] == [("la_mri_2018", ["train"])]
    assert la.synthetic.prob == 0 and la.checkpoint.export_dir == ""  # never overwrites the shipped model
    assert (la.optim.max_steps, la.optim.horizon, la.optim.lr) == (2606, "steps", nano.optim.lr)
    folder = TRAIN_DIR / "ablations" / "synthetic"
    for with_name, trained_on in (("mr_to_ct", "totalseg_example_mr"), ("ct_to_mr", "totalseg_example_ct")):
        with_ = dataclasses.asdict(TrainConfig.from_yaml(folder / f"{with_name}.yaml"))
        without = dataclasses.asdict(TrainConfig.from_yaml(folder / f"{with_name}_no_synthetic.yaml"))
        assert [s["dataset"] for s in with_["data"]["sources"]] == [trained_on]
        assert with_["synthetic"]["prob"] > 0 and with_["synthetic"]["label_maps"] == [trained_on]
        assert without["synthetic"]["prob"] == 0
        for config in (with_, without):
            config["name"] = None
            config["synthetic"]["prob"], config["synthetic"]["label_maps"] = None, None
        assert with_ == without


def test_config_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("name: a\ndata: {sources: [{dataset: x}], cache_dir: c}\noptim: {lr: 0.5, max_steps: 7}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: b\noptim: {lr: 0.1}\n")
    config = TrainConfig.from_yaml(tmp_path / "child.yaml")
    assert (config.name, config.optim.lr, config.optim.max_steps, config.data.cache_dir) == ("b", 0.1, 7, "c")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        TrainConfig.from_yaml(tmp_path / "loop.yaml")


def test_config_rejects_typos_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr.*Did you mean: lr"):
        TrainConfig.from_dict({"data": {"sources": [{"dataset": "x"}]}, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="synthetic.label_maps"):
        TrainConfig.from_dict({"data": {"sources": [{"dataset": "x"}]}, "synthetic": {"prob": 0.5}})
    with pytest.raises(ConfigError, match="sampling.batch_size should be int"):
        TrainConfig.from_dict({"data": {"sources": [{"dataset": "x"}]}, "sampling": {"batch_size": "2"}})
    with pytest.raises(ConfigError, match="not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


# ------------------------------------------------------------------ loss


def test_loss_ignores_unannotated_prompts():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    targets = torch.zeros(2, 3, 4, 4, 4)
    targets[0, 0, :2] = 1
    valid = torch.tensor([[True, True, False], [True, False, False]])
    parts = partial_label_loss(logits, targets, valid)
    parts.loss.backward()
    assert parts.n_valid == 3 and parts.n_positive == 1
    grad = logits.grad.abs().sum(dim=(2, 3, 4))
    assert torch.all(grad[~valid] == 0), "an unannotated prompt must get no gradient"
    assert torch.all(grad[valid] > 0)
    # changing an invalid prompt's logits leaves the loss unchanged
    other = logits.detach().clone()
    other[0, 2] += 100.0
    assert torch.isclose(partial_label_loss(other, targets, valid).loss, parts.loss.detach())


def test_loss_perfect_prediction_is_near_zero_and_nothing_valid_is_zero():
    targets = torch.zeros(1, 2, 8, 8, 8)
    targets[0, 0, 2:6, 2:6, 2:6] = 1
    logits = (targets * 2 - 1) * 30.0
    parts = partial_label_loss(logits, targets, torch.tensor([[True, True]]))
    assert parts.loss.item() < 1e-3
    empty = partial_label_loss(logits.requires_grad_(), targets, torch.zeros(1, 2, dtype=torch.bool))
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad


# ------------------------------------------------------------------ sampling


def test_patches_are_deterministic_per_index(dataset):
    a, b, c = dataset[5], dataset[5], dataset[6]
    assert torch.equal(a.image, b.image) and torch.equal(a.targets, b.targets) and a.texts == b.texts
    assert not torch.equal(a.image, c.image)
    assert tuple(a.image.shape) == (1, 32, 32, 32)
    assert a.targets.shape[0] == len(a.texts) == len(a.concepts) <= 2


def test_prompts_are_annotated_concepts_with_correct_masks(dataset):
    for index in range(12):
        sample = dataset[index]
        source = sample.source.removeprefix("synthetic:")
        case = dataset.sources[source].cases[0]
        for concept in sample.concepts:
            assert concept in case.annotated
        assert len(set(sample.concepts)) == len(sample.concepts)
        # positives (non-empty masks) first, then annotated-but-absent negatives (empty masks)
        sizes = [int(m.sum()) for m in sample.targets]
        first_empty = next((i for i, n in enumerate(sizes) if n == 0), len(sizes))
        assert all(n == 0 for n in sizes[first_empty:]), sizes


def test_balanced_sampling_covers_datasets_and_synthetic(dataset):
    sources = [dataset[i].source for i in range(40)]
    assert any(s.startswith("synthetic:") for s in sources)
    assert "totalseg_example_ct" in sources and "totalseg_example_mr" in sources
    drawn = {dataset[i].concepts[0] for i in range(40) if dataset[i].concepts}
    assert len(drawn) >= 10, "concepts are drawn uniformly, not by size"


def test_left_right_flip_swaps_lateral_concepts(dataset):
    from unisegtext.training.sampling import TrainingCase, is_lateral, mirror_concept

    assert mirror_concept("kidney_left") == "kidney_right"
    assert mirror_concept("heart_left_atrium") == "heart_right_atrium"
    assert not is_lateral("liver")
    label = np.zeros((4, 4, 4), np.int32)
    label[:2] = 1  # value 1 = left kidney on the low-x side
    case = TrainingCase("s", "c", np.zeros((4, 4, 4), np.float32), label,
                        {"kidney_left": [1], "kidney_right": [2], "heart_left_atrium": [3]},
                        ["kidney_left", "kidney_right", "heart_left_atrium"], ["kidney_left"], 0.0, "CT")
    flipped = np.flip(label, 0)
    rng = np.random.default_rng(0)
    old = dataset.config.sampling.prompts_per_sample
    dataset.config.sampling.prompts_per_sample = 3
    try:
        texts, concepts, masks = dataset._prompts(case, "kidney_left", flipped, True, rng)
    finally:
        dataset.config.sampling.prompts_per_sample = old
    by_concept = dict(zip(concepts, masks))
    # after the flip the value-1 voxels are a right kidney; left atrium's mirror is unknown -> left out
    assert "heart_left_atrium" not in by_concept
    assert by_concept["kidney_right"].sum() == 32 and by_concept["kidney_right"][2:].all()
    assert by_concept["kidney_left"].sum() == 0


def test_synthetic_image_follows_labels():
    from unisegtext.training.config import SyntheticSection
    from unisegtext.training.synthetic import synthesize_image

    label = np.zeros((24, 24, 24), np.int32)
    label[6:18, 6:18, 6:18] = 5
    cfg = SyntheticSection(std_range=(0.01, 0.02), bias_prob=0.0)
    a = synthesize_image(label, np.random.default_rng(1), cfg)
    b = synthesize_image(label, np.random.default_rng(2), cfg)
    assert a.shape == label.shape and a.dtype == np.float32
    inside, outside = a[9:15, 9:15, 9:15].mean(), a[:3].mean()
    assert abs(inside - outside) > 0.05, "labels get distinct intensities"
    assert not np.allclose(a, b), "each draw paints new contrasts"


# ------------------------------------------------------------------ the loop


def test_train_runs_checkpoints_and_exports(tmp_path, cache_6mm, shared_data):
    import csv

    from unisegtext.models import UniSegText
    from unisegtext.training.trainer import train

    config = tiny_config(cache_6mm, shared_data / "totalseg_examples")
    config.checkpoint.export_dir = str(tmp_path / "export")
    result = train(config, tmp_path / "run", device="cpu")
    assert result.steps == 4 and result.stopped_by == "max_steps"
    assert np.isfinite(result.last_loss)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[0]["lr"]) < float(rows[1]["lr"]) or float(rows[1]["lr"]) > float(rows[-1]["lr"])
    model = UniSegText.from_pretrained(tmp_path / "export")
    assert "liver" in model.config.concepts and "kidney_left" in model.config.concepts
    assert (tmp_path / "export" / "README.md").read_text().count("steps: 4") == 1
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 1  # keep_last


def test_resume_without_checkpoint_is_an_error(tmp_path, cache_6mm, shared_data):
    from unisegtext.training.trainer import TrainingError, train

    with pytest.raises(TrainingError, match="no checkpoint"):
        train(tiny_config(cache_6mm, shared_data / "totalseg_examples"), tmp_path / "none", resume=True, device="cpu")


def test_cli_registers_train(tmp_path):
    from unisegtext.cli import build_parser, main

    args = build_parser().parse_args(["train", "--config", "c.yaml", "--resume", "--max-steps", "3", "--out", "o"])
    assert (args.config, args.resume, args.max_steps, args.out) == ("c.yaml", True, 3, "o")
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2  # a clear error, not a traceback


def test_la_validation_script_scores_held_out_scans(tmp_path, tiny_model_dir, shared_data):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "eval" / "la_validation.py"
    spec = importlib.util.spec_from_file_location("la_validation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = module.validation_ids()
    assert len(ids) == 16
    out = tmp_path / "la.json"
    assert module.main(["--model", str(tiny_model_dir), "--data", str(shared_data / "la_mri"),
                        "--limit", "1", "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["per_case"][0]["case"] == ids[0]
    assert 0.0 <= report["summary"]["dice_mean"] <= 1.0


def test_trainer_reads_a_prepared_totalsegmentator_layout(tmp_path, shared_data):
    """Registry path end to end: the shared example in TotalSegmentator's own layout ->
    `unisegtext data prepare` -> the trainer trains on that cache (issue: data registry)."""
    import json

    import nibabel as nib

    from unisegtext.cli import main as cli_main
    from unisegtext.data import load_cache_index
    from unisegtext.training.trainer import train

    examples = shared_data / "totalseg_examples"
    classes = json.loads((examples / "classes.json").read_text())["total"]
    seg_img = nib.load(str(examples / "ct_seg.nii.gz"))
    seg = np.asarray(seg_img.dataobj).astype(np.uint8)
    case_dir = tmp_path / "ts" / "s0001"
    (case_dir / "segmentations").mkdir(parents=True)
    nib.save(nib.load(str(examples / "ct.nii.gz")), str(case_dir / "ct.nii.gz"))
    for value, name in classes.items():
        nib.save(nib.Nifti1Image((seg == int(value)).astype(np.uint8), seg_img.affine),
                 str(case_dir / "segmentations" / f"{name}.nii.gz"))
    cache = tmp_path / "cache"
    assert cli_main(["data", "prepare", str(tmp_path / "ts"), "--dataset", "totalsegmentator_v2_ct",
                     "--out", str(cache), "--spacing", "6", "6", "6", "--no-progress"]) == 0
    (entry,) = load_cache_index(cache)["cases"]
    assert entry["dataset"] == "totalsegmentator_v2_ct" and len(entry["annotated"]) == 117

    config = TrainConfig.from_dict(
        {
            "name": "registry-path",
            "seed": 1,
            "threads": 1,
            "model": {"preset": "tiny"},
            "data": {"cache_dir": str(cache),
                     "sources": [{"dataset": "totalsegmentator_v2_ct", "root": str(tmp_path / "ts"), "weight": 1.0}]},
            "sampling": {"batch_size": 1, "prompts_per_sample": 2},
            "synthetic": {"prob": 0.0},
            "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 2},
            "checkpoint": {"every_steps": 2, "keep_last": 1},
            "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        }
    )
    result = train(config, tmp_path / "run", device="cpu")
    assert result.steps == 2 and np.isfinite(result.last_loss)
    exported = json.loads((result.final_dir / "config.json").read_text())
    trained = exported["concepts"]
    assert {"liver", "kidney_left", "vertebra_l1"} <= set(trained)  # the 117 annotated concepts
    # each concept's training scans are recorded: one subject here, so every concept says 1
    assert exported["concept_training_scans"]["liver"] == 1 and set(exported["concept_training_scans"]) <= set(trained)


def test_synthetic_ablation_scores_the_other_subject(tiny_model_dir, shared_data):
    """eval/ablation_synthetic.py: references from TotalSegmentator's labels, scored through segment()."""
    import importlib.util
    import json

    import nibabel as nib

    path = Path(__file__).resolve().parents[1] / "eval" / "ablation_synthetic.py"
    spec = importlib.util.spec_from_file_location("ablation_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = shared_data / "totalseg_examples"
    volume, references, spacing = module.subject_references(root, "mr")
    classes = json.loads((root / "classes.json").read_text())["total_mr"]
    liver_value = int(next(k for k, v in classes.items() if v == "liver"))
    label = np.asarray(nib.load(str(root / "mr_seg.nii.gz")).dataobj)
    assert np.array_equal(references["liver"], label == liver_value)
    assert volume.array.shape == label.shape and spacing == pytest.approx((3.0, 3.0, 3.0))
    ct_concepts = set(module.subject_references(root, "ct")[1])
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= ct_concepts & set(references)
    rows = module.score(tiny_model_dir, volume, references, spacing, ["liver", "spleen"])
    assert [r["concept"] for r in rows] == ["liver", "spleen"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert rows[0]["ref_volume_ml"] == pytest.approx(references["liver"].sum() * 27 / 1000, rel=1e-3)


def test_ablation_la_pairs_scans_by_case():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "eval" / "ablation_la.py"
    spec = importlib.util.spec_from_file_location("ablation_la", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = [{"case": "a", "dice": 0.80}, {"case": "b", "dice": 0.90}, {"case": "c", "dice": 0.70}]
    other = [{"case": "c", "dice": 0.75}, {"case": "a", "dice": 0.85}, {"case": "b", "dice": 0.87}]  # other order
    paired = module.paired_vs_reference(reference, other)
    assert (paired["cases"], paired["better"]) == (3, 2)
    assert paired["mean_dice_difference"] == pytest.approx((0.05 + 0.05 - 0.03) / 3)
