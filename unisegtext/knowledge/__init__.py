"""The UniSegText knowledge tree (ontology): concepts, hierarchy and prompt resolution.

Torch-free. The tree is compiled from ``knowledge_tree/`` into ``ontology.json`` (shipped as
package data) and loaded on first use::

    from unisegtext.knowledge import load_tree, resolve
    resolve("rt. kidney").concept_id          # 'kidney_right'
    load_tree().expand_union("kidney", {"kidney_left", "kidney_right"})

Anatomy from UBERON (CC BY 3.0, uberon.github.io); see ``load_tree().metadata["attribution"]``.
"""

from __future__ import annotations

from unisegtext.knowledge.concept import Concept, Resolution
from unisegtext.knowledge.normalize import normalize, token_key
from unisegtext.knowledge.tree import DEFAULT_MIN_CONFIDENCE, Embedder, KnowledgeTree, load_tree

__all__ = [
    "Concept",
    "DEFAULT_MIN_CONFIDENCE",
    "Embedder",
    "KnowledgeTree",
    "Resolution",
    "descendants",
    "get",
    "load_tree",
    "normalize",
    "resolve",
    "search",
    "suggest",
    "token_key",
]


def resolve(text: str, *, min_confidence: float = DEFAULT_MIN_CONFIDENCE, embedder: Embedder | None = None) -> Resolution:
    """:meth:`KnowledgeTree.resolve` on the packaged tree."""
    return load_tree().resolve(text, min_confidence=min_confidence, embedder=embedder)


def get(concept_id: str) -> Concept:
    """:meth:`KnowledgeTree.get` on the packaged tree."""
    return load_tree().get(concept_id)


def descendants(concept_id: str) -> list[str]:
    """:meth:`KnowledgeTree.descendants` on the packaged tree."""
    return load_tree().descendants(concept_id)


def suggest(text: str, k: int = 5) -> list[str]:
    """:meth:`KnowledgeTree.suggest` on the packaged tree."""
    return load_tree().suggest(text, k=k)


def search(text: str, k: int = 10) -> list[tuple[Concept, float]]:
    """:meth:`KnowledgeTree.search` on the packaged tree."""
    return load_tree().search(text, k=k)
