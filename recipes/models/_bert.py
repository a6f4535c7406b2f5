"""A BERT encoder (Devlin et al. 2019) with sentence-transformers' mean pooling.

Post-LayerNorm blocks, exact (erf) GELU, learned absolute positions, and padding masked
out of attention and pooling; HF's `BertModel` layout with `encoder.layer` shortened
to `layers` and `attention.self` folded into `attention`. Every projection is an
`eqx.nn.Linear`, so `lowrank.factorize` finds them at readable paths:
`layers.0.attention.query` (`key`, `value`), `layers.0.attention.output.dense`,
`layers.0.intermediate.dense` and `layers.0.output.dense`.
The model maps ONE sequence of token ids `(T,)` (and its padding mask) to one embedding;
vmap over a batch. Pretrained weights: `recipes.pretrained.minilm`.
"""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ._bert_layers import BertEmbeddings, BertLayer


class Bert(eqx.Module):
    """BERT encoder + masked mean pooling (+ L2 normalization): a sentence embedding.

    `model(ids, mask)` embeds one sequence: token ids `(T,)` with `T <= max_positions`
    and a padding mask `(T,)` (True/1 on real tokens; None means no padding). The
    embedding is the mean of the last hidden states over the real tokens, scaled to
    unit length when `normalize` (all-MiniLM-L6-v2's Pooling + Normalize modules).
    Token ids must lie in `[0, vocab_size)` (not checked: ids are traced values).

    Args:
        vocab_size: word-piece vocabulary size.
        hidden_size: the residual width (divisible by num_heads).
        num_layers: encoder blocks.
        num_heads: attention heads per block.
        intermediate_size: the MLP's hidden width.
        max_positions: the longest sequence.
        type_vocab_size: token types (segments).
        layer_norm_eps: the LayerNorms' epsilon.
        normalize: scale the embedding to unit length.
        dtype: parameter dtype.
        key: initializes every layer.
    """

    embeddings: BertEmbeddings
    layers: tuple[BertLayer, ...]
    vocab_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    max_positions: int = eqx.field(static=True)
    normalize: bool = eqx.field(static=True)

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        hidden_size: int = 384,
        num_layers: int = 6,
        num_heads: int = 12,
        intermediate_size: int = 1536,
        max_positions: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        normalize: bool = True,
        dtype=jnp.float32,
        key: PRNGKeyArray,
    ):
        for name, value in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("intermediate_size", intermediate_size),
            ("max_positions", max_positions),
            ("type_vocab_size", type_vocab_size),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}; "
                "pick num_heads dividing hidden_size"
            )
        k_emb, *k_layers = jr.split(key, 1 + num_layers)
        self.embeddings = BertEmbeddings(
            vocab_size,
            hidden_size,
            max_positions,
            type_vocab_size,
            layer_norm_eps,
            dtype,
            key=k_emb,
        )
        self.layers = tuple(
            BertLayer(hidden_size, num_heads, intermediate_size, layer_norm_eps, dtype, key=k)
            for k in k_layers
        )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.max_positions = max_positions
        self.normalize = normalize

    def _check(self, ids, mask, token_type_ids) -> None:
        if ids.ndim != 1:
            raise ValueError(
                f"ids must be one sequence of shape (T,), got shape {ids.shape}; "
                "vmap the model over the batch axis"
            )
        if ids.shape[0] > self.max_positions:
            raise ValueError(
                f"sequence length {ids.shape[0]} exceeds max_positions {self.max_positions}; "
                f"truncate ids to {self.max_positions} tokens"
            )
        for name, value in [("mask", mask), ("token_type_ids", token_type_ids)]:
            if value is not None and value.shape != ids.shape:
                raise ValueError(
                    f"{name} must have the shape of ids {ids.shape}, got {value.shape}; "
                    "pass one entry per token"
                )

    def hidden_states(
        self,
        ids: Int[Array, " T"],
        mask: Bool[Array, " T"] | None = None,
        token_type_ids: Int[Array, " T"] | None = None,
    ) -> Float[Array, "num_layers_plus_1 T d"]:
        """Hidden states after the embeddings and after each layer, stacked (entry 0 is
        the embedding output, the last entry feeds the pooling).

        Args:
            ids: token ids `(T,)`.
            mask: True/1 on real tokens, False/0 on padding; None means no padding.
            token_type_ids: segment ids `(T,)`; None means all zeros (one segment).

        Returns:
            `(num_layers + 1, T, hidden_size)` hidden states.
        """
        return jnp.stack(self._streams(ids, mask, token_type_ids, keep_all=True))

    def last_hidden_state(
        self,
        ids: Int[Array, " T"],
        mask: Bool[Array, " T"] | None = None,
        token_type_ids: Int[Array, " T"] | None = None,
    ) -> Float[Array, "T d"]:
        """`hidden_states(...)[-1]` without holding the earlier layers' states (an eager
        calibration pass would keep every one of them alive until the stack).

        Args:
            ids: token ids `(T,)`.
            mask: True/1 on real tokens; None means no padding.
            token_type_ids: segment ids; None means one segment.

        Returns:
            `(T, hidden_size)` hidden states after the last layer.
        """
        return self._streams(ids, mask, token_type_ids, keep_all=False)[-1]

    def _streams(self, ids, mask, token_type_ids, *, keep_all: bool) -> list:
        self._check(ids, mask, token_type_ids)
        mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        x = self.embeddings(ids, token_type_ids)
        states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            states = [*states, x] if keep_all else [x]
        return states

    def pool(
        self, h: Float[Array, "T d"], mask: Bool[Array, " T"] | None = None
    ) -> Float[Array, " d"]:
        """Mean of `h` over the real tokens (sentence-transformers' mean pooling), then
        L2 normalization when `self.normalize`.

        Args:
            h: (T, hidden_size) last hidden states.
            mask: (T,) True/1 on real tokens; None means no padding.

        Returns:
            The (hidden_size,) embedding.
        """
        weights = jnp.ones(h.shape[:1], h.dtype) if mask is None else mask.astype(h.dtype)
        pooled = (weights @ h) / jnp.maximum(weights.sum(), 1e-9)
        if not self.normalize:
            return pooled
        return pooled / jnp.maximum(jnp.linalg.norm(pooled), 1e-12)

    def __call__(
        self,
        ids: Int[Array, " T"],
        mask: Bool[Array, " T"] | None = None,
        token_type_ids: Int[Array, " T"] | None = None,
    ) -> Float[Array, " d"]:
        """Sentence embedding of one sequence.

        Args:
            ids: token ids `(T,)`.
            mask: True/1 on real tokens; None means no padding.
            token_type_ids: segment ids; None means one segment.

        Returns:
            The (hidden_size,) embedding (unit length when `normalize`).
        """
        return self.pool(self.last_hidden_state(ids, mask, token_type_ids), mask)
