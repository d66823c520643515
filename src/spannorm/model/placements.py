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

from spannorm.model.config import InitScheme, TransformerConfig, deepnorm_alpha, resolve_alpha
from spannorm.model.layers import MLP, CausalSelfAttention
from spannorm.model.moe import MoE
from spannorm.model.ngpt import NGPTBlock
from spannorm.model.norms import is_norm, norm_for


@dataclass(frozen=True)
class Placement:
    """A registered placement: how to build block `l`, whether a final norm follows the stack,
    which init it uses by default, where the equation comes from, and whether it keeps its
    weights and hidden states on the unit sphere (nGPT: the LM then scales its logits by s_z,
    renormalizes its matrices in `after_optimizer_step` and takes no weight decay)."""

    name: str
    make_block: Callable[[TransformerConfig, int], nn.Module]
    final_norm: Callable[[TransformerConfig], bool]
    default_init: InitScheme
    source: str
    hypersphere: bool = False


PLACEMENTS: dict[str, Placement] = {}


def register(
    name: str, final_norm, default_init: InitScheme, source: str, hypersphere: bool = False
):
    """Class decorator adding a block type to PLACEMENTS; `final_norm` is a bool or f(cfg)."""

    def add(block_factory):
        rule = final_norm if callable(final_norm) else (lambda cfg, value=final_norm: value)
        PLACEMENTS[name] = Placement(name, block_factory, rule, default_init, source, hypersphere)
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
    """Attention `attn`, feed-forward `ffn` and the placement's norms in named slots that read
    like its equation (N1 is `norm1`, N1i is `norm1_in`, ...), registered in the order of `norms`;
    a slot in `empty` holds nn.Identity in this block. The slots are the state-dict keys
    (`blocks.0.norm1.weight`)."""

    def __init__(
        self,
        cfg: TransformerConfig,
        layer: int,
        norms: tuple[str, ...] = ("norm1", "norm2"),
        empty: tuple[str, ...] = (),
        qkv_norm: bool = False,
    ):
        super().__init__()
        self.layer = layer
        self.attn = CausalSelfAttention(cfg, qkv_norm=qkv_norm)
        self.ffn = make_ffn(cfg)
        for name in norms:
            norm = norm_for(cfg, cfg.d_model)
            self.add_module(name, nn.Identity() if name in empty else norm)
        self.register_load_state_dict_pre_hook(_rename_listed_norms)


def _rename_listed_norms(block: Block, state_dict: dict, prefix: str, *args) -> None:
    """Load checkpoints from before the slots had names: they held a block's norms in a list
    `norms`, in the order the block registers its (non-Identity) slots, and SpanNorm's N0
    also as `input_norm`."""
    slots = [name for name, module in block.named_children() if is_norm(module)]
    renames = {"input_norm.": "norm0.", **{f"norms.{i}.": f"{s}." for i, s in enumerate(slots)}}
    for key in list(state_dict):
        for old, new in renames.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key.removeprefix(prefix + old)] = state_dict.pop(key)


@register(
    "prenorm",
    final_norm=True,
    default_init=InitScheme.GPT2,
    source="Xiong et al. 2020, arXiv 2002.04745",
)
class PreNormBlock(Block):
    """h = x + A(N1(x));  x' = h + F(N2(h)).

    x ──┬──────────────────────(+)── h ──┬──────────────────────(+)── x'
        └── norm1 ── attn ──────┘        └── norm2 ── ffn ───────┘
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm1(x))
        return h + self.ffn(self.norm2(h))


@register(
    "postnorm", final_norm=False, default_init=InitScheme.XAVIER, source="Vaswani et al. 2017"
)
class PostNormBlock(Block):
    """h = N1(x + A(x));  x' = N2(h + F(h)).

    x ──┬───────(+)── norm1 ── h ──┬──────(+)── norm2 ── x'
        └── attn ─┘                └── ffn ─┘
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x + self.attn(x))
        return self.norm2(h + self.ffn(h))


def spannorm_has_final_norm(cfg: TransformerConfig) -> bool:
    return cfg.spannorm_variant == "stream"


