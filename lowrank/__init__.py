"""lowrank: compile dense Equinox models into factorized low-rank models.

    model = lowrank.factorize(model, rank=lowrank.Budget(params=0.3), init="spectral")
"""

from ._budget import Budget as Budget
from ._factorize import factorize as factorize, plan as plan
from ._index import IndexEntry as IndexEntry, ModelIndex as ModelIndex, select as select
from ._initializers import (
    Factors as Factors,
    Initializer as Initializer,
    LayerProblem as LayerProblem,
    Random as Random,
    Spectral as Spectral,
    available_initializers as available_initializers,
    get_initializer as get_initializer,
    register_initializer as register_initializer,
)
from ._layers import (
    LowRankConv as LowRankConv,
    LowRankLinear as LowRankLinear,
    with_kernels as with_kernels,
)
from ._plan import LayerPlan as LayerPlan, Plan as Plan
from ._rewrite import densify as densify
from ._serialize import load as load, save as save
from ._summary import Summary as Summary, summary as summary
from ._nkp import NKP as NKP
from ._whitened import Whitened as Whitened
