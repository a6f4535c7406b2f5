"""bench/compress_real.py's tables, target verdicts, resume file and command line, on
made-up rows (no models)."""

import dataclasses
import re

import pytest

from bench._real_runs import _load_resume, _save_resume
from bench._real_tables import section
from bench._real_tasks import Task
from bench.compress_real import _arguments


def task(name, columns):
    return Task(
        name=name,
        title=name,
        model=None,
        target="",
        calibration=None,
        activations={},
        evaluate=None,
        search_loss=None,
        search_candidates=(),
        columns=columns,
        notes=["note"],
    )


def row(run="2026-12-01 10:00:00", **scores):
    return {**scores, "kept": 0.8, "params": 10, "seconds": 1.0, "run": run}


def test_llm_target_is_half_of_svdllms_perplexity_increase():
    results = {
        (1.0, "dense"): {**row(perplexity=30.0, **{"bits/byte": 1.0}), "seconds": None},
        (0.8, "SVD-LLM (W)"): row(perplexity=50.0, **{"bits/byte": 1.2}),
        (0.8, "ours: whitened"): row(perplexity=39.0, **{"bits/byte": 1.1}),
        (0.8, "ours: nkp"): row(perplexity=41.0, **{"bits/byte": 1.1}),
        (0.6, "SVD-LLM (W)"): row(perplexity=70.0, **{"bits/byte": 1.5}),
        (0.6, "ours: whitened"): row(perplexity=51.0, **{"bits/byte": 1.3}),
        (0.6, "ours: nkp"): row(perplexity=46.0, **{"bits/byte": 1.3}),
    }
    text = section(
        task("smollm2", ["perplexity", "bits/byte"]), results, [0.8, 0.6, 0.4], 1.0, done=False
    )
    assert (
        "- 0.8: our best (ours: whitened) adds 9 to dense perplexity, SVD-LLM adds 20: 0.45 of it (target <= 0.5): **met**"
        in text
    )
    assert (
        "- 0.6: our best (ours: nkp) adds 16 to dense perplexity, SVD-LLM adds 40: 0.40 of it (target <= 0.5): **met**"
        in text
    )
    assert "- 0.4: not measured (yet)" in text
    assert "| 0.8 | ours: nkp | 0.8 | 10 | 41 | 1.1 | 1.0 |" in text
    assert text.endswith("(run in progress: the rows so far)")


def test_classifier_target_compares_our_best_with_every_peer_on_both_metrics():
    results = {
        (1.0, "dense"): {**row(KL=0.0, **{"top-1 agreement": 1.0}), "seconds": None},
        (0.6, "SVD-LLM (W)"): row(KL=0.2, **{"top-1 agreement": 0.7}),
        (0.6, "ASVD"): row(KL=0.1, **{"top-1 agreement": 0.9}),
        (0.6, "ours: whitened"): row(KL=0.05, **{"top-1 agreement": 0.8}),
        (0.6, "ours: nkp"): row(KL=0.06, **{"top-1 agreement": 0.85}),
    }
    text = section(task("mobilenet_v2", ["KL", "top-1 agreement"]), results, [0.6], 1.0, done=True)
    assert "- 0.6, KL: our best 0.05 (ours: whitened), best peer 0.1 (ASVD): **met**" in text
    assert (
        "- 0.6, top-1 agreement: our best 0.85 (ours: nkp), best peer 0.9 (ASVD): **MISSED**"
        in text
    )
    assert "in progress" not in text


def test_resumed_rows_round_trip_and_are_said_to_come_from_two_processes(tmp_path):
    path = str(tmp_path / "mobilenet_v2.json")
    cnn = task("mobilenet_v2", ["KL", "top-1 agreement"])
    results = {
        (1.0, "dense"): {**row(KL=0.0, **{"top-1 agreement": 1.0}), "seconds": None},
        (0.6, "ASVD"): row(run="2026-12-01 09:00:00", KL=0.1, **{"top-1 agreement": 0.9}),
    }
    _save_resume(path, cnn, results)
    assert _load_resume(path, cnn) == results
    text = section(cnn, results, [0.6], 1.0, done=True)
    assert "Rows measured in 2 processes on the same data (started" in text
    with pytest.raises(SystemExit, match=r"holds rows of another model or other data.*delete it"):
        _load_resume(path, task("efficientnet_lite0", ["KL", "top-1 agreement"]))


