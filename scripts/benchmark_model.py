"""Training-step speed of our TransformerLM against a minimal pre-norm GPT, side by side on CPU.

    python scripts/benchmark_model.py                 # d=256, 6 blocks, 7 interleaved rounds
    python scripts/benchmark_model.py --rounds 11 --steps 3 --profile
    python scripts/benchmark_model.py --compile all   # every arm's blocks through torch.compile

Arms (each a model and its own fused AdamW, stepped on the same batches held in memory):
- `minimal`: the textbook pre-norm GPT written below (learned positions, fused QKV, SDPA, GELU MLP,
  LayerNorm without bias, no biases, dropout 0, tied embeddings);
- `minimal rope`: the same with rotary positions instead of learned ones (the textbook rotation);
- `ours gelu`: TransformerLM, `norm=prenorm mlp=gelu` (RoPE, GELU MLP);
- `ours`: TransformerLM, `norm=prenorm` with its defaults (RoPE, SwiGLU).
So `ours gelu / minimal rope` is our overhead, `minimal rope / minimal` RoPE's cost, and
`ours / ours gelu` SwiGLU's. Every step: cross-entropy over the vocabulary, backward, AdamW step.
Reported: per round, each arm's median step; per ratio, the median over rounds of the same-round
ratio of throughputs, with a distribution-free interval. `--profile` adds a torch.profiler table of
`--profile-steps` steps of each arm (self CPU time per op), and the per-op difference between two.
`--compile all` compiles each block of every arm (`nn.Module.compile`, as `model.compile=true` does
in the template), `--compile ours` only our arms' (a compiled template against eager textbook code);
the first steps then include the compilation, so give `--warmup` at least 2.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from spannorm.bench.machine import load_average, software
from spannorm.bench.stats import paired_ratio
from spannorm.bench.timing import CLOCKS, interleaved_rounds
from spannorm.model import TransformerConfig, TransformerLM
from spannorm.training.parallel import apply_compile

ARMS = ("minimal", "minimal rope", "ours gelu", "ours")
RATIOS = {  # name -> (numerator arm, denominator arm), as throughputs
    "ours gelu / minimal": ("ours gelu", "minimal"),
    "ours / minimal": ("ours", "minimal"),
    "ours gelu / minimal rope": ("ours gelu", "minimal rope"),
    "minimal rope / minimal": ("minimal rope", "minimal"),
    "ours / ours gelu": ("ours", "ours gelu"),
}


# --- the minimal reference: a pre-norm GPT as a textbook writes it ---------------------------


class MinimalBlock(nn.Module):
    def __init__(self, d: int, heads: int, rope: bool) -> None:
        super().__init__()
        self.heads, self.rope = heads, rope
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_proj = nn.Linear(4 * d, d, bias=False)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, D))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), cos, sin)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rot(x) sin, rot(x1, x2) = (-x2, x1), with cos/sin repeated over both halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MinimalGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int, rope: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = None if rope else nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(MinimalBlock(d, heads, rope) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / (2 * layers) ** 0.5 if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)
        hd = d // heads
        inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.ln_f(x))


# --- the timing ---------------------------------------------------------------------------


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def build(arm: str, args: argparse.Namespace) -> nn.Module:
    model = build_eager(arm, args)
    if args.compile == "all" or (args.compile == "ours" and not arm.startswith("minimal")):
        apply_compile(model)  # the template's own: each of `model.blocks` in place
    return model


def build_eager(arm: str, args: argparse.Namespace) -> nn.Module:
    shape = dict(vocab=args.vocab, d=args.d_model, layers=args.n_layers, heads=args.n_heads)
    if arm.startswith("minimal"):
        return MinimalGPT(**shape, seq=args.seq_len, rope=arm == "minimal rope")
    options = {"mlp": "gelu"} if arm == "ours gelu" else {}
    return TransformerLM(
        TransformerConfig(
            vocab_size=args.vocab,
            d_model=args.d_model,
            n_layers=args.n_layers,
            n_heads=args.n_heads,
            max_seq_len=args.seq_len,
            norm=args.norm,
            **options,
        )
    )


class Arm:
    """A model and its AdamW (fused, as the template's default), stepped one batch at a time."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-4, fused=True)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


VIEWS = {"view", "_unsafe_view", "as_strided", "transpose", "permute", "t", "expand", "detach"}
VIEWS |= {"split", "split_with_sizes", "chunk", "unbind", "slice", "select", "alias", "unsqueeze"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it, forward and backward, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(arm: Arm, batch) -> Counter[str]:
    with OpCounter() as counter:
        arm.step(batch)
    return counter.counts


def run_rounds(arms: dict[str, Arm], batches: list, rounds: int, steps: int) -> list[dict]:
    """Per round, each arm's median step (s) on each clock (`interleaved_rounds`); every arm
    steps through the same batches in the same order."""

    def stepper(arm: Arm):
        cycle = itertools.cycle(batches)
        return lambda: arm.step(next(cycle))

    def show(index: int, result: dict) -> None:
        wall, cpu = result["wall"], result["cpu"]
        print(
            f"round {index} (load {result['load']}): "
            + ", ".join(f"{n} {1e3 * wall[n]:.0f} ms ({1e3 * cpu[n]:.0f} CPU)" for n in arms),
            flush=True,
        )

    steppers = {name: stepper(arm) for name, arm in arms.items()}
    return interleaved_rounds(steppers, rounds, steps, on_round=show)


def profile(arms: dict[str, Arm], batches: list, steps: int, rows: int) -> dict[str, dict]:
    """Self CPU time (ms per step) of every op of each arm, over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    per_arm = {}
    for name, arm in arms.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(steps):
                arm.step(batches[s % len(batches)])
        averages = prof.key_averages()
        per_arm[name] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in averages}
        print(f"\n## {name}: self CPU time per step, top {rows} ops")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    return per_arm


def print_difference(per_arm: dict[str, dict], a: str, b: str, rows: int) -> None:
    if a not in per_arm or b not in per_arm:
        return
    keys = set(per_arm[a]) | set(per_arm[b])
    diff = {k: per_arm[a].get(k, 0.0) - per_arm[b].get(k, 0.0) for k in keys}
    total_a, total_b = sum(per_arm[a].values()), sum(per_arm[b].values())
    print(f"\n## self CPU ms per step, {a} ({total_a:.1f}) minus {b} ({total_b:.1f})")
    print("| op | " + a + " | " + b + " | difference |\n|---|---:|---:|---:|")
    for k in sorted(keys, key=lambda k: -abs(diff[k]))[:rows]:
        print(f"| {k} | {per_arm[a].get(k, 0):.2f} | {per_arm[b].get(k, 0):.2f} | {diff[k]:+.2f} |")


def report(rounds: list[dict], ops: dict[str, Counter], tokens_per_step: int) -> None:
    """Per arm its median step and op counts; per ratio its median over rounds and interval."""
    print(
        "\n| arm | median step (ms) | tokens/s | CPU time / step (ms) | aten ops / step "
        "(not views) |\n|---|---:|---:|---:|---:|"
    )
    for name, counts in ops.items():
        wall = statistics.median(r["wall"][name] for r in rounds)
        cpu = statistics.median(r["cpu"][name] for r in rounds)
        computing = sum(n for op, n in counts.items() if op not in VIEWS)
        counted = f"{sum(counts.values())} ({computing})" if counts else "-"
        print(
            f"| {name} | {1e3 * wall:.1f} | {tokens_per_step / wall:,.0f} | {1e3 * cpu:.1f} | "
            f"{counted} |"
        )
    print(
        "\n| throughput ratio | wall: median over rounds | interval | CPU time: median | "
        "interval |\n|---|---:|---|---:|---|"
    )
    for ratio, (a, b) in RATIOS.items():
        if a in ops and b in ops:
            cells = []
            for clock in CLOCKS:  # throughput a / b = time b / time a, paired by round
                paired = paired_ratio([r[clock][b] for r in rounds], [r[clock][a] for r in rounds])
                cells += [f"**{paired.median:.3f}**", paired.interval()]
            print(f"| {ratio} | " + " | ".join(cells) + " |")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--norm", default="prenorm", help="our arms' model.norm")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: its)")
    parser.add_argument(
        "--compile",
        choices=("none", "all", "ours"),
        default="none",
        help="torch.compile each block of every arm, of our arms only, or of none (default)",
    )
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per arm")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    if args.d_model % args.n_heads or (args.d_model // args.n_heads) % 2:
        parser.error("--d-model must be a multiple of --n-heads with an even head size")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab, (4, args.batch, args.seq_len + 1))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    arms = {}
    for name in args.arms:
        torch.manual_seed(0)
        arms[name] = Arm(build(name, args))
        for s in range(args.warmup):
            arms[name].step(batches[s % len(batches)])
    print(
        f"{software()}, {os.cpu_count()} cores; "
        f"d={args.d_model} L={args.n_layers} heads={args.n_heads} seq={args.seq_len} "
        f"batch={args.batch} vocab={args.vocab} fp32; ours: norm={args.norm}; "
        f"compiled blocks: {args.compile}; "
        f"{args.rounds} rounds x {args.steps} steps; load {load_average():.2f}",
        flush=True,
    )
    # op counts in eager mode only: a compiled block runs its fused kernels below the dispatcher
    ops = {
        name: count_ops(arm, batches[0]) if args.compile == "none" else Counter()
        for name, arm in arms.items()
    }
    started = time.perf_counter()
    rounds = run_rounds(arms, batches, args.rounds, args.steps)
    print(f"\n{time.perf_counter() - started:.0f} s; load at the end {load_average():.2f}")
    report(rounds, ops, args.batch * args.seq_len)
    if args.profile:
        per_arm = profile(arms, batches, args.profile_steps, args.profile_rows)
        print_difference(per_arm, "ours gelu", "minimal rope", args.profile_rows)
        print_difference(per_arm, "ours gelu", "minimal", args.profile_rows)
        print_difference(per_arm, "ours", "ours gelu", args.profile_rows)


if __name__ == "__main__":
    main(sys.argv[1:])
