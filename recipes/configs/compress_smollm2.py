"""Compress SmolLM2-135M-Instruct: its block linears (q/k/v/o, gate/up/down) to 80% of
their parameters with the whitened init and uniform ranks (every layer keeps the same
fraction: on this model that beat the weight-spectrum default, perplexity 136 vs 153
at 0.8 and 253 vs 283 at 0.6 in bench/RESULTS.md), calibrated on 128 windows of 256
tokens from three BBC News categories, evaluated on 32 windows from the other two
(perplexity, bits per byte); greedy generation dense next to compressed.

    python -m recipes.run compress_smollm2 --set factorize.rank=params:0.6 factorize.init=nkp
    python -m recipes.run compress_smollm2 --set heal.steps=100     # heal by distillation
    python -m recipes.run compress_smollm2 --set model.num_layers=2 data.calibration=8 \\
        data.evaluation=4 data.seq_len=64                           # a quick look
"""

from recipes.compress import CompressConfig, pretrained_config


def config() -> CompressConfig:
    """This recipe (see the module docstring).

    Returns:
        Its `CompressConfig`, before `--set` overrides.
    """
    return pretrained_config(
        "smollm2",
        batch_size=8,
        budget_by="uniform",
        max_new_tokens=32,
        calibration=128,
        evaluation=32,
        seq_len=256,
    )
