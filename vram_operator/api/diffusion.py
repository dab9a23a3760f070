"""`spec.diffusers`: how the diffusion server holds a Stable Diffusion pipeline.

The options travel to the agent inside the GPUNode assignment, and from the agent to its
backend as flags (`as_args`, read back by `from_args`), so that the backend interface keeps
one place for backend arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, Strict, model_validator

from .common import CamelModel

DiffusionDType = Literal["fp16", "bf16", "fp32"]

DTYPE_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp32": 4}
"""Bytes per parameter and per activation element at each dtype."""

SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
"""diffusers scheduler classes every SD1.5, SD2.x and SDXL pipeline can swap in
(`Scheduler.from_config(pipeline.scheduler.config)`)."""

SchedulerName = Literal[
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
]

MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096


class DiffusersOptions(CamelModel):
    """How the diffusion server loads and runs this pipeline."""

    model_config = ConfigDict(extra="forbid")

    dtype: DiffusionDType = "fp16"
    """Weights and activations: fp16, bf16 or fp32 (fp32 doubles the VRAM)."""

    scheduler: SchedulerName | None = None
    """A diffusers scheduler class to use instead of the pipeline's own, e.g.
    DPMSolverMultistepScheduler."""

    attention_slicing: bool = False
    """Compute attention in slices: a lower activation peak, slower steps."""

    vae_slicing: bool = False
    """Decode a batch of images one at a time."""

    vae_tiling: bool = False
    """Decode large images in tiles: the VAE's activation peak stays that of one tile."""

    resolution: Annotated[int, Strict(), Field(ge=MIN_RESOLUTION, le=MAX_RESOLUTION)] | None = None
    """The largest image side requests may ask for, in pixels (a multiple of 8); the VRAM
    estimate sizes the activation peak for it. Absent: the family's default (512 for SD1.5,
    768 for SD2.x, 1024 for SDXL)."""

    @model_validator(mode="after")
    def _check_resolution(self) -> Self:
        if self.resolution is not None and self.resolution % 8:
            from .modeldeployment import SpecError

            raise SpecError(
                "spec.diffusers.resolution",
                f"{self.resolution} is not a multiple of 8; the VAE works in 8-pixel blocks",
            )
        return self

    def as_args(self) -> list[str]:
        """The options as flags, the form backend arguments take (`LoadRequest.args`)."""
        args = [f"--dtype={self.dtype}"]
        if self.scheduler:
            args.append(f"--scheduler={self.scheduler}")
        if self.resolution is not None:
            args.append(f"--resolution={self.resolution}")
        args.extend(
            f"--{flag}"
            for flag, on in (
                ("attention-slicing", self.attention_slicing),
                ("vae-slicing", self.vae_slicing),
                ("vae-tiling", self.vae_tiling),
            )
            if on
        )
        return args

    @classmethod
    def from_args(cls, args: Sequence[str]) -> DiffusersOptions:
        """Read `as_args` back; unknown flags are ignored. Raises ValueError for bad values."""
        values: dict[str, object] = {}
        for arg in args:
            flag, _, value = arg.partition("=")
            name = flag.removeprefix("--").replace("-", "_")
            if name in ("dtype", "scheduler"):
                values[name] = value
            elif name == "resolution":
                values[name] = int(value)
            elif name in ("attention_slicing", "vae_slicing", "vae_tiling"):
                values[name] = True
        return cls.model_validate(values)
