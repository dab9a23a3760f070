"""ModelDeployment: what a user wants loaded, and what the operator says happened."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, Literal, Self

from pydantic import ConfigDict, Field, Strict, ValidationError, model_validator

from .common import (
    Backend,
    CamelModel,
    Conditions,
    Duration,
    ModelState,
    Priority,
    Quantity,
)
from .diffusion import DiffusersOptions
from .quantity import parse_duration, parse_positive_bytes

KIND = "ModelDeployment"
PLURAL = "modeldeployments"

# Flags the vLLM supervisor sets itself from the placement; a user value would fight it.
SUPERVISOR_OWNED_VLLM_FLAGS = (
    "--port",
    "--host",
    "--gpu-memory-utilization",
    "--enable-sleep-mode",
)


def vllm_flag(arg: str) -> str | None:
    """The flag an argument sets as vLLM 0.11.0 reads it, or None for a value.

    vLLM's FlexibleArgumentParser (vllm/utils/__init__.py, `parse_args`) turns `_` into `-`
    in a long flag's name, and argparse then accepts any unambiguous prefix of a flag; a
    single dash followed by a letter is a short option (`-O3`, `-tp`).
    """
    if arg.startswith("--"):
        return "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    if len(arg) > 1 and arg[0] == "-" and not (arg[1].isdigit() or arg[1] == "."):
        return arg.split("=", 1)[0]
    return None


def supervisor_owned(arg: str) -> str | None:
    """The supervisor's own flag that `arg` would set in vLLM (by any spelling vLLM accepts:
    `_` for `-`, an abbreviation, a `--no-` form), else None."""
    flag = vllm_flag(arg)
    if flag is None or not flag.startswith("--") or len(flag) <= 2:
        return None
    name = flag[5:] if flag.startswith("--no-") else flag[2:]
    return next((o for o in SUPERVISOR_OWNED_VLLM_FLAGS if o[2:].startswith(name)), None)


def owned_message(arg: str, owned: str) -> str:
    """`--port is set by the supervisor`, saying how vLLM reads another spelling."""
    given = arg.split("=", 1)[0]
    read = "" if given == owned else f" (vLLM reads it as {owned})"
    return f"{given}{read} is set by the supervisor"


_OLLAMA_REF = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._/-]*(:[a-zA-Z0-9._-]+)?$")
_VLLM_REF = re.compile(r"^(/[^\s]+|[a-zA-Z0-9][a-zA-Z0-9._-]*/[a-zA-Z0-9][a-zA-Z0-9._-]*)$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


class SpecError(ValueError):
    """An invalid spec: `field` is the dotted path, `message` says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


MAX_ARGS = 64
MAX_ARG_LENGTH = 1024
MAX_ARGS_BYTES = 8192
MAX_OPTIONS = 64
MAX_OPTIONS_BYTES = 8192
"""Sizes that keep a spec far below kopf's annotation and a GPUNode, which carries the
assignments of every model on the node, below etcd's 1.5 MB object limit."""


class VLLMOptions(CamelModel):
    """Options passed to `vllm serve` for this model."""

    model_config = ConfigDict(extra="forbid")

    args: Annotated[
        list[Annotated[str, Field(max_length=MAX_ARG_LENGTH)]], Field(max_length=MAX_ARGS)
    ] = Field(default_factory=list)
    """Extra `vllm serve` arguments, such as `--max-model-len=4096`. The supervisor sets
    --port, --host, --gpu-memory-utilization and --enable-sleep-mode itself."""

    sleep_mode: bool = True
    """Allow parking the model in host RAM (vLLM sleep level 1) instead of unloading it."""

    @model_validator(mode="after")
    def _check_size(self) -> Self:
        size = sum(len(arg) for arg in self.args)
        if size > MAX_ARGS_BYTES:
            raise SpecError(
                "spec.vllm.args", f"is {size} characters in all; at most {MAX_ARGS_BYTES}"
            )
        return self


class OllamaOptions(CamelModel):
    """Options passed to Ollama when loading this model."""

    model_config = ConfigDict(extra="forbid")

    options: Annotated[dict[str, Any], Field(max_length=MAX_OPTIONS)] = Field(default_factory=dict)
    """Ollama model options (`num_ctx`, `num_gpu`, ...), passed as `options` to /api/generate."""

    @model_validator(mode="after")
    def _check_size(self) -> Self:
        size = len(json.dumps(self.options, separators=(",", ":")))
        if size > MAX_OPTIONS_BYTES:
            raise SpecError(
                "spec.ollama.options",
                f"is {size} bytes as JSON; at most {MAX_OPTIONS_BYTES} are allowed",
            )
        return self


class Toleration(CamelModel):
    """Allows placement on nodes whose taints it matches, as a Pod toleration does."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    """The taint key; empty with operator Exists matches every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""

    value: str | None = None
    """The taint value to match when operator is Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to match; empty matches every effect."""


