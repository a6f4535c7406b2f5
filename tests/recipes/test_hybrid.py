import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank
from recipes._hybrid import HybridWarmup
from recipes.config import OptimConfig, TrainConfig
from recipes.train import REPLACED, make_optimizer, train

TEACHER = np.random.default_rng(5).normal(size=(3, 8))


class Net(eqx.Module):
    fc1: eqx.Module
    fc2: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(8, 16, key=k1)
        self.fc2 = eqx.nn.Linear(16, 3, key=k2)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def loss_fn(model, state, batch, key):
    logits = jax.vmap(model)(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), (state, {})


def eval_fn(model, state, batch):
    logits = jax.vmap(model)(batch["x"])
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])}


def batch(seed, size=16):
    x = np.random.default_rng(seed).normal(size=(size, 8)).astype(np.float32)
    return {"x": x, "y": np.argmax(x @ TEACHER.T, -1).astype(np.int32)}


def train_data(step):
    while True:
        yield batch(step)
        step += 1


def factorize(model, state):
    return lowrank.factorize(model, rank=2, target=["fc1"], init="spectral", return_plan=True)


def fit(out_dir, steps, hooks=(), **optim):
    optimizer, schedule = make_optimizer(OptimConfig(lr=0.1, weight_decay=1e-3), 6, **optim)
    return train(
        Net(key=jax.random.key(0)),
        None,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_data=train_data,
        eval_fn=eval_fn,
        eval_data=lambda: [batch(99, 64)],
        hooks=hooks,
        config=TrainConfig(steps=steps, log_every=1, out_dir=str(out_dir), progress=False),
    )


def train_losses(result):
    return [r["loss"] for r in result.history if r["split"] == "train"]


def test_hybrid_warmup_trains_dense_then_factorized_and_evaluates_both(tmp_path):
    dense_part = fit(tmp_path / "dense", 2)
    full = fit(tmp_path / "full", 4, hooks=[HybridWarmup(2, factorize)])
    assert isinstance(full.model.fc1, lowrank.LowRankLinear) and full.model.fc1.rank == 2
    np.testing.assert_array_equal(train_losses(full)[:2], train_losses(dense_part))
    evals = [r for r in full.history if r["split"] == "eval"]
    assert [(r["step"], r.get("event")) for r in evals] == [(2, None), (2, REPLACED), (4, None)]
    # Before: the dense model after two steps. After: its rank-2 spectral truncation.
    assert evals[0]["loss"] == [r for r in dense_part.history if r["split"] == "eval"][-1]["loss"]
    truncated = factorize(dense_part.model, None)[0]
    expected = float(jnp.mean(eval_fn(truncated, None, batch(99, 64))["loss"]))
    np.testing.assert_allclose(evals[1]["loss"], expected, rtol=1e-5)


def test_resumed_hybrid_run_restores_the_factorized_structure(tmp_path):
    full = fit(tmp_path / "full", 4, hooks=[HybridWarmup(2, factorize)])
    fit(tmp_path / "resumed", 3, hooks=[HybridWarmup(2, factorize)])
    meta = json.loads((tmp_path / "resumed/checkpoints/3/meta/metadata").read_text())
    assert lowrank.Plan.from_json(meta["hooks"][0]["plan"])["fc1"].rank == 2

    def never(model, state):
        raise AssertionError("a resumed run must rebuild the structure from the saved plan")

    hook = HybridWarmup(2, never)
    resumed = fit(tmp_path / "resumed", 4, hooks=[hook])
    assert hook.plan["fc1"].rank == 2
    assert isinstance(resumed.model.fc1, lowrank.LowRankLinear)
    np.testing.assert_array_equal(train_losses(resumed), train_losses(full))
    evals = [(r["step"], r.get("event")) for r in resumed.history if r["split"] == "eval"]
    assert evals == [(2, None), (2, REPLACED), (3, None), (4, None)]  # 3: end of the first run


def test_frobenius_decay_in_the_optimizer_changes_only_low_rank_training(tmp_path):
    plain = fit("", 4, hooks=[HybridWarmup(2, factorize)])
    decayed = fit("", 4, hooks=[HybridWarmup(2, factorize)], frobenius_decay=1.0)
    # Two optimizer chains that agree on dense layers (compiled differently: equal up
    # to float32 rounding), until the factors exist.
    np.testing.assert_allclose(train_losses(decayed)[:3], train_losses(plain)[:3], rtol=1e-6)
    assert abs(train_losses(decayed)[3] - train_losses(plain)[3]) > 1e-4 * train_losses(plain)[3]
