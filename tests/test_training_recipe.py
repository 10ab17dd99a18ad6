"""Issue 17, point 1: the training recipe must look like inference and keep concepts apart.

Windows drawn as the sliding window sees them (random ones, air included, and absent prompts),
queries of distinct concepts kept apart, and per-source / per-concept / whole-volume figures in
the training log.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unisegtext.models import config_from_preset
from unisegtext.training.config import TrainConfig
from unisegtext.training.losses import distinct_pairs, query_separation_loss
from unisegtext.training.monitor import PairStats, summarise_validation, validate
from unisegtext.training.sampling import PatchDataset, PromptTexts
from unisegtext.training.sources import SourceCases, TrainingCase

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "aorta", "pancreas", "gallbladder"]


def synthetic_case(seed: int = 0) -> TrainingCase:
    """A 96^3 'abdomen' whose organs are small boxes in one corner; most of it is air."""
    rng = np.random.default_rng(seed)
    label = np.zeros((96, 96, 96), dtype=np.uint8)
    for value in range(1, len(ORGANS) + 1):
        x, y, z = (rng.integers(4, 28) for _ in range(3))
        label[x : x + 4, y : y + 4, z : z + 4] = value
    image = np.where(label > 0, 0.5, -1.0).astype(np.float32)
    targets = {c: [i + 1] for i, c in enumerate(ORGANS)}
    return TrainingCase(source="toy", case=f"c{seed}", image=image, label=label, targets=targets,
                        annotated=list(ORGANS), present=list(ORGANS), pad_value=-1.0, modality="CT")


def recipe(**sampling) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"sources": [{"dataset": "toy"}]},
        "sampling": {"batch_size": 1, "prompts_per_sample": 16, "negatives_per_sample": 1, **sampling},
        "augment": {"affine_prob": 0.0, "intensity_scale_prob": 0, "noise_prob": 0, "blur_prob": 0,
                    "gamma_prob": 0, "low_res_prob": 0},
    })


def toy_dataset(**sampling) -> PatchDataset:
    case = synthetic_case()
    source = SourceCases("toy", 1.0, [case], {c: [0] for c in ORGANS})
    pre = config_from_preset("tiny", preprocessing={"patch_size": (32, 32, 32)}).preprocessing
    return PatchDataset({"toy": source}, recipe(**sampling), pre, PromptTexts(ORGANS, "{name}", 0.0))


def test_random_windows_include_air_and_absent_prompts():
    """With nnU-Net's one third foreground-centred, most windows are drawn anywhere in the scan:
    many hold no organ at all (all prompts absent), which the old recipe (0.67, one negative)
    almost never taught."""
    data = toy_dataset(foreground_prob=0.33, absent_fraction=0.5)
    positives, absent, empty_windows = 0, 0, 0
    for i in range(60):
        sample = data[i]
        present = int((sample.targets.flatten(1).sum(1) > 0).sum())
        positives += present
        absent += len(sample.texts) - present
        empty_windows += present == 0
        assert float((sample.image == -1.0).float().mean()) >= 0.0
    assert empty_windows >= 15, empty_windows  # windows of air and background are drawn
    assert 0.35 <= absent / (positives + absent) <= 0.8, (positives, absent)


def test_out_of_view_concepts_become_absent_prompts_only_when_asked():
    """A source that annotates one structure (the LA crops) never taught "absent" (0 of 708 LA
    pairs in stage 3's log); its descriptor's outside_field_of_view concepts are absent from every
    scan, so they are valid negatives with empty masks."""
    from unisegtext.training.sources import _outside_field_of_view

    assert "liver" in _outside_field_of_view("la_mri_2018") and _outside_field_of_view("no_such_dataset") == []
    label = np.zeros((48, 48, 48), dtype=np.uint8)
    label[10:30, 10:30, 10:30] = 1
    case = TrainingCase(source="la", case="c0", image=np.where(label > 0, 0.5, -1.0).astype(np.float32), label=label,
                        targets={"heart_left_atrium": [1]}, annotated=["heart_left_atrium"], present=["heart_left_atrium"],
                        pad_value=-1.0, modality="MR", out_of_view=["liver", "spleen", "not_trained_anywhere"])
    pre = config_from_preset("tiny", preprocessing={"patch_size": (32, 32, 32)}).preprocessing
    texts = PromptTexts(["heart_left_atrium", "liver", "spleen"], "{name}", 0.0)
    source = {"la": SourceCases("la", 1.0, [case], {"heart_left_atrium": [0]})}
    off = PatchDataset(source, recipe(foreground_prob=1.0, absent_fraction=0.5), pre, texts)
    on = PatchDataset(source, recipe(foreground_prob=1.0, absent_fraction=0.5, out_of_view_negatives=True), pre, texts)
    for i in range(6):
        assert off[i].concepts == ["heart_left_atrium"]
        sample = on[i]
        # one positive, so absent_fraction 0.5 asks for one absent prompt: liver or spleen
        assert sample.concepts[0] == "heart_left_atrium" and len(sample.concepts) == 2, sample.concepts
        assert sample.concepts[1] in {"liver", "spleen"}
        assert "not_trained_anywhere" not in sample.concepts
        for concept, target in zip(sample.concepts, sample.targets):
            if concept != "heart_left_atrium":
                assert not target.any()  # absent: an empty mask
        assert sample.targets[0].any()


def test_absent_fraction_sets_the_share_of_absent_prompts():
    """For patches where a few organs are present, absent_fraction 0.5 adds as many absent prompts."""
    data = toy_dataset(foreground_prob=1.0, absent_fraction=0.5)
    for i in range(20):
        sample = data[i]
        present = int((sample.targets.flatten(1).sum(1) > 0).sum())
        assert present >= 1
        assert len(sample.texts) - present == min(len(ORGANS) - present, max(1, present)), (present, sample.texts)
    old = toy_dataset(foreground_prob=1.0, absent_fraction=0.0, prompts_per_sample=2)
    sample = old[0]
    assert len(sample.texts) == 2 and int((sample.targets.flatten(1).sum(1) > 0).sum()) == 1  # one positive, one negative


def test_distinct_pairs_keep_groups_with_their_members():
    concepts = ["kidney", "kidney_left", "kidney_right", "liver", "urinary_bladder"]
    pairs = {(concepts[i], concepts[j]) for i, j in distinct_pairs(concepts).tolist()}
    assert ("kidney_left", "kidney_right") in pairs and ("liver", "urinary_bladder") in pairs
    assert ("kidney", "kidney_left") not in pairs and ("kidney", "kidney_right") not in pairs


def test_query_separation_pushes_collapsed_queries_apart():
    """The failure of the first nano model (cosine 1.00 between 'liver' and 'urinary bladder')
    is penalised, and a few gradient steps on the loss alone separate the queries."""
    torch.manual_seed(0)
    base = torch.randn(1, 8)
    queries = (base.repeat(3, 1) + 0.01 * torch.randn(3, 8)).requires_grad_(True)
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])
    loss, top = query_separation_loss(queries, pairs, margin=0.7)
    assert top > 0.99 and float(loss.detach()) > 0.05
    optimiser = torch.optim.SGD([queries], lr=1.0)
    for _ in range(200):
        optimiser.zero_grad()
        loss, top = query_separation_loss(queries, pairs, margin=0.7)
        loss.backward()
        optimiser.step()
    assert top < 0.75
    below = torch.eye(3)
    assert float(query_separation_loss(below, pairs, 0.7)[0]) == 0.0


def test_pair_stats_split_by_source_and_concept():
    stats = PairStats()
    logits = torch.full((2, 2, 4, 4, 4), -5.0)
    targets = torch.zeros(2, 2, 4, 4, 4)
    targets[0, 0, :2] = 1
    logits[0, 0, :2] = 5.0  # perfect liver on sample 0
    logits[1, 1, 0, 0, 0] = 5.0  # one false-positive voxel for an absent spleen on sample 1
    valid = torch.tensor([[True, True], [True, True]])
    zeros = torch.zeros(2, 2)
    stats.add(logits, targets, valid, zeros, zeros, ["btcv", "la"], [["liver", "spleen"], ["liver", "spleen"]])
    summary = stats.summary()
    assert summary["concepts"]["liver"]["dice"] == 1.0 and summary["concepts"]["liver"]["positives"] == 1
    assert summary["concepts"]["spleen"]["false_positive_rate"] == 0.5
    assert summary["sources"]["la"]["false_positive_rate"] == 0.5 and summary["sources"]["la"]["dice"] is None


def test_whole_volume_validation_scores_every_annotated_concept(tiny_model):
    case = synthetic_case()
    texts = PromptTexts(ORGANS, "{name}", 0.0)
    rows = validate(tiny_model, [case], texts, overlap=0.25, device=torch.device("cpu"))
    assert {r["concept"] for r in rows} == set(ORGANS)
    assert all(0 < r["ref_voxels"] <= 64 for r in rows)
    summary = summarise_validation(rows)["toy"]
    assert set(summary["concepts"]) == set(ORGANS) and summary["cases"] == 1
    assert not tiny_model.training  # left in the mode it was found in (eval)


def test_training_logs_per_source_concept_and_validation(tmp_path, shared_data):
    """A few steps of the real recipe's machinery: metrics_detail.jsonl holds per-source and
    per-concept figures, validation.jsonl the whole-volume Dice of held-out scans."""
    from unisegtext.training import train

    config = TrainConfig.from_dict({
        "name": "log-test", "seed": 0, "threads": 1,
        "model": {"preset": "tiny", "text_adapter": "", "overrides": {"backbone": {"channels": [4, 8, 16]}}},
        "data": {"cache_dir": str(tmp_path / "cache"), "sources": [
            {"dataset": "la_mri_2018", "root": str(shared_data / "la_mri"), "weight": 1.0, "limit": 2},
            {"dataset": "totalseg_example_ct", "root": str(shared_data / "totalseg_examples"), "weight": 1.0},
        ]},
        "sampling": {"batch_size": 1, "prompts_per_sample": 4, "absent_fraction": 0.5, "foreground_prob": 0.33},
        "optim": {"lr": 0.001, "warmup_steps": 1, "max_steps": 4, "query_weight": 1.0, "query_margin": 0.7,
                  "lagging_concept_power": 1.0},
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "validation": {"every_steps": 4, "sources": [{"dataset": "la_mri_2018", "split": "validation", "limit": 1}]},
        "logging": {"every_steps": 1, "detail_every_steps": 2, "tensorboard": False, "progress": False},
    })
    result = train(config, tmp_path / "run", device="cpu")
    assert result.steps == 4
    detail = [json.loads(line) for line in (tmp_path / "run" / "metrics_detail.jsonl").read_text().splitlines()]
    assert [d["step"] for d in detail] == [2, 4]
    assert set().union(*(d["sources"] for d in detail)) <= {"la_mri_2018", "totalseg_example_ct"}
    assert any(d["concepts"] for d in detail)
    # the lagging-concept weights of the concepts with a positive pair so far are logged
    assert all(0.25 <= w <= 4.0 for d in detail for w in d["dice_weights"].values())
    assert any(d["dice_weights"] for d in detail)
    validation = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [4]
    rows = validation[0]["rows"]
    assert {r["dataset"] for r in rows} == {"la_mri_2018"} and rows[0]["concept"] == "heart_left_atrium"
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "query_cos_max" in header


def test_pair_weights_make_the_dice_term_a_weighted_mean_and_shift_the_gradient():
    from unisegtext.training.losses import partial_label_loss

    targets = torch.zeros((1, 3, 8, 8, 8))
    targets[0, 0, :4] = 1   # a learnt organ
    targets[0, 1, :2, :2] = 1  # a lagging one
    valid = torch.tensor([[True, True, False]])
    logits = torch.where(targets > 0, 4.0, -4.0)
    logits[0, 1] = -4.0  # nothing painted for the lagging one
    logits.requires_grad_(True)
    plain = partial_label_loss(logits, targets, valid)
    per_pair = plain.pair_dice_loss[0, :2]
    weights = torch.tensor([[0.5, 2.0, 7.0]])  # the padding slot's weight must not count
    weighted = partial_label_loss(logits, targets, valid, pair_weight=weights)
    expected = (0.5 * per_pair[0] + 2.0 * per_pair[1]) / 2.5
    assert weighted.dice == pytest.approx(float(expected), rel=1e-5)
    assert plain.dice == pytest.approx(float(per_pair.mean()), rel=1e-5)
    weighted.loss.backward()
    g_weighted = logits.grad.abs().flatten(2).sum(-1)[0]
    logits.grad = None
    plain.loss.backward()
    g_plain = logits.grad.abs().flatten(2).sum(-1)[0]
    # the lagging pair pulls harder, the learnt one less (BCE, unweighted, is the same in both)
    assert g_weighted[1] > 1.1 * g_plain[1] and g_weighted[0] < 0.9 * g_plain[0]


def test_lagging_concept_weights_follow_the_running_training_dice_loss():
    from unisegtext.training.losses import LaggingConceptWeights, partial_label_loss

    lag = LaggingConceptWeights(power=1.0, momentum=0.5, max_weight=3.0)
    assert lag.weight("liver") == 1.0  # not seen yet
    concepts = [["liver", "adrenal_gland_left", "spleen", ""]]
    valid = torch.tensor([[True, True, True, False]])
    targets = torch.zeros((1, 4, 4, 4, 4))
    targets[0, :2, 0, 0, 0] = 1  # spleen absent from the patch: it must not enter the running means
    positive = partial_label_loss(torch.zeros_like(targets), targets, valid).pair_positive
    assert positive.tolist() == [[True, True, False, False]]
    for _ in range(5):
        lag.update(concepts, positive, torch.tensor([[0.1, 0.95, 0.0, 0.0]]))
    assert set(lag.ema) == {("", "liver"), ("", "adrenal_gland_left")}
    assert lag.weight("adrenal_gland_left") > 1.0 > lag.weight("liver")
    assert lag.weight("spleen") == 1.0
    w = lag.pair_weights(concepts, valid)
    assert w.shape == (1, 4) and float(w[0, 3]) == 1.0 and float(w[0, 1]) == pytest.approx(lag.weight("adrenal_gland_left"))
    extreme = LaggingConceptWeights(power=4.0, max_weight=3.0)
    extreme.update(concepts, positive, torch.tensor([[0.01, 0.99, 0.0, 0.0]]))
    assert extreme.weight("adrenal_gland_left") == 3.0 and extreme.weight("liver") == pytest.approx(1 / 3)
    assert LaggingConceptWeights(power=0.0).pair_weights(concepts, valid).eq(1).all()
    with pytest.raises(ValueError):
        LaggingConceptWeights(power=-1.0)


def test_lagging_concept_weights_are_relative_to_the_concepts_of_the_same_source():
    from unisegtext.training.losses import LaggingConceptWeights

    # BTCV: the liver is learnt, the oesophagus lags; the example subject: every concept lags.
    # With one mean over all concepts the oesophagus would hardly stand out; within BTCV it does.
    # (every pair here is positive: valid with a non-empty target)
    lag = LaggingConceptWeights(power=1.0, momentum=0.5, max_weight=4.0)
    btcv = [["liver", "esophagus"]]
    example = [["liver", "rib_left_3", "vertebrae_L1"]]
    valid2, valid3 = torch.ones((1, 2), dtype=torch.bool), torch.ones((1, 3), dtype=torch.bool)
    for _ in range(4):
        lag.update(btcv, valid2, torch.tensor([[0.1, 0.9]]), ["btcv_abdomen"])
        lag.update(example, valid3, torch.tensor([[0.85, 0.9, 0.95]]), ["totalseg_example_ct"])
    oesophagus = lag.weight("esophagus", "btcv_abdomen")
    assert oesophagus == pytest.approx(0.9 / 0.5, rel=1e-3)  # its source's mean is (0.1 + 0.9) / 2
    assert lag.weight("liver", "btcv_abdomen") == pytest.approx(0.25)  # clipped at 1 / 4
    # the same concept in another source has its own running mean and weight
    assert lag.weight("liver", "totalseg_example_ct") == pytest.approx(0.85 / 0.9, rel=1e-3)
    w = lag.pair_weights([["esophagus", "liver"], ["liver", ""]], torch.tensor([[True, True], [True, False]]),
                         ["btcv_abdomen", "totalseg_example_ct"])
    assert w.flatten().tolist() == pytest.approx([oesophagus, 0.25, 0.85 / 0.9, 1.0], rel=1e-3)
    assert lag.weight("esophagus", "la_mri_2018") == 1.0  # never seen in that source
    assert "btcv_abdomen/esophagus" in lag.snapshot()


@pytest.mark.parametrize("bad", [{"absent_fraction": 1.0}, {"foreground_prob": 1.5}])
def test_recipe_values_are_checked(bad):
    from unisegtext.errors import ConfigError

    with pytest.raises(ConfigError):
        recipe(**bad)


def test_mask_separation_pushes_collapsed_mask_vectors_apart_but_not_related_ones():
    """The step-1500 model of the first v2 run gave left and right kidney mask vectors with
    cosine 0.99; this term penalises exactly that, and leaves 'kidney' vs 'left kidney' alone."""
    from unisegtext.training.losses import mask_separation_loss, related_concepts

    concepts = [["kidney_left", "kidney_right", "kidney", ""]]
    valid = torch.tensor([[True, True, True, False]])
    related = related_concepts(["kidney", "kidney_left", "kidney_right"])
    assert ("kidney", "kidney_left") in related and ("kidney_left", "kidney_right") not in related
    base = torch.randn(1, 1, 8)
    vectors = (base.repeat(1, 4, 1) + 0.01 * torch.randn(1, 4, 8)).requires_grad_(True)
    loss, mean_cos = mask_separation_loss(vectors, concepts, valid, related, margin=0.5)
    assert mean_cos > 0.99 and float(loss.detach()) > 0.2  # only left vs right counts
    loss.backward()
    assert vectors.grad[0, 3].abs().sum() == 0  # padding gets no gradient
    optimiser = torch.optim.SGD([vectors], lr=1.0)
    for _ in range(300):
        optimiser.zero_grad()
        loss, mean_cos = mask_separation_loss(vectors, concepts, valid, related, margin=0.5)
        loss.backward()
        optimiser.step()
    assert mean_cos < 0.55


def test_text_skip_gives_distinct_mask_vectors_for_distinct_queries():
    """With the text skip, two distinct queries give distinct mask vectors even when the decoder
    layers map every query to the same vector (simulated by zeroing their outputs)."""
    from unisegtext.models import UniSegText

    torch.manual_seed(0)
    model = UniSegText.from_preset("tiny", decoder={"text_skip": True})
    torch.nn.init.normal_(model.head.text_skip.weight)
    for module in (model.head.mask_embed,):
        for parameter in module.parameters():
            torch.nn.init.zeros_(parameter)
    image = torch.randn(1, 1, 32, 32, 32)
    texts = model.encode_text(["liver", "spleen"])
    logits, vectors = model(image, texts, return_mask_vectors=True)
    assert logits.shape == (1, 2, 32, 32, 32) and vectors.shape[:2] == (1, 2)
    assert float(torch.nn.functional.cosine_similarity(vectors[0, 0], vectors[0, 1], dim=0)) < 0.99
    plain = UniSegText.from_preset("tiny")
    assert plain.head.text_skip is None and "head.text_skip.weight" not in plain.state_dict()


def test_absent_topk_makes_a_blob_for_an_absent_prompt_cost_what_it_should():
    """Mean BCE barely notices a blob painted for an absent structure; the top-k term does."""
    from unisegtext.training.losses import partial_label_loss

    logits = torch.full((1, 1, 20, 20, 20), -8.0)
    logits[0, 0, :4, :4, :10] = 3.0  # a 160-voxel blob (2 % of the patch), nothing there
    targets = torch.zeros_like(logits)
    valid = torch.tensor([[True]])
    plain = partial_label_loss(logits, targets, valid)
    topk = partial_label_loss(logits, targets, valid, absent_topk_weight=1.0, absent_topk_fraction=0.02)
    assert plain.loss < 0.1  # the mean BCE hides the blob
    assert topk.loss > 2.5   # softplus(3) ~ 3.05 over the top 2 %
    clean = partial_label_loss(torch.full_like(logits, -8.0), targets, valid, absent_topk_weight=1.0)
    assert clean.loss < 0.01


def test_absent_topk_floor_leaves_weak_evidence_under_the_threshold_alone():
    """With a floor, an absent prompt's map that already stays under it gets no gradient from
    the top-k term (v4's stage pushed the spleen's sub-threshold map down in every patch
    without a spleen, and its Dice stayed 0); a blob above the floor is still penalised."""
    from unisegtext.training.losses import partial_label_loss

    targets = torch.zeros((1, 1, 20, 20, 20))
    valid = torch.tensor([[True]])
    weak = torch.full((1, 1, 20, 20, 20), -6.0)
    weak[0, 0, :4, :4, :10] = -1.5  # sub-threshold evidence (p ~ 0.18), nothing painted
    weak.requires_grad_(True)
    partial_label_loss(weak, targets, valid, absent_topk_weight=1.0, absent_topk_floor=-1.0).loss.backward()
    floored = weak.grad.clone()
    weak.grad = None
    partial_label_loss(weak, targets, valid).loss.backward()
    mean_bce_only = weak.grad.clone()
    weak.grad = None
    partial_label_loss(weak, targets, valid, absent_topk_weight=1.0).loss.backward()
    unfloored = weak.grad.clone()
    assert torch.allclose(floored, mean_bce_only)  # the top-k term adds nothing under the floor
    assert unfloored[0, 0, :4, :4, :10].abs().min() > 20 * mean_bce_only[0, 0, :4, :4, :10].abs().max()

    blob = torch.full((1, 1, 20, 20, 20), -6.0)
    blob[0, 0, :4, :4, :10] = 3.0  # painted
    with_floor = partial_label_loss(blob, targets, valid, absent_topk_weight=1.0, absent_topk_floor=-1.0)
    assert with_floor.loss > 2.5


@pytest.mark.parametrize("bad", [{"lagging_concept_power": -0.5}, {"lagging_concept_momentum": 1.0},
                                 {"lagging_concept_max_weight": 0.5}])
def test_lagging_concept_values_are_checked(bad):
    from unisegtext.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(bad))):
        TrainConfig.from_dict({"data": {"sources": [{"dataset": "toy"}]}, "optim": bad})
