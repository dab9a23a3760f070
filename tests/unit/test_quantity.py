"""Quantities and durations: the forms users write, and clear errors for the rest."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vram_operator.api.quantity import (
    format_bytes,
    parse_bytes,
    parse_duration,
    parse_positive_bytes,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6Gi", 6 * 2**30),
        ("6.5Gi", int(6.5 * 2**30)),
        ("500M", 500_000_000),
        ("500Mi", 500 * 2**20),
        ("1k", 1000),
        ("1Ki", 1024),
        ("8000000000", 8_000_000_000),
        (8_000_000_000, 8_000_000_000),
        ("1e9", 1_000_000_000),
        ("1.5E3", 1500),
        ("0.5Ki", 512),
        ("1.0001Ki", 1025),  # fractions of a byte round up, as Kubernetes does
        ("+2Ti", 2 * 2**40),
        (".5Gi", 2**29),
    ],
)
def test_parses_kubernetes_quantities(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("6GB", "not a quantity"),
        ("6 Gi", "not a quantity"),
        ("lots", "not a quantity"),
        ("", "not a quantity"),
        ("-1Gi", "negative"),
        (-5, "negative"),
        ("1e99", "too large"),
        ("500m", "not a quantity"),
    ],
)
def test_rejects_malformed_quantities_naming_the_forms(text: str | int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_bytes(text)
    assert "6Gi" in str(info.value)


@pytest.mark.parametrize("value", [True, 1.5, None, ["6Gi"]])
def test_rejects_wrong_types(value: object) -> None:
    with pytest.raises(ValueError, match="expected a byte quantity"):
        parse_bytes(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["0", "0Gi", 0, "0.0"])
def test_positive_bytes_refuses_zero(value: str | int) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_positive_bytes(value)


@given(st.integers(min_value=0, max_value=2**58))
def test_format_then_parse_stays_within_rounding(value: int) -> None:
    rendered = format_bytes(value)
    assert abs(parse_bytes(rendered) - value) <= max(1, value // 10)


def test_format_bytes_reads_like_kubectl() -> None:
    assert format_bytes(6 * 2**30) == "6Gi"
    assert format_bytes(int(6.5 * 2**30)) == "6.5Gi"
    assert format_bytes(512 * 2**20) == "512Mi"
    assert format_bytes(100) == "100"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), ("1.5h", 5400)],
)
def test_parses_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["forever", "30", "-5m", "5 m", "", "1d"])
def test_rejects_malformed_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration such as 30s"):
        parse_duration(text)


def test_rejects_non_string_duration() -> None:
    with pytest.raises(ValueError, match="got int"):
        parse_duration(30)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1" + "0" * 100, 2**63, "8Ei", "1Ei", str(10**18 + 1)])
def test_quantities_past_int64_are_refused_before_any_status_carries_them(
    value: str | int,
) -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_bytes(value)


def test_the_largest_quantity_is_accepted() -> None:
    assert parse_bytes("1E") == 10**18


@pytest.mark.parametrize("text", ["9" * 400 + "s", "9" * 20 + "h", "8785h", "4000h" * 3])
def test_durations_are_finite_and_at_most_a_year(text: str) -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_duration(text)
