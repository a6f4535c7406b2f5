import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recipes.config import ConfigError, OptimConfig, TrainConfig
from recipes.train import (
    TrainingDiverged,
    check_batch_size,
    default_mesh,
    make_optimizer,
    train,
)

ROOT = Path(__file__).resolve().parents[2]


class TinyNet(eqx.Module):
    fc1: eqx.nn.Linear
    bn: eqx.nn.BatchNorm
    fc2: eqx.Module

    def __init__(self, *, key):
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(6, 16, key=k1)
        self.bn = eqx.nn.BatchNorm(16, "batch", momentum=0.9, mode="batch")
        self.fc2 = eqx.nn.Linear(16, 3, key=k2)

    def __call__(self, x, state, *, key=None):
        h, state = self.bn(self.fc1(x), state)
        return self.fc2(jax.nn.relu(h)), state


class LowRank(eqx.Module):
    u: jax.Array
    v: jax.Array
    bias: jax.Array

    def __call__(self, x):
        return self.u @ (self.v @ x) + self.bias


def tiny_model():
    return eqx.nn.make_with_state(TinyNet)(key=jax.random.key(0))


def loss_fn(model, state, batch, key):
    logits, state = jax.vmap(
        lambda x, s: model(x, s), axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(batch["x"], state)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["y"]
    ).mean()
    return loss, (state, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"])})


def eval_fn(model, state, batch):
    logits = jax.vmap(lambda x: model(x, state)[0], axis_name="batch")(batch["x"])
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["y"]
        )
    }


TEACHER = np.random.default_rng(123).normal(size=(3, 6))


def make_batch(seed, size=8):
    x = np.random.default_rng(seed).normal(size=(size, 6)).astype(np.float32)
    return {"x": x, "y": np.argmax(x @ TEACHER.T, -1).astype(np.int32)}


def train_data(step):
    while True:
        yield make_batch(step)
        step += 1


OPTIMIZER, SCHEDULE = make_optimizer(OptimConfig(name="sgd", lr=0.1, warmup_steps=1), 6)


def run(out_dir, steps, hooks=(), **kwargs):
    model, state = tiny_model()
    config = TrainConfig(
        steps=steps,
        log_every=1,
        checkpoint_every=0,
        out_dir=str(out_dir),
        progress=False,
        **kwargs,
    )
    return train(
        model,
        state,
        loss_fn=loss_fn,
        optimizer=OPTIMIZER,
        schedule=SCHEDULE,
        train_data=train_data,
        config=config,
        hooks=hooks,
    )


def losses(result):
    return [r["loss"] for r in result.history if r["split"] == "train"]


def reference_updates(reference, ours, schedule, steps=5):
    """Apply both optimizers to the same quadratic; return the two parameter paths."""
    target = jnp.array([1.0, -2.0, 3.0])
    grad = jax.grad(lambda p: jnp.sum((p - target) ** 2 * jnp.arange(1, 4)))
    p_ref = p_ours = jnp.zeros(3)
    s_ref, s_ours = reference.init(p_ref), ours.init(p_ours)
    for step in range(steps):
        u, s_ref = reference.update(grad(p_ref), s_ref, p_ref)
        p_ref = p_ref + u
        u, s_ours = ours.update(grad(p_ours), s_ours, p_ours)
        p_ours = p_ours + schedule(step) * u
    return p_ref, p_ours


def test_make_optimizer_sgd_matches_optax_sgd_with_schedule():
    config = OptimConfig(
        name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, warmup_steps=2
    )
    ours, schedule = make_optimizer(config, 5)
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 5)
    reference = optax.chain(
        optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=0.9, nesterov=True)
    )
    np.testing.assert_allclose(*reference_updates(reference, ours, schedule), rtol=1e-6)


def test_make_optimizer_adamw_constant_matches_optax_adamw():
    config = OptimConfig(
        name="adamw",
        lr=0.01,
        weight_decay=0.1,
        warmup_steps=2,
        schedule="constant",
        grad_clip=100.0,
    )
    ours, schedule = make_optimizer(config, 5)
    lr = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.01, 2), optax.constant_schedule(0.01)], [2]
    )
    reference = optax.adamw(lr, weight_decay=0.1)
    np.testing.assert_allclose(*reference_updates(reference, ours, schedule), rtol=1e-6)


def test_make_optimizer_rejects_warmup_longer_than_training():
    with pytest.raises(ConfigError, match="optim.warmup_steps=10 exceeds train.steps=5"):
        make_optimizer(OptimConfig(warmup_steps=10), 5)


