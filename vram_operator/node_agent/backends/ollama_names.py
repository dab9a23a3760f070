"""Ollama model names, as Ollama itself reads and compares them (pure functions, no I/O).

The rules follow types/model/name.go in Ollama (v0.12.3, the version the chart pins):

- a name is `host/namespace/model:tag`; missing parts take the defaults `registry.ollama.ai`,
  `library` and `latest` (ParseName = ParseNameBare merged with DefaultName), and a leading
  `scheme://` is dropped from the host;
- names compare case-insensitively, part by part (Name.EqualFold; getExistingName in
  server/routes.go maps a request onto the stored case);
- /api/ps, /api/tags and /api/pull show the short form (Name.DisplayShortest and
  ModelPath.GetShortTagname): the default host and `library/` are left out, the tag never is.

So `llama3.2`, `library/llama3.2:latest`, `registry.ollama.ai/library/llama3.2:latest` and
`Llama3.2:LATEST` are one model, which /api/ps lists as `llama3.2:latest`.

Derived models: a deployment's `ollama.options` become a model of our own, created from the
requested one with those options as its parameters (see `derived_model_name`), so that every
request for it runs with the same runner options. Its tag carries a `-vram-<hash>` mark, which
`base_of_derived` recognises after an agent restart, when nothing else remembers it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MISSING_PART = "!MISSING!"
"""What name.go puts in a part a separator promised but the text left empty (never valid)."""

DERIVED_MARK = "-vram-"
_DERIVED_TAG = re.compile(r"^(?P<tag>.+)-vram-(?P<hash>[0-9a-f]{8})$")
_MAX_PART = {"host": 350, "namespace": 80, "model": 80, "tag": 80}


@dataclass(frozen=True)
class OllamaName:
    """A parsed model name with Ollama's defaults filled in; parts keep their case."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """The comparison key: the full name, case-folded (Name.EqualFold)."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".casefold()

    @property
    def display(self) -> str:
        """The short form /api/ps and /api/tags show (Name.DisplayShortest)."""
        if self.host.casefold() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.casefold() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def is_valid(self) -> bool:
        """Whether Ollama accepts the name (Name.IsValid: every part present and well formed)."""
        return all(
            _valid_part(kind, value)
            for kind, value in (
                ("host", self.host),
                ("namespace", self.namespace),
                ("model", self.model),
                ("tag", self.tag),
            )
        )

    def with_tag(self, tag: str) -> OllamaName:
        return OllamaName(self.host, self.namespace, self.model, tag)


def parse_model_name(text: str) -> OllamaName:
    """Parse a model name the way Ollama's ParseName does; check `is_valid` before trusting it.

    Like name.go: the tag is what follows the last `:` when that comes after the last `/`;
    then the model, namespace and host are cut from the right at `/`.
    """
    rest = text.strip()
    tag = ""
    if rest.rfind(":") > rest.rfind("/"):
        rest, tag = _cut_last(rest, ":")
    host = namespace = ""
    if "/" not in rest:
        model = rest
    else:
        rest, model = _cut_last(rest, "/")
        if "/" not in rest:
            namespace = rest
        else:
            rest, namespace = _cut_last(rest, "/")
            host = rest.split("://", 1)[1] if "://" in rest else rest
    return OllamaName(
        host=host or DEFAULT_HOST,
        namespace=namespace or DEFAULT_NAMESPACE,
        model=model,
        tag=tag or DEFAULT_TAG,
    )


def normalize_model_name(text: str) -> str:
    """The key two names share exactly when Ollama takes them for the same model."""
    return parse_model_name(text).key


def short_model_name(text: str) -> str:
    """The name as /api/ps and /api/tags list it: `library/llama3.2` is `llama3.2:latest`."""
    return parse_model_name(text).display


def same_model(a: str, b: str) -> bool:
    """Whether Ollama takes `a` and `b` for one model (defaults filled in, case ignored)."""
    return normalize_model_name(a) == normalize_model_name(b)


def derived_model_name(model: str, options: Mapping[str, Any]) -> str:
    """The model created from `model` with `options` as its parameters: same name, tag
    `<tag>-vram-<8 hex digits of the options' hash>`, in the short form.

    The hash covers the options in canonical JSON, so equal options give one name on every
    node and after every restart, and different options never share a model.
    """
    name = parse_model_name(model)
    canonical = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
    suffix = f"{DERIVED_MARK}{digest}"
    tag = name.tag[: _MAX_PART["tag"] - len(suffix)] + suffix
    return name.with_tag(tag).display


def base_of_derived(name: str) -> str | None:
    """For a name `derived_model_name` made, the short name of the model it came from."""
    parsed = parse_model_name(name)
    match = _DERIVED_TAG.match(parsed.tag)
    if match is None:
        return None
    return parsed.with_tag(match["tag"]).display


def _cut_last(text: str, sep: str) -> tuple[str, str]:
    """name.go's cutPromised: split at the last `sep`; an empty side is MISSING_PART."""
    before, _, after = text.rpartition(sep)
    return before or MISSING_PART, after or MISSING_PART


def _valid_part(kind: str, value: str) -> bool:
    if not 1 <= len(value) <= _MAX_PART[kind]:
        return False
    if not (value[0].isascii() and (value[0].isalnum() or value[0] == "_")):
        return False
    for char in value[1:]:
        if char.isascii() and (char.isalnum() or char in "_-"):
            continue
        if char == "." and kind != "namespace":
            continue
        if char == ":" and kind == "host":
            continue
        return False
    return True
