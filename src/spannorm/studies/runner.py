"""Running a study and asking how far it is (`python study.py study=<name> [run|status]`).

Each phase of the plan (spannorm.studies.plan) is one Hydra multirun of `train.py`: every job of
the phase is a config file of its own, `<dir>/jobs/study_job/<job>.yaml` (package `_global_`: the
job's keys and its run directory's name), put on Hydra's search path and chosen with
`+study_job=<job>,<job>,...`. So the jobs go through whatever launcher the command line picks: one
at a time by default, `hydra/launcher=joblib` for parallel local jobs, `hydra/launcher=submitit_slurm`
for one SLURM array per phase. Every job trains in `<dir>/runs/<job>/` with `resume=auto` and writes
its own `summary.json` when it ends (spannorm.callbacks.summary); the runner copies that into the
study's summaries folder. A job whose summary is there is done and never launched again; a job cut
short continues from its last checkpoint the next time the study runs. A phase that needs a best
cell starts once the phase it comes from has finished.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from spannorm.callbacks.summary import SUMMARY_FILE
from spannorm.console import console
from spannorm.errors import UsageError
from spannorm.studies.plan import Job, estimate_seconds, plan
from spannorm.studies.results import Results, load_summaries
from spannorm.studies.spec import Study, check_keys, find_study, parse_study, read_study

JOB_GROUP = "study_job"
RUNNING_WITHIN_S = 300  # a started job whose files changed this recently counts as running


class JobsFailed(Exception):
    """Some jobs of a phase ended without a summary; the message names them and their logs."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def compose_training(study: Study, conf_dir: Path):
    """The training config the study's jobs start from (experiment, group choices, overrides),
    with each key checked: a key it does not have is bad input."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    choices = [f"{group}={choice}" for group, choice in study.groups.items()]
    if study.experiment:
        choices.append(f"experiment={study.experiment}")
    try:
        with initialize_config_dir(str(conf_dir.resolve()), version_base="1.3"):
            config = compose("train", overrides=choices)
    except (HydraException, OmegaConfBaseException) as error:
        message = " ".join(str(error).strip().split("\n\n")[0].split())
        raise UsageError(f"{study.path}: {message}") from error
    for key, value in study.overrides.items():
        try:
            OmegaConf.update(config, key, value, merge=True)
        except OmegaConfBaseException:
            pass  # not a key of the config: check_keys reports it in one line
    check_keys(study, config)
    return config


def split_arguments(args: list[str]) -> tuple[str | None, str, list[str], list[str], dict, dict]:
    """study.py's command line: (study, verb, study changes, launcher args, training overrides,
    group choices). A bare `run`, `status` or `report` is the verb, as is `verb=<verb>`;
    `study.<field>=<value>` changes the study; `hydra...` goes to the launcher; a `<group>=<option>`
    (data=text) and `<key>=<value>` go to every job."""
    study, verb = None, "run"
    changes, launcher, overrides, groups = [], [], {}, {}
    for arg in args:
        if arg in ("run", "status", "report"):
            verb = arg
            continue
        if "=" not in arg:
            raise UsageError(
                f"{arg!r} is neither a verb (run, status, report) nor key=value; e.g. "
                "python study.py study=placement_grid status"
            )
        key, value = arg.split("=", 1)
        if key == "study":
            study = value
        elif key == "verb":
            if value not in ("run", "status", "report"):
                raise UsageError(f"verb={value!r} must be run, status or report")
            verb = value
        elif key.startswith("study."):
            changes.append(f"{key[len('study.') :]}={value}")
        elif key.startswith(("hydra.", "hydra/")):
            launcher.append(arg)
        elif "." in key or key == "seed":
            overrides[key] = OmegaConf.from_dotlist([f"x={value}"]).x
        else:
            groups[key.lstrip("+")] = value
    return study, verb, changes, launcher, overrides, groups


def load_study(name: str, conf_dir: Path, changes=(), overrides=None, groups=None) -> Study:
    path = find_study(name, conf_dir)
    study = parse_study(read_study(path, list(changes)), path, overrides or {}, groups or {})
    compose_training(study, conf_dir)
    return study


class StudyLog:
    """Progress lines on the console and in `<dir>/study.log` (cluster jobs have no terminal)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        console.print(f"[{stamp}] {message}", highlight=False, markup=False, soft_wrap=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"[{stamp}] {message}\n")


