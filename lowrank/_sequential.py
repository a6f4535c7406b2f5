"""Calibrated factorization, one layer after another in the order the model runs them.

With `sequential=True` (factorize's default when calibration data is given) each layer
is fitted on the inputs it will actually see, those of the model whose earlier layers
are already factorized, to reproduce what the dense layer computed on the dense model's
inputs. Errors then do not compound down the network: every layer (and its bias, which
absorbs mean shifts) corrects what the layers before it let through, as GPTQ and the
deep-network form of NKP do. With `sequential=False` every layer sees the dense model's
inputs, as SVD-LLM and ASVD do. After a sequential fit, `corrected_biases` moves the
bias of every dense layer left unfactorized downstream, so that its mean output is
the dense model's again.

Cost: one run of the model on the calibration data per group of layers that share an
input (the query, key and value projections of one attention form one group). Between
runs the solved layers keep their dense type with weight u @ v, so the model keeps its
structure and every run after the second reuses one compilation.
"""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._initializers import Factors
from ._select import replace_layers, walk_layers, weight_matrix
from ._trace import Example, InputRecorder

Solve = Callable[[str, np.ndarray, np.ndarray | None], Factors]


def solve_layers(
    model,
    paths: list[str],
    calibration: Example,
    solve: Solve,
    *,
    sequential: bool,
    max_rows: int,
) -> dict[str, Factors]:
    """{path: factors} from `solve(path, inputs, dense_inputs)` for every layer in `paths`.

    `dense_inputs` is None where the layer's inputs are the dense model's own (always
    when not `sequential`).
    """
    recorder = InputRecorder(paths, calibration, max_rows=max_rows)
    dense = recorder.record(model)  # in the order the model first runs the layers
    if not sequential:
        return {path: solve(path, rows, None) for path, rows in dense.items()}
    first = next(iter(dense))  # nothing factorized runs before it: its inputs never change
    probe = recorder.probes[first]
    layers = dict(walk_layers(model))
    current, factors = model, {}
    for group in _same_input_groups(dense):
        seen = recorder.record(current, group) if factors else dense
        if not np.allclose(recorder.probes[first], probe, rtol=1e-5, atol=1e-6):
            raise ValueError(
                f"calibration fed layer {first} different inputs on two runs; sequential "
                "calibration reruns the model, so calibration must give the same data on "
                "every call (a fixed batch, or fn(model) with fixed keys), or pass "
                "sequential=False"
            )
        for path in group:
            unchanged = np.array_equal(seen[path], dense[path])
            factors[path] = solve(path, seen[path], None if unchanged else dense[path])
        current = replace_layers(current, {p: merged(layers[p], factors[p]) for p in group})
    return factors


def corrected_biases(
    model, factors: dict[str, Factors], calibration: Example, *, max_rows: int
) -> dict[str, eqx.Module]:
    """Bias correction downstream of the factorized layers: {path: layer} for every
    dense Linear/Conv with a bias that was not factorized but whose inputs the factorized
    layers shifted, its bias moved by W (E[x_dense] - E[x_now]) so that its mean output
    on the calibration data is the dense model's again (Nagel et al. 2019's empirical
    bias correction). Corrected in run order, each on the inputs that the corrections
    before it leave: one run per corrected layer, plus two. The factorized layers' own
    biases are already fitted."""
    layers = dict(walk_layers(model))
    paths = [
        path for path, layer in layers.items()
        if path not in factors and isinstance(layer, (eqx.nn.Linear, eqx.nn.Conv))
        and layer.bias is not None
    ]  # fmt: skip
    if not paths:
        return {}
    recorder = InputRecorder(paths, calibration, max_rows=max_rows)
    dense = recorder.record(model, strict=False)  # in run order
    current = replace_layers(model, {p: merged(layers[p], f) for p, f in factors.items()})
    seen = recorder.record(current, strict=False)
    shifted = [path for path in dense if not np.array_equal(dense[path], seen[path])]
    corrected = {}
    for path in shifted:
        if corrected:  # the last correction moved this layer's inputs too
            seen = recorder.record(current, [path])
        layer = layers[path]
        shift = dense[path].astype(np.float64).mean(0) - seen[path].astype(np.float64).mean(0)
        weight = np.asarray(weight_matrix(layer), np.float64)
        bias = np.asarray(layer.bias, np.float64) + (weight @ shift).reshape(layer.bias.shape)
        corrected[path] = eqx.tree_at(lambda l: l.bias, layer, jnp.asarray(bias, layer.bias.dtype))
        current = replace_layers(current, {path: corrected[path]})
    return corrected


def _same_input_groups(dense: dict[str, np.ndarray]) -> list[list[str]]:
    """Layers in run order, those with identical dense inputs (one tensor) in one group."""
    groups: list[list[str]] = []
    by_content: dict[tuple, list[list[str]]] = {}
    for path, rows in dense.items():
        candidates = by_content.setdefault((rows.shape, hash(rows.tobytes())), [])
        group = next((g for g in candidates if np.array_equal(dense[g[0]], rows)), None)
        if group is None:
            group = []
            candidates.append(group)
            groups.append(group)
        group.append(path)
    return groups


def merged(layer: eqx.Module, factors: Factors) -> eqx.Module:
    """The dense `layer` with weight u @ v and the factors' bias: the factorized layer's
    function in the dense layer's structure."""
    weight = np.asarray(factors.u, np.float64) @ np.asarray(factors.v, np.float64)
    weight = jnp.asarray(weight.reshape(layer.weight.shape), layer.weight.dtype)
    layer = eqx.tree_at(lambda l: l.weight, layer, weight)
    if layer.bias is None or factors.bias is None:
        return layer
    bias = jnp.asarray(np.asarray(factors.bias).reshape(layer.bias.shape), layer.bias.dtype)
    return eqx.tree_at(lambda l: l.bias, layer, bias)
