"""Balanced patch sampling, prompt sets and the step-indexed training dataset.

A training patch is a pure function of ``(seed, patch index)``: the index seeds a numpy
generator that draws the source (real or synthetic), the dataset (by weight), the concept
(uniform over the dataset's annotated concepts, so rare structures are seen as often as
large ones), the case containing it, the patch centre (on a voxel of the concept with
``foreground_prob``), the augmentation and the prompts. Step ``s`` of rank ``r`` uses the
indices ``(s * world + r) * batch + i``; resuming at step ``s`` therefore reproduces exactly
the patches an uninterrupted run would have drawn, with any number of loader workers.

Prompts per patch: the annotated concepts present in the patch (positives, the drawn one
first) and annotated concepts absent from it (negatives). A concept the source does not
annotate is never a prompt, so the loss never calls it background.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unisegtext.models.config import PreprocessingConfig
from unisegtext.training.augment import intensity_transforms, spatial_transforms
from unisegtext.training.config import TrainConfig
from unisegtext.training.sources import SourceCases, TrainingCase
from unisegtext.training.synthetic import synthesize_image

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# prompt texts


class PromptTexts:
    """Concept id -> the phrasings used as prompts (preferred name first, then synonyms).

    Synonyms come from the knowledge tree, so the model sees the varied phrasings users type;
    the preferred name is what inference queries, and is drawn most often.
    """

    def __init__(self, concepts: Sequence[str], template: str = "{name}", synonym_prob: float = 0.3):
        self.template = template
        self.synonym_prob = synonym_prob
        self.phrases: dict[str, list[str]] = {}
        try:
            from unisegtext.knowledge import load_tree

            tree = load_tree()
        except Exception as exc:  # pragma: no cover - the tree ships with the package
            logger.warning("knowledge tree unavailable (%s); prompts use concept ids only", exc)
            tree = None
        for concept in concepts:
            if tree is not None and concept in tree:
                node = tree.get(concept)
                names = [node.name] + [s for s in node.synonyms if s and s != node.name]
            else:
                names = [concept.replace("_", " ")]
            self.phrases[concept] = names

    def name(self, concept: str) -> str:
        """The text inference uses for `concept`."""
        return self.template.format(name=self.phrases[concept][0])

    def draw(self, concept: str, rng: np.random.Generator) -> str:
        names = self.phrases[concept]
        if len(names) > 1 and rng.random() < self.synonym_prob:
            return self.template.format(name=names[1 + int(rng.integers(len(names) - 1))])
        return self.template.format(name=names[0])

    def all_texts(self) -> list[str]:
        return [self.template.format(name=n) for names in self.phrases.values() for n in names]


# ---------------------------------------------------------------------------------------------
# laterality


def mirror_concept(concept: str) -> str:
    """The concept id with 'left' and 'right' exchanged (``kidney_left`` -> ``kidney_right``)."""
    parts = concept.split("_")
    swapped = ["right" if p == "left" else "left" if p == "right" else p for p in parts]
    return "_".join(swapped)


def is_lateral(concept: str) -> bool:
    return mirror_concept(concept) != concept


# ---------------------------------------------------------------------------------------------
# geometry helpers


def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """array[start:start+size] per axis, padded with `fill` where the box leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


# ---------------------------------------------------------------------------------------------
# the dataset


@dataclass
class PatchSample:
    """One training patch.

    Attributes:
        image: (1, X, Y, Z) float32 normalised patch.
        targets: (P, X, Y, Z) uint8 binary masks, one per prompt.
        texts: P prompt texts.
        concepts: P concept ids.
        source: source id ("synthetic:<id>" for synthetic patches).
    """

    image: torch.Tensor
    targets: torch.Tensor
    texts: list[str]
    concepts: list[str]
    source: str


