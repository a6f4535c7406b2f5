import time

import jax.numpy as jnp

from recipes._report import factorization_evals, format_report, step_seconds
from recipes.metrics import seconds_in_turns
from recipes.train import REPLACED

HISTORY = [
    {"step": 5, "split": "train", "loss": 2.0, "examples_per_s": 16.0},  # 2 s/step of 32
    {"step": 10, "split": "train", "loss": 1.5, "examples_per_s": 32.0},  # 1 s
    {"step": 10, "split": "train", "loss": 1.5, "examples_per_s": 64.0},  # 0.5 s
    {"step": 10, "split": "eval", "loss": 1.2, "accuracy": 0.8},
    {"step": 10, "split": "eval", "event": REPLACED, "loss": 1.9, "accuracy": 0.5},
    {"step": 15, "split": "train", "loss": 1.0, "examples_per_s": 128.0},  # 0.25 s
    {"step": 20, "split": "train", "loss": 0.9, "examples_per_s": 256.0},  # 0.125 s
    {"step": 20, "split": "eval", "loss": 0.8, "accuracy": 0.9},
]


def test_step_seconds_is_the_median_window_on_each_side_of_the_factorization():
    assert step_seconds(HISTORY, 32, until=10) == 1.0
    assert step_seconds(HISTORY, 32, after=10) == (0.25 + 0.125) / 2
    assert step_seconds(HISTORY, 32, after=20) is None


def test_factorization_evals_pick_before_after_and_final():
    evals = factorization_evals(HISTORY)
    assert evals == {
        "before": {"step": 10, "loss": 1.2, "accuracy": 0.8},
        "after": {"step": 10, "loss": 1.9, "accuracy": 0.5},
        "final": {"step": 20, "loss": 0.8, "accuracy": 0.9},
    }
    no_warmup = [r for r in HISTORY if r["split"] == "train" or r["step"] == 20]
    assert factorization_evals(no_warmup) == {"final": {"step": 20, "loss": 0.8, "accuracy": 0.9}}


def test_format_report_puts_the_time_ratio_next_to_the_flop_ratio():
    report = {
        "params_dense": 1000,
        "params_low": 250,
        "params_ratio": 0.25,
        "flops_dense": 4000,
        "flops_low": 2000,
        "flops_ratio": 0.5,
        "inference_s_dense": 0.2,
        "inference_s_low": 0.12,
        "inference_time_ratio": 0.6,
        "train_step_s_dense": 1.0,
        "train_step_s_low": 0.8,
        "train_step_ratio": 0.8,
        "evals": factorization_evals(HISTORY),
    }
    text = format_report(report, 128)
    assert "parameters: 1,000 -> 250 (x0.250)" in text
    assert "dense 200.0 ms, factorized 120.0 ms -> time ratio 0.600 vs FLOP ratio 0.500" in text
    assert "train step (median): dense 1000 ms, factorized 800 ms -> ratio 0.800" in text
    assert "eval right after factorization (step 10): loss 1.9000, accuracy 0.5000" in text


def test_seconds_in_turns_times_each_model_and_keeps_its_best_round():
    calls = []

    def fn(seconds):
        calls.append(seconds)
        time.sleep(seconds)
        return jnp.zeros(())

    fast, slow = seconds_in_turns(fn, [0.001, 0.02], rounds=2, repeats=3)
    assert 0.001 <= fast < 0.02 <= slow < 0.2
    assert calls == [0.001, 0.02] + ([0.001] * 3 + [0.02] * 3) * 2  # compile, then turns
