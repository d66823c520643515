"""The decoder-only Transformer LM: embedding, a stack of blocks wired by the chosen norm placement,
an optional final norm, and the LM head (tied to the embedding by default)."""

from __future__ import annotations

import torch
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.init import embedding_scale, init_weights, resolve_init
from spannorm.model.norms import make_norm
from spannorm.model.placements import get_placement


class TransformerLM(nn.Module):
    """logits = head(N_f(block_{L-1}(... block_0(s * embed(idx))))), N_f only if the placement
    asks for a final norm; s = sqrt(d) under unit-variance inits, else 1."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        placement = get_placement(cfg.norm)
        self.init_scheme = resolve_init(cfg, placement.default_init)
        self.embed_scale = embedding_scale(self.init_scheme, cfg.d_model)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            placement.make_block(cfg, layer) for layer in range(cfg.n_layers)
        )
        self.final_norm = (
            make_norm(cfg.norm_type, cfg.d_model, cfg.norm_eps)
            if placement.final_norm(cfg)
            else nn.Identity()
        )
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        init_weights(self, cfg, self.init_scheme)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]."""
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        x = self.drop(self.tok_emb(idx) * self.embed_scale)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the sublayers produced in the last forward (MoE balancing)."""
        losses = [
            m.aux_loss
            for m in self.blocks.modules()
            if isinstance(getattr(m, "aux_loss", None), torch.Tensor)
        ]
        return torch.stack(losses).sum() if losses else None

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices; none on norms, biases and embeddings."""
        decay, no_decay = [], []
        embeddings = {id(self.tok_emb.weight)}
        for _, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
