"""Dispatch: auto takes Pallas only where the measured table says so; tiles suit Triton."""

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels import _dispatch


def _is_pow2(v):
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize(
    "shape, want",
    [
        ((1, 1024, 1024, 16), ("m<=16", "kn<=1024", "r<=64")),
        ((17, 1024, 1025, 64), ("m<=1024", "kn>1024", "r<=64")),
        ((4096, 4096, 4096, 65), ("m>1024", "kn>1024", "r>64")),
    ],
)
def test_shape_class_buckets(shape, want):
    assert _dispatch.shape_class(*shape) == want


def test_auto_uses_xla_without_measurements():
    assert not _dispatch.auto_may_use_pallas()
    assert not _dispatch.use_pallas("fwd", "auto", 4096, 4096, 4096, 16, "bfloat16")
    assert _dispatch.use_pallas("fwd", "pallas", 4096, 4096, 4096, 16, "bfloat16")
    assert not _dispatch.use_pallas("fwd", "xla", 4096, 4096, 4096, 16, "bfloat16")


def test_auto_follows_the_measured_table(monkeypatch):
    kind = jax.devices()[0].device_kind
    table = {("bfloat16", "m>1024", "kn>1024", "r<=64"): frozenset({"fwd"})}
    monkeypatch.setitem(_dispatch.MEASURED, kind, table)
    assert _dispatch.auto_may_use_pallas()
    assert _dispatch.use_pallas("fwd", "auto", 4096, 4096, 4096, 64, "bfloat16")
    assert not _dispatch.use_pallas("bwd", "auto", 4096, 4096, 4096, 64, "bfloat16")
    assert not _dispatch.use_pallas("fwd", "auto", 4096, 4096, 4096, 64, "float32")
    assert not _dispatch.use_pallas("fwd", "auto", 16, 4096, 4096, 64, "bfloat16")
    assert not _dispatch.use_pallas("fwd", "auto", 4096, 4096, 4096, 128, "bfloat16")
    assert not _dispatch.use_pallas("fwd", "pallas", 0, 4096, 4096, 64, "bfloat16")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="interpret mode is the CPU path")
def test_interpret_mode_on_cpu():
    assert _dispatch.launch_options(_dispatch.tiles(8, 8, 2)) == {"interpret": True}
    assert _dispatch.masked_ops()


@given(m=st.integers(1, 20000), n=st.integers(1, 20000), r=st.integers(1, 512))
def test_gpu_tiles_are_triton_friendly(m, n, r):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatch, "platform", lambda: "gpu")
        t = _dispatch.tiles(m, n, r)
        options = _dispatch.launch_options(t)
    assert all(_is_pow2(v) and v >= 16 for v in (t.bm, t.bk, t.bn, t.r_pad))
    assert t.r_pad >= r
    assert 1 <= t.split <= -(-n // t.bn)
    assert t.num_warps in (4, 8)
    assert "compiler_params" in options


def test_tpu_tiles_pad_rank_to_lanes(monkeypatch):
    monkeypatch.setattr(_dispatch, "platform", lambda: "tpu")
    t = _dispatch.tiles(4096, 4096, 130)
    assert t.r_pad == 256 and t.bm % 8 == 0 and t.bk % 128 == 0 and t.bn % 128 == 0
    assert not _dispatch.masked_ops()
    assert _dispatch.launch_options(t) == {}
