"""Concept retrieval on held-out phrasings: exact string vs base MiniLM vs knowledge-enhanced encoder.

Usage (from the repository root)::

    python eval/text_retrieval.py [--adapter unisegtext/checkpoints/text_adapter]
                                  [--prompts eval/prompts/heldout_prompts.tsv]
                                  [--split test] [--limit N] [--no-resolve] [--json OUT.json]

Two query sets, never trained on:

* ``held-out synonyms``: the (concept, synonym) pairs of the adapter's test split (a fixed
  hash of split_seed, concept id and synonym; the split settings are read from the adapter's
  ``meta.json``). The dictionary/gallery is every concept's id and name plus the *training*
  synonyms only, so a held-out synonym is never found by looking it up.
* ``free text``: the hand-written prompts of ``eval/prompts/heldout_prompts.tsv``; the
  dictionary/gallery is every id, name and synonym of the tree (the deployed dictionary).

Methods (rows):

* ``exact string``: case-insensitive lookup among ids, names and dictionary synonyms;
* ``tree.resolve``: the knowledge tree's own resolver (normalisation + fuzzy) on the same
  dictionary, for reference, alone and with an embedding fallback (``resolve(...,
  embedder=...)``: the embedding candidate wins when its cosine beats the fuzzy score);
  ``--no-resolve`` skips these rows;
* ``base MiniLM``: cosine similarity of all-MiniLM-L6-v2 embeddings (no knowledge training);
* ``knowledge-enhanced``: the same with the knowledge-pre-trained adapter.

Embedding methods rank concepts by the cosine similarity between the prompt's embedding and the
concept's name embedding (``names``) or the best of its name and dictionary synonyms
(``names+syn``). Top-5 counts a query when the expected concept is among the first five.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from unisegtext.training.text_pretrain import (  # noqa: E402
    AdaptedEmbedder,
    BaseEmbeddingStore,
    RetrievalSet,
    SynonymSplit,
    TextPretrainConfig,
    _key,
    default_adapter_path,
    evaluate_retrieval,
    free_text_sets,
    read_adapter_meta,
    read_prompt_tsv,
    split_synonyms,
    synonym_sets,
)

DEFAULT_PROMPTS = REPO / "eval" / "prompts" / "heldout_prompts.tsv"
logger = logging.getLogger("text_retrieval")


def exact_string(rs: RetrievalSet, tree_ids: list[str]) -> dict[str, float]:
    """Case-insensitive lookup of each query among the gallery texts and concept ids."""
    lookup: dict[str, set[int]] = {}
    for text, owner in zip(rs.gallery.texts, rs.gallery.owner):
        lookup.setdefault(_key(text), set()).add(owner)
    for i, cid in enumerate(tree_ids):
        lookup.setdefault(_key(cid), set()).add(i)
    top1 = top5 = 0
    for query, expected in zip(rs.queries, rs.expected):
        hits = sorted(lookup.get(_key(query), ()), key=lambda i: tree_ids[i])
        top1 += hits[:1] == [expected]
        top5 += expected in hits[:5]
    n = len(rs.queries)
    return {"top1": top1 / n if n else float("nan"), "top5": top5 / n if n else float("nan"), "n": n}


def tree_resolve(rs: RetrievalSet, tree, embedder=None) -> dict[str, float]:
    """:meth:`KnowledgeTree.resolve` on ``tree`` (which holds exactly the gallery's dictionary),
    optionally with an embedding fallback (``embedder``)."""
    cindex = {c: i for i, c in enumerate(rs.gallery.concept_ids)}
    top1 = top5 = 0
    for query, expected in zip(rs.queries, rs.expected):
        try:
            res = tree.resolve(query, min_confidence=0.0, embedder=embedder)
        except Exception:  # an unusable prompt counts as a miss  # noqa: BLE001
            continue
        ranked = [cindex[c] for c, _ in res.candidates if c in cindex]
        if res.concept_id in cindex:
            ranked = [cindex[res.concept_id]] + [r for r in ranked if r != cindex[res.concept_id]]
        top1 += ranked[:1] == [expected]
        top5 += expected in ranked[:5]
    n = len(rs.queries)
    return {"top1": top1 / n if n else float("nan"), "top5": top5 / n if n else float("nan"), "n": n}


def training_dictionary_tree(tree, split: SynonymSplit):
    """A copy of ``tree`` whose concepts keep only their training-split synonyms."""
    from unisegtext.knowledge import KnowledgeTree

    keep: dict[str, list[str]] = {}
    for cid, synonym in split.train:
        keep.setdefault(cid, []).append(synonym)
    concepts = {cid: dataclasses.replace(c, synonyms=tuple(keep.get(cid, ()))) for cid, c in tree.concepts.items()}
    return KnowledgeTree(concepts, tree.metadata)


def retrieval_table(
    tree,
    *,
    adapter_path: str | Path | None = None,
    prompts: list[tuple[str, str]] | None = None,
    split_part: str = "test",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    with_resolve: bool = True,
) -> dict[str, Any]:
    """All figures of the table as a dict ``{query set: {method: {"top1", "top5", "n"}}}``.

    Args:
        tree: the knowledge tree (the packaged one for the published figures).
        adapter_path: a knowledge-pre-trained adapter folder (default: the shipped one).
        prompts: (prompt, expected id) rows; None skips the free-text set.
        split_part: "test" (published figures) or "val".
        limit: evaluate only the first ``limit`` queries of each set (smoke tests).
        cache_dir: base-embedding cache (default: the training config's).
        with_resolve: add the ``tree.resolve`` reference row.
    """
    from safetensors.torch import load_file

    from unisegtext.training.text_pretrain import build_adapter

    folder = Path(adapter_path) if adapter_path is not None else default_adapter_path()
    meta = read_adapter_meta(folder)
    if meta.get("ontology_version") != tree.version:
        logger.warning(
            "the adapter was trained on knowledge tree %s, evaluating on %s: the split is hash-based "
            "per (concept, synonym) and stays held out, but retrain for current figures",
            meta.get("ontology_version"), tree.version,
        )
    split_cfg = meta["split"]
    split = split_synonyms(tree, split_cfg["test_fraction"], split_cfg["val_fraction"], split_cfg["split_seed"])
    text_cfg = TextPretrainConfig(preset=meta.get("preset", "nano")).text_config()
    text_cfg = dataclasses.replace(
        text_cfg, base=meta["base"], pooling=meta["pooling"], max_length=meta["max_length"],
        adapter_dim=meta["adapter_dim"], template=meta["template"],
    )
    adapter = build_adapter(meta["hidden_size"], meta["adapter_dim"])
    adapter.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    adapter.eval()

    sets = {"held-out synonyms": synonym_sets(tree, split, split_part, text_cfg.template)}
    if prompts is not None:
        sets["free text"] = free_text_sets(tree, prompts, text_cfg.template)
    if limit is not None:
        sets = {k: [dataclasses.replace(rs, queries=rs.queries[:limit], expected=rs.expected[:limit]) for rs in v] for k, v in sets.items()}
    store = BaseEmbeddingStore(text_cfg, cache_dir if cache_dir is not None else TextPretrainConfig().cache_dir)
    ids = sorted(tree.concepts)
    table: dict[str, Any] = {}
    for set_name, (names_set, full_set) in sets.items():
        rows: dict[str, dict[str, float]] = {"exact string": exact_string(full_set, ids)}
        if with_resolve:
            start = time.time()
            dictionary = training_dictionary_tree(tree, split) if set_name == "held-out synonyms" else tree
            rows["tree.resolve (normalised + fuzzy)"] = tree_resolve(full_set, dictionary)
            store.embed(full_set.queries)  # cache the queries once
            for label, module in (("base MiniLM", None), ("knowledge", adapter)):
                rows[f"tree.resolve + {label} fallback"] = tree_resolve(full_set, dictionary, AdaptedEmbedder(module, store))
            logger.info("tree.resolve on %s: %.0f s", set_name, time.time() - start)
        for label, module in (("base MiniLM", None), ("knowledge-enhanced", adapter)):
            scores = evaluate_retrieval([names_set, full_set], store, module)
            rows[f"{label} (names)"] = scores[names_set.name]
            rows[f"{label} (names+syn)"] = scores[full_set.name]
        table[set_name] = rows
    return {
        "table": table,
        "adapter": str(folder),
        "ontology_version": tree.version,
        "adapter_ontology_version": meta.get("ontology_version"),
        "split": {**split_cfg, "evaluated": split_part},
    }


def format_table(result: dict[str, Any]) -> str:
    """The figures as a fixed-width text table."""
    table = result["table"]
    sets = list(table)
    methods = list(dict.fromkeys(m for rows in table.values() for m in rows))
    width = max(len(m) for m in methods) + 2
    head = f"{'method':<{width}}" + "".join(f"{s + ' (n=' + str(next(iter(table[s].values()))['n']) + ')':>30}" for s in sets)
    sub = f"{'':<{width}}" + "".join(f"{'top-1':>15}{'top-5':>15}" for _ in sets)
    lines = [head, sub]
    for m in methods:
        cells = "".join(
            f"{table[s][m]['top1']:>15.1%}{table[s][m]['top5']:>15.1%}" if m in table[s] else f"{'-':>15}{'-':>15}" for s in sets
        )
        lines.append(f"{m:<{width}}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=None, help="adapter folder (default: the shipped one)")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="hand-written prompt TSV")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="held-out synonym split")
    parser.add_argument("--limit", type=int, default=None, help="first N queries of each set only")
    parser.add_argument("--cache-dir", type=Path, default=None, help="base-embedding cache folder")
    parser.add_argument("--no-resolve", action="store_true", help="skip the tree.resolve reference row")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from unisegtext.knowledge import load_tree

    tree = load_tree()
    prompts = read_prompt_tsv(args.prompts) if args.prompts else None
    result = retrieval_table(
        tree, adapter_path=args.adapter, prompts=prompts, split_part=args.split, limit=args.limit,
        cache_dir=args.cache_dir, with_resolve=not args.no_resolve,
    )
    print(f"knowledge tree {result['ontology_version']} ({len(tree)} concepts); adapter {result['adapter']} "
          f"(trained on tree {result['adapter_ontology_version']}); held-out synonyms: {args.split} split "
          f"(fraction {result['split']['test_fraction' if args.split == 'test' else 'val_fraction']}, "
          f"seed {result['split']['split_seed']}); free text: {args.prompts}")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
