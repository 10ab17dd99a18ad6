"""What a run logs beyond its loss: per-source and per-concept figures, and whole-volume validation.

A model can fit its mean loss and still fail a structure, a dataset or the sliding window (the
first nano model drew a blob in every window and gave two concepts one mask). Two monitors
make such failures show in the training log:

* :class:`PairStats` gathers, over a logging interval, every (patch, prompt) pair by source
  and by concept: BCE, soft Dice loss, hard Dice of present prompts, and for absent prompts
  how often any voxel was predicted (``false_positive_rate``).
* :func:`validate` segments held-out scans of the training cache with the whole-volume
  sliding window, as :func:`unisegtext.segment` does, and scores every annotated concept on
  the model grid (Dice; for a concept absent from the scan, whether anything was predicted).
  It is a monitor, never a model selector.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


class PairStats:
    """Per-source and per-concept statistics of the training pairs of one logging interval."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._source: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._concept: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, pair_bce: torch.Tensor,
            pair_dice_loss: torch.Tensor, sources: Sequence[str], concepts: Sequence[Sequence[str]]) -> None:
        """Add one batch.

        Args:
            logits, targets: (B, P, X, Y, Z).
            valid: (B, P) bool.
            pair_bce, pair_dice_loss: (B, P) from :func:`~unisegtext.training.losses.partial_label_loss`.
            sources: B source ids; concepts: B lists of P concept ids.
        """
        b, p = valid.shape
        pred = (logits.detach() > 0).reshape(b, p, -1)
        ref = targets.reshape(b, p, -1) > 0.5
        inter = (pred & ref).sum(-1).float()
        n_pred, n_ref = pred.sum(-1).float(), ref.sum(-1).float()
        for i in range(b):
            src = self._source[sources[i]]
            src["patches"] += 1
            for j in range(p):
                if not bool(valid[i, j]):
                    continue
                con = self._concept[concepts[i][j]]
                src["pairs"] += 1
                src["bce"] += float(pair_bce[i, j])
                if n_ref[i, j] > 0:
                    dice = float(2 * inter[i, j] / (n_pred[i, j] + n_ref[i, j]))
                    src["positives"] += 1
                    src["dice_loss"] += float(pair_dice_loss[i, j])
                    src["dice"] += dice
                    con["positives"] += 1
                    con["dice"] += dice
                else:
                    fp = float(n_pred[i, j] > 0)
                    src["absent"] += 1
                    src["false_positive"] += fp
                    con["absent"] += 1
                    con["false_positive"] += fp

    def summary(self) -> dict[str, Any]:
        """{"sources": {id: {...}}, "concepts": {id: {...}}} with means (None when undefined)."""

        def mean(total: float, n: float) -> float | None:
            return round(total / n, 4) if n else None

        sources = {
            name: {
                "patches": int(v["patches"]), "pairs": int(v["pairs"]),
                "bce": mean(v["bce"], v["pairs"]), "dice_loss": mean(v["dice_loss"], v["positives"]),
                "dice": mean(v["dice"], v["positives"]), "positives": int(v["positives"]),
                "absent": int(v["absent"]), "false_positive_rate": mean(v["false_positive"], v["absent"]),
            }
            for name, v in sorted(self._source.items())
        }
        concepts = {
            name: {
                "dice": mean(v["dice"], v["positives"]), "positives": int(v["positives"]),
                "absent": int(v["absent"]), "false_positive_rate": mean(v["false_positive"], v["absent"]),
            }
            for name, v in sorted(self._concept.items())
        }
        return {"sources": sources, "concepts": concepts}


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two bool arrays; NaN when both are empty."""
    total = int(pred.sum()) + int(ref.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / total


@torch.no_grad()
def validate(model, cases: Sequence[Any], texts, *, overlap: float, device: torch.device,
             autocast_dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Whole-volume sliding-window validation on cached, held-out cases.

    Args:
        model: the :class:`~unisegtext.models.UniSegText` being trained (put in eval mode here
            and back in train mode at the end).
        cases: :class:`~unisegtext.training.sources.TrainingCase` items (normalised images at
            the model's spacing).
        texts: :class:`~unisegtext.training.sampling.PromptTexts` (the preferred name is asked).
        overlap: sliding-window overlap.
        device: where the model runs.
        autocast_dtype: bf16 autocast dtype, or None.

    Returns:
        One row per (case, concept): dataset, case, concept, dice (NaN when absent and nothing
        predicted), ref_voxels, pred_voxels, seconds.
    """
    from unisegtext.inference.preprocessing import PreparedVolume
    from unisegtext.inference.segment import predict_probabilities

    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for case in cases:
            t0 = time.perf_counter()
            concepts = list(case.annotated)
            prompts = [texts.name(c) for c in concepts]
            embeddings = model.encode_text(prompts).to(device)
            image = torch.from_numpy(case.image)[None]
            prepared = PreparedVolume(image=image, canonical_shape=tuple(case.image.shape), to_canonical=np.eye(3),
                                      from_canonical=np.eye(3), modality=case.modality,
                                      spacing_mm=(0.0, 0.0, 0.0), pad_value=case.pad_value)
            probs = predict_probabilities(model, prepared, embeddings, overlap=overlap, sw_batch_size=1,
                                          max_prompts_per_pass=32, autocast_dtype=autocast_dtype)
            masks = (probs > 0.5).cpu().numpy()
            seconds = time.perf_counter() - t0
            for k, concept in enumerate(concepts):
                ref = np.isin(case.label, case.targets[concept])
                rows.append({
                    "dataset": case.source, "case": case.case, "concept": concept,
                    "dice": dice_score(masks[k], ref), "ref_voxels": int(ref.sum()),
                    "pred_voxels": int(masks[k].sum()), "seconds": round(seconds / len(concepts), 3),
                })
    finally:
        model.train(was_training)
    return rows


def summarise_validation(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per dataset: mean Dice over present (case, concept) pairs, per-concept means, and the
    share of absent pairs with a non-empty prediction."""
    out: dict[str, Any] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        present = [r for r in mine if r["ref_voxels"] > 0]
        absent = [r for r in mine if r["ref_voxels"] == 0]
        per_concept: dict[str, list[float]] = defaultdict(list)
        for r in present:
            per_concept[r["concept"]].append(r["dice"])
        out[dataset] = {
            "mean_dice": round(float(np.mean([r["dice"] for r in present])), 4) if present else None,
            "concepts": {c: round(float(np.mean(v)), 4) for c, v in sorted(per_concept.items())},
            "absent_with_prediction": (round(sum(r["pred_voxels"] > 0 for r in absent) / len(absent), 4)
                                       if absent else None),
            "cases": len({r["case"] for r in mine}),
        }
    return out


def finite_or_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value
