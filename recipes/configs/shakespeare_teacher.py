"""Dense byte-level teacher on Shakespeare's works (train plays only), on CPU.

    python -m recipes.run shakespeare_teacher [--set train.steps=300 model.d_model=96]

(`python -m recipes.student shakespeare_teacher` does the same.)

Saves out/shakespeare_teacher/model.eqx (read by `recipes.student.load_lm` and the
shakespeare_student recipe) and prints validation bits per byte on unseen plays.
Size knobs: model.d_model, model.n_layers, model.context / data.length, train.steps.
"""

from recipes.config import Config, OptimConfig, TrainConfig
from recipes.text_config import TextDataConfig, TextModelConfig


def config() -> Config:
    """This recipe (see the module docstring).

    Returns:
        Its `Config`, before `--set` overrides.
    """
    return Config(
        name="shakespeare_teacher",
        task="text_lm",
        model=TextModelConfig(d_model=128, n_layers=4, n_heads=4, context=128),
        data=TextDataConfig(length=128, batch_size=16, eval_batch_size=32, eval_windows=256),
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.01, warmup_steps=50, grad_clip=1.0),
        train=TrainConfig(steps=1500, log_every=50, eval_every=500, checkpoint_every=500),
    )
