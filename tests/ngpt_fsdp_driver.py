"""nGPT's renormalization on FSDP2-sharded parameters (2 CPU processes, gloo) against the same on
an unsharded copy: `python ngpt_fsdp_driver.py <out dir> <port>` writes `rank<r>.json` per rank
with the largest difference of any parameter and the largest |norm - 1| of the unit-norm
matrices."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from spannorm.model import TransformerConfig, TransformerLM
from spannorm.model.ngpt import unit_norm_matrices

WORLD_SIZE = 2


def run(rank: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=50, d_model=16, n_layers=2, n_heads=2, norm="ngpt", tie_embeddings=False
    )
    sharded, plain = TransformerLM(cfg), TransformerLM(cfg)
    plain.load_state_dict(sharded.state_dict())
    with torch.no_grad():  # move every parameter off the sphere, the same on both copies
        for a, b in zip(sharded.parameters(), plain.parameters(), strict=True):
            step = 0.3 * torch.randn_like(a)
            a.add_(step)
            b.add_(step)
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.after_optimizer_step()
    plain.after_optimizer_step()
    difference = max(
        (a.full_tensor() - b).abs().max().item()
        for a, b in zip(sharded.parameters(), plain.parameters(), strict=True)
    )
    off_sphere = max(
        (torch.linalg.vector_norm(weight.full_tensor(), dim=dim) - 1).abs().max().item()
        for weight, dim in unit_norm_matrices(sharded)
    )
    kinds = {type(weight).__name__ for weight, _ in unit_norm_matrices(sharded)}
    report = {
        "rank": rank,
        "difference": difference,
        "off_sphere": off_sphere,
        "kinds": sorted(kinds),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.multiprocessing.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD_SIZE)
