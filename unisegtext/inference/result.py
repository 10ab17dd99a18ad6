"""`SegmentationResult`: masks on the input grid, what each prompt meant, and writers."""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.io.nifti import image_like, save_nifti_atomic
from unisegtext.io.volume import Volume

logger = logging.getLogger(__name__)


@dataclass
class PromptResolution:
    """How one prompt was understood.

    Attributes:
        prompt: the text as given.
        concept_id: the knowledge-tree concept it resolved to (None in open-vocabulary mode
            when nothing matched).
        concept_name: the concept's preferred name.
        how: "exact", "synonym", "normalised", "fuzzy", "embedding" or "open_vocabulary".
        confidence: 0..1.
        union_of: concepts queried and merged when the model has no direct training for the
            concept ("kidney" -> kidney_left + kidney_right); empty when queried directly.
        text: the text(s) given to the text encoder.
        warnings: anything the user should know (guesses, unions, untrained concepts).
        answered_by: the model that answered it (routing over several backends), or None
            for a single UniSegText model.
    """

    prompt: str
    concept_id: str | None
    concept_name: str | None
    how: str
    confidence: float
    union_of: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    answered_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SegmentationResult:
    """Masks for every prompt on the exact input grid.

    Attributes:
        masks: prompt -> bool array (X, Y, Z) on the input grid.
        probabilities: prompt -> float32 array (X, Y, Z), if asked for.
        resolutions: prompt -> :class:`PromptResolution`.
        volume: the input scan (its grid, affine and header are used by the writers).
        scores: prompt -> mean probability inside the mask (0 when empty).
        timings: seconds per stage.
        model: a short description of the model that produced it.
        modality: "CT" or "MR" as used for normalisation.
        modality_source: how it was decided: "given", "dicom" or "guessed".
        presence: prompt -> probability (0..1) that the structure is in the scan at all.
        present: prompt -> the decision; an absent prompt has an empty mask.
        presence_features: prompt -> the presence features of its strongest member
            (:data:`unisegtext.inference.presence.FEATURES`), for fitting and audits.
    """

    masks: dict[str, np.ndarray]
    resolutions: dict[str, PromptResolution]
    volume: Volume
    probabilities: dict[str, np.ndarray] | None = None
    scores: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    modality: str | None = None
    modality_source: str | None = None
    presence: dict[str, float] = field(default_factory=dict)
    present: dict[str, bool] = field(default_factory=dict)
    presence_features: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for prompt, mask in self.masks.items():  # results made without a presence decision
            self.present.setdefault(prompt, bool(np.any(mask)))
            self.presence.setdefault(prompt, 1.0 if self.present[prompt] else 0.0)

    @property
    def absent(self) -> list[str]:
        """Prompts decided absent from the scan (their masks are empty)."""
        return [p for p in self.prompts if not self.present.get(p, True)]

    @property
    def prompts(self) -> list[str]:
        return list(self.masks)

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    @property
    def volumes_ml(self) -> dict[str, float]:
        """Volume of each mask in millilitres."""
        voxel = self.volume.voxel_volume_ml
        return {p: float(np.count_nonzero(m)) * voxel for p, m in self.masks.items()}

    def __getitem__(self, prompt: str) -> np.ndarray:
        return self.masks[prompt]

    def __iter__(self):
        return iter(self.masks)

    def __len__(self) -> int:
        return len(self.masks)

    def __repr__(self) -> str:
        parts = ", ".join(f"{p!r}: {v:.1f} mL" for p, v in self.volumes_ml.items())
        return f"SegmentationResult(shape={self.volume.shape}, {{{parts}}})"

    # ------------------------------------------------------------------ multilabel
    def label_map(self) -> tuple[np.ndarray, dict[int, str]]:
        """One uint8/uint16 label map and its values (1..P in prompt order).

        Where masks overlap ("kidney" and "kidney tumor"), the voxel takes the label of the
        smallest mask, so nested structures (tumours in organs) stay visible.
        """
        prompts = self.prompts
        dtype = np.uint8 if len(prompts) < 255 else np.uint16
        labels = np.zeros(self.volume.shape, dtype=dtype)
        order = sorted(range(len(prompts)), key=lambda i: -int(np.count_nonzero(self.masks[prompts[i]])))
        overlapping = 0
        for i in order:  # largest first; smaller masks overwrite
            mask = self.masks[prompts[i]]
            overlapping += int(np.count_nonzero(labels[mask]))
            labels[mask] = i + 1
        if overlapping:
            logger.info("%d voxels are in more than one mask; the smallest mask's label is kept", overlapping)
        return labels, {i + 1: p for i, p in enumerate(prompts)}

    # ------------------------------------------------------------------ writers
    def save(
        self,
        out_dir: str | os.PathLike,
        *,
        multilabel: bool = False,
        probabilities: bool = False,
        output_type: str = "nifti",
        dicom_generic_codes: bool = False,
        statistics: bool = False,
        preview: bool = False,
        info: dict[str, Any] | None = None,
    ) -> list[Path]:
        """Write the result set into `out_dir` and return the written files (``manifest.json`` last).

        The folder holds one result set (see :mod:`unisegtext.io.output`): files are staged in
        a hidden folder inside `out_dir`, moved in together under an exclusive lock, files of
        the previous run there (those its ``manifest.json`` lists) that this run does not write
        are removed, and the new ``manifest.json`` is written last. A failure or a signal never
        leaves a partial or mixed set; other files in the folder are not touched.

        Args:
            multilabel: one `segmentation.nii.gz` + `labels.json` instead of one file per prompt.
            probabilities: also write `<name>_prob.nii.gz` float maps (needs
                return_probabilities=True).
            output_type: "nifti" or "dicom-seg" (needs the `dicom` extra and a DICOM input).
            dicom_generic_codes: for "dicom-seg", code a concept that has no DICOM code in the
                knowledge tree with a generic one ("Tissue", or "Lesion" for lesions) instead
                of refusing (see :func:`unisegtext.io.dicom_seg.write_dicom_seg`).
            statistics: also write `statistics.json` (see :meth:`statistics`).
            preview: also write `preview.png` (see :meth:`write_preview`).
            info: extra facts for the manifest.
        """
        from unisegtext.io.output import OutputFolder

        if output_type not in ("nifti", "dicom-seg"):
            raise ValueError(f"output_type must be 'nifti' or 'dicom-seg', got {output_type!r}")
        if probabilities and self.probabilities is None:
            raise ValueError("no probabilities to write: call segment(..., return_probabilities=True)")
        with OutputFolder(out_dir) as out:
            staged = self._write(out.staging, multilabel=multilabel, probabilities=probabilities,
                                 output_type=output_type, dicom_generic_codes=dicom_generic_codes)
            if statistics:
                staged.append(self.write_statistics(out.staging / "statistics.json"))
            if preview:
                staged.append(self.write_preview(out.staging / "preview.png"))
            manifest_info = {
                "scan": self.volume.source, "shape": list(self.volume.shape), "prompts": self.prompts,
                "model": {k: self.model.get(k) for k in ("name", "weights_sha256") if k in self.model},
                **(info or {}),
            }
            return out.publish(staged, manifest_info)

    def _write(self, folder: Path, *, multilabel: bool, probabilities: bool, output_type: str,
               dicom_generic_codes: bool = False) -> list[Path]:
        written: list[Path] = []
        names = file_names(self.prompts)
        if output_type == "dicom-seg":
            from unisegtext.io.dicom_seg import write_dicom_seg

            written.append(write_dicom_seg(self, folder / "segmentation.dcm", generic_codes=dicom_generic_codes))
        elif output_type != "nifti":
            raise ValueError(f"output_type must be 'nifti' or 'dicom-seg', got {output_type!r}")
        elif multilabel:
            labels, values = self.label_map()
            written.append(save_nifti_atomic(image_like(labels, self.volume), folder / "segmentation.nii.gz"))
            label_json = {
                "labels": {"0": "background"} | {str(k): v for k, v in values.items()},
                "prompts": {p: {"label": k, "concept_id": self.resolutions[p].concept_id if p in self.resolutions else None,
                                "present": bool(self.present.get(p, True)),
                                "presence_probability": round(float(self.presence.get(p, 1.0)), 4)}
                            for k, p in values.items()},
            }
            written.append(_write_json(folder / "labels.json", label_json))
        else:
            for prompt, name in names.items():
                mask = self.masks[prompt].astype(np.uint8)
                written.append(save_nifti_atomic(image_like(mask, self.volume), folder / f"{name}.nii.gz"))
        if probabilities:
            if self.probabilities is None:
                raise ValueError("no probabilities to write: call segment(..., return_probabilities=True)")
            for prompt, name in names.items():
                prob = self.probabilities[prompt].astype(np.float32)
                written.append(save_nifti_atomic(image_like(prob, self.volume), folder / f"{name}_prob.nii.gz"))
        summary = {
            "prompts": {p: r.to_dict() for p, r in self.resolutions.items()},
            "files": {p: f"{names[p]}.nii.gz" for p in self.prompts} if output_type == "nifti" and not multilabel else {},
            "volumes_ml": self.volumes_ml,
            "scores": self.scores,
            "present": self.present,
            "presence_probability": self.presence,
            "model": self.model,
            "modality": {"value": self.modality, "how": self.modality_source},
        }
        written.append(_write_json(folder / "prompts.json", summary))
        return written

    # ------------------------------------------------------------------ statistics, previews
    def statistics(self, prompts: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """Per prompt: volume (mL), voxel count, centroid and bounding box (voxel and RAS mm),
        intensity mean/std, 26-connected components, and ``present: False`` when empty.

        See :func:`unisegtext.inference.statistics.mask_statistics` for every field.
        """
        from unisegtext.inference.statistics import result_statistics

        return result_statistics(self, prompts)

    def write_statistics(self, path: str | os.PathLike) -> Path:
        """Write :meth:`statistics` as JSON (e.g. ``statistics.json``)."""
        from unisegtext.inference.statistics import write_statistics

        return write_statistics(self, path)

    def colors(self) -> dict[str, tuple[int, int, int]]:
        """Display colour (r, g, b), 0-255, per prompt: the concept's colour from the
        knowledge tree, or a distinct fallback colour for prompts without a concept."""
        import colorsys

        tree = None
        colors: dict[str, tuple[int, int, int]] = {}
        for n, prompt in enumerate(self.prompts):
            concept_id = self.resolutions[prompt].concept_id if prompt in self.resolutions else None
            if concept_id is not None:
                if tree is None:
                    from unisegtext.knowledge import load_tree

                    tree = load_tree()
                if concept_id in tree:
                    colors[prompt] = tuple(int(c) for c in tree.get(concept_id).color)  # type: ignore[assignment]
                    continue
            hue = (0.13 + 0.618034 * n) % 1.0  # golden-ratio steps keep neighbours apart
            r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
            colors[prompt] = (round(r * 255), round(g * 255), round(b * 255))
        return colors

    def write_preview(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """Write a PNG with axial, coronal and sagittal overlays and a colour legend.

        See :func:`unisegtext.io.preview.write_preview` for the options.
        """
        from unisegtext.io.preview import write_preview

        return write_preview(self, path, **kwargs)

    def to_dicom_seg(self, path: str | os.PathLike, *, generic_codes: bool = False) -> Path:
        """Write a DICOM SEG that references the source DICOM series (DICOM input only).

        See :func:`unisegtext.io.dicom_seg.write_dicom_seg`.
        """
        from unisegtext.io.dicom_seg import write_dicom_seg

        return write_dicom_seg(self, path, generic_codes=generic_codes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (no arrays)."""
        return {
            "shape": list(self.volume.shape),
            "spacing_mm": list(self.volume.spacing),
            "prompts": {p: r.to_dict() for p, r in self.resolutions.items()},
            "volumes_ml": self.volumes_ml,
            "scores": self.scores,
            "present": self.present,
            "presence_probability": self.presence,
            "timings": self.timings,
            "model": self.model,
            "modality": {"value": self.modality, "how": self.modality_source},
        }


def file_names(prompts: list[str]) -> dict[str, str]:
    """A safe, unique file stem per prompt ("kidney tumor" -> "kidney_tumor")."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for prompt in prompts:
        stem = re.sub(r"[^A-Za-z0-9]+", "_", prompt.strip()).strip("_").lower() or "prompt"
        stem = stem[:80]
        candidate, n = stem, 2
        while candidate in used or candidate in {"segmentation", "labels", "prompts", "statistics", "manifest"}:
            candidate, n = f"{stem}_{n}", n + 1
        used.add(candidate)
        names[prompt] = candidate
    return names


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