def test_resumed_run_continues_with_identical_losses(tmp_path):
    full = run(tmp_path / "full", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4)
    assert len(losses(full)) == 4
    np.testing.assert_array_equal(losses(resumed), losses(full))
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert (tmp_path / "full" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class FactorizeAt:
    """A toy hybrid warm-up: at `step`, replace fc2 by a truncated SVD whose rank
    depends on the trained weights, and restart the optimizer."""

    def __init__(self, step):
        self.step, self.rank = step, None

    def _factorize(self, model, rank):
        w = model.fc2.weight
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        low = LowRank(u[:, :rank] * s[:rank], vt[:rank], model.fc2.bias)
        return eqx.tree_at(lambda m: m.fc2, model, low)

    def __call__(self, ts):
        if ts.step != self.step:
            return ts
        s = jnp.linalg.svd(ts.model.fc2.weight, compute_uv=False)
        self.rank = min(2, int(jnp.sum(s > 0.5 * s[0])))
        return ts._replace(model=self._factorize(ts.model, self.rank), opt_state=None)

    def checkpoint(self):
        return {"rank": self.rank}

    def restore(self, ts, saved):
        self.rank = saved["rank"]
        if self.rank is None:
            return ts
        return ts._replace(model=self._factorize(ts.model, self.rank), opt_state=None)


def test_hook_replaces_model_and_resume_restores_its_structure(tmp_path):
    full = run(tmp_path / "full", 4, hooks=[FactorizeAt(2)])
    assert isinstance(full.model.fc2, LowRank)
    rank = full.model.fc2.u.shape[1]
    assert 1 <= rank < 3
    run(tmp_path / "resumed", 3, hooks=[FactorizeAt(2)])
    hook = FactorizeAt(2)
    resumed = run(tmp_path / "resumed", 4, hooks=[hook])
    assert hook.rank == rank and resumed.model.fc2.u.shape == full.model.fc2.u.shape
    np.testing.assert_array_equal(losses(resumed), losses(full))


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    run(tmp_path, 3, hooks=[FactorizeAt(2)])
    with pytest.raises(
        ConfigError,
        match=(
            r"train.out_dir holds a checkpoint of another run: at step 3 in .*checkpoints, the "
            r"checkpoint has model.fc2.u float32\[3, \d\] where this run has model.fc2.weight "
            r"float32\[3, 16\]; set train.out_dir to a fresh folder, or train.resume=false"
        ),
    ):
        run(tmp_path, 4)


def test_checkpoint_without_an_array_list_is_rejected_in_one_line(tmp_path):
    run(tmp_path, 3, hooks=[FactorizeAt(2)])
    meta_file = tmp_path / "checkpoints/3/meta/metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "arrays"}))
    with pytest.raises(
        ConfigError, match=r"at step 3 in .*, its arrays do not fit this run \("
    ) as e:
        run(tmp_path, 4)
    assert "\n" not in str(e.value)


def test_non_finite_loss_stops_the_run_and_says_where(tmp_path):
    def poisoned(step):
        while True:
            batch = make_batch(step)
            if step == 2:  # the third step's batch
                batch["x"][0, 0] = np.nan
            yield batch
            step += 1

    model, state = tiny_model()
    config = TrainConfig(
        steps=6, log_every=5, checkpoint_every=1, out_dir=str(tmp_path), progress=False
    )
    with pytest.raises(
        TrainingDiverged,
        match=(
            r"training diverged: the loss is nan at step 3\. Lower optim.lr, clip the gradients "
            r"\(optim.grad_clip=1.0\).*; the last checkpoint is from step 2\."
        ),
    ):
        train(
            model,
            state,
            loss_fn=loss_fn,
            optimizer=OPTIMIZER,
            schedule=SCHEDULE,
            train_data=poisoned,
            config=config,
        )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and np.isnan(last["loss"])


def float_dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))}


def test_bf16_compute_keeps_float32_weights_and_tracks_float32_loss():
    seen = []

    def bf16_loss(model, state, batch, key):
        seen.append(float_dtypes((model, batch)))
        return loss_fn(model, state, batch, key)

    def bf16_eval(model, state, batch):
        seen.append(float_dtypes((model, batch)))
        return eval_fn(model, state, batch)

    f32 = run("", 1)
    model, state = tiny_model()
    bf16 = train(
        model,
        state,
        loss_fn=bf16_loss,
        optimizer=OPTIMIZER,
        schedule=SCHEDULE,
        train_data=train_data,
        eval_fn=bf16_eval,
        eval_data=lambda: [make_batch(7)],
        config=TrainConfig(steps=1, log_every=1, out_dir="", progress=False, precision="bf16"),
    )
    assert seen == [{jnp.dtype("bfloat16")}] * 2  # traced once each, all compute in bf16
    np.testing.assert_allclose(losses(bf16), losses(f32), rtol=2e-2)
    assert float_dtypes(bf16.model) == float_dtypes(bf16.state) == {jnp.dtype("float32")}


