"""VRAM estimates for models whose ModelDeployment gives no `spec.vram`.

Pure functions over metadata: Ollama's /api/show answer, a GGUF file header or safetensors
headers. Only headers are read, never weights, so estimating a 70B model costs milliseconds.

An estimate is weights + KV cache + a fixed overhead (CUDA context, cuBLAS workspace and
compute graph, about 500 MiB in practice). The KV cache is sized for one sequence at the
context the server will allocate:

- Ollama allocates `num_ctx` tokens. Its default is 4096, so unless the caller passes num_ctx
  (the deployment's `ollama.options`) or the Modelfile sets it, the context is the model's
  trained context length capped at 4096 -- the way Ollama itself sizes it.
- vLLM refuses to start unless one sequence of `max_model_len` fits, and `max_model_len`
  defaults to the model's `max_position_embeddings`, so safetensors estimates use that.

Each Estimate says which method produced it; the operator copies that into status.vramSource.
When headers are missing or unreadable, `estimate_path` falls back to file size x 1.2 and says
why in `detail`.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from vram_operator.api import format_bytes

EstimateMethod = Literal["ollama-show", "gguf-header", "safetensors-header", "file-size"]

OVERHEAD_BYTES = 500 * 2**20
"""CUDA context, workspaces and compute graph, on top of weights and KV cache."""

DEFAULT_OLLAMA_CONTEXT = 4096
"""Ollama's default num_ctx up to 0.15.4 (envconfig.ContextLength, OLLAMA_CONTEXT_LENGTH): the
context it allocates when neither the request nor the Modelfile sets num_ctx."""

OLLAMA_VRAM_TIERED_CONTEXT_SINCE = (0, 15, 5)
"""From this version Ollama picks its default context from the total VRAM (server/routes.go
Serve: 262144 from 47 GiB, 32768 from 23 GiB, else 4096) unless OLLAMA_CONTEXT_LENGTH is set."""

FILE_SIZE_FACTOR = 1.2
"""Weights on disk plus a fifth for KV cache and runtime, when nothing better is known."""

KV_CACHE_ELEMENT_BYTES = 2
"""Both servers keep the KV cache in f16/bf16 unless told otherwise."""

SAFETENSORS_MAX_HEADER = 100 * 2**20
"""The safetensors format caps its JSON header at 100 MB; larger means a corrupt file."""


@dataclass(frozen=True)
class Estimate:
    """A VRAM figure and how it was obtained."""

    bytes: int
    method: EstimateMethod
    detail: str
    parameters: int | None = None


# --- Ollama /api/show ------------------------------------------------------------------------

# Bytes per parameter for Ollama's quantization labels. Exact for the single-type formats;
# for llama.cpp's mixed K-quant recipes (_S/_M/_L) the averages llama.cpp reports for 7-8B
# models (e.g. Q4_K_M ~ 4.85 bits per weight).
_QUANT_BYTES_PER_PARAM: dict[str, float] = {
    "F64": 8.0,
    "F32": 4.0,
    "F16": 2.0,
    "BF16": 2.0,
    "Q8_0": 34 / 32,
    "Q8_K": 292 / 256,
    "Q6_K": 210 / 256,
    "Q5_K_M": 5.69 / 8,
    "Q5_K_S": 5.54 / 8,
    "Q5_K": 176 / 256,
    "Q5_1": 24 / 32,
    "Q5_0": 22 / 32,
    "Q4_K_M": 4.85 / 8,
    "Q4_K_S": 4.58 / 8,
    "Q4_K": 144 / 256,
    "Q4_1": 20 / 32,
    "Q4_0": 18 / 32,
    "IQ4_NL": 18 / 32,
    "IQ4_XS": 136 / 256,
    "Q3_K_L": 4.27 / 8,
    "Q3_K_M": 3.91 / 8,
    "Q3_K_S": 3.5 / 8,
    "Q3_K": 110 / 256,
    "IQ3_S": 110 / 256,
    "IQ3_XXS": 98 / 256,
    "Q2_K": 3.35 / 8,
    "IQ2_S": 82 / 256,
    "IQ2_XS": 74 / 256,
    "IQ2_XXS": 66 / 256,
    "IQ1_M": 56 / 256,
    "IQ1_S": 50 / 256,
    "MXFP4": 17 / 32,
}
_UNKNOWN_QUANT_BYTES = 2.0  # assume f16: over-estimating is safer than an OOM

_PARAMETER_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMBT]?)\s*$", re.IGNORECASE)
_PARAMETER_SCALE = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_NO_ATTENTION = "no attention metadata"
_NUM_CTX_PARAMETER = re.compile(r"^\s*num_ctx\s+([0-9]+)\s*$", re.MULTILINE)


def parse_parameter_size(text: str) -> int:
    """Turn Ollama's details.parameter_size ("8.0B", "494M", "70B") into a parameter count."""
    match = _PARAMETER_SIZE.match(text)
    if not match:
        raise ValueError(f"parameter size {text!r} is not a number with K, M, B or T")
    return round(float(match[1]) * _PARAMETER_SCALE[match[2].upper()])