def runs_dir(study: Study) -> Path:
    return study.dir / "runs"


def collect(study: Study, job: Job) -> bool:
    """Whether `job` is done; a summary its run wrote is copied into the summaries folder."""
    kept = study.summaries / f"{job.name}.json"
    if kept.is_file():
        return True
    written = runs_dir(study) / job.name / SUMMARY_FILE
    if not written.is_file():
        return False
    study.summaries.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    shutil.copyfile(written, tmp)
    os.replace(tmp, kept)
    return True


def nested(values: dict) -> dict:
    """{"model.norm": "x"} -> {"model": {"norm": "x"}}."""
    tree: dict = {}
    for key, value in values.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def write_job_file(study: Study, job: Job) -> Path:
    config = nested(job.values)
    config.setdefault("callbacks", {})["summary"] = {
        "_target_": "spannorm.callbacks.summary.RunSummary",
        "margin": study.plateau_margin,
    }
    config["hydra"] = {"sweep": {"subdir": job.name}}
    path = study.dir / "jobs" / JOB_GROUP / f"{job.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        "# @package _global_\n"
        f"# study {study.name}, stage {job.stage} ({job.role}): written by study.py; "
        "edit the study config instead\n" + OmegaConf.to_yaml(OmegaConf.create(config))
    )
    path.write_text(text, encoding="utf-8")
    return path


def multirun_command(study: Study, jobs: list[Job], train_script: Path, launcher: list[str]):
    choices = [f"{group}={choice}" for group, choice in study.groups.items()]
    if study.experiment:
        choices.append(f"experiment={study.experiment}")
    return [
        sys.executable,
        str(train_script),
        "-m",
        *choices,
        f"hydra.searchpath=[file://{(study.dir / 'jobs').resolve()}]",
        f"+{JOB_GROUP}={','.join(job.name for job in jobs)}",
        f"hydra.sweep.dir={runs_dir(study).resolve()}",
        "resume=auto",
        *launcher,
    ]


def launch(command: list[str], log: StudyLog, linger_s: float = 30.0) -> int:
    """Run the multirun, its output on the console and in the study log; its exit status.

    The study goes on when the multirun's own process exits, also when processes it started
    (a parallel launcher's workers, left behind by a multirun that died) still hold its output
    open: their output is copied while it comes, and after `linger_s` seconds the study no
    longer waits for it."""
    with log.path.open("a", encoding="utf-8") as out:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert process.stdout is not None

        def copy_output() -> None:
            with process.stdout:
                for line in process.stdout:  # each line flushed: `tail -f` sees the progress
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    try:
                        out.write(line)
                        out.flush()
                    except ValueError:  # the log is closed: the study went on without it
                        pass

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            status = process.wait()
            reader.join(timeout=linger_s)
            if reader.is_alive():
                log(
                    f"the multirun ended (exit status {status}), but processes it started still "
                    f"hold its output after {linger_s:.0f} s; going on without them"
                )
            return status
        except BaseException:
            process.terminate()  # a cut study (Ctrl-C): the job saves its checkpoint and stops
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


