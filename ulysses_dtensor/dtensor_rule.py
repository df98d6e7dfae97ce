"""DTensor rule: SDPA on sequence-sharded DTensors runs as Ulysses attention.

``F.scaled_dot_product_attention(q, k, v)`` with q/k/v DTensors placed ``Shard(2)`` (sequence)
on one mesh dimension returns a ``Shard(2)`` DTensor computed with our fused all-to-all:

    Shard(2) --all-to-all--> heads sharded, full sequence --local SDPA op--> --all-to-all--> Shard(2)

DTensor's sharding propagation cannot express this: a registered strategy makes it pick
Replicate (its cost model penalises all-to-all), or redistribute through all-gathers on CPU.
So the rule is installed through DTensor's op-override hook (``_custom_op_handlers``, the one
torch's context parallel uses) for every SDPA backend op, forward and backward: CPU flash,
CUDA flash, memory-efficient and cuDNN. Other mesh dimensions may be Replicate or shard batch
(dim 0) or heads (dim 1, tensor parallel); both stay local. Inputs with no ``Shard(2)`` go to
DTensor's default handling unchanged.

Backward moves the minimum too: the forward handler keeps the head-sharded q, k, v and output on
the logsumexp it returns (autograd saves that very object for the backward op), so the backward
handler exchanges only the output gradient to heads and dq, dk, dv back. The price is memory:
autograd also keeps the sequence-sharded q, k, v and output, so this path holds attention
activations twice until backward (:func:`ulysses_attention`, used by ``parallelize_module``,
holds them once).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from .attention import _match_kv_heads, _mask_for_heads
from .comm import _head_to_seq, _seq_to_head
from .layout import UlyssesLayout

aten = torch.ops.aten

# forward op -> its backward op
_SDPA_OPS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
    aten._scaled_dot_product_flash_attention.default: aten._scaled_dot_product_flash_attention_backward.default,
    aten._scaled_dot_product_efficient_attention.default: aten._scaled_dot_product_efficient_attention_backward.default,
    aten._scaled_dot_product_cudnn_attention.default: aten._scaled_dot_product_cudnn_attention_backward.default,
}
_MASK_ARGS = ("attn_mask", "attn_bias")


def _bind(op, args, kwargs) -> dict:
    """Arguments by schema name (defaults filled in)."""
    bound = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _unbind(op, bound: dict) -> tuple[list, dict]:
    args, kwargs = [], {}
    for arg in op._schema.arguments:
        if arg.name not in bound:
            continue
        (kwargs.__setitem__(arg.name, bound[arg.name]) if arg.kwarg_only else args.append(bound[arg.name]))
    return args, kwargs


def _seq_mesh_dim(t: DTensor) -> int | None:
    """The mesh dim on which ``t`` is sequence-sharded, or None; errors on layouts we refuse."""
    sp_dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard) and p.dim % 4 == 2]
    if not sp_dims:
        return None
    if len(sp_dims) > 1:
        raise ValueError(f"SDPA input is sharded along the sequence on several mesh dims {sp_dims}; Ulysses needs one")
    for i, p in enumerate(t.placements):
        if i != sp_dims[0] and not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % 4 in (0, 1))):
            raise ValueError(
                f"SDPA input placement {p} on mesh dim {i} is not supported with Ulysses: other mesh "
                "dims may be Replicate, Shard(0) (batch) or Shard(1) (heads)"
            )
    return sp_dims[0]


def _default(op, args, kwargs):
    """DTensor's own handling: call the op again with our handler out of the way."""
    handlers = DTensor._op_dispatcher._custom_op_handlers
    ours = handlers.pop(op)
    try:
        return op(*args, **kwargs)
    finally:
        handlers[op] = ours


def _wrap(local: torch.Tensor, like: DTensor, global_shape) -> DTensor:
    shape = torch.Size(global_shape)
    stride = torch.empty(shape, device="meta").stride()
    spec = DTensorSpec(like.device_mesh, like.placements, tensor_meta=TensorMeta(shape, stride, local.dtype))
    return DTensor(local, spec, requires_grad=False)


