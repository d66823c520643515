"""Training-time transforms of a built `TransformerLM`, applied in place as separate steps (in this
order): activation checkpointing, compilation, FSDP2 sharding. None of them renames a parameter,
so checkpoints load into a plain model (`spannorm.training.checkpointing.consolidate_checkpoint` makes a
sharded checkpoint folder one file).
"""

from __future__ import annotations

import torch
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from spannorm.model import TransformerLM


def apply_activation_checkpointing(model: TransformerLM) -> None:
    """Keep only each block's input in the forward pass and recompute the rest in the backward."""
    if model.cfg.ffn == "moe" and model.cfg.moe_bias_balance:
        raise ValueError(
            "model.activation_checkpointing=true recomputes each block's forward, which would update "
            "the MoE balancing bias twice per step and may route differently; "
            "set model.moe_bias_balance=false or model.activation_checkpointing=false"
        )
    for block in model.blocks:
        checkpoint(block)


def apply_compile(model: TransformerLM) -> None:
    """Compile each block in place (`nn.Module.compile`), so that state_dict keys stay unchanged
    (no `_orig_mod.` prefix)."""
    for block in model.blocks:
        block.compile()


def fsdp_mixed_precision(precision: str, device_type: str) -> MixedPrecisionPolicy:
    """bf16 parameters for compute with fp32 gradient reduction on GPU under a bf16 `precision`;
    fp32 throughout otherwise."""
    if device_type == "cuda" and precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: TransformerLM, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy) -> None:
    """Shard each block over `mesh`, then the rest (embedding, final norm, head) as the root. The
    last block keeps its parameters gathered after forward: backward needs them first."""
    last = len(model.blocks) - 1
    for index, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=index < last)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
