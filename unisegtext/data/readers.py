"""Reader families: turn a local copy of a dataset into :class:`Sample` records.

A descriptor names one family in ``layout.family``; each family is one class registered here
by name (``@register_reader("nnunet")``). Path templates use ``{case}`` (the case id) and
family-specific placeholders (``{channel}``, ``{sequence}``, ``{structure}``); see
``data_registry/schema.md`` for every key.

All readers return the same thing: an image as (C, X, Y, Z) float32 (C = 1 for one channel),
an integer label map on the same grid whose values are the descriptor's label values, and the
voxel -> RAS mm affine. Per-structure masks are combined in ascending label-value order; a
voxel claimed by two structures keeps the later (higher) value, unless the layout sets
``on_overlap: error``.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from unisegtext.data.registry import Descriptor
from unisegtext.errors import DataError, did_you_mean

logger = logging.getLogger(__name__)

_READERS: dict[str, type[Reader]] = {}
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def register_reader(family: str) -> Callable[[type[Reader]], type[Reader]]:
    """Class decorator registering a reader for a layout family name."""

    def decorate(cls: type[Reader]) -> type[Reader]:
        cls.family = family
        _READERS[family] = cls
        return cls

    return decorate


def reader_families() -> list[str]:
    return sorted(_READERS)


def get_reader(descriptor: Descriptor) -> Reader:
    """The reader for a descriptor's layout family."""
    family = descriptor.layout.family
    if family not in _READERS:
        raise DataError(f"no reader for layout family {family!r}.{did_you_mean(family, list(_READERS))}")
    return _READERS[family](descriptor)


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class CaseData:
    """One loaded case, in the voxel order of the source files.

    Attributes:
        image: (C, X, Y, Z) float32 intensities (CT in HU when the source stores HU).
        label: (X, Y, Z) integer label map with the descriptor's label values (0 = background).
        affine: (4, 4) voxel index -> RAS+ mm.
        meta: extra facts (overlap voxel counts, unmapped PNG grey values, ...).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (X, Y, Z)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class Sample:
    """One case of a local dataset copy, not loaded yet.

    Attributes:
        dataset: descriptor id.
        case: case id.
        image_paths: one path per channel (a DICOM folder for ``dicom_png``).
        label_paths: the multilabel file, or the per-structure masks / PNG slices present.
        modality: "CT", "MR", ... or None when the descriptor lists several.
        targets: concept id -> label values whose union is the concept (for this case).
        annotated: the concepts annotated in this case; a concept not listed is *unknown*
            here (absence of its voxels is not a negative).
        split: "train", "validation" or "test" when fixed by the descriptor or the dataset.
        missing: files the layout expects for this case but that are absent.
        root: the dataset root folder the paths lie under.
    """

    dataset: str
    case: str
    image_paths: list[Path]
    label_paths: list[Path]
    modality: str | None
    targets: dict[str, list[int]]
    annotated: list[str]
    split: str | None = None
    missing: list[str] = field(default_factory=list)
    root: Path | None = None
    reader: Reader | None = field(default=None, repr=False, compare=False)

    def load(self) -> CaseData:
        """Read image and label from disk (see :class:`CaseData`)."""
        if self.reader is None:
            raise DataError(f"sample {self.dataset}/{self.case} has no reader attached")
        return self.reader.load(self)


# ---------------------------------------------------------------------------------------------
# file helpers


def _format(template: str, **values: Any) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"layout template {template!r} could not be filled with {values} ({exc})") from exc


_FIELD = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def _template_glob(template: str) -> str:
    """A glob pattern for a template: every placeholder becomes '*'."""
    return _FIELD.sub("*", template)


def _template_regex(template: str) -> re.Pattern[str]:
    """A regex capturing {case} (one path component); other placeholders match anything."""
    parts: list[str] = []
    pos = 0
    seen_case = False
    for m in _FIELD.finditer(template):
        parts.append(re.escape(template[pos : m.start()]).replace(r"\*", "[^/]*"))
        if m.group(1) == "case":
            parts.append("(?P=case)" if seen_case else "(?P<case>[^/]+?)")
            seen_case = True
        else:
            parts.append("[^/]*?")
        pos = m.end()
    parts.append(re.escape(template[pos:]).replace(r"\*", "[^/]*"))
    return re.compile("".join(parts))


def find_cases(root: Path, template: str) -> list[str]:
    """Case ids whose files match a path template under root (sorted, hidden files skipped)."""
    regex = _template_regex(template)
    cases = set()
    for path in root.glob(_template_glob(template)):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # macOS '._x.nii.gz' resource forks, hidden folders
        match = regex.fullmatch(rel)
        if match:
            cases.add(match.group("case"))
    return sorted(cases)


def read_image_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file: (array as stored, float32, (X, Y, Z) or (X, Y, Z, C)), (4, 4) affine."""
    img = _load_nifti(path)
    try:
        array = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{path}: could not read the image data ({type(exc).__name__}: {exc})") from exc
    return array, np.asarray(img.affine, dtype=np.float64)


