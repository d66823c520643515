"""`generate.py`: sample text from a trained checkpoint."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from spannorm.console import console
from spannorm.errors import UsageError, checking_input


def sample(cfg: DictConfig) -> list[str]:
    """Generate text from a checkpoint: prompt, max_new_tokens, temperature, top_k, kv_cache."""
    from spannorm.inference.generate import generate
    from spannorm.inference.load import load_trained

    with checking_input():
        trained = load_trained(cfg.ckpt_path)
        tokenizer = trained.tokenizer
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.tensor([tokenizer.encode(cfg.prompt)] * cfg.num_samples, dtype=torch.long)
    if prompt.shape[1] == 0:
        raise UsageError("prompt='' encodes to no tokens; give a non-empty prompt")
    out = generate(
        trained.model,
        prompt,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        kv_cache=cfg.kv_cache,
        generator=generator,
    )
    texts = [tokenizer.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        console.rule(f"sample {i}")
        console.print(text, markup=False)
    return texts
