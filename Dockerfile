# syntax=docker/dockerfile:1
#
# Images of vram-operator, all from one wheel built once:
#   docker build -t vram-operator:0.1.0 .
#       the default (last) target: `vram-operator` on python:3.11-slim, run as a non-root
#       user; the chart runs it as the operator and as the node agent.
#   docker build --target vllm-sidecar -t vram-operator-vllm:0.1.0 .
#       vllm/vllm-openai with vram-operator installed, for the chart's vllm sidecar, which
#       runs `vram-operator vllm-supervisor` next to the vLLM it starts; as user 10003
#       (vllm/vllm-openai itself runs as root).
#   docker build --target diffusion-sidecar -t vram-operator-diffusion:0.1.0 .
#       a CUDA PyTorch image with vram-operator[diffusion] (diffusers, transformers), for the
#       chart's diffusion sidecar: `vram-operator diffusion-server`, as user 10004.

ARG PYTHON_IMAGE=python:3.11-slim
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
# PyTorch's own CUDA runtime image; the `diffusion` extra pins torch==2.13.0 to match it.
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------- wheel
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vram_operator ./vram_operator
# pip builds the wheel through the PEP 517 backend pyproject.toml names (setuptools).
RUN python -m pip wheel --no-deps --wheel-dir /dist .

# ------------------------------------------------------------ vllm sidecar
# The upstream vLLM image with our supervisor added; its Python and CUDA stay vLLM's own.
FROM ${VLLM_IMAGE} AS vllm-sidecar
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python3 -m pip install /dist/*.whl \
    && vram-operator --version
# The upstream image runs as root; vLLM needs none of it. A user of its own (10003, not the
# agent's 10001 or the chart's Ollama 10002), whose home holds every cache vLLM, PyTorch,
# Triton and Hugging Face write, so the chart can keep the root filesystem read-only and
# mount the model storage at /home/vllm/.cache.
RUN groupadd --system --gid 10003 vllm \
    && useradd --system --uid 10003 --gid vllm --create-home --home-dir /home/vllm \
       --shell /usr/sbin/nologin vllm
ENV HOME=/home/vllm \
    XDG_CACHE_HOME=/home/vllm/.cache \
    XDG_CONFIG_HOME=/home/vllm/.config \
    HF_HOME=/home/vllm/.cache/huggingface \
    TRITON_CACHE_DIR=/home/vllm/.cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/home/vllm/.cache/torchinductor \
    VLLM_NO_USAGE_STATS=1
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser.
USER 10003:10003
EXPOSE 8900
ENTRYPOINT ["vram-operator", "vllm-supervisor"]
CMD ["--port", "8900"]

# ------------------------------------------------------- diffusion sidecar
# PyTorch with CUDA from its own image; the wheel's `diffusion` extra adds diffusers,
# transformers and safetensors (torch is already the pinned one, so pip keeps it).
FROM ${TORCH_IMAGE} AS diffusion-sidecar
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    set -e; wheel=$(ls /dist/*.whl); python -m pip install "${wheel}[diffusion]" \
    && vram-operator --version \
    && python -c "import diffusers, torch; print(diffusers.__version__, torch.__version__)"
# Its own user (10004); its home holds the Hugging Face cache, where the chart mounts the
# pipeline storage, so the root filesystem can stay read-only.
RUN groupadd --system --gid 10004 diffusion \
    && useradd --system --uid 10004 --gid diffusion --create-home --home-dir /home/diffusion \
       --shell /usr/sbin/nologin diffusion
ENV HOME=/home/diffusion \
    XDG_CACHE_HOME=/home/diffusion/.cache \
    HF_HOME=/home/diffusion/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1
USER 10004:10004
# 8950: control API (loopback); 8951: images API.
EXPOSE 8950 8951
ENTRYPOINT ["vram-operator", "diffusion-server"]
CMD ["--port", "8950", "--serve-port", "8951"]

# ------------------------------------------------------- operator and agent
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 vram \
    && useradd --system --uid 10001 --gid vram --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin vram
RUN --mount=type=bind,from=builder,source=/dist,target=/dist \
    python -m pip install /dist/*.whl \
    && vram-operator --version
# Numeric, so Kubernetes can verify runAsNonRoot without a runAsUser.
USER 10001:10001
# 9300: operator metrics; 9400: agent metrics.
EXPOSE 9300 9400
ENTRYPOINT ["vram-operator"]
CMD ["--help"]
