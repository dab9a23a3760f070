"""GPU sources: NVML through a fake pynvml module, the torch.cuda fallback, and no GPUs at all.

The fake NVML keeps the real binding's shape: same function signatures (checked against the
installed nvidia-ml-py below), the real NVMLError classes, the real ctypes structures for
memory and utilisation, and process entries built the way the binding builds them.
"""

import inspect
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from vram_operator.api import GPU
from vram_operator.node_agent.monitors import (
    NO_GPU,
    GPUProcess,
    GPUSource,
    NoGPUSource,
    NVMLSource,
    TorchSource,
    detect_gpu_source,
)

pytestmark = pytest.mark.unit

GiB = 2**30
MiB = 2**20
H100 = "GPU-5e0f6c4a-2f7e-7c54-9c3e-1b8d7f0a6e21"
L4 = "GPU-0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
A100 = "GPU-a100a100-0000-1111-2222-333344445555"
MIG_1 = "MIG-11111111-2222-5333-8444-555555555555"
MIG_2 = "MIG-66666666-7777-5888-9999-aaaaaaaaaaaa"
NOT_AVAILABLE = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value


def nvml_error(code: int) -> pynvml.NVMLError:
    """The exception the binding raises for an NVML return code (a per-code subclass)."""
    return pynvml.NVMLError(code)


@dataclass
class FakeDevice:
    """What one NVML handle (a GPU or a MIG instance) reports; None means NOT_SUPPORTED."""

    uuid: str | bytes
    name: str | bytes
    total: int
    used: int
    reserved: int = 0
    has_v2: bool = True
    temperature: int | None = 40
    utilisation: int | None = 10
    processes: list[tuple[int, int]] = field(default_factory=list)
    mig_mode: int | None = None
    mig_slots: list["FakeDevice | None"] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    """Function name → NVML error code it returns for this device."""

    @property
    def free(self) -> int:
        return self.total - self.reserved - self.used


