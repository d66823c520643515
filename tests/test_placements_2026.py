"""The 2024-2026 additions beyond the block equations (those are in tests/test_placements.py, with
the other placements'): nGPT's attention, MLP, constants and unit-norm weights, the `qk_norm` and
`embed_norm` switches, the DyT norm type, ReZero's identity start, and the combinations refused.

Each equation is written out here independently of spannorm.model (RoPE as a complex rotation,
attention with an explicit mask and softmax), and each comes with wrong transcriptions that the
same inputs must tell apart, so the equation test can fail.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_placements import NORM_CLASSES, NORM_TYPES, randomize_norms
from torch import nn

from spannorm import PLACEMENTS, TransformerLM
from spannorm.model.layers import KVCache
from spannorm.model.norms import DyT

from helpers import run_entry, tiny_model, tiny_overrides

D_MODEL, N_HEADS, VOCAB = 16, 2, 61
HEAD_DIM = D_MODEL // N_HEADS


def build(norm: str = "prenorm", **options) -> TransformerLM:
    settings = dict(
        vocab_size=VOCAB, d_model=D_MODEL, n_layers=3, n_heads=N_HEADS, max_seq_len=1024
    )
    return tiny_model(None, **{**settings, "norm": norm, **options})


@torch.no_grad()
def perturb(model: nn.Module, generator: torch.Generator, size: float = 0.3) -> None:
    """Move every parameter off its init (random gains, scalars of either sign, ...)."""
    for param in model.parameters():
        param.add_(size * torch.randn(param.shape, generator=generator))


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-3, atol=1e-4)


# --- independent transcriptions ------------------------------------------------------------------


def rope(t: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE on [B, H, T, hd] as complex rotations: channel i pairs with i + hd/2 as re + i*im, and
    position p turns pair i by p * theta^(-2i/hd)."""
    half = t.shape[-1] // 2
    pairs = torch.complex(t[..., :half].double(), t[..., half:].double())
    angles = torch.outer(
        torch.arange(t.shape[-2], dtype=torch.float64),
        theta ** (-torch.arange(half, dtype=torch.float64) * 2 / t.shape[-1]),
    )
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((turned.real, turned.imag), dim=-1).to(t.dtype)


def attention(attn, x, before_rope=None, after_rope=None, scale=None):
    """softmax(q k^T * scale + causal mask) v through W_qkv and W_o, per head; q, k pass through
    `before_rope` and `after_rope` (each (q, k) -> (q, k)) around RoPE; scale 1/sqrt(hd) unless
    given."""
    B, T, D = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
    q, k, v = (t.reshape(B, T, N_HEADS, HEAD_DIM).transpose(1, 2) for t in qkv.split(D, dim=-1))
    if before_rope:
        q, k = before_rope(q, k)
    q, k = rope(q), rope(k)
    if after_rope:
        q, k = after_rope(q, k)
    scores = (q @ k.transpose(-1, -2)) * (HEAD_DIM**-0.5 if scale is None else scale)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(B, T, D)
    return F.linear(y, attn.proj.weight, attn.proj.bias)


def sphere(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True)


# nGPT's constants (paper, Table of hyperparameters; NVIDIA/ngpt model.py): the stored vector
# starts at `scale` and is used as stored * init / scale
def effective(stored: torch.Tensor, init: float, scale: float) -> torch.Tensor:
    return stored * (init / scale)


def ngpt_s_qk(attn) -> torch.Tensor:
    """s_qk (init 1, scale 1/sqrt(d)) as [H, 1, hd]: one value per head and channel."""
    return effective(attn.s_qk.weight, 1.0, D_MODEL**-0.5).reshape(N_HEADS, 1, HEAD_DIM)


def ngpt_attention(attn, x):
    """q <- s_qk Norm(RoPE(q)), k <- s_qk Norm(RoPE(k)), softmax(q k^T * sqrt(hd))."""
    s = ngpt_s_qk(attn)
    return attention(attn, x, after_rope=lambda q, k: (s * sphere(q), s * sphere(k)),
                     scale=math.sqrt(HEAD_DIM))  # fmt: skip


def ngpt_mlp(mlp, x, root_d=D_MODEL**0.5):
    """W_o(u * silu(v)) with [v; u] = x W_in, v <- v s_v sqrt(d), u <- u s_u sqrt(d) (s_u, s_v:
    init 1, scale 1)."""
    v, u = F.linear(x, mlp.fc.weight, mlp.fc.bias).chunk(2, dim=-1)
    v = v * effective(mlp.s_v.weight, 1.0, 1.0) * root_d
    u = u * effective(mlp.s_u.weight, 1.0, 1.0) * root_d
    return F.linear(F.silu(v) * u, mlp.proj.weight, mlp.proj.bias)


