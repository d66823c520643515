"""Analyses of models and runs; `signal` measures signal propagation (pure torch, no Lightning)."""

from spannorm.analysis.signal import measure_signal, summarize_signal

__all__ = ["measure_signal", "summarize_signal"]
