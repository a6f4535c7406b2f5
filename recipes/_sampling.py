"""Generating tokens from a byte-level language model, greedily or by sampling, with a
sliding context window."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int, PRNGKeyArray


@eqx.filter_jit
def decode_into(model, buffer, start, key, n: int, temperature: float, window: int | None):
    """Fill buffer[start : start + n], one token at a time, each from the model's
    logits on the (at most `window`-long) stretch of known tokens ending before it."""
    size = buffer.shape[0]
    width = size if window is None else min(window, size)

    def step(i, carry):
        buffer, key = carry
        cur = start + i  # tokens known so far; this step writes buffer[cur]
        lo = jnp.clip(cur - width, 0, size - width)
        logits = model(jax.lax.dynamic_slice(buffer, (lo,), (width,)))[cur - 1 - lo]
        key, sub = jr.split(key)
        if temperature == 0:
            token = jnp.argmax(logits)
        else:
            token = jr.categorical(sub, logits.astype(jnp.float32) / temperature)
        return buffer.at[cur].set(token.astype(buffer.dtype)), key

    buffer, _ = jax.lax.fori_loop(0, n, step, (buffer, key))
    return buffer


def generate(
    model,
    prompt_ids: Int[Array, " P"],
    n: int,
    *,
    key: PRNGKeyArray | None = None,
    temperature: float = 1.0,
    context: int | None = None,
) -> Int[Array, " n"]:
    """The next `n` tokens after `prompt_ids`: greedy (argmax) at temperature 0, else
    sampled from softmax(logits / temperature). The model sees at most `context` tokens
    (default `model.context` when it has one): older tokens slide out of the window.
    Pass a model in inference mode (`eqx.nn.inference_mode`) if it has dropout.

    Args:
        model: a language model, ids (T,) -> logits (T, 256).
        prompt_ids: the prompt's tokens.
        n: how many tokens to generate.
        key: the sampling key (needed at temperature > 0).
        temperature: 0 for greedy, else the sampling temperature.
        context: the most tokens the model sees (default `model.context`, if any).

    Returns:
        The (n,) generated tokens.
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 1 or prompt_ids.shape[0] < 1:
        raise ValueError(
            f"prompt_ids must be a non-empty 1-D sequence, got shape {prompt_ids.shape}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0 tokens, got {n}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key: pass key=")
    context = getattr(model, "context", None) if context is None else context
    key = jr.key(0) if key is None else key
    buffer = jnp.concatenate([prompt_ids, jnp.zeros((n,), jnp.int32)])
    start = prompt_ids.shape[0]
    return decode_into(model, buffer, start, key, n, float(temperature), context)[start:]
