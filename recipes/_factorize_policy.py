"""Factorization policies: which layers of a recipe's model become low-rank, and how.

`run.py` calls `check_policy(config)` before building anything, `check_rank(model,
config)` on the freshly built dense model (a budget that cannot be met fails there,
before training), and `apply_policy(model, config)` to factorize: before training, or
after `factorize.warmup_steps` dense steps from the hybrid warm-up hook. Policies:

- "none": train the dense model.
- "khodak" (Khodak et al. 2021): every conv inside the residual stages of a ResNet,
  shortcuts included; the stem conv and the classifier stay dense.
- "pufferfish" (Wang et al. 2021): only the last ResNet stage, where most parameters live.
- "efficientnet": the 1x1 expand and project convs of every MBConv block and the 1x1
  head conv; depthwise and squeeze-excitation convs stay dense.

`factorize.rank` is any `lowrank` rank rule (an int, a fraction of full rank,
"energy:0.9"), "params:0.3" / "flops:0.3" for a global `lowrank.Budget`, or a stable
rank rule (Cuttlefish, Wang et al. 2023): "stable" gives each layer the stable rank
‖W‖²_F/‖W‖²_2 of its weights when factorized, rounded up; "stable:scaled" multiplies
it by full rank / stable rank of the layer's initial weights (capped at full rank),
which undoes the low stable rank of random initializations.
"""

import functools
import re
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree

import lowrank

from ._policy_ranks import (
    STABLE_RULES,
    _rank_rule,
    check_rank_text,
    target_layers,
)
from ._policy_ranks import stable_rank as stable_rank
from ._policy_ranks import stable_ranks as stable_ranks
from .config import Config, ConfigError

# policy -> (model family it applies to, regex fullmatched against dotted layer paths)
POLICY_TARGETS = {
    "khodak": ("resnet", r"layers\.\d+\.blocks\.\d+\.(conv\d|downsample\.conv)"),
    "pufferfish": ("resnet", r"layers\.3\.blocks\.\d+\.(conv\d|downsample\.conv)"),
    "efficientnet": (
        "efficientnet",
        r"stages\.\d+\.blocks\.\d+\.(expand|project)\.conv|head\.conv",
    ),
}

# The activation after each selected layer, for function-aware inits (nkp, whitened)
# without calibration data (with it, `normalized_activations` folds in the BatchNorm).
# ResNet convs feed BatchNorm then ReLU (after the residual sum for the last conv of a
# block): lowrank's default. EfficientNet's expand and head convs feed BatchNorm then
# SiLU; its project convs are linear bottlenecks.
POLICY_ACTIVATIONS = {
    "khodak": None,
    "pufferfish": None,
    "efficientnet": {
        r".*\.expand\.conv": jax.nn.silu,
        r".*\.project\.conv": None,
        "head.conv": jax.nn.silu,
    },
}


def module_at(model: PyTree, path: str):
    """The submodule at a dotted path (attributes and sequence indices).

    Args:
        model: the model.
        path: a dotted path as `lowrank.select` and plans name layers ("layers.0.conv1").

    Returns:
        The submodule (or leaf) at `path`.
    """
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _normalized(scale, shift, activation, z):
    """activation(BatchNorm(z)) for rows z of conv outputs (channels last)."""
    y = z * scale + shift
    return y if activation is None else activation(y)


def normalized_activations(model: PyTree, state: eqx.nn.State, pattern: str) -> dict:
    """{path: σ} for every selected conv that a BatchNorm follows: what the network does
    to the conv's output next, the BatchNorm at its inference statistics (read off the
    layer itself in `state`), then the activation right after it (ResNet: ReLU after
    bnK when conv{K+1} follows in the block, none before a residual sum; EfficientNet:
    its ConvBNAct's activation). Calibrated inits then fit what the network computes.
    The per-channel constants need calibration data: NKP's Gaussian closed forms take
    one scalar σ for all rows.

    Args:
        model: the model (BatchNorm layers sit next to the convs they follow).
        state: its `eqx.nn.State`, holding the BatchNorm running statistics.
        pattern: regex fullmatched against dotted layer paths (a `POLICY_TARGETS` one).

    Returns:
        {escaped path: σ} for `lowrank.factorize(activations=...)`; convs without a
        BatchNorm after them are left out.
    """
    out = {}
    for path in target_layers(model, pattern):
        parent_path, _, name = path.rpartition(".")
        parent = module_at(model, parent_path)
        index = name.removeprefix("conv")
        bn = getattr(parent, "bn" + index, None)
        if not isinstance(bn, eqx.nn.BatchNorm):
            continue
        if hasattr(parent, "activation"):
            activation = parent.activation
        elif index and hasattr(parent, f"conv{int(index) + 1}"):
            activation = jax.nn.relu
        else:
            activation = None
        probe = jnp.stack([jnp.zeros(bn.input_size), jnp.ones(bn.input_size)], axis=1)
        out_probe, _ = bn(probe, state, inference=True)
        shift = out_probe[:, 0]
        out[re.escape(path)] = functools.partial(
            _normalized, out_probe[:, 1] - shift, shift, activation
        )
    return out