def read_label_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an integer label map from NIfTI: ((X, Y, Z) int array, (4, 4) affine)."""
    img = _load_nifti(path)
    try:
        raw = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise DataError(f"{path}: could not read the label data ({type(exc).__name__}: {exc})") from exc
    if raw.ndim == 4 and raw.shape[3] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise DataError(f"{path}: label map has shape {raw.shape}; expected a 3D (X, Y, Z) map")
    return to_label_array(raw, str(path)), np.asarray(img.affine, dtype=np.float64)


def to_label_array(raw: np.ndarray, what: str) -> np.ndarray:
    """Integer copy of a label array (uint8 when it fits, else int32); rejects fractional values."""
    if not np.issubdtype(raw.dtype, np.integer) and raw.dtype != bool:
        rounded = np.rint(raw)
        if not np.allclose(rounded, raw, atol=1e-3):
            raise DataError(f"{what}: label map holds non-integer values; pass a label (not an image) file")
        raw = rounded
    if raw.size and (raw.min() < 0):
        raise DataError(f"{what}: label map holds negative values (min {raw.min()})")
    top = int(raw.max()) if raw.size else 0
    return raw.astype(np.uint8 if top < 256 else np.int32, copy=False)


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if not path.name.endswith(NIFTI_SUFFIXES):
        raise DataError(
            f"{path}: only NIfTI (.nii, .nii.gz) files are read by the data readers; convert "
            "other formats (NRRD, MHA) to NIfTI first"
        )
    try:
        return nib.load(str(path))
    except Exception as exc:
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc


def _channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 3:
        return array[None]
    if array.ndim == 4:
        return np.ascontiguousarray(np.moveaxis(array, 3, 0))
    raise DataError(f"{path}: image has shape {array.shape}; expected (X, Y, Z) or (X, Y, Z, C)")


def _stack_channels(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Read one file per channel (or one 4D file) -> (C, X, Y, Z) float32, affine of the first."""
    arrays, affine = [], None
    for path in paths:
        array, aff = read_image_file(path)
        array = _channels_first(array, path)
        if affine is None:
            affine = aff
        elif array.shape[1:] != arrays[0].shape[1:]:
            raise DataError(
                f"{path}: channel grid {array.shape[1:]} differs from {paths[0]} {arrays[0].shape[1:]}; "
                "all channels of a case must share one grid"
            )
        arrays.append(array)
    if affine is None:
        raise DataError("no image files given for this case")
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)), affine


def _check_grid(image: np.ndarray, label: np.ndarray, image_affine: np.ndarray, label_affine: np.ndarray, what: str) -> None:
    if image.shape[1:] != label.shape:
        raise DataError(
            f"{what}: label grid {label.shape} differs from image grid {image.shape[1:]}; "
            "image and label must share one voxel grid"
        )
    if not np.allclose(image_affine, label_affine, atol=1e-2):
        logger.warning("%s: label affine differs from the image affine; using the image affine", what)


# ---------------------------------------------------------------------------------------------
# readers


