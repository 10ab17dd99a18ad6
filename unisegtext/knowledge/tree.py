"""The knowledge tree: concepts, hierarchy, mask composition and prompt resolution.

Torch-free: imports only the standard library, plus rapidfuzz (fuzzy matching) and numpy
(embedding search) inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from unisegtext.errors import PromptError, UnknownConceptError
from unisegtext.knowledge.concept import Concept, Resolution
from unisegtext.knowledge.normalize import normalize, token_key

log = logging.getLogger(__name__)

#: confidence of each resolution step
CONFIDENCE = {"exact": 1.0, "synonym": 1.0, "normalised": 0.95, "normalised_loose": 0.9}
#: fuzzy scores are capped below the normalised ones, so a guess never looks certain
FUZZY_CAP = 0.89
DEFAULT_MIN_CONFIDENCE = 0.75

Embedder = Callable[[Sequence[str]], Any]  # texts -> array (N, D)


class KnowledgeTree:
    """Concepts of the ontology with lookup, hierarchy queries and prompt resolution.

    Args:
        concepts: concept id -> :class:`Concept`.
        metadata: the compiled file's metadata (version, attribution, sources).

    Use :func:`load_tree` to get the packaged tree.
    """

    def __init__(self, concepts: dict[str, Concept], metadata: dict[str, Any] | None = None):
        self.concepts: dict[str, Concept] = dict(concepts)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._children: dict[str, list[str]] | None = None
        self._index: _Index | None = None
        self._embedding_cache: dict[int, tuple[Any, list[str], Any]] = {}

    # ------------------------------------------------------------------ basics
    @property
    def version(self) -> str:
        """Version of the compiled tree ("0.1.0+<content hash>")."""
        return str(self.metadata.get("version", "unknown"))

    def __len__(self) -> int:
        return len(self.concepts)

    def __contains__(self, concept_id: object) -> bool:
        return isinstance(concept_id, str) and concept_id in self.concepts

    def __iter__(self):
        return iter(self.concepts.values())

    def __repr__(self) -> str:
        return f"KnowledgeTree({len(self)} concepts, version={self.version!r})"

    def get(self, concept_id: str) -> Concept:
        """The concept with this id.

        Raises:
            UnknownConceptError: the id is not in the tree; ``.suggestions`` lists close ids
                (TotalSegmentator class names point to their concept).
        """
        concept = self.concepts.get(concept_id) if isinstance(concept_id, str) else None
        if concept is not None:
            return concept
        text = str(concept_id)
        suggestions = self.suggest(text, k=5)
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        raise UnknownConceptError(
            f"unknown concept id {text!r}: ids are snake_case with laterality as a suffix "
            f"(e.g. 'kidney_left'); use resolve() for free text.{hint}",
            query=text,
            suggestions=suggestions,
        )

    # ------------------------------------------------------------------ hierarchy
    def _child_map(self) -> dict[str, list[str]]:
        if self._children is None:
            children: dict[str, set[str]] = defaultdict(set)
            for concept in self.concepts.values():
                for parent in (*concept.is_a, *concept.part_of):
                    children[parent].add(concept.id)
                for member in concept.union_of:
                    children[concept.id].add(member)
            self._children = {k: sorted(v) for k, v in children.items()}
        return self._children

    def children(self, concept_id: str) -> list[str]:
        """Direct children: concepts whose is_a / part_of names it, and its union_of members."""
        self.get(concept_id)
        return list(self._child_map().get(concept_id, []))

    def parents(self, concept_id: str) -> list[str]:
        """Direct parents: is_a, part_of and the grouping concepts it is a union member of."""
        concept = self.get(concept_id)
        groups = [c.id for c in self.concepts.values() if concept_id in c.union_of]
        return list(dict.fromkeys([*concept.is_a, *concept.part_of, *sorted(groups)]))

    def descendants(self, concept_id: str) -> list[str]:
        """All concepts below this one (transitive; via is_a, part_of and union_of), BFS order."""
        self.get(concept_id)
        child_map = self._child_map()
        seen: dict[str, None] = {}
        queue = deque(child_map.get(concept_id, []))
        while queue:
            cid = queue.popleft()
            if cid in seen or cid == concept_id:
                continue
            seen[cid] = None
            queue.extend(child_map.get(cid, []))
        return list(seen)

    def ancestors(self, concept_id: str) -> list[str]:
        """All concepts above this one (transitive; via is_a, part_of and union membership)."""
        self.get(concept_id)
        member_of: dict[str, list[str]] = defaultdict(list)
        for concept in self.concepts.values():
            for member in concept.union_of:
                member_of[member].append(concept.id)
        seen: dict[str, None] = {}
        queue = deque([concept_id])
        while queue:
            cid = queue.popleft()
            concept = self.concepts.get(cid)
            if concept is None:
                continue
            for parent in (*concept.is_a, *concept.part_of, *sorted(member_of.get(cid, []))):
                if parent not in seen and parent != concept_id:
                    seen[parent] = None
                    queue.append(parent)
        return list(seen)

    def expand_union(self, concept_id: str, available: Collection[str]) -> list[str]:
        """Concepts in ``available`` whose union forms ``concept_id``.

        Args:
            concept_id: the wanted concept ("kidney").
            available: concept ids that exist as separate masks, e.g. the classes a model or
                dataset has ({"kidney_left", "kidney_right", "liver"}).

        Returns:
            ``[concept_id]`` if it is available; else its explicit ``union_of`` members,
            expanded recursively; else the maximal available descendants (via is_a, part_of,
            union_of). Empty when none is available.
        """
        self.get(concept_id)
        wanted = set(available)
        return list(dict.fromkeys(self._expand(concept_id, wanted, set())))

    def _expand(self, concept_id: str, available: set[str], visiting: set[str]) -> list[str]:
        if concept_id in available:
            return [concept_id]
        if concept_id in visiting:
            return []
        visiting = visiting | {concept_id}
        concept = self.concepts.get(concept_id)
        if concept is None:
            return []
        if concept.union_of:
            out: list[str] = []
            for member in concept.union_of:
                out.extend(self._expand(member, available, visiting))
            if out:
                return out
        out = []
        child_map = self._child_map()
        seen = set(visiting)
        queue = deque(child_map.get(concept_id, []))
        while queue:
            cid = queue.popleft()
            if cid in seen:
                continue
            seen.add(cid)
            if cid in available:
                out.append(cid)
                continue
            queue.extend(child_map.get(cid, []))
        return out

    # ------------------------------------------------------------------ resolution
    def _idx(self) -> _Index:
        if self._index is None:
            self._index = _Index(self.concepts)
        return self._index

    def resolve(
        self,
        text: str,
        *,
        min_confidence: float = DEFAULT_MIN_CONFIDENCE,
        embedder: Embedder | None = None,
    ) -> Resolution:
        """Resolve free text to a concept.

        Order: concept id -> preferred name (case-insensitive) -> synonym -> normalised text
        (case, punctuation, UK/US spelling, plurals, abbreviations, laterality forms such as
        "R kidney", "rt. kidney", "kidney, left", "left-sided kidney") -> fuzzy match
        (rapidfuzz) -> embedding nearest neighbour when ``embedder`` is given.

        Args:
            text: the prompt ("rt kidney", "hepatic segment VII", "LAD").
            min_confidence: below this the result has ``concept=None`` and ``how="none"``
                (the candidates are still listed).
            embedder: optional callable mapping a list of texts to an array (N, D) of vectors
                (e.g. a sentence encoder); concept vectors are computed once per embedder.

        Returns:
            A :class:`Resolution`; check ``.concept`` (None when nothing was confident).

        Raises:
            PromptError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise PromptError(f"a prompt must be a string, got {type(text).__name__}: {text!r}")
        query = text.strip()
        if not query:
            return Resolution(text, None, None, "none", 0.0, [])
        idx = self._idx()
        if query in self.concepts:
            return self._hit(text, query, "exact", 1.0)
        folded = query.casefold()
        if folded in idx.exact:
            return self._hit(text, idx.exact[folded], "exact", CONFIDENCE["exact"])
        ambiguous: list[str] = []
        ids = idx.synonym.get(folded)
        if ids and len(ids) == 1:
            return self._hit(text, next(iter(ids)), "synonym", CONFIDENCE["synonym"])
        ambiguous.extend(sorted(ids or ()))
        key1 = normalize(query)
        ids = idx.norm1.get(key1)
        if ids and len(ids) == 1:
            return self._hit(text, next(iter(ids)), "normalised", CONFIDENCE["normalised"])
        ambiguous.extend(sorted(ids or ()))
        key2 = token_key(query)
        ids = idx.norm2.get(key2)
        if ids and len(ids) == 1:
            return self._hit(text, next(iter(ids)), "normalised", CONFIDENCE["normalised_loose"])
        if ids:
            # several concepts share the loose key ("cardiac" -> heart, heart muscle): keep the
            # one that is named by exactly those words
            plain = ids & idx.norm1.get(key2, set())
            if len(plain) == 1:
                return self._hit(text, next(iter(plain)), "normalised", CONFIDENCE["normalised_loose"])
        ambiguous.extend(sorted(ids or ()))

        candidates = idx.fuzzy(key1, key2, limit=10)
        for cid in dict.fromkeys(ambiguous):
            candidates.insert(0, (cid, 0.7))
        candidates = _merge(candidates)
        how = "fuzzy"
        if embedder is not None:
            emb = self._embedding_candidates(query, embedder, k=10)
            if emb and (not candidates or emb[0][1] > candidates[0][1]):
                candidates = _merge(emb + candidates)
                how = "embedding"
        if candidates and candidates[0][1] >= min_confidence:
            best, score = candidates[0]
            return Resolution(text, self.concepts[best], best, how, score, candidates[:10])  # type: ignore[arg-type]
        return Resolution(text, None, None, "none", candidates[0][1] if candidates else 0.0, candidates[:10])

    def _hit(self, text: str, concept_id: str, how: str, confidence: float) -> Resolution:
        return Resolution(text, self.concepts[concept_id], concept_id, how, confidence, [(concept_id, confidence)])  # type: ignore[arg-type]

    def _embedding_candidates(self, query: str, embedder: Embedder, k: int) -> list[tuple[str, float]]:
        import numpy as np

        key = id(embedder)
        if key not in self._embedding_cache:
            texts, owners = [], []
            for concept in self.concepts.values():
                for label in (concept.name, *concept.synonyms[:4]):
                    texts.append(label)
                    owners.append(concept.id)
            matrix = np.asarray(embedder(texts), dtype=np.float32)
            matrix /= np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12
            self._embedding_cache[key] = (embedder, owners, matrix)
        _, owners, matrix = self._embedding_cache[key]
        vector = np.asarray(embedder([query]), dtype=np.float32).reshape(-1)
        vector /= np.linalg.norm(vector) + 1e-12
        scores = matrix @ vector
        order = np.argsort(-scores)[: k * 5]
        out: dict[str, float] = {}
        for i in order:
            cid = owners[int(i)]
            if cid not in out:
                out[cid] = float(max(0.0, min(FUZZY_CAP, scores[int(i)])))
            if len(out) >= k:
                break
        return list(out.items())

    def search(self, text: str, k: int = 10) -> list[tuple[Concept, float]]:
        """Concepts matching ``text``, best first, with a 0..1 score (for browsing and agents)."""
        resolution = self.resolve(text, min_confidence=1.1)
        out: dict[str, float] = {}
        if resolution.how != "none" and resolution.concept_id:
            out[resolution.concept_id] = resolution.confidence
        direct = self.resolve(text)
        if direct.concept_id:
            out.setdefault(direct.concept_id, direct.confidence)
        for cid, score in direct.candidates:
            out.setdefault(cid, score)
        if len(out) < k:
            for cid, score in self._idx().fuzzy(normalize(text), token_key(text), limit=k * 2):
                out.setdefault(cid, score)
        ranked = sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return [(self.concepts[cid], score) for cid, score in ranked]

    def suggest(self, text: str, k: int = 5) -> list[str]:
        """Concept ids close to ``text`` (for "did you mean" messages)."""
        if not isinstance(text, str) or not text.strip():
            return []
        idx = self._idx()
        out = [cid for cid, _ in idx.fuzzy(normalize(text), token_key(text), limit=k * 2)]
        snake = text.strip().casefold().replace(" ", "_")
        if snake in idx.id_alias:
            out.insert(0, idx.id_alias[snake])
        return list(dict.fromkeys(out))[:k]


