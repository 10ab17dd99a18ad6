"""Partial-label segmentation loss: Dice + BCE per prompt, over annotated prompts only.

Each (sample, prompt) pair is one binary problem. Pairs whose slot is padding, or whose
concept the sample's dataset does not annotate, carry ``valid = False`` and contribute
nothing (no gradient): an unannotated structure is unknown, never background. BCE is
averaged over the voxels of every valid pair; the soft Dice term is taken over valid pairs
whose target is non-empty (a negative prompt is taught by BCE, where an empty-target Dice
would be either degenerate or dominated by its smoothing constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    """The loss and its parts (detached parts for logging).

    Attributes:
        loss: scalar to back-propagate.
        bce: mean BCE over valid prompts.
        dice: mean soft Dice *loss* (1 - Dice) over valid positive prompts (nan-free: 0 if none).
        n_valid: number of valid prompts in the batch.
        n_positive: valid prompts with a non-empty target.
    """

    loss: torch.Tensor
    bce: float
    dice: float
    n_valid: int
    n_positive: int


def partial_label_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    smooth: float = 1e-5,
) -> LossParts:
    """Dice + BCE for text-prompted masks with partial labels.

    Args:
        logits: (B, P, X, Y, Z) raw scores.
        targets: (B, P, X, Y, Z) binary {0, 1} masks.
        valid: (B, P) bool, True where the prompt is a real, annotated concept.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing.

    Returns:
        :class:`LossParts`; ``loss`` is 0 (with a gradient path) when nothing is valid.
    """
    logits = logits.float()
    targets = targets.float()
    valid = valid.bool()
    b, p = valid.shape
    flat_logits = logits.reshape(b, p, -1)
    flat_targets = targets.reshape(b, p, -1)
    bce = F.binary_cross_entropy_with_logits(flat_logits, flat_targets, reduction="none").mean(-1)  # (B, P)
    probs = torch.sigmoid(flat_logits)
    intersection = (probs * flat_targets).sum(-1)
    denominator = probs.sum(-1) + flat_targets.sum(-1)
    dice_loss = 1.0 - (2.0 * intersection + smooth) / (denominator + smooth)  # (B, P)
    positive = valid & (flat_targets.sum(-1) > 0)
    n_valid, n_positive = int(valid.sum()), int(positive.sum())
    zero = logits.sum() * 0.0  # keeps the graph (DDP needs every step to reach all parameters)
    bce_term = bce[valid].mean() if n_valid else zero
    dice_term = dice_loss[positive].mean() if n_positive else zero
    loss = bce_term + dice_weight * dice_term
    return LossParts(
        loss=loss,
        bce=float(bce_term.detach()),
        dice=float(dice_term.detach()),
        n_valid=n_valid,
        n_positive=n_positive,
    )
