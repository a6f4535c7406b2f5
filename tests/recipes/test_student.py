import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import lowrank
from recipes import student as st
from recipes._text_task import build_text_lm, build_text_student
from recipes.config import Config, ConfigError, OptimConfig, TrainConfig
from recipes.distill import kd_loss, salt_ds_scores
from recipes.models import Transformer
from recipes.text_config import (
    StudentModelConfig,
    StudentRunConfig,
    TextDataConfig,
    TextModelConfig,
)
from recipes.train import make_optimizer, train

SMALL = dict(context=8, d_model=16, n_layers=1, n_heads=2)


def _teacher(key=0, **kw):
    return eqx.nn.inference_mode(Transformer(**{**SMALL, **kw}, key=jr.key(key)))


def _ids(n=2, length=8, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, length)), jnp.int32)


def _low_rank_teacher(rank=2):
    """A teacher whose attention and MLP weights are exactly rank `rank`."""
    teacher = _teacher()
    keys = iter(jr.split(jr.key(1), 20))

    def low(layer):
        if not isinstance(layer, eqx.nn.Linear):
            return layer
        m, n = layer.weight.shape
        w = jr.normal(next(keys), (m, rank)) @ jr.normal(next(keys), (rank, n)) / math.sqrt(n)
        return eqx.tree_at(lambda l: l.weight, layer, w)

    return jax.tree.map(low, teacher, is_leaf=lambda x: isinstance(x, eqx.nn.Linear))


@pytest.mark.parametrize("init", ["spectral", "whitened", "nkp"])
def test_factorized_student_of_low_rank_teacher_reproduces_its_logits(init):
    teacher = _low_rank_teacher(rank=2)
    calibration = None if init == "spectral" else _ids(4, seed=1)
    student, plan = st.factorized_student(
        teacher, params=0.4, init=init, calibration=calibration, key=jr.key(0)
    )
    # Every layer is exactly rank 2, so which ones the budget leaves dense is a tie that
    # float rounding breaks (it differs between CPUs): count, don't name them.
    is_low_rank = lambda x: isinstance(x, lowrank.LowRankLinear)
    low_rank = [x for x in jax.tree.leaves(student, is_leaf=is_low_rank) if is_low_rank(x)]
    assert len(low_rank) == len(plan.factorized) >= 4
    assert st.non_embedding_params(student) < 0.5 * st.non_embedding_params(teacher)
    ids = _ids()
    want, got = jax.vmap(teacher)(ids), jax.vmap(student)(ids)
    np.testing.assert_allclose(got, want, atol=2e-4 * float(jnp.abs(want).max()))


def test_factorized_student_below_the_teacher_rank_differs():
    """Control for the test above: the comparison does see a truncation."""
    teacher = _low_rank_teacher(rank=6)
    student, _ = st.factorized_student(teacher, params=0.2, init="spectral", key=jr.key(0))
    ids = _ids()
    gap = jnp.abs(jax.vmap(teacher)(ids) - jax.vmap(student)(ids)).max()
    assert gap > 1e-2 * float(jnp.abs(jax.vmap(teacher)(ids)).max())


def test_save_and_load_round_trip_a_factorized_student(tmp_path):
    teacher = _teacher()
    student, plan = st.factorized_student(teacher, params=0.3, key=jr.key(0))
    st.save_lm(tmp_path / "s.eqx", student, plan)
    st.save_lm(tmp_path / "t.eqx", teacher)
    ids = _ids()
    for model, name in ((student, "s.eqx"), (teacher, "t.eqx")):
        loaded = st.load_lm(tmp_path / name)
        np.testing.assert_array_equal(jax.vmap(loaded)(ids), jax.vmap(model)(ids))


def test_dense_student_matches_the_parameter_fraction():
    teacher = _teacher(d_model=32, n_heads=4)
    student = st.dense_student(teacher, params=0.25, key=jr.key(0))
    ratio = st.non_embedding_params(student) / st.non_embedding_params(teacher)
    assert abs(ratio - 0.25) < 0.05
    assert (student.n_layers, student.context, student.vocab_size) == (1, 8, 256)
    assert student.d_model % 4 == 0 and student.d_model < 32


