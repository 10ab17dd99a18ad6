"""Shared fixtures: paths to ../shared data and a tiny random checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
TOTALSEG = SHARED_DATA / "totalseg_examples"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (the real example data that CI has beside the clone)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: CI runs with ../shared beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ct_path(shared_data) -> Path:
    return shared_data / "totalseg_examples" / "ct.nii.gz"


@pytest.fixture(scope="session")
def mr_path(shared_data) -> Path:
    return shared_data / "totalseg_examples" / "mr.nii.gz"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` model saved with save_pretrained."""
    import torch

    from unisegtext.models import UniSegText

    torch.manual_seed(0)
    model = UniSegText.from_preset("tiny")
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from unisegtext.models import UniSegText

    return UniSegText.from_pretrained(tiny_model_dir)
