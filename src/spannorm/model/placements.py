"""Where the norms go: one block class per placement, and the registry `model.norm` selects from.

Notation (see docs/norms.md): x is the block input, A attention, F the feed-forward sublayer,
N* a norm of the configured type. Each block exposes `attn` and `ffn`. Adding a placement is one
`@register(...)` class here plus its entry in tests/test_placements.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.layers import MLP, CausalSelfAttention
from spannorm.model.moe import MoE
from spannorm.model.norms import make_norm


@dataclass(frozen=True)
class Placement:
    """A registered placement: how to build block `l`, whether a final norm follows the stack,
    which init it uses by default, and where the equation comes from."""

    name: str
    make_block: Callable[[TransformerConfig, int], nn.Module]
    final_norm: Callable[[TransformerConfig], bool]
    default_init: str
    source: str


PLACEMENTS: dict[str, Placement] = {}


def register(name: str, final_norm, default_init: str, source: str):
    """Class decorator adding a block type to PLACEMENTS; `final_norm` is a bool or f(cfg)."""

    def add(block_factory):
        rule = final_norm if callable(final_norm) else (lambda cfg, value=final_norm: value)
        PLACEMENTS[name] = Placement(name, block_factory, rule, default_init, source)
        return block_factory

    return add


def get_placement(name: str) -> Placement:
    if name not in PLACEMENTS:
        raise ValueError(
            f"model.norm={name!r} is not a norm placement; choose one of: {', '.join(PLACEMENTS)}"
        )
    return PLACEMENTS[name]


def make_ffn(cfg: TransformerConfig) -> nn.Module:
    """The feed-forward sublayer F: the dense MLP, or a Mixture-of-Experts with `ffn=moe`."""
    return MoE(cfg) if cfg.ffn == "moe" else MLP(cfg)


class Block(nn.Module):
    """Attention, feed-forward and `n_norms` norms (N1, N2, ...) of the configured type."""

    def __init__(self, cfg: TransformerConfig, layer: int, norms: int, qkv_norm: bool = False):
        super().__init__()
        self.layer = layer
        self.attn = CausalSelfAttention(cfg, qkv_norm=qkv_norm)
        self.ffn = make_ffn(cfg)
        self.norms = nn.ModuleList(
            make_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps) for _ in range(norms)
        )


@register(
    "prenorm", final_norm=True, default_init="gpt2", source="Xiong et al. 2020, arXiv 2002.04745"
)
class PreNormBlock(Block):
    """h = x + A(N1(x));  x' = h + F(N2(h))."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norms[0](x))
        return h + self.ffn(self.norms[1](h))


@register("postnorm", final_norm=False, default_init="xavier", source="Vaswani et al. 2017")
class PostNormBlock(Block):
    """h = N1(x + A(x));  x' = N2(h + F(h))."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](x + self.attn(x))
        return self.norms[1](h + self.ffn(h))


def resolve_alpha(alpha: float | str, n_layers: int) -> float:
    """SpanNorm's skip scale: `sqrt2L` -> sqrt(2L), `deepnorm` -> (2L)^(1/4), or a number."""
    if alpha == "sqrt2L":
        return math.sqrt(2 * n_layers)
    if alpha == "deepnorm":
        return (2 * n_layers) ** 0.25
    try:
        return float(alpha)
    except (TypeError, ValueError):
        raise ValueError(
            f"model.alpha={alpha!r} is not valid; use a number, sqrt2L or deepnorm"
        ) from None


def spannorm_has_final_norm(cfg: TransformerConfig) -> bool:
    return cfg.spannorm_variant == "stream"


