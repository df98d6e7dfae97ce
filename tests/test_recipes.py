"""Recipes: the torchtitan 0.3.0 recipe (config functions, parallelize_fn, UlyssesTrainer's data
path) and the Hugging Face example, on real gloo ranks against one process.

torchtitan's ``Trainer.__init__`` needs an accelerator (``torchtitan.tools.utils.device_type``
falls back to "cuda" and ``torch.cuda.set_device`` fails on a CPU build), so no full ``Trainer``
runs here. What runs is everything the recipe adds, inside torchtitan's own step code: the model
built from the recipe's config on the meta device, ``parallelize_fn`` with a real
``ParallelDims``, ``to_empty`` + ``init_weights`` as the trainer does, then the trainer's own
``post_dataloading_process`` (ours) and ``_forward_backward_body`` (torchtitan's, with its
``ChunkedLossWrapper`` loss) on an object holding the state ``Trainer.__init__`` would give them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO_ROOT, rel_err

N, B = 64, 2  # sequence length (two packed documents: 40 + 24 tokens) and sequences per dp replica
DOC = 40


def recipe():
    pytest.importorskip("torchtitan", reason="install the 'torchtitan' extra")
    import recipes.torchtitan_ulysses as R

    return R


# ---------------------------------------------------------------------------------------------
# config functions (no processes)


@pytest.mark.parametrize("name", ["llama3_debugmodel", "llama3_debugmodel_sdpa", "llama3_8b", "llama3_70b"])
def test_config_function_builds_a_trainer_config(name):
    R = recipe()
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
    from torchtitan.trainer import Trainer

    config = getattr(R, name)()
    assert isinstance(config, R.UlyssesTrainer.Config) and isinstance(config, Trainer.Config)
    assert type(config)._owner is R.UlyssesTrainer  # config.build() makes our trainer
    spec = config.model_spec
    assert spec.parallelize_fn is R.parallelize_llama_ulysses and spec.pipelining_fn is None
    assert config.parallelism.spmd_backend == "partial_dtensor"
    assert config.parallelism.context_parallel_degree > 1  # = our sp
    assert config.training.mixed_precision_param == config.training.dtype
    inner = {type(layer.attention.inner_attention) for layer in spec.model.layers}
    assert inner == {FlexAttention.Config if name == "llama3_debugmodel" else ScaledDotProductAttention.Config}
    spec.model.update_from_config(config=config)  # what Trainer.__init__ runs: seq_len within RoPE
    assert all(layer.attention.rope.max_seq_len == config.training.seq_len for layer in spec.model.layers)
    heads = spec.model.layers[0].attention.n_heads
    assert heads % config.parallelism.context_parallel_degree == 0  # every sp rank owns heads


@pytest.mark.parametrize(
    "name,seq_len,dim,layers,heads,kv_heads",
    [("llama3_8b", 131072, 4096, 32, 32, 8), ("llama3_70b", 262144, 8192, 80, 64, 8)],
)
def test_llama3_long_context_shapes(name, seq_len, dim, layers, heads, kv_heads):
    config = getattr(recipe(), name)()
    model = config.model_spec.model
    attention = model.layers[0].attention
    assert (config.training.seq_len, model.dim, len(model.layers)) == (seq_len, dim, layers)
    assert (attention.n_heads, attention.n_kv_heads, model.vocab_size) == (heads, kv_heads, 128256)
    assert attention.rope.max_seq_len >= seq_len


def test_torchtitan_config_manager_loads_the_recipe_module():
    """``--module recipes.torchtitan_ulysses`` as torchtitan.train parses it, CLI overrides included."""
    R = recipe()
    from torchtitan.config import ConfigManager

    config = ConfigManager().parse_args([
        "--module", "recipes.torchtitan_ulysses", "--config", "llama3_8b",
        "--parallelism.context_parallel_degree", "4", "--training.steps", "3", "activation-checkpoint:none",
    ])
    assert isinstance(config, R.UlyssesTrainer.Config)
    assert config.parallelism.context_parallel_degree == 4 and config.training.steps == 3
    assert config.activation_checkpoint is None
    assert config.model_spec.parallelize_fn is R.parallelize_llama_ulysses


def _parallel_dims(dp: int, sp: int, **degrees):
    """torchtitan's ParallelDims for dp_shard = dp, cp = sp (and ``degrees``); no mesh is built."""
    from torchtitan.distributed import ParallelDims

    options = {**dict(dp_replicate=1, dp_shard=dp, cp=sp, tp=1, pp=1, ep=1), **degrees}
    world = options["dp_replicate"] * options["dp_shard"] * options["cp"] * options["tp"] * options["pp"]
    return ParallelDims(**options, world_size=world, spmd_backend="partial_dtensor")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"dims": {"tp": 2}}, "tensor_parallel_degree"),
        ({"dims": {"dp_replicate": 2}}, "data_parallel_replicate_degree"),
        ({"spmd_backend": "spmd_types"}, "spmd_backend partial_dtensor"),
        ({"mixed_precision_param": "bfloat16"}, "mixed-precision"),
        ({"enable_cpu_offload": True}, "enable_cpu_offload"),
    ],
)
def test_parallelize_fn_refuses_what_it_cannot_do(change, message):
    """Refused before any collective or mesh (no process group needed)."""
    R = recipe()
    config = R.llama3_debugmodel_sdpa()
    config.parallelism.spmd_backend = change.get("spmd_backend", "partial_dtensor")
    config.training.mixed_precision_param = change.get("mixed_precision_param", "float32")
    config.training.enable_cpu_offload = change.get("enable_cpu_offload", False)
    dims = _parallel_dims(1, 2, **change.get("dims", {}))
    with pytest.raises(ValueError, match=message):
        R.parallelize_llama_ulysses(
            torch.nn.Module(), parallel_dims=dims, training=config.training, parallelism=config.parallelism,
            compile_config=config.compile, ac_config=config.activation_checkpoint, dump_folder="",
        )


