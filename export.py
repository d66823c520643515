"""Entry point: see conf/export.yaml (e.g. `python export.py --help`)."""

import hydra

from spannorm.cli import friendly_errors, launch


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@friendly_errors
def main(cfg):
    from spannorm.cli.export import run_export

    return run_export(cfg)


if __name__ == "__main__":
    launch(main)
