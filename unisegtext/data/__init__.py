"""Dataset registry, layout readers and the harmonised training cache.

    from unisegtext.data import load_registry, get_reader, prepare_dataset
    descriptor = load_registry()["la_mri_2018"]
    samples = get_reader(descriptor).samples("/data/la_mri")
    case = samples[0].load()          # CaseData: image (C, X, Y, Z), label (X, Y, Z), affine

Everything here is torch-free; submodules are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Descriptor": "registry",
    "Layout": "registry",
    "FAMILIES": "registry",
    "load_registry": "registry",
    "load_descriptor": "registry",
    "get_descriptor": "registry",
    "Reader": "readers",
    "Sample": "readers",
    "CaseData": "readers",
    "get_reader": "readers",
    "register_reader": "readers",
    "CheckReport": "check",
    "check_dataset": "check",
    "PrepareResult": "prepare",
    "CachedCase": "prepare",
    "prepare_dataset": "prepare",
    "load_cache_index": "prepare",
    "load_cached_case": "prepare",
    "reorient_to_ras": "prepare",
    "resample_to_spacing": "prepare",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"unisegtext.data.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'unisegtext.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
