"""Hugging Face transformers: "sdpa" attention as Ulysses, with masks of the global sequence.

On the propagation path (eager, the default) HF's own SDPA attention and mask builders run on
``Shard(seq)`` DTensors and see the global sequence, and ``F.scaled_dot_product_attention`` is
routed to Ulysses attention. Only the causal mask builders (``create_causal_mask``,
``create_sliding_window_causal_mask``, as the model's modules bound them) are wrapped for the
forward's duration (``propagated_forward``): where HF would materialize a (B, 1, N, N) sliding-
window or padding mask they return a :class:`~ulysses_dtensor.masks.CausalMask` structure
instead, which the local kernel computes from. Masks they cannot describe (packed position
resets, custom or/and mask functions, a KV cache) are HF's own, dense.

The local-tensor path (under torch.compile, or ``UlyssesConfig(propagation=False)``) runs the
model on N/P tokens, where HF would build masks of this rank's block only. So a parallelized HF
model is switched to the attention implementation "ulysses_sdpa": HF's SDPA attention function
with a mask function that builds the global causal mask (``None``: plain ``is_causal``), and
refuses what it cannot build (sliding windows shorter than N, padding). Propagated forwards set
the implementation back to "sdpa" for their duration (``native_sdpa``), since some models branch
on that literal name (Falcon).
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .masks import CausalMask, valid_runs
from .namespaces import model_namespaces, rebound
from .rewrite import active_mode

IMPLEMENTATION = "ulysses_sdpa"

# config attributes holding a mixture-of-experts' expert count
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "_attn_implementation")


def expert_count(model: nn.Module) -> int | None:
    """The number of experts of a mixture-of-experts config, or None."""
    value = next((getattr(model.config, n) for n in EXPERT_COUNTS if getattr(model.config, n, None)), None)
    return value if isinstance(value, int) and value > 1 else None


def _ulysses_sdpa_mask(*, batch_size, q_length, kv_length, q_offset=0, kv_offset=0, device="cpu", **kwargs):
    """HF's SDPA mask on the local path (local shapes): the global causal mask — None (SDPA's
    is_causal) when HF may skip it, else (B, 1, N, N); a window shorter than N is refused."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    seq_len = active_mode().seq_len
    if q_offset or kv_offset or kv_length != q_length:
        raise ValueError("ulysses_sdpa masks are built inside a parallelized forward without a KV cache")
    window = kwargs.get("local_size")
    if window is not None and window < seq_len:
        raise ValueError(
            f"a sliding window of {window} < N = {seq_len} under torch.compile (the local-tensor path, "
            "which builds causal masks only): run the model eager, where HF builds its own masks"
        )
    return sdpa_mask(
        batch_size=batch_size, q_length=seq_len, kv_length=seq_len, mask_function=causal_mask_function,
        allow_is_causal_skip=True, device=device,
    )


def standard_lm_head(model: nn.Module) -> nn.Linear | None:
    """The output layer of an HF causal LM whose forward is transformers' standard template —
    ``logits = self.<head>(hidden_states)``, ``loss = self.loss_function(logits, labels, vocab,
    **kwargs)`` under ``if labels is not None``, both returned, ``logits`` and ``loss`` touched
    nowhere else (read from the source) — or None. Only then is the loss exactly the
    cross-entropy of the head's output, which the chunked loss computes without the logits."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(model).forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    head_name, found = None, set()
    for statement in tree.body[0].body:
        names = {n.id for n in ast.walk(statement) if isinstance(n, ast.Name)} & {"logits", "loss"}
        if not names:
            continue
        code = ast.unparse(statement)
        call = statement.value if isinstance(statement, (ast.Assign, ast.Return)) else None
        if isinstance(statement, ast.Assign) and code.startswith("logits = self.") and code.endswith("(hidden_states)"):
            head_name = code[len("logits = self."):-len("(hidden_states)")]
            found.add("head")
        elif code == "loss = None":
            found.add("none")
        elif isinstance(statement, ast.If) and code.startswith("if labels is not None:\n") and len(statement.body) == 1:
            loss_call = code.split("\n", 1)[1].strip()
            if not (loss_call.startswith("loss = self.loss_function(") and "**kwargs" in loss_call
                    and ("logits=logits" in loss_call or "(logits, labels" in loss_call)):
                return None
            found.add("loss")
        elif isinstance(statement, ast.Return) and isinstance(call, ast.Call):
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            others = [k for k, v in keywords.items() if k not in ("loss", "logits") and ("logits" in v or "loss" in v)]
            if keywords.get("loss") != "loss" or keywords.get("logits") != "logits" or others or call.args:
                return None
            found.add("return")
        else:
            return None
    head = getattr(model, head_name, None) if head_name and head_name.isidentifier() else None
    if found != {"head", "none", "loss", "return"} or not isinstance(head, nn.Linear):
        return None
    return head


def use_ulysses_attention(model: nn.Module, refuse_windows: bool) -> None:
    """Check the attention implementation ('sdpa' only) and switch it to "ulysses_sdpa".
    ``refuse_windows``: refuse sliding-window layers now (``propagation=False``: the local path
    only ever runs, and builds causal masks only)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    impl = model.config._attn_implementation
    if impl not in ("sdpa", IMPLEMENTATION):
        raise ValueError(
            f"{type(model).__name__} uses attn_implementation={impl!r}; sequence parallelism needs 'sdpa' "
            "(eager attention computes softmax(QK^T) on this rank's tokens only). Load or build the model "
            "with attn_implementation='sdpa'"
        )
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if refuse_windows and (window is not None or layer_types - {"full_attention"}):
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or other non-causal attention layers "
            f"(sliding_window={window}, layer_types={sorted(layer_types)}); UlyssesConfig(propagation=False) "
            "supports full causal attention only: use the default propagation path"
        )
    AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, _ulysses_sdpa_mask)
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            config._attn_implementation = IMPLEMENTATION


