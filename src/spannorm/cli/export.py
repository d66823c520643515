"""`export.py`: a trained checkpoint as a Hugging Face folder (`spannorm.inference.export`)."""

from __future__ import annotations

import json
from pathlib import Path

from spannorm.console import console
from spannorm.errors import UsageError, checking_input


def run_export(cfg) -> Path:
    """What export.py runs: the checkpoint `cfg.ckpt_path` (a run directory, a .ckpt file or a
    sharded checkpoint folder) and its run's tokenizer, exported to `cfg.out`."""
    from spannorm.inference.export import export_model
    from spannorm.inference.load import load_trained

    out = Path(cfg.out)
    with checking_input():
        check_out_folder(out, cfg.get("overwrite", False))
        trained = load_trained(cfg.ckpt_path, tokenizer_file=cfg.get("tokenizer_file"))
        tokenizer = trained.tokenizer
    export_model(trained.model, tokenizer, out)
    (out / "spannorm_export.json").write_text(
        json.dumps({"checkpoint": str(trained.checkpoint), "step": trained.step}, indent=2) + "\n"
    )
    console.print(f"exported {trained.checkpoint} (step {trained.step}) -> {out}")
    console.print(
        f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
    )
    return out


def check_out_folder(out: Path, overwrite: bool) -> None:
    """`out` must be a folder that can be made, empty unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"out={str(out)!r} is a file; choose a folder to write the export to")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(
            f"out={str(out)!r} lies under {str(blocking)!r}, which is a file; choose a folder"
        )
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"out={str(out)!r} is not empty; choose a new folder or set overwrite=true"
        )
