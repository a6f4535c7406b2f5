"""What truncating each layer costs, measured on calibration data, for a data-aware
`Budget`: from the layer's spectrum in its input-whitened basis (by="data"), or from the
estimated change of the calibration output (by="output").

Both read the dense model's inputs to every layer from one calibration pass; "output"
then adds one backward pass per probe.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._budget import log_retention_errors
from ._calibrate import calibrate
from ._select import attribute_path, stack_shape, weight_matrix
from ._trace import leaf_paths, output_positions, runner
from ._whitened import floored_eigh, reuse_last, shared_input_moments

OUTPUT_PROBES = 16
PROBE_CHUNK = 64  # samples per backward pass of the output probes, at most
PROBE_BYTES = 2**30  # the measured layers' inputs and outputs one such pass keeps, at most
_shared_eigh = reuse_last(floored_eigh)  # q/k/v: one decomposition of their input


def data_errors(
    model,
    layers: dict,
    calibration,
    max_rows: int,
    by: str,
    paths: list[str],
    *,
    key,
    probes: int = OUTPUT_PROBES,
) -> dict[str, np.ndarray]:
    """Each layer's error curve (`allocate_budget`) from the calibration data.

    Args:
        model: the dense model.
        layers: every layer of the model by path (`ModelIndex.layers`).
        calibration: a batch of model inputs or fn(model), as `factorize` takes it.
        max_rows: the most input rows per layer the calibration pass keeps.
        by: "data" (whitened spectra) or "output" (output probes).
        paths: the layers to measure.
        key: PRNG key of the output probes.
        probes: how many output probes (by="output").

    Returns:
        {path: errors}, errors[r - 1] the layer's error at rank r (a stack: summed over
        its slices).
    """
    svds = _whitened_svds(model, layers, calibration, max_rows, paths, vectors=by == "output")
    if by == "data":
        found: dict[str, list[np.ndarray]] = {}
        for (path, _), (_, s, _, _) in svds.items():
            found.setdefault(path, []).append(s)
        return {
            p: log_retention_errors(np.sqrt(sum(s**2 for s in parts))) for p, parts in found.items()
        }
    measured = {p: layers[p] for p in paths}
    return output_error_curves(model, measured, calibration, svds, probes=probes, key=key)


def _whitened_svds(
    model, layers: dict, calibration, max_rows: int, paths: list[str], *, vectors: bool
) -> dict:
    """{(path, slice or None): (U, s, P, mean)} with U·diag(s)·Vᵀ the SVD of W·S on the
    dense model's inputs (S = E·Λ^½, Λ the Ledoit-Wolf shrunk eigenvalues of the
    inputs' second moment), P = S⁻ᵀ·V = E·Λ^-½·V, and the inputs' mean for a layer
    with a bias (None without one), from one pass; without `vectors`, s alone (U, P
    and mean None)."""
    found = {}

    def fit(path, index, inputs, dense_inputs):
        layer = layers[path]
        weight = np.asarray(weight_matrix(layer), np.float64)
        weight = weight if index is None else weight[index]
        centre = getattr(layer, "bias", None) is not None
        mean, gram, *_ = shared_input_moments(inputs, centre=centre)
        basis, eig = _shared_eigh(gram)
        root = np.sqrt(shrunk_eigenvalues(inputs, mean, eig))
        if not vectors:
            s = np.linalg.svd((weight @ basis) * root, compute_uv=False)
            found[(path, index)] = (None, s, None, None)
            return
        u, s, vt = np.linalg.svd((weight @ basis) * root, full_matrices=False)
        found[(path, index)] = (u, s, (basis / root) @ vt.T, mean if centre else None)

    calibrate(
        model,
        {p: layers[p] for p in paths},
        fit,
        calibration,
        sequential=False,
        correct={},
        max_rows=max_rows,
        first_calls=True,
    )
    return found


def shrunk_eigenvalues(inputs, mean: np.ndarray, eig: np.ndarray) -> np.ndarray:
    """The eigenvalues of the Ledoit-Wolf estimate (1 - α)·C + α·(tr C / n)·I of the
    inputs' second moment C (eigenvalues `eig`, rows `inputs` less `mean`): its
    eigenvectors are C's. With N rows in n ≫ N dimensions (a classifier calibrated on a
    few hundred images) C's spectrum has at most N nonzero values, and an allocation
    read from it would take every other direction of W·S to cost nothing; α, near 0
    when N ≫ n, says how little N rows pin C down.

    Args:
        inputs: the (N, n) rows.
        mean: their mean (zeros when not centred).
        eig: C's eigenvalues (as `floored_eigh` floors them).

    Returns:
        The shrunk eigenvalues, in `eig`'s order.
    """
    x = np.asarray(inputs, np.float64) - mean
    rows, n = x.shape
    target = float(np.mean(eig))
    spread = float(np.sum((eig - target) ** 2))  # ‖C - target·I‖²_F
    if spread <= 0:
        return eig
    # (1/N²) Σ_k ‖x_k x_kᵀ - C‖²_F = (Σ_k ‖x_k‖⁴ - N‖C‖²_F) / N²
    noise = (float(np.sum(np.sum(x**2, axis=1) ** 2)) - rows * float(np.sum(eig**2))) / rows**2
    alpha = min(max(noise, 0.0), spread) / spread
    return (1 - alpha) * eig + alpha * target


def output_error_curves(
    model, layers: dict, calibration, svds: dict, *, probes: int = OUTPUT_PROBES, key
) -> dict[str, np.ndarray]:
    """For every layer and rank r, the squared change of the calibration output y = f(W)
    when that layer alone is truncated to rank r in its W·S basis, to first order:
    ‖J·ΔW_r‖², J the Jacobian of y in the layer's weight.

    For a probe z ~ N(0, I) shaped like y, E_z[⟨Jᵀz, ΔW_r⟩²] = ‖J·ΔW_r‖²; Jᵀz is the
    gradient of ⟨z, y⟩ in the weights, one backward pass for all layers. With ΔW_r =
    Σ_{i>r} s_i u_i v_iᵀ S⁻¹, ⟨G, ΔW_r⟩ = Σ_{i>r} s_i u_iᵀ G P_i. A layer with a bias
    is truncated on centred inputs (its bias takes the mean), so G - g_b x̄ᵀ replaces G.
    The curves average `probes` probes (relative noise about √(2 / probes)).

    A batch of inputs is differentiated a chunk of samples at a time (the effects add
    over chunks; `probe_chunk` sizes the chunks), so memory is one chunk's backward pass.
    A callable fn(model) is differentiated whole, so its memory grows with its data
    (chunking inside it would not help: the calibration pass fits each layer on its
    first call's inputs); pass a batch of inputs where that does not fit.
    """
    params, static = eqx.partition(model, eqx.is_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    position = {p: i for i, p in enumerate(leaf_paths(model))}
    names = ("weight", "bias")
    wanted = sorted(
        {position.get(attribute_path(path, name)) for path, _ in svds for name in names} - {None}
    )
    slot = {leaf: k for k, leaf in enumerate(wanted)}  # leaf index -> position in `wanted`
    grad_of = {  # each layer's (weight, bias or None) position among the gradients
        path: tuple(slot.get(position.get(attribute_path(path, name))) for name in names)
        for path, _ in svds
    }
    effects = {slice_: np.zeros((probes, len(svd[1]))) for slice_, svd in svds.items()}
    probe_keys = jax.random.split(key, probes)
    for piece, (run, args) in enumerate(_pieces(model, layers, calibration)):

        def output(chosen, run=run, args=args):
            new = list(leaves)
            for i, x in zip(wanted, chosen):
                new[i] = x
            return run(eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static), *args)

        y, pullback = jax.vjp(output, [leaves[i] for i in wanted])
        _check_differentiable(y)
        for k, probe_key in enumerate(probe_keys):
            (grads,) = pullback(_probe(y, jax.random.fold_in(probe_key, piece)))
            for (path, index), (u, s, p, mean) in svds.items():
                weight_at, bias_at = grad_of[path]
                g = _matrix(grads[weight_at], index, u, p)
                if mean is not None:
                    g_bias = np.asarray(grads[bias_at])
                    g = g - np.outer(g_bias if index is None else g_bias[index], mean)
                effects[(path, index)][k] += s * np.einsum("ai,ai->i", u, g @ p)
    curves: dict[str, np.ndarray] = {}
    for (path, _), c in effects.items():  # c[k, i]: component i's effect <z_k, J ΔW_i>
        tail = np.cumsum(c[:, ::-1], axis=1)[:, ::-1]  # Σ_{i >= r} (0-based)
        error = np.append(np.mean(tail[:, 1:] ** 2, axis=0), 0.0)  # rank r = 1 .. k
        curves[path] = curves.get(path, 0.0) + error
    return curves


def _pieces(model, layers: dict, calibration) -> list[tuple]:
    """(run, args) per piece of the calibration: `probe_chunk`-sample chunks of a batch,
    or a callable whole (`runner` tells them apart and checks them)."""
    run, args = runner(calibration, batched=True, argument="calibration")
    if not args:
        return [(run, args)]
    (batch,) = args
    size = probe_chunk(model, layers, batch)
    return [(run, (batch[i : i + size],)) for i in range(0, len(batch), size)]


def probe_chunk(model, layers: dict, batch) -> int:
    """Samples per backward pass of the output probes: at most `PROBE_CHUNK`, and few
    enough that the inputs and outputs of the measured `layers` on one chunk, which the
    backward pass keeps (as float32), take at most `PROBE_BYTES`; at least one.

    Args:
        model: the dense model.
        layers: the measured layers by path.
        batch: the calibration batch (leading axis: samples).

    Returns:
        The chunk size.
    """
    positions = output_positions(model, layers, batch[0])  # per sample, per slice
    values = sum(
        n * math.prod(stack_shape(layers[path])) * sum(weight_matrix(layers[path]).shape[-2:])
        for path, n in positions.items()
    )
    return int(np.clip(PROBE_BYTES // max(4 * values, 1), 1, PROBE_CHUNK))


def _matrix(grad, index, u, p) -> np.ndarray:
    """A weight gradient as the layer's (out, fan_in) matrix (one slice of a stack)."""
    g = np.asarray(grad, np.float64)
    g = g if index is None else g[index]
    return g.reshape(u.shape[0], p.shape[0])


def _probe(y, key):
    leaves, treedef = jax.tree_util.tree_flatten(y)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _check_differentiable(y) -> None:
    bad = [
        x.dtype for x in jax.tree_util.tree_leaves(y) if not jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if bad:
        raise ValueError(
            f"Budget(by='output') differentiates what calibration returns, but it returns "
            f"{bad[0]} values; make calibration return the model's float outputs (logits, "
            "embeddings), or use Budget(by='data')"
        )
