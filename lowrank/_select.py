"""Selection: find the layers of a model, name them by dotted path, and filter them.

Paths are built from the pytree key path: attributes, sequence indices and dict
keys joined by dots (`blocks.3.attn.query_proj`); a model that is itself a layer is
called `ROOT` ("<root>"). `target` and `exclude` follow peft: a string is a regex
that must match the whole path; a list holds names, each an exact path or dotted
suffix of a layer or of a module above layers (`"query_proj"` matches
`blocks.0.attn.query_proj`, `"attn"` and `"blocks.0"` cover every layer below them).
Dict keys (rank rules, activations) are either.
"""

import difflib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._layers import LowRankConv, LowRankLinear

Pattern = str | Sequence[str]
DENSE_TYPES = (eqx.nn.Linear, eqx.nn.Conv)
UNSUPPORTED_TYPES = (eqx.nn.ConvTranspose,)  # listed in plans as skipped, never factorized
# Listed in plans as unsupported too, but not walked as layers (they are no Linear/Conv).
UNSUPPORTED_MODULES = (eqx.nn.GRUCell, eqx.nn.LSTMCell, eqx.nn.Embedding)
LOWRANK_TYPES = (LowRankLinear, LowRankConv)
ROOT = "<root>"  # the path of a model that is itself a layer


@dataclass(frozen=True)
class Candidate:
    """One layer found in the model: where it is, and why it can't be factorized (if so)."""

    path: str
    layer: eqx.Module
    skipped: str | None = None


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


def _is_listed(x) -> bool:
    return is_layer(x) or isinstance(x, UNSUPPORTED_MODULES)


def walk_listed(model) -> list[tuple[str, eqx.Module]]:
    """The layers of `walk_layers` and the unsupported modules plans list, in pytree order."""
    return _walk(model, _is_listed)


def _walk(model, leaf_test) -> list[tuple[str, eqx.Module]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=leaf_test)
    layers = [(key_path_to_str(kp), leaf) for kp, leaf in flat if leaf_test(leaf)]
    paths = [p for p, _ in layers]
    clashes = sorted({p for p in paths if paths.count(p) > 1})
    if clashes:
        raise ValueError(
            f"two layers share the dotted path(s) {clashes} (a dict key containing '.'?); "
            "rename the keys so every layer has its own path"
        )
    return layers


def identity(x):
    """The activation of a layer known to feed no nonlinearity (e.g. an MLP's last layer)."""
    return x


def _is_identity(fn: Callable) -> bool:
    probe = jnp.linspace(-3.0, 3.0, 7)
    try:
        return bool(jnp.allclose(fn(probe), probe))
    except Exception:  # a learnt or shape-specific activation: treat as unknown, not identity
        return False


def known_activations(model) -> dict[str, Callable | None]:
    """Activations that follow layers whose parent says so (today: eqx.nn.MLP).

    Layers absent from the result have an unknown activation; `identity` marks a
    layer known to feed none.
    """
    found: dict[str, Callable | None] = {}
    flat, _ = jax.tree_util.tree_flatten_with_path(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.MLP)
    )
    for kp, leaf in flat:
        if not isinstance(leaf, eqx.nn.MLP):
            continue
        prefix = key_path_to_str(kp) + "." if kp else ""
        hidden, final = leaf.activation, leaf.final_activation
        if jax.tree_util.tree_leaves(eqx.filter((hidden, final), eqx.is_array)):
            continue  # learnt per-unit activations: not a single elementwise function
        last = len(leaf.layers) - 1
        for i in range(len(leaf.layers)):
            act = final if i == last else hidden
            found[f"{prefix}layers.{i}"] = identity if _is_identity(act) else act
    return found


def skip_reason(layer) -> str | None:
    """Why a dense layer cannot be factorized, or None if it can."""
    if isinstance(layer, LOWRANK_TYPES):
        return f"already low-rank (rank {layer.rank}); lowrank.densify(model) first to re-factorize it"
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