# --- nGPT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_ngpt_attention_matches_its_equation(bias):
    generator = torch.Generator().manual_seed(0)
    model = build("ngpt", bias=bias)
    perturb(model, generator)
    attn = model.blocks[1].attn
    x = torch.randn(2, 7, D_MODEL, generator=generator)
    s = ngpt_s_qk(attn)
    wrong = {
        "scale 1/sqrt(hd)": attention(
            attn, x, after_rope=lambda q, k: (s * sphere(q), s * sphere(k))
        ),
        "no s_qk": attention(
            attn, x, after_rope=lambda q, k: (sphere(q), sphere(k)), scale=math.sqrt(HEAD_DIM)
        ),
        "normalized before RoPE": attention(
            attn,
            x,
            before_rope=lambda q, k: (s * sphere(q), s * sphere(k)),
            scale=math.sqrt(HEAD_DIM),
        ),  # fmt: skip
    }
    with torch.no_grad():
        got = attn(x)
        torch.testing.assert_close(got, ngpt_attention(attn, x))
        for what, other in wrong.items():
            assert differs(got, other), what


def test_ngpt_mlp_matches_its_equation():
    generator = torch.Generator().manual_seed(1)
    model = build("ngpt", bias=True)
    perturb(model, generator)
    mlp = model.blocks[0].ffn
    x = torch.randn(2, 7, D_MODEL, generator=generator)
    with torch.no_grad():
        got = mlp(x)
        torch.testing.assert_close(got, ngpt_mlp(mlp, x))
        s_u, s_v = mlp.s_u.weight.clone(), mlp.s_v.weight.clone()
        assert differs(got, ngpt_mlp(mlp, x, root_d=1.0)), "without sqrt(d)"
        mlp.s_u.weight.copy_(s_v)
        mlp.s_v.weight.copy_(s_u)
        assert differs(got, mlp(x)), "s_u and s_v swapped"


def test_ngpt_whole_model_matches_its_equations():
    """Embedding rows, blocks (the nGPT equations with the attention and MLP above), no final
    norm, z = s_z * E_out h."""
    generator = torch.Generator().manual_seed(2)
    model = build("ngpt", tie_embeddings=False)
    perturb(model, generator, size=0.05)
    model.after_optimizer_step()
    idx = torch.randint(0, VOCAB, (2, 6), generator=generator)
    root_d_alpha = math.sqrt(D_MODEL) * 0.05  # alpha: init 0.05, scale 1/sqrt(d)
    with torch.no_grad():
        x = model.tok_emb.weight[idx]
        for block in model.blocks:
            alpha_a = (block.alpha_attn.weight * root_d_alpha).abs()
            alpha_m = (block.alpha_ffn.weight * root_d_alpha).abs()
            h = sphere(sphere(x) + alpha_a * (sphere(ngpt_attention(block.attn, x)) - sphere(x)))
            x = sphere(h + alpha_m * (sphere(ngpt_mlp(block.ffn, h)) - h))
        s_z = effective(model.s_z.weight, 1.0, D_MODEL**-0.5)
        expected = s_z * (x @ model.head.weight.T)
        got = model(idx)
        torch.testing.assert_close(got, expected)
        assert differs(got, x @ model.head.weight.T), "without s_z"


def test_ngpt_constants_at_init():
    """Effective values alpha_A = alpha_M = 0.05 (or model.ngpt_alpha_init), s_qk = s_u = s_v =
    s_z = 1; stored values alpha, s_qk, s_z at 1/sqrt(d), s_u, s_v at 1; softmax scale sqrt(hd)."""
    for alpha_init in (0.05, 0.2):
        model = build("ngpt", ngpt_alpha_init=alpha_init)
        root = D_MODEL**-0.5
        for block in model.blocks:
            for vector, stored, used in (
                (block.alpha_attn, root, alpha_init),
                (block.alpha_ffn, root, alpha_init),
                (block.attn.s_qk, root, 1.0),
                (block.ffn.s_u, 1.0, 1.0),
                (block.ffn.s_v, 1.0, 1.0),
            ):
                torch.testing.assert_close(vector.weight, torch.full_like(vector.weight, stored))
                torch.testing.assert_close(vector(), torch.full_like(vector.weight, used))
            assert block.attn.softmax_scale == pytest.approx(math.sqrt(HEAD_DIM))
        assert model.s_z.weight.shape == (VOCAB,)
        torch.testing.assert_close(model.s_z.weight, torch.full((VOCAB,), root))
        torch.testing.assert_close(model.s_z(), torch.ones(VOCAB))
        assert model.embed_scale == 1.0 and isinstance(model.final_norm, nn.Identity)
        assert not any(isinstance(m, tuple(NORM_CLASSES.values())) for m in model.modules())


