"""Crash-safe writes that never delete a user's files.

    with atomic_file(path) as tmp: tmp.write_text(...)        one file, replaced in one rename
    with output_directory(path, overwrite=False) as tmp: ...  a directory of outputs (see its doc)
    write_json(path, data)                                    atomic, strict JSON (non-finite floats → null)
    lock = RunLock.acquire(directory)                          one process at a time in a run directory

Everything is written under a unique temporary name beside its target (pid + random suffix, so
two processes or threads never share one), flushed to disk (file, then directory), and renamed
into place: a kill at any instant leaves either the old state or the new one, never a
half-written file under the real name. Temporaries are created with the process's umask (not
``mkdtemp``'s private 0700), so outputs are as readable as any other file the user writes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

TEMP_MARK = ".tmp-"


def temp_sibling(target: Path, suffix: str = "") -> Path:
    """A fresh name beside ``target``: ``.<name>.tmp-<pid>-<random><suffix>`` (hidden, never reused)."""
    return target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk (directories: best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask (read from /proc on Linux, so that no other thread sees it change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_mode(path: Path, mask: int) -> None:
    """Give a file (0666) or directory (0777) the permissions the umask allows: some writers
    (safetensors, mkdtemp) create private files whatever the umask says."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` and give them the umask's permissions."""
    mask = current_umask()
    for current, _, files in os.walk(root):
        for name in files:
            publish_mode(Path(current) / name, mask)
            fsync_path(Path(current) / name)
        publish_mode(Path(current), mask)
        fsync_path(Path(current))


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix); on success it replaces ``path`` in one rename."""
    target = Path(path)
    tmp = temp_sibling(target, target.suffix)
    try:
        yield tmp
        publish_mode(tmp, current_umask())
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by None, so that it is valid JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def json_text(data: Any, **options: Any) -> str:
    return json.dumps(strict_json(data), allow_nan=False, **options)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented, valid JSON (NaN and infinities become null)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json_text(data, indent=2, sort_keys=True) + "\n")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_directory(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a target that is a file, or a non-empty directory without ``overwrite``."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LorakitError(f"{str(target)!r} is a file, not a directory; give a directory path to write into")
    if not overwrite and target.is_dir() and not _is_empty_dir(target):
        raise LorakitError(
            f"{str(target)!r} already exists and is not empty; give a new or empty directory, or pass "
            "overwrite=True (CLI: --overwrite) to replace lorakit's files in it (other files are kept)"
        )
    return target


def _replace_files(source: Path, target: Path) -> None:
    """Move every file under ``source`` to the same relative path under ``target`` (one rename each)."""
    for current, _, files in os.walk(source):
        rel = Path(current).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(Path(current) / name, target / rel / name)
        fsync_path(target / rel)


@contextmanager
def output_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory of outputs without ever deleting anything that was there.

    Yields a new temporary directory beside ``path`` to fill. On success:
    - ``path`` absent or an empty directory: the temporary becomes ``path`` in one rename;
    - ``path`` a non-empty directory (only with ``overwrite``; refused otherwise, before the body
      runs): each file written replaces its namesake in ``path`` in one rename, and every other
      file in ``path`` is kept.
    ``path`` naming a file is refused. On failure the temporary is removed and ``path`` is untouched.
    """
    target = check_output_directory(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    os.mkdir(tmp)  # honours the umask (mkdtemp would make it private)
    try:
        yield tmp
        fsync_tree(tmp)
        if not target.exists():
            os.rename(tmp, target)
        elif _is_empty_dir(target):
            try:
                os.replace(tmp, target)  # POSIX replaces an empty directory in one rename
            except OSError:
                os.rmdir(target)
                os.rename(tmp, target)
        else:
            check_output_directory(target, overwrite)  # still refused if it filled up meanwhile
            _replace_files(tmp, target)
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Delete a directory of lorakit's own: renamed aside first, so a kill mid-way never leaves a
    half-deleted directory under its real name."""
    if not path.exists():
        return
    doomed = temp_sibling(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(directory: Path, prefix: str = "") -> list[str]:
    """Remove the temporaries a killed process left in ``directory`` (names ``.<prefix>….tmp-<pid>-…``
    whose process is gone). Returns their names."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if not is_temp_name(entry.name) or not entry.name.startswith("." + prefix):
            continue
        pid = entry.name.rsplit(TEMP_MARK, 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another live process is writing it
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class RunLock:
    """An exclusive advisory lock on ``<directory>/.lock`` (fcntl), held while a run writes there.

    A second process asking for it gets a one-line error naming the holder's pid. The lock is
    released when the holder exits, however it exits (the kernel drops it with the descriptor).
    """

    FILE = ".lock"

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, directory: Path) -> "RunLock":
        path = directory / cls.FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, best effort
            return cls(fd, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LorakitError(
                f"run directory {str(directory)!r} is in use by another lorakit process (pid {holder}); "
                "wait for it to finish, or choose another output.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return cls(fd, path)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
