"""Normalization modules: LayerNorm or RMSNorm, chosen by `model.norm_type`."""

from __future__ import annotations

from torch import nn

NORM_TYPES = ("layernorm", "rmsnorm")


def make_norm(norm_type: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm: (x - mean) / std * g + b.  RMSNorm: x / rms(x) * g."""
    if norm_type == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if norm_type == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(
        f"model.norm_type={norm_type!r} is not valid; choose one of: {', '.join(NORM_TYPES)}"
    )
