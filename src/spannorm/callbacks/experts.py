"""Mixture-of-Experts routing statistics, every `every_n_steps` steps, under `moe/`.

For MoE block l with M experts, from that step's training forward (`MoE.last_load`,
`MoE.last_router_entropy`), f_e = share of the token->expert assignments going to expert e:
    moe/load_max/block_l        max_e f_e         (1/M when balanced, 1 when one expert takes all)
    moe/load_min/block_l        min_e f_e         (0: an expert got no tokens)
    moe/router_entropy/block_l  mean over tokens of H(softmax(W_r x)) in nats (log M = uniform)
    moe/load_imbalance          max over MoE blocks of M * max_e f_e   (1 = perfectly balanced)
Dense models log nothing.
"""

from __future__ import annotations

import lightning as L
import torch

from spannorm.callbacks import block_tag, log_scalars
from spannorm.model.moe import MoE


class ExpertLoadMonitor(L.Callback):
    """Logs the `moe/` scalars above every `every_n_steps` optimizer steps."""

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.experts.every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        blocks = pl_module.model.blocks
        layers = {
            index: block.ffn for index, block in enumerate(blocks) if isinstance(block.ffn, MoE)
        }
        if not layers:
            return
        loads = torch.stack([moe.last_load for moe in layers.values()])  # [MoE blocks, M]
        entropies = torch.stack([moe.last_router_entropy for moe in layers.values()])
        load_max, load_min = loads.amax(dim=1).tolist(), loads.amin(dim=1).tolist()
        metrics = {"moe/load_imbalance": loads.shape[1] * max(load_max)}
        per_block = {
            "load_max": load_max,
            "load_min": load_min,
            "router_entropy": entropies.tolist(),
        }
        for metric, series in per_block.items():
            for index, value in zip(layers, series, strict=True):
                metrics[block_tag("moe", metric, index, len(blocks))] = value
        log_scalars(trainer, metrics, trainer.global_step)
