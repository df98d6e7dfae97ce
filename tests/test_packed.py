"""Packed documents across sp shards vs one process attending to each document separately.

The reference is always *per-document* SDPA (or the per-document model run) computed on its
own and concatenated — never a masked version of the same computation — so a mask that lets a
token see another document, or hides part of its own, shows up as an error. World ≤ 4 here (the
``ranks4`` group): sp ∈ {2, 3, 4}; sp = 8 needs 8 ranks.
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import (
    TOL, attention_inputs, document_spans, gathered_grad_error, ids_from_lengths, make_mask, per_document_attention,
    rank_attention, rel_err, seq_slice,
)
from ulysses_dtensor import ulysses_attention
from ulysses_dtensor.comm_counter import CollectiveCounter
from ulysses_dtensor.documents import Documents
from ulysses_dtensor.layout import UlyssesLayout
from ulysses_dtensor.kernels import flash_attn_available
from ulysses_dtensor.layout import seq_shard_offsets, seq_shard_sizes

# -- helpers ---------------------------------------------------------------------------------------


def crossing_shards(lengths: list[int], N: int, P: int) -> int:
    """How many documents span two or more sp shards."""
    edges = seq_shard_offsets(seq_shard_sizes(N, P))[1:]
    return sum(any(s < e_ < e for e_ in edges) for s, e in document_spans(lengths))


# -- ulysses_attention with documents --------------------------------------------------------------


def _rank_documents(ctx, q, k, v, grad_out, documents, kwargs, chunk_tokens, as_object):
    """On each rank: its shard, forward and backward with documents; the collectives counted."""
    docs = Documents(documents, chunk_tokens=chunk_tokens) if as_object else documents
    return rank_attention(ctx, q, k, v, grad_out, dict(kwargs, documents=docs))


@st.composite
def document_lengths(draw, N: int) -> list[int]:
    """Random lengths summing to N: often single-token documents, sometimes one long document."""
    lengths, left = [], N
    while left:
        n = draw(st.one_of(st.just(1), st.integers(1, max(1, N // 2)), st.integers(1, N)))
        n = min(n, left)
        lengths.append(n)
        left -= n
    return lengths


@st.composite
def packed_cases(draw):
    world = draw(st.integers(2, 4))
    heads = draw(st.integers(1, 4))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    N = draw(st.integers(world, 40))
    batch = draw(st.integers(1, 2))
    shared = batch == 1 or draw(st.booleans())  # one (N,) row of ids for the batch, or (B, N)
    row_lengths = [draw(document_lengths(N)) for _ in range(1 if shared else batch)]
    return dict(
        world=world, batch=batch, heads=heads, kv_heads=kv_heads, N=N, shared=shared, row_lengths=row_lengths,
        head_dim=draw(st.sampled_from([1, 4, 8])), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        mask=draw(st.sampled_from(["causal", "causal", "none", "bool", "additive"])),
        mask_shape=draw(st.sampled_from(["B1NN", "BHNN", "NN"])),
        chunk_tokens=draw(st.sampled_from([None, 1, 3, 8, 2048])), as_object=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


ERRORS: dict[str, float] = {}  # largest relative error seen per dtype (printed with -s)
COVERAGE: dict[str, int] = {}  # what the property test drew


def _count(key: str, n: int = 1) -> None:
    COVERAGE[key] = COVERAGE.get(key, 0) + n


def check_packed(ranks4, case, count=False):
    B, H, Hkv, N, D, P = case["batch"], case["heads"], case["kv_heads"], case["N"], case["head_dim"], case["world"]
    dtype = case["dtype"]
    gen, q, k, v, grad_out = attention_inputs(
        dict(batch=B, num_heads=H, num_kv_heads=Hkv, seq_len=N, head_dim=D, dtype=dtype, seed=case["seed"]))
    row_lengths = case["row_lengths"]
    ids = ids_from_lengths(row_lengths[0]) if case["shared"] else torch.stack([ids_from_lengths(r) for r in row_lengths])
    if case["shared"] and B > 1 and case["seed"] % 2:
        ids = ids.expand(B, N)  # (B, N) rows with the same boundaries: one batched call per chunk
    ids = ids * 3 + 7  # only equality of neighbours matters
    kwargs = dict(enable_gqa=Hkv != H)
    attn_mask = None
    if case["mask"] == "causal":
        kwargs["is_causal"] = True
    elif case["mask"] in ("bool", "additive"):
        attn_mask = make_mask(case["mask"], case["mask_shape"], B, H, N, dtype, gen)
        kwargs["attn_mask"] = attn_mask

    if count:
        for lengths in row_lengths:
            _count("documents crossing a shard edge", crossing_shards(lengths, N, P))
            _count("single-token documents", lengths.count(1))
        for key in (f"sp={P}", f"heads={H}", f"mask={case['mask']}", f"chunk_tokens={case['chunk_tokens']}"):
            _count(key)
        _count("gqa", Hkv != H)
        _count("per-row documents", not case["shared"])
    results = ranks4.run(
        _rank_documents, q, k, v, grad_out, ids, kwargs, case["chunk_tokens"], case["as_object"], world=P
    )

    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    full_rows = row_lengths * B if case["shared"] else row_lengths
    mask4 = None if attn_mask is None else attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    ref = per_document_attention(
        *ref_inputs, full_rows, is_causal=case["mask"] == "causal", attn_mask=mask4, enable_gqa=Hkv != H
    )
    ref.backward(grad_out)
    expected = [ref.detach()] + [t.grad for t in ref_inputs]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        # the scale floored at 1 (the inputs are unit normal): when every document is one token, dq is
        # zero in exact arithmetic and both sides hold only rounding noise (float32: ~1e-6) of either
        # sign, which is then compared absolutely
        err = rel_err(torch.cat([r[i] for r in results], dim=2), expected[i], floor=1.0)
        ERRORS[str(dtype)] = max(ERRORS.get(str(dtype), 0.0), err)
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g} for {case}"

    # documents add no communication: exactly the plain exchange, 2 + 2 all-to-alls, minimum bytes
    layout = UlyssesLayout.build(B, H, Hkv, N, D, P)
    size = torch.finfo(dtype).bits // 8
    for rank, r in enumerate(results):
        (fwd_counts, fwd_bytes), (bwd_counts, bwd_bytes) = r[4], r[5]
        assert fwd_counts == bwd_counts == {"all_to_all": 2}, (fwd_counts, bwd_counts)
        assert fwd_bytes == layout.forward_elements_sent(rank) * size
        assert bwd_bytes == layout.backward_elements_sent(rank) * size


@given(case=packed_cases())
def test_packed_documents_match_per_document_attention(ranks4, case):
    """Random documents (single-token ones, ones crossing shard edges, one per row or per batch),
    sp 2-4, heads 1-4 with GQA, causal / bidirectional / with a bool or additive mask, SDPA's
    chunked and dense paths: forward and dq, dk, dv equal per-document SDPA."""
    check_packed(ranks4, case, count=True)


def _case(P, N, lengths, **overrides):
    case = dict(
        world=P, batch=1, heads=4, kv_heads=2, N=N, shared=True, row_lengths=[lengths], head_dim=8,
        dtype=torch.float64, mask="causal", mask_shape="NN", chunk_tokens=8, as_object=True, seed=3,
    )
    case.update(overrides)
    return case


@pytest.mark.parametrize(
    "P,N,lengths",
    [
        (4, 32, [8, 8, 8, 8]),            # documents end exactly at the shard edges
        (4, 32, [3, 10, 1, 17, 1]),       # documents crossing every edge, single tokens
        (3, 31, [31]),                    # one document: the plain causal attention
        (2, 9, [1] * 9),                  # every token its own document
        (3, 20, [1, 18, 1]),              # one document across all three shards
        (4, 26, [2, 11, 6, 7]),           # N % P != 0
    ],
)
def test_packed_edges(ranks4, P, N, lengths):
    assert sum(lengths) == N
    for chunk_tokens in (None, 4, 2048):
        check_packed(ranks4, _case(P, N, lengths, chunk_tokens=chunk_tokens))
    check_packed(ranks4, _case(P, N, lengths, dtype=torch.float32, heads=3, kv_heads=1, chunk_tokens=4))


def test_property_cases_cover_the_edges():
    """The property test (run before this one) drew documents crossing shard edges, single-token
    documents, every sp, head count, mask kind and SDPA path."""
    if not COVERAGE or settings.default.max_examples < 40:
        pytest.skip("needs test_packed_documents_match_per_document_attention with >= 40 examples")
    print("property test coverage:", COVERAGE)
    wanted = ["documents crossing a shard edge", "single-token documents", "gqa", "per-row documents"]
    wanted += [f"sp={p}" for p in (2, 3, 4)] + [f"heads={h}" for h in (1, 2, 3, 4)]
    wanted += [f"mask={m}" for m in ("causal", "none", "bool", "additive")]
    wanted += [f"chunk_tokens={c}" for c in (None, 1, 3, 8, 2048)]
    assert all(COVERAGE.get(key, 0) > 0 for key in wanted), {key: COVERAGE.get(key, 0) for key in wanted}


def _rank_plain_causal(ctx, q, k, v, lengths):
    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world) for t in (q, k, v))
    return ulysses_attention(ql, kl, vl, ctx.group, is_causal=True)


def test_without_documents_the_reference_differs(ranks4):
    """Control: plain causal Ulysses attention on the same packed input is far from the
    per-document reference, so the comparisons above can fail."""
    lengths = [5, 11, 16]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 32, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    out = torch.cat(ranks4.run(_rank_plain_causal, q, k, v, lengths, world=4), dim=2)
    assert rel_err(out, per_document_attention(q, k, v, [lengths], is_causal=True)) > 0.05


# -- flex ------------------------------------------------------------------------------------------


def _rank_flex(ctx, q, k, v, ids, is_causal):
    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world) for t in (q, k, v))
    return ulysses_attention(
        ql, kl, vl, ctx.group, seq_len=q.shape[2], documents=ids, is_causal=is_causal, kernel="flex",
        enable_gqa=k.shape[1] != q.shape[1],
    )


@pytest.mark.parametrize(
    "P,N,row_lengths,heads,is_causal",
    [
        (2, 24, [[5, 1, 12, 6]], (2, 2), True),
        (3, 37, [[1, 20, 16], [30, 7]], (3, 1), True),
        (4, 150, [[130, 1, 19]], (4, 2), True),        # two flex blocks of 128: full blocks too
        (4, 30, [[9, 9, 12], [1, 1, 28]], (4, 4), False),
    ],
)
def test_flex_documents_forward(ranks4, P, N, row_lengths, heads, is_causal):
    """kernel='flex' with the document BlockMask, forward (torch has no flex backward on CPU)."""
    gen = torch.Generator().manual_seed(N)
    B = len(row_lengths)
    q = torch.randn(B, heads[0], N, 8, generator=gen)
    k, v = (torch.randn(B, heads[1], N, 8, generator=gen) for _ in range(2))
    ids = torch.stack([ids_from_lengths(r) for r in row_lengths])
    out = torch.cat(ranks4.run(_rank_flex, q, k, v, ids, is_causal, world=P), dim=2)
    ref = per_document_attention(q, k, v, row_lengths, is_causal=is_causal, enable_gqa=heads[0] != heads[1])
    err = rel_err(out, ref)
    ERRORS["flex float32"] = max(ERRORS.get("flex float32", 0.0), err)
    assert err <= TOL[torch.float32], err


@settings(max_examples=15)
@given(
    N=st.integers(1, 300), block=st.sampled_from([16, 128]), is_causal=st.booleans(),
    rows=st.integers(1, 2), seed=st.integers(0, 2**16),
)
def test_document_block_mask_equals_create_block_mask(N, block, is_causal, rows, seed):
    """The BlockMask built from per-block document ranges (no N×N tensor) has exactly the blocks,
    full blocks and dense mask that create_block_mask computes from the full mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, 2, (N,), generator=gen).cumsum(0) * (torch.rand(1, generator=gen) < 0.8)
                       for _ in range(rows)])
    docs = Documents(ids)
    ours = docs.block_mask(is_causal, block)
    ref = create_block_mask(docs.mask_mod(is_causal), rows, None, N, N, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert torch.equal(ours.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(ours.full_kv_num_blocks, ref.full_kv_num_blocks)


# -- flash-attn varlen -----------------------------------------------------------------------------


def _fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract on CPU: (total, H, D) tokens, documents by cu_seqlens."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    cu = cu_q.tolist()
    assert max_q == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    out = []
    for a, b in zip(cu[:-1], cu[1:]):
        t = [x[a:b].transpose(0, 1) for x in (q, k, v)]
        out.append(F.scaled_dot_product_attention(*t, is_causal=causal, scale=softmax_scale,
                                                  enable_gqa=k.shape[1] != q.shape[1]).transpose(0, 1))
    return torch.cat(out)


def test_flash_varlen_glue_with_a_stand_in(monkeypatch):
    """The varlen path's layout (tokens flattened over batch rows, cu_seqlens, max_seqlen, GQA)
    against a CPU stand-in with flash_attn_varlen_func's contract."""
    from ulysses_dtensor.kernels import DOCUMENT_KERNELS

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_fake_varlen))
    gen = torch.Generator().manual_seed(0)
    row_lengths = [[4, 1, 11], [16]]
    q = torch.randn(2, 4, 16, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 16, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    kernel = DOCUMENT_KERNELS["flash"][0]
    docs = Documents(torch.stack([ids_from_lengths(r) for r in row_lengths]))
    for is_causal in (True, False):
        out = kernel(q, k, v, documents=docs, attn_mask=None, is_causal=is_causal, scale=None, enable_gqa=True,
                     dropout_p=0.0)
        ref = per_document_attention(q, k, v, row_lengths, is_causal=is_causal, enable_gqa=True)
        assert rel_err(out, ref) <= 1e-12
    shared = Documents(ids_from_lengths([3, 13]))
    assert shared.cu_seqlens(2)[0].tolist() == [0, 3, 16, 19, 32] and shared.cu_seqlens(2)[1] == 13


@pytest.mark.skipif(not flash_attn_available(), reason="flash-attn is not installed (needs CUDA)")
def test_flash_varlen_kernel_matches():  # pragma: no cover - runs only where flash-attn imports
    from ulysses_dtensor.kernels import flash_varlen_kernel

    row_lengths = [[100, 1, 155]]
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    docs = Documents(ids_from_lengths(row_lengths[0]).cuda())
    out = flash_varlen_kernel(q, k, v, documents=docs, attn_mask=None, is_causal=True, scale=None,
                              enable_gqa=False, dropout_p=0.0)
    assert rel_err(out, per_document_attention(q, k, v, row_lengths, is_causal=True)) <= 2e-2


# -- a custom kernel and the Documents constructors ---------------------------------------------


def _rank_custom_kernel(ctx, q, k, v, ids):
    seen = []

    def my_kernel(q, k, v, *, attn_mask, is_causal, scale, enable_gqa, dropout_p):
        seen.append((tuple(attn_mask.shape), attn_mask.dtype, is_causal))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa)

    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world) for t in (q, k, v))
    return ulysses_attention(ql, kl, vl, ctx.group, is_causal=True, documents=ids, kernel=my_kernel), seen


