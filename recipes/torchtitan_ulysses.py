"""torchtitan 0.3.0 recipe: Llama3 trained with Ulysses sequence parallelism (``ulysses_dtensor``).

Run it with torchtitan's own trainer, naming this module by its dotted path (from the repository
root, so that ``recipes`` is importable)::

    torchrun --nproc_per_node 8 -m torchtitan.train \\
        --module recipes.torchtitan_ulysses --config llama3_8b \\
        --parallelism.context_parallel_degree 8

torchtitan's ``ConfigManager`` imports ``recipes.torchtitan_ulysses`` (after trying
``recipes.torchtitan_ulysses.config_registry``) and calls the function named by ``--config``. Each
config function returns a ``UlyssesTrainer.Config``: torchtitan's ``Trainer.Config`` whose
``ModelSpec`` carries :func:`parallelize_llama_ulysses` as its ``parallelize_fn``.

Parallel dims → our mesh: torchtitan's context-parallel degree ``cp`` *is* our sequence-parallel
degree ``sp``; its data-parallel degree (``dp_replicate × dp_shard``, i.e. its "batch" mesh) is our
``dp``. The (dp, sp) mesh has the same rank layout as torchtitan's data-loading mesh (rank =
dp_index · sp + sp_index), so every sp rank of a dp replica reads the same batch. FSDP2 shards
over all dp × sp ranks, as torchtitan's own ``fsdp`` mesh (dp_shard × cp) does. Tensor, pipeline
and expert parallelism, HSDP (``dp_replicate > 1``), CPU offload and FSDP mixed precision are
refused with a message naming the option.

Data path: with ``cp > 1`` torchtitan's ``Trainer.post_dataloading_process`` shards inputs,
labels and positions itself (load-balanced "headtail" chunks) for torchtitan's own context
parallelism. ``parallelize_module`` slices full-length inputs itself, so :class:`UlyssesTrainer`
overrides that one method: the model gets the *full* sequence (tokens, global positions, the
BlockMask of the global sequence) and slices it; only the labels, which the loss consumes outside
the model, are cut to this rank's contiguous shard with the same rule. Nothing is sharded twice.
The loss is torchtitan's (a sum over this rank's tokens divided by the global token count), and
our FSDP2 sums gradients over all ranks: together the single-process gradient of the global batch.

Activation checkpointing (torchtitan's, recomputed inside the Ulysses rewrite) and torch.compile
(torchtitan's per-block compile) work, alone or together. torchtitan's
``Trainer`` itself needs an accelerator; tests/test_recipes.py runs everything this module adds,
inside torchtitan's own step code, on CPU gloo ranks (see docs/recipes.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
from torchtitan.components.validate import Validator
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import (
    ActivationCheckpointingConfig,
    FullAC,
    SelectiveAC,
)
from torchtitan.distributed.compile import apply_compile
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common.attention import (
    FlexAttention,
    ScaledDotProductAttention,
    VarlenAttention,
)
from torchtitan.models.common.decoder import Decoder
from torchtitan.models.llama3 import Llama3StateDictAdapter, llama3_configs
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

import ulysses_dtensor as U
from ulysses_dtensor.inputs import local_slice

# Sequence lengths of the configs below (tokens per sequence, before sharding over sp).
DEBUG_SEQ_LEN = 8192  # small model, long enough that every sp up to 16 gets 512+ tokens
LLAMA3_8B_SEQ_LEN = 131072  # Llama 3.1's trained context (128K)
LLAMA3_70B_SEQ_LEN = 262144  # 256K: context extension beyond the trained 128K (RoPE extended)

# Attribute of the parallelized model holding its (dp, sp) mesh, read by UlyssesTrainer.
MESH_ATTRIBUTE = "_ulysses_mesh"


# --------------------------------------------------------------------------------------------
# torchtitan parallel dims -> our (dp, sp) mesh


def check_parallel_dims(parallel_dims: ParallelDims, parallelism: ParallelismConfig, training: TrainingConfig) -> None:
    """Refuse what this recipe does not combine with Ulysses, naming the option to change."""
    unsupported = {
        "tensor_parallel_degree": parallel_dims.tp,
        "pipeline_parallel_degree": parallel_dims.pp,
        "expert_parallel_degree": parallel_dims.ep,
        "data_parallel_replicate_degree": parallel_dims.dp_replicate,
    }
    for option, degree in unsupported.items():
        if degree != 1:
            raise ValueError(
                f"recipes.torchtitan_ulysses: --parallelism.{option} {degree} is not supported; Ulysses "
                "uses context_parallel_degree as its sp degree and FSDP2 over data_parallel_shard_degree × sp"
            )
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            f"recipes.torchtitan_ulysses needs --parallelism.spmd_backend partial_dtensor, got "
            f"{parallelism.spmd_backend!r} (the spmd_types/full_dtensor backends annotate activations "
            "for torchtitan's own sharding)"
        )
    if training.enable_cpu_offload:
        raise ValueError("recipes.torchtitan_ulysses: --training.enable_cpu_offload is not supported")
    if training.mixed_precision_param != training.dtype:
        raise ValueError(
            f"recipes.torchtitan_ulysses: ulysses_dtensor's FSDP2 has no mixed-precision policy yet, so "
            f"--training.mixed_precision_param {training.mixed_precision_param} would be ignored; set it to "
            f"the model dtype ({training.dtype}), or set --training.dtype to train in that precision"
        )


def ulysses_mesh(parallel_dims: ParallelDims, device_type: str | None = None) -> DeviceMesh:
    """The ("dp", "sp") mesh: dp = torchtitan's batch degree, sp = its context-parallel degree.

    Rank r sits at (r // sp, r % sp), which is where torchtitan's data-loading mesh
    ("pp", "batch", "cp", "tp") puts it when pp = tp = 1: the data loader's ``dp_rank`` is our dp
    index, so all sp ranks of a replica read the same batch.
    """
    dp = parallel_dims.dp_replicate * parallel_dims.dp_shard
    return U.init_mesh(dp=dp, sp=parallel_dims.cp, device_type=device_type)


# --------------------------------------------------------------------------------------------
# activation checkpointing and compile (torchtitan's own, made Ulysses-aware)


def apply_activation_checkpointing(model: Decoder, ac_config: ActivationCheckpointingConfig, dump_folder: str) -> None:
    """torchtitan's activation checkpointing of every block (``activation-checkpoint:*``); the
    recompute runs inside the Ulysses rewrite (``parallelize_module`` arranges it)."""
    if ac_config is None:
        return
    ac_config.build(dump_folder=dump_folder).apply(model)


def model_compile_enabled(compile_config: CompileConfig) -> bool:
    return compile_config.enable and "model" in compile_config.components


# --------------------------------------------------------------------------------------------
# the parallelize_fn of the ModelSpec


def parallelize_llama_ulysses(
    model: Decoder,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config: ActivationCheckpointingConfig,
    dump_folder: str,
) -> nn.Module:
    """torchtitan ``parallelize_fn``: activation checkpointing, compile, then Ulysses + FSDP2.

    Same signature and order as torchtitan's ``parallelize_llama`` (AC, per-block compile, then
    FSDP), with torchtitan's context parallelism and FSDP replaced by
    ``ulysses_dtensor.parallelize_module`` over the (dp, sp) mesh of :func:`ulysses_mesh`. The model may be on the meta device (the trainer materializes it
    afterwards, on the sharded parameters).
    """
    check_parallel_dims(parallel_dims, parallelism, training)
    mesh = ulysses_mesh(parallel_dims)
    compiled = model_compile_enabled(compile_config)
    apply_activation_checkpointing(model, ac_config, dump_folder)
    if compiled:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)
    config = U.UlyssesConfig(
        reshard_after_forward=parallelism.fsdp_reshard_after_forward != "never",
        rewrite_loss=False,  # torchtitan's loss runs outside the forward, normalized by global tokens
    )
    U.parallelize_module(model, mesh, config)
    keep_root_unsharded_after_forward(model)
    setattr(model, MESH_ATTRIBUTE, mesh)
    return model


def keep_root_unsharded_after_forward(model: nn.Module) -> None:
    """FSDP2's own default for the root unit (embedding, final norm, lm_head): keep its
    parameters gathered from the end of the forward through the backward.

    ``parallelize_module`` passes ``reshard_after_forward`` to every unit, the root included;
    torchtitan's ``ChunkedLossWrapper`` applies ``lm_head`` *after* the forward, which needs the
    gathered weight (a resharded one is a DTensor the plain hidden states cannot multiply).
    """
    model.set_reshard_after_forward(False, recurse=False)


# --------------------------------------------------------------------------------------------
# the trainer: full sequences into the model, this rank's labels into the loss


def uses_attention_masks(model_config: Any) -> bool:
    """Whether the model's inner attention takes masks (flex, varlen) rather than is_causal."""
    if not isinstance(model_config, Decoder.Config) or model_config.first_attention is None:
        return False
    inner = getattr(model_config.first_attention, "inner_attention", None)
    return isinstance(inner, (FlexAttention.Config, VarlenAttention.Config))