def default_ollama_context(version: str | None, total_vram_bytes: int | None = None) -> int:
    """The num_ctx an Ollama server of `version` uses when nothing sets one.

    Up to 0.15.4 it is 4096. From 0.15.5 it depends on the VRAM of all GPUs together; when
    that is not known the figure stays 4096, the smallest tier. An unreadable version is taken
    as the pinned 0.12 series.
    """
    parsed = _version_tuple(version)
    if parsed is None or parsed < OLLAMA_VRAM_TIERED_CONTEXT_SINCE or total_vram_bytes is None:
        return DEFAULT_OLLAMA_CONTEXT
    gib = 2**30
    if total_vram_bytes >= 47 * gib:
        return 262_144
    if total_vram_bytes >= 23 * gib:
        return 32_768
    return DEFAULT_OLLAMA_CONTEXT


def _version_tuple(version: str | None) -> tuple[int, int, int] | None:
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def from_ollama_show(
    show: Mapping[str, Any],
    num_ctx: int | None = None,
    default_context: int = DEFAULT_OLLAMA_CONTEXT,
) -> Estimate:
    """Estimate from Ollama's /api/show answer, which must be the verbose one.

    The parameter count comes from model_info["general.parameter_count"] (exact) or
    details.parameter_size (rounded); bytes per parameter from details.quantization_level.
    The context is `num_ctx` if given, else a `num_ctx` in the Modelfile parameters, else the
    server's `default_context` (see `default_ollama_context`); either way at most the model's
    trained context, as Ollama caps it (llm/server.go NewLlamaServer, v0.12.3).

    Without `verbose: true`, /api/show leaves per-layer arrays such as head_count_kv empty
    (server/routes.go getModelData, v0.12.3: arrays are not read, and come back null); the KV
    cache is then reported unknown instead of being guessed from head_count.
    """
    details = _mapping(show.get("details"))
    model_info = _mapping(show.get("model_info"))

    count = model_info.get("general.parameter_count")
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        parameters = count
    elif isinstance(details.get("parameter_size"), str):
        parameters = parse_parameter_size(details["parameter_size"])
    else:
        raise ValueError(
            "/api/show gives neither model_info.general.parameter_count nor details.parameter_size"
        )

    quant = str(details.get("quantization_level") or "").upper()
    per_param = _QUANT_BYTES_PER_PARAM.get(quant)
    quant_note = quant
    if per_param is None:
        per_param = _UNKNOWN_QUANT_BYTES
        quant_note = f"unknown quantization {quant or '(none)'!r} taken as F16"
    weights = math.ceil(parameters * per_param)

    context, context_note = _ollama_context(show, model_info, num_ctx, default_context)
    dropped = _dropped_arrays(model_info)
    kv = None if dropped else _kv_cache_from_gguf_metadata(model_info, context)
    if dropped:
        why = f"{dropped} is empty, as /api/show without verbose answers"
    else:
        why = context_note if kv is not None else _NO_ATTENTION
    return _combine(
        method="ollama-show",
        parameters=parameters,
        weights=weights,
        kv=kv,
        context_note=why,
        prefix=f"{_format_count(parameters)} parameters at {quant_note}",
    )


