"""Shared test settings: a small, deterministic hypothesis profile for a 2-core machine."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "lowrank",
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("lowrank")
