"""What every process runs for tests/test_distributed.py: a few tiny LanguageModel fits with plain
SGD on fixed random tokens and the default monitors on, each writing its final full weights and
last gradient norm (rank 0).

    python distributed_driver.py OUT reference                      # 1 process, batch 16
    torchrun --standalone --nproc-per-node 2 distributed_driver.py OUT ddp ddp_same_data ...

Scenario `train_py` instead runs what `torchrun ... train.py trainer=ddp` runs, on the tiny corpus
in OUT/corpus with an empty data cache, and writes each rank's number of split builds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from spannorm.training.lm import LanguageModel

from helpers import compose_config, tiny_overrides

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 2
MAX_STEPS = 2 * STEPS_PER_EPOCH
MODEL = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16}
# The sharded checkpoint an `fsdp` run writes at the end of its first epoch and `fsdp_resumed`
# continues from (resuming mid-epoch would restart the epoch's data).
RESUME_CHECKPOINT = f"step={STEPS_PER_EPOCH}.ckpt"


class SGDLanguageModel(LanguageModel):
    """LanguageModel with SGD + momentum at a constant rate: updates are linear in the gradient,
    so runs with equal gradients end with equal weights up to float rounding."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        return {
            "optimizer": optimizer,
            "lr_scheduler": torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0),
        }


def token_dataset() -> TensorDataset:
    tokens = torch.randint(
        MODEL["vocab_size"],
        (STEPS_PER_EPOCH * GLOBAL_BATCH, MODEL["max_seq_len"] + 1),
        generator=torch.Generator().manual_seed(0),
    )
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def configured_strategy(trainer: str, world_size: int):
    """The strategy of conf/trainer/<trainer>.yaml on `world_size` CPU processes."""
    overrides = [f"trainer={trainer}", "trainer.accelerator=cpu", f"trainer.devices={world_size}"]
    return instantiate(compose_config(overrides).trainer.strategy)


def default_monitors() -> list:
    """The monitors of conf/callbacks/default.yaml (all but checkpointing and the progress bar)."""
    callbacks = compose_config(["run_dir=unused"]).callbacks
    return [
        instantiate(c) for name, c in callbacks.items() if name not in ("checkpoint", "progress")
    ]


def fit(name: str, out: Path, world_size: int) -> None:
    """Run scenario `name` (reference, or ddp/fsdp with an optional _same_data or _resumed) and
    save {"weights", "grad_norm"} to OUT/<name>.pt from rank 0."""
    strategy_name, _, variant = name.partition("_")
    strategy = "auto" if name == "reference" else configured_strategy(strategy_name, world_size)
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="{step}",
        every_n_train_steps=STEPS_PER_EPOCH,
        save_top_k=-1,
    )
    L.seed_everything(0)
    lm = SGDLanguageModel(**MODEL)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world_size,
        strategy=strategy,
        max_steps=MAX_STEPS,
        logger=False,
        callbacks=[*default_monitors(), *([checkpoints] if name == "fsdp" else [])],
        enable_checkpointing=name == "fsdp",
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=variant != "same_data",  # broken: every rank reads the same data
    )
    dataset = token_dataset()
    # A distributed fit shuffles with Lightning's DistributedSampler (seeded by seed_everything);
    # rank r reads every world_size-th index of its permutation. The reference reads it whole.
    sampler = (
        DistributedSampler(dataset, num_replicas=1, rank=0, seed=0) if world_size == 1 else None
    )
    loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // world_size, sampler=sampler)
    resume = out / "checkpoints" / RESUME_CHECKPOINT if variant == "resumed" else None
    trainer.fit(lm, loader, ckpt_path=resume)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(lm.model, options=options)
    if trainer.is_global_zero:
        grad_norm = float(trainer.callback_metrics["train/grad_norm"])
        torch.save({"weights": weights, "grad_norm": grad_norm}, out / f"{name}.pt")


def train_py(out: Path, world_size: int) -> None:
    """`spannorm.cli.train.train` (train.py) with trainer=ddp on `world_size` processes started together
    on an empty data cache; saves OUT/train_py-rank<r>.pt: the splits this rank built, its loss."""

    from spannorm.cli.train import train
    from spannorm.data import datamodule

    builds = []
    build_split = datamodule.build_split

    def counted_build_split(*args, **kwargs) -> bool:
        builds.append(build_split(*args, **kwargs))
        return builds[-1]

    datamodule.build_split = counted_build_split
    corpus = {split: out / "corpus" / f"{split}.txt" for split in ("train", "validation")}
    overrides = tiny_overrides(
        {**corpus, "data_dir": out / "corpus" / "data"},
        "trainer=ddp",
        "trainer.accelerator=cpu",
        f"trainer.devices={world_size}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"run_dir={out / 'train_py'}",
    )
    cfg = compose_config(overrides)
    val_loss = train(cfg)
    result = {"builds": sum(builds), "val_loss": val_loss}
    torch.save(result, out / f"train_py-rank{os.environ.get('RANK', 0)}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    for name in sys.argv[2:]:
        if name == "train_py":
            train_py(out, world_size)
        else:
            fit(name, out, world_size)


if __name__ == "__main__":
    main()
