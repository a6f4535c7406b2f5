import contextlib
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from recipes import longcontext as lc
from recipes.models import Transformer


def _run(program: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(program, {})  # noqa: S102 - our own generated program
    return out.getvalue()


def test_answers_match_executing_the_program():
    tasks = lc.make_list_tasks(60, seed=3, n_ops=15, n_distractors=10)
    kinds = set()
    for task in tasks:
        assert _run(task.program) == task.answer + "\n"
        assert task.prompt == task.program + "# output: "
        assert task.candidates[task.answer_index] == task.answer
        assert len(set(task.candidates)) == len(task.candidates) == 4
        query = task.program.splitlines()[-1]
        kinds.add("len" if "len(" in query else "sum" if "sum(" in query else "index")
        assert sum(line.startswith("x.") for line in task.program.splitlines()) == 15
    assert kinds == {"len", "index", "sum"}


def test_distractors_never_touch_x():
    task = lc.make_list_task(5, n_ops=3, n_distractors=40)
    lines = task.program.splitlines()
    body = lines[2:-1]
    list_ops = [line for line in body if line.startswith("x.")]
    others = [line for line in body if not line.startswith("x.")]
    assert len(list_ops) == 3 and len(others) == 40
    assert not any("x" in line.replace("y.", "") for line in others)


def test_deterministic_and_prefix_stable():
    a = lc.make_list_tasks(5, seed=1, n_ops=10, n_distractors=5)
    b = lc.make_list_tasks(8, seed=1, n_ops=10, n_distractors=5)
    c = lc.make_list_tasks(5, seed=2, n_ops=10, n_distractors=5)
    assert a == b[:5]
    assert a != c


def test_length_grows_with_ops():
    short = lc.make_list_tasks(10, n_ops=5, n_distractors=0)
    long = lc.make_list_tasks(10, n_ops=50, n_distractors=50)
    assert min(len(t.prompt) for t in long) > 3 * max(len(t.prompt) for t in short)


def _oracle(task: lc.ListTask, length: int):
    """A 'model' that always predicts the bytes of prompt + answer + newline."""
    seq = np.frombuffer((task.prompt + task.answer + "\n").encode(), np.uint8)
    target = np.zeros(length + 1, np.int32)
    target[: len(seq)] = seq
    table = jax.nn.one_hot(jnp.asarray(target[1:]), 256) * 20.0

    def model(ids):
        return table[: ids.shape[0]]

    return model


def test_likelihood_scores_against_reference_and_oracle():
    tasks = lc.make_list_tasks(3, seed=0, n_ops=4, n_distractors=2)
    model = Transformer(context=128, d_model=16, n_layers=1, n_heads=2, key=jr.key(0))
    got = lc.candidate_logprobs(model, tasks, batch_size=8)
    assert got.shape == (3, 4)
    # reference: one forward pass per sequence (right-padded to one length, which a
    # causal model ignores), log-probs of the answer bytes summed in float64
    seqs = [
        np.frombuffer((t.prompt + c + "\n").encode(), np.uint8).astype(np.int32)
        for t in tasks
        for c in t.candidates
    ]
    padded = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for row, seq in enumerate(seqs):
        padded[row, : len(seq)] = seq
    batched = eqx.filter_jit(lambda m, ids: jax.vmap(m)(ids))
    logits = np.asarray(batched(model, jnp.asarray(padded)), np.float64)
    for row, seq in enumerate(seqs):
        n_prompt = len(tasks[row // 4].prompt)
        logp = logits[row] - logits[row].max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        want = sum(logp[t - 1, seq[t]] for t in range(n_prompt, len(seq)))
        np.testing.assert_allclose(got[row // 4, row % 4], want, rtol=1e-4)
    for task in tasks:
        assert lc.likelihood_accuracy(_oracle(task, 256), [task]) == 1.0


def test_greedy_accuracy_with_oracle():
    tasks = lc.make_list_tasks(4, seed=0, n_ops=4, n_distractors=2)
    assert all(lc.greedy_accuracy(_oracle(t, 256), [t]) == 1.0 for t in tasks)
    wrong = lc.ListTask(tasks[0].program, tasks[0].prompt, "999", ("999", "1"), 0)
    assert lc.greedy_accuracy(_oracle(tasks[0], 256), [wrong]) == 0.0


def test_task_longer_than_context_errors():
    tasks = lc.make_list_tasks(1, n_ops=30, n_distractors=30)
    model = Transformer(context=64, d_model=16, n_layers=1, n_heads=2, key=jr.key(0))
    with pytest.raises(ValueError, match="exceeds the model context 64; use fewer n_ops"):
        lc.candidate_logprobs(model, tasks)
    with pytest.raises(ValueError, match="exceeds the model context 64"):
        lc.greedy_accuracy(model, tasks)


def _count_up(ids):
    """Next token = last token + 1 (mod 256), as logits."""
    return jax.nn.one_hot((ids + 1) % 256, 256) * 10.0


def test_generate_greedy_counts_up():
    out = lc.generate(_count_up, jnp.asarray([3, 5]), 6, temperature=0.0)
    np.testing.assert_array_equal(out, [6, 7, 8, 9, 10, 11])


def test_generate_sliding_window_matches_naive_loop():
    model = Transformer(context=8, d_model=16, n_layers=1, n_heads=2, key=jr.key(1))
    prompt = jnp.asarray([1, 2, 3], jnp.int32)
    out = [int(t) for t in lc.generate(model, prompt, 9, temperature=0.0)]
    forward = eqx.filter_jit(model)
    seq = [1, 2, 3]
    for token in out:
        window = seq[-8:]  # the model's context; zero-padded to one shape (causal)
        logits = np.asarray(forward(jnp.asarray(window + [0] * (8 - len(window)), jnp.int32)))
        row = logits[len(window) - 1]
        # generate's token is the naive loop's argmax, up to float32 near-ties (the two
        # compute the logits differently); then follow generate's choice
        assert row[token] >= row.max() - 1e-5 * np.abs(row).max(), (len(seq), token, row.argmax())
        seq.append(token)


@pytest.mark.parametrize("temperature,p0", [(1.0, 0.7), (0.5, 0.49 / 0.58)])
def test_generate_temperature_sampling_frequencies(temperature, p0):
    logits = jnp.log(jnp.zeros(256).at[0].set(0.7).at[1].set(0.3) + 1e-30)

    def model(ids):
        return jnp.broadcast_to(logits, (ids.shape[0], 256))

    out = np.asarray(
        lc.generate(
            model, jnp.asarray([0]), 4000, key=jr.key(0), temperature=temperature, context=1
        )
    )
    assert set(out.tolist()) <= {0, 1}
    assert abs(np.mean(out == 0) - p0) < 0.03  # ~4 standard errors


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: lc.generate(_count_up, jnp.zeros((0,), jnp.int32), 3, temperature=0.0),
            "prompt_ids must be a non-empty 1-D sequence",
        ),
        (
            lambda: lc.generate(_count_up, jnp.asarray([1]), -1, temperature=0.0),
            "n must be >= 0 tokens",
        ),
        (
            lambda: lc.generate(_count_up, jnp.asarray([1]), 2, temperature=-1.0),
            "temperature must be >= 0",
        ),
        (
            lambda: lc.generate(_count_up, jnp.asarray([1]), 2, temperature=1.0),
            "needs a PRNG key: pass key=",
        ),
        (lambda: lc.make_list_task(0, n_ops=0), "need n_ops >= 1"),
        (lambda: lc.make_list_task(0, n_candidates=1), "n_candidates must be >= 2"),
        (lambda: lc.make_list_task(0, queries=("max",)), "queries must be a non-empty subset"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
