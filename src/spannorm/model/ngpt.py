"""nGPT, the normalized Transformer (Loshchilov et al. 2024, arXiv 2410.01131): hidden states and
weight matrices live on the unit sphere, and each sublayer moves the stream along it.

With Norm(v) = v / ||v|| over the embedding dimension and x the block input:

    h  = Norm(Norm(x) + |alpha_A| * (Norm(A(x)) - Norm(x)))
    x' = Norm(h + |alpha_M| * (Norm(F(h)) - h))

- alpha_A, alpha_M (`block.alpha_attn`, `block.alpha_ffn`): per-dimension "eigen learning rates".
- attention: RoPE, then q <- s_qk * Norm(q), k <- s_qk * Norm(k) per head (`attn.s_qk`, one
  entry per channel of each head), and softmax(q k^T * sqrt(hd)) (the scale sqrt(hd), not
  1/sqrt(hd), because q.k is now a cosine).
- MLP (SwiGLU): u <- u * s_u * sqrt(d), v <- v * s_v * sqrt(d) (v the SiLU input), then
  W_o(u * silu(v)) (`ffn.s_u`, `ffn.s_v`).
- logits: z = s_z * (E_out h) (`TransformerLM.s_z`), no final norm.
- every matrix is renormalized along its embedding dimension after each optimizer step
  (`normalize_weights_`): rows of the embedding, the LM head, W_q, W_k, W_v and the MLP's input
  matrix; columns of the attention and MLP output projections. No weight decay, no warm-up.

Each learned vector s is stored rescaled (`ScaledVector`): the parameter starts at s_scale and is
used as parameter * (s_init / s_scale), so the effective value starts at s_init and Adam moves it
about s_init / s_scale times faster than a plain parameter. Constants (the NVIDIA code's, which
the paper's authors published; docs/norms.md):

    alpha_A, alpha_M: init `model.ngpt_alpha_init` (0.05), scale 1/sqrt(d)
    s_qk: init 1, scale 1/sqrt(d);  s_u, s_v: init 1, scale 1;  s_z: init 1, scale 1/sqrt(d)

From the NVIDIA code, not the equations: |alpha| (the absolute value is taken), Norm(x) rather
than x in the first interpolation (equal on the sphere), q and k normalized after RoPE, and the
sqrt(d) on both u and v (the paper writes it on v only; Norm(F(h)) removes a constant factor on
u, so the outputs are the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.layers import MLP, CausalSelfAttention


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| along `dim` (F.normalize: a zero vector stays zero instead of becoming NaN)."""
    return F.normalize(x, dim=dim)


class ScaledVector(nn.Module):
    """A learned vector used as weight * (init / scale), `weight` initialized to `scale`: its
    effective value starts at `init` (nGPT's s_init / s_scale reparametrization)."""

    def __init__(self, size: int, init: float, scale: float) -> None:
        super().__init__()
        self.init, self.scale = float(init), float(scale)
        self.weight = nn.Parameter(torch.empty(size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(self.scale)

    def forward(self) -> torch.Tensor:
        return self.weight * (self.init / self.scale)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, init={self.init:g}, scale={self.scale:g}"


class NGPTAttention(CausalSelfAttention):
    """Causal self-attention with q, k on the unit sphere after RoPE, scaled by s_qk per head and
    channel, and softmax(q k^T * sqrt(hd)):

        x ── W_qkv ──┬── q ── RoPE ── Norm ── ×s_qk ──┐
                     ├── k ── RoPE ── Norm ── ×s_qk ──┴── softmax(q k^T * sqrt(hd)) ── · v ── W_o
                     └── v ───────────────────────────────────────────────────────┘
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.s_qk = ScaledVector(cfg.d_model, init=1.0, scale=cfg.d_model**-0.5)
        self.softmax_scale = math.sqrt(cfg.head_dim)

    def after_rope(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_qk = self.s_qk().view(self.n_heads, 1, self.head_dim)  # [H, 1, hd] against [B, H, T, hd]
        return (s_qk * unit(q)).type_as(q), (s_qk * unit(k)).type_as(k)


class NGPTMLP(MLP):
    """SwiGLU with its two halves rescaled: W_o((u * s_u * sqrt(d)) * silu(v * s_v * sqrt(d))),
    [v; u] = x W_in (v the gate, the first half, as in `MLP`)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        self.s_u = ScaledVector(self.hidden, init=1.0, scale=1.0)
        self.s_v = ScaledVector(self.hidden, init=1.0, scale=1.0)
        self.input_scale = math.sqrt(cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        v = (gate * (self.s_v() * self.input_scale)).type_as(gate)
        u = (up * (self.s_u() * self.input_scale)).type_as(up)
        return self.dropout(self.proj(F.silu(v) * u))


class NGPTBlock(nn.Module):
    """nGPT: h = Norm(Norm(x) + |alpha_A| (Norm(A(x)) - Norm(x)));
             x' = Norm(h + |alpha_M| (Norm(F(h)) - h)).

    x ──┬── Norm ────────────────────────┐
        └── attn ── Norm ── ×|alpha_A| ──┴── lerp ── Norm ── h
    h ──┬────────────────────────────────┐
        └── ffn ─── Norm ── ×|alpha_M| ──┴── lerp ── Norm ── x'

    lerp(a, b; t) = a + t * (b - a) per dimension, t the |alpha| beside b.
    No norm modules: `attn` is `NGPTAttention`, `ffn` `NGPTMLP`; alpha_A is `alpha_attn`, alpha_M
    `alpha_ffn` (each a `ScaledVector` of size d).
    """

    def __init__(self, cfg: TransformerConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.attn = NGPTAttention(cfg)
        self.ffn = NGPTMLP(cfg)
        scale = cfg.d_model**-0.5
        self.alpha_attn = ScaledVector(cfg.d_model, cfg.ngpt_alpha_init, scale)
        self.alpha_ffn = ScaledVector(cfg.d_model, cfg.ngpt_alpha_init, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_unit = unit(x)
        h = unit(x_unit + self.alpha_attn().abs() * (unit(self.attn(x)) - x_unit))
        return unit(h + self.alpha_ffn().abs() * (unit(self.ffn(h)) - h))


def unit_norm_matrices(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """nGPT's matrices in a TransformerLM, each with the dimension that indexes the embedding
    (d_model), along which it is kept at unit norm: the embedding and LM head [V, d] (the head
    once when tied), W_qkv [3d, d] and the MLP's W_in [2h, d] by rows (dim 1), the attention and
    MLP output projections [d, .] by columns (dim 0)."""
    pairs = [(model.tok_emb.weight, 1)]
    if model.head.weight is not model.tok_emb.weight:
        pairs.append((model.head.weight, 1))
    for block in model.blocks:
        pairs += [
            (block.attn.qkv.weight, 1),
            (block.attn.proj.weight, 0),
            (block.ffn.fc.weight, 1),
            (block.ffn.proj.weight, 0),
        ]
    return pairs


@torch.no_grad()
def normalize_weights_(model: nn.Module) -> None:
    """Put every matrix of `unit_norm_matrices(model)` back on the unit sphere along its embedding
    dimension, in place (norms computed in float32). Tensor ops only, so a sharded parameter
    (FSDP2's DTensor) is normalized by DTensor's own reductions; every rank must call it."""
    for weight, dim in unit_norm_matrices(model):
        full = weight.float()
        weight.copy_(
            (full / torch.linalg.vector_norm(full, dim=dim, keepdim=True)).to(weight.dtype)
        )
