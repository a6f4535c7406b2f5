"""Parameter and FLOP counts per layer and in total, for dense and factorized models."""

from dataclasses import dataclass

import equinox as eqx
import jax
import numpy as np

from ._layers import LowRankConv, LowRankLinear
from ._plan import layer_costs, per_slice_positions, shape_str
from ._select import check_is_model, stack_shape, walk_layers
from ._trace import Example, output_positions


@dataclass(frozen=True)
class LayerSummary:
    """One layer; a stacked one (`stack_dims` leading axes of `shape`) counts every slice."""

    path: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    params: int
    flops: int
    stack_dims: int = 0


@dataclass(frozen=True)
class Summary:
    """What `lowrank.summary` returns: per-layer rows plus totals; prints as a table."""

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
        rows = [["path", "type", "shape", "rank", "params", "FLOPs"]]
        for l in self.layers:
            rank = "dense" if l.rank is None else str(l.rank)
            shape = shape_str(l.shape, l.stack_dims)
            rows.append([l.path, l.kind, shape, rank, f"{l.params:,}", f"{l.flops:,}"])
        rows.append(["layers total", "", "", "", f"{self.layer_params:,}", f"{self.flops:,}"])
        rows.append(["model total", "", "", "", f"{self.total_params:,}", ""])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.flops_per_position:
            lines.append("note: FLOPs count each layer once, a conv per output position (pass example= for totals)")
        return "\n".join(lines)


def summary(model, *, example: Example | None = None) -> Summary:
    """Count parameters and FLOPs (multiply + add, one example) of every Linear/Conv layer.

    FLOPs depend on how often a layer runs per example (conv output positions, a
    Linear vmapped over tokens): pass `example` (one unbatched input array or
    ShapeDtypeStruct, or a callable fn(model) running one example) to count them;
    without it each layer counts once (a conv: per output position). A stacked layer
    (weights (L, out, in) run by a scan) counts all L slices.
    """
    check_is_model(model, "summary")
    layers = walk_layers(model)
    positions = {}
    if example is not None:
        by_path = dict(layers)
        positions = per_slice_positions(output_positions(model, by_path, example), by_path)
    rows = []
    for path, layer in layers:
        if not (isinstance(layer, (LowRankLinear, LowRankConv)) or eqx.is_array(layer.weight)):
            continue  # a tied weight (eqx.nn.Shared) is counted where it lives
        lowrank = isinstance(layer, (LowRankLinear, LowRankConv))
        lead = stack_shape(layer)
        shape = lead + layer.dense_shape if lowrank else tuple(int(d) for d in layer.weight.shape)
        rank = layer.rank if lowrank else None
        _, params, _, flops = layer_costs(
            shape, rank, bias=layer.bias is not None, positions=positions.get(path),
            stack_dims=len(lead),
        )  # fmt: skip
        rows.append(LayerSummary(path, type(layer).__name__, shape, rank, params, flops, len(lead)))
    arrays = jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))
    total = int(sum(np.prod(a.shape) for a in arrays))
    return Summary(rows, total, flops_per_position=example is None)
