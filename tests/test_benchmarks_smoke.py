"""Smoke test of benchmarks/inference_bench.py: --quick writes a JSON report and a PNG plot."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "inference_bench.py"


@pytest.fixture(scope="module")
def bench():
    return runpy.run_path(str(SCRIPT), run_name="inference_bench")


def test_size_parser_accepts_voxels_and_spacing(bench):
    spec = bench["SizeSpec"].parse("512x512x300@0.8x0.8x1.5")
    assert spec.shape == (512, 512, 300)
    assert spec.spacing_mm == (0.8, 0.8, 1.5)
    assert bench["SizeSpec"].parse("128x128x128").spacing_mm is None


def test_size_parser_rejects_malformed_sizes(bench):
    import argparse

    for bad in ("128x128", "0x10x10", "10x10x10@1x1"):
        with pytest.raises(argparse.ArgumentTypeError, match="XxYxZ|positive"):
            bench["SizeSpec"].parse(bad)


def test_concept_prompts_are_distinct_and_resolve_exactly(bench):
    from unisegtext.knowledge import load_tree

    prompts = bench["concept_prompts"](40)
    assert len(prompts) == len(set(prompts)) == 40
    tree = load_tree()
    for prompt in prompts[:10]:
        res = tree.resolve(prompt)
        assert res.how == "exact" and not res.concept.union_of


def test_quick_run_writes_json_and_png(bench, tmp_path, monkeypatch):
    out = tmp_path / "quick"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])
    report = bench["main"](["--quick", "--out", str(out)])
    json_path, png_path = Path(f"{out}.json"), Path(f"{out}.png")
    assert json_path.is_file() and png_path.is_file()
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(json_path.read_text())
    assert data["device"] == "cpu" and data["model"]["preset"] == "tiny"
    assert [r["size"] for r in data["size_sweep"]] == ["32x32x32", "48x48x40"]
    assert [r["prompts"] for r in data["prompt_sweep"]] == [1, 4]
    for row in data["size_sweep"] + data["prompt_sweep"]:
        assert row["median_s"] > 0 and row["windows"] >= 1
        assert row["flops_per_window"] > 0
        assert row["total_flops"] == pytest.approx(row["flops_per_window"] * row["windows"])
        assert row["voxels_per_s"] == pytest.approx(row["input_voxels"] / row["median_s"])
        assert row["peak_memory_mib"] > 0
        assert row["fraction_of_peak"] is None  # only on CUDA
    # tiny preset: 32^3 patch, 6 mm spacing; 48x48x40 needs 2x2x2 windows at overlap 0.25
    assert data["size_sweep"][0]["windows"] == 1
    assert data["size_sweep"][1]["windows"] == 8
    # more prompts decode more: FLOPs per window grow with the prompt count
    assert data["prompt_sweep"][1]["flops_per_window"] > data["prompt_sweep"][0]["flops_per_window"]
    assert report["skipped"] == []


def test_peak_tflops_default_is_documented(bench):
    parser = bench["build_parser"]()
    action = next(a for a in parser._actions if a.dest == "peak_tflops")
    assert action.default == pytest.approx(989.4)
    assert "H100" in action.help and "datasheet" in action.help
