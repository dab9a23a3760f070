"""ModelPolicy checks: what a tenant may ask for, read the way vLLM and Ollama read it."""

from __future__ import annotations

from typing import Any

import pytest

from vram_operator.api import SpecError, parse_spec
from vram_operator.api.modelpolicy import (
    DEFAULT_POLICY,
    ModelPolicy,
    PolicyError,
    check_quota,
    check_spec,
    policies_for,
)

pytestmark = pytest.mark.unit

GI = 2**30


def vllm(*args: str, model: str = "Qwen/Qwen2.5-0.5B-Instruct") -> dict[str, Any]:
    return {"model": model, "backend": "vllm", "vllm": {"args": list(args)}}


def policy(name: str = "team-a", **spec: Any) -> ModelPolicy:
    return ModelPolicy.model_validate({"metadata": {"name": name}, "spec": spec})


def refusal(spec: dict[str, Any], policies: list[ModelPolicy] | None = None) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        check_spec(parse_spec(spec), policies or [DEFAULT_POLICY])
    return caught.value


def test_the_default_refuses_critical_and_names_the_field_and_the_policy() -> None:
    error = refusal({"model": "llama3.2:1b", "backend": "ollama", "priority": "critical"})
    assert error.field == "spec.priority"
    assert error.policy == DEFAULT_POLICY.name
    assert "high, normal, low" in str(error)


def test_a_policy_may_grant_critical() -> None:
    spec = parse_spec({"model": "llama3.2:1b", "backend": "ollama", "priority": "critical"})
    check_spec(spec, [policy(allowedPriorities=["critical", "high", "normal", "low"])])


def test_every_selecting_policy_must_allow() -> None:
    loose = policy("loose", allowedPriorities=["critical"])
    strict = policy("strict", allowedPriorities=["low"])
    error = refusal(
        {"model": "llama3.2:1b", "backend": "ollama", "priority": "critical"}, [loose, strict]
    )
    assert error.policy == "strict"


@pytest.mark.parametrize(
    "arg",
    [
        "--trust-remote-code",
        "--trust_remote_code",
        "--download-dir=/",
        "--chat-template=/etc/shadow",
        "--load-format=pt",
        "--allowed-local-media-path=/",
        "--api-key=secret",
    ],
)
def test_flags_outside_the_default_allow_list_are_refused_in_any_spelling(arg: str) -> None:
    error = refusal(vllm(arg))
    assert error.field == "spec.vllm.args[0]"
    assert "not an allowed vLLM flag" in error.message


@pytest.mark.parametrize("arg", ["--config=/etc/x.yaml", "--config", "--model=evil/model"])
def test_config_and_model_are_never_allowed(arg: str) -> None:
    everything = policy(allowedVllmFlags=["config", "model", "trust-remote-code"])
    assert "never allowed" in refusal(vllm(arg), [everything]).message


def test_abbreviations_of_allowed_flags_are_refused_with_the_full_name() -> None:
    error = refusal(vllm("--max-model=4096"))
    assert "write --max-model-len in full" in error.message


def test_short_options_and_positionals_are_refused() -> None:
    assert "short option" in refusal(vllm("-tp", "2")).message
    assert "positional" in refusal(vllm("other/model")).message


def test_allowed_flags_pass_in_both_forms_and_with_underscores() -> None:
    spec = parse_spec(
        vllm("--max-model-len", "4096", "--max_num_seqs=8", "--enforce-eager", "--seed", "-1")
    )
    check_spec(spec, [DEFAULT_POLICY])


def test_a_policy_may_allow_trust_remote_code() -> None:
    check_spec(
        parse_spec(vllm("--trust-remote-code")), [policy(allowedVllmFlags=["trust-remote-code"])]
    )


@pytest.mark.parametrize(
    "arg",
    [
        "--gpu_memory_utilization=0.98",
        "--gpu-memory-util=0.98",
        "--hos=0.0.0.0",
        "--host=0.0.0.0",
        "--po=1",
        "--no-enable-sleep-mode",
    ],
)
def test_every_spelling_of_a_supervisor_flag_is_an_invalid_spec(arg: str) -> None:
    with pytest.raises(SpecError, match="is set by the supervisor") as caught:
        parse_spec(vllm(arg))
    assert caught.value.field == "spec.vllm.args[0]"


def test_tolerations_the_default_refuses_only_the_match_all_one() -> None:
    spec = {"model": "llama3.2:1b", "backend": "ollama"}
    error = refusal({**spec, "tolerations": [{"operator": "Exists"}]})
    assert error.field == "spec.tolerations[0]"
    check_spec(
        parse_spec({**spec, "tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        [DEFAULT_POLICY],
    )


def test_a_policy_lists_the_tolerations_a_namespace_may_use() -> None:
    mine = {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
    rules = policy(allowedTolerations=[mine])
    spec = {"model": "llama3.2:1b", "backend": "ollama"}
    check_spec(parse_spec({**spec, "tolerations": [mine]}), [rules])
    other = {**mine, "value": "b"}
    assert refusal({**spec, "tolerations": [other]}, [rules]).field == "spec.tolerations[0]"


@pytest.mark.parametrize(
    ("model", "allowed"),
    [
        ("llama3.2:1b", True),
        ("library/llama3.2:1b", True),
        ("registry.ollama.ai/library/llama3.2:1b", True),
        ("evil.example.com/x/llama:1b", False),
    ],
)
def test_ollama_registries(model: str, allowed: bool) -> None:
    spec = {"model": model, "backend": "ollama"}
    if allowed:
        check_spec(parse_spec(spec), [DEFAULT_POLICY])
    else:
        assert "registry evil.example.com" in refusal(spec).message


def test_local_paths_need_an_allowed_root_and_never_climb() -> None:
    assert "not under an allowed root" in refusal(vllm(model="/etc")).message
    rooted = policy(modelSources={"pathRoots": ["/models"]})
    check_spec(parse_spec(vllm(model="/models/qwen")), [rooted])
    assert refusal(vllm(model="/modelsx/qwen"), [rooted]).field == "spec.model"
    with pytest.raises(SpecError, match="climbs out"):
        parse_spec(vllm(model="/models/../var/lib/kubelet"))


def test_hugging_face_organisations() -> None:
    rules = policy(modelSources={"huggingFaceOrgs": ["Qwen"]})
    check_spec(parse_spec(vllm()), [rules])
    assert "organisation meta-llama" in refusal(vllm(model="meta-llama/x"), [rules]).message


def test_quota_counts_the_namespace_and_names_what_to_change() -> None:
    rules = policy(vramQuota="20Gi")
    check_quota(8 * GI, 12 * GI, "team-a", [rules])
    with pytest.raises(PolicyError) as caught:
        check_quota(9 * GI, 12 * GI, "team-a", [rules])
    assert caught.value.field == "spec.replicas"
    assert "12Gi of its 20Gi" in str(caught.value)


def test_policies_select_namespaces_by_label_and_fall_back_to_the_default() -> None:
    a = policy("a", namespaceSelector={"matchLabels": {"team": "a"}})
    gpu = policy(
        "gpu",
        namespaceSelector={
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}]
        },
    )
    everyone = policy("everyone")
    assert policies_for({"team": "a"}, [a, gpu]) == [a]
    assert policies_for({"team": "b"}, [a, gpu]) == [DEFAULT_POLICY]
    assert policies_for({"team": "a", "tier": "x"}, [gpu, a, everyone]) == [a, everyone, gpu]
