"""The attention implementations the benchmark compares, behind one signature.

Every implementation is built for one shape and one group and then called as
``fn(q, k, v) -> out`` on this rank's tokens in the model's layout:

    q: (B, N_r, H, D), k/v: (B, N_r, H_kv, D)  ->  out: (B, N_r, H, D)

which is what a Llama-style block holds after its projections (``wq(x).view(B, T, H, D)``). Each
implementation turns that into what it needs (views where it can) and runs the same local kernel,
``F.scaled_dot_product_attention``; they differ only in how tokens reach it:

* ``ours`` / ``ours_compiled``: :func:`ulysses_attention` (two fused all-to-alls per direction),
  eager or under ``torch.compile``.
* ``allgather_kv``: each rank keeps its N/P queries and all-gathers K and V (one fused
  all-gather; its backward is a reduce-scatter of dK, dV): the Megatron-SP / torchtitan-CP
  "allgather" pattern. Under a causal mask a rank attends only to the keys up to its own last
  token: the earlier ranks' keys in full and its own block causally, two calls of SDPA's CPU
  flash kernel merged by log-sum-exp (no mask, nothing computed past its last token).
* ``hybrid`` / ``ring``: :func:`hybrid_attention` with the ring degree ``parallelize_module``
  would choose (U-way Ulysses × R-way ring; R = 1 when every rank gets a head) and with R = P
  (pure ring attention): the schemes for sp beyond the head count.
* ``dtensor``: q, k, v as DTensors ``Shard(1)`` (sequence) redistributed to ``Shard(2)``
  (heads), attention, and back: what DTensor's generic redistribution does (an all-gather then a
  local chunk on CPU/gloo).
* ``deepspeed``: ``deepspeed.sequence.layer.DistributedAttention`` (one all-to-all per tensor),
  when DeepSpeed is importable.

Each comes with its own theoretical bytes per rank (:func:`theoretical_bytes`), printed next to
what the :class:`~ulysses_dtensor.comm_counter.CollectiveCounter` saw it send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...attention import ulysses_attention
from ...hybrid import choose_ring_degree, hybrid_attention, hybrid_elements_sent
from ...ring import merge_partials
from ...layout import UlyssesLayout, seq_shard_offsets, seq_shard_sizes

Tensor = torch.Tensor
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]

IMPLEMENTATIONS = ("ours", "ours_compiled", "allgather_kv", "dtensor", "deepspeed")
# sp beyond the head count (docs/hybrid.md), run in the bytes section only
HYBRID_IMPLEMENTATIONS = ("hybrid", "ring")


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: batch, query heads, kv heads, global sequence, head dim."""

    batch: int
    heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    causal: bool = True

    @property
    def gqa(self) -> bool:
        return self.kv_heads != self.heads


def deepspeed_available() -> bool:
    try:
        import deepspeed.sequence.layer  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def unsupported_reason(name: str, shape: AttentionShape, world: int) -> str | None:
    """Why ``name`` cannot run ``shape`` on ``world`` ranks, or None if it can."""
    even = shape.seq_len % world == 0
    if name in ("allgather_kv", "dtensor", "deepspeed") and not even:
        return "needs N % P == 0"
    if name == "dtensor" and (shape.heads % world or shape.kv_heads % world):
        return "needs H and H_kv divisible by P (even head shards)"
    if name == "deepspeed":
        if shape.kv_heads < world or shape.heads % world or shape.kv_heads % world:
            return "DeepSpeed rejects H_kv < P (and needs H, H_kv divisible by P)"
        if not deepspeed_available():
            return "deepspeed is not importable (pip install deepspeed)"
    return None


def build(name: str, shape: AttentionShape, group: dist.ProcessGroup) -> AttentionFn:
    """The implementation ``name`` for ``shape`` on ``group``; see the module docstring."""
    if name in HYBRID_IMPLEMENTATIONS:
        return _hybrid(shape, group, ring_degree(name, shape, dist.get_world_size(group)))
    builders = {
        "ours": _ours,
        "ours_compiled": _ours_compiled,
        "allgather_kv": _allgather_kv,
        "dtensor": _dtensor,
        "deepspeed": _deepspeed,
        "single": _single,
    }
    return builders[name](shape, group)


def _single(shape: AttentionShape, group) -> AttentionFn:
    """One process holding every token: the ideal the others are held against."""

    def attend(q, k, v):
        return sdpa_model_layout(q, k, v, is_causal=shape.causal, enable_gqa=shape.gqa)

    return attend


