"""A student of the shakespeare_teacher recipe: the teacher factorized by lowrank to a
quarter of its attention/MLP parameters (whitened init from calibration text), trained
with KD from the teacher; validation bits per byte on unseen plays.

    python -m recipes.run shakespeare_student --set distill.mode=salt distill.n_kd=150
    python -m recipes.run shakespeare_student --set model.kind=dense distill.mode=ce

(`python -m recipes.student` takes the same arguments.)

model.kind: factorized | dense (from scratch, same parameter fraction);
model.init: spectral | whitened | nkp | random; distill.mode: ce | kd | salt | salt_ds.
"""

from recipes.config import OptimConfig, TrainConfig
from recipes.student import DistillConfig
from recipes.text_config import StudentModelConfig, StudentRunConfig, TextDataConfig


def config() -> StudentRunConfig:
    """This recipe (see the module docstring).

    Returns:
        Its `StudentRunConfig`, before `--set` overrides.
    """
    return StudentRunConfig(
        name="shakespeare_student",
        task="text_student",
        model=StudentModelConfig(
            teacher="out/shakespeare_teacher/model.eqx",
            kind="factorized",
            params=0.25,
            init="whitened",
        ),
        data=TextDataConfig(length=128, batch_size=16, eval_batch_size=32, eval_windows=256),
        optim=OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01, warmup_steps=20, grad_clip=1.0),
        train=TrainConfig(steps=300, log_every=25, eval_every=150, checkpoint_every=150),
        distill=DistillConfig(mode="kd", alpha=1.0, temperature=1.0, n_kd=150),
    )
