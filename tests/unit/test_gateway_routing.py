"""The gateway's pure decisions: targets from the API models, names, picking, admission."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from vram_operator.api import Backend, GPUNode, ModelDeployment
from vram_operator.gateway import protocol
from vram_operator.gateway.demand import DemandLedger
from vram_operator.gateway.routing import Picker, admit, build_targets, resolve, timed_out

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def deployment(
    name: str, model: str, backend: str = "ollama", namespace: str = "default", **spec: Any
) -> ModelDeployment:
    return ModelDeployment.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": model, "backend": backend, **spec},
        }
    )


def node(name: str, models: list[dict[str, Any]], age: float = 1.0) -> GPUNode:
    return GPUNode.model_validate(
        {
            "metadata": {"name": name},
            "status": {
                "lastHeartbeatTime": (NOW - dt.timedelta(seconds=age)).isoformat(),
                "backends": [
                    {"name": "ollama", "healthy": True, "endpoint": f"http://{name}:11434"},
                    {"name": "vllm", "healthy": True, "endpoint": f"http://{name}:8900"},
                ],
                "models": models,
            },
        }
    )


def resident(key: str, model: str, state: str = "Loaded", **extra: Any) -> dict[str, Any]:
    backend = extra.pop("backend", "ollama")
    return {"key": key, "model": model, "backend": backend, "state": state, **extra}


def test_a_loaded_ollama_model_on_a_fresh_node_is_routed_to_its_backend() -> None:
    targets = build_targets(
        [deployment("chat", "llama3.2:1b")],
        [node("n1", [resident("default.chat", "llama3.2:1b")])],
        NOW,
    )
    target = targets["default/chat"]
    assert target.state == "Ready"
    [replica] = target.ready
    assert (replica.node, replica.base_url, replica.served_model) == (
        "n1",
        "http://n1:11434",
        "llama3.2:1b",
    )


def test_ollama_options_route_to_the_derived_model_the_agent_loaded() -> None:
    spec: dict[str, Any] = {"ollama": {"options": {"num_ctx": 8192}}}
    targets = build_targets(
        [deployment("chat", "llama3.2:1b", **spec)],
        [node("n1", [resident("default.chat", "llama3.2:1b")])],
        NOW,
    )
    served = targets["default/chat"].ready[0].served_model
    assert served.startswith("llama3.2:1b-vram-")
    assert len(served) == len("llama3.2:1b-vram-") + 8


def test_vllm_goes_to_the_endpoint_the_agent_reports_and_not_without_one() -> None:
    qwen = "Qwen/Qwen2.5-0.5B-Instruct"
    with_endpoint = resident("default.q", qwen, backend="vllm", endpoint="http://10.0.0.5:8000/q/")
    targets = build_targets(
        [deployment("q", qwen, backend="vllm")],
        [node("n1", [with_endpoint]), node("n2", [resident("default.q", qwen, backend="vllm")])],
        NOW,
    )
    [replica] = targets["default/q"].ready
    assert (replica.base_url, replica.served_model) == ("http://10.0.0.5:8000/q", qwen)


@pytest.mark.parametrize(
    ("state", "age", "shown"),
    [
        ("Loading", 1.0, "Loading"),
        ("Sleeping", 1.0, "Sleeping"),
        ("Failed", 1.0, "Failed"),
        ("Loaded", 31.0, "Stale"),
    ],
)
def test_only_loaded_replicas_on_fresh_nodes_are_ready(state: str, age: float, shown: str) -> None:
    targets = build_targets(
        [deployment("chat", "llama3.2:1b")],
        [node("n1", [resident("default.chat", "llama3.2:1b", state)], age=age)],
        NOW,
        grace=30.0,
    )
    assert targets["default/chat"].ready == ()
    assert targets["default/chat"].state == shown


def test_a_deployment_being_deleted_is_not_served() -> None:
    gone = deployment("chat", "llama3.2:1b")
    gone.metadata["deletionTimestamp"] = NOW.isoformat()
    assert build_targets([gone], [], NOW) == {}


def test_names_resolve_by_name_namespace_name_and_unambiguous_model() -> None:
    targets = build_targets(
        [
            deployment("chat", "llama3.2:1b"),
            deployment("chat", "llama3.2:3b", namespace="team-b"),
            deployment("embed", "nomic-embed-text:latest"),
        ],
        [],
        NOW,
    )
    assert resolve("default/chat", targets).target == targets["default/chat"]
    assert resolve("embed", targets).target == targets["default/embed"]
    # Ollama's name rules for spec.model: the tag defaults to latest, case is ignored.
    assert resolve("Nomic-Embed-Text", targets).target == targets["default/embed"]
    assert resolve("llama3.2:3b", targets).target == targets["team-b/chat"]
    ambiguous = resolve("chat", targets)
    assert ambiguous.target is None
    assert ambiguous.reason == "ambiguous"
    assert ambiguous.candidates == ("default/chat", "team-b/chat")
    unknown = resolve("gpt-4", targets)
    assert unknown.target is None
    assert unknown.reason == "unknown"
    assert unknown.candidates == ("default/chat", "embed", "team-b/chat")
    message = protocol.not_found_message("gpt-4", unknown.reason, unknown.candidates)
    assert message == "model 'gpt-4' not found; known models: default/chat, embed, team-b/chat"


def test_a_model_two_deployments_share_is_ambiguous() -> None:
    targets = build_targets(
        [deployment("a", "llama3.2:1b"), deployment("b", "llama3.2:1b")], [], NOW
    )
    resolution = resolve("llama3.2:1b", targets)
    assert (resolution.reason, resolution.candidates) == ("ambiguous", ("default/a", "default/b"))


def _two_replicas() -> tuple[Any, ...]:
    targets = build_targets(
        [deployment("chat", "llama3.2:1b", replicas=2)],
        [
            node("n1", [resident("default.chat", "llama3.2:1b")]),
            node("n2", [resident("default.chat", "llama3.2:1b")]),
        ],
        NOW,
    )
    return targets["default/chat"].ready


def test_sequential_requests_alternate_between_idle_replicas() -> None:
    replicas = _two_replicas()
    picker = Picker()
    picked = [picker.pick(replicas) for _ in range(4)]
    assert [r.node for r in picked if r] == ["n2", "n1", "n2", "n1"]


def test_the_replica_with_fewest_outstanding_requests_is_picked() -> None:
    n1, n2 = _two_replicas()
    picker = Picker()
    picker.begin(n1)
    picker.begin(n1)
    picker.begin(n2)
    assert picker.pick([n1, n2]) == n2
    picker.end(n1)
    picker.end(n1)
    assert picker.pick([n1, n2]) == n1
    assert picker.outstanding == {n2.id: 1}


def test_a_failed_replica_is_excluded_and_none_is_left_after_all() -> None:
    n1, n2 = _two_replicas()
    picker = Picker()
    assert picker.pick([n1, n2], exclude={n1.id}) == n2
    assert picker.pick([n1, n2], exclude={n1.id, n2.id}) is None


def test_admission_waits_until_the_queue_is_full_then_429() -> None:
    target = build_targets([deployment("chat", "llama3.2:1b")], [], NOW)["default/chat"]
    assert admit(9, 10, target, 60).wait
    full = admit(10, 10, target, 60)
    assert (full.wait, full.status, full.retry_after) == (False, 429, 15)
    assert "10 requests already wait" in full.message
    late = timed_out(target, 60)
    assert (late.status, late.retry_after) == (503, 15)
    assert "no ready replica after 60s" in late.message


def test_a_deployment_scaled_to_zero_is_not_waited_for() -> None:
    target = build_targets([deployment("chat", "llama3.2:1b", replicas=0)], [], NOW)
    answer = admit(0, 10, target["default/chat"], 60)
    assert (answer.wait, answer.status) == (False, 503)


def test_listings_name_each_model_once_with_its_state() -> None:
    targets = build_targets(
        [
            deployment("chat", "llama3.2:1b"),
            deployment("q", "Qwen/Qwen2.5-0.5B-Instruct", backend="vllm"),
        ],
        [node("n1", [resident("default.chat", "llama3.2:1b", vramBytes=2**31)])],
        NOW,
    )
    models = protocol.openai_models(targets)
    assert [(m["id"], m["state"], m["backend"]) for m in models["data"]] == [
        ("chat", "Ready", "ollama"),
        ("q", "Pending", "vllm"),
    ]
    tags = protocol.ollama_tags(targets)["models"]
    assert [(t["name"], t["size"]) for t in tags] == [("chat", 2**31)]
    ps = protocol.ollama_ps(targets, NOW)["models"]
    assert [(p["name"], p["size_vram"]) for p in ps] == [("chat", 2**31)]


def test_error_shapes_are_recognised_and_others_wrapped() -> None:
    assert protocol.is_error_shape(b'{"error": "model not found"}', "ollama")
    assert not protocol.is_error_shape(b'{"error": "model not found"}', "openai")
    assert protocol.is_error_shape(b'{"error": {"message": "x", "type": "y"}}', "openai")
    assert not protocol.is_error_shape(b"<html>Bad Gateway</html>", "openai")
    wrapped = protocol.wrap_error(502, b"<html>Bad Gateway</html>", "openai", "vllm")
    assert wrapped["error"]["message"] == "vllm answered 502: <html>Bad Gateway</html>"
    assert protocol.wrap_error(500, b"", "ollama", "ollama") == {
        "error": "ollama answered 500: HTTP 500"
    }


def test_the_demand_ledger_aggregates_per_model() -> None:
    target = build_targets([deployment("chat", "llama3.2:1b")], [], NOW)["default/chat"]
    ledger = DemandLedger()
    for second in range(3):
        ledger.arrived(target, NOW + dt.timedelta(seconds=second))
    ledger.waiting(target, +1)
    ledger.in_flight(target, +1)
    ledger.waiting(target, -1)
    [entry] = ledger.snapshot("gw-0", NOW)["models"]
    assert entry == {
        "namespace": "default",
        "name": "chat",
        "key": "default.chat",
        "backend": Backend.OLLAMA.value,
        "model": "llama3.2:1b",
        "requests": 3,
        "inFlight": 1,
        "waiting": 0,
        "coldWaits": 1,
        "lastRequestTime": "2026-11-01T12:00:02Z",
    }