def sdpa_model_layout(q: Tensor, k: Tensor, v: Tensor, *, attn_mask=None, is_causal: bool, enable_gqa: bool) -> Tensor:
    """SDPA on (B, N_q, H, D) / (B, N_k, H_kv, D) tensors (transposed views in, a view out)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)


def _ours(shape: AttentionShape, group) -> AttentionFn:
    def attend(q, k, v):
        out = ulysses_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group,
            is_causal=shape.causal, enable_gqa=shape.gqa, seq_len=shape.seq_len,
        )
        return out.transpose(1, 2)

    return attend


def ring_degree(name: str, shape: AttentionShape, world: int) -> int:
    """R of the hybrid: what parallelize_module picks ("hybrid") or P (pure "ring")."""
    return world if name == "ring" else choose_ring_degree(world, shape.heads)


def _hybrid(shape: AttentionShape, group, ring: int) -> AttentionFn:
    def attend(q, k, v):
        out = hybrid_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group, ring_degree=ring,
            is_causal=shape.causal, enable_gqa=shape.gqa, seq_len=shape.seq_len,
        )
        return out.transpose(1, 2)

    return attend


def _ours_compiled(shape: AttentionShape, group) -> AttentionFn:
    return torch.compile(_ours(shape, group), dynamic=False)


def _allgather_kv(shape: AttentionShape, group) -> AttentionFn:
    from torch.distributed._functional_collectives import all_gather_single_autograd

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n_local = shape.seq_len // world
    start, stop = rank * n_local, (rank + 1) * n_local

    def attend(q, k, v):
        kv = torch.cat([k, v], dim=-1)  # one collective for both: (B, N_r, H_kv, 2D)
        if world > 1:
            # gather along dim 0 (the only dim the op promises), sequence-major
            kv = all_gather_single_autograd(kv.transpose(0, 1).contiguous(), 0, group).transpose(0, 1)
        k_all, v_all = kv.split(shape.head_dim, dim=-1)
        if not shape.causal:
            return sdpa_model_layout(q, k_all, v_all, is_causal=False, enable_gqa=shape.gqa)
        # Query i (global start + i) sees the keys of earlier ranks in full and its own block
        # causally; keys after `stop` are masked for every query and never computed.
        heads = [t.transpose(1, 2) for t in (q, k_all[:, :start], v_all[:, :start], k_all[:, start:stop], v_all[:, start:stop])]
        return _PrefixCausalAttention.apply(*heads).transpose(1, 2)

    return attend


class _PrefixCausalAttention(torch.autograd.Function):
    """softmax attention of q (B, H, n, D) over [k_prev; k_own]: k_prev (B, H_kv, m, D) in full,
    k_own (B, H_kv, n, D) causally (diagonal-aligned), without an explicit mask.

    Two calls of SDPA's CPU flash kernel merged by their log-sum-exp; backward calls the flash
    backward per block with the merged output and log-sum-exp, which is exact (the blockwise
    backward of ring attention). An explicit lower-right causal mask would instead cost
    O(n · (m + n)) memory and a mask read per score on CPU.
    """

    @staticmethod
    def forward(ctx, q, k_prev, v_prev, k_own, v_own):
        group = q.shape[1] // k_own.shape[1]
        if group > 1:  # the CPU flash op wants equal head counts; backward sums the copies back
            k_prev, v_prev, k_own, v_own = (t.repeat_interleave(group, dim=1) for t in (k_prev, v_prev, k_own, v_own))
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = flash(q, k_own, v_own, 0.0, True)
        if k_prev.shape[2]:
            out_prev, lse_prev = flash(q, k_prev, v_prev, 0.0, False)
            out, lse = merge_partials(out, lse, out_prev, lse_prev)
        ctx.group = group
        ctx.save_for_backward(q, k_prev, v_prev, k_own, v_own, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_prev, v_prev, k_own, v_own, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq, dk_own, dv_own = backward(grad_out, q, k_own, v_own, out, lse, 0.0, True)
        dk_prev, dv_prev = torch.zeros_like(k_prev), torch.zeros_like(v_prev)
        if k_prev.shape[2]:
            dq_prev, dk_prev, dv_prev = backward(grad_out, q, k_prev, v_prev, out, lse, 0.0, False)
            dq = dq + dq_prev
        grads = [dk_prev, dv_prev, dk_own, dv_own]
        if ctx.group > 1:
            grads = [g.unflatten(1, (-1, ctx.group)).sum(2) for g in grads]
        return (dq, *grads)


def _dtensor(shape: AttentionShape, group) -> AttentionFn:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("sp",))

    def to_heads(x: Tensor) -> Tensor:
        # (B, N_r, H, D) sequence shard -> (B, N, H/P, D) head shard, via DTensor's redistribute
        return DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Shard(2)]).to_local()

    def attend(q, k, v):
        out_h = sdpa_model_layout(to_heads(q), to_heads(k), to_heads(v), is_causal=shape.causal, enable_gqa=shape.gqa)
        return DTensor.from_local(out_h, mesh, [Shard(2)], run_check=False).redistribute(mesh, [Shard(1)]).to_local()

    return attend


def _deepspeed(shape: AttentionShape, group) -> AttentionFn:
    import deepspeed.comm
    from deepspeed.sequence.layer import DistributedAttention

    # DeepSpeed routes collectives through its own backend object; over an initialized
    # torch.distributed it wraps the existing process groups (no new rendezvous).
    deepspeed.comm.init_distributed("gloo", verbose=False)
    def local_attention(q, k, v):  # (B, N, H/P, D): DeepSpeed's layout after its all-to-all
        return sdpa_model_layout(q, k, v, is_causal=shape.causal, enable_gqa=shape.gqa)

    # batch-first inputs (B, N_r, H, D): scatter heads (dim 2), gather the sequence (dim 1)
    layer = DistributedAttention(local_attention, group, scatter_idx=2, gather_idx=1)

    def attend(q, k, v):
        return layer(q, k, v, 0)

    return attend


# The collectives each implementation uses for attention; anything else a run sends (the loss
# all-reduce, the parallelized model's input-shape check) is reported apart as "other".
ATTENTION_KINDS = {
    "ours": ("all_to_all",),
    "ours_compiled": ("all_to_all",),
    "deepspeed": ("all_to_all",),
    "hybrid": ("all_to_all",),
    "ring": ("all_to_all",),
    "allgather_kv": ("all_gather", "reduce_scatter"),
    "dtensor": ("all_gather",),
    "single": (),
}


def theoretical_bytes(name: str, shape: AttentionShape, world: int, rank: int, element_size: int) -> int:
    """Bytes ``rank`` must send for one forward + backward of ``name``, by its own scheme.

    * ours: :class:`UlyssesLayout` (the minimum for Ulysses: GQA kv heads sent once per reader).
    * deepspeed: every tensor's (P-1)/P to the other ranks, each way (its scheme is ours without
      the GQA and uneven cases, so on the shapes it accepts it equals ours).
    * allgather_kv: K and V to P-1 peers in forward, dK and dV reduce-scattered in backward.
    * hybrid / ring: :func:`hybrid_elements_sent` (the Ulysses all-to-alls within a group, then
      R-1 k/v hops forward, R-1 k/v and R dk/dv hops backward).
    * dtensor: every redistribution (q, k, v, out forward; their gradients backward) an
      all-gather of the local shard to P-1 peers.
    """
    if world == 1 or name == "single":
        return 0
    layout = UlyssesLayout.build(shape.batch, shape.heads, shape.kv_heads, shape.seq_len, shape.head_dim, world)
    n_local = seq_shard_sizes(shape.seq_len, world)[rank]
    q_elems = shape.batch * n_local * shape.heads * shape.head_dim
    kv_elems = shape.batch * n_local * shape.kv_heads * shape.head_dim
    if name in HYBRID_IMPLEMENTATIONS:
        elements = sum(hybrid_elements_sent(shape.batch, shape.heads, shape.kv_heads, shape.seq_len, shape.head_dim,
                                            world, ring_degree(name, shape, world), rank))
    elif name in ("ours", "ours_compiled", "deepspeed"):
        elements = layout.forward_elements_sent(rank) + layout.backward_elements_sent(rank)
    elif name == "allgather_kv":
        elements = 2 * (2 * kv_elems) * (world - 1)  # all-gather of (k, v) + reduce-scatter of (dk, dv)
    elif name == "dtensor":
        elements = 2 * (2 * q_elems + 2 * kv_elems) * (world - 1)
    else:
        raise ValueError(f"unknown implementation {name!r}")
    return elements * element_size


def local_tokens(seq_len: int, world: int, rank: int) -> slice:
    """This rank's slice of the global sequence (DTensor ``Shard`` rule)."""
    start = seq_shard_offsets(seq_shard_sizes(seq_len, world))[rank]
    return slice(start, start + seq_shard_sizes(seq_len, world)[rank])
