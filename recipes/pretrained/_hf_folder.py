"""Hugging Face LLaMA/Qwen2-style checkpoint folders (config.json + safetensors, one
file or sharded with model.safetensors.index.json), read with safetensors' numpy API.
"""

import json
import os
import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 safetensors)
import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from ..models import Llama, LlamaConfig
from ._llama_weights import build_llama, first_layers, llama_tensor_names
from ._tokenizer import tokenizer_from_json

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer older checkpoints saved


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); re-save the checkpoint") from error


def _config(folder: str, raw: dict) -> LlamaConfig:
    where = os.path.join(folder, "config.json")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type={model_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{where}: hidden_act={raw['hidden_act']!r} is not supported; LLaMA-family "
            "SwiGLU needs 'silu'"
        )
    rope = dict(raw.get("rope_scaling") or {}) | dict(raw.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{where}: rope type {rope_type!r} (rope_scaling/rope_parameters) is not "
            "supported; only plain RoPE ('default') loads"
        )
    if raw.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    layer_types = set(raw.get("layer_types") or ["full_attention"])
    if raw.get("use_sliding_window", False) or layer_types != {"full_attention"}:
        raise ValueError(
            f"{where}: sliding-window attention (use_sliding_window / layer_types) is not "
            "supported; only full causal attention loads"
        )
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id")
        eos = () if eos is None else tuple(int(e) for e in np.atleast_1d(eos))
        return LlamaConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            eos_token_ids=eos,
        )
    except KeyError as error:
        raise ValueError(
            f"{where}: key {error.args[0]!r} is missing; the file is not a complete "
            "LLaMA/Qwen2 config"
        ) from error
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error


def _weight_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file that holds it."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map'; re-save the checkpoint")
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise FileNotFoundError(
            f"{folder} has neither model.safetensors nor model.safetensors.index.json; "
            "save the model with save_pretrained(..., safe_serialization=True) "
            "(pytorch_model.bin files are not read)"
        )
    with safe_open(single, framework="np") as handle:
        names = handle.keys()
    return dict.fromkeys(names, single)


def llama_from_hf(
    folder: str | os.PathLike, *, num_layers: int | None = None, dtype=jnp.float32
) -> tuple[Llama, Tokenizer | None]:
    """Load a Hugging Face LLaMA or Qwen2 checkpoint folder as an Equinox `Llama`.

    Args:
        folder: holds config.json and model.safetensors (or sharded safetensors with
            model.safetensors.index.json), and optionally tokenizer.json.
        num_layers: load only the first this many blocks.
        dtype: parameter dtype.

    Returns:
        `(model, tokenizer)`; the tokenizer is None when the folder has no tokenizer.json.
    """
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"{config_path} does not exist; pass a Hugging Face checkpoint folder "
            "(config.json + *.safetensors)"
        )
    config = _config(folder, _read_json(config_path))
    config = first_layers(config, num_layers, folder)
    files = _weight_files(folder)
    wanted = set(llama_tensor_names(config))
    unexpected = []
    by_file: dict[str, list[str]] = {}
    for name, path in files.items():
        layer = _LAYER.match(name)
        if name in wanted:
            by_file.setdefault(path, []).append(name)
        elif _IGNORED.fullmatch(name) or (name == "lm_head.weight" and config.tie_embeddings):
            continue
        elif layer is None or int(layer.group(1)) < config.num_layers:
            unexpected.append(name)
    if unexpected:
        raise ValueError(
            f"{folder}: tensors the config does not describe: {', '.join(unexpected[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}; the checkpoint does not match its "
            "config.json (or is not a plain LLaMA/Qwen2 causal LM)"
        )
    tensors = {}
    for path, names in by_file.items():
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} (a shard listed in the index) does not exist; download the "
                "whole checkpoint folder"
            )
        with safe_open(path, framework="np") as handle:
            for name in names:
                tensors[name] = handle.get_tensor(name)
    model = build_llama(config, tensors, dtype=dtype, source=folder)
    tokenizer_path = os.path.join(folder, "tokenizer.json")
    tokenizer = tokenizer_from_json(tokenizer_path) if os.path.isfile(tokenizer_path) else None
    return model, tokenizer