def unit_norm_errors(model: TransformerLM) -> dict[str, float]:
    """max |norm - 1| of each nGPT matrix along its embedding dimension, named here from the
    paper's list: rows of E_in, E_out, W_q, W_k, W_v, W_u/W_v of the MLP; columns of W_o."""
    dims = {"tok_emb.weight": 1, "head.weight": 1}
    for i in range(len(model.blocks)):
        dims.update({f"blocks.{i}.attn.qkv.weight": 1, f"blocks.{i}.attn.proj.weight": 0,
                     f"blocks.{i}.ffn.fc.weight": 1, f"blocks.{i}.ffn.proj.weight": 0})  # fmt: skip
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: (params[name].norm(dim=dim) - 1).abs().max().item() for name, dim in dims.items()}


@pytest.mark.parametrize("tie", [True, False])
def test_ngpt_weights_are_unit_norm_at_construction(tie):
    errors = unit_norm_errors(build("ngpt", tie_embeddings=tie))
    assert max(errors.values()) < 1e-5, errors


def train_steps(model: TransformerLM, steps: int, renormalize: bool) -> list[float]:
    """AdamW steps on random tokens; the largest unit-norm error after each step."""
    generator = torch.Generator().manual_seed(3)
    optimizer = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-2)
    worst = []
    for _ in range(steps):
        batch = torch.randint(0, VOCAB, (4, 9), generator=generator)
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if renormalize:
            model.after_optimizer_step()
        worst.append(max(unit_norm_errors(model).values()))
    return worst


@pytest.mark.parametrize("tie", [True, False])
def test_ngpt_weights_stay_unit_norm_after_optimizer_steps(tie):
    torch.manual_seed(0)
    model = build("ngpt", tie_embeddings=tie)
    vectors = {n: p for n, p in model.named_parameters() if p.ndim == 1}
    errors = train_steps(model, 5, renormalize=True)
    assert max(errors) < 1e-5, errors
    # the learned vectors (alphas, s_qk, s_u, s_v, s_z) move with training and are not renormalized
    before = {n: p.detach().clone() for n, p in vectors.items()}
    model.after_optimizer_step()
    assert all(torch.equal(before[n], p) for n, p in vectors.items())
    assert any(differs(p, torch.full_like(p, p[0].item())) for p in vectors.values())


def test_ngpt_unit_norm_check_can_fail():
    """Without `after_optimizer_step` the same steps leave the matrices off the sphere."""
    torch.manual_seed(0)
    errors = train_steps(build("ngpt"), 5, renormalize=False)
    assert min(errors) > 1e-3, errors


