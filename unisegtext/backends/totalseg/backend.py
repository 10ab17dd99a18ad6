"""TotalSegmentator's published networks behind the backend interface.

Inference reproduces ``TotalSegmentator 2.18.0`` (``totalsegmentator/nnunet.py``) around nnU-Net's
predictor, step for step:

1. RAS: ``nibabel.as_closest_canonical`` on a float64 copy of the scan.
2. Resample to the task spacing (e.g. 1.5 mm for `total`, 3 mm for `total_fast`) with
   ``scipy.ndimage.zoom(order=1, mode="nearest")``, values truncated to int32 (nothing when the
   header spacing already equals it). The voxel size nnU-Net sees is the float32 header value.
3. Big volumes of multi-part tasks (> 512*512*900 voxels and > 200 slices) run in three z-chunks
   with a 20-slice margin.
4. Per part, nnU-Net (see :mod:`.nnunet`): array as (z, y, x), crop, normalise, resample, sliding
   window (`tile_step_size` 0.8 for total/total_mr), argmax, back to the resampled grid.
5. Parts merge through a lookup table into the task's global label ids; later parts overwrite
   earlier ones. Only the parts holding a prompted class run (as TotalSegmentator's
   `roi_subset`, without its 6 mm crop pre-pass); ``all_parts=True`` runs every part.
6. Nearest-neighbour zoom back to the RAS grid of the input, then the reorientation is undone.

Each concept's map is 1.0 where the merged label is its class, else 0.0 (TotalSegmentator's
probabilities are not meaningful for `total`, so none are made up).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unisegtext.backends.base import Backend, concepts_for_class_names
from unisegtext.backends.totalseg.convert import CONFIG_NAME, FORMAT, WEIGHTS_NAME
from unisegtext.backends.totalseg.tasks import PartSpec, TaskSpec, get_task
from unisegtext.errors import ModelLoadError

logger = logging.getLogger(__name__)

TRIPLE_SPLIT_VOXELS = 512 * 512 * 900  # TotalSegmentator's threshold (resampled grid)
TRIPLE_SPLIT_MIN_SLICES = 200
TRIPLE_SPLIT_MARGIN = 20


class PartModel:
    """One converted nnU-Net part: config.json + model.safetensors; the network loads lazily."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / CONFIG_NAME
        try:
            self.config: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} could not be read ({exc})") from exc
        if self.config.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is not a converted nnU-Net part (format {self.config.get('format')!r})")
        self.labels: dict[int, str] = {int(k): v for k, v in self.config["labels"].items()}
        self.preprocessing: dict[str, Any] = self.config["preprocessing"]
        self._network = None

    @property
    def dataset_name(self) -> str:
        return self.config["dataset_name"]

    def network(self):
        if self._network is None:
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            from unisegtext.backends.totalseg.network import (
                PlainConvUNet,
                UNetArchitecture,
                load_strict,
            )

            path = self.folder / WEIGHTS_NAME
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelLoadError(f"{path} is missing or not a valid safetensors file ({exc})") from exc
            network = PlainConvUNet(UNetArchitecture.from_dict(self.config["architecture"]))
            load_strict(network, state, str(path))
            self._network = network.eval()
        return self._network

    def predict_labels(self, image: np.ndarray, spacing: Sequence[float], *, tile_step_size: float,
                       device: str = "cpu", progress: bool = False) -> np.ndarray:
        """nnU-Net inference on one image as nnU-Net reads it: (z, y, x) array, (z, y, x) spacing
        in mm. Returns part-local labels (z, y, x), uint8."""
        import torch

        from unisegtext.backends.totalseg.nnunet import (
            logits_to_labels,
            preprocess,
            sliding_window_logits,
        )

        data, props = preprocess(image[None], list(spacing), self.preprocessing)
        logits = sliding_window_logits(self.network(), torch.from_numpy(data), self.preprocessing["patch_size"],
                                       tile_step_size, device=device, progress=progress)
        return logits_to_labels(logits, props, self.preprocessing)


