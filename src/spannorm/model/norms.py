"""Normalization modules: LayerNorm or RMSNorm, chosen by `model.norm_type`.

LayerNorm: (x - mean) / std * g + b.  RMSNorm: x / rms(x) * g.
"""

from __future__ import annotations

from torch import nn

NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
NORM_TYPES = tuple(NORMS)  # the values of `model.norm_type`


def make_norm(norm_type: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """A norm over the last `dim` features (`TransformerConfig` has checked `norm_type`)."""
    return NORMS[norm_type](dim, eps=eps)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(NORMS.values()))
