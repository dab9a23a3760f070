"""GPUNode: one per GPU node; the operator writes assignments, the node's agent the status."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .common import Backend, CamelModel, Conditions, ModelState, Priority
from .diffusion import DiffusersOptions
from .modeldeployment import OllamaOptions, VLLMOptions
from .quantity import MAX_BYTES

KIND = "GPUNode"
PLURAL = "gpunodes"

NonNegative = Annotated[int, Field(ge=0, le=MAX_BYTES)]
"""Within int64, as the API server stores integers."""


def assignment_key(namespace: str, name: str) -> str:
    """The key of a ModelDeployment's entry in spec.assignments.

    One key per deployment lets concurrent placements merge-patch without overwriting each other.
    """
    return f"{namespace}.{name}"


def name_in(key: str, namespace: str) -> str:
    """How a message shown in `namespace` names the model of assignment `key`: by name within
    the namespace, anonymously across namespaces, so no tenant learns another's models.

    Namespaces are DNS labels (no dots), so the key's namespace ends at its first dot.
    """
    owner, _, name = key.partition(".")
    return name if owner == namespace and name else "a model of another namespace"


class Assignment(CamelModel):
    """A model this node should hold, written by the operator."""

    namespace: str
    """Namespace of the ModelDeployment."""

    name: str
    """Name of the ModelDeployment."""

    uid: str | None = None
    """UID of the ModelDeployment, so a re-created one with the same name is told apart."""

    generation: NonNegative | None = None
    """The ModelDeployment generation this assignment was made for."""

    model: str
    """The backend's model reference."""

    backend: Backend
    """ollama, vllm or diffusers."""

    priority: Priority = Priority.NORMAL
    """The ModelDeployment's priority, used by the agent's eviction policy."""

    gpu_uuid: str | None = None
    """The GPU chosen by the operator."""

    vram_bytes: NonNegative | None = None
    """VRAM reserved for the model; absent when the agent must estimate it."""

    keep_alive_seconds: Annotated[float, Field(ge=0)] | None = None
    """Idle seconds after which the agent may unload it."""

    vllm: VLLMOptions | None = None
    """vLLM options from the ModelDeployment."""

    ollama: OllamaOptions | None = None
    """Ollama options from the ModelDeployment."""

    diffusers: DiffusersOptions | None = None
    """Diffusion pipeline options from the ModelDeployment."""

    parked: bool = False
    """Swapped out for demand and kept in host RAM: the agent parks it (vLLM sleep level 1)
    instead of unloading it, and wakes it when the operator clears this; its VRAM is not
    counted on the GPU meanwhile."""

    @property
    def sleeps(self) -> bool:
        """Whether the agent starts it with sleep mode, so it can be parked in host RAM."""
        return self.backend is Backend.VLLM and self.vllm is not None and self.vllm.sleep_mode


class GPUNodeSpec(CamelModel):
    """Written by the operator."""

    assignments: dict[str, Assignment] = Field(default_factory=dict)
    """Models this node should hold, keyed by namespace.name of their ModelDeployment."""


class GPU(CamelModel):
    """One GPU, or one MIG instance, as NVML (or torch) measures it."""

    index: NonNegative
    """Device index on the node."""

    uuid: str
    """The GPU's UUID (GPU-... or MIG-...)."""

    name: str
    """Product name, e.g. NVIDIA H100 80GB HBM3."""

    total_bytes: NonNegative
    """Total device memory."""

    used_bytes: NonNegative
    """Memory in use by all processes."""

    free_bytes: NonNegative
    """Memory free for new allocations."""

    temperature_celsius: int | None = None
    """Core temperature."""

    utilization_percent: Annotated[int, Field(ge=0, le=100)] | None = None
    """GPU compute utilisation."""

    parent_uuid: str | None = None
    """For a MIG instance, the UUID of the physical GPU."""

    unmanaged_bytes: NonNegative | None = None
    """Memory used by processes the agent does not manage."""


class HostMemory(CamelModel):
    """Host RAM, the figures `free -b` prints."""

    total_bytes: NonNegative
    """MemTotal."""

    available_bytes: NonNegative
    """MemAvailable."""


class PSIFigures(CamelModel):
    """One line of /proc/pressure/memory."""

    avg10: Annotated[float, Field(ge=0)]
    """Percent of time stalled, over 10 s."""

    avg60: Annotated[float, Field(ge=0)]
    """Percent of time stalled, over 60 s."""

    avg300: Annotated[float, Field(ge=0)]
    """Percent of time stalled, over 300 s."""

    total: NonNegative
    """Total stall time in microseconds."""


