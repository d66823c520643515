"""Tables and figures of a tuning grid and a depth sweep, from per-run summaries
(`scripts/sweep_summary.py` writes one JSON per finished run; `scripts/grid_report.py` calls this).

A cell is (placement, depth, learning rate, warm-up); its runs are the seeds. For each placement
the report gives the grid of final validation losses (mean ± sample std over seeds), its best
cell, its band (the cells whose mean is within `band` nats of its best), when each run left the
unigram plateau, and, where runs at other depths exist, loss against depth and the per-block
gradient profiles of the deepest runs.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from spannorm.analysis.compare import format_number, markdown_table, mean_spread


@dataclass(frozen=True)
class Cell:
    norm: str
    n_layers: int
    lr: float
    warmup: int


def load_summaries(directory: Path) -> list[dict]:
    """Every `*.json` summary under `directory`, in name order."""
    paths = sorted(Path(directory).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"no run summaries (*.json) in {directory}")
    return [json.loads(path.read_text()) for path in paths]


def cell_of(summary: dict) -> Cell:
    s = summary["settings"]
    return Cell(
        s["model.norm"],
        int(s["model.n_layers"]),
        float(s["optim.lr"]),
        int(s["optim.warmup_steps"]),
    )


def final_loss(summary: dict) -> float:
    """The final val loss of a run that finished without diverging, else NaN."""
    value = summary.get("final_val_loss")
    if summary.get("diverged_at") is not None or value is None:
        return math.nan
    return float(value)


def by_cell(summaries: list[dict]) -> dict[Cell, list[dict]]:
    cells: dict[Cell, list[dict]] = {}
    for summary in summaries:
        cells.setdefault(cell_of(summary), []).append(summary)
    for runs in cells.values():
        runs.sort(key=lambda r: r["settings"]["seed"])
    return cells


def losses(runs: list[dict]) -> list[float]:
    return [v for v in map(final_loss, runs) if not math.isnan(v)]


def cell_mean(runs: list[dict]) -> float:
    values = losses(runs)
    return statistics.mean(values) if values else math.nan


def best_cell(
    cells: dict[Cell, list[dict]], norm: str, n_layers: int = 32, min_seeds: int = 2
) -> Cell | None:
    """The cell of `norm` at `n_layers` with the lowest mean final loss among those with at least
    `min_seeds` finished runs (any number of runs if no cell has that many yet)."""
    mine = {c: r for c, r in cells.items() if c.norm == norm and c.n_layers == n_layers}
    for need in (min_seeds, 1):
        scored = [(cell_mean(r), c) for c, r in mine.items() if len(losses(r)) >= need]
        if scored:
            return min(scored, key=lambda item: item[0])[1]
    return None


def band(cells: dict[Cell, list[dict]], best: Cell, width: float) -> list[Cell]:
    """The cells of `best`'s placement and depth whose mean is within `width` of its mean."""
    top = cell_mean(cells[best])
    return [
        c
        for c, r in cells.items()
        if c.norm == best.norm and c.n_layers == best.n_layers and cell_mean(r) <= top + width
    ]


