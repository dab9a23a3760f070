"""`vram-operator demo`: the whole system on one machine, on simulated GPUs.

Starts a local kube-apiserver + etcd, installs the CRDs, starts two simulated GPU nodes
(real agents over the fake Ollama, the real vLLM supervisor running the fake vLLM and the real
diffusion server with fake pipelines), the operator, applies examples/ and prints `kubectl get
vram` until every model is Ready, then starts the gateway and prints a chat completion from an
Ollama and a vLLM model and an image from a diffusion model through it.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from vram_operator.api import parse_bytes
from vram_operator.localcluster import LocalControlPlane
from vram_operator.simulation.cluster import (
    SimulatedCluster,
    install_crds,
    install_trusted_policy,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GATEWAY_MODELS = ("llama3-2-1b", "qwen2-5-0-5b")
"""Deployments of examples/ the demo calls through the gateway: one on Ollama, one on vLLM."""
IMAGE_MODEL = "sdxl"
"""The diffusion deployment of examples/ the demo asks for an image."""
H100_LABEL = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vram-operator demo", description=__doc__)
    parser.add_argument("--examples", type=Path, default=EXAMPLES)
    parser.add_argument("--gpu-size", default="24Gi", help="memory of each simulated GPU")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for Ready")
    parser.add_argument(
        "--keep-running", action="store_true", help="after converging, run until Ctrl-C"
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="logs and kubeconfig here")
    return parser


def _model_deployments(folder: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return [d for d in docs if d.get("kind") == "ModelDeployment"]


def _all_ready(custom: client.CustomObjectsApi, count: int) -> bool:
    listing: Any = custom.list_cluster_custom_object("vram.dev", "v1alpha1", "modeldeployments")
    items = listing["items"]
    ready = [
        i
        for i in items
        for c in (i.get("status") or {}).get("conditions", [])
        if c["type"] == "Ready" and c["status"] == "True"
    ]
    return len(items) == count and len(ready) == count


def _chat(gateway: str, model: str, prompt: str, timeout: float = 60) -> str:
    """One chat completion through the gateway's OpenAI API; the answer's text."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    request = urllib.request.Request(
        gateway + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    return str(reply["choices"][0]["message"]["content"])


def _image(gateway: str, model: str, size: str = "512x512", timeout: float = 60) -> str:
    """One image through the gateway's images API; its PNG size and length, as text."""
    body = {"model": model, "prompt": "a lighthouse at dusk", "size": size}
    request = urllib.request.Request(
        gateway + "/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    png = base64.b64decode(reply["data"][0]["b64_json"])
    width, height = struct.unpack(">II", png[16:24])
    return f"a {width}x{height} PNG of {len(png)} bytes"


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    workdir = args.state_dir or Path(tempfile.mkdtemp(prefix="vram-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    gpu = parse_bytes(args.gpu_size)
    print(f"demo state and logs in {workdir}", flush=True)
    with LocalControlPlane(workdir / "control-plane") as cp:
        kubeconfig = str(cp.kubeconfig)
        api = config.new_client_from_config(config_file=kubeconfig)
        cluster = SimulatedCluster(api, kubeconfig, workdir)
        try:
            install_crds(api)
            install_trusted_policy(api)
            print("CRDs installed; starting 2 simulated GPU nodes and the operator", flush=True)
            cluster.add_node("gpu-node-1", gpu_sizes=[gpu], diffusion=True)
            cluster.add_node("gpu-node-2", gpu_sizes=[gpu], labels=H100_LABEL, diffusion=True)
            cluster.start_operator("--heartbeat-grace", "30")
            docs = _model_deployments(args.examples)
            applied = cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=True)
            print(applied.stdout, flush=True)
            custom = client.CustomObjectsApi(api)
            deadline = time.monotonic() + args.timeout
            converged = False
            while time.monotonic() < deadline:
                print(cp.kubectl("get", "vram", "-A").stdout, flush=True)
                if _all_ready(custom, len(docs)):
                    converged = True
                    break
                time.sleep(3)
            print(cp.kubectl("get", "events", "-n", "default", "--sort-by=.lastTimestamp").stdout)
            if not converged:
                print("did not converge in time; logs:\n" + cluster.logs(), file=sys.stderr)
                return 1
            print("every ModelDeployment is Ready.", flush=True)
            _, gateway = cluster.start_gateway()
            for name in GATEWAY_MODELS:
                answer = _chat(gateway, name, "Say hello in five words.")
                print(f"gateway {gateway} -> {name}: {answer}", flush=True)
            if any(d["metadata"]["name"] == IMAGE_MODEL for d in docs):
                print(f"gateway {gateway} -> {IMAGE_MODEL}: {_image(gateway, IMAGE_MODEL)}")
            if args.keep_running:
                print(f"export KUBECONFIG={kubeconfig}   # Ctrl-C stops everything", flush=True)
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        finally:
            cluster.stop()
            api.close()
