"""The run's loggers, from the `logger` config group: one or several of tensorboard, csv, wandb
(`logger=[tensorboard,wandb]`). Each option file is packaged under `logger.<name>`, so `cfg.logger`
maps names to Lightning logger configs; callbacks write to all of them (`trainer.loggers`)."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """The configured loggers, in config order (none for `logger=null` or an empty selection)."""
    from hydra.utils import instantiate

    if not logger_cfg:
        return []
    return [instantiate(conf) for conf in logger_cfg.values() if conf is not None]


def wandb_logger(offline: bool | None = None, **kwargs) -> Logger:
    """Lightning's WandbLogger, offline unless `offline=false` or (with `offline=null`) a W&B key is
    set (WANDB_API_KEY, or `wandb login`), so a run never needs the network by default; an offline
    run is uploaded later with `wandb sync <run dir>/wandb/offline-run-*`."""
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or wandb_logged_in())
    return WandbLogger(offline=offline, **kwargs)


def wandb_logged_in() -> bool:
    """Whether `wandb login` stored a key for the W&B host (in ~/.netrc), without a network call."""
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
