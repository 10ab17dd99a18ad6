"""UniSegText: text-prompted universal 3D medical image segmentation.

    >>> from unisegtext import segment
    >>> result = segment("ct.nii.gz", ["liver", "kidney tumor", "left lung upper lobe"])

Heavy modules (torch, the model) load on first use, so `import unisegtext` is cheap and the
knowledge tree (`unisegtext.knowledge`) works without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "segment": "unisegtext.inference",
    "segment_many": "unisegtext.inference",
    "batch": "unisegtext.cohort",
    "read_manifest": "unisegtext.cohort",
    "SegmentationResult": "unisegtext.inference",
    "PromptResolution": "unisegtext.inference",
    "UniSegText": "unisegtext.models",
    "UniSegTextConfig": "unisegtext.models",
    "config_from_preset": "unisegtext.models",
    "Volume": "unisegtext.io",
    "read_volume": "unisegtext.io",
    "resolve": "unisegtext.knowledge",
    "load_tree": "unisegtext.knowledge",
    "example_path": "unisegtext.examples",
    "UniSegError": "unisegtext.errors",
    "VolumeError": "unisegtext.errors",
    "PromptError": "unisegtext.errors",
    "UnknownConceptError": "unisegtext.errors",
    "ModelLoadError": "unisegtext.errors",
    "ConfigError": "unisegtext.errors",
    "DataError": "unisegtext.errors",
    "ManifestError": "unisegtext.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'unisegtext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
