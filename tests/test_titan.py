"""torchtitan 0.3.0 Llama3 debug model under parallelize_module, vs one process.

Flex attention (torchtitan's default): forward parity only — torch has no flex backward on CPU.
The same model with torchtitan's SDPA inner attention: forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import gathered_grad_error, make_mesh, rel_err
from titan_builders import TITAN_VOCAB, build_debugmodel, use_eager_flex

pytest.importorskip("torchtitan", reason="install the 'torchtitan' extra")


def _rank_titan(ctx, inner, N):
    import ulysses_dtensor as U

    use_eager_flex()
    mesh = make_mesh(ctx, 1, ctx.world)
    ref = build_debugmodel(inner)
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    tokens = torch.randint(0, TITAN_VOCAB, (2, N), generator=torch.Generator().manual_seed(N))
    positions = torch.arange(N).expand(2, N)
    if inner == "flex":
        masks = ref.get_attention_masks(positions)  # BlockMask of the global sequence
        with torch.no_grad():
            ref_out = ref(tokens, attention_masks=masks)
            out = model(tokens, attention_masks=masks)
        return {"logits": rel_err(U.gather_sequence(out, mesh), ref_out)}
    ref_out = ref(tokens)
    ref_out.float().pow(2).mean().backward()
    out = model(tokens)
    # mean over the global sequence: each rank's share of the sum / global count
    (out.float().pow(2).sum() / ref_out.numel()).backward()
    errors = {"logits": rel_err(U.gather_sequence(out.detach(), mesh), ref_out.detach())}
    errors["grads"] = gathered_grad_error(model, ref)
    return errors


@pytest.mark.parametrize("sp,N", [(2, 64), (4, 96), (4, 90)])
def test_flex_debugmodel_forward_matches(ranks4, sp, N):
    for errors in ranks4.run(_rank_titan, "flex", N, world=sp, timeout_s=300):
        assert errors["logits"] <= 1e-5, errors


@pytest.mark.parametrize("sp,N", [(2, 64), (4, 90)])
def test_sdpa_debugmodel_forward_backward_matches(ranks4, sp, N):
    for errors in ranks4.run(_rank_titan, "sdpa", N, world=sp, timeout_s=300):
        assert errors["logits"] <= 1e-5 and errors["grads"] <= 1e-5, errors