def run(
    study: Study,
    train_script: Path,
    launcher: list[str] = (),
    launch_phase: Callable[[list[str], StudyLog], int] = launch,
) -> int:
    """Run every job of the study not done yet, phase by phase; the number of jobs launched."""
    log = StudyLog(study.dir / "study.log")
    log(
        f"study {study.name} ({study.path}): runs in {runs_dir(study)}, summaries in {study.summaries}"
    )
    launched = 0
    while True:
        results = Results(study, load_summaries(study.summaries))
        phases = plan(study, results)
        todo = None
        for phase in phases:
            pending = [job for job in phase.jobs if not collect(study, job)]
            if pending:
                todo = (phase, pending)
                break
            if phase.waiting:
                raise JobsFailed(
                    f"stage {phase.stage}: {phase.waiting} jobs wait for {phase.waiting_for}, "
                    "which has no finished run; see the failed jobs in study status",
                    1,
                )
        if todo is None:
            done = sum(len(p.jobs) for p in phases)
            log(
                f"study {study.name}: all {done} jobs done; report: python study.py "
                f"study={study.name} report"
            )
            return launched
        phase, pending = todo
        total = sum(len(p.jobs) for p in phases)
        finished = sum(1 for p in phases for j in p.jobs if collect(study, j))
        log(
            f"stage {phase.stage} ({phase.phase}): {len(pending)} jobs to run "
            f"({finished} of {total} planned jobs done): {', '.join(j.name for j in pending)}"
        )
        for job in pending:
            write_job_file(study, job)
        status = launch_phase(multirun_command(study, pending, train_script, list(launcher)), log)
        launched += len(pending)
        failed = [job for job in pending if not collect(study, job)]
        if failed:
            logs = ", ".join(str(runs_dir(study) / j.name) for j in failed[:3])
            raise JobsFailed(
                f"stage {phase.stage}: {len(failed)} of {len(pending)} jobs ended without a "
                f"summary (train.py exit status {status}): {', '.join(j.name for j in failed)}; "
                f"their run directories (logs): {logs}; run the study again to continue",
                status or 1,
            )
        log(f"stage {phase.stage} ({phase.phase}): {len(pending)} jobs done")


def job_state(study: Study, job: Job, now: float) -> str:
    if collect(study, job):
        return "done"
    run_dir = runs_dir(study) / job.name
    if not run_dir.is_dir():
        return "queued"
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file()), default=0)
    return "running" if now - newest < RUNNING_WITHIN_S else "stopped"


def job_cost(study: Study, job: Job) -> float:
    """A job's cost relative to others: blocks x steps (each the job's or the base value)."""
    cost = 1.0
    for key in ("model.n_layers", "trainer.max_steps"):
        value = job.values.get(key, study.base.get(key))
        if isinstance(value, int | float):
            cost *= value
    return cost


def status(study: Study) -> dict[str, int]:
    """Print every job's state (done, running, stopped, queued; waiting: its cell depends on a
    phase not finished) and the time left at the current rate; return the count of each."""
    now = time.time()
    phases = plan(study, Results(study, load_summaries(study.summaries)))
    counts = {"done": 0, "running": 0, "stopped": 0, "queued": 0, "waiting": 0}
    per_cost = []  # seconds per unit of job_cost, of each finished job
    console.print(
        f"study {study.name} ({study.path}): runs in {runs_dir(study)}",
        highlight=False,
        soft_wrap=True,
    )
    left = 0.0
    for phase in phases:
        console.print(f"\nstage {phase.stage} ({phase.phase})", highlight=False, soft_wrap=True)
        for job in phase.jobs:
            state = job_state(study, job, now)
            counts[state] += 1
            console.print(
                f"  {state:8} {job.name}  [{job.role}]",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            if state == "done":
                seconds = estimate_seconds(_summary(study, job))
                if seconds == seconds:  # not NaN
                    per_cost.append(seconds / job_cost(study, job))
            else:
                left += job_cost(study, job)
        if phase.waiting:
            counts["waiting"] += phase.waiting
            console.print(
                f"  waiting  {phase.waiting} jobs, for {phase.waiting_for}", highlight=False
            )
            left += phase.waiting * job_cost(study, Job("", "", "", "", (), (), 0, ""))
    line = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    if per_cost and left:
        seconds = statistics.median(per_cost) * left
        took = f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"
        line += (
            f"; time left at the current rate (the finished runs' median throughput, one job "
            f"at a time): {took}"
        )
    console.print(f"\n{line}", highlight=False, soft_wrap=True)
    return counts


def _summary(study: Study, job: Job) -> dict:
    return json.loads((study.summaries / f"{job.name}.json").read_text(encoding="utf-8"))
