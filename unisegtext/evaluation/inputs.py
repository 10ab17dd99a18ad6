"""Finding and reading the cases of an evaluation: predictions, references, probabilities.

Layouts understood (the same on the prediction and the reference side):

* a folder of multilabel NIfTI files, one per case (``case01.nii.gz``), with a label map that
  names the values: given explicitly, or found next to the file (``case01.labels.json``,
  ``case01_labels.json``, ``labels.json``, nnU-Net's ``dataset.json`` in the folder or its
  parent);
* a folder of case folders, each holding one binary mask per class (``case01/liver.nii.gz``,
  as ``unisegtext segment`` and TotalSegmentator write them), or one multilabel NIfTI plus a
  ``labels.json`` (as ``unisegtext segment --ml`` writes them);
* a single case: a multilabel NIfTI file, or one such case folder.

Classes are matched by name after :func:`normalise_name` (lower case, "_" between words), so
the two sides may use different label values. Files named ``*_prob.nii.gz`` are probability
maps, never masks.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.errors import DataError, VolumeError

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROB_SUFFIX = "_prob"
LABEL_MAP_NAMES = ("labels.json",)
BACKGROUND_NAMES = {"background", "bg", "clear_label", "unlabeled", "unlabelled"}

LabelMap = dict[str, tuple[int, ...]]  # class name -> label values whose union is the class


def normalise_name(name: str) -> str:
    """Class-name key used to match the two sides ("Kidney tumor" -> "kidney_tumor")."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def nifti_stem(path: Path) -> str | None:
    """File name without .nii / .nii.gz, or None when the file is not NIfTI."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and nifti_stem(p) is not None)


def _is_prob(path: Path) -> bool:
    stem = nifti_stem(path)
    return stem is not None and stem.endswith(PROB_SUFFIX)


# --------------------------------------------------------------------------- label maps
def parse_label_map(data: Any, *, key: str | None = None, source: str = "label map") -> LabelMap:
    """Turn a JSON label map into {class name: label values}.

    Accepted forms: ``{"1": "liver", ...}`` (value -> name, as `segment --ml` writes it),
    ``{"liver": 1, ...}`` or ``{"kidney": [1, 2]}`` (name -> value(s)), nnU-Net's
    ``dataset.json`` (its ``"labels"`` entry), and a file with several maps
    (``{"total": {...}, "total_mr": {...}}``) with `key` naming one. Background (value 0 or a
    name such as "background") is dropped; two values with the same name are united.
    """
    if isinstance(data, Mapping) and "labels" in data and isinstance(data["labels"], Mapping):
        data = data["labels"]
    if not isinstance(data, Mapping) or not data:
        raise DataError(
            f"{source}: expected a JSON object mapping label values to class names, got {type(data).__name__}"
        )
    nested = [k for k, v in data.items() if isinstance(v, Mapping)]
    if nested:
        if key is None:
            if len(nested) != 1:
                raise DataError(
                    f"{source} holds several label maps ({', '.join(nested)}); choose one with "
                    f"--labels-key (e.g. --labels-key {nested[0]})"
                )
            key = nested[0]
        if key not in data or not isinstance(data[key], Mapping):
            raise DataError(
                f"{source} has no label map {key!r}; choose one of: {', '.join(nested)}"
            )
        data = data[key]
    elif key is not None:
        raise DataError(
            f"{source} holds a single label map, but --labels-key {key!r} was given; drop it"
        )

    result: dict[str, set[int]] = {}

    def add(name: Any, value: Any) -> None:
        if not isinstance(name, str):
            raise DataError(f"{source}: class names must be strings, got {name!r}")
        values = value if isinstance(value, (list, tuple)) else [value]
        try:
            ints = {int(v) for v in values}
        except (TypeError, ValueError):
            raise DataError(
                f"{source}: label value(s) {value!r} of {name!r} are not integers"
            ) from None
        key_name = normalise_name(name)
        if key_name in BACKGROUND_NAMES or ints == {0} or not key_name:
            return
        result.setdefault(key_name, set()).update(ints - {0})

    keys_are_values = all(re.fullmatch(r"-?\d+", str(k).strip()) for k in data)
    for k, v in data.items():
        if keys_are_values:
            add(v, k)
        else:
            add(k, v)
    if not result:
        raise DataError(f"{source} names no foreground class")
    return {name: tuple(sorted(values)) for name, values in result.items()}


def read_label_map(
    source: str | os.PathLike | Mapping[Any, Any], *, key: str | None = None
) -> LabelMap:
    """Read a label map from a JSON file or take it from a dict (see :func:`parse_label_map`)."""
    if isinstance(source, Mapping):
        return parse_label_map(source, key=key)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f'label map {path} does not exist; pass a JSON file such as {{"1": "liver"}}'
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"label map {path} is not valid JSON: {exc}") from None
    return parse_label_map(data, key=key, source=str(path))


def find_label_map(path: Path) -> Path | None:
    """The label map that sits next to a multilabel file, if any (see the module docstring)."""
    stem = nifti_stem(path) or path.stem
    folder = path.parent
    candidates = [
        folder / f"{stem}.labels.json",
        folder / f"{stem}_labels.json",
        folder / "labels.json",
        folder / "dataset.json",
        folder.parent / "dataset.json",
    ]
    for candidate in candidates:
        if candidate.is_file():
            if candidate.name == "dataset.json":
                try:
                    if "labels" not in json.loads(candidate.read_text()):
                        continue
                except (OSError, json.JSONDecodeError):
                    continue
            return candidate
    return None


# --------------------------------------------------------------------------- cases
@dataclass
class CaseSource:
    """Where one case's masks live.

    Attributes:
        name: case name (file stem or folder name).
        kind: "multilabel" (one labelled NIfTI) or "per_class" (one binary NIfTI per class).
        path: the multilabel file or the case folder.
        label_map: for multilabel: class name -> values (None: values are named "label_<v>").
        class_files: for per_class: class name -> file.
    """

    name: str
    kind: str
    path: Path
    label_map: LabelMap | None = None
    class_files: dict[str, Path] = field(default_factory=dict)
    label_map_source: str | None = None


def _multilabel_case(path: Path, name: str, labels: LabelMap | None, key: str | None) -> CaseSource:
    source = None
    if labels is None:
        found = find_label_map(path)
        if found is not None:
            labels, source = read_label_map(found, key=key), str(found)
    else:
        source = "given"
    return CaseSource(
        name=name, kind="multilabel", path=path, label_map=labels, label_map_source=source
    )


def case_from_folder(
    folder: Path, name: str | None = None, labels: LabelMap | None = None, key: str | None = None
) -> CaseSource:
    """Read a case folder: a labels.json plus one multilabel NIfTI, or one mask per class."""
    name = name or folder.name
    masks = [p for p in _nifti_files(folder) if not _is_prob(p)]
    if (folder / "labels.json").is_file() or labels is not None:
        if len(masks) == 1:
            return _multilabel_case(masks[0], name, labels, key)
        preferred = [p for p in masks if nifti_stem(p) == "segmentation"]
        if preferred:
            return _multilabel_case(preferred[0], name, labels, key)
    if not masks:
        raise DataError(
            f"case folder {folder} holds no NIfTI mask (*.nii.gz); expected one file per class"
        )
    files: dict[str, Path] = {}
    for path in masks:
        class_name = normalise_name(nifti_stem(path) or path.name)
        if class_name in files:
            raise DataError(
                f"{folder}: {files[class_name].name} and {path.name} name the same class {class_name!r}"
            )
        files[class_name] = path
    return CaseSource(name=name, kind="per_class", path=folder, class_files=files)


def discover_cases(
    root: str | os.PathLike, *, labels: LabelMap | None = None, labels_key: str | None = None
) -> dict[str, CaseSource]:
    """Cases under a folder: multilabel NIfTI files and case folders, by case name.

    Raises:
        DataError: the folder does not exist or holds no case.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    cases: dict[str, CaseSource] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if any(nifti_stem(p) for p in entry.iterdir() if p.is_file()):
                cases[entry.name] = case_from_folder(entry, labels=labels, key=labels_key)
        elif nifti_stem(entry) is not None and not _is_prob(entry):
            cases[nifti_stem(entry) or entry.name] = _multilabel_case(
                entry, nifti_stem(entry) or entry.name, labels, labels_key
            )
    if not cases:
        raise DataError(
            f"{root} holds no case: expected multilabel NIfTI files (case.nii.gz) or one folder per "
            "case with one mask per class (case/liver.nii.gz)"
        )
    return cases