@register(
    "spannorm",
    final_norm=spannorm_has_final_norm,
    default_init=InitScheme.NORMAL,
    source="SpanNorm, arXiv 2601.22580 (block equations: a reading of the paper; scaling inferred)",
)
class SpanNormBlock(Block):
    """SpanNorm, `variant=block` (default):
        a = A(N0(x)) in block 0, A(x) later;  y = N1(x + a);  x' = N2(alpha*x + F(y) [+ a])
    with alpha = sqrt(2L) by default (inferred) and `+ a` only when `attn_in_sum`.

    x ──┬──────────────────────────────────── ×alpha ──(+)── norm2 ── x'
        ├────────────(+)── norm1 ── y ── ffn ────────────┘
        └── norm0 ── attn ──┘ a          (a joins the norm2 sum if attn_in_sum)
    norm0: block 0 only (nn.Identity in later blocks)

    `variant=stream` (inferred second reading): h = N1(x + A(x)); z = N2(h + F(h));
        x' = x + z / sqrt(L), with a final norm after the stack (norm0 is nn.Identity).
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        self.variant = cfg.spannorm_variant
        has_norm0 = self.variant == "block" and layer == 0
        super().__init__(cfg, layer, ("norm1", "norm2", "norm0"), () if has_norm0 else ("norm0",))
        self.alpha = resolve_alpha(cfg.alpha, cfg.n_layers)
        self.attn_in_sum = cfg.attn_in_sum
        self.stream_scale = 1.0 / math.sqrt(cfg.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant == "stream":
            h = self.norm1(x + self.attn(x))
            return x + self.stream_scale * self.norm2(h + self.ffn(h))
        a = self.attn(self.norm0(x))
        y = self.norm1(x + a)
        total = self.alpha * x + self.ffn(y)
        return self.norm2(total + a if self.attn_in_sum else total)


@register(
    "deepnorm",
    final_norm=False,
    default_init=InitScheme.DEEPNORM,
    source="DeepNet, arXiv 2203.00555",
)
class DeepNormBlock(Block):
    """h = N1(alpha*x + A(x));  x' = N2(alpha*h + F(h)),  alpha = (2L)^(1/4).

    x ──┬── ×alpha ──(+)── norm1 ── h ──┬── ×alpha ──(+)── norm2 ── x'
        └───── attn ──┘                 └───── ffn ───┘
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer)
        self.alpha = deepnorm_alpha(cfg.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.alpha * x + self.attn(x))
        return self.norm2(self.alpha * h + self.ffn(h))


@register(
    "sandwich", final_norm=True, default_init=InitScheme.GPT2, source="Peri-LN, arXiv 2502.02732"
)
class SandwichBlock(Block):
    """h = x + N1o(A(N1i(x)));  x' = h + N2o(F(N2i(h))).

    x ──┬──────────────────────────────────(+)── h ──┬────────────────────────────────(+)── x'
        └── norm1_in ── attn ── norm1_out ──┘        └── norm2_in ── ffn ── norm2_out ──┘
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, ("norm1_in", "norm1_out", "norm2_in", "norm2_out"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.norm1_out(self.attn(self.norm1_in(x)))
        return h + self.norm2_out(self.ffn(self.norm2_in(h)))


def mixln_block(cfg: TransformerConfig, layer: int) -> nn.Module:
    """Mix-LN: PostNorm blocks for l < floor(r*L), PreNorm blocks after."""
    # the tolerance keeps e.g. 0.7 * 90 = 62.99999... at its exact value 63
    if layer < math.floor(cfg.mixln_ratio * cfg.n_layers + 1e-9):
        return PostNormBlock(cfg, layer)
    return PreNormBlock(cfg, layer)


register("mixln", final_norm=True, default_init=InitScheme.GPT2, source="Mix-LN, arXiv 2412.13795")(
    mixln_block
)


@register(
    "hybridnorm",
    final_norm=True,
    default_init=InitScheme.GPT2,
    source="HybridNorm, arXiv 2503.04598",
)
class HybridNormBlock(Block):
    """h = x + A_qkv(x) (per-head norms on q, k, v, in `attn.qkv_norms`);  x' = N2(h) + F(N2(h)).

    x ──┬───────────(+)── h ── norm2 ──┬──────(+)── x'
        └── attn_qkv ─┘                └── ffn ─┘

    `hybridnorm_star`: block 0 is h = x + A_qkv(N1(x));  x' = h + F(N2(h)) (elsewhere `norm1` is
    nn.Identity)."""

    def __init__(self, cfg: TransformerConfig, layer: int):
        self.star = cfg.hybridnorm_star and layer == 0
        empty = () if self.star else ("norm1",)
        super().__init__(cfg, layer, ("norm1", "norm2"), empty, qkv_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.star:
            h = x + self.attn(self.norm1(x))
            return h + self.ffn(self.norm2(h))
        h = self.norm2(x + self.attn(x))
        return h + self.ffn(h)


@register(
    "b2t",
    final_norm=False,
    default_init=InitScheme.XAVIER,
    source="B2T connection, arXiv 2206.00330",
)
class B2TBlock(Block):
    """y = N1(x + A(x));  x' = N2(x + y + F(y)).

    x ──┬─────────────────────────────────────┐
        ├───────(+)── norm1 ── y ──┬──────────(+)── norm2 ── x'
        └── attn ─┘                └── ffn ────┘
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x + self.attn(x))
        return self.norm2(x + y + self.ffn(y))