class Reader:
    """Base class: a reader knows one layout family. Subclasses fill in the three hooks."""

    family: ClassVar[str] = ""

    def __init__(self, descriptor: Descriptor):
        self.descriptor = descriptor
        self.layout = descriptor.layout

    # hooks ---------------------------------------------------------------------------------
    def case_ids(self, root: Path) -> list[str]:
        """Case ids present under root."""
        raise NotImplementedError

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        """Expected (image paths, label paths) of one case."""
        raise NotImplementedError

    def load(self, sample: Sample) -> CaseData:
        """Read one sample from disk."""
        raise NotImplementedError

    def extra_files(self, root: Path, sample: Sample) -> list[str]:
        """Label files on disk that the descriptor does not know (reported by `check`)."""
        return []

    def split_of(self, root: Path, case: str) -> str | None:
        return self.descriptor.split_of(case)

    # shared --------------------------------------------------------------------------------
    def modality(self) -> str | None:
        modalities = self.descriptor.modality
        return modalities[0] if len(modalities) == 1 else None

    def sample(self, root: str | Path, case: str) -> Sample:
        root = Path(root)
        images, labels = self.files(root, case)
        missing = [str(p) for p in images + labels if not p.exists()]
        targets = self.descriptor.target_values()
        return Sample(
            dataset=self.descriptor.id,
            case=case,
            image_paths=images,
            label_paths=[p for p in labels if p.exists()] if self._per_structure else labels,
            modality=self.modality(),
            targets=targets,
            annotated=sorted(targets),
            split=self.split_of(root, case),
            missing=missing,
            root=root,
            reader=self,
        )

    _per_structure: ClassVar[bool] = False

    def samples(self, root: str | Path, cases: list[str] | None = None, limit: int | None = None) -> list[Sample]:
        """Samples of a local copy, sorted by case id.

        Args:
            root: the dataset's root folder.
            cases: only these case ids (unknown ids raise).
            limit: at most this many (the first ones in sorted order).
        """
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"dataset root {root} is not a folder; pass the folder holding the dataset")
        found = self.case_ids(root)
        if cases:
            unknown = [c for c in cases if c not in found]
            if unknown:
                raise DataError(
                    f"case(s) {', '.join(unknown)} not found under {root} for {self.descriptor.id}"
                    f"{did_you_mean(unknown[0], found)} ({len(found)} cases found)"
                )
            found = [c for c in found if c in set(cases)]
        if limit is not None:
            found = found[: max(0, limit)]
        return [self.sample(root, case) for case in found]


@register_reader("nnunet")
class NnUNetReader(Reader):
    """nnU-Net raw / Medical Segmentation Decathlon layout.

    Keys: ``dataset_json`` (read when present: MSD's "training" list gives the case files,
    "channel_names"/"modality" the channels), ``images`` (with ``{channel}`` for one file
    per channel, or without it for MSD's single 3D/4D file), ``labels``, ``channels``.
    """

    def _dataset_json(self, root: Path) -> dict[str, Any]:
        import json

        path = root / str(self.layout.get("dataset_json") or "dataset.json")
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from exc

    def _training_list(self, root: Path) -> dict[str, tuple[Path, Path]]:
        listed = self._dataset_json(root).get("training")
        if not isinstance(listed, list) or "{channel" in str(self.layout["images"]):
            return {}
        out = {}
        for item in listed:
            if isinstance(item, dict) and "image" in item and "label" in item:
                label = root / str(item["label"])
                case = label.name
                for suffix in NIFTI_SUFFIXES:
                    if case.endswith(suffix):
                        case = case[: -len(suffix)]
                        break
                out[case] = (root / str(item["image"]), label)
        return out

    def num_channels(self, root: Path) -> int:
        channels = self.layout.get("channels") or []
        if channels:
            return len(channels)
        info = self._dataset_json(root)
        names = info.get("channel_names") or info.get("modality") or {"0": "image"}
        return max(1, len(names))

    def case_ids(self, root: Path) -> list[str]:
        listed = self._training_list(root)
        if listed:
            return sorted(listed)
        cases = set(find_cases(root, str(self.layout["labels"])))
        images = str(self.layout["images"])
        if "{channel" in images:
            cases |= set(find_cases(root, images.replace("{channel:04d}", "0000").replace("{channel}", "0")))
        else:
            cases |= set(find_cases(root, images))
        return sorted(cases)

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        listed = self._training_list(root)
        if case in listed:
            image, label = listed[case]
            return [image], [label]
        images = str(self.layout["images"])
        if "{channel" in images:
            paths = [root / _format(images, case=case, channel=c) for c in range(self.num_channels(root))]
        else:
            paths = [root / _format(images, case=case)]
        return paths, [root / _format(str(self.layout["labels"]), case=case)]

    def load(self, sample: Sample) -> CaseData:
        return _load_image_and_label(sample)


