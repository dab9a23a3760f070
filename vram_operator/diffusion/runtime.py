"""What the diffusion server asks of whatever runs the pipelines, and the PNG plumbing.

Two runtimes implement `Runtime`: `vram_operator.diffusion.torch_runtime` (diffusers on
PyTorch, the `diffusion` extra) and, behind `--simulate` only,
`vram_operator.simulation.fake_diffusion`, which charges the simulated GPU the way the real
one holds memory and renders deterministic PNGs. Every method blocks; the server runs them in
worker threads, one at a time per pipeline.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.node_agent.estimate import Estimate

from .family import Detected

StepCallback = Callable[[int, float], None]
"""Called after each denoising step with (step index, seconds it took)."""


class PipelineError(Exception):
    """A runtime failure with a message for the agent; `permanent` when retrying cannot help
    (out of memory on this GPU, an unsupported pipeline)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


@dataclass(frozen=True)
class PipelineSpec:
    """What to load: the folder, what it is, how, and where."""

    key: str
    model: str
    folder: Path
    detected: Detected
    options: DiffusersOptions
    estimate: Estimate
    device_index: int | None
    """The GPU as this container enumerates them (cuda:N); None runs on the CPU."""
    gpu_uuid: str | None = None


@dataclass(frozen=True)
class ImageJob:
    """One image to make: text-to-image, or image-to-image when `image` is set."""

    prompt: str
    width: int
    height: int
    steps: int
    seed: int
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    image: bytes | None = None
    """The input PNG (or any format the runtime reads) for image-to-image."""
    mask: bytes | None = None
    """For inpainting: white where the image is to be repainted."""
    strength: float = 0.3


class Handle(Protocol):
    """A loaded pipeline, as its runtime keeps it."""

    @property
    def held_bytes(self) -> int:
        """GPU memory the pipeline holds now (0 while parked)."""
        ...

    @property
    def host_bytes(self) -> int:
        """Host memory it takes while parked."""
        ...

    @property
    def peak_bytes(self) -> int:
        """The activation peak above `held_bytes` that one image needs: measured once an image
        was made, else the estimate's."""
        ...


class Runtime(Protocol):
    name: str

    def load(self, spec: PipelineSpec) -> Handle: ...

    def unload(self, handle: Handle) -> None: ...

    def park(self, handle: Handle) -> None:
        """Move the pipeline to host RAM, freeing its GPU memory."""
        ...

    def wake(self, handle: Handle) -> None: ...

    def generate(self, handle: Handle, job: ImageJob, on_step: StepCallback) -> bytes:
        """One image, as PNG bytes."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the runtime runs on, for /health."""
        ...


# --- PNG ------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rgb_rows: list[bytes]) -> bytes:
    """An 8-bit RGB PNG from `height` rows of `width * 3` bytes."""
    if len(rgb_rows) != height or any(len(row) != width * 3 for row in rgb_rows):
        raise ValueError(f"expected {height} rows of {width * 3} bytes")
    raw = b"".join(b"\x00" + row for row in rgb_rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG; ValueError when the bytes are not one."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)
