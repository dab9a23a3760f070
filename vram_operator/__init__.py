"""vram-operator: keep LLM and diffusion models resident in GPU memory across a cluster."""

__version__ = "0.1.0"