# HF's causal mask builders, as model modules import them by name -> whether it is the sliding one
CAUSAL_MASK_BUILDERS = {"create_causal_mask": False, "create_sliding_window_causal_mask": True}
# builder arguments whose presence makes the mask something else than causal ∧ window ∧ padding
_NOT_STRUCTURAL = ("cache", "past_key_values", "or_mask_function", "and_mask_function", "block_sequence_ids")
_DENSE = object()  # "let HF build it"


def causal_mask_structure(arguments: dict, sliding: bool):
    """The mask an HF causal builder called with ``arguments`` would build, as a CausalMask
    (None: plain is_causal, as HF returns then), or ``_DENSE`` when it is not one we describe
    exactly or the call is not on the propagation path (plain, local-shape inputs)."""
    embeds, config = arguments.get("inputs_embeds"), arguments.get("config")
    if not isinstance(embeds, DTensor) or any(arguments.get(n) is not None for n in _NOT_STRUCTURAL):
        return _DENSE
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return _DENSE
    batch, n = embeds.shape[0], embeds.shape[1]
    padding = arguments.get("attention_mask")
    if padding is not None:
        padding = padding.full_tensor() if isinstance(padding, DTensor) else padding
        if padding.dim() != 2 or tuple(padding.shape) != (batch, n):
            return _DENSE
        padding = padding.to(device=embeds.device, dtype=torch.bool)
        padding = None if bool(padding.all()) else padding
    positions = arguments.get("position_ids")
    if padding is None and positions is not None:  # HF reads packed resets only without a mask
        positions = positions.full_tensor() if isinstance(positions, DTensor) else positions
        if positions.shape[-1] != n or bool((positions.diff(dim=-1) != 1).any()):
            return _DENSE
    window = getattr(config, "sliding_window", None) if sliding else None
    if sliding and window is None:
        return _DENSE  # HF raises its own error
    if window is not None and window >= n:
        window = None  # reaches every earlier key
    if window is None and padding is None:
        return None
    if window is None and valid_runs(padding) is None:
        return _DENSE  # padding with holes and no window: SDPA needs the dense mask
    return CausalMask(batch, n, window, padding)


def structured_mask_builder(original: Callable, sliding: bool) -> Callable:
    """``original`` (an HF causal mask builder) returning :func:`causal_mask_structure`'s
    CausalMask where it describes the call."""
    signature = inspect.signature(original)

    def build_mask(*args, **kwargs):
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)
        mask = causal_mask_structure(arguments, sliding)
        return original(*args, **kwargs) if mask is _DENSE else mask

    return build_mask


@contextlib.contextmanager
def propagated_forward(model: nn.Module) -> Iterator[None]:
    """HF's code for a propagated forward: the configs say "sdpa" (``native_sdpa``) and the
    model's causal mask builders return structures (:func:`structured_mask_builder`)."""
    builders = {
        name: (lambda original, sliding=sliding: structured_mask_builder(original, sliding))
        for name, sliding in CAUSAL_MASK_BUILDERS.items()
    }
    with native_sdpa(model), rebound(model_namespaces(model), builders):
        yield


@contextlib.contextmanager
def native_sdpa(model: nn.Module) -> Iterator[None]:
    """The model's configs say "sdpa" (not "ulysses_sdpa") for the duration: HF's own code runs
    unchanged on the propagation path."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == IMPLEMENTATION}
    for c in configs.values():
        c._attn_implementation = "sdpa"
    try:
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = IMPLEMENTATION
