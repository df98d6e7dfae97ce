"""``ulysses-dtensor plan``: memory and communication per GPU of a Ulysses × FSDP2 training step.

A small analytic model of *this* package's training step (``parallelize_module`` on the Llama of
``llama.py``, AdamW, one FSDP2 unit per block plus the root), per GPU of a (dp, sp) mesh with
``B`` sequences of ``N`` tokens per data-parallel replica, ``T = B·N/sp`` tokens per GPU:

* **model state**, FSDP2 over all dp × sp GPUs: dim 0 of every parameter is cut like
  ``torch.chunk``, so a GPU holds ~``params / (dp·sp)`` of the parameters, gradients and both
  Adam moments (16 bytes per parameter in both precisions, see :class:`Precision`);
* **FSDP root unit** (embedding, final norm, output) gathered in full for the whole forward and
  backward (it runs first and last);
* **activations** kept for backward: per layer the ``T`` tokens' tensors in the sequence layout
  (norms, MLP, the attention output after the exchange back) and the attention's tensors in the
  head layout (q, k, v and output of ``H/sp`` query heads and the kv heads they read, over all
  ``B·N`` tokens, plus the fp32 logsumexp) — what a flash-style kernel saves, nothing O(N²). When
  sp exceeds the query heads, the hybrid of ``hybrid.py``: ``H/U`` heads over the ``B·N/R`` tokens
  of the rank's ring block, plus the ring's blocks in flight in the backward workspace.
  Activation checkpointing keeps only the block inputs (``full``) or the block inputs and the
  attention tensors (``selective``: neither the attention kernel nor the all-to-all is re-run);
  both are ``UlyssesConfig(activation_checkpointing=...)`` (``activation_checkpoint.py``);
* **logits** of the ``T`` tokens (held by the training loop);
* **backward peak**, the larger of two moments: the loss backward (fp32 log-probabilities saved
  by the cross-entropy and the fp32 gradients of log-probs and logits) and a block backward (the
  recomputed layer, the **attention workspace** — head-layout dO, dq, dk, dv, the flash kernel's
  fp32 dq accumulator, the exchange's buffers — and the block's gradients); both with two blocks
  gathered (the current one and the prefetched one) and the output layer's gradient;
* **communication**, counted as :class:`~ulysses_dtensor.comm_counter.CollectiveCounter` counts
  it: the Ulysses all-to-alls of :class:`~ulysses_dtensor.layout.UlyssesLayout` (forward,
  backward, and the forward again when full checkpointing recomputes it), FSDP's all-gather in
  forward and again in backward (``reshard_after_forward``), its reduce-scatter, and the two
  scalar all-reduces of the global token-weighted loss.

Saved-tensor bytes, FSDP shard bytes and collective bytes are exact for our eager CPU step
(``tests/test_planner.py``); the peak is a bound (10-15 % above the tracked CPU peak). What a GPU
run adds on top (CUDA context, NCCL buffers, allocator fragmentation) is the ``reserve``.
Details and validation figures: docs/performance.md, "Planner".
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field

from ..hybrid import HybridLayout, choose_ring_degree, hybrid_elements_sent
from ..layout import UlyssesLayout
from .llama import FLAVORS, LlamaConfig, llama_config
from ..loss import default_chunk_tokens
from ..ring import SCORE_CHUNK_ELEMENTS

GIB = 2**30
AC_MODES = ("none", "selective", "full", "offload")
LOSS_MODES = ("full", "chunked")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor.

    ``bf16`` is FSDP2 with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (the
    torchtitan default): sharded parameters are the fp32 master weights, sharded gradients fp32,
    Adam's two moments fp32 — 16 bytes per parameter, the same as the classic "bf16 weights and
    gradients + fp32 master + Adam" count; FSDP gathers bf16 copies and reduce-scatters in fp32,
    activations are bf16 (RMSNorm and RoPE compute in fp32, as in ``llama.py``).
    ``float32`` is everything in fp32 (the CPU train job and tests).
    """

    name: str
    compute: int  # activations, unsharded (gathered) parameters and their gradients
    master: int  # sharded parameters
    grad: int  # sharded gradients
    optim: int  # Adam exp_avg + exp_avg_sq per parameter
    gather: int  # all-gather element (param_dtype)
    reduce: int  # reduce-scatter element (reduce_dtype)


PRECISIONS = {
    "bf16": Precision("bf16", compute=2, master=4, grad=4, optim=8, gather=2, reduce=4),
    "float32": Precision("float32", compute=4, master=4, grad=4, optim=8, gather=4, reduce=4),
}
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "float32": "float32", "fp32": "float32", "f32": "float32"}


# ---------------------------------------------------------------------------------------------
# Parsing of user inputs


def parse_model(name: str, vocab_size: int = 0) -> tuple[str, LlamaConfig]:
    """``"llama3-8b"``, ``"Llama-3.1-8B"``, ``"8b"``, ``"tiny"`` → (display name, config)."""
    flavor = re.sub(r"^(meta-)?llama-?3(\.\d)?[-_]?", "", name.strip().lower())
    if flavor not in FLAVORS:
        raise ValueError(
            f"unknown model {name!r}: choose one of {', '.join(FLAVORS)} (also as llama3-<name>, e.g. llama3-8b)"
        )
    display = f"llama3-{flavor}" if flavor[0].isdigit() else flavor
    return display, llama_config(flavor, **({"vocab_size": vocab_size} if vocab_size else {}))


