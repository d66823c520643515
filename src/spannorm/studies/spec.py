"""The study config (`conf/study/<name>.yaml`): its language, read and checked before any job starts.

    experiment: placement_sweep        # the base experiment (any group choice may go in overrides)
    overrides: {model.norm_type: rmsnorm, model.n_layers: 24}   # every job
    variants:                          # name: the keys that make it (any config keys)
      sandwich: {model.norm: sandwich}
      spannorm: {model.norm: spannorm}
    grid: {optim.lr: [3.0e-3, 6.0e-3], optim.warmup_steps: [150, 300]}   # the tuning grid
    extend: {optim.lr: [1.0e-3, 1.2e-2]}   # tried next where a best cell sits at the grid's edge
    seeds: [1, 2]
    best_seeds: [3]                    # more seeds at each variant's best cell
    stages:                            # default: one stage, the grid
      - {name: tune}
      - {name: depth, cells: best, from: tune, set: {model.n_layers: [8, 16, 64]},
         seeds: [1], neighbours: {optim.lr: below}, neighbour_seeds: [1]}

Every key a study sets is checked against the training config it composes (the base experiment
and overrides), so a misspelt key, an empty grid or a stage on a key the config does not have fails
in one line before anything trains. See docs/studies.md for every field.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from spannorm.errors import UsageError

FIELDS = {
    "name": "the study's name (default: the file's name)",
    "experiment": "the base experiment (conf/experiment/)",
    "overrides": "config keys and group choices every job gets",
    "variants": "what is compared: name -> config keys (or {set, at_best_of, seeds, stages})",
    "grid": "the tuning grid: config key -> values",
    "extend": "values past the grid's edges, run where a best cell sits at an edge: {optim.lr: [2.0e-2]}",
    "seeds": "the seeds of every cell",
    "best_seeds": "more seeds at each variant's best cell",
    "stages": "the stages: grid stages and transfer stages (cells: best)",
    "metric": "final_val_loss or best_val_loss (lower is better)",
    "plateau_margin": "nats below the unigram baseline that count as leaving the plateau",
    "band": "a variant's band: cells whose mean is within this of its best",
    "min_seeds": "a cell needs this many finished seeds to be a best cell (fewer if none has)",
    "dir": "where the run directories and the study's files go",
    "summaries": "where each finished run's summary is collected (default: <dir>/summaries)",
    "report": "where the report goes (default: <dir>/report)",
    "names": "how a key is written in job names, e.g. {optim.lr: lr}",
    "title": "the report's title",
}
VARIANT_FIELDS = {"set", "at_best_of", "seeds", "stages"}
STAGE_FIELDS = {
    "name",
    "set",
    "cells",
    "from",
    "seeds",
    "best_seeds",
    "neighbours",
    "neighbour_seeds",
}
METRICS = ("final_val_loss", "best_val_loss")
SIDES = ("below", "above", "both")
DEFAULT_NAMES = {
    "optim.lr": "lr",
    "optim.warmup_steps": "w",
    "model.n_layers": "L",
    "trainer.max_steps": "steps",
    "seed": "s",
}
NAME_CHARACTERS = re.compile(r"^[A-Za-z0-9_.+-]+$")
UNSET = object()


@dataclass
class Variant:
    name: str
    values: dict[str, Any]
    at_best_of: str | None = None  # not tuned: runs at that variant's best cell
    seeds: list[int] | None = None  # its own seeds (default: the stage's)
    stages: list[str] | None = None  # the stages it runs in (default: all)

    def runs_in(self, stage: str) -> bool:
        return self.stages is None or stage in self.stages


@dataclass
class Stage:
    name: str
    settings: list[dict[str, Any]]  # one dict of set keys per setting ([{}] without `set`)
    set_keys: list[str]
    cells: str  # "grid" or "best"
    source: str | None  # the stage whose best cell a "best" stage carries
    seeds: list[int]
    best_seeds: list[int]
    neighbours: dict[str, str]  # grid axis -> below | above | both
    neighbour_seeds: list[int]


@dataclass
class Study:
    name: str
    path: Path
    experiment: str | None
    groups: dict[str, str]  # group choices (data: text) every job gets
    overrides: dict[str, Any]  # config keys every job gets
    variants: dict[str, Variant]
    grid: dict[str, list]
    stages: list[Stage]
    extend: dict[str, list] = field(default_factory=dict)  # grid key -> values past its edges
    metric: str = "final_val_loss"
    plateau_margin: float = 0.3
    band: float = 0.05
    min_seeds: int = 2
    dir: Path = Path("outputs/studies")
    summaries: Path = Path("outputs/studies/summaries")
    report_dir: Path = Path("outputs/studies/report")
    names: dict[str, str] = field(default_factory=dict)
    title: str | None = None
    base: dict[str, Any] = field(default_factory=dict)  # each varied key's value in the base

    @property
    def tuned(self) -> list[str]:
        """The variants that are tuned over the grid (not run at another's best cell)."""
        return [n for n, v in self.variants.items() if v.at_best_of is None]

    @property
    def stage_keys(self) -> list[str]:
        return list(dict.fromkeys(k for stage in self.stages for k in stage.set_keys))

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _plain(node) -> Any:
    return (
        OmegaConf.to_container(node, resolve=True)
        if isinstance(node, DictConfig | ListConfig)
        else node
    )


def _values(where: str, value: Any) -> list:
    """A value or a list of values, as a non-empty list."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise UsageError(f"{where} is an empty list; give at least one value")
    return values


def _seeds(where: str, value: Any, allow_empty: bool = False) -> list[int]:
    seeds = list(value) if isinstance(value, list | tuple) else [value]
    if not seeds and not allow_empty:
        raise UsageError(f"{where} is empty; give at least one seed, e.g. [1, 2]")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UsageError(f"{where}={seeds} must be a list of integers, e.g. [1, 2]")
    return seeds


def _mapping(where: str, value: Any, example: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a mapping, e.g. {example}; got {value!r}")
    return value


def _unknown(where: str, given, known) -> None:
    unknown = [k for k in given if k not in known]
    if unknown:
        raise UsageError(
            f"unknown key {unknown[0]!r} in {where}; the keys are: {', '.join(sorted(known))}"
        )


def find_study(name: str, conf_dir: Path) -> Path:
    """`conf/study/<name>.yaml`, or `name` itself when it is a YAML file's path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = conf_dir / "study" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (conf_dir / "study").glob("*.yaml"))
        raise UsageError(
            f"study={name!r} is neither conf/study/{name}.yaml nor a YAML file; "
            f"choose one of: {', '.join(choices)}"
        )
    return path


def read_study(path: Path, changes: list[str] = ()) -> dict:
    """The study file as plain data, with `changes` (`study.<field>=value`) applied."""
    try:
        raw = OmegaConf.load(path)
        for change in changes:  # replaces the field's value (a merge could not empty a grid)
            key, value = change.split("=", 1)
            OmegaConf.update(raw, key, OmegaConf.from_dotlist([f"v={value}"]).v, merge=False)
    except Exception as error:  # YAML or dotlist syntax
        raise UsageError(f"cannot read study {path}: {str(error).splitlines()[0]}") from error
    data = _plain(raw)
    if not isinstance(data, dict):
        raise UsageError(f"study {path} must be a mapping of fields ({', '.join(FIELDS)})")
    return data


def all_numbers(values: list) -> bool:
    """Every value an int or a float (True and False are not numbers here)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _extend(path: Path, value: Any, grid: dict[str, list]) -> dict[str, list]:
    """`extend`: for a numeric grid key, values beyond its lowest or highest value."""
    extend = _mapping(f"{path}: extend", value, "{optim.lr: [2.0e-2]}")
    out = {}
    for key, values in extend.items():
        where = f"{path}: extend {key}"
        if key not in grid:
            raise UsageError(f"{where}: {key} is not a grid key ({', '.join(grid)})")
        values = _values(where, values)
        numbers = [*grid[key], *values]
        if not all_numbers(numbers):
            raise UsageError(f"{where}: the grid and its extension must be numbers: {numbers}")
        low, high = min(grid[key]), max(grid[key])
        inside = [v for v in values if low <= v <= high]
        if inside:
            raise UsageError(
                f"{where}: {inside} lie within the grid's range [{low}, {high}]; extend lists "
                "values below the lowest or above the highest (add the others to the grid)"
            )
        out[str(key)] = sorted(values)
    return out


def parse_study(
    data: dict, path: Path, training_overrides: dict[str, Any], group_choices: dict[str, str]
) -> Study:
    """The study `data` (from `read_study`) checked for its own shape; the config keys it names
    are checked against the training config by `check_keys`."""
    _unknown(f"study {path}", data, FIELDS)
    name = str(data.get("name") or path.stem)
    if not NAME_CHARACTERS.match(name):
        raise UsageError(f"study name {name!r} may hold only letters, digits and _ . + -")
    overrides = _mapping(f"{path}: overrides", data.get("overrides"), "{model.n_layers: 24}")
    groups = {k: str(v) for k, v in overrides.items() if "." not in k and "/" not in k}
    groups.update(group_choices)
    overrides = {k: v for k, v in overrides.items() if k not in groups}
    overrides.update(training_overrides)
    experiment = data.get("experiment")
    if "experiment" in groups:
        experiment = groups.pop("experiment")

    variants_data = _mapping(
        f"{path}: variants", data.get("variants"), "{a: {model.norm: prenorm}}"
    )
    if len(variants_data) < 1:
        raise UsageError(
            f"{path}: variants is empty; name at least one, e.g. {{a: {{model.norm: prenorm}}}}"
        )
    variants: dict[str, Variant] = {}
    for vname, spec in variants_data.items():
        where = f"{path}: variant {vname!r}"
        if not NAME_CHARACTERS.match(str(vname)):
            raise UsageError(f"{where}: a variant's name may hold only letters, digits and _ . + -")
        spec = _mapping(where, spec, "{model.norm: spannorm}")
        if "set" in spec:
            _unknown(where, spec, VARIANT_FIELDS)
            values = _mapping(f"{where}: set", spec["set"], "{model.norm: spannorm}")
            seeds = spec.get("seeds")
            stages = spec.get("stages")
            variants[str(vname)] = Variant(
                str(vname),
                values,
                spec.get("at_best_of"),
                None if seeds is None else _seeds(f"{where}: seeds", seeds),
                None if stages is None else [str(s) for s in _values(f"{where}: stages", stages)],
            )
        else:
            variants[str(vname)] = Variant(str(vname), spec)
        if not variants[str(vname)].values:
            raise UsageError(f"{where} sets no config key; e.g. {{model.norm: spannorm}}")
    for variant in variants.values():
        leader = variant.at_best_of
        if leader is not None and (leader not in variants or variants[leader].at_best_of):
            tuned = [n for n, v in variants.items() if v.at_best_of is None]
            raise UsageError(
                f"{path}: variant {variant.name!r}: at_best_of={leader!r} must name a tuned "
                f"variant: one of {', '.join(tuned)}"
            )

    grid = _mapping(f"{path}: grid", data.get("grid"), "{optim.lr: [3.0e-3, 6.0e-3]}")
    if not grid:
        raise UsageError(
            f"{path}: the grid is empty; give at least one key and its values, "
            "e.g. grid: {optim.lr: [3.0e-3, 6.0e-3]}"
        )
    grid = {key: _values(f"{path}: grid key {key}", values) for key, values in grid.items()}
    for key, values in grid.items():
        if len(set(map(repr, values))) != len(values):
            raise UsageError(f"{path}: grid key {key} lists a value twice: {values}")
    extend = _extend(path, data.get("extend"), grid)
    seeds = _seeds(f"{path}: seeds", data.get("seeds", [1]))
    best_seeds = _seeds(f"{path}: best_seeds", data.get("best_seeds", []), allow_empty=True)

    stages: list[Stage] = []
    for i, spec in enumerate(data.get("stages") or [{"name": "tune"}]):
        where = f"{path}: stage {i + 1}"
        spec = _mapping(where, spec, "{name: depth, cells: best, set: {model.n_layers: [8, 16]}}")
        _unknown(where, spec, STAGE_FIELDS)
        sname = str(spec.get("name") or f"stage{i + 1}")
        where = f"{path}: stage {sname!r}"
        if any(s.name == sname for s in stages):
            raise UsageError(f"{where}: two stages have this name")
        cells = spec.get("cells", "grid" if i == 0 else "best")
        if cells not in ("grid", "best"):
            raise UsageError(f"{where}: cells={cells!r} must be grid or best")
        if i == 0 and cells == "best":
            raise UsageError(f"{where}: the first stage has no earlier best cell; use cells: grid")
        source = spec.get("from")
        if cells == "best":
            source = str(source or stages[0].name)
            earlier = {s.name: s for s in stages}
            if source not in earlier or earlier[source].cells != "grid":
                names = [s.name for s in stages if s.cells == "grid"]
                raise UsageError(
                    f"{where}: from={source!r} must name an earlier grid stage: {', '.join(names)}"
                )
            if len(earlier[source].settings) != 1:
                raise UsageError(
                    f"{where}: from={source!r} runs at several settings, so it has no one best "
                    "cell; carry the best of a stage with one setting"
                )
        elif source is not None:
            raise UsageError(f"{where}: from= is for transfer stages (cells: best)")
        set_data = _mapping(f"{where}: set", spec.get("set"), "{model.n_layers: [8, 16, 64]}")
        set_values = {k: _values(f"{where}: set key {k}", v) for k, v in set_data.items()}
        settings = [{}]
        for key, values in set_values.items():
            settings = [{**s, key: v} for s in settings for v in values]
        neighbours = _mapping(f"{where}: neighbours", spec.get("neighbours"), "{optim.lr: below}")
        for axis, side in neighbours.items():
            if axis not in grid:
                raise UsageError(
                    f"{where}: neighbours on {axis!r}, which is not a grid key ({', '.join(grid)})"
                )
            if side not in SIDES:
                raise UsageError(f"{where}: neighbours {axis}: {side!r} must be one of {SIDES}")
        if neighbours and cells != "best":
            raise UsageError(f"{where}: neighbours are for transfer stages (cells: best)")
        stage_seeds = spec.get("seeds", seeds)
        stages.append(
            Stage(
                sname,
                settings,
                list(set_values),
                cells,
                source,
                _seeds(f"{where}: seeds", stage_seeds),
                _seeds(
                    f"{where}: best_seeds",
                    spec.get("best_seeds", best_seeds if cells == "grid" else []),
                    allow_empty=True,
                ),
                {str(k): str(v) for k, v in neighbours.items()},
                _seeds(
                    f"{where}: neighbour_seeds",
                    spec.get("neighbour_seeds", stage_seeds[:1]),
                    allow_empty=True,
                ),
            )
        )
    stage_names = [s.name for s in stages]
    for variant in variants.values():
        for sname in variant.stages or []:
            if sname not in stage_names:
                raise UsageError(
                    f"{path}: variant {variant.name!r}: stage {sname!r} is not one of "
                    f"{', '.join(stage_names)}"
                )

    metric = data.get("metric", "final_val_loss")
    if metric not in METRICS:
        raise UsageError(f"{path}: metric={metric!r} must be one of {', '.join(METRICS)}")
    for key in ("plateau_margin", "band"):
        value = data.get(key, 0.3 if key == "plateau_margin" else 0.05)
        if not isinstance(value, int | float) or value < 0:
            raise UsageError(f"{path}: {key}={value!r} must be a non-negative number (nats)")
    directory = Path(data.get("dir") or f"outputs/studies/{name}")
    names = {**DEFAULT_NAMES, **_mapping(f"{path}: names", data.get("names"), "{optim.lr: lr}")}
    return Study(
        name=name,
        path=path,
        experiment=None if experiment is None else str(experiment),
        groups=groups,
        overrides=overrides,
        variants=variants,
        grid=grid,
        stages=stages,
        extend=extend,
        metric=metric,
        plateau_margin=float(data.get("plateau_margin", 0.3)),
        band=float(data.get("band", 0.05)),
        min_seeds=int(data.get("min_seeds", 2)),
        dir=directory,
        summaries=Path(data.get("summaries") or directory / "summaries"),
        report_dir=Path(data.get("report") or directory / "report"),
        names={str(k): str(v) for k, v in names.items()},
        title=data.get("title"),
    )


def varied_keys(study: Study) -> list[str]:
    """Every config key the study sets: overrides, variants, stages, grid, seed."""
    keys = dict.fromkeys(study.overrides)
    for variant in study.variants.values():
        keys.update(dict.fromkeys(variant.values))
    keys.update(dict.fromkeys(study.stage_keys))
    keys.update(dict.fromkeys(study.grid))
    keys["seed"] = None
    return list(keys)


def check_keys(study: Study, config: DictConfig) -> None:
    """Fail in one line on a key the training config does not have, or one the study sets in two
    roles; record each varied key's base value (`study.base`)."""
    roles: dict[str, str] = {}
    for variant in study.variants.values():
        for key in variant.values:
            roles.setdefault(key, f"variant {variant.name!r}")
    for stage in study.stages:
        for key in stage.set_keys:
            if key in roles and not roles[key].startswith("stage"):
                raise UsageError(
                    f"{study.path}: stage {stage.name!r} sets {key}, which {roles[key]} sets too"
                )
            roles.setdefault(key, f"stage {stage.name!r}")
    for key in study.grid:
        if key in roles:
            raise UsageError(f"{study.path}: grid key {key} is set by {roles[key]} too")
        roles[key] = "the grid"
    for key in [*study.overrides, *roles]:
        if key == "seed":
            if key in roles:
                raise UsageError(
                    f"{study.path}: seeds are set by seeds/best_seeds, not {roles[key]}"
                )
            continue
        where = roles.get(key, "overrides")
        if OmegaConf.select(config, key, default=UNSET, throw_on_resolution_failure=False) is UNSET:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(config, parent, default=None) if parent else config
            keys = [str(k) for k in node] if isinstance(node, DictConfig) else []
            close = difflib.get_close_matches(leaf, keys, n=1)
            hint = (
                f"did you mean {parent + '.' if parent else ''}{close[0]}?"
                if close
                else f"{parent or 'the config'} has: {', '.join(keys[:15])}"
                if keys
                else f"{parent} is not a section of the config"
            )
            raise UsageError(
                f"{study.path}: {where} sets {key}, which is not a key of the training config; "
                + hint
            )
    base = {}
    for key in varied_keys(study):
        base[key] = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    study.base = base
