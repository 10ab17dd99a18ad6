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
        pair_bce: (B, P) detached BCE of every (sample, prompt) pair.
        pair_dice_loss: (B, P) detached soft Dice loss of every pair.
        pair_positive: (B, P) bool, valid pairs whose target is not empty (the pairs of the
            Dice term).
    """

    loss: torch.Tensor
    bce: float
    dice: float
    n_valid: int
    n_positive: int
    pair_bce: torch.Tensor | None = None
    pair_dice_loss: torch.Tensor | None = None
    pair_positive: torch.Tensor | None = None


def partial_label_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    smooth: float = 1e-5,
    absent_topk_weight: float = 0.0,
    absent_topk_fraction: float = 0.02,
    absent_topk_floor: float | None = None,
    pair_weight: torch.Tensor | None = None,
) -> LossParts:
    """Dice + BCE for text-prompted masks with partial labels.

    Args:
        logits: (B, P, X, Y, Z) raw scores.
        targets: (B, P, X, Y, Z) binary {0, 1} masks.
        valid: (B, P) bool, True where the prompt is a real, annotated concept.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing.
        absent_topk_weight: weight of a top-k BCE term on prompts whose target is empty: the
            mean BCE of their `absent_topk_fraction` most confident voxels. Averaged over all
            voxels, a blob painted for an absent structure costs almost nothing (1 % of the
            patch at p = 0.9 adds 0.02 to the BCE), so without it the model learns to paint
            something for every prompt; over the top 2 % it costs as much as it should.
        absent_topk_floor: when set, only top-k voxels whose logit is above this value count
            (a hinge): an absent prompt's map is pushed under the floor and then left alone.
            Without it the term keeps pushing down every weak organ's best voxels in each patch
            that lacks the organ, and a structure still being learnt (the spleen, the
            gallbladder) never reaches the painting threshold where it is present.
        pair_weight: (B, P) non-negative weights of the pairs' Dice losses (the Dice term is
            then their weighted mean over positive pairs); None weighs every pair alike. See
            :class:`LaggingConceptWeights`.

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
    if n_positive and pair_weight is not None:
        w = pair_weight.to(dice_loss)[positive]
        dice_term = (dice_loss[positive] * w).sum() / w.sum().clamp_min(1e-8)
    else:
        dice_term = dice_loss[positive].mean() if n_positive else zero
    loss = bce_term + dice_weight * dice_term
    absent = valid & (flat_targets.sum(-1) == 0)
    if absent_topk_weight > 0 and bool(absent.any()):
        k = max(1, int(flat_logits.shape[-1] * absent_topk_fraction))
        # for an empty target the BCE of a voxel grows with its logit: the top-k logits are the hardest voxels
        top = torch.topk(flat_logits[absent], k, dim=-1).values
        penalty = F.softplus(top)
        if absent_topk_floor is not None:
            penalty = penalty * (top > absent_topk_floor)
        loss = loss + absent_topk_weight * penalty.mean()
    return LossParts(
        loss=loss,
        bce=float(bce_term.detach()),
        dice=float(dice_term.detach()),
        n_valid=n_valid,
        n_positive=n_positive,
        pair_bce=bce.detach(),
        pair_dice_loss=dice_loss.detach(),
        pair_positive=positive,
    )


class LaggingConceptWeights:
    """Weights of the Dice term per concept, from a running mean of each concept's soft Dice
    loss on its own training pairs: a concept that lags the others of its source weighs more.

    With per-pair Dice every positive pair weighs alike, and a structure the network has not
    started to separate yet (in v6 the left adrenal gland and the oesophagus: training Dice 0.00
    after 8,352 steps while the right adrenal gland was at 0.35) gets the same share of the
    gradient as the liver it already paints. The running means are kept per (source, concept),
    and the weight of concept ``c`` in source ``s`` is ``(ema_sc / mean over s's concepts of
    ema) ** power``, clipped to ``[1 / max_weight, max_weight]``; a pair not seen yet weighs 1.

    Why within each source: with one mean over all concepts, a source whose every concept
    lags (the TotalSegmentator example subject: 61 concepts from one scan) raises the mean, and
    the BTCV oesophagus, far behind the other BTCV organs, got a weight of only 1.2 in the probe
    of 2026-12-07 (``train/probes/lagging_probe.yaml``). The running means come from the training
    pairs only (never from validation scans), and the weights are applied through
    ``pair_weight`` of :func:`partial_label_loss`, whose weighted mean keeps the Dice term's scale.

    Each rank keeps its own running means (they see different batches); they start empty on a
    resume and fill within a few dozen steps.
    """

    def __init__(self, power: float, momentum: float = 0.98, max_weight: float = 4.0):
        if power < 0 or not 0 <= momentum < 1 or max_weight < 1:
            raise ValueError(f"need power >= 0, 0 <= momentum < 1, max_weight >= 1; got {power}, {momentum}, {max_weight}")
        self.power, self.momentum, self.max_weight = power, momentum, max_weight
        self.ema: dict[tuple[str, str], float] = {}  # (source, concept) -> running Dice loss
        self._mean: dict[str, float] = {}  # source -> mean of its concepts' running losses, refreshed by update()

    def weight(self, concept: str, source: str = "") -> float:
        key, mean = (source, concept), self._mean.get(source, 0.0)
        if key not in self.ema or self.power == 0 or mean <= 0:
            return 1.0
        w = (self.ema[key] / mean) ** self.power
        return float(min(self.max_weight, max(1.0 / self.max_weight, w)))

    def pair_weights(self, concepts: list[list[str]], valid: torch.Tensor,
                     sources: list[str] | None = None) -> torch.Tensor:
        """(B, P) weights for a batch's pairs (1 where the slot is padding or not annotated);
        ``sources`` names each sample's dataset (one group for all when omitted)."""
        b, p = valid.shape
        out = torch.ones((b, p), dtype=torch.float32)
        for i in range(b):
            source = sources[i] if sources else ""
            for j in range(p):
                if bool(valid[i, j]) and concepts[i][j]:
                    out[i, j] = self.weight(concepts[i][j], source)
        return out.to(valid.device)

    def update(self, concepts: list[list[str]], positive: torch.Tensor, pair_dice_loss: torch.Tensor,
               sources: list[str] | None = None) -> None:
        """Fold in the soft Dice losses of a batch's positive pairs (``positive``: (B, P) bool,
        valid pairs with a non-empty target, :attr:`LossParts.pair_positive`)."""
        b, p = positive.shape
        positive = positive.bool().cpu()
        losses = pair_dice_loss.detach().float().cpu()
        touched = set()
        for i in range(b):
            source = sources[i] if sources else ""
            for j in range(p):
                if bool(positive[i, j]):
                    key, x = (source, concepts[i][j]), float(losses[i, j])
                    self.ema[key] = x if key not in self.ema else self.momentum * self.ema[key] + (1 - self.momentum) * x
                    touched.add(source)
        for source in touched:
            values = [v for (s, _), v in self.ema.items() if s == source]
            self._mean[source] = sum(values) / len(values)

    def snapshot(self) -> dict[str, float]:
        """{"source/concept" (or "concept" without sources): current weight} (for the training log)."""
        return {(f"{s}/{c}" if s else c): round(self.weight(c, s), 3) for s, c in sorted(self.ema)}


