"""Measurements on a model at a point in training (pure torch, no Lightning)."""

from spannorm.analysis.signal import measure_signal, summarize_signal

__all__ = ["measure_signal", "summarize_signal"]
