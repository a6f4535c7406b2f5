import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from recipes import distill

V = 11


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _np_kd(s, t, y, alpha, temp, mask=None):
    """Reference: per token (1-a) * -log q[y] + a * T^2 * sum p_T (log p_T - log q_T)."""
    logq = _np_log_softmax(s)
    ce = -np.take_along_axis(logq, y[..., None], -1)[..., 0]
    logp_t, logq_t = _np_log_softmax(np.asarray(t) / temp), _np_log_softmax(np.asarray(s) / temp)
    kl = (np.exp(logp_t) * (logp_t - logq_t)).sum(-1)
    per_token = (1 - alpha) * ce + alpha * temp**2 * kl
    m = np.ones_like(per_token) if mask is None else np.asarray(mask, np.float64)
    return (per_token * m).sum() / m.sum()


def _data(seed=0, shape=(3, 5)):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=shape + (V,)) * 2
    t = rng.normal(size=shape + (V,)) * 2
    y = rng.integers(V, size=shape)
    return s, t, y


@pytest.mark.parametrize("alpha,temp", [(0.0, 1.0), (0.5, 2.0), (1.0, 4.0), (0.3, 0.5)])
def test_kd_loss_matches_float64_reference(alpha, temp):
    s, t, y = _data()
    got = distill.kd_loss(
        jnp.asarray(s, jnp.float32),
        jnp.asarray(t, jnp.float32),
        jnp.asarray(y),
        alpha=alpha,
        temperature=temp,
    )
    np.testing.assert_allclose(got, _np_kd(s, t, y, alpha, temp), rtol=1e-5)


def test_kd_loss_computes_in_float32_for_bf16_logits():
    s, t, y = _data(10)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    got = distill.kd_loss(s16, t16, jnp.asarray(y), alpha=0.5, temperature=2.0)
    assert got.dtype == jnp.float32
    ref = _np_kd(np.asarray(s16, np.float64), np.asarray(t16, np.float64), y, 0.5, 2.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_kd_loss_masked_tokens_are_ignored():
    s, t, y = _data(1)
    mask = np.random.default_rng(2).random(y.shape) < 0.5
    got = distill.kd_loss(
        jnp.asarray(s),
        jnp.asarray(t),
        jnp.asarray(y),
        alpha=0.7,
        temperature=2.0,
        mask=jnp.asarray(mask),
    )
    np.testing.assert_allclose(got, _np_kd(s, t, y, 0.7, 2.0, mask), rtol=1e-5)
    # garbage in masked positions changes nothing
    s2 = np.where(mask[..., None], s, 1e3)
    got2 = distill.kd_loss(
        jnp.asarray(s2),
        jnp.asarray(t),
        jnp.asarray(y),
        alpha=0.7,
        temperature=2.0,
        mask=jnp.asarray(mask),
    )
    np.testing.assert_allclose(got2, got, rtol=1e-5)
    none = distill.kd_loss(
        jnp.asarray(s),
        jnp.asarray(t),
        jnp.asarray(y),
        alpha=0.7,
        temperature=2.0,
        mask=jnp.zeros(y.shape, bool),
    )
    assert float(none) == 0.0


def test_kd_loss_gradient_reaches_student_only():
    s, t, y = _data(3)
    grad_s, grad_t = jax.grad(
        lambda s, t: distill.kd_loss(s, t, jnp.asarray(y), alpha=1.0, temperature=2.0),
        argnums=(0, 1),
    )(jnp.asarray(s), jnp.asarray(t))
    assert float(jnp.abs(grad_t).max()) == 0.0
    # d/ds of T^2 * KL(p_T || q_T), averaged over N tokens, is T * (q_T - p_T) / N
    p_t = np.exp(_np_log_softmax(t / 2.0))
    q_t = np.exp(_np_log_softmax(s / 2.0))
    np.testing.assert_allclose(grad_s, 2.0 * (q_t - p_t) / y.size, rtol=1e-4, atol=1e-7)


def test_kd_pt_targets_match_reference():
    _, t, y = _data(4)
    got = np.asarray(distill.kd_pt_targets(jnp.asarray(t), jnp.asarray(y)), np.float64)
    p = np.exp(_np_log_softmax(t))
    want = np.empty_like(p)
    for idx in np.ndindex(y.shape):
        p_true = p[idx][y[idx]]
        want[idx] = (1 - p_true) / (V - 1)
        want[idx][y[idx]] = p_true
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_kd_loss_with_kd_pt_teacher():
    s, t, y = _data(5)
    targets = distill.kd_pt_targets(jnp.asarray(t), jnp.asarray(y))
    got = distill.kd_loss(
        jnp.asarray(s), jnp.log(targets), jnp.asarray(y), alpha=1.0, temperature=1.0
    )
    p = np.exp(_np_log_softmax(t))
    p_true = np.take_along_axis(p, y[..., None], -1)
    tgt = np.where(np.eye(V, dtype=bool)[y], p_true, (1 - p_true) / (V - 1))
    logq = _np_log_softmax(s)
    want = (tgt * (np.log(tgt) - logq)).sum(-1).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_topk_cache_round_trip_and_renormalized_teacher(tmp_path):
    s, t, y = _data(6)
    path = tmp_path / "teacher.npz"
    distill.save_topk_logits(path, t, k=3)
    values, indices, vocab = distill.load_topk_logits(path)
    assert values.shape == (3, 5, 3) and vocab == V
    dense = distill.topk_to_logits(values, indices, vocab)
    got = distill.kd_loss(jnp.asarray(s), dense, jnp.asarray(y), alpha=1.0, temperature=1.0)
    # reference: teacher softmax restricted to its 3 largest logits and renormalized
    top = np.argsort(-t, axis=-1)[..., :3]
    restricted = np.full_like(t, -np.inf)
    np.put_along_axis(restricted, top, np.take_along_axis(t, top, -1), -1)
    p = np.exp(restricted - restricted.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    logq = _np_log_softmax(s)
    kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - logq), 0).sum(-1).mean()
    np.testing.assert_allclose(got, kl, rtol=1e-5)
    grad = jax.grad(
        lambda s: distill.kd_loss(s, dense, jnp.asarray(y), alpha=1.0, temperature=2.0)
    )(jnp.asarray(s))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_salt_alpha_abrupt_switch():
    steps = jnp.arange(10)
    got = np.asarray(jax.vmap(lambda s: distill.salt_alpha(s, n_kd=4, alpha=0.6))(steps))
    np.testing.assert_allclose(got, [0.6] * 4 + [0.0] * 6)


