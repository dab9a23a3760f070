"""Pieces both resources share: camelCase models, priorities, backends and KEP-1623 conditions."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

from .quantity import (
    DURATION_HELP,
    DURATION_MAX_LENGTH,
    DURATION_PATTERN,
    MAX_BYTES,
    POSITIVE_BYTES_PATTERN,
    QUANTITY_HELP,
    QUANTITY_MAX_LENGTH,
    parse_duration,
    parse_positive_bytes,
)

GROUP = "vram.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
FINALIZER = f"{GROUP}/unload"


class CamelModel(BaseModel):
    """Python names in code, camelCase names in YAML, as Kubernetes users expect."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (camelCase, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Priority(StrEnum):
    """How much a model matters; `critical` is never evicted or displaced."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """Higher means more important: low=0 … critical=3."""
        return _PRIORITY_RANK[self]

    @property
    def evictable(self) -> bool:
        return self is not Priority.CRITICAL


_PRIORITY_RANK = {Priority.LOW: 0, Priority.NORMAL: 1, Priority.HIGH: 2, Priority.CRITICAL: 3}


class Backend(StrEnum):
    """The inference server that holds a model."""

    OLLAMA = "ollama"
    VLLM = "vllm"
    DIFFUSERS = "diffusers"
    """Stable Diffusion pipelines in our diffusion server (`vram-operator diffusion-server`)."""


class ModelState(StrEnum):
    """Where a model stands on one GPU: the residency tiers and the ways in and out."""

    PENDING = "Pending"
    LOADING = "Loading"
    LOADED = "Loaded"
    SLEEPING = "Sleeping"
    UNLOADING = "Unloading"
    """The agent has decided to unload it; its memory is not free yet."""
    EVICTED = "Evicted"
    FAILED = "Failed"


def _check_bytes(value: str | int) -> str | int:
    parse_positive_bytes(value)
    return value


def _check_duration(value: str) -> str:
    if parse_duration(value) <= 0:
        # Ollama reads keep_alive 0 as "unload now" (server/routes.go): a model that is
        # unloaded as soon as it loads.
        raise ValueError(f"{value!r} is zero; give a positive duration such as 5m, or leave it out")
    return value


Quantity = Annotated[
    str | int,
    AfterValidator(_check_bytes),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "pattern": POSITIVE_BYTES_PATTERN,
            "maxLength": QUANTITY_MAX_LENGTH,
            "minimum": 1,
            "maximum": MAX_BYTES,
            "description": f"Memory as {QUANTITY_HELP}.",
        }
    ),
]
"""A positive byte quantity (`6Gi`, `6.5Gi`, `500M`, `8000000000`)."""

Duration = Annotated[
    str,
    Field(
        pattern=DURATION_PATTERN,
        max_length=DURATION_MAX_LENGTH,
        description=f"Idle time as {DURATION_HELP}.",
    ),
    AfterValidator(_check_duration),
]

ConditionReason = Annotated[
    str,
    Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024, min_length=1),
]


class Condition(CamelModel):
    """One observation in the KEP-1623 shape that `kubectl wait --for=condition=` reads."""

    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: ConditionReason
    message: Annotated[str, Field(max_length=32768)] = ""
    last_transition_time: dt.datetime
    observed_generation: Annotated[int, Field(ge=0)] | None = None


def condition_list_schema(schema: dict[str, Any]) -> None:
    """Mark a conditions array as a map keyed by type, so merge patches touch one condition."""
    schema["x-kubernetes-list-type"] = "map"
    schema["x-kubernetes-list-map-keys"] = ["type"]


Conditions = Annotated[list[Condition], Field(json_schema_extra=condition_list_schema)]


def set_condition(
    conditions: list[Condition],
    new: Condition,
) -> list[Condition]:
    """Return conditions with `new` in place; the transition time moves only when status does."""
    result: list[Condition] = []
    replaced = False
    for old in conditions:
        if old.type != new.type:
            result.append(old)
            continue
        replaced = True
        if old.status == new.status:
            result.append(new.model_copy(update={"last_transition_time": old.last_transition_time}))
        else:
            result.append(new)
    if not replaced:
        result.append(new)
    return result


def now() -> dt.datetime:
    """Timestamps as the API server writes them: UTC, whole seconds."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


__all__ = [
    "API_VERSION",
    "FINALIZER",
    "GROUP",
    "VERSION",
    "Backend",
    "CamelModel",
    "Condition",
    "Conditions",
    "Duration",
    "ModelState",
    "Priority",
    "Quantity",
    "now",
    "set_condition",
]
