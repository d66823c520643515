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

    with checking_input():
        check_eval_options(cfg)
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


# eval.py's options that only the downstream tasks (`tasks=[...]`) use
TASK_OPTIONS = ("include_path", "limit", "num_fewshot", "batch_size", "bootstrap_iters")


def check_eval_options(cfg: DictConfig) -> None:
    """Refuse, in one line, options eval.py would pass on to fail deep inside lm-eval or torch,
    an accelerator this machine lacks, and task options given without tasks (they would be
    ignored: the validation loss always reads the run's whole validation split)."""
    from spannorm.training.checks import check_accelerator

    check_accelerator(cfg.accelerator, key="accelerator")
    batch_size = cfg.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size={batch_size!r} must be a positive integer")
    limit = cfg.limit
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0
    ):
        raise UsageError(
            f"limit={limit!r} must be a positive number of examples per task (a fraction below "
            "1: that share of each task), or null for all of them"
        )
    if cfg.num_fewshot is not None and (
        not isinstance(cfg.num_fewshot, int) or cfg.num_fewshot < 0
    ):
        raise UsageError(f"num_fewshot={cfg.num_fewshot!r} must be an integer >= 0, or null")
    if not cfg.get("tasks"):
        given = [key for key in TASK_OPTIONS if key in command_line_keys()]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{', '.join(given)} {verb} only to downstream tasks (tasks=[...]); without "
                "tasks eval.py reports the validation loss on the run's whole validation split"
            )


def command_line_keys() -> set[str]:
    """The config keys this run's command line sets (none outside a Hydra run)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}


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

    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    include_path = cfg.get("include_path")
    with checking_input():
        if include_path is not None and not Path(include_path).is_dir():
            raise FileNotFoundError(f"include_path={include_path!r} is not a folder of task YAMLs")
        task_manager = task_manager_for(tasks, include_path)
        trained = load_trained(cfg.ckpt_path, tokenizer_file=cfg.get("tokenizer_file"))
        tokenizer = trained.tokenizer
    checkpoint, step = trained.checkpoint, trained.step
    run_dir = run_dir_of(checkpoint)
    device = "cuda" if cfg.accelerator in ("gpu", "cuda") else cfg.accelerator
    lm = SpannormLM(
        trained.model, tokenizer, batch_size=cfg.batch_size, device=device, seed=cfg.seed
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
