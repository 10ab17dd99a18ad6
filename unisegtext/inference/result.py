"""`SegmentationResult`: the result record (:mod:`unisegtext.io.record`) with its writers."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.io.nifti import image_like, save_nifti_atomic
from unisegtext.io.record import PromptResolution, ResultRecord

logger = logging.getLogger(__name__)

__all__ = ["PromptResolution", "SegmentationResult", "file_names"]


class SegmentationResult(ResultRecord):
    """Masks for every prompt on the exact input grid, with writers (the fields are those of
    :class:`~unisegtext.io.record.ResultRecord`)."""

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
