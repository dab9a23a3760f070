"""ModelPolicy: what the ModelDeployments of the namespaces it selects may ask for.

Cluster-scoped and owned by cluster admins. The operator enforces every policy that selects a
namespace (each must allow a spec) before it places anything; a namespace no policy selects
gets `DEFAULT_POLICY`, which is safe: no `critical`, no wildcard toleration, Ollama's own
registry, no local paths, and only vLLM flags that change nothing outside the model's process.

The checks here are pure (spec + policy in, a `PolicyError` naming the field and the policy
out) so the operator, tests and a future admission webhook share one reading.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .common import Backend, CamelModel, Priority, Quantity
from .modeldeployment import ModelDeploymentSpec, Toleration, vllm_flag
from .quantity import format_bytes, parse_positive_bytes

KIND = "ModelPolicy"
PLURAL = "modelpolicies"
DEFAULT_POLICY_NAME = "(default: no ModelPolicy selects this namespace)"

DEFAULT_VLLM_FLAGS = (
    "max-model-len",
    "max-num-seqs",
    "max-num-batched-tokens",
    "dtype",
    "kv-cache-dtype",
    "quantization",
    "enforce-eager",
    "enable-prefix-caching",
    "enable-chunked-prefill",
    "block-size",
    "seed",
    "revision",
    "tokenizer-revision",
    "code-revision",
    "generation-config",
    "enable-auto-tool-choice",
    "tool-call-parser",
    "reasoning-parser",
    "max-logprobs",
    "disable-log-requests",
    "disable-log-stats",
    "limit-mm-per-prompt",
    "rope-scaling",
    "rope-theta",
)
"""Flags that shape only the model's own engine. Left out on purpose: --trust-remote-code (runs
the repository's code), paths (--download-dir, --chat-template, --allowed-local-media-path,
--tokenizer), --load-format (pickle loaders run code), --api-key (a secret in the spec)."""

ALWAYS_REFUSED_VLLM_FLAGS = ("config", "model", "served-model-name")
"""--config reads any file as more flags; --model replaces the placed model; the served name
is how the agent and the gateway find the model."""


class PolicyError(ValueError):
    """A spec a policy refuses: `field` is the dotted path, `policy` the ModelPolicy's name."""

    def __init__(self, field: str, policy: str, message: str) -> None:
        super().__init__(f"{field}: {message} (ModelPolicy {policy})")
        self.field = field
        self.policy = policy
        self.message = message


class SelectorRequirement(CamelModel):
    """One matchExpressions entry, as in a Kubernetes LabelSelector."""

    model_config = ConfigDict(extra="forbid")

    key: Annotated[str, Field(min_length=1, max_length=316)]
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: Annotated[list[Annotated[str, Field(max_length=63)]], Field(max_length=64)] = Field(
        default_factory=list
    )


class NamespaceSelector(CamelModel):
    """Which namespaces the policy covers; empty selects every namespace."""

    model_config = ConfigDict(extra="forbid")

    match_labels: Annotated[dict[str, str], Field(max_length=32)] = Field(default_factory=dict)
    match_expressions: Annotated[list[SelectorRequirement], Field(max_length=32)] = Field(
        default_factory=list
    )

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
            if req.operator == "In" and labels.get(req.key) not in req.values:
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
        return True


class ModelSources(CamelModel):
    """Where models may come from."""

    model_config = ConfigDict(extra="forbid")

    ollama_registries: Annotated[list[str], Field(max_length=32)] = Field(
        default_factory=lambda: ["registry.ollama.ai"]
    )
    """Registry hosts an Ollama reference may name; a reference without a host is
    registry.ollama.ai's. `*` allows any."""

    hugging_face_orgs: Annotated[list[str], Field(max_length=256)] = Field(
        default_factory=lambda: ["*"]
    )
    """Hugging Face organisations (the part before `/`) a vLLM model may come from; `*` any."""

    path_roots: Annotated[list[str], Field(max_length=32)] = Field(default_factory=list)
    """Folders a vLLM model given as an absolute path must lie under; none by default."""


