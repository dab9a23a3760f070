"""Stand-ins for what a test machine lacks: a GPU, an Ollama binary, vLLM.

Used by the integration tests, the README demo and the capacity simulator; nothing in the
operator or the agent uses them unless told to by an explicit option.

- `gpu`: simulated GPUs of one node, a JSON state file shared by every process on that node;
  `gpu_source`: `SimulatedGPUSource`, the agent's GPU source over it.
- `fake_ollama`: an HTTP server speaking Ollama's API, loading models into the simulated GPU.
- `fake_vllm`: the program run instead of `vllm serve`, speaking vLLM's OpenAI server endpoints;
  `serving`: how both fake servers listen and stop.
- `nodes`: whole simulated nodes (fake backends and a real agent) as processes.

`gpu`, `fake_ollama` and `fake_vllm` run with `python -m vram_operator.simulation.<module>`; none
is imported here, so that running one does not import it twice.
"""
