"""Shared test helpers. Test modules import from here (or from the model builders next to it:
``hf_builders.py``, ``titan_builders.py``, ``zoo_models.py``, ``flex_model.py``), never from
each other. Functions run on the ranks (``RankGroup.run``) are pickled by module path, so a rank
function two test modules use lives here too."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ulysses_dtensor import ulysses_attention

from ulysses_dtensor.comm_counter import CollectiveCounter

from ulysses_dtensor.hybrid import hybrid_attention
from ulysses_dtensor.inputs import local_slice
from ulysses_dtensor.tools.train import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- tolerances and errors -------------------------------------------------------------------------

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """max |actual - expected| / max(|expected|, floor)."""
    scale = expected.abs().max().clamp_min(floor)
    return ((actual.double() - expected.double()).abs().max() / scale.double()).item()


def summed_grad_error(model: torch.nn.Module, reference: torch.nn.Module, group, floor: float = 0.0) -> float:
    """Largest relative error of ``model``'s gradients summed over ``group`` (without FSDP each
    rank holds its share) against the one-process ``reference``'s; parameter names are matched
    through checkpoint and compile wrappers. ``floor``: the smallest scale an error is relative
    to (for gradients that are zero in exact arithmetic, e.g. attention's key bias, whose
    one-process value is rounding noise); parameters without a gradient must have none in the
    reference either."""
    import torch.distributed as dist

    expected = {name: p.grad for name, p in reference.named_parameters()}
    errors = []
    for name, p in model.named_parameters():
        plain = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        if p.grad is None:
            assert expected[plain] is None, f"{plain}: no gradient, but the reference has one"
            continue
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        scale = max(expected[plain].abs().max().item(), floor, 1e-30)
        errors.append((grad.double() - expected[plain].double()).abs().max().item() / scale)
    return max(errors)


def gathered_grad_error(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """Largest ``rel_err`` of ``model``'s gradients (FSDP-sharded ones gathered with
    ``full_tensor``) against the one-process ``reference``'s, parameters matched by name."""
    expected = dict(reference.named_parameters())
    return max(
        rel_err(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad, expected[name].grad)
        for name, p in model.named_parameters()
    )


def refusal(call, *args, errors: tuple = (ValueError,), **kwargs) -> str | None:
    """The message of the error (one of ``errors``) ``call(*args, **kwargs)`` raises; None if it
    runs (so the caller's message assertions fail)."""
    try:
        call(*args, **kwargs)
    except errors as e:
        return str(e)
    return None


# -- attention: inputs, masks, shards, the rank function -------------------------------------------


def seq_slice(t: torch.Tensor, rank: int, world: int, dim: int = 2) -> torch.Tensor:
    """This rank's sequence shard of a global (B, H, N, D) tensor (DTensor Shard layout)."""
    return local_slice(t, rank, world, t.shape[dim], dim)


def make_mask(kind: str, shape_kind: str, B: int, H: int, N: int, dtype, gen: torch.Generator):
    """A global attention mask: bool (diagonal always allowed, so no row is empty) or additive."""
    shapes = {
        "NN": (N, N),
        "11NN": (1, 1, N, N),
        "B1NN": (B, 1, N, N),
        "BHNN": (B, H, N, N),
        "HNN": (H, N, N),
    }
    shape = shapes[shape_kind]
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) > 0.4
        return mask | torch.eye(N, dtype=torch.bool)
    if kind == "additive":
        return torch.randn(shape, generator=gen, dtype=dtype)
    raise ValueError(kind)


def attention_inputs(case: dict, value_dim: int | None = None):
    """(generator, q, k, v, grad_out) of a case dict (batch, num_heads, num_kv_heads, seq_len,
    head_dim, dtype, seed): global (B, H, N, D) q, (B, H_kv, N, D|Dv) k/v, (B, H, N, Dv) grad_out.
    The generator is returned so the caller can draw masks from the same stream."""
    B, H, Hkv, N, D = case["batch"], case["num_heads"], case["num_kv_heads"], case["seq_len"], case["head_dim"]
    Dv, dtype = value_dim or D, case["dtype"]
    gen = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(B, H, N, D, generator=gen, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=dtype)
    v = torch.randn(B, Hkv, N, Dv, generator=gen, dtype=dtype)
    grad_out = torch.randn(B, H, N, Dv, generator=gen, dtype=dtype)
    return gen, q, k, v, grad_out