class FakeNVML:
    """The subset of the pynvml module the NVML source calls, over FakeDevice handles."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, *devices: FakeDevice, init_error: int | None = None) -> None:
        self.devices = list(devices)
        self.init_error = init_error
        self.count_error: int | None = None
        self.shutdown_error: int | None = None
        self.shutdowns = 0

    def _check(self, device: FakeDevice, function: str) -> None:
        if function in device.failures:
            raise nvml_error(device.failures[function])

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise nvml_error(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1
        if self.shutdown_error is not None:
            raise nvml_error(self.shutdown_error)

    def nvmlDeviceGetCount(self) -> int:
        if self.count_error is not None:
            raise nvml_error(self.count_error)
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        device = self.devices[index]
        self._check(device, "nvmlDeviceGetHandleByIndex")
        return device

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str | bytes:
        self._check(handle, "nvmlDeviceGetUUID")
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> str | bytes:
        self._check(handle, "nvmlDeviceGetName")
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice, version: int | None = None) -> Any:
        self._check(handle, "nvmlDeviceGetMemoryInfo")
        if not version:
            # v1 has no reserve field: the driver's reserve is counted as used.
            return pynvml.c_nvmlMemory_t(
                total=handle.total, free=handle.free, used=handle.used + handle.reserved
            )
        if not handle.has_v2:
            raise nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return pynvml.c_nvmlMemory_v2_t(
            version=version,
            total=handle.total,
            reserved=handle.reserved,
            free=handle.free,
            used=handle.used,
        )

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        if handle.temperature is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return handle.temperature

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> Any:
        if handle.utilisation is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.c_nvmlUtilization_t(gpu=handle.utilisation, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[Any]:
        if "nvmlDeviceGetComputeRunningProcesses" in handle.failures:
            raise pynvml.NVMLLibraryMismatchError("Unversioned function called ...")
        listed = []
        for pid, used in handle.processes:
            info = pynvml.c_nvmlProcessInfo_v3_t(pid=pid, usedGpuMemory=used)
            entry = pynvml.nvmlStructToFriendlyObject(info)
            if entry.usedGpuMemory == NOT_AVAILABLE:
                entry.usedGpuMemory = None
            listed.append(entry)
        return listed

    def nvmlDeviceGetMigMode(self, device: FakeDevice) -> list[int]:
        self._check(device, "nvmlDeviceGetMigMode")
        if device.mig_mode is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [device.mig_mode, device.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, device: FakeDevice) -> int:
        self._check(device, "nvmlDeviceGetMaxMigDeviceCount")
        return len(device.mig_slots)

    def nvmlDeviceGetMigDeviceHandleByIndex(self, device: FakeDevice, index: int) -> FakeDevice:
        self._check(device, "nvmlDeviceGetMigDeviceHandleByIndex")
        instance = device.mig_slots[index]
        if instance is None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        return instance


def h100(**changes: Any) -> FakeDevice:
    values: dict[str, Any] = {
        "uuid": H100,
        "name": "NVIDIA H100 80GB HBM3",
        "total": 80 * GiB,
        "used": 20 * GiB,
        "reserved": 512 * MiB,
        "temperature": 45,
        "utilisation": 87,
        "processes": [(4242, 18 * GiB), (5151, 2 * GiB)],
        "mig_mode": pynvml.NVML_DEVICE_MIG_DISABLE,
    }
    return FakeDevice(**(values | changes))


def l4(**changes: Any) -> FakeDevice:
    values: dict[str, Any] = {
        "uuid": L4,
        "name": "NVIDIA L4",
        "total": 24 * GiB,
        "used": 1 * GiB,
        "reserved": 256 * MiB,
        "temperature": 38,
        "utilisation": 0,
    }
    return FakeDevice(**(values | changes))


def a100_with_mig() -> FakeDevice:
    """An A100 in MIG mode with two instances configured out of its seven slots."""
    first = FakeDevice(
        uuid=MIG_1,
        name="NVIDIA A100-SXM4-40GB MIG 3g.20gb",
        total=20 * GiB,
        used=4 * GiB,
        temperature=None,
        utilisation=None,
        processes=[(777, NOT_AVAILABLE)],
    )
    second = FakeDevice(
        uuid=MIG_2,
        name="NVIDIA A100-SXM4-40GB MIG 2g.10gb",
        total=10 * GiB,
        used=0,
        temperature=None,
        utilisation=None,
    )
    return FakeDevice(
        uuid=A100,
        name="NVIDIA A100-SXM4-40GB",
        total=40 * GiB,
        used=4 * GiB,
        temperature=51,
        utilisation=None,
        mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE,
        mig_slots=[first, None, second, None, None, None, None],
    )


FAKE_FUNCTIONS = [
    name for name, value in vars(FakeNVML).items() if name.startswith("nvml") and callable(value)
]


@pytest.mark.parametrize("name", FAKE_FUNCTIONS)
def test_fake_nvml_has_the_real_signatures(name: str) -> None:
    real = inspect.signature(getattr(pynvml, name))
    fake = inspect.signature(getattr(FakeNVML(), name))

    assert [(p.name, p.default) for p in fake.parameters.values()] == [
        (p.name, p.default) for p in real.parameters.values()
    ]


def test_two_gpus_are_measured_by_uuid() -> None:
    nvml = FakeNVML(h100(), l4())

    reading = NVMLSource(nvml).read()

    assert reading.source == "nvml"
    assert reading.unavailable == []
    assert reading.gpus == [
        GPU(
            index=0,
            uuid=H100,
            name="NVIDIA H100 80GB HBM3",
            total_bytes=80 * GiB,
            used_bytes=20 * GiB,
            free_bytes=80 * GiB - 20 * GiB - 512 * MiB,
            temperature_celsius=45,
            utilization_percent=87,
        ),
        GPU(
            index=1,
            uuid=L4,
            name="NVIDIA L4",
            total_bytes=24 * GiB,
            used_bytes=1 * GiB,
            free_bytes=24 * GiB - 1 * GiB - 256 * MiB,
            temperature_celsius=38,
            utilization_percent=0,
        ),
    ]
    assert reading.processes == {
        H100: [GPUProcess(pid=4242, used_bytes=18 * GiB), GPUProcess(pid=5151, used_bytes=2 * GiB)],
        L4: [],
    }


def test_driver_without_memory_v2_falls_back_to_v1() -> None:
    """v1 counts the driver's reserve as used, so used is higher but free is the same."""
    reading = NVMLSource(FakeNVML(h100(has_v2=False))).read()

    (gpu,) = reading.gpus
    assert gpu.used_bytes == 20 * GiB + 512 * MiB
    assert gpu.free_bytes == 80 * GiB - 20 * GiB - 512 * MiB
    assert gpu.total_bytes == 80 * GiB
    assert reading.unavailable == []