def test_kd_loss_accepts_traced_alpha_from_salt_schedule():
    s, t, y = (jnp.asarray(a) for a in _data(9))

    @jax.jit
    def loss_at(step):
        alpha = distill.salt_alpha(step, n_kd=5, alpha=0.5)
        return distill.kd_loss(s, t, y, alpha=alpha, temperature=2.0)

    np.testing.assert_allclose(loss_at(0), _np_kd(*_data(9), 0.5, 2.0), rtol=1e-5)
    np.testing.assert_allclose(loss_at(5), _np_kd(*_data(9), 0.0, 2.0), rtol=1e-5)


def test_salt_alpha_linear_decay():
    got = np.asarray([distill.salt_alpha(s, n_kd=3, alpha=0.8, decay=4) for s in range(10)])
    want = [0.8, 0.8, 0.8, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _np_salt_ds(logits, labels, k, mask=None):
    out = []
    for b in range(labels.shape[0]):
        logq = _np_log_softmax(logits[b])
        losses = []
        for t in range(labels.shape[1]):
            in_topk = (logits[b, t] > logits[b, t, labels[b, t]]).sum() < k
            if in_topk and (mask is None or mask[b, t]):
                losses.append(-logq[t, labels[b, t]])
        out.append(np.median(losses) if losses else -np.inf)
    return np.array(out)


def test_salt_ds_scores_hand_built():
    # vocab 4, k=2. Sequence 0: tokens 0 and 2 learnable (true token ranked 1st / 2nd),
    # token 1 not (ranked 4th). Sequence 1: nothing learnable -> -inf.
    logits = np.log(
        np.array(
            [
                [[0.7, 0.1, 0.1, 0.1], [0.6, 0.25, 0.1, 0.05], [0.4, 0.3, 0.2, 0.1]],
                [[0.7, 0.2, 0.05, 0.05], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]],
            ]
        )
    )
    labels = np.array([[0, 3, 1], [2, 0, 3]])
    got = np.asarray(distill.salt_ds_scores(jnp.asarray(logits), jnp.asarray(labels), k=2))
    np.testing.assert_allclose(got[0], (-np.log(0.7) - np.log(0.3)) / 2, rtol=1e-5)
    assert got[1] == -np.inf
    assert list(distill.select_hard_learnable(got, 1.0)) == [0]


def test_salt_ds_scores_random_against_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(6, 9, V)) * 3
    labels = rng.integers(V, size=(6, 9))
    mask = rng.random((6, 9)) < 0.8
    for k in (1, 3, V):
        got = distill.salt_ds_scores(
            jnp.asarray(logits), jnp.asarray(labels), k=k, mask=jnp.asarray(mask)
        )
        np.testing.assert_allclose(got, _np_salt_ds(logits, labels, k, mask), rtol=1e-5)