def sequence_parallel_batch(
    model: nn.Module,
    model_config: Any,
    input_dict: dict[str, torch.Tensor],
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(inputs, labels, model kwargs) for one step of a model prepared by
    :func:`parallelize_llama_ulysses`.

    Inputs, positions and masks describe the *global* sequence (the model slices them); the
    labels are this rank's shard (the loss runs outside the model, on this rank's outputs).
    """
    inputs = input_dict["input"]
    extra: dict[str, Any] = {k: v for k, v in input_dict.items() if k != "input"}
    if uses_attention_masks(model_config):
        if extra.get("positions") is None:
            batch, seq_len = inputs.shape[:2]
            extra["positions"] = torch.arange(seq_len, device=inputs.device).expand(batch, seq_len)
        extra["attention_masks"] = model.get_attention_masks(positions=extra["positions"])
    mesh_sp = getattr(model, MESH_ATTRIBUTE)["sp"]
    labels = local_slice(labels, mesh_sp.get_local_rank(), mesh_sp.size(), labels.shape[1])
    return inputs, labels, extra


class UlyssesTrainer(Trainer):
    """torchtitan's Trainer with the data path of :func:`sequence_parallel_batch`.

    torchtitan's own ``post_dataloading_process`` would shard the sequence for context
    parallelism (``cp > 1``) before the model, which slices it again under Ulysses.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        inputs, labels, extra = sequence_parallel_batch(self.model_parts[0], self.model_config, input_dict, labels)
        self.ntokens_seen += labels.numel()  # this rank's tokens, as torchtitan counts after CP sharding
        return inputs, labels, extra