def _load_image_and_label(sample: Sample) -> CaseData:
    image, affine = _stack_channels(sample.image_paths)
    label, label_affine = read_label_file(sample.label_paths[0])
    _check_grid(image, label, affine, label_affine, f"{sample.dataset}/{sample.case}")
    return CaseData(image=image, label=label, affine=affine)


@register_reader("case_folders")
class CaseFoldersReader(Reader):
    """One image (or a list, one per channel) and one multilabel file per case, by template.

    Keys: ``image`` (template or list of templates), ``label``, ``channels`` (names, optional).
    Example (KiTS): ``image: "{case}/imaging.nii.gz"``, ``label: "{case}/segmentation.nii.gz"``.
    """

    def _image_templates(self) -> list[str]:
        image = self.layout["image"]
        return list(image) if isinstance(image, list) else [str(image)]

    def case_ids(self, root: Path) -> list[str]:
        return sorted(set(find_cases(root, str(self.layout["label"]))) | set(find_cases(root, self._image_templates()[0])))

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        return (
            [root / _format(t, case=case) for t in self._image_templates()],
            [root / _format(str(self.layout["label"]), case=case)],
        )

    def load(self, sample: Sample) -> CaseData:
        return _load_image_and_label(sample)


@register_reader("multi_sequence")
class MultiSequenceReader(Reader):
    """BraTS-style multi-sequence MR: one file per sequence, stacked as channels.

    Keys: ``image`` (template with ``{case}`` and ``{sequence}``), ``sequences`` (suffixes,
    in channel order), ``label``. Defaults follow BraTS 2023:
    ``{case}/{case}-t1n.nii.gz`` ... and ``{case}/{case}-seg.nii.gz``.
    """

    def case_ids(self, root: Path) -> list[str]:
        first = _format_partial(str(self.layout["image"]), sequence=self.layout["sequences"][0])
        return sorted(set(find_cases(root, str(self.layout["label"]))) | set(find_cases(root, first)))

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        images = [root / _format(str(self.layout["image"]), case=case, sequence=s) for s in self.layout["sequences"]]
        return images, [root / _format(str(self.layout["label"]), case=case)]

    def load(self, sample: Sample) -> CaseData:
        data = _load_image_and_label(sample)
        data.meta["channels"] = list(self.layout["sequences"])
        return data


