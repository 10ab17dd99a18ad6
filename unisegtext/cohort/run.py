"""`batch()`: a cohort manifest in, one folder per case and one results table out, resumable."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unisegtext.cohort.cases import CaseOutcome, RunSettings, read_state, remove_leftovers
from unisegtext.cohort.engines import ENGINES, RayOptions, import_ray, run_local, run_ray
from unisegtext.cohort.manifest import Manifest, read_manifest
from unisegtext.cohort.table import collect_rows, write_tables
from unisegtext.errors import UniSegError

logger = logging.getLogger(__name__)

DEVICES = (None, "auto", "cpu", "cuda")
LOCK_NAME = ".batch.lock"


@dataclass
class BatchSummary:
    """What a cohort run did.

    Attributes:
        out_dir: the output folder (``<case_id>/`` folders and the tables).
        tables: results.csv (and results.parquet with pyarrow).
        rows: the table's rows (see :data:`unisegtext.cohort.table.COLUMNS`).
        done: cases segmented by this run.
        failed: cases that failed in this run (retried by the next run).
        skipped: cases finished by an earlier run with the same model, prompts and options.
        workers: where the workers ran (host, pid, device).
        seconds: wall time of the whole run.
    """

    out_dir: Path
    tables: list[Path]
    rows: list[dict[str, Any]]
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every case of the manifest is finished."""
        return all(row["status"] == "ok" for row in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "tables": [str(p) for p in self.tables],
            "cases": {"done": len(self.done), "failed": len(self.failed), "skipped": len(self.skipped)},
            "failed": self.failed,
            "workers": len(self.workers),
            "seconds": round(self.seconds, 2),
        }


def batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    engine: str = "local",
    workers: int | None = None,
    address: str | None = None,
    device: str | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    multilabel: bool = False,
    open_vocabulary: bool = False,
    progress: bool = True,
    callback: Callable[[CaseOutcome], None] | None = None,
) -> BatchSummary:
    """Segment a cohort: every row of `manifest` into ``out_dir/<case_id>/``, plus a table.

    The manifest is validated as a whole first (see :func:`~unisegtext.cohort.read_manifest`).
    Each worker loads the model once. Each case is written atomically, its completion marker
    last; a failing case is recorded and the run goes on. Running the same call again skips
    the finished cases (same model weights, prompts and options) and retries the others.
    ``out_dir/results.csv`` (and ``results.parquet`` with pyarrow) is rebuilt from the case
    folders at the end, also when the run is interrupted, so it always lists every case.

    Args:
        manifest: CSV with ``case_id``, ``input``, ``prompts`` (``;``-separated) and an
            optional ``modality``; relative inputs are read from the manifest's folder.
        out_dir: output folder; on a cluster it must be on a filesystem every node sees.
        model: checkpoint folder, Hub repo id or built-in name (default ``unisegtext-nano``).
        engine: "local" (this process) or "ray" (needs ``pip install 'unisegtext[ray]'``).
        workers: Ray actors (default: one per CPU, or per GPU with `gpus_per_worker`).
        address: Ray cluster to join ("auto" for the one started with ``ray start``).
        device: "cpu", "cuda" or None (CUDA when the worker has a GPU).
        cpus_per_worker: CPUs per Ray actor (and its torch threads).
        gpus_per_worker: GPUs per Ray actor.
        multilabel: one ``segmentation.nii.gz`` + ``labels.json`` per case instead of one
            file per prompt.
        open_vocabulary: run prompts that match no concept on their raw text.
        progress: show a progress bar (rate and time left) on stderr.
        callback: called in this process after each case with its
            :class:`~unisegtext.cohort.cases.CaseOutcome`; an exception it raises stops the
            run (finished cases stay finished, the table is still written).

    Returns:
        A :class:`BatchSummary`.

    Raises:
        ManifestError: the manifest has problems (all listed, with their lines).
        UniSegError: bad options, Ray missing, or the workers cannot load the model.
    """
    start = time.perf_counter()
    ray_options = _check_options(engine, workers, address, device, cpus_per_worker, gpus_per_worker)
    model_name, weights_sha256, config = _model_identity(model)
    cohort: Manifest = read_manifest(
        manifest, trained_concepts=config.concepts, template=config.text.template,
        open_vocabulary=open_vocabulary,
    )
    out = Path(out_dir).expanduser().resolve()
    if engine == "ray" and device is None:
        device = "cuda" if gpus_per_worker else "cpu"
    settings = RunSettings(out, model_name, weights_sha256, device, multilabel, open_vocabulary)
    with _exclusive(out):
        return _run(cohort, settings, engine, ray_options, progress=progress, callback=callback, start=start)


