"""A small decoder-only transformer (GPT-style, pre-norm) for language-model recipes.

Every projection is an `eqx.nn.Linear`, so `lowrank.factorize` finds them by type
under readable paths: `blocks.0.attn.query_proj`, `blocks.0.attn.output_proj`,
`blocks.0.mlp.fc1`, `blocks.0.mlp.fc2`, and `head` when the head is untied.
The model maps ONE sequence of token ids `(T,)` to logits `(T, vocab)`; vmap over a batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

BYTE_VOCAB = 256  # byte-level tokenizer: every byte is a token, nothing to download


def _split_or_none(key: PRNGKeyArray | None, n: int) -> list[PRNGKeyArray | None]:
    return [None] * n if key is None else list(jr.split(key, n))


class TransformerMLP(eqx.Module):
    """Position-wise feed-forward on one token: fc2(gelu(fc1(x))).

    Args:
        d_model: input and output width.
        d_hidden: hidden width.
        key: initializes the two linears.
    """

    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, d_model: int, d_hidden: int, *, key: PRNGKeyArray):
        k1, k2 = jr.split(key)
        self.fc1 = eqx.nn.Linear(d_model, d_hidden, key=k1)
        self.fc2 = eqx.nn.Linear(d_hidden, d_model, key=k2)

    def __call__(self, x: Float[Array, " d_model"]) -> Float[Array, " d_model"]:
        """Args:
            x: one token's (d_model,) vector.

        Returns:
            The (d_model,) output.
        """
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class TransformerBlock(eqx.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)); attention is causal.

    Args:
        d_model: the residual width.
        n_heads: attention heads (d_model must divide by it).
        d_hidden: the MLP's hidden width.
        dropout: dropout rate on attention weights and both residual branches.
        rotary: rotate queries and keys (RoPE) over each head's dimensions.
        key: initializes the attention and the MLP.
    """

    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    mlp: TransformerMLP
    rope: eqx.nn.RotaryPositionalEmbedding | None
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_hidden: int,
        dropout: float,
        rotary: bool,
        *,
        key: PRNGKeyArray,
    ):
        k_attn, k_mlp = jr.split(key)
        self.ln1 = eqx.nn.LayerNorm(d_model)
        self.attn = eqx.nn.MultiheadAttention(
            n_heads,
            d_model,
            use_query_bias=True,
            use_key_bias=True,
            use_value_bias=True,
            use_output_bias=True,
            dropout_p=dropout,
            key=k_attn,
        )
        self.ln2 = eqx.nn.LayerNorm(d_model)
        self.mlp = TransformerMLP(d_model, d_hidden, key=k_mlp)
        self.rope = eqx.nn.RotaryPositionalEmbedding(d_model // n_heads) if rotary else None
        self.dropout = eqx.nn.Dropout(dropout)

    def _rotate(self, q, k, v):
        rotate = jax.vmap(self.rope, in_axes=1, out_axes=1)  # over heads
        return rotate(q), rotate(k), v

    def __call__(
        self, x: Float[Array, "T d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "T d_model"]:
        """Args:
            x: one sequence's (T, d_model) residual stream.
            key: dropout randomness (None: no dropout allowed unless inference mode
                or rate 0).

        Returns:
            The (T, d_model) residual stream after the block.
        """
        k_attn, k_drop1, k_drop2 = _split_or_none(key, 3)
        seq_len = x.shape[0]
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
        h = jax.vmap(self.ln1)(x)
        h = self.attn(
            h,
            h,
            h,
            mask=causal,
            key=k_attn,
            process_heads=None if self.rope is None else self._rotate,
        )
        x = x + self.dropout(h, key=k_drop1)
        h = jax.vmap(self.mlp)(jax.vmap(self.ln2)(x))
        return x + self.dropout(h, key=k_drop2)


class Transformer(eqx.Module):
    """Decoder-only language model: token (+ learned position) embeddings, pre-norm
    causal blocks, final LayerNorm, and a head tied to the token embedding or not.

    `rotary=True` drops the learned position table and rotates queries and keys instead
    (RoPE). Call it on one sequence `(T,)` with `T <= context`; dropout is active unless the
    model is put in inference mode (`eqx.nn.inference_mode(model)`) or `dropout=0`.
    Token ids must lie in `[0, vocab_size)` (not checked: ids are traced values).

    Args:
        vocab_size: tokens (256: bytes).
        context: the longest sequence (rows of the learned position table).
        d_model: the residual width.
        n_layers: blocks.
        n_heads: attention heads per block (must divide d_model; with `rotary`, the
            head size must be even).
        mlp_ratio: the MLP's hidden width is mlp_ratio * d_model.
        dropout: dropout rate, in [0, 1).
        tie_embeddings: the head is the token embedding transposed (no `head` layer).
        rotary: RoPE instead of learned positions.
        embed_std: standard deviation of the initial embeddings.
        key: initializes every layer.
    """

    token_embed: eqx.nn.Embedding
    pos_embed: eqx.nn.Embedding | None
    blocks: tuple[TransformerBlock, ...]
    ln_f: eqx.nn.LayerNorm
    head: eqx.nn.Linear | None
    dropout: eqx.nn.Dropout
    vocab_size: int = eqx.field(static=True)
    context: int = eqx.field(static=True)
    d_model: int = eqx.field(static=True)
    n_layers: int = eqx.field(static=True)
    n_heads: int = eqx.field(static=True)
    tie_embeddings: bool = eqx.field(static=True)
    rotary: bool = eqx.field(static=True)

    def __init__(
        self,
        *,
        vocab_size: int = BYTE_VOCAB,
        context: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        rotary: bool = False,
        embed_std: float = 0.02,
        key: PRNGKeyArray,
    ):
        for name, value in [
            ("vocab_size", vocab_size),
            ("context", context),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("mlp_ratio", mlp_ratio),
        ]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} must be divisible by n_heads={n_heads}; "
                "pick n_heads dividing d_model"
            )
        if rotary and (d_model // n_heads) % 2:
            raise ValueError(
                f"rotary=True needs an even head size, got d_model/n_heads = "
                f"{d_model // n_heads}; change d_model or n_heads"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        k_tok, k_pos, k_head, *k_blocks = jr.split(key, 3 + n_layers)
        self.vocab_size = vocab_size
        self.context = context
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.tie_embeddings = tie_embeddings
        self.rotary = rotary
        # Small embeddings (GPT-2 style): with a tied head, N(0, 1) rows would give
        # initial logits of size ~sqrt(d_model) and a far-from-uniform first guess.
        self.token_embed = eqx.nn.Embedding(
            weight=embed_std * jr.normal(k_tok, (vocab_size, d_model))
        )
        self.pos_embed = (
            None
            if rotary
            else eqx.nn.Embedding(weight=embed_std * jr.normal(k_pos, (context, d_model)))
        )
        self.blocks = tuple(
            TransformerBlock(d_model, n_heads, mlp_ratio * d_model, dropout, rotary, key=k)
            for k in k_blocks
        )
        self.ln_f = eqx.nn.LayerNorm(d_model)
        self.head = (
            None
            if tie_embeddings
            else eqx.nn.Linear(d_model, vocab_size, use_bias=False, key=k_head)
        )
        self.dropout = eqx.nn.Dropout(dropout)

    def _check_ids(self, ids) -> None:
        if ids.ndim != 1:
            raise ValueError(
                f"ids must be one sequence of shape (T,), got shape {ids.shape}; "
                "vmap the model over the batch axis"
            )
        if ids.shape[0] > self.context:
            raise ValueError(
                f"sequence length {ids.shape[0]} exceeds the model context "
                f"{self.context}; truncate ids to the last {self.context} tokens "
                "or build the model with a larger `context`"
            )

    def hidden_states(
        self, ids: Int[Array, " T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "n_layers_plus_1 T d_model"]:
        """Residual stream after the embeddings and after each block, stacked.

        Entry 0 is the embedding output, entry i the output of block i-1; the last
        entry feeds `unembed`. Use these for hidden-state matching in distillation.

        Args:
            ids: one sequence of T <= context token ids.
            key: dropout randomness.

        Returns:
            (n_layers + 1, T, d_model) residual streams.
        """
        return jnp.stack(self._residual_streams(ids, key, keep_all=True))

    def last_hidden_state(
        self, ids: Int[Array, " T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "T d_model"]:
        """`hidden_states(ids)[-1]` without holding the earlier streams (an eager
        calibration pass would keep every one of them alive until the stack).

        Args:
            ids: one sequence of T <= context token ids.
            key: dropout randomness.

        Returns:
            (T, d_model) residual stream after the last block.
        """
        return self._residual_streams(ids, key, keep_all=False)[-1]

    def _residual_streams(self, ids, key, *, keep_all: bool) -> list:
        self._check_ids(ids)
        k_emb, *k_blocks = _split_or_none(key, 1 + self.n_layers)
        x = jax.vmap(self.token_embed)(ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[: ids.shape[0]]
        x = self.dropout(x, key=k_emb)
        states = [x]
        for block, k in zip(self.blocks, k_blocks):
            x = block(x, key=k)
            states = [*states, x] if keep_all else [x]
        return states

    def unembed(self, h: Float[Array, "T d_model"]) -> Float[Array, "T vocab"]:
        """Final LayerNorm then the (tied or untied) head: residual stream -> logits.

        Args:
            h: a (T, d_model) residual stream (the last of `hidden_states`).

        Returns:
            (T, vocab) logits.
        """
        h = jax.vmap(self.ln_f)(h)
        if self.head is None:
            return h @ self.token_embed.weight.T
        return jax.vmap(self.head)(h)

    def __call__(
        self, ids: Int[Array, " T"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "T vocab"]:
        """Args:
            ids: one sequence of T <= context token ids.
            key: dropout randomness.

        Returns:
            (T, vocab) next-token logits.
        """
        return self.unembed(self.last_hidden_state(ids, key=key))
