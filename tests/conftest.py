"""Hypothesis settings and the fixtures test modules share: the rank groups (one per test module
that asks for it, module scope) and the train job's reference run."""

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


# -- rank groups -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks4():
    """Four spawned gloo ranks shared by a whole test module (subgroups of 1..4 ranks)."""
    with RankGroup(4, call_timeout_s=120, collective_timeout_s=60) as group:
        yield group


@pytest.fixture(scope="module")
def ranks8(request):
    """Eight spawned gloo ranks shared by a whole test module (subgroups of 1..8 ranks): 180 s a
    call, 60 s a collective, or the module's ``RANKS8_TIMEOUTS`` (RankGroup's keyword arguments)."""
    timeouts = getattr(request.module, "RANKS8_TIMEOUTS", dict(call_timeout_s=180, collective_timeout_s=60))
    with RankGroup(8, **timeouts) as group:
        yield group


# -- the train job -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    """One uninterrupted float64 run of ``helpers.SMALL_TRAIN`` (sp=2), with its final checkpoint."""
    from dataclasses import replace

    from helpers import SMALL_TRAIN
    from ulysses_dtensor.tools.train import run_train

    out = tmp_path_factory.mktemp("ref")
    return run_train(replace(SMALL_TRAIN, out_dir=str(out), checkpoint_dir=str(out / "ckpt")))
