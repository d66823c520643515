"""Bad model and optimizer options are refused in one line, naming the key and what would be
right, by the check `train.py` runs before it builds the data or the model."""

from __future__ import annotations

import pytest
from omegaconf import DictConfig, OmegaConf, open_dict

from spannorm.training.checks import check_train_config
from spannorm.training.optim import OptimConfig

from helpers import compose_config, optim_options


class _Delete:
    """The marker for "remove this key" (its repr is stable, so test ids are the same in every
    process that collects them)."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


@pytest.fixture(scope="module")
def train_config() -> DictConfig:
    return compose_config()


def check(config: DictConfig, **changes) -> None:
    """check_train_config on the composed config with `changes` ("optim__lr": "abc" sets optim.lr
    as the override optim.lr=abc would; DELETE removes the key)."""
    config = config.copy()
    with open_dict(config):
        for key, value in changes.items():
            group, name = key.split("__")
            if value is DELETE:
                del config[group][name]
            else:
                OmegaConf.update(config, f"{group}.{name}", value)
    check_train_config(config)


def test_the_default_config_and_good_changes_pass(train_config):
    check(train_config)
    check(train_config, model__norm="spannorm", model__alpha=2.5, optim__warmup_steps=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optim__lr": "abc"}, "optim.lr='abc' is not valid; use a positive number"),
        ({"optim__lr": 0}, "optim.lr=0 is not valid"),
        ({"optim__warmup_steps": -5}, "optim.warmup_steps=-5 is not valid; use a whole number"),
        ({"optim__warmup_steps": 2.5}, "optim.warmup_steps=2.5"),
        ({"optim__betas": [0.9]}, "two numbers in [0, 1)"),
        ({"optim__betas": [0.9, 1.5]}, "two numbers in [0, 1)"),
        ({"optim__weight_decay": -0.1}, "a number >= 0"),
        ({"optim__min_lr_ratio": 2}, "optim.min_lr_ratio=2 is not valid; use a number in [0, 1]"),
        ({"optim__fused": "maybe"}, "optim.fused='maybe' is not valid; use true or false"),
        ({"optim__momentum": 0.9}, "unknown optim option(s) ['momentum']"),
        ({"optim__eps": DELETE}, "optim option(s) ['eps'] not set"),
        ({"model__alpha": "foo"}, "model.alpha='foo' is not valid; use a positive number, sqrt2L"),
        ({"model__alpha": -1}, "model.alpha=-1 is not valid"),
        ({"model__attn_in_sum": "yes"}, "model.attn_in_sum='yes' must be true or false"),
        ({"model__spannorm_variant": "both"}, "model.spannorm_variant='both' is not valid"),
        ({"model__mixln_ratio": 2}, "model.mixln_ratio=2 must lie in [0, 1]"),
        ({"model__d_model": "abc"}, "model.d_model='abc' must be an integer"),
        ({"model__dropout": 1.5}, "model.dropout=1.5 must lie in [0, 1)"),
        ({"model__norm_eps": 0}, "model.norm_eps=0 must be a positive number"),
        ({"model__init": "kaiming"}, "choose one of: default, gpt2, normal, xavier, deepnorm"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_a_bad_option_is_one_line_naming_the_key_and_what_is_right(train_config, change, message):
    with pytest.raises(ValueError) as error:
        check(train_config, **change)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_optim_option_comes_from_the_config():
    """No optimizer defaults in code: conf/optim/adamw.yaml is complete, and nothing else fills in."""
    assert OptimConfig.from_options(optim_options()).warmup_steps >= 0
    with pytest.raises(ValueError, match="not set"):
        OptimConfig.from_options({"lr": 1e-3})
