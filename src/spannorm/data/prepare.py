"""Build (or load from the caches) a data module's corpus, tokenizer and tokens."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from spannorm.errors import UsageError, first_line


def build_datamodule(data_cfg: DictConfig):
    """The data module of a `data` config, prepared and set up for fitting."""
    return prepare_data(instantiate(data_cfg))


def prepare_data(datamodule):
    """Build (or load from the cache) the datamodule's corpus, tokenizer and tokens; a source that
    cannot be reached (the corpus download, the hub) is reported as a one-line UsageError."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ConnectionError as error:
        raise UsageError(first_line(error)) from error
    return datamodule