def test_binding_without_version_argument_falls_back_to_v1() -> None:
    class OldBinding(FakeNVML):
        def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> Any:  # type: ignore[override]
            return super().nvmlDeviceGetMemoryInfo(handle)

    (gpu,) = NVMLSource(OldBinding(h100())).read().gpus

    assert gpu.used_bytes == 20 * GiB + 512 * MiB


def test_old_binding_bytes_are_decoded() -> None:
    (gpu,) = NVMLSource(FakeNVML(l4(uuid=L4.encode(), name=b"NVIDIA L4"))).read().gpus

    assert gpu.uuid == L4
    assert gpu.name == "NVIDIA L4"


def test_unsupported_figures_are_none_with_a_reason() -> None:
    reading = NVMLSource(FakeNVML(l4(temperature=None, utilisation=None))).read()

    (gpu,) = reading.gpus
    assert gpu.temperature_celsius is None
    assert gpu.utilization_percent is None
    assert gpu.free_bytes == 24 * GiB - 1 * GiB - 256 * MiB
    assert reading.unavailable == [
        f"{L4} temperature: Not Supported",
        f"{L4} utilisation: Not Supported",
    ]


def test_utilisation_out_of_range_is_not_reported() -> None:
    reading = NVMLSource(FakeNVML(l4(utilisation=250))).read()

    assert reading.gpus[0].utilization_percent is None
    assert reading.unavailable == [f"{L4} utilisation: out of range: 250"]


def test_unreadable_name_keeps_the_gpu() -> None:
    failing = {"nvmlDeviceGetName": pynvml.NVML_ERROR_UNKNOWN}

    reading = NVMLSource(FakeNVML(l4(failures=failing))).read()

    assert reading.gpus[0].name == "unknown"
    assert reading.gpus[0].free_bytes > 0
    assert reading.unavailable == [f"{L4} name: Unknown Error"]


def test_mig_instances_are_their_own_gpus_and_the_parent_is_not_counted_twice() -> None:
    reading = NVMLSource(FakeNVML(h100(), a100_with_mig())).read()

    assert [gpu.uuid for gpu in reading.gpus] == [H100, MIG_1, MIG_2]
    first, second = reading.gpus[1:]
    assert first == GPU(
        index=1,
        uuid=MIG_1,
        name="NVIDIA A100-SXM4-40GB MIG 3g.20gb",
        total_bytes=20 * GiB,
        used_bytes=4 * GiB,
        free_bytes=16 * GiB,
        temperature_celsius=51,
        parent_uuid=A100,
    )
    assert second.parent_uuid == A100
    assert second.index == 1
    assert (second.total_bytes, second.free_bytes) == (10 * GiB, 10 * GiB)
    assert sum(gpu.total_bytes for gpu in reading.gpus if gpu.parent_uuid == A100) == 30 * GiB
    assert reading.processes[MIG_1] == [GPUProcess(pid=777, used_bytes=None)]
    assert reading.processes[MIG_2] == []
    assert A100 not in reading.processes
    assert reading.unavailable == [
        f"{MIG_1} utilisation: Not Supported",
        f"{MIG_2} utilisation: Not Supported",
    ]


def test_mig_enabled_without_instances_lists_nothing_and_says_so() -> None:
    empty = a100_with_mig()
    empty.mig_slots = [None] * 7

    reading = NVMLSource(FakeNVML(empty)).read()

    assert reading.gpus == []
    assert reading.unavailable == [f"{A100}: MIG is enabled but no MIG instance can be used"]


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        (
            "nvmlDeviceGetMaxMigDeviceCount",
            [f"{A100} MIG instances: Unknown Error"],
        ),
        (
            "nvmlDeviceGetMigDeviceHandleByIndex",
            [f"{A100} MIG instance {slot}: Unknown Error" for slot in range(7)],
        ),
    ],
)
def test_mig_instance_lookup_failures_are_reported(failing: str, expected: list[str]) -> None:
    device = a100_with_mig()
    device.failures[failing] = pynvml.NVML_ERROR_UNKNOWN

    reading = NVMLSource(FakeNVML(device)).read()

    assert reading.gpus == []
    assert reading.unavailable == [
        *expected,
        f"{A100}: MIG is enabled but no MIG instance can be used",
    ]


