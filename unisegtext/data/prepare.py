"""`prepare`: write a harmonised cache of a dataset for training, and read it back.

Every case is reoriented to RAS, resampled to one spacing (image: linear, label: nearest),
and written as ``CACHE/<dataset>/<case>_image.npy`` ((C, X, Y, Z) float32, raw intensities:
normalisation belongs to the model's preprocessing contract) and ``<case>_label.npy``
(uint8 / uint16 label values of the descriptor), plus a per-case ``<case>.json`` record.
``CACHE/index.json`` gathers the records of every dataset in the cache.

The cache is resumable: files are written under temporary names and renamed, the record
last, so a case either has its record (finished, skipped on the next run) or is redone.
A case that cannot be read is reported, listed under "failed" in the index, and skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.data.readers import CaseData, Sample, get_reader
from unisegtext.data.registry import Descriptor
from unisegtext.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
INDEX_NAME = "index.json"


# ---------------------------------------------------------------------------------------------
# geometry


def reorient_to_ras(image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip/permute array axes so that they run closest to R, A, S (nibabel's as_closest_canonical).

    Args:
        image: (C, X, Y, Z); label: (X, Y, Z); affine: (4, 4) voxel -> RAS mm.

    Returns:
        (image, label, affine) in RAS axis order; voxel values are moved, never interpolated.
    """
    import nibabel.orientations as nio

    current = nio.io_orientation(affine)
    transform = nio.ornt_transform(current, nio.axcodes2ornt(("R", "A", "S")))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return image, label, affine
    spatial = label.shape
    new_image = np.stack([nio.apply_orientation(channel, transform) for channel in image])
    new_label = nio.apply_orientation(label, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(new_image), np.ascontiguousarray(new_label), new_affine


def resample_to_spacing(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample along the array axes to a voxel size (mm): image linear, label nearest.

    The new grid covers the same extent (voxel edges aligned), with
    round(shape * old_spacing / new_spacing) voxels per axis (at least 1).

    Args:
        image: (C, X, Y, Z); label: (X, Y, Z); affine: (4, 4); spacing: (sx, sy, sz) in mm.
    """
    from scipy import ndimage

    old = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.asarray(spacing, dtype=np.float64)
    if np.allclose(old, new, rtol=1e-4, atol=1e-5):
        return image, label, affine
    shape = np.asarray(label.shape)
    new_shape = tuple(int(n) for n in np.maximum(1, np.round(shape * old / new)))
    scale = new / old  # input voxel step per output voxel
    offset = 0.5 * scale - 0.5  # output voxel centre i -> input coordinate (i + 0.5) * scale - 0.5
    out_image = np.stack(
        [
            ndimage.affine_transform(channel, scale, offset=offset, output_shape=new_shape, order=1, mode="nearest")
            for channel in image.astype(np.float32, copy=False)
        ]
    )
    out_label = ndimage.affine_transform(label, scale, offset=offset, output_shape=new_shape, order=0, mode="nearest")
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] @ np.diag(scale)
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return out_image.astype(np.float32, copy=False), out_label, new_affine


def harmonise(data: CaseData, spacing: Sequence[float] | None) -> CaseData:
    """Reorient to RAS and (when spacing is given) resample: the cache's geometry contract."""
    image, label, affine = reorient_to_ras(data.image, data.label, data.affine)
    if spacing is not None:
        image, label, affine = resample_to_spacing(image, label, affine, spacing)
    return CaseData(image=image.astype(np.float32, copy=False), label=label, affine=affine, meta=dict(data.meta))


# ---------------------------------------------------------------------------------------------
# writing


@dataclass
class PrepareResult:
    """What one `prepare` run did.

    Attributes:
        written: case ids prepared in this run.
        skipped: case ids already in the cache (resumed).
        failed: case id -> error message, for cases that could not be read.
        index_path: the cache index that was (re)written.
    """

    dataset: str
    cache_dir: Path
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    index_path: Path | None = None


def _safe_name(case: str) -> str:
    return case.replace("/", "_").replace("\\", "_")


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _save_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _label_dtype(label: np.ndarray) -> type:
    top = int(label.max()) if label.size else 0
    if top < 256:
        return np.uint8
    if top < 65536:
        return np.uint16
    raise DataError(f"label value {top} does not fit uint16; the cache stores labels as uint8/uint16")


def _spacing_list(spacing: Sequence[float] | None) -> list[float] | None:
    return None if spacing is None else [float(s) for s in spacing]


def prepare_dataset(
    descriptor: Descriptor,
    root: str | Path,
    cache_dir: str | Path,
    *,
    spacing: Sequence[float] | None = (1.5, 1.5, 1.5),
    cases: Sequence[str] | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> PrepareResult:
    """Write the harmonised cache of one dataset (resumable) and refresh ``CACHE/index.json``.

    Args:
        descriptor: the dataset's descriptor.
        root: its local copy.
        cache_dir: the cache folder (shared by several datasets; one spacing per cache).
        spacing: target voxel size (mm) along R, A, S; None keeps each case's own spacing.
        cases: only these case ids. limit: at most this many cases (sorted order).
        progress: show a tqdm progress bar.

    Raises:
        DataError: bad root, unknown case ids, or a cache prepared at another spacing.
    """
    cache = Path(cache_dir)
    target = _spacing_list(spacing)
    if target is not None and (len(target) != 3 or min(target) <= 0):
        raise DataError(f"spacing must be three positive numbers (mm), got {spacing}")
    existing = cache / INDEX_NAME
    if existing.is_file():
        previous = json.loads(existing.read_text(encoding="utf-8"))
        if previous.get("spacing") != target:
            raise DataError(
                f"cache {cache} holds cases at spacing {previous.get('spacing')}, not {target}; "
                "use the same --spacing or another --out folder"
            )
    samples = get_reader(descriptor).samples(root, cases=list(cases) if cases else None, limit=limit)
    out_dir = cache / descriptor.id
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PrepareResult(dataset=descriptor.id, cache_dir=cache)

    iterator: Any = samples
    if progress:
        from tqdm import tqdm

        iterator = tqdm(samples, desc=f"prepare {descriptor.id}", unit="case")
    for sample in iterator:
        name = _safe_name(sample.case)
        record_path = out_dir / f"{name}.json"
        if _finished(record_path, out_dir, target):
            result.skipped.append(sample.case)
            continue
        try:
            record = _prepare_case(sample, out_dir, name, target)
        except Exception as exc:  # a corrupt or inconsistent case must not stop the run
            message = f"{type(exc).__name__}: {exc}"
            logger.error("%s/%s failed: %s", descriptor.id, sample.case, message)
            result.failed[sample.case] = message
            for tmp in out_dir.glob(f"{name}_*.tmp*"):
                tmp.unlink(missing_ok=True)
            continue
        _save_json_atomic(record_path, record)
        result.written.append(sample.case)

    _update_failed(out_dir, descriptor.id, result)
    result.index_path = write_index(cache, target)
    logger.info(
        "%s: %d written, %d skipped (already cached), %d failed",
        descriptor.id, len(result.written), len(result.skipped), len(result.failed),
    )
    return result


def _finished(record_path: Path, out_dir: Path, target: list[float] | None) -> bool:
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError:
        return False
    return (
        record.get("target_spacing") == target
        and (out_dir.parent / record.get("image", "")).is_file()
        and (out_dir.parent / record.get("label", "")).is_file()
    )


def _prepare_case(sample: Sample, out_dir: Path, name: str, target: list[float] | None) -> dict[str, Any]:
    absent_images = [str(p) for p in sample.image_paths if not p.exists()]
    per_structure = bool(getattr(sample.reader, "_per_structure", False))
    if absent_images or (sample.missing and not per_structure):
        raise DataError(f"missing file(s): {', '.join(absent_images or sample.missing)}")
    if per_structure and not sample.annotated:
        raise DataError("none of the structure mask files exists")
    data = harmonise(sample.load(), target)
    label = data.label.astype(_label_dtype(data.label), copy=False)
    counts = np.bincount(label.ravel().astype(np.int64, copy=False))
    voxels = {
        concept: int(sum(counts[v] for v in values if v < len(counts)))
        for concept, values in sample.targets.items()
    }
    modality = sample.modality
    if modality is None:
        from unisegtext.io.volume import guess_modality

        modality = guess_modality(data.image[0])
    dataset_dir = out_dir.name
    _save_npy_atomic(out_dir / f"{name}_image.npy", data.image)
    _save_npy_atomic(out_dir / f"{name}_label.npy", label)
    return {
        "dataset": sample.dataset,
        "case": sample.case,
        "image": f"{dataset_dir}/{name}_image.npy",
        "label": f"{dataset_dir}/{name}_label.npy",
        "spacing": [round(float(s), 6) for s in data.spacing],
        "target_spacing": target,
        "shape": [int(s) for s in label.shape],
        "channels": int(data.image.shape[0]),
        "affine": [[round(float(v), 6) for v in row] for row in data.affine],
        "modality": modality,
        "targets": {c: list(v) for c, v in sorted(sample.targets.items())},
        "annotated": list(sample.annotated),
        "present": sorted(c for c, n in voxels.items() if n > 0),
        "voxels": dict(sorted(voxels.items())),
        "split": sample.split or "train",
        "source": [str(p) for p in sample.image_paths],
    }


def _update_failed(out_dir: Path, dataset: str, result: PrepareResult) -> None:
    path = out_dir / "failed.json"
    failed: dict[str, str] = {}
    if path.is_file():
        try:
            failed = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            failed = {}
    for case in result.written + result.skipped:
        failed.pop(case, None)
    failed.update(result.failed)
    if failed:
        _save_json_atomic(path, failed)
    elif path.exists():
        path.unlink()


def write_index(cache_dir: str | Path, spacing: list[float] | None) -> Path:
    """Gather every case record under the cache into ``index.json`` (sorted, atomic write)."""
    cache = Path(cache_dir)
    cases, failed = [], []
    for dataset_dir in sorted(p for p in cache.iterdir() if p.is_dir()):
        for record_path in sorted(dataset_dir.glob("*.json")):
            if record_path.name == "failed.json":
                for case, error in sorted(json.loads(record_path.read_text(encoding="utf-8")).items()):
                    failed.append({"dataset": dataset_dir.name, "case": case, "error": error})
                continue
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if (cache / record["image"]).is_file() and (cache / record["label"]).is_file():
                cases.append(record)
    cases.sort(key=lambda r: (r["dataset"], r["case"]))
    index = {"version": CACHE_FORMAT_VERSION, "spacing": spacing, "cases": cases, "failed": failed}
    path = cache / INDEX_NAME
    _save_json_atomic(path, index)
    return path


# ---------------------------------------------------------------------------------------------
# reading the cache (for the trainer)


@dataclass
class CachedCase:
    """One cached case: image (C, X, Y, Z) float32, label (X, Y, Z) uint8/uint16, its index entry."""

    image: np.ndarray
    label: np.ndarray
    entry: dict[str, Any]


def load_cache_index(cache_dir: str | Path) -> dict[str, Any]:
    """Read ``CACHE/index.json``; entry "image"/"label" paths come back absolute.

    Raises:
        DataError: no index (run `unisegtext data prepare` first) or an unreadable one.
    """
    cache = Path(cache_dir)
    path = cache / INDEX_NAME
    if not path.is_file():
        raise DataError(f"{path} not found; build the cache with `unisegtext data prepare ROOT --dataset ID --out {cache}`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); rerun `unisegtext data prepare`") from exc
    for entry in index.get("cases", []):
        entry["image"] = str((cache / entry["image"]).resolve())
        entry["label"] = str((cache / entry["label"]).resolve())
    return index


def load_cached_case(entry: dict[str, Any], mmap: bool = True) -> CachedCase:
    """Load one case listed by :func:`load_cache_index` (memory-mapped, read-only by default)."""
    mode = "r" if mmap else None
    try:
        image = np.load(entry["image"], mmap_mode=mode)
        label = np.load(entry["label"], mmap_mode=mode)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cached case {entry.get('dataset')}/{entry.get('case')} unreadable ({exc}); rerun prepare") from exc
    return CachedCase(image=image, label=label, entry=entry)
