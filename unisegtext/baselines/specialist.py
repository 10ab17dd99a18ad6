"""An nnU-Net-style specialist: MONAI DynUNet with nnU-Net's default plan and schedule.

The fallback when nnunetv2 itself cannot be used: the topology comes from
:func:`~unisegtext.baselines.nnunet_plan.plan_specialist` (nnU-Net's rules), and training
follows nnU-Net v2's ``nnUNetTrainer`` defaults (``nnunetv2/training/nnUNetTrainer/
nnUNetTrainer.py``): SGD, initial learning rate 0.01, Nesterov momentum 0.99, weight decay
3e-5, poly learning-rate decay (exponent 0.9) over the budget, gradient-norm clip 12, Dice +
cross-entropy (softmax, background excluded from Dice; sigmoid per region when the classes
overlap, as nnU-Net's region-based training does), deep supervision (weights 1/2**i,
normalised), 33 % of each batch forced to contain foreground, bf16 autocast on CUDA.

Differences from nnU-Net, stated: the budget is a step count and/or wall-clock time instead
of 1000 epochs x 250 steps (the poly decay runs over that budget); augmentation is a light
subset (mirroring, Gaussian noise, brightness, contrast; no rotation/scaling/elastic, gamma,
blur or low-resolution simulation); no 5-fold cross-validation or ensembling; DynUNet
upsamples its deep-supervision outputs to full resolution (MONAI's design) where nnU-Net
down-samples the targets; inference mirroring is optional (nnU-Net: on).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from unisegtext.baselines.nnunet_plan import (
    SpecialistPlan,
    deep_supervision_weights,
    plan_specialist,
)
from unisegtext.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

INITIAL_LR = 0.01
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
POLY_EXPONENT = 0.9
GRAD_CLIP = 12.0
OVERSAMPLE_FOREGROUND = 0.33
MAX_LOCATIONS_PER_CLASS = 10_000


# ------------------------------------------------------------------------------------------ data
@dataclass
class SpecialistCase:
    """One case for the specialist and the comparison.

    Attributes:
        image: (C, X, Y, Z) float32 raw intensities.
        label: (X, Y, Z) integer label map with the dataset's label values.
        affine: (4, 4) voxel -> RAS mm.
        targets: concept id -> label values whose union is that concept.
        split: "train", "validation" or "test".
    """

    dataset: str
    case: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    modality: str | None
    targets: dict[str, list[int]]
    split: str = "train"

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def mask(self, concept: str) -> np.ndarray:
        """Boolean reference mask (X, Y, Z) of one concept."""
        if concept not in self.targets:
            raise DataError(f"case {self.dataset}/{self.case} does not annotate {concept!r}; it has {sorted(self.targets)}")
        return np.isin(self.label, [int(v) for v in self.targets[concept]])


def load_cases_from_cache(
    cache_dir: str | Path, dataset: str | None = None, cases: Sequence[str] | None = None
) -> list[SpecialistCase]:
    """Cases of a prepared cache (``unisegtext data prepare``), optionally of one dataset / ids."""
    from unisegtext.data import load_cache_index, load_cached_case

    index = load_cache_index(cache_dir)
    entries = [e for e in index.get("cases", []) if dataset is None or e["dataset"] == dataset]
    if cases is not None:
        wanted = set(cases)
        entries = [e for e in entries if e["case"] in wanted]
        missing = wanted - {e["case"] for e in entries}
        if missing:
            raise DataError(f"case id(s) {sorted(missing)} are not in the cache {cache_dir}")
    if not entries:
        raise DataError(f"no cases{' of dataset ' + repr(dataset) if dataset else ''} in the cache {cache_dir}")
    out = []
    for entry in entries:
        cached = load_cached_case(entry, mmap=False)
        out.append(SpecialistCase(
            dataset=entry["dataset"], case=entry["case"], image=np.asarray(cached.image, dtype=np.float32),
            label=np.asarray(cached.label), affine=np.asarray(entry["affine"], dtype=np.float64),
            modality=entry.get("modality"), targets={k: [int(v) for v in vals] for k, vals in entry["targets"].items()},
            split=entry.get("split") or "train",
        ))
    return out


def load_cases_from_registry(
    dataset: str,
    root: str | Path,
    *,
    spacing_mm: Sequence[float] | None = (1.5, 1.5, 1.5),
    cases: Sequence[str] | None = None,
) -> list[SpecialistCase]:
    """Read cases of a registered dataset and harmonise them as ``data prepare`` does (in memory)."""
    from unisegtext.data import get_descriptor, get_reader
    from unisegtext.data.prepare import harmonise

    descriptor = get_descriptor(dataset)
    samples = get_reader(descriptor).samples(root, cases=list(cases) if cases else None)
    out = []
    for sample in samples:
        data = harmonise(sample.load(), spacing_mm)
        out.append(SpecialistCase(
            dataset=descriptor.id, case=sample.case, image=data.image.astype(np.float32, copy=False),
            label=data.label, affine=data.affine, modality=sample.modality,
            targets={k: [int(v) for v in vals] for k, vals in sample.targets.items()},
            split=sample.split or "train",
        ))
    return out


# ------------------------------------------------------------------------------------------ pieces
@dataclass
class TrainBudget:
    """Stop after `max_steps` optimiser steps or `time_s` seconds of training, whichever first."""

    max_steps: int | None = None
    time_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_steps is None and self.time_s is None:
            raise ConfigError("a training budget needs max_steps or time_s (e.g. --max-steps 1000 or --time-budget-s 3600)")
        if (self.max_steps is not None and self.max_steps < 1) or (self.time_s is not None and self.time_s <= 0):
            raise ConfigError(f"budget must be positive, got max_steps={self.max_steps}, time_s={self.time_s}")

    def progress(self, step: int, elapsed_s: float) -> float:
        """Fraction of the budget used, in [0, 1] (drives the poly learning rate)."""
        parts = []
        if self.max_steps is not None:
            parts.append(step / self.max_steps)
        if self.time_s is not None:
            parts.append(elapsed_s / self.time_s)
        return min(1.0, max(parts))


@dataclass
class IntensityNormaliser:
    """nnU-Net's schemes: CT = clip to the foreground's [0.5, 99.5] percentiles of the training
    set, then z-score with the foreground mean/std; otherwise z-score each image on its own."""

    scheme: str
    clip: tuple[float, float] = (0.0, 0.0)
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, cases: Sequence[SpecialistCase], classes: Sequence[str], seed: int = 0) -> IntensityNormaliser:
        modalities = {c.modality for c in cases}
        if modalities != {"CT"}:
            return cls("zscore")
        rng = np.random.default_rng(seed)
        samples = []
        for case in cases:
            foreground = np.zeros(case.label.shape, bool)
            for concept in classes:
                foreground |= case.mask(concept)
            values = case.image[0][foreground]
            if values.size:
                samples.append(rng.choice(values, size=min(values.size, 100_000), replace=False))
        if not samples:
            return cls("zscore")
        pooled = np.concatenate(samples)
        low, high = np.percentile(pooled, [0.5, 99.5])
        clipped = np.clip(pooled, low, high)
        return cls("ct", (float(low), float(high)), float(clipped.mean()), float(max(clipped.std(), 1e-8)))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = image.astype(np.float32, copy=True)
        if self.scheme == "ct":
            return (np.clip(image, *self.clip) - self.mean) / self.std
        for c in range(image.shape[0]):
            image[c] = (image[c] - image[c].mean()) / max(float(image[c].std()), 1e-8)
        return image


def label_mode(cases: Sequence[SpecialistCase], classes: Sequence[str]) -> str:
    """"softmax" when every class is one set of label values disjoint from the others, else
    "regions" (one sigmoid output per class, nnU-Net's region-based training)."""
    seen: set[int] = set()
    for concept in classes:
        values = {int(v) for case in cases for v in case.targets.get(concept, [])}
        if values & seen:
            return "regions"
        seen |= values
    return "softmax"


def encode_target(case: SpecialistCase, classes: Sequence[str], mode: str) -> np.ndarray:
    """softmax: (X, Y, Z) int64 with 0 = background, k = classes[k-1]; regions: (K, X, Y, Z) uint8."""
    if mode == "softmax":
        target = np.zeros(case.label.shape, np.int64)
        for k, concept in enumerate(classes, start=1):
            target[case.mask(concept)] = k
        return target
    return np.stack([case.mask(concept) for concept in classes]).astype(np.uint8)


@dataclass
class _Prepared:
    image: np.ndarray  # (C, X, Y, Z) normalised, padded to >= patch
    target: np.ndarray  # softmax (X, Y, Z) / regions (K, X, Y, Z), padded alike
    locations: list[np.ndarray]  # per class: (N, 3) voxel indices of its foreground


def _pad_to(array: np.ndarray, shape: Sequence[int], value: float = 0.0) -> np.ndarray:
    spatial = array.shape[-3:]
    pads = [(0, 0)] * (array.ndim - 3)
    for have, need in zip(spatial, shape):
        extra = max(0, need - have)
        pads.append((extra // 2, extra - extra // 2))
    return np.pad(array, pads, constant_values=value) if any(p != (0, 0) for p in pads) else array


def _prepare(case: SpecialistCase, classes: Sequence[str], mode: str, normaliser: IntensityNormaliser,
             patch: Sequence[int], rng: np.random.Generator) -> _Prepared:
    image = _pad_to(normaliser(case.image), patch)
    target = _pad_to(encode_target(case, classes, mode), patch)
    locations = []
    for k in range(len(classes)):
        fg = np.argwhere(target == k + 1) if mode == "softmax" else np.argwhere(target[k] > 0)
        if len(fg) > MAX_LOCATIONS_PER_CLASS:
            fg = fg[rng.choice(len(fg), MAX_LOCATIONS_PER_CLASS, replace=False)]
        locations.append(fg)
    return _Prepared(image, target, locations)


def _sample_batch(data: list[_Prepared], batch_size: int, patch: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random patches; the last round(33 %) of the batch centred on a random foreground voxel."""
    images, targets = [], []
    forced_from = round(batch_size * (1 - OVERSAMPLE_FOREGROUND))
    for i in range(batch_size):
        item = data[rng.integers(len(data))]
        shape = item.image.shape[-3:]
        classes_present = [loc for loc in item.locations if len(loc)]
        if i >= forced_from and classes_present:
            centre = classes_present[rng.integers(len(classes_present))]
            centre = centre[rng.integers(len(centre))]
            start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, shape)]
        else:
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
        window = tuple(slice(b, b + p) for b, p in zip(start, patch))
        images.append(item.image[(slice(None), *window)])
        targets.append(item.target[window] if item.target.ndim == 3 else item.target[(slice(None), *window)])
    return np.stack(images), np.stack(targets)


def _augment(image: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Light nnU-Net-like augmentation on a batch: mirroring, noise, brightness, contrast."""
    spatial = image.dim() - 3  # first spatial axis
    for axis in range(3):
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(spatial + axis)
            target = target.flip(target.dim() - 3 + axis)
    for b in range(image.shape[0]):
        if torch.rand((), generator=generator) < 0.1:
            variance = float(torch.rand((), generator=generator)) * 0.1
            image[b] += torch.randn(image[b].shape, generator=generator) * math.sqrt(variance)
        if torch.rand((), generator=generator) < 0.15:
            image[b] *= 0.75 + 0.5 * float(torch.rand((), generator=generator))
        if torch.rand((), generator=generator) < 0.15:
            factor = 0.75 + 0.5 * float(torch.rand((), generator=generator))
            low, high, mean = image[b].min(), image[b].max(), image[b].mean()
            image[b] = ((image[b] - mean) * factor + mean).clamp(low, high)
    return image, target


def build_network(plan: SpecialistPlan) -> torch.nn.Module:
    """MONAI DynUNet with the plan's kernels, strides and features (2 convs per stage)."""
    from monai.networks.nets import DynUNet

    deep = plan.deep_supervision_outputs > 0
    return DynUNet(
        spatial_dims=3,
        in_channels=plan.in_channels,
        out_channels=plan.num_classes,
        kernel_size=plan.kernel_sizes,
        strides=plan.strides,
        upsample_kernel_size=plan.strides[1:],
        filters=plan.features,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=deep,
        deep_supr_num=max(1, plan.deep_supervision_outputs),
    )


# ------------------------------------------------------------------------------------------ train
@dataclass
class SpecialistResult:
    """A trained specialist and what it took.

    Attributes:
        network: the trained DynUNet (eval mode).
        plan: its plan. classes: concept ids, in output order. mode: "softmax" or "regions".
        normaliser: the intensity scheme fitted on the training cases.
        steps: optimiser steps done. train_s: wall-clock training time (s).
        losses: training loss per step.
    """

    network: torch.nn.Module
    plan: SpecialistPlan
    classes: list[str]
    mode: str
    normaliser: IntensityNormaliser
    steps: int
    train_s: float
    losses: list[float] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())


def train_specialist(
    cases: Sequence[SpecialistCase],
    classes: Sequence[str],
    budget: TrainBudget,
    *,
    device: str | torch.device = "cpu",
    plan: SpecialistPlan | None = None,
    base_features: int = 32,
    patch_size: Sequence[int] | None = None,
    batch_size: int | None = None,
    augment: bool = True,
    seed: int = 0,
    log_every: int = 50,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
) -> SpecialistResult:
    """Plan (unless given) and train a specialist for `classes` on `cases` within `budget`.

    Args:
        cases: training cases, all at one spacing (a prepared cache guarantees it).
        classes: concept ids to learn (each annotated in the cases).
        budget: step and/or time budget.
        device: "cpu" or "cuda".
        plan: a ready plan; otherwise nnU-Net's planner runs on the cases' spacing and median shape.
        base_features, patch_size, batch_size: planner overrides (nnU-Net: 32, searched, searched).
        augment: light augmentation on (see the module docstring).
        seed: seeds sampling, augmentation and initialisation.
        checkpoint_dir: save the weights, optimiser, step, elapsed time and every RNG state here
            every `checkpoint_every` steps (a CPU run can then outlive a session).
        resume: continue from `checkpoint_dir`. With a step budget the result is the one an
            uninterrupted run gives (same sampling, augmentation and updates).
    """
    from monai.losses import DiceCELoss

    if not cases:
        raise DataError("no training cases given")
    if not classes:
        raise ConfigError("no classes to train; name at least one concept the dataset annotates")
    for concept in classes:
        if not any(concept in c.targets for c in cases):
            raise DataError(f"no training case annotates {concept!r}; the cases annotate {sorted({t for c in cases for t in c.targets})}")
    spacings = {tuple(round(s, 3) for s in c.spacing_mm) for c in cases}
    if len(spacings) > 1:
        raise DataError(f"training cases have several spacings {sorted(spacings)}; prepare them at one spacing (--spacing)")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mode = label_mode(cases, classes)
    channels = {c.image.shape[0] for c in cases}
    if len(channels) != 1:
        raise DataError(f"cases have different channel counts {sorted(channels)}")
    if plan is None:
        median = np.median([c.label.shape for c in cases], axis=0)
        plan = plan_specialist(
            next(iter(spacings)), median, num_classes=len(classes) + (1 if mode == "softmax" else 0),
            in_channels=channels.pop(), num_cases=len(cases), base_features=base_features,
            patch_size=patch_size, batch_size=batch_size,
        )
    logger.info("specialist plan: patch %s, batch %d, features %s, strides %s, deep supervision +%d",
                plan.patch_size, plan.batch_size, plan.features, plan.strides, plan.deep_supervision_outputs)
    normaliser = IntensityNormaliser.fit(cases, classes, seed)
    data = [_prepare(c, classes, mode, normaliser, plan.patch_size, rng) for c in cases]

    network = build_network(plan).to(device)
    optimizer = torch.optim.SGD(network.parameters(), lr=INITIAL_LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    if mode == "softmax":
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5)
    else:
        loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    weights = deep_supervision_weights(plan.deep_supervision_outputs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    generator = torch.Generator().manual_seed(seed)

    network.train()
    losses: list[float] = []
    step = 0
    done_s = 0.0  # training seconds of earlier (resumed) parts
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if folder is None or not (folder / _STATE_FILE).is_file():
            raise ConfigError(f"resume needs a checkpoint in {folder}; none found (start without --resume)")
        step, done_s, losses = _load_checkpoint(folder, plan, network, optimizer, rng, generator)
        logger.info("resumed the specialist at step %d (%.0f s trained)", step, done_s)
    start = time.perf_counter() - done_s
    while True:
        elapsed = time.perf_counter() - start
        progress = budget.progress(step, elapsed)
        if progress >= 1.0:
            break
        for group in optimizer.param_groups:
            group["lr"] = INITIAL_LR * (1 - progress) ** POLY_EXPONENT
        images, targets = _sample_batch(data, plan.batch_size, plan.patch_size, rng)
        image_t = torch.from_numpy(images)
        target_t = torch.from_numpy(targets)
        if mode == "softmax":
            target_t = target_t.unsqueeze(1)  # (B, 1, X, Y, Z) class indices
        target_t = target_t.float()
        if augment:
            image_t, target_t = _augment(image_t, target_t, generator)
        image_t, target_t = image_t.to(device), target_t.to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            output = network(image_t)  # (B, 1 + ds, K, X, Y, Z) with deep supervision, else (B, K, X, Y, Z)
        output = output.float()
        if output.dim() == 6:
            loss = sum(w * loss_fn(output[:, i], target_t) for i, w in enumerate(weights))
        else:
            loss = loss_fn(output, target_t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), GRAD_CLIP)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if log_every and step % log_every == 0:
            logger.info("step %d, loss %.4f, lr %.5f, %.0f s", step, float(np.mean(losses[-log_every:])),
                        optimizer.param_groups[0]["lr"], time.perf_counter() - start)
        if folder is not None and checkpoint_every and step % checkpoint_every == 0:
            _save_checkpoint(folder, plan, network, optimizer, rng, generator, step, time.perf_counter() - start, losses)
    train_s = time.perf_counter() - start
    network.eval()
    return SpecialistResult(network, plan, list(classes), mode, normaliser, step, train_s, losses)


_STATE_FILE = "trainer_state.pt"


def _save_checkpoint(folder: Path, plan: SpecialistPlan, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rng: np.random.Generator, generator: torch.Generator, step: int, elapsed_s: float,
                     losses: list[float]) -> None:
    """Weights (safetensors) + trainer state, written to temporary names and then renamed."""
    import json

    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(network, str(folder / "model.safetensors.tmp"))
    state = {"step": step, "elapsed_s": elapsed_s, "losses": torch.tensor(losses, dtype=torch.float64),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "generator": generator.get_state(),
             "numpy_rng": json.dumps(rng.bit_generator.state), "plan": json.dumps(plan.to_dict())}
    torch.save(state, folder / (_STATE_FILE + ".tmp"))
    (folder / "model.safetensors.tmp").replace(folder / "model.safetensors")
    (folder / (_STATE_FILE + ".tmp")).replace(folder / _STATE_FILE)


def _load_checkpoint(folder: Path, plan: SpecialistPlan, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     rng: np.random.Generator, generator: torch.Generator) -> tuple[int, float, list[float]]:
    import json

    from safetensors.torch import load_model

    state = torch.load(folder / _STATE_FILE, map_location="cpu", weights_only=True)
    if json.loads(state["plan"]) != json.loads(json.dumps(plan.to_dict())):
        raise ConfigError(f"the checkpoint in {folder} was trained with another plan; resume with the same "
                          "data, classes and planner options")
    load_model(network, str(folder / "model.safetensors"), device=str(next(network.parameters()).device))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["generator"])
    rng.bit_generator.state = json.loads(state["numpy_rng"])
    return int(state["step"]), float(state["elapsed_s"]), [float(x) for x in state["losses"]]


def save_specialist(result: SpecialistResult, folder: str | Path) -> Path:
    """Write a trained specialist as ``plan.json`` (plan, classes, mode, normaliser) + ``model.safetensors``.

    DynUNet holds each block twice (``skip_layers`` aliases the stage lists), so the weights are
    written with ``safetensors.torch.save_model``, which stores shared tensors once.
    """
    import json

    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**result.plan.to_dict(), "classes": result.classes, "mode": result.mode,
            "normaliser": vars(result.normaliser),
            "steps": result.steps, "train_s": result.train_s}
    (folder / "plan.json").write_text(json.dumps(meta, indent=2))
    save_model(result.network, str(folder / "model.safetensors"))
    return folder


def load_specialist(folder: str | Path, device: str | torch.device = "cpu") -> SpecialistResult:
    """Read a specialist written by :func:`save_specialist` (eval mode)."""
    import dataclasses
    import json

    from safetensors.torch import load_model

    folder = Path(folder)
    if not (folder / "plan.json").is_file() or not (folder / "model.safetensors").is_file():
        raise DataError(f"{folder} is not a saved specialist (needs plan.json and model.safetensors)")
    meta = json.loads((folder / "plan.json").read_text())
    plan = SpecialistPlan(**{f.name: meta[f.name] for f in dataclasses.fields(SpecialistPlan) if f.name in meta})
    norm = meta["normaliser"]
    normaliser = IntensityNormaliser(**{k: tuple(v) if isinstance(v, list) else v for k, v in norm.items()})
    network = build_network(plan).to(torch.device(device))
    load_model(network, str(folder / "model.safetensors"), device=str(torch.device(device)))
    network.eval()
    return SpecialistResult(network, plan, list(meta["classes"]), meta["mode"], normaliser,
                            int(meta.get("steps", 0)), float(meta.get("train_s", 0.0)))


# ------------------------------------------------------------------------------------------ predict
def predict_specialist(
    result: SpecialistResult,
    image: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    overlap: float = 0.5,
    mirror: bool = False,
    sw_batch_size: int = 2,
) -> dict[str, np.ndarray]:
    """Masks (X, Y, Z) bool per class for one image (C, X, Y, Z) on the training spacing.

    Sliding window with Gaussian blending and 50 % overlap (nnU-Net's tile step 0.5); with
    `mirror`, the average over all 8 axis flips (nnU-Net's test-time mirroring).
    """
    from monai.inferers import sliding_window_inference

    device = torch.device(device)
    network = result.network.to(device).eval()
    normalised = torch.from_numpy(result.normaliser(image))[None].to(device)  # (1, C, X, Y, Z)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    activation = (lambda x: torch.softmax(x.float(), 1)) if result.mode == "softmax" else (lambda x: torch.sigmoid(x.float()))

    def predictor(window: torch.Tensor) -> torch.Tensor:
        flips = [()] if not mirror else [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
        total = None
        with autocast:
            for axes in flips:
                x = window.flip(axes) if axes else window
                prob = activation(network(x))
                prob = prob.flip(axes) if axes else prob
                total = prob if total is None else total + prob
        return total / len(flips)

    with torch.inference_mode():
        probabilities = sliding_window_inference(
            normalised, roi_size=tuple(result.plan.patch_size), sw_batch_size=sw_batch_size,
            predictor=predictor, overlap=overlap, mode="gaussian",
        )[0].cpu()  # (K, X, Y, Z)
    if result.mode == "softmax":
        labels = probabilities.argmax(0).numpy()
        return {concept: labels == k for k, concept in enumerate(result.classes, start=1)}
    return {concept: (probabilities[k] > 0.5).numpy() for k, concept in enumerate(result.classes)}