def assert_out_and_grads_match(results, ref: torch.Tensor, ref_inputs, grad_out: torch.Tensor, dtype, context) -> None:
    """Each rank's (out, dq, dk, dv, ...) shards, concatenated along the sequence, equal the
    single-process ``ref`` computed from ``ref_inputs`` (q, k, v) and its gradients for ``grad_out``."""
    ref.backward(grad_out)
    expected = [ref.detach()] + [t.grad for t in ref_inputs]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        got = torch.cat([r[i] for r in results], dim=2)
        err = rel_err(got, expected[i])
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:g} for {context}"


def rank_attention(ctx, q, k, v, grad_out, kwargs):
    """On each rank: slice its shard, run forward and backward, count the collectives.
    ``ring_degree`` in ``kwargs`` runs the Ulysses × ring hybrid instead. Returns
    (out, dq, dk, dv, (forward counts, bytes), (backward counts, bytes)) of this rank's shard."""
    attention = hybrid_attention if "ring_degree" in kwargs else ulysses_attention
    ql, kl, vl = (seq_slice(t, ctx.rank, ctx.world).clone().requires_grad_() for t in (q, k, v))
    with CollectiveCounter() as counter:
        out = attention(ql, kl, vl, ctx.group, seq_len=q.shape[2], **kwargs)
        forward = (dict(counter.counts()), counter.bytes_sent())
        counter.reset()
        out.backward(seq_slice(grad_out, ctx.rank, ctx.world))
        backward = (dict(counter.counts()), counter.bytes_sent())
    return out.detach(), ql.grad, kl.grad, vl.grad, forward, backward


# -- packed documents ------------------------------------------------------------------------------


def ids_from_lengths(lengths: list[int]) -> torch.Tensor:
    """(N,) document ids, non-decreasing, from document lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def document_spans(lengths: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each document, from document lengths."""
    out, start = [], 0
    for n in lengths:
        out.append((start, start + n))
        start += n
    return out


def per_document_attention(q, k, v, row_lengths, *, is_causal, attn_mask=None, enable_gqa=False):
    """The reference: SDPA on each document of each row on its own, concatenated.
    ``row_lengths``: one list of document lengths per batch row. ``attn_mask``: (B|1, H|1, N, N)."""
    rows = []
    for b, lengths in enumerate(row_lengths):
        docs = []
        for s, e in document_spans(lengths):
            mask = None
            if attn_mask is not None:
                mask = attn_mask[b if attn_mask.shape[0] > 1 else 0][None, :, s:e, s:e]
            docs.append(F.scaled_dot_product_attention(
                q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e],
                attn_mask=mask, is_causal=is_causal, enable_gqa=enable_gqa,
            ))
        rows.append(torch.cat(docs, dim=2))
    return torch.cat(rows, dim=0)


# -- models on the ranks: meshes, the test models, their losses -------------------------------------

VOCAB = 96  # the vocabulary of build_model's models and hf_builders.build_hf's


