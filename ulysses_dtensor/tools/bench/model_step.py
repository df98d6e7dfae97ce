"""Full-model training steps (forward + backward of ``llama.Llama``) for every implementation.

* ``ours`` / ``ours_compiled``: the product path, ``parallelize_module(model, mesh,
  UlyssesConfig(fsdp=False))`` (eager, or ``torch.compile`` of the parallelized model).
* baselines (``allgather_kv``, ``dtensor``, ``deepspeed``): the same model on this rank's tokens,
  its RoPE table cut to this rank's global positions, and every ``F.scaled_dot_product_attention``
  routed to the baseline by :class:`AttentionSwap`; the loss is this rank's share of the global
  mean, so the gradients summed over ranks are the one-process gradients (as with ``fsdp=False``).
* ``single``: the unmodified model in one process on the whole sequence.

FSDP is off everywhere, so the only collectives are those of attention (plus, for ``ours``, the
two scalar all-reduces of the global loss mean, reported apart).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..llama import Llama, LlamaConfig
from .baselines import AttentionShape, build, local_tokens, theoretical_bytes, unsupported_reason
from .measure import count_collectives, fresh_compile_state, interleaved_times, peak_tensor_bytes, pin_to_core, unpin

Tensor = torch.Tensor


class AttentionSwap(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` (causal, no mask) to ``attend``, which takes and
    returns model-layout tensors (B, N_r, H, D)."""

    def __init__(self, attend: Callable[[Tensor, Tensor, Tensor], Tensor]):
        super().__init__()
        self.attend = attend

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]  # (B, H, N_r, D) transposed views of the model's (B, N_r, H, D)
            return self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        return func(*args, **kwargs)


def attention_shape(cfg: LlamaConfig, seq_len: int, batch: int = 1) -> AttentionShape:
    return AttentionShape(batch, cfg.n_heads, cfg.n_kv_heads, seq_len, cfg.head_dim, causal=True)


def make_step(name: str, ctx, cfg: LlamaConfig, tokens: Tensor, targets: Tensor) -> tuple[Callable[[], Tensor], Llama]:
    """A function running one forward + backward of implementation ``name``; returns the loss
    (this rank's share for the baselines, the global mean for ours)."""
    import ulysses_dtensor as U

    torch.manual_seed(0)  # same parameters on every rank
    model = Llama(cfg)
    if name in ("ours", "ours_compiled"):
        U.parallelize_module(model, ctx.mesh(), U.UlyssesConfig(fsdp=False))
        run = torch.compile(model, dynamic=False) if name == "ours_compiled" else model
        inputs = (tokens, targets)  # the wrapper cuts this rank's tokens itself
        swap = None
    elif name == "single":
        run, inputs, swap = model, (tokens, targets), None
    else:
        mine = local_tokens(tokens.shape[1], ctx.world, ctx.rank)
        model.freqs_cis = model.freqs_cis[mine]  # RoPE rows of this rank's global positions
        run, inputs = model, (tokens[:, mine], targets[:, mine])
        swap = build(name, attention_shape(cfg, tokens.shape[1], tokens.shape[0]), ctx.group)
    share = inputs[0].numel() / tokens.numel()

    def step() -> Tensor:
        model.zero_grad(set_to_none=True)
        if swap is None:
            _, loss = run(*inputs)
        else:
            with AttentionSwap(swap):
                _, loss = run(*inputs)
            loss = loss * share  # this rank's share of the global mean
        loss.backward()
        return loss.detach()

    return step, model


def model_case(ctx, cfg: LlamaConfig, seq_len: int, impls: list[str], *, reps: int = 5, warmup: int = 1,
               check: bool = False, memory: bool = True, threads: int = 1, pin: bool = True) -> dict:
    """Measure a training step of each of ``impls`` on this rank (a :class:`RankGroup` function).

    Rows as in :func:`measure.attention_case` (``other_bytes``: the loss all-reduces and, for
    ours, the parallelized model's input-shape checks). With ``check`` a row has
    ``loss_err`` and ``grad_err``: the loss and the rank-summed gradients against ``single``.
    """
    fresh_compile_state()
    torch.set_num_threads(threads)
    if pin and ctx.world > 1:
        pin_to_core(ctx.rank)
    gen = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen) for _ in range(2))
    shape = attention_shape(cfg, seq_len)
    skipped = {n: r for n in impls if n != "single" and (r := unsupported_reason(n, shape, ctx.world))}
    runnable = [n for n in impls if n not in skipped]
    steps = {n: make_step(n, ctx, cfg, tokens, targets) for n in runnable}
    reference = _reference_loss_and_grads(cfg, tokens, targets) if check else None
    rows: dict[str, dict] = {}
    for name in runnable:
        step, model = steps[name]
        step()  # compilation, one-time input checks
        loss, row = count_collectives(step, name)
        row = {
            **row,
            "theory_bytes": 0 if name == "single" else cfg.n_layers * theoretical_bytes(
                name, shape, ctx.world, ctx.rank, 4),
        }
        if reference is not None:
            row["loss_err"], row["grad_err"] = _compare(ctx, name, loss, model, reference)
        if memory:
            row["peak_bytes"] = peak_tensor_bytes(step)
        rows[name] = row
    times = interleaved_times({n: steps[n][0] for n in runnable}, ctx.group, reps=reps, warmup=warmup)
    for name in runnable:
        rows[name]["times_s"] = times[name]
    unpin()
    torch.set_num_threads(1)
    return {"skipped": skipped, "rows": rows}


def _reference_loss_and_grads(cfg: LlamaConfig, tokens: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = Llama(cfg)
    _, loss = model(tokens, targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _compare(ctx, name: str, loss: Tensor, model: Llama, reference) -> tuple[float, float]:
    """|loss - reference| and max |summed grad - reference grad| (sums over ranks; collectives
    here are outside every counted or timed run)."""
    ref_loss, ref_grads = reference
    loss = loss.clone()
    if name not in ("ours", "ours_compiled", "single"):
        dist.all_reduce(loss, group=ctx.group)  # the baselines return this rank's share
    grad_err = 0.0
    for n, p in model.named_parameters():
        g = p.grad.clone()
        if name != "single":
            dist.all_reduce(g, group=ctx.group)
        grad_err = max(grad_err, float((g - ref_grads[n]).abs().max()))
    return float((loss - ref_loss).abs()), grad_err


def model_peak_bytes(ctx, cfg: LlamaConfig, seq_len: int) -> int:
    """Peak live tensor bytes of one ``ours`` training step (parameters and gradients included)."""
    gen = torch.Generator().manual_seed(1)
    tokens, targets = (torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen) for _ in range(2))
    step, _ = make_step("ours", ctx, cfg, tokens, targets)
    step()  # one-time input checks outside the measurement
    return peak_tensor_bytes(step)
