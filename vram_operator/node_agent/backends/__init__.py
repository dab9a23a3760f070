"""The inference servers beside the agent, behind one interface (`ModelBackend`).

- `OllamaBackend`: Ollama's HTTP API; one server holds many models.
- `VLLMBackend`: our vLLM supervisor, which runs one `vllm serve` per model.
- `DiffusersBackend`: our diffusion server, which holds several Stable Diffusion pipelines.
"""

from .base import (
    AiohttpTransport,
    BackendError,
    LoadRequest,
    ModelBackend,
    ProgressCallback,
    ResidentInfo,
    Response,
    RetryPolicy,
    Transport,
    with_retries,
)
from .diffusers import DiffusersBackend, backend_args
from .ollama import OllamaBackend
from .vllm import VLLMBackend

__all__ = [
    "AiohttpTransport",
    "BackendError",
    "DiffusersBackend",
    "LoadRequest",
    "ModelBackend",
    "OllamaBackend",
    "ProgressCallback",
    "ResidentInfo",
    "Response",
    "RetryPolicy",
    "Transport",
    "VLLMBackend",
    "backend_args",
    "with_retries",
]
