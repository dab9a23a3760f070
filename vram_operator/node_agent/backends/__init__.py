"""The inference servers beside the agent, behind one interface (`ModelBackend`).

- `OllamaBackend`: Ollama's HTTP API; one server holds many models.
- `VLLMBackend`: our vLLM supervisor, which runs one `vllm serve` per model.
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
from .ollama import OllamaBackend
from .vllm import VLLMBackend

__all__ = [
    "AiohttpTransport",
    "BackendError",
    "LoadRequest",
    "ModelBackend",
    "OllamaBackend",
    "ProgressCallback",
    "ResidentInfo",
    "Response",
    "RetryPolicy",
    "Transport",
    "VLLMBackend",
    "with_retries",
]
