"""The node agent: measures GPUs and host memory, loads and evicts models, reports to GPUNode."""
