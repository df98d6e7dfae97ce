"""Ranks that disagree (model, initialization, batch shapes) get the same clear ValueError on every
rank at setup, instead of mismatched collectives."""

from __future__ import annotations

import pytest
import torch

import ulysses_dtensor as U
from ulysses_dtensor.tools.rank_group import RankFailure
from ulysses_dtensor.tools.llama import Llama, LlamaConfig


def _parallelize(ctx, seed_by_rank: bool, dim_by_rank: bool):
    torch.manual_seed(ctx.rank if seed_by_rank else 0)
    dim = 32 + 32 * (ctx.rank == 1 and dim_by_rank)
    model = Llama(LlamaConfig(dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=64))
    U.parallelize_module(model, ctx.mesh("sp"))
    return "parallelized"


def _first_forward(ctx, length_by_rank: bool):
    torch.manual_seed(0)
    model = U.parallelize_module(Llama(LlamaConfig(dim=32, n_layers=1, max_seq_len=64)), ctx.mesh("sp"))
    n = 32 + 4 * (ctx.rank == ctx.world - 1 and length_by_rank)
    tokens = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    model(tokens)
    model(tokens[:, :16])  # later steps may change shape together: checked once, not per step
    return "ran"


@pytest.mark.parametrize("seed_by_rank,dim_by_rank,message", [
    (True, False, "parameter values differ across ranks: global ranks [1, 2]"),
    (False, True, "the model differs across ranks: global ranks [1]"),
])
def test_different_models_refused_on_every_rank(ranks4, seed_by_rank, dim_by_rank, message):
    with pytest.raises(RankFailure) as info:
        ranks4.run(_parallelize, seed_by_rank, dim_by_rank, world=3)
    assert sorted(info.value.errors) == [0, 1, 2]  # every rank raised, none hung
    for kind, text in info.value.errors.values():
        assert kind == "ValueError" and message in text


def test_same_model_accepted(ranks4):
    assert ranks4.run(_parallelize, False, False, world=3) == ["parallelized"] * 3


def test_different_batch_shapes_refused_at_the_first_forward(ranks4):
    with pytest.raises(RankFailure) as info:
        ranks4.run(_first_forward, True, world=2)
    assert sorted(info.value.errors) == [0, 1]
    for kind, text in info.value.errors.values():
        assert kind == "ValueError" and "got inputs of different shapes" in text
    assert ranks4.run(_first_forward, False, world=2) == ["ran"] * 2
