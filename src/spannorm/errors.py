"""What a run can report to its user without a traceback, and how input is checked.

Imports neither Lightning nor Hydra's runtime: every layer (data, training, inference, the
command line) raises these, and only the command line (`spannorm.cli`) turns them into exit codes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import InstantiationException
from omegaconf import MissingMandatoryValue


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


# An error of these types raised while the input is checked (`checking_input`) is bad input.
INPUT_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    InstantiationException,
    MissingMandatoryValue,
)


@contextmanager
def checking_input(*error_types: type[BaseException]) -> Iterator[None]:
    """Run a block that only reads and checks the user's input (the config, the data files, the
    checkpoint named): an error of `INPUT_ERRORS` or `error_types` raised in it is bad input and
    leaves as a one-line UsageError. The same error raised anywhere else is a bug."""
    try:
        yield
    except UsageError:
        raise
    except (*INPUT_ERRORS, *error_types) as error:
        while isinstance(error, InstantiationException) and error.__cause__ is not None:
            error = error.__cause__  # Hydra wraps the constructor's own error
        raise UsageError(first_line(error)) from error


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    message = str(error.args[0]) if error.args else repr(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
