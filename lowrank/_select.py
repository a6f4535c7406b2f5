"""Selection: find the layers of a model, name them by dotted path, and filter them.

Paths are built from the pytree key path: attributes, sequence indices and dict
keys joined by dots (`blocks.3.attn.query_proj`); a model that is itself a layer is
called `ROOT` ("<root>"). `target` and `exclude` follow peft: a string is a regex
that must match the whole path; a list holds names, each an exact path or dotted
suffix of a layer or of a module above layers (`"query_proj"` matches
`blocks.0.attn.query_proj`, `"attn"` and `"blocks.0"` cover every layer below them).
Dict keys (rank rules, activations) are either.
"""

import math
import re
from collections.abc import Callable, Mapping, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._conv import LowRankConv
from ._layers import LowRankLinear

Pattern = str | Sequence[str]
DENSE_TYPES = (eqx.nn.Linear, eqx.nn.Conv)
UNSUPPORTED_TYPES = (eqx.nn.ConvTranspose,)  # listed in plans as skipped, never factorized
# Listed in plans as unsupported too, but not walked as layers (they are no Linear/Conv).
UNSUPPORTED_MODULES = (eqx.nn.GRUCell, eqx.nn.LSTMCell, eqx.nn.Embedding)
LOWRANK_TYPES = (LowRankLinear, LowRankConv)
ROOT = "<root>"  # the path of a model that is itself a layer


def attribute_path(layer_path: str, name: str) -> str:
    """The dotted path of a layer's array attribute (`weight`, `u`...), as `key_path_to_str`
    gives it among the model's leaves: a root layer's attributes have no prefix."""
    return name if layer_path == ROOT else f"{layer_path}.{name}"


def key_path_to_str(key_path) -> str:
    """The dotted path of a layer's key path; `ROOT` for the model itself."""
    if not key_path:
        return ROOT
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key).strip(".[]'\""))
    return ".".join(parts)


def check_is_model(model, fn_name: str) -> None:
    """Raise TypeError unless `model` is (or contains) an Equinox module."""
    if isinstance(model, eqx.Module):
        return
    leaves = jax.tree_util.tree_leaves(model, is_leaf=lambda x: isinstance(x, eqx.Module))
    if not any(isinstance(leaf, eqx.Module) for leaf in leaves):
        raise TypeError(
            f"lowrank.{fn_name} expects an Equinox model (an eqx.Module, or a pytree of them), "
            f"got {type(model).__module__}.{type(model).__qualname__}; build the model with "
            "equinox (eqx.nn.Linear, eqx.nn.Conv2d, ...)"
        )


def is_layer(x) -> bool:
    return isinstance(x, DENSE_TYPES + LOWRANK_TYPES + UNSUPPORTED_TYPES)


def walk_layers(model) -> list[tuple[str, eqx.Module]]:
    """Every dense or factorized layer in the model, in pytree order, with its path."""
    return _walk(model, is_layer)


def is_listed(x) -> bool:
    """A layer of `walk_layers`, or an unsupported module that plans list (GRUCell...)."""
    return is_layer(x) or isinstance(x, UNSUPPORTED_MODULES)


def _walk(model, leaf_test) -> list[tuple[str, eqx.Module]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=leaf_test)
    layers = [(key_path_to_str(kp), leaf) for kp, leaf in flat if leaf_test(leaf)]
    _check_unique([p for p, _ in layers])
    return layers


def _check_unique(paths: list[str]) -> None:
    clashes = sorted({p for p in paths if paths.count(p) > 1})
    if clashes:
        raise ValueError(
            f"two layers share the dotted path(s) {clashes} (a dict key containing '.'?); "
            "rename the keys so every layer has its own path"
        )


def walk_model(model) -> tuple[list[tuple[str, eqx.Module]], dict[str, Callable]]:
    """One traversal of the model: every listed layer (`is_listed`) in pytree order with
    its path, and the activations that follow layers whose parent says so (today:
    eqx.nn.MLP; `identity` marks a layer known to feed none, an absent path an unknown
    activation). An MLP's own subtree is flattened when reached, so every node of the
    model is visited once."""
    is_leaf = lambda x: is_listed(x) or isinstance(x, eqx.nn.MLP)
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_leaf)
    layers, activations = [], {}
    for kp, leaf in flat:
        if not isinstance(leaf, eqx.nn.MLP):
            if is_listed(leaf):
                layers.append((key_path_to_str(kp), leaf))
            continue
        prefix = key_path_to_str(kp) + "." if kp else ""
        inner, _ = jax.tree_util.tree_flatten_with_path(leaf, is_leaf=is_listed)
        layers += [(prefix + key_path_to_str(k), l) for k, l in inner if is_listed(l)]
        activations |= {prefix + p: fn for p, fn in _mlp_activations(leaf).items()}
    _check_unique([p for p, _ in layers])
    return layers, activations


