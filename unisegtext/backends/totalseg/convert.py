"""One-time conversion of nnU-Net v2 results (TotalSegmentator's release zips) to our format.

A TotalSegmentator release zip holds one nnU-Net results folder::

    DatasetNNN_<name>/<trainer>__<plans>__<configuration>/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

The converter is the only place that reads the foreign format. The checkpoint is a pickle; it is
read with ``torch.load(weights_only=True)`` and an allowlist of numpy's scalar and dtype classes
(nnU-Net stores numpy numbers in its training log), so a file that would import anything else,
e.g. a function to call on load, is refused with :class:`UnsafeCheckpointError` before any of it
runs. Each results folder becomes one *part* folder::

    <out>/<DatasetNNN_name>/config.json       architecture, preprocessing, labels, provenance
    <out>/<DatasetNNN_name>/model.safetensors  the network weights (DNA aliases dropped)

Inference reads only these two files (safetensors, strict loading), never the pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unisegtext.errors import ModelLoadError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "unisegtext/nnunet-part"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint_final.pth"
# nnU-Net results folder: <trainer>__<plans>__<configuration>
_RESULTS_DIR = re.compile(r"^(?P<trainer>[^/]+?)__(?P<plans>[^/]+?)__(?P<configuration>[^/]+)$")
# the only resampling functions our preprocessing reproduces (nnU-Net's defaults)
SUPPORTED_RESAMPLING = ("resample_data_or_seg_to_shape",)
SUPPORTED_NORMALIZATION = ("CTNormalization", "ZScoreNormalization", "NoNormalization")


@dataclass
class ResultsFolder:
    """One nnU-Net results folder found in a zip or on disk."""

    dataset_name: str
    trainer: str
    plans_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    checkpoint_path: Path  # a real file (a temporary copy for zips)
    origin: str


def _numpy_safe_globals() -> list[Any]:
    """numpy's scalar and dtype classes: what nnU-Net's training log pickles besides tensors."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [scalar, np.dtype,
                          # numpy-1.x pickles name the scalar by its old module path
                          (scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes by their class
        for name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(dtypes, name):
                allowed.append(getattr(dtypes, name))
    return allowed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an nnU-Net checkpoint without letting it run code.

    Raises:
        UnsafeCheckpointError: the pickle names anything besides tensors, plain containers and
            numpy scalars/dtypes (it could execute code when unpickled with weights_only=False).
        ModelLoadError: the file is missing, truncated or not a checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; an nnU-Net results folder has fold_0/{CHECKPOINT_NAME}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "global" in line.lower()), first[0] if first else "")
        raise UnsafeCheckpointError(
            f"{path} was refused: it is a pickle that asks for more than tensors, numbers and numpy "
            f"scalars ({detail.strip()}). Loading it the usual way (weights_only=False) could run code "
            "hidden in the file. Use the official release zip, or convert a checkpoint you trust yourself"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{path} could not be read as a torch checkpoint ({exc})") from exc
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise ModelLoadError(f"{path} is not an nnU-Net checkpoint (no 'network_weights' dict)")
    return checkpoint


def find_results(source: str | Path, workdir: Path, *, fold: int = 0, only: set[str] | None = None) -> list[ResultsFolder]:
    """nnU-Net results folders in `source` (a zip or a folder), checkpoints copied out of zips;
    with `only`, just those of these dataset names."""
    source = Path(source).expanduser()
    if not source.exists():
        raise ModelLoadError(f"{source} does not exist; pass a TotalSegmentator release zip or a results folder")
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise ModelLoadError(f"{source} is not a zip file; pass the release zip or an extracted results folder")
        return _results_in_zip(source, workdir, fold, only)
    found = []
    candidates = [source, *sorted(p.parent for p in source.rglob("plans.json"))]
    for folder in dict.fromkeys(candidates):
        match = _RESULTS_DIR.match(folder.name)
        if not match or not (folder / "plans.json").is_file() or (only is not None and folder.parent.name not in only):
            continue
        found.append(ResultsFolder(
            dataset_name=folder.parent.name,
            trainer=match["trainer"], plans_name=match["plans"], configuration=match["configuration"],
            plans=_read_json(folder / "plans.json"), dataset_json=_read_json(folder / "dataset.json"),
            checkpoint_path=folder / f"fold_{fold}" / CHECKPOINT_NAME, origin=str(folder),
        ))
    for zipped in sorted(source.glob("*.zip")):
        if only is None or zipped.stem in only:
            found.extend(_results_in_zip(zipped, workdir, fold, only))
    return found


def _results_in_zip(path: Path, workdir: Path, fold: int, only: set[str] | None = None) -> list[ResultsFolder]:
    found = []
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            for name in sorted(n for n in names if n.endswith("/plans.json")):
                folder = name[: -len("/plans.json")]
                parts = folder.split("/")
                match = _RESULTS_DIR.match(parts[-1])
                checkpoint = f"{folder}/fold_{fold}/{CHECKPOINT_NAME}"
                dataset_name = parts[-2] if len(parts) > 1 else path.stem
                if not match or checkpoint not in names or f"{folder}/dataset.json" not in names:
                    continue
                if only is not None and dataset_name not in only:
                    continue
                # copied under a name of our choosing: member names never become paths
                target = workdir / f"{len(list(workdir.iterdir()))}_{CHECKPOINT_NAME}"
                with archive.open(checkpoint) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                found.append(ResultsFolder(
                    dataset_name=dataset_name,
                    trainer=match["trainer"], plans_name=match["plans"], configuration=match["configuration"],
                    plans=_json_member(archive, name), dataset_json=_json_member(archive, f"{folder}/dataset.json"),
                    checkpoint_path=target, origin=f"{path}:{folder}",
                ))
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(f"{path} is not a readable zip ({exc}); download it again") from exc
    if not found and only is None:
        raise ModelLoadError(
            f"{path} holds no nnU-Net results folder (<trainer>__<plans>__<configuration>/ with plans.json, "
            f"dataset.json and fold_{fold}/{CHECKPOINT_NAME}); is it a TotalSegmentator weights zip?"
        )
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} could not be read as JSON ({exc})") from exc


