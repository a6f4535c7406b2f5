"""Factorization policies: which layers of a recipe's model become low-rank, and how.

`run.py` calls `apply_policy(model, config)` once, after the dense model is built and
before training; `check_policy(config)` runs first, before any compute. Policies:

- "none": train the dense model.
- "khodak" (Khodak et al. 2021): every conv inside the residual stages of a ResNet,
  shortcuts included; the stem conv and the classifier stay dense.
- "pufferfish" (Wang et al. 2021): only the last ResNet stage, where most parameters live.
- "efficientnet": the 1x1 expand and project convs of every MBConv block and the 1x1
  head conv; depthwise and squeeze-excitation convs stay dense.

`factorize.rank` is any `lowrank` rank rule (an int, a fraction of full rank,
"energy:0.9"), or "params:0.3" / "flops:0.3" for a global `lowrank.Budget`.
"""

import jax
import lowrank
from jaxtyping import PyTree

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


def _rank_rule(rank: int | float | str):
    if isinstance(rank, str) and rank.split(":")[0] in ("params", "flops"):
        kind, _, fraction = rank.partition(":")
        try:
            return lowrank.Budget(**{kind: float(fraction)})
        except ValueError as e:
            raise ConfigError(f"factorize.rank={rank!r}: {e}") from e
    return rank


def check_policy(config: Config) -> None:
    """Raise a `ConfigError` naming the key if the factorization settings cannot work."""
    f = config.factorize
    if f.policy == "none":
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
    _rank_rule(f.rank)


def apply_policy(model: PyTree, config: Config) -> PyTree:
    """The model to train under `config.factorize` ("none": the model itself)."""
    check_policy(config)
    f = config.factorize
    if f.policy == "none":
        return model
    _, target = POLICY_TARGETS[f.policy]
    return lowrank.factorize(
        model,
        rank=_rank_rule(f.rank),
        init=f.init,
        target=target,
        key=jax.random.key(config.train.seed),
    )
