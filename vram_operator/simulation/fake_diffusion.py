"""Fake diffusion pipelines for `vram-operator diffusion-server --simulate STATE_FILE`.

`FakeRuntime` stands in for diffusers on PyTorch and charges the simulated GPU as a real
pipeline holds memory: on load, its weights at the chosen dtype plus the fixed overhead
(from the same safetensors-header figures the estimate reads, `pipeline_sizes`), owned by
`pid:<server pid>:diffusion:<key>`; while an image is made, the activation peak on top
(owner `...:activation`), freed when it is done; parked, nothing on the GPU. Memory that
does not fit fails the way CUDA does (out of memory). Images are deterministic PNGs of the
requested size: the same prompt, seed and model give the same bytes.

`python -m vram_operator.simulation.fake_diffusion download MODEL` stands in for the download
command: it leaves a diffusers folder in the Hugging Face cache with real configs and
safetensors *headers* that declare full-size weights (no data), so detection and the estimate
run on them as on a real download. The family comes from the name: `...refiner...` SDXL
refiner, `...xl...` SDXL base, `...-2...` SD2.x, otherwise SD1.5; `...inpaint...` the
inpainting variant; `...flux...` a FluxPipeline (unsupported); `missing/...` fails as a
repository that does not exist. VRAM_SIM_DIFFUSION_DOWNLOAD_SECONDS slows the download,
VRAM_SIM_DIFFUSION_STEP_SECONDS each denoising step (default 0.002).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vram_operator.diffusion.estimate import pipeline_sizes
from vram_operator.diffusion.runtime import (
    ImageJob,
    PipelineError,
    PipelineSpec,
    StepCallback,
    encode_png,
    png_size,
)

from .fake_hf_download import hub_cache
from .gpu import SimulatedGPUs, SimulatedOutOfMemory

OWNER_PREFIX = "diffusion"


@dataclass
class FakeHandle:
    key: str
    gpu: str | int
    owner: str
    weights_bytes: int
    activation_bytes: int
    parked: bool = False
    measured_peak: int | None = None

    @property
    def held_bytes(self) -> int:
        return 0 if self.parked else self.weights_bytes

    @property
    def host_bytes(self) -> int:
        return self.weights_bytes if self.parked else 0

    @property
    def peak_bytes(self) -> int:
        return self.measured_peak if self.measured_peak is not None else self.activation_bytes


class FakeRuntime:
    """Pipelines that only hold simulated GPU memory and draw deterministic pictures."""

    name = "simulated"

    def __init__(self, gpu_state: str | os.PathLike[str], pid: int | None = None) -> None:
        self.gpus = SimulatedGPUs(gpu_state)
        self.pid = os.getpid() if pid is None else pid
        self._lock = threading.Lock()
        # A real GPU frees a dead process's memory: free what an earlier server left.
        self.gpus.release(f"pid:*:{OWNER_PREFIX}:*")

    def load(self, spec: PipelineSpec) -> FakeHandle:
        try:
            sizes = pipeline_sizes(spec.folder, spec.options)
        except ValueError as err:
            raise PipelineError(str(err), permanent=True) from None
        gpu: str | int = spec.gpu_uuid or (spec.device_index or 0)
        owner = f"pid:{self.pid}:{OWNER_PREFIX}:{spec.key}"
        handle = FakeHandle(
            key=spec.key,
            gpu=gpu,
            owner=owner,
            weights_bytes=sizes.weights + sizes.overhead,
            activation_bytes=sizes.activation,
        )
        self._allocate(handle, handle.owner, handle.weights_bytes)
        return handle

    def _allocate(self, handle: FakeHandle, owner: str, nbytes: int) -> None:
        try:
            self.gpus.set_allocation(handle.gpu, owner, nbytes)
        except SimulatedOutOfMemory as err:
            raise PipelineError(str(err), permanent=True) from None

    def unload(self, handle: Any) -> None:
        self.gpus.release(glob.escape(handle.owner))
        self.gpus.release(glob.escape(handle.owner + ":activation"))

    def park(self, handle: Any) -> None:
        self.gpus.set_allocation(handle.gpu, handle.owner, 0)
        handle.parked = True

    def wake(self, handle: Any) -> None:
        self._allocate(handle, handle.owner, handle.weights_bytes)
        handle.parked = False

    def generate(self, handle: Any, job: ImageJob, on_step: StepCallback) -> bytes:
        activation = handle.owner + ":activation"
        # The peak grows with the image's area; sized for the pipeline's resolution.
        self._allocate(handle, activation, handle.activation_bytes)
        try:
            step_seconds = float(os.environ.get("VRAM_SIM_DIFFUSION_STEP_SECONDS", "0.002"))
            for step in range(job.steps):
                started = time.monotonic()
                time.sleep(step_seconds)
                on_step(step, time.monotonic() - started)
            source = b""
            if job.image is not None:
                try:
                    png_size(job.image)
                except ValueError:
                    raise PipelineError("image is not a PNG", permanent=False) from None
                source = hashlib.sha256(job.image).digest()
            return render(handle.key, job, source)
        finally:
            self.gpus.set_allocation(handle.gpu, activation, 0)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "gpuState": str(self.gpus.path)}


def render(key: str, job: ImageJob, source: bytes = b"") -> bytes:
    """A deterministic gradient picture; its colours come from the request's hash."""
    digest = hashlib.sha256(
        f"{key}\0{job.prompt}\0{job.seed}\0{job.width}x{job.height}".encode() + source
    ).digest()
    red, green, blue = digest[0], digest[1], digest[2]
    columns = bytes((red + x * 256 // job.width) % 256 for x in range(job.width))
    rows = []
    for y in range(job.height):
        shade = (green + y * 256 // job.height) % 256
        row = bytearray(job.width * 3)
        row[0::3] = columns
        row[1::3] = bytes([shade]) * job.width
        row[2::3] = bytes([blue]) * job.width
        rows.append(bytes(row))
    return encode_png(job.width, job.height, rows)


# --- download ---------------------------------------------------------------------------------

_CLIP_L = 123_060_480
_OPENCLIP_H = 340_387_840
_OPENCLIP_G = 694_659_840
_VAE = 83_653_863

FAMILIES: dict[str, dict[str, Any]] = {
    "sd15": {
        "class": "StableDiffusionPipeline",
        "unet": {"cross_attention_dim": 768, "sample_size": 64, "params": 859_520_964},
        "text_encoder": _CLIP_L,
        "vae_sample_size": 512,
    },
    "sd2": {
        "class": "StableDiffusionPipeline",
        "unet": {"cross_attention_dim": 1024, "sample_size": 96, "params": 865_910_724},
        "text_encoder": _OPENCLIP_H,
        "vae_sample_size": 768,
    },
    "sdxl": {
        "class": "StableDiffusionXLPipeline",
        "unet": {"cross_attention_dim": 2048, "sample_size": 128, "params": 2_567_463_684},
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPENCLIP_G,
        "vae_sample_size": 1024,
        "force_upcast": True,
    },
    "sdxl-refiner": {
        "class": "StableDiffusionXLImg2ImgPipeline",
        "unet": {"cross_attention_dim": 1280, "sample_size": 128, "params": 2_300_000_000},
        "text_encoder_2": _OPENCLIP_G,
        "vae_sample_size": 1024,
        "force_upcast": True,
    },
}


def family_of(model: str) -> str:
    name = model.lower()
    if "refiner" in name:
        return "sdxl-refiner"
    if "xl" in name:
        return "sdxl"
    if "-2" in name:
        return "sd2"
    return "sd15"


def _header_only(path: Path, parameters: int) -> None:
    """A safetensors file whose header declares `parameters` F16 weights; no data follows."""
    header = {
        "__metadata__": {"format": "pt"},
        "weight": {"dtype": "F16", "shape": [parameters], "data_offsets": [0, 2 * parameters]},
    }
    raw = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def write_pipeline(folder: Path, model: str) -> None:
    """A diffusers folder of the family the name implies (see the module docstring)."""
    family = FAMILIES[family_of(model)]
    inpaint = "inpaint" in model.lower()
    class_name = str(family["class"])
    if inpaint:
        class_name = class_name.replace("Img2Img", "").replace("Pipeline", "InpaintPipeline")
    if "flux" in model.lower():
        class_name = "FluxPipeline"
    index: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    unet = family["unet"]
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    index["vae"] = ["diffusers", "AutoencoderKL"]
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "UNet2DConditionModel",
                "cross_attention_dim": unet["cross_attention_dim"],
                "in_channels": 9 if inpaint else 4,
                "sample_size": unet["sample_size"],
                "block_out_channels": [320, 640, 1280, 1280][
                    : 3 if "xl" in class_name.lower() else 4
                ],
            }
        )
    )
    _header_only(folder / "unet" / "diffusion_pytorch_model.safetensors", int(unet["params"]))
    (folder / "vae").mkdir(exist_ok=True)
    (folder / "vae" / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "AutoencoderKL",
                "block_out_channels": [128, 256, 512, 512],
                "sample_size": family["vae_sample_size"],
                "force_upcast": bool(family.get("force_upcast", False)),
            }
        )
    )
    _header_only(folder / "vae" / "diffusion_pytorch_model.safetensors", _VAE)
    for name in ("text_encoder", "text_encoder_2"):
        if name in family:
            index[name] = ["transformers", "CLIPTextModel"]
            index[name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
            (folder / name).mkdir(exist_ok=True)
            (folder / name / "config.json").write_text(json.dumps({"model_type": "clip"}))
            _header_only(folder / name / "model.safetensors", int(family[name]))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def download(model: str, environment: Mapping[str, str] | None = None) -> int:
    """Leave `model` in the Hugging Face cache's layout, printing progress lines as the real
    download command does; 1 for a model under `missing/`."""
    environment = os.environ if environment is None else environment
    if model.startswith("missing/"):
        print(
            "huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. "
            f"Repository Not Found for url: https://huggingface.co/api/models/{model}",
            file=sys.stderr,
        )
        return 1
    revision = hashlib.sha1(model.encode()).hexdigest()
    repo = hub_cache(environment) / ("models--" + model.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    write_pipeline(snapshot, model)
    total = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file())
    seconds = float(environment.get("VRAM_SIM_DIFFUSION_DOWNLOAD_SECONDS", "0"))
    steps = 4
    for step in range(steps):
        print(
            json.dumps({"completedBytes": total * step // steps, "totalBytes": total}), flush=True
        )
        time.sleep(seconds / steps)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    print(json.dumps({"completedBytes": total, "totalBytes": total}), flush=True)
    print(json.dumps({"path": str(snapshot)}), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "download":
        print(
            "usage: python -m vram_operator.simulation.fake_diffusion download MODEL",
            file=sys.stderr,
        )
        return 2
    return download(args[1])


if __name__ == "__main__":
    sys.exit(main())
