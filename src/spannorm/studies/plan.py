"""The jobs of a study, stage by stage and phase by phase.

A grid stage has three phases: its cells (every variant that is tuned x every grid cell x every
seed, at each of the stage's settings); its edge (where a variant's best cell sits at the edge of
the grid on an axis the study extends, the next value past it, with the cells' seeds; re-planned
until no best cell sits at a tried edge with an untried value beyond it); then its best (more
seeds at each variant's best cell, and the variants that run at another's best cell). A transfer
stage (cells: best) has one phase: each variant's best cell of its source stage (and, optionally,
the cells next to it on a grid axis) at each of the stage's settings. A phase that needs a best
cell waits until the phase it comes from has finished; `plan` marks such jobs as waiting rather
than guessing.

A job's name says what it is, `<variant>_<stage key><value>_<grid key><value>_s<seed>`
(e.g. `spannorm_L16_lr6e-3_w300_s1`), a stage key left out where it has its base value, so that the
same run asked for by two stages is one job.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from spannorm.studies.results import Key, Results, grid_cells, same
from spannorm.studies.spec import Stage, Study, all_numbers


@dataclass
class Job:
    name: str
    stage: str
    phase: str  # "cells" | "edge" | "best"
    variant: str
    setting: Key
    cell: Key
    seed: int
    role: str  # grid | edge | best seed | at <variant>'s best | best | neighbour
    values: dict[str, Any] = field(default_factory=dict)  # every config key the job sets


@dataclass
class Phase:
    stage: str
    phase: str
    jobs: list[Job]
    waiting: int = 0  # jobs that wait for a best cell not known yet
    waiting_for: str = ""


def value_text(value: Any) -> str:
    """A value as a job name writes it: 6e-3, 300, 0.5, sqrt2L."""
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.1 or abs(value) >= 1e5:
            mantissa, exponent = f"{value:.6e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        text = f"{value:g}"
        return text
    return str(value).replace("/", "-").replace(" ", "")


def abbreviation(study: Study, key: str) -> str:
    return study.names.get(key, key.rpartition(".")[2])


def job_name(study: Study, variant: str, setting: Key, cell: Key, seed: int) -> str:
    parts = [variant]
    for key, value in setting:
        if not same(value, study.base.get(key)):
            parts.append(f"{abbreviation(study, key)}{value_text(value)}")
    parts += [f"{abbreviation(study, key)}{value_text(value)}" for key, value in cell]
    parts.append(f"{abbreviation(study, 'seed')}{seed}")
    return "_".join(parts)


def make_job(
    study: Study,
    stage: Stage,
    phase: str,
    variant: str,
    setting: Key,
    cell: Key,
    seed: int,
    role: str,
) -> Job:
    values = {**study.overrides, **study.variants[variant].values}
    values.update(dict(setting))
    values.update(dict(cell))
    values["seed"] = seed
    name = job_name(study, variant, setting, cell, seed)
    return Job(name, stage.name, phase, variant, setting, cell, seed, role, values)


def axis_values(study: Study, axis: str) -> list:
    """A grid axis's values with its extension (`extend`), in order (numbers sorted)."""
    values = [*study.grid[axis], *study.extend.get(axis, [])]
    return sorted(values) if all_numbers(values) else values


def edge_cells(study: Study, cell: Key) -> list[Key]:
    """The cells next to `cell`, along each axis the study extends, whose value is one of the
    extension's (the grid's own cells have run already): none while `cell` is inside the grid."""
    found = []
    for axis in study.extend:
        ordered = axis_values(study, axis)
        here = dict(cell)[axis]
        i = next((j for j, v in enumerate(ordered) if same(v, here)), None)
        if i is None:  # a run at a value the study does not list (added by hand): no edge
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < len(ordered) and not any(same(ordered[j], v) for v in study.grid[axis]):
                found.append(tuple((k, ordered[j] if k == axis else v) for k, v in cell))
    return found


def extension_walk(
    study: Study, results: Results, variant: str, setting: Key, seeds: list[int]
) -> list[Key]:
    """The extension cells `variant` runs at `setting`: from the best cell of the grid, each
    extension value next to the best of the cells tried so far, while the last ones tried have
    finished runs (a cell not run yet is the walk's last step until it has). Cells are compared
    as the study spells their values (Results places every run so)."""
    tried: list[Key] = []
    while True:
        best = results.best_cell(variant, setting, seeds=seeds, within=grid_cells(study) + tried)
        if best is None:
            return tried
        new = [c for c in edge_cells(study, best) if c not in tried]
        if not new:
            return tried
        tried += new
        finished = results.cells(variant, setting)
        if not all(results.losses(finished.get(c, [])) for c in new):
            return tried


def neighbour_cells(study: Study, cell: Key, neighbours: dict[str, str]) -> list[Key]:
    """The cells next to `cell` along each axis of `neighbours` ("below": the next lower value,
    the next higher where there is none; "above": the reverse; "both": each that exists)."""
    found = []
    for axis, side in neighbours.items():
        ordered = axis_values(study, axis)
        here = dict(cell)[axis]
        i = next((j for j, v in enumerate(ordered) if same(v, here)), None)
        if i is None:
            continue
        lower = [ordered[i - 1]] if i > 0 else []
        higher = [ordered[i + 1]] if i + 1 < len(ordered) else []
        picks = {
            "below": lower or higher,
            "above": higher or lower,
            "both": lower + higher,
        }[side]
        for value in picks:
            found.append(tuple((k, value if k == axis else v) for k, v in cell))
    return found


