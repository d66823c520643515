"""The decoder-only Transformer LM: embedding (optionally normalized), a stack of blocks wired by
the chosen norm placement, an optional final norm, and the LM head (tied to the embedding by
default). nGPT's hypersphere placement also scales the logits and keeps its matrices unit-norm
through `after_optimizer_step`."""

from __future__ import annotations

import torch
from torch import nn

from spannorm.model.config import TransformerConfig
from spannorm.model.init import embedding_scale, init_weights, resolve_init
from spannorm.model.ngpt import ScaledVector, normalize_weights_
from spannorm.model.norms import norm_for
from spannorm.model.placements import get_placement


class TransformerLM(nn.Module):
    """logits = head(N_f(block_{L-1}(... block_0(x_0)))), x_0 = s * embed(idx), N_f only if the
    placement asks for a final norm; s = sqrt(d) under unit-variance inits, else 1.

    `model.embed_norm=true` (any placement; OLMo-core `embedding_norm`, modded-nanogpt):
        x_0 = N_e(s * embed(idx))       (`embed_norm`; nn.Identity when off)

        idx ── embed ── ×s ── N_e ── x_0 ── block_0 ── ...

    nGPT (`placement.hypersphere`): s = 1, no final norm, logits = s_z * head(x_L) (`s_z`, one
    entry per token), every matrix unit-norm along d at construction and after each
    `after_optimizer_step()`, and no weight decay (`no_weight_decay`).
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        placement = get_placement(cfg.norm)
        self.hypersphere = placement.hypersphere
        self.init_scheme = resolve_init(cfg, placement.default_init)
        self.embed_scale = (
            1.0 if self.hypersphere else embedding_scale(self.init_scheme, cfg.d_model)
        )
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_norm = norm_for(cfg, cfg.d_model) if cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            placement.make_block(cfg, layer) for layer in range(cfg.n_layers)
        )
        self.final_norm = norm_for(cfg, cfg.d_model) if placement.final_norm(cfg) else nn.Identity()
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        # nGPT's logit scale s_z: init 1, stored at scale 1/sqrt(d) (see spannorm.model.ngpt)
        self.s_z = (
            ScaledVector(cfg.vocab_size, init=1.0, scale=cfg.d_model**-0.5)
            if self.hypersphere
            else None
        )
        init_weights(self, cfg, self.init_scheme)
        if self.hypersphere:
            normalize_weights_(self)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] token ids -> logits [B, T, vocab]."""
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}"
            )
        x = self.drop(self.embed_norm(self.tok_emb(idx) * self.embed_scale))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_norm(x))
        return logits if self.s_z is None else logits * self.s_z().type_as(logits)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call after every optimizer step (on every rank; FSDP2 included). nGPT: put the matrices
        back on the unit sphere along d (`spannorm.model.ngpt.normalize_weights_`). Any other
        placement: nothing."""
        if self.hypersphere:
            normalize_weights_(self)

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

    def no_weight_decay(self, param: torch.Tensor) -> bool:
        """Whether AdamW must leave `param` undecayed: every parameter under nGPT (its matrices
        are held at unit norm and the paper uses no weight decay); otherwise norms' gains and
        biases, biases, scalars (all ndim < 2) and the token embedding."""
        return self.hypersphere or param.ndim < 2 or param is self.tok_emb.weight

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices; none on norms, biases and embeddings, and none at all
        under nGPT (`no_weight_decay`; its decay group is then empty)."""
        decay, no_decay = [], []
        for _, param in self.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if self.no_weight_decay(param) else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
