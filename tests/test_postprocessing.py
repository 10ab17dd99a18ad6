"""Post-processing: exact box resampling, largest component, union prompts, modality guess."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unisegtext.inference.postprocessing import keep_largest_component, resample_box, restore_mask
from unisegtext.inference.preprocessing import orientation_transforms
from unisegtext.io.volume import guess_modality


@pytest.mark.parametrize(("shape", "out"), [((20, 17, 9), (61, 50, 30)), ((30, 30, 30), (11, 13, 7)), ((6, 6, 6), (6, 6, 6))])
def test_resample_box_equals_torch_interpolate(shape, out):
    torch.manual_seed(0)
    volume = torch.rand(shape)
    full = F.interpolate(volume[None, None], out, mode="trilinear", align_corners=False)[0, 0]
    box = (slice(2, out[0] - 1), slice(0, out[1]), slice(1, max(2, out[2] // 2)))
    assert torch.allclose(resample_box(volume, out, box), full[box], atol=1e-5)


def test_restore_mask_equals_thresholding_the_full_resampling():
    from unisegtext.inference.preprocessing import PreparedVolume, restore

    rng = np.random.default_rng(1)
    prob = torch.zeros(30, 25, 20)
    prob[10:16, 5:12, 4:9] = torch.from_numpy(rng.uniform(0.3, 1.0, (6, 7, 5)).astype(np.float32))
    affine = np.diag([-0.8, 0.8, 2.5, 1.0])  # an LAS input: the mask must come back flipped
    to_c, from_c = orientation_transforms(affine)
    prepared = PreparedVolume(image=torch.zeros(1, 30, 25, 20), canonical_shape=(70, 61, 24), to_canonical=to_c,
                              from_canonical=from_c, modality="CT", spacing_mm=(2.0, 2.0, 2.0), pad_value=-1.0)
    mask, score = restore_mask(prob, prepared, 0.5)
    full = restore(prob[None], prepared)[0]
    assert mask.shape == full.shape == (70, 61, 24)
    assert np.array_equal(mask, full > 0.5) and mask.any()
    assert score == pytest.approx(float(full[full > 0.5].mean()), rel=1e-5)
    empty, zero = restore_mask(torch.zeros(30, 25, 20), prepared, 0.5)
    assert not empty.any() and zero == 0.0


def test_keep_largest_component_drops_small_blobs_only():
    prob = torch.zeros(20, 20, 20)
    prob[2:10, 2:10, 2:10] = 0.9  # the organ
    prob[15:17, 15:17, 15:17] = 0.8  # a stray blob
    prob[12, 12, 12] = 0.3  # below the threshold: untouched
    out = keep_largest_component(prob, 0.5)
    assert float(out[5, 5, 5]) == pytest.approx(0.9) and float(out[16, 16, 16]) == 0.0
    assert float(out[12, 12, 12]) == pytest.approx(0.3)
    single = torch.zeros(5, 5, 5)
    single[1:3, 1:3, 1:3] = 0.7
    assert torch.equal(keep_largest_component(single, 0.5), single)


def test_group_prompt_is_the_union_of_trained_members_even_when_the_group_was_trained():
    from unisegtext.inference.prompts import resolve_prompts

    trained = ["kidney", "kidney_left", "kidney_right", "liver"]
    kidney, left = resolve_prompts(["kidney", "left kidney"], trained)
    assert kidney.union_of == ["kidney_left", "kidney_right"] and kidney.concept_id == "kidney"
    assert left.union_of == [] and left.text == ["left kidney"]
    (only_group,) = resolve_prompts(["kidney"], ["kidney", "liver"])  # members not trained: the group itself
    assert only_group.union_of == [] and only_group.text == ["kidney"]


def test_windowed_ct_without_air_is_guessed_ct_and_mr_stays_mr(ct_path, mr_path):
    import nibabel as nib

    ct = np.asarray(nib.load(str(ct_path)).get_fdata(dtype=np.float32))
    mr = np.asarray(nib.load(str(mr_path)).get_fdata(dtype=np.float32))
    assert guess_modality(ct) == "CT"
    assert guess_modality(np.clip(ct, -125, 275)) == "CT"  # BTCV-style window: air reads -125
    assert guess_modality(mr) == "MR"
    zscored = (mr - mr.mean()) / mr.std()
    assert guess_modality(zscored) == "MR"
