"""Training data sources: build/read the harmonised cache and hold the cases in memory.

Registry datasets are cached with :func:`unisegtext.data.prepare_dataset`. Two built-in
sources read the TotalSegmentator example scans (``ct.nii.gz`` + ``ct_seg.nii.gz``,
``mr.nii.gz`` + ``mr_seg.nii.gz``, class names from ``classes.json``) into the same cache
format; their class names map to concept ids through the knowledge tree's ``totalseg`` field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.errors import DataError
from unisegtext.models.config import PreprocessingConfig

logger = logging.getLogger(__name__)

#: built-in example sources: id -> (image file, label file, classes.json task, modality)
EXAMPLE_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "totalseg_example_ct": ("ct.nii.gz", "ct_seg.nii.gz", "total", "CT"),
    "totalseg_example_mr": ("mr.nii.gz", "mr_seg.nii.gz", "total_mr", "MR"),
}

#: foreground coordinates kept per (case, concept) for foreground-centred sampling
MAX_FOREGROUND_COORDS = 20000


# ---------------------------------------------------------------------------------------------
# building the cache


def totalseg_class_concepts(task_classes: dict[str, str]) -> dict[str, list[int]]:
    """Concept id -> label values, from a TotalSegmentator ``classes.json`` task.

    Class names map through the knowledge tree's ``totalseg`` field; a class with no concept
    is left out (and logged), never guessed.
    """
    from unisegtext.knowledge import load_tree

    tree = load_tree()
    by_totalseg = {name: concept.id for concept in tree for name in concept.totalseg}
    targets: dict[str, list[int]] = {}
    for value, name in sorted(task_classes.items(), key=lambda kv: int(kv[0])):
        concept = by_totalseg.get(name) or (name if name in tree else None)
        if concept is None:
            logger.warning("TotalSegmentator class %r has no concept in the knowledge tree; left out", name)
            continue
        targets.setdefault(concept, []).append(int(value))
    return targets


def prepare_example_source(source_id: str, root: str | Path, cache_dir: str | Path, spacing: Sequence[float]) -> None:
    """Write one TotalSegmentator example scan into the cache (same format as `prepare`)."""
    import nibabel as nib

    from unisegtext.data.prepare import _label_dtype, _save_json_atomic, _save_npy_atomic, harmonise
    from unisegtext.data.readers import CaseData

    image_name, label_name, task, modality = EXAMPLE_SOURCES[source_id]
    root, cache = Path(root), Path(cache_dir)
    paths = [root / image_name, root / label_name, root / "classes.json"]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"source {source_id}: missing {', '.join(missing)}; root must be the totalseg_examples folder")
    out_dir = cache / source_id
    record_path = out_dir / "example.json"
    target = [float(s) for s in spacing]
    if record_path.is_file() and json.loads(record_path.read_text()).get("target_spacing") == target:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    img = nib.load(str(paths[0]))
    seg = nib.load(str(paths[1]))
    image = np.asarray(img.dataobj, dtype=np.float32)[None]
    label = np.asarray(seg.dataobj).astype(np.int32)
    data = harmonise(CaseData(image=image, label=label, affine=img.affine), target)
    label_out = data.label.astype(_label_dtype(data.label))
    classes = json.loads(paths[2].read_text())[task]
    targets = totalseg_class_concepts(classes)
    counts = np.bincount(label_out.ravel().astype(np.int64))
    voxels = {c: int(sum(counts[v] for v in vals if v < len(counts))) for c, vals in targets.items()}
    _save_npy_atomic(out_dir / "example_image.npy", data.image)
    _save_npy_atomic(out_dir / "example_label.npy", label_out)
    record = {
        "dataset": source_id,
        "case": "example",
        "image": f"{source_id}/example_image.npy",
        "label": f"{source_id}/example_label.npy",
        "spacing": [round(float(s), 6) for s in data.spacing],
        "target_spacing": target,
        "shape": [int(s) for s in label_out.shape],
        "channels": 1,
        "affine": [[round(float(v), 6) for v in row] for row in data.affine],
        "modality": modality,
        "targets": dict(sorted(targets.items())),
        # TotalSegmentator's task covers every class it lists: an absent class is a negative
        "annotated": sorted(targets),
        "present": sorted(c for c, n in voxels.items() if n > 0),
        "voxels": dict(sorted(voxels.items())),
        "split": "train",
        "source": [str(paths[0]), str(paths[1])],
    }
    _save_json_atomic(record_path, record)


def build_cache(sources: Sequence[Any], cache_dir: str | Path, spacing: Sequence[float], *, progress: bool = False) -> dict[str, Any]:
    """Make sure every source is in the cache (resumable; cached cases are skipped).

    Args:
        sources: :class:`~unisegtext.training.config.SourceSection` items.
        cache_dir: the cache folder.
        spacing: the model's target spacing (mm).

    Returns:
        The cache index (see :func:`unisegtext.data.load_cache_index`).
    """
    from unisegtext.data import get_descriptor, load_cache_index, prepare_dataset
    from unisegtext.data.prepare import write_index

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = [float(s) for s in spacing]
    index_path = cache / "index.json"
    if index_path.is_file():
        existing = json.loads(index_path.read_text())
        if existing.get("spacing") not in (None, target) and existing.get("cases"):
            raise DataError(
                f"cache {cache} was prepared at spacing {existing.get('spacing')} mm, but the model "
                f"needs {target}; point data.cache_dir at another folder"
            )
    for src in sources:
        if src.dataset in EXAMPLE_SOURCES:
            prepare_example_source(src.dataset, src.root, cache, target)
            continue
        descriptor = get_descriptor(src.dataset)
        root = Path(src.root)
        if not root.is_dir():
            raise DataError(f"source {src.dataset}: root {root} is not a folder")
        result = prepare_dataset(descriptor, root, cache, spacing=target, progress=progress)
        if result.failed:
            logger.warning("%s: %d cases failed to prepare: %s", src.dataset, len(result.failed), sorted(result.failed)[:5])
    write_index(cache, target)
    return load_cache_index(cache)


# ---------------------------------------------------------------------------------------------
# in-memory cases


@dataclass
class TrainingCase:
    """One case ready for patch sampling.

    Attributes:
        source: the source id (dataset).
        case: case id.
        image: (X, Y, Z) float32, normalised with the model's preprocessing contract.
        label: (X, Y, Z) integer label map (raw label values of the source).
        targets: concept id -> label values whose union is the concept.
        annotated: concepts annotated for this case (others are unknown, never negatives).
        present: annotated concepts with at least one voxel.
        pad_value: normalised intensity of "outside".
        modality: "CT" or "MR".
        out_of_view: concepts no scan of the source can show (its descriptor's
            ``outside_field_of_view``): absent everywhere in the case, so valid negatives.
    """

    source: str
    case: str
    image: np.ndarray
    label: np.ndarray
    targets: dict[str, list[int]]
    annotated: list[str]
    present: list[str]
    pad_value: float
    modality: str
    out_of_view: list[str] = field(default_factory=list)
    _coords: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def foreground(self, concept: str) -> np.ndarray:
        """(N, 3) voxel coordinates of `concept` (at most MAX_FOREGROUND_COORDS, evenly strided)."""
        coords = self._coords.get(concept)
        if coords is None:
            coords = np.argwhere(np.isin(self.label, self.targets[concept]))
            if len(coords) > MAX_FOREGROUND_COORDS:
                coords = coords[:: int(np.ceil(len(coords) / MAX_FOREGROUND_COORDS))]
            self._coords[concept] = coords.astype(np.int32)
        return coords


@dataclass
class SourceCases:
    """The training cases of one source and its concept -> cases table for balanced sampling."""

    source: str
    weight: float
    cases: list[TrainingCase]
    concept_cases: dict[str, list[int]]

    @property
    def concepts(self) -> list[str]:
        return sorted(self.concept_cases)


def concept_scan_counts(sources: dict[str, SourceCases]) -> dict[str, int]:
    """Per concept, the number of training scans (over all sources) whose labels hold it: what
    the model card and inference's warning call "learnt from N scans"."""
    counts: dict[str, int] = {}
    for source in sources.values():
        for concept, members in source.concept_cases.items():
            counts[concept] = counts.get(concept, 0) + len(set(members))
    return dict(sorted(counts.items()))


