"""The names of the per-block scalars: written by the monitors (`spannorm.callbacks`), read back
by the analyses and reports (`spannorm.analysis`). One place for the format, so both agree.

A per-block tag is `<namespace>/<metric>/block_<l>`, `l` zero-padded (at least two digits) so that
the tags sort by depth: `layers/rms/block_07`, `moe/load/block_12`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

# LayerStatsMonitor's per-block metrics, logged as `layers/<metric>/block_<l>` (their definitions
# are in spannorm.callbacks.layer_stats)
LAYER_METRICS = (
    "rms",
    "stream_grad_norm",
    "param_grad_norm",
    "update_ratio",
    "cos",
    "attn_entropy",
    "erank",
)
# the four that compare runs' per-block profiles best (the reports' profile figures)
PROFILE_METRICS = ("rms", "stream_grad_norm", "update_ratio", "cos")

Series = TypeVar("Series")


def block_tag(namespace: str, metric: str, block: int, n_blocks: int) -> str:
    """`<namespace>/<metric>/block_07`, zero-padded so the tags sort by depth."""
    return f"{namespace}/{metric}/block_{block:0{max(2, len(str(n_blocks - 1)))}d}"


def block_series(
    scalars: Mapping[str, Series], metric: str, namespace: str = "layers"
) -> list[Series]:
    """The values of `scalars` (keyed by tag) for `<namespace>/<metric>/block_<l>`, in block
    order."""
    prefix = f"{namespace}/{metric}/block_"
    return [scalars[tag] for tag in sorted(tag for tag in scalars if tag.startswith(prefix))]
