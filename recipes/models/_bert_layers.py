"""The BERT encoder's parts: embeddings, attention, MLP and post-LayerNorm block
(assembled by `Bert` in `_bert`).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray


class BertEmbeddings(eqx.Module):
    """Word + position + token-type embeddings, then LayerNorm.

    Args:
        vocab_size: word-piece vocabulary size.
        hidden_size: embedding width.
        max_positions: rows of the position table (the longest sequence).
        type_vocab_size: token types (segments).
        eps: the LayerNorm's epsilon.
        dtype: parameter dtype.
        key: initializes the tables.
    """

    word_embeddings: eqx.nn.Embedding
    position_embeddings: eqx.nn.Embedding
    token_type_embeddings: eqx.nn.Embedding
    layer_norm: eqx.nn.LayerNorm

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        max_positions: int,
        type_vocab_size: int,
        eps: float,
        dtype,
        *,
        key: PRNGKeyArray,
    ):
        k_word, k_pos, k_type = jr.split(key, 3)
        self.word_embeddings = eqx.nn.Embedding(vocab_size, hidden_size, dtype=dtype, key=k_word)
        self.position_embeddings = eqx.nn.Embedding(
            max_positions, hidden_size, dtype=dtype, key=k_pos
        )
        self.token_type_embeddings = eqx.nn.Embedding(
            type_vocab_size, hidden_size, dtype=dtype, key=k_type
        )
        self.layer_norm = eqx.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)

    def __call__(
        self, ids: Int[Array, " T"], token_type_ids: Int[Array, " T"]
    ) -> Float[Array, "T d"]:
        """Args:
            ids: token ids (T,).
            token_type_ids: segment ids (T,).

        Returns:
            (T, hidden_size) embeddings.
        """
        x = (
            self.word_embeddings.weight[ids]
            + self.position_embeddings.weight[: ids.shape[0]]
            + self.token_type_embeddings.weight[token_type_ids]
        )
        return jax.vmap(self.layer_norm)(x)


class BertOutput(eqx.Module):
    """Projection back to the residual stream, added to it, then LayerNorm (post-LN).

    Args:
        in_features: width of what is projected (the attention context or the MLP's
            hidden states).
        hidden_size: the residual width.
        eps: the LayerNorm's epsilon.
        dtype: parameter dtype.
        key: initializes the projection.
    """

    dense: eqx.nn.Linear
    layer_norm: eqx.nn.LayerNorm

    def __init__(self, in_features: int, hidden_size: int, eps: float, dtype, *, key):
        self.dense = eqx.nn.Linear(in_features, hidden_size, dtype=dtype, key=key)
        self.layer_norm = eqx.nn.LayerNorm(hidden_size, eps=eps, dtype=dtype)

    def __call__(
        self, h: Float[Array, "T n"], residual: Float[Array, "T d"]
    ) -> Float[Array, "T d"]:
        """Args:
            h: (T, in_features) states to project.
            residual: (T, hidden_size) residual stream they are added to.

        Returns:
            (T, hidden_size) normalized sum.
        """
        return jax.vmap(self.layer_norm)(residual + jax.vmap(self.dense)(h))


class BertAttention(eqx.Module):
    """Bidirectional multi-head self-attention; keys where `mask` is False get no weight.
    Its `output` adds the residual and normalizes.

    Args:
        hidden_size: the residual width (divisible by num_heads).
        num_heads: attention heads.
        eps: the output LayerNorm's epsilon.
        dtype: parameter dtype.
        key: initializes the projections.
    """

    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    output: BertOutput
    num_heads: int = eqx.field(static=True)

    def __init__(self, hidden_size: int, num_heads: int, eps: float, dtype, *, key):
        k_q, k_k, k_v, k_o = jr.split(key, 4)
        self.query = eqx.nn.Linear(hidden_size, hidden_size, dtype=dtype, key=k_q)
        self.key = eqx.nn.Linear(hidden_size, hidden_size, dtype=dtype, key=k_k)
        self.value = eqx.nn.Linear(hidden_size, hidden_size, dtype=dtype, key=k_v)
        self.output = BertOutput(hidden_size, hidden_size, eps, dtype, key=k_o)
        self.num_heads = num_heads

    def __call__(self, x: Float[Array, "T d"], mask: Bool[Array, " T"]) -> Float[Array, "T d"]:
        """Args:
            x: (T, hidden_size) residual stream.
            mask: (T,) True on real tokens.

        Returns:
            (T, hidden_size): LayerNorm(x + attention output).
        """
        seq_len, d = x.shape

        def heads(linear):
            return jax.vmap(linear)(x).reshape(seq_len, self.num_heads, d // self.num_heads)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        scores = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(d // self.num_heads)
        scores = jnp.where(mask[None, None, :], scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        context = jnp.einsum("hts,shd->thd", weights, v).reshape(seq_len, d)
        return self.output(context, x)


class BertIntermediate(eqx.Module):
    """The MLP's expansion: GELU (erf form, as BERT's `hidden_act="gelu"`) of a Linear.

    Args:
        hidden_size: input width.
        intermediate_size: output width.
        dtype: parameter dtype.
        key: initializes the Linear.
    """

    dense: eqx.nn.Linear

    def __init__(self, hidden_size: int, intermediate_size: int, dtype, *, key):
        self.dense = eqx.nn.Linear(hidden_size, intermediate_size, dtype=dtype, key=key)

    def __call__(self, x: Float[Array, "T d"]) -> Float[Array, "T n"]:
        """Args:
            x: (T, hidden_size) states.

        Returns:
            (T, intermediate_size) activations.
        """
        return jax.nn.gelu(jax.vmap(self.dense)(x), approximate=False)


class BertLayer(eqx.Module):
    """One post-LN encoder block: attention (+ residual, LayerNorm), then the MLP
    (intermediate, output + residual, LayerNorm).

    Args:
        hidden_size: the residual width.
        num_heads: attention heads.
        intermediate_size: the MLP's hidden width.
        eps: the LayerNorms' epsilon.
        dtype: parameter dtype.
        key: initializes the layers.
    """

    attention: BertAttention
    intermediate: BertIntermediate
    output: BertOutput

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        eps: float,
        dtype,
        *,
        key,
    ):
        k_attn, k_mid, k_out = jr.split(key, 3)
        self.attention = BertAttention(hidden_size, num_heads, eps, dtype, key=k_attn)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size, dtype, key=k_mid)
        self.output = BertOutput(intermediate_size, hidden_size, eps, dtype, key=k_out)

    def __call__(self, x: Float[Array, "T d"], mask: Bool[Array, " T"]) -> Float[Array, "T d"]:
        """Args:
            x: (T, hidden_size) residual stream.
            mask: (T,) True on real tokens.

        Returns:
            (T, hidden_size) residual stream after the block.
        """
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)
