"""One run at a time in an output folder: a lock file that names its holder.

Two runs writing into one `out_dir` interleave their logs, checkpoints and models, and the settings file need not
match the model left behind. `out_dir_lock` takes `<out_dir>/.lock` (created exclusively, holding the pid and
host) for the duration of a run. A second run is refused with a message naming the holder; a lock whose holder is
dead (killed: no chance to remove it) is taken over with a message. A lock taken on another host cannot be
checked from here and is refused as held.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from mllm_cl.errors import UserError

LOCK_FILE = ".lock"


class LockedError(UserError, RuntimeError):
    """Another run holds the output folder; the message names it."""


def _alive(pid: int) -> bool:
    if pid <= 0:  # no process: os.kill(-1, 0) would signal every process we may signal
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _create(path: Path) -> bool:
    """Write the lock exclusively; False if one is there already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return True


def acquire(out_dir: str | Path) -> Path:
    """Take `out_dir`'s lock, or raise LockedError naming the live holder; a dead holder's lock is taken over."""
    path = Path(out_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a holder may release (or another run take over) between our look and our create
        if _create(path):
            return path
        try:
            holder = json.loads(path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            continue
        except (ValueError, KeyError, TypeError):  # written halfway by a killed run: nobody can hold it
            pid, host = -1, socket.gethostname()
        if host != socket.gethostname():
            raise LockedError(f"{path.parent} is in use by process {pid} on host {host} ({path}); wait for it to "
                              f"end, or delete {path} if that run is gone")
        if pid == os.getpid() or _alive(pid):
            raise LockedError(f"{path.parent} is in use by another run, process {pid} ({path}); wait for it to end "
                              "or choose another out_dir")
        print(f"taking over {path}: its holder, process {pid}, is no longer running (killed?)", flush=True)
        path.unlink(missing_ok=True)
    raise LockedError(f"could not take {path}: other runs keep taking it; try again")


def release(path: Path) -> None:
    """Remove our lock (only ours: a run that took over a stale lock owns the file now)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def out_dir_lock(out_dir: str | Path) -> Iterator[Path]:
    path = acquire(out_dir)
    try:
        yield path
    finally:
        release(path)
