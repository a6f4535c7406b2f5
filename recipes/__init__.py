"""Recipes: models, data, a data-parallel trainer and typed configs built on `lowrank`.

Run one with `python -m recipes.run CONFIG [--set key=value ...]`; the pieces are
importable on their own (`recipes.models`, `recipes.data`, `recipes.train.train`);
the config types are re-exported here.
"""

from .config import (
    Config as Config,
    ConfigError as ConfigError,
    FactorizeConfig as FactorizeConfig,
    ImageDataConfig as ImageDataConfig,
    ImageModelConfig as ImageModelConfig,
    OptimConfig as OptimConfig,
    TrainConfig as TrainConfig,
    load_config as load_config,
)
