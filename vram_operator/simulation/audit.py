"""What a simulated cluster's objects claimed, checked against what its simulated GPUs held.

An `Audit` records, from threads, every ModelDeployment and GPUNode version the API server
emits (a list, then a watch from that resourceVersion, so no version is missed) and samples
which assignment keys each simulated GPU holds. Afterwards it answers the questions the
integration tests and the burst benchmark ask of every snapshot, not only the last:
- did a ModelDeployment show a replica Loaded on a node whose GPU did not hold it, and for
  how long at a stretch (`stale_ready_claims`);
- did a GPUNode list more Loaded+Loading VRAM than its GPU has (`overfull_reports`);
- was a key ever held twice on one node, or on more nodes than it has replicas (`held_twice`).

GPU memory is attributed to keys by owner name: the fake Ollama's owners end in `:<model>`
(models are told apart by name, so give each ModelDeployment its own), the fake vLLM's are
`pid:<pid>:vllm:<port>`, mapped to a key through the node's supervisor listing.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from vram_operator.api import GROUP, VERSION

from .gpu import SimulatedGPUs
from .nodes import SimulatedNode

Body = dict[str, Any]


@dataclass(frozen=True)
class Sample:
    """Keys held per node at one moment (monotonic seconds)."""

    at: float
    held: Mapping[str, frozenset[str]]
    """Node to the assignment keys whose memory its GPUs hold."""
    counts: Mapping[str, Mapping[str, int]]
    """Node to key to how many allocations hold it there (more than one: loaded twice)."""


class Audit:
    """Records a simulated cluster while a scenario runs; checks the records afterwards."""

    def __init__(
        self,
        api: client.ApiClient,
        nodes: Callable[[], Mapping[str, SimulatedNode]],
        model_keys: Callable[[], Mapping[str, str]],
        poll_seconds: float = 0.2,
    ) -> None:
        """`nodes` gives the cluster's current nodes, `model_keys` each Ollama model name's
        assignment key (both read at every sample, so nodes and models may come and go)."""
        self._custom = client.CustomObjectsApi(api)
        self._nodes = nodes
        self._model_keys = model_keys
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.deployments: list[tuple[float, Body]] = []
        self.gpunodes: list[tuple[float, Body]] = []
        self.samples: list[Sample] = []
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(
                target=self._guard, args=(self._watch, "modeldeployments"), daemon=True
            ),
            threading.Thread(target=self._guard, args=(self._watch, "gpunodes"), daemon=True),
            threading.Thread(target=self._guard, args=(self._sample_loop,), daemon=True),
        ]

    def start(self) -> Audit:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    # ---- recording -------------------------------------------------------------------------

    def _guard(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # reported by the checks, never lost in a thread
            self.errors.append(exc)

    def _watch(self, plural: str) -> None:
        sink = self.deployments if plural == "modeldeployments" else self.gpunodes
        version: str | None = None
        while not self._stop.is_set():
            if version is None:
                listing: Any = self._custom.list_cluster_custom_object(GROUP, VERSION, plural)
                stamp = time.monotonic()
                with self._lock:
                    sink.extend((stamp, item) for item in listing["items"])
                version = listing["metadata"]["resourceVersion"]
            stream = watch.Watch().stream(
                self._custom.list_cluster_custom_object,
                GROUP,
                VERSION,
                plural,
                resource_version=version,
                timeout_seconds=1,
            )
            try:
                for event in stream:
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "DELETED":
                        with self._lock:
                            sink.append((time.monotonic(), obj))
            except ApiException as exc:
                if exc.status != 410:
                    raise
                version = None  # compacted: list again

    def _sample_loop(self) -> None:
        while not self._stop.wait(self._poll):
            self.sample()

    def sample(self) -> Sample:
        """Which keys each simulated GPU holds now; recorded and returned."""
        model_keys = self._model_keys()
        held: dict[str, frozenset[str]] = {}
        counts: dict[str, dict[str, int]] = {}
        for name, node in list(self._nodes().items()):
            ports = _vllm_ports(node)
            per_key: dict[str, int] = defaultdict(int)
            with contextlib.suppress(OSError, ValueError):
                for owners in SimulatedGPUs(node.gpu_state).allocations().values():
                    for owner, nbytes in owners.items():
                        key = _owner_key(owner, ports, model_keys)
                        if key is not None and nbytes > 0:
                            per_key[key] += 1
            held[name] = frozenset(per_key)
            counts[name] = dict(per_key)
        sample = Sample(time.monotonic(), held, counts)
        with self._lock:
            self.samples.append(sample)
        return sample

    # ---- checks ----------------------------------------------------------------------------

    def stale_ready_claims(self, tolerance: float) -> list[str]:
        """Every stretch longer than `tolerance` seconds during which a ModelDeployment showed a
        replica Loaded on a node whose GPU did not hold it."""
        with self._lock:
            versions = sorted(self.deployments, key=lambda item: item[0])
            samples = list(self.samples)
        if not samples:
            return ["no GPU samples were taken"]
        claims: dict[str, list[tuple[float, frozenset[str]]]] = defaultdict(list)
        for stamp, body in versions:
            meta = body["metadata"]
            key = f"{meta['namespace']}.{meta['name']}"
            placements = (body.get("status") or {}).get("placements") or []
            loaded = frozenset(p["node"] for p in placements if p.get("state") == "Loaded")
            claims[key].append((stamp, loaded))
        problems = []
        end = samples[-1].at
        for key, timeline in claims.items():
            for index, (since, nodes) in enumerate(timeline):
                until = timeline[index + 1][0] if index + 1 < len(timeline) else end
                for node in nodes:
                    longest = _longest_absence(samples, key, node, since, until)
                    if longest > tolerance:
                        problems.append(
                            f"{key} shown Loaded on {node} for {longest:.1f}s while its GPU "
                            f"held no memory for it"
                        )
        return problems

    def overfull_reports(self) -> list[str]:
        """GPUNode versions listing more Loaded+Loading VRAM on a GPU than it has."""
        problems = []
        with self._lock:
            versions = list(self.gpunodes)
        for _, body in versions:
            status = body.get("status") or {}
            for gpu in status.get("gpus") or []:
                holding = [
                    m
                    for m in status.get("models") or []
                    if m.get("gpuUuid") == gpu["uuid"] and m.get("state") in ("Loaded", "Loading")
                ]
                held = sum(m.get("vramBytes") or 0 for m in holding)
                if held > gpu["totalBytes"]:
                    name, version = body["metadata"]["name"], body["metadata"]["resourceVersion"]
                    listed = ", ".join(
                        f"{m.get('key')} {m.get('state')} {m.get('vramBytes')}" for m in holding
                    )
                    problems.append(
                        f"{name}@{version} {gpu['uuid']}: {held} Loaded+Loading > "
                        f"{gpu['totalBytes']} ({listed})"
                    )
        return problems

    def held_twice(self, replicas: Mapping[str, int]) -> list[str]:
        """Samples in which a key was loaded twice on one node, or on more nodes than its
        replicas (`replicas`: key to spec.replicas)."""
        problems = set()
        with self._lock:
            samples = list(self.samples)
        for sample in samples:
            homes: dict[str, int] = defaultdict(int)
            for node, counts in sample.counts.items():
                for key, count in counts.items():
                    homes[key] += 1
                    if count > 1:
                        problems.add(f"{key} held {count} times on {node}")
            for key, count in homes.items():
                if count > replicas.get(key, 1):
                    problems.add(f"{key} held on {count} nodes at once")
        return sorted(problems)

    def evictions(self) -> list[str]:
        """Every (node, key) a GPUNode ever reported Evicted."""
        with self._lock:
            versions = list(self.gpunodes)
        seen = {
            f"{body['metadata']['name']}: {m['key']} ({m.get('message')})"
            for _, body in versions
            for m in (body.get("status") or {}).get("models") or []
            if m.get("state") == "Evicted"
        }
        return sorted(seen)


def _longest_absence(
    samples: Iterable[Sample], key: str, node: str, since: float, until: float
) -> float:
    """The longest run within [since, until) of samples in which `node` did not hold `key`."""
    longest, started = 0.0, None
    for sample in samples:
        if sample.at < since:
            continue
        if sample.at >= until:
            break
        if key in sample.held.get(node, frozenset()):
            started = None
        else:
            started = sample.at if started is None else started
            longest = max(longest, sample.at - started)
    if started is not None:
        longest = max(longest, min(until, time.monotonic()) - started)
    return longest


def _vllm_ports(node: SimulatedNode) -> dict[int, str]:
    """The node's vLLM children: port to assignment key, from its supervisor's listing."""
    if not node.supervisor_url:
        return {}
    try:
        with urllib.request.urlopen(f"{node.supervisor_url}/models", timeout=2) as answer:
            listing = json.load(answer)
    except (OSError, ValueError):
        return {}
    entries = listing.get("models", listing) if isinstance(listing, dict) else listing
    ports = {}
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("port") and entry.get("key"):
            ports[int(entry["port"])] = str(entry["key"])
    return ports


def _owner_key(owner: str, ports: Mapping[int, str], model_keys: Mapping[str, str]) -> str | None:
    parts = owner.split(":")
    if len(parts) >= 4 and parts[0] == "pid" and parts[2] == "vllm" and parts[3].isdigit():
        return ports.get(int(parts[3]))
    for model, key in model_keys.items():
        if owner.endswith(f":{model}"):
            return key
    return None
