"""Parameter and FLOP counts per layer and in total, for dense and factorized models."""

from dataclasses import dataclass

import equinox as eqx
import jax
import numpy as np

from ._cost import layer_costs
from ._index import select
from ._select import LOWRANK_TYPES, is_layer
from ._table import render_table, shape_str
from ._trace import Example, output_positions


@dataclass(frozen=True)
class LayerSummary:
    """One layer; a stacked one (`stack_dims` leading axes of `shape`) counts every slice;
    `epilogue` is the activation a `LowRankLinear` applies itself (fused), or None."""

    path: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    params: int
    flops: int
    stack_dims: int = 0
    epilogue: str | None = None


@dataclass(frozen=True)
class Summary:
    """What `lowrank.summary` returns: per-layer rows plus totals; prints as a table.

    Attributes:
        layers: one `LayerSummary` (path, kind, shape, rank, params, flops, epilogue)
            per layer; a fused epilogue prints in the type column (`LowRankLinear+relu`).
        total_params: every inexact array of the model, layers or not.
        flops_per_position: True when no example was given (FLOPs count each layer once).
    """

    layers: list[LayerSummary]
    total_params: int
    flops_per_position: bool

    @property
    def layer_params(self) -> int:
        return sum(l.params for l in self.layers)

    @property
    def flops(self) -> int:
        return sum(l.flops for l in self.layers)

    def __str__(self) -> str:
        header = ["path", "type", "shape", "rank", "params", "FLOPs"]
        rows = [
            [
                l.path,
                l.kind if l.epilogue is None else f"{l.kind}+{l.epilogue}",
                shape_str(l.shape, l.stack_dims),
                "dense" if l.rank is None else str(l.rank),
                f"{l.params:,}",
                f"{l.flops:,}",
            ]
            for l in self.layers
        ]
        footer = [
            ["layers total", "", "", "", f"{self.layer_params:,}", f"{self.flops:,}"],
            ["model total", "", "", "", f"{self.total_params:,}", ""],
        ]
        lines = render_table(header, rows, footer)
        if self.flops_per_position:
            lines.append(
                "note: FLOPs count each layer once, a conv per output position (pass example= for totals)"
            )
        return "\n".join(lines)


def summary(model, *, example: Example | None = None) -> Summary:
    """Count parameters and FLOPs (multiply + add, one example) of every Linear/Conv layer.

    FLOPs depend on how often a layer runs per example (conv output positions, a
    Linear vmapped over tokens): pass `example` (one unbatched input array or
    ShapeDtypeStruct, or a callable fn(model) running one example) to count them;
    without it each layer counts once (a conv: per output position). A stacked layer
    (weights (L, out, in) run by a scan) counts all L slices.

    Args:
        model: an Equinox model, dense or factorized (never modified).
        example: one unbatched input (array or ShapeDtypeStruct), or a callable
            fn(model) running one example, to count every position; None: count once.

    Returns:
        A `Summary`: per-layer rows, the layers' and the model's totals; prints as a table.
    """
    index = select(model, fn_name="summary")
    layers = {p: l for p, l in index.layers.items() if is_layer(l)}
    positions = {}
    if example is not None:
        positions = output_positions(model, layers, example)  # per slice of a stacked layer
    rows = []
    for e in index.entries:
        if not is_layer(e.layer) or not e.shape:
            continue  # unsupported modules are not counted; a tied weight counts where it lives
        rank = e.layer.rank if isinstance(e.layer, LOWRANK_TYPES) else None
        _, params, _, flops = layer_costs(
            e.shape, rank, bias=e.bias, positions=positions.get(e.path), stack_dims=e.stack_dims
        )
        epilogue = getattr(e.layer, "activation", None)
        rows.append(
            LayerSummary(e.path, e.kind, e.shape, rank, params, flops, e.stack_dims, epilogue)
        )
    arrays = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    total = int(sum(np.prod(a.shape) for a in arrays))
    return Summary(rows, total, flops_per_position=example is None)