class PatchDataset(torch.utils.data.Dataset):
    """Map-style dataset: index -> :class:`PatchSample` (deterministic per index)."""

    def __init__(self, sources: dict[str, SourceCases], config: TrainConfig, preprocessing: PreprocessingConfig, texts: PromptTexts):
        self.sources = sources
        self.preprocessing = preprocessing
        patch_size = preprocessing.patch_size
        self.config = config
        self.patch_size = tuple(int(s) for s in patch_size)
        self.texts = texts
        self.names = [name for name, s in sources.items() if s.weight > 0]
        weights = np.array([sources[n].weight for n in self.names], dtype=np.float64)
        if not len(self.names) or weights.sum() <= 0:
            from unisegtext.errors import ConfigError

            raise ConfigError("every data source has weight 0; give at least one a positive weight")
        self.weights = weights / weights.sum()
        self.synthetic_names = list(config.synthetic.label_maps)
        margin = 1.0 + max(0.0, config.sampling.crop_margin)
        self.region = tuple(int(np.ceil(s * margin)) for s in self.patch_size)
        aug = config.augment
        self._spatial = spatial_transforms(aug, self.patch_size)
        self._spatial_strong = spatial_transforms(aug, self.patch_size, factor=aug.strong_factor)
        # the synthetic source deforms its label maps harder: affine + elastic (deform_prob)
        synthetic_aug = dataclasses.replace(aug, elastic_prob=config.synthetic.deform_prob, affine_prob=max(aug.affine_prob, 0.5))
        self._spatial_label = spatial_transforms(synthetic_aug, self.patch_size, factor=aug.strong_factor, label_only=True)
        self._intensity = intensity_transforms(aug)
        self._intensity_strong = intensity_transforms(aug, factor=aug.strong_factor)

    def __len__(self) -> int:  # indices are unbounded; the batch sampler decides
        return 2**62

    # ------------------------------------------------------------------ drawing
    def _draw_location(self, source: SourceCases, rng: np.random.Generator) -> tuple[TrainingCase, str, np.ndarray]:
        concepts = source.concepts
        concept = concepts[int(rng.integers(len(concepts)))]
        members = source.concept_cases[concept]
        case = source.cases[members[int(rng.integers(len(members)))]]
        if rng.random() < self.config.sampling.foreground_prob:
            coords = case.foreground(concept)
            centre = coords[int(rng.integers(len(coords)))]
        else:
            centre = np.array([int(rng.integers(n)) for n in case.label.shape])
        return case, concept, centre

    def __getitem__(self, index: int) -> PatchSample:
        seed = self.config.seed
        rng = np.random.default_rng([int(seed), int(index)])
        transform_seed = int(rng.integers(2**31 - 1))
        synthetic = bool(self.synthetic_names) and rng.random() < self.config.synthetic.prob
        if synthetic:
            name = self.synthetic_names[int(rng.integers(len(self.synthetic_names)))]
        else:
            name = self.names[int(rng.choice(len(self.names), p=self.weights))]
        case, drawn, centre = self._draw_location(self.sources[name], rng)
        start = [int(c) - r // 2 for c, r in zip(centre, self.region)]
        label = crop_padded(case.label, start, self.region, 0)

        if synthetic:
            spatial = self._spatial_label
            spatial.set_random_state(seed=transform_seed)
            out = spatial({"label": torch.from_numpy(label[None].astype(np.float32))})
            label = np.asarray(out["label"])[0].round().astype(np.int32)
            painted = synthesize_image(label, rng, self.config.synthetic)
            from unisegtext.inference.preprocessing import normalise

            image, _ = normalise(painted, "MR", self.preprocessing)
            intensity = self._intensity_strong
            source_name = f"synthetic:{name}"
        else:
            image = crop_padded(case.image, start, self.region, case.pad_value)
            strong = rng.random() < self.config.synthetic.strong_real_prob
            spatial = self._spatial_strong if strong else self._spatial
            spatial.set_random_state(seed=transform_seed)
            out = spatial({"image": torch.from_numpy(image[None]), "label": torch.from_numpy(label[None].astype(np.float32))})
            image = np.asarray(out["image"])[0]
            label = np.asarray(out["label"])[0].round().astype(np.int32)
            intensity = self._intensity_strong if strong else self._intensity
            source_name = name
        intensity.set_random_state(seed=transform_seed + 1)
        image = np.asarray(intensity({"image": torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32))})["image"])[0]

        # mirroring (never through MONAI: a left-right flip must swap lateral concepts)
        lr_flipped = False
        aug = self.config.augment
        for axis in aug.flip_axes:
            if rng.random() < aug.flip_prob:
                image = np.flip(image, axis)
                label = np.flip(label, axis)
                lr_flipped ^= axis == 0

        texts, concepts, masks = self._prompts(case, drawn, label, lr_flipped, rng)
        return PatchSample(
            image=torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            targets=torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *self.patch_size), dtype=torch.uint8),
            texts=texts,
            concepts=concepts,
            source=source_name,
        )

    def _prompts(self, case: TrainingCase, drawn: str, label: np.ndarray, lr_flipped: bool, rng: np.random.Generator):
        """Positives (present in the patch) and negatives (annotated, absent) with their masks."""
        values_present = set(np.unique(label).tolist())
        annotated = set(case.annotated)
        candidates: list[tuple[str, list[int]]] = []
        for concept in case.annotated:
            source_concept = concept
            if lr_flipped and is_lateral(concept):
                # after a left-right flip the voxels of `concept` carry its mirror's labels
                source_concept = mirror_concept(concept)
                if source_concept not in annotated:
                    continue  # its counterpart is unknown here: leave it out of the loss
            candidates.append((concept, case.targets[source_concept]))
        present = [(c, v) for c, v in candidates if values_present.intersection(v)]
        absent = [(c, v) for c, v in candidates if not values_present.intersection(v)]
        sampling = self.config.sampling
        if sampling.out_of_view_negatives:  # absent from every scan of the source: empty masks
            absent += [(c, []) for c in case.out_of_view if c in self.texts.phrases]
        order = rng.permutation(len(present))
        present = [present[i] for i in order]
        present.sort(key=lambda cv: cv[0] != drawn)  # the drawn concept first (stable)
        cap = sampling.prompts_per_sample
        reserved = min(len(absent), sampling.negatives_per_sample)
        n_pos = min(len(present), max(0, cap - reserved))
        if sampling.absent_fraction > 0:
            # about `absent_fraction` of the prompts absent (at least two when nothing is present)
            ratio = sampling.absent_fraction / (1.0 - sampling.absent_fraction)
            wanted = max(sampling.negatives_per_sample, int(np.ceil(n_pos * ratio)), 0 if n_pos else 2)
            n_neg = min(len(absent), cap - n_pos, wanted)
        else:
            n_neg = min(len(absent), cap - n_pos)
        chosen = present[:n_pos]
        if n_neg:
            picks = rng.choice(len(absent), size=n_neg, replace=False)
            chosen += [absent[int(i)] for i in picks]
        texts = [self.texts.draw(c, rng) for c, _ in chosen]
        masks = [np.isin(label, values).astype(np.uint8) for _, values in chosen]
        return texts, [c for c, _ in chosen], masks


