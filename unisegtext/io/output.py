"""An output folder holds one complete result set, or says that it does not.

* :func:`check_output_dir` runs before any computation: the folder (or the place it will be
  made) must be a writable folder, not a file, not under a file, not read-only.
* :class:`OutputFolder` holds an exclusive lock (``.unisegtext.lock``, ``fcntl.flock``) for the
  whole run: a second writer into the same folder is refused at once instead of mixing two
  scans' masks. The lock is released by the kernel even when the process is killed.
* Files are written into a hidden staging folder *inside* the output folder, so that the final
  moves are renames within one file system (an output folder that is a Docker volume or any
  other mount point works), then published: the previous ``manifest.json`` is removed first,
  the files are moved in with SIGINT/SIGTERM held back, the files the previous manifest listed
  and this run did not write are deleted, and the new ``manifest.json`` (the exact list of this
  run's files with sizes and SHA-256) is written last. A folder with a manifest is complete; a
  folder without one was interrupted. Files that no manifest lists (the user's own) are never
  touched.
* SIGTERM is turned into an exception while a folder is open, so the staging area is removed
  on the way out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from unisegtext.errors import UniSegError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".unisegtext.lock"
STAGING_PREFIX = ".unisegtext-staging-"
MANIFEST_FORMAT = "unisegtext-result-set"

_HELD: dict[Path, int] = {}  # folders this process holds the lock of -> nesting depth
_HELD_GUARD = threading.Lock()


class OutputError(UniSegError, OSError):
    """The output folder cannot be used (a file, read-only, locked by another run...)."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """Make sure `path` is, or can become, a writable folder; create it.

    Raises:
        OutputError: it is a file, a parent is a file, or it cannot be created or written.
    """
    folder = Path(path).expanduser()
    if str(path).strip() == "":
        raise OutputError("the output folder is empty; pass a folder, e.g. -o out/")
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == folder else f"lies under {parent}, which is a file"
            raise OutputError(f"output folder {folder} {where}; pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"output folder {folder} cannot be created ({exc.strerror or exc}); choose a writable place") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".unisegtext-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {folder} is not writable ({exc.strerror or exc}); choose a writable place") from None
    return folder


class OutputFolder:
    """Exclusive, crash-safe writing of one result set into a folder (see the module docstring).

    Example:
        >>> with OutputFolder("out") as out:
        ...     result = segment(...)                    # nothing written yet
        ...     out.publish(result.write_files(out.staging), info={"scan": "ct.nii.gz"})
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.staging: Path | None = None
        self._fd: int | None = None
        self._key: Path | None = None
        self._signals: _SigtermAsException | None = None

    # ------------------------------------------------------------------ lock
    def __enter__(self) -> OutputFolder:
        folder = check_output_dir(self.path)
        self._key = folder.resolve()
        with _HELD_GUARD:
            nested = self._key in _HELD
            if nested:
                _HELD[self._key] += 1
        if not nested:
            self._lock(folder)
        self._signals = _SigtermAsException()
        self._signals.__enter__()
        self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder))
        return self

    def _lock(self, folder: Path) -> None:
        import fcntl

        while True:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise OutputError(
                        f"another unisegtext run is writing into {folder}; wait for it to finish or choose "
                        "another output folder (one folder holds one result set)"
                    ) from None
                raise OutputError(f"could not lock output folder {folder} ({exc})") from None
            try:  # the holder before us may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(folder / LOCK_NAME).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        with _HELD_GUARD:
            _HELD[self._key] = 1  # type: ignore[index]

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
        finally:
            if self._signals is not None:
                self._signals.__exit__(*exc_info)
                self._signals = None
            with _HELD_GUARD:
                depth = _HELD.get(self._key, 0) - 1  # type: ignore[arg-type]
                if depth > 0:
                    _HELD[self._key] = depth  # type: ignore[index]
                else:
                    _HELD.pop(self._key, None)  # type: ignore[arg-type]
            if self._fd is not None and depth <= 0:
                with contextlib.suppress(OSError):  # remove, then release: a waiter re-checks the inode
                    os.unlink(Path(self._key) / LOCK_NAME)  # type: ignore[arg-type]
                os.close(self._fd)  # releases the flock
                self._fd = None

    # ------------------------------------------------------------------ publishing
    def publish(self, files: list[Path], info: dict[str, Any] | None = None) -> list[Path]:
        """Move staged `files` into the folder and write the manifest last.

        Args:
            files: paths inside :attr:`staging` (flat: one level).
            info: extra facts for the manifest (scan, model, prompts ...).

        Returns:
            The published paths (the manifest last).
        """
        if self.staging is None:
            raise OutputError("publish() needs an open OutputFolder (use it as a context manager)")
        names = []
        for file in files:
            file = Path(file)
            if file.parent != self.staging or not file.is_file():
                raise OutputError(f"{file} is not a staged file of {self.path}")
            if file.name in (MANIFEST_NAME, LOCK_NAME) or file.name.startswith(STAGING_PREFIX):
                raise OutputError(f"{file.name} is a reserved name in an output folder")
            names.append(file.name)
        entries = [{"name": f.name, "bytes": f.stat().st_size, "sha256": _sha256(f)} for f in map(Path, files)]
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": entries,
            **(info or {}),
        }
        manifest_tmp = self.staging / f".{MANIFEST_NAME}.tmp"
        manifest_tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        folder = self._key or self.path
        previous = previous_files(folder)
        with _signals_held():
            (folder / MANIFEST_NAME).unlink(missing_ok=True)  # from here the folder says "incomplete"
            published = []
            for name in names:
                os.replace(self.staging / name, folder / name)
                published.append(folder / name)
            for stale in sorted(set(previous) - set(names)):
                target = folder / stale
                if target.is_file() and target.parent == folder:
                    target.unlink()
                    logger.info("removed %s, written by the previous run in this folder", target)
            os.replace(manifest_tmp, folder / MANIFEST_NAME)
            _fsync_dir(folder)
        return [self.path / p.name for p in published] + [self.path / MANIFEST_NAME]


