"""Effective rank of trained models' block outputs, as the per-block monitor measures it and with
each token's vector scaled to unit length first, to tell directions from token norms.

The monitor's `layers/erank` takes the singular values of a sequence's [T, D] block outputs as
they are. A PreNorm stream is not normalized, so tokens of very different norms can lower that
number without the tokens pointing in fewer directions; SpanNorm's block outputs are normalized
per token. With rows scaled to unit length, the effective rank counts directions alone.

    python scripts/representation_rank.py RUN_DIR [RUN_DIR ...] [--sequences 8]

Prints, per run: the effective rank of the last block's output (as logged, and per token unit
length) and the same averaged over the blocks, each the mean over the first validation sequences.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from spannorm.callbacks.layer_stats import effective_rank
from spannorm.inference.load import load_trained
from spannorm.runs import register_resolvers


def block_outputs(model, idx: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()
    register_resolvers()
    for run in args.runs:
        trained = load_trained(run, key="run")
        data = instantiate(trained.config.data)
        data.setup("fit")
        idx = next(iter(data.val_dataloader()))[0][: args.sequences]
        outputs = block_outputs(trained.model, idx)
        raw = [effective_rank(x).mean().item() for x in outputs]
        unit = [effective_rank(F.normalize(x.float(), dim=-1)).mean().item() for x in outputs]
        norms = outputs[-1].float().norm(dim=-1)
        print(
            f"{run}: {trained.config.model.norm}, {len(outputs)} blocks, step {trained.step}: "
            f"erank last block {raw[-1]:.1f} (unit tokens {unit[-1]:.1f}); "
            f"mean over blocks {statistics.mean(raw):.1f} (unit tokens {statistics.mean(unit):.1f}); "
            f"last block's token norm max/median {(norms.max() / norms.median()).item():.1f}"
        )


if __name__ == "__main__":
    main()
