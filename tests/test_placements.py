"""Each placement's wiring against its equation in the spec (docs/norms.md), written out here
independently of spannorm.model.placements, plus init gains, final norms and a short training run.

The block tests swap `attn` and `ffn` for fixed known maps and give every norm random gains (and
biases, and DyT's alpha) and every block scalar (ReZero's, nGPT's) a random value, so a wrong
sum, a missing scale or two swapped norms all change the output; `test_..._can_fail` checks that
on wrong transcriptions. nGPT's attention, MLP and logit scale, the qk_norm and embed_norm
switches and DyT are checked in tests/test_placements_2026.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spannorm import PLACEMENTS, TransformerConfig, TransformerLM
from spannorm.model.norms import DyT

from helpers import tiny_model

D_MODEL, N_LAYERS = 16, 4
NORM_TYPES = ("layernorm", "rmsnorm", "dyt")
NORM_CLASSES = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm, "dyt": DyT}
ANY_NORM = tuple(NORM_CLASSES.values())


def build(norm: str, norm_type: str = "layernorm", **options) -> TransformerLM:
    settings = dict(vocab_size=257, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=2, max_seq_len=1024)
    return tiny_model(None, **{**settings, "norm": norm, "norm_type": norm_type, **options})


class FixedMap(nn.Module):
    """A known stand-in sublayer: x -> tanh(x W + c), W and c drawn once."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = torch.randn(dim, dim, generator=generator) / math.sqrt(dim)
        self.shift = torch.randn(dim, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight + self.shift)


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every norm its own non-trivial gain (and bias, and DyT's alpha), so no two norms act
    alike; every block scalar (`block_scalars`) a random value of either sign; and nGPT's logit
    scale s_z random positive values."""
    for module in model.modules():
        if isinstance(module, ANY_NORM):
            module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, DyT):
                module.alpha.copy_(0.5 + torch.rand(1, generator=generator))
    for block in getattr(model, "blocks", ()):
        for scalar in block_scalars(block).values():
            scalar.copy_(0.5 * torch.randn(scalar.shape, generator=generator))
    if getattr(model, "s_z", None) is not None:
        model.s_z.weight.copy_(0.5 * torch.rand(model.s_z.weight.shape, generator=generator) + 0.1)


def block_norms(block: nn.Module) -> dict[str, nn.Module]:
    """A block's norms by slot name (empty slots, nn.Identity, left out)."""
    return {name: module for name, module in block.named_children() if isinstance(module, ANY_NORM)}


def block_scalars(block: nn.Module) -> dict[str, torch.Tensor]:
    """A block's own parameters outside `attn`, `ffn` and its norms, by name (ReZero's a_l, f_l;
    nGPT's stored alpha_A, alpha_M): the equations' learned scalars."""
    norms = set(block_norms(block))
    return {
        name: param
        for name, param in block.named_parameters()
        if name.split(".")[0] not in {"attn", "ffn", *norms}
    }


# --- the spec's block equations: x the block input, A/F the sublayers, N the block's norms by
# slot name (N1 = N["norm1"], N1i = N["norm1_in"], ...) ------------------------------------------


def prenorm(x, A, F, N, layer, cfg, S=None):
    h = x + A(N["norm1"](x))
    return h + F(N["norm2"](h))


def postnorm(x, A, F, N, layer, cfg, S=None):
    h = N["norm1"](x + A(x))
    return N["norm2"](h + F(h))


def spannorm(x, A, F, N, layer, cfg, S=None):
    if cfg.spannorm_variant == "stream":
        h = N["norm1"](x + A(x))
        z = N["norm2"](h + F(h))
        return x + z / math.sqrt(cfg.n_layers)
    two_l = 2 * cfg.n_layers
    alpha = {"sqrt2L": two_l**0.5, "deepnorm": two_l**0.25}.get(cfg.alpha, cfg.alpha)
    a = A(N["norm0"](x)) if layer == 0 else A(x)
    y = N["norm1"](x + a)
    return N["norm2"](alpha * x + F(y) + (a if cfg.attn_in_sum else 0))


def deepnorm(x, A, F, N, layer, cfg, S=None):
    alpha = (2 * cfg.n_layers) ** 0.25
    h = N["norm1"](alpha * x + A(x))
    return N["norm2"](alpha * h + F(h))


def sandwich(x, A, F, N, layer, cfg, S=None):
    h = x + N["norm1_out"](A(N["norm1_in"](x)))
    return h + N["norm2_out"](F(N["norm2_in"](h)))


def mixln_postnorm_blocks(cfg) -> int:
    """floor(r * L) in exact arithmetic on the ratio as written."""
    return math.floor(Fraction(str(cfg.mixln_ratio)) * cfg.n_layers)


def mixln(x, A, F, N, layer, cfg, S=None):
    rule = postnorm if layer < mixln_postnorm_blocks(cfg) else prenorm
    return rule(x, A, F, N, layer, cfg)


def hybridnorm(x, A, F, N, layer, cfg, S=None):
    if cfg.hybridnorm_star and layer == 0:
        return prenorm(x, A, F, N, layer, cfg)
    h = x + A(x)
    return N["norm2"](h) + F(N["norm2"](h))


def b2t(x, A, F, N, layer, cfg, S=None):
    y = N["norm1"](x + A(x))
    return N["norm2"](x + y + F(y))


def lns(x, A, F, N, layer, cfg, S=None):
    scale = 1 / math.sqrt(layer + 1)
    h = x + A(scale * N["norm1"](x))
    return h + F(scale * N["norm2"](h))


def reordered(x, A, F, N, layer, cfg, S=None):
    h = x + N["norm1"](A(x))
    return h + N["norm2"](F(h))


def rezero(x, A, F, N, layer, cfg, S=None):
    a = S["alpha_attn"]
    f = a if cfg.rezero_shared else S["alpha_ffn"]
    h = x + a * A(x)
    return h + f * F(h)


def sphere(v):
    return v / v.norm(dim=-1, keepdim=True)


def ngpt_effective_alpha(stored, cfg):
    """alpha = stored * alpha_init / alpha_scale, alpha_scale = 1/sqrt(d) (nGPT's
    reparametrization)."""
    return stored * cfg.ngpt_alpha_init * math.sqrt(cfg.d_model)


def ngpt(x, A, F, N, layer, cfg, S=None):
    alpha_a = ngpt_effective_alpha(S["alpha_attn.weight"], cfg).abs()
    alpha_m = ngpt_effective_alpha(S["alpha_ffn.weight"], cfg).abs()
    h = sphere(sphere(x) + alpha_a * (sphere(A(x)) - sphere(x)))
    return sphere(sphere(h) + alpha_m * (sphere(F(h)) - sphere(h)))


LEGACY = (prenorm, postnorm, spannorm, deepnorm, sandwich, mixln, hybridnorm, b2t, lns)
SPEC = {rule.__name__: rule for rule in (*LEGACY, reordered, rezero, ngpt)}


def spec_norm_slots(name: str, cfg: TransformerConfig, layer: int) -> set[str]:
    """The norms of block `layer` in the spec, by the names the equations give them."""
    if name == "sandwich":
        return {"norm1_in", "norm1_out", "norm2_in", "norm2_out"}
    if name == "spannorm" and cfg.spannorm_variant == "block" and layer == 0:
        return {"norm0", "norm1", "norm2"}
    if name == "hybridnorm" and not (cfg.hybridnorm_star and layer == 0):
        return {"norm2"}
    if name in ("rezero", "ngpt"):
        return set()
    return {"norm1", "norm2"}


def spec_scalars(name: str, cfg: TransformerConfig) -> set[str]:
    """The learned scalars of a block in the spec, by parameter name."""
    if name == "rezero":
        return {"alpha_attn"} if cfg.rezero_shared else {"alpha_attn", "alpha_ffn"}
    if name == "ngpt":
        return {"alpha_attn.weight", "alpha_ffn.weight"}
    return set()


def spec_final_norm(name: str, cfg: TransformerConfig) -> bool:
    if name == "spannorm":
        return cfg.spannorm_variant == "stream"
    if name == "rezero":
        return cfg.rezero_final_norm
    return name in ("prenorm", "sandwich", "mixln", "hybridnorm", "lns", "reordered")


CASES = [
    ("prenorm", {}),
    ("postnorm", {}),
    ("spannorm", {}),
    ("spannorm", {"alpha": "deepnorm"}),
    ("spannorm", {"alpha": 1}),
    ("spannorm", {"alpha": 2.5}),
    ("spannorm", {"attn_in_sum": True}),
    ("spannorm", {"alpha": 1, "attn_in_sum": True}),
    ("spannorm", {"spannorm_variant": "stream"}),
    ("deepnorm", {}),
    ("sandwich", {}),
    ("mixln", {}),
    ("mixln", {"mixln_ratio": 0.5}),
    ("hybridnorm", {}),
    ("hybridnorm", {"hybridnorm_star": True}),
    ("b2t", {}),
    ("lns", {}),
    ("reordered", {}),
    ("rezero", {}),
    ("rezero", {"rezero_shared": True}),
    ("rezero", {"rezero_final_norm": True}),
    ("ngpt", {}),
    ("ngpt", {"ngpt_alpha_init": 0.3}),
]
# the placements whose checkpoints once held their norms in a list
LEGACY_CASES = [(name, options) for name, options in CASES if SPEC[name] in LEGACY]


def test_every_registered_placement_has_a_spec_equation():
    assert set(SPEC) == set(PLACEMENTS) == {name for name, _ in CASES}


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize(("name", "options"), CASES, ids=lambda v: str(v) if v else "default")
def test_block_output_matches_spec_equation(name, options, norm_type):
    generator = torch.Generator().manual_seed(0)
    model = build(name, norm_type, **options)
    randomize_norms(model, generator)
    x = 3 * torch.randn(2, 5, D_MODEL, generator=generator) + 0.5
    for layer, block in enumerate(model.blocks):
        block.attn = FixedMap(D_MODEL, generator)
        block.ffn = FixedMap(D_MODEL, generator)
        norms, scalars = block_norms(block), block_scalars(block)
        assert set(norms) == spec_norm_slots(name, model.cfg, layer), f"block {layer}"
        assert set(scalars) == spec_scalars(name, model.cfg), f"block {layer}"
        with torch.no_grad():
            expected = SPEC[name](x, block.attn, block.ffn, norms, layer, model.cfg, scalars)
            torch.testing.assert_close(block(x), expected, msg=f"{name} block {layer}")


def wrong_transcriptions(rule, norms: dict, scalars: dict):
    """The rule with A and F swapped, with its norms rotated one slot, and with its scalars
    scaled by 1.5: what a wrong sum, two swapped norms or a wrong scale would compute."""
    yield "A and F swapped", lambda x, A, F, N, layer, cfg, S: rule(x, F, A, N, layer, cfg, S)
    if len(norms) > 1:
        names = sorted(norms)
        rotated = {n: norms[names[(i + 1) % len(names)]] for i, n in enumerate(names)}
        yield (
            "norms rotated",
            lambda x, A, F, N, layer, cfg, S: rule(x, A, F, rotated, layer, cfg, S),
        )
    if scalars:
        scaled = {n: 1.5 * p for n, p in scalars.items()}
        yield "scalars x1.5", lambda x, A, F, N, layer, cfg, S: rule(x, A, F, N, layer, cfg, scaled)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize(("name", "options"), CASES, ids=lambda v: str(v) if v else "default")
def test_block_equation_test_can_fail(name, options, norm_type):
    """With the inputs the equation test uses, each wrong transcription of the block's equation
    gives a different output: the test above would catch that mistake in the code."""
    generator = torch.Generator().manual_seed(0)
    model = build(name, norm_type, **options)
    randomize_norms(model, generator)
    x = 3 * torch.randn(2, 5, D_MODEL, generator=generator) + 0.5
    for layer, block in enumerate(model.blocks):
        block.attn, block.ffn = FixedMap(D_MODEL, generator), FixedMap(D_MODEL, generator)
        norms, scalars = block_norms(block), block_scalars(block)
        with torch.no_grad():
            got = block(x)
            for what, wrong in wrong_transcriptions(SPEC[name], norms, scalars):
                other = wrong(x, block.attn, block.ffn, norms, layer, model.cfg, scalars)
                assert not torch.allclose(got, other, rtol=1e-3, atol=1e-4), (layer, what)


@pytest.mark.parametrize("variant", ["block", "stream"])
def test_spannorm_input_norm_n0_is_a_norm_in_block_zero_only(variant):
    model = build("spannorm", spannorm_variant=variant)
    first, *later = model.blocks
    assert isinstance(first.norm0, nn.LayerNorm if variant == "block" else nn.Identity)
    assert all(isinstance(block.norm0, nn.Identity) for block in later)
    assert ("blocks.0.norm0.weight" in model.state_dict()) == (variant == "block")


@pytest.mark.parametrize(
    ("name", "options"), LEGACY_CASES, ids=lambda v: str(v) if v else "default"
)
def test_checkpoints_with_the_norms_in_a_list_still_load(name, options):
    """Checkpoints from before the named slots held each block's norms as `norms.<i>`: N1, N2
    then SpanNorm's N0 (also as `input_norm`); Sandwich's N1i, N1o, N2i, N2o. They load into
    the named slots."""
    listed_order = ["norm1", "norm2", "norm0", "norm1_in", "norm1_out", "norm2_in", "norm2_out"]
    model = build(name, **options)
    randomize_norms(model, torch.Generator().manual_seed(0))
    listed = {}
    for key, value in model.state_dict().items():
        block, slot, rest = key.split(".", 3)[1:] if key.startswith("blocks.") else ("", "", "")
        block_slots = block_norms(model.blocks[int(block)]) if block else []
        names = sorted(block_slots, key=listed_order.index)
        if slot in names:
            key = f"blocks.{block}.norms.{names.index(slot)}.{rest}"
        if slot == "norm0":  # SpanNorm's N0 was also held as `input_norm`
            listed[f"blocks.{block}.input_norm.{rest}"] = value
        listed[key] = value
    assert any(".norms." in key for key in listed)
    fresh = build(name, **options)
    fresh.load_state_dict(listed)  # strict
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(
    ("ratio", "n_layers", "n_postnorm"),
    [
        (0.0, 4, 0),
        (0.25, 4, 1),
        (0.49, 4, 1),
        (0.5, 4, 2),
        (0.75, 4, 3),
        (1.0, 4, 4),
        (0.7, 90, 63),
    ],
)
def test_mixln_switches_from_postnorm_to_prenorm_at_floor_r_times_l(ratio, n_layers, n_postnorm):
    model = build("mixln", n_layers=n_layers, mixln_ratio=ratio)
    generator = torch.Generator().manual_seed(0)
    randomize_norms(model, generator)
    x = 2 * torch.randn(1, 3, D_MODEL, generator=generator) + 1
    for layer, block in enumerate(model.blocks):
        block.attn, block.ffn = FixedMap(D_MODEL, generator), FixedMap(D_MODEL, generator)
        rule = postnorm if layer < n_postnorm else prenorm
        expected = rule(x, block.attn, block.ffn, block_norms(block), layer, model.cfg)
        with torch.no_grad():
            torch.testing.assert_close(block(x), expected, msg=f"block {layer}")


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_hybridnorm_attention_normalizes_q_k_v_per_head(norm_type):
    model = build("hybridnorm", norm_type)
    randomize_norms(model, torch.Generator().manual_seed(0))
    attn = model.blocks[1].attn
    assert len(attn.qkv_norms) == 3
    x = torch.randn(2, 5, D_MODEL)
    batch, time, _ = x.shape
    raw = attn.qkv(x).view(batch, time, 3, attn.n_heads, attn.head_dim).transpose(1, 3)
    with torch.no_grad():
        for got, norm, projected in zip(attn.heads(x), attn.qkv_norms, raw.unbind(2), strict=True):
            torch.testing.assert_close(got, norm(projected))
        calls = []
        for norm in attn.qkv_norms:
            norm.register_forward_hook(lambda module, args, out: calls.append(module))
        model.blocks[1](x)
    assert calls == list(attn.qkv_norms)
    assert all(block.attn.qkv_norms is None for block in build("prenorm").blocks)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize(("name", "options"), CASES, ids=lambda v: str(v) if v else "default")
def test_final_norm_presence_and_use(name, options, norm_type):
    model = build(name, norm_type, **options)
    expected = spec_final_norm(name, model.cfg)
    assert isinstance(model.final_norm, NORM_CLASSES[norm_type]) == expected
    randomize_norms(model, torch.Generator().manual_seed(0))
    idx = torch.randint(0, 257, (2, 6))
    with torch.no_grad():
        x = model.tok_emb(idx) * model.embed_scale
        for block in model.blocks:
            x = block(x)
        logits = model.head(model.final_norm(x) if expected else x)
        if name == "ngpt":  # z = s_z * logits, s_z = stored * init / scale = stored * sqrt(d)
            logits = logits * model.s_z.weight * math.sqrt(D_MODEL)
        torch.testing.assert_close(model(idx), logits)


def test_unknown_placement_is_refused_with_the_valid_names():
    with pytest.raises(ValueError) as error:
        build("midnorm")
    message = str(error.value)
    assert "\n" not in message and "midnorm" in message
    assert all(name in message for name in PLACEMENTS)


def xavier_std(weight: torch.Tensor, gain: float = 1.0) -> float:
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(2 / (fan_in + fan_out))


def sublayer_matrices(block) -> dict[str, torch.Tensor]:
    """W_q, W_k, W_v, W_o and the feed-forward matrices (SwiGLU's gate and up count as two)."""
    q, k, v = block.attn.qkv.weight.chunk(3, dim=0)
    gate, up = block.ffn.fc.weight.chunk(2, dim=0)
    return {"q": q, "k": k, "v": v, "o": block.attn.proj.weight, "gate": gate, "up": up,
            "down": block.ffn.proj.weight}  # fmt: skip


def test_deepnorm_init_gains():
    """W_q, W_k: xavier gain 1; W_v, W_o and the FFN matrices: gain (8L)^(-1/4)."""
    torch.manual_seed(0)
    model = build("deepnorm", d_model=64, n_layers=6)
    beta = (8 * 6) ** -0.25
    for block in model.blocks:
        for role, weight in sublayer_matrices(block).items():
            gain = 1.0 if role in ("q", "k") else beta
            assert weight.std().item() == pytest.approx(xavier_std(weight, gain), rel=0.06), role


@pytest.mark.parametrize(
    ("init", "expected_std"),
    [
        ("xavier", lambda role, weight, L: xavier_std(weight)),
        ("normal", lambda role, weight, L: 0.02),
        (
            "gpt2",
            lambda role, weight, L: 0.02 / math.sqrt(2 * L) if role in ("o", "down") else 0.02,
        ),
    ],
)
def test_other_init_schemes_set_every_sublayer_matrix(init, expected_std):
    torch.manual_seed(0)
    model = build("prenorm", d_model=64, n_layers=6, init=init)
    for block in model.blocks:
        for role, weight in sublayer_matrices(block).items():
            expected = expected_std(role, weight, 6)
            assert weight.std().item() == pytest.approx(expected, rel=0.06), role


def repeated_text_batches(seq_len: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    """Windows of a repeated sentence as byte ids: random offsets, fully learnable."""
    text = ("the quick brown fox jumps over the lazy dog. " * 40).encode()
    data = torch.tensor(list(text))
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data) - seq_len - 1, (steps, batch_size), generator=generator)
    return [torch.stack([data[s : s + seq_len + 1] for s in row.tolist()]) for row in starts]


# nGPT's logits are cosines times s_z (1 at init), so its loss falls only as fast as s_z grows
# (about lr * sqrt(d) per step): at lr 3e-3 it loses 10% in 20 steps here, at 1e-2 35%
TRAIN_LR = {"ngpt": 1e-2}


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
def test_every_placement_trains_without_nan(name):
    torch.manual_seed(0)
    model = build(name, d_model=32, n_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR.get(name, 3e-3))
    losses = []
    for batch in repeated_text_batches(seq_len=32, batch_size=8, steps=20):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.after_optimizer_step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses), losses
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