def previous_files(folder: Path) -> list[str]:
    """The file names the manifest of the last run in `folder` lists (empty when none)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        return []
    names = []
    for entry in data.get("files", []):
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name and "/" not in name and "\\" not in name and name not in (".", ".."):
            names.append(name)
    return names


def write_file_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file under a temporary name in its folder, then rename it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back while the result set is being swapped in; a signal that
    arrives meanwhile is delivered right after, when the set is complete.

    Blocking the signals in this thread is not enough: the kernel hands a process-directed
    signal to any thread that does not block it (torch's worker threads), and Python then runs
    its handler in the main thread anyway. So in the main thread the Python-level handlers are
    replaced by one that only records the signal, which is raised again afterwards.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    pending: list[int] = []
    replaced: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in held:
            previous = signal.getsignal(signum)
            if previous is not None:  # None: installed outside Python, cannot be restored
                replaced[signum] = signal.signal(signum, lambda signum, frame: pending.append(signum))
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, set(held))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no POSIX signals
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for signum, previous in replaced.items():
            signal.signal(signum, previous)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)  # now, to the handler that was in place


class RunTerminated(UniSegError, KeyboardInterrupt):
    """SIGTERM arrived while an output folder was open."""


class _SigtermAsException:
    """While active (main thread only), SIGTERM raises :class:`RunTerminated`, so `finally`
    blocks (staging clean-up) run instead of the process dying mid-write."""

    def __init__(self) -> None:
        self._old: Any = None
        self._active = False

    def __enter__(self) -> _SigtermAsException:
        if threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGTERM, self._raise)
                self._active = True
            except (ValueError, OSError):  # pragma: no cover
                pass
        return self

    @staticmethod
    def _raise(signum, frame) -> None:
        raise RunTerminated("terminated (SIGTERM); output folders hold a result set only when complete (with its manifest.json)")

    def __exit__(self, *exc_info: Any) -> None:
        if self._active:
            signal.signal(signal.SIGTERM, self._old if self._old is not None else signal.SIG_DFL)
            self._active = False
