"""The benches' training helpers run on the shared trainer (`recipes.train.train`) and
train as the hand-written optax loops they replaced did (same batches, same updates)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from bench import _digits, distill_smoke
from recipes.distill import kd_loss, salt_alpha
from recipes.models import Transformer
from recipes.text import sample_windows


def _max_difference(a, b, *, skip: str = "") -> float:
    """Largest |a - b| over the array leaves whose path does not contain `skip`."""
    paths = jax.tree_util.tree_leaves_with_path(eqx.filter(a, eqx.is_array))
    pairs = zip(paths, jax.tree.leaves(eqx.filter(b, eqx.is_array)))
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for (path, x), y in pairs
        if not skip or skip not in jax.tree_util.keystr(path)
    )


def _digits_reference(model, data, *, steps, lr, seed, batch):
    """The loop bench/nkp_models.py had: Adam with cosine decay, batches with replacement."""
    x, y = data
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss_fn(m, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(m)(xb), yb).mean()

    @eqx.filter_jit
    def step(m, opt_state, xb, yb):
        grads = eqx.filter_grad(loss_fn)(m, xb, yb)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(m, eqx.is_array))
        return eqx.apply_updates(m, updates), opt_state

    rng = np.random.default_rng(seed)
    curve = [float(loss_fn(model, x, y))]
    for i in range(1, steps + 1):
        idx = rng.integers(0, len(y), batch)
        model, opt_state = step(model, opt_state, x[idx], y[idx])
        if i % 2 == 0:
            curve.append(float(loss_fn(model, x, y)))
    return model, curve


def test_digits_training_matches_the_plain_optax_loop():
    (x, y), _ = _digits.load_split(0)
    data = (x[:64], y[:64])
    model = _digits.DigitsCNN(4, key=jr.key(0))
    kw = dict(steps=5, lr=3e-3, seed=1, batch=16)
    trained, curve = _digits.train(model, data, **kw, curve_every=2)
    expected, expected_curve = _digits_reference(model, data, **kw)
    assert _max_difference(trained, model) > 1e-3  # it trained
    assert _max_difference(trained, expected) < 1e-5
    np.testing.assert_allclose(curve, expected_curve, rtol=1e-5)
    assert len(curve) == 3  # before training, after steps 2 and 4
    assert _digits.train(model, data, **kw)[1] == []
    assert 0.0 <= _digits.accuracy(trained, data) <= 1.0


def _lm_reference(model, data, *, steps, key, batch, length, lr, teacher, n_kd, alpha):
    """The loop bench/distill_smoke.py had: AdamW, warm-up + cosine, SALT from `teacher`."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 5), steps, lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, key, i):
        x_y = sample_windows(data, key=key, batch_size=batch, length=length)
        x, y = x_y[:, :-1], x_y[:, 1:]
        a, t_logits = salt_alpha(i, n_kd=n_kd, alpha=alpha), jax.vmap(teacher)(x)

        def loss_fn(m):
            return kd_loss(jax.vmap(m)(x), t_logits, y, alpha=a, temperature=2.0)

        grads = eqx.filter_grad(loss_fn)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    for i, k in enumerate(jr.split(key, steps)):
        model, opt_state = step(model, opt_state, k, jnp.asarray(i))
    return model


def test_lm_training_with_salt_matches_the_plain_optax_loop():
    data = jnp.asarray(np.random.default_rng(0).integers(0, 256, 400), jnp.uint8)
    shape = dict(d_model=16, n_layers=1, n_heads=2, context=8)
    teacher = eqx.nn.inference_mode(Transformer(**shape, key=jr.key(1)))
    student = Transformer(**shape, key=jr.key(2))
    kw = dict(steps=6, key=jr.key(3), batch=4, length=8, lr=3e-3, teacher=teacher, alpha=0.5)
    # The attention key bias shifts every logit of a query alike, so its gradient is
    # rounding noise, which Adam scales up to full-size steps: it is left out.
    skip = "key_proj.bias"
    trained = distill_smoke.train(student, data, **kw, n_kd=3)
    assert _max_difference(trained, student) > 1e-4
    reference = _lm_reference(student, data, **kw, n_kd=3)
    assert _max_difference(trained, reference, skip=skip) < 1e-5
    plain = distill_smoke.train(student, data, **{**kw, "teacher": None})
    reference = _lm_reference(student, data, **kw, n_kd=0)
    assert _max_difference(plain, reference, skip=skip) < 1e-5
    assert _max_difference(plain, trained, skip=skip) > 1e-4  # the teacher changed the steps
