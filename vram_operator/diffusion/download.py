"""`python -m vram_operator.diffusion.download MODEL`: fetch a diffusers pipeline's files.

The diffusion server's default download command, with the progress lines and exit codes of
`vram_operator.node_agent.vllm_download` (whose fetch it reuses): only what
`DiffusionPipeline.from_pretrained` reads from a diffusers folder -- model_index.json, each
component's configs, tokenizer files, and one set of safetensors weights per component (the
plain files, else the fp16 variant) -- never the single-file checkpoints many repositories
also carry at their top level (`sd_xl_base_1.0.safetensors`, 6.9 GB) or other formats.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from vram_operator.node_agent.vllm_download import download

_SIDE_FILES = ("*.json", "*.txt", "*.model")


def diffusers_files(names: Sequence[str]) -> list[str]:
    """The files a diffusers folder needs, out of a repository's file names."""
    kept = [n for n in names if "/" not in n and fnmatch.fnmatch(n, "*.json")]
    by_folder: dict[str, list[str]] = defaultdict(list)
    for name in names:
        if name.count("/") == 1:
            by_folder[name.split("/", 1)[0]].append(name)
    for files in by_folder.values():
        kept += [n for n in files if any(fnmatch.fnmatch(n, p) for p in _SIDE_FILES)]
        weights: dict[str, list[str]] = defaultdict(list)
        for name in files:
            if name.endswith(".safetensors"):
                parts = name.rsplit("/", 1)[1].split(".")
                weights[parts[-2] if len(parts) >= 3 else ""].append(name)
        if weights:
            kept += weights[""] if "" in weights else weights[min(weights)]
    return sorted(set(kept))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m vram_operator.diffusion.download MODEL", file=sys.stderr)
        return 2

    def emit(report: dict[str, Any]) -> None:
        print(json.dumps(report), flush=True)

    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        print("huggingface_hub is not installed in this container", file=sys.stderr)
        return 1
    try:
        path = download(args[0], hub, emit, select=diffusers_files)
    except Exception as err:
        print(f"{type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    emit({"path": path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
