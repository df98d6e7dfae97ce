"""Ulysses for the other sequence mixers of hybrid models: linear attention, state spaces, convolutions.

Gated DeltaNet (Qwen3-Next, Qwen3.5, OLMo-Hybrid) and Mamba2 (NemotronH, Zamba2, Bamba, Falcon-H1,
Granite-MoE-Hybrid) are independent across *value channels*: each channel's recurrent state is
updated from that channel's value and from query/key (B/C) vectors and gates shared by a head or
a group of heads. So the Ulysses exchange works for them as for attention: one all-to-all turns
this rank's N/P tokens × all channels into all N tokens × its channels (plus the key heads /
B-C groups and per-head gates they read, each sent once to every rank that reads it, as GQA key
heads are), the model's own scan kernel runs over the whole sequence, and one all-to-all brings
the output back. Beyond the head count a rank gets a slice of one head's channels
(``layout.channel_ranges``), so every sp degree up to heads × head_dim is exact with no idle rank.

Short causal convolutions (Lfm2's, and the one in front of every Gated DeltaNet / Mamba2 scan)
stay in the sequence layout: the K - 1 tokens before a shard come from the previous rank
(``halo.py``), B·C·(K-1) elements per rank instead of an all-to-all of the whole activation.

Transformers (5.x) writes all of these families on the same module-level functions, which a
parallelized forward rebinds (``namespaces.rebound``): ``causal_conv1d_fn``,
``torch_chunk_gated_delta_rule``, ``mamba2_chunk_scan`` (and the fused CUDA-only
``mamba2_split_conv1d_scan_combined``, turned off so the unfused path runs). The mixer modules
themselves run on their local tokens (:func:`run_mixer_on_local_tokens`), so everything between
those calls is plain per-token tensor code. The kernels are the model's own (torch fallbacks on
CPU, fla / mamba_ssm when importable). Packed documents reset the convolution and the recurrent
state at every document start.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

from .comm import exchange_head_to_seq, exchange_seq_to_head
from .halo import previous_tokens
from .layout import (
    ExchangePlan, HeadRange, channel_ranges, covering_ranges, kv_head_ranges, local_kv_index, seq_shard_offsets,
    seq_shard_sizes,
)
from .propagation import from_local
from .rewrite import running_mode

Tensor = torch.Tensor

# rebound function name -> the mixer kind it implements (named in errors and the printed plan)
MIXER_FUNCTIONS = {
    "torch_chunk_gated_delta_rule": "Gated DeltaNet",
    "mamba2_chunk_scan": "Mamba2",
    "causal_conv1d_fn": "short causal convolution",
}
# class names of sequence mixers other than attention; one that calls none of MIXER_FUNCTIONS
# (or a convolution module outside a known mixer) is refused by name
_OTHER_MIXER = re.compile(r"Mamba|Recurrent|Rglru|LinearAttention|Lightning|DeltaNet|Rwkv|Retention|Hyena|ShortConv|Ssm|SSM")
_ACTIVATIONS = {None: lambda x: x, "silu": F.silu, "swish": F.silu}


# -- the channel layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelExchange:
    """Who holds which channels of a mixer over the sp group, and the exchanges between layouts.

    ``num_heads`` heads of ``head_dim`` value channels; ``num_groups`` key heads (Gated DeltaNet)
    or B/C groups (Mamba2), head h reading group ``layout.kv_head_of(h, num_heads, num_groups)``
    (as a GQA query head its kv head).
    Per rank: ``channels`` (value channels), ``heads`` (the heads they belong to) and ``groups``
    (the groups those heads read); heads and groups may be shared by ranks (their gradients are
    summed on the way back).
    """

    group: dist.ProcessGroup
    rank: int
    seq_sizes: tuple[int, ...]
    num_heads: int
    head_dim: int
    num_groups: int
    channels: tuple[HeadRange, ...]
    heads: tuple[HeadRange, ...]
    groups: tuple[HeadRange, ...]

    @staticmethod
    def build(group, rank: int, seq_len: int, num_heads: int, head_dim: int, num_groups: int) -> "ChannelExchange":
        world = dist.get_world_size(group)
        if num_groups < 1 or num_heads % num_groups:
            raise ValueError(f"{num_heads} heads do not split into {num_groups} key heads / groups")
        channels = channel_ranges(num_heads, head_dim, world)
        heads = covering_ranges(channels, head_dim)
        return ChannelExchange(
            group, rank, tuple(seq_shard_sizes(seq_len, world)), num_heads, head_dim, num_groups,
            tuple(channels), tuple(heads), tuple(kv_head_ranges(heads, num_heads, num_groups)),
        )

    @property
    def world(self) -> int:
        return len(self.seq_sizes)

    def plan(self, kinds: Sequence[str]) -> ExchangePlan:
        """The fused exchange of tensors in the channel layout, one kind per tensor in order:
        ``"group"`` (B, G, *, Dg) split by key heads / B-C groups, ``"channel"`` (B, H·D, *, 1)
        by value channels, ``"head"`` (B, H, *, 1) by heads."""
        splits = {
            "group": (self.groups, self.num_groups),
            "channel": (self.channels, self.num_heads * self.head_dim),
            "head": (self.heads, self.num_heads),
        }
        return ExchangePlan.by_kind(splits, kinds, self.seq_sizes, self.rank, self.group)

    def to_channels(self, grouped: Sequence[Tensor], channels: Sequence[Tensor], per_head: Sequence[Tensor]):
        """Sequence layout -> channel layout, one all-to-all per dtype (one when all agree).

        Args (this rank's tokens, n of them): grouped ``(B, n, G, Dg)``; channels ``(B, n, H, D)``;
        per_head ``(B, n, H)``.

        Returns the three lists over all N tokens: ``(B, N, g_r, Dg)``, ``(B, N, h_r, c_r / h_r)``
        (a slice of one head's channels beyond the head count), ``(B, N, h_r)``.
        """
        batch, n = channels[0].shape[:2]
        entries = [(t.transpose(1, 2), "group") for t in grouped]
        width = self.num_heads * self.head_dim
        entries += [(t.reshape(batch, n, width).transpose(1, 2).unsqueeze(-1), "channel") for t in channels]
        entries += [(t.transpose(1, 2).unsqueeze(-1), "head") for t in per_head]
        received: list[Tensor | None] = [None] * len(entries)
        for dtype in dict.fromkeys(t.dtype for t, _ in entries):  # insertion-ordered dtypes
            picked = [i for i, (t, _) in enumerate(entries) if t.dtype == dtype]
            plan = self.plan([entries[i][1] for i in picked])
            for i, out in zip(picked, exchange_seq_to_head(plan, *[entries[i][0] for i in picked])):
                received[i] = out
        h0, h1 = self.heads[self.rank]
        outs = [r.transpose(1, 2) for r in received[: len(grouped)]]
        outs += [r.squeeze(-1).transpose(1, 2).reshape(batch, r.shape[2], h1 - h0, -1)
                 for r in received[len(grouped) : len(grouped) + len(channels)]]
        outs += [r.squeeze(-1).transpose(1, 2) for r in received[len(grouped) + len(channels) :]]
        a, b = len(grouped), len(grouped) + len(channels)
        return outs[:a], outs[a:b], outs[b:]

    def expand_groups(self, t: Tensor) -> Tensor:
        """(B, N, g_r, Dg) -> (B, N, h_r, Dg): each local head's own group (what the model's kernel
        does with ``repeat_interleave``, for the local heads, which need not align with groups)."""
        index = local_kv_index(self.heads[self.rank], self.groups[self.rank], self.num_heads, self.num_groups)
        if index == list(range(t.shape[2])):
            return t
        return t.index_select(2, torch.tensor(index, device=t.device))

    def head_slice(self, t: Tensor | None) -> Tensor | None:
        """A per-head parameter ``(H, ...)`` for the local heads."""
        h0, h1 = self.heads[self.rank]
        return None if t is None else t[h0:h1]

    def to_sequence(self, out: Tensor) -> Tensor:
        """Channel layout ``(B, N, h_r, c_r / h_r)`` -> sequence layout ``(B, n, H, D)``."""
        batch, seq_len = out.shape[:2]
        flat = out.reshape(batch, seq_len, -1).transpose(1, 2).unsqueeze(-1)
        (back,) = exchange_head_to_seq(self.plan(["channel"]), flat)
        return back.squeeze(-1).transpose(1, 2).reshape(batch, back.shape[2], self.num_heads, self.head_dim)

    def elements_sent(self, rank: int, batch: int, group_dims: Sequence[int], channel_tensors: int,
                      head_tensors: int) -> tuple[int, int]:
        """Elements ``rank`` sends in one forward and one backward of a mixer call: its tokens
        of what every other rank reads (``group_dims``: per grouped tensor its Dg), then the
        output's channels back; the backward runs the same two exchanges the other way."""

        def inputs(d):
            return (sum(_size(self.groups[d]) * g for g in group_dims) + channel_tensors * _size(self.channels[d])
                    + head_tensors * _size(self.heads[d]))

        def seq_to_channels(width):
            return sum(batch * self.seq_sizes[rank] * width(d) for d in range(self.world) if d != rank)

        def channels_to_seq(width):
            return sum(batch * self.seq_sizes[d] * width(rank) for d in range(self.world) if d != rank)

        output = lambda d: _size(self.channels[d])  # noqa: E731
        return seq_to_channels(inputs) + channels_to_seq(output), seq_to_channels(output) + channels_to_seq(inputs)


def _size(r: HeadRange) -> int:
    return r[1] - r[0]


# -- packed documents ------------------------------------------------------------------------------


def _per_document(kernel: Callable[..., Tensor], documents, *tensors: Tensor) -> Tensor:
    """``kernel(*tensors)`` (all (B, N, ...)) with the state reset at every document start: run
    on each document's span and concatenated along the sequence; rows with different documents
    run on their own."""
    if documents is None or documents.is_single_document():
        return kernel(*tensors)
    starts = documents.starts()
    rows = [(slice(None), starts[0])] if len({tuple(s) for s in starts}) == 1 else [
        (slice(b, b + 1), s) for b, s in enumerate(starts)]
    out = [torch.cat([kernel(*(t[r, a:b] for t in tensors)) for a, b in zip(s[:-1], s[1:])], dim=1) for r, s in rows]
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def _refuse_state(kind: str, **states) -> None:
    given = [name for name, value in states.items() if value is not None and value is not False]
    if given:
        raise ValueError(
            f"parallelize_module: a {kind} call with {', '.join(given)}: a recurrent state or varlen "
            "batch inside a parallelized forward (a KV cache or generation) is not supported; sequence "
            "parallelism is for training forwards (use_cache=False; packed documents via position_ids)"
        )


# -- the rules -------------------------------------------------------------------------------------


def _context():
    """The running parallelized forward's (mode, sp group, rank) or None."""
    mode = running_mode()
    if mode is None:
        return None
    group = mode.sp_group
    return mode, group, dist.get_rank(group)


def causal_conv1d_rule(original: Callable) -> Callable:
    """``causal_conv1d_fn(x: (B, C, n), weight: (C, K), bias, activation)`` on this rank's tokens:
    the K - 1 previous tokens from the previous rank(s), then the convolution of the shard."""

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        ctx = _context()
        if ctx is None:
            return original(hidden_states, weight, bias, activation=activation, **kwargs)
        mode, group, rank = ctx
        _refuse_state("short causal convolution", seq_idx=kwargs.get("seq_idx"), cu_seqlens=kwargs.get("cu_seqlens"))
        if activation not in _ACTIVATIONS:
            raise ValueError(f"parallelize_module: causal_conv1d_fn activation {activation!r} is not one of silu / None")
        kernel = weight.shape[-1]
        sizes = seq_shard_sizes(mode.seq_len, dist.get_world_size(group))
        with mode.propagation.allowed():
            halo = previous_tokens(hidden_states, kernel - 1, sizes, rank, group)
        x = F.pad(torch.cat([halo, hidden_states], dim=-1).to(weight.dtype), (kernel - 1 - halo.shape[-1], 0))
        n = hidden_states.shape[-1]
        documents = mode.documents
        if documents is None or documents.is_single_document():
            out = F.conv1d(x, weight.unsqueeze(1), bias, groups=x.shape[1])
        else:
            # tap k of output t reads global token p - (K-1-k), p = offset + t: only within p's document
            offset = seq_shard_offsets(sizes)[rank]
            ids = documents.ids.to(x.device)
            positions = torch.arange(offset, offset + n, device=x.device)
            out = 0
            for k in range(kernel):
                source = positions - (kernel - 1 - k)
                same = (source >= 0) & (ids[:, source.clamp_min(0)] == ids[:, positions])
                out = out + weight[:, k, None] * x[..., k : k + n] * same[:, None, :].to(x.dtype)
            if bias is not None:
                out = out + bias[:, None]
        return _ACTIVATIONS[activation](out).to(hidden_states.dtype)

    return causal_conv1d_fn


def gated_delta_rule(original: Callable) -> Callable:
    """``chunk_gated_delta_rule(q, k: (B, n, Hk, Dk), v: (B, n, Hv, Dv), g, beta: (B, n, Hv))`` on
    this rank's tokens: to the channel layout, the model's kernel over all N tokens (per document),
    back. Returns ``(out: (B, n, Hv, Dv), None)``."""

    def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size=64, initial_state=None,
                               output_final_state=False, use_qk_l2norm_in_kernel=False, **kwargs):
        ctx = _context()
        if ctx is None:
            return original(query, key, value, g, beta, chunk_size=chunk_size, initial_state=initial_state,
                            output_final_state=output_final_state,
                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        mode, group, rank = ctx
        _refuse_state("Gated DeltaNet", initial_state=initial_state, output_final_state=output_final_state,
                      cu_seqlens=kwargs.pop("cu_seqlens", None))
        ex = ChannelExchange.build(group, rank, mode.seq_len, value.shape[2], value.shape[3], key.shape[2])
        with mode.propagation.allowed():
            (q, k), (v,), (g, beta) = ex.to_channels([query, key], [value], [g, beta])
            q, k = ex.expand_groups(q), ex.expand_groups(k)

            def kernel(q, k, v, g, beta):
                return original(q, k, v, g, beta, chunk_size=chunk_size,
                                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)[0]

            return ex.to_sequence(_per_document(kernel, mode.documents, q, k, v, g, beta)), None

    return chunk_gated_delta_rule


def mamba2_scan_rule(original: Callable) -> Callable:
    """``mamba2_chunk_scan(x: (B, n, H, P), dt: (B, n, H), A: (H,), B, C: (B, n, G, S), ...)`` on
    this rank's tokens: to the channel layout, the model's scan over all N tokens (per document),
    back. Returns ``(B, n, H, P)``."""

    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
        ctx = _context()
        if ctx is None:
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, **kwargs)
        mode, group, rank = ctx
        _refuse_state("Mamba2", initial_states=initial_states, return_final_states=return_final_states,
                      seq_idx=kwargs.pop("seq_idx", None), cu_seqlens=kwargs.pop("cu_seqlens", None))
        ex = ChannelExchange.build(group, rank, mode.seq_len, hidden_states.shape[2], hidden_states.shape[3], B.shape[2])
        A, D, dt_bias = ex.head_slice(A), ex.head_slice(D), ex.head_slice(dt_bias)
        with mode.propagation.allowed():
            (B, C), (x,), (dt,) = ex.to_channels([B, C], [hidden_states], [dt])
            B, C = ex.expand_groups(B), ex.expand_groups(C)

            def kernel(x, dt, B, C):
                return original(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                dt_limit=dt_limit, **kwargs)

            return ex.to_sequence(_per_document(kernel, mode.documents, x, dt, B, C))

    return mamba2_chunk_scan