class Autoscaling(CamelModel):
    """Replicas that follow the requests the gateway sees, between minReplicas and maxReplicas.

    The operator keeps its choice in status.desiredReplicas and places that many; spec.replicas
    is left as written and not used while this is set (see `vram_operator.operator.autoscaling`
    for why), so do not point an HPA or KEDA at a model that has it.
    """

    model_config = ConfigDict(extra="forbid")

    min_replicas: Annotated[int, Strict(), Field(ge=0, le=64)] = 1
    """The fewest replicas kept. 0: unloaded once idle for scaleDownDelay; the next request
    waits at the gateway while one is placed and loaded."""

    max_replicas: Annotated[int, Strict(), Field(ge=1, le=64)] = 1
    """The most replicas demand may ask for."""

    target_in_flight: Annotated[int, Strict(), Field(ge=1, le=100000)] = 4
    """Requests running or waiting per replica that the operator aims for: demand
    ceil((inFlight + waiting) / targetInFlight) replicas."""

    scale_down_delay: Duration = "5m"
    """How long demand must stay lower before replicas are withdrawn (the largest count asked
    for within this window is kept, as an HPA's stabilization window), and how long after its
    last request a model scales to zero."""

    @model_validator(mode="after")
    def _check_bounds(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise SpecError(
                "spec.autoscaling.minReplicas",
                f"{self.min_replicas} is above maxReplicas ({self.max_replicas})",
            )
        return self

    @property
    def scale_down_delay_seconds(self) -> float:
        return parse_duration(self.scale_down_delay)


class ModelDeploymentSpec(CamelModel):
    """A model to keep resident in GPU memory on `replicas` nodes."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^\S+$")]
    """The backend's reference: `llama3.2:1b` for Ollama; `Qwen/Qwen2.5-0.5B-Instruct` or an
    absolute path for vLLM."""

    backend: Backend
    """The inference server that holds the model: ollama, vllm or diffusers."""

    priority: Priority = Priority.NORMAL
    """critical, high, normal or low. critical is never evicted; higher priorities displace
    lower ones when memory runs out."""

    replicas: Annotated[int, Strict(), Field(ge=0, le=64)] = 1
    """How many GPUs, on distinct nodes, keep the model loaded. 0 keeps the object but unloads.
    The scale subresource's spec.replicas (kubectl scale, HPA, KEDA); not used while
    `autoscaling` is set."""

    autoscaling: Autoscaling | None = None
    """Let the gateway's demand set the replica count (optional)."""

    vram: Quantity | None = None
    """GPU memory the model needs (6Gi, 6.5Gi, 500M). When absent it is estimated from the
    model's metadata and the status says how."""

    keep_alive: Duration | None = None
    """Idle time after which the model may be unloaded (30m, 1h). Absent: kept while it fits."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels that a node must carry to hold this model."""

    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints of nodes this model may be placed on."""

    vllm: VLLMOptions | None = None
    """vLLM options; only with backend vllm."""

    ollama: OllamaOptions | None = None
    """Ollama options; only with backend ollama."""

    diffusers: DiffusersOptions | None = None
    """Diffusion pipeline options (dtype, scheduler, memory savers); only with backend
    diffusers."""

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Self:
        _check_model_ref(self.backend, self.model)
        if self.vllm is not None and self.backend is not Backend.VLLM:
            raise SpecError("spec.vllm", f"only allowed with backend vllm, not {self.backend}")
        if self.ollama is not None and self.backend is not Backend.OLLAMA:
            raise SpecError("spec.ollama", f"only allowed with backend ollama, not {self.backend}")
        if self.diffusers is not None and self.backend is not Backend.DIFFUSERS:
            raise SpecError(
                "spec.diffusers", f"only allowed with backend diffusers, not {self.backend}"
            )
        if self.vllm is not None:
            for index, arg in enumerate(self.vllm.args):
                owned = supervisor_owned(arg)
                if owned is not None:
                    raise SpecError(
                        f"spec.vllm.args[{index}]",
                        f"{owned_message(arg, owned)} from the placement; remove it "
                        "(use spec.vram to size the model)",
                    )
        for key, value in self.node_selector.items():
            if not _LABEL_KEY.match(key) or len(key) > 316:
                raise SpecError(
                    f"spec.nodeSelector.{key}",
                    "not a valid label key; use [prefix/]name with alphanumerics, '-', '_', '.'",
                )
            if not _LABEL_VALUE.match(value):
                raise SpecError(
                    f"spec.nodeSelector.{key}",
                    f"{value!r} is not a valid label value; use at most 63 alphanumerics, "
                    "'-', '_' or '.', starting and ending with an alphanumeric",
                )
        for index, toleration in enumerate(self.tolerations):
            if toleration.operator == "Exists" and toleration.value:
                raise SpecError(
                    f"spec.tolerations[{index}].value", "must be empty when operator is Exists"
                )
            if toleration.operator == "Equal" and not toleration.key:
                raise SpecError(
                    f"spec.tolerations[{index}].key", "is required when operator is Equal"
                )
        return self

    @property
    def vram_bytes(self) -> int | None:
        """The requested VRAM in bytes, or None when it is to be estimated."""
        return None if self.vram is None else parse_positive_bytes(self.vram)

    @property
    def keep_alive_seconds(self) -> float | None:
        return None if self.keep_alive is None else parse_duration(self.keep_alive)


def _check_model_ref(backend: Backend, model: str) -> None:
    if backend is Backend.OLLAMA and not _OLLAMA_REF.match(model):
        raise SpecError(
            "spec.model",
            f"{model!r} is not an Ollama model reference; use name[:tag], e.g. llama3.2:1b",
        )
    if backend is Backend.OLLAMA:
        return
    if model.startswith("/") and ".." in model.split("/"):
        raise SpecError("spec.model", f"{model!r} climbs out of a folder ('..'); write it plainly")
    if backend is Backend.VLLM and not _VLLM_REF.match(model):
        raise SpecError(
            "spec.model",
            f"{model!r} is not a vLLM model; use a Hugging Face id such as "
            "Qwen/Qwen2.5-0.5B-Instruct or an absolute path",
        )
    if backend is Backend.DIFFUSERS and not _VLLM_REF.match(model):
        raise SpecError(
            "spec.model",
            f"{model!r} is not a diffusers pipeline; use a Hugging Face id such as "
            "stabilityai/stable-diffusion-xl-base-1.0 or an absolute path to its folder",
        )


Tier = Literal["GPU", "HostRAM", "Disk"]
"""Where a replica's weights are: the residency tiers."""


class Placement(CamelModel):
    """One replica: where it is and how it is doing."""

    node: str
    """The node (and GPUNode) holding this replica."""

    gpu_uuid: str | None = None
    """The GPU's UUID as NVML reports it."""

    state: ModelState
    """Pending, Loading, Loaded, Sleeping, Unloading, Evicted or Failed."""

    vram_bytes: Annotated[int, Field(ge=0)] | None = None
    """GPU memory this replica holds, measured by the agent once loaded."""

    progress: Annotated[int, Field(ge=0, le=100)] | None = None
    """Download and load progress in percent."""

    last_error: str | None = None
    """The backend's message from the last failure."""

    load_seconds: Annotated[float, Field(ge=0)] | None = None
    """How long the last load took, as the agent measured it (a cold start, or a wake-up)."""

    tier: Tier | None = None
    """Where the replica is: on the GPU (loading, loaded, unloading), parked in host RAM
    (Sleeping), or on disk only (pending, evicted, failed)."""


class ModelDeploymentStatus(CamelModel):
    """Written only by the operator."""

    observed_generation: int | None = None
    """The spec generation this status describes."""

    conditions: Conditions = Field(default_factory=list)
    """Scheduled, Loaded and Ready, in the KEP-1623 shape."""

    ready_replicas: Annotated[int, Field(ge=0)] = 0
    """Replicas loaded and serving."""

    replicas: Annotated[int, Field(ge=0)] | None = None
    """Replicas assigned to nodes now: the scale subresource's status.replicas."""

    desired_replicas: Annotated[int, Field(ge=0)] | None = None
    """The replicas placement works towards: spec.replicas, or what autoscaling chose."""

    selector: str | None = None
    """A label selector naming this deployment, for the scale subresource (HPA requires one;
    no Pod carries it, so scale on object or external metrics)."""

    last_scale_time: dt.datetime | None = None
    """When autoscaling last changed desiredReplicas."""

    ready: str | None = None
    """readyReplicas/desiredReplicas, for kubectl get."""

    tiers: str | None = None
    """Each replica's tier (GPU, HostRAM, Disk), for kubectl get."""

    vram: str | None = None
    """The VRAM one replica needs (requested or estimated), for kubectl get."""

    vram_bytes: Annotated[int, Field(ge=0)] | None = None
    """The VRAM one replica needs, in bytes."""

    vram_source: str | None = None
    """How vramBytes was found: spec, measured, ollama-show, gguf-header, safetensors-header
    or file-size."""

    placements: list[Placement] = Field(default_factory=list)
    """One entry per replica placed."""


class ModelDeployment(CamelModel):
    """A model kept resident in GPU memory across the cluster."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["vram.dev/v1alpha1"] = "vram.dev/v1alpha1"
    kind: Literal["ModelDeployment"] = "ModelDeployment"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None


def parse_spec(spec: Any) -> ModelDeploymentSpec:
    """Validate a spec dict as stored by the API server; raise SpecError naming the field."""
    if not isinstance(spec, dict):
        raise SpecError("spec", f"must be an object, got {type(spec).__name__}")
    try:
        return ModelDeploymentSpec.model_validate(spec)
    except SpecError:
        raise
    except ValidationError as exc:
        raise spec_error_from(exc, prefix="spec") from None


def spec_error_from(exc: ValidationError, prefix: str) -> SpecError:
    """Turn pydantic's first error into a SpecError with a dotted camelCase path."""
    error = exc.errors()[0]
    ctx = error.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, SpecError):
        return inner
    path = prefix
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    message = str(inner) if isinstance(inner, ValueError) else error["msg"]
    if error["type"] == "missing":
        message = "is required"
    elif error["type"] == "extra_forbidden":
        message = "is not a known field; remove it or check its spelling"
    elif error["type"] == "enum":
        message = f"{error.get('input')!r} is not allowed; expected {ctx.get('expected')}"
    return SpecError(path, message)
