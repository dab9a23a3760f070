"""Host memory and PSI: real /proc contents, and damaged files that must not stop the agent."""

import errno
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.api import HostMemory, MemoryPressure, PSIFigures
from vram_operator.node_agent.monitors import HostMonitor, parse_meminfo, parse_psi

pytestmark = pytest.mark.unit

# Copied from a Linux 6.18 machine's /proc; its `free -b` printed total 25274793984.
REAL_PROC = Path(__file__).parent.parent / "data" / "proc"
REAL_TOTAL = 24682416 * 1024
REAL_AVAILABLE = 24233216 * 1024
ZERO = PSIFigures(avg10=0.0, avg60=0.0, avg300=0.0, total=0)

# The kernel's format (psi_show: "%s avg10=%lu.%02lu avg60=... total=%llu"), under load.
LOADED_PSI = (
    "some avg10=12.34 avg60=5.67 avg300=1.02 total=987654321\n"
    "full avg10=3.50 avg60=1.25 avg300=0.30 total=123456789\n"
)


def make_proc(tmp_path: Path, meminfo: str | None, psi: str | None) -> Path:
    """A proc root holding the given files; None leaves a file out."""
    if meminfo is not None:
        (tmp_path / "meminfo").write_text(meminfo)
    if psi is not None:
        (tmp_path / "pressure").mkdir()
        (tmp_path / "pressure" / "memory").write_text(psi)
    return tmp_path


def real_meminfo() -> str:
    return (REAL_PROC / "meminfo").read_text()


def real_psi() -> str:
    return (REAL_PROC / "pressure" / "memory").read_text()


def test_real_proc_files_read_as_free_prints_them() -> None:
    reading = HostMonitor(proc=REAL_PROC).read()

    assert reading.memory == HostMemory(total_bytes=REAL_TOTAL, available_bytes=REAL_AVAILABLE)
    assert reading.pressure == MemoryPressure(available=True, some=ZERO, full=ZERO)
    assert reading.unavailable == []


def test_psi_under_load_keeps_every_figure() -> None:
    pressure = parse_psi(LOADED_PSI)

    assert pressure.available
    assert pressure.some == PSIFigures(avg10=12.34, avg60=5.67, avg300=1.02, total=987654321)
    assert pressure.full == PSIFigures(avg10=3.5, avg60=1.25, avg300=0.3, total=123456789)


