"""Dataset descriptors: schema validation, the compiled registry, and the shipped descriptors."""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from unisegtext.data.registry import (
    Descriptor,
    get_descriptor,
    load_descriptor,
    load_registry,
    registry_path,
)
from unisegtext.errors import DataError

REPO = Path(__file__).resolve().parents[1]
REGISTRY_DIR = REPO / "data_registry"
DESCRIPTOR_FILES = sorted(p for p in REGISTRY_DIR.glob("*.yaml") if not p.name.startswith("_"))
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _build_module():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("data_registry.build")


def _valid() -> dict:
    return {
        "id": "toy_liver",
        "name": "Toy",
        "licence": "CC BY 4.0",
        "citation": "someone 2020",
        "modality": ["CT"],
        "body_region": "abdomen",
        "num_cases": 3,
        "layout": {"family": "nnunet"},
        "labels": {0: "background", 1: "liver", 2: "cancer"},
        "targets": {"liver": [1, 2], "liver_tumor": [2]},
    }


# --- every descriptor in data_registry/ ---------------------------------------------------------


@pytest.mark.parametrize("path", DESCRIPTOR_FILES, ids=lambda p: p.stem)
def test_descriptor_validates(path):
    descriptor = load_descriptor(path)
    assert descriptor.id == path.stem
    assert descriptor.targets, "a descriptor must map at least one concept"
    # every target resolves to label values that the label map defines
    values = set(descriptor.label_values().values())
    for concept, target_values in descriptor.target_values().items():
        assert set(target_values) <= values, concept


@pytest.mark.parametrize("path", DESCRIPTOR_FILES, ids=lambda p: p.stem)
def test_every_target_is_a_known_concept(path):
    from unisegtext.data.registry import load_knowledge_tree

    tree = load_knowledge_tree()  # load_tree(), or the compiled ontology.json's ids meanwhile
    if tree is None:
        pytest.skip("no knowledge tree (unisegtext.knowledge) available yet")
    descriptor = load_descriptor(path)
    unknown = [c for c in [*descriptor.targets, *descriptor.outside_field_of_view] if c not in tree]
    assert not unknown, f"{path.name}: concepts unknown to the knowledge tree: {unknown}"


def test_compiled_registry_is_up_to_date():
    build = _build_module()
    descriptors, errors = build.load_all()
    assert not errors, "\n".join(errors)
    expected = build.render(descriptors)
    assert registry_path().read_text(encoding="utf-8") == expected, (
        "unisegtext/data/registry.json is stale; run `python -m data_registry.build`"
    )


def test_build_output_is_deterministic():
    build = _build_module()
    descriptors, _ = build.load_all()
    assert build.render(descriptors) == build.render(dict(reversed(list(descriptors.items()))))


def test_load_registry_round_trips_descriptors():
    registry = load_registry()
    assert set(registry) == {p.stem for p in DESCRIPTOR_FILES}
    for path in DESCRIPTOR_FILES:
        assert registry[path.stem].to_dict() == load_descriptor(path).to_dict()


def test_get_descriptor_unknown_id_suggests():
    with pytest.raises(DataError, match="la_mri_2018"):
        get_descriptor("la_mri_2019")


# --- validation errors ---------------------------------------------------------------------------