def test_eval_averages_over_real_examples_only():
    model, state = tiny_model()
    batches = [make_batch(100, 8), make_batch(101, 8)]
    batches[1]["mask"] = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
    optimizer, _ = make_optimizer(OptimConfig(lr=0.0, weight_decay=0.0), 1)
    result = train(
        model,
        state,
        loss_fn=loss_fn,
        optimizer=optimizer,
        train_data=train_data,
        config=TrainConfig(steps=1, log_every=1, out_dir="", progress=False),
        eval_fn=eval_fn,
        eval_data=lambda: batches,
    )
    # Reference: the trained model applied example by example in numpy, real rows only.
    inference = eqx.nn.inference_mode(result.model)
    xs = np.concatenate([batches[0]["x"], batches[1]["x"][:3]])
    ys = np.concatenate([batches[0]["y"], batches[1]["y"][:3]])
    logits = np.stack(
        [
            np.asarray(
                jax.vmap(lambda x: inference(x, result.state)[0], axis_name="batch")(x[None])[0]
            )
            for x in xs
        ]
    )
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(logp[np.arange(len(ys)), ys])
    (record,) = [r for r in result.history if r["split"] == "eval"]
    np.testing.assert_allclose(record["loss"], expected, rtol=1e-5)


def test_eval_fn_without_eval_data_is_an_error():
    model, state = tiny_model()
    optimizer, _ = make_optimizer(OptimConfig(), 1)
    with pytest.raises(ValueError, match="pass eval_fn and eval_data together"):
        train(
            model,
            state,
            loss_fn=loss_fn,
            optimizer=optimizer,
            train_data=train_data,
            config=TrainConfig(steps=1, out_dir=""),
            eval_fn=eval_fn,
        )


SHARDED = textwrap.dedent(
    """
    import json, sys
    import equinox as eqx, jax, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, {tests!r})
    import test_train as t
    from recipes.config import TrainConfig, OptimConfig, ConfigError
    from recipes.train import train, make_optimizer, check_batch_size, default_mesh

    assert jax.device_count() == 4, jax.devices()
    try:
        check_batch_size(6, default_mesh(), "data.batch_size")
    except ConfigError as e:
        print("ERROR:", e)
    # One step on 4 devices vs 1 device: BatchNorm statistics must be global.
    results = []
    for devices in (jax.devices(), jax.devices()[:1]):
        model, state = t.tiny_model()
        optimizer, schedule = make_optimizer(OptimConfig(lr=0.1), 2)
        results.append(train(model, state, loss_fn=t.loss_fn, optimizer=optimizer, schedule=schedule,
                             train_data=t.train_data, config=TrainConfig(steps=2, log_every=1, out_dir="", progress=False),
                             mesh=Mesh(np.asarray(devices), ("data",))))
    sharded, single = results
    print("SHARDS", len(sharded.model.fc1.weight.sharding.device_set))
    np.testing.assert_allclose(t.losses(sharded), t.losses(single), rtol=1e-5)
    arrays = lambda r: jax.tree.leaves(eqx.filter((r.model, r.state), eqx.is_array))
    for a, b in zip(arrays(sharded), arrays(single), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    print("EQUAL")
    from recipes.run import main
    main(["resnet18_digits", "--set", "train.steps=2", "train.log_every=1", "model.width=8",
          "optim.warmup_steps=0", "data.batch_size=8", "data.eval_batch_size=100",
          "train.progress=false", "train.out_dir=" + sys.argv[1]])
    """
)


def test_two_steps_on_four_devices_with_global_batchnorm(tmp_path):
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    script = SHARDED.format(tests=str(Path(__file__).parent))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (
        "ERROR: data.batch_size=6 does not split evenly over 4 devices; use a multiple of 4."
        in proc.stdout
    )
    assert "SHARDS 4" in proc.stdout and "EQUAL" in proc.stdout
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "eval")]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 2


def test_default_mesh_spans_all_devices():
    mesh = default_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    check_batch_size(mesh.size * 3, mesh)
