"""Small models shared by the lowrank tests: an MLP, a CNN and a transformer block."""

import equinox as eqx
import jax
import jax.numpy as jnp


class CNN(eqx.Module):
    convs: list
    head: eqx.nn.Linear

    def __init__(self, *, key):
        k = jax.random.split(key, 4)
        self.convs = [
            eqx.nn.Conv2d(3, 16, 3, padding=1, key=k[0]),
            eqx.nn.Conv2d(16, 24, 3, stride=2, padding=(1, 2), key=k[1]),
            eqx.nn.Conv2d(24, 24, 3, dilation=2, padding=2, use_bias=False, key=k[2]),
        ]
        self.head = eqx.nn.Linear(24, 10, key=k[3])

    def __call__(self, x):
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class Block(eqx.Module):
    """A pre-norm transformer block: attention and an MLP, on a (T, d) sequence."""

    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: dict

    def __init__(self, d=32, heads=4, *, key):
        k = jax.random.split(key, 3)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(d), eqx.nn.LayerNorm(d)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k[0])
        self.mlp = {"fc1": eqx.nn.Linear(d, 4 * d, key=k[1]), "fc2": eqx.nn.Linear(4 * d, d, key=k[2])}

    def __call__(self, x):
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(lambda t: self.mlp["fc2"](jax.nn.gelu(self.mlp["fc1"](t))))(h)


def mlp(*, key):
    return eqx.nn.MLP(20, 7, 32, 2, key=key)


def with_exact_rank(model, rank: int, *, key):
    """Replace every Linear/Conv weight by one of exact rank min(rank, full) (same scale)."""

    def lowrank_like(w, k):
        m = w.shape[0]
        n = w.size // m
        r = min(rank, m, n)
        a = jax.random.normal(k, (m, r))
        b = jax.random.normal(jax.random.fold_in(k, 1), (r, n))
        return (a @ b / jnp.sqrt(r * n)).reshape(w.shape)

    is_layer = lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.Conv))  # noqa: E731
    layers = [x for x in jax.tree_util.tree_leaves(model, is_leaf=is_layer) if is_layer(x)]
    keys = jax.random.split(key, len(layers))
    return eqx.tree_at(
        lambda m: [l.weight for l in jax.tree_util.tree_leaves(m, is_leaf=is_layer) if is_layer(l)],
        model,
        [lowrank_like(l.weight, k) for l, k in zip(layers, keys)],
    )
