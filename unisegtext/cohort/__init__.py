"""Cohort runs: one manifest in, one folder per case and one results table out, resumable.

    >>> from unisegtext import batch
    >>> summary = batch("cohort.csv", "out/", engine="ray", workers=8)

The engine-independent parts (manifest, case folders and markers, the table) live here; the
engines (`local`: this process; `ray`: Ray actors, one model load each) are thin layers over
:class:`~unisegtext.cohort.cases.CaseRunner`. (The package is not called ``batch`` so that
``unisegtext.batch`` stays the function.)
"""

from unisegtext.cohort.cases import DONE_MARKER, FAILED_MARKER, CaseOutcome, CaseRunner, RunSettings
from unisegtext.cohort.engines import ENGINES, RayOptions
from unisegtext.cohort.manifest import Case, Manifest, read_manifest
from unisegtext.cohort.run import BatchSummary, batch
from unisegtext.cohort.table import COLUMNS, read_table

__all__ = [
    "COLUMNS",
    "DONE_MARKER",
    "ENGINES",
    "FAILED_MARKER",
    "BatchSummary",
    "Case",
    "CaseOutcome",
    "CaseRunner",
    "Manifest",
    "RayOptions",
    "RunSettings",
    "batch",
    "read_manifest",
    "read_table",
]
