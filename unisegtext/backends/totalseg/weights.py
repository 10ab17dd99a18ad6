"""Where converted TotalSegmentator parts live, and how they get there (once).

Order of look-up for one part (``DatasetNNN_name``) of a task:

1. `weights` given and it holds converted parts (``<weights>/<DatasetNNN_name>/config.json``, or
   `weights` is itself such a part folder): used in place, read-only.
2. `weights` given as a source (a release zip, an nnU-Net results folder, or a folder with
   several, e.g. TotalSegmentator's ``~/.totalsegmentator/nnunet/results``): the parts needed are
   converted once into the cache (``<cache>/<task>/from-<hash of the path>/``).
3. No `weights`: the cache ``<cache>/<task>/<DatasetNNN_name>/``; a release zip dropped into
   ``<cache>/<task>/downloads/`` is converted on first use; otherwise, when downloads are allowed,
   the zip is fetched from TotalSegmentator's GitHub release, converted, and deleted.

The cache root is ``$UNISEGTEXT_CACHE/totalsegmentator`` or ``~/.cache/unisegtext/totalsegmentator``
(``$XDG_CACHE_HOME`` honoured). Downloads are off when ``UNISEGTEXT_OFFLINE`` or ``HF_HUB_OFFLINE``
is set to 1/true.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from unisegtext.backends.totalseg.convert import CONFIG_NAME, WEIGHTS_NAME, convert
from unisegtext.backends.totalseg.tasks import PartSpec, TaskSpec
from unisegtext.errors import ModelLoadError

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("UNISEGTEXT_CACHE"):
        return Path(os.environ["UNISEGTEXT_CACHE"]).expanduser() / "totalsegmentator"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "unisegtext" / "totalsegmentator"


def downloads_allowed(allow_download: bool | None = None) -> bool:
    if allow_download is not None:
        return bool(allow_download)
    return not any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("UNISEGTEXT_OFFLINE", "HF_HUB_OFFLINE"))


def is_part_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def provenance(task: TaskSpec, part: PartSpec) -> dict:
    return {"task": task.name, "task_id": part.task_id, "source_url": part.url, "version": part.version,
            "licence": task.licence, "converted_by": "unisegtext"}


def locate_parts(
    task: TaskSpec,
    parts: Sequence[PartSpec],
    *,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_download: bool | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Converted part folders for `parts` (DatasetNNN_name -> folder), converting or
    downloading what is missing (see the module docstring).

    Raises:
        ModelLoadError: a part is nowhere to be found and may not be downloaded; the message
            names the release URL to fetch and where to put the zip.
    """
    found: dict[str, Path] = {}
    root = cache_root(cache_dir) / task.name
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise ModelLoadError(f"weights {path} do not exist; pass a folder or a TotalSegmentator release zip")
        if path.is_dir() and is_part_folder(path) and len(parts) == 1:
            return {parts[0].folder: path}
        missing = [p for p in parts if not (path.is_dir() and is_part_folder(path / p.folder))]
        found.update({p.folder: path / p.folder for p in parts if p not in missing})
        if missing:
            target = root / f"from-{_path_key(path)}"
            _refresh_marker(target, path)
            todo = [p for p in missing if not is_part_folder(target / p.folder)]
            if todo:
                _convert_parts(path, target, task, todo)
            for part in missing:
                if not is_part_folder(target / part.folder):
                    raise ModelLoadError(
                        f"{path} holds no results folder for {part.folder} (task {task.name!r}, needed for the "
                        f"prompted classes); download {part.url} and pass it, or a folder with it"
                    )
                found[part.folder] = target / part.folder
        return found
    for part in parts:
        folder = root / part.folder
        if not is_part_folder(folder):
            zipped = root / "downloads" / f"{part.folder}.zip"
            if not zipped.is_file():
                if not downloads_allowed(allow_download):
                    raise ModelLoadError(
                        f"TotalSegmentator weights {part.folder} (task {task.name!r}) are not in the cache "
                        f"{root} and downloads are off (UNISEGTEXT_OFFLINE / HF_HUB_OFFLINE, or "
                        f"allow_download=False). Download {part.url} and put it at {zipped} (converted on first "
                        "use), or pass weights='<that zip or a folder holding it>'"
                    )
                _download(part.url, zipped, progress=progress)
                _convert_parts(zipped, root, task, [part])
                if is_part_folder(folder):
                    zipped.unlink()  # the converted part is all inference reads
            else:
                _convert_parts(zipped, root, task, [part])
            if not is_part_folder(folder):
                raise ModelLoadError(f"{zipped} holds no results folder of {part.folder}; is it the right zip? "
                                     f"It should come from {part.url}")
        found[part.folder] = folder
    return found


def parts_to_fetch(task: TaskSpec, parts: Sequence[PartSpec], *, weights: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> list[PartSpec]:
    """The parts that `locate_parts` would have to download (nothing converted, no local zip).

    With `weights` given nothing is downloaded: an empty list (what the source lacks is an error
    at load time)."""
    if weights is not None:
        return []
    root = cache_root(cache_dir) / task.name
    return [p for p in parts if not is_part_folder(root / p.folder) and not (root / "downloads" / f"{p.folder}.zip").is_file()]


def _convert_parts(source: Path, target: Path, task: TaskSpec, parts: Sequence[PartSpec]) -> None:
    for part in parts:
        try:
            convert(source, target, fold=part.fold, provenance=provenance(task, part), only={part.folder})
        except ModelLoadError as exc:
            if "no nnU-Net results folder" in str(exc):
                continue  # the caller names what is missing
            raise


def _path_key(path: Path) -> str:
    return hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]


def _refresh_marker(target: Path, source: Path) -> None:
    """Converted copies are dropped when their source changed (size or modification time)."""
    target.mkdir(parents=True, exist_ok=True)  # first: the cache may live inside the source folder
    stat = source.stat()
    marker = {"source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker_file = target / "source.json"
    if marker_file.is_file():
        try:
            if json.loads(marker_file.read_text()) == marker:
                return
        except ValueError:
            pass
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
    marker_file.write_text(json.dumps(marker) + "\n")


def _download(url: str, target: Path, *, progress: bool = False) -> None:
    """Stream `url` to `target` through a temporary name (no partial file is left as `target`)."""
    import urllib.error
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    logger.info("downloading %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=target.name)
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
            if bar is not None:
                bar.close()
        if total and partial.stat().st_size != total:
            raise OSError(f"got {partial.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise ModelLoadError(
            f"could not download {url} ({exc}); download it by hand and put it at {target}, or pass weights=..."
        ) from exc
    partial.rename(target)