class ModelPolicySpec(CamelModel):
    """What the ModelDeployments of the selected namespaces may use."""

    model_config = ConfigDict(extra="forbid")

    namespace_selector: NamespaceSelector = Field(default_factory=NamespaceSelector)
    """The namespaces this policy covers (by label); empty selects every namespace."""

    allowed_priorities: Annotated[list[Priority], Field(min_length=1, max_length=4)] = Field(
        default_factory=lambda: [Priority.HIGH, Priority.NORMAL, Priority.LOW]
    )
    """The priorities a ModelDeployment may use; critical only where an admin allows it."""

    vram_quota: Quantity | None = None
    """Per namespace: the most GPU memory its ModelDeployments may ask for (replicas x VRAM,
    summed). Absent: no quota."""

    allowed_tolerations: Annotated[list[Toleration], Field(max_length=64)] | None = None
    """Tolerations a ModelDeployment may carry: each of its tolerations must equal one listed
    here. Absent: any toleration naming a taint key, but never the match-all one (no key,
    operator Exists), which would land on nodes tainted for other teams."""

    model_sources: ModelSources = Field(default_factory=ModelSources)
    """Ollama registries, Hugging Face organisations and path roots models may come from."""

    allowed_vllm_flags: Annotated[list[str], Field(max_length=256)] | None = None
    """`vllm serve` flags (without `--`) spec.vllm.args may use, matched as vLLM parses them
    (`_` reads as `-`; abbreviations are refused). Absent: DEFAULT_VLLM_FLAGS. --config,
    --model and the supervisor's own flags are refused whatever this says."""


class NamespaceUsage(CamelModel):
    """What one selected namespace asks for against the quota."""

    namespace: str
    used_bytes: Annotated[int, Field(ge=0)]
    used: str


class ModelPolicyStatus(CamelModel):
    """Written by the operator."""

    observed_generation: int | None = None
    namespaces: list[NamespaceUsage] = Field(default_factory=list)
    """Every selected namespace with ModelDeployments, and the VRAM they ask for."""

    namespace_count: Annotated[int, Field(ge=0)] = 0
    """How many namespaces the policy selects."""

    used: str | None = None
    """The largest namespace usage against the quota, for kubectl get (`12Gi/20Gi team-a`)."""