def test_unidentifiable_mig_instance_is_left_out() -> None:
    device = a100_with_mig()
    first = device.mig_slots[0]
    assert first is not None
    first.failures["nvmlDeviceGetUUID"] = pynvml.NVML_ERROR_GPU_IS_LOST

    reading = NVMLSource(FakeNVML(device)).read()

    assert [gpu.uuid for gpu in reading.gpus] == [MIG_2]
    assert reading.unavailable[0] == f"{A100}: a MIG instance cannot be identified: GPU is lost"


def test_mig_mode_unreadable_reports_the_whole_gpu() -> None:
    device = h100(failures={"nvmlDeviceGetMigMode": pynvml.NVML_ERROR_NO_PERMISSION})

    reading = NVMLSource(FakeNVML(device)).read()

    assert [gpu.uuid for gpu in reading.gpus] == [H100]
    assert reading.unavailable == [
        f"{H100} MIG mode: Insufficient Permissions; reported as a whole GPU"
    ]


def test_a_lost_gpu_does_not_hide_the_others() -> None:
    lost = h100(failures={"nvmlDeviceGetHandleByIndex": pynvml.NVML_ERROR_GPU_IS_LOST})
    no_memory = h100(uuid=H100.replace("5e", "77"))
    no_memory.failures["nvmlDeviceGetMemoryInfo"] = pynvml.NVML_ERROR_UNKNOWN

    reading = NVMLSource(FakeNVML(lost, no_memory, l4())).read()

    assert [gpu.uuid for gpu in reading.gpus] == [L4]
    assert reading.gpus[0].index == 2
    assert reading.unavailable == [
        "GPU 0: cannot be identified: GPU is lost",
        f"{no_memory.uuid!s}: left out, its memory cannot be read: Unknown Error",
    ]
    assert list(reading.processes) == [L4]


def test_unlistable_processes_are_absent_not_empty() -> None:
    failing = {"nvmlDeviceGetComputeRunningProcesses": pynvml.NVML_ERROR_FUNCTION_NOT_FOUND}

    reading = NVMLSource(FakeNVML(l4(failures=failing))).read()

    assert reading.gpus[0].uuid == L4
    assert reading.processes == {}
    assert reading.unavailable == [f"{L4} processes: Unversioned function called ..."]


def test_count_failure_reports_no_gpus() -> None:
    nvml = FakeNVML(h100())
    nvml.count_error = pynvml.NVML_ERROR_UNINITIALIZED

    reading = NVMLSource(nvml).read()

    assert reading.gpus == []
    assert reading.unavailable == ["GPU count: Uninitialized"]


def test_close_shuts_nvml_down_once() -> None:
    nvml = FakeNVML(l4())
    nvml.shutdown_error = pynvml.NVML_ERROR_UNINITIALIZED
    source = NVMLSource(nvml)

    source.close()
    source.close()

    assert nvml.shutdowns == 1


def test_default_module_is_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(l4()))

    assert [gpu.uuid for gpu in NVMLSource().read().gpus] == [L4]


@dataclass
class FakeProperties:
    name: str
    total_memory: int
    uuid: str


class FakeCuda:
    """torch.cuda's device queries over (free, total, properties) per device."""

    def __init__(self, devices: list[tuple[int, int, Any]], available: bool = True) -> None:
        self.devices = devices
        self.available = available
        self.failures: dict[int, RuntimeError] = {}

    def is_available(self) -> bool:
        return self.available

    def device_count(self) -> int:
        return len(self.devices)

    def mem_get_info(self, device: int) -> tuple[int, int]:
        if device in self.failures:
            raise self.failures[device]
        free, total, _ = self.devices[device]
        return free, total

    def get_device_properties(self, device: int) -> Any:
        return self.devices[device][2]


def fake_torch(
    devices: list[tuple[int, int, Any]], available: bool = True, hip: str | None = None
) -> SimpleNamespace:
    return SimpleNamespace(cuda=FakeCuda(devices, available), version=SimpleNamespace(hip=hip))


TORCH_UUID = "5e0f6c4a-2f7e-7c54-9c3e-1b8d7f0a6e21"
TORCH_H100 = (60 * GiB, 80 * GiB, FakeProperties("NVIDIA H100 80GB HBM3", 80 * GiB, TORCH_UUID))


