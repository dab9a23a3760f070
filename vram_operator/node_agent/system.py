"""Host tweaks the agent makes only when configured: dropping the page cache before a large
load, and removing System V shared-memory segments that a crashed backend left behind.

Both need privilege; a missing privilege is reported in words, never as a traceback.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IPC_RMID = 0


@dataclass(frozen=True)
class ShmSegment:
    """One line of /proc/sysvipc/shm."""

    key: int
    shmid: int
    size: int
    creator_pid: int
    attached: int


def drop_page_cache(proc: str | Path = "/proc") -> str | None:
    """Ask the kernel to drop clean page cache (echo 1 > /proc/sys/vm/drop_caches).

    Returns None on success, else a message saying what is missing.
    """
    path = Path(proc) / "sys/vm/drop_caches"
    try:
        os.sync()
        path.write_text("1\n")
    except PermissionError:
        return (
            f"cannot write {path}: dropping the page cache needs privilege "
            "(run the agent privileged or with CAP_SYS_ADMIN, or turn --drop-page-cache-above off)"
        )
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    return None


def parse_sysvipc_shm(text: str) -> list[ShmSegment]:
    """Parse /proc/sysvipc/shm; lines that do not parse are skipped, not fatal."""
    lines = text.splitlines()
    if not lines:
        return []
    header = lines[0].split()
    try:
        columns = {name: header.index(name) for name in ("key", "shmid", "size", "cpid", "nattch")}
    except ValueError:
        return []
    segments = []
    for line in lines[1:]:
        fields = line.split()
        try:
            segments.append(
                ShmSegment(
                    key=int(fields[columns["key"]]),
                    shmid=int(fields[columns["shmid"]]),
                    size=int(fields[columns["size"]]),
                    creator_pid=int(fields[columns["cpid"]]),
                    attached=int(fields[columns["nattch"]]),
                )
            )
        except (IndexError, ValueError):
            continue
    return segments


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _libc_remove(shmid: int) -> str | None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(IPC_RMID), None) != 0:
        code = ctypes.get_errno()
        return f"shmctl(IPC_RMID) on {shmid} failed: {errno.errorcode.get(code, code)}"
    return None


def remove_orphaned_shm(
    proc: str | Path = "/proc",
    remove: Callable[[int], str | None] = _libc_remove,
    pid_alive: Callable[[int], bool] = _pid_alive,
) -> tuple[list[ShmSegment], list[str]]:
    """Remove segments no process is attached to and whose creator has exited.

    Returns the segments removed and the messages of those that could not be.
    """
    try:
        text = (Path(proc) / "sysvipc/shm").read_text()
    except OSError as exc:
        return [], [f"cannot read {proc}/sysvipc/shm: {exc.strerror or exc}"]
    removed, problems = [], []
    for segment in parse_sysvipc_shm(text):
        if segment.attached > 0 or pid_alive(segment.creator_pid):
            continue
        problem = remove(segment.shmid)
        if problem is None:
            removed.append(segment)
        else:
            problems.append(problem)
    return removed, problems
