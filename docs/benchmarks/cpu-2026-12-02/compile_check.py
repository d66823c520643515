"""One compiled training step of a 2-block toy model (prenorm, gelu): its wall time and its
difference from the eager step (loss, gradients). Run: PYTHONPATH=src OMP_NUM_THREADS=1 python THIS."""
import time, torch, sys
from spannorm.model import TransformerConfig, TransformerLM
torch.manual_seed(0)
torch.set_num_threads(1)
cfg = TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, max_seq_len=32, norm="prenorm", mlp="gelu")
m = TransformerLM(cfg)
idx = torch.randint(0, 512, (2, 32))
def run(model):
    model.zero_grad()
    out = model(idx)
    logits = out if torch.is_tensor(out) else out[0]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten())
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]
l0, g0 = run(m)
for b in m.blocks: b.compile()
t = time.time(); l1, g1 = run(m); print("first compiled step", time.time() - t)
print("loss eq", torch.equal(l0, l1), (l0 - l1).abs().item())
print("max grad diff", max((a - b).abs().max().item() for a, b in zip(g0, g1)))
