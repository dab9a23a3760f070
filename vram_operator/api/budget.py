"""How much GPU memory one replica takes: the one accounting rule the operator reserves by
and the agent loads by, so the operator never promises memory the agent cannot deliver.

The rule, for a replica whose VRAM figure is `vram` (spec.vram, or the agent's estimate or
measurement) on a GPU of `total` bytes::

    ollama:  footprint = vram
             Ollama's runner holds the weights, the KV cache and its graph in one figure,
             which `/api/ps` reports as size_vram; spec.vram is that whole figure.
    vllm:    utilization = ceil(vram * 1000 / total) / 1000          (at most 0.98)
             footprint   = ceil(utilization * total) + VLLM_INSTANCE_OVERHEAD_BYTES
             `vllm serve --gpu-memory-utilization` takes a fraction of the whole GPU with three
             decimals, so the budget is rounded up to the next 0.1% (up to ~82 MiB on 80 GiB);
             the CUDA context and the CUDA-graph pool of each instance sit outside that budget
             (vLLM 0.11.0 v1/worker/gpu_worker.py), so every instance costs that much more.
    diffusers: footprint = vram
             One diffusion server holds every pipeline of the GPU in one process, so there is
             no per-model process overhead; spec.vram (or the estimate) is the pipeline's
             weights at its dtype plus the activation peak of one image at its resolution,
             which the server keeps room for while the pipeline is resident.

Per GPU, the operator never promises `reserve_bytes(min_free)`: the agents' minimum free
memory plus PLACEMENT_SLACK_BYTES, so the agent's own check (free - min_free >= footprint)
can never refuse a placement the operator made, even when a measurement lands a little above
its figure.
"""

from __future__ import annotations

from .common import Backend

MIB = 2**20

VLLM_INSTANCE_OVERHEAD_BYTES = 512 * MIB
"""Per `vllm serve` instance, outside --gpu-memory-utilization: the CUDA context (~300-500 MiB
on a Hopper GPU with PyTorch 2.8) and the CUDA-graph pool of a small model."""

VLLM_MAX_UTILIZATION_MILLI = 980
"""--gpu-memory-utilization is capped at 0.98, leaving room for the instance overhead."""

PLACEMENT_SLACK_BYTES = 64 * MIB
"""Kept free per GPU beyond the agents' minimum, so a slightly larger measurement never turns
a placement into a refused load."""


class BudgetError(ValueError):
    """A replica that cannot fit on a GPU of this size at all."""


def vllm_utilization_milli(vram_bytes: int, gpu_total_bytes: int) -> int:
    """The --gpu-memory-utilization for a budget, in thousandths, rounded up.

    Raises BudgetError when the budget is not positive or is more than the GPU can give.
    """
    if vram_bytes <= 0 or gpu_total_bytes <= 0:
        raise BudgetError("the VRAM budget and the GPU's total memory must be positive")
    milli = -(-vram_bytes * 1000 // gpu_total_bytes)  # ceiling, in integers
    if milli > VLLM_MAX_UTILIZATION_MILLI:
        raise BudgetError(
            f"{vram_bytes} bytes does not fit: it is {milli / 10:.1f}% of this GPU's "
            f"{gpu_total_bytes} bytes, and vLLM can be given at most "
            f"{VLLM_MAX_UTILIZATION_MILLI / 10:.1f}%"
        )
    return milli


def footprint_bytes(backend: Backend, vram_bytes: int, gpu_total_bytes: int) -> int:
    """GPU memory one replica of `vram_bytes` holds on a GPU of `gpu_total_bytes`.

    A budget that cannot fit the GPU at all gives a figure larger than the GPU, so placement
    simply finds no room there.
    """
    if backend is Backend.VLLM:
        try:
            milli = vllm_utilization_milli(vram_bytes, gpu_total_bytes)
        except BudgetError:
            return max(vram_bytes, gpu_total_bytes + 1) + VLLM_INSTANCE_OVERHEAD_BYTES
        return -(-milli * gpu_total_bytes // 1000) + VLLM_INSTANCE_OVERHEAD_BYTES
    return vram_bytes  # ollama and diffusers: the figure is the whole footprint


def reserve_bytes(min_free_bytes: int) -> int:
    """VRAM per GPU the operator never promises, given the agents' minimum free memory."""
    return min_free_bytes + PLACEMENT_SLACK_BYTES
