"""Signal propagation at init across placements and depths (conf/signal_propagation.yaml).

For every placement, depth and seed: build the model, run one forward/backward on a batch of real
corpus tokens and record per block the stream's RMS, ||dLoss/dx_l|| and cos(x_{l-1}, x_l)
(`spannorm.analysis.measure_signal`). Writes a CSV of every block, a markdown summary table and one
figure per metric (a panel per depth, a line per placement).
"""

from __future__ import annotations

import csv
import math
import time
from collections import defaultdict
from pathlib import Path

import hydra
import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from spannorm import TransformerConfig, TransformerLM
from spannorm.analysis import measure_signal, summarize_signal
from spannorm.analysis.signal import METRICS
from spannorm.cli import friendly_errors, launch
from spannorm.console import console
from spannorm.data.prepare import build_datamodule

FIGURES = {  # measure_signal's metric (a CSV column) -> (figure title, log y)
    "rms": ("stream RMS  sqrt(mean(x_l^2))", False),
    "stream_grad_norm": ("gradient norm  ||dLoss/dx_l||", True),
    "cos": ("cos(x_{l-1}, x_l), mean over tokens", False),
}


def evenly_spaced_windows(tokens: np.ndarray, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens at evenly spaced offsets through the corpus."""
    starts = np.linspace(0, len(tokens) - length, count).astype(int)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def init_for(cfg: DictConfig, placement: str) -> str:
    return cfg.init_per_placement.get(placement, cfg.init)


def measure_all(
    cfg: DictConfig, idx: torch.Tensor, vocab_size: int
) -> dict[tuple[str, int], list[dict[str, list[float]]]]:
    """(placement, depth) -> `measure_signal`'s result for each seed, in `cfg.seeds` order."""
    runs = [(p, d, s) for d in cfg.depths for p in cfg.placements for s in cfg.seeds]
    results = defaultdict(list)
    for count, (placement, depth, seed) in enumerate(runs, 1):
        start = time.perf_counter()
        torch.manual_seed(seed)
        model_cfg = TransformerConfig.from_kwargs(
            **{
                **OmegaConf.to_container(cfg.model),
                "norm": placement,
                "n_layers": depth,
                "init": init_for(cfg, placement),
                "vocab_size": vocab_size,
                "max_seq_len": idx.shape[1],
            }
        )
        measured = measure_signal(TransformerLM(model_cfg), idx)
        results[placement, depth].append(measured)
        ratio = summarize_signal(measured)["grad_ratio"]
        console.print(
            f"[{count:3d}/{len(runs)}] {placement:10s} L={depth:<4d} seed {seed}  "
            f"grad ratio {ratio:9.3g}  ({time.perf_counter() - start:5.1f} s)"
        )
    return results


def write_csv(cfg: DictConfig, results: dict, path: Path) -> None:
    """One row per (placement, depth, seed, block)."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["placement", "depth", "seed", "block", *METRICS])
        for (placement, depth), per_seed in results.items():
            for seed, measured in zip(cfg.seeds, per_seed, strict=True):
                per_block = zip(*(measured[metric] for metric in METRICS), strict=True)
                for block, values in enumerate(per_block):
                    writer.writerow([placement, depth, seed, block, *values])


def write_summary(cfg: DictConfig, results: dict, idx: torch.Tensor, path: Path) -> None:
    """Per placement and depth; over seeds: mean RMS and cosine, geometric-mean gradient ratio."""
    lines = [
        f"Signal propagation at init: d_model={cfg.model.d_model}, n_heads={cfg.model.n_heads}, "
        f"norm_type={cfg.model.norm_type}, mlp={cfg.model.mlp}; {idx.shape[0]} x {idx.shape[1]} "
        f"{cfg.data.source} tokens ({cfg.data.tokenizer}); seeds {list(cfg.seeds)}.",
        "",
        "| placement | L | init | RMS block 0 | RMS block L-1 | grad ratio 0/(L-1) "
        "| mean cos, last L/4 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (placement, depth), per_seed in results.items():
        rows = [summarize_signal(measured) for measured in per_seed]
        mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
        ratio = math.exp(sum(math.log(row["grad_ratio"]) for row in rows) / len(rows))
        lines.append(
            f"| {placement} | {depth} | {init_for(cfg, placement)} | {mean['rms_first']:.3f} "
            f"| {mean['rms_last']:.3f} | {ratio:.3g} | {mean['cos_last_quarter']:.4f} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot_metric(cfg: DictConfig, results: dict, metric: str, path: Path) -> None:
    title, log_y = FIGURES[metric]
    depths = list(cfg.depths)
    fig = Figure(figsize=(4.5 * len(depths) + 1.5, 4), layout="constrained")
    axes = fig.subplots(1, len(depths), squeeze=False)
    colors = {name: colormaps["tab10"](i % 10) for i, name in enumerate(cfg.placements)}
    for ax, depth in zip(axes[0], depths, strict=True):
        for placement in cfg.placements:
            for seed_index, measured in enumerate(results[placement, depth]):
                ax.plot(
                    measured[metric],
                    color=colors[placement],
                    linewidth=2.5 if placement == "spannorm" else 1.2,
                    label=placement if seed_index == 0 else None,
                )
        ax.set_title(f"L = {depth}")
        ax.set_xlabel("block l")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    fig.suptitle(f"{title} at init (d_model={cfg.model.d_model})")
    fig.savefig(path, dpi=110)


@hydra.main(version_base="1.3", config_path="../conf", config_name="signal_propagation")
@friendly_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = build_datamodule(cfg.data)
    idx = evenly_spaced_windows(datamodule.train_tokens, cfg.data.batch_size, cfg.data.seq_len)
    start = time.perf_counter()
    results = measure_all(cfg, idx, datamodule.vocab_size)
    write_csv(cfg, results, out / "signal.csv")
    write_summary(cfg, results, idx, out / "summary.md")
    for metric in METRICS:
        plot_metric(cfg, results, metric, out / f"signal_{metric}.png")
    console.print(
        f"measured {len(results)} placement x depth settings in "
        f"{time.perf_counter() - start:.0f} s -> {out}/"
    )


if __name__ == "__main__":
    launch(main)
