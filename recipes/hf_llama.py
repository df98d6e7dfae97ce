"""Hugging Face example: train a small random-init Llama with Ulysses sequence parallelism.

A plain PyTorch training loop — ``LlamaForCausalLM`` with ``attn_implementation="sdpa"``, AdamW,
synthetic token sequences, no downloads — made sequence parallel by one call,
``ulysses_dtensor.parallelize_module(model, mesh)``, which also applies FSDP2 over all dp × sp ranks.
Every rank of a dp replica feeds the replica's full batch; the model keeps its own N/sp tokens,
and ``out.loss`` is the global token-weighted mean, the same number on every rank and equal to the
single-process loss of the whole global batch.

    python recipes/hf_llama.py --world 4 --dp 2 --steps 5          # 4 local gloo ranks (CPU)
    torchrun --nproc_per_node 4 recipes/hf_llama.py --dp 2         # under torchrun (gloo, or nccl on GPUs)
    python recipes/hf_llama.py --world 1                           # one process, no parallelism
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist

if __package__ in (None, ""):  # run as a script: make `ulysses_dtensor` importable from the repo
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ulysses_dtensor as U  # noqa: E402
from ulysses_dtensor.tools.rank_group import RankGroup  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class Options:
    """What to train. The defaults run in seconds on a CPU."""

    world: int = 4  # local ranks to spawn (ignored under torchrun)
    dp: int = 1  # data-parallel replicas; sp = world // dp
    steps: int = 5
    batch: int = 2  # global batch (sequences per step), split over dp
    seq_len: int = 256
    vocab: int = 1024
    dim: int = 128
    layers: int = 2
    heads: int = 8
    kv_heads: int = 2
    lr: float = 1e-3
    dtype: str = "float32"
    seed: int = 0
    # the memory stack (docs/parallelize.md): "auto" asks the planner for the cheapest options
    # whose step fits --memory-cap-gib (default: the GPU's memory less 2 GiB; on CPU no cap, so
    # none); "on" always (offload, tiled MLPs and norms, one head at a time); "off" never
    memory_stack: str = "auto"
    memory_cap_gib: float = 0.0


def parse_options(argv: list[str] | None = None) -> Options:
    defaults = Options()
    parser = argparse.ArgumentParser(
        description="Train a random-init Hugging Face Llama with Ulysses sequence parallelism "
        "(ulysses_dtensor.parallelize_module) on synthetic tokens; prints the loss per step."
    )
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "dtype":
            parser.add_argument(flag, choices=sorted(DTYPES), default=value, help=f"model dtype (default {value})")
        elif name == "memory_stack":
            parser.add_argument(flag, choices=("auto", "on", "off"), default=value, help=(
                "long-sequence memory options: auto (the cheapest that fits --memory-cap-gib, by "
                "ulysses-dtensor plan's estimate), on (activation offload, tiled MLPs and norms, head chunks), "
                f"off (default {value})"))
        elif name == "memory_cap_gib":
            parser.add_argument(flag, type=float, default=value,
                                help="per-device memory the step must fit (0: the GPU's memory less 2 GiB; no cap on CPU)")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"(default {value})")
    return Options(**vars(parser.parse_args(argv)))


def build_model(opts: Options) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` (SDPA attention), identical on every rank (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=opts.vocab,
        hidden_size=opts.dim,
        intermediate_size=4 * opts.dim,
        num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads,
        num_key_value_heads=opts.kv_heads,
        max_position_embeddings=opts.seq_len,
        attn_implementation="sdpa",
    )
    torch.manual_seed(opts.seed)
    return LlamaForCausalLM(config).to(DTYPES[opts.dtype])


def memory_config(opts: Options, sp: int) -> U.UlyssesConfig:
    """``UlyssesConfig`` with the memory stack ``--memory-stack`` asks for (the planner's Llama
    model of this HF config decides "auto")."""
    from ulysses_dtensor.tools.llama import LlamaConfig
    from ulysses_dtensor.tools.planner import MemoryStack, choose_stack, device_memory_cap, memory_stacks

    shape = LlamaConfig(vocab_size=opts.vocab, dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads,
                        n_kv_heads=opts.kv_heads, ffn_dim=4 * opts.dim)
    stacks = memory_stacks(shape)
    if opts.memory_stack == "on":
        stack = stacks[-1]
    elif opts.memory_stack == "off":
        stack = MemoryStack("none")
    else:
        precision = "bf16" if opts.dtype == "bfloat16" else "float32"
        stack, _ = choose_stack(shape, opts.seq_len, opts.dp, sp, stacks,
                                device_memory_cap(opts.memory_cap_gib), precision=precision,
                                batch=max(1, opts.batch // opts.dp))
    return U.UlyssesConfig(activation_checkpointing=stack.ac, tiled_tokenwise=stack.tiled,
                           head_chunks=stack.chunks_at(-(-opts.heads // sp)))


def synthetic_batches(opts: Options) -> list[torch.Tensor]:
    """``steps`` global batches (batch, seq_len), the same on every rank: each sequence counts up
    (mod vocab) from a random start, a pattern the model learns in a few steps."""
    generator = torch.Generator().manual_seed(opts.seed + 1)
    counting = torch.arange(opts.seq_len)
    return [
        (torch.randint(0, opts.vocab, (opts.batch, 1), generator=generator) + counting) % opts.vocab
        for _ in range(opts.steps)
    ]


def replica_rows(batch: torch.Tensor, mesh) -> torch.Tensor:
    """This dp replica's sequences of the global batch (all of it without a mesh)."""
    if mesh is None:
        return batch
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    if batch.shape[0] % dp:
        raise ValueError(f"global batch {batch.shape[0]} does not split over dp={dp}")
    rows = batch.shape[0] // dp
    return batch[dp_rank * rows : (dp_rank + 1) * rows]


def train(opts: Options, mesh=None, log: Callable[[str], None] | None = print) -> list[float]:
    """The training loop; with a (dp, sp) ``mesh`` the model is made sequence parallel first.

    Returns the loss of every step (the global mean: the same on every rank).
    """
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(opts).to(device)
    if mesh is not None:
        model = U.parallelize_module(model, mesh, memory_config(opts, mesh["sp"].size()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    losses = []
    for step, batch in enumerate(synthetic_batches(opts), start=1):
        tokens = replica_rows(batch, mesh).to(device)
        loss = model(input_ids=tokens, labels=tokens).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log is not None:
            log(f"step {step}  loss {losses[-1]:.6f}")
    return losses


def train_on_rank(ctx, opts: Options) -> list[float]:
    """One rank of a :class:`~ulysses_dtensor.tools.rank_group.RankGroup` (all its ranks): train on the
    (dp, sp) mesh of the whole group; rank 0 prints."""
    mesh = U.init_mesh(dp=opts.dp, device_type="cpu")
    return train(opts, mesh, log=print if ctx.rank == 0 else None)


def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            world = dist.get_world_size()
            mesh = U.init_mesh(dp=opts.dp) if world > 1 else None
            train(opts, mesh, log=print if dist.get_rank() == 0 else None)
        finally:
            dist.destroy_process_group()
    elif opts.world == 1:
        train(opts)
    else:
        with RankGroup(opts.world, call_timeout_s=3600) as ranks:
            ranks.run(train_on_rank, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
