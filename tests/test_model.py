"""The public model API: shapes, limits, optimizer groups, generation with and without KV cache."""

import pytest
import torch

from spannorm import TransformerConfig
from spannorm.inference.generate import generate
from spannorm.training.optim import warmup_cosine

from helpers import tiny_model


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
@pytest.mark.parametrize("tie", [True, False])
def test_logits_shape_and_tying(mlp, tie):
    model = tiny_model(mlp=mlp, tie_embeddings=tie)
    assert model(torch.randint(0, 50, (3, 7))).shape == (3, 7, 50)
    assert (model.head.weight is model.tok_emb.weight) == tie
    assert isinstance(model.blocks, torch.nn.ModuleList)
    assert all(hasattr(b, "attn") and hasattr(b, "ffn") for b in model.blocks)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny_model().eval()
    idx = torch.randint(0, 50, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 50
    torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(idx)[:, 6:], model(changed)[:, 6:])


def test_sequence_beyond_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(d_model=30, n_heads=4), "not divisible"),
        (dict(n_layers=0), "n_layers=0 must be a positive"),
        (dict(norm_type="batchnorm"), "layernorm, rmsnorm"),
        (dict(ffn="moe", n_experts=2, top_k=3), "top_k=3"),
    ],
)
def test_invalid_config_names_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**bad)


def test_optimizer_groups_skip_norms_biases_and_embeddings():
    model = tiny_model(bias=True)
    decay, no_decay = model.optimizer_groups(0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.tok_emb.weight) not in decayed
    assert all(p.ndim >= 2 for p in decay["params"])
    assert id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.blocks[0].attn.qkv.bias) in {id(p) for p in no_decay["params"]}
    n_all = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_all


@pytest.mark.parametrize("norm", ["prenorm", "spannorm", "hybridnorm"])
def test_kv_cache_generation_matches_full_recompute(norm):
    model = tiny_model(norm=norm)
    prompt = torch.randint(0, 50, (2, 5))
    cached = generate(model, prompt, 12, temperature=0, kv_cache=True)
    recomputed = generate(model, prompt, 12, temperature=0, kv_cache=False)
    assert cached.shape == (2, 17)
    torch.testing.assert_close(cached, recomputed)
    assert all(block.attn.kv_cache is None for block in model.blocks)


def test_sampling_respects_top_k_and_seed():
    model = tiny_model()
    prompt = torch.randint(0, 50, (1, 3))
    logits = model(prompt)[0, -1]
    allowed = set(torch.topk(logits, 1).indices.tolist())
    out = generate(model, prompt, 1, temperature=1.0, top_k=1)
    assert out[0, -1].item() in allowed
    draw = [
        generate(model, prompt, 8, 1.0, 10, generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    torch.testing.assert_close(draw[0], draw[1])


def test_kv_cache_refuses_to_run_past_the_context():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(tiny_model(), torch.zeros(1, 60, dtype=torch.long), 10, kv_cache=True)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine(55, 10, 100, 0.1)
    assert 0.1 < mid < 1.0
