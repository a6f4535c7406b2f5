"""Part A of bench/vision.py: training each recipe run in a process of its own (with
a log to resume from) and timing its model against the dense one."""

import json
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from recipes import models
from recipes.config import load_config
from recipes.metrics import inference_seconds, seconds_in_turns
from recipes.run import classification_eval, classification_loss, run


def _timings(dense, low, state, *, batch: int, rounds: int) -> tuple[float, float]:
    """(train step ratio, inference time ratio) of `low` against `dense`, timed in turns
    (jitted loss + gradient on `batch` training images; inference-mode forward on 128
    test images)."""
    rng = np.random.default_rng(0)
    train = {
        "image": rng.normal(size=(batch, 3, 32, 32)).astype(np.float32),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    test = {
        "image": rng.normal(size=(128, 3, 32, 32)).astype(np.float32),
        "label": rng.integers(0, 10, 128).astype(np.int32),
    }
    key = jax.random.key(0)
    grad = eqx.filter_jit(
        lambda m, s, b: eqx.filter_value_and_grad(lambda q: classification_loss(q, s, b, key)[0])(m)
    )
    t_dense, t_low = seconds_in_turns(grad, [dense, low], state, train, rounds=rounds)
    i_dense, i_low = inference_seconds(
        classification_eval, [dense, low], state, test, rounds=rounds
    )
    return t_low / t_dense, i_low / i_dense


def one_run(overrides: list[str], seed: int, batch: int, rounds: int, timed: bool) -> dict:
    """Train one recipe run (in a fresh process: XLA's compiled code from dozens of runs
    would exhaust the process's memory maps); its accuracy, report and, if `timed`,
    its time ratios against a dense model of the same config."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            "digits_demo", [*overrides, f"train.seed={seed}", f"train.out_dir={tmp}"]
        )
        result, report = run(config)
    record = {
        "accuracy": [r for r in result.history if r["split"] == "eval"][-1]["accuracy"],
        "report": report,
    }
    if timed and report is not None:
        dense, state = models.resnet18(
            10, stem="cifar", width=config.model.width, key=jax.random.key(0)
        )
        record["timings"] = _timings(dense, result.model, state, batch=batch, rounds=rounds)
    return record


def run_all(runs: list, *, seeds: int, batch: int, rounds: int, resume: bool) -> dict:
    """{label: [record per seed]} of every run of `runs` for every seed, each trained
    in its own process. Finished runs are logged to bench/out/vision_runs.jsonl;
    `resume` reuses the logged ones (same overrides and seed) instead of starting the
    log afresh."""
    cache = Path(__file__).with_name("out") / "vision_runs.jsonl"
    cache.parent.mkdir(exist_ok=True)
    known = {}
    if not resume:
        cache.write_text("")
    elif cache.exists():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            known[(entry["key"], entry["seed"])] = entry
    done = {}  # label -> [record per seed]
    spawn = multiprocessing.get_context("spawn")
    for seed in range(seeds):
        for i, (label, overrides) in enumerate(runs):
            key = json.dumps(overrides)
            if (key, seed) not in known:
                start = time.perf_counter()
                with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    record = pool.submit(
                        one_run, overrides, seed, batch, rounds, seed == 0
                    ).result()
                known[(key, seed)] = {"key": key, "seed": seed, **record}
                with cache.open("a") as f:
                    f.write(json.dumps(known[(key, seed)]) + "\n")
                print(
                    f"[seed {seed}, {i + 1}/{len(runs)}] {label}: accuracy "
                    f"{record['accuracy']:.4f} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
            done.setdefault(label, []).append(known[(key, seed)])
    return done
