"""Recipes: models, data, a data-parallel trainer and typed configs built on `lowrank`.

Run one with `python -m recipes.run CONFIG [--set key=value ...]`; the pieces are
importable on their own (`recipes.models`, `recipes.data`, `recipes.train.train`);
the config types are re-exported here.
"""

from .config import (
    Config as Config,
)
from .config import (
    ConfigError as ConfigError,
)
from .config import (
    FactorizeConfig as FactorizeConfig,
)
from .config import (
    ImageDataConfig as ImageDataConfig,
)
from .config import (
    ImageModelConfig as ImageModelConfig,
)
from .config import (
    OptimConfig as OptimConfig,
)
from .config import (
    TrainConfig as TrainConfig,
)
from .config import (
    load_config as load_config,
)
