"""The two client APIs' own shapes for what the gateway answers itself: errors and listings.

Pure functions over `routing.Target`; no I/O. What a backend answers is passed through as it
came, except an error body that is not in the API's error shape (a proxy's HTML page, a
connection reset): that is wrapped by `wrap_error`, so a client library always finds the
error where it looks for it.

- OpenAI: `{"error": {"message", "type", "param", "code"}}` (the OpenAI API reference; vLLM
  0.11.0 vllm/entrypoints/openai/protocol.py ErrorResponse and Ollama v0.12.3
  openai/openai.go ErrorResponse answer the same shape).
- Ollama: `{"error": "message"}` (server/routes.go, v0.12.3, `gin.H{"error": ...}`).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from vram_operator.api import Backend

from .routing import Target, public_names

OLLAMA_VERSION = "0.12.3"
"""The Ollama API version the gateway speaks (the one the chart pins and the fake follows)."""

Json = dict[str, Any]

_OPENAI_KINDS = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("rate_limit_error", "queue_full"),
    502: ("api_error", "backend_unreachable"),
    503: ("api_error", "model_not_ready"),
}


def openai_error(status: int, message: str) -> Json:
    kind, code = _OPENAI_KINDS.get(status, ("api_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def ollama_error(message: str) -> Json:
    return {"error": message}


def is_error_shape(body: bytes, api: str) -> bool:
    """Whether `body` is already an error in `api`'s shape ("openai" or "ollama")."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    if not isinstance(parsed, dict) or "error" not in parsed:
        return False
    if api == "ollama":
        return isinstance(parsed["error"], str)
    error = parsed["error"]
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def wrap_error(status: int, body: bytes, api: str, backend: str) -> Json:
    """A backend's non-conforming error body, in `api`'s shape, its text kept."""
    text = body.decode(errors="replace").strip()[:500] or f"HTTP {status}"
    message = f"{backend} answered {status}: {text}"
    return ollama_error(message) if api == "ollama" else openai_error(status, message)


def not_found_message(requested: str, reason: str, candidates: tuple[str, ...]) -> str:
    if reason == "ambiguous":
        return f"model {requested!r} is ambiguous; use one of: {', '.join(candidates)}"
    known = ", ".join(candidates) if candidates else "none"
    return f"model {requested!r} not found; known models: {known}"


def _unix(moment: dt.datetime | None) -> int:
    return int(moment.timestamp()) if moment is not None else 0


def openai_models(targets: Mapping[str, Target]) -> Json:
    """/v1/models: every deployment the gateway may serve, with its state.

    `id`, `object`, `created` and `owned_by` are OpenAI's; the rest are ours, which the openai
    client keeps as extra fields.
    """
    data = [
        {
            "id": public,
            "object": "model",
            "created": _unix(targets[key].created),
            "owned_by": targets[key].namespace,
            "namespace": targets[key].namespace,
            "name": targets[key].name,
            "model": targets[key].model,
            "backend": targets[key].backend.value,
            "state": targets[key].state,
            "ready_replicas": len(targets[key].ready),
            "replicas": targets[key].replicas,
        }
        for key, public in public_names(targets).items()
    ]
    return {"object": "list", "data": data}


def _details(target: Target) -> Json:
    """The `details` object of /api/tags and /api/ps (api/types.go ModelDetails); the gateway
    knows no GGUF header, so the format fields stay empty."""
    return {
        "parent_model": "",
        "format": "gguf" if target.backend is Backend.OLLAMA else "safetensors",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def _iso(moment: dt.datetime | None) -> str:
    return (moment or dt.datetime.fromtimestamp(0, dt.UTC)).isoformat().replace("+00:00", "Z")


def _size(target: Target) -> int:
    sizes = [s.vram_bytes for s in target.states if s.vram_bytes]
    return max(sizes) if sizes else 0


def ollama_tags(targets: Mapping[str, Target]) -> Json:
    """/api/tags: the models the gateway may serve through the Ollama API (Ollama-backed
    ones), in Ollama's ListResponse shape (api/types.go ListModelResponse)."""
    models = []
    for key, public in public_names(targets).items():
        target = targets[key]
        if target.backend is not Backend.OLLAMA:
            continue
        models.append(
            {
                "name": public,
                "model": public,
                "modified_at": _iso(target.created),
                "size": _size(target),
                "digest": "",
                "details": _details(target),
            }
        )
    return {"models": models}


def ollama_ps(targets: Mapping[str, Target], keep_alive_until: dt.datetime) -> Json:
    """/api/ps: the Ollama-backed models with a replica ready now (api/types.go
    ProcessModelResponse). Residency is the operator's to decide, so `expires_at` is a time
    far ahead rather than a keep-alive the gateway does not know."""
    models = []
    for key, public in public_names(targets).items():
        target = targets[key]
        if target.backend is not Backend.OLLAMA or not target.ready:
            continue
        size = _size(target)
        models.append(
            {
                "name": public,
                "model": public,
                "size": size,
                "digest": "",
                "details": _details(target),
                "expires_at": _iso(keep_alive_until),
                "size_vram": size,
            }
        )
    return {"models": models}
