"""A run directory owned by one run at a time: an exclusive lock and its ``config.json``.

Two runs on one ``run_dir`` would overwrite each other's checkpoints; :class:`RunDir` takes an
exclusive ``fcntl.flock`` on ``<run_dir>/.lock`` for the life of a run (released automatically
when the process dies, so a killed run never leaves a stale lock) and a second run fails at once
naming the process that holds it. Only process 0 of a multi-process job takes the lock.

``config.json`` is written by :meth:`RunDir.write_config`, which the stages call only after their
inputs have validated, so a rerun that fails on bad input leaves the previous run's files as they
were.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any


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

    def __enter__(self) -> RunDir:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run_dir {self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        if self._lock:
            self._acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _acquire(self) -> None:
        import fcntl

        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(
                f"run_dir {self.path} is in use by {holder}; wait for that run to finish, or "
                "use another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(sys.argv)[:200]
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {started} ({command})".encode()
        )
        self._fd = fd

    def release(self) -> None:
        """Releases the lock (also done by the OS when the process exits)."""
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def write_config(self, config: dict[str, Any]) -> Path:
        """Writes ``config.json`` (atomically: a temp file renamed over the old one)."""
        path = self.path / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix + k)
    return out
