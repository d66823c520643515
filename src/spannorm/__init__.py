"""spannorm: Transformer LMs whose normalization placement is a switch."""

from spannorm.model import PLACEMENTS, TransformerConfig, TransformerLM

__all__ = ["PLACEMENTS", "TransformerConfig", "TransformerLM"]
