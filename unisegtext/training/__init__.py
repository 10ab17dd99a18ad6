"""Joint multi-dataset training with partial labels.

    from unisegtext.training import TrainConfig, train
    train(TrainConfig.from_yaml("train/nano.yaml"), out_dir="runs/nano")

Command line: ``unisegtext train --config train/nano.yaml --out runs/nano`` or, on several
processes, ``torchrun --nproc_per_node N -m unisegtext.train --config ...``.
Submodules are imported on first use (no torch import at package import).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "train": "trainer",
    "TrainResult": "trainer",
    "TrainingError": "trainer",
    "WarmupCosine": "trainer",
    "partial_label_loss": "losses",
    "PatchDataset": "sampling",
    "PromptTexts": "sampling",
    "StepBatchSampler": "sampling",
    "collate": "sampling",
    "synthesize_image": "synthetic",
    "build_cache": "sources",
    "load_sources": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"unisegtext.training.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'unisegtext.training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
