"""Prompts -> concepts -> the texts the model is queried with.

Resolution goes through the knowledge tree (torch-free). A concept the model was not
trained on directly is answered as the union of its trained parts ("kidney" = left + right
kidney). Weak or unknown prompts are refused with suggestions unless the caller asks for
open-vocabulary mode, which runs them with a warning: a medical tool never hides a guess.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from unisegtext.errors import PromptError, UnknownConceptError
from unisegtext.inference.result import PromptResolution

logger = logging.getLogger(__name__)

MIN_CONFIDENCE = 0.8
MAX_PROMPTS = 1024


def check_prompts(prompts: Sequence[str] | str) -> list[str]:
    """Validate the prompt list (a single string is accepted as one prompt)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or not isinstance(prompts, Sequence):
        raise PromptError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise PromptError('the prompt list is empty; pass at least one structure, e.g. ["liver"]')
    bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
    if bad:
        raise PromptError(f"prompts must be non-empty strings; got {bad[:3]!r}")
    if len(prompts) > MAX_PROMPTS:
        raise PromptError(f"{len(prompts)} prompts is more than the limit of {MAX_PROMPTS}; split the request")
    stripped = [" ".join(p.split()) for p in prompts]
    seen: dict[str, str] = {}
    duplicates = []
    for original, text in zip(prompts, stripped):
        key = text.casefold()
        if key in seen:
            duplicates.append(f"{seen[key]!r} and {original!r}")
        else:
            seen[key] = original
    if duplicates:
        raise PromptError(
            f"duplicate prompts: {'; '.join(duplicates)} name the same text (case and spaces are ignored); "
            "each prompt names one output mask, so give each structure once"
        )
    return [p.strip() for p in prompts]


def _members(tree, concept, trained: list[str]) -> list[str]:
    """The trained concepts that answer `concept`, or [] when they do not cover all of it.

    A concept defined as a union ("kidney" = left + right kidney, "lung" = left + right lung =
    the five lobes) is answered by its trained members whenever every member is covered, even
    if the model also learned the group itself, so that "kidney" is always exactly the union
    of "left kidney" and "right kidney"; otherwise the concept itself when trained. Some of a
    structure's parts never answer for the whole ("heart" is not its left atrium): that is
    refused, naming the parts.
    """
    if not trained:
        return [concept.id]
    others = [c for c in trained if c != concept.id]
    cover = union_cover(tree, concept.id, set(others))
    if concept.union_of and cover:
        return cover
    if concept.id in trained:
        return [concept.id]
    return []


def union_cover(tree, concept_id: str, available: set[str], _seen: frozenset[str] = frozenset()) -> list[str]:
    """Concepts of `available` whose union is exactly `concept_id`, following explicit
    ``union_of`` definitions only (recursively); [] when some member has no cover."""
    if concept_id in available:
        return [concept_id]
    if concept_id in _seen or concept_id not in tree:
        return []
    members = tree.get(concept_id).union_of
    if not members:
        return []
    out: list[str] = []
    for member in members:
        part = union_cover(tree, member, available, _seen | {concept_id})
        if not part:
            return []
        out += [m for m in part if m not in out]
    return out


def resolve_prompts(
    prompts: Sequence[str],
    trained_concepts: Sequence[str],
    template: str = "{name}",
    *,
    open_vocabulary: bool = False,
    min_confidence: float = MIN_CONFIDENCE,
    tree=None,
) -> list[PromptResolution]:
    """Resolve each prompt to a concept and decide which texts to query.

    Args:
        prompts: user texts.
        trained_concepts: concept ids the model was trained on; empty means "unknown" (a
            freshly initialised model), then every resolved concept is queried directly.
        template: the model's text template ("{name}").
        open_vocabulary: run unknown or weak prompts on their raw text instead of refusing.
        min_confidence: below this a fuzzy/embedding match counts as weak.
    """
    if tree is None:
        from unisegtext.knowledge import load_tree

        tree = load_tree()
    trained = list(trained_concepts)
    out: list[PromptResolution] = []
    for prompt in prompts:
        res = tree.resolve(prompt)
        weak = res.concept is None or res.confidence < min_confidence
        if weak:
            suggestions = [c for c in tree.suggest(prompt, k=5)]
            if not open_vocabulary:
                hint = f" Did you mean: {', '.join(repr(tree.get(s).name) for s in suggestions)}?" if suggestions else ""
                raise UnknownConceptError(
                    f"prompt {prompt!r} does not name a known anatomical structure"
                    f"{' confidently' if res.concept is not None else ''}.{hint} "
                    "Use one of the suggestions, search with `unisegtext knowledge search`, or pass "
                    "open_vocabulary=True (CLI: --open-vocabulary) to run it on its raw text.",
                    query=prompt,
                    suggestions=suggestions,
                )
            note = (
                f"{prompt!r} is not a known concept; running it as free text (open-vocabulary): "
                "the result is a guess of the text encoder"
            )
            out.append(
                PromptResolution(prompt, None, None, "open_vocabulary", float(res.confidence),
                                 text=[template.format(name=prompt)], warnings=[note])
            )
            continue
        concept = res.concept
        warnings = []
        if res.how in ("fuzzy", "embedding"):
            warnings.append(f"{prompt!r} was read as {concept.name!r} ({res.how} match, confidence {res.confidence:.2f})")
        members = _members(tree, concept, trained)
        if not members:
            if not open_vocabulary:
                near = [c for c in trained if c in set(tree.descendants(concept.id)) | set(tree.ancestors(concept.id))][:5]
                raise UnknownConceptError(
                    f"prompt {prompt!r} resolved to {concept.name!r} ({concept.id}), which this model was "
                    f"not trained on, nor on every member of it.{' Related trained concepts (ask for them by name): ' + ', '.join(near) + '.' if near else ''} "
                    "Pass open_vocabulary=True to query it anyway (an untrained concept is a guess), or "
                    "`unisegtext info` to list what the model knows.",
                    query=prompt,
                    suggestions=near,
                )
            members = [concept.id]
            warnings.append(f"the model was not trained on {concept.id}; the mask is an open-vocabulary guess")
            how = "open_vocabulary"
        else:
            how = res.how
        if members != [concept.id]:
            warnings.append(f"{concept.name!r} is answered as the union of {', '.join(members)}")
        texts = [template.format(name=tree.get(m).name) for m in members]
        out.append(
            PromptResolution(
                prompt, concept.id, concept.name, how, float(res.confidence),
                union_of=members if members != [concept.id] else [], text=texts, warnings=warnings,
            )
        )
    for r in out:
        for w in r.warnings:
            logger.warning(w)
    return out
