"""Shared test settings: a small, deterministic hypothesis profile for a 2-core machine,
and XLA:CPU at backend optimization level 0.

The suite's shapes are tiny, so its time goes to compiling, not running: level 0 cut a
sample of it (test_sequential, test_fold, test_backward) by 35%. Numerics are checked
against float64 references with tolerances either way. Set LOWRANK_TEST_XLA_OPTIMIZED=1
to test with XLA's default optimization instead; an XLA_FLAGS that already names the
option is left as it is.
"""

import os

from hypothesis import HealthCheck, settings

_FAST_COMPILE = "--xla_backend_optimization_level=0"
_flags = os.environ.get("XLA_FLAGS", "")
if (
    not os.environ.get("LOWRANK_TEST_XLA_OPTIMIZED")
    and "xla_backend_optimization_level" not in _flags
):
    os.environ["XLA_FLAGS"] = f"{_flags} {_FAST_COMPILE}".strip()

settings.register_profile(
    "lowrank",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("lowrank")
