"""Compare finished runs from their TensorBoard events and Hydra files: a markdown table, loss
curves and a per-group summary of the final validation loss (`scripts/compare_runs.py`).

A run is a directory holding `.hydra/config.yaml` (its composed config, interpolations kept) and
`.hydra/overrides.yaml` (its command-line overrides; group choices such as `data=text` are only
there); a multirun directory stands for its job subdirectories `0/`, `1/`, ...
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from spannorm.analysis.scalars import read_scalars
from spannorm.tags import PROFILE_METRICS, block_series

Series = list[tuple[int, float]]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"norm": "x"}} -> {"model.norm": "x"}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """["model.norm=spannorm", "+experiment=deep"] -> {"model.norm": "spannorm", "experiment":
    "deep"}; deletions (`~key`) are left out."""
    pairs = (o.lstrip("+").split("=", 1) for o in overrides if "=" in o and not o.startswith("~"))
    return {key: value for key, value in pairs}


@dataclass
class Run:
    """One run: its name in the report, its settings and its logged scalars."""

    name: str
    settings: dict[str, Any]  # flattened config, plus the overrides it does not show
    scalars: dict[str, Series]

    @classmethod
    def load(cls, path: Path, name: str) -> Run:
        hydra_dir = path / ".hydra"
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        settings = {**parse_overrides(list(overrides)), **flatten(config)}
        return cls(name, settings, read_scalars(path))

    def values(self, tag: str) -> list[float]:
        return [value for _, value in self.scalars.get(tag, [])]

    @property
    def final_val_loss(self) -> float:
        return (self.values("val/loss") or [math.nan])[-1]

    @property
    def best_val_loss(self) -> float:
        return min(self.values("val/loss"), default=math.nan)

    @property
    def last_step(self) -> int:
        """The last step at which a `train/` or `val/` scalar was logged."""
        steps = [
            s
            for tag, series in self.scalars.items()
            if tag.startswith(("train/", "val/"))
            for s, _ in series
        ]
        return max(steps, default=0)

    @property
    def median_tokens_per_sec(self) -> float:
        rates = self.values("throughput/tokens_per_sec")
        return statistics.median(rates) if rates else math.nan

    @property
    def diverged_at(self) -> int | None:
        """The step the divergence guard stopped at, if it did."""
        series = self.scalars.get("train/diverged")
        return series[0][0] if series else None

    @property
    def complete(self) -> bool:
        """Trained to its trainer.max_steps, or stopped by the divergence guard."""
        max_steps = self.settings.get("trainer.max_steps")
        if self.diverged_at is not None or not isinstance(max_steps, int):
            return True
        return self.last_step >= max_steps - 1

    def layer_profile(self, metric: str) -> list[float]:
        """`layers/<metric>/block_<l>` at the last step it was logged, in block order."""
        return [series[-1][1] for series in block_series(self.scalars, metric)]

    @property
    def loss_spikes(self) -> int | None:
        spikes = self.values("train/loss_spikes")
        return int(spikes[-1]) if spikes else None


def find_runs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(run directory, name) for each run under `paths`: a run directory itself, or the job
    subdirectories of a multirun directory (in job order). Names are paths relative to the
    runs' common parent."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / ".hydra" / "config.yaml").is_file():
            found.append(path)
            continue
        jobs = (
            [p for p in path.iterdir() if (p / ".hydra" / "config.yaml").is_file()]
            if path.is_dir()
            else []
        )
        if not jobs:
            raise FileNotFoundError(
                f"{path} is neither a run directory (with .hydra/config.yaml) nor a multirun "
                "directory of such runs"
            )
        found.extend(sorted(jobs, key=lambda p: (len(p.name), p.name)))  # job 2 before job 10
    parent = common_parent(found)
    return [(path, str(path.resolve().relative_to(parent))) for path in found]


def common_parent(paths: list[Path]) -> Path:
    """The deepest directory containing every path (a path's parent if there is only one)."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return resolved[0].parent
    return Path(os.path.commonpath(resolved))


def differing_keys(runs: list[Run]) -> list[str]:
    """Settings whose value is not the same in every run, in config order."""
    keys = dict.fromkeys(key for run in runs for key in run.settings)
    return [k for k in keys if len({repr(run.settings.get(k)) for run in runs}) > 1]


def format_number(value: float, digits: int = 4) -> str:
    return "–" if math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def runs_table(runs: list[Run], keys: list[str]) -> str:
    """One row per run: the differing settings, then the results."""
    header = [
        "run",
        *keys,
        "final val loss",
        "best val loss",
        "last step",
        "median tokens/s",
        "diverged",
        "loss spikes",
    ]
    rows = [
        [
            run.name,
            *(str(run.settings.get(key, "")) for key in keys),
            format_number(run.final_val_loss),
            format_number(run.best_val_loss),
            str(run.last_step),
            format_number(run.median_tokens_per_sec, 0),
            "no" if run.diverged_at is None else f"yes (step {run.diverged_at})",
            "–" if run.loss_spikes is None else str(run.loss_spikes),
        ]
        for run in runs
    ]
    return markdown_table(header, rows)


def eval_table(runs: list[Run]) -> str | None:
    """One row per run, one column per downstream metric `eval/<task>/<metric>` (eval.py
    tasks=[...]), its latest value; None when no run was evaluated."""
    tags = sorted({tag for run in runs for tag in run.scalars if tag.startswith("eval/")})
    if not tags:
        return None
    rows = [
        [
            run.name,
            *(
                format_number(run.values(tag)[-1] if tag in run.scalars else math.nan)
                for tag in tags
            ),
        ]
        for run in runs
    ]
    return markdown_table(["run", *(tag.removeprefix("eval/") for tag in tags)], rows)


def group_runs(runs: list[Run], group_by: str) -> dict[str, list[Run]]:
    """Runs by their values of the settings in `group_by`: one dotted config key or override, or
    several separated by commas (the group's name joins their values with " / ")."""
    keys = group_by.split(",")
    for key in keys:
        if not any(key in run.settings for run in runs):
            raise ValueError(
                f"--group-by {key!r} is set in none of the runs; settings that differ between "
                f"them: {', '.join(differing_keys(runs)) or '(none)'}"
            )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        name = " / ".join(str(run.settings.get(key, "(unset)")) for key in keys)
        groups.setdefault(name, []).append(run)
    return groups


def group_title(group_by: str) -> str:
    """`--group-by`'s keys as a heading: "model.norm / seed" for "model.norm,seed"."""
    return group_by.replace(",", " / ")


def group_label(group_by: str, value: str) -> str:
    """`key=value` for one grouping key; the values alone for several (they are in the title)."""
    return value if "," in group_by else f"{group_by}={value}"


def finished_losses(runs: list[Run], loss: str = "final_val_loss") -> list[float]:
    """`loss` of each run that finished its steps without diverging and has one."""
    values = (getattr(r, loss) for r in runs if r.complete and r.diverged_at is None)
    return [v for v in values if not math.isnan(v)]


def mean_spread(values: list[float]) -> str:
    """ "mean ± sample std", the value alone if there is one, "–" if none."""
    if len(values) < 2:
        return format_number(values[0]) if values else "–"
    return f"{format_number(statistics.mean(values))} ± {format_number(statistics.stdev(values))}"


def groups_table(groups: dict[str, list[Run]], group_by: str) -> str:
    """Per group: runs, diverged and unfinished runs, and over the runs that finished without
    diverging, the mean ± sample std of the final and the best val loss, and the final's range."""
    rows = []
    for value, members in groups.items():
        final = finished_losses(members)
        rows.append(
            [
                value,
                str(len(members)),
                str(sum(r.diverged_at is not None for r in members)),
                str(sum(not r.complete for r in members)),
                mean_spread(final),
                mean_spread(finished_losses(members, "best_val_loss")),
                format_number(min(final, default=math.nan)),
                format_number(max(final, default=math.nan)),
            ]
        )
    header = [
        group_title(group_by),
        "runs",
        "diverged",
        "unfinished",
        "final val loss mean ± std",
        "best val loss mean ± std",
        "min",
        "max",
    ]
    return markdown_table(header, rows)


def sort_key(value: str) -> tuple[int, float | str]:
    """Numbers in numeric order, before anything else in text order."""
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def runs_by_value(runs: list[Run], key: str) -> dict[str, list[Run]]:
    """Runs by their value of the setting `key` (as text; "None" where unset), in `sort_key`
    order."""
    found: dict[str, list[Run]] = {}
    for run in runs:
        found.setdefault(str(run.settings.get(key)), []).append(run)
    return dict(sorted(found.items(), key=lambda item: sort_key(item[0])))


def pivot_table(groups: dict[str, list[Run]], group_by: str, pivot: str) -> str:
    """Groups as rows, the values of the setting `pivot` as columns; a cell: the final val loss
    (mean ± std over seeds), or which runs diverged (at which step) or are unfinished."""
    columns = list(runs_by_value([r for rs in groups.values() for r in rs], pivot))
    rows = []
    for value, members in groups.items():
        at = runs_by_value(members, pivot)
        cells = []
        for column in columns:
            runs = at.get(column, [])
            losses = finished_losses(runs)
            notes = [mean_spread(losses)] if losses else []
            notes += [
                f"diverged at step {r.diverged_at}" for r in runs if r.diverged_at is not None
            ]
            notes += ["unfinished" for r in runs if not r.complete]
            cells.append("; ".join(notes))
        rows.append([value, *cells])
    return markdown_table([f"{group_title(group_by)} \\ {pivot}", *columns], rows)


def plot_loss_curves(groups: dict[str, list[Run]], group_by: str, path: Path) -> None:
    """Train and validation loss against step, one line per run, one color per group."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = figure.subplots(1, 2)
    for color, (value, members) in enumerate(groups.items()):
        for index, run in enumerate(members):
            for axes, tag in zip(panels, ("train/loss", "val/loss"), strict=True):
                steps, losses = zip(*run.scalars.get(tag, [(0, math.nan)]), strict=True)
                axes.plot(
                    steps,
                    losses,
                    color=f"C{color % 10}",
                    alpha=0.8,
                    lw=1.2,
                    marker="." if tag == "val/loss" else None,
                    label=group_label(group_by, value) if index == 0 else None,
                )
    for axes, title in zip(panels, ("train loss", "validation loss"), strict=True):
        by = f" by {group_title(group_by)}" if "," in group_by else ""
        axes.set(title=title + by, xlabel="step", ylabel="loss (nats)")
        axes.grid(alpha=0.3)
    panels[1].legend(fontsize=8)
    figure.savefig(path, dpi=100)


def plot_group_summary(groups: dict[str, list[Run]], group_by: str, path: Path) -> None:
    """Final val loss per group: each run as a dot, the mean with a ± std bar."""
    figure = Figure(figsize=(max(4, 1.2 * len(groups)), 3.5), layout="constrained")
    axes = figure.subplots()
    for position, members in enumerate(groups.values()):
        losses = finished_losses(members)
        if not losses:
            continue
        axes.scatter([position] * len(losses), losses, color=f"C{position % 10}", alpha=0.6, s=14)
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        axes.errorbar(
            position + 0.15, statistics.mean(losses), yerr=spread, fmt="o", color="k", capsize=4
        )
    axes.set_xticks(range(len(groups)), list(groups), fontsize=8)
    axes.set(
        xlabel=group_by, ylabel="final val loss (nats)", title="final validation loss by group"
    )
    axes.grid(alpha=0.3, axis="y")
    figure.savefig(path, dpi=100)


def pivot_axis(values: list[str]) -> tuple[dict[str, float], bool]:
    """Where each value of a pivot setting sits on the x axis, and whether the axis is numeric:
    at the number itself when all values are numbers, else one slot each in the given order
    (model.alpha = 1, deepnorm, sqrt2L)."""
    numeric = all(sort_key(value)[0] == 0 for value in values)
    return {v: float(v) if numeric else float(i) for i, v in enumerate(values)}, numeric


def plot_pivot(groups: dict[str, list[Run]], group_by: str, pivot: str, path: Path) -> None:
    """Final val loss against the setting `pivot` (numbers on a numeric axis, log when they span
    10x or more; text among the values makes every value a category), a line per group through
    the means; diverged runs as crosses on the top edge."""
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    top = max((v for rs in groups.values() for v in finished_losses(rs)), default=1.0)
    values = list(runs_by_value([r for rs in groups.values() for r in rs], pivot))
    position, numeric = pivot_axis(values)
    for color, (value, members) in enumerate(groups.items()):
        at = {position[text]: runs for text, runs in runs_by_value(members, pivot).items()}
        means = [
            (x, statistics.mean(losses))
            for x, runs in at.items()
            if (losses := finished_losses(runs))
        ]
        if means:
            axes.plot(*zip(*means, strict=True), "o-", color=f"C{color % 10}", label=value)
        diverged = [x for x, runs in at.items() for r in runs if r.diverged_at is not None]
        axes.plot(diverged, [top * 1.05] * len(diverged), "x", color=f"C{color % 10}", ms=10)
    xs = list(position.values())
    if not numeric:
        axes.set_xticks(xs, values)
    elif xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        axes.set_xscale("log")
    axes.set(xlabel=pivot, ylabel="final val loss (nats)", title="x: diverged")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=100)


def plot_layer_profiles(groups: dict[str, list[Run]], path: Path) -> bool:
    """Per-block statistics at each run's last logged step (callbacks.layer_stats), a panel per
    metric, a line per run colored by group; False (nothing drawn) if no run logged them."""
    if not any(run.layer_profile("rms") for rs in groups.values() for run in rs):
        return False
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    panels = figure.subplots(1, len(PROFILE_METRICS))
    for color, (value, members) in enumerate(groups.items()):
        for index, run in enumerate(members):
            for axes, metric in zip(panels, PROFILE_METRICS, strict=True):
                profile = run.layer_profile(metric)
                axes.plot(
                    range(len(profile)),
                    profile,
                    color=f"C{color % 10}",
                    alpha=0.8,
                    label=value if index == 0 else None,
                )
    for axes, metric in zip(panels, PROFILE_METRICS, strict=True):
        axes.set(title=metric, xlabel="block")
        if metric != "cos":
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=7)
    figure.savefig(path, dpi=100)
    return True


def compare(
    paths: list[Path], group_by: str, out: Path | None = None, pivot: str | None = None
) -> list[Path]:
    """Write `runs.md`, `loss_curves.png`, `final_val_loss_by_group.png`, with `pivot` also
    `final_val_loss_by_<pivot>.png`, and `layer_profiles.png` where the runs logged layer
    statistics, into `out` (default: `compare/` in the runs' common parent); return their paths."""
    found = find_runs(paths)
    runs = [Run.load(path, name) for path, name in found]
    out = Path(out) if out is not None else common_parent([p for p, _ in found]) / "compare"
    out.mkdir(parents=True, exist_ok=True)
    keys = differing_keys(runs)
    groups = group_runs(runs, group_by)
    written = [out / "runs.md", out / "loss_curves.png", out / "final_val_loss_by_group.png"]
    plot_loss_curves(groups, group_by, written[1])
    plot_group_summary(groups, group_by, written[2])
    sections = [
        f"# {len(runs)} runs\n\n{runs_table(runs, keys)}",
        f"## Final validation loss by {group_title(group_by)}\n\n"
        "Over the runs that finished without diverging.\n\n"
        f"{groups_table(groups, group_by)}",
    ]
    downstream = eval_table(runs)
    if downstream is not None:
        sections.append(f"## Downstream tasks (eval/)\n\n{downstream}")
    if pivot is not None:
        written.append(out / f"final_val_loss_by_{pivot}.png")
        plot_pivot(groups, group_by, pivot, written[-1])
        sections.append(
            f"## Final validation loss by {pivot}\n\n{pivot_table(groups, group_by, pivot)}\n\n"
            f"![final val loss by {pivot}]({written[-1].name})"
        )
    sections.append(
        "![loss curves](loss_curves.png)\n\n![final val loss by group](final_val_loss_by_group.png)"
    )
    if plot_layer_profiles(groups, out / "layer_profiles.png"):
        written.append(out / "layer_profiles.png")
        sections.append("![per-block statistics at the last logged step](layer_profiles.png)")
    written[0].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return written
