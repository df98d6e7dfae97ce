"""``ulysses-dtensor train``: train a Llama-style model with Ulysses sequence parallelism.

Launches its own ranks (gloo on CPU, NCCL on GPU) or runs under ``torchrun``; builds the
(dp, sp) mesh, the model, ``parallelize_module`` (FSDP2 over dp × sp) and AdamW; trains on the
embedded retrieval task (:class:`~ulysses_dtensor.tools.data.RetrievalTask`) with a length curriculum
up to ``seq_len``, or on a local text; evaluates; checkpoints with torch DCP and resumes exactly,
also on another (dp, sp) layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

from .dcp_checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..activation_checkpoint import MODES as CHECKPOINTING_MODES
from ..comm_counter import CollectiveCounter
from .data import RetrievalTask, TextTask, step_generator
from ..hybrid import hybrid_elements_sent
from ..inputs import IGNORE_INDEX, local_slice
from ..layout import UlyssesLayout
from .llama import Llama, llama_config
from ..mesh import init_mesh
from ..parallelize import UlyssesConfig, check_compile_options, handle_of, parallelize_module
from .progress import Progress

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Options of ``ulysses-dtensor train`` (each is a ``--flag``)."""

    sp: int = _opt(4, "sequence-parallel degree")
    dp: int = _opt(1, "data-parallel degree (ranks = dp × sp)")
    model: str = _opt("tiny", "model flavor (llama.FLAVORS)")
    seq_len: int = _opt(8192, "final (global) sequence length")
    curriculum: str = _opt("auto", "'auto' (lengths doubling from 128), 'none' (--steps at --seq-len) or 'len:steps,len:steps,...'")
    steps: int = _opt(300, "training steps when --curriculum none")
    tokens_per_step: int = _opt(2048, "global tokens per step; batch = tokens_per_step // length")
    lr: float = _opt(3e-3, "peak AdamW learning rate (linear warmup, cosine decay to 10%)")
    warmup: int = _opt(50, "warmup steps")
    seed: int = _opt(0, "seed of the initial parameters and of every batch")
    dtype: str = _opt("float32", "parameter dtype: float32 or float64")
    text: str = _opt("", "train on a local text file / datasets dir instead of the retrieval task")
    eval_batches: int = _opt(16, "held-out batches at seq_len for the final accuracy")
    local_attention_only: bool = _opt(False, "ablation: attention restricted to each rank's shard")
    activation_checkpointing: str = _opt(
        "auto", "auto (the memory stack below), none, selective (recompute all but the all-to-alls and the attention "
                "kernel), full, or offload (full, block inputs in host memory)")
    tiled_tokenwise: str = _opt("auto", "MLPs and norms in sequence tiles: auto, yes or no")
    head_chunks: int = _opt(0, "query heads per rank in this many chunks (0: auto)")
    compile: bool = _opt(False, "torch.compile each transformer block (fullgraph, after activation checkpointing, "
                                "before FSDP2: UlyssesConfig(compile=True))")
    memory_cap_gib: float = _opt(
        0.0, "memory stack: 'auto' options take the cheapest combination (ulysses-dtensor plan's order) whose "
             "step fits this many GiB per device at the longest curriculum length; 0: the GPU's memory less 2 GiB "
             "on CUDA, no cap on CPU (then: no checkpointing, no tiling, no head chunks)")
    checkpoint_dir: str = _opt("", "directory for DCP checkpoints (none if empty)")
    checkpoint_every: int = _opt(0, "steps between checkpoints (0: only at the end)")
    resume: bool = _opt(False, "continue from the latest checkpoint in --checkpoint-dir")
    stop_after: int = _opt(0, "stop (after checkpointing) once this many steps are done; 0: run all")
    out_dir: str = _opt("runs/train", "where metrics.jsonl, summary.json and the PNGs go")
    plot: bool = _opt(False, "write loss/accuracy PNGs to --out-dir")
    log_every: int = _opt(10, "steps between progress lines (with bytes and memory counted)")
    collective_timeout_s: float = _opt(300.0, "a collective waiting longer than this fails the run")


# options that shape the data, the model or the schedule: a resume that changes them diverges
SCHEDULE_FIELDS = ("model", "seq_len", "curriculum", "steps", "tokens_per_step", "lr", "warmup", "seed", "dtype", "text")


