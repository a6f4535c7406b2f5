"""Timing a dense model next to its factorization, in alternating rounds, on all cores
or on one thread (for bench/model_speed.py)."""

import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor

import equinox as eqx
import jax

from bench._results import median_time
from bench._xla_options import OPTIONS


def batched_forward(model, x):
    """`model` vmapped over the batch `x`."""
    return jax.vmap(model)(x)


FORWARD = eqx.filter_jit(batched_forward)
ONE_THREAD_FLAGS = OPTIONS["one_thread"]


def time_pair(dense, low, *args, repeats, forward=FORWARD):
    """Medians of `forward(model, *args)` for dense and low-rank, timed in alternating
    rounds so drift hits both."""
    dense_times, low_times = [], []
    for _ in range(repeats // 5):
        dense_times.append(median_time(forward, dense, *args, repeats=5, warmup=1))
        low_times.append(median_time(forward, low, *args, repeats=5, warmup=1))
    return statistics.median(dense_times), statistics.median(low_times)


def on_one_thread(fn, *args):
    """fn(*args) in a fresh process whose XLA runs on a single CPU thread."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} {ONE_THREAD_FLAGS}".strip()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(fn, *args).result()
    finally:
        os.environ["XLA_FLAGS"] = flags
