"""Which layers of a recipe's image model become low-rank, by policy (public names).

`POLICY_TARGETS` maps each `FactorizeConfig.policy` ("khodak", "pufferfish",
"efficientnet") to (the model family it applies to, the regex fullmatched against
dotted layer paths). `apply_policy(model, config)` factorizes a model as a recipe run
does; `normalized_activations` gives calibrated inits the BatchNorm and activation
that follow each selected conv; `module_at(model, path)` reads the submodule at a
dotted path. `recipes.run` uses these; bench scripts import them from here.
"""

from ._factorize_policy import POLICY_TARGETS as POLICY_TARGETS
from ._factorize_policy import apply_policy as apply_policy
from ._factorize_policy import module_at as module_at
from ._factorize_policy import normalized_activations as normalized_activations