def _dropped_arrays(model_info: Mapping[str, Any]) -> str | None:
    """The first attention key that is present but empty (null or []): a truncated answer."""
    arch = model_info.get("general.architecture")
    for suffix in ("attention.head_count_kv", "attention.head_count"):
        key = f"{arch}.{suffix}"
        if key in model_info and model_info[key] in (None, []):
            return key
    return None


def _ollama_context(
    show: Mapping[str, Any],
    model_info: Mapping[str, Any],
    num_ctx: int | None,
    default_context: int = DEFAULT_OLLAMA_CONTEXT,
) -> tuple[int, str]:
    trained = _arch_int(model_info, "context_length")
    if num_ctx is not None:
        wanted, note = num_ctx, f"num_ctx {num_ctx}"
    else:
        found = []
        parameters_text = show.get("parameters")
        if isinstance(parameters_text, str):
            found = _NUM_CTX_PARAMETER.findall(parameters_text)
        if found:
            wanted, note = int(found[-1]), f"num_ctx {found[-1]} from the Modelfile"
        else:
            wanted, note = default_context, f"Ollama's default context {default_context}"
    if trained is not None and wanted > trained:
        return trained, f"context {trained} ({note}, capped at the trained {trained})"
    if num_ctx is None and trained is not None and note.startswith("Ollama"):
        return wanted, f"context {wanted} (trained {trained}, Ollama default {default_context})"
    return wanted, note


# --- KV cache ----------------------------------------------------------------------------------


def kv_cache_bytes(
    layers: int, kv_heads_per_layer: Iterable[int], head_dim_k: int, head_dim_v: int, context: int
) -> int:
    """K and V for `context` tokens across all layers, f16 elements."""
    heads = list(kv_heads_per_layer)
    if len(heads) == 1:
        heads *= layers
    per_token = sum(h * (head_dim_k + head_dim_v) for h in heads)
    return per_token * context * KV_CACHE_ELEMENT_BYTES


def _kv_cache_from_gguf_metadata(meta: Mapping[str, Any], context: int) -> int | None:
    """KV cache from GGUF-style keys (also Ollama's model_info); None when keys are missing."""
    layers = _arch_int(meta, "block_count")
    embedding = _arch_int(meta, "embedding_length")
    head_count = _arch_value(meta, "attention.head_count")
    head_count_kv = _arch_value(meta, "attention.head_count_kv")
    if layers is None or embedding is None or head_count is None:
        return None
    heads = _as_int_list(head_count)
    kv_heads = _as_int_list(head_count_kv) if head_count_kv is not None else heads
    if not heads or not kv_heads or max(heads) <= 0:
        return None
    default_dim = embedding // max(heads)
    key_dim = _arch_int(meta, "attention.key_length") or default_dim
    value_dim = _arch_int(meta, "attention.value_length") or default_dim
    return kv_cache_bytes(layers, kv_heads, key_dim, value_dim, context)


def _arch_value(meta: Mapping[str, Any], suffix: str) -> Any:
    arch = meta.get("general.architecture")
    return meta.get(f"{arch}.{suffix}") if isinstance(arch, str) else None


def _arch_int(meta: Mapping[str, Any], suffix: str) -> int | None:
    value = _arch_value(meta, suffix)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _as_int_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return list(value)
    return []


# --- GGUF -----------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"

# ggml tensor types: (elements per block, bytes per block), from ggml's block layouts.
_GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# GGUF metadata value types: struct format of the fixed-size ones.
_GGUF_SCALARS: dict[int, str] = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_GGUF_STRING = 8
_GGUF_ARRAY = 9
_KEEP_ARRAY_MAX = 4096  # per-layer figures are kept; token lists are skipped over