@pytest.mark.parametrize("name", [n for n in PLACEMENTS if n != "ngpt"])
def test_after_optimizer_step_leaves_other_placements_alone(name):
    model = build(name)
    perturb(model, torch.Generator().manual_seed(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.after_optimizer_step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ngpt_has_no_weight_decay_and_others_keep_theirs():
    model = build("ngpt", bias=True, tie_embeddings=False)
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["params"] == [] and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters()}
    assert no_decay["weight_decay"] == 0.0
    assert all(model.no_weight_decay(p) for p in model.parameters())
    prenorm = build("prenorm", tie_embeddings=False)
    decayed = {id(p) for p in prenorm.optimizer_groups(0.1)[0]["params"]}
    assert decayed == {id(p) for p in prenorm.parameters() if not prenorm.no_weight_decay(p)}
    assert id(prenorm.head.weight) in decayed and id(prenorm.tok_emb.weight) not in decayed


# --- the KV cache through the new attention paths -------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"norm": "ngpt"}, {"norm": "prenorm", "qk_norm": True}, {"norm": "rezero", "qk_norm": True}],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_kv_cache_logits_match_the_full_forward(options):
    model = build(**options).eval()
    perturb(model, torch.Generator().manual_seed(5), size=0.1)
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(idx)
        for block in model.blocks:
            block.attn.kv_cache = KVCache()
        pieces = [model(idx[:, :4])] + [model(idx[:, t : t + 1]) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


# --- qk_norm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_qk_norm_attention_matches_its_equation(norm_type):
    """q <- N_q(q), k <- N_k(k) per head over the head dimension, before RoPE; then the usual
    softmax(q k^T / sqrt(hd)) v."""
    generator = torch.Generator().manual_seed(7)
    model = build("prenorm", norm_type=norm_type, qk_norm=True, bias=True)
    randomize_norms(model, generator)
    attn = model.blocks[1].attn
    assert isinstance(attn.q_norm, NORM_CLASSES[norm_type]) and attn.q_norm is not attn.k_norm
    assert attn.q_norm.weight.shape == (HEAD_DIM,)
    x = 2 * torch.randn(2, 7, D_MODEL, generator=generator) + 0.5
    normed = lambda q, k: (attn.q_norm(q), attn.k_norm(k))  # noqa: E731
    with torch.no_grad():
        got = attn(x)
        torch.testing.assert_close(got, attention(attn, x, before_rope=normed))
        assert differs(got, attention(attn, x)), "without the norms"
        assert differs(got, attention(attn, x, after_rope=normed)), "norms after RoPE"
        swapped = lambda q, k: (attn.k_norm(q), attn.q_norm(k))  # noqa: E731
        assert differs(got, attention(attn, x, before_rope=swapped)), "N_q and N_k swapped"


@pytest.mark.parametrize("name", [n for n in PLACEMENTS if n not in ("ngpt", "hybridnorm")])
def test_qk_norm_applies_in_every_block_of_any_placement(name):
    model = build(name, qk_norm=True)
    calls = []
    for block in model.blocks:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.register_forward_hook(lambda module, args, out: calls.append(module))
    model(torch.randint(0, VOCAB, (1, 5)))
    expected = [n for b in model.blocks for n in (b.attn.q_norm, b.attn.k_norm)]
    assert calls == expected
    assert "blocks.0.attn.q_norm.weight" in model.state_dict()
    assert all(b.attn.q_norm is None for b in build(name).blocks)  # off by default


# --- embed_norm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("name", ["prenorm", "reordered", "rezero", "postnorm"])
def test_embed_norm_normalizes_the_scaled_embedding(name, norm_type):
    """x_0 = N_e(s * Emb(t)), then the blocks, the final norm (if any) and the head."""
    generator = torch.Generator().manual_seed(8)
    model = build(name, norm_type=norm_type, embed_norm=True, init="xavier")
    assert isinstance(model.embed_norm, NORM_CLASSES[norm_type])
    randomize_norms(model, generator)
    idx = torch.randint(0, VOCAB, (2, 6), generator=generator)

    def logits(first):
        x = first(model.tok_emb.weight[idx] * math.sqrt(D_MODEL))  # xavier reads s = sqrt(d)
        for block in model.blocks:
            x = block(x)
        return model.head(model.final_norm(x))

    with torch.no_grad():
        got = model(idx)
        torch.testing.assert_close(got, logits(model.embed_norm))
        assert differs(got, logits(lambda x: x)), "without N_e"
        assert differs(got, logits(lambda x: model.embed_norm(x / math.sqrt(D_MODEL)))), "N_e(E)"
    assert isinstance(build(name).embed_norm, nn.Identity)  # off by default


# --- DyT ----------------------------------------------------------------------------------------


def test_dyt_matches_its_equation_and_init():
    generator = torch.Generator().manual_seed(9)
    dyt = DyT(D_MODEL, alpha_init=0.7)
    assert dyt.alpha.shape == (1,) and dyt.alpha.item() == pytest.approx(0.7)
    assert torch.equal(dyt.weight, torch.ones(D_MODEL))
    assert torch.equal(dyt.bias, torch.zeros(D_MODEL))
    with torch.no_grad():
        dyt.alpha.fill_(1.3)
        dyt.weight.copy_(torch.randn(D_MODEL, generator=generator))
        dyt.bias.copy_(torch.randn(D_MODEL, generator=generator))
    x = 3 * torch.randn(4, D_MODEL, generator=generator)
    gamma, beta = dyt.weight.detach(), dyt.bias.detach()
    with torch.no_grad():
        got = dyt(x)
        torch.testing.assert_close(got, gamma * torch.tanh(1.3 * x) + beta)
        assert differs(got, gamma * torch.tanh(x) + beta), "without alpha"
        assert differs(got, gamma * torch.tanh(1.3 * x + beta)), "beta inside tanh"
    dyt.reset_parameters()
    assert dyt.alpha.item() == pytest.approx(0.7)


def test_dyt_sits_wherever_a_norm_sits():
    model = build("sandwich", norm_type="dyt", dyt_alpha=0.25, qk_norm=True, embed_norm=True)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm, DyT))]
    # embed, final, and per block 4 sandwich norms + q and k norms
    assert len(norms) == 2 + 6 * 3 and all(isinstance(m, DyT) for m in norms)
    assert all(m.alpha.item() == pytest.approx(0.25) for m in norms)
    hybrid = build("hybridnorm", norm_type="dyt")
    assert all(isinstance(m, DyT) for m in hybrid.blocks[0].attn.qkv_norms)
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(id(m.alpha) in {id(p) for p in no_decay["params"]} for m in norms)


