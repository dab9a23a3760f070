"""Kubernetes quantities and durations, parsed to integers with errors a person can act on.

Kept free of pydantic so the agent, the operator and the CRD generator share one parser.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}

_QUANTITY = re.compile(
    r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)"
    r"(?:(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)|[eE](?P<exp>[+-]?[0-9]+))?$"
)

# The CRD pattern for a positive byte quantity: a plain or suffixed number with a non-zero digit.
# RE2 (the API server's regexp engine) has no look-ahead, hence the two alternatives.
POSITIVE_BYTES_PATTERN = (
    r"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*)"
    r"(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
)
QUANTITY_HELP = "a byte quantity such as 6Gi, 6.5Gi, 500M or 8000000000"
QUANTITY_MAX_LENGTH = 32
MAX_BYTES = 10**18
"""The largest quantity (1E, about 888Pi). Kubernetes stores integers as int64 and a bigger
figure makes every write of it fail (422). Not 2^63-1: the API server keeps a schema's
`maximum` as a float64, where 2^63-1 rounds to 2^63 and overflows to -2^63, and 2^62 comes
back as 4611686018427388000, which no longer equals the CRD we apply. 10^18 is exact both ways."""

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
DURATION_HELP = "a duration such as 30s, 5m, 1h or 1h30m"
DURATION_MAX_LENGTH = 32
MAX_DURATION_SECONDS = 366 * 24 * 3600.0
"""A year: longer is "forever", which is what leaving the field out means."""
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_bytes(value: str | int) -> int:
    """Return the number of bytes a quantity names, rounding fractions of a byte up.

    Raises ValueError with the accepted forms in the message.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected {QUANTITY_HELP}, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}; expected {QUANTITY_HELP}")
        return _within_int64(value, value)
    if not isinstance(value, str):
        raise ValueError(f"expected {QUANTITY_HELP}, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"must not be negative, got {value!r}; expected {QUANTITY_HELP}")
    match = _QUANTITY.match(text.lstrip("+"))
    if not match:
        raise ValueError(f"{value!r} is not a quantity; expected {QUANTITY_HELP}")
    try:
        number = Decimal(match["number"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"{value!r} is not a quantity; expected {QUANTITY_HELP}") from exc
    if match["exp"] is not None:
        exponent = int(match["exp"])
        if exponent > 30:
            raise ValueError(f"{value!r} is too large; expected {QUANTITY_HELP}")
        scaled = number * (Decimal(10) ** exponent)
    else:
        suffix = match["suffix"] or ""
        scaled = number * (_BINARY.get(suffix) or _DECIMAL[suffix])
    return _within_int64(math.ceil(scaled), value)


def _within_int64(result: int, value: str | int) -> int:
    if result > MAX_BYTES:
        raise ValueError(f"{value!r} is too large: at most 1E (10^18 bytes)")
    return result


def parse_positive_bytes(value: str | int) -> int:
    """Like parse_bytes, but zero is refused: a model always needs some memory."""
    result = parse_bytes(value)
    if result <= 0:
        raise ValueError(f"must be greater than zero, got {value!r}; expected {QUANTITY_HELP}")
    return result


def format_bytes(value: int) -> str:
    """Render bytes the way kubectl users read them: 6Gi, 6.5Gi, 512Mi."""
    for suffix, factor in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= factor:
            scaled = value / factor
            text = f"{scaled:.1f}".rstrip("0").rstrip(".")
            return f"{text}{suffix}"
    return str(value)


def parse_duration(value: str) -> float:
    """Return the seconds a Go-style duration (1h30m, 5m, 45s, 500ms) names."""
    if not isinstance(value, str):
        raise ValueError(f"expected {DURATION_HELP}, got {type(value).__name__}")
    text = value.strip()
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{value!r} is not a duration; expected {DURATION_HELP}")
    if len(text) > DURATION_MAX_LENGTH:
        raise ValueError(f"{value!r} is too long; expected {DURATION_HELP}")
    seconds = sum(
        float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text)
    )
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is too long: at most 8784h (a year); leave it out for none")
    return seconds
