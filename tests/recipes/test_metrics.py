import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lowrank
from recipes import metrics


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_losses_perplexity_and_bits_per_byte_by_hand():
    # Uniform logits over 4 tokens: every loss is ln 4, perplexity 4.
    losses = metrics.token_losses(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32))
    np.testing.assert_allclose(losses, np.full((2, 3), math.log(4)), rtol=1e-6)
    np.testing.assert_allclose(metrics.perplexity(losses), 4.0, rtol=1e-6)
    # p(target) = 1/2 then 1/4: losses ln 2 and ln 4 (1 and 2 bits) over 6 bytes.
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]))
    losses = metrics.token_losses(logits, jnp.array([0, 1]))
    np.testing.assert_allclose(losses, [math.log(2), math.log(4)], rtol=1e-6)
    np.testing.assert_allclose(metrics.perplexity(losses), math.sqrt(8), rtol=1e-6)
    np.testing.assert_allclose(metrics.bits_per_byte(losses, 6), 3 / 6, rtol=1e-6)


def test_token_losses_match_float64_reference():
    logits = np.asarray(jr.normal(jr.key(0), (5, 7)))
    targets = np.array([0, 6, 3, 3, 1])
    expected = -_log_softmax(logits)[np.arange(5), targets]
    np.testing.assert_allclose(metrics.token_losses(logits, targets), expected, rtol=1e-5)


def test_kl_top1_and_accuracy_by_hand():
    p = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    q = np.array([[0.25, 0.75], [0.6, 0.4], [0.5, 0.5]])
    expected_kl = np.mean(np.sum(p * np.log(p / q), axis=-1))
    kl = metrics.kl_divergence(np.log(p) + 3.0, np.log(q) - 1.0)  # shifts cancel
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-5)
    np.testing.assert_allclose(metrics.kl_divergence(np.log(p), np.log(p)), 0.0, atol=1e-7)
    # argmax: dense 0 (tie -> first), 0, 1; compressed 1, 0, 0 -> one agreement in three.
    np.testing.assert_allclose(metrics.top1_agreement(np.log(p), np.log(q)), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics.accuracy(np.log(p), np.array([0, 1, 1])), 2 / 3, rtol=1e-6)


def test_cosine_similarity_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 1.0], [0.0, -5.0], [6.0, 8.0]])
    expected = np.mean([1 / math.sqrt(2), -1.0, 1.0])
    np.testing.assert_allclose(metrics.cosine_similarity(a, b), expected, rtol=1e-6)


def test_nearest_neighbour_agreement_by_hand():
    dense = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    # Nearest others under dense: 1, 0, 3, 2. Item 3 moves next to item 1 (cosine
    # 0.991 against 0.970 to item 0 and 0.243 to item 2): 1, 0, 3, 1.
    compressed = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.8, 0.2]])
    np.testing.assert_allclose(
        metrics.nearest_neighbour_agreement(dense, compressed), 3 / 4, rtol=1e-6
    )
    np.testing.assert_allclose(metrics.nearest_neighbour_agreement(dense, 2.0 * dense), 1.0)


def test_metric_shape_errors_name_arguments():
    with pytest.raises(ValueError, match="dense_logits and compressed_logits must have the same"):
        metrics.kl_divergence(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="dense and compressed must have the same shape"):
        metrics.cosine_similarity(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"n >= 2 items.*embed at least two"):
        metrics.nearest_neighbour_agreement(np.ones((1, 3)), np.ones((1, 3)))
    with pytest.raises(ValueError, match="one label per row of logits"):
        metrics.accuracy(np.zeros((4, 3)), np.zeros((5,), np.int32))
    with pytest.raises(ValueError, match="n_bytes must be a positive int"):
        metrics.bits_per_byte(np.ones(3), 0)
    with pytest.raises(ValueError, match="repeats must be a positive int"):
        metrics.wall_time(lambda: None, repeats=0)


def test_param_count_dense_and_factorized():
    model = eqx.nn.MLP(8, 4, 16, 1, key=jr.key(0))  # 8*16+16 + 16*4+4
    assert metrics.param_count(model) == 8 * 16 + 16 + 16 * 4 + 4
    low = lowrank.factorize(model, rank=2, target=["layers.0"], init="random", key=jr.key(1))
    assert metrics.param_count(low) == 2 * (8 + 16) + 16 + 16 * 4 + 4


def test_wall_time_is_the_median_of_timed_calls():
    calls = []
    seconds = metrics.wall_time(lambda x: calls.append(x) or jnp.ones(()), 1.0, repeats=3)
    assert len(calls) == 4  # one warm-up, three timed
    assert 0.0 <= seconds < 1.0