def _json_member(archive: zipfile.ZipFile, name: str) -> dict[str, Any]:
    try:
        return json.loads(archive.read(name))
    except ValueError as exc:
        raise ModelLoadError(f"{name} in {archive.filename} is not valid JSON ({exc})") from exc


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A plans configuration with `inherits_from` resolved (parent first, child overrides)."""
    configurations = plans.get("configurations", {})
    seen: list[str] = []
    chain = []
    while name is not None:
        if name in seen:
            raise ModelLoadError(f"plans configurations inherit in a circle: {' -> '.join([*seen, name])}")
        if name not in configurations:
            raise ModelLoadError(f"plans.json has no configuration {name!r} (it has {sorted(configurations)})")
        seen.append(name)
        chain.append(configurations[name])
        name = configurations[name].get("inherits_from")
    merged: dict[str, Any] = {}
    for block in reversed(chain):
        merged.update(block)
    return merged


def labels_from_dataset_json(dataset_json: dict[str, Any], what: str) -> tuple[dict[int, str], int]:
    """(label id -> class name without background, number of network outputs)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise ModelLoadError(f"{what}: dataset.json has no 'labels'")
    if dataset_json.get("regions_class_order") or any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        raise ModelLoadError(f"{what}: region-based nnU-Net models are not supported (labels with several values)")
    ids = {name: int(v[0] if isinstance(v, (list, tuple)) else v) for name, v in labels.items() if name != "ignore"}
    if sorted(ids.values()) != list(range(len(ids))):
        raise ModelLoadError(f"{what}: dataset.json labels are not 0..N without gaps: {sorted(ids.values())[:10]}...")
    class_map = {v: name for name, v in ids.items() if v != 0}
    return dict(sorted(class_map.items())), len(ids)


def part_config(results: ResultsFolder, checkpoint: dict[str, Any], *, provenance: dict[str, Any]) -> dict[str, Any]:
    """Our config.json for one results folder (everything inference needs, nothing pickled)."""
    try:
        return _part_config(results, checkpoint, provenance)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{results.origin}: plans.json or dataset.json lacks or garbles {exc}") from exc