def test_minimal_descriptor_is_valid_and_resolves_targets():
    d = Descriptor.from_dict(_valid())
    assert d.target_values() == {"liver": [1, 2], "liver_tumor": [2]}
    assert d.annotated == ["liver", "liver_tumor"]
    assert d.layout["images"] == "imagesTr/{case}_{channel:04d}.nii.gz"  # default filled in


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["layout"].update(family="nnunnet"), "unknown layout family 'nnunnet'.*Did you mean: nnunet"),
        (lambda d: d["targets"].update(liver_tumor=[7]), "targets.liver_tumor: value 7 is not in labels"),
        (lambda d: d.pop("modality"), "missing required field 'modality'"),
        (lambda d: d.update(id="Toy-Liver"), "not snake_case"),
        (lambda d: d.update(licence_="x"), "unknown field 'licence_'"),
        (lambda d: d.update(version=2018), "version must be a string"),
        (lambda d: d.update(modality=["MRT"]), "modality 'MRT' unknown"),
        (lambda d: d["targets"].update(liver=[0, 1]), "lists 0, the background"),
        (lambda d: d["layout"].update(imgs="x"), "layout key 'imgs' is not known"),
        (lambda d: d.update(split={"validation": ["a"], "test": ["a"]}), "listed in split.validation and split.test"),
        (lambda d: d.update(split={"val": ["a"]}), "split name 'val' unknown"),
        (lambda d: d.update(licence=""), 'licence is "" .*say so in notes'),
        (lambda d: d["layout"].update(family="case_folders"), "needs the key 'image'"),
        (lambda d: d["labels"].update(liver_mask="liver"), "not an integer"),
    ],
)
def test_invalid_descriptor_is_rejected_with_a_clear_message(change, message):
    data = copy.deepcopy(_valid())
    change(data)
    with pytest.raises(DataError, match=message):
        Descriptor.from_dict(data)


def test_id_must_equal_file_stem(tmp_path):
    import yaml

    path = tmp_path / "other_name.yaml"
    path.write_text(yaml.safe_dump(_valid()))
    with pytest.raises(DataError, match="differs from the file name 'other_name'"):
        load_descriptor(path)


def test_all_errors_are_reported_at_once():
    data = _valid()
    data.pop("labels")
    data["layout"] = {"family": "dicom"}
    with pytest.raises(DataError) as info:
        Descriptor.from_dict(data)
    text = str(info.value)
    assert "missing required field 'labels'" in text and "unknown layout family 'dicom'" in text


def test_per_structure_labels_keyed_by_stem_get_values_in_order():
    data = _valid()
    data["layout"] = {"family": "per_structure_files"}
    data["labels"] = {"BrainStem": "brainstem", "Parotid_L": "left parotid"}
    data["targets"] = {"brainstem": ["BrainStem"], "parotid_gland_left": ["left parotid"]}
    d = Descriptor.from_dict(data)
    assert d.structure_files() == {"BrainStem": 1, "Parotid_L": 2}
    assert d.target_values() == {"brainstem": [1], "parotid_gland_left": [2]}


# --- the shipped descriptors of this task --------------------------------------------------------


def test_la_mri_split_is_the_documented_reproducible_choice():
    d = load_descriptor(REGISTRY_DIR / "la_mri_2018.yaml")
    ids = sorted((SHARED_DATA / "la_mri" / "cases.list").read_text().split())
    assert len(ids) == 80 and d.num_cases == 80
    validation = d.split["validation"]
    assert len(validation) == 16 and set(validation) <= set(ids)
    assert sorted(validation) == sorted(np.random.default_rng(0).permutation(ids)[:16].tolist())
    assert d.target_values() == {"heart_left_atrium": [1]}
    assert d.modality == ["MR"] and d.mr_sequences == ["LGE"]


@pytest.mark.parametrize("dataset, task", [("totalsegmentator_v2_ct", "total"), ("totalsegmentator_v2_mr", "total_mr")])
def test_totalsegmentator_descriptors_match_classes_json(dataset, task):
    classes = json.loads((SHARED_DATA / "totalseg_examples" / "classes.json").read_text())[task]
    d = load_descriptor(REGISTRY_DIR / f"{dataset}.yaml")
    assert {str(k): v for k, v in d.labels.items()} == classes
    # one concept per class, each mapping to exactly its own value
    assert sorted(v for values in d.target_values().values() for v in values) == sorted(int(k) for k in classes)
    assert d.structure_files() == {name: int(k) for k, name in classes.items()}