# --------------------------------------------------------------------------------------------
# model specs and config registry functions


def use_sdpa_attention(model_config: Decoder.Config) -> None:
    """Switch every layer's inner attention to torchtitan's ScaledDotProductAttention (causal)."""
    for layer in model_config.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()


def extend_rope(model_config: Decoder.Config, max_seq_len: int) -> None:
    """Let RoPE cover ``max_seq_len`` positions (the trainer refuses a longer ``seq_len``)."""
    for layer in model_config.layers:
        if layer.attention.rope.max_seq_len < max_seq_len:
            layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=max_seq_len)


def model_spec(flavor: str, *, attention: str = "flex", max_seq_len: int | None = None) -> ModelSpec:
    """torchtitan's Llama3 ``flavor`` with :func:`parallelize_llama_ulysses`.

    ``attention``: "flex" (torchtitan's default: block-causal over the documents of a packed
    sequence) or "sdpa" (causal over the whole packed sequence; the path with a backward on CPU).
    """
    if attention not in ("flex", "sdpa"):
        raise ValueError(f"attention must be 'flex' or 'sdpa', got {attention!r}")
    config = llama3_configs[flavor](attn_backend="flex")
    if attention == "sdpa":
        use_sdpa_attention(config)
    if max_seq_len is not None:
        extend_rope(config, max_seq_len)
    return ModelSpec(
        name="llama3",
        flavor=flavor,
        model=config,
        parallelize_fn=parallelize_llama_ulysses,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=Llama3StateDictAdapter,
    )