def _run(cohort: Manifest, settings: RunSettings, engine: str, ray_options: RayOptions, *,
         progress: bool, callback: Callable[[CaseOutcome], None] | None, start: float) -> BatchSummary:
    """Skip the finished cases, run the others on `engine`, rebuild the table."""
    out = settings.out_dir
    for leftover in remove_leftovers(out):
        logger.info("removed %s, left by an interrupted run", leftover.name)

    states = {c.case_id: read_state(out, c, settings.fingerprint(c))[0] for c in cohort.cases}
    to_run = [c for c in cohort.cases if states[c.case_id] != "done"]
    summary = BatchSummary(out, [], [], skipped=[c.case_id for c in cohort.cases if states[c.case_id] == "done"])
    logger.info("%d cases: %d finished before (skipped), %d to run (%d failed before)",
                len(cohort.cases), len(summary.skipped), len(to_run),
                sum(states[c.case_id] == "failed" for c in to_run))

    bar = _ProgressBar(len(cohort.cases), len(summary.skipped), enabled=progress)

    def on_ready(workers_info: list[dict[str, Any]]) -> None:
        summary.workers = workers_info
        bar.start()

    def on_outcome(outcome: CaseOutcome) -> None:
        (summary.done if outcome.status == "ok" else summary.failed).append(outcome.case_id)
        bar.update(len(summary.failed))
        if callback is not None:
            callback(outcome)

    try:
        if to_run:
            with bar.logging():
                if engine == "local":
                    run_local(to_run, settings, on_ready, on_outcome)
                else:
                    run_ray(to_run, settings, on_ready, on_outcome, ray_options)
    finally:
        bar.close()
        remove_leftovers(out)  # the workers have stopped: staging folders of killed attempts
        summary.rows = collect_rows(cohort.cases, out, settings.fingerprint, cohort.concepts)
        summary.tables = write_tables(summary.rows, out)
        summary.seconds = time.perf_counter() - start
    logger.info("batch: %d done, %d failed, %d skipped in %.1f s; table %s", len(summary.done),
                len(summary.failed), len(summary.skipped), summary.seconds, summary.tables[0])
    return summary


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Create `out` and hold a lock on it for the run: a second run into the same folder is
    refused (it would remove this run's staging folders and race for the same cases)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UniSegError(f"output folder {out} cannot be used ({exc.strerror or exc}); pass a "
                          "writable folder") from None
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UniSegError(f"another unisegtext batch run is writing into {out}; wait for it "
                                  "to finish (or stop it) and run again to resume") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_options(engine: str, workers: int | None, address: str | None, device: str | None,
                   cpus_per_worker: float, gpus_per_worker: float) -> RayOptions:
    """Refuse inconsistent options before any work."""
    if engine not in ENGINES:
        raise UniSegError(f"engine {engine!r} is unknown; use one of {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise UniSegError(f"device {device!r} is unknown; use cpu, cuda or leave it unset")
    if workers is not None and workers < 1:
        raise UniSegError(f"workers must be at least 1, got {workers}")
    if cpus_per_worker <= 0 or gpus_per_worker < 0:
        raise UniSegError(f"cpus per worker must be > 0 and GPUs per worker >= 0, got "
                          f"{cpus_per_worker} and {gpus_per_worker}")
    if engine == "local":
        extra = [name for name, value in (("--workers", workers not in (None, 1)), ("--address", address),
                                          ("--gpus-per-worker", gpus_per_worker)) if value]
        if extra:
            raise UniSegError(f"{', '.join(extra)} only apply to --engine ray; the local engine runs "
                              "one worker in this process")
    else:
        import_ray()  # fail now, not after validating thousands of rows
        if device == "cuda" and not gpus_per_worker:
            raise UniSegError("device cuda on Ray needs GPUs for the workers: add --gpus-per-worker 1")
    return RayOptions(workers, address, cpus_per_worker, gpus_per_worker)


def _model_identity(model: str | os.PathLike | None) -> tuple[str, str, Any]:
    """(name every worker can load, SHA-256 of the weights, config) without loading weights."""
    from unisegtext.models import DEFAULT_MODEL, UniSegTextConfig, resolve_checkpoint
    from unisegtext.models.modeling import CONFIG_NAME, WEIGHTS_NAME

    name = str(model) if model is not None else DEFAULT_MODEL
    folder = resolve_checkpoint(name)
    if Path(name).expanduser().is_dir():  # workers may run elsewhere: pass an absolute path
        name = str(Path(name).expanduser().resolve())
    config = UniSegTextConfig.from_json(folder / CONFIG_NAME)
    return name, _sha256(folder / WEIGHTS_NAME), config


def _sha256(path: Path) -> str:
    from unisegtext.errors import ModelLoadError

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc}); a checkpoint needs its weights file") from exc
    return digest.hexdigest()


class _ProgressBar:
    """tqdm over the whole cohort: finished-before cases count from the start, the rate and
    the time left are those of this run; it starts once the workers have loaded the model."""

    def __init__(self, total: int, finished_before: int, *, enabled: bool):
        self.total, self.initial, self.enabled = total, finished_before, enabled
        self.bar = None

    def start(self) -> None:
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, unit="scan", desc="batch",
                            smoothing=0.1, dynamic_ncols=True)

    def update(self, failed: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if failed:
                self.bar.set_postfix(failed=failed)

    @contextlib.contextmanager
    def logging(self) -> Iterator[None]:
        """Route log lines around the bar instead of through it."""
        if not self.enabled:
            yield
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            yield

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
