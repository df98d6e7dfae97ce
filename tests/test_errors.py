"""Bad input: a clear ValueError/TypeError on every rank, raised before any collective."""

from __future__ import annotations

import pytest
import torch

from ulysses_dtensor import ulysses_attention

from ulysses_dtensor.comm import head_to_seq, seq_to_head

from ulysses_dtensor.comm_counter import CollectiveCounter
from ulysses_dtensor.kernels import flash_attn_available

P, B, H, N, D = 4, 2, 8, 16, 4
n = N // P


def _inputs(**over):
    shapes = dict(q=(B, H, n, D), k=(B, H, n, D), v=(B, H, n, D))
    shapes.update({k: v for k, v in over.items() if k in shapes})
    return [torch.randn(*shapes[name], dtype=torch.float64) for name in ("q", "k", "v")]


def _case(name, ctx):
    """Build the bad call for ``name`` on this rank; returns a thunk."""
    q, k, v = _inputs()
    g = ctx.group
    full_mask = torch.ones(N, N, dtype=torch.bool)
    cases = {
        "dtype_mismatch": lambda: ulysses_attention(q, k.float(), v, g),
        "not_4d": lambda: ulysses_attention(q[0], k, v, g),
        "not_a_tensor": lambda: ulysses_attention(q.tolist(), k, v, g),
        "seq_mismatch_qk": lambda: ulysses_attention(q, k[:, :, :-1], v, g),
        "batch_mismatch": lambda: ulysses_attention(q, k[:1], v, g),
        "kv_heads_differ": lambda: ulysses_attention(q, k[:, :2], v[:, :4], g, enable_gqa=True),
        "heads_not_multiple_of_kv": lambda: ulysses_attention(q[:, :6], k[:, :4], v[:, :4], g, enable_gqa=True),
        "gqa_without_enable_gqa": lambda: ulysses_attention(q, k[:, :2], v[:, :2], g),
        "head_dim_mismatch": lambda: ulysses_attention(q, k[..., :2], v, g),
        "device_mismatch": lambda: ulysses_attention(q, k.to("meta"), v, g),
        "seq_shorter_than_sp": lambda: ulysses_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], g, seq_len=3),
        "seq_len_inconsistent": lambda: ulysses_attention(q, k, v, g, seq_len=N + 1),
        "mask_local_rows": lambda: ulysses_attention(q, k, v, g, attn_mask=torch.ones(n, N, dtype=torch.bool)),
        "mask_dtype": lambda: ulysses_attention(q, k, v, g, attn_mask=torch.zeros(N, N, dtype=torch.float32)),
        "mask_batch": lambda: ulysses_attention(q, k, v, g, attn_mask=torch.ones(3, 1, N, N, dtype=torch.bool)),
        "mask_heads": lambda: ulysses_attention(q, k, v, g, attn_mask=torch.ones(1, 3, N, N, dtype=torch.bool)),
        "mask_5d": lambda: ulysses_attention(q, k, v, g, attn_mask=torch.ones(1, 1, 1, N, N, dtype=torch.bool)),
        "mask_and_causal": lambda: ulysses_attention(q, k, v, g, attn_mask=full_mask, is_causal=True),
        "mask_not_tensor": lambda: ulysses_attention(q, k, v, g, attn_mask=[[True]]),
        "unknown_kernel": lambda: ulysses_attention(q, k, v, g, kernel="magic"),
        "flex_with_tensor_mask": lambda: ulysses_attention(q, k, v, g, kernel="flex", attn_mask=full_mask),
        "flex_with_dropout": lambda: ulysses_attention(q, k, v, g, kernel="flex", dropout_p=0.1),
        "flash_with_mask": lambda: ulysses_attention(q, k, v, g, kernel="flash", attn_mask=full_mask),
        "group_not_a_group": lambda: ulysses_attention(q, k, v, "sp"),
        "seq_to_head_wrong_seq_len": lambda: seq_to_head(q, g, seq_len=N + 1),
        "head_to_seq_wrong_heads": lambda: head_to_seq(torch.randn(B, 3, N, D), g, num_heads=8),
    }
    return cases[name]


EXPECTED = {
    "dtype_mismatch": (TypeError, "share one dtype"),
    "not_4d": (ValueError, "must be 4-D"),
    "not_a_tensor": (TypeError, "must be a torch.Tensor"),
    "seq_mismatch_qk": (ValueError, "local sequence lengths differ"),
    "batch_mismatch": (ValueError, "batch sizes differ"),
    "kv_heads_differ": (ValueError, "same number of heads"),
    "heads_not_multiple_of_kv": (ValueError, "not a multiple of num_kv_heads"),
    "gqa_without_enable_gqa": (ValueError, "enable_gqa=True"),
    "head_dim_mismatch": (ValueError, "head dims differ"),
    "device_mismatch": (ValueError, "one device"),
    "seq_shorter_than_sp": (ValueError, "shorter than the sequence-parallel degree"),
    "seq_len_inconsistent": (ValueError, "pass seq_len=<global length>"),
    "mask_local_rows": (ValueError, "global"),
    "mask_dtype": (TypeError, "attn_mask must be bool or"),
    "mask_batch": (ValueError, "does not broadcast"),
    "mask_heads": (ValueError, "does not broadcast"),
    "mask_5d": (ValueError, "2-D to 4-D"),
    "mask_and_causal": (ValueError, "not both"),
    "mask_not_tensor": (TypeError, "attn_mask must be a Tensor"),
    "unknown_kernel": (ValueError, "unknown attention kernel"),
    "flex_with_tensor_mask": (TypeError, "BlockMask"),
    "flex_with_dropout": (ValueError, "dropout_p"),
    "flash_with_mask": (ValueError, "no attn_mask") if flash_attn_available() else (RuntimeError, "flash-attn"),
    "group_not_a_group": (TypeError, "ProcessGroup"),
    "seq_to_head_wrong_seq_len": (ValueError, "seq_len"),
    "head_to_seq_wrong_heads": (ValueError, "heads"),
}


def _rank_bad_call(ctx, name):
    thunk = _case(name, ctx)
    with CollectiveCounter() as counter:
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return type(exc), str(exc), len(counter.records)
    return None, "no error", len(counter.records)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_raises_before_any_collective(ranks4, name):
    results = ranks4.run(_rank_bad_call, name, world=P)
    exc_type, pattern = EXPECTED[name]
    for rank, (typ, msg, collectives) in enumerate(results):
        assert typ is not None, f"{name}: rank {rank} raised nothing"
        assert issubclass(typ, exc_type), f"{name}: rank {rank} raised {typ.__name__}: {msg}"
        assert pattern in msg, f"{name}: {msg!r} lacks {pattern!r}"
        assert collectives == 0, f"{name}: {collectives} collectives ran before the error"


def _rank_not_member(ctx):
    group_of_two = ctx.groups[2]
    q = torch.randn(1, 4, 4, 2)
    try:
        ulysses_attention(q, q, q, group_of_two)
    except ValueError as exc:
        return str(exc)
    return "ok"


def test_rank_outside_the_group_is_refused(ranks4):
    results = ranks4.run(_rank_not_member, world=4)
    assert results[:2] == ["ok", "ok"]
    assert all("not a member" in r for r in results[2:])


def test_uninitialized_process_group_is_refused():
    q = torch.randn(1, 2, 4, 2)
    with pytest.raises(RuntimeError, match="not initialized"):
        ulysses_attention(q, q, q)
