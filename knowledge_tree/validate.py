"""Validate the knowledge tree's YAML sources.

Run ``python -m knowledge_tree.validate`` (exit 1 on any error). Checks:

* schema: required fields, types, id format, laterality suffix (``schema.check_entry``);
* ids unique across all files;
* every ``is_a`` / ``part_of`` / ``located_in`` / ``union_of`` reference resolves;
* no cycles through is_a, part_of and union_of;
* every concept has a definition (one or two sentences, at most 400 characters);
* every UBERON id is one of the shared source's, and no UBERON id is used twice;
* every DICOM code of the compiled tree is in ``dicom_snomed_anatomy.tsv`` or
  TotalSegmentator's ``snomed_mapping.csv``;
* synonym collisions: the same normalised name/synonym on two concepts is an error unless
  whitelisted in ``synonym_rules.yaml``;
* every TotalSegmentator class of the tasks ``total`` and ``total_mr`` maps to exactly one
  concept.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

from knowledge_tree import sources
from knowledge_tree.loader import SourceTree, load_rules, load_sources
from knowledge_tree.schema import REFERENCE_FIELDS, check_entry
from unisegtext.knowledge.normalize import normalize


def _cycles(entries: dict[str, dict]) -> list[str]:
    """Concept ids that lie on a cycle of child -> parent edges."""
    parents: dict[str, set[str]] = defaultdict(set)
    for cid, entry in entries.items():
        for key in ("is_a", "part_of"):
            parents[cid].update(p for p in entry.get(key) or [] if p in entries)
        for member in entry.get("union_of") or []:
            if member in entries:
                parents[member].add(cid)
    white, grey, black = 0, 1, 2
    state = dict.fromkeys(entries, white)
    found: list[str] = []
    for start in sorted(entries):
        if state[start] != white:
            continue
        stack = [(start, iter(sorted(parents[start])))]
        state[start] = grey
        path = [start]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = black
                stack.pop()
                path.pop()
                continue
            if state[nxt] == grey:
                found.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif state[nxt] == white:
                state[nxt] = grey
                stack.append((nxt, iter(sorted(parents[nxt]))))
                path.append(nxt)
    return found


def synonym_keys(cid: str, entry: dict, patch: dict | None) -> list[tuple[str, str]]:
    """(normalised key, original text) of a concept's id, name and synonyms."""
    texts = [cid.replace("_", " "), entry.get("name", "")]
    texts += list(entry.get("synonyms") or []) + list((patch or {}).get("synonyms") or [])
    out = []
    for text in texts:
        key = normalize(str(text))
        if key:
            out.append((key, str(text)))
    return out


def validate(tree: SourceTree | None = None, *, check_codes: bool = True) -> list[str]:
    """All problems of the sources, as messages; an empty list means valid."""
    tree = tree or load_sources()
    rules = load_rules()
    errors = list(tree.errors)
    entries = tree.entries
    for cid, files in sorted(tree.duplicates.items()):
        errors.append(f"id {cid!r} is defined more than once: {', '.join(files)}")
    for cid in sorted(entries):
        entry = entries[cid]
        errors.extend(check_entry(entry))
        where = f"{entry['_file']}: {cid}"
        for key in REFERENCE_FIELDS:
            for ref in entry.get(key) or []:
                if ref not in entries:
                    errors.append(f"{where}: {key} refers to unknown concept {ref!r}")
                elif ref == cid:
                    errors.append(f"{where}: {key} refers to itself")
        definition = str(entry.get("definition") or "")
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", definition.strip()) if s]
        if definition and (len(sentences) > 2 or len(definition) > 400):
            errors.append(f"{where}: definition should be one or two short sentences")
    for patch_id in sorted(tree.patches):
        if patch_id not in entries:
            errors.append(f"imported/_claimed.yaml: patch for unknown concept {patch_id!r}; re-run the import")
    for cycle in _cycles(entries):
        errors.append(f"cycle in the hierarchy: {cycle}")

    uberon = sources.uberon()
    used: dict[str, str] = {}
    for cid, entry in sorted(entries.items()):
        uid = entry.get("uberon")
        if not uid:
            continue
        if uid not in uberon:
            errors.append(f"{entry['_file']}: {cid}: UBERON id {uid} is not in {sources.UBERON_FILE}")
        if uid in used:
            errors.append(f"{entry['_file']}: {cid}: UBERON id {uid} is already used by {used[uid]}")
        used.setdefault(uid, cid)

    whitelist = {normalize(str(item["key"])): set(item["concepts"]) for item in rules.get("collision_whitelist") or []}
    owners: dict[str, dict[str, str]] = defaultdict(dict)
    for cid, entry in entries.items():
        for key, text in synonym_keys(cid, entry, tree.patches.get(cid)):
            owners[key].setdefault(cid, text)
    for key in sorted(owners):
        if len(owners[key]) > 1 and not set(owners[key]) <= whitelist.get(key, set()):
            listed = ", ".join(f"{c} ({t!r})" for c, t in sorted(owners[key].items()))
            errors.append(f"synonym collision on {key!r}: {listed}")

    ts_owner: dict[str, list[str]] = defaultdict(list)
    for cid, entry in entries.items():
        for name in entry.get("totalseg") or []:
            ts_owner[name].append(cid)
    for name, cids in sorted(ts_owner.items()):
        if len(cids) > 1:
            errors.append(f"TotalSegmentator class {name!r} is claimed by several concepts: {cids}")
    for task, names in sources.totalseg_classes().items():
        for name in names:
            if name not in ts_owner:
                errors.append(f"TotalSegmentator class {task}/{name} maps to no concept (add it to a concept's totalseg)")

    if check_codes and not errors:
        from knowledge_tree.build import compile_tree

        allowed = sources.all_sourced_code_values()
        for cid, concept in compile_tree(tree)["concepts"].items():
            dicom = (concept.get("codes") or {}).get("dicom") or {}
            for key in ("category", "type", "modifier", "region", "region_modifier"):
                code = dicom.get(key)
                if code and (code["scheme"], code["value"]) not in allowed:
                    errors.append(f"{cid}: DICOM {key} code {code['value']} is not in the shared code tables")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="validate knowledge_tree/ YAML sources")
    parser.parse_args(argv)
    tree = load_sources()
    errors = validate(tree)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} error(s) in {len(tree.entries)} concepts", file=sys.stderr)
        return 1
    print(f"knowledge tree valid: {len(tree.entries)} concepts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
