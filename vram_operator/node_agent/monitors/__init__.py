"""What the agent measures on its node: GPUs (NVML, torch.cuda or none) and host memory."""

from .gpu import (
    NO_GPU,
    GPUProcess,
    GPUReading,
    GPUSource,
    NoGPUSource,
    NVMLSource,
    TorchSource,
    detect_gpu_source,
)
from .host import HostMonitor, HostReading, parse_meminfo, parse_psi

__all__ = [
    "NO_GPU",
    "GPUProcess",
    "GPUReading",
    "GPUSource",
    "HostMonitor",
    "HostReading",
    "NVMLSource",
    "NoGPUSource",
    "TorchSource",
    "detect_gpu_source",
    "parse_meminfo",
    "parse_psi",
]