class ModelPolicy(CamelModel):
    """Limits an admin sets on the ModelDeployments of the namespaces it selects."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["vram.dev/v1alpha1"] = "vram.dev/v1alpha1"
    kind: Literal["ModelPolicy"] = "ModelPolicy"
    metadata: dict[str, object] = Field(default_factory=dict)
    spec: ModelPolicySpec = Field(default_factory=ModelPolicySpec)
    status: ModelPolicyStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))


DEFAULT_POLICY = ModelPolicy(metadata={"name": DEFAULT_POLICY_NAME})


def policies_for(labels: Mapping[str, str], policies: Iterable[ModelPolicy]) -> list[ModelPolicy]:
    """The policies that select a namespace with `labels`, by name; DEFAULT_POLICY if none."""
    chosen = sorted(
        (p for p in policies if p.spec.namespace_selector.matches(labels)), key=lambda p: p.name
    )
    return chosen or [DEFAULT_POLICY]


def check_spec(spec: ModelDeploymentSpec, policies: Sequence[ModelPolicy]) -> None:
    """Raise PolicyError for the first thing in `spec` that one of `policies` refuses
    (quotas are checked apart, against the namespace's usage: `check_quota`)."""
    for policy in policies:
        _check_one(spec, policy)


def check_quota(
    asked: int, used_by_others: int, namespace: str, policies: Sequence[ModelPolicy]
) -> None:
    """Raise PolicyError when `asked` (replicas x VRAM) on top of what the namespace's other
    ModelDeployments ask exceeds a policy's quota."""
    for policy in policies:
        if policy.spec.vram_quota is None:
            continue
        quota = parse_positive_bytes(policy.spec.vram_quota)
        if used_by_others + asked > quota:
            raise PolicyError(
                "spec.replicas",
                policy.name,
                f"replicas x VRAM is {format_bytes(asked)}, and namespace {namespace} already "
                f"asks {format_bytes(used_by_others)} of its {format_bytes(quota)} VRAM quota; "
                "lower spec.replicas or spec.vram, or free quota",
            )


def _check_one(spec: ModelDeploymentSpec, policy: ModelPolicy) -> None:
    rules, name = policy.spec, policy.name
    if spec.priority not in rules.allowed_priorities:
        allowed = ", ".join(str(p) for p in rules.allowed_priorities)
        raise PolicyError(
            "spec.priority", name, f"{spec.priority} is not allowed here; use one of {allowed}"
        )
    for index, toleration in enumerate(spec.tolerations):
        _check_toleration(index, toleration, rules.allowed_tolerations, name)
    _check_source(spec, rules.model_sources, name)
    if spec.vllm is not None:
        flags = rules.allowed_vllm_flags
        _check_vllm_args(spec.vllm.args, DEFAULT_VLLM_FLAGS if flags is None else flags, name)


def _check_toleration(
    index: int, toleration: Toleration, allowed: list[Toleration] | None, policy: str
) -> None:
    field = f"spec.tolerations[{index}]"
    if allowed is None:
        if not toleration.key:
            raise PolicyError(
                field, policy, "a toleration without a key matches every taint; name the taint"
            )
        return
    if toleration not in allowed:
        raise PolicyError(field, policy, "is not among the tolerations this namespace may use")


def _check_source(spec: ModelDeploymentSpec, sources: ModelSources, policy: str) -> None:
    if spec.backend is Backend.OLLAMA:
        host = _ollama_host(spec.model)
        if "*" not in sources.ollama_registries and host not in sources.ollama_registries:
            raise PolicyError(
                "spec.model",
                policy,
                f"registry {host} is not allowed; use one of "
                f"{', '.join(sources.ollama_registries) or 'none'}",
            )
        return
    if spec.model.startswith("/"):
        path = posixpath.normpath(spec.model)
        roots = [posixpath.normpath(r) for r in sources.path_roots]
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            raise PolicyError(
                "spec.model",
                policy,
                f"local path {path} is not under an allowed root "
                f"({', '.join(roots) or 'none allowed'}); use a Hugging Face id",
            )
        return
    org = spec.model.split("/", 1)[0]
    if "*" not in sources.hugging_face_orgs and org not in sources.hugging_face_orgs:
        raise PolicyError("spec.model", policy, f"Hugging Face organisation {org} is not allowed")


def _ollama_host(model: str) -> str:
    """The registry an Ollama reference names: the first part when it has three (host/ns/name),
    as types/model/name.go (v0.12.3) reads it, else registry.ollama.ai."""
    parts = model.split("/")
    return parts[0].lower() if len(parts) >= 3 else "registry.ollama.ai"


def _check_vllm_args(args: Sequence[str], allowed: Sequence[str], policy: str) -> None:
    """Every flag must be allowed, spelled in full; a bare word must be a flag's value."""
    permitted = {a.strip().lstrip("-").replace("_", "-") for a in allowed}
    expects_value = False
    for index, arg in enumerate(args):
        field = f"spec.vllm.args[{index}]"
        flag = vllm_flag(arg)
        if flag is None:
            if not expects_value:
                raise PolicyError(
                    field, policy, f"{arg!r} is no flag's value; positional arguments are refused"
                )
            expects_value = False
            continue
        if not flag.startswith("--"):
            raise PolicyError(field, policy, f"short option {flag} is refused; use the long form")
        name = flag[2:]
        if name in ALWAYS_REFUSED_VLLM_FLAGS:
            raise PolicyError(field, policy, f"{flag} is never allowed")
        base = name[3:] if name.startswith("no-") and name[3:] in permitted else name
        if base not in permitted:
            fuller = sorted(p for p in permitted if p.startswith(base))
            hint = (
                f"abbreviations are refused; write --{fuller[0]} in full"
                if fuller
                else "ask an admin to allow it in a ModelPolicy"
            )
            raise PolicyError(field, policy, f"{flag} is not an allowed vLLM flag; {hint}")
        expects_value = "=" not in arg


__all__ = [
    "ALWAYS_REFUSED_VLLM_FLAGS",
    "DEFAULT_POLICY",
    "DEFAULT_VLLM_FLAGS",
    "KIND",
    "PLURAL",
    "ModelPolicy",
    "ModelPolicySpec",
    "ModelPolicyStatus",
    "NamespaceSelector",
    "NamespaceUsage",
    "PolicyError",
    "check_quota",
    "check_spec",
    "policies_for",
]
