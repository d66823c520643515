"""Where a data module's samples come from: one module per kind of source, each defining a
`Source` subclass with the `data.source` names it serves and the `data.*` options it reads.
Adding a source is adding a module here; the data module finds it by its name."""

from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Source, TextSource, TokenSource

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def source_class(name: str) -> type[Source]:
    """The class serving `data.source=name`; a ValueError listing the sources if none does."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(
            f"data.source={name!r} is not a source; choose one of: {', '.join(REGISTRY)}"
        )
    return REGISTRY[name]


__all__ = ["REGISTRY", "Source", "TextSource", "TokenSource", "source_class"]
