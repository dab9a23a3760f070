"""The diffusion server with fake pipelines on a simulated GPU, and the agent's backend for it.

In-process over loopback HTTP: the control API, OpenAI's images API, park and wake, what the
simulated GPU is charged, the metrics, and `DiffusersBackend` speaking to it.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from vram_operator.api import ModelState
from vram_operator.api.diffusion import DiffusersOptions
from vram_operator.diffusion.estimate import pipeline_sizes
from vram_operator.diffusion.pipelines import PipelineManager
from vram_operator.diffusion.runtime import png_size
from vram_operator.diffusion.server import SETTINGS, build_apps
from vram_operator.node_agent.backends import BackendError, DiffusersBackend, LoadRequest
from vram_operator.simulation.fake_diffusion import FakeRuntime, write_pipeline
from vram_operator.simulation.gpu import GIB, SimulatedGPUs
from vram_operator.simulation.gpu_source import SimulatedGPUSource

pytestmark = pytest.mark.unit

SD15 = "runwayml/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
INPAINT = "runwayml/stable-diffusion-inpainting"
FLUX = "black-forest-labs/flux-dev"


def _cache(hub: Path, model: str) -> Path:
    snapshot = hub / ("models--" + model.replace("/", "--")) / "snapshots" / "abc"
    write_pipeline(snapshot, model)
    return snapshot


class Server:
    def __init__(self, tmp: Path) -> None:
        self.gpus = SimulatedGPUs.create(tmp / "gpus.json", node="n1", sizes=[24 * GIB])
        self.uuid = self.gpus.devices()[0].uuid
        self.hub = tmp / "hub"
        self.manager = PipelineManager(
            FakeRuntime(tmp / "gpus.json", pid=4242),
            SimulatedGPUSource(tmp / "gpus.json"),
            pid=4242,
            download_command=[
                sys.executable,
                "-m",
                "vram_operator.simulation.fake_diffusion",
                "download",
            ],
            hub_cache=self.hub,
        )
        self.control, self.serving = build_apps(self.manager, default_steps=3)
        self.server = TestServer(self.control, host="127.0.0.1")
        self.url = ""
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> Server:
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        self.control[SETTINGS]["endpoint_base"] = self.url
        self.http = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        assert self.http is not None
        await self.http.close()
        await self.manager.close()
        await self.server.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        assert self.http is not None
        async with self.http.request(method, self.url + path, **kwargs) as answer:
            return answer.status, await answer.json()

    async def load(self, key: str, model: str, **options: Any) -> dict[str, Any]:
        _cache(self.hub, model)
        body = {"model": model, "gpuUuid": self.uuid, "options": options}
        status, entry = await self.call("PUT", f"/pipelines/{key}", json=body)
        assert status == 202, entry
        for _ in range(200):
            status, entry = await self.call("GET", f"/pipelines/{key}")
            if entry["state"] != "loading":
                return dict(entry)
            await asyncio.sleep(0.01)
        raise AssertionError(f"{key} still loading")

    def held(self) -> dict[str, int]:
        return self.gpus.allocations()[self.uuid]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    started = await Server(tmp_path).start()
    try:
        yield started
    finally:
        await started.stop()


async def test_a_pipeline_loads_charges_the_gpu_and_makes_pngs_of_the_size_asked(
    server: Server,
) -> None:
    entry = await server.load("default.sd", SD15)
    assert entry["state"] == "loaded", entry
    assert entry["family"] == "sd15"
    assert entry["textToImage"] is True
    assert entry["endpoint"] == f"{server.url}/pipelines/default.sd"
    sizes = pipeline_sizes(_cache(server.hub, SD15), DiffusersOptions())
    assert server.held() == {"pid:4242:diffusion:default.sd": sizes.weights + sizes.overhead}
    assert entry["vramBytes"] == sizes.total == entry["estimateBytes"]

    body = {"model": SD15, "prompt": "a red fox", "n": 2, "size": "256x128", "seed": 7}
    status, answer = await server.call("POST", "/v1/images/generations", json=body)
    assert status == 200, answer
    images = [base64.b64decode(item["b64_json"]) for item in answer["data"]]
    assert len(images) == 2
    assert all(png_size(image) == (256, 128) for image in images)
    assert images[0] != images[1]  # seeds 7 and 8
    _, again = await server.call("POST", "/v1/images/generations", json=body)
    assert again["data"] == answer["data"]  # deterministic
    # The activation peak was held only while the images were made.
    assert list(server.held()) == ["pid:4242:diffusion:default.sd"]
    _, entry = await server.call("GET", "/pipelines/default.sd")
    assert entry["images"] == 4
    assert entry["lastAccess"] is not None


async def test_images_under_the_endpoint_and_bad_requests(server: Server) -> None:
    await server.load("default.sd", SD15)
    status, answer = await server.call(
        "POST", "/pipelines/default.sd/v1/images/generations", json={"prompt": "x", "size": "64x64"}
    )
    assert status == 200, answer
    for body, words in [
        ({"prompt": "x", "size": "1024x1024"}, "larger than the 512x512"),
        ({"prompt": "x", "size": "100x100"}, "multiple of 8"),
        ({"prompt": "x", "response_format": "url"}, "b64_json"),
        ({"prompt": "", "size": "64x64"}, "prompt"),
        ({"prompt": "x", "n": 11}, "n must be between 1 and 10"),
    ]:
        status, answer = await server.call(
            "POST", "/pipelines/default.sd/v1/images/generations", json=body
        )
        assert status == 400, body
        assert words in answer["error"]["message"], answer
    status, answer = await server.call(
        "POST", "/v1/images/generations", json={"model": "nope", "prompt": "x"}
    )
    assert status == 404
    assert "default.sd" in answer["error"]["message"]


async def test_a_refiner_is_refused_text_to_image_and_reworks_images(server: Server) -> None:
    entry = await server.load("default.refiner", REFINER)
    assert entry["family"] == "sdxl-refiner"
    assert entry["pipelineClass"] == "StableDiffusionXLImg2ImgPipeline"
    status, answer = await server.call(
        "POST", "/v1/images/generations", json={"model": REFINER, "prompt": "x", "size": "64x64"}
    )
    assert status == 400
    assert "SDXL refiner" in answer["error"]["message"]
    assert "/v1/images/edits" in answer["error"]["message"]

    await server.load("default.sd", SD15)
    _, made = await server.call(
        "POST", "/v1/images/generations", json={"model": SD15, "prompt": "x", "size": "128x128"}
    )
    picture = base64.b64decode(made["data"][0]["b64_json"])
    form = aiohttp.FormData()
    form.add_field("model", REFINER)
    form.add_field("prompt", "sharper")
    form.add_field("size", "128x128")
    form.add_field("image", picture, filename="in.png", content_type="image/png")
    status, answer = await server.call("POST", "/v1/images/edits", data=form)
    assert status == 200, answer
    refined = base64.b64decode(answer["data"][0]["b64_json"])
    assert png_size(refined) == (128, 128)
    assert refined != picture
    status, answer = await server.call(
        "POST",
        "/v1/images/edits",
        json={"model": REFINER, "prompt": "x", "image": base64.b64encode(picture).decode()},
    )
    assert status == 200, answer


async def test_inpainting_needs_a_mask(server: Server) -> None:
    entry = await server.load("default.inpaint", INPAINT)
    assert entry["inpainting"] is True
    status, answer = await server.call(
        "POST", "/v1/images/generations", json={"model": INPAINT, "prompt": "x"}
    )
    assert status == 400
    assert "inpainting" in answer["error"]["message"]


async def test_park_frees_the_gpu_and_wake_takes_it_back(server: Server) -> None:
    await server.load("default.xl", SDXL)
    held = server.held()["pid:4242:diffusion:default.xl"]
    status, entry = await server.call("POST", "/pipelines/default.xl/park")
    assert status == 200
    assert entry["state"] == "parked"
    assert entry["hostBytes"] == held
    assert server.held() == {}
    status, answer = await server.call(
        "POST", "/v1/images/generations", json={"model": SDXL, "prompt": "x", "size": "64x64"}
    )
    assert status == 503
    assert "parked" in answer["error"]["message"]
    status, entry = await server.call("POST", "/pipelines/default.xl/wake")
    assert entry["state"] == "loaded"
    assert server.held() == {"pid:4242:diffusion:default.xl": held}
    status, _ = await server.call(
        "POST", "/v1/images/generations", json={"model": SDXL, "prompt": "x", "size": "64x64"}
    )
    assert status == 200
    status, entry = await server.call("DELETE", "/pipelines/default.xl")
    assert status == 200
    assert server.held() == {}
    status, _ = await server.call("GET", "/pipelines/default.xl")
    assert status == 404


async def test_failures_are_reported_permanent_where_retrying_cannot_help(
    server: Server,
) -> None:
    entry = await server.load("default.flux", FLUX)
    assert entry["state"] == "failed"
    assert entry["permanent"] is True
    assert "FluxPipeline is not supported" in entry["message"]
    server.gpus.pressure(server.uuid, 20 * GIB)
    entry = await server.load("default.xl", SDXL)
    assert entry["state"] == "failed"
    assert entry["permanent"] is True
    assert "CUDA out of memory" in entry["message"]
    status, answer = await server.call(
        "PUT", "/pipelines/x", json={"model": SD15, "gpuUuid": "GPU-nope"}
    )
    assert status == 400
    assert "not visible" in answer["message"]
    status, answer = await server.call(
        "PUT", "/pipelines/x", json={"model": SD15, "options": {"dtype": "fp8"}}
    )
    assert status == 400
    assert "body.options.dtype" in answer["message"]


async def test_estimate_and_metrics(server: Server) -> None:
    _cache(server.hub, SDXL)
    status, answer = await server.call(
        "GET", "/estimate", params={"model": SDXL, "options": '{"dtype": "fp32"}'}
    )
    assert status == 200, answer
    assert answer["family"] == "sdxl"
    assert answer["method"] == "safetensors-header"
    assert "at fp32" in answer["detail"]
    status, _ = await server.call("GET", "/estimate", params={"model": "absent/model"})
    assert status == 404
    await server.load("default.sd", SD15)
    await server.call(
        "POST", "/v1/images/generations", json={"model": SD15, "prompt": "x", "size": "64x64"}
    )
    assert server.http is not None
    async with server.http.get(server.url + "/metrics") as answer:
        text = await answer.text()
    assert f'vram_diffusion_images_total{{model="{SD15}"}} 1.0' in text
    assert f'vram_diffusion_step_seconds_count{{model="{SD15}"}} 3.0' in text
    assert "vram_diffusion_queue_depth" in text
    assert 'vram_diffusion_pipeline_vram_bytes{key="default.sd",state="loaded"}' in text
    status, health = await server.call("GET", "/health")
    assert health["status"] == "ok"
    assert health["runtime"]["name"] == "simulated"
    # NVML's view: every pipeline of this process together.
    assert health["gpuSource"] == "simulated"
    assert health["gpuProcessBytes"] == {server.uuid: sum(server.held().values())}


# --- the agent's backend ----------------------------------------------------------------------


async def test_the_backend_pulls_estimates_loads_parks_and_unloads(server: Server) -> None:
    backend = DiffusersBackend(server.url, poll_interval=0.01)
    try:
        health = await backend.health()
        assert health.healthy
        progress: list[int] = []
        await backend.pull(SDXL, progress.append)
        assert progress[-1] == 100
        options = DiffusersOptions(dtype="fp16", vae_tiling=True)
        estimate = await backend.estimate(SDXL, args=options.as_args())
        assert estimate is not None
        assert estimate.method == "safetensors-header"
        info = await backend.load(
            LoadRequest(
                key="default.xl",
                model=SDXL,
                gpu_uuid=server.uuid,
                vram_bytes=estimate.bytes,
                args=options.as_args(),
            )
        )
        assert info.state is ModelState.LOADED
        assert info.vram_bytes == estimate.bytes
        assert info.endpoint == f"{server.url}/pipelines/default.xl"
        await backend.park("default.xl", SDXL)
        [resident] = await backend.list_resident()
        assert resident.state is ModelState.SLEEPING
        assert resident.vram_bytes == estimate.bytes  # what it takes once woken
        await backend.wake("default.xl", SDXL)
        [resident] = await backend.list_resident()
        assert resident.state is ModelState.LOADED
        await backend.unload("default.xl", SDXL)
        await backend.unload("default.xl", SDXL)  # already gone: fine
        assert await backend.list_resident() == []
        assert await backend.estimate("absent/model") is None
    finally:
        await backend.aclose()


async def test_the_backend_fails_an_unsupported_model_for_good(server: Server) -> None:
    _cache(server.hub, FLUX)
    backend = DiffusersBackend(server.url, poll_interval=0.01)
    try:
        with pytest.raises(BackendError) as caught:
            await backend.estimate(FLUX)
        assert not caught.value.retryable
        assert "supported: Stable Diffusion 1.x" in caught.value.message
        with pytest.raises(BackendError) as caught:
            await backend.load(LoadRequest(key="default.flux", model=FLUX, gpu_uuid=server.uuid))
        assert not caught.value.retryable
        assert await backend.list_resident() == []  # the failed entry is not left behind
        with pytest.raises(BackendError) as caught:
            await backend.pull("missing/model", lambda _: None)
        assert not caught.value.retryable
        assert "RepositoryNotFoundError" in caught.value.message
    finally:
        await backend.aclose()


def test_fake_images_depend_on_prompt_and_seed() -> None:
    from vram_operator.diffusion.runtime import ImageJob
    from vram_operator.simulation.fake_diffusion import render

    job = ImageJob(prompt="a", width=64, height=32, steps=1, seed=1)
    png = render("k", job)
    assert png_size(png) == (64, 32)
    assert render("k", job) == png
    other = ImageJob(prompt="b", width=64, height=32, steps=1, seed=1)
    assert render("k", other) != png