def test_custom_kernel_gets_the_document_mask(ranks4):
    lengths = [7, 1, 8]
    q, k, v = (torch.randn(1, 4, 16, 4, dtype=torch.float64) for _ in range(3))
    results = ranks4.run(_rank_custom_kernel, q, k, v, ids_from_lengths(lengths), world=2)
    assert all(r[1] == [((1, 1, 16, 16), torch.bool, False)] for r in results)
    out = torch.cat([r[0] for r in results], dim=2)
    assert rel_err(out, per_document_attention(q, k, v, [lengths], is_causal=True)) <= 1e-12


def test_documents_from_positions_and_cu_seqlens():
    # transformers' rule: a document starts wherever a position is not the previous one + 1
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 7, 8], [5, 6, 7, 8, 9, 10, 11, 12]])
    assert Documents.from_position_ids(pos).ids.tolist() == [[0, 0, 0, 1, 2, 2, 3, 3], [0] * 8]
    assert Documents.from_position_ids(pos).num_documents() == [4, 1]
    docs = Documents.from_cu_seqlens(torch.tensor([0, 3, 5, 9, 10]), 5)
    assert docs.ids.tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, 3]]
    assert docs.chunks(3) == [(0, [(0, 3, True), (3, 5, True)]), (1, [(0, 4, True), (4, 5, True)])]
    assert Documents(ids_from_lengths([1, 1, 1, 5])).chunks(3) == [(None, [(0, 3, False), (3, 8, True)])]
    for bad, match in [
        (lambda: Documents.from_cu_seqlens([0, 3, 7, 10], 5), "crossing a batch row"),
        (lambda: Documents.from_cu_seqlens([0, 3, 3, 10], 5), "strictly increasing"),
        (lambda: Documents.from_cu_seqlens([0, 3, 7], 5), "not a multiple"),
        (lambda: Documents(ids_from_lengths([2, 2]), chunk_tokens=0), "chunk_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad()


# -- validation: clear errors on every rank, before any collective ------------------------------


def _rank_bad_documents(ctx, case):
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, N, D = 2, 4, 16, 4
    n = N // ctx.world
    q, k, v = (torch.randn(B, H, n, D) for _ in range(3))
    ids = ids_from_lengths([5, 11])
    calls = {
        "decreasing": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids.flip(0)),
        "local_ids": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids[:n]),
        "batch": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids.expand(3, N)),
        "float_ids": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids.float()),
        "not_ids": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=[0] * N),
        "device": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids.to("meta")),
        "flex_mask": lambda: ulysses_attention(
            q, k, v, ctx.group, documents=ids, kernel="flex",
            attn_mask=create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, N, N, device="cpu"),
        ),
        "flash": lambda: ulysses_attention(q, k, v, ctx.group, is_causal=True, documents=ids, kernel="flash"),
    }
    counter = CollectiveCounter()
    try:
        with counter:
            calls[case]()
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), counter.counts()
    return None, "", counter.counts()