def make_mesh(ctx, dp: int, sp: int):
    """A 1-D ("sp",) mesh over the rank group (dp = 1, sp = its size) or a ("dp", "sp") mesh of all
    the spawned ranks, built once per layout on each rank (group creation is collective)."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp == 1 and sp == ctx.world:
        return ctx.mesh("sp")
    key = ("dp_sp", dp, sp)
    if key not in ctx._meshes:
        ctx._meshes[key] = init_device_mesh("cpu", (dp, sp), mesh_dim_names=("dp", "sp"))
    return ctx._meshes[key]


def build_model(kind: str, dtype, **overrides):
    """A small random-init model, seed 0: "gpt" (ulysses_dtensor's Llama-style model, 4 heads, 2 kv
    heads) or "llama" / "qwen2" (Hugging Face, sdpa, 8 heads, 2 kv heads, train mode).
    ``overrides``: fields of the model's config."""
    from ulysses_dtensor.tools.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    if kind == "gpt":
        config = dict(vocab_size=VOCAB, max_seq_len=64, dim=64, n_heads=4, n_kv_heads=2)
        return Llama(LlamaConfig(**{**config, **overrides})).to(dtype)
    if kind in ("llama", "qwen2"):
        import transformers

        common = dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
        )
        common.update(overrides)
        if kind == "llama":
            cfg = transformers.LlamaConfig(**common)
            model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        else:
            cfg = transformers.Qwen2Config(**common)
            model = transformers.Qwen2ForCausalLM._from_config(cfg, attn_implementation="sdpa")
        return model.to(dtype).train()
    raise ValueError(kind)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in the logits' dtype (transformers' rule, without its float32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def loss_and_logits(kind, model, tokens, labels, mesh=None, own_loss=False, need_logits=True):
    """(loss, logits) of a ``build_model`` model. ``own_loss``: an HF model's next-token
    cross-entropy computed here in the logits' dtype (transformers computes its own in float32;
    the eager parallel path's chunked loss does not). ``need_logits``: when the chunked loss
    returned none, a second forward (without labels) for them. ``mesh``: the data-loader path
    (``shard_batch``)."""
    if kind == "gpt":
        logits, loss = model(tokens, labels)
        return loss, logits
    if own_loss:
        logits = model(input_ids=tokens).logits
        return causal_lm_loss(logits, labels), logits
    if mesh is not None:  # the data-loader path: shard_batch hands each rank DTensor shards
        from ulysses_dtensor import shard_batch

        out = model(**shard_batch({"input_ids": tokens, "labels": labels}, mesh))
        logits = out.logits
        if logits is None and need_logits:  # the chunked loss holds no logits: a forward without labels has them
            with torch.no_grad():
                logits = model(**shard_batch({"input_ids": tokens}, mesh)).logits
    else:
        out = model(input_ids=tokens, labels=labels)
        logits = out.logits
        if logits is None and need_logits:
            with torch.no_grad():
                logits = model(input_ids=tokens).logits
    return out.loss, logits


def checkpoint_blocks(model: torch.nn.Module, how: str) -> None:
    """Activation checkpointing the user's way: "torch" wraps each of ``model.layers`` in torch's
    ``checkpoint_wrapper``; "hf" calls Hugging Face's ``gradient_checkpointing_enable`` (non-reentrant)."""
    if how == "torch":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    elif how == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(how)


# -- memory probes ---------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor an op allocates inside the block among
    those ``select(t)`` accepts (e.g. bool: an (N, N) mask; last dim = vocab: logits)."""

    def __init__(self, select):
        super().__init__()
        self.select = select
        self.numel = 0
        self.op = None  # the op that produced it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        # outputs sharing an input's storage (views, in-place results) allocate nothing
        shared = {_storage_address(t) for t in inputs if isinstance(t, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and self.select(t) and t.numel() > self.numel
                    and _storage_address(t) not in shared):
                self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def _storage_address(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:  # wrapper subclasses (DTensor) have no storage of their own
        return None


# -- the train job (test_train.py, test_faults.py; the ``train_reference`` fixture in conftest.py) ---

SMALL_TRAIN = TrainConfig(
    sp=2, dp=1, seq_len=128, curriculum="64:4,128:12", tokens_per_step=256, dtype="float64",
    warmup=2, eval_batches=1, log_every=2,
)


def train_losses(summary) -> list[float]:
    """The per-step losses of a train run's summary."""
    return [r["loss"] for r in summary["history"]]


def train_cli(*args: str, out: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m ulysses_dtensor train ARGS --out-dir OUT`` in its own session (so a test can
    signal the whole job), stdout and stderr merged into one text pipe."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "ulysses_dtensor", "train", *args, "--out-dir", out],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def small_train_args(**overrides) -> list[str]:
    """``SMALL_TRAIN`` (with ``overrides``) as train CLI options."""
    cfg = replace(SMALL_TRAIN, **overrides)
    args = []
    for name in ("sp", "dp", "seq_len", "curriculum", "tokens_per_step", "dtype", "warmup", "eval_batches", "log_every"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return args