def _format_partial(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


@register_reader("per_structure_files")
class PerStructureReader(Reader):
    """One image plus one binary mask file per structure (HaN-Seg / PDDCA style).

    Keys: ``image``, ``masks`` (template with ``{case}`` and ``{structure}``), ``on_overlap``.
    The mask file stem of a structure is its name in ``labels`` (labels keyed by value) or
    its key (labels keyed by stem). A structure whose mask file is absent in a case is *not
    annotated* in that case (its concepts drop out of ``annotated``); it is not background.
    """

    _per_structure = True

    def case_ids(self, root: Path) -> list[str]:
        return find_cases(root, str(self.layout["image"]))

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        masks = str(self.layout["masks"])
        labels = [root / _format(masks, case=case, structure=stem) for stem in self.descriptor.structure_files()]
        return [root / _format(str(self.layout["image"]), case=case)], labels

    def sample(self, root: str | Path, case: str) -> Sample:
        sample = super().sample(root, case)
        root = Path(root)
        masks = str(self.layout["masks"])
        stems = self.descriptor.structure_files()
        absent = {stems[s] for s in stems if not (root / _format(masks, case=case, structure=s)).exists()}
        if absent:
            sample.targets = {c: v for c, v in sample.targets.items() if not absent.intersection(v)}
            sample.annotated = sorted(sample.targets)
        return sample

    def extra_files(self, root: Path, sample: Sample) -> list[str]:
        masks = str(self.layout["masks"])
        known = {(Path(root) / _format(masks, case=sample.case, structure=s)).resolve() for s in self.descriptor.structure_files()}
        pattern = _format_partial(masks.replace("{case}", sample.case), structure="*")
        return sorted(str(p) for p in Path(root).glob(pattern) if p.resolve() not in known and p != sample.image_paths[0])

    def load(self, sample: Sample) -> CaseData:
        image, affine = _stack_channels(sample.image_paths)
        label = np.zeros(image.shape[1:], dtype=np.uint8 if max(self.descriptor.structure_files().values()) < 256 else np.int32)
        overlaps: dict[str, int] = {}
        masks = str(self.layout["masks"])
        root = Path(sample.root or ".")
        for stem, value in sorted(self.descriptor.structure_files().items(), key=lambda kv: kv[1]):
            path = root / _format(masks, case=sample.case, structure=stem)
            if not path.exists():
                continue
            mask, mask_affine = read_label_file(path)
            _check_grid(image, mask, affine, mask_affine, f"{sample.dataset}/{sample.case} mask {stem}")
            on = mask > 0
            clash = int(np.count_nonzero(label[on]))
            if clash:
                if self.layout.get("on_overlap") == "error":
                    raise DataError(
                        f"{sample.dataset}/{sample.case}: mask {stem!r} overlaps earlier structures in {clash} "
                        "voxels; set layout.on_overlap: overwrite to let later structures win"
                    )
                overlaps[stem] = clash
            label[on] = value
        if overlaps:
            logger.info("%s/%s: overlapping masks, later structure kept: %s", sample.dataset, sample.case, overlaps)
        return CaseData(image=image, label=label, affine=affine, meta={"overlap_voxels": overlaps})


@register_reader("totalsegmentator")
class TotalSegmentatorReader(PerStructureReader):
    """TotalSegmentator dataset layout: ``{case}/ct.nii.gz`` (``mri.nii.gz`` for the MR set)
    and ``{case}/segmentations/<structure>.nii.gz``; ``meta`` names the semicolon-separated
    meta.csv whose ``split`` column (train / val / test) gives each case's split.
    """

    def split_of(self, root: Path, case: str) -> str | None:
        fixed = self.descriptor.split_of(case)
        if fixed:
            return fixed
        return self._meta_splits(root).get(case)

    def _meta_splits(self, root: Path) -> dict[str, str]:
        cache = getattr(self, "_split_cache", None)
        if cache is not None and cache[0] == root:
            return cache[1]
        splits: dict[str, str] = {}
        meta = self.layout.get("meta")
        path = root / str(meta) if meta else None
        if path is not None and path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter=";"))
            names = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
            for row in rows:
                case, split = row.get("image_id"), str(row.get("split", "")).strip().lower()
                if case and split in names:
                    splits[case] = names[split]
        self._split_cache = (root, splits)
        return splits


