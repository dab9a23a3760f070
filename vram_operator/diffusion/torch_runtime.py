"""diffusers on PyTorch: the diffusion server's real runtime (the `diffusion` extra).

Each pipeline is loaded with its family's own class (`Detected.pipeline_class`) from the local
folder, at the chosen dtype (`dtype=`, diffusers 0.42's spelling), without a safety checker,
with the scheduler and memory savers the spec asks for, and moved to `cuda:N`. What it holds
is what PyTorch's allocator holds for its parameters and buffers; its activation peak is
measured with `torch.cuda.max_memory_allocated` around each image (the estimate's until
then). Parking moves it to host RAM (`pipeline.to("cpu")`) and empties the allocator's cache;
waking moves it back.

torch and diffusers are imported when the runtime is built, so the package imports without
them; on a CPU build of PyTorch (`--device cpu`) the CUDA calls are never made.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import threading
import time
from dataclasses import dataclass
from typing import Any

from .runtime import ImageJob, PipelineError, PipelineSpec, StepCallback

_TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass
class TorchHandle:
    pipeline: Any
    device: str
    spec: PipelineSpec
    weights_bytes: int
    estimated_peak: int
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
        return self.measured_peak if self.measured_peak is not None else self.estimated_peak


def module_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's torch modules."""
    total = 0
    for component in pipeline.components.values():
        parameters = getattr(component, "parameters", None)
        buffers = getattr(component, "buffers", None)
        if not callable(parameters) or not callable(buffers):
            continue
        for tensor in (*parameters(), *buffers()):
            total += tensor.numel() * tensor.element_size()
    return total


class TorchRuntime:
    name = "diffusers"

    def __init__(self, device: str = "cuda") -> None:
        self.torch: Any = importlib.import_module("torch")
        self.diffusers: Any = importlib.import_module("diffusers")
        self.device = device
        self._cuda_lock = threading.Lock()
        """max_memory_allocated is per device, not per pipeline: measure one image at a time."""

    def _device(self, spec: PipelineSpec) -> str:
        if self.device == "cpu" or spec.device_index is None:
            return "cpu"
        return f"cuda:{spec.device_index}"

    def load(self, spec: PipelineSpec) -> TorchHandle:
        torch, diffusers = self.torch, self.diffusers
        options = spec.options
        cls = getattr(diffusers, spec.detected.pipeline_class)
        dtype = getattr(torch, _TORCH_DTYPES[options.dtype])
        extra: dict[str, Any] = {}
        if spec.detected.family.value in ("sd15", "sd2"):
            extra = {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipeline = cls.from_pretrained(str(spec.folder), dtype=dtype, **extra)
            if options.scheduler:
                scheduler_cls = getattr(diffusers, options.scheduler)
                pipeline.scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
            if options.attention_slicing:
                pipeline.enable_attention_slicing()
            if options.vae_slicing:
                pipeline.vae.enable_slicing()
            if options.vae_tiling:
                pipeline.vae.enable_tiling()
            device = self._device(spec)
            pipeline.to(device)
            pipeline.set_progress_bar_config(disable=True)
        except torch.cuda.OutOfMemoryError as err:
            raise PipelineError(f"CUDA out of memory: {err}", permanent=True) from None
        estimated_peak = max(
            spec.estimate.bytes - module_bytes(pipeline), 0
        )  # activation + overhead, as estimated
        return TorchHandle(pipeline, device, spec, module_bytes(pipeline), estimated_peak)

    def unload(self, handle: Any) -> None:
        handle.pipeline.to("cpu")
        handle.pipeline = None
        self._empty_cache()

    def park(self, handle: Any) -> None:
        handle.pipeline.to("cpu")
        handle.parked = True
        self._empty_cache()

    def wake(self, handle: Any) -> None:
        try:
            handle.pipeline.to(handle.device)
        except self.torch.cuda.OutOfMemoryError as err:
            handle.pipeline.to("cpu")
            self._empty_cache()
            raise PipelineError(f"CUDA out of memory: {err}", permanent=True) from None
        handle.parked = False

    def _empty_cache(self) -> None:
        if self.device != "cpu" and self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()

    def generate(self, handle: Any, job: ImageJob, on_step: StepCallback) -> bytes:
        torch = self.torch
        on_cuda = handle.device.startswith("cuda")
        generator = torch.Generator(device="cpu").manual_seed(job.seed)
        arguments: dict[str, Any] = {
            "prompt": job.prompt,
            "num_inference_steps": job.steps,
            "generator": generator,
            "callback_on_step_end": _step_timer(on_step),
        }
        if job.negative_prompt:
            arguments["negative_prompt"] = job.negative_prompt
        if job.guidance_scale is not None:
            arguments["guidance_scale"] = job.guidance_scale
        if job.image is not None:
            image = _image(job.image).resize((job.width, job.height))
            arguments["image"] = image
            if job.mask is not None:
                arguments["mask_image"] = _image(job.mask).resize((job.width, job.height))
                arguments.update(height=job.height, width=job.width)
            else:
                arguments["strength"] = job.strength
        else:
            arguments.update(height=job.height, width=job.width)
        pipeline = handle.pipeline
        if job.image is not None and not job.mask and not handle.spec.detected.inpainting:
            image_class = getattr(self.diffusers, handle.spec.detected.image_to_image_class)
            if not isinstance(pipeline, image_class):
                pipeline = image_class.from_pipe(pipeline)
        with self._cuda_lock if on_cuda else contextlib.nullcontext():
            try:
                if on_cuda:
                    index = torch.device(handle.device).index
                    torch.cuda.reset_peak_memory_stats(index)
                    before = torch.cuda.memory_allocated(index)
                with torch.inference_mode():
                    result = pipeline(**arguments)
                if on_cuda:
                    peak = torch.cuda.max_memory_allocated(index) - before
                    handle.measured_peak = max(handle.measured_peak or 0, peak)
            except torch.cuda.OutOfMemoryError as err:
                raise PipelineError(f"CUDA out of memory: {err}", permanent=True) from None
        buffer = io.BytesIO()
        result.images[0].save(buffer, format="PNG")
        return buffer.getvalue()

    def describe(self) -> dict[str, Any]:
        torch = self.torch
        info: dict[str, Any] = {
            "name": self.name,
            "torch": torch.__version__,
            "diffusers": self.diffusers.__version__,
            "device": self.device,
        }
        if self.device != "cpu" and torch.cuda.is_available():
            try:
                free, total = torch.cuda.mem_get_info()
                info.update(freeBytes=free, totalBytes=total)
            except RuntimeError:  # a CPU build, or no device
                pass
        return info


def _step_timer(on_step: StepCallback) -> Any:
    last = [time.monotonic()]

    def callback(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        now = time.monotonic()
        on_step(step, now - last[0])
        last[0] = now
        return kwargs

    return callback


def _image(data: bytes) -> Any:
    image_module = importlib.import_module("PIL.Image")
    try:
        return image_module.open(io.BytesIO(data)).convert("RGB")
    except Exception as err:
        raise PipelineError(f"the image cannot be read: {err}") from None
