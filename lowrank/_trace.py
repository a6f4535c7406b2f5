"""Trace a model into one jaxpr whose inputs are the model's arrays, and find where each
layer's weight meets the data.

Calibration and FLOP counting both work on the model's jaxpr instead of wrapping layers:
the model runs unchanged (its `__call__` may read any attribute of any layer), and the
matmul or convolution that consumes a layer's weight is recognized in the equations
by following the weight through layout-only operations (transposes, casts, copies) and
into calls, custom-derivative rules and scans (a stacked weight is sliced by the scan).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ._select import attribute_path, key_path_to_str

Example = Callable | jax.Array | jax.ShapeDtypeStruct | np.ndarray

# Primitives that only change how a weight is laid out or typed.
_SAME_LAYOUT = {
    "convert_element_type",
    "copy",
    "copy_p",
    "reduce_precision",
    "optimization_barrier",
}
# Primitives that call a sub-jaxpr on their operands one to one.
CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


@dataclass(frozen=True)
class View:
    """A value that is a layout-only transform of one model array (a leaf).

    `perm[i]` is the leaf axis that axis i of the value came from (None after a
    reshape, when axes no longer map one to one); `sliced`: the value is one slice of a
    stacked leaf along its first axis (inside a scan body), `index` which one when known.
    """

    leaf: int
    perm: tuple[int, ...] | None
    sliced: bool = False
    index: int | None = None


def view_after(eqn, views: Sequence[View | None]) -> View | None:
    """The view of `eqn`'s single output if it is a layout-only op of a viewed input."""
    name = eqn.primitive.name
    if len(eqn.invars) == 0 or views[0] is None:
        return None
    src = views[0]
    if name in _SAME_LAYOUT:
        return src
    if name == "transpose":
        perm = None if src.perm is None else tuple(src.perm[p] for p in eqn.params["permutation"])
        return View(src.leaf, perm, src.sliced, src.index)
    if name in ("reshape", "squeeze", "expand_dims"):
        return View(src.leaf, None, src.sliced, src.index)
    return None


@dataclass(frozen=True)
class WeightUse:
    """A matmul or convolution of a viewed weight with data.

    `weight`: which operand (0 or 1) is the weight; `out_axis`: the output axis that
    indexes the weight's output features (the weight's axis 0).
    """

    weight: int
    out_axis: int


def weight_use(eqn, views: Sequence[View | None]) -> WeightUse | None:
    """Whether `eqn` multiplies one viewed weight with a non-weight operand."""
    name = eqn.primitive.name
    if name not in ("dot_general", "conv_general_dilated") or len(eqn.invars) != 2:
        return None
    viewed = [i for i in (0, 1) if views[i] is not None]
    if len(viewed) != 1:
        return None
    w = viewed[0]
    view = views[w]
    if name == "conv_general_dilated":
        if w != 1:
            return None
        return WeightUse(1, eqn.params["dimension_numbers"].out_spec[1])
    (contract, batch) = eqn.params["dimension_numbers"]
    if batch[0] or batch[1]:
        return None
    ndims = [len(v.aval.shape) for v in eqn.invars]
    free = [[d for d in range(ndims[i]) if d not in contract[i]] for i in (0, 1)]
    if view.perm is None:
        out_dim = 0  # unknown mapping: assume the weight's leading free axis holds its outputs
        if not free[w]:
            return None
    else:
        out_dims = [d for d in free[w] if view.perm[d] == 0]
        if len(out_dims) != 1:
            return None
        out_dim = free[w].index(out_dims[0])
    offset = 0 if w == 0 else len(free[0])
    return WeightUse(w, offset + out_dim)


def sub_jaxpr(eqn):
    """(jaxpr, consts) of a call-like equation's body, or None."""
    key = CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    body = eqn.params[key]
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def leaf_paths(model) -> list[str]:
    """Dotted paths of the model's array leaves, in `jax.tree_util.tree_leaves` order of
    `eqx.filter(model, eqx.is_array)`."""
    params = eqx.filter(model, eqx.is_array)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return [key_path_to_str(kp) for kp, _ in flat]


def traced_model(model, run: Callable, data: tuple):
    """The closed jaxpr of `run(model, *data)` taking (model arrays..., data leaves...),
    and the model's array leaves."""
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat_run(leaves, *data):
        return run(eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static), *data)

    return jax.make_jaxpr(flat_run)(leaves, *data), leaves


