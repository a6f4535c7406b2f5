"""Sequential calibration: each layer is fitted on the inputs the partly factorized model
gives it, against the dense model's outputs; float64 references built with numpy SVDs."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import enable_x64

import lowrank

from ._models import CNN, Block

KEY = jax.random.key(0)


class Recorder:
    """A spectral init that keeps every LayerProblem it is handed."""

    calibration = "required"

    def __init__(self):
        self.seen = {}

    def __call__(self, problem, *, key):
        self.seen[problem.path] = problem
        return lowrank.Spectral()(problem, key=key)


def _truncated(weight, rank):
    """Rank-r truncated SVD of a conv/linear weight, float64 (numpy)."""
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    U, S, Vt = np.linalg.svd(w, full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vt[:rank]).reshape(weight.shape)


def _to64(tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, tree
    )


def test_each_layer_sees_the_inputs_of_the_factorized_layers_before_it():
    model = CNN(key=KEY)
    xs = jax.random.normal(KEY, (2, 3, 8, 8))
    init = Recorder()
    lowrank.factorize(model, rank=2, init=init, calibration=xs)
    assert init.seen["convs.0"].dense_inputs is None  # the first layer sees the raw input
    p = init.seen["convs.1"]
    with enable_x64(True):
        conv0, conv1 = _to64(model.convs[0]), _to64(model.convs[1])
        conv0_low = eqx.tree_at(lambda c: c.weight, conv0, jnp.asarray(_truncated(conv0.weight, 2)))
        x64 = jnp.asarray(xs, jnp.float64)

        def conv1_rows(first):  # conv1's pre-bias output on relu(first(x)), rows (N, H, W)
            out = jax.vmap(lambda x: conv1(jax.nn.relu(first(x))))(x64) - conv1.bias
            return np.moveaxis(np.asarray(out), 1, -1).reshape(-1, 24)

        want_dense, want_seen = conv1_rows(conv0), conv1_rows(conv0_low)
    w1 = np.asarray(p.weight, np.float64)
    np.testing.assert_allclose(np.asarray(p.dense_inputs, np.float64) @ w1.T, want_dense, atol=2e-5)
    np.testing.assert_allclose(np.asarray(p.inputs, np.float64) @ w1.T, want_seen, atol=2e-5)
    assert np.abs(want_seen - want_dense).max() > 0.01  # the two really differ


def test_sequential_calibration_runs_the_calibration_callable_once():
    runs = []
    xs = jax.random.normal(KEY, (3, 6, 32))

    def calibrate(m):
        jax.debug.callback(lambda: runs.append(1))
        return jax.vmap(m)(xs)

    init = Recorder()
    lowrank.factorize(Block(key=KEY), rank=4, init=init, calibration=calibrate)
    projections = [f"attn.{p}_proj" for p in ("query", "key", "value")]
    assert all(init.seen[p].dense_inputs is None for p in projections)  # first group: dense run
    assert all(
        init.seen[p].dense_inputs is not None for p in ("attn.output_proj", "mlp.fc1", "mlp.fc2")
    )
    assert len(runs) == 1  # one pass over the data, whatever the number of layer groups


def test_sequential_fit_of_the_last_layer_is_never_worse():
    """2-layer MLP: the first layer's factors are the same either way; sequential fits
    the head by least squares on the inputs it really gets, so the network's output error
    on the calibration data cannot exceed the non-sequential one."""
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(64, 3)) @ rng.normal(size=(3, 8)) + rng.normal(size=(64, 8)))
    model = eqx.nn.MLP(8, 6, 16, 1, key=KEY)
    errors = {}
    for sequential in (False, True):
        low = lowrank.factorize(
            model, rank=2, init="whitened", calibration=xs, sequential=sequential
        )
        with enable_x64(True):
            got = jax.vmap(_to64(low))(jnp.asarray(xs, jnp.float64))
            want = jax.vmap(_to64(model))(jnp.asarray(xs, jnp.float64))
            errors[sequential] = float(jnp.sum((got - want) ** 2) / jnp.sum(want**2))
    assert errors[True] <= errors[False] * (1 + 1e-5)
    assert errors[True] < 0.9 * errors[False]  # and here it helps clearly


def test_unfactorized_layers_downstream_get_their_mean_output_back():
    """Only convs.0 is factorized: convs.1 and the head (dense, with biases) see shifted
    inputs and are bias-corrected, so their mean outputs on the calibration data are the
    dense model's (float64 forward passes); convs.2 has no bias; sequential=False and
    the input model leave every bias alone."""
    model = CNN(key=KEY)
    xs = jax.random.normal(jax.random.key(1), (16, 3, 8, 8))
    biases = [np.asarray(model.convs[1].bias), np.asarray(model.head.bias)]
    low = lowrank.factorize(model, rank=2, init="whitened", target="convs.0", calibration=xs)
    assert isinstance(low.convs[0], lowrank.LowRankConv) and isinstance(low.convs[1], eqx.nn.Conv2d)

    def means(m):  # per-channel mean of convs.1's output, mean of the head's output
        with enable_x64(True):
            m, x64 = _to64(m), jnp.asarray(xs, jnp.float64)
            z1 = jax.vmap(lambda x: m.convs[1](jax.nn.relu(m.convs[0](x))))(x64)
            return np.asarray(z1.mean((0, 2, 3))), np.asarray(jax.vmap(m)(x64).mean(0))

    (dense_z1, dense_out), (low_z1, low_out) = means(model), means(low)
    np.testing.assert_allclose(low_z1, dense_z1, atol=1e-4)
    np.testing.assert_allclose(low_out, dense_out, atol=1e-4)
    plain = lowrank.factorize(
        model, rank=2, init="whitened", target="convs.0", calibration=xs, sequential=False
    )
    plain_z1, plain_out = means(plain)
    assert np.abs(plain_z1 - dense_z1).max() > 100 * np.abs(low_z1 - dense_z1).max()
    np.testing.assert_array_equal(plain.convs[1].bias, biases[0])
    np.testing.assert_array_equal(model.convs[1].bias, biases[0])
    np.testing.assert_array_equal(model.head.bias, biases[1])
