"""Part B of bench/vision.py: EfficientNet-B0 and ResNet-50 at 224x224, factorized
under their policies, then one training step."""

import time

import jax
import numpy as np

import lowrank
from bench._results import markdown_table
from recipes import models
from recipes.config import Config, FactorizeConfig, ImageModelConfig, OptimConfig, TrainConfig
from recipes.policy import apply_policy
from recipes.run import classification_loss
from recipes.train import make_optimizer, train


def _big_row(name: str, policy: str, init: str, make, batch: dict) -> list:
    """Factorize the model `make(key)` builds under `policy`, train it one step on
    `batch`, and return its table row."""
    model, state = make(jax.random.key(0))
    config = Config(
        name=f"{name}_224",
        model=ImageModelConfig(name=name, stem="imagenet"),
        factorize=FactorizeConfig(policy=policy, rank="params:0.5", init=init),
    )
    one = {k: v[:1] for k, v in batch.items()}
    example = lambda m: classification_loss(m, state, one, jax.random.key(0))
    start = time.perf_counter()
    low, plan = apply_policy(model, config, example=example)
    factorize_s = time.perf_counter() - start
    dense_sum = lowrank.summary(model, example=example)
    low_sum = lowrank.summary(low, example=example)
    optimizer, schedule = make_optimizer(OptimConfig(), 1)
    start = time.perf_counter()
    result = train(
        low,
        state,
        loss_fn=classification_loss,
        optimizer=optimizer,
        schedule=schedule,
        train_data=lambda step: iter(lambda: batch, None),
        config=TrainConfig(steps=1, log_every=1, out_dir="", progress=False),
    )
    step_s = time.perf_counter() - start
    loss = result.history[-1]["loss"]
    totals = plan.totals()
    print(
        f"{name}: {len(plan.factorized)} layers factorized, params x"
        f"{low_sum.total_params / dense_sum.total_params:.3f}, FLOPs x"
        f"{low_sum.flops / dense_sum.flops:.3f}, loss {loss:.3f}",
        flush=True,
    )
    return [
        name,
        policy,
        init,
        f"{len(plan.factorized)}/{len(plan.layers)}",
        totals["params_after"] / totals["params_before"],
        f"{dense_sum.total_params:,} -> {low_sum.total_params:,}",
        low_sum.total_params / dense_sum.total_params,
        f"{dense_sum.flops / 1e9:.2f}G -> {low_sum.flops / 1e9:.2f}G",
        low_sum.flops / dense_sum.flops,
        f"{loss:.3f}",
        f"{factorize_s:.1f}",
        f"{step_s:.1f}",
    ]


def part_b() -> str:
    setups = [
        ("efficientnet_b0", "efficientnet", "nkp", lambda k: models.efficientnet_b0(1000, key=k)),
        ("resnet50", "khodak", "spectral", lambda k: models.resnet50(1000, stem="imagenet", key=k)),
    ]
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, 3, 224, 224)).astype(np.float32),
        "label": rng.integers(0, 1000, 2).astype(np.int32),
    }
    rows = [_big_row(*setup, batch) for setup in setups]
    header = [
        "model",
        "policy",
        "init",
        "factorized",
        "selected params ratio",
        "model params",
        "params ratio",
        "FLOPs (one image)",
        "FLOP ratio",
        "train loss of the step",
        "factorize s",
        "1 step s (incl. compile)",
    ]
    return (
        "224x224, 1000 classes, Budget(params=0.5) of each policy's layers, one SGD step "
        "on 2 synthetic images (a smoke test that the factorized models train, not a "
        "quality number).\n\n" + markdown_table(header, rows)
    )
