"""Training checkpoints with torch Distributed Checkpoint (DCP).

``<dir>/step_000123/`` holds the model and optimizer state (DCP: every rank writes its FSDP
shards; loading reshards, so a run saved on one (dp, sp) layout resumes on another) and
``train_state.json`` (step, metric history, the config that wrote it). A checkpoint counts only
once ``train_state.json`` exists, which rank 0 writes after every rank finished its shards: an
interrupted save is never picked up by :func:`latest_checkpoint`.
"""

from __future__ import annotations

import json
import os
import re

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

STATE_FILE = "train_state.json"


def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def latest_checkpoint(root: str) -> str | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    if not os.path.isdir(root):
        return None
    steps = [
        int(m.group(1))
        for name in os.listdir(root)
        if (m := re.fullmatch(r"step_(\d+)", name)) and os.path.exists(os.path.join(root, name, STATE_FILE))
    ]
    return checkpoint_path(root, max(steps)) if steps else None


def save_checkpoint(root: str, step: int, model, optimizer, history: list[dict], config: dict) -> str:
    """Collective: every rank saves its shards of model and optimizer state."""
    path = checkpoint_path(root, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "history": history, "config": config}, f)
        os.replace(tmp, os.path.join(path, STATE_FILE))
    dist.barrier()
    return path


def load_checkpoint(path: str, model, optimizer) -> dict:
    """Collective: load model and optimizer state in place (resharded to this layout); returns
    the saved ``train_state.json`` (step, history, config)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        meta = json.load(f)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta
