"""Example data bundled with the package (see README.md here for source and licence)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
EXAMPLES = {"ct": _HERE / "ct_abdomen_3mm.nii.gz"}


def example_path(name: str = "ct") -> Path:
    """Path of a bundled example scan ("ct": abdomen CT, 3 mm, from TotalSegmentator's tests)."""
    if name not in EXAMPLES:
        raise KeyError(f"no example {name!r}; available: {sorted(EXAMPLES)}")
    return EXAMPLES[name]
