"""One optimization problem on 1 or N processes: `data.global_batch_size` sequences per step.

With `data.global_batch_size` = G set, each optimizer step sees G sequences whatever the number of
data-parallel processes W (`trainer.devices` x `trainer.num_nodes`) and the micro batch b
(`data.batch_size`, sequences per process per forward): gradients are accumulated over
A = G / (b x W) micro batches. `trainer.val_check_interval`, which Lightning counts in micro
batches, is scaled by A so that it keeps counting optimizer steps, like `trainer.max_steps`,
`trainer.log_every_n_steps`, the learning-rate schedule and the monitors. With the training order
of `spannorm.data.sampling.EpochShuffle`, every (b, W, A) with the same G sees the same batches.
Null (the default): a global batch of b x W, and no accumulation unless
`trainer.accumulate_grad_batches` says so.
"""

from __future__ import annotations

from omegaconf import DictConfig, open_dict


def data_parallel_size(trainer: DictConfig) -> int:
    """W: the processes that each read their own share of a batch (`devices` x `num_nodes`)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(
            f"data.global_batch_size needs the number of processes, but trainer.devices={devices}; "
            "give trainer.devices as a positive number (processes per node)"
        )
    return devices * nodes


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """A = global / (micro x world), or a one-line ValueError saying which global batches work."""
    per_pass = micro_batch * world_size
    if global_batch < 1 or global_batch % per_pass:
        raise ValueError(
            f"data.global_batch_size={global_batch} is not a positive multiple of data.batch_size="
            f"{micro_batch} x {world_size} process(es) = {per_pass}; choose a multiple of "
            f"{per_pass} or change data.batch_size"
        )
    return global_batch // per_pass


def apply_global_batch(cfg: DictConfig) -> int | None:
    """Set `trainer.accumulate_grad_batches` (and scale `trainer.val_check_interval`) from
    `data.global_batch_size`; return the accumulation, or None when the option is unset."""
    global_batch = cfg.data.get("global_batch_size")
    if global_batch is None:
        return None
    configured = cfg.trainer.get("accumulate_grad_batches", 1)
    if configured != 1:
        raise ValueError(
            f"data.global_batch_size={global_batch} sets the gradient accumulation itself; "
            f"drop trainer.accumulate_grad_batches={configured}"
        )
    steps = accumulation_steps(global_batch, cfg.data.batch_size, data_parallel_size(cfg.trainer))
    with open_dict(cfg.trainer):
        cfg.trainer.accumulate_grad_batches = steps
        if isinstance(cfg.trainer.get("val_check_interval"), int):
            cfg.trainer.val_check_interval *= steps
    return steps