def seeds_of(study: Study, variant: str, default: list[int]) -> list[int]:
    own = study.variants[variant].seeds
    return default if own is None else own


def stage_phases(study: Study, stage: Stage, results: Results) -> list[Phase]:
    """The phases of `stage` as far as `results` tell: jobs whose best cell is not known yet are
    counted in `waiting` (they wait for the phase before them)."""
    tuned = [v for v in study.tuned if study.variants[v].runs_in(stage.name)]
    followers = [
        n for n, v in study.variants.items() if v.at_best_of is not None and v.runs_in(stage.name)
    ]
    settings = [results.setting_key(s) for s in stage.settings]
    phases = []
    if stage.cells == "grid":
        cells_phase = Phase(stage.name, "cells", [])
        seeds = list(dict.fromkeys(s for v in tuned for s in seeds_of(study, v, stage.seeds)))
        for setting in settings:
            for seed, cell, variant in itertools.product(seeds, grid_cells(study), tuned):
                if seed in seeds_of(study, variant, stage.seeds):
                    cells_phase.jobs.append(
                        make_job(study, stage, "cells", variant, setting, cell, seed, "grid")
                    )
        phases.append(cells_phase)
        edge_phase = Phase(stage.name, "edge", [])
        for setting in settings:
            for variant in tuned if study.extend else []:
                for cell in extension_walk(study, results, variant, setting, stage.seeds):
                    for seed in seeds_of(study, variant, stage.seeds):
                        edge_phase.jobs.append(
                            make_job(study, stage, "edge", variant, setting, cell, seed, "edge")
                        )
        phases.append(edge_phase)
        best_phase = Phase(stage.name, "best", [], waiting_for=f"the cells of stage {stage.name}")
        for setting in settings:
            for variant in [*tuned, *followers]:
                leader = study.variants[variant].at_best_of or variant
                seeds = (
                    stage.best_seeds if leader == variant else seeds_of(study, variant, stage.seeds)
                )
                if not seeds:
                    continue
                best = results.best_cell(leader, setting, seeds=stage.seeds)
                if best is None:
                    best_phase.waiting += len(seeds)
                    continue
                role = "best seed" if leader == variant else f"at {leader}'s best"
                for seed in seeds:
                    best_phase.jobs.append(
                        make_job(study, stage, "best", variant, setting, best, seed, role)
                    )
        phases.append(best_phase)
        return phases
    source = study.stage(stage.source)
    source_setting = results.setting_key(source.settings[0])
    phase = Phase(stage.name, "best", [], waiting_for=f"the best cells of stage {source.name}")
    entries = []  # (seed, setting index, variant, cell, role)
    for variant in [*tuned, *followers]:
        leader = study.variants[variant].at_best_of or variant
        seeds = seeds_of(study, variant, stage.seeds)
        best = results.best_cell(leader, source_setting)
        if best is None:
            phase.waiting += len(seeds) * len(settings)
            continue
        for i, seed in itertools.product(range(len(settings)), seeds):
            entries.append((seed, i, variant, best, "best"))
        if leader == variant:
            for cell in neighbour_cells(study, best, stage.neighbours):
                for i, seed in itertools.product(range(len(settings)), stage.neighbour_seeds):
                    entries.append((seed, i, variant, cell, "neighbour"))
    order = {v: i for i, v in enumerate(study.variants)}
    entries.sort(key=lambda e: (e[4] == "neighbour", e[0], e[1], order[e[2]]))
    for seed, i, variant, cell, role in entries:
        phase.jobs.append(make_job(study, stage, "best", variant, settings[i], cell, seed, role))
    phases.append(phase)
    return phases


def unique(jobs: list[Job], seen: set[str]) -> list[Job]:
    """`jobs` without those named in `seen` (asked for by an earlier phase), adding theirs."""
    out = []
    for job in jobs:
        if job.name not in seen:
            seen.add(job.name)
            out.append(job)
    return out


def plan(study: Study, results: Results) -> list[Phase]:
    """Every phase of the study as far as `results` tell, each job once (in its first phase)."""
    seen: set[str] = set()
    phases = []
    for stage in study.stages:
        for phase in stage_phases(study, stage, results):
            phase.jobs = unique(phase.jobs, seen)
            phases.append(phase)
    return phases


def estimate_seconds(summary: dict) -> float:
    """A finished run's training time from its median throughput (NaN if not logged)."""
    s = summary.get("settings", {})
    rate = summary.get("median_tokens_per_sec")
    try:
        tokens = int(s["trainer.max_steps"]) * int(s["data.batch_size"]) * int(s["data.seq_len"])
    except (KeyError, TypeError, ValueError):
        return math.nan
    return tokens / rate if rate else math.nan
