"""Greedy decoding with a `Llama` KV cache: one compiled prefill per prompt length, one
compiled decode step per cache size."""

from collections.abc import Sequence

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._llama import Llama
from ._llama_layers import KVCache

_CACHE_ROUNDING = 64  # cache sizes are rounded up so that nearby lengths share a compile


@eqx.filter_jit
def _prefill_next(model: Llama, ids, cache: KVCache):
    logits, cache = model.prefill(ids, cache)
    return jnp.argmax(logits[-1]).astype(jnp.int32), cache


@eqx.filter_jit
def _decode_next(model: Llama, token, cache: KVCache):
    logits, cache = model.decode_step(token, cache)
    return jnp.argmax(logits).astype(jnp.int32), cache


def generate_greedy(
    model: Llama,
    prompt: str | Sequence[int] | np.ndarray,
    max_new_tokens: int,
    *,
    tokenizer=None,
    stop_at_eos: bool = True,
) -> str | np.ndarray:
    """Continue `prompt` with the most likely token, one at a time.

    Args:
        model: a `Llama` (dense or factorized).
        prompt: text (then `tokenizer` is required) or a sequence of token ids.
        max_new_tokens: at most this many tokens are generated.
        tokenizer: a `tokenizers.Tokenizer` to encode a text prompt and decode the
            continuation.
        stop_at_eos: stop early when the model emits one of `model.config.eos_token_ids`.

    Returns:
        The continuation only, without the end-of-sequence token: decoded text for a
        text prompt, else an int32 array of new token ids.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(
                "prompt is text but no tokenizer was given; pass tokenizer= (the one "
                "returned by the loader) or token ids"
            )
        ids = tokenizer.encode(prompt).ids
    else:
        ids = prompt
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"prompt must be a non-empty 1-D sequence of token ids, got shape {ids.shape} "
            f"and dtype {ids.dtype}"
        )
    total = ids.size + max_new_tokens
    cache = model.init_cache(-(-total // _CACHE_ROUNDING) * _CACHE_ROUNDING)
    eos = set(model.config.eos_token_ids) if stop_at_eos else set()
    token, cache = _prefill_next(model, jnp.asarray(ids, jnp.int32), cache)
    new = []
    for step in range(max_new_tokens):
        value = int(token)
        if value in eos:
            break
        new.append(value)
        if step + 1 < max_new_tokens:
            token, cache = _decode_next(model, token, cache)
    new = np.asarray(new, np.int32)
    if isinstance(prompt, str):
        return tokenizer.decode(new.tolist(), skip_special_tokens=True)
    return new
