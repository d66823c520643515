"""Forward+backward time of the MoE feed-forward against the dense MLP at the same width.

Each repeat times every variant once, in turn, starting one variant later each repeat
(`spannorm.bench.timing.interleaved_rounds`, so drift in a shared machine's load hits all of them
alike); the table reports the median time per variant and the median over repeats of its time
divided by the dense MLP's time in the same repeat (`spannorm.bench.stats.paired_ratio`).
Writes the table, the command and the machine to a markdown file (default docs/moe.md).

    .venv/bin/python scripts/benchmark_moe.py --machine "2-core shared CPU"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from spannorm.bench.machine import describe_machine, load_average
from spannorm.bench.stats import paired_ratio
from spannorm.bench.timing import interleaved_rounds
from spannorm.model.config import TransformerConfig
from spannorm.model.layers import MLP
from spannorm.model.moe import MoE


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="batch * sequence length")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--machine", default=None, help="described in the report (default: probed)")
    parser.add_argument("--out", type=Path, default=Path("docs/moe.md"))
    return parser.parse_args()


def variants(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    """The dense MLP and MoE layers with top-1, top-2 and top-2 plus a shared expert."""
    base = dict(d_model=args.d_model, n_heads=1, n_experts=args.experts)
    layers = {"dense MLP": MLP(TransformerConfig(**base))}
    for top_k, shared in ((1, False), (2, False), (2, True)):
        name = f"MoE {args.experts} experts, top-{top_k}" + (" + shared" if shared else "")
        cfg = TransformerConfig(**base, ffn="moe", top_k=top_k, moe_shared_expert=shared)
        layers[name] = MoE(cfg).train()
    return layers


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    loss = (out * grad).sum()
    aux = getattr(layer, "aux_loss", None)
    (loss if aux is None else loss + aux).backward()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = variants(args)
    x = torch.randn(1, args.tokens, args.d_model, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.d_model)
    arms = {name: partial(forward_backward, layer, x, grad) for name, layer in layers.items()}
    load_before = load_average()
    interleaved_rounds(arms, args.warmup, 1)
    rounds = interleaved_rounds(arms, args.repeats, 1)
    load_after = load_average()
    times = {name: [r["wall"][name] for r in rounds] for name in layers}
    rows = [
        f"| {name} | {sum(p.numel() for p in layers[name].parameters()) / 1e6:.2f} "
        f"| {1e3 * statistics.median(values):.1f} "
        f"| {paired_ratio(values, times['dense MLP']).median:.2f} |"
        for name, values in times.items()
    ]
    command = "python scripts/benchmark_moe.py " + shlex.join(sys.argv[1:])
    report = "\n".join(
        [
            "# MoE feed-forward cost",
            "",
            "`spannorm.model.moe.MoE` (`model.ffn=moe`) against the dense MLP it replaces, "
            f"d_model={args.d_model}, {args.tokens} tokens, SwiGLU experts of the dense MLP's "
            "width. Forward+backward time per layer, median of "
            f"{args.repeats} interleaved repeats after {args.warmup} warm-up rounds, "
            f"torch.set_num_threads({args.threads}), torch {torch.__version__}.",
            "",
            "The MoE dispatches droplessly: tokens are sorted by expert and each expert multiplies "
            "its contiguous slice, so top-k costs about k dense MLPs plus routing and gather/scatter "
            "overhead, not n_experts of them (computing all experts densely would cost about "
            f"{args.experts}x the dense MLP). The MoE timings include the router, the auxiliary "
            "load-balance loss and the load statistics.",
            "",
            f"Machine: {args.machine or describe_machine()}; 1-minute load average "
            f"{load_before:.1f} before and {load_after:.1f} after the run (other jobs inflate the absolute times more than "
            "the paired ratios).",
            "",
            f"Command: `{command}`",
            "",
            "| layer | params (M) | fwd+bwd (ms) | time / dense |",
            "|---|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
