"""One writer per run folder, and the clean-up of an interrupted writer's temporaries.

A lock file holding pid, host and start time, held with ``fcntl.flock``: the kernel drops it when
its process dies, so a crashed run's lock is taken over (with a note), while a live holder stops a
second `mixc train` that would interleave its epochs with the first's. Application floor: only the
writer (``mixc.run_writer``) takes it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mixc.core.errors import TrainError
from mixc.core.run_files import LOCK
from mixc.core.safe_write import open_nofollow

__all__ = ["RunLock", "clean_temporaries", "note"]


def note(text: str) -> None:
    """Print ``mixc: note: <text>`` on stderr: the default log of the lock and the writer."""
    print(f"mixc: note: {text}", file=sys.stderr, flush=True)


_TEMPORARY = re.compile(
    r"^(\.(checkpoint\.safetensors|best\.safetensors|epoch-\d{4}\.safetensors|config\.json|metrics\.jsonl|plan\.json)"
    r"\..+\.tmp|(config\.json|metrics\.jsonl)\.tmp)$"
)


def clean_temporaries(folder: Path, log: Callable[[str], None] = note) -> list[Path]:
    """Remove temporaries of an interrupted write (call it holding the folder's lock: nobody else
    writes)."""
    folder = Path(folder)
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
            log(f"removed {p}, a temporary file left by an interrupted run")
    return removed


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunLock:
    """One writer per run folder: ``fcntl.flock`` on a file naming its holder (pid, host, start
    time).

    The kernel drops a flock when its process dies, so the lock of a killed run
    is taken over (with a note naming it); a live holder makes the second
    writer stop with an error. Released by removing the file while still
    holding it (a writer that opened the old file notices and retries).
    """

    def __init__(self, folder: Path, log: Callable[[str], None] = note) -> None:
        self.path = Path(folder) / LOCK
        self.fd: int | None = None
        self.log = log

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX
            self.log(f"no fcntl here: {self.path.parent} is not locked against a second writer")
            return self
        for _ in range(10):
            fd = open_nofollow(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(_read_fd(fd))
                os.close(fd)
                raise TrainError(
                    f"the run folder {self.path.parent} is being written by another `mixc train`"
                    f" ({holder}); two writers would interleave their epochs in one checkpoint and"
                    " metrics.jsonl; hint: wait for it to finish (or stop it), or pass another"
                    f" --out folder. The lock is {self.path}."
                ) from None
            if not _same_file(fd, self.path):  # its holder removed it between our open and flock
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if previous:
                self.log(
                    f"took over the lock of {self.path.parent} from {_holder(previous)}: that run"
                    " is no longer running (interrupted or killed)"
                )
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise TrainError(
            f"could not lock {self.path}: it keeps being replaced; hint: is another mixc train"
            " starting?"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
