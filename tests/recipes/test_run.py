import ast
import json
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lowrank
import recipes.run
from recipes import student
from recipes.config import OptimConfig, TrainConfig, load_config
from recipes.models import resnet18
from recipes.run import Task, main, run
from recipes.train import REPLACED, make_optimizer, train

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "model.width=4",
    "data.image_size=8",
    "data.batch_size=16",
    "data.eval_batch_size=128",
    "train.steps=4",
    "train.log_every=1",
    "train.eval_every=0",
    "optim.warmup_steps=0",
    "factorize.warmup_steps=2",
    "factorize.rank=params:0.5",
    "train.progress=false",
]


def n_params(model):
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def test_digits_demo_warms_up_factorizes_and_reports(tmp_path, capsys):
    overrides = [*TINY, "factorize.calibration=16", f"train.out_dir={tmp_path}"]
    config = load_config("digits_demo", overrides)
    assert config.factorize.init == "nkp" and config.factorize.rank == "params:0.5"
    result, report = run(config)
    out = capsys.readouterr().out
    assert "lowrank plan: rank=Budget(params=0.5)" in out and "time ratio" in out
    plan_rows = [line.split() for line in out.splitlines() if line.startswith("layers.")]
    assert any(row[6] == "nkp" for row in plan_rows)  # fitted on 16 recorded training images
    is_low = lambda x: isinstance(x, lowrank.LowRankConv)
    assert any(is_low(l) for l in jax.tree.leaves(result.model, is_leaf=is_low))
    dense, _ = resnet18(10, stem="cifar", width=4, key=jax.random.key(0))
    assert report["params_dense"] == n_params(dense) and report["params_low"] == n_params(
        result.model
    )
    assert report["params_ratio"] < 0.75 and 0 < report["flops_ratio"] < 1
    assert report["inference_s_dense"] > 0 and report["train_step_ratio"] > 0
    evals = report["evals"]
    assert (evals["before"]["step"], evals["after"]["step"], evals["final"]["step"]) == (2, 2, 4)
    replaced = [r for r in result.history if r.get("event") == REPLACED]
    assert replaced[0]["accuracy"] == evals["after"]["accuracy"]
    assert json.loads((tmp_path / "report.json").read_text())["params_low"] == report["params_low"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["factorize.rank=params:0.001"],
            "error: factorize.rank='params:0.001' with factorize.policy='khodak': Budget(params=0.001) cannot be met",
        ),
        (
            ["data.name=cifar10", "data.data_dir={tmp}"],
            "error: TFDS dataset 'cifar10' (split 'train') is not prepared under data_dir=",
        ),
        (
            ["factorize.warmup_steps=4"],
            "error: factorize.warmup_steps=4 leaves no low-rank training within train.steps=4",
        ),
        (
            ["factorize.frobenius_decay=lots"],
            "error: factorize.frobenius_decay='lots' cannot be read as float | None.",
        ),
    ],
)
def test_bad_recipes_stop_before_training(tmp_path, capsys, overrides, message):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with pytest.raises(SystemExit) as exit:
        main(["digits_demo", "--set", *TINY, f"train.out_dir={tmp_path / 'out'}", *overrides])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["factorize.rank=abc"],
            "error: factorize.rank='abc' is not a rank rule; use an int (16), a fraction of full rank (0.25), 'energy:0.9' (the rank keeping that share of the spectral energy), 'params:0.3' or 'flops:0.3' (a global budget), 'stable' or 'stable:scaled'.\n",
        ),
        (
            ["data.image_size=4"],
            "error: data.name='digits', data.image_size=4: image_size=4 is below the digits' native 8x8; use 8 or more.\n",
        ),
        (["model.width=0"], "error: model.width=0 must be positive.\n"),
        (["optim.lr=nan"], "error: optim.lr=nan must be a finite number.\n"),
    ],
)
def test_bad_values_are_one_error_line(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit:
        main(["digits_demo", "--set", *TINY, f"train.out_dir={tmp_path}", *overrides])
    assert exit.value.code == 2
    assert capsys.readouterr().err == message


def _linear_task(config):
    """A tiny task: a Linear layer on constant inputs (at optim.lr=1e30 its loss
    overflows within a few steps)."""
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))

    def loss_fn(model, state, batch, key):
        return jnp.mean(jax.vmap(model)(batch["x"]) ** 2), (state, {})

    batches = lambda step: iter(lambda: {"x": np.ones((2, 2), np.float32)}, None)
    return Task(model, None, loss_fn, None, batches, None)


