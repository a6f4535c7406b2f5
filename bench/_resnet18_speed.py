"""ResNet-18 (CIFAR stem, width 32) dense and factorized under the khodak policy at
Budget(params=0.25): the whole model's inference time, and each factorized conv's alone
(bench/model_speed.py's second table)."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp

import lowrank
from recipes import models
from recipes.policy import POLICY_TARGETS, module_at
from recipes.run import classification_eval

from ._pair_timing import on_one_thread, time_pair


def resnet18_input_side(path: str, image: int = 32) -> int:
    """Spatial size of the input that the conv at `path` sees in the CIFAR-stem ResNet-18:
    stage s runs at image / 2**s; the first block's conv1 and shortcut of stages 1..3
    still see the previous stage's resolution (they stride by 2)."""
    _, stage, _, block, name, *_ = path.split(".")
    stage, block = int(stage), int(block)
    strided = stage > 0 and block == 0 and name in ("conv1", "downsample")
    return image >> (stage - 1 if strided else stage)


def resnet18_pair():
    """ResNet-18 (CIFAR stem, width 32), its BatchNorm state, the same model factorized
    under the khodak policy at Budget(params=0.25), the plan, and a FLOPs example."""
    dense, state = models.resnet18(10, stem="cifar", width=32, key=jax.random.key(0))
    example = lambda m: eqx.nn.inference_mode(m)(jnp.zeros((3, 32, 32)), state)
    low, plan = lowrank.factorize(
        dense,
        rank=lowrank.Budget(params=0.25),
        target=POLICY_TARGETS["khodak"][1],
        example=example,
        return_plan=True,
    )
    return dense, state, low, plan, example


def resnet18_whole_model(repeats: int, batch: int = 128) -> tuple[float, float, float]:
    """(dense s, low-rank s, FLOP ratio) of the inference forward on `batch` images."""
    dense, state, low, _, example = resnet18_pair()
    images = {
        "image": jax.random.normal(jax.random.key(1), (batch, 3, 32, 32)),
        "label": jnp.zeros(batch, jnp.int32),
    }
    forward = eqx.filter_jit(lambda m, s, b: classification_eval(eqx.nn.inference_mode(m), s, b))
    t_dense, t = time_pair(dense, low, state, images, repeats=repeats, forward=forward)
    flop_ratio = (
        lowrank.summary(low, example=example).flops / lowrank.summary(dense, example=example).flops
    )
    return t_dense, t, flop_ratio


def _layer_row(label, shape="", side="", rank="", t_dense=0.0, t=None, flop_ratio=None):
    """A row of the layer table: times in ms, and the ratios where their inputs are given."""
    return [
        label,
        shape,
        side,
        rank,
        f"{t_dense * 1e3:.2f}",
        "" if t is None else f"{t * 1e3:.2f}",
        "" if t is None else f"{t / t_dense:.3f}",
        "" if flop_ratio is None else f"{flop_ratio:.3f}",
        "" if flop_ratio is None else f"{t / t_dense / flop_ratio:.2f}",
    ]


def bench_resnet18_layers(repeats, batch=128):
    """Each conv factorized by Budget(params=0.25) under the khodak policy, alone; then
    the whole model, on all cores and on one thread.

    Args:
        repeats: timed runs per model (in rounds of 5).
        batch: the batch of inputs.

    Returns:
        The layer table's rows.
    """
    dense, _, _, plan, _ = resnet18_pair()
    rows, dense_total, low_total = [], 0.0, 0.0
    for lp in plan.factorized:
        conv = module_at(dense, lp.path)
        side = resnet18_input_side(lp.path)
        x = jax.random.normal(jax.random.key(1), (batch, conv.in_channels, side, side))
        low_conv = lowrank.factorize(conv, rank=lp.rank)
        t_dense, t = time_pair(conv, low_conv, x, repeats=repeats)
        dense_total, low_total = dense_total + t_dense, low_total + t
        shape = f"{conv.out_channels}x{conv.in_channels}x{'x'.join(map(str, conv.kernel_size))}"
        flop_ratio = lp.flops_after / lp.flops_before
        rows.append(_layer_row(lp.path, shape, f"{side}x{side}", lp.rank, t_dense, t, flop_ratio))
    rows.append(_layer_row("all factorized convs", t_dense=dense_total, t=low_total))
    whole = resnet18_whole_model(repeats, batch)
    rest = "rest of the model (whole - factorized convs)"
    rows.append(_layer_row(rest, t_dense=whole[0] - dense_total))
    for label, (t_dense, t, flop_ratio) in [
        (f"whole model, {os.cpu_count()} cores", whole),
        ("whole model, 1 thread", on_one_thread(resnet18_whole_model, repeats, batch)),
    ]:
        rows.append(_layer_row(label, "", "32x32", "", t_dense, t, flop_ratio))
    return rows
