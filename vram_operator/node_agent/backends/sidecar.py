"""What the clients of our two sidecar servers share: the vLLM supervisor and the diffusion
server speak one dialect (camelCase JSON, GET /health, GET /estimate, a PUT that starts a load
which the client then polls, a DELETE that is done when the entry is gone)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal, TypeVar
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from vram_operator.api import Backend, BackendHealth
from vram_operator.node_agent.estimate import Estimate

from .base import BackendError, JSONEndpoint, parse_as


class Shape(BaseModel):
    """An answer of ours: camelCase, and fields we do not read are ignored."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class _Health(Shape):
    status: str
    version: str | None = None


class _Estimate(Shape):
    bytes: int = Field(ge=0)
    method: Literal["ollama-show", "gguf-header", "safetensors-header", "file-size"]
    detail: str
    parameters: int | None = None


class Entry(Shape):
    """The part of a model's (or pipeline's) entry the polling reads."""

    state: str


E = TypeVar("E", bound=Entry)


async def health(api: JSONEndpoint, kind: Backend, server: str) -> BackendHealth:
    """GET /health; `server` names it in the message, e.g. "supervisor"."""
    try:
        answer = parse_as(_Health, await api.call("GET", "/health"), api.label)
    except BackendError as err:
        return BackendHealth(name=kind, healthy=False, endpoint=api.base_url, message=str(err))
    healthy = answer.status == "ok"
    return BackendHealth(
        name=kind,
        healthy=healthy,
        endpoint=api.base_url,
        version=f"vram-operator {api.label} {answer.version}" if answer.version else None,
        message=None if healthy else f"{server} status {answer.status}",
    )


async def poll_while(
    api: JSONEndpoint,
    path: str,
    entry: E,
    busy: str,
    *,
    give_up_after: float,
    interval: float,
    context: str,
) -> E:
    """GET `path` every `interval` while the entry's state is `busy` ("starting", "loading"),
    and return the first entry in another state; past `give_up_after` seconds a retryable
    error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while entry.state == busy:
        if loop.time() >= deadline:
            raise BackendError(
                f"still {busy} after {give_up_after:g}s", retryable=True, context=context
            )
        await asyncio.sleep(interval)
        entry = parse_as(type(entry), await api.call("GET", path), context)
    return entry


async def delete(api: JSONEndpoint, path: str, time_limit: float) -> None:
    """DELETE `path`; an entry already gone (404) counts as deleted."""
    try:
        await api.call("DELETE", path, time_limit=time_limit)
    except BackendError as err:
        if err.status != 404:
            raise


async def estimate(api: JSONEndpoint, query: dict[str, Any], context: str) -> Estimate | None:
    """GET /estimate; None when the model's files are not in the sidecar (404). A model the
    server cannot serve (422) is an error that no retry changes: loading it fails the same way."""
    try:
        answer = await api.call("GET", f"/estimate?{urlencode(query)}")
    except BackendError as err:
        if err.status == 404:
            return None
        if err.status == 422:
            raise BackendError(err.message, context=context) from None
        raise
    found = parse_as(_Estimate, answer, context)
    return Estimate(
        bytes=found.bytes, method=found.method, detail=found.detail, parameters=found.parameters
    )
