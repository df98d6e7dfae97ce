"""torchtitan 0.3.0 Llama3 debug model under parallelize_module, vs one process.

Flex attention (torchtitan's default): forward parity only — torch has no flex backward on CPU.
The same model with torchtitan's SDPA inner attention: forward and backward.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from helpers import rel_err

pytest.importorskip("torchtitan", reason="install the 'torchtitan' extra")
VOCAB = 2048


def _eager_flex():
    """Reference and Ulysses runs both use eager flex_attention (no per-rank Inductor compile)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torchtitan.models.common.decoder as decoder
    from torchtitan.models.common.attention import FlexAttention

    FlexAttention._compiled_flex_attn = staticmethod(flex_attention)
    decoder.create_attention_mask = create_block_mask


def build_debugmodel(inner: str, max_seq_len: int = 256):
    """torchtitan's Llama3 "debugmodel" (dim 256, 16 heads, 6 layers), random init, on CPU."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3 import llama3_configs

    cfg = llama3_configs["debugmodel"](attn_backend="flex")
    for layer in cfg.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=max_seq_len)
        if inner == "sdpa":
            layer.attention.inner_attention = ScaledDotProductAttention.Config()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states(buffer_device=torch.device("cpu"))
    return model


def _rank_titan(ctx, inner, N):
    import ulysses_dtensor as U
    from torch.distributed.device_mesh import DeviceMesh

    _eager_flex()
    mesh = ctx._meshes.setdefault(("sp", ctx.world), DeviceMesh.from_group(ctx.group, "cpu", mesh_dim_names=("sp",)))
    ref = build_debugmodel(inner)
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    tokens = torch.randint(0, VOCAB, (2, N), generator=torch.Generator().manual_seed(N))
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
    ref_params = dict(ref.named_parameters())
    errors["grads"] = max(rel_err(p.grad.full_tensor(), ref_params[n].grad) for n, p in model.named_parameters())
    return errors


@pytest.mark.parametrize("sp,N", [(2, 64), (4, 96), (4, 90)])
def test_flex_debugmodel_forward_matches(ranks4, sp, N):
    for errors in ranks4.run(_rank_titan, "flex", N, world=sp, timeout_s=300):
        assert errors["logits"] <= 1e-5, errors


@pytest.mark.parametrize("sp,N", [(2, 64), (4, 90)])
def test_sdpa_debugmodel_forward_backward_matches(ranks4, sp, N):
    for errors in ranks4.run(_rank_titan, "sdpa", N, world=sp, timeout_s=300):
        assert errors["logits"] <= 1e-5 and errors["grads"] <= 1e-5, errors
