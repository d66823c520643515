"""`export.py`: a trained checkpoint as a Hugging Face folder (`spannorm.inference.export`)."""

from __future__ import annotations

import json
from pathlib import Path

from spannorm.console import console
from spannorm.errors import UsageError


def run_export(cfg) -> Path:
    """What export.py runs: the checkpoint `cfg.ckpt_path` (a run directory, a .ckpt file or a
    sharded checkpoint folder) and its run's tokenizer, exported to `cfg.out`."""
    from spannorm.inference.export import export_model
    from spannorm.inference.load import load_trained

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.get("overwrite", False):
        raise UsageError(
            f"out={str(out)!r} is not empty; choose a new folder or set overwrite=true"
        )
    trained = load_trained(cfg.ckpt_path)
    export_model(trained.model, trained.tokenizer, out)
    (out / "spannorm_export.json").write_text(
        json.dumps({"checkpoint": str(trained.checkpoint), "step": trained.step}, indent=2) + "\n"
    )
    console.print(f"exported {trained.checkpoint} (step {trained.step}) -> {out}")
    console.print(
        f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)"
    )
    return out