@register_reader("dicom_png")
class DicomPngReader(Reader):
    """CHAOS-style DICOM series + one PNG mask per slice whose grey values encode labels.

    Keys: ``dicom`` (folder template holding one series), ``masks`` (glob template of the PNG
    slices, e.g. ``"{case}/Ground/*.png"``), ``grey_values`` (PNG grey value -> label value;
    empty: the grey value is the label), ``grey_tolerance`` (grey values within this distance
    count as a match). The i-th PNG (sorted by file name) belongs to the i-th DICOM file
    (sorted by file name); slices are then ordered by ImagePositionPatient along the normal.
    """

    def case_ids(self, root: Path) -> list[str]:
        return [c for c in find_cases(root, str(self.layout["dicom"])) if (root / _format(str(self.layout["dicom"]), case=c)).is_dir()]

    def files(self, root: Path, case: str) -> tuple[list[Path], list[Path]]:
        dicom = root / _format(str(self.layout["dicom"]), case=case)
        pattern = _format(str(self.layout["masks"]), case=case)
        pngs = sorted(root.glob(pattern))
        return [dicom], pngs if pngs else [root / pattern]

    def load(self, sample: Sample) -> CaseData:
        from PIL import Image

        image, affine, order, names = read_dicom_folder(sample.image_paths[0])
        pngs = sorted(p for p in sample.label_paths if p.exists())
        if len(pngs) != len(names):
            raise DataError(
                f"{sample.dataset}/{sample.case}: {len(pngs)} PNG masks for {len(names)} DICOM slices; "
                "each DICOM slice needs one PNG mask"
            )
        slices = []
        for index in order:
            with Image.open(pngs[index]) as png:
                grey = np.asarray(png.convert("L") if png.mode not in ("L", "I", "I;16") else png)
            slices.append(grey.T)  # (rows, cols) -> (X = cols, Y = rows)
        grey_volume = np.stack(slices, axis=-1)
        if grey_volume.shape != image.shape[1:]:
            raise DataError(
                f"{sample.dataset}/{sample.case}: PNG masks {grey_volume.shape} do not match the DICOM grid {image.shape[1:]}"
            )
        label, unmapped = map_grey_values(grey_volume, self.layout.get("grey_values") or {}, int(self.layout.get("grey_tolerance") or 0))
        if unmapped:
            logger.warning("%s/%s: %d mask voxels with unmapped grey values set to 0", sample.dataset, sample.case, unmapped)
        return CaseData(image=image, label=label, affine=affine, meta={"unmapped_grey_voxels": unmapped})


def map_grey_values(grey: np.ndarray, mapping: dict[int, int], tolerance: int = 0) -> tuple[np.ndarray, int]:
    """PNG grey values -> label values. Returns (label map, number of nonzero unmapped voxels)."""
    if not mapping:
        return to_label_array(grey, "PNG masks"), 0
    label = np.zeros(grey.shape, dtype=np.uint8 if max(mapping.values()) < 256 else np.int32)
    matched = np.zeros(grey.shape, dtype=bool)
    signed = grey.astype(np.int32)
    for grey_value, value in sorted(mapping.items()):
        on = np.abs(signed - grey_value) <= tolerance
        label[on] = value
        matched |= on
    unmapped = int(np.count_nonzero((signed != 0) & ~matched))
    return label, unmapped


def read_dicom_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """Read one DICOM series from a folder (files sorted by name).

    Returns:
        image (1, X, Y, Z) float32 with RescaleSlope/Intercept applied, the (4, 4) RAS affine,
        the slice order (indices into the name-sorted file list, along the slice normal), and
        the name-sorted file names.
    """
    import pydicom

    if not folder.is_dir():
        raise DataError(f"DICOM folder {folder} does not exist")
    datasets, names = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(str(path))
        except Exception:
            logger.debug("skipping non-DICOM file %s", path)
            continue
        if "PixelData" not in ds:
            continue
        datasets.append(ds)
        names.append(path.name)
    if not datasets:
        raise DataError(f"{folder} holds no DICOM image slices")
    try:
        row_dir = np.array([float(v) for v in datasets[0].ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in datasets[0].ImageOrientationPatient[3:]])
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        spacing_rows, spacing_cols = (float(v) for v in datasets[0].PixelSpacing)
    except (AttributeError, ValueError, TypeError) as exc:
        raise DataError(f"{folder}: slices lack position/orientation/spacing tags ({exc})") from exc
    normal = np.cross(row_dir, col_dir)
    order = [int(i) for i in np.argsort(positions @ normal, kind="stable")]
    slices = []
    for index in order:
        ds = datasets[index]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise DataError(f"{folder}/{names[index]}: pixel data unreadable ({exc})") from exc
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append((pixels * slope + intercept).T)  # (rows, cols) -> (X = cols, Y = rows)
    if len({s.shape for s in slices}) != 1:
        raise DataError(f"{folder}: slices have different sizes; the folder must hold one series")
    volume = np.stack(slices, axis=-1)[None]
    first = positions[order[0]]
    if len(order) > 1:
        step = (positions[order[-1]] - first) / (len(order) - 1)
    else:
        step = normal * float(getattr(datasets[0], "SliceThickness", 1) or 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing_cols
    lps[:3, 1] = col_dir * spacing_rows
    lps[:3, 2] = step
    lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return volume, affine, order, names
