"""Is the structure in the scan at all? A presence probability per prompt, and a decision.

The mask logits already carry the evidence: a structure that is there gives a confident,
sizeable blob; one that is not gives at most a faint or small one. Three features per queried
text, taken in model space after post-processing (so they do not depend on the input grid):

* the largest probability anywhere (as a logit),
* the volume above the mask threshold (log 1 + mL),
* the mean probability inside the mask (0 when empty),

and a logistic model on them (``inference.presence`` in the checkpoint's config: weights,
bias and the decision threshold), fitted on the validation splits by
``eval/absence_benchmark.py --fit``, never on training scans. A checkpoint without a fitted
model decides "present" when the mask is not empty, and reports the largest probability.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

FEATURES = ("max_logit", "log_volume_ml", "mean_probability_inside")


def presence_features(probability: torch.Tensor, threshold: float, voxel_ml: float, temperature: float = 1.0) -> np.ndarray:
    """(3,) features of one model-space probability map (X', Y', Z').

    The features are those of the uncalibrated map whatever the temperature the map was made
    with (``probability = sigmoid(logit / temperature)``): the presence model is fitted on
    uncalibrated maps, and a stored temperature must not shift its inputs.
    """
    top = float(probability.max()) if probability.numel() else 0.0
    top = min(max(top, 1e-6), 1 - 1e-6)
    mask = probability > threshold
    n = int(mask.sum())
    inside = 0.0
    if n:
        p = probability[mask].double()
        if temperature != 1.0:
            p = torch.sigmoid(torch.logit(p, eps=1e-6) * temperature)
        inside = float(p.mean())
    return np.array([temperature * math.log(top / (1 - top)), math.log1p(n * voxel_ml), inside], dtype=np.float64)


def presence_probability(features: np.ndarray, model: Mapping[str, Any] | None) -> float:
    """P(present) from the features; without a fitted model, the largest probability."""
    if not model:
        logit = float(features[0])
        return 1.0 / (1.0 + math.exp(-logit))
    z = float(np.dot(np.asarray(model["weights"], dtype=np.float64), features) + float(model["bias"]))
    return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


def decide(probability: float, features: np.ndarray, model: Mapping[str, Any] | None) -> bool:
    """Present or absent: the fitted decision threshold, else "the mask is not empty"."""
    if not model:
        return bool(features[1] > 0)
    return probability >= float(model.get("threshold", 0.5))


def fit_presence(features: Sequence[np.ndarray], labels: Sequence[bool], *, l2: float = 1e-2,
                 iterations: int = 500) -> dict[str, Any]:
    """A logistic model (weights, bias) on presence features, by Newton's method with a small
    L2 penalty (stable with few, well separated examples).

    Args:
        features: (N, 3) feature rows.
        labels: N booleans (present).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -50, 50)))
        grad = z.T @ (p - y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    weights = w[:-1] / std
    bias = float(w[-1] - np.sum(w[:-1] * mean / std))
    return {"features": list(FEATURES), "weights": [float(v) for v in weights], "bias": bias}


def fit_temperature(logits: np.ndarray, targets: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The temperature T minimising the binary NLL of sigmoid(logits / T) (golden-section
    search on log T; one scalar, as in Guo et al. 2017's temperature scaling)."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, z) - targets * z))

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))
