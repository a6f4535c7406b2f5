"""Row-wise ops whose `jax.vmap` runs the 2-D kernel on the whole batch.

Equinox layers see one example at a time, and the default batching of a `pallas_call`
would add a grid axis with one-row blocks. Every kernel here is row-wise in its leading
"row" arguments (x, or g and t) and shared in its weights, so a vmap over the rows is
the same op on the batch flattened into rows. Nested vmaps flatten one level each.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def rowwise(fn: Callable, *, n_rows: int, fallback: Callable) -> Callable:
    """`fn(*rows, *weights)` (rows 2-D, outputs 2-D) with a flattening vmap rule.

    When a weight is batched too (an ensemble of layers), there is no shared weight to
    run one kernel with, and the vmap goes through `fallback`, an XLA twin of `fn`.
    """
    op = jax.custom_batching.custom_vmap(fn)

    @op.def_vmap
    def _rule(axis_size, in_batched, *args):
        if any(in_batched[n_rows:]):
            axes = [0 if batched else None for batched in in_batched]
            out = jax.vmap(fallback, in_axes=axes)(*args)
        else:
            rows = [
                r if batched else jnp.broadcast_to(r, (axis_size, *r.shape))
                for r, batched in zip(args[:n_rows], in_batched)
            ]
            out = op(*[r.reshape(-1, r.shape[-1]) for r in rows], *args[n_rows:])
            out = jax.tree.map(lambda o: o.reshape(axis_size, -1, o.shape[-1]), out)
        return out, jax.tree.map(lambda _: True, out)

    return op
