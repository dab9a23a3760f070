"""VRAM estimates: real GGUF and safetensors headers written here byte by byte, /api/show data."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vram_operator.node_agent.estimate import (
    DEFAULT_OLLAMA_CONTEXT,
    OVERHEAD_BYTES,
    VLLM_NON_TORCH_BYTES,
    Estimate,
    VLLMSizes,
    estimate_path,
    from_file_size,
    from_gguf_header,
    from_ollama_show,
    from_safetensors_header,
    kv_cache_bytes,
    parse_parameter_size,
    vllm_activation_bytes,
    vllm_estimate_path,
    vllm_sizes_from_args,
)

pytestmark = pytest.mark.unit

# --- a GGUF v3 writer ---------------------------------------------------------------------------

U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = 4, 5, 6, 7, 8, 9, 10, 11, 12
GGML_F32, GGML_F16, GGML_Q4_0 = 0, 1, 2
_SCALAR_FORMATS = {U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(value_type: int, value: Any) -> bytes:
    if value_type == STRING:
        return gguf_string(value)
    if value_type == ARRAY:
        element_type, items = value
        body = b"".join(gguf_value(element_type, item) for item in items)
        return struct.pack("<IQ", element_type, len(items)) + body
    return struct.pack(_SCALAR_FORMATS[value_type], value)


def gguf_file(
    metadata: list[tuple[str, int, Any]],
    tensors: list[tuple[str, list[int], int]],
    version: int = 3,
) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, value_type, value in metadata:
        out += gguf_string(key) + struct.pack("<I", value_type) + gguf_value(value_type, value)
    offset = 0
    for name, dims, ggml_type in tensors:
        out += gguf_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
        offset += 32
    return out + b"\0" * 64  # stands in for the tensor data, which is never read


LLAMA_METADATA: list[tuple[str, int, Any]] = [
    ("general.architecture", STRING, "llama"),
    ("general.name", STRING, "tiny"),
    ("general.quantized", BOOL, True),
    ("general.rope_scale", F64, 1.0),
    ("general.file_type", I64, 2),
    ("llama.block_count", U32, 2),
    ("llama.context_length", U32, 8192),
    ("llama.embedding_length", U32, 64),
    ("llama.attention.head_count", U32, 4),
    ("llama.attention.head_count_kv", U32, 2),
    ("llama.rope.freq_base", F32, 10000.0),
    ("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "hello"])),
    ("tokenizer.ggml.scores", ARRAY, (F32, [0.0, -1.0, -2.5])),
    ("tokenizer.ggml.token_type", ARRAY, (I32, [3, 3, 1])),
]
TENSORS = [
    ("token_embd.weight", [64, 10], GGML_F32),  # 640 params, 2560 bytes
    ("blk.0.attn_q.weight", [64, 64], GGML_F16),  # 4096 params, 8192 bytes
    ("blk.0.ffn_up.weight", [64, 32], GGML_Q4_0),  # 2048 params, 64 blocks x 18 = 1152 bytes
]
TINY_PARAMETERS = 640 + 4096 + 2048
TINY_WEIGHTS = 2560 + 8192 + 1152
# 2 layers x 2 KV heads x (16 + 16) dims x 2 bytes, per token
TINY_KV_PER_TOKEN = 2 * 2 * 32 * 2


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(gguf_file(LLAMA_METADATA, TENSORS))
    return path


def test_gguf_header_gives_exact_parameters_and_weight_bytes(tiny_gguf: Path) -> None:
    estimate = from_gguf_header(tiny_gguf)
    assert estimate.method == "gguf-header"
    assert estimate.parameters == TINY_PARAMETERS
    # trained context 8192 capped at Ollama's default 4096
    assert estimate.bytes == TINY_WEIGHTS + TINY_KV_PER_TOKEN * 4096 + OVERHEAD_BYTES
    assert "3 tensors" in estimate.detail
    assert "trained 8192" in estimate.detail


def test_gguf_context_length_sizes_the_kv_cache(tiny_gguf: Path) -> None:
    estimate = from_gguf_header(tiny_gguf, context_length=1000)
    assert estimate.bytes == TINY_WEIGHTS + TINY_KV_PER_TOKEN * 1000 + OVERHEAD_BYTES


def test_gguf_version_2_is_read_like_version_3(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(gguf_file(LLAMA_METADATA, TENSORS, version=2))
    assert from_gguf_header(path).parameters == TINY_PARAMETERS


def test_gguf_per_layer_kv_heads_are_summed(tmp_path: Path) -> None:
    metadata = [m for m in LLAMA_METADATA if m[0] != "llama.attention.head_count_kv"] + [
        ("llama.attention.head_count_kv", ARRAY, (U32, [2, 4]))
    ]
    path = tmp_path / "per-layer.gguf"
    path.write_bytes(gguf_file(metadata, TENSORS))
    kv = (2 + 4) * 32 * 2 * 4096
    assert from_gguf_header(path).bytes == TINY_WEIGHTS + kv + OVERHEAD_BYTES


def test_gguf_without_attention_metadata_says_kv_is_unknown(tmp_path: Path) -> None:
    path = tmp_path / "bare.gguf"
    path.write_bytes(gguf_file([("general.architecture", STRING, "llama")], TENSORS))
    estimate = from_gguf_header(path)
    assert estimate.bytes == TINY_WEIGHTS + OVERHEAD_BYTES
    assert "KV cache unknown" in estimate.detail


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + b"\0" * 40, "not a GGUF file"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "version 1"),
        (gguf_file(LLAMA_METADATA, [("x", [32], 99)]), "unknown ggml type 99"),
        (gguf_file(LLAMA_METADATA, [("x", [33], GGML_Q4_0)]), "blocks"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k") + struct.pack("<I", 13),
            "unknown value type 13",
        ),
        # an array claiming 2**40 uint32s: refused without reading (or allocating) them
        (
            b"GGUF"
            + struct.pack("<IQQ", 3, 0, 1)
            + gguf_string("big")
            + struct.pack("<IIQ", 9, 4, 2**40),
            "truncated",
        ),
    ],
)
def test_gguf_malformed_headers_raise_value_error_naming_the_problem(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        from_gguf_header(path)


def test_gguf_every_truncation_is_a_value_error(tmp_path: Path) -> None:
    data = gguf_file(LLAMA_METADATA, TENSORS)
    header_end = len(data) - 64
    path = tmp_path / "cut.gguf"
    for cut in range(4, header_end, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"truncated|not a GGUF"):
            from_gguf_header(path)


@settings(max_examples=60, deadline=None)
@given(noise=st.binary(max_size=120))
def test_gguf_garbage_after_the_magic_never_escapes_as_another_error(
    tmp_path_factory: pytest.TempPathFactory, noise: bytes
) -> None:
    path = tmp_path_factory.mktemp("noise") / "noise.gguf"
    path.write_bytes(b"GGUF" + noise)
    outcome: Estimate | ValueError
    try:
        outcome = from_gguf_header(path)
    except ValueError as err:
        outcome = err
    assert isinstance(outcome, Estimate | ValueError)


# --- safetensors ------------------------------------------------------------------------------

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


def safetensors_file(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * _DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_safetensors_header_sums_elements_times_dtype_sizes(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors_file(
        path,
        {"a": ("F32", [4, 4]), "b": ("BF16", [8]), "c": ("I8", [3]), "d": ("F8_E4M3", [2, 5])},
    )
    estimate = from_safetensors_header(path)
    assert estimate.method == "safetensors-header"
    assert estimate.parameters == 16 + 8 + 3 + 10
    assert estimate.bytes == 64 + 16 + 3 + 10 + OVERHEAD_BYTES
    assert "no config.json" in estimate.detail


def test_safetensors_config_json_adds_kv_cache_at_max_position_embeddings(tmp_path: Path) -> None:
    safetensors_file(tmp_path / "model.safetensors", {"w": ("F16", [128, 128])})
    config = {
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    kv = 4 * 2 * (16 + 16) * 2 * 2048
    assert from_safetensors_header(tmp_path).bytes == 128 * 128 * 2 + kv + OVERHEAD_BYTES
    shorter = from_safetensors_header(tmp_path, context_length=512)
    assert shorter.bytes == 128 * 128 * 2 + kv // 4 + OVERHEAD_BYTES


def test_sharded_safetensors_sum_the_shards_named_by_the_index(tmp_path: Path) -> None:
    safetensors_file(tmp_path / "model-00001-of-00002.safetensors", {"a": ("F16", [10, 10])})
    safetensors_file(tmp_path / "model-00002-of-00002.safetensors", {"b": ("F16", [5])})
    safetensors_file(tmp_path / "stray.safetensors", {"c": ("F32", [1000])})  # not in the index
    index = {
        "metadata": {"total_size": 210},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    estimate = from_safetensors_header(tmp_path)
    assert estimate.parameters == 105
    assert estimate.bytes == 210 + OVERHEAD_BYTES
    assert "2 file(s)" in estimate.detail


def test_safetensors_directory_without_index_reads_every_file(tmp_path: Path) -> None:
    safetensors_file(tmp_path / "a.safetensors", {"a": ("F16", [10])})
    safetensors_file(tmp_path / "b.safetensors", {"b": ("U8", [7])})
    assert from_safetensors_header(tmp_path).parameters == 17


def safetensors_raw(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x02", "no 8-byte length"),
        (struct.pack("<Q", 10**12) + b"{}", "does not fit"),
        (safetensors_raw(b"nope"), "not JSON"),
        (safetensors_raw(b"[]"), "not a JSON object"),
        (safetensors_raw(b'{"w": 3}'), "not described by an object"),
        (safetensors_raw(b'{"w":{"dtype":"Q9","shape":[2]}}'), "unknown dtype 'Q9'"),
        (
            safetensors_raw(b'{"w":{"dtype":"F16","shape":[2],"data_offsets":[0,99]}}'),
            "99 bytes on disk",
        ),
        (safetensors_raw(b'{"w":{"dtype":"F16"}}'), "no valid shape"),
        (safetensors_raw(b'{"w":{"dtype":"F16","shape":[-1]}}'), "no valid shape"),
    ],
)
def test_safetensors_malformed_headers_raise_value_error(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        from_safetensors_header(path)


def test_a_broken_index_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(ValueError, match="weight_map"):
        from_safetensors_header(tmp_path)


# --- dispatch and fallback ----------------------------------------------------------------------


def test_estimate_path_picks_the_parser_by_magic_and_extension(
    tmp_path: Path, tiny_gguf: Path
) -> None:
    renamed = tmp_path / "no-extension"
    renamed.write_bytes(tiny_gguf.read_bytes())
    assert estimate_path(renamed).method == "gguf-header"
    safetensors_file(tmp_path / "m.safetensors", {"w": ("F16", [4])})
    assert estimate_path(tmp_path / "m.safetensors").method == "safetensors-header"
    assert estimate_path(tmp_path).method == "safetensors-header"


def test_estimate_path_falls_back_to_file_size_and_says_why(tmp_path: Path) -> None:
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_file(LLAMA_METADATA, TENSORS)[:100])
    estimate = estimate_path(truncated)
    assert estimate.method == "file-size"
    assert estimate.bytes == math.ceil(100 * 1.2)
    assert "header unreadable" in estimate.detail
    assert "truncated" in estimate.detail

    other = tmp_path / "weights.bin"
    other.write_bytes(b"\1" * 1000)
    estimate = estimate_path(other)
    assert (estimate.method, estimate.bytes) == ("file-size", 1200)
    assert "neither GGUF nor safetensors" in estimate.detail


def test_file_size_of_a_directory_counts_every_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"\0" * 500)
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * 500)
    assert from_file_size(tmp_path).bytes == 1200
    assert estimate_path(tmp_path).detail.startswith("no safetensors files")


def test_estimate_path_of_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        estimate_path(tmp_path / "missing.gguf")


# --- Ollama /api/show ---------------------------------------------------------------------------

LLAMA3_SHOW: dict[str, Any] = {
    "parameters": 'num_keep 24\nstop "<|eot_id|>"',
    "details": {"format": "gguf", "parameter_size": "8.0B", "quantization_level": "Q4_0"},
    "model_info": {
        "general.architecture": "llama",
        "general.parameter_count": 8030261248,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.block_count": 32,
        "llama.context_length": 8192,
        "llama.embedding_length": 4096,
    },
}


def test_ollama_show_uses_exact_parameter_count_quantization_and_default_context() -> None:
    estimate = from_ollama_show(LLAMA3_SHOW)
    weights = math.ceil(8030261248 * 18 / 32)
    kv = 32 * 8 * 256 * 2 * DEFAULT_OLLAMA_CONTEXT  # 512 MiB: Llama 3 8B at 4096 tokens
    assert kv == 512 * 2**20
    assert estimate.method == "ollama-show"
    assert estimate.parameters == 8030261248
    assert estimate.bytes == weights + kv + OVERHEAD_BYTES
    assert "Q4_0" in estimate.detail


def test_ollama_num_ctx_from_options_then_modelfile() -> None:
    base = from_ollama_show(LLAMA3_SHOW).bytes
    kv_per_token = 32 * 8 * 256 * 2
    assert from_ollama_show(LLAMA3_SHOW, num_ctx=8192).bytes == base + kv_per_token * 4096
    with_modelfile = {
        **LLAMA3_SHOW,
        "parameters": "num_ctx                        2048\nnum_keep 4",
    }
    estimate = from_ollama_show(with_modelfile)
    assert estimate.bytes == base - kv_per_token * 2048
    assert "from the Modelfile" in estimate.detail


def test_ollama_show_without_model_info_uses_parameter_size() -> None:
    show = {"details": {"parameter_size": "494M", "quantization_level": "Q8_0"}}
    estimate = from_ollama_show(show)
    assert estimate.parameters == 494_000_000
    assert estimate.bytes == math.ceil(494_000_000 * 34 / 32) + OVERHEAD_BYTES
    assert "KV cache unknown" in estimate.detail


def test_unknown_quantization_is_taken_as_f16_and_said() -> None:
    estimate = from_ollama_show({"details": {"parameter_size": "1B", "quantization_level": "Q7"}})
    assert estimate.bytes == 2 * 10**9 + OVERHEAD_BYTES
    assert "unknown quantization 'Q7'" in estimate.detail


def test_ollama_show_without_any_size_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="parameter_count"):
        from_ollama_show({"details": {"quantization_level": "Q4_0"}, "model_info": []})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8.0B", 8 * 10**9),
        ("494M", 494 * 10**6),
        ("70B", 70 * 10**9),
        ("1.5t", 15 * 10**11),
        ("137", 137),
        (" 22.5K ", 22_500),
    ],
)
def test_parameter_sizes(text: str, expected: int) -> None:
    assert parse_parameter_size(text) == expected


@pytest.mark.parametrize("text", ["", "B", "8.0X", "-1B", "eight"])
def test_bad_parameter_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="parameter size"):
        parse_parameter_size(text)


def test_kv_cache_with_one_head_count_applies_it_to_every_layer() -> None:
    assert kv_cache_bytes(3, [4], 8, 8, 10) == 3 * 4 * 16 * 10 * 2
    assert kv_cache_bytes(2, [1, 3], 8, 4, 10) == (1 + 3) * 12 * 10 * 2


# --- vLLM budgets -------------------------------------------------------------------------------

QWEN_LIKE = {
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "vocab_size": 1000,
    "torch_dtype": "bfloat16",
}


def test_vllm_budget_is_weights_kv_and_the_activation_peak_without_instance_overhead(
    tmp_path: Path,
) -> None:
    safetensors_file(tmp_path / "model.safetensors", {"w": ("BF16", [128, 128])})
    (tmp_path / "config.json").write_text(json.dumps(QWEN_LIKE))
    weights = 128 * 128 * 2
    kv_per_token = 4 * 2 * (16 + 16) * 2
    sizes = VLLMSizes(max_model_len=512, max_num_batched_tokens=256, max_num_seqs=16)
    # one layer's live tensors per token (residual+hidden, then the MLP's 3 x intermediate),
    # and float32 logits + probabilities for 16 sampled rows
    activation = 256 * (2 * 128 + 3 * 512) * 2 + 16 * 1000 * 4 * 2 + VLLM_NON_TORCH_BYTES
    estimate = vllm_estimate_path(tmp_path, sizes)
    assert estimate.bytes == weights + kv_per_token * 512 + activation
    assert "activation peak" in estimate.detail
    assert vllm_activation_bytes(QWEN_LIKE, sizes) == activation
    # --max-model-len sizes the KV cache; the default is max_position_embeddings
    default = vllm_estimate_path(tmp_path, VLLMSizes(max_num_batched_tokens=256, max_num_seqs=16))
    assert default.bytes - estimate.bytes == kv_per_token * (2048 - 512)
    # more batched tokens, a larger activation peak
    bigger = vllm_estimate_path(tmp_path, VLLMSizes(max_model_len=512))
    assert bigger.bytes > estimate.bytes


def test_vllm_sizes_come_from_the_deployments_args() -> None:
    assert vllm_sizes_from_args(["--max-model-len=4096"]) == VLLMSizes(max_model_len=4096)
    sizes = vllm_sizes_from_args(
        ["--max-num-batched-tokens", "2048", "--max-num-seqs=64", "--enforce-eager"]
    )
    assert sizes == VLLMSizes(max_model_len=None, max_num_batched_tokens=2048, max_num_seqs=64)
    assert vllm_sizes_from_args(["--max-model-len=x"]).max_model_len is None


def test_vllm_activation_needs_the_sizes() -> None:
    assert vllm_activation_bytes({"hidden_size": 8}, VLLMSizes()) is None
