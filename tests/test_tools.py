"""The LLM tool adapter: schemas, argument validation, path confinement, answers and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unisegtext.io import Volume, read_volume
from unisegtext.tools import TOOLS, schema, validate_arguments
from unisegtext.tools.handler import ToolHandler, ToolLimits, handle


@pytest.fixture(scope="module")
def data_root(ct_path, tmp_path_factory) -> Path:
    """An allowed root with a small CT crop (fast with the tiny model)."""
    import nibabel as nib

    root = tmp_path_factory.mktemp("allowed")
    vol = read_volume(ct_path)
    crop = Volume(vol.array[30:94, 20:84, 40:64], vol.affine, modality="CT")
    nib.save(crop.to_nifti(), str(root / "ct_crop.nii.gz"))
    return root


@pytest.fixture()
def handler(data_root, tiny_model_dir, tmp_path):
    h = ToolHandler(data_root, tmp_path / "out", model=str(tiny_model_dir))
    yield h
    h.close()


# ----------------------------------------------------------------------------- schema
def test_schema_views_share_one_description():
    openai = schema("openai")
    anthropic = schema("anthropic")
    assert [t["function"]["name"] for t in openai] == [t["name"] for t in anthropic] == list(TOOLS)
    assert {"segment", "resolve_prompt", "list_concepts", "describe_model"} == set(TOOLS)
    for o, a in zip(openai, anthropic):
        assert o["type"] == "function"
        assert o["function"]["parameters"] == a["input_schema"]
        assert o["function"]["description"] == a["description"]
        assert a["input_schema"]["type"] == "object" and a["input_schema"]["additionalProperties"] is False
    segment_tool = schema("anthropic", tool="segment")
    assert segment_tool["input_schema"]["required"] == ["scan", "prompts"]
    json.dumps(openai), json.dumps(anthropic)
    with pytest.raises(ValueError, match="unknown schema format"):
        schema("gemini")  # type: ignore[arg-type]


def test_schema_copies_are_independent():
    schema("openai")[0]["function"]["parameters"]["properties"].clear()
    assert schema("openai")[0]["function"]["parameters"]["properties"]


def test_importing_the_schema_does_not_import_torch():
    code = ("import sys, unisegtext.tools as t; t.schema('openai'); t.schema('anthropic'); "
            "from unisegtext.tools import ToolHandler; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_validate_arguments():
    assert validate_arguments("segment", {"scan": "a.nii.gz", "prompts": ["liver"]}) == []
    problems = validate_arguments("segment", {"scan": 3, "prompts": [], "colour": "red", "threshold": 2})
    text = " ".join(problems)
    assert "scan must be a string" in text
    assert "at least 1" in text
    assert "unknown field(s) ['colour']" in text
    assert "threshold must be <= 1.0" in text
    assert "missing the required field 'prompts'" in " ".join(validate_arguments("segment", {"scan": "x"}))
    assert validate_arguments("segment", {"scan": "x", "prompts": ["  "]})  # blank prompt
    assert validate_arguments("list_concepts", {"limit": True})  # a bool is not an integer


# ----------------------------------------------------------------------------- safety
def _is_error(answer: dict) -> bool:
    return set(answer) >= {"error", "suggestions"} and "Traceback" not in json.dumps(answer)


def test_paths_outside_the_root_are_refused(handler, data_root, tmp_path):
    outside = tmp_path / "secret.nii.gz"
    outside.write_bytes(b"not a scan")
    (data_root / "link_out.nii.gz").unlink(missing_ok=True)
    (data_root / "link_out.nii.gz").symlink_to(outside)
    (data_root / "dir_link").unlink(missing_ok=True)
    (data_root / "dir_link").symlink_to(tmp_path, target_is_directory=True)
    for scan in ("../../etc/passwd", "/etc/passwd", str(outside), "link_out.nii.gz", "dir_link/secret.nii.gz",
                 "sub/../../" + outside.name):
        answer = handler.handle("segment", {"scan": scan, "prompts": ["liver"]})
        assert _is_error(answer), scan
        assert "outside the data folder" in answer["error"], (scan, answer)
        assert str(outside) not in answer["error"] or scan == str(outside)


def test_dicom_folder_with_a_link_out_is_refused(handler, data_root, tmp_path):
    folder = data_root / "series_with_link"
    folder.mkdir(exist_ok=True)
    (folder / "0001.dcm").write_bytes(b"x")
    link = folder / "0002.dcm"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/passwd")
    answer = handler.handle("segment", {"scan": "series_with_link", "prompts": ["liver"]})
    assert _is_error(answer) and "links outside" in answer["error"]


def test_limits_are_enforced(data_root, tiny_model_dir, tmp_path):
    h = ToolHandler(data_root, tmp_path / "out", model=str(tiny_model_dir),
                    limits=ToolLimits(max_prompts=2, max_file_mb=0.01))
    try:
        answer = h.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver", "spleen", "aorta"]})
        assert _is_error(answer) and "limit of 2" in answer["error"]
        answer = h.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"]})
        assert _is_error(answer) and "larger than the limit" in answer["error"]
        answer = h.handle("segment", {"scan": "missing.nii.gz", "prompts": ["liver"]})
        assert _is_error(answer) and "does not exist" in answer["error"]
    finally:
        h.close()


def test_zip_bomb_is_refused_by_its_unpacked_size(data_root, tiny_model_dir, tmp_path):
    import zipfile

    archive = data_root / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("0001.dcm", b"\0" * (3 * 2**20))
    assert archive.stat().st_size < 2**20
    h = ToolHandler(data_root, tmp_path / "out", model=str(tiny_model_dir), limits=ToolLimits(max_file_mb=1))
    try:
        answer = h.handle("segment", {"scan": "bomb.zip", "prompts": ["liver"]})
        assert _is_error(answer) and "unpacks to 3 MB" in answer["error"]
    finally:
        h.close()


def test_timeout_answers_with_an_error(data_root, tiny_model_dir, tmp_path, monkeypatch):
    import time

    h = ToolHandler(data_root, tmp_path / "out", model=str(tiny_model_dir), limits=ToolLimits(timeout_s=0.2))
    monkeypatch.setattr(h, "_run_segment", lambda *a: time.sleep(1.0) or {"late": True})
    try:
        answer = h.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"]})
        assert _is_error(answer) and "did not finish within 0.2 s" in answer["error"]
        busy = h.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"]})
        assert _is_error(busy) and "still running" in busy["error"]
        h._running.result()  # let the background job end
    finally:
        h.close()


def test_bad_calls_come_back_as_json_errors(handler):
    assert _is_error(handler.handle("segment", "{not json"))
    assert _is_error(handler.handle("segment", "[1, 2]"))
    unknown_tool = handler.handle("segmentation", {})
    assert _is_error(unknown_tool) and "segment" in unknown_tool["suggestions"]
    bad = handler.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"], "extra": 1})
    assert _is_error(bad) and "extra" in bad["error"]


def test_unknown_concept_comes_back_with_suggestions(handler):
    answer = handler.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["kidny tumour of the spleen xyz"]})
    assert _is_error(answer)
    assert answer["error_type"] == "UnknownConceptError"
    assert answer["suggestions"] and all(isinstance(s, str) for s in answer["suggestions"])


def test_internal_errors_never_leak_a_traceback(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(handler, "_run_segment", broken)
    answer = handler.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"]})
    assert _is_error(answer) and "disk on fire" in answer["error"]


# ----------------------------------------------------------------------------- answers
def test_segment_round_trip_from_a_json_string(handler, tmp_path):
    arguments = json.dumps({"scan": "ct_crop.nii.gz", "prompts": ["liver", "kidney_left"], "preview": True})
    answer = handler.handle("segment", arguments)
    assert "error" not in answer, answer
    json.dumps(answer)
    assert answer["scan"] == "ct_crop.nii.gz" and answer["shape"] == [64, 64, 24]
    assert [r["prompt"] for r in answer["results"]] == ["liver", "kidney_left"]
    for r in answer["results"]:
        assert r["concept_id"] == r["prompt"] and r["how"] == "exact"
        assert isinstance(r["found"], bool) and r["volume_ml"] >= 0
        if r["found"]:
            assert len(r["centroid_mm"]) == 3 and set(r["bbox_mm"]) == {"min", "max"}
            assert 0.0 < r["mean_confidence"] <= 1.0
        assert (tmp_path / "out" / r["file"]).is_file() and Path(r["file"]).parent == Path(answer["output_dir"])
    out = tmp_path / "out"
    assert not Path(answer["output_dir"]).is_absolute() and (out / answer["output_dir"]).is_dir()
    assert (out / answer["files"]["statistics"]).is_file() and (out / answer["files"]["preview"]).is_file()
    assert (out / answer["files"]["manifest"]).is_file()
    assert str(tmp_path) not in json.dumps(answer)  # no absolute server path in the answer
    assert answer["model"]["weights_sha256"]


def test_one_shot_handle_and_multilabel(data_root, tiny_model_dir, tmp_path):
    answer = handle({"scan": "ct_crop.nii.gz", "prompts": ["kidney"], "output_type": "nifti-multilabel"},
                    allowed_root=data_root, output_root=tmp_path / "o", model=str(tiny_model_dir))
    assert "error" not in answer, answer
    result = answer["results"][0]
    assert set(result.get("union_of", [])) <= {"kidney_left", "kidney_right"}
    assert result["file"].endswith("segmentation.nii.gz")
    missing_root = handle({"scan": "x", "prompts": ["liver"]}, allowed_root=tmp_path / "nope", output_root=tmp_path)
    assert _is_error(missing_root)


def test_dicom_seg_of_a_nifti_is_refused_as_json(handler):
    answer = handler.handle("segment", {"scan": "ct_crop.nii.gz", "prompts": ["liver"], "output_type": "dicom-seg"})
    assert _is_error(answer) and "DICOM input series" in answer["error"]


def test_dicom_series_to_dicom_seg_through_the_tool(handler, data_root):
    from dicom_helpers import write_series

    hd = pytest.importorskip("highdicom")
    crop = read_volume(data_root / "ct_crop.nii.gz")
    write_series(data_root / "dicom" / "series1", Volume(crop.array[:, :, :12], crop.affine, modality="CT"))
    answer = handler.handle("segment", {"scan": "dicom/series1", "prompts": ["liver", "kidney_right"],
                                        "output_type": "dicom-seg"})
    assert "error" not in answer, answer
    assert answer["shape"] == [64, 64, 12]
    seg_file = handler.output_root / answer["results"][0]["file"]
    assert seg_file.name == "segmentation.dcm" and answer["results"][1]["file"] == answer["results"][0]["file"]
    seg = hd.seg.segread(str(seg_file))
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["liver", "kidney_right"]


def test_find_inspect_segment_flow(handler):
    resolved = handler.handle("resolve_prompt", {"text": "rt. kidney"})
    assert resolved["concept"]["id"] == "kidney_right"
    assert resolved["concept"]["laterality"] == "right"
    assert resolved["segmentable"] is True and resolved["segment_as"]["concept_id"] == "kidney_right"
    weak = handler.handle("resolve_prompt", {"text": "qqqq zzzz"})
    assert weak["concept"] is None and weak["segmentable"] is False and weak["candidates"]

    found = handler.handle("list_concepts", {"query": "kidney", "limit": 5})
    ids = [c["id"] for c in found["concepts"]]
    assert "kidney" in ids and len(ids) <= 5
    by_system = handler.handle("list_concepts", {"system": "heart", "limit": 3})
    assert len(by_system["concepts"]) == 3 and all(c["system"] == "heart" for c in by_system["concepts"])
    bad_system = handler.handle("list_concepts", {"system": "hearts"})
    assert _is_error(bad_system) and "heart" in bad_system["suggestions"]

    model = handler.handle("describe_model", {})
    assert model["preset"] == "tiny" and len(model["weights_sha256"]) == 64
    assert model["limits"]["max_prompts"] == 32 and "warning" in model  # a random model says so


def test_model_from_environment(data_root, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("UNISEGTEXT_MODEL", str(tiny_model_dir))
    h = ToolHandler(data_root, tmp_path / "out")
    try:
        assert h.model == str(tiny_model_dir)
        assert h.handle("describe_model", {})["name"] == tiny_model_dir.name  # never the absolute path
    finally:
        h.close()
