"""The serving path: `vram-operator gateway`, one OpenAI- and Ollama-compatible endpoint that
routes each request to a resident replica and holds it while its model becomes ready.

`routing` (pure: targets, names, picking, admission), `protocol` (pure: the APIs' shapes),
`demand` (pure: per-model figures for the agents), `metrics`, `view` (list and watch of the
cluster, read-only), `server` (aiohttp), `main` (the command).
"""
