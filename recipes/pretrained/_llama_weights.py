"""Hugging Face-named LLaMA tensors -> a `Llama` module; the GGUF and HF-folder readers
both translate their files to these names (`model.layers.3.self_attn.q_proj.weight`, ...).
"""

import dataclasses
from collections.abc import Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..models import Llama, LlamaConfig

_BLOCK_RENAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _hf_name(path: str) -> str:
    if not path.startswith("blocks."):
        return _TOP_RENAMES[path]
    _, index, rest = path.split(".", 2)
    rest = _BLOCK_RENAMES.get(rest, rest)
    if rest.startswith("attn."):
        rest = "self_attn." + rest.removeprefix("attn.")
    return f"model.layers.{index}.{rest}"


def _skeleton(config: LlamaConfig, dtype):
    model = eqx.filter_eval_shape(Llama, config, dtype=dtype, key=jr.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(model)
    names = [_hf_name(jax.tree_util.keystr(p, simple=True, separator=".")) for p, _ in leaves]
    return names, [leaf for _, leaf in leaves], treedef


def first_layers(config: LlamaConfig, num_layers: int | None, source: str) -> LlamaConfig:
    """`config` cut to its first `num_layers` blocks (None: all of them).

    Args:
        config: the checkpoint's whole config.
        num_layers: how many blocks to keep, in [1, config.num_layers], or None.
        source: the checkpoint file or folder, named in the error.

    Returns:
        The config with `num_layers` applied.
    """
    if num_layers is None:
        return config
    if not isinstance(num_layers, int) or not 1 <= num_layers <= config.num_layers:
        raise ValueError(
            f"num_layers={num_layers!r} must be an int in [1, {config.num_layers}] "
            f"for {source} (or None for all blocks)"
        )
    return dataclasses.replace(config, num_layers=num_layers)


def llama_tensor_names(config: LlamaConfig) -> list[str]:
    """The Hugging Face names of every tensor a `Llama` of this config needs."""
    return _skeleton(config, jnp.float32)[0]


def build_llama(
    config: LlamaConfig, tensors: Mapping[str, np.ndarray], *, dtype, source: str
) -> Llama:
    """A `Llama` holding `tensors` (Hugging Face names and layouts: Linear weights are
    (out, in)), each cast to `dtype`.

    Args:
        config: the architecture the tensors must match.
        tensors: at least `llama_tensor_names(config)`.
        dtype: parameter dtype.
        source: the file the tensors came from, for error messages.

    Returns:
        The model.
    """
    names, shapes, treedef = _skeleton(config, dtype)
    leaves = []
    for name, spec in zip(names, shapes):
        if name not in tensors:
            raise ValueError(
                f"{source}: tensor {name!r} is missing; the checkpoint does not match its "
                "config (a different architecture, or a truncated file?)"
            )
        array = tensors[name]
        if tuple(array.shape) != tuple(spec.shape):
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(array.shape)} but the config "
                f"implies {tuple(spec.shape)}; the checkpoint does not match its config "
                "(check hidden_size, heads, head_dim, intermediate_size, vocab_size)"
            )
        leaves.append(jnp.asarray(array, dtype=dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
