"""One case on disk: segment it, publish ``out/<case_id>/`` atomically, read its state back.

A case is written into a hidden staging folder inside ``out/`` and moved to
``out/<case_id>/`` with one rename, so a killed run never leaves a half-written case. The
completion marker ``.done.json`` is the last file written into the staging folder; it records
the model's weights hash, the prompts, the input and the output options (the case's
*fingerprint*) and the per-prompt results. A failing case gets a ``.failed.json`` instead.
A later run counts a case as finished only when its ``.done.json`` carries the same
fingerprint, so another model (or other prompts) redoes it.

:class:`CaseRunner` is the worker: it loads the model once and runs cases one after another.
The local engine uses one in-process; the Ray engine makes each of its actors one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unisegtext.cohort.manifest import Case
from unisegtext.errors import ModelLoadError
from unisegtext.jsonsafe import json_safe

logger = logging.getLogger(__name__)

DONE_MARKER = ".done.json"
FAILED_MARKER = ".failed.json"
STAGING_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


@dataclass(frozen=True)
class RunSettings:
    """What every worker needs to run cases the same way (picklable, sent to Ray actors).

    Attributes:
        out_dir: the cohort's output folder (shared by all workers).
        model: checkpoint folder, Hub repo id or built-in name.
        weights_sha256: SHA-256 of the checkpoint's weights, computed once by the driver;
            a worker that loads other weights refuses to start.
        device: "cpu", "cuda" or None (CUDA when the worker sees a GPU).
        multilabel: one multilabel NIfTI per case instead of one file per prompt.
        open_vocabulary: run prompts that match no concept on their raw text.
    """

    out_dir: Path
    model: str
    weights_sha256: str
    device: str | None = None
    multilabel: bool = False
    open_vocabulary: bool = False

    def fingerprint(self, case: Case) -> dict[str, Any]:
        """What a finished case must match to be skipped on a rerun."""
        return {
            "weights_sha256": self.weights_sha256,
            "input": case.input,
            "prompts": list(case.prompts),
            "modality": case.modality,
            "multilabel": self.multilabel,
            "open_vocabulary": self.open_vocabulary,
        }


@dataclass
class CaseOutcome:
    """What a worker reports back to the driver for one case (the files hold the rest)."""

    case_id: str
    status: str  # "ok" or "failed"
    runtime_s: float
    error: str | None = None
    worker: dict[str, Any] = field(default_factory=dict)


def worker_info() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


class CaseRunner:
    """Loads the model once, then segments cases one by one into ``out/<case_id>/``.

    Args:
        settings: the run's :class:`RunSettings`.

    Raises:
        ModelLoadError: the checkpoint cannot be loaded here, or its weights differ from the
            ones the driver hashed (a cluster node with another copy of the model).
    """

    def __init__(self, settings: RunSettings):
        from unisegtext.inference.segment import pick_device
        from unisegtext.models import UniSegText

        self.settings = settings
        self.device = pick_device(settings.device)
        self.model = UniSegText.from_pretrained(settings.model, device=self.device)
        if self.model.weights_sha256 != settings.weights_sha256:
            raise ModelLoadError(
                f"worker {worker_info()} loaded {settings.model!r} with weights SHA-256 "
                f"{self.model.weights_sha256[:12]}..., but the run was started with "
                f"{settings.weights_sha256[:12]}...; give every node the same checkpoint"
            )
        logger.info("worker %s: model %s loaded on %s", worker_info(), settings.model, self.device)

    def ready(self) -> dict[str, Any]:
        """Where this worker runs (returns once the model is loaded)."""
        return worker_info() | {"device": str(self.device)}

    def run(self, case: Case) -> CaseOutcome:
        """Segment one case and publish its folder; a failure is recorded, never raised."""
        from unisegtext.inference import segment

        start = time.perf_counter()
        try:
            with quiet_prompt_warnings():  # the driver already reported them once per prompt
                result = segment(
                    str(case.path), list(case.prompts), self.model,
                    device=self.device, modality=case.modality, progress=False,
                    open_vocabulary=self.settings.open_vocabulary,
                )
            write_done(self.settings, case, result, start)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (some of our errors are both) stops the run
            raise
        except Exception as exc:  # a failing case is recorded and the run goes on
            runtime = time.perf_counter() - start
            error = one_line(exc)
            logger.warning("case %s failed: %s", case.case_id, error)
            logger.debug("case %s:\n%s", case.case_id, traceback.format_exc())
            write_failed(self.settings, case, error, runtime)
            return CaseOutcome(case.case_id, "failed", runtime, error, worker_info())
        return CaseOutcome(case.case_id, "ok", time.perf_counter() - start, None, worker_info())


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextlib.contextmanager
def quiet_prompt_warnings() -> Iterator[None]:
    """Drop the prompt-resolution warnings that `segment` logs for every case."""
    prompts_logger = logging.getLogger("unisegtext.inference.prompts")

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    prompts_logger.addFilter(drop)
    try:
        yield
    finally:
        prompts_logger.removeFilter(drop)


# ---------------------------------------------------------------------- writing a case folder
def write_done(settings: RunSettings, case: Case, result, started: float) -> Path:
    """Write masks, prompts.json and (last) the completion marker, then publish the folder.

    Args:
        started: ``time.perf_counter()`` when the case began (the marker records the runtime).
    """
    import numpy as np

    presence = getattr(result, "presence", None) or {}
    present = getattr(result, "present", None) or {}
    volumes = result.volumes_ml
    prompts = [
        {
            "prompt": prompt,
            "concept": result.resolutions[prompt].concept_id,
            "volume_ml": volumes[prompt],
            "voxels": int(np.count_nonzero(mask)),
            "presence": presence.get(prompt),
            "present": present.get(prompt),
            "score": result.scores.get(prompt),
        }
        for prompt, mask in result.masks.items()
    ]
    with staging_folder(settings.out_dir, case.case_id) as staging:
        files = result.save(staging, multilabel=settings.multilabel)
        marker = _marker(settings, case, "ok", time.perf_counter() - started) | {
            "files": sorted(f.name for f in files),
            "results": prompts,
            "model": result.model,
        }
        _write_json(staging / DONE_MARKER, marker)  # last: the case counts as finished
        return publish(staging, settings.out_dir / case.case_id)


def write_failed(settings: RunSettings, case: Case, error: str, runtime_s: float,
                 worker: dict[str, Any] | None = None) -> Path | None:
    """Replace the case folder by one that only records the failure (retried on a rerun)."""
    try:
        with staging_folder(settings.out_dir, case.case_id) as staging:
            _write_json(staging / FAILED_MARKER, _marker(settings, case, "failed", runtime_s, worker) | {"error": error})
            return publish(staging, settings.out_dir / case.case_id)
    except OSError as exc:
        logger.error("case %s: could not record its failure in %s (%s)", case.case_id, settings.out_dir, exc)
        return None


def _marker(settings: RunSettings, case: Case, status: str, runtime_s: float,
            worker: dict[str, Any] | None = None) -> dict[str, Any]:
    from unisegtext import __version__

    return {
        "case_id": case.case_id,
        "status": status,
        "fingerprint": settings.fingerprint(case),
        "runtime_s": round(runtime_s, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "worker": worker or worker_info(),
        "unisegtext": __version__,
    }


@contextlib.contextmanager
def staging_folder(out_dir: Path, case_id: str) -> Iterator[Path]:
    """A hidden folder inside `out_dir`, removed unless it was published."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{case_id}-{os.getpid()}-", dir=out_dir))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, target: Path) -> Path:
    """Move `staging` to `target` with a rename, replacing an older attempt.

    A folder cannot be renamed onto a non-empty one, so the old folder is first renamed
    aside (hidden) and removed afterwards; a reader sees the old folder, no folder, or the
    new one, never a mix.
    """
    aside = None
    if target.exists() or target.is_symlink():
        aside = target.with_name(f"{OLD_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}")
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        _remove(aside)
    return target


def remove_leftovers(out_dir: Path) -> list[Path]:
    """Remove staging folders that a killed run left in `out_dir` (call before a run starts;
    one run per output folder at a time)."""
    removed = []
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if path.name.startswith((STAGING_PREFIX, OLD_PREFIX)):
                _remove(path)
                removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(json_safe(data), indent=2) + "\n")


# ---------------------------------------------------------------------- reading a case folder
def read_state(out_dir: Path, case: Case, fingerprint: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """("done" | "failed" | "pending", its marker) for `case` under this run's fingerprint.

    A marker from another model, other prompts or other options counts as "pending".
    """
    folder = out_dir / case.case_id
    for name, state in ((DONE_MARKER, "done"), (FAILED_MARKER, "failed")):
        marker = _read_json(folder / name)
        if marker is not None and marker.get("fingerprint") == json_safe(fingerprint):
            return state, marker
    return "pending", None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
