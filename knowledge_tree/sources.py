"""Readers for the shared reference tables the knowledge tree is built from.

The tables live in ``<shared>/data/anatomy`` and ``<shared>/data/totalseg_examples``; the
shared folder is ``$UNISEGTEXT_SHARED`` or ``../shared`` next to the repository.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CONCEPTS_DIR = ROOT / "concepts"
IMPORTED_DIR = ROOT / "imported"
RULES_FILE = ROOT / "synonym_rules.yaml"
OUTPUT = REPO / "unisegtext" / "knowledge" / "ontology.json"

UBERON_FILE = "anatomy/uberon_anatomy.jsonl"
DICOM_FILE = "anatomy/dicom_snomed_anatomy.tsv"
TOTALSEG_MAPPING_FILE = "totalseg_examples/snomed_mapping.csv"
TOTALSEG_CLASSES_FILE = "totalseg_examples/classes.json"


def shared_data_dir() -> Path:
    """Folder holding the shared reference data (``anatomy/``, ``totalseg_examples/``)."""
    env = os.environ.get("UNISEGTEXT_SHARED")
    base = Path(env) if env else REPO.parent / "shared"
    data = base / "data"
    if not (data / UBERON_FILE).is_file():
        raise FileNotFoundError(
            f"shared reference data not found under {data}; set UNISEGTEXT_SHARED to the folder "
            "that holds data/anatomy/uberon_anatomy.jsonl"
        )
    return data


@lru_cache(maxsize=1)
def uberon() -> dict[str, dict]:
    """UBERON id -> record of ``uberon_anatomy.jsonl``."""
    path = shared_data_dir() / UBERON_FILE
    with path.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return {row["uberon"]: row for row in rows}


@dataclass(frozen=True)
class DicomCode:
    """One SNOMED CT code as DICOM uses it (``dicom_snomed_anatomy.tsv``)."""

    value: str
    meaning: str
    cids: str


@lru_cache(maxsize=1)
def dicom_codes() -> dict[str, DicomCode]:
    """SNOMED CT id -> :class:`DicomCode` for the 1,616 codes of the DICOM table."""
    path = shared_data_dir() / DICOM_FILE
    with path.open(encoding="utf-8") as fh:
        lines = [line for line in fh if not line.startswith("#")]
    out = {}
    for row in csv.DictReader(lines, delimiter="\t"):
        out[row["sctid"]] = DicomCode(row["sctid"], row["meaning"], row["selected_cids"])
    return out


@lru_cache(maxsize=1)
def totalseg_mapping() -> dict[str, dict]:
    """TotalSegmentator class -> {category, type, modifier, region, region_modifier, color}.

    Each code is a dict ``{"scheme", "value", "meaning"}`` or None; colour is [r, g, b].
    """
    path = shared_data_dir() / TOTALSEG_MAPPING_FILE
    out: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):

            def code(prefix: str, row: dict = row) -> dict | None:
                value = row[f"{prefix}.CodeValue"].strip()
                if not value:
                    return None
                return {
                    "scheme": row[f"{prefix}.CodingSchemeDesignator"].strip(),
                    "value": value,
                    "meaning": row[f"{prefix}.CodeMeaning"].strip(),
                }

            out[row["Structure"]] = {
                "category": code("SegmentedPropertyCategoryCodeSequence"),
                "type": code("SegmentedPropertyTypeCodeSequence"),
                "modifier": code("SegmentedPropertyTypeModifierCodeSequence"),
                "region": code("AnatomicRegionSequence"),
                "region_modifier": code("AnatomicRegionModifierSequence"),
                "color": [int(v) for v in row["DicomRGBColor"].split(",")],
            }
    return out


@lru_cache(maxsize=1)
def totalseg_classes() -> dict[str, list[str]]:
    """TotalSegmentator task -> class names (tasks ``total`` and ``total_mr``)."""
    path = shared_data_dir() / TOTALSEG_CLASSES_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    return {task: [labels[k] for k in sorted(labels, key=int)] for task, labels in data.items()}


def all_sourced_code_values() -> set[tuple[str, str]]:
    """(scheme, value) of every code found in the DICOM table or the TotalSegmentator mapping."""
    values = {("SCT", v) for v in dicom_codes()}
    for entry in totalseg_mapping().values():
        for key in ("category", "type", "modifier", "region", "region_modifier"):
            if entry[key]:
                values.add((entry[key]["scheme"], entry[key]["value"]))
    return values
