"""Smoke check that the language-model pieces fit together, on CPU, in a few minutes.

1. a tiny byte-level teacher trained on Shakespeare (train plays only) by the shared
   trainer (`recipes.train.train`);
2. a smaller dense student trained twice for the same steps: plain next-byte training,
   and SALT (KD from the teacher for the first n_kd steps, then plain training);
3. a low-rank student: the teacher factorized by `lowrank.factorize` (spectral init,
   a quarter of full rank), scored as is and after a short KD fine-tune from the teacher;
4. validation bits per byte on unseen plays, the latent-list check, and a sample.

    .venv/bin/python -m bench.distill_smoke [--steps 250] [--student-steps 150]

Not a benchmark of speed; numbers are noisy at this size. Prints a table
(`--write-results` also writes it into bench/RESULTS.md).
"""

import argparse
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

import lowrank
from bench._results import markdown_table, write_section
from recipes.config import TrainConfig
from recipes.distill import kd_loss, salt_alpha
from recipes.longcontext import generate, likelihood_accuracy, make_list_tasks
from recipes.models import Transformer
from recipes.text import decode, encode, eval_windows, load_corpus, sample_windows
from recipes.train import train as train_loop


def train(
    model, data, *, steps, key, batch, length, lr, teacher=None, n_kd=0, alpha=0.0, temperature=2.0
):
    """AdamW with warm-up + cosine decay by `recipes.train.train`; SALT distillation
    when `teacher` is given (it rides in the trainer's state slot, and each batch
    carries the step's KD weight). Returns the trained model."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 5), steps, lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, weight_decay=0.01))
    sample = jax.jit(sample_windows, static_argnames=("batch_size", "length"))
    data, keys = jnp.asarray(data), jr.split(key, steps)

    def batches(step):
        for i in range(step, steps):
            windows = sample(data, key=keys[i], batch_size=batch, length=length)
            a = salt_alpha(i, n_kd=n_kd, alpha=alpha) if teacher is not None else 0.0
            yield {"windows": windows, "alpha": np.full(batch, a, np.float32)}

    def loss_fn(model, teacher, b, key):
        x, y = b["windows"][:, :-1], b["windows"][:, 1:]
        s_logits = jax.vmap(model)(x)
        if teacher is None:
            a, t_logits = 0.0, s_logits
        else:
            a, t_logits = b["alpha"][0], jax.vmap(teacher)(x)
        loss = kd_loss(s_logits, t_logits, y, alpha=a, temperature=temperature)
        return loss, (teacher, {})

    config = TrainConfig(steps=steps, log_every=0, progress=False)
    return train_loop(
        model,
        teacher,
        loss_fn=loss_fn,
        optimizer=opt,
        schedule=schedule,
        train_data=batches,
        config=config,
    ).model


def bits_per_byte(model, windows, chunk=64):
    """Mean next-byte cross-entropy on the windows, in bits."""

    @eqx.filter_jit
    def nats(model, w):
        logp = jax.nn.log_softmax(jax.vmap(model)(w[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1).mean()

    usable = len(windows) - len(windows) % chunk
    losses = [nats(model, jnp.asarray(windows[i : i + chunk])) for i in range(0, usable, chunk)]
    return float(np.mean(losses)) / math.log(2)


def _n_params(model) -> int:
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def _print_rows(rows, write_results: bool) -> None:
    """The table of (name, steps, bits/byte, seconds) rows, printed (and written)."""
    print(f"\n{'model':26s} {'steps':>6s} {'val bits/byte':>14s} {'seconds':>8s}")
    for name, steps, bpb, secs in rows:
        print(f"{name:26s} {steps:6d} {bpb:14.3f} {secs:8.1f}")
    print("(uniform over 256 bytes = 8.000 bits/byte)")
    if write_results:
        table = markdown_table(
            ["model", "steps", "val bits/byte", "seconds"],
            [[n.strip(), st, round(b, 3), round(t, 1)] for n, st, b, t in rows],
        )
        write_section("distill_smoke", "Distillation smoke (Shakespeare, byte level)", table)


def _probe(teacher, length: int) -> None:
    """Print the teacher's latent-list accuracy and a sample continuation."""
    tasks = make_list_tasks(32, seed=0, n_ops=3, n_distractors=2)
    tasks = [t for t in tasks if len(t.prompt) + 8 <= length][:16]
    acc = likelihood_accuracy(teacher, tasks)
    print(f"latent list (teacher, {len(tasks)} tasks, 4 choices, chance 0.25): {acc:.2f}")
    prompt = encode("ROMEO.\n")
    sample = generate(teacher, jnp.asarray(prompt), 120, key=jr.key(1), temperature=0.8)
    print("sample:", repr(decode(np.concatenate([prompt, np.asarray(sample)]))))


def _args():
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="teacher steps")
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--lowrank-steps", type=int, default=100)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument(
        "--write-results", action="store_true", help="also write the table into bench/RESULTS.md"
    )
    return parser.parse_args()


def main():
    args = _args()

    start = time.perf_counter()
    corpus = load_corpus(val_fraction=0.1, seed=0)
    val = eval_windows(corpus.validation, args.length, max_windows=args.eval_windows)
    print(
        f"corpus: {len(corpus.train):,} train bytes ({len(corpus.train_files)} works), "
        f"{len(corpus.validation):,} validation bytes ({len(corpus.val_files)} unseen works)"
    )
    shape = dict(context=args.length, n_heads=4)
    key_t, key_s, key_train = jr.split(jr.key(0), 3)
    teacher = Transformer(d_model=128, n_layers=3, **shape, key=key_t)
    student = Transformer(d_model=64, n_layers=2, **shape, key=key_s)
    common = dict(data=corpus.train, batch=args.batch, length=args.length, lr=3e-3)
    rows = []

    t0 = time.perf_counter()
    teacher = train(teacher, steps=args.steps, key=key_train, **common)
    teacher = eqx.nn.inference_mode(teacher)
    rows.append(
        ("teacher d128 L3", args.steps, bits_per_byte(teacher, val), time.perf_counter() - t0)
    )

    for name, kd in [
        ("student d64 L2 plain", {}),
        ("student d64 L2 SALT", dict(teacher=teacher, alpha=0.5, n_kd=args.student_steps // 2)),
    ]:
        t0 = time.perf_counter()
        model = train(student, steps=args.student_steps, key=key_train, **common, **kd)
        rows.append((name, args.student_steps, bits_per_byte(model, val), time.perf_counter() - t0))

    t0 = time.perf_counter()
    low = lowrank.factorize(teacher, rank=0.25, init="spectral")
    ratio = _n_params(low) / _n_params(teacher)
    rows.append(
        (f"teacher low-rank x{ratio:.2f}", 0, bits_per_byte(low, val), time.perf_counter() - t0)
    )
    t0 = time.perf_counter()
    low = train(
        low,
        steps=args.lowrank_steps,
        key=key_train,
        teacher=teacher,
        alpha=0.5,
        n_kd=args.lowrank_steps,
        **{**common, "lr": 1e-3},
    )
    rows.append(
        ("  + KD fine-tune", args.lowrank_steps, bits_per_byte(low, val), time.perf_counter() - t0)
    )

    _print_rows(rows, args.write_results)
    _probe(teacher, args.length)
    print(f"total {time.perf_counter() - start:.0f} s on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
