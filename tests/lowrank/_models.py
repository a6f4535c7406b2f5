"""Small models shared by the lowrank tests: an MLP, a CNN, a transformer block, and
scan-over-layers (stacked) versions of the last two."""

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
        self.mlp = {
            "fc1": eqx.nn.Linear(d, 4 * d, key=k[1]),
            "fc2": eqx.nn.Linear(4 * d, d, key=k[2]),
        }

    def __call__(self, x):
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(lambda t: self.mlp["fc2"](jax.nn.gelu(self.mlp["fc1"](t))))(h)


class TinyBlock(eqx.Module):
    """Single-head attention and a ReLU MLP with residuals, on a (T, d) sequence."""

    attn: dict
    mlp: dict

    def __init__(self, d, *, key):
        k = jax.random.split(key, 4)
        self.attn = {
            "qkv": eqx.nn.Linear(d, 3 * d, key=k[0]),
            "proj": eqx.nn.Linear(d, d, key=k[1]),
        }
        self.mlp = {
            "fc1": eqx.nn.Linear(d, 4 * d, key=k[2]),
            "fc2": eqx.nn.Linear(4 * d, d, key=k[3]),
        }

    def __call__(self, x):
        q, k, v = jnp.split(jax.vmap(self.attn["qkv"])(x), 3, axis=-1)
        a = jax.nn.softmax(q @ k.T / jnp.sqrt(q.shape[-1]), axis=-1) @ v
        x = x + jax.vmap(self.attn["proj"])(a)
        return x + jax.vmap(lambda t: self.mlp["fc2"](jax.nn.relu(self.mlp["fc1"](t))))(x)


class ScannedTransformer(eqx.Module):
    """Tokens -> embed -> `depth` stacked `TinyBlock`s run by `lax.scan` -> head, on (T, d_in).

    The blocks are built by `eqx.filter_vmap`, so every Linear inside has weights
    (depth, out, in): the scan-over-layers idiom of deep transformers.
    """

    embed: eqx.nn.Linear
    blocks: TinyBlock
    head: eqx.nn.Linear

    def __init__(self, d_in=8, d=16, depth=3, d_out=5, *, key):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Linear(d_in, d, key=k[0])
        self.blocks = eqx.filter_vmap(lambda bk: TinyBlock(d, key=bk))(
            jax.random.split(k[1], depth)
        )
        self.head = eqx.nn.Linear(d, d_out, key=k[2])

    def __call__(self, x):
        h, _ = jax.lax.scan(lambda h, block: (block(h), None), jax.vmap(self.embed)(x), self.blocks)
        return jax.vmap(self.head)(h)


class ScannedCNN(eqx.Module):
    """A stem conv, then L stacked 3x3 convs (weights (L, c, c, 3, 3)) run by `lax.scan`."""

    stem: eqx.nn.Conv2d
    convs: eqx.nn.Conv2d

    def __init__(self, c=8, depth=3, *, key):
        k = jax.random.split(key)
        self.stem = eqx.nn.Conv2d(3, c, 3, padding=1, key=k[0])
        self.convs = eqx.filter_vmap(lambda ck: eqx.nn.Conv2d(c, c, 3, padding=1, key=ck))(
            jax.random.split(k[1], depth)
        )

    def __call__(self, x):
        arrays, static = eqx.partition(self.convs, eqx.is_array)
        step = lambda h, conv: (jax.nn.relu(eqx.combine(conv, static)(h)), None)
        return jax.lax.scan(step, jax.nn.relu(self.stem(x)), arrays)[0].mean((1, 2))


def mlp(*, key):
    return eqx.nn.MLP(20, 7, 32, 2, key=key)


def with_exact_rank(model, rank: int, *, key):
    """Replace every Linear/Conv weight by one of exact rank min(rank, full) (same scale)."""

    def lowrank_like(layer, k):
        w = layer.weight  # a stacked layer (scan over layers) gets exact rank in every slice
        lead = w.ndim - (2 if isinstance(layer, eqx.nn.Linear) else layer.num_spatial_dims + 2)
        m = w.shape[lead]
        n = w[(0,) * lead].size // m
        r = min(rank, m, n)
        a = jax.random.normal(k, (*w.shape[:lead], m, r))
        b = jax.random.normal(jax.random.fold_in(k, 1), (*w.shape[:lead], r, n))
        return (a @ b / jnp.sqrt(r * n)).reshape(w.shape)

    is_layer = lambda x: isinstance(x, (eqx.nn.Linear, eqx.nn.Conv))
    layers = [x for x in jax.tree_util.tree_leaves(model, is_leaf=is_layer) if is_layer(x)]
    keys = jax.random.split(key, len(layers))
    return eqx.tree_at(
        lambda m: [l.weight for l in jax.tree_util.tree_leaves(m, is_leaf=is_layer) if is_layer(l)],
        model,
        [lowrank_like(l, k) for l, k in zip(layers, keys)],
    )
