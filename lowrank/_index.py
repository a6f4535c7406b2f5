"""The model index: one walk of the model, every candidate layer with what is known of it.

`lowrank.select` builds it; plan, factorize (calibration, rewrite), summary and the
recipes read it instead of walking the model again.
"""

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import equinox as eqx

from ._select import (
    LOWRANK_TYPES,
    UNSUPPORTED_MODULES,
    Pattern,
    check_is_model,
    check_keys,
    check_regex,
    identity,
    matches,
    matches_key,
    skip_reason,
    stack_shape,
    walk_model,
)
from ._table import render_table, shape_str


@dataclass(frozen=True)
class IndexEntry:
    """One candidate layer of a `ModelIndex`.

    Attributes:
        path: its dotted path (`blocks.3.attn.query_proj`; `<root>` for a model that is
            itself a layer).
        layer: the layer module itself.
        kind: its type name (`Linear`, `Conv2d`, `LowRankLinear`, `GRUCell`...).
        shape: its dense weight shape, leading stack axes included (`()` when tied).
        stack_dims: how many leading axes of `shape` stack layers (scan over layers).
        bias: whether it has a bias.
        activation: the elementwise function known to follow it (`identity`: known to
            feed none), or None when unknown.
        skipped: why it cannot be factorized, or None when it can.
    """

    path: str
    layer: eqx.Module
    kind: str
    shape: tuple[int, ...]
    stack_dims: int
    bias: bool
    activation: Callable | None
    skipped: str | None


@dataclass(frozen=True)
class ModelIndex(Mapping):
    """What `lowrank.select` returns: the selected candidates by path, in pytree order.

    A read-only mapping {path: `IndexEntry`} that prints as a table (path, type, shape,
    bias, activation, skip reason).

    Attributes:
        entries: the selected candidates, in pytree order.
        layers: every layer of the model, selected or not, by path in pytree order
            (calibration corrects the biases of unselected ones).
        activations: the activations known to follow layers ({path: fn}).
    """

    entries: tuple[IndexEntry, ...]
    layers: Mapping[str, eqx.Module] = field(repr=False)
    activations: Mapping[str, Callable] = field(repr=False)

    def __getitem__(self, path: str) -> IndexEntry:
        for entry in self.entries:
            if entry.path == path:
                return entry
        raise KeyError(
            f"no selected layer {path!r}; selected: {[e.path for e in self.entries][:8]}"
        )

    def __iter__(self) -> Iterator[str]:
        return (e.path for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        header = ["path", "type", "shape", "bias", "activation", "skipped"]
        rows = [
            [
                e.path,
                e.kind,
                shape_str(e.shape, e.stack_dims),
                "yes" if e.bias else "no",
                _activation_name(e.activation),
                e.skipped or "",
            ]
            for e in self.entries
        ]
        title = f"lowrank index: {len(self.entries)} of {len(self.layers)} layers selected"
        return "\n".join([title, *render_table(header, rows)])

    __repr__ = __str__


def _activation_name(fn: Callable | None) -> str:
    if fn is None:
        return "?"
    if fn is identity:
        return "none"
    return getattr(fn, "__name__", type(fn).__name__)


def select(
    model,
    *,
    target: Pattern | None = None,
    exclude: Pattern | None = None,
    where: Callable[[str, eqx.Module], bool] | None = None,
    fn_name: str = "select",
) -> ModelIndex:
    """Walk the model once and index the candidate layers passing exclude, target, where.

    Candidates are the dense Linear/Conv layers (stacked scan-over-layers ones
    included), plus what plans list as skipped with the reason: layers already
    low-rank, and unsupported layers and modules (ConvTranspose, GRUCell, LSTMCell,
    Embedding; `where` is not asked about the latter three, which have no Linear/Conv
    attributes). A `target` or `exclude` (or list entry of one) that matches no layer
    raises, listing the nearest available paths, since a silent no-op is the worst
    outcome of a typo.

    Args:
        model: an Equinox model, or a pytree of them.
        target: which layers: a regex string fullmatched against each dotted path, or a
            list of names, each an exact path or a dotted suffix of a layer's path or
            of a module above it (`"attn"` covers every layer below any `attn`).
        exclude: the same forms; applied before `target`.
        where: a predicate `where(path, layer) -> bool`, asked last.
        fn_name: the public function named in errors.

    Returns:
        The `ModelIndex` of the selected candidates, in pytree order.
    """
    check_is_model(model, fn_name)
    _check_pattern(target, "target")
    _check_pattern(exclude, "exclude")
    listed, activations = walk_model(model)
    paths = [p for p, _ in listed]
    _check_matches_something(target, paths, "target")
    _check_matches_something(exclude, paths, "exclude")
    chosen = []
    for path, layer in listed:
        if exclude is not None and matches(exclude, path):
            continue
        if target is not None and not matches(target, path):
            continue
        asked = where is not None and not isinstance(layer, UNSUPPORTED_MODULES)
        if asked and not where(path, layer):
            continue
        chosen.append(_entry(path, layer, activations.get(path)))
    return ModelIndex(tuple(chosen), dict(listed), activations)


def _entry(path: str, layer, activation) -> IndexEntry:
    if isinstance(layer, UNSUPPORTED_MODULES):
        w = layer.weight if isinstance(layer, eqx.nn.Embedding) else layer.weight_ih
        shape, stack_dims = tuple(int(d) for d in w.shape), 0
        bias = getattr(layer, "use_bias", False) is True
    else:
        lead = stack_shape(layer)
        if isinstance(layer, LOWRANK_TYPES):
            shape = tuple(lead) + tuple(layer.dense_shape)
        else:
            w = layer.weight
            shape = tuple(int(d) for d in w.shape) if eqx.is_array(w) else ()
        stack_dims, bias = len(lead), layer.bias is not None
    return IndexEntry(
        path, layer, type(layer).__name__, shape, stack_dims, bias, activation, skip_reason(layer)
    )


def resolve_activations(index: ModelIndex, overrides: Mapping[str, Callable | None] | None) -> dict:
    """The known activations of the index, overridden by {pattern: fn, or None for
    identity}; for each layer the first matching pattern wins. Patterns are checked
    against every layer of the model, selected or not."""
    found = dict(index.activations)
    if not overrides:
        return found
    if not isinstance(overrides, Mapping):
        raise TypeError("activations must be a dict {path pattern: activation function or None}")
    paths = [p for p, layer in index.layers.items() if not isinstance(layer, UNSUPPORTED_MODULES)]
    check_keys(overrides, "activations")
    for pattern, fn in overrides.items():
        if fn is not None and not callable(fn):
            raise TypeError(f"activations[{pattern!r}] must be a function or None, got {fn!r}")
        if not any(matches_key(pattern, p) for p in paths):
            raise ValueError(
                f"activations pattern {pattern!r} matches no layer; paths: {paths[:8]}"
            )
    for path in paths:
        fn = next(
            (f for pat, f in overrides.items() if matches_key(pat, path)), found.get(path, _UNSET)
        )
        if fn is not _UNSET:
            found[path] = identity if fn is None else fn
    return found


_UNSET = object()


def _check_pattern(pattern, name: str) -> None:
    if pattern is None:
        return
    if isinstance(pattern, str):
        check_regex(pattern, f"{name}={pattern!r}")
        return
    if not isinstance(pattern, Sequence) or not all(isinstance(p, str) for p in pattern):
        raise TypeError(f"{name} must be a regex string or a list of path strings, got {pattern!r}")


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
