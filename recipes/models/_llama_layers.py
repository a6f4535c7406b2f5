"""The LLaMA decoder's parts: its configuration, KV cache, rotary attention, SwiGLU MLP
and block (assembled by `Llama` in `_llama`).
"""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

import lowrank


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a LLaMA-family decoder (Hugging Face `config.json` names in
    brackets).

    Attributes:
        vocab_size: token vocabulary (`vocab_size`).
        hidden_size: residual stream width (`hidden_size`).
        intermediate_size: SwiGLU hidden width (`intermediate_size`).
        num_layers: decoder blocks (`num_hidden_layers`).
        num_heads: query heads (`num_attention_heads`).
        num_kv_heads: key/value heads, dividing `num_heads` (`num_key_value_heads`).
        head_dim: width of one head (`head_dim`, default hidden_size / num_heads).
        rope_theta: rotary base frequency (`rope_theta`).
        rms_norm_eps: RMSNorm epsilon (`rms_norm_eps`).
        tie_embeddings: the head reuses the token embedding (`tie_word_embeddings`).
        attention_bias: q/k/v projections have biases (Qwen2; `attention_bias`).
        max_position: context length the model was trained for
            (`max_position_embeddings`); informational, not enforced.
        eos_token_ids: ids that end generation (`eos_token_id`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    max_position: int = 2048
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention); fix the config"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"LlamaConfig.head_dim={self.head_dim} must be even for rotary embeddings"
            )


class KVCache(eqx.Module):
    """Keys and values of every block for positions `[0, length)` of one sequence,
    in buffers of a fixed `max_len` so that decode steps compile once.

    Make one with `Llama.init_cache`; `Llama.prefill` and `Llama.decode_step` return
    the updated cache (it is a value, never mutated).

    Attributes:
        keys: per block, a (max_len, kv_heads, head_dim) buffer of rotated keys.
        values: per block, a (max_len, kv_heads, head_dim) buffer of values.
        length: how many positions are filled.
    """

    keys: tuple[Float[Array, "max_len kv_heads head_dim"], ...]
    values: tuple[Float[Array, "max_len kv_heads head_dim"], ...]
    length: Int[Array, ""]

    @property
    def max_len(self) -> int:
        """The positions the cache can hold."""
        return self.keys[0].shape[0]