def _mlp_activations(mlp: eqx.nn.MLP) -> dict[str, Callable]:
    hidden, final = mlp.activation, mlp.final_activation
    if jax.tree_util.tree_leaves(eqx.filter((hidden, final), eqx.is_array)):
        return {}  # learnt per-unit activations: not a single elementwise function
    last = len(mlp.layers) - 1
    found = {}
    for i in range(len(mlp.layers)):
        act = final if i == last else hidden
        found[f"layers.{i}"] = identity if _is_identity(act) else act
    return found


def identity(x):
    """The activation of a layer known to feed no nonlinearity (e.g. an MLP's last layer)."""
    return x


def _is_identity(fn: Callable) -> bool:
    probe = jnp.linspace(-3.0, 3.0, 7)
    try:
        return bool(jnp.allclose(fn(probe), probe))
    except Exception:  # a learnt or shape-specific activation: treat as unknown, not identity
        return False


def skip_reason(layer) -> str | None:
    """Why a dense layer cannot be factorized, or None if it can."""
    if isinstance(layer, LOWRANK_TYPES):
        return (
            f"already low-rank (rank {layer.rank}); lowrank.densify(model) first to re-factorize it"
        )
    if isinstance(layer, UNSUPPORTED_TYPES):
        return f"{type(layer).__name__} is not supported yet"
    if isinstance(layer, UNSUPPORTED_MODULES):
        return f"{type(layer).__name__} is not supported yet (not counted in params/FLOPs)"
    if not eqx.is_array(layer.weight):
        return "weight is tied to another layer (eqx.nn.Shared)"
    if isinstance(layer, eqx.nn.Linear):
        if layer.in_features == "scalar" or layer.out_features == "scalar":
            return "scalar Linear (nothing to factorize)"
        return None
    if layer.groups != 1:
        kind = "depthwise" if layer.groups == layer.in_channels else "grouped"
        return f"{kind} conv (groups={layer.groups}) has no useful low-rank form"
    return None


def stack_shape(layer) -> tuple[int, ...]:
    """The leading stack axes of a layer's weights, () if none (or tied).

    `eqx.filter_vmap(make_layer)(keys)` builds a stack of L layers as one layer with
    weights (L, out, in) (and so on for each extra vmap), the scan-over-layers idiom.
    """
    if isinstance(layer, LOWRANK_TYPES):
        return layer.stack_shape
    w = layer.weight
    if not eqx.is_array(w):
        return ()
    per_slice = 2 if isinstance(layer, eqx.nn.Linear) else layer.num_spatial_dims + 2
    return tuple(int(d) for d in w.shape[: w.ndim - per_slice])


def slice_path(path: str, index: tuple[int, ...]) -> str:
    """The name of one slice of a stacked layer in messages: `blocks.mlp.fc1[3]`."""
    return f"{path}[{','.join(map(str, index))}]"


def matches(pattern: Pattern, path: str) -> bool:
    """peft-style match: regex fullmatch for a string; for a list, any entry `covers` it."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(covers(name, path) for name in pattern)


def covers(name: str, path: str) -> bool:
    """Whether `name` is the layer path, or a dotted suffix of it or of a module above it.

    So the parts of `name` appear as consecutive parts of `path`: "attn", "0.attn" and
    "blocks.0" all cover "blocks.0.attn.q_proj"; "attn" does not cover "attn_out.fc".
    """
    return f".{path}.".find(f".{name}.") >= 0


def matches_key(key: str, path: str) -> bool:
    """A dict key (rank rules, activations): a regex fullmatch, or a name that `covers` it."""
    return matches(key, path) or covers(key, path)


def check_keys(mapping: Mapping, name: str) -> None:
    """Raise unless every key of a {pattern: value} dict is a string and a valid regex."""
    for key in mapping:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be path strings or regexes, got {key!r}")
        check_regex(key, f"{name} key {key!r}")


def check_regex(pattern: str, what: str) -> None:
    """Raise a ValueError naming `what` unless `pattern` compiles as a regex."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{what} is not a valid regex ({e}); escape literal characters with "
            "re.escape(...), or give a list of layer/module names instead"
        ) from None


def weight_matrix(layer) -> Float[Array, "*stack out fan_in"]:
    """The layer's dense weight as (out, in * prod(kernel)) matrices, one per slice of a
    stacked layer (leading stack axes kept), by a host-side reshape."""
    w = layer.weight
    lead = stack_shape(layer)
    m = w.shape[len(lead)]
    return jnp.asarray(np.asarray(w).reshape(*lead, m, math.prod(w.shape[len(lead) + 1 :])))


def replace_layers(model, replacements: dict):
    """A new model with the layers at the given paths swapped; the input is untouched."""
    if not replacements:
        return model

    def swap(key_path, leaf):
        return replacements.get(key_path_to_str(key_path), leaf)

    return jax.tree_util.tree_map_with_path(swap, model, is_leaf=is_layer)
