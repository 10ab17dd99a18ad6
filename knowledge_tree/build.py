"""Compile the knowledge tree's YAML into ``unisegtext/knowledge/ontology.json``.

Run ``python -m knowledge_tree.build`` (writes the file) or ``python -m knowledge_tree.build
--check`` (exit 1 when the shipped file differs from a fresh build). The output is
deterministic: sorted keys, compact separators, no time stamps.

Per concept the build adds what is looked up rather than written by hand:

* ``codes.dicom``: the DICOM SEG coding. From TotalSegmentator's ``snomed_mapping.csv`` row when
  the concept carries one of its class names; else from the entry's ``dicom`` SNOMED CT ids,
  with meanings from ``dicom_snomed_anatomy.tsv``, category "Anatomical Structure" (or the
  entry's) and the Left/Right modifier from the concept's laterality. Never invented: a concept
  with neither has no DICOM code.
* ``codes.snomed_xref`` / ``codes.fma`` / ``codes.ncit``: UBERON's cross-references.
* synonyms that the UBERON import adds to curated concepts (``imported/_claimed.yaml``).
* a display colour (TotalSegmentator's where it has one, else derived from the id).
"""

from __future__ import annotations

import argparse
import colorsys
import hashlib
import json
import sys
from pathlib import Path

from knowledge_tree import sources
from knowledge_tree.loader import SourceTree, load_sources, read_yaml

SCHEMA_VERSION = 1
TREE_VERSION_FILE = sources.ROOT / "VERSION"
ATTRIBUTION = (
    "Anatomy classes, synonyms, hierarchy and cross-references from UBERON "
    "(Uberon multi-species anatomy ontology, uberon.github.io, release 2026-04-01), "
    "licensed CC BY 3.0 (https://creativecommons.org/licenses/by/3.0/). SNOMED CT codes as "
    "used by DICOM PS3.16, from pydicom 3.0.2's code tables (MIT) and TotalSegmentator 2.18.0's "
    "snomed_mapping.csv (Apache-2.0). Definitions are UniSegText's own wording."
)

ANATOMY_CATEGORY = "91723000"  # "Anatomical Structure", DICOM CID 7150 (dicom_snomed_anatomy.tsv)
MORPHOLOGY_CATEGORY = "49755003"  # "Morphologically Abnormal Structure", CID 7150
SIDE_CODES = {"left": "7771000", "right": "24028007"}  # DICOM table (CID 12117), as TotalSegmentator


def _code(value: str, meanings: dict[str, str]) -> dict[str, str]:
    return {"scheme": "SCT", "value": value, "meaning": meanings[value]}


def _meanings() -> dict[str, str]:
    meanings = {v: c.meaning for v, c in sources.dicom_codes().items()}
    # pydicom's meanings for a few codes are keyword-like ("Endo-renal" for 64033007 Kidney);
    # where TotalSegmentator's mapping uses the same code, take its plain meaning
    for row in sources.totalseg_mapping().values():
        for key in ("type", "region"):
            if row[key] and row[key]["value"] in meanings:
                meanings[row[key]["value"]] = row[key]["meaning"]
    return meanings


def dicom_coding(entry: dict, meanings: dict[str, str]) -> dict | None:
    """The DICOM SEG coding of one entry, or None when no code is sourced."""
    mapping = sources.totalseg_mapping()
    for name in entry.get("totalseg") or []:
        row = mapping.get(name)
        if row and row["type"]:
            out = {key: row[key] for key in ("category", "type", "modifier")}
            if row["region"]:
                out["region"] = row["region"]
                out["region_modifier"] = row["region_modifier"]
            out["source"] = f"snomed_mapping.csv (TotalSegmentator class {name})"
            return out
    spec = entry.get("dicom")
    if not spec:
        return None
    type_value = str(spec["type"])
    if type_value not in meanings:
        raise KeyError(f"{entry['id']}: dicom type {type_value} is not in {sources.DICOM_FILE}")
    default_category = MORPHOLOGY_CATEGORY if entry.get("located_in") or entry.get("system") == "lesions" else ANATOMY_CATEGORY
    category = str(spec.get("category") or default_category)
    side = entry.get("laterality")
    out = {
        "category": _code(category, meanings),
        "type": _code(type_value, meanings),
        "modifier": _code(SIDE_CODES[side], meanings) if side in SIDE_CODES else None,
    }
    if spec.get("region"):
        out["region"] = _code(str(spec["region"]), meanings)
        out["region_modifier"] = None
    match = spec.get("match", "curated")
    how = {
        "uberon_snomed_xref": "matched by UBERON's SNOMED CT cross-reference",
        "meaning_equals_label": "matched by meaning equal to the UBERON label",
        "curated": "matched by meaning, curated",
    }.get(match, match)
    out["source"] = f"dicom_snomed_anatomy.tsv ({how})"
    return out


