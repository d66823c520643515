"""`eval.py`: a checkpoint's validation loss on its run's data, or its downstream results with
lm-evaluation-harness (`tasks=[...]`: JSON and TensorBoard scalars `eval/...` in the run's
directory)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spannorm.console import console
from spannorm.errors import UsageError, checking_input
from spannorm.runs import run_dir_of


def evaluate(cfg: DictConfig) -> float | dict[str, float]:
    """Validation loss and perplexity of a checkpoint on its run's validation data; with `tasks`,
    its downstream results with lm-evaluation-harness (`spannorm.inference.harness`)."""
    import lightning as L

    from spannorm.data.prepare import build_datamodule
    from spannorm.inference.load import load_trained

    if cfg.get("tasks"):
        return run_tasks(cfg)

    with checking_input():
        trained = load_trained(cfg.ckpt_path)
        datamodule = build_datamodule(trained.config.data)
    trainer = L.Trainer(
        accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=cfg.progress
    )
    metrics = trainer.validate(trained.lm, datamodule=datamodule, verbose=False)[0]
    loss = metrics["val/loss"]
    console.print(f"checkpoint {trained.checkpoint}")
    console.print(f"val/loss {loss:.4f}  val/ppl {metrics['val/ppl']:.2f}")
    return loss


def run_tasks(cfg) -> dict[str, float]:
    """Evaluate a checkpoint on `cfg.tasks` with the harness; write the results as JSON in the
    run directory (`eval/<time>.json`) and as TensorBoard scalars `eval/<task>/<metric>` at the
    checkpoint's step; return the scalars."""
    from torch.utils.tensorboard import SummaryWriter

    from spannorm.inference.harness import (
        SpannormLM,
        evaluate_with_harness,
        scalars_of,
        task_manager_for,
    )
    from spannorm.inference.load import load_trained

    tasks = list(cfg.tasks)
    include_path = cfg.get("include_path")
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"include_path={include_path!r} is not a folder of task YAMLs")
    task_manager = task_manager_for(tasks, include_path)
    trained = load_trained(cfg.ckpt_path)
    checkpoint, step = trained.checkpoint, trained.step
    run_dir = run_dir_of(checkpoint)
    device = "cuda" if cfg.accelerator in ("gpu", "cuda") else cfg.accelerator
    lm = SpannormLM(
        trained.model, trained.tokenizer, batch_size=cfg.batch_size, device=device, seed=cfg.seed
    )
    try:
        output = evaluate_with_harness(lm, tasks, task_manager, cfg)
    except ConnectionError as error:  # a task's dataset is on the hub and the hub is unreachable
        raise UsageError(
            f"{error.args[0] if error.args else error}: the task's data must be downloaded once "
            "(network); offline, evaluate on local task files with include_path=<folder>"
        ) from error
    scalars = scalars_of(output["results"])
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    report = {
        "checkpoint": str(checkpoint),
        "step": step,
        "tasks": tasks,
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "results": output["results"],
        "n_samples": output.get("n-samples"),
        "configs": output.get("configs"),
        "scalars": scalars,
        "eval_config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = out_dir / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{'+'.join(tasks)}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    with SummaryWriter(str(out_dir)) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)
    console.print(f"checkpoint {checkpoint} (step {step})")
    for tag, value in scalars.items():
        console.print(f"{tag:40s} {value:.4f}" if math.isfinite(value) else f"{tag:40s} {value}")
    console.print(f"results: {path}")
    return scalars
