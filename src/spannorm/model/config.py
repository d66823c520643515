"""The model's configuration: every switch a norm-placement experiment turns, checked when the
config is made (before anything is built), and the named values those switches take."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import StrEnum

from spannorm.model.norms import NORM_TYPES


class InitScheme(StrEnum):
    """The initialization schemes (their rules: `spannorm.model.init`)."""

    GPT2 = "gpt2"
    NORMAL = "normal"
    XAVIER = "xavier"
    DEEPNORM = "deepnorm"


def deepnorm_alpha(n_layers: int) -> float:
    """DeepNet's decoder-only residual scale (2L)^(1/4)."""
    return (2 * n_layers) ** 0.25


# SpanNorm's `alpha` by name, as a function of the depth L
NAMED_ALPHAS = {"sqrt2L": lambda n_layers: math.sqrt(2 * n_layers), "deepnorm": deepnorm_alpha}


def resolve_alpha(alpha: float | str, n_layers: int) -> float:
    """SpanNorm's skip scale: `sqrt2L` -> sqrt(2L), `deepnorm` -> (2L)^(1/4), or a positive
    number (also written as a string, e.g. "2.5")."""
    if alpha in NAMED_ALPHAS:
        return NAMED_ALPHAS[alpha](n_layers)
    value = math.nan
    if not isinstance(alpha, bool):
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            pass
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"model.alpha={alpha!r} is not valid; use a positive number, "
            + " or ".join(NAMED_ALPHAS)
        )
    return value


# What each annotation accepts, and how the error names it
_KINDS = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


@dataclass
class TransformerConfig:
    """Shape and wiring of a decoder-only Transformer LM.

    `norm` picks the placement (see `spannorm.model.placements.PLACEMENTS`), `norm_type` the
    normalization module, `init` the initialization ("default" = the placement's own).
    """

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 1024
    mlp: str = "swiglu"  # swiglu | gelu
    mlp_ratio: float = 4.0  # hidden = ratio*d (gelu) or 2/3*ratio*d rounded to 8 (swiglu)
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # normalization placement
    norm: str = "prenorm"
    norm_type: str = "layernorm"  # layernorm | rmsnorm | dyt
    norm_eps: float = 1e-5
    dyt_alpha: float = 0.5  # DyT's initial alpha (norm_type=dyt)
    # switches for any placement (default off): per-head norms on q and k before RoPE; a norm on
    # the token embeddings
    qk_norm: bool = False
    embed_norm: bool = False
    init: str = "default"  # default | gpt2 | normal | xavier | deepnorm
    init_std: float = 0.02
    # SpanNorm switches (see docs/norms.md)
    alpha: float | str = "sqrt2L"  # a number, sqrt2L, deepnorm, or 1
    depth_scaled_init: bool = False
    attn_in_sum: bool = False
    spannorm_variant: str = "block"  # block | stream (inferred second reading)
    # other placements' switches
    mixln_ratio: float = 0.25
    hybridnorm_star: bool = False
    rezero_final_norm: bool = False  # ReZero: a final norm after the stack (the paper has none)
    rezero_shared: bool = False  # ReZero: one scalar per block for both sublayers (ReZero's code)
    ngpt_alpha_init: float = 0.05  # nGPT: initial eigen learning rates alpha_A, alpha_M
    # feed-forward: dense MLP or Mixture-of-Experts
    ffn: str = "dense"  # dense | moe
    n_experts: int = 8
    top_k: int = 2
    moe_shared_expert: bool = False
    moe_aux_loss_coef: float = 0.01
    moe_bias_balance: bool = False
    moe_bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.type in _KINDS:
                accepts, kind = _KINDS[field.type]
                if not accepts(getattr(self, field.name)):
                    raise ValueError(
                        f"model.{field.name}={getattr(self, field.name)!r} must be {kind}"
                    )
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "n_experts")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive integer")
        for name in (
            "mlp_ratio",
            "rope_theta",
            "norm_eps",
            "init_std",
            "dyt_alpha",
            "ngpt_alpha_init",
        ):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"model.{name}={getattr(self, name)} must be a positive number")
        for name in ("moe_aux_loss_coef", "moe_bias_update_rate"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"model.{name}={getattr(self, name)} must be a number >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must lie in [0, 1)")
        if not 0.0 <= self.mixln_ratio <= 1.0:
            raise ValueError(f"model.mixln_ratio={self.mixln_ratio} must lie in [0, 1]")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head size d_model/n_heads={self.head_dim} must be even for RoPE")
        choices = {
            "norm_type": NORM_TYPES,
            "mlp": ("swiglu", "gelu"),
            "ffn": ("dense", "moe"),
            "spannorm_variant": ("block", "stream"),
            "init": ("default", *InitScheme),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"model.{name}={getattr(self, name)!r} is not valid; choose one of: "
                    + ", ".join(allowed)
                )
        if self.ffn == "moe" and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"model.top_k={self.top_k} must be between 1 and model.n_experts={self.n_experts}"
            )
        resolve_alpha(self.alpha, self.n_layers)
        self._check_placement_switches()

    def _check_placement_switches(self) -> None:
        """Refuse switches a placement already has built in, or that it has no form for."""
        if self.norm == "ngpt":
            refused = {
                "qk_norm": "nGPT already puts q and k on the unit sphere (times s_qk)",
                "embed_norm": "nGPT's embeddings are unit-norm rows already",
            }
            for name, reason in refused.items():
                if getattr(self, name):
                    raise ValueError(
                        f"model.{name}=true does not apply to model.norm=ngpt: {reason}"
                    )
            if self.ffn != "dense" or self.mlp != "swiglu":
                raise ValueError(
                    "model.norm=ngpt needs model.ffn=dense and model.mlp=swiglu (got "
                    f"ffn={self.ffn}, mlp={self.mlp}): its s_u, s_v scalings are defined for the "
                    "dense SwiGLU MLP"
                )
        if self.norm == "hybridnorm" and self.qk_norm:
            raise ValueError(
                "model.qk_norm=true does not apply to model.norm=hybridnorm: its attention already "
                "normalizes q, k (and v) per head"
            )

    @classmethod
    def from_kwargs(cls, **kwargs) -> TransformerConfig:
        """Build from a mapping, failing on keys the model does not know."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
