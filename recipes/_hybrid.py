"""Hybrid warm-up (Pufferfish, Wang et al. 2021) as a trainer hook: dense first, then low-rank.

Low-rank networks trained from scratch lose accuracy that a short dense start recovers:
the model trains dense for `step` steps, is then factorized in place from its
warmed-up weights (spectral or NKP factors; ranks may come from their spectra), and
training continues with a fresh optimizer state. The plan rides along in every
checkpoint, so a resumed run rebuilds the factorized structure before loading values.
"""

from collections.abc import Callable

import jax
from jaxtyping import PyTree

import lowrank

from .train import TrainState


class HybridWarmup:
    """A `recipes.train.Hook`: at step `step`, `factorize(model, state) -> (model, plan)`
    replaces the dense model and the optimizer state is re-initialized."""

    def __init__(
        self, step: int, factorize: Callable[[PyTree, PyTree], tuple[PyTree, lowrank.Plan]]
    ):
        self.step = step
        self.factorize = factorize
        self.plan: lowrank.Plan | None = None

    def __call__(self, ts: TrainState) -> TrainState:
        if ts.step != self.step or self.plan is not None:
            return ts
        model, self.plan = self.factorize(ts.model, ts.state)
        return ts._replace(model=model, opt_state=None)

    def checkpoint(self) -> dict:
        return {"plan": None if self.plan is None else self.plan.to_json()}

    def restore(self, ts: TrainState, saved: dict | None) -> TrainState:
        if not saved or saved.get("plan") is None:
            return ts
        self.plan = lowrank.Plan.from_json(saved["plan"])
        # Only the structure matters here: the checkpoint's values replace these factors.
        skeleton = lowrank.factorize(ts.model, plan=self.plan, init="random", key=jax.random.key(0))
        return ts._replace(model=skeleton, opt_state=None)
