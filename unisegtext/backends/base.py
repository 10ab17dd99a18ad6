"""The backend interface: one door for every network that can answer a prompt.

A backend takes a :class:`~unisegtext.io.Volume` and knowledge-tree concept ids and returns one
float32 map per concept on the input grid (probabilities, or 0/1 for argmax models such as
TotalSegmentator). It declares what it can answer (`concepts()`, derived from the knowledge
tree's codes and class names, never typed by hand), its preprocessing contract and the licence
of its weights. Backends are found by name in a registry::

    from unisegtext.backends import get_backend
    backend = get_backend("totalsegmentator:total")            # weights from the cache
    maps = backend.predict(volume, ["liver", "vertebra_l1"])   # {concept id: (X, Y, Z) float32}

This module imports neither torch nor a network: listing backends and their concepts is cheap.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from unisegtext.errors import BackendError, did_you_mean

if TYPE_CHECKING:
    import numpy as np

    from unisegtext.io import Volume


class Backend(ABC):
    """A model that maps (volume, concept ids) to per-concept maps on the input grid.

    Attributes:
        name: registry name, e.g. "totalsegmentator:total".
        source: where the weights come from (a URL, a Hub id, "packaged").
        version: the weights' version (a release tag, a checkpoint hash).
        licence: the licence of the weights (SPDX id where there is one).
        modalities: the modalities the weights were trained on ("CT", "MR").
    """

    name: str = ""
    source: str = ""
    version: str = ""
    licence: str = ""
    modalities: tuple[str, ...] = ()

    @abstractmethod
    def concepts(self) -> list[str]:
        """Knowledge-tree concept ids this backend answers (no weights needed to list them)."""

    @abstractmethod
    def contract(self) -> dict[str, Any]:
        """The preprocessing contract: orientation, spacing_mm, normalisation, patch_size,
        tile_step_size and how the output returns to the input grid."""

    @abstractmethod
    def predict(self, volume: Volume, concepts: Sequence[str]) -> dict[str, np.ndarray]:
        """One float32 map per concept id, shape = volume.shape (the input grid).

        Raises:
            BackendError: a concept this backend cannot answer (with suggestions).
        """

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (for `unisegtext info --model` and the tools)."""
        return {
            "name": self.name,
            "source": self.source,
            "version": self.version,
            "licence": self.licence,
            "modalities": list(self.modalities),
            "n_concepts": len(self.concepts()),
            "contract": self.contract(),
        }

    def check_concepts(self, concepts: Iterable[str]) -> list[str]:
        """`concepts` as a de-duplicated list, or a BackendError naming those it cannot answer."""
        wanted = list(dict.fromkeys(concepts))
        known = set(self.concepts())
        unknown = [c for c in wanted if c not in known]
        if unknown:
            suggestions = [s for c in unknown for s in _close(c, sorted(known))]
            raise BackendError(
                f"backend {self.name!r} cannot answer {unknown}; it knows {len(known)} concepts."
                f"{did_you_mean(unknown[0], sorted(known))} List them with get_backend({self.name!r}).concepts()",
                suggestions=suggestions,
            )
        return wanted

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, licence={self.licence!r})"


def _close(name: str, choices: Sequence[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)


@lru_cache(maxsize=1)
def totalseg_name_index() -> dict[str, str]:
    """TotalSegmentator class name -> concept id, from the knowledge tree's `totalseg` fields."""
    from unisegtext.knowledge import load_tree

    index: dict[str, str] = {}
    for concept in load_tree():
        for class_name in concept.totalseg:
            if index.setdefault(class_name, concept.id) != concept.id:
                raise BackendError(f"knowledge tree: TotalSegmentator class {class_name!r} belongs to two "
                                   f"concepts ({index[class_name]}, {concept.id}); fix knowledge_tree/")
    return index


def concepts_for_class_names(class_names: Iterable[str], what: str) -> dict[str, str]:
    """class name -> concept id for a model's class map; every class must have a concept."""
    index = totalseg_name_index()
    missing = [n for n in class_names if n not in index]
    if missing:
        raise BackendError(
            f"{what}: {len(missing)} class(es) have no concept in the knowledge tree ({missing[:5]}); "
            "add them as `totalseg` names in knowledge_tree/ and rebuild it"
        )
    return {n: index[n] for n in class_names}


# ---------------------------------------------------------------- registry

BackendFactory = Callable[..., Backend]
_FACTORIES: dict[str, BackendFactory | str] = {}


def register_backend(name: str, factory: BackendFactory | str | None = None):
    """Register a backend factory under `name` (usable as a decorator).

    `factory` may be a "module:attribute" string, imported on first use, so that registering
    costs no import.
    """
    def add(obj: BackendFactory | str) -> BackendFactory | str:
        if name in _FACTORIES and _FACTORIES[name] is not obj:
            raise BackendError(f"backend {name!r} is already registered")
        _FACTORIES[name] = obj
        return obj

    return add(factory) if factory is not None else add


def _register_builtins() -> None:
    if _FACTORIES.get("__builtins_loaded__"):
        return
    _FACTORIES["__builtins_loaded__"] = "yes"
    from unisegtext.backends.totalseg.tasks import task_names

    for task in task_names():
        _FACTORIES.setdefault(f"totalsegmentator:{task}", "unisegtext.backends.totalseg.backend:TotalSegmentatorBackend")
    _FACTORIES.setdefault("unisegtext", "unisegtext.backends.native:UniSegTextBackend")


def backend_names() -> list[str]:
    """Every registered backend name."""
    _register_builtins()
    return sorted(k for k in _FACTORIES if not k.startswith("__"))


def get_backend(name: str, **kwargs: Any) -> Backend:
    """A backend by registry name, e.g. ``get_backend("totalsegmentator:total", weights=...)``.

    Keyword arguments go to the backend (for TotalSegmentator: `weights` (folder or zip),
    `cache_dir`, `device`, `allow_download`, `all_parts`). Loading weights is lazy: this call
    reads no checkpoint and downloads nothing.

    Raises:
        BackendError: unknown name, with the closest registered names as suggestions.
    """
    _register_builtins()
    names = backend_names()
    if name not in names:
        raise BackendError(
            f"unknown backend {name!r}; registered: {', '.join(names)}.{did_you_mean(name, names)}",
            suggestions=_close(name, names),
        )
    factory = _FACTORIES[name]
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
        _FACTORIES[name] = factory
    if name.startswith("totalsegmentator:"):
        kwargs.setdefault("task", name.split(":", 1)[1])
    return factory(**kwargs)
