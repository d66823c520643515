"""Runs on disk: this process's run id, the config's resolvers, a run's directory and its saved
config (with the `_target_` paths of runs saved before the package took its current layout)."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from spannorm.errors import UsageError, first_line

# One id per process: with `now`, it keeps two runs (or sweeps) started in the same second apart.
RUN_ID = f"{os.getpid()}-{secrets.token_hex(2)}"

# `_target_` paths of the package's flat layout, which runs saved with it name, and where those
# objects live: a run's config is read through `run_config_of`, which rewrites them, so such runs
# still resume, evaluate and export.
MOVED_TARGETS = {
    "spannorm.lm.LanguageModel": "spannorm.training.lm.LanguageModel",
    "spannorm.checkpointing.LastCheckpoint": "spannorm.training.checkpointing.LastCheckpoint",
    "spannorm.checkpointing.AtomicCheckpointIO": "spannorm.training.checkpointing.AtomicCheckpointIO",
    "spannorm.sweeps.ScoreDivergedAs": "spannorm.training.sweeps.ScoreDivergedAs",
    "spannorm.loggers.wandb_logger": "spannorm.training.loggers.wandb_logger",
}


def data_vocab(data: DictConfig, size: int | None = None) -> int:
    """The model's vocab follows the data: see spannorm.data.data_vocab_size. (Configs saved
    with an older resolver pass (tokenizer kind, vocab_size) instead of the data config.)"""
    from spannorm.data import data_vocab_size
    from spannorm.data.tokenizer import ByteTokenizer

    if isinstance(data, str):
        return ByteTokenizer.vocab_size if data == "byte" else size
    return data_vocab_size(data)


def register_resolvers() -> None:
    """The config's own interpolations, `${run_id:}`, `${tokenizer_vocab:...}` and `${product:}`:
    call before composing a config (the command line's `launch` does)."""
    resolvers = {
        "run_id": lambda: RUN_ID,
        # the model's vocab follows the data: its tokenizer's, or its token files'
        "tokenizer_vocab": data_vocab,
        "product": lambda *factors: math.prod(int(f) for f in factors),  # devices x nodes
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # cached: a launcher's worker (submitit) resolves the sweep dir as its parent did
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_id")


def output_dir(cfg: DictConfig) -> Path:
    """The run's directory: `run_dir` if set, else the directory Hydra made for this job."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run_dir_of(checkpoint: Path) -> Path:
    """The directory of the run that wrote `checkpoint`: the nearest one above with `.hydra/`."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise FileNotFoundError(
        f"no .hydra/config.yaml above {checkpoint}; is it inside a run directory?"
    )


def run_config_of(checkpoint: Path) -> DictConfig:
    """The config saved by Hydra with the run that wrote `checkpoint`, its `_target_` paths of
    the flat layout rewritten (MOVED_TARGETS). ValueError naming the file if it is damaged."""
    import yaml

    run_dir = run_dir_of(checkpoint)
    path = run_dir / ".hydra" / "config.yaml"
    try:
        saved = OmegaConf.load(path)
    except yaml.YAMLError as error:
        copy = run_dir / RUN_MARKER / "config.yaml"
        fix = f"copy {copy} over it" if copy.is_file() else "restore it from a backup"
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise ValueError(f"{path} is damaged: not YAML ({problem}{where}); {fix}") from None
    if not isinstance(saved, DictConfig):
        raise ValueError(f"{path} is damaged: it holds no config mapping; restore it")
    return OmegaConf.create(with_moved_targets(OmegaConf.to_container(saved, resolve=False)))


def with_moved_targets(node):
    """A plain config container (dicts, lists) with every moved `_target_` rewritten."""
    if isinstance(node, dict):
        return {
            key: MOVED_TARGETS.get(value, value) if key == "_target_" else with_moved_targets(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [with_moved_targets(value) for value in node]
    return node


# Written by train.py in a run's directory when its training starts: a copy of the `.hydra/`
# files it started with. Its presence says "a run trained here"; the copy lets a refused start
# (a multirun job, whose `.hydra/` Hydra rewrites before any of our code runs) put back the files
# of the run it refused to overwrite.
RUN_MARKER = ".spannorm_run"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
# what a training run writes into its directory besides `.hydra/` and its log
RUN_OUTPUTS = ("checkpoints", "tb", "csv", "wandb", "eval", RUN_MARKER)


def launched_as_extra_rank() -> bool:
    """Whether this process is a rank > 0 that a launcher started (Lightning's DDP children,
    torchrun, srun): the variables Lightning itself reads its rank from, read without importing
    Lightning. Such a process runs in the directory rank 0 has checked."""
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(name)
        if value is not None:
            return value.strip() not in ("", "0")
    return False


def run_held_in(run_dir: Path) -> list[str]:
    """What in `run_dir` shows that a run trained there (empty if none): the marker train.py
    writes at its start, checkpoints, TensorBoard events, CSV metrics, W&B files. `.hydra/`
    alone is not a run (Hydra writes it for every start, also one refused for bad input)."""
    run_dir = Path(run_dir)
    found = []
    if (run_dir / RUN_MARKER).exists():
        found.append(f"{RUN_MARKER}/")
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        found += [f"checkpoints/{p.name}" for p in sorted(checkpoints.glob("*.ckpt"))][:2]
    if any((run_dir / "tb").glob("**/events.out.tfevents.*")):
        found.append("tb/ events")
    if (run_dir / "csv" / "metrics.csv").is_file():
        found.append("csv/metrics.csv")
    if (run_dir / "wandb").is_dir():
        found.append("wandb/")
    return found


def check_run_dir_free(
    run_dir: Path, resume: str | None, overwrite: bool, key: str = "hydra.run.dir"
) -> None:
    """Refuse to start a run in a directory that holds another run, unless it continues that run
    (`resume=auto`, or `resume=` a checkpoint inside it) or `overwrite=true` replaces it; refuse
    a run directory that is a file. Raises UsageError (one line); `key` names the directory there
    (an option, or words such as "the run directory")."""
    run_dir = Path(run_dir)
    where = f"{key} {str(run_dir)!r}" if " " in key else f"{key}={str(run_dir)!r}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{where} is a file; a run directory must be a folder")
    inside = resume not in (None, "auto") and _is_within(Path(resume), run_dir)
    if overwrite and (resume == "auto" or inside):
        raise UsageError(
            f"overwrite=true clears {str(run_dir)!r}, the run resume={resume} would continue; "
            "drop overwrite=true to continue it, or resume= to replace it"
        )
    if overwrite or resume == "auto" or inside:
        return
    held = run_held_in(run_dir)
    if held:
        raise UsageError(
            f"{where} already holds a run ({', '.join(held)}); continue it with "
            "resume=auto, start fresh in a new directory (another hydra.run.dir, or none), or "
            "replace it with overwrite=true"
        )


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def clear_run(run_dir: Path) -> None:
    """Delete what a previous run wrote in `run_dir` (checkpoints, events, metrics, evaluations,
    the marker), for `overwrite=true`: the new run then mixes nothing with it."""
    import shutil

    for name in RUN_OUTPUTS:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def mark_run_started(run_dir: Path) -> None:
    """Write the marker of a run that trains in `run_dir`, with a copy of its `.hydra/` files."""
    import shutil

    marker = Path(run_dir) / RUN_MARKER
    marker.mkdir(parents=True, exist_ok=True)
    for name in HYDRA_FILES:
        source = Path(run_dir) / ".hydra" / name
        if source.is_file():
            shutil.copyfile(source, marker / name)


def restore_hydra_files(run_dir: Path) -> None:
    """Put back the `.hydra/` files the run in `run_dir` started with (from its marker), after a
    refused start that Hydra had already written its own over."""
    import shutil

    marker = Path(run_dir) / RUN_MARKER
    for name in HYDRA_FILES:
        if (marker / name).is_file():
            shutil.copyfile(marker / name, Path(run_dir) / ".hydra" / name)
