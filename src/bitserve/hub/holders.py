"""Which processes still hold a file: deleting a file that a process has open or
memory-mapped (``bitserve serve`` maps its model) frees its name, not its blocks, until
that process exits. Read from ``/proc`` (Linux); another user's processes cannot be read
there and are not found."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    command: str  # the process's name (``/proc/PID/comm``): "bitserve", "python3"...


def holders_of(path: str | Path) -> list[Holder]:
    """The other processes that have ``path`` (the file it resolves to) open or mapped,
    by pid; empty where there is no ``/proc`` or the file is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if not _PROC.is_dir():
        return []
    found: list[Holder] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _maps(entry, st) or _opens(entry, st):
            command = "?"
            with contextlib.suppress(OSError):
                command = (entry / "comm").read_text().strip() or "?"
            found.append(Holder(int(entry.name), command))
    return sorted(found, key=lambda h: h.pid)


def _maps(proc: Path, st: os.stat_result) -> bool:
    """True if a mapping of ``proc`` is of the file ``st`` describes (its device and
    inode: the path may be a link, and reads '(deleted)' once the name is gone)."""
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    inode = str(st.st_ino)
    try:
        with open(proc / "maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == inode and fields[3] == device:
                    return True
    except OSError:  # another user's process, or one that just exited
        return False
    return False


def _opens(proc: Path, st: os.stat_result) -> bool:
    """True if an open file descriptor of ``proc`` is the file ``st`` describes."""
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            other = os.stat(fd)
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False
