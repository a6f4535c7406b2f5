"""The compiler's front door: plan -> initialize -> rewrite, and back with `densify`."""

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ._calibrate import calibrate
from ._initializers import Factors, Initializer, LayerProblem, resolve_initializer
from ._layers import LowRankConv, LowRankLinear
from ._plan import Plan, check_rank_fits, make_plan, per_slice_positions
from ._select import (
    check_is_model,
    replace_layers,
    resolve_activations,
    slice_path,
    stack_shape,
    walk_layers,
    walk_listed,
    weight_matrix,
)
from ._trace import Example, output_positions
from ._whitened import whitened_spectrum

MAX_CALIBRATION_ROWS = 16384


def plan(model, *, rank, target=None, exclude=None, where=None, example: Example | None = None) -> Plan:
    """Decide a rank for every selected layer without touching the model.

    `rank`: an int; a float in (0, 1] (fraction of full rank); "energy:0.9"
    (smallest rank keeping 90% of squared singular values); a dict {pattern: rank};
    or `Budget(params=...)` / `Budget(flops=...)`. `example` (an unbatched input, or
    a callable fn(model)) lets conv FLOPs count every output position.
    """
    return make_plan(
        model, rank=rank, target=target, exclude=exclude, where=where,
        positions=_positions(model, example), fn_name="plan",
    )  # fmt: skip


