"""segment(): the whole pipeline on real example scans with a tiny random model."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from unisegtext import segment
from unisegtext.errors import PromptError, UnknownConceptError, VolumeError
from unisegtext.io import read_volume


@pytest.mark.parametrize("name, shape", [("ct.nii.gz", (122, 101, 112)), ("mr.nii.gz", (117, 91, 20))])
def test_segment_returns_masks_on_input_grid(shared_data, tiny_model_dir, name, shape):
    path = shared_data / "totalseg_examples" / name
    result = segment(path, ["liver", "spleen"], model=tiny_model_dir, progress=False)
    assert result.prompts == ["liver", "spleen"]
    ref = nib.load(str(path))
    for mask in result.masks.values():
        assert mask.shape == shape
        assert mask.dtype == bool
    assert np.allclose(result.affine, ref.affine)
    assert result.resolutions["liver"].concept_id == "liver"
    assert set(result.volumes_ml) == {"liver", "spleen"}


def test_inputs_agree_across_types(ct_path, tiny_model):
    vol = read_volume(ct_path)
    by_path = segment(ct_path, ["liver"], model=tiny_model, return_probabilities=True, progress=False)
    by_array = segment(vol.array, ["liver"], model=tiny_model, affine=vol.affine, modality="CT",
                       return_probabilities=True, progress=False)
    by_image = segment(nib.load(str(ct_path)), ["liver"], model=tiny_model, return_probabilities=True, progress=False)
    assert np.allclose(by_path.probabilities["liver"], by_array.probabilities["liver"], atol=1e-5)
    assert np.allclose(by_path.probabilities["liver"], by_image.probabilities["liver"], atol=1e-5)


def test_orientation_round_trip_is_exact(ct_path, tiny_model):
    """Flipping the array and its affine must flip the prediction the same way."""
    vol = read_volume(ct_path)
    flipped_affine = vol.affine @ np.array([[-1, 0, 0, vol.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    a = segment(vol.array, ["liver"], model=tiny_model, affine=vol.affine, return_probabilities=True, progress=False)
    b = segment(vol.array[::-1].copy(), ["liver"], model=tiny_model, affine=flipped_affine,
                return_probabilities=True, progress=False)
    assert np.allclose(a.probabilities["liver"][::-1], b.probabilities["liver"], atol=1e-5)


def test_many_prompts_chunked_equals_unchunked(ct_path, tiny_model):
    prompts = ["liver", "spleen", "aorta", "pancreas", "stomach"]
    one_pass = segment(ct_path, prompts, model=tiny_model, return_probabilities=True, progress=False)
    chunked = segment(ct_path, prompts, model=tiny_model, return_probabilities=True, progress=False,
                      max_prompts_per_pass=2)
    for p in prompts:
        assert np.allclose(one_pass.probabilities[p], chunked.probabilities[p], atol=1e-5)


def test_prompt_result_independent_of_other_prompts(ct_path, tiny_model):
    alone = segment(ct_path, ["liver"], model=tiny_model, return_probabilities=True, progress=False)
    with_others = segment(ct_path, ["spleen", "liver"], model=tiny_model, return_probabilities=True, progress=False)
    assert np.allclose(alone.probabilities["liver"], with_others.probabilities["liver"], atol=1e-5)


def test_kidney_is_union_of_left_and_right(tmp_path, ct_path):
    """A grouping concept the model was not trained on = union of its trained parts."""
    import torch

    from unisegtext.models import UniSegText, config_from_preset

    torch.manual_seed(0)
    model = UniSegText(config_from_preset("tiny", concepts=["kidney_left", "kidney_right", "liver"])).eval()
    result = segment(ct_path, ["kidney", "left kidney", "right kidney"], model=model, threshold=0.5,
                     return_probabilities=True, progress=False)
    res = result.resolutions["kidney"]
    assert sorted(res.union_of) == ["kidney_left", "kidney_right"]
    assert res.concept_id == "kidney"
    expected = np.maximum(result.probabilities["left kidney"], result.probabilities["right kidney"])
    assert np.allclose(result.probabilities["kidney"], expected, atol=1e-6)
    assert np.array_equal(result.masks["kidney"], result.masks["left kidney"] | result.masks["right kidney"])
    assert any("union" in w for w in res.warnings)


def test_untrained_concept_refused_unless_open_vocabulary(ct_path):
    import torch

    from unisegtext.models import UniSegText, config_from_preset

    torch.manual_seed(0)
    model = UniSegText(config_from_preset("tiny", concepts=["liver"])).eval()
    with pytest.raises(UnknownConceptError, match="not trained"):
        segment(ct_path, ["spleen"], model=model, progress=False)
    result = segment(ct_path, ["spleen"], model=model, progress=False, open_vocabulary=True)
    assert result.resolutions["spleen"].how == "open_vocabulary"
    assert result.resolutions["spleen"].warnings


def test_unknown_prompt_gets_suggestions(ct_path, tiny_model):
    with pytest.raises(UnknownConceptError) as info:
        segment(ct_path, ["xylophone quantum"], model=tiny_model, progress=False)
    assert "open_vocabulary" in str(info.value)
    result = segment(ct_path, ["xylophone quantum"], model=tiny_model, progress=False, open_vocabulary=True)
    assert result.resolutions["xylophone quantum"].how == "open_vocabulary"
    with pytest.raises(UnknownConceptError) as typo:
        segment(ct_path, ["livver tumour of the brainstem"], model=tiny_model, progress=False)
    assert isinstance(typo.value.suggestions, list)


def test_bad_prompt_lists(ct_path, tiny_model):
    with pytest.raises(PromptError, match="empty"):
        segment(ct_path, [], model=tiny_model)
    with pytest.raises(PromptError, match="non-empty"):
        segment(ct_path, ["liver", "  "], model=tiny_model)
    with pytest.raises(PromptError, match="duplicate"):
        segment(ct_path, ["liver", "liver"], model=tiny_model)


def test_bad_volumes_raise_before_any_work(tiny_model, tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        segment(tmp_path / "missing.nii.gz", ["liver"], model=tiny_model)
    with pytest.raises(VolumeError, match="NaN"):
        segment(np.full((16, 16, 16), np.nan), ["liver"], model=tiny_model, affine=np.eye(4))
    with pytest.raises(VolumeError, match="2 dimensions"):
        segment(np.zeros((16, 16)), ["liver"], model=tiny_model, affine=np.eye(4))
    with pytest.raises(VolumeError, match="4 dimensions"):
        segment(np.zeros((16, 16, 16, 2)), ["liver"], model=tiny_model, affine=np.eye(4))


def test_save_per_prompt_and_multilabel(ct_path, tiny_model, tmp_path):
    result = segment(ct_path, ["liver", "spleen"], model=tiny_model, threshold=0.3, progress=False)
    files = result.save(tmp_path / "single")
    names = sorted(f.name for f in files)
    assert names == ["liver.nii.gz", "manifest.json", "prompts.json", "spleen.nii.gz"]
    assert files[-1].name == "manifest.json"  # written last
    ref = nib.load(str(ct_path))
    liver = nib.load(str(tmp_path / "single" / "liver.nii.gz"))
    assert liver.shape == ref.shape and np.allclose(liver.affine, ref.affine)
    assert np.array_equal(np.asarray(liver.dataobj).astype(bool), result.masks["liver"])
    result.save(tmp_path / "ml", multilabel=True)
    seg = nib.load(str(tmp_path / "ml" / "segmentation.nii.gz"))
    import json

    labels = json.loads((tmp_path / "ml" / "labels.json").read_text())
    assert labels["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert set(labels["prompts"]) == {"liver", "spleen"} and labels["prompts"]["spleen"]["label"] == 2
    assert all(isinstance(v["present"], bool) and 0 <= v["presence_probability"] <= 1 for v in labels["prompts"].values())
    data = np.asarray(seg.dataobj)
    assert set(np.unique(data)) <= {0, 1, 2}
    only_liver = result.masks["liver"] & ~result.masks["spleen"]
    assert np.all(data[only_liver] == 1)
    assert not list(tmp_path.glob(".unisegtext-partial-*"))


def test_save_failure_leaves_nothing(ct_path, tiny_model, tmp_path, monkeypatch):
    result = segment(ct_path, ["liver", "spleen"], model=tiny_model, progress=False)
    import unisegtext.inference.result as result_module

    calls = {"n": 0}
    original = result_module.save_nifti_atomic

    def failing(img, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return original(img, path)

    monkeypatch.setattr(result_module, "save_nifti_atomic", failing)
    with pytest.raises(OSError):
        result.save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert not list(tmp_path.glob(".unisegtext-partial-*"))
