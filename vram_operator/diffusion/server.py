"""`vram-operator diffusion-server`: Stable Diffusion pipelines held resident on the GPUs.

The diffusion sidecar runs this server; the node agent drives it over HTTP on localhost, and
clients (through the gateway) reach the images API on the serving port. One process holds
every pipeline of the node's GPUs, each on the GPU the agent names, so they share one CUDA
context.

Control API (JSON; errors are `{"message": "..."}`), on --host/--port:

    GET    /health                    200 {"status": "ok", "version", "runtime", "pipelines",
                                      "gpuSource", "gpuProcessBytes": {uuid: bytes}: what
                                      NVML attributes to this process on each GPU}
    GET    /pipelines                 200 {"pipelines": [<entry>, ...]}
    GET    /pipelines/{key}           200 <entry> | 404
    PUT    /pipelines/{key}           body {"model", "gpuUuid", "vramBytes", "options":
                                      spec.diffusers}: 202 <entry> loading; 200 when it
                                      already holds the same; 409 it holds something else;
                                      400 a GPU this container does not see
    DELETE /pipelines/{key}           200 <entry> once its memory is free | 404
    POST   /pipelines/{key}/park      200 <entry> parked: moved to host RAM
    POST   /pipelines/{key}/wake      200 <entry> loaded again
    POST   /downloads                 body {"model"}: fetch its files into the Hugging Face
                                      cache with --download-command; 202 <download>
    GET    /downloads?model=M         200 <download> | 404
    GET    /estimate?model=M&options=JSON   200 {"bytes", "method", "detail", "parameters",
                                      "family"} | 404 files absent | 422 unsupported
    GET    /metrics                   Prometheus text

Images API (OpenAI's images API; on the serving port, and on the control port too):

    POST /v1/images/generations       {"model", "prompt", "n", "size": "WxH",
                                      "response_format": "b64_json"} plus the extensions
                                      "steps", "seed", "guidance_scale", "negative_prompt"
    POST /v1/images/edits             multipart (image, mask, prompt, n, size, strength) or
                                      JSON with base64 "image"/"mask": image-to-image, the
                                      only way into a refiner, and inpainting with a mask
    and the same under /pipelines/{key}/v1/... (the entry's `endpoint`), where `model` may be
    left out. Answers {"created", "data": [{"b64_json"}]}: PNG images.

<entry>.state: loading -> loaded <-> parked; failed (with `message`, and `permanent` when
loading it again cannot succeed: an unsupported pipeline, out of memory).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import random
import shlex
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from vram_operator import __version__
from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.api.modeldeployment import SpecError, spec_error_from
from vram_operator.node_agent.monitors.gpu import GPUSource, detect_gpu_source
from vram_operator.node_agent.vllm_supervisor import advertised_address

from .pipelines import Pipeline, PipelineManager, PipelineState, ServerError
from .runtime import ImageJob, Runtime

log = logging.getLogger(__name__)

DEFAULT_PORT = 8950
DEFAULT_SERVE_PORT = 8951
DEFAULT_STEPS = 30
MAX_IMAGES = 10
MANAGER = web.AppKey("manager", PipelineManager)
SETTINGS = web.AppKey("settings", dict)


class LoadBody(BaseModel):
    """The body of PUT /pipelines/{key}."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    model: str = Field(min_length=1)
    gpu_uuid: str | None = None
    vram_bytes: int | None = Field(default=None, gt=0)
    options: DiffusersOptions = Field(default_factory=DiffusersOptions)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _openai_error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status=status,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServerError as err:
        if "/v1/" in request.path:
            return _openai_error(err.status, err.message)
        return _error(err.status, err.message)


# --- control --------------------------------------------------------------------------------


def _endpoint_base(request: web.Request) -> str | None:
    base: str | None = request.app[SETTINGS].get("endpoint_base")
    return base


async def _health(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    source, held = await asyncio.to_thread(manager.process_bytes)
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "runtime": manager.runtime.describe(),
            "pipelines": len(manager.pipelines),
            "gpuSource": source,
            "gpuProcessBytes": held,
        }
    )


