"""Issue 18, routing: prompts answered by several models behind one segment() call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_backend_totalseg import class_map, write_release

from unisegtext import segment
from unisegtext.errors import UnknownConceptError
from unisegtext.inference.routing import is_routed, routing_table


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def total_fast_zip(tmp_path_factory):
    """`total_fast` (task 297, one 3 mm network over all 117 classes) with random weights, zipped as released."""
    root = tmp_path_factory.mktemp("release")
    names = [class_map("total")[i] for i in sorted(class_map("total"))]
    target, _ = write_release(root, "Dataset297_TotalSegmentator_total_3mm_1559subj", names, spacing=[3.0, 3.0, 3.0],
                              trainer="nnUNetTrainer_4000epochs_NoMirroring")
    return target


def test_routing_table_is_data_and_names_registered_backends():
    from unisegtext.backends import backend_names

    table = routing_table()
    assert set(table) == {"CT", "MR"}
    for order in table.values():
        assert order[-1] == "unisegtext" and all(n in backend_names() or n == "unisegtext" for n in order)
    assert is_routed("auto") and is_routed("totalsegmentator:total") and is_routed(["totalsegmentator:total"])
    assert not is_routed(None) and not is_routed("unisegtext-nano") and not is_routed("some/hub-repo")


def test_prompts_go_to_the_first_model_that_knows_them(ct_path, tiny_model_dir, total_fast_zip):
    options = {"totalsegmentator:total_fast": {"weights": str(total_fast_zip), "device": "cpu"}}
    result = segment(ct_path, ["liver", "R kidney", "kidney", "left atrium"],
                     model=["totalsegmentator:total_fast", str(tiny_model_dir)], backend_options=options,
                     modality="CT", progress=False)
    answered = result.model["answered_by"]
    assert answered["liver"] == answered["R kidney"] == answered["kidney"] == "totalsegmentator:total_fast"
    assert answered["left atrium"].startswith("unisegtext")  # TotalSegmentator's total has no left atrium
    assert result.resolutions["kidney"].union_of == ["kidney_left", "kidney_right"]
    assert result.resolutions["R kidney"].concept_id == "kidney_right"
    # the union is exactly the backend's two kidney masks, on the input grid
    from unisegtext.backends import get_backend
    from unisegtext.io import read_volume

    backend = get_backend("totalsegmentator:total_fast", **options["totalsegmentator:total_fast"])
    maps = backend.predict(read_volume(ct_path, modality="CT"), ["kidney_left", "kidney_right"])
    assert result.masks["kidney"].shape == read_volume(ct_path).shape
    assert np.array_equal(result.masks["kidney"], (maps["kidney_left"] > 0.5) | (maps["kidney_right"] > 0.5))
    assert np.array_equal(result.masks["R kidney"], maps["kidney_right"] > 0.5)
    assert result.model["backends"]["totalsegmentator:total_fast"]["licence"] == "Apache-2.0"


def test_a_prompt_the_chosen_model_cannot_answer_names_what_it_can(ct_path, total_fast_zip):
    options = {"totalsegmentator:total_fast": {"weights": str(total_fast_zip)}}
    with pytest.raises(UnknownConceptError, match="none of the chosen models") as info:
        segment(ct_path, ["left atrium"], model="totalsegmentator:total_fast", backend_options=options,
                modality="CT", progress=False)
    assert "heart" in info.value.suggestions or info.value.suggestions


def test_auto_falls_back_when_weights_are_not_installed(ct_path, tiny_model_dir, tmp_path, monkeypatch):
    """Offline with an empty cache, model='auto' answers with the next model and says why."""
    import unisegtext.inference.routing as routing

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(routing, "routing_table", lambda: {"CT": ["totalsegmentator:total_fast", str(tiny_model_dir)]})
    options = {"totalsegmentator:total_fast": {"cache_dir": str(tmp_path / "empty-cache")}}
    result = segment(ct_path, ["liver"], model="auto", backend_options=options, modality="CT", progress=False)
    assert result.model["answered_by"]["liver"].startswith("unisegtext")
    assert any("not installed" in w for w in result.resolutions["liver"].warnings)


def test_cli_runs_a_backend_model_with_its_weights(ct_path, total_fast_zip, tmp_path):
    from unisegtext.cli import main

    out = tmp_path / "out"
    code = main(["segment", "-i", str(ct_path), "-o", str(out), "-p", "liver", "-p", "spleen", "--model",
                 "totalsegmentator:total_fast", "--weights", str(total_fast_zip), "--modality", "CT", "--quiet"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"liver.nii.gz", "spleen.nii.gz", "prompts.json", "manifest.json"}
