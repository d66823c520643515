"""Outputs and gradients of TransformerLM for several configs, saved to argv[1] (or compared)."""
import sys, torch
from spannorm import TransformerConfig, TransformerLM
from spannorm.inference.generate import generate
torch.set_num_threads(1)
configs = [
    dict(),
    dict(norm="hybridnorm"),
    dict(norm="spannorm", norm_type="rmsnorm"),
    dict(mlp="gelu", d_model=16, n_heads=2, max_seq_len=16),
    dict(norm="postnorm", d_model=24, n_heads=3, max_seq_len=40),
    dict(norm="hybridnorm", hybridnorm_star=True, d_model=16, n_heads=4),
]
out = {}
for i, c in enumerate(configs):
    torch.manual_seed(i)
    m = TransformerLM(TransformerConfig(**{"vocab_size": 97, "n_layers": 3, **c}))
    T = min(m.cfg.max_seq_len, 37)
    idx = torch.randint(0, 97, (3, T))
    logits = m(idx)
    logits.square().mean().backward()
    out[f"{i}/logits"] = logits.detach()
    for n, p in m.named_parameters():
        out[f"{i}/grad/{n}"] = p.grad
    m.eval()
    torch.manual_seed(0)
    out[f"{i}/gen_cache"] = generate(m, idx[:1, :5], 8, temperature=1.0, kv_cache=True)
    out[f"{i}/gen_full"] = generate(m, idx[:1, :5], 8, temperature=1.0, kv_cache=False)
    with torch.no_grad():
        out[f"{i}/bf16"] = m.to(torch.bfloat16)(idx).float()
if sys.argv[2] == "save":
    torch.save(out, sys.argv[1])
else:
    ref = torch.load(sys.argv[1])
    bad = [k for k in ref if not torch.equal(ref[k], out[k])]
    print(f"{len(ref)} tensors compared; differing: {bad[:10]} ({len(bad)})")