async def _list(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    base = _endpoint_base(request)
    return web.json_response({"pipelines": [p.to_json(base) for p in manager.pipelines.values()]})


async def _get(request: web.Request) -> web.Response:
    pipeline = request.app[MANAGER].get(request.match_info["key"])
    return web.json_response(pipeline.to_json(_endpoint_base(request)))


async def _put(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    try:
        body = LoadBody.model_validate(await request.json())
    except json.JSONDecodeError as err:
        return _error(400, f"body is not JSON: {err}")
    except ValidationError as err:
        return _error(400, str(spec_error_from(err, prefix="body")))
    pipeline, created = request.app[MANAGER].start(
        key, body.model, body.options, body.gpu_uuid, body.vram_bytes
    )
    return web.json_response(
        pipeline.to_json(_endpoint_base(request)), status=202 if created else 200
    )


async def _delete(request: web.Request) -> web.Response:
    pipeline = await request.app[MANAGER].unload(request.match_info["key"])
    return web.json_response(pipeline.to_json(None))


async def _park(request: web.Request) -> web.Response:
    pipeline = await request.app[MANAGER].park(request.match_info["key"])
    return web.json_response(pipeline.to_json(_endpoint_base(request)))


async def _wake(request: web.Request) -> web.Response:
    pipeline = await request.app[MANAGER].wake(request.match_info["key"])
    return web.json_response(pipeline.to_json(_endpoint_base(request)))


async def _start_download(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError as err:
        return _error(400, f"body is not JSON: {err}")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        return _error(400, "model: a non-empty string is required")
    return web.json_response(request.app[MANAGER].download(model).to_json(), status=202)


async def _get_download(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    job = request.app[MANAGER].downloads.get(model)
    if job is None:
        return _error(404, f"no download of {model!r}")
    return web.json_response(job.to_json())


async def _estimate(request: web.Request) -> web.Response:
    model = request.query.get("model", "")
    if not model:
        return _error(400, "query parameter model is required")
    try:
        options = DiffusersOptions.model_validate(json.loads(request.query.get("options", "{}")))
    except json.JSONDecodeError as err:
        return _error(400, f"options is not JSON: {err}")
    except SpecError as err:
        return _error(400, str(err))
    except ValidationError as err:
        return _error(400, str(spec_error_from(err, prefix="options")))
    manager = request.app[MANAGER]
    estimate, detected = await asyncio.to_thread(manager.estimate, model, options)
    return web.json_response(
        {
            "bytes": estimate.bytes,
            "method": estimate.method,
            "detail": estimate.detail,
            "parameters": estimate.parameters,
            "family": detected.family.value,
        }
    )


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[MANAGER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --- images ---------------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, str) and kind is not str:
        try:
            value = kind(value)
        except ValueError:
            raise ServerError(400, f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServerError(400, f"{name} must be a number, got {value!r}")
    if kind is int and value != int(value):
        raise ServerError(400, f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ServerError(400, f"{name} must be between {low:g} and {high:g}, got {value!r}")
    return kind(value)


def _size(text: Any, pipeline: Pipeline) -> tuple[int, int]:
    limit = pipeline.resolution or 1024
    if text is None or text == "auto":
        return limit, limit
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ServerError(400, f"size must be WIDTHxHEIGHT, such as {limit}x{limit}; got {text!r}")
    width, height = int(parts[0]), int(parts[1])
    if width % 8 or height % 8 or width < 64 or height < 64:
        raise ServerError(400, f"size {text}: each side must be a multiple of 8, at least 64")
    if max(width, height) > limit:
        raise ServerError(
            400,
            f"size {text} is larger than the {limit}x{limit} this pipeline's memory was sized "
            "for; ask for less, or raise spec.diffusers.resolution",
        )
    return width, height


def _jobs(
    body: dict[str, Any],
    pipeline: Pipeline,
    default_steps: int,
    image: bytes | None = None,
    mask: bytes | None = None,
) -> list[ImageJob]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ServerError(400, "prompt: a non-empty string is required")
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise ServerError(
            400, f"response_format {response_format!r} is not served: images come as b64_json"
        )
    n = _number(body, "n", int, 1, MAX_IMAGES) or 1
    width, height = _size(body.get("size"), pipeline)
    steps = _number(body, "steps", int, 1, 500) or default_steps
    seed = _number(body, "seed", int, 0, 2**32 - 1)
    if seed is None:
        seed = random.randrange(2**32)
    guidance = _number(body, "guidance_scale", float, 0.0, 50.0)
    strength = _number(body, "strength", float, 0.01, 1.0) or 0.3
    negative = body.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ServerError(400, "negative_prompt must be a string")
    return [
        ImageJob(
            prompt=prompt,
            width=width,
            height=height,
            steps=steps,
            seed=(seed + index) % 2**32,
            guidance_scale=guidance,
            negative_prompt=negative,
            image=image,
            mask=mask,
            strength=strength,
        )
        for index in range(n)
    ]


def _serving(pipeline: Pipeline) -> None:
    if pipeline.state is PipelineState.LOADED:
        return
    if pipeline.state in (PipelineState.LOADING, PipelineState.PARKED):
        raise ServerError(503, f"{pipeline.key} is {pipeline.state.value}; try again shortly")
    raise ServerError(503, f"{pipeline.key} failed to load: {pipeline.message}")


def _pipeline_for(request: web.Request, body: dict[str, Any]) -> Pipeline:
    manager = request.app[MANAGER]
    key = request.match_info.get("key")
    if key is not None:
        return manager.get(key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ServerError(400, "model: a non-empty string is required")
    return manager.find(model)


async def _answer(
    request: web.Request, pipeline: Pipeline, jobs: list[ImageJob], endpoint: str
) -> web.Response:
    manager = request.app[MANAGER]
    try:
        images = await manager.images(pipeline, jobs)
    except ServerError as err:
        manager.metrics.requests.labels(pipeline.model, endpoint, str(err.status)).inc()
        raise
    manager.metrics.requests.labels(pipeline.model, endpoint, "200").inc()
    return web.json_response(
        {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in images],
        }
    )


async def _generations(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except json.JSONDecodeError as err:
        raise ServerError(400, f"body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise ServerError(400, "body must be a JSON object")
    pipeline = _pipeline_for(request, body)
    if pipeline.detected is not None and not pipeline.detected.text_to_image:
        what = "an SDXL refiner" if not pipeline.detected.inpainting else "an inpainting pipeline"
        raise ServerError(
            400,
            f"{pipeline.model} is {what}: it reworks an image and cannot start from a prompt "
            "alone; send the image to /v1/images/edits (image-to-image)",
        )
    _serving(pipeline)
    jobs = _jobs(body, pipeline, request.app[SETTINGS]["default_steps"])
    return await _answer(request, pipeline, jobs, "generations")


async def _edits(request: web.Request) -> web.Response:
    body: dict[str, Any] = {}
    image = mask = None
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        for name, value in form.items():
            if isinstance(value, web.FileField):
                data = value.file.read()
                if name in ("image", "image[]"):
                    image = data
                elif name == "mask":
                    mask = data
            else:
                body[name] = value
    else:
        try:
            decoded = await request.json()
        except json.JSONDecodeError as err:
            raise ServerError(400, f"body is not JSON or multipart: {err}") from None
        if not isinstance(decoded, dict):
            raise ServerError(400, "body must be a JSON object")
        body = decoded
        image = _b64(body.get("image"), "image")
        mask = _b64(body.get("mask"), "mask")
    if image is None:
        raise ServerError(400, "image is required: the picture to rework")
    pipeline = _pipeline_for(request, body)
    if pipeline.detected is not None and pipeline.detected.inpainting and mask is None:
        raise ServerError(400, f"{pipeline.model} is an inpainting pipeline: send a mask too")
    _serving(pipeline)
    jobs = _jobs(body, pipeline, request.app[SETTINGS]["default_steps"], image=image, mask=mask)
    return await _answer(request, pipeline, jobs, "edits")


def _b64(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServerError(400, f"{name} must be a base64 string")
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ServerError(400, f"{name} is not valid base64") from None


# --- apps -----------------------------------------------------------------------------------


def _add_image_routes(app: web.Application) -> None:
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    for prefix in ("", "/pipelines/{key}"):
        app.router.add_post(f"{prefix}/v1/images/generations", _generations)
        app.router.add_post(f"{prefix}/v1/images/edits", _edits)


def _app(manager: PipelineManager, settings: dict[str, Any]) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=64 * 2**20)
    app[MANAGER] = manager
    app[SETTINGS] = settings
    return app


def build_apps(
    manager: PipelineManager, default_steps: int = DEFAULT_STEPS
) -> tuple[web.Application, web.Application]:
    """(the control app, the serving app); they share settings, so the endpoint base set
    once the serving port is known shows in both."""
    settings: dict[str, Any] = {"default_steps": default_steps, "endpoint_base": None}
    control = _app(manager, settings)
    _add_image_routes(control)
    control.router.add_get("/pipelines", _list)
    control.router.add_get("/pipelines/{key}", _get)
    control.router.add_put("/pipelines/{key}", _put)
    control.router.add_delete("/pipelines/{key}", _delete)
    control.router.add_post("/pipelines/{key}/park", _park)
    control.router.add_post("/pipelines/{key}/wake", _wake)
    control.router.add_post("/downloads", _start_download)
    control.router.add_get("/downloads", _get_download)
    control.router.add_get("/estimate", _estimate)
    serving = _app(manager, settings)
    _add_image_routes(serving)
    return control, serving


# --- command --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vram-operator diffusion-server",
        description="Hold Stable Diffusion pipelines resident on this node's GPUs and serve "
        "OpenAI's images API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="control API address")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free one")
    parser.add_argument(
        "--serve-host", default="0.0.0.0", help="images API address (default 0.0.0.0)"
    )
    parser.add_argument(
        "--serve-port", type=int, default=DEFAULT_SERVE_PORT, help="0 picks a free one"
    )
    parser.add_argument(
        "--advertise-host",
        default=os.environ.get("POD_IP") or None,
        help="address reported in each pipeline's endpoint (default $POD_IP, else this "
        "machine's outward address)",
    )
    parser.add_argument("--default-steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu runs pipelines on the CPU (tests; a PyTorch CPU build)",
    )
    parser.add_argument(
        "--download-command",
        default=None,
        help="fetches a model's files (the model is appended; default: huggingface_hub "
        "through vram_operator.diffusion.download)",
    )
    parser.add_argument(
        "--simulate",
        metavar="GPU_STATE_FILE",
        default=None,
        help="fake pipelines on simulated GPUs, no PyTorch (tests and demos only)",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def _runtime_and_gpus(args: argparse.Namespace) -> tuple[Runtime, GPUSource]:
    if args.simulate:
        from vram_operator.simulation.fake_diffusion import FakeRuntime
        from vram_operator.simulation.gpu_source import SimulatedGPUSource

        return FakeRuntime(args.simulate), SimulatedGPUSource(args.simulate)
    from .torch_runtime import TorchRuntime

    return TorchRuntime(device=args.device), detect_gpu_source()


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM or SIGINT, then unload every pipeline."""
    runtime, gpus = _runtime_and_gpus(args)
    download = shlex.split(args.download_command) if args.download_command else None
    if args.simulate and download is None:
        download = [sys.executable, "-m", "vram_operator.simulation.fake_diffusion", "download"]
    manager = PipelineManager(runtime, gpus, download_command=download, device=args.device)
    control, serving = build_apps(manager, args.default_steps)
    runners = [
        web.AppRunner(app, handle_signals=False, access_log=None) for app in (control, serving)
    ]
    for runner in runners:
        await runner.setup()
    try:
        serve_sock = socket.create_server((args.serve_host, args.serve_port))
        await web.SockSite(runners[1], serve_sock).start()
        advertise = args.advertise_host or advertised_address(args.serve_host)
        shown = f"[{advertise}]" if ":" in advertise else advertise
        control[SETTINGS]["endpoint_base"] = f"http://{shown}:{serve_sock.getsockname()[1]}"
        sock = socket.create_server((args.host, args.port))
        await web.SockSite(runners[0], sock).start()
        host, port = sock.getsockname()[:2]
        print(f"listening on http://{host}:{port}", flush=True)
        log.info(
            "runtime %s; images API under %s", runtime.name, control[SETTINGS]["endpoint_base"]
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("unloading %d pipeline(s)", len(manager.pipelines))
        await manager.close()
    finally:
        for runner in runners:
            await runner.cleanup()
        gpus.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s diffusion-server: %(message)s",
    )
    try:
        asyncio.run(serve(args))
    except ImportError as err:
        print(
            f"diffusion-server: {err}; install the diffusion extra "
            "(pip install 'vram-operator[diffusion]') or pass --simulate",
            file=sys.stderr,
        )
        return 1
    except OSError as err:
        print(f"diffusion-server: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
