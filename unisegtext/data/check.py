"""`check`: compare a local dataset copy with its descriptor before preparing it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unisegtext.data.readers import DicomPngReader, get_reader, read_label_file
from unisegtext.data.registry import Descriptor

logger = logging.getLogger(__name__)


@dataclass
class CheckReport:
    """What is there, what is missing, and which label values disagree with the descriptor.

    Attributes:
        cases: case ids found on disk (after --cases/--limit).
        expected_cases: num_cases from the descriptor (None when not stated).
        missing: case -> expected files that are absent.
        unexpected_values: label value (or PNG grey value) on disk but not in the descriptor
            -> cases where it occurs.
        unseen_values: descriptor label values found in none of the checked cases.
        extra_files: case -> mask files on disk that no label names (per-structure layouts).
        unreadable: case -> error for label files that could not be read.
        unmapped_grey_values: PNG grey value matching no ``grey_values`` entry -> cases.
        split_not_found: case ids named in the descriptor's split but absent on disk.
        labels_checked: number of cases whose label values were read.
    """

    dataset: str
    root: Path
    cases: list[str] = field(default_factory=list)
    expected_cases: int | None = None
    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected_values: dict[int, list[str]] = field(default_factory=dict)
    unseen_values: list[int] = field(default_factory=list)
    extra_files: dict[str, list[str]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    unmapped_grey_values: dict[int, list[str]] = field(default_factory=dict)
    split_not_found: list[str] = field(default_factory=list)
    labels_checked: int = 0
    per_structure: bool = False

    @property
    def ok(self) -> bool:
        """True when every case is complete and readable and every label value is known."""
        missing = {} if self.per_structure else self.missing
        return (
            bool(self.cases)
            and not missing
            and not self.unexpected_values
            and not self.unreadable
            and not self.unmapped_grey_values
        )

    def lines(self) -> list[str]:
        """A human-readable report, one line per fact."""
        expected = f" (descriptor: {self.expected_cases})" if self.expected_cases is not None else ""
        out = [f"dataset {self.dataset} at {self.root}", f"cases found: {len(self.cases)}{expected}"]
        if not self.cases:
            out.append("no cases found: is ROOT the folder the descriptor's layout templates start from?")
        what = "absent structure masks (not annotated there)" if self.per_structure else "missing files"
        out.append(f"cases with {what}: {len(self.missing)}")
        for case, files in list(self.missing.items())[:10]:
            out.append(f"  {case}: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
        out.append(f"label values checked in {self.labels_checked} case(s)")
        for value, cases in sorted(self.unexpected_values.items()):
            out.append(f"  value {value} on disk but not in the descriptor's labels: {', '.join(cases[:5])}{' ...' if len(cases) > 5 else ''}")
        for grey, cases in sorted(self.unmapped_grey_values.items()):
            out.append(f"  PNG grey value {grey} maps to no label (layout.grey_values): {', '.join(cases[:5])}")
        if self.unseen_values:
            out.append(f"  descriptor label values not seen in the checked cases: {self.unseen_values}")
        for case, files in list(self.extra_files.items())[:10]:
            out.append(f"  {case}: mask files no label names: {', '.join(Path(f).name for f in files[:5])}")
        for case, error in self.unreadable.items():
            out.append(f"  {case}: unreadable: {error}")
        if self.split_not_found:
            out.append(f"split case ids not on disk: {len(self.split_not_found)} ({', '.join(self.split_not_found[:5])})")
        out.append("OK" if self.ok else "PROBLEMS FOUND")
        return out


def check_dataset(
    descriptor: Descriptor,
    root: str | Path,
    *,
    cases: Sequence[str] | None = None,
    limit: int | None = None,
    read_labels: bool = True,
) -> CheckReport:
    """Check a local copy against its descriptor (files present, label values known).

    Args:
        read_labels: read label files (multilabel layouts, PNG masks) to compare their values
            with the descriptor; per-structure layouts are checked by file names only.
    """
    root = Path(root)
    reader = get_reader(descriptor)
    samples = reader.samples(root, cases=list(cases) if cases else None, limit=limit)
    report = CheckReport(
        dataset=descriptor.id,
        root=root,
        cases=[s.case for s in samples],
        expected_cases=descriptor.num_cases,
        per_structure=reader._per_structure,
    )
    known_values = set(descriptor.label_values().values())
    seen: set[int] = set()
    for sample in samples:
        if sample.missing:
            report.missing[sample.case] = sample.missing
        extra = reader.extra_files(root, sample)
        if extra:
            report.extra_files[sample.case] = extra
        if not read_labels or reader._per_structure or sample.missing:
            continue
        try:
            values, unmapped = _label_values(reader, sample)
        except Exception as exc:
            report.unreadable[sample.case] = f"{type(exc).__name__}: {exc}"
            continue
        report.labels_checked += 1
        seen |= values
        for value in sorted(values - known_values - {0}):
            report.unexpected_values.setdefault(value, []).append(sample.case)
        for grey in sorted(unmapped):
            report.unmapped_grey_values.setdefault(grey, []).append(sample.case)
    if report.labels_checked:
        report.unseen_values = sorted(v for v in known_values - seen if v != 0)
    on_disk = set(report.cases)
    if not cases and limit is None:
        report.split_not_found = sorted(c for ids in descriptor.split.values() for c in ids if c not in on_disk)
    return report


def _label_values(reader, sample) -> tuple[set[int], set[int]]:
    """(label values found, PNG grey values that map to no label)."""
    if isinstance(reader, DicomPngReader):
        from PIL import Image

        grey_values: set[int] = set()
        for path in sample.label_paths:
            with Image.open(path) as png:
                grey_values |= {int(v) for v in np.unique(np.asarray(png.convert("L") if png.mode not in ("L", "I", "I;16") else png))}
        mapping = reader.layout.get("grey_values") or {}
        if not mapping:
            return grey_values, set()
        tolerance = int(reader.layout.get("grey_tolerance") or 0)
        values, unmapped = set(), set()
        for grey in grey_values - {0}:
            hits = {v for g, v in mapping.items() if abs(grey - g) <= tolerance}
            values |= hits
            if not hits:
                unmapped.add(grey)
        return values, unmapped
    label, _ = read_label_file(sample.label_paths[0])
    return {int(v) for v in np.unique(label)}, set()
