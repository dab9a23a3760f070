"""Which replica answers a request: pure decisions over the API models, no I/O.

The gateway's whole view of the cluster is the ModelDeployments (what may be served, under which
names) and the GPUNodes (where each is resident, in which state, at which address, and whether
the node's agent still reports). From those it builds one `Target` per deployment; a request's
`model` is resolved to a target (`resolve`), and a replica is picked for it (`pick`).

- A replica is ready when its GPUNode lists the deployment's assignment key in
  `status.models` with state Loaded and the node's heartbeat is younger than the grace. Loading,
  Sleeping (parked in host RAM) and the rest are not ready: requests for them wait at the
  gateway (see `admit`) while residency catches up, because a request to a sleeping vLLM 0.11
  kills its engine and a loading one cannot answer.
- Where a replica answers: vLLM reports the model's own `endpoint` (its OpenAI base URL is that
  + /v1); Ollama serves every model at the backend's own address (`status.backends`), under
  the name the agent loaded it as: the deployment's `spec.model`, or the derived model that
  carries `spec.ollama.options` (the agent's naming rule, imported rather than copied, so the
  two can never disagree).
- Names: a deployment is called by its name, `namespace/name`, or its `spec.model` when exactly
  one deployment has that model; anything else is unknown or ambiguous, with the candidates.
- Pick: least outstanding requests (the gateway's own count per replica), ties broken by a
  turn counter so sequential requests alternate rather than always hit the first replica.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from vram_operator.api import Backend, GPUNode, ModelDeployment, ModelState, assignment_key
from vram_operator.node_agent.backends.ollama_names import (
    derived_model_name,
    same_model,
    short_model_name,
)

DEFAULT_HEARTBEAT_GRACE = 30.0
"""Seconds without an agent report after which a node's replicas get no requests (three of the
chart's 10 s report intervals)."""


@dataclass(frozen=True)
class Replica:
    """One resident copy of a model, as a request reaches it."""

    node: str
    backend: Backend
    base_url: str
    """Ollama: the server's address (http://IP:11434); vLLM: the model's endpoint, whose
    OpenAI API is under /v1."""
    served_model: str
    """The `model` the backend answers to."""

    @property
    def id(self) -> str:
        """Identifies the replica in the outstanding-request count and the metrics."""
        return f"{self.node}/{self.base_url}"


@dataclass(frozen=True)
class ReplicaState:
    """Where a replica is and what state its node reports, ready or not."""

    node: str
    state: ModelState
    fresh: bool
    """Whether the node's agent reported within the heartbeat grace."""
    vram_bytes: int | None = None


@dataclass(frozen=True)
class Target:
    """A ModelDeployment as the gateway serves it."""

    namespace: str
    name: str
    model: str
    """spec.model."""
    backend: Backend
    replicas: int
    """spec.replicas, or spec.autoscaling.maxReplicas (0 only when it is switched off)."""
    ready: tuple[Replica, ...] = ()
    states: tuple[ReplicaState, ...] = ()
    created: dt.datetime | None = None

    @property
    def key(self) -> str:
        """`namespace/name`, the name that is never ambiguous."""
        return f"{self.namespace}/{self.name}"

    @property
    def assignment_key(self) -> str:
        return assignment_key(self.namespace, self.name)

    @property
    def state(self) -> str:
        """Ready when a replica can answer, else the most advanced state of any replica."""
        if self.ready:
            return "Ready"
        order = (ModelState.SLEEPING, ModelState.LOADING, ModelState.PENDING, ModelState.UNLOADING)
        for state in order:
            if any(s.state is state for s in self.states):
                return state.value
        if any(s.state is ModelState.LOADED for s in self.states):
            return "Stale"  # loaded on nodes whose agents stopped reporting
        if any(s.state is ModelState.FAILED for s in self.states):
            return ModelState.FAILED.value
        return ModelState.PENDING.value


def _ollama_name(deployment: ModelDeployment) -> str:
    options = deployment.spec.ollama.options if deployment.spec.ollama else {}
    model = deployment.spec.model
    return derived_model_name(model, options) if options else short_model_name(model)


def fresh(node: GPUNode, now: dt.datetime, grace: float) -> bool:
    """Whether the node's agent reported within `grace` seconds of `now`."""
    beat = node.status.last_heartbeat_time if node.status else None
    return beat is not None and (now - beat).total_seconds() <= grace


def build_targets(
    deployments: Iterable[ModelDeployment],
    nodes: Iterable[GPUNode],
    now: dt.datetime,
    grace: float = DEFAULT_HEARTBEAT_GRACE,
) -> dict[str, Target]:
    """Every servable deployment by `namespace/name`, with its ready replicas.

    A deployment being deleted is left out: its replicas are on their way out.
    """
    resident: dict[str, list[tuple[GPUNode, bool]]] = {}
    node_list = list(nodes)
    for node in node_list:
        is_fresh = fresh(node, now, grace)
        for model in node.status.models if node.status else []:
            resident.setdefault(model.key, []).append((node, is_fresh))
    targets: dict[str, Target] = {}
    for deployment in deployments:
        meta = deployment.metadata
        if meta.get("deletionTimestamp"):
            continue
        namespace, name = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
        spec = deployment.spec
        key = assignment_key(namespace, name)
        ready: list[Replica] = []
        states: list[ReplicaState] = []
        for node, is_fresh in resident.get(key, []):
            assert node.status is not None
            entry = next(m for m in node.status.models if m.key == key)
            node_name = str(node.metadata.get("name") or "")
            states.append(ReplicaState(node_name, entry.state, is_fresh, entry.vram_bytes))
            if entry.state is not ModelState.LOADED or not is_fresh:
                continue
            replica = _replica(deployment, node, node_name, entry.endpoint)
            if replica is not None:
                ready.append(replica)
        created = meta.get("creationTimestamp")
        targets[f"{namespace}/{name}"] = Target(
            namespace=namespace,
            name=name,
            model=spec.model,
            backend=spec.backend,
            # Autoscaled: at zero it is asleep, not off; a request waits while it comes back.
            replicas=spec.autoscaling.max_replicas if spec.autoscaling else spec.replicas,
            ready=tuple(sorted(ready, key=lambda r: r.node)),
            states=tuple(sorted(states, key=lambda s: s.node)),
            created=_timestamp(created),
        )
    return targets


