"""Initialization schemes, each a rule over the model's weights.

- `normal`: every weight N(0, std), std = `init_std` (0.02); `depth_scaled_init` divides the
  output projections (attention `proj`, feed-forward `proj`) by sqrt(2L).
- `gpt2`: `normal` with the sqrt(2L) output-projection scaling always on (GPT-2).
- `xavier`: xavier-normal (gain 1) on every matrix; embeddings N(0, 1/d) read with a sqrt(d)
  multiplier, so the stream starts at unit variance (Vaswani et al.).
- `deepnorm`: `xavier`, but W_v, W_o and the feed-forward matrices get gain (8L)^(-1/4)
  (DeepNet, decoder-only constants).
Norm gains start at 1 and every bias at 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from spannorm.model.config import InitScheme, TransformerConfig
from spannorm.model.layers import MLP, CausalSelfAttention
from spannorm.model.norms import is_norm

UNIT_VARIANCE_SCHEMES = (InitScheme.XAVIER, InitScheme.DEEPNORM)


def resolve_init(cfg: TransformerConfig, placement_default: InitScheme) -> InitScheme:
    """`model.init`, or the placement's own scheme where it is `default`."""
    return placement_default if cfg.init == "default" else InitScheme(cfg.init)


def embedding_scale(scheme: InitScheme, d_model: int) -> float:
    """The multiplier on token embeddings: sqrt(d) for unit-variance schemes, else 1."""
    return math.sqrt(d_model) if scheme in UNIT_VARIANCE_SCHEMES else 1.0


class MatrixInit:
    """Initializes one matrix as an input-side or an output-projection weight under a scheme."""

    def __init__(self, scheme: InitScheme, cfg: TransformerConfig) -> None:
        L = cfg.n_layers
        self.unit_variance = scheme in UNIT_VARIANCE_SCHEMES
        self.std = cfg.init_std
        self.beta = (8 * L) ** -0.25 if scheme == InitScheme.DEEPNORM else 1.0
        depth_scaled = scheme == InitScheme.GPT2 or cfg.depth_scaled_init
        self.out_scale = 1 / math.sqrt(2 * L) if depth_scaled else 1.0

    @torch.no_grad()
    def __call__(self, weight: torch.Tensor, output: bool = False, beta: bool = False) -> None:
        """`output`: an output projection (depth scaling applies); `beta`: DeepNet's gain applies."""
        scale = (self.out_scale if output else 1.0) * (self.beta if beta else 1.0)
        if self.unit_variance:
            nn.init.xavier_normal_(weight, gain=scale)
        else:
            nn.init.normal_(weight, std=self.std * scale)


def _init_attention(attn: CausalSelfAttention, init: MatrixInit) -> None:
    q, k, v = attn.qkv.weight.split(attn.proj.weight.shape[0], dim=0)
    init(q)
    init(k)
    init(v, beta=True)
    init(attn.proj.weight, output=True, beta=True)


def init_ffn(w_in: torch.Tensor, w_out: torch.Tensor, hidden: int, init: MatrixInit) -> None:
    """One feed-forward network (the dense MLP or one MoE expert): W_in as input matrices
    (SwiGLU's gate and up as two), W_out as an output projection, both with DeepNet's gain."""
    for part in w_in.split(hidden, dim=0):
        init(part, beta=True)
    init(w_out, output=True, beta=True)


def _init_mlp(mlp: MLP, init: MatrixInit) -> None:
    init_ffn(mlp.fc.weight, mlp.proj.weight, mlp.hidden, init)


def _sublayer_rule(module: nn.Module, model: nn.Module) -> Callable[[MatrixInit], None] | None:
    """The rule that sets a sublayer's matrices, or None when `module` is not such a sublayer."""
    if isinstance(module, CausalSelfAttention):
        return functools.partial(_init_attention, module)
    if isinstance(module, MLP):
        return functools.partial(_init_mlp, module)
    if hasattr(module, "init_weights") and module is not model:
        return module.init_weights
    return None


def init_weights(model: nn.Module, cfg: TransformerConfig, scheme: InitScheme) -> None:
    """Apply `scheme` to a freshly built TransformerLM (in place).

    Sublayers other than attention and the MLP (e.g. MoE) initialize themselves through an
    `init_weights(init: MatrixInit)` method; the matrices inside a sublayer are left to its rule.
    """
    init = MatrixInit(scheme, cfg)
    emb_std = cfg.d_model**-0.5 if init.unit_variance else cfg.init_std
    inside_sublayer: set[int] = set()  # modules whose matrices their sublayer's rule already set
    for module in model.modules():
        rule = _sublayer_rule(module, model)
        if id(module) in inside_sublayer:
            pass  # its matrices were set by the enclosing sublayer's rule
        elif rule is not None:
            rule(init)
            inside_sublayer.update(id(sub) for sub in module.modules())
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=emb_std)
        elif isinstance(module, nn.Linear) and module.weight is not model.tok_emb.weight:
            nn.init.normal_(module.weight, std=emb_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if is_norm(module):
            module.reset_parameters()