def _wrap_private(value, like: DTensor):
    """Forward outputs only our backward reads (lse, RNG state): kept in the head-sharded local
    form, wrapped as this rank's value so autograd can save them."""
    if not isinstance(value, torch.Tensor):
        return value
    spec = DTensorSpec(
        like.device_mesh, (Replicate(),) * like.device_mesh.ndim,
        tensor_meta=TensorMeta(value.shape, value.stride(), value.dtype),
    )
    return DTensor(value, spec, requires_grad=False)


def _local(value):
    return value._local_tensor if isinstance(value, DTensor) else value


def _mask_for_local_batch(mask: torch.Tensor, q: DTensor) -> torch.Tensor:
    """A replicated mask with a batch dim, cut to this rank's batch rows when q shards batch."""
    if mask.dim() < 4 or mask.shape[0] == 1 or q._local_tensor.shape[0] == q.shape[0]:
        return mask
    _, offset = compute_local_shape_and_global_offset(q.shape, q.device_mesh, q.placements)
    return mask[offset[0] : offset[0] + q._local_tensor.shape[0]]


def _setup(bound: dict, q: DTensor, k: DTensor, v: DTensor):
    for name, t in (("key", k), ("value", v)):
        if not isinstance(t, DTensor) or t.device_mesh != q.device_mesh or t.placements != q.placements:
            raise ValueError(
                f"Ulysses SDPA needs query, key and value on one mesh with the same placements; "
                f"query {q.placements}, {name} {getattr(t, 'placements', type(t).__name__)}"
            )
    sp_dim = _seq_mesh_dim(q)
    mesh = q.device_mesh
    group, rank = mesh.get_group(sp_dim), mesh.get_local_rank(sp_dim)
    ql, kl, vl = q._local_tensor, k._local_tensor, v._local_tensor
    layout = UlyssesLayout.build(
        ql.shape[0], ql.shape[1], kl.shape[1], q.shape[2], ql.shape[3], mesh.size(sp_dim), vl.shape[3]
    )
    if layout.num_heads % layout.num_kv_heads:
        raise ValueError(f"num_heads={layout.num_heads} is not a multiple of num_kv_heads={layout.num_kv_heads}")
    for name in _MASK_ARGS:
        mask = bound.get(name)
        if isinstance(mask, DTensor):
            if any(not isinstance(p, Replicate) for p in mask.placements):
                raise ValueError(f"{name} must be a replicated DTensor of the global (N, N) mask, got {mask.placements}")
            mask = mask._local_tensor
        if isinstance(mask, torch.Tensor):
            mask = _mask_for_local_batch(mask, q)
            start, stop = layout.q_ranges[rank]
            bound[name] = _mask_for_heads(mask, layout.num_heads, start, stop)
    return layout, rank, group


def _call_local_op(op, bound: dict):
    """The SDPA op on this rank's heads. With no head here (H < P) kernels may crash on empty
    input, so run one zero head and keep zero heads of the outputs that carry a head dim
    (output, logsumexp)."""
    q_h = bound["query"]
    if q_h.shape[1] > 0:
        args, kwargs = _unbind(op, bound)
        return op(*args, **kwargs)
    one_head = {n: bound[n].new_zeros(bound[n].shape[0], 1, *bound[n].shape[2:]) for n in ("query", "key", "value")}
    args, kwargs = _unbind(op, {**bound, **one_head, **{m: None for m in _MASK_ARGS if m in bound}})
    outs = op(*args, **kwargs)
    return tuple(o[:, :0] if i < 2 else o for i, o in enumerate(outs))