def _rotary(
    x: Float[Array, "T heads head_dim"], positions: Int[Array, " T"], theta: float
) -> Float[Array, "T heads head_dim"]:
    """Rotate each head's halves (HF's `rotate_half` layout) by position * frequency."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    cos = jnp.cos(angles)[:, None, :]
    sin = jnp.sin(angles)[:, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear_seq(linear, x):
    return jax.vmap(linear)(x)


def _fused(layers) -> lowrank.SharedInputLinear:
    if any(layer is None for layer in layers):
        raise ValueError("these projections are fused already; fuse a model once")
    return lowrank.SharedInputLinear(layers)


class LlamaAttention(eqx.Module):
    """Grouped-query causal self-attention with rotary queries and keys; query head
    `h` reads key/value head `h // (num_heads / num_kv_heads)`.

    `qkv` is None until `fused` stacks q/k/v (dense or factorized) into one
    `lowrank.SharedInputLinear` for inference; q_proj, k_proj and v_proj are then None.

    Args:
        config: the architecture (widths, heads, rotary base, q/k/v biases).
        dtype: parameter dtype.
        key: initializes the projections.
    """

    q_proj: eqx.nn.Linear | None
    k_proj: eqx.nn.Linear | None
    v_proj: eqx.nn.Linear | None
    o_proj: eqx.nn.Linear
    qkv: lowrank.SharedInputLinear | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)

    def __init__(self, config: LlamaConfig, *, dtype, key: PRNGKeyArray):
        kq, kk, kv, ko = jr.split(key, 4)
        d, hd = config.hidden_size, config.head_dim
        bias = config.attention_bias
        self.q_proj = eqx.nn.Linear(d, config.num_heads * hd, use_bias=bias, dtype=dtype, key=kq)
        self.k_proj = eqx.nn.Linear(d, config.num_kv_heads * hd, use_bias=bias, dtype=dtype, key=kk)
        self.v_proj = eqx.nn.Linear(d, config.num_kv_heads * hd, use_bias=bias, dtype=dtype, key=kv)
        self.o_proj = eqx.nn.Linear(config.num_heads * hd, d, use_bias=False, dtype=dtype, key=ko)
        self.qkv = None
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = hd
        self.rope_theta = config.rope_theta

    def fused(self) -> "LlamaAttention":
        """This attention with q/k/v run as one `lowrank.SharedInputLinear` (one matmul
        over their stacked first factors), the same function up to float rounding."""
        qkv = _fused((self.q_proj, self.k_proj, self.v_proj))
        fields = lambda a: (a.q_proj, a.k_proj, a.v_proj, a.qkv)
        return eqx.tree_at(fields, self, (None, None, None, qkv), is_leaf=lambda x: x is None)

    def _projections(self, x):
        if self.qkv is not None:
            return jax.vmap(self.qkv)(x)
        return tuple(_linear_seq(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))

    def __call__(
        self,
        x: Float[Array, "T d"],
        positions: Int[Array, " T"],
        cache: tuple[Array, Array] | None = None,
    ) -> tuple[Float[Array, "T d"], tuple[Array, Array] | None]:
        """Attend from `x` (at `positions`) to itself, or, with `cache` = this block's
        (keys, values) buffers, to the cached prefix plus itself.

        Args:
            x: (T, hidden_size) normalized residual stream.
            positions: (T,) positions of the rows of `x`.
            cache: this block's (keys, values) buffers, or None.

        Returns:
            The (T, hidden_size) attention output and the updated (keys, values), or
            None without a cache.
        """
        seq = x.shape[0]
        groups = self.num_heads // self.num_kv_heads
        q, k, v = self._projections(x)
        q = q.reshape(seq, self.num_heads, self.head_dim)
        k = k.reshape(seq, self.num_kv_heads, self.head_dim)
        v = v.reshape(seq, self.num_kv_heads, self.head_dim)
        q = _rotary(q, positions, self.rope_theta)
        k = _rotary(k, positions, self.rope_theta)
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            start = (positions[0], 0, 0)
            keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            key_positions = jnp.arange(keys.shape[0])
            cache = (keys, values)
        q = q.reshape(seq, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum(
            "tkgd,skd->kgts",
            q,
            keys.astype(q.dtype),
            preferred_element_type=jnp.float32,
        ) / math.sqrt(self.head_dim)
        causal = key_positions[None, :] <= positions[:, None]
        scores = jnp.where(causal, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        out = jnp.einsum("kgts,skd->tkgd", weights, values.astype(q.dtype))
        out = out.reshape(seq, self.num_heads * self.head_dim)
        return _linear_seq(self.o_proj, out), cache


class LlamaMLP(eqx.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj(x)) * up_proj(x)).

    `gate_up` is None until `fused` stacks gate/up into one `lowrank.SharedInputLinear`
    for inference; gate_proj and up_proj are then None.

    Args:
        config: the architecture (hidden and intermediate widths).
        dtype: parameter dtype.
        key: initializes the projections.
    """

    gate_proj: eqx.nn.Linear | None
    up_proj: eqx.nn.Linear | None
    down_proj: eqx.nn.Linear
    gate_up: lowrank.SharedInputLinear | None

    def __init__(self, config: LlamaConfig, *, dtype, key: PRNGKeyArray):
        kg, ku, kd = jr.split(key, 3)
        d, h = config.hidden_size, config.intermediate_size
        self.gate_proj = eqx.nn.Linear(d, h, use_bias=False, dtype=dtype, key=kg)
        self.up_proj = eqx.nn.Linear(d, h, use_bias=False, dtype=dtype, key=ku)
        self.down_proj = eqx.nn.Linear(h, d, use_bias=False, dtype=dtype, key=kd)
        self.gate_up = None

    def fused(self) -> "LlamaMLP":
        """This MLP with gate/up run as one `lowrank.SharedInputLinear`, the same function
        up to float rounding."""
        gate_up = _fused((self.gate_proj, self.up_proj))
        fields = lambda m: (m.gate_proj, m.up_proj, m.gate_up)
        return eqx.tree_at(fields, self, (None, None, gate_up), is_leaf=lambda x: x is None)

    def __call__(self, x: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """Args:
            x: (T, hidden_size) normalized residual stream.

        Returns:
            (T, hidden_size) output.
        """
        if self.gate_up is not None:
            gate, up = jax.vmap(self.gate_up)(x)
        else:
            gate, up = _linear_seq(self.gate_proj, x), _linear_seq(self.up_proj, x)
        hidden = jax.nn.silu(gate) * up
        return _linear_seq(self.down_proj, hidden)


class LlamaBlock(eqx.Module):
    """Pre-norm decoder block: x + attn(attn_norm(x)), then + mlp(mlp_norm(x)).

    Args:
        config: the architecture.
        dtype: parameter dtype.
        key: initializes the attention and the MLP.
    """

    attn_norm: eqx.nn.RMSNorm
    attn: LlamaAttention
    mlp_norm: eqx.nn.RMSNorm
    mlp: LlamaMLP

    def __init__(self, config: LlamaConfig, *, dtype, key: PRNGKeyArray):
        ka, km = jr.split(key)
        norm = {"eps": config.rms_norm_eps, "use_bias": False, "dtype": dtype}
        self.attn_norm = eqx.nn.RMSNorm(config.hidden_size, **norm)
        self.attn = LlamaAttention(config, dtype=dtype, key=ka)
        self.mlp_norm = eqx.nn.RMSNorm(config.hidden_size, **norm)
        self.mlp = LlamaMLP(config, dtype=dtype, key=km)

    def __call__(self, x, positions, cache=None):
        """Args:
            x: (T, hidden_size) residual stream.
            positions: (T,) positions of its rows.
            cache: this block's (keys, values) buffers, or None.

        Returns:
            The (T, hidden_size) residual stream after the block, and the updated
            (keys, values) or None.
        """
        h, cache = self.attn(jax.vmap(self.attn_norm)(x), positions, cache)
        x = x + h
        return x + self.mlp(jax.vmap(self.mlp_norm)(x)), cache