@pytest.mark.parametrize(
    "case,error,pattern",
    [
        ("decreasing", "ValueError", "non-decreasing"),
        ("local_ids", "ValueError", "ids of the whole sequence"),
        ("batch", "ValueError", "rows but the batch is 2"),
        ("float_ids", "TypeError", "integer tensor"),
        ("not_ids", "TypeError", "tensor of document ids"),
        ("device", "ValueError", "document ids are on meta"),
        ("flex_mask", "ValueError", "with documents takes no attn_mask"),
        ("flash", "RuntimeError" if not flash_attn_available() else "ValueError", "flash-attn"),
    ],
)
def test_bad_documents_raise_on_every_rank_before_any_collective(ranks4, case, error, pattern):
    for name, msg, counts in ranks4.run(_rank_bad_documents, case, world=4):
        assert name == error and pattern in msg, (name, msg)
        assert not counts, f"{case}: collectives ran before the error: {counts}"


# -- parallelize_module ----------------------------------------------------------------------------

VOCAB = 64


def _llama(dtype):
    from ulysses_dtensor.tools.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).to(dtype)


def _rank_llama_packed(ctx, row_lengths, dtype):
    """ulysses_dtensor.tools.llama.Llama, parallelized, on a packed batch given by document_ids= vs the
    same model run on every document separately (logits concatenated, the same loss)."""
    import ulysses_dtensor as U

    mesh = ctx.mesh("sp")
    ref = _llama(dtype)
    model = U.parallelize_module(copy.deepcopy(ref), mesh)
    N = sum(row_lengths[0])
    gen = torch.Generator().manual_seed(N)
    B = len(row_lengths)
    tokens = torch.randint(0, VOCAB, (B, N), generator=gen)
    targets = torch.randint(0, VOCAB, (B, N), generator=gen)
    targets[torch.rand(B, N, generator=gen) < 0.2] = -100
    ids = torch.stack([ids_from_lengths(r) for r in row_lengths])

    logits, loss = model(tokens, targets, document_ids=ids)
    loss.backward()

    ref_logits = torch.cat([
        torch.cat([ref(tokens[b : b + 1, s:e]) for s, e in document_spans(lengths)], dim=1)
        for b, lengths in enumerate(row_lengths)
    ])
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref_loss.backward()
    with torch.no_grad():
        packed_logits, _ = ref(tokens, targets)  # the same model on the packed rows, documents ignored
    return dict(
        loss=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        logits=rel_err(U.gather_sequence(logits.detach(), mesh), ref_logits.detach()),
        grads=gathered_grad_error(model, ref),
        control=rel_err(packed_logits, ref_logits.detach()),
    )


