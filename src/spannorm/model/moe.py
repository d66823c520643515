"""Mixture-of-Experts feed-forward sublayer: token-choice top-k routing, dropless dispatch.

For tokens x_n (flattened over batch and time) and experts E_1..E_M:
    p_n = softmax(W_r x_n)                          router probabilities, [M]
    S_n = top-k_e (p_ne + b_e)                      chosen experts; b = balancing bias (or 0)
    g_ne = p_ne / sum_{j in S_n} p_nj  (e in S_n)   gates: chosen probabilities renormalized (k > 1)
    g_ne = p_ne                         (k = 1)      gate: the raw probability (Switch)
    y_n = sum_{e in S_n} g_ne E_e(x_n)  [+ E_shared(x_n)]
For k > 1 the gates sum to 1 per token, so the output scale does not depend on k or on how peaked
the router is. A renormalized top-1 gate would be identically 1 and the router would learn only
through the auxiliary loss, hence Switch's raw probability there.

Each E_e is the dense MLP's feed-forward network, from the same definition (`ffn_hidden`,
`ffn_input_width`, `ffn_activation` in layers.py; `init_ffn` in init.py); expert weights are
batched 3-D parameters. Tokens are sorted by expert and each expert multiplies its
contiguous slice, so every (token, chosen expert) pair is computed and nothing else.

Balancing:
- auxiliary loss (Switch/GShard): coef * M * sum_e f_e P_e, f_e = share of the N*k assignments
  going to e, P_e = mean_n p_ne; it is coef at a uniform router and grows with skew.
- loss-free bias (DeepSeek-V3): after each training forward b_e += rate * sign(mean load - load_e);
  b shifts the selection only, never the gates. Loads are local to the process (not all-reduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spannorm.model.config import InitScheme, TransformerConfig
from spannorm.model.init import MatrixInit, init_ffn
from spannorm.model.layers import MLP, ffn_activation, ffn_hidden, ffn_input_width


class MoE(nn.Module):
    """Top-k token-choice MoE over `n_experts` MLP experts with optional shared expert (see module
    docstring for the equations). After each forward: `aux_loss` (training with coef > 0, else
    None), `last_load` [M] (share of assignments per expert) and `last_router_entropy` (mean
    entropy of p_n, in nats), all detached except `aux_loss`."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.hidden = ffn_hidden(cfg)
        self.aux_loss_coef = cfg.moe_aux_loss_coef
        self.bias_update_rate = cfg.moe_bias_update_rate
        in_width = ffn_input_width(cfg)
        M, D = cfg.n_experts, cfg.d_model
        self.router_weight = nn.Parameter(torch.empty(M, D))
        self.w_in = nn.Parameter(torch.empty(M, in_width, D))
        self.w_out = nn.Parameter(torch.empty(M, D, self.hidden))
        self.b_in = nn.Parameter(torch.zeros(M, in_width)) if cfg.bias else None
        self.b_out = nn.Parameter(torch.zeros(M, D)) if cfg.bias else None
        self.register_buffer("expert_bias", torch.zeros(M) if cfg.moe_bias_balance else None)
        self.shared_expert = MLP(cfg) if cfg.moe_shared_expert else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        self.last_router_entropy: torch.Tensor | None = None
        self.init_weights(MatrixInit(InitScheme.NORMAL, cfg))

    @torch.no_grad()
    def init_weights(self, init: MatrixInit) -> None:
        """Router as an input matrix; per expert, gate/up as input and proj as output matrices
        (both with DeepNet's gain where it applies); biases zero."""
        init(self.router_weight)
        for e in range(self.n_experts):
            init_ffn(self.w_in[e], self.w_out[e], self.hidden, init)
        for bias in (self.b_in, self.b_out):
            if bias is not None:
                bias.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> router probabilities p [N, M] (at least float32), chosen experts [N, k] and
        gates [N, k]."""
        precision = torch.promote_types(x.dtype, torch.float32)
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1, dtype=precision)
        scores = probs if self.expert_bias is None else probs + self.expert_bias
        chosen = scores.topk(self.top_k, dim=-1).indices
        gates = probs.gather(-1, chosen)
        if self.top_k == 1:
            return probs, chosen, gates
        return probs, chosen, gates / gates.sum(dim=-1, keepdim=True)

    def run_experts(self, sorted_tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Expert e on its slice of `sorted_tokens` (counts[e] rows, in expert order):
        w_out,e act(w_in,e x + b_in,e) + b_out,e.

        Every expert runs, on an empty slice if unused, so all parameters get a gradient. The
        weights are unbound once: unbind's backward stacks the per-expert gradients, whereas
        indexing w_in[e] would materialize a full-size gradient for every expert."""
        no_bias = [None] * self.n_experts
        b_in = no_bias if self.b_in is None else self.b_in.unbind(0)
        b_out = no_bias if self.b_out is None else self.b_out.unbind(0)
        chunks = sorted_tokens.split(counts, dim=0)
        outputs = [
            F.linear(ffn_activation(self.kind, F.linear(chunk, w_in, bias_in)), w_out, bias_out)
            for chunk, w_in, bias_in, w_out, bias_out in zip(
                chunks, self.w_in.unbind(0), b_in, self.w_out.unbind(0), b_out, strict=True
            )
        ]
        return torch.cat(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        tokens = x.reshape(B * T, D)
        probs, chosen, gates = self.route(tokens)
        assignment_expert = chosen.flatten()  # assignment i = (token i // k, expert chosen[i])
        order = assignment_expert.argsort(stable=True)
        counts = torch.bincount(assignment_expert, minlength=self.n_experts)
        sorted_tokens = tokens[order // self.top_k]
        expert_out = self.run_experts(sorted_tokens, counts.tolist())
        unsorted = torch.empty_like(expert_out).index_copy(0, order, expert_out)
        weighted = unsorted.view(B * T, self.top_k, D) * gates.to(unsorted.dtype).unsqueeze(-1)
        y = self.dropout(weighted.sum(dim=1))
        if self.shared_expert is not None:
            y = y + self.shared_expert(tokens)
        self._record_stats(probs, counts)
        return y.view(B, T, D)

    def _record_stats(self, probs: torch.Tensor, counts: torch.Tensor) -> None:
        """Set aux_loss / last_load / last_router_entropy and, when training, update the bias."""
        load = counts.to(probs.dtype) / counts.sum()
        self.last_load = load.detach()
        self.last_router_entropy = torch.special.entr(probs.detach()).sum(dim=-1).mean()
        self.aux_loss = None
        if self.training and self.aux_loss_coef > 0:
            mean_prob = probs.mean(dim=0)
            self.aux_loss = self.aux_loss_coef * self.n_experts * (load * mean_prob).sum()
        if self.training and self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
