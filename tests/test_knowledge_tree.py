"""Tests of the knowledge tree sources (knowledge_tree/): validator, build, staleness, import."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from knowledge_tree import sources
from knowledge_tree.build import compile_tree, dumps
from knowledge_tree.loader import load_sources
from knowledge_tree.validate import validate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source_tree():
    return load_sources()


def test_validator_passes_on_shipped_tree(source_tree):
    assert validate(source_tree) == []


def test_compiled_file_is_not_stale(source_tree):
    shipped = sources.OUTPUT.read_text(encoding="utf-8")
    assert dumps(compile_tree(source_tree)) == shipped, "run `python -m knowledge_tree.build`"
    assert len(shipped.encode()) < 5_000_000
    assert json.loads(shipped)["metadata"]["attribution"].startswith("Anatomy classes")


def test_build_is_deterministic(source_tree):
    assert dumps(compile_tree(source_tree)) == dumps(compile_tree(source_tree))


def _mutated(source_tree, cid, **changes):
    tree = copy.deepcopy(source_tree)
    tree.entries[cid].update(changes)
    return tree


@pytest.mark.parametrize(
    "cid, changes, message",
    [
        ("kidney_left", {"is_a": ["no_such_concept"]}, "unknown concept"),
        ("kidney", {"union_of": ["kidney_left", "kidney_nowhere"]}, "unknown concept"),
        ("kidney_left", {"definition": ""}, "definition"),
        ("kidney_left", {"uberon": "UBERON:9999999"}, "not in"),
        ("kidney_left", {"synonyms": ["hepar"]}, "synonym collision"),
        ("kidney_left", {"laterality": "right"}, "laterality"),
        ("kidney", {"is_a": ["kidney_left"]}, "cycle"),
    ],
)
def test_validator_catches_errors(source_tree, cid, changes, message):
    errors = validate(_mutated(source_tree, cid, **changes), check_codes=False)
    assert any(message in e for e in errors), errors[:5]


def test_validator_catches_unsourced_code(source_tree):
    tree = _mutated(source_tree, "liver_segment_1", dicom={"type": "123456789"})
    with pytest.raises(KeyError):
        validate(tree)


def test_validator_catches_duplicate_ids(source_tree):
    tree = copy.deepcopy(source_tree)
    tree.duplicates["liver"] = ["concepts/abdomen.yaml", "concepts/other.yaml"]
    assert any("more than once" in e for e in validate(tree, check_codes=False))


def test_uberon_import_is_reproducible(tmp_path):
    from knowledge_tree.import_uberon import run_import

    run_import(tmp_path)
    for path in sorted(sources.IMPORTED_DIR.glob("*.yaml")):
        assert (tmp_path / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), path.name