def unfused_mamba2(original: Callable) -> Callable:
    """``mamba2_split_conv1d_scan_combined`` (mamba_ssm's fused CUDA path, which returns None
    without it) returning None in a parallelized forward, so the unfused path with the rebound
    convolution and scan runs."""

    def mamba2_split_conv1d_scan_combined(*args, **kwargs):
        return None if running_mode() is not None else original(*args, **kwargs)

    return mamba2_split_conv1d_scan_combined


# rebound in a parallelized forward (``namespaces.rebound``): name -> make(original)
REBOUND_RULES = {
    "causal_conv1d_fn": causal_conv1d_rule,
    "torch_chunk_gated_delta_rule": gated_delta_rule,
    "mamba2_chunk_scan": mamba2_scan_rule,
    "mamba2_split_conv1d_scan_combined": unfused_mamba2,
}


# -- the modules -----------------------------------------------------------------------------------


def mixer_kinds(module: nn.Module) -> list[str]:
    """The mixer kinds whose function ``module``'s own forward calls (read from its source)."""
    return list(_forward_mixer_kinds(type(module).forward))


@functools.lru_cache(maxsize=None)
def _forward_mixer_kinds(forward: Callable) -> tuple[str, ...]:
    # once per forward function: a model has many instances of few module classes
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return ()
    return tuple(kind for name, kind in MIXER_FUNCTIONS.items() if re.search(rf"\b{name}\(", source))