def test_kd_training_lowers_the_kl_to_the_teacher():
    teacher = _teacher(embed_std=1.0)  # peaky teacher: a KL worth closing
    student = st.dense_student(teacher, params=0.5, key=jr.key(3))
    data = np.random.default_rng(0).integers(0, 256, 4000).astype(np.uint8)
    distill = st.DistillConfig(mode="kd", alpha=1.0)
    state, loss_fn, stream = st.student_training(
        teacher, student, distill, data=data, batch_size=8, length=8, steps=30, seed=0
    )
    windows = st.random_windows(data, np.random.default_rng(9), 16, 8)
    optimizer, schedule = make_optimizer(OptimConfig(name="adamw", lr=3e-2, weight_decay=0.0), 30)
    result = train(
        student,
        state,
        loss_fn=loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_data=stream,
        eval_fn=st.lm_eval,
        eval_data=st.eval_batches(windows, 16),
        config=TrainConfig(steps=30, log_every=10, eval_every=0, out_dir="", progress=False),
    )
    before = np.mean(st.lm_eval(student, teacher, {"ids": jnp.asarray(windows)})["kl_to_teacher"])
    after = [r for r in result.history if r["split"] == "eval"][-1]["kl_to_teacher"]
    assert after < 0.85 * before


def test_distill_loss_mixes_ce_and_kd_per_example():
    teacher, student = _teacher(embed_std=1.0), _teacher(key=5)
    ids = _ids(2, length=9)
    loss_fn = st.make_distill_loss(2.0)
    batch = {"ids": ids, "alpha": jnp.asarray([0.0, 1.0])}
    loss, (state, metrics) = loss_fn(student, teacher, batch, jr.key(0))
    s, t = jax.vmap(student)(ids[:, :-1]), jax.vmap(teacher)(ids[:, :-1])
    ce = kd_loss(s[0], t[0], ids[0, 1:], alpha=0.0, temperature=2.0)
    kd = kd_loss(s[1], t[1], ids[1, 1:], alpha=1.0, temperature=2.0)
    np.testing.assert_allclose(loss, (ce + kd) / 2, rtol=1e-5)
    assert state is teacher and float(metrics["alpha"]) == 0.5
    # The teacher's forward sits under lax.cond on any(alpha > 0): CE phases skip it.
    jaxpr = jax.make_jaxpr(lambda b: loss_fn(student, teacher, b, jr.key(0))[0])(batch)
    assert "cond[" in str(jaxpr)


def test_salt_batches_switch_from_kd_to_ce_and_resume_exactly():
    data = np.arange(300, dtype=np.uint8)
    hard = np.full((3, 9), 7, np.int32)
    distill = st.DistillConfig(mode="salt", alpha=0.7, n_kd=3)
    stream = st.train_batches(
        data,
        batch_size=4,
        length=8,
        seed=1,
        alpha=st.alpha_schedule(distill),
        hard=hard,
        hard_steps=2,
    )
    batches = [next(it) for it in [stream(0)] for _ in range(5)]
    assert [float(b["alpha"][0]) for b in batches] == pytest.approx([0.7, 0.7, 0.7, 0, 0])
    assert all((b["ids"] == 7).all() for b in batches[:2])
    assert not any((b["ids"] == 7).all() for b in batches[2:])
    np.testing.assert_array_equal(next(stream(3))["ids"], batches[3]["ids"])
    assert all(b["ids"].shape == (4, 9) for b in batches)


def test_salt_ds_keeps_the_hardest_learnable_windows():
    teacher = _teacher(embed_std=1.0)
    data = np.random.default_rng(0).integers(0, 256, 2000).astype(np.uint8)
    distill = st.DistillConfig(mode="salt_ds", ds_pool=64, ds_fraction=0.25, ds_k=128)
    hard = st.hard_learnable_windows(teacher, data, distill, length=8, seed=0)
    pool = st.random_windows(data, np.random.default_rng([0, 2]), 64, 8)
    scores = np.asarray(
        salt_ds_scores(jax.vmap(teacher)(pool[:, :-1]), pool[:, 1:], k=128), np.float64
    )
    assert hard.shape == (16, 9)
    picked = [int(np.flatnonzero((pool == row).all(axis=1))[0]) for row in hard]
    assert len(set(picked)) == 16
    # float32 scores batched differently agree only to rounding: compare with a tolerance
    tol = 1e-5 * np.abs(scores).max()
    kept, rest = scores[picked], np.delete(scores, picked)
    assert kept.min() >= rest.max() - tol  # the 16 hardest of the pool...
    assert np.all(np.diff(kept) <= tol)  # ...hardest first
    assert kept.min() > np.median(scores) + 100 * tol  # a real selection, not ties


