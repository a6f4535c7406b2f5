"""lowrank: compile dense Equinox models into factorized low-rank models.

model = lowrank.factorize(model, rank=lowrank.Budget(params=0.3), init="spectral")
"""

from ._budget import Budget as Budget
from ._conv import LowRankConv as LowRankConv
from ._factorize import factorize as factorize
from ._factorize import plan as plan
from ._index import IndexEntry as IndexEntry
from ._index import ModelIndex as ModelIndex
from ._index import select as select
from ._initializers import (
    Factors as Factors,
)
from ._initializers import (
    Initializer as Initializer,
)
from ._initializers import (
    LayerProblem as LayerProblem,
)
from ._initializers import (
    Random as Random,
)
from ._initializers import (
    Spectral as Spectral,
)
from ._initializers import (
    available_initializers as available_initializers,
)
from ._initializers import (
    get_initializer as get_initializer,
)
from ._initializers import (
    register_initializer as register_initializer,
)
from ._layers import LowRankLinear as LowRankLinear
from ._nkp import NKP as NKP
from ._plan import LayerPlan as LayerPlan
from ._plan import Plan as Plan
from ._rewrite import densify as densify
from ._rewrite import with_kernels as with_kernels
from ._serialize import load as load
from ._serialize import save as save
from ._shared_input import SharedInputLinear as SharedInputLinear
from ._summary import Summary as Summary
from ._summary import summary as summary
from ._whitened import Whitened as Whitened
