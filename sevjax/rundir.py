"""A run directory owned by one run at a time: an exclusive lock and its ``config.json``.

Two runs on one ``run_dir`` would overwrite each other's checkpoints; :class:`RunDir` takes an
exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for the life of a run (released automatically
when the process dies, so a killed run never leaves a stale lock) and a second run fails at once
with :class:`RunDirBusy`, naming the process that holds it. Only process 0 of a multi-process job
takes the lock. A run that created its directory and fails before writing anything in it
removes the directory again, so a mistyped first command leaves nothing behind.

``config.json`` is written by :func:`write_config`, which :func:`sevjax.loop.fit` calls once the
inputs have loaded and the checkpoints in ``run_dir`` are known to fit the configuration, so a
rerun that fails on bad input, a foreign checkpoint or a busy directory leaves the previous run's
files as they were.

Typical use::

    with RunDir(cfg.run_dir) as run_dir:   # RunDirBusy if another process holds it
        ...
        write_config(run_dir.path, to_dict(cfg))
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


class RunDir:
    """``with RunDir(path) as run_dir: ...``: the directory (created), locked for this process.

    Args:
        path: the run directory.
        lock: take the lock (False for processes other than 0 of a multi-process job).
    """

    def __init__(self, path: str | Path, *, lock: bool = True):
        self.path = Path(path)
        self._lock = lock
        self._fd: int | None = None
        self._created: list[Path] = []  # directories this run made, deepest first

    def __enter__(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run_dir {self.path} exists and is not a directory")
        self._created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock:
            try:
                self._acquire()
            except BaseException:
                self._remove_if_unused()
                raise
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self._remove_if_unused()
        self.release()

    def _acquire(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(
                f"run_dir {self.path} is in use by {holder}; wait for that run to finish, or "
                "use another run_dir (--set run_dir=...)"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(sys.argv)[:200]
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command})".encode()
        )
        self._fd = fd

    def _remove_if_unused(self) -> None:
        """Removes the directories this run created when nothing but the lock file is in them."""
        if not self._created or not self.path.is_dir():
            return
        if any(p.name != LOCK_NAME for p in self.path.iterdir()):
            return
        if self._fd is not None:  # still locked: nobody else can be using the lock file
            (self.path / LOCK_NAME).unlink(missing_ok=True)
        for path in self._created:
            try:
                path.rmdir()
            except OSError:  # a lock file we do not hold, or something just appeared: keep it
                break

    def release(self) -> None:
        """Releases the lock (also done by the OS when the process exits)."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def write_config(run_dir: str | Path, config: dict[str, Any]) -> Path:
    """Writes ``<run_dir>/config.json`` atomically (a temp file renamed over the old one)."""
    path = Path(run_dir) / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def changed_keys(
    old: dict[str, Any], new: dict[str, Any], prefix: str = "", *, ignore: tuple[str, ...] = ()
) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (``ignore``: skipped)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = prefix + k
        if key in ignore:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{key}.", ignore=ignore)
        elif a != b:
            out.append(key)
    return out