# ---------------------------------------------------------------------------------------------
# parallelize_fn + UlyssesTrainer data path + torchtitan's step, on 4 gloo ranks vs one process


def _config(name: str, ac: str, compile_backend: str | None, n_layers: int | None):
    """The recipe's config at test size, with the model config updated as Trainer.__init__ does."""
    R = recipe()
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    config = R.CONFIGS[name]()
    config.training.seq_len = N
    config.activation_checkpoint = {"none": None, "full": FullAC.Config(), "selective": SelectiveAC.Config()}[ac]
    config.compile = CompileConfig(enable=compile_backend is not None, backend=compile_backend or "inductor", components=["model"])
    if n_layers is not None:
        config.model_spec.model.layers = config.model_spec.model.layers[:n_layers]
    config.model_spec.model.update_from_config(config=config)
    return config


def _build(config):
    """The trainer's model build: on the meta device."""
    with torch.device("meta"):
        return config.model_spec.model.build()


def _materialize(model, buffer_device=None):
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=buffer_device)
    return model


def _plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def _copy_parameters(model, reference) -> None:
    """The single-process weights into the FSDP-sharded model (DTensor shards)."""
    from torch.distributed.tensor import distribute_tensor

    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(distribute_tensor(ref_params[_plain_name(name)].detach(), param.device_mesh, param.placements))


def _global_batch(dp: int):
    """Inputs, labels (a few ignored) and per-document positions, as torchtitan's loader yields."""
    tokens = torch.randint(0, 2048, (B * dp, N + 1), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 1:].clone()
    labels[:, :3] = -100
    positions = torch.cat([torch.arange(DOC), torch.arange(N - DOC)]).expand(B * dp, N)
    return tokens[:, :-1], labels, positions


def _step_trainer(trainer_cls, config, model, parallel_dims):
    """An object with the state Trainer.__init__ gives ``post_dataloading_process`` and
    ``_forward_backward_body`` (torchtitan/trainer.py: loss_fn built from the config, lm_head
    handed to ChunkedLossWrapper and skipped in the model's forward, train_context)."""
    from torchtitan.distributed import utils as dist_utils

    trainer = trainer_cls.__new__(trainer_cls)
    trainer.config, trainer.model_config, trainer.parallel_dims = config, config.model_spec.model, parallel_dims
    trainer.model_parts, trainer.ntokens_seen = [model], 0
    trainer.loss_fn = config.loss.build(compile_config=config.compile)
    trainer.loss_fn.set_lm_head(model.lm_head)
    model._skip_lm_head = True
    trainer.train_context = dist_utils.get_spmd_context(parallel_dims=parallel_dims)
    return trainer