class TotalSegmentatorBackend(Backend):
    """TotalSegmentator's `total` (five 1.5 mm parts), `total_fast` (one 3 mm model), `total_mr`
    (two 1.5 mm parts) and `total_mr_fast` (one 3 mm model) networks.

    Args:
        task: a task of ``tasks.json`` ("total", "total_fast", "total_mr", "total_mr_fast").
        weights: converted parts, a release zip, an nnU-Net results folder, or a folder of those;
            None: the cache (filled from the official release when downloads are allowed).
        cache_dir: cache root (default ``~/.cache/unisegtext/totalsegmentator``).
        device: torch device for the networks.
        allow_download: override the UNISEGTEXT_OFFLINE / HF_HUB_OFFLINE switch.
        all_parts: run every part (exactly a full TotalSegmentator run) instead of only the parts
            that hold a prompted class.
        tile_step_size: override the task's sliding-window step (fraction of the patch).
        progress: progress bars for downloads and windows.
    """

    def __init__(self, task: str = "total", *, weights: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, device: str = "cpu", allow_download: bool | None = None,
                 all_parts: bool = False, tile_step_size: float | None = None, progress: bool = False):
        self.task: TaskSpec = get_task(task)
        self.name = f"totalsegmentator:{task}"
        self.version = ", ".join(self.task.versions)
        self.licence = self.task.licence
        self.source = f"{self.task.source}; " + ", ".join(p.url for p in self.task.parts)
        self.modalities = (self.task.modality,)
        self.weights = weights
        self.cache_dir = cache_dir
        self.device = device
        self.allow_download = allow_download
        self.all_parts = all_parts
        self.tile_step_size = self.task.tile_step_size if tile_step_size is None else float(tile_step_size)
        self.progress = progress
        self._parts: dict[str, PartModel] = {}
        self._concept_of = concepts_for_class_names(self.task.class_map.values(), self.name)

    # ------------------------------------------------------------ interface

    def concepts(self) -> list[str]:
        return list(dict.fromkeys(self._concept_of[n] for n in self.task.class_map.values()))

    def contract(self) -> dict[str, Any]:
        loaded = next(iter(self._parts.values()), None)
        prep = loaded.preprocessing if loaded is not None else None
        return {
            "orientation": "RAS (nibabel.as_closest_canonical), undone on output",
            "spacing_mm": list(self.task.resample_mm),
            "resampling": "scipy.ndimage.zoom order 1, mode nearest, int32; output: nearest (order 0)",
            "normalisation": (prep["normalization_schemes"] if prep else
                              ("CTNormalization" if self.task.modality == "CT" else "ZScoreNormalization")),
            "intensity_properties": prep["foreground_intensity_properties_per_channel"] if prep else None,
            "patch_size": prep["patch_size"] if prep else None,  # known once weights are loaded
            "tile_step_size": self.tile_step_size,
            "blending": "Gaussian, sigma = patch/8, fp16 accumulation, no mirroring",
            "output": "argmax per part, parts merged in order (later overwrite), 0/1 maps",
            "modality": self.task.modality,
        }

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["parts"] = [{"task_id": p.task_id, "folder": p.folder, "url": p.url, "version": p.version,
                          "trainer": p.trainer, "n_classes": len(p.classes)} for p in self.task.parts]
        return info

    def predict(self, volume, concepts: Sequence[str]) -> dict[str, np.ndarray]:
        concepts = self.check_concepts(concepts)
        modality = getattr(volume, "modality", None)
        if modality is not None and modality != self.task.modality:
            logger.warning("%s was trained on %s but the scan is %s; expect poor masks", self.name,
                           self.task.modality, modality)
        class_ids = {c: [gid for gid, n in self.task.class_map.items() if self._concept_of[n] == c] for c in concepts}
        labels = self.predict_labels(volume, self._parts_for(concepts))
        return {c: np.isin(labels, ids).astype(np.float32) for c, ids in class_ids.items()}

    def weights_ready(self, concepts: Sequence[str] | None = None) -> bool:
        """Whether the parts needed for `concepts` (default: all) are at hand without a download
        (for routing with model="auto" offline)."""
        from unisegtext.backends.totalseg.weights import parts_to_fetch

        parts = self.task.parts if concepts is None else self._parts_for(self.check_concepts(concepts))
        return not parts_to_fetch(self.task, parts, weights=self.weights, cache_dir=self.cache_dir)

    def _parts_for(self, concepts: Sequence[str]) -> list[PartSpec]:
        wanted = {n for n in self.task.class_map.values() if self._concept_of[n] in set(concepts)}
        return list(self.task.parts) if self.all_parts else [p for p in self.task.parts if wanted & set(p.classes)]

    # ------------------------------------------------------------ pipeline

    def load_parts(self, parts: Sequence[PartSpec]) -> list[PartModel]:
        """The converted part models (located, converted or downloaded on first use)."""
        from unisegtext.backends.totalseg.weights import locate_parts

        todo = [p for p in parts if p.folder not in self._parts]
        if todo:
            folders = locate_parts(self.task, todo, weights=self.weights, cache_dir=self.cache_dir,
                                   allow_download=self.allow_download, progress=self.progress)
            for part in todo:
                model = PartModel(folders[part.folder])
                self._check_part(part, model)
                self._parts[part.folder] = model
        return [self._parts[p.folder] for p in parts]

    def _check_part(self, part: PartSpec, model: PartModel) -> None:
        expected = dict(enumerate(part.classes, start=1))
        if model.labels != expected:
            diff = [(k, model.labels.get(k), expected.get(k)) for k in sorted(set(model.labels) | set(expected))
                    if model.labels.get(k) != expected.get(k)]
            raise ModelLoadError(
                f"{model.folder}: its labels do not match TotalSegmentator's class map for {part.folder} "
                f"(label, weights, expected): {diff[:5]}; these weights belong to another task or version"
            )

    def predict_labels(self, volume, parts: Sequence[PartSpec] | None = None) -> np.ndarray:
        """The task's multilabel map (global ids, uint8) on the input grid, from `parts` (default all)."""
        import nibabel as nib
        from scipy import ndimage

        parts = list(self.task.parts if parts is None else parts)
        models = self.load_parts(parts)
        image = nib.Nifti1Image(np.asarray(volume.array, dtype=np.float64), volume.affine)
        canonical = nib.as_closest_canonical(image)
        data = np.asanyarray(canonical.dataobj)
        zooms = np.array(canonical.header.get_zooms()[:3])
        target = np.array(self.task.resample_mm)
        if np.array_equal(zooms, target):
            resampled, resampled_img = data, canonical
        else:
            zoom = zooms / target
            resampled = ndimage.zoom(data, zoom, order=1, mode="nearest").astype(np.int32)
            affine = canonical.affine.copy()
            affine[:3, :3] = affine[:3, :3] / zoom
            resampled_img = nib.Nifti1Image(resampled, affine)
        spacing = [float(s) for s in resampled_img.header.get_zooms()[:3]]
        merged = self._run_parts(models, resampled, spacing)
        if merged.shape != data.shape:
            merged = ndimage.zoom(merged.astype(np.float64), np.array(data.shape) / np.array(merged.shape),
                                  order=0, mode="nearest").astype(np.uint8)
        restored = nib.Nifti1Image(merged, canonical.affine).as_reoriented(
            nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                            nib.orientations.io_orientation(volume.affine)))
        labels = np.asarray(restored.dataobj)
        if labels.shape != volume.shape:  # pragma: no cover - guarded by construction
            raise RuntimeError(f"labels {labels.shape} do not match the input grid {volume.shape}")
        return labels

    def _run_parts(self, models: list[PartModel], image: np.ndarray, spacing: list[float]) -> np.ndarray:
        """Merged global labels (x, y, z) on the resampled RAS grid."""
        inverse = {name: gid for gid, name in self.task.class_map.items()}
        chunks = self._chunks(image.shape)
        merged = np.zeros(image.shape, dtype=np.uint8)
        for model in models:
            lut = np.zeros(max(model.labels) + 1, dtype=np.uint8)
            for local, name in model.labels.items():
                lut[local] = inverse[name]
            for read, write, keep in chunks:
                # nnU-Net reads NIfTI as (z, y, x); its spacing reversed alike
                local = model.predict_labels(np.asarray(image[..., read]).transpose(2, 1, 0), spacing[::-1],
                                             tile_step_size=self.tile_step_size, device=self.device,
                                             progress=self.progress).transpose(2, 1, 0)
                mapped = lut[local[..., keep]]
                np.copyto(merged[..., write], mapped, where=mapped != 0)
        return merged

    def _chunks(self, shape: tuple[int, ...]) -> list[tuple[slice, slice, slice]]:
        """(read, write, keep) z-slices: the whole volume, or TotalSegmentator's three chunks."""
        whole = slice(None)
        multimodel = self.task.triple_split and len(self.task.parts) > 1
        if not (multimodel and np.prod(shape) > TRIPLE_SPLIT_VOXELS and shape[2] > TRIPLE_SPLIT_MIN_SLICES):
            return [(whole, whole, whole)]
        third, margin = shape[2] // 3, TRIPLE_SPLIT_MARGIN
        return [
            (slice(None, third + margin), slice(None, third), slice(None, -margin)),
            (slice(third + 1 - margin, third * 2 + margin), slice(third, third * 2), slice(margin - 1, -margin)),
            (slice(third * 2 + 1 - margin, None), slice(third * 2, None), slice(margin - 1, None)),
        ]