def test_allocator_verdict_asks_data_ranks_to_beat_weight_and_uniform_ranks():
    def scores(kl, top1):
        return row(KL=kl, **{"top-1 agreement": top1})

    results = {
        (1.0, "dense"): {**scores(0.0, 1.0), "seconds": None},
        (0.8, "SVD-LLM (W)"): scores(0.2, 0.7),
        (0.8, "ours: whitened"): scores(0.05, 0.8),
        (0.8, "ours: whitened, output ranks"): scores(0.03, 0.9),
        (0.8, "ours: whitened, weight ranks"): scores(0.01, 0.99),  # ours: may be our best
        (0.8, "ours: whitened, uniform ranks"): scores(0.07, 0.75),
        (0.8, "ours: nkp"): scores(0.06, 0.85),
        (0.6, "SVD-LLM (W)"): scores(0.3, 0.6),
        (0.6, "ours: whitened"): scores(0.1, 0.7),
        (0.6, "ours: whitened, output ranks"): scores(0.25, 0.5),
        (0.6, "ours: whitened, weight ranks"): scores(0.2, 0.6),
        (0.6, "ours: whitened, uniform ranks"): scores(0.15, 0.65),
        (0.6, "ours: nkp"): scores(0.12, 0.7),
        (0.4, "ours: whitened"): scores(0.5, 0.5),
        (0.4, "ours: whitened, uniform ranks"): scores(0.6, 0.4),
    }
    text = section(
        task("mobilenet_v2", ["KL", "top-1 agreement"]), results, [0.8, 0.6, 0.4], 1.0, done=True
    )
    assert (
        "- 0.8, rank allocator (KL): data ranks 0.05, output ranks 0.03, weight ranks 0.01, "
        "uniform ranks 0.07: **MISSED**" in text
    )
    assert (
        "- 0.8, KL: our best 0.01 (ours: whitened, weight ranks), best peer 0.2 (SVD-LLM (W)): "
        "**met**" in text
    )
    assert "best peer 0.2 (SVD-LLM (W))" in text  # an allocator row is never a peer
    assert (
        "- 0.6, rank allocator (KL): data ranks 0.1, output ranks 0.25, weight ranks 0.2, "
        "uniform ranks 0.15: **met**" in text
    )
    assert "- 0.4, rank allocator (KL): not measured (yet)" in text
    assert "| 0.6 | ours: whitened, uniform ranks | 0.8 | 10 | 0.15 | 0.65 | 1.0 |" in text
    lines = text.splitlines()
    order = [l.split(" | ")[1] for l in lines if l.startswith("| 0.6 |")]
    assert order == [
        "SVD-LLM (W)",
        "ours: whitened",
        "ours: whitened, output ranks",
        "ours: whitened, weight ranks",
        "ours: whitened, uniform ranks",
        "ours: nkp",
    ]


def test_allocator_verdict_on_cosine_is_higher_is_better_and_absent_without_the_rows():
    def scores(cosine):
        return row(**{"cosine to dense": cosine, "NN agreement": cosine})

    results = {
        (1.0, "dense"): {**scores(1.0), "seconds": None},
        (0.6, "SVD-LLM (W)"): scores(0.8),
        (0.6, "ours: whitened"): scores(0.95),
        (0.6, "ours: nkp"): scores(0.9),
    }
    minilm = task("minilm", ["cosine to dense", "NN agreement"])
    assert "rank allocator" not in section(minilm, results, [0.6], 1.0, done=True)
    results[(0.6, "ours: whitened, weight ranks")] = scores(0.94)
    results[(0.6, "ours: whitened, uniform ranks")] = scores(0.96)
    text = section(minilm, results, [0.6], 1.0, done=True)
    assert (
        "- 0.6, rank allocator (cosine to dense): data ranks 0.95, weight ranks 0.94, "
        "uniform ranks 0.96 (output ranks: not measured): **behind**" in text
    )
    results[(0.6, "ours: whitened, output ranks")] = scores(0.97)
    text = section(minilm, results, [0.6], 1.0, done=True)
    assert (
        "- 0.6, rank allocator (cosine to dense): data ranks 0.95, output ranks 0.97, "
        "weight ranks 0.94, uniform ranks 0.96: **ahead**" in text
    )


def test_allocator_rows_are_on_unless_no_allocators_is_given():
    assert _arguments([])[0].allocators
    args, models, budgets, _ = _arguments(["--no-allocators", "--quick", "--models", "minilm"])
    assert not args.allocators and models == ["minilm"] and budgets == [0.6]


def test_only_measures_the_matching_rows_and_keeps_resumed_ones(tmp_path):
    import equinox as eqx
    import jax

    from bench._real_runs import run_task

    mlp = task("mlp", ["score"])
    mlp = dataclasses.replace(
        mlp,
        model=eqx.nn.MLP(6, 6, 8, 1, key=jax.random.key(0)),
        target=".*",
        calibration=jax.random.normal(jax.random.key(1), (32, 6)),
        evaluate=lambda m: {"score": 1.0},
    )
    path = str(tmp_path / "mlp.json")
    _save_resume(path, mlp, {(0.6, "ASVD"): row(score=0.5)})
    results = run_task(
        mlp, [0.6], True, lambda results: None, resume=path, only=re.compile("^plain")
    )
    assert sorted(results) == [
        (0.6, "ASVD"),
        (0.6, "plain SVD"),
        (1.0, "dense"),
    ]
    with pytest.raises(SystemExit):
        _arguments(["--only", "(unclosed"])