def find_mixers(model: nn.Module) -> dict[nn.Module, list[str]]:
    """The model's sequence mixers we make exact, with their kinds; raises ValueError naming a
    sequence mixer (or a convolution) we do not know, before any collective."""
    mixers = {m: kinds for m in model.modules() if (kinds := mixer_kinds(m))}
    known = {id(sub) for m in mixers for sub in m.modules()}  # the mixers and what they contain
    unknown = [
        (name, module) for name, module in model.named_modules()
        if id(module) not in known and not any(sub in mixers for sub in module.modules())  # not an ancestor
        and (isinstance(module, nn.Conv1d) or _OTHER_MIXER.search(type(module).__name__))
    ]
    if unknown:
        # a named recurrent layer says more than the convolution beside it; then the innermost
        name, module = max(unknown, key=lambda item: (not isinstance(item[1], nn.Conv1d), item[0].count(".")))
        what = "a convolution over the sequence" if isinstance(module, nn.Conv1d) else "a recurrent / linear-attention layer"
        raise ValueError(
            f"parallelize_module: {type(model).__name__} has a sequence mixer we cannot make exact: "
            f"{type(module).__name__} {name!r} ({what} that calls none of {', '.join(MIXER_FUNCTIONS)}). "
            "Refused rather than run it on this rank's tokens only (docs/mixers.md lists the supported kinds)"
        )
    return mixers