@register(
    "spannorm",
    final_norm=spannorm_has_final_norm,
    default_init="normal",
    source="SpanNorm, arXiv 2601.22580 (block equations: a reading of the paper; scaling inferred)",
)
class SpanNormBlock(Block):
    """SpanNorm, `variant=block` (default):
        a = A(N0(x)) in block 0, A(x) later;  y = N1(x + a);  x' = N2(alpha*x + F(y) [+ a])
    with alpha = sqrt(2L) by default (inferred) and `+ a` only when `attn_in_sum`.

    `variant=stream` (inferred second reading): h = N1(x + A(x)); z = N2(h + F(h));
        x' = x + z / sqrt(L), with a final norm after the stack.
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        self.variant = cfg.spannorm_variant
        has_input_norm = self.variant == "block" and layer == 0
        super().__init__(cfg, layer, norms=2 + has_input_norm)
        self.input_norm = self.norms[2] if has_input_norm else None
        self.alpha = resolve_alpha(cfg.alpha, cfg.n_layers)
        self.attn_in_sum = cfg.attn_in_sum
        self.stream_scale = 1.0 / math.sqrt(cfg.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "stream":
            h = self.norms[0](x + self.attn(x))
            return x + self.stream_scale * self.norms[1](h + self.ffn(h))
        a = self.attn(self.input_norm(x) if self.input_norm is not None else x)
        y = self.norms[0](x + a)
        total = self.alpha * x + self.ffn(y)
        return self.norms[1](total + a if self.attn_in_sum else total)


def deepnorm_alpha(n_layers: int) -> float:
    """DeepNet's decoder-only residual scale (2L)^(1/4)."""
    return (2 * n_layers) ** 0.25


@register("deepnorm", final_norm=False, default_init="deepnorm", source="DeepNet, arXiv 2203.00555")
class DeepNormBlock(Block):
    """h = N1(alpha*x + A(x));  x' = N2(alpha*h + F(h)),  alpha = (2L)^(1/4)."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=2)
        self.alpha = deepnorm_alpha(cfg.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norms[0](self.alpha * x + self.attn(x))
        return self.norms[1](self.alpha * h + self.ffn(h))


@register("sandwich", final_norm=True, default_init="gpt2", source="Peri-LN, arXiv 2502.02732")
class SandwichBlock(Block):
    """h = x + N1o(A(N1i(x)));  x' = h + N2o(F(N2i(h)))   (norms: N1i, N1o, N2i, N2o)."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n1i, n1o, n2i, n2o = self.norms
        h = x + n1o(self.attn(n1i(x)))
        return h + n2o(self.ffn(n2i(h)))


def mixln_block(cfg: TransformerConfig, layer: int) -> nn.Module:
    """Mix-LN: PostNorm blocks for l < floor(r*L), PreNorm blocks after."""
    # the tolerance keeps e.g. 0.7 * 90 = 62.99999... at its exact value 63
    if layer < math.floor(cfg.mixln_ratio * cfg.n_layers + 1e-9):
        return PostNormBlock(cfg, layer)
    return PreNormBlock(cfg, layer)


register("mixln", final_norm=True, default_init="gpt2", source="Mix-LN, arXiv 2412.13795")(
    mixln_block
)


@register("hybridnorm", final_norm=True, default_init="gpt2", source="HybridNorm, arXiv 2503.04598")
class HybridNormBlock(Block):
    """h = x + A_qkv(x) (per-head norms on q, k, v);  x' = N2(h) + F(N2(h)).
    `hybridnorm_star`: block 0 is h = x + A_qkv(N1(x));  x' = h + F(N2(h))."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        self.star = cfg.hybridnorm_star and layer == 0
        super().__init__(cfg, layer, norms=1 + self.star, qkv_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.star:
            h = x + self.attn(self.norms[0](x))
            return h + self.ffn(self.norms[1](h))
        h = self.norms[0](x + self.attn(x))
        return h + self.ffn(h)


@register("b2t", final_norm=False, default_init="xavier", source="B2T connection, arXiv 2206.00330")
class B2TBlock(Block):
    """y = N1(x + A(x));  x' = N2(x + y + F(y))."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norms[0](x + self.attn(x))
        return self.norms[1](x + y + self.ffn(y))


@register(
    "lns", final_norm=True, default_init="normal", source="LayerNorm Scaling, arXiv 2502.05795"
)
class LNSBlock(Block):
    """PreNorm with each N(h) scaled by 1/sqrt(l+1):  h = x + A(N1(x)/sqrt(l+1)); ..."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=2)
        self.scale = 1.0 / math.sqrt(layer + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.scale * self.norms[0](x))
        return h + self.ffn(self.scale * self.norms[1](h))
