"""Diffusion models: spec.diffusers, family detection, the VRAM estimate, the download filter."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from vram_operator.api import Backend, SpecError, parse_spec
from vram_operator.api.budget import footprint_bytes
from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.diffusion.download import diffusers_files
from vram_operator.diffusion.estimate import (
    GUIDANCE_BATCH,
    UNET_LIVE_TENSORS,
    VAE_LIVE_TENSORS,
    component_files,
    estimate_pipeline,
    pipeline_sizes,
)
from vram_operator.diffusion.family import (
    Family,
    UnsupportedModel,
    detect,
    detect_folder,
)
from vram_operator.node_agent.estimate import OVERHEAD_BYTES
from vram_operator.simulation.fake_diffusion import FAMILIES, write_pipeline

pytestmark = pytest.mark.unit

GIB = 2**30


def _spec(**diffusers: Any) -> dict[str, Any]:
    return {"model": "stabilityai/sdxl-base", "backend": "diffusers", "diffusers": diffusers}


# --- spec.diffusers -------------------------------------------------------------------------


def test_spec_accepts_a_diffusers_deployment_with_defaults() -> None:
    spec = parse_spec({"model": "runwayml/sd-v1-5", "backend": "diffusers"})
    assert spec.backend is Backend.DIFFUSERS
    assert spec.diffusers is None
    full = parse_spec(_spec(dtype="bf16", scheduler="EulerDiscreteScheduler", vaeTiling=True))
    assert full.diffusers == DiffusersOptions(
        dtype="bf16", scheduler="EulerDiscreteScheduler", vae_tiling=True
    )


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (_spec(dtype="fp8"), "spec.diffusers.dtype", "fp16"),
        (_spec(scheduler="MagicScheduler"), "spec.diffusers.scheduler", "EulerDiscreteScheduler"),
        (_spec(resolution=1020), "spec.diffusers.resolution", "multiple of 8"),
        (_spec(resolution=32), "spec.diffusers.resolution", "64"),
        (_spec(cpuOffload=True), "spec.diffusers.cpuOffload", "not a known field"),
        (
            {"model": "Qwen/Qwen2.5-0.5B", "backend": "vllm", "diffusers": {}},
            "spec.diffusers",
            "only allowed with backend diffusers",
        ),
        (
            {"model": "not a path", "backend": "diffusers"},
            "spec.model",
            "",
        ),
        (
            {"model": "relative/../../x", "backend": "diffusers"},
            "spec.model",
            "diffusers pipeline",
        ),
    ],
)
def test_invalid_diffusers_specs_name_the_field(
    spec: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert caught.value.field == field
    assert words in caught.value.message


def test_options_travel_as_flags_and_back() -> None:
    options = DiffusersOptions(
        dtype="fp32",
        scheduler="DDIMScheduler",
        attention_slicing=True,
        vae_slicing=True,
        vae_tiling=True,
        resolution=768,
    )
    assert DiffusersOptions.from_args(options.as_args()) == options
    assert DiffusersOptions().as_args() == ["--dtype=fp16"]
    assert DiffusersOptions.from_args(["--max-model-len=5"]) == DiffusersOptions()


def test_a_diffusion_replica_takes_its_figure_on_any_gpu() -> None:
    assert footprint_bytes(Backend.DIFFUSERS, 7 * GIB, 80 * GIB) == 7 * GIB
    assert footprint_bytes(Backend.DIFFUSERS, 7 * GIB, 24 * GIB) == 7 * GIB


# --- family detection -----------------------------------------------------------------------


def _index(class_name: str) -> dict[str, Any]:
    return {
        "_class_name": class_name,
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
    }


@pytest.mark.parametrize(
    ("class_name", "dim", "family", "text_to_image"),
    [
        ("StableDiffusionPipeline", 768, Family.SD15, True),
        ("StableDiffusionPipeline", 1024, Family.SD2, True),
        ("StableDiffusionXLPipeline", 2048, Family.SDXL, True),
        ("StableDiffusionXLImg2ImgPipeline", 1280, Family.SDXL_REFINER, False),
    ],
)
def test_families_come_from_the_cross_attention_width(
    class_name: str, dim: int, family: Family, text_to_image: bool
) -> None:
    found = detect(_index(class_name), {"cross_attention_dim": dim, "sample_size": 64})
    assert found.family is family
    assert found.text_to_image is text_to_image
    assert not found.inpainting
    assert found.default_resolution == 512
    assert found.components == ("scheduler", "text_encoder", "unet", "vae")


def test_nine_input_channels_make_an_inpainting_variant() -> None:
    found = detect(
        _index("StableDiffusionInpaintPipeline"), {"cross_attention_dim": 768, "in_channels": 9}
    )
    assert found.family is Family.SD15
    assert found.inpainting
    assert not found.text_to_image
    assert found.pipeline_class == "StableDiffusionInpaintPipeline"
    assert found.default_resolution == 512  # no sample_size: the family's default


def test_refiner_runs_as_image_to_image() -> None:
    found = detect(_index("StableDiffusionXLImg2ImgPipeline"), {"cross_attention_dim": 1280})
    assert found.pipeline_class == "StableDiffusionXLImg2ImgPipeline"
    assert found.default_resolution == 1024
    assert "refiner" in found.describe()


@pytest.mark.parametrize(
    ("index", "unet", "words"),
    [
        (_index("FluxPipeline"), {"cross_attention_dim": 4096}, "FluxPipeline is not supported"),
        ({"unet": []}, {}, "no pipeline class"),
        (_index("StableDiffusionPipeline"), {"cross_attention_dim": 4096}, "4096"),
        (_index("StableDiffusionPipeline"), None, "unet/config.json"),
        (_index("StableDiffusionXLPipeline"), {"cross_attention_dim": 768}, "does not go with"),
        (
            _index("StableDiffusionPipeline"),
            {"cross_attention_dim": 768, "in_channels": 8},
            "8 input channels",
        ),
    ],
)
def test_unsupported_pipelines_list_what_is_supported(
    index: dict[str, Any], unet: dict[str, Any] | None, words: str
) -> None:
    with pytest.raises(UnsupportedModel) as caught:
        detect(index, unet)
    message = str(caught.value)
    assert words in message
    assert "supported: Stable Diffusion 1.x (UNet cross_attention_dim 768)" in message
    assert "SDXL refiner (1280)" in message


def test_a_folder_without_model_index_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "sd_xl_base_1.0.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModel, match=r"no model_index\.json"):
        detect_folder(tmp_path)
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(UnsupportedModel, match="not a JSON object"):
        detect_folder(tmp_path)


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("runwayml/stable-diffusion-v1-5", Family.SD15),
        ("stabilityai/stable-diffusion-2-1", Family.SD2),
        ("stabilityai/stable-diffusion-xl-base-1.0", Family.SDXL),
        ("stabilityai/stable-diffusion-xl-refiner-1.0", Family.SDXL_REFINER),
    ],
)
def test_fake_downloads_are_detected_as_their_family(
    tmp_path: Path, name: str, family: Family
) -> None:
    write_pipeline(tmp_path, name)
    assert detect_folder(tmp_path).family is family


# --- the estimate ---------------------------------------------------------------------------


def test_sd15_estimate_is_weights_at_dtype_plus_the_vae_peak(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "runwayml/stable-diffusion-v1-5")
    family = FAMILIES["sd15"]
    parameters = int(family["unet"]["params"]) + 83_653_863 + int(family["text_encoder"])
    estimate = estimate_pipeline(tmp_path)
    # At 512x512 the VAE decode (3 x 256 channels x 512^2, fp16) beats the UNet step
    # (2 x 64^2 tokens x 320 channels x 24 tensors).
    vae = VAE_LIVE_TENSORS * 256 * 512 * 512 * 2
    unet = GUIDANCE_BATCH * 64 * 64 * 320 * UNET_LIVE_TENSORS * 2
    assert vae > unet
    assert estimate.bytes == parameters * 2 + vae + OVERHEAD_BYTES
    assert estimate.method == "safetensors-header"
    assert estimate.parameters == parameters
    assert "Stable Diffusion 1.x" in estimate.detail
    assert "at fp16" in estimate.detail
    fp32 = estimate_pipeline(tmp_path, DiffusersOptions(dtype="fp32"))
    assert fp32.bytes == parameters * 4 + 2 * vae + OVERHEAD_BYTES


def test_sdxl_decodes_in_fp32_and_tiling_caps_the_vae_peak(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    at_2048 = pipeline_sizes(tmp_path, DiffusersOptions(resolution=2048))
    assert at_2048.activation == VAE_LIVE_TENSORS * 256 * 2048 * 2048 * 4  # force_upcast
    assert "fp32 (force_upcast)" in at_2048.activation_note
    tiled = pipeline_sizes(tmp_path, DiffusersOptions(resolution=2048, vae_tiling=True))
    # One 1024-pixel tile to decode instead of the whole 2048-pixel image.
    unet = GUIDANCE_BATCH * 256 * 256 * 320 * UNET_LIVE_TENSORS * 2
    assert tiled.activation == max(unet, VAE_LIVE_TENSORS * 256 * 1024 * 1024 * 4)
    assert tiled.activation < at_2048.activation
    # The VAE's weights count at fp32 too, the other components at fp16.
    vae_parameters = next(c.parameters for c in at_2048.components if c.name == "vae")
    others = at_2048.parameters - vae_parameters
    assert at_2048.weights == others * 2 + vae_parameters * 4
    assert {c.name for c in at_2048.components} == {"unet", "vae", "text_encoder", "text_encoder_2"}


def test_sdxl_base_at_1024_fits_what_people_run_it_in(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    estimate = estimate_pipeline(tmp_path)
    assert 8 * GIB < estimate.bytes < 12 * GIB


def _safetensors(path: Path, parameters: int, dtype: str = "F16") -> None:
    header = {"w": {"dtype": dtype, "shape": [parameters], "data_offsets": [0, 2 * parameters]}}
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_one_variant_of_each_component_is_counted(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "runwayml/stable-diffusion-v1-5")
    before = pipeline_sizes(tmp_path).parameters
    unet = tmp_path / "unet"
    _safetensors(unet / "diffusion_pytorch_model.fp16.safetensors", 859_520_964)
    assert pipeline_sizes(tmp_path).parameters == before
    assert component_files(unet) == [unet / "diffusion_pytorch_model.safetensors"]
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    assert component_files(unet) == [unet / "diffusion_pytorch_model.fp16.safetensors"]
    assert pipeline_sizes(tmp_path).parameters == before


def test_an_unreadable_header_falls_back_to_the_file_size(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "runwayml/stable-diffusion-v1-5")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"\xff" * 16)
    estimate = estimate_pipeline(tmp_path)
    assert estimate.method == "file-size"
    assert "header unreadable" in estimate.detail


def test_an_unsupported_folder_is_not_estimated(tmp_path: Path) -> None:
    write_pipeline(tmp_path, "black-forest-labs/flux-dev")
    with pytest.raises(UnsupportedModel, match="FluxPipeline"):
        estimate_pipeline(tmp_path)


# --- what a download fetches ----------------------------------------------------------------


def test_downloads_fetch_one_diffusers_weight_set_and_no_single_file_checkpoints() -> None:
    names = [
        "model_index.json",
        "README.md",
        "sd_xl_base_1.0.safetensors",
        "sd_xl_base_1.0_0.9vae.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
        "vae_decoder/model.onnx",
    ]
    assert diffusers_files(names) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
