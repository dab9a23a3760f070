"""`python -m vram_operator.simulation.fake_hf_download MODEL`: the vLLM supervisor's download
command (`vram_operator.node_agent.vllm_download`) without a network.

After VRAM_SIM_VLLM_DOWNLOAD_SECONDS it leaves a small safetensors model with a config.json in
the Hugging Face cache's layout ($HF_HUB_CACHE, else $HF_HOME/hub), printing the same JSON
progress lines as the real command. A model named `missing/...` fails as a repository that
does not exist, with huggingface_hub's message.

Standard library only: one runs per vLLM model a burst places, and a process that imports
aiohttp and pydantic costs ~0.7 CPU seconds -- on a 2-core test machine that starves the API
server the test is about.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

Json = dict[str, Any]

FAKE_CONFIG: Json = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
    "vocab_size": 1000,
    "torch_dtype": "bfloat16",
}
"""The config.json of every downloaded fake model: a tiny Qwen2-shaped transformer."""


def hub_cache(environment: Mapping[str, str]) -> Path:
    """Where Hugging Face keeps downloads: $HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface."""
    if environment.get("HF_HUB_CACHE"):
        return Path(environment["HF_HUB_CACHE"])
    home = environment.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def download(model: str, environment: Mapping[str, str] | None = None) -> int:
    """Leave `model` in the Hugging Face cache's layout (models--org--name/refs/main,
    snapshots/<revision>/...), printing `{"completedBytes", "totalBytes"}` lines, then
    `{"path"}`; 1 with the hub's message for a model under `missing/`."""
    environment = os.environ if environment is None else environment
    if model.startswith("missing/"):
        print(
            f"huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. "
            f"Repository Not Found for url: https://huggingface.co/api/models/{model}",
            file=sys.stderr,
        )
        return 1
    weights = 1000 * 64 * 2
    header = {
        "model.embed_tokens.weight": {
            "dtype": "BF16",
            "shape": [1000, 64],
            "data_offsets": [0, weights],
        }
    }
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\0" * weights
    total = len(blob)
    seconds = float(environment.get("VRAM_SIM_VLLM_DOWNLOAD_SECONDS", "").strip() or 0)
    steps = 4
    for step in range(steps):
        print(
            json.dumps({"completedBytes": total * step // steps, "totalBytes": total}), flush=True
        )
        time.sleep(seconds / steps)
    revision = hashlib.sha1(model.encode()).hexdigest()
    repo = hub_cache(environment) / ("models--" + model.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "config.json").write_text(json.dumps(FAKE_CONFIG))
    (snapshot / "model.safetensors").write_bytes(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    print(json.dumps({"completedBytes": total, "totalBytes": total}), flush=True)
    print(json.dumps({"path": str(snapshot)}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m vram_operator.simulation.fake_hf_download MODEL", file=sys.stderr)
        return 2
    return download(args[0])


if __name__ == "__main__":
    sys.exit(main())
