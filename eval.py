"""Entry point: see conf/eval.yaml (e.g. `python eval.py --help`)."""

import hydra

from spannorm.cli import friendly_errors, launch
from spannorm.cli.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@friendly_errors
def main(cfg):
    return evaluate(cfg)


if __name__ == "__main__":
    launch(main)
