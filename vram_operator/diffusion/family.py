"""Which Stable Diffusion family a pipeline folder holds, from its configs alone.

`model_index.json` names the pipeline class (`_class_name`) and its components; the UNet's
`config.json` tells the families apart by the width of the text embedding it attends to
(`cross_attention_dim`): 768 is SD1.x (CLIP ViT-L), 1024 SD2.x (OpenCLIP ViT-H), 2048 SDXL
base (both text encoders concatenated) and 1280 the SDXL refiner (OpenCLIP ViT-bigG alone).
Nine input channels (`in_channels`: 4 latent + 4 masked-image latent + 1 mask) make an
inpainting variant. Anything else is refused, with the list of what is supported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class Family(StrEnum):
    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Family.SD15: "Stable Diffusion 1.x",
    Family.SD2: "Stable Diffusion 2.x",
    Family.SDXL: "Stable Diffusion XL base",
    Family.SDXL_REFINER: "Stable Diffusion XL refiner",
}

CROSS_ATTENTION_DIMS = {
    768: Family.SD15,
    1024: Family.SD2,
    2048: Family.SDXL,
    1280: Family.SDXL_REFINER,
}

DEFAULT_RESOLUTION = {
    Family.SD15: 512,
    Family.SD2: 768,
    Family.SDXL: 1024,
    Family.SDXL_REFINER: 1024,
}
"""The side the family was trained at, used when the UNet config gives no sample_size."""

INPAINT_IN_CHANNELS = 9

# The pipeline classes of each family: text-to-image, image-to-image, inpainting.
_SD_CLASSES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
)
_SDXL_CLASSES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)
PIPELINE_CLASSES: dict[Family, tuple[str, str, str]] = {
    Family.SD15: _SD_CLASSES,
    Family.SD2: _SD_CLASSES,
    Family.SDXL: _SDXL_CLASSES,
    Family.SDXL_REFINER: _SDXL_CLASSES,
}
SUPPORTED_CLASSES = frozenset(_SD_CLASSES + _SDXL_CLASSES)

SUPPORTED = (
    "Stable Diffusion 1.x (UNet cross_attention_dim 768), Stable Diffusion 2.x (1024), "
    "SDXL base (2048) and SDXL refiner (1280), each also as inpainting (in_channels 9), "
    "as diffusers folders whose model_index.json names one of "
    + ", ".join(sorted(SUPPORTED_CLASSES))
)


class UnsupportedModel(ValueError):
    """A pipeline this server cannot hold; the message lists what it can."""


@dataclass(frozen=True)
class Detected:
    """What a pipeline folder holds."""

    family: Family
    inpainting: bool
    class_name: str
    """`_class_name` in model_index.json."""
    components: tuple[str, ...]
    """The component folders model_index.json lists (unet, vae, text_encoder, ...)."""
    default_resolution: int
    """The image side the UNet was trained at: sample_size x 8 (the VAE's scale)."""

    @property
    def text_to_image(self) -> bool:
        """Whether it makes images from a prompt alone; a refiner only reworks images."""
        return self.family is not Family.SDXL_REFINER and not self.inpainting

    @property
    def pipeline_class(self) -> str:
        """The diffusers class that runs it for its main task."""
        text, image, inpaint = PIPELINE_CLASSES[self.family]
        if self.inpainting:
            return inpaint
        return image if self.family is Family.SDXL_REFINER else text

    @property
    def image_to_image_class(self) -> str:
        """The diffusers class for the edits endpoint (inpainting keeps its own)."""
        _, image, inpaint = PIPELINE_CLASSES[self.family]
        return inpaint if self.inpainting else image

    def describe(self) -> str:
        variant = " inpainting" if self.inpainting else ""
        return f"{self.family.label}{variant} ({self.class_name})"


def detect(model_index: Mapping[str, Any], unet_config: Mapping[str, Any] | None) -> Detected:
    """The family of a pipeline from its model_index.json and unet/config.json.

    Raises UnsupportedModel naming what was found and listing what is supported.
    """
    class_name = model_index.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise UnsupportedModel(
            f"model_index.json names no pipeline class (_class_name); supported: {SUPPORTED}"
        )
    if class_name not in SUPPORTED_CLASSES:
        raise UnsupportedModel(f"{class_name} is not supported; supported: {SUPPORTED}")
    if unet_config is None:
        raise UnsupportedModel(f"{class_name} without a unet/config.json; supported: {SUPPORTED}")
    dim = unet_config.get("cross_attention_dim")
    if isinstance(dim, list) and dim and all(d == dim[0] for d in dim):
        dim = dim[0]
    family = CROSS_ATTENTION_DIMS.get(dim) if isinstance(dim, int) else None
    if family is None:
        raise UnsupportedModel(
            f"{class_name} with a UNet cross_attention_dim of {dim!r} is not supported; "
            f"supported: {SUPPORTED}"
        )
    is_xl_class = class_name in _SDXL_CLASSES
    if is_xl_class != (family in (Family.SDXL, Family.SDXL_REFINER)):
        raise UnsupportedModel(
            f"{class_name} does not go with a UNet cross_attention_dim of {dim} "
            f"({family.label}); supported: {SUPPORTED}"
        )
    in_channels = unet_config.get("in_channels", 4)
    if in_channels not in (4, INPAINT_IN_CHANNELS):
        raise UnsupportedModel(
            f"a UNet with {in_channels!r} input channels is not supported (4, or 9 for "
            f"inpainting); supported: {SUPPORTED}"
        )
    sample_size = unet_config.get("sample_size")
    resolution = (
        sample_size * 8
        if isinstance(sample_size, int) and not isinstance(sample_size, bool) and sample_size > 0
        else DEFAULT_RESOLUTION[family]
    )
    components = tuple(
        sorted(
            name
            for name, value in model_index.items()
            if not name.startswith("_")
            and isinstance(value, list)
            and len(value) == 2
            and value[0] is not None
        )
    )
    return Detected(
        family=family,
        inpainting=in_channels == INPAINT_IN_CHANNELS,
        class_name=class_name,
        components=components,
        default_resolution=resolution,
    )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file; None when the file is absent. Raises UnsupportedModel for
    a file that is not a JSON object."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{path.parent.name}/{path.name} is unreadable: {exc}") from None
    if not isinstance(value, dict):
        raise UnsupportedModel(f"{path.parent.name}/{path.name} is not a JSON object")
    return value


def detect_folder(folder: str | Path) -> Detected:
    """The family of the diffusers pipeline in `folder`."""
    folder = Path(folder)
    model_index = read_json(folder / "model_index.json")
    if model_index is None:
        raise UnsupportedModel(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder "
            f"(single-file checkpoints are not read); supported: {SUPPORTED}"
        )
    return detect(model_index, read_json(folder / "unet" / "config.json"))
