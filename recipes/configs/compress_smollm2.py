"""Compress SmolLM2-135M-Instruct: its block linears (q/k/v/o, gate/up/down) to 80% of
their parameters with the whitened init, calibrated on 128 windows of 256 tokens from
three BBC News categories, evaluated on 32 windows from the other two (perplexity,
bits per byte); greedy generation dense next to compressed.

    python -m recipes.run compress_smollm2 --set factorize.rank=params:0.6 factorize.init=nkp
    python -m recipes.run compress_smollm2 --set heal.steps=100     # heal by distillation
    python -m recipes.run compress_smollm2 --set model.num_layers=2 data.calibration=8 \\
        data.evaluation=4 data.seq_len=64                           # a quick look
"""

from recipes.compress import (
    CompressConfig,
    CompressDataConfig,
    CompressFactorizeConfig,
    GenerateConfig,
    HealConfig,
    PretrainedModelConfig,
)


def config() -> CompressConfig:
    return CompressConfig(
        name="compress_smollm2",
        model=PretrainedModelConfig(name="smollm2"),
        data=CompressDataConfig(calibration=128, evaluation=32, seq_len=256, batch_size=8),
        factorize=CompressFactorizeConfig(rank="params:0.8", init="whitened"),
        heal=HealConfig(steps=0, batch_size=8, alpha=1.0, temperature=1.0, log_every=10),
        generate=GenerateConfig(max_new_tokens=32),
    )
