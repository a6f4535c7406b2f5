"""The trainer's jitted train and eval steps, and placing arrays on the mesh."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jaxtyping import PyTree


def unit_schedule(step):
    return 1.0


def cast_floats(tree: PyTree, dtype) -> PyTree:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, tree)


def put_global(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Place this process's arrays as global arrays (works single- and multi-host)."""

    def put(x):
        if not eqx.is_array(x) or (isinstance(x, jax.Array) and x.sharding == sharding):
            return x
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def trainable_params(model: PyTree) -> PyTree:
    return eqx.filter(model, eqx.is_inexact_array)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static half of a train/eval step; equal specs share one compiled step."""

    loss_fn: Callable[..., Any] | None  # recipes.train.LossFn
    eval_fn: Callable[..., Any] | None  # recipes.train.EvalFn
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    compute_dtype: Any
    replicated: NamedSharding
    batch_sharding: NamedSharding


@eqx.filter_jit
def train_step(spec: StepSpec, model, state, opt_state, batch, key, step):
    model, state, opt_state = eqx.filter_shard((model, state, opt_state), spec.replicated)
    batch = eqx.filter_shard(batch, spec.batch_sharding)

    def compute_loss(model):
        loss, (new_state, metrics) = spec.loss_fn(
            cast_floats(model, spec.compute_dtype),
            state,
            cast_floats(batch, spec.compute_dtype),
            key,
        )
        return loss.astype(jnp.float32), (new_state, metrics)

    (loss, (state, metrics)), grads = eqx.filter_value_and_grad(compute_loss, has_aux=True)(model)
    updates, opt_state = spec.optimizer.update(grads, opt_state, trainable_params(model))
    lr = spec.schedule(step)
    model = eqx.apply_updates(model, jax.tree.map(lambda u: lr * u, updates))
    metrics = {"loss": loss, **{k: v.astype(jnp.float32) for k, v in metrics.items()}, "lr": lr}
    return eqx.filter_shard((model, state, opt_state), spec.replicated), metrics


@eqx.filter_jit
def eval_step(spec: StepSpec, model, state, batch):
    batch = eqx.filter_shard(batch, spec.batch_sharding)
    model, cast_batch = cast_floats((model, batch), spec.compute_dtype)
    metrics = spec.eval_fn(model, state, cast_batch)
    mask = batch.get("mask", jnp.ones(len(jax.tree.leaves(batch)[0])))
    sums = {k: jnp.sum(v.astype(jnp.float32) * mask) for k, v in metrics.items()}
    return sums, jnp.sum(mask)
