"""The pure-torch model: config, norms, sublayers, placements, init and the LM."""

from spannorm.model.config import TransformerConfig
from spannorm.model.placements import PLACEMENTS, get_placement
from spannorm.model.transformer import TransformerLM

__all__ = ["PLACEMENTS", "TransformerConfig", "TransformerLM", "get_placement"]
