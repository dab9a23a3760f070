"""Diffusion models end to end: a `diffusers` ModelDeployment on a simulated node (the real
agent, operator and diffusion server with fake pipelines on the simulated GPU) becomes Ready
with its VRAM and how it was found in status, and the server it landed on returns PNGs."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import openai
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION
from vram_operator.diffusion.runtime import png_size
from vram_operator.simulation.cluster import SimulatedCluster
from vram_operator.simulation.gpu import GIB

pytestmark = pytest.mark.integration

NAMESPACE = "default"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
FLUX = "black-forest-labs/flux-dev"
SETTLE = 90.0


def _wait(what: str, check: Callable[[], Any], timeout: float = SETTLE) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"{what} did not happen within {timeout:g}s (last: {last!r})")


def _post(url: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_diffusion_deployment_becomes_ready_and_serves_images(
    sim_cluster: SimulatedCluster,
) -> None:
    node = sim_cluster.add_node(
        "diffusion-node",
        gpu_sizes=(24 * GIB,),
        agent_args=("--report-interval", "1"),
        diffusion=True,
    )
    sim_cluster.start_operator()
    custom = client.CustomObjectsApi(sim_cluster.api)
    for name, model, options in (
        ("sdxl", SDXL, {"dtype": "fp16", "vaeTiling": True}),
        ("refiner", REFINER, {}),
        ("flux", FLUX, {}),
    ):
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            NAMESPACE,
            "modeldeployments",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ModelDeployment",
                "metadata": {"name": name},
                "spec": {"model": model, "backend": "diffusers", "diffusers": options},
            },
        )

    def status(name: str) -> dict[str, Any]:
        body: Any = custom.get_namespaced_custom_object(
            GROUP, VERSION, NAMESPACE, "modeldeployments", name
        )
        return dict(body.get("status") or {})

    def ready(name: str) -> dict[str, Any] | None:
        found = status(name)
        conditions = {c["type"]: c["status"] for c in found.get("conditions", [])}
        return found if conditions.get("Ready") == "True" else None

    try:
        sdxl = _wait("sdxl Ready", lambda: ready("sdxl"))
        _wait("refiner Ready", lambda: ready("refiner"))
    except AssertionError:
        print(sim_cluster.logs())
        raise
    assert sdxl["readyReplicas"] == 1
    assert sdxl["vramSource"] in ("measured", "safetensors-header")
    assert 7 * GIB < sdxl["vramBytes"] < 12 * GIB
    (placement,) = sdxl["placements"]
    assert placement["state"] == "Loaded"
    assert placement["node"] == "diffusion-node"

    # The simulated GPU holds what the server reported for each pipeline.
    held = node.gpus.allocations()[placement["gpuUuid"]]
    owners = sorted(owner.rsplit(":", 1)[-1] for owner in held)
    assert owners == [f"{NAMESPACE}.refiner", f"{NAMESPACE}.sdxl"]

    # An unsupported pipeline fails for good, saying what is supported.
    def failed() -> str | None:
        placements = status("flux").get("placements") or []
        errors = [p.get("lastError") or "" for p in placements if p.get("state") == "Failed"]
        return errors[0] if errors else None

    message = _wait("flux Failed", failed)
    assert "FluxPipeline is not supported" in message
    assert "SDXL refiner (1280)" in message

    # Images from the endpoint the agent reports for the model.
    gpunode: Any = custom.get_cluster_custom_object(GROUP, VERSION, "gpunodes", "diffusion-node")
    endpoints = {m["key"]: m.get("endpoint") for m in gpunode["status"]["models"]}
    endpoint = endpoints[f"{NAMESPACE}.sdxl"]
    assert endpoint == f"{node.diffusion_serve_url}/pipelines/{NAMESPACE}.sdxl"
    code, answer = _post(
        f"{endpoint}/v1/images/generations", {"prompt": "a lighthouse", "size": "512x256"}
    )
    assert code == 200, answer
    picture = base64.b64decode(answer["data"][0]["b64_json"])
    assert png_size(picture) == (512, 256)
    code, answer = _post(
        f"{endpoints[f'{NAMESPACE}.refiner']}/v1/images/generations", {"prompt": "x"}
    )
    assert code == 400
    assert "/v1/images/edits" in answer["error"]["message"]
    code, answer = _post(
        f"{endpoints[f'{NAMESPACE}.refiner']}/v1/images/edits",
        {"prompt": "sharper", "image": base64.b64encode(picture).decode(), "size": "512x256"},
    )
    assert code == 200, answer
    assert png_size(base64.b64decode(answer["data"][0]["b64_json"])) == (512, 256)

    # Through the gateway, by the deployment's name, as any OpenAI client would call it.
    _, gateway = sim_cluster.start_gateway()
    code, answer = _post(
        f"{gateway}/v1/images/generations",
        {"model": "sdxl", "prompt": "a lighthouse", "size": "256x256", "n": 2},
    )
    assert code == 200, answer
    images = [base64.b64decode(item["b64_json"]) for item in answer["data"]]
    assert [png_size(image) for image in images] == [(256, 256), (256, 256)]
    code, answer = _post(
        f"{gateway}/v1/images/generations", {"model": "refiner", "prompt": "x", "size": "64x64"}
    )
    assert code == 400
    assert "image-to-image" in answer["error"]["message"]
    # OpenAI's own client: generations as JSON, edits as multipart, both through the gateway.
    api = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0).images
    made = api.generate(
        model="sdxl", prompt="a fox", size="256x256", response_format="b64_json", n=1
    )
    assert made.data
    assert made.data[0].b64_json
    fox = base64.b64decode(made.data[0].b64_json)
    assert png_size(fox) == (256, 256)
    edited = api.edit(
        model="refiner",
        image=("fox.png", fox, "image/png"),
        prompt="sharper",
        size="256x256",
        response_format="b64_json",
    )
    assert isinstance(edited, openai.types.ImagesResponse)
    assert edited.data
    assert edited.data[0].b64_json
    assert png_size(base64.b64decode(edited.data[0].b64_json)) == (256, 256)
    code, answer = _post(
        f"{gateway}/v1/chat/completions",
        {"model": "sdxl", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert code == 400
    assert "/v1/images/generations" in answer["error"]["message"]


def test_pressure_parks_a_pipeline_in_host_ram_and_it_still_serves_after_waking(
    sim_cluster: SimulatedCluster,
) -> None:
    node = sim_cluster.add_node(
        "diffusion-pressure",
        gpu_sizes=(24 * GIB,),
        agent_args=("--report-interval", "1", "--min-residency", "0"),
        diffusion=True,
    )
    sim_cluster.start_operator()
    custom = client.CustomObjectsApi(sim_cluster.api)
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NAMESPACE,
        "modeldeployments",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelDeployment",
            "metadata": {"name": "sd"},
            "spec": {"model": "runwayml/stable-diffusion-v1-5", "backend": "diffusers"},
        },
    )
    key = f"{NAMESPACE}.sd"

    def reported(state: str) -> dict[str, Any] | None:
        try:
            body: Any = custom.get_cluster_custom_object(
                GROUP, VERSION, "gpunodes", "diffusion-pressure"
            )
        except ApiException:
            return None  # the agent has not written its GPUNode yet
        models = (body.get("status") or {}).get("models") or []
        found = next((m for m in models if m["key"] == key), None)
        return found if found is not None and found["state"] == state else None

    try:
        loaded = _wait("sd Loaded", lambda: reported("Loaded"))
    except AssertionError:
        print(sim_cluster.logs())
        raise
    uuid = loaded["gpuUuid"]
    owner = f"diffusion:{key}"
    assert any(o.endswith(owner) for o in node.gpus.allocations()[uuid])
    # Another process takes all but 128 MiB: real pressure, and the only evictable model is
    # parked (its backend can), not dropped to disk.
    free = node.gpus.device(uuid).free_bytes
    node.gpus.pressure(uuid, free - 128 * 2**20, label="other-tenant")
    try:
        _wait("sd Sleeping", lambda: reported("Sleeping"))
    except AssertionError:
        print(sim_cluster.logs())
        raise
    assert not any(o.endswith(owner) for o in node.gpus.allocations()[uuid])
    node.gpus.pressure(uuid, 0, label="other-tenant")
    _wait("sd Loaded again", lambda: reported("Loaded"))
    code, answer = _post(
        f"{node.diffusion_serve_url}/pipelines/{key}/v1/images/generations",
        {"prompt": "after waking", "size": "64x64"},
    )
    assert code == 200, answer