class _Reader:
    """Little-endian reads that fail with ValueError, never read past the file's end."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._size = size

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self._file.tell() + count > self._size:
            raise ValueError(f"truncated header: {what} runs past the end of the file")
        return self._file.read(count)

    def skip(self, count: int, what: str) -> None:
        if count < 0 or self._file.tell() + count > self._size:
            raise ValueError(f"truncated header: {what} runs past the end of the file")
        self._file.seek(count, 1)

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        value: int = self.unpack("<I", what)
        return value

    def u64(self, what: str) -> int:
        value: int = self.unpack("<Q", what)
        return value

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        return self.take(length, what).decode("utf-8", errors="replace")


def from_gguf_header(path: str | Path, context_length: int | None = None) -> Estimate:
    """Estimate from a GGUF file's header: exact weight bytes from its tensor table.

    Raises ValueError naming the problem for a file that is not GGUF v2/v3 or is truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        reader = _Reader(file, size)
        if reader.take(4, "magic") != _GGUF_MAGIC:
            raise ValueError(f"{path.name} is not a GGUF file (no GGUF magic)")
        version = reader.u32("version")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        tensor_count = reader.u64("tensor count")
        kv_count = reader.u64("metadata count")
        meta = {}
        for index in range(kv_count):
            key = reader.string(f"metadata key {index}")
            meta[key] = _read_gguf_value(reader, reader.u32(f"type of {key}"), key)
        parameters = 0
        weights = 0
        for index in range(tensor_count):
            name = reader.string(f"tensor name {index}")
            n_dims = reader.u32(f"dimension count of {name}")
            if n_dims > 8:
                raise ValueError(f"tensor {name} claims {n_dims} dimensions; the file is corrupt")
            elements = math.prod(reader.u64(f"dimension of {name}") for _ in range(n_dims))
            ggml_type = reader.u32(f"type of {name}")
            reader.u64(f"offset of {name}")
            if ggml_type not in _GGML_TYPES:
                raise ValueError(f"tensor {name} has unknown ggml type {ggml_type}")
            _, block, block_bytes = _GGML_TYPES[ggml_type]
            if elements % block:
                raise ValueError(
                    f"tensor {name}: {elements} elements is not a whole number "
                    f"of {block}-element blocks"
                )
            parameters += elements
            weights += elements // block * block_bytes

    trained = _arch_int(meta, "context_length")
    if context_length is not None:
        context = context_length
        context_note = f"context {context_length}"
    elif trained is not None:
        context = min(trained, DEFAULT_OLLAMA_CONTEXT)
        context_note = f"context {context} (trained {trained}, capped at {DEFAULT_OLLAMA_CONTEXT})"
    else:
        context = DEFAULT_OLLAMA_CONTEXT
        context_note = f"context {DEFAULT_OLLAMA_CONTEXT}"
    kv = _kv_cache_from_gguf_metadata(meta, context)
    return _combine(
        method="gguf-header",
        parameters=parameters,
        weights=weights,
        kv=kv,
        context_note=context_note if kv is not None else _NO_ATTENTION,
        prefix=f"{_format_count(parameters)} parameters in {tensor_count} tensors",
    )


def _read_gguf_value(reader: _Reader, value_type: int, key: str) -> Any:
    if value_type in _GGUF_SCALARS:
        return reader.unpack(_GGUF_SCALARS[value_type], key)
    if value_type == _GGUF_STRING:
        return reader.string(key)
    if value_type == _GGUF_ARRAY:
        element_type = reader.u32(f"element type of {key}")
        count = reader.u64(f"length of {key}")
        if element_type in _GGUF_SCALARS:
            width = struct.calcsize(_GGUF_SCALARS[element_type])
            if count > _KEEP_ARRAY_MAX:
                reader.skip(count * width, key)
                return None
            return [reader.unpack(_GGUF_SCALARS[element_type], key) for _ in range(count)]
        if element_type == _GGUF_STRING:
            for _ in range(count):
                reader.skip(reader.u64(f"length of an element of {key}"), key)
            return None
        if element_type == _GGUF_ARRAY:
            for _ in range(count):
                _read_gguf_value(reader, _GGUF_ARRAY, key)
            return None
        raise ValueError(f"metadata {key} is an array of unknown type {element_type}")
    raise ValueError(f"metadata {key} has unknown value type {value_type}")


# --- safetensors ----------------------------------------------------------------------------