@pytest.mark.parametrize(
    "sp,row_lengths,dtype",
    [
        (2, [[7, 1, 12, 3]], torch.float64),
        (4, [[10, 20], [1, 1, 28]], torch.float64),
        (3, [[5, 9, 1, 14]], torch.float32),
    ],
)
def test_llama_packed_documents_match_per_document_runs(ranks4, sp, row_lengths, dtype):
    """Loss, logits and every gradient (FSDP over sp) equal the per-document single-process runs.
    (This model takes no positions: RoPE sees global positions, and its scores depend only on
    position differences within a document, so per-document positions give the same result.)"""
    tol = TOL[dtype]
    results = ranks4.run(_rank_llama_packed, row_lengths, dtype, world=sp)
    print(f"llama packed sp={sp} {dtype}, rank 0: {results[0]}")
    for errors in results:
        for name in ("loss", "logits", "grads"):
            ERRORS[f"llama {dtype}"] = max(ERRORS.get(f"llama {dtype}", 0.0), errors[name])
            assert errors[name] <= tol, (name, errors)
        assert errors["control"] > 1e-3, errors  # the documents matter for this input


def _hf_llama(dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(dtype).train()


def _rank_hf_packed(ctx, lengths, packed_documents, propagation=None):
    """HF LlamaForCausalLM (sdpa) on a DataCollatorWithFlattening-style batch: position_ids
    restarting at 0 per document, labels -100 at each document start."""
    import ulysses_dtensor as U

    mesh = ctx.mesh("sp")
    ref = _hf_llama(torch.float64)
    config = U.UlyssesConfig(packed_documents=packed_documents, propagation=propagation)
    model = U.parallelize_module(copy.deepcopy(ref), mesh, config)
    N = sum(lengths)
    tokens = torch.randint(0, VOCAB, (1, N), generator=torch.Generator().manual_seed(N))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = tokens.clone()
    labels[0, [s for s, _ in document_spans(lengths)]] = -100

    out = model(input_ids=tokens, position_ids=position_ids, labels=labels)
    out.loss.backward()
    logits = out.logits
    if logits is None:  # the chunked loss (float64 here) holds no logits: a forward without labels
        with torch.no_grad():
            logits = model(input_ids=tokens, position_ids=position_ids).logits

    ref_logits = torch.cat([ref(input_ids=tokens[:, s:e]).logits for s, e in document_spans(lengths)], dim=1)
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    # transformers' own loss is float32; the chunked loss computes in the logits' dtype
    ref_dtype = torch.float32 if out.logits is not None else ref_logits.dtype
    ref_loss = F.cross_entropy(ref_logits.to(ref_dtype).flatten(0, 1), shifted.flatten(), ignore_index=-100)
    ref_loss.backward()
    with torch.no_grad():  # transformers' own packed-sequence masking in one process (no KV cache)
        hf_packed = ref(input_ids=tokens, position_ids=position_ids, use_cache=False).logits
    return dict(
        loss=abs(out.loss.item() - ref_loss.item()) / abs(ref_loss.item()),
        logits=rel_err(U.gather_sequence(logits.detach(), mesh), ref_logits.detach()),
        grads=gathered_grad_error(model, ref),
        hf_one_process=rel_err(hf_packed, ref_logits.detach()),
    )


def test_hf_llama_packed_position_ids_match_per_document_runs(ranks4):
    """Default config: position resets are documents for HF models, as transformers does in one
    process. The chunked loss (float64): loss, logits and gradients ≤ 1e-10."""
    results = ranks4.run(_rank_hf_packed, [6, 1, 13, 4], None, world=3)
    print(f"hf llama packed sp=3, rank 0: {results[0]}")
    for errors in results:
        assert errors["logits"] <= 1e-10 and errors["hf_one_process"] <= 1e-10, errors
        assert errors["loss"] <= 1e-10 and errors["grads"] <= 1e-10, errors


def test_hf_llama_packed_documents_false_attends_across(ranks4):
    """Control: with packed_documents=False on the local path the same batch attends across
    documents. On the propagation path HF's own mask builder sees the global position_ids and
    keeps documents apart, as it does in one process."""
    for errors in ranks4.run(_rank_hf_packed, [6, 1, 13, 4], False, False, world=2):
        assert errors["logits"] > 1e-3, errors
        assert errors["hf_one_process"] <= 1e-10, errors
    for errors in ranks4.run(_rank_hf_packed, [6, 1, 13, 4], False, world=2):
        assert max(errors["logits"], errors["grads"]) <= 1e-10, errors


def _rank_parallelize_refusals(ctx, case):
    import ulysses_dtensor as U

    counter = CollectiveCounter()
    try:
        if case == "no_source":
            model = U.parallelize_module(_llama(torch.float32), ctx.mesh("sp"), U.UlyssesConfig(packed_documents=True))
            with counter:
                model(torch.zeros(1, 8, dtype=torch.long))
        elif case == "decreasing":
            model = U.parallelize_module(_llama(torch.float32), ctx.mesh("sp"))
            with counter:
                model(torch.zeros(1, 8, dtype=torch.long), document_ids=torch.arange(8).flip(0))
        elif case == "flex_model":
            from flex_model import FlexModel

            torch.manual_seed(0)
            model = U.parallelize_module(FlexModel(), ctx.mesh("sp"), U.UlyssesConfig(fsdp=False))
            with torch.no_grad():  # torch has no flex backward on CPU
                model(torch.zeros(1, 8, dtype=torch.long), document_ids=ids_from_lengths([3, 5]))
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc), counter.counts()
    return None, "", counter.counts()


@pytest.mark.parametrize(
    "case,error,pattern",
    [
        ("no_source", "ValueError", "packed_documents=True) needs document_ids="),
        ("decreasing", "ValueError", "non-decreasing"),
        ("flex_model", "RuntimeError", "ignored the documents"),
    ],
)
def test_parallelize_packed_refusals(ranks4, case, error, pattern):
    for name, msg, counts in ranks4.run(_rank_parallelize_refusals, case, world=2):
        assert name == error and pattern in msg, (name, msg)
        assert not counts, counts


def test_zz_report_max_errors():
    """Prints the largest errors seen in this module (run with -s)."""
    print("packed documents, max relative errors:", {k: f"{v:.2g}" for k, v in ERRORS.items()})
