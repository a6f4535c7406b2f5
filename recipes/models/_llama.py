"""LLaMA-family decoder (LLaMA, SmolLM2, Qwen2): RMSNorm, rotary, grouped-query
attention, SwiGLU, optionally tied embeddings, and a KV cache for generation.

Every projection is an `eqx.nn.Linear` at a readable path, so `lowrank` selects them by
name: `blocks.3.attn.q_proj` ... `o_proj`, `blocks.3.mlp.gate_proj`, `up_proj`,
`down_proj`, and `lm_head` when the head is untied. Rotary follows the Hugging Face
convention (the two halves of each head are the real and imaginary parts), so weights
from a `transformers` checkpoint load as they are; llama.cpp's GGUF files are
un-permuted by the reader. The model maps ONE sequence `(T,)` of int32 ids to logits
`(T, vocab)`; vmap over a batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._llama_layers import KVCache, LlamaBlock, LlamaConfig


class Llama(eqx.Module):
    """An unbatched LLaMA-family causal LM: `model(ids) -> logits` on one sequence.

    Blocks are a Python list (`blocks.0` ... `blocks.{n-1}`), not stacked, so each
    projection can be factorized on its own. For generation, `init_cache` makes a
    fixed-size KV cache, `prefill` runs the prompt into it and `decode_step` adds one
    token at a time (see `generate_greedy`). Token ids must lie in `[0, vocab_size)`
    (not checked: ids are traced values).
    """

    embed: eqx.nn.Embedding
    blocks: list[LlamaBlock]
    norm: eqx.nn.RMSNorm
    lm_head: eqx.nn.Linear | None
    config: LlamaConfig = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, key: PRNGKeyArray):
        """Random weights (N(0, 0.02) embeddings; Equinox's default Linear init).

        Args:
            config: the architecture.
            dtype: parameter dtype (norms, softmax and rotary run in float32).
            key: PRNG key.
        """
        k_embed, k_head, *k_blocks = jr.split(key, 2 + config.num_layers)
        self.config = config
        self.embed = eqx.nn.Embedding(
            weight=0.02 * jr.normal(k_embed, (config.vocab_size, config.hidden_size), dtype)
        )
        self.blocks = [LlamaBlock(config, dtype=dtype, key=k) for k in k_blocks]
        self.norm = eqx.nn.RMSNorm(
            config.hidden_size, eps=config.rms_norm_eps, use_bias=False, dtype=dtype
        )
        self.lm_head = (
            None
            if config.tie_embeddings
            else eqx.nn.Linear(
                config.hidden_size,
                config.vocab_size,
                use_bias=False,
                dtype=dtype,
                key=k_head,
            )
        )

    def fused(self) -> "Llama":
        """This model for inference with each block's q/k/v and gate/up run as one
        `lowrank.SharedInputLinear` apiece: the input is read by one matmul over the
        stacked first factors (or weights, for layers left dense). Same function up to
        float rounding; factorize before fusing (the fused projections have no q_proj
        ... up_proj paths to select).

        Returns:
            A new model; this one is unchanged.
        """
        blocks = [
            eqx.tree_at(lambda b: (b.attn, b.mlp), block, (block.attn.fused(), block.mlp.fused()))
            for block in self.blocks
        ]
        return eqx.tree_at(lambda m: m.blocks, self, blocks)

    def _check_ids(self, ids) -> None:
        if ids.ndim != 1:
            raise ValueError(
                f"ids must be one sequence of shape (T,), got shape {ids.shape}; "
                "vmap the model over the batch axis"
            )
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")

    def hidden_states(self, ids: Int[Array, " T"]) -> Float[Array, "n_layers_plus_1 T d"]:
        """Residual stream after the embedding and after each block, stacked (entry 0
        is the embedding output; the last entry feeds `unembed`).

        Args:
            ids: one sequence of integer token ids.

        Returns:
            (num_layers + 1, T, hidden_size) residual streams.
        """
        return jnp.stack(self._residual_streams(ids, keep_all=True))

    def last_hidden_state(self, ids: Int[Array, " T"]) -> Float[Array, "T d"]:
        """`hidden_states(ids)[-1]` without holding the earlier streams (an eager
        calibration pass would keep every one of them alive until the stack).

        Args:
            ids: one sequence of integer token ids.

        Returns:
            (T, hidden_size) residual stream after the last block.
        """
        return self._residual_streams(ids, keep_all=False)[-1]

    def _residual_streams(self, ids, *, keep_all: bool) -> list:
        self._check_ids(ids)
        x = jax.vmap(self.embed)(ids)
        positions = jnp.arange(ids.shape[0])
        states = [x]
        for block in self.blocks:
            x, _ = block(x, positions)
            states = [*states, x] if keep_all else [x]
        return states

    def unembed(self, h: Float[Array, "T d"]) -> Float[Array, "T vocab"]:
        """Final RMSNorm then the head (tied to the embedding or `lm_head`).

        Args:
            h: a (T, hidden_size) residual stream (the last of `hidden_states`).

        Returns:
            (T, vocab) logits (float32 with a tied head).
        """
        h = jax.vmap(self.norm)(h)
        if self.lm_head is None:
            return jnp.einsum("td,vd->tv", h, self.embed.weight, preferred_element_type=jnp.float32)
        return jax.vmap(self.lm_head)(h)

    def __call__(self, ids: Int[Array, " T"]) -> Float[Array, "T vocab"]:
        """Args:
            ids: one sequence of integer token ids, positions 0 .. T-1.

        Returns:
            (T, vocab) next-token logits.
        """
        return self.unembed(self.last_hidden_state(ids))

    def init_cache(self, max_len: int, *, dtype=None) -> KVCache:
        """An empty KV cache for up to `max_len` positions.

        Args:
            max_len: prompt plus generated tokens the cache can hold.
            dtype: buffer dtype (default: the embedding's dtype).

        Returns:
            A `KVCache` with `length` 0.
        """
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        dtype = self.embed.weight.dtype if dtype is None else dtype
        shape = (max_len, self.config.num_kv_heads, self.config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in self.blocks)
        return KVCache(keys=zeros, values=zeros, length=jnp.zeros((), jnp.int32))

    def prefill(
        self, ids: Int[Array, " T"], cache: KVCache
    ) -> tuple[Float[Array, "T vocab"], KVCache]:
        """Run `ids` at positions `[cache.length, cache.length + T)`, attending to the
        cached prefix, and store their keys and values.

        Args:
            ids: the next T tokens (the prompt, or a chunk of it).
            cache: from `init_cache` or a previous call.

        Returns:
            Logits for the T positions and the cache with `length` advanced by T.
            Raises (also under jit) if the cache would overflow its `max_len`.
        """
        self._check_ids(ids)
        if len(cache.keys) != len(self.blocks):
            raise ValueError(
                f"cache has {len(cache.keys)} blocks but the model has {len(self.blocks)}; "
                "make it with this model's init_cache"
            )
        seq = ids.shape[0]
        if seq > cache.max_len:
            raise ValueError(
                f"{seq} tokens do not fit a KV cache of max_len={cache.max_len}; "
                "make a larger cache with init_cache(max_len)"
            )
        length = eqx.error_if(
            cache.length,
            cache.length + seq > cache.max_len,
            "KV cache overflow: length + new tokens > max_len; make a larger cache "
            "with init_cache(max_len)",
        )
        positions = length + jnp.arange(seq, dtype=jnp.int32)
        x = jax.vmap(self.embed)(ids)
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache.keys, cache.values):
            x, (k, v) = block(x, positions, (k, v))
            keys.append(k)
            values.append(v)
        cache = KVCache(keys=tuple(keys), values=tuple(values), length=length + seq)
        return self.unembed(x), cache

    def decode_step(
        self, token: Int[Array, ""], cache: KVCache
    ) -> tuple[Float[Array, " vocab"], KVCache]:
        """One generation step: the logits after `token` and the cache with it stored.

        Args:
            token: a scalar int token id.
            cache: holding the tokens before it.

        Returns:
            Next-token logits `(vocab,)` and the updated cache.
        """
        logits, cache = self.prefill(jnp.reshape(token, (1,)), cache)
        return logits[0], cache
