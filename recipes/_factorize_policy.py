"""Factorization policies: which layers of a recipe's model become low-rank, and how.

`run.py` calls `apply_policy(model, config)` once, after the dense model is built and
before training. The only policy so far is "none" (train the dense model); the
compiler-backed policies (Khodak: every residual conv but stem and classifier;
Pufferfish: last stage only; EfficientNet: expand/project 1x1 convs and head) are
added here together with the `lowrank.factorize` they call.
"""

from jaxtyping import PyTree

from .config import Config


def apply_policy(model: PyTree, config: Config) -> PyTree:
    """The model to train under `config.factorize.policy` ("none": unchanged)."""
    return model
