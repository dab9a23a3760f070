"""The VRAM a diffusion pipeline needs, before loading it: weights + activation peak.

Weights: the parameters in the safetensors headers of each component (unet, vae, the text
encoders), read with the agent's header reader (`read_safetensors_header`: headers only, so a
7 GB SDXL folder costs milliseconds), at the dtype the pipeline is loaded in. Where a
component ships several variants (`diffusion_pytorch_model.safetensors` beside
`diffusion_pytorch_model.fp16.safetensors`) one set is counted.

Activation peak: one image at a time (the server generates a request's images one after
another), the larger of
- the UNet step: classifier-free guidance doubles the batch; the widest live set is at the
  first level, latent (side/8)^2 tokens x block_out_channels[0], about 24 such tensors
  (resnet and transformer intermediates, GEGLU, the skip connections kept for the up path);
  attention through PyTorch's SDPA holds no score matrix, but attention slicing does, one
  head's (tokens^2) at a time;
- the VAE decode: at the full side, the upsampled input of the last block (block_out_channels
  [1] channels, 256 in every SD VAE), its normalised copy and the convolution's output, about
  3 such tensors; with tiling, of one tile (the VAE's sample_size). A VAE with
  `force_upcast` (SDXL's) decodes in fp32 whatever the dtype, and holds fp32 weights then.
plus the fixed overhead of the other estimates (CUDA context, cuBLAS/cuDNN workspaces).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vram_operator.api import format_bytes
from vram_operator.api.diffusion import DTYPE_BYTES, DiffusersOptions
from vram_operator.node_agent.estimate import (
    OVERHEAD_BYTES,
    Estimate,
    from_file_size,
    read_safetensors_header,
)

from .family import Detected, UnsupportedModel, detect_folder, read_json

WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
"""The components with weights; tokenizers, schedulers and feature extractors hold none."""

UNET_LIVE_TENSORS = 24
VAE_LIVE_TENSORS = 3
GUIDANCE_BATCH = 2


@dataclass(frozen=True)
class ComponentWeights:
    name: str
    parameters: int
    files: int


def component_files(folder: Path) -> list[Path]:
    """One variant's safetensors files of a component folder: the plain one where present,
    else the first variant by name (fp16 before ...)."""
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(folder.glob("*.safetensors")):
        parts = path.name.split(".")
        groups[parts[-2] if len(parts) >= 3 else ""].append(path)
    if not groups:
        return []
    return groups[""] if "" in groups else groups[min(groups)]


def weights_of(folder: Path, detected: Detected) -> list[ComponentWeights]:
    """Parameters per weighted component. Raises ValueError for an unreadable header or a
    component without safetensors files."""
    found: list[ComponentWeights] = []
    for name in detected.components:
        if name not in WEIGHT_COMPONENTS:
            continue
        files = component_files(folder / name)
        if not files:
            raise ValueError(f"{name}/ holds no .safetensors files")
        parameters = sum(read_safetensors_header(path)[0] for path in files)
        found.append(ComponentWeights(name, parameters, len(files)))
    return found


def activation_bytes(
    detected: Detected,
    options: DiffusersOptions,
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
) -> tuple[int, str]:
    """The activation peak of one image at the resolution, and how it was sized."""
    side = options.resolution or detected.default_resolution
    element = DTYPE_BYTES[options.dtype]
    latent = side // 8
    tokens = latent * latent
    unet_channels = _first_int(unet_config.get("block_out_channels"), 320)
    batch = GUIDANCE_BATCH
    unet = batch * tokens * unet_channels * UNET_LIVE_TENSORS * element
    if options.attention_slicing:
        unet += batch * tokens * tokens * element
    vae_element = 4 if vae_config.get("force_upcast") and options.dtype != "fp32" else element
    tile = _positive_int(vae_config.get("sample_size"))
    decoded = min(side, tile) if options.vae_tiling and tile else side
    vae_channels = _nth_int(vae_config.get("block_out_channels"), 1, 256)
    vae = VAE_LIVE_TENSORS * vae_channels * decoded * decoded * vae_element
    if vae_element != element:
        note = f"VAE decode of {decoded}x{decoded} in fp32 (force_upcast)"
    else:
        note = f"VAE decode of {decoded}x{decoded}"
    if unet >= vae:
        return unet, f"UNet step at {side}x{side} with guidance {format_bytes(unet)}"
    return vae, f"{note} {format_bytes(vae)}"


@dataclass(frozen=True)
class PipelineSizes:
    """The parts of a pipeline's VRAM at one dtype and resolution."""

    detected: Detected
    components: list[ComponentWeights]
    weights: int
    activation: int
    activation_note: str
    overhead: int = OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activation + self.overhead

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)


def pipeline_sizes(folder: str | Path, options: DiffusersOptions | None = None) -> PipelineSizes:
    """Weights and activation peak of the pipeline in `folder`. Raises UnsupportedModel for a
    folder that holds no supported pipeline, ValueError for an unreadable header."""
    folder = Path(folder)
    options = options or DiffusersOptions()
    detected = detect_folder(folder)
    components = weights_of(folder, detected)
    unet_config = read_json(folder / "unet" / "config.json") or {}
    vae_config = read_json(folder / "vae" / "config.json") or {}
    element = DTYPE_BYTES[options.dtype]
    weights = 0
    for component in components:
        upcast = component.name == "vae" and vae_config.get("force_upcast")
        weights += component.parameters * (4 if upcast and options.dtype != "fp32" else element)
    activation, how = activation_bytes(detected, options, unet_config, vae_config)
    return PipelineSizes(detected, components, weights, activation, how)


def estimate_pipeline(folder: str | Path, options: DiffusersOptions | None = None) -> Estimate:
    """The VRAM of the pipeline in `folder` at `options`' dtype and resolution.

    Raises UnsupportedModel for a folder that holds no supported pipeline; falls back to the
    file size (x 1.2) when a header cannot be read.
    """
    options = options or DiffusersOptions()
    try:
        sizes = pipeline_sizes(folder, options)
    except UnsupportedModel:
        raise
    except ValueError as exc:
        return from_file_size(folder, f"header unreadable: {exc}")
    listed = ", ".join(f"{c.name} {_count(c.parameters)}" for c in sizes.components)
    detail = (
        f"{sizes.detected.describe()}: {_count(sizes.parameters)} parameters ({listed}) at "
        f"{options.dtype}: weights {format_bytes(sizes.weights)}, activation peak "
        f"{sizes.activation_note}, overhead {format_bytes(sizes.overhead)}"
    )
    return Estimate(
        bytes=sizes.total, method="safetensors-header", detail=detail, parameters=sizes.parameters
    )


def _positive_int(value: Any) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else None


def _first_int(value: Any, default: int) -> int:
    return _nth_int(value, 0, default)


def _nth_int(value: Any, index: int, default: int) -> int:
    if isinstance(value, list) and len(value) > index:
        return _positive_int(value[index]) or default
    return default


def _count(parameters: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if parameters >= scale:
            return f"{parameters / scale:.2f}".rstrip("0").rstrip(".") + suffix
    return str(parameters)