# --- ReZero -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_rezero_blocks_start_as_the_identity(shared):
    model = build("rezero", rezero_shared=shared)
    x = torch.randn(2, 5, D_MODEL)
    for block in model.blocks:
        assert block.alpha_attn.shape == (1,) and block.alpha_attn.item() == 0
        assert (block.alpha_ffn is None) == shared
        with torch.no_grad():
            torch.testing.assert_close(block(x), x)
        assert not [m for m in block.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm, DyT))]


# --- refused combinations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"norm": "ngpt", "qk_norm": True}, "model.qk_norm=true does not apply to model.norm=ngpt"),
        ({"norm": "ngpt", "embed_norm": True}, "model.embed_norm=true does not apply"),
        ({"norm": "ngpt", "ffn": "moe"}, "model.norm=ngpt needs model.ffn=dense"),
        ({"norm": "ngpt", "mlp": "gelu"}, "model.norm=ngpt needs model.ffn=dense and model.mlp"),
        ({"norm": "hybridnorm", "qk_norm": True}, "already normalizes q, k"),
        ({"norm": "ngpt", "ngpt_alpha_init": 0}, "model.ngpt_alpha_init=0 must be a positive"),
        ({"dyt_alpha": -1.0}, "model.dyt_alpha=-1.0 must be a positive number"),
        ({"norm_type": "tanh"}, "choose one of: layernorm, rmsnorm, dyt"),
        ({"qk_norm": "yes"}, "model.qk_norm='yes' must be true or false"),
    ],
)
def test_refused_combinations_are_one_line_errors(options, message):
    with pytest.raises(ValueError) as error:
        build(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


# --- nGPT under FSDP2 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ngpt_renormalization_of_fsdp2_shards_equals_the_unsharded_one(tmp_path):
    """Two gloo processes: `after_optimizer_step` on FSDP2's sharded parameters (DTensors; the
    column norms of the output projections cross the shards) gives the unsharded result."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    driver = Path(__file__).with_name("ngpt_fsdp_driver.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(driver), str(tmp_path), str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["kinds"] == ["DTensor"]
        assert report["difference"] < 1e-6 and report["off_sphere"] < 1e-5, report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["reordered", "rezero", "ngpt"])
def test_train_py_learns_beyond_the_unigram_baseline(name, tiny_corpus, tmp_path):
    """`python train.py model.norm=<name>` on the tiny corpus, the default callbacks on."""
    result = run_entry(
        "train.py", *tiny_overrides(tiny_corpus, f"model.norm={name}", f"hydra.run.dir={tmp_path}")
    )
    assert "learned beyond unigram" in result.stdout, result.stdout[-600:]


@pytest.mark.slow
def test_ngpt_weights_are_unit_norm_after_training_and_a_resume(tiny_corpus, tmp_path):
    """train.py renormalizes after each optimizer step; a resumed run goes on doing so."""
    from spannorm.inference.load import load_trained

    def train(max_steps: int) -> None:
        overrides = [
            "model.norm=ngpt",
            f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=10",
            f"hydra.run.dir={tmp_path}",
        ]
        run_entry("train.py", *tiny_overrides(tiny_corpus, *overrides), "resume=auto")

    train(10)
    first = load_trained(tmp_path)
    train(16)
    resumed = load_trained(tmp_path)
    assert (first.step, resumed.step) == (10, 16)
    for trained in (first, resumed):
        assert max(unit_norm_errors(trained.model).values()) < 1e-5
    moved = first.model.state_dict()["blocks.0.attn.qkv.weight"]
    assert not torch.equal(moved, resumed.model.state_dict()["blocks.0.attn.qkv.weight"])