class MemoryPressure(CamelModel):
    """Host memory pressure from PSI; `available` is false on a kernel without PSI."""

    available: bool
    """Whether the kernel reports PSI."""

    some: PSIFigures | None = None
    """Some tasks stalled on memory."""

    full: PSIFigures | None = None
    """All non-idle tasks stalled on memory."""


class BackendHealth(CamelModel):
    """An inference server beside the agent."""

    name: Backend
    """ollama, vllm or diffusers."""

    healthy: bool
    """Whether it answered its health check."""

    endpoint: str | None = None
    """Where the agent reaches it."""

    version: str | None = None
    """The version it reports."""

    message: str | None = None
    """Why it is unhealthy."""

    max_models: NonNegative | None = None
    """Models it holds at once at most (Ollama's OLLAMA_MAX_LOADED_MODELS: one more makes it
    unload another by itself); absent: no limit but memory."""


class ResidentModel(CamelModel):
    """A model actually present in a backend on this node."""

    key: str
    """The assignment key (namespace.name), or backend:model for one the agent adopted."""

    model: str
    """The backend's model reference."""

    backend: Backend
    """ollama, vllm or diffusers."""

    gpu_uuid: str | None = None
    """The GPU holding it."""

    priority: Priority = Priority.NORMAL
    """Its priority, as assigned."""

    state: ModelState
    """Loading, Loaded, Sleeping, Unloading, Evicted or Failed."""

    vram_bytes: NonNegative | None = None
    """GPU memory it holds."""

    vram_source: str | None = None
    """How vramBytes was found: measured, spec or an estimate method."""

    progress: Annotated[int, Field(ge=0, le=100)] | None = None
    """Pull and load progress in percent."""

    loaded_at: dt.datetime | None = None
    """When it finished loading."""

    last_access: dt.datetime | None = None
    """When a request last used it, as the backend reports."""

    load_seconds: Annotated[float, Field(ge=0)] | None = None
    """How long the last load took."""

    message: str | None = None
    """The backend's message for a failure, or why it was evicted."""

    endpoint: str | None = None
    """Where the model answers requests (for vLLM, the base URL of its OpenAI API under the
    node's serving port); absent where the backend's own address is used (Ollama)."""

    reason: str | None = None
    """Why it is Failed, Evicted or Unloading, in one CamelCase word (InsufficientVRAM,
    PermanentError, VRAMPressure, KeepAliveExpired, Unassigned, ...), for the operator."""


RELOCATABLE_FAILURES = frozenset({"InsufficientVRAM", "OutOfMemory"})
"""ResidentModel reasons of a load that found too little memory on its GPU: the agent does not
retry it there; the operator withdraws it and places it afresh (elsewhere for a while)."""

STAYING_EVICTIONS = frozenset({"KeepAliveExpired"})
"""Evictions that are the deployment's own wish (idle past keepAlive): nothing to re-place.
Any other eviction of an assigned model is the operator's to re-place, not the agent's to
reload."""


class GPUNodeStatus(CamelModel):
    """Written only by the node's agent."""

    last_heartbeat_time: dt.datetime | None = None
    """When the agent last reported."""

    agent_version: str | None = None
    """The agent's version."""

    gpus: list[GPU] = Field(default_factory=list)
    """Every GPU and MIG instance on the node."""

    host_memory: HostMemory | None = None
    """Host RAM."""

    memory_pressure: MemoryPressure | None = None
    """Host memory pressure from /proc/pressure/memory."""

    backends: list[BackendHealth] = Field(default_factory=list)
    """The inference servers beside the agent."""

    models: list[ResidentModel] = Field(default_factory=list)
    """Every model resident or being loaded."""

    unavailable: list[str] = Field(default_factory=list)
    """Figures the agent could not read, each with the reason."""

    conditions: Conditions = Field(default_factory=list)
    """Ready, VRAMPressure and MemoryPressure."""

    gpu_count: NonNegative | None = None
    """Number of GPUs, for kubectl get."""

    free_vram: str | None = None
    """Free VRAM over all GPUs, for kubectl get."""

    model_count: NonNegative | None = None
    """Models loaded, for kubectl get."""

    memory_psi: str | None = None
    """PSI some avg10, for kubectl get."""


class GPUNode(CamelModel):
    """A GPU node as its agent measures it, and what the operator wants on it."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["vram.dev/v1alpha1"] = "vram.dev/v1alpha1"
    kind: Literal["GPUNode"] = "GPUNode"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: GPUNodeSpec = Field(default_factory=GPUNodeSpec)
    status: GPUNodeStatus | None = None
