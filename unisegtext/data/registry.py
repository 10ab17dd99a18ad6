"""Dataset descriptors: the typed schema, validation, and the compiled registry.

One YAML file per dataset lives in ``data_registry/`` (see ``data_registry/schema.md``).
``python -m data_registry.build`` validates them all and compiles
``unisegtext/data/registry.json`` (package data), which :func:`load_registry` reads at run
time. :func:`load_descriptor` reads and validates a single YAML file, for a dataset that is
not (yet) in the compiled registry.

The central idea is ``targets``: concept id -> the raw label values whose union is that
structure (KiTS: kidney = 1, 2, 3; masses = 2, 3; tumour = 2). Concepts that a dataset does
not list in ``targets`` are *unknown* for it, not background.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from unisegtext.errors import DataError, did_you_mean

logger = logging.getLogger(__name__)

REGISTRY_FORMAT_VERSION = 1

#: Reader families and the layout keys each accepts ("family" itself is always allowed).
#: ``None`` as a default means "required"; every other default is used when the key is absent.
FAMILY_LAYOUT_KEYS: dict[str, dict[str, Any]] = {
    "nnunet": {
        "dataset_json": "dataset.json",
        "images": "imagesTr/{case}_{channel:04d}.nii.gz",
        "labels": "labelsTr/{case}.nii.gz",
        "channels": [],
    },
    "totalsegmentator": {
        "image": "{case}/ct.nii.gz",
        "masks": "{case}/segmentations/{structure}.nii.gz",
        "meta": "meta.csv",
        "on_overlap": "overwrite",
    },
    "case_folders": {
        "image": None,
        "label": None,
        "channels": [],
    },
    "multi_sequence": {
        "image": "{case}/{case}-{sequence}.nii.gz",
        "label": "{case}/{case}-seg.nii.gz",
        "sequences": ["t1n", "t1c", "t2w", "t2f"],
    },
    "dicom_png": {
        "dicom": None,
        "masks": None,
        "grey_values": {},
        "grey_tolerance": 0,
    },
    "per_structure_files": {
        "image": "{case}/image.nii.gz",
        "masks": "{case}/{structure}.nii.gz",
        "on_overlap": "overwrite",
    },
}
FAMILIES = tuple(FAMILY_LAYOUT_KEYS)
#: Families whose labels come as one binary mask file per structure (labels keyed by value or stem).
PER_STRUCTURE_FAMILIES = ("totalsegmentator", "per_structure_files")

MODALITIES = ("CT", "MR", "PET", "SPECT", "US", "CBCT", "XR")
SPLITS = ("train", "validation", "test")

REQUIRED_FIELDS = ("id", "name", "modality", "body_region", "layout", "labels", "targets", "licence", "citation")
OPTIONAL_FIELDS = ("version", "homepage", "mr_sequences", "num_cases", "sources", "split", "notes", "download",
                   "outside_field_of_view")
ALL_FIELDS = REQUIRED_FIELDS + OPTIONAL_FIELDS

_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass(frozen=True)
class Layout:
    """Where a dataset's files lie: a reader family plus its family-specific keys.

    Attributes:
        family: one of :data:`FAMILIES`.
        options: the family's layout keys, defaults filled in (see ``data_registry/schema.md``).
    """

    family: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.options[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass
class Descriptor:
    """One dataset of the registry (the parsed, validated form of its YAML descriptor).

    Attributes:
        id: unique snake_case id, equal to the YAML file stem.
        labels: the dataset's own label map as published: label value (int) or mask file stem
            (str) -> original name. For per-structure families the mask file of a structure is
            ``<name>`` when keyed by value, ``<stem>`` when keyed by stem.
        targets: concept id -> label values (ints, after resolution of stems/names) whose
            union is that concept.
        split: fixed split, split name ("validation", "test", "train") -> case ids.
        outside_field_of_view: concepts that no scan of the dataset can show (the scans are
            cropped to another region: the left-atrium crops hold no abdominal organ). Facts
            about the data, with a source; used for absence benchmarks, never as training
            labels unless a config says so.
        source_path: the YAML file it was read from, when known.
    """

    id: str
    name: str
    modality: list[str]
    body_region: str
    layout: Layout
    labels: dict[int | str, str]
    targets: dict[str, list[int | str]]
    licence: str
    citation: str
    version: str = ""
    homepage: str = ""
    mr_sequences: list[str] = field(default_factory=list)
    num_cases: int | None = None
    sources: dict[str, str] = field(default_factory=dict)
    split: dict[str, list[str]] = field(default_factory=dict)
    notes: str = ""
    download: str = ""
    outside_field_of_view: list[str] = field(default_factory=list)
    source_path: str | None = field(default=None, compare=False)

    # -- derived views ---------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def annotated(self) -> list[str]:
        """The concepts this dataset annotates (the keys of ``targets``), sorted."""
        return sorted(self.targets)

    def label_values(self) -> dict[int | str, int]:
        """Label key -> integer value in the combined label map.

        Int keys map to themselves. Stem keys (per-structure families only) get 1, 2, ... in
        the order they are listed in the descriptor.
        """
        values: dict[int | str, int] = {}
        next_value = 1
        for key in self.labels:
            if isinstance(key, int):
                values[key] = key
            else:
                values[key] = next_value
                next_value += 1
        return values

    def structure_files(self) -> dict[str, int]:
        """For per-structure families: mask file stem -> integer value in the combined map."""
        values = self.label_values()
        stems: dict[str, int] = {}
        for key, name in self.labels.items():
            stem = key if isinstance(key, str) else name
            stems[stem] = values[key]
        return stems

    def target_values(self) -> dict[str, list[int]]:
        """Concept id -> sorted integer label values (stems and names resolved)."""
        values = self.label_values()
        by_name = {name: key for key, name in self.labels.items()}
        out: dict[str, list[int]] = {}
        for concept, raw in self.targets.items():
            resolved = set()
            for item in raw:
                key = item if item in self.labels else by_name.get(item, item)
                resolved.add(values[key])
            out[concept] = sorted(resolved)
        return out

    def split_of(self, case: str) -> str | None:
        """The fixed split a case belongs to, or None when the descriptor does not say."""
        for name, cases in self.split.items():
            if case in cases:
                return name
        return None

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (label keys as strings) that :meth:`from_dict` reads back."""
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "homepage": self.homepage,
            "licence": self.licence,
            "citation": self.citation,
            "modality": list(self.modality),
            "mr_sequences": list(self.mr_sequences),
            "body_region": self.body_region,
            "num_cases": self.num_cases,
            "layout": {"family": self.layout.family, **dict(self.layout.options)},
            "labels": {str(k): v for k, v in self.labels.items()},
            "targets": {k: list(v) for k, v in self.targets.items()},
            "sources": dict(self.sources),
            "split": {k: list(v) for k, v in self.split.items()},
            "notes": self.notes,
            "download": self.download,
            "outside_field_of_view": list(self.outside_field_of_view),
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "descriptor", stem: str | None = None) -> Descriptor:
        """Validate a raw mapping (parsed YAML or registry JSON) and build a Descriptor.

        Args:
            data: the mapping.
            where: how to name the source in error messages (a path).
            stem: the file stem the id must equal (None: not checked).

        Raises:
            DataError: listing every problem found, each with how to fix it.
        """
        errors: list[str] = []
        descriptor = _parse(data, errors, stem)
        if errors or descriptor is None:
            raise DataError(f"{where}: invalid dataset descriptor:\n  - " + "\n  - ".join(errors))
        descriptor.source_path = where if where != "descriptor" else None
        return descriptor


