"""The GPU source over a simulated node (`gpu.SimulatedGPUs`): the `GPUSource` protocol of the
agent's monitors, read by the agent, the vLLM supervisor and the diffusion server when told to
simulate GPUs."""

from __future__ import annotations

import os

from vram_operator.api import GPU
from vram_operator.node_agent.monitors.gpu import GPUProcess, GPUReading

from .gpu import SOURCE_NAME, SimulatedDevice, SimulatedGPUs, pid_of


def as_gpu(device: SimulatedDevice) -> GPU:
    """The device as the agent's API model reports a GPU."""
    return GPU(
        index=device.index,
        uuid=device.uuid,
        name=device.name,
        total_bytes=device.total_bytes,
        used_bytes=device.used_bytes,
        free_bytes=device.free_bytes,
        temperature_celsius=device.temperature_celsius,
    )


class SimulatedGPUSource:
    """The agent's GPU source over a simulated node: the `GPUSource` protocol of the monitors.

    Chosen only by an explicit agent option; never detected.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._gpus = SimulatedGPUs(path)

    def read(self) -> GPUReading:
        """The GPUs and their owners as processes; an unreadable state file means no GPUs."""
        try:
            devices = self._gpus.devices()
        except (OSError, ValueError) as err:
            return GPUReading(
                gpus=[], processes={}, source=SOURCE_NAME, unavailable=[f"simulated GPUs: {err}"]
            )
        return GPUReading(
            gpus=[as_gpu(device) for device in devices],
            processes={
                device.uuid: [
                    GPUProcess(pid=pid_of(owner), used_bytes=held)
                    for owner, held in sorted(device.allocations.items())
                ]
                for device in devices
            },
            source=SOURCE_NAME,
        )

    def close(self) -> None:
        """Nothing is held between reads."""
