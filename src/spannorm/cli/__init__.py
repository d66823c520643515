"""The command line: one module per command (`train`, `evaluate`, `generate`, `export`), each run
by its entry script in the repository root through the shared launcher (`launcher`): one-line
errors and exit codes. Nothing outside this package imports it."""

from spannorm.cli.launcher import friendly_errors, launch

__all__ = ["friendly_errors", "launch"]
