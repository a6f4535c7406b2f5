"""Fused epilogues: the activation that follows a factorized Linear, moved into the layer.

Where the compiler sees what follows a layer and can stop the model from applying it
(an `eqx.nn.MLP`'s `activation` / `final_activation`, an `eqx.nn.Lambda` after the
layer in an `eqx.nn.Sequential`), `fuse_epilogues` gives the `LowRankLinear` that
activation as its epilogue (`kernels.factored_matmul` applies it in the same op) and
leaves `applied_by_layer`, the identity, in its place. Paths and module types stay
as they were; `unfuse_epilogues` puts the functions back. Only the activations the
kernels know are fused, recognised by identity (`jax.nn.relu`, `jax.nn.gelu` with
its default tanh approximation, `jax.nn.silu`): the kernels' XLA path applies those
same functions, so the model computes the same thing either way.
"""

import equinox as eqx
import jax

from ._layers import LowRankLinear
from ._select import ROOT, key_path_to_str

EPILOGUES = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}


def applied_by_layer(x):
    """The identity: what an MLP or Lambda keeps where the layer before it applies the
    activation as its fused epilogue."""
    return x


def epilogue_name(fn) -> str | None:
    """The kernel activation name of `fn` ("relu", "gelu", "silu"), or None if unsupported."""
    return next((name for name, known in EPILOGUES.items() if fn is known), None)


def fuse_epilogues(model, paths) -> tuple[object, dict[str, str]]:
    """Fuse the supported activations that follow the `LowRankLinear` layers at `paths`.

    An MLP's hidden activation is fused only when every hidden layer is among `paths`
    (the MLP applies one activation to all of them); its final activation when the
    last layer is. Layers that already have an epilogue are left alone.

    Returns:
        (the new model, {path: activation name} of the layers given an epilogue).
    """
    fused: dict[str, str] = {}
    fusable = lambda path, layer: (
        path in paths and isinstance(layer, LowRankLinear) and layer.activation is None
    )

    def mlp(node: eqx.nn.MLP, path: str):
        layers = list(node.layers)
        names = [_child(path, f"layers.{i}") for i in range(len(layers))]
        acts = {"activation": node.activation, "final_activation": node.final_activation}
        for field, members in _activation_groups(len(layers)).items():
            name = epilogue_name(acts[field])
            if members and name and all(fusable(names[i], layers[i]) for i in members):
                for i in members:
                    layers[i], fused[names[i]] = _with_epilogue(layers[i], name), name
                acts[field] = applied_by_layer
        return _rebuilt_mlp(node, layers, acts)

    def sequential(node: eqx.nn.Sequential, path: str):
        layers = list(node.layers)
        for i in range(len(layers) - 1):
            name = _lambda_epilogue(layers[i + 1])
            here = _child(path, f"layers.{i}")
            if name and fusable(here, layers[i]):
                layers[i], fused[here] = _with_epilogue(layers[i], name), name
                layers[i + 1] = eqx.nn.Lambda(applied_by_layer)
        return eqx.tree_at(lambda s: s.layers, node, tuple(layers))

    return _map_containers(model, mlp, sequential), fused


def unfuse_epilogues(model):
    """The model with the epilogues `fuse_epilogues` set put back into their MLPs and
    Sequentials (the same function; layers holding no fused epilogue are untouched)."""

    def mlp(node: eqx.nn.MLP, path: str):
        layers = list(node.layers)
        acts = {"activation": node.activation, "final_activation": node.final_activation}
        for field, indices in _activation_groups(len(layers)).items():
            if acts[field] is not applied_by_layer:
                continue
            names = {getattr(layers[i], "activation", None) for i in indices}
            if len(names) != 1 or None in names:
                raise ValueError(
                    f"densify: {_child(path, field)} was fused into its layers, but they carry "
                    f"the epilogues {sorted(map(str, names))}, not one activation"
                )
            for i in indices:
                layers[i] = _with_epilogue(layers[i], None)
            acts[field] = EPILOGUES[names.pop()]
        return _rebuilt_mlp(node, layers, acts)

    def sequential(node: eqx.nn.Sequential, path: str):
        layers = list(node.layers)
        for i in range(1, len(layers)):
            fused = isinstance(layers[i], eqx.nn.Lambda) and layers[i].fn is applied_by_layer
            name = getattr(layers[i - 1], "activation", None)
            if fused and isinstance(layers[i - 1], LowRankLinear) and name:
                layers[i - 1] = _with_epilogue(layers[i - 1], None)
                layers[i] = eqx.nn.Lambda(EPILOGUES[name])
        return eqx.tree_at(lambda s: s.layers, node, tuple(layers))

    return _map_containers(model, mlp, sequential)


def _map_containers(model, mlp, sequential, prefix: str = ""):
    """Apply mlp(node, path) to every eqx.nn.MLP and sequential(node, path) to every
    eqx.nn.Sequential (innermost first), by dotted path."""
    is_container = lambda x: isinstance(x, (eqx.nn.MLP, eqx.nn.Sequential))

    def visit(key_path, node):
        path = key_path_to_str(key_path)
        if prefix:  # inside a Sequential's layers
            path = f"{prefix}.{path}" if key_path else prefix
        if isinstance(node, eqx.nn.MLP):
            return mlp(node, path)
        if isinstance(node, eqx.nn.Sequential):
            inner = _map_containers(node.layers, mlp, sequential, _child(path, "layers"))
            return sequential(eqx.tree_at(lambda s: s.layers, node, inner), path)
        return node

    return jax.tree_util.tree_map_with_path(visit, model, is_leaf=is_container)


def _activation_groups(n_layers: int) -> dict[str, list[int]]:
    """Which of an MLP's layers each of its activation fields follows."""
    return {"activation": list(range(n_layers - 1)), "final_activation": [n_layers - 1]}


def _child(path: str, name: str) -> str:
    return name if path == ROOT else f"{path}.{name}"


def _lambda_epilogue(module) -> str | None:
    return epilogue_name(module.fn) if isinstance(module, eqx.nn.Lambda) else None


def _with_epilogue(layer: LowRankLinear, activation: str | None) -> LowRankLinear:
    return LowRankLinear(
        layer.u,
        layer.v,
        layer.bias,
        impl=layer.impl,
        activation=activation,
        inner_activation=layer.inner_activation,
    )


def _rebuilt_mlp(node: eqx.nn.MLP, layers: list, acts: dict) -> eqx.nn.MLP:
    before = (*node.layers, node.activation, node.final_activation)
    after = (*layers, acts["activation"], acts["final_activation"])
    if all(a is b for a, b in zip(before, after)):
        return node
    return eqx.tree_at(
        lambda m: (m.layers, m.activation, m.final_activation),
        node,
        (tuple(layers), acts["activation"], acts["final_activation"]),
    )