def runner(data: Example, *, batched: bool, argument: str) -> tuple[Callable, tuple]:
    """`run(model, *data)` and its data: a callable `fn(model)`, a batch of inputs (the
    model vmapped over its leading axis), or one unbatched input."""
    if callable(data) and not isinstance(data, (jax.Array, np.ndarray)):
        return (lambda m: data(m)), ()
    if isinstance(data, jax.ShapeDtypeStruct):
        data = jnp.zeros(data.shape, data.dtype)
    if isinstance(data, (list, tuple, dict)):
        raise TypeError(
            f"{argument} must be an array{' with a leading batch axis' if batched else ''} "
            f"or a callable fn(model), got a {type(data).__name__}; stack the samples with "
            f"jnp.stack(...), or pass fn(model) for models that take several inputs"
        )
    if not isinstance(data, (jax.Array, np.ndarray)) or not hasattr(data, "shape"):
        raise TypeError(
            f"{argument} must be an array or a callable fn(model), got "
            f"{type(data).__name__} {data!r:.60}"
        )
    data = jnp.asarray(data)
    if batched:
        if data.ndim == 0:
            raise ValueError(f"{argument} needs a leading batch axis; got a scalar")
        return (lambda m, x: jax.vmap(m)(x)), (data,)
    return (lambda m, x: m(x)), (data,)


def trace_for(model, data: Example, *, batched: bool, argument: str):
    """`traced_model` with errors that name `argument` when the model can't run on it."""
    run, args = runner(data, batched=batched, argument=argument)
    try:
        return traced_model(model, run, args), args
    except Exception as err:  # the model rejected these inputs: say which argument and why
        shape = f" of shape {tuple(args[0].shape)} ({args[0].dtype})" if args else ""
        if batched:
            hint = (
                "a batch of model inputs with a leading batch axis, (N, *input_shape) (one "
                "sample: add the axis with x[None]), or a callable fn(model) that runs the "
                "model, e.g. for models that also take state, masks or keys"
            )
        else:
            hint = (
                "ONE unbatched model input (no batch axis: x[0] of a batch), a "
                "jax.ShapeDtypeStruct, or a callable fn(model)"
            )
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{argument}{shape}: running the model on it failed ({type(err).__name__}: "
            f"{first_line[:300]}). {argument} must be {hint}."
        ) from err


def output_positions(model, layers: dict[str, eqx.Module], example: Example) -> dict[str, int]:
    """Output vectors each layer produces per example (applications, e.g. tokens under a
    vmap, times output positions of a conv), per slice for stacked layers; from the
    jaxpr of `model(example)`, evaluated on shapes only."""
    (closed, _), _ = trace_for(model, example, batched=False, argument="example")
    index = {p: i for i, p in enumerate(leaf_paths(model))}
    watched = {}
    for path, layer in layers.items():
        name = "u" if hasattr(layer, "u") else "weight"
        leaf = index.get(attribute_path(path, name))
        if leaf is not None:
            watched[leaf] = path
    counts = dict.fromkeys(layers, 0)
    views = {
        v: View(i, tuple(range(len(v.aval.shape))))
        for i, v in enumerate(closed.jaxpr.invars)
        if i in watched
    }

    def walk(jaxpr, views):
        for eqn in jaxpr.eqns:
            ins = [
                views.get(v) if not isinstance(v, jex_core.Literal) else None for v in eqn.invars
            ]
            use = weight_use(eqn, ins)
            if use is not None:
                out = eqn.outvars[0].aval.shape
                counts[watched[ins[use.weight].leaf]] += math.prod(out) // out[use.out_axis]
                continue
            body = sub_jaxpr(eqn)
            if body is not None and any(ins):
                walk(body[0], {iv: vw for iv, vw in zip(body[0].invars, ins) if vw is not None})
                continue
            if eqn.primitive.name == "scan" and any(ins):
                walk(eqn.params["jaxpr"].jaxpr, _scan_body_views(eqn, ins))
                continue
            out = view_after(eqn, ins)
            if out is not None:
                views[eqn.outvars[0]] = out

    walk(closed.jaxpr, views)
    return {path: n for path, n in counts.items() if n}


def _scan_body_views(eqn, ins: list[View | None]) -> dict:
    """Views of a scan body's inputs: consts as they are, stacked xs sliced."""
    body = eqn.params["jaxpr"].jaxpr
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    out = {}
    for k, (inner, view) in enumerate(zip(body.invars, ins)):
        if view is None or n_consts <= k < n_consts + n_carry:
            continue
        if k < n_consts:
            out[inner] = view
        elif view.perm is not None and view.perm[0] == 0 and not view.sliced:
            out[inner] = View(view.leaf, tuple(p - 1 for p in view.perm[1:]), sliced=True)
    return out