# ---------------------------------------------------------------------------------------------
# validation


def _parse(data: Any, errors: list[str], stem: str | None) -> Descriptor | None:
    if not isinstance(data, Mapping):
        errors.append(f"expected a mapping of fields (id, name, layout, ...), got {type(data).__name__}")
        return None
    unknown = [k for k in data if k not in ALL_FIELDS]
    for key in unknown:
        errors.append(f"unknown field {key!r}.{did_you_mean(str(key), ALL_FIELDS)} Allowed: {', '.join(ALL_FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    for key in missing:
        hint = ' (use "" when not found, and say so in notes)' if key in ("licence", "citation") else ""
        errors.append(f"missing required field {key!r}{hint}")

    def text(key: str, default: str = "") -> str:
        value = data.get(key, default)
        if value is None:
            return ""
        if not isinstance(value, str):
            errors.append(f"{key} must be a string, got {type(value).__name__} {value!r}; quote it in YAML")
            return str(value)
        return value

    def strings(key: str) -> list[str]:
        value = data.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errors.append(f"{key} must be a list of strings, got {value!r}")
            return []
        return list(value)

    dataset_id = text("id")
    if dataset_id and not _SNAKE.match(dataset_id):
        errors.append(f"id {dataset_id!r} is not snake_case (lowercase letters, digits, underscores)")
    if stem is not None and dataset_id and dataset_id != stem:
        errors.append(f"id {dataset_id!r} differs from the file name {stem!r}.yaml; rename one of them")

    modality = [m.upper() for m in strings("modality")]
    modality = ["MR" if m == "MRI" else m for m in modality]
    for m in modality:
        if m not in MODALITIES:
            errors.append(f"modality {m!r} unknown; use one of {', '.join(MODALITIES)}")
    if "modality" in data and not modality:
        errors.append("modality is empty; list at least one, e.g. [CT]")

    body_region = text("body_region")
    if body_region and not _SNAKE.match(body_region):
        errors.append(f"body_region {body_region!r} must be snake_case, e.g. abdomen, head_neck, whole_body")

    num_cases = data.get("num_cases")
    if num_cases is not None and (isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 0):
        errors.append(f"num_cases must be a non-negative integer or null, got {num_cases!r}")
        num_cases = None

    layout = _parse_layout(data.get("layout"), errors)
    labels = _parse_labels(data.get("labels"), layout.family if layout else None, errors)
    targets = _parse_targets(data.get("targets"), labels, errors)
    split = _parse_split(data.get("split"), errors)

    sources = data.get("sources") or {}
    if not isinstance(sources, Mapping) or not all(isinstance(v, str) for v in sources.values()):
        errors.append(f"sources must map a fact (labels, licence, ...) to a URL or document, got {sources!r}")
        sources = {}

    outside = data.get("outside_field_of_view") or []
    if not isinstance(outside, list) or not all(isinstance(c, str) and _SNAKE.match(c) for c in outside):
        errors.append(f"outside_field_of_view must be a list of concept ids, got {outside!r}")
        outside = []
    overlap = sorted(set(outside) & set(targets or {}))
    if overlap:
        errors.append(f"outside_field_of_view lists annotated concepts {overlap}; a labelled structure is in view")
    if outside and "outside_field_of_view" not in (data.get("sources") or {}):
        errors.append("outside_field_of_view needs a source: add sources.outside_field_of_view")

    licence = text("licence")
    notes = text("notes")
    if "licence" in data and not licence.strip() and not notes.strip():
        errors.append('licence is "" (not found): say so in notes, e.g. notes: "licence not stated on ..."')

    if errors or layout is None:
        return None
    return Descriptor(
        id=dataset_id,
        name=text("name"),
        modality=modality,
        body_region=body_region,
        layout=layout,
        labels=labels,
        targets=targets,
        licence=licence,
        citation=text("citation"),
        version=text("version"),
        homepage=text("homepage"),
        mr_sequences=strings("mr_sequences"),
        num_cases=num_cases,
        sources={str(k): v for k, v in sources.items()},
        split=split,
        notes=notes,
        download=text("download"),
        outside_field_of_view=list(outside),
    )


def _parse_layout(raw: Any, errors: list[str]) -> Layout | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "family" not in raw:
        errors.append(f"layout must be a mapping with a 'family' key (one of {', '.join(FAMILIES)}), got {raw!r}")
        return None
    family = raw["family"]
    if family not in FAMILY_LAYOUT_KEYS:
        errors.append(
            f"unknown layout family {family!r}.{did_you_mean(str(family), FAMILIES)} "
            f"Known families: {', '.join(FAMILIES)} (see data_registry/schema.md)"
        )
        return None
    spec = FAMILY_LAYOUT_KEYS[family]
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "family":
            continue
        if key not in spec:
            errors.append(
                f"layout key {key!r} is not known to family {family!r}.{did_you_mean(str(key), list(spec))} "
                f"Allowed: {', '.join(spec)}"
            )
            continue
        options[key] = value
    for key, default in spec.items():
        if key not in options:
            if default is None:
                errors.append(f"layout family {family!r} needs the key {key!r} (see data_registry/schema.md)")
            else:
                options[key] = json.loads(json.dumps(default))
    for key, value in options.items():
        if key in ("images", "labels", "image", "label", "masks", "dicom"):
            templates = value if isinstance(value, list) else [value]
            if not templates or not all(isinstance(t, str) and t for t in templates):
                errors.append(f"layout.{key} must be a path template string, got {value!r}")
            elif key != "dataset_json" and not all("{case}" in t for t in templates):
                errors.append(f"layout.{key} {value!r} must contain the placeholder {{case}}")
    if family in PER_STRUCTURE_FAMILIES and "{structure}" not in str(options.get("masks", "")):
        errors.append(f"layout.masks {options.get('masks')!r} must contain the placeholder {{structure}}")
    if options.get("on_overlap", "overwrite") not in ("overwrite", "error"):
        errors.append(f"layout.on_overlap must be 'overwrite' or 'error', got {options['on_overlap']!r}")
    if family == "dicom_png":
        grey = options.get("grey_values") or {}
        if not isinstance(grey, Mapping) or not all(_is_int(k) and _is_int(v) for k, v in grey.items()):
            errors.append(f"layout.grey_values must map PNG grey values (int) to label values (int), got {grey!r}")
        else:
            options["grey_values"] = {int(k): int(v) for k, v in grey.items()}
        if not _is_int(options.get("grey_tolerance")) or int(options["grey_tolerance"]) < 0:
            errors.append("layout.grey_tolerance must be a non-negative integer")
    if family == "multi_sequence":
        seqs = options.get("sequences")
        if not isinstance(seqs, list) or not seqs or not all(isinstance(s, str) for s in seqs):
            errors.append(f"layout.sequences must be a non-empty list of file suffixes, got {seqs!r}")
        elif "{sequence}" not in str(options.get("image")):
            errors.append("layout.image must contain the placeholder {sequence}")
    channels = options.get("channels")
    if channels is not None and not isinstance(channels, list):
        errors.append(f"layout.channels must be a list of channel names, got {channels!r}")
    return Layout(family=family, options=options)


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _parse_labels(raw: Any, family: str | None, errors: list[str]) -> dict[int | str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        errors.append(f"labels must be a non-empty mapping value -> name, got {raw!r}")
        return {}
    labels: dict[int | str, str] = {}
    for key, name in raw.items():
        if not isinstance(name, str) or not name:
            errors.append(f"labels[{key!r}] must be a non-empty name string, got {name!r}")
            continue
        if _is_int(key):
            value = int(key)
            if value < 0:
                errors.append(f"label value {value} is negative; label values are >= 0")
                continue
            labels[value] = name
        elif family in PER_STRUCTURE_FAMILIES:
            labels[str(key)] = name
        else:
            errors.append(
                f"label key {key!r} is not an integer; only per-structure families "
                f"({', '.join(PER_STRUCTURE_FAMILIES)}) may key labels by mask file stem"
            )
    if family in PER_STRUCTURE_FAMILIES and labels:
        kinds = {isinstance(k, int) for k in labels}
        if len(kinds) > 1:
            errors.append("labels mixes integer values and file stems as keys; use one kind")
        if 0 in labels:
            errors.append("label value 0 is background; per-structure labels start at 1")
    return labels


def _parse_targets(raw: Any, labels: dict[int | str, str], errors: list[str]) -> dict[str, list[int | str]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not raw:
        errors.append(f"targets must be a non-empty mapping concept id -> label values, got {raw!r}")
        return {}
    names = {name for name in labels.values()}
    targets: dict[str, list[int | str]] = {}
    for concept, values in raw.items():
        if not isinstance(concept, str) or not _SNAKE.match(concept):
            errors.append(f"target {concept!r} is not a snake_case concept id")
            continue
        if isinstance(values, (int, str)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not values:
            errors.append(f"targets.{concept} must be a non-empty list of label values, got {values!r}")
            continue
        resolved: list[int | str] = []
        for value in values:
            if _is_int(value):
                value = int(value)
                if value == 0:
                    errors.append(f"targets.{concept} lists 0, the background; list structure values only")
                    continue
            if labels and value not in labels and value not in names:
                errors.append(
                    f"targets.{concept}: value {value!r} is not in labels "
                    f"(known: {', '.join(str(k) for k in list(labels)[:20])}{' ...' if len(labels) > 20 else ''})"
                )
                continue
            resolved.append(value)
        targets[concept] = resolved
    return targets


def _parse_split(raw: Any, errors: list[str]) -> dict[str, list[str]]:
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        errors.append(f"split must map a split name ({', '.join(SPLITS)}) to case ids, got {raw!r}")
        return {}
    split: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for name, cases in raw.items():
        if name not in SPLITS:
            errors.append(f"split name {name!r} unknown.{did_you_mean(str(name), SPLITS)} Use {', '.join(SPLITS)}")
            continue
        if not isinstance(cases, list) or not all(isinstance(c, (str, int)) for c in cases):
            errors.append(f"split.{name} must be a list of case ids, got {cases!r}")
            continue
        ids = [str(c) for c in cases]
        for case in ids:
            if case in seen:
                errors.append(f"case {case!r} is listed in split.{seen[case]} and split.{name}")
            seen[case] = name
        split[name] = ids
    return split


# ---------------------------------------------------------------------------------------------
# loading


def load_descriptor(path: str | Path) -> Descriptor:
    """Read and validate one YAML descriptor (the id must equal the file stem).

    Raises:
        DataError: unreadable YAML or an invalid descriptor (all problems listed).
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DataError(f"descriptor {path} does not exist; pass a data_registry/<id>.yaml file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML ({exc})") from exc
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.stem
    return Descriptor.from_dict(data, where=str(path), stem=stem)


def registry_path() -> Path:
    """The compiled registry shipped with the package."""
    return Path(__file__).with_name("registry.json")


@lru_cache(maxsize=4)
def _load_registry_file(path: str) -> dict[str, Descriptor]:
    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"compiled data registry {file} is missing; build it with `python -m data_registry.build`"
        )
    try:
        payload = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{file} is not valid JSON ({exc}); rebuild with `python -m data_registry.build`") from exc
    if payload.get("format_version") != REGISTRY_FORMAT_VERSION:
        raise DataError(
            f"{file} has format_version {payload.get('format_version')!r}, expected {REGISTRY_FORMAT_VERSION}; "
            "rebuild with `python -m data_registry.build`"
        )
    return {
        dataset_id: Descriptor.from_dict(raw, where=f"{file}:{dataset_id}", stem=dataset_id)
        for dataset_id, raw in payload["datasets"].items()
    }


def load_registry(path: str | Path | None = None) -> dict[str, Descriptor]:
    """All registered datasets, id -> :class:`Descriptor` (from the compiled registry.json).

    Args:
        path: another compiled registry file (default: the one shipped with the package).
    """
    return dict(_load_registry_file(str(path or registry_path())))


def get_descriptor(dataset: str | Path, registry: Mapping[str, Descriptor] | None = None) -> Descriptor:
    """A descriptor by registry id, or from a YAML path.

    Raises:
        DataError: unknown id (with close matches) or an invalid YAML file.
    """
    text = str(dataset)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_descriptor(text)
    registry = load_registry() if registry is None else registry
    if text not in registry:
        raise DataError(
            f"unknown dataset {text!r}.{did_you_mean(text, list(registry))} "
            "List the registered ones with `unisegtext data list`, or pass a descriptor .yaml path"
        )
    return registry[text]


def unknown_concepts(descriptor: Descriptor, known: Iterable[str] | Any) -> list[str]:
    """The target concept ids of a descriptor that ``known`` (a set or the knowledge tree) lacks."""
    return sorted(c for c in descriptor.targets if c not in known)


def load_knowledge_tree() -> Any | None:
    """Something that answers ``concept_id in tree``: the knowledge tree, else None.

    Uses ``unisegtext.knowledge.load_tree`` when importable; otherwise the ids of the compiled
    ``unisegtext/knowledge/ontology.json`` when it exists; otherwise None (checks skipped).
    """
    try:
        from unisegtext.knowledge import load_tree  # type: ignore[attr-defined]
    except ImportError:
        compiled = Path(__file__).resolve().parents[1] / "knowledge" / "ontology.json"
        if not compiled.is_file():
            logger.debug("no knowledge tree available; concept ids not checked")
            return None
        concepts = json.loads(compiled.read_text(encoding="utf-8")).get("concepts", {})
        return set(concepts) if isinstance(concepts, dict) else {c["id"] for c in concepts}
    return load_tree()
