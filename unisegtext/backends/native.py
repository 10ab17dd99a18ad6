"""Our own network (`UniSegText`) behind the backend interface.

A thin adapter over the pipeline's public steps (encode text once, preprocess, sliding window,
restore to the input grid); thresholds and post-processing stay with the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from unisegtext.backends.base import Backend


class UniSegTextBackend(Backend):
    """A `UniSegText` checkpoint (default: the packaged `unisegtext-nano`).

    Args:
        weights: a UniSegText instance, a checkpoint folder, a built-in name or a Hub repo id.
        device: torch device (default: CUDA when available).
    """

    licence = "Apache-2.0"

    def __init__(self, weights: Any = None, *, device: str | None = None):
        from unisegtext.inference.segment import load_model, pick_device

        self.device = pick_device(device)
        self.model = load_model(weights, self.device)
        self.name = "unisegtext"
        self.source = self.model.name_or_path or "in-memory model"
        self.version = (self.model.weights_sha256 or "")[:12] or "unsaved"
        self.modalities = ("CT", "MR")

    def concepts(self) -> list[str]:
        """The concepts the checkpoint was trained on (its config) and the unions of those; a
        model without that list (freshly initialised) is queried for any concept."""
        from unisegtext.inference.prompts import union_cover
        from unisegtext.knowledge import load_tree

        tree = load_tree()
        trained = list(self.model.config.concepts)
        if not trained:
            return [c.id for c in tree]
        known = set(trained)
        return trained + [c.id for c in tree if c.id not in known and union_cover(tree, c.id, known)]

    def contract(self) -> dict[str, Any]:
        prep = self.model.config.preprocessing
        return {
            "orientation": "RAS",
            "spacing_mm": list(prep.spacing_mm),
            "normalisation": {k: v for k, v in vars(prep).items() if k not in ("spacing_mm", "patch_size", "orientation")},
            "patch_size": list(prep.patch_size),
            "tile_step_size": 1.0 - float(self.model.config.inference.overlap),
            "output": "sigmoid probabilities, trilinear back to the input grid",
        }

    def predict(self, volume, concepts: Sequence[str]) -> dict[str, np.ndarray]:
        import torch

        from unisegtext.inference.preprocessing import preprocess, restore
        from unisegtext.inference.prompts import resolve_prompts
        from unisegtext.inference.segment import predict_probabilities

        concepts = self.check_concepts(concepts)
        cfg = self.model.config
        resolutions = resolve_prompts(concepts, cfg.concepts, cfg.text.template)
        texts = list(dict.fromkeys(t for r in resolutions for t in r.text))
        with torch.inference_mode():
            embeddings = self.model.encode_text(texts).to(self.device)
        prepared = preprocess(volume, cfg.preprocessing, modality=volume.guessed_modality())
        probabilities = predict_probabilities(
            self.model, prepared, embeddings, overlap=cfg.inference.overlap,
            sw_batch_size=cfg.inference.sw_batch_size, max_prompts_per_pass=cfg.inference.max_prompts_per_pass,
            blend_mode=cfg.inference.blend_mode,
        )
        index = {t: i for i, t in enumerate(texts)}
        out = {}
        for concept, r in zip(concepts, resolutions):
            members = probabilities[[index[t] for t in r.text]]
            out[concept] = restore(members, prepared).max(axis=0).astype(np.float32)
        return out
