"""How many replicas a model with spec.autoscaling wants, from the gateway's demand figures.

Pure: figures (`ModelDemand`, summed over every gateway replica), the policy, the previous
`ScaleState` and a clock reading in; the next state out. The service polls the gateways' /demand
and calls `next_scale` once per poll for each autoscaled model, so demand costs the API server
one status write per change of the replica count, never one per request.

The rule, the HPA's with in-flight requests as the metric:

- each poll recommends ceil((inFlight + waiting) / targetInFlight), clamped to
  [minReplicas, maxReplicas];
- the desired count is the largest recommendation of the last scaleDownDelay (the HPA's
  scale-down stabilization window): up at once, down only after the delay;
- never below one while the model had a request within scaleDownDelay (a poll every few seconds
  misses short requests in flight; the gateway's last request time does not), so with
  minReplicas 0 a model goes to zero exactly scaleDownDelay after its last request, and a
  request held at the gateway (counted in `waiting`) brings it back;
- unknown demand (no gateway answered) recommends nothing: the count stays where it is, as the
  HPA does when its metrics cannot be read. A model created or first seen counts as asked for
  then, so a new one loads once rather than waiting for its first request.

Why the count lives in status.desiredReplicas and not in spec.replicas (which an HPA writes):
spec is the user's, and the tools that apply it (kubectl apply, Helm, Argo CD, Flux) would put
their value back on every sync and fight the operator; every write would bump the generation
the agents key their loads on. And spec.replicas 0 means "off": the gateway answers 503 at
once, whereas an autoscaled model at zero is asleep and its next request waits for it. So the
operator writes only status (as it does for everything else), spec.replicas keeps meaning what
the user or an HPA set, and it is not used while spec.autoscaling is present.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from vram_operator.api.demand import ModelDemand
from vram_operator.api.modeldeployment import Autoscaling


@dataclass(frozen=True)
class ScaleState:
    """One autoscaled model's count and the recommendations that decide its next one."""

    desired: int
    changed_at: dt.datetime | None = None
    """When `desired` last changed (status.lastScaleTime)."""
    window: tuple[tuple[dt.datetime, int], ...] = ()
    """Recommendations within the last scaleDownDelay, oldest first."""
    last_request: dt.datetime | None = None
    """The latest request the gateways reported, or when the model was first seen."""
    why: str = field(default="", compare=False)
    """For a person: what the count follows."""

    @classmethod
    def initial(
        cls, policy: Autoscaling, seen: dt.datetime, previous: int | None = None
    ) -> ScaleState:
        """A model first seen at `seen`: the count it had (status.desiredReplicas, after an
        operator restart), held for a window, or one replica within the bounds."""
        desired = previous if previous is not None else max(policy.min_replicas, 1)
        desired = min(max(desired, policy.min_replicas), policy.max_replicas)
        return cls(
            desired=desired,
            window=((seen, desired),),
            last_request=seen if previous is None or previous > 0 else None,
            why="first seen" if previous is None else "the count status had",
        )


def recommend(policy: Autoscaling, demand: ModelDemand | None) -> int:
    """The replicas the figures of one poll call for, within the bounds."""
    busy = demand.busy if demand is not None else 0
    wanted = math.ceil(busy / policy.target_in_flight)
    return min(max(wanted, policy.min_replicas), policy.max_replicas)


def next_scale(
    policy: Autoscaling,
    state: ScaleState,
    demand: ModelDemand | None,
    known: bool,
    now: dt.datetime,
) -> ScaleState:
    """The state after one poll. `known` is False when no gateway answered: then nothing is
    recommended and the count only follows what earlier polls asked for (never down to zero
    for want of figures)."""
    delay = dt.timedelta(seconds=policy.scale_down_delay_seconds)
    last = state.last_request
    asked = demand.last_request if demand is not None else None
    if asked is not None and (last is None or asked > last):
        last = asked
    window = [(t, n) for t, n in state.window if now - t < delay]
    if known:
        window.append((now, recommend(policy, demand)))
    elif not window:
        window.append((now, state.desired))  # no figures: hold, not down
    desired = max(n for _, n in window)
    why = f"{demand.busy if demand else 0} requests in flight or waiting"
    recent = last is not None and now - last < delay
    if desired == 0 and (recent or (demand is not None and demand.busy > 0)):
        desired = min(1, policy.max_replicas)
        why = "a request within scaleDownDelay"
    if desired == 0:
        idle = "no request yet" if last is None else f"no request since {_iso(last)}"
        why = f"{idle}; scaled to zero after {policy.scale_down_delay}"
    changed = state.changed_at if desired == state.desired else now
    return ScaleState(desired, changed, tuple(window), last, why)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