def run_mixer_on_local_tokens(module: nn.Module, kinds: list[str]) -> None:
    """Make ``module.forward`` run on this rank's tokens inside a parallelized forward:
    ``Shard(1)`` (B, N, C) hidden states become the local (B, n, C), a (B, N) padding mask its
    local columns, and the output re-enters as ``Shard(1)``. The rebound kernels inside do the
    exchanges. Outside a parallelized forward the module runs unchanged."""
    original = module.forward
    label = f"{type(module).__name__} ({', '.join(kinds)})"

    def forward_on_local_tokens(hidden_states, *args, **kwargs):
        mode = running_mode()
        if mode is None or not isinstance(hidden_states, DTensor):
            if mode is not None and not torch.compiler.is_compiling():
                mode.mixer_calls += 1
            return original(hidden_states, *args, **kwargs)
        if hidden_states.placements != (Shard(1),) or hidden_states.dim() != 3:
            raise ValueError(
                f"{label} got hidden states placed {hidden_states.placements} with shape "
                f"{tuple(hidden_states.shape)}; a sequence mixer needs (B, N, C) sharded on the sequence"
            )
        if not torch.compiler.is_compiling():
            mode.mixer_calls += 1
        local = hidden_states.to_local()
        world = hidden_states.device_mesh.size()
        sizes = seq_shard_sizes(mode.seq_len, world)
        offset = seq_shard_offsets(sizes)[hidden_states.device_mesh.get_local_rank()]

        def localize(value):
            if isinstance(value, DTensor):
                value = value.to_local() if value.placements == (Shard(1),) else value.full_tensor()
            if isinstance(value, Tensor) and value.dim() == 2 and value.shape == (local.shape[0], mode.seq_len):
                return value[:, offset : offset + local.shape[1]]  # a (B, N) padding mask
            return value

        out = original(local, *[localize(a) for a in args], **{k: localize(v) for k, v in kwargs.items()})

        def back(t):
            if isinstance(t, Tensor) and t.shape[:2] == local.shape[:2]:
                return from_local(t, hidden_states, torch.Size((*hidden_states.shape[:2], *t.shape[2:])))
            return t

        return tuple(back(t) for t in out) if isinstance(out, tuple) else back(out)

    module.forward = forward_on_local_tokens


def use_ulysses_mixers(mixers: dict[nn.Module, list[str]]) -> dict[str, int]:
    """Run the sequence mixers :func:`find_mixers` found on local tokens (their kernels rebound
    per forward: :data:`REBOUND_RULES`); returns how many modules of each kind there are."""
    counts: dict[str, int] = {}
    for module, kinds in mixers.items():
        run_mixer_on_local_tokens(module, kinds)
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return counts
