"""Training monitors, each a Lightning callback with one job, configured in conf/callbacks/:

- `layer_stats.LayerStatsMonitor`  per-block signal, gradient and attention statistics (`layers/`)
- `experts.ExpertLoadMonitor`      MoE expert load and router entropy (`moe/`)
- `throughput.ThroughputMonitor`   tokens/s, step time, MFU, peak memory (`throughput/`)
- `divergence.DivergenceGuard`     stops on a non-finite loss, counts loss spikes (`train/`)
- `hparams.HParamsSummary`         key config + final val loss in TensorBoard's HPARAMS tab
- `progress.StepProgressBar`       the rich progress bar, counting steps (120/300)

This module holds what they share and imports no Lightning, so that the CLI can catch
`TrainingDiverged` without loading it.
"""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


def log_scalars(trainer, metrics: dict[str, float], step: int) -> None:
    """Write `metrics` to every logger of `trainer` at `step`, whatever Lightning's
    `log_every_n_steps` (which `LightningModule.log` would follow)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def block_tag(namespace: str, metric: str, block: int, n_blocks: int) -> str:
    """`<namespace>/<metric>/block_07`, zero-padded so the tags sort by depth."""
    return f"{namespace}/{metric}/block_{block:0{max(2, len(str(n_blocks - 1)))}d}"