# ---------------------------------------------------------------------------------------------
# batching


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields the patch indices of steps ``start_step .. end_step - 1`` for one rank."""

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def indices(self, step: int) -> list[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


@dataclass
class Batch:
    """A collated batch.

    Attributes:
        image: (B, 1, X, Y, Z) float32.
        targets: (B, P, X, Y, Z) float32 (P = most prompts of any sample; padding is 0).
        valid: (B, P) bool: the slot holds a real prompt of an annotated concept.
        texts: B lists of P texts (padding slots repeat a real text; they are masked).
        concepts: B lists of concept ids ("" for padding).
        sources: B source ids.
    """

    image: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    texts: list[list[str]]
    concepts: list[list[str]]
    sources: list[str]

    def to(self, device: torch.device) -> Batch:
        return Batch(self.image.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     self.valid.to(device), self.texts, self.concepts, self.sources)


def collate(samples: Sequence[PatchSample]) -> Batch:
    """Stack samples, padding every prompt list to the longest one (masked by `valid`)."""
    n_prompts = max(1, max(len(s.texts) for s in samples))
    spatial = tuple(samples[0].image.shape[1:])
    targets = torch.zeros((len(samples), n_prompts, *spatial), dtype=torch.float32)
    valid = torch.zeros((len(samples), n_prompts), dtype=torch.bool)
    filler = next((t for s in samples for t in s.texts), "")
    texts, concepts = [], []
    for b, s in enumerate(samples):
        p = len(s.texts)
        if p:
            targets[b, :p] = s.targets.float()
            valid[b, :p] = True
        texts.append(list(s.texts) + [filler] * (n_prompts - p))
        concepts.append(list(s.concepts) + [""] * (n_prompts - p))
    image = torch.stack([s.image for s in samples])
    return Batch(image, targets, valid, texts, concepts, [s.source for s in samples])


def describe_sources(sources: dict[str, SourceCases]) -> list[dict[str, Any]]:
    """A small summary (for logs and the model card)."""
    return [
        {"source": name, "cases": len(s.cases), "concepts": len(s.concept_cases), "weight": s.weight}
        for name, s in sources.items()
    ]
