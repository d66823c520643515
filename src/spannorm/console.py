"""The one console every command prints its human-readable lines to (rich, no syntax colouring)."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