def lr_text(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def escape_text(runs: list[dict]) -> str:
    """Each seed's plateau escape step, or "never"."""
    steps = [r.get("plateau_escape_step") for r in runs]
    return ", ".join("never" if s is None else str(int(s)) for s in steps)


def loss_text(runs: list[dict], escapes: bool = False) -> str:
    """A cell's final val loss, "mean ± std (n runs)", with each run's escape step in brackets if
    `escapes`; empty for a cell that did not run."""
    if not runs:
        return ""
    text = f"{mean_spread(losses(runs))} ({len(runs)})"
    return f"{text} [{escape_text(runs)}]" if escapes else text


def grid_tables(cells: dict[Cell, list[dict]], norm: str, n_layers: int = 32) -> tuple[str, str]:
    """Warm-up rows x learning-rate columns: the final val loss (mean ± std, n runs), and each
    run's plateau escape step."""
    mine = {c: r for c, r in cells.items() if c.norm == norm and c.n_layers == n_layers}
    lrs = sorted({c.lr for c in mine})
    warmups = sorted({c.warmup for c in mine})
    loss_rows, escape_rows = [], []
    for warmup in warmups:
        loss_cells, escape_cells = [], []
        for lr in lrs:
            runs = mine.get(Cell(norm, n_layers, lr, warmup), [])
            loss_cells.append(loss_text(runs))
            escape_cells.append(escape_text(runs))
        loss_rows.append([str(warmup), *loss_cells])
        escape_rows.append([str(warmup), *escape_cells])
    header = ["warm-up \\ lr", *map(lr_text, lrs)]
    return markdown_table(header, loss_rows), markdown_table(header, escape_rows)


def side_by_side_table(cells: dict[Cell, list[dict]], norms: list[str], n_layers: int = 32) -> str:
    """A row per warm-up and placement, a column per learning rate: the final val loss (mean ±
    std, n runs) and each run's plateau escape step, so the placements read cell against cell."""
    mine = {c: r for c, r in cells.items() if c.norm in norms and c.n_layers == n_layers}
    lrs = sorted({c.lr for c in mine})
    rows = []
    for warmup in sorted({c.warmup for c in mine}):
        for norm in norms:
            runs_at = [mine.get(Cell(norm, n_layers, lr, warmup), []) for lr in lrs]
            if not any(runs_at):
                continue
            rows.append([f"{warmup}, {norm}", *(loss_text(r, escapes=True) for r in runs_at)])
    return markdown_table(["warm-up, placement \\ lr", *map(lr_text, lrs)], rows)


def summary_table(cells: dict[Cell, list[dict]], norms: list[str], width: float) -> str:
    rows = []
    for norm in norms:
        best = best_cell(cells, norm)
        if best is None:
            continue
        runs = cells[best]
        members = band(cells, best, width)
        escapes = [
            r.get("plateau_escape_step")
            for c, rs in cells.items()
            if c.norm == norm and c.n_layers == 32
            for r in rs
        ]
        never = sum(s is None for s in escapes)
        rows.append(
            [
                norm,
                f"lr {lr_text(best.lr)}, warm-up {best.warmup}",
                loss_text(runs),
                format_number(min(losses(runs), default=math.nan)),
                format_number(max(losses(runs), default=math.nan)),
                f"{len(members)} of {sum(1 for c in cells if c.norm == norm and c.n_layers == 32)}: "
                + ", ".join(
                    f"{lr_text(c.lr)}/{c.warmup}"
                    for c in sorted(members, key=lambda c: (c.lr, c.warmup))
                ),
                f"{len(escapes) - never} of {len(escapes)}",
            ]
        )
    header = [
        "placement",
        "best cell",
        "final val loss mean ± std (runs)",
        "min",
        "max",
        f"band: cells within {width} nats of the best (lr/warm-up)",
        "runs that left the plateau",
    ]
    return markdown_table(header, rows)


HEATMAP_SPAN = 0.75  # nats of color scale above the best cell; worse cells share the top color


def heatmap_range(means: list[float], span: float = HEATMAP_SPAN) -> tuple[float, float, bool]:
    """(low, high, clipped): the color scale of the heat maps. It starts at the best mean and
    covers at most `span` nats, so that a run left on the unigram plateau (~6.4) does not squeeze
    the differences that matter (tenths of a nat near ~4.7) into one color; `clipped` says that
    some cell lies above it (drawn in the top color, its number still written on it)."""
    finite = [m for m in means if not math.isnan(m)]
    if not finite:
        return 0.0, 1.0, False
    low, high = min(finite), max(finite)
    if high - low <= span:
        return low, max(high, low + 1e-6), False
    return low, low + span, True


def paired_by_seed(
    cells: dict[Cell, list[dict]], first: str, second: str
) -> list[tuple[Cell, int, float, float]]:
    """(cell of `first`, seed, its final loss, `second`'s) for every (depth, lr, warm-up, seed)
    that both placements ran: the comparison in which the seed's data order and init draw are
    shared, so the difference is the placement's. A diverged run's loss is NaN."""
    pairs = []
    for c, runs in sorted(cells.items(), key=lambda kv: (kv[0].n_layers, kv[0].lr, kv[0].warmup)):
        if c.norm != first:
            continue
        other = {
            r["settings"]["seed"]: r
            for r in cells.get(Cell(second, c.n_layers, c.lr, c.warmup), [])
        }
        for r in runs:  # by_cell keeps each cell's runs in seed order
            seed = r["settings"]["seed"]
            if seed in other:
                pairs.append((c, seed, final_loss(r), final_loss(other[seed])))
    return pairs


def paired_table(cells: dict[Cell, list[dict]], first: str, second: str) -> str:
    """A line of totals (how often `second` ends lower, the median difference) and a row per pair."""
    pairs = paired_by_seed(cells, first, second)
    if not pairs:
        return ""
    differences = [b - a for _, _, a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    lower = sum(d < 0 for d in differences)
    rows = [
        [
            str(c.n_layers),
            f"lr {lr_text(c.lr)}, warm-up {c.warmup}",
            str(seed),
            format_number(a),
            format_number(b),
            format_number(b - a),
        ]
        for c, seed, a, b in pairs
    ]
    header = ["blocks", "cell", "seed", first, second, f"{second} - {first}"]
    median = format_number(statistics.median(differences)) if differences else "n/a"
    return (
        f"{second} ends lower in {lower} of {len(differences)} pairs (median difference "
        f"{median} nats; pairs where a run diverged are left out of the count).\n\n"
        + markdown_table(header, rows)
    )


def plot_heatmaps(cells: dict[Cell, list[dict]], norms: list[str], path: Path) -> None:
    """One panel per placement: mean final val loss over warm-up x learning rate, one shared
    color scale (`heatmap_range`), each cell annotated with its mean and number of runs."""
    figure = Figure(figsize=(4.6 * len(norms), 3.6), layout="constrained")
    panels = figure.subplots(1, len(norms), squeeze=False)[0]
    at32 = {c: r for c, r in cells.items() if c.n_layers == 32}
    lo, hi, clipped = heatmap_range([cell_mean(r) for r in at32.values()])
    lrs = sorted({c.lr for c in at32})
    warmups = sorted({c.warmup for c in at32})
    image = None
    for axes, norm in zip(panels, norms, strict=True):
        grid = [[cell_mean(at32.get(Cell(norm, 32, lr, w), [])) for lr in lrs] for w in warmups]
        image = axes.imshow(grid, cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
        for i, w in enumerate(warmups):
            for j, lr in enumerate(lrs):
                runs = at32.get(Cell(norm, 32, lr, w), [])
                if runs:
                    dark = (grid[i][j] - lo) / (hi - lo) > 0.5  # viridis_r: high = dark
                    axes.text(
                        j,
                        i,
                        f"{format_number(grid[i][j], 3)}\n({len(runs)})",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="w" if dark else "k",
                    )
        axes.set_xticks(range(len(lrs)), [lr_text(lr) for lr in lrs])
        axes.set_yticks(range(len(warmups)), [str(w) for w in warmups])
        axes.set(title=norm, xlabel="learning rate", ylabel="warm-up steps")
    if image is not None:
        label = "final val loss (nats), seed mean"
        if clipped:
            label += f"\ncapped at best + {HEATMAP_SPAN}"
        figure.colorbar(image, ax=list(panels), label=label, extend="max" if clipped else "neither")
    figure.savefig(path, dpi=100)


def depth_settings(cells: dict[Cell, list[dict]]) -> dict[tuple[str, float, int], dict]:
    """{(placement, lr, warm-up): {blocks: runs}} for each setting run at two or more depths."""
    settings: dict[tuple[str, float, int], dict[int, list[dict]]] = {}
    for c, runs in cells.items():
        settings.setdefault((c.norm, c.lr, c.warmup), {})[c.n_layers] = runs
    return {k: v for k, v in sorted(settings.items()) if len(v) >= 2}


def depth_table(cells: dict[Cell, list[dict]]) -> str:
    """A row per setting run at two or more depths, a column per depth: the final val loss
    (mean ± std, n runs) and, in brackets, each run's plateau escape step."""
    lines = depth_settings(cells)
    depths = sorted({d for runs_at in lines.values() for d in runs_at})
    rows = []
    for (norm, lr, warmup), runs_at in lines.items():
        row = [f"{norm}, lr {lr_text(lr)}, warm-up {warmup}"]
        for depth in depths:
            row.append(loss_text(runs_at.get(depth, []), escapes=True))
        rows.append(row)
    return markdown_table(["setting \\ blocks", *map(str, depths)], rows)


DEPTH_ZOOM = 0.4  # nats above the lowest run shown in the zoomed depth panel


def plot_loss_vs_depth(cells: dict[Cell, list[dict]], path: Path) -> bool:
    """Final val loss against depth, a line per (placement, lr, warm-up) run at two or more
    depths, each run a dot; False (nothing drawn) when no setting ran at two depths."""
    lines = depth_settings(cells)
    if not lines:
        return False
    figure = Figure(figsize=(11, 4), layout="constrained")
    panels = figure.subplots(1, 2)
    finite = [v for depths in lines.values() for runs in depths.values() for v in losses(runs)]
    for axes in panels:
        for color, ((norm, lr, warmup), depths) in enumerate(sorted(lines.items())):
            xs = sorted(depths)
            axes.plot(
                xs,
                [cell_mean(depths[x]) for x in xs],
                "o-",
                color=f"C{color % 10}",
                label=f"{norm} lr {lr_text(lr)} w {warmup}",
            )
            for x in xs:
                values = losses(depths[x])
                axes.scatter([x] * len(values), values, color=f"C{color % 10}", s=10, alpha=0.5)
        axes.set_xscale("log", base=2)
        axes.set(xlabel="blocks", ylabel="final val loss (nats)")
        axes.grid(alpha=0.3)
    panels[0].set_title("loss against depth")
    panels[0].legend(fontsize=7)
    if finite:  # the right panel zooms on the trained runs; a plateau run (~6.4) leaves it
        low = min(finite)
        panels[1].set_ylim(low - 0.03, low + DEPTH_ZOOM)
    panels[1].set_title(f"zoom: best + {DEPTH_ZOOM} nats (each dot a run)")
    figure.savefig(path, dpi=100)
    return True


def plot_gradient_profiles(summaries: list[dict], n_layers: int, path: Path) -> bool:
    """The per-block stream gradient norm of every run at `n_layers` blocks, at its first logged
    step (dashed) and its last (solid), one color per placement (its runs at every lr and seed
    alike); False when there are none."""
    runs = [
        s
        for s in summaries
        if int(s["settings"]["model.n_layers"]) == n_layers and s.get("stream_grad_norm_history")
    ]
    if not runs:
        return False
    counts = Counter(run["settings"]["model.norm"] for run in runs)
    norms = sorted(counts)
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    for run in runs:
        norm = run["settings"]["model.norm"]
        color = f"C{norms.index(norm) % 10}"
        history = run["stream_grad_norm_history"]
        for (_, profile), style in ((history[0], "--"), (history[-1], "-")):
            axes.plot(range(len(profile)), profile, style, color=color, linewidth=1, alpha=0.8)
    handles = [
        Line2D(
            [],
            [],
            color=f"C{i % 10}",
            label=f"{norm} ({counts[norm]} run{'s' * (counts[norm] > 1)})",
        )
        for i, norm in enumerate(norms)
    ]
    handles += [
        Line2D([], [], color="black", linestyle="--", label="first logged step"),
        Line2D([], [], color="black", label="last logged step"),
    ]
    axes.set_yscale("log")
    axes.set(
        xlabel="block",
        ylabel="stream gradient norm",
        title=f"per-block gradient, {n_layers} blocks (every run)",
    )
    axes.grid(alpha=0.3)
    axes.legend(handles=handles, fontsize=7)
    figure.savefig(path, dpi=100)
    return True


WARMUP_MARKERS = {60: "o", 150: "s", 300: "^"}  # any other warm-up: "D"


def escape_points(summaries: list[dict], n_layers: int = 32) -> dict[str, list[tuple]]:
    """{placement: [(escape step or None, final val loss, warm-up)]} for each run at `n_layers`
    blocks that finished without diverging."""
    points: dict[str, list[tuple]] = {}
    for s in summaries:
        cell, loss = cell_of(s), final_loss(s)
        if cell.n_layers == n_layers and not math.isnan(loss):
            points.setdefault(cell.norm, []).append(
                (s.get("plateau_escape_step"), loss, cell.warmup)
            )
    return points


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            result[k] = (i + j) / 2 + 1
        i = j + 1
    return result


def escape_correlation(points: list[tuple]) -> tuple[float, int]:
    """Spearman's rank correlation of escape step and final loss over the runs that escaped,
    and their number (NaN below three runs or when either has no spread)."""
    escaped = [(step, loss) for step, loss, _ in points if step is not None]
    if len(escaped) < 3:
        return math.nan, len(escaped)
    steps, values = zip(*escaped, strict=True)
    try:
        return statistics.correlation(ranks(list(steps)), ranks(list(values))), len(escaped)
    except statistics.StatisticsError:  # every escape (or every loss) equal
        return math.nan, len(escaped)


def escape_correlation_text(points: dict[str, list[tuple]]) -> str:
    """A line per placement with three or more runs that escaped: the rank correlation of escape
    step and final loss over them (every cell together), and how many runs never escaped."""
    lines = []
    for norm, runs in sorted(points.items()):
        rho, n = escape_correlation(runs)
        if math.isnan(rho):
            continue
        never = sum(step is None for step, _, _ in runs)
        lines.append(
            f"- {norm}: Spearman's rank correlation of escape step and final loss "
            f"{format_number(rho, 2)} over the {n} runs that escaped (every cell together); "
            f"{never} of {len(runs)} runs never left the plateau."
        )
    return "\n".join(lines)


def plot_escape_vs_loss(points: dict[str, list[tuple]], path: Path) -> bool:
    """Final val loss against plateau escape step, a dot per run, one color per placement, one
    marker per warm-up; runs that never escaped at the right edge. False when there are none."""
    if not points:
        return False
    steps = [step for runs in points.values() for step, _, _ in runs if step is not None]
    edge = (max(steps) if steps else 0) + 20  # the dotted line between escaped and never
    never_x = edge + 20
    figure = Figure(figsize=(6.5, 4), layout="constrained")
    axes = figure.subplots()
    for i, (_, runs) in enumerate(sorted(points.items())):
        for step, loss, warmup in runs:
            axes.scatter(
                never_x if step is None else step,
                loss,
                color=f"C{i % 10}",
                marker=WARMUP_MARKERS.get(warmup, "D"),
                s=28,
                alpha=0.8,
            )
    handles = [
        Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="", label=norm)
        for i, norm in enumerate(sorted(points))
    ]
    warmups = sorted({w for runs in points.values() for _, _, w in runs})
    handles += [
        Line2D(
            [],
            [],
            color="gray",
            marker=WARMUP_MARKERS.get(w, "D"),
            linestyle="",
            label=f"warm-up {w}",
        )
        for w in warmups
    ]
    axes.axvline(edge, color="gray", linewidth=0.5, linestyle=":")
    ticks = [t for t in axes.get_xticks() if 0 <= t <= edge]
    axes.set_xticks([*ticks, never_x], [f"{t:g}" for t in ticks] + ["never"])
    axes.set(
        xlabel="plateau escape step",
        ylabel="final val loss (nats)",
        title="final loss against plateau escape (32 blocks, every run)",
    )
    axes.grid(alpha=0.3)
    axes.legend(handles=handles, fontsize=7)
    figure.savefig(path, dpi=100)
    return True


def runs_table(summaries: list[dict]) -> str:
    rows = [
        [
            s["name"],
            format_number(final_loss(s)),
            format_number(s["best_val_loss"] if s.get("best_val_loss") is not None else math.nan),
            "never" if s.get("plateau_escape_step") is None else str(s["plateau_escape_step"]),
            "no" if s.get("diverged_at") is None else f"at step {s['diverged_at']}",
            format_number(s.get("median_tokens_per_sec") or math.nan, 0),
        ]
        for s in summaries
    ]
    header = [
        "run",
        "final val loss",
        "best val loss",
        "plateau escape step",
        "diverged",
        "median tokens/s",
    ]
    return markdown_table(header, rows)


def report(directory: Path, out: Path, band_width: float = 0.05) -> list[Path]:
    """Write `grid.md` and its figures into `out`; return the paths written."""
    summaries = load_summaries(directory)
    cells = by_cell(summaries)
    norms = sorted(
        {c.norm for c in cells if c.n_layers == 32},
        key=lambda n: (n != "prenorm", n != "spannorm", n),
    )
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "grid.md", out / "grid_heatmap.png"]
    plot_heatmaps(cells, norms, written[1])
    sections = [
        f"# Learning rate x warm-up grid at 32 blocks ({len(summaries)} runs)\n\n"
        "Written by `scripts/run_sweeps.sh report` from the summaries in "
        f"`{directory}`. Cells: final val loss, mean ± sample std over seeds (runs).",
        "## Best cell and band per placement\n\n" + summary_table(cells, norms, band_width),
        "![final val loss over the grid](grid_heatmap.png)",
    ]
    if {"prenorm", "spannorm"} <= set(norms):
        sections.append(
            "## PreNorm and SpanNorm side by side\n\nFinal val loss (mean ± std, runs) "
            "[plateau escape step of each run]:\n\n"
            + side_by_side_table(cells, ["prenorm", "spannorm"])
        )
    paired = paired_table(cells, "prenorm", "spannorm")
    if paired:
        sections.append("## PreNorm against SpanNorm, paired by seed\n\n" + paired)
    for norm in norms:
        loss_table, escape_table = grid_tables(cells, norm)
        sections.append(
            f"## {norm}\n\nFinal val loss:\n\n{loss_table}\n\n"
            f"Plateau escape step of each seed (first step whose train loss is "
            f"0.3 nats below the unigram baseline):\n\n{escape_table}"
        )
    if plot_loss_vs_depth(cells, out / "loss_vs_depth.png"):
        written.append(out / "loss_vs_depth.png")
        sections.append(
            "## Depth\n\nFinal val loss (mean ± std, runs) [plateau escape step of each run], "
            "same tokens at every depth:\n\n"
            + depth_table(cells)
            + "\n\n![final val loss against depth](loss_vs_depth.png)"
        )
    points = escape_points(summaries)
    if plot_escape_vs_loss(points, out / "escape_vs_loss.png"):
        written.append(out / "escape_vs_loss.png")
        sections.append(
            "## Plateau escape against final loss (32 blocks)\n\n"
            + escape_correlation_text(points)
            + "\n\n![final val loss against plateau escape step](escape_vs_loss.png)"
        )
    deepest = max(c.n_layers for c in cells)
    if deepest > 32 and plot_gradient_profiles(summaries, deepest, out / "gradient_profiles.png"):
        written.append(out / "gradient_profiles.png")
        sections.append(f"![per-block gradient at {deepest} blocks](gradient_profiles.png)")
    sections.append("## Every run\n\n" + runs_table(summaries))
    written[0].write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return written