def _merge(candidates: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """Best score per concept, best first; ties keep their incoming order."""
    best: dict[str, float] = {}
    for cid, score in candidates:
        if score > best.get(cid, -1.0):
            best[cid] = score
    return sorted(best.items(), key=lambda kv: -kv[1])


class _Index:
    """Lookup tables for resolution, built once per tree."""

    def __init__(self, concepts: dict[str, Concept]):
        self.exact: dict[str, str] = {}
        self.synonym: dict[str, set[str]] = defaultdict(set)
        self.norm1: dict[str, set[str]] = defaultdict(set)
        self.norm2: dict[str, set[str]] = defaultdict(set)
        self.id_alias: dict[str, str] = {}
        for concept in concepts.values():
            self.exact.setdefault(concept.id.casefold(), concept.id)
        for concept in concepts.values():
            self.exact.setdefault(concept.name.casefold(), concept.id)
        for concept in concepts.values():
            texts = [concept.id.replace("_", " "), concept.name, *concept.synonyms]
            for syn in concept.synonyms:
                self.synonym[syn.casefold()].add(concept.id)
            for name in concept.totalseg:
                self.synonym[name.casefold()].add(concept.id)
                self.id_alias.setdefault(name.casefold(), concept.id)
                texts.append(name.replace("_", " "))
            for text in texts:
                key1 = normalize(text)
                if key1:
                    self.norm1[key1].add(concept.id)
                key2 = token_key(text)
                if key2:
                    self.norm2[key2].add(concept.id)
        self.keys: list[str] = sorted(self.norm1)
        self.key_owner: list[tuple[str, ...]] = [tuple(sorted(self.norm1[k])) for k in self.keys]
        self.keys2: list[str] = sorted(self.norm2)
        self.key2_owner: list[tuple[str, ...]] = [tuple(sorted(self.norm2[k])) for k in self.keys2]
        self.postings: dict[str, set[int]] = defaultdict(set)
        for i, key in enumerate(self.keys2):
            for word in key.partition("|")[0].split():
                self.postings[word].add(i)

    def subset(self, key2: str) -> dict[str, tuple[float, int]]:
        """Concepts whose loose key contains every word of the query (a shortened name such
        as "right coronary" for "right coronary artery"); score grows with the share of the
        name the query covers, at most 0.89."""
        base, _, side = key2.partition("|")
        words = base.split()
        if not words or any(w not in self.postings for w in words):
            return {}
        hits = set.intersection(*(self.postings[w] for w in words))
        out: dict[str, tuple[float, int]] = {}
        for i in hits:
            key_base, _, key_side = self.keys2[i].partition("|")
            if side and key_side != side:
                continue
            coverage = len(words) / len(key_base.split())
            score = 0.75 + 0.14 * coverage
            if key_side != side:
                score *= 0.95
            if len(self.key2_owner[i]) > 1:
                score *= 0.9
            for cid in self.key2_owner[i]:
                entry = (min(FUZZY_CAP, score), -len(self.keys2[i]))
                if entry > out.get(cid, (0.0, 0)):
                    out[cid] = entry
        return out

    def fuzzy(self, key1: str, key2: str, limit: int = 10) -> list[tuple[str, float]]:
        """Fuzzy candidates (concept id, confidence <= FUZZY_CAP) for normalised query keys."""
        if not key1 and not key2:
            return []
        from rapidfuzz import fuzz, process

        side = key1.partition("|")[2]
        out: dict[str, tuple[float, int]] = {}
        # whole-string similarity only: partial/subset scorers would let "enlarged spleen" or
        # any word contained in a long name look like a confident match
        for query, keys, owners, scorer in (
            (key1, self.keys, self.key_owner, fuzz.ratio),
            (key2, self.keys2, self.key2_owner, fuzz.token_sort_ratio),
        ):
            if not query:
                continue
            for _, score, i in process.extract(query, keys, scorer=scorer, limit=limit * 3):
                key_side = keys[i].partition("|")[2]
                factor = 1.0 if key_side == side else 0.8
                if len(owners[i]) > 1:
                    factor *= 0.9  # a text several concepts share is weak evidence for each
                conf = min(FUZZY_CAP, factor * score / 100.0)
                for cid in owners[i]:
                    previous = out.get(cid)
                    if previous is None or (conf, -len(keys[i])) > previous:
                        out[cid] = (conf, -len(keys[i]))
        for cid, entry in self.subset(key2).items():
            if entry > out.get(cid, (0.0, 0)):
                out[cid] = entry
        # ties go to the shorter matching text ("pancreas" before "body of pancreas")
        ranked = sorted(out.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        return [(cid, score) for cid, (score, _) in ranked[:limit]]


def _default_path() -> Path:
    return Path(str(resources.files("unisegtext.knowledge").joinpath("ontology.json")))


@lru_cache(maxsize=4)
def _load(path: str) -> KnowledgeTree:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"knowledge tree file {file} not found; build it with `python -m knowledge_tree.build` "
            "or reinstall unisegtext"
        )
    document = json.loads(file.read_text(encoding="utf-8"))
    concepts = {cid: Concept.from_json(cid, data) for cid, data in document["concepts"].items()}
    tree = KnowledgeTree(concepts, document.get("metadata", {}))
    log.debug("loaded %d concepts from %s", len(tree), file)
    return tree


def load_tree(path: str | Path | None = None) -> KnowledgeTree:
    """Load a compiled knowledge tree (cached per path).

    Args:
        path: an ``ontology.json``; default: the one shipped in the package.

    Returns:
        The :class:`KnowledgeTree` (the same object on repeated calls).
    """
    return _load(str(Path(path).resolve() if path is not None else _default_path()))