@dataclass(frozen=True)
class Phase:
    seq_len: int
    steps: int
    batch: int


def build_phases(cfg: TrainConfig) -> list[Phase]:
    """The length curriculum: (length, steps, global batch) per phase."""
    if cfg.curriculum == "none":
        plan = [(cfg.seq_len, cfg.steps)]
    elif cfg.curriculum == "auto":
        lengths = [cfg.seq_len]
        while lengths[0] > 128:
            lengths.insert(0, lengths[0] // 2)
        # Most learning happens at short, cheap lengths; each doubling then re-sharpens attention.
        plan = [(n, 600 if i == 0 else 500 if n == cfg.seq_len else 200 if n == cfg.seq_len // 2 else
                 100 if n < 2048 else 150) for i, n in enumerate(lengths)]
    else:
        try:
            plan = [tuple(int(x) for x in part.split(":")) for part in cfg.curriculum.split(",")]
        except ValueError:
            raise ValueError(f"--curriculum {cfg.curriculum!r}: expected 'auto', 'none' or 'len:steps,len:steps'")
    phases = []
    for n, steps in plan:
        batch = max(1, cfg.tokens_per_step // n)
        batch = cfg.dp * -(-batch // cfg.dp)  # every data-parallel replica gets the same rows
        phases.append(Phase(n, steps, batch))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    for p in phases:
        if step < p.steps:
            return p
        step -= p.steps
    raise IndexError("step past the schedule")


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Warmup-stable-decay: linear warmup, constant, then linear decay to 10% over the last 20%
    of the steps (which the curriculum spends at the full length: it learns there at full rate)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup))
    decay_start = int(0.8 * total)
    decay = 1.0 if step < decay_start else 1.0 - 0.9 * (step - decay_start) / max(1, total - decay_start)
    return cfg.lr * warm * decay


def check_config(cfg: TrainConfig, task, phases: list[Phase]) -> None:
    """Refuse bad options before any process group exists."""
    if cfg.sp < 1 or cfg.dp < 1:
        raise ValueError(f"--sp and --dp must be >= 1, got sp={cfg.sp}, dp={cfg.dp}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
    if cfg.activation_checkpointing not in ("auto", *CHECKPOINTING_MODES):
        raise ValueError(f"--activation-checkpointing must be auto or one of {CHECKPOINTING_MODES}")
    if cfg.tiled_tokenwise not in ("auto", "yes", "no"):
        raise ValueError(f"--tiled-tokenwise must be auto, yes or no, got {cfg.tiled_tokenwise!r}")
    if cfg.head_chunks < 0 or cfg.memory_cap_gib < 0:
        raise ValueError("--head-chunks and --memory-cap-gib must be >= 0 (0: automatic)")
    # the library's own check, before any process group ("auto" options are checked once chosen)
    check_compile_options(UlyssesConfig(
        compile=cfg.compile, head_chunks=max(cfg.head_chunks, 1),
        activation_checkpointing="none" if cfg.activation_checkpointing == "auto" else cfg.activation_checkpointing))
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    if cfg.resume and latest_checkpoint(cfg.checkpoint_dir) is None:
        raise ValueError(f"--resume: no complete checkpoint in {cfg.checkpoint_dir}")
    for p in phases:
        if p.seq_len < cfg.sp:
            raise ValueError(f"curriculum length {p.seq_len} is shorter than sp={cfg.sp}")
        task.check_layout(p.seq_len, cfg.sp)
    model = llama_config(cfg.model)
    if model.n_heads % model.n_kv_heads:
        raise ValueError(f"model {cfg.model}: n_heads must be a multiple of n_kv_heads")


def resolve_memory_stack(cfg: TrainConfig, task) -> TrainConfig:
    """``cfg`` with every "auto" memory option decided: the cheapest stack of
    :func:`planner.memory_stacks` (pinned options kept) whose estimated step at the longest
    curriculum phase fits ``--memory-cap-gib`` (or the GPU's memory less 2 GiB); the cheapest
    without a cap. Prints the choice."""
    from .planner import PRECISIONS, Precision, choose_stack, device_memory_cap, memory_stacks

    auto = cfg.activation_checkpointing == "auto" or cfg.tiled_tokenwise == "auto" or cfg.head_chunks == 0
    if not auto:
        return cfg
    tiled = {"auto": None, "yes": True, "no": False}[cfg.tiled_tokenwise]
    model_cfg = llama_config(cfg.model, vocab_size=task.vocab_size)
    stacks = memory_stacks(model_cfg, cfg.activation_checkpointing, tiled, cfg.head_chunks)
    last = build_phases(cfg)[-1]
    precision = PRECISIONS["float32"] if cfg.dtype == "float32" else Precision("float64", 8, 8, 8, 16, 8, 8)
    chosen, why = choose_stack(model_cfg, last.seq_len, cfg.dp, cfg.sp, stacks, device_memory_cap(cfg.memory_cap_gib),
                               precision=precision, batch=max(1, last.batch // cfg.dp), loss="full")
    heads_per_rank = -(-model_cfg.n_heads // cfg.sp)
    try:
        check_compile_options(UlyssesConfig(compile=cfg.compile, activation_checkpointing=chosen.ac,
                                            head_chunks=chosen.chunks_at(heads_per_rank)))
    except ValueError as e:
        raise ValueError(f"--compile: the memory stack that fits is {chosen.describe(heads_per_rank)}: {e}; "
                         "drop --compile or pin --activation-checkpointing (none/selective/full) and --head-chunks 1") from e
    print(f"ulysses-dtensor train: memory stack: {chosen.describe(heads_per_rank)} ({why})", flush=True)
    return replace(cfg, activation_checkpointing=chosen.ac, tiled_tokenwise="yes" if chosen.tiled else "no",
                   head_chunks=chosen.chunks_at(heads_per_rank))


def make_task(cfg: TrainConfig):
    return TextTask.load(cfg.text) if cfg.text else RetrievalTask()


def train_rank(cfg: TrainConfig) -> dict:
    """The training loop on one rank of an initialized process group; returns the summary."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_mesh(cfg.dp, cfg.sp, device.type)
    dp_rank, sp_rank = mesh["dp"].get_local_rank(), mesh["sp"].get_local_rank()
    task = make_task(cfg)
    phases = build_phases(cfg)
    total = sum(p.steps for p in phases)
    model_cfg = llama_config(cfg.model, vocab_size=task.vocab_size, max_seq_len=max(p.seq_len for p in phases))
    torch.manual_seed(cfg.seed)  # identical initial parameters on every rank
    model = Llama(model_cfg).to(device=device, dtype=DTYPES[cfg.dtype])
    parallelize_module(model, mesh, UlyssesConfig(
        local_attention_only=cfg.local_attention_only, activation_checkpointing=cfg.activation_checkpointing,
        tiled_tokenwise=cfg.tiled_tokenwise == "yes", head_chunks=max(cfg.head_chunks, 1), compile=cfg.compile))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)

    history: list[dict] = []
    start = 0
    if cfg.resume:
        found = latest_checkpoint(cfg.checkpoint_dir)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {cfg.checkpoint_dir}")
        meta = load_checkpoint(found, model, optimizer)
        start, history = meta["step"], meta["history"][: meta["step"]]
        changed = {k: (meta["config"].get(k), v) for k, v in asdict(cfg).items()
                   if k in SCHEDULE_FIELDS and meta["config"].get(k) != v}
        if changed and rank == 0:
            print(f"warning: resuming with options that differ from the checkpoint's (saved → now): {changed}; "
                  "the continuation is not the uninterrupted run's", flush=True)
    # a step's cost for the ETA: a fixed overhead plus attention's B·N² (a rough fit on CPU)
    cost = [1 + p.batch * p.seq_len**2 / 1.5e7 for p in phases for _ in range(p.steps)]
    progress = Progress(total, start, enabled=rank == 0, step_cost=cost)
    if rank == 0:
        progress.say(_banner(cfg, model_cfg, phases, world, start))

    stop = min(total, cfg.stop_after) if cfg.stop_after else total
    done = start
    stop_signal = _catch_stop_signals()
    fault = _injected_fault(rank)
    for step in range(start, stop):
        if step == fault:
            raise RuntimeError(f"injected fault on rank {rank} at step {step + 1} ({FAULT_ENV})")
        phase = phase_at(phases, step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step, total)
        tokens, targets = task.batch(phase.batch, phase.seq_len, step_generator(cfg.seed, step))
        rows = slice(dp_rank * phase.batch // cfg.dp, (dp_rank + 1) * phase.batch // cfg.dp)
        tokens, targets = tokens[rows].to(device), targets[rows].to(device)
        count = cfg.log_every and (step % cfg.log_every == 0 or step == stop - 1)
        t0 = time.perf_counter()
        # with --compile the counted steps run the blocks eagerly: the counter is a dispatch mode,
        # which compiled code cannot run under; the collectives are the compiled graphs' own
        eager = torch.compiler.set_stance("force_eager") if count and cfg.compile else contextlib.nullcontext()
        with eager, CollectiveCounter() if count else contextlib.nullcontext() as counter:
            logits, loss = model(tokens, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - t0
        correct, scored = _correct(logits, local_slice(targets, sp_rank, cfg.sp, phase.seq_len))
        # the step's accuracy and whether any rank was asked to stop, in one all-reduce
        stats = torch.tensor([correct, scored, float(bool(stop_signal)), loss.item()], dtype=torch.float64)
        dist.all_reduce(stats[:3])
        record = dict(
            step=step + 1, seq_len=phase.seq_len, batch=phase.batch, loss=stats[3].item(),
            accuracy=(stats[0] / stats[1]).item() if stats[1] else float("nan"),
            tokens_per_s=phase.batch * phase.seq_len / seconds, lr=optimizer.param_groups[0]["lr"],
        )
        if count:
            record.update(_comm_and_memory(counter, model_cfg, phase, cfg, sp_rank, device, handle_of(model).ring_degree))
        history.append(record)
        progress.update(step + 1, record, force=bool(count))
        done = step + 1
        if stats[2] > 0:  # SIGTERM / SIGINT on some rank: every rank stops after this same step
            progress.say(f"stop requested: stopping after step {done}" + (", saving a checkpoint" if cfg.checkpoint_dir else ""))
            break
        if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < stop:
            save_checkpoint(cfg.checkpoint_dir, done, model, optimizer, history, asdict(cfg))
    if cfg.checkpoint_dir and done > start:
        save_checkpoint(cfg.checkpoint_dir, done, model, optimizer, history, asdict(cfg))
    summary = dict(steps=done, total_steps=total, history=history, chance=task.chance, interrupted=stop_signal.signum or 0)
    if done == total:
        summary["eval_accuracy"] = evaluate(model, task, cfg, phases[-1].seq_len, sp_rank, dp_rank, device)
    progress.close()
    return summary


# Testing hook for fault drills (tests/test_faults.py, scripts/soak.py): "RANK:STEP" makes that
# rank raise when it reaches that step (1-based), mid-run, while the others are in collectives.
FAULT_ENV = "ULYSSES_DTENSOR_INJECT_FAULT"


def _injected_fault(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, step = (int(x) for x in spec.split(":"))
    return step - 1 if fault_rank == rank else None


class _StopSignal:
    """Truthy once SIGTERM or SIGINT arrived: the loop finishes its step, checkpoints, returns."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def __call__(self, signum, frame) -> None:
        self.signum = signum


def _catch_stop_signals() -> _StopSignal:
    flag = _StopSignal()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, flag)
    return flag


def evaluate(model, task, cfg: TrainConfig, seq_len: int, sp_rank: int, dp_rank: int, device) -> float:
    """Accuracy on ``eval_batches`` held-out batches (stream 1) at ``seq_len``, all ranks."""
    correct = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            tokens, targets = task.batch(cfg.dp, seq_len, step_generator(cfg.seed, i, stream=1))
            tokens, targets = tokens[dp_rank : dp_rank + 1].to(device), targets[dp_rank : dp_rank + 1].to(device)
            logits = model(tokens)
            c, n = _correct(logits, local_slice(targets, sp_rank, cfg.sp, seq_len))
            correct += torch.tensor([c, n], dtype=torch.float64)
    dist.all_reduce(correct)
    return (correct[0] / correct[1]).item() if correct[1] else float("nan")


def _correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    scored = targets != IGNORE_INDEX
    hits = (logits.detach().argmax(-1) == targets) & scored
    return int(hits.sum()), int(scored.sum())


def _comm_and_memory(counter, model_cfg, phase: Phase, cfg: TrainConfig, sp_rank: int, device, ring: int) -> dict:
    """Per rank (lists indexed by global rank): bytes sent in the step (counted from the
    collectives issued), all-to-all bytes and their minimum, peak memory. Collective."""
    size = DTYPES[cfg.dtype].itemsize
    # ring: 1 for plain Ulysses, else the Ulysses × ring hybrid parallelize_module chose
    sent = hybrid_elements_sent(
        phase.batch // cfg.dp, model_cfg.n_heads, model_cfg.n_kv_heads, phase.seq_len, model_cfg.head_dim, cfg.sp,
        ring, sp_rank,
    )
    if cfg.head_chunks > 1 and ring == 1 and cfg.sp > 1:  # the chunked backward receives q, k, v again
        layout = UlyssesLayout.build(phase.batch // cfg.dp, model_cfg.n_heads, model_cfg.n_kv_heads, phase.seq_len,
                                     model_cfg.head_dim, cfg.sp)
        sent = (sent[0], layout.head_chunked_backward_elements_sent(sp_rank))
    # a recomputed forward exchanges again (offload with head chunks replays the attention outputs)
    recomputes = cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "offload"
                                                              and cfg.head_chunks <= 1)
    recomputed = sent[0] if recomputes else 0
    minimum = 0 if cfg.local_attention_only else model_cfg.n_layers * size * (sum(sent) + recomputed)
    mine = torch.tensor(
        [counter.bytes_sent(), counter.bytes_sent("all_to_all"), minimum, _peak_memory_mib(device)], dtype=torch.float64
    )
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    sent, a2a, a2a_min, peak = (list(col) for col in zip(*(t.tolist() for t in every)))
    return dict(
        collectives=dict(counter.counts()), bytes_sent=[int(x) for x in sent], all_to_all_bytes=[int(x) for x in a2a],
        all_to_all_min_bytes=[int(x) for x in a2a_min], peak_mem_mib=peak,
    )


def _peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _banner(cfg: TrainConfig, model_cfg, phases: list[Phase], world: int, start: int) -> str:
    task = f"text {cfg.text}" if cfg.text else "retrieval (answers on other sp shards than their queries)"
    curriculum = " → ".join(f"{p.seq_len}×{p.steps}" for p in phases)
    lines = [
        f"ulysses-dtensor train: {world} ranks (dp={cfg.dp} × sp={cfg.sp}), model {cfg.model} "
        f"({model_cfg.num_params() / 1e6:.2f} M params, {model_cfg.n_heads} heads / {model_cfg.n_kv_heads} kv), "
        f"{cfg.dtype}",
        f"task: {task}; curriculum (length×steps): {curriculum}",
    ]
    if cfg.local_attention_only:
        lines.append("ABLATION: attention restricted to each rank's own shard")
    if start:
        lines.append(f"resumed at step {start}")
    return "\n".join(lines)


def write_outputs(cfg: TrainConfig, summary: dict) -> list[str]:
    """metrics.jsonl and summary.json in ``out_dir`` (and PNGs with ``plot``); returns the paths."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    paths = [os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "summary.json")]
    with open(paths[0], "w") as f:
        for record in summary["history"]:
            f.write(json.dumps(record) + "\n")
    with open(paths[1], "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "history"} | {"config": asdict(cfg)}, f, indent=2)
    if cfg.plot:
        from .plot import plot_history

        paths += plot_history(summary["history"], cfg.out_dir, chance=summary["chance"])
    return paths


def run_train(cfg: TrainConfig) -> dict:
    """Check the options, run :func:`train_rank` on dp × sp ranks (own processes, or the ranks of
    a surrounding torchrun), write the outputs; returns rank 0's summary."""
    from .launcher import init_from_env, run_ranks, under_torchrun

    task = make_task(cfg)
    check_config(cfg, task, build_phases(cfg))
    cfg = resolve_memory_stack(cfg, task)
    world = cfg.dp * cfg.sp
    if under_torchrun():
        if int(os.environ["WORLD_SIZE"]) != world:
            raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks but dp × sp = {world}")
        init_from_env(cfg.collective_timeout_s)
        summary = train_rank(cfg)
        if dist.get_rank() != 0:
            return summary
    else:
        summary = run_ranks(train_rank, world, cfg, timeout_s=cfg.collective_timeout_s)
    summary["outputs"] = write_outputs(cfg, summary)
    return summary
