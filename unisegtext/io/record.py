"""The result record: masks on the input grid and what each prompt meant.

It sits below everything that writes it (NIfTI, DICOM SEG, previews, statistics, reports),
which import it from here; it imports none of them. The writers are attached as methods of
:class:`unisegtext.inference.SegmentationResult`, the subclass the pipeline returns.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from unisegtext.io.volume import Volume

logger = logging.getLogger(__name__)


MIN_COLOR_DISTANCE = 60.0  # RGB distance below which two display colours read as one


@dataclass
class PromptResolution:
    """How one prompt was understood.

    Attributes:
        prompt: the text as given.
        concept_id: the knowledge-tree concept it resolved to (None in open-vocabulary mode
            when nothing matched).
        concept_name: the concept's preferred name.
        how: "exact", "synonym", "normalised", "fuzzy", "embedding" or "open_vocabulary".
        confidence: 0..1.
        union_of: concepts queried and merged when the model has no direct training for the
            concept ("kidney" -> kidney_left + kidney_right); empty when queried directly.
        text: the text(s) given to the text encoder.
        warnings: anything the user should know (guesses, unions, untrained concepts).
        answered_by: the model that answered it (routing over several backends), or None
            for a single UniSegText model.
    """

    prompt: str
    concept_id: str | None
    concept_name: str | None
    how: str
    confidence: float
    union_of: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    answered_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ResultRecord:
    """Masks for every prompt on the exact input grid (the record; its writers are methods of
    :class:`unisegtext.inference.SegmentationResult`).

    Attributes:
        masks: prompt -> bool array (X, Y, Z) on the input grid.
        probabilities: prompt -> float32 array (X, Y, Z), if asked for.
        resolutions: prompt -> :class:`PromptResolution`.
        volume: the input scan (its grid, affine and header are used by the writers).
        scores: prompt -> mean probability inside the mask (0 when empty).
        timings: seconds per stage.
        model: a short description of the model that produced it.
        modality: "CT" or "MR" as used for normalisation.
        modality_source: how it was decided: "given", "dicom" or "guessed".
        presence: prompt -> probability (0..1) that the structure is in the scan at all.
        present: prompt -> the decision; an absent prompt has an empty mask.
        presence_features: prompt -> the presence features of its strongest member
            (:data:`unisegtext.inference.presence.FEATURES`), for fitting and audits.
    """

    masks: dict[str, np.ndarray]
    resolutions: dict[str, PromptResolution]
    volume: Volume
    probabilities: dict[str, np.ndarray] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    modality_source: str | None = None
    presence: dict[str, float] = field(default_factory=dict)
    present: dict[str, bool] = field(default_factory=dict)
    presence_features: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for prompt, mask in self.masks.items():  # results made without a presence decision
            self.present.setdefault(prompt, bool(np.any(mask)))
            self.presence.setdefault(prompt, 1.0 if self.present[prompt] else 0.0)

    @property
    def absent(self) -> list[str]:
        """Prompts decided absent from the scan (their masks are empty)."""
        return [p for p in self.prompts if not self.present.get(p, True)]

    @property
    def prompts(self) -> list[str]:
        return list(self.masks)

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    @property
    def volumes_ml(self) -> dict[str, float]:
        """Volume of each mask in millilitres."""
        voxel = self.volume.voxel_volume_ml
        return {p: float(np.count_nonzero(m)) * voxel for p, m in self.masks.items()}

    def __getitem__(self, prompt: str) -> np.ndarray:
        return self.masks[prompt]

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        parts = ", ".join(f"{p!r}: {v:.1f} mL" for p, v in self.volumes_ml.items())
        return f"SegmentationResult(shape={self.volume.shape}, {{{parts}}})"

    # ------------------------------------------------------------------ multilabel
    def label_map(self) -> tuple[np.ndarray, dict[int, str]]:
        """One uint8/uint16 label map and its values (1..P in prompt order).

        Where masks overlap ("kidney" and "kidney tumor"), the voxel takes the label of the
        smallest mask, so nested structures (tumours in organs) stay visible.
        """
        prompts = self.prompts
        dtype = np.uint8 if len(prompts) < 255 else np.uint16
        labels = np.zeros(self.volume.shape, dtype=dtype)
        order = sorted(range(len(prompts)), key=lambda i: -int(np.count_nonzero(self.masks[prompts[i]])))
        overlapping = 0
        for i in order:  # largest first; smaller masks overwrite
            mask = self.masks[prompts[i]]
            overlapping += int(np.count_nonzero(labels[mask]))
            labels[mask] = i + 1
        if overlapping:
            logger.info("%d voxels are in more than one mask; the smallest mask's label is kept", overlapping)
        return labels, {i + 1: p for i, p in enumerate(prompts)}

    def colors(self) -> dict[str, tuple[int, int, int]]:
        """Display colour (r, g, b), 0-255, per prompt: the concept's colour from the
        knowledge tree, or a distinct fallback colour for prompts without a concept.

        Within one result no two prompts share a look-alike colour: the tree gives organs of
        one system neighbouring shades (liver (40, 140, 40) and spleen (50, 170, 60)), which a
        preview legend cannot tell apart; a later prompt whose colour lies within
        ``MIN_COLOR_DISTANCE`` of an earlier one gets a distinct fallback colour instead.
        """
        import colorsys

        def fallback(n: int) -> tuple[int, int, int]:
            hue = (0.13 + 0.618034 * n) % 1.0  # golden-ratio steps keep neighbours apart
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
            return (round(r * 255), round(g * 255), round(b * 255))

        def distinct(color: tuple[int, int, int], taken: list[tuple[int, int, int]]) -> bool:
            return all(sum((a - b) ** 2 for a, b in zip(color, other)) >= MIN_COLOR_DISTANCE**2 for other in taken)

        tree = None
        colors: dict[str, tuple[int, int, int]] = {}
        for n, prompt in enumerate(self.prompts):
            concept_id = self.resolutions[prompt].concept_id if prompt in self.resolutions else None
            color = None
            if concept_id is not None:
                if tree is None:
                    from unisegtext.knowledge import load_tree

                    tree = load_tree()
                if concept_id in tree:
                    color = tuple(int(c) for c in tree.get(concept_id).color)
            taken = list(colors.values())
            if color is None or not distinct(color, taken):  # the first free golden-ratio step
                color = next((c for c in map(fallback, range(n, n + 64)) if distinct(c, taken)), fallback(n))
            colors[prompt] = color  # type: ignore[assignment]
        return colors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (no arrays)."""
        return {
            "shape": list(self.volume.shape),
            "spacing_mm": list(self.volume.spacing),
            "prompts": {p: r.to_dict() for p, r in self.resolutions.items()},
            "volumes_ml": self.volumes_ml,
            "scores": self.scores,
            "present": self.present,
            "presence_probability": self.presence,
            "timings": self.timings,
            "model": self.model,
            "modality": {"value": self.modality, "how": self.modality_source},
        }
