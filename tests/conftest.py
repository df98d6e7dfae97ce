import os

import pytest
from hypothesis import HealthCheck, settings

from ulysses_dtensor.tools.rank_group import RankGroup

# Derandomized: every run (and every rank) sees the same examples; failures reproduce.
settings.register_profile(
    "default",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    max_examples=int(os.environ.get("ULYSSES_EXAMPLES", "40")),
)
settings.load_profile("default")


@pytest.fixture(scope="module")
def ranks4():
    """Four spawned gloo ranks shared by a whole test module (subgroups of 1..4 ranks)."""
    with RankGroup(4, call_timeout_s=120, collective_timeout_s=60) as group:
        yield group
