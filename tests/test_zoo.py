"""Models we did not write for sequence parallelism, run through ``parallelize_module`` on the
propagation path (``Shard(seq)`` DTensor activations) vs one process, float64, forward and
backward, sp = 2 and 4 with N not divisible by sp. Each must be exact or refused clearly before
any collective; the forward's collectives are the attention exchanges and the loss reduction."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import VOCAB, LargestTensor, causal_lm_loss, rel_err, summed_grad_error
from hf_builders import build_hf
from zoo_models import NanoGPT
from ulysses_dtensor.hf import standard_lm_head
from ulysses_dtensor.tools.rank_group import RankFailure

TOL = 1e-10


def _counted_step(model, call):
    """Run ``call`` twice (the first forward also runs the one-time input checks) and return
    the second forward's output, loss and collective counts forward / backward."""
    from ulysses_dtensor.comm_counter import CollectiveCounter

    call(model)
    for p in model.parameters():
        p.grad = None
    with CollectiveCounter() as forward:
        out, loss = call(model)
    with CollectiveCounter() as backward:
        loss.backward()
    return out, loss, forward.counts(), backward.counts()


def _expect_exchanges_only(forward, backward, layers: int, aux_losses: int = 0) -> None:
    # the exchanges, the loss (token count, value) and one all-reduce per router aux loss
    assert forward == {"all_to_all": 2 * layers, "all_reduce": 2 + aux_losses}, forward
    assert backward == {"all_to_all": 2 * layers}, backward


