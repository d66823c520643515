"""Mixture-of-Experts routing statistics, every `every_n_steps` steps, under `moe/`.

For MoE block l with M experts, from that step's training forwards (`MoE.last_load`,
`MoE.last_router_entropy` after each micro batch, averaged over the micro batches and the
processes, which all hold the same number of tokens: the step's whole global batch),
f_e = share of the token->expert assignments going to expert e:
    moe/load_max/block_l        max_e f_e         (1/M when balanced, 1 when one expert takes all)
    moe/load_min/block_l        min_e f_e         (0: an expert got no tokens)
    moe/router_entropy/block_l  mean over tokens of H(softmax(W_r x)) in nats (log M = uniform)
    moe/load_imbalance          max over MoE blocks of M * max_e f_e   (1 = perfectly balanced)
Dense models log nothing.
"""

from __future__ import annotations

import lightning as L
import torch

from spannorm.callbacks import log_scalars, sum_over_processes
from spannorm.model.moe import MoE
from spannorm.tags import block_tag


class ExpertLoadMonitor(L.Callback):
    """Logs the `moe/` scalars above every `every_n_steps` optimizer steps."""

    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"callbacks.experts.every_n_steps={every_n_steps} must be at least 1")
        self.every_n_steps = every_n_steps
        self._layers: dict[int, MoE] = {}  # block index: its MoE layer
        self._sums: torch.Tensor | None = None  # [MoE blocks, M + 1]: loads, router entropy
        self._micro_batches = 0

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        """After each micro batch's forward: add its loads and router entropies."""
        if trainer.global_step % self.every_n_steps:
            return
        blocks = pl_module.model.blocks
        self._layers = {i: b.ffn for i, b in enumerate(blocks) if isinstance(b.ffn, MoE)}
        if not self._layers:
            return
        moes = self._layers.values()
        sums = torch.stack(
            [torch.cat([moe.last_load, moe.last_router_entropy.view(1)]) for moe in moes]
        ).float()
        self._sums = sums if self._sums is None else self._sums + sums
        self._micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._sums is None:
            return
        n_blocks = len(pl_module.model.blocks)
        counted = self._micro_batches * trainer.world_size
        means = (sum_over_processes(trainer, self._sums) / counted).cpu()
        self._sums, self._micro_batches = None, 0
        loads, entropies = means[:, :-1], means[:, -1]
        load_max, load_min = loads.amax(dim=1).tolist(), loads.amin(dim=1).tolist()
        metrics = {"moe/load_imbalance": loads.shape[1] * max(load_max)}
        per_block = {
            "load_max": load_max,
            "load_min": load_min,
            "router_entropy": entropies.tolist(),
        }
        for metric, series in per_block.items():
            for index, value in zip(self._layers, series, strict=True):
                metrics[block_tag("moe", metric, index, n_blocks)] = value
        log_scalars(trainer, metrics, trainer.global_step)
