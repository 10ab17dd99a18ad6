"""The results table: one row per case and prompt, rebuilt from the case folders.

The table is assembled from what is on disk (the markers), not from what this run did, so it
lists every case of the manifest whether it ran now, was finished before, failed, or is still
pending after an interrupted run. It is written atomically as ``results.csv`` and, when
pyarrow is installed, ``results.parquet``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unisegtext.cohort.cases import read_state
from unisegtext.cohort.manifest import Case

COLUMNS = (
    "case_id",     # the manifest's id; the masks are in out/<case_id>/
    "input",       # the input as written in the manifest
    "prompt",      # the prompt as written
    "concept",     # the knowledge-tree concept it resolved to
    "volume_ml",   # mask volume in millilitres
    "voxels",      # mask voxel count on the input grid
    "presence",    # the probability that the structure is in the scan at all
    "present",     # the model's decision (an absent structure has an empty mask)
    "score",       # mean probability inside the mask (0 when empty)
    "runtime_s",   # seconds for the whole case (read, segment, write)
    "status",      # ok | failed | pending (not run yet: an interrupted run)
    "error",       # why the case failed
)
TABLE_NAME = "results.csv"
PARQUET_NAME = "results.parquet"


def collect_rows(cases: list[Case], out_dir: Path, fingerprint: Callable[[Case], dict[str, Any]],
                 concepts: dict[str, str | None]) -> list[dict[str, Any]]:
    """The table's rows, in manifest order then prompt order.

    Args:
        fingerprint: the run's fingerprint of a case (markers that do not match are pending).
        concepts: prompt -> concept id, from validating the manifest (used for rows of cases
            that did not finish).
    """
    rows: list[dict[str, Any]] = []
    for case in cases:
        state, marker = read_state(out_dir, case, fingerprint(case))
        results = {r["prompt"]: r for r in (marker or {}).get("results", [])}
        for prompt in case.prompts:
            done = results.get(prompt, {})
            rows.append({
                "case_id": case.case_id,
                "input": case.input,
                "prompt": prompt,
                "concept": done.get("concept", concepts.get(prompt)),
                "volume_ml": done.get("volume_ml"),
                "voxels": done.get("voxels"),
                "presence": done.get("presence"),
                "present": done.get("present"),
                "score": done.get("score"),
                "runtime_s": marker.get("runtime_s") if marker else None,
                "status": {"done": "ok"}.get(state, state),
                "error": marker.get("error") if marker else None,
            })
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write results.csv (and results.parquet with pyarrow) atomically; return the paths."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    written = [_atomic_write(out_dir / TABLE_NAME, lambda path: path.write_text(buffer.getvalue()))]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    schema = pa.schema([
        ("case_id", pa.string()), ("input", pa.string()), ("prompt", pa.string()),
        ("concept", pa.string()), ("volume_ml", pa.float64()), ("voxels", pa.int64()),
        ("presence", pa.float64()), ("present", pa.bool_()), ("score", pa.float64()), ("runtime_s", pa.float64()),
        ("status", pa.string()), ("error", pa.string()),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    written.append(_atomic_write(out_dir / PARQUET_NAME, lambda path: pq.write_table(table, path)))
    return written


def read_table(path: str | os.PathLike) -> list[dict[str, str]]:
    """results.csv as a list of dicts (strings, empty where there is no value)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _atomic_write(target: Path, write: Callable[[Path], Any]) -> Path:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
