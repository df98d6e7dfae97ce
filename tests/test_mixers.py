"""Sequence mixers of hybrid models (``mixers.py``, ``halo.py``) vs one process, on real gloo ranks.

Kernel level (hypothesis): the Gated DeltaNet, Mamba2 and short-convolution rules on this rank's
tokens against the same kernel on the global sequence, forward and backward, sp 1–8 (beyond the
head count and with key heads / B-C groups fewer than sp), uneven N, packed documents, float64
with float64 reference kernels (``naive_*`` below: the recurrences written out token by token)
and float32 with transformers' own torch kernels; bytes counted = ``elements_sent`` exactly.

Model level: Hugging Face Qwen3-Next, Qwen3.5, NemotronH, Zamba2 and Lfm2 through
``parallelize_module`` at sp = 2 and 4 with N not divisible by sp, float64, against one process;
packed documents against one process per document; unknown mixers refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TOL, VOCAB, causal_lm_loss, ids_from_lengths, rel_err
from hf_builders import build_hf
from ulysses_dtensor.layout import channel_ranges, seq_shard_sizes

# conftest.py's ranks8 with longer deadlines: transformers' hybrid models and the token-by-token
# float64 reference kernels below
RANKS8_TIMEOUTS = dict(call_timeout_s=240, collective_timeout_s=90)


# -- float64 reference kernels, same signatures as transformers' ----------------------------------


def naive_gated_delta(query, key, value, g, beta, chunk_size=64, use_qk_l2norm_in_kernel=False, **kwargs):
    """The gated delta rule token by token: S ← e^g S + β k (v − e^g Sᵀk)ᵀ, o = Sᵀ q / √Dk."""
    heads = value.shape[2]
    q = query.repeat_interleave(heads // query.shape[2], dim=2)
    k = key.repeat_interleave(heads // key.shape[2], dim=2)
    if use_qk_l2norm_in_kernel:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q = q / q.shape[-1] ** 0.5
    state = value.new_zeros(value.shape[0], heads, k.shape[-1], value.shape[-1])
    out = []
    for t in range(value.shape[1]):
        decay = g[:, t].exp()[..., None, None]
        kt, vt = k[:, t], value[:, t]
        delta = vt - (decay * state * kt[..., None]).sum(-2)
        state = decay * state + beta[:, t][..., None, None] * kt[..., None] * delta[..., None, :]
        out.append((state * q[:, t][..., None]).sum(-2))
    return torch.stack(out, dim=1), None


def naive_mamba2(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf")), **kw):
    """Mamba2's SSM token by token: h ← e^{Δ A} h + Δ x Bᵀ, y = h C + D x."""
    x = hidden_states
    heads = x.shape[2]
    B = B.repeat_interleave(heads // B.shape[2], dim=2)
    C = C.repeat_interleave(heads // C.shape[2], dim=2)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(dt_limit[0], dt_limit[1])
    state = x.new_zeros(x.shape[0], heads, x.shape[-1], B.shape[-1])
    out = []
    for t in range(x.shape[1]):
        state = (dt[:, t] * A).exp()[..., None, None] * state + (dt[:, t][..., None, None] * x[:, t][..., None]
                                                                  * B[:, t][..., None, :])
        y = (state * C[:, t][..., None, :]).sum(-1)
        out.append(y if D is None else y + D[:, None] * x[:, t])
    return torch.stack(out, dim=1)


def hf_kernels():
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan
    from transformers.models.qwen3_next.modeling_qwen3_next import causal_conv1d_fn, torch_chunk_gated_delta_rule

    return {"gdn": torch_chunk_gated_delta_rule, "mamba2": mamba2_chunk_scan, "conv": causal_conv1d_fn}


def naive_conv(hidden_states, weight, bias=None, activation=None, **kwargs):
    x = hidden_states
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(out) if activation == "silu" else out


# -- kernel level ----------------------------------------------------------------------------------


@st.composite
def mixer_cases(draw):
    world = draw(st.sampled_from([1, 2, 3, 4, 8]))
    heads = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([g for g in range(1, heads + 1) if heads % g == 0]))
    per_head_ranks = -(-world // heads)
    return dict(
        kind=draw(st.sampled_from(["gdn", "mamba2", "conv"])), world=world, batch=draw(st.integers(1, 2)),
        heads=heads, groups=groups, head_dim=draw(st.sampled_from([d for d in (2, 3, 4, 8) if d >= per_head_ranks])),
        key_dim=draw(st.sampled_from([2, 4])),
        # every rank holds a token (parallelize_module refuses lengths leaving a shard empty)
        seq_len=draw(st.integers(world + 1, 3 * world + 9).filter(lambda n: min(seq_shard_sizes(n, world)) > 0)),
        kernel=draw(st.integers(2, 4)), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        doc_cuts=draw(st.lists(st.integers(1, 40), max_size=3)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _mixer_inputs(case):
    """Global inputs (sequence-dim tensors, parameter tensors), the call, its sequence dims."""
    gen = torch.Generator().manual_seed(case["seed"])
    B, H, G, D, S, N, dtype = (case[k] for k in ("batch", "heads", "groups", "head_dim", "key_dim", "seq_len", "dtype"))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    if case["kind"] == "gdn":
        seq = dict(query=randn(B, N, G, S), key=randn(B, N, G, S), value=randn(B, N, H, D),
                   g=-F.softplus(randn(B, N, H)), beta=torch.sigmoid(randn(B, N, H)))
        return seq, {}, dict(chunk_size=4, use_qk_l2norm_in_kernel=True)
    if case["kind"] == "mamba2":
        seq = dict(hidden_states=randn(B, N, H, D), dt=randn(B, N, H), B=randn(B, N, G, S), C=randn(B, N, G, S))
        params = dict(A=-randn(H).exp(), D=randn(H), dt_bias=randn(H))
        return seq, params, dict(chunk_size=4, dt_softplus=True)
    C = H * D
    return dict(hidden_states=randn(B, C, N)), dict(weight=randn(C, case["kernel"]), bias=randn(C)), dict(activation="silu")


def _rank_mixer(ctx, case):
    from ulysses_dtensor.comm_counter import CollectiveCounter
    from ulysses_dtensor.documents import Documents
    from ulysses_dtensor.halo import halo_elements_sent
    from ulysses_dtensor.inputs import local_slice
    from ulysses_dtensor.mixers import REBOUND_RULES, ChannelExchange
    from ulysses_dtensor.rewrite import UlyssesFunctionMode

    kind, N, dtype = case["kind"], case["seq_len"], case["dtype"]
    if dtype == torch.float64:
        original = {"gdn": naive_gated_delta, "mamba2": naive_mamba2, "conv": naive_conv}[kind]
    else:
        original = hf_kernels()[kind]
    name = {"gdn": "torch_chunk_gated_delta_rule", "mamba2": "mamba2_chunk_scan", "conv": "causal_conv1d_fn"}[kind]
    rule = REBOUND_RULES[name](original)
    seq, params, options = _mixer_inputs(case)
    seq_dim = 2 if kind == "conv" else 1
    cuts = sorted({c for c in case["doc_cuts"] if c < N})
    spans = list(zip([0] + cuts, cuts + [N]))
    documents = Documents(ids_from_lengths([b - a for a, b in spans])) if cuts else None

    # reference: the kernel on the global sequence, one call per document
    ref_seq = {k: v.clone().requires_grad_() for k, v in seq.items()}
    ref_params = {k: v.clone().requires_grad_() for k, v in params.items()}

    def call(kernel, tensors, parameters):
        out = kernel(**tensors, **parameters, **options)
        return out[0] if isinstance(out, tuple) else out

    ref = torch.cat([call(original, {k: v.narrow(seq_dim, a, b - a) for k, v in ref_seq.items()}, ref_params)
                     for a, b in spans], dim=1 if kind != "conv" else 2)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=dtype)
    ref.backward(grad_out)

    local = {k: local_slice(v, ctx.rank, ctx.world, N, seq_dim).clone().requires_grad_() for k, v in seq.items()}
    mine = {k: v.clone().requires_grad_() for k, v in params.items()}
    with UlyssesFunctionMode(ctx.group, N, documents=documents):
        with CollectiveCounter() as forward:
            out = call(rule, local, mine)
        with CollectiveCounter() as backward:
            out.backward(local_slice(grad_out, ctx.rank, ctx.world, N, seq_dim))

    errors = {"out": rel_err(out, local_slice(ref, ctx.rank, ctx.world, N, seq_dim))}
    for k, v in local.items():
        errors[f"d{k}"] = rel_err(v.grad, local_slice(ref_seq[k].grad, ctx.rank, ctx.world, N, seq_dim))
    for k, v in mine.items():
        grad = v.grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        errors[f"d{k}"] = rel_err(grad, ref_params[k].grad)

    B, H, G, D, S = (case[k] for k in ("batch", "heads", "groups", "head_dim", "key_dim"))
    if kind == "conv":
        sizes = [local_slice(torch.empty(N), r, ctx.world, N, 0).numel() for r in range(ctx.world)]
        expected = halo_elements_sent(sizes, case["kernel"] - 1, ctx.rank, B * H * D)
    else:
        ex = ChannelExchange.build(ctx.group, ctx.rank, N, H, D, G)
        expected = ex.elements_sent(ctx.rank, B, [S, S], 1, 2 if kind == "gdn" else 1)
    counted = (forward.bytes_sent("all_to_all"), backward.bytes_sent("all_to_all"))
    itemsize = torch.finfo(dtype).bits // 8
    return errors, counted, tuple(e * itemsize for e in expected), forward.counts(), backward.counts()


@settings(max_examples=45)
@given(case=mixer_cases())
def test_mixer_rules_match_single_process(ranks8, case):
    for rank, (errors, counted, expected, forward, backward) in enumerate(ranks8.run(_rank_mixer, case, world=case["world"])):
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL[case["dtype"]], f"rank {rank}: {worst} rel. error {errors[worst]:.3g}: {case}"
        assert counted == expected, f"rank {rank}: bytes sent {counted} != documented minimum {expected}: {case}"
        exchanges = 1 if case["kind"] == "conv" else 2
        if case["world"] > 1:
            assert forward == {"all_to_all": exchanges} and backward == {"all_to_all": exchanges}, (forward, backward)


@settings(max_examples=200)
@given(heads=st.integers(1, 8), head_dim=st.integers(1, 8), world=st.integers(1, 16))
def test_channel_ranges_cover_each_channel_once(heads, head_dim, world):
    if -(-world // heads) > head_dim:
        with pytest.raises(ValueError, match="at least one value channel"):
            channel_ranges(heads, head_dim, world)
        return
    ranges = channel_ranges(heads, head_dim, world)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == heads * head_dim
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
    sizes = [b - a for a, b in ranges]
    if world <= heads:
        assert all(a % head_dim == 0 and b % head_dim == 0 for a, b in ranges)  # whole heads
        assert max(sizes) - min(sizes) <= head_dim
    else:
        assert min(sizes) >= 1 and all(a // head_dim == (b - 1) // head_dim for a, b in ranges)  # one head each


# -- model level -----------------------------------------------------------------------------------

# HF computes these in float32 in one process too (Gemma-style RMSNorms `x.float()`, the A_log /
# dt paths `.float()`): summed over ranks their gradients agree to float32 rounding, as Gemma3's
# norms in test_zoo. Everything else must agree to float64's.
FLOAT32_PARAMS = ("norm.weight", "norm_f.weight", "layernorm.weight", "A_log", "dt_bias")
# Zamba2's `mamba2_chunk_scan` casts its inputs `.float()` and scans in float32, in one process
# too; its per-head matmuls over fewer heads round differently, so it agrees to float32's rounding
# (measured: logits 1.1e-7, grads 9e-8, loss 2.3e-10 at sp = 4). NemotronH's Mamba2 is float64.
FLOAT32_SCAN = {"zamba2": 1e-6}
HYBRID = ["qwen3-next", "qwen3.5", "nemotron-h", "zamba2", "lfm2"]
# all-to-alls per forward (= per backward): 2 per attention layer, 3 per Gated DeltaNet / Mamba2
# layer (its convolution's halo, the exchange in, the exchange out), 1 per short convolution
EXCHANGES = {"qwen3-next": 5, "qwen3.5": 5, "nemotron-h": 5, "zamba2": 8, "lfm2": 3}


def _grad_errors(model, ref, group):
    import torch.distributed as dist

    errors = {}
    expected = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        scale = max(expected[name].grad.abs().max().item(), 1e-6)
        tol = 1e-6 if any(name.endswith(s) for s in FLOAT32_PARAMS) else TOL[torch.float64]
        errors[name] = (grad - expected[name].grad).abs().max().item() / scale * TOL[torch.float64] / tol
    return errors


def _rank_hf_hybrid(ctx, family: str, N: int, padded: bool):
    import ulysses_dtensor as U
    from ulysses_dtensor.comm_counter import CollectiveCounter
    from ulysses_dtensor.hf import standard_lm_head
    from ulysses_dtensor.inputs import local_slice

    ref = build_hf(family)
    model = U.parallelize_module(copy.deepcopy(ref), ctx.mesh(), U.UlyssesConfig(fsdp=False))
    gen = torch.Generator().manual_seed(N)
    ids = torch.randint(0, VOCAB, (2, N), generator=gen)
    labels = ids.clone()
    labels[0, : N // 3] = -100
    kwargs = {}
    if padded:  # left padding of row 1: the mixers zero padded tokens' states, in one process too
        mask = torch.ones(2, N, dtype=torch.long)
        mask[1, :4] = 0
        labels[1, :4] = -100
        kwargs["attention_mask"] = mask
    # as test_zoo: standard heads get our float64 chunked loss, the others transformers' float32 one
    chunked = standard_lm_head(ref) is not None
    ref_out = ref(input_ids=ids, labels=None if chunked else labels, **kwargs)
    ref_loss = causal_lm_loss(ref_out.logits, labels) if chunked else ref_out.loss
    ref_loss.backward()
    model(input_ids=ids, labels=labels, **kwargs)  # the first call runs the one-time checks
    for p in model.parameters():
        p.grad = None
    with CollectiveCounter() as forward:
        out = model(input_ids=ids, labels=labels, **kwargs)
    with CollectiveCounter() as backward:
        out.loss.backward()
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits
    grads = _grad_errors(model, ref, ctx.group)
    worst = max(grads, key=grads.get)
    return {
        "loss": rel_err(out.loss, ref_loss) / (1 if chunked else 1e4),
        "logits": rel_err(logits, local_slice(ref_out.logits, ctx.rank, ctx.world, N)),
        f"grad {worst}": grads[worst],
    }, forward.counts(), backward.counts()


@pytest.mark.parametrize("family", HYBRID)
@pytest.mark.parametrize("sp", [2, 4])
def test_hf_hybrid_family_is_exact(ranks8, family, sp):
    tol = FLOAT32_SCAN.get(family, TOL[torch.float64])
    for rank, (errors, forward, backward) in enumerate(ranks8.run(_rank_hf_hybrid, family, 4 * sp + 3, False, world=sp)):
        for what, err in errors.items():
            assert err <= tol, f"{family} sp={sp} rank {rank}: {what} rel. error {err:.3g}"
        assert forward == {"all_to_all": EXCHANGES[family], "all_reduce": 2}, forward
        assert backward == {"all_to_all": EXCHANGES[family]}, backward


@pytest.mark.parametrize("family", ["qwen3.5", "nemotron-h", "lfm2"])
def test_hf_hybrid_padding_mask_is_exact(ranks8, family):
    for rank, (errors, _, _) in enumerate(ranks8.run(_rank_hf_hybrid, family, 15, True, world=2)):
        for what, err in errors.items():
            assert err <= TOL[torch.float64], f"{family} rank {rank}: {what} rel. error {err:.3g}"


def _rank_hf_packed(ctx, family: str, lengths: list[list[int]]):
    """Packed rows (position_ids restarting at each document) vs one process per document."""
    import ulysses_dtensor as U
    from ulysses_dtensor.inputs import local_slice

    N = sum(lengths[0])
    ref = build_hf(family)
    model = U.parallelize_module(copy.deepcopy(ref), ctx.mesh(), U.UlyssesConfig(fsdp=False))
    gen = torch.Generator().manual_seed(N)
    ids = torch.randint(0, VOCAB, (len(lengths), N), generator=gen)
    weights = torch.randn(len(lengths), N, VOCAB, generator=gen, dtype=torch.float64)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    pieces = []
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            pieces.append((b, start, start + n))
            start += n
    ref_logits = torch.zeros(len(lengths), N, VOCAB, dtype=torch.float64)
    total = 0
    for b, a, e in pieces:
        logits = ref(input_ids=ids[b : b + 1, a:e]).logits
        total = total + (logits * weights[b : b + 1, a:e]).sum()
        ref_logits[b : b + 1, a:e] = logits.detach()
    total.backward()
    out = model(input_ids=ids, position_ids=positions).logits
    (out * local_slice(weights, ctx.rank, ctx.world, N)).sum().backward()
    grads = _grad_errors(model, ref, ctx.group)
    worst = max(grads, key=grads.get)
    return {"logits": rel_err(out, local_slice(ref_logits, ctx.rank, ctx.world, N)), f"grad {worst}": grads[worst]}


@pytest.mark.parametrize("family", ["qwen3.5", "nemotron-h", "lfm2"])
def test_hf_hybrid_packed_documents_reset_state(ranks8, family):
    """Documents crossing shard edges, different per row; a one-token document included: every
    layer (attention, convolution, recurrence) starts afresh at each document."""
    lengths = [[5, 1, 8, 3], [9, 8]]
    for rank, errors in enumerate(ranks8.run(_rank_hf_packed, family, lengths, world=4)):
        for what, err in errors.items():
            assert err <= TOL[torch.float64], f"{family} rank {rank}: {what} rel. error {err:.3g}"


def _rank_refused(ctx, family: str, propagation: bool = True):
    import ulysses_dtensor as U

    try:
        U.parallelize_module(build_hf(family), ctx.mesh(), U.UlyssesConfig(fsdp=False, propagation=propagation))
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.parametrize("family, layer", [("recurrent-gemma", "RecurrentGemmaRglru"), ("minimax", "MiniMaxLightningAttention")])
def test_unknown_mixers_are_refused_by_name(ranks8, family, layer):
    for message in ranks8.run(_rank_refused, family, world=2):
        assert message is not None and layer in message and "sequence mixer we cannot make exact" in message


def test_mixers_without_propagation_are_refused(ranks8):
    for message in ranks8.run(_rank_refused, "qwen3.5", False, world=2):
        assert message is not None and "Gated DeltaNet" in message and "propagation path only" in message