def _forward_handler(op, args, kwargs):
    bound = _bind(op, args, kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    if not isinstance(q, DTensor) or _seq_mesh_dim(q) is None:
        return _default(op, args, kwargs)
    layout, rank, group = _setup(bound, q, k, v)
    q_h, k_h, v_h = _seq_to_head(layout.qkv_plan(rank, group), [q._local_tensor, k._local_tensor, v._local_tensor])
    k_x, v_x, _ = _match_kv_heads(q_h, k_h, v_h, layout, rank)
    bound.update(query=q_h, key=k_x, value=v_x)
    outs = _call_local_op(op, bound)
    # Autograd saves this logsumexp object and hands it to the backward handler: keep the
    # head-sharded inputs and output on it, so backward exchanges only the output gradient.
    outs[1]._ulysses_head_sharded = (q_h, k_h, v_h, outs[0])
    (out,) = _head_to_seq(layout.out_plan(rank, group), [outs[0]])
    global_out_shape = (*q.shape[:3], v.shape[3])
    return (_wrap(out, q, global_out_shape), *(_wrap_private(o, q) for o in outs[1:]))


def _backward_handler(op, args, kwargs):
    bound = _bind(op, args, kwargs)
    grad_name = "grad_out" if "grad_out" in bound else "grad_out_"
    q, k, v = bound["query"], bound["key"], bound["value"]
    if not isinstance(q, DTensor) or _seq_mesh_dim(q) is None:
        return _default(op, args, kwargs)
    layout, rank, group = _setup(bound, q, k, v)
    grad = bound[grad_name]
    if isinstance(grad, DTensor) and grad.placements != q.placements:
        # e.g. the gradient of out.sum() arrives replicated: take this rank's sequence shard
        bound[grad_name] = grad.redistribute(q.device_mesh, q.placements)
    saved = getattr(_local(bound["logsumexp"]), "_ulysses_head_sharded", None)
    if saved is not None:  # the minimum: only the output gradient goes to heads
        q_h, k_h, v_h, out_h = saved
        (grad_h,) = _seq_to_head(layout.out_plan(rank, group), [_local(bound[grad_name])])
    else:  # this logsumexp did not come from our forward handler: exchange all five at once
        plan = layout.plan(("q", "kv", "kv", "q", "q"), rank, group)
        q_h, k_h, v_h, out_h, grad_h = _seq_to_head(
            plan, [_local(bound[n]) for n in ("query", "key", "value", "out", grad_name)]
        )
    k_x, v_x, _ = _match_kv_heads(q_h, k_h, v_h, layout, rank)
    local = {n: _local(x) for n, x in bound.items()}
    local.update({"query": q_h, "key": k_x, "value": v_x, "out": out_h, grad_name: grad_h})
    if q_h.shape[1] == 0:  # no head on this rank (H < P): nothing to compute, still exchange
        grads = (q_h, k_h.new_zeros(k_h.shape), v_h.new_zeros(v_h.shape))
    else:
        args, kwargs = _unbind(op, local)
        grads = op(*args, **kwargs)
    dq_h, dk_h, dv_h = grads[0], grads[1], grads[2]
    if k_x is not k_h:  # kv heads were expanded for a non-uniform local grouping: sum back
        index = torch.tensor(layout.kv_expansion_index(rank), device=dk_h.device)
        dk_h = k_h.new_zeros(k_h.shape).index_add_(1, index, dk_h)
        dv_h = v_h.new_zeros(v_h.shape).index_add_(1, index, dv_h)
    dq, dk, dv = _head_to_seq(layout.qkv_plan(rank, group), [dq_h, dk_h, dv_h])
    result = (_wrap(dq, q, q.shape), _wrap(dk, k, k.shape), _wrap(dv, v, v.shape))
    return result + (None,) * (len(grads) - 3)


def register() -> None:
    """Install the rule, process-wide, until :func:`unregister` (idempotent). Importing the
    package installs nothing; :func:`dtensor_attention_rule` scopes it to a block."""
    handlers = DTensor._op_dispatcher._custom_op_handlers
    for forward, backward in _SDPA_OPS.items():
        handlers[forward] = _forward_handler
        handlers[backward] = _backward_handler


def unregister() -> None:
    """Remove the rule: DTensor SDPA goes back to DTensor's own strategies."""
    handlers = DTensor._op_dispatcher._custom_op_handlers
    for forward, backward in _SDPA_OPS.items():
        for op in (forward, backward):
            if handlers.get(op) in (_forward_handler, _backward_handler):
                del handlers[op]


@contextlib.contextmanager
def dtensor_attention_rule() -> Iterator[None]:
    """Within the block, SDPA on ``Shard(2)`` DTensors runs as Ulysses attention (forward and
    the backward of outputs made inside it, if run inside it too); on exit the previous handlers
    are back. Nests.

    >>> with ulysses_dtensor.dtensor_attention_rule():
    ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # q, k, v: Shard(2)
    ...     out.sum().backward()
    """
    handlers = DTensor._op_dispatcher._custom_op_handlers
    ops = [op for pair in _SDPA_OPS.items() for op in pair]
    saved = {op: handlers[op] for op in ops if op in handlers}
    register()
    try:
        yield
    finally:
        for op in ops:
            handlers.pop(op, None)
        handlers.update(saved)
