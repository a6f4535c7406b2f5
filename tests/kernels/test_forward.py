"""The fused forward kernel (interpret mode) vs float64, on awkward shapes and tilings."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import _dispatch, _forward

from ._reference import UNMASKED_EDGES_OK, assert_close, factors, forward_and_vjp


def _run(x, a, b, bias, **options):
    return jax.jit(lambda *args: _forward.fused_forward(*args, **options))(x, a, b, bias)


@pytest.mark.parametrize("masked_ops", [True, pytest.param(False, marks=UNMASKED_EDGES_OK)])
def test_awkward_shape_with_t_saved(masked_ops):
    x, a, b, bias = factors(37, 129, 5, 70)
    y, t = _run(x, a, b, bias, activation="gelu", save_t=True, masked_ops=masked_ops)
    want, _ = forward_and_vjp(x, a, b, bias, "gelu", np.zeros((37, 70)))
    assert_close(y, want, 1e-5)
    assert_close(t, np.asarray(x, np.float64) @ np.asarray(a, np.float64), 1e-5)


@pytest.mark.parametrize("split", [1, 3])
def test_programs_sharing_columns(split):
    # 5 column tiles of 16 shared by `split` programs: the last program runs past N.
    x, a, b, bias = factors(20, 24, 3, 70, bias=False)
    tiles = _dispatch.Tiles(bm=16, bk=16, bn=16, r_pad=16, split=split)
    y = _run(x, a, b, bias, activation="relu", tiles=tiles)
    want, _ = forward_and_vjp(x, a, b, bias, "relu", np.zeros((20, 70)))
    assert_close(y, want, 1e-5)


@settings(max_examples=3)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    data=st.data(),
    activation=st.sampled_from(["relu", "gelu", "silu", None]),
    bias=st.booleans(),
)
def test_random_shapes(m, k, n, data, activation, bias):
    r = data.draw(st.integers(1, min(k, n)), label="r")
    x, a, b, c = factors(m, k, r, n, bias=bias)
    want, _ = forward_and_vjp(x, a, b, c, activation, np.zeros((m, n)))
    assert_close(_run(x, a, b, c, activation=activation), want, 1e-5)
