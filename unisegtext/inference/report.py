"""Run reports: what was run, with which model and software, and what came out.

A run report (``--report run.json``) lets a result be traced and reproduced: package
versions, the model id and the SHA-256 of its weights, the device, each prompt with the
concept it resolved to (and how), the output files with their sizes and hashes, and timings.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from unisegtext.io.record import ResultRecord as SegmentationResult

REPORT_VERSION = 1
PACKAGES = ("unisegtext", "torch", "numpy", "monai", "nibabel", "transformers", "pydicom", "highdicom", "scipy")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions.get("unisegtext") is None:  # running from a source tree
        from unisegtext import __version__

        versions["unisegtext"] = __version__
    return versions


def file_record(path: str | os.PathLike, *, hash_limit_mb: float = 512.0) -> dict[str, Any]:
    """Name, size and SHA-256 (files up to `hash_limit_mb`) of an output file."""
    path = Path(path)
    size = path.stat().st_size
    record: dict[str, Any] = {"path": str(path), "bytes": size}
    if size <= hash_limit_mb * 1024 * 1024:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        record["sha256"] = digest.hexdigest()
    return record


def build_report(
    result: SegmentationResult,
    files: Sequence[str | os.PathLike] = (),
    *,
    command: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-able run report for `result`.

    Args:
        result: the segmentation result.
        files: the output files written for it.
        command: the command line, when run from the CLI.
        options: the options the run was made with (threshold, overlap, output type...).
    """
    try:
        from unisegtext.knowledge import load_tree

        ontology_version: str | None = load_tree().version
    except Exception:  # the report must never fail because of the tree
        ontology_version = None
    volume = result.volume
    model = dict(result.model)
    return {
        "report_version": REPORT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else None,
        "versions": package_versions(),
        "platform": {"system": platform.system(), "machine": platform.machine(), "python": sys.version.split()[0]},
        "model": {
            "id": model.get("name"),
            "weights_sha256": model.get("weights_sha256"),
            "preset": model.get("preset"),
            "head": model.get("head"),
        },
        "device": model.get("device"),
        "ontology_version": ontology_version,
        "input": {
            "source": volume.source,
            "format": (volume.meta or {}).get("format", "nifti" if volume.header is not None else "array"),
            "shape": list(volume.shape),
            "spacing_mm": list(volume.spacing),
            "orientation": volume.orientation,
            "modality": result.modality or volume.modality,
            "modality_decided_by": result.modality_source,
            "series_instance_uid": (volume.meta or {}).get("series_instance_uid"),
        },
        "options": dict(options or {}),
        "prompts": {
            prompt: {
                "concept_id": r.concept_id,
                "concept_name": r.concept_name,
                "how": r.how,
                "confidence": r.confidence,
                "union_of": list(r.union_of),
                "warnings": list(r.warnings),
                "volume_ml": result.volumes_ml.get(prompt),
                "mean_probability": result.scores.get(prompt),
                "present": result.present.get(prompt),
                "presence_probability": result.presence.get(prompt),
            }
            for prompt, r in result.resolutions.items()
        },
        "outputs": [file_record(f) for f in files],
        "timings_s": {k: round(float(v), 4) for k, v in result.timings.items()},
    }


def write_report(
    result: SegmentationResult,
    path: str | os.PathLike,
    files: Sequence[str | os.PathLike] = (),
    **kwargs: Any,
) -> Path:
    """Write :func:`build_report` as JSON to `path` and return it."""
    from unisegtext.io.output import write_file_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = build_report(result, files, **kwargs)
    return write_file_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