def test_resuming_another_models_checkpoint_is_one_error_line(tmp_path, capsys):
    optimizer, schedule = make_optimizer(OptimConfig(), 1)
    task = _linear_task(None)
    train(
        task.model,
        None,
        loss_fn=task.loss_fn,
        optimizer=optimizer,
        schedule=schedule,
        train_data=task.train_data,
        config=TrainConfig(steps=1, out_dir=str(tmp_path), progress=False),
    )
    with pytest.raises(SystemExit) as exit:
        main(["digits_demo", "--set", *TINY, "train.resume=true", f"train.out_dir={tmp_path}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: train.out_dir holds a checkpoint of another run: at step 1 in \S+checkpoints, the "
        r"checkpoint has model.weight float32\[2, 2\] where this run has \S+ float32\[4, 3, 3, 3\]; "
        r"set train.out_dir to a fresh folder, or train.resume=false to train from scratch there.\n",
        err,
    )


def test_a_diverging_run_stops_with_exit_status_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(recipes.run.TASKS, "linear", _linear_task)
    path = tmp_path / "diverge.py"
    path.write_text(
        "from recipes.config import Config, OptimConfig, TrainConfig\n"
        "def config():\n"
        "    return Config(name='diverge', task='linear', optim=OptimConfig(lr=1e30, momentum=0,\n"
        f"                  weight_decay=0), train=TrainConfig(steps=4, log_every=4, out_dir={str(tmp_path / 'out')!r},\n"
        "                  progress=False))\n"
    )
    with pytest.raises(SystemExit) as exit:
        main([str(path)])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"error: training diverged: the loss is (nan|inf) at step [23]\. Lower optim.lr, "
        r"clip the gradients \(optim.grad_clip=1.0\), train in fp32 \(train.precision=fp32\) "
        r"or check the data\.\n",
        err,
    )


def test_text_recipes_run_through_both_commands_and_say_what_they_did(tmp_path, capsys):
    out = tmp_path / "teacher"
    tiny = [
        "model.d_model=16",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.context=16",
        "data.length=8",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.eval_windows=4",
        "train.steps=2",
        "train.log_every=1",
        "optim.warmup_steps=0",
        "train.progress=false",
        f"train.out_dir={out}",
    ]
    main(["shakespeare_teacher", "--set", *tiny])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == (
        f"outputs in {out}/: checkpoints/, config.json, curves.png, metrics.jsonl, "
        "model.eqx, model.eqx.json, report.json"
    )
    assert json.loads(lines[-1])["eval"]["step"] == 2
    assert json.loads((out / "report.json").read_text())["val_loss"] > 0
    assert student.load_lm(out / "model.eqx").d_model == 16
    student.main(["shakespeare_teacher", "--set", *tiny])  # a rerun: nothing left to do
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3] == (
        f"resumed from the checkpoint at step 2 in {out / 'checkpoints'}: "
        "train.steps=2 were already done, nothing left to train. To train again, "
        "set train.resume=false or another train.out_dir."
    )
    assert lines[-2].startswith(f"outputs in {out}/: checkpoints/")


def test_every_shipped_config_has_a_registered_task():
    for path in sorted((ROOT / "recipes" / "configs").glob("[!_]*.py")):
        config = load_config(path.stem)
        assert config.task in {**recipes.run.TASKS, **recipes.run.PIPELINES}, path.name


def test_only_the_recipe_make_demo_runs_claims_to_be_make_demo():
    make_demo = re.search(
        r"^demo:.*\n\t\$\(PY\) -m recipes\.run (\w+)$", (ROOT / "Makefile").read_text(), re.M
    )
    claims = [
        p.relative_to(ROOT).as_posix()
        for p in sorted((ROOT / "recipes").rglob("*.py"))
        if (ast.get_docstring(ast.parse(p.read_text())) or "").startswith("`make demo`")
    ]
    assert claims == [f"recipes/configs/{make_demo.group(1)}.py"]
