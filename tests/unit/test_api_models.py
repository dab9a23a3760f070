"""The pydantic models: examples parse, bad specs name their field, CRDs match crds/."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from vram_operator.api import (
    Condition,
    GPUNode,
    ModelDeployment,
    Priority,
    SpecError,
    parse_spec,
    set_condition,
)
from vram_operator.api.crd import custom_resource_definitions, render_yaml
from vram_operator.api.modelpolicy import ModelPolicy
from vram_operator.cli import main

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BAD = yaml.safe_load((ROOT / "tests/data/bad-modeldeployments.yaml").read_text())


def _examples() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_crds_folder_holds_exactly_the_generated_output() -> None:
    committed = (ROOT / "crds/vram.dev_crds.yaml").read_text()
    hint = "crds/ is stale: run `vram-operator crds > crds/vram.dev_crds.yaml`"
    assert committed == render_yaml(), hint


def test_chart_carries_the_same_crds() -> None:
    chart_crds = ROOT / "charts/vram-operator/crds/vram.dev_crds.yaml"
    assert chart_crds.read_text() == render_yaml(), "copy crds/ into the chart's crds/"


def test_cli_prints_the_crds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crds"]) == 0
    assert capsys.readouterr().out == render_yaml()


def test_crd_schema_is_structural_and_carries_constraints() -> None:
    mdep, gpun, mpol = custom_resource_definitions()
    assert mdep["spec"]["names"]["shortNames"] == ["mdep"]
    assert gpun["spec"]["names"]["shortNames"] == ["gpun"]
    assert mpol["spec"]["names"]["shortNames"] == ["mpol"]
    for crd in (mdep, gpun, mpol):
        assert crd["spec"]["names"]["categories"] == ["vram"]
    assert gpun["spec"]["scope"] == mpol["spec"]["scope"] == "Cluster"
    columns = [c["name"] for c in mpol["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Quota", "Used", "Namespaces", "Age"]
    schema = mdep["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    assert set(spec["required"]) == {"model", "backend"}
    assert spec["properties"]["backend"]["enum"] == ["ollama", "vllm", "diffusers"]
    assert spec["properties"]["priority"]["default"] == "normal"
    assert spec["properties"]["replicas"]["minimum"] == 0
    assert "pattern" in spec["properties"]["vram"]
    assert "pattern" in spec["properties"]["keepAlive"]
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            assert not {"$ref", "anyOf", "title"} & node.keys(), path
            if "properties" in node or "items" in node:
                assert node.get("type") in ("object", "array"), path
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(schema, "openAPIV3Schema")
    walk(mpol["spec"]["versions"][0]["schema"]["openAPIV3Schema"], "ModelPolicy")


@pytest.mark.parametrize("doc", _examples(), ids=lambda d: d["metadata"]["name"])
def test_every_example_parses(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ModelPolicy":
        assert ModelPolicy.model_validate(doc).spec.namespace_selector.match_labels
    elif doc["kind"] == "ModelDeployment":
        parsed = ModelDeployment.model_validate(doc)
        assert parsed.spec.model == doc["spec"]["model"]
        assert parsed.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    else:
        node = GPUNode.model_validate(doc)
        assert node.status is not None
        assert node.status.gpus[0].free_bytes > 0


@pytest.mark.parametrize("case", BAD, ids=lambda c: c["case"])
def test_bad_spec_names_the_field(case: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(case["spec"])
    assert info.value.field.startswith(case["field"]), info.value
    assert str(info.value).startswith(case["field"])


INVALID = yaml.safe_load((ROOT / "tests/data/invalid-specs.yaml").read_text())
UNKNOWN_FIELD = {
    "case": "unknown-field",
    "field": "spec.colour",
    "message": "not a known field",
    "spec": {"model": "llama3.2:1b", "backend": "ollama", "colour": "blue"},
}


@pytest.mark.parametrize("case", [*INVALID, UNKNOWN_FIELD], ids=lambda c: c["case"])
def test_rules_the_schema_cannot_express(case: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match=re.escape(case["message"])) as info:
        parse_spec(case["spec"])
    assert info.value.field == case["field"]


def test_defaults_and_derived_values() -> None:
    spec = parse_spec(
        {"model": "llama3.2:1b", "backend": "ollama", "vram": "6.5Gi", "keepAlive": "1h30m"}
    )
    assert spec.priority is Priority.NORMAL
    assert spec.replicas == 1
    assert spec.vram_bytes == int(6.5 * 2**30)
    assert spec.keep_alive_seconds == 5400
    assert parse_spec({"model": "a:b", "backend": "ollama"}).vram_bytes is None


def test_priorities_are_ordered() -> None:
    ranks = [p.rank for p in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL)]
    assert ranks == sorted(ranks)
    assert not Priority.CRITICAL.evictable
    assert Priority.LOW.evictable


def test_set_condition_moves_transition_time_only_on_status_change() -> None:
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    t1 = t0 + dt.timedelta(minutes=5)
    first = Condition(type="Ready", status="False", reason="Loading", last_transition_time=t0)
    same = Condition(type="Ready", status="False", reason="Pulling", last_transition_time=t1)
    flipped = Condition(type="Ready", status="True", reason="Loaded", last_transition_time=t1)
    other = Condition(type="Loaded", status="True", reason="Loaded", last_transition_time=t1)

    kept = set_condition([first], same)
    assert kept[0].last_transition_time == t0
    assert kept[0].reason == "Pulling"
    assert set_condition([first], flipped)[0].last_transition_time == t1
    assert [c.type for c in set_condition([first], other)] == ["Ready", "Loaded"]
    dumped = kept[0].to_k8s()
    assert dumped["lastTransitionTime"] == "2026-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"model": "a/b", "backend": "vllm", "vllm": {"args": ["--x"] * 65}}, "spec.vllm.args"),
        ({"model": "a/b", "backend": "vllm", "vllm": {"args": ["x" * 1025]}}, "spec.vllm.args[0]"),
        (
            {"model": "a/b", "backend": "vllm", "vllm": {"args": ["x" * 1000] * 9}},
            "spec.vllm.args",
        ),
        (
            {"model": "a:b", "backend": "ollama", "ollama": {"options": {"stop": ["x"] * 3000}}},
            "spec.ollama.options",
        ),
        (
            {
                "model": "a:b",
                "backend": "ollama",
                "ollama": {"options": {f"k{i}": 1 for i in range(65)}},
            },
            "spec.ollama.options",
        ),
        ({"model": "a:b", "backend": "ollama", "keepAlive": "9" * 400 + "s"}, "spec.keepAlive"),
        ({"model": "a:b", "backend": "ollama", "vram": "1" + "0" * 30}, "spec.vram"),
    ],
)
def test_specs_that_would_overflow_an_object_or_int64_name_the_field(
    spec: dict[str, object], field: str
) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    assert caught.value.field == field