def factorize(
    model,
    *,
    rank=None,
    plan: Plan | None = None,
    init: str | Initializer = "spectral",
    target=None,
    exclude=None,
    where=None,
    calibration: Example | None = None,
    sequential: bool = True,
    example: Example | None = None,
    activations: dict | None = None,
    key: jax.Array | None = None,
    return_plan: bool = False,
):
    """Replace selected dense layers of `model` by factorized low-rank twins.

    Args:
        model: an Equinox model (never modified).
        rank: a rank rule, as for `lowrank.plan` (int, fraction, "energy:x", dict or
            `Budget`). With calibration data a `Budget` allocates ranks from the data
            (`Budget(by=...)` chooses).
        plan: a ready (possibly edited) `Plan`, instead of rank/target/exclude/where.
        init: a registered initializer name ("spectral", "random", "nkp", "whitened",
            ...) or an initializer object.
        target, exclude, where: which layers (see `lowrank.select`).
        calibration: for data-aware initializers: a batch of model inputs (the model
            is vmapped over its leading axis) or a callable fn(model) that runs the
            model on real data. The data flows through the model once: the model is
            traced to a jaxpr and evaluated in order, and each layer is fitted when its
            weight is first used, on the inputs the already-factorized layers before it
            produce, to reproduce the dense layer's outputs; dense layers with a bias
            left unfactorized downstream get their bias corrected so that their mean
            output stays the dense model's. A data-aware `Budget` costs one more pass.
        sequential: False fits every layer on the dense model's inputs instead (as
            SVD-LLM/ASVD do), without bias correction.
        example: an unbatched input (or fn(model)) to count FLOPs per output position.
        activations: {pattern: fn or None} saying what follows each layer, for the
            function-aware inits; detected for `eqx.nn.MLP`, otherwise unknown (NKP
            then assumes ReLU, with a warning naming the layers); None: no activation.
        key: PRNG key for random inits.
        return_plan: also return the plan, with each layer's measured weight/function
            error and fit time.

    Returns:
        The factorized model (or (model, plan)). When the plan factorizes no layer, a
        UserWarning lists each layer's reason and the model comes back unchanged. A
        stacked layer (weights (L, out, in) from `eqx.filter_vmap`, run by a scan) gets
        stacked factors (L, out, r) and (L, r, in) at one rank, each slice fitted on
        its own (with calibration, on its own scan iteration's inputs).
    """
    check_is_model(model, "factorize")
    initializer = resolve_initializer(init)
    init_name = init if isinstance(init, str) else repr(init)
    _check_calibration(initializer, init_name, calibration)
    layers = dict(walk_layers(model))
    if plan is None:
        if rank is None:
            raise ValueError("factorize needs rank= (e.g. rank=16 or Budget(params=0.3)) or plan=")
        plan = make_plan(
            model, rank=rank, target=target, exclude=exclude, where=where, init=init_name,
            positions=_positions(model, example), fn_name="factorize",
            data_spectra=None if calibration is None else functools.partial(
                _data_spectra, model, layers, calibration),
        )  # fmt: skip
    else:
        if rank is not None or target is not None or exclude is not None or where is not None:
            raise ValueError("pass either plan= or rank=/target=/exclude=/where=, not both")
        plan = _check_plan_fits(plan, model)
        plan = dataclasses.replace(
            plan, layers=[dataclasses.replace(l, init=init_name) for l in plan.layers]
        )
    todo = {l.path: l for l in plan.factorized}
    activations = resolve_activations(model, activations)
    if not todo:
        _warn_nothing_to_factorize(plan)
        return (model, plan) if return_plan else model
    plan = _note_assumed_activations(plan, initializer, init_name, todo, activations)
    key = jax.random.key(0) if key is None else key
    index_of = {path: i for i, path in enumerate(todo)}
    solved: dict[str, dict[tuple, tuple[LayerProblem, Factors]]] = {path: {} for path in todo}
    seconds = dict.fromkeys(todo, 0.0)
    slices = sum(math.prod(stack_shape(layers[p])) for p in todo)
    progress = tqdm(total=slices, desc="factorize", unit="layer", disable=None, leave=False)

    def fit(path, index=None, inputs=None, dense_inputs=None) -> Factors:
        """Factors for layer `path` (its slice `index` if stacked) from `inputs`."""
        layer = layers[path]
        lead = stack_shape(layer)
        at = () if index is None else (index,) if isinstance(index, int) else tuple(index)
        weight = weight_matrix(layer)
        bias = None if layer.bias is None else np.asarray(layer.bias)
        layer_key = jax.random.fold_in(key, index_of[path])
        if at:
            weight = jnp.asarray(np.asarray(weight)[at])
            bias = None if bias is None else bias[at]
            layer_key = jax.random.fold_in(layer_key, int(np.ravel_multi_index(at, lead)))
        problem = LayerProblem(
            path=slice_path(path, at) if at else path,
            weight=weight,
            bias=None if bias is None else jnp.asarray(bias.reshape(-1)),
            rank=todo[path].rank,
            activation=activations.get(path),
            inputs=None if inputs is None else jnp.asarray(inputs),
            dense_inputs=None if dense_inputs is None else jnp.asarray(dense_inputs),
        )  # fmt: skip
        start = time.perf_counter()
        factors = initializer(problem, key=layer_key)
        _check_factors(factors, problem, init_name)
        seconds[path] += time.perf_counter() - start
        solved[path][at] = (problem, factors)
        progress.set_postfix_str(problem.path, refresh=False)
        progress.update()
        return factors

    replacements = {}
    if calibration is not None and todo:
        correct = {
            path: layer for path, layer in layers.items()
            if path not in todo and isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv))
            and getattr(layer, "bias", None) is not None
        }  # fmt: skip
        biases = calibrate(
            model, {p: layers[p] for p in todo}, fit, calibration, sequential=sequential,
            correct=correct, max_rows=MAX_CALIBRATION_ROWS,
        )  # fmt: skip
        replacements |= {
            path: eqx.tree_at(lambda l: l.bias, layers[path], jnp.asarray(b, layers[path].bias.dtype))
            for path, b in biases.items()
        }  # fmt: skip
    else:
        for path in todo:
            lead = stack_shape(layers[path])
            for at in np.ndindex(lead) if lead else [None]:
                fit(path, at)
    progress.close()
    done = {}
    for path, parts in solved.items():
        layer = layers[path]
        problems, factors = zip(*(parts[at] for at in sorted(parts)))
        done[path] = dataclasses.replace(
            _measured(todo[path], problems, factors), fit_seconds=round(seconds[path], 4)
        )
        twin = stacked_twin(layer, factors) if stack_shape(layer) else _lowrank_twin(layer, factors[0])
        replacements[path] = twin
    out = replace_layers(model, replacements)
    if not return_plan:
        return out
    return out, dataclasses.replace(plan, layers=[done.get(l.path, l) for l in plan.layers])


def densify(model):
    """Merge every factorized layer back into a plain `eqx.nn.Linear` / `eqx.nn.Conv`."""
    check_is_model(model, "densify")
    replacements = {
        path: _dense_twin(layer)
        for path, layer in walk_layers(model)
        if isinstance(layer, (LowRankLinear, LowRankConv))
    }
    return replace_layers(model, replacements)


# ---------------------------------------------------------------- helpers


def _positions(model, example) -> dict[str, int] | None:
    if example is None:
        return None
    layers = dict(walk_layers(model))
    return per_slice_positions(output_positions(model, layers, example), layers)


