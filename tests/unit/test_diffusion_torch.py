"""The real runtime: tiny pipelines of all four families, built from configs with random
weights (no hub, no network), saved, detected, estimated, loaded with their own class by
the diffusion server's torch runtime and run for 2 steps at 64x64 on the CPU.

Needs the `diffusion` extra (torch, diffusers, transformers); skipped without it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.diffusion.estimate import estimate_pipeline, pipeline_sizes
from vram_operator.diffusion.family import Family, detect_folder
from vram_operator.diffusion.pipelines import PipelineManager, PipelineState
from vram_operator.diffusion.runtime import ImageJob, PipelineSpec, encode_png, png_size

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.unit,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

FP32 = DiffusersOptions(dtype="fp32")
_TIME_EMBED = 8
_PROJECTION = 32


def _tokenizer() -> Any:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for char in letters:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(hidden: int, projection: bool) -> Any:
    config = transformers.CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=64,
        projection_dim=_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _unet(cross: int, xl_time_ids: int | None, in_channels: int = 4) -> Any:
    extra: dict[str, Any] = {}
    if xl_time_ids is not None:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _TIME_EMBED,
            "projection_class_embeddings_input_dim": xl_time_ids * _TIME_EMBED + _PROJECTION,
            "use_linear_projection": True,
        }
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=cross,
        norm_num_groups=4,
        **extra,
    )


def _vae() -> Any:
    return diffusers.AutoencoderKL(
        block_out_channels=(4, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=2,
        sample_size=64,
    )


def _build(family: Family, folder: Path) -> None:
    torch.manual_seed(0)
    scheduler = diffusers.EulerDiscreteScheduler()
    if family in (Family.SD15, Family.SD2):
        hidden = 768 if family is Family.SD15 else 1024
        pipe = diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(hidden, projection=False),
            tokenizer=_tokenizer(),
            unet=_unet(hidden, None),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family is Family.SDXL:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_text_encoder(768, projection=False),
            text_encoder_2=_text_encoder(1280, projection=True),
            tokenizer=_tokenizer(),
            tokenizer_2=_tokenizer(),
            unet=_unet(2048, 6),
            scheduler=scheduler,
        )
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=_vae(),
            text_encoder=None,
            text_encoder_2=_text_encoder(1280, projection=True),
            tokenizer=None,
            tokenizer_2=_tokenizer(),
            unet=_unet(1280, 5),
            scheduler=scheduler,
            requires_aesthetics_score=True,
        )
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[Family, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    folders = {}
    for family in Family:
        folders[family] = root / family.value
        _build(family, folders[family])
    return folders


def _spec(family: Family, folder: Path, key: str = "k") -> PipelineSpec:
    detected = detect_folder(folder)
    return PipelineSpec(
        key=key,
        model=str(folder),
        folder=folder,
        detected=detected,
        options=FP32,
        estimate=estimate_pipeline(folder, FP32),
        device_index=None,
    )


@pytest.mark.parametrize("family", list(Family))
def test_saved_pipelines_are_detected_and_estimated(
    pipelines: dict[Family, Path], family: Family
) -> None:
    folder = pipelines[family]
    detected = detect_folder(folder)
    assert detected.family is family
    assert (
        detected.class_name == json.loads((folder / "model_index.json").read_text())["_class_name"]
    )
    sizes = pipeline_sizes(folder, FP32)
    cls = getattr(diffusers, detected.pipeline_class)
    loaded = cls.from_pretrained(str(folder), dtype=torch.float32)
    modules = [c for c in loaded.components.values() if isinstance(c, torch.nn.Module)]
    assert sizes.parameters == sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("family", list(Family))
def test_each_family_makes_an_image_of_the_size_asked(
    pipelines: dict[Family, Path], family: Family
) -> None:
    from vram_operator.diffusion.torch_runtime import TorchRuntime

    runtime = TorchRuntime(device="cpu")
    handle = runtime.load(_spec(family, pipelines[family]))
    assert handle.held_bytes > 0
    steps: list[int] = []
    job = ImageJob(prompt="a fox", width=64, height=48, steps=2, seed=3)
    if family is Family.SDXL_REFINER:
        source = ImageJob(prompt="x", width=64, height=48, steps=1, seed=1)
        base = runtime.load(_spec(Family.SD15, pipelines[Family.SD15], "base"))
        image = runtime.generate(base, source, lambda *_: None)
        job = ImageJob(
            prompt="a fox", width=64, height=48, steps=2, seed=3, image=image, strength=0.9
        )
    png = runtime.generate(handle, job, lambda step, _seconds: steps.append(step))
    assert png_size(png) == (64, 48)
    assert steps  # the step callback ran
    runtime.park(handle)
    assert handle.held_bytes == 0
    assert handle.host_bytes > 0
    runtime.wake(handle)
    assert handle.held_bytes > 0
    runtime.unload(handle)


def test_the_server_path_with_the_torch_runtime(
    pipelines: dict[Family, Path], tmp_path: Path
) -> None:
    from vram_operator.diffusion.torch_runtime import TorchRuntime

    async def scenario() -> None:
        manager = PipelineManager(TorchRuntime(device="cpu"), device="cpu", hub_cache=tmp_path)
        folder = str(pipelines[Family.SDXL])
        pipeline, created = manager.start("default.xl", folder, FP32, None, None)
        assert created
        assert pipeline.task is not None
        await pipeline.task
        assert pipeline.state is PipelineState.LOADED, pipeline.message
        assert pipeline.detected is not None
        assert pipeline.detected.family is Family.SDXL
        job = ImageJob(prompt="x", width=64, height=64, steps=2, seed=0)
        (png,) = await manager.images(pipeline, [job])
        assert png_size(png) == (64, 64)
        await manager.park("default.xl")
        assert pipeline.state is PipelineState.PARKED
        await manager.wake("default.xl")
        (again,) = await manager.images(pipeline, [job])
        assert again == png  # same seed, same weights: the same picture after a wake
        await manager.close()

    asyncio.run(scenario())


def test_an_inpainting_pipeline_repaints_under_its_mask(
    pipelines: dict[Family, Path], tmp_path: Path
) -> None:
    from vram_operator.diffusion.torch_runtime import TorchRuntime

    torch.manual_seed(0)
    diffusers.StableDiffusionInpaintPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(768, projection=False),
        tokenizer=_tokenizer(),
        unet=_unet(768, None, in_channels=9),
        scheduler=diffusers.EulerDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(tmp_path / "inpaint", safe_serialization=True)
    detected = detect_folder(tmp_path / "inpaint")
    assert (detected.family, detected.inpainting) == (Family.SD15, True)
    assert detected.pipeline_class == "StableDiffusionInpaintPipeline"
    runtime = TorchRuntime(device="cpu")
    base = runtime.load(_spec(Family.SD15, pipelines[Family.SD15], "base"))
    picture = runtime.generate(
        base, ImageJob(prompt="x", width=64, height=48, steps=1, seed=1), lambda *_: None
    )
    mask = encode_png(64, 48, [bytes([255 if x >= 32 else 0 for x in range(64 * 3)])] * 48)
    handle = runtime.load(_spec(Family.SD15, tmp_path / "inpaint", "inpaint"))
    job = ImageJob(prompt="a fox", width=64, height=48, steps=2, seed=3, image=picture, mask=mask)
    assert png_size(runtime.generate(handle, job, lambda *_: None)) == (64, 48)
