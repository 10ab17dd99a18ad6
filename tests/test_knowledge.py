"""Tests of the torch-free knowledge API (unisegtext.knowledge) on the shipped ontology."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from unisegtext.errors import UnknownConceptError
from unisegtext.knowledge import Concept, KnowledgeTree, load_tree, normalize, resolve

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tree() -> KnowledgeTree:
    return load_tree()


def test_import_is_torch_free():
    code = "import sys, unisegtext.knowledge as k; k.load_tree().resolve('rt kidney'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_tree_is_cached_and_sized(tree):
    assert load_tree() is tree
    assert len(tree) >= 2000
    mean = sum(len(c.synonyms) for c in tree) / len(tree)
    assert mean >= 3.0
    assert tree.version.startswith(tree.metadata["version"].split("+")[0])
    assert "UBERON" in tree.metadata["attribution"] and "CC BY 3.0" in tree.metadata["attribution"]


def test_concept_record(tree):
    kidney_left = tree.get("kidney_left")
    assert isinstance(kidney_left, Concept)
    assert kidney_left.laterality == "left"
    assert kidney_left.uberon == "UBERON:0004538"
    assert kidney_left.totalseg == ("kidney_left",)
    dicom = kidney_left.codes["dicom"]
    assert dicom["type"]["value"] == "64033007" and dicom["modifier"]["value"] == "7771000"
    assert dicom["source"].startswith("snomed_mapping.csv")
    with pytest.raises(AttributeError):
        kidney_left.name = "x"  # frozen
    assert len(kidney_left.color) == 3 and kidney_left.single_component is True


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hepar", "liver"),
        ("R kidney", "kidney_right"),
        ("rt. kidney", "kidney_right"),
        ("kidney, left", "kidney_left"),
        ("left-sided kidney", "kidney_left"),
        ("Kidneys", "kidney"),
        ("RUL", "lung_upper_lobe_right"),
        ("L1", "vertebra_l1"),
        ("L-1 vertebral body", "vertebra_l1"),
        ("IVC", "inferior_vena_cava"),
        ("Oesophagus", "esophagus"),
        ("hepatic segment VII", "liver_segment_7"),
        ("peritumoural oedema", "brain_tumor_edema"),
        ("upper lobe of the left lung", "lung_upper_lobe_left"),
        ("vertebrae_L1", "vertebra_l1"),  # a TotalSegmentator class name
    ],
)
def test_resolve_typical_prompts(tree, text, expected):
    res = tree.resolve(text)
    assert res.concept_id == expected, (text, res)
    assert res.concept is tree.get(expected)
    assert res.how in ("exact", "synonym", "normalised")
    assert res.confidence >= 0.9


def test_resolve_order_and_methods(tree):
    assert tree.resolve("kidney_left").how == "exact"
    assert tree.resolve("Left Kidney").how == "exact"  # preferred name, any case
    assert tree.resolve("hepar").how == "synonym"
    assert tree.resolve("rt kidney").how == "normalised"
    fuzzy = tree.resolve("livr")
    assert fuzzy.how == "fuzzy" and fuzzy.concept_id == "liver" and fuzzy.confidence < 0.9


def test_unknown_text_gives_suggestions(tree):
    res = tree.resolve("xqzzt blorp")
    assert res.concept is None and res.how == "none" and res.concept_id is None
    assert tree.resolve("enlarged spleen", min_confidence=0.95).concept is None
    with pytest.raises(UnknownConceptError) as info:
        tree.get("kidnee_left")
    assert "kidney_left" in info.value.suggestions
    assert "kidnee_left" in str(info.value)
    assert tree.suggest("kidny")[0] == "kidney"


def test_laterality_is_never_swapped_by_fuzzy(tree):
    res = tree.resolve("kidny left")
    assert res.concept_id == "kidney_left"


def test_module_shortcuts():
    from unisegtext import knowledge

    assert resolve("the liver").concept_id == "liver"
    assert "kidney_left" in knowledge.descendants("kidney")
    assert knowledge.suggest("spleeen")[0] == "spleen"
    assert knowledge.search("pancreas", k=3)[0][0].id == "pancreas"


def test_hierarchy(tree):
    assert set(tree.children("kidney")) >= {"kidney_left", "kidney_right"}
    lung = tree.descendants("lung")
    assert {"lung_left", "lung_upper_lobe_left", "lung_middle_lobe_right"} <= set(lung)
    assert "lung" in tree.ancestors("lung_upper_lobe_left")
    assert "vertebrae_lumbar" in tree.ancestors("vertebra_l1")
    assert "brain_tumor_enhancing" in tree.descendants("brain_tumor_whole")


def test_expand_union(tree):
    assert tree.expand_union("kidney", {"kidney_left", "kidney_right", "liver"}) == ["kidney_left", "kidney_right"]
    assert tree.expand_union("kidney", {"kidney"}) == ["kidney"]
    lobes = {"lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}
    assert set(tree.expand_union("lung", lobes)) == lobes
    assert set(tree.expand_union("lung_right", lobes)) == {"lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"}
    assert tree.expand_union("brain_tumor_whole", {"brain_tumor_enhancing", "brain_tumor_necrotic_core", "brain_tumor_edema"}) == [
        "brain_tumor_enhancing", "brain_tumor_necrotic_core", "brain_tumor_edema"]
    assert set(tree.expand_union("liver", {f"liver_segment_{i}" for i in range(1, 9)})) == {f"liver_segment_{i}" for i in range(1, 9)}
    assert tree.expand_union("kidney", {"liver"}) == []
    with pytest.raises(UnknownConceptError):
        tree.expand_union("kidneyz", {"kidney"})


def test_every_totalseg_class_maps_to_a_concept(tree, shared_data):
    classes = json.loads((shared_data / "totalseg_examples" / "classes.json").read_text())
    owner = {name: c.id for c in tree for name in c.totalseg}
    for task in ("total", "total_mr"):
        for name in classes[task].values():
            assert name in owner, f"{task}/{name} maps to no concept"
            assert tree.resolve(name).concept_id == owner[name]


def test_required_concepts_exist(tree):
    required = [f"rib_{s}_{n}" for s in ("left", "right") for n in range(1, 13)]
    required += [f"vertebra_{r}{n}" for r, k in (("c", 7), ("t", 12), ("l", 5)) for n in range(1, k + 1)]
    required += [f"liver_segment_{n}" for n in range(1, 9)]
    required += ["kidney_tumor", "kidney_cyst", "pancreas_tumor", "colon_tumor", "lung_nodule", "stroke_lesion",
                 "pleural_effusion", "brain_tumor_enhancing", "brain_tumor_necrotic_core", "brain_tumor_edema",
                 "brain_tumor_core", "brain_tumor_whole", "prostate_peripheral_zone", "prostate_transition_zone",
                 "heart_left_atrium", "myocardium_left_ventricle", "aortic_valve", "mitral_valve", "parotid_gland_left",
                 "optic_chiasm", "brainstem", "abdominal_organs", "ribs", "vertebrae_cervical"]
    missing = [cid for cid in required if cid not in tree]
    assert not missing
    assert tree.get("lung").union_of == ("lung_left", "lung_right")
    assert set(tree.expand_union("lung", {c.id for c in tree if c.id.startswith("lung_") and "lobe" in c.id and c.id != "lung_lobes"})) >= {"lung_upper_lobe_left"}


def test_every_dicom_code_is_sourced(tree, shared_data):
    import csv

    lines = [ln for ln in (shared_data / "anatomy" / "dicom_snomed_anatomy.tsv").read_text().splitlines() if not ln.startswith("#")]
    allowed = {row["sctid"] for row in csv.DictReader(lines, delimiter="\t")}
    with (shared_data / "totalseg_examples" / "snomed_mapping.csv").open() as fh:
        for row in csv.DictReader(fh):
            allowed.update(v for k, v in row.items() if k.endswith(".CodeValue") and v)
    uberon_ids = {json.loads(line)["uberon"] for line in (shared_data / "anatomy" / "uberon_anatomy.jsonl").open()}
    for concept in tree:
        dicom = concept.dicom or {}
        for key in ("category", "type", "modifier", "region", "region_modifier"):
            if dicom.get(key):
                assert dicom[key]["value"] in allowed, (concept.id, key, dicom[key])
        if dicom:
            assert dicom["source"].split(" ")[0] in ("snomed_mapping.csv", "dicom_snomed_anatomy.tsv")
        if concept.uberon:
            assert concept.uberon in uberon_ids


def test_normalize_forms():
    assert normalize("R kidney") == normalize("kidney, left").replace("left", "right") == "kidney|right"
    assert normalize("Haemorrhage") == "hemorrhage"
    assert normalize("Segment VII") == "segment 7"
    assert normalize("L-1") == "l1"
    assert normalize("ovaries") == "ovary"


def test_cli_stats_and_resolve():
    out = subprocess.run([sys.executable, "-m", "unisegtext.cli.knowledge", "stats"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "concepts:" in out.stdout and "mean synonyms:" in out.stdout and "with uberon:" in out.stdout
    out = subprocess.run([sys.executable, "-m", "unisegtext.cli.knowledge", "resolve", "rt kidney"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and "kidney_right" in out.stdout