# ---------------------------------------------------------------- bad input


def _teacher_config(**data):
    return Config(
        name="t",
        task="text_lm",
        model=TextModelConfig(**SMALL),
        data=TextDataConfig(**{"length": 8, **data}),
        optim=OptimConfig(name="adamw", lr=1e-3),
        train=TrainConfig(steps=2),
    )


def _student_config(teacher_path, model=None, data=None, distill=None, steps=4):
    return StudentRunConfig(
        name="s",
        task="text_student",
        model=StudentModelConfig(teacher=str(teacher_path), **(model or {})),
        data=TextDataConfig(**{"length": 8, **(data or {})}),
        optim=OptimConfig(name="adamw", lr=1e-3),
        train=TrainConfig(steps=steps),
        distill=st.DistillConfig(**(distill or {})),
    )


def test_empty_corpus_is_reported(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConfigError, match="data.path=.*is empty: no non-empty .txt files"):
        build_text_lm(_teacher_config(path=str(tmp_path)))


def test_corpus_shorter_than_a_window_is_reported(tmp_path):
    (tmp_path / "a.txt").write_text("to be or not to be, that is the question")
    (tmp_path / "b.txt").write_text("ay")
    with pytest.raises(
        ConfigError, match=r"the \w+ text has 4 bytes, fewer than data.length \+ 1 = 9"
    ):
        build_text_lm(_teacher_config(path=str(tmp_path), val_fraction=0.5))
    with pytest.raises(ConfigError, match=r"data.val_fraction=1.0 must be in \(0, 1\)"):
        build_text_lm(_teacher_config(path=str(tmp_path), val_fraction=1.0))
    with pytest.raises(ValueError, match="the text has 5 tokens, fewer than length"):
        st.random_windows(np.zeros(5, np.uint8), np.random.default_rng(0), 2, 8)


def test_sequence_longer_than_the_context_is_reported(tmp_path, capsys):
    with pytest.raises(ConfigError, match="data.length=9 is longer than the model context 8"):
        build_text_lm(_teacher_config(length=9))
    st.save_lm(tmp_path / "t.eqx", _teacher())
    with pytest.raises(ConfigError, match="data.length=9 is longer than the teacher context 8"):
        build_text_student(_student_config(tmp_path / "t.eqx", data={"length": 9}))
    teacher = _teacher()
    with pytest.raises(ValueError, match="length=12 is longer than the model context 8"):
        st.student_training(
            teacher,
            teacher,
            st.DistillConfig(),
            data=np.zeros(99, np.uint8),
            batch_size=2,
            length=12,
            steps=2,
            seed=0,
        )
    with pytest.raises(SystemExit):
        st.main(["shakespeare_teacher", "--set", "data.length=4096"])
    assert "data.length=4096 is longer than the model context 128" in capsys.readouterr().err


def test_unmeetable_parameter_budget_is_reported(tmp_path):
    teacher = _teacher()
    with pytest.raises(
        ValueError, match=r"student params=0.001: Budget\(params=0.001\) cannot be met"
    ):
        st.factorized_student(teacher, params=0.001, key=jr.key(0))
    with pytest.raises(ValueError, match="params=0.001 cannot be met by a dense student"):
        st.dense_student(teacher, params=0.001, key=jr.key(0))
    with pytest.raises(ValueError, match=r"student params=0 must be a fraction in \(0, 1\]"):
        st.dense_student(teacher, params=0, key=jr.key(0))
    st.save_lm(tmp_path / "t.eqx", teacher)
    with pytest.raises(ConfigError, match="model.params=0.001: .*cannot be met"):
        build_text_student(_student_config(tmp_path / "t.eqx", model={"params": 0.001}))
    with pytest.raises(ConfigError, match=r"model.params=1.5 must be a fraction in \(0, 1\]"):
        build_text_student(_student_config(tmp_path / "t.eqx", model={"params": 1.5}))