def _warn_nothing_to_factorize(plan: Plan) -> None:
    reasons = [f"{l.path}: {l.skipped or 'kept dense'}" for l in plan.layers]
    more = f"; ... ({len(reasons) - 8} more)" if len(reasons) > 8 else ""
    warnings.warn(
        f"lowrank.factorize: nothing to factorize (rank={plan.rule}), the model is returned "
        f"unchanged. {'; '.join(reasons[:8])}{more}. Lower the rank or budget, or change "
        "target/exclude/where; print(lowrank.plan(model, ...)) shows the plan",
        UserWarning,
        stacklevel=3,
    )


def _note_assumed_activations(plan: Plan, initializer, name: str, todo, activations) -> Plan:
    """Warn (and note in the plan) where the initializer assumes an activation it was not told.

    An initializer declares what it assumes after a layer of unknown activation by a
    `fallback_activation` attribute (NKP: "ReLU"); None or absent: it assumes nothing.
    """
    fallback = getattr(initializer, "fallback_activation", None)
    unknown = [path for path in todo if activations.get(path) is None]
    if fallback is None or not unknown:
        return plan
    listed = ", ".join(unknown[:6]) + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else "")
    text = (
        f"init {name!r} assumes {fallback} after {listed}: their activation is unknown. "
        "Say what follows each layer with activations={pattern: fn, or None when none "
        "does}, e.g. activations={'head': None}"
    )
    warnings.warn(text, UserWarning, stacklevel=3)
    return dataclasses.replace(plan, notes=[*plan.notes, text])


def _data_spectra(model, layers: dict, calibration, paths: list[str]) -> dict[str, np.ndarray]:
    """Each layer's spectrum in its input-whitened basis (`whitened_spectrum`) on the dense
    model's inputs, from one pass over the calibration data; stacks combine their slices."""
    found: dict[str, list[np.ndarray]] = {}

    def fit(path, index, inputs, dense_inputs):
        layer = layers[path]
        weight = np.asarray(weight_matrix(layer))
        weight = weight if index is None else weight[index]
        found.setdefault(path, []).append(
            whitened_spectrum(weight, inputs, centre=getattr(layer, "bias", None) is not None)
        )

    calibrate(
        model, {p: layers[p] for p in paths}, fit, calibration, sequential=False, correct={},
        max_rows=MAX_CALIBRATION_ROWS,
    )  # fmt: skip
    return {path: np.sqrt(sum(s**2 for s in parts)) for path, parts in found.items()}


def _check_plan_fits(plan: Plan, model) -> Plan:
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a lowrank.Plan (see lowrank.plan), got {type(plan).__name__}")
    layers = dict(walk_listed(model))
    for lp in plan.layers:
        layer = layers.get(lp.path)
        if layer is None:
            raise ValueError(
                f"plan layer {lp.path} is not in this model; was the plan made for another model?"
            )
        if lp.rank is None:
            continue
        if isinstance(layer, (LowRankLinear, LowRankConv)):
            raise ValueError(
                f"plan layer {lp.path} is already a {type(layer).__name__}; "
                "lowrank.densify(model) first to re-factorize it"
            )
        if tuple(layer.weight.shape) != tuple(lp.shape):
            raise ValueError(
                f"plan layer {lp.path} has shape {tuple(lp.shape)} but the model's weight is "
                f"{tuple(layer.weight.shape)}; re-plan with lowrank.plan(model, ...)"
            )
        check_rank_fits(lp.path, layer, lp.rank)
    return plan


def _check_calibration(initializer, name: str, calibration) -> None:
    mode = initializer.calibration
    if mode == "required" and calibration is None:
        raise ValueError(
            f"init {name!r} needs calibration data: pass calibration= (a batch of model "
            "inputs, or a callable fn(model) that runs the model on real data)"
        )
    if mode == "never" and calibration is not None:
        raise ValueError(
            f"init {name!r} does not use calibration data; drop calibration= or choose a "
            "data-aware init such as 'whitened' or 'nkp'"
        )