def check_policy(config: Config) -> None:
    """Raise a `ConfigError` naming the key if the factorization settings cannot work."""
    f, steps = config.factorize, config.train.steps
    if f.policy == "none":
        for key, value, off in (
            ("warmup_steps", f.warmup_steps, 0),
            ("frobenius_decay", f.frobenius_decay, None),
            ("calibration", f.calibration, 0),
        ):
            if value != off:
                raise ConfigError(
                    f"factorize.{key}={value!r} has no effect with factorize.policy='none'; "
                    f"choose a policy ({', '.join(POLICY_TARGETS)}) or unset it."
                )
        return
    family, _ = POLICY_TARGETS[f.policy]
    model_name = getattr(config.model, "name", "")
    if not model_name.startswith(family):
        raise ConfigError(
            f"factorize.policy={f.policy!r} applies to {family} models, not "
            f"model.name={model_name!r}; pick a policy for this model or factorize.policy=none."
        )
    if f.init not in lowrank.available_initializers():
        raise ConfigError(
            f"factorize.init={f.init!r} is not a registered initializer; available: "
            f"{', '.join(lowrank.available_initializers())}."
        )
    if f.warmup_steps >= steps:
        raise ConfigError(
            f"factorize.warmup_steps={f.warmup_steps} leaves no low-rank training within "
            f"train.steps={steps}; use fewer warm-up steps (0 factorizes before training)."
        )
    if f.frobenius_decay is not None and f.frobenius_decay < 0:
        raise ConfigError(
            f"factorize.frobenius_decay={f.frobenius_decay} must not be negative; "
            "use a coefficient like optim.weight_decay, or none to turn it off."
        )
    needs = lowrank.get_initializer(f.init).calibration
    if needs == "required" and f.calibration == 0:
        raise ConfigError(
            f"factorize.init={f.init!r} needs calibration images; set factorize.calibration "
            "(e.g. 256) or choose init spectral, nkp or random."
        )
    if needs == "never" and f.calibration:
        raise ConfigError(
            f"factorize.init={f.init!r} does not use calibration images; set "
            "factorize.calibration=0 or choose init nkp or whitened."
        )
    if isinstance(f.rank, str):
        check_rank_text(f.rank)
    if f.rank == "stable:scaled" and f.warmup_steps == 0:
        raise ConfigError(
            "factorize.rank='stable:scaled' is the full rank at initialization; set "
            "factorize.warmup_steps > 0 so the ranks come from trained weights."
        )
    if f.rank not in STABLE_RULES:  # stable rules: computed from the weights at apply time
        _rank_rule(f.rank)


def check_rank(model: PyTree, config: Config, *, example=None) -> None:
    """Plan the policy on the dense `model` (cheap: spectra, no factors) and raise a
    `ConfigError` if the rank rule cannot be met, e.g. a budget below rank 1 everywhere.
    Stable rank rules depend on the trained weights and always fit."""
    f = config.factorize
    if f.policy == "none" or f.rank in STABLE_RULES:
        return
    _, target = POLICY_TARGETS[f.policy]
    try:
        lowrank.plan(model, rank=_rank_rule(f.rank), target=target, example=example)
    except ValueError as e:
        raise ConfigError(
            f"factorize.rank={f.rank!r} with factorize.policy={f.policy!r}: {e}"
        ) from e


def apply_policy(
    model: PyTree,
    config: Config,
    *,
    example=None,
    calibration: Callable | None = None,
    initial: PyTree | None = None,
    state: eqx.nn.State | None = None,
) -> tuple[PyTree, lowrank.Plan | None]:
    """The model to train under `config.factorize` and its plan ("none": the model
    itself and no plan). `example` / `calibration` are as in `lowrank.factorize`;
    `initial` is the dense model at initialization ("stable:scaled" needs it); with
    `calibration` and the BatchNorm `state`, function-aware inits fit each conv's
    output after its BatchNorm and activation (`normalized_activations`).

    Args:
        model: the dense model (not mutated).
        config: the recipe config; its `factorize` section picks the policy, rank and init.
        example: one example input, as in `lowrank.factorize`.
        calibration: calibration inputs, as in `lowrank.factorize`, or None.
        initial: the dense model at initialization ("stable:scaled" needs it), or None.
        state: the model's BatchNorm state (with `calibration`), or None.

    Returns:
        (model to train, its `lowrank.Plan`), or (`model`, None) for policy "none".
    """
    check_policy(config)
    f = config.factorize
    if f.policy == "none":
        return model, None
    if f.rank == "stable:scaled" and initial is None:
        raise ValueError("factorize.rank='stable:scaled' needs initial= (the model at step 0).")
    _, target = POLICY_TARGETS[f.policy]
    activations = POLICY_ACTIVATIONS[f.policy]
    if calibration is not None and state is not None:
        activations = normalized_activations(model, state, target) or activations
    return lowrank.factorize(
        model,
        rank=_rank_rule(f.rank, model, target, initial),
        init=f.init,
        target=target,
        example=example,
        calibration=calibration,
        activations=activations,
        key=jax.random.key(config.train.seed),
        return_plan=True,
    )