def test_vocabulary_mismatch_is_reported():
    teacher = _teacher()
    with pytest.raises(
        ValueError, match="teacher vocab_size=256 differs from student vocab_size=128"
    ):
        st.check_vocab(teacher, _teacher(vocab_size=128))
    with pytest.raises(ValueError, match="vocab_size=100 cannot hold the byte tokenizer"):
        st.check_vocab(_teacher(vocab_size=100), _teacher(vocab_size=100))
    config = _teacher_config()
    config = dataclasses.replace(config, model=TextModelConfig(**SMALL, vocab_size=100))
    with pytest.raises(ConfigError, match="model.vocab_size=100 cannot hold the byte tokenizer"):
        build_text_lm(config)


def test_bad_model_shape_is_reported():
    config = dataclasses.replace(
        _teacher_config(), model=TextModelConfig(**{**SMALL, "d_model": 9})
    )
    with pytest.raises(ConfigError, match="model: d_model=9 must be divisible by n_heads=2"):
        build_text_lm(config)


@pytest.mark.parametrize(
    "distill,match",
    [
        (dict(alpha=1.5), r"distill.alpha=1.5 must be in \[0, 1\]"),
        (dict(temperature=0.0), "distill.temperature=0.0 must be > 0"),
        (dict(mode="salt", n_kd=9), r"distill.n_kd=9 must be in \[1, train.steps=4\]"),
        (
            dict(mode="salt_ds", n_kd=2, ds_fraction=0.0),
            r"distill.ds_fraction=0.0 must be in \(0, 1\]",
        ),
        (dict(mode="salt_ds", n_kd=2, ds_k=0), r"distill.ds_k=0 must be in \[1, 256\]"),
        (dict(mode="salt_ds", n_kd=2, ds_pool=0), "distill.ds_pool=0 must be >= 1 window"),
    ],
)
def test_bad_distill_settings_are_reported(distill, match):
    with pytest.raises(ConfigError, match=match):
        st.check_distill(st.DistillConfig(**distill), steps=4)


def test_other_bad_inputs_are_reported(tmp_path, capsys):
    teacher = _teacher()
    with pytest.raises(ValueError, match="init='svd' is not a student init"):
        st.factorized_student(teacher, params=0.3, init="svd", key=jr.key(0))
    with pytest.raises(ValueError, match="init 'whitened' needs calibration data"):
        st.factorized_student(teacher, params=0.3, init="whitened", key=jr.key(0))
    with pytest.raises(ConfigError, match="model.teacher=.*no saved model at"):
        build_text_student(_student_config(tmp_path / "missing.eqx"))
    with pytest.raises(FileNotFoundError, match="no saved model at"):
        st.load_lm(tmp_path / "missing.eqx")
    with pytest.raises(SystemExit) as exit:
        st.main(["resnet18_digits"])
    assert exit.value.code == 2
    assert (
        "error: task='image_classification' is not one of python -m recipes.student's tasks "
        "(text_lm, text_student); run it with python -m recipes.run resnet18_digits."
    ) in capsys.readouterr().err
    with pytest.raises(ValueError, match="the history has no train records"):
        st.step_seconds([{"split": "eval", "loss": 1.0}], 8)
    with pytest.raises(ValueError, match="no latent-list task fits the model context 8"):
        st.latent_list_accuracy(teacher)


def test_no_learnable_window_is_reported():
    teacher = _teacher()
    # ln_f outputs the constant e_0, and byte "a" has the lowest logit: never in the top 1.
    ln = eqx.tree_at(
        lambda l: (l.weight, l.bias), teacher.ln_f, (jnp.zeros(16), jnp.zeros(16).at[0].set(1.0))
    )
    table = jnp.ones((256, 16)).at[ord("a"), 0].set(-1.0)
    teacher = eqx.tree_at(lambda m: (m.ln_f, m.token_embed.weight), teacher, (ln, table))
    distill = st.DistillConfig(mode="salt_ds", ds_pool=8, ds_k=1)
    with pytest.raises(ValueError, match="no training window has a token inside the teacher's top"):
        st.hard_learnable_windows(
            teacher, np.full(100, ord("a"), np.uint8), distill, length=8, seed=0
        )
