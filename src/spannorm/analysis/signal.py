"""Signal propagation through the block stack: one forward/backward, measured per block.

For the stream x_l leaving block l (x_{-1} = the scaled token embedding entering block 0):
- `rms[l]`              = sqrt(mean(x_l^2)), the stream's scale;
- `stream_grad_norm[l]` = ||dLoss/dx_l||_F, the gradient reaching block l's output,
  with Loss = mean next-token cross-entropy;
- `cos[l]`              = mean over tokens of cos(x_{l-1}, x_l), how much block l turns the
  stream (near 1 = the block barely changes the representation).
They are the definitions, and the names, of the monitors' per-block scalars of the same names
(`spannorm.tags.LAYER_METRICS`), so a measurement at init and a training run's
`layers/<metric>/block_NN` read alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

METRICS = ("rms", "stream_grad_norm", "cos")  # what `measure_signal` returns per block


def next_token_loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against idx[:, t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


def measure_signal(model: nn.Module, idx: torch.Tensor) -> dict[str, list[float]]:
    """Run `model` (a TransformerLM) on token ids `idx` [B, T] once forward and backward and
    return per-block lists `rms`, `stream_grad_norm` and `cos` (see the module docstring).

    Parameter gradients are left untouched: the backward pass asks only for the gradients of
    the block outputs.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def record(block: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        outputs.append(output)

    handles = [block.register_forward_hook(record) for block in model.blocks]
    try:
        with torch.enable_grad():
            loss = next_token_loss(model(idx), idx)
            grads = torch.autograd.grad(loss, outputs)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        return {
            "rms": [out.pow(2).mean().sqrt().item() for out in outputs],
            "stream_grad_norm": [grad.norm().item() for grad in grads],
            "cos": [
                F.cosine_similarity(x_in, out, dim=-1).mean().item()
                for x_in, out in zip(inputs, outputs, strict=True)
            ],
        }


def summarize_signal(measured: dict[str, list[float]]) -> dict[str, float]:
    """One row of the summary table from `measure_signal`'s lists:
    `rms_first`, `rms_last` (blocks 0 and L-1), `grad_ratio` =
    stream_grad_norm[0] / stream_grad_norm[L-1]
    (> 1: the gradient grows toward the bottom) and `cos_last_quarter`, the mean `cos` over the
    last L // 4 blocks (at least one)."""
    cos = measured["cos"]
    last_quarter = cos[len(cos) - max(1, len(cos) // 4) :]
    return {
        "rms_first": measured["rms"][0],
        "rms_last": measured["rms"][-1],
        "grad_ratio": measured["stream_grad_norm"][0] / measured["stream_grad_norm"][-1],
        "cos_last_quarter": sum(last_quarter) / len(last_quarter),
    }
