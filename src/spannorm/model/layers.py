"""Sublayers: causal self-attention with rotary positions (and an optional KV cache), and the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.norms import norm_for


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on [B, H, T, hd] with the halves (x1, x2) paired:
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), computed as x * cos + (x2, x1) * sin with the
    tables of `rope_tables` ([cos, cos] and [-sin, sin]): the same values, in fewer passes."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def rope_tables(
    head_dim: int, start: int, length: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotate`'s tables for positions start..start+length-1, each [length, head_dim]:
    [cos, cos] and [-sin, sin] of the angles p * theta^(-2i/hd), i < hd/2."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(start, start + length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


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
    `model.qk_norm=true` (any placement; Gemma 3, Qwen3, OLMo 2; torchtitan, litgpt `norm_qk`):
        q <- N_q(q),  k <- N_k(k)  per head, over the head dimension, before RoPE
    with one norm module each (`q_norm`, `k_norm`), shared by the heads:

        x ── W_qkv ──┬── q ── N_q ── RoPE ──┐
                     ├── k ── N_k ── RoPE ──┴── softmax(q k^T / sqrt(hd)) ── · v ── W_o
                     └── v ─────────────────────────────────────────────────┘

    Subclasses change what happens after RoPE (`after_rope`) and the logit scale
    (`softmax_scale`, None: 1/sqrt(hd)); nGPT's attention does both.
    Setting `kv_cache` to a `KVCache` makes calls incremental (positions continue from the cache).
    """

    softmax_scale: float | None = None

    def __init__(self, cfg: TransformerConfig, qkv_norm: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.qkv_norms = (
            nn.ModuleList(norm_for(cfg, cfg.head_dim) for _ in range(3)) if qkv_norm else None
        )
        self.q_norm = norm_for(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = norm_for(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.kv_cache: KVCache | None = None
        # the rotary tables of positions 0..max_seq_len-1, computed once (not saved: derived)
        cos, sin = rope_tables(self.head_dim, 0, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def reset_rope(self) -> None:
        """Recompute the stored rotary tables in place: for a module built on the meta device and
        then materialized (e.g. transformers' from_pretrained), where derived buffers, not being in
        the state dict, hold whatever memory they were given."""
        cos, sin = rope_tables(
            self.head_dim, 0, self.rope_cos.shape[0], self.rope_theta, self.rope_cos.device
        )
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of positions start..start+length-1: slices of the stored ones, or
        computed afresh beyond them or if a cast of the module changed their dtype."""
        if start + length <= self.rope_cos.shape[0] and self.rope_cos.dtype == torch.float32:
            return self.rope_cos[start : start + length], self.rope_sin[start : start + length]
        return rope_tables(self.head_dim, start, length, self.rope_theta, self.rope_cos.device)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to per-head q, k, v of shape [B, H, T, hd], normalized if configured."""
        B, T, D = x.shape
        # split + transpose: views of the projection, whose backward is one cat into its layout
        q, k, v = (
            t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(D, dim=-1)
        )
        if self.qkv_norms is not None:
            q, k, v = (norm(t) for norm, t in zip(self.qkv_norms, (q, k, v), strict=True))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def after_rope(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k [B, H, T, hd] after RoPE, as the dot product sees them: unchanged here."""
        return q, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.heads(x)
        start = self.kv_cache.length if self.kv_cache is not None else 0
        cos, sin = self.rope(start, T)
        q, k = self.after_rope(rotate(q, cos, sin).type_as(v), rotate(k, cos, sin).type_as(v))
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
            scale=self.softmax_scale,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, D)))


def ffn_hidden(cfg: TransformerConfig) -> int:
    """Hidden width of the feed-forward network: ratio*d for GELU; 2/3*ratio*d rounded to a
    multiple of 8 for SwiGLU, whose gate and up matrices then hold as many weights as GELU's one."""
    if cfg.mlp == "swiglu":
        return 8 * round(2 / 3 * cfg.mlp_ratio * cfg.d_model / 8)
    return int(cfg.mlp_ratio * cfg.d_model)


def ffn_input_width(cfg: TransformerConfig) -> int:
    """Rows of the input matrix W_in: [gate; up] for SwiGLU, one hidden layer for GELU."""
    return (2 if cfg.mlp == "swiglu" else 1) * ffn_hidden(cfg)


def ffn_activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up on h = x W_in = [gate; up].  GELU: gelu(h)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


class MLP(nn.Module):
    """The feed-forward network: proj(act(fc(x))), `act` and widths as above. SwiGLU:
    proj(silu(x W_g) * x W_u).  GELU: proj(gelu(x W_fc)). Each MoE expert is the same function
    on its own weights (`spannorm.model.moe`)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.hidden = ffn_hidden(cfg)
        self.fc = nn.Linear(cfg.d_model, ffn_input_width(cfg), bias=cfg.bias)
        self.proj = nn.Linear(self.hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(ffn_activation(self.kind, self.fc(x))))
