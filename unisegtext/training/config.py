"""`TrainConfig`: the YAML file that fully describes a training run.

The file is data (never executed). Unknown keys are errors, so a typo cannot silently fall
back to a default. Example (see ``train/nano.yaml`` for the shipped default)::

    name: unisegtext-nano
    model: {preset: nano, overrides: {preprocessing: {spacing_mm: [1.5, 1.5, 1.5]}}}
    data:
      cache_dir: runs/cache
      sources:
        - {dataset: la_mri_2018, root: /data/la_mri, weight: 0.6}
        - {dataset: totalseg_example_ct, root: /data/totalseg_examples, weight: 0.2}
    optim: {lr: 0.001, max_steps: 2000}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisegtext.errors import ConfigError, did_you_mean


@dataclass
class ModelSection:
    """Which network to train.

    Attributes:
        preset: size preset of :func:`unisegtext.models.config_from_preset`.
        overrides: per-section overrides of the preset (``preprocessing``, ``backbone`` ...).
        init_from: optional checkpoint folder to start from (fine-tuning, or the next stage
            of a run trained over several sessions).
        text_adapter: knowledge-pre-trained text adapter to start from: ``"default"`` (the one
            shipped in ``unisegtext/checkpoints/text_adapter``), a folder, or ``""`` (none:
            the adapter starts as the identity). Ignored with ``init_from``.
        freeze_text_adapter: keep the text adapter fixed (only the projection to the decoder
            width, the backbone and the head learn), so that segmentation training on a few
            dozen concept names cannot undo what knowledge pre-training learned over the tree.
        init_new: with ``init_from``, parameter-name prefixes that the source checkpoint may lack
            (parts added to the architecture on purpose, e.g. ``head.text_skip``); they keep
            their initialisation. Any other missing key is an error.
    """

    preset: str = "nano"
    overrides: dict[str, Any] = field(default_factory=dict)
    init_from: str = ""
    text_adapter: str = ""
    freeze_text_adapter: bool = False
    init_new: list[str] = field(default_factory=list)


@dataclass
class SourceSection:
    """One training dataset.

    Attributes:
        dataset: registry id (``la_mri_2018``), a descriptor YAML path, or one of the built-in
            example sources ``totalseg_example_ct`` / ``totalseg_example_mr``.
        root: the local copy of the dataset.
        weight: relative sampling probability of this dataset among the real sources.
        splits: case splits used for training (a case in ``validation``/``test`` is never
            trained on unless listed here).
        limit: at most this many cases (for smoke runs); 0 = all.
    """

    dataset: str = ""
    root: str = ""
    weight: float = 1.0
    splits: list[str] = field(default_factory=lambda: ["train"])
    limit: int = 0


@dataclass
class DataSection:
    """Where the harmonised cache lives and what goes in it.

    Attributes:
        cache_dir: the ``unisegtext data prepare`` cache (made on first use; relative paths are
            relative to the current directory). Its spacing is the model's ``spacing_mm``.
        sources: the real datasets.
        num_workers: DataLoader worker processes (0 = build patches in the training process).
    """

    cache_dir: str = "runs/cache"
    sources: list[SourceSection] = field(default_factory=list)
    num_workers: int = 0


@dataclass
class SamplingSection:
    """How patches and prompts are drawn.

    Attributes:
        batch_size: patches per step and process.
        prompts_per_sample: at most this many prompts per patch (positives first).
        negatives_per_sample: annotated-but-absent concepts added as negatives per patch (at least).
        absent_fraction: target share of absent (annotated, no voxel in the patch) prompts among
            a patch's prompts, as inference asks for structures that most windows do not hold
            (0 = only ``negatives_per_sample``).
        foreground_prob: probability that a real patch is centred on a voxel of the drawn
            concept; otherwise the centre is a uniformly random voxel of the scan (air included),
            as the sliding window sees it (nnU-Net: one third foreground-centred).
        synonym_prob: probability that a prompt uses a knowledge-tree synonym instead of the name.
        crop_margin: extra context cropped around the patch before spatial augmentation
            (fraction of the patch size; avoids padding in rotated corners).
        out_of_view_negatives: also draw, as absent prompts, the concepts that the source's
            descriptor lists in ``outside_field_of_view`` (no scan of the dataset can show them:
            abdominal organs on a cardiac MR crop) and that some source trains; without it a
            dataset that annotates one structure never teaches "absent".
    """

    batch_size: int = 2
    prompts_per_sample: int = 4
    negatives_per_sample: int = 1
    absent_fraction: float = 0.0
    foreground_prob: float = 0.67
    synonym_prob: float = 0.3
    crop_margin: float = 0.25
    out_of_view_negatives: bool = False


@dataclass
class AugmentSection:
    """MONAI augmentation probabilities and ranges (applied to real and synthetic patches).

    ``flip_axes`` lists the array axes (RAS order: 0 = left-right) that may be mirrored.
    A left-right flip swaps the masks of paired ``*_left`` / ``*_right`` concepts; a
    lateral concept whose counterpart the dataset does not annotate is left out of the loss
    for that patch (so laterality is never taught wrong).
    """

    affine_prob: float = 0.3
    rotate_deg: float = 15.0
    scale_range: float = 0.15
    elastic_prob: float = 0.0
    elastic_sigma: tuple[float, float] = (5.0, 7.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    intensity_scale_prob: float = 0.2
    intensity_scale: float = 0.25
    noise_prob: float = 0.15
    noise_std: float = 0.1
    blur_prob: float = 0.15
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.2
    gamma: tuple[float, float] = (0.7, 1.5)
    low_res_prob: float = 0.15
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    flip_prob: float = 0.0
    flip_axes: list[int] = field(default_factory=list)
    strong_factor: float = 1.5


@dataclass
class SyntheticSection:
    """SynthSeg-style images generated from real label maps.

    Attributes:
        prob: probability that a training patch is synthetic.
        label_maps: source ids (of ``data.sources``) whose label maps seed the generator.
        strong_real_prob: probability that a real patch gets the strong augmentation (all
            probabilities multiplied by ``augment.strong_factor``).
        deform_prob: probability of an elastic deformation of the label map.
        bias_prob: probability of a smooth multiplicative bias field.
        std_range: per-label standard deviation range (fraction of the [0, 1] intensity range).
    """

    prob: float = 0.0
    label_maps: list[str] = field(default_factory=list)
    strong_real_prob: float = 0.0
    deform_prob: float = 0.3
    bias_prob: float = 0.5
    std_range: tuple[float, float] = (0.01, 0.08)


@dataclass
class OptimSection:
    """Optimiser and schedule.

    Attributes:
        lr: peak learning rate (AdamW).
        weight_decay: decoupled weight decay.
        betas: Adam betas.
        grad_clip: max gradient norm (0 = no clipping).
        warmup_steps: linear warm-up from 0.
        max_steps: total optimiser steps.
        max_minutes: wall-clock budget (0 = none); the run finishes its step, checkpoints and
            exports when it is spent.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        horizon: ``steps``: cosine over ``max_steps`` (exactly resumable); ``time``: cosine over
            ``max(step / max_steps, minutes / max_minutes)``, so a time-budgeted run still
            anneals (the learning rate then depends on machine speed).
        dice_weight: weight of the Dice term beside BCE.
        bf16: bf16 autocast on CUDA.
        bf16_cpu: bf16 autocast on the CPU too (only where the CPU has native bf16: AVX512-BF16
            or AMX; about 2x faster there, very slow elsewhere, so it is checked at start).
        channels_last: channels-last 3D memory layout for the backbone (faster on CPU oneDNN).
        query_weight: weight of the query-separation term: summed over every pair of distinct
            trained concepts (not one the union or part of the other), the squared excess of the
            cosine of their decoder queries over ``query_margin``; keeps concepts' queries apart.
        query_margin: cosine above which two distinct concepts' queries are penalised.
        mask_separation_weight: weight of the mask-vector separation term: on each patch, the
            squared excess over ``mask_separation_margin`` of the cosine between the mask
            vectors of distinct, unrelated prompted concepts (query decoder only).
        mask_separation_margin: cosine allowed between two such mask vectors.
        absent_topk_weight: weight of the top-k BCE on prompts absent from the patch (see
            :func:`unisegtext.training.losses.partial_label_loss`).
        absent_topk_fraction: the share of a patch's voxels that top-k term looks at.
        absent_topk_floor: logit under which a top-k voxel costs nothing (None: all count).
        lagging_concept_power: weigh each positive pair's Dice loss by its concept's running
            training Dice loss relative to the other concepts', to this power (0 = off; see
            :class:`unisegtext.training.losses.LaggingConceptWeights`).
        lagging_concept_momentum: momentum of those running means (per positive pair seen).
        lagging_concept_max_weight: weights are clipped to [1 / this, this].
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 50
    max_steps: int = 1000
    max_minutes: float = 0.0
    min_lr_ratio: float = 0.01
    horizon: str = "steps"
    dice_weight: float = 1.0
    bf16: bool = True
    bf16_cpu: bool = False
    channels_last: bool = False
    query_weight: float = 0.0
    query_margin: float = 0.7
    mask_separation_weight: float = 0.0
    mask_separation_margin: float = 0.5
    absent_topk_weight: float = 0.0
    absent_topk_fraction: float = 0.02
    absent_topk_floor: float | None = None
    lagging_concept_power: float = 0.0
    lagging_concept_momentum: float = 0.98
    lagging_concept_max_weight: float = 4.0


