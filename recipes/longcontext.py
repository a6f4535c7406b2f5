"""A synthetic, automatically scored long-context check, and token generation.

In the spirit of Michelangelo's "latent list" (arXiv:2409.12640): a short Python program
builds a list `x` through many operations (append, pop, insert, remove, reverse) mixed
with distractor lines that never touch `x`, then prints a query about it (its length,
one element, or its sum). Answering needs the whole program, not a nearby line.
The ground truth is the output of really running the operations on a Python list.

A model is scored by multiple choice by likelihood (`likelihood_accuracy`: the candidate
answer with the highest log-probability after the prompt wins) or by greedy decoding
(`greedy_accuracy`). Everything is deterministic from a seed.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Float

from recipes.text import encode

from ._sampling import decode_into
from ._sampling import generate as generate

_QUERIES = ("len", "index", "sum")
_ANSWER_MARK = "# output: "


@dataclasses.dataclass(frozen=True)
class ListTask:
    """One latent-list question.

    Attributes:
        program: runnable Python whose only output is `answer` + newline.
        prompt: the program followed by `# output: `, the text a model continues.
        answer: the correct output.
        candidates: distinct answers, the correct one among them.
        answer_index: where it is: `candidates[answer_index] == answer`.
    """

    program: str
    prompt: str
    answer: str
    candidates: tuple[str, ...]
    answer_index: int


def _list_op(rng: np.random.Generator, x: list[int]) -> str:
    """Pick a valid operation on `x`, apply it to `x` for real, return its source line."""
    ops = ["append", "insert"] + (["pop", "remove", "reverse"] if x else [])
    op = ops[rng.integers(len(ops))]
    value = int(rng.integers(100))
    if op == "append":
        x.append(value)
        return f"x.append({value})"
    if op == "insert":
        i = int(rng.integers(len(x) + 1))
        x.insert(i, value)
        return f"x.insert({i}, {value})"
    if op == "pop":
        x.pop()
        return "x.pop()"
    if op == "remove":
        value = x[rng.integers(len(x))]
        x.remove(value)
        return f"x.remove({value})"
    x.reverse()
    return "x.reverse()"


def _distractor(rng: np.random.Generator, names: list[str]) -> str:
    """A line that never reads or writes `x`: scalar arithmetic or ops on list `y`."""
    kind = rng.integers(4)
    value = int(rng.integers(100))
    if kind == 0:
        return f"y.append({value})"
    if kind == 1:
        return "y.reverse()"
    name = ["a", "b", "n", "total"][rng.integers(4)]
    if kind == 2 or not names:
        line = f"{name} = {value}"
    else:
        line = f"{name} = {names[rng.integers(len(names))]} + {value}"
    if name not in names:
        names.append(name)
    return line


def _candidates(rng: np.random.Generator, answer: int, pool: list[int], n: int) -> list[int]:
    """`n` distinct integers: the answer plus wrong ones, preferring `pool`."""
    wrong = list(dict.fromkeys(v for v in pool if v != answer))
    rng.shuffle(wrong)
    out = [answer] + wrong[: n - 1]
    spread = 1
    while len(out) < n:
        for guess in (answer + spread, answer - spread):
            if guess >= 0 and guess not in out and len(out) < n:
                out.append(guess)
        spread += 1
    return out


def make_list_task(
    seed: int | tuple[int, ...],
    *,
    n_ops: int = 20,
    n_distractors: int = 20,
    n_candidates: int = 4,
    queries: tuple[str, ...] = _QUERIES,
) -> ListTask:
    """One task, a pure function of `seed` and the sizes. Longer programs (more ops and
    distractors) need longer context.

    Args:
        seed: the task's seed.
        n_ops: operations on the list `x`.
        n_distractors: lines that never touch `x`.
        n_candidates: answers to choose from.
        queries: the kinds of question asked about `x`.

    Returns:
        The `ListTask`.
    """
    if n_ops < 1 or n_distractors < 0:
        raise ValueError(
            f"need n_ops >= 1 and n_distractors >= 0, got n_ops={n_ops}, "
            f"n_distractors={n_distractors}"
        )
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2 for multiple choice, got {n_candidates}")
    if not queries or not set(queries) <= set(_QUERIES):
        raise ValueError(f"queries must be a non-empty subset of {_QUERIES}, got {queries!r}")
    rng = np.random.default_rng(seed)
    x = [int(v) for v in rng.integers(100, size=rng.integers(1, 4))]
    lines = [f"x = {x!r}", f"y = [{int(rng.integers(100))}]"]
    names: list[str] = []
    kinds = np.array([True] * n_ops + [False] * n_distractors)
    rng.shuffle(kinds)
    for is_op in kinds:
        lines.append(_list_op(rng, x) if is_op else _distractor(rng, names))
    query = queries[rng.integers(len(queries))]
    if query == "index" and not x:
        query = "len"
    if query == "len":
        lines.append("print(len(x))")
        answer, pool = len(x), []
    elif query == "index":
        i = int(rng.integers(len(x)))
        lines.append(f"print(x[{i}])")
        answer, pool = x[i], x
    else:
        lines.append("print(sum(x))")
        answer, pool = sum(x), [sum(x) - v for v in x] + [sum(x) + v for v in x]
    cands = _candidates(rng, answer, pool, n_candidates)
    order = rng.permutation(n_candidates)
    cands = [str(cands[i]) for i in order]
    program = "\n".join(lines) + "\n"
    return ListTask(
        program=program,
        prompt=program + _ANSWER_MARK,
        answer=str(answer),
        candidates=tuple(cands),
        answer_index=cands.index(str(answer)),
    )


def make_list_tasks(n: int, *, seed: int = 0, **sizes) -> list[ListTask]:
    """`n` tasks; task i uses seed (seed, i), so a longer list extends a shorter one.

    Args:
        n: how many tasks.
        seed: the base seed.
        **sizes: as `make_list_task`.

    Returns:
        The tasks.
    """
    return [make_list_task((seed, i), **sizes) for i in range(n)]


def _window(model, length: int, context: int | None) -> int | None:
    context = getattr(model, "context", None) if context is None else context
    if context is not None and length > context:
        raise ValueError(
            f"task of {length} tokens exceeds the model context {context}; use fewer "
            "n_ops / n_distractors or a model with a larger context"
        )
    return context


@eqx.filter_jit
def _candidate_logprob(model, inputs, targets, mask):
    logp = jax.nn.log_softmax(jax.vmap(model)(inputs), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def candidate_logprobs(
    model, tasks: list[ListTask], *, batch_size: int = 32, context: int | None = None
) -> Float[np.ndarray, "n_tasks n_candidates"]:
    """log p(candidate + newline | prompt) under `model` (ids (T,) -> logits (T, 256),
    in inference mode), summed over the candidate's bytes, for every task and candidate.
    All sequences are right-padded to one length: a causal model ignores the padding.

    Args:
        model: a language model, ids (T,) -> logits (T, 256).
        tasks: the tasks.
        batch_size: sequences per forward.
        context: the most tokens the model sees (default `model.context`, if any).

    Returns:
        (n_tasks, n_candidates) log-probabilities.
    """
    prompts = [encode(t.prompt) for t in tasks for _ in t.candidates]
    answers = [encode(c + "\n") for t in tasks for c in t.candidates]
    seqs = [np.concatenate([p, a]) for p, a in zip(prompts, answers)]
    length = max(len(s) for s in seqs) - 1
    _window(model, length, context)
    n_pad = -len(seqs) % batch_size
    ids = np.zeros((len(seqs) + n_pad, length + 1), np.int32)
    mask = np.zeros((len(seqs) + n_pad, length), bool)
    for row, (p, s) in enumerate(zip(prompts, seqs)):
        ids[row, : len(s)] = s
        mask[row, len(p) - 1 : len(s) - 1] = True  # targets are the answer bytes
    scores = [
        _candidate_logprob(
            model,
            ids[i : i + batch_size, :-1],
            ids[i : i + batch_size, 1:],
            mask[i : i + batch_size],
        )
        for i in range(0, len(ids), batch_size)
    ]
    flat = np.concatenate([np.asarray(s) for s in scores])[: len(seqs)]
    return flat.reshape(len(tasks), -1)


def likelihood_accuracy(model, tasks: list[ListTask], **kwargs) -> float:
    """Fraction of tasks whose most likely candidate is the true answer.

    Args:
        model: a language model, ids (T,) -> logits (T, 256).
        tasks: the tasks.
        **kwargs: as `candidate_logprobs`.

    Returns:
        The accuracy in [0, 1].
    """
    scores = candidate_logprobs(model, tasks, **kwargs)
    truth = np.array([t.answer_index for t in tasks])
    return float(np.mean(np.argmax(scores, axis=1) == truth))


def greedy_accuracy(model, tasks: list[ListTask], *, context: int | None = None) -> float:
    """Fraction of tasks where greedy decoding after the prompt writes the answer and
    then a newline. One compile: prompts are right-padded into one buffer length.

    Args:
        model: a language model, ids (T,) -> logits (T, 256).
        tasks: the tasks.
        context: the most tokens the model sees (default `model.context`, if any).

    Returns:
        The accuracy in [0, 1].
    """
    prompts = [encode(t.prompt) for t in tasks]
    n = max(len(t.answer) for t in tasks) + 1
    size = max(len(p) for p in prompts) + n
    window = _window(model, size, context)
    buffers = np.zeros((len(tasks), size), np.int32)
    for row, p in enumerate(prompts):
        buffers[row, : len(p)] = p
    starts = jnp.asarray([len(p) for p in prompts])
    decode = jax.vmap(lambda b, s: decode_into(model, b, s, jr.key(0), n, 0.0, window))
    out = np.asarray(decode(jnp.asarray(buffers), starts))
    hits = [
        bytes(out[row, len(p) : len(p) + len(t.answer) + 1].tolist()) == (t.answer + "\n").encode()
        for row, (p, t) in enumerate(zip(prompts, tasks))
    ]
    return float(np.mean(hits))
