"""TotalSegmentator's tasks as data: parts, weight releases, class maps (``tasks.json``).

The facts in ``tasks.json`` come from TotalSegmentator 2.18.0 (its ``map_tasks_config.py`` and
``map_to_binary.py``); this module only reads them. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from unisegtext.errors import BackendError, did_you_mean

TASKS_FILE = Path(__file__).with_name("tasks.json")


@dataclass(frozen=True)
class PartSpec:
    """One released nnU-Net model of a task (a `total` part, or the single fast model)."""

    task_id: int
    folder: str  # DatasetNNN_name: the zip's name and the results folder's parent
    version: str  # release tag, e.g. "v2.0.0-weights"
    trainer: str
    plans: str
    configuration: str
    fold: int
    classes: tuple[str, ...]  # class names in the part's label order (label 1, 2, ...)
    url: str


@dataclass(frozen=True)
class TaskSpec:
    name: str
    modality: str
    resample_mm: tuple[float, float, float]  # [x, y, z] after reorientation to RAS
    tile_step_size: float
    triple_split: bool  # several parts: big volumes run in three z-chunks
    parts: tuple[PartSpec, ...]
    class_map: dict[int, str]  # global label id -> class name (the task's multilabel output)
    licence: str
    source: str

    @property
    def versions(self) -> list[str]:
        return list(dict.fromkeys(p.version for p in self.parts))

    def part_of(self, class_name: str) -> PartSpec:
        for part in self.parts:
            if class_name in part.classes:
                return part
        raise BackendError(f"task {self.name!r} has no class {class_name!r}")


@lru_cache(maxsize=1)
def _data() -> dict[str, Any]:
    return json.loads(TASKS_FILE.read_text())


def task_names() -> list[str]:
    return list(_data()["tasks"])


@cache
def get_task(name: str) -> TaskSpec:
    data = _data()
    if name not in data["tasks"]:
        names = task_names()
        raise BackendError(f"unknown TotalSegmentator task {name!r}; known: {', '.join(names)}.{did_you_mean(name, names)}")
    raw = data["tasks"][name]
    parts = tuple(
        PartSpec(task_id=int(p["task_id"]), folder=p["folder"], version=p["version"], trainer=p["trainer"],
                 plans=p["plans"], configuration=p["configuration"], fold=int(p["fold"]), classes=tuple(p["classes"]),
                 url=data["release_url"].format(version=p["version"], folder=p["folder"]))
        for p in raw["parts"]
    )
    return TaskSpec(
        name=name,
        modality=raw["modality"],
        resample_mm=tuple(float(v) for v in raw["resample_mm"]),  # type: ignore[arg-type]
        tile_step_size=float(raw["tile_step_size"]),
        triple_split=bool(raw["triple_split"]),
        parts=parts,
        class_map={int(k): v for k, v in data["class_maps"][raw["class_map"]].items()},
        licence=data["licence"],
        source=data["source"],
    )