@dataclass
class CheckpointSection:
    """Intervals and export.

    Attributes:
        every_steps: write a resumable checkpoint every N steps (and at the end).
        keep_last: resumable checkpoints kept on disk.
        export_dir: where the final model is written with ``save_pretrained`` ("" = only
            ``OUT/final``).
    """

    every_steps: int = 200
    keep_last: int = 2
    export_dir: str = ""


@dataclass
class ValidationSourceSection:
    """Held-out scans scored with the whole-volume sliding window at every checkpoint.

    Attributes:
        dataset: registry id (its cases must be in the training cache's index: list the
            dataset in ``data.sources`` too, or give ``root``).
        root: the dataset's local copy (to cache it when it is not a training source).
        split: the split scored (never a training split).
        limit: at most this many cases (sorted ids; 0 = all).
    """

    dataset: str = ""
    root: str = ""
    split: str = "validation"
    limit: int = 0


@dataclass
class ValidationSection:
    """Whole-volume validation during training (monitoring only: nothing is selected on it).

    Attributes:
        sources: held-out sets.
        every_steps: run every N steps (0 = at every checkpoint).
        overlap: sliding-window overlap.
    """

    sources: list[ValidationSourceSection] = field(default_factory=list)
    every_steps: int = 0
    overlap: float = 0.25