def test_select_hard_learnable():
    scores = np.array([0.5, np.inf, 2.0, -np.inf, 1.0, np.nan, 2.0])
    assert list(distill.select_hard_learnable(scores, 3 / 7)) == [2, 6, 4]
    assert list(distill.select_hard_learnable(scores, 2 / 7)) == [2, 6]
    assert list(distill.select_hard_learnable(scores, 1.0)) == [2, 6, 4, 0]


def test_hidden_match_loss_against_reference():
    rng = np.random.default_rng(8)
    hs, ht = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 10))
    mask = rng.random((2, 5)) < 0.6
    proj = distill.HiddenProjection(6, 10, key=jr.key(0))
    w = np.asarray(proj.proj.weight, np.float64)
    got = distill.hidden_match_loss(proj, jnp.asarray(hs), jnp.asarray(ht), mask=jnp.asarray(mask))
    per_token = ((hs @ w.T - ht) ** 2).mean(-1)
    np.testing.assert_allclose(got, per_token[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda s, t, y: distill.kd_loss(s, t[..., :5], y, alpha=0.5, temperature=1.0),
            "must have the same shape",
        ),
        (
            lambda s, t, y: distill.kd_loss(s, t, y[:, :2], alpha=0.5, temperature=1.0),
            "labels shape",
        ),
        (
            lambda s, t, y: distill.kd_loss(s, t, y, alpha=1.5, temperature=1.0),
            r"alpha must be in \[0, 1\], got 1.5",
        ),
        (
            lambda s, t, y: distill.kd_loss(s, t, y, alpha=0.5, temperature=0.0),
            "temperature must be > 0",
        ),
        (lambda s, t, y: distill.kd_pt_targets(t, y[:, :2]), "labels shape"),
        (lambda s, t, y: distill.kd_pt_targets(t[..., :1], y), "at least 2 tokens"),
        (lambda s, t, y: distill.salt_alpha(0, n_kd=-1, alpha=0.5), "n_kd must be >= 0"),
        (lambda s, t, y: distill.salt_alpha(0, n_kd=1, alpha=2.0), r"alpha must be in \[0, 1\]"),
        (lambda s, t, y: distill.salt_alpha(0, n_kd=1, alpha=0.5, decay=-2), "decay must be >= 0"),
        (
            lambda s, t, y: distill.salt_ds_scores(s, y[:, :2]),
            r"logits must be \(\.\.\., T, vocab\) and labels",
        ),
        (lambda s, t, y: distill.salt_ds_scores(s, y, k=0), r"k must be in \[1, vocab=11\]"),
        (
            lambda s, t, y: distill.select_hard_learnable(np.ones(3), 0.0),
            r"fraction must be in \(0, 1\]",
        ),
        (lambda s, t, y: distill.select_hard_learnable(np.ones((2, 2)), 0.5), "scores must be 1-D"),
        (
            lambda s, t, y: distill.save_topk_logits("unused.npz", t, k=12),
            r"k must be in \[1, vocab=11\]",
        ),
        (
            lambda s, t, y: distill.hidden_match_loss(
                distill.HiddenProjection(4, 3, key=jr.key(0)), s, t
            ),
            "build HiddenProjection",
        ),
        (
            lambda s, t, y: distill.hidden_match_loss(
                distill.HiddenProjection(11, 11, key=jr.key(0)), s, t[:1]
            ),
            "must share their leading",
        ),
    ],
)
def test_errors(call, match):
    s, t, y = (jnp.asarray(a) for a in _data())
    with pytest.raises(ValueError, match=match):
        call(s, t, y)


def test_cosine_distance_loss_matches_float64_reference():
    rng = np.random.default_rng(7)
    s, t = rng.normal(size=(2, 5, 6)), rng.normal(size=(2, 5, 6))
    mask = rng.random((2, 5)) < 0.6
    cos = (s * t).sum(-1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    got = distill.cosine_distance_loss(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), mask=jnp.asarray(mask)
    )
    np.testing.assert_allclose(got, (1 - cos)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        distill.cosine_distance_loss(jnp.asarray(s), jnp.asarray(s)), 0.0, atol=1e-6
    )
    # the teacher gets no gradient; the student does
    g_s, g_t = jax.grad(lambda a, b: distill.cosine_distance_loss(a, b), argnums=(0, 1))(
        jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
    )
    assert float(jnp.abs(g_t).max()) == 0.0 and float(jnp.abs(g_s).max()) > 0


def test_cosine_distance_loss_names_mismatched_shapes():
    with pytest.raises(ValueError, match=r"student \(2, 4\) and teacher \(2, 5\).*same width"):
        distill.cosine_distance_loss(jnp.zeros((2, 4)), jnp.zeros((2, 5)))
