"""Loggers beside TensorBoard (csv, W&B offline, several at once) and the Optuna search."""

from __future__ import annotations

import csv
import json
import math
import struct

from omegaconf import OmegaConf

from spannorm.analysis.scalars import read_scalars

from helpers import run_entry, tiny_overrides

EXPECTED = ("train/loss", "val/loss", "layers/rms/block_00")


def csv_columns(run_dir) -> dict[str, list[float]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) for row in rows if row[key]] for key in rows[0]}


def wandb_history(run_dir) -> dict[str, list]:
    """The history rows of an offline W&B run, read from its transaction log: a 7-byte header
    (":W&B", magic, version), then LevelDB log records (crc32c, length, type) in 32 KiB blocks,
    each a `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    block, position, pending, payloads = 32768, 7, b"", []
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            payloads.append(pending)
            pending = b""
    history: dict[str, list] = {}
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                history.setdefault(key, []).append(json.loads(item.value_json))
    return history


def test_csv_wandb_and_tensorboard_at_once_receive_the_same_scalars(trained_run):
    columns = csv_columns(trained_run)
    history = wandb_history(trained_run)
    scalars = read_scalars(trained_run / "tb")
    for tag in EXPECTED:
        assert columns[tag] == [value for _, value in scalars[tag]], tag
        assert history[tag] == [value for _, value in scalars[tag]], tag
    assert len(columns["val/loss"]) == 2 and all(map(math.isfinite, columns["val/loss"]))
    assert history["hp/final_val_loss"] == [columns["val/loss"][-1]]
    # the per-block profile image: TensorBoard and W&B take images, CSV does not
    images = list((trained_run / "wandb").glob("offline-run-*/files/media/images/layers/profile*"))
    assert len(images) == 2  # steps 0 and 10


def test_an_optuna_study_survives_a_diverged_trial_and_reports_its_best(tiny_corpus, tmp_path):
    """Three trials with the example search (its lr range replaced by a choice that includes a
    rate that diverges at once); the sampler's seed makes trials 0 and 2 diverge."""
    overrides = tiny_overrides(
        tiny_corpus,
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "callbacks.layer_stats=null",
        "callbacks.hparams=null",
        "checkpoint_every_n_steps=null",
        "hparams_search=lr_warmup",
        "hydra.sweeper.n_trials=3",
        "optim.lr=choice(1e-2,1e30)",
        "optim.warmup_steps=int(interval(0,10))",
        "seed=1",
        f"hydra.sweep.dir={tmp_path}",
    )
    result = run_entry("train.py", *overrides)
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    returned = {}
    for job in ("0", "1", "2"):
        job_overrides = OmegaConf.load(tmp_path / job / ".hydra" / "overrides.yaml")
        returned[job] = dict(o.split("=", 1) for o in job_overrides if o.startswith("optim."))
    diverged = [job for job, params in returned.items() if float(params["optim.lr"]) > 1]
    assert diverged and len(diverged) < 3, returned  # the seed gives both kinds of trial
    assert result.stderr.count("training diverged") == len(diverged)
    final_losses = {
        job: read_scalars(tmp_path / job / "tb")["val/loss"][-1][1]
        for job in returned
        if job not in diverged
    }
    best_job = min(final_losses, key=final_losses.get)
    assert best.best_value == final_losses[best_job]
    assert best.best_params == {
        k: float(v) if "lr" in k else int(v) for k, v in returned[best_job].items()
    }
    assert "Best value" in result.stdout + result.stderr