def resolve_activations(model, overrides: Mapping[str, Callable | None] | None) -> dict:
    """Detected activations, overridden by {pattern: fn, or None for identity}; first match wins."""
    found = known_activations(model)
    if not overrides:
        return found
    if not isinstance(overrides, Mapping):
        raise TypeError("activations must be a dict {path pattern: activation function or None}")
    paths = [p for p, _ in walk_layers(model)]
    hit = matches_key
    check_keys(overrides, "activations")
    for pattern, fn in overrides.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"activations[{pattern!r}] must be a function or None, got {fn!r}")
        if not any(hit(pattern, p) for p in paths):
            raise ValueError(f"activations pattern {pattern!r} matches no layer; paths: {paths[:8]}")
    for path in paths:
        fn = next((f for pat, f in overrides.items() if hit(pat, path)), found.get(path, _UNSET))
        if fn is not _UNSET:
            found[path] = identity if fn is None else fn
    return found


_UNSET = object()


def matches_key(key: str, path: str) -> bool:
    """A dict key (rank rules, activations): a regex fullmatch, or a name that `covers` it."""
    return matches(key, path) or covers(key, path)


def check_keys(mapping: Mapping, name: str) -> None:
    """Raise unless every key of a {pattern: value} dict is a string and a valid regex."""
    for key in mapping:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be path strings or regexes, got {key!r}")
        _check_regex(key, f"{name} key {key!r}")


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f"{what} is not a valid regex ({e}); escape literal characters with "
            "re.escape(...), or give a list of layer/module names instead"
        ) from None


def _check_pattern(pattern, name: str) -> None:
    if pattern is None:
        return
    if isinstance(pattern, str):
        _check_regex(pattern, f"{name}={pattern!r}")
        return
    if not isinstance(pattern, Sequence) or not all(isinstance(p, str) for p in pattern):
        raise TypeError(
            f"{name} must be a regex string or a list of path strings, got {pattern!r}"
        )


def select(
    model,
    *,
    target: Pattern | None = None,
    exclude: Pattern | None = None,
    where: Callable[[str, eqx.Module], bool] | None = None,
    fn_name: str = "factorize",
) -> list[Candidate]:
    """The candidate layers passing exclude, target and where, in pytree order.

    Candidates are the dense Linear/Conv layers, plus what plans list as skipped with
    the reason: layers already low-rank, and unsupported layers and modules
    (ConvTranspose, GRUCell, LSTMCell, Embedding; `where` is not asked about the
    latter three, which have no Linear/Conv attributes). A `target` (or list entry
    of it) that matches no layer raises, listing the nearest available paths, since
    a silent no-op is the worst outcome of a typo.
    """
    check_is_model(model, fn_name)
    _check_pattern(target, "target")
    _check_pattern(exclude, "exclude")
    layers = walk_listed(model)
    paths = [p for p, _ in layers]
    _check_matches_something(target, paths, "target")
    _check_matches_something(exclude, paths, "exclude")
    chosen = []
    for path, layer in layers:
        if exclude is not None and matches(exclude, path):
            continue
        if target is not None and not matches(target, path):
            continue
        asked = where is not None and not isinstance(layer, UNSUPPORTED_MODULES)
        if asked and not where(path, layer):
            continue
        chosen.append(Candidate(path, layer, skip_reason(layer)))
    return chosen


def _check_matches_something(pattern, paths: list[str], name: str) -> None:
    if pattern is None:
        return
    wanted = [pattern] if isinstance(pattern, str) else list(pattern)
    for entry in wanted:
        probe = entry if isinstance(pattern, str) else [entry]
        if any(matches(probe, p) for p in paths):
            continue
        near = difflib.get_close_matches(entry, paths, n=5, cutoff=0.3) or paths[:5]
        raise ValueError(
            f"{name} {entry!r} matches no layer; nearest available paths: {near}. "
            "A string is a regex matched against the whole path; a list entry "
            "must be a layer or module path, or a dotted suffix of one."
        )


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

