"""`unisegtext knowledge`: inspect the knowledge tree (stats, resolve, search, show).

Also runnable as ``python -m unisegtext.cli.knowledge stats``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def add_parser(subparsers) -> None:
    """Register the ``knowledge`` command and its subcommands."""
    p = subparsers.add_parser("knowledge", help="inspect the knowledge tree (ontology)")
    p.add_argument("--tree", default=None, help="an ontology.json (default: the packaged one)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="knowledge_command", metavar="SUBCOMMAND")
    sub.add_parser("stats", help="number of concepts, synonyms, UBERON ids and DICOM codes")
    r = sub.add_parser("resolve", help="resolve prompts to concepts")
    r.add_argument("text", nargs="+", help="one or more prompts (quote multi-word prompts)")
    r.add_argument("--min-confidence", type=float, default=None)
    s = sub.add_parser("search", help="concepts matching a text")
    s.add_argument("text", nargs="+")
    s.add_argument("-k", type=int, default=10)
    sh = sub.add_parser("show", help="one concept with its hierarchy and codes")
    sh.add_argument("id")
    p.set_defaults(func=run)


def stats(tree) -> dict:
    concepts = list(tree)
    n = len(concepts)
    return {
        "version": tree.version,
        "concepts": n,
        "mean_synonyms": round(sum(len(c.synonyms) for c in concepts) / max(n, 1), 3),
        "with_uberon": sum(1 for c in concepts if c.uberon),
        "with_dicom_code": sum(1 for c in concepts if c.dicom),
        "grouping_concepts": sum(1 for c in concepts if c.union_of),
        "lateralised": sum(1 for c in concepts if c.laterality),
        "with_totalseg_class": sum(1 for c in concepts if c.totalseg),
        "systems": dict(sorted(_count(c.system for c in concepts).items())),
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def run(args: argparse.Namespace) -> int:
    from unisegtext.knowledge import DEFAULT_MIN_CONFIDENCE, load_tree

    tree = load_tree(args.tree)
    command = getattr(args, "knowledge_command", None) or "stats"
    out = sys.stdout
    if command == "stats":
        info = stats(tree)
        if args.json:
            json.dump(info, out, indent=2)
            out.write("\n")
        else:
            for key, value in info.items():
                if key == "systems":
                    value = ", ".join(f"{k} {v}" for k, v in value.items())
                out.write(f"{key.replace('_', ' ')}: {value}\n")
        return 0
    if command == "resolve":
        threshold = DEFAULT_MIN_CONFIDENCE if args.min_confidence is None else args.min_confidence
        results = [tree.resolve(t, min_confidence=threshold) for t in args.text]
        if args.json:
            json.dump([r.to_dict() for r in results], out, indent=2)
            out.write("\n")
        else:
            for r in results:
                if r.concept:
                    out.write(f"{r.query!r} -> {r.concept_id} ({r.concept.name}; {r.how}, confidence {r.confidence:.2f})\n")
                else:
                    maybe = ", ".join(c for c, _ in r.candidates[:5])
                    out.write(f"{r.query!r} -> no confident match; did you mean: {maybe}\n")
        return 0 if all(r.concept for r in results) else 1
    if command == "search":
        hits = tree.search(" ".join(args.text), k=args.k)
        if args.json:
            json.dump([{"id": c.id, "name": c.name, "score": round(s, 4)} for c, s in hits], out, indent=2)
            out.write("\n")
        else:
            for concept, score in hits:
                out.write(f"{score:.2f}  {concept.id:<40} {concept.name}\n")
        return 0
    if command == "show":
        concept = tree.get(args.id)
        info = concept.to_dict()
        info["children"] = tree.children(concept.id)
        info["ancestors"] = tree.ancestors(concept.id)
        json.dump(info, out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    raise SystemExit(f"unknown knowledge subcommand {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unisegtext")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["knowledge", *(sys.argv[1:] if argv is None else argv)])
    from unisegtext.errors import UniSegError

    try:
        return args.func(args)
    except UniSegError as exc:
        print(f"unisegtext knowledge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
