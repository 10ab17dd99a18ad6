"""Evaluate prompt resolution on the held-out prompt list.

Usage: ``python eval/resolve_eval.py [--prompts eval/prompts/heldout_prompts.tsv] [--show-errors]``

Prints top-1 / top-5 accuracy of two methods:

* ``exact``: case-insensitive string lookup of the prompt among concept ids, names and
  synonyms (the baseline a plain dictionary gives);
* ``resolve``: :meth:`unisegtext.knowledge.KnowledgeTree.resolve` (normalisation + fuzzy).

A prompt counts for top-1 when the resolved concept is the expected one, and for top-5 when the
expected id is among the first five candidates.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unisegtext.knowledge import load_tree  # noqa: E402

DEFAULT_PROMPTS = REPO / "eval" / "prompts" / "heldout_prompts.tsv"


def read_prompts(path: Path) -> list[tuple[str, str]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    rows = list(csv.DictReader(lines, delimiter="\t"))
    return [(row["prompt"], row["expected"]) for row in rows]


def evaluate(prompts: list[tuple[str, str]], show_errors: bool = False) -> dict[str, dict[str, float]]:
    tree = load_tree()
    missing = sorted({exp for _, exp in prompts if exp not in tree})
    if missing:
        raise SystemExit(f"expected ids not in the tree: {missing}")
    lookup: dict[str, set[str]] = {}
    for concept in tree:
        for text in (concept.id, concept.name, *concept.synonyms):
            lookup.setdefault(text.casefold(), set()).add(concept.id)
    counts = {"exact": [0, 0], "resolve": [0, 0]}
    errors = []
    for prompt, expected in prompts:
        hits = sorted(lookup.get(prompt.strip().casefold(), ()))
        counts["exact"][0] += hits[:1] == [expected]
        counts["exact"][1] += expected in hits[:5]
        res = tree.resolve(prompt)
        top5 = [cid for cid, _ in res.candidates[:5]]
        ok1 = res.concept_id == expected
        counts["resolve"][0] += ok1
        counts["resolve"][1] += ok1 or expected in top5
        if not ok1:
            errors.append((prompt, expected, res.concept_id, res.how, round(res.confidence, 2), top5[:3]))
    n = len(prompts)
    result = {m: {"top1": c[0] / n, "top5": c[1] / n} for m, c in counts.items()}
    if show_errors:
        for row in errors:
            print("MISS", *row, sep="\t")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--show-errors", action="store_true")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts)
    result = evaluate(prompts, show_errors=args.show_errors)
    print(f"{len(prompts)} prompts from {args.prompts.name}; tree {load_tree().version}")
    print(f"{'method':<10}{'top-1':>8}{'top-5':>8}")
    for method, scores in result.items():
        print(f"{method:<10}{scores['top1']:>8.1%}{scores['top5']:>8.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