def trainer_config(
    spec: ModelSpec,
    *,
    seq_len: int,
    sp: int,
    lr: float,
    steps: int,
    ac: ActivationCheckpointingConfig,
    compile_model: bool,
    dataset: str,
    hf_assets_path: str,
) -> UlyssesTrainer.Config:
    """The settings all configs share: one sequence per dp replica, Ulysses over ``sp`` ranks
    (torchtitan's ``context_parallel_degree``), float32 FSDP (see :func:`check_parallel_dims`)."""
    return UlyssesTrainer.Config(
        model_spec=spec,
        hf_assets_path=hf_assets_path,
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=spec.model.vocab_size),
        ),
        optimizer=default_adamw(lr=lr),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=max(1, steps // 10)),
        training=TrainingConfig(
            local_batch_size=1,
            seq_len=seq_len,
            steps=steps,
            dtype="float32",
            mixed_precision_param="float32",
        ),
        dataloader=HuggingFaceTextDataLoader.Config(dataset=dataset),
        metrics=MetricsProcessor.Config(log_freq=1),
        parallelism=ParallelismConfig(context_parallel_degree=sp, spmd_backend="partial_dtensor"),
        activation_checkpoint=ac,
        compile=CompileConfig(enable=compile_model, components=["model", "loss"]),
        validator=Validator.Config(enable=False),
    )


def llama3_debugmodel() -> UlyssesTrainer.Config:
    """Llama3 debugmodel (dim 256, 16 heads, 6 layers) at 8K tokens, sp = 2, flex attention
    (block-causal over the packed documents, like torchtitan's ``llama3_debugmodel``)."""
    return trainer_config(
        model_spec("debugmodel", attention="flex"), seq_len=DEBUG_SEQ_LEN, sp=2, lr=8e-4, steps=10,
        ac=SelectiveAC.Config(), compile_model=False, dataset="c4_test", hf_assets_path="./tests/assets/tokenizer",
    )


def llama3_debugmodel_sdpa() -> UlyssesTrainer.Config:
    """The debugmodel with SDPA inner attention (causal over the whole packed sequence)."""
    config = llama3_debugmodel()
    config.model_spec = model_spec("debugmodel", attention="sdpa")
    return config


def llama3_8b() -> UlyssesTrainer.Config:
    """Llama 3.1 8B at 128K tokens, sp = 8 (16K tokens per rank), SDPA, selective AC."""
    return trainer_config(
        model_spec("8B", attention="sdpa", max_seq_len=LLAMA3_8B_SEQ_LEN), seq_len=LLAMA3_8B_SEQ_LEN, sp=8,
        lr=3e-4, steps=1000, ac=SelectiveAC.Config(), compile_model=False, dataset="c4",
        hf_assets_path="./assets/hf/Llama-3.1-8B",
    )


def llama3_70b() -> UlyssesTrainer.Config:
    """Llama 3.1 70B at 256K tokens, sp = 16 (16K tokens per rank), SDPA, full AC."""
    return trainer_config(
        model_spec("70B", attention="sdpa", max_seq_len=LLAMA3_70B_SEQ_LEN), seq_len=LLAMA3_70B_SEQ_LEN, sp=16,
        lr=1.5e-4, steps=1000, ac=FullAC.Config(), compile_model=False, dataset="c4",
        hf_assets_path="./assets/hf/Llama-3.1-70B",
    )


CONFIGS: dict[str, Callable[[], UlyssesTrainer.Config]] = {
    "llama3_debugmodel": llama3_debugmodel,
    "llama3_debugmodel_sdpa": llama3_debugmodel_sdpa,
    "llama3_8b": llama3_8b,
    "llama3_70b": llama3_70b,
}
