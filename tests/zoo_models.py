"""Plain PyTorch models written the way people write them, not for sequence parallelism: each
derives something from the sequence length it sees (``torch.arange(t)``, a ``tril`` mask, RoPE
tables from ``x.shape``). Run on local shards they would be silently wrong; on ``Shard(seq)``
DTensors they see the global length."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """nanoGPT's block; ``attention``: "causal" (SDPA is_causal), "tril" (an explicit
    ``ones(T, T).tril()`` mask) or "rope" (rotary angles from ``torch.arange(T)``)."""

    def __init__(self, dim: int, n_head: int, attention: str):
        super().__init__()
        self.n_head, self.attention = n_head, attention
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.attention == "rope":
            q, k = rotate(q), rotate(k)
        if self.attention == "tril":
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with angles computed from the sequence length x has: (B, H, T, D)."""
    T, D = x.shape[2], x.shape[3]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=x.dtype, device=x.device) / D))
    angles = torch.outer(torch.arange(T, dtype=x.dtype, device=x.device), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class NanoGPT(nn.Module):
    """nanoGPT's GPT: ``pos = torch.arange(0, t)``, ``x = wte(idx) + wpe(pos)``, loss from
    ``F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)``."""

    def __init__(self, vocab: int = 64, block_size: int = 64, dim: int = 32, n_head: int = 4, n_layer: int = 2,
                 attention: str = "causal"):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block_size, dim) if attention != "rope" else None
        self.h = nn.ModuleList(Block(dim, n_head, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT
        for p in self.parameters():
            nn.init.normal_(p, std=1 / math.sqrt(dim)) if p.dim() > 1 else None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.size()
        x = self.wte(idx)
        if self.wpe is not None:
            pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
            x = x + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
