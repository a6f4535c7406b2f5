"""Compress all-MiniLM-L6-v2: its encoder linears to 60% of their parameters with the
whitened init, calibrated on 128 windows of 128 tokens from three BBC News categories;
evaluated on 64 paragraphs of the other two by cosine similarity to the dense
embeddings and nearest-neighbour agreement.

    python -m recipes.run compress_minilm --set factorize.rank=params:0.8 heal.steps=100
"""

from recipes.compress import CompressConfig, pretrained_config


def config() -> CompressConfig:
    """This recipe (see the module docstring).

    Returns:
        Its `CompressConfig`, before `--set` overrides.
    """
    return pretrained_config(
        "minilm", batch_size=16, rank="params:0.6", calibration=128, evaluation=64, seq_len=128
    )
