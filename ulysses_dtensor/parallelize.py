"""``parallelize_module(model, mesh)``: Ulysses sequence parallelism for an unmodified model.

The recipe, in order:

1. check the mesh and the model (refuse what cannot be made exact, before any collective);
2. wrap the model's forward: the token inputs enter as ``Shard(1)`` DTensors and the original
   forward runs on them (``propagation.py``: every op sees the global sequence) inside
   :class:`~ulysses_dtensor.rewrite.UlyssesFunctionMode`, which turns every attention call into
   Ulysses attention and every mean cross-entropy into the global token-weighted mean; MoE blocks
   run on local tokens (``tokenwise.py``). Under torch.compile, or with ``propagation=False``,
   the forward runs on plain local shards instead, with global positions injected;
3. activation checkpointing of each transformer block, if asked (``activation_checkpoint.py``);
4. ``UlyssesConfig(compile=True)``: each block compiled with ``fullgraph=True`` (``compile.py``);
5. FSDP2 ``fully_shard`` per transformer block and on the root over all dp × sp ranks.

:func:`handle_of` returns a :class:`UlyssesHandle` that tells what was done.

The forward wrapper is an instance attribute, so the model keeps its class, its methods and its
state-dict keys, and ``torch.compile(model)`` traces through the wrapper.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils._pytree import tree_map_only

from . import flex, hf, titan
from .activation_checkpoint import check_mode as check_checkpointing_mode, checkpoint_blocks
from .compile import check_compile_overlap, compile_blocks, compiled_blocks, enable_comm_overlap, refuse_fullgraph_compile_with_fsdp
from .consistency import check_same_input_shapes, check_same_model
from .documents import Documents
from .fsdp import apply_fsdp, find_blocks
from .hybrid import HybridLayout, choose_ring_degree
from .inputs import IGNORE_INDEX, check_no_padding, global_seq_len, local_slice, shift_labels
from .layout import seq_shard_offsets, seq_shard_sizes
from .loss import chunked_linear_cross_entropy
from .mixers import REBOUND_RULES, find_mixers, use_ulysses_mixers
from .mesh import check_mesh, dp_sp_mesh, sp_mesh
from .namespaces import model_namespaces, rebound
from .propagation import (
    SequenceCollectiveGuard, SequencePropagation, local_of, shard_sequence, track_modules,
)
from .activation_checkpoint import reenter_rewrite_on_recompute
from .rewrite import UlyssesFunctionMode, running_mode
from .tiling import tile_tokenwise
from .tokenwise import global_load_balancing_loss, use_local_moe


# Forward arguments taking token positions (HF: position_ids; torchtitan: positions). When the
# caller gives none, the global positions of this rank's tokens are passed, so RoPE is exact.
POSITION_ARGS = ("position_ids", "positions")
# Inputs every rank keeps whole on the propagation path (DTensor Replicate): positions, padding
# masks and document ids are (B, N) and cheap; sharding them would make masks and position
# tables gather the sequence. Every other input with 2+ dims enters as Shard(1).
REPLICATED_INPUTS = ("attention_mask", "position_ids", "positions", "document_ids")
# Forward keyword with the document ids of a packed batch (global (B, N) or (N,)); taken by the
# wrapper, passed to the model only if its forward declares it.
DOCUMENT_IDS = "document_ids"


@dataclass
class UlyssesConfig:
    """Options of :func:`parallelize_module`; the defaults suit causal LMs.

    Attributes:
        kernel: local attention kernel ("sdpa", "flex", "flash" or a callable).
        fsdp: apply FSDP2 over all dp × sp ranks (gradients summed; see ``fsdp.apply_fsdp``).
            Without it each rank holds its share of the gradient: sum them (all-reduce) yourself.
        block_classes: FSDP units (classes or class names); default: detected.
        reshard_after_forward: FSDP2 ``reshard_after_forward``.
        rewrite_loss: make mean cross-entropy inside the forward the global token-weighted mean.
        position_buffers: names of buffers indexed by position (RoPE tables sliced ``[:N]``);
            each rank sees the rows of its global positions. Default: buffers named ``*freqs_cis``.
        ignore_index: label value excluded from the loss.
        compile: compile each transformer block with ``torch.compile(fullgraph=True)``, after
            activation checkpointing and before FSDP2 (torchtitan's order; ``compile.compile_blocks``).
            The blocks then run the local-tensor path (plain N/sp-token tensors; the propagation
            path does not compile). Use this rather than ``torch.compile(model)``: with FSDP2 a
            whole-model ``fullgraph=True`` compile stops at FSDP2's hooks.
        compile_backend: the ``torch.compile`` backend of ``compile`` ("inductor", "aot_eager", ...).
        compile_overlap: compute/communication overlap for later ``torch.compile`` calls
            (``compile.enable_comm_overlap``): "inductor" (default) turns on Inductor's scheduler
            passes; "fx_pass" adds our post-grad graph pass (``overlap_pass.py``), which also moves
            independent matmuls between each collective and its wait; "off" leaves Inductor's
            configuration alone. docs/compile.md has what each measured.
        local_attention_only: ablation: attention sees only each rank's own N/P tokens (no
            all-to-all). Wrong for real training; ``ulysses-dtensor train`` uses it to show that
            its task needs attention across shards.
        packed_documents: attention within documents of a packed batch (docs/packed.md). The
            documents come from a ``document_ids=`` keyword of the call (global ids, non-decreasing
            along the sequence) or else from the position input (``position_ids``/``positions``):
            a document starts wherever a position is not the previous one + 1 (transformers'
            rule, as produced by ``DataCollatorWithFlattening``). ``True``: always (one of the two
            is required). ``False``: never (positions only feed RoPE). ``None`` (default):
            ``document_ids=`` when given; for Hugging Face models also position resets, as
            transformers itself does in one process; batches without resets keep the plain
            causal path.
        activation_checkpointing: "none" (default), "selective", "full" or "offload", applied to each block
            (``activation_checkpoint.py``). "selective" keeps what the all-to-alls and the attention kernel
            returned and recomputes the rest, so backward re-runs no collective; "full" keeps only
            block inputs and re-runs the forward exchanges; "offload" is "full" with the block
            inputs in host memory (``offload.py``, eager only). Leave "none" when the model already
            checkpoints its blocks itself (torch, torchtitan or Hugging Face checkpointing all work).
        ring_degree: the ring factor R of the hybrid (``hybrid.py``): sp = U-way Ulysses × R-way
            ring attention. ``None`` (default): 1 (plain Ulysses) when every sp rank gets a query
            head, else the smallest R with sp / R ≤ heads (:func:`choose_ring_degree`; the head
            count is read from the model). The choice is printed once. flex_attention calls
            (BlockMask) always use plain Ulysses.
        chunked_loss: compute the loss from the hidden states and the output layer in tiles of
            ``loss_chunk_tokens`` tokens, never holding the (N/sp × V) logits
            (``loss.chunked_linear_cross_entropy``). ``None`` (default): for Hugging Face causal
            LMs whose forward is transformers' standard template (``hf.standard_lm_head``) on the
            propagation path, when called with ``labels``; the output's ``logits`` is then None
            (call without labels for logits). ``True``: the same, refused for other models;
            ``False``: never.
        loss_chunk_tokens: tokens per tile of the chunked loss; default 2**26 // vocab.
        head_chunks: run each attention call's query heads in this many chunks per rank
            (``head_chunks.py``): the full-sequence q/output of only ~1/head_chunks of the local
            heads exist at a time and no head layout is saved for backward, which receives q, k,
            v again and recomputes the kernel. Eager only; not with the ring hybrid or selective
            checkpointing. 1 (default): plain Ulysses.
        tiled_tokenwise: compute each block's MLP and every norm in sequence tiles of
            ``tile_tokens`` tokens (default: the model width), recomputed tile by tile in
            backward (``tiling.py``): the (N/sp × ffn) intermediate and the norms' fp32
            temporaries are never whole.
        propagation: run the forward on ``Shard(seq)`` DTensors, so the model's code sees the
            global sequence (``propagation.py``, docs/parallelize.md). ``None`` (default): yes
            in eager forwards with sp > 1, except torchtitan models; ``False``: the local-tensor
            path (plain N/sp-token tensors, per-family adapters), which torch.compile'd models
            and blocks also run.
    """

    kernel: str | Callable = "sdpa"
    fsdp: bool = True
    block_classes: tuple | None = None
    reshard_after_forward: bool = True
    rewrite_loss: bool = True
    position_buffers: tuple[str, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    compile: bool = False
    compile_backend: str | Callable = "inductor"
    compile_overlap: str = "inductor"
    local_attention_only: bool = False
    packed_documents: bool | None = None
    ring_degree: int | None = None
    activation_checkpointing: str = "none"
    propagation: bool | None = None
    chunked_loss: bool | None = None
    loss_chunk_tokens: int | None = None
    head_chunks: int = 1
    tiled_tokenwise: bool = False
    tile_tokens: int | None = None


def parallelize_module(model: nn.Module, mesh: DeviceMesh,
                       config: "UlyssesConfig | ParallelStyle | dict[str, ParallelStyle] | None" = None) -> nn.Module:
    """Make ``model`` sequence parallel over ``mesh["sp"]`` (and FSDP over dp × sp); returns it.

    A superset of torch's ``parallelize_module(module, device_mesh, parallelize_plan)``: given a
    ``ParallelStyle`` or a plan dict (e.g. ``{"layers.*.attn": UlyssesAttention()}``) as third
    argument, it is torch's; given a :class:`UlyssesConfig` or nothing, the whole-model recipe.

    Args:
        model: an unmodified model calling ``F.scaled_dot_product_attention`` (plain PyTorch, Hugging
            Face with ``attn_implementation="sdpa"``). Its parameters must be identical on all ranks.
        mesh: a 1-D ("sp",) or 2-D ("dp", "sp") DeviceMesh, e.g. :func:`init_mesh`.
        config: :class:`UlyssesConfig`.

    ``handle_of(model)`` tells what was done (ring degree, path, compiled blocks).
    Afterwards ``model(input_ids)`` takes the global batch of this dp replica (the same on every sp
    rank) or the output of :func:`shard_batch`, computes on this rank's N/P tokens, and returns
    this rank's outputs (``gather_sequence`` reassembles them); losses are global means.
    """
    if isinstance(config, (ParallelStyle, dict)):
        from torch.distributed.tensor.parallel import parallelize_module as torch_parallelize_module

        return torch_parallelize_module(model, mesh, config)
    config = config or UlyssesConfig()
    if not isinstance(config, UlyssesConfig):
        raise TypeError(f"parallelize_module: config must be a UlyssesConfig, a ParallelStyle or a plan dict, "
                        f"got {type(config).__name__}")
    check_mesh(mesh)
    check_checkpointing_mode(config.activation_checkpointing, model)
    check_compile_overlap(config.compile_overlap)
    check_memory_options(config)
    check_compile_options(config)
    propagate = _use_propagation(model, config.propagation, sp_mesh(mesh).size()) and not config.compile
    mixers = _install_attention(model, propagate, config.compile)
    check_same_model(model, dp_sp_mesh(mesh).get_group())
    wrapper = _SequenceParallelForward(model, mesh, config, propagate, mixers)
    if config.compile and not wrapper.local_path_is_exact and wrapper.world > 1:
        raise ValueError(
            f"UlyssesConfig(compile=True): compiled blocks run the local-tensor path (plain N/sp-token tensors), "
            f"where {wrapper.model_name}, which takes no position argument and has no position buffer, would "
            "derive positions from its local length and be wrong; run it eager, or give its forward a "
            "position_ids= / positions= argument"
        )
    if config.compile_overlap == "fx_pass" and wrapper.ring_degree > 1:
        # Measured: the hybrid's compiled forward then hangs in its first all-to-all on gloo
        # (tests/test_hybrid.py); until that is understood, refuse rather than hang.
        raise ValueError(
            f'UlyssesConfig(compile_overlap="fx_pass") does not support the Ulysses × ring hybrid '
            f"(sp {wrapper.world} > the model's query heads, ring degree {wrapper.ring_degree}); "
            f'use compile_overlap="inductor"'
        )
    if config.head_chunks > 1 and wrapper.ring_degree > 1:
        raise ValueError(
            f"UlyssesConfig(head_chunks={config.head_chunks}) with the Ulysses × ring hybrid (sp {wrapper.world} > "
            f"the model's query heads): chunk heads only with plain Ulysses (head_chunks=1 here)"
        )
    model.forward = wrapper  # instance attribute: nn.Module.__call__ (and its hooks) call it
    enable_comm_overlap(config.compile_overlap)
    blocks = find_blocks(model, config.block_classes)
    if config.tiled_tokenwise:
        tile_tokenwise(model, blocks, config.tile_tokens)
    blocks = checkpoint_blocks(model, blocks, config.activation_checkpointing)
    reenter_rewrite_on_recompute(blocks)  # activation checkpointing recomputes inside the rewrite
    if config.compile:
        # after activation checkpointing (the recompute is in each block's graph) and before
        # FSDP2 (its hooks stay outside the graphs)
        compile_blocks(blocks, config.compile_backend)
    if config.fsdp:
        apply_fsdp(model, dp_sp_mesh(mesh), blocks, config.reshard_after_forward)
    # Registered last with prepend: the input checks run before FSDP's pre-forward all-gather,
    # so bad input raises on every rank before any collective.
    model.register_forward_pre_hook(wrapper.check_inputs, prepend=True, with_kwargs=True)
    if wrapper.propagate:
        track_modules(model, wrapper.module_stack)
    return model


class UlyssesHandle:
    """What :func:`parallelize_module` made of a model; get it with :func:`handle_of`.

    Attributes (read-only): ``config``; ``sp_mesh`` (the 1-D sequence-parallel mesh); ``sp`` (its
    size); ``ring_degree`` (R of the Ulysses × ring hybrid, 1 for plain Ulysses); ``propagation``
    (eager forwards run on ``Shard(seq)`` DTensors); ``mixers`` (non-attention sequence mixers
    found, ``{kind: count}``); ``compiled_blocks`` (blocks compiled on their own);
    ``last_attention_calls`` (attention calls the last eager forward rewrote).
    """

    def __init__(self, forward: "_SequenceParallelForward"):
        self._forward = forward

    config = property(lambda self: self._forward.config)
    sp_mesh = property(lambda self: self._forward.mesh_sp)
    sp = property(lambda self: self._forward.world)
    ring_degree = property(lambda self: self._forward.ring_degree)
    propagation = property(lambda self: self._forward.propagate)
    mixers = property(lambda self: dict(self._forward.mixers))
    compiled_blocks = property(lambda self: len(compiled_blocks(self._forward.model)))
    last_attention_calls = property(lambda self: self._forward.last_attention_calls)

    def __repr__(self) -> str:
        return (f"UlyssesHandle({self._forward.model_name}, sp={self.sp}, ring_degree={self.ring_degree}, "
                f"propagation={self.propagation}, compiled_blocks={self.compiled_blocks})")


def handle_of(model: nn.Module) -> UlyssesHandle:
    """The :class:`UlyssesHandle` of a model prepared by :func:`parallelize_module` (also through
    ``torch.compile(model)``); ValueError for any other model."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    forward = getattr(model, "forward", None)
    if not isinstance(forward, _SequenceParallelForward):
        raise ValueError(f"{type(model).__name__} was not prepared by ulysses_dtensor.parallelize_module")
    return UlyssesHandle(forward)


