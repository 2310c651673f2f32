"""Task-independent metrics."""

from __future__ import annotations

import math

# math.exp overflows a float above ~709.78.
_MAX_EXP_ARG = 709.0


def perplexity(mean_loss: float) -> float:
    """exp(mean cross-entropy), infinity instead of an overflow error for a hopeless model."""
    if math.isnan(mean_loss):
        return float("nan")
    return math.exp(mean_loss) if mean_loss < _MAX_EXP_ARG else float("inf")
