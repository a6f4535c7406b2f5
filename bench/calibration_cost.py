"""Cost of sequential calibrated factorization against one dense forward pass.

For each model, each part in a process of its own (so that a peak memory is that job's
alone): the wall time of one jitted dense forward pass over the calibration data
(compiled first, then timed), and of `lowrank.factorize(..., init=whitened|nkp,
calibration=..., rank=Budget(params=0.8))` with the default one-pass sequential
calibration, each with its process's peak resident memory (getrusage, what
`/usr/bin/time -v` reports).

    python -m bench.calibration_cost                     # every model
    python -m bench.calibration_cost --models smollm2 --tokens 128x256
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bench._results import markdown_table, write_section
from lowrank._budget import BUDGET_BY

MODELS = ("digits_cnn", "resnet18", "mobilenet_v2", "smollm2")
INITS = ("whitened", "nkp")


def _smollm2(tokens: str):
    from recipes.data import bbc_split, token_windows
    from recipes.pretrained import smollm2

    count, length = (int(v) for v in tokens.split("x"))
    model, tokenizer = smollm2()
    ids = token_windows(tokenizer, bbc_split().calibration, length, count, seed=0)
    run = lambda m: jax.vmap(m)(ids)
    return model, run, r".*_proj", f"{count}x{length} BBC tokens"


def _mobilenet_v2(_):
    from recipes.data import photo_crops, photo_split
    from recipes.pretrained import MOBILENET_V2_NORMALIZATION, mobilenet_v2

    model, state = mobilenet_v2()
    crops = photo_crops(
        photo_split(seed=0).calibration, 64, normalization=MOBILENET_V2_NORMALIZATION, seed=0
    )
    run = lambda m: jax.vmap(lambda x: m(x, state, inference=True)[0])(crops)
    return model, run, r".*(project|expand)\.conv|classifier", "64 photo crops at 224px"


def _resnet18(_):
    from recipes.models import resnet18

    model, state = resnet18(10, stem="cifar", key=jax.random.key(0))
    images = _digit_images(256, 32)
    run = lambda m: jax.vmap(lambda x: m(x, state, inference=True)[0])(images)
    return model, run, r"layers\.\d+\.blocks\.\d+\.conv\d", "256 digits at 32x32 (random init)"


def _digits_cnn(_):
    import equinox as eqx

    class CNN(eqx.Module):
        convs: list
        head: eqx.nn.Linear

        def __init__(self, key):
            k = jax.random.split(key, 4)
            self.convs = [
                eqx.nn.Conv2d(3, 32, 3, padding=1, key=k[0]),
                eqx.nn.Conv2d(32, 64, 3, padding=1, key=k[1]),
                eqx.nn.Conv2d(64, 64, 3, padding=1, key=k[2]),
            ]
            self.head = eqx.nn.Linear(64, 10, key=k[3])

        def __call__(self, x):
            for conv in self.convs:
                x = jax.nn.relu(conv(x))
            return self.head(x.mean((1, 2)))

    images = _digit_images(512, 16)
    run = lambda m: jax.vmap(m)(images)
    return CNN(jax.random.key(0)), run, None, "512 digits at 16x16 (random init)"


def _digit_images(n: int, size: int):
    from recipes.data import digits

    train, _ = digits(image_size=size, channels=3)
    x = np.stack([train[i]["image"] for i in range(n)]).astype(np.float32) / 255.0
    return jnp.asarray(np.moveaxis(x, -1, 1))


def measure(model_name: str, init: str, tokens: str, by: str, part: str) -> dict:
    """One job, in a process of its own so that its peak memory is that part's alone:
    `part="dense"` times one jitted dense forward pass (compiled first, then timed);
    `part="factorize"` times the calibrated factorization."""
    import lowrank

    model, run, target, data = globals()[f"_{model_name}"](tokens)
    start = time.perf_counter()
    if part == "dense":
        forward = eqx.filter_jit(run)
        jax.block_until_ready(forward(model))  # compile
        start = time.perf_counter()
        jax.block_until_ready(forward(model))
        row = {}
    else:
        _, plan = lowrank.factorize(
            model,
            rank=lowrank.Budget(params=0.8, by=by),
            init=init,
            calibration=run,
            target=target,
            return_plan=True,
        )
        row = {
            "budget": str(lowrank.Budget(params=0.8, by=by)),
            "layers": len(plan.factorized),
            "fit_s": sum(l.fit_seconds or 0.0 for l in plan.factorized),
        }
    return row | {
        "data": data,
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _job(model_name: str, init: str, tokens: str, by: str, part: str) -> dict | None:
    """`measure` in a fresh process (`--job`); None if it failed."""
    cmd = [sys.executable, "-m", "bench.calibration_cost", "--job", f"{model_name}:{init}:{part}"]
    out = subprocess.run([*cmd, "--tokens", tokens, "--by", by], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(model_name: str, init: str, dense: dict | None, tokens: str, by: str) -> list:
    """One table row: the factorization's job against the model's dense-forward job."""
    fact = _job(model_name, init, tokens, by, "factorize")
    if dense is None or fact is None:
        return [model_name, init, f"Budget(by={by!r})", "failed", "", "", "", "", "", "", ""]
    return [
        model_name,
        init,
        fact["budget"],
        fact["data"],
        fact["layers"],
        dense["seconds"],
        dense["peak_rss_gb"],
        fact["seconds"],
        fact["fit_s"],
        fact["seconds"] / dense["seconds"],
        fact["peak_rss_gb"],
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--inits", default=",".join(INITS))
    parser.add_argument("--tokens", default="128x256", help="SmolLM2 calibration windows x length")
    parser.add_argument(
        "--by",
        default="auto",
        choices=BUDGET_BY,
        help="Budget(params=0.8, by=...): 'uniform' factorizes every selected layer",
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        model_name, init, part = args.job.split(":")
        print(json.dumps(measure(model_name, init, args.tokens, args.by, part)))
        return
    rows = []
    for model_name in args.models.split(","):
        dense = _job(model_name, "", args.tokens, args.by, "dense")
        for init in args.inits.split(","):
            rows.append(_row(model_name, init, dense, args.tokens, args.by))
            print(rows[-1], flush=True)
    header = [
        "model",
        "init",
        "budget",
        "calibration data",
        "layers",
        "dense fwd s",
        "dense fwd peak RSS GB",
        "factorize s",
        "of which fits s",
        "factorize / fwd",
        "factorize peak RSS GB",
    ]
    body = (
        "Sequential calibrated factorize at Budget(params=0.8) of the selected layers ('layers': "
        "how many it factorized), one "
        "pass over the data. The dense forward pass and each factorization run in processes "
        "of their own, so each peak RSS is that job's alone (the dense pass includes an LM "
        "head's logits over the whole vocabulary; the factorization stops after the last "
        "selected layer). Targets (issue 13, SmolLM2): "
        "factorize <= 4x one dense forward pass, factorize peak RSS <= 6 GB.\n\n"
        + markdown_table(header, rows)
    )
    write_section("calibration_cost", "Calibration cost (one-pass engine)", body)


if __name__ == "__main__":
    main()
