"""Sublayers: causal self-attention with rotary positions (and an optional KV cache), and the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.norms import make_norm


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [B, H, T, hd]: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def rope_tables(
    head_dim: int, start: int, length: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position p * theta^(-2i/hd) for positions start..start+length-1."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + causal mask) v, with RoPE on q and k.

    `qkv_norm=True` normalizes q, k and v per head (HybridNorm's attention).
    Setting `kv_cache` to a `KVCache` makes calls incremental (positions continue from the cache).
    """

    def __init__(self, cfg: TransformerConfig, qkv_norm: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qkv_norms = (
            nn.ModuleList(make_norm(cfg.norm_type, cfg.head_dim, cfg.norm_eps) for _ in range(3))
            if qkv_norm
            else None
        )
        self.kv_cache: KVCache | None = None

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to per-head q, k, v of shape [B, H, T, hd], normalized if configured."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qkv_norms is not None:
            q, k, v = (norm(t) for norm, t in zip(self.qkv_norms, (q, k, v), strict=True))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.heads(x)
        start = self.kv_cache.length if self.kv_cache is not None else 0
        cos, sin = rope_tables(self.head_dim, start, T, self.rope_theta, x.device)
        q, k = rotate(q, cos, sin).type_as(v), rotate(k, cos, sin).type_as(v)
        mask = None
        if self.kv_cache is not None:
            k, v = self.kv_cache.append(k, v)
            if start > 0 and T > 1:  # chunk after a prefix: query i sees keys up to start + i
                keys = torch.arange(start + T, device=x.device)
                mask = keys[None, :] <= (start + torch.arange(T, device=x.device))[:, None]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and start == 0 and T > 1,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class MLP(nn.Module):
    """SwiGLU: proj(silu(x W_g) * x W_u).  GELU: proj(gelu(x W_fc))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.hidden = 8 * round(2 / 3 * cfg.mlp_ratio * cfg.d_model / 8)
            self.fc = nn.Linear(cfg.d_model, 2 * self.hidden, bias=cfg.bias)  # [gate; up]
        else:
            self.hidden = int(cfg.mlp_ratio * cfg.d_model)
            self.fc = nn.Linear(cfg.d_model, self.hidden, bias=cfg.bias)
        self.proj = nn.Linear(self.hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.fc(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.fc(x))
        return self.dropout(self.proj(h))
