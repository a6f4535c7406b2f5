import json

import equinox as eqx
import jax
import lowrank
import pytest

from recipes.config import load_config
from recipes.models import resnet18
from recipes.run import main, run
from recipes.train import REPLACED

TINY = [
    "model.width=4", "data.image_size=8", "data.batch_size=16", "data.eval_batch_size=128",
    "train.steps=4", "train.log_every=1", "train.eval_every=0", "optim.warmup_steps=0",
    "factorize.warmup_steps=2", "factorize.rank=params:0.5", "train.progress=false",
]  # fmt: skip


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
    is_low = lambda x: isinstance(x, lowrank.LowRankConv)  # noqa: E731
    assert any(is_low(l) for l in jax.tree.leaves(result.model, is_leaf=is_low))
    dense, _ = resnet18(10, stem="cifar", width=4, key=jax.random.key(0))
    assert report["params_dense"] == n_params(dense) and report["params_low"] == n_params(result.model)
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
        (["factorize.rank=params:0.001"], "error: factorize.rank='params:0.001' with factorize.policy='khodak': Budget(params=0.001) cannot be met"),
        (["data.name=cifar10", "data.data_dir={tmp}"], "error: TFDS dataset 'cifar10' (split 'train') is not prepared under data_dir="),
        (["factorize.warmup_steps=4"], "error: factorize.warmup_steps=4 leaves no low-rank training within train.steps=4"),
        (["factorize.frobenius_decay=lots"], "error: factorize.frobenius_decay='lots' cannot be read as float | None."),
    ],
)
def test_bad_recipes_stop_before_training(tmp_path, capsys, overrides, message):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    with pytest.raises(SystemExit) as exit:
        main(["digits_demo", "--set", *TINY, f"train.out_dir={tmp_path / 'out'}", *overrides])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
