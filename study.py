"""Run a study (conf/study/<name>.yaml): variants compared over a tuning grid with seeds, their
best cells carried to other settings, and a report. See docs/studies.md.

    python study.py study=placement_grid                 # run (the default verb): every job not done
    python study.py study=placement_grid status          # done / running / stopped / queued, time left
    python study.py study=placement_grid report          # markdown + figures from the summaries
    python study.py study=my_study hydra/launcher=joblib hydra.launcher.n_jobs=2   # local, in parallel
    python study.py study=my_study hydra/launcher=submitit_slurm hydra.launcher.partition=gpu
    python study.py study=my_study study.seeds=[1,2,3] trainer.max_steps=800   # change the study, every job

`study.<field>=...` changes the study config; `hydra...` goes to Hydra's launcher; any other
`key=value` or `group=option` goes to every job (it is part of the study, so give it every time).
"""

from __future__ import annotations

import sys
from pathlib import Path

from spannorm.cli.launcher import write_traceback
from spannorm.errors import UsageError, first_line
from spannorm.runs import register_resolvers

REPO = Path(__file__).resolve().parent


def main(args: list[str]) -> int:
    from spannorm.studies.runner import JobsFailed, load_study, run, split_arguments, status

    if any(a in ("-h", "--help", "help") for a in args):
        print(__doc__.strip())
        return 0
    try:
        name, verb, changes, launcher, overrides, groups = split_arguments(args)
        if name is None:
            raise UsageError(
                "which study? give study=<name> (a file in conf/study/) or study=<path.yaml>"
            )
        study = load_study(name, REPO / "conf", changes, overrides, groups)
        if launcher and verb != "run":
            raise UsageError(f"{launcher[0]} is for running jobs; {verb} runs none")
        if verb == "status":
            status(study)
        elif verb == "report":
            from spannorm.studies.report import report

            for path in report(study):
                print(path)
        else:
            run(study, REPO / "train.py", launcher)
    except UsageError as error:
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    except JobsFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print("\nstopped; run the same command again to continue", file=sys.stderr)
        return 130
    except Exception as error:  # a bug: its traceback kept, one line here
        written = write_traceback(error)
        print(f"error: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        print(
            f"unexpected error (not a checked input): full traceback in {written}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    register_resolvers()
    sys.exit(main(sys.argv[1:]))
