"""Entry point: see conf/generate.yaml (e.g. `python generate.py --help`)."""

import hydra

from spannorm.cli import friendly_errors, launch
from spannorm.cli.generate import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@friendly_errors
def main(cfg):
    return sample(cfg)


if __name__ == "__main__":
    launch(main)