def single_case(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    labels: LabelMap | None = None,
    labels_key: str | None = None,
) -> CaseSource:
    """One case from a multilabel NIfTI file or a case folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        return case_from_folder(path, name=name, labels=labels, key=labels_key)
    if path.is_file() and nifti_stem(path) is not None:
        return _multilabel_case(path, name or nifti_stem(path) or path.name, labels, labels_key)
    raise DataError(f"{path} is neither a NIfTI file nor a case folder")


# --------------------------------------------------------------------------- reading
def load_image(path: Path):
    """nibabel image of a NIfTI file, with a clear error when it cannot be read."""
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types
        raise VolumeError(f"cannot read {path}: {exc}") from None


def _array3d(img: Any, path: Path) -> np.ndarray:
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path} has shape {data.shape}; expected one 3D mask or label map")
    return data


def same_grid(
    img: Any, ref_img: Any, *, path: Path, ref_path: Path | str, tolerance_mm: float = 1e-2
) -> Any:
    """Return `img` on the reference grid's axis order, or raise when the grids differ.

    A prediction stored in another axis order (e.g. LPS vs RAS) of the same grid is reoriented
    (a lossless flip/transpose); anything else (other shape, spacing or origin) is an error.

    Raises:
        VolumeError: shapes or affines differ by more than `tolerance_mm`.
    """
    import nibabel as nib
    from nibabel.orientations import io_orientation, ornt_transform

    ref_shape = tuple(ref_img.shape[:3])
    if nib.aff2axcodes(img.affine) != nib.aff2axcodes(ref_img.affine):
        transform = ornt_transform(io_orientation(img.affine), io_orientation(ref_img.affine))
        img = img.as_reoriented(transform)
        logger.info(
            "%s: reoriented to %s to match the reference",
            path,
            "".join(nib.aff2axcodes(ref_img.affine)),
        )
    shape = tuple(img.shape[:3])
    difference = float(np.max(np.abs(np.asarray(img.affine) - np.asarray(ref_img.affine))))
    if shape != ref_shape or difference > tolerance_mm:

        def fmt(matrix: Any) -> str:
            return np.array2string(
                np.asarray(matrix, dtype=float), precision=4, suppress_small=True
            )

        raise VolumeError(
            f"{path} is not on the grid of the reference {ref_path}: shape {shape} vs {ref_shape}, "
            f"largest affine difference {difference:.4g} mm (tolerance {tolerance_mm} mm).\n"
            f"prediction affine:\n{fmt(img.affine)}\nreference affine:\n{fmt(ref_img.affine)}\n"
            "Resample the prediction onto the reference image (nearest neighbour), e.g. "
            "nibabel.processing.resample_from_to(pred, ref, order=0), or raise --grid-tolerance-mm "
            "if the difference is only rounding."
        )
    return img


class CaseMasks(Mapping[str, np.ndarray]):
    """Class name -> boolean mask (X, Y, Z) of one case, read lazily one class at a time."""

    def __init__(
        self,
        source: CaseSource,
        ref_img: Any = None,
        *,
        ref_path: Path | str = "",
        grid_tolerance_mm: float = 1e-2,
    ):
        self.source = source
        self._labels: np.ndarray | None = None
        self._label_map: LabelMap = {}
        self._images: dict[str, Any] = {}
        self._cache: tuple[str, np.ndarray] | None = None
        if source.kind == "multilabel":
            img = load_image(source.path)
            if ref_img is not None:
                img = same_grid(
                    img,
                    ref_img,
                    path=source.path,
                    ref_path=ref_path,
                    tolerance_mm=grid_tolerance_mm,
                )
            self.image = img
            data = _array3d(img, source.path)
            if np.issubdtype(data.dtype, np.floating):
                rounded = np.rint(data)
                if not np.allclose(data, rounded, atol=1e-3):
                    raise DataError(
                        f"{source.path} holds non-integer values; expected a label map (integers). "
                        "Probability maps go to --prob"
                    )
                data = rounded
            self._labels = data.astype(np.int64, copy=False)
            if source.label_map is None:
                present = [int(v) for v in np.unique(self._labels) if v != 0]
                logger.warning(
                    "%s has no label map (labels.json / --labels): its classes are named label_<value> (%s)",
                    source.path,
                    ", ".join(f"label_{v}" for v in present) or "none present",
                )
                self._label_map = {f"label_{v}": (v,) for v in present}
            else:
                self._label_map = dict(source.label_map)
            self._names = list(self._label_map)
        else:
            self._names = list(source.class_files)
            self.image = None
            for name, path in source.class_files.items():
                img = load_image(path)
                if ref_img is not None:
                    img = same_grid(
                        img, ref_img, path=path, ref_path=ref_path, tolerance_mm=grid_tolerance_mm
                    )
                elif self.image is not None:
                    img = same_grid(
                        img,
                        self.image,
                        path=path,
                        ref_path=source.class_files[self._names[0]],
                        tolerance_mm=grid_tolerance_mm,
                    )
                self._images[name] = img
                if self.image is None:
                    self.image = img

    def __getitem__(self, name: str) -> np.ndarray:
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        if self._labels is not None:
            if name not in self._label_map:
                raise KeyError(name)
            mask = np.isin(self._labels, self._label_map[name])
        else:
            img = self._images[name]  # KeyError for an unknown class
            path = self.source.class_files[name]
            data = _array3d(img, path)
            if np.issubdtype(data.dtype, np.floating) and not np.allclose(
                data, np.rint(data), atol=1e-3
            ):
                raise DataError(
                    f"{path} holds non-integer values; expected a binary mask. A probability map "
                    f"should be named {name}{PROB_SUFFIX}.nii.gz and passed with --prob"
                )
            mask = data > 0
        self._cache = (name, mask)
        return mask

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def spacing_of(img: Any) -> tuple[float, float, float]:
    """Voxel size in mm along the array axes (column norms of the affine)."""
    affine = np.asarray(img.affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[return-value]


# --------------------------------------------------------------------------- probabilities
@dataclass
class ProbabilitySource:
    """Probability maps of one case: class name -> NIfTI file or (npz file, array key)."""

    case: str
    files: dict[str, Path] = field(default_factory=dict)
    npz: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.files) + [n for n in self.npz if n not in self.files]


def _probabilities_in(folder: Path, case: str) -> ProbabilitySource:
    source = ProbabilitySource(case)
    files = _nifti_files(folder)
    prob_files = [p for p in files if _is_prob(p)]
    for path in prob_files or files:
        stem = nifti_stem(path) or path.name
        if stem.endswith(PROB_SUFFIX):
            stem = stem[: -len(PROB_SUFFIX)]
        source.files[normalise_name(stem)] = path
    npz = folder / "probabilities.npz"
    if npz.is_file():
        source.npz.update(_npz_keys(npz))
    return source


def _npz_keys(path: Path) -> dict[str, tuple[Path, str]]:
    try:
        with np.load(path) as archive:
            keys = list(archive.files)
    except Exception as exc:
        raise DataError(f"cannot read probability archive {path}: {exc}") from None
    out = {}
    for key in keys:
        stem = key[: -len(PROB_SUFFIX)] if key.endswith(PROB_SUFFIX) else key
        out[normalise_name(stem)] = (path, key)
    return out


def find_probabilities(
    root: str | os.PathLike, case: str, *, single: bool = False
) -> ProbabilitySource | None:
    """Probability maps of `case` under `root`: ``root/case/<class>_prob.nii.gz`` (or
    ``<class>.nii.gz`` when the folder has no *_prob file), ``root/case/probabilities.npz`` or
    ``root/case.npz`` (arrays named by class). With `single`, `root` itself may be the case
    folder."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--prob {root} is not a folder")
    if (root / case).is_dir():
        return _probabilities_in(root / case, case)
    if (root / f"{case}.npz").is_file():
        return ProbabilitySource(case, npz=_npz_keys(root / f"{case}.npz"))
    if single:
        found = _probabilities_in(root, case)
        if found.names():
            return found
    return None


def load_probability(
    source: ProbabilitySource,
    name: str,
    ref_img: Any,
    *,
    ref_path: Path | str = "",
    grid_tolerance_mm: float = 1e-2,
) -> np.ndarray:
    """Probability map (X, Y, Z) float32 of class `name`, on the reference grid."""
    if name in source.files:
        path = source.files[name]
        img = same_grid(
            load_image(path), ref_img, path=path, ref_path=ref_path, tolerance_mm=grid_tolerance_mm
        )
        return np.asarray(_array3d(img, path), dtype=np.float32)
    path, key = source.npz[name]
    with np.load(path) as archive:
        array = np.asarray(archive[key], dtype=np.float32)
    if array.shape != tuple(ref_img.shape[:3]):
        raise VolumeError(
            f"{path}[{key!r}] has shape {array.shape}, the reference {tuple(ref_img.shape[:3])}; "
            ".npz probability maps carry no affine and must be stored in the reference's voxel order"
        )
    return array
