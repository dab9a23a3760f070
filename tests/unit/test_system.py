"""Host tweaks: page-cache dropping and orphaned System V shared memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest

from vram_operator.node_agent.system import (
    ShmSegment,
    drop_page_cache,
    parse_sysvipc_shm,
    remove_orphaned_shm,
)

pytestmark = pytest.mark.unit

# The layout of /proc/sysvipc/shm on Linux 6.x (header, then one line per segment).
SHM = (
    "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid"
    "      atime      dtime      ctime                   rss                  swap\n"
    "         0          3  1600              67108864  4242  4242      0     0     0     0     0"
    "          0          0 1763700000                     0                     0\n"
    "  12345678          4  1600               1048576  1111  1111      2     0     0     0     0"
    "          0          0 1763700000                     0                     0\n"
    "         0          5  1600                  4096     1     1      0     0     0     0     0"
    "          0          0 1763700000                     0                     0\n"
    "garbage line\n"
)


def _proc(tmp_path: Path, shm: str | None) -> Path:
    if shm is not None:
        (tmp_path / "sysvipc").mkdir()
        (tmp_path / "sysvipc" / "shm").write_text(shm)
    return tmp_path


def test_parses_segments_and_skips_garbage() -> None:
    segments = parse_sysvipc_shm(SHM)
    assert [s.shmid for s in segments] == [3, 4, 5]
    assert segments[0] == ShmSegment(key=0, shmid=3, size=67108864, creator_pid=4242, attached=0)
    assert segments[1].attached == 2


@pytest.mark.parametrize("text", ["", "no header here\n1 2 3\n"])
def test_unparseable_files_give_no_segments(text: str) -> None:
    assert parse_sysvipc_shm(text) == []


def test_removes_only_unattached_segments_of_dead_creators(tmp_path: Path) -> None:
    removed_ids: list[int] = []

    def remove(shmid: int) -> str | None:
        removed_ids.append(shmid)
        return None

    removed, problems = remove_orphaned_shm(
        _proc(tmp_path, SHM), remove=remove, pid_alive=lambda pid: pid == 1
    )
    # 3: unattached, creator gone -> removed; 4: attached; 5: creator (pid 1) alive.
    assert removed_ids == [3]
    assert [s.shmid for s in removed] == [3]
    assert problems == []


def test_reports_segments_it_could_not_remove(tmp_path: Path) -> None:
    removed, problems = remove_orphaned_shm(
        _proc(tmp_path, SHM),
        remove=lambda shmid: f"no luck with {shmid}",
        pid_alive=lambda _: False,
    )
    assert removed == []
    assert problems == ["no luck with 3", "no luck with 5"]


def test_missing_sysvipc_is_reported_not_raised(tmp_path: Path) -> None:
    removed, problems = remove_orphaned_shm(_proc(tmp_path, None))
    assert removed == []
    assert "cannot read" in problems[0]


def test_removes_a_real_orphaned_segment() -> None:
    """A segment created here and left unattached is found in the real /proc and removed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    ipc_private, ipc_creat = 0, 0o1000
    shmid = libc.shmget(ipc_private, 4096, ipc_creat | 0o600)
    if shmid < 0:
        pytest.skip(f"this kernel refuses System V shared memory (errno {ctypes.get_errno()})")
    mine = os.getpid()
    try:
        removed, _ = remove_orphaned_shm(
            "/proc",
            pid_alive=lambda pid: pid != mine,  # pretend this process has crashed
        )
        assert shmid in [s.shmid for s in removed]
        assert shmid not in [
            s.shmid for s in parse_sysvipc_shm(Path("/proc/sysvipc/shm").read_text())
        ]
    finally:
        libc.shmctl(shmid, 0, None)


def test_drop_page_cache_writes_the_knob(tmp_path: Path) -> None:
    (tmp_path / "sys/vm").mkdir(parents=True)
    assert drop_page_cache(tmp_path) is None
    assert (tmp_path / "sys/vm/drop_caches").read_text() == "1\n"


def test_drop_page_cache_failure_is_a_message(tmp_path: Path) -> None:
    message = drop_page_cache(tmp_path)  # no sys/vm folder: the write fails
    assert message is not None
    assert "cannot write" in message
