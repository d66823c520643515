"""A study's report (`python study.py study=<name> report`): markdown and figures written from the
run summaries alone, so every number in it can be recomputed from the committed files.

For each setting the grid ran at: each variant's best cell and band (the cells whose mean is within
`band` nats of its best), heat maps over the grid, the variants side by side, and each variant's
grid with every run's plateau escape step. Then every pair of variants compared run against run
with the same setting, cell and seed (spannorm.studies.stats); the validation loss during training
at each variant's best cell (does a lead open, hold or close?); the transfer stages (loss against
each stage key, and each variant's curve over the first grid key at each setting); final loss
against plateau escape; the per-block gradient of the deepest runs; and a row per run.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from spannorm.analysis.compare import format_number, markdown_table, mean_spread
from spannorm.errors import UsageError
from spannorm.studies.plan import value_text
from spannorm.studies.results import Key, Place, Results, load_summaries, metric_value, same
from spannorm.studies.spec import Study
from spannorm.studies.stats import average_ranks, paired_summary

LABELS = {
    "optim.lr": "lr",
    "optim.warmup_steps": "warm-up",
    "model.n_layers": "blocks",
    "trainer.max_steps": "steps",
    "model.d_model": "width",
}
SLUGS = {"model.n_layers": "depth", "trainer.max_steps": "budget"}
METRIC_LABELS = {"final_val_loss": "final val loss", "best_val_loss": "best val loss"}
HEATMAP_SPAN = 0.75  # nats of color scale above the best cell; worse cells share the top color
ZOOM = 0.4  # nats above the lowest run shown in the zoomed panel of the transfer figures
MARKERS = "os^Dv<>p"


def label(key: str) -> str:
    return LABELS.get(key, key)


def cell_text(cell: Key) -> str:
    """`lr 6e-3, warm-up 300`."""
    return ", ".join(f"{label(k)} {value_text(v)}" for k, v in cell)


def cell_short(cell: Key) -> str:
    """`6e-3/300`."""
    return "/".join(value_text(v) for _, v in cell)


def setting_text(setting: Key) -> str:
    return ", ".join(f"{label(k)} {value_text(v)}" for k, v in setting) or "base"


def runs_text(n: int) -> str:
    """`1 run`, `3 runs`."""
    return f"{n} run{'s' * (n != 1)}"


def sort_value(value):
    return (0, value, "") if isinstance(value, int | float) else (1, 0, str(value))


def key_order(values: Key) -> tuple:
    return tuple(sort_value(v) for _, v in values)


class Report:
    def __init__(self, study: Study, summaries: list[dict]):
        self.study = study
        self.results = Results(study, summaries)
        self.summaries = summaries
        self.metric = METRIC_LABELS[study.metric]

    # the pieces every table shares

    def losses(self, runs: list[dict]) -> list[float]:
        return self.results.losses(runs)

    def mean(self, runs: list[dict]) -> float:
        return self.results.mean(runs)

    @staticmethod
    def escape_text(runs: list[dict]) -> str:
        """Each run's plateau escape step, or "never"."""
        steps = [r.get("plateau_escape_step") for r in runs]
        return ", ".join("never" if s is None else str(int(s)) for s in steps)

    def loss_text(self, runs: list[dict], escapes: bool = False) -> str:
        """`mean ± std (n runs)`, each run's escape step in brackets if `escapes`; empty for a
        cell that did not run."""
        if not runs:
            return ""
        text = f"{mean_spread(self.losses(runs))} ({len(runs)})"
        return f"{text} [{self.escape_text(runs)}]" if escapes else text

    def grid_settings(self) -> list[Key]:
        """The settings the grid ran at (grid stages), in stage order."""
        found: list[Key] = []
        for stage in self.study.stages:
            if stage.cells == "grid":
                for s in stage.settings:
                    key = self.results.setting_key(s)
                    if key not in found:
                        found.append(key)
        return found

    def variants_at(self, setting: Key) -> list[str]:
        return [v for v in self.study.variants if self.results.cells(v, setting)]

    def axes(self, cells) -> tuple[str, list, list[Key]]:
        """(column key, its values, row keys' value tuples) of a grid table over `cells`."""
        keys = list(self.study.grid)
        column = keys[0]
        columns = sorted({dict(c)[column] for c in cells}, key=sort_value)
        rows = sorted({tuple((k, v) for k, v in c if k != column) for c in cells}, key=key_order)
        return column, columns, rows

    @staticmethod
    def cell_at(column: str, value, row: Key, keys: list[str]) -> Key:
        values = {**dict(row), column: value}
        return tuple((k, values[k]) for k in keys)

    def row_label(self, row: Key) -> str:
        return ", ".join(value_text(v) for _, v in row) or "–"

    def row_header(self) -> str:
        rest = [label(k) for k in list(self.study.grid)[1:]]
        return ", ".join(rest) if rest else "variant"

    # tables

    def summary_table(self, setting: Key) -> str:
        study, rows = self.study, []
        for variant in self.variants_at(setting):
            cells = self.results.cells(variant, setting)
            best = self.results.best_cell(variant, setting)
            if best is None:
                continue
            runs = cells[best]
            members = self.results.band(variant, setting, best, study.band)
            escapes = [r.get("plateau_escape_step") for rs in cells.values() for r in rs]
            never = sum(s is None for s in escapes)
            band_cells = sorted(members, key=key_order)
            rows.append(
                [
                    variant,
                    cell_text(best),
                    self.loss_text(runs),
                    format_number(min(self.losses(runs), default=math.nan)),
                    format_number(max(self.losses(runs), default=math.nan)),
                    f"{len(members)} of {len(cells)}: " + ", ".join(map(cell_short, band_cells)),
                    f"{len(escapes) - never} of {len(escapes)}",
                ]
            )
        header = [
            "variant",
            "best cell",
            f"{self.metric} mean ± std (runs)",
            "min",
            "max",
            f"band: cells within {study.band} nats of the best "
            f"({'/'.join(map(label, study.grid))})",
            "runs that left the plateau",
        ]
        return markdown_table(header, rows)

    def keeping_table(self, variant: str, settings: list[Key]) -> str | None:
        """What `variant` loses at each setting (columns) by running another setting's best cell
        (rows) instead of its own: the mean at the borrowed cell minus the mean at its own best,
        with the borrowed cell's finished runs; – where the borrowed cell was not run there."""
        best = {s: self.results.best_cell(variant, s) for s in settings}
        known = [s for s in settings if best[s] is not None]
        if len(known) < 2:
            return None
        rows = []
        for source in known:
            row = [f"{setting_text(source)}: {cell_text(best[source])}"]
            for used in known:
                cells = self.results.cells(variant, used)
                losses = self.losses(cells.get(best[source], []))
                if not losses:
                    row.append("–")
                elif best[source] == best[used]:
                    row.append("0 (its best)")
                else:
                    lost = statistics.mean(losses) - self.mean(cells[best[used]])
                    row.append(f"+{lost:.4f} ({len(losses)})")
            rows.append(row)
        header = ["best cell of \\ used at", *(setting_text(s) for s in known)]
        return markdown_table(header, rows)

    def grid_tables(self, variant: str, setting: Key) -> tuple[str, str]:
        """Rows: the other grid keys; columns: the first: the loss and each run's escape step."""
        cells = self.results.cells(variant, setting)
        column, columns, rows = self.axes(cells)
        keys = list(self.study.grid)
        loss_rows, escape_rows = [], []
        for row in rows:
            runs_at = [cells.get(self.cell_at(column, v, row, keys), []) for v in columns]
            name = self.row_label(row) if row else variant  # a one-key grid: one row
            loss_rows.append([name, *(self.loss_text(r) for r in runs_at)])
            escape_rows.append([name, *(self.escape_text(r) for r in runs_at)])
        header = [f"{self.row_header()} \\ {label(column)}", *map(value_text, columns)]
        return markdown_table(header, loss_rows), markdown_table(header, escape_rows)

    def side_by_side_table(self, setting: Key, variants: list[str]) -> str:
        """A row per (other grid keys, variant), a column per value of the first grid key."""
        every = {v: self.results.cells(v, setting) for v in variants}
        column, columns, rows = self.axes([c for cells in every.values() for c in cells])
        keys = list(self.study.grid)
        table = []
        for row in rows:
            for variant in variants:
                runs_at = [
                    every[variant].get(self.cell_at(column, v, row, keys), []) for v in columns
                ]
                if not any(runs_at):
                    continue
                name = f"{self.row_label(row)}, {variant}" if row else variant
                table.append([name, *(self.loss_text(r, escapes=True) for r in runs_at)])
        first = f"{self.row_header()}, variant" if len(keys) > 1 else "variant"
        return markdown_table([f"{first} \\ {label(column)}", *map(value_text, columns)], table)

    def pairs(self, first: str, second: str) -> list[tuple[Place, int, float, float]]:
        """(place of `first`, seed, its metric, `second`'s) for every setting, cell and seed both
        variants ran; a diverged run's value is NaN."""
        found = []
        places = sorted(
            (p for p in self.results.runs if p.variant == first),
            key=lambda p: (key_order(p.setting), key_order(p.cell)),
        )
        for place in places:
            other = self.results.runs.get(Place(second, place.setting, place.cell), [])
            by_seed = {r["settings"].get("seed"): r for r in other}
            for run in self.results.runs[place]:
                seed = run["settings"].get("seed")
                if seed in by_seed:
                    found.append(
                        (
                            place,
                            seed,
                            metric_value(run, self.study.metric),
                            metric_value(by_seed[seed], self.study.metric),
                        )
                    )
        return found

    def paired_section(self, first: str, second: str) -> str:
        pairs = self.pairs(first, second)
        if not pairs:
            return ""
        summary = paired_summary([b - a for _, _, a, b in pairs])
        test = summary.test
        low, high = summary.interval
        keys = self.study.stage_keys
        rows = [
            [
                *(value_text(v) for _, v in place.setting),
                cell_text(place.cell),
                str(seed),
                format_number(a),
                format_number(b),
                format_number(b - a),
            ]
            for place, seed, a, b in pairs
        ]
        header = [*map(label, keys), "cell", "seed", first, second, f"{second} - {first}"]
        median = format_number(summary.median) if summary.n else "n/a"
        p_text = "n/a" if math.isnan(test.p_value) else f"{test.p_value:.3g}"
        return (
            f"{second} ends lower in {summary.lower} of {summary.n} pairs (median difference "
            f"{median} nats; pairs where a run diverged are left out of the count). Mean "
            f"difference {format_number(summary.mean)} nats, bootstrap 95% interval "
            f"[{format_number(low)}, {format_number(high)}] (percentile, 10000 resamples); "
            f"two-sided Wilcoxon signed-rank test p = {p_text} ({test.method}, {test.n} non-zero "
            "differences).\n\n" + markdown_table(header, rows)
        )

    def transfer_lines(self, key: str) -> dict[tuple, dict]:
        """{(variant, cell, other stage keys): {value of `key`: runs}} for each line run at two or
        more values of `key`."""
        lines: dict[tuple, dict] = {}
        for place, runs in self.results.runs.items():
            setting = dict(place.setting)
            rest = tuple((k, v) for k, v in place.setting if k != key)
            lines.setdefault((place.variant, place.cell, rest), {})[setting[key]] = runs
        order = {v: i for i, v in enumerate(self.study.variants)}
        return {
            k: v
            for k, v in sorted(
                lines.items(),
                key=lambda kv: (order[kv[0][0]], key_order(kv[0][1]), key_order(kv[0][2])),
            )
            if len(v) >= 2
        }

    def line_label(self, line: tuple) -> str:
        variant, cell, rest = line
        parts = [variant, cell_text(cell)]
        if rest:
            parts.append(setting_text(rest))
        return ", ".join(p for p in parts if p)

    def transfer_table(self, key: str) -> str:
        lines = self.transfer_lines(key)
        values = sorted({v for runs_at in lines.values() for v in runs_at}, key=sort_value)
        rows = [
            [
                self.line_label(line),
                *(self.loss_text(runs_at.get(v, []), escapes=True) for v in values),
            ]
            for line, runs_at in lines.items()
        ]
        return markdown_table([f"setting \\ {label(key)}", *map(value_text, values)], rows)

    def runs_table(self) -> str:
        rows = [
            [
                s["name"],
                format_number(metric_value(s, "final_val_loss")),
                format_number(
                    s["best_val_loss"] if s.get("best_val_loss") is not None else math.nan
                ),
                "never" if s.get("plateau_escape_step") is None else str(s["plateau_escape_step"]),
                "no" if s.get("diverged_at") is None else f"at step {s['diverged_at']}",
                format_number(s.get("median_tokens_per_sec") or math.nan, 0),
            ]
            for s in self.summaries
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

    # figures

    def plot_heatmaps(self, setting: Key, variants: list[str], path: Path) -> None:
        """One panel per variant: the mean over the grid, one shared color scale
        (`heatmap_range`), each cell annotated with its mean and number of runs."""
        every = {v: self.results.cells(v, setting) for v in variants}
        column, columns, rows = self.axes([c for cells in every.values() for c in cells])
        keys = list(self.study.grid)
        figure = Figure(
            figsize=(4.6 * len(variants), max(2.4, 1.2 + 0.8 * len(rows))), layout="constrained"
        )
        panels = figure.subplots(1, len(variants), squeeze=False)[0]
        lo, hi, clipped = heatmap_range(
            [self.mean(r) for cells in every.values() for r in cells.values()]
        )
        image = None
        for axes, variant in zip(panels, variants, strict=True):
            cells = every[variant]
            grid = [
                [self.mean(cells.get(self.cell_at(column, v, row, keys), [])) for v in columns]
                for row in rows
            ]
            image = axes.imshow(grid, cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
            for i, row in enumerate(rows):
                for j, v in enumerate(columns):
                    runs = cells.get(self.cell_at(column, v, row, keys), [])
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
            axes.set_xticks(range(len(columns)), [value_text(v) for v in columns])
            axes.set_yticks(range(len(rows)), [self.row_label(r) for r in rows])
            axes.set(
                title=variant,
                xlabel=label(column),
                ylabel=self.row_header() if len(keys) > 1 else "",
            )
        if image is not None:
            text = f"{self.metric} (nats), seed mean"
            if clipped:
                text += f"\ncapped at best + {HEATMAP_SPAN}"
            figure.colorbar(
                image, ax=list(panels), label=text, extend="max" if clipped else "neither"
            )
        figure.savefig(path, dpi=100)

    def plot_transfer(self, key: str, path: Path) -> bool:
        """The metric against `key`, a line per (variant, cell) run at two or more of its values,
        each run a dot; a second panel zoomed on the trained runs."""
        lines = self.transfer_lines(key)
        if not lines:
            return False
        figure = Figure(figsize=(11, 4), layout="constrained")
        panels = figure.subplots(1, 2)
        finite = [v for at in lines.values() for runs in at.values() for v in self.losses(runs)]
        numeric = all(isinstance(v, int | float) and v > 0 for at in lines.values() for v in at)
        for axes in panels:
            for color, (line, at) in enumerate(lines.items()):
                xs = sorted(at, key=sort_value)
                positions = xs if numeric else list(range(len(xs)))
                axes.plot(
                    positions,
                    [self.mean(at[x]) for x in xs],
                    "o-",
                    color=f"C{color % 10}",
                    label=self.line_label(line),
                )
                for x, position in zip(xs, positions, strict=True):
                    values = self.losses(at[x])
                    axes.scatter(
                        [position] * len(values), values, color=f"C{color % 10}", s=10, alpha=0.5
                    )
            if numeric:
                axes.set_xscale("log", base=2)
            axes.set(xlabel=label(key), ylabel=f"{self.metric} (nats)")
            axes.grid(alpha=0.3)
        panels[0].set_title(f"{self.metric} against {label(key)}")
        panels[0].legend(fontsize=7)
        if finite:  # the right panel zooms on the trained runs; a plateau run (~6.4) leaves it
            low = min(finite)
            panels[1].set_ylim(low - 0.03, low + ZOOM)
        panels[1].set_title(f"zoom: best + {ZOOM} nats (each dot a run)")
        figure.savefig(path, dpi=100)
        return True

    def curve_lines(self) -> dict[tuple, dict]:
        """{(variant, setting, other grid keys): {first grid key value: runs}}, for each line with
        two or more points, at studies with stage keys (one curve per setting)."""
        column = list(self.study.grid)[0]
        lines: dict[tuple, dict] = {}
        for place, runs in self.results.runs.items():
            rest = tuple((k, v) for k, v in place.cell if k != column)
            lines.setdefault((place.variant, place.setting, rest), {})[dict(place.cell)[column]] = (
                runs
            )
        return {k: v for k, v in lines.items() if len(v) >= 2}

    def plot_curves(self, path: Path) -> bool:
        """One panel per variant: the metric over the first grid key, a line per setting (and
        other grid keys' values); False when no line has two points."""
        lines = self.curve_lines()
        if not self.study.stage_keys or not lines:
            return False
        column = list(self.study.grid)[0]
        variants = [v for v in self.study.variants if any(line[0] == v for line in lines)]
        figure = Figure(figsize=(5 * len(variants), 4), layout="constrained")
        panels = figure.subplots(1, len(variants), squeeze=False)[0]
        finite = [v for at in lines.values() for runs in at.values() for v in self.losses(runs)]
        for axes, variant in zip(panels, variants, strict=True):
            mine = sorted(
                ((line, at) for line, at in lines.items() if line[0] == variant),
                key=lambda item: (key_order(item[0][1]), key_order(item[0][2])),
            )
            for i, ((_, setting, rest), at) in enumerate(mine):
                xs = sorted(at, key=sort_value)
                name = ", ".join(p for p in (setting_text(setting), cell_text(rest)) if p)
                axes.plot(xs, [self.mean(at[x]) for x in xs], "o-", color=f"C{i % 10}", label=name)
            if all(isinstance(x, int | float) and x > 0 for _, at in mine for x in at):
                axes.set_xscale("log")
            axes.set(title=variant, xlabel=label(column), ylabel=f"{self.metric} (nats), seed mean")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
            if finite:
                axes.set_ylim(min(finite) - 0.03, min(finite) + 2 * ZOOM)
        figure.savefig(path, dpi=100)
        return True

    def best_curves(self, setting: Key) -> dict[str, tuple[Key, list[list], dict[int, float]]]:
        """{variant: (its best cell, each run's validation curve, the seed-mean curve)} for the
        tuned variants at `setting`; a curve is [[step, loss], ...] from the summaries; the mean
        is over the steps every run of the cell logged with a finite loss."""
        found = {}
        for variant in self.study.tuned:
            best = self.results.best_cell(variant, setting)
            if best is None:
                continue
            curves = [
                [
                    (int(step), float(v))
                    for step, v in run["val_loss"]
                    if v is not None and math.isfinite(v)
                ]
                for run in self.results.cells(variant, setting)[best]
                if len(run.get("val_loss") or []) >= 2
            ]
            if not curves:
                continue
            by_step = [dict(c) for c in curves]
            common = sorted(set.intersection(*(set(c) for c in by_step)))
            if not common:  # the runs share no validation step with a finite loss
                continue
            found[variant] = (
                best,
                curves,
                {s: statistics.mean(c[s] for c in by_step) for s in common},
            )
        return found

    def curves_table(self, curves: dict) -> str:
        """The seed-mean validation loss of each variant's best cell at a quarter, half, three
        quarters and all of the steps (the logged step nearest each) and, for two variants, the
        difference: does a lead open, hold or close during training?"""
        variants = list(curves)
        steps = sorted(set.intersection(*(set(mean) for _, _, mean in curves.values())))
        if not steps:
            return ""
        last = steps[-1]
        marks = sorted(
            {
                min(steps, key=lambda s, q=q: abs(s + 1 - q * (last + 1)))
                for q in (0.25, 0.5, 0.75, 1)
            }
        )
        rows = []
        for step in marks:
            values = [curves[v][2][step] for v in variants]
            row = [str(step + 1), *(format_number(x) for x in values)]
            if len(variants) == 2:
                row.append(format_number(values[1] - values[0]))
            rows.append(row)
        header = [
            "step",
            *(
                f"{v} ({cell_short(curves[v][0])}, {runs_text(len(curves[v][1]))})"
                for v in variants
            ),
        ]
        if len(variants) == 2:
            header.append(f"{variants[1]} - {variants[0]}")
        return markdown_table(header, rows)

    def plot_training_curves(self, curves: dict, setting: Key, path: Path) -> bool:
        """Validation loss against step at each variant's best cell (each run thin, the seed
        mean thick) and, for two or more variants, each one's seed mean minus the first's."""
        if not curves:
            return False
        variants = list(curves)
        figure = Figure(figsize=(11 if len(variants) > 1 else 6, 4), layout="constrained")
        panels = figure.subplots(1, 2 if len(variants) > 1 else 1, squeeze=False)[0]
        axes = panels[0]
        low = min(v for _, _, mean in curves.values() for v in mean.values())
        for i, (variant, (best, runs, mean)) in enumerate(curves.items()):
            color = f"C{i % 10}"
            for run in runs:
                axes.plot(*zip(*run, strict=True), color=color, linewidth=0.8, alpha=0.4)
            steps = sorted(mean)
            axes.plot(steps, [mean[s] for s in steps], color=color, linewidth=2,
                      label=f"{variant}, {cell_text(best)} ({runs_text(len(runs))})")  # fmt: skip
        axes.set_ylim(low - 0.05, low + 1.5)
        axes.set(xlabel="step", ylabel="val loss (nats)",
                 title="each variant's best cell" + (f" ({setting_text(setting)})" if setting else ""))  # fmt: skip
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        if len(variants) > 1:
            axes = panels[1]
            first = curves[variants[0]][2]
            for i, variant in enumerate(variants[1:], start=1):
                mean = curves[variant][2]
                steps = sorted(set(first) & set(mean))
                axes.plot(steps, [mean[s] - first[s] for s in steps], "o-", markersize=3,
                          color=f"C{i % 10}", label=f"{variant} - {variants[0]}")  # fmt: skip
            axes.axhline(0, color="black", linewidth=0.8)
            axes.set(xlabel="step", ylabel="difference of seed means (nats)",
                     title="below 0: lower than " + variants[0])  # fmt: skip
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
        figure.savefig(path, dpi=100)
        return True

    def escape_points(self, setting: Key) -> dict[str, list[tuple]]:
        """{variant: [(escape step or None, metric, second grid key's value)]} at `setting`, for
        each run that finished without diverging."""
        second = list(self.study.grid)[1] if len(self.study.grid) > 1 else None
        points: dict[str, list[tuple]] = {}
        for place, runs in self.results.runs.items():
            if place.setting != setting:
                continue
            for run in runs:
                value = metric_value(run, self.study.metric)
                if not math.isnan(value):
                    marker = dict(place.cell)[second] if second else None
                    points.setdefault(place.variant, []).append(
                        (run.get("plateau_escape_step"), value, marker)
                    )
        order = {v: i for i, v in enumerate(self.study.variants)}
        return dict(sorted(points.items(), key=lambda kv: order[kv[0]]))

    def plot_escape_vs_loss(self, points: dict[str, list[tuple]], setting: Key, path: Path) -> bool:
        """The metric against plateau escape step, a dot per run, one color per variant, one
        marker per value of the second grid key; runs that never escaped at the right edge."""
        if not points:
            return False
        steps = [step for runs in points.values() for step, _, _ in runs if step is not None]
        edge = (max(steps) if steps else 0) + 20  # the dotted line between escaped and never
        never_x = edge + 20
        markers = sorted(
            {m for runs in points.values() for _, _, m in runs if m is not None}, key=sort_value
        )
        marker_of = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(markers)}
        figure = Figure(figsize=(6.5, 4), layout="constrained")
        axes = figure.subplots()
        for i, (_, runs) in enumerate(points.items()):
            for step, loss, m in runs:
                axes.scatter(
                    never_x if step is None else step,
                    loss,
                    color=f"C{i % 10}",
                    marker=marker_of.get(m, "o"),
                    s=28,
                    alpha=0.8,
                )
        handles = [
            Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="", label=v)
            for i, v in enumerate(points)
        ]
        second = list(self.study.grid)[1] if len(self.study.grid) > 1 else None
        handles += [
            Line2D(
                [],
                [],
                color="gray",
                marker=marker_of[m],
                linestyle="",
                label=f"{label(second)} {value_text(m)}",
            )
            for m in markers
        ]
        axes.axvline(edge, color="gray", linewidth=0.5, linestyle=":")
        ticks = [t for t in axes.get_xticks() if 0 <= t <= edge]
        axes.set_xticks([*ticks, never_x], [f"{t:g}" for t in ticks] + ["never"])
        axes.set(
            xlabel="plateau escape step",
            ylabel=f"{self.metric} (nats)",
            title=f"{self.metric} against plateau escape ({setting_text(setting)}, every run)",
        )
        axes.grid(alpha=0.3)
        axes.legend(handles=handles, fontsize=7)
        figure.savefig(path, dpi=100)
        return True

    def plot_gradient_profiles(self, n_layers: int, path: Path) -> bool:
        """The per-block stream gradient norm of every run at `n_layers` blocks, at its first
        logged step (dashed) and its last (solid), one color per variant."""
        runs = [
            (place.variant, r)
            for place, rs in self.results.runs.items()
            for r in rs
            if same(r["settings"].get("model.n_layers"), n_layers)
            and r.get("stream_grad_norm_history")
        ]
        if not runs:
            return False
        counts = Counter(v for v, _ in runs)
        variants = [v for v in self.study.variants if v in counts]
        figure = Figure(figsize=(6.5, 4), layout="constrained")
        axes = figure.subplots()
        for variant, run in runs:
            color = f"C{variants.index(variant) % 10}"
            history = run["stream_grad_norm_history"]
            for (_, profile), style in ((history[0], "--"), (history[-1], "-")):
                axes.plot(range(len(profile)), profile, style, color=color, linewidth=1, alpha=0.8)
        handles = [
            Line2D([], [], color=f"C{i % 10}", label=f"{v} ({runs_text(counts[v])})")
            for i, v in enumerate(variants)
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

    def best_runs_at_depth(self, n_layers: int) -> dict[str, list[dict]]:
        """Each variant's runs at its best cell of the setting with `n_layers` blocks."""
        found: dict[str, list[dict]] = {}
        settings = {p.setting for p in self.results.runs}
        for setting in settings:
            if not same(
                dict(setting).get("model.n_layers", self.study.base.get("model.n_layers")), n_layers
            ):
                continue
            for variant in self.variants_at(setting):
                best = self.results.best_cell(variant, setting)
                if best is not None:
                    found.setdefault(variant, []).extend(self.results.cells(variant, setting)[best])
        return found

    def representation_table(self, runs: dict[str, list[dict]]) -> str:
        """Per variant, at its best cell: the mean consecutive-block cosine over the last quarter
        of blocks and the last block's effective rank, at the last logged step (mean ± std (n))."""
        rows = []
        for variant, variant_runs in runs.items():
            cos, erank = [], []
            for run in variant_runs:
                profiles = run.get("profiles") or {}
                if profiles.get("cos"):
                    quarter = profiles["cos"][
                        len(profiles["cos"]) - max(1, len(profiles["cos"]) // 4) :
                    ]
                    cos.append(statistics.mean(quarter))
                if profiles.get("erank"):
                    erank.append(profiles["erank"][-1])
            cell = cell_text(self.results.place_of(variant_runs[0]).cell)
            rows.append(
                [
                    variant,
                    cell,
                    f"{mean_spread(cos)} ({len(cos)})",
                    f"{mean_spread(erank)} ({len(erank)})",
                ]
            )
        return markdown_table(
            ["variant", "best cell", "cos, last quarter of blocks", "erank, last block"], rows
        )

    def plot_representation_profiles(
        self, runs: dict[str, list[dict]], n_layers: int, path: Path
    ) -> bool:
        """Consecutive-block cosine and effective rank against depth at the last logged step,
        every run at its variant's best cell, one color per variant."""
        metrics = [
            m
            for m in ("cos", "erank")
            if any((r.get("profiles") or {}).get(m) for rs in runs.values() for r in rs)
        ]
        if not metrics:
            return False
        figure = Figure(figsize=(5 * len(metrics), 3.8), layout="constrained")
        panels = figure.subplots(1, len(metrics), squeeze=False)[0]
        for axes, metric in zip(panels, metrics, strict=True):
            for i, (variant, variant_runs) in enumerate(runs.items()):
                for j, run in enumerate(variant_runs):
                    profile = (run.get("profiles") or {}).get(metric)
                    if profile:
                        axes.plot(range(len(profile)), profile, color=f"C{i % 10}", linewidth=1,
                                  alpha=0.8, label=variant if j == 0 else None)  # fmt: skip
            title = "cos(x_{l-1}, x_l)" if metric == "cos" else "effective rank of x_l"
            axes.set(xlabel="block", title=f"{title}, {n_layers} blocks")
            axes.grid(alpha=0.3)
            axes.legend(fontsize=7)
        figure.savefig(path, dpi=100)
        return True


def heatmap_range(means: list[float], span: float = HEATMAP_SPAN) -> tuple[float, float, bool]:
    """(low, high, clipped): the heat maps' color scale. It starts at the best mean and covers at
    most `span` nats, so that a run left on the unigram plateau (~6.4) does not squeeze the
    differences that matter (tenths of a nat near ~4.7) into one color; `clipped` says that some
    cell lies above it (drawn in the top color, its number still written on it)."""
    finite = [m for m in means if not math.isnan(m)]
    if not finite:
        return 0.0, 1.0, False
    low, high = min(finite), max(finite)
    if high - low <= span:
        return low, max(high, low + 1e-6), False
    return low, low + span, True


def escape_correlation(points: list[tuple]) -> tuple[float, int]:
    """Spearman's rank correlation of escape step and final loss over the runs that escaped,
    and their number (NaN below three runs or when either has no spread)."""
    escaped = [(step, loss) for step, loss, _ in points if step is not None]
    if len(escaped) < 3:
        return math.nan, len(escaped)
    steps, values = zip(*escaped, strict=True)
    try:
        return statistics.correlation(average_ranks(list(steps)), average_ranks(list(values))), len(
            escaped
        )
    except statistics.StatisticsError:  # every escape (or every loss) equal
        return math.nan, len(escaped)


def escape_correlation_text(points: dict[str, list[tuple]], metric: str = "final loss") -> str:
    """A line per variant with three or more runs that escaped: the rank correlation of escape
    step and the metric over them (every cell together), and how many runs never escaped."""
    lines = []
    for variant, runs in points.items():
        rho, n = escape_correlation(runs)
        if math.isnan(rho):
            continue
        never = sum(step is None for step, _, _ in runs)
        lines.append(
            f"- {variant}: Spearman's rank correlation of escape step and {metric} "
            f"{format_number(rho, 2)} over the {n} runs that escaped (every cell together); "
            f"{never} of {len(runs)} runs never left the plateau."
        )
    return "\n".join(lines)


def shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def markdown_path(study: Study) -> Path:
    """The report's markdown file: `report` itself if it names a .md file, else report.md in it."""
    return study.report_dir if study.report_dir.suffix == ".md" else study.report_dir / "report.md"


def report(study: Study) -> list[Path]:
    """Write the study's report and figures next to it; return the paths written."""
    summaries = load_summaries(study.summaries)
    if not summaries:
        raise UsageError(
            f"no run summaries (*.json) in {study.summaries}; run the study first: "
            f"python study.py study={study.name}"
        )
    r = Report(study, summaries)
    path = markdown_path(study)
    out = path.parent
    out.mkdir(parents=True, exist_ok=True)
    written = [path]
    title = study.title or f"Study {study.name}"
    sections = [
        f"# {title} ({len(summaries)} runs)\n\n"
        f"Written by `python study.py study={study.name} report` from the summaries in "
        f"`{study.summaries}` (study config `{shown(study.path)}`). Cells: {r.metric}, mean ± sample "
        "std over seeds (runs); a diverged run counts as a run but not in the mean."
    ]
    settings = r.grid_settings()
    several = len(settings) > 1
    tuned = study.tuned
    for i, setting in enumerate(settings):
        at = f" ({setting_text(setting)})" if several else ""
        variants = r.variants_at(setting)
        if not variants:
            continue
        sections.append(f"## Best cell and band per variant{at}\n\n" + r.summary_table(setting))
        suffix = (
            ""
            if i == 0
            else "_"
            + "_".join(f"{SLUGS.get(k, k)}{value_text(v)}" for k, v in setting).replace(".", "-")
        )
        heatmap = out / f"grid_heatmap{suffix}.png"
        r.plot_heatmaps(setting, variants, heatmap)
        written.append(heatmap)
        sections.append(f"![{r.metric} over the grid{at}]({heatmap.name})")
        side = [v for v in tuned if v in variants]
        if len(side) >= 2:
            sections.append(
                f"## The variants side by side{at}\n\n{r.metric.capitalize()} (mean ± std, runs) "
                "[plateau escape step of each run]:\n\n" + r.side_by_side_table(setting, side)
            )
    if several:
        tables = [(v, r.keeping_table(v, settings)) for v in tuned]
        tables = [(v, t) for v, t in tables if t]
        if tables:
            sections.append(
                "## Keeping one setting's best cell at the others\n\n"
                f"What each variant loses ({r.metric}, nats) at a setting (column) when it runs "
                "another setting's best cell (row) instead of its own best there: the mean at "
                "the borrowed cell minus the mean at the column's best, (finished runs at the "
                "borrowed cell); – where that cell was not run at that setting. Compare with the "
                "seed spreads in the tables above.\n\n"
                + "\n\n".join(f"{v}:\n\n{t}" for v, t in tables)
            )
    for first, second in itertools.combinations(list(study.variants), 2):
        text = r.paired_section(first, second)
        if text:
            sections.append(f"## {first} against {second}, paired by seed\n\n{text}")
    for setting in settings:
        at = f" ({setting_text(setting)})" if several else ""
        for variant in r.variants_at(setting):
            loss_table, escape_table = r.grid_tables(variant, setting)
            sections.append(
                f"## {variant}{at}\n\n{r.metric.capitalize()}:\n\n{loss_table}\n\n"
                f"Plateau escape step of each seed (first step whose train loss is "
                f"{study.plateau_margin} nats below the unigram baseline):\n\n{escape_table}"
            )
    if settings:
        curves = r.best_curves(settings[0])
        at_first = f" ({setting_text(settings[0])})" if settings[0] else ""
        if r.plot_training_curves(curves, settings[0], out / "training_curves.png"):
            written.append(out / "training_curves.png")
            sections.append(
                f"## Validation loss during training{at_first}\n\n"
                "Each variant at its best cell: the seed mean of the validation loss at a "
                "quarter, half, three quarters and the end of training (a step before the end "
                "is inside that run's learning-rate schedule, not a shorter run's end).\n\n"
                + r.curves_table(curves)
                + "\n\n![validation loss against step at each variant's best cell](training_curves.png)"
            )
    for key in study.stage_keys:
        figure = out / f"loss_vs_{SLUGS.get(key, key.replace('.', '_'))}.png"
        if r.plot_transfer(key, figure):
            written.append(figure)
            sections.append(
                f"## {r.metric.capitalize()} against {label(key)}\n\n{r.metric.capitalize()} (mean ± std, runs) [plateau "
                f"escape step of each run], each variant's cells at each {label(key)} they ran "
                f"at:\n\n{r.transfer_table(key)}\n\n![{r.metric} against {label(key)}]({figure.name})"
            )
    if r.plot_curves(out / "grid_curves.png"):
        written.append(out / "grid_curves.png")
        column = label(list(study.grid)[0])
        sections.append(
            f"## {r.metric.capitalize()} against {column} at each setting\n\n![{r.metric} against {column}](grid_curves.png)"
        )
    if settings:
        points = r.escape_points(settings[0])
        if r.plot_escape_vs_loss(points, settings[0], out / "escape_vs_loss.png"):
            written.append(out / "escape_vs_loss.png")
            sections.append(
                f"## Plateau escape against {r.metric} ({setting_text(settings[0])})\n\n"
                + escape_correlation_text(points, r.metric)
                + f"\n\n![{r.metric} against plateau escape step](escape_vs_loss.png)"
            )
    depths = [s["settings"].get("model.n_layers") for s in summaries]
    depths = [int(d) for d in depths if isinstance(d, int | float)]
    if depths:  # the deepest runs: a depth stage's last setting, or every run of a deep study
        deepest = max(depths)
        if r.plot_gradient_profiles(deepest, out / "gradient_profiles.png"):
            written.append(out / "gradient_profiles.png")
            sections.append(f"![per-block gradient at {deepest} blocks](gradient_profiles.png)")
        best_runs = r.best_runs_at_depth(deepest)
        if r.plot_representation_profiles(best_runs, deepest, out / "representations.png"):
            written.append(out / "representations.png")
            sections.append(
                f"## Representations at the end of training ({deepest} blocks, each variant's "
                "best cell)\n\nAt the last logged step: how far each block turns the stream "
                "(consecutive-block cosine, near 1 = the block barely changes it) and how many "
                "directions the tokens span (effective rank; 1 = collapsed onto one line; runs "
                "made before the monitor logged it have none).\n\n"
                + r.representation_table(best_runs)
                + "\n\n![consecutive-block cosine and effective rank against depth](representations.png)"
            )
    if r.results.unplaced:
        names = ", ".join(s["name"] for s in r.results.unplaced)
        sections.append(f"Summaries that match no variant (left out above): {names}.")
    sections.append("## Every run\n\n" + r.runs_table())
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return written