def check_compile_options(config: UlyssesConfig) -> None:
    """``compile`` is a bool and combines with the other options (before any collective)."""
    if not isinstance(config.compile, bool):
        raise ValueError(f"UlyssesConfig(compile={config.compile!r}): True or False")
    if not config.compile:
        return
    eager_only = {"activation_checkpointing='offload'": config.activation_checkpointing == "offload",
                  f"head_chunks={config.head_chunks}": config.head_chunks != 1}
    for option, given in eager_only.items():
        if given:
            raise ValueError(f"UlyssesConfig(compile=True) with {option}: that option runs eager only; use one of the two")
    if config.propagation:
        raise ValueError(
            "UlyssesConfig(compile=True) with propagation=True: compiled blocks run the local-tensor path "
            "(the propagation path does not compile); leave propagation=None"
        )


def check_memory_options(config: UlyssesConfig) -> None:
    """The memory options (head_chunks, tiled_tokenwise) are valid and combine (before any collective)."""
    if isinstance(config.head_chunks, bool) or not isinstance(config.head_chunks, int) or config.head_chunks < 1:
        raise ValueError(f"UlyssesConfig(head_chunks={config.head_chunks!r}): an integer >= 1")
    if config.head_chunks > 1 and config.activation_checkpointing == "selective":
        raise ValueError(
            f"UlyssesConfig(head_chunks={config.head_chunks}) with activation_checkpointing='selective': selective "
            "keeps the head layout that head chunking is there to drop; use 'full' or 'offload'"
        )
    if not isinstance(config.tiled_tokenwise, bool):
        raise ValueError(f"UlyssesConfig(tiled_tokenwise={config.tiled_tokenwise!r}): True or False")
    if config.tile_tokens is not None and (
            isinstance(config.tile_tokens, bool) or not isinstance(config.tile_tokens, int) or config.tile_tokens < 1):
        raise ValueError(f"UlyssesConfig(tile_tokens={config.tile_tokens!r}): an integer >= 1 or None")