def parse_length(text: str | int) -> int:
    """``"1M"`` = 2**20, ``"128K"`` = 131072 (binary, as context lengths are quoted), ``"8192"``."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text))
        if not m:
            raise ValueError(f"sequence length {text!r}: expected a number with an optional K/M/G suffix (1M = 2^20)")
        value = float(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]
        if value != int(value):
            raise ValueError(f"sequence length {text!r} is not a whole number of tokens")
        value = int(value)
    if value < 1:
        raise ValueError(f"sequence length must be >= 1, got {value}")
    return value


def parse_precision(dtype: str) -> Precision:
    key = _DTYPE_ALIASES.get(dtype.lower())
    if key is None:
        raise ValueError(f"--dtype {dtype!r}: choose bf16 or float32")
    return PRECISIONS[key]


# ---------------------------------------------------------------------------------------------
# Model state under FSDP2


def fsdp_units(cfg: LlamaConfig) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Parameter shapes of one block (one FSDP unit each) and of the root unit, as in llama.py."""
    d, hd, f = cfg.dim, cfg.head_dim, cfg.hidden_dim
    block = [
        (cfg.n_heads * hd, d), (cfg.n_kv_heads * hd, d), (cfg.n_kv_heads * hd, d), (d, cfg.n_heads * hd),  # wq wk wv wo
        (f, d), (f, d), (d, f),  # w1 w3 w2
        (d,), (d,),  # attention_norm, ffn_norm
    ]
    root = [(cfg.vocab_size, d), (d,), (cfg.vocab_size, d)]  # tok_embeddings, norm, output
    return block, root


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_numel(shapes: list[tuple[int, ...]], world: int, rank: int = 0) -> int:
    """Elements of ``rank``'s FSDP2 shard of these parameters: dim 0 cut like ``torch.chunk``
    into ``ceil(rows / W)``-row pieces (the last ranks get fewer rows, rank 0 the most; FSDP2 pads
    every rank's storage and its collectives to rank 0's size)."""
    return sum(max(0, min(-(-s[0] // world), s[0] - rank * -(-s[0] // world))) * _numel(s[1:]) for s in shapes)


# ---------------------------------------------------------------------------------------------
# Activations (bytes) of one rank


def _norm_bytes(tokens: int, d: int, a: int) -> int:
    """RMSNorm (torch's composite, fp32 math): input (or its fp32 copy), rsqrt, fp32 x·rsqrt,
    and the normalized output in the compute dtype (the next matmul's input)."""
    return tokens * (4 * d + 4 + 4 * d + a * d)


@dataclass(frozen=True)
class _RankShape:
    tokens: int  # B·N_r: tokens this rank holds in the sequence layout
    positions: int  # N_r
    head_tokens: int  # B·N: tokens of the head layout
    q_heads: int
    kv_heads: int  # kv heads received
    kv_kernel_heads: int  # kv heads the local kernel holds (= q_heads if they had to be expanded)


def _rank_shapes(cfg: LlamaConfig, seq_len: int, sp: int, batch: int, ring: int = 1) -> list[_RankShape]:
    layout = UlyssesLayout.build(batch, cfg.n_heads, cfg.n_kv_heads, seq_len, cfg.head_dim, sp)
    hybrid = HybridLayout.build(sp, ring)
    blocks = hybrid.block_tokens(layout)
    shapes = []
    for rank, n in enumerate(layout.seq_sizes):
        # hybrid: each rank's Ulysses group splits the heads over its U ranks and holds its ring
        # block of tokens (ring = 1: the whole group, every token)
        inner = hybrid.exchange_layout(layout, rank) if ring > 1 else layout
        (q0, q1), (k0, k1) = inner.q_ranges[rank], inner.kv_ranges[rank]
        # the kernel holds the received kv heads, or one expanded copy per query head when Ulysses'
        # kernel reads them unevenly (``attention._match_kv_heads``); the ring kernel never expands
        expanded = ring == 1 and layout.kv_expansion_index(rank) is not None
        shapes.append(_RankShape(batch * n, n, batch * blocks[hybrid.ring_index(rank)], q1 - q0, k1 - k0,
                                 q1 - q0 if expanded else k1 - k0))
    return shapes


def ring_workspace_bytes(cfg: LlamaConfig, r: _RankShape, ring: int, a: int) -> int:
    """Transient bytes the ring adds to one attention backward: the key/value block being used
    and the one arriving, the travelling dK/dV of both, and one chunk of score-sized fp32
    temporaries (at most ``ring.SCORE_CHUNK_ELEMENTS`` elements each; up to seven live at once:
    the scores, their scaled and masked copies, the probabilities, dP, dP − δ and dS — measured
    on CPU: about six)."""
    if ring == 1:
        return 0
    kv_block = r.head_tokens * r.kv_heads * 2 * cfg.head_dim * a  # k and v of one ring block
    return 4 * kv_block + 7 * min(SCORE_CHUNK_ELEMENTS, r.q_heads * r.head_tokens * r.head_tokens) * 4


def layer_activation_bytes(cfg: LlamaConfig, r: _RankShape, sp: int, a: int, tiled: bool = False,
                           head_chunks: int = 1) -> dict[str, int]:
    """Bytes one transformer block keeps for backward on one rank (no checkpointing), by part.

    ``tiled`` (``UlyssesConfig(tiled_tokenwise=True)``): a norm keeps its input and its output,
    the MLP nothing of its own (its input is the norm's output). ``head_chunks > 1``: the
    attention keeps the sequence-layout q, k, v instead of the head layout."""
    d, hd, t = cfg.dim, cfg.head_dim, r.tokens
    if head_chunks > 1:
        heads = {"attention_heads": 0, "attention_qkv": t * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * a}
    else:
        heads = {"attention_heads": r.head_tokens * ((2 * r.q_heads + 2 * r.kv_kernel_heads) * hd * a + r.q_heads * 4)}
    return {
        # attention_norm (its input: the block input), ffn_norm
        "norms": 2 * (2 * t * d * a if tiled else _norm_bytes(t, d, a)),
        # RoPE rotates in fp32: with a non-fp32 model the (cos, sin) table of this rank's positions
        # is upcast per call and saved, for q and for k
        "rope": 0 if a == 4 else 2 * r.positions * hd * 4,
        # head layout: q, k, v and the output of this rank's heads over all tokens, fp32 logsumexp
        # (head-chunked: the sequence-layout q, k, v instead)
        **heads,
        # sequence layout: the attention output after the exchange back (wo's input); with sp = 1
        # it is a view of the kernel's output
        "attention_seq": t * cfg.n_heads * hd * a if sp > 1 else 0,
        "mlp": 0 if tiled else t * 4 * cfg.hidden_dim * a,  # w1 and w3 outputs, silu(w1), their product
    }


def _kept_per_layer(parts: dict[str, int], ac: str, tokens: int, d: int, a: int) -> int:
    """Device bytes a block keeps from its forward to its backward."""
    if ac == "none":
        return sum(parts.values())
    if ac == "offload":
        return 0  # the block input (and, head-chunked, the attention output) in host memory
    checkpoint_input = tokens * d * a  # the checkpointed block's input
    if ac == "full":
        return checkpoint_input
    # selective: keep the attention (no recomputed all-to-all, no recomputed attention kernel),
    # recompute norms, projections and the MLP
    return checkpoint_input + parts["attention_heads"] + parts["attention_seq"]


def host_bytes_per_layer(cfg: LlamaConfig, r: _RankShape, ac: str, head_chunks: int, a: int) -> int:
    """Host-memory bytes one block keeps with ``ac="offload"``: its input, and with head chunks
    the attention outputs the recompute replays."""
    if ac != "offload":
        return 0
    return r.tokens * cfg.dim * a + (r.tokens * cfg.n_heads * cfg.head_dim * a if head_chunks > 1 else 0)


def head_chunked_workspace_bytes(cfg: LlamaConfig, r: _RankShape, chunks: int, a: int) -> int:
    """Transient bytes of one head-chunked attention backward on one rank: held throughout, the
    received k, v and (with several chunks) the sequence-layout dq being assembled; then the
    larger of one chunk's exchange (receive buffer and the tensors unpacked from it, chunk 0
    carrying k and v) and one chunk's kernel recompute and backward (``ceil(heads / chunks)``
    query heads over all tokens: q, dO, output, dq, the kernel's fp32 dq accumulator,
    logsumexp and delta; dk/dv, which the later chunks add to). With several chunks the exchanges
    are pipelined: the next chunk's q and dO and the previous chunk's dq are in flight during a
    kernel."""
    hd, n = cfg.head_dim, r.head_tokens
    h_c = -(-max(r.q_heads, 1) // chunks)
    several = -(-max(r.q_heads, 1) // h_c) > 1
    kv = n * r.kv_heads * hd * a
    held = 2 * kv + (r.tokens * cfg.n_heads * hd * a if several else 0)
    exchange = 2 * n * (2 * h_c * hd * a) + 2 * 2 * kv
    in_flight = 3 * n * h_c * hd * a if several else 0
    kernel = n * h_c * hd * a * 4 + n * h_c * (hd * 4 + 8) + 2 * kv + in_flight
    return held + max(exchange, kernel)


def tile_workspace_bytes(cfg: LlamaConfig, tile_tokens: int, a: int) -> int:
    """Transient bytes of one tiled MLP backward: one tile's recomputed intermediates and their
    gradients (~7 ffn-wide values per token), and the MLP weights' gradient sums over tiles."""
    return tile_tokens * 7 * cfg.hidden_dim * a + 2 * 3 * cfg.dim * cfg.hidden_dim * a

def attention_workspace_bytes(cfg: LlamaConfig, r: _RankShape, a: int) -> int:
    """Transient bytes of one attention backward on one rank (flash-style kernel, no N² buffer):
    dO, dq, dk, dv in the head layout, the fp32 dq accumulator and per-row delta of the kernel,
    and the packed all-to-all buffers sending dq/dk/dv back and receiving this rank's tokens."""
    hd, n = cfg.head_dim, r.head_tokens
    head_grads = n * (2 * r.q_heads + 2 * r.kv_kernel_heads) * hd * a
    kernel = n * r.q_heads * (hd * 4 + 4)
    exchange = n * (r.q_heads + 2 * r.kv_heads) * hd * a + r.tokens * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd * a
    return head_grads + kernel + exchange


# ---------------------------------------------------------------------------------------------
# The estimate of one layout


@dataclass
class Estimate:
    """Memory (bytes, the GPU with the largest peak) and communication (bytes sent per step by
    each GPU of a data-parallel replica, and their maximum) of one (dp, sp) layout."""

    model: str
    seq_len: int
    dp: int
    sp: int
    ring_degree: int  # R of the hybrid U-way Ulysses × R-way ring (1: plain Ulysses)
    batch: int  # sequences per data-parallel replica per step
    ac: str
    precision: str
    loss: str  # LOSS_MODES
    memory: dict[str, int]
    memory_detail: dict[str, int]
    comm: dict[str, int]
    sent_per_sp_rank: list[int]  # total bytes sent per step, indexed by sp rank
    all_to_all_per_sp_rank: list[int]
    saved_for_backward_per_sp_rank: list[int]  # activations + log-probs kept after the forward
    tiled: bool = False  # UlyssesConfig(tiled_tokenwise=True)
    head_chunks: int = 1
    host_bytes: int = 0  # host memory per GPU (activation offload), the largest rank's

    @property
    def peak(self) -> int:
        return self.memory["total"]

    def fits(self, budget: int) -> bool:
        return self.peak <= budget


def estimate(
    cfg: LlamaConfig, seq_len: int, dp: int, sp: int, *, ac: str = "full", precision: str | Precision = "bf16",
    batch: int = 1, model: str = "", loss: str = "full", tiled: bool = False, head_chunks: int = 1,
) -> Estimate:
    """Memory and communication per GPU of one training step on a (dp, sp) mesh.

    ``tiled``, ``head_chunks`` and ``ac="offload"`` are :class:`UlyssesConfig`'s
    ``tiled_tokenwise``, ``head_chunks`` and ``activation_checkpointing="offload"``.

    ``batch`` sequences of ``seq_len`` tokens per data-parallel replica (each split over sp GPUs).
    ``loss``: "full" (the logits of every token, as ``F.cross_entropy`` needs them) or "chunked"
    (``loss.linear_cross_entropy``: tiles of ``default_chunk_tokens(V)`` tokens, no logits held).
    """
    if loss not in LOSS_MODES:
        raise ValueError(f"loss {loss!r}: choose one of {', '.join(LOSS_MODES)}")
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing {ac!r}: choose one of {', '.join(AC_MODES)}")
    p = precision if isinstance(precision, Precision) else parse_precision(precision)
    if dp < 1 or sp < 1 or batch < 1:
        raise ValueError(f"dp, sp and batch must be >= 1, got dp={dp}, sp={sp}, batch={batch}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads}")
    if head_chunks < 1:
        raise ValueError(f"head_chunks must be >= 1, got {head_chunks}")
    world, a, d, L, V = dp * sp, p.compute, cfg.dim, cfg.n_layers, cfg.vocab_size

    # model state (sharded) and the FSDP units gathered in full
    block, root = fsdp_units(cfg)
    shard = L * shard_numel(block, world) + shard_numel(root, world)
    block_full, root_full = sum(map(_numel, block)), sum(map(_numel, root))
    out_grad = V * d * a  # the output layer's unsharded weight gradient, from the loss backward on
    blocks_gathered = 2 * block_full * a  # the block being computed and the one prefetched

    ring = choose_ring_degree(sp, cfg.n_heads)  # what parallelize_module picks
    if ring > 1 or sp == 1:
        head_chunks = 1  # parallelize_module refuses chunks with the ring; one rank has no exchange
    if head_chunks > 1 and ac == "selective":
        raise ValueError("head_chunks > 1 with selective checkpointing: parallelize_module refuses it")
    layout = UlyssesLayout.build(batch, cfg.n_heads, cfg.n_kv_heads, seq_len, cfg.head_dim, sp)
    best, ranks = None, []
    for i, r in enumerate(_rank_shapes(cfg, seq_len, sp, batch, ring)):
        parts = layer_activation_bytes(cfg, r, sp, a, tiled, head_chunks)
        kept = _kept_per_layer(parts, ac, r.tokens, d, a)
        remat = 0 if ac == "none" else sum(parts.values()) - kept + r.tokens * d * a
        if ac == "offload":
            remat = sum(parts.values())  # the restored input is the one the first norm keeps
        host = L * host_bytes_per_layer(cfg, r, ac, head_chunks, a)
        # token ids and targets (int64; with batch 1 the rank's slice is a view keeping the replica's
        # whole sequence alive; the chunked loss keeps its own copy of the targets, counted below)
        # and the final norm
        ids = 8 * (batch * seq_len if batch == 1 else r.tokens)
        final_norm = 2 * r.tokens * d * a if tiled else _norm_bytes(r.tokens, d, a)
        outer = (1 if loss == "chunked" else 2) * ids + final_norm
        activations = L * kept + outer
        if head_chunks > 1:
            workspace = head_chunked_workspace_bytes(cfg, r, head_chunks, a)
        else:
            workspace = attention_workspace_bytes(cfg, r, a) + ring_workspace_bytes(cfg, r, ring, a)
        block_work = remat + workspace
        if (tiled or head_chunks > 1) and ac != "none":
            # the recomputed block's backward in its two phases: the MLP's (the whole layer held,
            # the output's gradient, one tile) and then the attention's (the MLP half and wo's
            # input freed; the gradients of the residual and of the attention output held), after
            # the final norm's and the loss's backward freed what they kept (counted in outer)
            t_d = r.tokens * d * a
            mlp_half = parts["norms"] // 2 + parts["mlp"] + parts["attention_seq"]
            mlp_work = tile_workspace_bytes(cfg, min(d, r.tokens), a) if tiled else r.tokens * 2 * cfg.hidden_dim * a
            shared = t_d if ac == "full" and tiled else 0  # the first norm keeps the kept block input
            block_work = max(remat - shared + t_d + mlp_work, remat - shared - mlp_half + 2 * t_d + workspace)
            block_work -= final_norm
        # the two candidate peaks of a step, on top of what is held throughout
        if loss == "chunked":
            # kept: one fp32 log-sum-exp, an int64 target and a bool per token; backward: one
            # tile's logits in fp32 three times over (logits, probabilities, their gradient),
            # the hidden states' gradient and the fp32 accumulator of the output weight's
            tile = min(default_chunk_tokens(V), r.tokens)
            log_probs, held_logits = r.tokens * (4 + 8 + 1), 0
            loss_moment = 3 * tile * V * 4 + r.tokens * d * a + V * d * 4 + out_grad + blocks_gathered
        else:
            log_probs, held_logits = r.tokens * V * 4, r.tokens * V * a
            loss_moment = log_probs + r.tokens * V * 8 + out_grad + blocks_gathered  # + fp32 grads of log-probs, logits
        block_moment = out_grad + blocks_gathered + block_full * (a + p.reduce) + block_work
        memory = {
            "parameters": shard * p.master,
            "gradients": shard * p.grad,
            "optimizer": shard * p.optim,
            "fsdp_root_unsharded": root_full * a,  # gathered for the whole forward and backward
            "activations": activations,
            "logits": held_logits,  # held by the training loop
            "backward_peak": max(loss_moment, block_moment),
        }
        memory["total"] = sum(memory.values())
        detail = {
            "activations_per_layer": kept,
            "activations_per_layer_no_ac": sum(parts.values()),
            **{f"layer_{k}": v for k, v in parts.items()},
            "log_probs": log_probs,
            "loss_backward_moment": loss_moment,
            "block_backward_moment": block_moment,
            "recomputed_layer": remat,
            "attention_workspace": workspace,
            "fsdp_blocks_gathered": blocks_gathered,
            "model_state": shard * (p.master + p.grad + p.optim),
            "params_shard": shard,
            "host_offload": host,
        }
        fwd, bwd = hybrid_elements_sent(batch, cfg.n_heads, cfg.n_kv_heads, seq_len, cfg.head_dim, sp, ring, i)
        if head_chunks > 1:  # the backward receives q, k, v again
            bwd = layout.head_chunked_backward_elements_sent(i)
        a2a_fwd, a2a_bwd = L * a * fwd, L * a * bwd
        # a recomputed forward exchanges again, except offload with head chunks (outputs replayed)
        recomputes = ac == "full" or (ac == "offload" and head_chunks == 1)
        a2a_recompute = a2a_fwd if recomputes else 0
        # every rank's collectives move rank 0's (padded) shard size
        gather = 2 * shard * p.gather * (world - 1)  # forward, and backward after reshard_after_forward
        reduce = shard * p.reduce * (world - 1)
        loss_reduce = 2 * (2 * 4 * (world - 1) // world)  # global count and global mean: fp32 scalars
        comm = {
            "all_to_all_forward": a2a_fwd,
            "all_to_all_backward": a2a_bwd,
            "all_to_all_recompute": a2a_recompute,
            "fsdp_all_gather": gather,
            "fsdp_reduce_scatter": reduce,
            "loss_all_reduce": loss_reduce,
        }
        comm["total"] = sum(comm.values())
        ranks.append((memory, detail, comm, activations + log_probs, host))
        if best is None or memory["total"] > best[0]["total"]:
            best = (memory, detail)
    comm_max = {k: max(c[2][k] for c in ranks) for k in ranks[0][2]}
    return Estimate(
        model=model or f"custom({cfg.dim}x{L})", seq_len=seq_len, dp=dp, sp=sp, ring_degree=ring, batch=batch, ac=ac,
        precision=p.name, loss=loss, memory=best[0], memory_detail=best[1], comm=comm_max,
        sent_per_sp_rank=[c[2]["total"] for c in ranks],
        all_to_all_per_sp_rank=[sum(v for k, v in c[2].items() if k.startswith("all_to_all")) for c in ranks],
        saved_for_backward_per_sp_rank=[c[3] for c in ranks],
        tiled=tiled, head_chunks=head_chunks, host_bytes=max(c[4] for c in ranks),
    )


# ---------------------------------------------------------------------------------------------
# Choosing the layout


class PlanError(ValueError):
    """No layout satisfies the request; the message says what would."""


def candidate_sps(cfg: LlamaConfig, gpus: int, seq_len: int) -> list[int]:
    """sp values the mesh allows: divisors of gpus, at most the sequence length. Beyond the query
    heads sp runs the Ulysses × ring hybrid (GQA kv heads below sp are fine either way)."""
    return [s for s in range(1, gpus + 1) if gpus % s == 0 and s <= seq_len]


def longest_sequence(cfg: LlamaConfig, dp: int, sp: int, budget: int, **kw) -> int:
    """The longest global sequence (a multiple of sp) whose step fits ``budget`` bytes; 0 if none."""
    fits = lambda n: estimate(cfg, n, dp, sp, **kw).fits(budget)  # noqa: E731
    if not fits(sp):
        return 0
    lo, hi = 1, 2  # in units of sp tokens: lo fits, hi unknown
    while fits(hi * sp):
        lo, hi = hi, hi * 2
        if hi > 2**40:
            return lo * sp
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * sp) else (lo, mid)
    return lo * sp


@dataclass(frozen=True)
class MemoryStack:
    """One combination of the memory options (``UlyssesConfig`` fields of the same meaning)."""

    ac: str = "full"
    tiled: bool = False  # tiled_tokenwise
    head_chunks: int = 1

    def kwargs(self) -> dict:
        return dict(ac=self.ac, tiled=self.tiled, head_chunks=self.head_chunks)

    def chunks_at(self, heads_per_rank: int) -> int:
        """``UlyssesConfig.head_chunks`` for ranks of ``heads_per_rank`` query heads: 1 (plain
        Ulysses) or at least 2 (the head-chunked path; it runs at most ``heads_per_rank``
        chunks, so with one head per rank it saves the head layout without splitting heads)."""
        return 1 if self.head_chunks == 1 else max(2, min(self.head_chunks, heads_per_rank))

    def describe(self, heads_per_rank: int) -> str:
        parts = [f"activation checkpointing {self.ac}"]
        if self.tiled:
            parts.append("tiled MLPs and norms")
        if self.head_chunks > 1:
            per_chunk = -(-max(heads_per_rank, 1) // self.chunks_at(heads_per_rank))
            parts.append(f"head-chunked exchange ({per_chunk} query head{'s' if per_chunk > 1 else ''} at a time)")
        return ", ".join(parts)

    def config(self, loss: str, heads_per_rank: int) -> str:
        """The ``UlyssesConfig`` arguments that run this stack (defaults left out)."""
        args = [f"activation_checkpointing={self.ac!r}"] if self.ac != "none" else []
        if self.tiled:
            args.append("tiled_tokenwise=True")
        if self.head_chunks > 1:
            args.append(f"head_chunks={self.chunks_at(heads_per_rank)}")
        if loss == "full":
            args.append("chunked_loss=False")
        return f"UlyssesConfig({', '.join(args)})"


def memory_stacks(cfg: LlamaConfig, ac: str = "auto", tiled: bool | None = None, head_chunks: int = 0) -> list[MemoryStack]:
    """The stacks ``plan`` may choose, cheapest step first (recompute and transfers grow down the
    list); ``ac`` other than "auto", ``tiled`` other than None and ``head_chunks`` other than 0
    pin that option."""
    every_head = cfg.n_heads  # capped at the heads a rank holds: one query head at a time
    default = [MemoryStack("none"), MemoryStack("selective"), MemoryStack("full"), MemoryStack("full", True),
               MemoryStack("offload", True), MemoryStack("offload", True, every_head)]
    chosen = [m for m in default if (ac == "auto" or m.ac == ac) and (tiled is None or m.tiled == tiled)
              and (head_chunks == 0 or m.head_chunks == head_chunks)]
    if not chosen:
        wanted_ac = "offload" if ac == "auto" else ac
        chunks = head_chunks or 1
        if wanted_ac == "selective" and chunks > 1:
            raise ValueError("--head-chunks > 1 with --activation-checkpointing selective: parallelize_module refuses it")
        chosen = [MemoryStack(wanted_ac, bool(tiled), chunks)]
    return chosen


def choose_stack(cfg: LlamaConfig, seq_len: int, dp: int, sp: int, stacks: list[MemoryStack], cap: int,
                 *, precision: str | Precision = "bf16", batch: int = 1, loss: str = "chunked") -> tuple[MemoryStack, str]:
    """The cheapest of ``stacks`` whose estimated step fits ``cap`` bytes per device (the cheapest
    of all when ``cap`` is 0: no limit known), and why, for a log line. When none fits: the last
    (the one that saves the most)."""
    if not cap:
        return stacks[0], "no memory cap: the cheapest"
    for m in stacks:
        if estimate(cfg, seq_len, dp, sp, precision=precision, batch=batch, loss=loss, **m.kwargs()).fits(cap):
            return m, f"the cheapest that fits {cap / GIB:.1f} GiB"
    return stacks[-1], f"nothing fits {cap / GIB:.1f} GiB by the planner's estimate: the one that saves the most"


def device_memory_cap(cap_gib: float, reserve_gib: float = 2.0) -> int:
    """``cap_gib`` in bytes; 0 means the current GPU's memory less ``reserve_gib`` on CUDA, and no
    cap (0) on CPU."""
    if cap_gib:
        return int(cap_gib * GIB)
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - int(reserve_gib * GIB)
    return 0


@dataclass
class Plan:
    """The chosen layout and memory stack, its estimate, the longest sequence it fits and every
    candidate (each sp with its cheapest fitting stack)."""

    model: str
    config: LlamaConfig
    gpus: int
    gpu_mem_gib: float
    reserve_gib: float
    budget: int
    chosen: Estimate
    longest_seq_len: int  # at the chosen layout, with the stack that fits the most
    candidates: list[Estimate] = field(default_factory=list)
    candidate_longest: dict[int, int] = field(default_factory=dict)
    chosen_stack: MemoryStack = MemoryStack()
    longest_stack: dict[int, MemoryStack] = field(default_factory=dict)  # per sp

    @property
    def longest_overall(self) -> tuple[int, int]:
        """(sequence length, sp) of the longest sequence any candidate layout fits."""
        sp = max(self.candidate_longest, key=lambda k: (self.candidate_longest[k], -k))
        return self.candidate_longest[sp], sp

    def to_json(self) -> dict:
        longest, longest_sp = self.longest_overall
        return {
            "model": self.model, "config": asdict(self.config), "params": self.config.num_params(),
            "gpus": self.gpus, "gpu_mem_gib": self.gpu_mem_gib, "reserve_gib": self.reserve_gib,
            "budget_bytes": self.budget,
            "layout": {"dp": self.chosen.dp, "sp": self.chosen.sp},
            "memory_stack": asdict(self.chosen_stack),
            "ulysses_config": self.chosen_stack.config(self.chosen.loss, _heads_per_rank(self.config, self.chosen.sp)),
            "estimate": _estimate_json(self.chosen),
            "longest_seq_len": self.longest_seq_len,
            "longest_overall": {"seq_len": longest, "dp": self.gpus // longest_sp, "sp": longest_sp,
                                "memory_stack": asdict(self.longest_stack[longest_sp]),
                                "ulysses_config": self.longest_stack[longest_sp].config(
                                    self.chosen.loss, _heads_per_rank(self.config, longest_sp))},
            "candidates": [
                _estimate_json(c)
                | {"fits": c.fits(self.budget), "longest_seq_len": self.candidate_longest.get(c.sp, 0),
                   "longest_memory_stack": asdict(self.longest_stack[c.sp])}
                for c in self.candidates
            ],
        }


def _heads_per_rank(cfg: LlamaConfig, sp: int) -> int:
    """Query heads of the most loaded rank (1 for sp = 1: nothing to chunk without an exchange)."""
    return -(-cfg.n_heads // sp) if sp > 1 else 1


def _estimate_json(e: Estimate) -> dict:
    out = asdict(e)
    out["peak_bytes"] = e.peak
    return out


def plan(
    model: str, seq_len: str | int, gpus: int, gpu_mem_gib: float, *, dp: int = 0, sp: int = 0, ac: str = "auto",
    dtype: str = "bf16", batch: int = 1, reserve_gib: float = 2.0, vocab_size: int = 0, loss: str = "chunked",
    tiled: bool | None = None, head_chunks: int = 0,
) -> Plan:
    """The best (dp, sp) layout and memory stack for ``model`` at ``seq_len`` on ``gpus`` GPUs
    of ``gpu_mem_gib``: the smallest sp at which some stack fits (so the most dp), with the
    cheapest such stack (:func:`memory_stacks` order), and the longest sequence each layout
    fits with the stack that fits the most. ``dp``/``sp`` (0 = free) pin the layout; ``ac``
    ("auto" = free), ``tiled`` (None = free) and ``head_chunks`` (0 = free) pin the stack.
    Raises :class:`PlanError` naming what would fit."""
    name, cfg = parse_model(model, vocab_size)
    n = parse_length(seq_len)
    precision = parse_precision(dtype)
    if ac != "auto" and ac not in AC_MODES:
        raise ValueError(f"--activation-checkpointing {ac!r}: choose auto or one of {', '.join(AC_MODES)}")
    if head_chunks < 0:
        raise ValueError(f"--head-chunks must be >= 1 (or 0: chosen by the planner), got {head_chunks}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpu_mem_gib <= reserve_gib:
        raise ValueError(f"--gpu-mem-gib {gpu_mem_gib} leaves nothing after the {reserve_gib} GiB reserve")
    if dp < 0 or sp < 0:
        raise ValueError(f"--dp and --sp must be >= 1 (or 0: chosen by the planner), got dp={dp}, sp={sp}")
    if dp and gpus % dp:
        raise ValueError(f"--dp {dp} does not divide --gpus {gpus}")
    if sp and gpus % sp:
        raise ValueError(f"--sp {sp} does not divide --gpus {gpus}")
    if dp and sp and dp * sp != gpus:
        raise ValueError(f"--dp {dp} × --sp {sp} = {dp * sp} GPUs, but --gpus is {gpus}")
    sps = candidate_sps(cfg, gpus, n)
    if sp or dp:
        wanted = sp or gpus // dp
        if wanted > n:
            raise ValueError(f"sp={wanted} exceeds the sequence length {n}")
        sps = [wanted]
    if not sps:
        raise ValueError(f"no sp divides --gpus {gpus} within the {n} tokens")
    budget = int((gpu_mem_gib - reserve_gib) * GIB)
    if loss not in LOSS_MODES:
        raise ValueError(f"--loss {loss!r}: choose one of {', '.join(LOSS_MODES)}")
    stacks = memory_stacks(cfg, ac, tiled, head_chunks)
    kw = dict(precision=precision, batch=batch, model=name, loss=loss)
    candidates, stack_of = [], {}
    for s in sps:
        estimates = [(m, estimate(cfg, n, gpus // s, s, **kw, **m.kwargs())) for m in stacks]
        # the cheapest stack that fits, else the one with the smallest peak (to say what is missing)
        m, e = next(((m, e) for m, e in estimates if e.fits(budget)), min(estimates, key=lambda me: me[1].peak))
        candidates.append(e)
        stack_of[s] = m
    fitting = [c for c in candidates if c.fits(budget)]
    if not fitting:
        raise PlanError(_nothing_fits(cfg, name, n, gpus, gpu_mem_gib, reserve_gib, budget, candidates,
                                      kw | stack_of[min(candidates, key=lambda c: c.peak).sp].kwargs()))
    chosen = fitting[0]
    longest, longest_stack = {}, {}
    for c in candidates:
        per_stack = [(longest_sequence(cfg, c.dp, c.sp, budget, precision=precision, batch=batch, loss=loss,
                                       **m.kwargs()), m) for m in stacks]
        longest[c.sp], longest_stack[c.sp] = max(per_stack, key=lambda lm: lm[0])
    return Plan(name, cfg, gpus, gpu_mem_gib, reserve_gib, budget, chosen, longest[chosen.sp],
                candidates, longest, stack_of[chosen.sp], longest_stack)


def _nothing_fits(cfg, name, n, gpus, gpu_mem_gib, reserve_gib, budget, candidates, kw) -> str:
    smallest = min(candidates, key=lambda c: c.peak)
    lines = [
        f"nothing fits: {name} at {n:,} tokens on {gpus} GPUs × {gpu_mem_gib:g} GiB "
        f"({(budget) / GIB:.1f} GiB usable after the {reserve_gib:g} GiB reserve); the smallest peak is "
        f"{smallest.peak / GIB:.1f} GiB at dp={smallest.dp} × sp={smallest.sp} "
        f"({MemoryStack(kw['ac'], kw['tiled'], kw['head_chunks']).describe(_heads_per_rank(cfg, smallest.sp))}). "
        "What would fit:",
        f"  - GPUs with >= {smallest.peak / GIB + reserve_gib:.1f} GiB",
    ]
    longest = longest_sequence(cfg, smallest.dp, smallest.sp, budget, ac=kw["ac"], precision=kw["precision"],
                               batch=kw["batch"], loss=kw["loss"], tiled=kw["tiled"], head_chunks=kw["head_chunks"])
    if longest:
        lines.append(f"  - a sequence of at most {longest:,} tokens at dp={smallest.dp} × sp={smallest.sp}")
    for other in AC_MODES:
        if other != kw["ac"] and not (other == "selective" and kw["head_chunks"] > 1):
            alt = estimate(cfg, n, smallest.dp, smallest.sp, **(kw | {"ac": other}))
            if alt.fits(budget):
                lines.append(f"  - --activation-checkpointing {other} ({alt.peak / GIB:.1f} GiB at sp={smallest.sp})")
    stack = {"ac": "offload", "tiled": True, "head_chunks": cfg.n_heads}
    if any(kw[k] != v for k, v in stack.items()):
        alt = estimate(cfg, n, smallest.dp, smallest.sp, **(kw | stack))
        if alt.fits(budget):
            lines.append(f"  - the whole memory stack: --activation-checkpointing offload --tiled yes --head-chunks "
                         f"{cfg.n_heads} ({alt.peak / GIB:.1f} GiB at sp={smallest.sp})")
    if smallest.sp < n:
        for g in (gpus * 2**k for k in range(1, 8)):
            sps = candidate_sps(cfg, g, n)
            est = [estimate(cfg, n, g // s, s, **kw) for s in sps]
            ok = [e for e in est if e.fits(budget)]
            if ok:
                lines.append(f"  - {g} GPUs (dp={ok[0].dp} × sp={ok[0].sp})")
                break
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PlanConfig:
    """Options of ``ulysses-dtensor plan`` (each is a ``--flag``)."""

    model: str = _opt("llama3-8b", f"model: {', '.join(FLAVORS)} (also llama3-8b etc.)")
    seq_len: str = _opt("128K", "global sequence length, e.g. 1M (2^20), 128K, 8192")
    gpus: int = _opt(8, "number of GPUs (dp × sp)")
    gpu_mem_gib: float = _opt(80.0, "memory per GPU in GiB")
    dp: int = _opt(0, "data-parallel degree (0: chosen)")
    sp: int = _opt(0, "sequence-parallel degree (0: the smallest that fits)")
    activation_checkpointing: str = _opt(
        "auto", "auto (chosen with the rest of the memory stack), none, selective (keep attention, recompute the "
                "rest), full (per block) or offload (full, block inputs in host memory)")
    tiled: str = _opt("auto", "MLPs and norms in sequence tiles (UlyssesConfig.tiled_tokenwise): auto, yes or no")
    head_chunks: int = _opt(0, "query heads per rank in this many chunks (UlyssesConfig.head_chunks; 0: chosen)")
    dtype: str = _opt("bf16", "bf16 (FSDP2 bf16 params/compute, fp32 master, grads and Adam) or float32")
    batch: int = _opt(1, "sequences per data-parallel replica per step")
    loss: str = _opt("chunked", "chunked (the loss in tiles from the hidden states: no logits held) or full (all logits)")
    reserve_gib: float = _opt(2.0, "memory per GPU not available to tensors (CUDA context, NCCL, fragmentation)")
    vocab_size: int = _opt(0, "override the model's vocabulary size (0: the flavor's)")
    json: bool = _opt(False, "print the plan as JSON")


def run_plan(cfg: PlanConfig, out=None) -> int:
    """Print the plan (table or JSON); exit code 0, or 2 with the reason on stderr."""
    out = out or sys.stdout
    try:
        tiled = {"auto": None, "yes": True, "no": False}.get(cfg.tiled.lower())
        if cfg.tiled.lower() not in ("auto", "yes", "no"):
            raise ValueError(f"--tiled {cfg.tiled!r}: choose auto, yes or no")
        result = plan(cfg.model, cfg.seq_len, cfg.gpus, cfg.gpu_mem_gib, dp=cfg.dp, sp=cfg.sp,
                      ac=cfg.activation_checkpointing, dtype=cfg.dtype, batch=cfg.batch,
                      reserve_gib=cfg.reserve_gib, vocab_size=cfg.vocab_size, loss=cfg.loss,
                      tiled=tiled, head_chunks=cfg.head_chunks)
    except ValueError as exc:
        print(f"ulysses-dtensor plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if cfg.json else format_plan(result), file=out)
    return 0


def _tokens(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


def _hybrid_note(e: Estimate, cfg: LlamaConfig) -> str:
    if e.ring_degree == 1:
        return ""
    return (f"\n        sp > {cfg.n_heads} query heads: hybrid {e.sp // e.ring_degree}-way Ulysses × "
            f"{e.ring_degree}-way ring attention (docs/hybrid.md)")


def format_plan(p: Plan) -> str:
    """The plan as a text table (what ``ulysses-dtensor plan`` prints)."""
    e, cfg = p.chosen, p.config
    m, d, c = e.memory, e.memory_detail, e.comm
    overall, overall_sp = p.longest_overall

    def hpr(sp: int) -> int:
        return _heads_per_rank(cfg, sp)
    width = 52

    def row(label: str, value: int, note: str = "") -> str:
        return f"  {label:<{width}}{value / GIB:9.2f}{note}"

    precision = "bf16 compute, fp32 master/grads/Adam" if e.precision == "bf16" else "float32"
    rank_tokens = e.batch * -(-e.seq_len // e.sp)
    fits = "fits" if e.fits(p.budget) else "DOES NOT FIT"
    lines = [
        f"plan: {p.model} ({cfg.num_params() / 1e9:.2f} B params, {cfg.n_layers} layers, {cfg.n_heads} heads / "
        f"{cfg.n_kv_heads} kv of {cfg.head_dim}), {e.batch} × {e.seq_len:,} tokens per replica, "
        f"{p.gpus} GPUs × {p.gpu_mem_gib:g} GiB, {precision}, {e.loss} loss",
        f"layout: dp={e.dp} × sp={e.sp}  (the smallest sp that fits, then the most dp){_hybrid_note(e, cfg)}",
        f"memory stack: {p.chosen_stack.describe(hpr(e.sp))}  (the cheapest that fits)  ->  "
        f"{p.chosen_stack.config(e.loss, hpr(e.sp))}",
        f"per GPU: {rank_tokens:,} tokens in the sequence layout; "
        f"{-(-cfg.n_heads // (e.sp // e.ring_degree))} query head(s) × "
        f"{e.batch * -(-e.seq_len // e.ring_degree):,} tokens in the head layout",
        "",
        f"  {'memory per GPU':<{width}}      GiB",
        row(f"parameters (fp32 shard: 1/{e.dp * e.sp})", m["parameters"]),
        row("gradients (fp32 shard)", m["gradients"]),
        row("optimizer: Adam m, v (fp32 shard)", m["optimizer"]),
        row("FSDP root unit gathered (embedding, norm, output)", m["fsdp_root_unsharded"]),
        row(f"activations kept ({cfg.n_layers} layers × {d['activations_per_layer'] / GIB:.3f} + outside)",
            m["activations"], f"   (+ {e.host_bytes / GIB:.1f} GiB in host memory)" if e.host_bytes else ""),
        row(f"logits ({rank_tokens:,} tokens × {cfg.vocab_size:,})" if e.loss == "full"
            else "logits (chunked loss: none held)", m["logits"]),
        row("backward peak: the larger of", m["backward_peak"]),
        row("  loss backward: log-probs, fp32 grads, FSDP blocks" if e.loss == "full"
            else f"  loss backward: {min(default_chunk_tokens(cfg.vocab_size), rank_tokens):,}-token tile, grads, FSDP",
            d["loss_backward_moment"]),
        row(f"  block backward: layer {d['recomputed_layer'] / GIB:.2f} + attention "
            f"{d['attention_workspace'] / GIB:.2f} + FSDP", d["block_backward_moment"]),
        row("total (peak)", m["total"], f"   {fits} in {p.budget / GIB:.1f} GiB ({p.gpu_mem_gib:g} - "
            f"{p.reserve_gib:g} reserved)"),
        "",
        f"  {'communication per step per GPU (bytes sent)':<{width}}      GiB",
        row("Ulysses all-to-all, forward", c["all_to_all_forward"]),
        row("Ulysses all-to-all, backward", c["all_to_all_backward"]),
        row("Ulysses all-to-all, recomputed forward", c["all_to_all_recompute"]),
        row("FSDP all-gather (forward + backward re-gather)", c["fsdp_all_gather"]),
        row("FSDP reduce-scatter", c["fsdp_reduce_scatter"]),
        row("total", c["total"]),
        "",
        f"longest sequence that fits at dp={e.dp} × sp={e.sp}: {p.longest_seq_len:,} tokens "
        f"({_tokens(p.longest_seq_len)}) with {p.longest_stack[e.sp].describe(hpr(e.sp))}",
        f"longest sequence on these {p.gpus} GPUs: {overall:,} tokens ({_tokens(overall)}) at dp={p.gpus // overall_sp}"
        f" × sp={overall_sp} with {p.longest_stack[overall_sp].describe(hpr(overall_sp))}  ->  "
        f"{p.longest_stack[overall_sp].config(e.loss, hpr(overall_sp))}",
        "",
        "  dp × sp   peak GiB  fits   all-to-all GiB   FSDP GiB   longest sequence",
    ]
    for x in p.candidates:
        fsdp = x.comm["fsdp_all_gather"] + x.comm["fsdp_reduce_scatter"]
        a2a = x.comm["all_to_all_forward"] + x.comm["all_to_all_backward"] + x.comm["all_to_all_recompute"]
        longest = p.candidate_longest.get(x.sp, 0)
        lines.append(
            f"  {x.dp:>3} × {x.sp:<3} {x.peak / GIB:9.2f}  {'yes' if x.fits(p.budget) else 'no':<5}"
            f"{a2a / GIB:15.2f} {fsdp / GIB:10.2f}   {longest:,} ({_tokens(longest)})"
            + ("   <- chosen" if x is e else "")
        )
    return "\n".join(lines)