def _rank_titan_step(ctx, name, dp, sp, ac, compile_backend=None, n_layers=None):
    """Forward logits, then one torchtitan training step (loss + backward) vs one process."""
    import torch.distributed as dist
    from torchtitan.trainer import Trainer

    import ulysses_dtensor as U

    R = recipe()
    config = _config(name, ac, compile_backend, n_layers)
    reference = _materialize(_build(config), buffer_device=torch.device("cpu"))
    dims = _parallel_dims(dp, sp)
    model = config.model_spec.parallelize_fn(
        _build(config), parallel_dims=dims, training=config.training, parallelism=config.parallelism,
        compile_config=config.compile, ac_config=config.activation_checkpoint, dump_folder="",
    )
    _materialize(model)  # as Trainer.__init__: to_empty + init_weights on the sharded model
    _copy_parameters(model, reference)
    mesh = getattr(model, R.MESH_ATTRIBUTE)
    inputs, labels, positions = _global_batch(dp)
    rows = slice(mesh["dp"].get_local_rank() * B, (mesh["dp"].get_local_rank() + 1) * B)
    errors = {}

    with torch.no_grad():
        local_inputs, _, kwargs = R.sequence_parallel_batch(model, config.model_spec.model, {"input": inputs[rows], "positions": positions[rows]}, labels[rows])
        logits = U.gather_sequence(model(local_inputs, **kwargs), mesh)
        errors["logits"] = rel_err(logits, reference(inputs, positions=positions)[rows])

    global_valid_tokens = (labels != -100).sum()  # what Trainer.train_step sums over the batch mesh
    ref_trainer = _step_trainer(Trainer, config, reference, _parallel_dims(1, 1))
    ref_loss = ref_trainer._forward_backward_body(*_reordered(ref_trainer.post_dataloading_process({"input": inputs, "positions": positions}, labels), global_valid_tokens))
    trainer = _step_trainer(R.UlyssesTrainer, config, model, dims)
    loss = trainer._forward_backward_body(*_reordered(trainer.post_dataloading_process({"input": inputs[rows], "positions": positions[rows]}, labels[rows]), global_valid_tokens))
    total = loss.detach().clone()
    dist.all_reduce(total)  # the trainer's global_avg_loss: the sum over the loss mesh (dp × cp)
    errors["loss"] = rel_err(total, ref_loss.detach())
    ref_params = dict(reference.named_parameters())
    errors["grads"] = max(rel_err(p.grad.full_tensor(), ref_params[_plain_name(n)].grad) for n, p in model.named_parameters())
    errors["ntokens_seen"] = trainer.ntokens_seen
    return errors


def _reordered(processed, global_valid_tokens):
    inputs, labels, kwargs = processed
    return inputs, labels, global_valid_tokens, kwargs


@pytest.mark.parametrize(
    "dp,sp,ac",
    [(2, 2, "none"), (1, 4, "selective"), (2, 2, "full")],
)
def test_sdpa_debugmodel_step_matches_one_process(ranks4, dp, sp, ac):
    """(dp, sp) = (2, 2) and (1, 4), with torchtitan's activation checkpointing: forward logits,
    the step's loss and every gradient ≤ 1e-5 (float32); labels cut to this rank's tokens."""
    for errors in ranks4.run(_rank_titan_step, "llama3_debugmodel_sdpa", dp, sp, ac, timeout_s=300):
        assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5 and errors["grads"] <= 1e-5, errors
        assert errors["ntokens_seen"] == B * N // sp


@pytest.mark.parametrize("ac", ["none", "full"])
def test_compiled_blocks_match_one_process(ranks4, ac):
    """``--compile.enable`` (torchtitan's per-block compile; aot_eager here, 1 layer for time),
    alone and with torchtitan's full activation checkpointing."""
    for errors in ranks4.run(_rank_titan_step, "llama3_debugmodel_sdpa", 2, 2, ac, "aot_eager", 1, timeout_s=300):
        assert errors["logits"] <= 1e-5 and errors["loss"] <= 1e-5 and errors["grads"] <= 1e-5, errors


