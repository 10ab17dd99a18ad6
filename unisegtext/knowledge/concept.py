"""Records of the knowledge tree: :class:`Concept` and :class:`Resolution`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ResolutionMethod = Literal["exact", "synonym", "normalised", "fuzzy", "embedding", "none"]


@dataclass(frozen=True, eq=True)
class Concept:
    """One concept of the knowledge tree (an anatomical structure, a lesion or a grouping).

    Attributes:
        id: stable snake_case id, laterality as a suffix ("kidney_left").
        name: preferred radiology name ("left kidney").
        synonyms: exact equivalents (abbreviations, Latin/Greek forms, other spellings).
        definition: one or two sentences.
        uberon: UBERON id ("UBERON:0004538") or None.
        is_a: kind-of parents (concept ids).
        part_of: whole-of parents (concept ids).
        located_in: for lesions, the organs they lie in.
        union_of: for grouping concepts, the members whose masks form this one.
        laterality: "left", "right" or None.
        modalities: modalities the structure is seen in ("CT", "MR", "PET").
        codes: ``{"dicom": {"category", "type", "modifier", ["region", "region_modifier"],
            "source"}, "snomed_xref": [...], "fma": [...], "ncit": [...]}``; each DICOM code is
            ``{"scheme", "value", "meaning"}`` (modifier may be None). Keys absent when unknown.
        single_component: True when normally one connected component, None when unknown.
        color: display colour (r, g, b), 0-255.
        system: body system ("abdomen", "heart", "lesions", ...).
        totalseg: TotalSegmentator class names that equal this concept.
    """

    id: str
    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    uberon: str | None = None
    is_a: tuple[str, ...] = ()
    part_of: tuple[str, ...] = ()
    located_in: tuple[str, ...] = ()
    union_of: tuple[str, ...] = ()
    laterality: str | None = None
    modalities: tuple[str, ...] = ("CT", "MR")
    codes: Mapping[str, Any] = field(default_factory=dict, compare=False)
    single_component: bool | None = None
    color: tuple[int, int, int] = (128, 128, 128)
    system: str = "body"
    totalseg: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash(self.id)

    @property
    def dicom(self) -> dict | None:
        """The DICOM SEG coding (category, type, modifier, source) or None if none is sourced."""
        return self.codes.get("dicom")

    @property
    def is_group(self) -> bool:
        """True for grouping concepts defined by an explicit ``union_of``."""
        return bool(self.union_of)

    @classmethod
    def from_json(cls, concept_id: str, data: Mapping[str, Any]) -> Concept:
        """Build a concept from its entry in ``ontology.json``."""
        return cls(
            id=concept_id,
            name=data["name"],
            synonyms=tuple(data.get("synonyms", ())),
            definition=data.get("definition", ""),
            uberon=data.get("uberon"),
            is_a=tuple(data.get("is_a", ())),
            part_of=tuple(data.get("part_of", ())),
            located_in=tuple(data.get("located_in", ())),
            union_of=tuple(data.get("union_of", ())),
            laterality=data.get("laterality"),
            modalities=tuple(data.get("modalities", ("CT", "MR"))),
            codes=dict(data.get("codes", {})),
            single_component=data.get("single_component"),
            color=tuple(data.get("color", (128, 128, 128))),  # type: ignore[arg-type]
            system=data.get("system", "body"),
            totalseg=tuple(data.get("totalseg", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for tool answers and ``unisegtext knowledge show``)."""
        return {
            "id": self.id,
            "name": self.name,
            "synonyms": list(self.synonyms),
            "definition": self.definition,
            "uberon": self.uberon,
            "is_a": list(self.is_a),
            "part_of": list(self.part_of),
            "located_in": list(self.located_in),
            "union_of": list(self.union_of),
            "laterality": self.laterality,
            "modalities": list(self.modalities),
            "codes": dict(self.codes),
            "single_component": self.single_component,
            "color": list(self.color),
            "system": self.system,
            "totalseg": list(self.totalseg),
        }


@dataclass(frozen=True)
class Resolution:
    """What a free-text prompt resolved to, and how.

    Attributes:
        query: the text that was given.
        concept: the concept, or None when nothing was confident enough.
        concept_id: ``concept.id`` or None.
        how: "exact" (id or preferred name), "synonym", "normalised" (after case, spelling,
            plural, abbreviation and laterality normalisation), "fuzzy", "embedding" or "none".
        confidence: 0..1; 1.0 for exact and synonym matches.
        candidates: (concept id, score 0..1), best first, for "did you mean" and review.
    """

    query: str
    concept: Concept | None
    concept_id: str | None
    how: ResolutionMethod
    confidence: float
    candidates: list[tuple[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when a concept was found."""
        return self.concept is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "concept_id": self.concept_id,
            "how": self.how,
            "confidence": round(self.confidence, 4),
            "candidates": [[c, round(s, 4)] for c, s in self.candidates],
        }
