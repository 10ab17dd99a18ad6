"""Schema of a concept entry in ``knowledge_tree/concepts/*.yaml`` and ``imported/*.yaml``.

A YAML file is ``{system: str, defaults: {field: value}, concepts: [entry, ...]}``; ``defaults``
apply to every entry of the file. Entry fields:

=================  ====================  ==========================================================
field              type                  meaning
=================  ====================  ==========================================================
id                 str (required)        stable snake_case id, laterality as suffix (kidney_left)
name               str (required)        preferred radiology name
definition         str (required)        one or two sentences in our own words
synonyms           list[str]             exact equivalents (abbreviations, Latin/Greek, spellings)
uberon             str                   UBERON id ("UBERON:0002113") where one exists
is_a               list[id]              kind-of parents
part_of            list[id]              whole-of parents
located_in         list[id]              organ a lesion lies in
union_of           list[id]              explicit mask composition of a grouping concept
laterality         left | right          side of a lateralised structure
modalities         list[CT | MR | PET]   modalities the structure is seen in
dicom              mapping               {type: SCTID, region: SCTID, category: SCTID, match: str}:
                                         codes from the DICOM table; modifier follows laterality
totalseg           list[str]             TotalSegmentator class names that equal this concept
single_component   bool                  normally one connected component
color              [r, g, b]             display colour, 0-255
system             str                   body system (defaults to the file's)
=================  ====================  ==========================================================
"""

from __future__ import annotations

import re

ID_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")
UBERON_RE = re.compile(r"^UBERON:\d{7}$")
SCTID_RE = re.compile(r"^\d{6,18}$")
LATERALITIES = ("left", "right")
MODALITIES = ("CT", "MR", "PET")

FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "name": str,
    "definition": str,
    "synonyms": list,
    "uberon": str,
    "is_a": list,
    "part_of": list,
    "located_in": list,
    "union_of": list,
    "laterality": str,
    "modalities": list,
    "dicom": dict,
    "totalseg": list,
    "single_component": bool,
    "color": list,
    "system": str,
}
REQUIRED = ("id", "name", "definition")
REFERENCE_FIELDS = ("is_a", "part_of", "located_in", "union_of")
DICOM_KEYS = {"type", "region", "category", "match"}
INTERNAL = {"_file"}


def check_entry(entry: dict) -> list[str]:
    """Type and format errors of one entry (references are checked by the validator)."""
    errors: list[str] = []
    cid = entry.get("id", "?")
    where = f"{entry.get('_file', '?')}: {cid}"
    for key in REQUIRED:
        value = entry.get(key)
        if not isinstance(value, str) or not value.strip():
            errors.append(f"{where}: field {key!r} is required and must be a non-empty string")
    for key, value in entry.items():
        if key in INTERNAL:
            continue
        if key not in FIELDS:
            errors.append(f"{where}: unknown field {key!r}; allowed: {', '.join(FIELDS)}")
            continue
        if value is not None and not isinstance(value, FIELDS[key]):
            errors.append(f"{where}: field {key!r} must be {FIELDS[key].__name__}, got {type(value).__name__}")
            continue
        if isinstance(value, list) and key != "color" and not all(isinstance(v, str) and v.strip() for v in value):
            errors.append(f"{where}: field {key!r} must be a list of non-empty strings")
    if isinstance(cid, str) and not ID_RE.match(cid):
        errors.append(f"{where}: id must be snake_case ([a-z0-9_], no double underscores)")
    if entry.get("uberon") and not UBERON_RE.match(str(entry["uberon"])):
        errors.append(f"{where}: uberon {entry['uberon']!r} is not of the form UBERON:0000000")
    lat = entry.get("laterality")
    if lat is not None and lat not in LATERALITIES:
        errors.append(f"{where}: laterality {lat!r} must be one of {LATERALITIES}")
    if isinstance(cid, str):
        suffix = cid.rsplit("_", 1)[-1]
        if suffix in LATERALITIES and lat != suffix:
            errors.append(f"{where}: id ends in _{suffix} but laterality is {lat!r}")
        if lat in LATERALITIES and not re.search(rf"_{lat}(_\d+)?$", cid):
            errors.append(f"{where}: laterality {lat} but the id has no _{lat} suffix")
    for modality in entry.get("modalities") or []:
        if modality not in MODALITIES:
            errors.append(f"{where}: modality {modality!r} must be one of {MODALITIES}")
    color = entry.get("color")
    if color is not None and not (
        isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    ):
        errors.append(f"{where}: color must be [r, g, b] with integers 0-255")
    dicom = entry.get("dicom")
    if isinstance(dicom, dict):
        extra = set(dicom) - DICOM_KEYS
        if extra:
            errors.append(f"{where}: dicom has unknown keys {sorted(extra)}; allowed {sorted(DICOM_KEYS)}")
        for key in ("type", "region", "category"):
            if key in dicom and not SCTID_RE.match(str(dicom[key])):
                errors.append(f"{where}: dicom.{key} {dicom[key]!r} is not a SNOMED CT id")
        if "type" not in dicom:
            errors.append(f"{where}: dicom needs a 'type' code")
    return errors