def _outside_field_of_view(dataset: str) -> list[str]:
    """The registry's ``outside_field_of_view`` of a dataset (empty for one not registered)."""
    from unisegtext.data import get_descriptor

    try:
        return list(get_descriptor(dataset).outside_field_of_view)
    except DataError:  # a source outside the registry (tests, private data): nothing known
        return []


def load_sources(index: dict[str, Any], sources: Sequence[Any], preprocessing: PreprocessingConfig,
                 *, require_present: bool = True) -> dict[str, SourceCases]:
    """Load the cases of every source (its ``splits``) from the cache into memory (normalised).

    Args:
        require_present: raise when no annotated structure has a voxel (training needs one;
            held-out validation cases are loaded with False).

    Raises:
        DataError: a source has no case in its splits.
    """
    from unisegtext.data import load_cached_case
    from unisegtext.inference.preprocessing import normalise

    out: dict[str, SourceCases] = {}
    for src in sources:
        entries = [e for e in index["cases"] if e["dataset"] == src.dataset and e.get("split", "train") in src.splits]
        entries.sort(key=lambda e: e["case"])
        if src.limit:
            entries = entries[: src.limit]
        if not entries:
            raise DataError(
                f"source {src.dataset}: no cached case in splits {src.splits}; check data.sources "
                "(root, splits) and the cache index"
            )
        cases = []
        out_of_view = _outside_field_of_view(src.dataset)
        for entry in entries:
            cached = load_cached_case(entry, mmap=False)
            modality = entry.get("modality") or "MR"
            image, pad = normalise(np.asarray(cached.image[0], dtype=np.float32), modality, preprocessing)
            cases.append(
                TrainingCase(
                    source=src.dataset,
                    case=entry["case"],
                    image=np.ascontiguousarray(image),
                    label=np.ascontiguousarray(cached.label),
                    targets={c: [int(v) for v in vals] for c, vals in entry["targets"].items()},
                    annotated=list(entry["annotated"]),
                    present=[c for c in entry.get("present", []) if c in entry["annotated"]],
                    pad_value=float(pad),
                    modality=modality,
                    out_of_view=[c for c in out_of_view if c not in entry["annotated"]],
                )
            )
        concept_cases: dict[str, list[int]] = {}
        for i, case in enumerate(cases):
            for concept in case.present:
                concept_cases.setdefault(concept, []).append(i)
        if not concept_cases and require_present:
            raise DataError(f"source {src.dataset}: no annotated structure has any voxel in its training cases")
        out[src.dataset] = SourceCases(src.dataset, float(src.weight), cases, concept_cases)
        logger.info("source %s: %d cases, %d concepts", src.dataset, len(cases), len(concept_cases))
    return out
