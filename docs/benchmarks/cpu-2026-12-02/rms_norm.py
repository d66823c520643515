"""F.rms_norm against torch.ops.aten._fused_rms_norm on CPU: same bits? faster? (1 thread)"""
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
x = torch.randn(8, 256, 256, requires_grad=True)
w = (1 + 0.3 * torch.randn(256)).requires_grad_()
g = torch.randn(8, 256, 256)


def ref():
    return torch.nn.functional.rms_norm(x, [256], w, 1e-5)


def fused():
    return torch.ops.aten._fused_rms_norm(x, [256], w, 1e-5)[0]


outs = {}
for name, f in (("ref", ref), ("fused", fused)):
    y = f()
    outs[name] = (y, *torch.autograd.grad(y, (x, w), g))
for a, b in zip(outs["ref"], outs["fused"]):
    print(torch.equal(a, b), (a - b).abs().max().item(), a.abs().max().item())
for name, f in (("ref", ref), ("fused", fused)) * 3:
    t = time.thread_time()
    for _ in range(20):
        y = f()
        torch.autograd.grad(y, (x, w), g)
    print(name, (time.thread_time() - t) / 20 * 1e3, "ms")