def _part_config(results: ResultsFolder, checkpoint: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    from unisegtext.backends.totalseg.network import UNetArchitecture

    what = results.origin
    init_args = checkpoint.get("init_args") or {}
    configuration_name = init_args.get("configuration") or results.configuration
    configuration = resolve_configuration(results.plans, configuration_name)
    if configuration.get("previous_stage"):
        raise ModelLoadError(f"{what}: cascade configurations ({configuration_name}) are not supported")
    channel_names = results.dataset_json.get("channel_names") or results.dataset_json.get("modality") or {}
    if not channel_names:
        raise ModelLoadError(f"{what}: dataset.json has no 'channel_names'")
    class_map, n_outputs = labels_from_dataset_json(results.dataset_json, what)
    arch = UNetArchitecture.from_plans(configuration, input_channels=len(channel_names), num_classes=n_outputs)
    preprocessing = {
        "transpose_forward": [int(i) for i in results.plans["transpose_forward"]],
        "transpose_backward": [int(i) for i in results.plans["transpose_backward"]],
        "spacing": [float(s) for s in configuration["spacing"]],
        "patch_size": [int(p) for p in configuration["patch_size"]],
        "normalization_schemes": list(configuration["normalization_schemes"]),
        "use_mask_for_norm": [bool(b) for b in configuration["use_mask_for_norm"]],
        "foreground_intensity_properties_per_channel": _intensity_properties(results.plans),
        "resampling_fn_data": configuration.get("resampling_fn_data", "resample_data_or_seg_to_shape"),
        "resampling_fn_data_kwargs": configuration.get("resampling_fn_data_kwargs", {}),
        "resampling_fn_probabilities": configuration.get("resampling_fn_probabilities", "resample_data_or_seg_to_shape"),
        "resampling_fn_probabilities_kwargs": configuration.get("resampling_fn_probabilities_kwargs", {}),
        "image_reader_writer": results.plans.get("image_reader_writer"),
        "channel_names": {str(k): v for k, v in channel_names.items()},
    }
    if len(preprocessing["spacing"]) != 3 or len(preprocessing["patch_size"]) != 3:
        raise ModelLoadError(f"{what}: configuration {configuration_name!r} is not 3D; only 3D models are supported")
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if preprocessing[key] not in SUPPORTED_RESAMPLING:
            raise ModelLoadError(f"{what}: plans {key}={preprocessing[key]!r} is not supported ({SUPPORTED_RESAMPLING})")
    unknown = [s for s in preprocessing["normalization_schemes"] if s not in SUPPORTED_NORMALIZATION]
    if unknown:
        raise ModelLoadError(f"{what}: normalisation {unknown} is not supported ({SUPPORTED_NORMALIZATION})")
    if len(preprocessing["normalization_schemes"]) != len(channel_names):
        raise ModelLoadError(f"{what}: {len(channel_names)} channels but normalisation for "
                             f"{len(preprocessing['normalization_schemes'])}")
    mirroring = checkpoint.get("inference_allowed_mirroring_axes")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dataset_name": results.dataset_name,
        "trainer": str(checkpoint.get("trainer_name") or results.trainer),
        "plans_name": results.plans_name,
        "configuration": configuration_name,
        "architecture": arch.to_dict(),
        "preprocessing": preprocessing,
        "labels": class_map,
        "checkpoint": {
            "epoch": _plain(checkpoint.get("current_epoch")),
            "inference_allowed_mirroring_axes": None if mirroring is None else [int(a) for a in mirroring],
        },
        **provenance,
    }


def _intensity_properties(plans: dict[str, Any]) -> dict[str, dict[str, float]]:
    props = plans.get("foreground_intensity_properties_per_channel")
    if props is None:
        props = plans.get("foreground_intensity_properties_by_modality", {})
    return {str(c): {k: float(v) for k, v in p.items()} for c, p in props.items()}


def _plain(value: Any) -> Any:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def convert(
    source: str | Path,
    out_dir: str | Path,
    *,
    fold: int = 0,
    provenance: dict[str, Any] | None = None,
    only: set[str] | None = None,
) -> list[Path]:
    """Convert every results folder in `source` (zip or folder) into `out_dir/<dataset name>/`.

    Args:
        source: a TotalSegmentator release zip, an extracted results folder, or a folder holding
            several of either (e.g. TotalSegmentator's own ``~/.totalsegmentator/nnunet/results``).
        out_dir: where the part folders go (existing ones with the same name are replaced).
        fold: which fold's checkpoint to read (TotalSegmentator ships fold 0).
        provenance: extra config.json fields (task, source URL, version, licence); `source_sha256`
            is added for zips.
        only: dataset names to convert (others in `source` are skipped).

    Returns:
        The part folders written.
    """
    from safetensors.torch import save_file

    from unisegtext.backends.totalseg.network import (
        PlainConvUNet,
        UNetArchitecture,
        drop_aliases,
        load_strict,
    )

    out_dir = Path(out_dir).expanduser()
    source = Path(source).expanduser()
    written = []
    with tempfile.TemporaryDirectory(prefix="unisegtext_convert_") as tmp:
        results_list = find_results(source, Path(tmp), fold=fold, only=only)
        if not results_list:
            raise ModelLoadError(f"{source}: no nnU-Net results folder{' for ' + ', '.join(sorted(only)) if only else ''} found")
        extra = dict(provenance or {})
        if source.is_file():
            extra.setdefault("source_file", source.name)
            extra["source_sha256"] = _sha256(source)
        for results in results_list:
            checkpoint = load_checkpoint(results.checkpoint_path)
            config = part_config(results, checkpoint, provenance=extra)
            state = drop_aliases(checkpoint["network_weights"])
            # rebuild and load strictly: a checkpoint that does not fit its plans fails here, not at inference
            network = PlainConvUNet(UNetArchitecture.from_dict(config["architecture"]))
            load_strict(network, state, results.origin)
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in network.state_dict().items()}
            target = out_dir / results.dataset_name
            staging = out_dir / f".{results.dataset_name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT, "dataset_name": results.dataset_name})
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # a part folder is complete or absent
            logger.info("converted %s -> %s", results.origin, target)
            written.append(target)
    return written


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