@register(
    "lns",
    final_norm=True,
    default_init=InitScheme.NORMAL,
    source="LayerNorm Scaling, arXiv 2502.05795",
)
class LNSBlock(Block):
    """PreNorm with each N(h) scaled by 1/sqrt(l+1):  h = x + A(N1(x)/sqrt(l+1)); ...

    x ──┬─────────────────────────────────────(+)── h ──┬──────────────────────────────────(+)── x'
        └── norm1 ── ×1/sqrt(l+1) ── attn ──────┘        └── norm2 ── ×1/sqrt(l+1) ── ffn ──┘
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer)
        self.scale = 1.0 / math.sqrt(layer + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.scale * self.norm1(x))
        return h + self.ffn(self.scale * self.norm2(h))


@register(
    "reordered",
    final_norm=True,
    default_init=InitScheme.NORMAL,
    source="OLMo 2, arXiv 2501.00656; OLMo-core ReorderedNormTransformerBlock",
)
class ReorderedBlock(Block):
    """OLMo 2's reordered norm: h = x + N1(A(x));  x' = h + N2(F(h)).

    The sublayer's output is normalized; its input and the stream never are.

    x ──┬──────────────────────(+)── h ──┬──────────────────────(+)── x'
        └── attn ── norm1 ──────┘        └── ffn ── norm2 ───────┘
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.norm1(self.attn(x))
        return h + self.norm2(self.ffn(h))


def rezero_has_final_norm(cfg: TransformerConfig) -> bool:
    return cfg.rezero_final_norm


@register(
    "rezero",
    final_norm=rezero_has_final_norm,
    default_init=InitScheme.XAVIER,
    source="ReZero, arXiv 2003.04887 (init: inferred)",
)
class ReZeroBlock(Block):
    """ReZero: h = x + a_l * A(x);  x' = h + f_l * F(h), no norm anywhere in the block.

    a_l (`alpha_attn`) and f_l (`alpha_ffn`) are learned scalars initialized to 0, so every block
    starts as the identity. `rezero_shared`: one scalar per block for both sublayers (f_l = a_l,
    only `alpha_attn` exists), as in the ReZero authors' code (`resweight`).

    x ──┬──────────────────────(+)── h ──┬──────────────────────(+)── x'
        └── attn ── ×a_l ───────┘        └── ffn ── ×f_l ────────┘
    """

    def __init__(self, cfg: TransformerConfig, layer: int):
        super().__init__(cfg, layer, norms=())
        self.alpha_attn = nn.Parameter(torch.zeros(1))
        self.alpha_ffn = None if cfg.rezero_shared else nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.alpha_attn if self.alpha_ffn is None else self.alpha_ffn
        h = x + self.alpha_attn * self.attn(x)
        return h + f * self.ffn(h)


register(
    "ngpt",
    final_norm=False,
    default_init=InitScheme.NORMAL,
    source="nGPT, arXiv 2410.01131; NVIDIA/ngpt model.py and train.py",
    hypersphere=True,
)(NGPTBlock)