def default_color(cid: str) -> list[int]:
    """A stable, fairly saturated colour derived from the concept id."""
    digest = hashlib.sha256(cid.encode()).digest()
    hue = digest[0] / 255.0
    sat = 0.45 + 0.4 * digest[1] / 255.0
    val = 0.65 + 0.3 * digest[2] / 255.0
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)]


def compile_concept(entry: dict, patch: dict | None, meanings: dict[str, str]) -> dict:
    """One concept of ontology.json (empty fields left out to keep the file small)."""
    cid = entry["id"]
    name = entry["name"].strip()
    synonyms: list[str] = []
    seen = {name.casefold()}
    for syn in list(entry.get("synonyms") or []) + list((patch or {}).get("synonyms") or []):
        syn = str(syn).strip()
        if syn and syn.casefold() not in seen:
            seen.add(syn.casefold())
            synonyms.append(syn)
    out: dict = {"name": name, "definition": " ".join(entry["definition"].split()), "system": entry.get("system") or "body"}
    if synonyms:
        out["synonyms"] = synonyms
    for key in ("is_a", "part_of", "located_in", "union_of", "totalseg"):
        if entry.get(key):
            out[key] = list(dict.fromkeys(entry[key]))
    for key in ("uberon", "laterality"):
        if entry.get(key):
            out[key] = entry[key]
    if entry.get("single_component") is not None:
        out["single_component"] = bool(entry["single_component"])
    out["modalities"] = list(entry.get("modalities") or ["CT", "MR"])
    codes: dict = {}
    coding = dicom_coding(entry, meanings)
    if coding:
        codes["dicom"] = coding
    if entry.get("uberon"):
        row = sources.uberon().get(entry["uberon"])
        if row:
            for key, field in (("SCTID", "snomed_xref"), ("FMA", "fma"), ("NCIT", "ncit")):
                values = sorted(set(row["xrefs"].get(key) or []))
                if values:
                    codes[field] = values
    if codes:
        out["codes"] = codes
    color = entry.get("color")
    if not color:
        for ts in entry.get("totalseg") or []:
            row = sources.totalseg_mapping().get(ts)
            if row:
                color = row["color"]
                break
    out["color"] = list(color or default_color(cid))
    return out


def tree_version() -> str:
    return TREE_VERSION_FILE.read_text(encoding="utf-8").strip() if TREE_VERSION_FILE.is_file() else "0.0.0"


def compile_tree(tree: SourceTree | None = None) -> dict:
    """Compile the YAML sources into the ontology document (a JSON-ready dict)."""
    tree = tree or load_sources()
    meanings = _meanings()
    concepts = {cid: compile_concept(entry, tree.patches.get(cid), meanings) for cid, entry in sorted(tree.entries.items())}
    body = json.dumps(concepts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(body.encode()).hexdigest()[:10]
    metadata = {
        "name": "UniSegText knowledge tree",
        "schema_version": SCHEMA_VERSION,
        "version": f"{tree_version()}+{digest}",
        "attribution": ATTRIBUTION,
        "licenses": {
            "UBERON": "CC BY 3.0, uberon.github.io",
            "DICOM codes (pydicom tables)": "MIT",
            "TotalSegmentator snomed_mapping.csv": "Apache-2.0",
        },
        "sources": [sources.UBERON_FILE, sources.DICOM_FILE, sources.TOTALSEG_MAPPING_FILE, sources.TOTALSEG_CLASSES_FILE],
        "concept_count": len(concepts),
    }
    return {"metadata": metadata, "concepts": concepts}


def dumps(document: dict) -> str:
    """Deterministic compact JSON text of the ontology document."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="compile knowledge_tree/ into unisegtext/knowledge/ontology.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is stale")
    parser.add_argument("--output", type=Path, default=sources.OUTPUT)
    parser.add_argument("--no-validate", action="store_true", help="skip the validator (not recommended)")
    args = parser.parse_args(argv)
    tree = load_sources()
    if not args.no_validate:
        from knowledge_tree.validate import validate

        errors = validate(tree)
        if errors:
            for line in errors[:200]:
                print(f"error: {line}", file=sys.stderr)
            print(f"{len(errors)} validation error(s); nothing written", file=sys.stderr)
            return 1
    text = dumps(compile_tree(tree))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale: run `python -m knowledge_tree.build`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    count = len(json.loads(text)["concepts"])
    print(f"wrote {args.output} ({len(text) / 1e6:.2f} MB, {count} concepts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["compile_tree", "dumps", "main", "read_yaml"]