@dataclass
class LoggingSection:
    """Metrics: CSV always, TensorBoard when installed; a progress bar on rank 0.

    Attributes:
        every_steps: a row of ``metrics.csv`` every N steps.
        detail_every_steps: a line of ``metrics_detail.jsonl`` (per source and per concept:
            BCE, Dice of present prompts, false-positive rate of absent prompts) every N steps.
    """

    every_steps: int = 10
    detail_every_steps: int = 100
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    """A whole training run (see the module docstring)."""

    name: str = "unisegtext"
    seed: int = 0
    threads: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on values that cannot work."""
        problems = []
        if not self.data.sources:
            problems.append("data.sources is empty; list at least one dataset")
        for i, src in enumerate(self.data.sources):
            if not src.dataset:
                problems.append(f"data.sources[{i}].dataset is empty")
            if src.weight < 0:
                problems.append(f"data.sources[{i}].weight must be >= 0, got {src.weight}")
        if self.sampling.batch_size < 1:
            problems.append(f"sampling.batch_size must be >= 1, got {self.sampling.batch_size}")
        if self.sampling.prompts_per_sample < 1:
            problems.append("sampling.prompts_per_sample must be >= 1")
        if not 0 <= self.synthetic.prob <= 1:
            problems.append(f"synthetic.prob must be within [0, 1], got {self.synthetic.prob}")
        if self.synthetic.prob > 0 and not self.synthetic.label_maps:
            problems.append("synthetic.prob > 0 needs synthetic.label_maps (source ids with label maps)")
        names = {s.dataset for s in self.data.sources}
        for lm in self.synthetic.label_maps:
            if lm not in names:
                problems.append(f"synthetic.label_maps lists {lm!r}, which is not in data.sources ({sorted(names)})")
        if self.optim.horizon not in ("steps", "time"):
            problems.append(f"optim.horizon must be 'steps' or 'time', got {self.optim.horizon!r}")
        if self.optim.horizon == "time" and self.optim.max_minutes <= 0:
            problems.append("optim.horizon 'time' needs optim.max_minutes > 0")
        if self.optim.max_steps < 1:
            problems.append("optim.max_steps must be >= 1")
        if not 0 <= self.sampling.absent_fraction < 1:
            problems.append(f"sampling.absent_fraction must be within [0, 1), got {self.sampling.absent_fraction}")
        if not 0 <= self.sampling.foreground_prob <= 1:
            problems.append(f"sampling.foreground_prob must be within [0, 1], got {self.sampling.foreground_prob}")
        if self.optim.lagging_concept_power < 0:
            problems.append(f"optim.lagging_concept_power must be >= 0, got {self.optim.lagging_concept_power}")
        if not 0 <= self.optim.lagging_concept_momentum < 1:
            problems.append(f"optim.lagging_concept_momentum must be within [0, 1), got {self.optim.lagging_concept_momentum}")
        if self.optim.lagging_concept_max_weight < 1:
            problems.append(f"optim.lagging_concept_max_weight must be >= 1, got {self.optim.lagging_concept_max_weight}")
        for i, val in enumerate(self.validation.sources):
            if not val.dataset:
                problems.append(f"validation.sources[{i}].dataset is empty")
            if val.split == "train":
                problems.append(f"validation.sources[{i}].split is 'train': validate on held-out scans")
        if not 0 <= self.validation.overlap < 1:
            problems.append(f"validation.overlap must be within [0, 1), got {self.validation.overlap}")
        if any(a not in (0, 1, 2) for a in self.augment.flip_axes):
            problems.append(f"augment.flip_axes must be array axes 0, 1, 2, got {self.augment.flip_axes}")
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        config = _build(cls, data, "config")
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:

        data = _read_yaml(Path(path))
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False), encoding="utf-8")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config; ``base: other.yaml`` (relative to this file) is read first and
    overridden key by key (mappings merge, lists and scalars replace)."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"training config {path} not found; see train/README.md for the shipped configs")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
        data = _merge(parent, data)
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


_NESTED: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "sampling": SamplingSection,
    "augment": AugmentSection,
    "synthetic": SyntheticSection,
    "optim": OptimSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
    "validation": ValidationSection,
}


def _build(cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    defaults = cls()
    for key, item in value.items():
        if key not in fields:
            raise ConfigError(f"unknown key {where}.{key}.{did_you_mean(key, list(fields))}")
        if cls is TrainConfig and key in _NESTED:
            kwargs[key] = _build(_NESTED[key], item or {}, key)
        elif cls is DataSection and key == "sources":
            if not isinstance(item, list):
                raise ConfigError(f"data.sources must be a list of mappings, got {type(item).__name__}")
            kwargs[key] = [_build(SourceSection, s, f"data.sources[{i}]") for i, s in enumerate(item)]
        elif cls is ValidationSection and key == "sources":
            if not isinstance(item, list):
                raise ConfigError(f"validation.sources must be a list of mappings, got {type(item).__name__}")
            kwargs[key] = [_build(ValidationSourceSection, s, f"validation.sources[{i}]") for i, s in enumerate(item)]
        else:
            default = getattr(defaults, key)
            if isinstance(default, tuple) and isinstance(item, list):
                item = tuple(item)
            if isinstance(default, float) and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if default is not None and not isinstance(default, dict) and not _same_kind(default, item):
                raise ConfigError(
                    f"{where}.{key} should be {type(default).__name__} like {default!r}, got {item!r}"
                )
            kwargs[key] = item
    return cls(**kwargs)


def _same_kind(default: Any, item: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(item, bool)
    if isinstance(default, (int, float)):
        return isinstance(item, (int, float)) and not isinstance(item, bool)
    return isinstance(item, type(default))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
