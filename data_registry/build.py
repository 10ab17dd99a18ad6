"""Validate every dataset descriptor and compile ``unisegtext/data/registry.json``.

    python -m data_registry.build            # validate + write
    python -m data_registry.build --check    # exit 1 when registry.json is stale or invalid

The output is deterministic (sorted keys, one descriptor per id) so that a test can fail
when the compiled file no longer matches the YAML files. Target concept ids are checked
against the knowledge tree when ``unisegtext.knowledge.load_tree`` is importable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unisegtext.data.registry import (
    REGISTRY_FORMAT_VERSION,
    Descriptor,
    load_descriptor,
    load_knowledge_tree,
    registry_path,
    unknown_concepts,
)
from unisegtext.errors import DataError

REGISTRY_DIR = Path(__file__).resolve().parent


def descriptor_files(directory: Path = REGISTRY_DIR) -> list[Path]:
    """The descriptor YAML files (files starting with '_' are not descriptors)."""
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith("_"))


def load_all(directory: Path = REGISTRY_DIR) -> tuple[dict[str, Descriptor], list[str]]:
    """Parse every descriptor; returns (valid descriptors by id, error messages)."""
    descriptors: dict[str, Descriptor] = {}
    errors: list[str] = []
    for path in descriptor_files(directory):
        try:
            descriptor = load_descriptor(path)
        except DataError as exc:
            errors.append(str(exc))
            continue
        descriptors[descriptor.id] = descriptor
    return descriptors, errors


def render(descriptors: dict[str, Descriptor]) -> str:
    """The registry.json text for a set of descriptors (deterministic)."""
    payload = {
        "format_version": REGISTRY_FORMAT_VERSION,
        "datasets": {i: descriptors[i].to_dict() for i in sorted(descriptors)},
    }
    return json.dumps(payload, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def concept_errors(descriptors: dict[str, Descriptor]) -> list[str]:
    tree = load_knowledge_tree()
    if tree is None:
        return []
    return [
        f"{d.source_path}: target concept(s) unknown to the knowledge tree: {', '.join(missing)}"
        for d in descriptors.values()
        if (missing := unknown_concepts(d, tree))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_registry.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when stale or invalid")
    parser.add_argument("--out", type=Path, default=registry_path(), help="compiled file (default: package data)")
    parser.add_argument(
        "--no-concept-check", action="store_true", help="skip the knowledge-tree check of target concept ids"
    )
    args = parser.parse_args(argv)

    descriptors, errors = load_all()
    if not args.no_concept_check:
        errors += concept_errors(descriptors)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print(f"{len(errors)} descriptor problem(s); registry not written", file=sys.stderr)
        return 1
    text = render(descriptors)
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is stale; run `python -m data_registry.build`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(descriptors)} datasets)")
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(descriptors)} datasets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