def _rank_flex_forward(ctx, dp, sp):
    """The flex debugmodel: the BlockMask of the *global* packed sequence (two documents),
    built by UlyssesTrainer's data path; forward only (torch has no flex backward on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import torchtitan.models.common.decoder as decoder
    from torchtitan.models.common.attention import FlexAttention

    import ulysses_dtensor as U

    FlexAttention._compiled_flex_attn = staticmethod(flex_attention)  # eager: no per-rank Inductor compile
    decoder.create_attention_mask = create_block_mask
    R = recipe()
    config = _config("llama3_debugmodel", "none", None, None)
    reference = _materialize(_build(config), buffer_device=torch.device("cpu"))
    model = config.model_spec.parallelize_fn(
        _build(config), parallel_dims=_parallel_dims(dp, sp), training=config.training,
        parallelism=config.parallelism, compile_config=config.compile, ac_config=None, dump_folder="",
    )
    _copy_parameters(_materialize(model), reference)
    mesh = getattr(model, R.MESH_ATTRIBUTE)
    inputs, labels, positions = _global_batch(dp)
    rows = slice(mesh["dp"].get_local_rank() * B, (mesh["dp"].get_local_rank() + 1) * B)
    with torch.no_grad():
        local_inputs, local_labels, kwargs = R.sequence_parallel_batch(model, config.model_spec.model, {"input": inputs[rows], "positions": positions[rows]}, labels[rows])
        out = U.gather_sequence(model(local_inputs, **kwargs), mesh)
        expected = reference(inputs, positions=positions, attention_masks=reference.get_attention_masks(positions))
    sp_rank = mesh["sp"].get_local_rank()
    return {
        "logits": rel_err(out, expected[rows]),
        "labels": torch.equal(local_labels, labels[rows].chunk(sp, dim=1)[sp_rank]),
    }


def test_flex_debugmodel_document_masks_forward_matches(ranks4):
    for errors in ranks4.run(_rank_flex_forward, 2, 2, timeout_s=300):
        assert errors["logits"] <= 1e-5 and errors["labels"], errors


# ---------------------------------------------------------------------------------------------
# the Hugging Face example


def _hf_options(**changes):
    pytest.importorskip("transformers", reason="install the 'hf' extra")
    from recipes import hf_llama

    options = dict(world=4, dp=2, steps=3, batch=4, seq_len=48, vocab=256, dim=64, layers=2, heads=4, kv_heads=2)
    options.update(changes)
    return hf_llama, hf_llama.Options(**options)


@pytest.mark.parametrize("memory_stack", ["auto", "on"])
def test_hf_llama_example_loss_matches_one_process(ranks4, memory_stack):
    """The example's loop on (dp, sp) = (2, 2): every step's loss (the global mean, the same on
    all ranks) equals the single-process run of the same loop, AdamW updates included; also with
    the whole memory stack (offload, tiled MLPs and norms, head chunks)."""
    hf_llama, options = _hf_options(memory_stack=memory_stack)
    config = hf_llama.memory_config(options, 2)
    stack = (config.activation_checkpointing, config.tiled_tokenwise, config.head_chunks)
    assert stack == (("none", False, 1) if memory_stack == "auto" else ("offload", True, 2))  # CPU: no cap
    expected = hf_llama.train(options, mesh=None, log=None)
    assert len(set(expected)) == len(expected)  # the steps change the model
    for losses in ranks4.run(hf_llama.train_on_rank, options, timeout_s=300):
        assert len(losses) == options.steps
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, expected)) <= 1e-5, (losses, expected)


def test_hf_llama_help():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "recipes" / "hf_llama.py"), "--help"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0 and "usage" in result.stdout and "--dp" in result.stdout, result.stderr
    words = " ".join(result.stdout.split())  # argparse wraps the help text
    assert "--memory-stack" in words and "activation offload, tiled MLPs and norms" in words
