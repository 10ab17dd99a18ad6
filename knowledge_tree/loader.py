"""Read the knowledge tree's YAML files into plain concept entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from knowledge_tree.sources import CONCEPTS_DIR, IMPORTED_DIR, RULES_FILE

PATCHES_FILE = "_claimed.yaml"


@dataclass
class SourceTree:
    """All entries of the YAML sources, before compilation.

    Attributes:
        entries: concept id -> entry dict (file defaults applied, ``system`` and ``_file`` set).
        patches: concept id -> extra fields the UBERON import adds to curated concepts.
        duplicates: ids defined more than once, with the files that define them.
        errors: problems found while reading (unreadable file, entry without id).
    """

    entries: dict[str, dict] = field(default_factory=dict)
    patches: dict[str, dict] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def read_yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    return data or {}


def load_rules(path: Path = RULES_FILE) -> dict:
    """The synonym rules (drop lists, patterns, collision whitelist)."""
    return read_yaml(path) if path.is_file() else {}


def _read_dir(folder: Path, tree: SourceTree, origin: str) -> None:
    for path in sorted(folder.glob("*.yaml")):
        if path.name == PATCHES_FILE:
            continue
        rel = f"{origin}/{path.name}"
        try:
            data = read_yaml(path)
        except yaml.YAMLError as exc:
            tree.errors.append(f"{rel}: not valid YAML: {exc}")
            continue
        system = data.get("system")
        defaults = data.get("defaults") or {}
        for i, entry in enumerate(data.get("concepts") or []):
            if not isinstance(entry, dict) or not entry.get("id"):
                tree.errors.append(f"{rel}: entry {i} has no id")
                continue
            merged = {**defaults, **entry}
            merged.setdefault("system", system)
            merged["_file"] = rel
            cid = merged["id"]
            if cid in tree.entries:
                tree.duplicates.setdefault(cid, [tree.entries[cid]["_file"]]).append(rel)
                continue
            tree.entries[cid] = merged


def load_sources(curated_only: bool = False) -> SourceTree:
    """Read ``concepts/*.yaml`` (curated) and, unless ``curated_only``, ``imported/*.yaml``."""
    tree = SourceTree()
    _read_dir(CONCEPTS_DIR, tree, "concepts")
    if not curated_only:
        _read_dir(IMPORTED_DIR, tree, "imported")
        patch_path = IMPORTED_DIR / PATCHES_FILE
        if patch_path.is_file():
            for patch in read_yaml(patch_path).get("patches") or []:
                tree.patches[patch["id"]] = patch
    return tree