def _replica(
    deployment: ModelDeployment, node: GPUNode, node_name: str, endpoint: str | None
) -> Replica | None:
    backend = deployment.spec.backend
    if backend in (Backend.VLLM, Backend.DIFFUSERS):
        if not endpoint:
            return None  # an older agent that reports no address: unreachable
        return Replica(node_name, backend, endpoint.rstrip("/"), deployment.spec.model)
    assert node.status is not None
    server = next((b for b in node.status.backends if b.name is Backend.OLLAMA and b.healthy), None)
    if server is None or not server.endpoint:
        return None
    base = (endpoint or server.endpoint).rstrip("/")
    return Replica(node_name, backend, base, _ollama_name(deployment))


def _timestamp(value: object) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Resolution:
    """What a request's `model` names: one target, or none with the candidates."""

    target: Target | None
    reason: str = ""
    """"unknown" or "ambiguous" when there is no target."""
    candidates: tuple[str, ...] = ()
    """For unknown: every name the gateway knows; for ambiguous: the deployments it could be."""


def resolve(requested: str, targets: Mapping[str, Target]) -> Resolution:
    """The target `requested` names: `namespace/name`, a name unique across namespaces, or a
    spec.model exactly one deployment has (Ollama's name rules for Ollama models, so
    `llama3.2` finds `llama3.2:latest`)."""
    text = requested.strip()
    if text in targets:
        return Resolution(targets[text])
    by_name = [t for t in targets.values() if t.name == text]
    if len(by_name) == 1:
        return Resolution(by_name[0])
    by_model = [t for t in targets.values() if _same_model(t, text)]
    if len(by_model) == 1 and not by_name:
        return Resolution(by_model[0])
    matches = by_name or by_model
    if matches:
        return Resolution(None, "ambiguous", tuple(sorted(t.key for t in matches)))
    return Resolution(None, "unknown", tuple(public_names(targets).values()))


def _same_model(target: Target, text: str) -> bool:
    if target.model == text:
        return True
    return target.backend is Backend.OLLAMA and same_model(target.model, text)


def public_names(targets: Mapping[str, Target]) -> dict[str, str]:
    """The name each target is listed under (in /v1/models and /api/tags): its name where no
    other namespace uses it, else `namespace/name`; sorted by that name."""
    counts: dict[str, int] = {}
    for target in targets.values():
        counts[target.name] = counts.get(target.name, 0) + 1
    names = {
        key: (target.name if counts[target.name] == 1 else key) for key, target in targets.items()
    }
    return dict(sorted(names.items(), key=lambda item: item[1]))


@dataclass
class Picker:
    """Least outstanding requests per replica, ties taken in turn."""

    outstanding: dict[str, int] = field(default_factory=dict)
    turn: int = 0

    def pick(self, replicas: Sequence[Replica], exclude: Iterable[str] = ()) -> Replica | None:
        """The replica to send the next request to, or None when every one is excluded."""
        skipped = set(exclude)
        choices = [r for r in replicas if r.id not in skipped]
        if not choices:
            return None
        fewest = min(self.outstanding.get(r.id, 0) for r in choices)
        tied = [r for r in choices if self.outstanding.get(r.id, 0) == fewest]
        self.turn += 1
        return tied[self.turn % len(tied)]

    def begin(self, replica: Replica) -> None:
        self.outstanding[replica.id] = self.outstanding.get(replica.id, 0) + 1

    def end(self, replica: Replica) -> None:
        left = self.outstanding.get(replica.id, 0) - 1
        if left > 0:
            self.outstanding[replica.id] = left
        else:
            self.outstanding.pop(replica.id, None)


@dataclass(frozen=True)
class Admission:
    """Whether a request that finds no ready replica may wait, and if not, the answer."""

    wait: bool
    status: int = 0
    retry_after: int = 0
    message: str = ""


def admit(waiting: int, queue_size: int, target: Target, timeout: float) -> Admission:
    """A request for `target` with no ready replica waits if its queue has room; else 429.

    `waiting` is how many requests already wait for it. A deployment scaled to zero replicas
    has nothing to wait for (the gateway never loads models itself): 503 at once.
    """
    if target.replicas == 0:
        return Admission(
            False, 503, max(int(timeout), 1), f"{target.key} has 0 replicas; scale it up to use it"
        )
    if waiting >= queue_size:
        return Admission(
            False,
            429,
            max(int(timeout // 4), 1),
            f"{target.key} is {target.state}; {waiting} requests already wait for it "
            f"(queue size {queue_size})",
        )
    return Admission(True)


def timed_out(target: Target, timeout: float) -> Admission:
    """The answer to a request that waited `timeout` seconds without a ready replica."""
    return Admission(
        False,
        503,
        max(int(timeout // 4), 1),
        f"{target.key} has no ready replica after {timeout:g}s (state {target.state})",
    )
