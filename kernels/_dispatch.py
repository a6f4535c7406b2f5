"""Which implementation runs a factored matmul, and with which tiles.

`impl="auto"` consults `MEASURED`: a small table, filled by hand from
`bench/kernels.py` runs, of the shape classes where the fused Pallas kernel was
measured faster than XLA's `(x @ a) @ b` on a device. Anything not in the table runs
XLA, so auto is never a path measured slower than XLA. Nor does auto take Pallas where
a `pallas_call` cannot run: on arrays sharded over Explicit mesh axes.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# device-kind substring -> {(dtype, M class, K=N class, r class): ops measured faster
# as Pallas}; ops are "fwd" (forward kernel) and "bwd" (epilogue-gradient kernel).
# Empty until a GPU run of `bench/gpu_check.sh` supplies measurements.
MEASURED: dict[str, dict[tuple[str, str, str, str], frozenset[str]]] = {}

PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Tiles(NamedTuple):
    """Tile sizes and launch options of the kernels.

    bm rows, bk and bn columns per step of the K and N loops, the rank padded to
    r_pad; `split` programs share the N columns of a row block (more parallelism for
    few rows, at the price of recomputing x @ a once per program).
    """

    bm: int
    bk: int
    bn: int
    r_pad: int
    split: int
    num_warps: int | None = None
    num_stages: int | None = None


def platform() -> str:
    """The default backend: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def shape_class(m: int, k: int, n: int, r: int) -> tuple[str, str, str]:
    """Coarse buckets of (M, max(K, N), r) that the measured table is keyed by."""
    m_cls = "m<=16" if m <= 16 else "m<=1024" if m <= 1024 else "m>1024"
    kn_cls = "kn<=1024" if max(k, n) <= 1024 else "kn>1024"
    r_cls = "r<=64" if r <= 64 else "r>64"
    return m_cls, kn_cls, r_cls


def _measured_for_device() -> dict[tuple[str, str, str, str], frozenset[str]]:
    kind = jax.devices()[0].device_kind
    for name, table in MEASURED.items():
        if name in kind:
            return table
    return {}


def auto_may_use_pallas() -> bool:
    """False where no measurement favours Pallas: auto is then plain XLA throughout."""
    return bool(_measured_for_device())


def explicitly_sharded(arrays) -> list[str]:
    """The shardings of those `arrays` that are split over Explicit mesh axes (a
    `pallas_call` takes only unsharded arrays, or the per-device blocks of a shard_map)."""
    specs = [jax.typeof(a).sharding.spec for a in arrays]
    return [str(spec) for spec in specs if any(p is not None for p in spec)]


def use_pallas(op: str, impl: str, m: int, k: int, n: int, r: int, dtype, *arrays) -> bool:
    """Whether `op` ("fwd" or "bwd") runs as a Pallas kernel for this shape and for
    these `arrays` (the kernel's operands: XLA if any is explicitly sharded)."""
    if m == 0 or impl == "xla":
        return False
    sharded = explicitly_sharded(arrays)
    if impl == "pallas" and sharded:
        raise ValueError(
            f"impl='pallas' cannot run on arrays sharded over Explicit mesh axes (got "
            f"{', '.join(sharded)}): a pallas_call needs whole arrays; use impl='xla' (or "
            "'auto', which takes XLA there), or run it per shard inside "
            "jax.shard_map(..., check_vma=False)"
        )
    if impl == "pallas":
        return True
    if sharded:
        return False
    key = (jnp.dtype(dtype).name, *shape_class(m, k, n, r))
    return op in _measured_for_device().get(key, frozenset())


def tiles(m: int, n: int, r: int) -> Tiles:
    """Tiles for the current backend; interpret mode uses small ones so tests see many."""
    p = platform()
    r_pow2 = max(16, 1 << (r - 1).bit_length())  # Triton tiles are powers of two >= 16
    if p == "gpu":
        bm = 16 if m <= 16 else 64 if r <= 128 else 32
        gm = -(-m // bm)
        chunks = -(-n // 128)
        split = max(1, min(chunks, -(-264 // gm)))  # ~2 programs per SM on an H100
        return Tiles(bm, 64, 128, r_pow2, split, num_warps=8 if r > 64 else 4, num_stages=3)
    if p == "tpu":
        return Tiles(128, 256, 256, -(-r // 128) * 128, 1)
    return Tiles(16, 32, 32, r_pow2, 2)


def masked_ops() -> bool:
    """Whether kernels mask their memory ops (Triton, interpret) or their values (TPU)."""
    return platform() != "tpu"


def launch_options(t: Tiles) -> dict:
    """`pallas_call` options: Triton on GPU, Mosaic on TPU, interpret mode elsewhere."""
    p = platform()
    if p == "gpu":
        return {
            "compiler_params": plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
        }
    if p == "tpu":
        return {}
    return {"interpret": True}