def _rank_nanogpt(ctx, attention: str, N: int, seed: int):
    import ulysses_dtensor as U
    from ulysses_dtensor.inputs import local_slice

    torch.manual_seed(seed)
    ref = NanoGPT(vocab=VOCAB, attention=attention).double()
    model = U.parallelize_module(copy.deepcopy(ref), ctx.mesh(), U.UlyssesConfig(fsdp=False))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (2, N), generator=gen)
    targets = torch.randint(0, VOCAB, (2, N), generator=gen)
    targets[0, : N // 3] = -1  # nanoGPT's ignore_index; unevenly spread over the shards
    ref_logits, ref_loss = ref(idx, targets)
    ref_loss.backward()
    logits, loss, forward, backward = _counted_step(model, lambda m: m(idx, targets))
    _expect_exchanges_only(forward, backward, len(ref.h))
    return {
        "loss": rel_err(loss, ref_loss),
        "logits": rel_err(logits, local_slice(ref_logits, ctx.rank, ctx.world, N)),
        "grads": summed_grad_error(model, ref, ctx.group),
    }


@settings(max_examples=8)
@given(
    attention=st.sampled_from(["causal", "tril", "rope"]),
    sp=st.sampled_from([2, 3, 4]),
    N=st.integers(5, 40),
    seed=st.integers(0, 2**16),
)
def test_nanogpt_family_is_exact(ranks4, attention, sp, N, seed):
    """nanoGPT's ``wpe(arange(t))``, an explicit ``ones(T, T).tril()`` mask, RoPE from
    ``x.shape``: each was silently wrong (rel. error 0.5 / refused / 0.02) on local tensors."""
    if N <= sp:
        N = sp + 1 + N % 3
    for rank, errors in enumerate(ranks4.run(_rank_nanogpt, attention, N, seed, world=sp)):
        for name, err in errors.items():
            assert err <= TOL, f"{attention} sp={sp} N={N} rank {rank}: {name} relative error {err:.3g}"


# Gemma3's RMSNorm computes in float32 (in one process too), so its norm-weight gradients agree
# to float32 rounding only; every other family agrees to float64's.
GRAD_TOL = {"gemma3": 1e-6}


def _rank_hf(ctx, family: str, N: int, padded: bool, fsdp: bool = False, probes=None, loss_chunk_tokens=None,
             overrides=None):
    import ulysses_dtensor as U
    from ulysses_dtensor.inputs import local_slice

    ref = build_hf(family, **(overrides or {}))
    config = U.UlyssesConfig(fsdp=fsdp, loss_chunk_tokens=loss_chunk_tokens)
    model = U.parallelize_module(copy.deepcopy(ref), ctx.mesh(), config)
    gen = torch.Generator().manual_seed(N)
    ids = torch.randint(0, VOCAB, (2, N), generator=gen)
    labels = ids.clone()
    labels[0, : N // 3] = -100
    kwargs = {}
    if padded:  # left padding of row 1, as a tokenizer pads a batch
        mask = torch.ones(2, N, dtype=torch.long)
        mask[1, :5] = 0
        labels[1, :5] = -100
        kwargs["attention_mask"] = mask
    # HF's standard causal LMs get the chunked loss (float64 here; transformers' own loss is
    # float32): their reference is our float64 cross-entropy of the one-process logits
    chunked = standard_lm_head(ref) is not None
    ref_probe, probe = probes or (contextlib.nullcontext(), contextlib.nullcontext())
    with ref_probe:
        ref_out = ref(input_ids=ids, labels=None if chunked else labels, **kwargs)
        ref_loss = causal_lm_loss(ref_out.logits, labels) if chunked else ref_out.loss
        ref_loss.backward()

    def call(m):
        out = m(input_ids=ids, labels=labels, **kwargs)
        return out, out.loss

    with probe:
        out, loss, forward, backward = _counted_step(model, call)
    # transformers computes its causal-LM loss in float32: its rounding, not ours
    loss_error = rel_err(loss, ref_loss) / (1 if chunked else 1e4)
    if fsdp:  # parameters sharded over the sp ranks: FSDP2's all-gathers and reduce-scatters too
        return {
            "loss": loss_error,
            "grads": max(
                rel_err(p.grad.full_tensor(), q.grad, floor=1e-6)
                for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None
            ),
        }
    _expect_exchanges_only(forward, backward, 2, aux_losses=int(getattr(ref_out, "aux_loss", None) is not None))
    if chunked:
        assert out.logits is None
        with torch.no_grad():
            out = model(input_ids=ids, **kwargs)
    errors = {
        "loss": loss_error,
        "logits": rel_err(out.logits, local_slice(ref_out.logits, ctx.rank, ctx.world, N)),
        # floor: key-bias gradients are zero in exact arithmetic (rounding noise in one process)
        "grads": summed_grad_error(model, ref, ctx.group, floor=1e-6) * TOL / GRAD_TOL.get(family, TOL),
    }
    if getattr(ref_out, "aux_loss", None) is not None:
        # the router's load-balancing loss over all tokens (float32 in transformers)
        errors["aux_loss"] = rel_err(out.aux_loss, ref_out.aux_loss) / 1e4
    return errors


HF_EXACT = ["llama", "llama-dynamic-rope", "mistral-window", "qwen2-window", "gemma3", "phi3", "phi3-longrope", "gpt-neox", "gpt2",
            "olmo2", "falcon", "qwen3-moe", "mixtral", "bart", "marian", "pegasus", "blenderbot", "plbart", "mbart",
            "bert-decoder"]


@pytest.mark.parametrize("family", HF_EXACT)
@pytest.mark.parametrize("sp,N", [(2, 19), (4, 30)])
def test_hf_family_is_exact(ranks4, family, sp, N):
    for rank, errors in enumerate(ranks4.run(_rank_hf, family, N, False, world=sp)):
        for name, err in errors.items():
            assert err <= TOL, f"{family} sp={sp} N={N} rank {rank}: {name} (scaled) error {err:.3g}"


@pytest.mark.parametrize("family", ["bert-decoder", "mbart", "llama"])
def test_hf_family_with_fsdp_is_exact(ranks4, family):
    """FSDP2 units from HF's ``_no_split_modules``: nested ones (mBART: "Cannot concatenate
    overlapping meshes") and ones tied to the LM head (BERT: "Parameter ... is shared") are left
    to the root unit."""
    for rank, errors in enumerate(ranks4.run(_rank_hf, family, 30, False, True, world=4)):
        for name, err in errors.items():
            assert err <= TOL, f"{family} FSDP sp=4 rank {rank}: {name} (scaled) error {err:.3g}"


def test_roberta_position_cumsum_is_refused(ranks4):
    """RoBERTa derives positions with a cumsum over the tokens: refused at the op, by name."""
    with pytest.raises(RankFailure, match=r"RobertaEmbeddings.*cumsum"):
        ranks4.run(_rank_hf, "roberta-decoder", 19, False, world=2)


@pytest.mark.parametrize("sp,N", [(2, 19), (4, 30)])
def test_hf_padding_mask_is_exact(ranks4, sp, N):
    """A padded batch's attention_mask (was refused): HF builds the global mask from it."""
    for rank, errors in enumerate(ranks4.run(_rank_hf, "llama", N, True, world=sp)):
        for name, err in errors.items():
            assert err <= TOL, f"padded llama sp={sp} N={N} rank {rank}: {name} (scaled) error {err:.3g}"


def _is_bool(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool


def _rank_hf_mask_sizes(ctx, family: str, N: int, padded: bool):
    """``_rank_hf`` with the largest bool tensor of the one-process and the parallel step."""
    from ulysses_dtensor import masks

    masks.DEFAULT_TILE = 4  # tiles smaller than N, so a dense mask would stand out
    probes = (LargestTensor(_is_bool), LargestTensor(_is_bool))
    errors = _rank_hf(ctx, family, N, padded, probes=probes)
    return errors, probes[0].numel, probes[1].numel


@pytest.mark.parametrize("family,padded", [("mistral-window", False), ("mistral-window", True), ("gemma3", False),
                                           ("qwen2-window", False), ("llama", True)])
def test_hf_window_and_padding_masks_stay_structure(ranks4, family, padded):
    """HF builds sliding-window and padding masks as (B, 1, N, N) tensors; on the propagation
    path they reach the kernel as a CausalMask (masks.py) and no rank holds an (N, N) mask."""
    N = 30
    for rank, (errors, ref_numel, numel) in enumerate(ranks4.run(_rank_hf_mask_sizes, family, N, padded, world=2)):
        for name, err in errors.items():
            assert err <= TOL, f"{family} padded={padded} rank {rank}: {name} (scaled) error {err:.3g}"
        assert ref_numel >= N * N, ref_numel  # one process materializes it: the probe sees masks
        assert numel < N * N, f"{family} padded={padded} rank {rank}: a bool tensor of {numel} >= N² elements"


def _rank_hf_logits_sizes(ctx, family: str, N: int):
    """``_rank_hf`` with the largest (..., V) tensor of the one-process and the parallel step
    (not counting the (C, V) gradient of the output layer's weight); MLP widths other than V."""
    overrides = {"intermediate_size": 80, "n_inner": 80}
    hidden = build_hf(family, **overrides).config.hidden_size

    def is_logits(t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.shape[-1:] == (VOCAB,) and tuple(t.shape) != (hidden, VOCAB)

    probes = (LargestTensor(is_logits), LargestTensor(is_logits))
    errors = _rank_hf(ctx, family, N, False, probes=probes, loss_chunk_tokens=4, overrides=overrides)
    return errors, probes[0].numel, (probes[1].numel, probes[1].op)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2-window"])
def test_hf_chunked_loss_holds_one_tile_of_logits(ranks4, family):
    """HF causal LMs with transformers' standard forward get the chunked loss (loss.py): exact
    (float64 vs our float64 cross-entropy of one process), logits never held beyond a tile."""
    N = 30
    for rank, (errors, ref_numel, (numel, op)) in enumerate(ranks4.run(_rank_hf_logits_sizes, family, N, world=2)):
        for name, err in errors.items():
            assert err <= TOL, f"{family} rank {rank}: {name} (scaled) error {err:.3g}"
        assert ref_numel >= 2 * N * VOCAB, ref_numel  # one process holds (B, N, V) logits
        assert numel <= 4 * VOCAB, f"{family} rank {rank}: {op}: {numel} elements > one 4-token tile"


def test_chunked_loss_true_is_refused_for_other_models(ranks4):
    message = ranks4.run(_rank_chunked_loss_refused, world=2)[0]
    assert "chunked_loss=True" in message and "standard template" in message, message


def _rank_chunked_loss_refused(ctx):
    import ulysses_dtensor as U

    try:
        U.parallelize_module(build_hf("gemma3"), ctx.mesh(), U.UlyssesConfig(fsdp=False, chunked_loss=True))
    except ValueError as e:
        return str(e)
    return None


def _rank_refused(ctx, family: str, N: int):
    import ulysses_dtensor as U
    from ulysses_dtensor.comm_counter import CollectiveCounter

    with CollectiveCounter() as counter:
        try:
            model = U.parallelize_module(build_hf(family), ctx.mesh(), U.UlyssesConfig(fsdp=False))
            ids = torch.randint(0, VOCAB, (1, N))
            model(input_ids=ids, labels=ids)
        except ValueError as e:
            return str(e), counter.counts().get("all_to_all", 0)
    return None, counter.counts().get("all_to_all", 0)


def test_one_token_per_rank_is_refused(ranks4):
    """N = sp (HF's is_causal = query.shape[2] > 1 made it silently wrong on local tensors)."""
    for message, exchanges in ranks4.run(_rank_refused, "llama", 2, world=2):
        assert message is not None and "one token per rank" in message, message
        assert exchanges == 0


class _SequenceCumsum(torch.nn.Module):
    """A model with an op DTensor can only run on the gathered sequence (a cumulative sum)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.mix = torch.nn.Linear(16, 16)

    def forward(self, idx):
        x = self.embed(idx)
        q = x.view(*x.shape[:2], 2, 8).transpose(1, 2)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(x.shape)
        return self.mix(x.cumsum(dim=1))


def _rank_gathering_model(ctx):
    import ulysses_dtensor as U

    torch.manual_seed(0)
    model = U.parallelize_module(_SequenceCumsum().double(), ctx.mesh(), U.UlyssesConfig(fsdp=False))
    model(torch.randint(0, VOCAB, (2, 19)))


def test_an_op_that_would_gather_the_sequence_is_refused(ranks4):
    """Never an unnoticed all-gather of activations: the op and the module are named."""
    with pytest.raises(RankFailure, match=r"_SequenceCumsum.*cumsum.*all_gather") as failure:
        ranks4.run(_rank_gathering_model, world=2)
    assert "on a sequence-sharded activation" in str(failure.value)


def _rank_compiled_nanogpt(ctx):
    import ulysses_dtensor as U

    torch.manual_seed(0)
    model = U.parallelize_module(NanoGPT(vocab=VOCAB).double(), ctx.mesh(), U.UlyssesConfig(fsdp=False))
    idx = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    eager = model(idx)[0]
    try:
        torch.compile(model, backend="eager", fullgraph=True)(idx)
        message = None
    except Exception as e:  # noqa: BLE001 (Dynamo wraps our ValueError in its Unsupported)
        message = str(e)
    # without fullgraph Dynamo runs the refused frame eagerly: the propagation path, exact
    return message, rel_err(torch.compile(model, backend="eager")(idx)[0], eager)


def test_compile_of_a_model_without_positions_is_refused(ranks4):
    """torch.compile runs the local path (the propagated forward does not compile yet), where
    nanoGPT's arange(t) would be local: refused, not silently wrong."""
    for message, err in ranks4.run(_rank_compiled_nanogpt, world=2):
        assert message is not None and "runs the local-tensor path" in message, message
        assert err == 0.0, err
