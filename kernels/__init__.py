"""Fused factored-matmul ops: act(σ(x @ a) @ b + bias), with Pallas kernels and XLA fallbacks.

This package imports only jax: the compiler (`lowrank`) builds on it, never the reverse.
"""

from ._factored_linear import factored_linear as factored_linear
from ._factored_matmul import ACTIVATIONS as ACTIVATIONS
from ._factored_matmul import IMPLS as IMPLS
from ._factored_matmul import factored_matmul as factored_matmul
