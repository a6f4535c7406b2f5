"""The compiler's front door: select -> plan -> initialize -> rewrite."""

import dataclasses
import functools
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp

from ._calibrate import calibrate
from ._data_errors import data_errors
from ._fit import LayerFitter
from ._fuse import fuse_epilogues
from ._index import ModelIndex, resolve_activations, select
from ._initializers import Initializer, resolve_initializer
from ._plan import Plan
from ._planner import check_plan_fits, make_plan
from ._rewrite import lowrank_twin, stacked_twin
from ._select import (
    check_is_model,
    is_layer,
    replace_layers,
    stack_shape,
)
from ._trace import Example, output_positions

MAX_CALIBRATION_ROWS = 16384


def plan(
    model, *, rank, target=None, exclude=None, where=None, example: Example | None = None
) -> Plan:
    """Decide a rank for every selected layer without touching the model.

    Args:
        model: an Equinox model (never modified).
        rank: an int; a float in (0, 1] (fraction of full rank); "energy:0.9"
            (smallest rank keeping 90% of squared singular values); a dict
            {pattern: rank}; or `Budget(params=...)` / `Budget(flops=...)`.
        target, exclude, where: which layers (see `lowrank.select`).
        example: an unbatched input (or a callable fn(model)) so that FLOPs count
            every conv output position and token.

    Returns:
        The `Plan`: per layer its rank or why it stays dense, and the costs before and
        after; print it, edit it (`Plan.with_rank`), or apply it with
        `factorize(model, plan=...)`.
    """
    index = select(model, target=target, exclude=exclude, where=where, fn_name="plan")
    return make_plan(
        index,
        rank=rank,
        explicit=target is not None,
        positions=_positions(model, index, example),
        fn_name="plan",
    )


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
    fuse_activations: bool = True,
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
        fuse_activations: move the activation after a factorized Linear into the
            layer's epilogue (`LowRankLinear(activation=...)`, applied inside
            `kernels.factored_matmul`) where the model's container can drop it: an
            `eqx.nn.MLP`'s activation (when all its hidden layers are factorized) and
            final activation, an `eqx.nn.Lambda` after the layer in an
            `eqx.nn.Sequential`; these then hold the identity. `jax.nn.relu`, `gelu`
            (tanh form, its default) and `silu` fuse. The same function either way
            (the same ops on the XLA path), so on by default: the fused kernel then
            runs wherever `impl="auto"` measured it faster. The plan lists the fused
            layers; `densify` and `save`/`load` handle them. (`activations=` never
            fuses: a module's own `__call__` would still apply the function.)
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
    if plan is not None and (rank, target, exclude, where) != (None,) * 4:
        raise ValueError("pass either plan= or rank=/target=/exclude=/where=, not both")
    if plan is None and rank is None:
        raise ValueError("factorize needs rank= (e.g. rank=16 or Budget(params=0.3)) or plan=")
    index = select(model, target=target, exclude=exclude, where=where, fn_name="factorize")
    key = jax.random.key(0) if key is None else key
    if plan is None:
        plan = make_plan(
            index,
            rank=rank,
            explicit=target is not None,
            init=init_name,
            positions=_positions(model, index, example),
            fn_name="factorize",
            data_errors=None
            if calibration is None
            else functools.partial(
                data_errors,
                model,
                index.layers,
                calibration,
                MAX_CALIBRATION_ROWS,
                key=jax.random.fold_in(key, 1),
            ),
        )
    else:
        plan = check_plan_fits(plan, index)
        plan = dataclasses.replace(
            plan, layers=[dataclasses.replace(l, init=init_name) for l in plan.layers]
        )
    todo = {l.path: l for l in plan.factorized}
    activations = resolve_activations(index, activations)
    if not todo:
        _warn_nothing_to_factorize(plan)
        return (model, plan) if return_plan else model
    plan = _note_assumed_activations(plan, initializer, init_name, todo, activations)
    fitter = LayerFitter(index.layers, todo, initializer, init_name, activations, key)
    replacements = {}
    if calibration is not None:
        replacements |= _calibrated(model, index, fitter, calibration, sequential)
    else:
        fitter.fit_all()
    done = fitter.results()
    for path, (_, factors) in done.items():
        layer = index.layers[path]
        twin = (
            stacked_twin(layer, factors) if stack_shape(layer) else lowrank_twin(layer, factors[0])
        )
        replacements[path] = twin
    out = replace_layers(model, replacements)
    out, fused = fuse_epilogues(out, set(done)) if fuse_activations else (out, {})
    if not return_plan:
        return out
    measured = {path: entry for path, (entry, _) in done.items()}
    layers = [
        dataclasses.replace(measured.get(l.path, l), epilogue=fused.get(l.path))
        for l in plan.layers
    ]
    return out, dataclasses.replace(plan, layers=layers)


def _calibrated(
    model, index: ModelIndex, fitter: LayerFitter, calibration, sequential: bool
) -> dict:
    """Fit the planned layers in one calibration pass; the corrected biases of the dense
    layers left downstream, as replacement layers by path."""
    layers = index.layers
    correct = {
        path: layer
        for path, layer in layers.items()
        if path not in fitter.todo
        and isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv))
        and getattr(layer, "bias", None) is not None
    }
    biases = calibrate(
        model,
        {p: layers[p] for p in fitter.todo},
        fitter,
        calibration,
        sequential=sequential,
        correct=correct,
        max_rows=MAX_CALIBRATION_ROWS,
    )
    return {
        path: eqx.tree_at(lambda l: l.bias, layers[path], jnp.asarray(b, layers[path].bias.dtype))
        for path, b in biases.items()
    }


# ---------------------------------------------------------------- helpers


def _positions(model, index: ModelIndex, example) -> dict[str, int] | None:
    if example is None:
        return None
    layers = {p: l for p, l in index.layers.items() if is_layer(l)}
    return output_positions(model, layers, example)  # per slice of a stacked layer


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
