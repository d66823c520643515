"""Normalization modules, chosen by `model.norm_type`: LayerNorm, RMSNorm or DyT.

LayerNorm: (x - mean) / std * g + b.  RMSNorm: x / rms(x) * g.
DyT (Dynamic Tanh, Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622):
g * tanh(a * x) + b, `a` one learned scalar (initialized to `model.dyt_alpha`), g ones, b zeros;
not a normalization, a drop-in for one wherever a norm sits.
"""

from __future__ import annotations

import torch
from torch import nn


class DyT(nn.Module):
    """Dynamic Tanh over the last `dim` features: weight * tanh(alpha * x) + bias.

    `alpha` is a scalar (shape [1]) initialized to `alpha_init`; `weight` (gamma) starts at ones,
    `bias` (beta) at zeros. `eps` is accepted for the norms' signature and not used.
    """

    def __init__(self, dim: int, eps: float = 1e-5, alpha_init: float = 0.5) -> None:
        super().__init__()
        self.alpha_init = alpha_init
        self.alpha = nn.Parameter(torch.empty(1))
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.fill_(self.alpha_init)
        self.weight.fill_(1.0)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}"


NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm, "dyt": DyT}
NORM_TYPES = tuple(NORMS)  # the values of `model.norm_type`


def make_norm(norm_type: str, dim: int, eps: float = 1e-5, dyt_alpha: float = 0.5) -> nn.Module:
    """A norm over the last `dim` features (`TransformerConfig` has checked `norm_type`);
    `dyt_alpha` is DyT's initial alpha (the other types ignore it)."""
    if norm_type == "dyt":
        return DyT(dim, eps, alpha_init=dyt_alpha)
    return NORMS[norm_type](dim, eps=eps)


def norm_for(cfg, dim: int) -> nn.Module:
    """The configured norm (`cfg.norm_type`, `norm_eps`, `dyt_alpha`) over `dim` features."""
    return make_norm(cfg.norm_type, dim, cfg.norm_eps, cfg.dyt_alpha)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(NORMS.values()))
