"""A study's finished runs, read from their summaries and sorted by what the study varies: each
summary belongs to a variant (its keys' values), a setting (the stages' keys) and a grid cell (the
grid's keys); its seed tells it from the other runs of that place. The best cell and band are
defined here once, for the runner (which cell a transfer stage carries) and the report alike."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spannorm.studies.spec import Study

Key = tuple[tuple[str, Any], ...]  # ((config key, value), ...) in the study's key order


def same(a: Any, b: Any) -> bool:
    """Config values equal as a study means them: 6e-3 is 0.006, 32 is 32.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if (
        isinstance(a, int | float)
        and isinstance(b, str)
        or isinstance(b, int | float)
        and isinstance(a, str)
    ):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except ValueError:
            return False
    return a == b


def load_summaries(directory: Path) -> list[dict]:
    """Every `*.json` summary in `directory` (none if it does not exist), in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))]


def metric_value(summary: dict, metric: str = "final_val_loss") -> float:
    """The run's metric if it finished without diverging, else NaN."""
    value = summary.get(metric)
    if summary.get("diverged_at") is not None or value is None:
        return math.nan
    return float(value)


@dataclass(frozen=True)
class Place:
    variant: str
    setting: Key
    cell: Key


class Results:
    """The summaries of a study, by place (variant, setting, cell), each place's runs in seed
    order. A summary that does not name a key is taken to have the key's base value."""

    def __init__(self, study: Study, summaries: list[dict]):
        self.study = study
        self.summaries = summaries
        self.runs: dict[Place, list[dict]] = {}
        self.unplaced: list[dict] = []
        for summary in summaries:
            place = self.place_of(summary)
            if place is None:
                self.unplaced.append(summary)
            else:
                self.runs.setdefault(place, []).append(summary)
        for runs in self.runs.values():
            runs.sort(key=lambda r: r["settings"].get("seed") or 0)

    def value(self, summary: dict, key: str) -> Any:
        settings = summary.get("settings", {})
        return settings[key] if key in settings else self.study.base.get(key)

    def place_of(self, summary: dict) -> Place | None:
        variant = next(
            (
                v.name
                for v in self.study.variants.values()
                if all(same(self.value(summary, k), want) for k, want in v.values.items())
            ),
            None,
        )
        if variant is None:
            return None
        setting = tuple((k, self.value(summary, k)) for k in self.study.stage_keys)
        cell = []
        for key, values in self.study.grid.items():
            have = self.value(summary, key)
            spelt = [*values, *self.study.extend.get(key, [])]
            match = next((v for v in spelt if same(v, have)), have)  # the study's spelling
            cell.append((key, match))
        return Place(variant, self.canonical(setting), tuple(cell))

    def canonical(self, setting: Key) -> Key:
        """`setting` with each value spelt as the study spells it (32.0 -> 32)."""
        out = []
        for key, value in setting:
            spelt = [
                v for s in self.study.stages for st in s.settings for k, v in st.items() if k == key
            ]
            spelt.append(self.study.base.get(key))
            out.append((key, next((v for v in spelt if same(v, value)), value)))
        return tuple(out)

    def setting_key(self, setting: dict[str, Any]) -> Key:
        """A stage's setting (its set keys) as a full setting: the other stage keys at base."""
        full = tuple((k, setting.get(k, self.study.base.get(k))) for k in self.study.stage_keys)
        return self.canonical(full)

    def cells(self, variant: str, setting: Key) -> dict[Key, list[dict]]:
        """{cell: runs} of `variant` at `setting`."""
        return {
            p.cell: runs
            for p, runs in self.runs.items()
            if p.variant == variant
            and all(same(a[1], b[1]) for a, b in zip(p.setting, setting, strict=True))
        }

    def losses(self, runs: list[dict]) -> list[float]:
        return [v for v in (metric_value(r, self.study.metric) for r in runs) if not math.isnan(v)]

    def mean(self, runs: list[dict]) -> float:
        values = self.losses(runs)
        return statistics.mean(values) if values else math.nan

    def best_cell(
        self,
        variant: str,
        setting: Key,
        seeds: list[int] | None = None,
        within: list[Key] | None = None,
    ) -> Key | None:
        """The cell of `variant` at `setting` with the lowest mean among those with at least
        `min_seeds` finished runs (any number if no cell has that many yet); ties: grid order.
        With `seeds`, only those seeds' runs count (and `min_seeds` is at most their number):
        where a grid stage puts its extra seeds is decided by the seeds every cell has. With
        `within`, only those cells compete."""
        cells = self.cells(variant, setting)
        if within is not None:
            cells = {c: runs for c, runs in cells.items() if c in within}
        need_seeds = self.study.min_seeds
        if seeds is not None:
            chosen = set(seeds)
            cells = {
                c: [r for r in runs if r["settings"].get("seed") in chosen]
                for c, runs in cells.items()
            }
            need_seeds = min(need_seeds, len(chosen))
        order = {cell: i for i, cell in enumerate(grid_cells(self.study))}
        for need in (need_seeds, 1):
            scored = [
                (self.mean(runs), order.get(cell, len(order)), cell)
                for cell, runs in cells.items()
                if len(self.losses(runs)) >= need
            ]
            if scored:
                return min(scored, key=lambda item: item[:2])[2]
        return None

    def band(self, variant: str, setting: Key, best: Key, width: float) -> list[Key]:
        """The cells of `variant` at `setting` whose mean is within `width` of `best`'s."""
        cells = self.cells(variant, setting)
        top = self.mean(cells[best])
        return [c for c, runs in cells.items() if self.mean(runs) <= top + width]


def grid_cells(study: Study) -> list[Key]:
    """Every cell of the grid, the first key varying slowest."""
    cells: list[Key] = [()]
    for key, values in study.grid.items():
        cells = [(*c, (key, v)) for c in cells for v in values]
    return cells
