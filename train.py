"""Entry point: see conf/train.yaml (e.g. `python train.py --help`)."""

import hydra

from spannorm.cli import friendly_errors, launch
from spannorm.cli.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg):
    return train(cfg)


if __name__ == "__main__":
    launch(main)
