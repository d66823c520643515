"""The LightningModule: composes the Transformer, the loss, AdamW and the warmup+cosine schedule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics.aggregation import MeanMetric

from spannorm.model import TransformerConfig, TransformerLM, get_placement
from spannorm.training.optim import OptimConfig, build_optimizer
from spannorm.training.parallel import (
    apply_activation_checkpointing,
    apply_compile,
    apply_fsdp,
    fsdp_mixed_precision,
)

# The keywords of LanguageModel itself; every other keyword is a TransformerConfig field.
TRAINING_OPTIONS = ("optim", "compile", "activation_checkpointing")


def model_config(model_options: dict[str, Any]) -> TransformerConfig:
    """The TransformerConfig of a `model` config's options; raises a one-line error on bad ones."""
    config = TransformerConfig.from_kwargs(**model_options)
    get_placement(config.norm)
    return config


class LanguageModel(L.LightningModule):
    """Next-token prediction with `TransformerLM`. Every keyword but the `TRAINING_OPTIONS` is a
    model option (`TransformerConfig`); `optim` holds every `OptimConfig` option (the values of
    conf/optim/adamw.yaml; needed to train, not to run a trained model); `compile` and
    `activation_checkpointing` are applied in `configure_model`."""

    def __init__(
        self,
        optim: dict | DictConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        **model_options: Any,
    ) -> None:
        super().__init__()
        if isinstance(optim, DictConfig):
            optim = OmegaConf.to_container(optim, resolve=True)
        self.save_hyperparameters(
            {
                "optim": optim or {},
                "compile": compile,
                "activation_checkpointing": activation_checkpointing,
                **model_options,
            }
        )
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.model = TransformerLM(model_config(model_options))
        self.val_loss = MeanMetric()
        self._step_losses: dict[str, list[torch.Tensor]] = {"train/loss": [], "train/aux_loss": []}
        self._model_configured = False

    def configure_model(self) -> None:
        """Activation checkpointing, compilation and, under `ModelParallelStrategy`, FSDP2 over
        its data-parallel mesh, each applied once to the inner model."""
        if self._model_configured:
            return
        if self.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        if self.compile_blocks:
            apply_compile(self.model)
        if self.device_mesh is not None:
            if self.device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    "the model has no tensor-parallel plan; set "
                    "trainer.strategy.tensor_parallel_size=1"
                )
            device_type = self.trainer.strategy.root_device.type
            policy = fsdp_mixed_precision(self.trainer.precision, device_type)
            apply_fsdp(self.model, self.device_mesh["data_parallel"], policy)
        self._model_configured = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Lightning validates when the run is asked to stop, once even at a val_check_interval
        # step: so every run ends with a validation at its last step, whatever the interval
        if 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def logger_writes(self) -> bool:
        """Whether the logger writes this training step's metrics (every
        `trainer.log_every_n_steps`, at a stop, and at the last step): train/lr and train/grad_norm, which only the
        logger reads, are logged at those steps only, since each `self.log` costs about 1 ms of
        Lightning's bookkeeping per step on CPU (docs/performance.md). (A callback that stopped the
        run in the middle of a step would get the last logged values written at that step.)"""
        trainer = self.trainer
        last_step = 0 < trainer.max_steps <= trainer.global_step + 1
        return (
            trainer._logger_connector.should_update_logs or last_step
        )  # as Lightning's lr monitor

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self._step_losses["train/loss"].append(loss.detach())
        aux = self.model.aux_loss()
        if aux is None:
            return loss
        self._step_losses["train/aux_loss"].append(aux.detach())
        return loss + aux

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log train/loss (and train/aux_loss) of the step's whole global batch: the mean over
        its micro batches (gradient accumulation) and over the processes (every step: the progress
        bar shows it), and train/lr where the logger writes."""
        for name, losses in self._step_losses.items():
            if losses:
                self.log(
                    name, torch.stack(losses).mean(), prog_bar=name == "train/loss", sync_dist=True
                )
            losses.clear()
        if self.logger_writes():
            self.log("train/lr", self.lr_schedulers().get_last_lr()[0])

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer's step, then the model's own rule for its weights after a step (nGPT
        puts its matrices back on the unit sphere; other placements: nothing). Runs on every
        process, on the sharded parameters under FSDP2."""
        super().optimizer_step(*args, **kwargs)
        self.model.after_optimizer_step()

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_loss.update(self.loss(batch), weight=batch[0].shape[0])

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Log train/grad_norm (before clipping) and clip by norm with that same norm: one norm
        computation per step instead of one for the log and one inside clip_grad_norm_."""
        params = [p for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if self.logger_writes():
            self.log("train/grad_norm", norm)
        if gradient_clip_algorithm in (None, "norm"):
            if gradient_clip_val:
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optim = OptimConfig.from_options(self.hparams.optim)
        total = (
            self.trainer.max_steps
            if self.trainer.max_steps > 0
            else self.trainer.estimated_stepping_batches
        )
        groups = self.model.optimizer_groups(optim.weight_decay)
        optimizer, schedule = build_optimizer(groups, optim, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