def _install_attention(model: nn.Module, propagate: bool, compiled: bool = False) -> dict[str, int]:
    """Refuse models we cannot make exact; route the attention that SDPA rewriting does not see
    (HF masks on the local path, torchtitan flex modules, direct flex_attention calls) and the
    other sequence mixers (``mixers.py``) to Ulysses. Returns the mixer kinds found, with counts."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model.forward, _SequenceParallelForward):
        raise ValueError(f"{type(model).__name__} is already parallelized")
    mixers = find_mixers(model)  # refuses sequence mixers we do not know
    if mixers and not propagate:
        raise ValueError(
            f"{type(model).__name__} has {', '.join(sorted({k for kinds in mixers.values() for k in kinds}))} "
            "layers, which run on the propagation path only: UlyssesConfig(propagation=False) and compile=True are not supported "
            "for them"
        )
    experts = hf.expert_count(model) if hf.is_hf_model(model) else None
    # (a config may name experts no layer uses)
    has_experts = bool(experts) and any(re.search(r"moe|expert", type(m).__name__, re.IGNORECASE) for m in model.modules())
    if compiled and has_experts:
        raise ValueError(
            f"UlyssesConfig(compile=True): {type(model).__name__} routes tokens to {experts} experts; MoE blocks run on "
            "the propagation path only (the load-balancing loss needs the global token counts, and Hugging Face's "
            "expert loop is data-dependent, so it does not compile with fullgraph=True)"
        )
    if hf.is_hf_model(model):
        hf.use_ulysses_attention(model, refuse_windows=not propagate)
    if propagate:
        if not use_local_moe(model) and has_experts:
            raise ValueError(
                f"{type(model).__name__} routes tokens to {experts} experts, but no MoE block (a module "
                "with `gate` and `experts`) was found to run on local tokens; refused rather than "
                "gather the sequence"
            )
    titan.use_ulysses_attention(model)
    flex.use_ulysses_attention(model)
    return use_ulysses_mixers(mixers)


class _SequenceParallelForward:
    """The replacement ``forward``: shard inputs, global positions, rewritten attention/loss."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, config: UlyssesConfig, propagate: bool,
                 mixers: dict[str, int] | None = None):
        self.model_name = type(model).__name__
        self.original = model.forward
        self.config = config
        self.mesh_sp = sp_mesh(mesh)
        self.sp_group = self.mesh_sp.get_group()
        self.rank, self.world = self.mesh_sp.get_local_rank(), self.mesh_sp.size()
        self.loss_group = dp_sp_mesh(mesh).get_group() if config.rewrite_loss else None
        announce = dp_sp_mesh(mesh).get_local_rank() == 0
        self.ring_degree = _ring_degree(model, self.world, config.ring_degree, announce)
        signature = inspect.signature(self.original)
        self.params = set(signature.parameters)
        self.var_kwargs = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        self.positional = [
            n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        # the forward argument that takes token positions, if any (fixed by the signature)
        self.position_arg = next((n for n in POSITION_ARGS if n in self.params), None)
        if self.position_arg is None and self.var_kwargs:
            self.position_arg = "position_ids"
        self.position_buffers = _find_position_buffers(model, config.position_buffers)
        self.is_hf = hf.is_hf_model(model)
        self.verified = False
        self.model = model
        self.shapes_checked = False
        self.last_attention_calls = 0
        self.propagate = propagate  # _use_propagation
        # under torch.compile the local path runs: exact for models we know to take global
        # positions there (HF, torchtitan, an explicit position argument or buffer)
        self.local_path_is_exact = bool(
            self.is_hf or titan.is_titan_model(model) or self.position_buffers
            or any(n in self.params for n in POSITION_ARGS)
        )
        self.module_stack: list[str] = []
        # names rebound in the model's modules for each propagated forward
        self.namespaces = model_namespaces(model)
        self.rebound_rules = {"load_balancing_loss_func": lambda original: global_load_balancing_loss(original, _moe_context)}
        self.mixers = mixers or {}  # other sequence mixers found: {kind: count} (mixers.py)
        if self.mixers:
            self.rebound_rules.update(REBOUND_RULES)
        self.lm_head = _chunked_loss_head(model, config, propagate)

    @property
    def has_compiled_blocks(self) -> bool:
        return bool(compiled_blocks(self.model))

    def accepts(self, name: str) -> bool:
        return name in self.params or self.var_kwargs

    def __call__(self, *args, **kwargs):
        if self.propagate:
            if not torch.compiler.is_compiling() and not self.has_compiled_blocks:
                return self.propagated_call(args, kwargs)
            if not self.local_path_is_exact:
                raise ValueError(
                    f"parallelize_module: torch.compile of {self.model_name} (or of its blocks) runs the "
                    "local-tensor path (the propagation path does not compile yet), where a model deriving positions or masks from "
                    "the sequence length it sees would be wrong; it takes no position argument and has no "
                    "position buffer, so it is refused. Run it eager, or give its forward a position_ids= / "
                    "positions= argument"
                )
        if self.mixers:
            raise ValueError(
                f"parallelize_module: {self.model_name} has {', '.join(sorted(self.mixers))} layers, which run "
                "on the propagation path only (eager, UlyssesConfig(propagation=True)); torch.compile and "
                "propagation=False run the local-tensor path, where they are not supported yet"
            )
        # Read once: after a graph break the rest of this call resumes eagerly, where
        # is_compiling() is False although the attention calls ran in compiled graphs.
        compiling = torch.compiler.is_compiling()
        args, kwargs, seq_len, documents = self.shard_inputs(args, kwargs)
        sizes = seq_shard_sizes(seq_len, self.world)
        offset, n_local = seq_shard_offsets(sizes)[self.rank], sizes[self.rank]
        full = {}
        for module, name, table in self.position_buffers:
            full[(module, name)] = module._buffers[name]
            module._buffers[name] = table[offset : offset + n_local]
        mode = UlyssesFunctionMode(
            self.sp_group, seq_len, self.loss_group, self.config.kernel, self.config.local_attention_only,
            documents, self.ring_degree, head_chunks=self.config.head_chunks,
        )
        try:
            with mode, _checkpointed_bodies_enter_rewrite():
                out = self.original(*args, **kwargs)
        finally:
            for (module, name), table in full.items():
                module._buffers[name] = table
        self.check_attention_calls(mode, compiling)
        return out

    def check_attention_calls(self, mode: UlyssesFunctionMode, compiling: bool) -> None:
        """After a forward: refuse a model whose attention we never saw (it ran on local tokens)
        and a packed batch whose attention ignored the documents."""
        if not self.verified and not compiling:
            # The mode counts eager calls only (a count in a graph is a side effect: recompiles,
            # refused in checkpoints). Attention that ran in compiled code — blocks compiled on
            # their own, or frames of a compiled model after a graph break — is not counted.
            if mode.attention_calls == 0 and mode.mixer_calls == 0 and not self.has_compiled_blocks and not _in_compiled_region():
                raise RuntimeError(
                    f"parallelize_module: {self.model_name}.forward made no F.scaled_dot_product_attention "
                    "call, so its attention (e.g. a manual softmax(QK^T)) saw only this rank's tokens and "
                    "the result is wrong. Use F.scaled_dot_product_attention (HF: attn_implementation='sdpa')"
                )
            self.verified = True
        if mode.documents is not None and not self.config.local_attention_only and not compiling:
            missed = mode.attention_calls - mode.document_calls
            if missed:
                raise RuntimeError(
                    f"parallelize_module: {self.model_name} got a packed batch but {missed} of its "
                    f"{mode.attention_calls} attention calls are not "
                    "F.scaled_dot_product_attention (flex_attention?) and ignored the documents; build "
                    "their BlockMask with the document mask_mod (docs/packed.md) instead"
                )
        if not compiling:
            self.last_attention_calls = mode.attention_calls  # UlyssesHandle.last_attention_calls

    def common_inputs(self, named: dict) -> tuple[int, torch.Tensor, Documents | None]:
        """In place, for both paths: labels shifted on the global sequence, ``document_ids``
        taken, no KV cache (a training forward). Returns the global N, a (B, N, ...) input and
        the packed documents, if any."""
        seq_len = global_seq_len(named, self.model_name)
        labels = named.get("labels")
        if isinstance(labels, torch.Tensor) and not isinstance(labels, DTensor) and self.accepts("shift_labels"):
            named.setdefault("shift_labels", shift_labels(labels, self.config.ignore_index))
        ref = next(t for t in named.values() if isinstance(t, torch.Tensor) and t.dim() >= 2)
        documents = self.packed_documents(named, ref)
        if DOCUMENT_IDS not in self.params:
            named.pop(DOCUMENT_IDS, None)
        if "use_cache" in self.params and named.get("use_cache") is None:
            named["use_cache"] = False
        return seq_len, ref, documents

    def propagated_call(self, args: tuple, kwargs: dict):
        """The forward on ``Shard(1)`` DTensor inputs (``propagation.py``): the model's code sees
        the global sequence; attention and the loss are routed by the rewrite mode."""
        named = self.named_inputs(args, kwargs)
        seq_len, ref, documents = self.common_inputs(named)
        for name, value in named.items():
            if not isinstance(value, torch.Tensor):
                continue
            if name in REPLICATED_INPUTS:
                # positions and padding masks are small (B, N): every rank keeps them whole, so
                # masks and position tables are built for the global sequence without a collective
                named[name] = value.full_tensor() if isinstance(value, DTensor) else value
            elif not isinstance(value, DTensor) and value.dim() >= 2:
                local = local_slice(value, self.rank, self.world, seq_len).contiguous()
                named[name] = shard_sequence(value, self.mesh_sp, local)
        chunked = (self.lm_head is not None and named.get("labels") is not None
                   and named.get("shift_labels") is not None and "num_items_in_batch" not in named)
        if chunked:
            named.pop("labels")
            targets = named.pop("shift_labels")
        propagation = SequencePropagation(SequenceCollectiveGuard(self.module_stack), mesh_sp=self.mesh_sp)
        mode = UlyssesFunctionMode(
            self.sp_group, seq_len, self.loss_group, self.config.kernel, self.config.local_attention_only,
            documents, self.ring_degree, propagation, head_chunks=self.config.head_chunks,
        )
        try:
            native = hf.propagated_forward(self.model) if self.is_hf else contextlib.nullcontext()
            with propagation, mode, native, rebound(self.namespaces, self.rebound_rules):
                if chunked:
                    out = self.chunked_loss_call(named, targets, propagation)
                else:
                    out = self.original(**named)
                out = tree_map_only(DTensor, lambda t: _to_user(t, propagation), out)
        except BaseException:
            self.module_stack.clear()
            raise
        self.check_attention_calls(mode, compiling=torch.compiler.is_compiling())
        return out

    def chunked_loss_call(self, named: dict, targets: DTensor, propagation: SequencePropagation):
        """The forward without labels, its output layer given no tokens (the hidden states are
        taken on the way in), then the chunked loss of those hidden states: ``out.loss`` as with
        labels, ``out.logits`` None."""
        hidden_states = []

        def take_hidden_states(module, args):
            hidden_states.append(args[0])
            return (local_of(args[0])[:, :0],)

        handle = self.lm_head.register_forward_pre_hook(take_hidden_states)
        try:
            out = self.original(**named)
        finally:
            handle.remove()
        hidden = local_of(hidden_states[-1])
        with propagation.allowed():
            loss = chunked_linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, local_of(targets).reshape(-1),
                self.loss_group, bias=self.lm_head.bias, ignore_index=self.config.ignore_index,
                chunk_tokens=self.config.loss_chunk_tokens,
            )
        # a new output without logits (transformers' ModelOutput ignores items set to None)
        return type(out)(**{k: v for k, v in out.items() if k not in ("loss", "logits")}, loss=loss)

    def check_inputs(self, module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook: every input check, before any collective (FSDP's included)."""
        if self.config.fsdp and torch.compiler.is_compiling():
            refuse_fullgraph_compile_with_fsdp(self.model_name)  # FSDP2's hooks come next
        named = self.named_inputs(args, kwargs)
        seq_len = global_seq_len(named, self.model_name)
        sizes = seq_shard_sizes(seq_len, self.world)  # raises for a sequence shorter than sp
        if 0 in sizes:
            # DTensor's Shard rule gives ceil(N/P) tokens per rank, so a few short lengths leave the
            # last ranks empty; model code (reshape(..., -1)) breaks on empty tensors.
            raise ValueError(
                f"{self.model_name}: a sequence of {seq_len} tokens over sp={self.world} leaves rank "
                f"{sizes.index(0)} without tokens (shards of ceil(N/sp) = {sizes[0]}: {sizes}); use a "
                f"length that is a multiple of sp, or at least {sizes[0] * (self.world - 1) + 1}"
            )
        if not self.propagate:
            check_no_padding(named.get("attention_mask"), self.model_name)
        if sizes[0] == 1 and self.world > 1:
            # Measured: HF Llama's q/k gradients are wrong (rel. error ~1) on the propagation path
            # when every rank holds one token (N = sp), cause not found; on the local path HF's
            # SDPA call turns non-causal (is_causal = query.shape[2] > 1). So refused.
            raise ValueError(
                f"{self.model_name}: a sequence of {seq_len} tokens over sp={self.world} leaves one token per "
                f"rank, which sequence parallelism does not support; use at least {self.world + 1} tokens"
            )
        ref = next(t for t in named.values() if isinstance(t, torch.Tensor) and t.dim() >= 2)
        documents = self.packed_documents(named, ref, check_only=True)
        if documents is not None:
            documents.check(ref.shape[0], seq_len, ref.device)
        if not self.shapes_checked and not torch.compiler.is_compiling():
            # once, at the first forward: all sp ranks must feed the same global batch
            shapes = {k: tuple(v.shape) for k, v in named.items() if isinstance(v, torch.Tensor)}
            check_same_input_shapes(shapes, self.sp_group, self.model_name)
            self.shapes_checked = True

    def named_inputs(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.positional):
            raise TypeError(f"{self.model_name}.forward got more positional arguments than it declares")
        named = dict(zip(self.positional, args))
        named.update(kwargs)
        return named

    def packed_documents(self, named: dict, ref: torch.Tensor, check_only: bool = False) -> Documents | None:
        """This forward's documents (``UlyssesConfig.packed_documents``) from the global
        ``document_ids`` or position input, or None. ``check_only``: validate plain tensors only
        (sharded DTensor inputs are gathered, one small all-gather, in the forward itself)."""
        packed = self.config.packed_documents
        ids = named.get(DOCUMENT_IDS)
        positions = named.get(self.position_arg) if self.position_arg is not None else None
        if ids is not None:
            if packed is False:
                raise ValueError(f"{self.model_name}: document_ids given but UlyssesConfig(packed_documents=False)")
            source, build = ids, Documents
        elif packed or (packed is None and self.is_hf and positions is not None):
            if positions is None:
                raise ValueError(
                    f"{self.model_name}: UlyssesConfig(packed_documents=True) needs document_ids= or position "
                    "ids restarting at each document (position_ids=/positions=) in the forward call"
                )
            source, build = positions, Documents.from_position_ids
        else:
            return None
        if isinstance(source, DTensor):
            if check_only:
                return None
            source = source.full_tensor()
        documents = build(source.to(ref.device))
        if packed is None and ids is None and not check_only and not torch.compiler.is_compiling():
            if documents.is_single_document():
                return None  # positions without a reset: one document per row, the plain causal path
        return documents

    def shard_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict, int, Documents | None]:
        """Slice global tensors, unwrap sharded DTensors; add global positions and shifted labels;
        the packed documents of the global sequence, if any."""
        named = self.named_inputs(args, kwargs)
        if named.get("attention_mask") is not None:
            check_no_padding(named["attention_mask"], self.model_name)
            named["attention_mask"] = None
        seq_len, ref, documents = self.common_inputs(named)
        if self.position_arg is not None and named.get(self.position_arg) is None:
            named[self.position_arg] = torch.arange(seq_len, device=ref.device).expand(ref.shape[0], seq_len)
        for name, value in named.items():
            if isinstance(value, DTensor):
                named[name] = value.to_local()
            elif isinstance(value, torch.Tensor) and value.dim() >= 2:
                named[name] = local_slice(value, self.rank, self.world, seq_len).contiguous()
        return (), named, seq_len, documents


def _moe_context():
    """(sp mesh, N, this rank's token offset and count, the guard's ``allowed``) of the running
    propagated forward, for ``tokenwise``'s global load-balancing loss; None outside one."""
    mode = running_mode()
    if mode is None or not mode.propagation.active:
        return None
    mesh = mode.propagation.mesh_sp
    sizes = seq_shard_sizes(mode.seq_len, mesh.size())
    rank = mesh.get_local_rank()
    return mesh, mode.seq_len, seq_shard_offsets(sizes)[rank], sizes[rank], mode.propagation.allowed


def _chunked_loss_head(model: nn.Module, config: UlyssesConfig, propagate: bool) -> nn.Linear | None:
    """The output layer the chunked loss uses (``UlyssesConfig.chunked_loss``), or None."""
    if config.chunked_loss is False:
        return None
    head = hf.standard_lm_head(model) if hf.is_hf_model(model) and propagate and config.rewrite_loss else None
    if head is None and config.chunked_loss:
        raise ValueError(
            f"UlyssesConfig(chunked_loss=True): {type(model).__name__} is not a Hugging Face causal LM whose forward is "
            "transformers' standard template (logits = self.lm_head(hidden_states), then self.loss_function), "
            "run on the propagation path with rewrite_loss; use chunked_loss=None to fall back to full logits"
        )
    if config.loss_chunk_tokens is not None and config.loss_chunk_tokens < 1:
        raise ValueError(f"UlyssesConfig(loss_chunk_tokens={config.loss_chunk_tokens}) must be >= 1")
    return head


def _to_user(t: DTensor, propagation: SequencePropagation) -> torch.Tensor:
    """An output DTensor as the plain tensor the caller gets: this rank's shard of a
    sequence-sharded output, the value of a replicated one, a reduced partial one."""
    if any(p.is_partial() for p in t.placements):
        with propagation.allowed():
            t = t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    return local_of(t)


def _in_compiled_region() -> bool:
    """Whether this eager code runs inside a torch.compile'd call (torch's own test, as in
    ``torch._dynamo.eval_frame._set_stance``)."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    callback = get_eval_frame_callback()
    return callback is not None and callback is not False


def _checkpointed_bodies_enter_rewrite():
    """Let blocks compiled on their own (torchtitan's per-block compile) re-enter the rewrite mode
    inside an activation-checkpointed body (``rewrite.UlyssesFunctionMode``): Dynamo refuses
    any state change inside a checkpoint unless told it need not be replayed at recompute; the
    mode's push and pop are balanced, so there is nothing to replay."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()  # whole-model compile: the mode is created inside the trace
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


HEAD_COUNT_NAMES = ("num_attention_heads", "n_heads", "num_heads", "n_head")


def query_heads(model: nn.Module) -> int | None:
    """The model's query-head count: HF ``config.num_attention_heads``, else the smallest
    ``n_heads``/``num_heads``-style integer attribute of any submodule; None if there is none."""
    value = getattr(getattr(model, "config", None), "num_attention_heads", None)
    if isinstance(value, int) and value > 0:
        return value
    found = [
        v for m in model.modules() for v in (getattr(m, name, None) for name in HEAD_COUNT_NAMES)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0
    ]
    return min(found) if found else None


def _use_propagation(model: nn.Module, requested: bool | None, sp: int) -> bool:
    """Whether the forward runs on ``Shard(seq)`` DTensors (the default) or on local tensors."""
    if sp == 1:
        return False  # one sp rank holds the whole sequence: the plain forward is the exact one
    if requested is not None:
        return bool(requested)
    # torchtitan's flex modules run compiled flex_attention and its RoPE complex buffers: the
    # local path's adapters (titan.py) serve them
    return not titan.is_titan_model(model)


def _ring_degree(model: nn.Module, sp: int, requested: int | None, announce: bool) -> int:
    heads = query_heads(model)
    if requested is None:
        ring = choose_ring_degree(sp, heads) if heads is not None else 1
    elif not isinstance(requested, int) or requested < 1 or sp % requested:
        raise ValueError(f"UlyssesConfig(ring_degree={requested!r}) must be a positive divisor of the sp degree {sp}")
    else:
        ring = requested
    if announce and sp > 1:
        print(f"ulysses_dtensor: {HybridLayout.build(sp, ring).describe(heads)}", flush=True)
    return ring


def _find_position_buffers(model: nn.Module, names: tuple[str, ...] | None):
    """(module, buffer name, full table) for each position-indexed buffer."""
    found, seen = [], set()
    for full_name, buffer in model.named_buffers():
        module_name, _, name = full_name.rpartition(".")
        if (names is None and name.endswith("freqs_cis")) or (names is not None and full_name in names):
            found.append((model.get_submodule(module_name), name, buffer))
            seen.add(full_name)
    missing = set(names or ()) - seen
    if missing:
        raise ValueError(f"position_buffers not found in the model: {sorted(missing)}")
    return found
