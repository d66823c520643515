"""The MoE feed-forward: top-k routing, dropless output vs a per-token loop, balancing, training."""

import pytest
import torch
import torch.nn.functional as F

from spannorm import PLACEMENTS, TransformerConfig, TransformerLM
from spannorm.model.init import MatrixInit
from spannorm.model.layers import MLP
from spannorm.model.moe import MoE


def moe_config(**overrides) -> TransformerConfig:
    options = dict(d_model=16, n_heads=2, ffn="moe", n_experts=4, top_k=2)
    return TransformerConfig(**{**options, **overrides})


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(moe_config(**overrides)).double()


def reference_output(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Loop over tokens and their chosen experts, with the expert MLP written out by hand."""
    tokens = x.reshape(-1, x.shape[-1])
    _, chosen, gates = moe.route(tokens)
    out = torch.zeros_like(tokens)
    for n, token in enumerate(tokens):
        for e, gate in zip(chosen[n].tolist(), gates[n], strict=True):
            h = moe.w_in[e] @ token + (0 if moe.b_in is None else moe.b_in[e])
            if moe.kind == "swiglu":
                h = F.silu(h[: moe.hidden]) * h[moe.hidden :]
            else:
                h = F.gelu(h)
            out[n] += gate * (moe.w_out[e] @ h + (0 if moe.b_out is None else moe.b_out[e]))
        if moe.shared_expert is not None:
            out[n] += moe.shared_expert(token)
    return out.view_as(x)


def test_routing_picks_top_k_distinct_highest_experts_with_gates_summing_to_one():
    moe = make_moe(n_experts=6, top_k=3)
    probs, chosen, gates = moe.route(torch.randn(50, 16, dtype=torch.float64))
    assert chosen.shape == gates.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in chosen.tolist())
    picked = torch.zeros_like(probs, dtype=torch.bool).scatter(1, chosen, True)
    lowest_chosen = probs.masked_fill(~picked, float("inf")).min(dim=1).values
    highest_other = probs.masked_fill(picked, float("-inf")).max(dim=1).values
    assert (lowest_chosen > highest_other).all()
    torch.testing.assert_close(gates.sum(dim=1), torch.ones(50, dtype=gates.dtype))
    chosen_probs = probs.gather(1, chosen)
    torch.testing.assert_close(gates, chosen_probs / chosen_probs.sum(dim=1, keepdim=True))


def test_top_1_gate_is_the_raw_probability_so_the_router_learns_from_the_loss():
    moe = make_moe(n_experts=4, top_k=1)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    probs, chosen, gates = moe.route(x.reshape(-1, 16))
    torch.testing.assert_close(gates, probs.gather(1, chosen))
    assert (gates < 1).all()
    moe.eval()  # no aux loss: any router gradient comes through the gates
    moe(x).square().sum().backward()
    assert moe.router_weight.grad.abs().sum() > 0


def test_expert_hidden_size_follows_the_dense_mlp_rule():
    for mlp in ("swiglu", "gelu"):
        cfg = moe_config(mlp=mlp, d_model=40, mlp_ratio=3.0)
        assert MoE(cfg).hidden == MLP(cfg).hidden


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 13), (5, 1)])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(top_k=1, n_experts=5),
        dict(top_k=3, n_experts=7, mlp="gelu", bias=True),
        dict(moe_shared_expert=True, bias=True),
    ],
)
def test_output_matches_per_token_reference(shape, options):
    moe = make_moe(**options).eval()
    x = torch.randn(*shape, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference_output(moe, x))


def test_every_expert_gets_a_gradient_even_when_unused():
    moe = make_moe(n_experts=8, top_k=2).eval()
    moe(torch.randn(1, 2, 16, dtype=torch.float64)).sum().backward()
    assert moe.last_load.count_nonzero() <= 4
    for param in (moe.router_weight, moe.w_in, moe.w_out):
        assert param.grad is not None and param.grad.isfinite().all()
    assert moe.router_weight.grad.abs().sum() > 0


def cyclic_router(moe: MoE, strength: float) -> torch.Tensor:
    """Router giving token class j its top-2 experts {j, j+1}; returns one token of each class."""
    M = moe.n_experts
    with torch.no_grad():
        moe.router_weight.zero_()
        for e in range(M):
            moe.router_weight[e, e] = strength
            moe.router_weight[e, (e - 1) % M] = strength / 2
    return torch.eye(M, 16, dtype=torch.float64).repeat(3, 1).unsqueeze(0)


def test_aux_loss_is_coef_when_router_and_load_are_uniform_and_larger_when_skewed():
    coef = 0.01
    moe = make_moe(n_experts=4, top_k=2, moe_aux_loss_coef=coef).train()
    x = cyclic_router(moe, strength=1.0)
    moe(x)
    quarter = torch.full((4,), 0.25, dtype=torch.float64)
    torch.testing.assert_close(moe.last_load, quarter)
    mean_prob = moe.route(x[0])[0].mean(dim=0)
    torch.testing.assert_close(mean_prob, quarter)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(coef, dtype=torch.float64))

    with torch.no_grad():
        moe.router_weight[0] += 3.0  # every token now prefers expert 0
    moe(x)
    mean_prob = moe.route(x[0])[0].mean(dim=0)
    assert moe.last_load[0] == 0.5
    torch.testing.assert_close(moe.aux_loss, coef * 4 * (moe.last_load * mean_prob).sum())
    assert moe.aux_loss > 1.5 * coef


def test_aux_loss_is_absent_in_eval_and_with_zero_coef():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    moe = make_moe()
    moe.eval()(x)
    assert moe.aux_loss is None
    moe = make_moe(moe_aux_loss_coef=0.0)
    moe.train()(x)
    assert moe.aux_loss is None


def skewed_moe(**overrides) -> tuple[MoE, torch.Tensor]:
    """An MoE whose router sends nearly every token to expert 0, and its inputs."""
    moe = make_moe(n_experts=4, top_k=1, **overrides)
    torch.manual_seed(1)
    x = torch.randn(1, 256, 16, dtype=torch.float64)
    x[..., 0] += 2.0
    with torch.no_grad():
        moe.router_weight.mul_(0.1)
        moe.router_weight[0, 0] += 1.0
    return moe, x


def test_bias_balancing_moves_load_toward_uniform_without_touching_gates():
    moe, x = skewed_moe(moe_bias_balance=True, moe_bias_update_rate=0.01)
    moe.eval()(x)
    skewed_load = moe.last_load.clone()
    assert skewed_load.max() > 0.7 and moe.expert_bias.abs().sum() == 0  # eval does not update
    moe.train()
    for _ in range(150):
        moe(x)
    balanced_load = moe.last_load
    assert balanced_load.max() < 0.4
    assert balanced_load.max() - balanced_load.min() < 0.5 * (skewed_load.max() - skewed_load.min())
    assert moe.expert_bias[0] < 0  # the overloaded expert was pushed down
    probs, chosen, _ = moe.route(x[0])
    assert (chosen[:, 0] != probs.argmax(dim=1)).any()  # the bias changed the selection


def test_balancing_bias_changes_the_selection_but_not_the_gates():
    moe = make_moe(n_experts=4, top_k=2, moe_bias_balance=True)
    x = torch.randn(64, 16, dtype=torch.float64)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))  # forces experts {0, 1}
    probs, chosen, gates = moe.route(x)
    assert (chosen.sort(dim=1).values == torch.tensor([0, 1])).all()
    chosen_probs = probs.gather(1, chosen)
    torch.testing.assert_close(gates, chosen_probs / chosen_probs.sum(dim=1, keepdim=True))


def test_without_bias_balancing_the_load_stays_skewed():
    moe, x = skewed_moe()
    moe.train()
    for _ in range(20):
        moe(x)
    assert moe.expert_bias is None and moe.last_load.max() > 0.7


def test_router_entropy_is_log_n_experts_for_a_uniform_router():
    moe = make_moe(n_experts=8, top_k=2)
    with torch.no_grad():
        moe.router_weight.zero_()
    moe(torch.randn(2, 3, 16, dtype=torch.float64))
    torch.testing.assert_close(moe.last_router_entropy, torch.tensor(8.0).double().log())


@pytest.mark.parametrize("scheme", ["normal", "gpt2", "deepnorm"])
def test_init_weights_follows_the_scheme(scheme):
    cfg = moe_config(n_layers=8, d_model=64, n_experts=2)
    moe = MoE(cfg)
    init = MatrixInit(scheme, cfg)
    moe.init_weights(init)
    gain = init.beta
    if init.unit_variance:  # xavier: std = gain * sqrt(2 / (fan_in + fan_out))
        expected_in = gain * (2 / (moe.hidden + 64)) ** 0.5
        expected_out = expected_in
    else:
        expected_in = cfg.init_std * gain
        expected_out = expected_in * init.out_scale
    for e in range(2):
        gate, up = moe.w_in[e].split(moe.hidden)
        for matrix, expected in (
            (gate, expected_in),
            (up, expected_in),
            (moe.w_out[e], expected_out),
        ):
            assert matrix.std().item() == pytest.approx(expected, rel=0.1)


# nGPT's MLP scalings (s_u, s_v) are defined for the dense SwiGLU MLP only: model.ffn=moe is
# refused under it (tests/test_placements_2026.py)
@pytest.mark.parametrize("norm", [name for name in PLACEMENTS if name != "ngpt"])
def test_every_placement_runs_with_moe(norm):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, norm=norm, ffn="moe"
    )
    model = TransformerLM(cfg)
    model(torch.randint(0, 64, (2, 9))).sum().backward()
    assert all(isinstance(block.ffn, MoE) for block in model.blocks)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("norm", ["prenorm", "spannorm"])
def test_moe_language_model_trains(norm):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=256,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=32,
        norm=norm,
        ffn="moe",
        n_experts=4,
        top_k=2,
        moe_shared_expert=True,
        moe_bias_balance=True,
    )
    model = TransformerLM(cfg)
    assert all(isinstance(block.ffn, MoE) for block in model.blocks)
    text = b"to be or not to be, that is the question; whether tis nobler in the mind. " * 8
    data = torch.tensor(list(text))
    starts = torch.arange(0, len(data) - 33, 23)
    batch = torch.stack([data[s : s + 33] for s in starts[:8]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        aux = model.aux_loss()
        assert aux is not None and aux.requires_grad
        optimizer.zero_grad()
        (loss + aux).backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]