def distinct_pairs(concepts: list[str]) -> torch.Tensor:
    """(K, 2) index pairs of concepts that must stay apart: distinct and neither one above the
    other in the knowledge tree (``kidney`` and ``kidney_left`` may share a query; ``kidney_left``
    and ``kidney_right``, or ``liver`` and ``urinary_bladder``, must not)."""
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    above = {c: set(tree.ancestors(c)) if c in tree else set() for c in concepts}
    pairs = [
        (i, j)
        for i in range(len(concepts))
        for j in range(i + 1, len(concepts))
        if concepts[j] not in above[concepts[i]] and concepts[i] not in above[concepts[j]]
    ]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def query_separation_loss(queries: torch.Tensor, pairs: torch.Tensor, margin: float) -> tuple[torch.Tensor, float]:
    """Summed squared excess of the cosine of distinct concepts' queries over `margin`.

    A sum, not a mean: of the ~2,000 pairs of 68 concepts nearly all are below the margin, and
    a mean over them would dilute the few violating pairs into a negligible gradient.

    Args:
        queries: (C, D) decoder queries of C concepts (their preferred names).
        pairs: (K, 2) indices of concept pairs that must stay apart (:func:`distinct_pairs`).
        margin: cosine allowed without penalty.

    Returns:
        (loss, largest cosine among the pairs).
    """
    if pairs.numel() == 0:
        return queries.sum() * 0.0, 0.0
    unit = F.normalize(queries.float(), dim=-1)
    cos = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(-1)
    return F.relu(cos - margin).square().sum(), float(cos.detach().max())


def related_concepts(concepts: list[str]) -> set[tuple[str, str]]:
    """Ordered pairs of concepts where one is above the other in the tree (may share a mask)."""
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    out = set()
    for concept in concepts:
        if concept in tree:
            for other in tree.ancestors(concept):
                out.add((concept, other))
                out.add((other, concept))
    return out


def mask_separation_loss(vectors: torch.Tensor, concepts: list[list[str]], valid: torch.Tensor,
                         related: set[tuple[str, str]], margin: float) -> tuple[torch.Tensor, float]:
    """Squared excess over `margin` of the cosine between the mask vectors of distinct,
    unrelated concepts prompted on the same patch, summed over the pairs of a patch and
    averaged over the patches.

    The decoder's image-dependent updates can swamp the text query, so that left and right
    kidney (or liver and spleen) end with one mask vector: the failure the query separation
    alone does not prevent. This term keeps the vectors the masks are made of apart.

    Args:
        vectors: (B, P, E) mask vectors.
        concepts: B lists of P concept ids ("" for padding).
        valid: (B, P) bool.
        related: pairs allowed to be close (:func:`related_concepts`).

    Returns:
        (loss, mean cosine over the pairs).
    """
    unit = F.normalize(vectors.float(), dim=-1)
    cos = unit @ unit.transpose(1, 2)  # (B, P, P)
    b, p, _ = cos.shape
    keep = torch.zeros((b, p, p), dtype=torch.bool, device=vectors.device)
    for i in range(b):
        for j in range(p):
            for k in range(j + 1, p):
                a, c = concepts[i][j], concepts[i][k]
                if valid[i, j] and valid[i, k] and a != c and (a, c) not in related:
                    keep[i, j, k] = True
    if not bool(keep.any()):
        return vectors.sum() * 0.0, 0.0
    chosen = cos[keep]
    # summed per patch (a mean over all pairs would dilute the few collapsed ones, such as
    # left vs right kidney, among the many pairs already apart)
    return F.relu(chosen - margin).square().sum() / b, float(chosen.detach().mean())
