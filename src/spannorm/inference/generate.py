"""Autoregressive sampling from a TransformerLM, with or without a KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch

from spannorm.model.layers import KVCache
from spannorm.model.transformer import TransformerLM


def next_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample from softmax(logits / temperature) restricted to the top-k; temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)


def check_sampling(
    max_new_tokens: int, temperature: float, top_k: int | None, num_samples: int = 1
) -> None:
    """ValueError, naming the option and what it takes, for sampling options that would print
    nothing new or fail inside torch."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(
            f"temperature={temperature!r} must be a number >= 0 (0: always the likeliest token)"
        )
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer, or null for every token")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r} must be a positive integer")


def check_generation(prompt_tokens: int, max_new_tokens: int, limit: int, kv_cache: bool) -> None:
    """ValueError when the KV cache would have to hold more positions than the model has."""
    if kv_cache and prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_seq_len={limit}; lower max_new_tokens or use kv_cache=false"
        )


@torch.no_grad()
def generate(
    model: TransformerLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    kv_cache: bool = True,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> torch.Tensor:
    """Extend `idx` [B, T] by `max_new_tokens` sampled tokens, or fewer when `stop(idx)` (called
    after each new token with the sequences so far) returns True.

    With `kv_cache` each new token costs one position of compute (the context may not exceed
    `max_seq_len`); without it the whole (cropped) context is recomputed every step.
    """
    limit = model.cfg.max_seq_len
    check_generation(idx.shape[1], max_new_tokens, limit, kv_cache)
    was_training = model.training
    model.eval()
    attentions = [block.attn for block in model.blocks]
    try:
        if kv_cache:
            for attn in attentions:
                attn.kv_cache = KVCache()
        step_input = idx
        for _ in range(max_new_tokens):
            context = step_input if kv_cache else idx[:, -limit:]
            logits = model(context)[:, -1, :]
            token = next_token(logits, temperature, top_k, generator)
            idx = torch.cat((idx, token), dim=1)
            step_input = token
            if stop is not None and stop(idx):
                break
    finally:
        for attn in attentions:
            attn.kv_cache = None
        model.train(was_training)
    return idx
