"""`generate.py`: sample text from a trained checkpoint."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from spannorm.console import console
from spannorm.errors import UsageError, checking_input


def sample(cfg: DictConfig) -> list[str]:
    """Generate text from a checkpoint: prompt, max_new_tokens, temperature, top_k, kv_cache."""
    from spannorm.inference.generate import check_generation, check_sampling, generate
    from spannorm.inference.load import load_trained

    with checking_input():
        check_sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.num_samples)
        trained = load_trained(cfg.ckpt_path, tokenizer_file=cfg.get("tokenizer_file"))
        tokenizer = trained.tokenizer
        ids = tokenizer.encode(cfg.prompt)
        if not ids:
            raise UsageError("prompt='' encodes to no tokens; give a non-empty prompt")
        check_generation(len(ids), cfg.max_new_tokens, trained.model.cfg.max_seq_len, cfg.kv_cache)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.tensor([ids] * cfg.num_samples, dtype=torch.long)
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
