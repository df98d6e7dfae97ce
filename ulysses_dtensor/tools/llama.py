"""A Llama-style decoder, readable in one sitting: RMSNorm, RoPE, grouped-query attention through
``F.scaled_dot_product_attention``, SwiGLU MLP. The model ``ulysses-dtensor train`` builds.

Nothing in it knows about sequence parallelism; ``parallelize_module`` makes it sequence
parallel. RoPE angles come from a ``freqs_cis`` buffer sliced ``[:T]`` (the torchtitan pattern),
which ``parallelize_module`` maps to each rank's global positions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..loss import linear_cross_entropy


@dataclass(frozen=True)
class LlamaConfig:
    """Model shape. ``ffn_dim`` 0 means Llama's rounding of 8/3 · dim up to ``multiple_of``."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0
    multiple_of: int = 32
    rope_theta: float = 1e6
    max_seq_len: int = 8192
    norm_eps: float = 1e-5
    # loss from the hidden states in tiles (``loss.linear_cross_entropy``): no logits held, and
    # forward(tokens, targets) returns (None, loss)
    chunked_loss: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * -(-hidden // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count (embedding and output head untied)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        return self.n_layers * (attn + mlp + 2 * self.dim) + 2 * self.vocab_size * self.dim + self.dim


# Flavors by name. "tiny" is the default of the train job (the retrieval task learns in minutes
# on CPU); "debug" matches torchtitan's debugmodel shape; the rest are Llama 3 shapes.
FLAVORS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2),
    "small": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2),
    "debug": LlamaConfig(dim=256, n_layers=6, n_heads=16, n_kv_heads=16, rope_theta=5e5),
    "1b": LlamaConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=5e5),
    "8b": LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, rope_theta=5e5),
    "70b": LlamaConfig(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, rope_theta=5e5),
}


def llama_config(flavor: str, **overrides) -> LlamaConfig:
    """The named flavor with fields replaced (e.g. ``vocab_size`` of the task, ``max_seq_len``)."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    return replace(FLAVORS[flavor], **overrides)


def rope_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """(max_seq_len, head_dim // 2, 2): (cos, sin) of each position's rotation angles.

    Stored real, not complex, so ``model.to(dtype)`` casts it instead of dropping the sine."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), freqs)
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, D); freqs_cis: (T, D/2, 2). Rotates in float32 (float64 for float64 inputs)."""
    real = torch.promote_types(x.dtype, torch.float32)
    pairs = torch.view_as_complex(x.to(real).reshape(*x.shape[:-1], -1, 2))
    rotation = torch.view_as_complex(freqs_cis.to(real).contiguous())
    return torch.view_as_real(pairs * rotation[None, :, None, :]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim), causal."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("freqs_cis", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens: (B, T) -> logits (B, T, vocab). With ``targets`` (B, T) (the class each position
        predicts, -100 = no loss) returns (logits, mean cross-entropy over the scored positions);
        (None, loss) with ``cfg.chunked_loss``."""
        T = tokens.shape[1]
        if T > self.freqs_cis.shape[0]:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.freqs_cis.shape[0]}")
        freqs_cis = self.freqs_cis[:T]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, freqs_cis)
        if targets is not None and self.cfg.chunked_loss:
            hidden = self.norm(x).flatten(0, 1)
            return None, linear_cross_entropy(hidden, self.output.weight, targets.flatten(), ignore_index=-100)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        flat = logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
        return logits, F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
