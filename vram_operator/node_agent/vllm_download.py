"""`python -m vram_operator.node_agent.vllm_download MODEL`: fetch a model's files for vLLM.

The vLLM supervisor's default download command, run in the vLLM sidecar, where
`huggingface_hub` is installed with vLLM. It fetches what `vllm serve` reads -- the weights in
the first format the repository has (safetensors, else .bin/.pt, the order of vLLM 0.11.0
model_executor/model_loader/weight_utils.py `download_weights_from_hf`), and the config,
tokenizer and chat-template files -- into the Hugging Face cache ($HF_HOME), where vLLM then
finds them without downloading anything itself.

Progress goes to stdout as JSON lines: `{"completedBytes": N, "totalBytes": M}` about once a
second (bytes of the wanted files present in the cache's blobs, finished or not), and at the
end `{"path": SNAPSHOT}`. Exit 0 once every file is there; 1 with the hub's message on stderr
(RepositoryNotFoundError, GatedRepoError, a network error, ...).
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_WEIGHT_FORMATS = ("*.safetensors", "*.bin", "*.pt")
_SIDE_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
_SKIPPED_FOLDERS = ("original/*", "consolidated*")
"""Checkpoints for other runtimes that many repositories carry beside the HF weights."""


def wanted_files(names: Sequence[str]) -> list[str]:
    """The files `vllm serve` needs out of a repository's file names."""
    kept = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in _SKIPPED_FOLDERS)]
    weights: list[str] = []
    for pattern in _WEIGHT_FORMATS:
        weights = [n for n in kept if fnmatch.fnmatch(n, pattern)]
        if weights:
            break
    side = [
        n
        for n in kept
        if n not in weights
        and any(fnmatch.fnmatch(n, p) for p in _SIDE_FILES)
        and not any(fnmatch.fnmatch(n, p) for p in _WEIGHT_FORMATS)
    ]
    return sorted(weights + side)


def bytes_present(repo_folder: Path) -> int:
    """Bytes in the cache's blobs of one repository, finished and in progress."""
    blobs = repo_folder / "blobs"
    if not blobs.is_dir():
        return 0
    total = 0
    for blob in blobs.iterdir():
        try:
            total += blob.stat().st_size
        except OSError:
            continue  # renamed from .incomplete as we looked
    return total


def download(
    model: str,
    hub: Any,
    emit: Callable[[dict[str, Any]], None],
    interval: float = 1.0,
    select: Callable[[Sequence[str]], list[str]] = wanted_files,
) -> str:
    """Fetch `model` with `hub` (the huggingface_hub module); the snapshot folder. `select`
    picks the files to fetch out of the repository's (default: what `vllm serve` reads)."""
    revision = os.environ.get("VRAM_MODEL_REVISION") or None
    info = hub.HfApi().model_info(model, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = select(list(sizes))
    total = sum(sizes[name] for name in files)
    emit({"completedBytes": 0, "totalBytes": total})
    cache = Path(hub.constants.HF_HUB_CACHE)
    repo_folder = cache / ("models--" + model.replace("/", "--"))
    already = bytes_present(repo_folder)
    done = threading.Event()
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["path"] = hub.snapshot_download(
                model, revision=info.sha, allow_patterns=files, max_workers=4
            )
        except BaseException as err:  # reported by the caller's thread
            result["error"] = err
        finally:
            done.set()

    worker = threading.Thread(target=fetch, name=f"download {model}", daemon=True)
    worker.start()
    while not done.wait(interval):
        present = max(bytes_present(repo_folder) - already, 0)
        emit({"completedBytes": min(present, total), "totalBytes": total})
    if "error" in result:
        raise result["error"]
    emit({"completedBytes": total, "totalBytes": total})
    return str(result["path"])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m vram_operator.node_agent.vllm_download MODEL", file=sys.stderr)
        return 2

    def emit(report: dict[str, Any]) -> None:
        print(json.dumps(report), flush=True)

    try:
        hub = importlib.import_module("huggingface_hub")
    except ImportError:
        print("huggingface_hub is not installed in this container", file=sys.stderr)
        return 1
    try:
        path = download(args[0], hub, emit)
    except Exception as err:
        print(f"{type(err).__module__}.{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    emit({"path": path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
