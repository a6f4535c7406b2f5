"""Students of a byte-level Shakespeare teacher at 50% and 25% of its non-embedding
parameters, all trained for the same number of steps with the shared trainer:

- scratch CE: a narrower dense Transformer (same depth) of matching size, from scratch;
- factorized (lowrank, `--init` from the teacher's weights) + CE, + KD, + SALT
  (KD for the first `--n-kd` steps, then CE), + SALT_DS (that KD phase on the windows
  the teacher scores hard but learnable).

Scored on unseen plays (validation loss, bits per byte, KL to the teacher), the
latent-list check (4-way multiple choice, chance 0.25), inference tokens/s (one batched
forward; all models timed in alternating rounds at the end, median of 7 rounds) and
train seconds per step (the trainer's, mean over logging windows after the first: on a
shared CPU these drift with the load), all measured in this run on this machine.

    .venv/bin/python -m bench.distill [--teacher-steps 1000 --student-steps 160] [--write-results]
"""

import argparse
import math
import time
from pathlib import Path

import equinox as eqx
import jax.random as jr
import numpy as np

from bench._distill_fit import Bench, fit, throughputs
from bench._results import markdown_table, write_section
from recipes import student as st
from recipes.models import Transformer
from recipes.text import eval_windows, load_corpus

OUT = Path(__file__).with_name("out")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=1000)
    parser.add_argument("--student-steps", type=int, default=160)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="context and window length")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument(
        "--student-lr", type=float, default=1e-3, help="for students initialized from the teacher"
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--init", default="whitened", choices=["spectral", "whitened", "nkp"])
    parser.add_argument("--n-kd", type=float, default=0.5, help="SALT KD phase, fraction of steps")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ds-pool", type=int, default=1024)
    parser.add_argument("--ds-fraction", type=float, default=0.5)
    parser.add_argument("--eval-windows", type=int, default=128)
    parser.add_argument("--list-tasks", type=int, default=32)
    parser.add_argument(
        "--reuse-teacher",
        action="store_true",
        help=f"load {OUT}/distill_teacher.eqx if present instead of training",
    )
    parser.add_argument("--write-results", action="store_true")
    return parser.parse_args()


def _teacher(bench: Bench):
    """The trained (or, with --reuse-teacher, reloaded) teacher, scored as row 0."""
    args = bench.args
    saved = OUT / "distill_teacher.eqx"
    if args.reuse_teacher and saved.exists():
        teacher, history, seconds = st.load_lm(saved), None, 0.0
    else:
        teacher = Transformer(
            context=args.length,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=4,
            key=jr.key(0),
        )
        stream = st.train_batches(bench.corpus.train, **{**bench.common, "seed": 0})
        teacher, history, seconds = fit(
            teacher,
            None,
            st.lm_loss,
            stream,
            steps=args.teacher_steps,
            lr=args.teacher_lr,
            warmup=min(50, args.teacher_steps // 10),
            eval_data=bench.eval_data,
            log_every=max(1, args.teacher_steps // 8),
        )
        st.save_lm(saved, teacher)
        teacher = eqx.nn.inference_mode(teacher)
    bench.teacher_params = st.non_embedding_params(teacher)
    if history is None:  # reused: score it here, with no train time to report
        history = [
            {"split": "eval", "loss": st.validation_loss(teacher, bench.val)},
            {"split": "train", "examples_per_s": float("nan")},
        ]
    name = f"teacher d{args.d_model} L{args.layers} ({args.teacher_steps} steps)"
    bench.add_row(name, teacher, history, seconds)
    return teacher


def _recipes(args: argparse.Namespace, n_kd: int) -> dict[str, st.DistillConfig]:
    kd = {"alpha": args.alpha, "temperature": args.temperature}
    return {
        "ce": st.DistillConfig(mode="ce"),
        "kd": st.DistillConfig(mode="kd", **kd),
        "salt": st.DistillConfig(mode="salt", **kd, n_kd=n_kd),
        "salt_ds": st.DistillConfig(
            mode="salt_ds", **kd, n_kd=n_kd, ds_pool=args.ds_pool, ds_fraction=args.ds_fraction
        ),
    }


def _students(bench: Bench, teacher, recipes: dict) -> dict[str, float]:
    """Train and score every student (and the teacher's same-compute continuation);
    returns the seconds each factorization took, by fraction."""
    args, train_bytes, steps = bench.args, bench.corpus.train, bench.args.student_steps
    from_teacher = {"steps": steps, "lr": args.student_lr, "warmup": min(20, steps // 10)}
    # Same-compute reference: the dense teacher trained for the students' steps more.
    state, loss_fn, stream = st.student_training(
        teacher, teacher, recipes["ce"], data=train_bytes, steps=steps, **bench.common
    )
    bench.fit_and_score(
        f"teacher + {steps} steps CE",
        eqx.nn.inference_mode(teacher, value=False),
        state,
        loss_fn,
        stream,
        **from_teacher,
    )
    init_seconds = {}
    calibration = st.random_windows(train_bytes, np.random.default_rng([0, 3]), 32, args.length)
    for fraction in args.fractions:
        pct = f"{100 * fraction:g}%"
        scratch = st.dense_student(teacher, params=fraction, key=jr.key(1))
        state, loss_fn, stream = st.student_training(
            teacher, scratch, recipes["ce"], data=train_bytes, steps=steps, **bench.common
        )
        bench.fit_and_score(
            f"{pct} scratch d{scratch.d_model} CE",
            scratch,
            state,
            loss_fn,
            stream,
            steps=steps,
            lr=args.teacher_lr,
            warmup=min(50, steps // 10),
        )
        t0 = time.perf_counter()
        student, _ = st.factorized_student(
            teacher, params=fraction, init=args.init, calibration=calibration[:, :-1], key=jr.key(2)
        )
        init_seconds[pct] = time.perf_counter() - t0
        start_loss = st.validation_loss(student, bench.val)
        print(
            f"{pct} factorized ({args.init}): init {init_seconds[pct]:.1f} s, "
            f"val bpb {start_loss / math.log(2):.3f} before training",
            flush=True,
        )
        for name, distill in recipes.items():
            state, loss_fn, stream = st.student_training(
                teacher, student, distill, data=train_bytes, steps=steps, **bench.common
            )
            bench.fit_and_score(
                f"{pct} lowrank {args.init} {name.upper()}",
                student,
                state,
                loss_fn,
                stream,
                **from_teacher,
                start_loss=start_loss,
            )
    return init_seconds


def _table(rows: list[dict]) -> str:
    header = [
        "model",
        "non-emb params",
        "bpb at init",
        "val loss",
        "val bits/byte",
        "KL to teacher",
        "latent list acc",
        "train s/step",
        "infer tok/s",
        "train s",
    ]
    return markdown_table(
        header,
        [
            [
                r["model"],
                f"{r['params']:.3f}",
                "-" if r["start_bpb"] is None else round(r["start_bpb"], 3),
                round(r["val_loss"], 4),
                round(r["val_bpb"], 3),
                "-" if r["kl"] is None else round(r["kl"], 4),
                round(r["list_acc"], 3),
                round(r["step_s"], 3),
                int(r["tok_s"]),
                round(r["seconds"], 1),
            ]
            for r in rows
        ],
    )


def _verdicts(rows: list[dict], fractions: list[float], steps: int) -> list[str]:
    teacher_loss = rows[0]["val_loss"]
    continued = rows[1]["val_loss"]
    verdicts = []
    for fraction in fractions:
        pct = f"{100 * fraction:g}%"
        mine = [r for r in rows if r["model"].startswith(pct + " lowrank")]
        best = min(mine, key=lambda r: r["val_loss"])
        scratch = next(r for r in rows if r["model"].startswith(pct + " scratch"))
        gap = best["val_loss"] / teacher_loss - 1
        verdicts.append(
            f"- {pct}: best recipe `{best['model']}` val loss {best['val_loss']:.4f} = "
            f"teacher {'+' if gap >= 0 else ''}{100 * gap:.1f}% (target within 5%: "
            f"{'met' if gap <= 0.05 else 'NOT met'}); same-size scratch {scratch['val_loss']:.4f} "
            f"(best recipe {100 * (1 - best['val_loss'] / scratch['val_loss']):.1f}% lower); "
            f"dense teacher given the same {steps} extra steps {continued:.4f}."
        )
    return verdicts


def main():
    args = _arguments()
    start = time.perf_counter()

    corpus = load_corpus(val_fraction=0.1, seed=0)
    val = eval_windows(corpus.validation, args.length, max_windows=args.eval_windows)
    bench = Bench(args, corpus, val, st.eval_batches(val, 32))
    print(
        f"corpus: {len(corpus.train):,} train bytes, {len(corpus.validation):,} validation "
        f"bytes ({len(corpus.val_files)} unseen works); {len(val)} eval windows",
        flush=True,
    )
    teacher = _teacher(bench)
    steps = args.student_steps
    n_kd = max(1, round(args.n_kd * steps))
    init_seconds = _students(bench, teacher, _recipes(args, n_kd))

    rows = bench.rows
    tok_s = throughputs([r["trained"] for r in rows], batch=args.batch, length=args.length)
    for row, rate in zip(rows, tok_s, strict=True):
        row["tok_s"] = rate
    notes = (
        f"Same {steps} optimizer steps for every student (batch {args.batch} x {args.length} "
        f"bytes); teacher {args.teacher_steps} steps. Students from the teacher: AdamW lr "
        f"{args.student_lr}; scratch and teacher: lr {args.teacher_lr}. KD alpha {args.alpha}, "
        f"T {args.temperature}; SALT/SALT_DS KD for the first {n_kd} steps; SALT_DS keeps "
        f"{args.ds_fraction:g} of {args.ds_pool} teacher-scored windows. Validation: "
        f"{len(val)} windows of unseen plays. Factorizing (plan + {args.init} init on 32 "
        f"calibration windows) took "
        f"{', '.join(f'{v:.0f} s ({k})' for k, v in init_seconds.items())}. Whole run {time.perf_counter() - start:.0f} s."
    )
    body = "\n\n".join([_table(rows), "\n".join(_verdicts(rows, args.fractions, steps)), notes])
    print(body)
    if args.write_results:
        write_section("distill", "Distillation into low-rank students (Shakespeare, bytes)", body)


if __name__ == "__main__":
    main()