def _check_factors(factors: Factors, problem: LayerProblem, name: str) -> None:
    m, n = problem.weight.shape
    r = problem.rank
    if factors.u.shape != (m, r) or factors.v.shape != (r, n):
        raise ValueError(
            f"init {name!r} returned u {factors.u.shape}, v {factors.v.shape} for "
            f"{problem.path}; expected ({m}, {r}) and ({r}, {n})"
        )
    arrays = [factors.u, factors.v] + ([] if factors.bias is None else [factors.bias])
    if not all(np.isfinite(np.asarray(a)).all() for a in arrays):
        for array, what in ((problem.weight, "non-finite weights"), (problem.bias, "a non-finite bias")):
            if array is not None and not np.isfinite(np.asarray(array)).all():
                raise ValueError(
                    f"layer {problem.path} has {what} (NaN/inf); fix or re-initialize the "
                    "dense model before factorizing"
                )
        fixes = ["check the calibration data for NaN/inf"] if problem.inputs is not None else []
        fixes += ["try init='spectral'"] if name != "spectral" else []
        raise ValueError(
            f"init {name!r} produced non-finite factors for {problem.path} from finite "
            f"weights and bias; {' or '.join(fixes) or 'please report it'}"
        )


def _measured(lp, problems: Sequence[LayerProblem], factors: Sequence[Factors]):
    """The plan entry with its errors: the relative weight error over all the layer's
    slices (one unless stacked), and the slices' mean function error."""
    sq_err = sq_norm = 0.0
    for problem, f in zip(problems, factors):
        w = np.asarray(problem.weight, np.float64)
        approx = np.asarray(f.u, np.float64) @ np.asarray(f.v, np.float64)
        sq_err += float(np.sum((w - approx) ** 2))
        sq_norm += float(np.sum(w**2))
    err = np.sqrt(sq_err) / max(np.sqrt(sq_norm), 1e-30)
    f_errs = [float(f.function_error) for f in factors if f.function_error is not None]
    f_err = float(np.mean(f_errs)) if f_errs else None
    assumes = next((f.assumes for f in factors if f.assumes), None) if f_err is not None else None
    return dataclasses.replace(lp, weight_error=float(err), function_error=f_err, assumes=assumes)


def stacked_twin(layer, factors: Sequence[Factors]):
    """The factorized twin of a stacked layer (weights (*stack, out, in[, *kernel])), from
    one `Factors` per slice in `np.ndindex(stack)` order: u (*stack, out, r) and
    v (*stack, r, in[, *kernel]), one rank for the whole stack."""
    lead = stack_shape(layer)
    if len(factors) != int(np.prod(lead)):
        raise ValueError(f"a stack of shape {lead} needs {int(np.prod(lead))} Factors, got {len(factors)}")

    def stack(arrays):
        return np.stack([np.asarray(a) for a in arrays]).reshape(lead + np.shape(arrays[0]))

    bias = None if factors[0].bias is None else stack([f.bias for f in factors])
    return _lowrank_twin(layer, Factors(stack([f.u for f in factors]), stack([f.v for f in factors]), bias))


def _lowrank_twin(layer, factors: Factors):
    """The factorized layer, in the dense layer's dtype (host-side casts: no per-shape compile)."""
    dtype = layer.weight.dtype
    cast = lambda a, shape=None: jnp.asarray(np.asarray(a).reshape(shape or a.shape), dtype)  # noqa: E731
    u = cast(factors.u)
    bias = None if factors.bias is None else cast(factors.bias)
    if isinstance(layer, eqx.nn.Linear):
        return LowRankLinear(u, cast(factors.v), bias)
    v = cast(factors.v, factors.v.shape[:-1] + layer.weight.shape[factors.v.ndim - 1 :])
    return LowRankConv(
        u, v, bias, stride=layer.stride, padding=layer.padding,
        dilation=layer.dilation, padding_mode=layer.padding_mode,
    )  # fmt: skip


_CONV_TYPES = {1: eqx.nn.Conv1d, 2: eqx.nn.Conv2d, 3: eqx.nn.Conv3d}


def _dense_twin(layer):
    key = jax.random.key(0)  # the fresh layer's own init is overwritten at once
    dtype = layer.u.dtype
    use_bias = layer.bias is not None
    if isinstance(layer, LowRankLinear):
        dense = eqx.nn.Linear(layer.in_features, layer.out_features, use_bias, dtype=dtype, key=key)
    else:
        dense = _CONV_TYPES[layer.num_spatial_dims](
            layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, use_bias=use_bias,
            padding_mode=layer.padding_mode, dtype=dtype, key=key,
        )  # fmt: skip
    dense = eqx.tree_at(lambda l: l.weight, dense, layer.weight)
    if use_bias:
        dense = eqx.tree_at(
            lambda l: l.bias, dense, layer.bias.reshape(layer.stack_shape + dense.bias.shape)
        )
    return dense
