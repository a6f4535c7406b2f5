"""Config sections of the byte-level language-model recipes (`recipes.configs`'
shakespeare_teacher and shakespeare_student).

The "text_lm" task (a dense teacher) takes a `Config` whose `model` is a
`TextModelConfig` and whose `data` is a `TextDataConfig`; the "text_student" task takes
a `StudentRunConfig` (a `Config` with a `distill` section) whose `model` is a
`StudentModelConfig`. Fields declared with `bounded` are range-checked by
`recipes.config.validate` before any compute.
"""

import dataclasses
from typing import Literal

from ._student_training import DistillConfig
from .config import Config, bounded


@dataclasses.dataclass
class TextModelConfig:
    """A dense byte-level `recipes.models.Transformer`.

    Attributes:
        d_model: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: attention heads per block (must divide `d_model`).
        mlp_ratio: MLP hidden width as a multiple of `d_model`.
        context: longest sequence the model reads (its positional table).
        dropout: dropout rate while training.
        vocab_size: token ids (at least the byte tokenizer's 256).
    """

    d_model: int = bounded(128, gt=0)
    n_layers: int = bounded(4, gt=0)
    n_heads: int = bounded(4, gt=0)
    mlp_ratio: int = bounded(4, gt=0)
    context: int = bounded(128, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    vocab_size: int = 256


@dataclasses.dataclass
class TextDataConfig:
    """Byte windows of `length` (+1) tokens from a corpus split by work.

    Attributes:
        path: "" for Shakespeare's works, else a folder whose .txt files are the works.
        edition: which Shakespeare text ("modern" or "folio"; ignored with `path`).
        val_fraction: share of the works held out for validation.
        length: tokens per training and validation window (at most the context).
        batch_size: training windows per step.
        eval_batch_size: validation windows per forward.
        eval_windows: cap on the validation windows scored.
    """

    path: str = ""
    edition: Literal["modern", "folio"] = "modern"
    val_fraction: float = bounded(0.1, gt=0, lt=1)
    length: int = bounded(128, gt=0)
    batch_size: int = bounded(16, gt=0)
    eval_batch_size: int = bounded(32, gt=0)
    eval_windows: int = bounded(256, gt=0)


@dataclasses.dataclass
class StudentModelConfig:
    """A student of the teacher saved at `teacher`: "factorized" by lowrank under
    `Budget(params=params)` of its attention and MLP layers (`init` from the teacher's
    weights; whitened and nkp read `calibration_windows` train windows), or "dense"
    from scratch at the same non-embedding parameter fraction.

    Attributes:
        teacher: path of the saved teacher (`recipes.student.save_lm`'s model.eqx).
        kind: "factorized" (the teacher, low-rank) or "dense" (a narrower Transformer).
        params: fraction of the teacher's attention/MLP parameters the student keeps.
        init: the factors' initializer ("factorized" only).
        calibration_windows: training windows fed to whitened and nkp.
    """

    teacher: str = "out/shakespeare_teacher/model.eqx"
    kind: Literal["factorized", "dense"] = "factorized"
    params: float = bounded(0.25, gt=0, le=1)
    init: Literal["spectral", "whitened", "nkp", "random"] = "whitened"
    calibration_windows: int = bounded(32, gt=0)


@dataclasses.dataclass
class StudentRunConfig(Config):
    """A `Config` with a `distill` section (how the student learns from the teacher).

    Attributes:
        distill: the distillation recipe (`recipes.student.DistillConfig`).
    """

    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
