"""GPU memory as the node measures it: NVML first, torch.cuda as the fallback, else no GPUs.

Every source implements `GPUSource`; the simulated GPU in `vram_operator.simulation` does too.
A source's `read()` never raises: a figure it cannot read is None (or the device is left out
when even its memory is unknown) and the reason goes into `GPUReading.unavailable`, so one
flaky sensor never silences the whole node.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vram_operator.api import GPU

log = logging.getLogger(__name__)

NO_GPU = "no GPU: neither NVML nor torch.cuda found"


@dataclass(frozen=True)
class GPUProcess:
    """A process holding memory on a GPU; the agent subtracts the ones it manages."""

    pid: int
    used_bytes: int | None
    """None where the driver does not say (Windows WDDM, some MIG set-ups)."""


@dataclass(frozen=True)
class GPUReading:
    """One look at every GPU on the node.

    `processes` maps a GPU (or MIG instance) UUID to its compute processes; a UUID with no key
    means the processes could not be listed, which is not the same as an empty list.
    `source` names what measured: "nvml", "torch", "none" or a simulated source's name.
    """

    gpus: list[GPU]
    processes: dict[str, list[GPUProcess]]
    source: str
    unavailable: list[str] = field(default_factory=list)


class GPUSource(Protocol):
    """What the agent needs from a GPU measurement: a reading now, and a way to let go."""

    def read(self) -> GPUReading:
        """Measure every GPU; never raises (failures go into `unavailable`)."""
        ...

    def close(self) -> None:
        """Release the library or driver handle; safe to call more than once."""
        ...


class NVMLSource:
    """GPUs through NVML (the `pynvml` module of nvidia-ml-py), keyed by UUID, MIG-aware.

    `nvml` is the module object, injectable so tests can pass a fake with the same functions.
    Construction calls nvmlInit and so raises `nvml.NVMLError` where there is no driver.

    MIG: on a GPU with MIG mode enabled each MIG instance is its own entry (uuid MIG-...,
    parent_uuid the physical GPU, index the physical GPU's) and the physical GPU itself is not
    listed. Its memory is the sum of its instances plus what is not partitioned, none of which a
    model can use outside an instance, so listing it as well would count the same bytes twice.
    Temperature is a property of the physical chip, so instances carry their parent's.

    Memory: memory info v2 where the driver has it, whose `used` leaves out the driver's own
    reserve (so total - used - free is that reserve); v1, which counts the reserve as used, on
    older drivers and bindings.
    """

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        # The unversioned process query raises this (not an NVMLError) on a binding/driver skew.
        mismatch = getattr(self._nvml, "NVMLLibraryMismatchError", self._nvml.NVMLError)
        self._errors: tuple[type[Exception], ...] = (self._nvml.NVMLError, mismatch)
        self._v1_fallback = (*self._errors, TypeError)
        self._nvml.nvmlInit()
        self._open = True

    def read(self) -> GPUReading:
        """Every GPU and MIG instance NVML sees, with what could not be read listed."""
        gpus: list[GPU] = []
        processes: dict[str, list[GPUProcess]] = {}
        unavailable: list[str] = []
        try:
            count = self._nvml.nvmlDeviceGetCount()
        except self._errors as err:
            unavailable.append(f"GPU count: {err}")
            count = 0
        for index in range(count):
            self._read_device(index, gpus, processes, unavailable)
        return GPUReading(gpus=gpus, processes=processes, source="nvml", unavailable=unavailable)

    def close(self) -> None:
        """Shut NVML down once; a failure to shut down is of no consequence, so it is logged."""
        if not self._open:
            return
        self._open = False
        try:
            self._nvml.nvmlShutdown()
        except self._errors as err:
            log.debug("nvmlShutdown failed: %s", err)

    def _read_device(
        self,
        index: int,
        gpus: list[GPU],
        processes: dict[str, list[GPUProcess]],
        unavailable: list[str],
    ) -> None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except self._errors as err:
            unavailable.append(f"GPU {index}: cannot be identified: {err}")
            return
        temperature = self._figure(
            f"{uuid} temperature",
            unavailable,
            nvml.nvmlDeviceGetTemperature,
            handle,
            nvml.NVML_TEMPERATURE_GPU,
        )
        instances = self._mig_instances(handle, uuid, unavailable)
        entries: list[tuple[Any, str, str | None]] = []
        if instances is None:
            entries.append((handle, uuid, None))
        else:
            for instance in instances:
                try:
                    entries.append((instance, _text(nvml.nvmlDeviceGetUUID(instance)), uuid))
                except self._errors as err:
                    unavailable.append(f"{uuid}: a MIG instance cannot be identified: {err}")
        for entry_handle, entry_uuid, parent_uuid in entries:
            gpu = self._gpu(index, entry_handle, entry_uuid, parent_uuid, temperature, unavailable)
            if gpu is None:
                continue
            gpus.append(gpu)
            listed = self._figure(
                f"{entry_uuid} processes",
                unavailable,
                nvml.nvmlDeviceGetComputeRunningProcesses,
                entry_handle,
            )
            if listed is not None:
                processes[entry_uuid] = [
                    GPUProcess(pid=p.pid, used_bytes=p.usedGpuMemory) for p in listed
                ]

    def _gpu(
        self,
        index: int,
        handle: Any,
        uuid: str,
        parent_uuid: str | None,
        temperature: int | None,
        unavailable: list[str],
    ) -> GPU | None:
        nvml = self._nvml
        try:
            memory = self._memory(handle)
        except self._errors as err:
            unavailable.append(f"{uuid}: left out, its memory cannot be read: {err}")
            return None
        name = self._figure(f"{uuid} name", unavailable, nvml.nvmlDeviceGetName, handle)
        rates = self._figure(
            f"{uuid} utilisation", unavailable, nvml.nvmlDeviceGetUtilizationRates, handle
        )
        utilisation = None if rates is None else rates.gpu
        if utilisation is not None and not 0 <= utilisation <= 100:
            unavailable.append(f"{uuid} utilisation: out of range: {utilisation}")
            utilisation = None
        return GPU(
            index=index,
            uuid=uuid,
            name="unknown" if name is None else _text(name),
            total_bytes=memory.total,
            used_bytes=memory.used,
            free_bytes=memory.free,
            temperature_celsius=temperature,
            utilization_percent=utilisation,
            parent_uuid=parent_uuid,
        )

    def _memory(self, handle: Any) -> Any:
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(handle, version=self._nvml.nvmlMemory_v2)
        except self._v1_fallback:
            # A driver without nvmlDeviceGetMemoryInfo_v2, or a binding without `version`.
            return self._nvml.nvmlDeviceGetMemoryInfo(handle)

    def _mig_instances(self, handle: Any, uuid: str, unavailable: list[str]) -> list[Any] | None:
        """The MIG instance handles of a MIG-enabled GPU; None where MIG is off or unsupported."""
        nvml = self._nvml
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except nvml.NVMLError_NotSupported:
            return None
        except self._errors as err:
            unavailable.append(f"{uuid} MIG mode: {err}; reported as a whole GPU")
            return None
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        instances: list[Any] = []
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
        except self._errors as err:
            slots = 0
            unavailable.append(f"{uuid} MIG instances: {err}")
        for slot in range(slots):
            try:
                instances.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot))
            except nvml.NVMLError_NotFound:
                continue  # an empty slot: fewer instances configured than the GPU allows
            except self._errors as err:
                unavailable.append(f"{uuid} MIG instance {slot}: {err}")
        if not instances:
            unavailable.append(f"{uuid}: MIG is enabled but no MIG instance can be used")
        return instances

    def _figure(
        self, what: str, unavailable: list[str], call: Callable[..., Any], *args: Any
    ) -> Any:
        try:
            return call(*args)
        except self._errors as err:
            unavailable.append(f"{what}: {err}")
            return None


def _text(value: str | bytes) -> str:
    """NVML strings: str from current bindings, bytes from older ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class TorchSource:
    """GPUs through torch.cuda (CUDA or ROCm) where NVML is missing: memory only.

    mem_get_info creates a CUDA context on each device on first use, which itself holds a few
    hundred MiB that then show up as used. Temperature, utilisation and processes are not
    visible through torch, and are reported as unavailable.
    """

    def __init__(self, torch: Any = None) -> None:
        self._torch = torch if torch is not None else importlib.import_module("torch")

    def read(self) -> GPUReading:
        """Memory of every device torch.cuda sees."""
        cuda = self._torch.cuda
        unavailable = ["GPU temperature, utilisation and processes: not visible without NVML"]
        gpus: list[GPU] = []
        try:
            count = cuda.device_count()
        except RuntimeError as err:
            unavailable.append(f"GPU count: {err}")
            count = 0
        for index in range(count):
            try:
                free, total = cuda.mem_get_info(index)
                properties = cuda.get_device_properties(index)
            except RuntimeError as err:
                unavailable.append(f"GPU {index}: left out, its memory cannot be read: {err}")
                continue
            gpus.append(
                GPU(
                    index=index,
                    uuid=self._uuid(index, properties),
                    name=properties.name,
                    total_bytes=total,
                    used_bytes=total - free,
                    free_bytes=free,
                )
            )
        return GPUReading(gpus=gpus, processes={}, source="torch", unavailable=unavailable)

    def close(self) -> None:
        """Nothing to release: torch keeps its CUDA contexts for the life of the process."""

    def _uuid(self, index: int, properties: Any) -> str:
        """The UUID as NVML spells it, so a GPU keeps its key whichever source measures it.

        torch prints CUDA UUIDs bare; NVML prefixes them with GPU-. torch does not say whether
        a device is a MIG instance, so one seen through torch alone is spelt GPU- as well.
        ROCm UUIDs are kept as they are; a build without device UUIDs falls back to the index.
        """
        raw = getattr(properties, "uuid", None)
        if raw is None:
            return f"torch-{index}"
        uuid = str(raw)
        if self._torch.version.hip or uuid.startswith(("GPU-", "MIG-")):
            return uuid
        return f"GPU-{uuid}"


class NoGPUSource:
    """A node without GPUs: a normal state, reported as such rather than as an error."""

    def __init__(self, reason: str = "") -> None:
        self._entry = f"{NO_GPU} ({reason})" if reason else NO_GPU

    def read(self) -> GPUReading:
        """No GPUs, and why."""
        return GPUReading(gpus=[], processes={}, source="none", unavailable=[self._entry])

    def close(self) -> None:
        """Nothing to release."""


def detect_gpu_source(nvml: Any = None, torch: Any = None) -> GPUSource:
    """NVML if its library loads, else torch.cuda if it sees a device, else no GPUs.

    `nvml` and `torch` are module objects for tests; by default the real modules are imported.
    """
    reasons: list[str] = []
    try:
        nvml_module = nvml if nvml is not None else importlib.import_module("pynvml")
    except ImportError:
        reasons.append("NVML: nvidia-ml-py is not installed")
    else:
        try:
            return NVMLSource(nvml_module)
        except nvml_module.NVMLError as err:
            reasons.append(f"NVML: {err}")
    try:
        torch_module = torch if torch is not None else importlib.import_module("torch")
    except (ImportError, OSError) as err:
        reasons.append(f"torch: cannot be imported: {err}")
    else:
        if torch_module.cuda.is_available():
            return TorchSource(torch_module)
        reasons.append("torch: torch.cuda.is_available() is false")
    return NoGPUSource("; ".join(reasons))
