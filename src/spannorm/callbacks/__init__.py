"""Training monitors, each a Lightning callback with one job, configured in conf/callbacks/:

- `layer_stats.LayerStatsMonitor`  per-block signal, gradient and attention statistics (`layers/`)
- `experts.ExpertLoadMonitor`      MoE expert load and router entropy (`moe/`)
- `throughput.ThroughputMonitor`   tokens/s, step time, MFU, peak memory (`throughput/`)
- `divergence.DivergenceGuard`     stops on a non-finite loss, counts loss spikes (`train/`)
- `hparams.HParamsSummary`         key config + final val loss in TensorBoard's HPARAMS tab
- `progress.StepProgressBar`       the rich progress bar, counting steps (120/300)

Under data parallelism (`trainer=ddp`, `trainer=fsdp`) every monitor measures the optimizer
step's whole global batch, over every micro batch and process: rank-local sums are added up
across the processes (`sum_over_processes`), sharded tensors are gathered (`full_tensor`), and
Lightning's loggers write on rank 0 only. See docs/monitoring.md, "Several processes".

This module holds what they share and imports no Lightning.
"""

from __future__ import annotations

import torch


def draw_between_steps(trainer) -> bool:
    """Whether a callback that draws (the progress bar, the layer-profile image) should draw in
    the training thread, between steps, rather than on a thread of its own: on CPU, where every
    core runs an OpenMP worker of the step, and a drawing thread that takes a core from one of
    them stalls the others at every barrier and holds the GIL the step's Python needs (the bar's
    thread cost the default CPU run 7.6% of its throughput, the image's ~4.8%: docs/performance.md).
    On a GPU the loop mostly waits on the device, so a drawing thread overlaps it."""
    return trainer.strategy.root_device.type == "cpu"


def log_scalars(trainer, metrics: dict[str, float], step: int) -> None:
    """Write `metrics` to every logger of `trainer` at `step`, whatever Lightning's
    `log_every_n_steps` (which `LightningModule.log` would follow)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def sum_over_processes(trainer, values: torch.Tensor) -> torch.Tensor:
    """`values` summed over all processes (one all-reduce; as is on a single process)."""
    return trainer.strategy.reduce(values.to(trainer.strategy.root_device), reduce_op="sum")


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded or partial) DTensor, e.g. a norm over FSDP2 gradients
    (a collective: every process must call it); a plain tensor as is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


class StepLoss:
    """The training loss of the optimizer step's whole global batch, from the losses
    `on_before_backward` receives (each micro batch's, already divided by the number of
    accumulated micro batches): summed on each process, then averaged over the processes."""

    def __init__(self) -> None:
        self.total = 0.0

    def add(self, loss: torch.Tensor) -> float:
        """Add one micro batch's loss; return its value (one device sync)."""
        value = loss.detach().float().item()
        self.total += value
        return value

    def pop(self, trainer) -> float:
        """The step's loss (one all-reduce under data parallelism); starts the next step."""
        total = sum_over_processes(trainer, torch.tensor(self.total))
        self.total = 0.0
        return float(total) / trainer.world_size
