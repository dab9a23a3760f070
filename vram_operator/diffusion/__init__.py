"""Stable Diffusion pipelines kept resident: `vram-operator diffusion-server` and its parts.

- `family`: which family a pipeline folder holds (SD1.x, SD2.x, SDXL base, SDXL refiner,
  inpainting variants), from its configs.
- `estimate`: its VRAM from the safetensors headers, before loading.
- `pipelines`, `server`: the server the agent's `diffusers` backend drives over HTTP.
- `runtime`: what runs the pipelines (`torch_runtime`, or the simulation's fake).
"""