def test_torch_measures_memory_and_spells_uuids_as_nvml() -> None:
    no_uuid = SimpleNamespace(name="NVIDIA L4", total_memory=24 * GiB)
    torch = fake_torch([TORCH_H100, (20 * GiB, 24 * GiB, no_uuid)])

    reading = TorchSource(torch).read()

    assert reading.source == "torch"
    assert reading.processes == {}
    assert reading.gpus == [
        GPU(
            index=0,
            uuid=H100,
            name="NVIDIA H100 80GB HBM3",
            total_bytes=80 * GiB,
            used_bytes=20 * GiB,
            free_bytes=60 * GiB,
        ),
        GPU(
            index=1,
            uuid="torch-1",
            name="NVIDIA L4",
            total_bytes=24 * GiB,
            used_bytes=4 * GiB,
            free_bytes=20 * GiB,
        ),
    ]
    assert reading.unavailable == [
        "GPU temperature, utilisation and processes: not visible without NVML"
    ]


def test_torch_on_rocm_keeps_its_uuid() -> None:
    rocm = (1 * GiB, 64 * GiB, FakeProperties("AMD Instinct MI210", 64 * GiB, "58ff7e5c1f3a"))

    (gpu,) = TorchSource(fake_torch([rocm], hip="6.2")).read().gpus

    assert gpu.uuid == "58ff7e5c1f3a"


def test_torch_device_that_fails_is_left_out() -> None:
    torch = fake_torch([TORCH_H100, TORCH_H100])
    torch.cuda.failures[0] = RuntimeError("CUDA error: all CUDA-capable devices are busy")

    reading = TorchSource(torch).read()

    assert [gpu.index for gpu in reading.gpus] == [1]
    assert reading.unavailable[1:] == [
        "GPU 0: left out, its memory cannot be read: CUDA error: all CUDA-capable devices are busy"
    ]


def test_torch_count_failure_reports_no_gpus() -> None:
    torch = fake_torch([TORCH_H100])

    def broken_count() -> int:
        raise RuntimeError("CUDA driver initialization failed")

    torch.cuda.device_count = broken_count

    reading = TorchSource(torch).read()

    assert reading.gpus == []
    assert reading.unavailable[1:] == ["GPU count: CUDA driver initialization failed"]


def test_no_gpu_is_a_normal_reading() -> None:
    source: GPUSource = NoGPUSource()

    reading = source.read()
    source.close()

    assert (reading.gpus, reading.processes, reading.source) == ([], {}, "none")
    assert reading.unavailable == [NO_GPU]


def test_detect_prefers_nvml() -> None:
    nvml = FakeNVML(l4())

    source = detect_gpu_source(nvml=nvml, torch=fake_torch([TORCH_H100]))

    assert isinstance(source, NVMLSource)
    assert source.read().gpus[0].uuid == L4
    source.close()
    assert nvml.shutdowns == 1


def test_detect_falls_through_to_torch_when_nvml_does_not_start() -> None:
    nvml = FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    source = detect_gpu_source(nvml=nvml, torch=fake_torch([TORCH_H100]))

    assert isinstance(source, TorchSource)
    assert [gpu.uuid for gpu in source.read().gpus] == [H100]
    source.close()


def test_detect_falls_through_to_none_without_cuda() -> None:
    nvml = FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    source = detect_gpu_source(nvml=nvml, torch=fake_torch([], available=False))

    assert isinstance(source, NoGPUSource)
    assert source.read().unavailable == [
        f"{NO_GPU} (NVML: Driver Not Loaded; torch: torch.cuda.is_available() is false)"
    ]


def test_detect_without_either_module_reports_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "torch", None)

    reading = detect_gpu_source().read()

    assert reading.source == "none"
    assert reading.gpus == []
    (entry,) = reading.unavailable
    assert entry.startswith(f"{NO_GPU} (NVML: nvidia-ml-py is not installed; torch: cannot be")


def test_detect_imports_the_real_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(init_error=pynvml.NVML_ERROR_UNKNOWN))
    monkeypatch.setitem(sys.modules, "torch", fake_torch([TORCH_H100]))

    source = detect_gpu_source()

    assert isinstance(source, TorchSource)
    assert TorchSource().read().gpus == source.read().gpus
