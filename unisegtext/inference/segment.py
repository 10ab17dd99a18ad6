"""`segment()`: the user-facing pipeline around the network.

volume -> resolve prompts -> encode text once -> preprocess -> sliding window (backbone once
per window for all prompts, prompts decoded in chunks) -> back to the input grid -> result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unisegtext.errors import UniSegError
from unisegtext.inference.postprocessing import restore_mask
from unisegtext.inference.preprocessing import PreparedVolume, preprocess, restore
from unisegtext.inference.presence import decide, presence_features, presence_probability
from unisegtext.inference.prompts import check_prompts, resolve_prompts
from unisegtext.inference.result import SegmentationResult
from unisegtext.io import VolumeLike, read_volume
from unisegtext.models import UniSegText

logger = logging.getLogger(__name__)

_MODEL_CACHE: OrderedDict[tuple[str, str], UniSegText] = OrderedDict()
_MODEL_CACHE_SIZE = 2


def load_model(model: UniSegText | str | None, device: torch.device) -> UniSegText:
    """A model instance: given, or loaded (and cached, at most two) by name or folder."""
    if isinstance(model, UniSegText):
        return model.to(device).eval()
    key = (str(model) if model is not None else "", str(device))
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = UniSegText.from_pretrained(model, device=device)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    _MODEL_CACHE.move_to_end(key)
    return _MODEL_CACHE[key]


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UniSegError("device 'cuda' was asked for but no CUDA GPU is available; use device='cpu'")
    return device


def predict_probabilities(
    model: UniSegText,
    prepared: PreparedVolume,
    text_embeddings: torch.Tensor,
    *,
    overlap: float,
    sw_batch_size: int,
    max_prompts_per_pass: int,
    blend_mode: str = "gaussian",
    progress: bool = False,
    autocast_dtype: torch.dtype | None | str = "auto",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sliding-window probabilities (P, X', Y', Z') in model space.

    The backbone runs once per window; prompts are decoded from its features in chunks of
    `max_prompts_per_pass`, so many prompts cost little more than one.

    Args:
        autocast_dtype: "auto" (bf16 on CUDA; on the CPU when the model's config asks for it
            and the CPU has native bf16), a dtype, or None (float32).
    """
    from monai.inferers import sliding_window_inference

    device = text_embeddings.device
    patch = tuple(model.config.preprocessing.patch_size)
    if autocast_dtype == "auto":
        autocast_dtype = default_autocast_dtype(model, device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    channels_last = device.type == "cpu"

    def predictor(window: torch.Tensor) -> torch.Tensor:
        if channels_last:  # oneDNN's fast path for 3D convolutions on the CPU
            window = window.contiguous(memory_format=torch.channels_last_3d)
        with autocast:
            features = model.encode_image(window)
            chunks = [
                torch.sigmoid(model.decode(features, text_embeddings[i : i + max_prompts_per_pass]).float() / temperature)
                for i in range(0, text_embeddings.shape[0], max_prompts_per_pass)
            ]
        return torch.cat(chunks, dim=1)

    image = prepared.image.unsqueeze(0).to(device)  # (1, 1, X', Y', Z')
    n_windows = math.prod(max(1, math.ceil((s - p) / (p * (1 - overlap))) + 1) if s > p else 1 for s, p in zip(image.shape[2:], patch))
    with torch.inference_mode():
        probabilities = sliding_window_inference(
            image,
            roi_size=patch,
            sw_batch_size=sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode=blend_mode,
            padding_mode="constant",
            cval=prepared.pad_value,
            progress=progress and n_windows >= 8,
        )
    return probabilities[0]  # (P, X', Y', Z')


def _in_unit_interval(value: Any) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return 0.0 <= value <= 1.0


def _modality_warnings(resolution, modality: str, how: str) -> list[str]:
    """A warning when the knowledge tree says the concept is not seen in this modality."""
    if resolution.concept_id is None:
        return []
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    members = resolution.union_of or [resolution.concept_id]
    seen_in = {m: tree.get(m).modalities for m in members if m in tree}
    wrong = [m for m, mods in seen_in.items() if mods and modality not in mods]
    if not wrong:
        return []
    note = f"{resolution.prompt!r} ({', '.join(wrong)}) is recorded in the knowledge tree as seen in " \
           f"{'/'.join(sorted({x for m in wrong for x in seen_in[m]}))} only, but the scan is {modality}" \
           f"{' (guessed)' if how == 'guessed' else ''}; the mask is unlikely to be meaningful"
    logger.warning(note)
    return [note]


def _training_support_warnings(resolution, config) -> list[str]:
    """A warning when the concept (or a member of a union) was learnt from fewer training scans
    than ``inference.warn_below_training_scans`` (the checkpoint's ``concept_training_scans``)."""
    counts, bound = config.concept_training_scans, config.inference.warn_below_training_scans
    if resolution.concept_id is None or not counts or bound <= 0:
        return []
    members = resolution.union_of or [resolution.concept_id]
    few = {m: counts[m] for m in members if m in counts and counts[m] < bound}
    if not few:
        return []
    listed = ", ".join(f"{m} from {n} scan{'s' if n != 1 else ''}" for m, n in few.items())
    note = (f"{resolution.prompt!r}: this model learnt {listed}, too few to have been validated on held-out scans; "
            "treat the mask as a rough draft and check it (the model card lists the validated structures)")
    logger.warning(note)
    return [note]


def postprocess_probabilities(probabilities: torch.Tensor, texts: Sequence[str], resolutions, config, threshold: float) -> torch.Tensor:
    """Model-space post-processing of (P, X', Y', Z') probabilities, one map per queried text:
    with ``inference.keep_largest_component``, a concept that the knowledge tree marks
    ``single_component`` keeps only its largest connected blob (members of a union each
    keep theirs: "kidney" = the largest left + the largest right blob)."""
    if not config.inference.keep_largest_component:
        return probabilities
    from unisegtext.inference.postprocessing import keep_largest_component
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    single = set()
    for r in resolutions:
        members = r.union_of or ([r.concept_id] if r.concept_id else [])
        for concept_id, text in zip(members, r.text):
            if concept_id in tree and tree.get(concept_id).single_component:
                single.add(text)
    out = probabilities.clone() if single else probabilities
    for i, text in enumerate(texts):
        if text in single:
            out[i] = keep_largest_component(out[i], threshold)
    return out


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is
    about twice as fast as float32; elsewhere it is emulated and much slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def default_autocast_dtype(model: UniSegText, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA; on the CPU when the model's config asks for it and the CPU supports it."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and model.config.inference.bf16_cpu and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def segment(
    volume: VolumeLike,
    prompts: Sequence[str] | str,
    model: UniSegText | str | None = None,
    *,
    affine: np.ndarray | None = None,
    modality: str | None = None,
    device: str | torch.device | None = None,
    threshold: float | None = None,
    overlap: float | None = None,
    return_probabilities: bool = False,
    progress: bool = True,
    open_vocabulary: bool = False,
    channel: int | None = None,
    sw_batch_size: int | None = None,
    max_prompts_per_pass: int | None = None,
    max_memory_gb: float | None = None,
    series_uid: str | None = None,
    backend_options: dict[str, dict[str, Any]] | None = None,
) -> SegmentationResult:
    """Segment the structures named by `prompts` in a 3D CT or MR scan.

    Args:
        volume: a NIfTI path, DICOM folder/zip, nibabel image, :class:`~unisegtext.io.Volume`
            or numpy array (with `affine`).
        prompts: anatomical terms ("liver", "R kidney", "kidney tumor", "L1").
        model: a :class:`UniSegText`, a checkpoint folder, a Hub repo id, or None for the
            built-in default (`unisegtext-nano`); or a backend name
            ("totalsegmentator:total", "totalsegmentator:total_fast",
            "totalsegmentator:total_mr"), "auto" (each prompt to the first installed model
            of ``unisegtext/backends/routing.json`` that knows it), or a list of these in
            order of preference (see :mod:`unisegtext.inference.routing`).
        affine: (4, 4) voxel -> RAS mm matrix when `volume` is an array.
        modality: "CT" or "MR" (default: from DICOM, else guessed from intensities).
        device: "cpu", "cuda" or None (CUDA when available).
        threshold: probability above which a voxel is in the mask (default from the model).
        overlap: sliding-window overlap in [0, 1) (default from the model).
        return_probabilities: also return float probability maps.
        progress: show a progress bar on volumes that need many windows.
        open_vocabulary: run prompts that match no concept on their raw text (with a warning)
            instead of raising :class:`~unisegtext.errors.UnknownConceptError`.
        channel: for 4D inputs, which volume to segment.
        sw_batch_size: windows per forward pass.
        max_prompts_per_pass: prompts decoded together from one window's features.
        max_memory_gb: refuse a run whose estimated peak memory is larger (default: 80 % of
            the machine's RAM, or ``UNISEGTEXT_MAX_MEMORY_GB``); the estimate is made from the
            header, before anything large is allocated.
        series_uid: for a DICOM folder or zip with several series, which one.
        backend_options: per backend name, options such as the weights' location:
            ``{"totalsegmentator:total": {"weights": "Dataset291_...zip"}}``.

    Returns:
        A :class:`SegmentationResult` with one bool mask per prompt on the input grid.
    """
    from unisegtext.inference.routing import is_routed, segment_routed
    from unisegtext.resources import (
        check_memory,
        check_overlap,
        estimate_run_memory,
        model_grid_shape,
        window_activation_bytes,
    )

    if is_routed(model):  # backend names, "auto" or a list: the routing table decides per prompt
        return segment_routed(volume, prompts, model, modality=modality, device=device, threshold=threshold,
                              max_memory_gb=max_memory_gb, series_uid=series_uid, channel=channel, affine=affine,
                              progress=progress, overlap=overlap, open_vocabulary=open_vocabulary,
                              sw_batch_size=sw_batch_size, max_prompts_per_pass=max_prompts_per_pass,
                              backend_options=backend_options)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    prompts = check_prompts(prompts)
    if threshold is not None and not _in_unit_interval(threshold):
        raise UniSegError(f"threshold must be a number within [0, 1], got {threshold!r}")
    for name, value, most in (("sw_batch_size", sw_batch_size, 64), ("max_prompts_per_pass", max_prompts_per_pass, 1024)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most):
            raise UniSegError(f"{name} must be an integer within 1..{most}, got {value!r}")
    vol = read_volume(volume, affine, modality=modality, channel=channel, series_uid=series_uid,
                      max_memory_gb=max_memory_gb)
    timings["read"] = time.perf_counter() - t0

    dev = pick_device(device)
    t = time.perf_counter()
    net = load_model(model, dev)
    cfg = net.config
    timings["load_model"] = time.perf_counter() - t
    threshold = cfg.inference.threshold if threshold is None else float(threshold)
    overlap = cfg.inference.overlap if overlap is None else overlap

    t = time.perf_counter()
    resolutions = resolve_prompts(prompts, cfg.concepts, cfg.text.template, open_vocabulary=open_vocabulary)
    texts = list(dict.fromkeys(text for r in resolutions for text in r.text))

    # every bound is checked from the header before anything large is allocated
    grid = model_grid_shape(vol.shape, vol.spacing, cfg.preprocessing.spacing_mm)
    check_overlap(overlap, grid, cfg.preprocessing.patch_size)
    overlap = float(overlap)
    sw_batch_size = sw_batch_size or cfg.inference.sw_batch_size
    max_prompts_per_pass = max_prompts_per_pass or cfg.inference.max_prompts_per_pass
    windows = window_activation_bytes(
        cfg.preprocessing.patch_size, cfg.backbone.channels, cfg.backbone.embed_dim, cfg.decoder.feature_levels,
        cfg.decoder.d_model, len(texts), max_prompts_per_pass, sw_batch_size)
    estimate = estimate_run_memory(vol.shape, vol.spacing, cfg.preprocessing.spacing_mm, len(texts), len(prompts),
                                   return_probabilities=return_probabilities, window_bytes=windows)
    check_memory(estimate, max_memory_gb, f"segmenting {vol.source or 'the scan'} {vol.shape} at "
                                          f"{tuple(round(s, 3) for s in vol.spacing)} mm with {len(prompts)} prompt(s)")
    chosen_modality, modality_source = vol.decide_modality()
    if modality_source == "guessed":
        logger.warning("the modality was not given; %s was guessed from the intensities of %s. Pass modality= "
                       "(CLI: --modality) if that is wrong", chosen_modality, vol.source or "the scan")
    for r in resolutions:
        r.warnings.extend(_modality_warnings(r, chosen_modality, modality_source))
        r.warnings.extend(_training_support_warnings(r, cfg))

    with torch.inference_mode():
        text_embeddings = net.encode_text(texts).to(dev)
    timings["text"] = time.perf_counter() - t

    t = time.perf_counter()
    prepared = preprocess(vol, cfg.preprocessing, modality=chosen_modality)
    timings["preprocess"] = time.perf_counter() - t

    t = time.perf_counter()
    temperature = cfg.inference.temperature_for(chosen_modality)
    probabilities = predict_probabilities(
        net, prepared, text_embeddings,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        max_prompts_per_pass=max_prompts_per_pass,
        blend_mode=cfg.inference.blend_mode,
        progress=progress,
        temperature=temperature,
    )
    timings["inference"] = time.perf_counter() - t

    t = time.perf_counter()
    probabilities = postprocess_probabilities(probabilities, texts, resolutions, cfg, threshold)
    index = {text: i for i, text in enumerate(texts)}
    voxel_ml = float(np.prod(cfg.preprocessing.spacing_mm)) / 1000.0
    presence_model = cfg.inference.presence or None
    text_presence: dict[str, tuple[float, bool]] = {}
    text_features: dict[str, np.ndarray] = {}
    for text, i in index.items():
        features = presence_features(probabilities[i], threshold, voxel_ml, temperature)
        probability = presence_probability(features, presence_model)
        text_presence[text] = (probability, decide(probability, features, presence_model))
        text_features[text] = features
    masks: dict[str, np.ndarray] = {}
    probs_out: dict[str, np.ndarray] | None = {} if return_probabilities else None
    scores: dict[str, float] = {}
    presence: dict[str, float] = {}
    present: dict[str, bool] = {}
    features_out: dict[str, list[float]] = {}
    for r in resolutions:
        # a union is present when any member is; its mask is the union of its present members
        kept = [text for text in r.text if text_presence[text][1]]
        presence[r.prompt] = max(text_presence[text][0] for text in r.text)
        strongest = max(r.text, key=lambda text: text_presence[text][0])
        features_out[r.prompt] = [round(float(v), 6) for v in text_features[strongest]]
        present[r.prompt] = bool(kept)
        # a union prompt's probability is the voxel-wise max of its members (trilinear
        # resampling and the max commute with thresholding only this way round: max first in
        # model space would differ), so its mask is exactly the union of the members' masks
        members = probabilities[[index[text] for text in r.text]]
        if probs_out is not None:
            prob = restore(members, prepared).max(axis=0)
            probs_out[r.prompt] = prob.astype(np.float32)
            if kept:
                prob = restore(probabilities[[index[text] for text in kept]], prepared).max(axis=0)
                mask = prob > threshold
            else:
                mask = np.zeros(vol.shape, dtype=bool)
            scores[r.prompt] = float(prob[mask].mean()) if mask.any() else 0.0
        elif kept:
            parts = [restore_mask(probabilities[index[text]], prepared, threshold) for text in kept]
            mask = np.logical_or.reduce([m for m, _ in parts]) if len(parts) > 1 else parts[0][0]
            scores[r.prompt] = max(score for _, score in parts)
        else:
            mask = np.zeros(vol.shape, dtype=bool)
            scores[r.prompt] = 0.0
        masks[r.prompt] = mask
        present[r.prompt] = present[r.prompt] and bool(mask.any())  # "present" always has voxels
    absent = [p for p, v in present.items() if not v]
    if absent:
        logger.info("absent from the scan (empty masks): %s", ", ".join(absent))
    timings["postprocess"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return SegmentationResult(
        masks=masks,
        resolutions={r.prompt: r for r in resolutions},
        volume=vol,
        probabilities=probs_out,
        scores=scores,
        timings=timings,
        model={"name": net.name_or_path or "in-memory model", "weights_sha256": net.weights_sha256,
               "preset": cfg.preset, "head": cfg.decoder.head, "device": str(dev)},
        modality=chosen_modality,
        modality_source=modality_source,
        presence=presence,
        present=present,
        presence_features=features_out,
    )


def segment_many(volumes: Sequence[VolumeLike], prompts: Sequence[str], model: UniSegText | str | None = None, **kwargs: Any) -> list[SegmentationResult]:
    """Segment several scans with one model load; prompt embeddings are cached across scans."""
    dev = pick_device(kwargs.pop("device", None))
    net = load_model(model, dev)
    return [segment(v, prompts, net, device=dev, **kwargs) for v in volumes]