def test_unknown_psi_keys_and_lines_are_ignored() -> None:
    text = "some avg10=1.00 avg60=2.00 avg300=3.00 total=4 avg900=9.00\nnew line\n" + (
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )

    pressure = parse_psi(text)

    assert pressure.some == PSIFigures(avg10=1.0, avg60=2.0, avg300=3.0, total=4)
    assert pressure.full == ZERO


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "MemTotal missing from /proc/meminfo"),
        # Cut off after MemFree: the line a kernel writes third never arrived.
        ("MemTotal:       24682416 kB\nMemFree:        2355", "MemAvailable missing"),
        # Cut off inside the first figure.
        ("MemTotal:       2468", "MemTotal in /proc/meminfo is not '<number> kB': '2468'"),
        ("MemTotal: 24682416 kB\nMemAvailable: 12x4 kB\n", "MemAvailable in /proc/meminfo is not"),
        ("MemTotal: -5 kB\nMemAvailable: 1 kB\n", "MemTotal in /proc/meminfo is not a number"),
        ("MemTotal: 5 MB\nMemAvailable: 1 kB\n", "MemTotal in /proc/meminfo is not '<number> kB'"),
        ("\x00\x01\x02 binary garbage", "MemTotal missing from /proc/meminfo"),
    ],
    ids=["empty", "truncated", "truncated-in-number", "malformed", "negative", "unit", "binary"],
)
def test_damaged_meminfo_names_the_figure(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_meminfo(text)

    reading = HostMonitor(proc=make_proc(tmp_path, text, real_psi())).read()

    assert reading.memory is None
    assert reading.pressure.available
    assert len(reading.unavailable) == 1
    assert reading.unavailable[0].startswith("host memory: " + message)


def test_kernel_without_memavailable_is_reported(tmp_path: Path) -> None:
    """Kernels before 3.14 have no MemAvailable: total alone would mislead, so none is given."""
    text = "".join(line for line in real_meminfo().splitlines(True) if "MemAvailable" not in line)

    reading = HostMonitor(proc=make_proc(tmp_path, text, real_psi())).read()

    assert reading.memory is None
    assert reading.unavailable == ["host memory: MemAvailable missing from /proc/meminfo"]


def test_missing_meminfo_is_reported(tmp_path: Path) -> None:
    reading = HostMonitor(proc=make_proc(tmp_path, None, real_psi())).read()

    assert reading.memory is None
    assert reading.unavailable == [
        f"host memory: cannot read {tmp_path / 'meminfo'}: No such file or directory"
    ]


def test_kernel_without_psi_is_unavailable_not_zero(tmp_path: Path) -> None:
    reading = HostMonitor(proc=make_proc(tmp_path, real_meminfo(), None)).read()

    assert reading.memory == HostMemory(total_bytes=REAL_TOTAL, available_bytes=REAL_AVAILABLE)
    assert reading.pressure == MemoryPressure(available=False)
    assert reading.pressure.some is None
    assert reading.unavailable == [f"memory PSI: kernel has no {tmp_path / 'pressure' / 'memory'}"]


def test_psi_turned_off_at_boot_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With psi=0 the file exists but reading it fails with EOPNOTSUPP."""
    proc = make_proc(tmp_path, real_meminfo(), real_psi())
    psi_path = proc / "pressure" / "memory"
    read_text = Path.read_text

    def refuse_psi(self: Path, encoding: str | None = None, errors: str | None = None) -> str:
        if self == psi_path:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return read_text(self, encoding=encoding, errors=errors)

    monkeypatch.setattr(Path, "read_text", refuse_psi)

    reading = HostMonitor(proc=proc).read()

    assert reading.memory is not None
    assert reading.pressure == MemoryPressure(available=False)
    assert reading.unavailable == [f"memory PSI: turned off in the kernel (psi=0): {psi_path}"]


def test_unreadable_psi_says_why(tmp_path: Path) -> None:
    proc = make_proc(tmp_path, real_meminfo(), None)
    (proc / "pressure" / "memory").mkdir(parents=True)

    reading = HostMonitor(proc=proc).read()

    assert reading.pressure == MemoryPressure(available=False)
    assert reading.unavailable == [
        f"memory PSI: cannot read {proc / 'pressure' / 'memory'}: Is a directory"
    ]


def test_psi_without_full_keeps_some(tmp_path: Path) -> None:
    some_only = LOADED_PSI.splitlines(True)[0]

    reading = HostMonitor(proc=make_proc(tmp_path, real_meminfo(), some_only)).read()

    assert reading.pressure.available
    assert reading.pressure.some == PSIFigures(
        avg10=12.34, avg60=5.67, avg300=1.02, total=987654321
    )
    assert reading.pressure.full is None
    assert reading.unavailable == [
        f"memory PSI full: missing from {tmp_path / 'pressure' / 'memory'}"
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "memory PSI 'some' line missing from /proc/pressure/memory"),
        ("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n", "memory PSI 'some' line missing"),
        ("some avg10=0.00 avg60=0.00 avg3", "memory PSI some avg300 missing"),
        (
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.0",
            "memory PSI full avg300 missing",
        ),
        ("some avg10=abc avg60=0.00 avg300=0.00 total=0\n", "memory PSI some avg10 is not a"),
        ("some avg10=nan avg60=0.00 avg300=0.00 total=0\n", "memory PSI some avg10 is not a"),
        ("some avg10=0.00 avg60=-1.00 avg300=0.00 total=0\n", "memory PSI some avg60 is not a"),
        ("some avg10=0.00 avg60=0.00 avg300=0.00 total=1.5\n", "memory PSI some total is not"),
        ("some avg10=0.00 avg60=0.00 avg300=0.00 total=\n", "memory PSI some total is not"),
    ],
    ids=[
        "empty",
        "full-only",
        "truncated-some",
        "truncated-full",
        "letters",
        "nan",
        "negative",
        "fractional-total",
        "empty-total",
    ],
)
def test_damaged_psi_is_unavailable_and_names_the_figure(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        parse_psi(text)

    reading = HostMonitor(proc=make_proc(tmp_path, real_meminfo(), text)).read()

    assert reading.memory is not None
    assert reading.pressure == MemoryPressure(available=False)
    assert len(reading.unavailable) == 1
    assert reading.unavailable[0].startswith(message)


figures = st.builds(
    PSIFigures,
    avg10=st.integers(0, 10_000).map(lambda n: n / 100),
    avg60=st.integers(0, 10_000).map(lambda n: n / 100),
    avg300=st.integers(0, 10_000).map(lambda n: n / 100),
    total=st.integers(0, 10**18),
)


def psi_line(kind: str, f: PSIFigures) -> str:
    return f"{kind} avg10={f.avg10:.2f} avg60={f.avg60:.2f} avg300={f.avg300:.2f} total={f.total}"


@settings(max_examples=50, deadline=None)
@given(some=figures, full=figures)
def test_psi_figures_round_trip(some: PSIFigures, full: PSIFigures) -> None:
    pressure = parse_psi(psi_line("some", some) + "\n" + psi_line("full", full) + "\n")

    assert pressure == MemoryPressure(available=True, some=some, full=full)


@settings(max_examples=50, deadline=None)
@given(total=st.integers(0, 2**49), available=st.integers(0, 2**49))
def test_meminfo_figures_round_trip(total: int, available: int) -> None:
    text = f"MemTotal:{total:>16} kB\nMemFree:{1:>17} kB\nMemAvailable:{available:>12} kB\n"

    assert parse_meminfo(text) == HostMemory(
        total_bytes=total * 1024, available_bytes=available * 1024
    )


def failure(parse: Callable[[str], object], text: str) -> str | None:
    """The ValueError message parsing gives, or None where the text parses."""
    try:
        parse(text)
    except ValueError as err:
        return str(err)
    return None


@settings(max_examples=50, deadline=None)
@given(text=st.text())
def test_parsers_fail_only_with_a_named_value_error(text: str) -> None:
    """Any other exception escaping a parser would fail this test."""
    meminfo = failure(parse_meminfo, text)
    psi = failure(parse_psi, text)

    assert meminfo is None or "/proc/meminfo" in meminfo
    assert psi is None or psi.startswith("memory PSI")


def test_a_psi_total_past_the_bound_is_clamped_so_status_writes_keep_landing() -> None:
    line = "some avg10=0.00 avg60=0.00 avg300=0.00 total=" + str(2**64 + 5)
    pressure = parse_psi(line + "\n")
    assert pressure.some is not None
    assert pressure.some.total == 10**18
