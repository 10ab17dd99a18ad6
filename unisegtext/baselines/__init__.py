"""Baselines that UniSegText is compared with: an nnU-Net-style specialist (MONAI DynUNet).

    from unisegtext.baselines import plan_specialist, train_specialist
    plan = plan_specialist(spacing_mm=(1.5, 1.5, 1.5), median_shape=(80, 62, 37), num_classes=2)

Submodules are imported on first use (torch is only needed for training and prediction).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SpecialistPlan": "nnunet_plan",
    "plan_topology": "nnunet_plan",
    "plan_specialist": "nnunet_plan",
    "conv_feature_map_size": "nnunet_plan",
    "deep_supervision_weights": "nnunet_plan",
    "SpecialistCase": "specialist",
    "SpecialistResult": "specialist",
    "TrainBudget": "specialist",
    "load_cases_from_cache": "specialist",
    "load_cases_from_registry": "specialist",
    "train_specialist": "specialist",
    "predict_specialist": "specialist",
    "save_specialist": "specialist",
    "load_specialist": "specialist",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"unisegtext.baselines.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'unisegtext.baselines' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