_SAFETENSORS_DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "F4": 0.5,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_safetensors_header(path: str | Path) -> tuple[int, int]:
    """Return (parameters, weight bytes) from one .safetensors file's header."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name}: truncated header (no 8-byte length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > SAFETENSORS_MAX_HEADER or 8 + length > size:
            raise ValueError(
                f"{path.name}: header length {length} does not fit the {size}-byte file"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path.name}: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not a JSON object")
    parameters = 0
    weights = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        parameters_t, bytes_t = _safetensors_tensor(path.name, name, info)
        parameters += parameters_t
        weights += bytes_t
    return parameters, weights


def _safetensors_tensor(file_name: str, name: str, info: Any) -> tuple[int, int]:
    if not isinstance(info, dict):
        raise ValueError(f"{file_name}: tensor {name} is not described by an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"{file_name}: tensor {name} has no valid shape")
    if dtype not in _SAFETENSORS_DTYPE_BYTES:
        raise ValueError(f"{file_name}: tensor {name} has unknown dtype {dtype!r}")
    elements = math.prod(shape)
    size = math.ceil(elements * _SAFETENSORS_DTYPE_BYTES[dtype])
    if (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and offsets[1] - offsets[0] != size
    ):
        raise ValueError(
            f"{file_name}: tensor {name} is {offsets[1] - offsets[0]} bytes on disk "
            f"but {dtype}{shape} needs {size}"
        )
    return elements, size


def from_safetensors_header(path: str | Path, context_length: int | None = None) -> Estimate:
    """Estimate from safetensors headers: one file, or a model directory (sharded or not).

    In a directory the shards come from model.safetensors.index.json, else every *.safetensors
    file; a config.json beside them gives the KV cache (at `context_length`, else the model's
    max_position_embeddings, vLLM's default max_model_len).
    """
    path = Path(path)
    if path.is_dir():
        shards = _safetensors_shards(path)
        config_path = path / "config.json"
    else:
        shards = [path]
        config_path = path.parent / "config.json"
    parameters = 0
    weights = 0
    for shard in shards:
        shard_parameters, shard_bytes = read_safetensors_header(shard)
        parameters += shard_parameters
        weights += shard_bytes
    kv, context_note = _kv_cache_from_config(config_path, context_length)
    return _combine(
        method="safetensors-header",
        parameters=parameters,
        weights=weights,
        kv=kv,
        context_note=context_note,
        prefix=f"{_format_count(parameters)} parameters in {len(shards)} file(s)",
    )


def _safetensors_shards(directory: Path) -> list[Path]:
    index = directory / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{_SAFETENSORS_INDEX} has no usable weight_map ({exc})") from None
        return [directory / str(name) for name in names]
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{directory} holds no .safetensors files")
    return shards


def _kv_cache_from_config(config_path: Path, context_length: int | None) -> tuple[int | None, str]:
    """KV cache from a Hugging Face config.json (text_config for multimodal models)."""
    if not config_path.is_file():
        return None, "no config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None, "config.json unreadable"
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}
    if not isinstance(config, dict):
        return None, "config.json is not an object"

    def number(name: str) -> int | None:
        value = config.get(name)
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        )

    layers = number("num_hidden_layers")
    hidden = number("hidden_size")
    heads = number("num_attention_heads")
    kv_heads = number("num_key_value_heads") or heads
    trained = number("max_position_embeddings")
    context = context_length or trained
    if layers is None or hidden is None or heads is None or kv_heads is None or context is None:
        return None, "config.json lacks attention sizes"
    head_dim = number("head_dim") or hidden // heads
    note = f"context {context}" + ("" if context_length else " (max_position_embeddings)")
    return kv_cache_bytes(layers, [kv_heads], head_dim, head_dim, context), note


# --- file size and dispatch -------------------------------------------------------------------


def from_file_size(path: str | Path, reason: str = "") -> Estimate:
    """The last resort: bytes on disk x 1.2 (a directory counts all its files)."""
    path = Path(path)
    if path.is_dir():
        on_disk = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    else:
        on_disk = path.stat().st_size
    detail = f"{format_bytes(on_disk)} on disk x {FILE_SIZE_FACTOR}"
    if reason:
        detail = f"{reason}; {detail}"
    return Estimate(bytes=math.ceil(on_disk * FILE_SIZE_FACTOR), method="file-size", detail=detail)


def estimate_path(path: str | Path, context_length: int | None = None) -> Estimate:
    """Estimate a model on disk by its format, falling back to file size when headers fail.

    Raises OSError only when the path itself cannot be read.
    """
    path = Path(path)
    try:
        if path.is_dir():
            has_shards = (path / _SAFETENSORS_INDEX).is_file() or any(path.glob("*.safetensors"))
            if has_shards:
                return from_safetensors_header(path, context_length)
            return from_file_size(path, "no safetensors files")
        with path.open("rb") as file:
            magic = file.read(4)
        if magic == _GGUF_MAGIC:
            return from_gguf_header(path, context_length)
        if path.suffix == ".safetensors":
            return from_safetensors_header(path, context_length)
        return from_file_size(path, "neither GGUF nor safetensors")
    except ValueError as exc:
        return from_file_size(path, f"header unreadable: {exc}")


def _combine(
    *,
    method: EstimateMethod,
    parameters: int,
    weights: int,
    kv: int | None,
    context_note: str,
    prefix: str,
) -> Estimate:
    """Sum the parts; `context_note` says at what context the KV cache was sized, or, when `kv`
    is None, why it could not be."""
    parts = [f"{prefix}: weights {format_bytes(weights)}"]
    if kv is None:
        parts.append(f"KV cache unknown ({context_note})")
    else:
        parts.append(f"KV cache {format_bytes(kv)} at {context_note}")
    parts.append(f"overhead {format_bytes(OVERHEAD_BYTES)}")
    return Estimate(
        bytes=weights + (kv or 0) + OVERHEAD_BYTES,
        method=method,
        detail=", ".join(parts),
        parameters=parameters,
    )


def _format_count(parameters: int) -> str:
    for suffix, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if parameters >= scale:
            return f"{parameters / scale:.1f}{suffix}"
    return str(parameters)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# --- vLLM: the budget --gpu-memory-utilization is derived from --------------------------------

VLLM_MAX_NUM_BATCHED_TOKENS = 8192
"""`vllm serve`'s default --max-num-batched-tokens on GPUs of 70 GiB and more (2048 below);
vLLM 0.11.0 engine/arg_utils.py, EngineArgs._set_default_args, OPENAI_API_SERVER context. The
larger figure is taken: the estimate is made before a GPU is chosen."""

VLLM_MAX_NUM_SEQS = 1024
"""`vllm serve`'s default --max-num-seqs on GPUs of 70 GiB and more (256 below); same source."""

VLLM_NON_TORCH_BYTES = 128 * 2**20
"""Memory the profiling run adds outside PyTorch's allocator (cuBLAS workspaces, NCCL buffers):
vLLM 0.11.0 v1/worker/gpu_worker.py counts it in the budget (`non_torch_increase`)."""

_SAMPLER_COPIES = 2
"""The dummy sampler run holds the logits and their probabilities, both float32."""


@dataclass(frozen=True)
class VLLMSizes:
    """What sizes a `vllm serve` budget besides the weights: its scheduler limits."""

    max_model_len: int | None = None
    """--max-model-len; None means the model's max_position_embeddings, vLLM's default."""
    max_num_batched_tokens: int = VLLM_MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = VLLM_MAX_NUM_SEQS


def vllm_sizes_from_args(args: Iterable[str]) -> VLLMSizes:
    """The limits `vllm serve` will run with, from its arguments (`--flag=N` or `--flag N`)."""
    values: dict[str, int] = {}
    items = list(args)
    for index, arg in enumerate(items):
        flag, sep, value = arg.partition("=")
        if flag not in ("--max-model-len", "--max-num-batched-tokens", "--max-num-seqs"):
            continue
        if not sep and index + 1 < len(items):
            value = items[index + 1]
        if value.isdigit() and int(value) > 0:
            values[flag] = int(value)
    return VLLMSizes(
        max_model_len=values.get("--max-model-len"),
        max_num_batched_tokens=values.get("--max-num-batched-tokens", VLLM_MAX_NUM_BATCHED_TOKENS),
        max_num_seqs=values.get("--max-num-seqs", VLLM_MAX_NUM_SEQS),
    )


def vllm_activation_bytes(config: Mapping[str, Any], sizes: VLLMSizes) -> int | None:
    """vLLM's profiled activation peak (`torch_peak_increase`), from a config.json.

    vLLM 0.11.0 v1/worker/gpu_model_runner.py `profile_run` runs the model once on
    max_num_batched_tokens dummy tokens, then samples min(max_num_batched_tokens, max_num_seqs)
    rows of logits. The peak of the forward pass is one decoder layer's live tensors per token:
    the residual and hidden states (2 x hidden) plus the larger of attention's q/k/v and output
    projections and the MLP's gate/up output with its activation (3 x intermediate; for a
    mixture of experts, the routed experts' share). The sampler holds float32 logits and
    probabilities over the vocabulary. None when config.json lacks the sizes.
    """
    if isinstance(config.get("text_config"), dict):
        config = {**config, **config["text_config"]}

    def number(name: str) -> int | None:
        value = config.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        return value if ok else None

    hidden = number("hidden_size")
    heads = number("num_attention_heads")
    vocab = number("vocab_size")
    if hidden is None or heads is None or vocab is None:
        return None
    kv_heads = number("num_key_value_heads") or heads
    head_dim = number("head_dim") or hidden // heads
    intermediate = number("intermediate_size") or 4 * hidden
    experts_per_token = number("num_experts_per_tok")
    moe_intermediate = number("moe_intermediate_size")
    if experts_per_token and moe_intermediate:
        intermediate = max(intermediate, experts_per_token * moe_intermediate)
    element = 4 if str(config.get("torch_dtype", config.get("dtype", ""))) == "float32" else 2
    attention = (heads + 2 * kv_heads) * head_dim + heads * head_dim
    per_token = 2 * hidden + max(attention, 3 * intermediate)
    tokens = sizes.max_num_batched_tokens
    forward = tokens * per_token * element
    rows = min(tokens, sizes.max_num_seqs)
    sampler = rows * vocab * 4 * _SAMPLER_COPIES
    return forward + sampler + VLLM_NON_TORCH_BYTES


def vllm_estimate_path(path: str | Path, sizes: VLLMSizes | None = None) -> Estimate:
    """The VRAM *budget* of a model under `vllm serve`: weights + KV cache + activation peak.

    This is the figure --gpu-memory-utilization is derived from (spec.vram for vLLM); the
    per-instance CUDA context and CUDA-graph pool outside it are added by the accounting rule
    in `vram_operator.api.budget`, never here. The KV cache holds one sequence of
    max_model_len tokens (vLLM refuses to start otherwise); the activation peak is the one
    vLLM profiles for max_num_batched_tokens (`vllm_activation_bytes`).

    GGUF files and unreadable headers fall back to `estimate_path` (its fixed overhead stands
    in for the activation peak there). Raises OSError only when the path cannot be read.
    """
    sizes = sizes or VLLMSizes()
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    is_safetensors = (
        (path / _SAFETENSORS_INDEX).is_file() or any(path.glob("*.safetensors"))
        if path.is_dir()
        else path.suffix == ".safetensors"
    )
    if not is_safetensors:
        return estimate_path(path, sizes.max_model_len)
    try:
        shards = _safetensors_shards(path) if path.is_dir() else [path]
        parameters = 0
        weights = 0
        for shard in shards:
            shard_parameters, shard_bytes = read_safetensors_header(shard)
            parameters += shard_parameters
            weights += shard_bytes
    except ValueError as exc:
        return from_file_size(path, f"header unreadable: {exc}")
    config_path = directory / "config.json"
    kv, context_note = _kv_cache_from_config(config_path, sizes.max_model_len)
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        config = {}
    activation = vllm_activation_bytes(config, sizes) if isinstance(config, dict) else None
    parts = [
        f"{_format_count(parameters)} parameters in {len(shards)} file(s): "
        f"weights {format_bytes(weights)}",
        f"KV cache {format_bytes(kv)} at {context_note}"
        if kv is not None
        else f"KV cache unknown ({context_note})",
    ]
    if activation is None:
        activation = OVERHEAD_BYTES
        parts.append(f"activation peak unknown (config.json), {format_bytes(activation)} assumed")
    else:
        parts.append(
            f"activation peak {format_bytes(activation)} for {sizes.max_num_batched_tokens} "
            f"batched tokens and {sizes.max_num_seqs} sequences"
        )
    return Estimate(
        bytes=weights + (kv or 0) + activation,
        method="safetensors-header",
        detail=", ".join(parts) + " (the vLLM budget; the instance overhead is added apart)",
        parameters=parameters,
    )
