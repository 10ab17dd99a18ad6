"""The shipped default checkpoint: found with no model argument, offline, and it works."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import yaml

from unisegtext import segment
from unisegtext.models import DEFAULT_MODEL, builtin_checkpoints

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_default_checkpoint_is_packaged_and_small():
    folder = builtin_checkpoints()[DEFAULT_MODEL]
    assert (folder / "README.md").read_text().count("Dice") > 0  # the model card
    assert (folder / "model.safetensors").stat().st_size < 40 * 2**20


def test_left_atrium_on_a_held_out_scan_without_model_argument(shared_data):
    split = yaml.safe_load((REPO / "data_registry" / "la_mri_2018.yaml").read_text())["split"]["validation"]
    case = split[0]
    image = shared_data / "la_mri" / "imagesTr" / f"{case}_0000.nii.gz"
    result = segment(image, ["left atrium"], progress=False)
    assert result.resolutions["left atrium"].concept_id == "heart_left_atrium"
    reference = np.asarray(nib.load(str(shared_data / "la_mri" / "labelsTr" / f"{case}.nii.gz")).dataobj) > 0
    mask = result.masks["left atrium"]
    dice = 2 * np.count_nonzero(mask & reference) / (mask.sum() + reference.sum())
    assert dice > 0.8, dice


def test_mr_example_liver_spleen_without_model_argument(mr_path):
    result = segment(mr_path, ["liver", "spleen"], progress=False)
    assert result.masks["liver"].shape == (117, 91, 20)
    assert result.model["name"] == DEFAULT_MODEL
