"""Prompts answered by several models: a routing table, one run per model, one result.

``segment(scan, prompts, model="totalsegmentator:total")`` sends every prompt to one backend;
``model="auto"`` (or a list of models) sends each prompt to the first model in an ordered list
that knows its concept (directly, or as the union of concepts it knows) and whose weights are
at hand, runs each chosen model once for all of its prompts, and merges the masks on the input
grid. The order per modality is data (``unisegtext/backends/routing.json``), not code.

Our own network runs through the usual optimised path (:func:`unisegtext.segment` with the
concept ids as prompts); any other backend through :meth:`Backend.predict`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

from unisegtext.errors import UnknownConceptError
from unisegtext.inference.prompts import MIN_CONFIDENCE, _members, check_prompts
from unisegtext.inference.result import PromptResolution, SegmentationResult

logger = logging.getLogger(__name__)

NATIVE = "unisegtext"


def routing_table() -> dict[str, list[str]]:
    """Modality -> backend names, most preferred first (``unisegtext/backends/routing.json``)."""
    text = resources.files("unisegtext.backends").joinpath("routing.json").read_text()
    table = json.loads(text)
    return {k: list(v) for k, v in table["order"].items()}


def is_routed(model: Any) -> bool:
    """True when `model` names backends (a registered backend other than our own network,
    "auto", or a list) rather than one UniSegText checkpoint."""
    if isinstance(model, (list, tuple)):
        return True
    if not isinstance(model, str):
        return False
    if model == "auto":
        return True
    if ":" not in model:
        return False
    from unisegtext.backends import backend_names

    return model in backend_names()


@dataclass
class _Member:
    """A model chosen for a prompt and the concept ids it is asked for."""

    model: Any
    name: str
    concepts: list[str] = field(default_factory=list)


def _backend_name(spec: Any) -> str:
    from unisegtext.backends import backend_names

    if isinstance(spec, str) and spec in backend_names():
        return spec
    return NATIVE


def _candidates(model: Any, modality: str) -> list[Any]:
    if model == "auto":
        return routing_table().get(modality, [NATIVE])
    if isinstance(model, (list, tuple)):
        if not model:
            raise UnknownConceptError("model=[] names no model; pass one or more, or model='auto'")
        return list(model)
    return [model]


class _Models:
    """Backends by spec, built once per call; the native model loads through the model cache."""

    def __init__(self, device: Any, backend_options: dict[str, Any]):
        self.device = device
        self.options = backend_options
        self._built: dict[str, Any] = {}

    def concepts(self, spec: Any) -> list[str]:
        name = _backend_name(spec)
        if name == NATIVE:
            from unisegtext.inference.segment import load_model, pick_device

            net = load_model(None if spec == NATIVE else spec, pick_device(self.device))
            return list(net.config.concepts)
        return self.backend(spec).concepts()

    def backend(self, spec: str) -> Any:
        if spec not in self._built:
            from unisegtext.backends import get_backend

            options = dict(self.options.get(spec, {}))
            if self.device is not None and "device" not in options:
                options["device"] = str(self.device)
            self._built[spec] = get_backend(spec, **options)
        return self._built[spec]

    def ready(self, spec: Any, concepts: Sequence[str]) -> bool:
        if _backend_name(spec) == NATIVE:
            return True
        backend = self.backend(spec)
        check = getattr(backend, "weights_ready", None)
        return True if check is None else bool(check(concepts))


def segment_routed(
    volume: Any,
    prompts: Sequence[str] | str,
    model: Any,
    *,
    modality: str | None = None,
    device: Any = None,
    threshold: float | None = None,
    backend_options: dict[str, dict[str, Any]] | None = None,
    max_memory_gb: float | None = None,
    series_uid: str | None = None,
    channel: int | None = None,
    affine: np.ndarray | None = None,
    progress: bool = False,
    **native_kwargs: Any,
) -> SegmentationResult:
    """Segment with one or several backends (see the module docstring).

    Args:
        model: a backend name ("totalsegmentator:total"), "auto", or a list of backend names
            and UniSegText checkpoints in order of preference.
        backend_options: per backend name, keyword arguments for
            :func:`~unisegtext.backends.get_backend` (e.g. ``{"totalsegmentator:total":
            {"weights": "/data/Dataset291_...zip"}}``).
        native_kwargs: passed to :func:`unisegtext.segment` for prompts our network answers.

    Raises:
        UnknownConceptError: a prompt names no known structure, or no chosen model knows it
            (with the closest concepts they do know).
    """
    from unisegtext.inference.segment import segment
    from unisegtext.io import read_volume
    from unisegtext.knowledge import load_tree
    from unisegtext.resources import check_memory, estimate_run_memory

    t0 = time.perf_counter()
    prompts = check_prompts(prompts)
    vol = read_volume(volume, affine, modality=modality, channel=channel, series_uid=series_uid,
                      max_memory_gb=max_memory_gb)
    chosen_modality, how_modality = vol.decide_modality()
    if how_modality == "guessed":
        logger.warning("the modality was not given; %s was guessed from the intensities. Pass modality= "
                       "(CLI: --modality) if that is wrong", chosen_modality)
    from unisegtext.io import Volume

    vol = Volume(vol.array, vol.affine, chosen_modality, vol.header, vol.source, dict(vol.meta),
                 modality_source=how_modality)
    check_memory(estimate_run_memory(vol.shape, vol.spacing, (1.5, 1.5, 1.5), len(prompts), len(prompts)),
                 max_memory_gb, f"segmenting {vol.source or 'the scan'} {vol.shape}")

    tree = load_tree()
    models = _Models(device, backend_options or {})
    candidates = _candidates(model, chosen_modality)
    plan: dict[str, _Member] = {}
    resolutions: dict[str, PromptResolution] = {}
    for prompt in prompts:
        res = tree.resolve(prompt)
        if res.concept is None or res.confidence < MIN_CONFIDENCE:
            suggestions = tree.suggest(prompt, k=5)
            hint = f" Did you mean: {', '.join(repr(tree.get(s).name) for s in suggestions)}?" if suggestions else ""
            raise UnknownConceptError(f"prompt {prompt!r} does not name a known anatomical structure.{hint}",
                                      query=prompt, suggestions=suggestions)
        concept = res.concept
        skipped = []
        # a model that knows the concept (or every member of its explicit union) wins over one
        # that only knows some of its parts; only when none does, parts answer (with a warning)
        choices = [(spec, members, complete) for spec in candidates
                   for members, complete in [_cover(tree, concept, models.concepts(spec))] if members]
        choices.sort(key=lambda item: not item[2])
        for spec, members, complete in choices:
            if not models.ready(spec, members):
                skipped.append(_backend_name(spec))
                continue
            name = _backend_name(spec)
            key = name if name != NATIVE else f"{NATIVE}:{spec}"
            plan.setdefault(key, _Member(spec, name)).concepts.extend(m for m in members if m not in plan[key].concepts)
            warnings = []
            if res.how in ("fuzzy", "embedding"):
                warnings.append(f"{prompt!r} was read as {concept.name!r} ({res.how} match, confidence {res.confidence:.2f})")
            if skipped:
                warnings.append(f"answered by {name}: {', '.join(skipped)} know it but their weights are not installed")
            if not complete:
                warnings.append(f"no chosen model knows {concept.name!r} as a whole; answered by {name} as the union of "
                                f"its parts {', '.join(members)}, which may not cover all of it")
            resolutions[prompt] = PromptResolution(
                prompt, concept.id, concept.name, res.how, float(res.confidence),
                union_of=members if members != [concept.id] else [], text=[tree.get(m).name for m in members],
                warnings=warnings, answered_by=key,
            )
            break
        else:
            near = {_backend_name(spec): _closest(tree, concept, models.concepts(spec)) for spec in candidates}
            names = ", ".join(_backend_name(s) for s in candidates)
            why = f" (installed weights missing for: {', '.join(skipped)})" if skipped else ""
            raise UnknownConceptError(
                f"prompt {prompt!r} resolved to {concept.name!r} ({concept.id}), which none of the chosen models "
                f"({names}) can answer{why}. Closest concepts they know: "
                + "; ".join(f"{k}: {', '.join(v) or '-'}" for k, v in near.items()),
                query=prompt,
                suggestions=list(dict.fromkeys(c for v in near.values() for c in v)),
            )

    masks_by_concept: dict[tuple[str, str], np.ndarray] = {}
    scores_by_concept: dict[tuple[str, str], float] = {}
    answered: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {"read": time.perf_counter() - t0}
    for key, member in plan.items():
        t = time.perf_counter()
        if member.name == NATIVE:
            spec = None if member.model == NATIVE else member.model
            native = segment(vol, member.concepts, model=spec, device=device, threshold=threshold,
                             max_memory_gb=max_memory_gb, progress=progress, **native_kwargs)
            for concept in member.concepts:
                masks_by_concept[(key, concept)] = native.masks[concept]
                scores_by_concept[(key, concept)] = native.scores.get(concept, 0.0)
            answered[key] = {k: native.model.get(k) for k in ("name", "weights_sha256", "preset")}
            answered[key]["licence"] = "Apache-2.0"
        else:
            backend = models.backend(member.model)
            maps = backend.predict(vol, member.concepts)
            cut = 0.5 if threshold is None else float(threshold)
            for concept in member.concepts:
                masks_by_concept[(key, concept)] = maps[concept] > cut
                inside = maps[concept][masks_by_concept[(key, concept)]]
                scores_by_concept[(key, concept)] = float(inside.mean()) if inside.size else 0.0
            answered[key] = {k: v for k, v in backend.describe().items() if k in ("name", "source", "version", "licence")}
        timings[f"inference:{key}"] = time.perf_counter() - t

    masks: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    for prompt in prompts:
        r = resolutions[prompt]
        members = r.union_of or [r.concept_id]
        masks[prompt] = np.logical_or.reduce([masks_by_concept[(r.answered_by, c)] for c in members])
        scores[prompt] = max(scores_by_concept[(r.answered_by, c)] for c in members)
    timings["total"] = time.perf_counter() - t0
    name = model if isinstance(model, str) else "+".join(_backend_name(m) for m in model)
    return SegmentationResult(
        masks=masks,
        resolutions=resolutions,
        volume=vol,
        scores=scores,
        timings=timings,
        model={"name": name,
               "answered_by": {p: resolutions[p].answered_by for p in prompts},
               "backends": answered,
               "weights_sha256": ";".join(str(v.get("weights_sha256") or v.get("version") or "") for v in answered.values())},
        modality=chosen_modality,
        modality_source=how_modality,
    )


def _cover(tree: Any, concept: Any, known: Sequence[str]) -> tuple[list[str], bool]:
    """(members, complete): the concepts of `known` that answer all of `concept` (itself, or
    its explicit union); parts that cover only some of it never answer (see ``_members``)."""
    members = _members(tree, concept, list(known))
    return members, bool(members)


def _closest(tree: Any, concept: Any, known: Sequence[str]) -> list[str]:
    """Up to five concepts of `known` near `concept`: its parts and groups first, then by name."""
    known_set = set(known)
    related = [c for c in (*tree.descendants(concept.id), *tree.ancestors(concept.id)) if c in known_set]
    if related:
        return related[:5]
    return [c.id for c, _ in tree.search(concept.name, k=60) if c.id in known_set][:5]
