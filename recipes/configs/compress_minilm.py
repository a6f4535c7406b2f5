"""Compress all-MiniLM-L6-v2: its encoder linears to 60% of their parameters with the
whitened init, calibrated on 128 windows of 128 tokens from three BBC News categories;
evaluated on 64 paragraphs of the other two by cosine similarity to the dense
embeddings and nearest-neighbour agreement.

    python -m recipes.run compress_minilm --set factorize.rank=params:0.8 heal.steps=100
"""

from recipes.compress import (
    CompressConfig,
    CompressDataConfig,
    CompressFactorizeConfig,
    HealConfig,
    PretrainedModelConfig,
)


def config() -> CompressConfig:
    return CompressConfig(
        name="compress_minilm",
        model=PretrainedModelConfig(name="minilm"),
        data=CompressDataConfig(calibration=128, evaluation=64, seq_len=128, batch_size=16),
        factorize=CompressFactorizeConfig(rank="params:0.6", init="whitened"),
        heal=HealConfig(steps=0, batch_size=16, log_every=10),
    )
