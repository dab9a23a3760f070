"""What is resident on this node's GPUs, as the agent last saw or did it.

The reconcile loop, the report loop and the backends' progress callbacks touch it at
once, so every access goes through one lock and readers get copies.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

from vram_operator.api import Backend, ModelState, Priority, ResidentModel

ON_GPU = (ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING)


@dataclasses.dataclass
class Entry:
    """One model on this node: its assignment key, where it is and how it is doing."""

    key: str
    model: str
    backend: Backend
    priority: Priority
    state: ModelState
    gpu_uuid: str | None = None
    vram_bytes: int | None = None
    vram_source: str | None = None
    progress: int | None = None
    loaded_at: dt.datetime | None = None
    last_access: dt.datetime | None = None
    load_seconds: float | None = None
    message: str | None = None
    can_park: bool = False
    generation: int | None = None
    idle_expired: bool = False
    """Unloaded after keepAlive of idleness: it stays out until its assignment changes."""
    reason: str | None = None
    """Why it is Failed, Evicted or Unloading, in one word, for the operator."""
    permanent: bool = False
    """Failed in a way trying again cannot fix: retried only when its assignment changes."""
    endpoint: str | None = None
    """Where it answers requests, as the backend reports."""
    request_rate: float | None = None
    """Requests per second lately, from the gateways' counts; None without them."""
    in_use: int | None = None
    """Requests running on it or waiting for it at the gateways; None without them."""
    served: bool = False
    """The gateways saw requests on it since it was last loaded or woken: its minimum
    residency no longer holds once none is left (`eviction.is_young`)."""

    def to_status(self) -> ResidentModel:
        return ResidentModel(
            key=self.key,
            model=self.model,
            backend=self.backend,
            gpu_uuid=self.gpu_uuid,
            priority=self.priority,
            state=self.state,
            vram_bytes=self.vram_bytes,
            vram_source=self.vram_source,
            progress=self.progress,
            loaded_at=self.loaded_at,
            last_access=self.last_access,
            load_seconds=self.load_seconds,
            message=self.message,
            reason=self.reason,
            endpoint=self.endpoint,
        )


class Registry:
    """Entries keyed by assignment key, safe to use from tasks and threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}

    def snapshot(self) -> list[Entry]:
        """Copies of every entry, sorted by key, for decisions and reports."""
        with self._lock:
            return [dataclasses.replace(e) for _, e in sorted(self._entries.items())]

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else dataclasses.replace(entry)

    def put(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.key] = dataclasses.replace(entry)

    def update(self, key: str, **changes: object) -> Entry | None:
        """Change fields of an entry atomically; None when it is gone (unassigned meanwhile)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            updated = dataclasses.replace(entry, **changes)  # type: ignore[arg-type]
            self._entries[key] = updated
            return dataclasses.replace(updated)

    def remove(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def vram_on(self, gpu_uuid: str, excluding: str | None = None) -> int:
        """VRAM the agent's models hold, are loading or may still take on one GPU (a diffusion
        pipeline's figure includes the activation peak it takes only while it renders)."""
        with self._lock:
            return sum(
                e.vram_bytes or 0
                for e in self._entries.values()
                if e.gpu_uuid == gpu_uuid and e.state in ON_GPU and e.key != excluding
            )
